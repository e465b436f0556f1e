//! The Unix socket listener: clients on this machine that skip the TCP stack.
#![cfg(unix)]

mod common;

use std::time::Duration;

use ambient_broker::{Broker, BrokerConfig, BrokerError};
use common::{Client, WAIT};
use rumqttc::{MqttOptions, QoS, Transport};
use tokio::sync::oneshot;

fn unix_options(path: &std::path::Path, client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, path.to_string_lossy(), 0);
    options.set_transport(Transport::Unix);
    options.set_keep_alive(Duration::from_secs(30));
    options
}

#[tokio::test]
async fn a_client_on_the_unix_socket_and_one_on_tcp_share_the_same_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sock");
    // What a broker killed with SIGKILL leaves behind.
    std::fs::write(&path, b"stale").unwrap();
    let mut broker = Broker::bind("127.0.0.1:0".parse().unwrap(), BrokerConfig::default())
        .await
        .unwrap();
    broker.listen_on_unix_socket(&path).unwrap();
    assert_eq!(broker.unix_path(), Some(path.as_path()));
    let addr = broker.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(broker.run(async {
        let _ = stopped.await;
    }));

    let (mut local, _) = Client::connect(unix_options(&path, "local")).await;
    local.subscribe("results/+", QoS::AtLeastOnce).await;
    let (mut remote, _) = Client::connect(MqttOptions::new(
        "remote",
        addr.ip().to_string(),
        addr.port(),
    ))
    .await;
    remote.subscribe("tasks/+", QoS::AtLeastOnce).await;

    remote.publish_acked("results/1", false, "from tcp").await;
    let received = local.next_publish().await;
    assert_eq!(
        (received.topic.as_str(), &received.payload[..]),
        ("results/1", &b"from tcp"[..])
    );
    local
        .publish_acked("tasks/1", false, "from the socket")
        .await;
    let received = remote.next_publish().await;
    assert_eq!(
        (received.topic.as_str(), &received.payload[..]),
        ("tasks/1", &b"from the socket"[..])
    );

    let _ = stop.send(());
    tokio::time::timeout(WAIT, running)
        .await
        .expect("run returns after shutdown")
        .unwrap()
        .unwrap();
    assert!(
        !path.exists(),
        "the socket file is removed when the broker stops"
    );
}

#[tokio::test]
async fn a_unix_socket_path_beyond_the_system_limit_is_refused_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x".repeat(200));
    let mut broker = Broker::bind("127.0.0.1:0".parse().unwrap(), BrokerConfig::default())
        .await
        .unwrap();
    let error = broker.listen_on_unix_socket(&path).unwrap_err();
    assert!(matches!(error, BrokerError::Socket { .. }), "{error:?}");
    assert!(
        error.to_string().contains(&path.display().to_string()),
        "{error}"
    );
    assert_eq!(broker.unix_path(), None);
}

#[tokio::test]
async fn a_socket_another_broker_listens_on_is_refused_not_taken_over() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sock");
    let mut first = Broker::bind("127.0.0.1:0".parse().unwrap(), BrokerConfig::default())
        .await
        .unwrap();
    first.listen_on_unix_socket(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only the owner may connect");

    let mut second = Broker::bind("127.0.0.1:0".parse().unwrap(), BrokerConfig::default())
        .await
        .unwrap();
    let error = second.listen_on_unix_socket(&path).unwrap_err();
    let BrokerError::Socket { source, .. } = &error else {
        panic!("{error:?}")
    };
    assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse, "{error}");
    drop(second);
    assert!(
        path.exists(),
        "the refused broker leaves the live socket alone"
    );
    drop(first);
    assert!(!path.exists(), "its owner removes it");
}
