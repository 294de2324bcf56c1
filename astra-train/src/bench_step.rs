//! `astra-train bench-step`: training-step throughput of ViT-B/16 or GPT-2 small (plain or ASTRA:
//! MPA + grouped VQ with EMA + NAQ, and DCT for the ViT), random weights and data, AdamW, optional
//! bf16 autocast. Prints a table.

use std::time::Instant;

use astra_quant::{BlockQuantizer, GroupedCodebook, NoiseModel};
use tch::{Device, Kind, Tensor};

use crate::config::{GPT2Config, ModelConfig, ViTConfig};
use crate::error::Result;
use crate::model::Model;
use crate::models::layers::{attend, Sight};
use crate::models::mpa::Layout;
use crate::models::{Astra, ClsMode, DevicePartition, GroupedVq, VqConfig};

pub struct StepBench {
    pub batch: i64,
    pub image: i64,
    pub patch: i64,
    pub classes: i64,
    /// Some(sequence length): GPT-2 small on random tokens instead of the ViT.
    pub gpt2_seq: Option<i64>,
    /// None: the plain model.
    pub astra: Option<(usize, usize, usize)>, // devices, groups, codewords
    pub steps: usize,
    pub warmup: usize,
    pub bf16: bool,
    pub device: Device,
}

pub struct StepResult {
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    /// Examples (images or sequences) per second.
    pub images_per_s: f64,
    /// Tokens per second (GPT-2: sequence tokens; ViT: patch tokens).
    pub tokens_per_s: f64,
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

pub fn run(b: &StepBench) -> Result<StepResult> {
    tch::manual_seed(0);
    let vit = ViTConfig {
        image_size: b.image,
        patch_size: b.patch,
        ..ViTConfig::vit_base_patch16_224(b.classes)
    };
    let config = match b.gpt2_seq {
        Some(t) => ModelConfig::GPT2(GPT2Config {
            n_positions: t.max(1024),
            ..GPT2Config::gpt2_small()
        }),
        None => ModelConfig::ViT(vit.clone()),
    };
    let model = Model::new(config.clone(), b.device)?;
    // The trainer's own AdamW (flat moments, device-side clipping), as `finetune` runs it.
    let mut opt = crate::train::optim::AdamW::new(
        &model.vs,
        crate::train::optim::AdamWConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            clip_norm: 1.0,
            warmup_steps: 0,
            total_steps: b.warmup + b.steps,
            min_lr_ratio: 1.0,
        },
    );
    let tokens = b.gpt2_seq.unwrap_or(vit.num_patches()) as usize;
    let (layers, d) = (model.layers(), model.hidden() as usize);
    let mut quantizers: Option<(DevicePartition, Vec<GroupedVq>)> = match b.astra {
        None => None,
        Some((n, g, k)) => {
            let w = d / g;
            let flat: Vec<f32> = Vec::<f32>::try_from(Tensor::randn(
                [(g * k * w) as i64],
                (Kind::Float, Device::Cpu),
            ))?;
            let cb = GroupedCodebook::from_flat(g, k, w, flat)?;
            let noise = NoiseModel::Diagonal {
                mean: vec![0.0; d],
                std: vec![0.05; d],
            };
            let q = BlockQuantizer {
                usage: None,
                codebook: cb,
                noise: Some(noise),
            };
            let vq = (0..layers)
                .map(|_| GroupedVq::from_quantizer(&q, VqConfig::default(), b.device))
                .collect();
            Some((DevicePartition::contiguous(tokens, n)?, vq))
        }
    };
    let mut times = Vec::with_capacity(b.steps);
    for step in 0..b.warmup + b.steps {
        let (images, labels) = match config.language_model() {
            Some((vocab, _)) => {
                let t = tokens as i64;
                let ids = Tensor::randint(vocab, [b.batch, t + 1], (Kind::Int64, b.device));
                (ids.narrow(1, 0, t), ids.narrow(1, 1, t))
            }
            None => (
                Tensor::randn([b.batch, 3, b.image, b.image], (Kind::Float, b.device)),
                Tensor::randint(b.classes, [b.batch], (Kind::Int64, b.device)),
            ),
        };
        sync(b.device);
        let t = Instant::now();
        let loss = crate::precision::bf16_autocast(b.bf16, || -> Result<Tensor> {
            let astra = quantizers.as_mut().map(|(p, vq)| Astra {
                partition: p,
                cls: ClsMode::Distributed,
                vq: Some(vq),
                train: true,
                link_loss: None,
            });
            // As the training step takes it (the fused head for language models).
            let out = crate::train::task::step_loss(&model, &images, &labels, astra)?;
            Ok(match out.commitment {
                Some(c) => out.loss + c.to_kind(Kind::Float) * 5e-4,
                None => out.loss,
            })
        })??;
        opt.zero_grad();
        loss.backward();
        opt.step();
        sync(b.device);
        if step >= b.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median_s = times[times.len() / 2];
    Ok(StepResult {
        median_s,
        min_s: times[0],
        max_s: *times.last().expect("steps > 0"),
        images_per_s: b.batch as f64 / median_s,
        tokens_per_s: (b.batch as usize * tokens) as f64 / median_s,
    })
}

/// GPT-2's causal MPA attention at its training shape (batch 8, T = 1024 at N devices, the
/// sent tokens' quantized keys) against plain causal attention.
fn causal_attention_parts(
    b: &StepBench,
    heads: i64,
    d: i64,
    n: usize,
) -> Result<Vec<(String, f64)>> {
    let (batch, t, dev) = (8, 1024, b.device);
    let partition = DevicePartition::contiguous(t, n)?;
    let sent = partition.sent_tokens(true);
    let layout = Layout {
        partition: &partition,
        cls: 0,
        causal: true,
        sent: Some(&sent),
        loss: None,
    };
    let mask = layout.mask(dev);
    let keys = (t + sent.len()) as i64;
    let rand =
        |len: i64| Tensor::randn([batch, len, d], (Kind::Float, dev)).set_requires_grad(true);
    let (q, k, v) = (rand(t as i64), rand(keys), rand(keys));
    let amp = |f: &mut dyn FnMut()| {
        let _ = crate::precision::bf16_autocast(b.bf16, &mut *f);
    };
    let (w_, st) = (b.warmup.max(2), b.steps.max(5));
    let time = |name: &str, k: &Tensor, v: &Tensor, sight: Sight<'_>| {
        let ms = time_ms(dev, w_, st, || {
            amp(&mut || attend(&q, k, v, heads, sight).sum(Kind::Float).backward())
        });
        (
            format!("GPT-2 causal attention fwd+bwd ({batch}×{t}), {name}"),
            ms,
        )
    };
    let (kp, vp) = (rand(t as i64), rand(t as i64));
    Ok(vec![
        time("plain (flash, causal)", &kp, &vp, Sight::Causal),
        time("MPA mask", &k, &v, Sight::Mask(&mask)),
    ])
}

/// Which kernel SDPA runs for queries `q` [B, S, D] over keys `k` under `mask` in bf16 (PyTorch's
/// SDPBackend numbering). On the H200 the MPA mask gets cuDNN's; calling the efficient kernel
/// directly with the mask as an additive bias measured slower (2.75 against 1.85 ms a ViT-B block).
fn sdpa_backend(q: &Tensor, k: &Tensor, mask: &Tensor, heads: i64) -> &'static str {
    let split = |t: &Tensor| {
        let (b, s, d) = t.size3().expect("[B, S, D]");
        t.to_kind(Kind::BFloat16)
            .view([b, s, heads, d / heads])
            .transpose(1, 2)
    };
    let (q, k) = (split(q), split(k));
    match Tensor::internal_fused_sdp_choice(&q, &k, &k, Some(mask), 0.0, false, None, false) {
        0 => "math",
        1 => "flash",
        2 => "efficient",
        3 => "cuDNN",
        _ => "another kernel",
    }
}

/// Median milliseconds of `f` over `steps` calls after `warmup`, the device synchronised around
/// each call.
fn time_ms(device: Device, warmup: usize, steps: usize, mut f: impl FnMut()) -> f64 {
    let mut v = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        sync(device);
        let t = Instant::now();
        f();
        sync(device);
        if i >= warmup {
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Where an ASTRA ViT training step's extra time goes: the parts of one block, at the step's
/// shapes (batch B, T patch tokens, N CLS copies, D = 768), timed in isolation (forward and
/// backward where the step has both). Each row: (part, ms per block).
pub fn parts(b: &StepBench) -> Result<Vec<(String, f64)>> {
    let (n, g, k) = b.astra.unwrap_or((4, 32, 1024));
    let vit = ViTConfig {
        image_size: b.image,
        patch_size: b.patch,
        ..ViTConfig::vit_base_patch16_224(b.classes)
    };
    let (t, d, heads) = (vit.num_patches(), vit.hidden_size, vit.num_attention_heads);
    let dev = b.device;
    tch::manual_seed(0);
    let model = Model::new(ModelConfig::ViT(vit.clone()), dev)?;
    let crate::model::Backbone::ViT(net) = &model.net else {
        unreachable!("built a ViT")
    };
    let blk = &net.blocks[0];
    let w = d as usize / g;
    let flat: Vec<f32> = Vec::<f32>::try_from(Tensor::randn(
        [(g * k * w) as i64],
        (Kind::Float, Device::Cpu),
    ))?;
    let q = BlockQuantizer {
        usage: None,
        codebook: GroupedCodebook::from_flat(g, k, w, flat)?,
        noise: Some(NoiseModel::Diagonal {
            mean: vec![0.0; d as usize],
            std: vec![0.05; d as usize],
        }),
    };
    let mut vq = GroupedVq::from_quantizer(&q, VqConfig::default(), dev);
    let partition = DevicePartition::contiguous(t as usize, n)?;
    let layout = Layout {
        partition: &partition,
        cls: n,
        causal: false,
        sent: None,
        loss: None,
    };
    let mask = layout.mask(dev);
    let s = n as i64 + t;
    let x = Tensor::randn([b.batch, s, d], (Kind::Float, dev)).set_requires_grad(true);
    let content = x.narrow(1, n as i64, t);
    let (w_, st) = (b.warmup.max(2), b.steps.max(5));
    // bf16 autocast as the training step runs it (checked once; the timed calls cannot fail).
    crate::precision::bf16_autocast(b.bf16, || ())?;
    let amp = |f: &mut dyn FnMut()| {
        let _ = crate::precision::bf16_autocast(b.bf16, &mut *f);
    };
    let mut rows = Vec::new();
    let mut row = |name: &str, ms: f64| rows.push((name.to_string(), ms));
    row(
        "block fwd+bwd, plain (flash SDPA)",
        time_ms(dev, w_, st, || {
            amp(&mut || {
                blk.forward(&x, None, Sight::All)
                    .sum(Kind::Float)
                    .backward()
            })
        }),
    );
    let xq = content.detach();
    row(
        "block fwd+bwd, MPA (mask, S+T keys; quantized keys given)",
        time_ms(dev, w_, st, || {
            amp(&mut || {
                blk.forward(&x, Some(&xq), Sight::Mask(&mask))
                    .sum(Kind::Float)
                    .backward()
            })
        }),
    );
    let hd = d;
    let qkv =
        |len: i64| Tensor::randn([b.batch, len, hd], (Kind::Float, dev)).set_requires_grad(true);
    let (qq, kk, vv) = (qkv(s), qkv(s), qkv(s));
    let (k2, v2) = (qkv(s + t), qkv(s + t));
    let attention = |name: &str, k: &Tensor, v: &Tensor, sight: Sight<'_>| {
        let ms = time_ms(dev, w_, st, || {
            amp(&mut || attend(&qq, k, v, heads, sight).sum(Kind::Float).backward())
        });
        (format!("attention fwd+bwd, {name}"), ms)
    };
    let picked = sdpa_backend(&qq, &k2, &mask, heads);
    for (name, ms) in [
        attention("plain (S keys)", &kk, &vv, Sight::All),
        attention(
            &format!("MPA mask (S+T keys; SDPA picks {picked})"),
            &k2,
            &v2,
            Sight::Mask(&mask),
        ),
    ] {
        row(&name, ms);
    }
    for (name, ms) in causal_attention_parts(b, heads, d, n)? {
        row(&name, ms);
    }
    let xc = content.detach();
    row(
        "  NAQ draw (residual noise)",
        time_ms(dev, w_, st, || {
            let _ = vq.sample_noise(&xc.size());
        }),
    );
    row(
        "ASTRA block fwd+bwd (training quantize + MPA block, as the step runs it)",
        time_ms(dev, w_, st, || {
            amp(&mut || {
                let q = vq.quantize(&content, true);
                (blk.forward(&x, Some(&q.value), Sight::Mask(&mask))
                    .sum(Kind::Float)
                    + q.commitment)
                    .backward()
            })
        }),
    );
    // On CUDA each VQ part twice: the fused kernels and the ATen path they replace.
    let kernels_were_on = crate::cuda::enabled();
    let paths: &[(bool, &str)] = match crate::cuda::kernels(dev) {
        Some(_) => &[(true, "kernels"), (false, "ATen")],
        None => &[(false, "ATen")],
    };
    for &(on, path) in paths {
        crate::cuda::set_enabled(on);
        row(
            &format!("VQ encode (fp32 nearest codeword; {path})"),
            time_ms(dev, w_, st, || {
                amp(&mut || {
                    let _ = vq.encode(&xc);
                })
            }),
        );
        row(
            &format!("VQ quantize, training (encode + NAQ + EMA + commitment; {path})"),
            time_ms(dev, w_, st, || {
                amp(&mut || {
                    let _ = vq.quantize(&xc, true);
                })
            }),
        );
        let idx = vq.encode(&xc);
        row(
            &format!("  of which decode (codeword gather; {path})"),
            time_ms(dev, w_, st, || {
                let _ = vq.decode(&idx);
            }),
        );
        row(
            &format!("  of which EMA update (statistics, restart; {path})"),
            time_ms(dev, w_, st, || tch::no_grad(|| vq.ema_update(&xc, &idx))),
        );
        row(
            &format!("VQ quantize fwd+bwd (STE into X), training; {path}"),
            time_ms(dev, w_, st, || {
                amp(&mut || {
                    let q = vq.quantize(&content, true);
                    (q.value.sum(Kind::Float) + q.commitment).backward()
                })
            }),
        );
    }
    crate::cuda::set_enabled(kernels_were_on);
    if let Some(kern) = crate::cuda::kernels(dev) {
        for (name, ms) in search_parts(&kern, &xc, (g as i64, k as i64), b.batch, w_, st)? {
            row(&name, ms);
        }
    }
    Ok(rows)
}

/// The EMA statistics alone (per-code counts and sums of the ViT block's rows [M, G, W] under
/// random indices); ten launches per timing, so the launch and the synchronisation around them
/// weigh a tenth.
fn stats_part(
    kern: &crate::cuda::Kernels,
    rows: &Tensor,
    k: i64,
    warmup: usize,
    steps: usize,
) -> Result<(String, f64)> {
    use crate::cuda::ema::code_stats;
    let (m, g) = (rows.size()[0], rows.size()[1]);
    let idx = Tensor::randint(k, [m, g], (Kind::Int64, rows.device()));
    let _ = code_stats(kern, rows, &idx, k).map_err(|e| crate::error::TrainError::Invalid {
        what: "code statistics".into(),
        reason: e.to_string(),
    })?;
    let ms = time_ms(rows.device(), warmup, steps, || {
        for _ in 0..10 {
            let _ = code_stats(kern, rows, &idx, k);
        }
    }) / 10.0;
    Ok((
        format!("  EMA statistics alone ({m} rows, G={g}, K={k}; kernels)"),
        ms,
    ))
}

/// The nearest-codeword search alone, each kernel that takes the groups (FMAs on CUDA cores;
/// 3×TF32 on tensor cores), at the ViT block's rows and at GPT-2's training batch (8 × 1024 rows,
/// the same groups).
fn search_parts(
    kern: &crate::cuda::Kernels,
    content: &Tensor,
    (g, k): (i64, i64),
    batch: i64,
    warmup: usize,
    steps: usize,
) -> Result<Vec<(String, f64)>> {
    use crate::cuda::nearest::{nearest_codeword_with, Search};
    let d = content.size()[2];
    let w = d / g;
    let vit_rows = content
        .reshape([-1, g, w])
        .to_kind(Kind::Float)
        .contiguous();
    let gpt2_rows = Tensor::randn([8 * 1024, g, w], (Kind::Float, content.device()));
    let codebook = Tensor::randn([g, k, w], (Kind::Float, content.device()));
    let mut searches = vec![(Search::Fma, "CUDA cores, fp32 FMA")];
    if w <= 32 && kern.has_tf32_mma() {
        searches.push((
            Search::TensorCores,
            "tensor cores, 3×TF32, codewords streamed",
        ));
        searches.push((
            Search::TensorCoresResident,
            "tensor cores, 3×TF32, codebook resident",
        ));
    }
    let mut rows = vec![stats_part(kern, &vit_rows, k, warmup, steps)?];
    let vit = format!("ViT-B at batch {batch}, {} rows", vit_rows.size()[0]);
    for (what, x) in [
        (vit, &vit_rows),
        ("GPT-2 at batch 8, 8192 rows".into(), &gpt2_rows),
    ] {
        for &(search, name) in &searches {
            // Checked once outside the timing (a kernel that cannot run is not timed).
            let _ = nearest_codeword_with(kern, x, &codebook, search).map_err(|e| {
                crate::error::TrainError::Invalid {
                    what: format!("{name} search"),
                    reason: e.to_string(),
                }
            })?;
            let ms = time_ms(content.device(), warmup, steps, || {
                let _ = nearest_codeword_with(kern, x, &codebook, search);
            });
            rows.push((
                format!("  nearest codeword alone ({what}, G={g}, K={k}): {name}"),
                ms,
            ));
        }
    }
    Ok(rows)
}
