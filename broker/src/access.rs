//! Who may connect, and what each connection may publish and subscribe to.
//!
//! A [`Gatekeeper`] decides each CONNECT from its client id, username, password and peer
//! address, and answers with a [`Grant`]: a principal (who the client is) and the topic
//! filters it may publish to and subscribe within. The router then holds every connection to
//! its grant:
//!
//! - a PUBLISH outside the grant is acknowledged as usual (a QoS 1 sender would otherwise
//!   retransmit it forever) but delivered to nobody, and counted in
//!   [`BrokerStats::denied`](crate::BrokerStats::denied), as mosquitto does;
//! - a SUBSCRIBE outside it gets the failure code `0x80` in SUBACK;
//! - a will outside it refuses the CONNECT;
//! - a client id whose session belongs to another principal is refused (CONNACK 5), never
//!   taken over, so nobody can knock a device off the broker or inherit its queued messages
//!   by reusing its client id.
//!
//! Without a gatekeeper ([`Open`]) everyone is the same principal and may do anything: plain
//! MQTT 3.1.1.

use std::net::SocketAddr;

use crate::topic;

/// What a client presented at CONNECT.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// The client id, as sent (possibly empty).
    pub client_id: &'a str,
    /// The username, if any.
    pub username: Option<&'a str>,
    /// The password, if any, as text (a non-UTF-8 password is passed as `None`).
    pub password: Option<&'a str>,
    /// Where the connection comes from.
    pub peer: SocketAddr,
    /// The broker's wall clock, in milliseconds since the Unix epoch.
    pub now_ms: u64,
}

/// Why a CONNECT was refused; sent as the CONNACK return code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Return code 4: the username or password is wrong.
    BadCredentials(String),
    /// Return code 5: this client may not connect (or not with this client id).
    NotAuthorized(String),
}

/// Who a connection is and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Who the client is, for logs and session ownership: a session created under one
    /// principal cannot be resumed or taken over under another.
    pub principal: String,
    /// Topic filters the client may publish to.
    pub publish: Vec<String>,
    /// Topic filters the client may subscribe within: a subscription is allowed when every
    /// topic it could match is matched by one of these.
    pub subscribe: Vec<String>,
}

impl Grant {
    /// `principal` may publish and subscribe to anything.
    pub fn everything(principal: impl Into<String>) -> Self {
        Grant {
            principal: principal.into(),
            publish: vec!["#".into()],
            subscribe: vec!["#".into()],
        }
    }

    /// Whether a PUBLISH to `topic_name` is allowed.
    pub fn may_publish(&self, topic_name: &str) -> bool {
        self.publish
            .iter()
            .any(|filter| topic::matches(topic_name, filter))
    }

    /// Whether a subscription to `filter` (without any `$share/<group>/` prefix) is allowed.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        self.subscribe
            .iter()
            .any(|allowed| topic::covers(allowed, filter))
    }
}

/// Decides each CONNECT. Called once per connection, outside the router's lock, so it may
/// take the time a signature check takes.
pub trait Gatekeeper: Send + Sync + 'static {
    /// The grant for this client, or why it is refused.
    ///
    /// # Errors
    /// A [`Refusal`], sent to the client as its CONNACK return code.
    fn admit(&self, credentials: &Credentials<'_>) -> Result<Grant, Refusal>;
}

/// Admits everyone with every right, as one principal: no authentication at all.
#[derive(Debug, Clone, Copy, Default)]
pub struct Open;

impl Gatekeeper for Open {
    fn admit(&self, _: &Credentials<'_>) -> Result<Grant, Refusal> {
        Ok(Grant::everything("anonymous"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Grant {
        Grant {
            principal: "node:ab".into(),
            publish: vec!["nodes/ab/+".into()],
            subscribe: vec!["nodes/ab/tasks".into(), "modules/+".into()],
        }
    }

    #[test]
    fn a_grant_allows_publishing_only_to_topics_its_filters_match() {
        let grant = device();
        assert!(grant.may_publish("nodes/ab/results"));
        assert!(!grant.may_publish("nodes/cd/results"));
        assert!(!grant.may_publish("nodes/ab/results/extra"));
        assert!(!grant.may_publish("tasks/submit"));
    }

    #[test]
    fn a_grant_allows_only_subscriptions_it_covers_entirely() {
        let grant = device();
        assert!(grant.may_subscribe("nodes/ab/tasks"));
        assert!(grant.may_subscribe("modules/+"));
        assert!(grant.may_subscribe("modules/abc"));
        assert!(!grant.may_subscribe("modules/#"));
        assert!(!grant.may_subscribe("nodes/+/tasks"));
        assert!(!grant.may_subscribe("#"));
        assert!(Grant::everything("x").may_subscribe("#"));
        assert!(Grant::everything("x").may_publish("any/thing"));
    }
}
