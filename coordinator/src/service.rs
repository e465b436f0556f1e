//! The coordinator service: the embedded broker, one MQTT connection, and the dispatcher thread.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use ambient_broker::{Broker, BrokerConfig, BrokerError};
use ambient_core::topics;
use rumqttc::{Event, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{BrokerMode, CoordinatorConfig};
use crate::dispatcher::{DispatchError, Dispatcher, Publish};
use crate::store::{Store, StoreError};
use crate::{Registry, mqtt};

/// Why the coordinator stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// The embedded broker could not start.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The journal could not be recovered.
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    /// The data directory could not be created.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// What the MQTT task hands the dispatcher thread.
enum Input {
    Connected,
    Submit(Vec<u8>),
    Frame(String, Vec<u8>),
    Stop,
}

/// A bound coordinator, ready to [`run`](Coordinator::run).
pub struct Coordinator {
    config: CoordinatorConfig,
    broker: Option<Broker>,
    host: String,
    port: u16,
}

impl Coordinator {
    /// Binds the embedded broker (if configured) so its address is known before running.
    ///
    /// # Errors
    /// When the broker's address is taken (the message says what to do).
    pub async fn bind(config: CoordinatorConfig) -> Result<Self, CoordinatorError> {
        let (broker, host, port) = match &config.broker {
            BrokerMode::Embedded(addr) => {
                let broker = Broker::bind(*addr, BrokerConfig::default()).await?;
                let local = broker.local_addr();
                (Some(broker), local.ip().to_string(), local.port())
            }
            BrokerMode::External { host, port } => (None, host.clone(), *port),
        };
        Ok(Self {
            config,
            broker,
            host,
            port,
        })
    }

    /// The broker agents and clients connect to, as `mqtt://host:port`.
    pub fn broker_url(&self) -> String {
        format!("mqtt://{}:{}", self.host, self.port)
    }

    /// The embedded broker's address, if there is one.
    pub fn embedded_addr(&self) -> Option<SocketAddr> {
        self.broker.as_ref().map(Broker::local_addr)
    }

    /// Runs until `shutdown` completes.
    ///
    /// # Errors
    /// When the store cannot be opened or the journal cannot be recovered.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), CoordinatorError> {
        let Self {
            config,
            broker,
            host,
            port,
        } = self;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| CoordinatorError::DataDir {
            path: config.data_dir.display().to_string(),
            source,
        })?;
        let db = config.db_path();
        let store = Store::open(&db)?;
        let dispatcher = Dispatcher::new(
            config.dispatch.clone(),
            Registry::new(config.registry.clone()),
            store,
            Instant::now(),
        )?;
        info!(db = %db.display(), broker = %format!("mqtt://{host}:{port}"), "coordinator starting");

        let cancel = CancellationToken::new();
        let broker_task = broker.map(|b| {
            let c = cancel.clone();
            tokio::spawn(async move { b.run(c.cancelled_owned()).await })
        });

        let (client, mut eventloop) = mqtt::connect(&host, port, "ambient-coordinator", true);
        let (in_tx, in_rx) = std_mpsc::channel::<Input>();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Publish>();

        let snapshot_every = config.snapshot_interval;
        let state = std::thread::Builder::new()
            .name("ambient-dispatch".into())
            .spawn(move || dispatch_loop(dispatcher, in_rx, out_tx, snapshot_every))
            .map_err(|source| CoordinatorError::DataDir {
                path: "dispatcher thread".into(),
                source,
            })?;

        let publisher = {
            let client = client.clone();
            tokio::spawn(async move {
                while let Some(p) = out_rx.recv().await {
                    let qos = if p.reliable {
                        QoS::AtLeastOnce
                    } else {
                        QoS::AtMostOnce
                    };
                    if let Err(e) = client.publish(p.topic, qos, p.retain, p.payload).await {
                        warn!(error = %e, "publish failed");
                    }
                }
            })
        };

        let mqtt = {
            let cancel = cancel.clone();
            let client = client.clone();
            let in_tx = in_tx.clone();
            tokio::spawn(async move {
                let mut backoff = Duration::from_millis(100);
                loop {
                    let event = tokio::select! {
                        e = eventloop.poll() => e,
                        () = cancel.cancelled() => break,
                    };
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            backoff = Duration::from_millis(100);
                            info!("connected to the broker");
                            let client = client.clone();
                            tokio::spawn(async move {
                                for filter in
                                    [topics::SUBMIT, topics::ALL_NODES, topics::ALL_MODULES]
                                {
                                    if let Err(e) = client.subscribe(filter, QoS::AtLeastOnce).await
                                    {
                                        warn!(%filter, error = %e, "subscribe failed");
                                    }
                                }
                            });
                            let _ = in_tx.send(Input::Connected);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let input = if p.topic == topics::SUBMIT {
                                Input::Submit(p.payload.to_vec())
                            } else {
                                Input::Frame(p.topic, p.payload.to_vec())
                            };
                            if in_tx.send(input).is_err() {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            warn!(error = %e, "broker connection lost; reconnecting in {backoff:?}");
                            tokio::select! {
                                () = tokio::time::sleep(backoff) => {}
                                () = cancel.cancelled() => break,
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            })
        };

        shutdown.await;
        info!("coordinator shutting down");
        let _ = in_tx.send(Input::Stop);
        let _ = tokio::task::spawn_blocking(move || state.join()).await;
        // The dispatcher thread dropped its sender, so the publisher drains and ends.
        let _ = publisher.await;
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            // Let the event loop send the DISCONNECT before it is cancelled.
            tokio::time::sleep(Duration::from_millis(50)).await;
        })
        .await;
        cancel.cancel();
        let _ = mqtt.await;
        if let Some(t) = broker_task
            && let Ok(Err(e)) = t.await
        {
            warn!(error = %e, "embedded broker stopped with an error");
        }
        Ok(())
    }
}

/// Most inputs handled between two journal commits.
const MAX_BATCH: usize = 2048;
/// How often time advances for dispatch deadlines.
const TICK: Duration = Duration::from_millis(100);

fn dispatch_loop(
    mut d: Dispatcher,
    rx: std_mpsc::Receiver<Input>,
    tx: mpsc::UnboundedSender<Publish>,
    snapshot_every: Duration,
) {
    let mut last_tick = Instant::now();
    let mut last_snapshot = Instant::now();
    let send = |publishes: Vec<Publish>| {
        for p in publishes {
            let _ = tx.send(p);
        }
    };
    loop {
        let first = match rx.recv_timeout(TICK) {
            Ok(i) => Some(i),
            Err(std_mpsc::RecvTimeoutError::Timeout) => None,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
        };
        // Drain what is already queued so that submissions journal in one transaction.
        let mut batch: Vec<Input> = first.into_iter().collect();
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(i) => batch.push(i),
                Err(_) => break,
            }
        }
        let now = Instant::now();
        let mut submissions = Vec::new();
        let mut stop = false;
        for input in batch {
            match input {
                Input::Submit(json) => submissions.push(json),
                Input::Frame(topic, payload) => {
                    if !submissions.is_empty() {
                        send(d.on_submissions(now, &std::mem::take(&mut submissions)));
                    }
                    if let Some((node, leaf)) = topics::parse_node(&topic) {
                        send(d.on_node_frame(now, node, leaf, &payload));
                    } else if let Some(hash) = topics::parse_module(&topic) {
                        d.on_module(hash, payload);
                    } else {
                        debug!(%topic, "publish on an unexpected topic ignored");
                    }
                }
                Input::Connected => send(d.on_connected()),
                Input::Stop => stop = true,
            }
        }
        if !submissions.is_empty() {
            send(d.on_submissions(now, &submissions));
        }
        if stop {
            d.save_snapshot(Instant::now());
            break;
        }
        if now.duration_since(last_tick) >= TICK {
            last_tick = now;
            send(d.on_tick(now));
        }
        if now.duration_since(last_snapshot) >= snapshot_every {
            last_snapshot = now;
            d.save_snapshot(now);
        }
    }
}
