//! `astra-eval predict`: logits of a model for a batch in a .npy file, plain or under ASTRA
//! (N devices, codebooks, CLS mode), by the one-process masked forward or the per-device path.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use astra_quant::CodebookFile;
use astra_train::config::ModelConfig;
use astra_train::model::Model;
use astra_train::models::vq::check_codebooks;
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

pub struct PredictArgs {
    pub model: String,
    pub input: PathBuf,
    pub out: PathBuf,
    pub devices: Option<usize>,
    pub codebooks: Option<PathBuf>,
    pub cls: ClsMode,
    pub path: ForwardPath,
    pub device: Device,
}

pub fn run(a: &PredictArgs) -> Result<String> {
    let (model, _) = Model::load(&a.model, a.device)?;
    let input = read_input(&a.input, &model.config)?.to_device(a.device);
    let logits = tch::no_grad(|| -> Result<Tensor> {
        let Some(n) = a.devices else {
            return Ok(model.forward(&input)?);
        };
        if n == 0 {
            bail!("--devices must be at least 1");
        }
        let tokens = model.content_tokens(&input) as usize;
        let partition = DevicePartition::contiguous(tokens, n)?;
        let mut vq: Option<Vec<GroupedVq>> = match &a.codebooks {
            Some(p) => {
                let file = CodebookFile::load(p)?;
                check_codebooks(&file, model.layers(), model.hidden())
                    .with_context(|| p.display().to_string())?;
                Some(
                    file.blocks
                        .iter()
                        .map(|b| GroupedVq::from_quantizer(b, VqConfig::default(), a.device))
                        .collect(),
                )
            }
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
    Ok(format!(
        "{} logits {:?} -> {}{}",
        match a.devices {
            None => "plain model:".to_string(),
            Some(n) => format!(
                "ASTRA on {n} device(s), {} CLS, {} quantizer, {:?} path:",
                if a.cls == ClsMode::Distributed {
                    "distributed"
                } else {
                    "single"
                },
                if a.codebooks.is_some() {
                    "codebook"
                } else {
                    "identity"
                },
                a.path
            ),
        },
        logits.size(),
        a.out.display(),
        if a.devices.is_some() && a.codebooks.is_none() {
            " (no --codebooks: remote tokens travel unquantized)"
        } else {
            ""
        }
    ))
}

pub fn read_input(path: &Path, config: &ModelConfig) -> Result<Tensor> {
    let t = Tensor::read_npy(path)
        .map_err(|e| anyhow::anyhow!("{}: not a readable .npy file: {e}", path.display()))?;
    match config {
        ModelConfig::ViT(c) => {
            if t.kind() != Kind::Float {
                bail!(
                    "{}: images must be float32 [B, C, H, W], found {:?}",
                    path.display(),
                    t.kind()
                );
            }
            let s = t.size();
            if s.len() != 4
                || s[1] != c.num_channels
                || s[2] != c.image_size
                || s[3] != c.image_size
            {
                bail!(
                    "{}: shape {s:?}, the model expects [B, {}, {}, {}]",
                    path.display(),
                    c.num_channels,
                    c.image_size,
                    c.image_size
                );
            }
            Ok(t)
        }
        ModelConfig::GPT2(_) => {
            if !matches!(t.kind(), Kind::Int64 | Kind::Int) {
                bail!(
                    "{}: token ids must be int64 [B, T], found {:?}",
                    path.display(),
                    t.kind()
                );
            }
            if t.dim() != 2 {
                bail!("{}: shape {:?}, expected [B, T]", path.display(), t.size());
            }
            Ok(t.to_kind(Kind::Int64))
        }
    }
}

pub fn write_npy_atomic(t: &Tensor, out: &Path) -> Result<()> {
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp.npy",
        out.file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    t.write_npy(&tmp)
        .with_context(|| tmp.display().to_string())?;
    std::fs::rename(&tmp, out).with_context(|| out.display().to_string())?;
    Ok(())
}
