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
        assert!(
            last.contains(want) && last.contains("block"),
            "{fault}: {e}"
        );
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
            .args(["worker", "--session", "right-key", "--timeout-ms", "3000"])
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
            let key = b"wrong-key";
            let mut p = (key.len() as u32).to_le_bytes().to_vec();
            p.extend_from_slice(key);
            p.extend_from_slice(&u32::MAX.to_le_bytes());
            let mut f = 0x4153_5452u32.to_le_bytes().to_vec();
            f.push(1);
            f.extend_from_slice(&(p.len() as u32).to_le_bytes());
            f.extend_from_slice(&p);
            s.write_all(&f).unwrap();
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
