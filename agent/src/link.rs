//! Latency and bandwidth to the coordinator, from ping/pong round trips. No I/O, no clock:
//! the caller passes times in microseconds since start.
//!
//! Small pings give the round-trip time (`latency_us`, smoothed). Every few intervals a ping
//! carries [`LARGE_PADDING`] bytes; the time it takes beyond a small round trip is the time the
//! padding took to travel, which gives `bandwidth_kbps` (smoothed). Until a pong has been
//! seen, both are `None`.

use std::collections::VecDeque;

/// Padding of a bandwidth ping, in bytes.
pub(crate) const LARGE_PADDING: usize = 64 << 10;
/// Pings awaiting a pong beyond this many are forgotten (the coordinator may be gone).
const MAX_OUTSTANDING: usize = 16;

#[derive(Debug, Default)]
pub(crate) struct LinkProbe {
    next_nonce: u64,
    outstanding: VecDeque<Outstanding>,
    latency_us: Option<u64>,
    bandwidth_kbps: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Outstanding {
    nonce: u64,
    sent_us: u64,
    padding: usize,
}

impl LinkProbe {
    /// Starts nonces at `first_nonce` (random per start, so pongs to an earlier run are ignored).
    pub fn new(first_nonce: u64) -> Self {
        Self {
            next_nonce: first_nonce,
            ..Self::default()
        }
    }

    /// Records a ping sent at `now_us` with `padding` bytes; returns its nonce.
    pub fn ping(&mut self, now_us: u64, padding: usize) -> u64 {
        let nonce = self.next_nonce;
        self.next_nonce = self.next_nonce.wrapping_add(1);
        if self.outstanding.len() == MAX_OUTSTANDING {
            self.outstanding.pop_front();
        }
        self.outstanding.push_back(Outstanding {
            nonce,
            sent_us: now_us,
            padding,
        });
        nonce
    }

    /// Records a pong received at `now_us`; unknown nonces are ignored.
    pub fn pong(&mut self, nonce: u64, now_us: u64) {
        let Some(i) = self.outstanding.iter().position(|o| o.nonce == nonce) else {
            return;
        };
        let Some(o) = self.outstanding.remove(i) else {
            return;
        };
        let rtt = now_us.saturating_sub(o.sent_us).max(1);
        if o.padding == 0 {
            self.latency_us = Some(smooth(self.latency_us, rtt));
            return;
        }
        // The padding's travel time is what the large round trip took beyond a small one.
        // With no small round trip yet, the whole round trip is a conservative bound.
        let extra = rtt.saturating_sub(self.latency_us.unwrap_or(0)).max(1);
        let kbps = (o.padding as u64 * 8 * 1_000 / extra).max(1);
        self.bandwidth_kbps = Some(smooth(self.bandwidth_kbps, kbps));
    }

    /// Smoothed round-trip time, in microseconds.
    pub fn latency_us(&self) -> Option<u32> {
        self.latency_us.map(|v| v.min(u32::MAX as u64) as u32)
    }

    /// Smoothed bandwidth estimate, in kbit/s.
    pub fn bandwidth_kbps(&self) -> Option<u32> {
        self.bandwidth_kbps.map(|v| v.min(u32::MAX as u64) as u32)
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
        let mut p = LinkProbe::new(7);
        let n = p.ping(1_000, 0);
        assert_eq!(n, 7);
        assert_eq!(p.latency_us(), None);
        p.pong(n + 100, 2_000);
        assert_eq!(p.latency_us(), None);
        p.pong(n, 3_000);
        assert_eq!(p.latency_us(), Some(2_000));
        assert_eq!(p.bandwidth_kbps(), None);
    }

    #[test]
    fn latency_is_smoothed() {
        let mut p = LinkProbe::new(0);
        let a = p.ping(0, 0);
        p.pong(a, 1_000);
        let b = p.ping(10_000, 0);
        p.pong(b, 15_000);
        assert_eq!(p.latency_us(), Some(2_000)); // (3·1000 + 5000) / 4
    }

    #[test]
    fn bandwidth_comes_from_the_extra_time_of_a_large_ping() {
        let mut p = LinkProbe::new(0);
        let small = p.ping(0, 0);
        p.pong(small, 1_000);
        // 64 KiB took 5.243 ms more than a small round trip: 100 Mbit/s.
        let large = p.ping(10_000, LARGE_PADDING);
        p.pong(large, 10_000 + 1_000 + 5_243);
        let kbps = p.bandwidth_kbps().unwrap();
        assert!((99_900..=100_100).contains(&kbps), "{kbps}");
    }

    #[test]
    fn a_large_ping_faster_than_a_small_one_does_not_divide_by_zero() {
        let mut p = LinkProbe::new(0);
        let small = p.ping(0, 0);
        p.pong(small, 5_000);
        let large = p.ping(10_000, LARGE_PADDING);
        p.pong(large, 11_000);
        assert!(p.bandwidth_kbps().unwrap() > 0);
    }

    #[test]
    fn lost_pings_are_forgotten() {
        let mut p = LinkProbe::new(0);
        for i in 0..100 {
            p.ping(i, 0);
        }
        assert_eq!(p.outstanding.len(), MAX_OUTSTANDING);
    }
}
