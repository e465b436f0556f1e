//! Sockets: the accept loop and one task per connection.
//!
//! Every protocol decision belongs to the [`Router`]; this file frames bytes into packets,
//! hands them over, carries out the [`Effects`] that come back, and owns every timeout.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes;
use rumqttc::{ConnAck, ConnectReturnCode, Packet, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::access::{Credentials, Gatekeeper, Open, Refusal};
use crate::router::{Effects, INFLIGHT_WINDOW, Limits, ProtocolError, Router};
use crate::session::{ConnId, QueueBound};
use crate::{BrokerConfig, BrokerError, BrokerStats};

/// Smallest spare room ensured in a connection's read buffer before each read, in bytes.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// Queued packets are drained into one write until the buffer reaches this size, in bytes;
/// beyond it the batch is written and the rest waits for the next round.
const WRITE_BATCH_BYTES: usize = 1024 * 1024;
/// Longest pause after a failed accept (out of file descriptors, for instance).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// Keep-alive is enforced at 1.5 times the interval the client announced (MQTT-3.1.2-24),
/// expressed in milliseconds per second of keep-alive.
const KEEP_ALIVE_GRACE_MS_PER_S: u64 = 1_500;
/// How often offline persistent sessions age (see `BrokerConfig::session_expiry_s`).
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// An MQTT 3.1.1 broker bound to a TCP address.
///
/// [`bind`](Broker::bind) claims the address; [`run`](Broker::run) serves it until a shutdown
/// future completes. Every accepted socket has `TCP_NODELAY` set, so small packets such as
/// PUBACK leave at once instead of waiting up to 40 ms for Nagle's algorithm.
pub struct Broker {
    listener: TcpListener,
    local_addr: SocketAddr,
    /// A second listener whose connections speak TLS first.
    tls: Option<TlsListener>,
    config: BrokerConfig,
    stats: BrokerStats,
    gatekeeper: Arc<dyn Gatekeeper>,
}

struct TlsListener {
    listener: TcpListener,
    local_addr: SocketAddr,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("local_addr", &self.local_addr)
            .field("tls_addr", &self.tls_addr())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Binds the listener on `addr` only. Port 0 picks a free port; see
    /// [`local_addr`](Broker::local_addr).
    ///
    /// # Errors
    ///
    /// [`BrokerError::AddressInUse`] when another process listens there (the message says what
    /// to do about it), [`BrokerError::AddressNotAvailable`], [`BrokerError::PermissionDenied`],
    /// or [`BrokerError::Bind`] for anything else.
    pub async fn bind(addr: SocketAddr, config: BrokerConfig) -> Result<Broker, BrokerError> {
        let (listener, local_addr) = listen(addr).await?;
        Ok(Broker {
            listener,
            local_addr,
            tls: None,
            config,
            stats: BrokerStats::default(),
            gatekeeper: Arc::new(Open),
        })
    }

    /// Also listens on `addr` for MQTT over TLS (`mqtts://`), presenting the certificate
    /// chain in `cert_file` with the private key in `key_file` (PEM). Both listeners serve the
    /// same sessions and share `max_connections`.
    ///
    /// # Errors
    /// [`BrokerError::Tls`] naming a file that cannot be used, or those of [`Broker::bind`].
    pub async fn with_tls_listener(
        mut self,
        addr: SocketAddr,
        cert_file: &std::path::Path,
        key_file: &std::path::Path,
    ) -> Result<Broker, BrokerError> {
        let server = server_config(cert_file, key_file)?;
        let (listener, local_addr) = listen(addr).await?;
        self.tls = Some(TlsListener {
            listener,
            local_addr,
            acceptor: TlsAcceptor::from(server),
        });
        Ok(self)
    }

    /// The TLS listener's address, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().map(|t| t.local_addr)
    }

    /// Decides every CONNECT with `gatekeeper` and holds each connection to the grant it
    /// returns (see [`Gatekeeper`]). Without one, everyone may do anything.
    #[must_use]
    pub fn with_gatekeeper(mut self, gatekeeper: impl Gatekeeper) -> Broker {
        self.gatekeeper = Arc::new(gatekeeper);
        self
    }

    /// The address the broker listens on, with the real port when it was bound to port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle on the broker's counters, valid before, during and after [`run`](Broker::run).
    pub fn stats(&self) -> BrokerStats {
        self.stats.clone()
    }

    /// Serves clients until `shutdown` completes, then closes every connection and returns
    /// once their tasks have finished. Sessions and retained messages live in memory and end
    /// here.
    ///
    /// # Errors
    ///
    /// [`BrokerError::Accept`] if the listener itself breaks. Failures of single connections
    /// are logged at debug level and never end the broker.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), BrokerError> {
        let Broker {
            listener,
            local_addr,
            tls,
            config,
            stats,
            gatekeeper,
        } = self;
        let shared = Arc::new(Shared::new(&config, stats, gatekeeper));
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let admission = Admission {
            permits: Arc::new(Semaphore::new(
                config.max_connections.min(Semaphore::MAX_PERMITS),
            )),
            per_address: Arc::new(PerAddress {
                max: config.max_connections_per_address.max(1),
                open: Mutex::new(HashMap::new()),
            }),
        };
        let plain = accept_loop(
            &listener, local_addr, None, &config, &admission, &shared, &stop, &tasks,
        );
        let secure = async {
            match &tls {
                Some(t) => {
                    let acceptor = Some(&t.acceptor);
                    accept_loop(
                        &t.listener,
                        t.local_addr,
                        acceptor,
                        &config,
                        &admission,
                        &shared,
                        &stop,
                        &tasks,
                    )
                    .await
                }
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            error = plain => Err(error),
            error = secure => Err(error),
            () = sweep_sessions(&shared) => unreachable!("the sweep never ends"),
            () = shutdown => Ok(()),
        };
        // Refuse new connections at once rather than leave them waiting in the backlog.
        drop(listener);
        drop(tls);
        stop.cancel();
        tasks.close();
        tasks.wait().await;
        result
    }
}

/// A listener on `addr` and the address it got (the real port for port 0).
async fn listen(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), BrokerError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BrokerError::bind(addr, source))?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| BrokerError::bind(addr, source))?;
    Ok((listener, local_addr))
}

/// A rustls server configuration (ring provider) from PEM files.
fn server_config(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, BrokerError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert_file)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| BrokerError::Tls(format!("certificate file {}: {e}", cert_file.display())))?;
    if chain.is_empty() {
        return Err(BrokerError::Tls(format!(
            "no certificate in {}",
            cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| BrokerError::Tls(format!("key file {}: {e}", key_file.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BrokerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| BrokerError::Tls(format!("{}: {e}", cert_file.display())))?;
    Ok(Arc::new(config))
}

/// Ages offline sessions once a [`SWEEP_INTERVAL`], forever.
async fn sweep_sessions(shared: &Shared) {
    let mut ticks = tokio::time::interval(SWEEP_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let expired = shared.lock().router.sweep();
        if expired > 0 {
            debug!(expired, "persistent sessions expired");
        }
    }
}

/// Open connections per peer address, bounded by `max_connections_per_address`.
#[derive(Debug)]
struct PerAddress {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerAddress {
    /// Counts a new connection from `ip`, unless `ip` already has `max` open.
    fn open(&self, ip: IpAddr) -> bool {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            return false;
        }
        *count += 1;
        true
    }

    fn close(&self, ip: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&ip);
            }
        }
    }
}

/// The connection limits every listener shares.
struct Admission {
    permits: Arc<Semaphore>,
    per_address: Arc<PerAddress>,
}

/// Connection ids, unique across listeners.
static NEXT_CONN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Accepts connections (TLS first when `tls` is set) until the listener fails for good;
/// returns that failure.
#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    listener: &TcpListener,
    local_addr: SocketAddr,
    tls: Option<&TlsAcceptor>,
    config: &BrokerConfig,
    admission: &Admission,
    shared: &Arc<Shared>,
    stop: &CancellationToken,
    tasks: &TaskTracker,
) -> BrokerError {
    let Admission {
        permits,
        per_address,
    } = admission;
    let mut backoff = Duration::from_millis(10);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff = Duration::from_millis(10);
                accepted
            }
            Err(error) if is_about_one_connection(&error) => continue,
            Err(error) if error.kind() == io::ErrorKind::InvalidInput => {
                return BrokerError::Accept {
                    addr: local_addr,
                    source: error,
                };
            }
            Err(error) => {
                // Typically EMFILE: waiting lets connections close and free descriptors.
                warn!(%error, ?backoff, "accepting a connection failed; retrying");
                sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
        };
        let Ok(permit) = Arc::clone(permits).try_acquire_owned() else {
            warn!(%peer, max_connections = config.max_connections, "refusing a connection: max_connections are open");
            continue;
        };
        if !per_address.open(peer.ip()) {
            debug!(%peer, max = config.max_connections_per_address, "refusing a connection: max_connections_per_address are open from this address");
            shared.stats.connect_refused();
            continue;
        }
        if let Err(error) = stream.set_nodelay(true) {
            warn!(%peer, %error, "could not set TCP_NODELAY; this connection will see delayed acks");
        }
        let conn = ConnId(NEXT_CONN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
        let shared = Arc::clone(shared);
        let close = stop.child_token();
        let per_address = Arc::clone(per_address);
        let tls = tls.cloned();
        tasks.spawn(async move {
            match tls {
                None => serve_connection(stream, peer, conn, shared, close).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(shared.connect_timeout, acceptor.accept(stream));
                    tokio::select! {
                        () = close.cancelled() => {}
                        done = handshake => match done {
                            Ok(Ok(stream)) => serve_connection(stream, peer, conn, shared, close).await,
                            Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
                            Err(_) => debug!(%peer, "no TLS handshake within the connect timeout"),
                        },
                    }
                }
            }
            per_address.close(peer.ip());
            drop(permit);
        });
    }
}

/// Accept errors that concern a connection that already went away, not the listener.
fn is_about_one_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// What every connection task shares.
///
/// The router sits behind a `std::sync::Mutex` rather than in a task of its own: each router
/// call is a short computation with no `.await` inside, so the lock is never held across I/O,
/// and the publishing connection routes its own message without a channel hop and a task
/// wake-up per message, which is the latency this crate exists for.
struct Shared {
    state: Mutex<State>,
    max_packet_bytes: usize,
    max_queued: usize,
    connect_timeout: Duration,
    max_keep_alive_s: u16,
    stats: BrokerStats,
    gatekeeper: Arc<dyn Gatekeeper>,
}

impl Shared {
    fn new(config: &BrokerConfig, stats: BrokerStats, gatekeeper: Arc<dyn Gatekeeper>) -> Self {
        let max_queued = config.max_queued_per_session.max(1);
        Shared {
            state: Mutex::new(State {
                router: Router::new(Limits {
                    queue: QueueBound {
                        messages: max_queued,
                        // A packet the broker accepts always fits an empty queue.
                        bytes: config
                            .max_queued_bytes_per_session
                            .max(config.max_packet_bytes),
                    },
                    inflight_window: INFLIGHT_WINDOW,
                    max_sessions: config.max_sessions.max(1),
                    session_expiry_sweeps: u32::try_from(
                        config.session_expiry_s.div_ceil(SWEEP_INTERVAL.as_secs()),
                    )
                    .unwrap_or(u32::MAX)
                    .max(1),
                    max_retained: config.max_retained,
                    max_retained_bytes: config.max_retained_bytes,
                }),
                outboxes: HashMap::new(),
            }),
            max_packet_bytes: config.max_packet_bytes,
            max_queued,
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            max_keep_alive_s: config.max_keep_alive_s.max(1),
            stats,
            gatekeeper,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Poisoning means a bug panicked mid-route. The state it left is still the best there
        // is, and refusing every later packet would turn one bug into an outage.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The router and the way to reach each connection it knows.
struct State {
    router: Router,
    outboxes: HashMap<ConnId, Outbox>,
}

/// Whether the connection that produced an input stays open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

impl State {
    /// Carries out `effects` of an input from connection `me`: packets for `me` are appended
    /// to `own` (it writes them itself), the rest go to other connections' outboxes.
    fn carry_out(
        &mut self,
        me: ConnId,
        effects: Effects,
        stats: &BrokerStats,
        own: &mut Vec<Packet>,
    ) -> Flow {
        stats.add_dropped(effects.dropped);
        stats.add_denied(effects.denied);
        for (to, packet) in effects.sends {
            if to == me {
                own.push(packet);
            } else if let Some(outbox) = self.outboxes.get(&to) {
                outbox.post(packet, stats);
            }
            // No outbox: that connection is ending; its QoS 1 messages stay in its session.
        }
        let mut flow = Flow::Continue;
        for conn in effects.closes {
            if conn == me {
                flow = Flow::Close;
            } else if let Some(outbox) = self.outboxes.get(&conn) {
                outbox.close.cancel();
            }
        }
        flow
    }
}

/// How other connections reach one connection's task.
struct Outbox {
    /// QoS 0 publishes. Bounded, and a full queue drops the message: a slow client must not
    /// hold up whoever published.
    at_most_once: mpsc::Sender<Packet>,
    /// QoS 1 publishes, already bounded by the router's inflight window.
    reliable: mpsc::UnboundedSender<Packet>,
    /// Cancelled to close the connection: takeover by a newer one, or shutdown.
    close: CancellationToken,
}

impl Outbox {
    fn post(&self, packet: Packet, stats: &BrokerStats) {
        let is_at_most_once = matches!(&packet, Packet::Publish(p) if p.qos == QoS::AtMostOnce);
        if is_at_most_once {
            if let Err(mpsc::error::TrySendError::Full(_)) = self.at_most_once.try_send(packet) {
                stats.add_dropped(1);
            }
        } else {
            // Fails only when the connection is ending; the message stays in flight in its
            // session and is redelivered if the session resumes.
            let _ = self.reliable.send(packet);
        }
    }
}

/// What woke a connection's loop.
enum Step {
    Close(CloseReason),
    Read(io::Result<usize>),
    Wrote(io::Result<usize>),
    Flushed(io::Result<()>),
    Deliver(Packet),
}

/// Why a connection ended, for the debug log.
#[derive(Debug, thiserror::Error)]
enum CloseReason {
    #[error("client sent DISCONNECT")]
    Disconnected,
    #[error("peer closed the socket")]
    PeerClosed,
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    #[error("no CONNECT within the connect timeout")]
    ConnectTimeout,
    #[error("silent for 1.5 times its keep-alive")]
    KeepAliveExpired,
    #[error("malformed or oversized packet: {0}")]
    Malformed(mqttbytes::Error),
    #[error("first packet was not CONNECT")]
    NotConnect,
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("CONNECT refused")]
    Refused,
    #[error("taken over by a newer connection, or the broker is shutting down")]
    Cancelled,
}

/// A connection's byte stream: plain TCP, or TLS over it.
trait Duplex: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Reader<'a>: AsyncRead + Unpin
    where
        Self: 'a;
    type Writer<'a>: AsyncWrite + Unpin
    where
        Self: 'a;
    /// Whether a write may leave bytes buffered until a flush (TLS records).
    const BUFFERED: bool;
    /// Halves that can read and write at the same time.
    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);
}

impl Duplex for TcpStream {
    type Reader<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Writer<'a> = tokio::net::tcp::WriteHalf<'a>;
    const BUFFERED: bool = false;
    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        self.split()
    }
}

impl Duplex for TlsStream<TcpStream> {
    type Reader<'a> = tokio::io::ReadHalf<&'a mut Self>;
    type Writer<'a> = tokio::io::WriteHalf<&'a mut Self>;
    const BUFFERED: bool = true;
    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        tokio::io::split(self)
    }
}

async fn serve_connection<S: Duplex>(
    stream: S,
    peer: SocketAddr,
    conn: ConnId,
    shared: Arc<Shared>,
    close: CancellationToken,
) {
    shared.stats.connection_opened();
    let (at_most_once, at_most_once_rx) = mpsc::channel(shared.max_queued);
    let (reliable, reliable_rx) = mpsc::unbounded_channel();
    let outbox = Outbox {
        at_most_once,
        reliable,
        close: close.clone(),
    };
    let mut connection = Connection {
        conn,
        peer,
        stream,
        unflushed: false,
        read_buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
        write_buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
        shared: Arc::clone(&shared),
        close,
        at_most_once_rx,
        reliable_rx,
    };
    let reason = connection.run(outbox).await;
    debug!(%peer, conn = conn.0, %reason, "connection closed");
    // Best effort: the peer may already be gone.
    let _ = connection.stream.shutdown().await;

    let mut state = shared.lock();
    state.outboxes.remove(&conn);
    let effects = state.router.connection_lost(conn);
    state.carry_out(conn, effects, &shared.stats, &mut Vec::new());
    drop(state);
    shared.stats.connection_closed();
}

/// One client's socket, its buffers and its inbound queues.
struct Connection<S> {
    conn: ConnId,
    peer: SocketAddr,
    stream: S,
    /// Bytes were written since the last flush (TLS only).
    unflushed: bool,
    read_buf: BytesMut,
    /// Encoded packets not yet written; each write offers all of it to the socket at once.
    write_buf: BytesMut,
    shared: Arc<Shared>,
    close: CancellationToken,
    at_most_once_rx: mpsc::Receiver<Packet>,
    reliable_rx: mpsc::UnboundedReceiver<Packet>,
}

impl<S: Duplex> Connection<S> {
    async fn run(&mut self, outbox: Outbox) -> CloseReason {
        match self.handshake(outbox).await {
            Ok(keep_alive) => self.serve(keep_alive).await,
            Err(reason) => reason,
        }
    }

    /// Reads CONNECT and binds the connection to its session. Returns the keep-alive limit:
    /// 1.5 times what the client asked for, capped by `max_keep_alive_s` (which also applies
    /// when the client asked for none).
    async fn handshake(&mut self, outbox: Outbox) -> Result<Duration, CloseReason> {
        let deadline = Instant::now() + self.shared.connect_timeout;
        loop {
            match mqttbytes::check(self.read_buf.iter(), self.shared.max_packet_bytes) {
                Ok(_) => break,
                Err(mqttbytes::Error::InsufficientBytes(_)) => {
                    self.make_room_to_read();
                    tokio::select! {
                        () = self.close.cancelled() => return Err(CloseReason::Cancelled),
                        () = sleep_until(deadline) => return Err(CloseReason::ConnectTimeout),
                        read = self.stream.read_buf(&mut self.read_buf) => {
                            if read? == 0 {
                                return Err(CloseReason::PeerClosed);
                            }
                        }
                    }
                }
                Err(error) => return Err(CloseReason::Malformed(error)),
            }
        }

        if let Some(protocol) = declared_protocol(&self.read_buf)
            && protocol != (b"MQTT".as_slice(), 4)
        {
            let refusal = ConnAck::new(ConnectReturnCode::RefusedProtocolVersion, false);
            self.encode([Packet::ConnAck(refusal)]);
            self.flush_before_close().await;
            return Err(CloseReason::Refused);
        }
        let connect = match Packet::read(&mut self.read_buf, self.shared.max_packet_bytes) {
            Ok(Packet::Connect(connect)) => connect,
            Ok(_) => return Err(CloseReason::NotConnect),
            Err(error) => return Err(CloseReason::Malformed(error)),
        };
        let granted = match connect.keep_alive {
            0 => self.shared.max_keep_alive_s,
            asked => asked.min(self.shared.max_keep_alive_s),
        };
        let keep_alive = Duration::from_millis(u64::from(granted) * KEEP_ALIVE_GRACE_MS_PER_S);

        // Off the async workers: a gatekeeper may hash a password or check a signature.
        let admitted = {
            let gatekeeper = Arc::clone(&self.shared.gatekeeper);
            let client_id = connect.client_id.clone();
            let login = connect.login.clone();
            let peer = self.peer;
            tokio::task::spawn_blocking(move || {
                gatekeeper.admit(&Credentials {
                    client_id: &client_id,
                    username: login.as_ref().map(|l| l.username.as_str()),
                    password: login
                        .as_ref()
                        .map(|l| l.password.as_str())
                        .filter(|p| !p.is_empty()),
                    peer,
                    now_ms: unix_ms(),
                })
            })
        };
        let admitted = tokio::select! {
            () = self.close.cancelled() => return Err(CloseReason::Cancelled),
            admitted = admitted => admitted.unwrap_or_else(|_| {
                Err(Refusal::NotAuthorized("the gatekeeper failed".into()))
            }),
        };
        let grant = match admitted {
            Ok(grant) => Arc::new(grant),
            Err(refusal) => {
                let (code, why) = match refusal {
                    Refusal::BadCredentials(why) => (ConnectReturnCode::BadUserNamePassword, why),
                    Refusal::NotAuthorized(why) => (ConnectReturnCode::NotAuthorized, why),
                };
                info!(peer = %self.peer, client_id = %connect.client_id, reason = %why, "refused a connection");
                self.shared.stats.connect_refused();
                self.encode([Packet::ConnAck(ConnAck::new(code, false))]);
                self.flush_before_close().await;
                return Err(CloseReason::Refused);
            }
        };
        let principal = grant.principal.clone();

        let mut own = Vec::new();
        let flow = {
            let mut state = self.shared.lock();
            state.outboxes.insert(self.conn, outbox);
            let effects = state.router.connect(self.conn, connect, grant)?;
            state.carry_out(self.conn, effects, &self.shared.stats, &mut own)
        };
        let is_refused = flow == Flow::Close;
        self.encode(own);
        if is_refused {
            info!(peer = %self.peer, %principal, "refused a connection by the session rules: its client id belongs to another principal, its will is outside its grant, or it is an unnamed persistent session");
            self.shared.stats.connect_refused();
            self.flush_before_close().await;
            return Err(CloseReason::Refused);
        }
        Ok(keep_alive)
    }

    /// Moves packets both ways until the connection ends.
    ///
    /// Reading goes on while a write is pending. A client that uploads a large message while
    /// the broker sends it one would otherwise wait for the broker to read while the broker
    /// waits for it to read, until a timeout broke the connection.
    async fn serve(&mut self, keep_alive: Duration) -> CloseReason {
        // CONNECT may have arrived together with the packets that followed it.
        if !self.read_buf.is_empty()
            && let Some(reason) = self.process_incoming()
        {
            self.flush_before_close().await;
            return reason;
        }
        let idle = sleep_until(Instant::now() + keep_alive);
        tokio::pin!(idle);
        // Replies to a client that sends without reading pile up here; past this much
        // unwritten output the broker stops reading from it until it catches up.
        let read_pause_bytes = self
            .shared
            .max_packet_bytes
            .saturating_add(2 * WRITE_BATCH_BYTES);
        loop {
            self.make_room_to_read();
            let may_read = self.write_buf.len() < read_pause_bytes;
            let may_take = self.write_buf.len() < WRITE_BATCH_BYTES;
            let step = {
                let flush = self.unflushed && self.write_buf.is_empty();
                let (mut reader, mut writer) = self.stream.halves();
                tokio::select! {
                    () = self.close.cancelled() => Step::Close(CloseReason::Cancelled),
                    // Only reads reset this, so a client that stops reading while it keeps
                    // pinging is not dropped, but one that goes silent is.
                    () = &mut idle => Step::Close(CloseReason::KeepAliveExpired),
                    read = reader.read_buf(&mut self.read_buf), if may_read => Step::Read(read),
                    // Write what is queued; once it is all out, flush what TLS buffered.
                    step = async {
                        if self.write_buf.is_empty() {
                            Step::Flushed(writer.flush().await)
                        } else {
                            Step::Wrote(writer.write(&self.write_buf).await)
                        }
                    }, if !self.write_buf.is_empty() || flush => step,
                    Some(packet) = self.reliable_rx.recv(), if may_take => Step::Deliver(packet),
                    Some(packet) = self.at_most_once_rx.recv(), if may_take => Step::Deliver(packet),
                }
            };
            match step {
                Step::Close(reason) => return reason,
                Step::Read(Ok(0)) => return CloseReason::PeerClosed,
                Step::Read(Ok(_)) => {
                    // Any bytes count as activity, so a client busy uploading a large packet
                    // is not cut off for failing to ping meanwhile.
                    idle.as_mut().reset(Instant::now() + keep_alive);
                    if let Some(reason) = self.process_incoming() {
                        self.flush_before_close().await;
                        return reason;
                    }
                    self.drain_outboxes();
                }
                Step::Wrote(Ok(0)) => return CloseReason::Io(io::ErrorKind::WriteZero.into()),
                Step::Wrote(Ok(written)) => {
                    self.write_buf.advance(written);
                    self.unflushed = S::BUFFERED;
                }
                Step::Flushed(Ok(())) => self.unflushed = false,
                Step::Read(Err(error)) | Step::Wrote(Err(error)) | Step::Flushed(Err(error)) => {
                    return CloseReason::Io(error);
                }
                Step::Deliver(packet) => {
                    self.encode([packet]);
                    self.drain_outboxes();
                }
            }
        }
    }

    /// Decodes every complete packet in the read buffer and routes them under one lock.
    /// Returns why the connection must close, if it must.
    fn process_incoming(&mut self) -> Option<CloseReason> {
        let mut packets = Vec::new();
        let malformed = loop {
            match Packet::read(&mut self.read_buf, self.shared.max_packet_bytes) {
                Ok(Packet::Publish(mut publish)) => {
                    // The decoded payload is a view into the read buffer and would keep the
                    // whole buffer allocated for as long as the message is retained or queued
                    // (up to `max_queued_per_session` of them). A copy holds only itself.
                    publish.payload = Bytes::copy_from_slice(&publish.payload);
                    packets.push(Packet::Publish(publish));
                }
                Ok(packet) => packets.push(packet),
                Err(mqttbytes::Error::InsufficientBytes(_)) => break None,
                Err(error) => break Some(CloseReason::Malformed(error)),
            }
        };
        if packets.is_empty() {
            return malformed;
        }

        let stats = &self.shared.stats;
        let mut own = Vec::new();
        let mut ended = None;
        {
            let mut state = self.shared.lock();
            for packet in packets {
                if matches!(packet, Packet::Publish(_)) {
                    stats.publish_received();
                }
                match state.router.handle(self.conn, packet) {
                    Ok(effects) => {
                        if state.carry_out(self.conn, effects, stats, &mut own) == Flow::Close {
                            ended = Some(CloseReason::Disconnected);
                            break;
                        }
                    }
                    Err(error) => {
                        ended = Some(CloseReason::Protocol(error));
                        break;
                    }
                }
            }
        }
        self.encode(own);
        ended.or(malformed)
    }

    /// Grows the read buffer with the data actually received, at least doubling it, rather
    /// than to the size a packet header announces: a peer could announce `max_packet_bytes`
    /// on every connection and send nothing more.
    fn make_room_to_read(&mut self) {
        self.read_buf
            .reserve(self.read_buf.len().max(READ_CHUNK_BYTES));
    }

    /// Moves whatever other connections queued for this one into the write buffer, so one
    /// write carries them all.
    fn drain_outboxes(&mut self) {
        while self.write_buf.len() < WRITE_BATCH_BYTES {
            let packet = match self.reliable_rx.try_recv() {
                Ok(packet) => packet,
                Err(_) => match self.at_most_once_rx.try_recv() {
                    Ok(packet) => packet,
                    Err(_) => return,
                },
            };
            self.encode([packet]);
        }
    }

    fn encode(&mut self, packets: impl IntoIterator<Item = Packet>) {
        for packet in packets {
            let mark = self.write_buf.len();
            // The size limit applies to what clients send; what the broker forwards was
            // already checked on the way in.
            match packet.write(&mut self.write_buf, usize::MAX) {
                Ok(_) => {
                    if matches!(packet, Packet::Publish(_)) {
                        self.shared.stats.publish_sent();
                    }
                }
                Err(error) => {
                    // `write` may fail after emitting part of the packet; cut that part off
                    // so the stream stays well-formed.
                    self.write_buf.truncate(mark);
                    debug!(conn = self.conn.0, %error, "could not encode a packet; skipped it");
                }
            }
        }
    }

    /// Writes what is buffered (a refusal, say) before closing, without waiting on a client
    /// that does not read.
    async fn flush_before_close(&mut self) {
        if self.write_buf.is_empty() {
            return;
        }
        tokio::select! {
            () = self.close.cancelled() => {}
            () = sleep(self.shared.connect_timeout) => {}
            _ = async {
                self.stream.write_all(&self.write_buf).await?;
                self.stream.flush().await
            } => {}
        }
        self.write_buf.clear();
    }
}

/// The protocol name and level a complete CONNECT frame declares, or `None` for any other
/// frame. Read before decoding so that a client of another MQTT version gets CONNACK 0x01
/// (MQTT-3.1.2-2) rather than a bare close: the decoder rejects unknown levels with an error
/// and would misread the extra fields of MQTT 5.
fn declared_protocol(frame: &[u8]) -> Option<(&[u8], u8)> {
    let (&first, rest) = frame.split_first()?;
    if first >> 4 != 1 {
        return None;
    }
    // Remaining length: one to four bytes, the high bit set on all but the last.
    let length_bytes = rest.iter().take(4).position(|byte| byte & 0x80 == 0)? + 1;
    let variable_header = rest.get(length_bytes..)?;
    let name_len = usize::from(u16::from_be_bytes([
        *variable_header.first()?,
        *variable_header.get(1)?,
    ]));
    let name = variable_header.get(2..2 + name_len)?;
    let level = *variable_header.get(2 + name_len)?;
    Some((name, level))
}

/// Wall-clock time in milliseconds since the Unix epoch, for gatekeepers.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_of_a_connect_frame_is_read_without_decoding_it() {
        // MQTT 3.1.1 CONNECT, client id "c", keep-alive 60.
        let v311 = [
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'c',
        ];
        assert_eq!(declared_protocol(&v311), Some((b"MQTT".as_slice(), 4)));
        // MQTT 3.1 CONNECT.
        let v31 = [
            0x10, 14, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 60, 0, 0,
        ];
        assert_eq!(declared_protocol(&v31), Some((b"MQIsdp".as_slice(), 3)));
        // Not a CONNECT: PINGREQ.
        assert_eq!(declared_protocol(&[0xC0, 0]), None);
        // Truncated.
        assert_eq!(declared_protocol(&[0x10, 13, 0, 4, b'M']), None);
        assert_eq!(
            declared_protocol(&[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]),
            None
        );
    }
}
