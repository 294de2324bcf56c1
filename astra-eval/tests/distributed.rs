//! The multi-process runtime on loopback: N worker processes exchanging bit-packed indices over
//! TCP give the logits of the one-process per-device path; a worker that dies or goes silent
//! makes every process stop within the timeout with a message naming the peer and the block; a
//! wrong session key and a malformed frame are refused.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

mod common;

use astra_train::config::{ModelConfig, ViTConfig};
use astra_train::model::Model;
use tch::{Device, Kind, Tensor};

fn eval(args: &[&str], env: Option<(&str, &str)>) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_astra-eval"));
    c.args(args);
    if let Some((k, v)) = env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// A tiny ViT with codebooks beside it, and an input batch.
fn fixture(dir: &Path) -> (String, String) {
    tch::manual_seed(11);
    let model = Model::new(
        ModelConfig::ViT(ViTConfig {
            hidden_size: 16,
            num_hidden_layers: 3,
            num_attention_heads: 2,
            intermediate_size: 32,
            image_size: 8,
            patch_size: 2,
            num_channels: 1,
            ..ViTConfig::vit_base_patch16_224(5)
        }),
        Device::Cpu,
    )
    .unwrap();
    let m = dir.join("vit");
    model.save(&m).unwrap();
    common::save_codebooks(&m.join("codebooks.safetensors"), 3, 16, 4);
    let x = dir.join("x.npy");
    Tensor::randn([3, 1, 8, 8], (Kind::Float, Device::Cpu))
        .write_npy(&x)
        .unwrap();
    (
        m.to_string_lossy().into_owned(),
        x.to_string_lossy().into_owned(),
    )
}

#[test]
fn workers_over_tcp_equal_the_per_device_path() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, x) = fixture(tmp.path());
    let cb = format!("{m}/codebooks.safetensors");
    for (n, single) in [(3, false), (4, true)] {
        let (dist, local) = (tmp.path().join("d.npy"), tmp.path().join("p.npy"));
        let mut args = vec![
            "distributed",
            "--model",
            &m,
            "--devices",
            if n == 3 { "3" } else { "4" },
        ];
        args.extend(["--input", &x, "--out", dist.to_str().unwrap()]);
        if single {
            args.push("--single-cls");
        }
        let trace = tmp.path().join("trace.json");
        args.extend(["--trace", trace.to_str().unwrap()]);
        let o = eval(&args, None);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains("over TCP") && out.contains("worker 2: compute"),
            "{out}"
        );
        let mut args = vec![
            "predict",
            "--model",
            &m,
            "--codebooks",
            &cb,
            "--path",
            "per-device",
        ];
        args.extend([
            "--devices",
            if n == 3 { "3" } else { "4" },
            "--input",
            &x,
            "--out",
            local.to_str().unwrap(),
        ]);
        if single {
            args.extend(["--cls", "single"]);
        }
        let o = eval(&args, None);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (a, b) = (
            Tensor::read_npy(&dist).unwrap(),
            Tensor::read_npy(&local).unwrap(),
        );
        let rel = (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]);
        assert!(
            rel <= 1e-5,
            "N={n}: distributed vs per-device relative {rel}"
        );
    }
}

#[test]
fn sp_baseline_over_tcp_equals_the_plain_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, x) = fixture(tmp.path());
    let (dist, plain) = (tmp.path().join("d.npy"), tmp.path().join("p.npy"));
    let trace = tmp.path().join("sp.json");
    let o = eval(
        &[
            "distributed",
            "--mode",
            "sp",
            "--model",
            &m,
            "--devices",
            "3",
            "--input",
            &x,
            "--out",
            dist.to_str().unwrap(),
            "--trace",
            trace.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = eval(
        &[
            "predict",
            "--model",
            &m,
            "--input",
            &x,
            "--out",
            plain.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (
        Tensor::read_npy(&dist).unwrap(),
        Tensor::read_npy(&plain).unwrap(),
    );
    let rel = (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]);
    assert!(
        rel <= 1e-5,
        "SP over TCP vs the plain model: relative {rel}"
    );
    let t = astra_sim::trace::Trace::load(&trace).unwrap();
    assert_eq!(t.runs[0].method.to_string(), "sp");
}

#[test]
fn dead_or_silent_workers_stop_everyone_with_the_peer_and_block_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, x) = fixture(tmp.path());
    let out = tmp.path().join("y.npy");
    for (fault, want) in [
        ("die:1:1", "peer 1 closed its connection"),
        ("silent:2:2", "peer 2 sent nothing within 1000 ms"),
        ("twice:0:0", "peer 0 sent block 0's data twice"),
    ] {
        let o = eval(
            &[
                "distributed",
                "--model",
                &m,
                "--devices",
                "3",
                "--input",
                &x,
                "--out",
                out.to_str().unwrap(),
                "--timeout-ms",
                "1000",
            ],
            Some(("ASTRA_FAULT", fault)),
        );
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        let last = e.lines().last().unwrap_or_default();
        // A replay is refused by its receivers; the coordinator may first hear of the peers
        // that saw those receivers stop, so any worker's line may carry it.
        let named = if fault.starts_with("twice") {
            e.lines().any(|l| l.contains(want))
        } else {
            last.contains(want) && last.contains("block")
        };
        assert!(named, "{fault}: {e}");
        assert!(!out.exists(), "no output after a failure");
    }
}

#[test]
fn wrong_session_key_and_malformed_frames_are_refused() {
    for payload in [
        b"hello-with-wrong-key".as_slice(),
        b"\x00\x01garbage-not-a-frame".as_slice(),
    ] {
        let mut w = Command::new(env!("CARGO_BIN_EXE_astra-eval"))
            .args(["worker", "--timeout-ms", "3000"])
            .env("ASTRA_SESSION", "right-key")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(w.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().strip_prefix("listening ").unwrap().to_string();
        assert!(
            addr.starts_with("127.0.0.1:"),
            "binds loopback by default: {addr}"
        );
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        if payload.starts_with(b"hello") {
            // A well-formed hello with the wrong key.
            s.write_all(&coordinator_hello("wrong-key")).unwrap();
        } else {
            s.write_all(payload).unwrap();
        }
        let o = w.wait_with_output().unwrap();
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains("wrong session key") || e.contains("malformed frame"),
            "{e}"
        );
        assert_eq!(e.trim().lines().count(), 1, "{e}");
    }
}

/// Relative max difference of two .npy files.
fn rel_diff(a: &Path, b: &Path) -> f64 {
    let (a, b) = (Tensor::read_npy(a).unwrap(), Tensor::read_npy(b).unwrap());
    assert_eq!(a.size(), b.size());
    (&a - &b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-6)
}

fn ok(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn one_line_error(o: &std::process::Output, needle: &str) {
    assert!(!o.status.success(), "expected failure");
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(e.contains(needle), "'{e}' lacks '{needle}'");
}

#[test]
fn gpt2_prefill_over_tcp_equals_the_per_device_path() {
    use astra_train::config::GPT2Config;
    let tmp = tempfile::tempdir().unwrap();
    tch::manual_seed(12);
    let m = tmp.path().join("gpt2");
    Model::new(
        ModelConfig::GPT2(GPT2Config {
            vocab_size: 50,
            n_positions: 32,
            n_embd: 16,
            n_layer: 3,
            n_head: 2,
            ..GPT2Config::gpt2_small()
        }),
        Device::Cpu,
    )
    .unwrap()
    .save(&m)
    .unwrap();
    common::save_codebooks(&m.join("codebooks.safetensors"), 3, 16, 4);
    let ids = tmp.path().join("ids.npy");
    Tensor::randint(50, [2, 11], (Kind::Int64, Device::Cpu))
        .write_npy(&ids)
        .unwrap();
    let (m, ids) = (m.to_str().unwrap(), ids.to_str().unwrap());
    let path = |n: &str| tmp.path().join(n);
    let json = path("s.json");
    // ASTRA: indices flow to later devices only; the logits of all tokens come back.
    let out = ok(&eval(
        &[
            "distributed",
            "--model",
            m,
            "--devices",
            "3",
            "--input",
            ids,
            "--out",
            path("d.npy").to_str().unwrap(),
            "--runs",
            "2",
            "--warmup",
            "1",
            "--json",
            json.to_str().unwrap(),
            "--all-logits",
        ],
        None,
    ));
    assert!(
        out.contains("latency: median") && out.contains("over 2 run(s)"),
        "{out}"
    );
    let cb = format!("{m}/codebooks.safetensors");
    ok(&eval(
        &[
            "predict",
            "--model",
            m,
            "--codebooks",
            &cb,
            "--path",
            "per-device",
            "--devices",
            "3",
            "--input",
            ids,
            "--out",
            path("p.npy").to_str().unwrap(),
        ],
        None,
    ));
    let rel = rel_diff(&path("d.npy"), &path("p.npy"));
    assert!(
        rel <= 1e-5,
        "GPT-2 distributed vs per-device: relative {rel}"
    );
    assert_eq!(
        Tensor::read_npy(path("d.npy")).unwrap().size(),
        vec![2, 11, 50]
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(s["runs_ms"].as_array().unwrap().len(), 2);
    assert_eq!(s["mode"], "astra");
    // Rank 0 attends to nobody: it never waits.
    let w0 = s["wait_ms"][0].as_f64().unwrap();
    assert!(w0 < 0.5, "rank 0 waited {w0} ms");
    // By default the last device returns the next-token logits only: the last position's.
    ok(&eval(
        &[
            "distributed",
            "--model",
            m,
            "--devices",
            "3",
            "--input",
            ids,
            "--out",
            path("next.npy").to_str().unwrap(),
        ],
        None,
    ));
    let next = Tensor::read_npy(path("next.npy")).unwrap();
    let want = Tensor::read_npy(path("p.npy")).unwrap().select(1, 10);
    assert_eq!(next.size(), vec![2, 50]);
    let rel = (&next - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
    assert!(
        rel <= 1e-5,
        "next-token logits vs per-device: relative {rel}"
    );
    // SP over TCP equals the plain model.
    ok(&eval(
        &[
            "distributed",
            "--mode",
            "sp",
            "--model",
            m,
            "--devices",
            "2",
            "--input",
            ids,
            "--out",
            path("sp.npy").to_str().unwrap(),
            "--all-logits",
        ],
        None,
    ));
    ok(&eval(
        &[
            "predict",
            "--model",
            m,
            "--input",
            ids,
            "--out",
            path("plain.npy").to_str().unwrap(),
        ],
        None,
    ));
    let rel = rel_diff(&path("sp.npy"), &path("plain.npy"));
    assert!(rel <= 1e-5, "GPT-2 SP vs plain: relative {rel}");
    // One device needs no codebooks and exchanges nothing: the plain model.
    let single = path("single.json");
    ok(&eval(
        &[
            "distributed",
            "--model",
            m,
            "--devices",
            "1",
            "--input",
            ids,
            "--out",
            path("one.npy").to_str().unwrap(),
            "--json",
            single.to_str().unwrap(),
            "--all-logits",
        ],
        None,
    ));
    let rel = rel_diff(&path("one.npy"), &path("plain.npy"));
    assert!(rel <= 1e-5, "GPT-2 single device vs plain: relative {rel}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&single).unwrap()).unwrap();
    assert_eq!(s["mode"], "single");
    // The measured run as a trace: point-to-point sends to later devices, which astra-sim runs.
    let trace = path("t.json");
    ok(&eval(
        &[
            "distributed",
            "--model",
            m,
            "--devices",
            "3",
            "--input",
            ids,
            "--out",
            path("t.npy").to_str().unwrap(),
            "--trace",
            trace.to_str().unwrap(),
        ],
        None,
    ));
    let t = astra_sim::trace::Trace::load(&trace).unwrap();
    let run = &t.runs[0];
    let sends = |d: usize| {
        run.programs[d]
            .iter()
            .filter(|o| matches!(o.kind, astra_sim::trace::OpKind::Send(_)))
            .count()
    };
    // Per block: device 0 sends to 1 and 2, device 1 receives from 0 and sends to 2, device 2
    // receives from both.
    assert_eq!((sends(0), sends(1), sends(2)), (2 * 3, 2 * 3, 2 * 3));
    let sim = astra_sim::network::CompiledRun::new(run)
        .unwrap()
        .simulate(&astra_sim::network::Network::paper(10.0))
        .unwrap();
    assert!(
        sim.latency_ms > sim.compute_ms && sim.comm_ms > 0.0,
        "{sim:?}"
    );
}

/// The one-process per-device logits of the fixture (codebooks beside the model) for `n` devices,
/// written to `reference`, equal to the distributed ones in `got` (≤ 1e-5 relative).
fn assert_equals_per_device(m: &str, x: &str, n: usize, got: &Path, reference: &Path, what: &str) {
    let cb = format!("{m}/codebooks.safetensors");
    let n = n.to_string();
    ok(&eval(
        &[
            "predict",
            "--model",
            m,
            "--codebooks",
            &cb,
            "--path",
            "per-device",
            "--devices",
            &n,
            "--input",
            x,
            "--out",
            reference.to_str().unwrap(),
        ],
        None,
    ));
    let rel = rel_diff(got, reference);
    assert!(rel <= 1e-5, "{what} vs per-device: relative {rel}");
}

/// Starts a worker as a user would on another host; returns it and its address.
fn start_worker(session: &str) -> (std::process::Child, String) {
    let mut w = Command::new(env!("CARGO_BIN_EXE_astra-eval"))
        .args(["worker", "--timeout-ms", "5000"])
        .env("ASTRA_SESSION", session)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(w.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().strip_prefix("listening ").unwrap().to_string();
    (w, addr)
}

#[test]
fn running_workers_are_used_with_their_session_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, x) = fixture(tmp.path());
    let (mut w0, a0) = start_worker("k-123");
    let (mut w1, a1) = start_worker("k-123");
    let list = format!("{a0},{a1}");
    let d = tmp.path().join("d.npy");
    let o = eval(
        &[
            "distributed",
            "--model",
            &m,
            "--workers",
            &list,
            "--input",
            &x,
            "--out",
            d.to_str().unwrap(),
        ],
        Some(("ASTRA_SESSION", "k-123")),
    );
    let out = ok(&o);
    assert!(out.contains("2 devices over TCP (remote workers"), "{out}");
    // Workers on other hosts read other clocks: no message latency is measured.
    assert!(!out.contains("in hand"), "{out}");
    assert!(w0.wait().unwrap().success() && w1.wait().unwrap().success());
    let p = tmp.path().join("p.npy");
    assert_equals_per_device(&m, &x, 2, &d, &p, "remote workers");
    // Nobody listening: the coordinator names the worker and its address within the timeout.
    one_line_error(
        &eval(
            &[
                "distributed",
                "--model",
                &m,
                "--workers",
                "127.0.0.1:9",
                "--input",
                &x,
                "--out",
                d.to_str().unwrap(),
                "--startup-timeout-ms",
                "500",
            ],
            Some(("ASTRA_SESSION", "k")),
        ),
        "worker 0 at 127.0.0.1:9",
    );
    // Without the key the coordinator cannot join running workers.
    one_line_error(
        &eval(
            &[
                "distributed",
                "--model",
                &m,
                "--workers",
                "127.0.0.1:9",
                "--input",
                &x,
                "--out",
                d.to_str().unwrap(),
            ],
            None,
        ),
        "ASTRA_SESSION",
    );
}

/// `distributed` on `devices` local workers of the fixture, writing `out` and the JSON summary
/// `json`, with `extra` flags; its stdout and the summary.
fn run_with_json(
    m: &str,
    x: &str,
    devices: &str,
    out: &Path,
    json: &Path,
    extra: &[&str],
) -> (String, serde_json::Value) {
    let mut args = vec![
        "distributed",
        "--model",
        m,
        "--devices",
        devices,
        "--input",
        x,
    ];
    args.extend([
        "--out",
        out.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    args.extend(extra);
    let stdout = ok(&eval(&args, None));
    let s = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    (stdout, s)
}

#[test]
fn user_space_shaping_paces_every_uplink_without_root() {
    // SP exchanges fp32 embeddings: 3 images × 8 tokens × 16 wide × 4 B = 1,536 B per block from
    // each of 2 workers to the other, 3 blocks: 4,608 B per uplink and run, above the bucket's
    // 3,028 B burst. At 0.01 Mbit/s (1,310.72 B/s) no run can end before the rest has left.
    let tmp = tempfile::tempdir().unwrap();
    let (m, x) = fixture(tmp.path());
    let (d, sp, json) = (
        tmp.path().join("d.npy"),
        tmp.path().join("sp.npy"),
        tmp.path().join("s.json"),
    );
    // Two local workers on the fixture, writing `out` and the JSON summary; stdout and summary.
    let two_workers = |extra: &[&str], out: &Path| run_with_json(&m, &x, "2", out, &json, extra);
    let shaped = ["--mode", "sp", "--links", "0.01,50", "--shaper", "user"];
    let (out, s) = two_workers(&shaped, &d);
    assert!(
        out.contains("shaped 0.01 Mbit/s uplinks, 50 ms delay (shaped in user space)"),
        "{out}"
    );
    let latency = s["median_ms"].as_f64().unwrap();
    let bytes_per_s = 0.01 * 1_048_576.0 / 8.0;
    let floor_ms = (3.0 * (9.0 + 20.0 + 1536.0) - 3028.0) / bytes_per_s * 1e3;
    assert!(latency >= floor_ms, "{latency} ms < {floor_ms} ms");
    // Three blocks, each waiting for the other's embeddings: three one-way delays at least.
    assert!(latency >= 150.0, "{latency}");
    // The delay is latency, not uplink time: every message was in its receiver's hands at
    // least 50 ms after it left the shaped uplink, as each worker measured it.
    for w in s["message_latency_ms"].as_array().unwrap() {
        let ms = w.as_f64().unwrap();
        assert!((50.0..latency).contains(&ms), "{ms} ms: {s}");
    }
    // What went over the wire, exactly: per block one Embeddings frame of 9 header bytes, 20 of
    // fields and 384 fp32 values to the one peer.
    let per_run = 3 * (9 + 20 + 384 * 4);
    assert_eq!(
        s["sent_bytes"],
        serde_json::json!([per_run, per_run]),
        "{s}"
    );
    assert_eq!(
        s["received_bytes"],
        serde_json::json!([per_run, per_run]),
        "{s}"
    );
    // The same numbers as the unshaped per-device path.
    two_workers(&["--mode", "sp"], &sp);
    let (a, b) = (
        Tensor::read_npy(&d).unwrap(),
        Tensor::read_npy(&sp).unwrap(),
    );
    assert!(a.equal(&b), "user-space shaping changed the logits");
    // Pinned to a core each, the workers compute the same numbers.
    let pinned = tmp.path().join("pinned.npy");
    let pin = ["--mode", "sp", "--threads", "1", "--pin-cores"];
    if std::thread::available_parallelism().unwrap().get() >= 2 {
        let (_, s) = two_workers(&pin, &pinned);
        let cores = &s["pinned_cores"];
        assert!(
            cores[0].as_array().unwrap().len() == 1 && cores[0] != cores[1],
            "{s}"
        );
        assert!(Tensor::read_npy(&pinned).unwrap().equal(&b));
    } else {
        let args = [&["distributed", "--model", &m, "--devices", "2"], &pin[..]].concat();
        let o = eval(
            &[&args[..], &["--input", &x, "--out", d.to_str().unwrap()]].concat(),
            None,
        );
        one_line_error(&o, "--pin-cores needs 2 × 1 cores");
    }
    // ASTRA sends packed indices: G·log2(K) bits per token and block, plus the frame's fields.
    let cb =
        astra_quant::CodebookFile::load(Path::new(&format!("{m}/codebooks.safetensors"))).unwrap();
    let (g, k) = (cb.blocks[0].codebook.groups(), cb.blocks[0].codebook.k());
    let bits = astra_quant::bitpack::bits_for(k);
    let (_, s) = two_workers(&[], &sp);
    let frame = 9 + 17 + 4 + astra_quant::bitpack::packed_len(3 * 8 * g, bits);
    assert_eq!(
        s["sent_bytes"],
        serde_json::json!([3 * frame, 3 * frame]),
        "{s}"
    );
    // User space cannot drop messages over TCP: loss needs the kernel's netem.
    let d = d.to_str().unwrap();
    let lossy = [
        "distributed",
        "--model",
        &m,
        "--links",
        "10,0,5",
        "--shaper",
        "user",
    ];
    one_line_error(
        &eval(&[&lossy[..], &["--input", &x, "--out", d]].concat(), None),
        "needs kernel shaping",
    );
}

#[test]
fn shaped_links_give_the_same_logits_and_leave_no_namespaces() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/netem.sh");
    if !astra_sim::live::can_shape(&script) {
        eprintln!(
            "skipped: shaping needs root and network namespaces ({} check failed)",
            script.display()
        );
        return;
    }
    // The runtime's namespaces (astra-PID-e-…), whoever made them.
    let ours = || {
        let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let mut v: Vec<String> = String::from_utf8_lossy(&ns.stdout)
            .lines()
            .filter(|l| l.starts_with("astra-") && l.contains("-e-"))
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
            .collect();
        v.sort();
        v
    };
    let before = ours();
    let tmp = tempfile::tempdir().unwrap();
    let (m, x) = fixture(tmp.path());
    let (d, p) = (tmp.path().join("d.npy"), tmp.path().join("p.npy"));
    let shaped = [
        "distributed",
        "--model",
        &m,
        "--devices",
        "2",
        "--links",
        "50",
        "--shaper",
        "kernel",
        "--input",
        &x,
        "--out",
        d.to_str().unwrap(),
    ];
    let o = eval(&shaped, None);
    let out = ok(&o);
    assert!(out.contains("shaped 50 Mbit/s uplinks"), "{out}");
    assert_equals_per_device(&m, &x, 2, &d, &p, "shaped run");
    assert_eq!(ours(), before, "namespaces left behind");
    // Multicast across the namespaces' bridge: nothing lost, the same logits.
    let o = eval(&[&shaped[..], &["--transport", "multicast"]].concat(), None);
    let out = ok(&o);
    assert!(out.contains("multicast: 0.00%"), "{out}");
    assert_equals_per_device(&m, &x, 2, &d, &p, "shaped multicast run");
    // A dead worker behind a shaped link: still one line naming the peer and the block.
    let o = eval(
        &[&shaped[..], &["--timeout-ms", "1000"]].concat(),
        Some(("ASTRA_FAULT", "die:1:1")),
    );
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.lines()
            .last()
            .unwrap_or_default()
            .contains("peer 1 closed its connection"),
        "{e}"
    );
    assert_eq!(ours(), before, "namespaces left behind after a fault");
}

#[test]
fn nonsense_runtime_flags_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, x) = fixture(tmp.path());
    let d = tmp.path().join("d.npy");
    let d = d.to_str().unwrap();
    // Threads the per-core rule allows, so only the pinning check can refuse them.
    let most = (8 * std::thread::available_parallelism().unwrap().get()).to_string();
    let pin_needle = format!("--pin-cores needs 4 × {most} cores");
    for (extra, needle) in [
        (
            vec!["--links", "fast"],
            "'--links <LINKS>': fast: rate 'fast'",
        ),
        (vec!["--links", "0"], "RATE > 0"),
        (vec!["--runs", "0"], "--runs must be at least 1"),
        (
            vec!["--devices", "3", "--workers", "127.0.0.1:1,127.0.0.1:2"],
            "--workers lists 2 addresses for --devices 3",
        ),
        (
            vec!["--devices", "99"],
            "--devices 99 exceeds the input's 16 tokens",
        ),
        (vec!["--device", "tpu"], "'tpu' is not cpu, cuda or cuda:N"),
        (vec!["--device", "cuda:7"], "no such CUDA device here"),
        (vec!["--pin-cores", "--threads", &most], &pin_needle),
        (
            vec![
                "--pin-cores",
                "--devices",
                "2",
                "--workers",
                "127.0.0.1:1,127.0.0.1:2",
            ],
            "--pin-cores pins local workers",
        ),
    ] {
        let mut args = vec!["distributed", "--model", &m, "--input", &x, "--out", d];
        args.extend(extra);
        one_line_error(&eval(&args, None), needle);
    }
}

/// Starts a worker with `key` in its environment and connects to it as an unknown client.
fn worker_and_client(key: &str) -> (std::process::Child, std::net::TcpStream) {
    let (w, addr) = start_worker(key);
    (w, std::net::TcpStream::connect(&addr).unwrap())
}

fn refused_with(w: std::process::Child, needle: &str) {
    let o = w.wait_with_output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "worker accepted: {e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(e.contains(needle), "'{e}' lacks '{needle}'");
}

#[test]
fn workers_guard_their_session() {
    // No key (or an empty one): the worker refuses to start.
    let o = Command::new(env!("CARGO_BIN_EXE_astra-eval"))
        .args(["worker"])
        .env("ASTRA_SESSION", "")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("session key is empty"),
        "{e}"
    );
    // A key never travels on the command line.
    let o = Command::new(env!("CARGO_BIN_EXE_astra-eval"))
        .args(["worker", "--session", "k"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    // Before the key is checked, nothing large is read: a 200 MiB frame header is refused at
    // once, not allocated.
    let (w, mut s) = worker_and_client("right-key");
    let mut f = 0x4153_5452u32.to_le_bytes().to_vec();
    f.push(3);
    f.extend_from_slice(&(200u32 << 20).to_le_bytes());
    s.write_all(&f).unwrap();
    refused_with(w, "not a hello of at most 1024");
    // An empty key presented to the worker is a wrong key.
    let (w, mut s) = worker_and_client("right-key");
    s.write_all(&coordinator_hello("")).unwrap();
    refused_with(w, "wrong session key");
    // The right key from a build whose frames differ: refused by name, before any plan is read.
    let (w, mut s) = worker_and_client("right-key");
    let old = astra_sim::transport::Frame::Hello {
        session: "right-key".into(),
        rank: u32::MAX,
        protocol: 1,
    };
    s.write_all(&old.to_bytes()).unwrap();
    refused_with(w, "the coordinator speaks wire protocol 1");
}

#[test]
fn a_wrong_key_is_named_by_the_coordinator_and_local_keys_stay_off_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, x) = fixture(tmp.path());
    let d = tmp.path().join("d.npy");
    let (w0, a0) = start_worker("k-123");
    let (w1, a1) = start_worker("k-123");
    let o = eval(
        &[
            "distributed",
            "--model",
            &m,
            "--workers",
            &format!("{a0},{a1}"),
            "--input",
            &x,
            "--out",
            d.to_str().unwrap(),
        ],
        Some(("ASTRA_SESSION", "not-the-key")),
    );
    one_line_error(&o, "rejected the session key");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("worker 0 rejected") || e.contains("worker 1 rejected"),
        "{e}"
    );
    for mut w in [w0, w1] {
        let _ = w.kill();
        let _ = w.wait();
    }
    // Local workers: while they run (one stays silent), no worker's command line holds a key.
    let coordinator = Command::new(env!("CARGO_BIN_EXE_astra-eval"))
        .args([
            "distributed",
            "--model",
            &m,
            "--devices",
            "2",
            "--input",
            &x,
            "--out",
        ])
        .arg(&d)
        .args(["--timeout-ms", "4000"])
        .env("ASTRA_FAULT", "silent:1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while seen.len() < 2 && std::time::Instant::now() < until {
        seen = worker_command_lines(coordinator.id());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(seen.len(), 2, "workers not found: {seen:?}");
    for cmd in &seen {
        assert!(!cmd.contains("session"), "a key on the command line: {cmd}");
    }
    let o = coordinator.wait_with_output().unwrap();
    assert!(!o.status.success());
}

/// The command lines of `parent`'s child processes (Linux /proc).
fn worker_command_lines(parent: u32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            out.push(String::from_utf8_lossy(&cmd).replace('\0', " "));
        }
    }
    out
}

/// A well-formed coordinator hello presenting `key` (the transport's own frame encoding).
fn coordinator_hello(key: &str) -> Vec<u8> {
    astra_sim::transport::Frame::Hello {
        session: key.into(),
        rank: u32::MAX,
        protocol: astra_sim::transport::PROTOCOL,
    }
    .to_bytes()
}

/// A Llama (GQA) through the runtime: each worker sends its tokens' key and value indices (two
/// codebooks per block, 2G index columns), receivers look the keys up and rotate them at the
/// senders' positions; equal to the per-device path, and SP equal to the plain model.
#[test]
fn llama_prefill_over_tcp_equals_the_per_device_path() {
    use astra_train::config::LlamaConfig;
    let tmp = tempfile::tempdir().unwrap();
    tch::manual_seed(13);
    let m = tmp.path().join("llama");
    let cfg = LlamaConfig::scratch(50, 16, 3, 2, 1, 32, 32);
    Model::new(ModelConfig::Llama(cfg), Device::Cpu)
        .unwrap()
        .save(&m)
        .unwrap();
    // Keys and values of 3 blocks: 6 codebooks of width kv_dim = 8, 2 groups each.
    common::save_codebooks(&m.join("codebooks.safetensors"), 6, 8, 2);
    let ids = tmp.path().join("ids.npy");
    Tensor::randint(50, [2, 11], (Kind::Int64, Device::Cpu))
        .write_npy(&ids)
        .unwrap();
    let (m, ids) = (m.to_str().unwrap(), ids.to_str().unwrap());
    let path = |n: &str| tmp.path().join(n);
    let run = |extra: &[&str], out: &str| {
        let mut args = vec!["distributed", "--model", m, "--input", ids, "--all-logits"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", out]);
        ok(&eval(&args, None))
    };
    run(&["--devices", "3"], path("d.npy").to_str().unwrap());
    assert_equals_per_device(m, ids, 3, &path("d.npy"), &path("p.npy"), "Llama");
    run(
        &["--devices", "2", "--mode", "sp"],
        path("sp.npy").to_str().unwrap(),
    );
    ok(&eval(
        &[
            "predict",
            "--model",
            m,
            "--input",
            ids,
            "--out",
            path("plain.npy").to_str().unwrap(),
        ],
        None,
    ));
    let rel = rel_diff(&path("sp.npy"), &path("plain.npy"));
    assert!(rel <= 1e-5, "Llama SP vs plain: relative {rel}");
    assert!(
        rel_diff(&path("d.npy"), &path("plain.npy")) > 1e-4,
        "the key/value codebooks changed nothing"
    );
    // Decoding on the worker holding the last token, after the prefill over TCP: the same tokens
    // as in-process generation with the same codebooks (its cache holds the indices it received).
    // Worker 0 sends its results 1.5 s late, so the decoded tokens (sent right after the last
    // worker's result) come before them.
    let json = path("dec.json");
    let out = ok(&eval(
        &[
            "distributed",
            "--model",
            m,
            "--input",
            ids,
            "--devices",
            "3",
            "--decode",
            "5",
            "--json",
            json.to_str().unwrap(),
            "--out",
            path("dec.npy").to_str().unwrap(),
        ],
        Some(("ASTRA_FAULT", "late:0:1500")),
    ));
    assert!(out.contains("decoded by worker 2: 5 token(s)"), "{out}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let decoded: Vec<Vec<i64>> = serde_json::from_value(s["decoded"].clone()).unwrap();
    assert!(s["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    ok(&eval(
        &[
            "generate",
            "--model",
            m,
            "--input",
            ids,
            "--devices",
            "3",
            "--codebooks",
            &format!("{m}/codebooks.safetensors"),
            "--max-new-tokens",
            "5",
            "--out",
            path("gen.npy").to_str().unwrap(),
        ],
        None,
    ));
    let gen = Tensor::read_npy(path("gen.npy")).unwrap().narrow(1, 11, 5);
    let want: Vec<Vec<i64>> = (0..2)
        .map(|b| Vec::<i64>::try_from(gen.get(b)).unwrap())
        .collect();
    assert_eq!(decoded, want);
}

/// The masked formulation's logits of the fixture at N devices with every remote token's indices
/// lost (each device attends to its own tokens only).
fn all_lost_reference(m: &str, x: &str, n: usize) -> Tensor {
    use astra_train::models::{Astra, ClsMode, DevicePartition, LinkLoss, VqConfig};
    let (model, _) = Model::load(m, Device::Cpu).unwrap();
    let cfg = VqConfig {
        noise_lambda: 0.0,
        ..Default::default()
    };
    let cb = Path::new(m).join("codebooks.safetensors");
    let mut vq = model.load_quantizers(&cb, &cfg, Device::Cpu).unwrap();
    let input = Tensor::read_npy(x).unwrap();
    let p = DevicePartition::contiguous(model.content_tokens(&input) as usize, n).unwrap();
    let a = Astra {
        partition: &p,
        cls: ClsMode::Distributed,
        vq: Some(&mut vq),
        train: false,
        link_loss: Some(LinkLoss { p: 1.0, seed: 0 }),
    };
    tch::no_grad(|| model.forward_astra(&input, a))
        .unwrap()
        .logits
}

#[test]
fn multicast_puts_each_message_on_the_wire_once_and_masks_what_is_lost() {
    const MC: &str = "--transport=multicast";
    let tmp = tempfile::tempdir().unwrap();
    let (m, x) = fixture(tmp.path());
    let (d, p, json) = (
        tmp.path().join("d.npy"),
        tmp.path().join("p.npy"),
        tmp.path().join("s.json"),
    );
    let three = |extra: &[&str]| run_with_json(&m, &x, "3", &d, &json, extra);
    // Nothing lost on loopback: the per-device path's logits.
    let tm = tmp.path().join("tm.json");
    let (out, s) = three(&[MC, "--runs", "2", "--trace", tm.to_str().unwrap()]);
    assert!(
        out.contains("multicast: 0.00% of the index messages lost"),
        "{out}"
    );
    assert_eq!(s["transport"], "multicast");
    assert_eq!(s["loss_rate"].as_f64(), Some(0.0), "{s}");
    assert_eq!(s["expected_messages"], serde_json::json!([6, 6, 6]), "{s}");
    assert_equals_per_device(&m, &x, 3, &d, &p, "multicast run");
    // Each block's indices leave once (one datagram: the frame behind a 24-byte header), then a
    // 25-byte announcement to each of the 2 peers; TCP sends the frame to each peer.
    let cb =
        astra_quant::CodebookFile::load(Path::new(&format!("{m}/codebooks.safetensors"))).unwrap();
    let (g, k) = (cb.blocks[0].codebook.groups(), cb.blocks[0].codebook.k());
    let bits = astra_quant::bitpack::bits_for(k);
    let frame = |tokens: usize| 9 + 17 + 4 + astra_quant::bitpack::packed_len(3 * tokens * g, bits);
    // 16 tokens over 3 devices: 6, 5, 5.
    let sent: Vec<usize> = [6, 5, 5]
        .iter()
        .map(|&t| 3 * (frame(t) + 24 + 2 * 25))
        .collect();
    assert_eq!(s["sent_bytes"], serde_json::json!(sent), "{s}");
    // Each block step attended to the other two devices' tokens (G = 4: no distinct codewords).
    let every = |k: u32| vec![k; 3];
    assert_eq!(
        s["remote_keys"],
        serde_json::json!([every(10), every(11), every(11)]),
        "{s}"
    );
    assert!(out.contains("worker 0: compute") && out.contains("10 remote keys a block"));
    // astra-sim learns the multicast from the run's trace: per block one multicast out and one in
    // from each of the 2 others, and after its own the 25-byte TCP announcement to each peer,
    // which takes its time on the same uplink (a segment of its own: 66 bytes of headers, counted
    // in the payload bits of a full segment's share, as the predictions count).
    let t = astra_sim::trace::Trace::load(&tm).unwrap();
    let run = &t.runs[0];
    let count = |d: usize, multicast: bool| {
        run.programs[d]
            .iter()
            .filter(|o| match &o.kind {
                astra_sim::trace::OpKind::Multicast(_) => multicast,
                astra_sim::trace::OpKind::Send(c) => {
                    assert!(c.tag.ends_with("announcement"), "{}", c.tag);
                    assert_eq!(c.bits, (8 * (25 + 66) * 1448u64).div_ceil(1514));
                    !multicast
                }
                _ => false,
            })
            .count()
    };
    assert_eq!((count(0, true), count(1, true), count(2, true)), (9, 9, 9));
    // Each receiver's copy of a message carries the latency it measured (local workers share
    // the host's clock), the sender's own copy none; the summary has each worker's median.
    for (d, p) in run.programs.iter().enumerate() {
        for o in p {
            if let astra_sim::trace::OpKind::Multicast(c) = &o.kind {
                let own = c.peers[0] as usize == d;
                match c.latency_ms {
                    Some(ms) => assert!(!own && ms >= 0.0, "{}: {ms}", c.tag),
                    None => assert!(own, "{} on device {d}: no latency", c.tag),
                }
            }
        }
    }
    // … and after each message it received, the work of handling it (6 per device: 2 sources
    // × 3 blocks), which the summary sums.
    for p in &run.programs {
        let handled = p
            .iter()
            .filter(|o| {
                matches!(&o.kind, astra_sim::trace::OpKind::Compute { label, .. } if label.contains("handle"))
            })
            .count();
        assert_eq!(handled, 6);
    }
    let handling = s["handling_ms"].as_array().unwrap();
    assert!(handling.iter().all(|h| h.as_f64().unwrap() > 0.0), "{s}");
    let medians = s["message_latency_ms"].as_array().unwrap();
    assert!(
        medians.len() == 3 && medians.iter().all(|m| m.as_f64().is_some()),
        "{s}"
    );
    // Each device ends with its head, then what the run took outside the workers (the go and the
    // results' way back), which the summary reports.
    let outside = s["outside_ms"].as_f64().unwrap();
    assert!(outside >= 0.0, "{s}");
    for p in &run.programs {
        let labels: Vec<&str> = p
            .iter()
            .filter_map(|o| match &o.kind {
                astra_sim::trace::OpKind::Compute { label, .. } => Some(label.as_str()),
                _ => None,
            })
            .collect();
        let tail = if outside > 0.0 {
            vec!["head", "outside the workers (go, results back)"]
        } else {
            vec!["head"]
        };
        assert_eq!(labels[labels.len() - tail.len()..], tail[..], "{labels:?}");
    }
    assert_eq!(
        (count(0, false), count(1, false), count(2, false)),
        (12, 12, 12)
    );
    let comm = |path: &Path, mbps: f64| {
        use astra_sim::network::{Algorithm, CompiledRun, Network};
        let run = &astra_sim::trace::Trace::load(path).unwrap().runs[0];
        let net = Network::alpha_beta(mbps, 0.0, Algorithm::Direct, true);
        CompiledRun::new(run)
            .unwrap()
            .simulate(&net)
            .unwrap()
            .comm_ms
    };
    // At a slow rate the announcements show: the run's communication is at least their uplink
    // time, 3 blocks × 2 announcements of 697 bits at 0.01 Mbit/s (2^20 bit/s) ≈ 399 ms.
    let tt = tmp.path().join("tt.json");
    three(&["--transport", "tcp", "--trace", tt.to_str().unwrap()]);
    let announcements_ms = 6.0 * 697.0 / (0.01 * 1048576.0) * 1e3;
    assert!(
        comm(&tm, 0.01) >= announcements_ms,
        "multicast {} ms of communication, announcements alone {announcements_ms} ms",
        comm(&tm, 0.01)
    );
    // The TCP trace sends the frame to each peer and announces nothing.
    assert!(comm(&tt, 0.01) > 0.0);
    // Every message lost (user-space loss of whole messages): each device attends to its own
    // tokens only, which is the masked formulation with every remote token's indices lost.
    let (out, s) = three(&[MC, "--links", "1000,0,100", "--shaper", "user"]);
    assert!(out.contains("100.00% of the index messages lost"), "{out}");
    assert_eq!(s["lost_messages"], serde_json::json!([6, 6, 6]), "{s}");
    assert_eq!(
        s["remote_keys"],
        serde_json::json!(vec![vec![0; 3]; 3]),
        "{s}"
    );
    assert_eq!(s["late_messages"], 0, "dropped messages never arrive: {s}");
    let reference = all_lost_reference(&m, &x, 3);
    let got = Tensor::read_npy(&d).unwrap();
    let rel =
        (&got - &reference).abs().max().double_value(&[]) / reference.abs().max().double_value(&[]);
    assert!(
        rel <= 1e-5,
        "all lost vs masked with every message lost: {rel}"
    );
    // Some lost: the run goes on, counts them, and its logits differ from the lossless run's.
    let (_, s) = three(&[
        MC,
        "--links",
        "1000,0,40",
        "--shaper",
        "user",
        "--runs",
        "3",
    ]);
    let rate = s["loss_rate"].as_f64().unwrap();
    assert!(rate > 0.0 && rate < 1.0, "{s}");
    // Decoding needs every message; a group needs the multicast transport; a bad group is named.
    let dd = d.to_str().unwrap();
    let base = ["distributed", "--model", &m, "--input", &x, "--out", dd];
    one_line_error(
        &eval(
            &[&base[..], &["--transport", "multicast", "--decode", "2"]].concat(),
            None,
        ),
        "--decode needs --transport tcp",
    );
    one_line_error(
        &eval(
            &[&base[..], &["--group", "239.255.1.1:47000"]].concat(),
            None,
        ),
        "add --transport multicast",
    );
    one_line_error(
        &eval(
            &[
                &base[..],
                &["--transport", "multicast", "--group", "10.1.1.1:5"],
            ]
            .concat(),
            None,
        ),
        "not an IPv4 multicast address",
    );
}
