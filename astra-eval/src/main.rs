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

#[derive(Subcommand)]
enum Command {
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
    astra_train::runtime::ensure_passive_openmp();
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
            let device = astra_train::runtime::parse_device(&device).map_err(anyhow::Error::msg)?;
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
            let device = astra_train::runtime::parse_device(&device).map_err(anyhow::Error::msg)?;
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
