//! ASTRA evaluation: [`predict`] (logits of a model, plain or under ASTRA, on any forward path),
//! [`generate`] (a prompt continued after an ASTRA prefill, with a cache of VQ indices),
//! [`settings_sweep`] (`accuracy` / `perplexity` over ASTRA settings), [`measure`] (`profile`:
//! per-device compute of every method, into astra-sim's profile and trace formats), [`runtime`]
//! (the multi-process runtime: `worker`, `distributed`), and [`cli`] (the commands).
pub mod cli;
pub mod error;
pub mod generate;
pub mod measure;
pub mod predict;
pub mod runtime;
pub mod settings_sweep;

pub use astra_train::libtorch::RuntimeInfo;
