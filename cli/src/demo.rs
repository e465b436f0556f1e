//! `ambient demo`: a broker, a coordinator and simulated devices on this machine, classifying
//! handwritten digits with a WASM task module, with every result verified and paid for.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ambient_agent::calibrate::DIGITS_WASM;
use ambient_coordinator::client::Client;
use ambient_coordinator::store::Store;
use ambient_coordinator::{
    Coordinator, DispatchConfig, EventStatus, Policy, RawConfig, Submission, TaskEvent,
};
use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use clap::Args;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// Simulated device profiles, assigned to agents in turn.
const PROFILES: [&str; 4] = ["pi4", "pi5", "jetson-orin-nano", "visionfive2"];

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ambient demo\n  ambient demo --dashboard                # then open http://127.0.0.1:8080/\n  ambient demo --agents 6 --tasks 500 --strategy least-loaded\n  ambient demo --verify replicate:3 --json"
)]
pub struct DemoArgs {
    /// Agents to start, each with its own identity and a simulated device profile.
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Inference tasks to submit.
    #[arg(long, default_value_t = 200)]
    tasks: usize,
    /// Images classified per task.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// weighted, round-robin, least-loaded or latency-aware.
    #[arg(long, default_value = "weighted")]
    strategy: String,
    /// receipt, replicate:K or target:E (e.g. target:1e-4).
    #[arg(long, default_value_t = DispatchConfig::default().default_policy)]
    verify: Policy,
    /// Use this directory for the database and agent state instead of a temporary one.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Use an external broker (e.g. mqtt://127.0.0.1:1883) instead of the embedded one.
    #[arg(long)]
    broker: Option<String>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// After the batch, keep running with the dashboard served at ADDR (default
    /// 127.0.0.1:8080): a few tasks a second keep flowing, and the first device overheats for
    /// 20 s of every minute, so its breakers open with the reason. Ctrl-C stops.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:8080")]
    dashboard: Option<String>,
}

#[derive(Debug, Default, Serialize)]
struct NodeSummary {
    node: String,
    profile: String,
    tasks: usize,
    mean_latency_ms: f64,
    verified: u64,
    disputed: u64,
    earned_ucredits: i64,
}

#[derive(Debug, Serialize)]
struct Summary {
    agents: usize,
    tasks: usize,
    completed: usize,
    failed: usize,
    /// Tasks whose result two or more nodes agreed on (spot checks, and every task of a node
    /// still proving itself).
    checked: usize,
    strategy: String,
    verify: String,
    images: usize,
    correct: usize,
    accuracy: f64,
    matches_native_reference: bool,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    throughput_tasks_per_s: f64,
    ledger_verified: bool,
    ledger_entries: u64,
    nodes: Vec<NodeSummary>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.agents > 0, "--agents must be at least 1");
    anyhow::ensure!(args.tasks > 0, "--tasks must be at least 1");
    anyhow::ensure!(
        (1..=4096).contains(&args.batch),
        "--batch must be between 1 and 4096"
    );
    let temp = tempfile::tempdir().context("cannot create a temporary directory")?;
    let root = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());

    let mut raw = RawConfig::default();
    raw.broker.listen = "127.0.0.1:0".into();
    raw.http.listen = args.dashboard.clone().unwrap_or_else(|| "off".into());
    raw.broker.url = args.broker.clone();
    raw.storage.data_dir = root.join("coordinator");
    raw.storage.snapshot_interval_ms = 200;
    raw.scheduling.strategy = args.strategy.clone();
    let config = raw.validate()?;
    let db = config.db_path();
    let coordinator = Coordinator::bind(config).await?;
    let url = coordinator.broker_url();
    let dashboard = coordinator.http_url();
    // Agents stop before the coordinator, so they say goodbye to a broker that is still there.
    let stop_agents = CancellationToken::new();
    let stop = CancellationToken::new();
    let coordinator_task = tokio::spawn(coordinator.run(stop.clone().cancelled_owned()));

    let mut agents = Vec::new();
    let heater = ambient_agent::Heater::default();
    for i in 0..args.agents {
        let profile = PROFILES[i % PROFILES.len()];
        let mut cfg = ambient_agent::AgentConfig::new(&url, root.join(format!("agent-{i}")))?;
        cfg.set_name(format!("{profile}-{i}"));
        cfg.set_simulate(profile.parse::<ambient_agent::Profile>()?);
        if i == 0 {
            cfg.set_heater(heater.clone());
        }
        cfg.set_telemetry_interval(Duration::from_millis(500));
        agents.push(tokio::spawn(ambient_agent::run(
            cfg,
            stop_agents.clone().cancelled_owned(),
        )));
    }
    if !args.json {
        eprintln!(
            "ambient demo: broker {url}, {} agents, {} tasks of {} images",
            args.agents, args.tasks, args.batch
        );
    }
    wait_for_nodes(&db, args.agents).await?;

    let heldout: Vec<(&[u8; 64], u8)> = ambient_digits::heldout().collect();
    let mut client = Client::connect(&url).await?;
    let hash = client.publish_module(DIGITS_WASM).await?;
    let mut expected = BTreeMap::new();
    let submissions: Vec<Submission> = (0..args.tasks)
        .map(|t| {
            let mut input = Vec::with_capacity(args.batch * 64);
            let mut labels = Vec::with_capacity(args.batch);
            let mut native = Vec::with_capacity(args.batch);
            for j in 0..args.batch {
                let (image, label) = heldout[(t * args.batch + j) % heldout.len()];
                input.extend_from_slice(image);
                labels.push(label);
                native.push(ambient_digits::classify(image));
            }
            let id = format!("demo-{t}");
            expected.insert(id.clone(), (labels, native));
            digits_task(id, &input, &hash, args.verify)
        })
        .collect();

    let bar = (!args.json).then(|| {
        let bar = indicatif::ProgressBar::new(args.tasks as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tasks  {per_sec}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let started = Instant::now();
    let events = client
        .run_batch(&submissions, Duration::from_secs(60), |_| {
            if let Some(b) = &bar {
                b.inc(1);
            }
        })
        .await?;
    let elapsed = started.elapsed();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // Let the final snapshot and settlements land before reading the database.
    tokio::time::sleep(Duration::from_millis(400)).await;

    let summary = summarise(&args, &events, &expected, elapsed, &db)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    if let Some(page) = dashboard {
        let profile = PROFILES[0];
        eprintln!(
            "\ndashboard: {page}/  ({profile}-0 overheats for 20 s of every minute; Ctrl-C stops)"
        );
        keep_running(&client, &hash, args.verify, &heater).await?;
    }
    client.disconnect().await;
    stop_agents.cancel();
    for a in agents {
        let _ = a.await;
    }
    stop.cancel();
    let _ = coordinator_task.await;

    let ok = summary.failed == 0
        && summary.completed == args.tasks
        && summary.ledger_verified
        && summary.matches_native_reference;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// One digit classification task over `input` (64-byte images) with the module `hash`.
fn digits_task(
    id: String,
    input: &[u8],
    hash: &ambient_core::Digest,
    verify: Policy,
) -> Submission {
    Submission {
        task_id: Some(id),
        client_id: Some("demo".into()),
        module: Some(hash.to_hex().to_string()),
        entry: Some("classify".into()),
        input_b64: Some(B64.encode(input)),
        verify: Some(verify.to_string()),
        ..Submission::default()
    }
}

/// `--dashboard`: four tasks a second, and the first device heated by 45 °C for the first 20 s
/// of every minute, until Ctrl-C.
async fn keep_running(
    client: &Client,
    hash: &ambient_core::Digest,
    verify: Policy,
    heater: &ambient_agent::Heater,
) -> anyhow::Result<()> {
    let images: Vec<&[u8; 64]> = ambient_digits::heldout().map(|(image, _)| image).collect();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut hot = false;
    for n in 0_usize.. {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tick.tick() => {}
        }
        let heat = started.elapsed().as_secs() % 60 < 20;
        if heat != hot {
            hot = heat;
            heater.set_millic(if heat { 45_000 } else { 0 });
            eprintln!(
                "{}-0 {}",
                PROFILES[0],
                if heat {
                    "overheats (simulated, +45 °C)"
                } else {
                    "cools down"
                }
            );
        }
        let image = images[n % images.len()];
        client
            .submit(&digits_task(format!("live-{n}"), image, hash, verify))
            .await?;
    }
    heater.set_millic(0);
    Ok(())
}

/// Waits until `n` nodes are online in the coordinator's registry snapshot (shared with `bench`).
pub(super) async fn wait_for_nodes(db: &std::path::Path, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(store) = Store::open_read_only(db) {
            let online = store.node_views()?.iter().filter(|v| v.online).count();
            if online >= n {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "agents did not register with the coordinator within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn summarise(
    args: &DemoArgs,
    events: &std::collections::HashMap<String, TaskEvent>,
    expected: &BTreeMap<String, (Vec<u8>, Vec<u8>)>,
    elapsed: Duration,
    db: &std::path::Path,
) -> anyhow::Result<Summary> {
    let store = Store::open_read_only(db)?;
    let mut per_node: BTreeMap<String, NodeSummary> = BTreeMap::new();
    for v in store.node_views()? {
        let hex = v.node.to_hex().to_string();
        per_node.insert(
            hex.clone(),
            NodeSummary {
                node: hex,
                profile: v.profile.unwrap_or_else(|| "-".into()),
                verified: v.reputation.verified.into(),
                disputed: v.reputation.disputed.into(),
                ..NodeSummary::default()
            },
        );
    }
    for b in store.balances()? {
        if let Some(hex) = b.account.strip_prefix("node:")
            && let Some(n) = per_node.get_mut(hex)
        {
            n.earned_ucredits = b.balance;
        }
    }
    let (mut completed, mut failed, mut correct, mut images, mut native_ok) = (0, 0, 0, 0, true);
    let mut latencies = Vec::new();
    let mut checked = 0;
    for (id, (labels, native)) in expected {
        let Some(ev) = events.get(id) else {
            failed += 1;
            continue;
        };
        if ev.status != EventStatus::Completed {
            failed += 1;
            continue;
        }
        completed += 1;
        checked += usize::from(ev.verdict.as_ref().is_some_and(|v| v.agreeing >= 2));
        let output = ev
            .output_b64
            .as_deref()
            .and_then(|b| B64.decode(b).ok())
            .unwrap_or_default();
        images += labels.len();
        correct += output.iter().zip(labels).filter(|(a, b)| a == b).count();
        native_ok &= output == *native;
        let latency = ev.latency_ms.unwrap_or(0.0);
        latencies.push(latency);
        for node in &ev.nodes {
            let n = per_node.entry(node.clone()).or_default();
            n.tasks += 1;
            n.mean_latency_ms += latency;
        }
    }
    for n in per_node.values_mut() {
        if n.tasks > 0 {
            n.mean_latency_ms /= n.tasks as f64;
        }
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let check = store.verify_ledger()?;
    Ok(Summary {
        agents: args.agents,
        tasks: args.tasks,
        completed,
        checked,
        failed,
        strategy: args.strategy.clone(),
        verify: args.verify.to_string(),
        images,
        correct,
        accuracy: if images > 0 {
            correct as f64 / images as f64
        } else {
            0.0
        },
        matches_native_reference: native_ok && completed > 0,
        latency_p50_ms: pct(0.5),
        latency_p99_ms: pct(0.99),
        throughput_tasks_per_s: completed as f64 / elapsed.as_secs_f64().max(1e-9),
        ledger_verified: check.is_ok(),
        ledger_entries: check.entries,
        nodes: per_node.into_values().collect(),
    })
}

fn print_summary(s: &Summary) {
    println!(
        "\n{:<14} {:<17} {:>6} {:>12} {:>9} {:>9} {:>14}",
        "NODE", "PROFILE", "TASKS", "MEAN LAT ms", "VERIFIED", "DISPUTED", "EARNED (cr)"
    );
    for n in &s.nodes {
        println!(
            "{:<14} {:<17} {:>6} {:>12.2} {:>9} {:>9} {:>14.6}",
            &n.node[..12],
            n.profile,
            n.tasks,
            n.mean_latency_ms,
            n.verified,
            n.disputed,
            n.earned_ucredits as f64 / 1e6
        );
    }
    println!();
    println!(
        "tasks        {} completed, {} failed ({} strategy, {} verification)",
        s.completed, s.failed, s.strategy, s.verify
    );
    if s.checked > 0 {
        let why = if s.verify.starts_with("target:") {
            "each result ran on nodes until their agreement made a wrong result that unlikely; \
             fewer as nodes agree (one runs alone after about 920 agreements in a row), then 5% \
             are spot-checked"
        } else {
            "new nodes prove themselves by agreeing with others (verification.trust_after), then \
             5% are spot-checked"
        };
        let runs: usize = s.nodes.iter().map(|n| n.tasks).sum();
        println!(
            "checked      {} of {} on two or more nodes ({:.2} runs per task): {why}",
            s.checked,
            s.completed,
            runs as f64 / s.completed.max(1) as f64
        );
    }
    println!(
        "latency      p50 {:.2} ms, p99 {:.2} ms (submit to verified result)",
        s.latency_p50_ms, s.latency_p99_ms
    );
    println!("throughput   {:.1} tasks/s", s.throughput_tasks_per_s);
    println!(
        "accuracy     {:.2}% ({} of {} held-out digits); WASM output {} the native Rust reference",
        s.accuracy * 100.0,
        s.correct,
        s.images,
        if s.matches_native_reference {
            "matches"
        } else {
            "DIFFERS FROM"
        }
    );
    println!(
        "ledger       {} ({} entries, hash chain and balances checked)",
        if s.ledger_verified {
            "verified"
        } else {
            "BROKEN"
        },
        s.ledger_entries
    );
}
