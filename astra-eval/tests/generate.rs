//! `astra-eval generate` as users call it: a text prompt through GPT-2 BPE streamed back with its
//! continuation, ids written like HF's generate, N devices without codebooks equal to one, a
//! summary with the cache's bytes, and bad flags named in one line.

use std::process::Command;

mod common;

use astra_train::config::{LlamaConfig, ModelConfig};
use astra_train::model::Model;
use tch::{Device, Tensor};

fn generate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_astra-eval"))
        .arg("generate")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn text_in_text_out_and_ids_like_hf() {
    let dir = tempfile::tempdir().unwrap();
    tch::manual_seed(8);
    let cfg = LlamaConfig {
        tie_word_embeddings: true,
        ..LlamaConfig::scratch(50257, 16, 2, 2, 1, 32, 32)
    };
    let m = dir.path().join("m");
    Model::new(ModelConfig::Llama(cfg), Device::Cpu)
        .unwrap()
        .save(&m)
        .unwrap();
    let m = m.to_str().unwrap();
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let prompt = "The quick brown fox jumps";
    let mut outs = Vec::new();
    for devices in ["1", "3"] {
        let o = generate(&[
            "--model",
            m,
            "--prompt",
            prompt,
            "--max-new-tokens",
            "6",
            "--devices",
            devices,
            "--no-vq",
            "--out",
            &path(&format!("ids{devices}.npy")),
            "--json",
            &path("s.json"),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            text.starts_with(prompt) && text.len() > prompt.len(),
            "{text}"
        );
        outs.push(Tensor::read_npy(path(&format!("ids{devices}.npy"))).unwrap());
    }
    // Over the runtime: two worker processes, links paced in user space; the worker holding the
    // last token decodes. The same tokens and text.
    let o = generate(&[
        "--model",
        m,
        "--prompt",
        prompt,
        "--max-new-tokens",
        "6",
        "--devices",
        "2",
        "--no-vq",
        "--links",
        "1000",
        "--shaper",
        "user",
        "--out",
        &path("net.npy"),
        "--json",
        &path("net.json"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let net = Tensor::read_npy(path("net.npy")).unwrap();
    assert!(net.equal(&outs[0]), "{net:?} vs {:?}", outs[0]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        text.starts_with(prompt) && text.len() > prompt.len(),
        "{text}"
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path("net.json")).unwrap()).unwrap();
    assert!(s["network"].as_str().unwrap().contains("user"), "{s}");
    // 5 prompt tokens + 6 new, int64, the prompt first; 3 devices without codebooks = 1 device.
    assert_eq!(outs[0].size(), vec![1, 11]);
    assert_eq!(outs[0].kind(), tch::Kind::Int64);
    assert!(outs[0].equal(&outs[1]));
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path("s.json")).unwrap()).unwrap();
    assert_eq!(s["devices"], 3);
    assert!(s["time_to_first_token_ms"].as_f64().unwrap() > 0.0);
    // Own tokens 2..: 2 blocks × keys and values × (1 own prompt token + 5 new) × 8 × 4 bytes.
    assert_eq!(s["cache_bytes"]["local"], 2 * 2 * 6 * 8 * 4);

    for (args, needle) in [
        (vec!["--prompt", "x", "--top-p", "2"], "--top-p"),
        (vec!["--prompt", "x", "--top-k", "3"], "--temperature"),
        (
            vec![
                "--prompt",
                "a b c",
                "--devices",
                "2",
                "--max-new-tokens",
                "2",
            ],
            "--no-vq",
        ),
        (
            vec!["--prompt", "a b c", "--max-new-tokens", "40"],
            "positions",
        ),
        (vec!["--prompt", ""], "empty"),
    ] {
        let mut full = vec!["--model", m];
        full.extend(args);
        let o = generate(&full);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle) && err.trim().lines().count() == 1,
            "{err}"
        );
    }
}

/// A Llama checkpoint with its own tokenizer.json: the prompt encoded (BOS included) and the
/// continuation decoded by it, the ids and the text equal to transformers' greedy generate.
#[test]
fn a_models_tokenizer_json_is_used_for_text() {
    let dir = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../astra-train/tests/fixtures/make_llama_models.py");
    let o = Command::new(common::python())
        .arg(script)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d = dir.path();
    let m = d.join("llama-gqa-llama3");
    let want_ids = Tensor::read_npy(d.join("tok_generate.npy")).unwrap();
    let want_text = std::fs::read_to_string(d.join("tok_text.txt")).unwrap();
    for devices in ["1", "2"] {
        let out = d.join(format!("ids{devices}.npy"));
        let o = generate(&[
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "the quick brown fox jumps over",
            "--max-new-tokens",
            "8",
            "--devices",
            devices,
            "--no-vq",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            Tensor::read_npy(&out).unwrap().equal(&want_ids),
            "{devices} device(s)"
        );
        assert_eq!(String::from_utf8_lossy(&o.stdout), want_text);
    }
}
