//! Residual statistics for Noise-Augmented Quantization (ASTRA.md §3): the mean µ and covariance Σ
//! of r = X − X̂ per block, streamed over batches with f64 accumulators, and a sampler
//! ξ = µ + L·z (L the Cholesky factor of Σ, z standard normal) or its diagonal variant.
//!
//! Batches are merged with Chan et al.'s pairwise update (mean and centred scatter per batch), which
//! stays accurate where E[rrᵀ] − µµᵀ would cancel catastrophically.

use ndarray::{Array1, Array2, ArrayView2};
use rand::Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

use crate::error::{QuantError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NoiseKind {
    /// Full covariance, sampled through its Cholesky factor.
    Full,
    /// Per-coordinate variance only.
    Diagonal,
}

/// Streaming mean and covariance of D-dimensional rows.
#[derive(Clone, Debug)]
pub struct ResidualAccumulator {
    dim: usize,
    count: u64,
    mean: Vec<f64>,
    /// Centred scatter Σ (r − µ)(r − µ)ᵀ, D × D row-major (only the diagonal when `diagonal`).
    scatter: Vec<f64>,
    diagonal: bool,
}

impl ResidualAccumulator {
    pub fn new(dim: usize, kind: NoiseKind) -> Self {
        let diagonal = kind == NoiseKind::Diagonal;
        ResidualAccumulator {
            dim,
            count: 0,
            mean: vec![0.0; dim],
            scatter: vec![0.0; if diagonal { dim } else { dim * dim }],
            diagonal,
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Adds the residuals x − x̂ of one batch.
    pub fn push_pair(&mut self, x: ArrayView2<f32>, x_hat: ArrayView2<f32>) -> Result<()> {
        if x.dim() != x_hat.dim() {
            return Err(QuantError::Shape {
                what: "x against its reconstruction".into(),
                expected: format!("{:?}", x.dim()),
                found: format!("{:?}", x_hat.dim()),
            });
        }
        self.push(&(&x - &x_hat).view())
    }

    /// Adds one batch of residual rows.
    pub fn push(&mut self, r: &ArrayView2<f32>) -> Result<()> {
        let (n, d) = r.dim();
        if d != self.dim {
            return Err(QuantError::Shape {
                what: "residual width".into(),
                expected: self.dim.to_string(),
                found: d.to_string(),
            });
        }
        if n == 0 {
            return Ok(());
        }
        let mut bmean = vec![0f64; d];
        for row in r.outer_iter() {
            for (m, &v) in bmean.iter_mut().zip(row.iter()) {
                *m += v as f64;
            }
        }
        bmean.iter_mut().for_each(|m| *m /= n as f64);
        // Centred batch in f64, n × d row-major.
        let mut c = Vec::with_capacity(n * d);
        for row in r.outer_iter() {
            c.extend(row.iter().zip(&bmean).map(|(&v, m)| v as f64 - m));
        }
        let mut bscatter = vec![0f64; self.scatter.len()];
        if self.diagonal {
            for row in c.chunks(d) {
                for (s, v) in bscatter.iter_mut().zip(row) {
                    *s += v * v;
                }
            }
        } else {
            // SAFETY: c is n×d row-major (read as d×n through strides for the transpose), bscatter is d×d.
            unsafe {
                gemm::gemm(
                    d,
                    d,
                    n,
                    bscatter.as_mut_ptr(),
                    1,
                    d as isize,
                    false,
                    c.as_ptr(),
                    d as isize,
                    1,
                    c.as_ptr(),
                    1,
                    d as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(rayon::current_num_threads()),
                );
            }
        }
        self.merge(n as u64, &bmean, &bscatter);
        Ok(())
    }

    /// Adds a batch given by its moments: `n` rows, their mean (D) and centred scatter
    /// Σ (r − mean)(r − mean)ᵀ (D × D row-major, or its diagonal D for a diagonal accumulator),
    /// e.g. computed on a GPU. The same as pushing the rows.
    pub fn push_moments(&mut self, n: u64, mean: &[f64], scatter: &[f64]) -> Result<()> {
        if mean.len() != self.dim || scatter.len() != self.scatter.len() {
            return Err(QuantError::Shape {
                what: "batch moments (mean, scatter)".into(),
                expected: format!("({}, {})", self.dim, self.scatter.len()),
                found: format!("({}, {})", mean.len(), scatter.len()),
            });
        }
        if mean.iter().chain(scatter).any(|v| !v.is_finite()) {
            return Err(QuantError::param(
                "residuals",
                "batch moments are not finite",
            ));
        }
        if n > 0 {
            self.merge(n, mean, scatter);
        }
        Ok(())
    }

    /// Chan's merge of (count, mean, scatter) with a batch's.
    fn merge(&mut self, n: u64, bmean: &[f64], bscatter: &[f64]) {
        let d = self.dim;
        let (na, nb) = (self.count as f64, n as f64);
        let total = na + nb;
        let delta: Vec<f64> = bmean.iter().zip(&self.mean).map(|(b, a)| b - a).collect();
        let w = na * nb / total;
        if self.diagonal {
            for ((s, b), dl) in self.scatter.iter_mut().zip(bscatter).zip(&delta) {
                *s += b + dl * dl * w;
            }
        } else {
            for ((srow, brow), di) in self
                .scatter
                .chunks_mut(d)
                .zip(bscatter.chunks(d))
                .zip(&delta)
            {
                for ((s, b), dj) in srow.iter_mut().zip(brow).zip(&delta) {
                    *s += b + di * dj * w;
                }
            }
        }
        for (m, dl) in self.mean.iter_mut().zip(&delta) {
            *m += dl * nb / total;
        }
        self.count += n;
    }

    /// Mean and (population) covariance; the diagonal variant returns a diagonal matrix.
    pub fn finish(&self) -> Result<ResidualStats> {
        if self.count < 2 {
            return Err(QuantError::param(
                "residuals",
                format!("need at least 2 rows for a covariance, got {}", self.count),
            ));
        }
        let d = self.dim;
        let n = self.count as f64;
        let cov = if self.diagonal {
            Array2::from_diag(&Array1::from_iter(self.scatter.iter().map(|s| s / n)))
        } else {
            Array2::from_shape_fn((d, d), |(i, j)| self.scatter[i * d + j] / n)
        };
        Ok(ResidualStats {
            count: self.count,
            mean: Array1::from(self.mean.clone()),
            cov,
            diagonal: self.diagonal,
        })
    }
}

#[derive(Clone, Debug)]
pub struct ResidualStats {
    pub count: u64,
    pub mean: Array1<f64>,
    pub cov: Array2<f64>,
    pub diagonal: bool,
}

/// What NAQ samples from.
#[derive(Clone, Debug, PartialEq)]
pub enum NoiseModel {
    /// ξ = µ + L z, L lower-triangular with L Lᵀ = Σ (+ jitter·I).
    Full { mean: Vec<f32>, chol: Array2<f32> },
    /// ξ_i = µ_i + σ_i z_i.
    Diagonal { mean: Vec<f32>, std: Vec<f32> },
}

/// The noise model and the jitter that had to be added to Σ's diagonal (0 when Σ was positive
/// definite as it stood).
pub struct FittedNoise {
    pub model: NoiseModel,
    pub jitter: f64,
}

impl ResidualStats {
    pub fn noise_model(&self) -> FittedNoise {
        let mean: Vec<f32> = self.mean.iter().map(|&m| m as f32).collect();
        if self.diagonal {
            let std = self
                .cov
                .diag()
                .iter()
                .map(|&v| v.max(0.0).sqrt() as f32)
                .collect();
            return FittedNoise {
                model: NoiseModel::Diagonal { mean, std },
                jitter: 0.0,
            };
        }
        let (l, jitter) = cholesky_with_jitter(&self.cov);
        FittedNoise {
            model: NoiseModel::Full {
                mean,
                chol: l.mapv(|v| v as f32),
            },
            jitter,
        }
    }
}

impl NoiseModel {
    pub fn dim(&self) -> usize {
        match self {
            NoiseModel::Full { mean, .. } | NoiseModel::Diagonal { mean, .. } => mean.len(),
        }
    }

    pub fn mean(&self) -> &[f32] {
        match self {
            NoiseModel::Full { mean, .. } | NoiseModel::Diagonal { mean, .. } => mean,
        }
    }

    /// n samples, n × D.
    pub fn sample<R: Rng>(&self, n: usize, rng: &mut R) -> Array2<f32> {
        let d = self.dim();
        let z = Array2::from_shape_simple_fn((n, d), || rng.sample::<f32, _>(StandardNormal));
        let mut out = match self {
            NoiseModel::Full { chol, .. } => z.dot(&chol.t()),
            NoiseModel::Diagonal { std, .. } => {
                let s = ndarray::ArrayView1::from(std.as_slice());
                z * s
            }
        };
        out += &ndarray::ArrayView1::from(self.mean());
        out
    }
}

/// Lower Cholesky factor of a symmetric matrix, or None when it is not positive definite.
pub fn cholesky(a: &Array2<f64>) -> Option<Array2<f64>> {
    let n = a.nrows();
    let mut l = Array2::<f64>::zeros((n, n));
    for j in 0..n {
        let mut s = a[[j, j]];
        for k in 0..j {
            s -= l[[j, k]] * l[[j, k]];
        }
        if s <= 0.0 || !s.is_finite() {
            return None;
        }
        let ljj = s.sqrt();
        l[[j, j]] = ljj;
        for i in j + 1..n {
            let mut s = a[[i, j]];
            for k in 0..j {
                s -= l[[i, k]] * l[[j, k]];
            }
            l[[i, j]] = s / ljj;
        }
    }
    Some(l)
}

/// Cholesky of Σ, adding jitter·I (starting at 1e-6 of the mean variance, ×10 per try) until it
/// succeeds. Residual covariances are often singular (a coordinate the codebook reproduces exactly).
pub fn cholesky_with_jitter(a: &Array2<f64>) -> (Array2<f64>, f64) {
    if let Some(l) = cholesky(a) {
        return (l, 0.0);
    }
    let n = a.nrows().max(1);
    let scale = (a.diag().sum() / n as f64).abs().max(1e-12);
    let mut jitter = scale * 1e-6;
    for _ in 0..12 {
        let mut b = a.clone();
        b.diag_mut().iter_mut().for_each(|v| *v += jitter);
        if let Some(l) = cholesky(&b) {
            return (l, jitter);
        }
        jitter *= 10.0;
    }
    // Jitter of 10⁵ times the mean variance still failed (non-finite entries): keep the diagonal.
    let diag = a.diag().mapv(|v| {
        if v.is_finite() {
            v.max(0.0).sqrt()
        } else {
            0.0
        }
    });
    (Array2::from_diag(&diag), jitter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Moments computed elsewhere (the trainer computes them on the GPU) merge exactly as the
    /// rows they describe; wrong sizes and non-finite moments are refused.
    #[test]
    fn pushed_moments_equal_pushed_rows() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        let x = Array2::from_shape_simple_fn((300, 4), || rng.random_range(-1.0f32..2.0));
        for kind in [NoiseKind::Full, NoiseKind::Diagonal] {
            let (mut rows, mut moments) = (
                ResidualAccumulator::new(4, kind),
                ResidualAccumulator::new(4, kind),
            );
            for chunk in x.axis_chunks_iter(ndarray::Axis(0), 70) {
                rows.push(&chunk).unwrap();
                let c = chunk.mapv(|v| v as f64);
                let mean = c.mean_axis(ndarray::Axis(0)).unwrap();
                let centred = &c - &mean;
                let scatter: Vec<f64> = match kind {
                    NoiseKind::Full => centred.t().dot(&centred).iter().copied().collect(),
                    NoiseKind::Diagonal => {
                        centred.mapv(|v| v * v).sum_axis(ndarray::Axis(0)).to_vec()
                    }
                };
                moments
                    .push_moments(chunk.nrows() as u64, mean.as_slice().unwrap(), &scatter)
                    .unwrap();
            }
            let (a, b) = (rows.finish().unwrap(), moments.finish().unwrap());
            assert_eq!(a.count, b.count);
            for (u, v) in a
                .cov
                .iter()
                .zip(b.cov.iter())
                .chain(a.mean.iter().zip(b.mean.iter()))
            {
                assert!((u - v).abs() < 1e-12, "{u} vs {v}");
            }
        }
        let mut acc = ResidualAccumulator::new(4, NoiseKind::Full);
        assert!(acc.push_moments(3, &[0.0; 4], &[0.0; 4]).is_err());
        assert!(acc
            .push_moments(3, &[f64::NAN, 0.0, 0.0, 0.0], &[0.0; 16])
            .is_err());
    }

    #[test]
    fn streamed_equals_two_pass() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let x = Array2::from_shape_simple_fn((500, 6), || rng.random_range(-2.0f32..3.0) + 100.0);
        let mut acc = ResidualAccumulator::new(6, NoiseKind::Full);
        for chunk in x.axis_chunks_iter(ndarray::Axis(0), 77) {
            acc.push(&chunk).unwrap();
        }
        let st = acc.finish().unwrap();
        let xf = x.mapv(|v| v as f64);
        let mean = xf.mean_axis(ndarray::Axis(0)).unwrap();
        let c = &xf - &mean;
        let cov = c.t().dot(&c) / 500.0;
        for (a, b) in st.mean.iter().zip(mean.iter()) {
            assert!((a - b).abs() < 1e-9);
        }
        for (a, b) in st.cov.iter().zip(cov.iter()) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
        let mut dacc = ResidualAccumulator::new(6, NoiseKind::Diagonal);
        dacc.push(&x.view()).unwrap();
        let ds = dacc.finish().unwrap();
        for i in 0..6 {
            assert!((ds.cov[[i, i]] - cov[[i, i]]).abs() < 1e-9);
        }
    }

    #[test]
    fn sampler_reproduces_covariance() {
        let cov = ndarray::arr2(&[[2.0, 0.6, 0.0], [0.6, 1.0, -0.3], [0.0, -0.3, 0.5]]);
        let st = ResidualStats {
            count: 10,
            mean: ndarray::arr1(&[1.0, -1.0, 0.5]),
            cov: cov.clone(),
            diagonal: false,
        };
        let fitted = st.noise_model();
        assert_eq!(fitted.jitter, 0.0);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let s = fitted.model.sample(200_000, &mut rng).mapv(|v| v as f64);
        let m = s.mean_axis(ndarray::Axis(0)).unwrap();
        let c = &s - &m;
        let emp = c.t().dot(&c) / s.nrows() as f64;
        for (a, b) in emp.iter().zip(cov.iter()) {
            assert!((a - b).abs() < 0.03, "{a} vs {b}");
        }
        assert!((m[0] - 1.0).abs() < 0.02 && (m[1] + 1.0).abs() < 0.02);
    }

    #[test]
    fn singular_covariance_gets_jitter() {
        // Second coordinate is exactly twice the first: rank 1.
        let x = Array2::from_shape_fn((100, 2), |(i, j)| (i as f32) * (j as f32 + 1.0));
        let mut acc = ResidualAccumulator::new(2, NoiseKind::Full);
        acc.push(&x.view()).unwrap();
        let f = acc.finish().unwrap().noise_model();
        assert!(f.jitter > 0.0);
        assert!(acc.push(&Array2::<f32>::zeros((3, 4)).view()).is_err());
    }
}
