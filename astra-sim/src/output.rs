//! Writing result files atomically (the workspace's one helper, [`astra_quant::atomic`]), so an
//! interrupted run never leaves a half-written table or a temporary file behind.

use std::path::Path;

use crate::error::{Result, SimError};

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    astra_quant::atomic::write_bytes(path, bytes).map_err(SimError::io(path))
}
