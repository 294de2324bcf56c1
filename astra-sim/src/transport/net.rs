//! Sockets and channels of the runtime: dialling and accepting with deadlines, and the control
//! link between the coordinator and a worker (TCP for remote workers, the child's stdin/stdout
//! for local ones, which also crosses network namespaces), read by a thread so every wait can
//! have a deadline.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What can go wrong on the transport; each renders as one line naming the peer or step.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Refused(String),
}

pub type Result<T, E = TransportError> = std::result::Result<T, E>;

macro_rules! refuse {
    ($($t:tt)*) => {
        return Err(TransportError::Refused(format!($($t)*)))
    };
}

use super::frame::{protocol_mismatch, Frame, FrameError, PROTOCOL};

pub fn configure(s: &TcpStream, timeout: Duration) -> Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(())
}

/// Accepts one connection before `deadline`.
pub fn accept_by(l: &TcpListener, deadline: Instant, what: &str) -> Result<TcpStream> {
    l.set_nonblocking(true)?;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    refuse!("timed out waiting for {what}");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Dials `addr` until it answers or `deadline` passes.
pub fn connect_by(addr: &str, deadline: Instant, what: &str) -> Result<TcpStream> {
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => refuse!("{what} at {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// The environment variable that carries the session key to workers (never the command line,
/// which every user of the host can read in `ps`).
pub const SESSION_ENV: &str = "ASTRA_SESSION";

/// A random per-run session key (128 bits, hex).
pub fn session_key() -> String {
    use rand::Rng;
    let mut r = rand::rng();
    (0..16)
        .map(|_| format!("{:02x}", r.random::<u8>()))
        .collect()
}

/// Whether a presented session key is the run's, in time independent of where they differ (a
/// timing side channel would let a peer guess the key byte by byte). An empty key never matches.
pub fn same_key(presented: &str, key: &str) -> bool {
    let (a, b) = (presented.as_bytes(), key.as_bytes());
    if a.is_empty() || a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub type Tagged = (usize, std::result::Result<Frame, FrameError>);

/// Reads frames from `read` on a thread of its own and passes them, tagged, to `tx`; stops after
/// the first error (passed on too), e.g. the end of the stream.
pub fn read_frames(read: impl Read + Send + 'static, tag: usize, tx: mpsc::Sender<Tagged>) {
    read_frames_as(read, tag, tx, |t| t);
}

/// [`read_frames`] into a channel of `T`, each tagged frame wrapped by `wrap`.
pub fn read_frames_as<T: Send + 'static>(
    mut read: impl Read + Send + 'static,
    tag: usize,
    tx: mpsc::Sender<T>,
    wrap: fn(Tagged) -> T,
) {
    std::thread::spawn(move || loop {
        let f = Frame::read_from(&mut read);
        let stop = f.is_err();
        if tx.send(wrap((tag, f))).is_err() || stop {
            return;
        }
    });
}

/// A worker's link to the coordinator: frames out through `tx`, frames in through a reader
/// thread.
pub struct Control {
    tx: Box<dyn Write + Send>,
    rx: mpsc::Receiver<Tagged>,
}

impl Control {
    pub fn new(read: impl Read + Send + 'static, write: impl Write + Send + 'static) -> Self {
        let (t, rx) = mpsc::channel();
        read_frames(read, 0, t);
        Control {
            tx: Box::new(write),
            rx,
        }
    }

    pub fn send(&mut self, f: &Frame) -> std::result::Result<(), FrameError> {
        f.write_to(&mut self.tx)
    }

    /// The next frame, waiting at most `wait` (None: until the other end closes).
    pub fn recv(&self, wait: Option<Duration>) -> Result<Frame, RecvError> {
        match wait {
            Some(w) => match self.rx.recv_timeout(w) {
                Ok((_, f)) => f.map_err(RecvError::Frame),
                Err(mpsc::RecvTimeoutError::Timeout) => Err(RecvError::Timeout),
                Err(mpsc::RecvTimeoutError::Disconnected) => Err(RecvError::Closed),
            },
            None => match self.rx.recv() {
                Ok((_, f)) => f.map_err(RecvError::Frame),
                Err(_) => Err(RecvError::Closed),
            },
        }
    }
}

#[derive(Debug)]
pub enum RecvError {
    Timeout,
    Closed,
    Frame(FrameError),
}

impl std::fmt::Display for RecvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecvError::Timeout => write!(f, "nothing arrived in time"),
            RecvError::Closed => write!(f, "the connection closed"),
            RecvError::Frame(FrameError::Io(e))
                if e.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                write!(f, "the connection closed")
            }
            RecvError::Frame(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for RecvError {}

/// One process of a full mesh: its rank, every rank's listening address, the run's session key,
/// and the read/write deadline of its sockets.
pub struct MeshMember<'a> {
    pub rank: u32,
    pub peers: &'a [String],
    pub session: &'a str,
    pub timeout: Duration,
}

/// Connects `me` to every other rank by `deadline`: lower ranks are dialled, higher ranks
/// accepted on `listener`. Every connection opens with a hello carrying the session key and the
/// dialler's rank; only a small hello is read before the key is checked, and a wrong key, an
/// unexpected or repeated rank is refused.
pub fn mesh(
    listener: &TcpListener,
    me: &MeshMember,
    deadline: Instant,
) -> Result<HashMap<u32, TcpStream>> {
    let devices = me.peers.len() as u32;
    let mut streams = HashMap::new();
    for j in 0..me.rank {
        let mut s = connect_by(&me.peers[j as usize], deadline, &format!("peer {j}"))?;
        configure(&s, me.timeout)?;
        Frame::Hello {
            session: me.session.into(),
            rank: me.rank,
            protocol: PROTOCOL,
        }
        .write_to(&mut s)?;
        streams.insert(j, s);
    }
    for _ in me.rank + 1..devices {
        let mut s = accept_by(listener, deadline, "a peer")?;
        configure(&s, me.timeout)?;
        match Frame::read_hello(&mut s)? {
            Frame::Hello {
                session: k,
                rank,
                protocol,
            } if same_key(&k, me.session) => {
                if rank <= me.rank || rank >= devices || streams.contains_key(&rank) {
                    refuse!("a peer announced rank {rank}, which is not expected here");
                }
                if protocol != PROTOCOL {
                    refuse!("{}", protocol_mismatch(&format!("peer {rank}"), protocol));
                }
                streams.insert(rank, s);
            }
            Frame::Hello { .. } => refuse!("a peer presented a wrong session key; refused"),
            other => refuse!("expected a peer's hello, got {}", other.name()),
        }
    }
    Ok(streams)
}
