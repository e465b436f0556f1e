//! [`run`]: the agent's main task. It owns every piece of mutable state (breaker, duplicate
//! filter, outbox index, module fetches, link probe) and reacts to one event at a time:
//! connection events, incoming frames, finished blocking jobs, timers and shutdown. Anything
//! slow (sampling, hashing, compiling, executing, fsync) runs on the blocking pool and comes
//! back as a [`Done`] message; the MQTT event loop runs in its own task (see `connection`).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::num::NonZeroU64;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ambient_core::{
    Abi, Admission, Announce, Breaker, Digest, Envelope, Exit, Identity, Limits, MAX_LABELS,
    MAX_MESSAGE_LEN, Message, NodeId, Ping, Receipt, Refusal, Report, ReportBody, SignedAnnounce,
    SignedRefusal, SignedTelemetry, TaskId, Telemetry, TelemetrySample, Transition, sha3_256,
    sign_message, topics,
};
use bytes::Bytes;
use rand::Rng as _;
use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::AgentError;
use crate::calibrate;
use crate::config::{AgentConfig, EngineChoice};
use crate::connection::{self, Backoff, ConnEvent, Driver, Inbound, Publisher};
use crate::dedup::{Dedup, Seen, TaskKey};
use crate::engine::{Call, ExecError, Execution, Prepared, Sandbox, Wasmtime, task_seed};
use crate::link::{LARGE_PADDING, LinkProbe};
use crate::metrics::Metrics;
use crate::outbox::{self, OutboxDir, Writer};
use crate::telemetry::{Reading, Sampler};

/// Frames waiting for the agent before the event loop starts dropping them.
const INBOUND_CAPACITY: usize = 256;
/// Bytes of finished reports kept in memory to answer a duplicate assignment.
const REPORT_MEMORY: usize = 16 << 20;
/// Longest shutdown waits for the outbox to drain once tasks are done.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// Longest shutdown waits for the disconnect to go out.
const DISCONNECT_WAIT: Duration = Duration::from_secs(2);
/// How often undelivered reports are retried while connected.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// The pinned coordinator key in the state directory: 64 hex digits.
pub const COORDINATOR_KEY_FILE: &str = "coordinator.pub";

/// Reads the pinned coordinator key, `None` if none is pinned yet.
fn load_coordinator_key(state_dir: &Path) -> Result<Option<[u8; 32]>, AgentError> {
    let path = state_dir.join(COORDINATOR_KEY_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(AgentError::CoordinatorKey {
                path,
                reason: e.to_string(),
            });
        }
    };
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key).map_err(|e| AgentError::CoordinatorKey {
        path,
        reason: e.to_string(),
    })?;
    Ok(Some(key))
}

/// Runs an agent until `shutdown` completes, then stops taking tasks, waits for running ones
/// (up to the configured grace), publishes `offline`, flushes the outbox (bounded) and
/// disconnects.
///
/// The broker may come and go: the agent reconnects with backoff and never returns because of
/// it. Must be called inside a multi-threaded or current-thread tokio runtime.
///
/// # Errors
/// [`AgentError`] only for what prevents starting: the identity key, the state directory, the
/// sandbox, TLS setup.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    let state_dir = config.state_dir().to_owned();
    let identity = {
        let dir = state_dir.clone();
        blocking(move || ambient_daemon::load_identity(&dir)).await?
    };
    let node = identity.node_id();
    let span =
        tracing::info_span!("agent", node = %short(&node), name = config.name().unwrap_or(""));
    async move {
        let sandbox = {
            let mut sandbox_config = config.sandbox().clone();
            sandbox_config.cache_dir = Some(state_dir.join("modules"));
            sandbox_config.max_instances = (u32::from(config.max_concurrency()) * 2).max(8);
            let engine = config.engine();
            blocking(move || build_sandbox(engine, sandbox_config)).await?
        };
        let fuel_per_s = {
            let sandbox = sandbox.clone();
            match blocking(move || calibrate::fuel_rate(&*sandbox)).await {
                Ok(c) => {
                    tracing::info!(
                        fuel_per_s = c.fuel_per_s.get(),
                        run_ms = c.median_run.as_secs_f64() * 1e3,
                        "fuel rate measured on the digits kernel"
                    );
                    Some(c.fuel_per_s)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fuel rate not measured; announcing none");
                    None
                }
            }
        };
        let coordinator_key = {
            let dir = state_dir.clone();
            blocking(move || load_coordinator_key(&dir)).await?
        };
        let outbox_path = state_dir.join("outbox");
        let (outbox_dir, stored) = {
            let path = outbox_path.clone();
            blocking(move || OutboxDir::open(&path))
                .await
                .map_err(|source| AgentError::Outbox {
                    path: outbox_path,
                    source,
                })?
        };
        let outbox_dir = Arc::new(outbox_dir);
        let writer = Writer::spawn(outbox_dir.clone()).map_err(|source| AgentError::Outbox {
            path: state_dir.join("outbox"),
            source,
        })?;
        let identity = Arc::new(identity);
        // An account in the broker URL (an external broker) or else the node's own key.
        let login = config.broker().username().is_none().then(|| {
            let identity = identity.clone();
            Box::new(move || connection::login(&identity)) as Box<dyn Fn() -> _ + Send>
        });
        let opts = connection::options(&config, &node, login.as_ref().map(|l| l()))?;
        let (publisher, eventloop, delivery) = connection::client(opts);
        let (conn_tx, conn_rx) = mpsc::unbounded_channel();
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (min, max) = config.reconnect_backoff();
        let driver = tokio::spawn(
            Driver {
                eventloop,
                delivery,
                events: conn_tx,
                inbound: inbound_tx,
                tasks_topic: topics::node(&node, topics::NodeTopic::Tasks).to_string(),
                backoff: Backoff::new(min, max),
                login,
                dropped: dropped.clone(),
                stop: stop.clone(),
            }
            .run()
            .in_current_span(),
        );
        let metrics = Arc::new(Metrics::default());
        if let Some(addr) = config.metrics() {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Metrics { addr, source })?;
            let at = listener.local_addr().unwrap_or(addr);
            tracing::info!("metrics at http://{at}/metrics");
            tokio::spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
                stop.clone(),
            ));
        }
        let sampler = {
            let (simulate, zones, heater) = (
                config.simulate(),
                config.thermal_zones(),
                config.heater().clone(),
            );
            blocking(move || Sampler::new(simulate, zones, heater)).await
        };
        tracing::info!(
            broker = %config.broker(),
            engine = sandbox.engine().as_str(),
            profile = config.simulate().map(|p| p.as_str()),
            max_concurrency = config.max_concurrency(),
            outbox = stored.len(),
            "agent starting"
        );
        let agent = Agent::new(AgentParts {
            config,
            identity,
            sandbox,
            fuel_per_s,
            publisher,
            outbox_dir,
            writer,
            stored,
            coordinator_key,
            sampler,
            conn_rx,
            inbound_rx,
            dropped,
            metrics,
            stop,
            driver,
        });
        agent.run(shutdown).await;
        Ok(())
    }
    .instrument(span)
    .await
}

fn build_sandbox(
    engine: EngineChoice,
    config: crate::engine::SandboxConfig,
) -> Result<Arc<dyn Sandbox>, ExecError> {
    match engine {
        EngineChoice::Wasmtime => Ok(Arc::new(Wasmtime::new(config)?)),
        #[cfg(feature = "wasmedge")]
        EngineChoice::WasmEdge => Ok(Arc::new(crate::engine::WasmEdge::new(config)?)),
    }
}

/// Runs `f` on the blocking pool. A panic there is a bug in the agent, not input it was given,
/// so it is propagated.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn short(node: &NodeId) -> String {
    node.to_hex()[..8].to_owned()
}

/// A heapless string from `s`, cut at a character boundary to fit.
fn fixed<const N: usize>(s: &str) -> heapless::String<N> {
    let mut out = heapless::String::new();
    for c in s.chars() {
        if out.push(c).is_err() {
            break;
        }
    }
    out
}

/// An assignment the agent holds: owned, with its input sliced from the frame without copying.
#[derive(Debug, Clone)]
struct Job {
    task_id: TaskId,
    attempt: u16,
    module: Digest,
    abi: Abi,
    entry: String,
    limits: Limits,
    input: Bytes,
    /// sha3-256 of `input`: checked against the coordinator's signature, then in the receipt.
    input_hash: Digest,
    probe: bool,
}

impl Job {
    fn key(&self) -> TaskKey {
        (self.task_id.clone(), self.attempt)
    }
}

/// What a blocking job hands back.
enum Done {
    /// A report was built and signed.
    Report(Finished),
    /// A module lookup in memory and on disk ended.
    Loaded {
        hash: Digest,
        result: Result<Option<Arc<Prepared>>, ExecError>,
    },
    /// A fetched module was verified and compiled (or not).
    Fetched {
        hash: Digest,
        result: Result<Arc<Prepared>, ExecError>,
    },
    /// A telemetry reading.
    Sampled {
        sampler: Box<Sampler>,
        reading: Reading,
    },
}

struct Finished {
    key: TaskKey,
    /// Held an execution slot.
    admitted: bool,
    /// What to tell the breaker: success, failure, or nothing (refused before running).
    outcome: Option<bool>,
    payload: Bytes,
    exit: Option<Exit>,
    fuel_used: u64,
    elapsed: Duration,
}

/// Everything a blocking job needs to build and store a report.
struct Reporter {
    identity: Arc<Identity>,
    node: NodeId,
    sandbox: Arc<dyn Sandbox>,
    #[cfg(feature = "fault-injection")]
    faults: crate::fault::Faults,
}

impl Reporter {
    fn executed(&self, job: &Job, run: Execution, started: std::time::Instant) -> Finished {
        #[cfg(feature = "fault-injection")]
        let run = {
            let mut run = run;
            if run.exit == Exit::Ok {
                self.faults
                    .corrupt(&self.node, &job.task_id, job.attempt, &mut run.output);
            }
            run
        };
        let receipt = Receipt {
            task_id: job.task_id.clone(),
            attempt: job.attempt,
            node: self.node,
            module: job.module,
            input: job.input_hash,
            output: sha3_256(&run.output),
            fuel_used: run.fuel_used,
            limits: job.limits,
            engine: self.sandbox.engine(),
            exit: run.exit,
        }
        .sign(&self.identity);
        let report = Report {
            task_id: job.task_id.clone(),
            attempt: job.attempt,
            node: self.node,
            body: ReportBody::Executed {
                receipt,
                output: &run.output,
                message: fixed::<MAX_MESSAGE_LEN>(&run.message),
            },
        };
        let payload = Envelope::new(Message::Report(report)).to_vec();
        Finished {
            key: job.key(),
            admitted: true,
            outcome: device_outcome(run.exit),
            payload: payload.into(),
            exit: Some(run.exit),
            fuel_used: run.fuel_used,
            elapsed: started.elapsed(),
        }
    }

    fn refused(&self, key: TaskKey, refusal: Refusal, admitted: bool) -> Finished {
        let report = Report {
            task_id: key.0.clone(),
            attempt: key.1,
            node: self.node,
            body: ReportBody::Refused(SignedRefusal::sign(
                &self.identity,
                &key.0,
                key.1,
                &self.node,
                refusal,
            )),
        };
        let payload = Envelope::new(Message::Report(report)).to_vec();
        let outcome = match refusal {
            Refusal::ModuleUnavailable => Some(false),
            _ => None,
        };
        Finished {
            key,
            admitted,
            outcome,
            payload: payload.into(),
            exit: None,
            fuel_used: 0,
            elapsed: Duration::ZERO,
        }
    }
}

/// A module being looked up or fetched, and the jobs waiting for it.
struct Fetch {
    state: FetchState,
    waiters: Vec<Job>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FetchState {
    /// Looking in memory and on disk.
    Loading,
    /// Subscribed to the module topic until the deadline.
    Fetching { deadline: Instant },
    /// The bytes arrived and are being verified and compiled.
    Verifying,
}

/// A report the broker has not acknowledged yet.
struct Pending {
    payload: Bytes,
    /// Handed to the client; cleared when the connection drops before the broker acked it.
    queued: bool,
    /// On disk, or asked of the writer.
    stored: bool,
    made: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Shutting down: waiting for running tasks.
    Draining {
        until: Instant,
    },
    /// Shutting down: waiting for the outbox to empty.
    Flushing {
        until: Instant,
    },
    /// Shutting down: waiting for the disconnect to go out.
    Closing {
        until: Instant,
    },
    /// Done.
    Finished,
}

struct AgentParts {
    config: AgentConfig,
    identity: Arc<Identity>,
    sandbox: Arc<dyn Sandbox>,
    /// Measured at start ([`calibrate::fuel_rate`]); announced.
    fuel_per_s: Option<NonZeroU64>,
    publisher: Publisher,
    outbox_dir: Arc<OutboxDir>,
    writer: Writer,
    stored: outbox::Stored,
    coordinator_key: Option<[u8; 32]>,
    sampler: Sampler,
    conn_rx: mpsc::UnboundedReceiver<ConnEvent>,
    inbound_rx: mpsc::Receiver<Inbound>,
    dropped: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    driver: JoinHandle<()>,
}

struct Agent {
    config: AgentConfig,
    node: NodeId,
    identity: Arc<Identity>,
    reporter: Arc<Reporter>,
    publisher: Publisher,
    topics: Topics,
    start: Instant,
    breaker: Breaker,
    dedup: Dedup,
    outbox: BTreeMap<u64, Pending>,
    outbox_dir: Arc<OutboxDir>,
    writer: Writer,
    /// The coordinator key assignments must be signed with, once pinned.
    coordinator_key: Option<[u8; 32]>,
    fetches: HashMap<Digest, Fetch>,
    slots_used: usize,
    max_concurrency: usize,
    link: LinkProbe,
    sampler: Option<Box<Sampler>>,
    simulated: bool,
    link_offset: Option<(u32, u32)>,
    announce: Vec<u8>,
    telemetry_seq: u64,
    boot_id: u64,
    ticks: u64,
    connected: bool,
    shutting_down: bool,
    conn_rx: mpsc::UnboundedReceiver<ConnEvent>,
    inbound_rx: mpsc::Receiver<Inbound>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    dropped: Arc<AtomicU64>,
    duplicates: u64,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    driver: JoinHandle<()>,
}

struct Topics {
    status: String,
    announce: String,
    telemetry: String,
    tasks: String,
    results: String,
}

impl Agent {
    fn new(p: AgentParts) -> Self {
        let node = p.identity.node_id();
        let topic = |leaf| topics::node(&node, leaf).to_string();
        let topics = Topics {
            status: topic(topics::NodeTopic::Status),
            announce: topic(topics::NodeTopic::Announce),
            telemetry: topic(topics::NodeTopic::Telemetry),
            tasks: topic(topics::NodeTopic::Tasks),
            results: topic(topics::NodeTopic::Results),
        };
        let max_concurrency = p.config.max_concurrency();
        let announce = Announce {
            node,
            public_key: p.identity.public_key(),
            arch: fixed(std::env::consts::ARCH),
            cores: p.sampler.cores(),
            mem_total_bytes: p.sampler.mem_total_bytes(),
            engine: p.sandbox.engine(),
            agent_version: fixed(env!("CARGO_PKG_VERSION")),
            // At most MAX_LABELS (the config checks); `take` keeps heapless' collect from panicking.
            labels: p
                .config
                .labels()
                .iter()
                .take(MAX_LABELS)
                .map(|l| fixed(l))
                .collect(),
            profile: p.config.simulate().map(|pr| fixed(pr.as_str())),
            max_concurrency,
            fuel_per_s: p.fuel_per_s,
        };
        let announce = match sign_message(&p.identity, SignedAnnounce::TAG, &announce) {
            Ok(signature) => Envelope::new(Message::Announce(SignedAnnounce {
                announce,
                signature,
            }))
            .to_vec(),
            Err(e) => {
                // Labels are bounded (8 × 32 bytes) so the announce always fits the signing
                // buffer; should it not, the node still works, it just is not announced.
                tracing::error!(error = %e, "cannot sign the announce");
                Vec::new()
            }
        };
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let mut rng = rand::rng();
        let outbox = p
            .stored
            .into_iter()
            .map(|(seq, payload)| {
                (
                    seq,
                    Pending {
                        payload: payload.into(),
                        queued: false,
                        stored: true,
                        made: Instant::now(),
                    },
                )
            })
            .collect();
        Self {
            node,
            identity: p.identity.clone(),
            reporter: Arc::new(Reporter {
                identity: p.identity,
                node,
                sandbox: p.sandbox,
                #[cfg(feature = "fault-injection")]
                faults: p.config.faults().clone(),
            }),
            publisher: p.publisher,
            topics,
            start: Instant::now(),
            breaker: Breaker::new(p.config.safety_policy()),
            dedup: Dedup::new(p.config.dedup_capacity(), REPORT_MEMORY),
            outbox,
            outbox_dir: p.outbox_dir,
            writer: p.writer,
            coordinator_key: p.coordinator_key,
            fetches: HashMap::new(),
            slots_used: 0,
            max_concurrency: usize::from(max_concurrency),
            link: LinkProbe::new(rng.random()),
            simulated: p.config.simulate().is_some(),
            link_offset: p.sampler.link(),
            sampler: Some(Box::new(p.sampler)),
            announce,
            telemetry_seq: 0,
            boot_id: rng.random(),
            ticks: 0,
            connected: false,
            shutting_down: false,
            conn_rx: p.conn_rx,
            inbound_rx: p.inbound_rx,
            done_tx,
            done_rx,
            dropped: p.dropped,
            metrics: p.metrics,
            duplicates: 0,
            stop: p.stop,
            driver: p.driver,
            config: p.config,
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_micros() as u64
    }

    async fn run(mut self, shutdown: impl Future<Output = ()> + Send) {
        tokio::pin!(shutdown);
        let mut telemetry = tokio::time::interval(self.config.telemetry_interval());
        telemetry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(RETRY_EVERY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut phase = Phase::Running;
        loop {
            let fetch_deadline = self.next_fetch_deadline();
            let phase_deadline = match phase {
                Phase::Running | Phase::Finished => None,
                Phase::Draining { until }
                | Phase::Flushing { until }
                | Phase::Closing { until } => Some(until),
            };
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                () = &mut shutdown, if phase == Phase::Running => {
                    tracing::info!(running = self.slots_used, "shutting down: no new tasks");
                    self.begin_shutdown();
                    phase = Phase::Draining { until: Instant::now() + self.config.shutdown_grace() };
                }
                Some(event) = self.conn_rx.recv() => self.on_connection(event),
                Some(frame) = self.inbound_rx.recv() => self.on_inbound(frame),
                Some(done) = self.done_rx.recv() => self.on_done(done),
                _ = telemetry.tick(), if phase == Phase::Running => self.on_tick(),
                _ = retry.tick() => {
                    self.send_reports();
                    self.store_reports(false);
                }
                () = sleep_until(fetch_deadline.unwrap_or(far)), if fetch_deadline.is_some() => self.expire_fetches(),
                () = sleep_until(phase_deadline.unwrap_or(far)), if phase_deadline.is_some() => {}
                _ = &mut self.driver, if matches!(phase, Phase::Closing { .. }) => return,
            }
            phase = self.advance(phase).await;
            if phase == Phase::Finished {
                return;
            }
        }
    }

    /// Moves the shutdown along when its condition holds or its deadline passed.
    async fn advance(&mut self, phase: Phase) -> Phase {
        let now = Instant::now();
        match phase {
            Phase::Running | Phase::Finished => phase,
            Phase::Draining { until } if self.slots_used == 0 || now >= until => {
                if self.slots_used > 0 {
                    tracing::warn!(
                        running = self.slots_used,
                        "grace period over; abandoning running tasks"
                    );
                }
                if self.connected {
                    self.publisher.publish(
                        &self.topics.status,
                        QoS::AtLeastOnce,
                        true,
                        b"offline".to_vec(),
                        None,
                    );
                }
                self.send_reports();
                Phase::Flushing {
                    until: now
                        + FLUSH_WAIT
                            .min(self.config.shutdown_grace().max(Duration::from_millis(500))),
                }
            }
            Phase::Flushing { until }
                if self.outbox.is_empty() || !self.connected || now >= until =>
            {
                if !self.outbox.is_empty() {
                    tracing::warn!(
                        reports = self.outbox.len(),
                        "reports stay in the outbox until the next start"
                    );
                }
                if self.connected && self.publisher.disconnect() {
                    Phase::Closing {
                        until: now + DISCONNECT_WAIT,
                    }
                } else {
                    self.finish().await
                }
            }
            Phase::Closing { until } if now >= until => self.finish().await,
            other => other,
        }
    }

    /// Stops the connection and leaves every unacknowledged report on disk.
    async fn finish(&mut self) -> Phase {
        self.stop.cancel();
        let _ = (&mut self.driver).await;
        self.store_reports(true);
        let mut writer = std::mem::replace(&mut self.writer, Writer::closed());
        blocking(move || writer.close()).await;
        Phase::Finished
    }

    fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        let fetches: Vec<(Digest, Fetch)> = self.fetches.drain().collect();
        for (hash, fetch) in fetches {
            if matches!(fetch.state, FetchState::Fetching { .. }) {
                self.publisher.unsubscribe(&topics::module(&hash));
            }
            for job in fetch.waiters {
                self.refuse(job.key(), Refusal::ShuttingDown, true);
            }
        }
    }

    // --- connection -------------------------------------------------------------------------

    fn on_connection(&mut self, event: ConnEvent) {
        match event {
            ConnEvent::Connected => {
                tracing::info!(broker = %self.config.broker(), "connected");
                self.connected = true;
                self.publisher.subscribe(&self.topics.tasks);
                for (hash, fetch) in &self.fetches {
                    if matches!(fetch.state, FetchState::Fetching { .. }) {
                        self.publisher.subscribe(&topics::module(hash));
                    }
                }
                let status = if self.shutting_down {
                    "offline"
                } else {
                    "online"
                };
                self.publisher.publish(
                    &self.topics.status,
                    QoS::AtLeastOnce,
                    true,
                    status.as_bytes().to_vec(),
                    None,
                );
                if !self.announce.is_empty() {
                    self.publisher.publish(
                        &self.topics.announce,
                        QoS::AtLeastOnce,
                        true,
                        self.announce.clone(),
                        None,
                    );
                }
                self.send_reports();
                // A node gets work only once the coordinator has its signed telemetry: send a
                // sample now rather than at the next interval.
                if !self.shutting_down {
                    self.on_tick();
                }
            }
            ConnEvent::Lost { resend, error } => {
                if self.connected {
                    tracing::info!(%error, unacknowledged = resend.len(), "lost the broker; reconnecting");
                }
                self.connected = false;
                for seq in resend {
                    if let Some(p) = self.outbox.get_mut(&seq) {
                        p.queued = false;
                    }
                }
                self.store_reports(true);
            }
            ConnEvent::Delivered(seq) => {
                if let Some(p) = self.outbox.remove(&seq)
                    && p.stored
                {
                    self.writer.send(outbox::Op::Remove(seq));
                }
                self.metrics.outbox(self.outbox.len());
            }
        }
    }

    /// Writes to disk the reports that must outlive the process: all of them with `all`
    /// (offline, stopping), else those the broker has not taken within [`outbox::WRITE_AFTER`].
    fn store_reports(&mut self, all: bool) {
        let now = Instant::now();
        for (seq, pending) in self.outbox.iter_mut().filter(|(_, p)| {
            !p.stored && (all || now.saturating_duration_since(p.made) >= outbox::WRITE_AFTER)
        }) {
            self.writer
                .send(outbox::Op::Write(*seq, pending.payload.clone()));
            pending.stored = true;
        }
    }

    /// Hands every report not yet queued to the client, oldest first.
    fn send_reports(&mut self) {
        if !self.connected {
            return;
        }
        for (seq, pending) in self.outbox.iter_mut().filter(|(_, p)| !p.queued) {
            if !self.publisher.publish(
                &self.topics.results,
                QoS::AtLeastOnce,
                false,
                pending.payload.to_vec(),
                Some(*seq),
            ) {
                // The client's queue is full; the retry timer comes back for the rest.
                break;
            }
            pending.queued = true;
        }
    }

    // --- incoming frames --------------------------------------------------------------------

    fn on_inbound(&mut self, frame: Inbound) {
        match frame {
            Inbound::Tasks { payload, at } => self.on_task_frame(payload, at),
            Inbound::Module { hash, payload } => self.on_module(hash, payload),
        }
    }

    fn drop_frame(&self, why: &str) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(
            reason = why,
            dropped_frames = n,
            "dropped a frame on the tasks topic"
        );
    }

    /// Accepts only what the coordinator signed: the assignment's or pong's signature must
    /// verify for this node (checked by the caller), under the pinned key. The first valid key
    /// seen is pinned (trust on first use, like SSH's `known_hosts`) unless the operator wrote
    /// one to `coordinator.pub` beforehand.
    fn check_coordinator(&mut self, what: &str, key: [u8; 32]) -> Result<(), String> {
        match &self.coordinator_key {
            Some(pinned) if *pinned == key => Ok(()),
            Some(pinned) => Err(format!(
                "{what} signed by coordinator key {}, not the pinned {}; to trust a new coordinator, stop the agent and delete {}",
                hex::encode(key),
                hex::encode(pinned),
                self.config.state_dir().join(COORDINATOR_KEY_FILE).display()
            )),
            None => {
                let path = self.config.state_dir().join(COORDINATOR_KEY_FILE);
                if let Err(e) = std::fs::write(&path, format!("{}\n", hex::encode(key))) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot store the coordinator's key; it is pinned until the agent stops");
                }
                tracing::info!(key = %hex::encode(key), path = %path.display(), "pinned the coordinator's key");
                self.coordinator_key = Some(key);
                Ok(())
            }
        }
    }

    fn on_task_frame(&mut self, payload: Bytes, at: Instant) {
        let envelope = match Envelope::decode(&payload) {
            Ok(e) => e,
            Err(e) => return self.drop_frame(&e.to_string()),
        };
        match envelope.message {
            Message::Assign(a) => {
                let input_hash = sha3_256(a.input);
                let checked = a
                    .verify(&self.node, &input_hash)
                    .map_err(|e| format!("assignment signature: {e}"))
                    .and_then(|()| self.check_coordinator("assignment", a.coordinator));
                if let Err(why) = checked {
                    return self.drop_frame(&why);
                }
                let job = Job {
                    task_id: a.task_id,
                    attempt: a.attempt,
                    module: a.module,
                    abi: a.abi,
                    entry: a.entry.as_str().to_owned(),
                    limits: a.limits,
                    input: payload.slice_ref(a.input),
                    input_hash,
                    probe: false,
                };
                self.on_assign(job);
            }
            Message::Pong(p) => {
                let checked = p
                    .verify(&self.node)
                    .map_err(|e| format!("pong signature: {e}"))
                    .and_then(|()| self.check_coordinator("pong", p.coordinator));
                if let Err(why) = checked {
                    return self.drop_frame(&why);
                }
                let now = self.micros(at);
                self.link.pong(p.nonce, now);
            }
            _ => self.drop_frame("not an assignment or a pong"),
        }
    }

    fn on_assign(&mut self, mut job: Job) {
        let key = job.key();
        if let Some(seen) = self.dedup.get(&key).cloned() {
            return self.on_duplicate(&key, seen);
        }
        self.dedup.start(key.clone());
        if self.shutting_down {
            return self.refuse(key, Refusal::ShuttingDown, false);
        }
        // Checked before the breaker, so a refused task never takes the half-open probe slot.
        if self.slots_used >= self.max_concurrency {
            return self.refuse(key, Refusal::Busy, false);
        }
        match self.breaker.admit(self.now_ms()) {
            Admission::Admit => {}
            Admission::Probe => job.probe = true,
            Admission::Refuse(reason) => return self.refuse(key, Refusal::Breaker(reason), false),
        }
        self.slots_used += 1;
        tracing::debug!(task = %job.task_id, attempt = job.attempt, module = %job.module, "task admitted");
        self.start_job(job);
    }

    fn on_duplicate(&mut self, key: &TaskKey, seen: Seen) {
        match seen {
            Seen::Done { seq, .. } if self.outbox.contains_key(&seq) => {
                tracing::debug!(task = %key.0, attempt = key.1, "duplicate assignment; its report is on its way");
            }
            Seen::Done {
                report: Some(report),
                ..
            } => {
                tracing::info!(task = %key.0, attempt = key.1, "duplicate assignment; resending its report");
                self.publisher.publish(
                    &self.topics.results,
                    QoS::AtLeastOnce,
                    false,
                    report.to_vec(),
                    None,
                );
            }
            _ => {
                self.duplicates += 1;
                tracing::info!(task = %key.0, attempt = key.1, duplicates = self.duplicates, "dropped a duplicate assignment");
            }
        }
    }

    // --- modules and execution --------------------------------------------------------------

    fn start_job(&mut self, job: Job) {
        if let Some(module) = self.reporter.sandbox.cached(&job.module) {
            return self.execute(job, module);
        }
        let hash = job.module;
        if let Some(fetch) = self.fetches.get_mut(&hash) {
            fetch.waiters.push(job);
            return;
        }
        self.fetches.insert(
            hash,
            Fetch {
                state: FetchState::Loading,
                waiters: vec![job],
            },
        );
        let sandbox = self.reporter.sandbox.clone();
        let done = self.done_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = sandbox.load(&hash);
            let _ = done.send(Done::Loaded { hash, result });
        });
    }

    fn on_module(&mut self, hash: Digest, payload: Bytes) {
        let Some(fetch) = self.fetches.get_mut(&hash) else {
            return;
        };
        if !matches!(fetch.state, FetchState::Fetching { .. }) {
            return;
        }
        fetch.state = FetchState::Verifying;
        self.publisher.unsubscribe(&topics::module(&hash));
        let sandbox = self.reporter.sandbox.clone();
        let done = self.done_tx.clone();
        tokio::task::spawn_blocking(move || {
            // `prepare` checks the size cap first, then the hash, then compiles and stores.
            let result = sandbox.prepare(hash, &payload);
            let _ = done.send(Done::Fetched { hash, result });
        });
    }

    fn next_fetch_deadline(&self) -> Option<Instant> {
        self.fetches
            .values()
            .filter_map(|f| match f.state {
                FetchState::Fetching { deadline } => Some(deadline),
                _ => None,
            })
            .min()
    }

    fn expire_fetches(&mut self) {
        let now = Instant::now();
        let expired: Vec<Digest> = self
            .fetches
            .iter()
            .filter(
                |(_, f)| matches!(f.state, FetchState::Fetching { deadline } if deadline <= now),
            )
            .map(|(h, _)| *h)
            .collect();
        for hash in expired {
            self.publisher.unsubscribe(&topics::module(&hash));
            if let Some(fetch) = self.fetches.remove(&hash) {
                tracing::warn!(module = %hash, tasks = fetch.waiters.len(), "module did not arrive in time");
                for job in fetch.waiters {
                    self.refuse(job.key(), Refusal::ModuleUnavailable, true);
                }
            }
        }
    }

    fn on_module_ready(&mut self, hash: Digest, result: Result<Arc<Prepared>, ExecError>) {
        let Some(fetch) = self.fetches.remove(&hash) else {
            return;
        };
        match result {
            Ok(module) => {
                for job in fetch.waiters {
                    self.execute(job, module.clone());
                }
            }
            Err(ExecError::HashMismatch { actual, .. }) => {
                tracing::warn!(module = %hash, got = %actual, "module bytes do not match their hash");
                for job in fetch.waiters {
                    self.refuse(job.key(), Refusal::ModuleUnavailable, true);
                }
            }
            Err(e) => {
                tracing::warn!(module = %hash, error = %e, "module rejected");
                let error = Arc::new(e);
                for job in fetch.waiters {
                    self.reject(job, error.clone());
                }
            }
        }
    }

    fn execute(&self, job: Job, module: Arc<Prepared>) {
        let reporter = self.reporter.clone();
        let done = self.done_tx.clone();
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let seed = task_seed(&job.task_id, &job.input);
            let call = Call::new(job.abi, &job.entry, &job.input, job.limits, seed);
            let run = reporter.sandbox.execute(&module, &call);
            let _ = done.send(Done::Report(reporter.executed(&job, run, started)));
        });
    }

    fn reject(&self, job: Job, error: Arc<ExecError>) {
        let reporter = self.reporter.clone();
        let done = self.done_tx.clone();
        tokio::task::spawn_blocking(move || {
            let run = Execution::rejected(&error);
            let _ = done.send(Done::Report(reporter.executed(
                &job,
                run,
                std::time::Instant::now(),
            )));
        });
    }

    fn refuse(&self, key: TaskKey, refusal: Refusal, admitted: bool) {
        tracing::info!(task = %key.0, attempt = key.1, ?refusal, "task refused");
        let reporter = self.reporter.clone();
        let done = self.done_tx.clone();
        tokio::task::spawn_blocking(move || {
            let _ = done.send(Done::Report(reporter.refused(key, refusal, admitted)));
        });
    }

    // --- finished work ----------------------------------------------------------------------

    fn on_done(&mut self, done: Done) {
        match done {
            Done::Report(f) => self.on_report(f),
            Done::Loaded { hash, result } => match result {
                Ok(Some(module)) => self.on_module_ready(hash, Ok(module)),
                Ok(None) => self.fetch_from_broker(hash),
                Err(e) => self.on_module_ready(hash, Err(e)),
            },
            Done::Fetched { hash, result } => self.on_module_ready(hash, result),
            Done::Sampled { sampler, reading } => self.on_reading(sampler, reading),
        }
    }

    fn fetch_from_broker(&mut self, hash: Digest) {
        let Some(fetch) = self.fetches.get_mut(&hash) else {
            return;
        };
        fetch.state = FetchState::Fetching {
            deadline: Instant::now() + self.config.module_fetch_timeout(),
        };
        tracing::debug!(module = %hash, "fetching module from the broker");
        // If the client's queue is full or we are offline, the subscription is made on the
        // next connect; the deadline still holds.
        self.publisher.subscribe(&topics::module(&hash));
    }

    fn on_report(&mut self, f: Finished) {
        if f.admitted {
            self.slots_used = self.slots_used.saturating_sub(1);
        }
        if let Some(succeeded) = f.outcome {
            let now = self.now_ms();
            if let Some(t) = self.breaker.record(now, succeeded) {
                log_transition(t);
            }
        }
        if let Some(exit) = f.exit {
            self.metrics.executed(exit, f.fuel_used, f.elapsed);
        }
        match f.exit {
            Some(exit) => tracing::info!(
                task = %f.key.0,
                attempt = f.key.1,
                exit = exit.as_str(),
                fuel = f.fuel_used,
                ms = f.elapsed.as_millis() as u64,
                "task finished"
            ),
            None => tracing::debug!(task = %f.key.0, attempt = f.key.1, "refusal stored"),
        }
        let seq = self.outbox_dir.reserve();
        self.dedup.finish(f.key, seq, f.payload.clone());
        self.outbox.insert(
            seq,
            Pending {
                payload: f.payload,
                queued: false,
                stored: false,
                made: Instant::now(),
            },
        );
        self.metrics.outbox(self.outbox.len());
        if self.connected {
            self.send_reports();
        } else {
            self.store_reports(true);
        }
    }

    // --- telemetry --------------------------------------------------------------------------

    fn on_tick(&mut self) {
        let Some(mut sampler) = self.sampler.take() else {
            return;
        };
        let running = self.slots_used.min(u16::MAX as usize) as u16;
        let done = self.done_tx.clone();
        tokio::task::spawn_blocking(move || {
            let reading = sampler.sample(running);
            let _ = done.send(Done::Sampled { sampler, reading });
        });
    }

    fn on_reading(&mut self, sampler: Box<Sampler>, reading: Reading) {
        self.sampler = Some(sampler);
        let (extra_latency, link_kbps) = self.link_offset.unwrap_or((0, u32::MAX));
        let mut sample = TelemetrySample {
            bandwidth_kbps: self.link.bandwidth_kbps().map(|b| b.min(link_kbps)),
            latency_us: self
                .link
                .latency_us()
                .map(|l| l.saturating_add(extra_latency)),
            cpu_load_permille: reading.cpu_load_permille,
            mem_free_bytes: reading.mem_free_bytes,
            temp_millic: reading.temp_millic,
            throttle: reading.throttle,
            tasks_running: self.slots_used.min(u16::MAX as usize) as u16,
            simulated: self.simulated,
            ..TelemetrySample::default()
        };
        #[cfg(feature = "fault-injection")]
        self.reporter.faults.boast(&mut sample);
        let now = self.now_ms();
        if let Some(t) = self.breaker.observe(now, &sample) {
            log_transition(t);
        }
        sample.errors = self.breaker.errors();
        sample.breaker = self.breaker.state();
        self.metrics
            .sampled(sample.temp_millic, sample.tasks_running, sample.breaker);
        self.metrics.outbox(self.outbox.len());
        tracing::debug!(
            ?sample,
            dropped_frames = self.dropped.load(Ordering::Relaxed),
            duplicates = self.duplicates,
            "telemetry"
        );
        if !self.connected {
            return;
        }
        let telemetry = Telemetry {
            node: self.node,
            seq: self.telemetry_seq,
            boot_id: self.boot_id,
            sample,
        };
        self.telemetry_seq += 1;
        match sign_message(&self.identity, SignedTelemetry::TAG, &telemetry) {
            Ok(signature) => {
                let frame = Envelope::new(Message::Telemetry(SignedTelemetry {
                    telemetry,
                    signature,
                }))
                .to_vec();
                self.publisher
                    .publish(&self.topics.telemetry, QoS::AtMostOnce, false, frame, None);
            }
            Err(e) => tracing::error!(error = %e, "cannot sign telemetry"),
        }
        self.ticks += 1;
        let every = u64::from(self.config.bandwidth_probe_every());
        // The first ping is small (latency first); then every `every` intervals a large one.
        let padding = if self.ticks % every == 2 % every {
            vec![0u8; LARGE_PADDING]
        } else {
            Vec::new()
        };
        let nonce = self.link.ping(self.micros(Instant::now()), padding.len());
        let ping = Envelope::new(Message::Ping(Ping {
            node: self.node,
            nonce,
            padding: &padding,
        }))
        .to_vec();
        self.publisher
            .publish(&self.topics.telemetry, QoS::AtMostOnce, false, ping, None);
    }
}

fn log_transition(t: Transition) {
    match t.reason {
        Some(reason) => {
            tracing::warn!(from = ?t.from, to = ?t.to, %reason, "breaker opened: not taking tasks")
        }
        None => tracing::info!(from = ?t.from, to = ?t.to, "breaker changed state"),
    }
}

/// What a run says about this device's health, for its own breaker. A task that traps, runs
/// out of fuel or memory, exits with a status or is refused did what its program does, the
/// same on every node: counting it as a device error would let any client open healthy
/// nodes' breakers by submitting failing tasks. A run stopped by the wall clock says nothing
/// either way (a slow board, or a task that asked for more than its time allows).
fn device_outcome(exit: Exit) -> Option<bool> {
    match exit {
        Exit::TimedOut => None,
        _ => Some(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_program_is_no_device_error_and_a_timeout_counts_neither_way() {
        for exit in [
            Exit::Ok,
            Exit::Trapped,
            Exit::OutOfFuel,
            Exit::OutOfMemory,
            Exit::ExitStatus(1),
            Exit::Rejected,
        ] {
            assert_eq!(device_outcome(exit), Some(true), "{exit:?}");
        }
        assert_eq!(device_outcome(Exit::TimedOut), None);
    }
}
