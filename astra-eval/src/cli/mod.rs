//! The `astra-eval` commands. The binary only parses ([`args`]) and calls [`run`]; every command
//! is a function here that takes its options struct.

pub mod args;

use std::time::Duration;

use anyhow::{anyhow, bail, Result};

pub use args::*;

use crate::measure::{self, Measurement, ProfileConfig};
use crate::runtime::{ControlVia, DistributedRun, SESSION_ENV};
use crate::settings_sweep::Metric;

/// Runs one parsed command.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Predict(a) => predict(&a),
        Command::Generate(a) => generate(&a),
        Command::Profile(a) => profile(&a),
        Command::Worker(a) => worker(&a),
        Command::Distributed(a) => distributed(&a),
        Command::Accuracy(o) => sweep(Metric::Accuracy, o),
        Command::Perplexity(o) => sweep(Metric::Perplexity, o),
        Command::Info(a) => info(&a),
    }
}

fn device(spec: &str) -> Result<tch::Device> {
    astra_train::libtorch::parse_device(spec).map_err(anyhow::Error::msg)
}

/// `predict`: logits of one batch, plain or under ASTRA, on any forward path.
pub fn predict(a: &PredictArgs) -> Result<()> {
    println!("{}", crate::predict::run(a)?);
    Ok(())
}

/// `generate`: a prompt continued, text streamed to stdout.
pub fn generate(a: &GenerateArgs) -> Result<()> {
    let summary = crate::generate::run(a)?;
    eprintln!("{}", summary.line());
    Ok(())
}

/// `worker`: one device of the runtime; the session key comes from the environment, since a
/// command line is readable by every user of the host.
pub fn worker(a: &WorkerArgs) -> Result<()> {
    crate::runtime::serve(
        &a.listen,
        &std::env::var(SESSION_ENV).unwrap_or_default(),
        Duration::from_millis(a.timeout_ms),
        Duration::from_millis(a.startup_timeout_ms),
        if a.stdio {
            ControlVia::Stdio
        } else {
            ControlVia::Tcp
        },
    )?;
    Ok(())
}

/// `distributed`: N worker processes over TCP (ASTRA, SP, or the single device).
pub fn distributed(a: &DistributedArgs) -> Result<()> {
    print!("{}", crate::runtime::distributed(&DistributedRun::new(a)?)?);
    Ok(())
}

/// `info`: the libtorch and devices evaluation would run on.
pub fn info(a: &InfoArgs) -> Result<()> {
    let info = crate::RuntimeInfo::collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{}", info.to_text());
    }
    Ok(())
}

/// The commit this binary was built from (for results' provenance); failing that, the checkout
/// it runs in, or "unknown".
fn commit() -> String {
    let built = env!("ASTRA_BUILD_COMMIT");
    if !built.is_empty() {
        return built.to_string();
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// `profile`: per-device compute of every method, as astra-sim's profile and trace.
pub fn profile(a: &ProfileArgs) -> Result<()> {
    let device = device(&a.device)?;
    if a.runs == 0
        || a.blocks <= 0
        || a.hidden <= 0
        || a.heads <= 0
        || a.mlp <= 0
        || a.codewords < 2
    {
        bail!("--runs, --blocks, --hidden, --heads and --mlp must be positive and --codewords at least 2");
    }
    let configs = profile_grid(a)?;
    let int8 = a.weights == ProfileWeights::Int8;
    if int8 && device != tch::Device::Cpu {
        bail!("--weights int8 computes on the CPU (fbgemm); use --device cpu");
    }
    if let Some((m, _, _)) = configs.iter().find(|(m, _, _)| {
        int8 && matches!(
            m,
            astra_sim::Method::Tp | astra_sim::Method::BpAg { .. } | astra_sim::Method::BpSp { .. }
        )
    }) {
        bail!("--weights int8 profiles the device engine's methods (single, sp, astra-*); {m} runs plain matrices");
    }
    astra_train::int8_linear::set_compute(int8);
    let arch = match a.arch {
        ProfileArch::Encoder => measure::Arch::Encoder,
        ProfileArch::Gpt2 => measure::Arch::Gpt2,
        ProfileArch::Llama => {
            let kv_heads = a.kv_heads.unwrap_or(a.heads);
            if kv_heads <= 0 || a.heads % kv_heads != 0 {
                bail!(
                    "--kv-heads {kv_heads} must be positive and divide --heads {}",
                    a.heads
                );
            }
            measure::Arch::Llama { kv_heads }
        }
    };
    if a.kv_heads.is_some() && a.arch != ProfileArch::Llama {
        bail!("--kv-heads is for --arch llama");
    }
    let cfg = ProfileConfig {
        arch,
        max_tokens: configs.iter().map(|c| c.2 as i64).max().unwrap_or(1),
        blocks: a.blocks,
        hidden: a.hidden,
        heads: a.heads,
        mlp: a.mlp,
        codewords: a.codewords,
        warmup: a.warmup,
        runs: a.runs,
        device,
        fast: a.fast,
    };
    let measured = measure::measure(&cfg, &configs)?;
    let csv = measure::to_csv(&measured);
    let trace = measure::to_trace(&csv, &cfg, &configs)?;
    let (csv_path, trace_path) = (a.out.join("profile.csv"), a.out.join("trace.json"));
    astra_sim::output::write_atomic(&csv_path, csv.as_bytes())?;
    astra_sim::output::write_atomic(&trace_path, trace.to_json().as_bytes())?;
    println!(
        "{:?}: {} blocks × {} wide, {}, {device:?}, median of {} runs{}\n",
        a.arch,
        a.blocks,
        a.hidden,
        if int8 {
            "int8 linear layers (fbgemm dynamic)"
        } else {
            "fp32"
        },
        a.runs,
        if a.fast { ", ASTRA fast path" } else { "" }
    );
    print!("{}", profile_tables(&measured));
    println!(
        "\nwrote {} and {}",
        csv_path.display(),
        trace_path.display()
    );
    Ok(())
}

/// The (method, devices, tokens) configurations `--methods × --devices × --tokens` name.
fn profile_grid(a: &ProfileArgs) -> Result<Vec<(astra_sim::Method, u32, u64)>> {
    let methods = a.methods.as_deref().unwrap_or(match a.arch {
        ProfileArch::Encoder => "single,tp,sp,bp-ag-nb1,bp-sp-nb1,astra-g1,astra-g16,astra-g32",
        _ => "single,sp,astra-g1,astra-g16,astra-g32",
    });
    let methods: Vec<astra_sim::Method> = methods
        .split(',')
        .map(|m| m.trim().parse())
        .collect::<std::result::Result<_, _>>()?;
    let list = |name: &str, s: &str| -> Result<Vec<u64>> {
        s.split(',')
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|&x| x > 0)
                    .ok_or_else(|| anyhow!("--{name}: '{v}' is not a positive integer"))
            })
            .collect()
    };
    let mut configs = Vec::new();
    for &m in &methods {
        for &n in &list("devices", &a.devices)? {
            for &t in &list("tokens", &a.tokens)? {
                let n = if m == astra_sim::Method::Single {
                    1
                } else {
                    n as u32
                };
                if !configs.contains(&(m, n, t)) {
                    configs.push((m, n, t));
                }
            }
        }
    }
    Ok(configs)
}

/// The measured compute, and the single-device latency over each method's per-device compute.
fn profile_tables(measured: &[Measurement]) -> String {
    let mut out = String::from(
        "| method | devices | tokens | compute ms (median) | min | max |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for m in measured {
        out += &format!(
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} |\n",
            m.method, m.devices, m.tokens, m.median_ms, m.min_ms, m.max_ms
        );
    }
    let single = |t: u64| {
        measured
            .iter()
            .find(|s| s.method == astra_sim::Method::Single && s.tokens == t)
    };
    let ratios: String = measured
        .iter()
        .filter(|m| m.method != astra_sim::Method::Single)
        .filter_map(|m| {
            single(m.tokens).map(|s| {
                format!(
                    "| {} | {} | {} | {:.2} |\n",
                    m.method,
                    m.devices,
                    m.tokens,
                    s.median_ms / m.median_ms
                )
            })
        })
        .collect();
    if !ratios.is_empty() {
        out += &format!("\nsingle-device latency / per-device compute:\n\n| method | devices | tokens | ratio |\n|---|---:|---:|---:|\n{ratios}");
    }
    out
}

/// `accuracy` / `perplexity`: a sweep over ASTRA settings, printed as markdown (with the command
/// and commit), optionally as JSON and appended to a table file.
pub fn sweep(metric: Metric, o: SweepOpts) -> Result<()> {
    let args = crate::settings_sweep::SweepArgs::new(metric, &o)?;
    let report = crate::settings_sweep::run(&args, true)?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let md = crate::settings_sweep::markdown(&report, &command, &commit());
    print!("{md}");
    if let Some(p) = o.json {
        astra_quant::atomic::write_bytes(&p, serde_json::to_string_pretty(&report)?.as_bytes())
            .map_err(|e| anyhow!("{}: {e}", p.display()))?;
    }
    if let Some(p) = o.table {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(|e| anyhow!("{}: {e}", p.display()))?;
        writeln!(f, "\n{md}").map_err(|e| anyhow!("{}: {e}", p.display()))?;
    }
    Ok(())
}
