//! `astra-sim reproduce`: the paper's latency results from its compute profile and latency model,
//! written as CSV, markdown and PNG plots, with our numbers beside the paper's.

use std::fmt::Write as _;
use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;

use crate::dynamic::{self, BandwidthTrace, LatencyTable, WINDOW_S};
use crate::error::Result;
use crate::method::{Method, ModelShape};
use crate::network::{CompiledRun, Network, Outcome};
use crate::output::write_atomic;
use crate::paper;
use crate::plots;
use crate::profile::ComputeProfile;
use crate::trace::{BlockSplit, Run};

#[derive(Clone, Debug, Serialize)]
pub struct SpeedupRow {
    pub method: Method,
    pub devices: u32,
    pub tokens: u64,
    pub mbps: f64,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub speedup: f64,
}

/// The paper's configurations: N ∈ {2,4,6,8} at T = 1024 and T ∈ {256,…,4096} at N = 4.
pub fn paper_configs() -> Vec<(u32, u64)> {
    let mut c: Vec<(u32, u64)> = paper::DEVICES.iter().map(|&n| (n, 1024)).collect();
    c.extend(
        paper::TOKENS
            .iter()
            .filter(|&&t| t != 1024)
            .map(|&t| (4, t)),
    );
    c
}

/// Speedup over the single device for every method × configuration × bandwidth.
pub fn speedup_grid(
    profile: &ComputeProfile,
    model: &ModelShape,
    methods: &[Method],
    configs: &[(u32, u64)],
    bandwidths: &[f64],
    network: &(dyn Fn(f64) -> Network + Sync),
) -> Result<Vec<SpeedupRow>> {
    let jobs: Vec<(Method, u32, u64)> = configs
        .iter()
        .flat_map(|&(n, t)| methods.iter().map(move |&m| (m, n, t)))
        .collect();
    let per_job: Vec<Vec<SpeedupRow>> = jobs
        .par_iter()
        .map(|&(m, n, t)| {
            let single = profile.compute_ms(Method::Single, 1, t)?;
            let run = Run::from_compute(
                model,
                m,
                n,
                t,
                profile.compute_ms(m, n, t)?,
                BlockSplit::default(),
            );
            let compiled = CompiledRun::new(&run)?;
            bandwidths
                .iter()
                .map(|&b| {
                    let outcome = compiled.simulate(&network(b))?;
                    Ok(SpeedupRow {
                        method: m,
                        devices: n,
                        tokens: t,
                        mbps: b,
                        speedup: single / outcome.latency_ms,
                        outcome,
                    })
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(per_job.into_iter().flatten().collect())
}

pub fn speedups_csv(rows: &[SpeedupRow]) -> String {
    let mut s = String::from("method,devices,tokens,mbps,compute_ms,comm_ms,latency_ms,speedup\n");
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{},{},{:.6},{:.6},{:.6},{:.6}",
            r.method,
            r.devices,
            r.tokens,
            r.mbps,
            r.outcome.compute_ms,
            r.outcome.comm_ms,
            r.outcome.latency_ms,
            r.speedup
        );
    }
    s
}

pub fn find<'a>(rows: &'a [SpeedupRow], m: &str, n: u32, t: u64, b: f64) -> Option<&'a SpeedupRow> {
    rows.iter()
        .find(|r| r.method.to_string() == m && r.devices == n && r.tokens == t && r.mbps == b)
}

/// The methods of the dynamic-network experiment, as named in the Llama latency table.
pub const DYNAMIC_METHODS: [&str; 8] = [
    "tp",
    "sp",
    "bp-nb4",
    "bp-nb8",
    "astra-g1",
    "astra-g16",
    "astra-g32",
    "single",
];

pub struct Reproduction {
    pub rows: Vec<SpeedupRow>,
    pub dynamic: Vec<dynamic::DynamicResult>,
    pub trace: BandwidthTrace,
}

pub fn compute(profile: &ComputeProfile) -> Result<Reproduction> {
    let model = ModelShape::default();
    let rows = speedup_grid(
        profile,
        &model,
        &Method::paper_methods(),
        &paper_configs(),
        &paper::BANDWIDTHS,
        &Network::paper,
    )?;
    let trace = BandwidthTrace::paper();
    let table = LatencyTable::paper_llama();
    let dynamic = DYNAMIC_METHODS
        .iter()
        .map(|m| dynamic::simulate(&trace, &table, m))
        .collect::<Result<Vec<_>>>()?;
    Ok(Reproduction {
        rows,
        dynamic,
        trace,
    })
}

/// Writes every output of `reproduce` into `out`.
pub fn write_all(out: &Path, profile: &ComputeProfile, command: &str) -> Result<Vec<String>> {
    let r = compute(profile)?;
    let mut written = Vec::new();
    let mut put = |name: &str, bytes: &[u8]| -> Result<()> {
        write_atomic(&out.join(name), bytes)?;
        written.push(name.to_string());
        Ok(())
    };
    put("speedups.csv", speedups_csv(&r.rows).as_bytes())?;
    let mut dynamic_csv = String::from("method,total_requests\n");
    for d in &r.dynamic {
        let _ = writeln!(dynamic_csv, "{},{}", d.method, d.total);
    }
    put("dynamic-network.csv", dynamic_csv.as_bytes())?;
    let mut series = String::from("window_start_s,mean_mbps");
    for d in &r.dynamic {
        let _ = write!(series, ",{}", d.method);
    }
    series.push('\n');
    for w in 0..r.dynamic[0].per_window.len() {
        let bw = &r.trace.mbps[w * WINDOW_S..((w + 1) * WINDOW_S).min(r.trace.seconds())];
        let _ = write!(
            series,
            "{},{:.3}",
            w * WINDOW_S,
            bw.iter().sum::<f64>() / bw.len() as f64
        );
        for d in &r.dynamic {
            let _ = write!(series, ",{}", d.per_window[w]);
        }
        series.push('\n');
    }
    put("dynamic-network-series.csv", series.as_bytes())?;
    put("table4.md", table4_md(&r.rows).as_bytes())?;
    put("fig3.md", fig3_md(&r.rows).as_bytes())?;
    put("README.md", readme_md(&r, profile, command).as_bytes())?;
    written.extend(plots::write_all(out, &r)?);
    Ok(written)
}

fn table4_md(rows: &[SpeedupRow]) -> String {
    let mut s = String::from(
        "# Table 4: ASTRA (G = 1) speedup over each baseline, N = 4, T = 1024 (paper latency model)\n\n| baseline |",
    );
    for b in paper::BANDWIDTHS {
        let _ = write!(s, " {b} Mbit/s |");
    }
    s += " paper at 10 | paper at 500 |\n|---|";
    s += &"---:|".repeat(paper::BANDWIDTHS.len() + 2);
    s.push('\n');
    for base in [
        "tp",
        "sp",
        "bp-ag-nb1",
        "bp-ag-nb4",
        "bp-sp-nb1",
        "bp-sp-nb4",
    ] {
        let _ = write!(s, "| {base} |");
        for b in paper::BANDWIDTHS {
            let ratio = find(rows, base, 4, 1024, b).unwrap().outcome.latency_ms
                / find(rows, "astra-g1", 4, 1024, b)
                    .unwrap()
                    .outcome
                    .latency_ms;
            let _ = write!(s, " {ratio:.2}× |");
        }
        match paper::TABLE4.iter().find(|t| t.0 == base) {
            Some((_, a, z)) => {
                let _ = writeln!(s, " {a:.2}× | {z:.2}× |");
            }
            None => s += " — | — |\n",
        }
    }
    s
}

fn fig3_md(rows: &[SpeedupRow]) -> String {
    let mut s = String::from(
        "# Fig 3: latency split at N = 4, T = 1024, 10 Mbit/s (paper latency model), ms\n\n\
         | method | compute | communication | total | paper compute | paper communication |\n|---|---:|---:|---:|---:|---:|\n",
    );
    let _ = writeln!(
        s,
        "| single | {:.2} | 0.00 | {:.2} | {:.2} | 0 |",
        paper::FIG3_SINGLE_MS,
        paper::FIG3_SINGLE_MS,
        paper::FIG3_SINGLE_MS
    );
    for m in Method::paper_methods() {
        let r = find(rows, &m.to_string(), 4, 1024, 10.0).unwrap();
        let p = paper::FIG3.iter().find(|f| f.0 == m.to_string());
        let (pc, pm) = p.map_or(("—".into(), "—".into()), |f| {
            (format!("{:.2}", f.1), format!("{:.2}", f.2))
        });
        let _ = writeln!(
            s,
            "| {m} | {:.2} | {:.2} | {:.2} | {pc} | {pm} |",
            r.outcome.compute_ms, r.outcome.comm_ms, r.outcome.latency_ms
        );
    }
    s
}

fn readme_md(r: &Reproduction, profile: &ComputeProfile, command: &str) -> String {
    let mut s = format!(
        "# The paper's latency results, reproduced\n\n\
         Command: `{command}`\n\n\
         Compute profile: `{}` — {}.\n\
         Latency model: the paper's (ASTRA.md §4): per device, measured compute + bits sent / bandwidth,\n\
         Mbit = 2^20 bit, no overlap, every device on its own link. The dynamic-network run uses the\n\
         paper's 600-s bandwidth trace and Llama-3-8B prefill latencies interpolated in 1/bandwidth.\n\n\
         ## Speedup over one device, N = 4, T = 1024 (ours / paper)\n\n| method |",
        profile.name, profile.provenance
    );
    for b in paper::BANDWIDTHS {
        let _ = write!(s, " {b} Mbit/s |");
    }
    s += "\n|---|";
    s += &"---:|".repeat(paper::BANDWIDTHS.len());
    s.push('\n');
    let mut matches = 0;
    let mut cells = 0;
    for (m, paper_vals) in paper::SPEEDUP_N4_T1024 {
        let _ = write!(s, "| {m} |");
        for (b, p) in paper::BANDWIDTHS.iter().zip(paper_vals) {
            let ours = find(&r.rows, m, 4, 1024, *b).unwrap().speedup;
            let ok = paper::round_to(ours, 3) == p;
            matches += ok as usize;
            cells += 1;
            let _ = write!(s, " {ours:.3} / {p:.3}{} |", if ok { "" } else { " ✗" });
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "\n{matches} of {cells} cells agree with the paper to the three decimals it prints.\n"
    );
    s += "## Files\n\n\
        | file | what |\n|---|---|\n\
        | `speedups.csv` | every method × N ∈ {2,4,6,8} at T = 1024 and T ∈ {256,…,4096} at N = 4 × bandwidth: compute, communication, latency, speedup |\n\
        | `table4.md` | the paper's Table 4 (ASTRA's speedup over each baseline) beside ours |\n\
        | `fig3.md` | the paper's Fig 3 (latency split) beside ours |\n\
        | `dynamic-network.csv`, `dynamic-network-series.csv` | requests completed in 600 s and per 10 s on the paper's bandwidth trace |\n\
        | `fig1-speedup-vs-bandwidth.png`, `fig3-latency-breakdown.png`, `fig4-speedup-vs-devices.png`, `fig5-speedup-vs-tokens.png`, `fig11-dynamic-network.png` | the figures |\n\n\
        ## Dynamic network (600 s, requests served one at a time)\n\n| method | requests completed |\n|---|---:|\n";
    for d in &r.dynamic {
        let _ = writeln!(s, "| {} | {} |", d.method, d.total);
    }
    s += "\nThe paper reports these totals only as a figure; ASTRA.md does not quote them, so there is no\n\
          paper column here.\n";
    s
}
