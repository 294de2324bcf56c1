//! Training: the run folder (DESIGN.md), AdamW with warm-up + cosine, and the epoch loop for image
//! classifiers, plain or ASTRA (MPA + VQ + NAQ + DCT), resumable exactly at epoch boundaries.

pub mod calibrate;
pub mod optim;
pub mod run;

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::config::{ModelConfig, ViTConfig};
use crate::data::{cifar, idx, ImageDataset};
use crate::error::{Result, TrainError};
use crate::model::{Model, Network};
use crate::models::{Astra, ClsMode, DevicePartition, GroupedVq, VqConfig};
use optim::{AdamW, AdamWConfig};
use run::{EpochRecord, RunFolder};

/// Where the images come from: `fashion-mnist:DIR`, `mnist:DIR`, `cifar10:DIR`, `cifar100:DIR`.
pub fn load_data(spec: &str, train: bool) -> Result<(ImageDataset, Vec<f64>, Vec<f64>)> {
    let (kind, dir) = spec
        .split_once(':')
        .ok_or_else(|| TrainError::invalid("data", format!("'{spec}' is not KIND:DIR")))?;
    let dir = std::path::Path::new(dir);
    Ok(match kind {
        "fashion-mnist" => (idx::load(dir, train)?, vec![0.2860], vec![0.3530]),
        "mnist" => (idx::load(dir, train)?, vec![0.1307], vec![0.3081]),
        "cifar10" => (
            cifar::load_cifar10(dir, train)?,
            vec![0.4914, 0.4822, 0.4465],
            vec![0.2470, 0.2435, 0.2616],
        ),
        "cifar100" => (
            cifar::load_cifar100(dir, train)?,
            vec![0.5071, 0.4865, 0.4409],
            vec![0.2673, 0.2564, 0.2762],
        ),
        other => {
            return Err(TrainError::invalid(
                "data",
                format!("kind '{other}' is not fashion-mnist, mnist, cifar10 or cifar100"),
            ))
        }
    })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AstraSettings {
    pub devices: usize,
    pub codebooks: PathBuf,
    /// Commitment weight β.
    pub beta: f64,
    pub vq: VqConfig,
    pub single_cls: bool,
    pub random_partition: bool,
}

/// The full effective configuration of a run (saved as config.json).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub data: String,
    pub model: ViTConfig,
    /// Weights to start from (a run folder or an HF model); None: random initialisation.
    pub init: Option<String>,
    pub epochs: usize,
    pub batch: usize,
    pub optim: AdamWConfig,
    pub seed: u64,
    /// Use only the first N training images (quick runs); None: all.
    pub max_train: Option<usize>,
    pub max_test: Option<usize>,
    pub astra: Option<AstraSettings>,
}

fn subset(ds: &ImageDataset, n: Option<usize>) -> Vec<usize> {
    (0..n.map_or(ds.len(), |n| n.min(ds.len()))).collect()
}

/// Accuracy on `indices` (plain model, or ASTRA in evaluation mode).
pub fn evaluate(
    model: &Model,
    ds: &ImageDataset,
    indices: &[usize],
    mean: &[f64],
    std: &[f64],
    astra: Option<(&DevicePartition, ClsMode, &mut [GroupedVq])>,
    device: Device,
) -> Result<f64> {
    let Network::ViT(vit) = &model.net else {
        return Err(TrainError::invalid(
            "evaluate",
            "image accuracy needs a ViT",
        ));
    };
    let mut correct = 0i64;
    let mut astra = astra;
    tch::no_grad(|| -> Result<()> {
        for chunk in indices.chunks(256) {
            let (x, y) = ds.batch(chunk, mean, std, device);
            let logits = match astra.as_mut() {
                None => vit.forward(&x)?,
                Some((p, cls, vq)) => {
                    vit.forward_astra(
                        &x,
                        Astra {
                            partition: p,
                            cls: *cls,
                            vq: Some(vq),
                            train: false,
                        },
                    )?
                    .logits
                }
            };
            correct += logits
                .argmax(-1, false)
                .eq_tensor(&y)
                .sum(Kind::Int64)
                .int64_value(&[]);
        }
        Ok(())
    })?;
    Ok(correct as f64 / indices.len().max(1) as f64)
}

/// Trains (or resumes) the run in `run`; returns the best test accuracy. `stop_after` ends the
/// process's work after that many epochs in total, as a kill would (tests of --resume).
pub fn train(
    cfg: &TrainConfig,
    run: &RunFolder,
    device: Device,
    progress: bool,
    stop_after: Option<usize>,
) -> Result<f64> {
    let (train_ds, mean, std) = load_data(&cfg.data, true)?;
    let (test_ds, _, _) = load_data(&cfg.data, false)?;
    let mut model_cfg = cfg.model.clone();
    if train_ds.channels as i64 != model_cfg.num_channels
        || train_ds.height as i64 != model_cfg.image_size
    {
        return Err(TrainError::invalid(
            "model",
            format!(
                "expects {}×{}² images, the data has {}×{}²",
                model_cfg.num_channels, model_cfg.image_size, train_ds.channels, train_ds.height
            ),
        ));
    }
    model_cfg.num_labels = Some(train_ds.classes as i64);
    let model = match &cfg.init {
        Some(spec) => {
            let (m, _) = Model::load(spec, device)?;
            m
        }
        None => {
            tch::manual_seed(cfg.seed as i64);
            Model::new(ModelConfig::ViT(model_cfg), device)?
        }
    };
    let Network::ViT(vit) = &model.net else {
        return Err(TrainError::invalid("init", "image training needs a ViT"));
    };
    let tokens = vit.cfg.num_patches() as usize;
    let mut vq: Option<(Vec<GroupedVq>, ClsMode)> = match &cfg.astra {
        None => None,
        Some(a) => {
            let file = astra_quant::CodebookFile::load(&a.codebooks)?;
            crate::models::vq::check_codebooks(&file, model.layers(), model.hidden())?;
            let cls = if a.single_cls {
                ClsMode::Single
            } else {
                ClsMode::Distributed
            };
            Some((
                file.blocks
                    .iter()
                    .map(|b| GroupedVq::from_quantizer(b, a.vq.clone(), device))
                    .collect(),
                cls,
            ))
        }
    };
    let train_idx = subset(&train_ds, cfg.max_train);
    let test_idx = subset(&test_ds, cfg.max_test);
    let steps_per_epoch = train_idx.len().div_ceil(cfg.batch);
    let mut opt_cfg = cfg.optim.clone();
    opt_cfg.total_steps = steps_per_epoch * cfg.epochs;
    let mut opt = AdamW::new(&model.vs, opt_cfg);
    // Resume: model, optimizer and quantizer state from the last completed epoch.
    let (mut start_epoch, mut best) = (0usize, 0f64);
    if let Some((state, tensors)) = run.last_checkpoint()? {
        model
            .vs
            .variables()
            .iter()
            .try_for_each(|(n, v)| -> Result<()> {
                let src = tensors
                    .get(n)
                    .ok_or_else(|| TrainError::invalid("checkpoint", format!("lacks {n}")))?;
                tch::no_grad(|| v.shallow_clone().copy_(src));
                Ok(())
            })?;
        opt.load_state(&tensors, state.step)
            .map_err(|e| TrainError::invalid("checkpoint", e))?;
        if let Some((q, _)) = vq.as_mut() {
            for (l, b) in q.iter_mut().enumerate() {
                b.load_state(&format!("astra.vq.{l}"), &tensors)?;
            }
        }
        start_epoch = state.epoch + 1;
        best = state.best_accuracy;
    }
    let beta = cfg.astra.as_ref().map_or(0.0, |a| a.beta);
    for epoch in start_epoch..cfg.epochs {
        if stop_after.is_some_and(|s| epoch >= s) {
            break;
        }
        let t0 = Instant::now();
        // Everything random in an epoch derives from (seed, epoch): a resumed run repeats it exactly.
        tch::manual_seed(
            (cfg.seed as i64)
                .wrapping_mul(1000)
                .wrapping_add(epoch as i64),
        );
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed ^ ((epoch as u64 + 1) << 32));
        let mut order = train_idx.clone();
        order.shuffle(&mut rng);
        let bar = if progress {
            let b = ProgressBar::new(steps_per_epoch as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "epoch {prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("static"),
            );
            b.set_prefix(format!("{}/{}", epoch + 1, cfg.epochs));
            b
        } else {
            ProgressBar::hidden()
        };
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0i64, 0usize);
        for chunk in order.chunks(cfg.batch) {
            let (x, y) = train_ds.batch(chunk, &mean, &std, device);
            let partition = match &cfg.astra {
                Some(a) if a.random_partition => Some(DevicePartition::random(
                    tokens,
                    a.devices,
                    rng_next(&mut rng),
                )?),
                Some(a) => Some(DevicePartition::contiguous(tokens, a.devices)?),
                None => None,
            };
            let (logits, commit) = match (vq.as_mut(), &partition) {
                (Some((q, cls)), Some(p)) => {
                    let out = vit.forward_astra(
                        &x,
                        Astra {
                            partition: p,
                            cls: *cls,
                            vq: Some(q),
                            train: true,
                        },
                    )?;
                    (out.logits, Some(out.commitment))
                }
                _ => (vit.forward(&x)?, None),
            };
            let mut loss = logits.cross_entropy_for_logits(&y);
            if let Some(c) = commit {
                loss += c * beta;
            }
            opt.zero_grad();
            loss.backward();
            opt.step();
            let l = loss.double_value(&[]);
            loss_sum += l * chunk.len() as f64;
            correct += logits
                .argmax(-1, false)
                .eq_tensor(&y)
                .sum(Kind::Int64)
                .int64_value(&[]);
            seen += chunk.len();
            bar.set_message(format!("loss {:.4}", loss_sum / seen as f64));
            bar.inc(1);
        }
        bar.finish_and_clear();
        let test_acc = match (vq.as_mut(), &cfg.astra) {
            (Some((q, cls)), Some(a)) => {
                let p = DevicePartition::contiguous(tokens, a.devices)?;
                evaluate(
                    &model,
                    &test_ds,
                    &test_idx,
                    &mean,
                    &std,
                    Some((&p, *cls, q)),
                    device,
                )?
            }
            _ => evaluate(&model, &test_ds, &test_idx, &mean, &std, None, device)?,
        };
        let rec = EpochRecord {
            epoch,
            step: opt.step,
            train_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            test_accuracy: test_acc,
            lr: opt.lr_at(opt.step.saturating_sub(1)),
            seconds: t0.elapsed().as_secs_f64(),
        };
        if progress {
            eprintln!(
                "epoch {}/{}: train loss {:.4}, train acc {:.4}, test acc {:.4} ({:.0} s)",
                epoch + 1,
                cfg.epochs,
                rec.train_loss,
                rec.train_accuracy,
                rec.test_accuracy,
                rec.seconds
            );
        }
        let is_best = test_acc > best;
        best = best.max(test_acc);
        let mut tensors: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
        tensors.extend(opt.state());
        if let Some((q, _)) = &vq {
            for (l, b) in q.iter().enumerate() {
                tensors.extend(b.state(&format!("astra.vq.{l}")));
            }
        }
        run.record_epoch(&rec, &tensors, best)?;
        if is_best {
            run.save_best(&model, vq.as_ref().map(|(q, _)| q.as_slice()))?;
        }
    }
    Ok(best)
}

fn rng_next(rng: &mut rand_chacha::ChaCha8Rng) -> u64 {
    use rand::Rng;
    rng.random()
}
