//! Training: the run folder (DESIGN.md), AdamW with warm-up + cosine, and the epoch loop for
//! image classifiers and language models, plain or ASTRA (MPA + VQ + NAQ + DCT), with optional bf16
//! autocast, resumable exactly at epoch boundaries.

pub mod calibrate;
pub mod optim;
pub mod parallel;
pub mod run;
pub mod task;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::data::augment::Augment;
use crate::data::split::HoldOut;
use crate::error::{Result, TrainError};
use crate::model::Model;
use crate::models::vq::ResidualMoments;
use crate::models::{Astra, ClsMode, DevicePartition, GroupedVq, VqConfig};
use crate::precision::bf16_autocast;
use optim::{AdamW, AdamWConfig};
use parallel::Collective;
use run::{EpochRecord, RunFolder, RunResult};
pub use task::{AstraEval, EvalMetrics, Split, Task};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AstraSettings {
    pub devices: usize,
    pub codebooks: PathBuf,
    /// Commitment weight β.
    pub beta: f64,
    pub vq: VqConfig,
    pub single_cls: bool,
    /// Uneven shares drawn per batch ([`DevicePartition::random_allocation`]) instead of equal
    /// contiguous chunks: training for heterogeneous devices.
    pub random_partition: bool,
}

/// The full effective configuration of a run (saved as config.json).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// A data spec (see [`crate::data`]): images for a ViT, `text:…` for a GPT-2.
    pub data: String,
    pub model: ModelConfig,
    /// Weights to start from (a run folder or an HF model); None: random initialisation.
    pub init: Option<String>,
    pub epochs: usize,
    pub batch: usize,
    pub optim: AdamWConfig,
    pub seed: u64,
    /// Use only N training examples per epoch (images, or text windows); None: all.
    pub max_train: Option<usize>,
    /// Score the selected model on N test examples (a fixed random subset) only.
    pub max_test: Option<usize>,
    /// The validation hold-out the best epoch is selected on (default: 10% of the training
    /// data, at most 10,000 examples).
    #[serde(default)]
    pub valid: HoldOut,
    /// Training-time augmentation of images.
    #[serde(default)]
    pub augment: Augment,
    /// Tokens per window for language models (None: the model's n_positions).
    #[serde(default)]
    pub context: Option<usize>,
    /// bf16 autocast of the forward pass (CUDA).
    #[serde(default)]
    pub bf16: bool,
    pub astra: Option<AstraSettings>,
}

/// Most simulated devices a run may use (the paper uses 2–8); more is refused before any work.
pub const MAX_DEVICES: usize = 1024;

/// `value` must be finite and within `range` (a closed or half-open range of f64).
fn check_number(
    what: &str,
    value: f64,
    range: impl std::ops::RangeBounds<f64> + std::fmt::Debug,
) -> Result<()> {
    if !value.is_finite() || !range.contains(&value) {
        return Err(TrainError::invalid(
            what,
            format!("{value} is not a finite number in {range:?}"),
        ));
    }
    Ok(())
}

impl TrainConfig {
    /// Refuses settings that cannot train (zero counts, negative or non-finite rates, a decay
    /// outside [0, 1)) before anything is read or written.
    pub fn validate(&self) -> Result<()> {
        for (what, n) in [("epochs", Some(self.epochs)), ("batch", Some(self.batch))]
            .into_iter()
            .chain([("max_train", self.max_train), ("max_test", self.max_test)])
        {
            if n == Some(0) {
                return Err(TrainError::invalid(what, "must be at least 1"));
            }
        }
        let o = &self.optim;
        check_number("lr", o.lr, f64::MIN_POSITIVE..)?;
        check_number("weight_decay", o.weight_decay, 0.0..)?;
        check_number("clip", o.clip_norm, 0.0..)?;
        check_number("beta1", o.beta1, 0.0..1.0)?;
        check_number("beta2", o.beta2, 0.0..1.0)?;
        check_number("eps", o.eps, f64::MIN_POSITIVE..)?;
        check_number("min_lr_ratio", o.min_lr_ratio, 0.0..=1.0)?;
        if let Some(a) = &self.astra {
            if !(1..=MAX_DEVICES).contains(&a.devices) {
                return Err(TrainError::invalid(
                    "devices",
                    format!("{} is not in 1..={MAX_DEVICES}", a.devices),
                ));
            }
            check_number("beta", a.beta, 0.0..)?;
            check_number("decay", a.vq.decay, 0.0..1.0)?;
            check_number("lambda", a.vq.noise_lambda, 0.0..)?;
            check_number("epsilon", a.vq.epsilon, 0.0..)?;
            check_number("dead_threshold", a.vq.dead_threshold, 0.0..)?;
        }
        Ok(())
    }

    /// The validation score the run selects its best model by (higher is better): accuracy for
    /// images, minus the loss for text.
    pub fn score(&self, m: &EvalMetrics) -> f64 {
        if crate::data::is_text(&self.data) {
            -m.loss
        } else {
            m.accuracy
        }
    }
}

/// Everything a run trains: the task (data), the model, the CLS mode and the quantizers.
struct Setup {
    task: Task,
    model: Model,
    cls: ClsMode,
    vq: Option<Vec<GroupedVq>>,
}

/// Where a run continues from: the first epoch to run and the best validation score, epoch and
/// metrics so far.
struct Progress {
    start_epoch: usize,
    best: f64,
    best_epoch: Option<usize>,
    best_metrics: Option<EvalMetrics>,
}

/// Sums over an epoch's training batches (on the device until read).
struct EpochTotals {
    loss_sum: f64,
    correct: f64,
    seen: f64,
    /// When the warm-up steps had finished on the device, and what they trained on (None for
    /// an epoch too short to have a steady part).
    warmup: Option<(Instant, f64)>,
}

/// The steps at the start of an epoch whose time the steady-state rate leaves out (cuDNN and
/// cuBLAS autotuning, the caching allocator growing, data workers starting): 10%, 1 to 20.
fn warmup_steps(steps: usize) -> Option<usize> {
    (steps >= 5).then(|| (steps / 10).clamp(1, 20))
}

/// Trains (or resumes) the run in `run`, selecting the best epoch on the validation split; once
/// every epoch has run, scores the selected model on the test split and returns the run's result
/// (None when `stop_after` ended the work early: it stops after that many epochs in total, as a
/// kill would, for tests of --resume).
pub fn train(
    cfg: &TrainConfig,
    run: &RunFolder,
    device: Device,
    progress: bool,
    stop_after: Option<usize>,
) -> Result<Option<RunResult>> {
    let solo: Arc<dyn Collective> = Arc::new(parallel::Solo);
    train_ranked(cfg, Some(run), device, progress, stop_after, solo)
}

/// [`train`] as one rank of a data-parallel group (parallel.rs): rank 0 holds the run folder
/// (`run`; None on the others) and alone reads, evaluates and writes it; every rank trains on
/// its slice of each batch. Returns the result on rank 0.
pub fn train_ranked(
    cfg: &TrainConfig,
    run: Option<&RunFolder>,
    device: Device,
    progress: bool,
    stop_after: Option<usize>,
    ranks: Arc<dyn Collective>,
) -> Result<Option<RunResult>> {
    cfg.validate()?;
    if cfg.bf16 && !device.is_cuda() {
        return Err(TrainError::invalid(
            "bf16",
            "autocast to bf16 needs a CUDA device",
        ));
    }
    let mut setup = set_up(cfg, device)?;
    // The inputs are checked (data, model, codebooks): only now does a new run write anything.
    if let Some(run) = run {
        run.start()?;
    }
    let n_train = cfg
        .max_train
        .map_or(setup.task.train_len(), |m| m.min(setup.task.train_len()));
    let steps_per_epoch = n_train.div_ceil(cfg.batch.max(1));
    let mut opt_cfg = cfg.optim.clone();
    opt_cfg.total_steps = steps_per_epoch * cfg.epochs;
    let mut opt = AdamW::new(&setup.model.vs, opt_cfg);
    let mut p = match run {
        Some(run) => restore(run, &setup.model, &mut opt, setup.vq.as_deref_mut())?,
        None => Progress::fresh(),
    };
    replicate_from_rank0(&ranks, &mut setup, &mut opt, &mut p, device)?;
    for epoch in p.start_epoch..cfg.epochs {
        if stop_after.is_some_and(|s| epoch >= s) {
            return Ok(None);
        }
        let t0 = Instant::now();
        let totals = train_epoch(
            cfg,
            &mut setup,
            &mut opt,
            (epoch, steps_per_epoch),
            progress,
            &*ranks,
        )?;
        let train_seconds = t0.elapsed().as_secs_f64();
        let (warmup_seconds, warmup_samples) = totals
            .warmup
            .map_or((0.0, 0.0), |(t, n)| ((t - t0).as_secs_f64(), n));
        // NAQ follows the codebook: as EMA moves it (and fine-tuning moves X), the residual
        // statistics are re-estimated each epoch; the checkpoint and model/ keep what was used.
        if let (Some(a), Some(q)) = (&cfg.astra, setup.vq.as_mut()) {
            if a.vq.noise_lambda > 0.0 {
                let seed = cfg.seed ^ ((epoch as u64 + 1) << 40);
                refresh_naq(&setup.task, &setup.model, q, (seed, &*ranks), device)?;
                // Every rank now holds the same statistics; rank 0's are sent all the same, so
                // they are equal bit for bit whatever the collective's rounding.
                for b in q.iter_mut() {
                    parallel::broadcast_all(&*ranks, &b.replicated_state())?;
                }
            }
        }
        // Validation, selection and the checkpoint are rank 0's: the other ranks go on to the
        // next epoch, whose first all-reduce waits for rank 0.
        let Some(run) = run else {
            continue;
        };
        let m = evaluate(
            cfg,
            &setup.task,
            &setup.model,
            setup.vq.as_deref_mut(),
            Split::Valid,
            None,
        )?;
        let seen = totals.seen.max(1.0);
        let rec = EpochRecord {
            epoch,
            step: opt.step,
            train_loss: totals.loss_sum / seen,
            train_accuracy: totals.correct / seen,
            valid_loss: m.loss,
            valid_accuracy: m.accuracy,
            valid_perplexity: setup.task.is_text().then(|| m.perplexity()),
            lr: opt.lr_at(opt.step.saturating_sub(1)),
            seconds: t0.elapsed().as_secs_f64(),
            train_seconds,
            train_samples: totals.seen,
            warmup_seconds,
            warmup_samples,
        };
        if progress {
            report_epoch(&rec, &m, cfg.epochs, setup.task.is_text());
        }
        let score = cfg.score(&m);
        let is_best = score > p.best;
        if is_best {
            p.best = score;
            p.best_epoch = Some(epoch);
            p.best_metrics = Some(m);
        }
        checkpoint(run, &setup, &opt, &rec, &p, is_best)?;
    }
    let Some(run) = run else {
        return Ok(None);
    };
    let test = test_selected(cfg, run, &setup.task, device)?;
    let result = RunResult {
        epochs: cfg.epochs,
        best_epoch: p.best_epoch,
        valid: p.best_metrics,
        test,
    };
    run.mark_complete(&result)?;
    Ok(Some(result))
}

/// Scores `model` on `split`: plain, or as ASTRA runs train (N devices with contiguous shares,
/// the run's CLS mode, the quantizers `vq`).
fn evaluate(
    cfg: &TrainConfig,
    task: &Task,
    model: &Model,
    vq: Option<&mut [GroupedVq]>,
    split: Split,
    limit: Option<usize>,
) -> Result<EvalMetrics> {
    let astra = match (vq, &cfg.astra) {
        (Some(q), Some(a)) => Some(AstraEval {
            devices: a.devices,
            partition: task::PartitionMode::Contiguous,
            cls: cls_mode(cfg),
            vq: Some(q),
            link_loss: 0.0,
        }),
        _ => None,
    };
    task.evaluate(model, split, limit, astra, cfg.bf16, model.vs.device())
}

/// The test metrics of the selected model — the run's `model/` (with its codebooks for ASTRA),
/// the files sweeps and the runtime load — scored once, on `max_test` examples; None when no
/// epoch was selected.
fn test_selected(
    cfg: &TrainConfig,
    run: &RunFolder,
    task: &Task,
    device: Device,
) -> Result<Option<EvalMetrics>> {
    let dir = run.dir.join("model");
    if !dir.join("config.json").exists() {
        return Ok(None);
    }
    let (model, _) = Model::load(&dir.to_string_lossy(), device)?;
    let mut vq = match &cfg.astra {
        Some(a) => {
            Some(model.load_quantizers(&dir.join("codebooks.safetensors"), &a.vq, device)?)
        }
        None => None,
    };
    let m = evaluate(
        cfg,
        task,
        &model,
        vq.as_deref_mut(),
        Split::Test,
        cfg.max_test,
    )?;
    Ok(Some(m))
}

fn cls_mode(cfg: &TrainConfig) -> ClsMode {
    match &cfg.astra {
        Some(a) if a.single_cls => ClsMode::Single,
        _ => ClsMode::Distributed,
    }
}

/// The data, the model (fresh, or from `init` with this data's label set and image size) and
/// the quantizers of an ASTRA run.
fn set_up(cfg: &TrainConfig, device: Device) -> Result<Setup> {
    let task = Task::open(&cfg.data, &cfg.model, cfg.context, cfg.valid)?;
    let mut model_cfg = cfg.model.clone();
    if let (ModelConfig::ViT(v), Some(classes)) = (&mut model_cfg, task.classes()) {
        v.num_labels = Some(classes as i64);
    }
    let model = match &cfg.init {
        Some(spec) => {
            // The run's image size and the data's label set: a backbone checkpoint (or one
            // trained on other labels) gets a fresh classifier, position embeddings follow the
            // image size.
            let (m, report) = Model::load_for_finetuning(spec, device, |c| {
                if let (ModelConfig::ViT(v), ModelConfig::ViT(want)) = (c, &model_cfg) {
                    v.image_size = want.image_size;
                    if let Some(classes) = task.classes() {
                        if v.classes() != classes as i64 {
                            v.num_labels = Some(classes as i64);
                            v.id2label = None;
                        }
                    }
                }
            })?;
            if !report.fresh.is_empty() {
                eprintln!(
                    "init: {spec}: fresh {} for this data",
                    report.fresh.join(", ")
                );
            }
            m
        }
        None => {
            // libtorch's generator is process-wide: ranks that are threads of one process
            // (`--cpu-ranks`) take turns, so each draws the weights a single process draws.
            static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _turn = INIT.lock().unwrap_or_else(|p| p.into_inner());
            tch::manual_seed(cfg.seed as i64);
            Model::new(model_cfg, device)?
        }
    };
    let cls = cls_mode(cfg);
    let vq = match &cfg.astra {
        None => None,
        Some(a) => {
            let q = model.load_quantizers(&a.codebooks, &a.vq, device)?;
            // λ > 0 without residual statistics would train with no noise while config.json
            // says λ: refuse rather than silently drop NAQ.
            if a.vq.noise_lambda > 0.0 && q.iter().any(|b| !b.has_noise_model()) {
                return Err(TrainError::File {
                    path: a.codebooks.clone(),
                    reason: format!(
                        "has no NAQ residual statistics, but --lambda {} asks for noise: calibrate with --noise full or diagonal, or pass --lambda 0",
                        a.vq.noise_lambda
                    ),
                });
            }
            Some(q)
        }
    };
    Ok(Setup {
        task,
        model,
        cls,
        vq,
    })
}

impl Progress {
    fn fresh() -> Self {
        Progress {
            start_epoch: 0,
            best: f64::NEG_INFINITY,
            best_epoch: None,
            best_metrics: None,
        }
    }
}

/// Data parallel: every rank starts from what rank 0 initialised or restored (weights, moments,
/// step, epoch, codebooks), and its quantizers sum their EMA statistics over the ranks.
fn replicate_from_rank0(
    ranks: &Arc<dyn Collective>,
    setup: &mut Setup,
    opt: &mut AdamW,
    p: &mut Progress,
    device: Device,
) -> Result<()> {
    if !ranks.is_group() {
        return Ok(());
    }
    // By name: every rank must send and receive the tensors in the same order.
    let mut named: Vec<(String, Tensor)> = setup.model.vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut state: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
    state.extend(opt.moment_buffers());
    for b in setup.vq.iter_mut().flatten() {
        state.extend(b.replicated_state());
    }
    let r = ranks.as_ref();
    parallel::broadcast_all(r, &state)?;
    opt.step = parallel::agree_u64(r, opt.step as u64, device)? as usize;
    p.start_epoch = parallel::agree_u64(r, p.start_epoch as u64, device)? as usize;
    for b in setup.vq.iter_mut().flatten() {
        let started = parallel::agree_u64(r, b.ema_started() as u64, device)?;
        b.set_ema_started(started == 1);
        b.set_ranks(ranks.clone());
    }
    Ok(())
}

/// Model, optimizer and quantizer state from the run's last completed epoch, if any.
fn restore(
    run: &RunFolder,
    model: &Model,
    opt: &mut AdamW,
    vq: Option<&mut [GroupedVq]>,
) -> Result<Progress> {
    let Some((state, tensors)) = run.last_checkpoint()? else {
        return Ok(Progress::fresh());
    };
    for (n, v) in model.vs.variables() {
        let src = tensors
            .get(&n)
            .ok_or_else(|| TrainError::invalid("checkpoint", format!("lacks {n}")))?;
        if src.size() != v.size() {
            return Err(TrainError::invalid(
                "checkpoint",
                format!("{n} has shape {:?}, the model {:?}", src.size(), v.size()),
            ));
        }
        tch::no_grad(|| v.shallow_clone().copy_(src));
    }
    opt.load_state(&tensors, state.step)
        .map_err(|e| TrainError::invalid("checkpoint", e))?;
    for (l, b) in vq.into_iter().flatten().enumerate() {
        b.load_state(&format!("astra.vq.{l}"), &tensors)?;
    }
    Ok(Progress {
        start_epoch: state.epoch + 1,
        best: state.best_score,
        best_epoch: state.best_epoch,
        best_metrics: state.best_metrics,
    })
}

/// Examples (images, or text windows) each epoch's NAQ refresh draws from the training data.
pub const NAQ_REFRESH_IMAGES: usize = 256;
pub const NAQ_REFRESH_WINDOWS: usize = 16;

/// Re-estimates every block's NAQ statistics under its current codebook, from the plain
/// model's block inputs over a seeded sample of the training data. Data parallel, each rank
/// pushes its share of every batch and the sums are all-reduced.
fn refresh_naq(
    task: &Task,
    model: &Model,
    vq: &mut [GroupedVq],
    (seed, ranks): (u64, &dyn parallel::Collective),
    device: Device,
) -> Result<()> {
    let n = if task.is_text() {
        NAQ_REFRESH_WINDOWS
    } else {
        NAQ_REFRESH_IMAGES
    };
    let mut moments: Vec<ResidualMoments> = vq
        .iter()
        .map(|_| ResidualMoments::new(model.quantized_width(), device))
        .collect();
    tch::no_grad(|| -> Result<()> {
        for x in task.calibration_batches(n, seed, device)? {
            let (lo, len) = parallel::shard(x.size()[0], ranks.rank(), ranks.world());
            if len == 0 {
                continue;
            }
            for (l, t) in model
                .block_inputs(&x.narrow(0, lo, len))?
                .iter()
                .enumerate()
            {
                moments[l].push(&vq[l], t);
            }
        }
        Ok(())
    })?;
    for (q, m) in vq.iter_mut().zip(&mut moments) {
        m.all_reduce(ranks)?;
        q.refresh_noise(m)?;
    }
    Ok(())
}

/// One epoch of training steps. Everything random in it derives from (seed, epoch), so a
/// resumed run repeats it exactly.
fn train_epoch(
    cfg: &TrainConfig,
    setup: &mut Setup,
    opt: &mut AdamW,
    (epoch, steps): (usize, usize),
    progress: bool,
    ranks: &dyn Collective,
) -> Result<EpochTotals> {
    let Setup {
        task,
        model,
        cls,
        vq,
    } = setup;
    let device = model.vs.device();
    let epoch_seed = cfg.seed ^ ((epoch as u64 + 1) << 32);
    // Rank 0 draws what a single process draws; the others their own dropout and noise.
    tch::manual_seed(
        (cfg.seed as i64)
            .wrapping_mul(1000)
            .wrapping_add(epoch as i64)
            .wrapping_add((ranks.rank() as i64) << 24),
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(epoch_seed);
    let bar = epoch_bar(progress, steps, epoch, cfg.epochs);
    let beta = cfg.astra.as_ref().map_or(0.0, |a| a.beta);
    // Running sums stay on the device: reading them every step would make the host wait for
    // the device, and small models are launch-bound.
    let zero = || Tensor::zeros([], (Kind::Float, device));
    let (loss_sum, correct, seen) = (zero(), zero(), zero());
    let batches = task.train_batches(
        cfg.batch,
        cfg.max_train,
        &cfg.augment,
        epoch_seed.rotate_left(17),
        &mut rng,
        device,
        (ranks.rank(), ranks.world()),
    );
    let warm = warmup_steps(steps);
    let mut warmup = None;
    for (i, b) in batches.enumerate() {
        if Some(i) == warm {
            // Reading a running sum waits for the device: the warm-up steps are done when it
            // returns (so it is read before the clock).
            let n = seen.double_value(&[]);
            warmup = Some((Instant::now(), n));
        }
        let (x, y) = b?;
        let partition = step_partition(cfg, model.content_tokens(&x) as usize, &mut rng)?;
        let (hits, loss) = bf16_autocast(cfg.bf16, || -> Result<(Tensor, Tensor)> {
            let astra = match (vq.as_mut(), &partition) {
                (Some(q), Some(p)) => Some(Astra {
                    partition: p,
                    cls: *cls,
                    vq: Some(q),
                    train: true,
                    link_loss: None,
                }),
                _ => None,
            };
            let out = task::step_loss(model, &x, &y, astra)?;
            let mut loss = out.loss;
            if let Some(c) = out.commitment {
                loss += c.to_kind(Kind::Float) * beta;
            }
            Ok((out.hits, loss))
        })??;
        opt.zero_grad();
        match ranks.is_group() {
            false => loss.backward(),
            true => {
                (&loss * target_share(&y, ranks)?).backward();
                opt.reduce_grads(|g| ranks.all_reduce_sum(g))?;
            }
        }
        opt.step();
        add_step(&[&loss_sum, &correct, &seen], &hits, &y, &loss);
        bar.inc(1);
        if bar.position().is_multiple_of(50) && !bar.is_hidden() {
            let l = loss_sum.double_value(&[]) / seen.double_value(&[]).max(1.0);
            bar.set_message(format!("loss {l:.4}"));
        }
    }
    bar.finish_and_clear();
    for s in [&loss_sum, &correct, &seen] {
        ranks.all_reduce_sum(s)?;
    }
    let totals = EpochTotals {
        loss_sum: loss_sum.double_value(&[]),
        correct: correct.double_value(&[]),
        seen: seen.double_value(&[]),
        warmup,
    };
    if !totals.loss_sum.is_finite() {
        return Err(TrainError::invalid(
            format!("epoch {}", epoch + 1),
            format!(
                "the training loss became {}: {} (the run keeps its last good epoch)",
                totals.loss_sum,
                non_finite_cause(model, vq.as_deref(), beta)
            ),
        ));
    }
    Ok(totals)
}

fn epoch_bar(progress: bool, steps: usize, epoch: usize, epochs: usize) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(steps as u64);
    b.set_style(
        ProgressStyle::with_template(
            "epoch {prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("static"),
    );
    b.set_prefix(format!("{}/{}", epoch + 1, epochs));
    b
}

fn report_epoch(rec: &EpochRecord, m: &EvalMetrics, epochs: usize, text: bool) {
    let what = if text {
        format!("valid loss {:.4}, perplexity {:.2}", m.loss, m.perplexity())
    } else {
        format!("valid acc {:.4}", m.accuracy)
    };
    eprintln!(
        "epoch {}/{}: train loss {:.4}, train acc {:.4}, {what} ({:.0} s)",
        rec.epoch + 1,
        epochs,
        rec.train_loss,
        rec.train_accuracy,
        rec.seconds
    );
}

/// The epoch's outputs: the best model first (when this epoch is the best), then the checkpoint
/// and state.json, the commit, so a kill in between reruns the epoch and never leaves a committed
/// epoch without its model.
fn checkpoint(
    run: &RunFolder,
    setup: &Setup,
    opt: &AdamW,
    rec: &EpochRecord,
    p: &Progress,
    is_best: bool,
) -> Result<()> {
    if is_best {
        run.save_best(&setup.model, setup.vq.as_deref())?;
    }
    let mut tensors: Vec<(String, Tensor)> = setup.model.vs.variables().into_iter().collect();
    tensors.extend(opt.state());
    for (l, b) in setup.vq.iter().flatten().enumerate() {
        tensors.extend(b.state(&format!("astra.vq.{l}")));
    }
    run.record_epoch(rec, &tensors, (p.best, p.best_epoch, p.best_metrics))
}

/// Names what made the loss non-finite: a codebook (NaN codewords, or EMA statistics that blew up),
/// the commitment weight, or weights that diverged (the learning rate).
fn non_finite_cause(model: &Model, vq: Option<&[GroupedVq]>, beta: f64) -> String {
    if !beta.is_finite() {
        return format!("the commitment weight --beta is {beta}");
    }
    let finite = |t: &Tensor| bool::try_from(t.isfinite().all()).unwrap_or(false);
    if let Some((l, _)) = vq
        .into_iter()
        .flatten()
        .enumerate()
        .find(|(_, q)| !finite(&q.codebook))
    {
        return format!("block {l}'s codebook holds NaN or infinite codewords (check the codebook file and --decay)");
    }
    let bad: Vec<String> = model
        .vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.is_floating_point() && !finite(t))
        .map(|(n, _)| n)
        .take(3)
        .collect();
    if bad.is_empty() {
        "the weights and codebooks are finite, so a batch's loss overflowed; lower --lr or enable --clip".into()
    } else {
        format!(
            "weights diverged ({} …); lower --lr or enable --clip",
            bad.join(", ")
        )
    }
}

/// How a training step deals tokens: contiguous equal shares, a random allocation drawn from
/// `rng` (`--random-partition`), or none for a plain run.
fn step_partition(
    cfg: &TrainConfig,
    tokens: usize,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<Option<DevicePartition>> {
    use rand::Rng;
    Ok(match &cfg.astra {
        Some(a) if a.random_partition => Some(DevicePartition::random_allocation(
            tokens,
            a.devices,
            rng.random(),
        )?),
        Some(a) => Some(DevicePartition::contiguous(tokens, a.devices)?),
        None => None,
    })
}

/// Adds a step's loss × scored targets, correct predictions and scored targets to the epoch's
/// running sums `[loss_sum, correct, seen]` (on the device: reading them would sync every step).
/// This rank's share of the batch's targets (tokens a language model scores, or images), a
/// device scalar: its mean loss times this is its part of the batch's mean loss.
fn target_share(y: &Tensor, ranks: &dyn Collective) -> Result<Tensor> {
    let mine = y
        .reshape([-1])
        .ne(crate::data::text::IGNORE)
        .sum(Kind::Float)
        .reshape([1]);
    let all = mine.copy();
    ranks.all_reduce_sum(&all)?;
    Ok((mine / all.clamp_min(1.0)).reshape([]))
}

fn add_step(sums: &[&Tensor; 3], hits: &Tensor, y: &Tensor, loss: &Tensor) {
    tch::no_grad(|| {
        let n = y
            .reshape([-1])
            .ne(crate::data::text::IGNORE)
            .sum(Kind::Float);
        let _ = sums[0].shallow_clone().g_add_(&(loss.detach() * &n));
        let _ = sums[1].shallow_clone().g_add_(hits);
        let _ = sums[2].shallow_clone().g_add_(&n);
    });
}
