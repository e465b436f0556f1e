//! What happens when things go wrong: dead nodes, bad input, lying nodes. (A killed coordinator
//! or broker: `delivery.rs`.)

mod common;

use std::time::Duration;

use ambient_coordinator::client::Client;
use ambient_coordinator::store::Store;
use ambient_coordinator::{EventStatus, LimitsJson, Submission};
use ambient_core::topics::{self, NodeTopic};
use ambient_core::{Envelope, Identity, Message, TaskId, TelemetrySample};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn task_row(db: &std::path::Path, id: &str) -> Option<ambient_coordinator::store::TaskRow> {
    Store::open_read_only(db)
        .ok()?
        .task(&TaskId::new(id)?)
        .ok()?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_on_a_killed_agent_completes_elsewhere_and_is_paid_once() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("c"), 0, None);
    let mut first = agent(&c.url, &dir.path().join("a0"), "pi5");
    c.wait_for_nodes(1);
    let mut client = Client::connect(&c.url).await.unwrap();
    client
        .submit(&spin_task("long", 2_000_000_000))
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        || task_row(&c.db(), "long").is_some_and(|r| r.attempts >= 1),
        || "the task to be dispatched".into(),
    );
    let _second = agent(&c.url, &dir.path().join("a1"), "jetson-orin-nano");
    c.wait_for_nodes(2);
    first.kill9();
    let ev = loop {
        let ev = tokio::time::timeout(Duration::from_secs(120), client.next_event())
            .await
            .expect("result in time")
            .expect("event");
        if ev.task_id == "long" && ev.status.is_final() {
            break ev;
        }
    };
    assert_eq!(
        ev.status,
        EventStatus::Completed,
        "{:?}\nnodes: {:?}",
        ev.error,
        Store::open_read_only(&c.db()).and_then(|s| s.nodes())
    );
    assert_eq!(
        B64.decode(ev.output_b64.unwrap()).unwrap(),
        2_000_000_000u64.to_le_bytes()
    );
    let store = Store::open_read_only(&c.db()).unwrap();
    let paid = store.task_earnings(&TaskId::new("long").unwrap()).unwrap();
    assert_eq!(paid.len(), 1, "credited exactly once");
    assert_eq!(
        paid[0].0.to_hex().as_str(),
        ev.nodes[0],
        "the surviving node was paid"
    );
    assert!(store.verify_ledger().unwrap().is_ok());
    client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_submissions_get_clear_rejections_and_the_coordinator_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("c"), 0, None);
    let _a = agent(&c.url, &dir.path().join("a0"), "pi4");
    c.wait_for_nodes(1);
    let mut client = Client::connect(&c.url).await.unwrap();
    let (host, port) = host_port(&c.url);
    let (raw, mut el) = AsyncClient::new(MqttOptions::new("raw-e2e", host, port), 10);
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    raw.publish(
        topics::SUBMIT,
        QoS::AtLeastOnce,
        false,
        b"{not json".to_vec(),
    )
    .await
    .unwrap();
    let cases = [
        (r#"{"task_id":"b1","module":"00"}"#, "bad_module"),
        (
            &*format!(r#"{{"task_id":"b2","module":"{}"}}"#, "ab".repeat(32)),
            "unknown_module",
        ),
        (
            r#"{"task_id":"b3","module_b64":"AGFzbQEAAAA=","strategy":"fastest"}"#,
            "bad_strategy",
        ),
        (
            r#"{"task_id":"b4","module_b64":"AGFzbQEAAAA=","limits":{"fuel":0}}"#,
            "bad_limits",
        ),
        (
            r#"{"task_id":"b5","module_b64":"AGFzbQEAAAA=","verify":"replicate:99"}"#,
            "bad_policy",
        ),
    ];
    for (json, _) in &cases {
        raw.publish(
            topics::SUBMIT,
            QoS::AtLeastOnce,
            false,
            json.as_bytes().to_vec(),
        )
        .await
        .unwrap();
    }
    let mut seen = std::collections::HashMap::new();
    while seen.len() < cases.len() {
        let ev = tokio::time::timeout(Duration::from_secs(30), client.next_event())
            .await
            .expect("event")
            .expect("open");
        if ev.status == EventStatus::Rejected {
            seen.insert(ev.task_id.clone(), ev.error.unwrap().code);
        }
    }
    for (i, (_, code)) in cases.iter().enumerate() {
        assert_eq!(seen[&format!("b{}", i + 1)], *code);
    }
    // An oversize-fuel task that traps still gets a verified, typed failure.
    let trap = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "alloc") (param i32) (result i32) (i32.const 0)) (func (export "run") (param i32 i32) (result i64) unreachable))"#).unwrap();
    let events = client
        .run_batch(
            &[
                spin_task("ok", 10),
                Submission {
                    task_id: Some("trap".into()),
                    module_b64: Some(B64.encode(trap)),
                    ..Submission::default()
                },
            ],
            Duration::from_secs(60),
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(events["ok"].status, EventStatus::Completed);
    assert_eq!(events["trap"].status, EventStatus::Failed);
    assert_eq!(events["trap"].error.as_ref().unwrap().code, "trapped");
}

/// A node that follows the protocol but lies: it answers every assignment with a wrong output,
/// signing with its own key, or another to forge. It answers the coordinator's probes at once,
/// so on loopback its link is the best the coordinator sees and the weighted strategy ranks it
/// first.
struct LyingNode {
    node: ambient_core::NodeId,
}

impl LyingNode {
    async fn start(url: &str, secret: [u8; 32], forge: bool) -> LyingNode {
        let identity = Identity::from_secret(&secret);
        let node = identity.node_id();
        let mut opts = device_options(url, &identity);
        opts.set_last_will(rumqttc::LastWill::new(
            topics::node(&node, NodeTopic::Status).as_str(),
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
        let (client, mut el) = AsyncClient::new(opts, 100);
        client
            .subscribe(
                topics::node(&node, NodeTopic::Tasks).as_str(),
                QoS::AtLeastOnce,
            )
            .await
            .unwrap();
        client
            .publish(
                topics::node(&node, NodeTopic::Status).as_str(),
                QoS::AtLeastOnce,
                true,
                "online",
            )
            .await
            .unwrap();
        let frame = signed_announce(&identity, |a| {
            a.cores = 64;
            a.mem_total_bytes = 64 << 30;
            a.max_concurrency = 64;
        });
        client
            .publish(
                topics::node(&node, NodeTopic::Announce).as_str(),
                QoS::AtLeastOnce,
                true,
                frame,
            )
            .await
            .unwrap();
        let tel_client = client.clone();
        let tel_identity = Identity::from_secret(&secret);
        tokio::spawn(async move {
            for seq in 0.. {
                // The best device on the shelf, so that the weighted strategy picks it.
                let sample = TelemetrySample {
                    bandwidth_kbps: Some(1_000_000),
                    latency_us: Some(100),
                    cpu_load_permille: Some(0),
                    mem_free_bytes: Some(60 << 30),
                    ..TelemetrySample::default()
                };
                let frame = signed_telemetry(&tel_identity, seq, sample);
                if tel_client
                    .publish(
                        topics::node(&node, NodeTopic::Telemetry).as_str(),
                        QoS::AtMostOnce,
                        false,
                        frame,
                    )
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        tokio::spawn(async move {
            let own = Identity::from_secret(&secret);
            let signer = if forge {
                Identity::from_secret(&[0xEE; 32])
            } else {
                Identity::from_secret(&secret)
            };
            while let Ok(ev) = el.poll().await {
                let Event::Incoming(Packet::Publish(p)) = ev else {
                    continue;
                };
                let a = match Envelope::decode(&p.payload).map(|e| e.message) {
                    Ok(Message::Assign(a)) => a,
                    Ok(Message::Probe(probe)) => {
                        let pong = ambient_core::Pong::sign(&own, &node, probe.nonce);
                        let _ = client.try_publish(
                            topics::node(&node, NodeTopic::Telemetry).as_str(),
                            QoS::AtMostOnce,
                            false,
                            Envelope::new(Message::Pong(pong)).to_vec(),
                        );
                        continue;
                    }
                    _ => continue,
                };
                let output = vec![7u8; a.input.len() / 64];
                let frame = ambient_coordinator::sim::report_of(&signer, node, &a, &output, 1);
                let _ = client
                    .publish(
                        topics::node(&node, NodeTopic::Results).as_str(),
                        QoS::AtLeastOnce,
                        false,
                        frame,
                    )
                    .await;
            }
        });
        LyingNode { node }
    }
}

fn reputation_of(db: &std::path::Path, node: &ambient_core::NodeId) -> ambient_core::Reputation {
    let store = Store::open_read_only(db).unwrap();
    store
        .node_views()
        .unwrap()
        .into_iter()
        .find(|v| v.node == *node)
        .expect("node in snapshot")
        .reputation
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_receipts_are_signed_by_another_key_earns_nothing_and_the_task_completes_elsewhere()
 {
    let dir = tempfile::tempdir().unwrap();
    // Reports that do not authenticate are dropped (anyone could have sent them), so the
    // liar's attempt ends at its dispatch deadline: keep that short.
    let c = Coordinator::start_with(
        &dir.path().join("c"),
        0,
        None,
        "[scheduling]\ndispatch_grace_ms = 1000\n",
    );
    let liar = LyingNode::start(&c.url, [0x11; 32], true).await;
    c.wait_for_nodes(1);
    let _honest = agent(&c.url, &dir.path().join("a0"), "pi4");
    c.wait_for_nodes(2);
    let mut client = Client::connect(&c.url).await.unwrap();
    let hash = client.publish_module(DIGITS_WASM).await.unwrap();
    let (input, native) = digits_batch(0, 4);
    let sub = Submission {
        task_id: Some("forged".into()),
        module: Some(hash.to_hex().to_string()),
        entry: Some("classify".into()),
        input_b64: Some(B64.encode(input)),
        limits: Some(LimitsJson {
            timeout_ms: Some(2_000),
            ..LimitsJson::default()
        }),
        ..Submission::default()
    };
    let events = client
        .run_batch(&[sub], Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    let ev = &events["forged"];
    assert_eq!(ev.status, EventStatus::Completed, "{:?}", ev.error);
    assert_eq!(B64.decode(ev.output_b64.as_ref().unwrap()).unwrap(), native);
    assert_ne!(ev.nodes[0], liar.node.to_hex().as_str());
    wait_until(
        Duration::from_secs(10),
        || reputation_of(&c.db(), &liar.node).failed >= 1,
        || "the liar's unanswered attempt to count as a failure".into(),
    );
    assert_eq!(reputation_of(&c.db(), &liar.node).disputed, 0);
    let store = Store::open_read_only(&c.db()).unwrap();
    assert!(
        store
            .balances()
            .unwrap()
            .iter()
            .all(|b| b.account != format!("node:{}", liar.node)),
        "the liar earned nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_returning_wrong_answers_is_outvoted_and_loses_reputation() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("c"), 0, None);
    let liar = LyingNode::start(&c.url, [0x22; 32], false).await;
    let _honest = agents(&c.url, dir.path(), &["pi5", "jetson-orin-nano"]);
    c.wait_for_nodes(3);
    let mut client = Client::connect(&c.url).await.unwrap();
    let hash = client.publish_module(DIGITS_WASM).await.unwrap();
    let (input, native) = digits_batch(8, 4);
    let sub = Submission {
        task_id: Some("vote".into()),
        module: Some(hash.to_hex().to_string()),
        entry: Some("classify".into()),
        input_b64: Some(B64.encode(input)),
        // The liar ranks first (weighted), so it is one of the first two replicas: their split
        // vote escalates to a third node, and the liar ends up in the minority every time.
        verify: Some("replicate:2".into()),
        ..Submission::default()
    };
    let events = client
        .run_batch(&[sub], Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    let ev = &events["vote"];
    assert_eq!(ev.status, EventStatus::Completed, "{:?}", ev.error);
    assert_eq!(B64.decode(ev.output_b64.as_ref().unwrap()).unwrap(), native);
    let verdict = ev.verdict.as_ref().unwrap();
    assert_eq!((verdict.replicas, verdict.agreeing), (3, 2));
    assert_eq!(verdict.disputed, vec![liar.node.to_hex().to_string()]);
    wait_until(
        Duration::from_secs(10),
        || reputation_of(&c.db(), &liar.node).disputed >= 1,
        || "the liar's reputation to drop".into(),
    );
    let store = Store::open_read_only(&c.db()).unwrap();
    assert_eq!(
        store
            .task_earnings(&TaskId::new("vote").unwrap())
            .unwrap()
            .len(),
        2,
        "only the majority is paid"
    );
}

/// Runs `tasks` single-image digit tasks in one batch under `verify` (the coordinator's
/// default when `None`), each of which must complete, and returns how many completed with a
/// wrong output and how many agreeing runs they had.
async fn digits_counting_wrong(
    c: &Coordinator,
    tasks: usize,
    verify: Option<&str>,
) -> (usize, usize) {
    let mut client = Client::connect(&c.url).await.unwrap();
    let hash = client.publish_module(DIGITS_WASM).await.unwrap();
    let mut natives = Vec::new();
    let subs: Vec<Submission> = (0..tasks)
        .map(|i| {
            let (input, native) = digits_batch(i, 1);
            natives.push(native);
            Submission {
                task_id: Some(format!("t-{i}")),
                module: Some(hash.to_hex().to_string()),
                entry: Some("classify".into()),
                input_b64: Some(B64.encode(input)),
                verify: verify.map(String::from),
                ..Submission::default()
            }
        })
        .collect();
    let events = client
        .run_batch(&subs, Duration::from_secs(300), |_| {})
        .await
        .unwrap();
    client.disconnect().await;
    let (mut wrong, mut executions) = (0, 0);
    for (i, native) in natives.iter().enumerate() {
        let ev = &events[&format!("t-{i}")];
        assert_eq!(ev.status, EventStatus::Completed, "{:?}", ev.error);
        executions += ev.receipts.len();
        if B64.decode(ev.output_b64.as_ref().unwrap()).unwrap() != *native {
            wrong += 1;
        }
    }
    (wrong, executions)
}

/// Waits until the registry snapshot, saved periodically, shows `node` blacklisted.
fn wait_for_blacklisting(c: &Coordinator, node: &str) {
    wait_until(
        Duration::from_secs(10),
        || {
            let store = Store::open_read_only(&c.db()).unwrap();
            store
                .node_views()
                .unwrap()
                .iter()
                .any(|v| v.node.to_string() == node && v.blacklisted_for_ms.is_some())
        },
        || format!("{node} to show as blacklisted"),
    );
}

/// The measurement that opened the trust work: four honest devices and one node that claims
/// perfect health and answers every task at once with a validly signed wrong output. With 5%
/// random spot checks alone, a third of its results were accepted. Under the default policy
/// (`target:1e-4`) a node's runs are checked until its agreements make it credible, so the
/// liar is caught on its first task, blacklisted, and no wrong result is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_claiming_perfect_health_and_lying_on_every_task_gets_no_wrong_result_accepted() {
    let dir = tempfile::tempdir().unwrap();
    // The default trust policy, spelled out (the harness otherwise trusts from the start).
    let c = Coordinator::start_with(
        &dir.path().join("c"),
        0,
        None,
        "[verification]\ntrust_after = 40\n",
    );
    let liar = LyingNode::start(&c.url, [0x33; 32], false).await;
    let _honest = agents(
        &c.url,
        dir.path(),
        &["pi4", "pi5", "jetson-orin-nano", "visionfive2"],
    );
    c.wait_for_nodes(5);
    let tasks = 100;
    let (wrong, executions) = digits_counting_wrong(&c, tasks, None).await;
    println!(
        "{tasks} tasks, 1 liar in 5: {wrong} wrong results accepted, {executions} agreeing executions ({:.2} per task)",
        executions as f64 / tasks as f64
    );
    assert_eq!(wrong, 0, "no wrong result accepted");
    wait_for_blacklisting(&c, &liar.node.to_string());
}

/// The same with real agents: one of five `ambient-agent`s claims perfect health and answers
/// every task with a validly signed wrong output (`--fault wrong-output:1 --fault
/// claim-perfect-health`), under `receipt` (the cheaper policy). Its runs are all checked until
/// it has agreed with others 40 times, which it never does, so its first checked run catches
/// it; no wrong result is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_claiming_perfect_health_and_lying_on_every_task_gets_none_of_1000_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start_with(
        &dir.path().join("c"),
        0,
        None,
        "[verification]\npolicy = \"receipt\"\ntrust_after = 40\n",
    );
    let _liar = agent_with(
        &c.url,
        &dir.path().join("liar"),
        "pi5",
        &[],
        &[
            "--fault",
            "wrong-output:1",
            "--fault",
            "claim-perfect-health",
        ],
    );
    let _honest = agents(
        &c.url,
        dir.path(),
        &["pi4", "pi5", "jetson-orin-nano", "visionfive2"],
    );
    c.wait_for_nodes(5);
    let tasks = 1000;
    let (wrong, executions) = digits_counting_wrong(&c, tasks, None).await;
    println!(
        "{tasks} tasks on 5 agents, one lying on every task: {wrong} wrong results accepted, {executions} agreeing executions ({:.2} per task)",
        executions as f64 / tasks as f64
    );
    assert_eq!(wrong, 0, "no wrong result accepted");
    let (liar, _) = device_identity(&dir.path().join("liar"));
    wait_for_blacklisting(&c, &liar);
}

/// Placement ranks nodes by what the coordinator measures. An agent on a simulated Pi Zero 2 W
/// (a 6 ms, 40 Mbit/s link, which holds its pongs back) claims perfect health (`--fault
/// claim-perfect-health`: 0.1 ms round trips, 1 Gbit/s). Its latency and bandwidth terms come
/// from the coordinator's probes, and its claims show as contradicted.
#[test]
fn an_agent_claiming_a_better_link_than_the_coordinators_probes_show_is_scored_by_the_probes_and_marked()
 {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start_with(
        &dir.path().join("c"),
        0,
        None,
        "[storage]\nsnapshot_interval_ms = 200\n[scheduling]\nprobe_interval_ms = 200\nbandwidth_probe_every = 2\n",
    );
    // The identity first, so the agent starts with it rather than racing to create its own.
    let (liar, _) = device_identity(&dir.path().join("liar"));
    let _liar = agent_with(
        &c.url,
        &dir.path().join("liar"),
        "pi-zero-2w",
        &[],
        &["--fault", "claim-perfect-health"],
    );
    let mut view = None;
    wait_until(
        Duration::from_secs(60),
        || {
            // Not there yet while the coordinator creates its store.
            let views = Store::open_read_only(&c.db()).and_then(|s| s.node_views());
            view = views
                .unwrap_or_default()
                .into_iter()
                .find(|v| v.node.to_string() == liar && v.contradicted.len() == 2);
            view.is_some()
        },
        || format!("{liar}'s latency and bandwidth claims to show as contradicted"),
    );
    let view = view.unwrap();
    let claimed = view.sample.as_ref().unwrap();
    assert_eq!(
        (claimed.latency_us, claimed.bandwidth_kbps),
        (Some(100), Some(1_000_000))
    );
    // Every pong waits out the link's 6 ms, so no round trip is shorter and the latency term
    // is at most 1 − 6/100; the claim would have given 0.999.
    assert!(view.observed_latency_us.unwrap() >= 6_000, "{view:?}");
    assert!(view.terms.latency <= 9_400, "{:?}", view.terms);
    assert!(view.terms.bandwidth < 10_000, "{:?}", view.terms);
    println!("contradicted: {:?}", view.contradicted);
}

/// One of ten `ambient-agent`s lies on a tenth of its tasks (`--fault wrong-output:0.1`), the
/// others are honest; 1,000 tasks under `target:1e-4`, the default. Until a node's agreements make its doubt
/// that small (hundreds of them), every run it makes is checked on other nodes, so each of the
/// liar's lies meets a disagreeing check, is outvoted and gets it blacklisted: no wrong result
/// is accepted, whatever order the runs take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_in_ten_lying_on_a_tenth_of_its_tasks_gets_none_of_1000_accepted_under_an_error_target()
 {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start_with(
        &dir.path().join("c"),
        0,
        None,
        "[verification]\ntrust_after = 40\n",
    );
    let _liar = agent_with(
        &c.url,
        &dir.path().join("liar"),
        "pi5",
        &[],
        &["--fault", "wrong-output:0.1"],
    );
    let profiles = ["pi4", "pi5", "jetson-orin-nano", "visionfive2"];
    let honest: Vec<&str> = profiles.iter().cycle().take(9).copied().collect();
    let _honest = agents(&c.url, dir.path(), &honest);
    c.wait_for_nodes(10);
    let tasks = 1000;
    let (wrong, executions) = digits_counting_wrong(&c, tasks, Some("target:1e-4")).await;
    println!(
        "{tasks} tasks on 10 agents, one lying on 10% of its tasks, target:1e-4: {wrong} wrong results accepted, {executions} agreeing executions ({:.2} per task)",
        executions as f64 / tasks as f64
    );
    assert_eq!(wrong, 0, "no wrong result accepted");
}
