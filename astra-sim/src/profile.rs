//! Compute profiles: the measured per-device compute time of each method at each (N, T).
//!
//! CSV with header `method,devices,tokens,compute_ms` (the paper profile) or
//! `method,devices,tokens,compute_ms_median,compute_ms_min,compute_ms_max,runs` (written by
//! `astra-eval profile`; the median is used). Lines starting with `#` are comments.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Result, SimError};
use crate::method::Method;

pub const PAPER_1660TI: &str = "paper-1660ti";
const PAPER_CSV: &str = include_str!("../data/compute-profile-1660ti.csv");

/// Values of the paper profile that the paper's own printed results fix more precisely than the
/// recovered CSV does (data/README.md explains each): (method, devices, tokens, compute_ms, why).
pub const PAPER_REFINEMENTS: [(&str, u32, u64, f64, &str); 3] = [
    (
        "astra-g1",
        4,
        1024,
        39.166,
        "Table 4 ratios (CSV 39.16, Fig 3 39.17)",
    ),
    ("astra-g16", 4, 1024, 41.26, "Fig 3 label (CSV 41.27)"),
    ("astra-g32", 4, 1024, 40.92, "Fig 3 label (CSV 40.91)"),
];

/// Anything that gives the per-device compute time of a method at (N, T): a measured profile or
/// an analytic device model.
pub trait ComputeSource: Sync {
    fn name(&self) -> &str;
    fn provenance(&self) -> String;
    fn compute_ms(&self, method: Method, devices: u32, tokens: u64) -> Result<f64>;
}

impl ComputeSource for ComputeProfile {
    fn name(&self) -> &str {
        &self.name
    }
    fn provenance(&self) -> String {
        self.provenance.clone()
    }
    fn compute_ms(&self, method: Method, devices: u32, tokens: u64) -> Result<f64> {
        ComputeProfile::compute_ms(self, method, devices, tokens)
    }
}

/// A compute source by specification: `paper-1660ti`, `analytic:TFLOPS:GBPS[:EFF]`, or a CSV path.
pub fn load_source(spec: &str, model: crate::method::ModelShape) -> Result<Box<dyn ComputeSource>> {
    if spec.starts_with("analytic:") {
        return Ok(Box::new(crate::analytic::AnalyticDevice::parse(
            spec, model,
        )?));
    }
    Ok(Box::new(ComputeProfile::load(spec)?))
}

#[derive(Clone, Debug)]
pub struct ComputeProfile {
    pub name: String,
    pub provenance: String,
    entries: BTreeMap<(Method, u32, u64), f64>,
}

impl ComputeProfile {
    /// A profile by name: the built-in `paper-1660ti`, or a path to a CSV file.
    pub fn load(spec: &str) -> Result<Self> {
        if spec == PAPER_1660TI {
            return Ok(Self::paper_1660ti());
        }
        let text = std::fs::read_to_string(spec).map_err(|e| SimError::File {
            path: spec.into(),
            reason: format!("cannot read profile: {e} (use '{PAPER_1660TI}' for the built-in one)"),
        })?;
        let name = Path::new(spec)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| spec.to_string());
        Self::parse(&name, spec, &text, format!("measured, from {spec}"))
    }

    pub fn paper_1660ti() -> Self {
        let mut p = Self::parse(
            PAPER_1660TI,
            "compute-profile-1660ti.csv",
            PAPER_CSV,
            "Liu et al., arXiv 2505.19342, Figs 1/3/4/5: 12-block 768-wide encoder, fp32, GTX 1660 Ti; \
             values recovered from the figures, three refined from the paper's printed results"
                .into(),
        )
        .expect("built-in profile parses");
        for (m, n, t, ms, _) in PAPER_REFINEMENTS {
            p.entries.insert((m.parse().expect("valid name"), n, t), ms);
        }
        p
    }

    pub fn parse(name: &str, path: &str, text: &str, provenance: String) -> Result<Self> {
        let err = |line: usize, reason: String| SimError::Csv {
            path: path.to_string(),
            line,
            reason,
        };
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
        let (hline, header) = lines.next().ok_or_else(|| err(1, "empty profile".into()))?;
        let cols: Vec<&str> = header.split(',').map(str::trim).collect();
        let find = |c: &str| cols.iter().position(|h| *h == c);
        let (Some(im), Some(id), Some(it)) = (find("method"), find("devices"), find("tokens"))
        else {
            return Err(err(
                hline,
                format!("header '{header}' lacks method,devices,tokens"),
            ));
        };
        let ic = find("compute_ms")
            .or_else(|| find("compute_ms_median"))
            .ok_or_else(|| {
                err(
                    hline,
                    format!("header '{header}' lacks compute_ms (or compute_ms_median)"),
                )
            })?;
        let mut entries = BTreeMap::new();
        for (ln, line) in lines {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() != cols.len() {
                return Err(err(
                    ln,
                    format!("{} fields, header has {}", f.len(), cols.len()),
                ));
            }
            let method: Method = f[im]
                .parse()
                .map_err(|e: SimError| err(ln, e.to_string()))?;
            let devices: u32 =
                f[id].parse().ok().filter(|&d| d > 0).ok_or_else(|| {
                    err(ln, format!("devices '{}' is not a positive integer", f[id]))
                })?;
            let tokens: u64 =
                f[it].parse().ok().filter(|&t| t > 0).ok_or_else(|| {
                    err(ln, format!("tokens '{}' is not a positive integer", f[it]))
                })?;
            let ms: f64 = f[ic]
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v > 0.0)
                .ok_or_else(|| {
                    err(
                        ln,
                        format!("compute_ms '{}' is not a positive number", f[ic]),
                    )
                })?;
            if method == Method::Single && devices != 1 {
                return Err(err(ln, "method single must have devices = 1".into()));
            }
            if entries.insert((method, devices, tokens), ms).is_some() {
                return Err(err(
                    ln,
                    format!("duplicate entry for {method}, {devices} devices, {tokens} tokens"),
                ));
            }
        }
        if entries.is_empty() {
            return Err(err(hline, "no data rows".into()));
        }
        Ok(ComputeProfile {
            name: name.to_string(),
            provenance,
            entries,
        })
    }

    /// Per-device compute time (ms); `single` is looked up at devices = 1 whatever N is asked.
    pub fn compute_ms(&self, method: Method, devices: u32, tokens: u64) -> Result<f64> {
        let n = if method == Method::Single { 1 } else { devices };
        self.entries
            .get(&(method, n, tokens))
            .copied()
            .ok_or_else(|| SimError::MissingProfile {
                profile: self.name.clone(),
                method: method.to_string(),
                devices: n,
                tokens,
            })
    }

    pub fn entries(&self) -> impl Iterator<Item = (Method, u32, u64, f64)> + '_ {
        self.entries.iter().map(|(&(m, n, t), &v)| (m, n, t, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_profile_has_every_configuration() {
        let p = ComputeProfile::paper_1660ti();
        assert_eq!(p.compute_ms(Method::Single, 4, 1024).unwrap(), 111.46);
        assert_eq!(
            p.compute_ms(Method::Astra { groups: 1 }, 4, 1024).unwrap(),
            39.166
        );
        for m in Method::paper_methods() {
            for n in [2, 4, 6, 8] {
                p.compute_ms(m, n, 1024).unwrap();
            }
            for t in [256, 512, 1024, 2048, 4096] {
                p.compute_ms(m, 4, t).unwrap();
            }
        }
        let e = p.compute_ms(Method::Tp, 3, 1024).unwrap_err().to_string();
        assert!(e.contains("no compute time for tp on 3 device(s)"), "{e}");
    }

    #[test]
    fn malformed_csv_names_the_line() {
        let cases = [
            (
                "method,devices,tokens,compute_ms\ntp,4,1024,-3\n",
                ":2: compute_ms '-3'",
            ),
            (
                "method,devices,tokens,compute_ms\ntp,4,1024\n",
                ":2: 3 fields",
            ),
            (
                "method,devices,tokens,compute_ms\nfoo,4,1024,3\n",
                "unknown method 'foo'",
            ),
            ("method,devices,tokens\ntp,4,1024\n", "lacks compute_ms"),
            (
                "method,devices,tokens,compute_ms\ntp,x,1024,3\n",
                "devices 'x'",
            ),
            (
                "method,devices,tokens,compute_ms\ntp,4,1024,3\ntp,4,1024,4\n",
                ":3: duplicate",
            ),
            ("", "empty profile"),
        ];
        for (text, needle) in cases {
            let e = ComputeProfile::parse("t", "p.csv", text, String::new())
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{e} lacks {needle}");
        }
        let ok = "method,devices,tokens,compute_ms_median,compute_ms_min,compute_ms_max,runs\nsingle,1,256,5,4,6,10\n";
        let p = ComputeProfile::parse("t", "p.csv", ok, String::new()).unwrap();
        assert_eq!(p.compute_ms(Method::Single, 1, 256).unwrap(), 5.0);
    }
}
