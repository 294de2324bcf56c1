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
    /// Report the libtorch and devices evaluation would run on (same as `astra-train info`).
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
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
