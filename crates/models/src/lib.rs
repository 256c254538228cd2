//! hetero-models
