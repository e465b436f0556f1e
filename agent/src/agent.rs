//! [`run`]: the agent's I/O. It starts the parts (identity, sandbox, calibration, outbox,
//! MQTT connection, metrics, sampler), then turns every event (connection events, incoming
//! frames, finished blocking jobs, timers, shutdown) into an input of the [`Node`] state
//! machine and performs the actions it returns. Anything slow (sampling, hashing, compiling,
//! executing, signing, fsync) runs on the blocking pool or the outbox writer; what it finds
//! comes back as the node's next input. The MQTT event loop runs in its own task (see
//! `connection`).

use std::future::Future;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ambient_core::{
    Announce, Envelope, Identity, MAX_LABELS, MAX_MESSAGE_LEN, Message, NodeId, Receipt, Refusal,
    Report, ReportBody, SignedAnnounce, SignedRefusal, sha3_256, sign_message, topics,
};
use ambient_mqtt::Backoff;
use bytes::Bytes;
use rand::Rng as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::AgentError;
use crate::calibrate;
use crate::config::{AgentConfig, EngineChoice};
use crate::connection::{self, ConnEvent, Driver, Inbound, Publisher};
use crate::dedup::TaskKey;
use crate::engine::{Call, ExecError, Execution, Prepared, Sandbox, Wasmtime, task_seed};
use crate::metrics::Metrics;
use crate::node::{
    Action, Finished, Input, Job, Leaf, Node, Phase, Settings, Start, device_outcome,
    refusal_outcome,
};
use crate::outbox::{OutboxDir, Writer};
use crate::telemetry::Sampler;

/// Frames waiting for the agent before the event loop starts dropping them.
const INBOUND_CAPACITY: usize = 256;
/// How often undelivered reports are retried while connected.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// The pinned coordinator key in the state directory: 64 hex digits.
pub const COORDINATOR_KEY_FILE: &str = "coordinator.pub";

/// Reads the pinned coordinator key, `None` if none is pinned yet.
fn load_coordinator_key(state_dir: &Path) -> Result<Option<[u8; 32]>, AgentError> {
    let path = key_file(state_dir);
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
                dropped: 0,
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
            writer,
            stored,
            coordinator_key,
            sampler,
            conn_rx,
            inbound_rx,
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

/// A compiled module, as the node passes it around.
type Module = Arc<Prepared>;

/// Everything a blocking job needs to build a report, and the metrics it counts runs in.
struct Reporter {
    identity: Arc<Identity>,
    node: NodeId,
    sandbox: Arc<dyn Sandbox>,
    metrics: Arc<Metrics>,
    #[cfg(feature = "fault-injection")]
    faults: crate::fault::Faults,
}

impl Reporter {
    fn executed(&self, job: &Job, run: Execution, started: std::time::Instant) -> Finished {
        #[cfg(feature = "fault-injection")]
        let run = {
            let mut run = run;
            if run.exit == ambient_core::Exit::Ok {
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
        let elapsed = started.elapsed();
        self.metrics.executed(run.exit, run.fuel_used, elapsed);
        Finished {
            key: job.key(),
            admitted: true,
            outcome: device_outcome(run.exit),
            payload: payload.into(),
            exit: Some(run.exit),
            fuel_used: run.fuel_used,
            elapsed,
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
        Finished {
            key,
            admitted,
            outcome: refusal_outcome(refusal),
            payload: payload.into(),
            exit: None,
            fuel_used: 0,
            elapsed: Duration::ZERO,
        }
    }
}

struct AgentParts {
    config: AgentConfig,
    identity: Arc<Identity>,
    sandbox: Arc<dyn Sandbox>,
    /// Measured at start ([`calibrate::fuel_rate`]); announced.
    fuel_per_s: Option<NonZeroU64>,
    publisher: Publisher,
    writer: Writer,
    stored: crate::outbox::Stored,
    coordinator_key: Option<[u8; 32]>,
    sampler: Sampler,
    conn_rx: mpsc::UnboundedReceiver<ConnEvent>,
    inbound_rx: mpsc::Receiver<Inbound>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    driver: JoinHandle<()>,
}

/// The shell around [`Node`]: channels in, actions out.
struct Agent {
    node: Node<Module>,
    config: AgentConfig,
    reporter: Arc<Reporter>,
    publisher: Publisher,
    topics: Topics,
    writer: Writer,
    /// Taken by one blocking job at a time (the node asks for one sample at a time).
    sampler: Arc<std::sync::Mutex<Sampler>>,
    conn_rx: mpsc::UnboundedReceiver<ConnEvent>,
    inbound_rx: mpsc::Receiver<Inbound>,
    /// What blocking jobs found: the node's next inputs.
    done_tx: mpsc::UnboundedSender<Input<Module>>,
    done_rx: mpsc::UnboundedReceiver<Input<Module>>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    driver: JoinHandle<()>,
    /// The connection task has ended.
    driver_ended: bool,
    /// A report could not be queued in this turn.
    reports_blocked: bool,
}

struct Topics {
    status: String,
    announce: String,
    telemetry: String,
    tasks: String,
    results: String,
}

impl Topics {
    fn new(node: &NodeId) -> Self {
        let topic = |leaf| topics::node(node, leaf).to_string();
        Self {
            status: topic(Leaf::Status),
            announce: topic(Leaf::Announce),
            telemetry: topic(Leaf::Telemetry),
            tasks: topic(Leaf::Tasks),
            results: topic(Leaf::Results),
        }
    }

    fn get(&self, leaf: Leaf) -> &str {
        match leaf {
            Leaf::Status => &self.status,
            Leaf::Announce => &self.announce,
            Leaf::Telemetry => &self.telemetry,
            Leaf::Tasks => &self.tasks,
            Leaf::Results => &self.results,
        }
    }
}

/// The signed announce frame; empty if it cannot be signed.
fn announce_frame(p: &AgentParts) -> Bytes {
    let announce = Announce {
        node: p.identity.node_id(),
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
        max_concurrency: p.config.max_concurrency(),
        fuel_per_s: p.fuel_per_s,
    };
    match sign_message(&p.identity, SignedAnnounce::TAG, &announce) {
        Ok(signature) => Envelope::new(Message::Announce(SignedAnnounce {
            announce,
            signature,
        }))
        .to_vec()
        .into(),
        Err(e) => {
            // Labels are bounded (8 × 32 bytes) so the announce always fits the signing
            // buffer; should it not, the node still works, it just is not announced.
            tracing::error!(error = %e, "cannot sign the announce");
            Bytes::new()
        }
    }
}

impl Agent {
    fn new(p: AgentParts) -> Self {
        let node = p.identity.node_id();
        let settings = Settings {
            max_concurrency: p.config.max_concurrency(),
            dedup_capacity: p.config.dedup_capacity(),
            safety: p.config.safety_policy(),
            module_fetch_timeout: p.config.module_fetch_timeout(),
            shutdown_grace: p.config.shutdown_grace(),
            bandwidth_probe_every: p.config.bandwidth_probe_every(),
            link_offset: p.sampler.link(),
            simulated: p.config.simulate().is_some(),
            key_file: key_file(p.config.state_dir()),
            #[cfg(feature = "fault-injection")]
            faults: p.config.faults().clone(),
        };
        let mut rng = rand::rng();
        let start = Start {
            identity: p.identity.clone(),
            announce: announce_frame(&p),
            stored: p.stored,
            coordinator_key: p.coordinator_key,
            boot_id: rng.random(),
            first_nonce: rng.random(),
        };
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            node: Node::new(settings, start, Instant::now().into_std()),
            reporter: Arc::new(Reporter {
                identity: p.identity,
                node,
                sandbox: p.sandbox,
                metrics: p.metrics.clone(),
                #[cfg(feature = "fault-injection")]
                faults: p.config.faults().clone(),
            }),
            publisher: p.publisher,
            topics: Topics::new(&node),
            writer: p.writer,
            sampler: Arc::new(std::sync::Mutex::new(p.sampler)),
            conn_rx: p.conn_rx,
            inbound_rx: p.inbound_rx,
            done_tx,
            done_rx,
            metrics: p.metrics,
            stop: p.stop,
            driver: p.driver,
            driver_ended: false,
            reports_blocked: false,
            config: p.config,
        }
    }

    async fn run(mut self, shutdown: impl Future<Output = ()> + Send) {
        tokio::pin!(shutdown);
        let mut telemetry = tokio::time::interval(self.config.telemetry_interval());
        telemetry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(RETRY_EVERY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut actions = Vec::new();
        loop {
            let deadline = self.node.next_deadline().map(Instant::from_std);
            let far = Instant::now() + Duration::from_secs(3600);
            let running = self.node.phase() == Phase::Running;
            let closing = matches!(self.node.phase(), Phase::Closing { .. });
            let (now, input) = tokio::select! {
                () = &mut shutdown, if running => (Instant::now(), Input::Shutdown),
                Some(event) = self.conn_rx.recv() => (Instant::now(), self.on_connection(event)),
                Some(frame) = self.inbound_rx.recv() => match frame {
                    Inbound::Tasks { payload, at } => (at, Input::Tasks(payload)),
                    Inbound::Module { hash, payload } => (Instant::now(), Input::Module { hash, payload }),
                },
                Some(done) = self.done_rx.recv() => (Instant::now(), done),
                _ = telemetry.tick(), if running => (Instant::now(), Input::Tick),
                _ = retry.tick() => (Instant::now(), Input::Retry),
                () = sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => (Instant::now(), Input::Timer),
                _ = &mut self.driver, if closing && !self.driver_ended => {
                    self.driver_ended = true;
                    (Instant::now(), Input::Closed)
                }
            };
            let now = now.into_std();
            if matches!(input, Input::Closed) {
                // Acknowledgements the connection passed on before it ended count first, so
                // delivered reports are not written to disk.
                while let Ok(event) = self.conn_rx.try_recv() {
                    let event = self.on_connection(event);
                    self.node.handle(now, event, &mut actions);
                }
            }
            self.node.handle(now, input, &mut actions);
            // Performing an action may answer with an input at once (a queue that is full, a
            // module not in memory): handle it in the same turn.
            let mut finished = false;
            self.reports_blocked = false;
            while !actions.is_empty() {
                for action in std::mem::take(&mut actions) {
                    finished |= matches!(action, Action::Finish);
                    if let Some(answer) = self.perform(action) {
                        self.node.handle(now, answer, &mut actions);
                    }
                }
            }
            self.metrics.outbox(self.node.outbox_len());
            if finished {
                return self.finish().await;
            }
        }
    }

    /// Stops the connection and closes the outbox writer after the writes already asked of it.
    async fn finish(&mut self) {
        self.stop.cancel();
        if !self.driver_ended {
            let _ = (&mut self.driver).await;
        }
        let mut writer = std::mem::replace(&mut self.writer, Writer::closed());
        blocking(move || writer.close()).await;
    }

    fn on_connection(&mut self, event: ConnEvent) -> Input<Module> {
        match event {
            ConnEvent::Connected => {
                tracing::info!(broker = %self.config.broker(), "connected");
                Input::Connected
            }
            ConnEvent::Lost { resend, error } => Input::Lost { resend, error },
            ConnEvent::Delivered(seq) => Input::Delivered(seq),
        }
    }

    /// Does what the node decided; returns the node's answer where there is one.
    fn perform(&mut self, action: Action<Module>) -> Option<Input<Module>> {
        match action {
            Action::Publish {
                leaf,
                qos,
                retain,
                payload,
                report,
            } => {
                // Once the client's queue refused a report, the rest of this turn's wait for
                // the next retry too, oldest first, without copying them for nothing.
                if report.is_some() && self.reports_blocked {
                    return report.map(Input::Unqueued);
                }
                let topic = self.topics.get(leaf);
                let queued = self
                    .publisher
                    .publish(topic, qos, retain, payload.to_vec(), report);
                // The node resends a report it was told was not queued; anything else is
                // sent again by the next connect, tick or duplicate assignment.
                if !queued && report.is_some() {
                    self.reports_blocked = true;
                    return report.map(Input::Unqueued);
                }
            }
            Action::SubscribeTasks => {
                self.publisher.subscribe(&self.topics.tasks);
            }
            Action::Subscribe(hash) => {
                self.publisher.subscribe(&topics::module(&hash));
            }
            Action::Unsubscribe(hash) => {
                self.publisher.unsubscribe(&topics::module(&hash));
            }
            Action::Start(job) => match self.reporter.sandbox.cached(&job.module) {
                Some(module) => self.execute(job, module),
                None => return Some(Input::NotCached(job)),
            },
            Action::Load(hash) => {
                let sandbox = self.reporter.sandbox.clone();
                self.spawn(move || Input::Loaded {
                    hash,
                    // Failing to read the cache is no reason to give up: fetch the module.
                    result: guarded("loading a module", || sandbox.load(&hash)).unwrap_or(Ok(None)),
                });
            }
            Action::Prepare { hash, payload } => {
                let sandbox = self.reporter.sandbox.clone();
                // `prepare` checks the size cap first, then the hash, then compiles and stores.
                self.spawn(move || Input::Prepared {
                    hash,
                    result: guarded("compiling a module", || sandbox.prepare(hash, &payload))
                        .unwrap_or_else(|why| Err(ExecError::Internal(why))),
                });
            }
            Action::Execute { job, module } => self.execute(job, module),
            Action::Reject { job, error } => {
                let reporter = self.reporter.clone();
                self.spawn(move || {
                    let run = Execution::rejected(&error);
                    Input::Finished(reporter.executed(&job, run, std::time::Instant::now()))
                });
            }
            Action::Refuse {
                key,
                refusal,
                admitted,
            } => {
                let reporter = self.reporter.clone();
                self.spawn(move || Input::Finished(reporter.refused(key, refusal, admitted)));
            }
            Action::Sample { running } => {
                let sampler = self.sampler.clone();
                // Uncontended: the node asks for the next sample only after this one's reading.
                self.spawn(move || {
                    let mut sampler = sampler.lock().unwrap_or_else(|p| p.into_inner());
                    match guarded("sampling", || sampler.sample(running)) {
                        Ok(reading) => Input::Reading(reading),
                        Err(_) => Input::SampleFailed,
                    }
                });
            }
            Action::Sampled(sample) => {
                self.metrics
                    .sampled(sample.temp_millic, sample.tasks_running, sample.breaker);
            }
            Action::Outbox(op) => self.writer.send(op),
            Action::PinKey { key, file } => {
                match std::fs::write(&file, format!("{}\n", hex::encode(key))) {
                    Ok(()) => {
                        tracing::info!(key = %hex::encode(key), path = %file.display(), "pinned the coordinator's key")
                    }
                    Err(e) => {
                        tracing::warn!(path = %file.display(), error = %e, "cannot store the coordinator's key; it is pinned until the agent stops")
                    }
                }
            }
            Action::Disconnect => {
                if !self.publisher.disconnect() {
                    return Some(Input::Closed);
                }
            }
            Action::Finish => {}
        }
        None
    }

    fn spawn(&self, job: impl FnOnce() -> Input<Module> + Send + 'static) {
        let done = self.done_tx.clone();
        tokio::task::spawn_blocking(move || {
            let _ = done.send(job());
        });
    }

    fn execute(&self, job: Job, module: Module) {
        let reporter = self.reporter.clone();
        self.spawn(move || {
            let started = std::time::Instant::now();
            let seed = task_seed(&job.task_id, &job.input);
            let call = Call::new(job.abi, &job.entry, &job.input, job.limits, seed);
            match guarded("running a task", || {
                reporter.sandbox.execute(&module, &call)
            }) {
                Ok(run) => Input::Finished(reporter.executed(&job, run, started)),
                // Not the task's answer: refused, so it runs elsewhere, and counted against
                // this node's breaker.
                Err(_) => {
                    let key = job.key();
                    Input::Finished(reporter.refused(key, Refusal::ModuleUnavailable, true))
                }
            }
        });
    }
}

/// Runs `f`, turning a panic (a bug in the engine or the agent, never a task's doing) into a
/// message, so that a blocking job still answers the node and no execution slot, module fetch
/// or sample is held forever.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        tracing::error!(%why, "the agent panicked while {what}");
        format!("the agent failed while {what}: {why}")
    })
}

fn key_file(state_dir: &Path) -> PathBuf {
    state_dir.join(COORDINATOR_KEY_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_a_blocking_job_becomes_an_answer_naming_it() {
        assert_eq!(guarded("adding", || 1 + 1), Ok(2));
        let failed = guarded("sampling", || -> u32 { panic!("no sensor") });
        assert_eq!(
            failed,
            Err("the agent failed while sampling: no sensor".to_owned())
        );
    }
}
