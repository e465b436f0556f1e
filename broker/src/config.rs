//! Limits and timeouts of a broker.

/// Limits and timeouts of a [`Broker`](crate::Broker).
///
/// Start from the defaults and change what you need:
/// `BrokerConfig { max_connections: 64, ..BrokerConfig::default() }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Largest packet a client may send, in bytes, counting everything after the fixed header
    /// (the MQTT "remaining length"). A larger packet closes that client's connection.
    /// Defaults to 16 MiB, because tasks carry their WASM modules inline.
    pub max_packet_bytes: usize,
    /// QoS 1 messages kept for one session while its client is offline or already has 100
    /// unacknowledged messages in flight. When it is full the oldest is dropped and counted
    /// in [`BrokerStats::dropped`](crate::BrokerStats::dropped). Also bounds the QoS 0
    /// messages waiting to be written to one connected client; beyond it new ones are dropped
    /// and counted. Does not cover retained messages, which are one per topic. Defaults to
    /// 10,000; 0 is treated as 1.
    pub max_queued_per_session: usize,
    /// Topic and payload bytes of the QoS 1 messages kept for one session, with the same rule
    /// as `max_queued_per_session`: the oldest are dropped to make room. Never less than
    /// `max_packet_bytes`, so any message the broker accepts can be queued. Defaults to
    /// 256 MiB.
    pub max_queued_bytes_per_session: usize,
    /// TCP connections served at once. Connections beyond it are closed as soon as they are
    /// accepted. Keep it below the process's open-file limit. Defaults to 1,000.
    pub max_connections: usize,
    /// Time a new connection has to deliver its CONNECT packet, in milliseconds, before it is
    /// closed. Defaults to 5,000.
    pub connect_timeout_ms: u64,
    /// Longest keep-alive granted, in seconds. A client that asks for none (0) or for more is
    /// held to this, so an idle connection cannot hold a slot forever: silent for 1.5 times
    /// it, the client is dropped and its will published. Defaults to 300; 0 is treated as 1.
    pub max_keep_alive_s: u16,
    /// TCP connections served at once from one IP address, so one host cannot take every slot
    /// of `max_connections`. Defaults to 100.
    pub max_connections_per_address: usize,
    /// Sessions held at once, online or not; a CONNECT that would create one more gets
    /// CONNACK 3 (server unavailable). Defaults to 20,000.
    pub max_sessions: usize,
    /// A persistent session (`clean_session = 0`) whose client has been away this long ends,
    /// with its subscriptions and queued messages, in seconds (checked once a minute).
    /// Defaults to 7 days.
    pub session_expiry_s: u64,
    /// Retained messages kept at once. Beyond it a retained message on a new topic is
    /// delivered but not kept, and counted in [`BrokerStats::dropped`](crate::BrokerStats::dropped).
    /// Defaults to 10,000.
    pub max_retained: usize,
    /// Payload bytes of all retained messages together, with the same rule. Defaults to 512 MiB.
    pub max_retained_bytes: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_packet_bytes: 16 * 1024 * 1024,
            max_queued_per_session: 10_000,
            max_queued_bytes_per_session: 256 * 1024 * 1024,
            max_connections: 1_000,
            connect_timeout_ms: 5_000,
            max_keep_alive_s: 300,
            max_connections_per_address: 100,
            max_sessions: 20_000,
            session_expiry_s: 7 * 24 * 3600,
            max_retained: 10_000,
            max_retained_bytes: 512 * 1024 * 1024,
        }
    }
}
