//! A user-space uplink shaper: what `tc tbf` (and netem's delay) do in the kernel, done by the
//! sending process, so shaped runs need no root and no netem. One [`Uplink`] per device, shared by
//! all its sender threads (one uplink, whatever the number of peers). Rate limiting is the
//! generic cell rate algorithm (a token bucket): the link sends at `rate` with a burst of
//! `burst` bytes — netem.sh's tbf burst — and each message then takes `delay` more to arrive.
//!
//! What it does not model: loss (dropping a TCP message would only stall its receiver; the
//! multicast transport drops whole index messages itself), and queueing of one peer's messages behind
//! its own delay (a sender thread sleeps until its message is due, so a second message to the
//! same peer waits for the first's delay; ASTRA sends one message per peer per block).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// netem.sh's default tbf burst (bytes): two full-size Ethernet frames.
pub const DEFAULT_BURST_BYTES: f64 = 3028.0;

/// What the kernel's shaper counts besides the payload: per TCP segment of at most
/// [`SEGMENT_PAYLOAD`] bytes, its Ethernet (14), IPv4 (20) and TCP-with-timestamps (32) headers.
pub const SEGMENT_OVERHEAD: usize = 66;
pub const SEGMENT_PAYLOAD: usize = 1448;

/// Bytes a message of `payload` bytes occupies on a shaped Ethernet link.
pub fn wire_bytes(payload: usize) -> usize {
    payload + payload.div_ceil(SEGMENT_PAYLOAD) * SEGMENT_OVERHEAD
}

/// One device's shaped uplink.
#[derive(Debug)]
pub struct Uplink {
    bytes_per_s: f64,
    burst: Duration,
    delay: Duration,
    /// The theoretical time at which everything reserved so far has left at `rate`.
    tat: Mutex<Option<Instant>>,
}

impl Uplink {
    /// An uplink of `mbps` Mbit/s (2^20 bit, as astra-sim and netem.sh count) with a one-way
    /// `delay_ms`.
    pub fn new(mbps: f64, delay_ms: f64) -> Self {
        let bytes_per_s = mbps * crate::network::MBIT / 8.0;
        Uplink {
            bytes_per_s,
            burst: Duration::from_secs_f64(DEFAULT_BURST_BYTES / bytes_per_s),
            delay: Duration::from_secs_f64(delay_ms.max(0.0) / 1e3),
            tat: Mutex::new(None),
        }
    }

    /// Reserves the uplink for a message of `bytes` sent at `now`; returns when it arrives at the
    /// peer (its last byte has left at the link's rate, after the bucket's burst, plus the delay).
    pub fn reserve_at(&self, bytes: usize, now: Instant) -> Instant {
        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let start = tat.map_or(now, |t| t.max(now));
        let end = start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_s);
        *tat = Some(end);
        // The bucket lets `burst` worth of bytes leave ahead of the theoretical schedule.
        end.checked_sub(self.burst).map_or(now, |t| t.max(now)) + self.delay
    }

    /// [`Uplink::reserve_at`] now for a message of `payload` bytes (with its headers, as the
    /// kernel's shaper would count them), then sleeps until the message is due at the peer.
    /// Returns how long the bucket held it (the link's time, not its delay).
    pub fn transmit(&self, payload: usize) -> Duration {
        self.transmit_wire(wire_bytes(payload))
    }

    /// [`Uplink::transmit`] for `bytes` counted as they go on the wire (headers included, e.g.
    /// a message's datagrams).
    pub fn transmit_wire(&self, bytes: usize) -> Duration {
        let asked = Instant::now();
        let due = self.reserve_at(bytes, asked);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        due.saturating_duration_since(asked + self.delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_leave_at_the_rate_after_the_burst_then_arrive_after_the_delay() {
        // 1 Mbit/s = 131,072 bytes/s.
        let up = Uplink::new(1.0, 20.0);
        let t0 = Instant::now();
        let secs = |t: Instant| (t - t0).as_secs_f64();
        // A message within the burst leaves at once: it arrives after the delay only.
        let a = up.reserve_at(1000, t0);
        assert!((secs(a) - 0.020).abs() < 1e-6, "{}", secs(a));
        // 131,072 bytes more: one second of link time, less the burst's head start.
        let b = up.reserve_at(131_072, t0);
        let want = (1000.0 + 131_072.0 - DEFAULT_BURST_BYTES) / 131_072.0 + 0.020;
        assert!((secs(b) - want).abs() < 1e-6, "{} vs {want}", secs(b));
        // Messages from several threads share the one uplink: the next one queues behind.
        let c = up.reserve_at(13_107, t0);
        assert!(secs(c) > secs(b) + 0.099, "{}", secs(c));
        // An idle link refills: much later, a small message leaves at once again.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(up.reserve_at(500, later), later + Duration::from_millis(20));
    }

    #[test]
    fn transmit_returns_the_buckets_hold_not_the_delay() {
        // 1 Mbit/s: a message within the burst is held for nothing (with a 5 ms delay it only
        // sleeps that); 13,107 bytes right after wait for what the burst does not cover.
        let up = Uplink::new(1.0, 5.0);
        assert!(up.transmit_wire(1000) < Duration::from_millis(1));
        let up = Uplink::new(1.0, 0.0);
        let _ = up.transmit_wire(1000);
        let held = up.transmit_wire(13_107).as_secs_f64();
        let want = (1000.0 + 13_107.0 - DEFAULT_BURST_BYTES) / 131_072.0;
        // Less by however long this thread was descheduled between the two sends.
        assert!(
            held <= want + 1e-4 && held > want - 0.04,
            "{held} vs {want}"
        );
    }

    #[test]
    fn headers_are_counted_per_segment() {
        assert_eq!(wire_bytes(0), 0);
        assert_eq!(wire_bytes(100), 166);
        assert_eq!(wire_bytes(1448), 1514);
        assert_eq!(wire_bytes(1449), 1449 + 132);
    }
}
