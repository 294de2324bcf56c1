//! ASTRA models and training on libtorch (through tch).
//!
//! - [`config`]: HF `config.json` for ViT and GPT-2;
//! - [`data`]: IDX (MNIST, Fashion-MNIST) and CIFAR-10/100 binary batches;
//! - [`models`]: ViT and GPT-2 with HF parameter names, Mixed-Precision Attention
//!   ([`models::mpa`]), grouped VQ with EMA, NAQ and the straight-through estimator
//!   ([`models::vq`]), Distributed Class Tokens, and the per-device inference path;
//! - [`weights`], [`model`]: safetensors checkpoints, HF folders and the HF cache;
//! - [`generate`]: decoding after an ASTRA prefill, with a key/value cache of VQ indices;
//! - [`train`]: the run folder, AdamW, and the (resumable) training loop;
//! - [`libtorch`]: the libtorch and accelerators this process sees;
//! - [`cuda`]: CUDA kernels (NVRTC, cudarc) for the nearest-codeword search and the EMA statistics.
pub mod bench_step;
pub mod cli;
pub mod config;
pub mod cuda;
pub mod data;
pub mod engine;
pub mod error;
pub mod export;
pub mod generate;
pub mod int8_linear;
pub mod libtorch;
pub mod model;
pub mod models;
pub mod precision;
pub mod train;
pub mod weight_quant;
pub mod weights;

pub use error::{Result, TrainError};
