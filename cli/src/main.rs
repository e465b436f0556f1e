//! `ambient`: the user's command line and the coordinator service, composed from the
//! workspace's libraries. This package decides nothing; each subcommand parses its flags and
//! calls a library:
//!
//! | command | module | composes |
//! |---|---|---|
//! | `coordinator` | [`coordinator`] | `ambient-coordinator` (with `ambient-broker` inside), `ambient-daemon` |
//! | `submit` | [`submit`] | `ambient_coordinator::client` |
//! | `nodes`, `tasks`, `ledger` | [`read`], [`enrollment`] | `ambient_coordinator::store` (read-only) |
//! | `passwd` | [`passwd`] | `ambient_coordinator::access` |
//! | `sim` | [`sim`] | `ambient_coordinator::sim` (the real dispatcher, simulated nodes) |
//! | `demo` | `demo` | all of the above and `ambient-agent` (simulated devices, real WASM) |
//! | `bench` | `bench` | the same, measured |
//!
//! `demo` and `bench` run agents in this process, so they need the WASM engine: they sit behind
//! the default `demo` feature. A gateway built with `--no-default-features` has no wasmtime,
//! Cranelift or agent in it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args as ClapArgs, Parser, Subcommand};

#[cfg(feature = "demo")]
mod bench;
mod coordinator;
#[cfg(feature = "demo")]
mod demo;
mod enrollment;
mod passwd;
mod read;
mod sim;
mod submit;

/// Ambient turns a shelf of edge devices into one verifiable compute pool.
#[derive(Debug, Parser)]
#[command(
    name = "ambient",
    version,
    about,
    after_help = "Examples:\n  ambient demo                                   # everything on this machine, nothing to install\n  ambient coordinator --data-dir ./data          # the gateway service, embedded broker on 127.0.0.1:1883\n  ambient submit tasks/modules/digits.wasm --entry classify --input image.bin --wait\n  ambient nodes --data-dir ./data\n  ambient ledger verify --data-dir ./data"
)]
pub struct Args {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Logging flags shared by every command.
#[derive(Debug, ClapArgs)]
pub struct LogArgs {
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Logs as JSON lines.
    #[arg(long, global = true)]
    pub json_logs: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway service: embedded MQTT broker, registry, dispatch, verification, ledger.
    Coordinator(coordinator::CoordinatorArgs),
    /// Submit a WASM task (or a batch) and optionally wait for verified results.
    Submit(Box<submit::SubmitArgs>),
    /// Show registered nodes (health score and its terms, breaker, reputation, last seen), or
    /// approve and revoke them.
    Nodes(read::NodesArgs),
    /// Show recent tasks and their outcomes.
    Tasks(read::TasksArgs),
    /// Show account balances, or `verify` the hash chain and the books.
    Ledger(read::LedgerArgs),
    /// Run a broker, a coordinator and simulated devices here, classify digits, print a summary.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
    /// Measure latency, throughput, scheduling, execution and footprint beside this machine's limits.
    #[cfg(feature = "demo")]
    Bench(bench::BenchArgs),
    /// Hash a password for a client account of the embedded broker ([broker.users]).
    Passwd(passwd::PasswdArgs),
    /// Replay the dispatcher's verification against lying and colluding nodes on simulated
    /// time: wrong results accepted, compute per task, cheaters caught.
    Sim(sim::SimArgs),
}

/// Where the coordinator keeps its database.
#[derive(Debug, Clone, ClapArgs)]
pub struct DataDir {
    /// Directory of the coordinator's `ambient.db`.
    #[arg(long, env = "AMBIENT_DATA_DIR", default_value = "/var/lib/ambient")]
    pub data_dir: PathBuf,
}

fn init_tracing(log: &LogArgs) {
    use tracing_subscriber::EnvFilter;
    let default = match log.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: never escape codes in a redirected log.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        );
    if log.json_logs {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Coordinator(a) => coordinator::run(a).await,
        Command::Submit(a) => submit::run(*a).await,
        Command::Nodes(a) => {
            quiet_when_output_closes();
            read::nodes(a)
        }
        Command::Tasks(a) => {
            quiet_when_output_closes();
            read::tasks(a)
        }
        Command::Ledger(a) => {
            quiet_when_output_closes();
            read::ledger(a)
        }
        #[cfg(feature = "demo")]
        Command::Demo(a) => demo::run(a).await,
        #[cfg(feature = "demo")]
        Command::Bench(a) => bench::run(a).await,
        Command::Passwd(a) => passwd::run(a),
        Command::Sim(a) => sim::run(a),
    }
}

/// A read command whose output is closed early (`ambient nodes --json | head`) ends quietly,
/// as Unix tools do, instead of panicking on a failed write: SIGPIPE gets its default action.
/// Only for commands that write nothing but standard output; the services keep ignoring it.
fn quiet_when_output_closes() {
    #[cfg(unix)]
    // SAFETY: signal(2) is thread-safe, and the read commands install no handler of their own
    // that this could replace.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(&args.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
