//! The coordinator service: the thin shell around the [`Dispatcher`].
//!
//! Four pieces, joined by three queues:
//!
//! ```text
//!  broker ⇄ MQTT task ──inbound (bounded)──▶ dispatcher thread ──────outbound──────▶ publisher task ─▶ broker
//!           answers pings                     handle → dispatches                      ▲
//!           checks receipt signatures         → write the turn's commit                │
//!           forwards the rest                                                          │
//!                                                   │ turns (bounded)                  │
//!                                                   ▼                                  │
//!                                             sync thread: one fsync for every turn ───┘
//!                                             written meanwhile → events + PUBACKs
//! ```
//!
//! - The **MQTT task** owns the event loop. It answers pings itself (so nodes measure their own
//!   latency, not the dispatcher's backlog), checks the signatures of the receipts in results
//!   ([`Signers`]: the largest cost of a result, taken off the one dispatcher thread), and
//!   forwards every other publish with the connection generation it arrived on and the key
//!   its receipt was checked under. Acknowledgements are manual: nothing is PUBACKed on
//!   arrival. The inbound queue is bounded ([`INBOUND`]); when it is full the task waits, stops
//!   reading the socket, and the broker holds further messages: back-pressure, not loss.
//! - The **dispatcher thread** runs loop turns: it takes up to [`MAX_TURN`] inputs, feeds each
//!   to the dispatcher, signs the turn's assignments (one signature for those of each node:
//!   [`Dispatcher::seal`]) and publishes them, writes the turn's journal operations
//!   in one transaction without an fsync ([`Store::defer_sync`]; SQLite's occasional
//!   checkpoint still syncs on this thread), and hands the
//!   turn's task events and the PUBACKs of its inputs to the sync thread. Then it starts the
//!   next turn: a result that arrives while the last turn's fsync is under way is handled at
//!   once instead of waiting for it.
//! - The **sync thread** takes every turn written so far, makes them durable with one fsync of
//!   the write-ahead log ([`WalSync`]), and only then queues their events and PUBACKs, in turn
//!   order. Its queue is bounded ([`TURNS`]); a full queue holds the dispatcher back. A failed
//!   commit or fsync stops the coordinator with an error; nothing that depended on it leaves,
//!   the broker redelivers what was not acknowledged, and the next start recovers from the
//!   journal.
//! - The **publisher task** makes the publishes and acknowledgements in order. Its queue is
//!   not bounded: the single MQTT event loop both reads and writes, so a bounded outbound queue
//!   could fill while the event loop waits for room in the inbound one, and the two would wait
//!   on each other forever. Every outbound item comes from a bounded inbound turn, so the queue
//!   grows only with the work already admitted.
//!
//! On the embedded broker, the coordinator's connection goes over a Unix socket in the data
//! directory ([`BROKER_SOCKET`]) rather than loopback TCP: it carries every message of every
//! task, and a Unix socket costs each of them less in the kernel, on both ends. Where the
//! socket cannot be made (a data directory path beyond the system's limit of about 100 bytes,
//! or not UTF-8; another process listening on it), the connection falls back to TCP with a
//! warning. If the file disappears while the coordinator runs, its client keeps retrying it.
//!
//! The coordinator keeps a persistent MQTT session (`clean_session = false`) and subscribes only
//! to what it consumes: submissions, node status, announces, telemetry and results, and module
//! uploads; never to the `tasks` topics it publishes to. After every (re)connection it
//! subscribes again and the dispatcher sends every outstanding assignment and stored module
//! again, since a restarted broker keeps neither.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ambient_broker::{Broker, BrokerConfig, BrokerError};
use ambient_core::Identity;
use ambient_core::topics::{self, NodeTopic};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use ambient_mqtt::BrokerUrl;

use crate::access::{Access, Anonymous, COORDINATOR_CLIENT_ID, coordinator_login};
use crate::config::{BrokerMode, CoordinatorConfig};
use crate::dispatcher::{
    self, Checked, Dispatcher, Effects, Frame, Input, Now, Publish, Recovered, Signers,
};
use crate::ha::Discovery;
use crate::store::{Op, Standing, Store, StoreError, WalSync};
use crate::{Registry, mqtt};

/// Why the coordinator stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// The embedded broker could not start.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The store could not be opened, read for recovery, or written (a failed commit stops the
    /// coordinator rather than acknowledge what is not on disk).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The dispatcher or sync thread could not be started.
    #[error("cannot start the coordinator's threads: {0}")]
    Thread(std::io::Error),
    /// A thread of the coordinator panicked (a bug; the log above says where).
    #[error(
        "the coordinator's {0} thread panicked; nothing after its last durable turn was acknowledged"
    )]
    Panicked(&'static str),
    /// The coordinator's signing key could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] ambient_daemon::IdentityError),
    /// The broker connection could not be set up (a TLS file).
    #[error(transparent)]
    Connect(#[from] ambient_mqtt::Error),
    /// The HTTP API's address could not be bound.
    #[error(
        "cannot listen for the HTTP API on {addr}: {source} (is another coordinator running? choose another address with --http, or --http off)"
    )]
    Http {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// Inputs waiting for the dispatcher thread, at most. Each is one MQTT publish.
pub const INBOUND: usize = 4096;
/// Most inputs handled in one loop turn, that is, under one commit; a turn also ends once it
/// holds this many journal writes and events together (one message may carry 256
/// submissions, each of which writes or answers at least once).
pub const MAX_TURN: usize = 2048;
/// Written turns queued for the sync thread, at most (besides the group it is syncing).
pub const TURNS: usize = 64;
/// At start, the final events of tasks finished this recently (in ms) are published again: a
/// crash between a commit and its publishes would otherwise leave a client that saw `accepted`
/// waiting for an event that was journaled but never sent.
const REPUBLISH_FINISHED_MS: u64 = 60_000;
/// The embedded broker's Unix socket in the data directory: the coordinator's own connection.
pub const BROKER_SOCKET: &str = "broker.sock";
/// How often time advances for dispatch deadlines and queue timeouts.
const TICK: Duration = Duration::from_millis(100);
/// How often the drop counters are logged (at info, when they changed).
const DROPS_LOG_EVERY: Duration = Duration::from_secs(60);

/// The broker connection as the other tasks see it.
#[derive(Debug, Default)]
pub(crate) struct Link {
    /// Counts connections; an acknowledgement is valid only on the one its publish came on.
    pub generation: AtomicU64,
    /// Whether the client is connected now (the HTTP API's health and submissions).
    pub connected: AtomicBool,
}

/// What the MQTT task hands the dispatcher thread.
enum Inbound {
    /// The broker connection came up.
    Connected,
    /// A publish, the connection generation it arrived on (its PUBACK is only valid there),
    /// when it was read, and the evidence that its receipt's signature was checked
    /// ([`Signers::check`]).
    Publish(rumqttc::Publish, u64, Instant, Option<Checked>),
    /// Shut down after this turn.
    Stop,
}

/// A written loop turn, as the sync thread gets it: what may leave once it is durable.
#[derive(Default)]
struct Turn {
    /// How many journal operations the turn wrote, and when it began writing them; `None`
    /// when it wrote nothing (its events still wait for the turns before it).
    wrote: Option<(usize, Instant)>,
    events: Vec<Publish>,
    acks: Vec<(rumqttc::Publish, u64)>,
}

impl Turn {
    fn is_empty(&self) -> bool {
        self.wrote.is_none() && self.events.is_empty() && self.acks.is_empty()
    }
}

/// What the dispatcher thread hands the publisher task.
enum Outbound {
    Publish(Publish),
    /// The PUBACK of an input, once its turn committed.
    Ack(rumqttc::Publish, u64),
}

/// Opens the embedded broker's Unix socket for the coordinator's own connection, which carries
/// every task's messages. `None`, with a warning, where it cannot be made: that connection then
/// goes over TCP.
#[cfg(unix)]
fn listen_locally(broker: &mut Broker, data_dir: &std::path::Path) -> Option<PathBuf> {
    const FALLBACK: &str = "the coordinator reaches its embedded broker over TCP instead";
    let path = data_dir.join(BROKER_SOCKET);
    // rumqttc takes the path as a string.
    if path.to_str().is_none() {
        warn!(path = %path.display(), "the data directory's path is not UTF-8; {FALLBACK}");
        return None;
    }
    match broker.listen_on_unix_socket(&path) {
        Ok(()) => Some(path),
        Err(error) => {
            let cause =
                std::error::Error::source(&error).map_or_else(String::new, |c| format!(": {c}"));
            warn!("{error}{cause}; {FALLBACK}");
            None
        }
    }
}

/// A bound coordinator, ready to [`run`](Coordinator::run).
pub struct Coordinator {
    config: CoordinatorConfig,
    identity: Identity,
    broker: Option<Broker>,
    url: BrokerUrl,
    /// The embedded broker's Unix socket, which the coordinator's own client uses.
    local: Option<PathBuf>,
    http: Option<tokio::net::TcpListener>,
}

impl Coordinator {
    /// Binds the embedded broker (if configured) so its address is known before running.
    ///
    /// # Errors
    /// When the broker's address is taken (the message says what to do).
    pub async fn bind(config: CoordinatorConfig) -> Result<Self, CoordinatorError> {
        // The key that signs assignments: `identity.key` in the data directory, created on
        // first start. Agents pin its public half (see the README's Security section).
        let identity = ambient_daemon::load_identity(&config.data_dir)?;
        #[cfg_attr(not(unix), allow(unused_mut))]
        let mut local = None;
        let (broker, url) = match &config.broker {
            BrokerMode::Embedded(addr) => {
                let broker = Broker::bind(
                    *addr,
                    BrokerConfig {
                        // Every submission within the task limits gets an answer, not a
                        // closed connection.
                        max_packet_bytes: ambient_core::MAX_PACKET_BYTES,
                        ..BrokerConfig::default()
                    },
                )
                .await?
                .with_gatekeeper(Access {
                    coordinator: identity.public_key(),
                    anonymous: config.anonymous,
                    users: config.users.clone(),
                    home_assistant: config.home_assistant.clone(),
                });
                #[cfg_attr(not(unix), allow(unused_mut))]
                let mut broker = match &config.tls_listener {
                    Some(t) => {
                        broker
                            .with_tls_listener(t.addr, &t.cert_file, &t.key_file)
                            .await?
                    }
                    None => broker,
                };
                #[cfg(unix)]
                {
                    local = listen_locally(&mut broker, &config.data_dir);
                }
                if config.anonymous == Anonymous::Anywhere && !addr.ip().is_loopback() {
                    warn!(listen = %addr, "[broker] anonymous = \"anywhere\": anyone who reaches this address may submit tasks");
                }
                let bound = broker.local_addr();
                let url = format!("mqtt://{bound}")
                    .parse()
                    .expect("a socket address makes a broker URL");
                (Some(broker), url)
            }
            BrokerMode::External(url) => (None, url.clone()),
        };
        let http = match config.http {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| CoordinatorError::Http { addr, source })?,
            ),
            None => None,
        };
        Ok(Self {
            config,
            identity,
            broker,
            url,
            local,
            http,
        })
    }

    /// The HTTP API, as `http://host:port`, if it is on.
    pub fn http_url(&self) -> Option<String> {
        let addr = self.http.as_ref()?.local_addr().ok()?;
        Some(format!("http://{addr}"))
    }

    /// The public key that signs assignments, in hex: what agents pin.
    pub fn public_key_hex(&self) -> String {
        hex::encode(self.identity.public_key())
    }

    /// The broker agents and clients connect to, as `mqtt://host:port` (a password shows as
    /// `****`).
    pub fn broker_url(&self) -> String {
        self.url.to_string()
    }

    /// The embedded broker's TLS listener, as `mqtts://host:port`, if it has one.
    pub fn tls_url(&self) -> Option<String> {
        let addr = self.broker.as_ref()?.tls_addr()?;
        Some(format!("mqtts://{addr}"))
    }

    /// The embedded broker's address, if there is one.
    pub fn embedded_addr(&self) -> Option<SocketAddr> {
        self.broker.as_ref().map(Broker::local_addr)
    }

    /// Runs until `shutdown` completes.
    ///
    /// # Errors
    /// When the store cannot be opened, the journal cannot be recovered, or a commit fails.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), CoordinatorError> {
        let Self {
            config,
            identity,
            broker,
            url,
            local,
            http,
        } = self;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| CoordinatorError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        let embedded = broker.is_some();
        // The MQTT task's copy of the key: it signs in with it and signs pongs.
        let signer = Arc::new(Identity::from_secret(&identity.to_secret()));
        let db = config.db_path();
        let mut store = Store::open(&db)?;
        let wal = store.defer_sync()?;
        let now = Now::read();
        let recovered = Recovered {
            tasks: store.unfinished_tasks()?,
            modules: store.module_hashes()?,
            finished: store.finished_since(now.unix_ms.saturating_sub(REPUBLISH_FINISHED_MS))?,
        };
        let dispatcher = Dispatcher::recover(
            config.dispatch.clone(),
            Registry::new(config.registry.clone()),
            identity,
            recovered,
            now,
            rand::random(),
        );
        info!(db = %db.display(), broker = %url, "coordinator starting");

        let cancel = CancellationToken::new();
        let broker_task = broker.map(|b| {
            let c = cancel.clone();
            tokio::spawn(async move { b.run(c.cancelled_owned()).await })
        });

        // On the embedded broker the coordinator signs in with its key; an external broker
        // has its own accounts.
        let login = embedded.then_some({
            let signer = signer.clone();
            move || coordinator_login(&signer, Now::read().unix_ms)
        });
        let (client, eventloop) = match &local {
            #[cfg(unix)]
            Some(path) => mqtt::connect_local(
                path,
                COORDINATOR_CLIENT_ID,
                mqtt::Session::Durable,
                login.as_ref().map(|l| l()),
            ),
            _ => mqtt::connect(
                &url,
                &config.tls,
                COORDINATOR_CLIENT_ID,
                mqtt::Session::Durable,
                login.as_ref().map(|l| l()),
            )?,
        };
        let link = Arc::new(Link::default());
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let http_task = http.map(|listener| {
            let api = crate::http::Api {
                db: db.clone(),
                client: client.clone(),
                link: link.clone(),
                metrics: metrics.clone(),
                stop: cancel.clone(),
            };
            let c = cancel.clone();
            tokio::spawn(async move {
                let serve = axum::serve(listener, crate::http::router(api))
                    .with_graceful_shutdown(c.cancelled_owned());
                if let Err(e) = serve.await {
                    warn!(error = %e, "the HTTP API stopped");
                }
            })
        });
        let (in_tx, in_rx) = flume::bounded::<Inbound>(INBOUND);
        let (out_tx, out_rx) = mpsc::unbounded_channel::<Outbound>();

        let snapshot_every = config.snapshot_interval;
        let discovery = config.home_assistant.clone().map(|prefix| {
            info!(%prefix, "Home Assistant discovery on");
            Discovery::new(prefix)
        });
        let (turn_tx, turn_rx) = flume::bounded::<Turn>(TURNS);
        let syncer = {
            let (out_tx, metrics) = (out_tx.clone(), metrics.clone());
            std::thread::Builder::new()
                .name("ambient-sync".into())
                .spawn(move || sync_loop(&wal, &turn_rx, &out_tx, &metrics))
                .map_err(CoordinatorError::Thread)?
        };
        let (done_tx, mut done_rx) = oneshot::channel();
        let state = std::thread::Builder::new()
            .name("ambient-dispatch".into())
            .spawn(move || {
                let result = dispatch_loop(
                    dispatcher,
                    store,
                    in_rx,
                    Queues {
                        out: out_tx,
                        turns: turn_tx,
                    },
                    snapshot_every,
                    discovery,
                    &metrics,
                );
                let _ = done_tx.send(());
                result
            })
            .map_err(CoordinatorError::Thread)?;

        let publisher = tokio::spawn(publish_loop(client.clone(), out_rx, link.clone()));
        let beside = Beside {
            signer,
            signers: Signers::new(config.registry.max_nodes, config.registry.bad_frames_per_s),
        };
        let mqtt = tokio::spawn(mqtt_loop(
            client.clone(),
            eventloop,
            login,
            beside,
            in_tx.clone(),
            link,
            cancel.clone(),
        ));

        tokio::select! {
            () = shutdown => info!("coordinator shutting down"),
            _ = &mut done_rx => {}
        }
        let _ = in_tx.send_async(Inbound::Stop).await;
        drop(in_tx);
        // The dispatcher ends first; the sync thread then makes its last turns durable and ends
        // with the turn queue. A sync error is why the dispatcher stopped, so it comes first.
        let result = tokio::task::spawn_blocking(move || {
            let joined = |thread: std::thread::JoinHandle<Result<(), StoreError>>, name| {
                thread
                    .join()
                    .map_err(|_| CoordinatorError::Panicked(name))?
                    .map_err(CoordinatorError::from)
            };
            let dispatched = joined(state, "dispatcher");
            let synced = joined(syncer, "sync");
            synced.and(dispatched)
        })
        .await
        .unwrap_or(Err(CoordinatorError::Panicked("shutdown")));
        if let Err(e) = &result {
            error!(error = %e, "stopping without acknowledging what was not yet durable");
        }
        // Both threads dropped their senders, so the publisher drains and ends.
        let _ = publisher.await;
        let _ = client.try_disconnect();
        // Let the event loop send the DISCONNECT before it is cancelled.
        tokio::time::sleep(Duration::from_millis(50)).await;
        cancel.cancel();
        let _ = mqtt.await;
        if let Some(t) = http_task {
            let _ = t.await;
        }
        if let Some(t) = broker_task
            && let Ok(Err(e)) = t.await
        {
            warn!(error = %e, "embedded broker stopped with an error");
        }
        result
    }
}

/// The topics the coordinator consumes; never its own `tasks` topics.
fn subscriptions() -> Vec<String> {
    let mut filters = vec![topics::SUBMIT.to_string(), topics::ALL_MODULES.to_string()];
    filters.extend(
        [
            NodeTopic::Status,
            NodeTopic::Announce,
            NodeTopic::Telemetry,
            NodeTopic::Results,
        ]
        .map(|leaf| topics::all_nodes(leaf).to_string()),
    );
    filters
}

/// What the MQTT task does itself, beside the socket, so that it costs the dispatcher thread
/// nothing: it answers pings (a busy dispatcher must not look like a slow link) and checks
/// receipt signatures (see [`Signers`]). A ping read behind results therefore waits for their
/// checks, about 35 µs each: under load a node's measured latency includes that, never the
/// dispatcher's backlog.
struct Beside {
    signer: Arc<Identity>,
    signers: Signers,
}

async fn mqtt_loop(
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    login: Option<impl Fn() -> (String, String)>,
    mut beside: Beside,
    in_tx: flume::Sender<Inbound>,
    link: Arc<Link>,
    cancel: CancellationToken,
) {
    let mut backoff =
        ambient_mqtt::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let event = tokio::select! {
            e = eventloop.poll() => e,
            () = cancel.cancelled() => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                link.generation.fetch_add(1, Ordering::SeqCst);
                link.connected.store(true, Ordering::Relaxed);
                info!(
                    session_present = ack.session_present,
                    "connected to the broker"
                );
                // Subscribing goes through the request queue the event loop drains, so it
                // must not be awaited here.
                let client = client.clone();
                tokio::spawn(async move {
                    for filter in subscriptions() {
                        if let Err(e) = client.subscribe(&filter, QoS::AtLeastOnce).await {
                            warn!(%filter, error = %e, "subscribe failed");
                        }
                    }
                });
                // Once the dispatcher has ended, nothing is forwarded any more, but the event
                // loop keeps running until cancelled: the sync thread's last events and PUBACKs
                // still have to go out through it.
                let _ = in_tx.send_async(Inbound::Connected).await;
            }
            // Shutting down: the DISCONNECT is out, so do not reconnect.
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let received = Instant::now();
                let mut signed_by = None;
                if let Some((node, leaf)) = topics::parse_node(&p.topic) {
                    if let Some(pong) = dispatcher::pong(&beside.signer, node, leaf, &p.payload) {
                        // QoS 0 both ways: a lost probe is just a missing sample.
                        let _ =
                            client.try_publish(pong.topic, QoS::AtMostOnce, false, pong.payload);
                        let _ = client.try_ack(&p);
                        continue;
                    }
                    signed_by = beside.signers.check(received, node, leaf, &p.payload);
                }
                let at = link.generation.load(Ordering::SeqCst);
                // Unacknowledged when the dispatcher has ended: the broker sends it again.
                let _ = in_tx
                    .send_async(Inbound::Publish(p, at, received, signed_by))
                    .await;
            }
            Ok(_) => {}
            Err(e) => {
                link.connected.store(false, Ordering::Relaxed);
                let delay = backoff.next_delay();
                warn!(error = %e, "broker connection lost; reconnecting in {delay:?}");
                // A token is valid for minutes; the next attempt presents a fresh one.
                if let Some(login) = &login {
                    let (username, password) = login();
                    eventloop.mqtt_options.set_credentials(username, password);
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = cancel.cancelled() => break,
                }
            }
        }
    }
}

async fn publish_loop(
    client: AsyncClient,
    mut out_rx: mpsc::UnboundedReceiver<Outbound>,
    link: Arc<Link>,
) {
    while let Some(out) = out_rx.recv().await {
        let sent = match out {
            Outbound::Publish(p) => {
                let qos = if p.reliable {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                };
                client.publish(p.topic, qos, p.retain, p.payload).await
            }
            // An acknowledgement belongs to the connection its publish arrived on; after a
            // reconnect the broker sends the publish again and that copy is acknowledged.
            Outbound::Ack(p, at) if at == link.generation.load(Ordering::SeqCst) => {
                client.ack(&p).await
            }
            Outbound::Ack(..) => Ok(()),
        };
        if let Err(e) = sent {
            warn!(error = %e, "publish failed");
        }
    }
}

/// Where the dispatcher thread sends: what may leave now, and written turns.
struct Queues {
    out: mpsc::UnboundedSender<Outbound>,
    turns: flume::Sender<Turn>,
}

/// Runs loop turns until told to stop, the inbound queue closes or the sync thread stops; see
/// the module docs. `discovery`, when Home Assistant discovery is on, is fed each registry
/// snapshot.
fn dispatch_loop(
    mut d: Dispatcher,
    mut store: Store,
    rx: flume::Receiver<Inbound>,
    queues: Queues,
    snapshot_every: Duration,
    mut discovery: Option<Discovery>,
    metrics: &crate::metrics::Metrics,
) -> Result<(), StoreError> {
    let Queues { out: tx, turns } = queues;
    let mut fx = Effects::default();
    let mut turn = Turn::default();
    let mut next_tick = Instant::now() + TICK;
    let mut next_snapshot = Instant::now() + snapshot_every;
    let mut drops_logged = (d.dropped(), Instant::now() + DROPS_LOG_EVERY);
    let mut verdicts = Verdicts::default();
    verdicts.poll(&mut d, &store, Now::read(), &mut fx);
    let send = |o: Outbound| {
        let _ = tx.send(o);
    };
    // A sync thread that stopped has failed: stop too, within a tick.
    while !turns.is_disconnected() {
        let wait = next_tick.saturating_duration_since(Instant::now());
        let first = match rx.recv_timeout(wait) {
            Ok(i) => Some(i),
            Err(flume::RecvTimeoutError::Timeout) => None,
            Err(flume::RecvTimeoutError::Disconnected) => break,
        };
        let now = Now::read();
        let tick = now.at >= next_tick;
        // Probes go first and leave at once: their round trips start now, not after the
        // turn's inputs.
        if tick {
            d.handle(now, Input::Probes, &store, &mut fx);
            send_early(&d, &mut fx, &store, &send);
        }
        let mut stop = false;
        for input in first.into_iter().chain(rx.try_iter().take(MAX_TURN - 1)) {
            match input {
                Inbound::Connected => {
                    d.handle(now, Input::Connected, &store, &mut fx);
                    if let Some(ha) = &mut discovery {
                        ha.reconnected();
                    }
                }
                Inbound::Publish(p, at, received, signed_by) => {
                    route(&mut d, now, &p, received, signed_by, &store, &mut fx);
                    if p.qos != QoS::AtMostOnce {
                        turn.acks.push((p, at));
                    }
                }
                Inbound::Stop => stop = true,
            }
            if fx.journal.len() + fx.events.len() >= MAX_TURN {
                break;
            }
        }
        if tick {
            verdicts.poll(&mut d, &store, now, &mut fx);
            d.handle(now, Input::Tick, &store, &mut fx);
            next_tick = now.at + TICK;
            metrics.tasks(d.unfinished(), d.queued());
        }
        if stop || now.at >= next_snapshot {
            fx.journal.push(Op::SaveNodes {
                rows: d.node_rows(now),
                dropped: d.dropped().counts(),
                at_ms: now.unix_ms,
            });
            // Nothing journaled depends on these, so they leave at once.
            if let Some(ha) = &mut discovery {
                for p in ha.snapshot(&d.registry().views(now.at)) {
                    send(Outbound::Publish(p));
                }
            }
            next_snapshot = now.at + snapshot_every;
        }
        if now.at >= drops_logged.1 {
            let dropped = d.dropped();
            if dropped != drops_logged.0 {
                info!(?dropped, "inputs dropped since start");
            }
            drops_logged = (dropped, now.at + DROPS_LOG_EVERY);
        }
        // 1. What may leave before the commit.
        send_early(&d, &mut fx, &store, &send);
        // 2. One transaction for the whole turn, written now, made durable by the sync thread.
        if !fx.journal.is_empty() {
            let started = Instant::now();
            store.apply(&fx.journal)?;
            turn.wrote = Some((fx.journal.len(), started));
        }
        for ended in fx.outcomes.drain(..) {
            metrics.task_ended(&ended);
        }
        // 3. What depends on the commit leaves after the fsync.
        turn.events.append(&mut fx.events);
        fx.clear();
        let written = std::mem::take(&mut turn);
        if !written.is_empty() && turns.send(written).is_err() {
            break;
        }
        if stop {
            break;
        }
    }
    Ok(())
}

/// Makes written turns durable and then lets out what depended on them; see the module docs.
/// Ends when the dispatcher thread drops the turn queue, after the turns already in it.
fn sync_loop(
    wal: &WalSync,
    turns: &flume::Receiver<Turn>,
    tx: &mpsc::UnboundedSender<Outbound>,
    metrics: &crate::metrics::Metrics,
) -> Result<(), StoreError> {
    while let Ok(first) = turns.recv() {
        let group: Vec<Turn> = std::iter::once(first).chain(turns.try_iter()).collect();
        if group.iter().any(|t| t.wrote.is_some()) {
            wal.sync()?;
        }
        for turn in group {
            if let Some((ops, started)) = turn.wrote {
                metrics.committed(ops, started.elapsed().as_secs_f64());
            }
            for p in turn.events {
                let _ = tx.send(Outbound::Publish(p));
            }
            for (p, at) in turn.acks {
                let _ = tx.send(Outbound::Ack(p, at));
            }
        }
    }
    Ok(())
}

/// Sends what may leave before the turn's commit: module copies, then the assignments that
/// need them (signed now, one signature per node for the whole turn), and probes.
fn send_early(d: &Dispatcher, fx: &mut Effects, store: &Store, send: &impl Fn(Outbound)) {
    d.seal(fx);
    for hash in fx.modules.drain(..) {
        match store.module(&hash) {
            Ok(Some(bytes)) => send(Outbound::Publish(Publish {
                topic: topics::module(&hash).to_string(),
                payload: bytes,
                retain: true,
                reliable: true,
            })),
            Ok(None) => {}
            Err(e) => warn!(module = %hash, error = %e, "stored module cannot be read"),
        }
    }
    for p in fx.dispatch.drain(..) {
        send(Outbound::Publish(p));
    }
}

/// Picks up the verdicts of `ambient nodes approve`/`revoke`, which another process writes to
/// the store: its commits change the file's data version, and each verdict takes a higher
/// `seq` than the last one applied.
#[derive(Debug, Default)]
struct Verdicts {
    version: Option<i64>,
    seq: i64,
}

impl Verdicts {
    /// Feeds the dispatcher every verdict recorded since the last poll. Costs one pragma when
    /// nothing changed. A failed read is retried at the next poll.
    fn poll(&mut self, d: &mut Dispatcher, store: &Store, now: Now, fx: &mut Effects) {
        let rows = store.data_version().and_then(|version| {
            if self.version == Some(version) {
                return Ok(Vec::new());
            }
            let rows = store.decisions_since(self.seq)?;
            self.version = Some(version);
            Ok(rows)
        });
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                warn!(error = %e, "cannot read enrollment verdicts; trying again");
                return;
            }
        };
        for row in rows {
            self.seq = row.seq;
            let input = Input::Verdict {
                public_key: row.public_key,
                admit: row.standing == Standing::Approved,
                announce: row.announce.as_deref(),
            };
            d.handle(now, input, store, fx);
        }
    }
}

/// Decodes a topic into the dispatcher's input.
fn route(
    d: &mut Dispatcher,
    now: Now,
    p: &rumqttc::Publish,
    received: Instant,
    signed_by: Option<Checked>,
    store: &Store,
    fx: &mut Effects,
) {
    let (topic, payload) = (&*p.topic, &p.payload[..]);
    let input = if topic == topics::SUBMIT {
        Input::Submit(payload)
    } else if let Some((node, leaf)) = topics::parse_node(topic) {
        Input::Frame(Frame {
            node,
            leaf,
            frame: payload,
            received,
            signed_by,
        })
    } else if let Some(hash) = topics::parse_module(topic) {
        Input::Module {
            hash,
            bytes: payload,
        }
    } else {
        debug!(%topic, "publish on an unexpected topic ignored");
        return;
    };
    d.handle(now, input, store, fx);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn event(topic: &str) -> Publish {
        Publish {
            topic: topic.into(),
            payload: Vec::new(),
            retain: false,
            reliable: true,
        }
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Outbound>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|o| match o {
                Outbound::Publish(p) => p.topic,
                Outbound::Ack(p, at) => format!("ack {} on connection {at}", p.topic),
            })
            .collect()
    }

    #[test]
    fn the_sync_thread_lets_out_each_turns_events_then_its_acks_in_turn_order_and_ends_with_the_queue()
     {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("c.db")).unwrap();
        let wal = store.defer_sync().unwrap();
        let (turn_tx, turn_rx) = flume::bounded(TURNS);
        let (out_tx, mut out_rx) = mpsc::unbounded_channel();
        let submission = rumqttc::Publish::new(topics::SUBMIT, QoS::AtLeastOnce, "{}");
        let turns = [
            Turn {
                wrote: Some((1, Instant::now())),
                events: vec![event("accepted 1")],
                acks: vec![(submission, 7)],
            },
            // Nothing written, yet its event still waits for the turn before it.
            Turn {
                events: vec![event("final 0")],
                ..Turn::default()
            },
        ];
        for turn in turns {
            turn_tx.send(turn).unwrap();
        }
        drop(turn_tx);
        let metrics = Metrics::default();
        sync_loop(&wal, &turn_rx, &out_tx, &metrics).unwrap();
        assert_eq!(
            drain(&mut out_rx),
            [
                "accepted 1",
                "ack ambient/v1/tasks/submit on connection 7",
                "final 0"
            ]
        );
    }
}
