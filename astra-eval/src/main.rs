//! `astra-eval`: parses the command line (options declared in `astra_eval::cli::args`) and runs
//! the command (`astra_eval::cli`).

fn main() {
    astra_train::libtorch::ensure_passive_openmp();
    let cli =
        astra_quant::cli::parse::parse_or_exit::<astra_eval::cli::Cli, _>(std::env::args_os());
    if let Err(e) = astra_eval::cli::run(cli.command) {
        eprintln!("astra-eval: {e:#}");
        std::process::exit(1);
    }
}
