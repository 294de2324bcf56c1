//! Generation after an ASTRA prefill. The prompt is split over N devices and prefilled by the
//! per-device engines; the device holding the last token then decodes alone with a key/value
//! cache (the paper's App. G): its own tokens' keys and values in full precision, the other
//! devices' tokens as the VQ indices it received, bit-packed at log2 K bits and expanded on use
//! (per-codeword tables for GPT-2's projected keys/values, direct look-up and rotation for
//! Llama's key/value codebooks). New tokens are its own. Without codebooks the remote tokens'
//! keys and values are kept as computed; with one device there are none. Where a prefill block
//! step would attend to distinct codewords (G = 1 with tables; see
//! `DeviceShare::distinct_remote`), the cache keeps those codewords and their counts instead,
//! and each decode step attends to every distinct codeword once, weighed by its count.

use astra_quant::bitpack;
use tch::{Kind, Tensor};

use crate::engine::{
    run_devices, AstraModel, Decoder, DeviceShare, DistinctCodewords, Expanded, Payload, RemoteKv,
};
use crate::error::{Result, TrainError};
use crate::model::Model;
use crate::models::{ClsMode, DevicePartition, GroupedVq};

/// How the next token is chosen from its logits.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sampling {
    /// 0: greedy (argmax); otherwise logits are divided by it and a token is drawn.
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }

    /// Next tokens [B] (int64) from logits [B, V].
    pub fn pick(&self, logits: &Tensor) -> Tensor {
        if self.temperature <= 0.0 {
            return logits.argmax(-1, false);
        }
        let mut l = logits.to_kind(Kind::Float) / self.temperature;
        let v = l.size()[1];
        if let Some(k) = self.top_k.filter(|&k| k > 0 && k < v) {
            let (top, _) = l.topk(k, -1, true, true);
            let kth = top.narrow(1, k - 1, 1);
            l = l.masked_fill(&l.lt_tensor(&kth), f64::NEG_INFINITY);
        }
        if let Some(p) = self.top_p.filter(|&p| p < 1.0) {
            // Keep the smallest set of most likely tokens whose probability reaches p.
            let (sorted, order) = l.sort(-1, true);
            let probs = sorted.softmax(-1, Kind::Float);
            let before = probs.cumsum(-1, Kind::Float) - &probs;
            let drop_sorted = before.gt(p);
            let drop = drop_sorted.scatter(1, &order, &drop_sorted);
            l = l.masked_fill(&drop, f64::NEG_INFINITY);
        }
        l.softmax(-1, Kind::Float)
            .multinomial(1, true)
            .squeeze_dim(1)
    }
}

/// One block's remote tokens in the cache.
enum RemoteCache {
    None,
    /// Bit-packed indices [B, T_r, ΣG] at `bits` each, expanded on use.
    Indices {
        packed: Vec<u8>,
        shape: [i64; 3],
        bits: u32,
    },
    /// Keys and values [B, T_r, W] as computed (no codebooks).
    KeysValues(Tensor, Tensor),
    /// The distinct codewords among the remote tokens (G = 1, tables): their U indices at
    /// `bits` each and per sequence how many remote tokens chose each [B, U] at `count_bits`,
    /// bit-packed.
    Codewords {
        used: Vec<u8>,
        bits: u32,
        count: Vec<u8>,
        count_bits: u32,
        shape: [i64; 2],
    },
}

/// A block's remote keys and values [B, R, W] for a decode step, and, where they are distinct
/// codewords, their log-counts [B, R].
type RemoteKeys = Option<(Tensor, Tensor, Option<Tensor>)>;

struct BlockCache {
    keys: Tensor,
    values: Tensor,
    remote: RemoteCache,
}

/// Bytes the decoding device's cache holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CacheBytes {
    /// Its own tokens' keys and values (full precision).
    pub local: usize,
    /// The remote tokens: packed indices, or keys and values without codebooks, or distinct
    /// codewords (their packed indices and counts).
    pub remote: usize,
}

/// The decoding device after the prefill: its engine, its cache and the next position.
pub struct Generator<'m> {
    dec: &'m dyn Decoder,
    share: DeviceShare<'m>,
    blocks: Vec<BlockCache>,
    position: i64,
}

impl<'m> Generator<'m> {
    /// Prefills `prompt` [B, T] over `partition` (contiguous shares, so the last device holds
    /// the last token) with `vq` (empty: unquantized remote tokens). Returns the decoding
    /// device and the next-token logits [B, V].
    pub fn prefill(
        model: &'m Model,
        prompt: &Tensor,
        partition: &DevicePartition,
        vq: &'m [GroupedVq],
    ) -> Result<(Self, Tensor)> {
        let m = model.astra_model();
        let last = partition.owner(partition.tokens() - 1);
        let mut captured: Vec<(Tensor, Vec<Payload>)> = Vec::new();
        let (mut shares, local) = run_devices(
            m,
            prompt,
            partition,
            ClsMode::Single,
            vq,
            RemoteKv::Tables,
            &mut |_, states, sent| {
                let received = sent.iter().map(copy_payload).collect();
                captured.push((states[last].shallow_clone(), received));
            },
        )?;
        let share = shares.swap_remove(last);
        // Of what every device sent, what this one received (its sources, in rank order).
        let received = captured
            .into_iter()
            .map(|(states, sent)| {
                let mine = share
                    .sources
                    .iter()
                    .map(|&e| copy_payload(&sent[e as usize]));
                (states, mine.collect())
            })
            .collect();
        Self::from_prefill(m, share, received, &local[last])
    }

    /// The decoding device from its own prefill: its engine `share` (which must hold the last
    /// token), per block its states before the block and the payloads it received (sources in
    /// rank order), and its final states. Returns it and the next-token logits [B, V]. The
    /// runtime's decoding worker comes here from its own exchange.
    pub fn from_prefill(
        model: &'m dyn AstraModel,
        share: DeviceShare<'m>,
        per_block: Vec<(Tensor, Vec<Payload>)>,
        last_states: &Tensor,
    ) -> Result<(Self, Tensor)> {
        let dec = model.as_decoder().ok_or_else(|| {
            TrainError::invalid("model", "is not a language model: nothing to generate")
        })?;
        let logits = share.finish(last_states, true).ok_or_else(|| {
            TrainError::invalid("decoding device", "does not hold the prompt's last token")
        })?;
        let mut g = Generator {
            dec,
            blocks: Vec::with_capacity(per_block.len()),
            position: share.partition.tokens() as i64,
            share,
        };
        for (l, (states, received)) in per_block.into_iter().enumerate() {
            let block = g.cache_block(l, &states, &received)?;
            g.blocks.push(block);
        }
        Ok((g, logits))
    }

    /// Block `l`'s cache from the device's states before it and the payloads it received.
    fn cache_block(&self, l: usize, states: &Tensor, received: &[Payload]) -> Result<BlockCache> {
        let at = self.share.positions();
        let (keys, values) = self.dec.local_kv(l, states, at.local);
        let received: Vec<&Payload> = received.iter().collect();
        let remote = match received.first() {
            None => RemoteCache::None,
            // Counts are packed at ≤ 16 bits: at most 65,535 remote tokens.
            Some(Payload::Indices(_)) => match self
                .share
                .distinct_remote(l, &received)
                .filter(|_| at.remote.size()[0] < 1 << 16)
            {
                Some(d) => Self::packed_codewords(&self.share, l, &d)?,
                None => Self::packed(&self.share, l, &received)?,
            },
            Some(Payload::Embeddings(_)) => {
                let e = self.share.expand(l, &received, states.kind());
                let (k, v) = self
                    .dec
                    .remote_kv(l, e.as_remote(), at.remote)
                    .expect("remote tokens arrived");
                RemoteCache::KeysValues(k, v)
            }
        };
        Ok(BlockCache {
            keys,
            values,
            remote,
        })
    }

    /// Distinct codewords `d` of block `l`, bit-packed: their indices at log2 K bits, and their
    /// counts at the bits the largest possible count (every remote token) needs.
    fn packed_codewords(
        share: &DeviceShare<'_>,
        l: usize,
        d: &DistinctCodewords,
    ) -> Result<RemoteCache> {
        let k = share.index_columns(l).into_iter().max().unwrap_or(1);
        let remote = share.positions().remote.size()[0];
        let (bits, count_bits) = (
            bitpack::bits_for(k as usize),
            bitpack::bits_for(remote as usize + 1),
        );
        Ok(RemoteCache::Codewords {
            used: pack(&d.used, bits)?,
            bits,
            count: pack(&d.count, count_bits)?,
            count_bits,
            shape: [d.count.size()[0], d.count.size()[1]],
        })
    }

    /// Block `l`'s received indices, bit-packed.
    fn packed(share: &DeviceShare<'_>, l: usize, received: &[&Payload]) -> Result<RemoteCache> {
        let parts: Vec<&Tensor> = received.iter().map(|p| p.tensor()).collect();
        let idx = Tensor::cat(&parts, 1);
        let k = share.index_columns(l).into_iter().max().unwrap_or(1);
        let bits = bitpack::bits_for(k as usize);
        let s = idx.size();
        Ok(RemoteCache::Indices {
            packed: pack(&idx, bits)?,
            shape: [s[0], s[1], s[2]],
            bits,
        })
    }

    /// Remote keys and values of block `l`, expanded from the cache.
    fn remote_kv(&self, l: usize, kind: Kind) -> Result<RemoteKeys> {
        let remote = self.share.positions().remote;
        let with_counts = |(k, v)| (k, v, None);
        Ok(match &self.blocks[l].remote {
            RemoteCache::None => None,
            RemoteCache::KeysValues(k, v) => Some((k.shallow_clone(), v.shallow_clone(), None)),
            RemoteCache::Codewords {
                used,
                bits,
                count,
                count_bits,
                shape,
            } => {
                let device = self.blocks[l].keys.device();
                let d = DistinctCodewords {
                    used: unpack(used, &[shape[1]], *bits, device)?,
                    count: unpack(count, shape, *count_bits, device)?,
                };
                let e = self.share.codewords(l, &d);
                let Expanded::Codewords { log_count, .. } = &e else {
                    unreachable!("distinct codewords expand to codewords")
                };
                let counts = log_count.shallow_clone();
                (self.dec.remote_kv(l, e.as_remote(), remote)).map(|(k, v)| (k, v, Some(counts)))
            }
            RemoteCache::Indices {
                packed,
                shape,
                bits,
            } => {
                let device = self.blocks[l].keys.device();
                let payload = Payload::Indices(unpack(packed, shape, *bits, device)?);
                let e: Expanded = self.share.expand(l, &[&payload], kind);
                self.dec
                    .remote_kv(l, e.as_remote(), remote)
                    .map(with_counts)
            }
        })
    }

    /// Feeds `tokens` [B] at the next position; returns the logits [B, V] of the token after.
    pub fn step(&mut self, tokens: &Tensor) -> Result<Tensor> {
        if self.position >= self.dec.max_positions() {
            return Err(TrainError::invalid(
                "generation",
                format!(
                    "position {} is past the model's {} positions",
                    self.position,
                    self.dec.max_positions()
                ),
            ));
        }
        let device = self
            .blocks
            .first()
            .map_or(tch::Device::Cpu, |b| b.keys.device());
        let pos = Tensor::from_slice(&[self.position]).to_device(device);
        let mut x = self.dec.embed_at(&tokens.view([-1, 1]), &pos)?;
        for l in 0..self.blocks.len() {
            let remote = self.remote_kv(l, x.kind())?;
            let b = &self.blocks[l];
            let (keys, values, counts) = match remote {
                Some((rk, rv, counts)) => (
                    Tensor::cat(&[&rk.to_kind(b.keys.kind()), &b.keys], 1),
                    Tensor::cat(&[&rv.to_kind(b.values.kind()), &b.values], 1),
                    counts,
                ),
                None => (b.keys.shallow_clone(), b.values.shallow_clone(), None),
            };
            let (out, k, v) = self
                .dec
                .decode_step(l, &x, &pos, &keys, &values, counts.as_ref());
            let b = &mut self.blocks[l];
            b.keys = Tensor::cat(&[&b.keys, &k.to_kind(b.keys.kind())], 1);
            b.values = Tensor::cat(&[&b.values, &v.to_kind(b.values.kind())], 1);
            x = out;
        }
        self.position += 1;
        // This device holds the last token: its head gives the next token's logits.
        Ok(self
            .share
            .finish(&x, true)
            .expect("the decoding device holds the last token"))
    }

    /// Bytes held by the cache.
    pub fn cache_bytes(&self) -> CacheBytes {
        let bytes = |t: &Tensor| t.numel() * t.kind().elt_size_in_bytes();
        let mut c = CacheBytes {
            local: 0,
            remote: 0,
        };
        for b in &self.blocks {
            c.local += bytes(&b.keys) + bytes(&b.values);
            c.remote += match &b.remote {
                RemoteCache::None => 0,
                RemoteCache::Indices { packed, .. } => packed.len(),
                RemoteCache::KeysValues(k, v) => bytes(k) + bytes(v),
                RemoteCache::Codewords { used, count, .. } => used.len() + count.len(),
            };
        }
        c
    }

    /// Per block, how many remote keys a decode step attends to: the remote tokens, or their
    /// distinct codewords.
    pub fn remote_keys(&self) -> Vec<i64> {
        self.blocks
            .iter()
            .map(|b| match &b.remote {
                RemoteCache::None => 0,
                RemoteCache::Indices { shape, .. } => shape[1],
                RemoteCache::KeysValues(k, _) => k.size()[1],
                RemoteCache::Codewords { shape, .. } => shape[1],
            })
            .collect()
    }

    /// The next position (prompt length + tokens fed so far).
    pub fn position(&self) -> i64 {
        self.position
    }
}

/// An int64 tensor of values below 2^`bits` (indices, counts), bit-packed.
fn pack(t: &Tensor, bits: u32) -> Result<Vec<u8>> {
    let flat: Vec<u16> = Vec::<i64>::try_from(t.reshape([-1]))?
        .into_iter()
        .map(|v| v as u16)
        .collect();
    Ok(bitpack::pack(&flat, bits)?)
}

/// What `pack` made, back as an int64 tensor of `shape` on `device`.
fn unpack(packed: &[u8], shape: &[i64], bits: u32, device: tch::Device) -> Result<Tensor> {
    let n = shape.iter().product::<i64>() as usize;
    let v: Vec<i64> = bitpack::unpack(packed, n, bits)?
        .into_iter()
        .map(i64::from)
        .collect();
    Ok(Tensor::from_slice(&v).view(shape).to_device(device))
}

/// A payload handle (the tensors are shared, not copied).
pub fn copy_payload(p: &Payload) -> Payload {
    match p {
        Payload::Indices(t) => Payload::Indices(t.shallow_clone()),
        Payload::Embeddings(t) => Payload::Embeddings(t.shallow_clone()),
    }
}

/// `prompt` [B, T] continued by `max_new` tokens on `devices` devices (contiguous shares; `vq`
/// empty: unquantized remote tokens): [B, T + max_new] like HF's `generate`. `on_token` sees each
/// new token [B] as it is chosen.
pub fn generate(
    model: &Model,
    prompt: &Tensor,
    devices: usize,
    vq: &[GroupedVq],
    max_new: usize,
    sampling: &Sampling,
    mut on_token: impl FnMut(&Tensor),
) -> Result<Tensor> {
    let t = prompt.size().get(1).copied().unwrap_or(0);
    if t == 0 {
        return Err(TrainError::invalid("prompt", "is empty"));
    }
    let partition = DevicePartition::contiguous(t as usize, devices)?;
    tch::manual_seed(sampling.seed as i64);
    let mut out = vec![prompt.shallow_clone()];
    if max_new == 0 {
        return Ok(prompt.shallow_clone());
    }
    let (mut g, mut logits) = tch::no_grad(|| Generator::prefill(model, prompt, &partition, vq))?;
    for i in 0..max_new {
        let next = sampling.pick(&logits);
        on_token(&next);
        out.push(next.view([-1, 1]));
        if i + 1 < max_new {
            logits = tch::no_grad(|| g.step(&next))?;
        }
    }
    Ok(Tensor::cat(&out, 1))
}
