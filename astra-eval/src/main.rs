use anyhow::Result;
use clap::{Parser, Subcommand};

/// ASTRA evaluation: accuracy, perplexity, compute profiling and the multi-device runtime.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Report the libtorch and devices evaluation would run on (same as `astra-train info`).
    Info {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
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
