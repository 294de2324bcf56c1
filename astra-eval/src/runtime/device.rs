//! One device's share of the model in the runtime: its tokens, what it sends per block, and the
//! block computed from its own states and what it received. ViT (bidirectional: every device
//! attends to every other) and GPT-2 prefill (causal: with contiguous token slices a device only
//! needs the devices before it, so indices flow to higher ranks only).

use anyhow::Result;
use astra_train::model::{Model, Network};
use astra_train::models::fast_kv::CodewordKv;
use astra_train::models::{ClsMode, DevicePartition, GroupedVq, VqConfig};
use tch::{Kind, Tensor};

use super::Plan;

/// What a device sends per block: its content tokens' VQ indices [B, n, G] (ASTRA), or the
/// tokens themselves in fp32 [B, n, D] (SP).
pub enum Payload {
    Indices(Tensor),
    Embeddings(Tensor),
}

pub struct DeviceShare<'m> {
    model: &'m Model,
    pub rank: usize,
    pub partition: DevicePartition,
    /// 1 when this device holds a CLS copy in front of its tokens (ViT), else 0.
    pub has_cls: i64,
    mine: Tensor,
    pub vq: Vec<GroupedVq>,
    tables: Vec<CodewordKv>,
    /// Ranks whose tokens this device attends to (receives from), and ranks that attend to its
    /// tokens (sends to), ascending.
    pub sources: Vec<u32>,
    pub sinks: Vec<u32>,
    /// GPT-2: which keys [own | sources' tokens] each own query may see.
    mask: Option<Tensor>,
}

impl<'m> DeviceShare<'m> {
    pub fn new(model: &'m Model, plan: &Plan, tokens: usize) -> Result<Self> {
        let n = plan.devices as usize;
        let rank = plan.rank as usize;
        let partition = DevicePartition::contiguous(tokens, n)?;
        let vq: Vec<GroupedVq> = if plan.sp {
            Vec::new()
        } else {
            let file = astra_quant::CodebookFile::load(std::path::Path::new(&plan.codebooks))?;
            astra_train::models::vq::check_codebooks(&file, model.layers(), model.hidden())?;
            let cfg = VqConfig {
                noise_lambda: 0.0,
                ..Default::default()
            };
            file.blocks
                .iter()
                .map(|b| GroupedVq::from_quantizer(b, cfg.clone(), tch::Device::Cpu))
                .collect()
        };
        let mine_v: Vec<i64> = partition
            .tokens_of(rank)
            .iter()
            .map(|&i| i as i64)
            .collect();
        let mine = Tensor::from_slice(&mine_v);
        let others = (0..n as u32).filter(|&r| r != plan.rank);
        let (sources, sinks, has_cls, mask, tables): (Vec<u32>, Vec<u32>, _, _, Vec<_>) =
            match &model.net {
                Network::ViT(vit) => {
                    let cls = if plan.single_cls {
                        ClsMode::Single
                    } else {
                        ClsMode::Distributed
                    };
                    // Per-codeword key/value tables depend only on the model and codebooks.
                    let tables = vit
                        .blocks
                        .iter()
                        .zip(&vq)
                        .map(|(b, q)| b.codeword_kv(&q.codebook, vit.cfg.layer_norm_eps))
                        .collect();
                    let all: Vec<u32> = others.collect();
                    (
                        all.clone(),
                        all,
                        i64::from(rank < cls.copies(n)),
                        None,
                        tables,
                    )
                }
                Network::Gpt2(gpt) => {
                    let tables = gpt
                        .blocks
                        .iter()
                        .zip(&vq)
                        .map(|(b, q)| b.codeword_kv(&q.codebook, gpt.cfg.layer_norm_epsilon))
                        .collect();
                    let sources: Vec<u32> = (0..plan.rank).collect();
                    let sinks: Vec<u32> = (plan.rank + 1..n as u32).collect();
                    let before: Vec<i64> = sources
                        .iter()
                        .flat_map(|&s| partition.tokens_of(s as usize))
                        .map(|i| i as i64)
                        .collect();
                    let keys = Tensor::cat(&[mine.shallow_clone(), Tensor::from_slice(&before)], 0);
                    let mask = keys.view([1, -1]).le_tensor(&mine.view([-1, 1]));
                    (sources, sinks, 0, Some(mask), tables)
                }
            };
        Ok(DeviceShare {
            model,
            rank,
            partition,
            has_cls,
            mine,
            vq,
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

    /// The device's states before block 0: its embedded tokens (after its CLS copy, if any).
    pub fn start(&self, input: &Tensor) -> Result<Tensor> {
        Ok(match &self.model.net {
            Network::ViT(vit) => {
                let (cls, tokens) = vit.embed(input)?;
                let b = tokens.size()[0];
                let own = tokens.index_select(1, &self.mine);
                if self.has_cls == 1 {
                    Tensor::cat(&[cls.expand([b, 1, -1], false), own], 1)
                } else {
                    own
                }
            }
            Network::Gpt2(gpt) => gpt.embed(&input.index_select(1, &self.mine), &self.mine)?,
        })
    }

    /// What this device sends in block `l`.
    pub fn outgoing(&self, l: usize, local: &Tensor) -> Payload {
        let content = local.narrow(1, self.has_cls, self.own_tokens());
        match self.vq.get(l) {
            Some(q) => Payload::Indices(q.encode(&content)),
            None => Payload::Embeddings(content.to_kind(Kind::Float).contiguous()),
        }
    }

    /// Block `l` on this device, given the payloads of its sources in rank order (all of the
    /// run's kind: the worker checked every frame against it).
    pub fn block(&self, l: usize, local: &Tensor, received: &[Payload]) -> Tensor {
        let parts: Vec<&Tensor> = received
            .iter()
            .map(|p| match p {
                Payload::Indices(t) | Payload::Embeddings(t) => t,
            })
            .collect();
        let remote = (!parts.is_empty()).then(|| Tensor::cat(&parts, 1));
        // SP receives the remote tokens themselves; ASTRA their indices, turned into keys and
        // values by the per-codeword tables.
        let (emb, kv) = match remote {
            Some(r) if self.vq.is_empty() => (Some(r.to_kind(local.kind())), None),
            Some(r) => (None, Some(self.tables[l].kv(&r))),
            None => (None, None),
        };
        match &self.model.net {
            Network::ViT(vit) => match emb {
                Some(e) => vit.blocks[l].forward(local, Some(&e), None),
                None => vit.blocks[l].forward_kv(local, kv.as_ref()),
            },
            Network::Gpt2(gpt) => {
                // Remote keys need the mask; without them the attention is plainly causal.
                let mask = (kv.is_some() || emb.is_some())
                    .then_some(self.mask.as_ref())
                    .flatten();
                match emb {
                    Some(e) => gpt.blocks[l].forward(local, Some(&e), mask),
                    None => gpt.blocks[l].forward_kv(local, kv.as_ref(), mask),
                }
            }
        }
    }

    /// What this device returns to the coordinator: its CLS state [B, 1, D] (ViT; nothing
    /// without a CLS copy); for GPT-2 prefill the next-token logits [B, V] from the last device
    /// (which holds the last token), or with `all_logits` every device's final states [B, n, D].
    pub fn finish(&self, local: &Tensor, all_logits: bool) -> Option<Tensor> {
        match &self.model.net {
            Network::ViT(_) if self.has_cls == 0 => None,
            Network::ViT(_) => Some(local.narrow(1, 0, 1)),
            Network::Gpt2(_) if all_logits => Some(local.shallow_clone()),
            Network::Gpt2(gpt) if self.rank + 1 == self.partition.devices() => {
                let n = local.size()[1];
                Some(gpt.head(&local.narrow(1, n - 1, 1)).squeeze_dim(1))
            }
            Network::Gpt2(_) => None,
        }
    }
}
