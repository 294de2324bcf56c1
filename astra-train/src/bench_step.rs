//! `astra-train bench-step`: training-step throughput of ViT-B/16 (plain or ASTRA: MPA + grouped VQ
//! with EMA + NAQ + DCT), random weights and data, AdamW, optional bf16 autocast. Prints a table.

use std::time::Instant;

use astra_quant::{BlockQuantizer, GroupedCodebook, NoiseModel};
use tch::nn::OptimizerConfig;
use tch::{nn, Device, Kind, Tensor};

use crate::config::{ModelConfig, ViTConfig};
use crate::error::Result;
use crate::model::Model;
use crate::models::{Astra, ClsMode, DevicePartition, GroupedVq, VqConfig};

pub struct StepBench {
    pub batch: i64,
    pub image: i64,
    pub patch: i64,
    pub classes: i64,
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
    pub images_per_s: f64,
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

pub fn run(b: &StepBench) -> Result<StepResult> {
    tch::manual_seed(0);
    let cfg = ViTConfig {
        image_size: b.image,
        patch_size: b.patch,
        ..ViTConfig::vit_base_patch16_224(b.classes)
    };
    let model = Model::new(ModelConfig::ViT(cfg.clone()), b.device)?;
    let mut opt = nn::AdamW::default().build(&model.vs, 1e-4)?;
    let tokens = cfg.num_patches() as usize;
    let mut quantizers: Option<(DevicePartition, Vec<GroupedVq>)> = match b.astra {
        None => None,
        Some((n, g, k)) => {
            let d = cfg.hidden_size as usize;
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
                codebook: cb,
                noise: Some(noise),
            };
            let vq = (0..cfg.num_hidden_layers)
                .map(|_| GroupedVq::from_quantizer(&q, VqConfig::default(), b.device))
                .collect();
            Some((DevicePartition::contiguous(tokens, n)?, vq))
        }
    };
    let mut times = Vec::with_capacity(b.steps);
    for step in 0..b.warmup + b.steps {
        let images = Tensor::randn([b.batch, 3, b.image, b.image], (Kind::Float, b.device));
        let labels = Tensor::randint(b.classes, [b.batch], (Kind::Int64, b.device));
        sync(b.device);
        let t = Instant::now();
        let loss = crate::precision::bf16_autocast(b.bf16, || -> Result<Tensor> {
            Ok(match quantizers.as_mut() {
                None => model
                    .forward(&images)?
                    .to_kind(Kind::Float)
                    .cross_entropy_for_logits(&labels),
                Some((p, vq)) => {
                    let out = model.forward_astra(
                        &images,
                        Astra {
                            partition: p,
                            cls: ClsMode::Distributed,
                            vq: Some(vq),
                            train: true,
                        },
                    )?;
                    out.logits
                        .to_kind(Kind::Float)
                        .cross_entropy_for_logits(&labels)
                        + out.commitment * 5e-4
                }
            })
        })??;
        opt.backward_step(&loss);
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
    })
}
