//! Live replay: real worker processes exchange real bytes over TCP. Timing is never asserted
//! (tests do not check wall-clock speed); what is checked is that every rank completes and reports,
//! that faults end in a clear error within the timeout, and that shaped runs leave no namespaces.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_astra-sim"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn our_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with("astra-"))
            .map(str::to_string)
            .collect()
    })
    .unwrap_or_default()
}

#[test]
fn loopback_replay_completes() {
    let dir = tempfile::tempdir().unwrap();
    let md = dir.path().join("live.md");
    let out = bin()
        .args([
            "replay",
            "--live",
            "--no-shape",
            "--methods",
            "astra-g16",
            "--devices",
            "2,4",
            "--tokens",
            "1024",
            "--mbps",
            "100",
            "--repeats",
            "1",
            "--out",
        ])
        .arg(&md)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("NOT shaped"),
        "the fallback must say so: {stderr}"
    );
    let table = std::fs::read_to_string(&md).unwrap();
    assert!(table.contains("NOT shaped (loopback)"));
    let rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("| astra-g16"))
        .collect();
    assert_eq!(rows.len(), 2, "{table}");
    for r in rows {
        let f: Vec<&str> = r.split('|').map(str::trim).collect();
        // Sleeping through the compute segments alone takes the profile's compute time.
        let measured: f64 = f[5].parse().unwrap();
        let compute = if f[2] == "2" { 55.79 } else { 41.26 };
        assert!(measured >= compute * 0.999, "{r}");
    }
}

#[test]
fn shaped_replay_cleans_up_its_namespaces() {
    if !is_root() {
        eprintln!("skipped: shaping needs root (CI runs as root)");
        return;
    }
    let before = our_namespaces();
    let out = bin()
        .args([
            "replay",
            "--live",
            "--methods",
            "astra-g32",
            "--devices",
            "3",
            "--tokens",
            "1024",
            "--mbps",
            "100",
            "--repeats",
            "1",
        ])
        .args(["--profile", "analytic:5:288"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("NOT shaped"));
    assert_eq!(our_namespaces(), before, "namespaces left behind");
}

#[test]
fn missing_peer_is_a_clear_error_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // A 2-device run whose rank 0 never starts: rank 1 must give up naming peer 0.
    let trace = dir.path().join("t.json");
    assert!(bin()
        .args([
            "trace",
            "--methods",
            "astra-g1",
            "--devices",
            "2",
            "--tokens",
            "1024",
            "--out"
        ])
        .arg(&trace)
        .status()
        .unwrap()
        .success());
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let run = dir.path().join("run.json");
    std::fs::write(&run, t["runs"][0].to_string()).unwrap();
    let start = std::time::Instant::now();
    let out = bin()
        .args([
            "replay-worker",
            "--rank",
            "1",
            "--peers",
            "127.0.0.1:1,127.0.0.1:0",
            "--timeout-s",
            "1",
            "--run",
        ])
        .arg(&run)
        .env("ASTRA_SESSION", "k")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("peer 0"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(start.elapsed().as_secs() < 30, "did not give up");
    let bad = bin()
        .args([
            "replay-worker",
            "--rank",
            "0",
            "--peers",
            "nonsense",
            "--run",
        ])
        .arg(&run)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("peers: 'nonsense' is not ADDRESS:PORT"));
    // Workers take the session key from their environment; without one they refuse to start.
    let keyless = bin()
        .args([
            "replay-worker",
            "--rank",
            "1",
            "--peers",
            "127.0.0.1:1,127.0.0.1:0",
        ])
        .args(["--timeout-s", "1", "--run"])
        .arg(&run)
        .env_remove("ASTRA_SESSION")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&keyless.stderr).contains("no session key in ASTRA_SESSION"));
}
