//! hetero-cluster
