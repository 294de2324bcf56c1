//! Index messages on the wire once for all peers: UDP multicast on the devices' segment (a
//! bridge of network namespaces, loopback on one host, Wi-Fi in the field), without
//! retransmission. ASTRA tolerates a lost index message (the receiver leaves the sender's tokens
//! out of that block), so a lost datagram costs accuracy, not a stall; TCP stays the reference.
//!
//! A message (a [`super::Frame`]'s bytes) is cut into datagrams of at most [`CHUNK_DATA`] bytes
//! each behind a [`HEADER`]-byte header, so none is fragmented by IP on a 1500-byte link: a lost
//! datagram loses only its message, and the receiver's [`Reassembler`] hands up whole messages.
//! The header's tag (a hash of the run's session key) separates concurrent runs on one segment;
//! it is not authentication (anyone on the segment sees it): where peers must be authenticated,
//! use TCP.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// Datagram header: tag u64, run u32, block u32, sender rank u32, chunk u16, chunks u16.
pub const HEADER: usize = 24;
/// Message bytes per datagram: header + data + UDP (8) + IPv4 (20) = 1500, one Ethernet MTU.
pub const CHUNK_DATA: usize = 1500 - 28 - HEADER;
/// Ethernet (14), IPv4 (20) and UDP (8) headers: what a shaper counts besides the datagram.
pub const DATAGRAM_OVERHEAD: usize = 42;
/// Largest message accepted (datagrams × data), like the TCP frames' payload limit.
pub const MAX_CHUNKS: usize = 1 << 14;
/// Messages being reassembled at once; beyond it the oldest run's are dropped.
const MAX_PARTIAL: usize = 4096;
/// Receive buffer asked of the kernel: a whole block's messages from every peer.
const RECV_BUFFER: usize = 8 << 20;

/// The tag of a session key (FNV-1a, 64 bit).
pub fn session_tag(session: &str) -> u64 {
    session.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Which message a datagram belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MessageId {
    pub run: u32,
    pub block: u32,
    pub from: u32,
}

/// Bytes a message of `len` bytes occupies on a shaped Ethernet link as datagrams.
pub fn wire_bytes(len: usize) -> usize {
    let chunks = len.div_ceil(CHUNK_DATA).max(1);
    len + chunks * (HEADER + DATAGRAM_OVERHEAD)
}

/// The datagrams of message `id` with tag `tag`.
pub fn datagrams(tag: u64, id: MessageId, bytes: &[u8]) -> std::io::Result<Vec<Vec<u8>>> {
    let chunks = bytes.len().div_ceil(CHUNK_DATA).max(1);
    if chunks > MAX_CHUNKS {
        return Err(std::io::Error::other(format!(
            "a message of {} bytes needs {chunks} datagrams (at most {MAX_CHUNKS})",
            bytes.len()
        )));
    }
    Ok((0..chunks)
        .map(|c| {
            let data = &bytes[c * CHUNK_DATA..((c + 1) * CHUNK_DATA).min(bytes.len())];
            let mut d = Vec::with_capacity(HEADER + data.len());
            d.extend_from_slice(&tag.to_le_bytes());
            for v in [id.run, id.block, id.from] {
                d.extend_from_slice(&v.to_le_bytes());
            }
            d.extend_from_slice(&(c as u16).to_le_bytes());
            d.extend_from_slice(&(chunks as u16).to_le_bytes());
            d.extend_from_slice(data);
            d
        })
        .collect())
}

/// What the receiver made of one datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The last missing datagram of a message: the message.
    Complete(MessageId, Vec<u8>),
    /// Part of a message still incomplete.
    Partial,
    /// Not for this run (another tag), a copy of one already taken, or malformed: ignored.
    Ignored(&'static str),
}

/// Puts messages back together from their datagrams, in any order; each message once.
#[derive(Default)]
pub struct Reassembler {
    tag: u64,
    partial: HashMap<MessageId, Vec<Option<Vec<u8>>>>,
    done: HashSet<MessageId>,
}

impl Reassembler {
    pub fn new(tag: u64) -> Self {
        Reassembler {
            tag,
            ..Default::default()
        }
    }

    pub fn push(&mut self, d: &[u8]) -> Arrival {
        if d.len() < HEADER {
            return Arrival::Ignored("shorter than a header");
        }
        let u32_at = |i: usize| u32::from_le_bytes(d[i..i + 4].try_into().expect("4"));
        let u16_at = |i: usize| u16::from_le_bytes(d[i..i + 2].try_into().expect("2")) as usize;
        if u64::from_le_bytes(d[..8].try_into().expect("8")) != self.tag {
            return Arrival::Ignored("another session");
        }
        let id = MessageId {
            run: u32_at(8),
            block: u32_at(12),
            from: u32_at(16),
        };
        let (chunk, chunks) = (u16_at(20), u16_at(22));
        if chunks == 0 || chunks > MAX_CHUNKS || chunk >= chunks || d.len() - HEADER > CHUNK_DATA {
            return Arrival::Ignored("malformed");
        }
        if self.done.contains(&id) {
            return Arrival::Ignored("a copy");
        }
        if !self.partial.contains_key(&id) && self.partial.len() >= MAX_PARTIAL {
            self.forget_oldest_run();
        }
        let parts = self.partial.entry(id).or_insert_with(|| vec![None; chunks]);
        if parts.len() != chunks || parts[chunk].is_some() {
            return Arrival::Ignored("a copy or an inconsistent chunk count");
        }
        parts[chunk] = Some(d[HEADER..].to_vec());
        if parts.iter().any(Option::is_none) {
            return Arrival::Partial;
        }
        let parts = self.partial.remove(&id).expect("present");
        self.done.insert(id);
        Arrival::Complete(id, parts.into_iter().flatten().flatten().collect())
    }

    /// Drops what is kept of runs before `run` (their messages can no longer be used).
    pub fn forget_before(&mut self, run: u32) {
        self.partial.retain(|id, _| id.run >= run);
        self.done.retain(|id| id.run >= run);
    }

    fn forget_oldest_run(&mut self) {
        if let Some(oldest) = self.partial.keys().map(|id| id.run).min() {
            self.partial.retain(|id, _| id.run != oldest);
        }
    }
}

/// A socket that receives the group's datagrams on the interface with address `iface` (several
/// processes on one host may join the same group and port).
pub fn join(group: SocketAddrV4, iface: Ipv4Addr) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = s.set_recv_buffer_size(RECV_BUFFER);
    // Bound to the group's address, the socket sees only the group's datagrams.
    s.bind(&std::net::SocketAddr::V4(group).into())?;
    s.join_multicast_v4(group.ip(), &iface)?;
    Ok(s.into())
}

/// A socket that sends to the group through the interface with address `iface`, looping its
/// datagrams back to this host's members (peers on the same host, e.g. loopback runs), one hop.
pub fn sender(iface: Ipv4Addr) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_multicast_if_v4(&iface)?;
    s.set_multicast_loop_v4(true)?;
    s.set_multicast_ttl_v4(1)?;
    let _ = s.set_send_buffer_size(RECV_BUFFER);
    s.bind(&std::net::SocketAddr::V4(SocketAddrV4::new(iface, 0)).into())?;
    Ok(s.into())
}

/// Parses `GROUP:PORT` (an IPv4 multicast address).
pub fn parse_group(s: &str) -> Result<SocketAddrV4, String> {
    let a: SocketAddrV4 = s
        .parse()
        .map_err(|_| format!("{s}: expected a multicast GROUP:PORT such as 239.255.0.1:47100"))?;
    if !a.ip().is_multicast() || a.port() == 0 {
        return Err(format!(
            "{s}: {} is not an IPv4 multicast address (224.0.0.0/4) with a port",
            a.ip()
        ));
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(run: u32, block: u32, from: u32) -> MessageId {
        MessageId { run, block, from }
    }

    #[test]
    fn messages_come_back_whole_in_any_order_once() {
        let tag = session_tag("key");
        let msg: Vec<u8> = (0..3 * CHUNK_DATA + 17).map(|i| (i % 251) as u8).collect();
        let mut ds = datagrams(tag, id(2, 5, 1), &msg).unwrap();
        assert_eq!(ds.len(), 4);
        assert!(ds.iter().all(|d| d.len() + 28 <= 1500));
        assert_eq!(
            wire_bytes(msg.len()),
            msg.len() + 4 * (HEADER + DATAGRAM_OVERHEAD)
        );
        ds.reverse();
        let mut r = Reassembler::new(tag);
        for d in &ds[..3] {
            assert_eq!(r.push(d), Arrival::Partial);
        }
        assert_eq!(r.push(&ds[3]), Arrival::Complete(id(2, 5, 1), msg.clone()));
        // A duplicated datagram after the message was taken is ignored.
        assert!(matches!(r.push(&ds[0]), Arrival::Ignored(_)));
        // An empty message is one datagram.
        let e = datagrams(tag, id(2, 6, 1), &[]).unwrap();
        assert_eq!(r.push(&e[0]), Arrival::Complete(id(2, 6, 1), vec![]));
    }

    #[test]
    fn a_lost_datagram_loses_its_message_only_and_strangers_are_ignored() {
        let tag = session_tag("key");
        let a = datagrams(tag, id(0, 0, 0), &[7u8; 3000]).unwrap();
        let b = datagrams(tag, id(0, 0, 2), &[9u8; 100]).unwrap();
        let mut r = Reassembler::new(tag);
        assert_eq!(r.push(&a[0]), Arrival::Partial); // a[1] and a[2] never come
        assert_eq!(
            r.push(&b[0]),
            Arrival::Complete(id(0, 0, 2), vec![9u8; 100])
        );
        let other = datagrams(session_tag("other"), id(0, 0, 1), &[1]).unwrap();
        assert_eq!(r.push(&other[0]), Arrival::Ignored("another session"));
        assert!(matches!(r.push(&a[0][..10]), Arrival::Ignored(_)));
        let mut bad = a[1].clone();
        bad[20..22].copy_from_slice(&9u16.to_le_bytes()); // chunk 9 of 3
        assert_eq!(r.push(&bad), Arrival::Ignored("malformed"));
        r.forget_before(1);
        assert!(r.partial.is_empty() && r.done.is_empty());
        assert!(datagrams(tag, id(0, 0, 0), &vec![0u8; (MAX_CHUNKS + 1) * CHUNK_DATA]).is_err());
    }

    #[test]
    fn groups_are_checked() {
        assert!(parse_group("239.255.0.1:47100").is_ok());
        assert!(parse_group("10.0.0.1:47100")
            .unwrap_err()
            .contains("multicast"));
        assert!(parse_group("239.255.0.1:0").is_err());
        assert!(parse_group("nonsense").is_err());
    }

    /// Real sockets on this host's loopback: two members of a group both get one send.
    #[test]
    fn one_send_reaches_every_member_on_loopback() {
        let port = 40000 + (std::process::id() % 20000) as u16;
        let group = SocketAddrV4::new(Ipv4Addr::new(239, 255, 91, 7), port);
        let lo = Ipv4Addr::LOCALHOST;
        let members: Vec<UdpSocket> = (0..2).map(|_| join(group, lo).unwrap()).collect();
        let tx = sender(lo).unwrap();
        let ds = datagrams(5, id(0, 0, 3), &[42u8; 2000]).unwrap();
        for d in &ds {
            tx.send_to(d, group).unwrap();
        }
        for m in &members {
            m.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let mut r = Reassembler::new(5);
            let mut buf = [0u8; 2048];
            let mut got = None;
            for _ in 0..ds.len() {
                let n = m.recv(&mut buf).unwrap();
                if let Arrival::Complete(_, msg) = r.push(&buf[..n]) {
                    got = Some(msg);
                }
            }
            assert_eq!(got, Some(vec![42u8; 2000]));
        }
    }
}
