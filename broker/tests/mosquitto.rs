//! Interoperability with the mosquitto command-line clients (`apt-get install mosquitto-clients`).

mod common;

use std::process::Stdio;

use common::{RunningBroker, WAIT};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::time::timeout;

/// Fails the test, never skips it, when `program` cannot be started.
async fn require(program: &str) {
    let found = Command::new(program)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok();
    assert!(
        found,
        "{program} is needed for this test: apt-get install mosquitto-clients"
    );
}

async fn mosquitto_pub(broker: &RunningBroker, args: &[&str]) -> std::process::Output {
    let port = broker.addr.port().to_string();
    let output = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port, "-i", "interop-pub"])
        .args(args)
        .output();
    timeout(WAIT, output)
        .await
        .expect("mosquitto_pub finishes in time")
        .expect("mosquitto_pub runs")
}

#[tokio::test]
async fn mosquitto_sub_receives_what_mosquitto_pub_publishes_at_every_qos() {
    require("mosquitto_sub").await;
    require("mosquitto_pub").await;
    let broker = RunningBroker::start().await;
    let port = broker.addr.port().to_string();

    // Retained first: the subscriber's first line then proves its subscription is live, so
    // the live publishes below cannot race it.
    let retained = mosquitto_pub(
        &broker,
        &["-t", "interop/retained", "-m", "hello", "-r", "-q", "1"],
    )
    .await;
    assert!(retained.status.success(), "{retained:?}");

    let mut subscriber = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-i", "interop-sub"])
        .args(["-t", "interop/#", "-q", "1", "-v", "-C", "4"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub starts");
    let stdout = subscriber.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut next_line = async || {
        timeout(WAIT, lines.next_line())
            .await
            .expect("mosquitto_sub prints in time")
            .expect("read mosquitto_sub output")
            .expect("mosquitto_sub is still running")
    };
    assert_eq!(next_line().await, "interop/retained hello");

    for qos in ["0", "1", "2"] {
        let payload = format!("qos{qos}");
        let live = mosquitto_pub(&broker, &["-t", "interop/live", "-m", &payload, "-q", qos]).await;
        assert!(live.status.success(), "{live:?}");
        assert_eq!(next_line().await, format!("interop/live {payload}"));
    }
    let status = timeout(WAIT, subscriber.wait()).await.unwrap().unwrap();
    assert!(status.success(), "mosquitto_sub exits after 4 messages");
}

#[tokio::test]
async fn mosquitto_pub_speaking_mqtt_3_1_is_told_the_version_is_unacceptable() {
    require("mosquitto_pub").await;
    let broker = RunningBroker::start().await;
    let refused = mosquitto_pub(&broker, &["-V", "mqttv31", "-t", "old", "-m", "x"]).await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("unacceptable protocol version"), "{stderr}");
}
