//! Grouped vector quantisation on libtorch (ASTRA.md §2–3): per block a [G, K, D/G] codebook kept
//! as a buffer, nearest codewords by matmul + argmin on the model's device, exponential-moving-
//! average updates with Laplace smoothing and dead-code restart, a commitment loss, the
//! straight-through estimator, and Noise-Augmented Quantization in training.

use astra_quant::{BlockQuantizer, GroupedCodebook, NoiseModel};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VqConfig {
    /// EMA decay of the codebook statistics.
    pub decay: f64,
    /// Laplace smoothing of the code counts.
    pub epsilon: f64,
    /// Codes whose EMA count falls below this fraction of the mean count per code (n / K) are
    /// restarted on a random current input (a fraction, so its meaning does not depend on the
    /// batch size).
    pub dead_threshold: f64,
    /// NAQ strength λ (0 = off).
    pub noise_lambda: f64,
}

impl Default for VqConfig {
    fn default() -> Self {
        VqConfig {
            decay: 0.99,
            epsilon: 1e-5,
            dead_threshold: 1e-3,
            noise_lambda: 1.0,
        }
    }
}

/// One block's quantizer.
pub struct GroupedVq {
    /// [G, K, D/G].
    pub codebook: Tensor,
    /// [G, K]: before the first update, each codeword's share of the calibration rows (uniform
    /// when the file has none); after it, the EMA of the per-batch counts.
    ema_count: Tensor,
    ema_sum: Tensor,
    /// Whether `ema_count` holds counts yet (false: still the calibration shares).
    ema_started: bool,
    /// NAQ noise: mean [D] and a factor [D, D] (Cholesky) or std [D] (diagonal).
    noise: Option<(Tensor, Tensor, bool)>,
    pub cfg: VqConfig,
    /// Data parallel: the ranks whose batches the EMA statistics sum over (None: this process
    /// alone).
    ranks: Option<std::sync::Arc<dyn crate::train::parallel::Collective>>,
}

/// What one quantisation pass produced.
pub struct Quantized {
    /// Value X̃ (codewords, plus noise in training) with gradients flowing to X (STE).
    pub value: Tensor,
    /// ‖X − sg(X̂)‖², mean over elements.
    pub commitment: Tensor,
    /// [.., G] code indices.
    pub indices: Tensor,
}

impl GroupedVq {
    pub fn from_quantizer(q: &BlockQuantizer, cfg: VqConfig, device: Device) -> Self {
        let cb = &q.codebook;
        let codebook = Tensor::from_slice(&cb.to_flat())
            .view([cb.groups() as i64, cb.k() as i64, cb.sub_dim() as i64])
            .to_device(device);
        let noise = q.noise.as_ref().map(|n| match n {
            NoiseModel::Full { mean, chol } => (
                Tensor::from_slice(mean).to_device(device),
                Tensor::from_slice(chol.as_slice().expect("standard layout"))
                    .view([chol.nrows() as i64, chol.ncols() as i64])
                    .to_device(device),
                false,
            ),
            NoiseModel::Diagonal { mean, std } => (
                Tensor::from_slice(mean).to_device(device),
                Tensor::from_slice(std).to_device(device),
                true,
            ),
        });
        let (g, k) = (cb.groups() as i64, cb.k() as i64);
        let ema_count = match &q.usage {
            Some(u) => Tensor::from_slice(u).view([g, k]).to_device(device),
            None => Tensor::full([g, k], 1.0 / k as f64, (Kind::Float, device)),
        };
        let ema_sum = codebook.copy();
        GroupedVq {
            codebook,
            ema_count,
            ema_sum,
            ema_started: false,
            noise,
            cfg,
            ranks: None,
        }
    }

    pub fn groups(&self) -> i64 {
        self.codebook.size()[0]
    }

    /// Whether NAQ noise can be drawn (the codebook file carried residual statistics).
    pub fn has_noise_model(&self) -> bool {
        self.noise.is_some()
    }
    pub fn k(&self) -> i64 {
        self.codebook.size()[1]
    }
    pub fn dim(&self) -> i64 {
        self.codebook.size()[0] * self.codebook.size()[2]
    }

    /// [.., D] → [.., G] nearest-codeword indices (int64), computed in fp32 even under autocast.
    pub fn encode(&self, x: &Tensor) -> Tensor {
        crate::precision::without_autocast(|| self.encode_fp32(x))
    }

    fn encode_fp32(&self, x: &Tensor) -> Tensor {
        let shape = x.size();
        let (g, w) = (self.groups(), self.codebook.size()[2]);
        let rows = x.detach().to_kind(Kind::Float).reshape([-1, g, w]);
        let idx = self.nearest(&rows);
        let mut out_shape = shape[..shape.len() - 1].to_vec();
        out_shape.push(g);
        idx.reshape(out_shape)
    }

    /// Rows [M, G, w] (fp32) → [M, G] nearest-codeword indices: the fused kernel on CUDA where
    /// the batch fills the device, the ATen search elsewhere (or where the kernels are off).
    fn nearest(&self, rows: &Tensor) -> Tensor {
        nearest_codewords(rows, &self.codebook.to_kind(Kind::Float))
    }
    /// [.., G] indices → [.., D] codewords.
    pub fn decode(&self, idx: &Tensor) -> Tensor {
        decode_from(&self.codebook, idx)
    }

    /// Quantizes X. In training: NAQ noise on the codewords, the EMA codebook update, and the
    /// straight-through estimator; in evaluation X̂ itself (the value is still X + sg(X̂ − X)).
    pub fn quantize(&mut self, x: &Tensor, train: bool) -> Quantized {
        crate::precision::without_autocast(|| self.quantize_fp32(x, train))
    }

    fn quantize_fp32(&mut self, x: &Tensor, train: bool) -> Quantized {
        if let Some(q) = self.quantize_in_place(x, train) {
            return q;
        }
        // The content rows are usually a strided view of the block's input: copied once here
        // for the search and the EMA statistics, which would each copy them otherwise.
        let rows = x.detach().to_kind(Kind::Float).contiguous();
        let indices = self.encode(&rows);
        let z = if train {
            self.draw_noise(&x.size())
        } else {
            None
        };
        let (x_hat, offset) = self.target_offset(&self.codebook, x, &indices, z.as_ref());
        let commitment = commitment_loss(x, &x_hat.detach());
        if train {
            tch::no_grad(|| self.ema_update(&rows, &indices));
        }
        Quantized {
            value: x + offset.detach(),
            commitment,
            indices,
        }
    }

    /// The quantization on CUDA, where [`crate::cuda::target`]'s kernel applies (fp32 X, the EMA
    /// codebook, no noise or diagonal noise): one copy of X, whose backward is the identity, is
    /// what the search and the EMA statistics read; then the kernel overwrites it with the value
    /// X + sg((X̂ + λ·ξ) − X), rounded as the ATen path's `x + offset`, so the copy carries the
    /// straight-through gradient to X. The ATen path's offset tensor and its add (four passes
    /// over [M, D] fp32) are gone. The same random draws in the same order as the ATen path
    /// (z, then the EMA's restart picks), and the codewords of the search's codebook (the one
    /// before the EMA update).
    fn quantize_in_place(&mut self, x: &Tensor, train: bool) -> Option<Quantized> {
        let cb = &self.codebook;
        let full_noise = train && matches!(self.noise, Some((_, _, false)));
        if cb.kind() != Kind::Float || cb.requires_grad() || x.kind() != Kind::Float || full_noise {
            return None;
        }
        let kern = crate::cuda::kernels(x.device())?;
        let value = fresh_copy(x);
        let rows = value.detach();
        let indices = self.encode(&rows);
        let z = if train {
            self.draw_noise(&x.size())
        } else {
            None
        };
        let codebook = self.codebook.shallow_clone();
        if train {
            tch::no_grad(|| self.ema_update(&rows, &indices));
        }
        let idx = indices.reshape([-1, self.groups()]).contiguous();
        let written = crate::cuda::target::codeword_value_in_place(
            &kern,
            &rows,
            &idx,
            &codebook.contiguous(),
            self.diagonal_noise(z.as_ref()).as_ref(),
        );
        let x_hat = match crate::cuda::or_aten(written) {
            Some(x_hat) => x_hat.reshape(x.size()),
            None => {
                // The kernel did not launch: the ATen expressions, written into the copy.
                let (x_hat, offset) = self.target_offset(&codebook, &rows, &indices, z.as_ref());
                let _ = rows.shallow_clone().g_add_(&offset);
                x_hat
            }
        };
        Some(Quantized {
            value,
            commitment: commitment_loss(x, &x_hat),
            indices,
        })
    }

    /// The codewords X̂ of `indices` in `codebook` and the straight-through offset
    /// (X̂ + λ·ξ) − X, ξ the NAQ noise formed from the standard normal draw `z` (none without
    /// it): one kernel on CUDA ([`crate::cuda::target`], equal bit for bit), else ATen ops.
    fn target_offset(
        &self,
        codebook: &Tensor,
        x: &Tensor,
        indices: &Tensor,
        z: Option<&Tensor>,
    ) -> (Tensor, Tensor) {
        if let Some(out) = self.target_offset_kernel(codebook, x, indices, z) {
            return out;
        }
        let x_hat = decode_from(codebook, indices).to_kind(x.kind());
        let target = match z {
            Some(z) => {
                let noise = self.noise_from(z).reshape(x.size()).to_kind(x.kind());
                &x_hat + noise * self.cfg.noise_lambda
            }
            None => x_hat.shallow_clone(),
        };
        let offset = target - x;
        (x_hat, offset)
    }

    /// [`Self::target_offset`] as one kernel, where it applies: fp32 X, the EMA codebook (fp32,
    /// no gradient) and no noise or diagonal noise (a full covariance keeps the ATen matmul).
    fn target_offset_kernel(
        &self,
        codebook: &Tensor,
        x: &Tensor,
        indices: &Tensor,
        z: Option<&Tensor>,
    ) -> Option<(Tensor, Tensor)> {
        if codebook.kind() != Kind::Float || codebook.requires_grad() || x.kind() != Kind::Float {
            return None;
        }
        let k = crate::cuda::kernels(x.device())?;
        let noise = match z {
            None => None,
            Some(_) => Some(self.diagonal_noise(z)?),
        };
        let idx = indices.reshape([-1, self.groups()]).contiguous();
        let (x_hat, offset) = crate::cuda::or_aten(crate::cuda::target::codeword_target(
            &k,
            x,
            &idx,
            &codebook.contiguous(),
            noise.as_ref(),
        ))?;
        Some((x_hat.reshape(x.size()), offset.reshape(x.size())))
    }

    /// The kernels' form of the noise from draw `z`: None without a draw or with a full
    /// covariance (which the kernels do not take).
    fn diagonal_noise<'a>(
        &'a self,
        z: Option<&'a Tensor>,
    ) -> Option<crate::cuda::target::DiagonalNoise<'a>> {
        match (z, &self.noise) {
            (Some(z), Some((mean, std, true))) => Some(crate::cuda::target::DiagonalNoise {
                z,
                scale: std,
                shift: mean,
                lambda: self.cfg.noise_lambda,
            }),
            _ => None,
        }
    }

    /// NAQ noise of rows shaped `shape` (last dim D): None without a noise model or with λ = 0.
    pub(crate) fn sample_noise(&self, shape: &[i64]) -> Option<Tensor> {
        self.draw_noise(shape)
            .map(|z| self.noise_from(&z).reshape(shape))
    }

    /// The standard normal draw [M, D] behind NAQ noise for rows shaped `shape`.
    fn draw_noise(&self, shape: &[i64]) -> Option<Tensor> {
        if self.cfg.noise_lambda == 0.0 {
            return None;
        }
        let mean = &self.noise.as_ref()?.0;
        let d = mean.size()[0];
        Some(Tensor::randn(
            [shape.iter().product::<i64>() / d, d],
            (Kind::Float, mean.device()),
        ))
    }

    /// The noise ξ = µ + L·z of a standard normal draw z [M, D] (L the Cholesky factor, or σ
    /// elementwise for a diagonal model).
    fn noise_from(&self, z: &Tensor) -> Tensor {
        let (mean, factor, diagonal) = self.noise.as_ref().expect("drawn from a noise model");
        if *diagonal {
            z * factor + mean
        } else {
            z.matmul(&factor.transpose(0, 1)) + mean
        }
    }

    /// Data parallel: sum the EMA statistics over these ranks (and take rank 0's restarts).
    pub fn set_ranks(&mut self, ranks: std::sync::Arc<dyn crate::train::parallel::Collective>) {
        self.ranks = ranks.is_group().then_some(ranks);
    }

    /// Everything that must be equal on every rank, including whether the EMA has started (as
    /// a 0/1 tensor), for rank 0 to send at the start of a data-parallel run.
    pub fn replicated_state(&mut self) -> Vec<Tensor> {
        let mut v = vec![
            self.codebook.shallow_clone(),
            self.ema_count.shallow_clone(),
            self.ema_sum.shallow_clone(),
        ];
        if let Some((a, b, _)) = &self.noise {
            v.extend([a.shallow_clone(), b.shallow_clone()]);
        }
        v
    }

    pub fn ema_started(&self) -> bool {
        self.ema_started
    }

    pub fn set_ema_started(&mut self, started: bool) {
        self.ema_started = started;
    }

    /// The rank group's sum of `t` in place (a no-op without ranks). A failed collective leaves
    /// the ranks unable to agree: nothing can continue, so it panics with NCCL's message.
    fn sum_over_ranks(&self, t: &Tensor) {
        if let Some(r) = &self.ranks {
            r.all_reduce_sum(t).expect("codebook statistics all-reduce");
        }
    }

    pub(crate) fn ema_update(&mut self, x: &Tensor, indices: &Tensor) {
        let (g, k, w) = (self.groups(), self.k(), self.codebook.size()[2]);
        let rows = x.detach().to_kind(Kind::Float).reshape([-1, g, w]); // [M, G, w]
        let (counts, sums) = code_stats(&rows, &indices.reshape([-1, g]), k);
        let (counts, sums) = (counts.contiguous(), sums.contiguous());
        self.sum_over_ranks(&counts);
        self.sum_over_ranks(&sums);
        let flat = rows.transpose(0, 1); // [G, M, w]
        if !self.ema_started {
            // Start the statistics as if the calibration codebook had been averaged over batches
            // of this size with the calibration's code shares: the first update then moves it by
            // (1 − decay), not by a jump towards this one batch (of every rank).
            let m = match self.ranks {
                Some(_) => counts.get(0).sum(Kind::Double).double_value(&[]),
                None => rows.size()[0] as f64,
            };
            self.ema_count = &self.ema_count * m;
            self.ema_sum = self.codebook.to_kind(Kind::Float) * self.ema_count.unsqueeze(-1);
            self.ema_started = true;
        }
        // Drawn before either path, so both consume the generator alike.
        let pick = Tensor::randint(flat.size()[1], [g, k], (Kind::Int64, x.device()));
        if self.ranks.is_none() {
            if let Some((count, sum, codebook)) = self.ema_step_kernel(&counts, &sums, &rows, &pick)
            {
                self.ema_count = count;
                self.ema_sum = sum;
                self.codebook = codebook.to_kind(self.codebook.kind());
                return;
            }
        }
        let decay = self.cfg.decay;
        self.ema_count = &self.ema_count * decay + counts * (1.0 - decay);
        self.ema_sum = &self.ema_sum * decay + sums * (1.0 - decay);
        let n = self.ema_count.sum_dim_intlist(-1, true, Kind::Float);
        let eps = self.cfg.epsilon;
        let smoothed = (&self.ema_count + eps) / (&n + eps * k as f64) * &n;
        let new_cb = &self.ema_sum / smoothed.unsqueeze(-1);
        // Dead codes: restart on random inputs of this batch, so no codeword stays unused. The
        // threshold and the restarted count are relative to the mean count per code.
        let mean_count = &n / k as f64; // [G, 1]
        let dead = self
            .ema_count
            .lt_tensor(&(&mean_count * self.cfg.dead_threshold)); // [G, K]
        let fresh = flat
            .gather(1, &pick.unsqueeze(-1).expand([g, k, w], false), false)
            .contiguous();
        if let Some(r) = &self.ranks {
            // Restarts from rank 0's rows, so every rank keeps the same codebook.
            r.broadcast(&fresh).expect("codebook restart broadcast");
        }
        let dead3 = dead.unsqueeze(-1).expand([g, k, w], false);
        let updated = new_cb.where_self(&dead3.logical_not(), &fresh);
        let restart = mean_count.expand([g, k], false);
        self.ema_sum = self
            .ema_sum
            .where_self(&dead3.logical_not(), &(&fresh * restart.unsqueeze(-1)));
        self.ema_count = self.ema_count.where_self(&dead.logical_not(), &restart);
        self.codebook = updated.to_kind(self.codebook.kind());
    }

    /// The EMA step below as one CUDA kernel (one rank; the data-parallel path broadcasts rank 0's
    /// restart rows first and keeps ATen's ops): (ema_count, ema_sum, codebook), or None where the
    /// kernels do not run.
    fn ema_step_kernel(
        &self,
        counts: &Tensor,
        sums: &Tensor,
        rows: &Tensor,
        pick: &Tensor,
    ) -> Option<(Tensor, Tensor, Tensor)> {
        let kern = crate::cuda::kernels(rows.device())?;
        let cfg = crate::cuda::ema::EmaSettings {
            decay: self.cfg.decay,
            epsilon: self.cfg.epsilon,
            dead_threshold: self.cfg.dead_threshold,
        };
        crate::cuda::or_aten(crate::cuda::ema::ema_step(
            &kern,
            (counts, sums),
            (&self.ema_count.contiguous(), &self.ema_sum.contiguous()),
            &rows.contiguous(),
            pick,
            &cfg,
        ))
    }

    /// Code usage of indices [.., G]: (mean perplexity over groups, dead codes in total).
    pub fn usage(&self, indices: &Tensor) -> (f64, i64) {
        let (g, k) = (self.groups(), self.k());
        let offsets = Tensor::arange(g, (Kind::Int64, indices.device())) * k;
        let slot = (indices.reshape([-1, g]) + offsets.view([1, g])).reshape([-1]);
        let counts = slot
            .bincount::<Tensor>(None, g * k)
            .to_kind(Kind::Float)
            .view([g, k]);
        let p = &counts / counts.sum_dim_intlist(-1, true, Kind::Float);
        let ent = -(&p * (&p + 1e-12).log()).sum_dim_intlist(-1, false, Kind::Float);
        let ppl = ent.exp().mean(Kind::Float).double_value(&[]);
        let dead = counts.eq(0.0).sum(Kind::Int64).int64_value(&[]);
        (ppl, dead)
    }

    /// Everything the EMA updates, for checkpoints: `{prefix}.codebook`, `.ema_count`, `.ema_sum`.
    pub fn state(&self, prefix: &str) -> Vec<(String, Tensor)> {
        vec![
            (format!("{prefix}.codebook"), self.codebook.shallow_clone()),
            (
                format!("{prefix}.ema_count"),
                self.ema_count.shallow_clone(),
            ),
            (format!("{prefix}.ema_sum"), self.ema_sum.shallow_clone()),
        ]
        .into_iter()
        .chain(self.noise.iter().flat_map(|(mean, factor, _)| {
            [
                (format!("{prefix}.noise_mean"), mean.shallow_clone()),
                (format!("{prefix}.noise_factor"), factor.shallow_clone()),
            ]
        }))
        .collect()
    }

    pub fn load_state(
        &mut self,
        prefix: &str,
        tensors: &std::collections::BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let device = self.codebook.device();
        let get = |n: &str| {
            tensors
                .get(&format!("{prefix}.{n}"))
                .map(|t| t.to_device(device))
                .ok_or_else(|| TrainError::invalid("checkpoint", format!("lacks {prefix}.{n}")))
        };
        self.codebook = get("codebook")?;
        self.ema_count = get("ema_count")?;
        self.ema_sum = get("ema_sum")?;
        self.ema_started = true;
        // The refreshed NAQ statistics (checkpoints from before the refresh lack them and keep
        // the calibration's).
        if let (Some(noise), Ok(mean), Ok(factor)) =
            (self.noise.as_mut(), get("noise_mean"), get("noise_factor"))
        {
            noise.0 = mean;
            noise.1 = factor;
        }
        Ok(())
    }

    /// Re-estimates the NAQ noise model from the residual X − X̂ of `moments` (rows pushed under
    /// the current codebook), keeping its kind (full or diagonal): as EMA moves the codebook and
    /// fine-tuning moves X, the calibration's statistics stop describing the residual. No-op for a
    /// quantizer without a noise model.
    pub fn refresh_noise(&mut self, moments: &ResidualMoments) -> Result<()> {
        let Some((_, _, diagonal)) = self.noise else {
            return Ok(());
        };
        if moments.rows < 2.0 {
            return Ok(());
        }
        let device = self.codebook.device();
        let mean = &moments.sum / moments.rows;
        let cov = &moments.outer / moments.rows - mean.outer(&mean);
        let factor = if diagonal {
            cov.diagonal(0, 0, 1).clamp_min(0.0).sqrt()
        } else {
            // A little jitter keeps the factorisation defined for rank-deficient residuals.
            let d = cov.size()[0];
            let jitter = cov.diagonal(0, 0, 1).mean(Kind::Double).double_value(&[]) * 1e-6 + 1e-12;
            let eye = Tensor::eye(d, (Kind::Double, cov.device()));
            (cov + eye * jitter).linalg_cholesky(false)
        };
        self.noise = Some((
            mean.to_kind(Kind::Float).to_device(device).contiguous(),
            factor.to_kind(Kind::Float).to_device(device).contiguous(),
            diagonal,
        ));
        Ok(())
    }

    /// The current noise model in astra-quant form (for saving fine-tuned codebooks).
    pub fn to_noise_model(&self) -> Result<Option<NoiseModel>> {
        let Some((mean, factor, diagonal)) = &self.noise else {
            return Ok(None);
        };
        let vec = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(Vec::<f32>::try_from(
                t.to_kind(Kind::Float).to_device(Device::Cpu).reshape([-1]),
            )?)
        };
        Ok(Some(if *diagonal {
            NoiseModel::Diagonal {
                mean: vec(mean)?,
                std: vec(factor)?,
            }
        } else {
            let d = mean.size()[0] as usize;
            NoiseModel::Full {
                mean: vec(mean)?,
                chol: ndarray::Array2::from_shape_vec((d, d), vec(factor)?).expect("[D, D]"),
            }
        }))
    }

    /// [G·K] code shares: of the EMA counts once training has updated them, else those the
    /// quantizer started from (what [`BlockQuantizer::usage`] records in saved codebooks).
    pub fn to_usage(&self) -> Result<Vec<f32>> {
        let c = self.ema_count.to_kind(Kind::Double);
        let shares = &c / c.sum_dim_intlist(-1, true, Kind::Double).clamp_min(1e-30);
        Ok(Vec::<f32>::try_from(
            shares
                .to_kind(Kind::Float)
                .to_device(Device::Cpu)
                .reshape([-1]),
        )?)
    }

    /// Back to the astra-quant form (for saving fine-tuned codebooks).
    pub fn to_codebook(&self) -> Result<GroupedCodebook> {
        let (g, k, w) = (
            self.groups() as usize,
            self.k() as usize,
            self.codebook.size()[2] as usize,
        );
        let data = Vec::<f32>::try_from(
            self.codebook
                .to_kind(Kind::Float)
                .to_device(Device::Cpu)
                .reshape([-1]),
        )?;
        Ok(GroupedCodebook::from_flat(g, k, w, data)?)
    }
}

/// Running sums of the residual X − X̂ under a block's current codebook (f64, on the device):
/// what [`GroupedVq::refresh_noise`] turns into µ and Σ.
pub struct ResidualMoments {
    rows: f64,
    sum: Tensor,
    outer: Tensor,
}

impl ResidualMoments {
    pub fn new(dim: i64, device: Device) -> Self {
        ResidualMoments {
            rows: 0.0,
            sum: Tensor::zeros([dim], (Kind::Double, device)),
            outer: Tensor::zeros([dim, dim], (Kind::Double, device)),
        }
    }

    /// Adds the residuals of `x` [.., D] under `vq`'s current codebook.
    pub fn push(&mut self, vq: &GroupedVq, x: &Tensor) {
        let d = *x.size().last().expect("[.., D]");
        let x = x.to_kind(Kind::Float).reshape([-1, d]);
        let r = (&x - vq.decode(&vq.encode(&x))).to_kind(Kind::Double);
        self.rows += r.size()[0] as f64;
        self.sum += r.sum_dim_intlist(0, false, Kind::Double);
        self.outer += r.transpose(0, 1).matmul(&r);
    }

    /// Data parallel: every rank's sums ← the sums over all ranks (each pushed its share of the
    /// sample), so each rank's refresh sees the whole sample.
    pub fn all_reduce(&mut self, comm: &dyn crate::train::parallel::Collective) -> Result<()> {
        if !comm.is_group() {
            return Ok(());
        }
        let rows = Tensor::from_slice(&[self.rows]).to_device(self.sum.device());
        tch::no_grad(|| -> Result<()> {
            comm.all_reduce_sum(&rows)?;
            comm.all_reduce_sum(&self.sum)?;
            comm.all_reduce_sum(&self.outer)
        })?;
        self.rows = rows.double_value(&[0]);
        Ok(())
    }
}

/// One quantizer per block of a codebook file, on `device`.
pub fn quantizers_of(
    file: &astra_quant::CodebookFile,
    cfg: &VqConfig,
    device: Device,
) -> Vec<GroupedVq> {
    file.blocks
        .iter()
        .map(|b| GroupedVq::from_quantizer(b, cfg.clone(), device))
        .collect()
}

/// Checks that a codebook file fits a model of `layers` blocks of width `hidden`.
/// Checks a codebook file against a model's quantizers (`Model::quantizers`: one per block, or
/// two for Llama's keys and values) and their width.
pub fn check_codebooks(
    file: &astra_quant::CodebookFile,
    quantizers: i64,
    width: i64,
) -> Result<()> {
    if file.blocks.len() as i64 != quantizers {
        return Err(TrainError::invalid(
            "codebooks",
            format!(
                "file has {} blocks of codewords, the model has {quantizers} quantizers",
                file.blocks.len()
            ),
        ));
    }
    let d = file.blocks[0].codebook.dim() as i64;
    if d != width {
        return Err(TrainError::invalid(
            "codebooks",
            format!("codeword width D = {d}, the model quantizes vectors of width {width}"),
        ));
    }
    Ok(())
}

/// The commitment loss mean((X − X̂)²) (fp32), X̂ given without gradient. For fp32 X as ATen's
/// mse_loss: one pass forward and one backward (the difference, its square and their gradients
/// as separate ops take five); other kinds accumulate in fp32 as before.
fn commitment_loss(x: &Tensor, x_hat: &Tensor) -> Tensor {
    if x.kind() == Kind::Float && x_hat.kind() == Kind::Float {
        x.mse_loss(x_hat, tch::Reduction::Mean)
    } else {
        (x - x_hat).square().mean(Kind::Float)
    }
}

/// A copy of `x` in fresh contiguous memory whose backward is the identity (never `x` itself,
/// which a kernel writing into the copy must not touch).
fn fresh_copy(x: &Tensor) -> Tensor {
    if x.is_contiguous() {
        x.internal_to_copy((x.kind(), x.device()), false)
    } else {
        x.contiguous()
    }
}

/// [.., G] indices → [.., D] codewords of `codebook` [G, K, w].
fn decode_from(codebook: &Tensor, idx: &Tensor) -> Tensor {
    let shape = idx.size();
    let (g, k, w) = (codebook.size()[0], codebook.size()[1], codebook.size()[2]);
    let mut out_shape = shape[..shape.len() - 1].to_vec();
    out_shape.push(g * w);
    if let Some(rows) = decode_kernel(codebook, idx) {
        return rows.reshape(out_shape);
    }
    let offsets = Tensor::arange(g, (Kind::Int64, idx.device())) * k;
    let flat_idx = (idx.reshape([-1, g]) + offsets.view([1, g])).reshape([-1]);
    let rows = codebook.reshape([g * k, w]).index_select(0, &flat_idx);
    rows.reshape(out_shape)
}

/// The decode as one CUDA kernel, where it applies: an fp32 codebook that needs no gradient (the
/// EMA codebook; a learned one keeps ATen's differentiable index_select).
fn decode_kernel(cb: &Tensor, idx: &Tensor) -> Option<Tensor> {
    if cb.kind() != Kind::Float || cb.requires_grad() || idx.kind() != Kind::Int64 {
        return None;
    }
    let k = crate::cuda::kernels(idx.device())?;
    let idx = idx.reshape([-1, cb.size()[0]]).contiguous();
    crate::cuda::or_aten(crate::cuda::nearest::gather_codewords(
        &k,
        &cb.contiguous(),
        &idx,
    ))
}

/// Rows [M, G, w] and codebook [G, K, w] (fp32) → [M, G] nearest-codeword indices: the fused
/// kernel on CUDA where the batch fills the device, [`nearest_aten`] elsewhere (or where the
/// kernels are off). Every exact search of the trainer goes through here.
pub fn nearest_codewords(rows: &Tensor, codebook: &Tensor) -> Tensor {
    let (m, g, w) = (rows.size()[0], rows.size()[1], rows.size()[2]);
    let codes = codebook.size()[1];
    if let Some(k) = crate::cuda::kernels(rows.device())
        .filter(|k| crate::cuda::nearest::fills_device(k, m, g, w, codes))
    {
        let idx =
            crate::cuda::nearest::nearest_codeword(&k, &rows.contiguous(), &codebook.contiguous());
        if let Some(idx) = crate::cuda::or_aten(idx) {
            return idx;
        }
    }
    nearest_aten(rows, codebook)
}

/// The ATen nearest-codeword search: rows [M, G, w] and codebook [G, K, w] (fp32) → [M, G].
pub fn nearest_aten(rows: &Tensor, codebook: &Tensor) -> Tensor {
    let (g, k) = (codebook.size()[0], codebook.size()[1]);
    let c_norm = codebook
        .square()
        .sum_dim_intlist(-1, false, Kind::Float)
        .view([g, 1, k]);
    // ‖c‖² − 2·x·c in one fused pass: the [G, M, K] tile is the largest tensor here.
    c_norm
        .baddbmm(&rows.transpose(0, 1), &codebook.transpose(1, 2), 1.0, -2.0)
        .argmin(-1, false) // [G, M]
        .transpose(0, 1)
}

/// Per-code counts [G, K] and sums [G, K, w] of rows [M, G, w] (fp32) under indices [M, G]: one
/// fused scatter on CUDA, two index_adds elsewhere.
fn code_stats(rows: &Tensor, indices: &Tensor, k: i64) -> (Tensor, Tensor) {
    if let Some(kern) = crate::cuda::kernels(rows.device()) {
        let stats =
            crate::cuda::ema::code_stats(&kern, &rows.contiguous(), &indices.contiguous(), k);
        if let Some(stats) = crate::cuda::or_aten(stats) {
            return stats;
        }
    }
    code_stats_aten(rows, indices, k)
}

/// The ATen statistics: scatter-adds, not one-hot matrices (a [G, M, K] one-hot is gigabytes at
/// ViT-B scale).
pub fn code_stats_aten(rows: &Tensor, indices: &Tensor, k: i64) -> (Tensor, Tensor) {
    let (g, w) = (rows.size()[1], rows.size()[2]);
    let dev = rows.device();
    let offsets = Tensor::arange(g, (Kind::Int64, dev)) * k;
    let slot = (indices + offsets.view([1, g])).reshape([-1]); // [M·G] in 0..G·K
    let counts = Tensor::zeros([g * k], (Kind::Float, dev))
        .index_add(
            0,
            &slot,
            &Tensor::ones([slot.size()[0]], (Kind::Float, dev)),
        )
        .view([g, k]);
    let sums = Tensor::zeros([g * k, w], (Kind::Float, dev))
        .index_add(0, &slot, &rows.reshape([-1, w]))
        .view([g, k, w]);
    (counts, sums)
}

#[cfg(test)]
mod tests {
    use super::*;
    use astra_quant::{GroupedCodebook, NoiseModel};
    use ndarray::Array2;
    use tch::Device;

    #[test]
    fn commitment_loss_is_the_mean_squared_gap_with_its_gradient() {
        tch::manual_seed(4);
        for kind in [Kind::Float, Kind::Double] {
            let x = Tensor::randn([3, 5, 8], (kind, Device::Cpu)).set_requires_grad(true);
            let x_hat = Tensor::randn([3, 5, 8], (kind, Device::Cpu));
            let loss = commitment_loss(&x, &x_hat);
            assert_eq!(loss.kind(), Kind::Float, "{kind:?}");
            let expected = (&x - &x_hat).square().mean(Kind::Float);
            let gap = (&loss - &expected).abs().double_value(&[]);
            assert!(gap < 1e-6, "{kind:?}: {gap}");
            let g = Tensor::run_backward(&[loss], &[&x], false, false);
            let want = (&x - &x_hat) * (2.0 / x.numel() as f64);
            let gap = (&g[0] - want.to_kind(g[0].kind()))
                .abs()
                .max()
                .double_value(&[]);
            assert!(gap < 1e-7, "{kind:?} gradient: {gap}");
        }
    }

    /// A G-group codebook of K random codewords for D-wide rows, optionally with a noise model.
    fn quantizer(g: usize, k: usize, d: usize, noise: Option<NoiseModel>) -> BlockQuantizer {
        tch::manual_seed(5);
        let flat =
            Vec::<f32>::try_from(Tensor::randn([(k * d) as i64], tch::kind::FLOAT_CPU)).unwrap();
        BlockQuantizer {
            usage: None,
            codebook: GroupedCodebook::from_flat(g, k, d / g, flat).unwrap(),
            noise,
        }
    }

    #[test]
    fn libtorch_search_equals_astra_quants() {
        let q = quantizer(4, 32, 16, None);
        let vq = GroupedVq::from_quantizer(&q, VqConfig::default(), Device::Cpu);
        let x = Tensor::randn([300, 16], tch::kind::FLOAT_CPU);
        let ours = Vec::<i64>::try_from(vq.encode(&x).reshape([-1])).unwrap();
        let rows =
            Array2::from_shape_vec((300, 16), Vec::<f32>::try_from(x.reshape([-1])).unwrap())
                .unwrap();
        let theirs: Vec<i64> = q
            .codebook
            .encode(rows.view())
            .unwrap()
            .iter()
            .map(|&v| v as i64)
            .collect();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn the_straight_through_estimator_passes_gradients_to_the_input() {
        let q = quantizer(2, 16, 8, None);
        let mut vq = GroupedVq::from_quantizer(&q, VqConfig::default(), Device::Cpu);
        let x = Tensor::randn([5, 8], tch::kind::FLOAT_CPU).set_requires_grad(true);
        let out = vq.quantize(&x, false);
        // The value is the codewords...
        let codewords = vq.decode(&out.indices);
        assert!(f64::try_from((&out.value - &codewords).abs().max()).unwrap() < 1e-6);
        // ...and the gradient reaches X through it (identity), where a plain lookup has none.
        (&out.value * 3.0).sum(Kind::Float).backward();
        let grad = x.grad();
        assert!(f64::try_from((&grad - 3.0).abs().max()).unwrap() < 1e-6);
        assert!(!codewords.requires_grad());
    }

    #[test]
    fn evaluation_freezes_the_codebook_and_draws_no_noise() {
        let noise = NoiseModel::Diagonal {
            mean: vec![0.5; 8],
            std: vec![1.0; 8],
        };
        let q = quantizer(2, 16, 8, Some(noise));
        let mut vq = GroupedVq::from_quantizer(&q, VqConfig::default(), Device::Cpu);
        let before = vq.codebook.copy();
        let x = Tensor::randn([64, 8], tch::kind::FLOAT_CPU);
        let off = |v: &Tensor, w: &Tensor| f64::try_from((v - w).abs().max()).unwrap();
        let out = vq.quantize(&x, false);
        assert!(vq.codebook.equal(&before), "evaluation moved the codebook");
        assert!(
            off(&out.value, &vq.decode(&out.indices)) < 1e-5,
            "evaluation added noise"
        );
        // Training moves it and adds the noise (to the codewords it quantized with).
        let codewords = vq.decode(&vq.encode(&x));
        let out = vq.quantize(&x, true);
        assert!(!vq.codebook.equal(&before));
        assert!(off(&out.value, &codewords) > 0.1);
    }

    /// One EMA training step (no noise) on rows `x` [M, D]; returns the codebook before and after.
    fn one_update(q: &BlockQuantizer, x: &Tensor) -> (Tensor, Tensor, GroupedVq) {
        let cfg = VqConfig {
            noise_lambda: 0.0,
            ..Default::default()
        };
        let mut vq = GroupedVq::from_quantizer(q, cfg, Device::Cpu);
        let before = vq.codebook.copy();
        let _ = vq.quantize(x, true);
        (before, vq.codebook.copy(), vq)
    }

    fn rows(x: &Tensor) -> Array2<f32> {
        let d = x.size()[1] as usize;
        Array2::from_shape_vec(
            (x.size()[0] as usize, d),
            Vec::<f32>::try_from(x.reshape([-1])).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn ema_starts_from_the_calibration_counts_and_moves_by_one_minus_decay() {
        tch::manual_seed(11);
        let mut q = quantizer(1, 8, 4, None);
        let x = Tensor::randn([4000, 4], tch::kind::FLOAT_CPU);
        q.usage = Some(q.codebook.code_shares(rows(&x).view()).unwrap());
        let (before, after, _) = one_update(&q, &x);
        // With the calibration's shares equal to this batch's, each used codeword moves 1% of the
        // way to its batch mean: c' = 0.99 c + 0.01 mean (the old start, count 1, jumped most of
        // the way there).
        let idx: Vec<i64> = q
            .codebook
            .encode(rows(&x).view())
            .unwrap()
            .iter()
            .map(|&i| i as i64)
            .collect();
        let idx = Tensor::from_slice(&idx);
        for code in 0..8 {
            let members = x.index_select(0, &idx.eq(code).nonzero().reshape([-1]));
            if members.size()[0] == 0 {
                continue;
            }
            let mean = members.mean_dim(0, false, Kind::Float);
            let want = before.get(0).get(code) * 0.99 + mean * 0.01;
            let off = f64::try_from((after.get(0).get(code) - want).abs().max()).unwrap();
            assert!(off < 1e-4, "code {code}: {off}");
        }
        // A file without shares starts uniform: still a small step, not a jump.
        q.usage = None;
        let (before, after, _) = one_update(&q, &x);
        let step = f64::try_from((&after - &before).abs().max()).unwrap();
        assert!(step < 0.1, "{step}");
    }

    #[test]
    fn the_dead_code_threshold_does_not_depend_on_the_batch_size() {
        tch::manual_seed(12);
        let mut q = quantizer(1, 8, 4, None);
        // Code 7 lies far from every row: the calibration never used it.
        let mut flat = q.codebook.to_flat();
        flat[28..32].copy_from_slice(&[50.0; 4]);
        q.codebook = GroupedCodebook::from_flat(1, 8, 4, flat).unwrap();
        let small = Tensor::randn([64, 4], tch::kind::FLOAT_CPU);
        q.usage = Some(q.codebook.code_shares(rows(&small).view()).unwrap());
        let unused: Vec<i64> = (0..8)
            .filter(|&c| q.usage.as_ref().unwrap()[c as usize] == 0.0)
            .collect();
        assert!(unused.contains(&7));
        for x in [small.shallow_clone(), small.repeat([100, 1])] {
            let (before, after, _) = one_update(&q, &x);
            let restarted: Vec<i64> = (0..8)
                .filter(|&c| {
                    f64::try_from((after.get(0).get(c) - before.get(0).get(c)).abs().max()).unwrap()
                        > 1.0
                })
                .collect();
            assert_eq!(restarted, unused, "batch of {}", x.size()[0]);
            assert!(f64::try_from(after.get(0).get(7).abs().max()).unwrap() < 10.0);
        }
    }

    #[test]
    fn the_noise_sampler_reproduces_the_residual_covariance() {
        // Σ = L Lᵀ with L lower-triangular, µ ≠ 0.
        let chol = ndarray::arr2(&[[1.0f32, 0.0, 0.0], [0.5, 0.8, 0.0], [-0.3, 0.2, 0.4]]);
        let mean = vec![0.2f32, -0.1, 0.05];
        let noise = NoiseModel::Full {
            mean: mean.clone(),
            chol: chol.clone(),
        };
        let q = quantizer(1, 4, 3, Some(noise));
        let vq = GroupedVq::from_quantizer(&q, VqConfig::default(), Device::Cpu);
        tch::manual_seed(9);
        let n = 200_000i64;
        let xi = vq.sample_noise(&[n, 3]).unwrap().to_kind(Kind::Double);
        let mu = xi.mean_dim(0, false, Kind::Double);
        let c = &xi - &mu;
        let cov = c.transpose(0, 1).matmul(&c) / (n - 1) as f64;
        let l = Tensor::from_slice(chol.as_slice().unwrap())
            .view([3, 3])
            .to_kind(Kind::Double);
        let want = l.matmul(&l.transpose(0, 1));
        let mu_err = f64::try_from(
            (&mu - Tensor::from_slice(&mean).to_kind(Kind::Double))
                .abs()
                .max(),
        )
        .unwrap();
        let cov_err = f64::try_from((&cov - &want).abs().max()).unwrap();
        assert!(mu_err < 0.01, "mean off by {mu_err}");
        assert!(cov_err < 0.01, "covariance off by {cov_err}");
    }
}

#[cfg(test)]
mod refresh_tests {
    use super::*;
    use astra_quant::{GroupedCodebook, NoiseModel};
    use tch::Device;

    #[test]
    fn refreshed_noise_describes_the_current_residual() {
        tch::manual_seed(21);
        let flat = Vec::<f32>::try_from(Tensor::randn([8 * 4], tch::kind::FLOAT_CPU)).unwrap();
        for noise in [
            NoiseModel::Diagonal {
                mean: vec![9.0; 4],
                std: vec![9.0; 4],
            },
            NoiseModel::Full {
                mean: vec![9.0; 4],
                chol: ndarray::Array2::eye(4) * 9.0,
            },
        ] {
            let q = BlockQuantizer {
                usage: None,
                codebook: GroupedCodebook::from_flat(1, 8, 4, flat.clone()).unwrap(),
                noise: Some(noise),
            };
            let mut vq = GroupedVq::from_quantizer(&q, VqConfig::default(), Device::Cpu);
            let x = Tensor::randn([4000, 4], tch::kind::FLOAT_CPU) * 0.3 + 1.0;
            let mut m = ResidualMoments::new(4, Device::Cpu);
            m.push(&vq, &x.narrow(0, 0, 2000));
            m.push(&vq, &x.narrow(0, 2000, 2000));
            vq.refresh_noise(&m).unwrap();
            let r = &x - vq.decode(&vq.encode(&x));
            let want_mean = r.mean_dim(0, false, Kind::Float);
            let model = vq.to_noise_model().unwrap().unwrap();
            let (mean, spread) = match &model {
                NoiseModel::Diagonal { mean, std } => (mean.clone(), std[0]),
                NoiseModel::Full { mean, chol } => (mean.clone(), chol[[0, 0]]),
            };
            let got = Tensor::from_slice(&mean);
            assert!(f64::try_from((&got - &want_mean).abs().max()).unwrap() < 1e-4);
            // The calibration's σ = 9 is gone; the residual's own spread is well below 1.
            assert!(spread > 0.0 && spread < 1.0, "{spread}");
        }
    }

    #[test]
    fn moments_pushed_by_shares_and_all_reduced_equal_one_rank_s() {
        use crate::train::parallel::{shard, Collective, LocalGroup};
        tch::manual_seed(22);
        let flat = Vec::<f32>::try_from(Tensor::randn([8 * 4], tch::kind::FLOAT_CPU)).unwrap();
        let q = BlockQuantizer {
            usage: None,
            codebook: GroupedCodebook::from_flat(2, 8, 2, flat).unwrap(),
            noise: None,
        };
        let rows = Vec::<f32>::try_from(Tensor::randn([1001 * 4], tch::kind::FLOAT_CPU)).unwrap();
        // Tensors are not shared between threads: each rank builds its own from the same data.
        let moments_of = |rank: usize, world: usize, comm: Option<&dyn Collective>| {
            let vq = GroupedVq::from_quantizer(&q, VqConfig::default(), Device::Cpu);
            let x = Tensor::from_slice(&rows).view([1001, 4]);
            let (lo, len) = shard(1001, rank, world);
            let mut m = ResidualMoments::new(4, Device::Cpu);
            m.push(&vq, &x.narrow(0, lo, len));
            if let Some(c) = comm {
                m.all_reduce(c).unwrap();
            }
            (
                m.rows,
                Vec::<f64>::try_from(m.sum).unwrap(),
                Vec::<f64>::try_from(m.outer.reshape([-1])).unwrap(),
            )
        };
        let whole = moments_of(0, 1, None);
        let shares: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = LocalGroup::group(3)
                .into_iter()
                .map(|g| {
                    let f = &moments_of;
                    s.spawn(move || f(g.rank(), 3, Some(&g)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let gap = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(u, v)| (u - v).abs())
                .fold(0.0, f64::max)
        };
        for (rows, sum, outer) in &shares {
            assert_eq!(*rows, 1001.0);
            assert!(gap(sum, &whole.1) < 1e-9);
            assert!(gap(outer, &whole.2) < 1e-9);
        }
    }
}
