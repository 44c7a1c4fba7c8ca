//! TLS for both listeners (rustls, aws-lc-rs provider): certificate chain and key from PEM
//! files, optional mutual TLS against a client CA, and reload on change without a restart.
//!
//! [`TlsFiles`] keeps the current configs behind a lock; every new connection takes the
//! current one, so a reload affects new connections only. [`TlsFiles::watch`] polls the files'
//! modification times and rebuilds on a change; a broken new file is logged and the old
//! config stays in use.

use crate::config::TlsSettings;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{what} {path} holds no {expected}")]
    Empty {
        what: &'static str,
        path: String,
        expected: &'static str,
    },
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

/// The rustls crypto provider used everywhere (explicit, so no process default is needed).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads every certificate of a PEM file.
pub fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let shown = path.display().to_string();
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Read {
            what,
            path: shown.clone(),
            reason: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read {
            what,
            path: shown.clone(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: shown,
            expected: "PEM certificate",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The error of a key parser can quote the file; only say what went wrong.
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Read {
        what: "TLS key",
        path: path.display().to_string(),
        reason: match e {
            rustls_pki_types::pem::Error::NoItemsFound => "no PEM private key found".into(),
            rustls_pki_types::pem::Error::Io(io) => io.to_string(),
            _ => "not a valid PEM private key".into(),
        },
    })
}

/// Builds a server config from `s` offering `alpn`.
pub fn server_config(s: &TlsSettings, alpn: &[&[u8]]) -> Result<ServerConfig, TlsError> {
    let certs = read_certs("TLS certificate", &s.cert_file)?;
    let key = read_key(&s.key_file)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &s.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs("client CA", ca)? {
                roots
                    .add(c)
                    .map_err(|e| TlsError::Config(format!("client CA {}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(format!("certificate and key do not fit: {e}")))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The HTTP listener speaks HTTP/1.1; the gRPC listener HTTP/2.
pub const HTTP_ALPN: &[&[u8]] = &[b"http/1.1"];
pub const GRPC_ALPN: &[&[u8]] = &[b"h2"];

#[derive(Debug)]
struct Current {
    http: Arc<ServerConfig>,
    grpc: Arc<ServerConfig>,
    stamps: Vec<Option<SystemTime>>,
}

/// The live TLS configs of both listeners.
#[derive(Debug)]
pub struct TlsFiles {
    settings: TlsSettings,
    current: RwLock<Current>,
    /// Reloads that found the new files unusable (the old configs stayed).
    rejected: std::sync::atomic::AtomicU64,
}

fn stamps(s: &TlsSettings) -> Vec<Option<SystemTime>> {
    let files: Vec<&PathBuf> = [&s.cert_file, &s.key_file]
        .into_iter()
        .chain(s.client_ca_file.as_ref())
        .collect();
    files
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

impl TlsFiles {
    pub fn load(settings: &TlsSettings) -> Result<Arc<TlsFiles>, TlsError> {
        let current = Current {
            stamps: stamps(settings),
            http: Arc::new(server_config(settings, HTTP_ALPN)?),
            grpc: Arc::new(server_config(settings, GRPC_ALPN)?),
        };
        Ok(Arc::new(TlsFiles {
            settings: settings.clone(),
            current: RwLock::new(current),
            rejected: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    pub fn http(&self) -> Arc<ServerConfig> {
        self.read().http.clone()
    }

    pub fn grpc(&self) -> Arc<ServerConfig> {
        self.read().grpc.clone()
    }

    /// How many reloads found changed files unusable and kept the previous configs.
    pub fn rejected_reloads(&self) -> u64 {
        self.rejected.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn mutual(&self) -> bool {
        self.settings.client_ca_file.is_some()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Rebuilds the configs if a file changed. `Ok(true)` when reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamps(&self.settings);
        if self.read().stamps == now {
            return Ok(false);
        }
        let http = Arc::new(server_config(&self.settings, HTTP_ALPN)?);
        let grpc = Arc::new(server_config(&self.settings, GRPC_ALPN)?);
        let mut cur = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *cur = Current {
            http,
            grpc,
            stamps: now,
        };
        Ok(true)
    }

    /// Checks for changed files every reload interval until `stop`.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.reload_if_changed() {
                Ok(true) => {
                    tracing::info!(cert = %self.settings.cert_file.display(), "TLS certificates reloaded");
                    last_error = None;
                }
                Ok(false) => {}
                Err(e) => {
                    self.rejected
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let text = e.to_string();
                    if last_error.as_ref() != Some(&text) {
                        tracing::error!(error = %text, "New TLS files are unusable; keeping the previous ones");
                        last_error = Some(text);
                    }
                }
            }
        }
    }
}
