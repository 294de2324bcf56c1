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
    m: Vec<Tensor>,
    v: Vec<Tensor>,
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
        let m = params.iter().map(|(_, p)| p.zeros_like()).collect();
        let v = params.iter().map(|(_, p)| p.zeros_like()).collect();
        AdamW {
            cfg,
            params,
            m,
            v,
            step: 0,
        }
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

    /// One update from the current gradients; returns the gradient norm before clipping.
    pub fn step(&mut self) -> f64 {
        let lr = self.lr_at(self.step);
        self.step += 1;
        let c = self.cfg.clone();
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
            let sq: f64 = grads
                .iter()
                .filter(|g| g.defined())
                .map(|g| {
                    g.to_kind(Kind::Float)
                        .square()
                        .sum(Kind::Float)
                        .double_value(&[])
                })
                .sum();
            let norm = sq.sqrt();
            let scale = if c.clip_norm > 0.0 && norm > c.clip_norm {
                c.clip_norm / (norm + 1e-6)
            } else {
                1.0
            };
            let t = self.step as i32;
            let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
            for (i, (_, p)) in self.params.iter_mut().enumerate() {
                let g = &grads[i];
                if !g.defined() {
                    continue;
                }
                let g = g * scale;
                let m = &self.m[i] * c.beta1 + &g * (1.0 - c.beta1);
                let v = &self.v[i] * c.beta2 + g.square() * (1.0 - c.beta2);
                let update = (&m / bc1) / ((&v / bc2).sqrt() + c.eps) + &*p * c.weight_decay;
                let _ = p.g_sub_(&(update * lr));
                self.m[i] = m;
                self.v[i] = v;
            }
            norm
        })
    }

    /// Moments as named tensors (`adamw.m.NAME`, `adamw.v.NAME`) for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (n, _)) in self.params.iter().enumerate() {
            out.push((format!("adamw.m.{n}"), self.m[i].shallow_clone()));
            out.push((format!("adamw.v.{n}"), self.v[i].shallow_clone()));
        }
        out
    }

    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        step: usize,
    ) -> Result<(), String> {
        for (i, (n, p)) in self.params.iter().enumerate() {
            for (which, dst) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("adamw.{which}.{n}");
                let src = tensors
                    .get(&key)
                    .ok_or_else(|| format!("checkpoint lacks {key}"))?;
                *dst = src.to_device(p.device()).to_kind(p.kind());
            }
        }
        self.step = step;
        Ok(())
    }
}
