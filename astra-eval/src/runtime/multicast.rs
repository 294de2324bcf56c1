//! The worker's side of `--transport multicast`: a thread that sends each block's message once
//! to the group (then a small announcement to every peer that attends to it, over TCP and
//! through the same shaped uplink), and a thread that receives the group's datagrams and hands
//! up the whole messages of this device's sources. Datagrams are never retransmitted; the
//! worker masks a source whose message is incomplete once the announcement has arrived (see
//! `worker::Exchange::receive`).

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::sync::{mpsc, Arc};

use astra_sim::transport::multicast::{self, Arrival, MessageId, Reassembler};
use astra_sim::transport::net::Tagged;
use astra_sim::transport::shaper::Uplink;
use astra_sim::transport::Frame;
use rand::{Rng, SeedableRng};

use super::message_clock::{now_ms, SenderClock, Sent};
use crate::error::Result;
use crate::{fail, invalid};

/// What reaches a worker from its peers: a frame on a TCP connection, or a whole message from
/// the group; each with when its reader thread had it (host clock, ms).
pub enum Inbound {
    Peer(Tagged, f64),
    Group(MessageId, Vec<u8>, f64),
}

/// The group and this worker's address on the devices' segment (the interface it sends and
/// joins on), from the plan.
pub struct Group {
    pub addr: SocketAddrV4,
    pub iface: Ipv4Addr,
    pub tag: u64,
}

impl Group {
    /// `group` GROUP:PORT; `me` the address peers reach this worker at (HOST:PORT).
    pub fn new(group: &str, me: &str, session: &str) -> Result<Self> {
        let addr = multicast::parse_group(group).map_err(|e| invalid!("--group {e}"))?;
        use std::net::ToSocketAddrs;
        let iface = me
            .to_socket_addrs()
            .map_err(|e| invalid!("multicast: this worker's address {me}: {e}"))?
            .find_map(|a| match a.ip() {
                std::net::IpAddr::V4(v4) => Some(v4),
                _ => None,
            })
            .ok_or_else(|| invalid!("multicast needs an IPv4 address; this worker is at {me}"))?;
        Ok(Group {
            addr,
            iface,
            tag: multicast::session_tag(session),
        })
    }
}

/// Receives the group's datagrams on a thread of its own and passes the whole messages of
/// `sources` to `tx` (others' messages, and this worker's own looped back, are not for it).
pub fn receive(g: &Group, sources: Vec<u32>, tx: mpsc::Sender<Inbound>) -> Result<()> {
    let sock = multicast::join(g.addr, g.iface)
        .map_err(|e| invalid!("joining multicast group {} on {}: {e}", g.addr, g.iface))?;
    let mut r = Reassembler::new(g.tag);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        let mut newest = 0;
        while let Ok(n) = sock.recv(&mut buf) {
            if let Arrival::Complete(id, bytes) = r.push(&buf[..n]) {
                // Every worker finished run r − 1 before anyone started run r.
                if id.run > newest {
                    newest = id.run;
                    r.forget_before(newest);
                }
                let at = now_ms();
                if sources.contains(&id.from) && tx.send(Inbound::Group(id, bytes, at)).is_err() {
                    return;
                }
            }
        }
    });
    Ok(())
}

/// Bytes a received group message occupied in its datagrams (headers of ours included).
pub fn received_len(message: usize) -> u64 {
    (message + message.div_ceil(multicast::CHUNK_DATA).max(1) * multicast::HEADER) as u64
}

/// A message for a sender thread (the group's, or a TCP peer's): its id, when the device queued
/// it (host clock, ms), its bytes.
pub type Queued = (MessageId, f64, Arc<Vec<u8>>);

/// One thread putting this worker's messages on the group, in order.
pub struct GroupSender {
    queue: mpsc::Sender<Queued>,
    failed: mpsc::Receiver<String>,
    sinks: usize,
}

/// What a [`GroupSender`] needs besides the group.
pub struct Outlet {
    pub from: u32,
    /// TCP connections to the peers that attend to this worker's tokens (the announcements).
    pub sinks: Vec<(u32, TcpStream)>,
    /// The user-space shaped uplink, shared by datagrams and announcements.
    pub uplink: Option<Arc<Uplink>>,
    /// User-space loss: each message is dropped whole with this probability (after it took its
    /// time on the uplink, as a message lost on the air would).
    pub loss: f64,
    /// When each message left the uplink (see `message_clock`).
    pub stamps: mpsc::Sender<Sent>,
}

impl GroupSender {
    pub fn new(g: &Group, out: Outlet) -> Result<Self> {
        let sock = multicast::sender(g.iface)
            .map_err(|e| invalid!("multicast sender on {}: {e}", g.iface))?;
        let (tx, rx) = mpsc::channel::<Queued>();
        let (ftx, failed) = mpsc::channel();
        let (addr, tag, sinks) = (g.addr, g.tag, out.sinks.len());
        std::thread::spawn(move || {
            // Each run draws its own losses (the session key is new per run), each worker its own.
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(tag ^ u64::from(out.from));
            let mut out = out;
            let mut clock = SenderClock::default();
            for (id, ready_ms, bytes) in rx {
                let taken_ms = now_ms();
                match put(&sock, (addr, tag), id, &bytes, &mut out, &mut rng) {
                    Ok(held) => {
                        let _ = out.stamps.send(Sent {
                            run: id.run,
                            block: id.block,
                            to: None,
                            left_ms: clock.left(ready_ms, taken_ms, held),
                        });
                    }
                    Err(e) => {
                        let _ = ftx.send(e);
                        return;
                    }
                }
                clock.finished();
            }
        });
        Ok(GroupSender {
            queue: tx,
            failed,
            sinks,
        })
    }

    /// Queues block `id.block`'s message (ready at `ready_ms`, host clock); returns the bytes it
    /// puts on the wire (datagrams, then one announcement per peer). Reports an earlier send
    /// that failed.
    pub fn send(&mut self, id: MessageId, ready_ms: f64, bytes: Arc<Vec<u8>>) -> Result<u64> {
        let l = id.block;
        if let Ok(e) = self.failed.try_recv() {
            fail!("block {l}: multicast: {e}");
        }
        let chunks = bytes.len().div_ceil(multicast::CHUNK_DATA).max(1);
        let announce = announcement(id, chunks).len() * self.sinks;
        let n = received_len(bytes.len()) + announce as u64;
        self.queue
            .send((id, ready_ms, bytes))
            .map_err(|_| invalid!("block {l}: multicast: the sender stopped"))?;
        Ok(n)
    }
}

/// Bytes of one announcement frame (its fields are fixed-width).
pub(crate) fn announcement_len() -> usize {
    let id = MessageId {
        run: 0,
        block: 0,
        from: 0,
    };
    announcement(id, 1).len()
}

fn announcement(id: MessageId, datagrams: usize) -> Vec<u8> {
    Frame::Announce {
        run: id.run,
        block: id.block,
        from: id.from,
        datagrams: datagrams as u32,
    }
    .to_bytes()
}

/// One message on the group (unless the user-space loss drops it), then its announcements;
/// returns how long the uplink's bucket held the message.
fn put(
    sock: &std::net::UdpSocket,
    (addr, tag): (SocketAddrV4, u64),
    id: MessageId,
    bytes: &[u8],
    out: &mut Outlet,
    rng: &mut impl Rng,
) -> std::result::Result<std::time::Duration, String> {
    let datagrams = multicast::datagrams(tag, id, bytes).map_err(|e| e.to_string())?;
    let held = out.uplink.as_ref().map_or(std::time::Duration::ZERO, |u| {
        u.transmit_wire(multicast::wire_bytes(bytes.len()))
    });
    if !(out.loss > 0.0 && rng.random_bool(out.loss.min(1.0))) {
        for d in &datagrams {
            sock.send_to(d, addr)
                .map_err(|e| format!("sending to {addr}: {e}"))?;
        }
    }
    let a = announcement(id, datagrams.len());
    for (r, s) in out.sinks.iter_mut() {
        if let Some(u) = &out.uplink {
            u.transmit(a.len());
        }
        s.write_all(&a)
            .map_err(|e| format!("announcing to peer {r}: {e}"))?;
    }
    Ok(held)
}
