//! `astra-eval worker`: one device. It gets its plan from the coordinator, loads the model and
//! codebooks, joins the full mesh of peers, reports ready, and then runs the forward once per
//! `Go`: per block it encodes its tokens, sends the packed indices (or fp32 embeddings for SP) to
//! the peers that attend to them (over TCP, or once on a multicast group), waits for its sources
//! with a deadline, checks every frame, and computes the block (without the sources whose
//! multicast message was lost).

use std::collections::{HashMap, HashSet};
use std::net::{TcpListener, TcpStream};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::{fail, invalid};
use astra_quant::bitpack;
use astra_sim::transport::shaper::Uplink;
use astra_train::model::Model;
use tch::{Device, Kind, Tensor};

use super::frame::{self, protocol_mismatch, Frame, PROTOCOL};
use super::message_clock::{now_ms, MessageClock, SenderClock, Sent};
use super::multicast::{self as group, Group, GroupSender, Inbound, Outlet, Queued};
use super::net::{self, accept_by, configure, read_frames_as, same_key, Control, MeshMember};
use super::{Plan, Transport, COORDINATOR, REJECTED_KEY};
use astra_sim::transport::multicast::MessageId;
use astra_train::engine::{wire_embeddings, DeviceShare, Payload, RemoteKv};
use astra_train::generate::{copy_payload, Generator, Sampling};
use astra_train::models::{ClsMode, DevicePartition, GroupedVq, VqConfig};

/// Where the coordinator's frames come from.
pub enum ControlVia {
    /// The first connection on the listening socket (remote workers).
    Tcp,
    /// stdin/stdout (workers the coordinator started itself).
    Stdio,
}

/// Runs a worker: listens on `listen` for peers (and, with [`ControlVia::Tcp`], the coordinator),
/// prints `listening ADDR`, serves one plan for as many runs as the coordinator asks, exits.
pub fn serve(
    listen: &str,
    session: &str,
    timeout: Duration,
    startup: Duration,
    via: ControlVia,
) -> Result<()> {
    if session.is_empty() {
        fail!("the session key is empty: set ASTRA_SESSION to the run's key");
    }
    let listener = TcpListener::bind(listen).map_err(|e| invalid!("bind {listen}: {e}"))?;
    println!("listening {}", listener.local_addr()?);
    use std::io::Write;
    std::io::stdout().flush()?;
    let deadline = Instant::now() + startup;
    // The hello is read before anything else, capped, so an unauthenticated connection cannot
    // make the worker allocate; a wrong key is answered (the coordinator names it) and refused.
    let (hello, mut control) = match via {
        ControlVia::Tcp => {
            let mut coord = accept_by(&listener, deadline, "the coordinator")?;
            configure(&coord, timeout)?;
            coord.set_read_timeout(Some(startup))?;
            let hello = Frame::read_hello(&mut coord);
            // The coordinator may wait long between runs (its other workers' runs): no read
            // deadline here; a coordinator that goes away closes the connection.
            coord.set_read_timeout(None)?;
            (hello, Control::new(coord.try_clone()?, coord))
        }
        ControlVia::Stdio => {
            let mut stdin = std::io::stdin();
            let hello = Frame::read_hello(&mut stdin);
            (hello, Control::new(stdin, std::io::stdout()))
        }
    };
    match hello {
        Ok(Frame::Hello {
            session: s,
            rank,
            protocol,
        }) if same_key(&s, session) && rank == COORDINATOR => {
            if protocol != PROTOCOL {
                let why = protocol_mismatch("the coordinator", protocol);
                let _ = control.send(&Frame::Error(why.clone()));
                let _ = control.recv(Some(Duration::from_millis(300)));
                fail!("{why}")
            }
        }
        Ok(Frame::Hello { .. }) => {
            let _ = control.send(&Frame::Error(REJECTED_KEY.into()));
            // Let the reader take the plan that follows, so closing does not reset the
            // connection before the coordinator has read why.
            let _ = control.recv(Some(Duration::from_millis(300)));
            fail!("a connection presented a wrong session key; refused")
        }
        Ok(other) => fail!("expected the coordinator's hello, got {}", other.name()),
        Err(e) => fail!("waiting for the coordinator's hello: {e}"),
    }
    let plan: Plan = match control.recv(Some(startup)) {
        Ok(Frame::Plan(p)) => serde_json::from_str(&p).map_err(|e| invalid!("plan: {e}"))?,
        Ok(other) => fail!("expected a plan, got {}", other.name()),
        Err(e) => fail!("waiting for the plan: {e}"),
    };
    if let Err(e) = work(&listener, &plan, session, &mut control) {
        let msg = format!("worker {}: {e:#}", plan.rank);
        let _ = control.send(&Frame::Error(msg.clone()));
        fail!("{msg}");
    }
    Ok(())
}

/// A stream per peer rank, and the channel its reader threads (and the group's) feed.
type Mesh = (
    HashMap<u32, TcpStream>,
    mpsc::Sender<Inbound>,
    mpsc::Receiver<Inbound>,
);

/// The full mesh: a stream per peer rank, and a channel fed by one reader thread per peer.
fn mesh(
    listener: &TcpListener,
    plan: &Plan,
    session: &str,
    timeout: Duration,
    startup: Duration,
) -> Result<Mesh> {
    let me = MeshMember {
        rank: plan.rank,
        peers: &plan.peers,
        session,
        timeout,
    };
    let streams = net::mesh(listener, &me, Instant::now() + startup)?;
    let (tx, rx) = mpsc::channel();
    for (&r, s) in &streams {
        let s = s.try_clone()?;
        // Reads block without a deadline here; the worker's recv_timeout bounds every wait.
        s.set_read_timeout(None)?;
        read_frames_as(s, r as usize, tx.clone(), |t| Inbound::Peer(t, now_ms()));
    }
    Ok((streams, tx, rx))
}

/// Loads, connects, reports ready, then serves runs until `Done`.
fn work(listener: &TcpListener, plan: &Plan, session: &str, control: &mut Control) -> Result<()> {
    if !plan.cores.is_empty() {
        super::cores::pin(&plan.cores)?;
    }
    if plan.threads > 0 {
        tch::set_num_threads(plan.threads as i32);
    }
    let timeout = Duration::from_millis(plan.timeout_ms);
    let device = plan.device()?;
    astra_train::cuda::host_wait::apply_from_env(device).map_err(|e| invalid!("{e}"))?;
    let (model, _) = Model::load(&plan.model, device)?;
    let input = crate::predict::read_input(std::path::Path::new(&plan.input), &model.config)?
        .to_device(device);
    let tokens = model.content_tokens(&input) as usize;
    let vq = quantizers(&model, plan, device)?;
    let cls = if plan.single_cls {
        ClsMode::Single
    } else {
        ClsMode::Distributed
    };
    let dev = DeviceShare::new(
        model.astra_model(),
        DevicePartition::contiguous(tokens, plan.devices as usize)?,
        plan.rank as usize,
        cls,
        &vq,
        RemoteKv::Tables,
        device,
    )?;
    let (streams, tx, rx) = mesh(
        listener,
        plan,
        session,
        timeout,
        Duration::from_millis(plan.startup_ms),
    )?;
    let (stamps, stamped) = mpsc::channel();
    let mut out = outbound(plan, &dev, &streams, session, tx, stamps)?;
    control.send(&Frame::Ready { rank: plan.rank })?;
    // The decoding device keeps what its cache needs from each prefill (refused with the lossy
    // transport: a lost message would leave a hole in its cache).
    let holds_last = dev.partition.owner(dev.partition.tokens() - 1) == dev.rank;
    let decodes = plan.decode_tokens > 0
        && holds_last
        && plan.transport == Transport::Tcp
        && model.astra_model().as_decoder().is_some();
    let mut ex = Exchange {
        plan,
        dev: &dev,
        captured: decodes.then(Vec::new),
        rx,
        pending: HashMap::new(),
        taken: Default::default(),
        announced: HashMap::new(),
        masked: Default::default(),
        run: 0,
        device,
        blocks: model.layers() as usize,
        batch: input.size()[0],
        sent: 0,
        received: 0,
        lost: 0,
        late: 0,
        remote_keys: Vec::new(),
        last_states: None,
        clock: MessageClock::new(
            model.layers() as usize,
            plan.devices as usize,
            dev.sinks.clone(),
            stamped,
        ),
    };
    loop {
        match control.recv(None) {
            Ok(Frame::Go { run }) => ex.run = run,
            Ok(Frame::Done) => return Ok(()),
            Ok(other) => fail!("expected go or done, got {}", other.name()),
            // The coordinator is gone: nothing left to do.
            Err(e) => fail!("the coordinator: {e}"),
        }
        let _g = tch::no_grad_guard();
        let (states, mut timings, finish) = ex.forward(&input, &mut out)?;
        let (sent_bytes, received_bytes, lost, late) = (ex.sent, ex.received, ex.lost, ex.late);
        let head_ms = finish.elapsed().as_secs_f64() * 1e3;
        ex.clock.collect_sends(Instant::now() + timeout);
        let (shape, data) = match states {
            Some(s) => {
                let s = s.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
                (s.size(), Vec::<f32>::try_from(s.reshape([-1]))?)
            }
            None => (vec![0], vec![]),
        };
        // The head and the copy of its output to the host: device work after the last block
        // (GPT-2's next-token logits are 50,257 values), which the trace replays too.
        timings.push(head_ms);
        if let Some(Fault::LateResult(ms)) = injected_fault(plan.rank) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        control.send(&Frame::Result {
            from: plan.rank,
            shape,
            data,
            timings,
            sent_bytes,
            received_bytes,
            lost,
            late,
            sent_at: ex.clock.sent_at.clone(),
            received_at: ex.clock.received_at.clone(),
            handled_ms: ex.clock.handled_ms.clone(),
            remote_keys: ex.remote_keys.clone(),
        })?;
        if let Some(per_block) = ex.captured.as_mut().map(std::mem::take) {
            let last = ex.last_states.take().expect("captured with the prefill");
            // The prefill's own share (its codeword tables built once, at load).
            control.send(&decode(&model, dev.clone(), per_block, &last, plan)?)?;
        }
    }
}

/// How this device's messages leave: a sender thread for every peer that attends to its tokens
/// (TCP), or one for the group (multicast, after joining it to receive its sources'); all share
/// the device's one uplink when it is shaped here.
fn outbound(
    plan: &Plan,
    dev: &DeviceShare<'_>,
    streams: &HashMap<u32, TcpStream>,
    session: &str,
    tx: mpsc::Sender<Inbound>,
    stamps: mpsc::Sender<Sent>,
) -> Result<Outbound> {
    let uplink = plan
        .uplink
        .as_ref()
        .map(|l| Arc::new(Uplink::new(l.mbps, l.delay_ms)));
    let sinks: Vec<(u32, TcpStream)> = dev
        .sinks
        .iter()
        .filter_map(|r| streams.get(r).map(|s| s.try_clone().map(|s| (*r, s))))
        .collect::<std::io::Result<_>>()?;
    if plan.transport == Transport::Tcp {
        return Ok(Outbound::Tcp(
            sinks
                .into_iter()
                .map(|(r, s)| Sender::new(r, s, uplink.clone(), stamps.clone()))
                .collect(),
        ));
    }
    let g = plan
        .group
        .as_deref()
        .ok_or_else(|| invalid!("the plan names no multicast group"))?;
    let g = Group::new(g, &plan.peers[plan.rank as usize], session)?;
    group::receive(&g, dev.sources.clone(), tx)?;
    if sinks.is_empty() {
        return Ok(Outbound::Tcp(Vec::new()));
    }
    let outlet = Outlet {
        from: plan.rank,
        sinks,
        uplink,
        loss: plan.uplink.as_ref().map_or(0.0, |l| l.loss_pct / 100.0),
        stamps,
    };
    Ok(Outbound::Group(GroupSender::new(&g, outlet)?))
}

/// Where a block's message goes: one copy per peer over TCP, or one on the multicast group.
enum Outbound {
    Tcp(Vec<Sender>),
    Group(GroupSender),
}

impl Outbound {
    fn is_empty(&self) -> bool {
        matches!(self, Outbound::Tcp(s) if s.is_empty())
    }

    /// Queues block `l`'s message of run `run`; the bytes it puts on the wire.
    fn send(&mut self, l: usize, run: u32, from: u32, msg: &Arc<Vec<u8>>) -> Result<u64> {
        let id = MessageId {
            run,
            block: l as u32,
            from,
        };
        let ready_ms = now_ms();
        match self {
            Outbound::Tcp(sinks) => {
                for s in sinks.iter_mut() {
                    s.send(id, ready_ms, msg.clone())?;
                }
                Ok((msg.len() * sinks.len()) as u64)
            }
            Outbound::Group(g) => g.send(id, ready_ms, msg.clone()),
        }
    }
}

/// Greedy decoding on this device after its prefill: the tokens and each step's milliseconds.
fn decode(
    model: &Model,
    share: DeviceShare<'_>,
    per_block: Vec<(Tensor, Vec<Payload>)>,
    last: &Tensor,
    plan: &Plan,
) -> Result<Frame> {
    let (mut g, mut logits) = Generator::from_prefill(model.astra_model(), share, per_block, last)?;
    let sampling = plan.sampling.clone().unwrap_or_else(Sampling::greedy);
    tch::manual_seed(sampling.seed as i64);
    let mut tokens = Vec::new();
    let mut step_ms = Vec::new();
    for i in 0..plan.decode_tokens {
        let next = sampling.pick(&logits);
        tokens.push(next.shallow_clone());
        if i + 1 < plan.decode_tokens {
            let t = Instant::now();
            logits = g.step(&next)?;
            step_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let ids = Tensor::stack(&tokens, 1); // [B, new]
    Ok(Frame::Decoded {
        from: plan.rank,
        batch: ids.size()[0] as u32,
        tokens: Vec::<i64>::try_from(ids.reshape([-1]))?,
        step_ms,
    })
}

/// The run's quantizers (none for the SP baseline), without NAQ noise.
fn quantizers(model: &Model, plan: &Plan, device: Device) -> Result<Vec<GroupedVq>> {
    if plan.sp {
        return Ok(Vec::new());
    }
    let cfg = VqConfig {
        noise_lambda: 0.0,
        ..Default::default()
    };
    Ok(model.load_quantizers(std::path::Path::new(&plan.codebooks), &cfg, device)?)
}

/// Sends to one peer from a thread of its own, so a message larger than the socket buffer (SP's
/// embeddings on a slow link) goes out while the device waits for its sources, and the time spent
/// transmitting is not counted as compute. With a user-space `uplink`, each message is held until
/// the shaped link would have delivered it.
struct Sender {
    rank: u32,
    queue: mpsc::Sender<Queued>,
    failed: mpsc::Receiver<String>,
}

impl Sender {
    fn new(
        rank: u32,
        mut stream: TcpStream,
        uplink: Option<Arc<Uplink>>,
        stamps: mpsc::Sender<Sent>,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Queued>();
        let (ftx, failed) = mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut clock = SenderClock::default();
            for (id, ready_ms, bytes) in rx {
                let taken_ms = now_ms();
                let held = uplink
                    .as_ref()
                    .map_or(Duration::ZERO, |u| u.transmit(bytes.len()));
                let _ = stamps.send(Sent {
                    run: id.run,
                    block: id.block,
                    to: Some(rank),
                    left_ms: clock.left(ready_ms, taken_ms, held),
                });
                if let Err(e) = stream.write_all(&bytes) {
                    let _ = ftx.send(e.to_string());
                    return;
                }
                clock.finished();
            }
        });
        Sender {
            rank,
            queue: tx,
            failed,
        }
    }

    /// Queues message `id` (ready at `ready_ms`) for the peer; reports an earlier send that
    /// failed.
    fn send(&mut self, id: MessageId, ready_ms: f64, bytes: Arc<Vec<u8>>) -> Result<()> {
        let (r, l) = (self.rank, id.block);
        if let Ok(e) = self.failed.try_recv() {
            fail!("block {l}: sending to peer {r}: {e}");
        }
        self.queue
            .send((id, ready_ms, bytes))
            .map_err(|_| invalid!("block {l}: sending to peer {r}: the sender stopped"))
    }
}

struct Exchange<'a> {
    plan: &'a Plan,
    dev: &'a DeviceShare<'a>,
    /// Frames from the peers, tagged with the sender's rank, and whole group messages.
    rx: mpsc::Receiver<Inbound>,
    /// Payloads that arrived ahead of the block waiting for them, by (sender, block).
    pending: HashMap<(u32, u32), Payload>,
    /// (sender, block) payloads already taken in this run: a second copy is a replay.
    taken: HashSet<(u32, u32)>,
    /// Multicast: when each (sender, block) announcement of this run arrived.
    announced: HashMap<(u32, u32), Instant>,
    /// Multicast: (sender, block) messages taken as lost in this run (a late copy is ignored).
    masked: HashSet<(u32, u32)>,
    /// The run the coordinator's last `Go` named.
    run: u32,
    device: Device,
    blocks: usize,
    batch: i64,
    /// Bytes of the frames this worker queued for its peers and took from them in this run,
    /// and the sources' messages it never got.
    sent: u64,
    received: u64,
    lost: u32,
    /// Messages taken as lost that arrived whole afterwards.
    late: u32,
    /// Per block of this run: how many remote keys the block step attended to.
    remote_keys: Vec<u32>,
    /// The decoding device: per block its states before the block and the payloads it
    /// received in the last run, and its final states (None on the other devices).
    captured: Option<Vec<(Tensor, Vec<Payload>)>>,
    last_states: Option<Tensor>,
    /// When this run's messages left and arrived.
    clock: MessageClock,
}

impl Exchange<'_> {
    /// One forward: returns what goes back to the coordinator; per block, the ms spent before
    /// the exchange (block 0 also embeds), waiting for the sources, and after it; and when the
    /// head started (the caller adds the ms until its output is on the host).
    fn forward(
        &mut self,
        input: &Tensor,
        out: &mut Outbound,
    ) -> Result<(Option<Tensor>, Vec<f64>, Instant)> {
        let t_start = Instant::now();
        self.taken.clear();
        self.announced.clear();
        self.masked.clear();
        self.clock.start(self.run);
        (self.sent, self.received, self.lost, self.late) = (0, 0, 0, 0);
        self.remote_keys.clear();
        let mut local = self.dev.start(input)?;
        let mut embed = t_start.elapsed();
        let mut timings = Vec::with_capacity(3 * self.blocks);
        let fault = injected_fault(self.plan.rank);
        for l in 0..self.blocks {
            match fault {
                Some(Fault::Die(at)) if at == l => std::process::exit(3),
                Some(Fault::Silent(at)) if at == l => loop {
                    std::thread::sleep(Duration::from_secs(3600));
                },
                _ => {}
            }
            let t0 = Instant::now();
            if !out.is_empty() {
                let msg = std::sync::Arc::new(self.message(l, &local)?.to_bytes());
                let copies = if matches!(fault, Some(Fault::Twice(at)) if at == l) {
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    self.sent += out.send(l, self.run, self.plan.rank, &msg)?;
                }
            }
            let pre = t0.elapsed() + std::mem::take(&mut embed);
            let t1 = Instant::now();
            let received = self.receive(l)?;
            let wait = t1.elapsed();
            let t2 = Instant::now();
            let received = upload(received, self.device);
            if let Some(c) = self.captured.as_mut() {
                c.push((
                    local.shallow_clone(),
                    received.iter().flatten().map(copy_payload).collect(),
                ));
            }
            let received: Vec<Option<&Payload>> = received.iter().map(Option::as_ref).collect();
            let out = self.dev.block_partial(l, &local, &received);
            local = out.states;
            self.remote_keys.push(out.remote_keys as u32);
            // The block's kernels run asynchronously on a GPU: its time is when they are done.
            if let Device::Cuda(i) = self.device {
                tch::Cuda::synchronize(i as i64);
            }
            timings.extend([
                pre.as_secs_f64() * 1e3,
                wait.as_secs_f64() * 1e3,
                t2.elapsed().as_secs_f64() * 1e3,
            ]);
        }
        if self.captured.is_some() {
            self.last_states = Some(local.shallow_clone());
        }
        let finish = Instant::now();
        Ok((
            self.dev.finish(&local, !self.plan.all_logits),
            timings,
            finish,
        ))
    }

    fn message(&self, l: usize, local: &Tensor) -> Result<Frame> {
        let (block, from, tokens) = (l as u32, self.plan.rank, self.dev.own_tokens() as u32);
        Ok(match self.dev.outgoing(l, local) {
            Payload::Embeddings(e) => Frame::Embeddings {
                block,
                from,
                tokens,
                dim: e.size()[2] as u32,
                data: Vec::<f32>::try_from(wire_embeddings(&e).reshape([-1]))?,
            },
            Payload::Indices(idx) => {
                let columns = self.dev.index_columns(l);
                let k = columns.iter().copied().max().unwrap_or(1);
                let bits = bitpack::bits_for(k as usize);
                let flat: Vec<u16> =
                    Vec::<i64>::try_from(idx.reshape([-1]).to_device(Device::Cpu))?
                        .into_iter()
                        .map(|v| v as u16)
                        .collect();
                Frame::Indices {
                    block,
                    from,
                    tokens,
                    groups: columns.len() as u32,
                    bits: bits as u8,
                    packed: bitpack::pack(&flat, bits)?,
                }
            }
        })
    }

    /// The payloads of block `l` from every source, in rank order, each frame checked and held
    /// on the host (see [`upload`]); None for
    /// a source whose multicast message was announced but is still incomplete a grace period
    /// later (lost: its tokens are masked out of this block).
    fn receive(&mut self, l: usize) -> Result<Vec<Option<Payload>>> {
        let timeout_ms = self.plan.timeout_ms;
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let grace = Duration::from_millis(self.plan.loss_grace_ms);
        let dev = self.dev;
        self.clock.waiting();
        let mut out = Vec::with_capacity(dev.sources.len());
        for &r in &dev.sources {
            let key = (r, l as u32);
            loop {
                if let Some(p) = self.pending.remove(&key) {
                    self.taken.insert(key);
                    out.push(Some(p));
                    break;
                }
                let lost_at = self.announced.get(&key).map(|&t| t + grace);
                let now = Instant::now();
                if lost_at.is_some_and(|t| now >= t) {
                    self.masked.insert(key);
                    self.lost += 1;
                    out.push(None);
                    break;
                }
                let until = lost_at.map_or(deadline, |t| t.min(deadline));
                match self.rx.recv_timeout(until.saturating_duration_since(now)) {
                    Ok(inbound) => self.take(l, inbound)?,
                    Err(_) if lost_at.is_some() => {}
                    Err(_) => fail!("block {l}: peer {r} sent nothing within {timeout_ms} ms"),
                }
            }
        }
        Ok(out)
    }

    /// One frame from a peer's connection or one message from the group, while waiting in
    /// block `l`.
    fn take(&mut self, l: usize, inbound: Inbound) -> Result<()> {
        let (taken_ms, taking) = (now_ms(), Instant::now());
        let multicast = self.plan.transport == Transport::Multicast;
        let (from, f, at) = match inbound {
            Inbound::Peer((from, f), at) => {
                let f = f.map_err(|e| match e {
                    frame::FrameError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                        invalid!("block {l}: peer {from} closed its connection (did it die?)")
                    }
                    e => invalid!("block {l}: peer {from}: {e}"),
                })?;
                let from = from as u32;
                self.received += f.wire_len() as u64;
                match f {
                    Frame::Announce {
                        run,
                        block,
                        from: claimed,
                        ..
                    } if multicast && claimed == from => {
                        // Announcements of an earlier run are stale.
                        if run == self.run {
                            self.announced.insert((from, block), Instant::now());
                        }
                        return Ok(());
                    }
                    Frame::Indices { .. } | Frame::Embeddings { .. } if multicast => {
                        fail!(
                            "block {l}: peer {from} sent its data over TCP; the run multicasts it"
                        )
                    }
                    f => (from, f, at),
                }
            }
            Inbound::Group(id, bytes, at) => {
                let key = (id.from, id.block);
                // A message of an earlier run, or one already taken as lost, came too late.
                if id.run != self.run {
                    return Ok(());
                }
                if self.masked.contains(&key) {
                    self.late += 1;
                    return Ok(());
                }
                self.received += group::received_len(bytes.len());
                let f = Frame::read_from(&mut bytes.as_slice()).map_err(|e| {
                    invalid!("block {l}: peer {}'s multicast message: {e}", id.from)
                })?;
                if !matches!(&f, Frame::Indices { block, from, .. } | Frame::Embeddings { block, from, .. } if (*from, *block) == key)
                {
                    fail!(
                        "block {l}: peer {}'s multicast message is not its block {} data",
                        id.from,
                        id.block
                    );
                }
                (id.from, f, at)
            }
        };
        let (block, payload) = self.check(l, from, f)?;
        let replay = self.taken.contains(&(from, block));
        if self.pending.insert((from, block), payload).is_some() || replay {
            fail!("block {l}: peer {from} sent block {block}'s data twice; refused");
        }
        self.clock
            .received(block, from, at, taken_ms, taking.elapsed());
        Ok(())
    }

    /// Validates a peer's frame against what this run expects of that peer.
    fn check(&self, l: usize, from: u32, f: Frame) -> Result<(u32, Payload)> {
        if !self.dev.sources.contains(&from) {
            fail!("block {l}: peer {from} sent data this device does not attend to");
        }
        let expect = self.dev.partition.tokens_of(from as usize).len() as u32;
        let batch = self.batch as usize;
        match f {
            Frame::Embeddings {
                block,
                from: claimed,
                tokens,
                dim,
                data,
            } if self.plan.sp => {
                if claimed != from
                    || tokens != expect
                    || dim as i64 != self.dev.hidden()
                    || block as usize >= self.blocks
                    || block < l as u32
                    || data.len() != batch * tokens as usize * dim as usize
                {
                    fail!("block {l}: peer {from} sent a malformed embeddings frame (block {block}, rank {claimed}, {tokens} tokens × {dim}, {} values)", data.len());
                }
                let t = Tensor::from_slice(&data).view([self.batch, tokens as i64, dim as i64]);
                Ok((block, Payload::Embeddings(t)))
            }
            Frame::Indices {
                block,
                from: claimed,
                tokens,
                groups,
                bits,
                packed,
            } if !self.plan.sp => {
                if block < l as u32 {
                    // Every source's data for earlier blocks has been taken: this is a replay.
                    fail!("block {l}: peer {from} sent block {block}'s data twice; refused");
                }
                if block as usize >= self.blocks {
                    fail!("block {l}: peer {from} sent a frame for block {block}");
                }
                // Index columns of the block's quantizers (one, or Llama's keys and values).
                let columns = self.dev.index_columns(block as usize);
                let g = columns.len() as i64;
                let want_bits =
                    bitpack::bits_for(columns.iter().copied().max().unwrap_or(1) as usize);
                if claimed != from
                    || groups != g as u32
                    || bits as u32 != want_bits
                    || tokens != expect
                {
                    fail!(
                        "block {l}: peer {from} sent a frame claiming rank {claimed}, {tokens} tokens × {groups} groups at {bits} bits (expected {expect} × {g} at {want_bits})"
                    );
                }
                let count = batch * tokens as usize * groups as usize;
                if packed.len() != (count * bits as usize).div_ceil(8) {
                    fail!(
                        "block {block}: peer {from} sent {} bytes of indices, expected {count} indices at {bits} bits",
                        packed.len()
                    );
                }
                let vals = bitpack::unpack(&packed, count, bits as u32)
                    .map_err(|e| invalid!("block {block}: peer {from}: {e}"))?;
                if let Some((i, &v)) = vals
                    .iter()
                    .enumerate()
                    .find(|&(i, &v)| v as i64 >= columns[i % columns.len()])
                {
                    let k = columns[i % columns.len()];
                    fail!("block {block}: peer {from} sent a codeword index {v} ≥ K = {k}");
                }
                let t = Tensor::from_slice(&vals.iter().map(|&v| v as i64).collect::<Vec<_>>())
                    .view([self.batch, tokens as i64, g]);
                Ok((block, Payload::Indices(t)))
            }
            other => fail!(
                "block {l}: peer {from} sent an unexpected {} frame",
                other.name()
            ),
        }
    }
}

/// Block payloads as they arrived (host tensors, None for a lost source) on the compute `device`,
/// with one copy for all sources: each copy of its own is a synchronisation, and workers sharing
/// one GPU wait for each other there (the runs' waiting grew with the number of sources). Done
/// the same way on the CPU, where the copy is the concatenation, so the tests cover it.
fn upload(received: Vec<Option<Payload>>, device: Device) -> Vec<Option<Payload>> {
    let tensors: Vec<&Tensor> = received.iter().flatten().map(Payload::tensor).collect();
    if tensors.is_empty() {
        return received;
    }
    let sizes: Vec<i64> = tensors.iter().map(|t| t.size()[1]).collect();
    let mut parts = Tensor::cat(&tensors, 1)
        .to_device(device)
        .split_with_sizes(&sizes, 1)
        .into_iter();
    received
        .into_iter()
        .map(|p| p.map(|p| p.with(parts.next().expect("a part per payload"))))
        .collect()
}

/// Faults the tests inject through `ASTRA_FAULT=die:RANK:BLOCK` (the process exits),
/// `silent:RANK:BLOCK` (it stops sending but stays alive), `twice:RANK:BLOCK` (it sends that
/// block's message twice, as a replaying peer would) or `late:RANK:MS` (it sends each result MS
/// ms late, as a slow machine would).
#[derive(Clone, Copy)]
enum Fault {
    Die(usize),
    Silent(usize),
    Twice(usize),
    LateResult(u64),
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
        "twice" => Some(Fault::Twice(b)),
        "late" => Some(Fault::LateResult(b as u64)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn indices(p: &Option<Payload>) -> Option<Vec<i64>> {
        p.as_ref()
            .map(|p| Vec::<i64>::try_from(p.tensor().reshape([-1])).unwrap())
    }

    #[test]
    fn upload_keeps_each_source_in_its_slot() {
        let a = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).view([2, 3, 1]);
        let b = Tensor::from_slice(&[7i64, 8, 9, 10]).view([2, 2, 1]);
        let before = vec![
            Some(Payload::Indices(a.copy())),
            None,
            Some(Payload::Indices(b.copy())),
        ];
        let want: Vec<_> = before.iter().map(indices).collect();
        let after = upload(before, Device::Cpu);
        assert_eq!(after.iter().map(indices).collect::<Vec<_>>(), want);
        assert!(matches!(after[2], Some(Payload::Indices(ref t)) if t.size() == [2, 2, 1]));
    }

    #[test]
    fn upload_keeps_embeddings_embeddings() {
        let e = Tensor::ones([1, 4, 3], (Kind::Float, Device::Cpu));
        let after = upload(vec![None, Some(Payload::Embeddings(e))], Device::Cpu);
        assert!(after[0].is_none());
        assert!(matches!(after[1], Some(Payload::Embeddings(ref t)) if t.size() == [1, 4, 3]));
    }
}
