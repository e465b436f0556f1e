//! Home Assistant MQTT discovery: every node appears in Home Assistant as one device.
//!
//! Off by default; turn it on with `ambient coordinator --ha-discovery` or
//! `[home_assistant] discovery = true` (and `prefix`, or `--ha-prefix`, if Home Assistant's
//! discovery prefix is not the default `homeassistant`). Home Assistant's MQTT integration must
//! be connected to the same broker: on the embedded one, give it an account in
//! `[broker.users]` (or run it on the gateway itself, as an anonymous loopback client).
//!
//! # Topics
//!
//! For a node `<id>` (32 hex characters), the coordinator publishes, all retained, at QoS 1:
//!
//! | topic | payload |
//! |---|---|
//! | `<prefix>/sensor/ambient_<id>/temperature/config` | discovery config of the *Temperature* sensor (°C, device class `temperature`) |
//! | `<prefix>/sensor/ambient_<id>/health/config` | *Health score* sensor (%, the coordinator's health score) |
//! | `<prefix>/binary_sensor/ambient_<id>/breaker/config` | *Breaker* binary sensor (device class `problem`: on when a breaker is not closed) |
//! | `<prefix>/sensor/ambient_<id>/tasks_run/config` | *Tasks run* sensor (state class `total_increasing`) |
//! | `ambient/v1/ha/<id>/state` | the node's [`State`] as JSON, which every entity above reads |
//!
//! The agents' own telemetry is signed binary (postcard) that Home Assistant cannot read, so the
//! coordinator publishes its view of each node instead. A state looks like this:
//!
//! ```json
//! {"online":true,"temperature_c":52.4,"health_percent":81.37,"breaker":"closed",
//!  "breaker_reason":null,"device_breaker":"closed","breaker_tripped":false,"tasks_run":12}
//! ```
//!
//! Each config carries `name`, `unique_id` (`ambient_<id>_<object>`), `default_entity_id`
//! (such as `sensor.ambient_096fb3f1_temperature`: the first 8 characters of the id, so entity
//! ids stay readable), `state_topic`, `value_template`, `origin`, and a `device` with
//! `identifiers` `["ambient_<id>"]`, `name` `Ambient <first 8 characters>`, `model` (the
//! announced architecture, and the simulated profile if any), `manufacturer` `Ambient` and
//! `serial_number` (the full node id). The Breaker entity also carries the coordinator's and the
//! device's breaker states and the reason as attributes.
//!
//! # Availability
//!
//! An entity is available when both of these say so (`availability_mode: all`):
//!
//! - the node's status topic `ambient/v1/nodes/<id>/status`, where the agent publishes
//!   `online` (retained) and the broker its last will `offline`: Home Assistant's own
//!   convention, with its default payloads;
//! - the state's `online`: the coordinator hears the node (signed telemetry within the
//!   liveness window), so a hung agent whose connection stays up still goes unavailable, and
//!   a status message, which is not signed, cannot keep a dead node available on a shared
//!   broker.
//!
//! # When it publishes
//!
//! On the registry snapshot (`[storage] snapshot_interval_ms`, default every second): the
//! configs of a node the first time it is seen (and again when its architecture or profile
//! changes), its state whenever it differs from the last one sent. A node the registry forgets
//! (idle past `[enrollment] forget_after_ms`, or revoked) gets empty retained payloads on its
//! config and state topics, so Home Assistant removes the device. After every connection to the
//! broker everything is sent again, since a restarted broker keeps no retained messages.
//!
//! [`Discovery`] makes these decisions and does no I/O; the service performs its publishes.
//!
//! # What it does not cover
//!
//! - The registry starts empty when the coordinator starts, so a node that was forgotten while
//!   the coordinator was stopped keeps its retained configs; delete the device in Home
//!   Assistant. `tasks_run` counts from the coordinator's start: a restart is a reset, which
//!   `total_increasing` expects.
//! - Home Assistant's birth message (`<prefix>/status`) is not watched: the configs are
//!   retained, so a restarted Home Assistant reads them from the broker.
//! - The embedded broker keeps at most 10,000 retained messages; with discovery on, each node
//!   holds seven.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use ambient_core::topics::{self, NodeTopic};
use ambient_core::{BreakerState, NodeId, SCORE_SCALE};
use serde::Serialize;
use serde_json::json;

use crate::{NodeView, Publish};

/// Home Assistant's default discovery prefix.
pub const DEFAULT_PREFIX: &str = "homeassistant";

/// A discovery prefix: a topic without wildcards, outside Ambient's own `ambient/` topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix(String);

impl Prefix {
    /// The prefix as a topic.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Prefix {
    fn default() -> Self {
        Self(DEFAULT_PREFIX.into())
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a discovery prefix cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a topic like `homeassistant`: not empty, no `+`, `#` or NUL, no leading `$` or `/`, no trailing `/`, outside `ambient/`"
)]
pub struct InvalidPrefix;

impl FromStr for Prefix {
    type Err = InvalidPrefix;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ambient_root = topics::PREFIX.split('/').next().unwrap_or(topics::PREFIX);
        let inside_ambient = s == ambient_root || s.starts_with(&format!("{ambient_root}/"));
        if s.is_empty()
            || s.len() > 64
            || s.contains(['+', '#', '\0'])
            || s.starts_with(['$', '/'])
            || s.ends_with('/')
            || inside_ambient
        {
            return Err(InvalidPrefix);
        }
        Ok(Self(s.to_owned()))
    }
}

/// One entity of a node's device in Home Assistant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entity {
    Temperature,
    Health,
    Breaker,
    TasksRun,
}

impl Entity {
    const ALL: [Entity; 4] = [
        Self::Temperature,
        Self::Health,
        Self::Breaker,
        Self::TasksRun,
    ];

    /// Home Assistant's component (entity platform).
    fn component(self) -> &'static str {
        match self {
            Self::Breaker => "binary_sensor",
            _ => "sensor",
        }
    }

    /// The object id: the last level of the discovery topic, and the end of ids.
    fn object_id(self) -> &'static str {
        match self {
            Self::Temperature => "temperature",
            Self::Health => "health",
            Self::Breaker => "breaker",
            Self::TasksRun => "tasks_run",
        }
    }

    /// The fields that set this entity apart from its siblings.
    fn fields(self, state_topic: &str) -> serde_json::Value {
        match self {
            Self::Temperature => json!({
                "name": "Temperature",
                "device_class": "temperature",
                "unit_of_measurement": "°C",
                "state_class": "measurement",
                "suggested_display_precision": 1,
                // `null` renders as `None`, which an MQTT sensor shows as unknown.
                "value_template": "{{ value_json.temperature_c }}",
            }),
            Self::Health => json!({
                "name": "Health score",
                "unit_of_measurement": "%",
                "state_class": "measurement",
                "icon": "mdi:heart-pulse",
                "value_template": "{{ value_json.health_percent }}",
            }),
            Self::Breaker => json!({
                "name": "Breaker",
                "device_class": "problem",
                "value_template": "{{ 'ON' if value_json.breaker_tripped else 'OFF' }}",
                "json_attributes_topic": state_topic,
                "json_attributes_template": "{{ {'coordinator': value_json.breaker, 'device': value_json.device_breaker, 'reason': value_json.breaker_reason} | tojson }}",
            }),
            Self::TasksRun => json!({
                "name": "Tasks run",
                "state_class": "total_increasing",
                "icon": "mdi:counter",
                "value_template": "{{ value_json.tasks_run }}",
            }),
        }
    }
}

/// What the coordinator publishes on `ambient/v1/ha/<id>/state` for each node, as JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct State {
    /// The coordinator hears the node: its presence is not withdrawn by a last will and its
    /// signed telemetry arrived within the liveness window.
    pub online: bool,
    /// Its hottest thermal zone in °C, to a tenth of a degree; `null` before a reading.
    pub temperature_c: Option<f64>,
    /// The coordinator's health score of the node, in percent (0 to 100, to a hundredth).
    pub health_percent: f64,
    /// The coordinator's breaker for the node: `closed`, `open` or `half_open`.
    pub breaker: &'static str,
    /// Why that breaker is not closed, as a sentence; `null` when it is.
    pub breaker_reason: Option<String>,
    /// The device's own breaker, from its telemetry; `null` before a reading.
    pub device_breaker: Option<&'static str>,
    /// Either breaker is not closed: the node takes no regular tasks.
    pub breaker_tripped: bool,
    /// Tasks the node reported as completed, counted by this coordinator since it started.
    pub tasks_run: u32,
}

impl State {
    /// The state of the node `view` describes.
    pub fn of(view: &NodeView) -> Self {
        let sample = view.sample.as_ref();
        let device_breaker = sample.map(|s| s.breaker);
        Self {
            online: view.online,
            // Tenths: the readings jitter by millidegrees, and every change is a publish.
            temperature_c: sample
                .and_then(|s| s.temp_millic)
                .map(|m| (f64::from(m) / 100.0).round() / 10.0),
            health_percent: f64::from(view.terms.score) * 100.0 / f64::from(SCORE_SCALE),
            breaker: breaker_name(view.breaker),
            breaker_reason: view.breaker_reason.clone(),
            device_breaker: device_breaker.map(breaker_name),
            breaker_tripped: view.breaker != BreakerState::Closed
                || device_breaker.is_some_and(|b| b != BreakerState::Closed),
            tasks_run: view.reputation.completed,
        }
    }

    /// The JSON payload.
    pub fn to_json(&self) -> Vec<u8> {
        // Only string keys, and non-finite floats become `null`: serializing cannot fail.
        serde_json::to_vec(self).expect("a State always serializes")
    }
}

fn breaker_name(state: BreakerState) -> &'static str {
    match state {
        BreakerState::Closed => "closed",
        BreakerState::Open => "open",
        BreakerState::HalfOpen => "half_open",
    }
}

/// What was last sent for one node since the last (re)connection.
#[derive(Debug, Default)]
struct Sent {
    /// The device model its configs carry, once they were sent.
    model: Option<String>,
    /// The last state payload sent.
    state: Option<Vec<u8>>,
}

/// Decides the discovery configs and states to publish, from registry snapshots. No I/O: the
/// caller publishes what [`Discovery::snapshot`] returns, in order.
///
/// ```
/// use ambient_coordinator::ha::{Discovery, Prefix};
///
/// let mut ha = Discovery::new(Prefix::default());
/// // No node, nothing to say.
/// assert!(ha.snapshot(&[]).is_empty());
/// ```
#[derive(Debug)]
pub struct Discovery {
    prefix: Prefix,
    /// Every node announced to Home Assistant and not yet removed from it.
    sent: BTreeMap<NodeId, Sent>,
}

impl Discovery {
    /// Nothing announced yet; configs go under `prefix`.
    pub fn new(prefix: Prefix) -> Self {
        Self {
            prefix,
            sent: BTreeMap::new(),
        }
    }

    /// The publishes that bring Home Assistant up to date with `views` (the whole registry):
    /// removals of vanished nodes first, then for each node its configs (if not sent yet, or
    /// its model changed) and its state (if it changed). All retained, at QoS 1.
    pub fn snapshot(&mut self, views: &[NodeView]) -> Vec<Publish> {
        let mut out = Vec::new();
        let vanished: Vec<NodeId> = self
            .sent
            .keys()
            .filter(|node| !views.iter().any(|v| v.node == **node))
            .copied()
            .collect();
        for node in vanished {
            self.sent.remove(&node);
            for topic in self.config_topics(&node) {
                out.push(retained(topic, Vec::new()));
            }
            out.push(retained(topics::ha_state(&node).to_string(), Vec::new()));
        }
        for view in views {
            let sent = self.sent.entry(view.node).or_default();
            let model = model(view);
            if sent.model.as_ref() != Some(&model) {
                for entity in Entity::ALL {
                    let payload = config(&view.node, entity, &model);
                    out.push(retained(
                        config_topic(&self.prefix, &view.node, entity),
                        payload,
                    ));
                }
                sent.model = Some(model);
            }
            let state = State::of(view).to_json();
            if sent.state.as_ref() != Some(&state) {
                out.push(retained(
                    topics::ha_state(&view.node).to_string(),
                    state.clone(),
                ));
                sent.state = Some(state);
            }
        }
        out
    }

    /// The broker connection was (re)established: the broker may have lost every retained
    /// message, so the next [`snapshot`](Self::snapshot) sends everything again. Nodes stay
    /// remembered, so one that vanishes meanwhile is still removed.
    pub fn reconnected(&mut self) {
        for sent in self.sent.values_mut() {
            *sent = Sent::default();
        }
    }

    /// The discovery config topics of `node`'s entities.
    pub fn config_topics(&self, node: &NodeId) -> Vec<String> {
        Entity::ALL
            .into_iter()
            .map(|e| config_topic(&self.prefix, node, e))
            .collect()
    }
}

fn retained(topic: String, payload: Vec<u8>) -> Publish {
    Publish {
        topic,
        payload,
        retain: true,
        reliable: true,
    }
}

/// `<prefix>/<component>/ambient_<id>/<object>/config`.
fn config_topic(prefix: &Prefix, node: &NodeId, entity: Entity) -> String {
    format!(
        "{prefix}/{}/ambient_{node}/{}/config",
        entity.component(),
        entity.object_id()
    )
}

/// The device model shown in Home Assistant: the architecture, and the simulated profile.
fn model(view: &NodeView) -> String {
    match &view.profile {
        Some(profile) => format!("{} (simulated {profile})", view.arch),
        None => view.arch.clone(),
    }
}

/// One entity's discovery config.
fn config(node: &NodeId, entity: Entity, model: &str) -> Vec<u8> {
    let id = node.to_string();
    let short = &id[..8.min(id.len())];
    let state_topic = topics::ha_state(node).to_string();
    let object = entity.object_id();
    let mut config = json!({
        "unique_id": format!("ambient_{id}_{object}"),
        "default_entity_id": format!("{}.ambient_{short}_{object}", entity.component()),
        "state_topic": state_topic,
        "availability": [
            { "topic": topics::node(node, NodeTopic::Status).as_str(),
              "payload_available": "online", "payload_not_available": "offline" },
            { "topic": state_topic,
              "value_template": "{{ 'online' if value_json.online else 'offline' }}" },
        ],
        "availability_mode": "all",
        "device": {
            "identifiers": [format!("ambient_{id}")],
            "name": format!("Ambient {short}"),
            "model": model,
            "manufacturer": "Ambient",
            "serial_number": id,
        },
        "origin": {
            "name": "Ambient coordinator",
            "sw_version": env!("CARGO_PKG_VERSION"),
        },
    });
    if let (Some(all), serde_json::Value::Object(own)) =
        (config.as_object_mut(), entity.fields(&state_topic))
    {
        all.extend(own);
    }
    config.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambient_core::{HealthTerms, Identity, Reputation, TelemetrySample};
    use serde_json::Value;

    fn view(seed: u8, temp_millic: i32) -> NodeView {
        NodeView {
            node: Identity::from_secret(&[seed; 32]).node_id(),
            arch: "aarch64".into(),
            engine: "wasmtime".into(),
            cores: 4,
            mem_total_bytes: 4 << 30,
            labels: Vec::new(),
            profile: Some("pi5".into()),
            online: true,
            last_seen_ms_ago: Some(120),
            terms: HealthTerms {
                score: 8_137,
                ..HealthTerms::default()
            },
            breaker: BreakerState::Closed,
            breaker_reason: None,
            reputation: Reputation {
                completed: 12,
                ..Reputation::default()
            },
            agreed_in_a_row: 0,
            credibility: 8_000,
            blacklisted_for_ms: None,
            in_flight: 0,
            fuel_per_s: None,
            announced_fuel_per_s: None,
            observed_fuel_per_s: None,
            observed_latency_us: None,
            observed_bandwidth_kbps: None,
            contradicted: Vec::new(),
            sample: Some(TelemetrySample {
                temp_millic: Some(temp_millic),
                ..TelemetrySample::default()
            }),
        }
    }

    fn json(p: &Publish) -> Value {
        serde_json::from_slice(&p.payload).unwrap()
    }

    fn configs(out: &[Publish]) -> Vec<&Publish> {
        out.iter()
            .filter(|p| p.topic.ends_with("/config"))
            .collect()
    }

    fn states(out: &[Publish]) -> Vec<&Publish> {
        out.iter().filter(|p| p.topic.ends_with("/state")).collect()
    }

    #[test]
    fn a_new_node_gets_four_retained_configs_with_the_fields_home_assistant_needs() {
        let v = view(1, 52_400);
        let id = v.node.to_string();
        let out = Discovery::new(Prefix::default()).snapshot(&[v]);
        let configs = configs(&out);
        let topics: Vec<&str> = configs.iter().map(|p| p.topic.as_str()).collect();
        assert_eq!(
            topics,
            [
                format!("homeassistant/sensor/ambient_{id}/temperature/config"),
                format!("homeassistant/sensor/ambient_{id}/health/config"),
                format!("homeassistant/binary_sensor/ambient_{id}/breaker/config"),
                format!("homeassistant/sensor/ambient_{id}/tasks_run/config"),
            ]
        );
        for p in &configs {
            assert!(p.retain && p.reliable, "{}", p.topic);
            let c = json(p);
            for field in [
                "name",
                "unique_id",
                "default_entity_id",
                "state_topic",
                "value_template",
            ] {
                assert!(c[field].is_string(), "{} has no {field}: {c}", p.topic);
            }
            assert_eq!(c["state_topic"], format!("ambient/v1/ha/{id}/state"));
            assert_eq!(c["device"]["identifiers"][0], format!("ambient_{id}"));
            assert_eq!(c["device"]["manufacturer"], "Ambient");
            assert_eq!(c["device"]["model"], "aarch64 (simulated pi5)");
            assert_eq!(c["device"]["name"], format!("Ambient {}", &id[..8]));
            assert_eq!(
                c["availability"][0]["topic"],
                format!("ambient/v1/nodes/{id}/status")
            );
            assert_eq!(c["availability_mode"], "all");
            let component = p.topic.split('/').nth(1).unwrap();
            assert!(
                c["default_entity_id"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{component}.ambient_{}_", &id[..8])),
                "{c}"
            );
        }
        let unique: std::collections::HashSet<_> = configs
            .iter()
            .map(|p| json(p)["unique_id"].clone())
            .collect();
        assert_eq!(unique.len(), 4);
        let temperature = json(configs[0]);
        assert_eq!(temperature["device_class"], "temperature");
        assert_eq!(temperature["unit_of_measurement"], "°C");
        assert_eq!(
            temperature["unique_id"],
            format!("ambient_{id}_temperature")
        );
        assert_eq!(json(configs[2])["device_class"], "problem");
        assert_eq!(json(configs[3])["state_class"], "total_increasing");
    }

    #[test]
    fn the_state_carries_temperature_score_breakers_and_tasks_run() {
        let v = view(1, 52_449);
        let out = Discovery::new(Prefix::default()).snapshot(std::slice::from_ref(&v));
        let states = states(&out);
        assert_eq!(states.len(), 1);
        assert!(states[0].retain);
        assert_eq!(
            String::from_utf8(states[0].payload.clone()).unwrap(),
            r#"{"online":true,"temperature_c":52.4,"health_percent":81.37,"breaker":"closed","breaker_reason":null,"device_breaker":"closed","breaker_tripped":false,"tasks_run":12}"#
        );
        let mut tripped = v.clone();
        tripped.sample.as_mut().unwrap().breaker = BreakerState::Open;
        tripped.sample.as_mut().unwrap().temp_millic = None;
        let s = State::of(&tripped);
        assert!(s.breaker_tripped);
        assert_eq!((s.device_breaker, s.temperature_c), (Some("open"), None));
        let mut half = v;
        half.breaker = BreakerState::HalfOpen;
        half.sample = None;
        let s = State::of(&half);
        assert!(s.breaker_tripped);
        assert_eq!((s.breaker, s.device_breaker), ("half_open", None));
    }

    #[test]
    fn a_changed_temperature_republishes_the_state_and_an_unchanged_one_does_not() {
        let mut ha = Discovery::new(Prefix::default());
        ha.snapshot(&[view(1, 50_000)]);
        assert!(ha.snapshot(&[view(1, 50_000)]).is_empty());
        // A jitter below a twentieth of a degree is not a change.
        assert!(ha.snapshot(&[view(1, 50_030)]).is_empty());
        let out = ha.snapshot(&[view(1, 51_000)]);
        assert_eq!(out.len(), 1, "the state only, no configs: {out:?}");
        assert_eq!(json(&out[0])["temperature_c"], 51.0);
    }

    #[test]
    fn a_vanished_node_gets_empty_retained_configs_and_state() {
        let (a, b) = (view(1, 50_000), view(2, 60_000));
        let mut ha = Discovery::new(Prefix::default());
        ha.snapshot(&[a.clone(), b.clone()]);
        let out = ha.snapshot(std::slice::from_ref(&b));
        let mut expected = ha.config_topics(&a.node);
        expected.push(format!("ambient/v1/ha/{}/state", a.node));
        let topics: Vec<String> = out.iter().map(|p| p.topic.clone()).collect();
        assert_eq!(topics, expected);
        assert!(out.iter().all(|p| p.retain && p.payload.is_empty()));
        // Removed once only.
        assert!(ha.snapshot(&[b]).is_empty());
    }

    #[test]
    fn after_a_reconnection_everything_is_sent_again_and_a_node_gone_meanwhile_is_removed() {
        let (a, b) = (view(1, 50_000), view(2, 60_000));
        let mut ha = Discovery::new(Prefix::default());
        let first = ha.snapshot(&[a.clone(), b.clone()]);
        ha.reconnected();
        let again = ha.snapshot(std::slice::from_ref(&a));
        let (of_a, of_b): (Vec<&Publish>, Vec<&Publish>) = again
            .iter()
            .partition(|p| p.topic.contains(&a.node.to_string()));
        let configs_of_a = of_a.iter().filter(|p| p.topic.ends_with("/config"));
        assert_eq!(configs_of_a.count(), 4);
        assert_eq!(of_b.len(), 5, "four configs and the state, emptied");
        assert!(of_b.iter().all(|p| p.payload.is_empty()));
        assert_eq!(states(&again).len(), 2);
        assert_eq!(first.len(), 10);
    }

    #[test]
    fn a_new_profile_republishes_the_configs() {
        let mut ha = Discovery::new(Prefix::default());
        let mut v = view(1, 50_000);
        ha.snapshot(std::slice::from_ref(&v));
        v.profile = None;
        let out = ha.snapshot(&[v]);
        assert_eq!(configs(&out).len(), 4);
        assert_eq!(json(configs(&out)[0])["device"]["model"], "aarch64");
    }

    #[test]
    fn a_prefix_is_a_plain_topic_outside_ambients_own() {
        let mut ha = Discovery::new("home/ha".parse().unwrap());
        let out = ha.snapshot(&[view(1, 50_000)]);
        assert!(out[0].topic.starts_with("home/ha/sensor/ambient_"));
        for bad in [
            "",
            "ha/#",
            "ha/+/x",
            "$SYS",
            "/ha",
            "ha/",
            "ambient",
            "ambient/v1/ha",
        ] {
            assert_eq!(bad.parse::<Prefix>(), Err(InvalidPrefix), "{bad:?}");
        }
        assert_eq!(Prefix::default().as_str(), "homeassistant");
        assert!("ambient-ha".parse::<Prefix>().is_ok());
    }
}
