//! `astra-train`: parses the command line (options declared in `astra_train::cli::args`) and runs
//! the command (`astra_train::cli`).

use astra_train::cli::{expand_config, run, Cli};

fn main() {
    astra_train::libtorch::ensure_passive_openmp();
    let expanded = match expand_config(std::env::args().collect()) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("astra-train: {e:#}");
            std::process::exit(2);
        }
    };
    let cli: Cli = astra_quant::cli::parse::parse_or_exit(expanded.args);
    if let Err(e) = run(cli.command, expanded.model) {
        eprintln!("astra-train: {e:#}");
        std::process::exit(1);
    }
}
