//! The broker URL both binaries accept.

use std::fmt;

use crate::Error;

/// A broker address: `mqtt://[user[:password]@]host[:port]` or `mqtts://…`.
///
/// Ports default to 1883 and 8883. `Display` shows the password as `****`.
///
/// ```
/// let url: ambient_mqtt::BrokerUrl = "mqtts://node-7:s%40fe@[::1]".parse().unwrap();
/// assert_eq!((url.host(), url.port(), url.is_tls()), ("::1", 8883, true));
/// assert_eq!((url.username(), url.password()), (Some("node-7"), Some("s@fe")));
/// assert_eq!(url.to_string(), "mqtts://node-7:****@[::1]:8883");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    tls: bool,
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
}

impl BrokerUrl {
    /// Whether the connection uses TLS (`mqtts://`).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Host name or address (without brackets for IPv6).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user, if the URL names one.
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    /// The password, if the URL has one.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The same broker without user and password.
    #[must_use]
    pub fn without_credentials(&self) -> BrokerUrl {
        BrokerUrl {
            username: None,
            password: None,
            ..self.clone()
        }
    }
}

impl std::str::FromStr for BrokerUrl {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Url(redact(s));
        let (scheme, rest) = s.split_once("://").ok_or_else(bad)?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "mqtt" | "tcp" => false,
            "mqtts" | "ssl" => true,
            _ => return Err(bad()),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (userinfo, authority) = match rest.rsplit_once('@') {
            Some((userinfo, authority)) => (Some(userinfo), authority),
            None => (None, rest),
        };
        if authority.is_empty() || authority.contains(['/', '?', '#', ' ']) {
            return Err(bad());
        }
        let (username, password) = match userinfo {
            None => (None, None),
            Some(info) => {
                let (user, password) = match info.split_once(':') {
                    Some((u, p)) => (u, Some(decode(p).ok_or_else(bad)?)),
                    None => (info, None),
                };
                if user.is_empty() {
                    return Err(bad());
                }
                (Some(decode(user).ok_or_else(bad)?), password)
            }
        };
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(p) => (host, p.parse().map_err(|_| bad())?),
                None if after.is_empty() => (host, default_port),
                None => return Err(bad()),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| bad())?),
                None => (authority, default_port),
            }
        };
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
            username,
            password,
        })
    }
}

/// Percent-decoding of `%XX` escapes; `None` for a broken escape or non-UTF-8 result.
fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `s` with every byte outside RFC 3986's unreserved set and sub-delimiters written as `%XX`,
/// so a user name holding `:`, `@` or `%` reads back as itself.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `s` with any password replaced by `****`, for logs and error messages.
pub fn redact(s: &str) -> String {
    match s.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((info, authority)) => match info.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:****@{authority}"),
                None => s.to_owned(),
            },
            None => s.to_owned(),
        },
        None => s.to_owned(),
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://")?;
        if let Some(user) = &self.username {
            f.write_str(&encode(user))?;
            if self.password.is_some() {
                f.write_str(":****")?;
            }
            f.write_str("@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrl({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_ports_and_ipv6() {
        let u: BrokerUrl = "mqtt://gateway.local".parse().unwrap();
        assert_eq!(
            (u.host(), u.port(), u.is_tls()),
            ("gateway.local", 1883, false)
        );
        let u: BrokerUrl = "mqtts://[::1]:9000".parse().unwrap();
        assert_eq!((u.host(), u.port(), u.is_tls()), ("::1", 9000, true));
        assert_eq!(u.to_string(), "mqtts://[::1]:9000");
        let u: BrokerUrl = "tcp://10.0.0.1:1884/".parse().unwrap();
        assert_eq!((u.host(), u.port()), ("10.0.0.1", 1884));
        for bad in [
            "127.0.0.1:1883",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://@h",
            "mqtt://u:%zz@h",
            "ws://h",
            "mqtt://h/path",
        ] {
            assert!(bad.parse::<BrokerUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn user_and_password_are_decoded_and_the_password_never_printed() {
        let u: BrokerUrl = "mqtts://dev%3A1:p%40ss:w@broker:8884".parse().unwrap();
        assert_eq!(u.username(), Some("dev:1"));
        assert_eq!(u.password(), Some("p@ss:w"));
        assert_eq!(u.to_string(), "mqtts://dev%3A1:****@broker:8884");
        assert!(!format!("{u:?}").contains("p@ss"));
        // A user name with `:`, `@` or `%` is written so it reads back as itself.
        let u: BrokerUrl = "mqtt://a%25b%40c@broker".parse().unwrap();
        assert_eq!(u.username(), Some("a%b@c"));
        let again: BrokerUrl = u.to_string().parse().unwrap();
        assert_eq!(again.username(), Some("a%b@c"));
        let u: BrokerUrl = "mqtt://only-user@broker".parse().unwrap();
        assert_eq!((u.username(), u.password()), (Some("only-user"), None));
        assert_eq!(u.without_credentials().to_string(), "mqtt://broker:1883");
        let err = "ws://u:secret@h"
            .parse::<BrokerUrl>()
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }
}
