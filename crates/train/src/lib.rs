//! hetero-train
