//! A measured run as an astra-sim trace: per device and block, the compute before the exchange,
//! the exchange of its packed indices (or fp32 embeddings for SP), and the compute after it. The
//! exchange is an all-gather for an encoder (everyone attends to everyone); for a causal decoder
//! (GPT-2 prefill) it is the point-to-point sends the runtime makes, from each device to every
//! later one, in one global order (so the simulated schedule cannot deadlock).
//! `astra-sim sweep --trace FILE` then predicts the same run's latency at any bandwidth.

use std::path::Path;

use crate::error::Result;
use astra_quant::bitpack;
use astra_sim::method::{Method, ModelShape};
use astra_sim::trace::{Comm, Op, OpKind, Run, Source, Trace, FORMAT, VERSION};

/// What was measured, beside the per-worker timings.
pub struct Measured<'a> {
    /// The model as given on the command line.
    pub model: &'a str,
    pub network: &'a str,
    pub blocks: u32,
    pub hidden: u32,
    /// None: SP (fp32 embeddings).
    pub codebooks: Option<&'a Path>,
    pub tokens: u64,
    pub batch: u64,
    pub causal: bool,
}

pub fn measured(m: &Measured, timings: &[Vec<f64>]) -> Result<Trace> {
    let (network, tokens, batch) = (m.network, m.tokens, m.batch);
    let n = timings.len() as u32;
    let mut shape = ModelShape {
        blocks: m.blocks,
        hidden: m.hidden,
        element_bits: 32,
        index_bits: 10,
    };
    let (method, bits_per_token) = match m.codebooks {
        None => (Method::Sp, 32 * m.hidden as u64),
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
                let bits = |from: usize| batch * sizes[from] * bits_per_token;
                if n > 1 && !m.causal {
                    ops.push(Op {
                        id: id + 1,
                        kind: OpKind::AllGather(Comm {
                            bits: bits(d),
                            peers: (0..n).collect(),
                            tag: format!("block {l}"),
                        }),
                        deps: Some(vec![id]),
                    });
                }
                // Causal: every (sender < receiver) pair this device is in, in one global order.
                let mut received = Vec::new();
                if m.causal {
                    for from in 0..n as usize {
                        for to in from + 1..n as usize {
                            if d != from && d != to {
                                continue;
                            }
                            let op = ops.len() as u32;
                            ops.push(Op {
                                id: op,
                                kind: OpKind::Send(Comm {
                                    bits: bits(from),
                                    peers: vec![from as u32, to as u32],
                                    tag: format!("block {l} {from}->{to}"),
                                }),
                                deps: Some(vec![id]),
                            });
                            if d == to {
                                received.push(op);
                            }
                        }
                    }
                }
                let last = ops.len() as u32;
                // After the exchange: an encoder waits for its all-gather, a decoder for what it
                // received (its own sends go out from a sender thread).
                let deps = if m.causal {
                    std::iter::once(id).chain(received).collect()
                } else {
                    vec![last - 1]
                };
                ops.push(Op {
                    id: last,
                    kind: OpKind::Compute {
                        ms: b[2],
                        label: format!("block {l} attend + MLP"),
                    },
                    deps: Some(deps),
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
                "{n} worker processes ({network}), batch {batch}, model {}{}; compute as measured in the median run",
                m.model,
                if m.causal { ", causal (sends to later devices only)" } else { "" }
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
