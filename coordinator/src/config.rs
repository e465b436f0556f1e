//! Coordinator configuration: a raw TOML shape with units in key names, read from a file and
//! `AMBIENT_COORDINATOR_*` variables by [`RawConfig::load`] (the loader the agent uses too),
//! validated once into [`CoordinatorConfig`].

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambient_core::{SafetyPolicy, ScoreConfig, Tariff};
use ambient_daemon::config::LoadError;
use documented::DocumentedFields;
use serde::{Deserialize, Serialize};

use ambient_mqtt::{BrokerUrl, TlsFiles};

use crate::access::{Anonymous, is_valid_user_name};
use crate::dispatcher::DispatchConfig;
use crate::ha;
use crate::intake::Policy;
use crate::{Enrollment, RegistryConfig, Strategy};

/// Where MQTT traffic flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerMode {
    /// A broker inside the coordinator process, listening here.
    Embedded(SocketAddr),
    /// An external broker (mosquitto, EMQX, ...), with the coordinator's account on it if it
    /// needs one.
    External(BrokerUrl),
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// The broker.
    pub broker: BrokerMode,
    /// Directory of the SQLite file `ambient.db`.
    pub data_dir: PathBuf,
    /// Dispatch tunables.
    pub dispatch: DispatchConfig,
    /// Registry tunables.
    pub registry: RegistryConfig,
    /// How often the node registry is written to the store for `ambient nodes`.
    pub snapshot_interval: Duration,
    /// Where the embedded broker admits clients without credentials from.
    pub anonymous: Anonymous,
    /// Certificates for an `mqtts://` external broker.
    pub tls: TlsFiles,
    /// The embedded broker's TLS listener, if configured.
    pub tls_listener: Option<TlsListener>,
    /// Client accounts of the embedded broker: name and argon2 hash (PHC string).
    pub users: BTreeMap<String, String>,
    /// Where the HTTP API listens, if it does.
    pub http: Option<SocketAddr>,
    /// Home Assistant's discovery prefix, when discovery is on (see [`crate::ha`]).
    pub home_assistant: Option<ha::Prefix>,
}

/// A TLS listener of the embedded broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListener {
    /// Where it listens.
    pub addr: SocketAddr,
    /// PEM certificate chain it presents.
    pub cert_file: PathBuf,
    /// PEM private key of that certificate.
    pub key_file: PathBuf,
}

impl CoordinatorConfig {
    /// The database file inside `data_dir`.
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("ambient.db")
    }
}

/// Prefix of the environment variables that set configuration keys:
/// `AMBIENT_COORDINATOR_SECTION__KEY`, e.g. `AMBIENT_COORDINATOR_VERIFICATION__POLICY=receipt`.
pub const ENV_PREFIX: &str = "AMBIENT_COORDINATOR_";

/// The configuration file as written (`/etc/ambient/coordinator.toml`). Every key is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    /// Broker settings.
    pub broker: RawBroker,
    /// Storage settings.
    pub storage: RawStorage,
    /// Scheduling settings.
    pub scheduling: RawScheduling,
    /// Verification settings.
    pub verification: RawVerification,
    /// Settlement settings.
    pub settlement: RawSettlement,
    /// Enrollment settings.
    pub enrollment: RawEnrollment,
    /// HTTP API settings.
    pub http: RawHttp,
    /// Home Assistant MQTT discovery settings.
    pub home_assistant: RawHomeAssistant,
}

impl RawConfig {
    /// Reads a TOML file (`None`: start from the defaults), then applies
    /// `AMBIENT_COORDINATOR_*` variables from `env` on top (`__` separates a section from its
    /// key; `enrollment.allow` also takes `a,b,c`): [`ambient_daemon::config::load`], the
    /// agent's loader too. Command-line flags go over the result.
    ///
    /// # Errors
    /// [`LoadError`] if the file cannot be read, or the file or a variable names an unknown
    /// key or has a value of the wrong type.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, LoadError> {
        let vars = ambient_daemon::config::Env {
            prefix: ENV_PREFIX,
            flags: &[],
            lists: &["enrollment.allow"],
        };
        ambient_daemon::config::load(file, vars, env)
    }

    /// These values as commented TOML, as `--print-config` shows them, generated from the
    /// sections' fields and their docs; reading it back gives the same values, except a
    /// broker password, shown as `****`.
    ///
    /// # Errors
    /// When a path is not UTF-8, so it cannot be written in TOML.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        Ok(
            ambient_daemon::config::Commented::new("ambient coordinator configuration")
                .section(None, self, self)?
                .section(Some("broker"), &self.broker, &self.broker)?
                .section(Some("storage"), &self.storage, &self.storage)?
                .section(Some("scheduling"), &self.scheduling, &self.scheduling)?
                .section(Some("verification"), &self.verification, &self.verification)?
                .section(Some("settlement"), &self.settlement, &self.settlement)?
                .section(Some("enrollment"), &self.enrollment, &self.enrollment)?
                .section(Some("http"), &self.http, &self.http)?
                .section(
                    Some("home_assistant"),
                    &self.home_assistant,
                    &self.home_assistant,
                )?
                .finish(),
        )
    }
}

/// `[home_assistant]`.
#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct RawHomeAssistant {
    /// Publish Home Assistant MQTT discovery configs and a JSON state per node, so each device
    /// appears in Home Assistant with its temperature, health score, breaker and tasks run.
    /// Default `false`.
    pub discovery: bool,
    /// The discovery prefix Home Assistant watches. Default `homeassistant`, as in Home
    /// Assistant.
    pub prefix: String,
}

impl Default for RawHomeAssistant {
    fn default() -> Self {
        Self {
            discovery: false,
            prefix: ha::DEFAULT_PREFIX.into(),
        }
    }
}

/// `[http]`.
#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttp {
    /// Address of the HTTP API (JSON views, health, submission), or `off`. Default
    /// `127.0.0.1:8080` (loopback only: it has no authentication).
    pub listen: String,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
        }
    }
}

/// `[broker]`.
#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct RawBroker {
    /// Address of the embedded broker. Default `127.0.0.1:1883` (loopback only).
    pub listen: String,
    /// An external broker as `mqtt://[user[:password]@]host[:port]` or `mqtts://…`; when set,
    /// no broker is embedded.
    pub url: Option<String>,
    /// For `mqtts://`: PEM file of the CA certificates to trust. Default: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// For `mqtts://`: PEM file of a client certificate, for brokers that require one.
    pub cert_file: Option<PathBuf>,
    /// For `mqtts://`: PEM file of that certificate's private key.
    pub key_file: Option<PathBuf>,
    /// A second listener of the embedded broker, for MQTT over TLS (`mqtts://`), such as
    /// `0.0.0.0:8883`. Default none. Needs `tls_cert_file` and `tls_key_file`.
    pub tls_listen: Option<String>,
    /// PEM certificate chain the TLS listener presents.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub tls_key_file: Option<PathBuf>,
    /// Client accounts of the embedded broker: name = argon2 hash of the password, as
    /// `ambient passwd <name>` prints it. A client with an account may submit from any address.
    pub users: BTreeMap<String, String>,
    /// Where the embedded broker accepts clients without credentials (submitters, the CLI)
    /// from: `loopback` (default) or `anywhere`. Devices always sign in with their key.
    pub anonymous: String,
}

/// `[storage]`.
#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct RawStorage {
    /// Directory of `ambient.db`. Default `/var/lib/ambient`.
    pub data_dir: PathBuf,
    /// How often the registry snapshot is saved, in ms. Default 1000.
    pub snapshot_interval_ms: u64,
}

/// `[scheduling]`.
#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct RawScheduling {
    /// `weighted`, `round-robin`, `least-loaded` or `latency-aware`. Default `weighted`.
    pub strategy: String,
    /// A node silent for longer than this is offline, in ms. Default 15000.
    pub liveness_ms: u64,
    /// How long an `offline` presence (unsigned: a last will, or anyone's claim) waits for the
    /// node's signed telemetry to disprove it before the node's tasks move elsewhere, in ms.
    /// New tasks avoid the node at once. Default 10000.
    pub offline_grace_ms: u64,
    /// Added to a task's time limit before a dispatch counts as lost, in ms. Default 15000.
    pub dispatch_grace_ms: u64,
    /// How long a task may wait for an eligible node, counted from when it first could not be
    /// placed, in ms; it then fails, naming the requirement no node meets. Default 60000.
    pub queue_timeout_ms: u64,
    /// Bandwidth at which the health score's bandwidth term saturates, in kbit/s. Default 100000.
    pub bandwidth_ref_kbps: u32,
    /// Core count at which the compute term's capacity saturates. Default 8.
    pub cores_ref: u16,
    /// How often the coordinator probes each online node's round trip, in ms: the latency
    /// term and latency-aware placement use what it measures, not what nodes report. Default
    /// 5000.
    pub probe_interval_ms: u64,
    /// Every this many probes of a node, one carries 64 KiB to measure its bandwidth (the
    /// bandwidth term). Default 12: once a minute at the default interval.
    pub bandwidth_probe_every: u32,
}

/// `[verification]`.
#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct RawVerification {
    /// How tasks that name no `verify` are checked: `target:E` (replicas until the chance of a
    /// wrong result is at most E, judged from the agreeing nodes' verified histories),
    /// `receipt` (one run, checked while a node proves itself and then at the spot-check
    /// rate) or `replicate:K`. Default `target:1e-4`.
    pub policy: String,
    /// Share of `receipt` and `target:E` tasks re-run elsewhere as a spot check, in permille. Default 50 (5%).
    pub spot_check_permille: u16,
    /// Failed dispatches a task survives before it fails. Default 3.
    pub max_failures: u16,
    /// The coordinator's view of node safety: maximum temperature in m°C. Default 85000.
    pub max_temp_millic: i32,
    /// Maximum latency in µs. Default 100000.
    pub max_latency_us: u32,
    /// Maximum error count. Default 25.
    pub max_errors: u32,
    /// Results in a row a node must have agree with another node's before its `receipt` tasks
    /// run unchecked; until then each is also run on a second node. Default 40; 0 trusts
    /// every node from the start.
    pub trust_after: u32,
    /// Seconds a node whose result was shown wrong gets no work. Default 3600.
    pub blacklist_secs: u64,
    /// Share of faulty nodes assumed when judging a node's credibility and how far `target:E`
    /// trusts its results, in permille (1 to 999). Default 200.
    pub assumed_faulty_permille: u32,
}

/// `[settlement]`.
#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct RawSettlement {
    /// Paid per accepted result, in µcredits. Default 1000.
    pub base_ucredits: u64,
    /// Paid per million fuel units, in µcredits. Default 1.
    pub per_million_fuel_ucredits: u64,
}

/// `[enrollment]`.
#[derive(Debug, Clone, Serialize, Deserialize, DocumentedFields)]
#[serde(deny_unknown_fields, default)]
pub struct RawEnrollment {
    /// `open` (trust a node's key on first use) or `allowlist` (the keys in `allow` and those
    /// approved with `ambient nodes approve`). Default `open`.
    pub mode: String,
    /// Hex ed25519 public keys admitted in `allowlist` mode.
    pub allow: Vec<String>,
    /// Most nodes held in memory; new keys beyond it are refused. Default 10000.
    pub max_nodes: usize,
    /// New nodes admitted per second on average, bursts of ten seconds' worth. Default 20.
    pub joins_per_s: u32,
    /// Frames in one node's name whose signature may fail per second on average (bursts of ten
    /// seconds' worth) before further frames in its name are dropped unchecked. Default 20.
    pub bad_frames_per_s: u32,
    /// A node with no valid traffic and no task for this long is forgotten (the ledger keeps
    /// its history), in ms. Default 86400000 (24 h).
    pub forget_after_ms: u64,
}

impl Default for RawBroker {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:1883".into(),
            url: None,
            anonymous: "loopback".into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            tls_listen: None,
            tls_cert_file: None,
            tls_key_file: None,
            users: BTreeMap::new(),
        }
    }
}

impl Default for RawStorage {
    fn default() -> Self {
        Self {
            data_dir: "/var/lib/ambient".into(),
            snapshot_interval_ms: 1000,
        }
    }
}

impl Default for RawScheduling {
    fn default() -> Self {
        let d = DispatchConfig::default();
        let s = ScoreConfig::default();
        let r = RegistryConfig::default();
        Self {
            strategy: Strategy::default().to_string(),
            liveness_ms: 15_000,
            offline_grace_ms: 10_000,
            dispatch_grace_ms: d.dispatch_grace.as_millis() as u64,
            queue_timeout_ms: d.queue_timeout.as_millis() as u64,
            bandwidth_ref_kbps: s.bandwidth_ref_kbps,
            cores_ref: s.cores_ref,
            probe_interval_ms: r.probe_interval.as_millis() as u64,
            bandwidth_probe_every: r.bandwidth_probe_every,
        }
    }
}

impl Default for RawVerification {
    fn default() -> Self {
        let d = DispatchConfig::default();
        let p = SafetyPolicy::default();
        let r = RegistryConfig::default();
        Self {
            policy: d.default_policy.to_string(),
            spot_check_permille: d.spot_check_permille,
            max_failures: d.max_failures,
            max_temp_millic: p.max_temp_millic,
            max_latency_us: p.max_latency_us,
            max_errors: p.max_errors,
            trust_after: r.trust_after,
            blacklist_secs: r.blacklist.as_secs(),
            assumed_faulty_permille: r.assumed_faulty_permille,
        }
    }
}

impl Default for RawSettlement {
    fn default() -> Self {
        let t = Tariff::default();
        Self {
            base_ucredits: t.base,
            per_million_fuel_ucredits: t.per_million_fuel,
        }
    }
}

impl Default for RawEnrollment {
    fn default() -> Self {
        let r = RegistryConfig::default();
        Self {
            mode: "open".into(),
            allow: Vec::new(),
            max_nodes: r.max_nodes,
            joins_per_s: r.joins_per_s,
            bad_frames_per_s: r.bad_frames_per_s,
            forget_after_ms: r.forget_after.as_millis() as u64,
        }
    }
}

/// A configuration value that cannot be used: names the key, the value and what is expected.
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}` = {value:?}: {expected}")]
pub struct ConfigError {
    /// The key, as `section.key`.
    pub key: &'static str,
    /// The offending value.
    pub value: String,
    /// What would be accepted.
    pub expected: String,
}

fn bad(
    key: &'static str,
    value: impl std::fmt::Display,
    expected: impl Into<String>,
) -> ConfigError {
    ConfigError {
        key,
        value: value.to_string(),
        expected: expected.into(),
    }
}

impl RawConfig {
    /// Validates every key once.
    ///
    /// # Errors
    /// The first key whose value cannot be used.
    pub fn validate(&self) -> Result<CoordinatorConfig, ConfigError> {
        let broker = match &self.broker.url {
            Some(url) => BrokerMode::External(url.parse().map_err(|_| {
                bad(
                    "broker.url",
                    ambient_mqtt::redact(url),
                    ambient_mqtt::EXPECTED,
                )
            })?),
            None => BrokerMode::Embedded(self.broker.listen.parse().map_err(|_| {
                bad(
                    "broker.listen",
                    &self.broker.listen,
                    "an address like 127.0.0.1:1883",
                )
            })?),
        };
        let tls_listener = match (
            &self.broker.tls_listen,
            &self.broker.tls_cert_file,
            &self.broker.tls_key_file,
        ) {
            (None, None, None) => None,
            (Some(_), _, _) if self.broker.url.is_some() => {
                return Err(bad(
                    "broker.tls_listen",
                    "set",
                    "no tls_listen with an external broker (`broker.url`): it is the embedded broker's",
                ));
            }
            (Some(listen), Some(cert), Some(key)) => Some(TlsListener {
                addr: listen.parse().map_err(|_| {
                    bad("broker.tls_listen", listen, "an address like 0.0.0.0:8883")
                })?,
                cert_file: cert.clone(),
                key_file: key.clone(),
            }),
            _ => {
                return Err(bad(
                    "broker.tls_listen",
                    format!("{:?}", self.broker.tls_listen),
                    "tls_listen, tls_cert_file and tls_key_file together",
                ));
            }
        };
        for (name, hash) in &self.broker.users {
            if !is_valid_user_name(name) {
                return Err(bad(
                    "broker.users",
                    name,
                    "a name of 1 to 64 visible characters, not `coordinator` or a node id",
                ));
            }
            if argon2::password_hash::PasswordHash::new(hash).is_err() {
                return Err(bad(
                    "broker.users",
                    format!("{name} = {hash:?}"),
                    "a password hash as `ambient passwd` prints it",
                ));
            }
        }
        let anonymous = match self.broker.anonymous.as_str() {
            "loopback" => Anonymous::Loopback,
            "anywhere" => Anonymous::Anywhere,
            other => return Err(bad("broker.anonymous", other, "`loopback` or `anywhere`")),
        };
        let strategy: Strategy = self.scheduling.strategy.parse().map_err(
            |e: <Strategy as std::str::FromStr>::Err| {
                bad(
                    "scheduling.strategy",
                    &self.scheduling.strategy,
                    e.to_string(),
                )
            },
        )?;
        let policy: Policy = self
            .verification
            .policy
            .parse()
            .map_err(|e: String| bad("verification.policy", &self.verification.policy, e))?;
        if self.verification.spot_check_permille > 1000 {
            return Err(bad(
                "verification.spot_check_permille",
                self.verification.spot_check_permille,
                "0 to 1000",
            ));
        }
        if !(1..=999).contains(&self.verification.assumed_faulty_permille) {
            return Err(bad(
                "verification.assumed_faulty_permille",
                self.verification.assumed_faulty_permille,
                "1 to 999: none faulty would make every node's results certain, so `target:E` \
                 would check nothing but spot checks; all faulty, none",
            ));
        }
        if self.scheduling.liveness_ms == 0 {
            return Err(bad(
                "scheduling.liveness_ms",
                0,
                "a positive number of milliseconds",
            ));
        }
        if !(100..=3_600_000).contains(&self.scheduling.probe_interval_ms) {
            return Err(bad(
                "scheduling.probe_interval_ms",
                self.scheduling.probe_interval_ms,
                "100 (the coordinator's tick; nodes drop probes closer than 50 ms) to 3600000 (an hour)",
            ));
        }
        if self.scheduling.bandwidth_probe_every == 0 {
            return Err(bad(
                "scheduling.bandwidth_probe_every",
                0,
                "at least 1 (1: every probe measures bandwidth)",
            ));
        }
        if self.enrollment.max_nodes == 0 {
            return Err(bad("enrollment.max_nodes", 0, "at least 1"));
        }
        if self.enrollment.joins_per_s == 0 {
            return Err(bad("enrollment.joins_per_s", 0, "at least 1"));
        }
        if self.enrollment.bad_frames_per_s == 0 {
            return Err(bad("enrollment.bad_frames_per_s", 0, "at least 1"));
        }
        let enrollment = match self.enrollment.mode.as_str() {
            "open" => Enrollment::Open,
            "allowlist" => {
                let mut keys = HashSet::new();
                for k in &self.enrollment.allow {
                    let mut key = [0u8; 32];
                    hex::decode_to_slice(k, &mut key).map_err(|_| {
                        bad(
                            "enrollment.allow",
                            k,
                            "64 hex characters (an ed25519 public key)",
                        )
                    })?;
                    keys.insert(key);
                }
                Enrollment::Allowlist(keys)
            }
            other => return Err(bad("enrollment.mode", other, "`open` or `allowlist`")),
        };
        let safety = SafetyPolicy {
            max_temp_millic: self.verification.max_temp_millic,
            resume_temp_millic: self.verification.max_temp_millic - 5_000,
            max_latency_us: self.verification.max_latency_us,
            max_errors: self.verification.max_errors,
            ..SafetyPolicy::default()
        };
        let score = ScoreConfig {
            bandwidth_ref_kbps: self.scheduling.bandwidth_ref_kbps,
            latency_max_us: self.verification.max_latency_us,
            cores_ref: self.scheduling.cores_ref,
        };
        Ok(CoordinatorConfig {
            broker,
            data_dir: self.storage.data_dir.clone(),
            dispatch: DispatchConfig {
                default_strategy: strategy,
                default_policy: policy,
                tariff: Tariff {
                    base: self.settlement.base_ucredits,
                    per_million_fuel: self.settlement.per_million_fuel_ucredits,
                },
                spot_check_permille: self.verification.spot_check_permille,
                max_failures: self.verification.max_failures,
                dispatch_grace: Duration::from_millis(self.scheduling.dispatch_grace_ms),
                queue_timeout: Duration::from_millis(self.scheduling.queue_timeout_ms),
            },
            registry: RegistryConfig {
                liveness: Duration::from_millis(self.scheduling.liveness_ms),
                score,
                safety,
                enrollment,
                offline_grace: Duration::from_millis(self.scheduling.offline_grace_ms),
                max_nodes: self.enrollment.max_nodes,
                joins_per_s: self.enrollment.joins_per_s,
                bad_frames_per_s: self.enrollment.bad_frames_per_s,
                forget_after: Duration::from_millis(self.enrollment.forget_after_ms),
                trust_after: self.verification.trust_after,
                blacklist: Duration::from_secs(self.verification.blacklist_secs),
                assumed_faulty_permille: self.verification.assumed_faulty_permille,
                probe_interval: Duration::from_millis(self.scheduling.probe_interval_ms),
                bandwidth_probe_every: self.scheduling.bandwidth_probe_every,
            },
            snapshot_interval: Duration::from_millis(self.storage.snapshot_interval_ms.max(100)),
            anonymous,
            tls: TlsFiles {
                ca_file: self.broker.ca_file.clone(),
                cert_file: self.broker.cert_file.clone(),
                key_file: self.broker.key_file.clone(),
            },
            tls_listener,
            users: self.broker.users.clone(),
            http: match self.http.listen.as_str() {
                "off" => None,
                listen => Some(listen.parse().map_err(|_| {
                    bad(
                        "http.listen",
                        listen,
                        "an address like 127.0.0.1:8080, or `off`",
                    )
                })?),
            },
            home_assistant: {
                let prefix: ha::Prefix =
                    self.home_assistant
                        .prefix
                        .parse()
                        .map_err(|e: ha::InvalidPrefix| {
                            bad(
                                "home_assistant.prefix",
                                &self.home_assistant.prefix,
                                e.to_string(),
                            )
                        })?;
                self.home_assistant.discovery.then_some(prefix)
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_variables_set_keys_over_the_file_and_an_unknown_one_is_named() {
        let vars = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        let raw = RawConfig::load(
            None,
            vars(&[
                ("AMBIENT_COORDINATOR_VERIFICATION__POLICY", "receipt"),
                ("AMBIENT_COORDINATOR_ENROLLMENT__ALLOW", "ab12, cd34"),
                ("AMBIENT_DATA_DIR", "/a/flag/not/a/key"),
            ]),
        )
        .unwrap();
        assert_eq!(raw.verification.policy, "receipt");
        assert_eq!(raw.enrollment.allow, ["ab12", "cd34"]);
        let err = RawConfig::load(
            None,
            vars(&[("AMBIENT_COORDINATOR_VERIFICATION__POLICIES", "receipt")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("AMBIENT_COORDINATOR_VERIFICATION__POLICIES")
                && err.contains("unknown field `policies`"),
            "{err}"
        );
    }

    #[test]
    fn the_default_config_embeds_a_loopback_broker() {
        let c = RawConfig::default().validate().unwrap();
        assert_eq!(
            c.broker,
            BrokerMode::Embedded("127.0.0.1:1883".parse().unwrap())
        );
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let mut raw = RawConfig::default();
        raw.scheduling.strategy = "fastest".into();
        let e = raw.validate().unwrap_err();
        assert_eq!(e.key, "scheduling.strategy");
        assert!(e.to_string().contains("fastest"));
    }

    #[test]
    fn an_unknown_default_policy_is_refused_by_name_and_a_known_one_reaches_the_dispatcher() {
        let mut raw = RawConfig::default();
        raw.verification.policy = "replicate:9".into();
        let e = raw.validate().unwrap_err();
        assert_eq!(e.key, "verification.policy");
        raw.verification.policy = "receipt".into();
        assert_eq!(
            raw.validate().unwrap().dispatch.default_policy,
            Policy::Receipt
        );
        assert_eq!(
            RawConfig::default()
                .validate()
                .unwrap()
                .dispatch
                .default_policy,
            Policy::Target(1e-4)
        );
    }

    #[test]
    fn a_certain_share_of_faulty_nodes_is_refused_by_name() {
        let mut raw = RawConfig::default();
        for share in [0, 1000] {
            raw.verification.assumed_faulty_permille = share;
            let e = raw.validate().unwrap_err();
            assert_eq!(e.key, "verification.assumed_faulty_permille");
        }
    }

    #[test]
    fn an_external_broker_takes_an_account_and_tls_files() {
        let mut raw = RawConfig::default();
        raw.broker.url = Some("mqtts://coordinator:s3cret@gw.local".into());
        raw.broker.ca_file = Some("/etc/ambient/ca.pem".into());
        let c = raw.validate().unwrap();
        let BrokerMode::External(url) = &c.broker else {
            panic!("external")
        };
        assert_eq!(
            (url.host(), url.port(), url.is_tls()),
            ("gw.local", 8883, true)
        );
        assert_eq!(url.password(), Some("s3cret"));
        assert_eq!(
            c.tls.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ambient/ca.pem"))
        );
        raw.broker.url = Some("http://u:s3cret@x".into());
        let err = raw.validate().unwrap_err().to_string();
        assert!(
            err.contains("broker.url") && !err.contains("s3cret"),
            "{err}"
        );
    }

    #[test]
    fn print_config_comments_every_key_and_reads_back_to_the_same_values() {
        let mut raw: RawConfig = toml::from_str(
            "[broker.users]\nlaptop = \"$argon2id$x\"\n[enrollment]\nallow = [\"ab\"]\n[scheduling]\nstrategy = \"latency-aware\"\n",
        )
        .unwrap();
        raw.broker.ca_file = Some("/etc/ambient/ca.pem".into());
        let text = raw.to_toml().unwrap();
        assert!(
            text.contains("[broker.users]\nlaptop = \"$argon2id$x\"\n"),
            "{text}"
        );
        assert!(text.contains("# url is not set\n"), "{text}");
        assert!(text.contains("# `weighted`, `round-robin`"), "{text}");
        let back: RawConfig = toml::from_str(&text).unwrap();
        assert_eq!(back.to_toml().unwrap(), text);
        assert_eq!(back.scheduling.strategy, "latency-aware");
        assert_eq!(back.broker.ca_file, raw.broker.ca_file);
    }

    #[test]
    fn home_assistant_discovery_is_off_by_default_and_takes_a_checked_prefix() {
        assert_eq!(
            RawConfig::default().validate().unwrap().home_assistant,
            None
        );
        let mut raw: RawConfig = toml::from_str("[home_assistant]\ndiscovery = true\n").unwrap();
        assert_eq!(
            raw.validate().unwrap().home_assistant.unwrap().as_str(),
            "homeassistant"
        );
        raw.home_assistant.prefix = "ha/#".into();
        let e = raw.validate().unwrap_err();
        assert_eq!(e.key, "home_assistant.prefix");
        assert!(e.to_string().contains("ha/#"), "{e}");
    }

    #[test]
    fn the_example_config_in_targets_is_valid() {
        let text = include_str!("../../targets/config/coordinator.toml");
        let raw: RawConfig = toml::from_str(text).unwrap();
        let config = raw.validate().unwrap();
        assert_eq!(config.anonymous, Anonymous::Loopback);
    }
}
