//! The options of every `astra-train` subcommand, declared once: the binary parses them and
//! the commands in [`super`] take them.

/// ASTRA training: models with Mixed-Precision Attention, VQ, NAQ and DCT on libtorch.
///
/// Every subcommand takes `--config FILE.json`: an object of option names (as on the command line,
/// `-` or `_`) and values, read first; options given on the command line override it.
#[derive(clap::Parser)]
#[command(name = "astra-train", version, about, args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by `finetune` and `astra`.
#[derive(clap::Args, Clone, Debug)]
pub struct TrainArgs {
    /// Data: fashion-mnist:DIR, mnist:DIR, cifar10:DIR, cifar100:DIR (binary or python batches),
    /// imagefolder:DIR (DIR/train/<class>/*.JPEG, DIR/val/<class>/*), text:FILE (90/10
    /// train/test split), text:TRAIN,TEST or text:TRAIN,VALID,TEST (GPT-2 BPE), or
    /// parquet:PATH[:COLUMN][:max-docs=N][:seed=S] (documents of Parquet shards, e.g.
    /// Wikipedia; PATH a file, folder, glob or hf:ORG/NAME/CONFIG in the HF cache).
    #[arg(long)]
    pub data: String,
    /// Run folder to create (or continue with --resume).
    #[arg(long)]
    pub out: std::path::PathBuf,
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Linear warm-up steps before the cosine decay.
    #[arg(long, default_value_t = 200)]
    pub warmup_steps: usize,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Train on N examples per epoch only (quick runs).
    #[arg(long)]
    pub max_train: Option<usize>,
    /// Score the selected model on N test examples only (a fixed random subset).
    #[arg(long)]
    pub max_test: Option<usize>,
    /// Validation hold-out the best epoch is selected on: a fraction of the training data or a
    /// count of examples (5000). The default 0.1 holds out at most 10,000 examples (ImageNet); a
    /// count is exact. Text given as TRAIN,VALID,TEST uses its VALID file.
    #[arg(long, default_value_t = crate::data::split::HoldOut::default())]
    pub valid: crate::data::split::HoldOut,
    /// Continue the run in --out from its last complete epoch (same configuration required).
    #[arg(long)]
    pub resume: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Data parallel on N GPUs (0: off): one process per GPU, started here, with NCCL summing
    /// the gradients and the codebooks' EMA statistics; rank 0 writes the run folder. --batch
    /// stays the global batch (each GPU trains on its 1/N of it); --device is not used.
    #[arg(long, default_value_t = 0, conflicts_with = "cpu_ranks")]
    pub gpus: usize,
    /// Data parallel as N threads of this process on the CPU (0: off): the arithmetic of
    /// --gpus N without GPUs, for tests and small runs.
    #[arg(long, default_value_t = 0)]
    pub cpu_ranks: usize,
    /// bf16 autocast of the forward pass (CUDA only).
    #[arg(long)]
    pub bf16: bool,
    /// Images: zero padding for the random-crop augmentation (0 = no crop).
    #[arg(long, default_value_t = 0)]
    pub pad: usize,
    /// Images: random horizontal flips.
    #[arg(long)]
    pub flip: bool,
    /// Text: tokens per training window (default: the model's n_positions).
    #[arg(long)]
    pub context: Option<usize>,
    /// A JSON file of options (read before the command line, which overrides it).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Train or fine-tune a plain model: a ViT on images or a GPT-2 on text (from scratch or --init).
    Finetune(FinetuneArgs),
    /// Fit per-block codebooks (and NAQ residual statistics) on a trained model's block inputs.
    Calibrate(CalibrateArgs),
    /// Fine-tune with ASTRA: MPA on N devices, grouped VQ (EMA), NAQ, distributed CLS.
    Astra(AstraArgs),
    /// Write a model (run folder, HF folder or hub id) as an HF folder that transformers loads,
    /// with its ASTRA codebooks beside it.
    Export(ExportArgs),
    /// Post-training weight quantization: a model folder (as `export` writes) whose linear layers
    /// are stored as 8-bit (per output channel) or 4-bit (per group) integers with fp32 scales;
    /// every command of the workspace loads it (dequantized on load).
    QuantizeWeights(QuantizeWeightsArgs),
    /// Write a randomly initialised model (HF folder: config.json + model.safetensors) for an HF
    /// config.json: for latency and throughput runs, where trained weights do not matter.
    Init(InitArgs),
    /// Download a data set (checksummed, resumable) and print the --data spec to train on.
    Download(DownloadArgs),
    /// Training-step throughput of ViT-B/16 or GPT-2 small (random weights and data, AdamW): plain
    /// and ASTRA.
    BenchStep(BenchStepArgs),
    /// Report the libtorch version, CUDA devices, cuDNN and CPU threads this binary sees.
    Info(InfoArgs),
}

/// Options of `astra-train finetune`.
#[derive(clap::Args, Clone, Debug)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Start from this model (HF folder, hub id or run folder); default: random init with
    /// the shape options below.
    #[arg(long)]
    pub init: Option<String>,
    /// ViT patch size.
    #[arg(long, default_value_t = 4)]
    pub patch: i64,
    /// ViT input side (default: the data's own size; 224 for image folders).
    #[arg(long)]
    pub image_size: Option<i64>,
    #[arg(long, default_value_t = 96)]
    pub hidden: i64,
    #[arg(long, default_value_t = 6)]
    pub layers: i64,
    #[arg(long, default_value_t = 4)]
    pub heads: i64,
    #[arg(long, default_value_t = 192)]
    pub mlp: i64,
    /// Text: the decoder trained from scratch (gpt2, or llama: RMSNorm, RoPE, SwiGLU, GQA).
    #[arg(long, value_enum, default_value_t = TextArch::Gpt2)]
    pub arch: TextArch,
    /// Llama: key/value heads (grouped-query attention; default: --heads).
    #[arg(long)]
    pub kv_heads: Option<i64>,
}

/// `finetune --arch`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextArch {
    Gpt2,
    Llama,
}

/// Options of `astra-train calibrate`.
#[derive(clap::Args, Clone, Debug)]
pub struct CalibrateArgs {
    /// The trained model (run folder, HF folder or hub id).
    #[arg(long)]
    pub model: String,
    #[arg(long)]
    pub data: String,
    #[arg(long, default_value_t = 2000)]
    pub samples: usize,
    #[arg(long, default_value_t = 1)]
    pub groups: usize,
    #[arg(long, default_value_t = 1024)]
    pub k: usize,
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// NAQ noise model of the residual statistics.
    #[arg(long, value_enum, default_value = "full")]
    pub noise: NoiseOption,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Text: tokens per calibration window (default: the model's n_positions).
    #[arg(long)]
    pub context: Option<usize>,
    /// The model's run's validation hold-out (its --valid): calibration samples only the rest.
    #[arg(long, default_value_t = crate::data::split::HoldOut::default())]
    pub valid: crate::data::split::HoldOut,
    #[arg(long)]
    pub out: std::path::PathBuf,
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

/// Options of `astra-train astra`.
#[derive(clap::Args, Clone, Debug)]
pub struct AstraArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// The plain model to start from (run folder, HF folder or hub id).
    #[arg(long)]
    pub init: String,
    /// Codebooks from `calibrate`.
    #[arg(long)]
    pub codebooks: std::path::PathBuf,
    #[arg(long, default_value_t = 4)]
    pub devices: usize,
    /// Commitment weight β.
    #[arg(long, default_value_t = 5e-4)]
    pub beta: f64,
    /// NAQ noise strength λ (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub lambda: f64,
    /// EMA decay of the codebooks.
    #[arg(long, default_value_t = 0.99)]
    pub decay: f64,
    /// One CLS on device 0 instead of one per device (the DCT ablation).
    #[arg(long)]
    pub single_cls: bool,
    /// Heterogeneous devices: uneven shares drawn per batch (Dirichlet, FPAR spread of the
    /// paper's Table 9), tokens dealt at random.
    #[arg(long)]
    pub random_partition: bool,
}

/// Options of `astra-train export`.
#[derive(clap::Args, Clone, Debug)]
pub struct ExportArgs {
    #[arg(long)]
    pub model: String,
    /// The folder to create (must not exist).
    #[arg(long)]
    pub out: std::path::PathBuf,
}

/// Options of `astra-train quantize-weights`.
#[derive(clap::Args, Clone, Debug)]
pub struct QuantizeWeightsArgs {
    /// Run folder, HF folder or hub id (its codebooks.safetensors is copied beside).
    #[arg(long)]
    pub model: String,
    /// 8 (symmetric, one scale per output channel) or 4 (symmetric, one scale per group).
    #[arg(long)]
    pub bits: u8,
    /// Input columns per scale at 4 bits.
    #[arg(long, default_value_t = 128)]
    pub group_size: i64,
    /// Also quantize the (2-D) token embeddings.
    #[arg(long)]
    pub embeddings: bool,
    /// Also quantize the classifier / LM head.
    #[arg(long)]
    pub head: bool,
    /// The folder to create (must not exist).
    #[arg(long)]
    pub out: std::path::PathBuf,
}

/// Options of `astra-train init`.
#[derive(clap::Args, Clone, Debug)]
pub struct InitArgs {
    /// An HF config.json (ViTForImageClassification or GPT2LMHeadModel).
    #[arg(long)]
    pub model_config: std::path::PathBuf,
    /// The folder to write (must not hold a model yet).
    #[arg(long)]
    pub out: std::path::PathBuf,
    #[arg(long, default_value_t = 1)]
    pub seed: i64,
}

/// Options of `astra-train download`.
#[derive(clap::Args, Clone, Debug)]
pub struct DownloadArgs {
    /// cifar10, cifar10-python, cifar100, cifar100-python, mnist or fashion-mnist.
    #[arg(long)]
    pub dataset: String,
    /// Folder to download (and unpack) into.
    #[arg(long)]
    pub dir: std::path::PathBuf,
    /// A mirror to fetch from instead of the publisher's URL.
    #[arg(long)]
    pub base_url: Option<String>,
}

/// Options of `astra-train bench-step`.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchStepArgs {
    /// ViT-B/16 or GPT-2 small.
    #[arg(long, value_enum, default_value = "vit")]
    pub model: BenchModel,
    /// GPT-2: tokens per sequence.
    #[arg(long, default_value_t = 1024)]
    pub seq: i64,
    #[arg(long, default_value_t = 128)]
    pub batch: i64,
    #[arg(long, default_value_t = 224)]
    pub image: i64,
    #[arg(long, default_value_t = 16)]
    pub patch: i64,
    #[arg(long, default_value_t = 1000)]
    pub classes: i64,
    /// ASTRA devices N (MPA) for the ASTRA row.
    #[arg(long, default_value_t = 4)]
    pub devices: usize,
    /// VQ groups G for the ASTRA row.
    #[arg(long, default_value_t = 32)]
    pub groups: usize,
    #[arg(long, default_value_t = 1024)]
    pub codewords: usize,
    /// Timed steps (the median is reported) after --warmup untimed ones.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// bf16 autocast (CUDA only).
    #[arg(long)]
    pub bf16: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// ViT: instead of whole steps, time the parts of one block (plain vs MPA attention, VQ
    /// encode, training quantize) at the step's shapes.
    #[arg(long)]
    pub parts: bool,
}

/// Options of `astra-train info`.
#[derive(clap::Args, Clone, Debug)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `calibrate --noise`: which NAQ noise model the residual statistics feed.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoiseOption {
    /// Full covariance (Cholesky sampler).
    Full,
    /// Per-coordinate variance.
    Diagonal,
    /// No residual statistics (NAQ then needs them from elsewhere).
    None,
}

/// `bench-step --model`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchModel {
    /// ViT-B/16.
    Vit,
    /// GPT-2 small.
    Gpt2,
}
