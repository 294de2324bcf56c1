//! The options of every `astra-eval` subcommand, declared once: the binary parses them and the
//! commands in [`super`] take them.

use std::path::PathBuf;

use astra_train::models::ClsMode;

use crate::predict::ForwardPath;

/// ASTRA evaluation: predictions, accuracy, perplexity, compute profiling and the multi-device runtime.
#[derive(clap::Parser)]
#[command(name = "astra-eval", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Options of `accuracy` and `perplexity`.
#[derive(clap::Args, Clone, Debug)]
pub struct SweepOpts {
    /// The model: a run folder (its model/, with codebooks.safetensors for ASTRA runs), an HF folder or hub id.
    #[arg(long)]
    pub model: String,
    /// The original plain model (e.g. the run ASTRA fine-tuned from): scored on the same test
    /// examples, and every row's difference to it reported ("Δ vs baseline").
    #[arg(long)]
    pub baseline: Option<String>,
    /// Data spec, as for astra-train (images for accuracy, text:… for perplexity).
    #[arg(long)]
    pub data: String,
    /// Codebooks; default: codebooks.safetensors beside the model.
    #[arg(long)]
    pub codebooks: Option<PathBuf>,
    /// Check that the codebooks have this many groups G.
    #[arg(long)]
    pub groups: Option<usize>,
    /// Devices N to evaluate (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub devices: Vec<usize>,
    /// Partition modes (comma-separated): contiguous, random, allocation.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "contiguous")]
    pub partition: Vec<crate::settings_sweep::Partition>,
    /// CLS modes for ViTs (comma-separated): distributed, single.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "distributed")]
    pub cls: Vec<ClsMode>,
    /// Quantize remote tokens (on), send them in full precision (off), or both: on,off.
    #[arg(long, value_delimiter = ',', default_value = "on", value_parser = parse_on_off)]
    pub vq: Vec<bool>,
    /// Probability that a remote token's indices are lost on a link (comma-separated; the
    /// receiver masks the token out). The paper's Table 11 uses 0.05.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub loss: Vec<f64>,
    /// Evaluate N test images (text: N windows) only: a fixed random subset.
    #[arg(long)]
    pub max_test: Option<usize>,
    /// Text: tokens per window (default: the model's n_positions).
    #[arg(long)]
    pub context: Option<usize>,
    /// Text: a window starts every STRIDE tokens (default: the context, disjoint windows).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Images per batch (each batch draws its own random partition).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Seed of random partitions and allocations.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long)]
    pub bf16: bool,
    /// The linear layers compute in int8 (fbgemm's dynamic int8 linear, CPU): for a model from
    /// `quantize-weights --bits 8`, what its integers give with activations quantized per tensor.
    #[arg(long)]
    pub int8_compute: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Append the markdown table (with this command and the commit) to this file.
    #[arg(long)]
    pub table: Option<PathBuf>,
}

pub fn parse_on_off(s: &str) -> std::result::Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        o => Err(format!("'{o}' is not on or off")),
    }
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// One device of the multi-process runtime: listens, takes a plan from the coordinator, runs
    /// the forward as often as the coordinator asks. Start one per host for `distributed --workers`.
    Worker(WorkerArgs),
    /// ASTRA inference across N worker processes over TCP (ViT classification, GPT-2 or Llama prefill;
    /// VQ indices exchanged per block), the SP baseline (`--mode sp`: fp32 embeddings exchanged)
    /// or the single-device model (`--devices 1`). Local workers by default, each behind a shaped
    /// link with `--links` (root); running workers on other hosts with `--workers`.
    Distributed(DistributedArgs),
    /// Accuracy of an image model over ASTRA settings (devices, partition, CLS, VQ, lost messages),
    /// beside the single-device model; random allocations also by FPAR quintile.
    Accuracy(SweepOpts),
    /// Perplexity of a language model (GPT-2, Llama) over ASTRA settings (devices, partition, VQ, lost messages), beside the
    /// single-device model; pinned protocol: disjoint (or --stride) windows, GPT-2 BPE.
    Perplexity(SweepOpts),
    /// Logits of a model for a batch: the plain model, or ASTRA on N devices.
    Predict(PredictArgs),
    /// Continue a prompt with a language model (GPT-2, Llama): the prompt prefilled over N
    /// devices (ASTRA with codebooks, or --no-vq), then decoded by the device holding its last
    /// token with a key/value cache (remote tokens kept as VQ indices). Text in and out through
    /// GPT-2 BPE, streamed as tokens arrive; --out writes int64 [B, prompt + new].
    Generate(GenerateArgs),
    /// Measure per-device compute of every method (single, tp, sp, bp-ag-nbK, bp-sp-nbK, astra-gG)
    /// on this machine: writes DIR/profile.csv and DIR/trace.json (astra-sim's formats).
    Profile(ProfileArgs),
    /// Report the libtorch and devices evaluation would run on (same as `astra-train info`).
    Info(InfoArgs),
}

/// Options of `astra-eval worker`.
#[derive(clap::Args, Clone, Debug)]
pub struct WorkerArgs {
    /// Address to bind for peers and (without --stdio) the coordinator: loopback by default;
    /// port 0 picks one, printed as `listening ADDR`. Give the host's address for other hosts.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Give up on a silent peer after this long.
    #[arg(long, default_value_t = 10000)]
    pub timeout_ms: u64,
    /// Give up on the coordinator and the peers connecting (and loading) after this long.
    #[arg(long, default_value_t = 60000)]
    pub startup_timeout_ms: u64,
    /// Talk to the coordinator over stdin/stdout (how `distributed` starts local workers).
    #[arg(long)]
    pub stdio: bool,
}

/// Options of `astra-eval distributed`.
#[derive(clap::Args, Clone, Debug)]
pub struct DistributedArgs {
    #[arg(long)]
    pub model: String,
    /// astra (VQ indices) or sp (fp32 embeddings; the single-device model is `--devices 1`).
    #[arg(long, default_value = "astra", value_parser = ["astra", "sp"])]
    pub mode: String,
    /// Codebooks; default: codebooks.safetensors beside the model.
    #[arg(long)]
    pub codebooks: Option<PathBuf>,
    /// Devices N (default 4, or the number of --workers).
    #[arg(long)]
    pub devices: Option<usize>,
    /// Running workers (`ASTRA_SESSION=KEY astra-eval worker --listen HOST:PORT` on each host),
    /// comma-separated, by rank; the model, codebooks and input paths must exist on every
    /// host. Pass the workers' session key in ASTRA_SESSION.
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<String>,
    /// Shape every local worker's uplink: RATE Mbit/s (2^20 bit), optional one-way DELAY ms
    /// and LOSS %, e.g. 10 or 50,5,0.1. Workers run in network namespaces (needs root).
    #[arg(long)]
    pub links: Option<astra_sim::live::Links>,
    /// Who shapes `--links`: the kernel (tc in network namespaces: root, iproute2), each worker
    /// in user space (pacing its own uplink: runs anywhere; no loss), or auto (the kernel when it
    /// can, else user space; the run says which).
    #[arg(long, value_enum, default_value = "auto")]
    pub shaper: crate::runtime::Shaper,
    /// How a block's message reaches its peers: tcp (one copy per peer, reliable) or multicast
    /// (one UDP copy on the devices' segment for all peers, never retransmitted: a receiver
    /// masks the tokens of a message that did not arrive whole). With multicast, --links LOSS
    /// in user space drops whole messages.
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: crate::runtime::Transport,
    /// Multicast group GROUP:PORT (default: a random 239.255.x.y group and port).
    #[arg(long)]
    pub group: Option<String>,
    /// Multicast: a message still incomplete this long after its sender's announcement (which
    /// follows the datagrams on the same uplink) counts as lost.
    #[arg(long, default_value_t = 20)]
    pub loss_grace_ms: u64,
    /// libtorch threads per worker (default: this machine's cores / devices).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Pin local worker r to its own --threads cores (the r-th run of this process's allowed
    /// cores), as N separate devices would each have theirs; the single device likewise.
    #[arg(long)]
    pub pin_cores: bool,
    /// Where each worker computes: cpu, cuda or cuda:N (local workers all share that GPU;
    /// indices and embeddings still travel through the workers' sockets).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// float32 [B, C, H, W] normalised images (ViT) or int64 [B, T] token ids (GPT-2), .npy.
    #[arg(long)]
    pub input: PathBuf,
    /// float32 logits, .npy: [B, classes] (ViT), [B, vocabulary] (GPT-2 next token) or
    /// [B, T, vocabulary] (GPT-2 with --all-logits).
    #[arg(long)]
    pub out: PathBuf,
    /// One CLS on device 0 instead of one per device.
    #[arg(long)]
    pub single_cls: bool,
    /// GPT-2: write the logits of every token [B, T, V] (every device returns its final
    /// states) instead of the next-token logits [B, V] the last device computes.
    #[arg(long)]
    pub all_logits: bool,
    /// Every process gives up on a silent peer after this long.
    #[arg(long, default_value_t = 10000)]
    pub timeout_ms: u64,
    /// Workers must start, load the model and connect within this long.
    #[arg(long, default_value_t = 60000)]
    pub startup_timeout_ms: u64,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Write the measured per-block timings of the median run as an astra-sim trace (an
    /// all-gather per block for a ViT, sends to later devices for GPT-2; predict it with
    /// `astra-sim sweep --trace FILE`).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Write latencies and per-worker times as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Language models: after each prefill the worker holding the last token decodes this many
    /// tokens greedily with its cache of VQ indices (the summary reports them and the decode
    /// rate; the prefill latency is the time to the first token).
    #[arg(long, default_value_t = 0)]
    pub decode: u32,
    /// How the decoding worker picks tokens (set by `generate`; None: greedy).
    #[arg(skip)]
    pub sampling: Option<astra_train::generate::Sampling>,
}

/// Options of `astra-eval predict`.
#[derive(clap::Args, Clone, Debug)]
pub struct PredictArgs {
    /// HF-style folder (config.json + model.safetensors), a run folder, or a hub id org/name.
    #[arg(long)]
    pub model: String,
    /// float32 [B, C, H, W] (normalised images, ViT) or int64 [B, T] (token ids, GPT-2), .npy.
    #[arg(long)]
    pub input: PathBuf,
    /// float32 logits, .npy.
    #[arg(long)]
    pub out: PathBuf,
    /// Simulate ASTRA on N devices (contiguous token split); without it, the plain model.
    #[arg(long)]
    pub devices: Option<usize>,
    /// Codebooks (astra-quant file, one block per layer); default: codebooks.safetensors beside
    /// the model (an ASTRA run's model/).
    #[arg(long, requires = "devices")]
    pub codebooks: Option<PathBuf>,
    /// Exchange remote tokens unquantized (MPA alone; no codebooks needed).
    #[arg(long, requires = "devices", conflicts_with = "codebooks")]
    pub no_vq: bool,
    /// Where the CLS token lives (ViT).
    #[arg(long, value_enum, default_value = "distributed")]
    pub cls: ClsMode,
    /// masked: all devices in one process; per-device: device by device with an in-memory exchange.
    #[arg(long, value_enum, default_value = "masked")]
    pub path: ForwardPath,
    /// cpu, cuda, or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Options of `astra-eval generate`.
#[derive(clap::Args, Clone, Debug)]
pub struct GenerateArgs {
    /// HF-style folder, a run folder (an ASTRA run's model/ brings its codebooks), or a hub id.
    #[arg(long)]
    pub model: String,
    /// The prompt as text (GPT-2 BPE; the model's vocabulary must be GPT-2's).
    #[arg(long, required_unless_present = "input", conflicts_with = "input")]
    pub prompt: Option<String>,
    /// The prompt as token ids: int64 [B, T] .npy.
    #[arg(long)]
    pub input: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// int64 [B, T + new] .npy (the prompt and its continuation, as HF's generate returns).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Devices the prompt is split over (contiguous shares); the last one decodes.
    #[arg(long, default_value_t = 1)]
    pub devices: usize,
    /// Codebooks; default: codebooks.safetensors beside the model.
    #[arg(long, conflicts_with = "no_vq")]
    pub codebooks: Option<PathBuf>,
    /// Exchange remote tokens unquantized (no codebooks).
    #[arg(long)]
    pub no_vq: bool,
    /// 0: greedy; otherwise sample at this temperature.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sampling: keep the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<i64>,
    /// Sampling: keep the most likely tokens up to probability P.
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Summary (time to first token, decode tokens/s, cache bytes) as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Prefill over the runtime: local worker processes behind shaped links (as `distributed
    /// --links`); the worker holding the last token decodes and returns the tokens.
    #[arg(long, conflicts_with = "workers")]
    pub links: Option<astra_sim::live::Links>,
    /// Who shapes --links (as `distributed --shaper`).
    #[arg(long, value_enum, default_value = "auto")]
    pub shaper: crate::runtime::Shaper,
    /// Prefill over running workers (as `distributed --workers`; the prompt must then be an
    /// --input file present on every host).
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<String>,
    /// cpu, cuda, or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum ProfileArch {
    Encoder,
    Gpt2,
    Llama,
}

/// Options of `astra-eval profile`.
#[derive(clap::Args, Clone, Debug)]
pub struct ProfileArgs {
    /// Methods (comma-separated); default: all of them for the encoder
    /// (single,tp,sp,bp-ag-nb1,bp-sp-nb1,astra-g1,astra-g16,astra-g32), for a decoder those with
    /// an engine mode (single,sp,astra-g1,astra-g16,astra-g32).
    #[arg(long)]
    pub methods: Option<String>,
    /// The model: encoder (ViT blocks), gpt2 or llama (decoders: the prefill of T tokens).
    #[arg(long, value_enum, default_value = "encoder")]
    pub arch: ProfileArch,
    /// Llama's key/value heads (grouped-query attention); default: --heads.
    #[arg(long)]
    pub kv_heads: Option<i64>,
    /// Devices N (comma-separated).
    #[arg(long, default_value = "4")]
    pub devices: String,
    /// Tokens T (comma-separated).
    #[arg(long, default_value = "1024")]
    pub tokens: String,
    #[arg(long, default_value_t = 12)]
    pub blocks: i64,
    #[arg(long, default_value_t = 768)]
    pub hidden: i64,
    #[arg(long, default_value_t = 12)]
    pub heads: i64,
    #[arg(long, default_value_t = 3072)]
    pub mlp: i64,
    /// Codewords K per group (ASTRA).
    #[arg(long, default_value_t = 1024)]
    pub codewords: i64,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// ASTRA's remote keys/values from per-codeword tables (the fast inference path; at G = 1 on
    /// the CPU each distinct remote codeword attended once, weighted by its count; the remote
    /// indices are uniform random, so real data with fewer distinct codewords computes less).
    #[arg(long)]
    pub fast: bool,
    /// The linear layers' compute: fp32, or int8 (fbgemm's dynamic int8 linear on the CPU, what
    /// 8-bit weight quantization buys there; the engine's methods: single, sp, astra-*).
    #[arg(long, value_enum, default_value = "fp32")]
    pub weights: ProfileWeights,
    /// cpu, cuda, or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum ProfileWeights {
    Fp32,
    Int8,
}

/// Options of `astra-eval info`.
#[derive(clap::Args, Clone, Debug)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}
