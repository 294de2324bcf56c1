//! `astra-sim reproduce` gives back every number ASTRA.md §4 quotes, to the digits quoted, and
//! bad input to the CLI is a one-line error.

use std::process::Command;

use astra_sim::paper;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_astra-sim"))
}

fn csv_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

#[test]
fn reproduce_matches_the_paper() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["reproduce", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(dir.path().join("speedups.csv")).unwrap();
    assert!(text.starts_with("method,devices,tokens,mbps,compute_ms,comm_ms,latency_ms,speedup\n"));
    let rows = csv_rows(&text);
    // 9 methods × (4 device counts + 4 more token counts) × 6 bandwidths.
    assert_eq!(rows.len(), 9 * 8 * 6);
    let get = |m: &str, n: &str, t: &str, b: f64| -> Vec<f64> {
        let r = rows
            .iter()
            .find(|r| r[0] == m && r[1] == n && r[2] == t && r[3].parse::<f64>().unwrap() == b)
            .unwrap_or_else(|| panic!("no row {m} {n} {t} {b}"));
        r[4..].iter().map(|v| v.parse().unwrap()).collect()
    };
    for (m, vals) in paper::SPEEDUP_N4_T1024 {
        for (b, want) in paper::BANDWIDTHS.iter().zip(vals) {
            let got = get(m, "4", "1024", *b)[3];
            assert_eq!(paper::round_to(got, 3), want, "{m} at {b} Mbit/s: {got}");
        }
    }
    for (base, at10, at500) in paper::TABLE4 {
        for (b, want) in [(10.0, at10), (500.0, at500)] {
            let ratio = get(base, "4", "1024", b)[2] / get("astra-g1", "4", "1024", b)[2];
            assert_eq!(
                paper::round_to(ratio, 2),
                want,
                "Table 4 {base} at {b}: {ratio}"
            );
        }
    }
    for (m, compute, comm) in paper::FIG3 {
        let r = get(m, "4", "1024", 10.0);
        // bp-sp-nb1's profile value (36.18) is the paper's Fig 3 label (36.19) recovered to ±0.01.
        assert!(
            (r[0] - compute).abs() <= 0.0101,
            "Fig 3 {m} compute {}",
            r[0]
        );
        assert_eq!(
            paper::round_to(r[1], 2),
            comm,
            "Fig 3 {m} communication {}",
            r[1]
        );
    }
    let dynamic = std::fs::read_to_string(dir.path().join("dynamic-network.csv")).unwrap();
    assert!(dynamic.starts_with("method,total_requests\n"));
    let totals: Vec<(String, usize)> = csv_rows(&dynamic)
        .into_iter()
        .map(|r| (r[0].clone(), r[1].parse().unwrap()))
        .collect();
    let names: Vec<&str> = totals.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "tp",
            "sp",
            "bp-nb4",
            "bp-nb8",
            "astra-g1",
            "astra-g16",
            "astra-g32",
            "single"
        ]
    );
    let total = |m: &str| totals.iter().find(|t| t.0 == m).unwrap().1;
    // ASTRA serves the most requests, TP the fewest (the paper's Fig 11 ordering).
    assert!(
        total("astra-g1") > total("bp-nb4")
            && total("bp-nb4") > total("single")
            && total("single") > total("tp")
    );
    for f in [
        "table4.md",
        "fig3.md",
        "README.md",
        "dynamic-network-series.csv",
    ] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    for f in [
        "fig1-speedup-vs-bandwidth",
        "fig3-latency-breakdown",
        "fig4-speedup-vs-devices",
        "fig5-speedup-vs-tokens",
        "fig11-dynamic-network",
    ] {
        let png = std::fs::read(dir.path().join(format!("{f}.png"))).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{f} is not a PNG");
        assert!(png.len() > 20_000, "{f} looks empty");
        // The IHDR chunk: the size every figure is drawn at.
        assert_eq!(&png[12..16], b"IHDR", "{f}");
        let dim = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
        assert_eq!((dim(16), dim(20)), (1400, 800), "{f}");
    }
    let readme = std::fs::read_to_string(dir.path().join("README.md")).unwrap();
    assert!(readme.contains("42 of 42 cells agree"), "{readme}");
}

fn one_line_error(args: &[&str], needle: &str) {
    let out = bin().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(needle), "'{err}' lacks '{needle}'");
}

#[test]
fn bad_input_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s.csv");
    let o = out.to_str().unwrap();
    one_line_error(
        &["sweep", "--mbps", "0", "--out", o],
        "bandwidth: 0 Mbit/s is not a positive number",
    );
    one_line_error(&["sweep", "--mbps=-10", "--out", o], "bandwidth: -10");
    one_line_error(
        &["sweep", "--methods", "astra-g1,warp", "--out", o],
        "unknown method 'warp'",
    );
    one_line_error(
        &["sweep", "--devices", "3", "--out", o],
        "no compute time for astra-g1 on 3 device(s)",
    );
    one_line_error(
        &["sweep", "--network", "magic", "--out", o],
        "network: 'magic'",
    );
    one_line_error(
        &["sweep", "--loss", "1.5", "--out", o],
        "loss: 1.5 is not a probability",
    );
    let bad_profile = dir.path().join("p.csv");
    std::fs::write(
        &bad_profile,
        "method,devices,tokens,compute_ms\ntp,4,1024,abc\n",
    )
    .unwrap();
    one_line_error(
        &[
            "reproduce",
            "--profile",
            bad_profile.to_str().unwrap(),
            "--out",
            o,
        ],
        "p.csv:2: compute_ms 'abc'",
    );
    let partial = dir.path().join("partial.csv");
    std::fs::write(
        &partial,
        "method,devices,tokens,compute_ms\nsingle,1,1024,100\n",
    )
    .unwrap();
    one_line_error(
        &[
            "reproduce",
            "--profile",
            partial.to_str().unwrap(),
            "--out",
            o,
        ],
        "has no compute time for",
    );
    let trace = dir.path().join("t.json");
    std::fs::write(
        &trace,
        "{\"format\": \"astra-trace\", \"version\": 1, \"runs\": 3}",
    )
    .unwrap();
    one_line_error(
        &["sweep", "--trace", trace.to_str().unwrap(), "--out", o],
        "malformed trace",
    );
    one_line_error(
        &[
            "dynamic",
            "--bandwidth",
            dir.path().join("none.csv").to_str().unwrap(),
        ],
        "none.csv",
    );
    // Absurd device counts are refused before any work (they grew as N² into the OOM killer).
    one_line_error(
        &["sweep", "--devices", "99999999999", "--out", o],
        "devices: '99999999999' is not a number",
    );
    for devices in ["1:100000:1", "1000000"] {
        one_line_error(
            &[
                "sweep",
                "--network",
                "alpha-beta",
                "--devices",
                devices,
                "--out",
                o,
            ],
            "is not in 1..=1024",
        );
    }
    one_line_error(
        &["trace", "--devices", "1000000", "--out", o],
        "is not in 1..=1024",
    );
    // A trace whose collectives deadlock is refused by every network model, the paper's too.
    let deadlock = dir.path().join("deadlock.json");
    let gather = |tag: &str, id: u32| {
        format!(
            r#"{{"id": {id}, "op": "all-gather", "bits": 80, "peers": [0, 1], "tag": "{tag}"}}"#
        )
    };
    let program =
        |first: &str, second: &str| format!("[{}, {}]", gather(first, 0), gather(second, 1));
    std::fs::write(
        &deadlock,
        format!(
            r#"{{"format": "astra-trace", "version": 1,
                "source": {{"kind": "measured", "name": "t", "provenance": ""}},
                "model": {{"blocks": 1, "hidden": 8, "element_bits": 32, "index_bits": 10}},
                "runs": [{{"method": "astra-g1", "devices": 2, "tokens": 8,
                          "programs": [{}, {}]}}]}}"#,
            program("a", "b"),
            program("b", "a")
        ),
    )
    .unwrap();
    for network in ["paper", "alpha-beta"] {
        one_line_error(
            &[
                "sweep",
                "--trace",
                deadlock.to_str().unwrap(),
                "--network",
                network,
                "--devices",
                "2",
                "--tokens",
                "8",
                "--out",
                o,
            ],
            "deadlock",
        );
    }
}

#[test]
fn sweep_is_fast_and_consistent_with_trace_files() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.json");
    let s = bin()
        .args([
            "trace",
            "--methods",
            "astra-g16,sp,single",
            "--devices",
            "4",
            "--tokens",
            "1024",
            "--out",
        ])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(s.status.success(), "{}", String::from_utf8_lossy(&s.stderr));
    let a = dir.path().join("a.csv");
    let b = dir.path().join("b.csv");
    let common = [
        "--methods",
        "astra-g16,sp",
        "--devices",
        "4",
        "--tokens",
        "1024",
        "--mbps",
        "10:100:10",
        "--network",
        "paper,alpha-beta",
        "--overlap",
        "false,true",
    ];
    assert!(bin()
        .arg("sweep")
        .args(common)
        .arg("--out")
        .arg(&a)
        .status()
        .unwrap()
        .success());
    assert!(bin()
        .arg("sweep")
        .args(common)
        .arg("--trace")
        .arg(&trace)
        .arg("--out")
        .arg(&b)
        .status()
        .unwrap()
        .success());
    // The same runs through a trace file give the same numbers as straight from the profile.
    let sort = |p: &std::path::Path| {
        let mut l: Vec<String> = std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        l.sort();
        l
    };
    assert_eq!(sort(&a), sort(&b));
    assert_eq!(sort(&a).len(), 1 + 2 * 10 * 3);
}

/// `sweep --baseline`: the speedup column over another source's single device (an int8 profile
/// against the fp32 original: ASTRA and weight quantization together), latencies unchanged.
#[test]
fn sweep_speedups_over_a_baseline_profile() {
    let dir = tempfile::tempdir().unwrap();
    let profile = |name: &str, single: f64, astra: f64| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "method,devices,tokens,compute_ms\nsingle,1,197,{single}\nastra-g32,4,197,{astra}\n"
            ),
        )
        .unwrap();
        p
    };
    let (fp32, int8) = (
        profile("fp32.csv", 300.0, 200.0),
        profile("int8.csv", 120.0, 100.0),
    );
    let sweep = |baseline: Option<&std::path::Path>| {
        let out = dir.path().join("out.csv");
        let mut c = bin();
        c.args(["sweep", "--methods", "single,astra-g32", "--devices", "4"])
            .args(["--tokens", "197", "--mbps", "10", "--profile"])
            .arg(&int8)
            .arg("--out")
            .arg(&out);
        if let Some(b) = baseline {
            c.arg("--baseline").arg(b);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        csv_rows(&std::fs::read_to_string(&out).unwrap())
    };
    let (own, over_fp32) = (sweep(None), sweep(Some(&fp32)));
    for (a, b) in own.iter().zip(&over_fp32) {
        assert_eq!(a[..12], b[..12], "latencies do not depend on the baseline");
        let latency: f64 = a[11].parse().unwrap();
        let (s_own, s_fp32): (f64, f64) = (a[12].parse().unwrap(), b[12].parse().unwrap());
        assert!((s_own - 120.0 / latency).abs() < 1e-4, "{a:?}");
        assert!((s_fp32 - 300.0 / latency).abs() < 1e-4, "{b:?}");
    }
    // The single device under int8 alone: 300 / 120 = 2.5× over the fp32 original.
    assert!((over_fp32[0][12].parse::<f64>().unwrap() - 2.5).abs() < 1e-6);
    one_line_error(
        &[
            "sweep",
            "--baseline",
            dir.path().join("none.csv").to_str().unwrap(),
            "--out",
            dir.path().join("x.csv").to_str().unwrap(),
        ],
        "none.csv",
    );
}
