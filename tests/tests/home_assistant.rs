//! Home Assistant MQTT discovery with real processes: a coordinator with discovery on and a
//! real agent, read by a plain MQTT client that connects as Home Assistant does.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc;

/// What Home Assistant subscribes to: the discovery prefix, the states and the nodes' presence.
const FILTERS: [&str; 3] = [
    "homeassistant/#",
    "ambient/v1/ha/+/state",
    "ambient/v1/nodes/+/status",
];

/// An anonymous loopback client with Home Assistant's own last will, subscribed to
/// [`FILTERS`]; every publish it receives comes out of the channel.
async fn home_assistant(url: &str, name: &str) -> (AsyncClient, mpsc::Receiver<rumqttc::Publish>) {
    let (host, port) = host_port(url);
    let mut opts = MqttOptions::new(name, host, port);
    // Home Assistant sets this will by default: a broker that may not carry it refuses the
    // CONNECT.
    opts.set_last_will(LastWill::new(
        "homeassistant/status",
        "offline",
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut el) = AsyncClient::new(opts, 100);
    let (tx, rx) = mpsc::channel(1024);
    let (subscribed_tx, mut subscribed) = mpsc::channel(FILTERS.len());
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).await.is_err() {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let _ = subscribed_tx.send(ack.return_codes).await;
                }
                Ok(_) => {}
                // Refused, or the coordinator stopped at the end of the test.
                Err(_) => break,
            }
        }
    });
    for filter in FILTERS {
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        let codes = subscribed
            .recv()
            .await
            .expect("a SUBACK: the broker took the connection and its will");
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
            "{filter} refused: {codes:?}"
        );
    }
    (client, rx)
}

/// Takes publishes into `seen` (topic → latest publish) until `done` holds for it; panics after
/// a generous deadline with what arrived.
async fn receive_until(
    rx: &mut mpsc::Receiver<rumqttc::Publish>,
    seen: &mut BTreeMap<String, rumqttc::Publish>,
    what: &str,
    done: impl Fn(&BTreeMap<String, rumqttc::Publish>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(p)) => {
                seen.insert(p.topic.clone(), p);
            }
            _ => panic!(
                "timed out waiting for {what}; received {:?}",
                seen.iter()
                    .map(|(t, p)| (t, String::from_utf8_lossy(&p.payload)))
                    .collect::<Vec<_>>()
            ),
        }
    }
}

fn json(p: &rumqttc::Publish) -> Value {
    serde_json::from_slice(&p.payload)
        .unwrap_or_else(|e| panic!("{}: {e}: {:?}", p.topic, p.payload))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_appears_in_home_assistant_with_retained_configs_and_its_temperature_and_leaves_when_revoked()
 {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start_with(
        &dir.path().join("c"),
        0,
        None,
        "[home_assistant]\ndiscovery = true\n",
    );
    // The device's id and key, as the operator reads them on the device (the key revokes it).
    let state_dir = dir.path().join("a");
    let (node, public_key) = device_identity(&state_dir);
    let _agent = agent(&c.url, &state_dir, "pi5");
    c.wait_for_nodes(1);
    let config_topics = [
        format!("homeassistant/sensor/ambient_{node}/temperature/config"),
        format!("homeassistant/sensor/ambient_{node}/health/config"),
        format!("homeassistant/binary_sensor/ambient_{node}/breaker/config"),
        format!("homeassistant/sensor/ambient_{node}/tasks_run/config"),
    ];
    let state_topic = format!("ambient/v1/ha/{node}/state");
    let status_topic = format!("ambient/v1/nodes/{node}/status");

    let (_ha, mut rx) = home_assistant(&c.url, "home-assistant").await;
    let mut seen = BTreeMap::new();
    receive_until(
        &mut rx,
        &mut seen,
        "the configs, a state with a temperature, and the node online",
        |seen| {
            config_topics.iter().all(|t| seen.contains_key(t))
                && seen
                    .get(&state_topic)
                    .is_some_and(|p| json(p)["temperature_c"].is_number())
                && seen
                    .get(&status_topic)
                    .is_some_and(|p| p.payload.as_ref() == b"online")
        },
    )
    .await;
    for topic in &config_topics {
        let config = json(&seen[topic]);
        assert_eq!(config["state_topic"], state_topic.as_str(), "{config}");
        assert_eq!(
            config["device"]["identifiers"][0],
            format!("ambient_{node}"),
            "{config}"
        );
        assert_eq!(config["device"]["manufacturer"], "Ambient");
        // The machine's own architecture, and the profile it simulates.
        let model = config["device"]["model"].as_str().unwrap();
        assert!(model.ends_with(" (simulated pi5)"), "{model}");
        assert_eq!(config["availability"][0]["topic"], status_topic.as_str());
        let unique = config["unique_id"].as_str().unwrap();
        assert!(unique.starts_with(&format!("ambient_{node}_")), "{unique}");
    }
    let temperature = json(&seen[&config_topics[0]]);
    assert_eq!(temperature["device_class"], "temperature");
    assert_eq!(temperature["unit_of_measurement"], "°C");
    let state = json(&seen[&state_topic]);
    let celsius = state["temperature_c"].as_f64().unwrap();
    assert!((20.0..=100.0).contains(&celsius), "{state}");
    assert_eq!(state["online"], true, "{state}");
    assert_eq!(state["breaker"], "closed", "{state}");

    // A Home Assistant that starts later reads every config from the broker: they are retained.
    let (_late, mut late_rx) = home_assistant(&c.url, "home-assistant-late").await;
    let mut late = BTreeMap::new();
    receive_until(&mut late_rx, &mut late, "the retained configs", |seen| {
        config_topics.iter().all(|t| seen.contains_key(t)) && seen.contains_key(&state_topic)
    })
    .await;
    for topic in config_topics.iter().chain([&state_topic]) {
        assert!(late[topic].retain, "{topic} was not retained");
    }

    // A revoked node leaves the registry, and Home Assistant with it: empty retained configs.
    let out = std::process::Command::new(bin("ambient"))
        .args(["nodes", "revoke", &public_key, "--data-dir"])
        .arg(&c.data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    receive_until(
        &mut rx,
        &mut seen,
        "empty configs for the revoked node",
        |seen| {
            config_topics
                .iter()
                .all(|t| seen.get(t).is_some_and(|p| p.payload.is_empty()))
        },
    )
    .await;
}

#[test]
fn the_ha_flags_turn_discovery_on_and_a_bad_prefix_is_named() {
    let print = std::process::Command::new(bin("ambient"))
        .args([
            "coordinator",
            "--ha-discovery",
            "--ha-prefix",
            "home/ha",
            "--print-config",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8(print.stdout).unwrap();
    let section = text
        .split("\n[home_assistant]\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no [home_assistant] section: {text}"));
    assert!(
        section.contains("\ndiscovery = true\n") && section.contains("\nprefix = \"home/ha\"\n"),
        "{text}"
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = std::process::Command::new(bin("ambient"))
        .args(["coordinator", "--ha-discovery", "--ha-prefix", "ha/#"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("home_assistant.prefix"), "{err}");
}
