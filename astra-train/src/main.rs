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
    /// Report the libtorch version, CUDA devices, cuDNN and CPU threads this binary sees.
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
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
