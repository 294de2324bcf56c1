//! The paper's dynamic-network experiment (Fig 11): requests served one at a time for 600 s while
//! the bandwidth follows a trace; completions per 10 s and in total, with Llama-3-8B prefill
//! latencies measured at fixed bandwidths and interpolated linearly in 1/bandwidth (latency is
//! compute + bits/bandwidth, so it is linear in 1/bandwidth between measured points).
//!
//! A request's progress accrues at 1/latency(b(t)) per second while the bandwidth b(t) changes
//! under it (a fluid model: a long request that spans a slow and a fast stretch takes the time
//! each stretch allows), and only requests finished inside the trace count.

use std::collections::BTreeMap;

use crate::error::{Result, SimError};

const PAPER_TRACE: &str = include_str!("../data/bandwidth-trace-600s.csv");
const PAPER_LLAMA: &str = include_str!("../data/llama3-8b-prefill-latency.csv");

/// One bandwidth value (Mbit/s) per second, from second 0.
#[derive(Clone, Debug)]
pub struct BandwidthTrace {
    pub mbps: Vec<f64>,
}

fn data_lines<'a>(
    text: &'a str,
    path: &'a str,
    header: &str,
) -> Result<Vec<(usize, Vec<&'a str>)>> {
    let mut rows = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
    match rows.next() {
        Some((_, h)) if h == header => {}
        Some((ln, h)) => {
            return Err(SimError::Csv {
                path: path.into(),
                line: ln,
                reason: format!("header '{h}', expected '{header}'"),
            })
        }
        None => {
            return Err(SimError::Csv {
                path: path.into(),
                line: 1,
                reason: "empty file".into(),
            })
        }
    }
    let cols = header.split(',').count();
    rows.map(|(ln, l)| {
        let f: Vec<&str> = l.split(',').map(str::trim).collect();
        if f.len() != cols {
            return Err(SimError::Csv {
                path: path.into(),
                line: ln,
                reason: format!("{} fields, expected {cols}", f.len()),
            });
        }
        Ok((ln, f))
    })
    .collect()
}

fn positive(path: &str, line: usize, name: &str, v: &str, allow_zero: bool) -> Result<f64> {
    v.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && (*x > 0.0 || (allow_zero && *x == 0.0)))
        .ok_or_else(|| SimError::Csv {
            path: path.into(),
            line,
            reason: format!("{name} '{v}' is not a positive number"),
        })
}

impl BandwidthTrace {
    pub fn paper() -> Self {
        Self::parse(PAPER_TRACE, "bandwidth-trace-600s.csv").expect("built-in trace parses")
    }

    pub fn load(spec: &str) -> Result<Self> {
        if spec == "paper" {
            return Ok(Self::paper());
        }
        let text = std::fs::read_to_string(spec).map_err(SimError::io(spec.as_ref()))?;
        Self::parse(&text, spec)
    }

    pub fn parse(text: &str, path: &str) -> Result<Self> {
        let mut mbps = Vec::new();
        for (ln, f) in data_lines(text, path, "second,mbps")? {
            let s: usize = f[0].parse().map_err(|_| SimError::Csv {
                path: path.into(),
                line: ln,
                reason: format!("second '{}' is not an integer", f[0]),
            })?;
            if s != mbps.len() {
                return Err(SimError::Csv {
                    path: path.into(),
                    line: ln,
                    reason: format!("second {s} out of order (expected {})", mbps.len()),
                });
            }
            mbps.push(positive(path, ln, "mbps", f[1], false)?);
        }
        if mbps.is_empty() {
            return Err(SimError::Csv {
                path: path.into(),
                line: 1,
                reason: "no data rows".into(),
            });
        }
        Ok(BandwidthTrace { mbps })
    }

    pub fn seconds(&self) -> usize {
        self.mbps.len()
    }
}

/// Latency (s) of one request per method, measured at a few bandwidths.
#[derive(Clone, Debug)]
pub struct LatencyTable {
    /// method → (mbps, latency_s) sorted by mbps; mbps 0 marks a bandwidth-independent method.
    pub points: BTreeMap<String, Vec<(f64, f64)>>,
}

impl LatencyTable {
    pub fn paper_llama() -> Self {
        Self::parse(PAPER_LLAMA, "llama3-8b-prefill-latency.csv").expect("built-in table parses")
    }

    pub fn parse(text: &str, path: &str) -> Result<Self> {
        let mut points: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for (ln, f) in data_lines(text, path, "method,mbps,latency_s")? {
            let bw = positive(path, ln, "mbps", f[1], true)?;
            let lat = positive(path, ln, "latency_s", f[2], false)?;
            points.entry(f[0].to_string()).or_default().push((bw, lat));
        }
        for (m, p) in points.iter_mut() {
            p.sort_by(|a, b| a.0.total_cmp(&b.0));
            if p.iter().any(|x| x.0 == 0.0) && p.len() > 1 {
                return Err(SimError::Csv {
                    path: path.into(),
                    line: 0,
                    reason: format!(
                        "method {m} mixes mbps 0 (bandwidth-free) with measured bandwidths"
                    ),
                });
            }
        }
        Ok(LatencyTable { points })
    }

    pub fn methods(&self) -> Vec<String> {
        self.points.keys().cloned().collect()
    }

    /// Latency (s) at `mbps`: piecewise linear in 1/bandwidth, extended linearly beyond the
    /// measured range from the two nearest points.
    pub fn latency_s(&self, method: &str, mbps: f64) -> Result<f64> {
        let p = self.points.get(method).ok_or_else(|| {
            SimError::invalid(
                "method",
                format!(
                    "'{method}' is not in the latency table (has {})",
                    self.methods().join(", ")
                ),
            )
        })?;
        if p.len() == 1 {
            return Ok(p[0].1);
        }
        let x = 1.0 / mbps;
        // Points in increasing 1/bandwidth.
        let q: Vec<(f64, f64)> = p.iter().rev().map(|&(b, l)| (1.0 / b, l)).collect();
        let i = q
            .iter()
            .position(|&(qx, _)| qx >= x)
            .unwrap_or(q.len() - 1)
            .clamp(1, q.len() - 1);
        let ((x0, y0), (x1, y1)) = (q[i - 1], q[i]);
        Ok((y0 + (y1 - y0) * (x - x0) / (x1 - x0)).max(0.0))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct DynamicResult {
    pub method: String,
    pub total: usize,
    /// Completions in each 10-second window.
    pub per_window: Vec<usize>,
}

pub const WINDOW_S: usize = 10;

pub fn simulate(
    trace: &BandwidthTrace,
    table: &LatencyTable,
    method: &str,
) -> Result<DynamicResult> {
    let mut per_window = vec![0usize; trace.seconds().div_ceil(WINDOW_S)];
    let mut progress = 0.0f64; // fraction of the current request done
    let mut total = 0;
    for (s, &bw) in trace.mbps.iter().enumerate() {
        let rate = 1.0 / table.latency_s(method, bw)?; // requests per second at this bandwidth
        let mut t = 0.0f64; // time used within this second
        while t < 1.0 {
            let need = (1.0 - progress) / rate;
            if t + need <= 1.0 + 1e-12 {
                t += need;
                progress = 0.0;
                total += 1;
                per_window[((s as f64 + t.min(1.0 - 1e-9)) as usize) / WINDOW_S] += 1;
            } else {
                progress += (1.0 - t) * rate;
                t = 1.0;
            }
        }
    }
    Ok(DynamicResult {
        method: method.to_string(),
        total,
        per_window,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_is_linear_in_inverse_bandwidth() {
        let t = LatencyTable::paper_llama();
        assert_eq!(t.latency_s("tp", 10.0).unwrap(), 430.952);
        assert!((t.latency_s("tp", 100.0).unwrap() - 44.499).abs() < 1e-9);
        // Halfway between 1/50 and 1/100 in 1/bandwidth is 1/66.67.
        let mid = t.latency_s("sp", 200.0 / 3.0).unwrap();
        assert!((mid - (6.888 + 4.215) / 2.0).abs() < 1e-9, "{mid}");
        assert_eq!(t.latency_s("single", 37.0).unwrap(), 4.578);
        assert!(t.latency_s("nope", 10.0).is_err());
    }

    #[test]
    fn constant_bandwidth_gives_floor_of_duration_over_latency() {
        let trace = BandwidthTrace {
            mbps: vec![50.0; 600],
        };
        let t = LatencyTable::paper_llama();
        let r = simulate(&trace, &t, "single").unwrap();
        assert_eq!(r.total, (600.0f64 / 4.578).floor() as usize);
        assert_eq!(r.per_window.iter().sum::<usize>(), r.total);
        let tp = simulate(&trace, &t, "tp").unwrap();
        assert_eq!(tp.total, (600.0f64 / 87.449).floor() as usize);
    }

    #[test]
    fn paper_trace_and_bad_input() {
        let tr = BandwidthTrace::paper();
        assert_eq!(tr.seconds(), 600);
        assert!(tr.mbps.iter().all(|&b| (20.0..=100.0).contains(&b)));
        let e = BandwidthTrace::parse("second,mbps\n0,10\n2,5\n", "b.csv")
            .unwrap_err()
            .to_string();
        assert!(e.contains("b.csv:3: second 2 out of order"), "{e}");
        let e = BandwidthTrace::parse("second,mbps\n0,-1\n", "b.csv")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mbps '-1'"), "{e}");
        let e = BandwidthTrace::parse("sec,bw\n", "b.csv")
            .unwrap_err()
            .to_string();
        assert!(e.contains("header"), "{e}");
    }
}
