//! ASTRA evaluation: accuracy and perplexity sweeps, compute profiling, the multi-process runtime.
//! Today: `predict` (logits of a model, plain or under ASTRA), `accuracy` / `perplexity` (sweeps
//! over ASTRA settings), `profile` (per-device compute of every method, into astra-sim's profile
//! and trace formats) and `info`.
pub mod cli;
pub mod predict;
pub mod profile;
pub mod runtime;
pub mod sweep;

pub use astra_train::libtorch::RuntimeInfo;
