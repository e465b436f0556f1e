//! Configuration in two stages: [`RawConfig`] as read from TOML and the environment (units in
//! key names), validated once into [`AgentConfig`] (typed values, ready to use).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use documented::DocumentedFields;

use ambient_core::{MAX_LABEL_LEN, MAX_LABELS, MAX_MODULE_BYTES, SafetyPolicy};
pub use ambient_mqtt::BrokerUrl;
use ambient_mqtt::TlsFiles;
use serde::{Deserialize, Serialize};

use crate::engine::SandboxConfig;
use crate::profile::{Heater, Profile};
use crate::telemetry::ThermalZones;

/// Where the agent looks for its config file when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ambient/agent.toml";
/// The state directory when none is configured.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ambient-agent";
/// The broker when none is configured.
pub const DEFAULT_BROKER: &str = "mqtt://127.0.0.1:1883";
/// Prefix of environment variables that override config keys (`AMBIENT_AGENT_TELEMETRY_INTERVAL_MS`,
/// `AMBIENT_AGENT_SAFETY__MAX_TEMP_MILLIC` for a key in a section).
pub const ENV_PREFIX: &str = "AMBIENT_AGENT_";

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A key has a value outside what it accepts.
    #[error("invalid value {value} for `{key}`: expected {expected}")]
    Invalid {
        /// The key, with its section (`safety.max_temp_millic`).
        key: String,
        /// The value given, as written.
        value: String,
        /// What would have been accepted.
        expected: String,
    },
    /// The file or an environment variable could not be read or does not fit the schema.
    #[error(transparent)]
    Load(#[from] ambient_daemon::config::LoadError),
}

fn invalid(key: &str, value: impl fmt::Display, expected: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        value: value.to_string(),
        expected: expected.into(),
    }
}

/// The configuration as written: every key optional, units in key names.
///
/// See the README for each key; [`RawConfig::default`] holds every default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DocumentedFields)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    /// Broker URL, `mqtt://[user[:password]@]host[:port]` or `mqtts://…`. Default
    /// `mqtt://127.0.0.1:1883`. Without a user, the agent signs in with its key (the
    /// coordinator's embedded broker); with one, it uses that account (an external broker).
    pub broker: String,
    /// Directory for the identity key, the outbox and the module cache. Default `/var/lib/ambient-agent`.
    pub state_dir: PathBuf,
    /// A human name for logs. Default: none (the node id is used).
    pub name: Option<String>,
    /// Labels announced to the coordinator for placement (at most 8, each ≤ 32 bytes). Default none.
    pub labels: Vec<String>,
    /// A simulated device profile (`pi4`, `pi5`, `pi-zero-2w`, `jetson-orin-nano`, `visionfive2`). Default none.
    pub simulate: Option<String>,
    /// The WASM engine: `wasmtime`, or `wasmedge` in builds with that feature. Default `wasmtime`.
    pub engine: String,
    /// Tasks run at once. Default: the number of cores (the profile's when simulating).
    pub max_concurrency: Option<u32>,
    /// Period of telemetry samples and pings, in milliseconds. Default 5,000.
    pub telemetry_interval_ms: u64,
    /// Every how many telemetry intervals a 64 KiB ping measures bandwidth. Default 6.
    pub bandwidth_probe_every: u32,
    /// MQTT keep-alive, in seconds. Default 10.
    pub keep_alive_secs: u64,
    /// First reconnect delay after losing the broker, in milliseconds. Default 250.
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay (the backoff doubles up to it, with jitter), in milliseconds. Default 30,000.
    pub reconnect_max_ms: u64,
    /// How long to wait for a module to arrive on its topic, in milliseconds. Default 10,000.
    pub module_fetch_timeout_ms: u64,
    /// How long shutdown waits for running tasks, in milliseconds. Default 10,000.
    pub shutdown_grace_ms: u64,
    /// How many (task, attempt) pairs are remembered to drop duplicates. Default 4,096.
    pub dedup_capacity: u32,
    /// Certificates for `mqtts://`.
    pub tls: RawTls,
    /// The sandbox.
    pub sandbox: RawSandbox,
    /// Overrides of the safety policy (the profile's, or the board's).
    pub safety: RawSafety,
    /// Address to serve Prometheus metrics on (`GET /metrics`), e.g. `127.0.0.1:9101`.
    /// Default none (off).
    pub metrics: Option<String>,
}

/// `[tls]` keys, for `mqtts://` brokers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, DocumentedFields)]
#[serde(default, deny_unknown_fields)]
pub struct RawTls {
    /// PEM file of the CA certificates to trust. Default: the system's root certificates.
    pub ca_file: Option<PathBuf>,
    /// PEM file of a client certificate, for brokers that require one. Default none.
    pub cert_file: Option<PathBuf>,
    /// PEM file of that certificate's private key. Default none.
    pub key_file: Option<PathBuf>,
}

/// `[sandbox]` keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DocumentedFields)]
#[serde(default, deny_unknown_fields)]
pub struct RawSandbox {
    /// Largest module accepted, in bytes. Default 16 MiB (the protocol's maximum).
    pub max_module_bytes: u64,
    /// Largest task memory limit accepted, in bytes. Default 512 MiB.
    pub max_memory_bytes: u64,
    /// Longest a module may take to compile, in milliseconds. Default 30,000.
    pub compile_timeout_ms: u64,
    /// Compiled modules kept in memory. Default 64.
    pub max_cached_modules: u32,
    /// Bytes of compiled code kept in memory. Default 128 MiB.
    pub max_cached_bytes: u64,
    /// Bytes of modules kept in the state directory's module cache. Default 1 GiB.
    pub max_cache_dir_bytes: u64,
    /// Resolution of task wall-clock limits, in milliseconds. Default 10.
    pub epoch_tick_ms: u64,
}

/// `[safety]` keys; each one left out keeps the profile's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, DocumentedFields)]
#[serde(default, deny_unknown_fields)]
pub struct RawSafety {
    /// Trip above this temperature, in millidegrees Celsius (85,000; 80,000 on a Pi).
    pub max_temp_millic: Option<i32>,
    /// Resume below this temperature after overheating, in m°C (80,000; 75,000 on a Pi).
    pub resume_temp_millic: Option<i32>,
    /// Trip above this latency to the coordinator, in microseconds (100,000).
    pub max_latency_us: Option<u32>,
    /// Trip above this many task errors (25).
    pub max_errors: Option<u32>,
    /// Trip while the firmware reports throttling (true).
    pub trip_on_throttle: Option<bool>,
    /// First cool-down before a probe task, in milliseconds (30,000).
    pub cooldown_ms: Option<u64>,
    /// Longest cool-down, in milliseconds (600,000).
    pub max_cooldown_ms: Option<u64>,
    /// Thermal zones (by their `type`) left out of the temperature (`["PMIC-Die"]`, none on a
    /// Pi).
    pub thermal_ignore: Option<Vec<String>>,
    /// Thermal zones that alone count when any of them reads (`["cpu-thermal"]` on a Pi,
    /// none elsewhere: the hottest zone counts).
    pub thermal_prefer: Option<Vec<String>>,
}

impl RawSafety {
    /// These overrides with every threshold of `policy` set; the thermal zones stay as they are.
    fn with_policy(self, policy: SafetyPolicy) -> Self {
        Self {
            max_temp_millic: Some(policy.max_temp_millic),
            resume_temp_millic: Some(policy.resume_temp_millic),
            max_latency_us: Some(policy.max_latency_us),
            max_errors: Some(policy.max_errors),
            trip_on_throttle: Some(policy.trip_on_throttle),
            cooldown_ms: Some(policy.cooldown_ms),
            max_cooldown_ms: Some(policy.max_cooldown_ms),
            ..self
        }
    }
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            broker: DEFAULT_BROKER.to_owned(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            name: None,
            labels: Vec::new(),
            simulate: None,
            engine: "wasmtime".to_owned(),
            max_concurrency: None,
            metrics: None,
            telemetry_interval_ms: 5_000,
            bandwidth_probe_every: 6,
            keep_alive_secs: 10,
            reconnect_min_ms: 250,
            reconnect_max_ms: 30_000,
            module_fetch_timeout_ms: 10_000,
            shutdown_grace_ms: 10_000,
            dedup_capacity: 4_096,
            tls: RawTls::default(),
            sandbox: RawSandbox::default(),
            safety: RawSafety::default(),
        }
    }
}

impl Default for RawSandbox {
    fn default() -> Self {
        Self::from(&SandboxConfig::default())
    }
}

impl From<&SandboxConfig> for RawSandbox {
    fn from(d: &SandboxConfig) -> Self {
        Self {
            max_module_bytes: d.max_module_bytes as u64,
            max_memory_bytes: d.max_memory_bytes,
            compile_timeout_ms: d.compile_timeout.as_millis() as u64,
            max_cached_modules: d.max_cached_modules as u32,
            max_cached_bytes: d.max_cached_bytes as u64,
            max_cache_dir_bytes: d.max_cache_dir_bytes,
            epoch_tick_ms: d.epoch_tick.as_millis() as u64,
        }
    }
}

/// Keys that are only command-line options; their `AMBIENT_AGENT_*` variables belong to clap.
const CLI_ONLY_ENV: &[&str] = &["CONFIG", "PRINT_CONFIG", "JSON_LOGS", "VERBOSE"];

impl RawConfig {
    /// Reads a TOML file (`None`: start from the defaults), then applies `AMBIENT_AGENT_*`
    /// variables from `env` on top (`__` separates a section from its key; `labels` also
    /// takes `a,b,c`): [`ambient_daemon::config::load`].
    ///
    /// # Errors
    /// [`ConfigError::Load`] if the file cannot be read, or the file or a variable names an
    /// unknown key or has a value of the wrong type.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let vars = ambient_daemon::config::Env {
            prefix: ENV_PREFIX,
            flags: CLI_ONLY_ENV,
            lists: &["labels"],
        };
        Ok(ambient_daemon::config::load(file, vars, env)?)
    }

    /// Checks every value and builds the typed configuration.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad key, its value and what it accepts.
    pub fn validate(&self) -> Result<AgentConfig, ConfigError> {
        let broker: BrokerUrl = self.broker.parse().map_err(|_| {
            invalid(
                "broker",
                quoted(&ambient_mqtt::redact(&self.broker)),
                ambient_mqtt::EXPECTED,
            )
        })?;
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(invalid(
                "tls.cert_file",
                quoted(&format!("{:?}", self.tls.cert_file)),
                "cert_file and key_file together, or neither",
            ));
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err(invalid("state_dir", "\"\"", "a directory path"));
        }
        let simulate = match &self.simulate {
            Some(s) => Some(s.parse::<Profile>().map_err(|_| {
                invalid(
                    "simulate",
                    quoted(s),
                    "one of pi4, pi5, pi-zero-2w, jetson-orin-nano, visionfive2",
                )
            })?),
            None => None,
        };
        let engine = match self.engine.as_str() {
            "wasmtime" => EngineChoice::Wasmtime,
            #[cfg(feature = "wasmedge")]
            "wasmedge" => EngineChoice::WasmEdge,
            other => {
                let expected = if cfg!(feature = "wasmedge") {
                    "wasmtime or wasmedge"
                } else {
                    "wasmtime (this build has no wasmedge feature)"
                };
                return Err(invalid("engine", quoted(other), expected));
            }
        };
        let metrics = match self.metrics.as_deref().map(str::trim) {
            None | Some("" | "off") => None,
            Some(addr) => Some(addr.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "metrics",
                    quoted(addr),
                    "an address and port such as 127.0.0.1:9101, or \"off\"",
                )
            })?),
        };
        let max_concurrency = match self.max_concurrency {
            Some(n) if (1..=1024).contains(&n) => Some(n as u16),
            Some(n) => return Err(invalid("max_concurrency", n, "1 to 1024 tasks")),
            None => None,
        };
        let ms = |key: &str, v: u64, min: u64, max: u64| -> Result<Duration, ConfigError> {
            if (min..=max).contains(&v) {
                Ok(Duration::from_millis(v))
            } else {
                Err(invalid(key, v, format!("{min} to {max} milliseconds")))
            }
        };
        let telemetry_interval = ms(
            "telemetry_interval_ms",
            self.telemetry_interval_ms,
            50,
            3_600_000,
        )?;
        if self.bandwidth_probe_every < 2 {
            return Err(invalid(
                "bandwidth_probe_every",
                self.bandwidth_probe_every,
                "2 or more intervals",
            ));
        }
        if !(1..=65_535).contains(&self.keep_alive_secs) {
            return Err(invalid(
                "keep_alive_secs",
                self.keep_alive_secs,
                "1 to 65535 seconds",
            ));
        }
        let reconnect_min = ms("reconnect_min_ms", self.reconnect_min_ms, 10, 600_000)?;
        let reconnect_max = ms(
            "reconnect_max_ms",
            self.reconnect_max_ms,
            self.reconnect_min_ms,
            3_600_000,
        )?;
        let module_fetch_timeout = ms(
            "module_fetch_timeout_ms",
            self.module_fetch_timeout_ms,
            1,
            3_600_000,
        )?;
        let shutdown_grace = ms("shutdown_grace_ms", self.shutdown_grace_ms, 0, 3_600_000)?;
        if !(16..=1_000_000).contains(&self.dedup_capacity) {
            return Err(invalid(
                "dedup_capacity",
                self.dedup_capacity,
                "16 to 1000000 entries",
            ));
        }
        let mut config = AgentConfig {
            broker,
            state_dir: self.state_dir.clone(),
            name: None,
            labels: Vec::new(),
            simulate,
            heater: Heater::default(),
            metrics,
            engine,
            max_concurrency,
            telemetry_interval,
            bandwidth_probe_every: self.bandwidth_probe_every,
            keep_alive: Duration::from_secs(self.keep_alive_secs),
            reconnect_min,
            reconnect_max,
            module_fetch_timeout,
            shutdown_grace,
            dedup_capacity: self.dedup_capacity as usize,
            tls: TlsFiles {
                ca_file: self.tls.ca_file.clone(),
                cert_file: self.tls.cert_file.clone(),
                key_file: self.tls.key_file.clone(),
            },
            sandbox: self.sandbox.validate()?,
            safety: self.safety.clone(),
            #[cfg(feature = "fault-injection")]
            faults: crate::fault::Faults::default(),
        };
        if let Some(name) = &self.name {
            config.set_name(name.clone());
        }
        config.set_labels(self.labels.iter().map(String::as_str))?;
        config.safety_policy_checked()?;
        Ok(config)
    }
}

impl RawSandbox {
    fn validate(&self) -> Result<SandboxConfig, ConfigError> {
        if !(8..=MAX_MODULE_BYTES as u64).contains(&self.max_module_bytes) {
            return Err(invalid(
                "sandbox.max_module_bytes",
                self.max_module_bytes,
                format!("8 to {MAX_MODULE_BYTES} bytes"),
            ));
        }
        if !((64 << 10)..=(4 << 30)).contains(&self.max_memory_bytes) {
            return Err(invalid(
                "sandbox.max_memory_bytes",
                self.max_memory_bytes,
                "65536 to 4294967296 bytes (one WASM page to a full 32-bit memory)",
            ));
        }
        if !(1..=3_600_000).contains(&self.compile_timeout_ms) {
            return Err(invalid(
                "sandbox.compile_timeout_ms",
                self.compile_timeout_ms,
                "1 to 3600000 milliseconds",
            ));
        }
        if self.max_cached_modules == 0 {
            return Err(invalid(
                "sandbox.max_cached_modules",
                0,
                "1 or more modules",
            ));
        }
        if self.max_cached_bytes < 1 << 20 {
            return Err(invalid(
                "sandbox.max_cached_bytes",
                self.max_cached_bytes,
                "1048576 bytes (1 MiB) or more",
            ));
        }
        if self.max_cache_dir_bytes < self.max_module_bytes {
            return Err(invalid(
                "sandbox.max_cache_dir_bytes",
                self.max_cache_dir_bytes,
                "at least sandbox.max_module_bytes",
            ));
        }
        if !(1..=1_000).contains(&self.epoch_tick_ms) {
            return Err(invalid(
                "sandbox.epoch_tick_ms",
                self.epoch_tick_ms,
                "1 to 1000 milliseconds",
            ));
        }
        Ok(SandboxConfig {
            max_module_bytes: self.max_module_bytes as usize,
            max_memory_bytes: self.max_memory_bytes,
            compile_timeout: Duration::from_millis(self.compile_timeout_ms),
            max_cached_modules: self.max_cached_modules as usize,
            max_cached_bytes: usize::try_from(self.max_cached_bytes).unwrap_or(usize::MAX),
            max_cache_dir_bytes: self.max_cache_dir_bytes,
            epoch_tick: Duration::from_millis(self.epoch_tick_ms),
            ..SandboxConfig::default()
        })
    }
}

fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// Which sandbox runs tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EngineChoice {
    /// wasmtime with Cranelift (the default).
    Wasmtime,
    /// WasmEdge (builds with the `wasmedge` feature).
    #[cfg(feature = "wasmedge")]
    WasmEdge,
}

/// The validated configuration [`crate::run`] takes.
///
/// Build it with [`AgentConfig::new`] and adjust it with the setters, or validate a
/// [`RawConfig`] read from a file.
///
/// ```
/// use std::time::Duration;
/// use ambient_agent::{AgentConfig, Profile};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut config = AgentConfig::new("mqtt://127.0.0.1:1883", "/tmp/agent-0")?;
/// config
///     .set_name("pi4-0")
///     .set_simulate(Profile::Pi4)
///     .set_telemetry_interval(Duration::from_millis(500))
///     .set_labels(["room-2"])?;
/// assert_eq!(config.max_concurrency(), 4); // the Pi 4's cores
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    broker: BrokerUrl,
    state_dir: PathBuf,
    name: Option<String>,
    labels: Vec<String>,
    simulate: Option<Profile>,
    heater: Heater,
    metrics: Option<SocketAddr>,
    engine: EngineChoice,
    max_concurrency: Option<u16>,
    telemetry_interval: Duration,
    bandwidth_probe_every: u32,
    keep_alive: Duration,
    reconnect_min: Duration,
    reconnect_max: Duration,
    module_fetch_timeout: Duration,
    shutdown_grace: Duration,
    dedup_capacity: usize,
    tls: TlsFiles,
    sandbox: SandboxConfig,
    safety: RawSafety,
    #[cfg(feature = "fault-injection")]
    faults: crate::fault::Faults,
}

impl AgentConfig {
    /// The faults this agent injects (feature `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn faults(&self) -> &crate::fault::Faults {
        &self.faults
    }

    /// Sets the faults to inject (feature `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn set_faults(&mut self, faults: crate::fault::Faults) -> &mut Self {
        self.faults = faults;
        self
    }

    /// Defaults for an agent talking to `broker` (e.g. `"mqtt://127.0.0.1:1883"`) with state in
    /// `state_dir`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when `broker` is not an `mqtt://` or `mqtts://` URL.
    pub fn new(broker: &str, state_dir: impl Into<PathBuf>) -> Result<Self, ConfigError> {
        RawConfig {
            broker: broker.to_owned(),
            state_dir: state_dir.into(),
            ..RawConfig::default()
        }
        .validate()
    }

    /// The broker.
    pub fn broker(&self) -> &BrokerUrl {
        &self.broker
    }

    /// Certificates for `mqtts://`.
    pub fn tls(&self) -> &TlsFiles {
        &self.tls
    }

    /// The state directory (identity key, outbox, module cache).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The human name shown in logs, if any.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Sets the human name shown in logs.
    pub fn set_name(&mut self, name: impl Into<String>) -> &mut Self {
        let name = name.into();
        self.name = (!name.is_empty()).then_some(name);
        self
    }

    /// The announced labels.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Replaces the announced labels.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for more than 8 labels, or a label that is empty, longer than
    /// 32 bytes, or contains whitespace or a comma.
    pub fn set_labels<S: AsRef<str>>(
        &mut self,
        labels: impl IntoIterator<Item = S>,
    ) -> Result<&mut Self, ConfigError> {
        let labels: Vec<String> = labels.into_iter().map(|s| s.as_ref().to_owned()).collect();
        if labels.len() > MAX_LABELS {
            return Err(invalid(
                "labels",
                format!("{labels:?}"),
                format!("at most {MAX_LABELS} labels"),
            ));
        }
        for l in &labels {
            if l.is_empty()
                || l.len() > MAX_LABEL_LEN
                || l.contains(|c: char| c.is_whitespace() || c == ',')
            {
                return Err(invalid(
                    "labels",
                    quoted(l),
                    format!("1 to {MAX_LABEL_LEN} bytes without whitespace or commas"),
                ));
            }
        }
        self.labels = labels;
        Ok(self)
    }

    /// The simulated profile, if readings are simulated.
    pub fn simulate(&self) -> Option<Profile> {
        self.simulate
    }

    /// Simulates `profile` (a [`Profile`] or `None` for the real machine).
    pub fn set_simulate(&mut self, profile: impl Into<Option<Profile>>) -> &mut Self {
        self.simulate = profile.into();
        self
    }

    /// The extra heat a simulated device reports (see [`Heater`]).
    pub fn heater(&self) -> &Heater {
        &self.heater
    }

    /// Shares `heater` with the agent, so its holder can heat the simulated device while it
    /// runs. Real readings ignore it.
    pub fn set_heater(&mut self, heater: Heater) -> &mut Self {
        self.heater = heater;
        self
    }

    /// Where Prometheus metrics are served, if anywhere.
    pub fn metrics(&self) -> Option<SocketAddr> {
        self.metrics
    }

    /// Serves Prometheus metrics on `addr` (`None`: off).
    pub fn set_metrics(&mut self, addr: Option<SocketAddr>) -> &mut Self {
        self.metrics = addr;
        self
    }

    /// The engine that runs tasks.
    pub fn engine(&self) -> EngineChoice {
        self.engine
    }

    /// Period of telemetry and pings.
    pub fn telemetry_interval(&self) -> Duration {
        self.telemetry_interval
    }

    /// Sets the period of telemetry and pings (at least 50 ms; shorter values are raised to it).
    pub fn set_telemetry_interval(&mut self, interval: Duration) -> &mut Self {
        self.telemetry_interval = interval.max(Duration::from_millis(50));
        self
    }

    /// Tasks run at once: the configured number, else the (simulated) board's cores.
    pub fn max_concurrency(&self) -> u16 {
        self.max_concurrency.unwrap_or_else(|| match self.simulate {
            Some(p) => p.spec().cores,
            None => std::thread::available_parallelism().map_or(1, |n| n.get().min(1024) as u16),
        })
    }

    /// Sets how many tasks run at once (at least 1).
    pub fn set_max_concurrency(&mut self, n: u16) -> &mut Self {
        self.max_concurrency = Some(n.max(1));
        self
    }

    /// How long to wait for a module on its topic.
    pub fn module_fetch_timeout(&self) -> Duration {
        self.module_fetch_timeout
    }

    /// Sets how long to wait for a module on its topic.
    pub fn set_module_fetch_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.module_fetch_timeout = timeout;
        self
    }

    /// How long shutdown waits for running tasks.
    pub fn shutdown_grace(&self) -> Duration {
        self.shutdown_grace
    }

    /// Sets how long shutdown waits for running tasks.
    pub fn set_shutdown_grace(&mut self, grace: Duration) -> &mut Self {
        self.shutdown_grace = grace;
        self
    }

    /// First and longest reconnect delay.
    pub fn reconnect_backoff(&self) -> (Duration, Duration) {
        (self.reconnect_min, self.reconnect_max)
    }

    /// Sets the reconnect backoff bounds (the longest is raised to the first if smaller).
    pub fn set_reconnect_backoff(&mut self, min: Duration, max: Duration) -> &mut Self {
        self.reconnect_min = min.max(Duration::from_millis(1));
        self.reconnect_max = max.max(self.reconnect_min);
        self
    }

    /// MQTT keep-alive.
    pub fn keep_alive(&self) -> Duration {
        self.keep_alive
    }

    /// Every how many telemetry intervals a large ping measures bandwidth.
    pub fn bandwidth_probe_every(&self) -> u32 {
        self.bandwidth_probe_every
    }

    /// Capacity of the duplicate filter.
    pub fn dedup_capacity(&self) -> usize {
        self.dedup_capacity
    }

    /// Sandbox settings (the cache directory is set by [`crate::run`] under the state directory).
    pub fn sandbox(&self) -> &SandboxConfig {
        &self.sandbox
    }

    /// Mutable sandbox settings.
    pub fn sandbox_mut(&mut self) -> &mut SandboxConfig {
        &mut self.sandbox
    }

    /// Overrides the safety policy entirely.
    pub fn set_safety_policy(&mut self, policy: SafetyPolicy) -> &mut Self {
        self.safety = self.safety.clone().with_policy(policy);
        self
    }

    /// The safety policy in force: the profile's (or, on real hardware, the Raspberry Pi
    /// policy when the device tree says so, else the seed default), with `[safety]` overrides.
    pub fn safety_policy(&self) -> SafetyPolicy {
        let base = match self.simulate {
            Some(p) => p.safety_policy(),
            None if crate::telemetry::is_raspberry_pi() => SafetyPolicy::raspberry_pi(),
            None => SafetyPolicy::default(),
        };
        let s = &self.safety;
        SafetyPolicy {
            max_temp_millic: s.max_temp_millic.unwrap_or(base.max_temp_millic),
            resume_temp_millic: s.resume_temp_millic.unwrap_or(base.resume_temp_millic),
            max_latency_us: s.max_latency_us.unwrap_or(base.max_latency_us),
            max_errors: s.max_errors.unwrap_or(base.max_errors),
            trip_on_throttle: s.trip_on_throttle.unwrap_or(base.trip_on_throttle),
            cooldown_ms: s.cooldown_ms.unwrap_or(base.cooldown_ms),
            max_cooldown_ms: s.max_cooldown_ms.unwrap_or(base.max_cooldown_ms),
        }
    }

    /// The thermal zones the temperature is read from: the board's built-in choice (by its
    /// device-tree model), with `[safety] thermal_ignore` / `thermal_prefer` replacing it.
    pub(crate) fn thermal_zones(&self) -> ThermalZones {
        let model = crate::telemetry::board_model(Path::new("/sys"));
        let base = ThermalZones::for_model(model.as_deref());
        ThermalZones {
            ignore: self.safety.thermal_ignore.clone().unwrap_or(base.ignore),
            prefer: self.safety.thermal_prefer.clone().unwrap_or(base.prefer),
        }
    }

    fn safety_policy_checked(&self) -> Result<SafetyPolicy, ConfigError> {
        let p = self.safety_policy();
        if p.resume_temp_millic > p.max_temp_millic {
            return Err(invalid(
                "safety.resume_temp_millic",
                p.resume_temp_millic,
                format!("at most max_temp_millic ({})", p.max_temp_millic),
            ));
        }
        if p.cooldown_ms > p.max_cooldown_ms {
            return Err(invalid(
                "safety.cooldown_ms",
                p.cooldown_ms,
                format!("at most max_cooldown_ms ({})", p.max_cooldown_ms),
            ));
        }
        Ok(p)
    }

    /// The effective configuration as raw keys: every default filled in (the concurrency and
    /// the safety policy as the profile or the board sets them), the broker's password shown
    /// as `****`.
    pub fn to_raw(&self) -> RawConfig {
        let ms = |d: Duration| d.as_millis() as u64;
        let policy = self.safety_policy();
        let zones = self.thermal_zones();
        RawConfig {
            broker: self.broker.to_string(),
            state_dir: self.state_dir.clone(),
            name: self.name.clone(),
            labels: self.labels.clone(),
            simulate: self.simulate.map(|p| p.as_str().to_owned()),
            engine: match self.engine {
                EngineChoice::Wasmtime => "wasmtime",
                #[cfg(feature = "wasmedge")]
                EngineChoice::WasmEdge => "wasmedge",
            }
            .to_owned(),
            max_concurrency: Some(u32::from(self.max_concurrency())),
            telemetry_interval_ms: ms(self.telemetry_interval),
            bandwidth_probe_every: self.bandwidth_probe_every,
            keep_alive_secs: self.keep_alive.as_secs(),
            reconnect_min_ms: ms(self.reconnect_min),
            reconnect_max_ms: ms(self.reconnect_max),
            module_fetch_timeout_ms: ms(self.module_fetch_timeout),
            shutdown_grace_ms: ms(self.shutdown_grace),
            dedup_capacity: self.dedup_capacity as u32,
            tls: RawTls {
                ca_file: self.tls.ca_file.clone(),
                cert_file: self.tls.cert_file.clone(),
                key_file: self.tls.key_file.clone(),
            },
            sandbox: RawSandbox::from(&self.sandbox),
            safety: RawSafety {
                thermal_ignore: Some(zones.ignore),
                thermal_prefer: Some(zones.prefer),
                ..RawSafety::default()
            }
            .with_policy(policy),
            metrics: self.metrics.map(|a| a.to_string()),
        }
    }

    /// The configuration as commented TOML, as `--print-config` shows it, generated from
    /// [`RawConfig`]'s fields and their docs: what is set, and for each key left to the board or
    /// the profile (`max_concurrency`, `[safety]`) its value in effect as a comment. Reading it
    /// back gives the same configuration, except a broker password, shown as `****`.
    ///
    /// # Errors
    /// When a path is not UTF-8, so it cannot be written in TOML.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        let effective = self.to_raw();
        let set = RawConfig {
            max_concurrency: self.max_concurrency.map(u32::from),
            safety: self.safety.clone(),
            ..effective.clone()
        };
        Ok(
            ambient_daemon::config::Commented::new("ambient-agent configuration")
                .section(None, &set, &effective)?
                .section(Some("tls"), &set.tls, &effective.tls)?
                .section(Some("sandbox"), &set.sandbox, &effective.sandbox)?
                .section(Some("safety"), &set.safety, &effective.safety)?
                .finish(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_print_back_to_the_same_config() {
        let config = RawConfig::default().validate().unwrap();
        let printed = config.to_toml().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, &printed).unwrap();
        let reread = RawConfig::load(Some(&path), [])
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(reread.to_toml().unwrap(), printed);
        assert_eq!(reread.safety_policy(), config.safety_policy());
        assert_eq!(reread.sandbox(), config.sandbox());
        assert_eq!(reread.broker(), config.broker());
    }

    #[test]
    fn every_key_set_prints_and_reads_back_and_board_defaults_stay_comments() {
        let mut raw = RawConfig {
            broker: "mqtts://dev%3A1@broker.example:8883".into(),
            state_dir: "/srv/agent".into(),
            name: Some("kitchen".into()),
            labels: vec!["room-2".into(), "gpu".into()],
            simulate: Some("pi5".into()),
            metrics: Some("127.0.0.1:9101".into()),
            telemetry_interval_ms: 2_000,
            ..RawConfig::default()
        };
        raw.tls.ca_file = Some("/etc/ambient/ca.pem".into());
        raw.safety.max_errors = Some(7);
        raw.sandbox.epoch_tick_ms = 20;
        let config = raw.validate().unwrap();
        let printed = config.to_toml().unwrap();
        // Left to the profile: shown with the value in effect, as a comment.
        assert!(printed.contains("\n# max_concurrency = 4\n"), "{printed}");
        assert!(
            printed.contains("\n# max_temp_millic = 80000\n"),
            "{printed}"
        );
        assert!(printed.contains("\nmax_errors = 7\n"), "{printed}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, &printed).unwrap();
        let reread = RawConfig::load(Some(&path), []).unwrap();
        assert_eq!(reread.max_concurrency, None);
        assert_eq!(reread.safety, raw.safety);
        let reread = reread.validate().unwrap();
        // Every effective value (the heater is a live handle, so the configs do not compare).
        assert_eq!(reread.to_raw(), config.to_raw());
        assert_eq!(reread.broker(), config.broker());
        assert_eq!(reread.to_toml().unwrap(), printed);
    }

    #[test]
    fn a_bad_value_names_the_key_the_value_and_what_was_expected() {
        let raw = RawConfig {
            telemetry_interval_ms: 1,
            ..RawConfig::default()
        };
        assert_eq!(
            raw.validate().unwrap_err().to_string(),
            "invalid value 1 for `telemetry_interval_ms`: expected 50 to 3600000 milliseconds"
        );
        let raw = RawConfig {
            broker: "http://x".into(),
            ..RawConfig::default()
        };
        assert_eq!(
            raw.validate().unwrap_err().to_string(),
            "invalid value \"http://x\" for `broker`: expected mqtt://[user[:password]@]host[:port] or mqtts://… for TLS"
        );
    }

    #[test]
    fn the_environment_overrides_the_file_and_sections_use_a_double_underscore() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "telemetry_interval_ms = 2000\nlabels = [\"a\"]\n[safety]\nmax_errors = 3\n",
        )
        .unwrap();
        let env = [
            (
                "AMBIENT_AGENT_TELEMETRY_INTERVAL_MS".to_owned(),
                "300".to_owned(),
            ),
            ("AMBIENT_AGENT_LABELS".to_owned(), "gpu,room-2".to_owned()),
            (
                "AMBIENT_AGENT_SAFETY__MAX_TEMP_MILLIC".to_owned(),
                "70000".to_owned(),
            ),
            ("AMBIENT_AGENT_CONFIG".to_owned(), "ignored".to_owned()),
            ("UNRELATED".to_owned(), "x".to_owned()),
        ];
        let raw = RawConfig::load(Some(&path), env).unwrap();
        assert_eq!(raw.telemetry_interval_ms, 300);
        assert_eq!(raw.labels, ["gpu", "room-2"]);
        assert_eq!(raw.safety.max_temp_millic, Some(70_000));
        assert_eq!(raw.safety.max_errors, Some(3));
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_name() {
        let env = [(
            "AMBIENT_AGENT_TELEMTRY_INTERVAL_MS".to_owned(),
            "300".to_owned(),
        )];
        let err = RawConfig::load(None, env).unwrap_err().to_string();
        assert!(err.contains("telemtry_interval_ms"), "{err}");
        assert!(err.contains("AMBIENT_AGENT_TELEMTRY_INTERVAL_MS"), "{err}");
    }

    #[test]
    fn metrics_are_off_unless_an_address_is_given_and_a_bad_one_is_refused_by_name() {
        let with = |v: Option<&str>| {
            let raw = RawConfig {
                metrics: v.map(str::to_owned),
                ..RawConfig::default()
            };
            raw.validate().map(|c| c.metrics())
        };
        assert_eq!(with(None).unwrap(), None);
        assert_eq!(with(Some("off")).unwrap(), None);
        assert_eq!(
            with(Some("127.0.0.1:9101")).unwrap(),
            Some("127.0.0.1:9101".parse().unwrap())
        );
        let err = with(Some("localhost")).unwrap_err().to_string();
        assert!(
            err.contains("metrics") && err.contains("127.0.0.1:9101"),
            "{err}"
        );
    }

    #[test]
    fn the_example_config_in_targets_is_valid() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../targets/config/agent.toml");
        let config = RawConfig::load(Some(&path), Vec::<(String, String)>::new())
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(config.broker().host(), "gateway.local");
    }

    #[test]
    fn labels_are_bounded_in_number_and_length() {
        let mut c = AgentConfig::new(DEFAULT_BROKER, "/tmp/x").unwrap();
        assert!(c.set_labels(["a"; 9]).is_err());
        assert!(c.set_labels(["x".repeat(33)]).is_err());
        assert!(c.set_labels(["has space"]).is_err());
        assert_eq!(c.set_labels(["gpu"]).unwrap().labels(), ["gpu"]);
    }

    #[test]
    fn a_simulated_pi_uses_the_pi_policy_unless_overridden() {
        let mut c = AgentConfig::new(DEFAULT_BROKER, "/tmp/x").unwrap();
        c.set_simulate(Profile::Pi5);
        assert_eq!(c.safety_policy().max_temp_millic, 80_000);
        let raw = RawConfig {
            simulate: Some("pi5".into()),
            safety: RawSafety {
                max_temp_millic: Some(90_000),
                ..RawSafety::default()
            },
            ..RawConfig::default()
        };
        assert_eq!(
            raw.validate().unwrap().safety_policy().max_temp_millic,
            90_000
        );
    }
}
