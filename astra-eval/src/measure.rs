//! `astra-eval profile`: the per-device compute time of every method of ASTRA.md §4, measured on
//! this machine by running each device's share of the work with libtorch (random weights, an
//! L-block, D-wide encoder, fp32). What each method computes per device (t = ⌈T/N⌉ local tokens):
//!
//! - single: the whole model on T tokens;
//! - tp: every token, the block's weights split N ways (Megatron: heads and MLP columns), partial
//!   sums left for the all-reduce;
//! - sp: queries of its t tokens, keys/values of all T (Voltage: the gathered embeddings are
//!   projected locally), attention over T, output and MLP of its t tokens;
//! - bp-ag-nbK / bp-sp-nbK (our reading of DeTransformer): K original blocks computed as sp, the
//!   other L − K blocks attend only among the device's own t tokens;
//! - astra-gG: VQ encode of its t tokens (K-codeword search per group), bit pack, unpack of the
//!   others' indices, codebook lookup of the T − t remote tokens, keys/values of the local and the
//!   reconstructed remote tokens, attention of its t queries over T keys, output and MLP.
//!
//! With `fast`, ASTRA's remote keys/values come from per-codeword tables (G gathers and adds per
//! remote token, see astra-train's fast_kv) instead of LayerNorm + a D × 2D matmul.
//!
//! `arch` picks the model: the bare encoder (default), or a randomly initialised GPT-2 or Llama
//! decoder of the same width and depth (prefill of T tokens). Decoders are causal, so the device
//! timed is the last one, which attends to every earlier token (the one the prefill waits for);
//! Llama's ASTRA sends the indices of its tokens' keys and values (two codebooks per block, of
//! the key/value width) and looks the remote ones up directly. TP and BP exist for the encoder only.
//!
//! Single, SP and ASTRA run the device engine (astra-train's `DeviceShare`) on a bare encoder of
//! ViT blocks (`models::encoder`): the code the runtime's workers run, not a copy of it. TP and BP
//! have no engine mode (sharded weights, blocks attending only locally) and run a minimal block of
//! their own here.
//!
//! Each method is timed `runs` times after `warmup` runs; the median, min and max go to
//! profile.csv, and astra-sim's trace built from the medians to trace.json.

use std::fmt::Write as _;
use std::time::Instant;

use crate::error::Result;
use crate::fail;
use astra_sim::method::{Method, ModelShape};
use astra_sim::profile::ComputeProfile;
use astra_sim::trace::{BlockSplit, Trace};
use tch::{Device, Kind, Tensor};

/// The model `profile` times.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arch {
    /// Bare ViT-style encoder blocks (bidirectional).
    Encoder,
    Gpt2,
    /// Llama with this many key/value heads (grouped-query attention).
    Llama {
        kv_heads: i64,
    },
}

impl Arch {
    /// Quantizers per block: Llama quantizes keys and values, the others the block input.
    pub fn codebooks_per_block(self) -> u32 {
        match self {
            Arch::Llama { .. } => 2,
            _ => 1,
        }
    }

    /// Width of the vectors a codebook quantizes.
    pub fn quantized_width(self, c: &ProfileConfig) -> i64 {
        match self {
            Arch::Llama { kv_heads } => kv_heads * (c.hidden / c.heads),
            _ => c.hidden,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ProfileConfig {
    pub arch: Arch,
    /// Positions of a decoder (the largest T profiled).
    pub max_tokens: i64,
    pub blocks: i64,
    pub hidden: i64,
    pub heads: i64,
    pub mlp: i64,
    pub codewords: i64,
    pub warmup: usize,
    pub runs: usize,
    pub device: Device,
    /// ASTRA's remote keys/values from per-codeword tables (gathers) instead of LN + matmul.
    pub fast: bool,
}

/// Random weights of one block.
struct Weights {
    qkv: Tensor,
    out: Tensor,
    fc1: Tensor,
    fc2: Tensor,
}

pub struct Measurement {
    pub method: Method,
    pub devices: u32,
    pub tokens: u64,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub runs: usize,
}

fn sync(d: Device) {
    if let Device::Cuda(i) = d {
        tch::Cuda::synchronize(i as i64);
    }
}

fn ln(x: &Tensor) -> Tensor {
    x.layer_norm([x.size()[2]], None::<Tensor>, None::<Tensor>, 1e-6, false)
}

fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: i64) -> Tensor {
    let (b, s, d) = q.size3().expect("[B, S, D]");
    let sk = k.size()[1];
    let hd = d / heads;
    let split = |t: &Tensor, n: i64| t.reshape([b, n, heads, hd]).transpose(1, 2);
    Tensor::scaled_dot_product_attention(
        &split(q, s),
        &split(k, sk),
        &split(v, sk),
        None::<Tensor>,
        0.0,
        false,
        None::<f64>,
        false,
    )
    .transpose(1, 2)
    .reshape([b, s, d])
}

/// One device's block: queries from `x` [1, t, D]; keys/values from `kv_src` (None: x itself),
/// weights possibly sharded (TP).
fn block(x: &Tensor, kv_src: Option<&Tensor>, w: &Weights, heads: i64) -> Tensor {
    let d = w.qkv.size()[1] / 3;
    let h = ln(x);
    let q = h.matmul(&w.qkv.narrow(1, 0, d));
    let kv_in = match kv_src {
        Some(s) => ln(s),
        None => h.shallow_clone(),
    };
    let kv = kv_in.matmul(&w.qkv.narrow(1, d, 2 * d));
    let (k, v) = (kv.narrow(2, 0, d), kv.narrow(2, d, d));
    let heads = heads.min(d).max(1);
    let x = x + attention(&q, &k, &v, heads).matmul(&w.out);
    let h = ln(&x).matmul(&w.fc1).gelu("none").matmul(&w.fc2);
    x + h
}

fn weights(c: &ProfileConfig, shard: i64) -> Weights {
    let (d, m) = (c.hidden, c.mlp);
    let opts = (Kind::Float, c.device);
    let dd = d / shard; // TP: this device's heads / columns
    Weights {
        qkv: Tensor::randn([d, 3 * dd], opts) * 0.02,
        out: Tensor::randn([dd, d], opts) * 0.02,
        fc1: Tensor::randn([d, m / shard], opts) * 0.02,
        fc2: Tensor::randn([m / shard, d], opts) * 0.02,
    }
}

/// Runs one device's work for a baseline without an engine mode (TP, BP) once.
fn baseline_work(c: &ProfileConfig, method: Method, n: i64, t: i64, w: &Weights) {
    let local = (t + n - 1) / n;
    let opts = (Kind::Float, c.device);
    match method {
        Method::Tp => {
            let mut x = Tensor::randn([1, t, c.hidden], opts);
            for _ in 0..c.blocks {
                x = block(&x, None, w, c.heads / n);
            }
        }
        Method::BpAg { nb } | Method::BpSp { nb } => {
            let mut x = Tensor::randn([1, local, c.hidden], opts);
            let others = Tensor::randn([1, t - local, c.hidden], opts);
            for l in 0..c.blocks {
                x = if l < nb as i64 {
                    let all = Tensor::cat(&[&x, &others], 1);
                    block(&x, Some(&all), w, c.heads)
                } else {
                    block(&x, None, w, c.heads)
                };
            }
        }
        _ => unreachable!("single, sp and astra run the device engine"),
    }
}

/// The device engine's work for single, SP or ASTRA: device 0 of a contiguous split embeds its
/// tokens and, per block, sends (ASTRA: VQ encode and bit pack), receives the others' tokens (SP:
/// embeddings; ASTRA: packed indices, unpacked) and runs the block on them.
struct EngineWork {
    net: Net,
    vq: Vec<astra_train::models::GroupedVq>,
}

/// The timed model with random weights.
enum Net {
    Encoder {
        encoder: astra_train::models::encoder::Encoder,
        _vs: tch::nn::VarStore,
    },
    Decoder(Box<astra_train::model::Model>),
}

impl Net {
    fn new(c: &ProfileConfig) -> Result<Self> {
        use astra_train::config::{GPT2Config, LlamaConfig, ModelConfig, ViTConfig};
        let vocab = astra_train::data::text::GPT2_VOCAB;
        let config = match c.arch {
            Arch::Encoder => {
                let vs = tch::nn::VarStore::new(c.device);
                let cfg = ViTConfig {
                    hidden_size: c.hidden,
                    num_hidden_layers: c.blocks,
                    num_attention_heads: c.heads,
                    intermediate_size: c.mlp,
                    ..ViTConfig::vit_base_patch16_224(2)
                };
                let encoder = astra_train::models::encoder::Encoder::new(&vs.root(), &cfg)?;
                return Ok(Net::Encoder { encoder, _vs: vs });
            }
            Arch::Gpt2 => ModelConfig::GPT2(GPT2Config {
                vocab_size: vocab,
                n_positions: c.max_tokens,
                n_embd: c.hidden,
                n_layer: c.blocks,
                n_head: c.heads,
                n_inner: Some(c.mlp),
                ..GPT2Config::gpt2_small()
            }),
            Arch::Llama { kv_heads } => ModelConfig::Llama(LlamaConfig::scratch(
                vocab,
                c.hidden,
                c.blocks,
                c.heads,
                kv_heads,
                c.mlp,
                c.max_tokens,
            )),
        };
        let model = astra_train::model::Model::new(config, c.device)?;
        Ok(Net::Decoder(Box::new(model)))
    }

    fn astra(&self) -> &dyn astra_train::engine::AstraModel {
        match self {
            Net::Encoder { encoder, .. } => encoder,
            Net::Decoder(m) => m.astra_model(),
        }
    }

    /// The whole input of `t` tokens: embeddings for the encoder, token ids for a decoder.
    fn input(&self, c: &ProfileConfig, t: i64) -> Tensor {
        match self {
            Net::Encoder { .. } => Tensor::randn([1, t, c.hidden], (Kind::Float, c.device)),
            Net::Decoder(_) => Tensor::randint(1000, [1, t], (Kind::Int64, c.device)),
        }
    }
}

impl EngineWork {
    fn new(c: &ProfileConfig, method: Method) -> Result<Self> {
        let net = Net::new(c)?;
        let vq = match method {
            Method::Astra { groups } => {
                let q = random_quantizer(c, groups as usize)?;
                let count = net.astra().blocks() * net.astra().quantizers_per_block();
                (0..count)
                    .map(|_| {
                        astra_train::models::GroupedVq::from_quantizer(
                            &q,
                            Default::default(),
                            c.device,
                        )
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        Ok(EngineWork { net, vq })
    }

    /// The timed device of a contiguous split of `t` tokens over `n` devices (device 0; for a
    /// causal model the last, which attends to all tokens); its per-codeword tables are built
    /// here, once, as a deployment builds them at load time (not timed).
    fn share(
        &self,
        c: &ProfileConfig,
        n: usize,
        t: usize,
    ) -> Result<astra_train::engine::DeviceShare<'_>> {
        use astra_train::engine::{DeviceShare, RemoteKv};
        let partition = astra_train::models::DevicePartition::contiguous(t, n)?;
        let kv = if c.fast {
            RemoteKv::Tables
        } else {
            RemoteKv::Decode
        };
        let model = self.net.astra();
        let rank = if model.is_causal() { n - 1 } else { 0 };
        Ok(DeviceShare::new(
            model,
            partition,
            rank,
            astra_train::models::ClsMode::Single,
            &self.vq,
            kv,
            c.device,
        )?)
    }

    fn run(
        &self,
        dev: &astra_train::engine::DeviceShare,
        c: &ProfileConfig,
        t: usize,
    ) -> Result<()> {
        use astra_train::engine::Payload;
        let remote = t as i64 - dev.own_tokens();
        let opts = (Kind::Float, c.device);
        let mut local = dev.start(&self.net.input(c, t as i64))?;
        // The others' packed indices as they arrive over the network (ASTRA; ΣG columns per
        // token, every index of log2 K bits), or their embeddings (SP).
        let embeddings = Tensor::randn([1, remote, c.hidden], opts);
        let columns = dev.index_columns(0).len() as i64;
        let bits = astra_quant::bitpack::bits_for(c.codewords as usize);
        let wire = (!self.vq.is_empty())
            .then(|| random_packed(c.codewords, remote * columns, bits))
            .transpose()?;
        for l in 0..c.blocks as usize {
            let received = match &wire {
                Some((packed, count)) => {
                    if let Payload::Indices(mine) = dev.outgoing(l, &local) {
                        let _sent = pack(&mine, bits)?;
                    }
                    let theirs = astra_quant::bitpack::unpack(packed, *count, bits)?;
                    let theirs: Vec<i64> = theirs.iter().map(|&v| v as i64).collect();
                    Payload::Indices(
                        Tensor::from_slice(&theirs)
                            .to_device(c.device)
                            .view([1, remote, columns]),
                    )
                }
                None => Payload::Embeddings(embeddings.shallow_clone()),
            };
            let received: Vec<&Payload> = if remote > 0 { vec![&received] } else { vec![] };
            local = dev.block(l, &local, &received);
        }
        Ok(())
    }
}

/// A random G-group codebook of K codewords for the vectors the model quantizes.
fn random_quantizer(c: &ProfileConfig, groups: usize) -> Result<astra_quant::BlockQuantizer> {
    let sub = c.arch.quantized_width(c) as usize / groups;
    let data = Vec::<f32>::try_from(Tensor::randn(
        [(groups * c.codewords as usize * sub) as i64],
        (Kind::Float, Device::Cpu),
    ))?;
    Ok(astra_quant::BlockQuantizer {
        usage: None,
        codebook: astra_quant::GroupedCodebook::from_flat(groups, c.codewords as usize, sub, data)?,
        noise: None,
    })
}

/// `count` random indices below `k`, bit-packed as the wire carries them, and their count.
fn random_packed(k: i64, count: i64, bits: u32) -> Result<(Vec<u8>, usize)> {
    let idx = Tensor::randint(k, [count], (Kind::Int64, Device::Cpu));
    Ok((pack(&idx, bits)?, count as usize))
}

/// Bit-packs indices (any shape) at `bits` per index.
fn pack(idx: &Tensor, bits: u32) -> Result<Vec<u8>> {
    let v: Vec<u16> = Vec::<i64>::try_from(idx.to_device(Device::Cpu).reshape([-1]))?
        .into_iter()
        .map(|v| v as u16)
        .collect();
    Ok(astra_quant::bitpack::pack(&v, bits)?)
}

/// Times every (method, N, T).
pub fn measure(c: &ProfileConfig, configs: &[(Method, u32, u64)]) -> Result<Vec<Measurement>> {
    if c.hidden % c.heads != 0 {
        fail!("--heads {} does not divide --hidden {}", c.heads, c.hidden);
    }
    let _guard = tch::no_grad_guard();
    let mut out = Vec::new();
    for &(method, n, t) in configs {
        let n = if method == Method::Single { 1 } else { n };
        if n as u64 > t {
            fail!("{method}: {n} devices for {t} tokens: every device needs at least one token");
        }
        let shard = if method == Method::Tp { n as i64 } else { 1 };
        if c.heads % shard != 0 || c.mlp % shard != 0 {
            fail!(
                "tp on {n} devices: heads {} and MLP {} must divide by {n}",
                c.heads,
                c.mlp
            );
        }
        if let Method::BpAg { nb } | Method::BpSp { nb } = method {
            if nb as i64 > c.blocks {
                fail!("{method}: keeps {nb} blocks of {}", c.blocks);
            }
        }
        if let Method::Astra { groups } = method {
            let width = c.arch.quantized_width(c);
            if width % groups as i64 != 0 {
                fail!("{method}: G = {groups} does not divide the quantized width {width}");
            }
        }
        if c.arch != Arch::Encoder
            && matches!(
                method,
                Method::Tp | Method::BpAg { .. } | Method::BpSp { .. }
            )
        {
            fail!("{method} is profiled for --arch encoder only (no decoder engine mode)");
        }
        if c.arch != Arch::Encoder && t as i64 > c.max_tokens {
            fail!("{t} tokens exceed the decoder's {} positions", c.max_tokens);
        }
        let engine = match method {
            Method::Single | Method::Sp | Method::Astra { .. } => Some(EngineWork::new(c, method)?),
            _ => None,
        };
        let share = match &engine {
            Some(e) => Some(e.share(c, n as usize, t as usize)?),
            None => None,
        };
        let w = weights(c, shard);
        let mut times = Vec::with_capacity(c.runs);
        for r in 0..c.warmup + c.runs {
            sync(c.device);
            let t0 = Instant::now();
            match (&engine, &share) {
                (Some(e), Some(dev)) => e.run(dev, c, t as usize)?,
                _ => baseline_work(c, method, n as i64, t as i64, &w),
            }
            sync(c.device);
            if r >= c.warmup {
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        out.push(Measurement {
            method,
            devices: n,
            tokens: t,
            median_ms: times[times.len() / 2],
            min_ms: times[0],
            max_ms: *times.last().expect("runs > 0"),
            runs: times.len(),
        });
    }
    Ok(out)
}

pub const CSV_HEADER: &str =
    "method,devices,tokens,compute_ms_median,compute_ms_min,compute_ms_max,runs";

pub fn to_csv(m: &[Measurement]) -> String {
    let mut s = format!("{CSV_HEADER}\n");
    for r in m {
        let _ = writeln!(
            s,
            "{},{},{},{:.4},{:.4},{:.4},{}",
            r.method, r.devices, r.tokens, r.median_ms, r.min_ms, r.max_ms, r.runs
        );
    }
    s
}

/// astra-sim's trace of the measured configurations (compute spread over blocks as astra-sim does
/// for any profile).
pub fn to_trace(csv: &str, c: &ProfileConfig, configs: &[(Method, u32, u64)]) -> Result<Trace> {
    let profile = ComputeProfile::parse(
        "measured",
        "profile.csv",
        csv,
        format!("astra-eval profile on {:?}", c.device),
    )?;
    let model = ModelShape {
        blocks: c.blocks as u32,
        hidden: c.hidden as u32,
        element_bits: 32,
        index_bits: astra_quant::bitpack::bits_for(c.codewords as usize),
        codebooks_per_block: c.arch.codebooks_per_block(),
    };
    let configs: Vec<_> = configs
        .iter()
        .map(|&(m, n, t)| (m, if m == Method::Single { 1 } else { n }, t))
        .collect();
    Ok(Trace::from_profile(
        &profile,
        model,
        &configs,
        BlockSplit::default(),
    )?)
}
