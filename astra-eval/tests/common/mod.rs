//! Fixtures shared by astra-eval's integration tests.

use std::path::Path;

use astra_quant::{BlockQuantizer, CodebookFile, GroupedCodebook, KMeansConfig};

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
