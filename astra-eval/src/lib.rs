//! ASTRA evaluation: accuracy and perplexity sweeps, compute profiling, the multi-process runtime.
//! Today: `predict` (logits of a model, plain or under ASTRA) and `info`.
pub mod predict;

pub use astra_train::runtime::RuntimeInfo;
