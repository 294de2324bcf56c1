//! The trace format: what each device does in one inference, as compute segments and
//! communication operations with their dependencies. Traces come from a compute profile (the
//! paper's, or one measured by `astra-eval profile`), from `astra-eval`'s real runs, or from an
//! analytic device model; network models (`network`) turn a trace into a latency.
//!
//! # Format (JSON, `format` = "astra-trace", `version` = 1)
//! ```json
//! { "format": "astra-trace", "version": 1,
//!   "source": { "kind": "profile" | "measured" | "analytic", "name": "paper-1660ti", "provenance": "..." },
//!   "model": { "blocks": 12, "hidden": 768, "element_bits": 32, "index_bits": 10 },
//!   "runs": [ { "method": "astra-g16", "devices": 4, "tokens": 1024,
//!               "programs": [ [ { "id": 0, "op": "compute", "ms": 0.1, "label": "block 0 encode" },
//!                               { "id": 1, "op": "all-gather", "bits": 40960, "peers": [0,1,2,3],
//!                                 "tag": "block 0", "deps": [0] }, ... ],   // device 0
//!                             ... ] } ] }               // one program per device
//! ```
//! - `ms`: compute time on the profiled device; `bits`: what this device contributes to the
//!   exchange (for an all-gather its own payload; for an all-reduce its 1/N shard; for a send or
//!   gather the message).
//! - `deps`: ids (same device) that must finish first; omitted means "the previous op". Ops are
//!   listed in an order that respects `deps`. Communication ops with the same `tag` on the
//!   devices in `peers` form one collective; every peer must list it.
//! - `peers`: the devices taking part (including this one); for `send`, `[from, to]`; for
//!   `multicast` (one message on the sender's uplink once, for every receiver), `[from, to, …]`;
//!   for `gather`, root first.

use serde::{Deserialize, Serialize};

use crate::error::{Result, SimError};
use crate::method::{partition, Method, ModelShape};
use crate::profile::ComputeSource;

pub const FORMAT: &str = "astra-trace";
pub const VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Collective {
    Send,
    AllGather,
    AllReduce,
    Gather,
    Multicast,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum OpKind {
    Compute {
        ms: f64,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        label: String,
    },
    Send(Comm),
    AllGather(Comm),
    AllReduce(Comm),
    Gather(Comm),
    /// One message from `peers[0]` to every other peer, on the sender's uplink once (UDP
    /// multicast on a shared segment); eager, like a send.
    Multicast(Comm),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comm {
    pub bits: u64,
    pub peers: Vec<u32>,
    pub tag: String,
    /// Sends and multicasts, on a receiver's op: how long after leaving the sender's uplink the
    /// message was in this receiver's hands, as a run measured it (the hand-over to the sender's
    /// thread, the hosts' network stacks, the receiver's thread waking). The simulator uses it
    /// instead of the network's α for this receiver (`Network::trace_latency`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Op {
    pub id: u32,
    #[serde(flatten)]
    pub kind: OpKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deps: Option<Vec<u32>>,
}

impl Op {
    pub fn comm(&self) -> Option<(Collective, &Comm)> {
        match &self.kind {
            OpKind::Compute { .. } => None,
            OpKind::Send(c) => Some((Collective::Send, c)),
            OpKind::AllGather(c) => Some((Collective::AllGather, c)),
            OpKind::AllReduce(c) => Some((Collective::AllReduce, c)),
            OpKind::Gather(c) => Some((Collective::Gather, c)),
            OpKind::Multicast(c) => Some((Collective::Multicast, c)),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub method: Method,
    pub devices: u32,
    pub tokens: u64,
    pub programs: Vec<Vec<Op>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub kind: String,
    pub name: String,
    pub provenance: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    pub format: String,
    pub version: u32,
    pub source: Source,
    pub model: ModelShape,
    pub runs: Vec<Run>,
}

/// How a block's compute is split around its exchange when a trace is built from a profile
/// (which measures only totals): `pre` runs before the exchange (LayerNorm + VQ encode for ASTRA,
/// nothing for SP), `independent` may run during it (attention of local queries over local keys),
/// the rest needs the exchanged data. Only methods whose exchange feeds the same block's attention
/// (ASTRA, SP) have independent work.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockSplit {
    pub pre: f64,
    pub independent: f64,
}

impl Default for BlockSplit {
    fn default() -> Self {
        // Of a ViT-Base block at N = 4, the local queries' QKV projection and attention over local
        // keys is roughly a third of the per-device work; LN + VQ encode a few percent.
        BlockSplit {
            pre: 0.05,
            independent: 0.3,
        }
    }
}

struct ProgramBuilder {
    ops: Vec<Op>,
}

impl ProgramBuilder {
    fn push(&mut self, kind: OpKind, deps: Option<Vec<u32>>) -> u32 {
        let id = self.ops.len() as u32;
        self.ops.push(Op { id, kind, deps });
        id
    }
    fn compute(&mut self, ms: f64, label: String, deps: Option<Vec<u32>>) -> u32 {
        self.push(OpKind::Compute { ms, label }, deps)
    }
}

impl Run {
    /// The program of every device for `method`, with `compute_ms` per device spread over blocks.
    /// Devices carry their own token counts (uneven when N does not divide T); compute is scaled
    /// by each device's share relative to the largest.
    pub fn from_compute(
        model: &ModelShape,
        method: Method,
        devices: u32,
        tokens: u64,
        compute_ms: f64,
        split: BlockSplit,
    ) -> Run {
        let n = if method == Method::Single { 1 } else { devices };
        let parts = partition(tokens, n);
        let largest = *parts.iter().max().expect("n > 0") as f64;
        let peers: Vec<u32> = (0..n).collect();
        let l = model.blocks;
        let programs = parts
            .iter()
            .map(|&local| {
                let mut p = ProgramBuilder { ops: Vec::new() };
                let total = compute_ms * local as f64 / largest;
                let bits = model.payload_bits(method, local);
                let comm = |tag: String| Comm {
                    bits,
                    peers: peers.clone(),
                    tag,
                    latency_ms: None,
                };
                match method {
                    Method::Single => {
                        p.compute(total, "whole model".into(), None);
                    }
                    Method::Astra { .. } | Method::Sp => {
                        let per = total / l as f64;
                        for b in 0..l {
                            let pre =
                                p.compute(per * split.pre, format!("block {b} pre-exchange"), None);
                            let x = p.push(
                                OpKind::AllGather(comm(format!("block {b}"))),
                                Some(vec![pre]),
                            );
                            let ind = p.compute(
                                per * split.independent,
                                format!("block {b} local attention"),
                                Some(vec![pre]),
                            );
                            p.compute(
                                per * (1.0 - split.pre - split.independent),
                                format!("block {b} remote attention + MLP"),
                                Some(vec![x, ind]),
                            );
                        }
                    }
                    Method::Tp => {
                        let per = total / (2 * l) as f64;
                        for b in 0..l {
                            for half in ["attention", "MLP"] {
                                p.compute(per, format!("block {b} {half} shard"), None);
                                p.push(OpKind::AllReduce(comm(format!("block {b} {half}"))), None);
                            }
                        }
                    }
                    Method::BpAg { nb } | Method::BpSp { nb } => {
                        let exchanges = model.exchanges(method);
                        let per = total / (exchanges + 1) as f64;
                        let which = if matches!(method, Method::BpAg { .. }) {
                            "kept block"
                        } else {
                            "kept block half"
                        };
                        for e in 0..exchanges {
                            p.compute(per, format!("segment {e}"), None);
                            p.push(
                                OpKind::AllGather(comm(format!("{which} {} exchange {e}", e % nb))),
                                None,
                            );
                        }
                        p.compute(per, format!("segment {exchanges}"), None);
                    }
                }
                p.ops
            })
            .collect();
        Run {
            method,
            devices: n,
            tokens,
            programs,
        }
    }

    pub fn total_compute_ms(&self, device: usize) -> f64 {
        self.programs[device]
            .iter()
            .map(|op| match op.kind {
                OpKind::Compute { ms, .. } => ms,
                _ => 0.0,
            })
            .sum()
    }

    pub fn total_bits(&self, device: usize) -> u64 {
        self.programs[device]
            .iter()
            .filter_map(|op| op.comm())
            .map(|(_, c)| c.bits)
            .sum()
    }

    fn validate(&self, at: &str) -> Result<()> {
        if self.devices == 0 {
            return Err(SimError::invalid(
                format!("{at}.devices"),
                "must be at least 1",
            ));
        }
        if self.programs.len() != self.devices as usize {
            return Err(SimError::invalid(
                format!("{at}.programs"),
                format!(
                    "{} programs for {} devices",
                    self.programs.len(),
                    self.devices
                ),
            ));
        }
        for (d, prog) in self.programs.iter().enumerate() {
            for (i, op) in prog.iter().enumerate() {
                let here = format!("{at}.programs[{d}][{i}]");
                if op.id as usize != i {
                    return Err(SimError::invalid(
                        format!("{here}.id"),
                        format!("is {}, expected {i} (ids count up from 0)", op.id),
                    ));
                }
                if let Some(deps) = &op.deps {
                    if let Some(bad) = deps.iter().find(|&&x| x >= op.id) {
                        return Err(SimError::invalid(
                            format!("{here}.deps"),
                            format!("{bad} does not name an earlier op"),
                        ));
                    }
                }
                match &op.kind {
                    OpKind::Compute { ms, .. } => {
                        if !ms.is_finite() || *ms < 0.0 {
                            return Err(SimError::invalid(
                                format!("{here}.ms"),
                                format!("{ms} is not a non-negative number"),
                            ));
                        }
                    }
                    _ => {
                        let (kind, c) = op.comm().expect("communication op");
                        if let Some(l) = c.latency_ms.filter(|l| !(l.is_finite() && *l >= 0.0)) {
                            return Err(SimError::invalid(
                                format!("{here}.latency_ms"),
                                format!("{l} is not a non-negative number"),
                            ));
                        }
                        if c.peers.is_empty() || c.peers.iter().any(|&p| p >= self.devices) {
                            return Err(SimError::invalid(
                                format!("{here}.peers"),
                                format!(
                                    "{:?} is not a set of devices below {}",
                                    c.peers, self.devices
                                ),
                            ));
                        }
                        if !c.peers.contains(&(d as u32)) {
                            return Err(SimError::invalid(
                                format!("{here}.peers"),
                                format!("{:?} does not include this device {d}", c.peers),
                            ));
                        }
                        if kind == Collective::Send && c.peers.len() != 2 {
                            return Err(SimError::invalid(
                                format!("{here}.peers"),
                                "a send has exactly [from, to]",
                            ));
                        }
                        if kind == Collective::Multicast && c.peers.len() < 2 {
                            return Err(SimError::invalid(
                                format!("{here}.peers"),
                                "a multicast has [from, to, …] with at least one receiver",
                            ));
                        }
                        let eager = matches!(kind, Collective::Send | Collective::Multicast);
                        if c.latency_ms.is_some() && !eager {
                            return Err(SimError::invalid(
                                format!("{here}.latency_ms"),
                                "only a send's or a multicast's receiver has a measured latency",
                            ));
                        }
                        if c.tag.is_empty() {
                            return Err(SimError::invalid(
                                format!("{here}.tag"),
                                "must not be empty",
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl Trace {
    pub fn new(source: Source, model: ModelShape, runs: Vec<Run>) -> Self {
        Trace {
            format: FORMAT.into(),
            version: VERSION,
            source,
            model,
            runs,
        }
    }

    /// Runs for every (method, N, T) asked, from a compute profile.
    pub fn from_profile(
        profile: &dyn ComputeSource,
        model: ModelShape,
        configs: &[(Method, u32, u64)],
        split: BlockSplit,
    ) -> Result<Trace> {
        let runs = configs
            .iter()
            .map(|&(m, n, t)| {
                Ok(Run::from_compute(
                    &model,
                    m,
                    n,
                    t,
                    profile.compute_ms(m, n, t)?,
                    split,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Trace::new(
            Source {
                kind: "profile".into(),
                name: profile.name().to_string(),
                provenance: profile.provenance(),
            },
            model,
            runs,
        ))
    }

    pub fn find(&self, method: Method, devices: u32, tokens: u64) -> Option<&Run> {
        let n = if method == Method::Single { 1 } else { devices };
        self.runs
            .iter()
            .find(|r| r.method == method && r.devices == n && r.tokens == tokens)
    }

    pub fn validate(&self) -> Result<()> {
        if self.format != FORMAT {
            return Err(SimError::invalid(
                "format",
                format!("is '{}', expected '{FORMAT}'", self.format),
            ));
        }
        if self.version != VERSION {
            return Err(SimError::invalid(
                "version",
                format!(
                    "{} is not supported (this build reads {VERSION})",
                    self.version
                ),
            ));
        }
        for (i, r) in self.runs.iter().enumerate() {
            r.validate(&format!("runs[{i}]"))?;
        }
        Ok(())
    }

    pub fn from_json(text: &str, path: &str) -> Result<Trace> {
        let t: Trace = serde_json::from_str(text).map_err(|e| SimError::File {
            path: path.into(),
            reason: format!("malformed trace: {e}"),
        })?;
        t.validate().map_err(|e| SimError::File {
            path: path.into(),
            reason: e.to_string(),
        })?;
        Ok(t)
    }

    pub fn load(path: &std::path::Path) -> Result<Trace> {
        let text = std::fs::read_to_string(path).map_err(SimError::io(path))?;
        Self::from_json(&text, &path.display().to_string())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("traces serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::ComputeProfile;

    #[test]
    fn profile_trace_round_trips_and_counts_bits() {
        let p = ComputeProfile::paper_1660ti();
        let cfg = [
            (Method::Astra { groups: 16 }, 4, 1024),
            (Method::Tp, 4, 1024),
            (Method::BpSp { nb: 4 }, 6, 1024),
            (Method::Single, 4, 1024),
        ];
        let t =
            Trace::from_profile(&p, ModelShape::default(), &cfg, BlockSplit::default()).unwrap();
        let back = Trace::from_json(&t.to_json(), "x").unwrap();
        assert!(back == t, "trace changed in a JSON round trip");
        let astra = t.find(Method::Astra { groups: 16 }, 4, 1024).unwrap();
        assert_eq!(astra.total_bits(0), 12 * 256 * 16 * 10);
        assert!((astra.total_compute_ms(0) - 41.26).abs() < 1e-9);
        let tp = t.find(Method::Tp, 4, 1024).unwrap();
        assert_eq!(tp.total_bits(0), 24 * 256 * 768 * 32);
        let bp = t.find(Method::BpSp { nb: 4 }, 6, 1024).unwrap();
        assert_eq!(bp.total_bits(0), 8 * 171 * 768 * 32);
        assert!(bp.total_compute_ms(5) < bp.total_compute_ms(0));
        assert_eq!(t.find(Method::Single, 1, 1024).unwrap().programs.len(), 1);
    }

    #[test]
    fn malformed_traces_name_the_field() {
        let p = ComputeProfile::paper_1660ti();
        let t = Trace::from_profile(
            &p,
            ModelShape::default(),
            &[(Method::Sp, 2, 1024)],
            BlockSplit::default(),
        )
        .unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&t.to_json()).unwrap();
        v["runs"][0]["programs"][1][2]["ms"] = serde_json::json!(-1.0);
        let e = Trace::from_json(&v.to_string(), "t.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("runs[0].programs[1][2].ms"), "{e}");
        let mut v: serde_json::Value = serde_json::from_str(&t.to_json()).unwrap();
        v["runs"][0]["programs"][0][1]["peers"] = serde_json::json!([0, 7]);
        let e = Trace::from_json(&v.to_string(), "t.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("runs[0].programs[0][1].peers"), "{e}");
        let mut v: serde_json::Value = serde_json::from_str(&t.to_json()).unwrap();
        v["version"] = serde_json::json!(9);
        assert!(Trace::from_json(&v.to_string(), "t.json")
            .unwrap_err()
            .to_string()
            .contains("version"));
        let e = Trace::from_json("{\"format\": 3}", "t.json")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.json: malformed trace"), "{e}");
    }
}
