//! ASTRA models and training on libtorch (through tch).
//!
//! Models, data sets and the trainer land in their own modules; `runtime` reports the libtorch and
//! accelerators this process sees.
pub mod runtime;
