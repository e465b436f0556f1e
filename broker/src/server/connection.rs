//! One connection's task: the CONNECT handshake (protocol level, gatekeeper, session), then a
//! loop that reads frames into packets for the [`Router`], writes what it sends back in batches,
//! and enforces the keep-alive, until the connection closes.

use super::*;

/// What woke a connection's loop.
pub(super) enum Step {
    Close(CloseReason),
    Read(io::Result<usize>),
    Wrote(io::Result<usize>),
    Flushed(io::Result<()>),
    Deliver(Packet),
}

/// Why a connection ended, for the debug log.
#[derive(Debug, thiserror::Error)]
pub(super) enum CloseReason {
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

/// A connection's byte stream: plain TCP, TLS over it, or a Unix socket.
pub(super) trait Duplex: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Reader<'a>: AsyncRead + Unpin + Send
    where
        Self: 'a;
    type Writer<'a>: AsyncWrite + Unpin + Send
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

#[cfg(unix)]
impl Duplex for UnixStream {
    type Reader<'a> = tokio::net::unix::ReadHalf<'a>;
    type Writer<'a> = tokio::net::unix::WriteHalf<'a>;
    const BUFFERED: bool = false;
    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        self.split()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Duplex for TlsStream<S> {
    type Reader<'a> = tokio::io::ReadHalf<&'a mut Self>;
    type Writer<'a> = tokio::io::WriteHalf<&'a mut Self>;
    const BUFFERED: bool = true;
    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        tokio::io::split(self)
    }
}

pub(super) async fn serve_connection<S: Duplex>(
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
pub(super) struct Connection<S> {
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
pub(super) fn declared_protocol(frame: &[u8]) -> Option<(&[u8], u8)> {
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
