//! Generation after an ASTRA prefill: greedy output and per-step logits equal transformers'
//! `generate` with one device and with N devices without codebooks; with codebooks, cached
//! decoding equals recomputing the full masked forward for every new token; the cache holds
//! exactly the bytes of the paper's App. G accounting.

mod common;
use common::{fixture, max_rel_diff};

use std::path::Path;

use astra_quant::{BlockQuantizer, GroupedCodebook, KMeansConfig};
use astra_train::config::{GPT2Config, LlamaConfig, ModelConfig};
use astra_train::generate::{generate, Generator, Sampling};
use astra_train::model::Model;
use astra_train::models::{Astra, ClsMode, DevicePartition, GroupedVq, VqConfig};
use tch::{Device, Kind, Tensor};

/// Our greedy decoding from the first 10 tokens of the fixture input against HF's: the same 8
/// tokens, and each step's logits within 1e-4.
fn against_hf(model: &Model, ids: &Tensor, want: &Tensor, want_logits: &Tensor, what: &str) {
    let prompt = ids.narrow(1, 0, 10);
    for devices in [1, 3] {
        let mut steps = Vec::new();
        let mut pick = |logits: &Tensor| {
            steps.push(logits.shallow_clone());
            logits.argmax(-1, false)
        };
        let got = decode_with(model, &prompt, devices, &[], 8, &mut pick);
        assert!(
            got.equal(want),
            "{what}, {devices} device(s): {got:?} vs {want:?}"
        );
        let rel = max_rel_diff(&Tensor::stack(&steps, 0), want_logits);
        assert!(
            rel < 1e-4,
            "{what}, {devices} device(s): step logits differ by {rel}"
        );
    }
}

/// Generator::prefill + step, choosing each token with `pick` (which sees the logits).
fn decode_with(
    model: &Model,
    prompt: &Tensor,
    devices: usize,
    vq: &[GroupedVq],
    new: usize,
    pick: &mut dyn FnMut(&Tensor) -> Tensor,
) -> Tensor {
    let p = DevicePartition::contiguous(prompt.size()[1] as usize, devices).unwrap();
    tch::no_grad(|| {
        let (mut g, mut logits) = Generator::prefill(model, prompt, &p, vq).unwrap();
        let mut out = vec![prompt.shallow_clone()];
        for i in 0..new {
            let next = pick(&logits);
            out.push(next.view([-1, 1]));
            if i + 1 < new {
                logits = g.step(&next).unwrap();
            }
        }
        Tensor::cat(&out, 1)
    })
}

#[test]
fn greedy_decoding_equals_transformers_generate() {
    let hf = fixture("make_hf_models.py");
    let ll = fixture("make_llama_models.py");
    let read = |d: &Path, f: &str| Tensor::read_npy(d.join(f)).unwrap();
    let (gpt2, _) = Model::load(hf.path().join("gpt2").to_str().unwrap(), Device::Cpu).unwrap();
    against_hf(
        &gpt2,
        &read(hf.path(), "gpt2_input.npy"),
        &read(hf.path(), "gpt2_generate.npy"),
        &read(hf.path(), "gpt2_generate_logits.npy"),
        "gpt2",
    );
    for name in ["llama-gqa-llama3", "qwen2", "mistral"] {
        let (m, _) = Model::load(ll.path().join(name).to_str().unwrap(), Device::Cpu).unwrap();
        against_hf(
            &m,
            &read(ll.path(), "ids.npy"),
            &read(ll.path(), &format!("{name}_generate.npy")),
            &read(ll.path(), &format!("{name}_generate_logits.npy")),
            name,
        );
    }
    // The public entry point: greedy by default, the same tokens.
    let ids = read(ll.path(), "ids.npy").narrow(1, 0, 10);
    let (m, _) = Model::load(ll.path().join("qwen2").to_str().unwrap(), Device::Cpu).unwrap();
    let mut seen = 0;
    let got = generate(&m, &ids, 2, &[], 8, &Sampling::greedy(), |_| seen += 1).unwrap();
    assert!(got.equal(&read(ll.path(), "qwen2_generate.npy")));
    assert_eq!(seen, 8);
}

fn tiny(llama: bool) -> Model {
    tch::manual_seed(21);
    let cfg = if llama {
        ModelConfig::Llama(LlamaConfig::scratch(40, 32, 2, 4, 2, 48, 40))
    } else {
        ModelConfig::GPT2(GPT2Config {
            vocab_size: 40,
            n_positions: 40,
            n_embd: 32,
            n_layer: 2,
            n_head: 4,
            ..GPT2Config::gpt2_small()
        })
    };
    Model::new(cfg, Device::Cpu).unwrap()
}

/// Codebooks fitted to the model's own quantized streams (block inputs, or keys and values).
fn fitted(m: &Model, ids: &Tensor, groups: usize) -> Vec<GroupedVq> {
    tch::no_grad(|| m.block_inputs(ids))
        .unwrap()
        .iter()
        .map(|s| {
            let w = s.size()[2] as usize;
            let flat = Vec::<f32>::try_from(s.reshape([-1])).unwrap();
            let rows = ndarray::Array2::from_shape_vec((flat.len() / w, w), flat).unwrap();
            let cfg = KMeansConfig {
                iters: 5,
                ..KMeansConfig::new(8)
            };
            let (cb, _) = GroupedCodebook::fit(rows.view(), groups, &cfg).unwrap();
            let q = BlockQuantizer {
                usage: None,
                codebook: cb,
                noise: None,
            };
            GroupedVq::from_quantizer(&q, VqConfig::default(), Device::Cpu)
        })
        .collect()
}

/// GPT-2 with G = 1 keeps the distinct remote codewords in its cache (8 codewords, 11 remote
/// tokens on the decoding device): each decode step attends to each once, weighed by its count.
#[test]
fn cached_decoding_equals_recomputing_the_masked_forward() {
    for (llama, groups) in [(false, 2), (false, 1), (true, 2)] {
        let m = tiny(llama);
        let ids = Tensor::randint(40, [2, 24], (Kind::Int64, Device::Cpu));
        let mut vq = fitted(&m, &ids, groups);
        let prompt = ids.narrow(1, 0, 16);
        let shares = DevicePartition::contiguous(16, 3).unwrap();
        let sizes: Vec<usize> = (0..3).map(|d| shares.tokens_of(d).len()).collect();
        let mut steps = Vec::new();
        let got = decode_with(&m, &prompt, 3, &vq, 7, &mut |l| {
            steps.push(l.shallow_clone());
            l.argmax(-1, false)
        });
        let (g, _) = tch::no_grad(|| Generator::prefill(&m, &prompt, &shares, &vq)).unwrap();
        let keys = g.remote_keys();
        if !llama && groups == 1 {
            assert!(keys.iter().all(|&k| k <= 8), "distinct codewords: {keys:?}");
            // Per block the U codeword indices at 3 bits (K = 8) and 2 × U counts at 4 bits
            // (at most 11 remote tokens).
            let packed: usize = keys
                .iter()
                .map(|&u| (u as usize * 3).div_ceil(8) + (2 * u as usize * 4).div_ceil(8))
                .sum();
            assert_eq!(g.cache_bytes().remote, packed);
        } else {
            assert_eq!(keys, vec![11; 2], "every remote token");
        }
        // Without a cache: the whole sequence so far, the last device's share grown by the new
        // tokens, through the masked training formulation (remote tokens quantized).
        for (i, step) in steps.iter().enumerate() {
            let len = 16 + i;
            let mut s = sizes.clone();
            s[2] += i;
            let p = DevicePartition::sizes(&s).unwrap();
            let out = tch::no_grad(|| {
                m.forward_astra(
                    &got.narrow(1, 0, len as i64),
                    Astra {
                        partition: &p,
                        cls: ClsMode::Single,
                        vq: Some(&mut vq),
                        train: false,
                        link_loss: None,
                    },
                )
            })
            .unwrap();
            let want = out.logits.select(1, len as i64 - 1);
            let rel = max_rel_diff(step, &want);
            assert!(
                rel < 1e-4,
                "llama={llama} step {i}: cached vs recomputed {rel}"
            );
        }
        // The codebooks matter: without them the continuation's logits differ.
        let mut plain = Vec::new();
        let _ = decode_with(&m, &prompt, 3, &[], 7, &mut |l| {
            plain.push(l.shallow_clone());
            l.argmax(-1, false)
        });
        assert!(max_rel_diff(&steps[0], &plain[0]) > 1e-4, "llama={llama}");
    }
}

#[test]
fn the_cache_holds_app_g_bytes() {
    // Llama: per block, own tokens' keys and values in fp32 (2·n·kv_dim·4 bytes per sequence)
    // and the remote tokens' key and value indices at log2 K bits, packed.
    let m = tiny(true);
    let ids = Tensor::randint(40, [1, 16], (Kind::Int64, Device::Cpu));
    let vq = fitted(&m, &ids, 2); // K = 8: 3 bits
    let p = DevicePartition::contiguous(16, 4).unwrap();
    let (g, _) = tch::no_grad(|| Generator::prefill(&m, &ids, &p, &vq)).unwrap();
    let (blocks, kv_dim, own, remote) = (2, 16, 4, 12);
    let c = g.cache_bytes();
    assert_eq!(c.local, blocks * 2 * own * kv_dim * 4);
    // 12 remote tokens × (2 + 2 groups) indices × 3 bits, per block.
    assert_eq!(c.remote, blocks * (remote * 4 * 3usize).div_ceil(8));
    // Sampling: seeded draws repeat; top-k 1 is greedy.
    let logits = Tensor::randn([3, 40], (Kind::Float, Device::Cpu));
    let s = Sampling {
        temperature: 0.8,
        top_k: Some(1),
        top_p: None,
        seed: 1,
    };
    assert!(s.pick(&logits).equal(&logits.argmax(-1, false)));
    let s = Sampling {
        top_k: None,
        top_p: Some(0.9),
        ..s
    };
    tch::manual_seed(5);
    let a = s.pick(&logits.repeat([50, 1]));
    tch::manual_seed(5);
    let b = s.pick(&logits.repeat([50, 1]));
    assert!(a.equal(&b));
}
