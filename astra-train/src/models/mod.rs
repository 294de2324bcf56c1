//! The models (ViT, GPT-2, Llama/Mistral/Qwen2) with Mixed-Precision Attention, grouped VQ, NAQ and DCT.
pub mod encoder;
pub mod fast_kv;
pub mod gpt2;
pub mod layers;
pub mod llama;
pub mod lm_head;
pub mod mpa;
pub mod vit;
pub mod vq;

pub use mpa::{mixed_precision_mask, mixed_precision_mask_with_loss, ClsMode, DevicePartition};
pub use vq::{GroupedVq, Quantized, VqConfig};

/// ASTRA settings for a forward pass: the partition of content tokens, where the CLS lives, and the
/// per-block quantizers (None: the identity quantizer, X̂ = X, under which MPA is plain attention).
pub struct Astra<'a> {
    pub partition: &'a DevicePartition,
    pub cls: ClsMode,
    pub vq: Option<&'a mut [GroupedVq]>,
    pub train: bool,
    /// Lost index messages (the masked path only): None, every remote token arrives.
    pub link_loss: Option<LinkLoss>,
}

/// Each remote token's indices fail to reach each other device independently with probability
/// `p`; the receiver then masks that token out (it has nothing to attend to). One draw per
/// forward pass (shared by the batch), from `seed`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkLoss {
    pub p: f64,
    pub seed: u64,
}

/// What an ASTRA forward returns besides the logits: Σ over blocks of the commitment losses.
pub struct AstraOutput {
    pub logits: tch::Tensor,
    pub commitment: tch::Tensor,
}

/// The masked formulation's block loop, shared by every model: per block, the content states
/// (`content_from` of them: after the CLS copies; only those at `sent`, when given, the tokens
/// another device attends to) are quantized (commitment summed; identity without quantizers)
/// and the block runs with [full | quantized] keys under `mask`. Returns the final states and
/// the summed commitment.
pub(crate) fn masked_blocks(
    blocks: usize,
    mut x: tch::Tensor,
    content_from: i64,
    sent: Option<&tch::Tensor>,
    mut vq: Option<&mut [GroupedVq]>,
    train: bool,
    block: impl Fn(usize, &tch::Tensor, &tch::Tensor) -> tch::Tensor,
) -> crate::error::Result<(tch::Tensor, tch::Tensor)> {
    if let Some(v) = &vq {
        vit::check_blocks(v.len(), blocks)?;
    }
    let mut commitment = tch::Tensor::zeros([], (tch::Kind::Float, x.device()));
    for l in 0..blocks {
        let t = x.size()[1] - content_from;
        let mut content = x.narrow(1, content_from, t);
        if let Some(i) = sent {
            content = content.index_select(1, i);
        }
        let xq = match vq.as_deref_mut() {
            Some(v) => {
                let q = v[l].quantize(&content, train);
                commitment += q.commitment;
                q.value
            }
            None => content,
        };
        x = block(l, &x, &xq);
    }
    Ok((x, commitment))
}
