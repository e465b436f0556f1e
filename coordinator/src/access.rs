//! Who may use the embedded broker, and for what: the [`Gatekeeper`] the coordinator installs.
//!
//! | who | username | password | client id | may publish | may subscribe |
//! |---|---|---|---|---|---|
//! | a device | its node id | a [`ConnectToken`] for it | `ambient-agent-<node id>` | its own `nodes/<id>/{status,announce,telemetry,results}` | its own `nodes/<id>/tasks`, `modules/+` |
//! | the coordinator | `coordinator` | a [`ConnectToken`] by its key | any | everything | everything |
//! | a client with an account | a name from `[broker.users]` | its password (stored as an argon2 hash) | not `ambient-agent-…` | `tasks/submit`, `modules/+` | `tasks/#` |
//! | a client without one | none | none | not `ambient-agent-…` | `tasks/submit`, `modules/+` | `tasks/#` |
//!
//! With Home Assistant discovery on ([`crate::ha`]), every client may also subscribe to the
//! discovery prefix (`homeassistant/#`), the states (`ha/+/state`) and the nodes' presence
//! (`nodes/+/status`), and publish Home Assistant's own birth message and last will
//! (`homeassistant/status`, which it sets by default: a will the grant does not cover would
//! refuse its CONNECT). Only the coordinator publishes configs and states.
//!
//! A device proves it holds the key its node id derives from; nobody else can publish in its
//! name, read its assignments, or take over its client id (see [`ambient_broker::Gatekeeper`]:
//! a session belongs to the principal that made it). Anonymous clients are admitted from
//! loopback only unless the configuration says otherwise, the mosquitto 2 model: a gateway
//! that listens on the LAN does not accept submissions from the LAN by accident.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ambient_broker::{Credentials, Gatekeeper, Grant, Refusal};
use ambient_core::topics::{self, NodeTopic};
use ambient_core::{ConnectToken, Identity, NodeId};

use crate::ha;

/// Username the coordinator's own client uses on its embedded broker.
pub const COORDINATOR_USER: &str = "coordinator";
/// The coordinator's own client id.
pub const COORDINATOR_CLIENT_ID: &str = "ambient-coordinator";
/// Client ids with this prefix belong to devices: `ambient-agent-<node id>`.
pub const DEVICE_CLIENT_PREFIX: &str = "ambient-agent-";
/// How far a connect token's time may be from the broker's clock, in ms: wide enough for a
/// device whose clock is a few minutes off, narrow enough that a captured token soon expires.
pub const TOKEN_WINDOW_MS: u64 = 5 * 60 * 1000;

/// Where clients without credentials may connect from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Anonymous {
    /// Only from this machine (the default).
    #[default]
    Loopback,
    /// From any address: anyone who reaches the broker may submit tasks.
    Anywhere,
}

/// The coordinator's rules for its embedded broker.
#[derive(Debug, Clone)]
pub struct Access {
    /// The coordinator's own public key.
    pub coordinator: [u8; 32],
    /// Where anonymous clients may connect from.
    pub anonymous: Anonymous,
    /// Client accounts: name and argon2 hash of the password (PHC string).
    pub users: BTreeMap<String, String>,
    /// Home Assistant's discovery prefix, when discovery is on: clients may then read the
    /// discovery configs, the states and the nodes' presence.
    pub home_assistant: Option<ha::Prefix>,
}

/// The argon2 hash of `password` with a fresh random salt, as a PHC string: what
/// `[broker.users]` stores and `ambient passwd` prints.
pub fn hash_password(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    let salt =
        SaltString::encode_b64(&rand::random::<[u8; 16]>()).expect("16 bytes make a valid salt");
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("the default argon2 parameters hash any password")
        .to_string()
}

/// The coordinator's username and a connect token made at `now_ms`: how it, and tools
/// holding its key, sign in to its embedded broker.
pub fn coordinator_login(identity: &Identity, now_ms: u64) -> (String, String) {
    let token = ConnectToken::sign(identity, COORDINATOR_USER, now_ms);
    (COORDINATOR_USER.to_string(), token.to_hex().to_string())
}

/// Whether `name` can be an account: not a node id, not the coordinator, 1 to 64 visible
/// ASCII characters.
pub fn is_valid_user_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_graphic())
        && name != COORDINATOR_USER
        && NodeId::from_hex(name).is_none()
}

impl Access {
    /// What every client may do, with or without an account.
    fn client(&self, principal: String) -> Grant {
        let mut grant = Grant {
            principal,
            publish: vec![topics::SUBMIT.into(), topics::ALL_MODULES.into()],
            subscribe: vec![format!("{}/tasks/#", topics::PREFIX)],
        };
        if let Some(prefix) = &self.home_assistant {
            grant.publish.push(format!("{prefix}/status"));
            grant.subscribe.extend([
                format!("{prefix}/#"),
                topics::ALL_HA_STATES.into(),
                topics::all_nodes(NodeTopic::Status).to_string(),
            ]);
        }
        grant
    }

    fn user(&self, name: &str, hash: &str, c: &Credentials<'_>) -> Result<Grant, Refusal> {
        use argon2::password_hash::{PasswordHash, PasswordVerifier as _};
        let wrong = || Refusal::BadCredentials(format!("wrong password for user {name:?}"));
        let hash = PasswordHash::new(hash).map_err(|_| wrong())?;
        argon2::Argon2::default()
            .verify_password(c.password.unwrap_or_default().as_bytes(), &hash)
            .map_err(|_| wrong())?;
        Self::check_client_id(c.client_id)?;
        Ok(self.client(format!("user {name}")))
    }

    fn check_client_id(client_id: &str) -> Result<(), Refusal> {
        if client_id.starts_with(DEVICE_CLIENT_PREFIX) || client_id == COORDINATOR_CLIENT_ID {
            return Err(Refusal::NotAuthorized(format!(
                "client id {client_id:?} is reserved: devices and the coordinator sign in with their keys"
            )));
        }
        Ok(())
    }

    fn device(&self, node: NodeId, c: &Credentials<'_>) -> Result<Grant, Refusal> {
        let token = c
            .password
            .ok_or_else(|| {
                Refusal::BadCredentials("a device needs a connect token as password".into())
            })
            .and_then(|p| {
                ConnectToken::from_hex(p).map_err(|e| Refusal::BadCredentials(e.to_string()))
            })?;
        token
            .verify_node(&node, c.now_ms, TOKEN_WINDOW_MS)
            .map_err(|e| Refusal::BadCredentials(e.to_string()))?;
        let id = node.to_hex();
        if c.client_id != format!("{DEVICE_CLIENT_PREFIX}{id}") {
            return Err(Refusal::NotAuthorized(format!(
                "node {id} must connect with client id {DEVICE_CLIENT_PREFIX}{id}"
            )));
        }
        let own = |leaf| topics::node(&node, leaf).to_string();
        Ok(Grant {
            principal: format!("node {id}"),
            publish: [
                NodeTopic::Status,
                NodeTopic::Announce,
                NodeTopic::Telemetry,
                NodeTopic::Results,
            ]
            .map(own)
            .to_vec(),
            subscribe: vec![own(NodeTopic::Tasks), topics::ALL_MODULES.into()],
        })
    }

    fn coordinator(&self, c: &Credentials<'_>) -> Result<Grant, Refusal> {
        let token = ConnectToken::from_hex(c.password.unwrap_or_default())
            .map_err(|e| Refusal::BadCredentials(e.to_string()))?;
        if token.public_key != self.coordinator {
            return Err(Refusal::BadCredentials("not the coordinator's key".into()));
        }
        token
            .verify(COORDINATOR_USER, c.now_ms, TOKEN_WINDOW_MS)
            .map_err(|e| Refusal::BadCredentials(e.to_string()))?;
        Ok(Grant::everything(COORDINATOR_USER))
    }

    fn anonymous(&self, c: &Credentials<'_>) -> Result<Grant, Refusal> {
        if self.anonymous == Anonymous::Loopback && !is_loopback(c.peer) {
            return Err(Refusal::NotAuthorized(
                "anonymous clients are accepted from loopback only: give the client an account ([broker.users], `ambient passwd`), or allow them from anywhere ([broker] anonymous = \"anywhere\")".into(),
            ));
        }
        Self::check_client_id(c.client_id)?;
        Ok(self.client("anonymous".into()))
    }
}

impl Gatekeeper for Access {
    fn admit(&self, c: &Credentials<'_>) -> Result<Grant, Refusal> {
        match c.username {
            None => self.anonymous(c),
            Some(COORDINATOR_USER) => self.coordinator(c),
            Some(user) if self.users.contains_key(user) => self.user(user, &self.users[user], c),
            Some(user) => match NodeId::from_hex(user) {
                Some(node) => self.device(node, c),
                None => Err(Refusal::BadCredentials(format!(
                    "unknown user {user:?}: devices sign in with their node id"
                ))),
            },
        }
    }
}

/// Loopback, including an IPv4 address mapped into IPv6.
fn is_loopback(peer: SocketAddr) -> bool {
    match peer.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_790_000_000_000;

    fn access() -> Access {
        Access {
            coordinator: Identity::from_secret(&[9; 32]).public_key(),
            anonymous: Anonymous::Loopback,
            users: BTreeMap::from([("alice".to_string(), hash_password("correct horse"))]),
            home_assistant: None,
        }
    }

    fn device_login(identity: &Identity, at_ms: u64) -> (String, String) {
        let id = identity.node_id().to_hex();
        let token = ConnectToken::sign(identity, &id, at_ms).to_hex();
        (id.to_string(), token.to_string())
    }

    fn admit(client_id: &str, login: Option<(&str, &str)>, peer: &str) -> Result<Grant, Refusal> {
        access().admit(&credentials(client_id, login, peer))
    }

    #[test]
    fn a_device_with_a_fresh_token_may_use_only_its_own_topics() {
        let node = Identity::from_secret(&[1; 32]);
        let (user, pass) = device_login(&node, NOW - 1_000);
        let client = format!("ambient-agent-{user}");
        let grant = admit(&client, Some((&user, &pass)), "192.168.1.20:50000").unwrap();
        let id = node.node_id();
        assert!(grant.may_publish(&topics::node(&id, NodeTopic::Results)));
        assert!(grant.may_publish(&topics::node(&id, NodeTopic::Status)));
        assert!(!grant.may_publish(&topics::node(&id, NodeTopic::Tasks)));
        assert!(!grant.may_publish(topics::SUBMIT));
        let other = Identity::from_secret(&[2; 32]).node_id();
        assert!(!grant.may_publish(&topics::node(&other, NodeTopic::Results)));
        assert!(grant.may_subscribe(&topics::node(&id, NodeTopic::Tasks)));
        assert!(grant.may_subscribe(topics::ALL_MODULES));
        assert!(!grant.may_subscribe(&topics::node(&other, NodeTopic::Tasks)));
        assert!(!grant.may_subscribe(&topics::all_nodes(NodeTopic::Tasks)));
    }

    #[test]
    fn a_device_is_refused_with_a_stale_or_foreign_token_or_another_client_id() {
        let node = Identity::from_secret(&[1; 32]);
        let (user, pass) = device_login(&node, NOW - TOKEN_WINDOW_MS - 1);
        let client = format!("ambient-agent-{user}");
        assert!(matches!(
            admit(&client, Some((&user, &pass)), "10.0.0.2:1"),
            Err(Refusal::BadCredentials(why)) if why.contains("clock")
        ));
        // A stranger's own valid token, presented under the victim's node id.
        let stranger = Identity::from_secret(&[3; 32]);
        let (_, foreign) = device_login(&stranger, NOW);
        assert!(matches!(
            admit(&client, Some((&user, &foreign)), "10.0.0.2:1"),
            Err(Refusal::BadCredentials(_))
        ));
        let (user, pass) = device_login(&node, NOW);
        assert!(matches!(
            admit("my-own-name", Some((&user, &pass)), "10.0.0.2:1"),
            Err(Refusal::NotAuthorized(_))
        ));
        assert!(matches!(
            admit(&client, Some((&user, "hunter2")), "10.0.0.2:1"),
            Err(Refusal::BadCredentials(_))
        ));
    }

    #[test]
    fn anonymous_clients_submit_from_loopback_only_and_never_as_a_device() {
        let grant = admit("cli", None, "127.0.0.1:5000").unwrap();
        assert!(grant.may_publish(topics::SUBMIT));
        assert!(grant.may_subscribe("ambient/v1/tasks/#"));
        let node = Identity::from_secret(&[1; 32]).node_id();
        assert!(!grant.may_publish(&topics::node(&node, NodeTopic::Results)));
        assert!(!grant.may_subscribe(&topics::node(&node, NodeTopic::Tasks)));
        assert!(admit("cli", None, "[::1]:5000").is_ok());
        assert!(matches!(
            admit("cli", None, "192.168.1.9:5000"),
            Err(Refusal::NotAuthorized(_))
        ));
        assert!(matches!(
            admit(&format!("ambient-agent-{node}"), None, "127.0.0.1:5000"),
            Err(Refusal::NotAuthorized(_))
        ));
        let anywhere = Access {
            anonymous: Anonymous::Anywhere,
            ..access()
        };
        let lan = Credentials {
            client_id: "cli",
            username: None,
            password: None,
            peer: "192.168.1.9:5000".parse().unwrap(),
            now_ms: NOW,
        };
        assert!(anywhere.admit(&lan).is_ok());
    }

    #[test]
    fn a_client_with_an_account_submits_from_anywhere_with_its_password_only() {
        let grant = admit(
            "laptop",
            Some(("alice", "correct horse")),
            "192.168.1.9:5000",
        )
        .unwrap();
        assert_eq!(grant.principal, "user alice");
        assert!(grant.may_publish(topics::SUBMIT));
        assert!(!grant.may_subscribe(&topics::all_nodes(NodeTopic::Tasks)));
        assert!(matches!(
            admit("laptop", Some(("alice", "wrong")), "192.168.1.9:5000"),
            Err(Refusal::BadCredentials(_))
        ));
        assert!(matches!(
            admit(
                "laptop",
                Some(("mallory", "correct horse")),
                "127.0.0.1:5000"
            ),
            Err(Refusal::BadCredentials(_))
        ));
        assert!(is_valid_user_name("alice"));
        assert!(!is_valid_user_name("coordinator"));
        assert!(!is_valid_user_name(&"ab".repeat(16)), "a node id");
        assert!(!is_valid_user_name("has space"));
    }

    fn with_home_assistant() -> Access {
        Access {
            home_assistant: Some(ha::Prefix::default()),
            ..access()
        }
    }

    fn credentials<'a>(
        client_id: &'a str,
        login: Option<(&'a str, &'a str)>,
        peer: &str,
    ) -> Credentials<'a> {
        Credentials {
            client_id,
            username: login.map(|l| l.0),
            password: login.map(|l| l.1),
            peer: peer.parse().unwrap(),
            now_ms: NOW,
        }
    }

    #[test]
    fn with_home_assistant_on_clients_read_discovery_states_and_presence_but_publish_none() {
        let ha = with_home_assistant();
        let node = Identity::from_secret(&[1; 32]).node_id();
        let anonymous = ha
            .admit(&credentials("home-assistant", None, "127.0.0.1:5000"))
            .unwrap();
        let account = ha
            .admit(&credentials(
                "home-assistant",
                Some(("alice", "correct horse")),
                "192.168.1.9:5000",
            ))
            .unwrap();
        for grant in [&anonymous, &account] {
            assert!(grant.may_subscribe("homeassistant/#"));
            assert!(grant.may_subscribe("homeassistant/+/+/config"));
            assert!(grant.may_subscribe(&topics::ha_state(&node)));
            assert!(grant.may_subscribe(topics::ALL_HA_STATES));
            assert!(grant.may_subscribe(&topics::node(&node, NodeTopic::Status)));
            // Home Assistant's birth message and last will.
            assert!(grant.may_publish("homeassistant/status"));
            // Configs and states come from the coordinator only.
            assert!(!grant.may_publish(&format!(
                "homeassistant/sensor/ambient_{node}/temperature/config"
            )));
            assert!(!grant.may_publish(&topics::ha_state(&node)));
            // Presence, yes; the rest of a node's traffic, no.
            assert!(!grant.may_subscribe(&topics::node(&node, NodeTopic::Tasks)));
            assert!(!grant.may_subscribe(&topics::all_nodes(NodeTopic::Telemetry)));
            assert!(!grant.may_subscribe("#"));
        }
    }

    #[test]
    fn with_home_assistant_on_a_device_still_publishes_only_its_own_topics() {
        let identity = Identity::from_secret(&[1; 32]);
        let (user, pass) = device_login(&identity, NOW);
        let client = format!("ambient-agent-{user}");
        let grant = with_home_assistant()
            .admit(&credentials(&client, Some((&user, &pass)), "10.0.0.2:1"))
            .unwrap();
        let node = identity.node_id();
        assert!(!grant.may_publish(&topics::ha_state(&node)));
        assert!(!grant.may_publish(&format!(
            "homeassistant/sensor/ambient_{node}/temperature/config"
        )));
        assert!(!grant.may_publish("homeassistant/status"));
        assert!(!grant.may_subscribe("homeassistant/#"));
        assert!(grant.may_publish(&topics::node(&node, NodeTopic::Status)));
    }

    #[test]
    fn with_home_assistant_off_clients_read_neither_discovery_nor_presence() {
        let grant = admit("home-assistant", None, "127.0.0.1:5000").unwrap();
        let node = Identity::from_secret(&[1; 32]).node_id();
        assert!(!grant.may_subscribe("homeassistant/#"));
        assert!(!grant.may_subscribe(topics::ALL_HA_STATES));
        assert!(!grant.may_subscribe(&topics::node(&node, NodeTopic::Status)));
        assert!(!grant.may_publish("homeassistant/status"));
    }

    #[test]
    fn only_the_coordinators_key_signs_in_as_coordinator() {
        let me = Identity::from_secret(&[9; 32]);
        let token = ConnectToken::sign(&me, COORDINATOR_USER, NOW).to_hex();
        let grant = admit(
            "ambient-coordinator",
            Some((COORDINATOR_USER, &token)),
            "127.0.0.1:1",
        )
        .unwrap();
        assert!(grant.may_subscribe("#"));
        let impostor = Identity::from_secret(&[8; 32]);
        let token = ConnectToken::sign(&impostor, COORDINATOR_USER, NOW).to_hex();
        assert!(
            admit(
                "ambient-coordinator",
                Some((COORDINATOR_USER, &token)),
                "127.0.0.1:1"
            )
            .is_err()
        );
        assert!(admit("x", Some(("root", "toor")), "127.0.0.1:1").is_err());
    }
}
