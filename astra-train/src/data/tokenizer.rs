//! How a language model's text becomes token ids and back: the model folder's own
//! `tokenizer.json` (HF tokenizers: Llama, Qwen2, Mistral checkpoints), else GPT-2 BPE (GPT-2
//! checkpoints, and every model trained here on text).

use std::path::Path;

use crate::error::{Result, TrainError};

pub enum TextCodec {
    Gpt2,
    Hf(Box<tokenizers::Tokenizer>),
}

impl TextCodec {
    /// The codec of the model folder `dir` whose vocabulary has `vocab` entries.
    pub fn for_model(dir: &Path, vocab: i64) -> Result<Self> {
        let file = dir.join("tokenizer.json");
        if file.exists() {
            let t = tokenizers::Tokenizer::from_file(&file).map_err(|e| TrainError::File {
                path: file.clone(),
                reason: format!("not a tokenizers file: {}", first_line(&e.to_string())),
            })?;
            let size = t.get_vocab_size(true) as i64;
            if size > vocab {
                return Err(TrainError::File {
                    path: file,
                    reason: format!("{size} tokens, the model's vocabulary has {vocab}"),
                });
            }
            return Ok(TextCodec::Hf(Box::new(t)));
        }
        if vocab < super::text::GPT2_VOCAB {
            return Err(TrainError::File {
                path: file,
                reason: format!(
                    "missing, and a vocabulary of {vocab} is not GPT-2's BPE: give token ids instead of text"
                ),
            });
        }
        Ok(TextCodec::Gpt2)
    }

    /// Token ids of `text` (with the tokenizer's special tokens, e.g. Llama's BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            TextCodec::Gpt2 => Ok(super::text::encode(text)),
            TextCodec::Hf(t) => t
                .encode(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TrainError::invalid("prompt", first_line(&e.to_string()))),
        }
    }

    /// The text of `ids` (special tokens skipped); for GPT-2 only the complete UTF-8 prefix, so a
    /// stream never prints half a character.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            TextCodec::Gpt2 => {
                let bytes = super::text::decode_bytes(ids).ok_or_else(|| {
                    TrainError::invalid("tokens", "an id outside GPT-2's vocabulary")
                })?;
                let valid = match std::str::from_utf8(&bytes) {
                    Ok(s) => s.len(),
                    Err(e) => e.valid_up_to(),
                };
                Ok(String::from_utf8_lossy(&bytes[..valid]).into_owned())
            }
            TextCodec::Hf(t) => t
                .decode(ids, true)
                .map_err(|e| TrainError::invalid("tokens", first_line(&e.to_string()))),
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}
