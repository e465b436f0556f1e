//! `ambient coordinator`: the gateway service.

use std::path::PathBuf;
use std::process::ExitCode;

use ambient_coordinator::{Coordinator, RawConfig};
use clap::Args;

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ambient coordinator --data-dir ./data\n  ambient coordinator --broker mqtt://127.0.0.1:1883     # use a running mosquitto\n  ambient coordinator --print-config > /etc/ambient/coordinator.toml\n  curl -s 127.0.0.1:8080/api/nodes              # the HTTP API, on loopback by default"
)]
pub struct CoordinatorArgs {
    /// TOML configuration file (see --print-config). AMBIENT_COORDINATOR_SECTION__KEY
    /// variables override its keys (AMBIENT_COORDINATOR_VERIFICATION__POLICY=receipt), and
    /// flags override both.
    #[arg(long, env = "AMBIENT_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the embedded MQTT broker [default: 127.0.0.1:1883].
    #[arg(long, env = "AMBIENT_LISTEN", conflicts_with = "broker")]
    listen: Option<String>,
    /// Use an external MQTT broker instead of the embedded one, e.g. mqtt://127.0.0.1:1883.
    #[arg(long, env = "AMBIENT_BROKER")]
    broker: Option<String>,
    /// Directory of the SQLite database [default: /var/lib/ambient].
    #[arg(long, env = "AMBIENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the HTTP API (JSON views, /healthz, POST /api/tasks), or `off`
    /// [default: 127.0.0.1:8080].
    #[arg(long, env = "AMBIENT_HTTP")]
    http: Option<String>,
    /// Default strategy: weighted, round-robin, least-loaded, latency-aware.
    #[arg(long, env = "AMBIENT_STRATEGY")]
    strategy: Option<String>,
    /// Publish Home Assistant MQTT discovery configs, so each device appears in Home Assistant.
    #[arg(long, env = "AMBIENT_HA_DISCOVERY")]
    ha_discovery: bool,
    /// Home Assistant's discovery prefix [default: homeassistant].
    #[arg(long, env = "AMBIENT_HA_PREFIX")]
    ha_prefix: Option<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

pub fn load(args: &CoordinatorArgs) -> anyhow::Result<RawConfig> {
    let mut raw = RawConfig::load(args.config.as_deref(), ambient_daemon::config::env_vars())?;
    if let Some(l) = &args.listen {
        raw.broker.listen = l.clone();
    }
    if let Some(b) = &args.broker {
        raw.broker.url = Some(b.clone());
    }
    if let Some(d) = &args.data_dir {
        raw.storage.data_dir = d.clone();
    }
    if let Some(h) = &args.http {
        raw.http.listen = h.clone();
    }
    if let Some(s) = &args.strategy {
        raw.scheduling.strategy = s.clone();
    }
    if args.ha_discovery {
        raw.home_assistant.discovery = true;
    }
    if let Some(p) = &args.ha_prefix {
        raw.home_assistant.prefix = p.clone();
    }
    Ok(raw)
}

pub async fn run(args: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    let raw = load(&args)?;
    if args.print_config {
        let mut raw = raw;
        raw.broker.url = raw.broker.url.as_deref().map(ambient_mqtt::redact);
        print!("{}", raw.to_toml()?);
        return Ok(ExitCode::SUCCESS);
    }
    let config = raw.validate()?;
    let coordinator = Coordinator::bind(config).await?;
    match coordinator.tls_url() {
        Some(tls) => eprintln!(
            "ambient coordinator: broker {}, TLS {tls}",
            coordinator.broker_url()
        ),
        None => eprintln!("ambient coordinator: broker {}", coordinator.broker_url()),
    }
    if let Some(http) = coordinator.http_url() {
        eprintln!("ambient coordinator: HTTP API {http} (try {http}/healthz)");
    }
    eprintln!(
        "ambient coordinator: assignment key {} (agents pin it; see the README's Security section)",
        coordinator.public_key_hex()
    );
    // systemd hears READY=1 once `run` awaits the shutdown future, which it does when it serves.
    coordinator
        .run(ambient_daemon::notify_systemd(
            ambient_daemon::shutdown_signal(),
        ))
        .await?;
    Ok(ExitCode::SUCCESS)
}
