//! AdamW with a warm-up + cosine schedule and global-norm gradient clipping, written out (rather
//! than tch's optimizer) so its moments can be checkpointed and a resumed run continues exactly.

use std::collections::BTreeMap;

use tch::{nn, Kind, Tensor};

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub clip_norm: f64,
    /// Linear warm-up steps, then cosine decay to `min_lr_ratio · lr` at `total_steps`.
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub min_lr_ratio: f64,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    params: Vec<(String, Tensor)>,
    /// Moments of all parameters in one flat fp32 buffer each (in `params` order), so an update
    /// is a handful of kernels over one tensor rather than a dozen per parameter.
    m: Tensor,
    v: Tensor,
    pub step: usize,
}

impl AdamW {
    pub fn new(vs: &nn::VarStore, cfg: AdamWConfig) -> Self {
        let mut params: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let n: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
        let device = params.first().map_or(vs.device(), |(_, p)| p.device());
        let zeros = || Tensor::zeros([n], (Kind::Float, device));
        AdamW {
            cfg,
            params,
            m: zeros(),
            v: zeros(),
            step: 0,
        }
    }

    /// The slice of a flat buffer that belongs to each parameter, shaped like it.
    fn views<'a>(&'a self, flat: &'a Tensor) -> impl Iterator<Item = Tensor> + 'a {
        let mut offset = 0i64;
        self.params.iter().map(move |(_, p)| {
            let n = p.numel() as i64;
            let v = flat.narrow(0, offset, n).view(p.size().as_slice());
            offset += n;
            v
        })
    }

    pub fn lr_at(&self, step: usize) -> f64 {
        let c = &self.cfg;
        if step < c.warmup_steps {
            return c.lr * (step + 1) as f64 / c.warmup_steps as f64;
        }
        let span = c.total_steps.saturating_sub(c.warmup_steps).max(1) as f64;
        let progress = ((step - c.warmup_steps) as f64 / span).min(1.0);
        let min = c.lr * c.min_lr_ratio;
        min + (c.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// One update from the current gradients (global-norm clipped). Nothing here waits for the
    /// device: the norm stays a device scalar.
    pub fn step(&mut self) {
        let lr = self.lr_at(self.step);
        self.step += 1;
        let c = self.cfg.clone();
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
            let flat: Vec<Tensor> = grads
                .iter()
                .zip(&self.params)
                .map(|(g, (_, p))| {
                    if g.defined() {
                        g.reshape([-1]).to_kind(Kind::Float)
                    } else {
                        Tensor::zeros([p.numel() as i64], (Kind::Float, p.device()))
                    }
                })
                .collect();
            let mut g = Tensor::cat(&flat, 0);
            if c.clip_norm > 0.0 {
                let norm = g.square().sum(Kind::Float).sqrt();
                let scale = (c.clip_norm / (norm + 1e-6)).clamp_max(1.0);
                g *= scale;
            }
            let t = self.step as i32;
            let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
            let _ = self
                .m
                .g_mul_scalar_(c.beta1)
                .g_add_(&(&g * (1.0 - c.beta1)));
            let _ = self
                .v
                .g_mul_scalar_(c.beta2)
                .g_add_(&(g.square() * (1.0 - c.beta2)));
            let params: Vec<Tensor> = self
                .params
                .iter()
                .map(|(_, p)| p.detach().reshape([-1]).to_kind(Kind::Float))
                .collect();
            let update = ((&self.m / bc1) / ((&self.v / bc2).sqrt() + c.eps)
                + Tensor::cat(&params, 0) * c.weight_decay)
                * lr;
            for (((_, p), u), g) in self.params.iter().zip(self.views(&update)).zip(&grads) {
                if g.defined() {
                    let _ = p.detach().g_sub_(&u.to_kind(p.kind()));
                }
            }
        })
    }

    /// Moments as named tensors (`adamw.m.NAME`, `adamw.v.NAME`) for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (((n, _), m), v) in self
            .params
            .iter()
            .zip(self.views(&self.m))
            .zip(self.views(&self.v))
        {
            out.push((format!("adamw.m.{n}"), m));
            out.push((format!("adamw.v.{n}"), v));
        }
        out
    }

    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        step: usize,
    ) -> Result<(), String> {
        let views: Vec<(String, Tensor, Tensor)> = self
            .params
            .iter()
            .zip(self.views(&self.m))
            .zip(self.views(&self.v))
            .map(|(((n, _), m), v)| (n.clone(), m, v))
            .collect();
        for (n, m, v) in views {
            for (which, mut dst) in [("m", m), ("v", v)] {
                let key = format!("adamw.{which}.{n}");
                let src = tensors
                    .get(&key)
                    .ok_or_else(|| format!("checkpoint lacks {key}"))?;
                if src.size() != dst.size() {
                    return Err(format!(
                        "{key} has shape {:?}, expected {:?}",
                        src.size(),
                        dst.size()
                    ));
                }
                tch::no_grad(|| dst.copy_(src));
            }
        }
        self.step = step;
        Ok(())
    }
}
