//! The models (ViT, GPT-2) with Mixed-Precision Attention, grouped VQ, NAQ and DCT.
pub mod encoder;
pub mod fast_kv;
pub mod gpt2;
pub mod layers;
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
