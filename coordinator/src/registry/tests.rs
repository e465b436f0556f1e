//! The registry's unit tests: signed traffic from real keys, time passed in by hand.

use std::collections::HashSet;
use std::time::Duration;

use ambient_core::{
    BreakerState, LARGE_PADDING, NodeId, SafetyPolicy, SignedTelemetry, Telemetry, TelemetrySample,
};

use super::fixtures::{Fleet, announce, identity, sign_announce, sign_telemetry, t0};
use super::*;

fn healthy() -> TelemetrySample {
    TelemetrySample {
        bandwidth_kbps: Some(50_000),
        latency_us: Some(20_000),
        cpu_load_permille: Some(250),
        mem_free_bytes: Some(1 << 30),
        temp_millic: Some(55_000),
        ..Default::default()
    }
}

fn hot() -> TelemetrySample {
    TelemetrySample {
        temp_millic: Some(86_000),
        ..healthy()
    }
}

fn pick(fleet: &mut Fleet, now: Instant) -> Option<NodeId> {
    fleet
        .registry
        .select(now, &Requirements::default(), Strategy::Weighted, &[])
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn an_announce_registers_the_node_under_its_derived_id() {
    let me = identity(1);
    let mut registry = Registry::new(RegistryConfig::default());
    let id = registry
        .on_announce(t0(), &sign_announce(&me, announce(&me)))
        .unwrap();
    assert_eq!(id, me.node_id());
    assert_eq!(registry.len(), 1);
    assert_eq!(registry.public_key(&id), Some(&me.public_key()));
    let view = registry.view(t0(), &id).unwrap();
    assert!(view.online);
    assert_eq!(
        (view.arch.as_str(), view.engine.as_str(), view.cores),
        ("aarch64", "wasmtime", 4)
    );
}

#[test]
fn an_announced_node_gets_no_task_until_its_first_signed_telemetry() {
    let me = identity(1);
    let mut registry = Registry::new(RegistryConfig::default());
    let id = registry
        .on_announce(t0(), &sign_announce(&me, announce(&me)))
        .unwrap();
    let req = Requirements::default();
    assert_eq!(registry.select(t0(), &req, Strategy::Weighted, &[]), None);
    let telemetry = Telemetry {
        node: id,
        seq: 1,
        boot_id: 1,
        sample: healthy(),
    };
    registry
        .on_telemetry(t0(), &sign_telemetry(&me, telemetry))
        .unwrap();
    assert_eq!(
        registry.select(t0(), &req, Strategy::Weighted, &[]),
        Some(id)
    );
}

#[test]
fn open_enrollment_holds_at_most_max_nodes_and_admits_new_ones_at_the_join_rate() {
    let config = RegistryConfig {
        max_nodes: 30,
        joins_per_s: 2,
        ..RegistryConfig::default()
    };
    let mut registry = Registry::new(config);
    let join = |registry: &mut Registry, i: usize, now: Instant| {
        let id = identity(i);
        registry.on_announce(now, &sign_announce(&id, announce(&id)))
    };
    // A burst of ten seconds' worth, then one per half second.
    for i in 0..20 {
        join(&mut registry, i, t0()).unwrap();
    }
    assert_eq!(
        join(&mut registry, 20, t0()),
        Err(RegistryError::TooManyJoins)
    );
    join(&mut registry, 20, t0() + Duration::from_millis(500)).unwrap();
    // A known node re-announces whatever the rate.
    join(&mut registry, 0, t0() + Duration::from_millis(500)).unwrap();
    for i in 21..30 {
        join(&mut registry, i, t0() + secs(60)).unwrap();
    }
    assert_eq!(
        join(&mut registry, 30, t0() + secs(120)),
        Err(RegistryError::Full(30))
    );
    assert_eq!(registry.len(), 30);
}

#[test]
fn forgeries_beyond_a_nodes_budget_are_dropped_unverified_and_honest_traffic_never_uses_it() {
    let config = RegistryConfig {
        bad_frames_per_s: 2,
        ..RegistryConfig::default()
    };
    let mut registry = Registry::new(config);
    let me = identity(1);
    let id = me.node_id();
    registry
        .on_announce(t0(), &sign_announce(&me, announce(&me)))
        .unwrap();
    let sample = |seq| Telemetry {
        node: id,
        seq,
        boot_id: 1,
        sample: healthy(),
    };
    // However fast an honest node sends, it is never limited.
    for seq in 1..=100 {
        registry
            .on_telemetry(t0(), &sign_telemetry(&me, sample(seq)))
            .unwrap();
    }
    // Twenty forgeries (2/s, ten seconds deep) are checked and refused...
    let forger = identity(2);
    for seq in 101..=120 {
        assert_eq!(
            registry.on_telemetry(t0(), &sign_telemetry(&forger, sample(seq))),
            Err(RegistryError::BadSignature)
        );
    }
    // ...then frames in its name are dropped unchecked, its own included, until the budget
    // refills.
    assert_eq!(
        registry.on_telemetry(t0(), &sign_telemetry(&forger, sample(121))),
        Err(RegistryError::TooFast)
    );
    assert_eq!(
        registry.on_telemetry(t0(), &sign_telemetry(&me, sample(122))),
        Err(RegistryError::TooFast)
    );
    assert_eq!(
        registry.on_announce(t0(), &sign_announce(&me, announce(&me))),
        Err(RegistryError::TooFast)
    );
    registry
        .on_telemetry(
            t0() + Duration::from_millis(500),
            &sign_telemetry(&me, sample(123)),
        )
        .unwrap();
}

#[test]
fn a_node_idle_past_forget_after_is_forgotten_and_may_join_again() {
    let config = RegistryConfig {
        forget_after: secs(3600),
        ..RegistryConfig::default()
    };
    let mut fleet = Fleet::configured(config, 2, |_| {});
    let (busy, idle) = (fleet.id(0), fleet.id(1));
    fleet.registry.task_started(&busy);
    assert!(fleet.registry.went_silent(t0() + secs(3599)).len() == 2);
    fleet.registry.went_silent(t0() + secs(3700));
    assert!(fleet.registry.view(t0(), &idle).is_none(), "forgotten");
    assert!(
        fleet.registry.view(t0(), &busy).is_some(),
        "a node with a task stays"
    );
    fleet.reannounce(t0() + secs(3800), 1, |_| {});
    assert!(fleet.registry.view(t0(), &idle).is_some());
}

#[test]
fn an_offline_presence_stops_placements_and_ends_liveness_after_the_grace() {
    let mut fleet = Fleet::new(1);
    let id = fleet.id(0);
    fleet.registry.on_status(t0(), id, false);
    assert_eq!(pick(&mut fleet, t0()), None, "no new task meanwhile");
    assert!(fleet.registry.went_silent(t0() + secs(9)).is_empty());
    assert_eq!(fleet.registry.went_silent(t0() + secs(10)), vec![id]);
    assert!(
        fleet.registry.went_silent(t0() + secs(11)).is_empty(),
        "once"
    );
}

#[test]
fn a_node_that_disproves_an_offline_presence_in_time_never_goes_silent() {
    let mut fleet = Fleet::new(1);
    let id = fleet.id(0);
    fleet.registry.on_status(t0(), id, false);
    fleet.report(t0() + secs(5), 0, healthy());
    assert_eq!(pick(&mut fleet, t0() + secs(5)), Some(id));
    assert!(fleet.registry.went_silent(t0() + secs(19)).is_empty());
}

#[test]
fn an_announce_claiming_another_nodes_id_is_rejected() {
    let (me, victim) = (identity(1), identity(2));
    let mut a = announce(&me);
    a.node = victim.node_id();
    let mut registry = Registry::new(RegistryConfig::default());
    assert_eq!(
        registry.on_announce(t0(), &sign_announce(&me, a)),
        Err(RegistryError::IdMismatch)
    );
    assert!(registry.is_empty());
}

#[test]
fn a_tampered_announce_is_rejected() {
    let me = identity(1);
    let mut signed = sign_announce(&me, announce(&me));
    signed.announce.cores = 64;
    let mut registry = Registry::new(RegistryConfig::default());
    assert_eq!(
        registry.on_announce(t0(), &signed),
        Err(RegistryError::BadSignature)
    );
    assert!(registry.is_empty());
}

#[test]
fn an_allowlist_refuses_unknown_keys() {
    let (friend, stranger) = (identity(1), identity(2));
    let config = RegistryConfig {
        enrollment: Enrollment::Allowlist(HashSet::from([friend.public_key()])),
        ..Default::default()
    };
    let mut registry = Registry::new(config);
    let refused = registry.on_announce(t0(), &sign_announce(&stranger, announce(&stranger)));
    assert_eq!(refused, Err(RegistryError::NotAllowed));
    let admitted = registry.on_announce(t0(), &sign_announce(&friend, announce(&friend)));
    assert_eq!(admitted, Ok(friend.node_id()));
    assert_eq!(registry.len(), 1);
}

#[test]
fn an_unlisted_key_must_prove_itself_and_joins_once_approved_until_revoked() {
    let (friend, stranger) = (identity(1), identity(2));
    let config = RegistryConfig {
        enrollment: Enrollment::Allowlist(HashSet::from([friend.public_key()])),
        ..Default::default()
    };
    let mut registry = Registry::new(config);
    let mut forged = sign_announce(&stranger, announce(&stranger));
    forged.signature[0] ^= 1;
    assert_eq!(
        registry.on_announce(t0(), &forged),
        Err(RegistryError::BadSignature),
        "only a key holder waits for approval"
    );

    registry.approve(stranger.public_key());
    let signed = sign_announce(&stranger, announce(&stranger));
    assert_eq!(registry.on_announce(t0(), &signed), Ok(stranger.node_id()));

    // Revoked: gone at once, refused from then on, even a key the configuration lists.
    assert_eq!(
        registry.revoke(stranger.public_key()),
        Some(stranger.node_id())
    );
    assert_eq!(
        registry.revoke(friend.public_key()),
        None,
        "never registered"
    );
    assert_eq!(registry.len(), 0);
    assert_eq!(
        registry.on_announce(t0(), &signed),
        Err(RegistryError::Revoked)
    );
    let friendly = sign_announce(&friend, announce(&friend));
    assert_eq!(
        registry.on_announce(t0(), &friendly),
        Err(RegistryError::Revoked)
    );
    registry.approve(friend.public_key());
    assert_eq!(registry.on_announce(t0(), &friendly), Ok(friend.node_id()));
}

#[test]
fn a_revoked_node_is_never_placed_again_in_open_enrollment() {
    let mut fleet = Fleet::new(2);
    let key = *fleet.registry.public_key(&fleet.id(0)).unwrap();
    assert_eq!(fleet.registry.revoke(key), Some(fleet.id(0)));
    for _ in 0..4 {
        let chosen =
            fleet
                .registry
                .select(t0(), &Requirements::default(), Strategy::RoundRobin, &[]);
        assert_eq!(chosen, Some(fleet.id(1)));
    }
}

#[test]
fn telemetry_signed_by_another_key_is_rejected() {
    let mut fleet = Fleet::new(1);
    let forger = identity(9);
    let forged = sign_telemetry(
        &forger,
        Telemetry {
            node: fleet.id(0),
            seq: 2,
            boot_id: 1,
            sample: healthy(),
        },
    );
    assert_eq!(
        fleet.registry.on_telemetry(t0(), &forged),
        Err(RegistryError::BadSignature)
    );
    assert_eq!(
        fleet.registry.view(t0(), &fleet.id(0)).unwrap().sample,
        Some(TelemetrySample::default())
    );
    // The forgery did not use up sequence number 2.
    fleet.report(t0(), 0, healthy());
}

#[test]
fn telemetry_from_an_unannounced_node_is_rejected() {
    let stranger = identity(3);
    let mut registry = Registry::new(RegistryConfig::default());
    let t = Telemetry {
        node: stranger.node_id(),
        seq: 1,
        boot_id: 1,
        sample: healthy(),
    };
    let signed = sign_telemetry(&stranger, t);
    assert_eq!(
        registry.on_telemetry(t0(), &signed),
        Err(RegistryError::UnknownNode)
    );
}

#[test]
fn a_replayed_sample_is_rejected() {
    let mut fleet = Fleet::new(1);
    let first = fleet.telemetry(0, healthy());
    let second = fleet.telemetry(0, hot());
    fleet.registry.on_telemetry(t0(), &first).unwrap();
    fleet.registry.on_telemetry(t0(), &second).unwrap();
    assert_eq!(
        fleet.registry.on_telemetry(t0(), &second),
        Err(RegistryError::Replay)
    );
    assert_eq!(
        fleet.registry.on_telemetry(t0(), &first),
        Err(RegistryError::Replay),
        "older"
    );
}

#[test]
fn a_restarted_agent_may_count_from_zero_again_but_its_old_run_stays_closed() {
    let mut fleet = Fleet::new(1);
    let me = identity(0);
    let run = |boot_id, seq| {
        let t = Telemetry {
            node: me.node_id(),
            seq,
            boot_id,
            sample: healthy(),
        };
        sign_telemetry(&me, t)
    };
    let (old_5, old_4, new_0, new_1) = (run(10, 5), run(10, 4), run(11, 0), run(11, 1));
    let r = &mut fleet.registry;
    r.on_telemetry(t0(), &old_5).unwrap();
    r.on_telemetry(t0(), &new_0).unwrap();
    assert_eq!(r.on_telemetry(t0(), &old_4), Err(RegistryError::Replay));
    assert_eq!(r.on_telemetry(t0(), &old_5), Err(RegistryError::Replay));
    r.on_telemetry(t0(), &new_1).unwrap();
    assert_eq!(r.on_telemetry(t0(), &new_0), Err(RegistryError::Replay));
}

#[test]
fn a_silent_node_goes_offline_after_the_liveness_window() {
    let mut fleet = Fleet::new(1);
    let id = fleet.id(0);
    fleet.report(t0() + secs(10), 0, healthy());
    let just_before = t0() + secs(25) - Duration::from_millis(1);
    assert_eq!(pick(&mut fleet, just_before), Some(id));
    assert!(fleet.registry.view(just_before, &id).unwrap().online);

    let after = t0() + secs(25);
    assert_eq!(pick(&mut fleet, after), None);
    let view = fleet.registry.view(after, &id).unwrap();
    assert!(!view.online);
    assert_eq!(view.last_seen_ms_ago, Some(15_000));

    fleet.report(t0() + secs(40), 0, healthy());
    assert_eq!(
        pick(&mut fleet, t0() + secs(40)),
        Some(id),
        "speaking again brings it back"
    );
}

#[test]
fn a_verified_report_keeps_a_silent_node_alive() {
    let mut fleet = Fleet::new(1);
    let id = fleet.id(0);
    fleet.registry.touch(t0() + secs(10), id);
    assert_eq!(pick(&mut fleet, t0() + secs(20)), Some(id));
    assert_eq!(pick(&mut fleet, t0() + secs(25)), None);
}

#[test]
fn a_last_will_takes_the_node_out_until_it_speaks_again() {
    let mut fleet = Fleet::new(1);
    let id = fleet.id(0);
    fleet.report(t0(), 0, healthy());
    fleet.registry.on_status(t0(), id, false);
    assert_eq!(pick(&mut fleet, t0()), None);
    assert!(!fleet.registry.view(t0(), &id).unwrap().online);

    fleet.registry.on_status(t0(), id, true);
    assert_eq!(pick(&mut fleet, t0()), Some(id), "back online");

    fleet.registry.on_status(t0(), id, false);
    fleet.report(t0() + secs(1), 0, healthy());
    assert_eq!(
        pick(&mut fleet, t0() + secs(1)),
        Some(id),
        "fresh telemetry outranks a stale will"
    );
}

#[test]
fn an_online_status_alone_does_not_revive_a_silent_node() {
    let mut fleet = Fleet::new(1);
    let id = fleet.id(0);
    fleet.registry.on_status(t0() + secs(20), id, true);
    assert_eq!(pick(&mut fleet, t0() + secs(20)), None);
}

#[test]
fn a_last_will_that_arrives_before_the_announce_is_remembered() {
    let me = identity(4);
    let mut registry = Registry::new(RegistryConfig::default());
    registry.on_status(t0(), me.node_id(), false);
    registry
        .on_announce(t0(), &sign_announce(&me, announce(&me)))
        .unwrap();
    let req = Requirements::default();
    assert_eq!(registry.select(t0(), &req, Strategy::Weighted, &[]), None);
    assert!(!registry.view(t0(), &me.node_id()).unwrap().online);
}

#[test]
fn a_node_over_85c_receives_no_tasks() {
    let mut fleet = Fleet::new(2);
    fleet.report(t0(), 0, healthy());
    fleet.report(t0(), 1, hot());
    for strategy in Strategy::ALL {
        for _ in 0..3 {
            let pick = fleet
                .registry
                .select(t0(), &Requirements::default(), strategy, &[]);
            assert_eq!(pick, Some(fleet.id(0)), "{strategy}");
        }
    }
    let view = fleet.registry.view(t0(), &fleet.id(1)).unwrap();
    assert_eq!(view.breaker, BreakerState::Open);
    assert_eq!(
        view.breaker_reason.as_deref(),
        Some("temperature 86.0 °C is over the 85.0 °C limit")
    );
}

#[test]
fn a_half_open_node_gets_exactly_one_probe() {
    let mut fleet = Fleet::new(1);
    let id = fleet.id(0);
    fleet.report(t0(), 0, hot());
    let cool = TelemetrySample {
        temp_millic: Some(60_000),
        ..healthy()
    };
    fleet.report(t0() + secs(10), 0, cool.clone());
    assert_eq!(
        pick(&mut fleet, t0() + secs(10)),
        None,
        "still cooling down"
    );

    let later = t0() + secs(31);
    fleet.report(later, 0, cool);
    assert_eq!(
        fleet.registry.view(later, &id).unwrap().breaker,
        BreakerState::HalfOpen
    );
    assert_eq!(pick(&mut fleet, later), Some(id), "the probe");
    for strategy in Strategy::ALL {
        let again = fleet
            .registry
            .select(later, &Requirements::default(), strategy, &[]);
        assert_eq!(again, None, "{strategy}: one probe only");
    }

    fleet
        .registry
        .record(later + secs(1), &id, Outcome::Completed);
    assert_eq!(
        fleet.registry.view(later, &id).unwrap().breaker,
        BreakerState::Closed
    );
    assert_eq!(pick(&mut fleet, later + secs(1)), Some(id));
    assert_eq!(
        pick(&mut fleet, later + secs(1)),
        Some(id),
        "closed: no longer one at a time"
    );
}

#[test]
fn a_failed_probe_reopens_the_breaker() {
    let mut fleet = Fleet::new(1);
    let id = fleet.id(0);
    fleet.report(
        t0(),
        0,
        TelemetrySample {
            latency_us: Some(150_000),
            ..healthy()
        },
    );
    let later = t0() + secs(30);
    fleet.report(later, 0, healthy());
    assert_eq!(pick(&mut fleet, later), Some(id));
    fleet.registry.record(later + secs(2), &id, Outcome::Failed);
    let view = fleet.registry.view(later, &id).unwrap();
    assert_eq!(view.breaker, BreakerState::Open);
    assert_eq!(
        view.breaker_reason.as_deref(),
        Some("the probe task failed")
    );
    fleet.report(later + secs(40), 0, healthy());
    assert_eq!(
        pick(&mut fleet, later + secs(40)),
        None,
        "the cool-down doubled to 60 s"
    );
}

#[test]
fn a_node_whose_own_breaker_is_open_receives_no_tasks() {
    let mut fleet = Fleet::new(1);
    fleet.report(
        t0(),
        0,
        TelemetrySample {
            breaker: BreakerState::Open,
            ..healthy()
        },
    );
    assert_eq!(pick(&mut fleet, t0()), None);
    fleet.report(t0(), 0, healthy());
    assert_eq!(pick(&mut fleet, t0()), Some(fleet.id(0)));
}

#[test]
fn a_disputed_result_costs_more_than_a_verified_one_earns() {
    let mut fleet = Fleet::new(1);
    let id = fleet.id(0);
    fleet.report(t0(), 0, healthy());
    let score = |fleet: &Fleet| fleet.registry.view(t0(), &id).unwrap().terms;
    let start = score(&fleet);
    fleet.registry.record(t0(), &id, Outcome::Verified);
    let after_verified = score(&fleet);
    fleet.registry.record(t0(), &id, Outcome::Disputed);
    let after_disputed = score(&fleet);

    // Beta(2, 2) prior: 2/4, then 3/5, then 3/(5 + 10) as a dispute weighs ten failures.
    let reputations = (
        start.reputation,
        after_verified.reputation,
        after_disputed.reputation,
    );
    assert_eq!(reputations, (5_000, 6_000, 2_000));
    let (gain, loss) = (reputations.1 - reputations.0, reputations.1 - reputations.2);
    assert!(loss > gain, "gain {gain}, loss {loss}");
    assert!(
        after_disputed.score < start.score,
        "the health score follows reputation"
    );
    let counts = fleet.registry.view(t0(), &id).unwrap().reputation;
    assert_eq!((counts.verified, counts.disputed), (1, 1));
}

#[test]
fn too_many_failures_open_the_breaker() {
    let config = RegistryConfig {
        safety: SafetyPolicy {
            max_errors: 2,
            ..SafetyPolicy::default()
        },
        ..Default::default()
    };
    let mut fleet = Fleet::configured(config, 1, |_| {});
    let id = fleet.id(0);
    for _ in 0..3 {
        assert_eq!(pick(&mut fleet, t0()), Some(id));
        fleet.registry.record(t0(), &id, Outcome::Failed);
    }
    assert_eq!(pick(&mut fleet, t0()), None);
    assert_eq!(fleet.registry.view(t0(), &id).unwrap().reputation.failed, 3);
}

#[test]
fn a_node_tripped_by_failures_gets_a_probe_after_the_cool_down() {
    let config = RegistryConfig {
        safety: SafetyPolicy {
            max_errors: 1,
            ..SafetyPolicy::default()
        },
        ..Default::default()
    };
    let mut fleet = Fleet::configured(config, 1, |_| {});
    let id = fleet.id(0);
    fleet.registry.record(t0(), &id, Outcome::Failed);
    fleet.registry.record(t0(), &id, Outcome::Failed);
    fleet.report(t0() + secs(10), 0, healthy());
    assert_eq!(pick(&mut fleet, t0() + secs(10)), None, "cooling down");
    fleet.report(t0() + secs(30), 0, healthy());
    assert_eq!(pick(&mut fleet, t0() + secs(30)), Some(id), "the probe");
    assert_eq!(pick(&mut fleet, t0() + secs(30)), None);
    fleet
        .registry
        .record(t0() + secs(31), &id, Outcome::Verified);
    assert_eq!(
        fleet.registry.view(t0(), &id).unwrap().breaker,
        BreakerState::Closed
    );
}

#[test]
fn a_node_at_max_concurrency_receives_no_more_tasks() {
    let mut fleet = Fleet::with(1, |a| a.max_concurrency = 2);
    let id = fleet.id(0);
    fleet.registry.task_started(&id);
    assert_eq!(pick(&mut fleet, t0()), Some(id));
    fleet.registry.task_started(&id);
    assert_eq!(pick(&mut fleet, t0()), None);
    assert_eq!(fleet.registry.view(t0(), &id).unwrap().in_flight, 2);
    fleet.registry.task_finished(&id);
    assert_eq!(pick(&mut fleet, t0()), Some(id));
}

#[test]
fn the_health_score_comes_from_the_coordinators_probes_not_from_reported_readings() {
    let mut fleet = Fleet::new(1);
    let id = fleet.id(0);
    let terms = |fleet: &Fleet| fleet.registry.view(t0(), &id).unwrap().terms;
    assert_eq!(terms(&fleet).score, 500, "reputation only");
    // The report claims 50 Mbit/s and 20 ms: only its load counts (4 cores at 25%).
    fleet.report(t0(), 0, healthy());
    let t = terms(&fleet);
    assert_eq!((t.bandwidth, t.latency, t.compute), (0, 0, 3_750));
    // The probes see what the report claimed: the worked example of `health_score`.
    fleet.link(t0(), 0, 20_000, Some(50_000));
    let t = terms(&fleet);
    assert_eq!(
        (t.bandwidth, t.latency, t.compute, t.reputation),
        (5_000, 8_000, 3_750, 5_000)
    );
    assert_eq!(t.score, 5_650);
    let view = fleet.registry.view(t0(), &id).unwrap();
    assert_eq!(view.observed_latency_us, Some(20_000));
    assert!(view.contradicted.is_empty(), "{:?}", view.contradicted);
}

#[test]
fn a_node_claiming_a_better_link_than_seen_ranks_by_what_is_seen_and_is_marked() {
    let mut fleet = Fleet::new(2);
    let (liar, honest) = (fleet.id(0), fleet.id(1));
    fleet.report(
        t0(),
        0,
        TelemetrySample {
            bandwidth_kbps: Some(1_000_000),
            latency_us: Some(100),
            ..healthy()
        },
    );
    fleet.report(t0(), 1, healthy());
    fleet.link(t0(), 0, 30_000, Some(10_000));
    fleet.link(t0(), 1, 20_000, Some(50_000));
    assert_eq!(pick(&mut fleet, t0()), Some(honest));
    let view = fleet.registry.view(t0(), &liar).unwrap();
    assert_eq!(
        view.contradicted,
        [
            "reports 0.1 ms round trips, none seen under 30.0 ms",
            "reports 1000.0 Mbit/s, none seen over 10.0 Mbit/s"
        ]
    );
    // Each probe counts once; a pong signed by another key counts not at all.
    let pong = ambient_core::Pong::sign(&identity(0), &liar, 1);
    fleet.registry.probe_now(t0(), &liar, 1, 0);
    assert_eq!(
        fleet.registry.on_pong(
            t0(),
            t0(),
            liar,
            &ambient_core::Pong::sign(&identity(1), &liar, 1)
        ),
        Err(RegistryError::BadSignature)
    );
    assert_eq!(fleet.registry.on_pong(t0(), t0(), liar, &pong), Ok(()));
    assert_eq!(
        fleet.registry.on_pong(t0(), t0(), liar, &pong),
        Err(RegistryError::UnknownProbe)
    );
}

#[test]
fn nodes_are_probed_when_they_register_then_every_interval_while_online_one_in_n_probes_large() {
    let config = RegistryConfig {
        probe_interval: secs(5),
        bandwidth_probe_every: 3,
        ..RegistryConfig::default()
    };
    let mut fleet = Fleet::configured(config, 2, |_| {});
    let mut nonce = 0;
    let mut probes = |fleet: &mut Fleet, at: Duration| {
        fleet
            .registry
            .probes(t0() + at, || {
                nonce += 1;
                nonce
            })
            .into_iter()
            .map(|p| (p.node, p.padding == LARGE_PADDING))
            .collect::<Vec<_>>()
    };
    let (a, b) = (fleet.id(0), fleet.id(1));
    // Both at once (in the order they registered), small: latency first.
    let mut first = probes(&mut fleet, secs(0));
    first.sort();
    let mut expected = vec![(a, false), (b, false)];
    expected.sort();
    assert_eq!(first, expected);
    assert_eq!(probes(&mut fleet, secs(4)), []);
    // Then one in three large, wherever each node's turn falls.
    let mut large = HashMap::<NodeId, Vec<bool>>::new();
    for k in 1..=6 {
        for (node, big) in probes(&mut fleet, secs(5 * k)) {
            large.entry(node).or_default().push(big);
        }
        fleet.report(t0() + secs(5 * k), 0, healthy());
        fleet.report(t0() + secs(5 * k), 1, healthy());
    }
    for node in [a, b] {
        let seen = &large[&node];
        assert_eq!(seen.len(), 6);
        assert_eq!(seen.iter().filter(|l| **l).count(), 2, "{seen:?}");
    }
    // Node 1 said it went offline: it is skipped, and probed again once it is back.
    fleet.registry.on_status(t0() + secs(31), b, false);
    assert_eq!(probes(&mut fleet, secs(35)).len(), 1);
    fleet.registry.on_status(t0() + secs(36), b, true);
    fleet.report(t0() + secs(36), 0, healthy());
    fleet.report(t0() + secs(36), 1, healthy());
    assert_eq!(probes(&mut fleet, secs(40)).len(), 2);
}

#[test]
fn a_node_that_joins_later_is_probed_at_the_next_call_ahead_of_those_due_later() {
    let mut fleet = Fleet::new(1);
    let _ = fleet.registry.probes(t0(), || 1);
    let late = identity(9);
    let signed = sign_announce(&late, announce(&late));
    let at = t0() + secs(1);
    fleet.registry.on_announce(at, &signed).unwrap();
    let due: Vec<NodeId> = fleet
        .registry
        .probes(at, || 2)
        .iter()
        .map(|p| p.node)
        .collect();
    assert_eq!(due, [late.node_id()]);
}

#[test]
fn a_burst_of_due_probes_is_spread_over_calls_with_few_large_ones_each() {
    let config = RegistryConfig {
        bandwidth_probe_every: 1,
        joins_per_s: 1_000,
        ..RegistryConfig::default()
    };
    let mut fleet = Fleet::configured(config, 300, |_| {});
    let first = fleet.registry.probes(t0(), || 1);
    assert_eq!(first.len(), probes::MAX_PROBES_PER_CALL);
    assert_eq!(
        fleet.registry.probes(t0(), || 1).len(),
        300 - probes::MAX_PROBES_PER_CALL
    );
    // Every probe after the first is large: at most a few per call, the rest small.
    let at = t0() + RegistryConfig::default().probe_interval;
    let second = fleet.registry.probes(at, || 1);
    let large = second.iter().filter(|p| p.padding > 0).count();
    assert_eq!(large, probes::MAX_LARGE_PER_CALL);
}

#[test]
fn a_reannounce_updates_attributes_but_keeps_the_record() {
    let mut fleet = Fleet::new(1);
    let id = fleet.id(0);
    fleet.registry.record(t0(), &id, Outcome::Verified);
    fleet.reannounce(t0(), 0, |a| {
        a.cores = 8;
        a.labels.push("gpu".parse().unwrap()).unwrap();
    });
    let view = fleet.registry.view(t0(), &id).unwrap();
    assert_eq!(
        (view.cores, view.labels.clone(), view.reputation.verified),
        (8, vec!["gpu".to_owned()], 1)
    );
    let req = Requirements {
        labels: vec!["gpu".into()],
        ..Default::default()
    };
    assert_eq!(
        fleet.registry.select(t0(), &req, Strategy::Weighted, &[]),
        Some(id)
    );
}

#[test]
fn views_list_every_node_in_id_order_and_serialize() {
    let fleet = Fleet::new(4);
    let views = fleet.registry.views(t0());
    let ids: Vec<NodeId> = views.iter().map(|v| v.node).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    assert_eq!(ids.len(), 4);
    let json = serde_json::to_value(&views[0]).unwrap();
    assert_eq!(json["engine"], "wasmtime");
    assert_eq!(json["breaker"], "Closed");
    let back: NodeView = serde_json::from_value(json).unwrap();
    assert_eq!(back, views[0]);
}

#[test]
fn signed_telemetry_round_trips_through_the_wire_types() {
    // Guards the fixtures: what they sign is what `on_telemetry` verifies.
    let mut fleet = Fleet::new(1);
    let signed: SignedTelemetry = fleet.telemetry(0, healthy());
    let mut tampered = signed.clone();
    tampered.telemetry.sample.temp_millic = Some(20_000);
    assert_eq!(
        fleet.registry.on_telemetry(t0(), &tampered),
        Err(RegistryError::BadSignature)
    );
    fleet.registry.on_telemetry(t0(), &signed).unwrap();
}

#[test]
fn the_fuel_rate_placement_counts_on_is_the_announced_one_capped_at_twice_what_runs_showed() {
    let mut fleet = Fleet::with(2, |a| a.fuel_per_s = NonZeroU64::new(1_000_000_000));
    fleet.reannounce(t0(), 1, |a| a.fuel_per_s = None);
    let (id, quiet) = (fleet.id(0), fleet.id(1));
    let rates = |fleet: &Fleet, id| {
        let v = fleet.registry.view(t0(), &id).unwrap();
        (v.fuel_per_s, v.announced_fuel_per_s, v.observed_fuel_per_s)
    };
    assert_eq!(
        rates(&fleet, id),
        (Some(1_000_000_000), Some(1_000_000_000), None)
    );
    // A small run says nothing of speed: messages and instantiation set its time.
    fleet
        .registry
        .observe_run(&id, OBSERVED_MIN_FUEL - 1, Duration::from_secs(1));
    assert_eq!(rates(&fleet, id).2, None);
    // 2·10^8 fuel answered after a second: a fifth of the claim, so the claim gives way
    // to twice what was seen.
    fleet
        .registry
        .observe_run(&id, 200_000_000, Duration::from_secs(1));
    assert_eq!(
        rates(&fleet, id),
        (Some(400_000_000), Some(1_000_000_000), Some(200_000_000))
    );
    // Within a factor 2 of the claim (an honest node's round trip and compile): the claim
    // stands. A slower run later does not lower the best one.
    for ms in [330, 2_000] {
        fleet
            .registry
            .observe_run(&id, 200_000_000, Duration::from_millis(ms));
    }
    assert_eq!(
        rates(&fleet, id),
        (Some(1_000_000_000), Some(1_000_000_000), Some(606_060_606))
    );
    // A node that announced no rate is known by what it was seen to do.
    assert_eq!(rates(&fleet, quiet), (None, None, None));
    fleet
        .registry
        .observe_run(&quiet, 50_000_000, Duration::from_millis(500));
    assert_eq!(
        rates(&fleet, quiet),
        (Some(100_000_000), None, Some(100_000_000))
    );
}
