use anyhow::Result;
use clap::{Parser, Subcommand};

/// ASTRA training: models with Mixed-Precision Attention, VQ, NAQ and DCT on libtorch.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by `finetune` and `astra`.
#[derive(clap::Args, Clone)]
struct TrainArgs {
    /// Data: fashion-mnist:DIR, mnist:DIR, cifar10:DIR (cifar-10-batches-bin) or cifar100:DIR.
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
}

#[derive(Subcommand)]
enum Command {
    /// Train or fine-tune a plain ViT classifier (from scratch or --init).
    Finetune {
        #[command(flatten)]
        train: TrainArgs,
        /// Start from this model (HF folder, hub id or run folder); default: random init.
        #[arg(long)]
        init: Option<String>,
        #[arg(long, default_value_t = 4)]
        patch: i64,
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
        #[arg(long)]
        out: std::path::PathBuf,
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
    /// Training-step throughput of ViT-B/16 (random weights and data, AdamW): plain and ASTRA.
    BenchStep {
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
    },
    /// Report the libtorch version, CUDA devices, cuDNN and CPU threads this binary sees.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    astra_train::runtime::ensure_passive_openmp();
    if let Err(e) = run() {
        eprintln!("astra-train: {e:#}");
        std::process::exit(1);
    }
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
    let device = astra_train::runtime::parse_device(&t.device).map_err(anyhow::Error::msg)?;
    let run = RunFolder::open(&t.out, &cfg, t.resume)?;
    let best = train(&cfg, &run, device, true, None)?;
    println!(
        "best test accuracy {:.4}; run folder {}",
        best,
        t.out.display()
    );
    Ok(())
}

fn image_shape(data: &str) -> Result<(i64, i64)> {
    let (ds, _, _) = astra_train::train::load_data(data, false)?;
    Ok((ds.channels as i64, ds.height as i64))
}

fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Finetune {
            train,
            init,
            patch,
            hidden,
            layers,
            heads,
            mlp,
        } => {
            let (channels, size) = image_shape(&train.data)?;
            let model = astra_train::config::ViTConfig {
                hidden_size: hidden,
                num_hidden_layers: layers,
                num_attention_heads: heads,
                intermediate_size: mlp,
                image_size: size,
                patch_size: patch,
                num_channels: channels,
                layer_norm_eps: 1e-6,
                ..astra_train::config::ViTConfig::vit_base_patch16_224(10)
            };
            model.validate()?;
            let cfg = astra_train::train::TrainConfig {
                data: train.data.clone(),
                model,
                init,
                epochs: train.epochs,
                batch: train.batch,
                optim: optim(&train),
                seed: train.seed,
                max_train: train.max_train,
                max_test: train.max_test,
                astra: None,
            };
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
            out,
        } => {
            use astra_quant::residual::NoiseKind;
            let device = astra_train::runtime::parse_device(&device).map_err(anyhow::Error::msg)?;
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
            let astra_train::config::ModelConfig::ViT(model) = m.config.clone() else {
                anyhow::bail!("--init: ASTRA fine-tuning of images needs a ViT");
            };
            if devices == 0 {
                anyhow::bail!("--devices must be at least 1");
            }
            let cfg = astra_train::train::TrainConfig {
                data: train.data.clone(),
                model,
                init: Some(init),
                epochs: train.epochs,
                batch: train.batch,
                optim: optim(&train),
                seed: train.seed,
                max_train: train.max_train,
                max_test: train.max_test,
                astra: Some(astra_train::train::AstraSettings {
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
            };
            run_training(cfg, &train)?;
        }
        Command::BenchStep {
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
        } => {
            let device = astra_train::runtime::parse_device(&device).map_err(anyhow::Error::msg)?;
            if steps == 0 {
                anyhow::bail!("--steps must be at least 1");
            }
            println!(
                "ViT-B/16 training step, {image}x{image}, batch {batch}, AdamW, {}, {:?}\n",
                if bf16 { "bf16 autocast" } else { "fp32" },
                device
            );
            println!(
                "| model | median step (ms) | min | max | images/s |\n|---|---:|---:|---:|---:|"
            );
            for astra in [None, Some((devices, groups, codewords))] {
                let r = astra_train::bench_step::run(&astra_train::bench_step::StepBench {
                    batch,
                    image,
                    patch,
                    classes,
                    astra,
                    steps,
                    warmup,
                    bf16,
                    device,
                })?;
                let name = match astra {
                    None => "plain".to_string(),
                    Some((n, g, k)) => format!("ASTRA (MPA N={n}, G={g}, K={k}, VQ-EMA, NAQ, DCT)"),
                };
                println!(
                    "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    r.median_s * 1e3,
                    r.min_s * 1e3,
                    r.max_s * 1e3,
                    r.images_per_s
                );
            }
        }
        Command::Info { json } => {
            let info = astra_train::runtime::RuntimeInfo::collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", info.to_text());
            }
        }
    }
    Ok(())
}
