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
    /// The parameters themselves as views of one flat fp32 buffer (when all are fp32 on one
    /// device), so the update is a few in-place kernels on it instead of several per parameter.
    flat: Option<Tensor>,
    /// The gradients as views of one flat fp32 buffer, from the first step on (when the
    /// parameters are flat and all have gradients): backward accumulates into the views in place,
    /// `zero_grad` is one kernel and a step needs no concatenation.
    grads: Option<Tensor>,
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
        let flat = params
            .iter()
            .all(|(_, p)| p.kind() == Kind::Float && p.device() == device)
            .then(|| {
                let flat = zeros();
                let mut offset = 0i64;
                for (_, p) in &mut params {
                    let k = p.numel() as i64;
                    let view = flat.narrow(0, offset, k).view(p.size().as_slice());
                    tch::no_grad(|| view.shallow_clone().copy_(p));
                    // Every handle of this parameter (the layers', the VarStore's) shares the
                    // TensorImpl, so all of them now read and write the flat buffer.
                    p.set_data(&view);
                    offset += k;
                }
                flat
            });
        AdamW {
            cfg,
            params,
            m: zeros(),
            v: zeros(),
            flat,
            grads: None,
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
        if let Some(g) = &mut self.grads {
            let _ = g.zero_();
            return;
        }
        for (_, p) in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// The moments' flat buffers (data parallel: rank 0's restored state goes to every rank).
    pub fn moment_buffers(&self) -> [Tensor; 2] {
        [self.m.shallow_clone(), self.v.shallow_clone()]
    }

    /// Applies `reduce` to all gradients as one flat fp32 buffer (data parallel: the all-reduce
    /// across ranks), so the step that follows reads the result.
    pub fn reduce_grads(
        &mut self,
        reduce: impl FnOnce(&Tensor) -> crate::error::Result<()>,
    ) -> crate::error::Result<()> {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
            let buffer = self.flat_grads(&grads);
            reduce(&buffer)?;
            if self.grads.is_none() {
                // A concatenation, not the gradients' storage: write the result back.
                for (g, v) in grads.iter().zip(self.views(&buffer)) {
                    if g.defined() {
                        g.shallow_clone().copy_(&v);
                    }
                }
            }
            Ok(())
        })
    }

    /// One update from the current gradients (global-norm clipped). Nothing here waits for the
    /// device: the norm stays a device scalar.
    pub fn step(&mut self) {
        let lr = self.lr_at(self.step);
        self.step += 1;
        let c = self.cfg.clone();
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self.params.iter().map(|(_, p)| p.grad()).collect();
            // A parameter without a gradient this step is left alone (as torch.optim.AdamW
            // does), which only the per-parameter path can do.
            let all_have_grads = grads.iter().all(|g| g.defined());
            let g = self.flat_grads(&grads);
            let scale = (c.clip_norm > 0.0).then(|| {
                let norm = g.square().sum(Kind::Float).sqrt();
                (c.clip_norm / (norm + 1e-6)).clamp_max(1.0)
            });
            let t = self.step as i32;
            let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
            if all_have_grads && self.fused_step(&g, scale.as_ref(), lr, (bc1, bc2)) {
                return;
            }
            let g = match &scale {
                Some(s) => &g * s,
                None => g,
            };
            let _ = self.m.lerp_(&g, 1.0 - c.beta1);
            let _ = self
                .v
                .g_mul_scalar_(c.beta2)
                .addcmul_(&g, &(&g * (1.0 - c.beta2)));
            let denom = (&self.v / bc2).sqrt() + c.eps;
            match &mut self.flat {
                // p ← p·(1 − lr·wd) − lr·m̂ / (√v̂ + ε), in place on the flat buffer.
                Some(flat) if all_have_grads => {
                    if c.weight_decay != 0.0 {
                        let _ = flat.g_mul_scalar_(1.0 - lr * c.weight_decay);
                    }
                    let _ = flat.addcdiv_(&(&self.m * (-lr / bc1)), &denom);
                }
                _ => {
                    let params: Vec<Tensor> = self
                        .params
                        .iter()
                        .map(|(_, p)| p.detach().reshape([-1]).to_kind(Kind::Float))
                        .collect();
                    let update =
                        ((&self.m / bc1) / denom + Tensor::cat(&params, 0) * c.weight_decay) * lr;
                    for (((_, p), u), g) in self.params.iter().zip(self.views(&update)).zip(&grads)
                    {
                        if g.defined() {
                            let _ = p.detach().g_sub_(&u.to_kind(p.kind()));
                        }
                    }
                }
            }
        })
    }

    /// All gradients as one flat fp32 tensor (zeros for a parameter without one): the flat
    /// gradient buffer when there is one, else a concatenation, which then becomes that buffer
    /// when the parameters are flat and every one has a gradient.
    fn flat_grads(&mut self, grads: &[Tensor]) -> Tensor {
        if let Some(g) = &self.grads {
            return g.shallow_clone();
        }
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
        let buffer = Tensor::cat(&flat, 0);
        let all_fp32 = grads.iter().all(|g| g.defined() && g.kind() == Kind::Float);
        if self.flat.is_some() && all_fp32 {
            let views: Vec<Tensor> = self.views(&buffer).collect();
            for (g, view) in grads.iter().zip(&views) {
                // Every handle of the gradient shares its TensorImpl, so autograd's in-place
                // accumulation now writes the buffer.
                g.shallow_clone().set_data(view);
            }
            self.grads = Some(buffer.shallow_clone());
        }
        buffer
    }

    /// The update as one CUDA kernel over the flat buffers; false where it cannot run (not flat,
    /// not CUDA, kernels off), and the ATen path does the step.
    fn fused_step(&mut self, g: &Tensor, scale: Option<&Tensor>, lr: f64, bc: (f64, f64)) -> bool {
        let Some(flat) = &self.flat else {
            return false;
        };
        let Some(k) = crate::cuda::kernels(flat.device()) else {
            return false;
        };
        let one = Tensor::ones([1], (Kind::Float, flat.device()));
        let c = &self.cfg;
        let h = crate::cuda::adamw::AdamWStep {
            lr: lr as f32,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            bias_correction1: bc.0 as f32,
            bias_correction2: bc.1 as f32,
            eps: c.eps as f32,
            weight_decay: c.weight_decay as f32,
        };
        let scale = scale.map_or(one, |s| s.reshape([1]));
        let r = crate::cuda::adamw::adamw_step(&k, flat, g, (&self.m, &self.v), &scale, h);
        crate::cuda::or_aten(r).is_some()
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

#[cfg(test)]
mod flat_tests {
    use super::*;
    use tch::Device;

    /// Two parameters, and a third the loss never uses when `unused`. Values come from a local
    /// generator: libtorch's is process-global, and other tests draw from it concurrently.
    fn store(seed: i64, unused: bool) -> (nn::VarStore, Tensor, Tensor, Option<Tensor>) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed as u64);
        let mut values =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let var = |name: &str, shape: &[i64], v: Vec<f32>| {
            let t = root.zeros(name, shape);
            tch::no_grad(|| t.shallow_clone().copy_(&Tensor::from_slice(&v).view(shape)));
            t
        };
        let a = var("a", &[3, 4], values(12));
        let b = var("b", &[5], values(5));
        let u = unused.then(|| var("unused", &[2], values(2)));
        (vs, a, b, u)
    }

    fn cfg() -> AdamWConfig {
        AdamWConfig {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            clip_norm: 1.0,
            warmup_steps: 0,
            total_steps: 10,
            min_lr_ratio: 1.0,
        }
    }

    fn diff(x: &Tensor, y: &Tensor) -> f64 {
        (x - y).abs().max().double_value(&[])
    }

    #[test]
    fn flat_update_equals_the_per_parameter_one() {
        let (vs1, a1, b1, _) = store(3, false);
        let (vs2, a2, b2, _) = store(3, false);
        let mut flat = AdamW::new(&vs1, cfg());
        let mut per = AdamW::new(&vs2, cfg());
        assert!(flat.flat.is_some());
        per.flat = None;
        for _ in 0..4 {
            for (opt, a, b) in [(&mut flat, &a1, &b1), (&mut per, &a2, &b2)] {
                opt.zero_grad();
                ((a * 2.0).sin().sum(Kind::Float) + (b * b).sum(Kind::Float)).backward();
                opt.step();
            }
        }
        assert!(diff(&a1, &a2) < 1e-6 && diff(&b1, &b2) < 1e-6);
        assert!(diff(&a1, &store(3, false).1) > 1e-3, "the parameters moved");
        // The layers' handles see the flat buffer: writing it moves them.
        let _ = flat.flat.as_mut().unwrap().fill_(0.5);
        assert_eq!(a1.mean(Kind::Float).double_value(&[]), 0.5);
    }

    #[test]
    fn a_parameter_without_gradient_is_left_alone() {
        let (vs, a, _, u) = store(4, true);
        let u = u.unwrap();
        let before = u.copy();
        let mut opt = AdamW::new(&vs, cfg());
        for _ in 0..3 {
            opt.zero_grad();
            (&a * &a).sum(Kind::Float).backward();
            opt.step();
        }
        assert_eq!(diff(&u, &before), 0.0);
    }
}
