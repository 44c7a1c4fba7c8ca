//! Google's side of GCE instance identity tokens.
//!
//! [`FakeGoogle`] mints RS256 JWTs shaped like the metadata server's `format=full` identity
//! tokens (header `alg`/`kid`/`typ`, claims `iss`, `aud`, `azp`, `sub`, `email`,
//! `email_verified`, `iat`, `exp` = `iat` + 3600 and the `google.compute_engine` object) and
//! serves the public keys as a JWKS document at `/oauth2/v3/certs`, as
//! `https://www.googleapis.com/oauth2/v3/certs` does. The two signing keys are fixed test keys
//! checked in under `keys/` (they protect nothing); which of them is published can be changed
//! to exercise key rotation.

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub(crate) const KEY_PEMS: [&str; 2] = [
    include_str!("../keys/google-test-1.pem"),
    include_str!("../keys/google-test-2.pem"),
];
pub(crate) const JWKS: &str = include_str!("../keys/google-test-jwks.json");

/// The issuer Google puts in identity tokens.
pub const ISSUER: &str = "https://accounts.google.com";

/// One VM as Google knows it: what its identity token says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub project_id: String,
    pub project_number: u64,
    pub zone: String,
    pub instance_id: String,
    pub instance_name: String,
    pub service_account: String,
}

impl Instance {
    pub fn new(project_id: &str, zone: &str, instance_name: &str) -> Instance {
        Instance {
            project_id: project_id.into(),
            project_number: 123_456_789_012,
            zone: zone.into(),
            instance_id: "4567890123456789012".into(),
            instance_name: instance_name.into(),
            service_account: "123456789012-compute@developer.gserviceaccount.com".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("failed to sign a test identity token: {0}")]
pub struct MintError(#[from] jsonwebtoken::errors::Error);

/// The signing keys and the JWKS endpoint.
#[derive(Debug, Clone, Default)]
pub struct FakeGoogle {
    /// Index of the key new tokens are signed with.
    signing: Arc<AtomicUsize>,
    /// Indexes of the keys the JWKS endpoint publishes.
    published: Arc<Mutex<Vec<usize>>>,
    fetches: Arc<AtomicUsize>,
    /// OAuth access tokens issued (service-account grants and the metadata server), with
    /// their expiry (Unix s).
    pub(crate) access_tokens: Arc<Mutex<std::collections::HashMap<String, i64>>>,
    pub(crate) token_grants: Arc<AtomicUsize>,
    /// Lifetime of access tokens issued from now on (0: an hour).
    pub(crate) access_token_ttl: Arc<std::sync::atomic::AtomicI64>,
}

impl FakeGoogle {
    /// Signs with key 0 and publishes both keys.
    pub fn new() -> FakeGoogle {
        let g = FakeGoogle::default();
        g.publish(&[0, 1]);
        g
    }

    /// Which keys (0 or 1) the JWKS endpoint lists from now on.
    pub fn publish(&self, keys: &[usize]) {
        *self
            .published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys.to_vec();
    }

    /// Which key new tokens are signed with.
    pub fn sign_with(&self, key: usize) {
        self.signing.store(key % KEY_PEMS.len(), Ordering::SeqCst);
    }

    /// How many times the JWKS document was fetched.
    pub fn jwks_fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// The claims of a fresh token for `instance` and `audience`, issued now.
    pub fn claims(instance: &Instance, audience: &str) -> Value {
        let now = chrono::Utc::now().timestamp();
        json!({
            "iss": ISSUER,
            "aud": audience,
            "azp": "112233445566778899000",
            "sub": "112233445566778899000",
            "email": instance.service_account,
            "email_verified": true,
            "iat": now,
            "exp": now + 3600,
            "google": {
                "compute_engine": {
                    "project_id": instance.project_id,
                    "project_number": instance.project_number,
                    "zone": instance.zone,
                    "instance_id": instance.instance_id,
                    "instance_name": instance.instance_name,
                    "instance_creation_timestamp": now - 60,
                }
            }
        })
    }

    /// Signs `claims` (any JSON object) as Google would.
    pub fn sign(&self, claims: &Value) -> Result<String, MintError> {
        let key = self.signing.load(Ordering::SeqCst);
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(format!("miglet-sim-google-{}", key + 1));
        let encoding = EncodingKey::from_rsa_pem(KEY_PEMS[key].as_bytes())?;
        Ok(jsonwebtoken::encode(&header, claims, &encoding)?)
    }

    /// A fresh, valid `format=full` identity token.
    pub fn identity_token(&self, instance: &Instance, audience: &str) -> Result<String, MintError> {
        self.sign(&FakeGoogle::claims(instance, audience))
    }

    /// Serves `GET /oauth2/v3/certs` and the OAuth token endpoint `POST /token`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/oauth2/v3/certs", get(certs))
            .route("/token", axum::routing::post(crate::google_oauth::token))
            .with_state(self.clone())
    }
}

async fn certs(State(g): State<FakeGoogle>) -> impl IntoResponse {
    g.fetches.fetch_add(1, Ordering::SeqCst);
    let published = g
        .published
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let all: Value = serde_json::from_str(JWKS).unwrap_or_else(|_| json!({"keys": []}));
    let keys: Vec<Value> = all["keys"]
        .as_array()
        .map(|ks| {
            ks.iter()
                .enumerate()
                .filter(|(i, _)| published.contains(i))
                .map(|(_, k)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    (
        [
            (header::CONTENT_TYPE, "application/json; charset=UTF-8"),
            (
                header::CACHE_CONTROL,
                "public, max-age=21600, must-revalidate",
            ),
        ],
        json!({ "keys": keys }).to_string(),
    )
}
