//! `astra-quant`: parses the command line (options declared in `astra_quant::cli::args`) and runs
//! the command (`astra_quant::cli`).

fn main() {
    if let Err(e) = astra_quant::cli::run(astra_quant::cli::parse::parse_or_exit::<
        astra_quant::cli::Cli,
        _,
    >(std::env::args_os()))
    {
        eprintln!("astra-quant: {e:#}");
        std::process::exit(1);
    }
}
