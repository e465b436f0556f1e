//! `ambient bench`: Ambient's performance beside the physical limits, measured in the same run
//! on the same machine.
//!
//! Every figure carries a baseline (the same work without Ambient in the way: a raw MQTT
//! exchange on the same broker, one step of an ordered index, wasmtime alone, native code,
//! OpenSSL), the ratio of the two and its goal. Machines are noisy, so absolute numbers drift
//! between runs; the ratios within one run are what to compare. `bench/README.md` explains each
//! figure.
//!
//! Timing: `Instant` around batches of calls, each batch long enough that reading the clock is
//! noise, and the median over batches. Latencies of single messages are timed one by one.

use std::collections::HashMap;
use std::hint::black_box;
use std::io::Write as _;
use std::net::TcpStream;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ambient_agent::engine::{Call, Sandbox, SandboxConfig, Wasmtime};
use ambient_coordinator::client::Client;
use ambient_coordinator::store::Store;
use ambient_coordinator::{
    Coordinator, EventStatus, RawConfig, Registry, RegistryConfig, Requirements, Strategy,
    Submission, mqtt,
};
use ambient_core::{
    Abi, Announce, Breaker, Engine, Exit, Identity, Limits, NodeId, Receipt, SafetyPolicy,
    ScoreConfig, SignedAnnounce, SignedTelemetry, TaskId, Telemetry, TelemetrySample, health_score,
    sha3_256, sign_message, verify_message,
};
use anyhow::Context as _;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use rumqttc::{Event, Packet, QoS};
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The digit classifier, built from `tasks/digits-wasm` by `tasks/build.sh`.
const DIGITS_WASM: &[u8] = include_bytes!("../../../tasks/modules/digits.wasm");

/// The cheapest task the plain ABI allows: `alloc` hands out address 0, `run` returns an empty
/// output. What it costs end to end is Ambient's own overhead.
const TRIVIAL_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) i32.const 0)
  (func (export "run") (param i32 i32) (result i64) i64.const 0))"#;

/// Agents in the end-to-end runs, one per simulated profile.
const PROFILES: [&str; 4] = ["pi4", "pi5", "jetson-orin-nano", "visionfive2"];

/// Messages one task costs on the broker that the throughput goal counts: submit, dispatch,
/// result, final event. (The coordinator also publishes an `accepted` event per task.)
const MESSAGES_PER_TASK: f64 = 4.0;

/// Payload of the raw MQTT baseline messages, in bytes: about a dispatch's size.
const RAW_PAYLOAD_BYTES: usize = 128;

/// Pool sizes the scheduler is measured at; the goal applies at the largest.
const POOL_SIZES: [usize; 3] = [1_000, 10_000, 100_000];
/// Nodes ranked first by every strategy but short of the memory the request asks for, so every
/// decision skips a few, as real ones do.
const DECOYS: usize = 8;
/// Nodes whose signed samples the ingest figure replays.
const INGEST_NODES: usize = 1_000;

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ambient bench\n  ambient bench --quick\n  ambient bench --json > bench.json\n\n\
Build the agent binary too, so footprint figures can be taken:\n  cargo build --release -p ambient-agent -p ambient-coordinator && target/release/ambient bench"
)]
pub struct BenchArgs {
    /// Print one JSON object instead of the table (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Fewer iterations: a smoke run in under a minute; figures are noisier.
    #[arg(long)]
    quick: bool,
    /// Run only these sections (comma-separated), e.g. to profile one of them.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
}

/// The sections, in the order they run and print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    /// 1. End to end, on the embedded broker and on mosquitto.
    E2e,
    /// 2. Registry decisions and telemetry ingest.
    Scheduling,
    /// 3. The agent's sandbox and the digits kernel.
    Execution,
    /// 4. ambient-core's hot functions, sha3, ed25519.
    Core,
    /// 5. Binary sizes and the agent's idle memory.
    Footprint,
}

/// Iteration counts; `--quick` shrinks them.
#[derive(Debug, Clone, Copy)]
struct Plan {
    quick: bool,
    /// Shortest timed batch of a micro-benchmark sample, in ns.
    sample_ns: u64,
    /// Samples (batches) per micro-benchmark figure.
    samples: usize,
    /// Raw MQTT round trips timed (after warm-up).
    raw_round_trips: usize,
    /// Raw MQTT messages in the one-way throughput run.
    raw_messages: usize,
    /// Sequential single tasks timed end to end (after warm-up).
    sequential_tasks: usize,
    /// Tasks in the pipelined batch, and the longest it may take: a slow system is measured over
    /// this window rather than holding the run up.
    batch_tasks: usize,
    batch_cap: Duration,
    /// Signed samples per ingest node, and ingest samples taken.
    ingest_rounds: u64,
    ingest_samples: usize,
    /// Seconds OpenSSL spends on each of its measurements.
    openssl_seconds: u32,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                sample_ns: 500_000,
                samples: 15,
                raw_round_trips: 300,
                raw_messages: 10_000,
                sequential_tasks: 100,
                batch_tasks: 500,
                batch_cap: Duration::from_secs(8),
                ingest_rounds: 3,
                ingest_samples: 3,
                openssl_seconds: 1,
            }
        } else {
            Self {
                quick,
                sample_ns: 2_000_000,
                samples: 41,
                raw_round_trips: 2_000,
                raw_messages: 50_000,
                sequential_tasks: 500,
                batch_tasks: 5_000,
                batch_cap: Duration::from_secs(20),
                ingest_rounds: 10,
                ingest_samples: 5,
                openssl_seconds: 2,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------------

/// What a figure promises. Ratio goals compare with the baseline, in the figure's unit.
#[derive(Debug, Clone, Copy)]
enum Goal {
    RatioAtMost(f64),
    RatioAtLeast(f64),
    AtMost(f64),
    AtLeast(f64),
}

impl Goal {
    fn is_met(self, value: f64, ratio: Option<f64>) -> bool {
        match self {
            Self::RatioAtMost(r) => ratio.is_some_and(|x| x <= r),
            Self::RatioAtLeast(r) => ratio.is_some_and(|x| x >= r),
            Self::AtMost(v) => value <= v,
            Self::AtLeast(v) => value >= v,
        }
    }

    fn describe(self, unit: &str) -> String {
        match self {
            Self::RatioAtMost(r) => format!("≤ {}× base", bound(r)),
            Self::RatioAtLeast(r) => format!("≥ {}× base", bound(r)),
            Self::AtMost(v) => format!("≤ {} {unit}", bound(v)),
            Self::AtLeast(v) => format!("≥ {} {unit}", bound(v)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    /// Every goal met.
    Ok,
    /// At least one goal missed.
    Missed,
    /// No goal: shown for context.
    Info,
    /// Not measured here (a tool or binary is missing); `note` says why and what to do.
    Skipped,
    /// The measurement itself failed; `note` holds the error.
    Failed,
}

#[derive(Debug, Clone, Serialize)]
struct Baseline {
    value: f64,
    /// What was measured to get it.
    what: String,
}

#[derive(Debug, Clone, Serialize)]
struct GoalResult {
    goal: String,
    met: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Figure {
    section: &'static str,
    id: String,
    name: String,
    value: Option<f64>,
    unit: &'static str,
    /// In the figure's unit.
    baseline: Option<Baseline>,
    /// `value / baseline.value`.
    ratio: Option<f64>,
    goals: Vec<GoalResult>,
    status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

impl Figure {
    fn new(
        section: &'static str,
        id: impl Into<String>,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Self {
        Self {
            section,
            id: id.into(),
            name: name.into(),
            value: Some(value),
            unit,
            baseline: None,
            ratio: None,
            goals: Vec::new(),
            status: Status::Info,
            note: None,
        }
    }

    fn not_measured(
        section: &'static str,
        id: impl Into<String>,
        name: impl Into<String>,
        status: Status,
        why: String,
    ) -> Self {
        Self {
            value: None,
            status,
            note: Some(why),
            ..Self::new(section, id, name, 0.0, "")
        }
    }

    /// Sets the baseline (in the figure's unit) and the ratio.
    fn against(mut self, value: f64, what: impl Into<String>) -> Self {
        self.ratio = self.value.filter(|_| value > 0.0).map(|v| v / value);
        self.baseline = Some(Baseline {
            value,
            what: what.into(),
        });
        self
    }

    /// Adds a goal; call after [`Figure::against`] for ratio goals.
    fn goal(mut self, goal: Goal) -> Self {
        let met = self.value.is_some_and(|v| goal.is_met(v, self.ratio));
        self.goals.push(GoalResult {
            goal: goal.describe(self.unit),
            met,
        });
        self.status = if self.goals.iter().all(|g| g.met) {
            Status::Ok
        } else {
            Status::Missed
        };
        self
    }

    /// Adds a note; several are joined with "; ".
    fn note(mut self, note: impl Into<String>) -> Self {
        let note = note.into();
        self.note = Some(match self.note.take() {
            Some(earlier) => format!("{earlier}; {note}"),
            None => note,
        });
        self
    }
}

/// Turns a section's error into one failed figure, so the other sections still run.
fn section_result(section: &'static str, result: anyhow::Result<Vec<Figure>>) -> Vec<Figure> {
    result.unwrap_or_else(|e| {
        eprintln!("bench: {section}: {e:#}");
        vec![Figure::not_measured(
            section,
            format!("{section}.error"),
            "section did not complete",
            Status::Failed,
            format!("{e:#}"),
        )]
    })
}

/// A goal's bound as written (`0.4`, `3`, `10,000`), not padded with digits it does not have.
fn bound(v: f64) -> String {
    if v >= 10_000.0 {
        num(v)
    } else {
        format!("{v}")
    }
}

/// A number with as many digits as a benchmark figure deserves.
fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 {
        let digits = format!("{:.0}", v.abs());
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if v < 0.0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

// ---------------------------------------------------------------------------------------------
// Timing
// ---------------------------------------------------------------------------------------------

/// Per-call time of a micro-benchmark: the median over samples.
#[derive(Debug, Clone, Copy)]
struct Timing {
    median_ns: f64,
    calls_per_sample: u64,
}

/// Times `f`: finds a batch size that lasts at least `plan.sample_ns`, then times
/// `plan.samples` batches and returns the median per-call time.
fn time_calls<R>(plan: &Plan, mut f: impl FnMut() -> R) -> Timing {
    let mut batch = 1u64;
    loop {
        let start = Instant::now();
        for _ in 0..batch {
            black_box(f());
        }
        let ns = start.elapsed().as_nanos() as u64;
        if ns >= plan.sample_ns || batch >= 1 << 32 {
            break;
        }
        // Aim a little past the target so the next round usually ends the search.
        let scaled = batch.saturating_mul(plan.sample_ns + plan.sample_ns / 4) / ns.max(1);
        batch = scaled.clamp(batch * 2, batch * 100);
    }
    let mut per_call: Vec<f64> = (0..plan.samples)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..batch {
                black_box(f());
            }
            start.elapsed().as_nanos() as f64 / batch as f64
        })
        .collect();
    per_call.sort_by(f64::total_cmp);
    Timing {
        median_ns: percentile(&per_call, 0.5),
        calls_per_sample: batch,
    }
}

/// Nearest-rank percentile of sorted values (`p` in 0..=1).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorted durations in milliseconds.
fn sorted_ms(durations: &[Duration]) -> Vec<f64> {
    let mut ms: Vec<f64> = durations.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    ms
}

fn progress(what: &str) {
    eprintln!("bench: {what}");
}

// ---------------------------------------------------------------------------------------------
// 1. End to end
// ---------------------------------------------------------------------------------------------

/// A raw MQTT baseline: two plain rumqttc clients with TCP_NODELAY on one broker.
#[derive(Debug, Clone, Copy)]
struct RawMqtt {
    round_trip_p50_ms: f64,
    round_trip_p99_ms: f64,
    one_way_per_s: f64,
}

/// One raw client: its handle and the task polling its event loop.
struct RawClient {
    client: rumqttc::AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl RawClient {
    /// Connects, subscribes to `filter` at QoS 1, and returns once the subscription is
    /// acknowledged. `on_publish` sees every publish received, inside the event loop task.
    async fn connect(
        url: &str,
        id: &str,
        filter: &str,
        mut on_publish: impl FnMut(&rumqttc::AsyncClient, rumqttc::Publish) + Send + 'static,
    ) -> anyhow::Result<Self> {
        let url: ambient_mqtt::BrokerUrl = url.parse()?;
        let (client, mut eventloop) = mqtt::connect(
            &url,
            &ambient_mqtt::TlsFiles::default(),
            id,
            mqtt::Session::Clean,
            None,
        )?;
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .context("cannot queue a subscription")?;
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), String>>();
        let handle = client.clone();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => on_publish(&handle, p),
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(Err(e.to_string()));
                        }
                        break;
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(Self { client, task }),
            Ok(Ok(Err(e))) => {
                task.abort();
                anyhow::bail!("raw MQTT client cannot connect to {url}: {e}")
            }
            _ => {
                task.abort();
                anyhow::bail!(
                    "raw MQTT client got no subscription acknowledgement from {url} within 10 s"
                )
            }
        }
    }

    async fn close(mut self) {
        let _ = self.client.disconnect().await;
        // An event loop still busy after a second is abandoned: nothing reads from it any more.
        if tokio::time::timeout(Duration::from_secs(1), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

/// Measures the raw limits of the broker at `url`: QoS 1 round trips (A publishes, B echoes,
/// A receives) one at a time, and a QoS 1 flood from A to B with many messages in flight.
async fn raw_mqtt(url: &str, plan: &Plan) -> anyhow::Result<RawMqtt> {
    let tag = format!("{:08x}", rand::random::<u32>());
    // B subscribes to everything under `to-b`; A only to its pongs.
    let ping = format!("ambient-bench/{tag}/to-b/ping");
    let flood = format!("ambient-bench/{tag}/to-b/flood");
    let pong = format!("ambient-bench/{tag}/to-a/pong");

    let received = Arc::new(AtomicU64::new(0));
    let target = Arc::new(AtomicU64::new(u64::MAX));
    let done = Arc::new(Notify::new());
    let b = {
        let (ping, pong, flood, received, target, done) = (
            ping.clone(),
            pong.clone(),
            flood.clone(),
            received.clone(),
            target.clone(),
            done.clone(),
        );
        RawClient::connect(
            url,
            &format!("ambient-bench-b-{tag}"),
            &format!("ambient-bench/{tag}/to-b/+"),
            move |client, p| {
                if p.topic == flood {
                    if received.fetch_add(1, Ordering::Relaxed) + 1
                        >= target.load(Ordering::Relaxed)
                    {
                        done.notify_one();
                    }
                } else if p.topic == ping {
                    let _ = client.try_publish(
                        pong.as_str(),
                        QoS::AtLeastOnce,
                        false,
                        p.payload.to_vec(),
                    );
                }
            },
        )
        .await?
    };
    let (pong_tx, mut pong_rx) = mpsc::unbounded_channel::<()>();
    let a = RawClient::connect(
        url,
        &format!("ambient-bench-a-{tag}"),
        &pong,
        move |_, _| {
            let _ = pong_tx.send(());
        },
    )
    .await?;

    let payload = vec![0x5a_u8; RAW_PAYLOAD_BYTES];
    let warm_up = plan.raw_round_trips / 10 + 10;
    let mut round_trips = Vec::with_capacity(plan.raw_round_trips);
    for i in 0..warm_up + plan.raw_round_trips {
        let start = Instant::now();
        a.client
            .publish(ping.as_str(), QoS::AtLeastOnce, false, payload.clone())
            .await
            .context("raw publish failed")?;
        tokio::time::timeout(Duration::from_secs(5), pong_rx.recv())
            .await
            .context("a raw QoS 1 round trip took longer than 5 s")?
            .context("the raw MQTT client disconnected")?;
        if i >= warm_up {
            round_trips.push(start.elapsed());
        }
    }

    let n = plan.raw_messages as u64;
    received.store(0, Ordering::Relaxed);
    target.store(n, Ordering::Relaxed);
    let start = Instant::now();
    for _ in 0..n {
        a.client
            .publish(flood.as_str(), QoS::AtLeastOnce, false, payload.clone())
            .await
            .context("raw publish failed")?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.load(Ordering::Relaxed) < n {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(
            tokio::time::timeout(left, done.notified()).await.is_ok()
                || received.load(Ordering::Relaxed) >= n,
            "only {} of {n} raw QoS 1 messages arrived within 60 s",
            received.load(Ordering::Relaxed)
        );
    }
    let one_way_per_s = n as f64 / start.elapsed().as_secs_f64();
    a.close().await;
    b.close().await;

    let ms = sorted_ms(&round_trips);
    Ok(RawMqtt {
        round_trip_p50_ms: percentile(&ms, 0.5),
        round_trip_p99_ms: percentile(&ms, 0.99),
        one_way_per_s,
    })
}

/// What the end-to-end run measured, and the raw limits beside it.
struct EndToEnd {
    raw: RawMqtt,
    /// p50 of one 4 KiB write + fsync in the coordinator's data directory, in ms.
    fsync_p50_ms: f64,
    /// One receipt sign (agent) and one verify (coordinator), medians, in ms.
    sign_ms: f64,
    verify_ms: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    tasks_per_s: f64,
    /// Tasks of the batch that completed, and that had no final event when the cap ran out.
    completed: usize,
    unfinished: usize,
    /// Why the first task that did not complete ended, if one did.
    first_failure: Option<String>,
    /// Agents whose breaker was not closed right after the batch.
    tripped: usize,
}

/// A receipt as an agent signs one, and its signer.
fn bench_receipt() -> anyhow::Result<(Identity, Receipt)> {
    let identity = Identity::from_secret(&[0x42; 32]);
    let receipt = Receipt {
        task_id: TaskId::new("bench-task-000001").context("the bench task id is invalid")?,
        attempt: 1,
        node: identity.node_id(),
        module: sha3_256(b"module"),
        input: sha3_256(b"input"),
        output: sha3_256(b"output"),
        fuel_used: 12_345_678,
        limits: Limits::default(),
        engine: Engine::Wasmtime,
        exit: Exit::Ok,
    };
    Ok((identity, receipt))
}

/// Times signing `receipt` (commitment + ed25519) and verifying the signed copy.
fn sign_and_verify(
    plan: &Plan,
    identity: &Identity,
    receipt: &Receipt,
) -> anyhow::Result<(Timing, Timing)> {
    let public_key = identity.public_key();
    let sign = time_calls(plan, || black_box(receipt).clone().sign(identity));
    let signed = receipt.clone().sign(identity);
    signed.verify_signature(&public_key)?;
    let verify = time_calls(plan, || black_box(&signed).verify_signature(&public_key));
    Ok((sign, verify))
}

/// Runs raw MQTT, then a coordinator and four agents, on the embedded broker (`external` is
/// `None`) or on an external one, and measures single-task latency and batch throughput.
async fn end_to_end(plan: Plan, external: Option<String>) -> anyhow::Result<EndToEnd> {
    let temp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let mut raw = RawConfig::default();
    raw.broker.listen = "127.0.0.1:0".into();
    raw.http.listen = "off".into();
    raw.broker.url = external;
    raw.storage.data_dir = temp.path().join("coordinator");
    raw.storage.snapshot_interval_ms = 200;
    raw.verification.spot_check_permille = 0;
    let config = raw.validate()?;
    let fsync_p50_ms = fsync_floor(temp.path(), if plan.quick { 20 } else { 100 })?;
    let (identity, receipt) = bench_receipt()?;
    let (sign, verify) = sign_and_verify(&plan, &identity, &receipt)?;
    let db = config.db_path();
    let data_dir = config.data_dir.clone();
    let coordinator = Coordinator::bind(config).await?;
    let url = coordinator.broker_url();
    // The raw floor runs on the same broker. On the embedded one, topics outside Ambient's are
    // the coordinator's alone, so the raw clients sign in with its key.
    let raw_url = match coordinator.embedded_addr() {
        Some(addr) => {
            let key = ambient_agent::load_identity(&data_dir)?;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as u64;
            let (user, token) = ambient_coordinator::access::coordinator_login(&key, now_ms);
            format!("mqtt://{user}:{token}@{addr}")
        }
        None => url.clone(),
    };
    // Agents stop first, so none of them sees its broker vanish under it.
    let stop = CancellationToken::new();
    let stop_agents = CancellationToken::new();
    let coordinator_task = tokio::spawn(coordinator.run(stop.clone().cancelled_owned()));
    let mut agents = Vec::new();

    let measured = async {
        progress(&format!("  raw MQTT on {url}"));
        let raw = raw_mqtt(&raw_url, &plan).await?;
        for (i, profile) in PROFILES.iter().enumerate() {
            let mut cfg =
                ambient_agent::AgentConfig::new(&url, temp.path().join(format!("agent-{i}")))?;
            cfg.set_name(format!("bench-{profile}-{i}"));
            cfg.set_simulate(profile.parse::<ambient_agent::Profile>()?);
            cfg.set_telemetry_interval(Duration::from_millis(500));
            agents.push(tokio::spawn(ambient_agent::run(
                cfg,
                stop_agents.clone().cancelled_owned(),
            )));
        }
        super::demo::wait_for_nodes(&db, PROFILES.len()).await?;
        progress(&format!(
            "  {} agents registered; Ambient on {url}",
            PROFILES.len()
        ));

        let mut client = Client::connect(&url).await?;
        let module = wat::parse_str(TRIVIAL_WAT).context("the trivial module does not assemble")?;
        let hash = client.publish_module(&module).await?;
        let run_id = format!("{:08x}", rand::random::<u32>());
        let submission = |kind: &str, i: usize| Submission {
            task_id: Some(format!("bench-{run_id}-{kind}-{i}")),
            client_id: Some("bench".into()),
            module: Some(hash.to_hex().to_string()),
            entry: Some("run".into()),
            verify: Some("receipt".into()),
            ..Submission::default()
        };

        // Warm-up: every agent fetches and compiles the module, SQLite pages are hot.
        let warm: Vec<Submission> = (0..8 * PROFILES.len())
            .map(|i| submission("warm", i))
            .collect();
        let events = client
            .run_batch(&warm, Duration::from_secs(30), |_| {})
            .await?;
        let failed = warm.len()
            - events
                .values()
                .filter(|e| e.status == EventStatus::Completed)
                .count();
        anyhow::ensure!(
            failed == 0,
            "{failed} of {} warm-up tasks did not complete",
            warm.len()
        );
        for i in 0..20 {
            one_task(&mut client, &submission("seqwarm", i)).await?;
        }
        progress(&format!("  {} sequential tasks", plan.sequential_tasks));

        let mut latencies = Vec::with_capacity(plan.sequential_tasks);
        for i in 0..plan.sequential_tasks {
            let latency = one_task(&mut client, &submission("seq", i))
                .await
                .with_context(|| {
                    format!(
                        "after {i} of {} sequential tasks completed",
                        plan.sequential_tasks
                    )
                })?;
            latencies.push(latency);
        }
        let ms = sorted_ms(&latencies);

        progress(&format!(
            "  a pipelined batch of {} tasks",
            plan.batch_tasks
        ));
        let batch: Vec<Submission> = (0..plan.batch_tasks)
            .map(|i| submission("batch", i))
            .collect();
        let (completed, unfinished, first_failure, elapsed) =
            run_capped(&mut client, &batch, plan.batch_cap).await?;
        let tripped = tripped_nodes(&db);
        client.disconnect().await;
        anyhow::Ok(EndToEnd {
            raw,
            fsync_p50_ms,
            sign_ms: sign.median_ns / 1e6,
            verify_ms: verify.median_ns / 1e6,
            latency_p50_ms: percentile(&ms, 0.5),
            latency_p99_ms: percentile(&ms, 0.99),
            tasks_per_s: completed as f64 / elapsed.as_secs_f64(),
            completed,
            unfinished,
            first_failure,
            tripped,
        })
    }
    .await;

    stop_agents.cancel();
    for agent in agents {
        let _ = agent.await;
    }
    stop.cancel();
    match coordinator_task.await {
        Ok(Err(e)) if measured.is_ok() => return Err(e.into()),
        _ => {}
    }
    measured
}

/// Nodes whose breaker, the coordinator's or the one the agent reports, is not closed in the
/// latest registry snapshot.
fn tripped_nodes(db: &Path) -> usize {
    let Ok(nodes) = Store::open_read_only(db).and_then(|s| s.nodes()) else {
        return 0;
    };
    nodes
        .iter()
        .filter_map(|(_, j)| serde_json::from_str::<serde_json::Value>(j).ok())
        .filter(|v| {
            let closed = |b: &serde_json::Value| b.as_str().is_none_or(|s| s == "Closed");
            !closed(&v["breaker"]) || !closed(&v["sample"]["breaker"])
        })
        .count()
}

/// Submits every task, then counts final events until every task has one or `cap` has passed
/// since the first submission. Returns the tasks completed, those still unfinished, why the
/// first task that did not complete ended, and the time from the first submission to the last
/// final event (`cap` when it ran out).
async fn run_capped(
    client: &mut Client,
    batch: &[Submission],
    cap: Duration,
) -> anyhow::Result<(usize, usize, Option<String>, Duration)> {
    let mut pending: std::collections::HashSet<String> =
        batch.iter().filter_map(|s| s.task_id.clone()).collect();
    let start = Instant::now();
    for s in batch {
        client.submit(s).await?;
    }
    let deadline = start + cap;
    let (mut completed, mut last, mut first_failure) = (0, start, None);
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(event) = tokio::time::timeout(left, client.next_event()).await else {
            return Ok((completed, pending.len(), first_failure, cap));
        };
        let event = event.context("the client connection closed")?;
        if event.status.is_final() && pending.remove(&event.task_id) {
            if event.status == EventStatus::Completed {
                completed += 1;
            } else if first_failure.is_none() {
                first_failure = Some(format!(
                    "{:?}: {}",
                    event.status,
                    event.error.map(|e| e.message).unwrap_or_default()
                ));
            }
            last = Instant::now();
        }
    }
    Ok((completed, 0, first_failure, last - start))
}

/// The p50 of `n` durable 4 KiB appends in `dir`: what one journal commit waits for at least.
fn fsync_floor(dir: &Path, n: usize) -> anyhow::Result<f64> {
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let page = [0x77u8; 4096];
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        file.write_all(&page)?;
        let start = Instant::now();
        file.sync_data()?;
        times.push(start.elapsed());
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(percentile(&sorted_ms(&times), 0.5))
}

/// Submits one task and waits for its final event; returns submit-to-result time.
async fn one_task(client: &mut Client, submission: &Submission) -> anyhow::Result<Duration> {
    let id = submission.task_id.clone().unwrap_or_default();
    let start = Instant::now();
    client.submit(submission).await?;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), client.next_event())
            .await
            .with_context(|| format!("task {id} got no result within 30 s"))?
            .context("the client connection closed")?;
        if event.task_id == id && event.status.is_final() {
            anyhow::ensure!(
                event.status == EventStatus::Completed,
                "task {id} ended {:?}: {:?}",
                event.status,
                event.error.map(|e| e.message)
            );
            return Ok(start.elapsed());
        }
    }
}

/// The end-to-end figures for one broker.
fn end_to_end_figures(section: &'static str, key: &str, plan: &Plan, e: &EndToEnd) -> Vec<Figure> {
    let raw = e.raw;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut throughput = Figure::new(
        section,
        format!("{key}.tasks_per_s"),
        "throughput, pipelined batch",
        e.tasks_per_s,
        "tasks/s",
    )
    .against(
        raw.one_way_per_s / MESSAGES_PER_TASK,
        format!(
            "raw QoS 1 one-way {} msgs/s ÷ 4 messages per task",
            num(raw.one_way_per_s)
        ),
    )
    .goal(Goal::RatioAtLeast(0.4))
    .goal(Goal::AtLeast(10_000.0));
    if e.tripped > 0 {
        throughput = throughput.note(format!(
            "{} of {} agents had a breaker open right after the batch (the log says why)",
            e.tripped,
            PROFILES.len()
        ));
    }
    if e.unfinished > 0 {
        throughput = throughput.note(format!(
            "rate over the {} s cap: {} of {} tasks had finished",
            plan.batch_cap.as_secs(),
            plan.batch_tasks - e.unfinished,
            plan.batch_tasks
        ));
    } else if e.completed < plan.batch_tasks {
        throughput = throughput.note(format!(
            "only {} of {} tasks completed; the first other one ended {}",
            e.completed,
            plan.batch_tasks,
            e.first_failure.as_deref().unwrap_or("-")
        ));
    }
    vec![
        Figure::new(section, format!("{key}.latency_p50"), "latency p50, submit → verified result", e.latency_p50_ms, "ms")
            .against(
                2.0 * raw.round_trip_p50_ms + e.fsync_p50_ms + e.sign_ms + e.verify_ms,
                format!(
                    "2 × raw QoS 1 round trip p50 ({} ms) + fsync ({} ms) + receipt sign ({} ms) + verify ({} ms)",
                    num(raw.round_trip_p50_ms), num(e.fsync_p50_ms), num(e.sign_ms), num(e.verify_ms)
                ),
            )
            .goal(Goal::RatioAtMost(1.5))
            .note(format!("{} sequential tasks, one in flight, after warm-up", plan.sequential_tasks)),
        Figure::new(section, format!("{key}.latency_p99"), "latency p99, submit → verified result", e.latency_p99_ms, "ms")
            .against(2.0 * raw.round_trip_p99_ms, format!("2 × raw QoS 1 round trip p99 ({} ms)", num(raw.round_trip_p99_ms))),
        throughput,
        Figure::new(section, format!("{key}.tasks_per_s_crypto"), "throughput against the signature floor", e.tasks_per_s, "tasks/s")
            .against(
                cores as f64 * 1e3 / (e.sign_ms + e.verify_ms),
                format!("{cores} cores ÷ (receipt sign + verify, {} ms)", num(e.sign_ms + e.verify_ms)),
            )
            .note("every task costs at least one sign on an agent and one verify on the coordinator, on the same cores here"),
        Figure::new(section, format!("{key}.fsync_ms"), "context: fsync in the data directory", e.fsync_p50_ms, "ms").note(
            "p50 of a 4 KiB write + fdatasync where the journal lives (TMPDIR); every journal commit waits for at least one",
        ),
    ]
}

/// A mosquitto started for this run on a free loopback port, killed when dropped.
struct Mosquitto {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    /// The mosquitto executable: `/usr/sbin/mosquitto`, or `mosquitto` on `PATH`.
    fn find() -> Option<PathBuf> {
        let sbin = PathBuf::from("/usr/sbin/mosquitto");
        if sbin.is_file() {
            return Some(sbin);
        }
        find_on_path("mosquitto")
    }

    fn start(exe: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let port = free_port()?;
        let conf = dir.path().join("mosquitto.conf");
        // The default queue (1000 messages per client) would drop QoS 1 submissions while the
        // coordinator works through a batch; nothing else departs from mosquitto's defaults.
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nmax_queued_messages 1000000\npersistence false\n"
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("mosquitto.log"))?;
        let child = std::process::Command::new(exe)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let mut this = Self {
            child,
            url: format!("mqtt://127.0.0.1:{port}"),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(this);
            }
            if let Some(status) = this.child.try_wait()? {
                let log = std::fs::read_to_string(this.dir.path().join("mosquitto.log"))
                    .unwrap_or_default();
                anyhow::bail!(
                    "mosquitto exited ({status}) before listening on port {port}: {}",
                    log.trim()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "mosquitto did not listen on port {port} within 5 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on now (never 1883, which a real broker may want).
fn free_port() -> anyhow::Result<u16> {
    for _ in 0..10 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if port != 1883 {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port found")
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

async fn section_end_to_end(plan: Plan) -> Vec<Figure> {
    let mut figures = Vec::new();
    const EMBEDDED: &str = "1. end to end, embedded broker";
    progress("1. end to end, embedded broker");
    figures.extend(section_result(
        EMBEDDED,
        end_to_end(plan, None)
            .await
            .map(|e| end_to_end_figures(EMBEDDED, "e2e.embedded", &plan, &e)),
    ));

    const MOSQUITTO: &str = "1. end to end, mosquitto";
    match Mosquitto::find() {
        None => figures.push(Figure::not_measured(
            MOSQUITTO,
            "e2e.mosquitto",
            "end to end on mosquitto",
            Status::Skipped,
            "mosquitto is not installed (/usr/sbin/mosquitto or on PATH); `apt-get install mosquitto` to compare".into(),
        )),
        Some(exe) => {
            progress(&format!("1. end to end, mosquitto ({})", exe.display()));
            let result = match Mosquitto::start(&exe) {
                Ok(broker) => {
                    let url = broker.url.clone();
                    let e = end_to_end(plan, Some(url)).await;
                    drop(broker);
                    e.map(|e| end_to_end_figures(MOSQUITTO, "e2e.mosquitto", &plan, &e))
                }
                Err(e) => Err(e),
            };
            figures.extend(section_result(MOSQUITTO, result));
        }
    }
    figures
}

// ---------------------------------------------------------------------------------------------
// 2. Scheduling
// ---------------------------------------------------------------------------------------------

const SCHEDULING: &str = "2. scheduling";

fn node_identity(i: usize) -> Identity {
    let mut secret = [0x5c; 32];
    secret[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Identity::from_secret(&secret)
}

/// Node `i`'s reading: reproducible, varied, with the decoys and some unavailable nodes placed
/// on purpose.
fn node_sample(i: usize, rng: &mut StdRng) -> TelemetrySample {
    let mut s = TelemetrySample {
        bandwidth_kbps: Some(rng.random_range(1_000..100_000)),
        latency_us: Some(rng.random_range(1_000..95_000)),
        cpu_load_permille: Some(rng.random_range(50..1000)),
        mem_free_bytes: Some(rng.random_range(512u64 << 20..4 << 30)),
        temp_millic: Some(rng.random_range(40_000..78_000)),
        ..TelemetrySample::default()
    };
    if i < DECOYS {
        s.bandwidth_kbps = Some(200_000);
        s.latency_us = Some(100 + i as u32);
        s.cpu_load_permille = Some(0);
        s.mem_free_bytes = Some(64 << 20);
    } else if i.is_multiple_of(101) {
        s.temp_millic = Some(90_000);
    }
    s
}

fn scheduling_request() -> Requirements {
    Requirements {
        memory_bytes: 256 << 20,
        engine: Some(Engine::Wasmtime),
        ..Requirements::default()
    }
}

/// Signed announces and first samples of `n` nodes, signed on every core.
fn signed_traffic(n: usize) -> anyhow::Result<Vec<(SignedAnnounce, SignedTelemetry)>> {
    let arch: heapless::String<16> = "aarch64"
        .try_into()
        .map_err(|_| anyhow::anyhow!("arch does not fit"))?;
    let version: heapless::String<16> = "0.1.0"
        .try_into()
        .map_err(|_| anyhow::anyhow!("version does not fit"))?;
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let chunk = n.div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (arch, version) = (arch.clone(), version.clone());
                scope.spawn(move || -> anyhow::Result<Vec<_>> {
                    let mut rng = StdRng::seed_from_u64(t as u64);
                    (t * chunk..((t + 1) * chunk).min(n))
                        .map(|i| {
                            let id = node_identity(i);
                            let announce = Announce {
                                node: id.node_id(),
                                public_key: id.public_key(),
                                arch: arch.clone(),
                                cores: [2, 4, 6, 8][i % 4],
                                mem_total_bytes: 8 << 30,
                                engine: Engine::Wasmtime,
                                agent_version: version.clone(),
                                labels: heapless::Vec::new(),
                                profile: None,
                                max_concurrency: 4,
                            };
                            let signature = sign_message(&id, SignedAnnounce::TAG, &announce)?;
                            let telemetry = Telemetry {
                                node: id.node_id(),
                                seq: 1,
                                boot_id: 1,
                                sample: node_sample(i, &mut rng),
                            };
                            let t_signature = sign_message(&id, SignedTelemetry::TAG, &telemetry)?;
                            Ok((
                                SignedAnnounce {
                                    announce,
                                    signature,
                                },
                                SignedTelemetry {
                                    telemetry,
                                    signature: t_signature,
                                },
                            ))
                        })
                        .collect()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for w in workers {
            all.extend(
                w.join()
                    .map_err(|_| anyhow::anyhow!("a signing thread panicked"))??,
            );
        }
        Ok(all)
    })
}

fn build_registry(
    traffic: &[(SignedAnnounce, SignedTelemetry)],
    now: Instant,
) -> anyhow::Result<Registry> {
    let mut registry = Registry::new(RegistryConfig::default());
    for (announce, telemetry) in traffic {
        registry.on_announce(now, announce)?;
        registry.on_telemetry(now, telemetry)?;
    }
    Ok(registry)
}

fn section_scheduling(plan: Plan) -> anyhow::Result<Vec<Figure>> {
    // The fixture overheats some nodes on purpose; their breaker warnings are not news.
    tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
        scheduling(plan)
    })
}

fn scheduling(plan: Plan) -> anyhow::Result<Vec<Figure>> {
    let largest = POOL_SIZES[POOL_SIZES.len() - 1];
    progress(&format!(
        "2. scheduling: signing {largest} announces and samples"
    ));
    let traffic = signed_traffic(largest)?;
    let t0 = Instant::now();
    let now = t0 + Duration::from_secs(1);
    progress("2. scheduling: registering nodes (every signature is verified)");
    // The largest registry on one thread, the smaller ones on another.
    let mut registries: Vec<(usize, Registry)> = std::thread::scope(|scope| {
        let big = scope.spawn(|| build_registry(&traffic, t0));
        let mut small = Vec::new();
        for &n in &POOL_SIZES[..POOL_SIZES.len() - 1] {
            small.push((n, build_registry(&traffic[..n], t0)?));
        }
        small.push((
            largest,
            big.join()
                .map_err(|_| anyhow::anyhow!("the registry thread panicked"))??,
        ));
        anyhow::Ok(small)
    })?;

    let req = scheduling_request();
    let decoys: Vec<NodeId> = traffic[..DECOYS]
        .iter()
        .map(|(a, _)| a.announce.node)
        .collect();
    let mut figures = Vec::new();
    for (n, registry) in &mut registries {
        let n = *n;
        // The floor of any decision that does not scan: one step in an ordered index of n.
        let index: std::collections::BTreeSet<(u64, u128)> = (0..n as u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15), u128::from(i)))
            .collect();
        let keys: Vec<(u64, u128)> = index.iter().copied().step_by((n / 1024).max(1)).collect();
        let mut k = 0;
        let floor = time_calls(&plan, || {
            k = (k + 1) % keys.len();
            index
                .range((Bound::Excluded(keys[k]), Bound::Unbounded))
                .next()
                .copied()
        });
        for strategy in Strategy::ALL {
            let mut registry = registry.clone();
            let first = registry
                .select(now, &req, strategy, &[])
                .context("no node selected")?;
            anyhow::ensure!(
                !decoys.contains(&first),
                "{strategy}: a node without the memory asked for was chosen"
            );
            let t = time_calls(&plan, || registry.select(now, &req, strategy, &[]));
            let mut figure = Figure::new(
                SCHEDULING,
                format!("select.{strategy}.{n}"),
                format!("select, {strategy}, {} nodes", num(n as f64)),
                t.median_ns / 1e3,
                "µs",
            )
            .against(
                floor.median_ns / 1e3,
                format!("one BTreeSet range step over {} keys", num(n as f64)),
            );
            if n == largest {
                figure = figure.goal(Goal::AtMost(10.0));
            }
            figures.push(figure);
        }
    }

    // Ingest: replay pre-signed samples into fresh copies of the 1k registry, one core.
    let (_, small) = &registries[0];
    let identities: Vec<Identity> = (0..INGEST_NODES).map(node_identity).collect();
    let mut rng = StdRng::seed_from_u64(99);
    let mut samples = Vec::new();
    for seq in 2..plan.ingest_rounds + 2 {
        for (i, id) in identities.iter().enumerate() {
            let telemetry = Telemetry {
                node: id.node_id(),
                seq,
                boot_id: 1,
                sample: node_sample(i, &mut rng),
            };
            let signature = sign_message(id, SignedTelemetry::TAG, &telemetry)?;
            samples.push((
                SignedTelemetry {
                    telemetry,
                    signature,
                },
                id.public_key(),
            ));
        }
    }
    let mut ingest = Vec::new();
    let mut verify = Vec::new();
    for _ in 0..plan.ingest_samples {
        let mut fresh = small.clone();
        let start = Instant::now();
        for (s, _) in &samples {
            fresh.on_telemetry(now, s)?;
        }
        ingest.push(samples.len() as f64 / start.elapsed().as_secs_f64());
        let start = Instant::now();
        for (s, key) in &samples {
            verify_message(key, SignedTelemetry::TAG, &s.telemetry, &s.signature)?;
        }
        verify.push(samples.len() as f64 / start.elapsed().as_secs_f64());
    }
    ingest.sort_by(f64::total_cmp);
    verify.sort_by(f64::total_cmp);
    figures.push(
        Figure::new(
            SCHEDULING,
            "telemetry.ingest_per_s",
            "signed telemetry ingest, one core",
            percentile(&ingest, 0.5),
            "samples/s",
        )
        .against(
            percentile(&verify, 0.5),
            "ed25519 verify_message alone, same samples",
        )
        .goal(Goal::AtLeast(30_000.0))
        .note(format!(
            "{} samples from {INGEST_NODES} nodes per run, median of {} runs",
            samples.len(),
            plan.ingest_samples
        )),
    );
    Ok(figures)
}

// ---------------------------------------------------------------------------------------------
// 3. Execution
// ---------------------------------------------------------------------------------------------

const EXECUTION: &str = "3. execution";

/// Whether a raw wasmtime engine meters fuel, as the sandbox always does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metering {
    Fuel,
    Off,
}

/// wasmtime alone, configured as the agent's sandbox is (epochs, pooling, and fuel unless
/// `metering` is off), running one plain-ABI call per invocation: a fresh instance, `alloc`,
/// the input written, the entry called, the output copied out. The floor the sandbox adds its
/// checks and bookkeeping to.
fn wasmtime_plain<'a>(
    bytes: &[u8],
    entry: &'a str,
    input: &'a [u8],
    metering: Metering,
    config: &SandboxConfig,
) -> anyhow::Result<impl FnMut() -> wasmtime::Result<Vec<u8>> + 'a> {
    // wasmtime's error type is not `std::error::Error`; keep its whole chain in the message.
    let setup = |e: wasmtime::Error| anyhow::anyhow!("wasmtime baseline: {e:#}");
    let mut c = wasmtime::Config::new();
    c.consume_fuel(metering == Metering::Fuel)
        .epoch_interruption(true)
        .cranelift_nan_canonicalization(true)
        .relaxed_simd_deterministic(true)
        .wasm_backtrace_max_frames(None);
    let mut pool = wasmtime::PoolingAllocationConfig::new();
    pool.total_core_instances(config.max_instances)
        .total_memories(config.max_instances)
        .total_tables(config.max_instances)
        .max_memory_size(usize::try_from(config.max_memory_bytes).unwrap_or(usize::MAX));
    c.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    let engine = wasmtime::Engine::new(&c).map_err(setup)?;
    let module = wasmtime::Module::new(&engine, bytes).map_err(setup)?;
    let pre = wasmtime::Linker::<()>::new(&engine)
        .instantiate_pre(&module)
        .map_err(setup)?;
    let fuel = Limits::default().fuel;
    let len = i32::try_from(input.len()).map_err(|_| anyhow::anyhow!("input too large"))?;
    Ok(move || {
        let mut store = wasmtime::Store::new(&engine, ());
        if metering == Metering::Fuel {
            store.set_fuel(fuel)?;
        }
        store.set_epoch_deadline(1);
        let instance = pre.instantiate(&mut store)?;
        let alloc = instance.get_typed_func::<i32, i32>(&mut store, "alloc")?;
        let call = instance.get_typed_func::<(i32, i32), i64>(&mut store, entry)?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| wasmtime::Error::msg("no memory export"))?;
        let ptr = alloc.call(&mut store, len)?;
        memory.write(&mut store, ptr as u32 as usize, input)?;
        let packed = call.call(&mut store, (ptr, len))? as u64;
        let (at, n) = ((packed >> 32) as usize, (packed & 0xffff_ffff) as usize);
        let output = memory
            .data(&store)
            .get(at..at + n)
            .ok_or_else(|| wasmtime::Error::msg("output out of bounds"))?;
        Ok(output.to_vec())
    })
}

/// Runs a raw wasmtime call once to check it, then times it.
fn time_wasmtime(
    plan: &Plan,
    mut f: impl FnMut() -> wasmtime::Result<Vec<u8>>,
) -> anyhow::Result<(Vec<u8>, Timing)> {
    let output = f().map_err(|e| anyhow::anyhow!("wasmtime baseline: {e:#}"))?;
    Ok((output, time_calls(plan, f)))
}

fn section_execution(plan: Plan) -> anyhow::Result<Vec<Figure>> {
    progress("3. execution");
    let config = SandboxConfig::default();
    let sandbox = Wasmtime::new(config.clone())?;
    let trivial = wat::parse_str(TRIVIAL_WAT).context("the trivial module does not assemble")?;
    let module = sandbox.prepare(sha3_256(&trivial), &trivial)?;
    let call = Call::new(Abi::Plain, "run", b"", Limits::default(), 0);
    let first = sandbox.execute(&module, &call);
    anyhow::ensure!(
        first.exit == Exit::Ok,
        "the trivial module ended {:?}: {}",
        first.exit,
        first.message
    );
    let t = time_calls(&plan, || sandbox.execute(&module, &call));
    let (_, floor) = time_wasmtime(
        &plan,
        wasmtime_plain(&trivial, "run", b"", Metering::Fuel, &config)?,
    )?;
    let mut figures = vec![
        Figure::new(
            EXECUTION,
            "sandbox.trivial_us",
            "instantiate + run, cached trivial module",
            t.median_ns / 1e3,
            "µs",
        )
        .against(
            floor.median_ns / 1e3,
            "wasmtime alone, same engine settings: instantiate, alloc, run, copy output",
        )
        .goal(Goal::AtMost(2.0))
        .note(format!("{} runs per sample", t.calls_per_sample)),
    ];

    let images: Vec<u8> = ambient_digits::heldout()
        .flat_map(|(image, _)| *image)
        .collect();
    let count = images.len() / ambient_digits::IMAGE_BYTES;
    let mut native = vec![0u8; count];
    ambient_digits::classify_batch(&images, &mut native)?;
    let digits = sandbox.prepare(sha3_256(DIGITS_WASM), DIGITS_WASM)?;
    let call = Call::new(Abi::Plain, "classify", &images, Limits::default(), 0);
    let run = sandbox.execute(&digits, &call);
    anyhow::ensure!(
        run.exit == Exit::Ok,
        "digits.wasm ended {:?}: {}",
        run.exit,
        run.message
    );
    anyhow::ensure!(
        run.output == native,
        "digits.wasm disagrees with the native classifier"
    );
    let wasm = time_calls(&plan, || sandbox.execute(&digits, &call));
    let mut labels = vec![0u8; count];
    let native_t = time_calls(&plan, || {
        ambient_digits::classify_batch(black_box(&images), &mut labels)
    });
    let per_s = |ns: f64| count as f64 / (ns / 1e9);
    figures.push(
        Figure::new(
            EXECUTION,
            "digits.wasm_images_per_s",
            format!("digits classifier in WASM, {count} images"),
            per_s(wasm.median_ns),
            "images/s",
        )
        .against(
            per_s(native_t.median_ns),
            "native ambient_digits::classify_batch, same input",
        )
        .goal(Goal::RatioAtLeast(0.5))
        .note(format!(
            "fuel metered; {} fuel per image; includes instantiation",
            run.fuel_used / count as u64
        )),
    );
    // What a task's fuel limit means in time on this machine: fuel burnt per second by a real
    // kernel, instantiation included.
    figures.push(
        Figure::new(
            EXECUTION,
            "digits.fuel_per_s",
            "fuel per second on this machine (digits kernel, metered)",
            run.fuel_used as f64 / (wasm.median_ns / 1e9),
            "fuel/s",
        )
        .note(format!(
            "the default fuel limit ({}) lasts {:.1} s here",
            Limits::default().fuel,
            Limits::default().fuel as f64 / (run.fuel_used as f64 / (wasm.median_ns / 1e9))
        )),
    );
    // Splits the gap to native: what fuel metering costs, and what is left to code generation.
    let (output, unmetered) = time_wasmtime(
        &plan,
        wasmtime_plain(DIGITS_WASM, "classify", &images, Metering::Off, &config)?,
    )?;
    anyhow::ensure!(
        output == native,
        "digits.wasm without fuel disagrees with the native classifier"
    );
    figures.push(
        Figure::new(
            EXECUTION,
            "digits.wasmtime_no_fuel_images_per_s",
            "context: digits in wasmtime alone, no fuel",
            per_s(unmetered.median_ns),
            "images/s",
        )
        .against(
            per_s(native_t.median_ns),
            "native ambient_digits::classify_batch, same input",
        )
        .note(
            "not a product figure: the sandbox always meters fuel; this shows what metering costs",
        ),
    );
    Ok(figures)
}

// ---------------------------------------------------------------------------------------------
// 4. Core
// ---------------------------------------------------------------------------------------------

const CORE: &str = "4. core";

/// What `openssl speed` measured, or why it could not.
struct OpenSsl {
    sha3_bytes_per_s: Result<f64, String>,
    ed25519_per_s: Result<(f64, f64), String>,
}

/// Runs `openssl speed -elapsed -mr` with `args` and returns its machine-readable output.
fn openssl_speed(args: &[&str]) -> Result<String, String> {
    let Some(exe) = find_on_path("openssl") else {
        return Err("openssl is not installed, so there is no baseline".into());
    };
    let out = std::process::Command::new(exe)
        .arg("speed")
        // Wall-clock time, as every figure of ours is: by default openssl divides by its CPU
        // time, which a busy machine does not inflate, and the ratio would tilt against us.
        .arg("-elapsed")
        .arg("-mr")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run openssl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl speed {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The fields of the first `+F...` line of `openssl speed -mr` output that mentions `algorithm`.
fn openssl_fields<'a>(output: &'a str, algorithm: &str) -> Option<Vec<&'a str>> {
    output
        .lines()
        .find(|l| l.starts_with("+F") && l.split(':').any(|f| f.eq_ignore_ascii_case(algorithm)))
        .map(|l| l.split(':').collect())
}

fn run_openssl(plan: &Plan) -> OpenSsl {
    let seconds = plan.openssl_seconds.to_string();
    // `+F:<n>:sha3-256:<bytes per second>`
    let sha3_bytes_per_s = openssl_speed(&[
        "-seconds", &seconds, "-bytes", "1048576", "-evp", "sha3-256",
    ])
    .and_then(|out| {
        openssl_fields(&out, "sha3-256")
            .and_then(|f| f.last()?.trim().parse().ok())
            .ok_or_else(|| format!("cannot read openssl's sha3-256 result from: {}", out.trim()))
    });
    // `+F6:<n>:<bits>:Ed25519:<signs per second>:<verifies per second>`
    let ed25519_per_s = openssl_speed(&["-seconds", &seconds, "ed25519"]).and_then(|out| {
        openssl_fields(&out, "Ed25519")
            .and_then(|f| {
                Some((
                    f.get(4)?.trim().parse().ok()?,
                    f.get(5)?.trim().parse().ok()?,
                ))
            })
            .ok_or_else(|| format!("cannot read openssl's Ed25519 result from: {}", out.trim()))
    });
    OpenSsl {
        sha3_bytes_per_s,
        ed25519_per_s,
    }
}

fn section_core(plan: Plan) -> anyhow::Result<Vec<Figure>> {
    progress("4. core");
    let mut figures = Vec::new();
    let sample = TelemetrySample {
        bandwidth_kbps: Some(50_000),
        latency_us: Some(20_000),
        cpu_load_permille: Some(250),
        mem_free_bytes: Some(2 << 30),
        temp_millic: Some(55_000),
        ..TelemetrySample::default()
    };
    let mut counter = 0u64;
    let floor = time_calls(&plan, || {
        counter += 1;
        counter
    });
    let floor_what = "timing-loop floor (a counter increment)";

    let config = ScoreConfig::default();
    let t = time_calls(&plan, || {
        health_score(
            black_box(&config),
            black_box(&sample),
            black_box(4),
            black_box(9_000),
        )
    });
    figures.push(
        Figure::new(
            CORE,
            "core.health_score_ns",
            "health_score",
            t.median_ns,
            "ns",
        )
        .against(floor.median_ns, floor_what),
    );

    let mut breaker = Breaker::new(SafetyPolicy::default());
    let mut now_ms = 0u64;
    let t = time_calls(&plan, || {
        now_ms += 1;
        let transition = breaker.observe(now_ms, black_box(&sample));
        (transition, breaker.admit(now_ms))
    });
    figures.push(
        Figure::new(
            CORE,
            "core.breaker_step_ns",
            "breaker observe + admit",
            t.median_ns,
            "ns",
        )
        .against(floor.median_ns, floor_what),
    );

    let (identity, receipt) = bench_receipt()?;
    let t = time_calls(&plan, || black_box(&receipt).commitment());
    // Tag and encoding of this receipt are ~170 bytes: two Keccak-f blocks, as are 200 bytes.
    let block = [0x33u8; 200];
    let hash_floor = time_calls(&plan, || sha3_256(black_box(&block)));
    figures.push(
        Figure::new(
            CORE,
            "core.receipt_commitment_ns",
            "receipt commitment",
            t.median_ns,
            "ns",
        )
        .against(
            hash_floor.median_ns,
            "sha3-256 of 200 bytes (same 2 Keccak-f blocks)",
        ),
    );

    progress("4. core: openssl speed");
    let openssl = run_openssl(&plan);
    let (sign, verify) = sign_and_verify(&plan, &identity, &receipt)?;
    let mut sign_figure = Figure::new(
        CORE,
        "core.receipt_sign_ns",
        "receipt sign (commitment + ed25519)",
        sign.median_ns,
        "ns",
    );
    let mut verify_figure = Figure::new(
        CORE,
        "core.receipt_verify_ns",
        "receipt verify (commitment + ed25519)",
        verify.median_ns,
        "ns",
    );
    match &openssl.ed25519_per_s {
        Ok((signs, verifies)) => {
            sign_figure = sign_figure.against(1e9 / signs, "openssl speed -elapsed ed25519, sign");
            verify_figure =
                verify_figure.against(1e9 / verifies, "openssl speed -elapsed ed25519, verify");
        }
        Err(why) => {
            sign_figure = sign_figure.note(why.clone());
            verify_figure = verify_figure.note(why.clone());
        }
    }
    figures.push(sign_figure);
    figures.push(verify_figure);

    let buffer = vec![0xa5u8; 1 << 20];
    let t = time_calls(&plan, || sha3_256(black_box(&buffer)));
    let mib_per_s = 1e9 / t.median_ns;
    let sha3 = Figure::new(
        CORE,
        "core.sha3_256_mib_per_s",
        "sha3-256, 1 MiB buffers",
        mib_per_s,
        "MiB/s",
    );
    figures.push(match &openssl.sha3_bytes_per_s {
        Ok(bytes) => sha3
            .against(
                bytes / f64::from(1u32 << 20),
                "openssl speed -elapsed -evp sha3-256 -bytes 1048576",
            )
            .goal(Goal::RatioAtLeast(0.8)),
        Err(why) => sha3.note(why.clone()),
    });
    Ok(figures)
}

// ---------------------------------------------------------------------------------------------
// 5. Footprint
// ---------------------------------------------------------------------------------------------

const FOOTPRINT: &str = "5. footprint";

/// A binary's size in MiB: of a stripped copy when `strip` exists. Returns the size and whether
/// it was stripped.
fn binary_mib(path: &Path, scratch: &Path) -> anyhow::Result<(f64, bool)> {
    if let Some(strip) = find_on_path("strip") {
        let copy = scratch.join(path.file_name().context("binary path has no file name")?);
        std::fs::copy(path, &copy).with_context(|| format!("cannot copy {}", path.display()))?;
        let status = std::process::Command::new(strip)
            .arg(&copy)
            .stdin(Stdio::null())
            .status()?;
        if status.success() {
            return Ok((
                std::fs::metadata(&copy)?.len() as f64 / f64::from(1u32 << 20),
                true,
            ));
        }
    }
    Ok((
        std::fs::metadata(path)?.len() as f64 / f64::from(1u32 << 20),
        false,
    ))
}

/// VmRSS of a process, in MiB.
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context("cannot read /proc/PID/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kib / 1024.0)
}

/// Kills a child process when dropped.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the agent binary against an embedded broker, waits until it announces and then 3 s
/// more, and reads its resident memory.
async fn agent_idle_rss(agent: &Path, scratch: &Path) -> anyhow::Result<f64> {
    let broker = ambient_broker::Broker::bind(
        "127.0.0.1:0".parse()?,
        ambient_broker::BrokerConfig::default(),
    )
    .await?;
    let url = format!("mqtt://{}", broker.local_addr());
    let stop = CancellationToken::new();
    let broker_task = tokio::spawn(broker.run(stop.clone().cancelled_owned()));
    let measured = async {
        let (tx, mut announced) = mpsc::unbounded_channel::<()>();
        let watcher = RawClient::connect(
            &url,
            "ambient-bench-footprint",
            "ambient/v1/nodes/+/announce",
            move |_, _| {
                let _ = tx.send(());
            },
        )
        .await?;
        let log = std::fs::File::create(scratch.join("agent.log"))?;
        let mut child = Reaper(
            std::process::Command::new(agent)
                .env("AMBIENT_AGENT_BROKER", &url)
                .env("AMBIENT_AGENT_STATE_DIR", scratch.join("agent-state"))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("cannot start {}", agent.display()))?,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::time::timeout(Duration::from_millis(100), announced.recv())
                .await
                .is_ok()
            {
                break;
            }
            if let Some(status) = child.0.try_wait()? {
                let log = std::fs::read_to_string(scratch.join("agent.log")).unwrap_or_default();
                anyhow::bail!(
                    "the agent exited ({status}) before announcing: {}",
                    log.trim()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the agent did not announce itself within 20 s"
            );
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss = rss_mib(child.0.id())?;
        drop(child);
        watcher.close().await;
        anyhow::Ok(rss)
    }
    .await;
    stop.cancel();
    let _ = broker_task.await;
    measured
}

/// Resident memory of an idle `sleep`: the floor of any process on this machine.
async fn process_floor_rss() -> anyhow::Result<f64> {
    let child = Reaper(
        std::process::Command::new("sleep")
            .arg("30")
            .stdin(Stdio::null())
            .spawn()
            .context("cannot start `sleep`")?,
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    rss_mib(child.0.id())
}

async fn section_footprint() -> anyhow::Result<Vec<Figure>> {
    progress("5. footprint");
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let dir = exe
        .parent()
        .context("the running executable has no directory")?;
    let scratch = tempfile::tempdir()?;
    let mut figures = Vec::new();
    let stripped_note = |stripped: bool| {
        if stripped {
            "stripped copy"
        } else {
            "UNSTRIPPED: `strip` not found"
        }
    };

    let (mib, stripped) = binary_mib(&exe, scratch.path())?;
    figures.push(
        Figure::new(
            FOOTPRINT,
            "size.ambient_mib",
            "binary size, ambient",
            mib,
            "MiB",
        )
        .note(format!("{}; {}", stripped_note(stripped), exe.display())),
    );

    let agent = dir.join("ambient-agent");
    if !agent.is_file() {
        let why = format!(
            "{} not found; build it beside this binary: cargo build --release -p ambient-agent",
            agent.display()
        );
        figures.push(Figure::not_measured(
            FOOTPRINT,
            "size.agent_mib",
            "binary size, ambient-agent",
            Status::Skipped,
            why.clone(),
        ));
        figures.push(Figure::not_measured(
            FOOTPRINT,
            "rss.agent_idle_mib",
            "agent idle RSS",
            Status::Skipped,
            why,
        ));
        return Ok(figures);
    }
    let (mib, stripped) = binary_mib(&agent, scratch.path())?;
    figures.push(
        Figure::new(
            FOOTPRINT,
            "size.agent_mib",
            "binary size, ambient-agent",
            mib,
            "MiB",
        )
        .note(stripped_note(stripped)),
    );
    let floor = process_floor_rss().await?;
    figures.push(match agent_idle_rss(&agent, scratch.path()).await {
        Ok(rss) => Figure::new(
            FOOTPRINT,
            "rss.agent_idle_mib",
            "agent idle RSS, 3 s after announcing",
            rss,
            "MiB",
        )
        .against(
            floor,
            "an idle `sleep` process (the floor of any process here)",
        ),
        Err(e) => Figure::not_measured(
            FOOTPRINT,
            "rss.agent_idle_mib",
            "agent idle RSS",
            Status::Failed,
            format!("{e:#}"),
        ),
    });
    Ok(figures)
}

// ---------------------------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct Machine {
    cores: usize,
    cpu: String,
    /// `/proc/loadavg`'s 1-minute figure before and after the run: a busy machine skews figures.
    load_before: Option<f64>,
    load_after: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    version: &'static str,
    quick: bool,
    machine: Machine,
    elapsed_s: f64,
    figures: Vec<Figure>,
    /// Ids of figures that missed a goal.
    missed: Vec<String>,
    /// Ids of figures that could not be measured (skipped or failed).
    not_measured: Vec<String>,
}

fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Runs a synchronous section on the blocking pool, so the runtime's workers stay free.
async fn blocking(
    section: &'static str,
    f: impl FnOnce() -> anyhow::Result<Vec<Figure>> + Send + 'static,
) -> Vec<Figure> {
    let result = tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the section panicked: {e}")));
    section_result(section, result)
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let plan = Plan::new(args.quick);
    let started = Instant::now();
    let load_before = load_average();
    let wanted = |s: Section| args.only.is_empty() || args.only.contains(&s);
    let mut figures = Vec::new();
    if wanted(Section::E2e) {
        figures.extend(section_end_to_end(plan).await);
    }
    if wanted(Section::Scheduling) {
        figures.extend(blocking(SCHEDULING, move || section_scheduling(plan)).await);
    }
    if wanted(Section::Execution) {
        figures.extend(blocking(EXECUTION, move || section_execution(plan)).await);
    }
    if wanted(Section::Core) {
        figures.extend(blocking(CORE, move || section_core(plan)).await);
    }
    if wanted(Section::Footprint) {
        figures.extend(section_result(FOOTPRINT, section_footprint().await));
    }

    let report = Report {
        version: env!("CARGO_PKG_VERSION"),
        quick: plan.quick,
        machine: Machine {
            cores: std::thread::available_parallelism().map_or(1, |p| p.get()),
            cpu: cpu_model(),
            load_before,
            load_after: load_average(),
        },
        elapsed_s: started.elapsed().as_secs_f64(),
        missed: figures
            .iter()
            .filter(|f| f.status == Status::Missed)
            .map(|f| f.id.clone())
            .collect(),
        not_measured: figures
            .iter()
            .filter(|f| matches!(f.status, Status::Skipped | Status::Failed))
            .map(|f| f.id.clone())
            .collect(),
        figures,
    };
    let failed = report.figures.iter().any(|f| f.status == Status::Failed);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report)?;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_table(report: &Report) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let m = &report.machine;
    writeln!(
        out,
        "ambient bench {}{}: {} cores, {}, load {} → {}, {:.0} s",
        report.version,
        if report.quick { " --quick" } else { "" },
        m.cores,
        m.cpu,
        m.load_before.map_or("?".into(), |l| format!("{l:.2}")),
        m.load_after.map_or("?".into(), |l| format!("{l:.2}")),
        report.elapsed_s
    )?;
    writeln!(
        out,
        "Medians unless marked p99. RATIO = AMBIENT / BASELINE, both measured in this run; only ratios compare across runs."
    )?;
    let mut by_section: Vec<(&str, Vec<&Figure>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for f in &report.figures {
        let i = *index.entry(f.section).or_insert_with(|| {
            by_section.push((f.section, Vec::new()));
            by_section.len() - 1
        });
        by_section[i].1.push(f);
    }
    for (section, figures) in by_section {
        writeln!(out, "\n{section}")?;
        writeln!(
            out,
            "  {:<40} {:>18} {:>18} {:>8}  {:<32} RESULT",
            "FIGURE", "AMBIENT", "BASELINE", "RATIO", "GOAL"
        )?;
        for f in figures {
            let with_unit = |v: f64| format!("{} {}", num(v), f.unit);
            let value = f.value.map_or("—".into(), with_unit);
            let baseline = f
                .baseline
                .as_ref()
                .map_or("—".into(), |b| with_unit(b.value));
            let ratio = f.ratio.map_or("—".into(), |r| format!("{}×", num(r)));
            let goal = if f.goals.is_empty() {
                "—".into()
            } else {
                f.goals
                    .iter()
                    .map(|g| g.goal.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let result = match f.status {
                Status::Ok => "ok".to_string(),
                Status::Missed if f.goals.len() > 1 => {
                    let missed: Vec<&str> = f
                        .goals
                        .iter()
                        .filter(|g| !g.met)
                        .map(|g| g.goal.as_str())
                        .collect();
                    format!("MISSED ({})", missed.join(", "))
                }
                Status::Missed => "MISSED".into(),
                Status::Info => "info".into(),
                Status::Skipped => "SKIPPED".into(),
                Status::Failed => "FAILED".into(),
            };
            writeln!(
                out,
                "  {:<40} {:>18} {:>18} {:>8}  {:<32} {result}",
                f.name, value, baseline, ratio, goal
            )?;
            if let Some(b) = &f.baseline {
                writeln!(out, "      baseline: {}", b.what)?;
            }
            if let Some(note) = &f.note {
                writeln!(out, "      note: {note}")?;
            }
        }
    }
    let missed = report.missed.len();
    let not_measured = report.not_measured.len();
    writeln!(
        out,
        "\n{} figures: {} goals met, {missed} MISSED, {not_measured} not measured",
        report.figures.len(),
        report
            .figures
            .iter()
            .filter(|f| f.status == Status::Ok)
            .count()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_carry_digits_by_magnitude() {
        assert_eq!(num(123_456.4), "123,456");
        assert_eq!(num(12_345.0), "12,345");
        assert_eq!(num(512.3), "512");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(1.234), "1.23");
        assert_eq!(num(0.1234), "0.123");
    }

    #[test]
    fn a_ratio_goal_is_missed_when_the_ratio_is_out_of_bounds() {
        let f = Figure::new("s", "x", "x", 7.0, "ms")
            .against(2.0, "raw")
            .goal(Goal::RatioAtMost(3.0));
        assert_eq!(f.ratio, Some(3.5));
        assert_eq!(f.status, Status::Missed);
        let f = Figure::new("s", "x", "x", 5.0, "ms")
            .against(2.0, "raw")
            .goal(Goal::RatioAtMost(3.0));
        assert_eq!(f.status, Status::Ok);
    }

    #[test]
    fn one_missed_goal_of_two_misses_the_figure() {
        let f = Figure::new("s", "x", "x", 9_000.0, "tasks/s")
            .against(10_000.0, "raw")
            .goal(Goal::RatioAtLeast(0.4))
            .goal(Goal::AtLeast(10_000.0));
        assert_eq!(f.status, Status::Missed);
        assert!(f.goals[0].met && !f.goals[1].met);
    }

    #[test]
    fn openssl_machine_readable_lines_parse() {
        let sha3 = "+DT:sha3-256:1:1048576\n+R:467:sha3-256:0.980000\n+H:1048576\n+F:25:sha3-256:499678563.27\n";
        assert_eq!(
            openssl_fields(sha3, "sha3-256").and_then(|f| f.last()?.parse::<f64>().ok()),
            Some(499_678_563.27)
        );
        let ed = "+DTP:253:sign:Ed25519:1\n+F6:0:253:Ed25519:25087.500000:9727.272727\n";
        let f = openssl_fields(ed, "Ed25519").unwrap_or_default();
        assert_eq!(f.get(4).and_then(|v| v.parse::<f64>().ok()), Some(25_087.5));
        assert_eq!(
            f.get(5).and_then(|v| v.parse::<f64>().ok()),
            Some(9_727.272727)
        );
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
    }
}
