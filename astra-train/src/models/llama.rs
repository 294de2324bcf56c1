//! Llama-family decoders with parameter names of HF `LlamaForCausalLM` (also Mistral and Qwen2):
//! `model.{embed_tokens, layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
//! mlp.{gate,up,down}_proj}, norm}`, `lm_head` (absent when tied to `embed_tokens`). RMSNorm,
//! rotary position embeddings (default, linear and llama3 scaling), grouped-query attention,
//! SwiGLU MLP.
//!
//! ASTRA quantizes each block's keys and values, as the paper does for Llama: two codebooks per
//! block (quantizers 2l and 2l + 1), over the key/value width (key/value heads × head width).
//! Keys are quantized **before** the rotary embedding: the codebook is then position-free (a
//! codeword means the same at every position, so one codebook serves every token and the EMA
//! statistics of all positions add up), and a receiver rotates the looked-up key at the remote
//! token's own position, which it knows from the partition. Quantizing after RoPE would ask one
//! codebook to cover every rotation of every key. The tests pin this: the per-device path (keys
//! rotated at the receiver) equals the masked path (keys rotated where they are computed).

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::fast_kv::CodewordKv;
use super::layers::Sight;
use super::layers::{self, linears, Linear};
use super::lm_head::LmHead;
use super::mpa::Layout;
use super::{Astra, AstraOutput, ClsMode};
use crate::config::{LlamaConfig, LlamaFamily, RopeScaling};
use crate::engine::{AstraModel, Decoder, Remote};
use crate::error::{Result, TrainError};

/// Llama never gets distinct codewords: its codewords are keys before rotation, so one codeword
/// is a different key at every position, and it has no per-codeword tables (the engine's
/// condition for them).
const NO_CODEWORDS: &str = "distinct codewords for a model with rotary positions";

/// HF's LlamaRMSNorm: normalised in fp32, scaled by the weight in the input's precision.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: nn::Path, d: i64, eps: f64) -> Self {
        RmsNorm {
            weight: p.var("weight", &[d], nn::Init::Const(1.0)),
            eps,
        }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let xf = x.to_kind(Kind::Float);
        let var = xf.square().mean_dim(-1, true, Kind::Float);
        &self.weight * (xf * (var + self.eps).rsqrt()).to_kind(x.kind())
    }
}

/// Rotary embeddings: the inverse frequencies, scaled as the config says.
#[derive(Debug)]
pub struct Rotary {
    inv_freq: Tensor,
}

impl Rotary {
    fn new(c: &LlamaConfig, device: tch::Device) -> Self {
        let d = c.head_dim as usize;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        let scaled: Vec<f32> = base
            .iter()
            .map(|&f| scale_frequency(f, &c.rope_scaling) as f32)
            .collect();
        Rotary {
            inv_freq: Tensor::from_slice(&scaled).to_device(device),
        }
    }

    /// cos and sin [T, head_dim] at `positions` [T] (fp32).
    pub fn cos_sin(&self, positions: &Tensor) -> (Tensor, Tensor) {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        (emb.cos(), emb.sin())
    }
}

/// One inverse frequency under the config's scaling (HF's `_compute_*_parameters`).
fn scale_frequency(f: f64, s: &RopeScaling) -> f64 {
    match *s {
        RopeScaling::Default => f,
        RopeScaling::Linear { factor } => f / factor,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < old / high_freq_factor {
                f
            } else if wavelen > old / low_freq_factor {
                f / factor
            } else {
                let smooth =
                    (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * f / factor + smooth * f
            }
        }
    }
}

/// x [B, H, T, hd] rotated by cos/sin [T, hd] (HF's rotate_half layout).
fn rotate(x: &Tensor, cos_sin: &(Tensor, Tensor)) -> Tensor {
    let hd = x.size()[3];
    let (x1, x2) = (x.narrow(3, 0, hd / 2), x.narrow(3, hd / 2, hd / 2));
    let half = Tensor::cat(&[x2.neg(), x1], 3);
    let (cos, sin) = (cos_sin.0.to_kind(x.kind()), cos_sin.1.to_kind(x.kind()));
    x * cos + half * sin
}

#[derive(Debug)]
pub struct LlamaBlock {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

fn linear(p: nn::Path, i: i64, o: i64, bias: bool) -> Linear {
    layers::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            bias,
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            ..Default::default()
        },
    )
}

/// Remote keys and values (before RoPE, [B, T_r, kv_dim] each) and their rotation.
pub struct RemoteKeys<'a> {
    pub keys: &'a Tensor,
    pub values: &'a Tensor,
    pub cos_sin: &'a (Tensor, Tensor),
}

impl LlamaBlock {
    fn new(p: nn::Path, c: &LlamaConfig) -> Self {
        let (d, kv, hd) = (c.hidden_size, c.kv_dim(), c.head_dim);
        let qkv_bias = c.attention_bias || c.family == LlamaFamily::Qwen2;
        let o_bias = c.attention_bias && c.family != LlamaFamily::Qwen2;
        let a = &p / "self_attn";
        let m = &p / "mlp";
        LlamaBlock {
            input_layernorm: RmsNorm::new(&p / "input_layernorm", d, c.rms_norm_eps),
            q_proj: linear(&a / "q_proj", d, c.num_attention_heads * hd, qkv_bias),
            k_proj: linear(&a / "k_proj", d, kv, qkv_bias),
            v_proj: linear(&a / "v_proj", d, kv, qkv_bias),
            o_proj: linear(&a / "o_proj", c.num_attention_heads * hd, d, o_bias),
            post_attention_layernorm: RmsNorm::new(
                &p / "post_attention_layernorm",
                d,
                c.rms_norm_eps,
            ),
            gate_proj: linear(&m / "gate_proj", d, c.intermediate_size, c.mlp_bias),
            up_proj: linear(&m / "up_proj", d, c.intermediate_size, c.mlp_bias),
            down_proj: linear(&m / "down_proj", c.intermediate_size, d, c.mlp_bias),
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: hd,
        }
    }

    /// Keys and values of `x` [B, T, D] before RoPE, [B, T, kv_dim] each: what ASTRA quantizes.
    pub fn keys_values(&self, x: &Tensor) -> (Tensor, Tensor) {
        self.keys_values_normed(&x.apply(&self.input_layernorm))
    }

    /// [`Self::keys_values`] of states already through `input_layernorm` (the block's own
    /// tokens normalise once for their queries, keys and values).
    fn keys_values_normed(&self, h: &Tensor) -> (Tensor, Tensor) {
        let [k, v] = linears(h, [&self.k_proj, &self.v_proj]);
        (k, v)
    }

    fn heads_of(&self, t: &Tensor, heads: i64) -> Tensor {
        let (b, s, _) = t.size3().expect("[B, T, width]");
        t.view([b, s, heads, self.head_dim]).transpose(1, 2)
    }

    /// Key/value heads repeated for the query heads that share them: [B, kvh, S, hd] → [B, H, S, hd].
    fn repeat_kv(&self, t: &Tensor) -> Tensor {
        let rep = self.heads / self.kv_heads;
        if rep == 1 {
            return t.shallow_clone();
        }
        let (b, kvh, s, hd) = t.size4().expect("[B, kvh, S, hd]");
        t.unsqueeze(2)
            .expand([b, kvh, rep, s, hd], false)
            .reshape([b, kvh * rep, s, hd])
    }

    /// Rotated keys and values [B, kvh, n, hd] of normalised states `h` at rotations `cos_sin`.
    fn rotated_kv(&self, h: &Tensor, cos_sin: &(Tensor, Tensor)) -> (Tensor, Tensor) {
        let (k, v) = self.keys_values_normed(h);
        self.rotate_kv(&k, &v, cos_sin)
    }

    /// Keys and values [B, n, kv_dim] (keys before RoPE) in head layout, keys rotated.
    fn rotate_kv(&self, k: &Tensor, v: &Tensor, cos_sin: &(Tensor, Tensor)) -> (Tensor, Tensor) {
        (
            rotate(&self.heads_of(k, self.kv_heads), cos_sin),
            self.heads_of(v, self.kv_heads),
        )
    }

    /// One block on `x` [B, S, D] at rotations `cos_sin` (of its tokens' positions), with
    /// `remote` keys/values appended after the local ones, seen as `sight` says
    /// (`Sight::Causal`: plain causal attention).
    pub fn forward(
        &self,
        x: &Tensor,
        cos_sin: &(Tensor, Tensor),
        remote: Option<RemoteKeys<'_>>,
        sight: Sight<'_>,
    ) -> Tensor {
        let h = x.apply(&self.input_layernorm);
        let (mut k, mut v) = self.rotated_kv(&h, cos_sin);
        if let Some(r) = remote {
            let (rk, rv) = self.rotate_kv(
                &r.keys.to_kind(k.kind()),
                &r.values.to_kind(v.kind()),
                r.cos_sin,
            );
            k = Tensor::cat(&[k, rk], 2);
            v = Tensor::cat(&[v, rv], 2);
        }
        self.attend_and_mlp(x, &h, cos_sin, (&k, &v), sight)
    }

    /// Queries of `x` (`h`: x through `input_layernorm`) against head-layout keys/values
    /// [B, kvh, Sk, hd], the output projection and the MLP, both residual.
    fn attend_and_mlp(
        &self,
        x: &Tensor,
        h: &Tensor,
        cos_sin: &(Tensor, Tensor),
        (k, v): (&Tensor, &Tensor),
        sight: Sight<'_>,
    ) -> Tensor {
        let q = rotate(&self.heads_of(&h.apply(&self.q_proj), self.heads), cos_sin);
        let out = sight.attend_heads(&q, &self.repeat_kv(k), &self.repeat_kv(v));
        let (b, s, _) = x.size3().expect("[B, S, D]");
        let attn = out
            .transpose(1, 2)
            .contiguous()
            .view([b, s, self.heads * self.head_dim]);
        let x = x + attn.apply(&self.o_proj);
        let h = x.apply(&self.post_attention_layernorm);
        let [gate, up] = linears(&h, [&self.gate_proj, &self.up_proj]);
        let mlp = (gate.silu() * up).apply(&self.down_proj);
        &x + mlp
    }
}

#[derive(Debug)]
pub struct Llama {
    pub cfg: LlamaConfig,
    embed_tokens: nn::Embedding,
    pub blocks: Vec<LlamaBlock>,
    norm: RmsNorm,
    /// [V, D]; the embedding matrix itself when tied.
    lm_head: Tensor,
    rotary: Rotary,
}

impl Llama {
    pub fn new(root: &nn::Path, cfg: &LlamaConfig) -> Result<Self> {
        cfg.validate()?;
        let m = root / "model";
        let embed_tokens = nn::embedding(
            &m / "embed_tokens",
            cfg.vocab_size,
            cfg.hidden_size,
            nn::EmbeddingConfig {
                ws_init: nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
                ..Default::default()
            },
        );
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.ws.shallow_clone()
        } else {
            (root / "lm_head").var(
                "weight",
                &[cfg.vocab_size, cfg.hidden_size],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )
        };
        Ok(Llama {
            cfg: cfg.clone(),
            blocks: (0..cfg.num_hidden_layers)
                .map(|i| LlamaBlock::new(&m / "layers" / i, cfg))
                .collect(),
            norm: RmsNorm::new(&m / "norm", cfg.hidden_size, cfg.rms_norm_eps),
            lm_head,
            rotary: Rotary::new(cfg, root.device()),
            embed_tokens,
        })
    }

    /// Token embeddings of `ids` [B, T] (checked against the vocabulary and the window).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let s = ids.size();
        if s.len() != 2 {
            return Err(TrainError::invalid(
                "tokens",
                format!("shape {s:?}, expected [B, T]"),
            ));
        }
        let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if lo < 0 || hi >= self.cfg.vocab_size {
            return Err(TrainError::invalid(
                "tokens",
                format!(
                    "ids span {lo}..={hi}, the vocabulary has {}",
                    self.cfg.vocab_size
                ),
            ));
        }
        Ok(ids.apply(&self.embed_tokens))
    }

    /// Refuses a sequence the model cannot attend over as trained (beyond Mistral's window).
    fn check_length(&self, t: i64) -> Result<()> {
        if let Some(w) = self.cfg.sliding_window.filter(|&w| t > w) {
            return Err(TrainError::invalid(
                "tokens",
                format!("{t} tokens exceed the sliding window of {w}, which is not implemented"),
            ));
        }
        Ok(())
    }

    fn positions(&self, t: i64, ids: &Tensor) -> (Tensor, Tensor) {
        self.rotary
            .cos_sin(&Tensor::arange(t, (Kind::Int64, ids.device())))
    }

    /// Logits [B, T, V] from the final states.
    pub fn head(&self, x: &Tensor) -> Tensor {
        x.apply(&self.norm).matmul(&self.lm_head.transpose(0, 1))
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.head(&self.final_states(ids)?))
    }

    /// The states after the last block (before the final norm and the head).
    pub fn final_states(&self, ids: &Tensor) -> Result<Tensor> {
        let t = ids.size().get(1).copied().unwrap_or(0);
        self.check_length(t)?;
        let cs = self.positions(t, ids);
        let mut x = self.embed(ids)?;
        for blk in &self.blocks {
            x = blk.forward(&x, &cs, None, Sight::Causal);
        }
        Ok(x)
    }

    /// What ASTRA's quantizers see on the plain model: per block its keys, then its values
    /// (before RoPE), [B, T, kv_dim] each: 2·L tensors.
    pub fn block_inputs(&self, ids: &Tensor) -> Result<Vec<Tensor>> {
        let t = ids.size().get(1).copied().unwrap_or(0);
        self.check_length(t)?;
        let cs = self.positions(t, ids);
        let mut x = self.embed(ids)?;
        let mut out = Vec::with_capacity(2 * self.blocks.len());
        for blk in &self.blocks {
            let (k, v) = blk.keys_values(&x);
            out.push(k);
            out.push(v);
            x = blk.forward(&x, &cs, None, Sight::Causal);
        }
        Ok(out)
    }

    /// All devices in one process under the causal mixed-precision mask: per block the keys and
    /// values of the tokens other devices attend to are quantized (before RoPE, then rotated at
    /// their positions) and appended as extra key columns.
    pub fn forward_astra(&self, ids: &Tensor, astra: Astra) -> Result<AstraOutput> {
        let (x, commitment) = self.astra_final_states(ids, astra)?;
        Ok(AstraOutput {
            logits: self.head(&x),
            commitment,
        })
    }

    /// [`Self::forward_astra`]'s states after the last block, and the summed commitment.
    pub fn astra_final_states(&self, ids: &Tensor, astra: Astra) -> Result<(Tensor, Tensor)> {
        let t = ids.size().get(1).copied().unwrap_or(0);
        if astra.partition.tokens() as i64 != t {
            return Err(TrainError::invalid(
                "partition",
                format!(
                    "covers {} tokens, the input has {t}",
                    astra.partition.tokens()
                ),
            ));
        }
        self.check_length(t)?;
        let dev = ids.device();
        let cs = self.positions(t, ids);
        let sent_tokens = astra.partition.sent_tokens(true);
        let mask = Layout {
            partition: astra.partition,
            cls: 0,
            causal: true,
            sent: Some(&sent_tokens),
            loss: astra.link_loss,
        }
        .mask(dev);
        let sent: Vec<i64> = sent_tokens.iter().map(|&i| i as i64).collect();
        let sent = Tensor::from_slice(&sent).to_device(dev);
        let sent_cs = (cs.0.index_select(0, &sent), cs.1.index_select(0, &sent));
        let mut vq = astra.vq;
        if let Some(v) = &vq {
            check_quantizers(v.len(), self.blocks.len())?;
        }
        let mut x = self.embed(ids)?;
        let mut commitment = Tensor::zeros([], (Kind::Float, dev));
        for (l, blk) in self.blocks.iter().enumerate() {
            let (k, v) = blk.keys_values(&x.index_select(1, &sent));
            let (kq, vq_) = match vq.as_deref_mut() {
                Some(q) => {
                    let (qk, qv) = q.split_at_mut(2 * l + 1);
                    let kq = qk[2 * l].quantize(&k, astra.train);
                    let vq_ = qv[0].quantize(&v, astra.train);
                    commitment += kq.commitment + vq_.commitment;
                    (kq.value, vq_.value)
                }
                None => (k, v),
            };
            let remote = RemoteKeys {
                keys: &kq,
                values: &vq_,
                cos_sin: &sent_cs,
            };
            x = blk.forward(&x, &cs, Some(remote), Sight::Mask(&mask));
        }
        Ok((x, commitment))
    }
}

/// Two quantizers per block (keys, values).
fn check_quantizers(have: usize, blocks: usize) -> Result<()> {
    if have != 2 * blocks {
        return Err(TrainError::invalid(
            "codebooks",
            format!(
                "{have} quantizers for a Llama of {blocks} blocks (keys and values: {})",
                2 * blocks
            ),
        ));
    }
    Ok(())
}

impl AstraModel for Llama {
    fn blocks(&self) -> usize {
        self.blocks.len()
    }
    fn hidden(&self) -> i64 {
        self.cfg.hidden_size
    }
    fn quantizers_per_block(&self) -> usize {
        2
    }
    fn quantized_width(&self) -> i64 {
        self.cfg.kv_dim()
    }
    fn is_causal(&self) -> bool {
        true
    }
    fn cls_copies(&self, _cls: ClsMode, _devices: usize) -> usize {
        0
    }
    fn content_tokens(&self, ids: &Tensor) -> i64 {
        ids.size().get(1).copied().unwrap_or(0)
    }
    fn embed_share(&self, ids: &Tensor, mine: &Tensor, _with_cls: bool) -> Result<Tensor> {
        self.check_length(self.content_tokens(ids))?;
        self.embed(&ids.index_select(1, mine))
    }
    fn sent_states(&self, l: usize, content: &Tensor) -> Vec<Tensor> {
        let (k, v) = self.blocks[l].keys_values(content);
        vec![k, v]
    }
    fn block_step(
        &self,
        l: usize,
        x: &Tensor,
        at: crate::engine::Positions<'_>,
        remote: Remote<'_>,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let blk = &self.blocks[l];
        let cs = self.rotary.cos_sin(at.local);
        let kv_dim = self.cfg.kv_dim();
        let remote_kv = match remote {
            Remote::Nothing => None,
            // Unquantized remote tokens (the SP baseline, or ASTRA without codebooks): their
            // keys and values computed here, as their own device would.
            Remote::Tokens(e) => Some(blk.keys_values(e)),
            Remote::KeysValues(kv) => Some((kv.narrow(2, 0, kv_dim), kv.narrow(2, kv_dim, kv_dim))),
            Remote::Codewords { .. } => unreachable!("{NO_CODEWORDS}"),
        };
        match remote_kv {
            None => blk.forward(x, &cs, None, Sight::Causal),
            Some((k, v)) => {
                let rcs = self.rotary.cos_sin(at.remote);
                let r = RemoteKeys {
                    keys: &k,
                    values: &v,
                    cos_sin: &rcs,
                };
                blk.forward(x, &cs, Some(r), mask.map_or(Sight::Causal, Sight::Mask))
            }
        }
    }
    fn codeword_kv(&self, _l: usize, _codebook: &Tensor) -> Option<CodewordKv> {
        None
    }
    fn head(&self, states: &Tensor) -> Tensor {
        Llama::head(self, states)
    }
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        Llama::forward(self, input)
    }
    fn forward_astra(&self, input: &Tensor, astra: Astra) -> Result<AstraOutput> {
        Llama::forward_astra(self, input, astra)
    }
    fn lm_head(&self) -> Option<LmHead<'_>> {
        Some(LmHead {
            norm: &self.norm,
            weight: &self.lm_head,
        })
    }
    fn final_states(
        &self,
        input: &Tensor,
        astra: Option<Astra>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        super::lm_head::plain_or_astra(
            astra,
            || Llama::final_states(self, input),
            |a| self.astra_final_states(input, a),
        )
    }
    fn block_inputs(&self, input: &Tensor) -> Result<Vec<Tensor>> {
        Llama::block_inputs(self, input)
    }
    fn as_decoder(&self) -> Option<&dyn Decoder> {
        Some(self)
    }
}

/// Head layout [B, kvh, n, hd] → the cache's flat [B, n, kv_dim].
fn flat(t: &Tensor) -> Tensor {
    let (b, h, n, hd) = t.size4().expect("[B, kvh, n, hd]");
    t.transpose(1, 2).reshape([b, n, h * hd])
}

impl Decoder for Llama {
    fn embed_at(&self, ids: &Tensor, _positions: &Tensor) -> Result<Tensor> {
        self.embed(ids)
    }
    fn local_kv(&self, l: usize, x: &Tensor, positions: &Tensor) -> (Tensor, Tensor) {
        let blk = &self.blocks[l];
        let h = x.apply(&blk.input_layernorm);
        let (k, v) = blk.rotated_kv(&h, &self.rotary.cos_sin(positions));
        (flat(&k), flat(&v))
    }
    fn remote_kv(
        &self,
        l: usize,
        remote: Remote<'_>,
        positions: &Tensor,
    ) -> Option<(Tensor, Tensor)> {
        let blk = &self.blocks[l];
        let (k, v) = match remote {
            Remote::Nothing => return None,
            Remote::Tokens(e) => blk.keys_values(e),
            Remote::KeysValues(kv) => {
                let w = self.cfg.kv_dim();
                (kv.narrow(2, 0, w), kv.narrow(2, w, w))
            }
            Remote::Codewords { .. } => unreachable!("{NO_CODEWORDS}"),
        };
        let (k, v) = blk.rotate_kv(&k, &v, &self.rotary.cos_sin(positions));
        Some((flat(&k), flat(&v)))
    }
    fn decode_step(
        &self,
        l: usize,
        x: &Tensor,
        position: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        remote_log_count: Option<&Tensor>,
    ) -> (Tensor, Tensor, Tensor) {
        if remote_log_count.is_some() {
            unreachable!("{NO_CODEWORDS}");
        }
        let blk = &self.blocks[l];
        let cs = self.rotary.cos_sin(position);
        let h = x.apply(&blk.input_layernorm);
        let (k, v) = blk.rotated_kv(&h, &cs);
        let heads = |t: &Tensor| blk.heads_of(&t.to_kind(k.kind()), self.cfg.num_key_value_heads);
        let all_k = Tensor::cat(&[heads(keys), k.shallow_clone()], 2);
        let all_v = Tensor::cat(&[heads(values), v.shallow_clone()], 2);
        // One query that sees every key: no mask, not causal (SDPA aligns is_causal top-left).
        let out = blk.attend_and_mlp(x, &h, &cs, (&all_k, &all_v), Sight::All);
        (out, flat(&k), flat(&v))
    }
    fn max_positions(&self) -> i64 {
        self.cfg.max_position_embeddings
    }
}
