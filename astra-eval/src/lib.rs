//! ASTRA evaluation: accuracy and perplexity sweeps, compute profiling, the multi-process runtime.
//! Its subcommands arrive with the evaluation issues; today it reports the runtime it would use.
pub use astra_train::runtime::RuntimeInfo;
