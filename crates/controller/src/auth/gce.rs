//! GCE instance identity tokens (RS256 JWTs signed by Google, `format=full`).
//!
//! [`GoogleKeys`] fetches Google's JWKS (URL configurable, so tests point it at a local key
//! server), caches the keys by `kid` for an hour, and refetches at once for an unknown
//! `kid` (Google rotates keys), at most every [`MIN_REFETCH`]. [`verify`] checks signature,
//! algorithm, issuer, audience, expiry and the issue time window; [`GceRule::check`] binds
//! the token to a pool (project, zone, instance name prefix, service account) and to the
//! `vm_id` the agent claims (its instance name). Replay refusal is the enrollment's job (it
//! records each token's hash until the token expires).

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::collections::HashMap;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::Mutex;

/// Google's JWKS for identity tokens.
pub const GOOGLE_JWKS_URL: &str = "https://www.googleapis.com/oauth2/v3/certs";
/// Issuers Google uses in identity tokens.
pub const ISSUERS: [&str; 2] = ["https://accounts.google.com", "accounts.google.com"];
/// How long fetched keys are trusted without refetching.
const CACHE_FOR: Duration = Duration::from_secs(3600);
/// Unknown `kid`s do not trigger fetches more often than this.
pub const MIN_REFETCH: Duration = Duration::from_secs(10);
/// Clock skew allowed on `exp` and `iat`.
const LEEWAY_SECS: u64 = 10;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum GceError {
    #[error("identity token is not a well-formed RS256 JWT with a key id")]
    Malformed,
    #[error("identity token is signed with an unknown key")]
    UnknownKey,
    #[error("Google's signing keys are unavailable: {0}")]
    KeysUnavailable(String),
    #[error("identity token signature does not verify")]
    BadSignature,
    #[error("identity token expired")]
    Expired,
    #[error("identity token has the wrong audience")]
    WrongAudience,
    #[error("identity token has the wrong issuer")]
    WrongIssuer,
    #[error("identity token is too old or from the future (iat); fetch a fresh one")]
    Stale,
    #[error("identity token is not in full format (no google.compute_engine claims)")]
    NotFull,
    #[error("identity token does not match the pool: {0}")]
    WrongInstance(String),
    #[error("identity token is invalid: {0}")]
    Invalid(String),
}

/// What a verified identity token says about the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GceIdentity {
    pub project_id: String,
    pub zone: String,
    pub instance_id: String,
    pub instance_name: String,
    pub email: Option<String>,
    pub issued_at: i64,
    pub expires_at: i64,
}

#[derive(Debug, Deserialize)]
struct Claims {
    iat: i64,
    exp: i64,
    email: Option<String>,
    email_verified: Option<bool>,
    google: Option<Google>,
}

#[derive(Debug, Deserialize)]
struct Google {
    compute_engine: ComputeEngine,
}

#[derive(Debug, Deserialize)]
struct ComputeEngine {
    project_id: String,
    zone: String,
    instance_id: String,
    instance_name: String,
}

#[derive(Default)]
struct Cache {
    keys: HashMap<String, DecodingKey>,
    /// Unix ms of the last successful fetch, and of the last attempt.
    fetched_at: Option<i64>,
    last_attempt: Option<i64>,
}

/// Google's public keys, fetched and cached.
pub struct GoogleKeys {
    url: String,
    http: reqwest::Client,
    cache: Mutex<Cache>,
    clock: crate::clock::Clock,
}

impl std::fmt::Debug for GoogleKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoogleKeys")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl GoogleKeys {
    pub fn new(url: String, clock: crate::clock::Clock) -> GoogleKeys {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        GoogleKeys {
            url,
            http,
            cache: Mutex::new(Cache::default()),
            clock,
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, DecodingKey>, GceError> {
        let unavailable = |e: &dyn std::fmt::Display| GceError::KeysUnavailable(e.to_string());
        let set: JwkSet = self
            .http
            .get(&self.url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| unavailable(&e))?
            .json()
            .await
            .map_err(|e| unavailable(&e))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            if let (Some(kid), Ok(key)) = (&jwk.common.key_id, DecodingKey::from_jwk(jwk)) {
                keys.insert(kid.clone(), key);
            }
        }
        Ok(keys)
    }

    /// The key named `kid`, from the cache or a fetch.
    pub async fn key(&self, kid: &str) -> Result<DecodingKey, GceError> {
        let mut cache = self.cache.lock().await;
        let now = self.clock.now_ms();
        let within =
            |t: Option<i64>, d: Duration| t.is_some_and(|t| now - t < d.as_millis() as i64);
        if within(cache.fetched_at, CACHE_FOR)
            && let Some(k) = cache.keys.get(kid)
        {
            return Ok(k.clone());
        }
        if within(cache.last_attempt, MIN_REFETCH) {
            return cache.keys.get(kid).cloned().ok_or(GceError::UnknownKey);
        }
        cache.last_attempt = Some(now);
        match self.fetch().await {
            Ok(keys) => {
                cache.keys = keys;
                cache.fetched_at = Some(now);
                tracing::info!(keys = cache.keys.len(), url = %self.url, "Fetched Google's token signing keys");
            }
            // Stale keys are still better than none while Google is unreachable.
            Err(e) if !cache.keys.is_empty() => {
                tracing::warn!(error = %e, "Refreshing Google's signing keys failed; using cached keys");
            }
            Err(e) => return Err(e),
        }
        cache.keys.get(kid).cloned().ok_or(GceError::UnknownKey)
    }
}

/// The id of the key an identity token claims to be signed with, once its shape is right
/// (bounded size, a JWT header, RS256 only, a `kid`): what is checked before any key is
/// looked up or fetched.
pub fn signing_key_id(token: &str) -> Result<String, GceError> {
    if token.len() > 8192 {
        return Err(GceError::Malformed);
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| GceError::Malformed)?;
    if header.alg != Algorithm::RS256 {
        return Err(GceError::Malformed);
    }
    header.kid.ok_or(GceError::Malformed)
}

/// Verifies `token` for `audience` at `now` (Unix seconds); `max_age` bounds how long ago it
/// may have been issued.
pub async fn verify(
    keys: &GoogleKeys,
    token: &str,
    audience: &str,
    max_age: Duration,
    now: i64,
) -> Result<GceIdentity, GceError> {
    let kid = signing_key_id(token)?;
    let key = keys.key(&kid).await?;
    let mut v = Validation::new(Algorithm::RS256);
    v.set_issuer(&ISSUERS);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
    v.leeway = LEEWAY_SECS;
    let data = jsonwebtoken::decode::<Claims>(token, &key, &v).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::InvalidSignature => GceError::BadSignature,
            K::ExpiredSignature => GceError::Expired,
            K::InvalidAudience => GceError::WrongAudience,
            K::InvalidIssuer => GceError::WrongIssuer,
            K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => GceError::Malformed,
            other => GceError::Invalid(format!("{other:?}")),
        }
    })?;
    let c = data.claims;
    let leeway = LEEWAY_SECS as i64;
    if c.exp + leeway <= now {
        return Err(GceError::Expired);
    }
    if c.iat > now + leeway || now - c.iat > max_age.as_secs() as i64 {
        return Err(GceError::Stale);
    }
    let ce = c.google.ok_or(GceError::NotFull)?.compute_engine;
    Ok(GceIdentity {
        project_id: ce.project_id,
        zone: ce.zone,
        instance_id: ce.instance_id,
        instance_name: ce.instance_name,
        email: c.email.filter(|_| c.email_verified == Some(true)),
        issued_at: c.iat,
        expires_at: c.exp,
    })
}

/// Which GCE instances may enroll into a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GceRule {
    pub project_id: String,
    /// Empty: any zone.
    pub zones: Vec<String>,
    pub instance_name_prefix: Option<String>,
    pub service_account: Option<String>,
}

impl GceRule {
    /// Does `id` belong to this pool, and is it the VM `vm_id` claims to be?
    pub fn check(&self, id: &GceIdentity, vm_id: &str) -> Result<(), GceError> {
        let wrong = |m: String| Err(GceError::WrongInstance(m));
        if id.project_id != self.project_id {
            return wrong(format!("project {:?} is not the pool's", id.project_id));
        }
        if !self.zones.is_empty() && !self.zones.contains(&id.zone) {
            return wrong(format!("zone {:?} is not one of the pool's", id.zone));
        }
        if let Some(p) = &self.instance_name_prefix
            && !id.instance_name.starts_with(p.as_str())
        {
            return wrong(format!(
                "instance name {:?} does not start with {p:?}",
                id.instance_name
            ));
        }
        if let Some(sa) = &self.service_account
            && id.email.as_deref() != Some(sa.as_str())
        {
            return wrong("service account is not the pool's".into());
        }
        if id.instance_name != vm_id {
            return wrong(format!(
                "token is for instance {:?}, not {vm_id:?}",
                id.instance_name
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> GceIdentity {
        GceIdentity {
            project_id: "acme".into(),
            zone: "us-central1-a".into(),
            instance_id: "1".into(),
            instance_name: "linux-abcd".into(),
            email: Some("sa@acme.iam.gserviceaccount.com".into()),
            issued_at: 0,
            expires_at: 3600,
        }
    }

    #[test]
    fn rule_binds_project_zone_prefix_account_and_name() {
        let rule = GceRule {
            project_id: "acme".into(),
            zones: vec!["us-central1-a".into()],
            instance_name_prefix: Some("linux-".into()),
            service_account: Some("sa@acme.iam.gserviceaccount.com".into()),
        };
        assert_eq!(rule.check(&identity(), "linux-abcd"), Ok(()));
        assert!(rule.check(&identity(), "linux-other").is_err());
        for bad in [
            GceIdentity {
                project_id: "evil".into(),
                ..identity()
            },
            GceIdentity {
                zone: "europe-west1-b".into(),
                ..identity()
            },
            GceIdentity {
                instance_name: "win-abcd".into(),
                ..identity()
            },
            GceIdentity {
                email: None,
                ..identity()
            },
        ] {
            let name = bad.instance_name.clone();
            assert!(rule.check(&bad, &name).is_err(), "{bad:?}");
        }
        let any_zone = GceRule {
            zones: vec![],
            instance_name_prefix: None,
            service_account: None,
            ..rule
        };
        let elsewhere = GceIdentity {
            zone: "asia-east1-a".into(),
            ..identity()
        };
        assert_eq!(any_zone.check(&elsewhere, "linux-abcd"), Ok(()));
    }
}
