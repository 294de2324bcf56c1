//! `astra-sim`: parses the command line (options declared in `astra_sim::cli::args`) and runs the
//! command (`astra_sim::cli`).

fn main() {
    if let Err(e) = astra_sim::cli::run(astra_quant::cli::parse::parse_or_exit::<
        astra_sim::cli::Cli,
        _,
    >(std::env::args_os()))
    {
        eprintln!("astra-sim: {e:#}");
        std::process::exit(1);
    }
}
