//! How Ambient's binaries reach an MQTT broker.
//!
//! - [`BrokerUrl`]: `mqtt://[user[:password]@]host[:port]` or `mqtts://…` (also `tcp://`,
//!   `ssl://`), the one grammar both binaries accept. User and password are percent-decoded.
//! - [`TlsFiles`]: where the CA and an optional client certificate come from for `mqtts://`.
//! - [`client_options`]: rumqttc options for a URL: host, port, credentials and transport.
//! - [`Backoff`]: jittered exponential delays between reconnection attempts.
//!
//! Everything else about a connection (session, keep-alive, packet sizes, manual acks) is the
//! caller's choice and stays with the caller.

#![deny(missing_docs)]

mod backoff;
mod tls;
mod url;

pub use backoff::Backoff;
pub use tls::TlsFiles;
pub use url::{BrokerUrl, redact};

use rumqttc::MqttOptions;

/// Why client options could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The broker URL does not parse.
    #[error("invalid broker URL {0:?}: expected {EXPECTED}")]
    Url(String),
    /// A TLS file is missing or unusable, or this build has no TLS.
    #[error("TLS: {0}")]
    Tls(String),
}

/// What a broker URL looks like, for error messages and `--help`.
pub const EXPECTED: &str = "mqtt://[user[:password]@]host[:port] or mqtts://… for TLS";

/// Options for `client_id` on `url`: host and port, the URL's user and password if it has
/// them, and TLS with `tls` for `mqtts://`.
///
/// # Errors
/// [`Error::Tls`] when a TLS file cannot be read or the build has no TLS.
pub fn client_options(
    url: &BrokerUrl,
    client_id: impl Into<String>,
    tls: &TlsFiles,
) -> Result<MqttOptions, Error> {
    let mut opts = MqttOptions::new(client_id, url.host(), url.port());
    if let Some(user) = url.username() {
        opts.set_credentials(user, url.password().unwrap_or_default());
    }
    if url.is_tls() {
        opts.set_transport(tls.transport()?);
    }
    Ok(opts)
}
