use anyhow::Result;
use clap::{Parser, Subcommand};

/// ASTRA training: models with Mixed-Precision Attention, VQ, NAQ and DCT on libtorch.
///
/// Every subcommand takes `--config FILE.json`: an object of option names (as on the command line,
/// `-` or `_`) and values, read first; options given on the command line override it.
#[derive(Parser)]
#[command(version, about, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by `finetune` and `astra`.
#[derive(clap::Args, Clone)]
struct TrainArgs {
    /// Data: fashion-mnist:DIR, mnist:DIR, cifar10:DIR, cifar100:DIR (binary or python batches),
    /// imagefolder:DIR (DIR/train/<class>/*.JPEG, DIR/val/<class>/*), text:FILE (90/10 split) or
    /// text:TRAIN,VALID (GPT-2 BPE).
    #[arg(long)]
    data: String,
    /// Run folder to create (or continue with --resume).
    #[arg(long)]
    out: std::path::PathBuf,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 128)]
    batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    /// Linear warm-up steps before the cosine decay.
    #[arg(long, default_value_t = 200)]
    warmup_steps: usize,
    /// Global gradient-norm clip (0 = off).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Train on the first N images only (quick runs).
    #[arg(long)]
    max_train: Option<usize>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    max_test: Option<usize>,
    /// Continue the run in --out from its last complete epoch (same configuration required).
    #[arg(long)]
    resume: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// bf16 autocast of the forward pass (CUDA only).
    #[arg(long)]
    bf16: bool,
    /// Images: zero padding for the random-crop augmentation (0 = no crop).
    #[arg(long, default_value_t = 0)]
    pad: usize,
    /// Images: random horizontal flips.
    #[arg(long)]
    flip: bool,
    /// Text: tokens per training window (default: the model's n_positions).
    #[arg(long)]
    context: Option<usize>,
    /// A JSON file of options (read before the command line, which overrides it).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Train or fine-tune a plain model: a ViT on images or a GPT-2 on text (from scratch or --init).
    Finetune {
        #[command(flatten)]
        train: TrainArgs,
        /// Start from this model (HF folder, hub id or run folder); default: random init with
        /// the shape options below.
        #[arg(long)]
        init: Option<String>,
        /// ViT patch size.
        #[arg(long, default_value_t = 4)]
        patch: i64,
        /// ViT input side (default: the data's own size; 224 for image folders).
        #[arg(long)]
        image_size: Option<i64>,
        #[arg(long, default_value_t = 96)]
        hidden: i64,
        #[arg(long, default_value_t = 6)]
        layers: i64,
        #[arg(long, default_value_t = 4)]
        heads: i64,
        #[arg(long, default_value_t = 192)]
        mlp: i64,
    },
    /// Fit per-block codebooks (and NAQ residual statistics) on a trained model's block inputs.
    Calibrate {
        /// The trained model (run folder, HF folder or hub id).
        #[arg(long)]
        model: String,
        #[arg(long)]
        data: String,
        #[arg(long, default_value_t = 2000)]
        samples: usize,
        #[arg(long, default_value_t = 1)]
        groups: usize,
        #[arg(long, default_value_t = 1024)]
        k: usize,
        #[arg(long, default_value_t = 20)]
        iters: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// NAQ noise model: full, diagonal or none.
        #[arg(long, default_value = "full")]
        noise: String,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Text: tokens per calibration window (default: the model's n_positions).
        #[arg(long)]
        context: Option<usize>,
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Fine-tune with ASTRA: MPA on N devices, grouped VQ (EMA), NAQ, distributed CLS.
    Astra {
        #[command(flatten)]
        train: TrainArgs,
        /// The plain model to start from (run folder, HF folder or hub id).
        #[arg(long)]
        init: String,
        /// Codebooks from `calibrate`.
        #[arg(long)]
        codebooks: std::path::PathBuf,
        #[arg(long, default_value_t = 4)]
        devices: usize,
        /// Commitment weight β.
        #[arg(long, default_value_t = 5e-4)]
        beta: f64,
        /// NAQ noise strength λ (0 = off).
        #[arg(long, default_value_t = 1.0)]
        lambda: f64,
        /// EMA decay of the codebooks.
        #[arg(long, default_value_t = 0.99)]
        decay: f64,
        /// One CLS on device 0 instead of one per device (the DCT ablation).
        #[arg(long)]
        single_cls: bool,
        /// A random token-to-device assignment per batch.
        #[arg(long)]
        random_partition: bool,
    },
    /// Write a model (run folder, HF folder or hub id) as an HF folder that transformers loads,
    /// with its ASTRA codebooks beside it.
    Export {
        #[arg(long)]
        model: String,
        /// The folder to create (must not exist).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Write a randomly initialised model (HF folder: config.json + model.safetensors) for an HF
    /// config.json: for latency and throughput runs, where trained weights do not matter.
    Init {
        /// An HF config.json (ViTForImageClassification or GPT2LMHeadModel).
        #[arg(long)]
        model_config: std::path::PathBuf,
        /// The folder to write (must not hold a model yet).
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: i64,
    },
    /// Download a data set (checksummed, resumable) and print the --data spec to train on.
    Download {
        /// cifar10, cifar10-python, cifar100, cifar100-python, mnist or fashion-mnist.
        #[arg(long)]
        dataset: String,
        /// Folder to download (and unpack) into.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// A mirror to fetch from instead of the publisher's URL.
        #[arg(long)]
        base_url: Option<String>,
    },
    /// Training-step throughput of ViT-B/16 or GPT-2 small (random weights and data, AdamW): plain
    /// and ASTRA.
    BenchStep {
        /// vit (ViT-B/16) or gpt2 (GPT-2 small).
        #[arg(long, default_value = "vit")]
        model: String,
        /// GPT-2: tokens per sequence.
        #[arg(long, default_value_t = 1024)]
        seq: i64,
        #[arg(long, default_value_t = 128)]
        batch: i64,
        #[arg(long, default_value_t = 224)]
        image: i64,
        #[arg(long, default_value_t = 16)]
        patch: i64,
        #[arg(long, default_value_t = 1000)]
        classes: i64,
        /// ASTRA devices N (MPA) for the ASTRA row.
        #[arg(long, default_value_t = 4)]
        devices: usize,
        /// VQ groups G for the ASTRA row.
        #[arg(long, default_value_t = 32)]
        groups: usize,
        #[arg(long, default_value_t = 1024)]
        codewords: usize,
        /// Timed steps (the median is reported) after --warmup untimed ones.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// bf16 autocast (CUDA only).
        #[arg(long)]
        bf16: bool,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cuda")]
        device: String,
        /// ViT: instead of whole steps, time the parts of one block (plain vs MPA attention, VQ
        /// encode, training quantize) at the step's shapes.
        #[arg(long)]
        parts: bool,
    },
    /// Report the libtorch version, CUDA devices, cuDNN and CPU threads this binary sees.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    astra_train::libtorch::ensure_passive_openmp();
    let args = match expand_config(std::env::args().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("astra-train: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(Cli::parse_from(args)) {
        eprintln!("astra-train: {e:#}");
        std::process::exit(1);
    }
}

/// Splices the options of `--config FILE` in right after the subcommand, so that the command
/// line (which comes later, and `args_override_self`) overrides them.
fn expand_config(mut args: Vec<String>) -> Result<Vec<String>> {
    let Some(pos) = args
        .iter()
        .position(|a| a == "--config" || a.starts_with("--config="))
    else {
        return Ok(args);
    };
    let path = match args[pos].strip_prefix("--config=") {
        Some(p) => p.to_string(),
        None => args
            .get(pos + 1)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("--config needs a file"))?,
    };
    let text =
        std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("--config {path}: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("--config {path}: not valid JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| anyhow::anyhow!("--config {path}: expected a JSON object of options"))?;
    let mut spliced = Vec::new();
    for (k, v) in obj {
        let flag = format!("--{}", k.replace('_', "-"));
        match v {
            serde_json::Value::Bool(true) => spliced.push(flag),
            serde_json::Value::Bool(false) | serde_json::Value::Null => {}
            serde_json::Value::String(s) => spliced.push(format!("{flag}={s}")),
            serde_json::Value::Number(n) => spliced.push(format!("{flag}={n}")),
            _ => anyhow::bail!("--config {path}: option '{k}' must be a string, number or boolean"),
        }
    }
    // Drop --config (and its value) from the command line; splice after the subcommand name.
    let n = if args[pos].contains('=') { 1 } else { 2 };
    args.drain(pos..pos + n);
    let at = 2.min(args.len());
    args.splice(at..at, spliced);
    Ok(args)
}

fn optim(t: &TrainArgs) -> astra_train::train::optim::AdamWConfig {
    astra_train::train::optim::AdamWConfig {
        lr: t.lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: t.weight_decay,
        clip_norm: t.clip,
        warmup_steps: t.warmup_steps,
        total_steps: 0, // set from the data by the trainer
        min_lr_ratio: 0.01,
    }
}

fn run_training(cfg: astra_train::train::TrainConfig, t: &TrainArgs) -> Result<()> {
    use astra_train::train::{run::RunFolder, train};
    let device = astra_train::libtorch::parse_device(&t.device).map_err(anyhow::Error::msg)?;
    cfg.validate()?;
    let run = RunFolder::open(&t.out, &cfg, t.resume)?;
    // Test hook: stop after this many epochs in total, as a kill would (resume tests of scripts).
    let stop_after = std::env::var("ASTRA_STOP_AFTER_EPOCHS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let best = train(&cfg, &run, device, true, stop_after)?;
    if !run.is_complete() {
        anyhow::bail!(
            "stopped before epoch {} of {} (ASTRA_STOP_AFTER_EPOCHS); continue with --resume",
            stop_after.unwrap_or(0) + 1,
            cfg.epochs
        );
    }
    match best {
        Some(m) if astra_train::data::is_text(&cfg.data) => println!(
            "best validation loss {:.4} (perplexity {:.2}) over {} tokens; run folder {}",
            m.loss,
            m.perplexity(),
            m.count,
            t.out.display()
        ),
        Some(m) => println!(
            "best test accuracy {:.4} over {} images; run folder {}",
            m.accuracy,
            m.count,
            t.out.display()
        ),
        None => println!("no epoch left to run; run folder {}", t.out.display()),
    }
    Ok(())
}

/// The run configuration common to `finetune` and `astra`.
fn train_config(
    t: &TrainArgs,
    model: astra_train::config::ModelConfig,
    init: Option<String>,
    astra: Option<astra_train::train::AstraSettings>,
) -> astra_train::train::TrainConfig {
    astra_train::train::TrainConfig {
        data: t.data.clone(),
        model,
        init,
        epochs: t.epochs,
        batch: t.batch,
        optim: optim(t),
        seed: t.seed,
        max_train: t.max_train,
        max_test: t.max_test,
        augment: astra_train::data::augment::Augment {
            pad: t.pad,
            flip: t.flip,
        },
        context: t.context,
        bf16: t.bf16,
        astra,
    }
}

/// A from-scratch model for the data: a ViT for images, a GPT-2 (BPE vocabulary) for text.
#[allow(clippy::too_many_arguments)]
fn scratch_model(
    t: &TrainArgs,
    patch: i64,
    image_size: Option<i64>,
    hidden: i64,
    layers: i64,
    heads: i64,
    mlp: i64,
) -> Result<astra_train::config::ModelConfig> {
    use astra_train::config::{GPT2Config, ModelConfig, ViTConfig};
    if astra_train::data::is_text(&t.data) {
        let cfg = GPT2Config {
            vocab_size: astra_train::data::text::GPT2_VOCAB,
            n_positions: t.context.unwrap_or(256) as i64,
            n_embd: hidden,
            n_layer: layers,
            n_head: heads,
            n_inner: Some(mlp),
            ..GPT2Config::gpt2_small()
        };
        cfg.validate()?;
        return Ok(ModelConfig::GPT2(cfg));
    }
    let size = image_size.unwrap_or(224) as usize;
    let data = astra_train::data::open_images(&t.data, size)?;
    let (channels, h, _) = data.train.shape();
    let cfg = ViTConfig {
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: mlp,
        image_size: image_size.unwrap_or(h as i64),
        patch_size: patch,
        num_channels: channels as i64,
        layer_norm_eps: 1e-6,
        ..ViTConfig::vit_base_patch16_224(data.train.classes() as i64)
    };
    cfg.validate()?;
    Ok(ModelConfig::ViT(cfg))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Finetune {
            train,
            init,
            patch,
            image_size,
            hidden,
            layers,
            heads,
            mlp,
        } => {
            let model = match &init {
                Some(spec) => {
                    // Only the configuration here: a backbone's weights (no classifier for this
                    // data) are loaded, with a fresh head, when the run starts.
                    let dir = astra_train::model::resolve(spec)?;
                    let mut c = astra_train::config::ModelConfig::load(&dir.join("config.json"))?;
                    // Another input size than the checkpoint's: its position embeddings are
                    // interpolated when the run starts.
                    if let (Some(s), astra_train::config::ModelConfig::ViT(v)) =
                        (image_size, &mut c)
                    {
                        v.image_size = s;
                    }
                    c
                }
                None => scratch_model(&train, patch, image_size, hidden, layers, heads, mlp)?,
            };
            let cfg = train_config(&train, model, init, None);
            run_training(cfg, &train)?;
        }
        Command::Calibrate {
            model,
            data,
            samples,
            groups,
            k,
            iters,
            seed,
            noise,
            device,
            context,
            out,
            config: _,
        } => {
            use astra_quant::residual::NoiseKind;
            let device =
                astra_train::libtorch::parse_device(&device).map_err(anyhow::Error::msg)?;
            let noise = match noise.as_str() {
                "full" => Some(NoiseKind::Full),
                "diagonal" => Some(NoiseKind::Diagonal),
                "none" => None,
                o => anyhow::bail!("--noise: '{o}' is not full, diagonal or none"),
            };
            let (m, _) = astra_train::model::Model::load(&model, device)?;
            let args = astra_train::train::calibrate::CalibrateArgs {
                data,
                samples,
                groups,
                k,
                iters,
                seed,
                noise,
                context,
            };
            let mut file = astra_train::train::calibrate::calibrate(&m, &args, device, true)?;
            file.extra.insert(
                "command".into(),
                std::env::args().collect::<Vec<_>>().join(" "),
            );
            file.save(&out)?;
            println!(
                "{} blocks, K={k}, G={groups} -> {}",
                file.blocks.len(),
                out.display()
            );
        }
        Command::Astra {
            train,
            init,
            codebooks,
            devices,
            beta,
            lambda,
            decay,
            single_cls,
            random_partition,
        } => {
            let (m, _) = astra_train::model::Model::load(&init, tch::Device::Cpu)?;
            if devices == 0 {
                anyhow::bail!("--devices must be at least 1");
            }
            let cfg = train_config(
                &train,
                m.config.clone(),
                Some(init.clone()),
                Some(astra_train::train::AstraSettings {
                    devices,
                    codebooks,
                    beta,
                    vq: astra_train::models::VqConfig {
                        decay,
                        noise_lambda: lambda,
                        ..Default::default()
                    },
                    single_cls,
                    random_partition,
                }),
            );
            run_training(cfg, &train)?;
        }
        Command::BenchStep {
            model,
            seq,
            batch,
            image,
            patch,
            classes,
            devices,
            groups,
            codewords,
            steps,
            warmup,
            bf16,
            device,
            parts,
        } => {
            let device =
                astra_train::libtorch::parse_device(&device).map_err(anyhow::Error::msg)?;
            if steps == 0 {
                anyhow::bail!("--steps must be at least 1");
            }
            if parts {
                if model != "vit" {
                    anyhow::bail!("--parts times the ViT's block parts; drop --model {model}");
                }
                let rows = astra_train::bench_step::parts(&astra_train::bench_step::StepBench {
                    batch,
                    image,
                    patch,
                    classes,
                    gpt2_seq: None,
                    astra: Some((devices, groups, codewords)),
                    steps,
                    warmup,
                    bf16,
                    device,
                })?;
                println!(
                    "ViT-B/16 block parts, {image}x{image}, batch {batch}, N={devices}, G={groups}, K={codewords}, {}, {device:?}\n\n| part | median ms per block |\n|---|---:|",
                    if bf16 { "bf16 autocast" } else { "fp32" }
                );
                for (name, ms) in rows {
                    println!("| {name} | {ms:.2} |");
                }
                return Ok(());
            }
            let gpt2_seq = match model.as_str() {
                "vit" => None,
                "gpt2" => Some(seq),
                o => anyhow::bail!("--model: '{o}' is not vit or gpt2"),
            };
            let what = match gpt2_seq {
                None => format!("ViT-B/16 training step, {image}x{image}"),
                Some(t) => format!("GPT-2 small training step, {t} tokens"),
            };
            println!(
                "{what}, batch {batch}, AdamW, {}, {:?}\n",
                if bf16 { "bf16 autocast" } else { "fp32" },
                device
            );
            println!(
                "| model | median step (ms) | min | max | examples/s | tokens/s |\n|---|---:|---:|---:|---:|---:|"
            );
            for astra in [None, Some((devices, groups, codewords))] {
                let r = astra_train::bench_step::run(&astra_train::bench_step::StepBench {
                    batch,
                    image,
                    patch,
                    classes,
                    gpt2_seq,
                    astra,
                    steps,
                    warmup,
                    bf16,
                    device,
                })?;
                let name = match astra {
                    None => "plain".to_string(),
                    Some((n, g, k)) => format!(
                        "ASTRA (MPA N={n}, G={g}, K={k}, VQ-EMA, NAQ{})",
                        if gpt2_seq.is_none() { ", DCT" } else { "" }
                    ),
                };
                println!(
                    "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} |",
                    r.median_s * 1e3,
                    r.min_s * 1e3,
                    r.max_s * 1e3,
                    r.images_per_s,
                    r.tokens_per_s
                );
            }
        }
        Command::Export { model, out } => {
            let e = astra_train::export::export(&model, &out)?;
            println!(
                "{} -> {} ({}{})",
                model,
                e.dir.display(),
                e.architecture,
                if e.codebooks {
                    ", with codebooks.safetensors"
                } else {
                    ""
                }
            );
        }
        Command::Init {
            model_config,
            out,
            seed,
        } => {
            if out.join("model.safetensors").exists() {
                anyhow::bail!("{} already holds a model; not overwritten", out.display());
            }
            let cfg = astra_train::config::ModelConfig::load(&model_config)?;
            tch::manual_seed(seed);
            let model = astra_train::model::Model::new(cfg, tch::Device::Cpu)?;
            model.save(&out)?;
            println!(
                "{}: random weights (seed {seed}) -> {}",
                model_config.display(),
                out.display()
            );
        }
        Command::Download {
            dataset,
            dir,
            base_url,
        } => {
            let src = astra_train::data::download::find(&dataset)?;
            let spec = astra_train::data::download::install(&src, &dir, base_url.as_deref(), true)?;
            println!("{spec}");
        }
        Command::Info { json } => {
            let info = astra_train::libtorch::RuntimeInfo::collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", info.to_text());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn config_file_options_are_overridden_by_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.json");
        std::fs::write(
            &f,
            r#"{"data": "mnist:/d", "out": "/r", "epochs": 3, "max_train": 10, "flip": true, "bf16": false}"#,
        )
        .unwrap();
        let a = expand_config(args(&[
            "astra-train",
            "finetune",
            "--config",
            f.to_str().unwrap(),
            "--epochs",
            "5",
        ]))
        .unwrap();
        let Command::Finetune { train, .. } = Cli::try_parse_from(a).unwrap().command else {
            panic!("not finetune")
        };
        assert_eq!(
            (train.epochs, train.max_train, train.flip, train.bf16),
            (5, Some(10), true, false)
        );
        assert_eq!(train.data, "mnist:/d");
        // Unknown options and bad files are named.
        std::fs::write(&f, r#"{"epochz": 3}"#).unwrap();
        let a = expand_config(args(&[
            "astra-train",
            "finetune",
            &format!("--config={}", f.display()),
        ]))
        .unwrap();
        assert!(Cli::try_parse_from(a)
            .err()
            .unwrap()
            .to_string()
            .contains("--epochz"));
        std::fs::write(&f, "[1]").unwrap();
        let e = expand_config(args(&[
            "astra-train",
            "finetune",
            "--config",
            f.to_str().unwrap(),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("JSON object"), "{e}");
    }
}
