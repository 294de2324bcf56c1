//! The options of every `astra-sim` subcommand, declared once: the binary parses them and the
//! commands in [`super`] take them.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

use crate::trace::BlockSplit;
use crate::ModelShape;

/// Network simulator for multi-device Transformer inference: the ASTRA paper's latency tables and
/// figures, and what-if studies over network models.
#[derive(Parser)]
#[command(name = "astra-sim", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Encoder blocks L.
    #[arg(long, default_value_t = 12)]
    pub blocks: u32,
    /// Hidden width D.
    #[arg(long, default_value_t = 768)]
    pub hidden: u32,
    /// Bits per embedding element on the wire (32 = fp32).
    #[arg(long, default_value_t = 32)]
    pub element_bits: u32,
    /// Codewords K per group (ASTRA sends ceil(log2 K) bits per index).
    #[arg(long, default_value_t = 1024)]
    pub codewords: u32,
    /// Codebooks per block a token sends indices of: 1 (block input: ViT, GPT-2) or 2 (keys and
    /// values: Llama, 2·L·G·log2 K bits per token).
    #[arg(long, default_value_t = 1)]
    pub codebooks_per_block: u32,
    /// Share of each block's compute before its exchange (LN + VQ encode), for traces built from a profile.
    #[arg(long, default_value_t = 0.05)]
    pub pre_fraction: f64,
    /// Share of each block's compute that can overlap its exchange (ASTRA, SP), for traces built from a profile.
    #[arg(long, default_value_t = 0.3)]
    pub independent_fraction: f64,
}

impl ModelArgs {
    pub fn shape(&self) -> Result<ModelShape> {
        if self.blocks == 0 || self.hidden == 0 || self.element_bits == 0 {
            bail!("--blocks, --hidden and --element-bits must be positive");
        }
        if !(1..=2).contains(&self.codebooks_per_block) {
            bail!(
                "--codebooks-per-block must be 1 (block input) or 2 (keys and values), got {}",
                self.codebooks_per_block
            );
        }
        if !(2..=65536).contains(&self.codewords) {
            bail!("--codewords must be in 2..=65536, got {}", self.codewords);
        }
        Ok(ModelShape {
            blocks: self.blocks,
            hidden: self.hidden,
            element_bits: self.element_bits,
            index_bits: astra_bits(self.codewords),
            codebooks_per_block: self.codebooks_per_block,
        })
    }
    pub fn split(&self) -> Result<BlockSplit> {
        let (p, i) = (self.pre_fraction, self.independent_fraction);
        if !(0.0..=1.0).contains(&p) || !(0.0..=1.0).contains(&i) || p + i > 1.0 {
            bail!(
                "--pre-fraction and --independent-fraction must be in [0, 1] and sum to at most 1"
            );
        }
        Ok(BlockSplit {
            pre: p,
            independent: i,
        })
    }
}

fn astra_bits(k: u32) -> u32 {
    u32::BITS - (k - 1).leading_zeros()
}

#[derive(Subcommand)]
pub enum Command {
    /// Regenerate the paper's latency results (speedups, Table 4, Fig 3, dynamic network, plots) into DIR.
    Reproduce(ReproduceArgs),
    /// Simulate any grid of methods × devices × tokens × bandwidths × network settings to CSV.
    Sweep(SweepArgs),
    /// Write the trace of the given configurations, built from a compute source, as JSON.
    Trace(TraceArgs),
    /// Replay runs and compare with the models; with --live over real TCP between processes in
    /// network namespaces behind kernel-shaped links (needs root; else unshaped loopback).
    Replay(ReplayArgs),
    /// One device of a live replay (started by `replay --live`).
    #[command(hide = true)]
    ReplayWorker(ReplayWorkerArgs),
    /// Run the dynamic-bandwidth experiment on any trace and latency table.
    Dynamic(DynamicArgs),
    /// Plot real runs (astra-eval distributed --json summaries) against astra-sim's predictions
    /// of them (NAME.ab.csv beside each NAME.json), with the ±5% band.
    PlotMeasured(PlotMeasuredArgs),
    /// A line figure from a `series,x,y,source` CSV (ours solid, the paper's dashed and hollow).
    PlotLines(PlotLinesArgs),
    /// Grouped bars from a `group,bar,value` CSV (e.g. throughput against a peer).
    PlotBars(PlotBarsArgs),
}

/// The data and the PNG of a figure command.
#[derive(Args, Clone, Debug)]
pub struct FigureFiles {
    #[arg(long)]
    pub csv: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub title: String,
}

/// Options of `astra-sim plot-bars`.
#[derive(Args, Clone, Debug)]
pub struct PlotBarsArgs {
    #[command(flatten)]
    pub files: FigureFiles,
    /// What the values are (the axis description).
    #[arg(long)]
    pub x_desc: String,
    /// Draw a dashed line at this value (e.g. 1 for parity with a peer).
    #[arg(long)]
    pub reference: Option<f64>,
    /// Each group's bars end to end on one row (the parts of a whole), its total at the end.
    #[arg(long)]
    pub stacked: bool,
}

/// Options of `astra-sim plot-lines`.
#[derive(Args, Clone, Debug)]
pub struct PlotLinesArgs {
    #[command(flatten)]
    pub files: FigureFiles,
    #[arg(long)]
    pub x_desc: String,
    #[arg(long)]
    pub y_desc: String,
    /// Log-scale x axis (decade labels).
    #[arg(long)]
    pub log_x: bool,
}

/// Options of `astra-sim plot-measured`.
#[derive(Args, Clone, Debug)]
pub struct PlotMeasuredArgs {
    /// The folder of runs (as scripts/bench/distributed-real.sh leaves it).
    #[arg(long)]
    pub dir: PathBuf,
    /// The PNG to write.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "Real runs against astra-sim's prediction")]
    pub title: String,
}

/// Options of `astra-sim reproduce`.
#[derive(Args, Clone, Debug)]
pub struct ReproduceArgs {
    #[arg(long)]
    pub out: PathBuf,
    /// Compute profile: the built-in paper-1660ti or a CSV written by `astra-eval profile`.
    #[arg(long, default_value = "paper-1660ti")]
    pub profile: String,
}

/// Options of `astra-sim sweep`.
#[derive(Args, Clone, Debug)]
pub struct SweepArgs {
    /// Comma-separated methods (single, tp, sp, bp-ag-nbN, bp-sp-nbN, astra-gG).
    #[arg(
        long,
        default_value = "astra-g1,astra-g16,astra-g32,bp-ag-nb1,bp-ag-nb4,bp-sp-nb1,bp-sp-nb4,tp,sp"
    )]
    pub methods: String,
    /// Devices: list a,b or range start:stop:step.
    #[arg(long, default_value = "4")]
    pub devices: String,
    #[arg(long, default_value = "1024")]
    pub tokens: String,
    /// Bandwidths in Mbit/s (Mbit = 2^20 bit): list or range.
    #[arg(long, default_value = "10,20,50,100,200,500")]
    pub mbps: String,
    /// Network models: paper, alpha-beta (comma-separated).
    #[arg(long, default_value = "paper")]
    pub network: String,
    /// Per-message latencies α in ms (alpha-beta).
    #[arg(long, default_value = "0.5")]
    pub alpha_ms: String,
    /// Collective algorithms: direct, ring, star (alpha-beta).
    #[arg(long, default_value = "direct")]
    pub algorithm: String,
    /// Overlap settings: false, true or both "false,true" (alpha-beta).
    #[arg(long, default_value = "false")]
    pub overlap: String,
    /// Packet-loss probabilities.
    #[arg(long, default_value = "0")]
    pub loss: String,
    /// Per-device compute slowdowns, e.g. 1,1,1.5,2 (heterogeneous devices); one value or one per device.
    #[arg(long)]
    pub slowdown: Option<String>,
    /// Token-bucket depth of shaped uplinks in bits (alpha-beta): sends leave at once while the
    /// bucket holds them, the rest at the link rate; it refills at the link rate (tc's burst;
    /// astra-eval's user-space shaper: 3,028 bytes = 24224). 0: plain links.
    #[arg(long, default_value_t = 0.0)]
    pub burst_bits: f64,
    /// Per-message latency (alpha-beta): `trace` uses what a measured trace recorded for each
    /// message's receiver (astra-eval's runtime measures it), α where it has none; `alpha`
    /// gives every message α.
    #[arg(long, value_enum, default_value_t = MessageLatency::Trace)]
    pub message_latency: MessageLatency,
    /// Compute source: paper-1660ti, a profile CSV, or analytic:TFLOPS:GBPS[:EFFICIENCY].
    #[arg(long, default_value = "paper-1660ti", conflicts_with = "trace")]
    pub profile: String,
    /// Take the runs from a trace file (e.g. measured by astra-eval) instead of a profile.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// The compute source of the speedup column's single device (default: the runs' own). With
    /// an int8 profile as --profile and the fp32 one here, the speedup is ASTRA's and weight
    /// quantization's together, over the original model on one device (the paper's Table 5).
    #[arg(long)]
    pub baseline: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub out: PathBuf,
}

/// Options of `astra-sim trace`.
#[derive(Args, Clone, Debug)]
pub struct TraceArgs {
    #[arg(long, default_value = "astra-g16,sp,tp")]
    pub methods: String,
    #[arg(long, default_value = "4")]
    pub devices: String,
    #[arg(long, default_value = "1024")]
    pub tokens: String,
    #[arg(long, default_value = "paper-1660ti")]
    pub profile: String,
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub out: PathBuf,
}

/// Options of `astra-sim replay-worker`.
#[derive(Args, Clone, Debug)]
pub struct ReplayWorkerArgs {
    #[arg(long)]
    pub rank: usize,
    #[arg(long)]
    pub peers: String,
    #[arg(long)]
    pub run: PathBuf,
    #[arg(long, default_value_t = 1.0)]
    pub slowdown: f64,
    #[arg(long, default_value_t = 30.0)]
    pub timeout_s: f64,
}

/// Options of `astra-sim dynamic`.
#[derive(Args, Clone, Debug)]
pub struct DynamicArgs {
    /// Bandwidth trace CSV (second,mbps) or "paper".
    #[arg(long, default_value = "paper")]
    pub bandwidth: String,
    /// Latency table CSV (method,mbps,latency_s) or "paper-llama".
    #[arg(long, default_value = "paper-llama")]
    pub latencies: String,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Options of `astra-sim replay`.
#[derive(Args, Clone, Debug)]
pub struct ReplayArgs {
    /// Actually run the processes (without it: predictions only).
    #[arg(long)]
    pub live: bool,
    /// Do not shape links even when root: loopback, unshaped.
    #[arg(long)]
    pub no_shape: bool,
    #[arg(long, default_value = "astra-g16,bp-ag-nb1")]
    pub methods: String,
    #[arg(long, default_value = "2,4")]
    pub devices: String,
    #[arg(long, default_value = "1024")]
    pub tokens: String,
    /// Link rates (Mbit/s, 2^20 bit) to replay at.
    #[arg(long, default_value = "10,50,100")]
    pub mbps: String,
    /// One-way delay added by netem (ms), where the kernel has netem.
    #[arg(long, default_value_t = 0.0)]
    pub delay_ms: f64,
    /// Packet loss added by netem (percent), where the kernel has netem.
    #[arg(long, default_value_t = 0.0)]
    pub loss_pct: f64,
    /// Per-device compute slowdowns (one value or one per device).
    #[arg(long)]
    pub slowdown: Option<String>,
    /// Live runs per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// A worker waiting longer than this for a peer gives up (seconds).
    #[arg(long, default_value_t = 30.0)]
    pub timeout_s: f64,
    /// Compute source for the runs: paper-1660ti, a profile CSV, or analytic:TFLOPS:GBPS.
    #[arg(long, default_value = "paper-1660ti", conflicts_with = "trace")]
    pub profile: String,
    /// Replay the runs of a trace file instead.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// netem.sh to shape links with.
    #[arg(long)]
    pub netem_script: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Markdown table of measured vs predicted latency.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Where a message's latency comes from (`sweep --message-latency`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MessageLatency {
    Trace,
    Alpha,
}
