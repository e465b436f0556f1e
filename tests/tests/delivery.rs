//! The delivery contract with real processes: every accepted task ends exactly once, nothing is
//! lost to a killed coordinator or broker, and nothing is paid twice.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use ambient_coordinator::client::{Client, ClientError};
use ambient_coordinator::store::Store;
use ambient_coordinator::{EventStatus, LimitsJson, RequiresJson, Submission, TaskEvent};
use ambient_core::{TaskId, topics};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn spin(id: &str, module: &str, iterations: u64) -> Submission {
    Submission {
        task_id: Some(id.into()),
        client_id: Some("e2e".into()),
        module: Some(module.into()),
        input_b64: Some(B64.encode(iterations.to_le_bytes())),
        ..Submission::default()
    }
}

/// Publishes the spin module and returns its hash as hex.
async fn publish_spin(client: &Client) -> String {
    let module = wat::parse_str(SPIN_WAT).unwrap();
    client
        .publish_module(&module)
        .await
        .unwrap()
        .to_hex()
        .to_string()
}

/// Runs the batch on its own task (so the test can kill things meanwhile) and disconnects.
fn in_background(
    mut client: Client,
    subs: Vec<Submission>,
) -> tokio::task::JoinHandle<Result<HashMap<String, TaskEvent>, ClientError>> {
    tokio::spawn(async move {
        let events = client
            .run_batch(&subs, Duration::from_secs(120), |_| {})
            .await;
        client.disconnect().await;
        events
    })
}

/// How many tasks the journal holds, and how many of them have an outcome.
fn journaled(db: &Path) -> (usize, usize) {
    let Ok(store) = Store::open_read_only(db) else {
        return (0, 0);
    };
    let all = store.tasks(100_000, None).unwrap_or_default();
    let finished = all.iter().filter(|t| t.status.is_terminal()).count();
    (all.len(), finished)
}

/// Every task completed with its own count, each agreeing node was credited exactly once, and
/// the ledger's chain and books verify.
fn assert_all_completed_and_paid_once(
    db: &Path,
    subs: &[Submission],
    events: &HashMap<String, TaskEvent>,
) {
    let store = Store::open_read_only(db).unwrap();
    for s in subs {
        let id = s.task_id.as_deref().unwrap();
        let ev = events
            .get(id)
            .unwrap_or_else(|| panic!("{id}: no final event"));
        assert_eq!(ev.status, EventStatus::Completed, "{id}: {:?}", ev.error);
        assert_eq!(
            ev.output_b64, s.input_b64,
            "{id}: the spin module returns its input count"
        );
        let agreeing = ev.verdict.as_ref().unwrap().agreeing;
        let paid = store.task_earnings(&TaskId::new(id).unwrap()).unwrap();
        assert_eq!(
            paid.len(),
            agreeing,
            "{id}: each agreeing node credited exactly once"
        );
    }
    let check = store.verify_ledger().unwrap();
    assert!(check.is_ok(), "ledger verifies: {check:?}");
}

/// Submits 300 tasks, kills the coordinator with SIGKILL once 100 are journaled, restarts it on
/// the same data directory, and expects every task to end completed and paid once.
async fn kill_the_coordinator_mid_batch(external: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("c");
    let port = if external.is_some() { 0 } else { free_port() };
    let mut c = Coordinator::start(&data, port, external);
    let _agents = agents(&c.url, dir.path(), &["pi4", "pi5"]);
    c.wait_for_nodes(2);
    let url = c.url.clone();
    let client = Client::connect(&url).await.unwrap();
    let module = publish_spin(&client).await;
    let subs: Vec<Submission> = (0..300)
        .map(|i| spin(&format!("k{i}"), &module, 200_000 + i))
        .collect();
    let batch = in_background(client, subs.clone());
    let db = c.db();
    wait_until(
        Duration::from_secs(60),
        || journaled(&db).0 >= 100,
        || "100 tasks journaled".into(),
    );
    c.proc.kill9();
    let (journaled_at_kill, finished_at_kill) = journaled(&db);
    assert!(
        finished_at_kill < 300,
        "the coordinator died with work outstanding ({journaled_at_kill} journaled, {finished_at_kill} finished)"
    );
    let c = Coordinator::start(&data, port, external);
    assert_eq!(c.url, url, "restarted on the same broker address");
    let events = batch.await.unwrap().unwrap();
    assert_eq!(events.len(), 300, "a final event for every task");
    assert_all_completed_and_paid_once(&c.db(), &subs, &events);
    assert_eq!(journaled(&c.db()), (300, 300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_batch_of_300_loses_no_task_on_the_embedded_broker() {
    kill_the_coordinator_mid_batch(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_batch_of_300_loses_no_task_on_mosquitto() {
    let m = Mosquitto::required();
    kill_the_coordinator_mid_batch(Some(&m.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mosquitto_restart_with_500_in_flight_loses_no_task_and_needs_no_retry() {
    let mut m = Mosquitto::required();
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("c"), 0, Some(&m.url()));
    let _agents = agents(&c.url, dir.path(), &["pi4", "pi5", "jetson-orin-nano"]);
    c.wait_for_nodes(3);
    let client = Client::connect(&c.url).await.unwrap();
    let module = publish_spin(&client).await;
    let subs: Vec<Submission> = (0..500)
        .map(|i| spin(&format!("m{i}"), &module, 2_000_000 + i))
        .collect();
    let batch = in_background(client, subs.clone());
    let db = c.db();
    wait_until(
        Duration::from_secs(60),
        || journaled(&db).1 >= 50,
        || "50 tasks finished".into(),
    );
    m.kill();
    assert!(
        journaled(&db).1 < 500,
        "the broker died with tasks in flight"
    );
    m.restart().expect("mosquitto restarts on its port");
    let events = batch.await.unwrap().unwrap();
    assert_eq!(events.len(), 500, "a final event for every task");
    assert_all_completed_and_paid_once(&db, &subs, &events);
    // A lost assignment would have waited out its dispatch deadline and been dispatched again
    // under a new attempt; assignments are sent again on reconnect under the same attempt.
    let store = Store::open_read_only(&db).unwrap();
    for ev in events.values() {
        let row = store
            .task(&TaskId::new(&ev.task_id).unwrap())
            .unwrap()
            .unwrap();
        let replicas = ev.verdict.as_ref().unwrap().replicas;
        assert_eq!(
            usize::from(row.attempts),
            replicas,
            "{}: dispatched more often than it has replicas",
            ev.task_id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_no_node_can_finish_end_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start_with(
        &dir.path().join("c"),
        0,
        None,
        "[scheduling]\nqueue_timeout_ms = 1500\n",
    );
    let _a = agent(&c.url, &dir.path().join("a0"), "pi5");
    c.wait_for_nodes(1);
    let mut client = Client::connect(&c.url).await.unwrap();
    let module = publish_spin(&client).await;
    let sparc = Submission {
        requires: Some(RequiresJson {
            arch: Some("sparc".into()),
            ..RequiresJson::default()
        }),
        ..spin("sparc", &module, 1)
    };
    let seven = Submission {
        verify: Some("replicate:7".into()),
        ..spin("seven", &module, 1)
    };
    // Counts far beyond what 300 ms allows: every attempt times out on the node.
    let endless = Submission {
        limits: Some(LimitsJson {
            timeout_ms: Some(300),
            fuel: Some(1_000_000_000_000),
            memory_bytes: None,
        }),
        ..spin("endless", &module, u64::MAX)
    };
    let events = client
        .run_batch(&[sparc, seven, endless], Duration::from_secs(120), |_| {})
        .await
        .unwrap();
    client.disconnect().await;
    let message = |id: &str| {
        let ev = &events[id];
        assert_eq!(ev.status, EventStatus::Failed, "{id}");
        ev.error.as_ref().unwrap().message.clone()
    };
    let m = message("sparc");
    assert!(m.contains("no registered node has arch \"sparc\""), "{m}");
    let m = message("seven");
    assert!(m.contains("needs 7 distinct nodes and 1 registered"), "{m}");
    let m = message("endless");
    assert!(m.starts_with("4 attempts failed"), "{m}");
    assert_eq!(m.matches("timed out on node").count(), 4, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_id_is_idempotent_for_the_same_content_and_a_conflict_for_other_content() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("c"), 0, None);
    let _a = agent(&c.url, &dir.path().join("a0"), "pi4");
    c.wait_for_nodes(1);
    let mut client = Client::connect(&c.url).await.unwrap();
    let module = publish_spin(&client).await;
    let first = client
        .run_batch(&[spin("same", &module, 5)], Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    let again = client
        .run_batch(&[spin("same", &module, 5)], Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    assert_eq!(
        again["same"], first["same"],
        "the stored result, not a second run"
    );
    let other = client
        .run_batch(&[spin("same", &module, 6)], Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    client.disconnect().await;
    assert_eq!(other["same"].status, EventStatus::Rejected);
    assert_eq!(other["same"].error.as_ref().unwrap().code, "conflict");
    let store = Store::open_read_only(&c.db()).unwrap();
    assert_eq!(
        store
            .task_earnings(&TaskId::new("same").unwrap())
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_answered_on_the_rejected_topic() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("c"), 0, None);
    // A node registered means the coordinator is subscribed.
    let _a = agent(&c.url, &dir.path().join("a0"), "pi4");
    c.wait_for_nodes(1);
    let (host, port) = host_port(&c.url);
    let (raw, mut el) = AsyncClient::new(MqttOptions::new("raw-rejected", host, port), 10);
    raw.subscribe(topics::REJECTED, QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = el.poll().await.unwrap() {
            break;
        }
    }
    raw.publish(
        topics::SUBMIT,
        QoS::AtLeastOnce,
        false,
        br#"{"task_id": "torn", "modu"#.to_vec(),
    )
    .await
    .unwrap();
    let event: TaskEvent = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                break serde_json::from_slice(&p.payload).unwrap();
            }
        }
    })
    .await
    .expect("a rejected event");
    assert_eq!(event.status, EventStatus::Rejected);
    assert_eq!(event.task_id, "torn", "the id is read from the torn JSON");
    assert_eq!(event.error.unwrap().code, "bad_json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_array_of_submissions_from_a_plain_mqtt_client_runs_each_task() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("c"), 0, None);
    let _a = agent(&c.url, &dir.path().join("a0"), "pi4");
    c.wait_for_nodes(1);
    let mut client = Client::connect(&c.url).await.unwrap();
    let module = publish_spin(&client).await;
    let (host, port) = host_port(&c.url);
    let (raw, mut el) = AsyncClient::new(MqttOptions::new("raw-array", host, port), 10);
    let array = serde_json::to_vec(&[
        spin("arr-1", &module, 1),
        spin("arr-2", &module, 2),
        spin("arr-3", &module, 3),
    ])
    .unwrap();
    raw.publish(topics::SUBMIT, QoS::AtLeastOnce, false, array)
        .await
        .unwrap();
    // The coordinator acknowledges the message once all three are journaled.
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.unwrap() {
                break;
            }
        }
    })
    .await
    .expect("the array's PUBACK");
    let mut completed = Vec::new();
    while completed.len() < 3 {
        let ev = tokio::time::timeout(Duration::from_secs(30), client.next_event())
            .await
            .expect("every task of the array ends")
            .expect("connected");
        if ev.status.is_final() {
            assert_eq!(ev.status, EventStatus::Completed, "{ev:?}");
            completed.push(ev.task_id);
        }
    }
    completed.sort();
    assert_eq!(completed, ["arr-1", "arr-2", "arr-3"]);
    client.disconnect().await;
}
