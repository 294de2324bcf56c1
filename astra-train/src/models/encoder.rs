//! A bare Transformer encoder over given token embeddings: the ViT's blocks (HF layout, the same
//! `VitBlock` code) without patches, CLS or head. It is what the paper's latency study measures
//! (an L-block, D-wide encoder over T tokens, any T), so `astra-eval profile` times the device
//! engine on it rather than a block of its own.

use tch::{nn, Tensor};

use super::fast_kv::CodewordKv;
use super::layers::Sight;
use super::mpa::Layout;
use super::vit::VitBlock;
use super::{Astra, AstraOutput, ClsMode};
use crate::config::ViTConfig;
use crate::engine::{AstraModel, Positions, Remote};
use crate::error::{Result, TrainError};

pub struct Encoder {
    blocks: Vec<VitBlock>,
    hidden: i64,
    eps: f64,
}

impl Encoder {
    /// The blocks of `cfg` (its hidden size, heads, MLP width, depth; patches and labels unused)
    /// under `root`, randomly initialised.
    pub fn new(root: &nn::Path, cfg: &ViTConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Encoder {
            blocks: (0..cfg.num_hidden_layers)
                .map(|i| VitBlock::new(root / "layer" / i, cfg))
                .collect(),
            hidden: cfg.hidden_size,
            eps: cfg.layer_norm_eps,
        })
    }

    fn check(&self, x: &Tensor) -> Result<()> {
        let s = x.size();
        if s.len() != 3 || s[2] != self.hidden {
            return Err(TrainError::invalid(
                "tokens",
                format!("shape {s:?}, expected [B, T, {}]", self.hidden),
            ));
        }
        Ok(())
    }
}

impl AstraModel for Encoder {
    fn blocks(&self) -> usize {
        self.blocks.len()
    }
    fn hidden(&self) -> i64 {
        self.hidden
    }
    fn is_causal(&self) -> bool {
        false
    }
    fn cls_copies(&self, _cls: ClsMode, _devices: usize) -> usize {
        0
    }
    fn content_tokens(&self, x: &Tensor) -> i64 {
        x.size().get(1).copied().unwrap_or(0)
    }
    fn embed_share(&self, x: &Tensor, mine: &Tensor, _with_cls: bool) -> Result<Tensor> {
        self.check(x)?;
        Ok(x.index_select(1, mine))
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
        Some(self.blocks[l].codeword_kv(codebook, self.eps))
    }
    /// The final states themselves (no head).
    fn head(&self, states: &Tensor) -> Tensor {
        states.shallow_clone()
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.check(x)?;
        Ok(self
            .blocks
            .iter()
            .fold(x.shallow_clone(), |x, b| b.forward(&x, None, Sight::All)))
    }
    fn forward_astra(&self, x: &Tensor, astra: Astra) -> Result<AstraOutput> {
        self.check(x)?;
        let mask = Layout {
            partition: astra.partition,
            cls: 0,
            causal: false,
            sent: None,
            loss: astra.link_loss,
        }
        .mask(x.device());
        let (x, commitment) = super::masked_blocks(
            self.blocks.len(),
            x.shallow_clone(),
            0,
            None,
            astra.vq,
            astra.train,
            |l, x, xq| self.blocks[l].forward(x, Some(xq), Sight::Mask(&mask)),
        )?;
        Ok(AstraOutput {
            logits: x,
            commitment,
        })
    }
    fn block_inputs(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.check(x)?;
        let mut out = Vec::with_capacity(self.blocks.len());
        let mut x = x.shallow_clone();
        for blk in &self.blocks {
            out.push(x.shallow_clone());
            x = blk.forward(&x, None, Sight::All);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{run_in_memory, RemoteKv};
    use crate::models::DevicePartition;

    #[test]
    fn per_device_engine_equals_the_mask_on_the_bare_encoder() {
        tch::manual_seed(11);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let cfg = ViTConfig {
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            ..ViTConfig::vit_base_patch16_224(2)
        };
        let enc = Encoder::new(&vs.root(), &cfg).unwrap();
        let x = Tensor::randn([2, 10, 16], (tch::Kind::Float, tch::Device::Cpu));
        let p = DevicePartition::contiguous(10, 3).unwrap();
        let astra = Astra {
            partition: &p,
            cls: ClsMode::Single,
            vq: None,
            train: false,
            link_loss: None,
        };
        let masked = tch::no_grad(|| enc.forward_astra(&x, astra))
            .unwrap()
            .logits;
        let plain = tch::no_grad(|| enc.forward(&x)).unwrap();
        let per =
            tch::no_grad(|| run_in_memory(&enc, &x, &p, ClsMode::Single, &[], RemoteKv::Decode))
                .unwrap();
        let rel = |a: &Tensor, b: &Tensor| {
            (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
        };
        // Unquantized exchange: every path is the plain encoder.
        assert!(rel(&masked, &plain) < 1e-5);
        assert!(rel(&per, &plain) < 1e-5);
    }
}
