//! `ambient-agent`: the device daemon. Parses flags, loads the config (flags > environment >
//! file > defaults), starts logging and runs the agent until SIGINT or SIGTERM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ambient_agent::{AgentConfig, DEFAULT_CONFIG_PATH, RawConfig};
use anyhow::Context as _;
use clap::{ArgAction, Parser};

const EXAMPLES: &str = "\
Examples:
  Join the pool of the gateway at gateway.local:
    ambient-agent --broker mqtt://gateway.local:1883

  Pretend to be a Raspberry Pi 4 (synthetic readings), with state in /tmp:
    ambient-agent --broker mqtt://127.0.0.1:1883 --state-dir /tmp/pi4-0 --simulate pi4 --name pi4-0

  Show the effective configuration as commented TOML:
    ambient-agent --config /etc/ambient/agent.toml --print-config

  Print this device's node id and public key (creating its identity if needed), for a broker
  account named after the node or the coordinator's allowlist:
    ambient-agent --print-node-id

  Sign in to a mosquitto with accounts, over TLS with a private CA:
    AMBIENT_AGENT_TLS__CA_FILE=/etc/ambient/ca.pem ambient-agent --broker 'mqtts://<node id>:<password>@gateway.local:8883'

  Any config key from the environment (a section's key after a double underscore):
    AMBIENT_AGENT_TELEMETRY_INTERVAL_MS=1000 AMBIENT_AGENT_SAFETY__MAX_TEMP_MILLIC=75000 ambient-agent -v

Profiles for --simulate: pi4, pi5, pi-zero-2w, jetson-orin-nano, visionfive2.";

/// Runs WASM tasks for an Ambient coordinator and signs a receipt for each.
#[derive(Debug, Parser)]
#[command(name = "ambient-agent", version, about, after_help = EXAMPLES)]
struct Args {
    /// TOML config file [default: /etc/ambient/agent.toml if it exists]
    #[arg(long, env = "AMBIENT_AGENT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Broker URL: mqtt://[user[:password]@]host[:port], or mqtts://… for TLS [default: mqtt://127.0.0.1:1883]
    #[arg(long, env = "AMBIENT_AGENT_BROKER", value_name = "URL")]
    broker: Option<String>,
    /// Directory for the identity key, outbox and module cache [default: /var/lib/ambient-agent]
    #[arg(long, env = "AMBIENT_AGENT_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Name shown in logs
    #[arg(long, env = "AMBIENT_AGENT_NAME")]
    name: Option<String>,
    /// Labels announced for placement, comma-separated
    #[arg(
        long,
        env = "AMBIENT_AGENT_LABELS",
        value_delimiter = ',',
        value_name = "A,B"
    )]
    labels: Option<Vec<String>>,
    /// Simulate a device profile instead of reading this machine
    #[arg(long, env = "AMBIENT_AGENT_SIMULATE", value_name = "PROFILE")]
    simulate: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9101 [default: off]
    #[arg(long, env = "AMBIENT_AGENT_METRICS", value_name = "ADDR")]
    metrics: Option<String>,
    /// Inject a fault, for tests of verification (repeatable): wrong-output:SHARE (a wrong
    /// output, validly signed, on that share of runs) or claim-perfect-health
    #[cfg(feature = "fault-injection")]
    #[arg(long = "fault", value_name = "FAULT")]
    faults: Vec<ambient_agent::fault::Fault>,
    /// Print the effective configuration as commented TOML and exit
    #[arg(long)]
    print_config: bool,
    /// Print the node id and public key (creating the identity if there is none) and exit
    #[arg(long)]
    print_node_id: bool,
    /// More logging (-v debug, -vv trace); RUST_LOG overrides
    #[arg(short, long, action = ArgAction::Count)]
    verbose: u8,
    /// Log as JSON lines
    #[arg(long, env = "AMBIENT_AGENT_JSON_LOGS")]
    json_logs: bool,
}

fn main() -> ExitCode {
    match try_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ambient-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let config = load_config(&args)?;
    if args.print_config {
        print!("{}", config.to_toml()?);
        return Ok(ExitCode::SUCCESS);
    }
    if args.print_node_id {
        let identity = ambient_agent::load_identity(config.state_dir())?;
        println!("node id     {}", identity.node_id());
        println!("public key  {}", hex::encode(identity.public_key()));
        return Ok(ExitCode::SUCCESS);
    }
    init_logging(args.verbose, args.json_logs);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        // Async work is light (MQTT, timers); tasks run on the blocking pool.
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // systemd hears READY=1 once `run` awaits the shutdown future: config and identity loaded,
    // the broker still being tried.
    runtime.block_on(ambient_agent::run(
        config,
        ambient_agent::notify_systemd(ambient_daemon::shutdown_signal()),
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn load_config(args: &Args) -> anyhow::Result<AgentConfig> {
    let file = match &args.config {
        Some(path) => Some(path.clone()),
        None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| Path::exists(p)),
    };
    let mut raw = RawConfig::load(file.as_deref(), ambient_agent::env_vars())?;
    // Flags (and their environment variables, read by clap) win over the file.
    if let Some(broker) = &args.broker {
        raw.broker = broker.clone();
    }
    if let Some(dir) = &args.state_dir {
        raw.state_dir = dir.clone();
    }
    if let Some(name) = &args.name {
        raw.name = Some(name.clone());
    }
    if let Some(labels) = &args.labels {
        raw.labels = labels.iter().filter(|l| !l.is_empty()).cloned().collect();
    }
    if let Some(profile) = &args.simulate {
        raw.simulate = Some(profile.clone());
    }
    if let Some(addr) = &args.metrics {
        raw.metrics = Some(addr.clone());
    }
    #[allow(unused_mut)]
    let mut config = raw.validate()?;
    #[cfg(feature = "fault-injection")]
    config.set_faults(ambient_agent::fault::Faults(args.faults.clone()));
    Ok(config)
}

fn init_logging(verbose: u8, json: bool) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref(), verbose);
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not for journald or a log file.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        );
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(layer.json()).init();
    } else {
        registry.with(layer).init();
    }
}

/// The log filter from RUST_LOG, or from `-v` when RUST_LOG is unset, empty or does not parse.
///
/// RUST_LOG holds `target=level` directives: `Targets`, without env-filter's span and
/// field-value filters and the regex engine they need (0.5 MB of the binary).
fn log_filter(rust_log: Option<&str>, verbose: u8) -> tracing_subscriber::filter::Targets {
    use tracing::Level;
    use tracing_subscriber::filter::Targets;
    rust_log
        .filter(|s| !s.is_empty())
        .and_then(|s| s.parse::<Targets>().ok())
        .unwrap_or_else(|| {
            let (all, ours) = match verbose {
                0 => (Level::WARN, Level::INFO),
                1 => (Level::INFO, Level::DEBUG),
                _ => (Level::DEBUG, Level::TRACE),
            };
            Targets::new()
                .with_default(all)
                .with_target("ambient_agent", ours)
        })
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

    #[test]
    fn without_rust_log_the_agent_logs_info_and_others_warn() {
        let filter = log_filter(None, 0);
        assert!(filter.would_enable("ambient_agent::agent", &Level::INFO));
        assert!(!filter.would_enable("ambient_agent::agent", &Level::DEBUG));
        assert!(filter.would_enable("rumqttc::state", &Level::WARN));
        assert!(!filter.would_enable("rumqttc::state", &Level::INFO));
    }

    #[test]
    fn each_v_lowers_both_levels_one_step() {
        let filter = log_filter(None, 1);
        assert!(filter.would_enable("ambient_agent::agent", &Level::DEBUG));
        assert!(filter.would_enable("rumqttc::state", &Level::INFO));
        assert!(log_filter(None, 2).would_enable("ambient_agent::agent", &Level::TRACE));
    }

    #[test]
    fn rust_log_directives_override_the_flags() {
        let filter = log_filter(Some("error,rumqttc=debug"), 2);
        assert!(filter.would_enable("rumqttc::state", &Level::DEBUG));
        assert!(!filter.would_enable("ambient_agent::agent", &Level::WARN));
    }

    #[test]
    fn an_empty_or_unparsable_rust_log_means_the_default() {
        for rust_log in ["", "rumqttc=loud"] {
            let filter = log_filter(Some(rust_log), 0);
            assert!(filter.would_enable("ambient_agent::agent", &Level::INFO));
            assert!(!filter.would_enable("rumqttc::state", &Level::INFO));
        }
    }
}
