//! `astra-eval`: parses the command line (options declared in `astra_eval::cli::args`) and runs
//! the command (`astra_eval::cli`).

use clap::Parser;

fn main() {
    astra_train::libtorch::ensure_passive_openmp();
    let cli = astra_eval::cli::Cli::parse();
    if let Err(e) = astra_eval::cli::run(cli.command) {
        eprintln!("astra-eval: {e:#}");
        std::process::exit(1);
    }
}
