//! Fixtures shared by astra-eval's integration tests.

use std::path::Path;

use astra_quant::{BlockQuantizer, CodebookFile, GroupedCodebook, KMeansConfig};

#[allow(dead_code)]
/// The same G-group, K = 16 codebook (fitted on a Gaussian mixture of width `d`) for each of
/// `layers` blocks, saved at `path`.
pub fn save_codebooks(path: &Path, layers: usize, d: usize, groups: usize) {
    let rows = astra_quant::bench::gaussian_mixture(400, d, 8, 5) * 0.5;
    let cfg = KMeansConfig {
        iters: 4,
        ..KMeansConfig::new(16)
    };
    let (cb, _) = GroupedCodebook::fit(rows.view(), groups, &cfg).unwrap();
    CodebookFile {
        blocks: vec![
            BlockQuantizer {
                usage: None,
                codebook: cb,
                noise: None
            };
            layers
        ],
        extra: Default::default(),
    }
    .save(path)
    .unwrap();
}

/// The project venv's Python (numpy, transformers), made by scripts/setup.sh.
#[allow(dead_code)]
pub fn python() -> std::path::PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh",
        p.display()
    );
    p
}
