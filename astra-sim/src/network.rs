//! Network models: how long a trace's run takes on a given network.
//!
//! - `paper`: the paper's latency model (ASTRA.md §4): per device, compute + bits / bandwidth with
//!   Mbit = 2^20 bit, no overlap, every device on its own link; the slowest device sets the latency.
//! - `alpha-beta`: every message costs α (per-message latency) + bits / bandwidth on the sender's
//!   uplink (per-device bandwidths allowed), collectives built from messages by an algorithm
//!   (direct full mesh, ring, or star through the first peer), ops scheduled by their
//!   dependencies, so communication overlaps independent compute when `overlap` is on.
//!
//! Both take per-device compute slowdowns (heterogeneous devices) and a packet-loss rate: the
//! baselines retransmit (goodput falls to (1 − p) of the link), ASTRA drops (lost indices mask their
//! tokens, no time is lost; the expected dropped fraction is reported).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{Result, SimError};
use crate::trace::{Collective, OpKind, Run};

/// Bits per "Mbit" in the paper's accounting.
pub const MBIT: f64 = 1_048_576.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    Paper,
    AlphaBeta,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Every device sends its data to every peer itself (a full mesh of unicast streams).
    Direct,
    /// Data travel around a ring, one neighbour per step.
    Ring,
    /// Through the collective's first peer: gather to it, then it sends on.
    Star,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Network {
    pub model: ModelKind,
    /// Uplink bandwidth (Mbit/s, Mbit = 2^20 bit) per device; one value applies to all.
    pub mbps: Vec<f64>,
    /// Per-message latency (ms), alpha-beta only.
    pub alpha_ms: f64,
    pub algorithm: Algorithm,
    /// Let communication overlap compute that does not depend on it (alpha-beta only).
    pub overlap: bool,
    /// Packet-loss probability in [0, 1).
    pub loss: f64,
    /// Compute-time multiplier per device (1 = the profiled device); one value applies to all.
    pub slowdown: Vec<f64>,
    /// Token-bucket depth (bits) of a shaped uplink (tc htb/tbf, astra-eval's user-space shaper);
    /// 0 for a plain link. A collective's round gets a full bucket: its first `burst_bits` leave
    /// at once. Eager sends (and multicasts) go through the bucket as the shapers run it (the
    /// generic cell rate algorithm): it refills at the link rate up to `burst_bits`, and what a
    /// message does not find in it leaves at the rate; messages smaller than what is left leave
    /// at once, however many follow each other.
    #[serde(default)]
    pub burst_bits: f64,
    /// Alpha-beta: a receiver gets a message after the latency a measured trace recorded for it
    /// (`Comm::latency_ms`) where there is one, after α elsewhere; false: α everywhere.
    #[serde(default = "yes")]
    pub trace_latency: bool,
}

fn yes() -> bool {
    true
}

impl Network {
    pub fn paper(mbps: f64) -> Self {
        Network {
            model: ModelKind::Paper,
            mbps: vec![mbps],
            alpha_ms: 0.0,
            algorithm: Algorithm::Direct,
            overlap: false,
            loss: 0.0,
            slowdown: vec![1.0],
            burst_bits: 0.0,
            trace_latency: true,
        }
    }

    pub fn alpha_beta(mbps: f64, alpha_ms: f64, algorithm: Algorithm, overlap: bool) -> Self {
        Network {
            model: ModelKind::AlphaBeta,
            mbps: vec![mbps],
            alpha_ms,
            algorithm,
            overlap,
            loss: 0.0,
            slowdown: vec![1.0],
            burst_bits: 0.0,
            trace_latency: true,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.mbps.is_empty() {
            return Err(SimError::invalid("bandwidth", "no value given"));
        }
        if let Some(b) = self.mbps.iter().find(|b| !(b.is_finite() && **b > 0.0)) {
            return Err(SimError::invalid(
                "bandwidth",
                format!("{b} Mbit/s is not a positive number"),
            ));
        }
        if !(self.alpha_ms.is_finite() && self.alpha_ms >= 0.0) {
            return Err(SimError::invalid(
                "alpha",
                format!("{} ms is not a non-negative number", self.alpha_ms),
            ));
        }
        if !(0.0..1.0).contains(&self.loss) {
            return Err(SimError::invalid(
                "loss",
                format!("{} is not a probability in [0, 1)", self.loss),
            ));
        }
        if self.slowdown.is_empty() || self.slowdown.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(SimError::invalid(
                "slowdown",
                format!("{:?} must be positive numbers", self.slowdown),
            ));
        }
        if !(self.burst_bits.is_finite() && self.burst_bits >= 0.0) {
            return Err(SimError::invalid(
                "burst",
                format!("{} bits is not a non-negative number", self.burst_bits),
            ));
        }
        if self.model == ModelKind::Paper && self.overlap {
            return Err(SimError::invalid(
                "overlap",
                "the paper model has no overlap; use alpha-beta",
            ));
        }
        Ok(())
    }

    fn per_device(v: &[f64], d: usize, what: &str, devices: usize) -> Result<f64> {
        match v.len() {
            1 => Ok(v[0]),
            n if n == devices => Ok(v[d]),
            n => Err(SimError::invalid(
                what,
                format!("{n} values for {devices} devices (give 1 or {devices})"),
            )),
        }
    }

    /// Bits per millisecond of device d's uplink.
    fn bits_per_ms(&self, d: usize, devices: usize) -> Result<f64> {
        Ok(Self::per_device(&self.mbps, d, "bandwidth", devices)? * MBIT / 1000.0)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Outcome {
    pub latency_ms: f64,
    /// Compute of the device that finishes last (paper) or the largest compute total (alpha-beta).
    pub compute_ms: f64,
    /// latency − compute: communication and waiting not hidden behind compute.
    pub comm_ms: f64,
    /// Largest number of bits one device puts on the wire (retransmissions included).
    pub bits_sent: f64,
    /// Expected fraction of remote tokens whose indices are lost (ASTRA under loss), else 0.
    pub dropped_fraction: f64,
}

/// A run prepared for repeated simulation: tags resolved to collective ids once.
#[derive(Clone, Debug)]
pub struct CompiledRun {
    devices: usize,
    retransmits: bool,
    ops: Vec<Vec<COp>>,
    collectives: Vec<CollInfo>,
}

#[derive(Clone, Debug)]
struct COp {
    compute_ms: f64,
    /// Index into `collectives` for a communication op.
    coll: Option<usize>,
    bits: u64,
    /// A receiver's measured latency of the message (see `Comm::latency_ms`).
    latency_ms: Option<f64>,
    deps: Vec<usize>,
}

#[derive(Clone, Debug)]
struct CollInfo {
    kind: Collective,
    tag: String,
    /// (device, op index) of every member, in peer order; the first is the root/sender.
    members: Vec<(usize, usize)>,
}

impl CompiledRun {
    pub fn new(run: &Run) -> Result<Self> {
        let devices = run.programs.len();
        let mut collectives: Vec<CollInfo> = Vec::new();
        let mut by_tag: HashMap<&str, usize> = HashMap::new();
        let mut ops = Vec::with_capacity(devices);
        for (d, prog) in run.programs.iter().enumerate() {
            let mut cops = Vec::with_capacity(prog.len());
            for (i, op) in prog.iter().enumerate() {
                let deps = match &op.deps {
                    Some(v) => v.iter().map(|&x| x as usize).collect(),
                    None if i > 0 => vec![i - 1],
                    None => vec![],
                };
                let (compute_ms, coll, bits, latency_ms) = match (&op.kind, op.comm()) {
                    (OpKind::Compute { ms, .. }, _) => (*ms, None, 0, None),
                    (_, Some((kind, c))) => {
                        let id = *by_tag.entry(c.tag.as_str()).or_insert_with(|| {
                            collectives.push(CollInfo {
                                kind,
                                tag: c.tag.clone(),
                                members: c
                                    .peers
                                    .iter()
                                    .map(|&p| (p as usize, usize::MAX))
                                    .collect(),
                            });
                            collectives.len() - 1
                        });
                        let info = &mut collectives[id];
                        let slot = info.members.iter_mut().find(|(p, _)| *p == d);
                        match slot {
                            Some(s) if s.1 == usize::MAX && info.kind == kind => s.1 = i,
                            _ => {
                                return Err(SimError::invalid(
                                    format!("programs[{d}][{i}].tag"),
                                    format!("'{}' does not match its collective's peers or kind, or repeats on this device", c.tag),
                                ))
                            }
                        }
                        (0.0, Some(id), c.bits, c.latency_ms)
                    }
                    _ => unreachable!("an op is compute or communication"),
                };
                cops.push(COp {
                    compute_ms,
                    coll,
                    bits,
                    latency_ms,
                    deps,
                });
            }
            ops.push(cops);
        }
        if let Some(c) = collectives
            .iter()
            .find(|c| c.members.iter().any(|m| m.1 == usize::MAX))
        {
            let missing: Vec<usize> = c
                .members
                .iter()
                .filter(|m| m.1 == usize::MAX)
                .map(|m| m.0)
                .collect();
            return Err(SimError::invalid(
                "programs",
                format!(
                    "collective '{}' is never reached by device(s) {missing:?}",
                    c.tag
                ),
            ));
        }
        let compiled = CompiledRun {
            devices,
            retransmits: !run.method.is_astra(),
            ops,
            collectives,
        };
        // One validation for every network model: the paper's model only sums compute and bits,
        // so it would price a trace whose programs can never run; schedule it once, untimed.
        let unit = vec![1.0; devices];
        let net = Network::alpha_beta(1.0, 0.0, Algorithm::Direct, false);
        compiled.schedule(&net, &unit, &unit, 1.0)?;
        Ok(compiled)
    }

    pub fn simulate(&self, net: &Network) -> Result<Outcome> {
        net.validate()?;
        let n = self.devices;
        let mut slow = Vec::with_capacity(n);
        let mut rate = Vec::with_capacity(n);
        for d in 0..n {
            slow.push(Network::per_device(&net.slowdown, d, "slowdown", n)?);
            rate.push(net.bits_per_ms(d, n)?);
        }
        // Lost packets: the baselines resend them (expected 1/(1 − p) transmissions each), ASTRA's
        // indices are not resent.
        let inflate = if self.retransmits {
            1.0 / (1.0 - net.loss)
        } else {
            1.0
        };
        let dropped_fraction = if self.retransmits { 0.0 } else { net.loss };
        let compute: Vec<f64> = (0..n)
            .map(|d| self.ops[d].iter().map(|o| o.compute_ms).sum::<f64>() * slow[d])
            .collect();
        let bits: Vec<f64> = (0..n)
            .map(|d| self.ops[d].iter().map(|o| o.bits as f64).sum::<f64>() * inflate)
            .collect();
        if net.model == ModelKind::Paper {
            let (mut worst, mut at) = (f64::NEG_INFINITY, 0);
            for d in 0..n {
                let t = compute[d] + bits[d] / rate[d];
                if t > worst {
                    worst = t;
                    at = d;
                }
            }
            return Ok(Outcome {
                latency_ms: worst,
                compute_ms: compute[at],
                comm_ms: worst - compute[at],
                bits_sent: bits.iter().cloned().fold(0.0, f64::max),
                dropped_fraction,
            });
        }
        let latency = self.schedule(net, &slow, &rate, inflate)?;
        let max_compute = compute.iter().cloned().fold(0.0, f64::max);
        Ok(Outcome {
            latency_ms: latency,
            compute_ms: max_compute,
            comm_ms: latency - max_compute,
            bits_sent: bits.iter().cloned().fold(0.0, f64::max),
            dropped_fraction,
        })
    }

    /// Dependency-driven list scheduling: per device one compute engine and one NIC (one shared
    /// engine without overlap); a collective starts when every member is ready and its NIC free.
    /// A send is eager, as over TCP: it leaves when the sender is ready and its uplink free, and
    /// the receiver's op ends when both it is ready and the data is in.
    fn schedule(&self, net: &Network, slow: &[f64], rate: &[f64], inflate: f64) -> Result<f64> {
        let mut c = Clocks::new(self, net, slow, rate, inflate);
        while !c.all_done() {
            let mut progress = false;
            for d in 0..self.devices {
                while c.pc[d] < self.ops[d].len() && c.step(d) {
                    progress = true;
                }
            }
            if !progress && !c.all_done() {
                return Err(c.deadlock());
            }
        }
        Ok(c.finish
            .iter()
            .flat_map(|f| f.iter().cloned())
            .fold(0.0, f64::max))
    }

    fn collective_ms(&self, info: &CollInfo, net: &Network, rate: &[f64], inflate: f64) -> f64 {
        let a = net.alpha_ms;
        // Time for `bits` leaving one uplink in one round, after the bucket's free burst.
        let tx = |bits: f64, p: usize| (bits - net.burst_bits).max(0.0) / rate[p];
        let m: Vec<(usize, f64)> = info
            .members
            .iter()
            .map(|&(p, j)| (p, self.ops[p][j].bits as f64 * inflate))
            .collect();
        let k = m.len() as f64;
        let root = m[0].0;
        let max_over =
            |f: &dyn Fn(usize, f64) -> f64| m.iter().map(|&(p, b)| f(p, b)).fold(0.0, f64::max);
        match info.kind {
            // Eager: priced by `Clocks::send`, through its uplink's token bucket.
            Collective::Send | Collective::Multicast => {
                unreachable!("sends and multicasts are scheduled by Clocks::send")
            }
            Collective::Gather => a + m.iter().skip(1).map(|&(p, b)| tx(b, p)).fold(0.0, f64::max),
            Collective::AllGather => match net.algorithm {
                Algorithm::Direct => a + max_over(&|p, b| tx((k - 1.0) * b, p)),
                Algorithm::Ring => (k - 1.0) * (a + max_over(&|p, b| tx(b, p))),
                Algorithm::Star => {
                    let total: f64 = m.iter().map(|x| x.1).sum();
                    let up = m
                        .iter()
                        .skip(1)
                        .map(|&(p, b)| b / rate[p])
                        .fold(0.0, f64::max);
                    let down: f64 = m.iter().skip(1).map(|x| total - x.1).sum();
                    2.0 * a + up + down / rate[root]
                }
            },
            // m is each device's shard: 1/k of the reduced vector.
            Collective::AllReduce => match net.algorithm {
                Algorithm::Direct => 2.0 * (a + max_over(&|p, b| tx((k - 1.0) * b, p))),
                Algorithm::Ring => 2.0 * (k - 1.0) * (a + max_over(&|p, b| tx(b, p))),
                Algorithm::Star => {
                    let up = m
                        .iter()
                        .skip(1)
                        .map(|&(p, b)| k * b / rate[p])
                        .fold(0.0, f64::max);
                    2.0 * a + up + (k - 1.0) * k * m[0].1 / rate[root]
                }
            },
        }
    }
}

/// The list scheduler's state ([`CompiledRun::schedule`]): per device the next op, when its
/// compute engine and its NIC are free, when each op finished, and when each send's data arrived.
struct Clocks<'a> {
    run: &'a CompiledRun,
    net: &'a Network,
    slow: &'a [f64],
    rate: &'a [f64],
    inflate: f64,
    finish: Vec<Vec<f64>>,
    pc: Vec<usize>,
    compute_free: Vec<f64>,
    nic_free: Vec<f64>,
    /// Per device, its uplink's theoretical arrival time (GCRA, as the shapers keep it): when
    /// everything given to the uplink would have left at the rate. At time t its bucket holds
    /// `burst - (tat - t)·rate` bits (full once t ≥ tat).
    tat: Vec<f64>,
    arrived: Vec<Option<f64>>,
}

impl<'a> Clocks<'a> {
    fn new(
        run: &'a CompiledRun,
        net: &'a Network,
        slow: &'a [f64],
        rate: &'a [f64],
        inflate: f64,
    ) -> Self {
        let n = run.devices;
        Clocks {
            run,
            net,
            slow,
            rate,
            inflate,
            finish: run.ops.iter().map(|o| vec![0.0; o.len()]).collect(),
            pc: vec![0; n],
            compute_free: vec![0.0; n],
            nic_free: vec![0.0; n],
            tat: vec![f64::NEG_INFINITY; n],
            arrived: vec![None; run.collectives.len()],
        }
    }

    fn all_done(&self) -> bool {
        self.pc
            .iter()
            .zip(&self.run.ops)
            .all(|(&p, o)| p == o.len())
    }

    /// When op `i` of device `d` has its inputs.
    fn ready(&self, d: usize, i: usize) -> f64 {
        self.run.ops[d][i]
            .deps
            .iter()
            .map(|&j| self.finish[d][j])
            .fold(0.0, f64::max)
    }

    /// When device `d`'s compute engine (or NIC) is free; one shared engine without overlap.
    fn compute_engine(&self, d: usize) -> f64 {
        if self.net.overlap {
            self.compute_free[d]
        } else {
            self.compute_free[d].max(self.nic_free[d])
        }
    }
    fn nic_engine(&self, d: usize) -> f64 {
        if self.net.overlap {
            self.nic_free[d]
        } else {
            self.nic_free[d].max(self.compute_free[d])
        }
    }

    /// Runs device `d`'s next op if it can; false when it must wait (a receive before its data
    /// was sent, a collective before every member reached it).
    fn step(&mut self, d: usize) -> bool {
        let i = self.pc[d];
        match self.run.ops[d][i].coll {
            None => self.compute(d, i),
            Some(c)
                if matches!(
                    self.run.collectives[c].kind,
                    Collective::Send | Collective::Multicast
                ) =>
            {
                self.send(d, i, c)
            }
            Some(c) => self.collective(c),
        }
    }

    fn compute(&mut self, d: usize, i: usize) -> bool {
        let start = self.ready(d, i).max(self.compute_engine(d));
        let end = start + self.run.ops[d][i].compute_ms * self.slow[d];
        self.finish[d][i] = end;
        self.compute_free[d] = end;
        if !self.net.overlap {
            self.nic_free[d] = end;
        }
        self.pc[d] += 1;
        true
    }

    /// A send (or a multicast) is eager, as over TCP: the sender's op ends when its data has
    /// left; each receiver's when it is ready and the data is in.
    fn send(&mut self, d: usize, i: usize, c: usize) -> bool {
        let info = &self.run.collectives[c];
        let ready = self.ready(d, i);
        let end = if info.members[0].0 == d {
            let start = ready.max(self.nic_engine(d));
            let bits = self.run.ops[d][i].bits as f64 * self.inflate;
            // The token bucket (GCRA): the message's last bit leaves once the bucket had room.
            let rate = self.rate[d];
            self.tat[d] = self.tat[d].max(start) + bits / rate;
            let leaves = start.max(self.tat[d] - self.net.burst_bits / rate);
            // α is latency (the sender's and receiver's per-message handling, the wire's delay),
            // not uplink time: the next message may leave meanwhile.
            self.arrived[c] = Some(leaves);
            self.nic_free[d] = leaves;
            leaves + self.net.alpha_ms
        } else {
            let Some(leaves) = self.arrived[c] else {
                return false;
            };
            let measured = self.run.ops[d][i]
                .latency_ms
                .filter(|_| self.net.trace_latency);
            ready.max(leaves + measured.unwrap_or(self.net.alpha_ms))
        };
        self.finish[d][i] = end;
        if !self.net.overlap {
            self.compute_free[d] = self.compute_free[d].max(end);
            self.nic_free[d] = self.nic_free[d].max(end);
        }
        self.pc[d] += 1;
        true
    }

    /// A collective starts when every member is at it, ready, and its NIC free.
    fn collective(&mut self, c: usize) -> bool {
        let info = &self.run.collectives[c];
        if info.members.iter().any(|&(p, j)| self.pc[p] != j) {
            return false;
        }
        let start = info
            .members
            .iter()
            .map(|&(p, j)| self.ready(p, j).max(self.nic_engine(p)))
            .fold(0.0, f64::max);
        let end = start
            + self
                .run
                .collective_ms(info, self.net, self.rate, self.inflate);
        for &(p, j) in &info.members {
            self.finish[p][j] = end;
            self.nic_free[p] = end;
            // The round emptied the bucket.
            self.tat[p] = end + self.net.burst_bits / self.rate[p];
            if !self.net.overlap {
                self.compute_free[p] = end;
            }
            self.pc[p] += 1;
        }
        true
    }

    /// Names where every unfinished device is stuck.
    fn deadlock(&self) -> SimError {
        let stuck: Vec<String> = (0..self.run.devices)
            .filter(|&d| self.pc[d] < self.run.ops[d].len())
            .map(|d| {
                let tag = self.run.ops[d][self.pc[d]]
                    .coll
                    .map(|c| self.run.collectives[c].tag.as_str())
                    .unwrap_or("?");
                format!("device {d} at '{tag}'")
            })
            .collect();
        SimError::invalid("programs", format!("deadlock: {}", stuck.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::{Method, ModelShape};
    use crate::trace::{BlockSplit, Comm, Op, Trace};

    fn run(method: Method, n: u32, compute: f64) -> Run {
        Run::from_compute(
            &ModelShape::default(),
            method,
            n,
            1024,
            compute,
            BlockSplit::default(),
        )
    }

    /// A compute op of `ms` after `deps`.
    fn compute(id: u32, ms: f64, deps: Vec<u32>) -> Op {
        Op {
            id,
            kind: crate::trace::OpKind::Compute {
                ms,
                label: String::new(),
            },
            deps: Some(deps),
        }
    }

    #[test]
    fn sends_are_eager_the_receiver_waits_for_the_data_not_the_sender() {
        use crate::trace::OpKind;
        let compute = |id: u32, ms: f64, deps: Option<Vec<u32>>| Op {
            id,
            kind: OpKind::Compute {
                ms,
                label: String::new(),
            },
            deps,
        };
        // 2^20 bits at 1 Mbit/s (2^20 bit/s): one second on the wire.
        let send = |id: u32| Op {
            id,
            kind: OpKind::Send(Comm {
                bits: 1 << 20,
                peers: vec![0, 1],
                tag: "x".into(),
                latency_ms: None,
            }),
            deps: Some(vec![0]),
        };
        let run = Run {
            method: Method::Sp,
            devices: 2,
            tokens: 2,
            programs: vec![
                // The sender: 10 ms, send, 10 ms that do not need the send.
                vec![
                    compute(0, 10.0, None),
                    send(1),
                    compute(2, 10.0, Some(vec![0])),
                ],
                // The receiver: 1500 ms of its own work, then the data, then 10 ms.
                vec![
                    compute(0, 1500.0, None),
                    send(1),
                    compute(2, 10.0, Some(vec![1])),
                ],
            ],
        };
        let r = CompiledRun::new(&run).unwrap();
        let ov = Network::alpha_beta(1.0, 0.0, Algorithm::Direct, true);
        // The data left at 10 ms and was in at 1010 ms, before the receiver needed it at 1500.
        assert!((r.simulate(&ov).unwrap().latency_ms - 1510.0).abs() < 1e-6);
        // A receiver that is ready first waits for the data: 10 + 1000 + 10.
        let mut early = run.clone();
        early.programs[1][0] = compute(0, 5.0, None);
        let r = CompiledRun::new(&early).unwrap();
        assert!((r.simulate(&ov).unwrap().latency_ms - 1020.0).abs() < 1e-6);
    }

    #[test]
    fn a_receiver_gets_a_message_after_its_measured_latency_not_alpha() {
        use crate::trace::OpKind;
        // 2^20 bits at 1 Mbit/s: one second on the uplink; α = 5 ms.
        let send = |latency_ms: Option<f64>| Op {
            id: 1,
            kind: OpKind::Multicast(Comm {
                bits: 1 << 20,
                peers: vec![0, 1, 2],
                tag: "m".into(),
                latency_ms,
            }),
            deps: Some(vec![0]),
        };
        let receiver = |latency_ms| {
            vec![
                compute(0, 1.0, vec![]),
                send(latency_ms),
                compute(2, 10.0, vec![1]),
            ]
        };
        let run = Run {
            method: Method::Astra { groups: 1 },
            devices: 3,
            tokens: 3,
            programs: vec![
                vec![compute(0, 10.0, vec![]), send(None)],
                // Device 1 measured 40 ms from the uplink to its hands; device 2 has no measure.
                receiver(Some(40.0)),
                receiver(None),
            ],
        };
        let r = CompiledRun::new(&run).unwrap();
        let mut net = Network::alpha_beta(1.0, 5.0, Algorithm::Direct, true);
        // Left at 10 + 1000 ms; device 1 has it 40 ms later, device 2 after α.
        let out = r.simulate(&net).unwrap();
        assert!((out.latency_ms - 1060.0).abs() < 1e-6, "{}", out.latency_ms);
        // Without the measured latencies every receiver gets α.
        net.trace_latency = false;
        let out = r.simulate(&net).unwrap();
        assert!((out.latency_ms - 1025.0).abs() < 1e-6, "{}", out.latency_ms);
        // A negative measured latency is refused.
        let mut bad = run.clone();
        bad.programs[1][1] = send(Some(-1.0));
        let t = |run: Run| Trace {
            format: crate::trace::FORMAT.into(),
            version: crate::trace::VERSION,
            source: crate::trace::Source {
                kind: "measured".into(),
                name: "test".into(),
                provenance: String::new(),
            },
            model: ModelShape::default(),
            runs: vec![run],
        };
        let e = t(bad).validate().unwrap_err().to_string();
        assert!(e.contains("latency_ms"), "{e}");
        assert!(t(run).validate().is_ok());
    }

    #[test]
    fn a_send_gets_the_bucket_it_refilled_while_idle() {
        use crate::trace::OpKind;
        // Device 0 sends 2^20 bits twice back to back, then once after 2 s of compute, over a
        // 1 Mbit/s uplink with a 2^19-bit bucket: the first and the third start with a full
        // bucket (0.5 s each), the second finds it empty (1 s).
        let send = |id: u32, tag: &str, deps: Vec<u32>| Op {
            id,
            kind: OpKind::Send(Comm {
                bits: 1 << 20,
                peers: vec![0, 1],
                tag: tag.into(),
                latency_ms: None,
            }),
            deps: Some(deps),
        };
        let run = Run {
            method: Method::Sp,
            devices: 2,
            tokens: 2,
            programs: vec![
                vec![
                    send(0, "a", vec![]),
                    send(1, "b", vec![]),
                    compute(2, 3500.0, vec![]),
                    send(3, "c", vec![2]),
                ],
                vec![
                    send(0, "a", vec![]),
                    send(1, "b", vec![]),
                    send(2, "c", vec![]),
                ],
            ],
        };
        let mut net = Network::alpha_beta(1.0, 0.0, Algorithm::Direct, true);
        net.burst_bits = (1 << 19) as f64;
        let r = CompiledRun::new(&run).unwrap();
        // a: 0–500 ms, b: 500–1500 ms; compute ends at 3500, c: 3500–4000 ms.
        assert!((r.simulate(&net).unwrap().latency_ms - 4000.0).abs() < 1e-6);
        let mut busy = run.clone();
        busy.programs[0][2] = compute(2, 1750.0, vec![]);
        // The uplink was idle 250 ms after b: half the bucket back (2^18 bits); c takes 750 ms.
        let r = CompiledRun::new(&busy).unwrap();
        assert!((r.simulate(&net).unwrap().latency_ms - 2500.0).abs() < 1e-6);
    }

    #[test]
    fn small_messages_back_to_back_share_what_is_left_in_the_bucket() {
        use crate::trace::OpKind;
        // Over a 1 Mbit/s uplink with a 2^19-bit bucket (500 ms of the link), device 0 sends
        // three messages of 2^17 bits, one per peer, back to back (as a worker sends a block's
        // indices): together they fit in the full bucket and all arrive at once. A fourth of 2^19
        // bits then finds 2^17 bits left: it arrives 375 ms later.
        let send = |id: u32, to: u32, bits: u64| Op {
            id,
            kind: OpKind::Send(Comm {
                bits,
                peers: vec![0, to],
                tag: format!("m{id}"),
                latency_ms: None,
            }),
            deps: Some(vec![]),
        };
        let small = 1u64 << 17;
        let mut programs = vec![
            vec![send(0, 1, small), send(1, 2, small), send(2, 3, small)],
            vec![send(0, 1, small)],
            vec![send(1, 2, small)],
            vec![send(2, 3, small)],
        ];
        let run = |programs: &Vec<Vec<Op>>| Run {
            method: Method::Sp,
            devices: 4,
            tokens: 4,
            programs: programs.clone(),
        };
        let mut net = Network::alpha_beta(1.0, 0.0, Algorithm::Direct, true);
        net.burst_bits = (1 << 19) as f64;
        let latency = |r: &Run| {
            CompiledRun::new(r)
                .unwrap()
                .simulate(&net)
                .unwrap()
                .latency_ms
        };
        assert!(latency(&run(&programs)).abs() < 1e-6);
        programs[0].push(send(3, 1, 1 << 19));
        programs[1].push(send(3, 1, 1 << 19));
        assert!((latency(&run(&programs)) - 375.0).abs() < 1e-6);
    }

    #[test]
    fn a_multicast_leaves_the_uplink_once_for_every_receiver() {
        use crate::trace::OpKind;
        // Device 0 sends 2^20 bits (one second at 1 Mbit/s) to devices 1..=3: one multicast, or
        // three sends one after the other on its one uplink.
        let comm = |peers: Vec<u32>, tag: &str| Comm {
            bits: 1 << 20,
            peers,
            tag: tag.into(),
            latency_ms: None,
        };
        let op = |id, kind| Op {
            id,
            kind,
            deps: None,
        };
        let multicast = |_| OpKind::Multicast(comm(vec![0, 1, 2, 3], "m"));
        let unicast = |to: u32| OpKind::Send(comm(vec![0, to], &format!("s{to}")));
        let latency = |kind: &dyn Fn(u32) -> OpKind, sends: &[u32]| {
            let mut programs = vec![Vec::new(); 4];
            for (i, &to) in sends.iter().enumerate() {
                programs[0].push(op(i as u32, kind(to)));
            }
            for (d, p) in programs.iter_mut().enumerate().skip(1) {
                let mine = sends.iter().position(|&t| t == d as u32).unwrap_or(0);
                p.push(op(0, kind(sends[mine])));
            }
            let run = Run {
                method: Method::Astra { groups: 1 },
                devices: 4,
                tokens: 4,
                programs,
            };
            let net = Network::alpha_beta(1.0, 0.0, Algorithm::Direct, true);
            CompiledRun::new(&run)
                .unwrap()
                .simulate(&net)
                .unwrap()
                .latency_ms
        };
        assert!((latency(&multicast, &[1]) - 1000.0).abs() < 1e-6);
        assert!((latency(&unicast, &[1, 2, 3]) - 3000.0).abs() < 1e-6);
        // A multicast needs a receiver.
        let lone = Run {
            method: Method::Sp,
            devices: 1,
            tokens: 1,
            programs: vec![vec![op(0, OpKind::Multicast(comm(vec![0], "m")))]],
        };
        let t = crate::trace::Trace {
            format: crate::trace::FORMAT.into(),
            version: crate::trace::VERSION,
            source: crate::trace::Source {
                kind: "analytic".into(),
                name: "t".into(),
                provenance: String::new(),
            },
            model: crate::method::ModelShape {
                blocks: 1,
                hidden: 8,
                element_bits: 32,
                index_bits: 10,
                codebooks_per_block: 1,
            },
            runs: vec![lone],
        };
        assert!(t.validate().unwrap_err().to_string().contains("multicast"));
    }

    #[test]
    fn paper_model_is_compute_plus_bits_over_bandwidth() {
        let r = CompiledRun::new(&run(Method::Astra { groups: 1 }, 4, 39.16)).unwrap();
        let o = r.simulate(&Network::paper(10.0)).unwrap();
        // 12 blocks × 256 tokens × 10 bits at 10 · 2^20 bit/s.
        assert!((o.comm_ms - 30720.0 / (10.0 * MBIT) * 1000.0).abs() < 1e-9);
        assert!((o.compute_ms - 39.16).abs() < 1e-9);
    }

    #[test]
    fn alpha_beta_without_overlap_adds_up() {
        // No overlap, direct all-gather: per block α + (N−1)·m/B, plus all compute.
        let r = CompiledRun::new(&run(Method::Sp, 4, 24.0)).unwrap();
        let net = Network::alpha_beta(100.0, 0.5, Algorithm::Direct, false);
        let o = r.simulate(&net).unwrap();
        let m = 256.0 * 768.0 * 32.0;
        let expect = 24.0 + 12.0 * (0.5 + 3.0 * m / (100.0 * MBIT / 1000.0));
        assert!(
            (o.latency_ms - expect).abs() < 1e-6,
            "{} vs {expect}",
            o.latency_ms
        );
        // Overlap hides the independent share of compute behind each exchange.
        let mut ov = net.clone();
        ov.overlap = true;
        let o2 = r.simulate(&ov).unwrap();
        assert!((o.latency_ms - o2.latency_ms - 24.0 * 0.3).abs() < 1e-6);
        // Ring of 4: 3 steps of α + m/B each.
        let ring = Network::alpha_beta(100.0, 0.5, Algorithm::Ring, false);
        let o3 = r.simulate(&ring).unwrap();
        let expect3 = 24.0 + 12.0 * 3.0 * (0.5 + m / (100.0 * MBIT / 1000.0));
        assert!((o3.latency_ms - expect3).abs() < 1e-6);
    }

    #[test]
    fn slowest_device_sets_the_pace_and_loss_semantics() {
        let r = CompiledRun::new(&run(Method::Astra { groups: 16 }, 4, 40.0)).unwrap();
        let mut net = Network::paper(50.0);
        let base = r.simulate(&net).unwrap();
        net.slowdown = vec![1.0, 1.0, 2.0, 1.0];
        let slow = r.simulate(&net).unwrap();
        assert!((slow.compute_ms - 80.0).abs() < 1e-9);
        net.slowdown = vec![1.0];
        net.loss = 0.05;
        let lossy = r.simulate(&net).unwrap();
        assert_eq!(lossy.latency_ms, base.latency_ms);
        assert_eq!(lossy.dropped_fraction, 0.05);
        let tp = CompiledRun::new(&run(Method::Tp, 4, 27.0)).unwrap();
        let t0 = tp.simulate(&Network::paper(50.0)).unwrap();
        let t1 = tp.simulate(&net).unwrap();
        assert!((t1.comm_ms - t0.comm_ms / 0.95).abs() < 1e-6);
        // Heterogeneous overlap-free alpha-beta: a slow device delays every collective.
        let mut ab = Network::alpha_beta(50.0, 0.0, Algorithm::Direct, false);
        ab.slowdown = vec![1.0, 1.0, 1.5, 1.0];
        assert!(r.simulate(&ab).unwrap().latency_ms > 60.0);
        for bad in [vec![0.0], vec![-5.0], vec![f64::NAN]] {
            let mut n = Network::paper(1.0);
            n.mbps = bad;
            assert!(r
                .simulate(&n)
                .unwrap_err()
                .to_string()
                .starts_with("bandwidth:"));
        }
        let mut n = Network::paper(1.0);
        n.mbps = vec![1.0, 2.0];
        assert!(r
            .simulate(&n)
            .unwrap_err()
            .to_string()
            .contains("2 values for 4 devices"));
    }

    #[test]
    fn unmatched_collective_is_an_error() {
        let mk = |tag: &str, peers: Vec<u32>| Op {
            id: 0,
            kind: OpKind::AllGather(Comm {
                bits: 8,
                peers,
                tag: tag.into(),
                latency_ms: None,
            }),
            deps: None,
        };
        let r = Run {
            method: Method::Sp,
            devices: 2,
            tokens: 2,
            programs: vec![vec![mk("a", vec![0, 1])], vec![mk("b", vec![0, 1])]],
        };
        let e = CompiledRun::new(&r).unwrap_err().to_string();
        assert!(
            e.contains("never reached") || e.contains("does not match"),
            "{e}"
        );
    }
}
