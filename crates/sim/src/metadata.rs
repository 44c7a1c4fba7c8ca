//! A GCE metadata server stand-in: `GET /computeMetadata/v1/<path>` with the required
//! `Metadata-Flavor: Google` header (403 without it), plain-text leaf values, 404 for keys that
//! are not set, and the `Metadata-Flavor: Google` header on answers.
//!
//! With [`FakeMetadata::with_identity`] it also answers
//! `instance/service-accounts/default/identity?audience=..&format=full|standard` with a fresh
//! identity token per request (400 without an audience), signed by [`FakeGoogle`], and
//! `instance/service-accounts/default/token` with an access token [`FakeGoogle`] accepts.

use crate::google::{FakeGoogle, Instance};
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Default)]
pub struct FakeMetadata {
    values: Arc<Mutex<HashMap<String, String>>>,
    identity: Option<(FakeGoogle, Instance)>,
    identity_requests: Arc<std::sync::atomic::AtomicUsize>,
}

impl FakeMetadata {
    /// Sets `path` (relative to `/computeMetadata/v1/`, e.g. `instance/name`).
    pub fn set(&self, path: &str, value: &str) {
        self.values
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(path.to_owned(), value.to_owned());
    }

    /// Serves identity tokens for `instance`, signed by `google`.
    pub fn with_identity(mut self, google: FakeGoogle, instance: Instance) -> FakeMetadata {
        self.identity = Some((google, instance));
        self
    }

    /// How many identity tokens were handed out.
    pub fn identity_requests(&self) -> usize {
        self.identity_requests
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/computeMetadata/v1/{*path}", get(lookup))
            .with_state(self.clone())
    }
}

async fn lookup(
    State(m): State<FakeMetadata>,
    Path(path): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return (
            StatusCode::FORBIDDEN,
            "Missing required header \"Metadata-Flavor\": \"Google\"",
        )
            .into_response();
    }
    if path == "instance/service-accounts/default/identity"
        && let Some((google, instance)) = &m.identity
    {
        return identity(&m, google, instance, &query);
    }
    if path == "instance/service-accounts/default/token"
        && let Some((google, _)) = &m.identity
    {
        let (token, ttl) = google.issue_access_token();
        return (
            [("metadata-flavor", "Google")],
            axum::Json(serde_json::json!({"access_token": token, "expires_in": ttl, "token_type": "Bearer"})),
        )
            .into_response();
    }
    let value = m
        .values
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&path)
        .cloned();
    match value {
        Some(v) => ([("metadata-flavor", "Google")], v).into_response(),
        None => (StatusCode::NOT_FOUND, "Error 404 (Not Found)!!1").into_response(),
    }
}

fn identity(
    m: &FakeMetadata,
    google: &FakeGoogle,
    instance: &Instance,
    query: &HashMap<String, String>,
) -> Response {
    let audience = query.get("audience").map(String::as_str).unwrap_or("");
    if audience.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            "non-empty audience parameter required",
        )
            .into_response();
    }
    let mut claims = FakeGoogle::claims(instance, audience);
    if query.get("format").map(String::as_str) != Some("full")
        && let Some(obj) = claims.as_object_mut()
    {
        obj.retain(|k, _| ["iss", "aud", "azp", "sub", "iat", "exp"].contains(&k.as_str()));
    }
    match google.sign(&claims) {
        Ok(token) => {
            m.identity_requests
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            ([("metadata-flavor", "Google")], token).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
