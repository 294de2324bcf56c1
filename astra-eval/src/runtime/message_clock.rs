//! When each block message left its sender's uplink and when its receiver had it, on the host's
//! monotonic clock (one clock for every process of a host): what a message costs beyond the
//! link — the hand-over to the sender's thread, the network stacks, the receiver's thread
//! waking. The measured trace gives it to astra-sim as each receiver's per-message latency
//! (`Comm::latency_ms`), which it uses instead of one α for all. Workers on other hosts have
//! other clocks, and a kernel shaper holds messages where no worker sees it: those runs
//! measure no latency.
//!
//! Both ends record into a flat `blocks × devices` table per run (NaN where nothing was
//! recorded): the sender by receiver rank, the receiver by sender rank. The receiver also
//! records how long it took to handle each message (check the frame, unpack the indices): work
//! of its own, which starts once the message is in and the device waits for it, and which the
//! trace replays as a compute op after that message.

use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Milliseconds on the host's monotonic clock (CLOCK_MONOTONIC: the same in every process).
pub fn now_ms() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as f64 * 1e3 + t.tv_nsec as f64 / 1e6
}

/// A sender thread's record of one message: when it left the shaped uplink (see
/// [`SenderClock::left`]).
pub struct Sent {
    pub run: u32,
    pub block: u32,
    /// The receiver (TCP), or None: every sink of the device (one multicast message).
    pub to: Option<u32>,
    pub left_ms: f64,
}

/// A sender thread's account of its own queue.
pub struct SenderClock {
    /// When the thread finished putting its previous message on the wire.
    free_at: f64,
}

impl Default for SenderClock {
    fn default() -> Self {
        SenderClock {
            free_at: f64::NEG_INFINITY,
        }
    }
}

impl SenderClock {
    /// When a message the device queued at `ready_ms`, which the thread took at `taken_ms` and
    /// the uplink's bucket then held for `held`, left the uplink. The bucket's hold is the
    /// link's time, which the simulator models, and so is a wait behind the thread's previous
    /// message (the link was busy); a thread that was idle took the message at once, so the
    /// hand-over to it counts from when the device queued it (it is latency).
    pub fn left(&self, ready_ms: f64, taken_ms: f64, held: Duration) -> f64 {
        let from = if self.free_at > ready_ms {
            taken_ms
        } else {
            ready_ms
        };
        from + held.as_secs_f64() * 1e3
    }

    /// The message is on the wire; the thread is free.
    pub fn finished(&mut self) {
        self.free_at = now_ms();
    }
}

/// One worker's records of a run.
pub struct MessageClock {
    devices: usize,
    /// The ranks this device sends to (a multicast message's record fills all of them).
    sinks: Vec<u32>,
    stamps: mpsc::Receiver<Sent>,
    run: u32,
    /// [block × devices]: when the message to that rank left (NaN: not yet).
    pub sent_at: Vec<f64>,
    /// [block × devices]: when the message from that rank was in this worker's hands.
    pub received_at: Vec<f64>,
    /// [block × devices]: ms this worker spent handling the message from that rank.
    pub handled_ms: Vec<f64>,
    waiting_since: f64,
}

impl MessageClock {
    pub fn new(
        blocks: usize,
        devices: usize,
        sinks: Vec<u32>,
        stamps: mpsc::Receiver<Sent>,
    ) -> Self {
        MessageClock {
            devices,
            sinks,
            stamps,
            run: 0,
            sent_at: vec![f64::NAN; blocks * devices],
            received_at: vec![f64::NAN; blocks * devices],
            handled_ms: vec![f64::NAN; blocks * devices],
            waiting_since: f64::INFINITY,
        }
    }

    /// A new run: nothing recorded.
    pub fn start(&mut self, run: u32) {
        self.run = run;
        self.sent_at.fill(f64::NAN);
        self.received_at.fill(f64::NAN);
        self.handled_ms.fill(f64::NAN);
    }

    /// The device starts waiting for a block's sources.
    pub fn waiting(&mut self) {
        self.waiting_since = now_ms();
    }

    /// Block `block`'s message from `from`, which a reader thread had at `arrived_ms`, was
    /// taken at `taken_ms` and handled in `handled`. If it came while the device waited, the
    /// device had it when it woke for it (`taken_ms`); if it came before, when it arrived.
    pub fn received(
        &mut self,
        block: u32,
        from: u32,
        arrived_ms: f64,
        taken_ms: f64,
        handled: Duration,
    ) {
        let at = if arrived_ms >= self.waiting_since {
            taken_ms
        } else {
            arrived_ms
        };
        if let Some(slot) = self.slot(block, from) {
            self.received_at[slot] = at;
            self.handled_ms[slot] = handled.as_secs_f64() * 1e3;
        }
    }

    /// Takes the sender threads' records of this run, waiting until every message of it has
    /// left (the device may finish before its last sends do) or until `deadline`; what is not
    /// in by then stays NaN.
    pub fn collect_sends(&mut self, deadline: Instant) {
        let blocks = self.sent_at.len() / self.devices.max(1);
        let expected = blocks * self.sinks.len();
        let mut filled = 0;
        while filled < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(s) = self.stamps.recv_timeout(left) else {
                return;
            };
            if s.run != self.run {
                continue;
            }
            let to: Vec<u32> = s.to.map_or_else(|| self.sinks.clone(), |r| vec![r]);
            for r in to {
                match self.slot(s.block, r) {
                    Some(i) if self.sent_at[i].is_nan() => {
                        self.sent_at[i] = s.left_ms;
                        filled += 1;
                    }
                    _ => {}
                }
            }
        }
    }

    fn slot(&self, block: u32, rank: u32) -> Option<usize> {
        let i = block as usize * self.devices + rank as usize;
        (rank < self.devices as u32 && i < self.sent_at.len()).then_some(i)
    }
}

/// Per receiver, [block × devices]: how long each message took from leaving its sender's
/// uplink to being in the receiver's hands (NaN where either end recorded nothing); from the
/// workers' `sent_at` and `received_at` tables (same host, same clock).
pub fn latencies(sent_at: &[Vec<f64>], received_at: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let n = sent_at.len();
    received_at
        .iter()
        .enumerate()
        .map(|(d, got)| {
            got.iter()
                .enumerate()
                .map(|(i, &at)| {
                    let (block, from) = (i / n, i % n);
                    let left = sent_at
                        .get(from)
                        .and_then(|s| s.get(block * n + d))
                        .copied()
                        .unwrap_or(f64::NAN);
                    // A clock read on another core may be a hair behind: never below zero
                    // (`max` would turn a missing record's NaN into 0).
                    let ms = at - left;
                    if ms.is_nan() {
                        ms
                    } else {
                        ms.max(0.0)
                    }
                })
                .collect()
        })
        .collect()
}

/// The median of a worker's measured latencies (None: it measured none).
pub fn median(latencies: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = latencies
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_is_monotonic_and_in_milliseconds() {
        let a = now_ms();
        std::thread::sleep(Duration::from_millis(20));
        let b = now_ms();
        assert!(b - a >= 19.0 && b - a < 2_000.0, "{a} -> {b}");
    }

    #[test]
    fn a_wait_behind_the_previous_message_is_link_time_a_hand_over_is_latency() {
        let ms = Duration::from_millis;
        let mut c = SenderClock::default();
        // Idle: queued at 10, taken at 10.2, held 2 ms by the bucket: left at 12.
        assert_eq!(c.left(10.0, 10.2, ms(2)), 12.0);
        // Queued while the thread still sent its previous message (a second before it was
        // done): from when it took it.
        c.finished();
        let busy_since = now_ms();
        assert_eq!(
            c.left(busy_since - 1000.0, busy_since + 3.0, ms(2)),
            busy_since + 5.0
        );
        // Queued after the thread was done: idle again.
        assert_eq!(
            c.left(busy_since + 1.0, busy_since + 1.5, ms(0)),
            busy_since + 1.0
        );
    }

    #[test]
    fn a_multicast_record_fills_every_sink_and_other_runs_are_ignored() {
        let (tx, rx) = mpsc::channel();
        // 2 blocks, 3 devices; device 0 sends to 1 and 2.
        let mut c = MessageClock::new(2, 3, vec![1, 2], rx);
        c.start(5);
        let sent = |run, block, to, left_ms| Sent {
            run,
            block,
            to,
            left_ms,
        };
        tx.send(sent(4, 0, None, 1.0)).unwrap();
        tx.send(sent(5, 0, None, 12.0)).unwrap();
        tx.send(sent(5, 1, Some(2), 20.0)).unwrap();
        tx.send(sent(5, 1, Some(1), 21.0)).unwrap();
        c.collect_sends(Instant::now() + Duration::from_secs(5));
        let nan = |x: f64| x.is_nan();
        assert!(nan(c.sent_at[0]));
        assert_eq!(&c.sent_at[1..3], &[12.0, 12.0]);
        assert!(nan(c.sent_at[3]));
        assert_eq!(&c.sent_at[4..6], &[21.0, 20.0]);
        // A missing record does not hang the worker past its deadline.
        c.start(6);
        let t = Instant::now();
        c.collect_sends(t + Duration::from_millis(30));
        assert!(c.sent_at.iter().all(|x| x.is_nan()));
    }

    #[test]
    fn a_message_that_came_while_the_device_computed_counts_from_its_arrival() {
        let (_tx, rx) = mpsc::channel();
        let mut c = MessageClock::new(1, 2, vec![1], rx);
        c.start(0);
        let before = now_ms() - 5.0;
        let handled = Duration::from_micros(250);
        c.waiting();
        c.received(0, 1, before, before + 9.0, handled);
        assert_eq!((c.received_at[1], c.handled_ms[1]), (before, 0.25));
        // One that came while it waited: when it was taken.
        let during = now_ms();
        c.received(0, 1, during, during + 0.5, handled);
        assert_eq!(c.received_at[1], during + 0.5);
        // Out-of-range ranks are not recorded.
        c.received(0, 7, during, during, handled);
        c.start(1);
        assert!(c.handled_ms.iter().all(|x| x.is_nan()));
    }

    #[test]
    fn latencies_pair_each_receipt_with_its_send() {
        // 1 block, 2 devices: 0 sent to 1 at 10 ms, 1 sent to 0 at 11 ms.
        let sent = vec![vec![f64::NAN, 10.0], vec![11.0, f64::NAN]];
        let got = vec![vec![f64::NAN, 11.5], vec![10.25, f64::NAN]];
        let l = latencies(&sent, &got);
        assert!(l[0][0].is_nan() && l[1][1].is_nan());
        assert_eq!((l[0][1], l[1][0]), (0.5, 0.25));
        assert_eq!(median(&l[0]), Some(0.5));
        assert_eq!(median(&[f64::NAN]), None);
    }
}
