//! A model loaded from an HF-style folder (config.json + model.safetensors) or resolved by name
//! (`org/name`) through the Hugging Face cache (HF_HOME), downloading when online.

use std::path::{Path, PathBuf};

use tch::{nn, Device, Tensor};

use crate::config::ModelConfig;
use crate::engine::{AstraModel, RemoteKv};
use crate::error::{Result, TrainError};
use crate::models::gpt2::Gpt2;
use crate::models::llama::Llama;
use crate::models::vit::ViT;
use crate::models::{Astra, AstraOutput, GroupedVq, VqConfig};
use crate::weights::{load_safetensors, LoadReport};

/// The backbones, registered here: a new model is one file and one variant (plus its arm in
/// [`Model::new`] and [`Model::astra_model`]).
pub enum Backbone {
    ViT(ViT),
    Gpt2(Gpt2),
    Llama(Llama),
}

pub struct Model {
    pub vs: nn::VarStore,
    pub net: Backbone,
    pub config: ModelConfig,
}

impl Model {
    /// A freshly initialised model for `config`.
    pub fn new(config: ModelConfig, device: Device) -> Result<Self> {
        let vs = nn::VarStore::new(device);
        let net = match &config {
            ModelConfig::ViT(c) => Backbone::ViT(ViT::new(&vs.root(), c)?),
            ModelConfig::GPT2(c) => Backbone::Gpt2(Gpt2::new(&vs.root(), c)?),
            ModelConfig::Llama(c) => Backbone::Llama(Llama::new(&vs.root(), c)?),
        };
        Ok(Model { vs, net, config })
    }

    /// From a folder with config.json and model.safetensors, or a hub id `org/name`. Every
    /// parameter must be in the file, in its shape, and finite: a model missing its classifier is
    /// an error here, never a random head.
    pub fn load(spec: &str, device: Device) -> Result<(Self, LoadReport)> {
        let dir = resolve(spec)?;
        let config = ModelConfig::load(&dir.join("config.json"))?;
        Self::load_from(&dir, config, device, &[])
    }

    /// The starting point of a fine-tuning run: [`Self::load`] with the checkpoint's config
    /// adjusted first (another image size: position embeddings are interpolated; another label
    /// set: `adjust` changes the label count). The classifier alone may then start fresh, when the
    /// checkpoint has none (a backbone) or one of another size; the report names it.
    pub fn load_for_finetuning(
        spec: &str,
        device: Device,
        adjust: impl FnOnce(&mut ModelConfig),
    ) -> Result<(Self, LoadReport)> {
        let dir = resolve(spec)?;
        let mut config = ModelConfig::load(&dir.join("config.json"))?;
        adjust(&mut config);
        Self::load_from(&dir, config, device, &["classifier."])
    }

    fn load_from(
        dir: &Path,
        config: ModelConfig,
        device: Device,
        may_be_fresh: &[&str],
    ) -> Result<(Self, LoadReport)> {
        let model = Self::new(config, device)?;
        let weights = WEIGHT_FILES
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .expect("resolve checked");
        let report = load_safetensors(&model.vs, &weights, may_be_fresh)?;
        Ok((model, report))
    }

    /// Writes an HF-style folder: config.json and model.safetensors (atomically, file by file).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let config = dir.join("config.json");
        astra_quant::atomic::write_bytes(&config, self.config.to_json().as_bytes())
            .map_err(TrainError::io(&config))?;
        let mut named: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        crate::train::run::write_safetensors_atomic(&dir.join("model.safetensors"), &named)
    }

    pub fn layers(&self) -> i64 {
        self.astra_model().blocks() as i64
    }

    pub fn hidden(&self) -> i64 {
        self.astra_model().hidden()
    }

    /// Quantizers of the model (a codebook file holds one block of codewords per quantizer):
    /// blocks × quantizers per block.
    pub fn quantizers(&self) -> i64 {
        let m = self.astra_model();
        (m.blocks() * m.quantizers_per_block()) as i64
    }

    /// Width of what each quantizer sees (the residual stream, or Llama's keys/values).
    pub fn quantized_width(&self) -> i64 {
        self.astra_model().quantized_width()
    }

    pub fn forward(&self, input: &Tensor) -> Result<Tensor> {
        self.astra_model().forward(input)
    }

    pub fn forward_astra(&self, input: &Tensor, astra: Astra) -> Result<AstraOutput> {
        self.astra_model().forward_astra(input, astra)
    }

    /// The block quantizers of the codebook file at `path` for this model: loaded, checked
    /// against its blocks and width (errors name the file), built on `device` with `cfg`.
    pub fn load_quantizers(
        &self,
        path: &Path,
        cfg: &VqConfig,
        device: Device,
    ) -> Result<Vec<GroupedVq>> {
        let file = astra_quant::CodebookFile::load(path)?;
        crate::models::vq::check_codebooks(&file, self.quantizers(), self.quantized_width())
            .map_err(|e| TrainError::File {
                path: path.into(),
                reason: e.to_string(),
            })?;
        Ok(crate::models::vq::quantizers_of(&file, cfg, device))
    }

    /// The backbone as ASTRA sees it (the device engine's view of the model).
    pub fn astra_model(&self) -> &dyn AstraModel {
        match &self.net {
            Backbone::ViT(m) => m,
            Backbone::Gpt2(m) => m,
            Backbone::Llama(m) => m,
        }
    }

    /// The per-device path: N device engines exchanging in memory; remote tokens are decoded
    /// codewords (or, without quantizers, the embeddings themselves).
    pub fn forward_per_device(&self, input: &Tensor, astra: Astra) -> Result<Tensor> {
        self.per_device(input, astra, RemoteKv::Decode)
    }

    /// Every block's input for the content tokens (calibration).
    pub fn block_inputs(&self, input: &Tensor) -> Result<Vec<Tensor>> {
        self.astra_model().block_inputs(input)
    }

    /// The per-device path with fast remote keys/values: devices exchange only indices, and a
    /// receiver turns them into keys and values with per-codeword tables. Needs quantizers.
    pub fn forward_per_device_fast(&self, input: &Tensor, astra: Astra) -> Result<Tensor> {
        if astra.vq.is_none() {
            return Err(TrainError::invalid(
                "fast path",
                "needs codebooks (remote tokens must be codewords)",
            ));
        }
        self.per_device(input, astra, RemoteKv::Tables)
    }

    fn per_device(&self, input: &Tensor, astra: Astra, kv: RemoteKv) -> Result<Tensor> {
        if astra.link_loss.is_some() {
            return Err(TrainError::invalid(
                "link loss",
                "is simulated on the masked path only",
            ));
        }
        let vq: &[GroupedVq] = astra.vq.as_deref().unwrap_or(&[]);
        crate::engine::run_in_memory(
            self.astra_model(),
            input,
            astra.partition,
            astra.cls,
            vq,
            kv,
        )
    }

    /// Content tokens of an input: patches of an image batch, or the sequence length.
    pub fn content_tokens(&self, input: &Tensor) -> i64 {
        self.astra_model().content_tokens(input)
    }
}

/// The weights of a model folder, in order of preference: one file, HF's sharded index, a run's
/// best checkpoint.
const WEIGHT_FILES: [&str; 3] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "best.safetensors",
];

/// A folder path as is; otherwise a hub id looked up in the HF cache, then downloaded.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    let p = Path::new(spec);
    // A training run keeps its exported model in model/.
    if p.join("model").join("config.json").exists() {
        return resolve(&p.join("model").to_string_lossy());
    }
    if p.is_dir() {
        if !p.join("config.json").exists() {
            return Err(TrainError::File {
                path: p.join("config.json"),
                reason: "missing (a model folder holds config.json and model.safetensors)".into(),
            });
        }
        if !WEIGHT_FILES.iter().any(|f| p.join(f).exists()) {
            return Err(TrainError::File {
                path: p.join("model.safetensors"),
                reason: "missing (nor is there a sharded model.safetensors.index.json or a \
                         run's best.safetensors)"
                    .into(),
            });
        }
        return Ok(p.to_path_buf());
    }
    // A hub id is exactly `org/name`; anything else that is not an existing folder (an absolute
    // or relative path, a nested path) is a missing folder, not something to download.
    let hub_like = spec.matches('/').count() == 1
        && !spec.starts_with(['/', '.', '~'])
        && !spec.ends_with('/');
    if !hub_like || p.exists() {
        return Err(TrainError::File {
            path: p.into(),
            reason: if p.exists() {
                "not a model folder".into()
            } else {
                "no such model folder (and not a hub id org/name)".into()
            },
        });
    }
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(spec.to_string());
    if let Some(cfg) = repo.get("config.json") {
        let dir = cfg.parent().expect("snapshot folder").to_path_buf();
        if repo.get("model.safetensors").is_some() || cached_shards(&dir) {
            return Ok(dir);
        }
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .build()
        .map_err(|e| TrainError::invalid(format!("model {spec}"), format!("hub client: {e}")))?;
    let repo = api.model(spec.to_string());
    let fetch = |f: &str| {
        repo.get(f).map_err(|e| {
            TrainError::invalid(
                format!("model {spec}"),
                format!(
                    "not in the HF cache ({}) and the download of {f} failed: {e}",
                    cache.path().display()
                ),
            )
        })
    };
    let cfg = fetch("config.json")?;
    if fetch("model.safetensors").is_err() {
        // Large checkpoints are sharded: the index, then every shard it names.
        let index = fetch("model.safetensors.index.json")?;
        for shard in shard_names(&index) {
            fetch(&shard)?;
        }
    }
    Ok(cfg.parent().expect("snapshot folder").to_path_buf())
}

/// Shard files named by a sharded checkpoint's index (empty when it cannot be read).
fn shard_names(index: &Path) -> Vec<String> {
    let v: serde_json::Value = std::fs::read_to_string(index)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let mut names: Vec<String> = v["weight_map"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.dedup();
    names
}

/// Whether a cached snapshot holds a sharded checkpoint complete: its index and every shard.
fn cached_shards(dir: &Path) -> bool {
    let index = dir.join("model.safetensors.index.json");
    let names = shard_names(&index);
    !names.is_empty() && names.iter().all(|n| dir.join(n).exists())
}
