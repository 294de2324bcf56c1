//! The `astra-sim` commands: the binary parses ([`args`]) and calls [`run`]; each command is a
//! function taking its options struct.

pub mod args;

use std::time::Instant;

use crate::dynamic::{self, BandwidthTrace, LatencyTable};
use crate::network::{Algorithm, ModelKind};
use crate::output::write_atomic;
use crate::profile::{load_source, ComputeProfile};
use crate::sweep::{self, parse_numbers, Grid, Runs};
use crate::trace::Trace;
use crate::Method;
use anyhow::{bail, Result};

pub use args::*;

/// Runs one parsed command.
pub fn run(cli: Cli) -> Result<()> {
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");

    match cli.command {
        Command::Reproduce(a) => reproduce_command(a, &command_line),
        Command::Sweep(a) => sweep_command(a),
        Command::Trace(a) => trace_command(a),
        Command::ReplayWorker(a) => replay_worker_command(a),
        Command::Replay(args) => replay_command(args, &command_line),
        Command::Dynamic(a) => dynamic_command(a),
        Command::PlotMeasured(a) => plot_measured_command(a),
        Command::PlotLines(a) => plot_lines_command(a),
        Command::PlotBars(a) => plot_bars_command(a),
    }
}

pub fn reproduce_command(a: ReproduceArgs, command_line: &str) -> Result<()> {
    let ReproduceArgs { out, profile } = a;
    let p = ComputeProfile::load(&profile)?;
    let written = crate::reproduce::write_all(&out, &p, command_line)?;
    println!(
        "wrote {} files to {}: {}",
        written.len(),
        out.display(),
        written.join(", ")
    );
    Ok(())
}

pub fn sweep_command(a: SweepArgs) -> Result<()> {
    let SweepArgs {
        methods: m,
        devices,
        tokens,
        mbps,
        network,
        alpha_ms,
        algorithm,
        overlap,
        loss,
        slowdown,
        burst_bits,
        message_latency,
        profile,
        trace,
        baseline,
        model,
        out,
    } = a;
    let shape = model.shape()?;
    let baseline = baseline.map(|b| load_source(&b, shape)).transpose()?;
    let grid = Grid {
        methods: methods(&m)?,
        devices: parse_numbers("devices", &devices, |v| v as u32)?,
        tokens: parse_numbers("tokens", &tokens, |v| v as u64)?,
        mbps: parse_numbers("mbps", &mbps, |v| v)?,
        networks: network
            .split(',')
            .map(|s| match s.trim() {
                "paper" => Ok(ModelKind::Paper),
                "alpha-beta" => Ok(ModelKind::AlphaBeta),
                o => bail!("network: '{o}' is not paper or alpha-beta"),
            })
            .collect::<Result<_>>()?,
        alpha_ms: parse_numbers("alpha-ms", &alpha_ms, |v| v)?,
        algorithms: algorithm
            .split(',')
            .map(|s| match s.trim() {
                "direct" => Ok(Algorithm::Direct),
                "ring" => Ok(Algorithm::Ring),
                "star" => Ok(Algorithm::Star),
                o => bail!("algorithm: '{o}' is not direct, ring or star"),
            })
            .collect::<Result<_>>()?,
        overlap: list("overlap", &overlap)?,
        loss: parse_numbers("loss", &loss, |v| v)?,
        slowdown: match slowdown {
            Some(s) => list("slowdown", &s)?,
            None => vec![],
        },
        burst_bits,
        trace_latency: message_latency == args::MessageLatency::Trace,
    };
    let t0 = Instant::now();
    let loaded_trace;
    let source;
    let runs = match &trace {
        Some(path) => {
            loaded_trace = Trace::load(path)?;
            Runs::Trace(&loaded_trace)
        }
        None => {
            source = load_source(&profile, shape)?;
            Runs::Source(source.as_ref(), shape, model.split()?)
        }
    };
    let (csv, count) = sweep::run(runs, &grid, baseline.as_deref())?;
    let secs = t0.elapsed().as_secs_f64();
    write_atomic(&out, csv.as_bytes())?;
    eprintln!(
        "{count} configurations in {secs:.3} s ({:.0} per second) -> {}",
        count as f64 / secs.max(1e-9),
        out.display()
    );
    Ok(())
}

pub fn trace_command(a: TraceArgs) -> Result<()> {
    let TraceArgs {
        methods: m,
        devices,
        tokens,
        profile,
        model,
        out,
    } = a;
    let shape = model.shape()?;
    let src = load_source(&profile, shape)?;
    let mut configs = Vec::new();
    for meth in methods(&m)? {
        for n in parse_numbers("devices", &devices, |v| v as u32)? {
            for t in parse_numbers("tokens", &tokens, |v| v as u64)? {
                configs.push((meth, n, t));
            }
        }
    }
    if configs.iter().any(|c| c.2 == 0) {
        bail!("tokens must be positive integers");
    }
    let counts: Vec<u32> = configs.iter().map(|c| c.1).collect();
    crate::sweep::check_devices(&counts)?;
    let trace = Trace::from_profile(src.as_ref(), shape, &configs, model.split()?)?;
    write_atomic(&out, trace.to_json().as_bytes())?;
    println!("wrote {} runs to {}", trace.runs.len(), out.display());
    Ok(())
}

pub fn replay_worker_command(a: ReplayWorkerArgs) -> Result<()> {
    let ReplayWorkerArgs {
        rank,
        peers,
        run,
        slowdown,
        timeout_s,
    } = a;
    let text =
        std::fs::read_to_string(&run).map_err(|e| anyhow::anyhow!("{}: {e}", run.display()))?;
    let run: crate::trace::Run = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: malformed run: {e}", run.display()))?;
    let addrs = peers
        .split(',')
        .map(|a| {
            a.parse::<std::net::SocketAddr>()
                .map_err(|_| anyhow::anyhow!("peers: '{a}' is not ADDRESS:PORT"))
        })
        .collect::<Result<Vec<_>>>()?;
    let report = crate::live::worker(
        &run,
        rank,
        &addrs,
        slowdown,
        std::time::Duration::from_secs_f64(timeout_s),
    )?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// `plot-bars`: grouped bars from a CSV.
pub fn plot_bars_command(a: PlotBarsArgs) -> Result<()> {
    let groups = crate::bar_plot::read(&a.files.csv)?;
    let layout = if a.stacked {
        crate::bar_plot::Layout::Stacked
    } else {
        crate::bar_plot::Layout::Grouped
    };
    crate::bar_plot::plot_as(
        &groups,
        layout,
        &a.files.title,
        &a.x_desc,
        a.reference,
        &a.files.out,
    )?;
    println!("{} groups -> {}", groups.len(), a.files.out.display());
    Ok(())
}

/// `plot-lines`: a line figure from a CSV of points.
pub fn plot_lines_command(a: PlotLinesArgs) -> Result<()> {
    let lines = crate::line_plot::read(&a.files.csv)?;
    let axes = crate::line_plot::LineAxes {
        title: &a.files.title,
        x_desc: &a.x_desc,
        y_desc: &a.y_desc,
        log_x: a.log_x,
    };
    crate::line_plot::plot(&lines, &axes, &a.files.out)?;
    println!("{} series -> {}", lines.len(), a.files.out.display());
    Ok(())
}

/// `plot-measured`: the figure, and each point's prediction error on stdout.
pub fn plot_measured_command(a: PlotMeasuredArgs) -> Result<()> {
    let points = crate::measured_plot::collect(&a.dir)?;
    crate::measured_plot::plot(&points, &a.title, &a.out)?;
    let worst = points
        .iter()
        .map(crate::measured_plot::error)
        .fold(0.0, f64::max);
    println!(
        "{} runs -> {} (largest prediction error {:.1}%)",
        points.len(),
        a.out.display(),
        100.0 * worst
    );
    Ok(())
}

pub fn dynamic_command(a: DynamicArgs) -> Result<()> {
    let DynamicArgs {
        bandwidth,
        latencies,
        out,
    } = a;
    let trace = BandwidthTrace::load(&bandwidth)?;
    let table = if latencies == "paper-llama" {
        LatencyTable::paper_llama()
    } else {
        let text =
            std::fs::read_to_string(&latencies).map_err(|e| anyhow::anyhow!("{latencies}: {e}"))?;
        LatencyTable::parse(&text, &latencies)?
    };
    let mut csv = String::from("method,total_requests\n");
    for m in table.methods() {
        let r = dynamic::simulate(&trace, &table, &m)?;
        println!("{:<10} {:>5} requests in {} s", m, r.total, trace.seconds());
        csv += &format!("{},{}\n", m, r.total);
    }
    if let Some(o) = out {
        write_atomic(&o, csv.as_bytes())?;
    }
    Ok(())
}

pub fn replay_command(a: ReplayArgs, command_line: &str) -> Result<()> {
    let rates = parse_numbers("mbps", &a.mbps, |v| v)?;
    if let Some(b) = rates.iter().find(|b| !(b.is_finite() && **b > 0.0)) {
        bail!("mbps: {b} is not a positive number");
    }
    if !(0.0..100.0).contains(&a.loss_pct) || a.delay_ms.is_nan() || a.delay_ms < 0.0 {
        bail!("--loss-pct must be in [0, 100) and --delay-ms non-negative");
    }
    let slowdown: Vec<f64> = match &a.slowdown {
        Some(s) => list("slowdown", s)?,
        None => vec![],
    };
    let runs = replay_runs(&a)?;
    let script = a
        .netem_script
        .clone()
        .unwrap_or_else(crate::live::default_netem_script);
    let shaped = a.live && !a.no_shape && crate::live::can_shape(&script);
    if a.live {
        prepare_live(&a, &script, shaped);
    }
    let mut table = String::from(
        "| method | devices | tokens | Mbit/s | measured (ms) | alpha-beta (ms) | error | paper model (ms) | runs |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut errors = Vec::new();
    let mut id = 0usize;
    let replay = Replay {
        a: &a,
        script: &script,
        shaped,
        slowdown: &slowdown,
    };
    for run in &runs {
        let compiled = crate::network::CompiledRun::new(run)?;
        for &rate in &rates {
            let row = replay.row(run, &compiled, rate, &mut id, &mut errors)?;
            print!("{row}");
            table.push_str(&row);
        }
    }
    if let Some(o) = &a.out {
        let worst = errors.iter().cloned().fold(0.0, f64::max);
        write_atomic(
            o,
            replay_doc(&a, shaped, command_line, &table, worst).as_bytes(),
        )?;
    }
    Ok(())
}

/// The runs to replay: a trace file's, or built from a compute profile.
fn replay_runs(a: &ReplayArgs) -> Result<Vec<crate::trace::Run>> {
    use crate::trace::Run;
    let shape = a.model.shape()?;
    let runs: Vec<Run> = match &a.trace {
        Some(p) => {
            let wanted = methods(&a.methods)?;
            Trace::load(p)?
                .runs
                .into_iter()
                .filter(|r| wanted.contains(&r.method) && r.method != Method::Single)
                .collect()
        }
        None => {
            let src = load_source(&a.profile, shape)?;
            let split = a.model.split()?;
            let mut v = Vec::new();
            for m in methods(&a.methods)? {
                for n in parse_numbers("devices", &a.devices, |x| x as u32)? {
                    for t in parse_numbers("tokens", &a.tokens, |x| x as u64)? {
                        if n == 0 || t == 0 {
                            bail!("devices and tokens must be positive integers");
                        }
                        let ms = src.compute_ms(m, n, t)?;
                        v.push(Run::from_compute(&shape, m, n, t, ms, split));
                    }
                }
            }
            v
        }
    };
    if runs.is_empty() {
        bail!("no run selected");
    }
    Ok(runs)
}

/// Says when links are not shaped, and removes this process's namespaces on Ctrl-C / SIGTERM.
fn prepare_live(a: &ReplayArgs, script: &std::path::Path, shaped: bool) {
    if !shaped {
        eprintln!("note: links are NOT shaped ({}): loopback TCP at full speed, so measured and predicted latencies are not comparable",
            if a.no_shape { "--no-shape" } else { "needs root, iproute2 and network namespaces" });
    }
    let script_for_signal = script.to_path_buf();
    let prefix = format!("astra-{}", std::process::id());
    let _ = ctrlc::set_handler(move || {
        let _ = std::process::Command::new(&script_for_signal)
            .arg("gc")
            .status();
        let _ = std::process::Command::new(&script_for_signal)
            .args(["down", &prefix])
            .status();
        eprintln!("astra-sim: interrupted; namespaces removed");
        std::process::exit(130);
    });
}

/// What every row of a replay shares.
struct Replay<'a> {
    a: &'a ReplayArgs,
    script: &'a std::path::Path,
    shaped: bool,
    slowdown: &'a [f64],
}

impl Replay<'_> {
    /// One table row: the paper model, the alpha-beta prediction, and (live) the measured median.
    fn row(
        &self,
        run: &crate::trace::Run,
        compiled: &crate::network::CompiledRun,
        rate: f64,
        id: &mut usize,
        errors: &mut Vec<f64>,
    ) -> Result<String> {
        use crate::live::TCP_GOODPUT;
        use crate::network::Network;
        let mut paper = Network::paper(rate);
        if !self.slowdown.is_empty() {
            paper.slowdown = self.slowdown.to_vec();
        }
        let paper_ms = compiled.simulate(&paper)?.latency_ms;
        let (measured, alpha, runs_done) = if self.a.live {
            self.measure(run, rate, id)?
        } else {
            (None, self.a.delay_ms, 0)
        };
        // The live counterpart: direct collectives, no overlap, TCP goodput of the shaped rate,
        // alpha = measured one-way latency (plus netem's delay, which the ping already includes).
        let mut ab = Network::alpha_beta(rate * TCP_GOODPUT, alpha, Algorithm::Direct, false);
        if self.shaped {
            ab.burst_bits = crate::live::TBF_BURST_BITS;
        }
        if !self.slowdown.is_empty() {
            ab.slowdown = self.slowdown.to_vec();
        }
        let predicted = compiled.simulate(&ab)?.latency_ms;
        let (m_txt, e_txt) = match measured {
            Some(m) => {
                let e = (m - predicted) / predicted * 100.0;
                errors.push(e.abs());
                (format!("{m:.2}"), format!("{e:+.1}%"))
            }
            None => ("—".into(), "—".into()),
        };
        Ok(format!(
            "| {} | {} | {} | {} | {} | {predicted:.2} | {} | {paper_ms:.2} | {} |\n",
            run.method, run.devices, run.tokens, rate, m_txt, e_txt, runs_done
        ))
    }

    /// The median measured latency over the repeats, the median one-way latency, and the count.
    fn measure(
        &self,
        run: &crate::trace::Run,
        rate: f64,
        id: &mut usize,
    ) -> Result<(Option<f64>, f64, usize)> {
        let a = self.a;
        let mut ms = Vec::new();
        let mut alphas = Vec::new();
        for _ in 0..a.repeats.max(1) {
            *id += 1;
            let links = crate::live::Links {
                mbps: rate,
                delay_ms: a.delay_ms,
                loss_pct: a.loss_pct,
            };
            let o = crate::live::replay(
                run,
                &links,
                self.shaped,
                self.script,
                self.slowdown,
                std::time::Duration::from_secs_f64(a.timeout_s),
                *id,
            )?;
            ms.push(o.measured_ms);
            alphas.extend(o.reports.iter().map(|r| r.one_way_ms));
        }
        ms.sort_by(f64::total_cmp);
        alphas.sort_by(f64::total_cmp);
        let alpha = alphas.get(alphas.len() / 2).copied().unwrap_or(0.0);
        Ok((Some(ms[ms.len() / 2]), alpha, ms.len()))
    }
}

fn replay_doc(a: &ReplayArgs, shaped: bool, command_line: &str, table: &str, worst: f64) -> String {
    use crate::live::TCP_GOODPUT;
    let links = if shaped {
        format!("every device's uplink shaped by the kernel (scripts/netem.sh: HTB with ACK priority by default) in its own network namespace{}", if a.delay_ms > 0.0 || a.loss_pct > 0.0 { ", netem delay/loss where the kernel has it" } else { "" })
    } else {
        "NOT shaped (loopback)".into()
    };
    format!(
        "# Live replay against the models\n\nCommand: `{command_line}`\n\nLinks: {links}. Workers: one process per device, \
         full-mesh TCP (TCP_NODELAY), compute segments slept, communication sent as real bytes (direct collectives, ops in \
         program order). Prediction: alpha-beta model, direct algorithm, no overlap, bandwidth = link rate × {TCP_GOODPUT:.4} \
         (TCP payload per 1514-byte frame, less the ACKs of received data), the shaper's two-frame bucket as a free burst per round, alpha = measured one-way latency (ping-pong before each run). Paper model: \
         compute + bits / rate, each device sending its payload once (no per-peer copies, no protocol overhead).\n\n{table}\n\
         Largest |error| of the alpha-beta model: {worst:.1}%.\n"
    )
}

fn methods(spec: &str) -> Result<Vec<Method>> {
    Ok(spec
        .split(',')
        .map(|s| s.trim().parse::<Method>())
        .collect::<Result<Vec<_>, _>>()?)
}

fn list<T: std::str::FromStr>(field: &str, spec: &str) -> Result<Vec<T>> {
    spec.split(',')
        .map(|s| {
            s.trim()
                .parse::<T>()
                .map_err(|_| anyhow::anyhow!("{field}: '{s}' is not valid"))
        })
        .collect()
}
