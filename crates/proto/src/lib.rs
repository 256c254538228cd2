//! hetero-proto
