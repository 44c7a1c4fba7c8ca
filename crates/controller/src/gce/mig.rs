//! The Compute v1 calls on one managed instance group (research file gcp.md §1):
//! `get`, `createInstances` (named VMs with their own metadata), `deleteInstances` (named,
//! `skipInstancesOnValidationError=true`), `listManagedInstances` (a POST; every page), and
//! waiting on an operation (`operations/{name}/wait`, looped within a bound: `DONE` means
//! "scheduled", and a `DONE` operation may carry an error). Every mutation carries a
//! `requestId` that its retries reuse, so Compute does the work once. `resize` is never
//! called: it lets the group pick which VMs die.

use super::GceError;
use super::auth::GoogleAuth;
use super::rules::{Failure, classify};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Compute's API root.
pub const COMPUTE_API: &str = "https://compute.googleapis.com/compute/v1";
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Tries of a call that fails transiently (or with a 401, once the token is replaced).
const TRIES: u32 = 3;
/// Pages of managed instances read, at most (500 each).
const MAX_PAGES: usize = 40;

/// Where a group is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigLocation {
    Zone(String),
    Region(String),
}

/// One managed instance group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigRef {
    pub project: String,
    pub location: MigLocation,
    pub name: String,
}

impl MigRef {
    fn scope(&self) -> String {
        match &self.location {
            MigLocation::Zone(z) => format!("projects/{}/zones/{z}", self.project),
            MigLocation::Region(r) => format!("projects/{}/regions/{r}", self.project),
        }
    }

    fn path(&self) -> String {
        format!("{}/instanceGroupManagers/{}", self.scope(), self.name)
    }

    pub fn regional(&self) -> bool {
        matches!(self.location, MigLocation::Region(_))
    }
}

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum MigError {
    #[error(transparent)]
    Google(#[from] GceError),
    /// Compute answered with an error.
    #[error("Compute answered {status}: {message}")]
    Api {
        status: u16,
        failure: Failure,
        message: String,
    },
    /// The operation finished with an error.
    #[error("the operation failed: {0}")]
    Operation(String),
}

impl MigError {
    /// Worth trying again later (a rate quota, too many operations, 5xx, a timeout).
    pub fn is_retryable(&self) -> bool {
        match self {
            MigError::Google(e) => e.is_transient(),
            MigError::Api { failure, .. } => matches!(
                failure,
                Failure::RateLimited | Failure::Transient | Failure::Unauthorized
            ),
            MigError::Operation(_) => false,
        }
    }
}

/// Worth a quick retry within the call (not a rate quota: that waits for the next minute).
fn transient(e: &MigError) -> bool {
    match e {
        MigError::Api { failure, .. } => *failure == Failure::Transient,
        MigError::Google(g) => g.is_transient(),
        MigError::Operation(_) => false,
    }
}

/// The client of one group.
#[derive(Debug)]
pub struct MigClient {
    http: reqwest::Client,
    api: String,
    auth: Arc<GoogleAuth>,
    pub mig: MigRef,
}

impl MigClient {
    /// `api`: [`COMPUTE_API`], or a stand-in's `/compute/v1`.
    pub fn new(api: &str, auth: Arc<GoogleAuth>, mig: MigRef) -> Result<MigClient, GceError> {
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .user_agent(concat!("mig-controller/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| GceError::Config(format!("HTTP client: {e}")))?;
        Ok(MigClient {
            http,
            api: api.trim_end_matches('/').to_owned(),
            auth,
            mig,
        })
    }

    /// One call (`path` under the API root, with its query), retried while it fails
    /// transiently and once after a 401 with a fresh token.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, MigError> {
        let mut backoff =
            miglet_proto::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
        let mut tries = 0;
        loop {
            tries += 1;
            match self.call_once(method.clone(), path, body).await {
                Err(MigError::Api {
                    failure: Failure::Unauthorized,
                    ..
                }) if tries < TRIES => self.auth.invalidate().await,
                Err(e) if tries < TRIES && transient(&e) => {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                other => return other,
            }
        }
    }

    async fn call_once(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, MigError> {
        let token = self.auth.token().await?;
        let mut req = self
            .http
            .request(method, format!("{}/{path}", self.api))
            .bearer_auth(token);
        req = match body {
            Some(b) => req.json(b),
            // Compute's POSTs without a body (listManagedInstances, resize) still send one.
            None => req.header("Content-Length", "0"),
        };
        let resp = req
            .send()
            .await
            .map_err(|e| GceError::Transport(crate::error::chain(&e)))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| GceError::Transport(crate::error::chain(&e)))?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok(value);
        }
        Err(MigError::Api {
            status,
            failure: classify(status, &value),
            message: value["error"]["message"]
                .as_str()
                .unwrap_or("(no message)")
                .to_owned(),
        })
    }

    /// The group's settings (`InstanceGroupManager`).
    pub async fn get(&self) -> Result<Value, MigError> {
        self.call(Method::GET, &self.mig.path(), None).await
    }

    /// Asks for VMs by name, each with its own metadata; returns the operation.
    pub async fn create_instances(
        &self,
        instances: &[(String, BTreeMap<String, String>)],
        request_id: &uuid::Uuid,
    ) -> Result<Value, MigError> {
        let configs: Vec<Value> = instances
            .iter()
            .map(|(name, metadata)| json!({"name": name, "preservedState": {"metadata": metadata}}))
            .collect();
        let path = format!("{}/createInstances?requestId={request_id}", self.mig.path());
        self.call(Method::POST, &path, Some(&json!({"instances": configs})))
            .await
    }

    /// Deletes VMs named by their URLs (as `listManagedInstances` gives them), skipping those
    /// already gone or being deleted; returns the operation.
    pub async fn delete_instances(
        &self,
        urls: &[String],
        request_id: &uuid::Uuid,
    ) -> Result<Value, MigError> {
        let path = format!("{}/deleteInstances?requestId={request_id}", self.mig.path());
        let body = json!({"instances": urls, "skipInstancesOnValidationError": true});
        self.call(Method::POST, &path, Some(&body)).await
    }

    /// Every managed instance (all pages).
    pub async fn list_managed(&self) -> Result<Vec<Value>, MigError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut path = format!("{}/listManagedInstances", self.mig.path());
            if let Some(t) = &token {
                path.push_str(&format!("?pageToken={t}"));
            }
            let mut page = self.call(Method::POST, &path, None).await?;
            if let Some(Value::Array(items)) = page.get_mut("managedInstances").map(Value::take) {
                out.extend(items);
            }
            token = page["nextPageToken"]
                .as_str()
                .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic() && b != b'&'))
                .map(str::to_owned);
            if token.is_none() {
                return Ok(out);
            }
        }
        tracing::warn!(mig = %self.mig.name, "More than {MAX_PAGES} pages of managed instances; the rest is read next time");
        Ok(out)
    }

    /// Waits (at most `limit`) for `op` to be `DONE`; an operation that finished with an
    /// error is [`MigError::Operation`]. `Ok(false)`: not done within `limit` (it goes on).
    pub async fn wait(&self, op: &Value, limit: Duration) -> Result<bool, MigError> {
        let Some(name) = op["name"]
            .as_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        else {
            return Err(GceError::BadAnswer("an operation without a name".into()).into());
        };
        let deadline = tokio::time::Instant::now() + limit;
        let mut current = op.clone();
        loop {
            if current["status"] == "DONE" {
                return match current["error"]["errors"].as_array() {
                    Some(errors) if !errors.is_empty() => Err(MigError::Operation(
                        errors
                            .iter()
                            .map(|e| {
                                format!(
                                    "{}: {}",
                                    e["code"].as_str().unwrap_or("?"),
                                    e["message"].as_str().unwrap_or("")
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("; "),
                    )),
                    _ => Ok(true),
                };
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            // `wait` returns when DONE or near its own deadline (or early, under load).
            tokio::time::sleep(Duration::from_millis(100)).await;
            let path = format!("{}/operations/{name}/wait", self.mig.scope());
            current = self.call(Method::POST, &path, None).await?;
        }
    }
}
