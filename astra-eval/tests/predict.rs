//! `astra-eval predict` as users call it: plain and ASTRA logits of a saved model, the per-device
//! path equal to the masked one, and bad input named in one line.

use std::path::Path;
use std::process::Command;

mod common;

use astra_train::config::{GPT2Config, ModelConfig, ViTConfig};
use astra_train::model::Model;
use tch::{Device, Kind, Tensor};

fn predict(args: &[&str], paths: &[&Path]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_astra-eval"));
    c.arg("predict").args(args);
    for p in paths {
        c.arg(p);
    }
    c.output().unwrap()
}

/// Codebooks for `layers` blocks of width `d` in `dir`.
fn codebooks(dir: &Path, layers: usize, d: usize, groups: usize) -> std::path::PathBuf {
    let p = dir.join(format!("cb-{d}-{layers}.safetensors"));
    common::save_codebooks(&p, layers, d, groups);
    p
}

fn ok(o: std::process::Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn vit_predict_plain_and_astra() {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(3);
    let cfg = ViTConfig {
        image_size: 16,
        patch_size: 4,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 64,
        ..ViTConfig::vit_base_patch16_224(6)
    };
    let model_dir = dir.path().join("vit");
    Model::new(ModelConfig::ViT(cfg), Device::Cpu)
        .unwrap()
        .save(&model_dir)
        .unwrap();
    let x = dir.path().join("x.npy");
    Tensor::randn([3, 3, 16, 16], (Kind::Float, Device::Cpu))
        .write_npy(&x)
        .unwrap();
    let cb = codebooks(dir.path(), 2, 32, 4);
    let (plain, masked, per) = (
        dir.path().join("p.npy"),
        dir.path().join("m.npy"),
        dir.path().join("d.npy"),
    );
    ok(predict(
        &["--model", model_dir.to_str().unwrap(), "--input"],
        &[&x, Path::new("--out"), &plain],
    ));
    ok(predict(
        &[
            "--devices",
            "4",
            "--model",
            model_dir.to_str().unwrap(),
            "--codebooks",
            cb.to_str().unwrap(),
            "--input",
        ],
        &[&x, Path::new("--out"), &masked],
    ));
    let msg = ok(predict(
        &[
            "--devices",
            "4",
            "--path",
            "per-device",
            "--model",
            model_dir.to_str().unwrap(),
            "--codebooks",
            cb.to_str().unwrap(),
            "--input",
        ],
        &[&x, Path::new("--out"), &per],
    ));
    assert!(msg.contains("ASTRA on 4 device(s)"), "{msg}");
    let (p, m, d) = (
        Tensor::read_npy(&plain).unwrap(),
        Tensor::read_npy(&masked).unwrap(),
        Tensor::read_npy(&per).unwrap(),
    );
    assert_eq!(p.size(), vec![3, 6]);
    let diff = (&m - &d).abs().max().double_value(&[]);
    assert!(
        diff <= 1e-5 * m.abs().max().double_value(&[]).max(1.0),
        "per-device vs masked {diff}"
    );
    assert!(
        (&m - &p).abs().max().double_value(&[]) > 1e-5,
        "quantization had no effect"
    );
    // The fast path (indices only; keys/values from per-codeword tables) equals the direct one.
    let fast = dir.path().join("fast.npy");
    ok(predict(
        &[
            "--devices",
            "4",
            "--path",
            "per-device-fast",
            "--model",
            model_dir.to_str().unwrap(),
            "--codebooks",
            cb.to_str().unwrap(),
            "--input",
        ],
        &[&x, Path::new("--out"), &fast],
    ));
    let f = Tensor::read_npy(&fast).unwrap();
    let rel = (&f - &d).abs().max().double_value(&[]) / d.abs().max().double_value(&[]).max(1e-6);
    assert!(rel <= 1e-5, "fast vs direct per-device: relative {rel}");
}

#[test]
fn gpt2_predict_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(4);
    let cfg = GPT2Config {
        vocab_size: 40,
        n_positions: 32,
        n_embd: 16,
        n_layer: 2,
        n_head: 2,
        ..GPT2Config::gpt2_small()
    };
    let model_dir = dir.path().join("gpt2");
    Model::new(ModelConfig::GPT2(cfg), Device::Cpu)
        .unwrap()
        .save(&model_dir)
        .unwrap();
    let ids = dir.path().join("ids.npy");
    Tensor::randint(40, [2, 12], (Kind::Int64, Device::Cpu))
        .write_npy(&ids)
        .unwrap();
    let out = dir.path().join("y.npy");
    let m = model_dir.to_str().unwrap();
    // Without codebooks an ASTRA prediction must say it exchanges unquantized tokens.
    let o = predict(
        &["--devices", "3", "--model", m, "--input"],
        &[&ids, Path::new("--out"), &out],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("pass --codebooks FILE, or --no-vq"),
        "{e}"
    );
    let msg = ok(predict(
        &["--devices", "3", "--no-vq", "--model", m, "--input"],
        &[&ids, Path::new("--out"), &out],
    ));
    assert!(msg.contains("identity (--no-vq"), "{msg}");
    assert_eq!(Tensor::read_npy(&out).unwrap().size(), vec![2, 12, 40]);
    // With codebooks: the fast per-device prefill (indices only, keys/values from per-codeword
    // tables) equals the direct per-device path, and quantization changes the logits.
    let cb16 = codebooks(dir.path(), 2, 16, 4);
    let run = |path: &str, out: &Path| {
        ok(predict(
            &[
                "--devices",
                "3",
                "--path",
                path,
                "--model",
                m,
                "--codebooks",
                cb16.to_str().unwrap(),
                "--input",
            ],
            &[&ids, Path::new("--out"), out],
        ));
        Tensor::read_npy(out).unwrap()
    };
    let direct = run("per-device", &dir.path().join("direct.npy"));
    let fast = run("per-device-fast", &dir.path().join("fast.npy"));
    let masked = run("masked", &dir.path().join("masked.npy"));
    let scale = direct.abs().max().double_value(&[]).max(1e-6);
    let rel = (&fast - &direct).abs().max().double_value(&[]) / scale;
    assert!(
        rel <= 1e-5,
        "GPT-2 fast vs direct per-device: relative {rel}"
    );
    let rel = (&masked - &direct).abs().max().double_value(&[]) / scale;
    assert!(rel <= 1e-5, "GPT-2 masked vs per-device: relative {rel}");
    let plain = Tensor::read_npy(&out).unwrap();
    assert!((&plain - &direct).abs().max().double_value(&[]) > 1e-5);

    let err = |o: std::process::Output, needle: &str| {
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success(), "expected failure");
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        assert!(e.contains(needle), "'{e}' lacks '{needle}'");
    };
    let floats = dir.path().join("f.npy");
    Tensor::zeros([2, 12], (Kind::Float, Device::Cpu))
        .write_npy(&floats)
        .unwrap();
    err(
        predict(
            &["--model", m, "--input"],
            &[&floats, Path::new("--out"), &out],
        ),
        "token ids must be int64",
    );
    let wrong_cb = codebooks(dir.path(), 2, 24, 4);
    err(
        predict(
            &[
                "--devices",
                "2",
                "--codebooks",
                wrong_cb.to_str().unwrap(),
                "--model",
                m,
                "--input",
            ],
            &[&ids, Path::new("--out"), &out],
        ),
        "codeword width D = 24",
    );
    let deep_cb = codebooks(dir.path(), 5, 16, 4);
    err(
        predict(
            &[
                "--devices",
                "2",
                "--codebooks",
                deep_cb.to_str().unwrap(),
                "--model",
                m,
                "--input",
            ],
            &[&ids, Path::new("--out"), &out],
        ),
        "file has 5 blocks of codewords, the model has 2 quantizers",
    );
    err(
        predict(
            &[
                "--model",
                dir.path().join("nowhere").to_str().unwrap(),
                "--input",
            ],
            &[&ids, Path::new("--out"), &out],
        ),
        "nowhere: no such model folder",
    );
    let big = dir.path().join("big.npy");
    Tensor::from_slice(&[1i64, 99])
        .view([1, 2])
        .write_npy(&big)
        .unwrap();
    err(
        predict(
            &["--model", m, "--input"],
            &[&big, Path::new("--out"), &out],
        ),
        "ids span 1..=99, the vocabulary has 40",
    );
    // A device without tokens (T = 3, N = 4): the same refusal on every path.
    let three = dir.path().join("three.npy");
    Tensor::randint(40, [1, 3], (Kind::Int64, Device::Cpu))
        .write_npy(&three)
        .unwrap();
    for path in ["masked", "per-device"] {
        err(
            predict(
                &["--model", m, "--devices", "4", "--path", path, "--input"],
                &[&three, Path::new("--out"), &out],
            ),
            "4 devices for 3 tokens",
        );
    }
}

#[test]
fn profile_writes_what_astra_sim_reads() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_astra-eval"))
        .args([
            "profile",
            "--methods",
            "single,tp,sp,bp-ag-nb1,bp-sp-nb1,astra-g1,astra-g4",
            "--devices",
            "2,4",
            "--tokens",
            "32",
        ])
        .args([
            "--blocks",
            "2",
            "--hidden",
            "32",
            "--heads",
            "4",
            "--mlp",
            "64",
            "--codewords",
            "16",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(dir.path().join("profile.csv")).unwrap();
    assert!(csv.starts_with(
        "method,devices,tokens,compute_ms_median,compute_ms_min,compute_ms_max,runs\n"
    ));
    // single once (devices 1), the six others at N = 2 and 4.
    assert_eq!(csv.lines().count(), 1 + 1 + 6 * 2);
    let p =
        astra_sim::profile::ComputeProfile::load(dir.path().join("profile.csv").to_str().unwrap())
            .unwrap();
    assert!(
        p.compute_ms(astra_sim::Method::Astra { groups: 4 }, 4, 32)
            .unwrap()
            > 0.0
    );
    let trace = astra_sim::Trace::load(&dir.path().join("trace.json")).unwrap();
    assert_eq!(trace.runs.len(), 13);
    let fast = Command::new(env!("CARGO_BIN_EXE_astra-eval"))
        .args([
            "profile",
            "--fast",
            "--methods",
            "astra-g4",
            "--devices",
            "4",
            "--tokens",
            "32",
            "--blocks",
            "2",
            "--hidden",
            "32",
        ])
        .args([
            "--heads",
            "4",
            "--mlp",
            "64",
            "--codewords",
            "16",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--out",
        ])
        .arg(dir.path().join("fast"))
        .output()
        .unwrap();
    assert!(
        fast.status.success(),
        "{}",
        String::from_utf8_lossy(&fast.stderr)
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_astra-eval"))
        .args([
            "profile",
            "--methods",
            "sp",
            "--devices",
            "8",
            "--tokens",
            "4",
            "--blocks",
            "1",
            "--hidden",
            "32",
            "--heads",
            "4",
            "--mlp",
            "64",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(
        !bad.status.success() && e.contains("8 devices for 4 tokens"),
        "{e}"
    );
}

/// `profile --weights int8`: the engine's methods with fbgemm's int8 linear layers, for every
/// architecture; plain-matrix baselines and GPUs are refused in one line.
#[test]
fn profile_with_int8_weights() {
    let dir = tempfile::tempdir().unwrap();
    let profile = |arch: &str, methods: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_astra-eval"))
            .args(["profile", "--weights", "int8", "--arch", arch])
            .args(["--methods", methods, "--devices", "2", "--tokens", "32"])
            .args([
                "--blocks", "2", "--hidden", "32", "--heads", "4", "--mlp", "64",
            ])
            .args(["--codewords", "16", "--runs", "1", "--warmup", "0"])
            .args(extra)
            .arg("--out")
            .arg(dir.path().join(arch))
            .output()
            .unwrap()
    };
    for arch in ["encoder", "gpt2", "llama"] {
        let o = profile(arch, "single,sp,astra-g4", &[]);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && stdout.contains("int8 linear layers"),
            "{arch}: {stdout}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let csv = std::fs::read_to_string(dir.path().join(arch).join("profile.csv")).unwrap();
        assert_eq!(csv.lines().count(), 4, "{csv}");
    }
    // (Without a GPU, the device itself is refused first.)
    for (methods, extra, needles) in [
        ("single,tp", &[][..], &["tp runs plain matrices"][..]),
        (
            "single",
            &["--device", "cuda"][..],
            &["--weights int8 computes on the CPU", "no such CUDA device"][..],
        ),
    ] {
        let o = profile("encoder", methods, extra);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success()
                && needles.iter().any(|n| e.contains(n))
                && e.trim().lines().count() == 1,
            "{e}"
        );
    }
}

#[test]
fn bad_files_and_values_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n);
    tch::manual_seed(5);
    let cfg = ViTConfig {
        image_size: 8,
        patch_size: 4,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 32,
        ..ViTConfig::vit_base_patch16_224(3)
    };
    let model_dir = path("vit");
    Model::new(ModelConfig::ViT(cfg), Device::Cpu)
        .unwrap()
        .save(&model_dir)
        .unwrap();
    let m = model_dir.to_str().unwrap();
    let x = path("x.npy");
    Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu))
        .write_npy(&x)
        .unwrap();
    let out = path("y.npy");
    let err = |args: &[&str], input: &Path, needle: &str| {
        let o = predict(
            args,
            &[Path::new("--input"), input, Path::new("--out"), &out],
        );
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success(), "{args:?} succeeded");
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        assert!(e.contains(needle), "'{e}' lacks '{needle}'");
        assert!(!out.exists(), "{args:?} wrote an output");
    };
    // Truncated inputs: the header only (segfaulted), cut inside the data (garbage, exit 0).
    let bytes = std::fs::read(&x).unwrap();
    let data_len = 2 * 3 * 8 * 8 * 4;
    for (name, cut) in [
        ("head.npy", bytes.len() - data_len),
        ("cut.npy", bytes.len() - 10),
    ] {
        std::fs::write(path(name), &bytes[..cut]).unwrap();
        err(&["--model", m], &path(name), "truncated");
    }
    // NaN pixels.
    let nan = path("nan.npy");
    let v = Tensor::randn([1, 3, 8, 8], (Kind::Float, Device::Cpu));
    let _ = v.get(0).get(1).get(2).get(3).fill_(f64::NAN);
    v.write_npy(&nan).unwrap();
    err(&["--model", m], &nan, "pixel 83 is NaN");
    // Absurd device counts: refused before anything is allocated.
    err(
        &["--model", m, "--devices", "99999999999"],
        &x,
        "99999999999 devices for 4 tokens",
    );
    // A model folder whose weights lack the classifier, or hold a NaN: never a random head.
    let weights = Tensor::read_safetensors(model_dir.join("model.safetensors")).unwrap();
    let headless: Vec<(String, Tensor)> = weights
        .iter()
        .filter(|(n, _)| !n.starts_with("classifier."))
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    let broken = path("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(model_dir.join("config.json"), broken.join("config.json")).unwrap();
    Tensor::write_safetensors(&headless, broken.join("model.safetensors")).unwrap();
    err(
        &["--model", broken.to_str().unwrap()],
        &x,
        "weight classifier.bias: missing",
    );
    let poisoned: Vec<(String, Tensor)> = weights
        .iter()
        .map(|(n, t)| {
            let t = t.copy();
            if n.ends_with("layernorm_before.weight") {
                let _ = t.get(0).fill_(f64::NAN);
            }
            (n.clone(), t)
        })
        .collect();
    Tensor::write_safetensors(&poisoned, broken.join("model.safetensors")).unwrap();
    err(
        &["--model", broken.to_str().unwrap()],
        &x,
        "holds NaN or infinite values",
    );
    // One NaN codeword.
    let cb = codebooks(dir.path(), 2, 16, 4);
    let mut file = astra_quant::CodebookFile::load(&cb).unwrap();
    let mut flat = file.blocks[1].codebook.to_flat();
    flat[5] = f32::NAN;
    let c = &file.blocks[1].codebook;
    file.blocks[1].codebook =
        astra_quant::GroupedCodebook::from_flat(c.groups(), c.k(), c.sub_dim(), flat).unwrap();
    let nan_cb = path("nan-cb.safetensors");
    file.save(&nan_cb).unwrap();
    err(
        &[
            "--model",
            m,
            "--devices",
            "2",
            "--codebooks",
            nan_cb.to_str().unwrap(),
        ],
        &x,
        "values must be finite",
    );
    // A failed write (the output is a folder) leaves no temporary file behind.
    let blocked = path("blocked");
    std::fs::create_dir_all(blocked.join("inside")).unwrap();
    let before: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let o = predict(
        &["--model", m, "--input"],
        &[&x, Path::new("--out"), &blocked],
    );
    assert!(!o.status.success());
    let after: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        before.len(),
        after.len(),
        "a temporary file was left: {after:?}"
    );
}

/// `profile --arch gpt2|llama`: the decoders' prefill per device (the last device, which sees
/// every token); Llama's trace charges two codebooks per block; bad combinations in one line.
#[test]
fn profile_times_decoders_and_refuses_what_they_lack() {
    let dir = tempfile::tempdir().unwrap();
    let profile = |extra: &[&str], out: &str| {
        Command::new(env!("CARGO_BIN_EXE_astra-eval"))
            .args([
                "profile",
                "--devices",
                "2",
                "--tokens",
                "24",
                "--blocks",
                "2",
            ])
            .args([
                "--hidden",
                "32",
                "--heads",
                "4",
                "--mlp",
                "48",
                "--codewords",
                "16",
            ])
            .args(["--runs", "1", "--warmup", "0", "--out"])
            .arg(dir.path().join(out))
            .args(extra)
            .output()
            .unwrap()
    };
    for (arch, extra, per_block, runs) in [
        (
            "gpt2",
            &["--methods", "single,sp,astra-g4", "--fast"][..],
            1,
            3,
        ),
        (
            "llama",
            &[
                "--kv-heads",
                "2",
                "--methods",
                "single,sp,astra-g1,astra-g4",
            ][..],
            2,
            4,
        ),
    ] {
        let out = profile(&[&["--arch", arch][..], extra].concat(), arch);
        assert!(
            out.status.success(),
            "{arch}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let trace = astra_sim::Trace::load(&dir.path().join(arch).join("trace.json")).unwrap();
        assert_eq!(trace.model.codebooks_per_block, per_block, "{arch}");
        assert_eq!(trace.runs.len(), runs, "{arch}");
    }
    // Llama's default methods: those with an engine mode.
    let out = profile(&["--arch", "llama", "--kv-heads", "4"], "default");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = std::fs::read_to_string(dir.path().join("default/profile.csv")).unwrap();
    let methods: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(
        methods,
        ["single", "sp", "astra-g1", "astra-g16", "astra-g32"]
    );
    for (extra, needle) in [
        (
            &["--arch", "llama", "--methods", "tp"][..],
            "tp is profiled for --arch encoder only",
        ),
        (&["--arch", "llama", "--kv-heads", "3"][..], "--kv-heads 3"),
        (
            &["--arch", "gpt2", "--kv-heads", "2"][..],
            "--kv-heads is for --arch llama",
        ),
        // Llama with 1 key/value head quantizes 8-wide keys: G = 16 does not divide them.
        (
            &[
                "--arch",
                "llama",
                "--kv-heads",
                "1",
                "--methods",
                "astra-g16",
            ][..],
            "quantized width 8",
        ),
    ] {
        let out = profile(extra, "bad");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && e.contains(needle) && e.trim().lines().count() == 1,
            "{extra:?}: {e}"
        );
    }
}
