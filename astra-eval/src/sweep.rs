//! `astra-eval accuracy` / `astra-eval perplexity`: a trained model evaluated on the test split
//! (validation tokens for text) over a grid of ASTRA settings — devices N, partition mode, CLS
//! mode, VQ on or off, lost index messages — beside the single-device model. Random allocations
//! are also reported by FPAR quintile (the paper's Table 9). Output: a JSON report and a markdown
//! table that carries its command and commit.

use std::path::PathBuf;

use astra_train::data;
use astra_train::model::Model;
use astra_train::models::{ClsMode, GroupedVq, VqConfig};
use astra_train::train::task::{BatchScore, PartitionMode};
use astra_train::train::{AstraEval, EvalMetrics, Task};
use serde::Serialize;
use tch::Device;

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

pub struct SweepArgs {
    pub metric: Metric,
    pub model: String,
    pub data: String,
    pub codebooks: Option<PathBuf>,
    /// Expected codebook groups (checked against the file).
    pub groups: Option<usize>,
    pub devices: Vec<usize>,
    pub partitions: Vec<Partition>,
    pub cls: Vec<ClsMode>,
    pub vq: Vec<bool>,
    pub loss: Vec<f64>,
    pub max_test: Option<usize>,
    pub context: Option<usize>,
    pub stride: Option<usize>,
    pub batch: usize,
    pub seed: u64,
    pub bf16: bool,
    pub device: Device,
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
    pub rows: Vec<SweepRow>,
}

fn invalid(what: &str, reason: String) -> anyhow::Error {
    anyhow::anyhow!("{what}: {reason}")
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
fn find_codebooks(args: &SweepArgs) -> anyhow::Result<Option<PathBuf>> {
    if let Some(c) = &args.codebooks {
        return Ok(Some(c.clone()));
    }
    let dir = astra_train::model::resolve(&args.model)?;
    let beside = dir.join("codebooks.safetensors");
    Ok(beside.exists().then_some(beside))
}

pub fn run(args: &SweepArgs, progress: bool) -> anyhow::Result<SweepReport> {
    // Zero counts would be reported as results (0.00 % over no images): refused first.
    if args.max_test == Some(0) {
        return Err(invalid("max_test", "must be at least 1".into()));
    }
    if args.batch == 0 {
        return Err(invalid("batch", "must be at least 1".into()));
    }
    let (model, _) = Model::load(&args.model, args.device)?;
    let is_text = data::is_text(&args.data);
    match (args.metric, is_text) {
        (Metric::Accuracy, true) => {
            return Err(invalid(
                "data",
                format!("'{}' is text: use `astra-eval perplexity`", args.data),
            ))
        }
        (Metric::Perplexity, false) => {
            return Err(invalid(
                "data",
                format!("'{}' is images: use `astra-eval accuracy`", args.data),
            ))
        }
        _ => {}
    }
    let mut task = Task::open(&args.data, &model.config, args.context)?;
    if let Some(s) = args.stride {
        task = task.with_stride(s)?;
    }
    let tokens = match &task {
        Task::Images { .. } => match &model.config {
            astra_train::config::ModelConfig::ViT(v) => v.num_patches() as usize,
            _ => unreachable!("Task::open checked the model"),
        },
        Task::Text { context, .. } => *context,
    };
    if let Some(&n) = args.devices.iter().find(|&&n| n == 0 || n > tokens) {
        return Err(invalid(
            "devices",
            format!("{n} is not in 1..={tokens} (the model's {tokens} content tokens)"),
        ));
    }
    if let Some(&p) = args.loss.iter().find(|&&p| !(0.0..=1.0).contains(&p)) {
        return Err(invalid("loss", format!("{p} is not a probability")));
    }
    let wants_vq = args.vq.contains(&true);
    let codebooks = if wants_vq {
        let path = find_codebooks(args)?.ok_or_else(|| {
            invalid(
                "vq",
                format!(
                    "{} has no codebooks.safetensors beside it; pass --codebooks FILE or --vq off",
                    args.model
                ),
            )
        })?;
        let file = astra_quant::CodebookFile::load(&path)?;
        astra_train::models::vq::check_codebooks(&file, model.layers(), model.hidden())?;
        if let Some(g) = args.groups {
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
        Some((path, file))
    } else {
        None
    };
    let vq_cfg = VqConfig {
        noise_lambda: 0.0,
        ..Default::default()
    };
    let quantizers = |device| -> Option<Vec<GroupedVq>> {
        codebooks
            .as_ref()
            .map(|(_, f)| astra_train::models::vq::quantizers_of(f, &vq_cfg, device))
    };
    let image_cls: Vec<Option<ClsMode>> = if is_text {
        vec![None]
    } else {
        args.cls.iter().copied().map(Some).collect()
    };
    let mut settings = Vec::new();
    for &n in &args.devices {
        for &p in &args.partitions {
            for &c in &image_cls {
                for &vq in &args.vq {
                    for &l in &args.loss {
                        settings.push((n, p, c, vq, l));
                    }
                }
            }
        }
    }
    let bar = if progress {
        let b = indicatif::ProgressBar::new(settings.len() as u64 + 1);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "settings {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("static"),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut rows = Vec::new();
    let single = task.evaluate_batches(
        &model,
        args.max_test,
        None,
        args.bf16,
        args.device,
        args.batch,
    )?;
    let m = EvalMetrics::from_batches(&single);
    rows.push(SweepRow {
        devices: None,
        partition: None,
        cls: None,
        vq: false,
        loss: 0.0,
        value: value(args.metric, &m),
        ce: m.loss,
        count: m.count,
        mean_fpar: 1.0,
        quintiles: vec![],
    });
    bar.inc(1);
    for (n, p, c, vq, l) in settings {
        bar.set_message(format!("N={n} {p:?} vq={vq} loss={l}"));
        let mut q = if vq { quantizers(args.device) } else { None };
        let partition = match p {
            Partition::Contiguous => PartitionMode::Contiguous,
            Partition::Random => PartitionMode::Random { seed: args.seed },
            Partition::Allocation => PartitionMode::Allocation { seed: args.seed },
        };
        let b = task.evaluate_batches(
            &model,
            args.max_test,
            Some(AstraEval {
                devices: n,
                partition,
                cls: c.unwrap_or(ClsMode::Distributed),
                vq: q.as_deref_mut(),
                link_loss: l,
            }),
            args.bf16,
            args.device,
            args.batch,
        )?;
        let m = EvalMetrics::from_batches(&b);
        let mean_fpar = b.iter().map(|x| x.fpar).sum::<f64>() / b.len().max(1) as f64;
        rows.push(SweepRow {
            devices: Some(n),
            partition: Some(p),
            cls: c,
            vq,
            loss: l,
            value: value(args.metric, &m),
            ce: m.loss,
            count: m.count,
            mean_fpar,
            quintiles: if p == Partition::Allocation {
                quintiles(args.metric, &b)
            } else {
                vec![]
            },
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let protocol = match &task {
        Task::Images { .. } => format!(
            "top-1 accuracy on the first {} test images, batches of {}",
            rows[0].count, args.batch
        ),
        Task::Text { context, stride, .. } => format!(
            "perplexity = exp(mean next-token cross-entropy) over {} validation tokens (GPT-2 BPE), windows of {context} tokens every {stride} (each token scored once, with up to {context} tokens of context)",
            rows[0].count
        ),
    };
    Ok(SweepReport {
        metric: args.metric,
        model: args.model.clone(),
        data: args.data.clone(),
        codebooks: codebooks.map(|(p, _)| p.display().to_string()),
        protocol,
        rows,
    })
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
    s += &format!("| devices N | partition | CLS | VQ | link loss | {name} | Δ vs single | mean FPAR |\n|---:|---|---|---|---:|---:|---:|---:|\n");
    let base = r.rows[0].value;
    for row in &r.rows {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "—".into());
        s += &format!(
            "| {} | {} | {} | {} | {} | {:.2} | {:+.2} | {:.3} |\n",
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
