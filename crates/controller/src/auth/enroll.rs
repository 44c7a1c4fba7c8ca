//! Enrollment: a VM proves who it is (GCE identity token, a one-time enrollment token, or its
//! pool's bootstrap secret) and receives a credential bound to its `vm_id` and pool; and
//! credential refresh. [`Enroller::prove`] checks the proof; binding the VM to the pool (its
//! first proven identity fixes it) and issuing the credential is the app's
//! (`Controller::enroll`).

use super::credential::{CredentialError, CredentialKey, VmClaims};
use super::enrollment_token;
use super::gce::{self, GceError, GceRule, GoogleKeys};
use super::sha256_hex;
use crate::store::{Mutation, Outcome, Store, StoreError};
use chrono::{DateTime, Utc};
use miglet_proto::ids::{validate_id, validate_vm_id};
use miglet_proto::json::{EnrollMethod, EnrollRequest, EnrollResponse};
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// How VMs of one pool may prove their identity. Any combination may be set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolEnrollment {
    /// File holding the pool's bootstrap secret, re-read at every use (so it can be rotated).
    pub bootstrap_secret_file: Option<PathBuf>,
    pub gce: Option<GceRule>,
    /// One-time enrollment tokens minted for single VMs are accepted.
    pub enrollment_tokens: bool,
    /// Every VM id of the pool starts with this, whatever the proof: a bootstrap secret then
    /// enrolls only ids of its own pool's range.
    pub vm_id_prefix: Option<String>,
}

impl PoolEnrollment {
    /// Whether any method is enabled.
    pub fn any(&self) -> bool {
        self.bootstrap_secret_file.is_some() || self.gce.is_some() || self.enrollment_tokens
    }
}

/// What a proof established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// For the VM's log and the binding: `method=bootstrap`, `method=gce project=...`, ...
    pub detail: String,
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
    /// A valid proof for a VM that belongs to another pool.
    #[error("{0}")]
    Forbidden(String),
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
    /// The controller's time (the same clock as the app's).
    pub clock: crate::clock::Clock,
}

#[derive(Debug)]
pub struct Enroller {
    key: CredentialKey,
    settings: EnrollSettings,
    google: GoogleKeys,
}

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

impl Enroller {
    pub fn new(key: CredentialKey, settings: EnrollSettings) -> Enroller {
        let google = GoogleKeys::new(settings.google_jwks_url.clone(), settings.clock.clone());
        Enroller {
            key,
            settings,
            google,
        }
    }

    /// The controller's time.
    pub fn clock(&self) -> &crate::clock::Clock {
        &self.settings.clock
    }

    /// Verifies a VM credential now.
    pub fn verify(&self, token: &str) -> Result<VmClaims, CredentialError> {
        self.key.verify(token, self.settings.clock.now_secs())
    }

    /// A credential for `vm_id` in `pool_id` whose chain began at `enrolled_at` (Unix seconds).
    pub fn issue(&self, vm_id: &str, pool_id: &str, enrolled_at: i64, now: i64) -> EnrollResponse {
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
        let now = self.settings.clock.now_secs();
        let end = claims.enrolled_at + self.settings.max_lifetime.as_secs() as i64;
        if now >= end {
            return Err(EnrollError::Refused(
                "the credential chain reached its maximum lifetime; enroll again".into(),
            ));
        }
        Ok(self.issue(&claims.vm_id, &claims.pool_id, claims.enrolled_at, now))
    }

    /// Checks the proof in `req` against the pool's rules (a GCE identity token or an
    /// enrollment token is used up by the check).
    pub async fn prove(
        &self,
        store: &Store,
        rules: &PoolEnrollment,
        req: &EnrollRequest,
    ) -> Result<Proof, EnrollError> {
        validate_vm_id(&req.vm_id).map_err(|e| EnrollError::BadRequest(e.to_string()))?;
        validate_id("pool_id", &req.pool_id).map_err(|e| EnrollError::BadRequest(e.to_string()))?;
        if let Some(prefix) = &rules.vm_id_prefix
            && !req.vm_id.starts_with(prefix.as_str())
        {
            return Err(EnrollError::Refused(format!(
                "VM ids of pool {:?} start with {prefix:?}",
                req.pool_id
            )));
        }
        let now = self.settings.clock.now();
        let detail = match req.method {
            EnrollMethod::Bootstrap => {
                let secret = req.bootstrap_secret.as_deref().ok_or_else(|| {
                    EnrollError::BadRequest("method bootstrap needs bootstrap_secret".into())
                })?;
                self.check_secret(rules, &req.pool_id, secret).await?;
                "method=bootstrap".to_owned()
            }
            EnrollMethod::Token => {
                let token = req.enrollment_token.as_deref().ok_or_else(|| {
                    EnrollError::BadRequest("method token needs enrollment_token".into())
                })?;
                let id = self.use_enrollment_token(store, rules, req, token).await?;
                format!("method=token token_id={id}")
            }
            EnrollMethod::Gce => {
                let token = req.identity_token.as_deref().ok_or_else(|| {
                    EnrollError::BadRequest("method gce needs identity_token".into())
                })?;
                let identity = self
                    .check_gce(rules, &req.pool_id, &req.vm_id, token)
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
        Ok(Proof { detail })
    }

    /// Checks a one-time enrollment token for `req`'s VM and pool and uses it up; answers
    /// its id.
    async fn use_enrollment_token(
        &self,
        store: &Store,
        rules: &PoolEnrollment,
        req: &EnrollRequest,
        token: &str,
    ) -> Result<String, EnrollError> {
        if !rules.enrollment_tokens {
            return Err(EnrollError::Refused(format!(
                "pool {:?} does not accept enrollment tokens",
                req.pool_id
            )));
        }
        let refused =
            |e: enrollment_token::EnrollmentTokenError| EnrollError::Refused(e.to_string());
        let (id, secret) = enrollment_token::parse(token.trim()).map_err(refused)?;
        let record = store
            .enrollment_token_get(id)
            .await?
            .ok_or(enrollment_token::EnrollmentTokenError::Wrong)
            .map_err(refused)?;
        let now = self.settings.clock.now_ms();
        enrollment_token::check(&record, secret, &req.vm_id, &req.pool_id, now).map_err(refused)?;
        let used = store
            .write(vec![Mutation::UseEnrollmentToken {
                id: id.to_owned(),
                at: now,
            }])
            .await?;
        if used.first() != Some(&Outcome::Applied(true)) {
            return Err(refused(enrollment_token::EnrollmentTokenError::Used));
        }
        Ok(id.to_owned())
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
            self.settings.clock.now_secs(),
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
    secret_text(path, &text, "a bootstrap secret")
}

/// [`read_secret`] without a runtime, for the checks at start-up.
pub fn read_secret_now(path: &std::path::Path) -> Result<String, String> {
    read_named_secret_now(path, "a bootstrap secret")
}

/// Any secret file the controller reads (`what` names it in the error, e.g. "a webhook
/// secret"): trimmed, and at least [`MIN_SECRET_LEN`] characters.
pub fn read_named_secret_now(path: &std::path::Path, what: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    secret_text(path, &text, what)
}

fn secret_text(path: &std::path::Path, text: &str, what: &str) -> Result<String, String> {
    let s = text.trim();
    if s.len() < MIN_SECRET_LEN {
        return Err(format!(
            "{} holds {} characters; {what} needs at least {MIN_SECRET_LEN} (e.g. `openssl rand -hex 24 > {}`)",
            path.display(),
            s.len(),
            path.display()
        ));
    }
    Ok(s.to_owned())
}
