//! What can be wrong with a job spec.

/// A job spec was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    /// The file is not valid TOML.
    #[error("job spec is not valid TOML: {0}")]
    Syntax(String),
    /// A key that the spec format does not have (often a typo).
    #[error("unknown key `{key}`; allowed here: {}", allowed.join(", "))]
    UnknownKey {
        /// Full dotted key.
        key: String,
        /// Keys allowed at that place.
        allowed: Vec<String>,
    },
    /// A required key is absent.
    #[error("missing required key `{key}` ({what})")]
    Missing {
        /// Full dotted key.
        key: String,
        /// What it is for.
        what: String,
    },
    /// A value of the wrong TOML type.
    #[error("`{key}` must be {expected}, found {found}")]
    WrongType {
        /// Full dotted key.
        key: String,
        /// Expected type.
        expected: String,
        /// What was there.
        found: String,
    },
    /// A value outside what is allowed.
    #[error("`{key}` = {value} is not allowed; {allowed}")]
    InvalidValue {
        /// Full dotted key.
        key: String,
        /// The offending value as written.
        value: String,
        /// What is allowed.
        allowed: String,
    },
}
