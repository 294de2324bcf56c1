//! `LlamaForCausalLM`'s configuration, and the Mistral and Qwen2 configurations the same model
//! covers (`model_type` llama, mistral, qwen2), read from HF config.json files of transformers 4
//! (`rope_theta` + `rope_scaling`) and 5 (`rope_parameters`) alike.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::positive;
use crate::error::{Result, TrainError};

/// Which HF architecture a config names; they differ only in details the model takes as flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlamaFamily {
    Llama,
    /// Mistral: Llama with a sliding window (sequences beyond it are refused, not windowed).
    Mistral,
    /// Qwen2: biases on the query, key and value projections (not on the output one).
    Qwen2,
}

impl LlamaFamily {
    pub fn model_type(self) -> &'static str {
        match self {
            LlamaFamily::Llama => "llama",
            LlamaFamily::Mistral => "mistral",
            LlamaFamily::Qwen2 => "qwen2",
        }
    }
    pub fn from_model_type(t: &str) -> Option<Self> {
        Some(match t {
            "llama" => LlamaFamily::Llama,
            "mistral" => LlamaFamily::Mistral,
            "qwen2" => LlamaFamily::Qwen2,
            _ => return None,
        })
    }
    /// The HF class that loads an exported folder.
    pub fn architecture(self) -> &'static str {
        match self {
            LlamaFamily::Llama => "LlamaForCausalLM",
            LlamaFamily::Mistral => "MistralForCausalLM",
            LlamaFamily::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// How rotary frequencies are scaled for long contexts (HF `rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub family: LlamaFamily,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v and o (Llama's `attention_bias`); Qwen2 has them on q, k, v only.
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// Mistral's window: a sequence longer than it is refused.
    pub sliding_window: Option<i64>,
}

/// The fields as a config.json holds them (either transformers generation).
#[derive(Deserialize)]
struct File {
    vocab_size: i64,
    hidden_size: i64,
    intermediate_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    num_key_value_heads: Option<i64>,
    head_dim: Option<i64>,
    #[serde(default = "d_positions")]
    max_position_embeddings: i64,
    #[serde(default = "d_rms_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    sliding_window: Option<i64>,
    use_sliding_window: Option<bool>,
    #[serde(default = "d_silu")]
    hidden_act: String,
}

fn d_positions() -> i64 {
    2048
}
fn d_rms_eps() -> f64 {
    1e-6
}
fn d_silu() -> String {
    "silu".into()
}

impl LlamaConfig {
    /// A Llama of the given shape for training from scratch or for tests: head_dim = hidden /
    /// heads, RoPE θ = 10⁴ without scaling, RMSNorm ε = 1e-5, no biases, untied embeddings.
    /// Arguments in config.json's order of size: vocabulary, width, depth, query heads,
    /// key/value heads, MLP width, context.
    pub fn scratch(
        vocab: i64,
        hidden: i64,
        layers: i64,
        heads: i64,
        kv_heads: i64,
        mlp: i64,
        positions: i64,
    ) -> Self {
        LlamaConfig {
            family: LlamaFamily::Llama,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: mlp,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: if heads > 0 { hidden / heads } else { 0 },
            max_position_embeddings: positions,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::Default,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            sliding_window: None,
        }
    }

    /// From a config.json object whose `model_type` is `family`'s.
    pub fn from_value(family: LlamaFamily, v: Value) -> std::result::Result<Self, String> {
        let f: File = serde_json::from_value(v).map_err(|e| format!("config: {e}"))?;
        if f.hidden_act != "silu" {
            return Err(format!(
                "config field hidden_act: '{}' is not silu",
                f.hidden_act
            ));
        }
        // transformers 5 keeps theta and scaling in rope_parameters; 4 has rope_theta and an
        // optional rope_scaling whose type key is `rope_type` (or, older, `type`).
        let rope = f.rope_parameters.or(f.rope_scaling).unwrap_or(Value::Null);
        let rope_theta = rope["rope_theta"]
            .as_f64()
            .or(f.rope_theta)
            .unwrap_or(10_000.0);
        let rope_scaling = rope_scaling(&rope)?;
        // Qwen2 configs carry a sliding_window that only applies with use_sliding_window.
        let sliding_window = match (family, f.use_sliding_window) {
            (LlamaFamily::Qwen2, Some(true)) => {
                return Err(
                    "config field use_sliding_window: sliding-window attention is not \
                            supported"
                        .into(),
                )
            }
            (LlamaFamily::Qwen2, _) => None,
            _ => f.sliding_window,
        };
        let heads = f.num_attention_heads;
        let c = LlamaConfig {
            family,
            vocab_size: f.vocab_size,
            hidden_size: f.hidden_size,
            intermediate_size: f.intermediate_size,
            num_hidden_layers: f.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: f.num_key_value_heads.unwrap_or(heads),
            head_dim: f
                .head_dim
                .unwrap_or(if heads > 0 { f.hidden_size / heads } else { 0 }),
            max_position_embeddings: f.max_position_embeddings,
            rms_norm_eps: f.rms_norm_eps,
            rope_theta,
            rope_scaling,
            // Llama and Mistral default to untied heads, Qwen2 to untied too (its small models
            // say tie_word_embeddings: true explicitly).
            tie_word_embeddings: f.tie_word_embeddings.unwrap_or(false),
            attention_bias: f.attention_bias,
            mlp_bias: f.mlp_bias,
            sliding_window,
        };
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    /// config.json as transformers 4 writes it (transformers 5 reads it too), with `model_type`.
    pub fn to_value(&self) -> Value {
        let mut v = json!({
            "model_type": self.family.model_type(),
            "architectures": [self.family.architecture()],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "sliding_window": self.sliding_window,
        });
        v["rope_scaling"] = match &self.rope_scaling {
            RopeScaling::Default => Value::Null,
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        v
    }

    /// Width of the keys (and of the values): key/value heads × head width.
    pub fn kv_dim(&self) -> i64 {
        self.num_key_value_heads * self.head_dim
    }

    pub fn validate(&self) -> Result<()> {
        positive("vocab_size", self.vocab_size)?;
        positive("hidden_size", self.hidden_size)?;
        positive("intermediate_size", self.intermediate_size)?;
        positive("num_hidden_layers", self.num_hidden_layers)?;
        positive("num_attention_heads", self.num_attention_heads)?;
        positive("num_key_value_heads", self.num_key_value_heads)?;
        positive("head_dim", self.head_dim)?;
        positive("max_position_embeddings", self.max_position_embeddings)?;
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(TrainError::config(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(TrainError::config(
                "head_dim",
                format!("{} is odd (rotary embeddings rotate pairs)", self.head_dim),
            ));
        }
        Ok(())
    }
}

fn rope_scaling(rope: &Value) -> std::result::Result<RopeScaling, String> {
    let kind = rope["rope_type"]
        .as_str()
        .or(rope["type"].as_str())
        .unwrap_or("default");
    let num = |k: &str| {
        rope[k]
            .as_f64()
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| {
                format!("config field rope_scaling.{k}: missing or not a positive number")
            })
    };
    Ok(match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: num("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => {
            return Err(format!(
                "config field rope_scaling: rope_type '{other}' is not supported (default, linear, llama3)"
            ))
        }
    })
}

// LlamaConfig (de)serialises through config.json's own layout (see ModelConfig).
impl Serialize for LlamaConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}
