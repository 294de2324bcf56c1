//! A measured run as an astra-sim trace: per device and block, the compute before the exchange,
//! the exchange of its packed indices (or fp32 embeddings for SP), and the compute after it. The
//! exchange is what the runtime puts on the wire: over TCP a send from each device to every
//! device that attends to it (all others for an encoder, the later ones for a causal decoder),
//! eager, from sender threads; with `--transport multicast` one multicast per device and block.
//! Every device sends before it receives, so the simulated schedule cannot deadlock.
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
    pub multicast: bool,
    /// What the run took beyond its workers' forwards (the go and the results' way back),
    /// replayed after every device's head so the simulator's latency is the run's end to end.
    pub outside_ms: f64,
    /// Per receiver, [block × devices]: each message's measured time from leaving its sender's
    /// uplink to being in the receiver's hands (NaN: not measured); None: none measured.
    pub latency_ms: Option<&'a [Vec<f64>]>,
    /// Per receiver, [block × devices] on its own clock: when each source's message was in its
    /// hands (its programs receive them in that order), and the ms it spent handling each.
    pub received_at: &'a [Vec<f64>],
    pub handled_ms: &'a [Vec<f64>],
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
        multicast: m.multicast,
        bits_per_share: sizes.iter().map(|&s| batch * s * bits_per_token).collect(),
        announce_bits: announce_bits(),
    };
    let programs = timings
        .iter()
        .enumerate()
        .map(|(d, t)| {
            let inbox = Inbox {
                latency: m.latency_ms.and_then(|l| l.get(d)).map(Vec::as_slice),
                received_at: m.received_at.get(d).map(Vec::as_slice),
                handled_ms: m.handled_ms.get(d).map(Vec::as_slice),
            };
            device_program(&wire, d, t, inbox, m.outside_ms)
        })
        .collect();
    let trace = Trace {
        format: FORMAT.into(),
        version: VERSION,
        source: Source {
            kind: "measured".into(),
            name: "astra-eval distributed".into(),
            provenance: format!(
                "{n} worker processes ({network}, {}), batch {batch}, model {}{}; compute as measured in the median run, then {:.3} ms outside the workers; {}",
                if m.multicast { "multicast" } else { "TCP" },
                m.model,
                if m.causal { ", causal (sends to later devices only)" } else { "" },
                m.outside_ms,
                if m.latency_ms.is_some() {
                    "each message's latency beyond the uplink as measured (its receivers' ops)"
                } else {
                    "message latencies not measured (α)"
                }
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

/// What a device measured of the messages it received, [block × devices] each (NaN: none).
#[derive(Clone, Copy, Default)]
struct Inbox<'a> {
    latency: Option<&'a [f64]>,
    received_at: Option<&'a [f64]>,
    handled_ms: Option<&'a [f64]>,
}

impl Inbox<'_> {
    fn get(t: Option<&[f64]>, i: usize) -> Option<f64> {
        t.and_then(|t| t.get(i)).copied().filter(|x| x.is_finite())
    }

    /// Block `l`'s sources in the order their messages were in hand (unmeasured ones last).
    fn order(&self, l: usize, n: usize, mut sources: Vec<usize>) -> Vec<usize> {
        let at = |from: usize| Self::get(self.received_at, l * n + from).unwrap_or(f64::INFINITY);
        sources.sort_by(|&a, &b| at(a).total_cmp(&at(b)));
        sources
    }
}

/// What each device puts on the wire per block.
struct Wire {
    devices: u32,
    causal: bool,
    /// One copy per block on the group for every receiver (UDP multicast), not one per peer.
    multicast: bool,
    /// Bits of one device's share of the batch (indices or embeddings), per device.
    bits_per_share: Vec<u64>,
    /// Multicast: the TCP announcement that follows a message to each peer, in payload bits.
    announce_bits: u64,
}

/// An announcement's wire time in the payload bits the predictions count: it is a TCP segment of
/// its own, so its headers weigh far more than a full segment's, which is what the predictions'
/// payload share (1448 of 1514 bytes) assumes. At N = 8 and 10 Mbit/s the seven announcements
/// of a block add a quarter to a G = 16 message's time on the uplink.
fn announce_bits() -> u64 {
    use astra_sim::transport::shaper::{wire_bytes, SEGMENT_OVERHEAD, SEGMENT_PAYLOAD};
    let wire = wire_bytes(super::multicast::announcement_len()) as u64;
    (8 * wire * SEGMENT_PAYLOAD as u64).div_ceil((SEGMENT_PAYLOAD + SEGMENT_OVERHEAD) as u64)
}

impl Wire {
    /// Devices `d` receives from: every other one, or (causal, contiguous shares) those before it.
    fn sources(&self, d: usize) -> Vec<usize> {
        (0..self.devices as usize)
            .filter(|&e| e != d && (!self.causal || e < d))
            .collect()
    }

    /// Devices `d` sends to, in the order its sends leave: the ranks after it, wrapping around
    /// (so the encoder's devices do not all serve device 0 first).
    fn sinks(&self, d: usize) -> Vec<usize> {
        let n = self.devices as usize;
        (1..n)
            .map(|i| (d + i) % n)
            .filter(|&e| !self.causal || e > d)
            .collect()
    }

    /// The announcement of block `l`'s multicast message from `from` to `to` (TCP, after the
    /// datagrams: a receiver uses it only to tell a lost message, so nothing waits for it).
    fn announcement(&self, l: usize, from: usize, to: usize) -> OpKind {
        OpKind::Send(Comm {
            bits: self.announce_bits,
            peers: vec![from as u32, to as u32],
            tag: format!("block {l} {from}->{to} announcement"),
            latency_ms: None,
        })
    }

    /// The op of block `l`'s message from `from` to `to` (the sender's own op when `to` is
    /// None), as both ends list it; a receiver's copy carries the latency it measured.
    fn message(&self, l: usize, from: usize, to: Option<usize>, latency_ms: Option<f64>) -> OpKind {
        let bits = self.bits_per_share[from];
        if self.multicast {
            let peers = std::iter::once(from).chain(self.sinks(from));
            return OpKind::Multicast(Comm {
                bits,
                peers: peers.map(|p| p as u32).collect(),
                tag: format!("block {l} from {from}"),
                latency_ms,
            });
        }
        let to = to.expect("a unicast send names its receiver");
        OpKind::Send(Comm {
            bits,
            peers: vec![from as u32, to as u32],
            tag: format!("block {l} {from}->{to}"),
            latency_ms,
        })
    }
}

/// Device `d`'s program from its measured timings (three per block, then the head): per block
/// encode, its sends (eager: they leave from sender threads while the device waits), what it
/// receives in the order it had it (each message with its measured latency, then the work of
/// handling it, where the inbox has them), then attend + MLP once its sources' data are in; the
/// head, then what the run took outside the workers (`outside_ms`, if any).
fn device_program(w: &Wire, d: usize, timings: &[f64], inbox: Inbox, outside_ms: f64) -> Vec<Op> {
    let mut ops: Vec<Op> = Vec::new();
    let push = |ops: &mut Vec<Op>, kind: OpKind, deps: Vec<u32>| {
        let id = ops.len() as u32;
        ops.push(Op {
            id,
            kind,
            deps: Some(deps),
        });
        id
    };
    for (l, b) in timings.chunks_exact(3).enumerate() {
        let label = format!("block {l} encode");
        let deps = ops.len().checked_sub(1).map(|i| vec![i as u32]);
        let encode = push(
            &mut ops,
            OpKind::Compute { ms: b[0], label },
            deps.unwrap_or_default(),
        );
        let sinks = w.sinks(d);
        if w.multicast && !sinks.is_empty() {
            let sent = push(&mut ops, w.message(l, d, None, None), vec![encode]);
            for to in sinks {
                push(&mut ops, w.announcement(l, d, to), vec![sent]);
            }
        } else if !w.multicast {
            for to in sinks {
                push(&mut ops, w.message(l, d, Some(to), None), vec![encode]);
            }
        }
        let mut after = vec![encode];
        let n = w.devices as usize;
        for from in inbox.order(l, n, w.sources(d)) {
            let at = l * n + from;
            let got = w.message(l, from, Some(d), Inbox::get(inbox.latency, at));
            let got = push(&mut ops, got, vec![encode]);
            if w.multicast {
                push(&mut ops, w.announcement(l, from, d), vec![encode]);
            }
            after.push(match Inbox::get(inbox.handled_ms, at) {
                Some(ms) => {
                    let label = format!("block {l} handle {from}'s message");
                    push(&mut ops, OpKind::Compute { ms, label }, vec![got])
                }
                None => got,
            });
        }
        let label = format!("block {l} attend + MLP");
        push(&mut ops, OpKind::Compute { ms: b[2], label }, after);
    }
    // The head after the last block, and its output's copy to the host.
    let tail = timings[timings.len() / 3 * 3..]
        .last()
        .map(|&ms| (ms, "head"));
    let outside =
        (outside_ms > 0.0).then_some((outside_ms, "outside the workers (go, results back)"));
    for (ms, label) in tail.into_iter().chain(outside) {
        let deps = ops.len().checked_sub(1).map(|i| vec![i as u32]);
        let label = label.to_string();
        push(
            &mut ops,
            OpKind::Compute { ms, label },
            deps.unwrap_or_default(),
        );
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(multicast: bool) -> Wire {
        Wire {
            devices: 3,
            causal: false,
            multicast,
            bits_per_share: vec![800, 800, 800],
            announce_bits: announce_bits(),
        }
    }

    fn label(o: &Op) -> Option<(&str, f64)> {
        match &o.kind {
            OpKind::Compute { ms, label } => Some((label.as_str(), *ms)),
            _ => None,
        }
    }

    #[test]
    fn the_head_follows_the_last_block_and_the_time_outside_the_head() {
        let timings = [1.0, 0.5, 2.0, 1.0, 0.5, 2.0, 0.75];
        let ops = device_program(&wire(false), 0, &timings, Inbox::default(), 0.0);
        let last = ops.last().unwrap();
        assert_eq!(label(last), Some(("head", 0.75)));
        assert_eq!(last.deps, Some(vec![ops.len() as u32 - 2]));
        let with = device_program(&wire(false), 0, &timings, Inbox::default(), 0.25);
        assert_eq!(with.len(), ops.len() + 1);
        let outside = with.last().unwrap();
        assert_eq!(
            label(outside),
            Some(("outside the workers (go, results back)", 0.25))
        );
        assert_eq!(outside.deps, Some(vec![ops.len() as u32 - 1]));
        // Without the trailing value (an older worker): blocks only.
        let ops = device_program(&wire(false), 0, &[1.0, 0.5, 2.0], Inbox::default(), 0.0);
        assert_eq!(
            label(ops.last().unwrap()).unwrap().0,
            "block 0 attend + MLP"
        );
    }

    #[test]
    fn announcements_follow_each_multicast_and_nothing_waits_for_them() {
        let ops = device_program(&wire(true), 1, &[1.0, 0.5, 2.0, 0.1], Inbox::default(), 0.0);
        let tags: Vec<&str> = ops
            .iter()
            .filter_map(|o| match &o.kind {
                OpKind::Send(c) => Some(c.tag.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            tags,
            [
                "block 0 1->2 announcement",
                "block 0 1->0 announcement",
                "block 0 0->1 announcement",
                "block 0 2->1 announcement"
            ]
        );
        let attend = ops
            .iter()
            .find(|o| label(o).is_some_and(|(l, _)| l.ends_with("attend + MLP")))
            .unwrap();
        for d in attend.deps.as_ref().unwrap() {
            assert!(!matches!(ops[*d as usize].kind, OpKind::Send(_)));
        }
        // 25 bytes behind 66 of headers, in the payload bits of a full segment's share.
        assert_eq!(announce_bits(), (8 * 91 * 1448u64).div_ceil(1514));
    }

    #[test]
    fn each_received_message_carries_the_latency_its_receiver_measured() {
        // Device 1 of 3, one block: it measured 0.25 ms for device 0's message, nothing for 2's.
        let measured = [0.25, f64::NAN, f64::NAN];
        let inbox = Inbox {
            latency: Some(&measured),
            ..Default::default()
        };
        for multicast in [false, true] {
            let ops = device_program(&wire(multicast), 1, &[1.0, 0.5, 2.0, 0.1], inbox, 0.0);
            let latency = |tag: &str| {
                ops.iter()
                    .find_map(|o| match &o.kind {
                        OpKind::Send(c) | OpKind::Multicast(c) if c.tag == tag => {
                            Some(c.latency_ms)
                        }
                        _ => None,
                    })
                    .unwrap_or_else(|| panic!("no op {tag}"))
            };
            let (from0, from2, own) = if multicast {
                ("block 0 from 0", "block 0 from 2", "block 0 from 1")
            } else {
                ("block 0 0->1", "block 0 2->1", "block 0 1->2")
            };
            assert_eq!(latency(from0), Some(0.25), "multicast {multicast}");
            assert_eq!(latency(from2), None, "multicast {multicast}");
            assert_eq!(latency(own), None, "multicast {multicast}");
        }
    }

    #[test]
    fn messages_are_received_in_the_order_they_came_and_then_handled() {
        // Device 2 of 3 had device 1's message first (at 5 ms), then device 0's (at 7 ms), and
        // spent 0.5 and 0.25 ms handling them.
        let (at, handled) = ([7.0, 5.0, f64::NAN], [0.25, 0.5, f64::NAN]);
        let inbox = Inbox {
            received_at: Some(&at),
            handled_ms: Some(&handled),
            ..Default::default()
        };
        let ops = device_program(&wire(false), 2, &[1.0, 0.5, 2.0, 0.1], inbox, 0.0);
        let tags: Vec<String> = ops
            .iter()
            .filter_map(|o| match &o.kind {
                OpKind::Send(c) if c.peers[1] == 2 => Some(c.tag.clone()),
                OpKind::Compute { label, .. } if label.contains("handle") => Some(label.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            tags,
            [
                "block 0 1->2",
                "block 0 handle 1's message",
                "block 0 0->2",
                "block 0 handle 0's message"
            ]
        );
        // Each handling follows its own message; attend + MLP waits for both.
        let id = |t: &str| {
            ops.iter()
                .position(|o| label(o).is_some_and(|(l, _)| l == t))
                .unwrap()
        };
        let h1 = id("block 0 handle 1's message");
        assert_eq!(label(&ops[h1]), Some(("block 0 handle 1's message", 0.5)));
        assert!(matches!(&ops[h1 - 1].kind, OpKind::Send(c) if c.tag == "block 0 1->2"));
        assert_eq!(ops[h1].deps, Some(vec![h1 as u32 - 1]));
        let attend = &ops[id("block 0 attend + MLP")];
        let deps = attend.deps.as_ref().unwrap();
        assert!(
            deps.contains(&(h1 as u32))
                && deps.contains(&(id("block 0 handle 0's message") as u32))
        );
    }
}
