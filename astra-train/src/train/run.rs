//! The run folder of DESIGN.md: `config.json` (the effective configuration), `metrics.jsonl` (one
//! object per epoch), `summary.csv`, `checkpoints/epoch-N.safetensors` + `state.json`,
//! `best.safetensors`, and `model/` (HF-style config.json + model.safetensors of the best epoch,
//! with `codebooks.safetensors` beside it for ASTRA runs), and `complete.json` once every epoch
//! has run (what scripts test to skip a finished run). Every file is written atomically (temp
//! file + rename) and state.json is written last, so a killed run resumes from its last whole epoch.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::{EvalMetrics, TrainConfig};
use crate::error::{Result, TrainError};
use crate::model::Model;
use crate::models::GroupedVq;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunState {
    pub epoch: usize,
    pub step: usize,
    /// The best epoch's score (accuracy for images, −validation loss for text).
    pub best_score: f64,
    pub best_metrics: Option<EvalMetrics>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    pub step: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    /// Validation perplexity (language models).
    pub test_perplexity: Option<f64>,
    pub lr: f64,
    pub seconds: f64,
}

pub struct RunFolder {
    pub dir: PathBuf,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::File {
        path: path.into(),
        reason: e.to_string(),
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl RunFolder {
    /// A new run in `dir`, or (with `resume`) the existing one, whose config must equal `cfg`.
    pub fn open(dir: &Path, cfg: &TrainConfig, resume: bool) -> Result<Self> {
        let config = dir.join("config.json");
        let text = serde_json::to_string_pretty(cfg).expect("serialisable");
        if config.exists() {
            if !resume {
                return Err(TrainError::File { path: dir.into(), reason: "already holds a run (config.json); pass --resume to continue it or choose another --out".into() });
            }
            let saved: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&config).map_err(io(&config))?)
                    .map_err(|e| TrainError::File {
                        path: config.clone(),
                        reason: format!("corrupt: {e}"),
                    })?;
            let now: serde_json::Value = serde_json::from_str(&text).expect("valid");
            if saved != now {
                let field = now
                    .as_object()
                    .and_then(|o| {
                        o.iter()
                            .find(|(k, v)| saved.get(*k) != Some(*v))
                            .map(|(k, _)| k.clone())
                    })
                    .unwrap_or_default();
                return Err(TrainError::File { path: config, reason: format!("resume with a different configuration (field '{field}' differs); nothing was changed") });
            }
        } else {
            if resume {
                return Err(TrainError::File {
                    path: dir.into(),
                    reason: "nothing to resume (no config.json)".into(),
                });
            }
            std::fs::create_dir_all(dir.join("checkpoints")).map_err(io(dir))?;
            write_atomic(&config, text.as_bytes())?;
        }
        Ok(RunFolder { dir: dir.into() })
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("checkpoints").join("state.json")
    }

    /// The last completed epoch's state and tensors; drops log lines written after it.
    pub fn last_checkpoint(&self) -> Result<Option<(RunState, BTreeMap<String, Tensor>)>> {
        let sp = self.state_path();
        if !sp.exists() {
            return Ok(None);
        }
        let state: RunState = serde_json::from_str(&std::fs::read_to_string(&sp).map_err(io(&sp))?)
            .map_err(|e| TrainError::File {
                path: sp.clone(),
                reason: format!("corrupt: {e}"),
            })?;
        let ck = self
            .dir
            .join("checkpoints")
            .join(format!("epoch-{}.safetensors", state.epoch));
        let tensors = Tensor::read_safetensors(&ck).map_err(|e| TrainError::File {
            path: ck.clone(),
            reason: format!("corrupt checkpoint: {e}"),
        })?;
        self.truncate_logs(state.epoch)?;
        Ok(Some((state, tensors.into_iter().collect())))
    }

    fn truncate_logs(&self, last_epoch: usize) -> Result<()> {
        let mp = self.dir.join("metrics.jsonl");
        if mp.exists() {
            let text = std::fs::read_to_string(&mp).map_err(io(&mp))?;
            let keep: Vec<&str> = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<EpochRecord>(l)
                        .map(|r| r.epoch <= last_epoch)
                        .unwrap_or(false)
                })
                .collect();
            write_atomic(
                &mp,
                (keep.join("\n") + if keep.is_empty() { "" } else { "\n" }).as_bytes(),
            )?;
        }
        let cp = self.dir.join("summary.csv");
        if cp.exists() {
            let text = std::fs::read_to_string(&cp).map_err(io(&cp))?;
            let keep: Vec<&str> = text
                .lines()
                .enumerate()
                .filter(|(i, l)| {
                    *i == 0
                        || l.split(',')
                            .next()
                            .and_then(|e| e.parse::<usize>().ok())
                            .is_some_and(|e| e <= last_epoch)
                })
                .map(|(_, l)| l)
                .collect();
            write_atomic(&cp, (keep.join("\n") + "\n").as_bytes())?;
        }
        Ok(())
    }

    /// Marks the run finished: `complete.json` with the epochs run and the best epoch's metrics.
    pub fn mark_complete(&self, epochs: usize, best: Option<&EvalMetrics>) -> Result<()> {
        let v = serde_json::json!({ "epochs": epochs, "best": best });
        write_atomic(
            &self.dir.join("complete.json"),
            serde_json::to_string_pretty(&v)
                .expect("serialisable")
                .as_bytes(),
        )
    }

    pub fn is_complete(&self) -> bool {
        self.dir.join("complete.json").exists()
    }

    /// Checkpoint, then logs, then state.json (the commit point).
    pub fn record_epoch(
        &self,
        rec: &EpochRecord,
        tensors: &[(String, Tensor)],
        best_score: f64,
        best_metrics: Option<EvalMetrics>,
    ) -> Result<()> {
        let ck = self
            .dir
            .join("checkpoints")
            .join(format!("epoch-{}.safetensors", rec.epoch));
        let tmp = ck.with_extension(format!("tmp-{}", std::process::id()));
        Tensor::write_safetensors(tensors, &tmp)?;
        std::fs::rename(&tmp, &ck).map_err(io(&ck))?;
        let mp = self.dir.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&mp)
            .map_err(io(&mp))?;
        writeln!(f, "{}", serde_json::to_string(rec).expect("serialisable")).map_err(io(&mp))?;
        let cp = self.dir.join("summary.csv");
        let new = !cp.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cp)
            .map_err(io(&cp))?;
        if new {
            writeln!(
                f,
                "epoch,step,train_loss,train_accuracy,test_loss,test_accuracy,test_perplexity,lr,seconds"
            )
            .map_err(io(&cp))?;
        }
        writeln!(
            f,
            "{},{},{:.6},{:.6},{:.6},{:.6},{},{:.6e},{:.1}",
            rec.epoch,
            rec.step,
            rec.train_loss,
            rec.train_accuracy,
            rec.test_loss,
            rec.test_accuracy,
            rec.test_perplexity
                .map_or(String::new(), |p| format!("{p:.4}")),
            rec.lr,
            rec.seconds
        )
        .map_err(io(&cp))?;
        let state = RunState {
            epoch: rec.epoch,
            step: rec.step,
            best_score,
            best_metrics,
        };
        write_atomic(
            &self.state_path(),
            serde_json::to_string_pretty(&state)
                .expect("serialisable")
                .as_bytes(),
        )?;
        // Keep the two most recent checkpoints.
        if rec.epoch >= 2 {
            let _ = std::fs::remove_file(
                self.dir
                    .join("checkpoints")
                    .join(format!("epoch-{}.safetensors", rec.epoch - 2)),
            );
        }
        Ok(())
    }

    /// The best model so far: best.safetensors, model/ (HF-style) and, for ASTRA, the codebooks.
    pub fn save_best(&self, model: &Model, vq: Option<&[GroupedVq]>) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let best = self.dir.join("best.safetensors");
        let tmp = best.with_extension(format!("tmp-{}", std::process::id()));
        Tensor::write_safetensors(&named, &tmp)?;
        std::fs::rename(&tmp, &best).map_err(io(&best))?;
        model.save(&self.dir.join("model"))?;
        if let Some(q) = vq {
            let blocks = q
                .iter()
                .map(|b| {
                    Ok(astra_quant::BlockQuantizer {
                        codebook: b.to_codebook()?,
                        noise: None,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            astra_quant::CodebookFile {
                blocks,
                extra: Default::default(),
            }
            .save(&self.dir.join("model").join("codebooks.safetensors"))?;
        }
        Ok(())
    }
}
