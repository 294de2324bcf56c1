//! The models against HF transformers (a real peer), and ASTRA's equivalences: the per-device
//! path equals the one-process masked forward; with the identity quantizer, or one device, MPA
//! equals the plain model.

mod common;
use common::{fixture, inference, max_rel_diff};

use astra_quant::{BlockQuantizer, CodebookFile, GroupedCodebook, KMeansConfig};
use astra_train::config::{GPT2Config, ModelConfig, ViTConfig};
use astra_train::engine::{combine, DeviceShare, Payload, RemoteKv};
use astra_train::model::Model;
use astra_train::models::{Astra, ClsMode, DevicePartition, GroupedVq, LinkLoss, VqConfig};
use tch::{Device, Kind, Tensor};

#[test]
fn parity_with_transformers_and_hf_cache() {
    let dir = fixture("make_hf_models.py");
    let d = dir.path();
    for (name, input, logits) in [
        ("vit", "vit_input.npy", "vit_logits.npy"),
        ("gpt2", "gpt2_input.npy", "gpt2_logits.npy"),
    ] {
        let (model, report) = Model::load(d.join(name).to_str().unwrap(), Device::Cpu).unwrap();
        assert!(
            report.fresh.is_empty(),
            "{name}: not loaded {:?}",
            report.fresh
        );
        let x = Tensor::read_npy(d.join(input)).unwrap();
        let want = Tensor::read_npy(d.join(logits)).unwrap();
        let got = tch::no_grad(|| model.forward(&x)).unwrap();
        assert_eq!(got.size(), want.size(), "{name}");
        let rel = max_rel_diff(&got, &want);
        assert!(rel < 1e-4, "{name}: max relative difference {rel}");
    }
    // A larger image than the checkpoint's: position embeddings resized (4×4 → 6×6 grid).
    let big = d.join("vit48");
    std::fs::create_dir_all(&big).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("vit/config.json")).unwrap()).unwrap();
    cfg["image_size"] = serde_json::json!(48);
    std::fs::write(big.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        d.join("vit/model.safetensors"),
        big.join("model.safetensors"),
    )
    .unwrap();
    let (model, report) = Model::load(big.to_str().unwrap(), Device::Cpu).unwrap();
    assert_eq!(
        report.interpolated,
        vec!["vit.embeddings.position_embeddings".to_string()]
    );
    let y =
        tch::no_grad(|| model.forward(&Tensor::randn([1, 3, 48, 48], (Kind::Float, Device::Cpu))))
            .unwrap();
    assert_eq!(y.size(), vec![1, 5]);

    // The same ViT through an HF cache folder, offline.
    std::env::set_var("HF_HOME", d.join("hf_home"));
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let (model, _) = Model::load("tiny/vit", Device::Cpu).unwrap();
    let x = Tensor::read_npy(d.join("vit_input.npy")).unwrap();
    let rel = max_rel_diff(
        &tch::no_grad(|| model.forward(&x)).unwrap(),
        &Tensor::read_npy(d.join("vit_logits.npy")).unwrap(),
    );
    assert!(rel < 1e-4, "cache: {rel}");
}

fn tiny_vit() -> Model {
    tch::manual_seed(1);
    let cfg = ViTConfig {
        image_size: 24,
        patch_size: 4,
        ..ViTConfig::vit_base_patch16_224(7)
    };
    let cfg = ViTConfig {
        hidden_size: 32,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        intermediate_size: 64,
        ..cfg
    };
    Model::new(ModelConfig::ViT(cfg), Device::Cpu).unwrap()
}

fn tiny_gpt2() -> Model {
    tch::manual_seed(2);
    let cfg = GPT2Config {
        vocab_size: 50,
        n_positions: 40,
        n_embd: 32,
        n_layer: 3,
        n_head: 4,
        ..GPT2Config::gpt2_small()
    };
    Model::new(ModelConfig::GPT2(cfg), Device::Cpu).unwrap()
}

/// Codebooks fitted (astra-quant k-means) to random rows: good enough to make X̂ ≠ X.
fn quantizers(layers: usize, d: usize, groups: usize) -> Vec<GroupedVq> {
    let rows = astra_quant::bench::gaussian_mixture(512, d, 8, 3) * 0.5;
    let (cb, _) = GroupedCodebook::fit(
        rows.view(),
        groups,
        &KMeansConfig {
            iters: 5,
            ..KMeansConfig::new(16)
        },
    )
    .unwrap();
    let file = CodebookFile {
        blocks: (0..layers)
            .map(|_| BlockQuantizer {
                usage: None,
                codebook: cb.clone(),
                noise: None,
            })
            .collect(),
        extra: Default::default(),
    };
    file.blocks
        .iter()
        .map(|b| GroupedVq::from_quantizer(b, VqConfig::default(), Device::Cpu))
        .collect()
}

#[test]
fn vit_equivalences() {
    let m = tiny_vit();
    let images = Tensor::randn([2, 3, 24, 24], (Kind::Float, Device::Cpu));
    let plain = tch::no_grad(|| m.forward(&images)).unwrap();
    for n in [1usize, 3, 5] {
        let p = DevicePartition::contiguous(36, n).unwrap();
        for cls in [ClsMode::Distributed, ClsMode::Single] {
            let astra = tch::no_grad(|| {
                m.forward_astra(
                    &images,
                    Astra {
                        partition: &p,
                        cls,
                        vq: None,
                        train: false,
                        link_loss: None,
                    },
                )
            })
            .unwrap();
            // Identity quantizer: every query sees every content token exactly once, in full
            // precision, and one CLS copy (all copies stay identical), so MPA is the plain model.
            // A single CLS is seen by device 0's tokens only (it is never sent): equal for N = 1.
            if n == 1 || cls == ClsMode::Distributed {
                assert!(max_rel_diff(&astra.logits, &plain) < 1e-5, "n={n} {cls:?}");
            }
            let mut vq = quantizers(3, 32, 4);
            let masked = tch::no_grad(|| {
                m.forward_astra(
                    &images,
                    Astra {
                        partition: &p,
                        cls,
                        vq: Some(&mut vq),
                        train: false,
                        link_loss: None,
                    },
                )
            })
            .unwrap();
            let per_device = tch::no_grad(|| {
                m.forward_per_device(
                    &images,
                    Astra {
                        partition: &p,
                        cls,
                        vq: Some(&mut vq),
                        train: false,
                        link_loss: None,
                    },
                )
            })
            .unwrap();
            let rel = max_rel_diff(&per_device, &masked.logits);
            assert!(rel < 1e-5, "n={n} {cls:?}: per-device vs masked {rel}");
            if n > 1 {
                assert!(
                    max_rel_diff(&masked.logits, &plain) > 1e-4,
                    "quantization changed nothing"
                );
            }
        }
    }
    // Uneven and random partitions too.
    let mut vq = quantizers(3, 32, 2);
    for p in [
        DevicePartition::sizes(&[20, 1, 15]).unwrap(),
        DevicePartition::random(36, 4, 9).unwrap(),
    ] {
        let a = Astra {
            partition: &p,
            cls: ClsMode::Distributed,
            vq: Some(&mut vq),
            train: false,
            link_loss: None,
        };
        let masked = tch::no_grad(|| m.forward_astra(&images, a)).unwrap();
        let a = Astra {
            partition: &p,
            cls: ClsMode::Distributed,
            vq: Some(&mut vq),
            train: false,
            link_loss: None,
        };
        let per = tch::no_grad(|| m.forward_per_device(&images, a)).unwrap();
        assert!(max_rel_diff(&per, &masked.logits) < 1e-5);
    }
}

#[test]
fn gpt2_equivalences() {
    let m = tiny_gpt2();
    let ids = Tensor::randint(50, [2, 17], (Kind::Int64, Device::Cpu));
    let plain = tch::no_grad(|| m.forward(&ids)).unwrap();
    for n in [1usize, 2, 4] {
        let p = DevicePartition::contiguous(17, n).unwrap();
        let astra = tch::no_grad(|| m.forward_astra(&ids, inference(&p, None))).unwrap();
        assert!(
            max_rel_diff(&astra.logits, &plain) < 1e-5,
            "identity quantizer, n={n}"
        );
        let mut vq = quantizers(3, 32, 8);
        let masked = tch::no_grad(|| m.forward_astra(&ids, inference(&p, Some(&mut vq)))).unwrap();
        let per =
            tch::no_grad(|| m.forward_per_device(&ids, inference(&p, Some(&mut vq)))).unwrap();
        assert!(max_rel_diff(&per, &masked.logits) < 1e-5, "n={n}");
        // The first device's tokens see no remote token: their logits are the plain model's.
        let first = p.tokens_of(0).len() as i64;
        assert!(
            max_rel_diff(
                &masked.logits.narrow(1, 0, first),
                &plain.narrow(1, 0, first)
            ) < 1e-5
        );
    }
    // Uneven and random partitions: a causal device's sources are the devices holding an earlier
    // token; the direct and the table paths both equal the mask.
    let mut vq = quantizers(3, 32, 8);
    for p in [
        DevicePartition::sizes(&[9, 1, 7]).unwrap(),
        DevicePartition::random(17, 3, 5).unwrap(),
    ] {
        let masked = tch::no_grad(|| m.forward_astra(&ids, inference(&p, Some(&mut vq)))).unwrap();
        let per =
            tch::no_grad(|| m.forward_per_device(&ids, inference(&p, Some(&mut vq)))).unwrap();
        let fast =
            tch::no_grad(|| m.forward_per_device_fast(&ids, inference(&p, Some(&mut vq)))).unwrap();
        assert!(max_rel_diff(&per, &masked.logits) < 1e-5, "{p:?}");
        assert!(max_rel_diff(&fast, &masked.logits) < 1e-5, "{p:?} fast");
    }
}

/// N devices exchanging in memory through `block_partial`, where `lost(block, receiver, source)`
/// says which index messages never arrived; the combined logits.
fn run_with_losses(
    m: &Model,
    input: &Tensor,
    p: &DevicePartition,
    cls: ClsMode,
    vq: &[GroupedVq],
    lost: &dyn Fn(usize, u32, u32) -> bool,
) -> Tensor {
    run_engines(m, input, p, cls, vq, true, lost).0
}

/// N engines in memory (per-codeword tables), attending to distinct remote codewords where they
/// can or (`distinct` false) to every remote token, with the messages `lost` says never
/// arrived; the combined logits and how many (device, block) steps attended to fewer remote keys
/// than remote tokens (each step's count checked: its distinct codewords, else every token).
fn run_engines(
    m: &Model,
    input: &Tensor,
    p: &DevicePartition,
    cls: ClsMode,
    vq: &[GroupedVq],
    distinct: bool,
    lost: &dyn Fn(usize, u32, u32) -> bool,
) -> (Tensor, usize) {
    let shares: Vec<DeviceShare> = (0..p.devices())
        .map(|d| {
            let model = m.astra_model();
            let mut s =
                DeviceShare::new(model, p.clone(), d, cls, vq, RemoteKv::Tables, Device::Cpu)
                    .unwrap();
            s.distinct_codewords = distinct;
            s
        })
        .collect();
    let mut local: Vec<Tensor> = shares.iter().map(|s| s.start(input).unwrap()).collect();
    let mut fewer = 0;
    for l in 0..m.layers() as usize {
        let sent: Vec<Payload> = shares
            .iter()
            .zip(&local)
            .map(|(s, x)| s.outgoing(l, x))
            .collect();
        local = shares
            .iter()
            .zip(&local)
            .map(|(s, x)| {
                let got: Vec<Option<&Payload>> = s
                    .sources
                    .iter()
                    .map(|&e| (!lost(l, s.rank as u32, e)).then(|| &sent[e as usize]))
                    .collect();
                let out = s.block_partial(l, x, &got);
                let (tokens, distinct_ids) = remote_tokens_and_codewords(&got);
                if out.remote_keys < tokens {
                    assert_eq!(out.remote_keys, distinct_ids, "block {l}, rank {}", s.rank);
                    fewer += 1;
                } else {
                    assert_eq!(out.remote_keys, tokens, "block {l}, rank {}", s.rank);
                }
                out.states
            })
            .collect();
    }
    let parts: Vec<Tensor> = shares
        .iter()
        .zip(&local)
        .filter_map(|(s, x)| s.finish(x, false))
        .collect();
    (combine(m.astra_model(), p, &parts), fewer)
}

/// The remote tokens among the payloads that arrived, and the distinct indices they carry (all
/// batch items together, as a block step on distinct codewords counts them).
fn remote_tokens_and_codewords(got: &[Option<&Payload>]) -> (i64, i64) {
    let tokens = got.iter().flatten().map(|p| p.tensor().size()[1]).sum();
    let ids: std::collections::BTreeSet<i64> = got
        .iter()
        .flatten()
        .flat_map(|p| match p {
            Payload::Indices(t) => Vec::<i64>::try_from(t.reshape([-1])).unwrap(),
            Payload::Embeddings(_) => vec![],
        })
        .collect();
    (tokens, ids.len() as i64)
}

/// Attending to each distinct remote codeword once, its score raised by the log of how many
/// remote tokens chose it, equals attending to every remote token: G = 1 and 16 codewords, so
/// many remote tokens share one; the ViT (bidirectional, DCT), GPT-2 on contiguous shares (every
/// remote token precedes every own one) and on a random partition (where some do not: the
/// engine attends to every token there). All equal the masked formulation.
#[test]
fn distinct_codewords_equal_every_remote_token() {
    let (vit, gpt2) = (tiny_vit(), tiny_gpt2());
    let images = Tensor::randn([2, 3, 24, 24], (Kind::Float, Device::Cpu));
    let ids = Tensor::randint(50, [2, 17], (Kind::Int64, Device::Cpu));
    let cases = [
        (
            &vit,
            &images,
            DevicePartition::contiguous(36, 3).unwrap(),
            ClsMode::Distributed,
            true,
        ),
        (
            &gpt2,
            &ids,
            DevicePartition::contiguous(17, 3).unwrap(),
            ClsMode::Single,
            true,
        ),
        (
            &gpt2,
            &ids,
            DevicePartition::random(17, 3, 5).unwrap(),
            ClsMode::Single,
            false,
        ),
    ];
    for (m, input, p, cls, applies) in cases {
        let mut vq = quantizers(3, 32, 1);
        let a = Astra {
            partition: &p,
            cls,
            vq: Some(&mut vq),
            train: false,
            link_loss: None,
        };
        let masked = tch::no_grad(|| m.forward_astra(input, a)).unwrap().logits;
        let (distinct, fewer) =
            tch::no_grad(|| run_engines(m, input, &p, cls, &vq, true, &|_, _, _| false));
        let (every, none) =
            tch::no_grad(|| run_engines(m, input, &p, cls, &vq, false, &|_, _, _| false));
        assert_eq!(none, 0, "switched off");
        assert_eq!(
            fewer > 0,
            applies,
            "{p:?}: {fewer} steps on distinct codewords"
        );
        assert!(max_rel_diff(&every, &masked) < 1e-5, "{p:?}");
        let rel = max_rel_diff(&distinct, &masked);
        assert!(rel < 1e-5, "{p:?}: distinct codewords vs the mask {rel}");
    }
}

/// A lossy transport's receiver leaves a lost source's tokens out: with every message lost that
/// equals the masked formulation with every remote token's indices lost (a different code path:
/// one mask over all keys); with none lost, the ordinary per-device path; a GPT-2 device missing
/// one source in one block equals its block under a mask that hides exactly that source.
#[test]
fn lost_index_messages_are_masked_out() {
    for (m, input, cls, d) in [
        (
            tiny_vit(),
            Tensor::randn([2, 3, 24, 24], (Kind::Float, Device::Cpu)),
            ClsMode::Distributed,
            32,
        ),
        (
            tiny_gpt2(),
            Tensor::randint(50, [2, 17], (Kind::Int64, Device::Cpu)),
            ClsMode::Single,
            32,
        ),
    ] {
        let t = m.content_tokens(&input) as usize;
        let p = DevicePartition::contiguous(t, 3).unwrap();
        let mut vq = quantizers(3, d, 4);
        let astra = |vq: &mut [GroupedVq], loss| {
            let a = Astra {
                partition: &p,
                cls,
                vq: Some(vq),
                train: false,
                link_loss: loss,
            };
            tch::no_grad(|| m.forward_astra(&input, a)).unwrap().logits
        };
        let all_lost = astra(&mut vq, Some(LinkLoss { p: 1.0, seed: 0 }));
        let none_lost = astra(&mut vq, None);
        let ours = tch::no_grad(|| run_with_losses(&m, &input, &p, cls, &vq, &|_, _, _| true));
        assert!(max_rel_diff(&ours, &all_lost) < 1e-5, "all lost");
        let ours = tch::no_grad(|| run_with_losses(&m, &input, &p, cls, &vq, &|_, _, _| false));
        assert!(max_rel_diff(&ours, &none_lost) < 1e-5, "none lost");
        // One message lost changes the result (the test would notice a path that ignores it).
        let one = tch::no_grad(|| {
            run_with_losses(&m, &input, &p, cls, &vq, &|l, r, s| (l, r, s) == (1, 2, 0))
        });
        assert!(
            max_rel_diff(&one, &none_lost) > 1e-5,
            "one lost message changed nothing"
        );
    }
    // GPT-2, device 2 without source 0 in block 1: the block under an explicit mask that hides
    // source 0's keys (the model's masked attention), against leaving them out.
    let m = tiny_gpt2();
    let ids = Tensor::randint(50, [2, 17], (Kind::Int64, Device::Cpu));
    let p = DevicePartition::contiguous(17, 3).unwrap();
    let vq = quantizers(3, 32, 4);
    let model = m.astra_model();
    let shares: Vec<DeviceShare> = (0..3)
        .map(|d| {
            DeviceShare::new(
                model,
                p.clone(),
                d,
                ClsMode::Single,
                &vq,
                RemoteKv::Decode,
                Device::Cpu,
            )
            .unwrap()
        })
        .collect();
    tch::no_grad(|| {
        let x: Vec<Tensor> = shares.iter().map(|s| s.start(&ids).unwrap()).collect();
        let sent: Vec<Payload> = shares
            .iter()
            .zip(&x)
            .map(|(s, x)| s.outgoing(1, x))
            .collect();
        let dev = &shares[2];
        assert_eq!(dev.sources, vec![0, 1]);
        let partial = dev.block_partial(1, &x[2], &[None, Some(&sent[1])]).states;
        let all: Vec<&Payload> = vec![&sent[0], &sent[1]];
        let expanded = dev.expand(1, &all, Kind::Float);
        let mine =
            Tensor::from_slice(&p.tokens_of(2).iter().map(|&i| i as i64).collect::<Vec<_>>());
        let remote: Vec<i64> = [0, 1]
            .iter()
            .flat_map(|&e| p.tokens_of(e))
            .map(|i| i as i64)
            .collect();
        let remote = Tensor::from_slice(&remote);
        let keys = Tensor::cat(&[&mine, &remote], 0);
        let from_0 = p.tokens_of(0).len() as i64;
        let visible = keys.view([1, -1]).le_tensor(&mine.view([-1, 1]));
        let hide = Tensor::ones([1, keys.size()[0]], (Kind::Bool, Device::Cpu));
        let _ = hide.narrow(1, mine.size()[0], from_0).fill_(0);
        let mask = visible.logical_and(&hide);
        let at = astra_train::engine::Positions {
            local: &mine,
            remote: &remote,
        };
        let reference = model.block_step(1, &x[2], at, expanded.as_remote(), Some(&mask));
        assert!(max_rel_diff(&partial, &reference) < 1e-5);
        let full = dev.block(1, &x[2], &all);
        assert!(max_rel_diff(&partial, &full) > 1e-5);
    });
}

#[test]
fn training_step_updates_codebooks_and_gives_gradients() {
    let m = tiny_vit();
    let images = Tensor::randn([4, 3, 24, 24], (Kind::Float, Device::Cpu));
    let p = DevicePartition::contiguous(36, 4).unwrap();
    let mut vq = quantizers(3, 32, 4);
    let before = vq[0].codebook.copy();
    let out = m
        .forward_astra(
            &images,
            Astra {
                partition: &p,
                cls: ClsMode::Distributed,
                vq: Some(&mut vq),
                train: true,
                link_loss: None,
            },
        )
        .unwrap();
    let loss = out
        .logits
        .cross_entropy_for_logits(&Tensor::from_slice(&[0i64, 1, 2, 3]))
        + out.commitment * 5e-4;
    loss.backward();
    let grads = m
        .vs
        .trainable_variables()
        .iter()
        .filter(|v| v.grad().defined() && v.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0)
        .count();
    assert_eq!(
        grads,
        m.vs.trainable_variables().len(),
        "every parameter gets a gradient through the STE"
    );
    assert!(
        max_rel_diff(&vq[0].codebook, &before) > 0.0,
        "EMA moved the codebook"
    );
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, r#"{"model_type": "vit", "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}"#).unwrap();
    let e = ModelConfig::load(&cfg).unwrap_err().to_string();
    assert!(e.contains("num_hidden_layers"), "{e}");
    std::fs::write(&cfg, r#"{"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64, "image_size": 30, "patch_size": 8}"#).unwrap();
    let e = ModelConfig::load(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("patch_size") && e.contains("does not divide image_size 30"),
        "{e}"
    );
    // A checkpoint whose weight has the wrong shape.
    let m = tiny_vit();
    let bad = dir.path().join("model.safetensors");
    let mut tensors: Vec<(String, Tensor)> = m.vs.variables().into_iter().collect();
    for (n, t) in tensors.iter_mut() {
        if n == "classifier.weight" {
            *t = Tensor::zeros([3, 32], (Kind::Float, Device::Cpu));
        }
    }
    Tensor::write_safetensors(&tensors, &bad).unwrap();
    let e = astra_train::weights::load_safetensors(&m.vs, &bad, &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("weight classifier.weight: shape [3, 32]"), "{e}");
    // Codebooks of the wrong width or depth.
    let cb = GroupedCodebook::from_flat(1, 2, 16, vec![0.0; 32]).unwrap();
    let file = CodebookFile {
        blocks: vec![
            BlockQuantizer {
                usage: None,
                codebook: cb,
                noise: None
            };
            3
        ],
        extra: Default::default(),
    };
    let e = astra_train::models::vq::check_codebooks(&file, 3, 32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("D = 16") && e.contains("32"), "{e}");
    let e = astra_train::models::vq::check_codebooks(&file, 12, 16)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 blocks") && e.contains("12"), "{e}");
    let e = m
        .forward(&Tensor::zeros([1, 3, 32, 32], (Kind::Float, Device::Cpu)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[1, 3, 32, 32]") && e.contains("expects [B, 3, 24, 24]"),
        "{e}"
    );
}

/// The fused loss's inputs: `final_states` through `lm_head`'s norm and matrix give the logits of
/// `forward` (plain) and `forward_astra` (with quantizers, the same commitment); a ViT has no
/// language-model head and says so.
#[test]
fn lm_head_parts_and_final_states_give_the_forward_logits() {
    let m = tiny_gpt2();
    let lm = m.astra_model();
    let head = lm.lm_head().expect("GPT-2 has a language-model head");
    let logits = |states: &Tensor| head.norm.forward(states).matmul(&head.weight.tr());
    let ids = Tensor::randint(50, [2, 17], (Kind::Int64, Device::Cpu));
    let p = DevicePartition::contiguous(17, 4).unwrap();
    tch::no_grad(|| {
        let (x, c) = lm.final_states(&ids, None).unwrap();
        assert!(c.is_none());
        assert!(max_rel_diff(&logits(&x), &m.forward(&ids).unwrap()) < 1e-6);
        let (mut q1, mut q2) = (quantizers(3, 32, 8), quantizers(3, 32, 8));
        let (x, c) = lm
            .final_states(&ids, Some(inference(&p, Some(&mut q1))))
            .unwrap();
        let want = m.forward_astra(&ids, inference(&p, Some(&mut q2))).unwrap();
        assert!(max_rel_diff(&logits(&x), &want.logits) < 1e-6);
        assert!(c.unwrap().equal(&want.commitment));
    });
    let vit = tiny_vit();
    assert!(vit.astra_model().lm_head().is_none());
    let err = vit
        .astra_model()
        .final_states(
            &Tensor::zeros([1, 3, 8, 8], (Kind::Float, Device::Cpu)),
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("no language-model head"), "{err}");
}
