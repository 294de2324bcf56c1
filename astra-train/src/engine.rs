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
use crate::models::lm_head::LmHead;
use crate::models::{Astra, AstraOutput, ClsMode, DevicePartition, GroupedVq};

/// The remote tokens one block step attends to, besides the device's own.
pub enum Remote<'a> {
    /// None (one device, or a causal device with no earlier tokens elsewhere).
    Nothing,
    /// Remote token embeddings X̂ [B, T_r, D]: keys and values are computed from them.
    Tokens(&'a Tensor),
    /// Remote keys and values [B, T_r, 2·D_kv] (keys first), e.g. from per-codeword tables.
    KeysValues(&'a Tensor),
    /// The distinct codewords among the remote tokens as keys and values `kv` [B, U, 2·D_kv],
    /// each standing for as many remote tokens as `log_count` [B, U] says (log of the count, −∞
    /// for none): attention adds the log-count to a codeword's score, which weighs it exactly as
    /// its tokens together ([`crate::models::layers::codeword_bias`]). Only for models whose
    /// codeword keys do not depend on the token's position (those with per-codeword tables), and
    /// only where every own query may see every remote token.
    Codewords {
        kv: &'a Tensor,
        log_count: &'a Tensor,
    },
}

/// Where a device's tokens sit in the sequence: its own content tokens, and the remote tokens of
/// a block step in the order their keys are appended. Models with rotary positions (Llama)
/// rotate queries and keys with them; models with absolute position embeddings ignore them.
#[derive(Clone, Copy)]
pub struct Positions<'a> {
    pub local: &'a Tensor,
    pub remote: &'a Tensor,
}

/// What a backbone provides for ASTRA. A new model implements this in its own file and registers
/// in [`crate::model::Model::new`]; the engine, the runtime and the evaluation need nothing else.
pub trait AstraModel {
    /// Transformer blocks.
    fn blocks(&self) -> usize;
    /// Width of the residual stream.
    fn hidden(&self) -> i64;
    /// Quantizers per block: 1 (the block input X, ViT and GPT-2) or 2 (keys then values,
    /// Llama). Quantizer `l · per + i` is block l's i-th.
    fn quantizers_per_block(&self) -> usize {
        1
    }
    /// Width of what each quantizer sees.
    fn quantized_width(&self) -> i64 {
        self.hidden()
    }
    /// What block `l` quantizes of a device's content states [B, n, D], one tensor per quantizer
    /// of the block (default: the states themselves).
    fn sent_states(&self, _l: usize, content: &Tensor) -> Vec<Tensor> {
        vec![content.shallow_clone()]
    }
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
    /// Block `l` on states `x` [B, S, D] (content tokens at `at.local`) with `remote` as extra
    /// keys/values (tokens at `at.remote`); `mask` [S, S + T_r] (true: may attend) where the
    /// model is causal and remote tokens are present. Remote keys/values from codewords are
    /// what the model's quantizers hold: projected keys/values (ViT, GPT-2 tables) or, for
    /// models quantizing keys and values, keys before their rotation.
    fn block_step(
        &self,
        l: usize,
        x: &Tensor,
        at: Positions<'_>,
        remote: Remote<'_>,
        mask: Option<&Tensor>,
    ) -> Tensor;
    /// Keys and values of block `l` for every codeword of `codebook` [G, K, D/G] (fast lookup);
    /// None where the codewords are keys and values already (Llama).
    fn codeword_kv(&self, l: usize, codebook: &Tensor) -> Option<CodewordKv>;
    /// Logits from final states: the CLS copies [B, C, D] (pooled, DCT) for a classifier, every
    /// token's states [B, T, D] for a language model.
    fn head(&self, states: &Tensor) -> Tensor;
    /// The plain model (one device).
    fn forward(&self, input: &Tensor) -> Result<Tensor>;
    /// All devices in one process with the mixed-precision mask: the training formulation and the
    /// reference the per-device paths are tested against.
    fn forward_astra(&self, input: &Tensor, astra: Astra) -> Result<AstraOutput>;

    /// Language models: the head as its parts (logits = norm(states) · Wᵀ), so that training can
    /// take the loss without forming the logits ([`crate::models::lm_head`]).
    fn lm_head(&self) -> Option<LmHead<'_>> {
        None
    }

    /// The states after the last block, before [`Self::lm_head`] (plain, or under ASTRA with the
    /// summed commitment); language models only.
    fn final_states(
        &self,
        _input: &Tensor,
        _astra: Option<Astra>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        Err(TrainError::invalid(
            "model",
            "has no language-model head: take its logits with forward",
        ))
    }
    /// The input of every block for the content tokens, [B, T, D] each (calibration).
    fn block_inputs(&self, input: &Tensor) -> Result<Vec<Tensor>>;
    /// The model as a decoder that continues a sequence with a key/value cache (language
    /// models); None for classifiers.
    fn as_decoder(&self) -> Option<&dyn Decoder> {
        None
    }
}

/// What token-by-token decoding needs of a language model. Keys and values are [B, n, W] (W the
/// key/value width), exactly as the block's attention uses them: after any rotation, so a cache
/// of them never needs recomputing.
pub trait Decoder {
    /// Token embeddings of `ids` [B, s] at `positions` [s].
    fn embed_at(&self, ids: &Tensor, positions: &Tensor) -> Result<Tensor>;
    /// Keys and values of block `l` for a device's own states `x` [B, n, D] at `positions`.
    fn local_kv(&self, l: usize, x: &Tensor, positions: &Tensor) -> (Tensor, Tensor);
    /// Keys and values of block `l` for remote tokens at `positions`, from what the device
    /// received (embeddings, or keys/values looked up from codewords), as `block_step` uses them;
    /// None for no remote tokens.
    fn remote_kv(
        &self,
        l: usize,
        remote: Remote<'_>,
        positions: &Tensor,
    ) -> Option<(Tensor, Tensor)>;
    /// Block `l` for one new token `x` [B, 1, D] at `position` [1] that attends to `keys` and
    /// `values` [B, S, W] (every earlier token) and to itself: (output, its key, its value).
    /// `remote_log_count` [B, U]: the first U keys are distinct remote codewords, each weighed
    /// by its count (models with per-codeword tables; see `DeviceShare::distinct_remote`).
    fn decode_step(
        &self,
        l: usize,
        x: &Tensor,
        position: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        remote_log_count: Option<&Tensor>,
    ) -> (Tensor, Tensor, Tensor);
    /// Positions the model can attend over.
    fn max_positions(&self) -> i64;
}

/// What a device sends per block: its content tokens' VQ indices [B, n, G] (ASTRA), or the
/// tokens themselves [B, n, D] (the SP baseline, or ASTRA without quantizers).
pub enum Payload {
    Indices(Tensor),
    Embeddings(Tensor),
}

impl Payload {
    /// The tensor, whichever the payload: indices [B, n, G] or tokens [B, n, D].
    pub fn tensor(&self) -> &Tensor {
        match self {
            Payload::Indices(t) | Payload::Embeddings(t) => t,
        }
    }

    /// A payload of the same kind holding `t` (e.g. this one's tensor copied to a device).
    pub fn with(&self, t: Tensor) -> Payload {
        match self {
            Payload::Indices(_) => Payload::Indices(t),
            Payload::Embeddings(_) => Payload::Embeddings(t),
        }
    }
}

/// Remote tokens as a receiver holds them for one block (see [`DeviceShare::expand`]).
pub enum Expanded {
    Nothing,
    Tokens(Tensor),
    KeysValues(Tensor),
    Codewords { kv: Tensor, log_count: Tensor },
}

impl Expanded {
    /// How many remote keys a block step attends to: the remote tokens, or the distinct
    /// codewords standing in for them.
    pub fn keys(&self) -> i64 {
        match self {
            Expanded::Nothing => 0,
            Expanded::Tokens(t) | Expanded::KeysValues(t) | Expanded::Codewords { kv: t, .. } => {
                t.size()[1]
            }
        }
    }

    pub fn as_remote(&self) -> Remote<'_> {
        match self {
            Expanded::Nothing => Remote::Nothing,
            Expanded::Tokens(t) => Remote::Tokens(t),
            Expanded::KeysValues(kv) => Remote::KeysValues(kv),
            Expanded::Codewords { kv, log_count } => Remote::Codewords { kv, log_count },
        }
    }
}

/// Whether block steps on `device` attend to each distinct remote codeword once
/// ([`Remote::Codewords`]): `ASTRA_DISTINCT_CODEWORDS` = `on`, `off`, or `auto` (the default: on
/// the CPU only). Measured (results/distributed-real.md, stops 43 and 44): on CPU workers it takes
/// a fifth off ViT's latency; on GPU workers sharing an H200 it added 0.7–4.4 ms of compute a
/// run, since attention there costs little and counting the codewords waits for the GPU once
/// a block.
fn distinct_codewords_default(device: Device) -> bool {
    static MODE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let mode = MODE.get_or_init(|| {
        let v = std::env::var("ASTRA_DISTINCT_CODEWORDS").ok();
        distinct_mode(v.as_deref()).unwrap_or_else(|bad| {
            eprintln!(
                "warning: ASTRA_DISTINCT_CODEWORDS={bad:?} is not on, off or auto; using auto"
            );
            None
        })
    });
    mode.unwrap_or(device == Device::Cpu)
}

/// `ASTRA_DISTINCT_CODEWORDS`'s value as forced on or off, or None for auto (also when unset);
/// Err: not a value it takes.
fn distinct_mode(v: Option<&str>) -> std::result::Result<Option<bool>, &str> {
    match v {
        Some("on") => Ok(Some(true)),
        Some("off") => Ok(Some(false)),
        None | Some("auto") => Ok(None),
        Some(bad) => Err(bad),
    }
}

/// The distinct codewords among a block's remote tokens (G = 1): their indices `used` [U], and
/// per batch item how many of its remote tokens chose each, `count` [B, U] (int64; 0: none of
/// its tokens did).
pub struct DistinctCodewords {
    pub used: Tensor,
    pub count: Tensor,
}

/// One device's block: its new states, and how many remote keys its queries attended to (the
/// remote tokens, or their distinct codewords; 0 without remote tokens).
pub struct BlockOutput {
    pub states: Tensor,
    pub remote_keys: i64,
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
    /// Positions of the remote tokens, sources in rank order (the order of their keys).
    remote_positions: Tensor,
    /// Quantizers, `quantizers_per_block` per block (empty: embeddings travel unquantized).
    pub vq: &'m [GroupedVq],
    /// Per-codeword key/value tables (RemoteKv::Tables for models whose codewords need a
    /// projection); empty: remote codewords are decoded.
    tables: Vec<CodewordKv>,
    /// Ranks whose tokens this device attends to (receives from), and ranks that attend to its
    /// tokens (sends to), ascending.
    pub sources: Vec<u32>,
    pub sinks: Vec<u32>,
    /// Causal models: which keys [own | sources' tokens, in rank order] each own query may see.
    mask: Option<Tensor>,
    /// Block steps attend to each distinct remote codeword once, weighted by its count, where
    /// that is exact (per-codeword tables, every remote token visible to every own query); by
    /// default on the CPU only (see `distinct_codewords_default`).
    pub distinct_codewords: bool,
    /// Every own query may see every remote token (no causal mask, or one whose remote columns
    /// are all true): checked once here rather than in every block.
    remote_visible: bool,
}

/// A second handle on the same device's share (its tensors shared, not copied: none is written
/// after construction), e.g. for the decoder that continues a prefill beside the runtime's share.
impl Clone for DeviceShare<'_> {
    fn clone(&self) -> Self {
        DeviceShare {
            model: self.model,
            rank: self.rank,
            partition: self.partition.clone(),
            has_cls: self.has_cls,
            mine: self.mine.shallow_clone(),
            remote_positions: self.remote_positions.shallow_clone(),
            vq: self.vq,
            tables: self.tables.clone(),
            sources: self.sources.clone(),
            sinks: self.sinks.clone(),
            mask: self.mask.as_ref().map(Tensor::shallow_clone),
            distinct_codewords: self.distinct_codewords,
            remote_visible: self.remote_visible,
        }
    }
}

/// Which keys [own | remote, at these positions] each own query may see under causal attention.
fn causal_mask(mine: &Tensor, remote: &Tensor) -> Tensor {
    Tensor::cat(&[mine, remote], 0)
        .view([1, -1])
        .le_tensor(&mine.view([-1, 1]))
}

/// Whether every own query may see every remote token under `mask` ([own | remote] columns;
/// None: no mask, all visible).
fn remote_visible(mask: Option<&Tensor>) -> bool {
    mask.is_none_or(|m| {
        let own = m.size()[0];
        bool::try_from(m.narrow(1, own, m.size()[1] - own).all()).unwrap_or(false)
    })
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
        let want = model.blocks() * model.quantizers_per_block();
        if !vq.is_empty() && vq.len() != want {
            return Err(TrainError::invalid(
                "codebooks",
                format!(
                    "{} quantizers for a model of {} blocks (it needs {want})",
                    vq.len(),
                    model.blocks()
                ),
            ));
        }
        partition.check_no_empty_share()?;
        let n = partition.devices();
        let mine = positions(&partition, rank, device);
        let (sources, sinks) = peers(&partition, rank, model.is_causal());
        let remote: Vec<Tensor> = sources
            .iter()
            .map(|&s| positions(&partition, s as usize, device))
            .collect();
        let remote_positions = if remote.is_empty() {
            Tensor::zeros([0], (Kind::Int64, device))
        } else {
            Tensor::cat(&remote, 0)
        };
        let mask = model
            .is_causal()
            .then(|| causal_mask(&mine, &remote_positions));
        // Tables only where codewords need a projection to become keys/values.
        let tables = match remote_kv {
            RemoteKv::Tables if model.quantizers_per_block() == 1 => vq
                .iter()
                .enumerate()
                .filter_map(|(l, q)| model.codeword_kv(l, &q.codebook))
                .collect(),
            _ => Vec::new(),
        };
        Ok(DeviceShare {
            model,
            rank,
            has_cls: i64::from(rank < model.cls_copies(cls, n)),
            partition,
            mine,
            remote_positions,
            vq,
            tables,
            sources,
            sinks,
            distinct_codewords: distinct_codewords_default(device),
            remote_visible: remote_visible(mask.as_ref()),
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

    /// Block `l`'s quantizers (empty without codebooks).
    pub fn block_quantizers(&self, l: usize) -> &[GroupedVq] {
        let per = self.model.quantizers_per_block();
        self.vq.get(l * per..(l + 1) * per).unwrap_or(&[])
    }

    /// The codewords each index column of block `l`'s payload chooses among (K of its
    /// quantizer), [ΣG] in payload order: what a receiver checks indices against and how many
    /// bits the wire spends per index.
    pub fn index_columns(&self, l: usize) -> Vec<i64> {
        self.block_quantizers(l)
            .iter()
            .flat_map(|q| std::iter::repeat_n(q.k(), q.groups() as usize))
            .collect()
    }

    /// What this device sends in block `l`: per quantizer of the block its indices, side by
    /// side [B, n, ΣG]; without codebooks the content states.
    pub fn outgoing(&self, l: usize, local: &Tensor) -> Payload {
        let content = local.narrow(1, self.has_cls, self.own_tokens());
        let q = self.block_quantizers(l);
        if q.is_empty() {
            return Payload::Embeddings(content);
        }
        let states = self.model.sent_states(l, &content);
        let idx: Vec<Tensor> = q.iter().zip(&states).map(|(q, s)| q.encode(s)).collect();
        Payload::Indices(if idx.len() == 1 {
            idx[0].shallow_clone()
        } else {
            Tensor::cat(&idx, -1)
        })
    }

    /// What block `l`'s sources sent (in rank order) as this device attends to it: remote
    /// embeddings (unquantized, or decoded codewords), or keys/values looked up from codewords.
    pub fn expand(&self, l: usize, received: &[&Payload], kind: Kind) -> Expanded {
        let parts: Vec<&Tensor> = received.iter().map(|p| p.tensor()).collect();
        if parts.is_empty() {
            return Expanded::Nothing;
        }
        let r = Tensor::cat(&parts, 1);
        if !received.iter().any(|p| matches!(p, Payload::Indices(_))) {
            return Expanded::Tokens(r.to_kind(kind));
        }
        let q = self.block_quantizers(l);
        match (q.len(), self.tables.get(l)) {
            (1, Some(t)) => Expanded::KeysValues(t.kv(&r)),
            (1, None) => Expanded::Tokens(q[0].decode(&r).to_kind(kind)),
            // Codewords that are keys and values: looked up directly.
            _ => Expanded::KeysValues(decode_side_by_side(q, &r).to_kind(kind)),
        }
    }

    /// Block `l` on this device, given its sources' payloads in rank order.
    pub fn block(&self, l: usize, local: &Tensor, received: &[&Payload]) -> Tensor {
        self.block_counted(l, local, received).states
    }

    /// [`Self::block`], with how many remote keys it attended to.
    fn block_counted(&self, l: usize, local: &Tensor, received: &[&Payload]) -> BlockOutput {
        self.step(
            l,
            local,
            received,
            self.positions(),
            self.mask.as_ref(),
            self.remote_visible,
        )
    }

    /// Block `l` when some sources' payloads never arrived (None, in source order; a lossy
    /// transport): their tokens are left out of the keys and values, which is exactly what
    /// masking them does (the softmax runs over the keys that remain).
    pub fn block_partial(
        &self,
        l: usize,
        local: &Tensor,
        received: &[Option<&Payload>],
    ) -> BlockOutput {
        if received.len() != self.sources.len() {
            panic!(
                "block {l}: {} payload slots for {} sources",
                received.len(),
                self.sources.len()
            );
        }
        let present: Vec<&Payload> = received.iter().flatten().copied().collect();
        if present.len() == received.len() {
            return self.block_counted(l, local, &present);
        }
        let device = self.mine.device();
        let remote: Vec<Tensor> = self
            .sources
            .iter()
            .zip(received)
            .filter(|(_, p)| p.is_some())
            .map(|(&s, _)| positions(&self.partition, s as usize, device))
            .collect();
        let remote = if remote.is_empty() {
            Tensor::zeros([0], (Kind::Int64, device))
        } else {
            Tensor::cat(&remote, 0)
        };
        let mask = self
            .model
            .is_causal()
            .then(|| causal_mask(&self.mine, &remote));
        let at = Positions {
            local: &self.mine,
            remote: &remote,
        };
        let visible = remote_visible(mask.as_ref());
        self.step(l, local, &present, at, mask.as_ref(), visible)
    }

    /// Block `l` over the payloads of the sources at `at.remote` (the mask: causal models only;
    /// `visible`: every own query sees every one of those remote tokens).
    fn step(
        &self,
        l: usize,
        local: &Tensor,
        received: &[&Payload],
        at: Positions<'_>,
        mask: Option<&Tensor>,
        visible: bool,
    ) -> BlockOutput {
        let expanded = match self.distinct(l, received, visible) {
            Some(codewords) => codewords,
            None => self.expand(l, received, local.kind()),
        };
        let remote = expanded.as_remote();
        let mask = match remote {
            Remote::Nothing => None,
            _ => mask,
        };
        BlockOutput {
            states: self.model.block_step(l, local, at, remote, mask),
            remote_keys: expanded.keys(),
        }
    }

    /// The sources' tokens of block `l` as their distinct codewords' keys and values with
    /// counts, where that is exact and saves keys (see `distinct_counts`); None otherwise (the
    /// block then attends to every remote token).
    fn distinct(&self, l: usize, received: &[&Payload], visible: bool) -> Option<Expanded> {
        let d = self.distinct_counts(l, received, visible)?;
        Some(self.codewords(l, &d))
    }

    /// For a query that sees every remote token (a decode step's): block `l`'s remote tokens as
    /// their distinct codewords, where that is exact and saves keys (see `distinct_counts`).
    pub fn distinct_remote(&self, l: usize, received: &[&Payload]) -> Option<DistinctCodewords> {
        self.distinct_counts(l, received, true)
    }

    /// The keys and values of distinct codewords `d` of block `l` (as `distinct_remote` found
    /// them, so the block has a table), from its table.
    pub fn codewords(&self, l: usize, d: &DistinctCodewords) -> Expanded {
        let (b, u) = (d.count.size()[0], d.used.size()[0]);
        Expanded::Codewords {
            kv: self.tables[l]
                .kv(&d.used.view([1, u, 1]))
                .expand([b, u, -1], false),
            log_count: d.count.to_kind(Kind::Float).log(),
        }
    }

    /// The distinct codewords among the sources' tokens of block `l` and their counts, where
    /// that is exact and saves keys: one index per token (G = 1, so equal indices are equal
    /// tokens) looked up in per-codeword tables, every remote token `visible` to every query,
    /// and fewer distinct codewords than remote tokens. Counting is one bincount over the K
    /// codewords, O(T_r + K).
    fn distinct_counts(
        &self,
        l: usize,
        received: &[&Payload],
        visible: bool,
    ) -> Option<DistinctCodewords> {
        self.tables
            .get(l)
            .filter(|_| self.distinct_codewords && visible)?;
        let q = match self.block_quantizers(l) {
            [q] if q.groups() == 1 => q,
            _ => return None,
        };
        let parts: Vec<&Tensor> = received
            .iter()
            .map(|p| match p {
                Payload::Indices(t) => Some(t),
                Payload::Embeddings(_) => None,
            })
            .collect::<Option<_>>()?;
        if parts.is_empty() {
            return None;
        }
        let idx = Tensor::cat(&parts, 1); // [B, T_r, 1]
        let (b, t_r) = (idx.size()[0], idx.size()[1]);
        // Per batch item, how many of its remote tokens chose each codeword.
        let k = q.k();
        let item = Tensor::arange(b, (Kind::Int64, idx.device())).view([b, 1]) * k;
        let counts = (idx.view([b, t_r]) + item)
            .view([-1])
            .bincount(None::<Tensor>, b * k)
            .view([b, k]);
        let used = counts
            .sum_dim_intlist(0, false, Kind::Int64)
            .nonzero()
            .view([-1]);
        let u = used.size()[0];
        if u >= t_r {
            return None;
        }
        Some(DistinctCodewords {
            count: counts.index_select(1, &used),
            used,
        })
    }

    /// Where this device's own tokens and its remote tokens sit.
    pub fn positions(&self) -> Positions<'_> {
        Positions {
            local: &self.mine,
            remote: &self.remote_positions,
        }
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

/// Indices of several quantizers side by side [.., ΣG] decoded and put side by side [.., Σ width].
fn decode_side_by_side(q: &[GroupedVq], idx: &Tensor) -> Tensor {
    let mut from = 0;
    let parts: Vec<Tensor> = q
        .iter()
        .map(|q| {
            let part = q.decode(&idx.narrow(-1, from, q.groups()));
            from += q.groups();
            part
        })
        .collect();
    Tensor::cat(&parts, -1)
}

/// Sources and sinks of device `d`: every other device for bidirectional attention; for causal
/// attention the devices holding a token before d's last one (sources), and those whose last
/// token comes after d's first one (sinks). Contiguous shares: lower and higher ranks.
pub fn peers(p: &DevicePartition, d: usize, causal: bool) -> (Vec<u32>, Vec<u32>) {
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
    let (shares, local) = run_devices(
        model,
        input,
        partition,
        cls,
        vq,
        remote_kv,
        &mut |_, _, _| {},
    )?;
    let parts: Vec<Tensor> = shares
        .iter()
        .zip(&local)
        .filter_map(|(s, x)| s.finish(x, false))
        .collect();
    Ok(combine(model, partition, &parts))
}

/// Sees block `l`'s states (per device, before the block) and payloads (per device).
pub type BlockObserver<'a> = dyn FnMut(usize, &[Tensor], &[Payload]) + 'a;

/// N engines through every block in memory; `observe(l, states, sent)` sees each device's states
/// before block `l` and what each sent in it (the decoder keeps its cache from them). Returns the
/// engines and their final states.
pub fn run_devices<'m>(
    model: &'m dyn AstraModel,
    input: &Tensor,
    partition: &DevicePartition,
    cls: ClsMode,
    vq: &'m [GroupedVq],
    remote_kv: RemoteKv,
    observe: &mut BlockObserver<'_>,
) -> Result<(Vec<DeviceShare<'m>>, Vec<Tensor>)> {
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
        observe(l, &local, &sent);
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
    Ok((shares, local))
}

/// Float32 on the CPU, the runtime's wire form of embeddings.
pub fn wire_embeddings(t: &Tensor) -> Tensor {
    t.to_kind(Kind::Float).to_device(Device::Cpu).contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_codewords_are_forced_on_or_off_or_left_to_the_device() {
        assert_eq!(distinct_mode(Some("on")), Ok(Some(true)));
        assert_eq!(distinct_mode(Some("off")), Ok(Some(false)));
        assert_eq!(distinct_mode(Some("auto")), Ok(None));
        assert_eq!(distinct_mode(None), Ok(None));
        assert_eq!(distinct_mode(Some("yes")), Err("yes"));
    }
}
