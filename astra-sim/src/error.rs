//! Errors of the simulator; each renders as one line naming the field or file at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{path}:{line}: {reason}")]
    Csv {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// An I/O failure on a file, with the OS error kept as the cause.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("profile {profile} has no compute time for {method} on {devices} device(s) with {tokens} tokens")]
    MissingProfile {
        profile: String,
        method: String,
        devices: u32,
        tokens: u64,
    },
}

pub type Result<T, E = SimError> = std::result::Result<T, E>;

impl SimError {
    /// The I/O error of an operation on `path`, keeping the cause.
    pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| SimError::Io { path, source }
    }
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        SimError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
