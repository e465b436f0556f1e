//! Routing between real rumqttc clients: QoS, wildcards, retained messages, shared groups.

mod common;

use std::collections::BTreeSet;

use common::{Client, RunningBroker};
use rumqttc::{Packet, QoS, SubscribeReasonCode};

#[tokio::test]
async fn a_qos1_publish_round_trips_between_two_clients() {
    let broker = RunningBroker::start().await;
    let mut subscriber = broker.client("subscriber").await;
    let mut publisher = broker.client("publisher").await;
    assert_eq!(
        subscriber.subscribe("tasks/+", QoS::AtLeastOnce).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );

    publisher.publish_acked("tasks/42", false, "run me").await;

    let received = subscriber.next_publish().await;
    assert_eq!(received.topic, "tasks/42");
    assert_eq!(received.payload, "run me");
    assert_eq!(received.qos, QoS::AtLeastOnce);
    assert!(!received.retain);
    assert_eq!(broker.stats.publishes_received(), 1);
}

#[tokio::test]
async fn wildcard_filters_route_only_matching_topics() {
    let broker = RunningBroker::start().await;
    let mut single = broker.client("single-level").await;
    let mut multi = broker.client("multi-level").await;
    let mut publisher = broker.client("publisher").await;
    single.subscribe("nodes/+/health", QoS::AtLeastOnce).await;
    multi.subscribe("nodes/n1/#", QoS::AtLeastOnce).await;

    for topic in [
        "nodes/n1/health",
        "nodes/n2/health",
        "nodes/n1/tasks/7",
        "other/n1/health",
    ] {
        publisher.publish_acked(topic, false, topic).await;
    }
    // Published last, matched by both: once it arrives, nothing before it is still in flight.
    publisher
        .publish_acked("nodes/n1/health", false, "end")
        .await;

    let mut seen_by_single = Vec::new();
    loop {
        let publish = single.next_publish().await;
        if publish.payload == "end" {
            break;
        }
        seen_by_single.push(publish.topic);
    }
    assert_eq!(seen_by_single, ["nodes/n1/health", "nodes/n2/health"]);

    let mut seen_by_multi = Vec::new();
    loop {
        let publish = multi.next_publish().await;
        if publish.payload == "end" {
            break;
        }
        seen_by_multi.push(publish.topic);
    }
    assert_eq!(seen_by_multi, ["nodes/n1/health", "nodes/n1/tasks/7"]);
}

#[tokio::test]
async fn a_retained_message_reaches_a_late_subscriber() {
    let broker = RunningBroker::start().await;
    let mut publisher = broker.client("publisher").await;
    publisher
        .publish_acked("config/model", true, "digits-v3")
        .await;

    let mut late = broker.client("late").await;
    late.subscribe("config/#", QoS::AtLeastOnce).await;

    let received = late.next_publish().await;
    assert_eq!(received.topic, "config/model");
    assert_eq!(received.payload, "digits-v3");
    assert!(received.retain, "a replayed message has retain set");
}

#[tokio::test]
async fn an_empty_retained_payload_deletes_the_retained_message() {
    let broker = RunningBroker::start().await;
    let mut publisher = broker.client("publisher").await;
    publisher
        .publish_acked("config/model", true, "digits-v3")
        .await;
    publisher.publish_acked("config/model", true, "").await;
    publisher
        .publish_acked("config/marker", true, "marker")
        .await;

    let mut late = broker.client("late").await;
    late.subscribe("config/#", QoS::AtLeastOnce).await;

    let received = late.next_publish().await;
    assert_eq!(
        received.payload, "marker",
        "only the marker is retained; the model was deleted"
    );
}

#[tokio::test]
async fn a_shared_subscription_delivers_each_message_to_exactly_one_member() {
    let broker = RunningBroker::start().await;
    let mut members = Vec::new();
    for name in ["worker-a", "worker-b"] {
        let mut member = broker.client(name).await;
        member
            .subscribe("$share/workers/jobs/+", QoS::AtLeastOnce)
            .await;
        member.subscribe("control/done", QoS::AtLeastOnce).await;
        members.push(member);
    }
    let mut publisher = broker.client("publisher").await;
    let jobs: BTreeSet<String> = (0..10).map(|i| format!("job-{i}")).collect();
    for job in &jobs {
        publisher.publish_acked("jobs/digits", false, job).await;
    }
    publisher.publish_acked("control/done", false, "done").await;

    let mut received = Vec::new();
    for member in &mut members {
        let mut own = Vec::new();
        loop {
            let publish = member.next_publish().await;
            if publish.topic == "control/done" {
                break;
            }
            own.push(String::from_utf8(publish.payload.to_vec()).unwrap());
        }
        assert!(!own.is_empty(), "round robin gives every member work");
        received.extend(own);
    }
    assert_eq!(
        received.len(),
        jobs.len(),
        "no job delivered twice: {received:?}"
    );
    assert_eq!(received.into_iter().collect::<BTreeSet<_>>(), jobs);
}

#[tokio::test]
async fn an_inbound_qos2_publish_is_completed_and_delivered_once() {
    let broker = RunningBroker::start().await;
    let mut subscriber = broker.client("subscriber").await;
    assert_eq!(
        subscriber.subscribe("exact", QoS::ExactlyOnce).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)],
        "QoS 2 is granted as QoS 1"
    );
    let mut publisher = broker.client("publisher").await;
    publisher
        .client
        .publish("exact", QoS::ExactlyOnce, false, "once")
        .await
        .unwrap();
    publisher
        .next(|packet| matches!(packet, Packet::PubComp(_)).then_some(()))
        .await;
    publisher.publish_acked("exact", false, "after").await;

    assert_eq!(subscriber.next_publish().await.payload, "once");
    assert_eq!(subscriber.next_publish().await.payload, "after");
}

#[tokio::test]
async fn a_client_with_an_empty_id_and_a_clean_session_is_accepted() {
    let broker = RunningBroker::start().await;
    let (mut anonymous, connack) = Client::connect(broker.options("")).await;
    assert_eq!(connack.code, rumqttc::ConnectReturnCode::Success);
    anonymous.subscribe("echo", QoS::AtLeastOnce).await;
    anonymous.publish_acked("echo", false, "hi").await;
    assert_eq!(anonymous.next_publish().await.payload, "hi");
}

#[tokio::test]
async fn a_multi_megabyte_payload_round_trips_intact() {
    let broker = RunningBroker::start().await;
    let mut big_options = broker.options("big-subscriber");
    big_options.set_max_packet_size(8 << 20, 8 << 20);
    let (mut subscriber, _) = Client::connect(big_options.clone()).await;
    subscriber.subscribe("modules/+", QoS::AtLeastOnce).await;
    big_options.set_client_id("big-publisher".to_owned());
    let (publisher, _) = Client::connect(big_options).await;
    let module: Vec<u8> = (0..5_000_000_u32).map(|i| (i % 251) as u8).collect();

    publisher
        .client
        .publish("modules/digits", QoS::AtLeastOnce, false, module.clone())
        .await
        .unwrap();

    let received = subscriber.next_publish().await;
    assert_eq!(received.payload.len(), module.len());
    assert!(received.payload == module, "payload bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_and_receiving_large_messages_at_once_is_not_stalled() {
    const MESSAGES: usize = 8;
    const SIZE: usize = 4 << 20;
    let broker = RunningBroker::start().await;
    let mut options = broker.options("device");
    options.set_max_packet_size(2 * SIZE, 2 * SIZE);
    let (mut device, _) = Client::connect(options.clone()).await;
    device.subscribe("down", QoS::AtLeastOnce).await;
    options.set_client_id("coordinator".to_owned());
    let (mut coordinator, _) = Client::connect(options).await;
    coordinator.subscribe("up", QoS::AtLeastOnce).await;

    // Both directions at once: the broker must keep reading the device's uploads while its
    // writes to the device are blocked, or each side waits for the other to read.
    let (down, up) = (coordinator.client.clone(), device.client.clone());
    let senders = tokio::spawn(async move {
        for _ in 0..MESSAGES {
            down.publish("down", QoS::AtLeastOnce, false, vec![1_u8; SIZE])
                .await
                .unwrap();
            up.publish("up", QoS::AtLeastOnce, false, vec![2_u8; SIZE])
                .await
                .unwrap();
        }
    });
    for _ in 0..MESSAGES {
        assert_eq!(device.next_publish().await.payload.len(), SIZE);
        assert_eq!(coordinator.next_publish().await.payload.len(), SIZE);
    }
    senders.await.unwrap();
}
