//! `astra-eval predict`: logits of a model for a batch in a .npy file, plain or under ASTRA
//! (N devices, codebooks, CLS mode), by the one-process masked forward or the per-device path.

use std::path::{Path, PathBuf};

use crate::cli::args::PredictArgs;
use crate::error::Result;
use crate::fail;
use astra_quant::npy::{self, NpyArray};
use astra_train::config::ModelConfig;
use astra_train::model::Model;
use astra_train::models::{Astra, ClsMode, DevicePartition, GroupedVq, VqConfig};
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ForwardPath {
    /// All devices in one process with the mixed-precision mask.
    Masked,
    /// Device by device, exchanging quantized tokens in memory (what the runtime does).
    PerDevice,
    /// Device by device, exchanging indices; remote keys/values from per-codeword tables (ViT).
    PerDeviceFast,
}

/// Logits of `a.model` for `a.input`, written to `a.out`; returns the line to print.
pub fn run(a: &PredictArgs) -> Result<String> {
    let device =
        astra_train::libtorch::parse_device(&a.device).map_err(crate::error::EvalError::Invalid)?;
    let (model, _) = Model::load(&a.model, device)?;
    let input = read_input(&a.input, &model.config)?.to_device(device);
    let mut codebooks = None;
    let logits = tch::no_grad(|| -> Result<Tensor> {
        let Some(n) = a.devices else {
            return Ok(model.forward(&input)?);
        };
        if n == 0 {
            fail!("--devices must be at least 1");
        }
        let tokens = model.content_tokens(&input) as usize;
        let partition = DevicePartition::contiguous(tokens, n)?;
        codebooks = self::codebooks(a)?;
        let mut vq: Option<Vec<GroupedVq>> = match &codebooks {
            Some(p) => Some(model.load_quantizers(p, &VqConfig::default(), device)?),
            None => None,
        };
        let astra = Astra {
            partition: &partition,
            cls: a.cls,
            vq: vq.as_deref_mut(),
            train: false,
            link_loss: None,
        };
        Ok(match a.path {
            ForwardPath::Masked => model.forward_astra(&input, astra)?.logits,
            ForwardPath::PerDevice => model.forward_per_device(&input, astra)?,
            ForwardPath::PerDeviceFast => model.forward_per_device_fast(&input, astra)?,
        })
    })?;
    write_npy_atomic(&logits.to_kind(Kind::Float).to_device(Device::Cpu), &a.out)?;
    let what = match a.devices {
        None => "plain model:".to_string(),
        Some(n) => format!(
            "ASTRA on {n} device(s), {} CLS, {} quantizer, {:?} path:",
            if a.cls == ClsMode::Distributed {
                "distributed"
            } else {
                "single"
            },
            match &codebooks {
                Some(p) => format!("codebook ({})", p.display()),
                None => "identity (--no-vq: remote tokens travel unquantized)".into(),
            },
            a.path
        ),
    };
    Ok(format!(
        "{what} logits {:?} -> {}",
        logits.size(),
        a.out.display()
    ))
}

/// The codebooks of an ASTRA prediction: `--codebooks`, else those beside the model (an ASTRA
/// run's model/), else none only when `--no-vq` says so (or on one device, which exchanges
/// nothing): an unquantized exchange is not ASTRA.
fn codebooks(a: &PredictArgs) -> Result<Option<PathBuf>> {
    // One device sends nothing: no quantizer is involved.
    if a.no_vq || (a.devices == Some(1) && a.codebooks.is_none()) {
        return Ok(None);
    }
    if let Some(p) = &a.codebooks {
        return Ok(Some(p.clone()));
    }
    let beside = astra_train::model::resolve(&a.model)?.join("codebooks.safetensors");
    if beside.exists() {
        return Ok(Some(beside));
    }
    fail!(
        "--devices without codebooks: {} has no codebooks.safetensors beside it; pass --codebooks FILE, or --no-vq for an unquantized exchange",
        a.model
    )
}

/// The model's input from a .npy file (the workspace's checked codec): float32 images [B, C, H, W]
/// for a ViT, integer token ids [B, T] for a language model (the model checks their range); NaN/Inf pixels
/// are refused, since they would pass through to NaN outputs.
pub fn read_input(path: &Path, config: &ModelConfig) -> Result<Tensor> {
    let array = npy::read_array(path)?;
    let shape: Vec<i64> = array.shape().iter().map(|&d| d as i64).collect();
    match (config, array) {
        (ModelConfig::ViT(c), NpyArray::F32(a)) => {
            let want = [c.num_channels, c.image_size, c.image_size];
            if shape.len() != 4 || shape[1..] != want {
                fail!(
                    "{}: shape {shape:?}, the model expects [B, {}, {}, {}]",
                    path.display(),
                    want[0],
                    want[1],
                    want[2]
                );
            }
            if let Some((i, v)) = a.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                fail!(
                    "{}: pixel {i} is {v} (inputs must be finite)",
                    path.display()
                );
            }
            let data: Vec<f32> = a.iter().copied().collect();
            Ok(Tensor::from_slice(&data).reshape(&shape))
        }
        (ModelConfig::ViT(_), NpyArray::I64(_)) => fail!(
            "{}: images must be float32 [B, C, H, W], found an integer array",
            path.display()
        ),
        (ModelConfig::GPT2(_) | ModelConfig::Llama(_), NpyArray::I64(a)) => {
            if shape.len() != 2 || shape[1] == 0 {
                fail!(
                    "{}: shape {shape:?}, expected [B, T] with T ≥ 1",
                    path.display()
                );
            }
            let data: Vec<i64> = a.iter().copied().collect();
            Ok(Tensor::from_slice(&data).reshape(&shape))
        }
        (ModelConfig::GPT2(_) | ModelConfig::Llama(_), NpyArray::F32(_)) => fail!(
            "{}: token ids must be int64 [B, T], found a float array",
            path.display()
        ),
    }
}

/// Writes a float tensor as a float32 .npy, atomically.
pub fn write_npy_atomic(t: &Tensor, out: &Path) -> Result<()> {
    let t = t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let data = Vec::<f32>::try_from(t.reshape([-1]))?;
    let a = ndarray::ArrayD::from_shape_vec(shape, data)?;
    npy::write(out, &a)?;
    Ok(())
}
