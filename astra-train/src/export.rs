//! `astra-train export`: a trained model as a Hugging Face folder — config.json (with
//! `architectures`, so `AutoModel*` classes resolve it) and model.safetensors, which Python
//! `transformers` loads as `ViTForImageClassification` / `GPT2LMHeadModel` — with the ASTRA
//! codebooks beside it (`codebooks.safetensors`) when the model has them. The folder is built
//! under a temporary name and renamed into place, so a failed export leaves nothing half-written.

use std::path::{Path, PathBuf};

use tch::Device;

use crate::error::{Result, TrainError};
use crate::model::{resolve, Model};

pub struct Exported {
    pub dir: PathBuf,
    pub architecture: &'static str,
    pub codebooks: bool,
}

pub fn export(spec: &str, out: &Path) -> Result<Exported> {
    export_with(spec, out, None)
}

/// [`export`], optionally with the linear layers stored quantized (`quantize-weights`).
pub fn export_with(
    spec: &str,
    out: &Path,
    quant: Option<&crate::weight_quant::WeightQuant>,
) -> Result<Exported> {
    if let Some(q) = quant {
        q.validate()?;
    }
    if out.exists() {
        return Err(TrainError::File {
            path: out.into(),
            reason: "already exists; export writes a new folder (nothing was changed)".into(),
        });
    }
    let src = resolve(spec)?;
    let (model, _) = Model::load(&src.to_string_lossy(), Device::Cpu)?;
    let codebooks = src.join("codebooks.safetensors");
    let has_codebooks = codebooks.exists();
    if has_codebooks {
        let file = astra_quant::CodebookFile::load(&codebooks)?;
        crate::models::vq::check_codebooks(&file, model.quantizers(), model.quantized_width())?;
    }
    let name = out.file_name().ok_or_else(|| {
        TrainError::invalid("out", format!("{} has no folder name", out.display()))
    })?;
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let io = |p: &Path| TrainError::io(p);
    let result = (|| -> Result<&'static str> {
        match quant {
            None => model.save(&tmp)?,
            Some(q) => {
                std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
                let mut named: Vec<(String, tch::Tensor)> =
                    model.vs.variables().into_iter().collect();
                named.sort_by(|a, b| a.0.cmp(&b.0));
                let gpt2 = matches!(model.config, crate::config::ModelConfig::GPT2(_));
                let stored = crate::weight_quant::quantize(named, q, gpt2)?;
                crate::train::run::write_safetensors_atomic(
                    &tmp.join("model.safetensors"),
                    &stored,
                )?;
            }
        }
        let architecture = model.config.architecture();
        let mut cfg = model.config.to_value();
        if let Some(q) = quant {
            cfg["quantization_config"] = q.config_entry();
        }
        cfg["architectures"] = serde_json::json!([architecture]);
        cfg["torch_dtype"] = serde_json::json!("float32");
        if has_codebooks {
            cfg["astra_codebooks"] = serde_json::json!("codebooks.safetensors");
        }
        let cp = tmp.join("config.json");
        std::fs::write(
            &cp,
            serde_json::to_string_pretty(&cfg).expect("serialisable"),
        )
        .map_err(io(&cp))?;
        if has_codebooks {
            let dst = tmp.join("codebooks.safetensors");
            std::fs::copy(&codebooks, &dst).map_err(io(&dst))?;
        }
        Ok(architecture)
    })();
    match result {
        Ok(architecture) => {
            std::fs::rename(&tmp, out).map_err(io(out))?;
            Ok(Exported {
                dir: out.into(),
                architecture,
                codebooks: has_codebooks,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}
