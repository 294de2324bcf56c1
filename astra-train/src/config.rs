//! Model configurations read from Hugging Face `config.json` files (ViTConfig, GPT2Config), with
//! the HF defaults for fields a file may omit and a one-line error naming a field that is wrong.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

mod llama;
pub use llama::{LlamaConfig, LlamaFamily, RopeScaling};

fn d_image() -> i64 {
    224
}
fn d_patch() -> i64 {
    16
}
fn d_channels() -> i64 {
    3
}
fn d_vit_eps() -> f64 {
    1e-12
}
fn d_true() -> bool {
    true
}
fn d_gelu() -> String {
    "gelu".into()
}

/// `ViTForImageClassification`'s configuration (the fields this implementation uses).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ViTConfig {
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    #[serde(default = "d_image")]
    pub image_size: i64,
    #[serde(default = "d_patch")]
    pub patch_size: i64,
    #[serde(default = "d_channels")]
    pub num_channels: i64,
    #[serde(default = "d_vit_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
    #[serde(default = "d_gelu")]
    pub hidden_act: String,
    /// Number of classes: HF stores `id2label`; `num_labels` is accepted too.
    #[serde(default)]
    pub num_labels: Option<i64>,
    #[serde(default)]
    pub id2label: Option<std::collections::BTreeMap<String, String>>,
}

impl ViTConfig {
    pub fn classes(&self) -> i64 {
        self.num_labels
            .or_else(|| self.id2label.as_ref().map(|m| m.len() as i64))
            .unwrap_or(2)
    }
    pub fn patches_per_side(&self) -> i64 {
        self.image_size / self.patch_size
    }
    pub fn num_patches(&self) -> i64 {
        self.patches_per_side() * self.patches_per_side()
    }

    /// google/vit-base-patch16-224 shape with `classes` outputs.
    pub fn vit_base_patch16_224(classes: i64) -> Self {
        ViTConfig {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            image_size: 224,
            patch_size: 16,
            num_channels: 3,
            layer_norm_eps: 1e-12,
            qkv_bias: true,
            hidden_act: "gelu".into(),
            num_labels: Some(classes),
            id2label: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        positive("hidden_size", self.hidden_size)?;
        positive("num_hidden_layers", self.num_hidden_layers)?;
        positive("num_attention_heads", self.num_attention_heads)?;
        positive("intermediate_size", self.intermediate_size)?;
        positive("image_size", self.image_size)?;
        positive("patch_size", self.patch_size)?;
        positive("num_channels", self.num_channels)?;
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(TrainError::config(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if self.image_size % self.patch_size != 0 {
            return Err(TrainError::config(
                "patch_size",
                format!(
                    "{} does not divide image_size {}",
                    self.patch_size, self.image_size
                ),
            ));
        }
        if !matches!(self.hidden_act.as_str(), "gelu" | "gelu_new" | "relu") {
            return Err(TrainError::config(
                "hidden_act",
                format!("'{}' is not gelu, gelu_new or relu", self.hidden_act),
            ));
        }
        positive("num_labels", self.classes())
    }
}

fn d_gpt2_eps() -> f64 {
    1e-5
}
fn d_gelu_new() -> String {
    "gelu_new".into()
}

/// `GPT2LMHeadModel`'s configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GPT2Config {
    pub vocab_size: i64,
    pub n_positions: i64,
    pub n_embd: i64,
    pub n_layer: i64,
    pub n_head: i64,
    #[serde(default)]
    pub n_inner: Option<i64>,
    #[serde(default = "d_gpt2_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "d_gelu_new")]
    pub activation_function: String,
}

impl GPT2Config {
    pub fn inner(&self) -> i64 {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// gpt2 (124M).
    pub fn gpt2_small() -> Self {
        GPT2Config {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: None,
            layer_norm_epsilon: 1e-5,
            activation_function: "gelu_new".into(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        positive("vocab_size", self.vocab_size)?;
        positive("n_positions", self.n_positions)?;
        positive("n_embd", self.n_embd)?;
        positive("n_layer", self.n_layer)?;
        positive("n_head", self.n_head)?;
        positive("n_inner", self.inner())?;
        if self.n_embd % self.n_head != 0 {
            return Err(TrainError::config(
                "n_head",
                format!("{} does not divide n_embd {}", self.n_head, self.n_embd),
            ));
        }
        if !matches!(
            self.activation_function.as_str(),
            "gelu" | "gelu_new" | "relu"
        ) {
            return Err(TrainError::config(
                "activation_function",
                format!(
                    "'{}' is not gelu, gelu_new or relu",
                    self.activation_function
                ),
            ));
        }
        Ok(())
    }
}

fn positive(field: &'static str, v: i64) -> Result<()> {
    if v <= 0 {
        return Err(TrainError::config(
            field,
            format!("must be positive, got {v}"),
        ));
    }
    Ok(())
}

/// Which model a config.json describes, by its HF `model_type`.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    ViT(ViTConfig),
    GPT2(GPT2Config),
    /// llama, mistral and qwen2: one model with flags.
    Llama(LlamaConfig),
}

impl Serialize for ModelConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Self::parse(v).map_err(serde::de::Error::custom)
    }
}

impl ModelConfig {
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| TrainError::File {
            path: path.into(),
            reason: format!("not valid JSON: {e}"),
        })?;
        Self::from_value(v).map_err(|reason| TrainError::File {
            path: path.into(),
            reason,
        })
    }

    /// From a parsed config.json object, validated (the error says what is wrong, without the
    /// file).
    pub fn from_value(v: serde_json::Value) -> std::result::Result<Self, String> {
        let cfg = Self::parse(v)?;
        match &cfg {
            ModelConfig::ViT(c) => c.validate(),
            ModelConfig::GPT2(c) => c.validate(),
            ModelConfig::Llama(c) => c.validate(),
        }
        .map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    /// By `model_type`, not yet validated (Llama configs validate as they parse).
    fn parse(v: serde_json::Value) -> std::result::Result<Self, String> {
        let kind = v["model_type"].as_str().unwrap_or_default().to_string();
        let err = |e: serde_json::Error| format!("config: {e}");
        Ok(match kind.as_str() {
            "vit" => ModelConfig::ViT(serde_json::from_value(v).map_err(err)?),
            "gpt2" => ModelConfig::GPT2(serde_json::from_value(v).map_err(err)?),
            t => match LlamaFamily::from_model_type(t) {
                Some(f) => ModelConfig::Llama(LlamaConfig::from_value(f, v)?),
                None => {
                    return Err(format!(
                        "config field model_type: '{t}' is not vit, gpt2, llama, mistral or qwen2"
                    ))
                }
            },
        })
    }

    /// The HF class that loads this model's exported folder.
    pub fn architecture(&self) -> &'static str {
        match self {
            ModelConfig::ViT(_) => "ViTForImageClassification",
            ModelConfig::GPT2(_) => "GPT2LMHeadModel",
            ModelConfig::Llama(c) => c.family.architecture(),
        }
    }

    /// Vocabulary and positions of a language model (None for an image classifier).
    pub fn language_model(&self) -> Option<(i64, i64)> {
        match self {
            ModelConfig::ViT(_) => None,
            ModelConfig::GPT2(g) => Some((g.vocab_size, g.n_positions)),
            ModelConfig::Llama(c) => Some((c.vocab_size, c.max_position_embeddings)),
        }
    }

    /// HF-style config.json text (with `model_type`).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("serialisable")
    }

    pub fn to_value(&self) -> serde_json::Value {
        let tagged = |mut v: serde_json::Value, t: &str| {
            v["model_type"] = serde_json::json!(t);
            v
        };
        match self {
            ModelConfig::ViT(c) => tagged(serde_json::to_value(c).expect("serialisable"), "vit"),
            ModelConfig::GPT2(c) => tagged(serde_json::to_value(c).expect("serialisable"), "gpt2"),
            ModelConfig::Llama(c) => c.to_value(),
        }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
        Self::from_json(&text, path)
    }
}
