//! One way to open an MQTT connection, shared by the service and the CLI.

use std::time::Duration;

use rumqttc::{AsyncClient, EventLoop, MqttOptions, NetworkOptions};

/// Largest MQTT packet accepted or sent, in bytes: room for a 16 MiB module.
pub const MAX_PACKET_BYTES: usize = 32 << 20;

/// Options for a client: keep-alive 10 s, large packets, TCP_NODELAY (Nagle's algorithm
/// costs 40+ ms per round trip on small request/response packets).
pub fn connect(
    host: &str,
    port: u16,
    client_id: &str,
    persistent: bool,
) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_clean_session(!persistent)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
        .set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    (client, eventloop)
}
