//! ViT for image classification with parameter names of HF `ViTForImageClassification`
//! (`vit.embeddings.*`, `vit.encoder.layer.{i}.*`, `vit.layernorm`, `classifier`).

use tch::nn;
use tch::{Kind, Tensor};

use super::fast_kv::CodewordKv;
use super::layers::{
    activate, append_remote, attend, codeword_bias, linear, linears, stacked_rows, Linear, Sight,
};
use super::mpa::Layout;
use super::{Astra, AstraOutput, ClsMode};
use crate::config::ViTConfig;
use crate::engine::{AstraModel, Positions, Remote};
use crate::error::{Result, TrainError};

#[derive(Debug)]
pub struct VitBlock {
    ln_before: nn::LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    ln_after: nn::LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: i64,
    act: String,
}

impl VitBlock {
    pub(crate) fn new(p: nn::Path, c: &ViTConfig) -> Self {
        let d = c.hidden_size;
        let ln = nn::LayerNormConfig {
            eps: c.layer_norm_eps,
            ..Default::default()
        };
        let lin = nn::LinearConfig {
            bias: true,
            ..Default::default()
        };
        let qkv = nn::LinearConfig {
            bias: c.qkv_bias,
            ..Default::default()
        };
        let att = &p / "attention";
        VitBlock {
            ln_before: nn::layer_norm(&p / "layernorm_before", vec![d], ln),
            query: linear(&att / "attention" / "query", d, d, qkv),
            key: linear(&att / "attention" / "key", d, d, qkv),
            value: linear(&att / "attention" / "value", d, d, qkv),
            out: linear(&att / "output" / "dense", d, d, lin),
            ln_after: nn::layer_norm(&p / "layernorm_after", vec![d], ln),
            fc1: linear(&p / "intermediate" / "dense", d, c.intermediate_size, lin),
            fc2: linear(&p / "output" / "dense", c.intermediate_size, d, lin),
            heads: c.num_attention_heads,
            act: c.hidden_act.clone(),
        }
    }

    /// One block. `quantized`: X̃ of the content tokens [B, T, D]; the keys are then [full keys
    /// of x | keys of X̃], seen as `sight` says (MPA's mask or device groups; `Sight::All` is the
    /// view of one device: x = its local tokens, X̃ = the other devices' tokens).
    pub fn forward(&self, x: &Tensor, quantized: Option<&Tensor>, sight: Sight<'_>) -> Tensor {
        let h = x.apply(&self.ln_before);
        let [q, k, v] = match quantized {
            None => linears(&h, [&self.query, &self.key, &self.value]),
            Some(xq) => {
                // Keys and values of [x | X̃] from one GEMM over both rows (see stacked_rows).
                let (h, rows) = stacked_rows(&h, &xq.apply(&self.ln_before));
                let [k, v] = linears(&rows, [&self.key, &self.value]);
                [h.apply(&self.query), k, v]
            }
        };
        let x = x + attend(&q, &k, &v, self.heads, sight).apply(&self.out);
        let h = x.apply(&self.ln_after);
        &x + activate(&h.apply(&self.fc1), &self.act).apply(&self.fc2)
    }

    /// The device engine's block step (bidirectional: no mask).
    pub(crate) fn step(&self, x: &Tensor, remote: Remote<'_>) -> Tensor {
        match remote {
            Remote::Nothing => self.forward(x, None, Sight::All),
            Remote::Tokens(e) => self.forward(x, Some(e), Sight::All),
            Remote::KeysValues(kv) => self.forward_kv(x, Some(kv), None),
            Remote::Codewords { kv, log_count } => self.forward_kv(x, Some(kv), Some(log_count)),
        }
    }

    /// Keys/values of remote tokens straight from their indices for this block's LayerNorm and
    /// key/value projections (the fast inference path, [`CodewordKv`]).
    pub fn codeword_kv(&self, codebook: &Tensor, eps: f64) -> CodewordKv {
        let d = codebook.size()[0] * codebook.size()[2];
        let ones = Tensor::ones([d], (Kind::Float, codebook.device()));
        let zeros = Tensor::zeros([d], (Kind::Float, codebook.device()));
        CodewordKv::new(
            codebook,
            self.ln_before.ws.as_ref().unwrap_or(&ones),
            self.ln_before.bs.as_ref().unwrap_or(&zeros),
            &self.key.ws,
            self.key.bs.as_ref(),
            &self.value.ws,
            self.value.bs.as_ref(),
            eps,
        )
    }

    /// One block on a device's local tokens `x`, with the remote tokens' keys and values given
    /// directly (`remote_kv` [B, T_r, 2D], keys first; with `log_count` [B, T_r] they are
    /// distinct codewords standing for that many tokens each); no mask (one device's view).
    pub fn forward_kv(
        &self,
        x: &Tensor,
        remote_kv: Option<&Tensor>,
        log_count: Option<&Tensor>,
    ) -> Tensor {
        let h = x.apply(&self.ln_before);
        let q = h.apply(&self.query);
        let (mut k, mut v) = (h.apply(&self.key), h.apply(&self.value));
        let bias = log_count.map(|c| codeword_bias(k.size()[1], c, None).to_kind(q.kind()));
        if let Some(kv) = remote_kv {
            (k, v) = append_remote(k, v, kv, q.kind());
        }
        let sight = bias.as_ref().map_or(Sight::All, Sight::Bias);
        let x = x + attend(&q, &k, &v, self.heads, sight).apply(&self.out);
        let h = x.apply(&self.ln_after);
        &x + activate(&h.apply(&self.fc1), &self.act).apply(&self.fc2)
    }
}

#[derive(Debug)]
pub struct ViT {
    pub cfg: ViTConfig,
    patch: nn::Conv2D,
    cls_token: Tensor,
    pos: Tensor,
    pub blocks: Vec<VitBlock>,
    ln: nn::LayerNorm,
    classifier: nn::Linear,
}

impl ViT {
    /// Parameters under `root` with HF names (`vit.…`, `classifier`).
    pub fn new(root: &nn::Path, cfg: &ViTConfig) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.hidden_size;
        let vit = root / "vit";
        let emb = &vit / "embeddings";
        let patch = nn::conv2d(
            &emb / "patch_embeddings" / "projection",
            cfg.num_channels,
            d,
            cfg.patch_size,
            nn::ConvConfig {
                stride: cfg.patch_size,
                ..Default::default()
            },
        );
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        Ok(ViT {
            cfg: cfg.clone(),
            patch,
            cls_token: emb.var("cls_token", &[1, 1, d], init),
            pos: emb.var("position_embeddings", &[1, cfg.num_patches() + 1, d], init),
            blocks: (0..cfg.num_hidden_layers)
                .map(|i| VitBlock::new(&vit / "encoder" / "layer" / i, cfg))
                .collect(),
            ln: nn::layer_norm(
                &vit / "layernorm",
                vec![d],
                nn::LayerNormConfig {
                    eps: cfg.layer_norm_eps,
                    ..Default::default()
                },
            ),
            classifier: nn::linear(root / "classifier", d, cfg.classes(), Default::default()),
        })
    }

    /// The shape of `images`, which must be [B, C, H, W] of the model's size.
    fn check_images(&self, images: &Tensor) -> Result<Vec<i64>> {
        let c = &self.cfg;
        let s = images.size();
        if s.len() != 4 || s[1] != c.num_channels || s[2] != c.image_size || s[3] != c.image_size {
            return Err(TrainError::invalid(
                "images",
                format!(
                    "shape {s:?}, the model expects [B, {}, {}, {}]",
                    c.num_channels, c.image_size, c.image_size
                ),
            ));
        }
        Ok(s)
    }

    /// The CLS embedding [1, 1, D] (with its position) and the patch tokens [B, P, D].
    pub fn embed(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = &self.cfg;
        self.check_images(images)?;
        let x = images
            .to_kind(self.pos.kind())
            .apply(&self.patch)
            .flatten(2, 3)
            .transpose(1, 2);
        let tokens = x + self.pos.narrow(1, 1, c.num_patches());
        let cls = &self.cls_token + self.pos.narrow(1, 0, 1);
        Ok((cls, tokens))
    }

    /// Final LayerNorm of the CLS copies [B, C, D], mean-pooled, then the classifier.
    pub fn head(&self, cls_states: &Tensor) -> Tensor {
        // DCT: each CLS copy final-LayerNormed, the copies mean-pooled, the head run once.
        cls_states
            .apply(&self.ln)
            .mean_dim(1, false, Kind::Float)
            .to_kind(cls_states.kind())
            .apply(&self.classifier)
    }

    /// The input of every block for the content tokens, [B, T, D] each (plain model): what
    /// codebooks are calibrated on.
    pub fn block_inputs(&self, images: &Tensor) -> Result<Vec<Tensor>> {
        let (cls, tokens) = self.embed(images)?;
        let b = tokens.size()[0];
        let mut x = Tensor::cat(&[cls.expand([b, 1, -1], false), tokens], 1);
        let t = x.size()[1] - 1;
        let mut out = Vec::with_capacity(self.blocks.len());
        for blk in &self.blocks {
            out.push(x.narrow(1, 1, t));
            x = blk.forward(&x, None, Sight::All);
        }
        Ok(out)
    }

    /// The plain model.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let (cls, tokens) = self.embed(images)?;
        let b = tokens.size()[0];
        let mut x = Tensor::cat(&[cls.expand([b, 1, -1], false), tokens], 1);
        for blk in &self.blocks {
            x = blk.forward(&x, None, Sight::All);
        }
        Ok(self.head(&x.narrow(1, 0, 1)))
    }

    /// All devices simulated in one process under Mixed-Precision Attention (training and the
    /// reference for the per-device path).
    pub fn forward_astra(&self, images: &Tensor, astra: Astra) -> Result<AstraOutput> {
        let (cls, tokens) = self.embed(images)?;
        let (b, t, _) = tokens.size3()?;
        if astra.partition.tokens() as i64 != t {
            return Err(TrainError::invalid(
                "partition",
                format!(
                    "covers {} tokens, the image has {t}",
                    astra.partition.tokens()
                ),
            ));
        }
        let n_cls = astra.cls.copies(astra.partition.devices()) as i64;
        let mask = Layout {
            partition: astra.partition,
            cls: n_cls as usize,
            causal: false,
            sent: None,
            loss: astra.link_loss,
        }
        .mask(tokens.device());
        let x = Tensor::cat(&[cls.expand([b, n_cls, -1], false), tokens], 1);
        let (x, commitment) = super::masked_blocks(
            self.blocks.len(),
            x,
            n_cls,
            None,
            astra.vq,
            astra.train,
            |l, x, xq| self.blocks[l].forward(x, Some(xq), Sight::Mask(&mask)),
        )?;
        Ok(AstraOutput {
            logits: self.head(&x.narrow(1, 0, n_cls)),
            commitment,
        })
    }
}

impl AstraModel for ViT {
    fn blocks(&self) -> usize {
        self.blocks.len()
    }
    fn hidden(&self) -> i64 {
        self.cfg.hidden_size
    }
    fn is_causal(&self) -> bool {
        false
    }
    fn cls_copies(&self, cls: ClsMode, devices: usize) -> usize {
        cls.copies(devices)
    }
    fn content_tokens(&self, _input: &Tensor) -> i64 {
        self.cfg.num_patches()
    }

    /// Only the device's own patches go through the patch projection (as a matmul on the
    /// unfolded patches, which is what the strided convolution computes).
    fn embed_share(&self, images: &Tensor, mine: &Tensor, with_cls: bool) -> Result<Tensor> {
        let c = &self.cfg;
        let s = self.check_images(images)?;
        let (b, p, d) = (s[0], c.patch_size, c.hidden_size);
        let patches = images
            .to_kind(self.pos.kind())
            .unfold(2, p, p)
            .unfold(3, p, p)
            .permute([0, 2, 3, 1, 4, 5])
            .reshape([b, c.num_patches(), c.num_channels * p * p])
            .index_select(1, mine);
        let w = self.patch.ws.reshape([d, -1]);
        let mut x = patches.matmul(&w.transpose(0, 1));
        if let Some(bias) = &self.patch.bs {
            x += bias;
        }
        let x = x + self.pos.narrow(1, 1, c.num_patches()).index_select(1, mine);
        if !with_cls {
            return Ok(x);
        }
        let cls = &self.cls_token + self.pos.narrow(1, 0, 1);
        Ok(Tensor::cat(&[cls.expand([b, 1, -1], false), x], 1))
    }

    fn block_step(
        &self,
        l: usize,
        x: &Tensor,
        _at: Positions<'_>,
        remote: Remote<'_>,
        _mask: Option<&Tensor>,
    ) -> Tensor {
        self.blocks[l].step(x, remote)
    }

    fn codeword_kv(&self, l: usize, codebook: &Tensor) -> Option<CodewordKv> {
        Some(self.blocks[l].codeword_kv(codebook, self.cfg.layer_norm_eps))
    }

    fn head(&self, states: &Tensor) -> Tensor {
        ViT::head(self, states)
    }
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        ViT::forward(self, input)
    }
    fn forward_astra(&self, input: &Tensor, astra: Astra) -> Result<AstraOutput> {
        ViT::forward_astra(self, input, astra)
    }
    fn block_inputs(&self, input: &Tensor) -> Result<Vec<Tensor>> {
        ViT::block_inputs(self, input)
    }
}

pub(crate) fn check_blocks(quantizers: usize, blocks: usize) -> Result<()> {
    if quantizers != blocks {
        return Err(TrainError::invalid(
            "codebooks",
            format!("{quantizers} block quantizers for a model of {blocks} blocks"),
        ));
    }
    Ok(())
}
