//! TLS for `mqtts://`: which CA to trust, and an optional client certificate.

use std::path::PathBuf;

use rumqttc::Transport;

use crate::Error;

/// Where the certificates for `mqtts://` come from.
///
/// With no `ca_file` the system's root certificates are trusted (a broker with a public
/// certificate); with one, only the CA certificates in it (a private CA, the usual case on a
/// LAN). `cert_file` and `key_file` together present a client certificate (PEM; the key in
/// PKCS#8, PKCS#1 or SEC1), for brokers that require one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM file of the CA certificates to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate chain.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub key_file: Option<PathBuf>,
}

impl TlsFiles {
    /// The rumqttc transport for these files.
    ///
    /// # Errors
    /// [`Error::Tls`] naming the file that is missing or unusable, or saying this build has
    /// no TLS.
    #[cfg(feature = "tls")]
    pub fn transport(&self) -> Result<Transport, Error> {
        use std::sync::Arc;

        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        let tls_err = |what: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
            Error::Tls(format!("{what} {}: {e}", path.display()))
        };
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| tls_err("cannot read the CA file", path, &e))?;
                for cert in certs {
                    let cert = cert.map_err(|e| tls_err("bad certificate in", path, &e))?;
                    roots
                        .add(cert)
                        .map_err(|e| tls_err("unusable CA certificate in", path, &e))?;
                }
                if roots.is_empty() {
                    return Err(Error::Tls(format!(
                        "no certificate in the CA file {}",
                        path.display()
                    )));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _ignored) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(Error::Tls(
                        "no usable system root certificates were found; name a CA file".into(),
                    ));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(|e| tls_err("cannot read the certificate file", cert, &e))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| tls_err("bad certificate in", cert, &e))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| tls_err("cannot read the key file", key, &e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| Error::Tls(format!("client certificate: {e}")))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => {
                return Err(Error::Tls(
                    "a client certificate needs both cert_file and key_file".into(),
                ));
            }
        };
        Ok(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
        ))
    }

    /// Without the `tls` feature, `mqtts://` is refused with a clear message.
    ///
    /// # Errors
    /// Always [`Error::Tls`].
    #[cfg(not(feature = "tls"))]
    pub fn transport(&self) -> Result<Transport, Error> {
        Err(Error::Tls(
            "mqtts:// is not supported in this build (built without the `tls` feature)".into(),
        ))
    }
}
