//! Loading HF safetensors checkpoints into our VarStores by name, with clear errors, the naming
//! variants of HF checkpoints (with or without the `vit.` / `transformer.` prefix), and position
//! embeddings interpolated when the image size differs from the checkpoint's.

use std::collections::HashMap;
use std::path::Path;

use tch::{nn, Kind, Tensor};

use crate::error::{Result, TrainError};

/// What loading did besides copying: parameters left at their fresh initialisation (allowed
/// prefixes only, e.g. a new classifier), and file tensors we do not use.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: usize,
    pub fresh: Vec<String>,
    pub unused: Vec<String>,
    pub interpolated: Vec<String>,
}

/// Copies the tensors of `path` into the variables of `vs`. A variable missing from the file is an
/// error unless its name starts with one of `may_be_fresh`.
pub fn load_safetensors(
    vs: &nn::VarStore,
    path: &Path,
    may_be_fresh: &[&str],
) -> Result<LoadReport> {
    // Weights stored quantized (`astra-train quantize-weights`) are dequantized on load.
    let mut by_name = crate::weight_quant::dequantize(read_tensors(path)?)?;
    let mut report = LoadReport::default();
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in vars {
        let alias = ["vit.", "transformer."]
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .map(str::to_string);
        let src = by_name
            .remove(&name)
            .or_else(|| alias.as_ref().and_then(|a| by_name.remove(a)));
        let Some(src) = src else {
            if may_be_fresh.iter().any(|p| name.starts_with(p)) {
                report.fresh.push(name);
                continue;
            }
            return Err(TrainError::Weight {
                name,
                reason: format!("missing from {}", path.display()),
            });
        };
        // A head of another size (fine-tuning to a new label set) starts fresh, as HF's
        // ignore_mismatched_sizes does for the head.
        if src.size() != var.size() && may_be_fresh.iter().any(|p| name.starts_with(p)) {
            report.fresh.push(name);
            continue;
        }
        let src = if src.size() != var.size() && name.ends_with("position_embeddings") {
            report.interpolated.push(name.clone());
            interpolate_positions(&src, &var.size()).map_err(|reason| TrainError::Weight {
                name: name.clone(),
                reason,
            })?
        } else {
            src
        };
        if src.size() != var.size() {
            return Err(TrainError::Weight {
                name,
                reason: format!(
                    "shape {:?} in {}, the model expects {:?}",
                    src.size(),
                    path.display(),
                    var.size()
                ),
            });
        }
        if src.is_floating_point() && !bool::try_from(src.isfinite().all())? {
            return Err(TrainError::Weight {
                name,
                reason: format!("holds NaN or infinite values in {}", path.display()),
            });
        }
        tch::no_grad(|| {
            let mut v = var.shallow_clone();
            v.copy_(&src.to_kind(var.kind()).to_device(var.device()));
        });
        report.loaded += 1;
    }
    report.unused = by_name.into_keys().collect();
    report.unused.sort();
    Ok(report)
}

/// The tensors of a safetensors file, or of every shard a `*.safetensors.index.json` names (HF's
/// sharded checkpoints: `weight_map` from tensor name to shard file, beside the index).
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let read = |p: &Path| {
        Tensor::read_safetensors(p).map_err(|e| TrainError::File {
            path: p.into(),
            reason: format!("cannot read safetensors: {e}"),
        })
    };
    if !path.to_string_lossy().ends_with(".index.json") {
        return Ok(read(path)?.into_iter().collect());
    }
    let bad = |reason: String| TrainError::File {
        path: path.into(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = index["weight_map"]
        .as_object()
        .ok_or_else(|| bad("no weight_map object".into()))?;
    let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
    if shards.len() != map.len() {
        return Err(bad("weight_map values must be shard file names".into()));
    }
    shards.sort();
    shards.dedup();
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut all = HashMap::new();
    for shard in shards {
        if shard.contains('/') || shard.contains("..") {
            return Err(bad(format!(
                "shard '{shard}' is not a file beside the index"
            )));
        }
        all.extend(read(&dir.join(shard))?);
    }
    Ok(all)
}

/// ViT position embeddings [1, 1 + g², D] → [1, 1 + h², D]: the CLS position kept, the g × g grid
/// resized bicubically (as HF's interpolate_pos_encoding does).
fn interpolate_positions(src: &Tensor, want: &[i64]) -> std::result::Result<Tensor, String> {
    let (s, w) = (src.size(), want);
    let side = |n: i64| {
        let r = ((n - 1) as f64).sqrt().round() as i64;
        (r * r == n - 1).then_some(r)
    };
    let (Some(g), Some(h)) = (side(s[1]), side(w[1])) else {
        return Err(format!(
            "shape {s:?} cannot be resized to {w:?} (grids must be square)"
        ));
    };
    if s.len() != 3 || s[2] != w[2] {
        return Err(format!("shape {s:?} cannot be resized to {w:?}"));
    }
    let d = s[2];
    let cls = src.narrow(1, 0, 1);
    let grid = src
        .narrow(1, 1, g * g)
        .reshape([1, g, g, d])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float);
    let resized = grid
        .upsample_bicubic2d([h, h], false, None, None)
        .permute([0, 2, 3, 1])
        .reshape([1, h * h, d]);
    Ok(Tensor::cat(&[cls.to_kind(Kind::Float), resized], 1))
}
