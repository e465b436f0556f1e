//! The circuit breaker, one transition at a time, with the reason it gives.
//!
//! Seed policy (`SafetyPolicy::default()`): trip above 85 °C (resume at or below 80 °C), above
//! 100 ms latency, above 25 errors, or on firmware throttling; 30 s cool-down doubling to 10 min.

use ambient_core::{
    Admission, Breaker, BreakerState, SafetyPolicy, TelemetrySample, ThrottleFlags, Transition,
    TripReason,
};

use BreakerState::{Closed, HalfOpen, Open};

const COOLDOWN_MS: u64 = 30_000;

fn clean() -> TelemetrySample {
    TelemetrySample {
        temp_millic: Some(55_000),
        latency_us: Some(5_000),
        ..Default::default()
    }
}

fn at_temp(millic: i32) -> TelemetrySample {
    TelemetrySample {
        temp_millic: Some(millic),
        ..clean()
    }
}

fn breaker() -> Breaker {
    Breaker::new(SafetyPolicy::default())
}

fn opened(reason: TripReason) -> Option<Transition> {
    Some(Transition {
        from: Closed,
        to: Open,
        reason: Some(reason),
    })
}

/// A breaker tripped by overheating at t = 0.
fn tripped() -> Breaker {
    let mut b = breaker();
    b.observe(0, &at_temp(90_000));
    b
}

/// A breaker that tripped at t = 0 and half-opened at the end of the first cool-down.
fn half_open() -> Breaker {
    let mut b = tripped();
    b.observe(COOLDOWN_MS, &clean());
    assert_eq!(b.state(), HalfOpen);
    b
}

#[test]
fn a_new_breaker_is_closed_and_admits() {
    let mut b = breaker();
    assert_eq!(b.state(), Closed);
    assert_eq!(b.reason(), None);
    assert_eq!(b.observe(0, &clean()), None);
    assert_eq!(b.admit(0), Admission::Admit);
    assert_eq!(
        b.admit(0),
        Admission::Admit,
        "a closed breaker has no probe slot to use up"
    );
}

#[test]
fn a_node_over_85c_is_taken_out_with_the_temperature_as_reason() {
    let mut b = breaker();
    let reason = TripReason::Overheated {
        temp_millic: 85_001,
        max_millic: 85_000,
    };
    assert_eq!(b.observe(10, &at_temp(85_001)), opened(reason));
    assert_eq!(b.state(), Open);
    assert_eq!(b.reason(), Some(reason));
    assert_eq!(b.admit(11), Admission::Refuse(reason));
    assert_eq!(
        reason.to_string(),
        "temperature 85.0 °C is over the 85.0 °C limit"
    );
}

#[test]
fn exactly_85c_is_still_safe() {
    let mut b = breaker();
    assert_eq!(b.observe(0, &at_temp(85_000)), None);
    assert_eq!(b.admit(0), Admission::Admit);
}

#[test]
fn a_missing_temperature_never_trips() {
    let mut b = breaker();
    let sample = TelemetrySample {
        temp_millic: None,
        ..clean()
    };
    assert_eq!(b.observe(0, &sample), None);
    assert_eq!(b.admit(0), Admission::Admit);
}

#[test]
fn latency_over_100ms_trips_with_the_latency_as_reason() {
    let mut b = breaker();
    let sample = TelemetrySample {
        latency_us: Some(100_001),
        ..clean()
    };
    let reason = TripReason::LatencyHigh {
        latency_us: 100_001,
        max_us: 100_000,
    };
    assert_eq!(b.observe(0, &sample), opened(reason));
    assert_eq!(b.admit(0), Admission::Refuse(reason));
}

#[test]
fn firmware_throttling_trips_with_the_flags_as_reason() {
    let mut b = breaker();
    let flags = ThrottleFlags::from_pi_firmware(0x5_0005); // under-voltage + throttled, now and since boot
    assert_eq!(
        flags,
        ThrottleFlags(ThrottleFlags::UNDER_VOLTAGE | ThrottleFlags::THROTTLED)
    );
    let sample = TelemetrySample {
        throttle: flags,
        ..clean()
    };
    assert_eq!(
        b.observe(0, &sample),
        opened(TripReason::Throttled { flags })
    );
}

#[test]
fn throttling_is_ignored_when_the_policy_says_so() {
    let policy = SafetyPolicy {
        trip_on_throttle: false,
        ..SafetyPolicy::default()
    };
    let mut b = Breaker::new(policy);
    let sample = TelemetrySample {
        throttle: ThrottleFlags(ThrottleFlags::FREQ_CAPPED),
        ..clean()
    };
    assert_eq!(b.observe(0, &sample), None);
    assert_eq!(b.admit(0), Admission::Admit);
}

#[test]
fn the_26th_error_trips_and_successes_leak_errors_away() {
    let mut b = breaker();
    for t in 0..25 {
        assert_eq!(b.record(t, false), None);
    }
    assert_eq!(b.errors(), 25);
    assert_eq!(b.record(25, true), None);
    assert_eq!(b.errors(), 24, "a success removes one error");
    assert_eq!(b.record(26, false), None);
    let reason = TripReason::TooManyErrors {
        errors: 26,
        max: 25,
    };
    assert_eq!(b.record(27, false), opened(reason));
    assert_eq!(b.admit(28), Admission::Refuse(reason));
}

#[test]
fn a_breaker_tripped_by_errors_half_opens_after_the_cool_down_and_a_good_probe_closes_it() {
    // Regression: `observe` used to re-judge the error count, which only a successful probe
    // clears, so a breaker tripped by errors stayed open forever.
    let mut b = breaker();
    for t in 0..26 {
        b.record(t, false);
    }
    assert_eq!(b.state(), Open);
    assert_eq!(
        b.observe(25 + COOLDOWN_MS - 1, &clean()),
        None,
        "still cooling down"
    );
    assert_eq!(
        b.observe(25 + COOLDOWN_MS, &clean()),
        Some(Transition {
            from: Open,
            to: HalfOpen,
            reason: None
        })
    );
    assert_eq!(b.admit(25 + COOLDOWN_MS), Admission::Probe);
    assert_eq!(
        b.record(26 + COOLDOWN_MS, true),
        Some(Transition {
            from: HalfOpen,
            to: Closed,
            reason: None
        })
    );
    assert_eq!(b.errors(), 0, "a successful probe clears every error");
}

#[test]
fn an_open_breaker_stays_open_until_the_cool_down_has_passed() {
    let mut b = tripped();
    assert_eq!(b.observe(COOLDOWN_MS - 1, &clean()), None);
    assert_eq!(b.state(), Open);
    assert!(matches!(
        b.admit(COOLDOWN_MS - 1),
        Admission::Refuse(TripReason::Overheated { .. })
    ));
    assert_eq!(
        b.observe(COOLDOWN_MS, &clean()),
        Some(Transition {
            from: Open,
            to: HalfOpen,
            reason: None
        })
    );
}

#[test]
fn the_cool_down_counts_from_the_last_breach_not_the_first() {
    let mut b = tripped();
    b.observe(20_000, &at_temp(90_000)); // still hot: the clock restarts
    assert_eq!(b.observe(COOLDOWN_MS, &clean()), None);
    assert_eq!(b.state(), Open);
    assert_eq!(
        b.observe(20_000 + COOLDOWN_MS, &clean()).map(|t| t.to),
        Some(HalfOpen)
    );
}

#[test]
fn an_open_breaker_does_not_half_open_on_a_sample_that_breaches() {
    let mut b = tripped();
    let slow = TelemetrySample {
        latency_us: Some(150_000),
        ..clean()
    };
    assert_eq!(b.observe(COOLDOWN_MS, &slow), None);
    assert_eq!(b.state(), Open);
    assert_eq!(
        b.reason(),
        Some(TripReason::LatencyHigh {
            latency_us: 150_000,
            max_us: 100_000
        }),
        "the reason follows the latest breach"
    );
}

#[test]
fn after_overheating_the_node_must_cool_below_the_resume_temperature() {
    let mut b = tripped();
    // 82 °C is under the 85 °C limit but above the 80 °C resume temperature.
    assert_eq!(b.observe(COOLDOWN_MS, &at_temp(82_000)), None);
    assert_eq!(b.state(), Open);
    assert!(matches!(b.admit(COOLDOWN_MS), Admission::Refuse(_)));
    assert_eq!(
        b.observe(COOLDOWN_MS + 1, &at_temp(80_000)).map(|t| t.to),
        Some(HalfOpen)
    );
}

#[test]
fn after_overheating_a_node_whose_sensor_goes_silent_stays_out() {
    let mut b = tripped();
    let no_sensor = TelemetrySample {
        temp_millic: None,
        ..clean()
    };
    assert_eq!(b.observe(10 * COOLDOWN_MS, &no_sensor), None);
    assert_eq!(b.state(), Open);
}

#[test]
fn the_cool_down_also_passes_on_admit_without_a_new_sample() {
    let mut b = tripped();
    b.observe(1_000, &clean()); // cooled down, but the cool-down has not passed yet
    assert_eq!(b.state(), Open);
    assert_eq!(b.admit(1_000 + COOLDOWN_MS), Admission::Probe);
    assert_eq!(b.state(), HalfOpen);
}

#[test]
fn a_half_open_breaker_admits_exactly_one_probe() {
    let mut b = half_open();
    assert!(
        b.is_admitting(COOLDOWN_MS),
        "is_admitting does not reserve the slot"
    );
    assert_eq!(b.admit(COOLDOWN_MS), Admission::Probe);
    assert!(!b.is_admitting(COOLDOWN_MS));
    assert!(matches!(
        b.admit(COOLDOWN_MS + 1),
        Admission::Refuse(TripReason::Overheated { .. })
    ));
}

#[test]
fn a_released_probe_frees_the_slot_for_the_next_one_and_changes_nothing_else() {
    let mut b = half_open();
    assert_eq!(b.admit(COOLDOWN_MS), Admission::Probe);
    b.release_probe();
    assert_eq!(b.state(), HalfOpen);
    assert_eq!(b.admit(COOLDOWN_MS + 1), Admission::Probe);
}

#[test]
fn a_failed_probe_reopens_and_doubles_the_cool_down_up_to_the_maximum() {
    let mut b = half_open();
    let mut now = COOLDOWN_MS;
    let mut expected_cooldown = COOLDOWN_MS;
    for _ in 0..8 {
        assert_eq!(b.admit(now), Admission::Probe);
        assert_eq!(
            b.record(now, false),
            Some(Transition {
                from: HalfOpen,
                to: Open,
                reason: Some(TripReason::ProbeFailed)
            })
        );
        assert_eq!(b.reason(), Some(TripReason::ProbeFailed));
        expected_cooldown = (expected_cooldown * 2).min(600_000);
        assert_eq!(
            b.observe(now + expected_cooldown - 1, &clean()),
            None,
            "cool-down {expected_cooldown} ms"
        );
        now += expected_cooldown;
        assert_eq!(b.observe(now, &clean()).map(|t| t.to), Some(HalfOpen));
    }
    assert_eq!(
        expected_cooldown, 600_000,
        "the cool-down stops doubling at the maximum"
    );
}

#[test]
fn a_breach_while_half_open_reopens_with_a_doubled_cool_down() {
    let mut b = half_open();
    let reason = TripReason::LatencyHigh {
        latency_us: 200_000,
        max_us: 100_000,
    };
    let slow = TelemetrySample {
        latency_us: Some(200_000),
        ..clean()
    };
    assert_eq!(
        b.observe(COOLDOWN_MS + 1, &slow),
        Some(Transition {
            from: HalfOpen,
            to: Open,
            reason: Some(reason)
        })
    );
    assert_eq!(
        b.observe(COOLDOWN_MS + 1 + 2 * COOLDOWN_MS - 1, &clean()),
        None
    );
    assert_eq!(
        b.observe(COOLDOWN_MS + 1 + 2 * COOLDOWN_MS, &clean())
            .map(|t| t.to),
        Some(HalfOpen)
    );
}

#[test]
fn a_successful_probe_closes_clears_errors_and_resets_the_cool_down() {
    let mut b = breaker();
    for t in 0..5 {
        b.record(t, false);
    }
    b.observe(10, &at_temp(90_000));
    b.observe(10 + COOLDOWN_MS, &clean());
    assert_eq!(b.admit(10 + COOLDOWN_MS), Admission::Probe);
    b.record(20 + COOLDOWN_MS, false); // the first probe fails: cool-down 60 s
    b.observe(20 + 3 * COOLDOWN_MS, &clean());
    assert_eq!(b.admit(20 + 3 * COOLDOWN_MS), Admission::Probe);
    assert_eq!(
        b.record(30 + 3 * COOLDOWN_MS, true),
        Some(Transition {
            from: HalfOpen,
            to: Closed,
            reason: None
        })
    );
    assert_eq!(b.errors(), 0);
    assert_eq!(b.reason(), None);
    assert_eq!(b.admit(31 + 3 * COOLDOWN_MS), Admission::Admit);

    // The next trip starts again from the first cool-down, not the doubled one.
    let t = 1_000_000;
    b.observe(t, &at_temp(90_000));
    assert_eq!(
        b.observe(t + COOLDOWN_MS, &clean()).map(|t| t.to),
        Some(HalfOpen)
    );
}

#[test]
fn the_raspberry_pi_policy_trips_at_80c_and_resumes_at_75c() {
    let pi = SafetyPolicy::raspberry_pi();
    assert_eq!(pi.max_temp_millic, 80_000);
    assert_eq!(pi.resume_temp_millic, 75_000);
    let mut b = Breaker::new(pi);
    assert_eq!(b.observe(0, &at_temp(80_000)), None);
    assert!(b.observe(1, &at_temp(80_500)).is_some());
    assert_eq!(b.observe(1 + COOLDOWN_MS, &at_temp(76_000)), None);
    assert_eq!(
        b.observe(2 + COOLDOWN_MS, &at_temp(75_000)).map(|t| t.to),
        Some(HalfOpen)
    );
}

#[test]
fn trip_reasons_read_as_sentences() {
    let cases = [
        (
            TripReason::Overheated {
                temp_millic: 86_450,
                max_millic: 85_000,
            },
            "temperature 86.4 °C is over the 85.0 °C limit",
        ),
        (
            TripReason::Throttled {
                flags: ThrottleFlags(0x5),
            },
            "firmware reports throttling (flags 0x5)",
        ),
        (
            TripReason::LatencyHigh {
                latency_us: 150_000,
                max_us: 100_000,
            },
            "latency 150 ms is over the 100 ms limit",
        ),
        (
            TripReason::TooManyErrors {
                errors: 26,
                max: 25,
            },
            "26 errors, over the limit of 25",
        ),
        (TripReason::ProbeFailed, "the probe task failed"),
    ];
    for (reason, text) in cases {
        assert_eq!(reason.to_string(), text);
    }
}
