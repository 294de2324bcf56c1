//! Helpers shared by astra-train's integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};

use tch::Tensor;

/// The project venv's Python (numpy, torch, transformers), made by scripts/setup.sh.
pub fn python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}

/// A temporary folder filled by `tests/fixtures/SCRIPT OUT_DIR` (run with the project venv's
/// Python); the script's stderr is shown when it fails.
pub fn fixture(script: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(script);
    let out = std::process::Command::new(python())
        .arg(&script)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// max |a − b| relative to max |b|.
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1e-6);
    (a - b).abs().max().double_value(&[]) / scale
}

/// ASTRA at inference for the decoder tests: one CLS mode, no training, no lost messages.
pub fn inference<'a>(
    p: &'a astra_train::models::DevicePartition,
    vq: Option<&'a mut [astra_train::models::GroupedVq]>,
) -> astra_train::models::Astra<'a> {
    astra_train::models::Astra {
        partition: p,
        cls: astra_train::models::ClsMode::Single,
        vq,
        train: false,
        link_loss: None,
    }
}
