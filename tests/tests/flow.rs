//! The whole task flow with real processes: broker, coordinator, agents, WASM.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use ambient_coordinator::client::Client;
use ambient_coordinator::store::Store;
use ambient_coordinator::{EventStatus, Submission, TaskEvent};
use ambient_core::Digest;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;

fn digits_task(
    id: &str,
    hash: Digest,
    offset: usize,
    strategy: &str,
    verify: &str,
) -> (Submission, Vec<u8>) {
    let (input, native) = digits_batch(offset, 4);
    let s = Submission {
        task_id: Some(id.into()),
        client_id: Some("e2e".into()),
        module: Some(hash.to_hex().to_string()),
        entry: Some("classify".into()),
        input_b64: Some(B64.encode(input)),
        strategy: Some(strategy.into()),
        verify: Some(verify.into()),
        ..Submission::default()
    };
    (s, native)
}

fn output(ev: &TaskEvent) -> Vec<u8> {
    ev.output_b64
        .as_deref()
        .and_then(|b| B64.decode(b).ok())
        .unwrap_or_default()
}

/// Runs `n` digit tasks per (strategy, policy) and checks every result against the native model,
/// the verdict and the ledger. Returns the events.
async fn run_digits(
    url: &str,
    db: &std::path::Path,
    plans: &[(&str, &str)],
    n: usize,
) -> Vec<TaskEvent> {
    let mut client = Client::connect(url).await.expect("connect");
    let hash = client
        .publish_module(DIGITS_WASM)
        .await
        .expect("publish module");
    let mut subs = Vec::new();
    let mut natives = Vec::new();
    for (p, (strategy, verify)) in plans.iter().enumerate() {
        for i in 0..n {
            let (s, native) = digits_task(&format!("t-{p}-{i}"), hash, p * n + i, strategy, verify);
            subs.push(s);
            natives.push(native);
        }
    }
    let events = client
        .run_batch(&subs, Duration::from_secs(60), |_| {})
        .await
        .expect("batch");
    client.disconnect().await;
    let store = Store::open_read_only(db).expect("open store");
    let mut out = Vec::new();
    for (s, native) in subs.iter().zip(natives) {
        let id = s.task_id.clone().unwrap_or_default();
        let ev = events
            .get(&id)
            .unwrap_or_else(|| panic!("no result for {id}"));
        assert_eq!(ev.status, EventStatus::Completed, "{id}: {:?}", ev.error);
        assert_eq!(
            output(ev),
            native,
            "{id}: WASM output differs from the native model"
        );
        let verdict = ev.verdict.as_ref().expect("verdict");
        let payees = store
            .task_earnings(&ambient_core::TaskId::new(&id).unwrap())
            .expect("earnings");
        assert_eq!(
            payees.len(),
            verdict.agreeing,
            "{id}: each agreeing node is paid once"
        );
        assert_eq!(
            ev.nodes.iter().collect::<HashSet<_>>().len(),
            ev.nodes.len(),
            "{id}: replicas ran on distinct nodes"
        );
        assert!(ev.reward.unwrap_or(0) > 0, "{id}: reward recorded");
        out.push(ev.clone());
    }
    let check = store.verify_ledger().expect("verify ledger");
    assert!(check.is_ok(), "ledger verifies: {check:?}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_runs_digit_tasks_to_settled_results_on_the_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("c"), 0, None);
    let _agents = agents(&c.url, dir.path(), &["pi4", "pi5", "jetson-orin-nano"]);
    c.wait_for_nodes(3);
    let plans = [
        ("weighted", "receipt"),
        ("round-robin", "receipt"),
        ("least-loaded", "receipt"),
        ("latency-aware", "receipt"),
    ];
    let events = run_digits(&c.url, &c.db(), &plans, 3).await;
    let rr: HashSet<_> = events[3..6].iter().map(|e| e.nodes[0].clone()).collect();
    assert!(
        rr.len() >= 2,
        "round-robin spread three tasks over at least two nodes: {rr:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_tasks_are_accepted_by_a_majority_of_distinct_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("c"), 0, None);
    let _agents = agents(&c.url, dir.path(), &["pi4", "pi5", "visionfive2"]);
    c.wait_for_nodes(3);
    let events = run_digits(
        &c.url,
        &c.db(),
        &[("weighted", "replicate:3"), ("round-robin", "replicate:2")],
        2,
    )
    .await;
    // replicate:3 is accepted as soon as a strict majority (2 of 3) agrees.
    for ev in &events[..2] {
        let verdict = ev.verdict.as_ref().unwrap();
        assert_eq!(verdict.replicas, 3);
        assert!(verdict.agreeing >= 2);
        assert_eq!(ev.nodes.len(), verdict.agreeing);
        assert_eq!(ev.receipts.len(), verdict.agreeing);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_flow_also_runs_on_mosquitto() {
    let mosquitto = Mosquitto::required();
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("c"), 0, Some(&mosquitto.url()));
    assert_eq!(c.url, mosquitto.url());
    let _agents = agents(&c.url, dir.path(), &["pi5", "jetson-orin-nano"]);
    c.wait_for_nodes(2);
    run_digits(
        &c.url,
        &c.db(),
        &[("weighted", "receipt"), ("least-loaded", "replicate:2")],
        3,
    )
    .await;
}

#[test]
fn the_coordinator_reaches_its_embedded_broker_over_a_private_socket_it_removes_on_exit() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::start(&dir.path().join("c"), 0, None);
    let socket = c.data_dir.join("broker.sock");
    let path = socket.to_str().expect("a UTF-8 temporary path").to_owned();
    // The kernel lists a listening Unix socket and each connection it accepted under its path.
    let bound = || {
        std::fs::read_to_string("/proc/net/unix")
            .expect("read /proc/net/unix")
            .lines()
            .filter(|line| line.split_whitespace().nth(7) == Some(path.as_str()))
            .count()
    };
    wait_until(
        Duration::from_secs(20),
        || bound() >= 2,
        || {
            format!(
                "the coordinator connected over {path} ({} sockets there)",
                bound()
            )
        },
    );
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only the coordinator's user may connect");

    assert!(
        c.proc.terminate().is_some(),
        "the coordinator stops on SIGTERM"
    );
    assert!(
        !socket.exists(),
        "the socket is removed when the coordinator stops"
    );
}
