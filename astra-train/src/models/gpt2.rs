//! GPT-2 language model with parameter names of HF `GPT2LMHeadModel`
//! (`transformer.{wte,wpe,h.{i}.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj},ln_f}`,
//! Conv1D weights stored [in, out], `lm_head` tied to `wte`).

use tch::nn;
use tch::{Kind, Tensor};

use super::fast_kv::CodewordKv;
use super::layers::{
    activate, append_remote, attend, codeword_bias, conv1d, stacked_rows, Conv1D, Sight,
};
use super::lm_head::LmHead;
use super::mpa::Layout;
use super::{Astra, AstraOutput, ClsMode};
use crate::config::GPT2Config;
use crate::engine::{AstraModel, Decoder, Positions, Remote};
use crate::error::{Result, TrainError};

#[derive(Debug)]
pub struct GptBlock {
    ln_1: nn::LayerNorm,
    c_attn: Conv1D,
    c_proj: Conv1D,
    ln_2: nn::LayerNorm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
    heads: i64,
    act: String,
}

impl GptBlock {
    fn new(p: nn::Path, c: &GPT2Config) -> Self {
        let d = c.n_embd;
        let ln = nn::LayerNormConfig {
            eps: c.layer_norm_epsilon,
            ..Default::default()
        };
        GptBlock {
            ln_1: nn::layer_norm(&p / "ln_1", vec![d], ln),
            c_attn: Conv1D::new(&p / "attn" / "c_attn", d, 3 * d),
            c_proj: Conv1D::new(&p / "attn" / "c_proj", d, d),
            ln_2: nn::layer_norm(&p / "ln_2", vec![d], ln),
            c_fc: Conv1D::new(&p / "mlp" / "c_fc", d, c.inner()),
            mlp_proj: Conv1D::new(&p / "mlp" / "c_proj", c.inner(), d),
            heads: c.n_head,
            act: c.activation_function.clone(),
        }
    }

    /// One block; keys are [x | quantized] when `quantized` is given, seen as `sight` says
    /// (`Sight::Causal`: plain causal attention).
    pub fn forward(&self, x: &Tensor, quantized: Option<&Tensor>, sight: Sight<'_>) -> Tensor {
        let (q, k, v) = match quantized {
            None => self.qkv(x),
            Some(xq) => self.qkv_with(x, xq),
        };
        self.finish(x, &q, &k, &v, sight)
    }

    /// Queries of `x` and keys and values of [x | xq]: the queries from the first third of
    /// c_attn, the keys and values from its last two thirds in one GEMM over both rows (the
    /// quantized copies are never queries; see stacked_rows).
    fn qkv_with(&self, x: &Tensor, xq: &Tensor) -> (Tensor, Tensor, Tensor) {
        let d = self.c_proj.weight.size()[0];
        let (w, b) = (&self.c_attn.weight, &self.c_attn.bias);
        let (h, rows) = stacked_rows(&x.apply(&self.ln_1), &xq.apply(&self.ln_1));
        let q = conv1d(&h, &w.narrow(1, 0, d), &b.narrow(0, 0, d));
        let kv = conv1d(&rows, &w.narrow(1, d, 2 * d), &b.narrow(0, d, 2 * d));
        (q, kv.narrow(2, 0, d), kv.narrow(2, d, d))
    }

    /// Keys and values only (the quantized copies are never queries): the last two thirds of
    /// c_attn.
    fn kv(&self, x: &Tensor) -> (Tensor, Tensor) {
        let d = self.c_proj.weight.size()[0];
        let w = self.c_attn.weight.narrow(1, d, 2 * d);
        let b = self.c_attn.bias.narrow(0, d, 2 * d);
        let kv = conv1d(&x.apply(&self.ln_1), &w, &b);
        (kv.narrow(2, 0, d), kv.narrow(2, d, d))
    }

    /// Queries, keys and values of `x` (LayerNorm, then c_attn split in three).
    fn qkv(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let qkv = x.apply(&self.ln_1).apply(&self.c_attn);
        let p = qkv.split(qkv.size()[2] / 3, 2);
        (
            p[0].shallow_clone(),
            p[1].shallow_clone(),
            p[2].shallow_clone(),
        )
    }

    /// Attention as `sight` says, its output projection and the MLP, both residual. (A decoding
    /// step's one query sees every key: SDPA's causal mask is aligned top-left, which would hide
    /// all but the first.)
    fn finish(&self, x: &Tensor, q: &Tensor, k: &Tensor, v: &Tensor, sight: Sight<'_>) -> Tensor {
        let x = x + attend(q, k, v, self.heads, sight).apply(&self.c_proj);
        let h = x.apply(&self.ln_2);
        &x + activate(&h.apply(&self.c_fc), &self.act).apply(&self.mlp_proj)
    }

    /// Keys/values of remote tokens straight from their indices ([`CodewordKv`]): the key and
    /// value thirds of c_attn, in nn.Linear layout.
    pub fn codeword_kv(&self, codebook: &Tensor, eps: f64) -> CodewordKv {
        let d = self.c_proj.weight.size()[0];
        let w = &self.c_attn.weight; // [D, 3D]
        let b = &self.c_attn.bias;
        let ones = Tensor::ones([d], (Kind::Float, w.device()));
        let zeros = Tensor::zeros([d], (Kind::Float, w.device()));
        CodewordKv::new(
            codebook,
            self.ln_1.ws.as_ref().unwrap_or(&ones),
            self.ln_1.bs.as_ref().unwrap_or(&zeros),
            &w.narrow(1, d, d).transpose(0, 1),
            Some(&b.narrow(0, d, d)),
            &w.narrow(1, 2 * d, d).transpose(0, 1),
            Some(&b.narrow(0, 2 * d, d)),
            eps,
        )
    }

    /// One block on a device's own tokens `x` with the remote tokens' keys and values given
    /// directly (`remote_kv` [B, T_r, 2D], keys first), seen as `mask` says (causally without).
    /// With `log_count` [B, T_r] the remote rows are distinct codewords standing for that many
    /// tokens each, every one visible to every own token; the own tokens then see each other as
    /// `mask`'s first S columns say.
    pub fn forward_kv(
        &self,
        x: &Tensor,
        remote_kv: Option<&Tensor>,
        mask: Option<&Tensor>,
        log_count: Option<&Tensor>,
    ) -> Tensor {
        let (q, mut k, mut v) = self.qkv(x);
        let bias = log_count.map(|c| {
            let s = k.size()[1];
            let own = match mask {
                Some(m) => m.narrow(1, 0, s),
                None => Tensor::ones([s, s], (Kind::Bool, x.device())).tril(0),
            };
            codeword_bias(s, c, Some(&own)).to_kind(q.kind())
        });
        if let Some(kv) = remote_kv {
            (k, v) = append_remote(k, v, kv, q.kind());
        }
        let sight = match (&bias, mask) {
            (Some(b), _) => Sight::Bias(b),
            (None, Some(m)) => Sight::Mask(m),
            (None, None) => Sight::Causal,
        };
        self.finish(x, &q, &k, &v, sight)
    }
}

#[derive(Debug)]
pub struct Gpt2 {
    pub cfg: GPT2Config,
    wte: nn::Embedding,
    wpe: nn::Embedding,
    pub blocks: Vec<GptBlock>,
    ln_f: nn::LayerNorm,
}

impl Gpt2 {
    pub fn new(root: &nn::Path, cfg: &GPT2Config) -> Result<Self> {
        cfg.validate()?;
        let t = root / "transformer";
        let emb = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            ..Default::default()
        };
        Ok(Gpt2 {
            cfg: cfg.clone(),
            wte: nn::embedding(&t / "wte", cfg.vocab_size, cfg.n_embd, emb),
            wpe: nn::embedding(&t / "wpe", cfg.n_positions, cfg.n_embd, emb),
            blocks: (0..cfg.n_layer)
                .map(|i| GptBlock::new(&t / "h" / i, cfg))
                .collect(),
            ln_f: nn::layer_norm(
                &t / "ln_f",
                vec![cfg.n_embd],
                nn::LayerNormConfig {
                    eps: cfg.layer_norm_epsilon,
                    ..Default::default()
                },
            ),
        })
    }

    /// Token plus position embeddings of `ids` [B, T] at `positions` [T].
    pub fn embed(&self, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let s = ids.size();
        if s.len() != 2 {
            return Err(TrainError::invalid(
                "tokens",
                format!("shape {s:?}, expected [B, T]"),
            ));
        }
        if s[1] > self.cfg.n_positions {
            return Err(TrainError::invalid(
                "tokens",
                format!(
                    "{} tokens, the model has {} positions",
                    s[1], self.cfg.n_positions
                ),
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
        Ok(ids.apply(&self.wte) + positions.apply(&self.wpe))
    }

    /// Logits [B, T, V] from the final states (lm_head tied to wte).
    pub fn head(&self, x: &Tensor) -> Tensor {
        x.apply(&self.ln_f).matmul(&self.wte.ws.transpose(0, 1))
    }

    /// The input of every block, [B, T, D] each (plain model): what codebooks are calibrated on.
    pub fn block_inputs(&self, ids: &Tensor) -> Result<Vec<Tensor>> {
        let t = ids.size()[1];
        let pos = Tensor::arange(t, (Kind::Int64, ids.device()));
        let mut x = self.embed(ids, &pos)?;
        let mut out = Vec::with_capacity(self.blocks.len());
        for blk in &self.blocks {
            out.push(x.shallow_clone());
            x = blk.forward(&x, None, Sight::Causal);
        }
        Ok(out)
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.head(&self.final_states(ids)?))
    }

    /// The states after the last block (before `ln_f` and the head).
    pub fn final_states(&self, ids: &Tensor) -> Result<Tensor> {
        let t = ids.size()[1];
        let pos = Tensor::arange(t, (Kind::Int64, ids.device()));
        let mut x = self.embed(ids, &pos)?;
        for blk in &self.blocks {
            x = blk.forward(&x, None, Sight::Causal);
        }
        Ok(x)
    }

    /// All devices in one process under causal Mixed-Precision Attention (no CLS).
    pub fn forward_astra(&self, ids: &Tensor, astra: Astra) -> Result<AstraOutput> {
        let (x, commitment) = self.astra_final_states(ids, astra)?;
        Ok(AstraOutput {
            logits: self.head(&x),
            commitment,
        })
    }

    /// [`Self::forward_astra`]'s states after the last block, and the summed commitment.
    pub fn astra_final_states(&self, ids: &Tensor, astra: Astra) -> Result<(Tensor, Tensor)> {
        let t = ids.size()[1];
        if astra.partition.tokens() as i64 != t {
            return Err(TrainError::invalid(
                "partition",
                format!(
                    "covers {} tokens, the input has {t}",
                    astra.partition.tokens()
                ),
            ));
        }
        let pos = Tensor::arange(t, (Kind::Int64, ids.device()));
        let x = self.embed(ids, &pos)?;
        // Under the causal mask the last tokens are attended by no other device: only the sent
        // ones are quantized (and EMA-updated) and get key columns.
        let sent = astra.partition.sent_tokens(true);
        let restrict = !sent.is_empty() && sent.len() < t as usize;
        let mask = Layout {
            partition: astra.partition,
            cls: 0,
            causal: true,
            sent: restrict.then_some(&sent[..]),
            loss: astra.link_loss,
        }
        .mask(ids.device());
        let sent = restrict.then(|| {
            let idx: Vec<i64> = sent.iter().map(|&i| i as i64).collect();
            Tensor::from_slice(&idx).to_device(ids.device())
        });
        super::masked_blocks(
            self.blocks.len(),
            x,
            0,
            sent.as_ref(),
            astra.vq,
            astra.train,
            |l, x, xq| self.blocks[l].forward(x, Some(xq), Sight::Mask(&mask)),
        )
    }
}

impl AstraModel for Gpt2 {
    fn blocks(&self) -> usize {
        self.blocks.len()
    }
    fn hidden(&self) -> i64 {
        self.cfg.n_embd
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
        self.embed(&ids.index_select(1, mine), mine)
    }
    fn block_step(
        &self,
        l: usize,
        x: &Tensor,
        _at: Positions<'_>,
        remote: Remote<'_>,
        mask: Option<&Tensor>,
    ) -> Tensor {
        let blk = &self.blocks[l];
        match remote {
            Remote::Nothing => blk.forward(x, None, Sight::Causal),
            Remote::Tokens(e) => blk.forward(x, Some(e), mask.map_or(Sight::Causal, Sight::Mask)),
            Remote::KeysValues(kv) => blk.forward_kv(x, Some(kv), mask, None),
            Remote::Codewords { kv, log_count } => {
                blk.forward_kv(x, Some(kv), mask, Some(log_count))
            }
        }
    }
    fn codeword_kv(&self, l: usize, codebook: &Tensor) -> Option<CodewordKv> {
        Some(self.blocks[l].codeword_kv(codebook, self.cfg.layer_norm_epsilon))
    }
    fn head(&self, states: &Tensor) -> Tensor {
        Gpt2::head(self, states)
    }
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        Gpt2::forward(self, input)
    }
    fn forward_astra(&self, input: &Tensor, astra: Astra) -> Result<AstraOutput> {
        Gpt2::forward_astra(self, input, astra)
    }
    fn lm_head(&self) -> Option<LmHead<'_>> {
        Some(LmHead {
            norm: &self.ln_f,
            weight: &self.wte.ws,
        })
    }
    fn final_states(
        &self,
        input: &Tensor,
        astra: Option<Astra>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        super::lm_head::plain_or_astra(
            astra,
            || Gpt2::final_states(self, input),
            |a| self.astra_final_states(input, a),
        )
    }
    fn block_inputs(&self, input: &Tensor) -> Result<Vec<Tensor>> {
        Gpt2::block_inputs(self, input)
    }
    fn as_decoder(&self) -> Option<&dyn Decoder> {
        Some(self)
    }
}

impl Decoder for Gpt2 {
    fn embed_at(&self, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
        self.embed(ids, positions)
    }
    fn local_kv(&self, l: usize, x: &Tensor, _positions: &Tensor) -> (Tensor, Tensor) {
        self.blocks[l].kv(x)
    }
    fn remote_kv(
        &self,
        l: usize,
        remote: Remote<'_>,
        _positions: &Tensor,
    ) -> Option<(Tensor, Tensor)> {
        match remote {
            Remote::Tokens(e) => Some(self.blocks[l].kv(e)),
            Remote::Nothing => None,
            // The log-counts of distinct codewords travel beside, to the decode step.
            Remote::KeysValues(kv) | Remote::Codewords { kv, .. } => {
                let d = self.cfg.n_embd;
                Some((kv.narrow(2, 0, d), kv.narrow(2, d, d)))
            }
        }
    }
    fn decode_step(
        &self,
        l: usize,
        x: &Tensor,
        _position: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        remote_log_count: Option<&Tensor>,
    ) -> (Tensor, Tensor, Tensor) {
        let blk = &self.blocks[l];
        let (q, k, v) = blk.qkv(x);
        let keys = Tensor::cat(&[keys, &k.to_kind(keys.kind())], 1);
        let values = Tensor::cat(&[values, &v.to_kind(values.kind())], 1);
        // The remote codewords first, then every own key (cached and new) at weight 1.
        let bias = remote_log_count.map(|c| {
            let (b, u) = (c.size()[0], c.size()[1]);
            let own = Tensor::zeros([b, 1, 1, keys.size()[1] - u], (c.kind(), c.device()));
            Tensor::cat(&[&c.view([b, 1, 1, u]), &own], -1).to_kind(q.kind())
        });
        let sight = bias.as_ref().map_or(Sight::All, Sight::Bias);
        (blk.finish(x, &q, &keys, &values, sight), k, v)
    }
    fn max_positions(&self) -> i64 {
        self.cfg.n_positions
    }
}
