//! TLS termination with rustls (the `ring` provider, which builds on Linux, macOS and
//! Windows): certificate chain and key from PEM files, ALPN `h2`, optional client-certificate
//! authentication, a bounded handshake, and reloading: on SIGHUP and when the files change,
//! new connections get the new certificate while open ones keep theirs; a reload with bad
//! files keeps the old certificate and says why.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use metrics::counter;
use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// Settings of TLS termination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to; none: no client auth.
    pub client_ca: Option<PathBuf>,
    /// A client that has not completed its handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// How often the files are looked at for changes.
    pub watch_interval: Duration,
}

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {path}: {problem}")]
pub struct TlsError {
    /// The config key naming the file (`tls.cert`, `tls.key`, `tls.client_ca`).
    pub key: &'static str,
    /// The file.
    pub path: String,
    /// What is wrong with it.
    pub problem: String,
}

fn file_error(key: &'static str, path: &Path, problem: impl ToString) -> TlsError {
    TlsError {
        key,
        path: path.display().to_string(),
        problem: problem.to_string(),
    }
}

fn pem_problem(e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => io.to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => {
            "no PEM item of the right kind in it".to_owned()
        }
        other => format!("not valid PEM ({other:?})"),
    }
}

/// Builds the rustls configuration from the files.
fn load(config: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert)
        .map_err(|e| file_error("tls.cert", &config.cert, pem_problem(e)))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error("tls.cert", &config.cert, pem_problem(e)))?;
    if certs.is_empty() {
        return Err(file_error("tls.cert", &config.cert, "no certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key)
        .map_err(|e| file_error("tls.key", &config.key, pem_problem(e)))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| file_error("tls.cert", &config.cert, e))?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(ca)
                .map_err(|e| file_error("tls.client_ca", ca, pem_problem(e)))?;
            for cert in cas {
                let cert = cert.map_err(|e| file_error("tls.client_ca", ca, pem_problem(e)))?;
                roots
                    .add(cert)
                    .map_err(|e| file_error("tls.client_ca", ca, e))?;
            }
            if roots.is_empty() {
                return Err(file_error("tls.client_ca", ca, "no CA certificate in it"));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| file_error("tls.client_ca", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_single_cert(certs, key).map_err(|e| {
        file_error(
            "tls.key",
            &config.key,
            format!("does not fit the certificate ({e})"),
        )
    })?;
    // gRPC is HTTP/2; both modes hand the worker HTTP/2, so that is all that is offered.
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(server))
}

/// Modification times of the files, to notice changes.
fn stamps(config: &TlsConfig) -> Vec<Option<SystemTime>> {
    [
        Some(&config.cert),
        Some(&config.key),
        config.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    .collect()
}

/// Why a client's handshake failed; a metric label.
fn failure_reason(e: &io::Error) -> &'static str {
    if e.kind() == io::ErrorKind::TimedOut {
        return "timeout";
    }
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::NoCertificatesPresented) => "no_client_certificate",
        Some(rustls::Error::InvalidCertificate(_)) => "bad_client_certificate",
        Some(rustls::Error::InvalidMessage(_)) => "not_tls",
        Some(rustls::Error::NoApplicationProtocol) => "no_alpn_overlap",
        Some(_) => "protocol",
        None if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
        ) =>
        {
            "client_closed"
        }
        None => "io",
    }
}

/// The TLS terminator: the current configuration, replaced whole on reload.
#[derive(Debug)]
pub struct Tls {
    /// The files and timeouts; a reload may name other files.
    config: RwLock<TlsConfig>,
    current: RwLock<Arc<ServerConfig>>,
    /// The files' modification times when last loaded.
    loaded: Mutex<Vec<Option<SystemTime>>>,
}

impl Tls {
    /// Loads the files; an error names the file and the problem.
    pub fn new(config: TlsConfig) -> Result<Self, TlsError> {
        let server = load(&config)?;
        Ok(Self {
            loaded: Mutex::new(stamps(&config)),
            current: RwLock::new(server),
            config: RwLock::new(config),
        })
    }

    fn config(&self) -> TlsConfig {
        self.config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Loads the files again; on success new connections get the new configuration, on
    /// failure the old one stays and the error says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.replace(self.config())
    }

    /// Loads the files `config` names (a reload of the configuration): on success new
    /// connections get them and `config`'s timeouts, on failure nothing changes.
    pub fn replace(&self, config: TlsConfig) -> Result<(), TlsError> {
        let stamped = stamps(&config);
        let server = load(&config)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = server;
        *self.loaded.lock().unwrap_or_else(PoisonError::into_inner) = stamped;
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = config;
        Ok(())
    }

    /// Reloads and logs the outcome.
    pub fn reload_and_log(&self, why: &str) {
        match self.reload() {
            Ok(()) => tracing::info!(why, "TLS certificate reloaded"),
            Err(e) => {
                tracing::error!(why, error = %e, "TLS reload failed; keeping the previous certificate")
            }
        }
    }

    /// Completes a client's handshake, bounded by the handshake timeout. Failures are
    /// counted by reason and logged at debug: they are the client's business.
    pub async fn accept(&self, stream: TcpStream) -> Option<TlsStream<TcpStream>> {
        let acceptor = TlsAcceptor::from(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ));
        let handshake_timeout = self
            .config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .handshake_timeout;
        let result = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        };
        match result {
            Ok(s) => Some(s),
            Err(e) => {
                let reason = failure_reason(&e);
                counter!(m::TLS_HANDSHAKE_ERRORS, "reason" => reason).increment(1);
                tracing::debug!(error = %e, reason, "TLS handshake failed");
                None
            }
        }
    }

    /// Watches the files and reloads when they change, until `stop`.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let config = self.config();
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(config.watch_interval) => {}
            }
            let now = stamps(&self.config());
            let changed = *self.loaded.lock().unwrap_or_else(PoisonError::into_inner) != now;
            if changed {
                self.reload_and_log("files changed");
                // Whatever the outcome, do not retry the same files every tick.
                *self.loaded.lock().unwrap_or_else(PoisonError::into_inner) = now;
            }
        }
    }
}
