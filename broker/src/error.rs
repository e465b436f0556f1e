//! Errors of a broker.

use std::io;
use std::net::SocketAddr;

/// Why a [`Broker`](crate::Broker) could not start or keep serving.
///
/// Errors of single connections (malformed packets, resets, keep-alive expiry) are not here:
/// they close that connection, are logged at debug level, and never stop the broker.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Another process already listens on the address.
    #[error(
        "{addr} is already in use (another MQTT broker such as mosquitto?): pass a free --listen address such as {}:0, or use that broker with --broker mqtt://{addr}",
        addr.ip()
    )]
    AddressInUse {
        /// The address that was asked for.
        addr: SocketAddr,
    },
    /// The address belongs to no interface of this machine.
    #[error(
        "{addr} is not an address of this machine: pass one of its addresses, such as 127.0.0.1:{port} or 0.0.0.0:{port}",
        port = addr.port()
    )]
    AddressNotAvailable {
        /// The address that was asked for.
        addr: SocketAddr,
    },
    /// The operating system refused the port, typically one below 1024 without privileges.
    #[error(
        "not permitted to listen on {addr}: ports below 1024 need privileges, pass a port such as {}:1883",
        addr.ip()
    )]
    PermissionDenied {
        /// The address that was asked for.
        addr: SocketAddr,
    },
    /// The TLS listener's certificate or key could not be used.
    #[error("TLS listener: {0}")]
    Tls(String),
    /// Binding failed for another reason.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address that was asked for.
        addr: SocketAddr,
        /// What the operating system reported.
        source: io::Error,
    },
    /// The Unix socket listener could not be bound, or broke.
    #[error("cannot listen on the Unix socket {}", path.display())]
    Socket {
        /// The socket file's path.
        path: std::path::PathBuf,
        /// What the operating system reported.
        source: io::Error,
    },
    /// The listener itself broke while accepting connections.
    #[error("the listener on {addr} stopped accepting connections")]
    Accept {
        /// The address the broker listened on.
        addr: SocketAddr,
        /// What the operating system reported.
        source: io::Error,
    },
}

impl BrokerError {
    pub(crate) fn bind(addr: SocketAddr, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::AddrInUse => BrokerError::AddressInUse { addr },
            io::ErrorKind::AddrNotAvailable => BrokerError::AddressNotAvailable { addr },
            io::ErrorKind::PermissionDenied => BrokerError::PermissionDenied { addr },
            _ => BrokerError::Bind { addr, source },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_in_use_names_the_address_and_both_ways_out() {
        let addr: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        let error = BrokerError::bind(addr, io::Error::from(io::ErrorKind::AddrInUse));
        assert_eq!(
            error.to_string(),
            "127.0.0.1:1883 is already in use (another MQTT broker such as mosquitto?): pass a free \
             --listen address such as 127.0.0.1:0, or use that broker with --broker mqtt://127.0.0.1:1883"
        );
    }

    #[test]
    fn a_privileged_port_suggests_an_unprivileged_one() {
        let addr: SocketAddr = "0.0.0.0:883".parse().unwrap();
        let error = BrokerError::bind(addr, io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(
            error.to_string(),
            "not permitted to listen on 0.0.0.0:883: ports below 1024 need privileges, pass a port such as 0.0.0.0:1883"
        );
    }
}
