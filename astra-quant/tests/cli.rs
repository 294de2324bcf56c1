//! The `astra-quant` command line, end to end, with Python's safetensors + numpy as the reader of
//! our files (the interoperability users rely on) and bad input checked for one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use astra_quant::npy;
use ndarray::Array2;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_astra-quant"))
}

/// The project venv's Python (scripts/setup.sh creates it with numpy and safetensors).
fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "command failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command that must fail with a single-line message containing `needle`.
fn run_err(cmd: &mut Command, needle: &str) {
    let out = cmd.output().expect("spawn");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "error is not one line: {err}"
    );
    assert!(
        err.contains(needle),
        "error '{err}' does not mention '{needle}'"
    );
    assert!(!err.contains("panicked"), "{err}");
}

fn rows(n: usize, d: usize) -> Array2<f32> {
    astra_quant::bench::gaussian_mixture(n, d, 20, 3)
}

#[test]
fn fit_encode_decode_and_python_reads_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let x_path = dir.path().join("x.npy");
    let x = rows(3000, 24);
    npy::write_f32(&x_path, &x).unwrap();
    let cb = dir.path().join("codebook.safetensors");
    let report = dir.path().join("report.json");
    run_ok(
        bin()
            .args(["fit", "--input"])
            .arg(&x_path)
            .args([
                "--k", "64", "--groups", "4", "--iters", "8", "--seed", "1", "--noise", "full",
                "--quiet", "--out",
            ])
            .arg(&cb)
            .arg("--report")
            .arg(&report),
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["groups_stats"].as_array().unwrap().len(), 4);

    let idx = dir.path().join("idx.npy");
    let packed = dir.path().join("idx.bin");
    run_ok(
        bin()
            .args(["encode", "--codebook"])
            .arg(&cb)
            .arg("--input")
            .arg(&x_path)
            .arg("--out")
            .arg(&idx)
            .arg("--packed")
            .arg(&packed),
    );
    // 3000 rows × 4 groups × 6 bits = 9000 bytes exactly.
    assert_eq!(std::fs::metadata(&packed).unwrap().len(), 9000);
    let dec_a = dir.path().join("xa.npy");
    let dec_b = dir.path().join("xb.npy");
    run_ok(
        bin()
            .args(["decode", "--codebook"])
            .arg(&cb)
            .arg("--indices")
            .arg(&idx)
            .arg("--out")
            .arg(&dec_a),
    );
    run_ok(
        bin()
            .args(["decode", "--codebook"])
            .arg(&cb)
            .arg("--packed")
            .arg(&packed)
            .args(["--rows", "3000", "--out"])
            .arg(&dec_b),
    );
    assert_eq!(
        npy::read_f32(&dec_a).unwrap(),
        npy::read_f32(&dec_b).unwrap()
    );
    let stats = run_ok(
        bin()
            .args(["stats", "--codebook"])
            .arg(&cb)
            .arg("--input")
            .arg(&x_path),
    );
    let s = String::from_utf8_lossy(&stats.stdout);
    assert!(
        s.contains("K=64 G=4 D=24") && s.contains("full covariance"),
        "{s}"
    );

    // Python reads the codebook with safetensors + numpy, recomputes nearest codewords itself and
    // must agree with our indices, our decode and our residual statistics.
    let script = r#"
import sys, json, numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file
cb_path, x_path, idx_path, dec_path = sys.argv[1:5]
t = load_file(cb_path)
with safe_open(cb_path, "np") as f:
    meta = f.metadata()
assert meta["format"] == "astra-codebooks" and meta["format_version"] == "1", meta
assert (meta["k"], meta["groups"], meta["dim"], meta["bits"], meta["blocks"], meta["noise"]) == ("64", "4", "24", "6", "1", "full"), meta
cb = t["blocks.0.codebook"]
assert cb.shape == (4, 64, 6) and cb.dtype == np.float32
x = np.load(x_path); idx = np.load(idx_path); dec = np.load(dec_path)
assert idx.dtype == np.uint16 and idx.shape == (3000, 4)
mine = np.stack([np.argmin(((x[:, None, g*6:(g+1)*6] - cb[g][None]) ** 2).sum(-1), axis=1) for g in range(4)], 1)
agree = (mine == idx).mean()
assert agree > 0.999, agree   # ties between equidistant codewords may break differently
recon = np.concatenate([cb[g][idx[:, g]] for g in range(4)], 1)
assert np.array_equal(recon, dec)
r = x - dec
mu = r.mean(0); cov = np.cov(r.T, bias=True)
L = t["blocks.0.residual_chol"]
assert np.allclose(t["blocks.0.residual_mean"], mu, atol=1e-5)
assert np.allclose(L @ L.T, cov, atol=1e-4), np.abs(L @ L.T - cov).max()
assert np.allclose(L, np.tril(L))
print("python ok", agree)
"#;
    let out = run_ok(
        Command::new(python())
            .arg("-c")
            .arg(script)
            .arg(&cb)
            .arg(&x_path)
            .arg(&idx)
            .arg(&dec_a),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("python ok"));
}

#[test]
fn reads_safetensors_input() {
    let dir = tempfile::tempdir().unwrap();
    let x = rows(500, 8);
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![500, 8], &bytes)
        .unwrap();
    let p = dir.path().join("x.safetensors");
    std::fs::write(
        &p,
        safetensors::serialize(vec![("blocks.3.input", view)], &None).unwrap(),
    )
    .unwrap();
    let out = dir.path().join("cb.safetensors");
    run_ok(
        bin()
            .args(["fit", "--input"])
            .arg(&p)
            .args(["--k", "16", "--iters", "3", "--quiet", "--out"])
            .arg(&out),
    );
    run_err(
        bin()
            .args(["fit", "--input"])
            .arg(&p)
            .args(["--tensor", "nope", "--k", "16", "--out"])
            .arg(&out),
        "no tensor named 'nope'",
    );
}

#[test]
fn bad_input_gives_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.npy");
    npy::write_f32(&good, &rows(200, 12)).unwrap();
    let out = dir.path().join("cb.safetensors");
    let fit = |input: &Path, extra: &[&str]| {
        let mut c = bin();
        c.args(["fit", "--quiet", "--input"])
            .arg(input)
            .args(extra)
            .arg("--out")
            .arg(&out);
        c
    };
    let mut nan = rows(200, 12);
    nan[[17, 5]] = f32::NAN;
    let nan_path = dir.path().join("nan.npy");
    npy::write_f32(&nan_path, &nan).unwrap();
    run_err(
        &mut fit(&nan_path, &["--k", "8"]),
        "row 17 column 5 is not finite",
    );
    let mut inf = rows(200, 12);
    inf[[3, 0]] = f32::INFINITY;
    npy::write_f32(&nan_path, &inf).unwrap();
    run_err(
        &mut fit(&nan_path, &["--k", "8"]),
        "row 3 column 0 is not finite",
    );
    run_err(&mut fit(&good, &["--k", "1024"]), "200 rows but K = 1024");
    run_err(
        &mut fit(&good, &["--k", "8", "--groups", "5"]),
        "must divide the row width D = 12",
    );
    run_err(&mut fit(&good, &["--k", "0"]), "k: must be in 1..=65536");
    run_err(
        &mut fit(&good, &["--k", "70000"]),
        "k: must be in 1..=65536",
    );
    run_err(
        &mut fit(&dir.path().join("missing.npy"), &["--k", "8"]),
        "missing.npy",
    );
    std::fs::write(dir.path().join("junk.npy"), b"not numpy").unwrap();
    run_err(
        &mut fit(&dir.path().join("junk.npy"), &["--k", "8"]),
        "not a valid .npy file",
    );

    // A good codebook, then a truncated copy and a mismatched input.
    run_ok(&mut fit(&good, &["--k", "8", "--groups", "3"]));
    let bytes = std::fs::read(&out).unwrap();
    let trunc = dir.path().join("trunc.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    let idx = dir.path().join("i.npy");
    run_err(
        bin()
            .args(["encode", "--codebook"])
            .arg(&trunc)
            .arg("--input")
            .arg(&good)
            .arg("--out")
            .arg(&idx),
        "truncated or corrupt",
    );
    let wide = dir.path().join("wide.npy");
    npy::write_f32(&wide, &rows(10, 15)).unwrap();
    run_err(
        bin()
            .args(["encode", "--codebook"])
            .arg(&out)
            .arg("--input")
            .arg(&wide)
            .arg("--out")
            .arg(&idx),
        "expected 12, found 15",
    );
    run_err(
        bin()
            .args(["encode", "--codebook"])
            .arg(&out)
            .args(["--block", "4", "--input"])
            .arg(&good)
            .arg("--out")
            .arg(&idx),
        "block 4 does not exist",
    );
    npy::write_u16(&idx, &Array2::from_elem((2, 3), 9u16)).unwrap();
    run_err(
        bin()
            .args(["decode", "--codebook"])
            .arg(&out)
            .arg("--indices")
            .arg(&idx)
            .arg("--out")
            .arg(dir.path().join("o.npy")),
        "index 9",
    );
    // A codebook file with one NaN codeword is refused where it is loaded.
    let mut nan_cb = std::fs::read(&out).unwrap();
    let data_start = 8 + u64::from_le_bytes(nan_cb[..8].try_into().unwrap()) as usize;
    nan_cb[data_start + 8..data_start + 12].copy_from_slice(&f32::NAN.to_le_bytes());
    let nan_cb_path = dir.path().join("nan.safetensors");
    std::fs::write(&nan_cb_path, &nan_cb).unwrap();
    run_err(
        bin().args(["stats", "--codebook"]).arg(&nan_cb_path),
        "values must be finite",
    );
    // Absurd thread counts are refused before any work.
    run_err(
        bin()
            .args(["--threads", "100000", "stats", "--codebook"])
            .arg(&out),
        "threads: 100000 is more than",
    );
    let packed = dir.path().join("p.bin");
    std::fs::write(&packed, [0u8; 6]).unwrap();
    run_err(
        bin()
            .args(["decode", "--codebook"])
            .arg(&out)
            .arg("--packed")
            .arg(&packed)
            .args(["--rows", "4", "--out"])
            .arg(dir.path().join("o.npy")),
        "expected 5 bytes",
    );
}
