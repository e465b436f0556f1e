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
//!
//! | module | what it holds |
//! |---|---|
//! | `report` | figures, goals and statuses; the table and the JSON report |
//! | `harness` | timed batches of calls, percentiles, progress, running a section off the runtime |
//! | `e2e` | 1. end to end, with raw MQTT and a mosquitto launcher |
//! | `scheduling` | 2. registry decisions and telemetry ingest |
//! | `execution` | 3. the sandbox and the digits kernel |
//! | `core` | 4. ambient-core's hot functions, sha3, ed25519, `openssl speed` |
//! | `footprint` | 5. binary sizes and the agent's idle memory |

mod core;
mod e2e;
mod execution;
mod footprint;
mod harness;
mod report;
mod scheduling;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use self::core::{CORE, section_core};
use self::e2e::section_end_to_end;
use self::execution::{EXECUTION, section_execution};
use self::footprint::{FOOTPRINT, section_footprint};
use self::harness::blocking;
use self::report::{Machine, Report, Status, cpu_model, load_average, print_table, section_result};
use self::scheduling::{SCHEDULING, section_scheduling};

use ambient_testkit::wat::TRIVIAL as TRIVIAL_WAT;

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

/// Runs the sections `args` asks for and prints the report; fails (exit code 1) when a figure
/// could not be measured, not when a goal is missed.
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
