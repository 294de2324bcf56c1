//! Errors of the evaluation library, like the other crates' (thiserror): every variant renders
//! as one line, and the causes from the crates below are kept as they are.

use astra_quant::QuantError;
use astra_sim::transport::net::TransportError;
use astra_sim::transport::FrameError;
use astra_sim::SimError;
use astra_train::error::TrainError;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A request or a peer's message that cannot be served, said in one line.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Sim(#[from] SimError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Shape(#[from] ndarray::ShapeError),
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;

/// `EvalError::Invalid` from a format string.
#[macro_export]
macro_rules! invalid {
    ($($t:tt)*) => {
        $crate::error::EvalError::Invalid(format!($($t)*))
    };
}

/// Returns `EvalError::Invalid` from a format string.
#[macro_export]
macro_rules! fail {
    ($($t:tt)*) => {
        return Err($crate::invalid!($($t)*))
    };
}
