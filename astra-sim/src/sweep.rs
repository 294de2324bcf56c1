//! `astra-sim sweep`: any grid of methods × N × T × bandwidth × network settings, to CSV.
//!
//! Each (method, N, T) run is built and compiled once; the network settings are the inner loop, so
//! a sweep costs microseconds per configuration.

use std::fmt::Write as _;

use rayon::prelude::*;

use crate::error::{Result, SimError};
use crate::method::{Method, ModelShape};
use crate::network::{Algorithm, CompiledRun, ModelKind, Network};
use crate::profile::ComputeSource;
use crate::trace::{BlockSplit, Run, Trace};

#[derive(Clone, Debug)]
pub struct Grid {
    pub methods: Vec<Method>,
    pub devices: Vec<u32>,
    pub tokens: Vec<u64>,
    pub mbps: Vec<f64>,
    pub networks: Vec<ModelKind>,
    pub alpha_ms: Vec<f64>,
    pub algorithms: Vec<Algorithm>,
    pub overlap: Vec<bool>,
    pub loss: Vec<f64>,
    /// Per-device compute multipliers applied to every configuration (empty = all 1).
    pub slowdown: Vec<f64>,
    /// Token-bucket depth of shaped uplinks (bits, alpha-beta; 0: plain links).
    pub burst_bits: f64,
    /// Alpha-beta: use a measured trace's per-message latencies where it has them (else α).
    pub trace_latency: bool,
}

pub const HEADER: &str = "method,devices,tokens,mbps,network,alpha_ms,algorithm,overlap,loss,compute_ms,comm_ms,latency_ms,speedup,dropped_fraction";

/// The network settings of the grid; alpha, algorithm and overlap only vary for alpha-beta.
fn networks(g: &Grid) -> Vec<Network> {
    let mut out = Vec::new();
    for &kind in &g.networks {
        for &b in &g.mbps {
            for &loss in &g.loss {
                let slowdown = if g.slowdown.is_empty() {
                    vec![1.0]
                } else {
                    g.slowdown.clone()
                };
                match kind {
                    ModelKind::Paper => {
                        let mut n = Network::paper(b);
                        n.loss = loss;
                        n.slowdown = slowdown;
                        out.push(n);
                    }
                    ModelKind::AlphaBeta => {
                        for &a in &g.alpha_ms {
                            for &alg in &g.algorithms {
                                for &ov in &g.overlap {
                                    let mut n = Network::alpha_beta(b, a, alg, ov);
                                    n.loss = loss;
                                    n.burst_bits = g.burst_bits;
                                    n.trace_latency = g.trace_latency;
                                    n.slowdown = slowdown.clone();
                                    out.push(n);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

pub enum Runs<'a> {
    /// Runs built from a compute source.
    Source(&'a dyn ComputeSource, ModelShape, BlockSplit),
    /// Runs taken from a trace file (measured); single-device runs in it give the speedups.
    Trace(&'a Trace),
}

/// Returns the CSV text and the number of configurations.
/// Most devices a simulated run may have: programs and schedules grow as N², so a typo such as
/// 1:100000:1 is refused before any work rather than run into the OOM killer.
pub const MAX_DEVICES: u32 = 1024;

/// Most (run × network) configurations one sweep evaluates.
pub const MAX_CONFIGURATIONS: usize = 10_000_000;

/// Every device count must be in 1..=[`MAX_DEVICES`].
pub fn check_devices(devices: &[u32]) -> Result<()> {
    match devices.iter().find(|&&d| d == 0 || d > MAX_DEVICES) {
        Some(d) => Err(SimError::invalid(
            "devices",
            format!("{d} is not in 1..={MAX_DEVICES}"),
        )),
        None => Ok(()),
    }
}

/// `baseline`: the compute source of the speedup's single device (None: the runs' own).
pub fn run(runs: Runs, g: &Grid, baseline: Option<&dyn ComputeSource>) -> Result<(String, usize)> {
    let nets = checked_networks(g)?;
    let mut jobs = jobs(runs, g)?;
    if let Some(b) = baseline {
        for (run, single) in &mut jobs {
            *single = Some(b.compute_ms(Method::Single, 1, run.tokens)?);
        }
    }
    if jobs.is_empty() {
        return Err(SimError::invalid("sweep", "the grid selects no run"));
    }
    let parts: Vec<String> = jobs
        .par_iter()
        .map(|(run, single)| {
            let compiled = CompiledRun::new(run)?;
            let mut s = String::with_capacity(nets.len() * 120);
            for net in &nets {
                let o = compiled.simulate(net)?;
                write_row(&mut s, run, net, &o, *single);
            }
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()?;
    let count = jobs.len() * nets.len();
    let mut csv =
        String::with_capacity(parts.iter().map(String::len).sum::<usize>() + HEADER.len() + 1);
    csv.push_str(HEADER);
    csv.push('\n');
    for p in parts {
        csv.push_str(&p);
    }
    Ok((csv, count))
}

/// The grid's network settings, after checking the grid's size, tokens and networks.
fn checked_networks(g: &Grid) -> Result<Vec<Network>> {
    check_devices(&g.devices)?;
    let size = [
        g.methods.len(),
        g.devices.len(),
        g.tokens.len(),
        networks(g).len(),
    ]
    .iter()
    .try_fold(1usize, |acc, &n| acc.checked_mul(n.max(1)));
    if size.is_none_or(|n| n > MAX_CONFIGURATIONS) {
        return Err(SimError::invalid(
            "sweep",
            format!(
                "the grid has more than {MAX_CONFIGURATIONS} configurations; sweep it in parts"
            ),
        ));
    }
    if let Some(t) = g.tokens.iter().find(|&&t| t == 0) {
        return Err(SimError::invalid(
            "tokens",
            format!("{t} is not a positive integer"),
        ));
    }
    let nets = networks(g);
    if nets.is_empty() {
        return Err(SimError::invalid(
            "sweep",
            "the grid has no network setting",
        ));
    }
    for n in &nets {
        n.validate()?;
    }
    Ok(nets)
}

/// The runs to simulate (from the profile's compute or the trace's runs, filtered by the grid),
/// each with its single-device latency for the speed-up column.
fn jobs(runs: Runs, g: &Grid) -> Result<Vec<(Run, Option<f64>)>> {
    Ok(match runs {
        Runs::Source(src, model, split) => {
            let mut jobs = Vec::new();
            for &m in &g.methods {
                for &n in &g.devices {
                    for &t in &g.tokens {
                        let single = src.compute_ms(Method::Single, 1, t).ok();
                        jobs.push((
                            Run::from_compute(&model, m, n, t, src.compute_ms(m, n, t)?, split),
                            single,
                        ));
                    }
                }
            }
            jobs
        }
        Runs::Trace(trace) => trace
            .runs
            .iter()
            .filter(|r| g.methods.is_empty() || g.methods.contains(&r.method))
            .filter(|r| {
                g.devices.is_empty() || g.devices.contains(&r.devices) || r.method == Method::Single
            })
            .filter(|r| g.tokens.is_empty() || g.tokens.contains(&r.tokens))
            .map(|r| {
                let single = trace
                    .find(Method::Single, 1, r.tokens)
                    .map(|s| s.total_compute_ms(0));
                (r.clone(), single)
            })
            .collect(),
    })
}

/// One CSV row: the run, the network setting, and what the simulation gave.
fn write_row(
    s: &mut String,
    run: &Run,
    net: &Network,
    o: &crate::network::Outcome,
    single: Option<f64>,
) {
    let speedup = single.map_or(String::new(), |v| format!("{:.6}", v / o.latency_ms));
    let _ = writeln!(
        s,
        "{},{},{},{},{},{},{},{},{},{:.6},{:.6},{:.6},{},{}",
        run.method,
        run.devices,
        run.tokens,
        net.mbps[0],
        match net.model {
            ModelKind::Paper => "paper",
            ModelKind::AlphaBeta => "alpha-beta",
        },
        net.alpha_ms,
        match net.algorithm {
            Algorithm::Direct => "direct",
            Algorithm::Ring => "ring",
            Algorithm::Star => "star",
        },
        net.overlap,
        net.loss,
        o.compute_ms,
        o.comm_ms,
        o.latency_ms,
        speedup,
        o.dropped_fraction
    );
}

/// Parses a list "a,b,c" or a range "start:stop:step" (inclusive) of numbers.
pub fn parse_numbers<T: std::str::FromStr + Copy>(
    field: &str,
    spec: &str,
    from_f64: impl Fn(f64) -> T,
) -> Result<Vec<T>> {
    let bad = |s: &str| {
        SimError::invalid(
            field,
            format!("'{s}' is not a number, a list a,b,c or a range start:stop:step"),
        )
    };
    if spec.contains(':') {
        let p: Vec<f64> = spec
            .split(':')
            .map(|s| s.trim().parse::<f64>().map_err(|_| bad(spec)))
            .collect::<Result<_>>()?;
        if p.len() != 3 || p[2].is_nan() || p[2] <= 0.0 || p[1] < p[0] {
            return Err(bad(spec));
        }
        let count = ((p[1] - p[0]) / p[2] + 1e-9).floor() as usize + 1;
        if count > 10_000_000 {
            return Err(SimError::invalid(
                field,
                format!("range '{spec}' has {count} values, more than 10⁷"),
            ));
        }
        return Ok((0..count)
            .map(|i| from_f64(p[0] + i as f64 * p[2]))
            .collect());
    }
    spec.split(',')
        .map(|s| s.trim().parse::<T>().map_err(|_| bad(s)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::ComputeProfile;

    #[test]
    fn grid_counts_and_matches_paper_model() {
        let p = ComputeProfile::paper_1660ti();
        let g = Grid {
            methods: vec![Method::Astra { groups: 1 }, Method::Tp],
            devices: vec![2, 4],
            tokens: vec![1024],
            mbps: vec![10.0, 100.0],
            networks: vec![ModelKind::Paper, ModelKind::AlphaBeta],
            alpha_ms: vec![0.0, 1.0],
            algorithms: vec![Algorithm::Direct, Algorithm::Ring],
            overlap: vec![false, true],
            loss: vec![0.0],
            slowdown: vec![],
            burst_bits: 0.0,
            trace_latency: true,
        };
        let (csv, count) = run(
            Runs::Source(&p, ModelShape::default(), BlockSplit::default()),
            &g,
            None,
        )
        .unwrap();
        // 4 runs × 2 bandwidths × (1 paper + 2·2·2 alpha-beta).
        assert_eq!(count, 4 * 2 * 9);
        assert_eq!(csv.lines().count(), count + 1);
        let row = csv
            .lines()
            .find(|l| l.starts_with("astra-g1,4,1024,10,paper,"))
            .unwrap();
        let speedup: f64 = row.split(',').nth(12).unwrap().parse().unwrap();
        assert_eq!(crate::paper::round_to(speedup, 3), 2.648);
    }

    #[test]
    fn number_lists() {
        assert_eq!(
            parse_numbers("mbps", "10,20", |v| v).unwrap(),
            vec![10.0, 20.0]
        );
        assert_eq!(
            parse_numbers("mbps", "1:3:0.5", |v| v).unwrap(),
            vec![1.0, 1.5, 2.0, 2.5, 3.0]
        );
        assert!(parse_numbers("mbps", "1:3", |v| v).is_err());
        assert!(parse_numbers::<f64>("mbps", "x", |v| v)
            .unwrap_err()
            .to_string()
            .starts_with("mbps:"));
    }
}
