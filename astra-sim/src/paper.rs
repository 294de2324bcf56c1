//! The numbers the paper prints (ASTRA.md §4), which `reproduce` must give back: the single source
//! for the comparison tables in `reproduce`'s README and for the acceptance test.

/// Bandwidths (Mbit/s) of the paper's latency study.
pub const BANDWIDTHS: [f64; 6] = [10.0, 20.0, 50.0, 100.0, 200.0, 500.0];
pub const DEVICES: [u32; 4] = [2, 4, 6, 8];
pub const TOKENS: [u64; 5] = [256, 512, 1024, 2048, 4096];

/// Speedup over the single device at N = 4, T = 1024, per bandwidth of `BANDWIDTHS`, three decimals.
pub const SPEEDUP_N4_T1024: [(&str, [f64; 6]); 7] = [
    ("astra-g1", [2.648, 2.743, 2.804, 2.825, 2.835, 2.842]),
    ("astra-g16", [1.265, 1.723, 2.201, 2.426, 2.556, 2.641]),
    ("astra-g32", [0.828, 1.270, 1.868, 2.216, 2.444, 2.605]),
    ("bp-ag-nb1", [0.174, 0.326, 0.688, 1.094, 1.550, 2.068]),
    ("bp-sp-nb1", [0.090, 0.175, 0.404, 0.714, 1.159, 1.852]),
    ("tp", [0.008, 0.015, 0.038, 0.076, 0.149, 0.353]),
    ("sp", [0.015, 0.031, 0.076, 0.148, 0.284, 0.630]),
];

/// Table 4: ASTRA (G = 1) speedup over each baseline at N = 4, T = 1024, two decimals:
/// (baseline, at 10 Mbit/s, at 500 Mbit/s).
pub const TABLE4: [(&str, f64, f64); 4] = [
    ("tp", 342.74, 8.05),
    ("sp", 171.82, 4.51),
    ("bp-ag-nb1", 15.25, 1.37),
    ("bp-sp-nb1", 29.37, 1.53),
];

/// Fig 3: latency split (ms) at N = 4, T = 1024, 10 Mbit/s: (method, compute, communication).
pub const FIG3_SINGLE_MS: f64 = 111.46;
pub const FIG3: [(&str, f64, f64); 5] = [
    ("astra-g1", 39.17, 2.93),
    ("astra-g16", 41.26, 46.88),
    ("astra-g32", 40.92, 93.75),
    ("bp-ag-nb1", 41.90, 600.0),
    ("bp-sp-nb1", 36.19, 1200.0),
];

/// Rounds to `digits` decimals the way the paper prints.
pub fn round_to(v: f64, digits: i32) -> f64 {
    let s = 10f64.powi(digits);
    (v * s).round() / s
}
