//! TLS to PostgreSQL, as each URL's `sslmode` asks.
//!
//! - `sslmode=require`: TLS, and the server's certificate must chain to a trusted root and name
//!   the host in the URL (what libpq calls `verify-full`: `require` without verification would
//!   let anyone on the path read the traffic by presenting any certificate). The roots are
//!   `database.tls_ca_file` (PEM) when set, else the system's (`/etc/ssl/certs` and the like;
//!   a `FROM scratch` image has none, so set the file there).
//! - `disable`, or nothing (`prefer`): plain TCP, as before. `prefer` does not try TLS, since a
//!   TLS that verifies nothing protects nothing, and one that verifies would refuse the
//!   self-signed certificates many servers have by default.
//!
//! rustls with the ring provider: no OpenSSL headers to build against, nothing to link.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_postgres::config::SslMode;
use tokio_postgres::{CancelToken, Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::Error;

/// A connection's driver: polled to completion by a task of its own.
pub(crate) type Driver = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send>>;

/// How connections to one database are made.
#[derive(Clone)]
pub(crate) enum Tls {
    /// Plain TCP.
    Off,
    /// TLS, the server's certificate verified.
    Verified(MakeRustlsConnect),
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Off => "Tls::Off",
            Self::Verified(_) => "Tls::Verified",
        })
    }
}

impl Tls {
    /// What `pg`'s `sslmode` asks for, with the roots from `ca_file` or the system.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when TLS is required and the CA file cannot be read or holds no
    /// certificate, or no file is set and the system has no roots.
    pub(crate) fn for_config(pg: &Config, ca_file: Option<&Path>) -> Result<Self, Error> {
        if pg.get_ssl_mode() != SslMode::Require {
            if let Some(path) = ca_file {
                tracing::warn!(
                    ca_file = %path.display(),
                    "database.tls_ca_file is set but the URL does not say sslmode=require: \
                     connecting without TLS"
                );
            }
            return Ok(Self::Off);
        }
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let certificates = CertificateDer::pem_file_iter(path)
                    .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                    .map_err(|e| {
                        Error::Config(format!(
                            "database.tls_ca_file {}: cannot read PEM certificates: {e}",
                            path.display()
                        ))
                    })?;
                let (added, _) = roots.add_parsable_certificates(certificates);
                if added == 0 {
                    return Err(Error::Config(format!(
                        "database.tls_ca_file {} holds no usable certificate",
                        path.display()
                    )));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(Error::Config(
                        "sslmode=require, but database.tls_ca_file is not set and this system \
                         has no CA certificates to verify the server with"
                            .to_owned(),
                    ));
                }
            }
        }
        // rustls 0.23.48 deprecates ring for having no post-quantum key exchange. aws-lc-rs has
        // one, but it builds a C library of its own (aws-lc-sys) into the first release build,
        // which has a 5-minute target. Classical ECDHE, as libpq with OpenSSL 3.0 does.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self::Verified(MakeRustlsConnect::new(config)))
    }

    /// Opens a connection to `pg`; the driver must be polled (spawned) for the client to work.
    pub(crate) async fn connect(
        &self,
        pg: &Config,
    ) -> Result<(Client, Driver), tokio_postgres::Error> {
        match self {
            Self::Off => {
                let (client, connection) = pg.connect(NoTls).await?;
                Ok((client, Box::pin(connection)))
            }
            Self::Verified(tls) => {
                let (client, connection) = pg.connect(tls.clone()).await?;
                Ok((client, Box::pin(connection)))
            }
        }
    }

    /// Sends a cancel request for what `token`'s connection runs, the way it was opened.
    pub(crate) async fn cancel(&self, token: &CancelToken) -> Result<(), tokio_postgres::Error> {
        match self {
            Self::Off => token.cancel_query(NoTls).await,
            Self::Verified(tls) => token.cancel_query(tls.clone()).await,
        }
    }
}
