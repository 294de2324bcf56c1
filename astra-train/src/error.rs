//! Errors of the training library; each renders as one line naming what is wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("config field {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// An I/O failure on a file, with the OS error kept as the cause.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("weight {name}: {reason}")]
    Weight { name: String, reason: String },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error(transparent)]
    Quant(#[from] astra_quant::QuantError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl TrainError {
    pub fn config(field: &'static str, reason: impl Into<String>) -> Self {
        TrainError::Config {
            field,
            reason: reason.into(),
        }
    }
    /// The I/O error of an operation on `path`, keeping the cause.
    pub fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| TrainError::Io { path, source }
    }
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        TrainError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }
}
