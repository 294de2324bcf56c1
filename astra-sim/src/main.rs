//! `astra-sim`: parses the command line (options declared in `astra_sim::cli::args`) and runs the
//! command (`astra_sim::cli`).

use clap::Parser;

fn main() {
    if let Err(e) = astra_sim::cli::run(astra_sim::cli::Cli::parse()) {
        eprintln!("astra-sim: {e:#}");
        std::process::exit(1);
    }
}
