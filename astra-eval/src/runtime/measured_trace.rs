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
        codebooks_per_block: 1,
    };
    let (method, bits_per_token) = match m.codebooks {
        None => (Method::Sp, 32 * m.hidden as u64),
        Some(path) => {
            let file = astra_quant::CodebookFile::load(path)?;
            let cb = &file.blocks[0].codebook;
            shape.index_bits = bitpack::bits_for(cb.k());
            let g = cb.groups() as u32;
            // A block sends the indices of each of its quantizers: one (the block input), or
            // two (Llama's keys and values: the file holds 2 per block).
            shape.codebooks_per_block = (file.blocks.len() as u32 / m.blocks.max(1)).max(1);
            (
                Method::Astra { groups: g },
                shape.payload_bits(Method::Astra { groups: g }, 1),
            )
        }
    };
    let sizes: Vec<u64> = (0..n as u64)
        .map(|d| tokens / n as u64 + u64::from(d < tokens % n as u64))
        .collect();
    let wire = Wire {
        devices: n,
        causal: m.causal,
        bits_per_share: sizes.iter().map(|&s| batch * s * bits_per_token).collect(),
    };
    let programs = timings
        .iter()
        .enumerate()
        .map(|(d, t)| device_program(&wire, d, t))
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

/// What each device puts on the wire per block.
struct Wire {
    devices: u32,
    causal: bool,
    /// Bits of one device's share of the batch (indices or embeddings), per device.
    bits_per_share: Vec<u64>,
}

/// Device `d`'s program from its measured per-block timings (encode, exchange, attend + MLP).
fn device_program(w: &Wire, d: usize, timings: &[f64]) -> Vec<Op> {
    let n = w.devices;
    let mut ops = Vec::new();
    for (l, b) in timings.chunks_exact(3).enumerate() {
        let id = ops.len() as u32;
        ops.push(Op {
            id,
            kind: OpKind::Compute {
                ms: b[0],
                label: format!("block {l} encode"),
            },
            deps: None,
        });
        if n > 1 && !w.causal {
            ops.push(Op {
                id: id + 1,
                kind: OpKind::AllGather(Comm {
                    bits: w.bits_per_share[d],
                    peers: (0..n).collect(),
                    tag: format!("block {l}"),
                }),
                deps: Some(vec![id]),
            });
        }
        let received = if w.causal {
            causal_sends(w, d, l, id, &mut ops)
        } else {
            Vec::new()
        };
        let last = ops.len() as u32;
        // After the exchange: an encoder waits for its all-gather, a decoder for what it
        // received (its own sends go out from a sender thread).
        let deps = if w.causal {
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
}

/// Causal: every (sender < receiver) pair device `d` is in, in one global order, after op
/// `after`; returns the ops of what `d` receives.
fn causal_sends(w: &Wire, d: usize, l: usize, after: u32, ops: &mut Vec<Op>) -> Vec<u32> {
    let n = w.devices as usize;
    let mut received = Vec::new();
    for from in 0..n {
        for to in from + 1..n {
            if d != from && d != to {
                continue;
            }
            let op = ops.len() as u32;
            ops.push(Op {
                id: op,
                kind: OpKind::Send(Comm {
                    bits: w.bits_per_share[from],
                    peers: vec![from as u32, to as u32],
                    tag: format!("block {l} {from}->{to}"),
                }),
                deps: Some(vec![after]),
            });
            if d == to {
                received.push(op);
            }
        }
    }
    received
}
