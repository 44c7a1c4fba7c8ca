//! Enrollment: a VM proves who it is (GCE identity token or its pool's bootstrap secret) and
//! receives a credential bound to its `vm_id` and pool; and credential refresh.

use super::credential::{CredentialError, CredentialKey, VmClaims};
use super::gce::{self, GceError, GceRule, GoogleKeys};
use super::sha256_hex;
use crate::store::{Mutation, Outcome, Store, StoreError, VmLogRow};
use crate::token::Pools;
use chrono::{DateTime, Utc};
use miglet_proto::ids::{validate_id, validate_vm_id};
use miglet_proto::json::{EnrollMethod, EnrollRequest, EnrollResponse};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// How VMs of one pool may prove their identity. Both may be set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolEnrollment {
    /// File holding the pool's bootstrap secret, re-read at every use (so it can be rotated).
    pub bootstrap_secret_file: Option<PathBuf>,
    pub gce: Option<GceRule>,
}

/// Shortest bootstrap secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, Error)]
pub enum EnrollError {
    #[error("{0}")]
    BadRequest(String),
    /// The proof was refused; the message says why (it never echoes the proof).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("store failure")]
    Store(#[from] StoreError),
}

/// Settings of [`Enroller`].
#[derive(Debug, Clone)]
pub struct EnrollSettings {
    pub credential_ttl: Duration,
    /// A credential chain (enrollment plus refreshes) ends this long after enrollment.
    pub max_lifetime: Duration,
    /// The audience identity tokens must carry (the controller's URL as agents know it).
    pub audience: Option<String>,
    pub google_jwks_url: String,
    /// Identity tokens issued longer ago than this are refused.
    pub identity_max_age: Duration,
}

#[derive(Debug)]
pub struct Enroller {
    key: CredentialKey,
    settings: EnrollSettings,
    google: GoogleKeys,
}

fn unix(t: DateTime<Utc>) -> i64 {
    t.timestamp()
}

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

impl Enroller {
    pub fn new(key: CredentialKey, settings: EnrollSettings) -> Enroller {
        let google = GoogleKeys::new(settings.google_jwks_url.clone());
        Enroller {
            key,
            settings,
            google,
        }
    }

    /// Verifies a VM credential now.
    pub fn verify(&self, token: &str) -> Result<VmClaims, CredentialError> {
        self.key.verify(token, unix(Utc::now()))
    }

    fn issue(&self, vm_id: &str, pool_id: &str, enrolled_at: i64, now: i64) -> EnrollResponse {
        let ttl = self.settings.credential_ttl.as_secs() as i64;
        let end_of_chain = enrolled_at + self.settings.max_lifetime.as_secs() as i64;
        let exp = (now + ttl).min(end_of_chain).max(now + 1);
        let claims = VmClaims {
            vm_id: vm_id.to_owned(),
            pool_id: pool_id.to_owned(),
            issued_at: now,
            expires_at: exp,
            enrolled_at,
            credential_id: uuid::Uuid::new_v4().simple().to_string(),
        };
        EnrollResponse {
            credential: self.key.issue(&claims),
            vm_id: vm_id.to_owned(),
            pool_id: pool_id.to_owned(),
            expires_at: at(exp),
            refresh_after: at(now + (exp - now) / 2),
        }
    }

    /// A new credential for the holder of `claims` (already verified), same enrollment.
    pub fn refresh(&self, claims: &VmClaims) -> Result<EnrollResponse, EnrollError> {
        let now = unix(Utc::now());
        let end = claims.enrolled_at + self.settings.max_lifetime.as_secs() as i64;
        if now >= end {
            return Err(EnrollError::Refused(
                "the credential chain reached its maximum lifetime; enroll again".into(),
            ));
        }
        Ok(self.issue(&claims.vm_id, &claims.pool_id, claims.enrolled_at, now))
    }

    /// Checks the proof in `req` against the pool's rules and issues a credential.
    pub async fn enroll(
        &self,
        store: &Store,
        pools: &Pools,
        req: &EnrollRequest,
        remote: Option<SocketAddr>,
    ) -> Result<EnrollResponse, EnrollError> {
        validate_vm_id(&req.vm_id).map_err(|e| EnrollError::BadRequest(e.to_string()))?;
        validate_id("pool_id", &req.pool_id).map_err(|e| EnrollError::BadRequest(e.to_string()))?;
        let rules = pools
            .get(&req.pool_id)
            .map(|p| p.enrollment.clone())
            .unwrap_or_default();
        let now = Utc::now();
        let detail = match req.method {
            EnrollMethod::Bootstrap => {
                let secret = req.bootstrap_secret.as_deref().ok_or_else(|| {
                    EnrollError::BadRequest("method bootstrap needs bootstrap_secret".into())
                })?;
                self.check_secret(&rules, &req.pool_id, secret).await?;
                "method=bootstrap".to_owned()
            }
            EnrollMethod::Gce => {
                let token = req.identity_token.as_deref().ok_or_else(|| {
                    EnrollError::BadRequest("method gce needs identity_token".into())
                })?;
                let identity = self
                    .check_gce(&rules, &req.pool_id, &req.vm_id, token)
                    .await?;
                // One exchange per token: a copied token is worthless once used.
                let outcome = store
                    .write(vec![Mutation::ClaimIdentityToken {
                        token_hash: sha256_hex(token.as_bytes()),
                        vm_id: req.vm_id.clone(),
                        now: now.timestamp_millis(),
                        expires_at: identity.expires_at.saturating_add(60) * 1000,
                    }])
                    .await?;
                if outcome.first() != Some(&Outcome::Inserted(true)) {
                    return Err(EnrollError::Refused(
                        "identity token was already used; fetch a fresh one".into(),
                    ));
                }
                format!(
                    "method=gce project={} zone={} instance_id={}",
                    identity.project_id, identity.zone, identity.instance_id
                )
            }
        };
        let response = self.issue(&req.vm_id, &req.pool_id, unix(now), unix(now));
        let from = remote.map(|a| a.ip().to_string()).unwrap_or_default();
        store
            .write(vec![Mutation::VmLog(VmLogRow {
                vm_id: req.vm_id.clone(),
                at: now.timestamp_millis(),
                kind: "enrolled".into(),
                detail: Some(format!(
                    "pool={} {detail} from={from} boot_id={}",
                    req.pool_id,
                    req.boot_id.as_deref().unwrap_or("-")
                )),
            })])
            .await?;
        tracing::info!(vm_id = %req.vm_id, pool_id = %req.pool_id, method = ?req.method, %from, expires_at = %response.expires_at, "VM enrolled");
        Ok(response)
    }

    async fn check_secret(
        &self,
        rules: &PoolEnrollment,
        pool_id: &str,
        presented: &str,
    ) -> Result<(), EnrollError> {
        let Some(file) = &rules.bootstrap_secret_file else {
            return Err(EnrollError::Refused(format!(
                "pool {pool_id:?} does not accept bootstrap secrets"
            )));
        };
        let expected = read_secret(file).await.map_err(|e| {
            tracing::error!(pool_id, error = %e, "Bootstrap secret unreadable");
            EnrollError::Unavailable("enrollment is unavailable; retry later".into())
        })?;
        let a = sha256_hex(presented.trim().as_bytes());
        let b = sha256_hex(expected.as_bytes());
        aws_lc_rs::constant_time::verify_slices_are_equal(a.as_bytes(), b.as_bytes()).map_err(
            |_| EnrollError::Refused(format!("wrong bootstrap secret for pool {pool_id:?}")),
        )
    }

    async fn check_gce(
        &self,
        rules: &PoolEnrollment,
        pool_id: &str,
        vm_id: &str,
        token: &str,
    ) -> Result<gce::GceIdentity, EnrollError> {
        let Some(rule) = &rules.gce else {
            return Err(EnrollError::Refused(format!(
                "pool {pool_id:?} does not accept GCE identity tokens"
            )));
        };
        let Some(audience) = &self.settings.audience else {
            return Err(EnrollError::Unavailable(
                "the controller has no audience configured for identity tokens".into(),
            ));
        };
        let identity = gce::verify(
            &self.google,
            token,
            audience,
            self.settings.identity_max_age,
            unix(Utc::now()),
        )
        .await
        .map_err(|e| match e {
            GceError::KeysUnavailable(_) => {
                tracing::warn!(error = %e, "Cannot verify identity tokens");
                EnrollError::Unavailable("identity verification is unavailable; retry later".into())
            }
            other => EnrollError::Refused(other.to_string()),
        })?;
        rule.check(&identity, vm_id)
            .map_err(|e| EnrollError::Refused(e.to_string()))?;
        Ok(identity)
    }
}

/// Reads a secret file: trimmed, and at least [`MIN_SECRET_LEN`] characters.
pub async fn read_secret(path: &std::path::Path) -> Result<String, String> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let s = text.trim();
    if s.len() < MIN_SECRET_LEN {
        return Err(format!(
            "{} holds fewer than {MIN_SECRET_LEN} characters",
            path.display()
        ));
    }
    Ok(s.to_owned())
}
