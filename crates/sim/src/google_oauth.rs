//! Google's OAuth 2.0 side for the controller's own credentials (research file gcp.md §2):
//! the token endpoint's JWT-bearer grant (RFC 7523) for a service-account key, and the access
//! tokens the metadata server hands a VM's service account. Access tokens are remembered so
//! that the Compute stand-in accepts exactly the ones issued.
//!
//! The service account's key is the second fixed test key ([`FakeGoogle::service_account_key`]
//! writes a key file naming a loopback `token_uri`). The grant is checked as Google checks it:
//! RS256 signature against the key's public half, `iss` the account's email, `aud` the token
//! endpoint's URL, `exp - iat` at most an hour, a `scope`; failures are 400
//! `{"error": "invalid_grant", "error_description": ...}`.

use crate::google::{FakeGoogle, JWKS, KEY_PEMS};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::sync::atomic::Ordering;

/// The test service account.
pub const SERVICE_ACCOUNT: &str = "mig-controller@e2e-project.iam.gserviceaccount.com";
/// Index of the fixed test key the service account signs with.
const SA_KEY: usize = 1;

impl FakeGoogle {
    /// A service-account key file (JSON, as the console downloads it) whose `token_uri` is
    /// `token_uri` (this stand-in's `/token`).
    pub fn service_account_key(&self, token_uri: &str) -> String {
        json!({
            "type": "service_account",
            "project_id": "e2e-project",
            "private_key_id": "miglet-sim-sa-key",
            "private_key": KEY_PEMS[SA_KEY],
            "client_email": SERVICE_ACCOUNT,
            "client_id": "112233445566778899001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "universe_domain": "googleapis.com",
        })
        .to_string()
    }

    /// Issues an access token (as the token endpoint or the metadata server does): the token
    /// and its lifetime in seconds.
    pub fn issue_access_token(&self) -> (String, i64) {
        let ttl = match self.access_token_ttl.load(Ordering::SeqCst) {
            0 => 3600,
            t => t,
        };
        let token = format!("ya29.{}", uuid::Uuid::new_v4().simple());
        self.access_tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(token.clone(), chrono::Utc::now().timestamp() + ttl);
        self.token_grants.fetch_add(1, Ordering::SeqCst);
        (token, ttl)
    }

    /// Access tokens issued from now on live this long (Google: about an hour).
    pub fn set_access_token_ttl(&self, secs: i64) {
        self.access_token_ttl.store(secs, Ordering::SeqCst);
    }

    /// Is `token` an access token this stand-in issued that has not expired?
    pub fn access_token_valid(&self, token: &str) -> bool {
        self.access_tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(token)
            .is_some_and(|exp| *exp > chrono::Utc::now().timestamp())
    }

    /// Forgets every access token (whoever uses one next gets 401).
    pub fn revoke_access_tokens(&self) {
        self.access_tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// How many access tokens were issued.
    pub fn token_grants(&self) -> usize {
        self.token_grants.load(Ordering::SeqCst)
    }
}

fn invalid_grant(why: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"error": "invalid_grant", "error_description": why})),
    )
        .into_response()
}

/// The public half of the service account's key, from the test JWKS.
fn sa_public_key() -> Option<jsonwebtoken::DecodingKey> {
    let jwks: Value = serde_json::from_str(JWKS).ok()?;
    let k = &jwks["keys"][SA_KEY];
    jsonwebtoken::DecodingKey::from_rsa_components(k["n"].as_str()?, k["e"].as_str()?).ok()
}

/// `POST /token`: `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<JWT>`.
pub(crate) async fn token(
    State(g): State<FakeGoogle>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: Vec<(String, String)> = url_form(&body);
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    };
    if field("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "unsupported_grant_type", "error_description": "Invalid grant_type"})),
        )
            .into_response();
    }
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let Some(key) = sa_public_key() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "test key").into_response();
    };
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&[format!("http://{host}/token")]);
    v.set_issuer(&[SERVICE_ACCOUNT]);
    v.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
    let claims = match jsonwebtoken::decode::<Value>(field("assertion"), &key, &v) {
        Ok(d) => d.claims,
        Err(e) => return invalid_grant(&format!("Invalid JWT: {e}")),
    };
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap_or(0),
        claims["exp"].as_i64().unwrap_or(0),
    );
    if exp - iat > 3600 || exp <= iat {
        return invalid_grant(
            "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.",
        );
    }
    if claims["scope"].as_str().is_none_or(str::is_empty) {
        return invalid_grant("Invalid JWT: no scope");
    }
    let (token, ttl) = g.issue_access_token();
    axum::Json(json!({"access_token": token, "expires_in": ttl, "token_type": "Bearer"}))
        .into_response()
}

/// An `application/x-www-form-urlencoded` body (nothing for a malformed one).
fn url_form(body: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(body).unwrap_or_default()
}
