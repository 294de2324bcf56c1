//! `astra-train export` writes folders that Python transformers loads (the Auto classes pick
//! ViTForImageClassification / GPT2LMHeadModel) and that compute our logits; codebooks travel
//! beside the weights; an existing folder is never overwritten.

mod common;
use common::{max_rel_diff, python};

use std::path::Path;
use std::process::Command;

use astra_quant::{BlockQuantizer, CodebookFile, GroupedCodebook, KMeansConfig};
use astra_train::config::{GPT2Config, ModelConfig, ViTConfig};
use astra_train::export::export;
use astra_train::model::Model;
use tch::{Device, Kind, Tensor};

/// Logits transformers computes for `input` from the exported folder, and the class it used.
fn transformers_logits(dir: &Path, input: &Tensor) -> (String, Tensor) {
    let inp = dir.with_extension("input.npy");
    let out = dir.with_extension("logits.npy");
    input.write_npy(&inp).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/load_exported.py");
    let o = Command::new(python())
        .arg(script)
        .arg(dir)
        .arg(&inp)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "transformers failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    (
        String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Tensor::read_npy(&out).unwrap(),
    )
}

fn codebooks(layers: usize, dim: usize) -> CodebookFile {
    let rows = ndarray::Array2::from_shape_fn((64, dim), |(i, j)| ((i * 7 + j * 3) % 11) as f32);
    let cfg = KMeansConfig {
        iters: 3,
        ..KMeansConfig::new(4)
    };
    let (cb, _) = GroupedCodebook::fit(rows.view(), 2, &cfg).unwrap();
    CodebookFile {
        blocks: (0..layers)
            .map(|_| BlockQuantizer {
                usage: None,
                codebook: cb.clone(),
                noise: None,
            })
            .collect(),
        extra: Default::default(),
    }
}

#[test]
fn exported_models_load_in_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    tch::manual_seed(3);
    let vit = Model::new(
        ModelConfig::ViT(ViTConfig {
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 64,
            image_size: 16,
            patch_size: 4,
            num_channels: 3,
            layer_norm_eps: 1e-6,
            ..ViTConfig::vit_base_patch16_224(7)
        }),
        Device::Cpu,
    )
    .unwrap();
    // HF initialises the CLS token and position embeddings to small values; make them count.
    tch::no_grad(|| {
        for (n, v) in vit.vs.variables() {
            if n.contains("cls_token") || n.contains("position_embeddings") {
                v.shallow_clone().copy_(&(Tensor::randn_like(&v) * 0.5));
            }
        }
    });
    let src = tmp.path().join("vit-run-model");
    vit.save(&src).unwrap();
    codebooks(2, 32)
        .save(&src.join("codebooks.safetensors"))
        .unwrap();
    let out = tmp.path().join("vit-hf");
    let e = export(src.to_str().unwrap(), &out).unwrap();
    assert!(e.codebooks && out.join("codebooks.safetensors").exists());
    let images = Tensor::randn([2, 3, 16, 16], (Kind::Float, Device::Cpu));
    let (class, theirs) = transformers_logits(&out, &images);
    assert_eq!(class, "ViTForImageClassification");
    let ours = vit.forward(&images).unwrap();
    assert!(
        max_rel_diff(&ours, &theirs) < 1e-4,
        "{}",
        max_rel_diff(&ours, &theirs)
    );
    // The exported folder reads back here too, and export never overwrites.
    Model::load(out.to_str().unwrap(), Device::Cpu).unwrap();
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let err = export(src.to_str().unwrap(), &out)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(
        before,
        std::fs::read(out.join("model.safetensors")).unwrap()
    );

    let gpt = Model::new(
        ModelConfig::GPT2(GPT2Config {
            vocab_size: 120,
            n_positions: 32,
            n_embd: 32,
            n_layer: 2,
            n_head: 4,
            ..GPT2Config::gpt2_small()
        }),
        Device::Cpu,
    )
    .unwrap();
    let src = tmp.path().join("gpt-model");
    gpt.save(&src).unwrap();
    let out = tmp.path().join("gpt-hf");
    let e = export(src.to_str().unwrap(), &out).unwrap();
    assert!(!e.codebooks);
    let ids = Tensor::randint(120, [2, 12], (Kind::Int64, Device::Cpu));
    let (class, theirs) = transformers_logits(&out, &ids);
    assert_eq!(class, "GPT2LMHeadModel");
    let ours = gpt.forward(&ids).unwrap();
    assert!(
        max_rel_diff(&ours, &theirs) < 1e-4,
        "{}",
        max_rel_diff(&ours, &theirs)
    );

    // Codebooks that do not fit the model are refused before anything is written.
    codebooks(3, 32)
        .save(&src.join("codebooks.safetensors"))
        .unwrap();
    let bad = tmp.path().join("gpt-bad");
    let err = export(src.to_str().unwrap(), &bad)
        .err()
        .unwrap()
        .to_string();
    assert!(!bad.exists() && !err.contains('\n'), "{err}");
}
