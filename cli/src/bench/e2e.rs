//! End to end (section 1): a coordinator and four agents on the embedded broker and on mosquitto,
//! beside raw MQTT round trips and floods on the same broker.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ambient_coordinator::client::Client;
use ambient_coordinator::store::Store;
use ambient_coordinator::{Coordinator, EventStatus, NodeView, RawConfig, Submission, mqtt};
use ambient_core::BreakerState;
use anyhow::Context as _;
use rumqttc::{Event, Packet, QoS};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::core::{bench_receipt, sign_and_verify};
use super::harness::{percentile, progress, sorted_ms};
use super::report::{Figure, Goal, Status, num, section_result};
use super::{Plan, TRIVIAL_WAT};

/// Agents in the end-to-end runs, one per simulated profile.
const PROFILES: [&str; 4] = ["pi4", "pi5", "jetson-orin-nano", "visionfive2"];

/// Messages one task costs on the broker: dispatch, result, the `accepted` and the final
/// event. (Submissions travel up to 256 to a message, and the bench sends them that way.)
const MESSAGES_PER_TASK: f64 = 4.0;

/// Payload of the raw MQTT baseline messages, in bytes: about a dispatch's size.
const RAW_PAYLOAD_BYTES: usize = 128;
/// The threads of the gateway's tokio runtime (the coordinator's MQTT and publisher tasks and
/// the embedded broker), named so their CPU time can be told from the agents' and the client's.
/// The kernel keeps 15 bytes of a thread's name.
const GATEWAY_RUNTIME: &str = "ambient-gateway";
/// Every thread whose CPU time is the gateway's: its runtime, the dispatcher and sync threads.
const GATEWAY_THREADS: [&str; 3] = [GATEWAY_RUNTIME, DISPATCHER_THREAD, "ambient-sync"];
/// The dispatcher thread's name as the kernel keeps it ("ambient-dispatch" cut to 15 bytes).
const DISPATCHER_THREAD: &str = "ambient-dispatc";

/// A raw MQTT baseline: two plain rumqttc clients with TCP_NODELAY on one broker.
#[derive(Debug, Clone, Copy)]
struct RawMqtt {
    round_trip_p50_ms: f64,
    round_trip_p99_ms: f64,
    one_way_per_s: f64,
}

/// One raw client: its handle and the task polling its event loop.
pub(super) struct RawClient {
    client: rumqttc::AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl RawClient {
    /// Connects, subscribes to `filter` at QoS 1, and returns once the subscription is
    /// acknowledged. `on_publish` sees every publish received, inside the event loop task.
    pub(super) async fn connect(
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

    pub(super) async fn close(mut self) {
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
    /// CPU time per task completed in the batch, in µs: the whole process (coordinator, agents,
    /// client, and the embedded broker when it is the one), the gateway alone (coordinator and
    /// embedded broker), and the dispatcher thread alone.
    cpu_us_per_task: f64,
    /// The gateway's share: its runtime's threads, the dispatcher and the sync thread, when
    /// found.
    gateway_us_per_task: Option<f64>,
    dispatcher_us_per_task: Option<f64>,
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
    // One verified run per task once the four agents have proven themselves (40 agreements
    // each): the figures measure the pipeline, not the cost of redundancy, which `ambient sim`
    // reports per policy.
    raw.verification.policy = "receipt".into();
    raw.verification.spot_check_permille = 0;
    let config = raw.validate()?;
    let fsync_p50_ms = fsync_floor(temp.path(), if plan.quick { 20 } else { 100 })?;
    let (identity, receipt) = bench_receipt()?;
    let (sign, verify) = sign_and_verify(&plan, &identity, &receipt)?;
    let db = config.db_path();
    let data_dir = config.data_dir.clone();
    // The coordinator and its broker get a runtime of their own, as the gateway is a process of
    // its own in a deployment; the agents and the client share this one.
    let runtime = OwnRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .thread_name(GATEWAY_RUNTIME)
            .enable_all()
            .build()
            .context("cannot start the gateway's runtime")?,
    ));
    let gateway = runtime.handle();
    let coordinator = gateway.spawn(Coordinator::bind(config)).await??;
    let url = coordinator.broker_url();
    // The raw floor runs on the same broker. On the embedded one, topics outside Ambient's are
    // the coordinator's alone, so the raw clients sign in with its key.
    let raw_url = match coordinator.embedded_addr() {
        Some(addr) => {
            let key = ambient_daemon::load_identity(&data_dir)?;
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
    let coordinator_task = gateway.spawn(coordinator.run(stop.clone().cancelled_owned()));
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
        crate::demo::wait_for_nodes(&db, PROFILES.len()).await?;
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
        let cpu_before = cpu_used();
        let (completed, unfinished, first_failure, elapsed) =
            run_capped(&mut client, &batch, plan.batch_cap).await?;
        let cpu = cpu_used();
        let per_task = |s: f64| s * 1e6 / completed.max(1) as f64;
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
            cpu_us_per_task: per_task(cpu.process - cpu_before.process),
            gateway_us_per_task: cpu
                .gateway
                .zip(cpu_before.gateway)
                .map(|(after, before)| per_task(after - before)),
            dispatcher_us_per_task: cpu
                .dispatcher
                .zip(cpu_before.dispatcher)
                .map(|(after, before)| per_task(after - before)),
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

/// A runtime started inside another: dropping one blocks until its tasks end, which an async
/// context forbids, so this one is shut down in the background when dropped, on every path.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl OwnRuntime {
    fn handle(&self) -> tokio::runtime::Handle {
        self.0
            .as_ref()
            .expect("the runtime lives until dropped")
            .handle()
            .clone()
    }
}

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Nodes whose breaker, the coordinator's or the one the agent reports, is not closed in the
/// latest registry snapshot.
fn tripped_nodes(db: &Path) -> usize {
    let Ok(nodes) = Store::open_read_only(db).and_then(|s| s.nodes()) else {
        return 0;
    };
    nodes
        .iter()
        .filter_map(|(_, j)| serde_json::from_str::<NodeView>(j).ok())
        .filter(|v| {
            v.breaker != BreakerState::Closed
                || v.sample
                    .as_ref()
                    .is_some_and(|s| s.breaker != BreakerState::Closed)
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
    client.submit_all(batch).await?;
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

/// CPU time used so far, in seconds.
#[derive(Debug, Clone, Copy)]
struct CpuUsed {
    /// By the whole process, user and system (`getrusage`).
    process: f64,
    /// By the gateway's threads ([`GATEWAY_THREADS`]), from `/proc/self/task/*/schedstat`,
    /// when its runtime's threads are found.
    gateway: Option<f64>,
    /// By the coordinator's dispatcher thread, when found.
    dispatcher: Option<f64>,
}

fn cpu_used() -> CpuUsed {
    // SAFETY: `getrusage` only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    // Each thread's name and its time on the CPU (the first field of schedstat, in ns).
    let threads: Vec<(String, f64)> = std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| {
            let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let ns = stat.split_whitespace().next()?.parse::<f64>().ok()?;
            Some((name.trim().to_owned(), ns / 1e9))
        })
        .collect();
    CpuUsed {
        process: seconds(usage.ru_utime) + seconds(usage.ru_stime),
        gateway: threads
            .iter()
            .any(|(name, _)| name == GATEWAY_RUNTIME)
            .then(|| {
                threads
                    .iter()
                    .filter(|(name, _)| GATEWAY_THREADS.contains(&name.as_str()))
                    .map(|(_, s)| s)
                    .sum()
            }),
        dispatcher: threads
            .iter()
            .find(|(name, _)| name == DISPATCHER_THREAD)
            .map(|(_, s)| *s),
    }
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
    let gateway_cpu = match e.gateway_us_per_task {
        Some(us) => Figure::new(section, format!("{key}.gateway_cpu_us_per_task"), "gateway CPU per task, pipelined batch", us, "µs")
            .against(
                (e.sign_ms + e.verify_ms) * 1e3,
                format!("its ed25519 work at most: the receipt's verify and the assignment's sign (shared by the tasks a turn places on a node), {} ms", num(e.sign_ms + e.verify_ms)),
            )
            .goal(Goal::AtMost(cores as f64 * 1e6 / 10_000.0))
            .note(format!(
                "the coordinator's threads{} ÷ tasks, without the agents and the client, which run on other machines in a deployment; the goal is what {cores} cores of its own allow each task at 10,000 tasks/s",
                if key.ends_with("embedded") { " and the embedded broker" } else { " (mosquitto's CPU is not counted)" },
            )),
        None => Figure::not_measured(
            section,
            format!("{key}.gateway_cpu_us_per_task"),
            "gateway CPU per task, pipelined batch",
            Status::Skipped,
            "the gateway's threads were not found in /proc/self/task (Linux only)".into(),
        ),
    };
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
        Figure::new(section, format!("{key}.cpu_us_per_task"), "CPU per task, pipelined batch", e.cpu_us_per_task, "µs")
            .against(
                2.0 * (e.sign_ms + e.verify_ms) * 1e3,
                format!("the ed25519 work of a task at most: the receipt and the assignment each signed and verified (an assignment's signature and check are shared by the tasks a turn places on a node), 2 × {} ms", num(e.sign_ms + e.verify_ms)),
            )
            .goal(Goal::AtMost(cores as f64 * 1e6 / 10_000.0))
            .note(format!(
                "the process's CPU time over the batch ÷ tasks: coordinator, agents, client{}; the goal is what {cores} cores allow each task at 10,000 tasks/s; the dispatcher thread alone: {}",
                if key.ends_with("embedded") { " and broker" } else { " (mosquitto's own CPU is not counted)" },
                e.dispatcher_us_per_task.map_or("not found".into(), |us| format!("{} µs", num(us)))
            )),
        gateway_cpu,
        Figure::new(section, format!("{key}.fsync_ms"), "context: fsync in the data directory", e.fsync_p50_ms, "ms").note(
            "p50 of a 4 KiB write + fdatasync where the journal lives (TMPDIR); every journal commit waits for at least one",
        ),
    ]
}

pub(super) async fn section_end_to_end(plan: Plan) -> Vec<Figure> {
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
    match ambient_testkit::mosquitto_binary() {
        None => figures.push(Figure::not_measured(
            MOSQUITTO,
            "e2e.mosquitto",
            "end to end on mosquitto",
            Status::Skipped,
            "mosquitto is not installed (/usr/sbin/mosquitto or on PATH); `apt-get install mosquitto` to compare".into(),
        )),
        Some(exe) => {
            progress(&format!("1. end to end, mosquitto ({})", exe.display()));
            let result = match ambient_testkit::Mosquitto::start() {
                Ok(broker) => {
                    let url = broker.url();
                    let e = end_to_end(plan, Some(url)).await;
                    drop(broker);
                    e.map(|e| end_to_end_figures(MOSQUITTO, "e2e.mosquitto", &plan, &e))
                }
                Err(e) => Err(e.into()),
            };
            figures.extend(section_result(MOSQUITTO, result));
        }
    }
    figures
}
