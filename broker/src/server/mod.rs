//! Sockets: the listeners, the accept loop and one task per connection.
//!
//! Every protocol decision belongs to the [`Router`]; this module frames bytes into packets,
//! hands them over, carries out the [`Effects`] that come back, and owns every timeout.
//!
//! # Layout
//!
//! This file holds the listeners, the accept loop with its per-address limits, and the state
//! the connections share; `connection.rs` is one connection's task: the handshake, then
//! reading, routing and writing until it closes.

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
#[cfg(unix)]
use tokio::net::{UnixListener, UnixStream};
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

mod connection;

use connection::{Duplex, serve_connection};

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
    /// A listener on a Unix socket file, for clients on this machine.
    #[cfg(unix)]
    local: Option<LocalListener>,
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
            #[cfg(unix)]
            local: None,
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

    /// Also listens on a Unix socket at `path`, for clients on this machine: a connection
    /// there skips the TCP stack, which makes each packet cheaper for both ends. A file left
    /// at `path` by a process that died is replaced; the file is removed when [`run`] ends.
    ///
    /// The file is made readable and writable by its owner only (0600), so only processes of
    /// the user running the broker (and root) can connect. The gatekeeper sees them as coming
    /// from `127.0.0.1` port 0. Connections count towards `max_connections`, and towards
    /// `max_connections_per_address` as `127.0.0.1`.
    ///
    /// [`run`]: Broker::run
    ///
    /// # Errors
    /// [`BrokerError::Socket`] when another process listens on `path` (kind `AddrInUse`), or
    /// the socket cannot be bound there (a path longer than the system's limit of about 100
    /// bytes, a directory that does not exist, no permission).
    #[cfg(unix)]
    pub fn listen_on_unix_socket(&mut self, path: &std::path::Path) -> Result<(), BrokerError> {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let socket_error = |source| BrokerError::Socket {
            path: path.to_path_buf(),
            source,
        };
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(socket_error(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another process listens on it (a coordinator on the same data directory?)",
            )));
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(socket_error(source)),
        }
        let listener = UnixListener::bind(path).map_err(socket_error)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(socket_error)?;
        let made = std::fs::metadata(path).map_err(socket_error)?;
        self.local = Some(LocalListener {
            listener,
            path: path.to_path_buf(),
            file: (made.dev(), made.ino()),
        });
        Ok(())
    }

    /// The Unix socket's path, if there is one.
    #[cfg(unix)]
    pub fn unix_path(&self) -> Option<&std::path::Path> {
        self.local.as_ref().map(|l| l.path.as_path())
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
            local_addr: _,
            tls,
            #[cfg(unix)]
            local,
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
        let accepting = Accepting {
            config: &config,
            admission: &admission,
            shared: &shared,
            stop: &stop,
            tasks: &tasks,
        };
        let plain = accepting.serve(&listener, None);
        let secure = async {
            match &tls {
                Some(t) => accepting.serve(&t.listener, Some(&t.acceptor)).await,
                None => std::future::pending().await,
            }
        };
        #[cfg(unix)]
        let on_this_machine = async {
            match &local {
                Some(l) => accepting.serve(&l.listener, None).await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let on_this_machine = std::future::pending::<BrokerError>();
        let result = tokio::select! {
            error = plain => Err(error),
            error = secure => Err(error),
            error = on_this_machine => Err(error),
            () = sweep_sessions(&shared) => unreachable!("the sweep never ends"),
            () = shutdown => Ok(()),
        };
        // Refuse new connections at once rather than leave them waiting in the backlog.
        drop(listener);
        drop(tls);
        #[cfg(unix)]
        drop(local);
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

/// A listening socket: TCP, or a Unix socket file.
trait Listener {
    type Stream: Duplex;
    /// The next connection and the address it presents to the gatekeeper.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
    /// This listener broke for good.
    fn broken(&self, source: io::Error) -> BrokerError;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        if let Err(error) = stream.set_nodelay(true) {
            warn!(%peer, %error, "could not set TCP_NODELAY; this connection will see delayed acks");
        }
        Ok((stream, peer))
    }
    fn broken(&self, source: io::Error) -> BrokerError {
        let addr = self
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        BrokerError::Accept { addr, source }
    }
}

/// A Unix socket listener and the file it made, removed when it is dropped unless another
/// file has taken its place.
#[cfg(unix)]
struct LocalListener {
    listener: UnixListener,
    path: std::path::PathBuf,
    /// The file's device and inode.
    file: (u64, u64),
}

#[cfg(unix)]
impl Drop for LocalListener {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        let still_ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file);
        if still_ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Where connections over a Unix socket appear to come from (see
/// [`Broker::listen_on_unix_socket`]).
#[cfg(unix)]
const ON_THIS_MACHINE: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

#[cfg(unix)]
impl Listener for UnixListener {
    type Stream = UnixStream;
    async fn accept(&self) -> io::Result<(UnixStream, SocketAddr)> {
        let (stream, _) = UnixListener::accept(self).await?;
        Ok((stream, ON_THIS_MACHINE))
    }
    fn broken(&self, source: io::Error) -> BrokerError {
        let path = self
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(std::path::Path::to_path_buf))
            .unwrap_or_default();
        BrokerError::Socket { path, source }
    }
}

/// What every accept loop shares.
struct Accepting<'a> {
    config: &'a BrokerConfig,
    admission: &'a Admission,
    shared: &'a Arc<Shared>,
    stop: &'a CancellationToken,
    tasks: &'a TaskTracker,
}

impl Accepting<'_> {
    /// Accepts connections (TLS first when `tls` is set) until the listener fails for good;
    /// returns that failure.
    async fn serve<L>(&self, listener: &L, tls: Option<&TlsAcceptor>) -> BrokerError
    where
        L: Listener,
        TlsStream<L::Stream>: Duplex,
    {
        let Admission {
            permits,
            per_address,
        } = self.admission;
        let mut backoff = Duration::from_millis(10);
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => {
                    backoff = Duration::from_millis(10);
                    accepted
                }
                Err(error) if is_about_one_connection(&error) => continue,
                Err(error) if error.kind() == io::ErrorKind::InvalidInput => {
                    return listener.broken(error);
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
                warn!(%peer, max_connections = self.config.max_connections, "refusing a connection: max_connections are open");
                continue;
            };
            if !per_address.open(peer.ip()) {
                debug!(%peer, max = self.config.max_connections_per_address, "refusing a connection: max_connections_per_address are open from this address");
                self.shared.stats.connect_refused();
                continue;
            }
            let conn = ConnId(NEXT_CONN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
            let shared = Arc::clone(self.shared);
            let close = self.stop.child_token();
            let per_address = Arc::clone(per_address);
            let tls = tls.cloned();
            self.tasks.spawn(async move {
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

/// Wall-clock time in milliseconds since the Unix epoch, for gatekeepers.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
