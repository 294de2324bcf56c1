//! The options of every `astra-quant` subcommand, declared once: the binary parses them and the
//! commands in [`super`] take them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::Init;

/// ASTRA vector quantisation: fit grouped codebooks with k-means, encode and decode token
/// embeddings, bit-pack indices, and inspect codebook files.
#[derive(Parser)]
#[command(name = "astra-quant", version, about)]
pub struct Cli {
    /// Worker threads (0 = one per core). Results do not depend on it.
    #[arg(long, global = true, default_value_t = 0)]
    pub threads: usize,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Noise {
    None,
    Full,
    Diagonal,
}

#[derive(Subcommand)]
pub enum Command {
    /// Fit a grouped codebook (one k-means per group) to the rows of a 2-D float32 array.
    Fit(FitArgs),
    /// Encode rows to indices (n × G, uint16 .npy) and optionally to a packed bitstream.
    Encode(EncodeArgs),
    /// Decode indices (a .npy, or a packed bitstream with --rows) back to rows (float32 .npy).
    Decode(DecodeArgs),
    /// Describe a codebook file; with --input also reconstruction error and code usage.
    Stats(StatsArgs),
    /// Time k-means, encoding and bit packing on synthetic data; prints a markdown table.
    Bench(BenchArgs),
}

/// Options of `astra-quant fit`.
#[derive(Args, Clone, Debug)]
pub struct FitArgs {
    /// Rows to fit: a 2-D float32/float64 .npy, or a .safetensors file (see --tensor).
    #[arg(long)]
    pub input: PathBuf,
    /// Tensor to read from a .safetensors input (default: its only tensor).
    #[arg(long)]
    pub tensor: Option<String>,
    /// Codewords per group.
    #[arg(long, default_value_t = 1024)]
    pub k: usize,
    /// Groups G; each row of width D is split into G sub-vectors of width D/G.
    #[arg(long, default_value_t = 1)]
    pub groups: usize,
    /// Lloyd iterations.
    #[arg(long, default_value_t = 25)]
    pub iters: usize,
    /// Seed of subsampling and initialisation (group g uses seed + g).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Initialisation.
    #[arg(long, value_enum, default_value = "random")]
    pub init: Init,
    /// Rows used per centroid at most (0 = all rows).
    #[arg(long, default_value_t = 256)]
    pub max_points_per_centroid: usize,
    /// Stop when the objective improves by less than this fraction (0 = run all iterations).
    #[arg(long, default_value_t = 0.0)]
    pub tol: f64,
    /// Also store the residual noise model (for Noise-Augmented Quantization) computed on the input.
    #[arg(long, value_enum, default_value = "none")]
    pub noise: Noise,
    /// Output codebook file (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Write per-group, per-iteration statistics as JSON here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Options of `astra-quant encode`.
#[derive(Args, Clone, Debug)]
pub struct EncodeArgs {
    #[arg(long)]
    pub codebook: PathBuf,
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long)]
    pub tensor: Option<String>,
    /// Which block's codebook to use.
    #[arg(long, default_value_t = 0)]
    pub block: usize,
    /// Indices as a uint16 .npy of shape n × G.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Indices as a little-endian bitstream of ceil(log2 K) bits each.
    #[arg(long)]
    pub packed: Option<PathBuf>,
}

/// Options of `astra-quant decode`.
#[derive(Args, Clone, Debug)]
pub struct DecodeArgs {
    #[arg(long)]
    pub codebook: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub block: usize,
    /// Indices .npy (any integer dtype), n × G.
    #[arg(long, conflicts_with = "packed")]
    pub indices: Option<PathBuf>,
    /// Packed bitstream written by `encode --packed`; needs --rows.
    #[arg(long, requires = "rows")]
    pub packed: Option<PathBuf>,
    /// Rows in the packed bitstream.
    #[arg(long)]
    pub rows: Option<usize>,
    #[arg(long)]
    pub out: PathBuf,
}

/// Options of `astra-quant stats`.
#[derive(Args, Clone, Debug)]
pub struct StatsArgs {
    #[arg(long)]
    pub codebook: PathBuf,
    #[arg(long)]
    pub input: Option<PathBuf>,
    #[arg(long)]
    pub tensor: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub block: usize,
}

/// Options of `astra-quant bench`.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 65536)]
    pub n: usize,
    #[arg(long, default_value_t = 48)]
    pub d: usize,
    #[arg(long, default_value_t = 1024)]
    pub k: usize,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Repetitions of each throughput measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
}
