//! Test harness: a broker (the embedded one, or a private mosquitto where a test needs to stop
//! and restart it, or its TLS listener), a test client playing the coordinator, an agent
//! in-process.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use ambient_agent::{AgentConfig, AgentError};
use ambient_core::{
    Abi, Assignment, Digest, Envelope, Identity, Limits, Message, NodeId, Pong, TaskId, sha3_256,
    topics,
};
use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

/// How long any awaited event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

#[allow(unused_imports)]
pub use ambient_testkit::{EmbeddedBroker, Mosquitto, free_port};

/// The embedded broker, the one `ambient coordinator` runs, on a free port.
pub async fn broker() -> EmbeddedBroker {
    EmbeddedBroker::start().await
}

/// A mosquitto of the test's own, persistent so sessions survive [`Mosquitto::restart`].
/// `extra` adds mosquitto.conf lines (a second listener). Fails the test, never skips it,
/// where mosquitto is not installed.
pub fn mosquitto_with(extra: &str) -> Mosquitto {
    Mosquitto::builder()
        .persistent()
        .settings(&format!("allow_anonymous true\n{extra}"))
        .start()
        .unwrap_or_else(|e| panic!("this test needs mosquitto: {e}"))
}

/// [`mosquitto_with`] no extra lines.
pub fn mosquitto() -> Mosquitto {
    mosquitto_with("")
}

/// A message seen by the test client.
#[derive(Debug, Clone)]
pub struct Seen {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
}

/// The test's stand-in for the coordinator: subscribed to every node topic, answering pings.
pub struct Coordinator {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Seen>,
    pump: JoinHandle<()>,
}

impl Coordinator {
    pub async fn connect(url: &str, id: &str) -> Self {
        let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(32 << 20, 32 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (subscribed_tx, mut subscribed_rx) = mpsc::unbounded_channel();
        let answer = client.clone();
        let pump = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if let Some((node, topics::NodeTopic::Telemetry)) =
                            topics::parse_node(&p.topic)
                            && let Ok(env) = Envelope::decode(&p.payload)
                            && let Message::Ping(ping) = env.message
                        {
                            let pong = Pong::sign(&coordinator_identity(), &node, ping.nonce);
                            let pong = Envelope::new(Message::Pong(pong)).to_vec();
                            let _ = answer.try_publish(
                                topics::node(&node, topics::NodeTopic::Tasks).as_str(),
                                QoS::AtMostOnce,
                                false,
                                pong,
                            );
                        }
                        let _ = tx.send(Seen {
                            topic: p.topic,
                            payload: p.payload,
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        client
            .subscribe(topics::ALL_NODES, QoS::AtLeastOnce)
            .await
            .unwrap();
        timeout(WAIT, subscribed_rx.recv())
            .await
            .expect("test client subscribed");
        Self { client, rx, pump }
    }

    /// Waits for the first message for which `f` returns `Some`, discarding others.
    pub async fn expect<T>(&mut self, what: &str, mut f: impl FnMut(&Seen) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.rx.recv(),
            )
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("pump alive");
            if let Some(v) = f(&seen) {
                return v;
            }
        }
    }

    /// Publishes a module, retained, on its content-addressed topic.
    pub async fn publish_module(&self, bytes: &[u8]) -> Digest {
        let hash = ambient_core::sha3_256(bytes);
        self.publish_module_as(hash, bytes).await;
        hash
    }

    pub async fn publish_module_as(&self, hash: Digest, bytes: &[u8]) {
        self.client
            .publish(
                topics::module(&hash).as_str(),
                QoS::AtLeastOnce,
                true,
                bytes.to_vec(),
            )
            .await
            .unwrap();
    }

    /// Sends `a` to `node`, signed with [`coordinator_identity`].
    pub async fn assign(&self, node: &NodeId, a: &Assignment<'_>) {
        self.assign_signed_by(node, a, &coordinator_identity())
            .await;
    }

    /// Sends `a` to `node`, signed by `signer`.
    pub async fn assign_signed_by(&self, node: &NodeId, a: &Assignment<'_>, signer: &Identity) {
        let mut a = a.clone();
        a.sign(signer, node, &sha3_256(a.input));
        let frame = Envelope::new(Message::Assign(a)).to_vec();
        self.send_raw(node, frame).await;
    }

    pub async fn send_raw(&self, node: &NodeId, frame: Vec<u8>) {
        self.client
            .publish(
                topics::node(node, topics::NodeTopic::Tasks).as_str(),
                QoS::AtLeastOnce,
                false,
                frame,
            )
            .await
            .unwrap();
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// An agent running in this process.
pub struct RunningAgent {
    pub node: NodeId,
    pub state_dir: PathBuf,
    stop: CancellationToken,
    handle: Option<JoinHandle<Result<(), AgentError>>>,
}

impl RunningAgent {
    pub fn start(url: &str, state_dir: &Path, tweak: impl FnOnce(&mut AgentConfig)) -> Self {
        if std::env::var_os("AMBIENT_TEST_LOGS").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter("ambient_agent=debug,rumqttc=debug")
                .with_test_writer()
                .try_init();
        }
        let node = ambient_agent::load_identity(state_dir).unwrap().node_id();
        let mut config = AgentConfig::new(url, state_dir).unwrap();
        config
            .set_telemetry_interval(Duration::from_millis(100))
            .set_reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
            .set_shutdown_grace(Duration::from_secs(5));
        tweak(&mut config);
        let stop = CancellationToken::new();
        let handle = tokio::spawn(ambient_agent::run(config, stop.clone().cancelled_owned()));
        Self {
            node,
            state_dir: state_dir.to_owned(),
            stop,
            handle: Some(handle),
        }
    }

    /// Asks the agent to shut down and waits until `run` returns.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        let handle = self.handle.take().unwrap();
        timeout(WAIT, handle)
            .await
            .expect("agent stopped in time")
            .unwrap()
            .unwrap();
    }

    pub fn outbox_len(&self) -> usize {
        std::fs::read_dir(self.state_dir.join("outbox"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.path().extension().is_some_and(|x| x == "report"))
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// Polls `cond` every 20 ms until it holds; panics after [`WAIT`] naming what was awaited.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The key the test coordinator signs assignments with.
pub fn coordinator_identity() -> Identity {
    Identity::from_secret(&[0xC0; 32])
}

/// An unsigned assignment; [`Coordinator::assign`] signs it for its node.
pub fn assignment<'a>(
    task: &str,
    module: Digest,
    abi: Abi,
    entry: &str,
    input: &'a [u8],
    limits: Limits,
) -> Assignment<'a> {
    Assignment {
        task_id: TaskId::new(task).unwrap(),
        attempt: 1,
        module,
        abi,
        entry: entry.try_into().unwrap(),
        limits,
        input,
        coordinator: [0; 32],
        batch: heapless::Vec::new(),
        signature: [0; 64],
    }
}

#[allow(unused_imports)]
pub use ambient_testkit::wat::{REVERSE as REVERSE_WAT, SPIN as SPIN_WAT};

pub fn wasm(wat: &str) -> Vec<u8> {
    wat::parse_str(wat).unwrap()
}

pub fn small_limits() -> Limits {
    Limits {
        memory_bytes: 16 << 20,
        timeout_ms: 10_000,
        fuel: 100_000_000,
    }
}
