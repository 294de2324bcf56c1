//! Network simulator for multi-device Transformer inference (pure Rust, no libtorch).
//!
//! - [`method`]: the parallelisation methods (single, TP, SP, BP+AG, BP+SP, ASTRA) and their bits;
//! - [`profile`]: compute profiles (the paper's `paper-1660ti`, measured CSVs) and [`analytic`]
//!   device models;
//! - [`trace`]: the versioned JSON trace format (per-device programs of compute and communication
//!   with dependencies);
//! - [`network`]: the paper's latency model and an α-β model with collective algorithms, overlap,
//!   heterogeneous devices and packet loss;
//! - [`dynamic`]: the 600-s dynamic-bandwidth experiment;
//! - [`reproduce`], [`plots`], [`sweep`]: the paper's tables and figures, and arbitrary grids;
//! - [`live`]: replay over real TCP between processes behind kernel-shaped links.
pub mod analytic;
pub mod bar_plot;
pub mod cli;
pub mod dynamic;
pub mod error;
pub mod figure_csv;
pub mod line_plot;
pub mod live;
pub mod measured_plot;
pub mod method;
pub mod network;
pub mod output;
pub mod paper;
pub mod plot_style;
pub mod plots;
pub mod profile;
pub mod reproduce;
pub mod sweep;
pub mod trace;
pub mod transport;

pub use error::{Result, SimError};
pub use method::{Method, ModelShape};
pub use network::{Algorithm, ModelKind, Network};
pub use trace::Trace;
