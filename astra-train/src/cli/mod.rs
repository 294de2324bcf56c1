//! The `astra-train` commands. The binary only parses ([`args`]) and calls [`run`]; every command
//! is a function here that takes its options struct, so other programs and the tests can call
//! them as the binary does.

pub mod args;
mod config_file;
mod launch;

use anyhow::{bail, Result};
use tch::Device;

pub use args::*;
pub use config_file::{expand_config, Expanded};

use crate::config::{GPT2Config, ModelConfig, ViTConfig};
use crate::model::Model;
use crate::train::optim::AdamWConfig;
use crate::train::{run::RunFolder, AstraSettings, TrainConfig};

/// Runs one parsed command. `model` is the model configuration of a run's config.json given as
/// `--config` (a rerun), which `finetune` and `astra` use instead of building one.
pub fn run(command: Command, model: Option<ModelConfig>) -> Result<()> {
    match command {
        Command::Finetune(a) => finetune(&a, model),
        Command::Calibrate(a) => calibrate(&a),
        Command::Astra(a) => astra(&a, model),
        Command::Export(a) => export(&a),
        Command::QuantizeWeights(a) => quantize_weights(&a),
        Command::Init(a) => init(&a),
        Command::Download(a) => download(&a),
        Command::BenchStep(a) => bench_step(&a),
        Command::Info(a) => info(&a),
    }
}

fn device(spec: &str) -> Result<Device> {
    crate::libtorch::parse_device(spec).map_err(anyhow::Error::msg)
}

/// `finetune`: a plain model from scratch, from `--init`, or as a run's config.json says.
pub fn finetune(a: &FinetuneArgs, model: Option<ModelConfig>) -> Result<()> {
    let model = match (model, &a.init) {
        (Some(m), _) => m,
        (None, Some(spec)) => {
            // Only the configuration here: a backbone's weights (no classifier for this data)
            // are loaded, with a fresh head, when the run starts.
            let mut c = ModelConfig::load(&crate::model::resolve(spec)?.join("config.json"))?;
            // Another input size than the checkpoint's: its position embeddings are
            // interpolated when the run starts.
            if let (Some(s), ModelConfig::ViT(v)) = (a.image_size, &mut c) {
                v.image_size = s;
            }
            c
        }
        (None, None) => scratch_model(a)?,
    };
    run_training(
        train_config(&a.train, model, a.init.clone(), None),
        &a.train,
    )
}

/// `astra`: ASTRA fine-tuning of a plain model with calibrated codebooks.
pub fn astra(a: &AstraArgs, model: Option<ModelConfig>) -> Result<()> {
    let model = match model {
        Some(m) => m,
        None => ModelConfig::load(&crate::model::resolve(&a.init)?.join("config.json"))?,
    };
    let settings = AstraSettings {
        devices: a.devices,
        codebooks: a.codebooks.clone(),
        beta: a.beta,
        vq: crate::models::VqConfig {
            decay: a.decay,
            noise_lambda: a.lambda,
            ..Default::default()
        },
        single_cls: a.single_cls,
        random_partition: a.random_partition,
    };
    let cfg = train_config(&a.train, model, Some(a.init.clone()), Some(settings));
    run_training(cfg, &a.train)
}

fn optim(t: &TrainArgs) -> AdamWConfig {
    AdamWConfig {
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

/// The run configuration common to `finetune` and `astra`.
fn train_config(
    t: &TrainArgs,
    model: ModelConfig,
    init: Option<String>,
    astra: Option<AstraSettings>,
) -> TrainConfig {
    TrainConfig {
        data: t.data.clone(),
        model,
        init,
        epochs: t.epochs,
        batch: t.batch,
        optim: optim(t),
        seed: t.seed,
        max_train: t.max_train,
        max_test: t.max_test,
        valid: t.valid,
        augment: crate::data::augment::Augment {
            pad: t.pad,
            flip: t.flip,
        },
        context: t.context,
        bf16: t.bf16,
        astra,
    }
}

fn run_training(cfg: TrainConfig, t: &TrainArgs) -> Result<()> {
    cfg.validate()?;
    // Test hook: stop after this many epochs in total, as a kill would (resume tests of scripts).
    let stop_after = std::env::var("ASTRA_STOP_AFTER_EPOCHS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let result = if let Some(me) = launch::rank_from_env()? {
        let rank = me.rank;
        let r = launch::run_gpu_rank(&cfg, t, me, stop_after)?;
        if rank > 0 {
            return Ok(());
        }
        r
    } else if t.gpus > 0 {
        return launch::spawn_gpu_ranks(t);
    } else if t.cpu_ranks > 0 {
        launch::run_cpu_ranks(&cfg, t, stop_after)?
    } else {
        let device = device(&t.device)?;
        let run = RunFolder::open(&t.out, &cfg, t.resume)?;
        crate::train::train(&cfg, &run, device, true, stop_after)?
    };
    let Some(result) = result else {
        bail!(
            "stopped before epoch {} of {} (ASTRA_STOP_AFTER_EPOCHS); continue with --resume",
            stop_after.unwrap_or(0) + 1,
            cfg.epochs
        );
    };
    let out = t.out.display();
    let (Some(epoch), Some(v), Some(m)) = (result.best_epoch, result.valid, result.test) else {
        println!("no epoch was run; run folder {out}");
        return Ok(());
    };
    if crate::data::is_text(&cfg.data) {
        println!(
            "selected epoch {} (validation perplexity {:.2}): test loss {:.4}, perplexity {:.2} over {} tokens; run folder {out}",
            epoch + 1, v.perplexity(), m.loss, m.perplexity(), m.count,
        );
    } else {
        println!(
            "selected epoch {} (validation accuracy {:.4}): test accuracy {:.4} over {} images; run folder {out}",
            epoch + 1, v.accuracy, m.accuracy, m.count,
        );
    }
    Ok(())
}

/// A from-scratch model for the data: a ViT for images, a GPT-2 or a Llama (BPE vocabulary) for
/// text.
fn scratch_model(a: &FinetuneArgs) -> Result<ModelConfig> {
    let t = &a.train;
    if crate::data::is_text(&t.data) && a.arch == TextArch::Llama {
        let cfg = crate::config::LlamaConfig::scratch(
            crate::data::text::GPT2_VOCAB,
            a.hidden,
            a.layers,
            a.heads,
            a.kv_heads.unwrap_or(a.heads),
            a.mlp,
            t.context.unwrap_or(256) as i64,
        );
        cfg.validate()?;
        if a.heads * cfg.head_dim != a.hidden {
            bail!("--heads {} does not divide --hidden {}", a.heads, a.hidden);
        }
        return Ok(ModelConfig::Llama(cfg));
    }
    if crate::data::is_text(&t.data) {
        let cfg = GPT2Config {
            vocab_size: crate::data::text::GPT2_VOCAB,
            n_positions: t.context.unwrap_or(256) as i64,
            n_embd: a.hidden,
            n_layer: a.layers,
            n_head: a.heads,
            n_inner: Some(a.mlp),
            ..GPT2Config::gpt2_small()
        };
        cfg.validate()?;
        return Ok(ModelConfig::GPT2(cfg));
    }
    let size = a.image_size.unwrap_or(224) as usize;
    let data = crate::data::open_images(&t.data, size, t.valid)?;
    let (channels, h, _) = data.train.shape();
    let cfg = ViTConfig {
        hidden_size: a.hidden,
        num_hidden_layers: a.layers,
        num_attention_heads: a.heads,
        intermediate_size: a.mlp,
        image_size: a.image_size.unwrap_or(h as i64),
        patch_size: a.patch,
        num_channels: channels as i64,
        layer_norm_eps: 1e-6,
        ..ViTConfig::vit_base_patch16_224(data.train.classes() as i64)
    };
    cfg.validate()?;
    Ok(ModelConfig::ViT(cfg))
}

/// `calibrate`: per-block codebooks (and NAQ statistics) from a trained model's block inputs.
pub fn calibrate(a: &CalibrateArgs) -> Result<()> {
    use astra_quant::residual::NoiseKind;
    let device = device(&a.device)?;
    let noise = match a.noise {
        NoiseOption::Full => Some(NoiseKind::Full),
        NoiseOption::Diagonal => Some(NoiseKind::Diagonal),
        NoiseOption::None => None,
    };
    let (m, _) = Model::load(&a.model, device)?;
    let args = crate::train::calibrate::CalibrationSettings {
        data: a.data.clone(),
        samples: a.samples,
        groups: a.groups,
        k: a.k,
        iters: a.iters,
        seed: a.seed,
        noise,
        context: a.context,
        valid: a.valid,
    };
    let mut file = crate::train::calibrate::calibrate(&m, &args, device, true)?;
    file.extra.insert(
        "command".into(),
        std::env::args().collect::<Vec<_>>().join(" "),
    );
    file.save(&a.out)?;
    println!(
        "{} blocks, K={}, G={} -> {} ({})",
        file.blocks.len(),
        a.k,
        a.groups,
        a.out.display(),
        file.extra.get("seconds").map_or("", String::as_str)
    );
    Ok(())
}

/// `export`: an HF folder transformers loads, codebooks beside it.
pub fn export(a: &ExportArgs) -> Result<()> {
    let e = crate::export::export(&a.model, &a.out)?;
    let with = if e.codebooks {
        ", with codebooks.safetensors"
    } else {
        ""
    };
    println!(
        "{} -> {} ({}{with})",
        a.model,
        e.dir.display(),
        e.architecture
    );
    Ok(())
}

/// `quantize-weights`: the model with its linear layers stored as 8- or 4-bit integers.
pub fn quantize_weights(a: &QuantizeWeightsArgs) -> Result<()> {
    let q = crate::weight_quant::WeightQuant {
        bits: a.bits,
        group_size: a.group_size,
        embeddings: a.embeddings,
        head: a.head,
    };
    let e = crate::export::export_with(&a.model, &a.out, Some(&q))?;
    let size =
        |d: &std::path::Path| std::fs::metadata(d.join("model.safetensors")).map_or(0, |m| m.len());
    let src = crate::model::resolve(&a.model)?;
    let (before, after) = (size(&src), size(&e.dir));
    println!(
        "{} -> {} ({}, {}-bit weights{}): model.safetensors {:.1} MB -> {:.1} MB ({:.2}×)",
        a.model,
        e.dir.display(),
        e.architecture,
        a.bits,
        if e.codebooks {
            ", with codebooks.safetensors"
        } else {
            ""
        },
        before as f64 / 1e6,
        after as f64 / 1e6,
        after as f64 / before.max(1) as f64
    );
    Ok(())
}

/// `init`: a randomly initialised model for an HF config.json.
pub fn init(a: &InitArgs) -> Result<()> {
    if a.out.join("model.safetensors").exists() {
        bail!("{} already holds a model; not overwritten", a.out.display());
    }
    let cfg = ModelConfig::load(&a.model_config)?;
    tch::manual_seed(a.seed);
    Model::new(cfg, Device::Cpu)?.save(&a.out)?;
    println!(
        "{}: random weights (seed {}) -> {}",
        a.model_config.display(),
        a.seed,
        a.out.display()
    );
    Ok(())
}

/// `download`: a data set, checksummed and resumable; prints its --data spec.
pub fn download(a: &DownloadArgs) -> Result<()> {
    let src = crate::data::download::find(&a.dataset)?;
    let spec = crate::data::download::install(&src, &a.dir, a.base_url.as_deref(), true)?;
    println!("{spec}");
    Ok(())
}

/// `info`: the libtorch and accelerators this binary sees.
pub fn info(a: &InfoArgs) -> Result<()> {
    let info = crate::libtorch::RuntimeInfo::collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", info.to_text());
    }
    Ok(())
}

/// `bench-step`: training-step throughput (plain and ASTRA), or the parts of one ViT block.
pub fn bench_step(a: &BenchStepArgs) -> Result<()> {
    let device = device(&a.device)?;
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let bench = |gpt2_seq, astra| crate::bench_step::StepBench {
        batch: a.batch,
        image: a.image,
        patch: a.patch,
        classes: a.classes,
        gpt2_seq,
        astra,
        steps: a.steps,
        warmup: a.warmup,
        bf16: a.bf16,
        device,
    };
    let precision = if a.bf16 { "bf16 autocast" } else { "fp32" };
    let astra = Some((a.devices, a.groups, a.codewords));
    if a.parts {
        if a.model != BenchModel::Vit {
            bail!("--parts times the ViT's block parts; drop --model gpt2");
        }
        let rows = crate::bench_step::parts(&bench(None, astra))?;
        println!(
            "ViT-B/16 block parts, {0}x{0}, batch {1}, N={2}, G={3}, K={4}, {precision}, {device:?}\n\n| part | median ms per block |\n|---|---:|",
            a.image, a.batch, a.devices, a.groups, a.codewords
        );
        for (name, ms) in rows {
            println!("| {name} | {ms:.2} |");
        }
        return Ok(());
    }
    let gpt2_seq = match a.model {
        BenchModel::Vit => None,
        BenchModel::Gpt2 => Some(a.seq),
    };
    let what = match gpt2_seq {
        None => format!("ViT-B/16 training step, {0}x{0}", a.image),
        Some(t) => format!("GPT-2 small training step, {t} tokens"),
    };
    println!(
        "{what}, batch {}, AdamW, {precision}, {device:?}\n",
        a.batch
    );
    println!(
        "| model | median step (ms) | min | max | examples/s | tokens/s |\n|---|---:|---:|---:|---:|---:|"
    );
    for astra in [None, astra] {
        let r = crate::bench_step::run(&bench(gpt2_seq, astra))?;
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
    Ok(())
}
