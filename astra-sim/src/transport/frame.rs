//! The wire format between the coordinator and workers and among workers: length-prefixed frames
//! `[magic u32][kind u8][payload length u32][payload]`, little-endian. Every field is checked on
//! read (magic, kind, a length cap, payload sizes), so a malformed or hostile frame is an error,
//! never a panic or an unbounded allocation.

use std::io::{Read, Write};

const MAGIC: u32 = 0x4153_5452; // "ASTR"

/// The frames' layout, sent in every hello: bump it whenever a frame's fields change, so that
/// processes of different builds are refused by name at the hello rather than failing on the
/// first frame they cannot read. 1: builds before the hello carried it (their hello ends after
/// the rank); 2: results carry each block's remote keys.
pub const PROTOCOL: u32 = 2;

/// Why a hello from `who` speaking `protocol` is refused (this build speaks [`PROTOCOL`]).
pub fn protocol_mismatch(who: &str, protocol: u32) -> String {
    format!(
        "{who} speaks wire protocol {protocol}, this build {PROTOCOL}: run one build of astra-eval on every machine"
    )
}

/// Largest payload accepted (index frames are a few kB; results a few MB).
pub const MAX_PAYLOAD: usize = 256 << 20;
/// Largest hello (session key and rank) read from a connection not yet authenticated.
pub const MAX_HELLO: usize = 1024;

fn read_head(r: &mut impl Read) -> Result<[u8; 9], FrameError> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head)?;
    let magic = u32::from_le_bytes(head[0..4].try_into().expect("4"));
    if magic != MAGIC {
        return Err(bad(format!("magic 0x{magic:08x} is not ASTRA's")));
    }
    Ok(head)
}

#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// First frame on every connection: the run's session key, the sender's rank (u32::MAX: the
    /// coordinator), and the frame layout it speaks ([`PROTOCOL`]).
    Hello {
        session: String,
        rank: u32,
        protocol: u32,
    },
    /// Coordinator → worker: the work, as JSON.
    Plan(String),
    /// Worker → worker: a block's bit-packed VQ indices of the sender's tokens.
    Indices {
        block: u32,
        from: u32,
        tokens: u32,
        groups: u32,
        bits: u8,
        packed: Vec<u8>,
    },
    /// Worker → coordinator: a float32 tensor (the CLS states), per-block timings (ms), the
    /// bytes of the frames this worker put on the wire and took off it in the run, how many of
    /// its sources' messages it took as lost (a lossy transport; the tokens were masked out),
    /// and how many of those arrived whole after all (too late: the grace period was short).
    Result {
        from: u32,
        shape: Vec<i64>,
        data: Vec<f32>,
        timings: Vec<f64>,
        sent_bytes: u64,
        received_bytes: u64,
        lost: u32,
        late: u32,
        /// [block × devices] on the host's monotonic clock (ms, NaN: none): when the worker's
        /// message to each rank left its uplink, and when each rank's message was in its hands.
        sent_at: Vec<f64>,
        received_at: Vec<f64>,
        /// [block × devices]: ms the worker spent handling each rank's message (NaN: none).
        handled_ms: Vec<f64>,
        /// Per block: how many remote keys the worker's queries attended to (its sources'
        /// tokens, or their distinct codewords).
        remote_keys: Vec<u32>,
    },
    /// Worker → coordinator: what went wrong.
    Error(String),
    /// Worker → worker (SP baseline): a block's full-precision token embeddings, fp32.
    Embeddings {
        block: u32,
        from: u32,
        tokens: u32,
        dim: u32,
        data: Vec<f32>,
    },
    /// Worker → coordinator: loaded, connected to every peer, tables built.
    Ready { rank: u32 },
    /// Coordinator → worker: run the forward once (run 0, 1, …).
    Go { run: u32 },
    /// Coordinator → worker: no more runs; exit.
    Done,
    /// Replay worker → worker: an opaque payload of the size a trace's communication op names,
    /// tagged by that op (astra-sim's live replay).
    Bytes { tag: u32, payload: Vec<u8> },
    /// Decoding worker → coordinator, after its Result: the tokens it generated after the
    /// prefill, [batch, new] row-major, and the milliseconds each decode step took.
    Decoded {
        from: u32,
        batch: u32,
        tokens: Vec<i64>,
        step_ms: Vec<f64>,
    },
    /// Worker → worker, multicast transport: block `block` of run `run`'s message from `from`
    /// went out on the group as `datagrams` datagrams, before this frame on the same uplink; a
    /// receiver still missing any of them after a grace period takes the message as lost.
    Announce {
        run: u32,
        block: u32,
        from: u32,
        datagrams: u32,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn bad(s: impl Into<String>) -> FrameError {
    FrameError::Malformed(s.into())
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], FrameError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| bad(format!("payload ends before byte {}", self.at + n)))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn i64(&mut self) -> Result<i64, FrameError> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    /// A u32 count, then that many f64s.
    fn f64s(&mut self) -> Result<Vec<f64>, FrameError> {
        let n = self.u32()? as usize;
        let raw = self.take(n.checked_mul(8).ok_or_else(|| bad("size overflow"))?)?;
        Ok(raw
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8")))
            .collect())
    }
    /// A u32 count, then that many u32s.
    fn u32s(&mut self) -> Result<Vec<u32>, FrameError> {
        let n = self.u32()? as usize;
        let raw = self.take(n.checked_mul(4).ok_or_else(|| bad("size overflow"))?)?;
        Ok(raw
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
            .collect())
    }
    fn bytes(&mut self) -> Result<Vec<u8>, FrameError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn done(&self) -> Result<(), FrameError> {
        if self.at != self.b.len() {
            return Err(bad(format!("{} trailing bytes", self.b.len() - self.at)));
        }
        Ok(())
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_u32s(out: &mut Vec<u8>, v: &[u32]) {
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

fn put_f64s(out: &mut Vec<u8>, v: &[f64]) {
    out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
}

impl Frame {
    /// The frame's kind, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Plan(_) => "plan",
            Frame::Indices { .. } => "indices",
            Frame::Result { .. } => "result",
            Frame::Error(_) => "error",
            Frame::Embeddings { .. } => "embeddings",
            Frame::Ready { .. } => "ready",
            Frame::Go { .. } => "go",
            Frame::Done => "done",
            Frame::Bytes { .. } => "bytes",
            Frame::Decoded { .. } => "decoded",
            Frame::Announce { .. } => "announce",
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Frame::Hello { .. } => 1,
            Frame::Plan(_) => 2,
            Frame::Indices { .. } => 3,
            Frame::Result { .. } => 4,
            Frame::Error(_) => 5,
            Frame::Embeddings { .. } => 6,
            Frame::Ready { .. } => 7,
            Frame::Go { .. } => 8,
            Frame::Done => 9,
            Frame::Bytes { .. } => 10,
            Frame::Decoded { .. } => 11,
            Frame::Announce { .. } => 12,
        }
    }

    fn payload(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Frame::Hello {
                session,
                rank,
                protocol,
            } => {
                put_bytes(&mut p, session.as_bytes());
                p.extend_from_slice(&rank.to_le_bytes());
                p.extend_from_slice(&protocol.to_le_bytes());
            }
            Frame::Plan(s) | Frame::Error(s) => put_bytes(&mut p, s.as_bytes()),
            Frame::Ready { rank: v } | Frame::Go { run: v } => {
                p.extend_from_slice(&v.to_le_bytes())
            }
            Frame::Done => {}
            Frame::Announce {
                run,
                block,
                from,
                datagrams,
            } => {
                for v in [run, block, from, datagrams] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
            }
            Frame::Bytes { tag, payload } => {
                p.extend_from_slice(&tag.to_le_bytes());
                put_bytes(&mut p, payload);
            }
            Frame::Decoded {
                from,
                batch,
                tokens,
                step_ms,
            } => {
                p.extend_from_slice(&from.to_le_bytes());
                p.extend_from_slice(&batch.to_le_bytes());
                p.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
                for t in tokens {
                    p.extend_from_slice(&t.to_le_bytes());
                }
                put_f64s(&mut p, step_ms);
            }
            Frame::Embeddings {
                block,
                from,
                tokens,
                dim,
                data,
            } => {
                for v in [block, from, tokens, dim] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
                p.extend_from_slice(&(data.len() as u32).to_le_bytes());
                for v in data {
                    p.extend_from_slice(&v.to_le_bytes());
                }
            }
            Frame::Indices {
                block,
                from,
                tokens,
                groups,
                bits,
                packed,
            } => {
                for v in [block, from, tokens, groups] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
                p.push(*bits);
                put_bytes(&mut p, packed);
            }
            Frame::Result {
                from,
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
            } => {
                p.extend_from_slice(&from.to_le_bytes());
                p.extend_from_slice(&(shape.len() as u32).to_le_bytes());
                for s in shape {
                    p.extend_from_slice(&s.to_le_bytes());
                }
                p.extend_from_slice(&(data.len() as u32).to_le_bytes());
                for v in data {
                    p.extend_from_slice(&v.to_le_bytes());
                }
                put_f64s(&mut p, timings);
                p.extend_from_slice(&sent_bytes.to_le_bytes());
                p.extend_from_slice(&received_bytes.to_le_bytes());
                p.extend_from_slice(&lost.to_le_bytes());
                p.extend_from_slice(&late.to_le_bytes());
                put_f64s(&mut p, sent_at);
                put_f64s(&mut p, received_at);
                put_f64s(&mut p, handled_ms);
                put_u32s(&mut p, remote_keys);
            }
        }
        p
    }

    /// Its size on the wire (header and payload).
    /// Counted from the fields for the data frames (the runtime counts every one it receives;
    /// encoding an SP block's embeddings again only to measure them would copy megabytes).
    pub fn wire_len(&self) -> usize {
        9 + match self {
            Frame::Indices { packed, .. } => 21 + packed.len(),
            Frame::Embeddings { data, .. } => 20 + 4 * data.len(),
            other => other.payload().len(),
        }
    }

    /// The frame as bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let p = self.payload();
        let mut out = Vec::with_capacity(9 + p.len());
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.push(self.kind());
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(&p);
        out
    }

    pub fn write_to(&self, w: &mut impl Write) -> Result<(), FrameError> {
        w.write_all(&self.to_bytes())?;
        w.flush()?;
        Ok(())
    }

    pub fn read_from(r: &mut impl Read) -> Result<Frame, FrameError> {
        let head = read_head(r)?;
        let len = u32::from_le_bytes(head[5..9].try_into().expect("4")) as usize;
        if len > MAX_PAYLOAD {
            return Err(bad(format!("payload of {len} bytes exceeds {MAX_PAYLOAD}")));
        }
        Self::read_body(r, head, len)
    }

    /// The first frame of a connection, before its sender is known: only a hello of at most
    /// [`MAX_HELLO`] bytes is read, so nothing large is allocated for an unauthenticated peer.
    pub fn read_hello(r: &mut impl Read) -> Result<Frame, FrameError> {
        let head = read_head(r)?;
        let len = u32::from_le_bytes(head[5..9].try_into().expect("4")) as usize;
        if head[4] != 1 || len > MAX_HELLO {
            return Err(bad(format!(
                "a connection opened with a frame of kind {} and {len} bytes, not a hello of at most {MAX_HELLO}",
                head[4]
            )));
        }
        Self::read_body(r, head, len)
    }

    fn read_body(r: &mut impl Read, head: [u8; 9], len: usize) -> Result<Frame, FrameError> {
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        let mut c = Cursor { b: &body, at: 0 };
        let text = |c: &mut Cursor| -> Result<String, FrameError> {
            String::from_utf8(c.bytes()?).map_err(|_| bad("text is not UTF-8"))
        };
        let f = match head[4] {
            1 => {
                let (session, rank) = (text(&mut c)?, c.u32()?);
                // A build before the protocol was sent ends its hello here.
                let protocol = if c.at == c.b.len() { 1 } else { c.u32()? };
                Frame::Hello {
                    session,
                    rank,
                    protocol,
                }
            }
            2 => Frame::Plan(text(&mut c)?),
            3 => Frame::Indices {
                block: c.u32()?,
                from: c.u32()?,
                tokens: c.u32()?,
                groups: c.u32()?,
                bits: c.u8()?,
                packed: c.bytes()?,
            },
            4 => {
                let from = c.u32()?;
                let dims = c.u32()? as usize;
                if dims > 8 {
                    return Err(bad(format!("{dims} dimensions")));
                }
                let shape = (0..dims).map(|_| c.i64()).collect::<Result<Vec<_>, _>>()?;
                let n = c.u32()? as usize;
                let raw = c.take(n.checked_mul(4).ok_or_else(|| bad("size overflow"))?)?;
                let data = raw
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4")))
                    .collect();
                let timings = c.f64s()?;
                let (sent_bytes, received_bytes) = (c.i64()? as u64, c.i64()? as u64);
                Frame::Result {
                    from,
                    shape,
                    data,
                    timings,
                    sent_bytes,
                    received_bytes,
                    lost: c.u32()?,
                    late: c.u32()?,
                    sent_at: c.f64s()?,
                    received_at: c.f64s()?,
                    handled_ms: c.f64s()?,
                    remote_keys: c.u32s()?,
                }
            }
            5 => Frame::Error(text(&mut c)?),
            6 => {
                let (block, from, tokens, dim) = (c.u32()?, c.u32()?, c.u32()?, c.u32()?);
                let n = c.u32()? as usize;
                let raw = c.take(n.checked_mul(4).ok_or_else(|| bad("size overflow"))?)?;
                Frame::Embeddings {
                    block,
                    from,
                    tokens,
                    dim,
                    data: raw
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().expect("4")))
                        .collect(),
                }
            }
            7 => Frame::Ready { rank: c.u32()? },
            8 => Frame::Go { run: c.u32()? },
            9 => Frame::Done,
            12 => Frame::Announce {
                run: c.u32()?,
                block: c.u32()?,
                from: c.u32()?,
                datagrams: c.u32()?,
            },
            10 => Frame::Bytes {
                tag: c.u32()?,
                payload: c.bytes()?,
            },
            11 => {
                let (from, batch) = (c.u32()?, c.u32()?);
                let n = c.u32()? as usize;
                let raw = c.take(n.checked_mul(8).ok_or_else(|| bad("size overflow"))?)?;
                let tokens = raw
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8")))
                    .collect();
                let step_ms = c.f64s()?;
                Frame::Decoded {
                    from,
                    batch,
                    tokens,
                    step_ms,
                }
            }
            k => return Err(bad(format!("kind {k} is unknown"))),
        };
        c.done()?;
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_frame_must_be_a_small_hello() {
        let hello = Frame::Hello {
            session: "k3y".into(),
            rank: 2,
            protocol: PROTOCOL,
        };
        let bytes = hello.to_bytes();
        assert_eq!(Frame::read_hello(&mut bytes.as_slice()).unwrap(), hello);
        // An older build's hello (no protocol after the rank) reads as protocol 1; the length
        // field (bytes 5..9) shrinks with it.
        let mut old = bytes[..bytes.len() - 4].to_vec();
        let len = u32::from_le_bytes(old[5..9].try_into().unwrap()) - 4;
        old[5..9].copy_from_slice(&len.to_le_bytes());
        assert_eq!(
            Frame::read_hello(&mut old.as_slice()).unwrap(),
            Frame::Hello {
                session: "k3y".into(),
                rank: 2,
                protocol: 1,
            }
        );
        let plan = Frame::Plan("x".repeat(10)).to_bytes();
        let e = Frame::read_hello(&mut plan.as_slice())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a hello"), "{e}");
        // A hello that claims a large payload is refused from its header alone.
        let mut big = bytes[..9].to_vec();
        big[5..9].copy_from_slice(&(MAX_HELLO as u32 + 1).to_le_bytes());
        assert!(Frame::read_hello(&mut big.as_slice()).is_err());
    }

    #[test]
    fn keys_compare_whole_and_never_empty() {
        use crate::transport::net::same_key;
        assert!(same_key("abc", "abc"));
        assert!(!same_key("abd", "abc"));
        assert!(!same_key("ab", "abc"));
        assert!(!same_key("", ""));
    }

    #[test]
    fn round_trip_and_rejects() {
        let frames = [
            Frame::Hello {
                session: "k3y".into(),
                rank: 2,
                protocol: 7,
            },
            Frame::Plan("{}".into()),
            Frame::Bytes {
                tag: 7,
                payload: vec![0xA5; 300],
            },
            Frame::Indices {
                block: 7,
                from: 1,
                tokens: 3,
                groups: 2,
                bits: 10,
                packed: vec![1, 2, 3, 4, 5, 6, 7, 8],
            },
            Frame::Result {
                from: 0,
                shape: vec![2, 1, 4],
                data: (0..8).map(|i| i as f32 * 0.5).collect(),
                timings: vec![1.5, 2.5],
                sent_bytes: 1 << 40,
                received_bytes: 12_345,
                lost: 3,
                late: 1,
                sent_at: vec![0.0, 1.25e9],
                received_at: vec![7.5],
                handled_ms: vec![0.125, 3.0],
                remote_keys: vec![768, 412, 0],
            },
            Frame::Error("boom".into()),
            Frame::Embeddings {
                block: 1,
                from: 2,
                tokens: 1,
                dim: 3,
                data: vec![0.5, -1.0, 2.0],
            },
            Frame::Ready { rank: 3 },
            Frame::Go { run: 9 },
            Frame::Done,
            Frame::Decoded {
                from: 2,
                batch: 2,
                tokens: vec![5, 50_000, 7, 1],
                step_ms: vec![3.25],
            },
            Frame::Announce {
                run: 4,
                block: 11,
                from: 6,
                datagrams: 15,
            },
        ];
        for f in &frames {
            let mut buf = Vec::new();
            f.write_to(&mut buf).unwrap();
            assert_eq!(&Frame::read_from(&mut buf.as_slice()).unwrap(), f);
            assert_eq!(f.wire_len(), buf.len(), "{}", f.name());
            // Any truncation is an error, never a panic.
            for cut in 0..buf.len() {
                assert!(Frame::read_from(&mut &buf[..cut]).is_err());
            }
        }
        let mut buf = Vec::new();
        frames[0].write_to(&mut buf).unwrap();
        buf[0] ^= 1;
        assert!(Frame::read_from(&mut buf.as_slice())
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let mut huge = MAGIC.to_le_bytes().to_vec();
        huge.push(3);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Frame::read_from(&mut huge.as_slice())
            .unwrap_err()
            .to_string()
            .contains("exceeds"));
    }
}
