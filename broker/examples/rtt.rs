//! Measures QoS 1 ping-pong round trips through the embedded broker over loopback, with
//! `TCP_NODELAY` on both clients, and prints the median in microseconds.
//!
//! Run with `cargo run --release -p ambient-broker --example rtt -- 2000` (the argument is
//! the number of round trips; default 1,000).

use std::time::{Duration, Instant};

use ambient_broker::{Broker, BrokerConfig};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, oneshot};

const WARM_UP_ROUNDS: u32 = 50;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: u32 = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .map_err(|_| format!("round count must be a positive integer, got {arg:?}"))?,
        None => 1_000,
    };

    let broker = Broker::bind("127.0.0.1:0".parse()?, BrokerConfig::default()).await?;
    let addr = broker.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let serving = tokio::spawn(broker.run(async {
        let _ = stopped.await;
    }));

    // The echo side answers every ping from inside its event loop task.
    let (echo, mut echo_loop) = client("rtt-echo", addr);
    echo.subscribe("rtt/ping", QoS::AtLeastOnce).await?;
    let (subscribed_tx, subscribed) = oneshot::channel();
    tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        while let Ok(event) = echo_loop.poll().await {
            match event {
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Event::Incoming(Packet::Publish(ping)) => {
                    let _ = echo.try_publish("rtt/pong", QoS::AtLeastOnce, false, ping.payload);
                }
                _ => {}
            }
        }
    });
    subscribed.await?;

    let (pinger, mut pinger_loop) = client("rtt-pinger", addr);
    pinger.subscribe("rtt/pong", QoS::AtLeastOnce).await?;
    let (pongs_tx, mut pongs) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = pinger_loop.poll().await {
            let forwarded = match event {
                Event::Incoming(Packet::SubAck(_)) => pongs_tx.send(None),
                Event::Incoming(Packet::Publish(pong)) => pongs_tx.send(Some(pong.payload)),
                _ => Ok(()),
            };
            if forwarded.is_err() {
                break;
            }
        }
    });
    if pongs.recv().await.is_none() {
        return Err("the pinger's connection ended before it subscribed".into());
    }

    let mut samples = Vec::with_capacity(rounds as usize);
    for round in 0..WARM_UP_ROUNDS + rounds {
        let payload = round.to_be_bytes().to_vec();
        let sent = Instant::now();
        pinger
            .publish("rtt/ping", QoS::AtLeastOnce, false, payload.clone())
            .await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), pongs.recv()).await {
                Ok(Some(Some(pong))) if pong == payload => break,
                Ok(Some(_)) => continue,
                Ok(None) => return Err("the pinger's connection ended".into()),
                Err(_) => return Err(format!("no pong for round {round} within 5 s").into()),
            }
        }
        if round >= WARM_UP_ROUNDS {
            samples.push(sent.elapsed());
        }
    }

    samples.sort();
    let micros = |d: Duration| d.as_micros();
    let at = |fraction: f64| samples[((samples.len() - 1) as f64 * fraction) as usize];
    println!(
        "{rounds} QoS 1 round trips via {addr}: median {} µs (min {} µs, p90 {} µs, max {} µs)",
        micros(at(0.5)),
        micros(samples[0]),
        micros(at(0.9)),
        micros(samples[samples.len() - 1]),
    );

    let _ = stop.send(());
    serving.await??;
    Ok(())
}

fn client(id: &str, addr: std::net::SocketAddr) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}
