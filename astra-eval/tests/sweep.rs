//! `astra-eval accuracy` / `perplexity` end to end on generated data and tiny random models: the
//! grid has one row per setting beside the single-device model, VQ off equals the single model
//! (the identity quantizer), random allocations come with FPAR quintiles, the table carries its
//! command, and bad requests are refused with one line.

use std::path::Path;
use std::process::Command;

mod common;
use common::save_codebooks as codebooks;

use astra_train::config::{GPT2Config, ModelConfig, ViTConfig};
use astra_train::model::Model;
use tch::Device;

fn eval(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_astra-eval"))
        .args(args)
        .output()
        .unwrap()
}

fn err(o: std::process::Output) -> String {
    assert!(
        !o.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let e = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert_eq!(e.lines().count(), 1, "not one line: {e}");
    e
}

fn write_idx(dir: &Path, prefix: &str, n: usize) {
    let mut img = Vec::new();
    for v in [2051u32, n as u32, 8, 8] {
        img.extend_from_slice(&v.to_be_bytes());
    }
    img.extend((0..n * 64).map(|i| ((i * 37) % 251) as u8));
    let mut lab = Vec::new();
    for v in [2049u32, n as u32] {
        lab.extend_from_slice(&v.to_be_bytes());
    }
    lab.extend((0..n).map(|i| (i % 10) as u8));
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
}

#[test]
fn accuracy_grid_quintiles_and_bad_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    write_idx(d, "train", 16);
    write_idx(d, "t10k", 40);
    let model = d.join("vit");
    tch::manual_seed(1);
    Model::new(
        ModelConfig::ViT(ViTConfig {
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            image_size: 8,
            patch_size: 2,
            num_channels: 1,
            ..ViTConfig::vit_base_patch16_224(10)
        }),
        Device::Cpu,
    )
    .unwrap()
    .save(&model)
    .unwrap();
    codebooks(&model.join("codebooks.safetensors"), 2, 16, 4);
    let data = format!("mnist:{}", d.display());
    let (json, table) = (d.join("r.json"), d.join("r.md"));
    let o = eval(&[
        "accuracy",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &data,
        "--devices",
        "2,4",
        "--partition",
        "contiguous,allocation",
        "--cls",
        "distributed,single",
        "--vq",
        "on,off",
        "--loss",
        "0,0.5",
        "--batch",
        "4",
        "--json",
        json.to_str().unwrap(),
        "--table",
        table.to_str().unwrap(),
        // The model as its own baseline: the baseline's score must be the single-device row's.
        "--baseline",
        model.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1 + 2 * 2 * 2 * 2 * 2);
    let single = rows[0]["value"].as_f64().unwrap();
    assert_eq!(r["baseline"]["value"].as_f64().unwrap(), single);
    assert_eq!(r["baseline"]["count"], 40);
    for row in &rows[1..] {
        assert_eq!(row["count"], 40);
        // Without VQ and without lost messages, distributed-CLS ASTRA is the plain model.
        if row["vq"] == false && row["loss"] == 0.0 && row["cls"] == "Distributed" {
            assert!(
                (row["value"].as_f64().unwrap() - single).abs() < 1e-9,
                "{row}"
            );
        }
        let q = row["quintiles"].as_array().unwrap();
        if row["partition"] == "Allocation" {
            assert_eq!(q.len(), 5);
            let n: u64 = q.iter().map(|x| x["count"].as_u64().unwrap()).sum();
            assert_eq!(n, 40);
        } else {
            assert!(q.is_empty());
        }
    }
    let md = std::fs::read_to_string(&table).unwrap();
    assert!(
        md.contains("Command (commit")
            && md.contains("by FPAR quintile")
            && md.contains("Δ vs baseline"),
        "{md}"
    );

    // Bad requests: more devices than tokens, ASTRA without codebooks, G that does not match,
    // text metric on images.
    let m = model.to_str().unwrap();
    let e = err(eval(&[
        "accuracy",
        "--model",
        m,
        "--data",
        &data,
        "--devices",
        "17",
    ]));
    assert!(e.contains("17") && e.contains("16 content tokens"), "{e}");
    std::fs::rename(
        model.join("codebooks.safetensors"),
        d.join("cb.safetensors"),
    )
    .unwrap();
    let e = err(eval(&["accuracy", "--model", m, "--data", &data]));
    assert!(e.contains("no codebooks.safetensors"), "{e}");
    let cb = d.join("cb.safetensors");
    let e = err(eval(&[
        "accuracy",
        "--model",
        m,
        "--data",
        &data,
        "--codebooks",
        cb.to_str().unwrap(),
        "--groups",
        "8",
    ]));
    assert!(e.contains("G = 4"), "{e}");
    let e = err(eval(&[
        "perplexity",
        "--model",
        m,
        "--data",
        &data,
        "--vq",
        "off",
    ]));
    assert!(e.contains("astra-eval accuracy"), "{e}");
    // Zero counts are refused, never reported as 0.00 % over nothing.
    for (flag, value, needle) in [
        ("--max-test", "0", "max_test: must be at least 1"),
        ("--batch", "0", "batch: must be at least 1"),
        ("--devices", "99999999999", "99999999999 is not in 1..=16"),
    ] {
        let e = err(eval(&[
            "accuracy", "--model", m, "--data", &data, "--vq", "off", flag, value,
        ]));
        assert!(e.contains(needle), "{flag} {value}: {e}");
    }
}

#[test]
fn perplexity_with_a_stride() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let text: String = (0..200)
        .map(|i| format!("line {i} of the test corpus.\n"))
        .collect();
    let corpus = d.join("c.txt");
    std::fs::write(&corpus, text).unwrap();
    let model = d.join("gpt");
    tch::manual_seed(2);
    Model::new(
        ModelConfig::GPT2(GPT2Config {
            n_positions: 32,
            n_embd: 16,
            n_layer: 2,
            n_head: 2,
            ..GPT2Config::gpt2_small()
        }),
        Device::Cpu,
    )
    .unwrap()
    .save(&model)
    .unwrap();
    let cb = d.join("cb.safetensors");
    codebooks(&cb, 2, 16, 2);
    let json = d.join("p.json");
    let data = format!("text:{}", corpus.display());
    let o = eval(&[
        "perplexity",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &data,
        "--codebooks",
        cb.to_str().unwrap(),
        "--context",
        "32",
        "--stride",
        "16",
        "--devices",
        "1,4",
        "--vq",
        "on,off",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = r["rows"].as_array().unwrap();
    let single = rows[0]["value"].as_f64().unwrap();
    // A random model over a 50,257-token vocabulary: perplexity in the tens of thousands.
    assert!(single > 1e3 && single.is_finite(), "{single}");
    assert!(r["protocol"].as_str().unwrap().contains("every 16"));
    for row in &rows[1..] {
        // One device, or no quantization: the plain model's perplexity.
        if row["devices"] == 1 || row["vq"] == false {
            assert!(
                (row["value"].as_f64().unwrap() / single - 1.0).abs() < 1e-5,
                "{row}"
            );
        }
    }
    let e = err(eval(&[
        "perplexity",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &data,
        "--context",
        "32",
        "--stride",
        "40",
        "--vq",
        "off",
    ]));
    assert!(e.contains("stride"), "{e}");
}
