//! Training end to end on generated IDX fixtures: a killed-and-resumed run ends with the same
//! metrics and weights as an uninterrupted one (plain and ASTRA), the run folder refuses to be
//! overwritten or resumed with another configuration, and calibrate → astra → predict works.

use std::path::Path;

use astra_train::config::{GPT2Config, ModelConfig, ViTConfig};
use astra_train::data::augment::Augment;
use astra_train::data::split::HoldOut;
use astra_train::train::optim::AdamWConfig;
use astra_train::train::run::{RunFolder, RunResult};
use astra_train::train::{calibrate, train, AstraSettings, Split, Task, TrainConfig};
use tch::{Device, Tensor};

fn write_idx(dir: &Path, prefix: &str, n: usize, seed: u64) {
    // 8×8 images whose label (0..4) is the brightest quadrant: learnable by a tiny ViT.
    let mut s = seed;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let (mut img, mut lab) = (Vec::new(), Vec::new());
    for v in [2051u32, n as u32, 8, 8] {
        img.extend_from_slice(&v.to_be_bytes());
    }
    for v in [2049u32, n as u32] {
        lab.extend_from_slice(&v.to_be_bytes());
    }
    for _ in 0..n {
        let q = next() % 4;
        for r in 0..8 {
            for c in 0..8 {
                let quad = (r / 4) * 2 + c / 4;
                img.push(if quad == q {
                    200 + (next() % 56) as u8
                } else {
                    (next() % 40) as u8
                });
            }
        }
        lab.push(q as u8);
    }
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
}

fn config(data: &Path, epochs: usize) -> TrainConfig {
    TrainConfig {
        data: format!("mnist:{}", data.display()),
        model: ModelConfig::ViT(ViTConfig {
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            image_size: 8,
            patch_size: 2,
            num_channels: 1,
            ..ViTConfig::vit_base_patch16_224(10)
        }),
        init: None,
        epochs,
        batch: 16,
        optim: AdamWConfig {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            clip_norm: 1.0,
            warmup_steps: 5,
            total_steps: 0,
            min_lr_ratio: 0.1,
        },
        seed: 7,
        max_train: None,
        max_test: None,
        valid: HoldOut::Count(48),
        // Crop augmentation on (flips would change the quadrant label), so the test covers its
        // per-example seeding on resume.
        augment: Augment {
            pad: 1,
            flip: false,
        },
        context: None,
        bf16: false,
        astra: None,
    }
}

/// libtorch's random generator is process-global: tests that train (and compare runs for
/// exactness) must not run concurrently.
static TORCH_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// summary.csv without its wall-clock columns (`seconds`, `train_seconds`); everything else,
/// including `train_samples`, must be reproduced exactly.
fn summary_without_time(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    assert!(header.contains(&"train_samples"), "{header:?}");
    text.lines()
        .map(|l| {
            l.split(',')
                .zip(&header)
                .filter(|(_, h)| !h.ends_with("seconds"))
                .map(|(v, _)| v)
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

fn same_tensors(a: &Path, b: &Path) {
    let ta = Tensor::read_safetensors(a).unwrap();
    let tb: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(b).unwrap().into_iter().collect();
    for (n, t) in ta {
        assert!(t.equal(&tb[&n]), "{n} differs");
    }
}

#[test]
fn resume_is_exact_and_astra_pipeline_runs() {
    let _serial = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_idx(&data, "train", 320, 1);
    write_idx(&data, "t10k", 48, 2);
    let cfg = config(&data, 4);

    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let best_a = train(
        &cfg,
        &RunFolder::open(&a, &cfg, false).unwrap(),
        Device::Cpu,
        false,
        None,
    )
    .unwrap();
    train(
        &cfg,
        &RunFolder::open(&b, &cfg, false).unwrap(),
        Device::Cpu,
        false,
        Some(1),
    )
    .unwrap();
    let best_b = train(
        &cfg,
        &RunFolder::open(&b, &cfg, true).unwrap(),
        Device::Cpu,
        false,
        None,
    )
    .unwrap();
    assert_eq!(best_a, best_b);
    assert_eq!(summary_without_time(&a), summary_without_time(&b));
    same_tensors(
        &a.join("checkpoints/epoch-3.safetensors"),
        &b.join("checkpoints/epoch-3.safetensors"),
    );
    let result = best_a.unwrap();
    let acc = result.test.unwrap().accuracy;
    assert!(
        acc > 0.4,
        "the tiny ViT did not learn the quadrant task: {acc}"
    );
    // Selection is on the 48 held-out training images, and the test split (48 images of its
    // own) is scored once, for the selected model: complete.json holds exactly that.
    let (valid, test) = (result.valid.unwrap(), result.test.unwrap());
    assert_eq!((valid.count, test.count), (48, 48));
    let epoch = result.best_epoch.unwrap();
    let csv = std::fs::read_to_string(a.join("summary.csv")).unwrap();
    assert!(csv.starts_with("epoch,step,train_loss,train_accuracy,valid_loss,valid_accuracy,"));
    let best_row = csv.lines().nth(epoch + 1).unwrap();
    assert!(
        best_row.contains(&format!(",{:.6},", valid.accuracy)),
        "{best_row}"
    );
    assert_eq!(RunResult::read(&a).unwrap().unwrap(), result);
    let (selected, _) = astra_train::model::Model::load(a.to_str().unwrap(), Device::Cpu).unwrap();
    let task = Task::open(&cfg.data, &cfg.model, None, cfg.valid).unwrap();
    let again = task
        .evaluate(&selected, Split::Test, None, None, false, Device::Cpu)
        .unwrap();
    assert_eq!(again, test);
    // The exported model is the selected epoch's, bit for bit: it scores that epoch's validation.
    let again = task
        .evaluate(&selected, Split::Valid, None, None, false, Device::Cpu)
        .unwrap();
    assert_eq!(again, valid);

    // The run folder protects itself.
    let e = RunFolder::open(&a, &cfg, false).err().unwrap().to_string();
    assert!(e.contains("already holds a run"), "{e}");
    let mut other = cfg.clone();
    other.batch = 8;
    let e = RunFolder::open(&a, &other, true).err().unwrap().to_string();
    assert!(e.contains("different configuration (field 'batch'"), "{e}");
    let before = std::fs::read(a.join("config.json")).unwrap();
    assert_eq!(before, std::fs::read(a.join("config.json")).unwrap());
    std::fs::write(b.join("checkpoints/epoch-3.safetensors"), b"junk").unwrap();
    let summary = std::fs::read(b.join("summary.csv")).unwrap();
    let e = train(
        &cfg,
        &RunFolder::open(&b, &cfg, true).unwrap(),
        Device::Cpu,
        false,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("corrupt checkpoint") && !e.contains('\n'), "{e}");
    assert_eq!(summary, std::fs::read(b.join("summary.csv")).unwrap());

    // calibrate → astra (interrupted and resumed, exact too) → the run loads for predict.
    let (model, _) = astra_train::model::Model::load(a.to_str().unwrap(), Device::Cpu).unwrap();
    let args = calibrate::CalibrationSettings {
        data: cfg.data.clone(),
        samples: 64,
        groups: 2,
        k: 8,
        iters: 5,
        seed: 1,
        noise: Some(astra_quant::NoiseKind::Diagonal),
        context: None,
        valid: cfg.valid,
    };
    let cb = tmp.path().join("cb.safetensors");
    calibrate::calibrate(&model, &args, Device::Cpu, false)
        .unwrap()
        .save(&cb)
        .unwrap();
    let mut acfg = config(&data, 2);
    acfg.init = Some(a.to_string_lossy().into_owned());
    acfg.astra = Some(AstraSettings {
        devices: 2,
        codebooks: cb,
        beta: 5e-4,
        vq: Default::default(),
        single_cls: false,
        random_partition: true,
    });
    let (c, d) = (tmp.path().join("c"), tmp.path().join("d"));
    train(
        &acfg,
        &RunFolder::open(&c, &acfg, false).unwrap(),
        Device::Cpu,
        false,
        None,
    )
    .unwrap();
    train(
        &acfg,
        &RunFolder::open(&d, &acfg, false).unwrap(),
        Device::Cpu,
        false,
        Some(1),
    )
    .unwrap();
    train(
        &acfg,
        &RunFolder::open(&d, &acfg, true).unwrap(),
        Device::Cpu,
        false,
        None,
    )
    .unwrap();
    assert_eq!(summary_without_time(&c), summary_without_time(&d));
    same_tensors(
        &c.join("checkpoints/epoch-1.safetensors"),
        &d.join("checkpoints/epoch-1.safetensors"),
    );
    assert!(c.join("model/codebooks.safetensors").exists());
    // The exported codebooks carry the NAQ statistics the run ended with (refreshed each epoch),
    // so a further ASTRA run from them can use λ > 0.
    let exported = astra_quant::CodebookFile::load(&c.join("model/codebooks.safetensors")).unwrap();
    assert!(exported.blocks.iter().all(|b| b.noise.is_some()));
    let (m, _) = astra_train::model::Model::load(c.to_str().unwrap(), Device::Cpu).unwrap();
    let file = astra_quant::CodebookFile::load(&c.join("model/codebooks.safetensors")).unwrap();
    astra_train::models::vq::check_codebooks(&file, m.quantizers(), m.quantized_width()).unwrap();
}

/// Text repeating a few sentences: a tiny GPT-2 learns it quickly.
fn write_corpus(path: &Path, lines: usize) {
    let sentences = [
        "the cat sat on the mat.",
        "a dog ran in the park.",
        "birds sing in the morning.",
        "the sun is warm today.",
    ];
    let text: String = (0..lines)
        .map(|i| sentences[(i * 7 + i / 3) % 4].to_string() + "\n")
        .collect();
    std::fs::write(path, text).unwrap();
}

fn lm_config(data: &Path, epochs: usize) -> TrainConfig {
    let mut c = config(data, epochs);
    c.data = format!("text:{}", data.display());
    c.model = ModelConfig::GPT2(GPT2Config {
        n_positions: 32,
        n_embd: 16,
        n_layer: 2,
        n_head: 2,
        n_inner: Some(32),
        ..GPT2Config::gpt2_small()
    });
    c.context = Some(16);
    c.batch = 8;
    c.augment = Augment::default();
    c
}

#[test]
fn language_model_trains_resumes_and_runs_astra() {
    let _serial = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus.txt");
    write_corpus(&corpus, 300);
    let cfg = lm_config(&corpus, 3);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let best_a = train(
        &cfg,
        &RunFolder::open(&a, &cfg, false).unwrap(),
        Device::Cpu,
        false,
        None,
    )
    .unwrap()
    .unwrap();
    // The exported GPT-2 (tied head, positions) is the selected epoch's model: loaded back, it
    // scores that epoch's validation loss.
    let (selected, _) = astra_train::model::Model::load(a.to_str().unwrap(), Device::Cpu).unwrap();
    let task = Task::open(&cfg.data, &cfg.model, cfg.context, cfg.valid).unwrap();
    let again = task
        .evaluate(&selected, Split::Valid, None, None, false, Device::Cpu)
        .unwrap();
    assert_eq!(Some(again), best_a.valid);
    train(
        &cfg,
        &RunFolder::open(&b, &cfg, false).unwrap(),
        Device::Cpu,
        false,
        Some(2),
    )
    .unwrap();
    let best_b = train(
        &cfg,
        &RunFolder::open(&b, &cfg, true).unwrap(),
        Device::Cpu,
        false,
        None,
    )
    .unwrap()
    .unwrap();
    assert_eq!(best_a, best_b);
    assert_eq!(summary_without_time(&a), summary_without_time(&b));
    // Perplexity well below the vocabulary's 50,257 (uniform guessing).
    assert!(best_a.test.unwrap().perplexity() < 200.0, "{best_a:?}");
    let csv = std::fs::read_to_string(a.join("summary.csv")).unwrap();
    assert!(csv.lines().next().unwrap().contains("valid_perplexity"));

    let (model, _) = astra_train::model::Model::load(a.to_str().unwrap(), Device::Cpu).unwrap();
    let args = calibrate::CalibrationSettings {
        data: cfg.data.clone(),
        samples: 20,
        groups: 2,
        k: 16,
        iters: 5,
        seed: 1,
        noise: Some(astra_quant::NoiseKind::Full),
        context: Some(16),
        valid: cfg.valid,
    };
    let cb = tmp.path().join("cb.safetensors");
    let file = calibrate::calibrate(&model, &args, Device::Cpu, false).unwrap();
    assert_eq!(file.blocks.len(), 2);
    file.save(&cb).unwrap();
    let mut acfg = lm_config(&corpus, 1);
    acfg.init = Some(a.to_string_lossy().into_owned());
    acfg.astra = Some(AstraSettings {
        devices: 4,
        codebooks: cb,
        beta: 5e-4,
        vq: Default::default(),
        single_cls: false,
        random_partition: false,
    });
    let c = tmp.path().join("c");
    let m = train(
        &acfg,
        &RunFolder::open(&c, &acfg, false).unwrap(),
        Device::Cpu,
        false,
        None,
    )
    .unwrap()
    .unwrap();
    let m = m.test.unwrap();
    assert!(m.perplexity().is_finite() && m.count > 0);
    assert!(c.join("model/codebooks.safetensors").exists());
    // The exported codebooks carry the NAQ statistics the run ended with (refreshed each epoch),
    // so a further ASTRA run from them can use λ > 0.
    let exported = astra_quant::CodebookFile::load(&c.join("model/codebooks.safetensors")).unwrap();
    assert!(exported.blocks.iter().all(|b| b.noise.is_some()));

    // An image model cannot train on text, nor a language model on images.
    let mut bad = cfg.clone();
    bad.model = config(&corpus, 1).model;
    let d = tmp.path().join("d");
    let e = train(
        &bad,
        &RunFolder::open(&d, &bad, false).unwrap(),
        Device::Cpu,
        false,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a language model"), "{e}");
}

fn astra_train() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_astra-train"))
}

/// A tiny from-scratch ViT run of the binary on the quadrant fixtures in `data`.
fn finetune_cmd(data: &Path, out: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = astra_train();
    c.arg("finetune")
        .arg(format!("--data=mnist:{}", data.display()))
        .arg("--out")
        .arg(out)
        .args([
            "--epochs",
            "1",
            "--batch",
            "16",
            "--hidden",
            "16",
            "--layers",
            "2",
            "--heads",
            "2",
            "--mlp",
            "32",
            "--patch",
            "2",
            "--max-train",
            "64",
            "--max-test",
            "16",
        ])
        .args(extra);
    c
}

fn one_line_failure(out: &std::process::Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(needle), "'{err}' lacks '{needle}'");
}

fn fixtures(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_idx(&data, "train", 96, 1);
    write_idx(&data, "t10k", 16, 2);
    data
}

#[test]
fn a_kill_after_the_epoch_commit_never_loses_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures(tmp.path());
    let run = tmp.path().join("run");
    // Killed (abort, as kill -9) right after epoch 0's state.json: the epoch is committed.
    let out = finetune_cmd(&data, &run, &[])
        .env("ASTRA_CRASH_AT", "state:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The commit covers the epoch's best model: it is there before --resume runs anything.
    assert!(run.join("model/model.safetensors").exists());
    assert!(run.join("best.safetensors").exists());
    let out = finetune_cmd(&data, &run, &["--resume"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(run.join("complete.json").exists());
    let best = Tensor::read_safetensors(run.join("best.safetensors")).unwrap();
    let model = Tensor::read_safetensors(run.join("model/model.safetensors")).unwrap();
    let model: std::collections::HashMap<_, _> = model.into_iter().collect();
    for (n, t) in best {
        assert!(t.equal(&model[&n]), "{n}: model/ is not the best epoch's");
    }
}

#[test]
fn a_run_folder_is_locked_and_a_dead_holder_is_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures(tmp.path());
    let run = tmp.path().join("run");
    let out = finetune_cmd(&data, &run, &[]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // While a process holds the folder, a second --resume is refused and writes nothing.
    let cfg: TrainConfig =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    let held = RunFolder::open(&run, &cfg, true).unwrap();
    let summary = std::fs::read(run.join("summary.csv")).unwrap();
    let out = finetune_cmd(&data, &run, &["--resume", "--epochs", "2"])
        .output()
        .unwrap();
    one_line_failure(
        &out,
        &format!("in use by another process (pid {}", std::process::id()),
    );
    assert_eq!(summary, std::fs::read(run.join("summary.csv")).unwrap());
    drop(held);
    // A lock file left by a process that died is taken over, with a message.
    std::fs::write(run.join(".lock"), "4194303").unwrap();
    let out = finetune_cmd(&data, &run, &["--resume"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("taking over the lock of process 4194303"),
        "{err}"
    );
}

#[test]
fn nonsense_settings_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures(tmp.path());
    let run = tmp.path().join("run");
    for (flags, needle) in [
        (&["--max-test", "0"][..], "max_test: must be at least 1"),
        (&["--max-train", "0"][..], "max_train: must be at least 1"),
        (&["--batch", "0"][..], "batch: must be at least 1"),
        (&["--lr=-0.1"][..], "lr: -0.1 is not a finite number"),
        (&["--lr", "NaN"][..], "lr: NaN is not a finite number"),
        (&["--weight-decay=-1"][..], "weight_decay: -1 is not"),
    ] {
        let out = finetune_cmd(&data, &run, flags).output().unwrap();
        one_line_failure(&out, needle);
        assert!(!run.exists(), "{flags:?} left {}", run.display());
    }
    // ASTRA's own settings, checked before the model or codebooks are read.
    let mut cfg = config(&data, 1);
    cfg.astra = Some(AstraSettings {
        devices: 4,
        codebooks: tmp.path().join("none.safetensors"),
        beta: f64::NAN,
        vq: Default::default(),
        single_cls: false,
        random_partition: false,
    });
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("beta: NaN is not a finite number"), "{e}");
    cfg.astra.as_mut().unwrap().beta = 5e-4;
    cfg.astra.as_mut().unwrap().vq.decay = 1.5;
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("decay: 1.5"), "{e}");
    cfg.astra.as_mut().unwrap().vq.decay = 0.99;
    cfg.astra.as_mut().unwrap().devices = 99_999_999_999;
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("devices: 99999999999 is not in 1..=1024"), "{e}");
}

#[test]
fn a_run_that_fails_on_its_inputs_leaves_no_folder() {
    let _serial = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures(tmp.path());
    // Codebooks that do not exist: found inside the trainer, after the folder was opened.
    let cfg = astra_config(&data, tmp.path().join("none.safetensors"));
    let run = tmp.path().join("run");
    let e = start_error(&cfg, &run);
    assert!(e.contains("none.safetensors"), "{e}");
    assert!(!run.exists(), "a failed start left {}", run.display());
    // So the corrected rerun is not refused as "already holds a run".
    let plain = config(&data, 1);
    train(
        &plain,
        &RunFolder::open(&run, &plain, false).unwrap(),
        Device::Cpu,
        false,
        None,
    )
    .unwrap();
    assert!(run.join("complete.json").exists());
}

#[test]
fn a_runs_own_config_json_reruns_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures(tmp.path());
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let out = finetune_cmd(&data, &a, &["--pad", "1", "--seed", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = a.join("config.json");
    let rerun = |out: &Path, extra: &[&str]| {
        astra_train()
            .arg("finetune")
            .arg("--config")
            .arg(&config)
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = rerun(&b, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(json(&a), json(&b), "the rerun's configuration differs");
    assert_eq!(summary_without_time(&a), summary_without_time(&b));
    // Options on the command line still override the file.
    let o = rerun(&c, &["--epochs", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json(&c)["epochs"], 2);
    // A plain run's configuration is not an ASTRA run's.
    let o = astra_train()
        .args(["astra", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(tmp.path().join("d"))
        .output()
        .unwrap();
    one_line_failure(&o, "a run of `astra-train finetune`, given to `astra`");
}

#[test]
fn naq_without_residual_statistics_is_refused() {
    let _serial = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures(tmp.path());
    // Codebooks for the tiny ViT (2 blocks, D = 16) without a noise model.
    let block = astra_quant::BlockQuantizer {
        usage: None,
        codebook: astra_quant::GroupedCodebook::from_flat(
            1,
            8,
            16,
            (0..8 * 16).map(|i| (i % 7) as f32 * 0.1).collect(),
        )
        .unwrap(),
        noise: None,
    };
    let cb = tmp.path().join("cb.safetensors");
    astra_quant::CodebookFile {
        blocks: vec![block.clone(), block],
        extra: Default::default(),
    }
    .save(&cb)
    .unwrap();
    let mut cfg = astra_config(&data, cb); // λ = 1
    let run = tmp.path().join("run");
    let e = start_error(&cfg, &run);
    assert!(
        e.contains("has no NAQ residual statistics, but --lambda 1"),
        "{e}"
    );
    assert!(!run.exists());
    // λ = 0 says what it does: no noise, and trains.
    cfg.astra.as_mut().unwrap().vq.noise_lambda = 0.0;
    train(
        &cfg,
        &RunFolder::open(&run, &cfg, false).unwrap(),
        Device::Cpu,
        false,
        None,
    )
    .unwrap();
}

/// The tiny ViT run of `config` as an ASTRA run on 4 devices with `codebooks` (default VQ: λ = 1).
fn astra_config(data: &Path, codebooks: std::path::PathBuf) -> TrainConfig {
    let mut cfg = config(data, 1);
    cfg.astra = Some(AstraSettings {
        devices: 4,
        codebooks,
        beta: 5e-4,
        vq: Default::default(),
        single_cls: false,
        random_partition: false,
    });
    cfg
}

/// The error of a new run of `cfg` in `run` that must fail.
fn start_error(cfg: &TrainConfig, run: &Path) -> String {
    train(
        cfg,
        &RunFolder::open(run, cfg, false).unwrap(),
        Device::Cpu,
        false,
        None,
    )
    .unwrap_err()
    .to_string()
}

/// Trains `cfg` as `world` data-parallel ranks, threads of this process meeting through a
/// `LocalGroup`; rank 0 writes `dir`. Rank 0's result.
fn train_as_ranks(cfg: &TrainConfig, dir: &Path, world: usize) -> Option<RunResult> {
    ranks_until(cfg, dir, world, None, false)
}

/// [`train_as_ranks`], stopping after `stop_after` epochs, or resuming the run in `dir`.
fn ranks_until(
    cfg: &TrainConfig,
    dir: &Path,
    world: usize,
    stop_after: Option<usize>,
    resume: bool,
) -> Option<RunResult> {
    use astra_train::train::parallel::{Collective, LocalGroup};
    let mut run = Some(RunFolder::open(dir, cfg, resume).unwrap());
    let results: Vec<Option<RunResult>> = std::thread::scope(|s| {
        let ranks: Vec<_> = LocalGroup::group(world)
            .into_iter()
            .map(|g| {
                let run = run.take();
                s.spawn(move || {
                    let g: std::sync::Arc<dyn Collective> = std::sync::Arc::new(g);
                    let r = run.as_ref();
                    astra_train::train::train_ranked(cfg, r, Device::Cpu, false, stop_after, g)
                        .unwrap()
                })
            })
            .collect();
        ranks.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        results[1..].iter().all(Option::is_none),
        "only rank 0 reports"
    );
    results.into_iter().next().unwrap()
}

/// The largest difference between two checkpoints' tensors, relative to each tensor's largest
/// value.
fn max_rel_diff(a: &Path, b: &Path) -> f64 {
    let tb: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(b).unwrap().into_iter().collect();
    let mut worst = 0.0f64;
    for (n, t) in Tensor::read_safetensors(a).unwrap() {
        let d = (&t - &tb[&n]).abs().max().double_value(&[]);
        // Softmax ignores the key bias: its gradient is rounding noise, which Adam turns into
        // steps of ±lr whatever the noise, so it alone differs between sums in another order.
        if n.ends_with("key.bias") {
            continue;
        }
        worst = worst.max(d / t.abs().max().double_value(&[]).max(1e-6));
    }
    worst
}

/// Trains `cfg` in `dir/{one,rank1,ranks2}`: one process, a group of one rank (every collective
/// runs; bit for bit the same), and two ranks on halves of each batch summing their gradients (the
/// same up to the order of floating-point sums: within `tol` in every tensor of the checkpoint
/// `last`). The single process's result.
fn one_rank_and_two(cfg: &TrainConfig, dir: &Path, last: &str, tol: f64) -> RunResult {
    let (a, b, c) = (dir.join("one"), dir.join("rank1"), dir.join("ranks2"));
    let one = train(
        cfg,
        &RunFolder::open(&a, cfg, false).unwrap(),
        Device::Cpu,
        false,
        None,
    )
    .unwrap();
    assert_eq!(train_as_ranks(cfg, &b, 1), one);
    assert_eq!(summary_without_time(&a), summary_without_time(&b));
    same_tensors(&a.join(last), &b.join(last));
    let two = train_as_ranks(cfg, &c, 2).unwrap();
    let d = max_rel_diff(&a.join(last), &c.join(last));
    assert!(d < tol, "2 ranks vs 1: the tensors of {last} differ by {d}");
    let (v1, v2) = (one.clone().unwrap().valid.unwrap(), two.valid.unwrap());
    assert_eq!(v1.count, v2.count);
    assert!(
        (v1.loss - v2.loss).abs() < 10.0 * tol * v1.loss.abs().max(1.0),
        "{v1:?} vs {v2:?}"
    );
    one.unwrap()
}

#[test]
fn data_parallel_ranks_train_as_one_process_does() {
    let _serial = TORCH_RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // 272 training images: the last batch of the 224 not held out has 0 left over; batches
    // of 16 split 8 + 8 over two ranks.
    write_idx(&data, "train", 272, 1);
    write_idx(&data, "t10k", 16, 2);
    let cfg = config(&data, 2);
    let last = "checkpoints/epoch-1.safetensors";
    one_rank_and_two(&cfg, &tmp.path().join("plain"), last, 1e-4);
    let a = tmp.path().join("plain/one");
    // A run resumes with any number of ranks: 2 for the first epoch, then 1 process.
    let e = tmp.path().join("e");
    assert_eq!(ranks_until(&cfg, &e, 2, Some(1), false), None);
    let resumed = RunFolder::open(&e, &cfg, true).unwrap();
    train(&cfg, &resumed, Device::Cpu, false, None)
        .unwrap()
        .unwrap();
    let d = max_rel_diff(&a.join(last), &e.join(last));
    assert!(
        d < 1e-4,
        "2 ranks, then resumed alone: weights differ by {d}"
    );
    // And the other way: 1 process for the first epoch, then 3 ranks.
    let f = tmp.path().join("f");
    let opened = RunFolder::open(&f, &cfg, false).unwrap();
    assert_eq!(
        train(&cfg, &opened, Device::Cpu, false, Some(1)).unwrap(),
        None
    );
    drop(opened); // its lock
    ranks_until(&cfg, &f, 3, None, true).unwrap();
    let d = max_rel_diff(&a.join(last), &f.join(last));
    assert!(
        d < 1e-4,
        "1 process, then resumed on 3 ranks: weights differ by {d}"
    );

    // ASTRA, from codebooks of the plain model.
    let (model, _) = astra_train::model::Model::load(a.to_str().unwrap(), Device::Cpu).unwrap();
    let settings = calibrate::CalibrationSettings {
        data: cfg.data.clone(),
        samples: 64,
        groups: 2,
        k: 8,
        iters: 5,
        seed: 1,
        noise: None,
        context: None,
        valid: cfg.valid,
    };
    let cb = tmp.path().join("cb.safetensors");
    calibrate::calibrate(&model, &settings, Device::Cpu, false)
        .unwrap()
        .save(&cb)
        .unwrap();
    let mut acfg = astra_config(&data, cb);
    acfg.init = Some(a.to_string_lossy().into_owned());
    if let Some(s) = acfg.astra.as_mut() {
        s.vq.noise_lambda = 0.0;
    }
    // ASTRA: the codebooks' EMA statistics are summed over the ranks too.
    one_rank_and_two(
        &acfg,
        &tmp.path().join("astra"),
        "checkpoints/epoch-0.safetensors",
        1e-3,
    );
}

#[test]
fn data_parallel_flags_are_checked_and_cpu_ranks_run_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = fixtures(tmp.path());
    let out = tmp.path().join("run");
    if !tch::Cuda::is_available() {
        let o = finetune_cmd(&data, &out, &["--gpus", "2"])
            .output()
            .unwrap();
        one_line_failure(&o, "--gpus 2: this machine has 0 CUDA device(s)");
    }
    let o = finetune_cmd(&data, &out, &["--cpu-ranks", "32"])
        .output()
        .unwrap();
    one_line_failure(&o, "--batch 16 is smaller than the 32 ranks");
    assert!(!out.exists(), "a refused run left a folder");
    let o = finetune_cmd(&data, &out, &["--cpu-ranks", "2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("selected epoch 1"));
    assert!(RunResult::read(&out).unwrap().is_some());
}
