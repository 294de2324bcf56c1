//! The run folder of DESIGN.md: `config.json` (the effective configuration), `metrics.jsonl` (one
//! object per epoch), `summary.csv`, `checkpoints/epoch-N.safetensors` + `state.json`,
//! `best.safetensors`, and `model/` (HF-style config.json + model.safetensors of the best epoch,
//! with `codebooks.safetensors` beside it for ASTRA runs), and `complete.json` once every epoch
//! has run and the selected model has been scored on the test split (what scripts test to skip a
//! finished run). Every file is written atomically (temp
//! file + rename, [`astra_quant::atomic`]); an epoch writes its checkpoint, its best model and its
//! log lines before state.json, the commit point, so a run killed anywhere resumes from its last
//! whole epoch with everything that epoch produced. A lock file (`.lock`, holding the pid) keeps a
//! second process out; nothing is written before the trainer has checked its inputs
//! ([`RunFolder::start`]), and a new run that fails before that leaves no folder behind.

use std::cell::RefCell;
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
    /// The best epoch's validation score (accuracy for images, −loss for text).
    pub best_score: f64,
    /// The best epoch (selected on the validation split) and its validation metrics.
    #[serde(default)]
    pub best_epoch: Option<usize>,
    pub best_metrics: Option<EvalMetrics>,
}

/// What a finished run reports (`complete.json`): the epoch selected on the validation split,
/// its validation metrics, and its model's metrics on the test split, scored once.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunResult {
    pub epochs: usize,
    pub best_epoch: Option<usize>,
    pub valid: Option<EvalMetrics>,
    pub test: Option<EvalMetrics>,
}

impl RunResult {
    /// The result of a finished run folder (`complete.json`), if it has one.
    pub fn read(dir: &Path) -> Result<Option<RunResult>> {
        let p = dir.join("complete.json");
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(io(&p))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| TrainError::File {
                path: p,
                reason: format!("is not a run result: {e}"),
            })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    pub step: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    /// Metrics on the validation split (held out of the training data).
    pub valid_loss: f64,
    pub valid_accuracy: f64,
    /// Validation perplexity (language models).
    pub valid_perplexity: Option<f64>,
    pub lr: f64,
    /// Wall-clock of the epoch: training and validation.
    pub seconds: f64,
    /// Of which training (data loading included), and what it trained on: images, or predicted
    /// tokens for text. Throughput = train_samples / train_seconds. Absent in older runs.
    #[serde(default)]
    pub train_seconds: f64,
    #[serde(default)]
    pub train_samples: f64,
    /// Of those, the epoch's first steps (`warmup_steps`): the steady-state rate is
    /// (train_samples − warmup_samples) / (train_seconds − warmup_seconds). 0 when the epoch was
    /// too short to tell, and in older runs.
    #[serde(default)]
    pub warmup_seconds: f64,
    #[serde(default)]
    pub warmup_samples: f64,
}

const SUMMARY_HEADER: &str = "epoch,step,train_loss,train_accuracy,valid_loss,valid_accuracy,valid_perplexity,lr,seconds,train_seconds,train_samples,warmup_seconds,warmup_samples";

/// A run resumed by a newer trainer: its summary.csv gets the current header, and its rows the
/// columns they lack as empty fields, so the file stays one table.
fn migrate_summary(path: &Path) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let Some(header) = text.lines().next() else {
        return Ok(());
    };
    let want = SUMMARY_HEADER.split(',').count();
    let have = header.split(',').count();
    if header == SUMMARY_HEADER || !SUMMARY_HEADER.starts_with(header) {
        return Ok(());
    }
    let pad = ",".repeat(want - have);
    let mut out = String::from(SUMMARY_HEADER) + "\n";
    for line in text.lines().skip(1) {
        out += &format!("{line}{pad}\n");
    }
    write_atomic(path, out.as_bytes())
}

pub struct RunFolder {
    pub dir: PathBuf,
    /// Holds the advisory lock on `.lock` while the run folder is open.
    lock: std::fs::File,
    /// The configuration to write when the run starts (a new run only).
    pending_config: RefCell<Option<String>>,
    /// This process made the folder: a run that fails before [`RunFolder::start`] removes it.
    made_dir: bool,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError {
    TrainError::io(path)
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    astra_quant::atomic::write_bytes(path, bytes).map_err(io(path))
}

/// Writes tensors as safetensors atomically.
pub fn write_safetensors_atomic(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    astra_quant::atomic::write_via(path, |tmp| {
        Tensor::write_safetensors(tensors, tmp)
            .map_err(|e| std::io::Error::other(format!("cannot write safetensors: {e}")))
    })
    .map_err(io(path))
}

/// Takes the run folder's lock: refuses while a live process holds it; a lock file left by a
/// process that died (killed) is taken over with a message.
fn lock(dir: &Path) -> Result<std::fs::File> {
    use std::io::{Read, Seek};
    let path = dir.join(".lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io(&path))?;
    let mut holder = String::new();
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let _ = f.read_to_string(&mut holder);
            return Err(TrainError::File {
                path: dir.into(),
                reason: format!(
                    "in use by another process (pid {}, lock {}); wait for it or stop it",
                    holder.trim(),
                    path.display()
                ),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
    }
    f.read_to_string(&mut holder).map_err(io(&path))?;
    if !holder.trim().is_empty() {
        eprintln!(
            "{}: taking over the lock of process {}, which ended without releasing it",
            dir.display(),
            holder.trim()
        );
    }
    f.set_len(0).map_err(io(&path))?;
    f.rewind().map_err(io(&path))?;
    write!(f, "{}", std::process::id()).map_err(io(&path))?;
    f.sync_all().map_err(io(&path))?;
    Ok(f)
}

impl Drop for RunFolder {
    fn drop(&mut self) {
        if self.made_dir && self.pending_config.borrow().is_some() {
            // A new run that never started: leave no half-made folder behind.
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            // An empty lock file means released; a pid left in it means its process died.
            let _ = self.lock.set_len(0);
        }
        let _ = self.lock.unlock();
    }
}

impl RunFolder {
    /// A new run in `dir`, or (with `resume`) the existing one, whose config must equal `cfg`.
    /// Locks the folder; a new run writes nothing until [`RunFolder::start`].
    pub fn open(dir: &Path, cfg: &TrainConfig, resume: bool) -> Result<Self> {
        let config = dir.join("config.json");
        let text = serde_json::to_string_pretty(cfg).expect("serialisable");
        if config.exists() {
            if !resume {
                return Err(TrainError::File { path: dir.into(), reason: "already holds a run (config.json); pass --resume to continue it or choose another --out".into() });
            }
            let lock = lock(dir)?;
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
            return Ok(RunFolder {
                dir: dir.into(),
                lock,
                pending_config: RefCell::new(None),
                made_dir: false,
            });
        }
        if resume {
            return Err(TrainError::File {
                path: dir.into(),
                reason: "nothing to resume (no config.json)".into(),
            });
        }
        let made_dir = !dir.exists();
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock = match lock(dir) {
            Ok(l) => l,
            Err(e) => {
                if made_dir {
                    let _ = std::fs::remove_dir_all(dir);
                }
                return Err(e);
            }
        };
        Ok(RunFolder {
            dir: dir.into(),
            lock,
            pending_config: RefCell::new(Some(text)),
            made_dir,
        })
    }

    /// Commits a new run to disk (config.json, checkpoints/) once its inputs have been checked;
    /// nothing for a resumed run.
    pub fn start(&self) -> Result<()> {
        let Some(text) = self.pending_config.borrow().clone() else {
            return Ok(());
        };
        std::fs::create_dir_all(self.dir.join("checkpoints")).map_err(io(&self.dir))?;
        write_atomic(&self.dir.join("config.json"), text.as_bytes())?;
        self.pending_config.replace(None);
        Ok(())
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
            // Resumed by a newer trainer: the epochs it adds have more columns.
            migrate_summary(&cp)?;
        }
        Ok(())
    }

    /// Marks the run finished: `complete.json` holds its [`RunResult`].
    pub fn mark_complete(&self, result: &RunResult) -> Result<()> {
        write_atomic(
            &self.dir.join("complete.json"),
            serde_json::to_string_pretty(result)
                .expect("serialisable")
                .as_bytes(),
        )
    }

    pub fn is_complete(&self) -> bool {
        self.dir.join("complete.json").exists()
    }

    /// Checkpoint, then logs, then state.json (the commit point). The epoch's best model is saved
    /// before this ([`RunFolder::save_best`]), so the commit covers it.
    pub fn record_epoch(
        &self,
        rec: &EpochRecord,
        tensors: &[(String, Tensor)],
        best: (f64, Option<usize>, Option<EvalMetrics>),
    ) -> Result<()> {
        let ck = self
            .dir
            .join("checkpoints")
            .join(format!("epoch-{}.safetensors", rec.epoch));
        write_safetensors_atomic(&ck, tensors)?;
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
            writeln!(f, "{SUMMARY_HEADER}").map_err(io(&cp))?;
        }
        writeln!(
            f,
            "{},{},{:.6},{:.6},{:.6},{:.6},{},{:.6e},{:.1},{:.2},{},{:.2},{}",
            rec.epoch,
            rec.step,
            rec.train_loss,
            rec.train_accuracy,
            rec.valid_loss,
            rec.valid_accuracy,
            rec.valid_perplexity
                .map_or(String::new(), |p| format!("{p:.4}")),
            rec.lr,
            rec.seconds,
            rec.train_seconds,
            rec.train_samples,
            rec.warmup_seconds,
            rec.warmup_samples
        )
        .map_err(io(&cp))?;
        let (best_score, best_epoch, best_metrics) = best;
        let state = RunState {
            epoch: rec.epoch,
            step: rec.step,
            best_score,
            best_epoch,
            best_metrics,
        };
        write_atomic(
            &self.state_path(),
            serde_json::to_string_pretty(&state)
                .expect("serialisable")
                .as_bytes(),
        )?;
        crash_point("state", rec.epoch);
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
        write_safetensors_atomic(&self.dir.join("best.safetensors"), &named)?;
        model.save(&self.dir.join("model"))?;
        if let Some(q) = vq {
            let blocks = q
                .iter()
                .map(|b| {
                    Ok(astra_quant::BlockQuantizer {
                        codebook: b.to_codebook()?,
                        noise: b.to_noise_model()?,
                        usage: Some(b.to_usage()?),
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

/// Test hook: `ASTRA_CRASH_AT=state:E` aborts the process right after epoch E's state.json is
/// written, as a kill -9 at that point would (the resume tests use it).
fn crash_point(what: &str, epoch: usize) {
    if std::env::var("ASTRA_CRASH_AT").is_ok_and(|v| v == format!("{what}:{epoch}")) {
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_summary_gets_the_new_columns_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("summary.csv");
        let old = "epoch,step,train_loss,train_accuracy,valid_loss,valid_accuracy,valid_perplexity,lr,seconds,train_seconds,train_samples";
        std::fs::write(
            &p,
            format!("{old}\n0,5,1.0,0.5,1.1,0.4,,1e-4,2.0,1.50,40\n"),
        )
        .unwrap();
        migrate_summary(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(
            text,
            format!("{SUMMARY_HEADER}\n0,5,1.0,0.5,1.1,0.4,,1e-4,2.0,1.50,40,,\n")
        );
        // Current files and foreign ones are left alone.
        migrate_summary(&p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), text);
        std::fs::write(&p, "a,b\n1,2\n").unwrap();
        migrate_summary(&p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a,b\n1,2\n");
    }
}
