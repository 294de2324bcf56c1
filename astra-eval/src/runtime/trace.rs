//! A measured run as an astra-sim trace: per device and block, the compute before the exchange,
//! an all-gather of its packed indices (or fp32 embeddings for SP), and the compute after it.
//! `astra-sim sweep --trace FILE` then predicts the same run's latency at any bandwidth.

use std::path::Path;

use anyhow::Result;
use astra_quant::bitpack;
use astra_sim::method::{Method, ModelShape};
use astra_sim::trace::{Comm, Op, OpKind, Run, Source, Trace, FORMAT, VERSION};
use astra_train::models::vit::ViT;

use super::coordinator::DistributedArgs;

pub fn measured(
    a: &DistributedArgs,
    network: &str,
    timings: &[Vec<f64>],
    vit: &ViT,
    codebooks: Option<&Path>,
    tokens: u64,
    batch: u64,
) -> Result<Trace> {
    let n = timings.len() as u32;
    let mut shape = ModelShape {
        blocks: vit.blocks.len() as u32,
        hidden: vit.cfg.hidden_size as u32,
        element_bits: 32,
        index_bits: 10,
    };
    let (method, bits_per_token) = match codebooks {
        None => (Method::Sp, 32 * vit.cfg.hidden_size as u64),
        Some(path) => {
            let file = astra_quant::CodebookFile::load(path)?;
            let cb = &file.blocks[0].codebook;
            shape.index_bits = bitpack::bits_for(cb.k());
            let g = cb.groups() as u32;
            (
                Method::Astra { groups: g },
                g as u64 * shape.index_bits as u64,
            )
        }
    };
    let sizes: Vec<u64> = (0..n as u64)
        .map(|d| tokens / n as u64 + u64::from(d < tokens % n as u64))
        .collect();
    let programs = timings
        .iter()
        .enumerate()
        .map(|(d, t)| {
            let mut ops = Vec::new();
            for (l, b) in t.chunks_exact(3).enumerate() {
                let id = ops.len() as u32;
                ops.push(Op {
                    id,
                    kind: OpKind::Compute {
                        ms: b[0],
                        label: format!("block {l} encode"),
                    },
                    deps: None,
                });
                if n > 1 {
                    ops.push(Op {
                        id: id + 1,
                        kind: OpKind::AllGather(Comm {
                            bits: batch * sizes[d] * bits_per_token,
                            peers: (0..n).collect(),
                            tag: format!("block {l}"),
                        }),
                        deps: Some(vec![id]),
                    });
                }
                let last = ops.len() as u32;
                ops.push(Op {
                    id: last,
                    kind: OpKind::Compute {
                        ms: b[2],
                        label: format!("block {l} attend + MLP"),
                    },
                    deps: Some(vec![last - 1]),
                });
            }
            ops
        })
        .collect();
    let trace = Trace {
        format: FORMAT.into(),
        version: VERSION,
        source: Source {
            kind: "measured".into(),
            name: "astra-eval distributed".into(),
            provenance: format!(
                "{n} worker processes ({network}), batch {batch}, model {}; compute as measured in the median run",
                a.model
            ),
        },
        model: shape,
        runs: vec![Run {
            method,
            devices: n,
            tokens,
            programs,
        }],
    };
    trace.validate()?;
    Ok(trace)
}
