//! What the broker does with peers that misbehave, and with addresses it cannot have.

mod common;

use ambient_broker::{Broker, BrokerConfig, BrokerError};
use common::{RunningBroker, raw_client, raw_connect, read_until_closed};
use rumqttc::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A healthy pair of clients can still exchange a message.
async fn assert_broker_still_routes(broker: &RunningBroker, subscriber: &mut common::Client) {
    let mut publisher = broker.client("healthy-publisher").await;
    publisher.publish_acked("health", false, "fine").await;
    assert_eq!(subscriber.next_publish().await.payload, "fine");
}

#[tokio::test]
async fn a_malformed_frame_closes_only_that_connection() {
    let broker = RunningBroker::start().await;
    let mut bystander = broker.client("bystander").await;
    bystander.subscribe("health", QoS::AtLeastOnce).await;

    let mut rogue = raw_client(broker.addr, b"rogue", 30).await;
    // Packet type 15 does not exist in MQTT 3.1.1.
    rogue.write_all(&[0xF0, 0x00, 0xDE, 0xAD]).await.unwrap();
    assert_eq!(read_until_closed(&mut rogue).await, b"");

    assert_broker_still_routes(&broker, &mut bystander).await;
}

#[tokio::test]
async fn garbage_instead_of_connect_is_closed_without_a_reply() {
    let broker = RunningBroker::start().await;
    let mut bystander = broker.client("bystander").await;
    bystander.subscribe("health", QoS::AtLeastOnce).await;

    let mut rogue = TcpStream::connect(broker.addr).await.unwrap();
    // A remaining length that never ends.
    rogue
        .write_all(&[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
        .await
        .unwrap();
    assert_eq!(read_until_closed(&mut rogue).await, b"");

    assert_broker_still_routes(&broker, &mut bystander).await;
}

#[tokio::test]
async fn an_oversized_packet_closes_that_connection() {
    let broker = RunningBroker::start_with(BrokerConfig {
        max_packet_bytes: 1024,
        ..BrokerConfig::default()
    })
    .await;
    let mut bystander = broker.client("bystander").await;
    bystander.subscribe("health", QoS::AtLeastOnce).await;

    let mut big = broker.client("big").await;
    big.client
        .publish("blob", QoS::AtLeastOnce, false, vec![0_u8; 4096])
        .await
        .unwrap();
    big.closed().await;

    assert_broker_still_routes(&broker, &mut bystander).await;
}

#[tokio::test]
async fn a_client_of_another_mqtt_version_is_refused_with_connack_1() {
    let broker = RunningBroker::start().await;
    for (name, level) in [(&b"MQIsdp"[..], 3), (&b"MQTT"[..], 5)] {
        let mut stream = TcpStream::connect(broker.addr).await.unwrap();
        stream
            .write_all(&raw_connect(name, level, 30, b"old"))
            .await
            .unwrap();
        assert_eq!(
            read_until_closed(&mut stream).await,
            [0x20, 0x02, 0x00, 0x01],
            "CONNACK 'unacceptable protocol version' for level {level}, then close"
        );
    }
}

#[tokio::test]
async fn a_connection_that_never_sends_connect_is_closed_after_the_connect_timeout() {
    let broker = RunningBroker::start_with(BrokerConfig {
        connect_timeout_ms: 100,
        ..BrokerConfig::default()
    })
    .await;
    let mut silent = TcpStream::connect(broker.addr).await.unwrap();
    assert_eq!(read_until_closed(&mut silent).await, b"");
    broker.wait_for_connections(0).await;
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_one_and_a_half_keep_alives_and_its_will_fires() {
    let broker = RunningBroker::start().await;
    let mut watcher = broker.client("watcher").await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    // A raw connection stands in for the client: rumqttc would ping on time.
    let mut connect = raw_connect(b"MQTT", 4, 1, b"sleepy");
    connect[9] |= 0x04 | 0x08; // will flag, will QoS 1
    let will_topic = b"wills/sleepy";
    let will_payload = b"timed out";
    connect.extend_from_slice(&(will_topic.len() as u16).to_be_bytes());
    connect.extend_from_slice(will_topic);
    connect.extend_from_slice(&(will_payload.len() as u16).to_be_bytes());
    connect.extend_from_slice(will_payload);
    connect[1] = (connect.len() - 2) as u8;
    let mut sleepy = TcpStream::connect(broker.addr).await.unwrap();
    sleepy.write_all(&connect).await.unwrap();
    let mut connack = [0_u8; 4];
    sleepy.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);

    sleepy.write_all(&[0xC0, 0x00]).await.unwrap();
    let mut pingresp = [0_u8; 2];
    sleepy.read_exact(&mut pingresp).await.unwrap();
    assert_eq!(pingresp, [0xD0, 0x00], "PINGREQ is answered");

    assert_eq!(
        read_until_closed(&mut sleepy).await,
        b"",
        "then silence is punished"
    );
    let received = watcher.next_publish().await;
    assert_eq!(received.topic, "wills/sleepy");
    assert_eq!(received.payload, "timed out");
}

#[tokio::test]
async fn a_client_that_asks_for_no_keep_alive_is_still_dropped_when_silent() {
    let broker = RunningBroker::start_with(BrokerConfig {
        max_keep_alive_s: 1,
        ..BrokerConfig::default()
    })
    .await;
    // Keep-alive 0 would otherwise hold a connection slot forever.
    let mut idle = raw_client(broker.addr, b"idle", 0).await;
    assert_eq!(read_until_closed(&mut idle).await, b"");
    broker.wait_for_connections(0).await;
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed() {
    let broker = RunningBroker::start_with(BrokerConfig {
        max_connections: 1,
        ..BrokerConfig::default()
    })
    .await;
    let _only = broker.client("only").await;
    let mut extra = TcpStream::connect(broker.addr).await.unwrap();
    extra
        .write_all(&raw_connect(b"MQTT", 4, 30, b"extra"))
        .await
        .unwrap();
    assert_eq!(read_until_closed(&mut extra).await, b"");
}

#[tokio::test]
async fn connections_beyond_the_per_address_cap_are_closed_and_the_slot_frees_on_close() {
    let broker = RunningBroker::start_with(BrokerConfig {
        max_connections_per_address: 2,
        ..BrokerConfig::default()
    })
    .await;
    let _first = broker.client("first").await;
    let second = TcpStream::connect(broker.addr).await.unwrap();
    let mut third = TcpStream::connect(broker.addr).await.unwrap();
    third
        .write_all(&raw_connect(b"MQTT", 4, 30, b"third"))
        .await
        .unwrap();
    assert_eq!(read_until_closed(&mut third).await, b"");
    assert_eq!(broker.stats.refused(), 1);
    drop(second);
    // The slot comes back once the broker has seen the close.
    let mut fourth = loop {
        let mut attempt = TcpStream::connect(broker.addr).await.unwrap();
        attempt
            .write_all(&raw_connect(b"MQTT", 4, 30, b"fourth"))
            .await
            .unwrap();
        let mut connack = [0u8; 4];
        if attempt.read_exact(&mut connack).await.is_ok() {
            assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
            break attempt;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    fourth.write_all(&[0xC0, 0x00]).await.unwrap();
    let mut pingresp = [0u8; 2];
    fourth.read_exact(&mut pingresp).await.unwrap();
    assert_eq!(pingresp, [0xD0, 0x00]);
}

#[tokio::test]
async fn binding_a_port_in_use_explains_what_to_do() {
    let first = Broker::bind("127.0.0.1:0".parse().unwrap(), BrokerConfig::default())
        .await
        .unwrap();
    let addr = first.local_addr();

    let error = Broker::bind(addr, BrokerConfig::default())
        .await
        .expect_err("the port is taken");

    assert!(matches!(error, BrokerError::AddressInUse { addr: a } if a == addr));
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("{addr} is already in use")),
        "{message}"
    );
    assert!(
        message.contains("--listen address such as 127.0.0.1:0"),
        "{message}"
    );
    assert!(
        message.contains(&format!("--broker mqtt://{addr}")),
        "{message}"
    );
}

#[tokio::test]
async fn a_client_that_sends_connect_twice_is_disconnected() {
    let broker = RunningBroker::start().await;
    let mut bystander = broker.client("bystander").await;
    bystander.subscribe("health", QoS::AtLeastOnce).await;
    let mut twice = raw_client(broker.addr, b"twice", 30).await;
    twice
        .write_all(&raw_connect(b"MQTT", 4, 30, b"twice"))
        .await
        .unwrap();
    assert_eq!(read_until_closed(&mut twice).await, b"");
    assert_broker_still_routes(&broker, &mut bystander).await;
}

#[tokio::test]
async fn an_invalid_filter_is_refused_with_0x80_and_a_valid_one_granted_at_most_qos_1() {
    let broker = RunningBroker::start().await;
    let mut client = raw_client(broker.addr, b"raw", 30).await;
    let mut subscribe = vec![0x82, 0, 0x00, 0x01];
    for (filter, qos) in [(&b"nodes/#/bad"[..], 1), (&b"nodes/+"[..], 2)] {
        subscribe.extend_from_slice(&(filter.len() as u16).to_be_bytes());
        subscribe.extend_from_slice(filter);
        subscribe.push(qos);
    }
    subscribe[1] = (subscribe.len() - 2) as u8;
    client.write_all(&subscribe).await.unwrap();

    let mut suback = [0_u8; 6];
    client.read_exact(&mut suback).await.unwrap();
    assert_eq!(suback, [0x90, 0x04, 0x00, 0x01, 0x80, 0x01]);
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_loses_qos0_messages_but_holds_up_nobody() {
    let broker = RunningBroker::start_with(BrokerConfig {
        max_queued_per_session: 4,
        ..BrokerConfig::default()
    })
    .await;
    // Subscribes and then never reads; keep-alive 0 so it is not dropped for silence.
    let mut stuck = raw_client(broker.addr, b"stuck", 0).await;
    let subscribe = [
        0x82, 0x0A, 0x00, 0x01, 0x00, 0x05, b'f', b'l', b'o', b'o', b'd', 0x00,
    ];
    stuck.write_all(&subscribe).await.unwrap();
    let mut suback = [0_u8; 5];
    stuck.read_exact(&mut suback).await.unwrap();
    assert_eq!(suback, [0x90, 0x03, 0x00, 0x01, 0x00]);

    // 32 MiB in all: far more than the socket buffers and the broker's batch can absorb.
    let mut publisher = broker.client("firehose").await;
    for _ in 0..128 {
        publisher
            .client
            .publish("flood", QoS::AtMostOnce, false, vec![0_u8; 256 * 1024])
            .await
            .unwrap();
    }
    // Routed after the flood on the same connection: its PUBACK means the flood was routed.
    publisher.publish_acked("after-flood", false, "done").await;

    assert!(
        broker.stats.dropped() > 0,
        "some QoS 0 messages were dropped"
    );
    let mut bystander = broker.client("bystander").await;
    bystander.subscribe("health", QoS::AtLeastOnce).await;
    assert_broker_still_routes(&broker, &mut bystander).await;
    drop(stuck);
}

#[tokio::test]
async fn packets_sent_right_behind_connect_are_answered() {
    let broker = RunningBroker::start().await;
    let mut pipelined = TcpStream::connect(broker.addr).await.unwrap();
    let mut bytes = raw_connect(b"MQTT", 4, 30, b"eager");
    bytes.extend_from_slice(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x01]);
    bytes.extend_from_slice(&[0xC0, 0x00]);
    pipelined.write_all(&bytes).await.unwrap();

    let mut replies = [0_u8; 11];
    pipelined.read_exact(&mut replies).await.unwrap();
    assert_eq!(
        replies,
        [
            0x20, 0x02, 0x00, 0x00, // CONNACK
            0x90, 0x03, 0x00, 0x01, 0x01, // SUBACK, QoS 1
            0xD0, 0x00, // PINGRESP
        ]
    );
}
