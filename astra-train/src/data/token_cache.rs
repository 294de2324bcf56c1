//! Token streams of a `parquet:` sample, cached so a second run with the same spec starts at
//! once: one safetensors file per sample with the `train`, `valid` and `test` streams as U16
//! (GPT-2's ids fit) and a metadata entry `key` describing what was tokenized.
//!
//! The cache folder is `$ASTRA_CACHE/tokens`, else `$XDG_CACHE_HOME/astra/tokens`, else
//! `~/.cache/astra/tokens`. The key names every shard by canonical path, size and modification
//! time, the column, the sample (max-docs, seed), the split rule and the tokenizer, so a changed
//! shard or spec misses the cache instead of reading stale tokens. A cache that cannot be read
//! or written costs a warning and a re-tokenization, never the run.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::parquet_docs::DocSpec;
use super::text::{TokenCorpus, GPT2_VOCAB};
use crate::error::{Result, TrainError};

/// Bump when the split rule or stream layout changes: old caches then miss.
const FORMAT: &str = "astra-token-cache v1; split: 0.5% test, 0.5% valid (1..5000 docs each), \
                      then max-docs; <|endoftext|> after each document";
const TOKENIZER: &str = "gpt2 r50k_base (tiktoken-rs)";

/// What a cached file holds, and where it lives.
pub struct Key {
    description: String,
    path: PathBuf,
}

impl Key {
    pub fn of(spec: &DocSpec) -> Result<Self> {
        let mut d = format!(
            "{FORMAT}\ntokenizer: {TOKENIZER}\ncolumn: {}\nmax-docs: {:?}\nseed: {}\n",
            spec.column, spec.max_docs, spec.seed
        );
        for f in &spec.files {
            let meta = std::fs::metadata(f).map_err(TrainError::io(f))?;
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |t| t.as_nanos());
            let canon = f.canonicalize().unwrap_or_else(|_| f.clone());
            d.push_str(&format!("{} {} {modified}\n", canon.display(), meta.len()));
        }
        let hash: String = Md5::digest(d.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Key {
            path: folder().join(format!("parquet-{}.safetensors", &hash[..16])),
            description: d,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn folder() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let base = env("ASTRA_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("astra")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("astra")))
        .unwrap_or_else(|| std::env::temp_dir().join("astra-cache"));
    base.join("tokens")
}

/// The cached corpus of `key`, or None (missing, or unreadable: then a warning).
pub fn load(key: &Key, files: &[PathBuf]) -> Option<TokenCorpus> {
    if !key.path.exists() {
        return None;
    }
    match read(key, files) {
        Ok(c) => {
            eprintln!("Tokens from the cache {}", key.path.display());
            Some(c)
        }
        Err(e) => {
            eprintln!("warning: token cache {e}; tokenizing again");
            None
        }
    }
}

fn read(key: &Key, files: &[PathBuf]) -> Result<TokenCorpus> {
    let bad = |r: String| TrainError::File {
        path: key.path.clone(),
        reason: r,
    };
    let bytes = std::fs::read(&key.path).map_err(TrainError::io(&key.path))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a readable safetensors file: {e:?}")))?;
    let described = header.metadata().as_ref().and_then(|m| m.get("key"));
    if described != Some(&key.description) {
        return Err(bad("describes another sample (hash collision?)".into()));
    }
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a readable safetensors file: {e:?}")))?;
    let stream = |name: &str| -> Result<Vec<u32>> {
        let t = st
            .tensor(name)
            .map_err(|_| bad(format!("has no '{name}' stream")))?;
        if t.dtype() != Dtype::U16 {
            return Err(bad(format!("'{name}' is {:?}, not U16", t.dtype())));
        }
        let ids: Vec<u32> = t
            .data()
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
            .collect();
        match ids.iter().find(|&&t| t as i64 >= GPT2_VOCAB) {
            Some(t) => Err(bad(format!(
                "'{name}' holds id {t}, outside GPT-2's vocabulary"
            ))),
            None => Ok(ids),
        }
    };
    Ok(TokenCorpus {
        train: stream("train")?,
        valid: stream("valid")?,
        test: stream("test")?,
        files: files.to_vec(),
    })
}

/// Writes `corpus` under `key` atomically; a failure is a warning (the run goes on uncached).
pub fn store(key: &Key, corpus: &TokenCorpus) {
    if let Err(e) = write(key, corpus) {
        eprintln!(
            "warning: cannot write the token cache {}: {e}",
            key.path.display()
        );
    }
}

fn write(key: &Key, corpus: &TokenCorpus) -> std::io::Result<()> {
    let le =
        |ids: &[u32]| -> Vec<u8> { ids.iter().flat_map(|&t| (t as u16).to_le_bytes()).collect() };
    let owned = [
        ("train", le(&corpus.train)),
        ("valid", le(&corpus.valid)),
        ("test", le(&corpus.test)),
    ];
    let views = owned.iter().map(|(name, data)| {
        let view = TensorView::new(Dtype::U16, vec![data.len() / 2], data).expect("sizes match");
        (name.to_string(), view)
    });
    let meta = HashMap::from([("key".to_string(), key.description.clone())]);
    astra_quant::atomic::write_via(&key.path, |tmp| {
        safetensors::serialize_to_file(views, &Some(meta), tmp).map_err(std::io::Error::other)
    })
}
