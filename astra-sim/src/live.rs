//! `astra-sim replay --live`: replays a run over real TCP between N worker processes on this
//! machine, each in its own network namespace behind a kernel-shaped uplink (scripts/netem.sh),
//! sleeping for compute segments and sending real bytes for communication operations. Without
//! root (or without namespaces) it falls back to unshaped loopback and says so.
//!
//! Wire protocol between workers: the workspace's one transport ([`crate::transport`]): an
//! authenticated full mesh (hello with the run's session key and rank), then `Bytes` frames tagged
//! by the trace op they carry. Collectives are executed with the direct
//! algorithm (every device sends its payload to every peer itself; all-reduce = two such rounds),
//! ops strictly in program order: the live counterpart of the alpha-beta model with
//! `algorithm = direct`, `overlap = false`.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Result, SimError};
use crate::trace::{Collective, OpKind, Run};
use crate::transport::net::{self, Tagged};
use crate::transport::Frame;

/// The fraction of a shaped uplink's rate left for our bytes: TCP carries 1448 payload bytes per
/// 1514-byte Ethernet frame (1500 MTU, timestamps), and in an all-gather every device also
/// receives as much as it sends, so its uplink carries a 66-byte ACK per two received frames.
pub const TCP_GOODPUT: f64 = 1448.0 / (1514.0 + 33.0);
/// Bucket of the shaper set by netem.sh (two frames, HTB or tbf), in payload bits.
pub const TBF_BURST_BITS: f64 = 3028.0 * 8.0 * 1448.0 / 1514.0;
const BARRIER_TAG: u32 = u32::MAX;
const PING_TAG: u32 = u32::MAX - 1;
const WARMUP_TAG: u32 = u32::MAX - 2;

fn err(reason: impl Into<String>) -> SimError {
    SimError::invalid("live", reason)
}

/// What a worker reports on stdout (one JSON line).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerReport {
    pub rank: usize,
    /// From the start barrier's release to the end of the program.
    pub elapsed_ms: f64,
    /// Time spent in compute (sleeping), in sending, and in waiting for peers' data.
    pub compute_ms: f64,
    pub send_ms: f64,
    pub wait_ms: f64,
    /// Half the median round trip to the next rank measured before the run (0 with one device).
    pub one_way_ms: f64,
}

struct Peer {
    stream: TcpStream,
    inbox: Receiver<Tagged>,
}

/// Connects rank `rank` to every other address through the transport's authenticated mesh (the
/// session key comes from the environment, as for the runtime's workers), with a reader thread
/// per peer so our sends never wait on a peer whose receive buffer is full.
fn mesh(rank: usize, addrs: &[SocketAddr], timeout: Duration) -> Result<Vec<Option<Peer>>> {
    let listener = TcpListener::bind(addrs[rank]).map_err(|e| {
        err(format!(
            "rank {rank}: cannot listen on {}: {e}",
            addrs[rank]
        ))
    })?;
    let session = std::env::var(net::SESSION_ENV).unwrap_or_default();
    if session.is_empty() {
        return Err(err(format!(
            "rank {rank}: no session key in {}",
            net::SESSION_ENV
        )));
    }
    let peers: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let me = net::MeshMember {
        rank: rank as u32,
        peers: &peers,
        session: &session,
        timeout,
    };
    let mut streams = net::mesh(&listener, &me, Instant::now() + timeout)
        .map_err(|e| err(format!("rank {rank}: {e:#}")))?;
    (0..addrs.len() as u32)
        .map(|p| {
            streams
                .remove(&p)
                .map(|stream| {
                    stream
                        .set_read_timeout(None)
                        .map_err(|e| err(e.to_string()))?;
                    let reader = stream.try_clone().map_err(|e| err(e.to_string()))?;
                    let (tx, inbox) = channel();
                    net::read_frames(reader, p as usize, tx);
                    Ok(Peer { stream, inbox })
                })
                .transpose()
        })
        .collect()
}

fn send(peer: &mut Peer, tag: u32, payload: &[u8]) -> std::io::Result<()> {
    let frame = Frame::Bytes {
        tag,
        payload: payload.to_vec(),
    };
    frame
        .write_to(&mut peer.stream)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

fn recv(peer: &Peer, from: usize, tag: u32, len: usize, timeout: Duration) -> Result<()> {
    match peer.inbox.recv_timeout(timeout) {
        Ok((_, Ok(Frame::Bytes { tag: t, payload }))) if t == tag && payload.len() == len => Ok(()),
        Ok((_, Ok(Frame::Bytes { tag: t, payload }))) => Err(err(format!(
            "peer {from}: frame tag {t} of {} bytes, expected tag {tag} of {len}",
            payload.len()
        ))),
        Ok((_, Ok(f))) => Err(err(format!("peer {from}: unexpected {} frame", f.name()))),
        Ok((_, Err(e))) => Err(err(format!("peer {from}: connection lost: {e}"))),
        Err(RecvTimeoutError::Timeout) => Err(err(format!(
            "peer {from}: nothing for tag {tag} within {timeout:?}"
        ))),
        Err(RecvTimeoutError::Disconnected) => Err(err(format!("peer {from}: connection closed"))),
    }
}

/// Sends `payload` to every peer, then receives from every peer a frame of `expected(peer)` bytes.
fn exchange_all(
    peers: &mut [Option<Peer>],
    tag: u32,
    payload: &[u8],
    expected: impl Fn(usize) -> usize,
    timeout: Duration,
    what: &str,
) -> Result<()> {
    for (p, peer) in peers.iter_mut().enumerate() {
        if let Some(peer) = peer {
            send(peer, tag, payload).map_err(|e| err(format!("{what} to {p}: {e}")))?;
        }
    }
    for (p, peer) in peers.iter().enumerate() {
        if let Some(peer) = peer {
            recv(peer, p, tag, expected(p), timeout)?;
        }
    }
    Ok(())
}

/// Makes sleeps precise: the default timer slack (50 µs) would add up over hundreds of compute
/// segments. Spinning instead would be exact but starves the other workers when devices
/// outnumber cores.
/// A worker dies with its coordinator (killed, interrupted or crashed): no orphan keeps sending
/// into a torn-down network.
fn die_with_parent() {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number; getppid has no preconditions.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        if libc::getppid() == 1 {
            std::process::exit(1); // the coordinator was already gone
        }
    }
}

fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and only affects this thread's timers.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// Sleeps `ms`, waking early by the wake-up latency seen so far (`late_us`, a running mean of how
/// late past sleeps woke), so that scheduling delays on a busy machine do not add up as compute.
fn sleep_precise(ms: f64, late_us: &mut f64) {
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(ms / 1e3);
    let early = Duration::from_secs_f64((*late_us).clamp(0.0, 500.0) / 1e6);
    if let Some(d) = end.checked_duration_since(Instant::now() + early) {
        std::thread::sleep(d);
        let late = Instant::now()
            .saturating_duration_since(end - early)
            .as_secs_f64()
            * 1e6;
        *late_us = 0.8 * *late_us + 0.2 * late;
    }
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

/// Runs one rank's program of `run` against its peers; returns its report.
pub fn worker(
    run: &Run,
    rank: usize,
    addrs: &[SocketAddr],
    slowdown: f64,
    timeout: Duration,
) -> Result<WorkerReport> {
    let program = run
        .programs
        .get(rank)
        .ok_or_else(|| err(format!("rank {rank} has no program in the run")))?;
    die_with_parent();
    tighten_timer_slack();
    let mut peers = mesh(rank, addrs, timeout)?;
    warm_up(&mut peers, run, rank, timeout)?;
    let one_way_ms = one_way_latency(&mut peers, rank, timeout)?;
    // Start barrier: everyone has everyone's byte.
    exchange_all(
        &mut peers,
        BARRIER_TAG,
        &[1],
        |_| 1,
        timeout,
        "start barrier",
    )?;
    let start = Instant::now();
    let (mut compute_ms, mut send_ms, mut wait_ms) = (0.0, 0.0, 0.0);
    let mut payload = Vec::new();
    let mut late_us = 50.0;
    for op in program {
        match (&op.kind, op.comm()) {
            (OpKind::Compute { ms, .. }, _) => {
                let t = Instant::now();
                sleep_precise(ms * slowdown, &mut late_us);
                compute_ms += t.elapsed().as_secs_f64() * 1e3;
            }
            (_, Some((kind, c))) => {
                payload.resize(c.bits.div_ceil(8) as usize, 0xA5);
                let ex = Exchange {
                    run,
                    rank,
                    op: op.id,
                    timeout,
                };
                let (s, w) = ex.collective(&mut peers, kind, &c.peers, &payload)?;
                send_ms += s;
                wait_ms += w;
            }
            _ => unreachable!("an op is compute or communication"),
        }
    }
    let elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    // Final barrier so no rank closes sockets while a peer still reads.
    exchange_all(
        &mut peers,
        BARRIER_TAG,
        &[2],
        |_| 1,
        timeout,
        "final barrier",
    )?;
    Ok(WorkerReport {
        rank,
        elapsed_ms,
        compute_ms,
        send_ms,
        wait_ms,
        one_way_ms,
    })
}

/// The largest message of rank `p`'s program (bytes, at least 1, at most 1 MiB).
fn largest_message(run: &Run, p: usize) -> usize {
    run.programs[p]
        .iter()
        .filter_map(|op| op.comm())
        .map(|(_, c)| c.bits.div_ceil(8) as usize)
        .max()
        .unwrap_or(0)
        .clamp(1, 1 << 20)
}

/// Opens every connection's congestion window as a long-running deployment's would be, so slow
/// start is not charged to the first exchanges.
fn warm_up(peers: &mut [Option<Peer>], run: &Run, rank: usize, timeout: Duration) -> Result<()> {
    let warm = vec![0u8; largest_message(run, rank)];
    exchange_all(
        peers,
        WARMUP_TAG,
        &warm,
        |p| largest_message(run, p),
        timeout,
        "warm-up",
    )
}

/// Half the median round trip of a ping-pong with the next rank (0 with one device).
fn one_way_latency(peers: &mut [Option<Peer>], rank: usize, timeout: Duration) -> Result<f64> {
    let n = peers.len();
    if n <= 1 {
        return Ok(0.0);
    }
    let next = (rank + 1) % n;
    let prev = (rank + n - 1) % n;
    let mut rtts = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        send(peers[next].as_mut().expect("peer"), PING_TAG, &[])
            .map_err(|e| err(format!("ping {next}: {e}")))?;
        recv(
            peers[prev].as_ref().expect("peer"),
            prev,
            PING_TAG,
            0,
            timeout,
        )?;
        send(peers[prev].as_mut().expect("peer"), PING_TAG, &[])
            .map_err(|e| err(format!("pong {prev}: {e}")))?;
        recv(
            peers[next].as_ref().expect("peer"),
            next,
            PING_TAG,
            0,
            timeout,
        )?;
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    rtts.sort_by(f64::total_cmp);
    // Every rank sends at once and then receives: each sample is two one-way trips.
    Ok(rtts[rtts.len() / 2] / 2.0)
}

/// One communication op of a rank's program.
struct Exchange<'a> {
    run: &'a Run,
    rank: usize,
    op: u32,
    timeout: Duration,
}

impl Exchange<'_> {
    /// Runs the collective with the direct algorithm (all-reduce = two rounds); returns the ms
    /// spent sending and waiting.
    fn collective(
        &self,
        peers: &mut [Option<Peer>],
        kind: Collective,
        members: &[u32],
        payload: &[u8],
    ) -> Result<(f64, f64)> {
        let rank = self.rank;
        let others: Vec<usize> = members
            .iter()
            .map(|&p| p as usize)
            .filter(|&p| p != rank)
            .collect();
        let root = members[0] as usize;
        let (sends, recvs): (Vec<usize>, Vec<usize>) = match kind {
            Collective::AllGather | Collective::AllReduce => (others.clone(), others.clone()),
            Collective::Gather if rank == root => (vec![], others.clone()),
            Collective::Gather => (vec![root], vec![]),
            Collective::Send if rank == root => (vec![members[1] as usize], vec![]),
            Collective::Send => (vec![], vec![root]),
            Collective::Multicast => {
                return Err(err(
                    "the live replay runs over TCP and has no multicast; run the trace's model with `astra-eval distributed --transport multicast`",
                ))
            }
        };
        let rounds = if kind == Collective::AllReduce { 2 } else { 1 };
        let (mut send_ms, mut wait_ms) = (0.0, 0.0);
        for round in 0..rounds {
            let frame_tag = self.op * 2 + round;
            let t = Instant::now();
            for &p in &sends {
                let peer = peers[p]
                    .as_mut()
                    .ok_or_else(|| err(format!("no connection to {p}")))?;
                send(peer, frame_tag, payload)
                    .map_err(|e| err(format!("send to {p} at op {}: {e}", self.op)))?;
            }
            send_ms += t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            for &p in &recvs {
                // Peers' payload sizes may differ (uneven partitions): read the size from their
                // program.
                let their = self.run.programs[p][self.op as usize]
                    .comm()
                    .map(|(_, c)| c.bits.div_ceil(8) as usize)
                    .unwrap_or(0);
                let peer = peers[p]
                    .as_ref()
                    .ok_or_else(|| err(format!("no connection to {p}")))?;
                recv(peer, p, frame_tag, their, self.timeout)?;
            }
            wait_ms += t.elapsed().as_secs_f64() * 1e3;
        }
        Ok((send_ms, wait_ms))
    }
}

/// Shaped links for one replay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Links {
    /// Uplink rate in Mbit/s (2^20 bit).
    pub mbps: f64,
    pub delay_ms: f64,
    pub loss_pct: f64,
}

impl std::str::FromStr for Links {
    type Err = String;
    /// `RATE_MBIT[,DELAY_MS[,LOSS_PCT]]`, e.g. `10` or `100,5,0.1`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let f: Vec<&str> = s.split(',').collect();
        let num = |i: usize, what: &str| -> std::result::Result<f64, String> {
            match f.get(i) {
                None => Ok(0.0),
                Some(v) => v
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| format!("{s}: {what} '{v}' is not a number ≥ 0")),
            }
        };
        let l = Links {
            mbps: num(0, "rate")?,
            delay_ms: num(1, "delay")?,
            loss_pct: num(2, "loss")?,
        };
        if f.len() > 3 || l.mbps <= 0.0 || l.loss_pct > 100.0 {
            return Err(format!(
                "{s}: expected RATE_MBIT[,DELAY_MS[,LOSS_PCT]] with RATE > 0 and LOSS ≤ 100"
            ));
        }
        Ok(l)
    }
}

/// Namespaces made by netem.sh; removed on drop (also on errors and panics).
pub struct Namespaces {
    script: PathBuf,
    prefix: String,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .args(["down", &self.prefix])
            .status();
    }
}

pub struct LiveOutcome {
    pub measured_ms: f64,
    pub reports: Vec<WorkerReport>,
    pub shaped: bool,
    pub netem: bool,
}

/// Shaped links that are up: one namespace and address per device.
pub struct LinksUp {
    pub namespaces: Namespaces,
    /// (namespace, IPv4 address) per device.
    pub devices: Vec<(String, String)>,
    /// Whether netem (delay, loss) is in place.
    pub netem: bool,
}

/// Brings up `n` devices behind shaped uplinks with netem.sh (`prefix` names the namespaces;
/// they go away when the returned guard drops).
pub fn links_up(script: &Path, prefix: &str, n: usize, links: &Links) -> Result<LinksUp> {
    let rate_bit = (links.mbps * crate::network::MBIT).round() as u64;
    let out = Command::new(script)
        .args([
            "up",
            prefix,
            &n.to_string(),
            &rate_bit.to_string(),
            &links.delay_ms.to_string(),
            &links.loss_pct.to_string(),
        ])
        .output()
        .map_err(|e| err(format!("{}: {e}", script.display())))?;
    let namespaces = Namespaces {
        script: script.to_path_buf(),
        prefix: prefix.to_string(),
    };
    if !out.status.success() {
        return Err(err(format!(
            "netem.sh up failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut devices = Vec::new();
    for l in text.lines().filter(|l| !l.starts_with("netem")) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() != 3 {
            return Err(err(format!("bad netem.sh line '{l}'")));
        }
        devices.push((f[1].to_string(), f[2].to_string()));
    }
    if devices.len() != n {
        return Err(err(format!(
            "netem.sh made {} devices, not {n}",
            devices.len()
        )));
    }
    Ok(LinksUp {
        namespaces,
        devices,
        netem: text.lines().any(|l| l == "netem yes"),
    })
}

/// Default location of scripts/netem.sh: $ASTRA_NETEM, else the script in this source tree.
pub fn default_netem_script() -> PathBuf {
    std::env::var_os("ASTRA_NETEM")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/netem.sh"))
}

/// Whether kernel shaping is possible here (root, iproute2, namespaces).
pub fn can_shape(script: &Path) -> bool {
    Command::new(script)
        .arg("check")
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A command running `exe` on this host, inside network namespace `namespace` when given (the
/// one place both the runtime's workers and the replay's workers are started from). The
/// environment is kept, so a session key travels in it.
pub fn command_in(namespace: Option<&str>, exe: &Path) -> Command {
    match namespace {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
    }
}

/// Replays `run` live: N worker processes (this executable's `replay-worker`), shaped when
/// `shape` is on and possible.
pub fn replay(
    run: &Run,
    links: &Links,
    shape: bool,
    script: &Path,
    slowdown: &[f64],
    timeout: Duration,
    id: usize,
) -> Result<LiveOutcome> {
    let n = run.programs.len();
    let exe =
        std::env::current_exe().map_err(|e| err(format!("cannot find own executable: {e}")))?;
    let dir = tempdir(id)?;
    let run_path = dir.join("run.json");
    std::fs::write(&run_path, serde_json::to_vec(run).expect("runs serialise"))
        .map_err(|e| err(e.to_string()))?;
    let (addrs, namespaces, guard, netem) = addresses(links, shape, script, n, id)?;
    let addr_list = addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    // One key per replay, handed to the workers in their environment (never a command line).
    let session = net::session_key();
    let mut children: Vec<Child> = Vec::new();
    for (rank, ns) in namespaces.iter().enumerate() {
        let slow = match slowdown.len() {
            0 => 1.0,
            1 => slowdown[0],
            _ => slowdown[rank],
        };
        let mut cmd = command_in(ns.as_deref(), &exe);
        cmd.arg("replay-worker")
            .args([
                "--rank",
                &rank.to_string(),
                "--peers",
                &addr_list,
                "--slowdown",
                &slow.to_string(),
            ])
            .args(["--timeout-s", &timeout.as_secs_f64().to_string()])
            .arg("--run")
            .arg(&run_path)
            .env(net::SESSION_ENV, &session)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        children.push(
            cmd.spawn()
                .map_err(|e| err(format!("cannot start worker {rank}: {e}")))?,
        );
    }
    let collected = collect_reports(&mut children);
    drop(guard);
    let _ = std::fs::remove_dir_all(&dir);
    let reports = collected.map_err(err)?;
    let measured_ms = reports.iter().map(|r| r.elapsed_ms).fold(0.0, f64::max);
    Ok(LiveOutcome {
        measured_ms,
        reports,
        shaped: shape,
        netem,
    })
}

/// The workers' addresses and network namespaces: behind shaped links (`shape`: netem.sh brings
/// up one namespace per device; the guard takes them down; whether netem is in place) or on
/// loopback ports.
#[allow(clippy::type_complexity)]
fn addresses(
    links: &Links,
    shape: bool,
    script: &Path,
    n: usize,
    id: usize,
) -> Result<(
    Vec<SocketAddr>,
    Vec<Option<String>>,
    Option<Namespaces>,
    bool,
)> {
    if shape {
        let prefix = format!("astra-{}-{id}", std::process::id());
        let up = links_up(script, &prefix, n, links)?;
        let mut a = Vec::new();
        let mut ns = Vec::new();
        for (name, addr) in &up.devices {
            a.push(
                format!("{addr}:47000")
                    .parse()
                    .map_err(|_| err(format!("bad netem.sh address '{addr}'")))?,
            );
            ns.push(Some(name.clone()));
        }
        return Ok((a, ns, Some(up.namespaces), up.netem));
    }
    let base = 20000 + (std::process::id() as usize * 7 + id * 64) % 30000;
    Ok((
        (0..n)
            .map(|i| format!("127.0.0.1:{}", base + i).parse().expect("valid"))
            .collect(),
        vec![None; n],
        None,
        false,
    ))
}

/// Every worker's report line, in rank order; Err names the first worker that failed.
fn collect_reports(children: &mut [Child]) -> std::result::Result<Vec<WorkerReport>, String> {
    let mut reports = Vec::new();
    let mut failure = None;
    for (rank, child) in children.iter_mut().enumerate() {
        let out = child.stdout.take().expect("piped");
        let line = BufReader::new(out)
            .lines()
            .next()
            .and_then(|l| l.ok())
            .unwrap_or_default();
        let status = match child.wait() {
            Ok(s) => s,
            Err(e) => return Err(e.to_string()),
        };
        if !status.success() || line.is_empty() {
            let mut msg = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut msg);
            }
            failure.get_or_insert(format!("worker {rank} failed: {}", msg.trim()));
            continue;
        }
        match serde_json::from_str::<WorkerReport>(&line) {
            Ok(r) => reports.push(r),
            Err(e) => {
                failure.get_or_insert(format!("worker {rank} reported '{line}': {e}"));
            }
        }
    }
    match failure {
        Some(f) => Err(f),
        None => Ok(reports),
    }
}

fn tempdir(id: usize) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("astra-live-{}-{id}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| err(format!("{}: {e}", d.display())))?;
    Ok(d)
}
