//! `astra-train calibrate`: block inputs of a trained model (ViT over a sample of training
//! images, GPT-2 over training windows) → one grouped codebook per block (astra-quant k-means)
//! and its NAQ residual statistics.

use astra_quant::residual::NoiseKind;
use astra_quant::{
    BlockQuantizer, CodebookFile, GroupedCodebook, KMeansConfig, ResidualAccumulator,
};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::Array2;
use tch::{Device, Kind, Tensor};

use super::Task;
use crate::error::{Result, TrainError};
use crate::model::Model;

pub struct CalibrationSettings {
    pub data: String,
    pub samples: usize,
    pub groups: usize,
    pub k: usize,
    pub iters: usize,
    pub seed: u64,
    pub noise: Option<NoiseKind>,
    /// Tokens per window for language models (None: the model's n_positions).
    pub context: Option<usize>,
}

fn to_rows(t: &Tensor) -> Result<Array2<f32>> {
    let d = *t.size().last().expect("non-scalar");
    let flat = t
        .to_kind(Kind::Float)
        .to_device(Device::Cpu)
        .reshape([-1, d])
        .contiguous();
    let n = flat.size()[0] as usize;
    let v = Vec::<f32>::try_from(flat.reshape([-1]))?;
    Ok(Array2::from_shape_vec((n, d as usize), v).expect("sized"))
}

pub fn calibrate(
    model: &Model,
    a: &CalibrationSettings,
    device: Device,
    progress: bool,
) -> Result<CodebookFile> {
    let task = Task::open(&a.data, &model.config, a.context)?;
    let n = a.samples.min(task.train_len());
    if n == 0 {
        return Err(TrainError::invalid("samples", "must be at least 1"));
    }
    let layers = model.layers() as usize;
    let mut per_block: Vec<Vec<Array2<f32>>> = vec![Vec::new(); layers];
    tch::no_grad(|| -> Result<()> {
        for x in task.calibration_batches(n, a.seed, device)? {
            for (l, t) in model.block_inputs(&x)?.iter().enumerate() {
                per_block[l].push(to_rows(t)?);
            }
        }
        Ok(())
    })?;
    let bar = if progress {
        let b = ProgressBar::new(layers as u64);
        b.set_style(
            ProgressStyle::with_template(
                "calibrate blocks {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
            )
            .expect("static"),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let mut blocks = Vec::with_capacity(layers);
    for parts in per_block {
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        let rows = ndarray::concatenate(ndarray::Axis(0), &views).expect("same width");
        let cfg = KMeansConfig {
            iters: a.iters,
            seed: a.seed,
            ..KMeansConfig::new(a.k)
        };
        let (cb, _) = GroupedCodebook::fit(rows.view(), a.groups, &cfg)?;
        let noise = match a.noise {
            None => None,
            Some(kind) => {
                let mut acc = ResidualAccumulator::new(cb.dim(), kind);
                for chunk in rows.axis_chunks_iter(ndarray::Axis(0), 8192) {
                    let xh = cb.decode(cb.encode(chunk)?.view())?;
                    acc.push_pair(chunk, xh.view())?;
                }
                Some(acc.finish()?.noise_model().model)
            }
        };
        blocks.push(BlockQuantizer {
            codebook: cb,
            noise,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut file = CodebookFile {
        blocks,
        extra: Default::default(),
    };
    file.extra.insert("data".into(), a.data.clone());
    file.extra.insert("samples".into(), n.to_string());
    file.extra.insert(
        "sampling".into(),
        format!("{n} training examples drawn at random with seed {}", a.seed),
    );
    Ok(file)
}
