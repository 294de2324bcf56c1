//! The real multi-device runtime (first slice): one worker process per device, TCP between them.
//! The coordinator (`astra-eval distributed`) starts N local workers (`astra-eval worker`), hands
//! each its plan, and gathers the class-token states. Workers form a full mesh (rank r dials the
//! ranks below it and accepts the ranks above), every connection opens with the run's session
//! key, and per block each worker VQ-encodes its tokens, sends the bit-packed indices to every
//! peer (reader threads drain every socket, so sends never deadlock), and turns the indices it
//! receives into keys/values with per-codeword tables (the fast path). ViT classification only, on
//! unshaped links; every wait has a deadline and every error names the peer and the block.

pub mod frame;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use astra_quant::bitpack;
use astra_train::model::{Model, Network};
use astra_train::models::{ClsMode, DevicePartition, GroupedVq, VqConfig};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use frame::Frame;

/// The coordinator's rank in Hello frames.
pub const COORDINATOR: u32 = u32::MAX;

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
}

fn configure(s: &TcpStream, timeout: Duration) -> Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(())
}

/// Accepts one connection before `deadline`.
fn accept_by(l: &TcpListener, deadline: Instant, what: &str) -> Result<TcpStream> {
    l.set_nonblocking(true)?;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("timed out waiting for {what}");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Dials `addr` until it answers or `deadline` passes.
fn connect_by(addr: &str, deadline: Instant, what: &str) -> Result<TcpStream> {
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => bail!("{what} at {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Runs a worker: listens on `listen`, prints `listening ADDR`, serves one plan, exits. The
/// coordinator must connect within `startup`; `timeout` bounds the exchanges.
pub fn serve(listen: &str, session: &str, timeout: Duration, startup: Duration) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    println!("listening {}", listener.local_addr()?);
    use std::io::Write;
    std::io::stdout().flush()?;
    let deadline = Instant::now() + startup;
    let mut coord = accept_by(&listener, deadline, "the coordinator")?;
    configure(&coord, timeout)?;
    match Frame::read_from(&mut coord)? {
        Frame::Hello { session: s, rank } if s == session && rank == COORDINATOR => {}
        Frame::Hello { .. } => bail!("a connection presented a wrong session key; refused"),
        other => bail!("expected the coordinator's hello, got {other:?}"),
    }
    let plan: Plan = match Frame::read_from(&mut coord)? {
        Frame::Plan(p) => serde_json::from_str(&p).context("plan")?,
        other => bail!("expected a plan, got {other:?}"),
    };
    match work(&listener, &plan, session) {
        Ok((shape, data, timings)) => Frame::Result {
            from: plan.rank,
            shape,
            data,
            timings,
        }
        .write_to(&mut coord)?,
        Err(e) => {
            let msg = format!("worker {}: {e:#}", plan.rank);
            let _ = Frame::Error(msg.clone()).write_to(&mut coord);
            bail!(msg);
        }
    }
    Ok(())
}

type Received = (u32, std::result::Result<Frame, frame::FrameError>);

/// The full mesh: a stream per peer rank, and a channel fed by one reader thread per peer.
fn mesh(
    listener: &TcpListener,
    plan: &Plan,
    session: &str,
    timeout: Duration,
    startup: Duration,
) -> Result<(HashMap<u32, TcpStream>, mpsc::Receiver<Received>)> {
    let deadline = Instant::now() + startup;
    let mut streams = HashMap::new();
    for j in 0..plan.rank {
        let mut s = connect_by(&plan.peers[j as usize], deadline, &format!("peer {j}"))?;
        configure(&s, timeout)?;
        Frame::Hello {
            session: session.into(),
            rank: plan.rank,
        }
        .write_to(&mut s)?;
        streams.insert(j, s);
    }
    for _ in plan.rank + 1..plan.devices {
        let mut s = accept_by(listener, deadline, "a peer")?;
        configure(&s, timeout)?;
        match Frame::read_from(&mut s)? {
            Frame::Hello { session: k, rank } if k == session => {
                if rank <= plan.rank || rank >= plan.devices || streams.contains_key(&rank) {
                    bail!("a peer announced rank {rank}, which is not expected here");
                }
                streams.insert(rank, s);
            }
            Frame::Hello { .. } => bail!("a peer presented a wrong session key; refused"),
            other => bail!("expected a peer's hello, got {other:?}"),
        }
    }
    let (tx, rx) = mpsc::channel();
    for (&r, s) in &streams {
        let mut s = s.try_clone()?;
        // Reads block without a deadline here; the worker's recv_timeout bounds every wait.
        s.set_read_timeout(None)?;
        let tx = tx.clone();
        std::thread::spawn(move || loop {
            let f = Frame::read_from(&mut s);
            let stop = f.is_err();
            if tx.send((r, f)).is_err() || stop {
                return;
            }
        });
    }
    Ok((streams, rx))
}

/// One device's forward: returns its CLS states (shape, data) and, per block, the ms spent before
/// the exchange (encode, pack, send), waiting for the peers, and after it (unpack, look-ups, the
/// block itself).
fn work(
    listener: &TcpListener,
    plan: &Plan,
    session: &str,
) -> Result<(Vec<i64>, Vec<f32>, Vec<f64>)> {
    let timeout = Duration::from_millis(plan.timeout_ms);
    let (model, _) = Model::load(&plan.model, Device::Cpu)?;
    let Network::ViT(vit) = &model.net else {
        bail!("the runtime runs ViTs so far");
    };
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
            .map(|b| GroupedVq::from_quantizer(b, cfg.clone(), Device::Cpu))
            .collect()
    };
    let input = crate::predict::read_input(std::path::Path::new(&plan.input), &model.config)?;
    let (streams, rx) = mesh(
        listener,
        plan,
        session,
        timeout,
        Duration::from_millis(plan.startup_ms),
    )?;
    let _g = tch::no_grad_guard();
    let (cls, tokens) = vit.embed(&input)?;
    let (b, t, _) = tokens.size3()?;
    let n = plan.devices as usize;
    let p = DevicePartition::contiguous(t as usize, n)?;
    let rank = plan.rank as usize;
    let cls_mode = if plan.single_cls {
        ClsMode::Single
    } else {
        ClsMode::Distributed
    };
    let has_cls = i64::from(rank < cls_mode.copies(n));
    let mine: Vec<i64> = p.tokens_of(rank).iter().map(|&i| i as i64).collect();
    let own = tokens.index_select(1, &Tensor::from_slice(&mine));
    let mut local = if has_cls == 1 {
        Tensor::cat(&[cls.expand([b, 1, -1], false), own], 1)
    } else {
        own
    };
    let (g, k) = vq.first().map_or((1, 1), |q| (q.groups(), q.k()));
    let dim = vit.cfg.hidden_size;
    let bits = bitpack::bits_for(k as usize);
    let mut pending: HashMap<(u32, u32), Tensor> = HashMap::new();
    let mut timings = Vec::new();
    let mut peers: Vec<(u32, TcpStream)> = streams.into_iter().collect();
    peers.sort_by_key(|(r, _)| *r);
    // Per-codeword key/value tables depend only on the model and codebooks: built once, before
    // the clock starts.
    let tables: Vec<_> = vit
        .blocks
        .iter()
        .zip(&vq)
        .map(|(blk, q)| blk.codeword_kv(&q.codebook, vit.cfg.layer_norm_eps))
        .collect();
    let fault = injected_fault(plan.rank);
    for (l, blk) in vit.blocks.iter().enumerate() {
        match fault {
            Some(Fault::Die(at)) if at == l => std::process::exit(3),
            Some(Fault::Silent(at)) if at == l => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            _ => {}
        }
        let t0 = Instant::now();
        let content = local.narrow(1, has_cls, mine.len() as i64);
        let msg = if plan.sp {
            Frame::Embeddings {
                block: l as u32,
                from: plan.rank,
                tokens: mine.len() as u32,
                dim: dim as u32,
                data: Vec::<f32>::try_from(
                    content.to_kind(Kind::Float).contiguous().reshape([-1]),
                )?,
            }
        } else {
            let idx = vq[l].encode(&content);
            let flat: Vec<u16> = Vec::<i64>::try_from(idx.reshape([-1]))?
                .into_iter()
                .map(|v| v as u16)
                .collect();
            Frame::Indices {
                block: l as u32,
                from: plan.rank,
                tokens: mine.len() as u32,
                groups: g as u32,
                bits: bits as u8,
                packed: bitpack::pack(&flat, bits)?,
            }
        };
        for (r, s) in &mut peers {
            msg.write_to(s)
                .map_err(|e| anyhow!("block {l}: sending to peer {r}: {e}"))?;
        }
        let pre = t0.elapsed();
        let t1 = Instant::now();
        let deadline = t1 + timeout;
        for (r, _) in &peers {
            while !pending.contains_key(&(*r, l as u32)) {
                let left = deadline.saturating_duration_since(Instant::now());
                let (from, f) = rx.recv_timeout(left).map_err(|_| {
                    anyhow!(
                        "block {l}: peer {r} sent nothing within {} ms",
                        plan.timeout_ms
                    )
                })?;
                let f = f.map_err(|e| match e {
                    frame::FrameError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                        anyhow!("block {l}: peer {from} closed its connection (did it die?)")
                    }
                    e => anyhow!("block {l}: peer {from}: {e}"),
                })?;
                let expect = p.tokens_of(from as usize).len() as u32;
                if let (
                    true,
                    Frame::Embeddings {
                        block,
                        from: claimed,
                        tokens: nt,
                        dim: fd,
                        data,
                    },
                ) = (plan.sp, &f)
                {
                    let (block, nt) = (*block, *nt);
                    if *claimed != from
                        || nt != expect
                        || *fd as i64 != dim
                        || block as usize >= vit.blocks.len()
                        || block < l as u32
                        || data.len() != (b as usize) * nt as usize * dim as usize
                    {
                        bail!("block {l}: peer {from} sent a malformed embeddings frame (block {block}, rank {claimed}, {nt} tokens × {fd}, {} values)", data.len());
                    }
                    pending.insert(
                        (from, block),
                        Tensor::from_slice(data).view([b, nt as i64, dim]),
                    );
                    continue;
                }
                let Frame::Indices {
                    block,
                    from: claimed,
                    tokens: nt,
                    groups,
                    bits: fb,
                    packed,
                } = f
                else {
                    bail!("block {l}: peer {from} sent an unexpected frame");
                };
                if claimed != from
                    || groups != g as u32
                    || fb as u32 != bits
                    || nt != expect
                    || block as usize >= vit.blocks.len()
                    || block < l as u32
                {
                    bail!(
                        "block {l}: peer {from} sent a frame for block {block} claiming rank {claimed}, {nt} tokens × {groups} groups at {fb} bits (expected {expect} × {g} at {bits}, block ≥ {l})"
                    );
                }
                let count = (b as usize) * nt as usize * groups as usize;
                let vals = bitpack::unpack(&packed, count, bits)
                    .map_err(|e| anyhow!("block {block}: peer {from}: {e}"))?;
                if vals.iter().any(|&v| v as i64 >= k) {
                    bail!("block {block}: peer {from} sent a codeword index ≥ K = {k}");
                }
                let t = Tensor::from_slice(&vals.iter().map(|&v| v as i64).collect::<Vec<_>>())
                    .view([b, nt as i64, g]);
                pending.insert((from, block), t);
            }
        }
        let wait = t1.elapsed();
        let t2 = Instant::now();
        let remote: Vec<Tensor> = peers
            .iter()
            .map(|(r, _)| pending.remove(&(*r, l as u32)).expect("received above"))
            .collect();
        local = if plan.sp {
            let all = (!remote.is_empty()).then(|| Tensor::cat(&remote, 1).to_kind(local.kind()));
            blk.forward(&local, all.as_ref(), None)
        } else {
            let kv = (!remote.is_empty()).then(|| tables[l].kv(&Tensor::cat(&remote, 1)));
            blk.forward_kv(&local, kv.as_ref())
        };
        timings.push(pre.as_secs_f64() * 1e3);
        timings.push(wait.as_secs_f64() * 1e3);
        timings.push(t2.elapsed().as_secs_f64() * 1e3);
    }
    if has_cls == 0 {
        return Ok((vec![0], vec![], timings));
    }
    let state = local.narrow(1, 0, 1).to_kind(Kind::Float).contiguous();
    Ok((
        state.size(),
        Vec::<f32>::try_from(state.reshape([-1]))?,
        timings,
    ))
}

/// Faults the tests inject through `ASTRA_FAULT=die:RANK:BLOCK` (the process exits) or
/// `silent:RANK:BLOCK` (it stops sending but stays alive).
#[derive(Clone, Copy)]
enum Fault {
    Die(usize),
    Silent(usize),
}

fn injected_fault(rank: u32) -> Option<Fault> {
    let v = std::env::var("ASTRA_FAULT").ok()?;
    let mut it = v.split(':');
    let (kind, r, b) = (
        it.next()?,
        it.next()?.parse::<u32>().ok()?,
        it.next()?.parse().ok()?,
    );
    if r != rank {
        return None;
    }
    match kind {
        "die" => Some(Fault::Die(b)),
        "silent" => Some(Fault::Silent(b)),
        _ => None,
    }
}

/// Kills and reaps the workers when the coordinator leaves early.
struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct DistributedArgs {
    pub model: String,
    /// Unused (may be empty) in the SP baseline.
    pub codebooks: PathBuf,
    /// The SP baseline: full-precision embeddings exchanged instead of indices.
    pub sp: bool,
    pub devices: usize,
    pub input: PathBuf,
    pub out: PathBuf,
    pub single_cls: bool,
    /// Waiting on a silent peer during the run.
    pub timeout: Duration,
    /// Waiting for workers to start, load and connect.
    pub startup: Duration,
    /// Write the measured per-block timings as an astra-sim trace here.
    pub trace: Option<PathBuf>,
}

/// The measured run as an astra-sim trace: per device and block, the compute before the
/// exchange, an all-gather of its packed indices, and the compute after it.
fn measured_trace(
    a: &DistributedArgs,
    timings: &[Vec<f64>],
    shape: astra_sim::method::ModelShape,
    method: astra_sim::method::Method,
    bits_per_token: u64,
    tokens: u64,
    batch: u64,
) -> Result<astra_sim::trace::Trace> {
    use astra_sim::trace::{Comm, Op, OpKind, Run, Source, Trace};
    let n = a.devices as u32;
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
                ops.push(Op {
                    id: id + 1,
                    kind: OpKind::AllGather(Comm {
                        bits: batch * sizes[d] * bits_per_token,
                        peers: (0..n).collect(),
                        tag: format!("block {l}"),
                    }),
                    deps: Some(vec![id]),
                });
                ops.push(Op {
                    id: id + 2,
                    kind: OpKind::Compute {
                        ms: b[2],
                        label: format!("block {l} attend + MLP"),
                    },
                    deps: Some(vec![id + 1]),
                });
            }
            ops
        })
        .collect();
    let trace = Trace {
        format: astra_sim::trace::FORMAT.into(),
        version: astra_sim::trace::VERSION,
        source: Source {
            kind: "measured".into(),
            name: "astra-eval distributed".into(),
            provenance: format!(
                "{} worker processes on this host over loopback TCP, batch {batch}; compute as measured",
                a.devices
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

/// Starts N local workers, runs the input through them, writes the logits; returns a summary
/// with the per-block compute and wait times of each worker.
pub fn distributed(a: &DistributedArgs) -> Result<String> {
    if a.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let (model, _) = Model::load(&a.model, Device::Cpu)?;
    let Network::ViT(vit) = &model.net else {
        bail!("the runtime runs ViTs so far");
    };
    if a.devices as i64 > vit.cfg.num_patches() {
        bail!(
            "--devices {} exceeds the model's {} tokens",
            a.devices,
            vit.cfg.num_patches()
        );
    }
    let session: String = {
        use rand::Rng;
        let mut r = rand::rng();
        (0..16)
            .map(|_| format!("{:02x}", r.random::<u8>()))
            .collect()
    };
    let exe = std::env::current_exe()?;
    let ms = a.timeout.as_millis().to_string();
    let startup_ms = a.startup.as_millis().to_string();
    let mut workers = Workers(Vec::new());
    let mut lines = Vec::new();
    // Start every worker first, so they load in parallel.
    for _ in 0..a.devices {
        let mut c = Command::new(&exe)
            .args([
                "worker",
                "--listen",
                "127.0.0.1:0",
                "--session",
                &session,
                "--timeout-ms",
                &ms,
                "--startup-timeout-ms",
                &startup_ms,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a worker")?;
        let out = c.stdout.take().expect("piped");
        workers.0.push(c);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        lines.push(rx);
    }
    let deadline = Instant::now() + a.startup;
    let mut addrs = Vec::new();
    for (r, rx) in lines.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).map_err(|_| {
            anyhow!(
                "worker {r} did not start within {} ms",
                a.startup.as_millis()
            )
        })?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .ok_or_else(|| anyhow!("worker {r} did not start: '{}'", line.trim()))?;
        addrs.push(addr.to_string());
    }
    let mut conns = Vec::new();
    for (r, addr) in addrs.iter().enumerate() {
        let mut s = connect_by(addr, deadline, &format!("worker {r}"))?;
        configure(&s, a.timeout)?;
        Frame::Hello {
            session: session.clone(),
            rank: COORDINATOR,
        }
        .write_to(&mut s)?;
        conns.push(s);
    }
    for (r, s) in conns.iter_mut().enumerate() {
        let plan = Plan {
            rank: r as u32,
            devices: a.devices as u32,
            peers: addrs.clone(),
            model: a.model.clone(),
            codebooks: a.codebooks.display().to_string(),
            input: a.input.display().to_string(),
            single_cls: a.single_cls,
            timeout_ms: a.timeout.as_millis() as u64,
            startup_ms: a.startup.as_millis() as u64,
            sp: a.sp,
        };
        Frame::Plan(serde_json::to_string(&plan)?).write_to(s)?;
    }
    let mut states = Vec::new();
    let mut report = String::new();
    let mut all_timings = Vec::new();
    for (r, s) in conns.iter_mut().enumerate() {
        // A worker reports a failing peer within one timeout of the fault; loading and the
        // whole run may take longer, so the wait for results allows for both.
        s.set_read_timeout(Some(a.startup + a.timeout * 3))?;
        match Frame::read_from(s).map_err(|e| anyhow!("worker {r}: {e}"))? {
            Frame::Result {
                shape,
                data,
                timings,
                ..
            } => {
                if timings.len() % 3 != 0 {
                    bail!("worker {r} sent {} timings, not 3 per block", timings.len());
                }
                let sum = |i: usize| timings.iter().skip(i).step_by(3).sum::<f64>();
                report += &format!(
                    "worker {r}: compute {:.1} ms, waiting {:.1} ms over {} blocks\n",
                    sum(0) + sum(2),
                    sum(1),
                    timings.len() / 3
                );
                all_timings.push(timings);
                if !data.is_empty() {
                    states.push(Tensor::from_slice(&data).view(shape.as_slice()));
                }
            }
            Frame::Error(e) => bail!("{e}"),
            other => bail!("worker {r} answered {other:?}"),
        }
    }
    for c in &mut workers.0 {
        let _ = c.wait();
    }
    workers.0.clear();
    let logits = tch::no_grad(|| vit.head(&Tensor::cat(&states, 1)));
    crate::predict::write_npy_atomic(&logits, &a.out)?;
    if let Some(path) = &a.trace {
        let mut shape = astra_sim::method::ModelShape {
            blocks: vit.blocks.len() as u32,
            hidden: vit.cfg.hidden_size as u32,
            element_bits: 32,
            index_bits: 10,
        };
        let (method, bits_per_token) = if a.sp {
            (
                astra_sim::method::Method::Sp,
                32 * vit.cfg.hidden_size as u64,
            )
        } else {
            let file = astra_quant::CodebookFile::load(&a.codebooks)?;
            let cb = &file.blocks[0].codebook;
            shape.index_bits = bitpack::bits_for(cb.k());
            let g = cb.groups() as u32;
            (
                astra_sim::method::Method::Astra { groups: g },
                g as u64 * shape.index_bits as u64,
            )
        };
        let batch = logits.size()[0] as u64;
        let t = measured_trace(
            a,
            &all_timings,
            shape,
            method,
            bits_per_token,
            vit.cfg.num_patches() as u64,
            batch,
        )?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, t.to_json())
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        report += &format!("trace -> {}\n", path.display());
    }
    Ok(format!(
        "{} devices over TCP: logits {:?} -> {}\n{report}",
        a.devices,
        logits.size(),
        a.out.display()
    ))
}
