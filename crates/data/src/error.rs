//! The data crate's error type: every error names the file it is about.

use std::path::PathBuf;

/// A dataset could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file's contents are not what its format promises.
    #[error("{path} is not a valid {format} file: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The expected format.
        format: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A dataset folder lacks a file it needs.
    #[error("dataset folder {dir} has no {name}{hint}")]
    Missing {
        /// The folder searched.
        dir: PathBuf,
        /// The file that was looked for.
        name: String,
        /// How to get it.
        hint: String,
    },
    /// Files that belong together disagree.
    #[error("{0}")]
    Inconsistent(String),
}
