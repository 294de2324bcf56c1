//! Lloyd's k-means on f32 rows, in the manner of faiss: optional subsampling to
//! K × max_points_per_centroid rows, GEMM distances, empty clusters refilled by splitting the largest.
//!
//! Determinism: the result depends only on the data, the configuration and the seed. Centroid sums are
//! accumulated per centroid over its rows in row order (f64), never in a work-stealing reduction, so
//! neither the thread count nor scheduling changes a single bit.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array2, ArrayView2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{check_finite, QuantError, Result};
use crate::nearest::Search;

/// Largest codebook a u16 index can address.
pub const MAX_K: usize = 65536;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Init {
    /// K distinct rows drawn uniformly (what faiss does).
    Random,
    /// k-means++ seeding (D² sampling) on at most 8·K rows drawn uniformly.
    #[value(name = "kmeans++")]
    #[serde(rename = "kmeans++")]
    KMeansPlusPlus,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KMeansConfig {
    pub k: usize,
    pub iters: usize,
    pub seed: u64,
    pub init: Init,
    /// Rows used per centroid at most (faiss's default is 256); 0 uses every row.
    pub max_points_per_centroid: usize,
    /// Stop early when the objective improves by less than this fraction; 0 runs all iterations.
    pub tol: f64,
    /// Show an indicatif bar with per-iteration statistics.
    pub progress: bool,
}

impl KMeansConfig {
    pub fn new(k: usize) -> Self {
        KMeansConfig {
            k,
            iters: 25,
            seed: 1,
            init: Init::Random,
            max_points_per_centroid: 256,
            tol: 0.0,
            progress: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IterStats {
    pub iter: usize,
    /// Mean squared distance of the training rows to their nearest centroid, before this update.
    pub objective: f64,
    /// K · Σ n_k² / n²: 1 when all clusters are equal, larger when a few dominate.
    pub imbalance: f64,
    /// Empty clusters refilled by splitting a large one in this iteration.
    pub splits: usize,
    pub seconds: f64,
}

#[derive(Clone, Debug)]
pub struct KMeans {
    /// K × d.
    pub centroids: Array2<f32>,
    pub stats: Vec<IterStats>,
    /// Rows actually used for training (after subsampling).
    pub rows_used: usize,
    /// Stopped before `iters` because the assignment no longer changed.
    pub converged: bool,
}

/// Relative size of the perturbation that separates a split cluster's two halves (faiss uses the same).
const SPLIT_EPS: f32 = 1.0 / 1024.0;

pub fn validate(n: usize, d: usize, k: usize) -> Result<()> {
    if k == 0 || k > MAX_K {
        return Err(QuantError::param(
            "k",
            format!("must be in 1..={MAX_K}, got {k}"),
        ));
    }
    if d == 0 {
        return Err(QuantError::param("input", "rows have zero width"));
    }
    if n < k {
        return Err(QuantError::TooFewRows { found: n, k });
    }
    Ok(())
}

pub fn fit(data: ArrayView2<f32>, cfg: &KMeansConfig) -> Result<KMeans> {
    fit_with(data, cfg, &crate::nearest::Cpu)
}

/// [`fit`] with the assignment step's nearest-centroid search on `search` (the initialisation,
/// updates, empty-cluster splits and stopping rule are the same).
pub fn fit_with(data: ArrayView2<f32>, cfg: &KMeansConfig, search: &dyn Search) -> Result<KMeans> {
    let (n, d) = data.dim();
    validate(n, d, cfg.k)?;
    check_finite(data)?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let sampled = subsample(data, cfg, &mut rng);
    // Without subsampling, train on the caller's rows in place: copying ViT-scale inputs
    // (hundreds of MB) costs more than an iteration in page faults.
    let x: ndarray::CowArray<f32, ndarray::Ix2> = match sampled {
        Some(s) => s.into(),
        None => data.as_standard_layout(),
    };
    let mut centroids = match cfg.init {
        Init::Random => random_rows(x.view(), cfg.k, &mut rng),
        Init::KMeansPlusPlus => kmeans_plus_plus(x.view(), cfg.k, &mut rng),
    };
    let bar = if cfg.progress {
        let b = ProgressBar::new(cfg.iters as u64);
        b.set_style(
            ProgressStyle::with_template(
                "k-means K={prefix} {bar:30} {pos}/{len} [{elapsed_precise}] {msg}",
            )
            .expect("static template"),
        );
        b.set_prefix(cfg.k.to_string());
        b
    } else {
        ProgressBar::hidden()
    };
    let mut stats = Vec::with_capacity(cfg.iters);
    let rows = search.over(x.view());
    let mut previous: Vec<u32> = Vec::new();
    let mut converged = false;
    for iter in 0..cfg.iters {
        let t0 = Instant::now();
        let (labels, dists) = rows.nearest(centroids.view());
        // Same assignment as last time: the update would reproduce the current centroids, so
        // Lloyd's iteration has reached its fixed point (faiss stops here too).
        if labels == previous {
            converged = true;
            stats.push(IterStats {
                iter,
                objective: dists.iter().map(|&v| v as f64).sum::<f64>() / x.nrows() as f64,
                imbalance: stats.last().map_or(1.0, |s: &IterStats| s.imbalance),
                splits: 0,
                seconds: t0.elapsed().as_secs_f64(),
            });
            bar.inc(1);
            break;
        }
        let objective = dists.iter().map(|&v| v as f64).sum::<f64>() / x.nrows() as f64;
        let (mut counts, new) = update_centroids(x.view(), &labels, &centroids);
        centroids = new;
        let splits = split_empty(&mut centroids, &mut counts);
        previous = if splits == 0 { labels } else { Vec::new() };
        let imbalance = imbalance(&counts, x.nrows());
        stats.push(IterStats {
            iter,
            objective,
            imbalance,
            splits,
            seconds: t0.elapsed().as_secs_f64(),
        });
        bar.set_message(format!(
            "objective {objective:.5e} imbalance {imbalance:.3}"
        ));
        bar.inc(1);
        if cfg.tol > 0.0 && iter > 0 {
            let prev = stats[iter - 1].objective;
            if prev > 0.0 && (prev - objective) / prev < cfg.tol {
                break;
            }
        }
    }
    bar.finish_and_clear();
    Ok(KMeans {
        centroids,
        stats,
        rows_used: x.nrows(),
        converged,
    })
}

/// The rows to train on when there are more than K × max_points_per_centroid; None means all.
fn subsample(
    data: ArrayView2<f32>,
    cfg: &KMeansConfig,
    rng: &mut ChaCha8Rng,
) -> Option<Array2<f32>> {
    let n = data.nrows();
    let cap = cfg.k.saturating_mul(cfg.max_points_per_centroid);
    if cfg.max_points_per_centroid == 0 || n <= cap {
        return None;
    }
    let mut idx = rand::seq::index::sample(rng, n, cap).into_vec();
    idx.sort_unstable(); // sequential reads of the source
    Some(gather_rows(data, &idx))
}

fn gather_rows(data: ArrayView2<f32>, idx: &[usize]) -> Array2<f32> {
    let d = data.ncols();
    let mut out = Array2::<f32>::zeros((idx.len(), d));
    out.outer_iter_mut()
        .into_par_iter()
        .zip(idx.par_iter())
        .for_each(|(mut o, &i)| o.assign(&data.row(i)));
    out
}

fn random_rows(x: ArrayView2<f32>, k: usize, rng: &mut ChaCha8Rng) -> Array2<f32> {
    let mut idx = rand::seq::index::sample(rng, x.nrows(), k).into_vec();
    idx.sort_unstable();
    gather_rows(x, &idx)
}

fn kmeans_plus_plus(x: ArrayView2<f32>, k: usize, rng: &mut ChaCha8Rng) -> Array2<f32> {
    // D² sampling costs K passes over the rows; a uniform sample of 8·K rows keeps it to a
    // fraction of one Lloyd iteration while still spreading the seeds.
    let pool = if x.nrows() > 8 * k {
        let mut idx = rand::seq::index::sample(rng, x.nrows(), 8 * k).into_vec();
        idx.sort_unstable();
        gather_rows(x, &idx)
    } else {
        x.to_owned()
    };
    let n = pool.nrows();
    let mut chosen = Vec::with_capacity(k);
    chosen.push(rng.random_range(0..n));
    let mut best: Vec<f32> = vec![f32::INFINITY; n];
    for _ in 1..k {
        let last = pool.row(*chosen.last().expect("non-empty"));
        best.par_iter_mut()
            .zip(pool.outer_iter().into_par_iter())
            .for_each(|(b, r)| {
                let dd: f32 = r
                    .iter()
                    .zip(last.iter())
                    .map(|(a, c)| (a - c) * (a - c))
                    .sum();
                if dd < *b {
                    *b = dd;
                }
            });
        let total: f64 = best.iter().map(|&v| v as f64).sum();
        let next = if total <= 0.0 {
            // All rows coincide with a chosen seed: any unchosen row will do.
            (0..n).find(|i| !chosen.contains(i)).unwrap_or(0)
        } else {
            let target = rng.random::<f64>() * total;
            let mut acc = 0.0;
            let mut pick = n - 1;
            for (i, &v) in best.iter().enumerate() {
                acc += v as f64;
                if acc >= target && v > 0.0 {
                    pick = i;
                    break;
                }
            }
            pick
        };
        chosen.push(next);
    }
    gather_rows(pool.view(), &chosen)
}

/// New centroids as the mean of their rows; a centroid with no rows keeps its old value (and is then
/// replaced by `split_empty`).
fn update_centroids(
    x: ArrayView2<f32>,
    labels: &[u32],
    old: &Array2<f32>,
) -> (Vec<usize>, Array2<f32>) {
    let k = old.nrows();
    let d = x.ncols();
    // Counting sort of row indices by label: each centroid then sums its rows in row order.
    let mut counts = vec![0usize; k];
    for &l in labels {
        counts[l as usize] += 1;
    }
    let mut offsets = vec![0usize; k + 1];
    for j in 0..k {
        offsets[j + 1] = offsets[j] + counts[j];
    }
    let mut cursor = offsets.clone();
    let mut order = vec![0usize; labels.len()];
    for (i, &l) in labels.iter().enumerate() {
        order[cursor[l as usize]] = i;
        cursor[l as usize] += 1;
    }
    let mut new = old.clone();
    new.outer_iter_mut()
        .into_par_iter()
        .enumerate()
        .for_each(|(j, mut c)| {
            let members = &order[offsets[j]..offsets[j + 1]];
            if members.is_empty() {
                return;
            }
            let mut acc = vec![0f64; d];
            for &i in members {
                for (a, &v) in acc.iter_mut().zip(x.row(i).iter()) {
                    *a += v as f64;
                }
            }
            let inv = 1.0 / members.len() as f64;
            for (cv, a) in c.iter_mut().zip(acc) {
                *cv = (a * inv) as f32;
            }
        });
    (counts, new)
}

/// Gives every empty cluster half of the currently largest one: both centroids become the large
/// one's, nudged apart symmetrically so the next assignment separates them.
fn split_empty(centroids: &mut Array2<f32>, counts: &mut [usize]) -> usize {
    let mut splits = 0;
    for empty in 0..counts.len() {
        if counts[empty] != 0 {
            continue;
        }
        let (largest, &size) = counts
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))
            .expect("k > 0");
        if size < 2 {
            break; // nothing left to split
        }
        let src = centroids.row(largest).to_owned();
        for (t, &v) in src.iter().enumerate() {
            let (up, down) = (v * (1.0 + SPLIT_EPS), v * (1.0 - SPLIT_EPS));
            let (a, b) = if t % 2 == 0 { (up, down) } else { (down, up) };
            centroids[[empty, t]] = a;
            centroids[[largest, t]] = b;
        }
        counts[empty] = size / 2;
        counts[largest] = size - size / 2;
        splits += 1;
    }
    splits
}

fn imbalance(counts: &[usize], n: usize) -> f64 {
    let sq: f64 = counts.iter().map(|&c| (c as f64) * (c as f64)).sum();
    counts.len() as f64 * sq / ((n as f64) * (n as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    fn blobs(n_per: usize, centers: &[[f32; 2]], seed: u64) -> Array2<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let noise = Normal::new(0.0f32, 0.05).unwrap();
        let mut x = Array2::zeros((n_per * centers.len(), 2));
        for (c, ctr) in centers.iter().enumerate() {
            for i in 0..n_per {
                for t in 0..2 {
                    x[[c * n_per + i, t]] = ctr[t] + noise.sample(&mut rng);
                }
            }
        }
        x
    }

    #[test]
    fn recovers_separated_blobs() {
        let centers = [[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0], [5.0, -5.0]];
        let x = blobs(200, &centers, 7);
        for init in [Init::Random, Init::KMeansPlusPlus] {
            let mut cfg = KMeansConfig::new(4);
            cfg.init = init;
            cfg.iters = 30;
            let km = fit(x.view(), &cfg).unwrap();
            for ctr in centers {
                let best = km
                    .centroids
                    .outer_iter()
                    .map(|c| (c[0] - ctr[0]).powi(2) + (c[1] - ctr[1]).powi(2))
                    .fold(f32::INFINITY, f32::min);
                // Random init may merge two blobs in an unlucky draw, k-means++ should not.
                if init == Init::KMeansPlusPlus {
                    assert!(best < 0.01, "{init:?}: center {ctr:?} missed by {best}");
                }
            }
            let last = km.stats.last().unwrap().objective;
            assert!(last <= km.stats[0].objective + 1e-9, "objective rose");
        }
    }

    #[test]
    fn deterministic_for_a_seed_and_independent_of_threads() {
        let x = blobs(400, &[[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]], 1);
        let cfg = KMeansConfig {
            max_points_per_centroid: 64,
            ..KMeansConfig::new(16)
        };
        let a = fit(x.view(), &cfg).unwrap();
        let b = fit(x.view(), &cfg).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let c = pool.install(|| fit(x.view(), &cfg).unwrap());
        assert_eq!(a.centroids, b.centroids);
        assert_eq!(a.centroids, c.centroids);
        assert_eq!(a.rows_used, 16 * 64);
        let other = fit(x.view(), &KMeansConfig { seed: 2, ..cfg }).unwrap();
        assert_ne!(a.centroids, other.centroids);
    }

    #[test]
    fn empty_clusters_are_split() {
        let mut c = Array2::from_shape_vec((3, 2), vec![1.0, 2.0, 9.0, 9.0, 4.0, 4.0]).unwrap();
        let mut counts = vec![5, 0, 3];
        assert_eq!(split_empty(&mut c, &mut counts), 1);
        assert_eq!(counts, vec![3, 2, 3]);
        assert!((c[[1, 0]] - 1.0).abs() < 0.01 && (c[[1, 1]] - 2.0).abs() < 0.01);
        assert_ne!(c.row(0), c.row(1));
    }

    #[test]
    fn duplicate_rows_still_give_distinct_clusters() {
        // Three distinct values, many copies: random init often draws copies of one value.
        let x = Array2::from_shape_fn((60, 1), |(i, _)| [1.0f32, 10.0, 20.0][i % 3]);
        for seed in 0..5 {
            let cfg = KMeansConfig {
                iters: 20,
                seed,
                ..KMeansConfig::new(3)
            };
            let km = fit(x.view(), &cfg).unwrap();
            let mut c: Vec<f32> = km.centroids.iter().copied().collect();
            c.sort_by(f32::total_cmp);
            let ok = (c[0] - 1.0).abs() < 1e-3
                && (c[1] - 10.0).abs() < 1e-3
                && (c[2] - 20.0).abs() < 1e-3;
            assert!(ok, "seed {seed}: {c:?}");
        }
    }

    #[test]
    fn bad_input_is_rejected() {
        let x = Array2::<f32>::zeros((10, 4));
        assert!(matches!(
            fit(x.view(), &KMeansConfig::new(11)),
            Err(QuantError::TooFewRows { .. })
        ));
        assert!(fit(x.view(), &KMeansConfig::new(0)).is_err());
        assert!(fit(x.view(), &KMeansConfig::new(MAX_K + 1)).is_err());
        let mut y = x.clone();
        y[[3, 2]] = f32::NAN;
        let e = fit(y.view(), &KMeansConfig::new(2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("row 3 column 2"), "{e}");
    }

    #[test]
    fn tolerance_stops_early() {
        let x = blobs(100, &[[0.0, 0.0], [3.0, 3.0]], 4);
        let cfg = KMeansConfig {
            iters: 50,
            tol: 1e-3,
            ..KMeansConfig::new(2)
        };
        let km = fit(x.view(), &cfg).unwrap();
        assert!(km.stats.len() < 50);
    }
}
