//! Properties that must hold for every input, checked with proptest.

mod common;

use ambient_core::{
    Abi, Admission, Announce, Assignment, Breaker, BreakerState, CONTESTED_LEAD, DecodeError,
    Digest, Engine, Envelope, Exit, Limits, MAX_FRAME_BYTES, Message, NodeId, Ping, Pong, Probe,
    Quorum, Receipt, Refusal, Report, ReportBody, Reputation, SCORE_SCALE, SafetyPolicy,
    ScoreConfig, SignedAnnounce, SignedReceipt, SignedRefusal, SignedTelemetry, TaskId, Telemetry,
    TelemetrySample, ThrottleFlags, TripReason, health_score, quorum,
};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

// --- strategies for the field types ---

fn node_id() -> impl Strategy<Value = NodeId> {
    any::<[u8; 16]>().prop_map(NodeId)
}

fn digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Digest)
}

fn signature() -> impl Strategy<Value = [u8; 64]> {
    (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(a, b)| {
        let mut s = [0; 64];
        s[..32].copy_from_slice(&a);
        s[32..].copy_from_slice(&b);
        s
    })
}

fn task_id() -> impl Strategy<Value = TaskId> {
    "[A-Za-z0-9._-]{1,64}".prop_map(|s| TaskId::new(&s).expect("the regex only makes valid ids"))
}

/// Any text, cut at a character boundary to at most `N` bytes.
fn text<const N: usize>() -> impl Strategy<Value = heapless::String<N>> {
    any::<String>().prop_map(|s| {
        let mut out = heapless::String::new();
        for c in s.chars() {
            if out.push(c).is_err() {
                break;
            }
        }
        out
    })
}

/// Byte fields borrow from the frame, so a generated message borrows from leaked bytes:
/// a few hundred small vectors per test run.
fn bytes(max: usize) -> impl Strategy<Value = &'static [u8]> {
    vec(any::<u8>(), 0..=max).prop_map(|v| &*v.leak())
}

fn engine() -> impl Strategy<Value = Engine> {
    prop_oneof![
        Just(Engine::Wasmtime),
        Just(Engine::WasmEdge),
        Just(Engine::WasmtimePulley)
    ]
}

fn exit() -> impl Strategy<Value = Exit> {
    prop_oneof![
        Just(Exit::Ok),
        Just(Exit::Trapped),
        Just(Exit::OutOfFuel),
        Just(Exit::TimedOut),
        Just(Exit::OutOfMemory),
        Just(Exit::Rejected),
        any::<i32>().prop_map(Exit::ExitStatus),
    ]
}

fn limits() -> impl Strategy<Value = Limits> {
    (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(memory_bytes, timeout_ms, fuel)| Limits {
        memory_bytes,
        timeout_ms,
        fuel,
    })
}

fn breaker_state() -> impl Strategy<Value = BreakerState> {
    prop_oneof![
        Just(BreakerState::Closed),
        Just(BreakerState::Open),
        Just(BreakerState::HalfOpen)
    ]
}

fn sample() -> impl Strategy<Value = TelemetrySample> {
    (
        (
            option::of(any::<u32>()),
            option::of(any::<u32>()),
            option::of(any::<u16>()),
        ),
        (
            option::of(any::<u64>()),
            option::of(any::<i32>()),
            any::<u8>(),
        ),
        (any::<u16>(), any::<u32>(), breaker_state(), any::<bool>()),
    )
        .prop_map(
            |((bw, lat, load), (mem, temp, throttle), (running, errors, breaker, simulated))| {
                TelemetrySample {
                    bandwidth_kbps: bw,
                    latency_us: lat,
                    cpu_load_permille: load,
                    mem_free_bytes: mem,
                    temp_millic: temp,
                    throttle: ThrottleFlags(throttle),
                    tasks_running: running,
                    errors,
                    breaker,
                    simulated,
                }
            },
        )
}

/// Samples near the seed thresholds, so that both breaching and clean ones are common.
fn device_sample() -> impl Strategy<Value = TelemetrySample> {
    (
        option::of(60_000i32..95_000),
        option::of(0u32..150_000),
        prop_oneof![4 => Just(0u8), 1 => 0u8..16],
    )
        .prop_map(|(temp, latency, throttle)| TelemetrySample {
            temp_millic: temp,
            latency_us: latency,
            throttle: ThrottleFlags(throttle),
            ..Default::default()
        })
}

fn trip_reason() -> impl Strategy<Value = TripReason> {
    prop_oneof![
        (any::<i32>(), any::<i32>()).prop_map(|(temp_millic, max_millic)| TripReason::Overheated {
            temp_millic,
            max_millic
        }),
        any::<u8>().prop_map(|f| TripReason::Throttled {
            flags: ThrottleFlags(f)
        }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(latency_us, max_us)| TripReason::LatencyHigh { latency_us, max_us }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(errors, max)| TripReason::TooManyErrors { errors, max }),
        Just(TripReason::ProbeFailed),
    ]
}

fn receipt() -> impl Strategy<Value = Receipt> {
    (
        (task_id(), any::<u16>(), node_id()),
        (digest(), digest(), digest()),
        (any::<u64>(), limits(), engine(), exit()),
    )
        .prop_map(
            |(
                (task_id, attempt, node),
                (module, input, output),
                (fuel_used, limits, engine, exit),
            )| {
                Receipt {
                    task_id,
                    attempt,
                    node,
                    module,
                    input,
                    output,
                    fuel_used,
                    limits,
                    engine,
                    exit,
                }
            },
        )
}

fn announce() -> impl Strategy<Value = SignedAnnounce> {
    (
        (
            node_id(),
            any::<[u8; 32]>(),
            text::<16>(),
            any::<u16>(),
            any::<u64>(),
        ),
        (
            engine(),
            text::<16>(),
            vec(text::<32>(), 0..=8),
            option::of(text::<24>()),
            any::<u16>(),
            option::of(any::<core::num::NonZeroU64>()),
        ),
        signature(),
    )
        .prop_map(
            |(
                (node, public_key, arch, cores, mem_total_bytes),
                (engine, agent_version, labels, profile, max_concurrency, fuel_per_s),
                signature,
            )| {
                let labels = labels.into_iter().collect::<heapless::Vec<_, 8>>();
                SignedAnnounce {
                    announce: Announce {
                        node,
                        public_key,
                        arch,
                        cores,
                        mem_total_bytes,
                        engine,
                        agent_version,
                        labels,
                        profile,
                        max_concurrency,
                        fuel_per_s,
                    },
                    signature,
                }
            },
        )
}

fn refusal() -> impl Strategy<Value = Refusal> {
    prop_oneof![
        trip_reason().prop_map(Refusal::Breaker),
        Just(Refusal::Busy),
        Just(Refusal::ModuleUnavailable),
        Just(Refusal::ShuttingDown),
    ]
}

fn message() -> impl Strategy<Value = Message<'static>> {
    prop_oneof![
        announce().prop_map(Message::Announce),
        (node_id(), any::<u64>(), any::<u64>(), sample(), signature()).prop_map(
            |(node, seq, boot_id, sample, signature)| {
                Message::Telemetry(SignedTelemetry {
                    telemetry: Telemetry {
                        node,
                        seq,
                        boot_id,
                        sample,
                    },
                    signature,
                })
            }
        ),
        (
            task_id(),
            any::<u16>(),
            digest(),
            prop_oneof![Just(Abi::Plain), Just(Abi::Wasi)],
            text::<64>(),
            limits(),
            bytes(64),
            (
                any::<[u8; 32]>(),
                proptest::collection::vec(digest(), 0..=ambient_core::MAX_BATCH),
            ),
            signature(),
        )
            .prop_map(
                |(
                    task_id,
                    attempt,
                    module,
                    abi,
                    entry,
                    limits,
                    input,
                    (coordinator, batch),
                    signature,
                )| {
                    Message::Assign(Assignment {
                        task_id,
                        attempt,
                        module,
                        abi,
                        entry,
                        limits,
                        input,
                        coordinator,
                        batch: batch.into_iter().collect(),
                        signature,
                    })
                }
            ),
        (
            task_id(),
            any::<u16>(),
            node_id(),
            receipt(),
            signature(),
            bytes(64),
            text::<160>()
        )
            .prop_map(
                |(task_id, attempt, node, receipt, signature, output, message)| {
                    let body = ReportBody::Executed {
                        receipt: SignedReceipt { receipt, signature },
                        output,
                        message,
                    };
                    Message::Report(Report {
                        task_id,
                        attempt,
                        node,
                        body,
                    })
                }
            ),
        (task_id(), any::<u16>(), node_id(), refusal(), signature()).prop_map(
            |(task_id, attempt, node, refusal, signature)| {
                Message::Report(Report {
                    task_id,
                    attempt,
                    node,
                    body: ReportBody::Refused(SignedRefusal { refusal, signature }),
                })
            }
        ),
        (node_id(), any::<u64>(), bytes(256)).prop_map(|(node, nonce, padding)| Message::Ping(
            Ping {
                node,
                nonce,
                padding
            }
        )),
        any::<u64>().prop_map(|nonce| Message::Pong(Pong {
            nonce,
            signer: [3; 32],
            signature: [4; 64]
        })),
        (node_id(), bytes(256), any::<u64>()).prop_map(|(node, padding, nonce)| Message::Probe(
            Probe {
                node,
                padding,
                nonce
            }
        )),
    ]
}

fn score_config() -> impl Strategy<Value = ScoreConfig> {
    (any::<u32>(), any::<u32>(), any::<u16>()).prop_map(
        |(bandwidth_ref_kbps, latency_max_us, cores_ref)| ScoreConfig {
            bandwidth_ref_kbps,
            latency_max_us,
            cores_ref,
        },
    )
}

fn reputation() -> impl Strategy<Value = Reputation> {
    (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
        |(completed, failed, verified, disputed)| Reputation {
            completed,
            failed,
            verified,
            disputed,
        },
    )
}

/// Reputations with `failed + 10·disputed <= verified` (up to 1,000 verified), i.e. a score of at
/// least 0.5.
fn good_standing() -> impl Strategy<Value = Reputation> {
    (0u32..1_000)
        .prop_flat_map(|verified| (Just(verified), 0..=verified))
        .prop_flat_map(|(verified, bad)| (Just(verified), 0..=bad / 10, Just(bad)))
        .prop_map(|(verified, disputed, bad)| Reputation {
            verified,
            disputed,
            failed: bad - 10 * disputed,
            completed: 0,
        })
}

/// The breaker's inputs, at arbitrary (not necessarily increasing) times.
#[derive(Debug, Clone)]
enum Step {
    Observe(u64, TelemetrySample),
    Admit(u64),
    Record(u64, bool),
}

fn step() -> impl Strategy<Value = Step> {
    // Times cluster within a few cool-downs so transitions happen, with some arbitrary ones.
    let time = prop_oneof![4 => 0u64..2_000_000, 1 => any::<u64>()];
    prop_oneof![
        3 => (time.clone(), device_sample()).prop_map(|(t, s)| Step::Observe(t, s)),
        2 => time.clone().prop_map(Step::Admit),
        2 => (time, any::<bool>()).prop_map(|(t, ok)| Step::Record(t, ok)),
    ]
}

// --- health score ---

proptest! {
    #[test]
    fn the_health_score_and_every_term_stay_within_scale(
        config in score_config(), sample in sample(), cores in any::<u16>(), rep in any::<u32>(),
    ) {
        let t = health_score(&config, &sample, cores, rep);
        for term in [t.bandwidth, t.latency, t.compute, t.reputation, t.score] {
            prop_assert!(term <= SCORE_SCALE, "{t:?}");
        }
    }

    #[test]
    fn more_bandwidth_never_lowers_the_health_score(
        config in score_config(), sample in sample(), cores in any::<u16>(), rep in any::<u32>(),
        a in any::<u32>(), b in any::<u32>(),
    ) {
        let (lo, hi) = (a.min(b), a.max(b));
        let at = |bw| health_score(&config, &TelemetrySample { bandwidth_kbps: bw, ..sample.clone() }, cores, rep).score;
        prop_assert!(at(Some(hi)) >= at(Some(lo)));
        prop_assert!(at(Some(lo)) >= at(None), "an unknown bandwidth is never rewarded");
    }

    #[test]
    fn more_latency_never_raises_the_health_score(
        config in score_config(), sample in sample(), cores in any::<u16>(), rep in any::<u32>(),
        a in any::<u32>(), b in any::<u32>(),
    ) {
        let (lo, hi) = (a.min(b), a.max(b));
        let at = |l| health_score(&config, &TelemetrySample { latency_us: l, ..sample.clone() }, cores, rep).score;
        prop_assert!(at(Some(hi)) <= at(Some(lo)));
        prop_assert!(at(None) <= at(Some(hi)), "an unknown latency is never rewarded");
    }

    #[test]
    fn more_load_never_raises_the_health_score(
        config in score_config(), sample in sample(), cores in any::<u16>(), rep in any::<u32>(),
        a in any::<u16>(), b in any::<u16>(),
    ) {
        let (lo, hi) = (a.min(b), a.max(b));
        let at = |l| health_score(&config, &TelemetrySample { cpu_load_permille: l, ..sample.clone() }, cores, rep).score;
        prop_assert!(at(Some(hi)) <= at(Some(lo)));
        prop_assert!(at(None) <= at(Some(hi)), "an unknown load is never rewarded");
    }

    #[test]
    fn more_reputation_or_more_cores_never_lowers_the_health_score(
        config in score_config(), sample in sample(),
        cores in any::<u16>(), more_cores in any::<u16>(), rep in any::<u32>(), more_rep in any::<u32>(),
    ) {
        let base = health_score(&config, &sample, cores, rep).score;
        prop_assert!(health_score(&config, &sample, cores, rep.max(more_rep)).score >= base);
        prop_assert!(health_score(&config, &sample, cores.max(more_cores), rep).score >= base);
    }
}

#[test]
fn the_health_score_weights_are_four_three_two_one() {
    let config = ScoreConfig::default();
    let perfect = TelemetrySample {
        bandwidth_kbps: Some(config.bandwidth_ref_kbps),
        latency_us: Some(0),
        cpu_load_permille: Some(0),
        ..Default::default()
    };
    let cores = config.cores_ref;
    assert_eq!(
        health_score(&config, &perfect, cores, SCORE_SCALE).score,
        SCORE_SCALE
    );
    assert_eq!(health_score(&config, &perfect, cores, 0).score, 9_000);
    let unknown = TelemetrySample::default();
    assert_eq!(
        health_score(&config, &unknown, cores, SCORE_SCALE).score,
        1_000
    );
    let only_bandwidth = TelemetrySample {
        bandwidth_kbps: perfect.bandwidth_kbps,
        ..unknown
    };
    assert_eq!(
        health_score(&config, &only_bandwidth, cores, 0).score,
        4_000
    );
}

// --- reputation ---

proptest! {
    #[test]
    fn the_reputation_score_stays_within_scale(r in reputation()) {
        prop_assert!(r.score() <= SCORE_SCALE);
    }

    #[test]
    fn a_dispute_never_raises_and_a_verified_result_never_lowers_the_reputation(r in reputation()) {
        let disputed = Reputation { disputed: r.disputed.saturating_add(1), ..r };
        let verified = Reputation { verified: r.verified.saturating_add(1), ..r };
        let failed = Reputation { failed: r.failed.saturating_add(1), ..r };
        prop_assert!(disputed.score() <= r.score());
        prop_assert!(failed.score() <= r.score());
        prop_assert!(verified.score() >= r.score());
        prop_assert!(disputed.score() <= failed.score(), "a dispute costs at least a failure");
    }

    /// For any node at least as trusted as a newcomer (score ≥ 0.5), a dispute costs more than
    /// a verified result earns. (Below 0.5 this need not hold: at 2 good against 1,000 bad,
    /// one more verified result moves the score further than one more dispute; see the report.)
    #[test]
    fn a_dispute_lowers_the_reputation_more_than_a_verified_result_raises_it(
        r in good_standing(), completed in any::<u32>(),
    ) {
        let r = Reputation { completed, ..r };
        prop_assert!(r.score() >= SCORE_SCALE / 2);
        let Reputation { verified, disputed, .. } = r;
        let drop = r.score() - Reputation { disputed: disputed + 1, ..r }.score();
        let rise = Reputation { verified: verified + 1, ..r }.score() - r.score();
        prop_assert!(drop > rise, "{r:?}: a dispute costs {drop}, a verified result earns {rise}");
    }

    #[test]
    fn a_dispute_weighs_exactly_ten_failures(r in reputation()) {
        prop_assume!(r.failed < u32::MAX - 10 && r.disputed < u32::MAX);
        let disputed = Reputation { disputed: r.disputed + 1, ..r };
        let failed_ten = Reputation { failed: r.failed + 10, ..r };
        prop_assert_eq!(disputed.score(), failed_ten.score());
    }
}

#[test]
fn a_new_node_starts_at_half_and_completed_count_alone_does_not_move_it() {
    assert_eq!(Reputation::default().score(), SCORE_SCALE / 2);
    assert_eq!(
        Reputation {
            completed: 1_000,
            ..Default::default()
        }
        .score(),
        SCORE_SCALE / 2
    );
}

// --- the breaker ---

proptest! {
    #[test]
    fn the_breaker_never_admits_right_after_a_breaching_sample(
        policy_is_pi in any::<bool>(), steps in vec(step(), 1..60), after in vec(step(), 0..8),
    ) {
        let policy = if policy_is_pi { SafetyPolicy::raspberry_pi() } else { SafetyPolicy::default() };
        let mut b = Breaker::new(policy);
        let mut probes_out = 0u32;
        for s in steps.into_iter().chain(after) {
            match s {
                Step::Observe(t, sample) => {
                    b.observe(t, &sample);
                    if let Some(reason) = policy.breach(&sample, 0) {
                        prop_assert_eq!(b.state(), BreakerState::Open);
                        prop_assert!(!b.is_admitting(t));
                        prop_assert!(matches!(b.admit(t), Admission::Refuse(_)), "admitted after {:?}", reason);
                        // And at any later time, until the next sample.
                        prop_assert!(matches!(b.admit(t.saturating_add(10 * policy.max_cooldown_ms)), Admission::Refuse(_)));
                    }
                }
                Step::Admit(t) => {
                    let before = b.state();
                    match b.admit(t) {
                        Admission::Admit => prop_assert_eq!(b.state(), BreakerState::Closed),
                        Admission::Probe => {
                            prop_assert_eq!(b.state(), BreakerState::HalfOpen);
                            probes_out += 1;
                            prop_assert_eq!(probes_out, 1, "a second probe in one half-open period");
                        }
                        Admission::Refuse(_) => prop_assert_ne!(before, BreakerState::Closed, "a closed breaker refused"),
                    }
                }
                Step::Record(t, ok) => {
                    b.record(t, ok);
                }
            }
            if b.state() != BreakerState::HalfOpen {
                probes_out = 0;
            }
            prop_assert_eq!(b.reason().is_none(), b.state() == BreakerState::Closed);
        }
    }
}

// --- the wire ---

proptest! {
    #[test]
    fn every_message_round_trips_through_an_envelope(message in message()) {
        let envelope = Envelope::new(message);
        let frame = envelope.to_vec();
        prop_assert_eq!(Envelope::decode(&frame), Ok(envelope));
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(frame in vec(any::<u8>(), 0..512)) {
        let _ = Envelope::decode(&frame);
    }

    #[test]
    fn decoding_a_corrupted_frame_never_panics(message in message(), flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in any::<prop::sample::Index>()) {
        let mut frame = Envelope::new(message).to_vec();
        for (i, x) in flips {
            let i = i.index(frame.len());
            frame[i] ^= x;
        }
        let _ = Envelope::decode(&frame);
        let cut = cut.index(frame.len());
        let _ = Envelope::decode(&frame[..cut]);
    }

    #[test]
    fn a_valid_frame_with_extra_bytes_is_rejected(message in message(), extra in vec(any::<u8>(), 1..8)) {
        let mut frame = Envelope::new(message).to_vec();
        frame.extend_from_slice(&extra);
        prop_assert_eq!(Envelope::decode(&frame), Err(DecodeError::TrailingBytes));
    }

    #[test]
    fn another_protocol_version_is_rejected(message in message(), version in any::<u8>()) {
        prop_assume!(version != ambient_core::PROTOCOL_VERSION);
        let mut frame = Envelope::new(message).to_vec();
        frame[0] = version;
        prop_assert_eq!(Envelope::decode(&frame), Err(DecodeError::UnsupportedVersion { found: version }));
    }
}

#[test]
fn an_oversize_frame_is_rejected_before_decoding() {
    // A valid Pong followed by padding: if the size check came after decoding this would be
    // `TrailingBytes` instead.
    let mut frame = Envelope::new(Message::Pong(Pong {
        nonce: 1,
        signer: [3; 32],
        signature: [4; 64],
    }))
    .to_vec();
    frame.resize(MAX_FRAME_BYTES + 1, 0);
    assert_eq!(
        Envelope::decode(&frame),
        Err(DecodeError::FrameTooLarge {
            len: MAX_FRAME_BYTES + 1
        })
    );
    frame.truncate(MAX_FRAME_BYTES);
    assert_eq!(
        Envelope::decode(&frame),
        Err(DecodeError::TrailingBytes),
        "exactly the limit is decoded"
    );
}

#[test]
fn an_input_over_its_limit_is_rejected_even_inside_the_frame_limit() {
    let input = vec![0u8; ambient_core::MAX_INPUT_BYTES + 1];
    let mut assignment = common::assignment();
    assignment.input = &input;
    let frame = Envelope::new(Message::Assign(assignment)).to_vec();
    assert!(frame.len() <= MAX_FRAME_BYTES);
    assert_eq!(
        Envelope::decode(&frame),
        Err(DecodeError::FieldTooLarge {
            field: "input",
            len: input.len(),
            max: ambient_core::MAX_INPUT_BYTES
        })
    );
}

#[test]
fn an_empty_frame_is_malformed() {
    assert_eq!(Envelope::decode(&[]), Err(DecodeError::Malformed));
    assert_eq!(
        Envelope::decode(&[ambient_core::PROTOCOL_VERSION]),
        Err(DecodeError::Malformed)
    );
}

#[test]
fn a_task_id_outside_the_alphabet_is_rejected_on_decode() {
    // postcard checks the length of a task id but not its characters; decode must.
    let frame = Envelope::new(Message::Assign(common::assignment())).to_vec();
    let mut bad = frame.clone();
    let at = frame
        .windows(8)
        .position(|w| w == b"task-001")
        .expect("the id is in the frame");
    bad[at + 4] = b'/';
    assert_eq!(Envelope::decode(&bad), Err(DecodeError::Malformed));
}

// --- quorum ---

/// A pool large enough for any vote.
const LARGE_POOL: usize = usize::MAX;

proptest! {
    #[test]
    fn a_quorum_accepts_a_strict_majority_that_leads_any_dissent_decisively(
        k in 1usize..9,
        raw in vec((0u8..3, 0u64..2, prop_oneof![Just(Exit::Ok), Just(Exit::Trapped)]), 0..9),
    ) {
        let votes: Vec<(Digest, u64, Exit)> =
            raw.into_iter().take(k).map(|(d, fuel, exit)| (Digest([d; 32]), fuel, exit)).collect();
        let count = |v: &(Digest, u64, Exit)| votes.iter().filter(|w| *w == v).count();
        let best = votes.iter().map(count).max().unwrap_or(0);
        let left = k - votes.len();
        match quorum(&votes, k, LARGE_POOL) {
            Quorum::Accepted { index, agreeing } => {
                prop_assert!(2 * agreeing > k, "{agreeing} of {k} is not a strict majority");
                prop_assert_eq!(count(&votes[index]), agreeing);
                prop_assert_eq!(agreeing, best);
                let runner_up = votes.iter().filter(|v| **v != votes[index]).map(count).max();
                if let Some(r) = runner_up {
                    prop_assert!(agreeing - r >= CONTESTED_LEAD, "{agreeing} against {r} is contested");
                }
            }
            Quorum::Pending => {
                prop_assert!(left > 0, "every replica reported");
                prop_assert!(2 * (best + left) > k, "a majority is no longer possible");
            }
            Quorum::Split { decidable_at } => {
                let unanimous = best == votes.len();
                prop_assert!(left == 0 || 2 * (best + left) <= k || !unanimous);
                prop_assert!(!(unanimous && 2 * best > k), "an unanimous majority is accepted");
                prop_assert!(decidable_at > k);
                // The leader taking every new replica decides at `decidable_at`, not before.
                let leader = votes.iter().copied().max_by_key(count).expect("a split has votes");
                let mut more = votes.clone();
                more.resize(decidable_at, leader);
                let decided = matches!(quorum(&more, decidable_at, LARGE_POOL), Quorum::Accepted { .. });
                prop_assert!(decided, "every new replica agreeing decides at {}", decidable_at);
                more.truncate(decidable_at - 1);
                let early = matches!(quorum(&more, decidable_at - 1, LARGE_POOL), Quorum::Accepted { .. });
                prop_assert!(!early, "decided before {}", decidable_at);
            }
            Quorum::Undecidable => prop_assert!(false, "a large pool can always escalate"),
        }
    }
}

#[test]
fn replicas_agreeing_on_output_but_not_fuel_do_not_agree() {
    let out = Digest([1; 32]);
    let votes = [
        (out, 100, Exit::Ok),
        (out, 101, Exit::Ok),
        (out, 102, Exit::Ok),
    ];
    assert_eq!(
        quorum(&votes, 3, LARGE_POOL),
        Quorum::Split { decidable_at: 6 }
    );
    assert_eq!(
        quorum(&votes[..2], 3, LARGE_POOL),
        Quorum::Split { decidable_at: 5 },
        "they disagree, and a third replica cannot make either lead by three"
    );
    assert_eq!(
        quorum(&[votes[0], votes[0]], 3, LARGE_POOL),
        Quorum::Accepted {
            index: 0,
            agreeing: 2
        },
        "two agreeing of three, the third still out, is unanimous so far"
    );
    assert_eq!(
        quorum(&[votes[0], votes[0], votes[1]], 3, LARGE_POOL),
        Quorum::Split { decidable_at: 5 },
        "two against one is contested: more replicas decide"
    );
}

#[test]
fn a_contested_vote_is_accepted_once_it_leads_by_three() {
    assert_eq!(CONTESTED_LEAD, 3);
    let (a, b) = (Digest([1; 32]), Digest([2; 32]));
    let votes = |s: &str| -> Vec<_> {
        s.chars()
            .map(|c| (if c == 'a' { a } else { b }, 1, Exit::Ok))
            .collect()
    };
    let accepted = |agreeing| Quorum::Accepted { index: 0, agreeing };
    let split = |decidable_at| Quorum::Split { decidable_at };
    assert_eq!(
        quorum(&votes("ab"), 2, LARGE_POOL),
        split(5),
        "three more agreeing would lead by three"
    );
    assert_eq!(
        quorum(&votes("aba"), 3, LARGE_POOL),
        split(5),
        "2 to 1 is contested"
    );
    assert_eq!(quorum(&votes("abaa"), 5, LARGE_POOL), Quorum::Pending);
    assert_eq!(quorum(&votes("abaaa"), 5, LARGE_POOL), accepted(4));
    assert_eq!(
        quorum(&votes("abbaa"), 5, LARGE_POOL),
        split(7),
        "a majority, not a lead"
    );
    assert_eq!(quorum(&votes("abbaaa"), 7, LARGE_POOL), Quorum::Pending);
    assert_eq!(quorum(&votes("abbaaaa"), 7, LARGE_POOL), accepted(5));
    assert_eq!(quorum(&votes("abbaaab"), 7, LARGE_POOL), split(9));
    assert_eq!(
        quorum(&votes("abbaab"), 7, LARGE_POOL),
        split(9),
        "no lead of 3 is left"
    );
}

#[test]
fn a_pool_too_small_for_a_lead_of_three_decides_by_the_lead_it_can_reach() {
    let (a, b, c) = (Digest([1; 32]), Digest([2; 32]), Digest([3; 32]));
    let vote = |d| (d, 1, Exit::Ok);
    assert_eq!(
        quorum(&[vote(a), vote(b)], 2, 3),
        Quorum::Split { decidable_at: 3 },
        "three nodes: a third replica decides by majority"
    );
    assert_eq!(
        quorum(&[vote(a), vote(b), vote(a)], 3, 3),
        Quorum::Accepted {
            index: 0,
            agreeing: 2
        }
    );
    assert_eq!(
        quorum(&[vote(a), vote(b)], 2, 4),
        Quorum::Split { decidable_at: 4 },
        "four nodes: three to one leads by two"
    );
    assert_eq!(
        quorum(&[vote(a), vote(b), vote(c)], 3, 3),
        Quorum::Undecidable
    );
    assert_eq!(quorum(&[vote(a), vote(b)], 2, 2), Quorum::Undecidable);
}

#[test]
fn two_of_four_is_not_a_majority() {
    let (a, b) = (Digest([1; 32]), Digest([2; 32]));
    let votes = [
        (a, 1, Exit::Ok),
        (a, 1, Exit::Ok),
        (b, 1, Exit::Ok),
        (b, 1, Exit::Ok),
    ];
    assert_eq!(
        quorum(&votes, 4, LARGE_POOL),
        Quorum::Split { decidable_at: 7 }
    );
    assert_eq!(quorum(&votes[..2], 4, LARGE_POOL), Quorum::Pending);
    assert_eq!(
        quorum(&votes[..3], 4, LARGE_POOL),
        Quorum::Split { decidable_at: 5 },
        "contested: no lead of three is left"
    );
    assert_eq!(
        quorum(&[(a, 1, Exit::Ok); 3], 4, LARGE_POOL),
        Quorum::Accepted {
            index: 0,
            agreeing: 3
        }
    );
}
