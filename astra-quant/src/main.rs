//! `astra-quant`: parses the command line (options declared in `astra_quant::cli::args`) and runs
//! the command (`astra_quant::cli`).

use clap::Parser;

fn main() {
    if let Err(e) = astra_quant::cli::run(astra_quant::cli::Cli::parse()) {
        eprintln!("astra-quant: {e:#}");
        std::process::exit(1);
    }
}
