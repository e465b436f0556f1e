//! The trust boundary: what a stranger who reaches the broker can and cannot do. Each test
//! runs the attack with real processes and checks that it had no effect.

mod common;

use std::time::Duration;

use std::path::PathBuf;

use ambient_coordinator::client::Client;
use ambient_coordinator::store::Store;
use ambient_coordinator::{EventStatus, NodeView, Submission};
use ambient_core::topics::{self, NodeTopic};
use ambient_core::{
    BreakerState, Engine, Envelope, Identity, Message, Receipt, Refusal, Report, ReportBody,
    SignedRefusal, TaskId, TelemetrySample, sha3_256,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use common::*;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS, SubscribeReasonCode,
};
use tokio::sync::mpsc;

/// A raw MQTT client on `url` subscribed to `filters`, without credentials: what anyone who
/// reaches the broker can do.
async fn stranger(
    url: &str,
    name: &str,
    filters: &[&str],
) -> (AsyncClient, mpsc::Receiver<rumqttc::Publish>) {
    let (host, port) = host_port(url);
    let (client, rx, _) = raw_client(MqttOptions::new(name, host, port), filters).await;
    (client, rx)
}

/// A raw MQTT client with `opts`, subscribed to `filters`; also returns the broker's answer to
/// each subscription.
async fn raw_client(
    mut opts: MqttOptions,
    filters: &[&str],
) -> (
    AsyncClient,
    mpsc::Receiver<rumqttc::Publish>,
    Vec<SubscribeReasonCode>,
) {
    opts.set_max_packet_size(
        ambient_core::MAX_PACKET_BYTES,
        ambient_core::MAX_PACKET_BYTES,
    );
    let (client, mut el) = AsyncClient::new(opts, 1024);
    let (tx, rx) = mpsc::channel(4096);
    let (subscribed_tx, mut subscribed) = mpsc::channel(filters.len().max(1));
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            match ev {
                Event::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send(p).await;
                }
                Event::Incoming(Packet::SubAck(ack)) => {
                    let _ = subscribed_tx.send(ack.return_codes).await;
                }
                _ => {}
            }
        }
    });
    let mut granted = Vec::new();
    for f in filters {
        client.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
        granted.extend(subscribed.recv().await.expect("suback"));
    }
    (client, rx, granted)
}

/// How the broker at `url` answers a CONNECT with `opts`: `Ok` or the refusal's return code.
async fn connack(opts: MqttOptions) -> Result<(), ConnectReturnCode> {
    let (_client, mut el) = AsyncClient::new(opts, 10);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), el.poll())
            .await
            .expect("an answer to CONNECT")
        {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
            Ok(_) => {}
            Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Err(code),
            Err(e) => panic!("no CONNACK: {e}"),
        }
    }
}

/// Every node in the coordinator's registry snapshot, with its `NodeView` JSON.
fn snapshot(db: &std::path::Path) -> Vec<NodeView> {
    Store::open_read_only(db)
        .and_then(|s| s.node_views())
        .unwrap_or_default()
}

/// Waits until the coordinator has handled everything `client` published so far: it answers a
/// malformed submission on the rejected topic, in order after the earlier messages, and then
/// saves a fresh node snapshot. The marker is sent again every 2 s, as a coordinator that has
/// only just started may not have subscribed yet: call this once before an attack too.
async fn settle(
    client: &AsyncClient,
    rejected: &mut mpsc::Receiver<rumqttc::Publish>,
    db: &std::path::Path,
) {
    static MARKERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    'marker: loop {
        let n = MARKERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("marker-{n}");
        let torn = format!(r#"{{"task_id": "{id}", "modu"#);
        client
            .publish(topics::SUBMIT, QoS::AtLeastOnce, false, torn.into_bytes())
            .await
            .unwrap();
        let wait = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Some(p)) = tokio::time::timeout_at(wait, rejected.recv()).await {
            if p.topic != topics::REJECTED {
                continue;
            }
            let event: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            if event["task_id"] == id.as_str() {
                break 'marker;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the coordinator never answered the marker"
        );
    }
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    wait_until(
        Duration::from_secs(30),
        || {
            Store::open_read_only(db)
                .and_then(|s| s.nodes_saved_ms())
                .ok()
                .flatten()
                .is_some_and(|ms| ms > after)
        },
        || "a node snapshot after the marker".into(),
    );
}

/// Waits for the `accepted` event of `task`.
async fn accepted(client: &mut Client, task: &str) {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), client.next_event())
            .await
            .expect("accepted in time")
            .expect("event");
        if ev.task_id == task {
            assert_eq!(ev.status, EventStatus::Accepted, "{:?}", ev.error);
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_broker_without_acls_forged_reports_refusals_and_a_spoofed_offline_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // mosquitto as configured by default lets anyone publish anywhere: the coordinator's own
    // checks are all that stands between the forger and the victim.
    let m = Mosquitto::required();
    let c = Coordinator::start(&dir.path().join("c"), 0, Some(&m.url()));
    let _victim = agent(&c.url, &dir.path().join("a0"), "pi5");
    c.wait_for_nodes(1);
    let (attacker, mut assignments) = stranger(
        &c.url,
        "attacker",
        &[&topics::all_nodes(NodeTopic::Tasks), topics::REJECTED],
    )
    .await;
    settle(&attacker, &mut assignments, &c.db()).await;
    let forger = Identity::from_secret(&[0xEE; 32]);
    let attack = {
        let attacker = attacker.clone();
        tokio::spawn(async move {
            while let Some(p) = assignments.recv().await {
                let Some((victim, _)) = topics::parse_node(&p.topic) else {
                    continue;
                };
                let Ok(Envelope {
                    message: Message::Assign(a),
                    ..
                }) = Envelope::decode(&p.payload)
                else {
                    continue;
                };
                // In the victim's name, at once: a wrong output under a receipt signed by another
                // key, a refusal signed by another key, and an unsigned "offline".
                let output = b"forged".to_vec();
                let receipt = Receipt {
                    task_id: a.task_id.clone(),
                    attempt: a.attempt,
                    node: victim,
                    module: a.module,
                    input: sha3_256(a.input),
                    output: sha3_256(&output),
                    fuel_used: 1,
                    limits: a.limits,
                    engine: Engine::Wasmtime,
                    exit: ambient_core::Exit::Ok,
                }
                .sign(&forger);
                let bodies = [
                    ReportBody::Executed {
                        receipt,
                        output: &output,
                        message: Default::default(),
                    },
                    ReportBody::Refused(SignedRefusal::sign(
                        &forger,
                        &a.task_id,
                        a.attempt,
                        &victim,
                        Refusal::ModuleUnavailable,
                    )),
                ];
                for body in bodies {
                    let frame = Envelope::new(Message::Report(Report {
                        task_id: a.task_id.clone(),
                        attempt: a.attempt,
                        node: victim,
                        body,
                    }))
                    .to_vec();
                    let topic = topics::node(&victim, NodeTopic::Results);
                    attacker
                        .publish(topic.as_str(), QoS::AtLeastOnce, false, frame)
                        .await
                        .unwrap();
                }
                let status = topics::node(&victim, NodeTopic::Status);
                attacker
                    .publish(
                        status.as_str(),
                        QoS::AtLeastOnce,
                        false,
                        b"offline".to_vec(),
                    )
                    .await
                    .unwrap();
                // Once: the connection's later messages are for `settle`.
                return assignments;
            }
            panic!("the attacker saw no assignment");
        })
    };

    // Long enough that the forgeries usually arrive while the real run is going.
    let n: u64 = 300_000_000;
    let sub = spin_task("targeted", n);
    let mut client = Client::connect(&c.url).await.unwrap();
    let events = client
        .run_batch(&[sub], Duration::from_secs(90), |_| {})
        .await
        .unwrap();
    let ev = &events["targeted"];
    assert_eq!(ev.status, EventStatus::Completed, "{:?}", ev.error);
    assert_eq!(
        B64.decode(ev.output_b64.as_ref().unwrap()).unwrap(),
        n.to_le_bytes()
    );
    let store = Store::open_read_only(&c.db()).unwrap();
    let row = store
        .task(&TaskId::new("targeted").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        row.attempts, 1,
        "the forgeries did not end the real attempt"
    );
    // Everything the attacker sent has been handled once its marker is answered.
    let mut rejected = attack.await.unwrap();
    settle(&attacker, &mut rejected, &c.db()).await;
    let view = &snapshot(&c.db())[0];
    assert_eq!(view.reputation.disputed, 0, "{view:?}");
    assert_eq!(view.reputation.failed, 0, "{view:?}");
    // Whether they arrived during the run (unauthenticated) or after it (stale), both forged
    // reports reached the coordinator and were dropped.
    let dropped = store.dropped().unwrap();
    assert_eq!(
        dropped["unauthenticated"] + dropped["stale_reports"],
        2,
        "{dropped:?}"
    );
    assert!(store.verify_ledger().unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_broker_without_acls_an_announce_on_another_nodes_topic_registers_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let m = Mosquitto::required();
    let c = Coordinator::start(&dir.path().join("c"), 0, Some(&m.url()));
    let (client, mut rejected) = stranger(&c.url, "misplaced", &[topics::REJECTED]).await;
    settle(&client, &mut rejected, &c.db()).await;
    let (attacker, victim) = (
        Identity::from_secret(&[1; 32]),
        Identity::from_secret(&[2; 32]),
    );
    let topic = topics::node(&victim.node_id(), NodeTopic::Announce);
    client
        .publish(
            topic.as_str(),
            QoS::AtLeastOnce,
            false,
            signed_announce(&attacker, |_| {}),
        )
        .await
        .unwrap();
    settle(&client, &mut rejected, &c.db()).await;
    assert!(snapshot(&c.db()).is_empty(), "{:?}", snapshot(&c.db()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_enrollment_stops_at_max_nodes_and_only_nodes_with_telemetry_get_work() {
    let dir = tempfile::tempdir().unwrap();
    // 2,000 keys from one client: on mosquitto, which does not check who speaks for a node.
    let m = Mosquitto::required();
    let c = Coordinator::start_with(
        &dir.path().join("c"),
        0,
        Some(&m.url()),
        "[enrollment]\nmax_nodes = 50\njoins_per_s = 100000\n",
    );
    let (client, mut rejected) = stranger(&c.url, "flood", &[topics::REJECTED]).await;
    settle(&client, &mut rejected, &c.db()).await;
    // 2,000 fresh keys, each validly signed: only announces, never telemetry.
    for i in 0..2_000u32 {
        let mut secret = [0u8; 32];
        secret[..4].copy_from_slice(&i.to_le_bytes());
        secret[31] = 0xA5;
        let id = Identity::from_secret(&secret);
        let topic = topics::node(&id.node_id(), NodeTopic::Announce);
        client
            .publish(
                topic.as_str(),
                QoS::AtMostOnce,
                false,
                signed_announce(&id, |_| {}),
            )
            .await
            .unwrap();
    }
    settle(&client, &mut rejected, &c.db()).await;
    let nodes = snapshot(&c.db());
    assert_eq!(nodes.len(), 50, "registered up to the cap and no further");

    // A task submitted now finds no node with telemetry among the 50: it waits in the queue
    // (none of the announce-only nodes receives it, so nothing waits out a dispatch deadline).
    let sub = spin_task("after-flood", 10);
    let mut submitter = Client::connect(&c.url).await.unwrap();
    submitter.submit(&sub).await.unwrap();
    accepted(&mut submitter, "after-flood").await;
    // Placement is tried in the turn that accepts the task, and journaled with it.
    let store = Store::open_read_only(&c.db()).unwrap();
    let row = store
        .task(&TaskId::new("after-flood").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(row.attempts, 0, "no announce-only node was given the task");
    submitter.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gets_work_only_after_its_first_signed_telemetry() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("c"), 0, None);
    let node = Identity::from_secret(&[3; 32]);
    let (client, mut tasks, _) = raw_client(
        device_options(&c.url, &node),
        &[topics::node(&node.node_id(), NodeTopic::Tasks).as_str()],
    )
    .await;
    let (observer, mut rejected) = stranger(&c.url, "observer", &[topics::REJECTED]).await;
    settle(&observer, &mut rejected, &c.db()).await;
    let announce = topics::node(&node.node_id(), NodeTopic::Announce);
    client
        .publish(
            announce.as_str(),
            QoS::AtLeastOnce,
            false,
            signed_announce(&node, |_| {}),
        )
        .await
        .unwrap();
    settle(&observer, &mut rejected, &c.db()).await;
    assert_eq!(snapshot(&c.db()).len(), 1, "registered");
    let mut submitter = Client::connect(&c.url).await.unwrap();
    let sub = spin_task("waits", 10);
    submitter.submit(&sub).await.unwrap();
    accepted(&mut submitter, "waits").await;
    let store = Store::open_read_only(&c.db()).unwrap();
    let row = store.task(&TaskId::new("waits").unwrap()).unwrap().unwrap();
    assert_eq!(
        row.attempts, 0,
        "an announce alone does not make a node eligible"
    );
    // Its telemetry now makes it eligible; the first assignment on its tasks topic (between
    // the coordinator's probes of its link) is this task's.
    let topic = topics::node(&node.node_id(), NodeTopic::Telemetry);
    client
        .publish(
            topic.as_str(),
            QoS::AtLeastOnce,
            false,
            signed_telemetry(&node, 1, TelemetrySample::default()),
        )
        .await
        .unwrap();
    let task = loop {
        let p = tokio::time::timeout(Duration::from_secs(30), tasks.recv())
            .await
            .expect("an assignment after telemetry")
            .expect("publish");
        match Envelope::decode(&p.payload).unwrap().message {
            Message::Assign(a) => break a.task_id.as_str().to_owned(),
            Message::Probe(_) => {}
            other => panic!("not an assignment or a probe: {other:?}"),
        }
    };
    assert_eq!(task, "waits");
    submitter.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_module_over_the_limit_is_rejected_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("c"), 0, None);
    let (client, mut rejected) = stranger(&c.url, "big", &[topics::REJECTED]).await;
    settle(&client, &mut rejected, &c.db()).await;
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    module.resize(ambient_core::MAX_MODULE_BYTES + 1, 0);
    let json = serde_json::json!({"task_id": "too-big", "module_b64": B64.encode(&module)});
    client
        .publish(
            topics::SUBMIT,
            QoS::AtLeastOnce,
            false,
            json.to_string().into_bytes(),
        )
        .await
        .unwrap();
    let event: serde_json::Value = loop {
        let p = tokio::time::timeout(Duration::from_secs(60), rejected.recv())
            .await
            .expect("an answer, not a closed connection")
            .unwrap();
        let event: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        if event["task_id"] == "too-big" {
            break event;
        }
    };
    assert_eq!(event["status"], "rejected");
    let message = event["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&ambient_core::MAX_MODULE_BYTES.to_string()),
        "{message}"
    );
}

#[test]
fn ambient_submit_refuses_an_oversize_or_text_module_before_sending_anything() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.wasm");
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    module.resize(ambient_core::MAX_MODULE_BYTES + 1, 0);
    std::fs::write(&big, &module).unwrap();
    let text = dir.path().join("hello.wat");
    std::fs::write(&text, "(module)").unwrap();
    // No broker listens on this port: the check comes first.
    let port = free_port();
    for (path, expected) in [
        (&big, ambient_core::MAX_MODULE_BYTES.to_string()),
        (&text, "wat2wasm".to_string()),
    ] {
        let out = std::process::Command::new(bin("ambient"))
            .arg("submit")
            .arg(path)
            .args(["--broker", &format!("mqtt://127.0.0.1:{port}")])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&expected), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_embedded_broker_nobody_speaks_for_a_node_reads_its_tasks_or_takes_its_client_id() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(&dir.path().join("c"), 0, None);
    let _victim = agent(&c.url, &dir.path().join("a0"), "pi5");
    c.wait_for_nodes(1);
    let victim = snapshot(&c.db())[0].node;
    let (host, port) = host_port(&c.url);

    // Its client id, without its key: refused, not a takeover.
    let client_id = format!("ambient-agent-{victim}");
    assert_eq!(
        connack(MqttOptions::new(&client_id, &host, port)).await,
        Err(ConnectReturnCode::NotAuthorized)
    );
    // With another node's valid sign-in: refused too.
    let other = Identity::from_secret(&[0x0B; 32]);
    let mut borrowed = device_options(&c.url, &other);
    borrowed.set_client_id(client_id.clone());
    assert_eq!(
        connack(borrowed).await,
        Err(ConnectReturnCode::NotAuthorized)
    );
    // Its node id as username with a password that is not its token.
    let mut guessed = MqttOptions::new(&client_id, &host, port);
    guessed.set_credentials(victim.to_hex().as_str(), "password");
    assert_eq!(
        connack(guessed).await,
        Err(ConnectReturnCode::BadUserNamePassword)
    );

    // Anonymous and as another node: subscriptions to the node's tasks fail, and reports,
    // refusals and presence published in its name reach nobody.
    let tasks = topics::node(&victim, NodeTopic::Tasks);
    let (anonymous, mut anonymous_rx, granted) = raw_client(
        MqttOptions::new("stranger", &host, port),
        &[
            tasks.as_str(),
            &topics::all_nodes(NodeTopic::Tasks),
            topics::REJECTED,
        ],
    )
    .await;
    assert_eq!(
        granted[..2],
        [SubscribeReasonCode::Failure, SubscribeReasonCode::Failure]
    );
    let (neighbour, mut neighbour_rx, granted) =
        raw_client(device_options(&c.url, &other), &[tasks.as_str()]).await;
    assert_eq!(granted, [SubscribeReasonCode::Failure]);
    settle(&anonymous, &mut anonymous_rx, &c.db()).await;
    let forger = Identity::from_secret(&[0xEE; 32]);
    let refusal = Envelope::new(Message::Report(Report {
        task_id: TaskId::new("anything").unwrap(),
        attempt: 1,
        node: victim,
        body: ReportBody::Refused(SignedRefusal::sign(
            &forger,
            &TaskId::new("anything").unwrap(),
            1,
            &victim,
            Refusal::ModuleUnavailable,
        )),
    }))
    .to_vec();
    for client in [&anonymous, &neighbour] {
        let results = topics::node(&victim, NodeTopic::Results);
        client
            .publish(results.as_str(), QoS::AtLeastOnce, false, refusal.clone())
            .await
            .unwrap();
        let status = topics::node(&victim, NodeTopic::Status);
        client
            .publish(status.as_str(), QoS::AtLeastOnce, true, b"offline".to_vec())
            .await
            .unwrap();
        let announce = topics::node(&victim, NodeTopic::Announce);
        client
            .publish(
                announce.as_str(),
                QoS::AtLeastOnce,
                true,
                signed_announce(&forger, |_| {}),
            )
            .await
            .unwrap();
    }
    settle(&anonymous, &mut anonymous_rx, &c.db()).await;
    let store = Store::open_read_only(&c.db()).unwrap();
    let dropped = store.dropped().unwrap();
    assert_eq!(
        dropped.get("unauthenticated").copied().unwrap_or(0),
        0,
        "the forgeries never reached the coordinator: {dropped:?}"
    );

    // The victim is still connected and online, and runs work; nobody else saw its assignment.
    let mut client = Client::connect(&c.url).await.unwrap();
    let sub = spin_task("still-mine", 10);
    let events = client
        .run_batch(&[sub], Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    assert_eq!(events["still-mine"].status, EventStatus::Completed);
    let row = store
        .task(&TaskId::new("still-mine").unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(row.attempts, 1);
    assert!(
        neighbour_rx.try_recv().is_err(),
        "another node received the victim's assignment"
    );
    while let Ok(p) = anonymous_rx.try_recv() {
        assert!(
            !p.topic.starts_with("ambient/v1/nodes/"),
            "a stranger received {}",
            p.topic
        );
    }
    let view = &snapshot(&c.db())[0];
    assert_eq!(view.reputation.failed, 0, "{view:?}");
}

/// A private CA and a certificate for 127.0.0.1 signed by it, made with the `openssl` CLI:
/// returns the paths of the CA certificate, the server certificate and its key.
fn make_certificates(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is needed for this test");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=ambient test CA",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// The mosquitto setup the README describes: TLS, a password file, and an ACL file whose
/// `pattern` rules let each device write only its own topics.
fn secured_mosquitto(dir: &std::path::Path, accounts: &[(&str, &str)]) -> (Mosquitto, PathBuf) {
    let (ca, cert, key) = make_certificates(dir);
    let passwd = dir.join("passwd");
    std::fs::write(&passwd, "").unwrap();
    for (user, password) in accounts {
        let status = std::process::Command::new("mosquitto_passwd")
            .args(["-b"])
            .arg(&passwd)
            .args([user, password])
            .status()
            .expect("mosquitto_passwd comes with mosquitto");
        assert!(status.success());
    }
    let acl = dir.join("acl");
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../targets/mosquitto/acl");
    std::fs::copy(shipped, &acl).unwrap();
    let settings = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nallow_anonymous false\npassword_file {}\nacl_file {}\n",
        ca.display(),
        cert.display(),
        key.display(),
        passwd.display(),
        acl.display()
    );
    let m = Mosquitto::builder()
        .settings(&settings)
        .start()
        .unwrap_or_else(|e| panic!("this test needs mosquitto: {e}"));
    (m, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_with_tls_passwords_and_acls_runs_the_flow_and_keeps_each_device_to_its_topics() {
    let dir = tempfile::tempdir().unwrap();
    let node = Identity::from_secret(&[0x51; 32]);
    let neighbour = Identity::from_secret(&[0x52; 32]);
    let (node_id, neighbour_id) = (node.node_id().to_string(), neighbour.node_id().to_string());
    let (m, ca) = secured_mosquitto(
        dir.path(),
        &[
            ("coordinator", "c-pass"),
            ("submitter", "s-pass"),
            (&node_id, "n-pass"),
            (&neighbour_id, "b-pass"),
        ],
    );
    let port = host_port(&m.url()).1;
    let url = |user: &str, password: &str| format!("mqtts://{user}:{password}@127.0.0.1:{port}");
    let tls = ambient_coordinator::TlsFiles {
        ca_file: Some(ca.clone()),
        ..Default::default()
    };

    // Nobody gets in without an account, even over TLS.
    let mut anonymous = MqttOptions::new("anonymous", "127.0.0.1", port);
    anonymous.set_transport(tls.transport().unwrap());
    assert!(connack(anonymous).await.is_err());

    let c = Coordinator::start_with(
        &dir.path().join("c"),
        0,
        Some(&url("coordinator", "c-pass")),
        &format!("[broker]\nca_file = {:?}\n", ca.display().to_string()),
    );
    let state = dir.path().join("a0");
    std::fs::create_dir_all(&state).unwrap();
    let key = state.join("identity.key");
    std::fs::write(&key, [0x51; 32]).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let _agent = agent_with_env(
        &url(&node_id, "n-pass"),
        &state,
        "pi5",
        &[("AMBIENT_AGENT_TLS__CA_FILE", ca.to_str().unwrap())],
    );
    c.wait_for_nodes(1);

    let mut client = Client::connect_with(&url("submitter", "s-pass"), &tls)
        .await
        .unwrap();
    let sub = spin_task("over-tls", 10);
    let events = client
        .run_batch(&[sub], Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    assert_eq!(events["over-tls"].status, EventStatus::Completed);
    assert_eq!(events["over-tls"].nodes, vec![node_id.clone()]);

    // The neighbour writes on the node's results topic, then on its own: the broker passes on
    // only the second.
    let watcher_url: ambient_coordinator::BrokerUrl = url("coordinator", "c-pass").parse().unwrap();
    let watcher_opts = ambient_mqtt_options(&watcher_url, "watcher", &tls);
    let (_watcher, mut seen, granted) =
        raw_client(watcher_opts, &[&topics::all_nodes(NodeTopic::Results)]).await;
    assert_eq!(granted, [SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    let neighbour_url: ambient_coordinator::BrokerUrl =
        url(&neighbour_id, "b-pass").parse().unwrap();
    let neighbour_opts = ambient_mqtt_options(
        &neighbour_url,
        &format!("ambient-agent-{neighbour_id}"),
        &tls,
    );
    let (forger, _, _) = raw_client(neighbour_opts, &[]).await;
    for (victim, payload) in [(node.node_id(), "forged"), (neighbour.node_id(), "own")] {
        let topic = topics::node(&victim, NodeTopic::Results);
        forger
            .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    let first = tokio::time::timeout(Duration::from_secs(30), seen.recv())
        .await
        .expect("the neighbour's own publish arrives")
        .unwrap();
    assert_eq!(
        (first.topic.as_str(), &first.payload[..]),
        (
            topics::node(&neighbour.node_id(), NodeTopic::Results).as_str(),
            &b"own"[..]
        ),
        "mosquitto's ACL let the neighbour write on the node's topic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_serves_devices_and_client_accounts_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certificates(dir.path());
    let hash = ambient_coordinator::access::hash_password("correct horse");
    let c = Coordinator::start_with(
        &dir.path().join("c"),
        0,
        None,
        &format!(
            "[broker]\ntls_listen = \"127.0.0.1:0\"\ntls_cert_file = {:?}\ntls_key_file = {:?}\n[broker.users]\nlaptop = {hash:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    let tls_url = c
        .tls_url
        .clone()
        .expect("the coordinator printed its TLS listener");
    let _agent = agent_with_env(
        &tls_url,
        &dir.path().join("a0"),
        "pi5",
        &[("AMBIENT_AGENT_TLS__CA_FILE", ca.to_str().unwrap())],
    );
    c.wait_for_nodes(1);
    let tls = ambient_coordinator::TlsFiles {
        ca_file: Some(ca),
        ..Default::default()
    };
    let (host, port) = host_port(&tls_url);
    let account = |password: &str| -> String { format!("mqtts://laptop:{password}@{host}:{port}") };
    let wrong: ambient_coordinator::BrokerUrl = account("wrong").parse().unwrap();
    assert_eq!(
        connack(ambient_mqtt_options(&wrong, "laptop", &tls)).await,
        Err(ConnectReturnCode::BadUserNamePassword)
    );
    // What a user of `ambient submit` reads, without the password in it.
    let refused = Client::connect_with(&account("hunter2"), &tls)
        .await
        .err()
        .expect("a wrong password is refused")
        .to_string();
    assert!(
        refused.contains("wrong user or password") && !refused.contains("hunter2"),
        "{refused}"
    );
    let mut client = Client::connect_with(&account("correct%20horse"), &tls)
        .await
        .unwrap();
    let subs: Vec<Submission> = (0..20u64)
        .map(|i| spin_task(&format!("tls-{i}"), 1000 + i))
        .collect();
    let events = client
        .run_batch(&subs, Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    for i in 0..20u64 {
        let ev = &events[&format!("tls-{i}")];
        assert_eq!(ev.status, EventStatus::Completed, "{:?}", ev.error);
        assert_eq!(
            B64.decode(ev.output_b64.as_ref().unwrap()).unwrap(),
            (1000 + i).to_le_bytes()
        );
    }
    // Plain MQTT on the TLS port gets no CONNACK.
    let (_plain, mut el) = AsyncClient::new(MqttOptions::new("plain", host, port), 10);
    let answer = tokio::time::timeout(Duration::from_secs(30), el.poll())
        .await
        .expect("the broker answers or closes");
    assert!(
        !matches!(answer, Ok(Event::Incoming(Packet::ConnAck(_)))),
        "{answer:?}"
    );
}

/// rumqttc options for `url` through the same code the binaries use.
fn ambient_mqtt_options(
    url: &ambient_coordinator::BrokerUrl,
    client_id: &str,
    tls: &ambient_coordinator::TlsFiles,
) -> MqttOptions {
    ambient_mqtt::client_options(url, client_id, tls).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_telemetry_is_cut_before_verification_and_the_other_nodes_work_on() {
    let dir = tempfile::tempdir().unwrap();
    // mosquitto without ACLs carries the flood to the coordinator; the embedded broker would
    // drop it at the door.
    let m = Mosquitto::required();
    let c = Coordinator::start(&dir.path().join("c"), 0, Some(&m.url()));
    let _victim = agent(&c.url, &dir.path().join("a0"), "pi5");
    c.wait_for_nodes(1);
    let victim = snapshot(&c.db())[0].node;
    let _bystander = agent(&c.url, &dir.path().join("a1"), "jetson-orin-nano");
    c.wait_for_nodes(2);

    // Validly framed telemetry in the victim's name, signed by another key, as fast as the
    // connection takes it, until the work below is done.
    let (flooder, _) = stranger(&c.url, "flooder", &[]).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let forger = Identity::from_secret(&[0xF1; 32]);
            let topic = topics::node(&victim, NodeTopic::Telemetry).to_string();
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let frame =
                    telemetry_frame(&forger, victim, 1_000 + sent, TelemetrySample::default());
                if flooder
                    .publish(topic.as_str(), QoS::AtMostOnce, false, frame)
                    .await
                    .is_err()
                {
                    break;
                }
                sent += 1;
            }
            sent
        })
    };

    let mut client = Client::connect(&c.url).await.unwrap();
    let started = std::time::Instant::now();
    let mut latencies = Vec::new();
    for i in 0..20u64 {
        let sub = spin_task(&format!("probe-{i}"), i);
        let t = std::time::Instant::now();
        let events = client
            .run_batch(&[sub], Duration::from_secs(60), |_| {})
            .await
            .unwrap();
        latencies.push(t.elapsed());
        let ev = &events[&format!("probe-{i}")];
        assert_eq!(ev.status, EventStatus::Completed, "{:?}", ev.error);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.await.unwrap();
    latencies.sort();
    // Reported, not asserted: timing depends on the machine.
    eprintln!(
        "flood: {sent} forged frames in {:.1} s ({:.0}/s); probe p50 {:?}",
        started.elapsed().as_secs_f64(),
        sent as f64 / started.elapsed().as_secs_f64(),
        latencies[latencies.len() / 2]
    );
    let (observer, mut rejected) = stranger(&c.url, "observer", &[topics::REJECTED]).await;
    settle(&observer, &mut rejected, &c.db()).await;
    let store = Store::open_read_only(&c.db()).unwrap();
    let dropped = store.dropped().unwrap();
    assert!(
        dropped["rate_limited"] > 0,
        "the flood reached the coordinator and was cut: {dropped:?}"
    );
    // The victim may have gone silent (its own frames were dropped with the forgeries); the
    // bystander carried on.
    let nodes = snapshot(&c.db());
    let bystander = nodes.iter().find(|v| v.node != victim).unwrap();
    assert_eq!(bystander.breaker, BreakerState::Closed, "{bystander:?}");
    assert!(bystander.online, "{bystander:?}");
}

/// Runs `ambient <args> --data-dir <data_dir>` and returns its standard output; panics with
/// its standard error if it fails.
fn ambient(data_dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(bin("ambient"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run ambient");
    assert!(
        out.status.success(),
        "ambient {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_allowlist_mode_a_new_device_waits_for_approval_and_a_revoked_one_leaves_with_its_work()
{
    let dir = tempfile::tempdir().unwrap();
    // The listed device's key, made and printed on the device before the gateway knows it.
    let listed_dir = dir.path().join("listed");
    let (listed_id, listed_key) = device_identity(&listed_dir);
    let c = Coordinator::start_with(
        &dir.path().join("c"),
        0,
        None,
        &format!("[enrollment]\nmode = \"allowlist\"\nallow = [\"{listed_key}\"]\n"),
    );
    let listed = agent(&c.url, &listed_dir, "pi5");
    c.wait_for_nodes(1);
    let _newcomer = agent(&c.url, &dir.path().join("newcomer"), "pi4");

    // The newcomer proves its key and waits: listed for the operator, given no work.
    let pending = || {
        let out = ambient(&c.data_dir, &["nodes", "enrollment", "--json"]);
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        rows.iter()
            .find(|r| r["standing"] == "pending")
            .and_then(|r| r["node"].as_str().map(str::to_owned))
    };
    wait_until(
        Duration::from_secs(60),
        || pending().is_some(),
        || "the newcomer listed as pending".into(),
    );
    let newcomer = pending().unwrap();
    assert_eq!(
        snapshot(&c.db()).len(),
        1,
        "a pending node is not registered"
    );

    // The listed node is stopped, so the task given to it stays outstanding there.
    std::process::Command::new("kill")
        .args(["-STOP", &listed.child.id().to_string()])
        .status()
        .unwrap();
    let mut client = Client::connect(&c.url).await.unwrap();
    client.submit(&spin_task("moves", 10)).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        || {
            Store::open_read_only(&c.db())
                .ok()
                .and_then(|s| s.task(&TaskId::new("moves").unwrap()).ok().flatten())
                .is_some_and(|r| r.attempts >= 1)
        },
        || "the task dispatched to the listed node".into(),
    );

    let approved = ambient(&c.data_dir, &["nodes", "approve", &newcomer]);
    assert!(
        approved.contains(&format!("approved node {newcomer}")),
        "{approved}"
    );
    // Revoking wins over the configuration's allowlist, and the task moves at once.
    let revoked = ambient(&c.data_dir, &["nodes", "revoke", &listed_key]);
    assert!(
        revoked.contains(&format!("revoked node {listed_id}")),
        "{revoked}"
    );
    let ev = loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), client.next_event())
            .await
            .expect("a result in time")
            .expect("event");
        if ev.task_id == "moves" && ev.status.is_final() {
            break ev;
        }
    };
    assert_eq!(ev.status, EventStatus::Completed, "{:?}", ev.error);
    assert_eq!(
        ev.nodes,
        std::slice::from_ref(&newcomer),
        "completed by the approved node"
    );
    // A node that merely went silent would stay listed; a revoked one is gone.
    wait_until(
        Duration::from_secs(30),
        || {
            let nodes = snapshot(&c.db());
            nodes.len() == 1 && nodes[0].node.to_hex().as_str() == newcomer
        },
        || format!("only {newcomer} in the snapshot: {:?}", snapshot(&c.db())),
    );
    let listing = ambient(&c.data_dir, &["nodes", "enrollment"]);
    assert!(
        listing.contains(&format!("{listed_id} revoked")),
        "{listing}"
    );
    assert!(
        listing.contains(&format!("{newcomer} approved")),
        "{listing}"
    );
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &listed.child.id().to_string()])
        .status();
    client.disconnect().await;
}
