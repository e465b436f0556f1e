//! A broker on a free loopback port and rumqttc clients that report their events, so tests
//! wait for what they expect (with a deadline) instead of sleeping.

#![allow(dead_code)] // Each test binary uses its own subset of these helpers.

use std::net::SocketAddr;
use std::time::Duration;

use ambient_broker::{Broker, BrokerConfig, BrokerError, BrokerStats};
use rumqttc::{
    AsyncClient, ConnAck, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS,
    SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

/// How long any expected event may take before the test fails. Generous, because a loaded CI
/// machine is slow; a passing test never waits this long.
pub const WAIT: Duration = Duration::from_secs(10);

/// A broker serving on `127.0.0.1:0` in a background task.
pub struct RunningBroker {
    pub addr: SocketAddr,
    pub stats: BrokerStats,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), BrokerError>>,
}

impl RunningBroker {
    pub async fn start() -> Self {
        Self::start_with(BrokerConfig::default()).await
    }

    pub async fn start_with(config: BrokerConfig) -> Self {
        let broker = Broker::bind("127.0.0.1:0".parse().unwrap(), config)
            .await
            .expect("bind a free loopback port");
        let addr = broker.local_addr();
        let stats = broker.stats();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(broker.run(async {
            let _ = stopped.await;
        }));
        RunningBroker {
            addr,
            stats,
            stop: Some(stop),
            task,
        }
    }

    /// Completes the shutdown future and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), BrokerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        timeout(WAIT, &mut self.task)
            .await
            .expect("run returns after shutdown")
            .expect("the broker task does not panic")
    }

    /// Waits until exactly `count` TCP connections are open: the broker has finished with
    /// any that just closed.
    pub async fn wait_for_connections(&self, count: u64) {
        let deadline = Instant::now() + WAIT;
        while self.stats.connections() != count {
            assert!(
                Instant::now() < deadline,
                "expected {count} open connections, broker has {}",
                self.stats.connections()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn options(&self, client_id: &str) -> MqttOptions {
        let mut options = MqttOptions::new(client_id, self.addr.ip().to_string(), self.addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(1 << 20, 1 << 20);
        options
    }

    /// Connects a clean-session client and waits for its CONNACK.
    pub async fn client(&self, client_id: &str) -> Client {
        Client::connect(self.options(client_id)).await.0
    }
}

/// A rumqttc client whose event loop runs in a task and reports every event.
pub struct Client {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, String>>,
    driver: JoinHandle<()>,
}

impl Client {
    /// Connects and waits for CONNACK, which it returns.
    pub async fn connect(options: MqttOptions) -> (Client, ConnAck) {
        let (client, eventloop) = AsyncClient::new(options, 100);
        Self::drive(client, eventloop).await
    }

    /// Connects with `TCP_NODELAY` on the client side as well.
    pub async fn connect_nodelay(options: MqttOptions) -> (Client, ConnAck) {
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        Self::drive(client, eventloop).await
    }

    async fn drive(client: AsyncClient, mut eventloop: EventLoop) -> (Client, ConnAck) {
        let (sender, events) = mpsc::unbounded_channel();
        // Stops at the first error: polling again would reconnect, and tests want to see
        // each connection end.
        let driver = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let failed = event.is_err();
                if sender
                    .send(event.map_err(|error| error.to_string()))
                    .is_err()
                    || failed
                {
                    break;
                }
            }
        });
        let mut client = Client {
            client,
            events,
            driver,
        };
        let connack = client
            .next(|packet| match packet {
                Packet::ConnAck(connack) => Some(connack.clone()),
                _ => None,
            })
            .await;
        (client, connack)
    }

    /// Waits for the first incoming packet `pick` accepts, skipping others.
    pub async fn next<T>(&mut self, mut pick: impl FnMut(&Packet) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("the expected packet arrives in time")
                .expect("the event loop is still running");
            match event {
                Ok(Event::Incoming(packet)) => {
                    if let Some(found) = pick(&packet) {
                        return found;
                    }
                }
                Ok(Event::Outgoing(_)) => {}
                Err(error) => panic!("connection failed while waiting for a packet: {error}"),
            }
        }
    }

    pub async fn next_publish(&mut self) -> Publish {
        self.next(|packet| match packet {
            Packet::Publish(publish) => Some(publish.clone()),
            _ => None,
        })
        .await
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<SubscribeReasonCode> {
        self.client
            .subscribe(filter, qos)
            .await
            .expect("queue SUBSCRIBE");
        self.next(|packet| match packet {
            Packet::SubAck(suback) => Some(suback.return_codes.clone()),
            _ => None,
        })
        .await
    }

    /// Publishes at QoS 1 and waits for the broker's PUBACK, so the broker has routed it.
    pub async fn publish_acked(&mut self, topic: &str, retain: bool, payload: &str) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.as_bytes().to_vec())
            .await
            .expect("queue PUBLISH");
        self.next(|packet| matches!(packet, Packet::PubAck(_)).then_some(()))
            .await;
    }

    /// Waits until the connection ends (the event loop reports an error) and returns it.
    pub async fn closed(&mut self) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("the connection closes in time");
            match event {
                Some(Err(error)) => return error,
                Some(Ok(_)) => {}
                None => return "event loop stopped".to_owned(),
            }
        }
    }

    /// Sends DISCONNECT and waits for the connection to end.
    pub async fn disconnect(mut self) {
        self.client.disconnect().await.expect("queue DISCONNECT");
        self.closed().await;
    }

    /// Drops the connection without DISCONNECT, as a crashed device would.
    pub async fn vanish(self) {
        self.driver.abort();
        let _ = self.driver.await;
    }
}

pub fn will(topic: &str, payload: &str) -> LastWill {
    LastWill::new(topic, payload.as_bytes().to_vec(), QoS::AtLeastOnce, false)
}

/// The bytes of an MQTT CONNECT with the given protocol name and level, a clean session,
/// keep-alive in seconds and client id.
pub fn raw_connect(name: &[u8], level: u8, keep_alive_s: u16, client_id: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(name.len() as u16).to_be_bytes());
    body.extend_from_slice(name);
    body.push(level);
    body.push(0x02);
    body.extend_from_slice(&keep_alive_s.to_be_bytes());
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id);
    let mut frame = vec![0x10, body.len() as u8];
    frame.extend_from_slice(&body);
    frame
}

/// Reads until the peer closes the connection and returns everything it sent before that.
pub async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let read = timeout(WAIT, async {
        let mut chunk = [0_u8; 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the broker closes the connection in time");
    received
}

/// Opens a raw TCP connection that completes an MQTT 3.1.1 CONNECT.
pub async fn raw_client(addr: SocketAddr, client_id: &[u8], keep_alive_s: u16) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(&raw_connect(b"MQTT", 4, keep_alive_s, client_id))
        .await
        .expect("write CONNECT");
    let mut connack = [0_u8; 4];
    timeout(WAIT, stream.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .expect("read CONNACK");
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK, accepted");
    stream
}
