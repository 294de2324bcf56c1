//! Grouped codebooks: each D-vector is split into G equal sub-vectors and group g is quantised with
//! its own K × (D/G) codebook (ASTRA.md §2). Indices are u16 (K ≤ 65536).

use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{s, Array2, ArrayView2, Axis};
use rayon::prelude::*;
use serde::Serialize;

use crate::bitpack::bits_for;
use crate::error::{check_finite, QuantError, Result};
use crate::kmeans::{self, IterStats, KMeansConfig, MAX_K};
use crate::nearest::{Cpu, Search};

#[derive(Clone, Debug, PartialEq)]
pub struct GroupedCodebook {
    /// One K × (D/G) matrix per group.
    codewords: Vec<Array2<f32>>,
}

/// How a set of indices uses a codebook, per group.
#[derive(Clone, Debug, Serialize)]
pub struct CodeUsage {
    /// exp(entropy) of the index histogram: K when every code is used equally, 1 when one is.
    pub perplexity: Vec<f64>,
    /// Codes never chosen.
    pub dead_codes: Vec<usize>,
}

impl GroupedCodebook {
    pub fn new(codewords: Vec<Array2<f32>>) -> Result<Self> {
        let first = codewords
            .first()
            .ok_or_else(|| QuantError::param("groups", "a codebook needs at least one group"))?;
        let (k, w) = first.dim();
        if k == 0 || k > MAX_K || w == 0 {
            return Err(QuantError::param(
                "codebook",
                format!("shape {k}×{w} is not usable"),
            ));
        }
        for (g, c) in codewords.iter().enumerate() {
            if c.dim() != (k, w) {
                return Err(QuantError::Shape {
                    what: format!("codebook of group {g}"),
                    expected: format!("{k}×{w}"),
                    found: format!("{}×{}", c.nrows(), c.ncols()),
                });
            }
        }
        Ok(GroupedCodebook { codewords })
    }

    /// From a [G, K, D/G] tensor laid out row-major.
    pub fn from_flat(groups: usize, k: usize, sub_dim: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != groups * k * sub_dim {
            return Err(QuantError::Shape {
                what: "codebook tensor".into(),
                expected: format!("{groups}×{k}×{sub_dim} = {} values", groups * k * sub_dim),
                found: format!("{} values", data.len()),
            });
        }
        let cw = data
            .chunks(k * sub_dim)
            .map(|c| Array2::from_shape_vec((k, sub_dim), c.to_vec()).expect("sized above"))
            .collect();
        Self::new(cw)
    }

    /// Fits each group's codebook with k-means, groups in parallel. Group g uses seed + g so that
    /// groups do not share their initial draws.
    pub fn fit(
        x: ArrayView2<f32>,
        groups: usize,
        cfg: &KMeansConfig,
    ) -> Result<(Self, Vec<Vec<IterStats>>)> {
        Self::fit_with(x, groups, cfg, &Cpu)
    }

    /// [`Self::fit`] with k-means' searches on `search`.
    pub fn fit_with(
        x: ArrayView2<f32>,
        groups: usize,
        cfg: &KMeansConfig,
        search: &dyn Search,
    ) -> Result<(Self, Vec<Vec<IterStats>>)> {
        let (n, d) = x.dim();
        check_groups(d, groups)?;
        kmeans::validate(n, d / groups, cfg.k)?;
        check_finite(x)?;
        let w = d / groups;
        let bar = if cfg.progress && groups > 1 {
            let b = ProgressBar::new(groups as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "codebook groups {bar:30} {pos}/{len} [{elapsed_precise}]",
                )
                .expect("static template"),
            );
            b
        } else {
            ProgressBar::hidden()
        };
        let results: Vec<Result<kmeans::KMeans>> = (0..groups)
            .into_par_iter()
            .map(|g| {
                let sub = x.slice(s![.., g * w..(g + 1) * w]);
                let gcfg = KMeansConfig {
                    seed: cfg.seed.wrapping_add(g as u64),
                    progress: cfg.progress && groups == 1,
                    ..cfg.clone()
                };
                let r = kmeans::fit_with(sub, &gcfg, search);
                bar.inc(1);
                r
            })
            .collect();
        bar.finish_and_clear();
        let mut cw = Vec::with_capacity(groups);
        let mut stats = Vec::with_capacity(groups);
        for r in results {
            let km = r?;
            cw.push(km.centroids);
            stats.push(km.stats);
        }
        Ok((Self::new(cw)?, stats))
    }

    pub fn k(&self) -> usize {
        self.codewords[0].nrows()
    }
    pub fn groups(&self) -> usize {
        self.codewords.len()
    }
    pub fn sub_dim(&self) -> usize {
        self.codewords[0].ncols()
    }
    pub fn dim(&self) -> usize {
        self.groups() * self.sub_dim()
    }
    pub fn bits(&self) -> u32 {
        bits_for(self.k())
    }
    pub fn group(&self, g: usize) -> ArrayView2<'_, f32> {
        self.codewords[g].view()
    }
    /// Bits on the wire per token: G · ceil(log2 K).
    pub fn bits_per_token(&self) -> usize {
        self.groups() * self.bits() as usize
    }

    /// The [G, K, D/G] tensor, row-major.
    pub fn to_flat(&self) -> Vec<f32> {
        self.codewords
            .iter()
            .flat_map(|c| c.iter().copied())
            .collect()
    }

    fn check_width(&self, d: usize) -> Result<()> {
        if d != self.dim() {
            return Err(QuantError::Shape {
                what: "row width against the codebook".into(),
                expected: self.dim().to_string(),
                found: d.to_string(),
            });
        }
        Ok(())
    }

    /// n × D rows → n × G indices.
    pub fn encode(&self, x: ArrayView2<f32>) -> Result<Array2<u16>> {
        self.encode_with(x, &Cpu)
    }

    /// [`Self::encode`] with the search on `search`.
    pub fn encode_with(&self, x: ArrayView2<f32>, search: &dyn Search) -> Result<Array2<u16>> {
        self.check_width(x.ncols())?;
        check_finite(x)?;
        let w = self.sub_dim();
        let mut out = Array2::<u16>::zeros((x.nrows(), self.groups()));
        for (g, cw) in self.codewords.iter().enumerate() {
            let (labels, _) = search.nearest(x.slice(s![.., g * w..(g + 1) * w]), cw.view());
            for (o, l) in out.column_mut(g).iter_mut().zip(labels) {
                *o = l as u16;
            }
        }
        Ok(out)
    }

    /// [G·K], group-major: the share of the rows `x` (n × D, n ≥ 1) whose nearest codeword in
    /// each group is each codeword (what [`crate::BlockQuantizer::usage`] records).
    pub fn code_shares(&self, x: ArrayView2<f32>) -> Result<Vec<f32>> {
        self.code_shares_with(x, &Cpu)
    }

    /// [`Self::code_shares`] with the search on `search`.
    pub fn code_shares_with(&self, x: ArrayView2<f32>, search: &dyn Search) -> Result<Vec<f32>> {
        let idx = self.encode_with(x, search)?;
        let (g, k, n) = (self.groups(), self.k(), idx.nrows().max(1));
        let mut counts = vec![0usize; g * k];
        for row in idx.outer_iter() {
            for (j, &c) in row.iter().enumerate() {
                counts[j * k + c as usize] += 1;
            }
        }
        Ok(counts.iter().map(|&c| c as f32 / n as f32).collect())
    }

    /// n × G indices → n × D reconstructed rows.
    pub fn decode(&self, idx: ArrayView2<u16>) -> Result<Array2<f32>> {
        if idx.ncols() != self.groups() {
            return Err(QuantError::Shape {
                what: "index columns against the codebook's groups".into(),
                expected: self.groups().to_string(),
                found: idx.ncols().to_string(),
            });
        }
        let k = self.k();
        if let Some((position, &index)) = idx.iter().enumerate().find(|(_, &i)| i as usize >= k) {
            return Err(QuantError::IndexOutOfRange {
                index: index as usize,
                position,
                k,
            });
        }
        let w = self.sub_dim();
        let mut out = Array2::<f32>::zeros((idx.nrows(), self.dim()));
        out.axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(idx.axis_iter(Axis(0)).into_par_iter())
            .for_each(|(mut row, ix)| {
                for (g, &i) in ix.iter().enumerate() {
                    row.slice_mut(s![g * w..(g + 1) * w])
                        .assign(&self.codewords[g].row(i as usize));
                }
            });
        Ok(out)
    }

    /// Mean over rows of ‖x − x̂‖² (summed over the D coordinates).
    pub fn mse(&self, x: ArrayView2<f32>) -> Result<f64> {
        let xh = self.decode(self.encode(x)?.view())?;
        let total: f64 = (&x - &xh).iter().map(|&v| (v as f64) * (v as f64)).sum();
        Ok(total / x.nrows().max(1) as f64)
    }

    pub fn usage(&self, idx: ArrayView2<u16>) -> CodeUsage {
        let k = self.k();
        let mut perplexity = Vec::new();
        let mut dead_codes = Vec::new();
        for col in idx.axis_iter(Axis(1)) {
            let mut hist = vec![0usize; k];
            for &i in col {
                if (i as usize) < k {
                    hist[i as usize] += 1;
                }
            }
            let n = col.len().max(1) as f64;
            let entropy: f64 = hist
                .iter()
                .filter(|&&c| c > 0)
                .map(|&c| {
                    let p = c as f64 / n;
                    -p * p.ln()
                })
                .sum();
            perplexity.push(entropy.exp());
            dead_codes.push(hist.iter().filter(|&&c| c == 0).count());
        }
        CodeUsage {
            perplexity,
            dead_codes,
        }
    }
}

pub fn check_groups(d: usize, groups: usize) -> Result<()> {
    if groups == 0 || !d.is_multiple_of(groups) {
        return Err(QuantError::param(
            "groups",
            format!("must divide the row width D = {d}, got G = {groups}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn data(n: usize, d: usize) -> Array2<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        Array2::from_shape_fn((n, d), |_| rng.random_range(-1.0f32..1.0))
    }

    #[test]
    fn encode_decode_and_groups_reduce_error() {
        let x = data(2000, 16);
        let cfg = KMeansConfig {
            iters: 10,
            ..KMeansConfig::new(32)
        };
        let (g1, _) = GroupedCodebook::fit(x.view(), 1, &cfg).unwrap();
        let (g4, _) = GroupedCodebook::fit(x.view(), 4, &cfg).unwrap();
        assert_eq!(
            (g4.k(), g4.groups(), g4.sub_dim(), g4.dim()),
            (32, 4, 4, 16)
        );
        assert_eq!(g4.bits_per_token(), 20);
        // More groups = more bits = lower error.
        assert!(g4.mse(x.view()).unwrap() < g1.mse(x.view()).unwrap());
        let idx = g4.encode(x.view()).unwrap();
        assert_eq!(idx.dim(), (2000, 4));
        // Decoding the codewords themselves is exact.
        let cw_rows = Array2::from_shape_fn((32, 16), |(i, t)| g4.group(t / 4)[[i, t % 4]]);
        let back = g4
            .decode(g4.encode(cw_rows.view()).unwrap().view())
            .unwrap();
        assert_eq!(back, cw_rows);
        let u = g4.usage(idx.view());
        assert!(
            u.perplexity.iter().all(|&p| p > 16.0 && p <= 32.0 + 1e-9),
            "{:?}",
            u.perplexity
        );
        let flat = GroupedCodebook::from_flat(4, 32, 4, g4.to_flat()).unwrap();
        assert_eq!(flat, g4);
    }

    #[test]
    fn bad_shapes() {
        let x = data(100, 10);
        let cfg = KMeansConfig::new(8);
        assert!(GroupedCodebook::fit(x.view(), 3, &cfg)
            .unwrap_err()
            .to_string()
            .contains("divide"));
        let (cb, _) = GroupedCodebook::fit(x.view(), 2, &cfg).unwrap();
        assert!(cb.encode(data(5, 12).view()).is_err());
        assert!(cb
            .decode(Array2::<u16>::from_elem((2, 2), 8).view())
            .is_err());
        assert!(cb.decode(Array2::<u16>::zeros((2, 3)).view()).is_err());
        assert!(GroupedCodebook::from_flat(2, 8, 5, vec![0.0; 79]).is_err());
    }
}
