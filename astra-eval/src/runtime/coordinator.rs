//! `astra-eval distributed`: starts N local workers (behind shaped links in network namespaces
//! with `--links`, when root) or connects to running ones (`--workers`), hands out the plans,
//! times whole runs (from `Go` to the last result), applies the head to what comes back, and
//! writes the logits, a summary and, on request, the measured run as an astra-sim trace.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::cli::args::DistributedArgs;
use crate::error::Result;
use crate::{fail, invalid};
use astra_train::model::Model;
use astra_train::models::DevicePartition;
use serde::Serialize;
use tch::{Device, Tensor};

use super::frame::{Frame, FrameError, PROTOCOL};
use super::net::{configure, connect_by, read_frames, session_key, Tagged};
use super::{message_clock, Plan, Shaper, Transport, COORDINATOR};

/// Link shaping for local workers: uplink rate (Mbit/s, 2^20 bit, as astra-sim counts), one-way
/// delay and loss (netem, where the kernel has it).
pub use astra_sim::live::Links;

/// A `distributed` request: the command's options and what follows from them.
pub struct DistributedRun<'a> {
    pub args: &'a DistributedArgs,
    /// The SP baseline: full-precision embeddings exchanged instead of indices (`--mode sp`, or
    /// one device without codebooks).
    pub sp: bool,
    pub devices: usize,
    /// Unused (empty) in the SP baseline.
    pub codebooks: PathBuf,
    /// `--links` are shaped by each worker in user space (no root needed), not by the kernel.
    pub user_shaping: bool,
}

impl<'a> DistributedRun<'a> {
    /// Resolves the device count (default 4 local workers, or one per `--workers` address), the
    /// mode and the codebooks (`--codebooks`, else those beside the model).
    pub fn new(args: &'a DistributedArgs) -> Result<Self> {
        let devices = args.devices.unwrap_or(if args.workers.is_empty() {
            4
        } else {
            args.workers.len()
        });
        // One device exchanges nothing: the single-device model needs no codebooks.
        let sp = args.mode == "sp" || (devices == 1 && args.codebooks.is_none());
        let codebooks = match &args.codebooks {
            Some(c) => c.clone(),
            None if sp => PathBuf::new(),
            None => {
                let c = astra_train::model::resolve(&args.model)?.join("codebooks.safetensors");
                if !c.exists() {
                    fail!(
                        "{} has no codebooks.safetensors beside it; pass --codebooks FILE",
                        args.model
                    );
                }
                c
            }
        };
        Ok(DistributedRun {
            args,
            sp,
            devices,
            codebooks,
            user_shaping: user_shaping(args)?,
        })
    }

    /// Waiting on a silent peer during the run.
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.args.timeout_ms)
    }

    /// Waiting for workers to start, load and connect.
    fn startup(&self) -> Duration {
        Duration::from_millis(self.args.startup_timeout_ms)
    }
}

/// Whether `--links` are shaped in user space: `--shaper user`, or `auto` where the kernel
/// cannot (no root, iproute2 or namespaces). User space cannot drop messages: loss needs netem.
fn user_shaping(args: &DistributedArgs) -> Result<bool> {
    let Some(l) = &args.links else {
        return Ok(false);
    };
    let kernel_can = || astra_sim::live::can_shape(&astra_sim::live::default_netem_script());
    let user = match args.shaper {
        Shaper::User => true,
        Shaper::Kernel => false,
        Shaper::Auto => !kernel_can(),
    };
    if user && l.loss_pct > 0.0 && args.transport == Transport::Tcp {
        fail!(
            "--links with {}% loss over TCP needs kernel shaping (netem; root): TCP resends what is lost; --transport multicast drops whole index messages in user space",
            l.loss_pct
        );
    }
    Ok(user)
}

/// What `--json` writes.
#[derive(Serialize)]
pub struct Summary {
    pub mode: String,
    pub devices: usize,
    pub tokens: i64,
    pub batch: i64,
    pub groups: Option<i64>,
    /// "loopback", "shaped RATE Mbit/s …" or "remote".
    pub network: String,
    /// "tcp" or "multicast".
    pub transport: String,
    pub threads_per_worker: usize,
    /// `--pin-cores`: the cores each worker was pinned to, by rank (absent: not pinned).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pinned_cores: Vec<Vec<usize>>,
    pub runs_ms: Vec<f64>,
    pub median_ms: f64,
    /// Per worker (median run): ms computing and ms waiting for peers.
    pub compute_ms: Vec<f64>,
    pub wait_ms: Vec<f64>,
    /// The median run's ms outside every worker's forward (the coordinator's go, the results'
    /// way back): its latency less the longest compute + waiting of a worker.
    pub outside_ms: f64,
    /// Per worker (median run): the median time its sources' messages took from leaving their
    /// uplink to being in its hands (null: it has no sources). Measured only where every
    /// worker reads one clock and no kernel shaper holds messages (local workers, user-space
    /// shaping or none); absent otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub message_latency_ms: Vec<Option<f64>>,
    /// Per worker (median run): ms it spent handling its sources' messages (checking frames,
    /// unpacking indices), part of its waiting.
    pub handling_ms: Vec<f64>,
    /// Per worker (median run), per block: how many remote keys its queries attended to — its
    /// sources' tokens, or fewer where it attended to their distinct codewords (G = 1).
    pub remote_keys: Vec<Vec<u32>>,
    /// Per worker (median run): bytes of the frames it sent to its peers and received from them
    /// (headers included; SP: fp32 embeddings, ASTRA: packed indices).
    pub sent_bytes: Vec<u64>,
    pub received_bytes: Vec<u64>,
    /// Per worker (median run): its sources' block messages that never arrived (multicast; their
    /// tokens were masked out of those blocks), and how many it expected.
    pub lost_messages: Vec<u32>,
    pub expected_messages: Vec<u32>,
    /// Lost / expected messages over every timed run and worker.
    pub loss_rate: f64,
    /// Of the messages taken as lost (every timed run), those that arrived whole after their
    /// grace period: late, not lost on the wire (raise --loss-grace-ms if they matter).
    pub late_messages: u32,
    /// `--decode`: the tokens the last device generated after the median run's prefill
    /// ([batch][new]) and its decode rate (tokens/s per sequence, steps after the first token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoded: Option<Vec<Vec<i64>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_tokens_per_s: Option<f64>,
}

/// Kills and reaps local workers when the coordinator leaves early.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The coordinator's side of every worker: where to write, and one channel of tagged frames.
struct WorkerLinks {
    tx: Vec<Box<dyn std::io::Write + Send>>,
    rx: mpsc::Receiver<Tagged>,
    /// Every worker's peer-facing address, by rank.
    addrs: Vec<String>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// Starts local workers (in namespaces `ns`, when given) and reads the address each listens on.
fn start_local(
    a: &DistributedRun<'_>,
    session: &str,
    namespaces: Option<&[(String, String)]>,
    workers: &mut Workers,
) -> Result<WorkerLinks> {
    let exe = std::env::current_exe()?;
    let ms = a.timeout().as_millis().to_string();
    let startup_ms = a.startup().as_millis().to_string();
    type Started = std::result::Result<(String, BufReader<ChildStdout>), String>;
    let mut lines: Vec<mpsc::Receiver<Started>> = Vec::new();
    let mut stdins: Vec<ChildStdin> = Vec::new();
    // Start every worker first, so they load in parallel.
    for r in 0..a.devices {
        let (ns, listen) = match namespaces {
            Some(ns) => (Some(ns[r].0.as_str()), format!("{}:47000", ns[r].1)),
            None => (None, "127.0.0.1:0".to_string()),
        };
        let mut cmd = astra_sim::live::command_in(ns, &exe);
        let mut c = cmd
            .args(["worker", "--stdio", "--listen", &listen])
            .env(super::SESSION_ENV, session)
            .args(["--timeout-ms", &ms, "--startup-timeout-ms", &startup_ms])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| invalid!("starting a worker: {e}"))?;
        let out = c.stdout.take().expect("piped");
        stdins.push(c.stdin.take().expect("piped"));
        workers.0.push(c);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut out = BufReader::new(out);
            let mut line = String::new();
            let _ = tx.send(match out.read_line(&mut line) {
                Ok(_) => Ok((line, out)),
                Err(e) => Err(e.to_string()),
            });
        });
        lines.push(rx);
    }
    let deadline = Instant::now() + a.startup();
    let (ftx, rx) = mpsc::channel();
    let mut addrs = Vec::new();
    for (r, rx) in lines.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let (line, out) = rx
            .recv_timeout(left)
            .map_err(|_| {
                invalid!(
                    "worker {r} did not start within {} ms",
                    a.startup().as_millis()
                )
            })?
            .map_err(|e| invalid!("worker {r}: {e}"))?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .ok_or_else(|| invalid!("worker {r} did not start: '{}'", line.trim()))?;
        addrs.push(addr.to_string());
        read_frames(out, r, ftx.clone());
    }
    Ok(WorkerLinks {
        tx: stdins
            .into_iter()
            .map(|s| Box::new(s) as Box<dyn std::io::Write + Send>)
            .collect(),
        rx,
        addrs,
    })
}

/// Connects to running workers.
fn connect_remote(a: &DistributedRun<'_>) -> Result<WorkerLinks> {
    let deadline = Instant::now() + a.startup();
    let (ftx, rx) = mpsc::channel();
    let mut tx: Vec<Box<dyn std::io::Write + Send>> = Vec::new();
    for (r, addr) in a.args.workers.iter().enumerate() {
        let s = connect_by(addr, deadline, &format!("worker {r}"))?;
        configure(&s, a.timeout())?;
        s.set_read_timeout(None)?;
        read_frames(s.try_clone()?, r, ftx.clone());
        tx.push(Box::new(s));
    }
    Ok(WorkerLinks {
        tx,
        rx,
        addrs: a.args.workers.clone(),
    })
}

/// What [`gather`] makes of a worker's frame.
enum Taken<T> {
    /// The frame it waits for.
    Got(T),
    /// A later frame of that worker's, which the caller holds: the decoded tokens the last
    /// worker sends right after its result may overtake another worker's result.
    Held,
    /// Anything else: an error that names the frame.
    Unexpected,
}

/// Waits until every worker has sent `want` (checked by `take`), with a deadline. A worker's
/// error ends the wait with its message; a worker that vanished gives the others a moment to
/// report which peer and block broke, so the message names them.
fn gather<T>(
    links: &WorkerLinks,
    n: usize,
    deadline: Instant,
    grace: Duration,
    what: &str,
    mut take: impl FnMut(usize, Frame) -> Result<Taken<T>>,
) -> Result<Vec<T>> {
    let mut got: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut vanished: Option<(usize, Instant)> = None;
    while got.iter().any(|g| g.is_none()) {
        let until = match vanished {
            Some((_, at)) => at + grace,
            None => deadline,
        };
        let left = until.saturating_duration_since(Instant::now());
        match links.rx.recv_timeout(left) {
            Ok((r, Ok(Frame::Error(e)))) => {
                fail!(
                    "{}",
                    if e == super::REJECTED_KEY {
                        format!("worker {r} {e} (is ASTRA_SESSION the key the workers were started with?)")
                    } else if e.contains("worker") {
                        e
                    } else {
                        format!("worker {r}: {e}")
                    }
                )
            }
            Ok((r, Ok(f))) => {
                let name = f.name();
                match take(r, f)? {
                    Taken::Got(v) => got[r] = Some(v),
                    Taken::Held => {}
                    Taken::Unexpected => fail!(
                        "worker {r} sent a {name} frame while the coordinator waited for {what}"
                    ),
                }
            }
            Ok((r, Err(e))) => {
                // The connection ended (the worker exited or died): wait for the others' words.
                if matches!(e, FrameError::Io(_)) {
                    vanished.get_or_insert((r, Instant::now()));
                } else {
                    fail!("worker {r}: {e}");
                }
            }
            Err(_) => match vanished {
                Some((r, _)) => fail!("worker {r} exited before sending {what}"),
                None => {
                    let missing: Vec<String> = got
                        .iter()
                        .enumerate()
                        .filter(|(_, g)| g.is_none())
                        .map(|(r, _)| r.to_string())
                        .collect();
                    fail!("no {what} from worker(s) {} in time", missing.join(", "));
                }
            },
        }
    }
    Ok(got.into_iter().map(|g| g.expect("all present")).collect())
}

struct RunResult {
    states: Vec<Option<Tensor>>,
    timings: Vec<Vec<f64>>,
    /// Per worker, [block × devices]: when its messages left, when its sources' arrived, and
    /// the ms it spent handling each.
    sent_at: Vec<Vec<f64>>,
    received_at: Vec<Vec<f64>>,
    handled_ms: Vec<Vec<f64>>,
    /// Per worker and block: the remote keys its block step attended to.
    remote_keys: Vec<Vec<u32>>,
    /// (sent, received) bytes per worker.
    bytes: Vec<(u64, u64)>,
    /// Messages each worker never got, and of those the ones that came too late.
    lost: Vec<u32>,
    late: Vec<u32>,
    /// `--decode`: the generated tokens [batch][new] and each decode step's ms.
    decoded: Option<(Vec<Vec<i64>>, Vec<f64>)>,
}

/// Runs the input through N workers, writes the logits; returns a summary with latencies and the
/// per-block compute and wait times of each worker.
pub fn distributed(a: &DistributedRun<'_>) -> Result<String> {
    distributed_with_summary(a).map(|(_, report)| report)
}

/// [`distributed`], also returning the summary (what `--json` writes).
pub fn distributed_with_summary(a: &DistributedRun<'_>) -> Result<(Summary, String)> {
    check_flags(a)?;
    let (model, _) = Model::load(&a.args.model, Device::Cpu)?;
    if a.args.decode > 0 && model.astra_model().as_decoder().is_none() {
        fail!(
            "--decode needs a language model; {} is a classifier",
            a.args.model
        );
    }
    let input = crate::predict::read_input(&a.args.input, &model.config)?;
    let tokens = model.content_tokens(&input);
    check_sizes(a, tokens)?;
    let groups = if a.sp {
        None
    } else {
        let file = astra_quant::CodebookFile::load(&a.codebooks)?;
        astra_train::models::vq::check_codebooks(
            &file,
            model.quantizers(),
            model.quantized_width(),
        )?;
        Some(file.blocks[0].codebook.groups() as i64)
    };
    let threads = astra_quant::threads::checked(
        a.args.threads,
        (astra_quant::threads::cores() / a.devices).max(1),
    )?;
    let pinned = pinned_cores(a, threads)?;
    let session = session(a)?;
    let mut workers = Workers(Vec::new());
    let (mut links, _namespaces, network) = bring_up(a, &session, &mut workers)?;
    send_plans(a, &mut links, &session, threads, &pinned)?;
    let blocks = model.layers() as usize;
    let (runs_ms, results) = timed_runs(a, &mut links, blocks)?;
    for w in links.tx.iter_mut() {
        let _ = Frame::Done.write_to(w);
    }
    for c in &mut workers.0 {
        let _ = c.wait();
    }
    workers.0.clear();
    // The run whose latency is the median: its outputs and timings are reported.
    let m = median(&runs_ms);
    let run = &results[runs_ms.iter().position(|&v| v == m).expect("a member")];
    let logits = output_logits(a, &model, tokens as usize, run)?;
    crate::predict::write_npy_atomic(&logits, &a.args.out)?;
    // Per block: before the exchange, waiting, after it; the head last (compute).
    let in_blocks = |t: &[f64]| t.len() / 3 * 3;
    let sum = |t: &[f64], i: usize| t[..in_blocks(t)].iter().skip(i).step_by(3).sum::<f64>();
    let head = |t: &[f64]| t[in_blocks(t)..].iter().sum::<f64>();
    let expected = expected_messages(&model, tokens as usize, a.devices)?;
    // One clock for every worker, and no hold the workers cannot see (a kernel shaper's).
    let one_clock = a.args.workers.is_empty() && (a.args.links.is_none() || a.user_shaping);
    let latency = one_clock.then(|| message_clock::latencies(&run.sent_at, &run.received_at));
    let summary = Summary {
        mode: match (a.devices, a.sp) {
            (1, _) => "single".into(),
            (_, true) => "sp".into(),
            _ => "astra".into(),
        },
        devices: a.devices,
        tokens,
        batch: input.size()[0],
        groups,
        network,
        threads_per_worker: threads,
        pinned_cores: pinned,
        median_ms: m,
        compute_ms: run
            .timings
            .iter()
            .map(|t| sum(t, 0) + sum(t, 2) + head(t))
            .collect(),
        wait_ms: run.timings.iter().map(|t| sum(t, 1)).collect(),
        outside_ms: (m - run
            .timings
            .iter()
            .map(|t| t.iter().sum::<f64>())
            .fold(0.0, f64::max))
        .max(0.0),
        message_latency_ms: latency
            .iter()
            .flatten()
            .map(|l| message_clock::median(l))
            .collect(),
        handling_ms: run
            .handled_ms
            .iter()
            .map(|h| h.iter().filter(|x| x.is_finite()).fold(0.0, |a, x| a + x))
            .collect(),
        remote_keys: run.remote_keys.clone(),
        sent_bytes: run.bytes.iter().map(|b| b.0).collect(),
        received_bytes: run.bytes.iter().map(|b| b.1).collect(),
        lost_messages: run.lost.clone(),
        expected_messages: expected.clone(),
        loss_rate: results.iter().flat_map(|r| &r.lost).sum::<u32>() as f64
            / (expected.iter().sum::<u32>() as f64 * results.len() as f64).max(1.0),
        transport: a.args.transport.name().into(),
        late_messages: results.iter().flat_map(|r| &r.late).sum(),
        runs_ms,
        decoded: run.decoded.as_ref().map(|d| d.0.clone()),
        decode_tokens_per_s: run.decoded.as_ref().and_then(|(_, ms)| {
            let total: f64 = ms.iter().sum();
            (!ms.is_empty() && total > 0.0).then(|| ms.len() as f64 * 1e3 / total)
        }),
    };
    let mut report = report_text(a, &summary, &logits, blocks);
    if let Some(path) = &a.args.trace {
        let t = super::measured_trace::measured(
            &super::measured_trace::Measured {
                model: &a.args.model,
                network: &summary.network,
                blocks: blocks as u32,
                hidden: model.hidden() as u32,
                codebooks: groups.map(|_| a.codebooks.as_path()),
                tokens: tokens as u64,
                batch: summary.batch as u64,
                causal: model.astra_model().is_causal(),
                multicast: a.args.transport == Transport::Multicast,
                outside_ms: summary.outside_ms,
                latency_ms: latency.as_deref(),
                received_at: &run.received_at,
                handled_ms: &run.handled_ms,
            },
            &run.timings,
        )?;
        write_file(path, t.to_json().as_bytes())?;
        report += &format!("trace -> {}\n", path.display());
    }
    if let Some(path) = &a.args.json {
        write_file(path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
    }
    Ok((summary, report))
}

/// Per worker: the messages it waits for in a run (one per source and block).
fn expected_messages(model: &Model, tokens: usize, devices: usize) -> Result<Vec<u32>> {
    let p = DevicePartition::contiguous(tokens, devices)?;
    let causal = model.astra_model().is_causal();
    let blocks = model.layers() as u32;
    Ok((0..devices)
        .map(|d| astra_train::engine::peers(&p, d, causal).0.len() as u32 * blocks)
        .collect())
}

fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    astra_quant::atomic::write_bytes(path, bytes).map_err(|e| invalid!("{}: {e}", path.display()))
}

/// Flags that contradict each other, before anything is loaded.
fn check_flags(a: &DistributedRun<'_>) -> Result<()> {
    if a.devices == 0 {
        fail!("--devices must be at least 1");
    }
    if !a.args.workers.is_empty() && a.args.workers.len() != a.devices {
        fail!(
            "--workers lists {} addresses for --devices {}",
            a.args.workers.len(),
            a.devices
        );
    }
    if !a.args.workers.is_empty() && a.args.pin_cores {
        fail!("--pin-cores pins local workers; pin remote workers on their hosts (taskset)");
    }
    if !a.args.workers.is_empty() && a.args.links.is_some() {
        fail!("--links shapes local workers; remote workers run over the hosts' own network");
    }
    if a.args.runs == 0 {
        fail!("--runs must be at least 1");
    }
    if a.args.decode > 0 && a.args.all_logits {
        fail!("--decode continues from the next-token logits; drop --all-logits");
    }
    if a.args.decode > 0 && a.args.transport == Transport::Multicast {
        fail!("--decode needs --transport tcp: a lost index message would leave a hole in the decoding cache");
    }
    astra_train::libtorch::parse_device(&a.args.device).map_err(|e| invalid!("{e}"))?;
    if a.args.group.is_some() && a.args.transport == Transport::Tcp {
        fail!("--group names a multicast group; add --transport multicast");
    }
    if let Some(g) = &a.args.group {
        astra_sim::transport::multicast::parse_group(g).map_err(|e| invalid!("--group {e}"))?;
    }
    Ok(())
}

/// N devices need N tokens; local workers are processes on this host, so a typo such as
/// --devices 1000000 must not start a million of them.
fn check_sizes(a: &DistributedRun<'_>, tokens: i64) -> Result<()> {
    if a.devices as i64 > tokens {
        fail!(
            "--devices {} exceeds the input's {tokens} tokens",
            a.devices
        );
    }
    let local_limit = astra_quant::threads::PER_CORE * astra_quant::threads::cores();
    if a.args.workers.is_empty() && a.devices > local_limit {
        fail!(
            "--devices {} would start that many local worker processes; at most {local_limit} here (use --workers for other hosts)",
            a.devices
        );
    }
    Ok(())
}

/// Local workers get a fresh key in their environment; running workers were started with one,
/// which the coordinator must present.
fn session(a: &DistributedRun<'_>) -> Result<String> {
    if a.args.workers.is_empty() {
        return Ok(session_key());
    }
    std::env::var(super::SESSION_ENV)
        .ok()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            invalid!(
                "--workers: put the session key the workers were started with in ASTRA_SESSION"
            )
        })
}

/// The workers and their links: remote ones, local ones behind shaped links (their namespaces
/// live as long as the returned guard), or local ones on loopback; and the network's name.
fn bring_up(
    a: &DistributedRun<'_>,
    session: &str,
    workers: &mut Workers,
) -> Result<(WorkerLinks, Option<astra_sim::live::Namespaces>, String)> {
    if !a.args.workers.is_empty() {
        return Ok((connect_remote(a)?, None, "remote workers".to_string()));
    }
    let Some(l) = &a.args.links else {
        let links = start_local(a, session, None, workers)?;
        return Ok((links, None, "loopback".to_string()));
    };
    if a.user_shaping {
        let links = start_local(a, session, None, workers)?;
        let desc = format!("{} (shaped in user space)", link_description(l, true));
        return Ok((links, None, desc));
    }
    let script = astra_sim::live::default_netem_script();
    if !astra_sim::live::can_shape(&script) {
        fail!(
            "--shaper kernel needs root, ip, tc and network namespaces ({} check failed); use --shaper user (or auto)",
            script.display()
        );
    }
    // Namespaces of coordinators that were killed (astra-PID-* with PID gone) go first.
    let _ = Command::new(&script).arg("gc").status();
    let up = astra_sim::live::links_up(
        &script,
        &format!("astra-{}-e", std::process::id()),
        a.devices,
        l,
    )?;
    let desc = link_description(l, up.netem);
    let started = start_local(a, session, Some(&up.devices), workers)?;
    Ok((started, Some(up.namespaces), desc))
}

fn link_description(l: &Links, netem: bool) -> String {
    let mut desc = format!("shaped {} Mbit/s uplinks", l.mbps);
    if l.delay_ms > 0.0 {
        desc += &format!(", {} ms delay", l.delay_ms);
    }
    if l.loss_pct > 0.0 {
        desc += &format!(", {}% loss", l.loss_pct);
    }
    if (l.delay_ms > 0.0 || l.loss_pct > 0.0) && !netem {
        desc += " (this kernel has no netem: delay/loss NOT applied)";
    }
    desc
}

/// `--pin-cores`: each local worker's own run of cores, by rank (empty: not pinned).
fn pinned_cores(a: &DistributedRun<'_>, threads: usize) -> Result<Vec<Vec<usize>>> {
    if !a.args.pin_cores {
        return Ok(Vec::new());
    }
    let allowed = super::cores::allowed();
    (0..a.devices)
        .map(|r| super::cores::share(&allowed, a.devices, threads, r))
        .collect()
}

/// Every worker's hello and plan, then their ready.
fn send_plans(
    a: &DistributedRun<'_>,
    links: &mut WorkerLinks,
    session: &str,
    threads: usize,
    pinned: &[Vec<usize>],
) -> Result<()> {
    let n = a.devices;
    let addrs = links.addrs.clone();
    let group = a.args.group.clone().unwrap_or_else(random_group);
    for (r, w) in links.tx.iter_mut().enumerate() {
        let plan = Plan {
            rank: r as u32,
            devices: n as u32,
            peers: addrs.clone(),
            model: a.args.model.clone(),
            codebooks: a.codebooks.display().to_string(),
            input: a.args.input.display().to_string(),
            single_cls: a.args.single_cls,
            timeout_ms: a.timeout().as_millis() as u64,
            startup_ms: a.startup().as_millis() as u64,
            sp: a.sp,
            threads,
            all_logits: a.args.all_logits,
            uplink: a.user_shaping.then(|| a.args.links.clone()).flatten(),
            decode_tokens: a.args.decode,
            sampling: a.args.sampling.clone(),
            transport: a.args.transport,
            group: (a.args.transport == Transport::Multicast).then(|| group.clone()),
            loss_grace_ms: a.args.loss_grace_ms,
            device: a.args.device.clone(),
            cores: pinned.get(r).cloned().unwrap_or_default(),
        };
        let hello = Frame::Hello {
            session: session.into(),
            rank: COORDINATOR,
            protocol: PROTOCOL,
        };
        for f in [hello, Frame::Plan(serde_json::to_string(&plan)?)] {
            f.write_to(w).map_err(|e| invalid!("worker {r}: {e}"))?;
        }
    }
    gather(
        links,
        n,
        Instant::now() + a.startup(),
        a.timeout() + Duration::from_secs(1),
        "ready",
        |_, f| {
            Ok(match f {
                Frame::Ready { .. } => Taken::Got(()),
                _ => Taken::Unexpected,
            })
        },
    )?;
    Ok(())
}

/// A group in the organisation-local scope 239.255.0.0/16 and a port, at random (the datagrams'
/// session tag separates runs that happen to share one).
fn random_group() -> String {
    use rand::Rng;
    let mut r = rand::rng();
    format!(
        "239.255.{}.{}:{}",
        r.random_range(0..=255u8),
        r.random_range(1..=254u8),
        r.random_range(40000..60000u16)
    )
}

/// The warm-up and timed runs: latency (go to the last result) and what each worker returned.
fn timed_runs(
    a: &DistributedRun<'_>,
    links: &mut WorkerLinks,
    blocks: usize,
) -> Result<(Vec<f64>, Vec<RunResult>)> {
    let mut runs_ms = Vec::new();
    let mut results = Vec::new();
    for run in 0..a.args.warmup + a.args.runs {
        for (r, w) in links.tx.iter_mut().enumerate() {
            Frame::Go { run: run as u32 }
                .write_to(w)
                .map_err(|e| invalid!("worker {r}: {e}"))?;
        }
        let t0 = Instant::now();
        let decoding = (a.args.decode > 0).then_some(a.devices - 1);
        let mut early = None;
        // A worker reports a failing peer within one timeout of the fault; a run itself may take
        // longer than that, so the wait allows for both.
        let got = gather(
            links,
            a.devices,
            t0 + a.startup() + a.timeout() * 3,
            a.timeout() + Duration::from_secs(1),
            "a result",
            |r, f| match f {
                Frame::Decoded { .. } if decoding == Some(r) && early.is_none() => {
                    early = Some(f);
                    Ok(Taken::Held)
                }
                f => result_of(r, f, blocks, a.devices),
            },
        )?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let decoded = decoding
            .map(|_| decoded_of(links, a, t0, early))
            .transpose()?;
        if run >= a.args.warmup {
            runs_ms.push(ms);
            let (mut states, mut timings, mut bytes) = (Vec::new(), Vec::new(), Vec::new());
            let (mut lost, mut late) = (Vec::new(), Vec::new());
            let (mut sent_at, mut received_at, mut handled_ms) =
                (Vec::new(), Vec::new(), Vec::new());
            let mut remote_keys = Vec::new();
            for r in got {
                states.push(r.state);
                timings.push(r.timings);
                sent_at.push(r.sent_at);
                received_at.push(r.received_at);
                handled_ms.push(r.handled_ms);
                remote_keys.push(r.remote_keys);
                bytes.push(r.bytes);
                lost.push(r.lost);
                late.push(r.late);
            }
            results.push(RunResult {
                states,
                timings,
                sent_at,
                received_at,
                handled_ms,
                remote_keys,
                bytes,
                lost,
                late,
                decoded,
            });
        }
    }
    Ok((runs_ms, results))
}

/// The decoding worker's tokens after a run's prefill (the last device sends them after its
/// result; `early`: they came while other results were awaited), checked.
fn decoded_of(
    links: &WorkerLinks,
    a: &DistributedRun<'_>,
    t0: Instant,
    early: Option<Frame>,
) -> Result<(Vec<Vec<i64>>, Vec<f64>)> {
    let last = a.devices - 1;
    let new = a.args.decode as usize;
    let deadline = t0 + a.startup() + a.timeout() * (3 + new as u32);
    let left = deadline.saturating_duration_since(Instant::now());
    let next = match early {
        Some(f) => Ok((last, Ok(f))),
        None => links.rx.recv_timeout(left),
    };
    match next {
        Ok((
            r,
            Ok(Frame::Decoded {
                batch,
                tokens,
                step_ms,
                ..
            }),
        )) if r == last => {
            let b = batch as usize;
            if b == 0 || tokens.len() != b * new || step_ms.len() != new.saturating_sub(1) {
                fail!(
                    "worker {r} sent {} tokens and {} step times for batch {b} × {new}",
                    tokens.len(),
                    step_ms.len()
                );
            }
            Ok((tokens.chunks(new).map(<[i64]>::to_vec).collect(), step_ms))
        }
        Ok((r, Ok(Frame::Error(e)))) => fail!("worker {r}: {e}"),
        Ok((r, Ok(f))) => fail!(
            "worker {r} sent a {} frame while the coordinator waited for decoded tokens",
            f.name()
        ),
        Ok((r, Err(e))) => fail!("worker {r}: {e}"),
        Err(_) => fail!("no decoded tokens from worker {last} in time"),
    }
}

/// One worker's checked result: its state (if any), per-block timings, and bytes on the wire.
struct WorkerResult {
    state: Option<Tensor>,
    timings: Vec<f64>,
    sent_at: Vec<f64>,
    received_at: Vec<f64>,
    handled_ms: Vec<f64>,
    remote_keys: Vec<u32>,
    bytes: (u64, u64),
    lost: u32,
    late: u32,
}

/// A worker's result frame, checked.
fn result_of(r: usize, f: Frame, blocks: usize, devices: usize) -> Result<Taken<WorkerResult>> {
    let Frame::Result {
        shape,
        data,
        timings,
        sent_bytes,
        received_bytes,
        lost,
        late,
        sent_at,
        received_at,
        handled_ms,
        remote_keys,
        ..
    } = f
    else {
        return Ok(Taken::Unexpected);
    };
    // Three per block (before the exchange, waiting, after it), then the head.
    if timings.len() != 3 * blocks + 1 {
        fail!(
            "worker {r} sent {} timings for {blocks} blocks (expected {})",
            timings.len(),
            3 * blocks + 1
        );
    }
    // When each message left and arrived: one per block and rank.
    let tables = [&sent_at, &received_at, &handled_ms];
    if tables.iter().any(|t| t.len() != blocks * devices) {
        fail!(
            "worker {r} sent message tables of {:?} values for {blocks} blocks × {devices} devices",
            tables.map(|t| t.len())
        );
    }
    if remote_keys.len() != blocks {
        fail!(
            "worker {r} sent remote-key counts for {} blocks, not {blocks}",
            remote_keys.len()
        );
    }
    let numel: i64 = shape.iter().product();
    if numel != data.len() as i64 {
        fail!("worker {r} sent {} values for shape {shape:?}", data.len());
    }
    let state = (!data.is_empty()).then(|| Tensor::from_slice(&data).view(shape.as_slice()));
    Ok(Taken::Got(WorkerResult {
        state,
        timings,
        sent_at,
        received_at,
        handled_ms,
        remote_keys,
        bytes: (sent_bytes, received_bytes),
        lost,
        late,
    }))
}

/// The logits from what the workers returned: the next-token logits the last device computed
/// (GPT-2 prefill), or the device engine's combination of their states.
fn output_logits(
    a: &DistributedRun<'_>,
    model: &Model,
    tokens: usize,
    run: &RunResult,
) -> Result<Tensor> {
    let states: Vec<Tensor> = run
        .states
        .iter()
        .flatten()
        .map(|s| s.shallow_clone())
        .collect();
    let engine = model.astra_model();
    tch::no_grad(|| {
        if engine.is_causal() && !a.args.all_logits {
            return Ok(states[0].shallow_clone());
        }
        let partition = DevicePartition::contiguous(tokens, a.devices)?;
        Ok(astra_train::engine::combine(engine, &partition, &states))
    })
}

fn report_text(a: &DistributedRun<'_>, s: &Summary, logits: &Tensor, blocks: usize) -> String {
    let runs = &s.runs_ms;
    let mut report = format!(
        "{} devices over TCP ({}; {} thread(s) per worker): logits {:?} -> {}\nlatency: median {:.1} ms over {} run(s) (min {:.1}, max {:.1}) after {} warm-up\n",
        s.devices,
        s.network,
        s.threads_per_worker,
        logits.size(),
        a.args.out.display(),
        s.median_ms,
        runs.len(),
        runs.iter().copied().fold(f64::INFINITY, f64::min),
        runs.iter().copied().fold(0.0, f64::max),
        a.args.warmup,
    );
    for r in 0..s.devices {
        let latency = match s.message_latency_ms.get(r) {
            Some(Some(ms)) => format!(
                "; its sources' messages in hand {ms:.3} ms after leaving their uplink (median)"
            ),
            _ => String::new(),
        };
        let keys = &s.remote_keys[r];
        let keys = match keys.iter().max() {
            Some(&most) if most > 0 => format!(
                "; {:.0} remote keys a block (mean; at most {most})",
                keys.iter().map(|&k| k as f64).sum::<f64>() / keys.len() as f64
            ),
            _ => String::new(),
        };
        report += &format!(
            "worker {r}: compute {:.1} ms, waiting {:.1} ms over {blocks} blocks{keys}{latency}\n",
            s.compute_ms[r], s.wait_ms[r]
        );
    }
    if a.args.transport == Transport::Multicast {
        report += &format!(
            "multicast: {:.2}% of the index messages lost over the timed runs (their tokens masked out; {} of them arrived after the grace period)\n",
            100.0 * s.loss_rate,
            s.late_messages
        );
    }
    if let Some(d) = &s.decoded {
        report += &format!(
            "decoded by worker {}: {} token(s) per sequence after the prefill (time to first token {:.1} ms), {}; sequence 0: {:?}\n",
            s.devices - 1,
            d.first().map_or(0, Vec::len),
            s.median_ms,
            s.decode_tokens_per_s
                .map_or("one token, no decode steps".into(), |r| format!("{r:.1} tokens/s")),
            d.first().cloned().unwrap_or_default()
        );
    }
    report
}
