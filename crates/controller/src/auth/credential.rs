//! VM credentials: compact tokens the controller signs (HMAC-SHA256) and verifies with no
//! store lookup.
//!
//! Form: `migvm1.<base64url(JSON claims)>.<base64url(HMAC-SHA256(key, "migvm1." + claims))>`.
//! The claims bind the token to one `vm_id` and pool, with issue and expiry times and the
//! time of the enrollment it descends from (refreshes keep that, so a credential chain ends
//! `max_lifetime` after the VM proved its identity). The key lives in a file (created with
//! mode 0600 if missing), so every replica that shares the file accepts the same tokens.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use thiserror::Error;

const PREFIX: &str = "migvm1.";
/// Tokens longer than this are refused before any work.
const MAX_LEN: usize = 2048;
/// Leeway for `iat` in the future (clock steps between replicas).
const SKEW_SECS: i64 = 60;

/// What a verified credential says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmClaims {
    #[serde(rename = "vm")]
    pub vm_id: String,
    #[serde(rename = "pool")]
    pub pool_id: String,
    /// Unix seconds.
    #[serde(rename = "iat")]
    pub issued_at: i64,
    /// Unix seconds.
    #[serde(rename = "exp")]
    pub expires_at: i64,
    /// Unix seconds of the identity proof this credential descends from.
    #[serde(rename = "enr")]
    pub enrolled_at: i64,
    /// Random id, for logs.
    #[serde(rename = "jti")]
    pub credential_id: String,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("not a controller credential")]
    Malformed,
    #[error("credential signature does not verify")]
    BadSignature,
    #[error("credential expired")]
    Expired,
    #[error("credential issued in the future")]
    NotYetValid,
}

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("failed to read credential key file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to create credential key file {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("credential key file {path} must hold at least 32 bytes of base64 key material")]
    TooShort { path: String },
    #[error("no randomness available to create a credential key")]
    Random,
}

/// The signing key. `Debug` never shows it.
#[derive(Clone)]
pub struct CredentialKey {
    key: aws_lc_rs::hmac::Key,
}

impl fmt::Debug for CredentialKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CredentialKey([REDACTED])")
    }
}

impl CredentialKey {
    pub fn from_bytes(bytes: &[u8]) -> CredentialKey {
        CredentialKey {
            key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, bytes),
        }
    }

    /// Reads the key file (base64), creating it with a fresh random key if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<CredentialKey, KeyError> {
        let shown = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = B64
                    .decode(text.trim().trim_end_matches('='))
                    .ok()
                    .filter(|b| b.len() >= 32)
                    .ok_or(KeyError::TooShort {
                        path: shown.clone(),
                    })?;
                Ok(CredentialKey::from_bytes(&bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes = super::random_bytes(32).map_err(|_| KeyError::Random)?;
                write_secret_file(path, &B64.encode(&bytes)).map_err(|source| KeyError::Write {
                    path: shown,
                    source,
                })?;
                Ok(CredentialKey::from_bytes(&bytes))
            }
            Err(source) => Err(KeyError::Read {
                path: shown,
                source,
            }),
        }
    }

    /// Signs `claims` into a credential.
    pub fn issue(&self, claims: &VmClaims) -> String {
        // Serializing a struct of strings and integers cannot fail.
        let body = serde_json::to_vec(claims).unwrap_or_default();
        let signed = format!("{PREFIX}{}", B64.encode(body));
        let tag = aws_lc_rs::hmac::sign(&self.key, signed.as_bytes());
        format!("{signed}.{}", B64.encode(tag.as_ref()))
    }

    /// Verifies `token` at `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<VmClaims, CredentialError> {
        if token.len() > MAX_LEN || !token.starts_with(PREFIX) {
            return Err(CredentialError::Malformed);
        }
        let (signed, tag) = token.rsplit_once('.').ok_or(CredentialError::Malformed)?;
        let tag = B64.decode(tag).map_err(|_| CredentialError::Malformed)?;
        aws_lc_rs::hmac::verify(&self.key, signed.as_bytes(), &tag)
            .map_err(|_| CredentialError::BadSignature)?;
        let body = B64
            .decode(&signed[PREFIX.len()..])
            .map_err(|_| CredentialError::Malformed)?;
        let claims: VmClaims =
            serde_json::from_slice(&body).map_err(|_| CredentialError::Malformed)?;
        if claims.expires_at <= now {
            return Err(CredentialError::Expired);
        }
        if claims.issued_at > now + SKEW_SECS {
            return Err(CredentialError::NotYetValid);
        }
        Ok(claims)
    }
}

/// Writes `text` to a new file only the owner can read (0600), atomically.
pub fn write_secret_file(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> VmClaims {
        VmClaims {
            vm_id: "vm-1".into(),
            pool_id: "pool-a".into(),
            issued_at: 1000,
            expires_at: exp,
            enrolled_at: 1000,
            credential_id: "abc".into(),
        }
    }

    #[test]
    fn round_trip_and_every_kind_of_tampering() {
        let key = CredentialKey::from_bytes(&[7u8; 32]);
        let token = key.issue(&claims(2000));
        assert_eq!(key.verify(&token, 1500), Ok(claims(2000)));
        assert_eq!(key.verify(&token, 2000), Err(CredentialError::Expired));
        assert_eq!(key.verify(&token, 1000 - SKEW_SECS), Ok(claims(2000)));
        assert_eq!(
            key.verify(&token, 1000 - SKEW_SECS - 1),
            Err(CredentialError::NotYetValid)
        );
        // Another key.
        let other = CredentialKey::from_bytes(&[8u8; 32]);
        assert_eq!(
            other.verify(&token, 1500),
            Err(CredentialError::BadSignature)
        );
        // Claims swapped for another VM's, signature kept.
        let forged_body = B64.encode(
            serde_json::to_vec(&VmClaims {
                vm_id: "vm-2".into(),
                ..claims(2000)
            })
            .unwrap_or_default(),
        );
        let sig = token.rsplit_once('.').map(|(_, s)| s).unwrap_or_default();
        let forged = format!("{PREFIX}{forged_body}.{sig}");
        assert_eq!(
            key.verify(&forged, 1500),
            Err(CredentialError::BadSignature)
        );
        // Garbage.
        for bad in ["", "migvm1.", "migvm1.a.b", "Bearer x", &"m".repeat(5000)] {
            assert!(key.verify(bad, 1500).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn key_file_is_created_private_and_reused() -> Result<(), Box<dyn std::error::Error>> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sub/credential.key");
        let a = CredentialKey::load_or_create(&path)?;
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = CredentialKey::load_or_create(&path)?;
        let token = a.issue(&claims(2000));
        assert!(b.verify(&token, 1500).is_ok());
        std::fs::write(&path, "c2hvcnQ=")?;
        assert!(matches!(
            CredentialKey::load_or_create(&path),
            Err(KeyError::TooShort { .. })
        ));
        Ok(())
    }
}
