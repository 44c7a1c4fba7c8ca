//! The controller's access token for Compute (research file gcp.md §2): from the metadata
//! server of the VM it runs on (`Metadata-Flavor: Google`, and the answer must carry it too),
//! or by the JWT-bearer grant (RFC 7523) with a service-account key file, posted to the key's
//! `token_uri`. Tokens are cached and replaced [`REFRESH_MARGIN_MS`] before they expire, and
//! at once after Compute answers 401 ([`GoogleAuth::invalidate`]). Tokens are never logged.

use super::GceError;
use crate::clock::Clock;
use crate::model::Millis;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// The scope the controller asks for.
pub const COMPUTE_SCOPE: &str = "https://www.googleapis.com/auth/compute";
/// The metadata server on GCE.
pub const METADATA_BASE: &str = "http://metadata.google.internal";
/// A cached token is replaced this long before it expires.
pub const REFRESH_MARGIN_MS: Millis = 5 * 60 * 1000;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A grant asks for an hour, the most Google gives.
const GRANT_SECS: i64 = 3600;

/// Where the controller's Google credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GoogleCredentials {
    /// The metadata server at `base` (`http://metadata.google.internal`, or a stand-in).
    Metadata { base: String },
    /// A service-account key file (JSON), read at each grant.
    KeyFile(PathBuf),
}

/// The fields of a key file the grant needs.
#[derive(Deserialize)]
struct KeyFile {
    client_email: String,
    private_key: String,
    private_key_id: Option<String>,
    token_uri: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: i64,
}

/// An access token and when it stops working (controller ms).
#[derive(Clone)]
struct Cached {
    token: String,
    expires_at: Millis,
}

/// Access tokens for Compute, cached.
pub struct GoogleAuth {
    credentials: GoogleCredentials,
    http: reqwest::Client,
    clock: Clock,
    cached: tokio::sync::Mutex<Option<Cached>>,
}

impl std::fmt::Debug for GoogleAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoogleAuth")
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl GoogleAuth {
    pub fn new(credentials: GoogleCredentials, clock: Clock) -> Result<GoogleAuth, GceError> {
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .user_agent(concat!("mig-controller/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| GceError::Config(format!("HTTP client: {e}")))?;
        Ok(GoogleAuth {
            credentials,
            http,
            clock,
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// A token good for at least [`REFRESH_MARGIN_MS`] more.
    pub async fn token(&self) -> Result<String, GceError> {
        let now = self.clock.now_ms();
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && !crate::github::rules::due_for_refresh(c.expires_at, now, REFRESH_MARGIN_MS)
        {
            return Ok(c.token.clone());
        }
        let answer = match &self.credentials {
            GoogleCredentials::Metadata { base } => self.ask_metadata_server(base).await?,
            GoogleCredentials::KeyFile(path) => self.grant_with_key_file(path).await?,
        };
        if answer.access_token.is_empty() || answer.expires_in <= 0 {
            return Err(GceError::BadAnswer(
                "an access token without a token or a lifetime".into(),
            ));
        }
        let fresh = Cached {
            token: answer.access_token,
            expires_at: now + answer.expires_in.saturating_mul(1000),
        };
        *cached = Some(fresh.clone());
        Ok(fresh.token)
    }

    /// Forgets the cached token (Compute answered 401 with it).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    async fn ask_metadata_server(&self, base: &str) -> Result<TokenAnswer, GceError> {
        let url = format!(
            "{}/computeMetadata/v1/instance/service-accounts/default/token?scopes={COMPUTE_SCOPE}",
            base.trim_end_matches('/')
        );
        let resp = self
            .http
            .get(&url)
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .map_err(|e| {
                GceError::Transport(format!("the metadata server: {}", crate::error::chain(&e)))
            })?;
        // Only the real metadata server (or a faithful stand-in) says who it is.
        let flavor = resp
            .headers()
            .get("metadata-flavor")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let status = resp.status();
        if flavor.as_deref() != Some("Google") {
            return Err(GceError::Auth(format!(
                "{url} is not a GCE metadata server (no Metadata-Flavor: Google in its answer); outside GCE, use a service-account key file"
            )));
        }
        if !status.is_success() {
            return Err(GceError::Auth(format!(
                "the metadata server refused a token ({status}): does the VM have a service account with the compute scope?"
            )));
        }
        resp.json()
            .await
            .map_err(|e| GceError::BadAnswer(format!("metadata token: {e}")))
    }

    async fn grant_with_key_file(&self, path: &std::path::Path) -> Result<TokenAnswer, GceError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            GceError::Config(format!("service-account key {}: {e}", path.display()))
        })?;
        let key: KeyFile = serde_json::from_str(&text).map_err(|e| {
            GceError::Config(format!(
                "service-account key {} is not a key file: {e}",
                path.display()
            ))
        })?;
        let assertion = grant_assertion(&key, self.clock.now_secs())?;
        let body = serde_urlencoded::to_string([
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion.as_str()),
        ])
        .map_err(|e| GceError::Config(format!("token request: {e}")))?;
        let resp = self
            .http
            .post(&key.token_uri)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                GceError::Transport(format!("{}: {}", key.token_uri, crate::error::chain(&e)))
            })?;
        let status = resp.status();
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(GceError::Transport(format!(
                "{} answered {status}",
                key.token_uri
            )));
        }
        if !status.is_success() {
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            return Err(GceError::Auth(format!(
                "{} refused the grant ({status}): {} {}; check the key file (and the machine's clock)",
                key.token_uri,
                body["error"].as_str().unwrap_or_default(),
                body["error_description"].as_str().unwrap_or_default()
            )));
        }
        resp.json()
            .await
            .map_err(|e| GceError::BadAnswer(format!("token answer: {e}")))
    }
}

/// The signed JWT of a grant at `now` (Unix s): `iss` the account, `scope` Compute, `aud` the
/// token endpoint, an hour long; `kid` the key's id.
fn grant_assertion(key: &KeyFile, now: i64) -> Result<String, GceError> {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = key.private_key_id.clone();
    let claims = serde_json::json!({
        "iss": key.client_email,
        "scope": COMPUTE_SCOPE,
        "aud": key.token_uri,
        "iat": now,
        "exp": now + GRANT_SECS,
    });
    let signing = jsonwebtoken::EncodingKey::from_rsa_pem(key.private_key.as_bytes())
        .map_err(|e| GceError::Config(format!("the key file's private_key: {e}")))?;
    jsonwebtoken::encode(&header, &claims, &signing)
        .map_err(|e| GceError::Config(format!("signing the grant: {e}")))
}
