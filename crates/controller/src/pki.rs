//! A small private CA for deployments without one: a CA, a server certificate for the
//! controller's names, and client certificates for mutual TLS. Used by
//! `mig-controller certs` and by the tests. Keys are ECDSA P-256.

use chrono::{Datelike, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::Path;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A certificate and its private key, PEM. `Debug` hides the key.
#[derive(Clone)]
pub struct Pem {
    pub cert: String,
    pub key: String,
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pem")
            .field("cert", &self.cert.len())
            .finish_non_exhaustive()
    }
}

/// Valid from yesterday (clock skew) for `days` days.
fn set_validity(p: &mut CertificateParams, days: i64) {
    let ymd =
        |t: chrono::DateTime<Utc>| rcgen::date_time_ymd(t.year(), t.month() as u8, t.day() as u8);
    p.not_before = ymd(Utc::now() - chrono::Duration::days(1));
    p.not_after = ymd(Utc::now() + chrono::Duration::days(days));
}

/// A new CA.
pub fn new_ca(name: &str, days: i64) -> Result<Pem, PkiError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut p, days);
    let cert = p.self_signed(&key)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Which side of a connection a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// A leaf certificate signed by `ca`: for a server, `names` are its DNS names / IP addresses;
/// for a client, the first name is its common name.
pub fn issue(ca: &Pem, usage: Usage, names: &[String], days: i64) -> Result<Pem, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(names.to_vec())?;
    if let Some(first) = names.first() {
        p.distinguished_name
            .push(DnType::CommonName, first.as_str());
    }
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![match usage {
        Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    p.use_authority_key_identifier_extension = true;
    set_validity(&mut p, days);
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Writes `pem` as `<dir>/<stem>.pem` (0644) and `<dir>/<stem>-key.pem` (0600).
pub fn write(dir: &Path, stem: &str, pem: &Pem) -> Result<(), PkiError> {
    let cert_path = dir.join(format!("{stem}.pem"));
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&cert_path, &pem.cert))
        .map_err(|source| PkiError::Write {
            path: cert_path.display().to_string(),
            source,
        })?;
    let key_path = dir.join(format!("{stem}-key.pem"));
    crate::auth::credential::write_secret_file(&key_path, pem.key.trim_end()).map_err(|source| {
        PkiError::Write {
            path: key_path.display().to_string(),
            source,
        }
    })
}

/// Reads `<dir>/<stem>.pem` and `<dir>/<stem>-key.pem`.
pub fn read(dir: &Path, stem: &str) -> Result<Pem, PkiError> {
    let load = |name: String| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| PkiError::Read {
            path: path.display().to_string(),
            source,
        })
    };
    Ok(Pem {
        cert: load(format!("{stem}.pem"))?,
        key: load(format!("{stem}-key.pem"))?,
    })
}
