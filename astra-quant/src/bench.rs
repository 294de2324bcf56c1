//! `astra-quant bench`: times k-means, encoding and bit packing on synthetic data and prints a
//! markdown table. Data are a Gaussian mixture (clusterable, like block inputs), not uniform noise.

use std::time::Instant;

use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use crate::bitpack::{bits_for, pack, unpack};
use crate::codebook::GroupedCodebook;
use crate::error::Result;
use crate::kmeans::KMeansConfig;

/// n rows of width d drawn around `centers` random centres (σ = 0.3 around unit-variance centres).
pub fn gaussian_mixture(n: usize, d: usize, centers: usize, seed: u64) -> Array2<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let c =
        Array2::from_shape_simple_fn((centers.max(1), d), || rng.sample::<f32, _>(StandardNormal));
    let mut x = Array2::<f32>::zeros((n, d));
    for mut row in x.outer_iter_mut() {
        let j = rng.random_range(0..c.nrows());
        for (v, &m) in row.iter_mut().zip(c.row(j).iter()) {
            *v = m + 0.3 * rng.sample::<f32, _>(StandardNormal);
        }
    }
    x
}

pub struct BenchRow {
    pub what: String,
    pub shape: String,
    pub seconds: f64,
    pub rate: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark suite: k-means at the given size, then encode and pack/unpack throughput
/// for ViT-Base-like tokens (D = 768) at G = 1, 16, 32.
pub fn run(
    n: usize,
    d: usize,
    k: usize,
    iters: usize,
    seed: u64,
    repeats: usize,
) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let x = gaussian_mixture(n, d, 4 * k, seed);
    let cfg = KMeansConfig {
        k,
        iters,
        seed,
        ..KMeansConfig::new(k)
    };
    let t = Instant::now();
    let km = crate::kmeans::fit(x.view(), &cfg)?;
    let secs = t.elapsed().as_secs_f64();
    rows.push(BenchRow {
        what: "k-means fit".into(),
        shape: format!(
            "n={n} d={d} K={k} iters={iters} (rows used {})",
            km.rows_used
        ),
        seconds: secs,
        rate: format!("{:.1} ms/iter", 1e3 * secs / iters.max(1) as f64),
    });
    let tokens = 4096;
    let xt = gaussian_mixture(tokens, 768, 256, seed + 1);
    for groups in [1usize, 16, 32] {
        let cb_cfg = KMeansConfig {
            iters: 3,
            ..KMeansConfig::new(1024)
        };
        let (cb, _) = GroupedCodebook::fit(xt.view(), groups, &cb_cfg)?;
        let enc = median(
            (0..repeats)
                .map(|_| {
                    let t = Instant::now();
                    let _ = cb.encode(xt.view());
                    t.elapsed().as_secs_f64()
                })
                .collect(),
        );
        rows.push(BenchRow {
            what: format!("encode G={groups}"),
            shape: format!("{tokens}×768 tokens, K=1024"),
            seconds: enc,
            rate: format!("{:.0} tokens/s", tokens as f64 / enc),
        });
        let idx = cb.encode(xt.view())?;
        let flat: Vec<u16> = idx.iter().copied().collect();
        let bits = bits_for(1024);
        let p = median(
            (0..repeats)
                .map(|_| {
                    let t = Instant::now();
                    let bytes = pack(&flat, bits).expect("indices < K");
                    let back = unpack(&bytes, flat.len(), bits).expect("exact length");
                    assert_eq!(back.len(), flat.len());
                    t.elapsed().as_secs_f64()
                })
                .collect(),
        );
        rows.push(BenchRow {
            what: format!("pack+unpack G={groups}"),
            shape: format!("{} indices × {bits} bits", flat.len()),
            seconds: p,
            rate: format!("{:.0} M indices/s", flat.len() as f64 / p / 1e6),
        });
    }
    Ok(rows)
}

pub fn to_markdown(rows: &[BenchRow]) -> String {
    let mut s = String::from("| what | shape | seconds | rate |\n|---|---|---:|---:|\n");
    for r in rows {
        s += &format!(
            "| {} | {} | {:.4} | {} |\n",
            r.what, r.shape, r.seconds, r.rate
        );
    }
    s
}
