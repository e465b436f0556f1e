//! An agent against a real broker (the embedded one; mosquitto where the broker restarts), with
//! the test playing the coordinator.

mod common;

use std::time::Duration;

use ambient_agent::Profile;
use ambient_core::{
    Abi, BreakerState, Envelope, Exit, Expected, Limits, Message, NodeId, Refusal, ReportBody,
    SignedAnnounce, SignedReceipt, SignedRefusal, SignedTelemetry, TripReason, sha3_256, topics,
    verify_message, verify_receipt,
};
use common::*;

/// What must outlive a test: its broker and its state directory.
type Keep = (EmbeddedBroker, tempfile::TempDir);

/// The usual setup: a state directory, the embedded broker, the test coordinator, and one agent
/// (configured by `tweak`) that has announced itself.
async fn rig(
    tweak: impl FnOnce(&mut ambient_agent::AgentConfig),
) -> (Coordinator, RunningAgent, SignedAnnounce, Keep) {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker().await;
    let mut coord = Coordinator::connect(&broker.url(), "coord").await;
    let agent = RunningAgent::start(&broker.url(), &dir.path().join("agent"), tweak);
    let announce = announce_of(&mut coord, &agent.node).await;
    (coord, agent, announce, (broker, dir))
}

fn leaf(node: &NodeId, seen: &Seen) -> Option<topics::NodeTopic> {
    match topics::parse_node(&seen.topic) {
        Some((n, leaf)) if n == *node => Some(leaf),
        _ => None,
    }
}

async fn announce_of(coord: &mut Coordinator, node: &NodeId) -> SignedAnnounce {
    coord
        .expect("the announce", |s| {
            if leaf(node, s)? != topics::NodeTopic::Announce {
                return None;
            }
            match Envelope::decode(&s.payload).ok()?.message {
                Message::Announce(a) => Some(a),
                _ => None,
            }
        })
        .await
}

/// The report for `task`, with its frame bytes.
async fn report_of(
    coord: &mut Coordinator,
    node: &NodeId,
    task: &str,
) -> (Vec<u8>, ReportBody<'static>) {
    coord
        .expect(&format!("the report of {task}"), |s| {
            if leaf(node, s)? != topics::NodeTopic::Results {
                return None;
            }
            let env = Envelope::decode(&s.payload).ok()?;
            let Message::Report(r) = env.message else {
                return None;
            };
            if r.task_id.as_str() != task {
                return None;
            }
            let body = match r.body {
                ReportBody::Executed {
                    receipt,
                    output,
                    message,
                } => ReportBody::Executed {
                    receipt,
                    output: output.to_vec().leak(),
                    message,
                },
                ReportBody::Refused(r) => ReportBody::Refused(r),
            };
            Some((s.payload.to_vec(), body))
        })
        .await
}

fn executed(body: ReportBody<'static>) -> (SignedReceipt, &'static [u8], String) {
    match body {
        ReportBody::Executed {
            receipt,
            output,
            message,
        } => (receipt, output, message.as_str().to_owned()),
        ReportBody::Refused(r) => panic!("expected an execution, got a refusal: {r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_comes_online_announces_itself_and_signs_its_telemetry() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker().await;
    let mut coord = Coordinator::connect(&broker.url(), "coord-announce").await;
    let agent = RunningAgent::start(&broker.url(), &dir.path().join("agent"), |c| {
        c.set_simulate(Profile::Pi5)
            .set_labels(["room-2", "gpu"])
            .unwrap();
    });
    let node = agent.node;

    coord
        .expect("status online", |s| {
            (leaf(&node, s)? == topics::NodeTopic::Status && &s.payload[..] == b"online")
                .then_some(())
        })
        .await;
    let announce = announce_of(&mut coord, &node).await;
    let a = &announce.announce;
    verify_message(&a.public_key, SignedAnnounce::TAG, a, &announce.signature)
        .expect("announce signature");
    assert_eq!(a.node, node);
    assert_eq!(NodeId::from_public_key(&a.public_key), node);
    assert_eq!(a.arch.as_str(), std::env::consts::ARCH);
    assert_eq!(
        (a.cores, a.mem_total_bytes),
        (4, 8 << 30),
        "the Pi 5 profile's cores and memory"
    );
    assert_eq!(a.profile.as_ref().map(|p| p.as_str()), Some("pi5"));
    assert_eq!(
        a.labels.iter().map(|l| l.as_str()).collect::<Vec<_>>(),
        ["room-2", "gpu"]
    );
    assert_eq!(a.max_concurrency, 4);
    // Measured on this machine, not simulated: the profile's readings are, its speed is not.
    assert!(
        a.fuel_per_s.is_some_and(|r| r.get() > 1_000_000),
        "the agent announces the fuel rate it measured: {:?}",
        a.fuel_per_s
    );

    // Telemetry is signed, numbered, simulated; once pongs come back it carries the latency.
    let mut last_seq = None;
    let measured = coord
        .expect("telemetry with a measured latency", |s| {
            if leaf(&node, s)? != topics::NodeTopic::Telemetry {
                return None;
            }
            let Message::Telemetry(t) = Envelope::decode(&s.payload).ok()?.message else {
                return None;
            };
            verify_message(
                &a.public_key,
                SignedTelemetry::TAG,
                &t.telemetry,
                &t.signature,
            )
            .expect("telemetry signature");
            assert!(t.telemetry.sample.simulated);
            assert!(t.telemetry.sample.temp_millic.is_some());
            if let Some(prev) = last_seq {
                assert!(t.telemetry.seq > prev, "seq increases");
            }
            last_seq = Some(t.telemetry.seq);
            t.telemetry
                .sample
                .latency_us
                .map(|l| (l, t.telemetry.sample))
        })
        .await;
    // The Pi 5 profile adds its 1 ms link on top of the loopback round trip.
    assert!(measured.0 >= 1_000, "{measured:?}");
    assert_eq!(measured.1.breaker, BreakerState::Closed);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_is_fetched_executed_and_reported_with_a_receipt_that_verifies() {
    let (mut coord, agent, announce, _keep) = rig(|_| {}).await;
    let node = agent.node;

    let module = wasm(REVERSE_WAT);
    let hash = coord.publish_module(&module).await;
    let limits = small_limits();
    let a = assignment(
        "reverse-1",
        hash,
        Abi::Plain,
        "reverse",
        b"edge devices",
        limits,
    );
    coord.assign(&node, &a).await;
    let (_, body) = report_of(&mut coord, &node, "reverse-1").await;
    let (receipt, output, message) = executed(body);
    assert_eq!(output, b"secived egde");
    assert_eq!(receipt.receipt.exit, Exit::Ok, "{message}");
    let expected = Expected {
        task_id: &a.task_id,
        attempt: 1,
        node,
        public_key: &announce.announce.public_key,
        module: hash,
        input: sha3_256(a.input),
        limits,
    };
    verify_receipt(&receipt, output, &expected).expect("receipt verifies");

    // The module is cached now, on disk too; the report leaves the outbox once acknowledged.
    assert!(
        agent
            .state_dir
            .join(format!("modules/{hash}.wasm"))
            .exists()
    );
    eventually("the outbox to empty", || agent.outbox_len() == 0).await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_digits_module_classifies_over_mqtt() {
    let module = ambient_agent::calibrate::DIGITS_WASM;
    let (mut coord, agent, _, _keep) = rig(|_| {}).await;
    let hash = coord.publish_module(module).await;
    let images: Vec<u8> = ambient_digits::heldout()
        .take(20)
        .flat_map(|(img, _)| img.iter().copied())
        .collect();
    let mut native = vec![0u8; 20];
    ambient_digits::classify_batch(&images, &mut native).unwrap();
    let limits = Limits {
        fuel: 1_000_000_000,
        ..small_limits()
    };
    coord
        .assign(
            &agent.node,
            &assignment("digits-1", hash, Abi::Plain, "classify", &images, limits),
        )
        .await;
    let (_, body) = report_of(&mut coord, &agent.node, "digits-1").await;
    let (receipt, output, _) = executed(body);
    assert_eq!(receipt.receipt.exit, Exit::Ok);
    assert_eq!(output, native);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_bytes_that_do_not_match_their_hash_make_the_module_unavailable() {
    let (mut coord, agent, _, _keep) = rig(|_| {}).await;
    let claimed = sha3_256(&wasm(REVERSE_WAT));
    coord.publish_module_as(claimed, &wasm(SPIN_WAT)).await;
    coord
        .assign(
            &agent.node,
            &assignment(
                "forged",
                claimed,
                Abi::Plain,
                "reverse",
                b"x",
                small_limits(),
            ),
        )
        .await;
    let (_, body) = report_of(&mut coord, &agent.node, "forged").await;
    assert!(
        matches!(body, ReportBody::Refused(r) if r.refusal == Refusal::ModuleUnavailable),
        "{body:?}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_never_arrives_is_unavailable_after_the_fetch_timeout() {
    let (mut coord, agent, _, _keep) = rig(|c| {
        c.set_module_fetch_timeout(Duration::from_millis(300));
    })
    .await;
    let nowhere = sha3_256(b"a module nobody published");
    // Two tasks waiting on the same module share one fetch and both get an answer.
    coord
        .assign(
            &agent.node,
            &assignment("missing-1", nowhere, Abi::Plain, "run", b"", small_limits()),
        )
        .await;
    coord
        .assign(
            &agent.node,
            &assignment("missing-2", nowhere, Abi::Plain, "run", b"", small_limits()),
        )
        .await;
    let node = agent.node;
    let mut answered = std::collections::BTreeMap::new();
    while answered.len() < 2 {
        let (task, refusal) = coord
            .expect("refusals of both tasks", |s| {
                if leaf(&node, s)? != topics::NodeTopic::Results {
                    return None;
                }
                let Message::Report(r) = Envelope::decode(&s.payload).ok()?.message else {
                    return None;
                };
                match r.body {
                    ReportBody::Refused(refusal) => {
                        Some((r.task_id.as_str().to_owned(), refusal.refusal))
                    }
                    ReportBody::Executed { .. } => None,
                }
            })
            .await;
        answered.insert(task, refusal);
    }
    for task in ["missing-1", "missing-2"] {
        assert_eq!(
            answered.get(task),
            Some(&Refusal::ModuleUnavailable),
            "{task}"
        );
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_module_is_rejected() {
    let (mut coord, agent, _, _keep) = rig(|c| {
        c.sandbox_mut().max_module_bytes = 64;
    })
    .await;
    let hash = coord.publish_module(&wasm(REVERSE_WAT)).await;
    coord
        .assign(
            &agent.node,
            &assignment("big", hash, Abi::Plain, "reverse", b"x", small_limits()),
        )
        .await;
    let (_, body) = report_of(&mut coord, &agent.node, "big").await;
    let (receipt, output, message) = executed(body);
    assert_eq!(receipt.receipt.exit, Exit::Rejected);
    assert!(output.is_empty());
    assert!(message.contains("byte limit"), "{message}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_on_the_tasks_topic_are_dropped_and_the_agent_keeps_working() {
    let (mut coord, agent, _, _keep) = rig(|_| {}).await;
    let node = agent.node;

    let pong = ambient_core::Pong::sign(&coordinator_identity(), &node, 1);
    let mut wrong_version = Envelope::new(Message::Pong(pong)).to_vec();
    wrong_version[0] = 99;
    let mut truncated = Envelope::new(Message::Assign(assignment(
        "t",
        sha3_256(b""),
        Abi::Plain,
        "e",
        b"abc",
        small_limits(),
    )))
    .to_vec();
    truncated.truncate(truncated.len() - 2);
    let frames: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"\x01 definitely not postcard".to_vec(),
        wrong_version,
        truncated,
        vec![1u8; ambient_core::MAX_FRAME_BYTES + 1],
        // A well-formed message of the wrong kind for this topic.
        Envelope::new(Message::Announce(announce_of_self(&node))).to_vec(),
    ];
    for f in frames {
        coord.send_raw(&node, f).await;
    }
    let hash = coord.publish_module(&wasm(REVERSE_WAT)).await;
    coord
        .assign(
            &node,
            &assignment(
                "after-garbage",
                hash,
                Abi::Plain,
                "reverse",
                b"ok",
                small_limits(),
            ),
        )
        .await;
    let (_, body) = report_of(&mut coord, &node, "after-garbage").await;
    assert_eq!(executed(body).1, b"ko");
    agent.shutdown().await;
}

fn announce_of_self(node: &NodeId) -> SignedAnnounce {
    SignedAnnounce {
        announce: ambient_core::Announce {
            node: *node,
            public_key: [0; 32],
            arch: "x".try_into().unwrap(),
            cores: 1,
            mem_total_bytes: 1,
            engine: ambient_core::Engine::Wasmtime,
            agent_version: "0".try_into().unwrap(),
            labels: Default::default(),
            profile: None,
            max_concurrency: 1,
            fuel_per_s: None,
        },
        signature: [0; 64],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_assignment_gets_the_stored_report_instead_of_a_second_run() {
    let (mut coord, agent, _, _keep) = rig(|_| {}).await;
    let hash = coord.publish_module(&wasm(REVERSE_WAT)).await;
    let a = assignment("dup", hash, Abi::Plain, "reverse", b"once", small_limits());
    coord.assign(&agent.node, &a).await;
    let (first, _) = report_of(&mut coord, &agent.node, "dup").await;
    eventually("the outbox to empty", || agent.outbox_len() == 0).await;
    coord.assign(&agent.node, &a).await;
    let (second, _) = report_of(&mut coord, &agent.node, "dup").await;
    assert_eq!(first, second, "the same signed report, byte for byte");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_beyond_the_concurrency_limit_is_refused_as_busy() {
    let (mut coord, agent, _, _keep) = rig(|c| {
        c.set_max_concurrency(1);
    })
    .await;
    let hash = coord.publish_module(&wasm(SPIN_WAT)).await;
    let long = Limits {
        timeout_ms: 1_500,
        fuel: u64::MAX,
        ..small_limits()
    };
    coord
        .assign(
            &agent.node,
            &assignment("spin-1", hash, Abi::Plain, "spin", b"", long),
        )
        .await;
    coord
        .assign(
            &agent.node,
            &assignment("spin-2", hash, Abi::Plain, "spin", b"", long),
        )
        .await;
    let (_, body) = report_of(&mut coord, &agent.node, "spin-2").await;
    assert!(
        matches!(body, ReportBody::Refused(r) if r.refusal == Refusal::Busy),
        "{body:?}"
    );
    let (_, body) = report_of(&mut coord, &agent.node, "spin-1").await;
    assert_eq!(executed(body).0.receipt.exit, Exit::TimedOut);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_refuses_work_with_its_reason() {
    let (mut coord, agent, _, _keep) = rig(|c| {
        // A Pi 4 idles around 50 °C: a 30 °C limit keeps the breaker open.
        let policy = ambient_core::SafetyPolicy {
            max_temp_millic: 30_000,
            resume_temp_millic: 25_000,
            ..Profile::Pi4.safety_policy()
        };
        c.set_simulate(Profile::Pi4).set_safety_policy(policy);
    })
    .await;
    let node = agent.node;
    coord
        .expect("telemetry with an open breaker", |s| {
            if leaf(&node, s)? != topics::NodeTopic::Telemetry {
                return None;
            }
            let Message::Telemetry(t) = Envelope::decode(&s.payload).ok()?.message else {
                return None;
            };
            (t.telemetry.sample.breaker == BreakerState::Open).then_some(())
        })
        .await;
    let hash = coord.publish_module(&wasm(REVERSE_WAT)).await;
    coord
        .assign(
            &node,
            &assignment("too-hot", hash, Abi::Plain, "reverse", b"x", small_limits()),
        )
        .await;
    let (_, body) = report_of(&mut coord, &node, "too-hot").await;
    assert!(
        matches!(
            body,
            ReportBody::Refused(SignedRefusal {
                refusal: Refusal::Breaker(TripReason::Overheated {
                    max_millic: 30_000,
                    ..
                }),
                ..
            })
        ),
        "{body:?}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_keeps_its_node_id_and_says_offline_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker().await;
    let mut coord = Coordinator::connect(&broker.url(), "coord-restart").await;
    let state = dir.path().join("agent");
    let agent = RunningAgent::start(&broker.url(), &state, |_| {});
    let first = announce_of(&mut coord, &agent.node).await.announce.node;
    agent.shutdown().await;
    coord
        .expect("status offline", |s| {
            (leaf(&first, s)? == topics::NodeTopic::Status && &s.payload[..] == b"offline")
                .then_some(())
        })
        .await;

    let again = RunningAgent::start(&broker.url(), &state, |_| {});
    let second = announce_of(&mut coord, &again.node).await.announce.node;
    assert_eq!(first, second);
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_made_while_the_broker_is_down_is_delivered_after_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    // Mosquitto: the test stops the broker and starts it again with the sessions it saved.
    let mut broker = mosquitto();
    let mut coord = Coordinator::connect(&broker.url(), "coord-outage").await;
    let agent = RunningAgent::start(&broker.url(), &dir.path().join("agent"), |_| {});
    let node = agent.node;
    announce_of(&mut coord, &node).await;
    let hash = coord.publish_module(&wasm(SPIN_WAT)).await;
    // Spins until its 1.5 s wall-clock limit: long enough to take the broker away meanwhile.
    let limits = Limits {
        timeout_ms: 1_500,
        fuel: u64::MAX,
        ..small_limits()
    };
    coord
        .assign(
            &node,
            &assignment("through-outage", hash, Abi::Plain, "spin", b"", limits),
        )
        .await;
    coord
        .expect("telemetry showing the task running", |s| {
            if leaf(&node, s)? != topics::NodeTopic::Telemetry {
                return None;
            }
            let Message::Telemetry(t) = Envelope::decode(&s.payload).ok()?.message else {
                return None;
            };
            (t.telemetry.sample.tasks_running == 1).then_some(())
        })
        .await;

    broker.stop();
    eventually(
        "the report to be in the outbox while the broker is down",
        || agent.outbox_len() == 1,
    )
    .await;
    broker.restart().expect("mosquitto restarts");

    let (_, body) = report_of(&mut coord, &node, "through-outage").await;
    assert_eq!(executed(body).0.receipt.exit, Exit::TimedOut);
    eventually("the outbox to empty after the broker acknowledged", || {
        agent.outbox_len() == 0
    })
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_left_in_the_outbox_by_a_previous_run_is_sent_on_start() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker().await;
    let mut coord = Coordinator::connect(&broker.url(), "coord-leftover").await;
    let state = dir.path().join("agent");
    let identity = ambient_agent::load_identity(&state).unwrap();
    let node = identity.node_id();
    let task_id = ambient_core::TaskId::new("left-over").unwrap();
    // What an agent stopped while the broker was away leaves behind.
    let frame = Envelope::new(Message::Report(ambient_core::Report {
        body: ReportBody::Refused(SignedRefusal::sign(
            &identity,
            &task_id,
            3,
            &node,
            Refusal::Busy,
        )),
        task_id,
        attempt: 3,
        node,
    }))
    .to_vec();
    std::fs::create_dir_all(state.join("outbox")).unwrap();
    std::fs::write(state.join("outbox/00000000000000000007.report"), &frame).unwrap();

    let agent = RunningAgent::start(&broker.url(), &state, |_| {});
    let (bytes, _) = report_of(&mut coord, &node, "left-over").await;
    assert_eq!(bytes, frame);
    eventually("the outbox to empty", || agent.outbox_len() == 0).await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasi_task_reads_stdin_and_writes_stdout_over_mqtt() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tasks/modules/wasi-upper.wasm");
    let module =
        std::fs::read(&path).unwrap_or_else(|e| panic!("{} is committed: {e}", path.display()));
    let (mut coord, agent, _, _keep) = rig(|_| {}).await;
    let hash = coord.publish_module(&module).await;
    coord
        .assign(
            &agent.node,
            &assignment(
                "upper",
                hash,
                Abi::Wasi,
                "_start",
                b"quiet shelf",
                small_limits(),
            ),
        )
        .await;
    let (_, body) = report_of(&mut coord, &agent.node, "upper").await;
    assert_eq!(executed(body).1, b"QUIET SHELF");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_assignments_signed_by_the_pinned_coordinator_run() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker().await;
    let mut coord = Coordinator::connect(&broker.url(), "coord-pinned").await;
    let state = dir.path().join("agent");
    let agent = RunningAgent::start(&broker.url(), &state, |c| {
        c.set_max_concurrency(1);
    });
    let node = agent.node;
    announce_of(&mut coord, &node).await;
    let reverse = coord.publish_module(&wasm(REVERSE_WAT)).await;
    let spin = coord.publish_module(&wasm(SPIN_WAT)).await;

    // The first signed assignment pins its key.
    coord
        .assign(
            &node,
            &assignment(
                "first",
                reverse,
                Abi::Plain,
                "reverse",
                b"ab",
                small_limits(),
            ),
        )
        .await;
    let (_, body) = report_of(&mut coord, &node, "first").await;
    assert_eq!(executed(body).1, b"ba");
    let pinned = std::fs::read_to_string(state.join(ambient_agent::COORDINATOR_KEY_FILE)).unwrap();
    assert_eq!(
        pinned.trim(),
        hex::encode(coordinator_identity().public_key())
    );

    // A validly signed assignment under another key, then one from the pinned coordinator.
    // With one slot, had the first been run, the second would be refused as busy.
    let long = Limits {
        timeout_ms: 1_500,
        fuel: u64::MAX,
        ..small_limits()
    };
    let stranger = ambient_core::Identity::from_secret(&[0x99; 32]);
    coord
        .assign_signed_by(
            &node,
            &assignment("forged", spin, Abi::Plain, "spin", b"", long),
            &stranger,
        )
        .await;
    coord
        .assign(
            &node,
            &assignment(
                "after",
                reverse,
                Abi::Plain,
                "reverse",
                b"cd",
                small_limits(),
            ),
        )
        .await;
    let (task, body) = coord
        .expect("the next report", |s| {
            if leaf(&node, s)? != topics::NodeTopic::Results {
                return None;
            }
            let Message::Report(r) = Envelope::decode(&s.payload).ok()?.message else {
                return None;
            };
            let ran = matches!(r.body, ReportBody::Executed { .. });
            Some((r.task_id.as_str().to_owned(), ran))
        })
        .await;
    assert_eq!(
        (task.as_str(), body),
        ("after", true),
        "the forged one never ran"
    );
    agent.shutdown().await;
}
