//! `astra-eval accuracy` / `astra-eval perplexity`: a trained model evaluated on the test split
//! over a grid of ASTRA settings — devices N, partition mode, CLS mode, VQ on or off, lost index
//! messages — beside the same model on a single device and, with `--baseline`, the original plain
//! model it was fine-tuned from. Random allocations are also reported by FPAR quintile (the
//! paper's Table 9). Output: a JSON report and a markdown table that carries its command and
//! commit.

use std::path::PathBuf;

use astra_train::data;
use astra_train::model::Model;
use astra_train::models::{ClsMode, VqConfig};
use astra_train::train::task::{BatchScore, PartitionMode};
use astra_train::train::{AstraEval, EvalMetrics, Split, Task};
use serde::Serialize;
use tch::Device;

use crate::cli::args::SweepOpts;
use crate::error::{EvalError, Result};

/// Which metric the sweep reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Metric {
    Accuracy,
    Perplexity,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum Partition {
    /// Contiguous equal chunks.
    Contiguous,
    /// Equal shares, shuffled tokens (a new draw per batch).
    Random,
    /// Each token to a uniformly random device (shares vary; reported by FPAR quintile too).
    Allocation,
}

/// A sweep: the metric (the subcommand), the command's options, and the device they name.
pub struct SweepArgs<'a> {
    pub metric: Metric,
    pub opts: &'a SweepOpts,
    pub device: Device,
}

impl<'a> SweepArgs<'a> {
    pub fn new(metric: Metric, opts: &'a SweepOpts) -> Result<Self> {
        let device =
            astra_train::libtorch::parse_device(&opts.device).map_err(EvalError::Invalid)?;
        Ok(SweepArgs {
            metric,
            opts,
            device,
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Quintile {
    pub fpar_min: f64,
    pub fpar_max: f64,
    pub value: f64,
    pub count: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct SweepRow {
    /// None: the single-device model.
    pub devices: Option<usize>,
    pub partition: Option<Partition>,
    pub cls: Option<ClsMode>,
    pub vq: bool,
    pub loss: f64,
    /// Accuracy in % or perplexity.
    pub value: f64,
    /// Mean cross-entropy per scored image or token.
    pub ce: f64,
    pub count: usize,
    pub mean_fpar: f64,
    pub quintiles: Vec<Quintile>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SweepReport {
    pub metric: Metric,
    pub model: String,
    pub data: String,
    pub codebooks: Option<String>,
    pub protocol: String,
    /// The `--baseline` model on a single device.
    pub baseline: Option<SweepBaseline>,
    pub rows: Vec<SweepRow>,
    /// Wall-clock of scoring every row (model and data loading excluded): with the rows' counts,
    /// the rate at which this machine evaluates, which projects to a full test split.
    pub scoring_seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SweepBaseline {
    pub model: String,
    pub value: f64,
    pub ce: f64,
    pub count: usize,
}

fn invalid(what: &str, reason: String) -> EvalError {
    EvalError::Invalid(format!("{what}: {reason}"))
}

fn value(metric: Metric, m: &EvalMetrics) -> f64 {
    match metric {
        Metric::Accuracy => 100.0 * m.accuracy,
        Metric::Perplexity => m.perplexity(),
    }
}

/// Batches sorted by FPAR, cut into five groups of (nearly) equal size.
fn quintiles(metric: Metric, batches: &[BatchScore]) -> Vec<Quintile> {
    let mut b = batches.to_vec();
    b.sort_by(|x, y| x.fpar.total_cmp(&y.fpar));
    let n = b.len();
    (0..5)
        .filter_map(|q| {
            let part = &b[q * n / 5..(q + 1) * n / 5];
            (!part.is_empty()).then(|| {
                let m = EvalMetrics::from_batches(part);
                Quintile {
                    fpar_min: part[0].fpar,
                    fpar_max: part[part.len() - 1].fpar,
                    value: value(metric, &m),
                    count: m.count,
                }
            })
        })
        .collect()
}

/// The codebooks to use: `--codebooks`, else `codebooks.safetensors` beside the model (an ASTRA
/// run's model/ folder).
fn find_codebooks(args: &SweepArgs<'_>) -> Result<Option<PathBuf>> {
    if let Some(c) = &args.opts.codebooks {
        return Ok(Some(c.clone()));
    }
    let dir = astra_train::model::resolve(&args.opts.model)?;
    let beside = dir.join("codebooks.safetensors");
    Ok(beside.exists().then_some(beside))
}

pub fn run(args: &SweepArgs<'_>, progress: bool) -> Result<SweepReport> {
    // Zero counts would be reported as results (0.00 % over nothing): refused first.
    if args.opts.max_test == Some(0) {
        return Err(invalid("max_test", "must be at least 1".into()));
    }
    if args.opts.batch == 0 {
        return Err(invalid("batch", "must be at least 1".into()));
    }
    if args.opts.int8_compute && (args.device != tch::Device::Cpu || args.opts.bf16) {
        return Err(invalid(
            "int8_compute",
            "computes on the CPU in float32 activations: use --device cpu without --bf16".into(),
        ));
    }
    astra_train::int8_linear::set_compute(args.opts.int8_compute);
    let (model, _) = Model::load(&args.opts.model, args.device)?;
    let task = open_task(args, &model)?;
    let tokens = match &task {
        Task::Images { .. } => match &model.config {
            astra_train::config::ModelConfig::ViT(v) => v.num_patches() as usize,
            _ => unreachable!("Task::open checked the model"),
        },
        Task::Text { context, .. } => *context,
    };
    if let Some(&n) = args.opts.devices.iter().find(|&&n| n == 0 || n > tokens) {
        return Err(invalid(
            "devices",
            format!("{n} is not in 1..={tokens} (the model's {tokens} content tokens)"),
        ));
    }
    if let Some(&p) = args.opts.loss.iter().find(|&&p| !(0.0..=1.0).contains(&p)) {
        return Err(invalid("loss", format!("{p} is not a probability")));
    }
    let codebooks = codebooks(args, &model)?;
    let settings = settings(args, task.is_text());
    let bar = progress_bar(progress, settings.len() as u64 + 1);
    let baseline = baseline(args)?;
    let t0 = std::time::Instant::now();
    let single = single_device(args, &task, &model)?;
    let mut rows = vec![row(args.metric, None, &single)];
    bar.inc(1);
    let vq_cfg = VqConfig {
        noise_lambda: 0.0,
        ..Default::default()
    };
    for s in settings {
        bar.set_message(format!(
            "N={} {:?} vq={} loss={}",
            s.devices, s.partition, s.vq, s.loss
        ));
        let mut q = match (&codebooks, s.vq) {
            (Some((_, f)), true) => Some(astra_train::models::vq::quantizers_of(
                f,
                &vq_cfg,
                args.device,
            )),
            _ => None,
        };
        let partition = match s.partition {
            Partition::Contiguous => PartitionMode::Contiguous,
            Partition::Random => PartitionMode::Random {
                seed: args.opts.seed,
            },
            Partition::Allocation => PartitionMode::Allocation {
                seed: args.opts.seed,
            },
        };
        let b = task.evaluate_batches(
            &model,
            Split::Test,
            args.opts.max_test,
            Some(AstraEval {
                devices: s.devices,
                partition,
                cls: s.cls.unwrap_or(ClsMode::Distributed),
                vq: q.as_deref_mut(),
                link_loss: s.loss,
            }),
            args.opts.bf16,
            args.device,
            args.opts.batch,
        )?;
        rows.push(row(args.metric, Some(&s), &b));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(SweepReport {
        metric: args.metric,
        model: args.opts.model.clone(),
        data: args.opts.data.clone(),
        codebooks: codebooks.map(|(p, _)| p.display().to_string()),
        protocol: protocol(&task, rows[0].count, args.opts.batch)
            + if args.opts.int8_compute {
                "; linear layers computed in int8 (fbgemm dynamic: int8 weights per output channel, activations per tensor)"
            } else {
                ""
            },
        baseline,
        rows,
        scoring_seconds: t0.elapsed().as_secs_f64(),
    })
}

/// `model` on one device, scored on the test split.
fn single_device(args: &SweepArgs<'_>, task: &Task, model: &Model) -> Result<Vec<BatchScore>> {
    Ok(task.evaluate_batches(
        model,
        Split::Test,
        args.opts.max_test,
        None,
        args.opts.bf16,
        args.device,
        args.opts.batch,
    )?)
}

/// The `--baseline` model scored on the same test examples (the split and the `--max-test`
/// subset are fixed by the data, whatever the model).
fn baseline(args: &SweepArgs<'_>) -> Result<Option<SweepBaseline>> {
    let Some(spec) = &args.opts.baseline else {
        return Ok(None);
    };
    let (model, _) = Model::load(spec, args.device)?;
    let task = open_task(args, &model).map_err(|e| {
        invalid(
            "baseline",
            format!("{spec} cannot score {}: {e}", args.opts.data),
        )
    })?;
    let m = EvalMetrics::from_batches(&single_device(args, &task, &model)?);
    Ok(Some(SweepBaseline {
        model: spec.clone(),
        value: value(args.metric, &m),
        ce: m.loss,
        count: m.count,
    }))
}

/// One ASTRA setting of the grid.
struct Setting {
    devices: usize,
    partition: Partition,
    cls: Option<ClsMode>,
    vq: bool,
    loss: f64,
}

/// Every combination of the requested devices, partitions, CLS modes (images), VQ and loss.
fn settings(args: &SweepArgs<'_>, is_text: bool) -> Vec<Setting> {
    let cls: Vec<Option<ClsMode>> = if is_text {
        vec![None]
    } else {
        args.opts.cls.iter().copied().map(Some).collect()
    };
    let mut out = Vec::new();
    for &devices in &args.opts.devices {
        for &partition in &args.opts.partition {
            for &cls in &cls {
                for &vq in &args.opts.vq {
                    for &loss in &args.opts.loss {
                        out.push(Setting {
                            devices,
                            partition,
                            cls,
                            vq,
                            loss,
                        });
                    }
                }
            }
        }
    }
    out
}

/// The data for the metric: images for accuracy, text for perplexity (with `--stride`).
fn open_task(args: &SweepArgs<'_>, model: &Model) -> Result<Task> {
    match (args.metric, data::is_text(&args.opts.data)) {
        (Metric::Accuracy, true) => {
            return Err(invalid(
                "data",
                format!("'{}' is text: use `astra-eval perplexity`", args.opts.data),
            ))
        }
        (Metric::Perplexity, false) => {
            return Err(invalid(
                "data",
                format!("'{}' is images: use `astra-eval accuracy`", args.opts.data),
            ))
        }
        _ => {}
    }
    // Sweeps score the test split; the validation hold-out does not touch it.
    let task = Task::open(
        &args.opts.data,
        &model.config,
        args.opts.context,
        Default::default(),
    )?;
    Ok(match args.opts.stride {
        Some(s) => task.with_stride(s)?,
        None => task,
    })
}

/// The codebook file (and its path) when any setting quantizes, checked against the model and
/// `--groups`.
fn codebooks(
    args: &SweepArgs<'_>,
    model: &Model,
) -> Result<Option<(PathBuf, astra_quant::CodebookFile)>> {
    if !args.opts.vq.contains(&true) {
        return Ok(None);
    }
    let path = find_codebooks(args)?.ok_or_else(|| {
        invalid(
            "vq",
            format!(
                "{} has no codebooks.safetensors beside it; pass --codebooks FILE or --vq off",
                args.opts.model
            ),
        )
    })?;
    let file = astra_quant::CodebookFile::load(&path)?;
    astra_train::models::vq::check_codebooks(&file, model.quantizers(), model.quantized_width())?;
    if let Some(g) = args.opts.groups {
        let have = file.blocks[0].codebook.groups();
        if have != g {
            return Err(invalid(
                "groups",
                format!(
                    "--groups {g}, but {} holds G = {have} codebooks",
                    path.display()
                ),
            ));
        }
    }
    Ok(Some((path, file)))
}

fn progress_bar(progress: bool, len: u64) -> indicatif::ProgressBar {
    if !progress {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "settings {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("static"),
    );
    b
}

/// A report row from a setting's batch scores (None: the single-device model).
fn row(metric: Metric, s: Option<&Setting>, b: &[BatchScore]) -> SweepRow {
    let m = EvalMetrics::from_batches(b);
    let mean_fpar = b.iter().map(|x| x.fpar).sum::<f64>() / b.len().max(1) as f64;
    SweepRow {
        devices: s.map(|s| s.devices),
        partition: s.map(|s| s.partition),
        cls: s.and_then(|s| s.cls),
        vq: s.is_some_and(|s| s.vq),
        loss: s.map_or(0.0, |s| s.loss),
        value: value(metric, &m),
        ce: m.loss,
        count: m.count,
        mean_fpar: if s.is_some() { mean_fpar } else { 1.0 },
        quintiles: match s {
            Some(s) if s.partition == Partition::Allocation => quintiles(metric, b),
            _ => vec![],
        },
    }
}

fn protocol(task: &Task, count: usize, batch: usize) -> String {
    match task {
        Task::Images { .. } => {
            format!("top-1 accuracy on {count} test images (a fixed random subset when --max-test limits them), batches of {batch}")
        }
        Task::Text { context, stride, .. } => format!(
            "perplexity = exp(mean next-token cross-entropy) over {count} test tokens (GPT-2 BPE), windows of {context} tokens every {stride} (each token scored once, with up to {context} tokens of context)"
        ),
    }
}

/// The report as markdown: a heading with the command and commit, the protocol, one row per
/// setting (and the FPAR quintiles of random allocations).
pub fn markdown(r: &SweepReport, command: &str, commit: &str) -> String {
    let name = match r.metric {
        Metric::Accuracy => "accuracy %",
        Metric::Perplexity => "perplexity",
    };
    let mut s = format!(
        "## {} of {} on {}\n\nCommand (commit {commit}): `{command}`\n\nProtocol: {}; codebooks: {}; no NAQ noise at evaluation.\n\n",
        name,
        r.model,
        r.data,
        r.protocol,
        r.codebooks.as_deref().unwrap_or("none")
    );
    if let Some(b) = &r.baseline {
        s += &format!(
            "Baseline (the original model, single device): {} scores {:.2} over {} scored examples.\n\n",
            b.model, b.value, b.count
        );
    }
    let (vs_base, vs_base_rule) = match r.baseline {
        Some(_) => (" Δ vs baseline |", "---:|"),
        None => ("", ""),
    };
    s += &format!("| devices N | partition | CLS | VQ | link loss | {name} | Δ vs single |{vs_base} mean FPAR |\n|---:|---|---|---|---:|---:|---:|{vs_base_rule}---:|\n");
    let base = r.rows[0].value;
    for row in &r.rows {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "—".into());
        let vs_base = r
            .baseline
            .as_ref()
            .map_or(String::new(), |b| format!(" {:+.2} |", row.value - b.value));
        s += &format!(
            "| {} | {} | {} | {} | {} | {:.2} | {:+.2} |{vs_base} {:.3} |\n",
            row.devices.map_or("1 (single)".into(), |n| n.to_string()),
            opt(row.partition.map(|p| format!("{p:?}").to_lowercase())),
            opt(row.cls.map(|c| format!("{c:?}").to_lowercase())),
            if row.devices.is_none() {
                "—"
            } else if row.vq {
                "on"
            } else {
                "off"
            },
            if row.devices.is_none() {
                "—".into()
            } else {
                format!("{}", row.loss)
            },
            row.value,
            row.value - base,
            row.mean_fpar
        );
    }
    let scored: usize = r.rows.iter().map(|r| r.count).sum();
    s += &format!(
        "\nScoring: {scored} {} over {} rows in {:.3} s.\n",
        match r.metric {
            Metric::Accuracy => "images",
            Metric::Perplexity => "tokens",
        },
        r.rows.len(),
        r.scoring_seconds
    );
    for row in r.rows.iter().filter(|r| !r.quintiles.is_empty()) {
        s += &format!(
            "\nRandom allocation, N = {}, VQ {}, link loss {}: by FPAR quintile\n\n| FPAR range | {name} | scored |\n|---|---:|---:|\n",
            row.devices.unwrap_or(1),
            if row.vq { "on" } else { "off" },
            row.loss
        );
        for q in &row.quintiles {
            s += &format!(
                "| {:.3}–{:.3} | {:.2} | {} |\n",
                q.fpar_min, q.fpar_max, q.value, q.count
            );
        }
    }
    s
}
