//! The safety policy and the circuit breaker that takes an unsafe device out of the pool.

use core::fmt;
use serde::{Deserialize, Serialize};

use crate::{TelemetrySample, ThrottleFlags};

/// Thresholds beyond which a device must stop taking work. Seed defaults: 85 °C, 100 ms, 25 errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SafetyPolicy {
    /// Trip above this temperature, in millidegrees Celsius.
    pub max_temp_millic: i32,
    /// After an overheat trip, stay open until the device cools to this temperature (hysteresis).
    pub resume_temp_millic: i32,
    /// Trip above this round-trip latency, in microseconds.
    pub max_latency_us: u32,
    /// Trip when the error count exceeds this.
    pub max_errors: u32,
    /// Trip while the firmware reports throttling or under-voltage.
    pub trip_on_throttle: bool,
    /// First cool-down before a probe task is admitted, in milliseconds.
    pub cooldown_ms: u64,
    /// Cool-downs double after each failed probe, up to this, in milliseconds.
    pub max_cooldown_ms: u64,
}

impl Default for SafetyPolicy {
    /// The seed policy: 85 °C (resume at 80 °C), 100 ms, 25 errors, 30 s cool-down up to 10 min.
    fn default() -> Self {
        Self {
            max_temp_millic: 85_000,
            resume_temp_millic: 80_000,
            max_latency_us: 100_000,
            max_errors: 25,
            trip_on_throttle: true,
            cooldown_ms: 30_000,
            max_cooldown_ms: 600_000,
        }
    }
}

impl SafetyPolicy {
    /// Raspberry Pi: the firmware throttles from 80 °C, so trip there and resume at 75 °C.
    pub fn raspberry_pi() -> Self {
        Self {
            max_temp_millic: 80_000,
            resume_temp_millic: 75_000,
            ..Self::default()
        }
    }

    /// The first threshold `sample` breaches, given `errors` counted so far.
    pub fn breach(&self, sample: &TelemetrySample, errors: u32) -> Option<TripReason> {
        if let Some(t) = sample.temp_millic.filter(|t| *t > self.max_temp_millic) {
            return Some(TripReason::Overheated {
                temp_millic: t,
                max_millic: self.max_temp_millic,
            });
        }
        if self.trip_on_throttle && sample.throttle.is_any() {
            return Some(TripReason::Throttled {
                flags: sample.throttle,
            });
        }
        if let Some(l) = sample.latency_us.filter(|l| *l > self.max_latency_us) {
            return Some(TripReason::LatencyHigh {
                latency_us: l,
                max_us: self.max_latency_us,
            });
        }
        if errors > self.max_errors {
            return Some(TripReason::TooManyErrors {
                errors,
                max: self.max_errors,
            });
        }
        None
    }
}

/// Why a breaker opened: shown to users so they can see why a node is out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TripReason {
    /// Hotter than the policy allows.
    Overheated {
        /// Reading, in m°C.
        temp_millic: i32,
        /// Threshold, in m°C.
        max_millic: i32,
    },
    /// The firmware reports throttling or under-voltage.
    Throttled {
        /// The flags reported.
        flags: ThrottleFlags,
    },
    /// Round trips to the coordinator are too slow.
    LatencyHigh {
        /// Reading, in µs.
        latency_us: u32,
        /// Threshold, in µs.
        max_us: u32,
    },
    /// Too many task errors.
    TooManyErrors {
        /// Errors counted.
        errors: u32,
        /// Threshold.
        max: u32,
    },
    /// The probe task admitted in half-open state failed.
    ProbeFailed,
}

impl fmt::Display for TripReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Overheated {
                temp_millic,
                max_millic,
            } => write!(
                f,
                "temperature {}.{} °C is over the {}.{} °C limit",
                temp_millic / 1000,
                (temp_millic % 1000).abs() / 100,
                max_millic / 1000,
                (max_millic % 1000).abs() / 100
            ),
            Self::Throttled { flags } => {
                write!(f, "firmware reports throttling (flags {:#x})", flags.0)
            }
            Self::LatencyHigh { latency_us, max_us } => write!(
                f,
                "latency {} ms is over the {} ms limit",
                latency_us / 1000,
                max_us / 1000
            ),
            Self::TooManyErrors { errors, max } => {
                write!(f, "{errors} errors, over the limit of {max}")
            }
            Self::ProbeFailed => f.write_str("the probe task failed"),
        }
    }
}

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BreakerState {
    /// Healthy: tasks are admitted.
    #[default]
    Closed,
    /// Out of the pool until the cool-down passes and no threshold is breached.
    Open,
    /// One probe task may run; its outcome closes or re-opens the breaker.
    HalfOpen,
}

/// The answer to "may this device take a task now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Yes.
    Admit,
    /// Yes, as the single probe of a half-open breaker; report its outcome with [`Breaker::record`].
    Probe,
    /// No, and why.
    Refuse(TripReason),
}

/// A change of state, with the reason when it opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// State before.
    pub from: BreakerState,
    /// State after.
    pub to: BreakerState,
    /// Why it opened; `None` for half-opening and closing.
    pub reason: Option<TripReason>,
}

/// A circuit breaker driven by telemetry and task outcomes; time is passed in, never read.
///
/// Closed → Open on any breach. Open → Half-open once the cool-down has passed since the last
/// breach and the latest sample breaches nothing (and, after overheating, the device has cooled
/// below the resume temperature). Half-open admits one probe: success closes the breaker and
/// clears the error count, failure re-opens it with a doubled cool-down.
///
/// Errors are a leaky count: each failure adds one, each success removes one.
///
/// ```
/// use ambient_core::{Admission, Breaker, BreakerState, SafetyPolicy, TelemetrySample};
/// let mut b = Breaker::new(SafetyPolicy::default());
/// let hot = TelemetrySample { temp_millic: Some(90_000), ..Default::default() };
/// b.observe(0, &hot);
/// assert!(matches!(b.admit(1), Admission::Refuse(_)));
/// let cool = TelemetrySample { temp_millic: Some(70_000), ..Default::default() };
/// b.observe(40_000, &cool);
/// assert_eq!(b.state(), BreakerState::HalfOpen);
/// assert_eq!(b.admit(40_001), Admission::Probe);
/// b.record(40_500, true);
/// assert_eq!(b.state(), BreakerState::Closed);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    policy: SafetyPolicy,
    state: BreakerState,
    reason: Option<TripReason>,
    breached_at_ms: u64,
    cooldown_ms: u64,
    errors: u32,
    probe_out: bool,
    /// The breach seen in the latest sample, if any; nothing is admitted while it stands.
    current: Option<TripReason>,
    /// After an overheat, the device must cool below the resume temperature first.
    needs_cooling: bool,
}

impl Breaker {
    /// A closed breaker enforcing `policy`.
    pub fn new(policy: SafetyPolicy) -> Self {
        Self {
            policy,
            state: BreakerState::Closed,
            reason: None,
            breached_at_ms: 0,
            cooldown_ms: policy.cooldown_ms,
            errors: 0,
            probe_out: false,
            current: None,
            needs_cooling: false,
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Why the breaker is not closed, if it is not.
    pub fn reason(&self) -> Option<TripReason> {
        self.reason
    }

    /// The leaky error count.
    pub fn errors(&self) -> u32 {
        self.errors
    }

    /// The policy it enforces.
    pub fn policy(&self) -> &SafetyPolicy {
        &self.policy
    }

    /// Feeds a telemetry sample taken at `now_ms`.
    pub fn observe(&mut self, now_ms: u64, sample: &TelemetrySample) -> Option<Transition> {
        // Only the sample's own readings count here. The error threshold is enforced by
        // `record`; judging the count here too would keep a breaker that tripped on errors
        // open forever, since only a successful probe clears the count.
        self.current = self.policy.breach(sample, 0);
        if let Some(TripReason::Overheated { .. }) = self.current {
            self.needs_cooling = true;
        }
        if self.needs_cooling {
            self.needs_cooling = sample
                .temp_millic
                .is_none_or(|t| t > self.policy.resume_temp_millic);
        }
        match self.current {
            Some(reason) => self.trip(now_ms, reason),
            None => self.tick(now_ms),
        }
    }

    /// Whether a task may start at `now_ms`. A [`Admission::Probe`] reserves the probe slot.
    pub fn admit(&mut self, now_ms: u64) -> Admission {
        if let Some(reason) = self.current {
            return Admission::Refuse(reason);
        }
        self.tick(now_ms);
        match self.state {
            BreakerState::Closed => Admission::Admit,
            BreakerState::HalfOpen if !self.probe_out => {
                self.probe_out = true;
                Admission::Probe
            }
            _ => Admission::Refuse(self.reason.unwrap_or(TripReason::ProbeFailed)),
        }
    }

    /// Whether a task would be admitted at `now_ms`, without reserving the probe slot.
    pub fn is_admitting(&self, now_ms: u64) -> bool {
        let mut probe = self.clone();
        !matches!(probe.admit(now_ms), Admission::Refuse(_))
    }

    /// Frees the probe slot after a probe that said nothing about the device either way (a run
    /// stopped by the wall clock): the next admission probes again. Nothing else changes.
    pub fn release_probe(&mut self) {
        self.probe_out = false;
    }

    /// Records a task's outcome at `now_ms`: `true` if it succeeded.
    pub fn record(&mut self, now_ms: u64, succeeded: bool) -> Option<Transition> {
        if succeeded {
            self.errors = self.errors.saturating_sub(1);
            if self.state == BreakerState::HalfOpen {
                self.errors = 0;
                self.cooldown_ms = self.policy.cooldown_ms;
                return self.enter(BreakerState::Closed, None);
            }
            return None;
        }
        self.errors = self.errors.saturating_add(1);
        if self.state == BreakerState::HalfOpen {
            self.cooldown_ms =
                (self.cooldown_ms.saturating_mul(2)).min(self.policy.max_cooldown_ms);
            self.breached_at_ms = now_ms;
            return self.enter(BreakerState::Open, Some(TripReason::ProbeFailed));
        }
        if self.errors > self.policy.max_errors {
            let reason = TripReason::TooManyErrors {
                errors: self.errors,
                max: self.policy.max_errors,
            };
            return self.trip(now_ms, reason);
        }
        None
    }

    fn trip(&mut self, now_ms: u64, reason: TripReason) -> Option<Transition> {
        self.breached_at_ms = now_ms;
        match self.state {
            BreakerState::Open => {
                self.reason = Some(reason);
                None
            }
            BreakerState::HalfOpen => {
                self.cooldown_ms =
                    (self.cooldown_ms.saturating_mul(2)).min(self.policy.max_cooldown_ms);
                self.enter(BreakerState::Open, Some(reason))
            }
            BreakerState::Closed => self.enter(BreakerState::Open, Some(reason)),
        }
    }

    fn tick(&mut self, now_ms: u64) -> Option<Transition> {
        let cooled = now_ms.saturating_sub(self.breached_at_ms) >= self.cooldown_ms;
        if self.state == BreakerState::Open
            && cooled
            && self.current.is_none()
            && !self.needs_cooling
        {
            return self.enter(BreakerState::HalfOpen, None);
        }
        None
    }

    fn enter(&mut self, to: BreakerState, reason: Option<TripReason>) -> Option<Transition> {
        let from = self.state;
        self.state = to;
        self.probe_out = false;
        if to == BreakerState::Closed {
            self.reason = None;
        } else if reason.is_some() {
            self.reason = reason;
        }
        Some(Transition { from, to, reason })
    }
}
