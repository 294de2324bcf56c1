use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use astra_sim::dynamic::{self, BandwidthTrace, LatencyTable};
use astra_sim::network::{Algorithm, ModelKind};
use astra_sim::output::write_atomic;
use astra_sim::profile::{load_source, ComputeProfile};
use astra_sim::sweep::{self, parse_numbers, Grid, Runs};
use astra_sim::trace::{BlockSplit, Trace};
use astra_sim::{Method, ModelShape};
use clap::{Args, Parser, Subcommand};

/// Network simulator for multi-device Transformer inference: the ASTRA paper's latency tables and
/// figures, and what-if studies over network models.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Encoder blocks L.
    #[arg(long, default_value_t = 12)]
    blocks: u32,
    /// Hidden width D.
    #[arg(long, default_value_t = 768)]
    hidden: u32,
    /// Bits per embedding element on the wire (32 = fp32).
    #[arg(long, default_value_t = 32)]
    element_bits: u32,
    /// Codewords K per group (ASTRA sends ceil(log2 K) bits per index).
    #[arg(long, default_value_t = 1024)]
    codewords: u32,
    /// Share of each block's compute before its exchange (LN + VQ encode), for traces built from a profile.
    #[arg(long, default_value_t = 0.05)]
    pre_fraction: f64,
    /// Share of each block's compute that can overlap its exchange (ASTRA, SP), for traces built from a profile.
    #[arg(long, default_value_t = 0.3)]
    independent_fraction: f64,
}

impl ModelArgs {
    fn shape(&self) -> Result<ModelShape> {
        if self.blocks == 0 || self.hidden == 0 || self.element_bits == 0 {
            bail!("--blocks, --hidden and --element-bits must be positive");
        }
        if !(2..=65536).contains(&self.codewords) {
            bail!("--codewords must be in 2..=65536, got {}", self.codewords);
        }
        Ok(ModelShape {
            blocks: self.blocks,
            hidden: self.hidden,
            element_bits: self.element_bits,
            index_bits: astra_bits(self.codewords),
        })
    }
    fn split(&self) -> Result<BlockSplit> {
        let (p, i) = (self.pre_fraction, self.independent_fraction);
        if !(0.0..=1.0).contains(&p) || !(0.0..=1.0).contains(&i) || p + i > 1.0 {
            bail!(
                "--pre-fraction and --independent-fraction must be in [0, 1] and sum to at most 1"
            );
        }
        Ok(BlockSplit {
            pre: p,
            independent: i,
        })
    }
}

fn astra_bits(k: u32) -> u32 {
    u32::BITS - (k - 1).leading_zeros()
}

#[derive(Subcommand)]
enum Command {
    /// Regenerate the paper's latency results (speedups, Table 4, Fig 3, dynamic network, plots) into DIR.
    Reproduce {
        #[arg(long)]
        out: PathBuf,
        /// Compute profile: the built-in paper-1660ti or a CSV written by `astra-eval profile`.
        #[arg(long, default_value = "paper-1660ti")]
        profile: String,
    },
    /// Simulate any grid of methods × devices × tokens × bandwidths × network settings to CSV.
    Sweep {
        /// Comma-separated methods (single, tp, sp, bp-ag-nbN, bp-sp-nbN, astra-gG).
        #[arg(
            long,
            default_value = "astra-g1,astra-g16,astra-g32,bp-ag-nb1,bp-ag-nb4,bp-sp-nb1,bp-sp-nb4,tp,sp"
        )]
        methods: String,
        /// Devices: list a,b or range start:stop:step.
        #[arg(long, default_value = "4")]
        devices: String,
        #[arg(long, default_value = "1024")]
        tokens: String,
        /// Bandwidths in Mbit/s (Mbit = 2^20 bit): list or range.
        #[arg(long, default_value = "10,20,50,100,200,500")]
        mbps: String,
        /// Network models: paper, alpha-beta (comma-separated).
        #[arg(long, default_value = "paper")]
        network: String,
        /// Per-message latencies α in ms (alpha-beta).
        #[arg(long, default_value = "0.5")]
        alpha_ms: String,
        /// Collective algorithms: direct, ring, star (alpha-beta).
        #[arg(long, default_value = "direct")]
        algorithm: String,
        /// Overlap settings: false, true or both "false,true" (alpha-beta).
        #[arg(long, default_value = "false")]
        overlap: String,
        /// Packet-loss probabilities.
        #[arg(long, default_value = "0")]
        loss: String,
        /// Per-device compute slowdowns, e.g. 1,1,1.5,2 (heterogeneous devices); one value or one per device.
        #[arg(long)]
        slowdown: Option<String>,
        /// Compute source: paper-1660ti, a profile CSV, or analytic:TFLOPS:GBPS[:EFFICIENCY].
        #[arg(long, default_value = "paper-1660ti", conflicts_with = "trace")]
        profile: String,
        /// Take the runs from a trace file (e.g. measured by astra-eval) instead of a profile.
        #[arg(long)]
        trace: Option<PathBuf>,
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the trace of the given configurations, built from a compute source, as JSON.
    Trace {
        #[arg(long, default_value = "astra-g16,sp,tp")]
        methods: String,
        #[arg(long, default_value = "4")]
        devices: String,
        #[arg(long, default_value = "1024")]
        tokens: String,
        #[arg(long, default_value = "paper-1660ti")]
        profile: String,
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// Replay runs and compare with the models; with --live over real TCP between processes in
    /// network namespaces behind kernel-shaped links (needs root; else unshaped loopback).
    Replay(ReplayArgs),
    /// One device of a live replay (started by `replay --live`).
    #[command(hide = true)]
    ReplayWorker {
        #[arg(long)]
        rank: usize,
        #[arg(long)]
        peers: String,
        #[arg(long)]
        run: PathBuf,
        #[arg(long, default_value_t = 1.0)]
        slowdown: f64,
        #[arg(long, default_value_t = 30.0)]
        timeout_s: f64,
    },
    /// Run the dynamic-bandwidth experiment on any trace and latency table.
    Dynamic {
        /// Bandwidth trace CSV (second,mbps) or "paper".
        #[arg(long, default_value = "paper")]
        bandwidth: String,
        /// Latency table CSV (method,mbps,latency_s) or "paper-llama".
        #[arg(long, default_value = "paper-llama")]
        latencies: String,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("astra-sim: {e:#}");
        std::process::exit(1);
    }
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

fn run() -> Result<()> {
    let cli = Cli::parse();
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    match cli.command {
        Command::Reproduce { out, profile } => {
            let p = ComputeProfile::load(&profile)?;
            let written = astra_sim::reproduce::write_all(&out, &p, &command_line)?;
            println!(
                "wrote {} files to {}: {}",
                written.len(),
                out.display(),
                written.join(", ")
            );
        }
        Command::Sweep {
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
            profile,
            trace,
            model,
            out,
        } => {
            let shape = model.shape()?;
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
            let (csv, count) = sweep::run(runs, &grid)?;
            let secs = t0.elapsed().as_secs_f64();
            write_atomic(&out, csv.as_bytes())?;
            eprintln!(
                "{count} configurations in {secs:.3} s ({:.0} per second) -> {}",
                count as f64 / secs.max(1e-9),
                out.display()
            );
        }
        Command::Trace {
            methods: m,
            devices,
            tokens,
            profile,
            model,
            out,
        } => {
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
            astra_sim::sweep::check_devices(&counts)?;
            let trace = Trace::from_profile(src.as_ref(), shape, &configs, model.split()?)?;
            write_atomic(&out, trace.to_json().as_bytes())?;
            println!("wrote {} runs to {}", trace.runs.len(), out.display());
        }
        Command::ReplayWorker {
            rank,
            peers,
            run,
            slowdown,
            timeout_s,
        } => {
            let text = std::fs::read_to_string(&run)
                .map_err(|e| anyhow::anyhow!("{}: {e}", run.display()))?;
            let run: astra_sim::trace::Run = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: malformed run: {e}", run.display()))?;
            let addrs = peers
                .split(',')
                .map(|a| {
                    a.parse::<std::net::SocketAddr>()
                        .map_err(|_| anyhow::anyhow!("peers: '{a}' is not ADDRESS:PORT"))
                })
                .collect::<Result<Vec<_>>>()?;
            let report = astra_sim::live::worker(
                &run,
                rank,
                &addrs,
                slowdown,
                std::time::Duration::from_secs_f64(timeout_s),
            )?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Replay(args) => replay_command(args, &command_line)?,
        Command::Dynamic {
            bandwidth,
            latencies,
            out,
        } => {
            let trace = BandwidthTrace::load(&bandwidth)?;
            let table = if latencies == "paper-llama" {
                LatencyTable::paper_llama()
            } else {
                let text = std::fs::read_to_string(&latencies)
                    .map_err(|e| anyhow::anyhow!("{latencies}: {e}"))?;
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
        }
    }
    Ok(())
}

#[derive(Args)]
struct ReplayArgs {
    /// Actually run the processes (without it: predictions only).
    #[arg(long)]
    live: bool,
    /// Do not shape links even when root: loopback, unshaped.
    #[arg(long)]
    no_shape: bool,
    #[arg(long, default_value = "astra-g16,bp-ag-nb1")]
    methods: String,
    #[arg(long, default_value = "2,4")]
    devices: String,
    #[arg(long, default_value = "1024")]
    tokens: String,
    /// Link rates (Mbit/s, 2^20 bit) to replay at.
    #[arg(long, default_value = "10,50,100")]
    mbps: String,
    /// One-way delay added by netem (ms), where the kernel has netem.
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Packet loss added by netem (percent), where the kernel has netem.
    #[arg(long, default_value_t = 0.0)]
    loss_pct: f64,
    /// Per-device compute slowdowns (one value or one per device).
    #[arg(long)]
    slowdown: Option<String>,
    /// Live runs per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// A worker waiting longer than this for a peer gives up (seconds).
    #[arg(long, default_value_t = 30.0)]
    timeout_s: f64,
    /// Compute source for the runs: paper-1660ti, a profile CSV, or analytic:TFLOPS:GBPS.
    #[arg(long, default_value = "paper-1660ti", conflicts_with = "trace")]
    profile: String,
    /// Replay the runs of a trace file instead.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// netem.sh to shape links with.
    #[arg(long)]
    netem_script: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Markdown table of measured vs predicted latency.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn replay_command(a: ReplayArgs, command_line: &str) -> Result<()> {
    use astra_sim::live::{self, Links, TCP_GOODPUT};
    use astra_sim::network::{CompiledRun, Network};
    use astra_sim::trace::Run;

    let shape = a.model.shape()?;
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
    let runs: Vec<Run> = match &a.trace {
        Some(p) => {
            let t = Trace::load(p)?;
            let wanted = methods(&a.methods)?;
            t.runs
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
                        v.push(Run::from_compute(
                            &shape,
                            m,
                            n,
                            t,
                            src.compute_ms(m, n, t)?,
                            split,
                        ));
                    }
                }
            }
            v
        }
    };
    if runs.is_empty() {
        bail!("no run selected");
    }
    let script = a
        .netem_script
        .clone()
        .unwrap_or_else(live::default_netem_script);
    let shaped = a.live && !a.no_shape && live::can_shape(&script);
    if a.live {
        if !shaped {
            eprintln!("note: links are NOT shaped ({}): loopback TCP at full speed, so measured and predicted latencies are not comparable",
                if a.no_shape { "--no-shape" } else { "needs root, iproute2 and network namespaces" });
        }
        // Ctrl-C and SIGTERM: remove this process's namespaces before exiting.
        let script_for_signal = script.clone();
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
    let mut table = String::from(
        "| method | devices | tokens | Mbit/s | measured (ms) | alpha-beta (ms) | error | paper model (ms) | runs |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut errors = Vec::new();
    let mut id = 0usize;
    for run in &runs {
        let compiled = CompiledRun::new(run)?;
        for &rate in &rates {
            let mut paper = Network::paper(rate);
            if !slowdown.is_empty() {
                paper.slowdown = slowdown.clone();
            }
            let paper_ms = compiled.simulate(&paper)?.latency_ms;
            let (measured, alpha, runs_done) = if a.live {
                let mut ms = Vec::new();
                let mut alphas = Vec::new();
                for _ in 0..a.repeats.max(1) {
                    id += 1;
                    let links = Links {
                        mbps: rate,
                        delay_ms: a.delay_ms,
                        loss_pct: a.loss_pct,
                    };
                    let o = live::replay(
                        run,
                        &links,
                        shaped,
                        &script,
                        &slowdown,
                        std::time::Duration::from_secs_f64(a.timeout_s),
                        id,
                    )?;
                    ms.push(o.measured_ms);
                    alphas.extend(o.reports.iter().map(|r| r.one_way_ms));
                }
                ms.sort_by(f64::total_cmp);
                alphas.sort_by(f64::total_cmp);
                (
                    Some(ms[ms.len() / 2]),
                    alphas.get(alphas.len() / 2).copied().unwrap_or(0.0),
                    ms.len(),
                )
            } else {
                (None, a.delay_ms, 0)
            };
            // The live counterpart: direct collectives, no overlap, TCP goodput of the shaped rate,
            // alpha = measured one-way latency (plus netem's delay, which the ping already includes).
            let mut ab = Network::alpha_beta(rate * TCP_GOODPUT, alpha, Algorithm::Direct, false);
            if shaped {
                ab.burst_bits = live::TBF_BURST_BITS;
            }
            if !slowdown.is_empty() {
                ab.slowdown = slowdown.clone();
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
            let row = format!(
                "| {} | {} | {} | {} | {} | {predicted:.2} | {} | {paper_ms:.2} | {} |\n",
                run.method, run.devices, run.tokens, rate, m_txt, e_txt, runs_done
            );
            print!("{row}");
            table.push_str(&row);
        }
    }
    if let Some(o) = &a.out {
        let worst = errors.iter().cloned().fold(0.0, f64::max);
        let doc = format!(
            "# Live replay against the models\n\nCommand: `{command_line}`\n\nLinks: {}. Workers: one process per device, \
             full-mesh TCP (TCP_NODELAY), compute segments slept, communication sent as real bytes (direct collectives, ops in \
             program order). Prediction: alpha-beta model, direct algorithm, no overlap, bandwidth = link rate × {TCP_GOODPUT:.4} \
             (TCP payload per 1514-byte frame, less the ACKs of received data), the shaper's two-frame bucket as a free burst per round, alpha = measured one-way latency (ping-pong before each run). Paper model: \
             compute + bits / rate, each device sending its payload once (no per-peer copies, no protocol overhead).\n\n{table}\n\
             Largest |error| of the alpha-beta model: {worst:.1}%.\n",
            if shaped { format!("every device's uplink shaped by the kernel (scripts/netem.sh: HTB with ACK priority by default) in its own network namespace{}", if a.delay_ms > 0.0 || a.loss_pct > 0.0 { ", netem delay/loss where the kernel has it" } else { "" }) } else { "NOT shaped (loopback)".into() }
        );
        write_atomic(o, doc.as_bytes())?;
    }
    Ok(())
}
