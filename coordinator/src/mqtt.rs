//! One way to open an MQTT connection, shared by the service and the CLI.

#[cfg(unix)]
use std::path::Path;
use std::time::Duration;

use ambient_mqtt::{BrokerUrl, TlsFiles};
use rumqttc::{AsyncClient, EventLoop, MqttOptions, NetworkOptions};

/// Largest MQTT packet accepted or sent, in bytes: a submission with a module and an input at
/// their limits (see [`ambient_core::MAX_PACKET_BYTES`]).
pub const MAX_PACKET_BYTES: usize = ambient_core::MAX_PACKET_BYTES;

/// What the broker keeps of a client between connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// `clean_session = true`, publishes acknowledged on arrival: clients and tools.
    Clean,
    /// `clean_session = false` and manual acknowledgements: the broker keeps subscriptions and
    /// unacknowledged messages across reconnects, and a message is acknowledged (with
    /// `AsyncClient::ack`) only once it has been handled. The coordinator's session.
    Durable,
}

/// A client for `url` (TLS with `tls` for `mqtts://`): keep-alive 10 s, large packets,
/// TCP_NODELAY (Nagle's algorithm costs 40+ ms per round trip on small request/response
/// packets). `login` replaces any account in the URL.
///
/// # Errors
/// When a TLS file cannot be used.
pub fn connect(
    url: &BrokerUrl,
    tls: &TlsFiles,
    client_id: &str,
    session: Session,
    login: Option<(String, String)>,
) -> Result<(AsyncClient, EventLoop), ambient_mqtt::Error> {
    let opts = ambient_mqtt::client_options(url, client_id, tls)?;
    Ok(with_settings(opts, session, login))
}

/// A client like [`connect`]'s, over the Unix socket at `path` (the embedded broker's, see
/// `Broker::listen_on_unix_socket`).
#[cfg(unix)]
pub fn connect_local(
    path: &Path,
    client_id: &str,
    session: Session,
    login: Option<(String, String)>,
) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(client_id, path.to_string_lossy(), 0);
    opts.set_transport(rumqttc::Transport::Unix);
    with_settings(opts, session, login)
}

fn with_settings(
    mut opts: MqttOptions,
    session: Session,
    login: Option<(String, String)>,
) -> (AsyncClient, EventLoop) {
    if let Some((username, password)) = login {
        opts.set_credentials(username, password);
    }
    opts.set_keep_alive(Duration::from_secs(10))
        .set_clean_session(session == Session::Clean)
        .set_manual_acks(session == Session::Durable)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
        .set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    (client, eventloop)
}
