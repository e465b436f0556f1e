//! Session lifecycle with real rumqttc clients: persistence, redelivery, wills, takeover.

mod common;

use common::{Client, RunningBroker, will};
use rumqttc::QoS;

#[tokio::test]
async fn a_persistent_session_receives_messages_published_while_it_was_offline() {
    let broker = RunningBroker::start().await;
    let mut options = broker.options("device-7");
    options.set_clean_session(false);
    let (mut device, connack) = Client::connect(options.clone()).await;
    assert!(!connack.session_present, "first connection: no session yet");
    device.subscribe("devices/7/tasks", QoS::AtLeastOnce).await;
    device.disconnect().await;
    broker.wait_for_connections(0).await;

    let mut coordinator = broker.client("coordinator").await;
    for task in ["t1", "t2", "t3"] {
        coordinator
            .publish_acked("devices/7/tasks", false, task)
            .await;
    }

    let (mut device, connack) = Client::connect(options).await;
    assert!(connack.session_present);
    for task in ["t1", "t2", "t3"] {
        let publish = device.next_publish().await;
        assert_eq!(publish.payload, task);
        assert_eq!(publish.qos, QoS::AtLeastOnce);
    }
}

#[tokio::test]
async fn an_offline_sessions_queue_keeps_the_newest_messages_within_its_byte_bound() {
    let broker = RunningBroker::start_with(ambient_broker::BrokerConfig {
        max_packet_bytes: 2_000,
        max_queued_bytes_per_session: 2_500,
        ..ambient_broker::BrokerConfig::default()
    })
    .await;
    let mut options = broker.options("device-8");
    options.set_clean_session(false);
    let (mut device, _) = Client::connect(options.clone()).await;
    device.subscribe("big", QoS::AtLeastOnce).await;
    device.disconnect().await;
    broker.wait_for_connections(0).await;

    // Three messages of about 1 kB each: only two fit in 2,500 bytes.
    let mut coordinator = broker.client("coordinator").await;
    for n in ["1", "2", "3"] {
        coordinator
            .publish_acked("big", false, n.repeat(1_000).as_str())
            .await;
    }
    assert_eq!(broker.stats.dropped(), 1, "the oldest was dropped");
    let (mut device, _) = Client::connect(options).await;
    for n in ["2", "3"] {
        assert_eq!(device.next_publish().await.payload, n.repeat(1_000));
    }
}

#[tokio::test]
async fn an_unacknowledged_message_is_redelivered_as_a_duplicate_on_reconnect() {
    let broker = RunningBroker::start().await;
    let mut options = broker.options("forgetful");
    options.set_clean_session(false);
    options.set_manual_acks(true);
    let (mut device, _) = Client::connect(options.clone()).await;
    device.subscribe("jobs", QoS::AtLeastOnce).await;
    let mut coordinator = broker.client("coordinator").await;
    coordinator.publish_acked("jobs", false, "job-1").await;
    let first = device.next_publish().await;
    assert!(!first.dup);
    device.vanish().await; // Without acknowledging.
    broker.wait_for_connections(1).await;

    options.set_manual_acks(false);
    let (mut device, connack) = Client::connect(options).await;
    assert!(connack.session_present);
    let again = device.next_publish().await;
    assert_eq!(again.payload, "job-1");
    assert!(again.dup, "a redelivery is marked dup");
    assert_eq!(again.pkid, first.pkid);
}

#[tokio::test]
async fn a_clean_session_starts_empty_even_if_a_persistent_one_existed() {
    let broker = RunningBroker::start().await;
    let mut persistent = broker.options("device-9");
    persistent.set_clean_session(false);
    let (mut device, _) = Client::connect(persistent).await;
    device.subscribe("devices/9/#", QoS::AtLeastOnce).await;
    device.disconnect().await;

    let (mut device, connack) = Client::connect(broker.options("device-9")).await;
    assert!(!connack.session_present);
    let mut coordinator = broker.client("coordinator").await;
    coordinator
        .publish_acked("devices/9/tasks", false, "lost")
        .await;
    device.subscribe("marker", QoS::AtLeastOnce).await;
    coordinator.publish_acked("marker", false, "marker").await;
    assert_eq!(
        device.next_publish().await.payload,
        "marker",
        "the old subscription was discarded"
    );
}

#[tokio::test]
async fn a_will_is_published_when_a_client_vanishes() {
    let broker = RunningBroker::start().await;
    let mut watcher = broker.client("watcher").await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    let mut options = broker.options("doomed");
    options.set_last_will(will("wills/doomed", "offline"));
    let (doomed, _) = Client::connect(options).await;

    doomed.vanish().await;

    let received = watcher.next_publish().await;
    assert_eq!(received.topic, "wills/doomed");
    assert_eq!(received.payload, "offline");
}

#[tokio::test]
async fn a_will_is_not_published_after_a_clean_disconnect() {
    let broker = RunningBroker::start().await;
    let mut watcher = broker.client("watcher").await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    let mut options = broker.options("polite");
    options.set_last_will(will("wills/polite", "offline"));
    let (polite, _) = Client::connect(options).await;

    polite.disconnect().await;
    broker.wait_for_connections(1).await;
    watcher.publish_acked("wills/marker", false, "marker").await;

    assert_eq!(
        watcher.next_publish().await.payload,
        "marker",
        "the marker, published after the disconnect, is the first thing on wills/#"
    );
}

#[tokio::test]
async fn a_second_connection_with_the_same_client_id_takes_over() {
    let broker = RunningBroker::start().await;
    let mut watcher = broker.client("watcher").await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    let mut options = broker.options("twin");
    options.set_last_will(will("wills/twin", "replaced"));
    let (mut first, _) = Client::connect(options.clone()).await;

    let (mut second, _) = Client::connect(options).await;

    first.closed().await;
    let received = watcher.next_publish().await;
    assert_eq!(
        received.payload, "replaced",
        "the old connection's will fires"
    );
    second.subscribe("echo", QoS::AtLeastOnce).await;
    second.publish_acked("echo", false, "still here").await;
    assert_eq!(second.next_publish().await.payload, "still here");
}

#[tokio::test]
async fn shutdown_closes_every_connection() {
    let broker = RunningBroker::start().await;
    let mut first = broker.client("first").await;
    let mut second = broker.client("second").await;

    broker.stop().await.expect("a clean shutdown");

    first.closed().await;
    second.closed().await;
}
