//! Errors of the quantisation library. Every variant renders as one line that names what is wrong.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter { name: &'static str, reason: String },
    #[error("input has {found} rows but K = {k} centroids need at least {k}")]
    TooFewRows { found: usize, k: usize },
    #[error("input row {row} column {col} is not finite ({value})")]
    NonFinite { row: usize, col: usize, value: f32 },
    #[error("dimension mismatch: {what}: expected {expected}, found {found}")]
    Shape {
        what: String,
        expected: String,
        found: String,
    },
    #[error("index {index} at position {position} is out of range for K = {k}")]
    IndexOutOfRange {
        index: usize,
        position: usize,
        k: usize,
    },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = QuantError> = std::result::Result<T, E>;

impl QuantError {
    pub(crate) fn param(name: &'static str, reason: impl Into<String>) -> Self {
        QuantError::InvalidParameter {
            name,
            reason: reason.into(),
        }
    }
    pub(crate) fn file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        QuantError::File {
            path: path.into(),
            reason: reason.into(),
        }
    }
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        QuantError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Rejects NaN and infinite entries before they poison k-means or a codebook.
pub fn check_finite(data: ndarray::ArrayView2<f32>) -> Result<()> {
    for (row, r) in data.outer_iter().enumerate() {
        for (col, &value) in r.iter().enumerate() {
            if !value.is_finite() {
                return Err(QuantError::NonFinite { row, col, value });
            }
        }
    }
    Ok(())
}
