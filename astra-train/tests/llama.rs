//! Llama-family models against HF transformers (tiny random Llama, Qwen2 and Mistral checkpoints:
//! GQA, llama3 and linear rope scaling, tied heads, biases, a sharded and a bf16 checkpoint), their
//! export back to a folder transformers loads, and ASTRA's equivalences with key/value codebooks:
//! masked ≡ per-device ≡ per-device with direct lookup, and with the identity quantizer ≡ plain.

mod common;
use common::{fixture, inference, max_rel_diff, python};

use std::process::Command;

use astra_quant::{BlockQuantizer, GroupedCodebook, KMeansConfig};
use astra_train::config::{LlamaConfig, LlamaFamily, ModelConfig, RopeScaling};
use astra_train::model::Model;
use astra_train::models::{Astra, ClsMode, DevicePartition, GroupedVq, VqConfig};
use tch::{Device, Kind, Tensor};

const VARIANTS: [&str; 5] = [
    "llama-gqa-llama3",
    "llama-linear-tied-bias",
    "qwen2",
    "mistral",
    "llama-bf16",
];

#[test]
fn parity_with_transformers_and_export_back() {
    let dir = fixture("make_llama_models.py");
    let d = dir.path();
    let ids = Tensor::read_npy(d.join("ids.npy")).unwrap();
    for name in VARIANTS {
        let (model, report) = Model::load(d.join(name).to_str().unwrap(), Device::Cpu).unwrap();
        assert!(
            report.fresh.is_empty(),
            "{name}: not loaded {:?}",
            report.fresh
        );
        assert!(
            report.unused.is_empty(),
            "{name}: unused {:?}",
            report.unused
        );
        let want = Tensor::read_npy(d.join(format!("{name}_logits.npy"))).unwrap();
        let got = tch::no_grad(|| model.forward(&ids)).unwrap();
        assert_eq!(got.size(), want.size(), "{name}");
        let rel = max_rel_diff(&got, &want);
        assert!(rel < 1e-4, "{name}: max relative difference {rel}");
    }
    // Mistral's window: a longer sequence is refused in one line, not silently mis-attended.
    let (mistral, _) = Model::load(d.join("mistral").to_str().unwrap(), Device::Cpu).unwrap();
    let long = Tensor::zeros([1, 33], (Kind::Int64, Device::Cpu));
    let e = mistral.forward(&long).unwrap_err().to_string();
    assert!(e.contains("sliding window of 32"), "{e}");

    // Export (our save) of the llama3 GQA model: transformers loads it and agrees.
    let (model, _) =
        Model::load(d.join("llama-gqa-llama3").to_str().unwrap(), Device::Cpu).unwrap();
    let out = d.join("exported");
    astra_train::export::export(d.join("llama-gqa-llama3").to_str().unwrap(), &out).unwrap();
    let ours = tch::no_grad(|| model.forward(&ids)).unwrap();
    ours.write_npy(d.join("ours.npy")).unwrap();
    let check = r#"
import sys, numpy as np, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    got = m(input_ids=ids).logits.numpy()
want = np.load(sys.argv[3])
rel = np.abs(got - want).max() / np.abs(want).max()
assert rel < 1e-4, rel
print(type(m).__name__)
"#;
    let o = Command::new(python())
        .args(["-c", check])
        .arg(&out)
        .arg(d.join("ids.npy"))
        .arg(d.join("ours.npy"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "LlamaForCausalLM"
    );
}

#[test]
fn configs_of_both_transformers_generations_parse_alike() {
    let v4 = serde_json::json!({
        "model_type": "llama", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    });
    let mut v5 = v4.clone();
    v5.as_object_mut().unwrap().remove("rope_theta");
    v5.as_object_mut().unwrap().remove("rope_scaling");
    v5["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "rope_theta": 500000.0,
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192});
    let (a, b) = (
        ModelConfig::from_value(v4).unwrap(),
        ModelConfig::from_value(v5).unwrap(),
    );
    assert_eq!(a, b);
    let ModelConfig::Llama(c) = &a else {
        panic!("{a:?}")
    };
    assert_eq!(c.rope_theta, 500000.0);
    assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    // Our config.json reads back as itself.
    assert_eq!(ModelConfig::from_value(a.to_value()).unwrap(), a);
    for (edit, needle) in [
        (
            serde_json::json!({"model_type": "bert"}),
            "model_type: 'bert'",
        ),
        (
            serde_json::json!({"num_key_value_heads": 3}),
            "num_key_value_heads",
        ),
        (serde_json::json!({"hidden_act": "gelu"}), "hidden_act"),
        (
            serde_json::json!({"rope_scaling": {"type": "yarn", "factor": 2.0}}),
            "yarn",
        ),
    ] {
        let mut v = b.to_value();
        for (k, x) in edit.as_object().unwrap() {
            v[k] = x.clone();
        }
        if v.get("rope_parameters").is_some() || edit.get("rope_scaling").is_some() {
            v.as_object_mut().unwrap().remove("rope_parameters");
        }
        let e = ModelConfig::from_value(v).unwrap_err();
        assert!(e.contains(needle) && !e.contains('\n'), "{e}");
    }
}

fn tiny_llama(family: LlamaFamily, kv_heads: i64) -> Model {
    tch::manual_seed(3);
    let cfg = LlamaConfig {
        family,
        ..LlamaConfig::scratch(60, 32, 3, 4, kv_heads, 48, 64)
    };
    Model::new(ModelConfig::Llama(cfg), Device::Cpu).unwrap()
}

/// Key and value codebooks (2 per block) fitted to the model's own keys/values, so X̂ ≠ X.
fn kv_quantizers(m: &Model, ids: &Tensor, groups: usize) -> Vec<GroupedVq> {
    let streams = tch::no_grad(|| m.block_inputs(ids)).unwrap();
    assert_eq!(streams.len() as i64, m.quantizers());
    streams
        .iter()
        .map(|s| {
            let w = s.size()[2];
            let flat = Vec::<f32>::try_from(s.reshape([-1])).unwrap();
            let rows = ndarray::Array2::from_shape_vec((flat.len() / w as usize, w as usize), flat)
                .unwrap();
            let (cb, _) = GroupedCodebook::fit(
                rows.view(),
                groups,
                &KMeansConfig {
                    iters: 5,
                    ..KMeansConfig::new(8)
                },
            )
            .unwrap();
            let b = BlockQuantizer {
                usage: None,
                codebook: cb,
                noise: None,
            };
            GroupedVq::from_quantizer(&b, VqConfig::default(), Device::Cpu)
        })
        .collect()
}

#[test]
fn llama_astra_equivalences() {
    for (family, kv_heads) in [(LlamaFamily::Llama, 2), (LlamaFamily::Qwen2, 4)] {
        let m = tiny_llama(family, kv_heads);
        let ids = Tensor::randint(60, [2, 19], (Kind::Int64, Device::Cpu));
        let plain = tch::no_grad(|| m.forward(&ids)).unwrap();
        let mut vq = kv_quantizers(&m, &ids, 2);
        for p in [
            DevicePartition::contiguous(19, 1).unwrap(),
            DevicePartition::contiguous(19, 4).unwrap(),
            DevicePartition::sizes(&[3, 9, 7]).unwrap(),
        ] {
            let n = p.devices();
            // The identity quantizer: every query sees each earlier token once, exactly.
            let id = tch::no_grad(|| m.forward_astra(&ids, inference(&p, None))).unwrap();
            assert!(max_rel_diff(&id.logits, &plain) < 1e-5, "identity, n={n}");
            let unq = tch::no_grad(|| m.forward_per_device(&ids, inference(&p, None))).unwrap();
            assert!(
                max_rel_diff(&unq, &plain) < 1e-5,
                "per-device unquantized, n={n}"
            );

            let masked =
                tch::no_grad(|| m.forward_astra(&ids, inference(&p, Some(&mut vq)))).unwrap();
            let per =
                tch::no_grad(|| m.forward_per_device(&ids, inference(&p, Some(&mut vq)))).unwrap();
            let fast =
                tch::no_grad(|| m.forward_per_device_fast(&ids, inference(&p, Some(&mut vq))))
                    .unwrap();
            // Keys rotated at the receiver (per-device) ≡ rotated where computed (masked).
            let rel = max_rel_diff(&per, &masked.logits);
            assert!(rel < 1e-5, "{family:?} n={n}: per-device vs masked {rel}");
            assert!(max_rel_diff(&fast, &masked.logits) < 1e-5, "fast, n={n}");
            if n > 1 {
                assert!(
                    max_rel_diff(&masked.logits, &plain) > 1e-4,
                    "quantization changed nothing"
                );
            } else {
                assert!(max_rel_diff(&masked.logits, &plain) < 1e-5, "one device");
            }
        }
    }
}

#[test]
fn llama_astra_trains_its_key_value_codebooks() {
    let m = tiny_llama(LlamaFamily::Llama, 2);
    let ids = Tensor::randint(60, [2, 16], (Kind::Int64, Device::Cpu));
    let mut vq = kv_quantizers(&m, &ids, 2);
    let before: Vec<Tensor> = vq.iter().map(|q| q.codebook.copy()).collect();
    let p = DevicePartition::contiguous(16, 4).unwrap();
    let out = m
        .forward_astra(
            &ids,
            Astra {
                partition: &p,
                cls: ClsMode::Single,
                vq: Some(&mut vq),
                train: true,
                link_loss: None,
            },
        )
        .unwrap();
    let loss = out.logits.mean(Kind::Float) + &out.commitment;
    loss.backward();
    assert!(out.commitment.double_value(&[]) > 0.0);
    // Every block's key and value codebooks moved (EMA), and gradients reach the projections.
    for (q, b) in vq.iter().zip(&before) {
        assert!(max_rel_diff(&q.codebook, b) > 0.0);
    }
    let grads =
        m.vs.variables()
            .into_iter()
            .filter(|(n, _)| n.contains("k_proj") || n.contains("v_proj"))
            .all(|(_, t)| {
                t.grad().defined() && t.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0
            });
    assert!(
        grads,
        "keys/values of quantized tokens carry gradients (STE)"
    );
}
