//! [`LinkProbe`]: latency and bandwidth of a link, from ping/pong round trips. No I/O, no
//! clock: the caller passes times in microseconds from any fixed start.
//!
//! Both ends use it. An agent probes its way to the coordinator ([`crate::Ping`]) for its own
//! breaker and telemetry; the coordinator probes every node ([`crate::Probe`]) and ranks nodes
//! by what it measured, not by what they report.
//!
//! Small pings give the round-trip time (smoothed). Some pings carry [`LARGE_PADDING`] bytes;
//! the time a large round trip takes beyond the shortest small one is the time the padding
//! took to travel, which gives the bandwidth (smoothed). The shortest round trip, not the
//! smoothed one: an answering side can delay its answers but cannot make one shorter than its
//! link, so holding small pongs back cannot make the padding look faster. Until a pong has been
//! seen, both are `None`.

use heapless::Vec;

/// Padding of a bandwidth ping, in bytes.
pub const LARGE_PADDING: usize = 64 << 10;

/// Pings awaiting a pong beyond this many are forgotten, oldest first (the other end may be
/// gone).
const MAX_OUTSTANDING: usize = 16;

/// Round trips in flight and what they measured. See the module docs.
#[derive(Debug, Clone, Default)]
pub struct LinkProbe {
    /// Oldest first.
    outstanding: Vec<Outstanding, MAX_OUTSTANDING>,
    latency_us: Option<u64>,
    bandwidth_kbps: Option<u64>,
    best_latency_us: Option<u64>,
    best_bandwidth_kbps: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Outstanding {
    nonce: u64,
    sent_us: u64,
    padding: usize,
}

impl LinkProbe {
    /// Records a ping with `nonce` and `padding` bytes, sent at `now_us`. The caller picks
    /// nonces: they must differ between outstanding pings, and be unpredictable when the other
    /// end could gain from answering early.
    pub fn ping(&mut self, now_us: u64, nonce: u64, padding: usize) {
        if self.outstanding.is_full() {
            self.outstanding.remove(0);
        }
        let _ = self.outstanding.push(Outstanding {
            nonce,
            sent_us: now_us,
            padding,
        });
    }

    /// Records a pong received at `now_us`. Returns whether it answered an outstanding ping;
    /// an unknown nonce changes nothing.
    pub fn pong(&mut self, nonce: u64, now_us: u64) -> bool {
        let Some(o) = self.take(nonce) else {
            return false;
        };
        let rtt = now_us.saturating_sub(o.sent_us).max(1);
        if o.padding == 0 {
            self.latency_us = Some(smooth(self.latency_us, rtt));
            self.best_latency_us = Some(self.best_latency_us.map_or(rtt, |b| b.min(rtt)));
            return true;
        }
        // The padding's travel time is what the large round trip took beyond the shortest
        // small one. With no small round trip yet, the whole round trip is a conservative bound.
        let extra = rtt.saturating_sub(self.best_latency_us.unwrap_or(0)).max(1);
        let kbps = (o.padding as u64 * 8 * 1_000 / extra).max(1);
        self.bandwidth_kbps = Some(smooth(self.bandwidth_kbps, kbps));
        self.best_bandwidth_kbps = Some(self.best_bandwidth_kbps.map_or(kbps, |b| b.max(kbps)));
        true
    }

    /// Whether a ping with `nonce` awaits its pong: a cheap check before verifying one.
    pub fn is_outstanding(&self, nonce: u64) -> bool {
        self.outstanding.iter().any(|o| o.nonce == nonce)
    }

    fn take(&mut self, nonce: u64) -> Option<Outstanding> {
        let i = self.outstanding.iter().position(|o| o.nonce == nonce)?;
        Some(self.outstanding.remove(i))
    }

    /// Smoothed round-trip time, in microseconds.
    pub fn latency_us(&self) -> Option<u32> {
        self.latency_us.map(|v| v.min(u32::MAX as u64) as u32)
    }

    /// Smoothed bandwidth estimate, in kbit/s.
    pub fn bandwidth_kbps(&self) -> Option<u32> {
        self.bandwidth_kbps.map(|v| v.min(u32::MAX as u64) as u32)
    }

    /// The shortest round trip seen, in microseconds. Delays (a busy sender, a queue) only
    /// lengthen round trips, so this is the best evidence of how near the other end is: a claim
    /// of a shorter one is contradicted.
    pub fn best_latency_us(&self) -> Option<u32> {
        self.best_latency_us.map(|v| v.min(u32::MAX as u64) as u32)
    }

    /// The highest bandwidth one large ping showed, in kbit/s: the best evidence of the link.
    pub fn best_bandwidth_kbps(&self) -> Option<u32> {
        self.best_bandwidth_kbps
            .map(|v| v.min(u32::MAX as u64) as u32)
    }

    /// Pings awaiting a pong.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }
}

/// Exponential moving average with weight 1/4 for the new value.
fn smooth(previous: Option<u64>, new: u64) -> u64 {
    match previous {
        Some(p) => (p * 3 + new) / 4,
        None => new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_known_until_a_pong_arrives() {
        let mut p = LinkProbe::default();
        p.ping(1_000, 7, 0);
        assert_eq!(p.latency_us(), None);
        assert!(!p.pong(107, 2_000));
        assert_eq!(p.latency_us(), None);
        assert!(p.pong(7, 3_000));
        assert_eq!(p.latency_us(), Some(2_000));
        assert_eq!(p.bandwidth_kbps(), None);
        assert!(!p.pong(7, 4_000), "a pong counts once");
    }

    #[test]
    fn latency_is_smoothed() {
        let mut p = LinkProbe::default();
        p.ping(0, 1, 0);
        p.pong(1, 1_000);
        p.ping(10_000, 2, 0);
        p.pong(2, 15_000);
        assert_eq!(p.latency_us(), Some(2_000)); // (3·1000 + 5000) / 4
        assert_eq!(p.best_latency_us(), Some(1_000), "the shortest, unsmoothed");
    }

    #[test]
    fn bandwidth_comes_from_the_extra_time_of_a_large_ping() {
        let mut p = LinkProbe::default();
        p.ping(0, 1, 0);
        p.pong(1, 1_000);
        // 64 KiB took 5.243 ms more than a small round trip: 100 Mbit/s.
        p.ping(10_000, 2, LARGE_PADDING);
        p.pong(2, 10_000 + 1_000 + 5_243);
        let kbps = p.bandwidth_kbps().unwrap();
        assert!((99_900..=100_100).contains(&kbps), "{kbps}");
    }

    #[test]
    fn holding_small_pongs_back_does_not_make_the_padding_look_faster() {
        let mut p = LinkProbe::default();
        // 20 ms away; 64 KiB take 52 ms more (10 Mbit/s).
        p.ping(0, 1, 0);
        p.pong(1, 20_000);
        // The other end now answers small pings 200 ms late, large ones at once.
        for i in 0..8 {
            p.ping(1_000_000 * i, 10 + i, 0);
            p.pong(10 + i, 1_000_000 * i + 220_000);
        }
        assert!(p.latency_us().unwrap() > 150_000);
        p.ping(10_000_000, 99, LARGE_PADDING);
        p.pong(99, 10_000_000 + 20_000 + 52_429);
        let kbps = p.bandwidth_kbps().unwrap();
        assert!((9_900..=10_100).contains(&kbps), "{kbps}");
    }

    #[test]
    fn a_large_ping_faster_than_a_small_one_does_not_divide_by_zero() {
        let mut p = LinkProbe::default();
        p.ping(0, 1, 0);
        p.pong(1, 5_000);
        p.ping(10_000, 2, LARGE_PADDING);
        p.pong(2, 11_000);
        assert!(p.bandwidth_kbps().unwrap() > 0);
    }

    #[test]
    fn lost_pings_are_forgotten_oldest_first() {
        let mut p = LinkProbe::default();
        for i in 0..100 {
            p.ping(i, i, 0);
        }
        assert_eq!(p.outstanding(), MAX_OUTSTANDING);
        assert!(!p.pong(0, 200), "the oldest was forgotten");
        assert!(p.pong(99, 200));
        assert!(p.pong(90, 200), "the others keep their place");
        assert_eq!(p.outstanding(), MAX_OUTSTANDING - 2);
    }
}
