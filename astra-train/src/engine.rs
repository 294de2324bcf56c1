//! The device engine: one device's share of an ASTRA model and its block step, written once.
//!
//! A device holds its content tokens (and, for classifiers, its CLS copy). Per block it sends
//! what its peers need of its tokens ([`Payload`]: VQ indices, or the embeddings themselves for
//! the SP baseline and the unquantized check), receives the same from its sources, and computes
//! the block on its local states with the remote tokens as extra keys and values. The in-process
//! per-device path ([`run_in_memory`]) is N engines exchanging in memory; the runtime's worker is
//! one engine exchanging over TCP; the masked formulation (one process, one mask) stays the
//! training path, and the tests pin masked ≡ per-device ≡ tables ≡ runtime.

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TrainError};
use crate::models::fast_kv::CodewordKv;
use crate::models::{Astra, AstraOutput, ClsMode, DevicePartition, GroupedVq};

/// The remote tokens one block step attends to, besides the device's own.
pub enum Remote<'a> {
    /// None (one device, or a causal device with no earlier tokens elsewhere).
    Nothing,
    /// Remote token embeddings X̂ [B, T_r, D]: keys and values are computed from them.
    Tokens(&'a Tensor),
    /// Remote keys and values [B, T_r, 2·D_kv] (keys first), e.g. from per-codeword tables.
    KeysValues(&'a Tensor),
}

/// What a backbone provides for ASTRA. A new model implements this in its own file and registers
/// in [`crate::model::Model::new`]; the engine, the runtime and the evaluation need nothing else.
pub trait AstraModel {
    /// Transformer blocks.
    fn blocks(&self) -> usize;
    /// Width of the residual stream (what the block-input codebooks quantize).
    fn hidden(&self) -> i64;
    /// Causal attention (decoders): a query sees keys at or before its position.
    fn is_causal(&self) -> bool;
    /// CLS copies placed on devices 0.. for `cls` over `devices` (0 for models without a CLS).
    fn cls_copies(&self, cls: ClsMode, devices: usize) -> usize;
    /// Content tokens of an input (patches of an image, or the sequence length).
    fn content_tokens(&self, input: &Tensor) -> i64;
    /// A device's states before block 0: its content tokens `mine` (positions, ascending) of
    /// `input` embedded, after its CLS copy when `with_cls`. Only the device's own share is
    /// embedded.
    fn embed_share(&self, input: &Tensor, mine: &Tensor, with_cls: bool) -> Result<Tensor>;
    /// Block `l` on states `x` [B, S, D] with `remote` as extra keys/values; `mask` [S, S + T_r]
    /// (true: may attend) where the model is causal and remote tokens are present.
    fn block_step(&self, l: usize, x: &Tensor, remote: Remote<'_>, mask: Option<&Tensor>)
        -> Tensor;
    /// Keys and values of block `l` for every codeword of `codebook` [G, K, D/G] (fast lookup).
    fn codeword_kv(&self, l: usize, codebook: &Tensor) -> CodewordKv;
    /// Logits from final states: the CLS copies [B, C, D] (pooled, DCT) for a classifier, every
    /// token's states [B, T, D] for a language model.
    fn head(&self, states: &Tensor) -> Tensor;
    /// The plain model (one device).
    fn forward(&self, input: &Tensor) -> Result<Tensor>;
    /// All devices in one process with the mixed-precision mask: the training formulation and the
    /// reference the per-device paths are tested against.
    fn forward_astra(&self, input: &Tensor, astra: Astra) -> Result<AstraOutput>;
    /// The input of every block for the content tokens, [B, T, D] each (calibration).
    fn block_inputs(&self, input: &Tensor) -> Result<Vec<Tensor>>;
}

/// What a device sends per block: its content tokens' VQ indices [B, n, G] (ASTRA), or the
/// tokens themselves [B, n, D] (the SP baseline, or ASTRA without quantizers).
pub enum Payload {
    Indices(Tensor),
    Embeddings(Tensor),
}

/// How a receiver turns remote indices into keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteKv {
    /// Decode the codewords, then LayerNorm and the key/value projection (the direct path).
    Decode,
    /// Look them up in per-codeword tables built once per model and codebook (the fast path).
    Tables,
}

/// One device: its share of the tokens, its peers, and its block step.
pub struct DeviceShare<'m> {
    model: &'m dyn AstraModel,
    pub rank: usize,
    pub partition: DevicePartition,
    /// 1 when this device holds a CLS copy in front of its tokens, else 0.
    pub has_cls: i64,
    mine: Tensor,
    /// Quantizers, one per block (empty: embeddings travel unquantized).
    pub vq: &'m [GroupedVq],
    remote_kv: RemoteKv,
    tables: Vec<CodewordKv>,
    /// Ranks whose tokens this device attends to (receives from), and ranks that attend to its
    /// tokens (sends to), ascending.
    pub sources: Vec<u32>,
    pub sinks: Vec<u32>,
    /// Causal models: which keys [own | sources' tokens, in rank order] each own query may see.
    mask: Option<Tensor>,
}

/// Positions of device `d`'s tokens as an int64 tensor on `device`.
fn positions(p: &DevicePartition, d: usize, device: Device) -> Tensor {
    let v: Vec<i64> = p.tokens_of(d).iter().map(|&i| i as i64).collect();
    Tensor::from_slice(&v).to_device(device)
}

impl<'m> DeviceShare<'m> {
    /// Device `rank` of `partition`. `vq` empty: tokens travel unquantized.
    pub fn new(
        model: &'m dyn AstraModel,
        partition: DevicePartition,
        rank: usize,
        cls: ClsMode,
        vq: &'m [GroupedVq],
        remote_kv: RemoteKv,
        device: Device,
    ) -> Result<Self> {
        if !vq.is_empty() && vq.len() != model.blocks() {
            return Err(TrainError::invalid(
                "codebooks",
                format!(
                    "{} block quantizers for a model of {} blocks",
                    vq.len(),
                    model.blocks()
                ),
            ));
        }
        partition.check_no_empty_share()?;
        let n = partition.devices();
        let mine = positions(&partition, rank, device);
        let (sources, sinks) = peers(&partition, rank, model.is_causal());
        let mask = model.is_causal().then(|| {
            let keys: Vec<Tensor> = std::iter::once(mine.shallow_clone())
                .chain(
                    sources
                        .iter()
                        .map(|&s| positions(&partition, s as usize, device)),
                )
                .collect();
            Tensor::cat(&keys, 0)
                .view([1, -1])
                .le_tensor(&mine.view([-1, 1]))
        });
        let tables = match remote_kv {
            RemoteKv::Tables => vq
                .iter()
                .enumerate()
                .map(|(l, q)| model.codeword_kv(l, &q.codebook))
                .collect(),
            RemoteKv::Decode => Vec::new(),
        };
        Ok(DeviceShare {
            model,
            rank,
            has_cls: i64::from(rank < model.cls_copies(cls, n)),
            partition,
            mine,
            vq,
            remote_kv,
            tables,
            sources,
            sinks,
            mask,
        })
    }

    pub fn hidden(&self) -> i64 {
        self.model.hidden()
    }

    /// Content tokens this device holds.
    pub fn own_tokens(&self) -> i64 {
        self.mine.size()[0]
    }

    /// The device's states before block 0.
    pub fn start(&self, input: &Tensor) -> Result<Tensor> {
        self.model.embed_share(input, &self.mine, self.has_cls == 1)
    }

    /// What this device sends in block `l`.
    pub fn outgoing(&self, l: usize, local: &Tensor) -> Payload {
        let content = local.narrow(1, self.has_cls, self.own_tokens());
        match self.vq.get(l) {
            Some(q) => Payload::Indices(q.encode(&content)),
            None => Payload::Embeddings(content),
        }
    }

    /// Block `l` on this device, given its sources' payloads in rank order.
    pub fn block(&self, l: usize, local: &Tensor, received: &[&Payload]) -> Tensor {
        let parts: Vec<&Tensor> = received
            .iter()
            .map(|p| match p {
                Payload::Indices(t) | Payload::Embeddings(t) => t,
            })
            .collect();
        let indices = received.iter().any(|p| matches!(p, Payload::Indices(_)));
        let remote = (!parts.is_empty()).then(|| Tensor::cat(&parts, 1));
        let (tokens, kv) = match remote {
            None => (None, None),
            Some(r) if !indices => (Some(r.to_kind(local.kind())), None),
            Some(r) => match self.remote_kv {
                RemoteKv::Decode => (Some(self.vq[l].decode(&r).to_kind(local.kind())), None),
                RemoteKv::Tables => (None, Some(self.tables[l].kv(&r))),
            },
        };
        let (remote, mask) = match (&tokens, &kv) {
            (Some(t), _) => (Remote::Tokens(t), self.mask.as_ref()),
            (_, Some(kv)) => (Remote::KeysValues(kv), self.mask.as_ref()),
            _ => (Remote::Nothing, None),
        };
        self.model.block_step(l, local, remote, mask)
    }

    /// What this device contributes to the output: its CLS state [B, 1, D] (classifiers; nothing
    /// without a CLS copy); for a language model its final states [B, n, D], or with
    /// `next_token_only` the next-token logits [B, V] from the device holding the last token.
    pub fn finish(&self, local: &Tensor, next_token_only: bool) -> Option<Tensor> {
        if self.model.cls_copies(ClsMode::Single, 1) > 0 {
            return (self.has_cls == 1).then(|| local.narrow(1, 0, 1));
        }
        if !next_token_only {
            return Some(local.shallow_clone());
        }
        let last = self.partition.owner(self.partition.tokens() - 1);
        (last == self.rank).then(|| {
            let n = local.size()[1];
            self.model.head(&local.narrow(1, n - 1, 1)).squeeze_dim(1)
        })
    }
}

/// Sources and sinks of device `d`: every other device for bidirectional attention; for causal
/// attention the devices holding a token before d's last one (sources), and those whose last
/// token comes after d's first one (sinks). Contiguous shares: lower and higher ranks.
fn peers(p: &DevicePartition, d: usize, causal: bool) -> (Vec<u32>, Vec<u32>) {
    let span = |e: usize| {
        let t = p.tokens_of(e);
        (t[0], t[t.len() - 1])
    };
    let (first, last) = span(d);
    let others = (0..p.devices()).filter(|&e| e != d);
    let sources = others
        .clone()
        .filter(|&e| !causal || span(e).0 < last)
        .map(|e| e as u32)
        .collect();
    let sinks = others
        .filter(|&e| !causal || span(e).1 > first)
        .map(|e| e as u32)
        .collect();
    (sources, sinks)
}

/// Logits from what the devices returned ([`DeviceShare::finish`] without `next_token_only`), in
/// rank order: the CLS states pooled by the head, or every token's states put back in sequence
/// order.
pub fn combine(model: &dyn AstraModel, partition: &DevicePartition, parts: &[Tensor]) -> Tensor {
    let states = Tensor::cat(parts, 1);
    if model.cls_copies(ClsMode::Single, 1) > 0 {
        return model.head(&states);
    }
    let order: Vec<i64> = (0..partition.devices())
        .flat_map(|d| partition.tokens_of(d))
        .map(|i| i as i64)
        .collect();
    let inverse = Tensor::from_slice(&order)
        .to_device(states.device())
        .argsort(0, false);
    model.head(&states.index_select(1, &inverse))
}

/// The per-device path in one process: N engines exchanging their payloads in memory.
pub fn run_in_memory(
    model: &dyn AstraModel,
    input: &Tensor,
    partition: &DevicePartition,
    cls: ClsMode,
    vq: &[GroupedVq],
    remote_kv: RemoteKv,
) -> Result<Tensor> {
    let t = model.content_tokens(input);
    if partition.tokens() as i64 != t {
        return Err(TrainError::invalid(
            "partition",
            format!("covers {} tokens, the input has {t}", partition.tokens()),
        ));
    }
    let shares = (0..partition.devices())
        .map(|d| {
            DeviceShare::new(
                model,
                partition.clone(),
                d,
                cls,
                vq,
                remote_kv,
                input.device(),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let mut local = shares
        .iter()
        .map(|s| s.start(input))
        .collect::<Result<Vec<_>>>()?;
    for l in 0..model.blocks() {
        let sent: Vec<Payload> = shares
            .iter()
            .zip(&local)
            .map(|(s, x)| s.outgoing(l, x))
            .collect();
        local = shares
            .iter()
            .zip(&local)
            .map(|(s, x)| {
                let received: Vec<&Payload> =
                    s.sources.iter().map(|&e| &sent[e as usize]).collect();
                s.block(l, x, &received)
            })
            .collect();
    }
    let parts: Vec<Tensor> = shares
        .iter()
        .zip(&local)
        .filter_map(|(s, x)| s.finish(x, false))
        .collect();
    Ok(combine(model, partition, &parts))
}

/// Float32 on the CPU, the runtime's wire form of embeddings.
pub fn wire_embeddings(t: &Tensor) -> Tensor {
    t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous()
}
