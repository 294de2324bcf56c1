//! The real multi-device runtime: one worker process per device, TCP between them.
//! The coordinator (`astra-eval distributed`, [`coordinator`]) starts N local workers
//! (`astra-eval worker`, [`worker`]) — on loopback, or each in its own network namespace behind a
//! kernel-shaped uplink — or connects to workers already running on other hosts; it hands each
//! its plan, times whole runs, and gathers the class-token states (ViT) or final states (GPT-2).
//! Workers form a full mesh (rank r dials the ranks below it and accepts the ranks above), every
//! connection opens with the run's session key, and per block each worker VQ-encodes its tokens,
//! sends the bit-packed indices to the peers that attend to them (reader threads drain every
//! socket, so sends never deadlock; with `--transport multicast` one UDP copy for all of them,
//! see [`Transport`]), and turns the indices it receives into keys/values with
//! per-codeword tables (the fast path of `astra_train::engine`). Every wait has a deadline and every error
//! names the peer and the block.

pub mod coordinator;
mod cores;
pub use astra_sim::transport::{frame, net};
pub mod measured_trace;
mod message_clock;
mod multicast;
pub mod worker;

pub use coordinator::{distributed, distributed_with_summary, DistributedRun, Links, Summary};
pub use worker::{serve, ControlVia};

use serde::{Deserialize, Serialize};
use tch::Device;

/// The coordinator's rank in Hello frames.
pub const COORDINATOR: u32 = u32::MAX;

/// What a worker answers a coordinator that presents a wrong session key.
pub const REJECTED_KEY: &str = "rejected the session key";

pub use astra_sim::transport::net::SESSION_ENV;

/// Who shapes the links of a local run (`--shaper`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Shaper {
    Auto,
    Kernel,
    User,
}

/// How a block's message reaches the peers that attend to it (`--transport`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// One copy per peer over the full mesh of TCP connections (reliable; the reference).
    #[default]
    Tcp,
    /// One copy for all peers as UDP multicast on the devices' segment, never retransmitted; a
    /// small TCP announcement per peer follows it, so a receiver missing any of its datagrams
    /// takes the message as lost and masks that sender's tokens in that block.
    Multicast,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Multicast => "multicast",
        }
    }
}

/// What a worker is told to do.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub rank: u32,
    pub devices: u32,
    /// Listening address of every worker, by rank.
    pub peers: Vec<String>,
    pub model: String,
    pub codebooks: String,
    pub input: String,
    pub single_cls: bool,
    /// Waiting on a silent peer during the run.
    pub timeout_ms: u64,
    /// Waiting for processes to start, load the model and connect.
    pub startup_ms: u64,
    /// The SP baseline: exchange full-precision embeddings (fp32) instead of indices.
    #[serde(default)]
    pub sp: bool,
    /// libtorch threads (0: libtorch's default).
    #[serde(default)]
    pub threads: usize,
    /// GPT-2: every device returns its final states (the coordinator computes all logits)
    /// instead of the last device returning the next-token logits.
    #[serde(default)]
    pub all_logits: bool,
    /// Shape this worker's uplink in user space at this rate and delay (`--shaper user`); None:
    /// unshaped, or shaped by the kernel around the process.
    #[serde(default)]
    pub uplink: Option<astra_sim::live::Links>,
    /// Language models: after the prefill, the device holding the last token decodes this many
    /// tokens greedily with its cache of indices and sends them back (0: prefill only).
    #[serde(default)]
    pub decode_tokens: u32,
    /// How the decoding device picks tokens (None: greedy).
    #[serde(default)]
    pub sampling: Option<astra_train::generate::Sampling>,
    #[serde(default)]
    pub transport: Transport,
    /// Multicast: the group's GROUP:PORT.
    #[serde(default)]
    pub group: Option<String>,
    /// Multicast: how long after a peer's announcement its missing message counts as lost.
    #[serde(default)]
    pub loss_grace_ms: u64,
    /// Where the worker computes (`cpu`, `cuda`, `cuda:N`; empty: cpu).
    #[serde(default)]
    pub device: String,
    /// Cores to pin the worker to before it starts any thread (empty: not pinned).
    #[serde(default)]
    pub cores: Vec<usize>,
}

impl Plan {
    /// The worker's compute device, checked against what its process sees.
    pub fn device(&self) -> crate::error::Result<Device> {
        let spec = if self.device.is_empty() {
            "cpu"
        } else {
            &self.device
        };
        astra_train::libtorch::parse_device(spec).map_err(crate::error::EvalError::Invalid)
    }
}
