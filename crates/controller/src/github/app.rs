//! Proving the controller to GitHub: a GitHub App (app JWT → installation token, cached and
//! refreshed before it expires) or a personal access token (read from its file at use).

use super::api::{Api, Reply};
use super::rules::due_for_refresh;
use super::{GitHubError, Scope};
use crate::clock::Clock;
use crate::model::Millis;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// An installation token is used only while more than this much of its hour is left.
const REFRESH_MARGIN_MS: Millis = 5 * 60 * 1000;
/// The app JWT lives 9 minutes (GitHub allows at most 10) and is dated a minute back for
/// clock drift, as GitHub recommends.
const JWT_BACKDATE_SECS: i64 = 60;
const JWT_LIFETIME_SECS: i64 = 9 * 60;

/// The app JWT at `now_secs` (RS256; `iss` is the app id).
pub fn app_jwt(app_id: u64, key: &EncodingKey, now_secs: i64) -> Result<String, GitHubError> {
    let claims = serde_json::json!({
        "iat": now_secs - JWT_BACKDATE_SECS,
        "exp": now_secs + JWT_LIFETIME_SECS,
        "iss": app_id.to_string(),
    });
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, key)
        .map_err(|e| GitHubError::Config(format!("cannot sign the app JWT: {e}")))
}

/// Reads an App's private key (PEM). Checked at start, so a wrong file stops the controller
/// with the file's name instead of failing every registration later.
pub fn load_key(path: &Path) -> Result<EncodingKey, GitHubError> {
    let pem = std::fs::read(path).map_err(|e| {
        GitHubError::Config(format!(
            "cannot read the App private key {}: {e}",
            path.display()
        ))
    })?;
    key_from_pem(&pem).map_err(|e| {
        GitHubError::Config(format!(
            "{} is not an RSA private key in PEM form ({e}); download it from the App's settings",
            path.display()
        ))
    })
}

/// An App's private key from its PEM text (PKCS#1, as GitHub hands it out, or PKCS#8).
pub fn key_from_pem(pem: &[u8]) -> Result<EncodingKey, jsonwebtoken::errors::Error> {
    EncodingKey::from_rsa_pem(pem)
}

#[derive(Debug, Clone)]
struct Cached {
    token: String,
    expires_at: Millis,
}

/// A GitHub App's authentication for one installation.
pub struct AppAuth {
    app_id: u64,
    key: EncodingKey,
    scope: Scope,
    installation_id: Mutex<Option<u64>>,
    cached: tokio::sync::Mutex<Option<Cached>>,
    clock: Clock,
}

impl std::fmt::Debug for AppAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppAuth")
            .field("app_id", &self.app_id)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl AppAuth {
    pub fn new(
        app_id: u64,
        key: EncodingKey,
        installation_id: Option<u64>,
        scope: Scope,
        clock: Clock,
    ) -> AppAuth {
        AppAuth {
            app_id,
            key,
            scope,
            installation_id: Mutex::new(installation_id),
            cached: tokio::sync::Mutex::new(None),
            clock,
        }
    }

    fn jwt(&self) -> Result<String, GitHubError> {
        app_jwt(self.app_id, &self.key, self.clock.now_secs())
    }

    /// The installation: as configured, or found from the scope once (with the app JWT).
    async fn installation(&self, api: &Api) -> Result<u64, GitHubError> {
        let known = *self
            .installation_id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(id) = known {
            return Ok(id);
        }
        let path = self.scope.installation_path().ok_or_else(|| {
            GitHubError::Config(
                "a GitHub App cannot manage enterprise runners; use a PAT for an enterprise scope"
                    .into(),
            )
        })?;
        let reply = api.call(Method::GET, &path, &self.jwt()?, None).await?;
        let id = reply.body["id"]
            .as_u64()
            .ok_or_else(|| GitHubError::BadAnswer(format!("{path}: no installation id")))?;
        *self
            .installation_id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(id);
        Ok(id)
    }

    /// An installation token with more than a few minutes left: the cached one, or a new one.
    pub async fn token(&self, api: &Api) -> Result<String, GitHubError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && !due_for_refresh(c.expires_at, self.clock.now_ms(), REFRESH_MARGIN_MS)
        {
            return Ok(c.token.clone());
        }
        let fresh = self.mint(api).await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    /// Forgets the cached token (after a 401): the next [`AppAuth::token`] mints a new one.
    pub async fn forget(&self) {
        *self.cached.lock().await = None;
    }

    async fn mint(&self, api: &Api) -> Result<Cached, GitHubError> {
        let id = self.installation(api).await?;
        let path = format!("/app/installations/{id}/access_tokens");
        let reply = api.call(Method::POST, &path, &self.jwt()?, None).await?;
        let token = reply.body["token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| GitHubError::BadAnswer("installation token: no token".into()))?;
        let expires_at = expiry(&reply.body)?;
        tracing::debug!(
            installation_id = id,
            expires_at,
            "Installation token minted"
        );
        Ok(Cached {
            token: token.to_owned(),
            expires_at,
        })
    }
}

/// `expires_at` (RFC 3339) of a token answer, as controller milliseconds.
pub fn expiry(body: &Value) -> Result<Millis, GitHubError> {
    let text = body["expires_at"]
        .as_str()
        .ok_or_else(|| GitHubError::BadAnswer("no expires_at".into()))?;
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|e| GitHubError::BadAnswer(format!("expires_at {text:?}: {e}")))
}

/// How the controller authenticates to one API.
#[derive(Debug)]
pub enum Auth {
    App(AppAuth),
    /// A PAT, read from its file at every use (so a rotation needs no restart).
    Pat(PathBuf),
}

impl Auth {
    async fn bearer(&self, api: &Api) -> Result<String, GitHubError> {
        match self {
            Auth::App(app) => app.token(api).await,
            Auth::Pat(file) => {
                let text = tokio::fs::read_to_string(file).await.map_err(|e| {
                    GitHubError::Config(format!("cannot read the PAT file {}: {e}", file.display()))
                })?;
                let pat = text.trim();
                if pat.is_empty() {
                    return Err(GitHubError::Config(format!(
                        "the PAT file {} is empty",
                        file.display()
                    )));
                }
                Ok(pat.to_owned())
            }
        }
    }

    /// A call with this credential. A 401 makes an App mint a new installation token and try
    /// once more (its token may have been revoked early); a second 401 is the answer.
    pub async fn call(
        &self,
        api: &Api,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, GitHubError> {
        let bearer = self.bearer(api).await?;
        match api.call(method.clone(), path, &bearer, body).await {
            Err(GitHubError::Unauthorized(_)) if matches!(self, Auth::App(_)) => {
                if let Auth::App(app) = self {
                    app.forget().await;
                }
                tracing::info!(
                    path,
                    "GitHub refused the installation token; minting a new one and trying once more"
                );
                let bearer = self.bearer(api).await?;
                api.call(method, path, &bearer, body).await
            }
            other => other,
        }
    }
}
