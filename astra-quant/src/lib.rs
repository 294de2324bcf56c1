//! ASTRA's vector quantisation, in pure Rust (no libtorch):
//!
//! - [`kmeans`]: Lloyd's k-means with GEMM distances ([`nearest`]), faiss-style subsampling and
//!   empty-cluster splitting, deterministic for a seed;
//! - [`codebook`]: grouped codebooks (G groups of K × D/G) with encode, decode, error and usage;
//! - [`bitpack`]: the wire format, ceil(log2 K) bits per index;
//! - [`residual`]: streamed residual mean/covariance and the NAQ noise sampler;
//! - [`file`]: codebooks and noise models in safetensors; [`npy`]: NumPy array files;
//!   [`atomic`]: the atomic file writes every crate uses.
pub mod atomic;
pub mod bench;
pub mod bitpack;
pub mod cli;
pub mod codebook;
pub mod error;
pub mod file;
pub mod kmeans;
pub mod nearest;
pub mod npy;
pub mod residual;
pub mod threads;

pub use codebook::GroupedCodebook;
pub use error::{QuantError, Result};
pub use file::{BlockQuantizer, CodebookFile};
pub use kmeans::{Init, KMeansConfig};
pub use residual::{NoiseKind, NoiseModel, ResidualAccumulator};
