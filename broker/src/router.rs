//! The broker's state machine: sessions, subscriptions, retained messages and routing.
//!
//! It does no I/O and reads no clock. `server` feeds it one decoded packet at a time, tagged
//! with the connection it came from, and carries out the [`Effects`] it returns: packets to
//! write to connections and connections to close. Every routing rule is therefore tested
//! below without a socket.

use std::collections::HashMap;
use std::sync::Arc;

use rumqttc::{
    ConnAck, ConnectReturnCode, LastWill, Packet, Protocol, PubAck, PubComp, PubRec, Publish, QoS,
    SubAck, Subscribe, SubscribeReasonCode, UnsubAck, Unsubscribe,
};

use crate::access::Grant;
use crate::session::{ClientId, ConnId, Lifetime, QueueBound, Session};
use crate::topic::{self, FilterSpec};
use crate::topic_tree::FilterTree;

/// Unacknowledged QoS 1 messages per session before further ones wait in its queue. Bounds
/// how much one slow client can have buffered in its connection at a time.
pub(crate) const INFLIGHT_WINDOW: usize = 100;

/// The bounds the router enforces.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// What one session's queue holds at most.
    pub queue: QueueBound,
    /// At most 65,534, so a free packet id always exists.
    pub inflight_window: usize,
    /// Sessions held at once, online or not; a CONNECT that would create one more is refused.
    pub max_sessions: usize,
    /// A persistent session whose client stayed away for this many consecutive
    /// [`Router::sweep`]s ends.
    pub session_expiry_sweeps: u32,
    /// Retained messages held at once, and their payload bytes; beyond either, a new retained
    /// topic is routed but not stored (replacing or clearing a stored one always works).
    pub max_retained: usize,
    pub max_retained_bytes: usize,
}

/// What the server must do after the router handled an input.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Effects {
    /// Packets to write, in this order within each connection.
    pub sends: Vec<(ConnId, Packet)>,
    /// Connections to close: after writing their `sends` when the connection is the one that
    /// produced the input, at once for any other (a taken-over connection).
    pub closes: Vec<ConnId>,
    /// QoS 1 messages dropped because a session's queue was full.
    pub dropped: u64,
    /// PUBLISH and SUBSCRIBE requests refused by the client's grant.
    pub denied: u64,
}

impl Effects {
    fn send(&mut self, to: ConnId, packet: Packet) {
        self.sends.push((to, packet));
    }
}

/// A peer broke the protocol; the server closes its connection (and publishes its will).
#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum ProtocolError {
    /// CONNECT arrived on a connection that had already sent one (MQTT-3.1.0-2).
    #[error("second CONNECT on one connection")]
    SecondConnect,
    /// A packet arrived for a connection the router does not know, such as one taken over.
    #[error("connection is not bound to a session")]
    NotConnected,
    /// A PUBLISH or will topic was empty or held a wildcard.
    #[error("invalid topic name {0:?}")]
    InvalidTopic(String),
    /// A client sent a packet only a server may send.
    #[error("client sent {0}, which only a server sends")]
    ServerOnlyPacket(&'static str),
}

/// Why a connection stopped being bound to its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The client sent DISCONNECT: its will is discarded.
    Disconnect,
    /// Anything else (EOF, I/O error, keep-alive, protocol error, shutdown): its will is published.
    Lost,
}

/// Subscribers of one filter: plain ones, and shared groups that take turns.
#[derive(Debug, Default)]
struct Subscribers {
    clients: HashMap<ClientId, QoS>,
    groups: HashMap<String, SharedGroup>,
}

impl Subscribers {
    fn is_empty(&self) -> bool {
        self.clients.is_empty() && self.groups.is_empty()
    }
}

/// Members of one `$share/<group>/<filter>` subscription, served round robin.
#[derive(Debug, Default)]
struct SharedGroup {
    members: Vec<(ClientId, QoS)>,
    /// Index of the member whose turn is next.
    next: usize,
}

impl SharedGroup {
    fn join(&mut self, client: &ClientId, qos: QoS) {
        match self.members.iter_mut().find(|(member, _)| member == client) {
            Some((_, granted)) => *granted = qos,
            None => self.members.push((client.clone(), qos)),
        }
    }

    fn leave(&mut self, client: &ClientId) {
        if let Some(index) = self.members.iter().position(|(member, _)| member == client) {
            self.members.remove(index);
            if index < self.next {
                self.next -= 1;
            }
        }
    }

    /// The member whose turn it is, skipping offline members while any member is online; with
    /// none online, persistent members take turns queueing the message.
    fn pick(&mut self, is_online: impl Fn(&ClientId) -> bool) -> Option<(ClientId, QoS)> {
        let count = self.members.len();
        if count == 0 {
            return None;
        }
        let start = self.next % count;
        let chosen = (0..count)
            .map(|offset| (start + offset) % count)
            .find(|&index| is_online(&self.members[index].0))
            .unwrap_or(start);
        self.next = (chosen + 1) % count;
        Some(self.members[chosen].clone())
    }
}

/// Sessions, subscriptions and retained messages of one broker.
#[derive(Debug)]
pub(crate) struct Router {
    limits: Limits,
    sessions: HashMap<ClientId, Session>,
    /// The session each live connection is bound to, from CONNECT until the connection ends
    /// or is taken over.
    connections: HashMap<ConnId, ClientId>,
    /// Keyed by filter without any `$share/<group>/` prefix.
    filters: HashMap<String, Subscribers>,
    /// The keys of `filters`, arranged for matching.
    tree: FilterTree,
    /// Last retained message per topic, stored with `retain` set and no packet id.
    retained: HashMap<String, Publish>,
    /// Payload bytes of `retained`.
    retained_bytes: usize,
    /// Counter behind ids assigned to clients that connect with an empty id.
    assigned_ids: u64,
}

impl Router {
    pub(crate) fn new(limits: Limits) -> Self {
        Router {
            limits: Limits {
                inflight_window: limits.inflight_window.clamp(1, usize::from(u16::MAX - 1)),
                ..limits
            },
            sessions: HashMap::new(),
            connections: HashMap::new(),
            filters: HashMap::new(),
            tree: FilterTree::default(),
            retained: HashMap::new(),
            retained_bytes: 0,
            assigned_ids: 0,
        }
    }

    /// Handles the CONNECT that opened `conn`, admitted with `grant`: answers with CONNACK and
    /// binds `conn` to its session, taking the session over from any connection of the same
    /// principal that holds it. A session that belongs to another principal, or a will the
    /// grant does not allow, refuses the CONNECT (return code 5).
    ///
    /// # Errors
    ///
    /// [`ProtocolError::InvalidTopic`] for an invalid will topic; no CONNACK is sent.
    pub(crate) fn connect(
        &mut self,
        conn: ConnId,
        connect: rumqttc::Connect,
        grant: Arc<Grant>,
    ) -> Result<Effects, ProtocolError> {
        let mut effects = Effects::default();
        if connect.protocol != Protocol::V4 {
            return Ok(refuse(conn, ConnectReturnCode::RefusedProtocolVersion));
        }
        if let Some(will) = &connect.last_will
            && !topic::is_valid_topic_name(&will.topic)
        {
            return Err(ProtocolError::InvalidTopic(will.topic.clone()));
        }
        if let Some(will) = &connect.last_will
            && !grant.may_publish(&will.topic)
        {
            return Ok(refuse(conn, ConnectReturnCode::NotAuthorized));
        }
        let lifetime = Lifetime::from_clean_session(connect.clean_session);
        let client_id = if connect.client_id.is_empty() {
            // MQTT-3.1.3-8: only a session that ends with the connection may go unnamed.
            if lifetime == Lifetime::Persistent {
                return Ok(refuse(conn, ConnectReturnCode::BadClientId));
            }
            self.assign_client_id()
        } else {
            ClientId::from(connect.client_id.as_str())
        };
        if self
            .sessions
            .get(&client_id)
            .is_some_and(|session| session.grant.principal != grant.principal)
        {
            return Ok(refuse(conn, ConnectReturnCode::NotAuthorized));
        }

        if !self.sessions.contains_key(&client_id)
            && self.sessions.len() >= self.limits.max_sessions
        {
            return Ok(refuse(conn, ConnectReturnCode::ServiceUnavailable));
        }

        let mut orphaned_will = None;
        let (mut session, session_present) = match self.sessions.remove(&client_id) {
            None => (Session::new(conn, lifetime, grant.clone()), false),
            Some(mut previous) => {
                // MQTT-3.1.4-2: the newer connection wins. The older one did not DISCONNECT,
                // so its will is published.
                if let Some(old) = previous.connection.take() {
                    self.connections.remove(&old);
                    effects.closes.push(old);
                    orphaned_will = previous.will.take();
                }
                if previous.lifetime == Lifetime::Connection || lifetime == Lifetime::Connection {
                    self.unindex_all(&client_id, &previous);
                    (Session::new(conn, lifetime, grant.clone()), false)
                } else {
                    previous.connection = Some(conn);
                    (previous, true)
                }
            }
        };
        session.lifetime = lifetime;
        session.will = connect.last_will;
        session.grant = grant;
        session.idle_sweeps = 0;

        effects.send(
            conn,
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, session_present)),
        );
        for publish in session.outbound.redeliver() {
            effects.send(conn, Packet::Publish(publish));
        }
        for publish in session.outbound.release(self.limits.inflight_window) {
            effects.send(conn, Packet::Publish(publish));
        }
        self.connections.insert(conn, client_id.clone());
        self.sessions.insert(client_id, session);
        if let Some(will) = orphaned_will {
            self.route(will_message(will), &mut effects);
        }
        Ok(effects)
    }

    /// Handles a packet that followed CONNECT on `conn`.
    ///
    /// # Errors
    ///
    /// A [`ProtocolError`] when the packet breaks the protocol; the server then closes the
    /// connection and calls [`Router::connection_lost`].
    pub(crate) fn handle(
        &mut self,
        conn: ConnId,
        packet: Packet,
    ) -> Result<Effects, ProtocolError> {
        let client_id = self
            .connections
            .get(&conn)
            .cloned()
            .ok_or(ProtocolError::NotConnected)?;
        let mut effects = Effects::default();
        match packet {
            Packet::Publish(publish) => self.publish(conn, &client_id, publish, &mut effects)?,
            Packet::PubAck(ack) => {
                if let Some(session) = self.sessions.get_mut(&client_id) {
                    session.outbound.acknowledge(ack.pkid);
                    for publish in session.outbound.release(self.limits.inflight_window) {
                        effects.send(conn, Packet::Publish(publish));
                    }
                }
            }
            Packet::PubRel(release) => {
                if let Some(session) = self.sessions.get_mut(&client_id) {
                    session.awaiting_pubrel.remove(&release.pkid);
                }
                // Answered even for an unknown id: the PUBCOMP may have been lost (MQTT-4.3.3-2).
                effects.send(conn, Packet::PubComp(PubComp::new(release.pkid)));
            }
            // The broker never sends QoS 2, so these acknowledge nothing; ignoring them is
            // kinder to a confused client than closing on it.
            Packet::PubRec(_) | Packet::PubComp(_) => {}
            Packet::Subscribe(subscribe) => {
                self.subscribe(conn, &client_id, subscribe, &mut effects);
            }
            Packet::Unsubscribe(unsubscribe) => {
                self.unsubscribe(conn, &client_id, unsubscribe, &mut effects);
            }
            Packet::PingReq => effects.send(conn, Packet::PingResp),
            Packet::Disconnect => {
                self.end(conn, Ending::Disconnect, &mut effects);
                effects.closes.push(conn);
            }
            Packet::Connect(_) => return Err(ProtocolError::SecondConnect),
            Packet::ConnAck(_) => return Err(ProtocolError::ServerOnlyPacket("CONNACK")),
            Packet::SubAck(_) => return Err(ProtocolError::ServerOnlyPacket("SUBACK")),
            Packet::UnsubAck(_) => return Err(ProtocolError::ServerOnlyPacket("UNSUBACK")),
            Packet::PingResp => return Err(ProtocolError::ServerOnlyPacket("PINGRESP")),
        }
        Ok(effects)
    }

    /// One tick of the session clock (the server calls it once a minute): ends persistent
    /// sessions whose client has been away for `session_expiry_sweeps` ticks in a row, with
    /// their subscriptions and queued messages. Returns how many ended.
    pub(crate) fn sweep(&mut self) -> usize {
        let expiry = self.limits.session_expiry_sweeps;
        let mut expired = Vec::new();
        for (client_id, session) in &mut self.sessions {
            if session.is_online() {
                continue;
            }
            session.idle_sweeps = session.idle_sweeps.saturating_add(1);
            if session.idle_sweeps >= expiry {
                expired.push(client_id.clone());
            }
        }
        for client_id in &expired {
            if let Some(session) = self.sessions.remove(client_id) {
                self.unindex_all(client_id, &session);
            }
        }
        expired.len()
    }

    /// The connection ended without DISCONNECT (EOF, I/O error, keep-alive expiry, protocol
    /// error, shutdown): publishes its will and ends a clean session. Does nothing for a
    /// connection that already ended or was taken over.
    pub(crate) fn connection_lost(&mut self, conn: ConnId) -> Effects {
        let mut effects = Effects::default();
        self.end(conn, Ending::Lost, &mut effects);
        effects
    }

    fn end(&mut self, conn: ConnId, ending: Ending, effects: &mut Effects) {
        let Some(client_id) = self.connections.remove(&conn) else {
            return;
        };
        let Some(session) = self.sessions.get_mut(&client_id) else {
            return;
        };
        session.connection = None;
        let will = session.will.take();
        if session.lifetime == Lifetime::Connection
            && let Some(session) = self.sessions.remove(&client_id)
        {
            self.unindex_all(&client_id, &session);
        }
        if ending == Ending::Lost
            && let Some(will) = will
        {
            self.route(will_message(will), effects);
        }
    }

    fn publish(
        &mut self,
        conn: ConnId,
        client_id: &ClientId,
        publish: Publish,
        effects: &mut Effects,
    ) -> Result<(), ProtocolError> {
        if !topic::is_valid_topic_name(&publish.topic) {
            return Err(ProtocolError::InvalidTopic(publish.topic));
        }
        let pkid = publish.pkid;
        let allowed = self
            .sessions
            .get(client_id)
            .is_some_and(|session| session.grant.may_publish(&publish.topic));
        if !allowed {
            // Acknowledged as if delivered, so the sender does not retransmit it forever.
            effects.denied += 1;
            match publish.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => effects.send(conn, Packet::PubAck(PubAck::new(pkid))),
                QoS::ExactlyOnce => effects.send(conn, Packet::PubRec(PubRec::new(pkid))),
            }
            return Ok(());
        }
        match publish.qos {
            QoS::AtMostOnce => self.route(publish, effects),
            QoS::AtLeastOnce => {
                effects.send(conn, Packet::PubAck(PubAck::new(pkid)));
                self.route(publish, effects);
            }
            QoS::ExactlyOnce => {
                effects.send(conn, Packet::PubRec(PubRec::new(pkid)));
                // Method A of MQTT 4.3.3: route at once, remember the id until PUBREL so a
                // retransmission is not routed a second time.
                let is_first = self
                    .sessions
                    .get_mut(client_id)
                    .is_some_and(|session| session.awaiting_pubrel.insert(pkid));
                if is_first {
                    self.route(publish, effects);
                }
            }
        }
        Ok(())
    }

    /// Stores a retained message and delivers `publish` to every matching subscription.
    fn route(&mut self, publish: Publish, effects: &mut Effects) {
        if publish.retain {
            let replaced = self.retained.get(&publish.topic).map(|p| p.payload.len());
            let bytes = self.retained_bytes - replaced.unwrap_or(0);
            if publish.payload.is_empty() {
                self.retained.remove(&publish.topic);
                self.retained_bytes = bytes;
            } else if replaced.is_none()
                && (self.retained.len() >= self.limits.max_retained
                    || bytes + publish.payload.len() > self.limits.max_retained_bytes)
            {
                // Delivered below like any message, just not kept for later subscribers.
                effects.dropped += 1;
            } else {
                let stored = Publish {
                    dup: false,
                    pkid: 0,
                    ..publish.clone()
                };
                self.retained_bytes = bytes + publish.payload.len();
                self.retained.insert(publish.topic.clone(), stored);
            }
        }

        let mut matched = Vec::new();
        self.tree.matching(&publish.topic, &mut matched);
        // One delivery per client, at the highest QoS among its matching subscriptions.
        let mut targets: HashMap<ClientId, QoS> = HashMap::new();
        let sessions = &self.sessions;
        for filter in matched {
            let Some(subscribers) = self.filters.get_mut(filter) else {
                continue;
            };
            let clients = subscribers.clients.iter().map(|(c, q)| (c.clone(), *q));
            let picked: Vec<(ClientId, QoS)> = subscribers
                .groups
                .values_mut()
                .filter_map(|group| {
                    group.pick(|client| sessions.get(client).is_some_and(Session::is_online))
                })
                .collect();
            for (client, granted) in clients.chain(picked) {
                let best = targets.entry(client).or_insert(granted);
                *best = higher(*best, granted);
            }
        }

        for (client, granted) in targets {
            // MQTT-3.3.1-9: established subscriptions see retain cleared.
            let message = Publish {
                dup: false,
                qos: lower(publish.qos, granted),
                retain: false,
                topic: publish.topic.clone(),
                pkid: 0,
                payload: publish.payload.clone(),
            };
            self.deliver(&client, message, effects);
        }
    }

    /// Sends `message` (QoS already decided, packet id unset) to `client` now, or keeps a
    /// QoS 1 message for later when the client is offline or its window is full.
    fn deliver(&mut self, client: &ClientId, message: Publish, effects: &mut Effects) {
        let Some(session) = self.sessions.get_mut(client) else {
            return;
        };
        if message.qos == QoS::AtMostOnce {
            // QoS 0 is not stored for offline sessions (MQTT 3.1.2.4 leaves it optional).
            if let Some(conn) = session.connection {
                effects.send(conn, Packet::Publish(message));
            }
            return;
        }
        effects.dropped += session.outbound.enqueue(message, self.limits.queue);
        if let Some(conn) = session.connection {
            for publish in session.outbound.release(self.limits.inflight_window) {
                effects.send(conn, Packet::Publish(publish));
            }
        }
    }

    fn subscribe(
        &mut self,
        conn: ConnId,
        client_id: &ClientId,
        subscribe: Subscribe,
        effects: &mut Effects,
    ) {
        let mut return_codes = Vec::with_capacity(subscribe.filters.len());
        let mut retained = Vec::new();
        for request in subscribe.filters {
            let Some(spec) = topic::parse_filter(&request.path) else {
                return_codes.push(SubscribeReasonCode::Failure);
                continue;
            };
            let allowed = self
                .sessions
                .get(client_id)
                .is_some_and(|session| session.grant.may_subscribe(spec.filter));
            if !allowed {
                effects.denied += 1;
                return_codes.push(SubscribeReasonCode::Failure);
                continue;
            }
            // QoS 2 is granted as QoS 1: outbound QoS 2 is not implemented.
            let granted = lower(request.qos, QoS::AtLeastOnce);
            self.index(client_id, spec, granted);
            // MQTT-3.8.4-3: a repeated subscription replaces the old one and retained
            // messages are sent again. Shared subscriptions get none: a group has no single
            // member to receive them.
            if spec.group.is_none() {
                retained.extend(
                    self.retained
                        .values()
                        .filter(|message| topic::matches(&message.topic, spec.filter))
                        .map(|message| Publish {
                            qos: lower(message.qos, granted),
                            ..message.clone()
                        }),
                );
            }
            if let Some(session) = self.sessions.get_mut(client_id) {
                session.subscriptions.insert(request.path, granted);
            }
            return_codes.push(SubscribeReasonCode::Success(granted));
        }
        effects.send(
            conn,
            Packet::SubAck(SubAck::new(subscribe.pkid, return_codes)),
        );
        for message in retained {
            self.deliver(client_id, message, effects);
        }
    }

    fn unsubscribe(
        &mut self,
        conn: ConnId,
        client_id: &ClientId,
        unsubscribe: Unsubscribe,
        effects: &mut Effects,
    ) {
        for raw in &unsubscribe.topics {
            let was_subscribed = self
                .sessions
                .get_mut(client_id)
                .is_some_and(|session| session.subscriptions.remove(raw).is_some());
            if was_subscribed && let Some(spec) = topic::parse_filter(raw) {
                self.unindex(client_id, spec);
            }
        }
        effects.send(conn, Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)));
    }

    fn index(&mut self, client_id: &ClientId, spec: FilterSpec<'_>, granted: QoS) {
        let subscribers = self
            .filters
            .entry(spec.filter.to_owned())
            .or_insert_with(|| {
                self.tree.insert(spec.filter);
                Subscribers::default()
            });
        match spec.group {
            None => {
                subscribers.clients.insert(client_id.clone(), granted);
            }
            Some(group) => subscribers
                .groups
                .entry(group.to_owned())
                .or_default()
                .join(client_id, granted),
        }
    }

    fn unindex(&mut self, client_id: &ClientId, spec: FilterSpec<'_>) {
        let Some(subscribers) = self.filters.get_mut(spec.filter) else {
            return;
        };
        match spec.group {
            None => {
                subscribers.clients.remove(client_id);
            }
            Some(group) => {
                if let Some(members) = subscribers.groups.get_mut(group) {
                    members.leave(client_id);
                    if members.members.is_empty() {
                        subscribers.groups.remove(group);
                    }
                }
            }
        }
        if subscribers.is_empty() {
            self.filters.remove(spec.filter);
            self.tree.remove(spec.filter);
        }
    }

    /// Removes every subscription of a session that is being discarded.
    fn unindex_all(&mut self, client_id: &ClientId, session: &Session) {
        for raw in session.subscriptions.keys() {
            if let Some(spec) = topic::parse_filter(raw) {
                self.unindex(client_id, spec);
            }
        }
    }

    fn assign_client_id(&mut self) -> ClientId {
        loop {
            self.assigned_ids += 1;
            let candidate =
                ClientId::from(format!("ambient-broker-{}", self.assigned_ids).as_str());
            if !self.sessions.contains_key(&candidate) {
                return candidate;
            }
        }
    }
}

fn refuse(conn: ConnId, code: ConnectReturnCode) -> Effects {
    Effects {
        sends: vec![(conn, Packet::ConnAck(ConnAck::new(code, false)))],
        closes: vec![conn],
        ..Effects::default()
    }
}

fn will_message(will: LastWill) -> Publish {
    Publish {
        dup: false,
        qos: will.qos,
        retain: will.retain,
        topic: will.topic,
        pkid: 0,
        payload: will.message,
    }
}

/// `QoS` is only `PartialOrd`; every value is comparable, so these never fall back.
fn lower(a: QoS, b: QoS) -> QoS {
    if b < a { b } else { a }
}

fn higher(a: QoS, b: QoS) -> QoS {
    if b > a { b } else { a }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use rumqttc::{Connect, PubRel, SubscribeFilter};

    use super::*;

    const ALICE: ConnId = ConnId(1);
    const BOB: ConnId = ConnId(2);
    const CAROL: ConnId = ConnId(3);
    const ALICE_AGAIN: ConnId = ConnId(4);

    /// Small limits so that windows and queues fill within a test.
    fn router() -> Router {
        Router::new(Limits {
            queue: QueueBound {
                messages: 3,
                bytes: 1 << 20,
            },
            inflight_window: 2,
            max_sessions: 100,
            session_expiry_sweeps: 3,
            max_retained: 100,
            max_retained_bytes: 1 << 20,
        })
    }

    #[test]
    fn a_persistent_session_whose_client_stays_away_ends_after_the_expiry_sweeps() {
        let mut router = router();
        connect(&mut router, ALICE, "alice", Lifetime::Persistent);
        subscribe(&mut router, ALICE, "jobs", QoS::AtLeastOnce);
        router.connection_lost(ALICE);
        connect(&mut router, BOB, "bob", Lifetime::Connection);
        assert_eq!(router.sweep(), 0);
        assert_eq!(router.sweep(), 0);
        assert_eq!(router.sweep(), 1, "away for three sweeps");
        assert_eq!(router.sweep(), 0, "online clients never expire");
        let back = connect(&mut router, ALICE_AGAIN, "alice", Lifetime::Persistent);
        assert_eq!(
            back.sends[0],
            (
                ALICE_AGAIN,
                Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))
            ),
            "the session is gone"
        );
        assert!(
            publish(&mut router, BOB, "jobs", QoS::AtLeastOnce, "x")
                .sends
                .iter()
                .all(|(to, _)| *to == BOB)
        );
    }

    #[test]
    fn a_connect_that_would_exceed_max_sessions_is_refused_but_known_clients_come_back() {
        let mut router = Router::new(Limits {
            max_sessions: 2,
            ..router().limits
        });
        connect(&mut router, ALICE, "alice", Lifetime::Persistent);
        connect(&mut router, BOB, "bob", Lifetime::Persistent);
        assert_eq!(
            connect(&mut router, CAROL, "carol", Lifetime::Persistent),
            refuse(CAROL, ConnectReturnCode::ServiceUnavailable)
        );
        router.connection_lost(ALICE);
        let back = connect(&mut router, ALICE_AGAIN, "alice", Lifetime::Persistent);
        assert_eq!(
            back.sends[0].1,
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, true))
        );
    }

    #[test]
    fn retained_messages_beyond_the_caps_are_delivered_but_not_kept() {
        let mut router = Router::new(Limits {
            max_retained: 2,
            max_retained_bytes: 8,
            ..router().limits
        });
        connect(&mut router, ALICE, "alice", Lifetime::Connection);
        let retain = |router: &mut Router, topic: &str, payload: &'static str| {
            let mut p = publish_packet(topic, QoS::AtMostOnce, payload);
            p.retain = true;
            router.handle(ALICE, Packet::Publish(p)).unwrap()
        };
        assert_eq!(retain(&mut router, "a", "1234").dropped, 0);
        assert_eq!(
            retain(&mut router, "b", "56789").dropped,
            1,
            "over the bytes"
        );
        assert_eq!(retain(&mut router, "b", "5678").dropped, 0);
        assert_eq!(retain(&mut router, "c", "9").dropped, 1, "over the count");
        // Replacing and clearing always work, and clearing frees room.
        assert_eq!(retain(&mut router, "a", "12").dropped, 0);
        assert_eq!(retain(&mut router, "a", "").dropped, 0);
        assert_eq!(retain(&mut router, "c", "9").dropped, 0);
        connect(&mut router, BOB, "bob", Lifetime::Connection);
        let replay = subscribe(&mut router, BOB, "#", QoS::AtMostOnce);
        let topics: Vec<&str> = replay
            .sends
            .iter()
            .filter_map(|(_, p)| match p {
                Packet::Publish(p) => Some(p.topic.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(topics.len(), 2, "{topics:?}");
    }

    fn connect_packet(client_id: &str, lifetime: Lifetime) -> Connect {
        let mut connect = Connect::new(client_id);
        connect.clean_session = lifetime == Lifetime::Connection;
        connect
    }

    fn connect(router: &mut Router, conn: ConnId, client_id: &str, lifetime: Lifetime) -> Effects {
        router
            .connect(conn, connect_packet(client_id, lifetime), anyone())
            .expect("valid CONNECT")
    }

    fn anyone() -> Arc<Grant> {
        Arc::new(Grant::everything("anonymous"))
    }

    /// A device that may publish only under `nodes/<name>/` and read only its tasks.
    fn device(name: &str) -> Arc<Grant> {
        Arc::new(Grant {
            principal: format!("node:{name}"),
            publish: vec![format!("nodes/{name}/+")],
            subscribe: vec![format!("nodes/{name}/tasks")],
        })
    }

    fn connect_as(
        router: &mut Router,
        conn: ConnId,
        client_id: &str,
        grant: Arc<Grant>,
    ) -> Effects {
        router
            .connect(conn, connect_packet(client_id, Lifetime::Persistent), grant)
            .expect("valid CONNECT")
    }

    fn refused(conn: ConnId) -> Effects {
        refuse(conn, ConnectReturnCode::NotAuthorized)
    }

    #[test]
    fn a_client_id_owned_by_another_principal_is_refused_and_not_taken_over() {
        let mut router = router();
        connect_as(&mut router, ALICE, "agent-a", device("a"));
        subscribe(&mut router, ALICE, "nodes/a/tasks", QoS::AtLeastOnce);
        assert_eq!(
            connect_as(&mut router, BOB, "agent-a", anyone()),
            refused(BOB)
        );
        assert_eq!(
            connect_as(&mut router, BOB, "agent-a", device("b")),
            refused(BOB)
        );
        // Alice still holds the session and still gets her tasks.
        connect(&mut router, CAROL, "coordinator", Lifetime::Connection);
        let delivered = publish(&mut router, CAROL, "nodes/a/tasks", QoS::AtMostOnce, "job");
        assert_eq!(delivered.sends.len(), 1);
        assert_eq!(delivered.sends[0].0, ALICE);
        // The same principal may take its own session over, as MQTT says.
        let again = connect_as(&mut router, ALICE_AGAIN, "agent-a", device("a"));
        assert_eq!(again.closes, vec![ALICE]);
    }

    #[test]
    fn a_publish_outside_the_grant_is_acknowledged_but_reaches_nobody() {
        let mut router = router();
        connect(&mut router, CAROL, "coordinator", Lifetime::Connection);
        subscribe(&mut router, CAROL, "nodes/#", QoS::AtLeastOnce);
        connect_as(&mut router, ALICE, "agent-a", device("a"));
        let forged = publish(&mut router, ALICE, "nodes/b/results", QoS::AtLeastOnce, "x");
        assert_eq!(forged.sends, vec![(ALICE, Packet::PubAck(PubAck::new(7)))]);
        assert_eq!(forged.denied, 1);
        let own = publish(&mut router, ALICE, "nodes/a/results", QoS::AtLeastOnce, "x");
        assert!(own.sends.iter().any(|(to, _)| *to == CAROL));
        assert_eq!(own.denied, 0);
    }

    #[test]
    fn a_subscription_outside_the_grant_fails_in_suback() {
        let mut router = router();
        connect_as(&mut router, ALICE, "agent-a", device("a"));
        let effects = subscribe(&mut router, ALICE, "nodes/+/tasks", QoS::AtLeastOnce);
        assert_eq!(
            effects.sends,
            vec![(
                ALICE,
                Packet::SubAck(SubAck::new(1, vec![SubscribeReasonCode::Failure]))
            )]
        );
        assert_eq!(effects.denied, 1);
        // Nothing was indexed: another node's tasks do not reach Alice.
        connect(&mut router, CAROL, "coordinator", Lifetime::Connection);
        let effects = publish(&mut router, CAROL, "nodes/b/tasks", QoS::AtMostOnce, "job");
        assert!(effects.sends.is_empty());
    }

    #[test]
    fn a_will_outside_the_grant_refuses_the_connect() {
        let mut router = router();
        let mut packet = connect_packet("agent-a", Lifetime::Persistent);
        packet.last_will = Some(LastWill::new(
            "nodes/b/status",
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
        assert_eq!(
            router.connect(ALICE, packet, device("a")),
            Ok(refused(ALICE))
        );
    }

    fn connect_with_will(router: &mut Router, conn: ConnId, client_id: &str) -> Effects {
        let mut packet = connect_packet(client_id, Lifetime::Connection);
        packet.last_will = Some(LastWill::new(
            "wills/gone",
            client_id,
            QoS::AtMostOnce,
            false,
        ));
        router
            .connect(conn, packet, anyone())
            .expect("valid CONNECT")
    }

    fn subscribe(router: &mut Router, conn: ConnId, filter: &str, qos: QoS) -> Effects {
        let packet = Subscribe {
            pkid: 1,
            filters: vec![SubscribeFilter::new(filter.to_owned(), qos)],
        };
        router
            .handle(conn, Packet::Subscribe(packet))
            .expect("valid SUBSCRIBE")
    }

    fn publish_packet(topic: &str, qos: QoS, payload: &'static str) -> Publish {
        let mut publish = Publish::from_bytes(topic, qos, Bytes::from_static(payload.as_bytes()));
        if qos != QoS::AtMostOnce {
            publish.pkid = 7;
        }
        publish
    }

    fn publish(
        router: &mut Router,
        conn: ConnId,
        topic: &str,
        qos: QoS,
        payload: &'static str,
    ) -> Effects {
        router
            .handle(conn, Packet::Publish(publish_packet(topic, qos, payload)))
            .expect("valid PUBLISH")
    }

    fn publishes_to(effects: &Effects, conn: ConnId) -> Vec<Publish> {
        effects
            .sends
            .iter()
            .filter(|(to, _)| *to == conn)
            .filter_map(|(_, packet)| match packet {
                Packet::Publish(publish) => Some(publish.clone()),
                _ => None,
            })
            .collect()
    }

    fn payloads_to(effects: &Effects, conn: ConnId) -> Vec<Bytes> {
        publishes_to(effects, conn)
            .into_iter()
            .map(|p| p.payload)
            .collect()
    }

    fn connack(effects: &Effects) -> ConnAck {
        effects
            .sends
            .iter()
            .find_map(|(_, packet)| match packet {
                Packet::ConnAck(ack) => Some(ack.clone()),
                _ => None,
            })
            .expect("a CONNACK")
    }

    #[test]
    fn a_qos1_publish_is_acknowledged_and_forwarded_with_a_packet_id_of_its_own() {
        let mut router = router();
        connect(&mut router, ALICE, "alice", Lifetime::Connection);
        connect(&mut router, BOB, "bob", Lifetime::Connection);
        subscribe(&mut router, BOB, "jobs/+", QoS::AtLeastOnce);

        let effects = publish(&mut router, ALICE, "jobs/1", QoS::AtLeastOnce, "run");

        assert_eq!(
            effects.sends,
            vec![
                (ALICE, Packet::PubAck(PubAck::new(7))),
                (
                    BOB,
                    Packet::Publish(Publish {
                        dup: false,
                        qos: QoS::AtLeastOnce,
                        retain: false,
                        topic: "jobs/1".to_owned(),
                        pkid: 1,
                        payload: Bytes::from_static(b"run"),
                    })
                ),
            ]
        );
    }

    #[test]
    fn subscriptions_are_granted_at_most_qos_1_and_invalid_filters_fail() {
        let mut router = router();
        connect(&mut router, ALICE, "alice", Lifetime::Connection);
        let packet = Subscribe {
            pkid: 9,
            filters: vec![
                SubscribeFilter::new("a/#".to_owned(), QoS::ExactlyOnce),
                SubscribeFilter::new("a/#/b".to_owned(), QoS::AtMostOnce),
                SubscribeFilter::new("b".to_owned(), QoS::AtMostOnce),
            ],
        };
        let effects = router.handle(ALICE, Packet::Subscribe(packet)).unwrap();
        assert_eq!(
            effects.sends,
            vec![(
                ALICE,
                Packet::SubAck(SubAck::new(
                    9,
                    vec![
                        SubscribeReasonCode::Success(QoS::AtLeastOnce),
                        SubscribeReasonCode::Failure,
                        SubscribeReasonCode::Success(QoS::AtMostOnce),
                    ]
                ))
            )]
        );
    }

    #[test]
    fn outbound_qos_is_the_lower_of_publish_and_subscription() {
        let mut router = router();
        connect(&mut router, ALICE, "alice", Lifetime::Connection);
        connect(&mut router, BOB, "bob", Lifetime::Connection);
        subscribe(&mut router, BOB, "q/0", QoS::AtMostOnce);
        subscribe(&mut router, BOB, "q/1", QoS::AtLeastOnce);

        let sent = publishes_to(
            &publish(&mut router, ALICE, "q/0", QoS::ExactlyOnce, "x"),
            BOB,
        );
        assert_eq!(sent[0].qos, QoS::AtMostOnce);
        let sent = publishes_to(
            &publish(&mut router, ALICE, "q/1", QoS::AtMostOnce, "x"),
            BOB,
        );
        assert_eq!(sent[0].qos, QoS::AtMostOnce);
        router
            .handle(ALICE, Packet::PubRel(PubRel::new(7)))
            .unwrap();
        let sent = publishes_to(
            &publish(&mut router, ALICE, "q/1", QoS::ExactlyOnce, "y"),
            BOB,
        );
        assert_eq!(sent[0].qos, QoS::AtLeastOnce);
    }

    #[test]
    fn overlapping_subscriptions_deliver_one_copy_at_the_highest_qos() {
        let mut router = router();
        connect(&mut router, ALICE, "alice", Lifetime::Connection);
        connect(&mut router, BOB, "bob", Lifetime::Connection);
        subscribe(&mut router, BOB, "a/#", QoS::AtMostOnce);
        subscribe(&mut router, BOB, "a/+", QoS::AtLeastOnce);
        subscribe(&mut router, BOB, "a/b", QoS::AtMostOnce);

        let sent = publishes_to(
            &publish(&mut router, ALICE, "a/b", QoS::AtLeastOnce, "x"),
            BOB,
        );
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].qos, QoS::AtLeastOnce);
    }

    #[test]
    fn a_dollar_topic_is_not_delivered_to_a_hash_subscription() {
        let mut router = router();
        connect(&mut router, ALICE, "alice", Lifetime::Connection);
        connect(&mut router, BOB, "bob", Lifetime::Connection);
        subscribe(&mut router, BOB, "#", QoS::AtMostOnce);
        let effects = publish(&mut router, ALICE, "$internal/x", QoS::AtMostOnce, "x");
        assert!(publishes_to(&effects, BOB).is_empty());
    }

    #[test]
    fn a_retained_message_is_replayed_to_new_subscribers_until_an_empty_one_deletes_it() {
        let mut router = router();
        connect(&mut router, ALICE, "alice", Lifetime::Connection);
        connect(&mut router, BOB, "bob", Lifetime::Connection);
        subscribe(&mut router, BOB, "status/#", QoS::AtLeastOnce);

        let mut retained = publish_packet("status/node1", QoS::AtLeastOnce, "up");
        retained.retain = true;
        let live = router.handle(ALICE, Packet::Publish(retained)).unwrap();
        assert!(
            !publishes_to(&live, BOB)[0].retain,
            "an established subscription sees retain cleared"
        );

        connect(&mut router, CAROL, "carol", Lifetime::Connection);
        let replay = subscribe(&mut router, CAROL, "status/+", QoS::AtMostOnce);
        assert!(
            matches!(replay.sends[0], (CAROL, Packet::SubAck(_))),
            "SUBACK first"
        );
        let replayed = publishes_to(&replay, CAROL);
        assert_eq!(replayed.len(), 1);
        assert!(replayed[0].retain);
        assert_eq!(replayed[0].qos, QoS::AtMostOnce);
        assert_eq!(replayed[0].payload, "up");

        let mut delete = publish_packet("status/node1", QoS::AtMostOnce, "");
        delete.retain = true;
        let live = router.handle(ALICE, Packet::Publish(delete)).unwrap();
        assert_eq!(
            payloads_to(&live, BOB),
            [""],
            "the deletion is forwarded like any message"
        );
        let replay = subscribe(&mut router, CAROL, "status/+", QoS::AtMostOnce);
        assert!(publishes_to(&replay, CAROL).is_empty());
    }

    #[test]
    fn a_retransmitted_qos2_publish_is_routed_once() {
        let mut router = router();
        connect(&mut router, ALICE, "alice", Lifetime::Connection);
        connect(&mut router, BOB, "bob", Lifetime::Connection);
        subscribe(&mut router, BOB, "x", QoS::AtLeastOnce);

        let first = publish(&mut router, ALICE, "x", QoS::ExactlyOnce, "once");
        assert_eq!(first.sends[0], (ALICE, Packet::PubRec(PubRec::new(7))));
        assert_eq!(payloads_to(&first, BOB), ["once"]);

        let mut again = publish_packet("x", QoS::ExactlyOnce, "once");
        again.dup = true;
        let second = router.handle(ALICE, Packet::Publish(again)).unwrap();
        assert_eq!(second.sends, vec![(ALICE, Packet::PubRec(PubRec::new(7)))]);

        let release = router
            .handle(ALICE, Packet::PubRel(PubRel::new(7)))
            .unwrap();
        assert_eq!(
            release.sends,
            vec![(ALICE, Packet::PubComp(PubComp::new(7)))]
        );

        let reused_id = publish(&mut router, ALICE, "x", QoS::ExactlyOnce, "twice");
        assert_eq!(
            payloads_to(&reused_id, BOB),
            ["twice"],
            "a released id starts a new message"
        );
    }

    #[test]
    fn a_persistent_session_gets_what_it_missed_when_it_returns() {
        let mut router = router();
        connect(&mut router, ALICE, "alice", Lifetime::Connection);
        connect(&mut router, BOB, "bob", Lifetime::Persistent);
        subscribe(&mut router, BOB, "jobs/#", QoS::AtLeastOnce);
        router.connection_lost(BOB);

        for payload in ["1", "2", "3"] {
            let effects = publish(&mut router, ALICE, "jobs/a", QoS::AtLeastOnce, payload);
            assert!(effects.sends.iter().all(|(to, _)| *to == ALICE));
        }
        publish(&mut router, ALICE, "jobs/a", QoS::AtMostOnce, "not kept");

        const BOB_AGAIN: ConnId = ConnId(10);
        let resumed = connect(&mut router, BOB_AGAIN, "bob", Lifetime::Persistent);
        assert!(connack(&resumed).session_present);
        assert_eq!(
            payloads_to(&resumed, BOB_AGAIN),
            ["1", "2"],
            "the window is 2"
        );

        let first_id = publishes_to(&resumed, BOB_AGAIN)[0].pkid;
        let acked = router
            .handle(BOB_AGAIN, Packet::PubAck(PubAck::new(first_id)))
            .unwrap();
        assert_eq!(payloads_to(&acked, BOB_AGAIN), ["3"]);
    }

    #[test]
    fn unacknowledged_messages_are_redelivered_as_duplicates_on_resume() {
        let mut router = router();
        connect(&mut router, ALICE, "alice", Lifetime::Connection);
        connect(&mut router, BOB, "bob", Lifetime::Persistent);
        subscribe(&mut router, BOB, "jobs", QoS::AtLeastOnce);
        let sent = publishes_to(
            &publish(&mut router, ALICE, "jobs", QoS::AtLeastOnce, "j"),
            BOB,
        );
        router.connection_lost(BOB);

        const BOB_AGAIN: ConnId = ConnId(10);
        let resumed = connect(&mut router, BOB_AGAIN, "bob", Lifetime::Persistent);
        let redelivered = publishes_to(&resumed, BOB_AGAIN);
        assert_eq!(redelivered.len(), 1);
        assert!(redelivered[0].dup);
        assert_eq!(redelivered[0].pkid, sent[0].pkid);
        assert_eq!(redelivered[0].payload, "j");
    }

    #[test]
    fn a_full_offline_queue_drops_its_oldest_messages_and_counts_them() {
        let mut router = router();
        connect(&mut router, ALICE, "alice", Lifetime::Connection);
        connect(&mut router, BOB, "bob", Lifetime::Persistent);
        subscribe(&mut router, BOB, "jobs", QoS::AtLeastOnce);
        router.connection_lost(BOB);

        let mut dropped = 0;
        for payload in ["1", "2", "3", "4", "5"] {
            dropped += publish(&mut router, ALICE, "jobs", QoS::AtLeastOnce, payload).dropped;
        }
        assert_eq!(dropped, 2, "the queue holds 3");
        let session = &router.sessions[&ClientId::from("bob")];
        assert_eq!(session.outbound.queued_len(), 3);
        assert_eq!(session.outbound.inflight_len(), 0);

        const BOB_AGAIN: ConnId = ConnId(10);
        let resumed = connect(&mut router, BOB_AGAIN, "bob", Lifetime::Persistent);
        assert_eq!(payloads_to(&resumed, BOB_AGAIN), ["3", "4"]);
    }

    #[test]
    fn a_clean_session_discards_what_a_previous_session_left() {
        let mut router = router();
        connect(&mut router, ALICE, "alice", Lifetime::Connection);
        connect(&mut router, BOB, "bob", Lifetime::Persistent);
        subscribe(&mut router, BOB, "jobs", QoS::AtLeastOnce);
        router.connection_lost(BOB);
        publish(&mut router, ALICE, "jobs", QoS::AtLeastOnce, "stale");

        const BOB_AGAIN: ConnId = ConnId(10);
        let fresh = connect(&mut router, BOB_AGAIN, "bob", Lifetime::Connection);
        assert!(!connack(&fresh).session_present);
        assert!(publishes_to(&fresh, BOB_AGAIN).is_empty());
        let later = publish(&mut router, ALICE, "jobs", QoS::AtLeastOnce, "new");
        assert!(
            publishes_to(&later, BOB_AGAIN).is_empty(),
            "subscriptions are gone too"
        );
    }

    #[test]
    fn a_clean_session_leaves_no_subscription_behind() {
        let mut router = router();
        connect(&mut router, ALICE, "alice", Lifetime::Connection);
        subscribe(&mut router, ALICE, "a/+/c", QoS::AtLeastOnce);
        subscribe(&mut router, ALICE, "$share/g/a/#", QoS::AtLeastOnce);
        router.connection_lost(ALICE);
        assert!(router.sessions.is_empty());
        assert!(router.filters.is_empty());
        assert!(router.tree.is_empty());
    }

    #[test]
    fn a_new_connection_takes_over_the_client_id_and_the_old_will_fires() {
        let mut router = router();
        connect(&mut router, BOB, "bob", Lifetime::Connection);
        subscribe(&mut router, BOB, "wills/#", QoS::AtMostOnce);
        connect_with_will(&mut router, ALICE, "alice");

        let takeover = connect(&mut router, ALICE_AGAIN, "alice", Lifetime::Connection);
        assert_eq!(takeover.closes, [ALICE]);
        assert!(!connack(&takeover).session_present);
        assert_eq!(payloads_to(&takeover, BOB), ["alice"]);

        let late = router.connection_lost(ALICE);
        assert_eq!(
            late,
            Effects::default(),
            "the old connection no longer speaks for alice"
        );
        let still_bound = router.handle(ALICE_AGAIN, Packet::PingReq).unwrap();
        assert_eq!(still_bound.sends, [(ALICE_AGAIN, Packet::PingResp)]);
        assert_eq!(
            router.handle(ALICE, Packet::PingReq),
            Err(ProtocolError::NotConnected)
        );
    }

    #[test]
    fn a_will_fires_when_the_connection_is_lost_but_not_after_disconnect() {
        let mut router = router();
        connect(&mut router, BOB, "bob", Lifetime::Connection);
        subscribe(&mut router, BOB, "wills/#", QoS::AtMostOnce);

        connect_with_will(&mut router, ALICE, "alice");
        assert_eq!(payloads_to(&router.connection_lost(ALICE), BOB), ["alice"]);

        connect_with_will(&mut router, CAROL, "carol");
        let disconnect = router.handle(CAROL, Packet::Disconnect).unwrap();
        assert_eq!(disconnect.closes, [CAROL]);
        assert!(disconnect.sends.is_empty());
        assert_eq!(router.connection_lost(CAROL), Effects::default());
    }

    #[test]
    fn an_empty_client_id_is_assigned_one_only_for_a_clean_session() {
        let mut router = router();
        let accepted = connect(&mut router, ALICE, "", Lifetime::Connection);
        assert_eq!(accepted.closes, []);
        assert_eq!(connack(&accepted).code, ConnectReturnCode::Success);

        let refused = connect(&mut router, BOB, "", Lifetime::Persistent);
        assert_eq!(connack(&refused).code, ConnectReturnCode::BadClientId);
        assert_eq!(refused.closes, [BOB]);
    }

    #[test]
    fn a_client_of_another_protocol_version_is_refused() {
        let mut router = router();
        let mut packet = connect_packet("five", Lifetime::Connection);
        packet.protocol = Protocol::V5;
        let refused = router.connect(ALICE, packet, anyone()).unwrap();
        assert_eq!(
            refused.sends,
            [(
                ALICE,
                Packet::ConnAck(ConnAck::new(
                    ConnectReturnCode::RefusedProtocolVersion,
                    false
                ))
            )]
        );
        assert_eq!(refused.closes, [ALICE]);
    }

    #[test]
    fn a_shared_subscription_takes_turns_and_skips_offline_members() {
        let mut router = router();
        connect(&mut router, ALICE, "alice", Lifetime::Connection);
        connect(&mut router, BOB, "bob", Lifetime::Persistent);
        connect(&mut router, CAROL, "carol", Lifetime::Connection);
        subscribe(&mut router, BOB, "$share/workers/jobs/+", QoS::AtLeastOnce);
        subscribe(
            &mut router,
            CAROL,
            "$share/workers/jobs/+",
            QoS::AtLeastOnce,
        );

        let mut receivers = Vec::new();
        for _ in 0..4 {
            let effects = publish(&mut router, ALICE, "jobs/1", QoS::AtMostOnce, "j");
            let to: Vec<ConnId> = [BOB, CAROL]
                .into_iter()
                .filter(|conn| !publishes_to(&effects, *conn).is_empty())
                .collect();
            assert_eq!(to.len(), 1, "exactly one member per message");
            receivers.push(to[0]);
        }
        assert_eq!(receivers, [BOB, CAROL, BOB, CAROL]);

        router.connection_lost(BOB);
        for _ in 0..2 {
            let effects = publish(&mut router, ALICE, "jobs/1", QoS::AtLeastOnce, "j");
            assert_eq!(payloads_to(&effects, CAROL), ["j"], "bob is offline");
        }
    }

    #[test]
    fn unsubscribing_stops_delivery() {
        let mut router = router();
        connect(&mut router, ALICE, "alice", Lifetime::Connection);
        subscribe(&mut router, ALICE, "a", QoS::AtMostOnce);
        let packet = Unsubscribe {
            pkid: 4,
            topics: vec!["a".to_owned(), "never-subscribed".to_owned()],
        };
        let effects = router.handle(ALICE, Packet::Unsubscribe(packet)).unwrap();
        assert_eq!(effects.sends, [(ALICE, Packet::UnsubAck(UnsubAck::new(4)))]);
        assert!(
            publish(&mut router, ALICE, "a", QoS::AtMostOnce, "x")
                .sends
                .is_empty()
        );
        assert!(router.tree.is_empty());
    }

    #[test]
    fn protocol_violations_are_reported_not_obeyed() {
        let mut router = router();
        connect(&mut router, ALICE, "alice", Lifetime::Connection);
        assert_eq!(
            router.handle(
                ALICE,
                Packet::Connect(connect_packet("alice", Lifetime::Connection))
            ),
            Err(ProtocolError::SecondConnect)
        );
        assert_eq!(
            router.handle(
                ALICE,
                Packet::Publish(publish_packet("a/+", QoS::AtMostOnce, "x"))
            ),
            Err(ProtocolError::InvalidTopic("a/+".to_owned()))
        );
        assert_eq!(
            router.handle(ALICE, Packet::PingResp),
            Err(ProtocolError::ServerOnlyPacket("PINGRESP"))
        );
        let mut bad_will = connect_packet("bob", Lifetime::Connection);
        bad_will.last_will = Some(LastWill::new("wills/#", "x", QoS::AtMostOnce, false));
        assert_eq!(
            router.connect(BOB, bad_will, anyone()),
            Err(ProtocolError::InvalidTopic("wills/#".to_owned()))
        );
    }
}
