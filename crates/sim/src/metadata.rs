//! A GCE metadata server stand-in: `GET /computeMetadata/v1/<path>` with the required
//! `Metadata-Flavor: Google` header (403 without it), plain-text leaf values, 404 for keys that
//! are not set, and the `Metadata-Flavor: Google` header on answers.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Default)]
pub struct FakeMetadata {
    values: Arc<Mutex<HashMap<String, String>>>,
}

impl FakeMetadata {
    /// Sets `path` (relative to `/computeMetadata/v1/`, e.g. `instance/name`).
    pub fn set(&self, path: &str, value: &str) {
        self.values
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(path.to_owned(), value.to_owned());
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
    headers: HeaderMap,
) -> Response {
    if headers.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return (
            StatusCode::FORBIDDEN,
            "Missing required header \"Metadata-Flavor\": \"Google\"",
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
