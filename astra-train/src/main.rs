use anyhow::Result;
use clap::{Parser, Subcommand};

/// ASTRA training: models with Mixed-Precision Attention, VQ, NAQ and DCT on libtorch.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Training-step throughput of ViT-B/16 (random weights and data, AdamW): plain and ASTRA.
    BenchStep {
        #[arg(long, default_value_t = 128)]
        batch: i64,
        #[arg(long, default_value_t = 224)]
        image: i64,
        #[arg(long, default_value_t = 16)]
        patch: i64,
        #[arg(long, default_value_t = 1000)]
        classes: i64,
        /// ASTRA devices N (MPA) for the ASTRA row.
        #[arg(long, default_value_t = 4)]
        devices: usize,
        /// VQ groups G for the ASTRA row.
        #[arg(long, default_value_t = 32)]
        groups: usize,
        #[arg(long, default_value_t = 1024)]
        codewords: usize,
        /// Timed steps (the median is reported) after --warmup untimed ones.
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// bf16 autocast (CUDA only).
        #[arg(long)]
        bf16: bool,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cuda")]
        device: String,
    },
    /// Report the libtorch version, CUDA devices, cuDNN and CPU threads this binary sees.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("astra-train: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    match Cli::parse().command {
        Command::BenchStep {
            batch,
            image,
            patch,
            classes,
            devices,
            groups,
            codewords,
            steps,
            warmup,
            bf16,
            device,
        } => {
            let device = astra_train::runtime::parse_device(&device).map_err(anyhow::Error::msg)?;
            if steps == 0 {
                anyhow::bail!("--steps must be at least 1");
            }
            println!(
                "ViT-B/16 training step, {image}x{image}, batch {batch}, AdamW, {}, {:?}\n",
                if bf16 { "bf16 autocast" } else { "fp32" },
                device
            );
            println!(
                "| model | median step (ms) | min | max | images/s |\n|---|---:|---:|---:|---:|"
            );
            for astra in [None, Some((devices, groups, codewords))] {
                let r = astra_train::bench_step::run(&astra_train::bench_step::StepBench {
                    batch,
                    image,
                    patch,
                    classes,
                    astra,
                    steps,
                    warmup,
                    bf16,
                    device,
                })?;
                let name = match astra {
                    None => "plain".to_string(),
                    Some((n, g, k)) => format!("ASTRA (MPA N={n}, G={g}, K={k}, VQ-EMA, NAQ, DCT)"),
                };
                println!(
                    "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    r.median_s * 1e3,
                    r.min_s * 1e3,
                    r.max_s * 1e3,
                    r.images_per_s
                );
            }
        }
        Command::Info { json } => {
            let info = astra_train::runtime::RuntimeInfo::collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", info.to_text());
            }
        }
    }
    Ok(())
}
