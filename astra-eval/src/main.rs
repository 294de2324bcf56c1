use std::path::PathBuf;

use anyhow::Result;
use astra_eval::predict::{self, ForwardPath, PredictArgs};
use astra_train::models::ClsMode;
use clap::{Parser, Subcommand};

/// ASTRA evaluation: predictions, accuracy, perplexity, compute profiling and the multi-device runtime.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options of `accuracy` and `perplexity`.
#[derive(clap::Args)]
struct SweepOpts {
    /// The model: a run folder (its model/, with codebooks.safetensors for ASTRA runs), an HF folder or hub id.
    #[arg(long)]
    model: String,
    /// Data spec, as for astra-train (images for accuracy, text:… for perplexity).
    #[arg(long)]
    data: String,
    /// Codebooks; default: codebooks.safetensors beside the model.
    #[arg(long)]
    codebooks: Option<PathBuf>,
    /// Check that the codebooks have this many groups G.
    #[arg(long)]
    groups: Option<usize>,
    /// Devices N to evaluate (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "4")]
    devices: Vec<usize>,
    /// Partition modes (comma-separated): contiguous, random, allocation.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "contiguous")]
    partition: Vec<astra_eval::sweep::Partition>,
    /// CLS modes for ViTs (comma-separated): distributed, single.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "distributed")]
    cls: Vec<ClsMode>,
    /// Quantize remote tokens (on), send them in full precision (off), or both: on,off.
    #[arg(long, value_delimiter = ',', default_value = "on", value_parser = parse_on_off)]
    vq: Vec<bool>,
    /// Probability that a remote token's indices are lost on a link (comma-separated; the
    /// receiver masks the token out). The paper's Table 11 uses 0.05.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    loss: Vec<f64>,
    /// Evaluate the first N test images (text: N windows) only.
    #[arg(long)]
    max_test: Option<usize>,
    /// Text: tokens per window (default: the model's n_positions).
    #[arg(long)]
    context: Option<usize>,
    /// Text: a window starts every STRIDE tokens (default: the context, disjoint windows).
    #[arg(long)]
    stride: Option<usize>,
    /// Images per batch (each batch draws its own random partition).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Seed of random partitions and allocations.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    bf16: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Append the markdown table (with this command and the commit) to this file.
    #[arg(long)]
    table: Option<PathBuf>,
}

fn parse_on_off(s: &str) -> std::result::Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        o => Err(format!("'{o}' is not on or off")),
    }
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn sweep(metric: astra_eval::sweep::Metric, o: SweepOpts) -> Result<()> {
    use astra_eval::sweep;
    let device = astra_train::libtorch::parse_device(&o.device).map_err(anyhow::Error::msg)?;
    let args = sweep::SweepArgs {
        metric,
        model: o.model,
        data: o.data,
        codebooks: o.codebooks,
        groups: o.groups,
        devices: o.devices,
        partitions: o.partition,
        cls: o.cls,
        vq: o.vq,
        loss: o.loss,
        max_test: o.max_test,
        context: o.context,
        stride: o.stride,
        batch: o.batch,
        seed: o.seed,
        bf16: o.bf16,
        device,
    };
    let report = sweep::run(&args, true)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let md = sweep::markdown(&report, &command, &commit());
    print!("{md}");
    if let Some(p) = o.json {
        astra_quant::atomic::write_bytes(&p, serde_json::to_string_pretty(&report)?.as_bytes())
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    }
    if let Some(p) = o.table {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        writeln!(f, "\n{md}").map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
    }
    Ok(())
}

/// `RATE[,DELAY_MS[,LOSS_PCT]]` of `--links`.
fn parse_links(s: &str) -> anyhow::Result<astra_eval::runtime::Links> {
    let f: Vec<&str> = s.split(',').collect();
    let num = |i: usize, what: &str| -> anyhow::Result<f64> {
        match f.get(i) {
            None => Ok(0.0),
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| anyhow::anyhow!("--links {s}: {what} '{v}' is not a number ≥ 0")),
        }
    };
    let l = astra_eval::runtime::Links {
        mbps: num(0, "rate")?,
        delay_ms: num(1, "delay")?,
        loss_pct: num(2, "loss")?,
    };
    if f.len() > 3 || l.mbps <= 0.0 || l.loss_pct > 100.0 {
        anyhow::bail!(
            "--links {s}: expected RATE_MBIT[,DELAY_MS[,LOSS_PCT]] with RATE > 0 and LOSS ≤ 100"
        );
    }
    Ok(l)
}

#[derive(Subcommand)]
enum Command {
    /// One device of the multi-process runtime: listens, takes a plan from the coordinator, runs
    /// the forward as often as the coordinator asks. Start one per host for `distributed --workers`.
    Worker {
        /// Address to bind for peers and (without --stdio) the coordinator: loopback by default;
        /// port 0 picks one, printed as `listening ADDR`. Give the host's address for other hosts.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Give up on a silent peer after this long.
        #[arg(long, default_value_t = 10000)]
        timeout_ms: u64,
        /// Give up on the coordinator and the peers connecting (and loading) after this long.
        #[arg(long, default_value_t = 60000)]
        startup_timeout_ms: u64,
        /// Talk to the coordinator over stdin/stdout (how `distributed` starts local workers).
        #[arg(long)]
        stdio: bool,
    },
    /// ASTRA inference across N worker processes over TCP (ViT classification or GPT-2 prefill;
    /// VQ indices exchanged per block), the SP baseline (`--mode sp`: fp32 embeddings exchanged)
    /// or the single-device model (`--devices 1`). Local workers by default, each behind a shaped
    /// link with `--links` (root); running workers on other hosts with `--workers`.
    Distributed {
        #[arg(long)]
        model: String,
        /// astra (VQ indices) or sp (fp32 embeddings; the single-device model is `--devices 1`).
        #[arg(long, default_value = "astra", value_parser = ["astra", "sp"])]
        mode: String,
        /// Codebooks; default: codebooks.safetensors beside the model.
        #[arg(long)]
        codebooks: Option<PathBuf>,
        /// Devices N (default 4, or the number of --workers).
        #[arg(long)]
        devices: Option<usize>,
        /// Running workers (`ASTRA_SESSION=KEY astra-eval worker --listen HOST:PORT` on each host),
        /// comma-separated, by rank; the model, codebooks and input paths must exist on every
        /// host. Pass the workers' session key in ASTRA_SESSION.
        #[arg(long, value_delimiter = ',')]
        workers: Vec<String>,
        /// Shape every local worker's uplink: RATE Mbit/s (2^20 bit), optional one-way DELAY ms
        /// and LOSS %, e.g. 10 or 50,5,0.1. Workers run in network namespaces (needs root).
        #[arg(long)]
        links: Option<String>,
        /// libtorch threads per worker (default: this machine's cores / devices).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// float32 [B, C, H, W] normalised images (ViT) or int64 [B, T] token ids (GPT-2), .npy.
        #[arg(long)]
        input: PathBuf,
        /// float32 logits, .npy: [B, classes] (ViT), [B, vocabulary] (GPT-2 next token) or
        /// [B, T, vocabulary] (GPT-2 with --all-logits).
        #[arg(long)]
        out: PathBuf,
        /// One CLS on device 0 instead of one per device.
        #[arg(long)]
        single_cls: bool,
        /// GPT-2: write the logits of every token [B, T, V] (every device returns its final
        /// states) instead of the next-token logits [B, V] the last device computes.
        #[arg(long)]
        all_logits: bool,
        /// Every process gives up on a silent peer after this long.
        #[arg(long, default_value_t = 10000)]
        timeout_ms: u64,
        /// Workers must start, load the model and connect within this long.
        #[arg(long, default_value_t = 60000)]
        startup_timeout_ms: u64,
        /// Timed runs (the median is reported).
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Untimed runs first.
        #[arg(long, default_value_t = 0)]
        warmup: usize,
        /// Write the measured per-block timings of the median run as an astra-sim trace (an
        /// all-gather per block for a ViT, sends to later devices for GPT-2; predict it with
        /// `astra-sim sweep --trace FILE`).
        #[arg(long)]
        trace: Option<PathBuf>,
        /// Write latencies and per-worker times as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Accuracy of an image model over ASTRA settings (devices, partition, CLS, VQ, lost messages),
    /// beside the single-device model; random allocations also by FPAR quintile.
    Accuracy {
        #[command(flatten)]
        opts: SweepOpts,
    },
    /// Perplexity of a GPT-2 over ASTRA settings (devices, partition, VQ, lost messages), beside the
    /// single-device model; pinned protocol: disjoint (or --stride) windows, GPT-2 BPE.
    Perplexity {
        #[command(flatten)]
        opts: SweepOpts,
    },
    /// Logits of a model for a batch: the plain model, or ASTRA on N devices.
    Predict {
        /// HF-style folder (config.json + model.safetensors), a run folder, or a hub id org/name.
        #[arg(long)]
        model: String,
        /// float32 [B, C, H, W] (normalised images, ViT) or int64 [B, T] (token ids, GPT-2), .npy.
        #[arg(long)]
        input: PathBuf,
        /// float32 logits, .npy.
        #[arg(long)]
        out: PathBuf,
        /// Simulate ASTRA on N devices (contiguous token split); without it, the plain model.
        #[arg(long)]
        devices: Option<usize>,
        /// Codebooks (astra-quant file, one block per layer); without them remote tokens are not quantized.
        #[arg(long, requires = "devices")]
        codebooks: Option<PathBuf>,
        /// Where the CLS token lives (ViT).
        #[arg(long, value_enum, default_value = "distributed")]
        cls: ClsMode,
        /// masked: all devices in one process; per-device: device by device with an in-memory exchange.
        #[arg(long, value_enum, default_value = "masked")]
        path: ForwardPath,
        /// cpu, cuda, or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Measure per-device compute of every method (single, tp, sp, bp-ag-nbK, bp-sp-nbK, astra-gG)
    /// on this machine: writes DIR/profile.csv and DIR/trace.json (astra-sim's formats).
    Profile {
        #[arg(
            long,
            default_value = "single,tp,sp,bp-ag-nb1,bp-sp-nb1,astra-g1,astra-g16,astra-g32"
        )]
        methods: String,
        /// Devices N (comma-separated).
        #[arg(long, default_value = "4")]
        devices: String,
        /// Tokens T (comma-separated).
        #[arg(long, default_value = "1024")]
        tokens: String,
        #[arg(long, default_value_t = 12)]
        blocks: i64,
        #[arg(long, default_value_t = 768)]
        hidden: i64,
        #[arg(long, default_value_t = 12)]
        heads: i64,
        #[arg(long, default_value_t = 3072)]
        mlp: i64,
        /// Codewords K per group (ASTRA).
        #[arg(long, default_value_t = 1024)]
        codewords: i64,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// ASTRA's remote keys/values from per-codeword tables (the fast inference path).
        #[arg(long)]
        fast: bool,
        /// cpu, cuda, or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Report the libtorch and devices evaluation would run on (same as `astra-train info`).
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    astra_train::libtorch::ensure_passive_openmp();
    if let Err(e) = run() {
        eprintln!("astra-eval: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    match Cli::parse().command {
        Command::Predict {
            model,
            input,
            out,
            devices,
            codebooks,
            cls,
            path,
            device,
        } => {
            let device =
                astra_train::libtorch::parse_device(&device).map_err(anyhow::Error::msg)?;
            let msg = predict::run(&PredictArgs {
                model,
                input,
                out,
                devices,
                codebooks,
                cls,
                path,
                device,
            })?;
            println!("{msg}");
        }
        Command::Profile {
            methods,
            devices,
            tokens,
            blocks,
            hidden,
            heads,
            mlp,
            codewords,
            warmup,
            runs,
            fast,
            device,
            out,
        } => {
            use astra_eval::profile::{self, ProfileConfig};
            let device =
                astra_train::libtorch::parse_device(&device).map_err(anyhow::Error::msg)?;
            if runs == 0 || blocks <= 0 || hidden <= 0 || heads <= 0 || mlp <= 0 || codewords < 2 {
                anyhow::bail!("--runs, --blocks, --hidden, --heads and --mlp must be positive and --codewords at least 2");
            }
            let methods: Vec<astra_sim::Method> = methods
                .split(',')
                .map(|m| m.trim().parse())
                .collect::<Result<_, _>>()?;
            let list = |name: &str, s: &str| -> Result<Vec<u64>> {
                s.split(',')
                    .map(|v| {
                        v.trim()
                            .parse::<u64>()
                            .ok()
                            .filter(|&x| x > 0)
                            .ok_or_else(|| {
                                anyhow::anyhow!("--{name}: '{v}' is not a positive integer")
                            })
                    })
                    .collect()
            };
            let mut configs = Vec::new();
            for &m in &methods {
                for &n in &list("devices", &devices)? {
                    for &t in &list("tokens", &tokens)? {
                        let c = (
                            m,
                            if m == astra_sim::Method::Single {
                                1
                            } else {
                                n as u32
                            },
                            t,
                        );
                        if !configs.contains(&c) {
                            configs.push(c);
                        }
                    }
                }
            }
            let cfg = ProfileConfig {
                blocks,
                hidden,
                heads,
                mlp,
                codewords,
                warmup,
                runs,
                device,
                fast,
            };
            let measured = profile::measure(&cfg, &configs)?;
            let csv = profile::to_csv(&measured);
            let trace = profile::to_trace(&csv, &cfg, &configs)?;
            std::fs::create_dir_all(&out)?;
            astra_sim::output::write_atomic(&out.join("profile.csv"), csv.as_bytes())?;
            astra_sim::output::write_atomic(&out.join("trace.json"), trace.to_json().as_bytes())?;
            println!(
                "{blocks} blocks × {hidden} wide, fp32, {device:?}, median of {runs} runs{}\n",
                if fast { ", ASTRA fast path" } else { "" }
            );
            println!("| method | devices | tokens | compute ms (median) | min | max |\n|---|---:|---:|---:|---:|---:|");
            for m in &measured {
                println!(
                    "| {} | {} | {} | {:.2} | {:.2} | {:.2} |",
                    m.method, m.devices, m.tokens, m.median_ms, m.min_ms, m.max_ms
                );
            }
            let mut ratios = String::new();
            for m in measured
                .iter()
                .filter(|m| m.method != astra_sim::Method::Single)
            {
                if let Some(s) = measured
                    .iter()
                    .find(|s| s.method == astra_sim::Method::Single && s.tokens == m.tokens)
                {
                    ratios += &format!(
                        "| {} | {} | {} | {:.2} |\n",
                        m.method,
                        m.devices,
                        m.tokens,
                        s.median_ms / m.median_ms
                    );
                }
            }
            if !ratios.is_empty() {
                println!("\nsingle-device latency / per-device compute:\n\n| method | devices | tokens | ratio |\n|---|---:|---:|---:|\n{ratios}");
            }
            println!(
                "\nwrote {} and {}",
                out.join("profile.csv").display(),
                out.join("trace.json").display()
            );
        }
        Command::Worker {
            listen,
            timeout_ms,
            startup_timeout_ms,
            stdio,
        } => astra_eval::runtime::serve(
            &listen,
            // The key comes from the environment: a command line is readable by every user.
            &std::env::var(astra_eval::runtime::SESSION_ENV).unwrap_or_default(),
            std::time::Duration::from_millis(timeout_ms),
            std::time::Duration::from_millis(startup_timeout_ms),
            if stdio {
                astra_eval::runtime::ControlVia::Stdio
            } else {
                astra_eval::runtime::ControlVia::Tcp
            },
        )?,
        Command::Distributed {
            model,
            mode,
            codebooks,
            devices,
            workers,
            links,
            threads,
            input,
            out,
            single_cls,
            all_logits,
            timeout_ms,
            startup_timeout_ms,
            runs,
            warmup,
            trace,
            json,
        } => {
            let devices = devices.unwrap_or(if workers.is_empty() { 4 } else { workers.len() });
            // One device exchanges nothing: the single-device model needs no codebooks.
            let sp = mode == "sp" || (devices == 1 && codebooks.is_none());
            let codebooks = match codebooks {
                Some(c) => c,
                None if sp => PathBuf::new(),
                None => {
                    let c = astra_train::model::resolve(&model)?.join("codebooks.safetensors");
                    if !c.exists() {
                        anyhow::bail!(
                            "{model} has no codebooks.safetensors beside it; pass --codebooks FILE"
                        );
                    }
                    c
                }
            };
            let links = links.as_deref().map(parse_links).transpose()?;
            let msg = astra_eval::runtime::distributed(&astra_eval::runtime::DistributedArgs {
                model,
                codebooks,
                sp,
                devices,
                workers,
                links,
                threads,
                all_logits,
                input,
                out,
                single_cls,
                timeout: std::time::Duration::from_millis(timeout_ms),
                startup: std::time::Duration::from_millis(startup_timeout_ms),
                runs,
                warmup,
                trace,
                json,
            })?;
            print!("{msg}");
        }
        Command::Accuracy { opts } => sweep(astra_eval::sweep::Metric::Accuracy, opts)?,
        Command::Perplexity { opts } => sweep(astra_eval::sweep::Metric::Perplexity, opts)?,
        Command::Info { json } => {
            let info = astra_eval::RuntimeInfo::collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", info.to_text());
            }
        }
    }
    Ok(())
}
