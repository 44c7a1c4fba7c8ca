//! The VM's credential with the controller.
//!
//! The agent proves who it is once (the pool's bootstrap secret, or a GCE instance identity
//! token fetched fresh from the metadata server for the controller's URL as audience) at
//! `POST /api/v1/enroll`, and gets a short-lived credential bound to its `vm_id` and pool.
//! Every request carries it; [`Credentials::keep_fresh`] renews it at half its lifetime; a
//! 401 drops it so the next request enrolls again. It is held in memory only and never
//! logged: a restarted agent simply enrolls again.

use crate::config::AuthMethod;

use miglet_proto::json::{EnrollMethod, EnrollRequest, EnrollResponse};
use std::sync::RwLock;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{Mutex, watch};
use tracing::{info, warn};

/// Enrollment attempts are at least this far apart.
const MIN_ATTEMPT_GAP: Duration = Duration::from_secs(2);
/// A credential this close to expiry is not used any more.
const EXPIRY_MARGIN_SECS: i64 = 10;

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("cannot read the secret file {path}: {reason}")]
    Secret { path: String, reason: String },
    #[error("cannot get an identity token from the metadata server: {0}")]
    IdentityToken(String),
    #[error("enrollment request failed: {0}")]
    Request(String),
    #[error("the controller refused enrollment ({code}): {message}")]
    Refused { code: u16, message: String },
    #[error("enrollment failed moments ago; waiting before the next attempt")]
    TooSoon,
}

/// A credential, timed from when it arrived (the VM's clock may be off from the
/// controller's, so the controller's absolute times are never compared with it).
#[derive(Clone)]
struct Held {
    token: String,
    expires: tokio::time::Instant,
    refresh_at: tokio::time::Instant,
}

/// Where the agent's identity comes from and the credential it currently holds.
pub struct Credentials {
    method: AuthMethod,
    client: reqwest::Client,
    metadata: reqwest::Client,
    base: String,
    vm_id: String,
    pool_id: String,
    boot_id: String,
    held: RwLock<Option<Held>>,
    last_attempt: Mutex<Option<tokio::time::Instant>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("method", &self.method)
            .field("vm_id", &self.vm_id)
            .finish_non_exhaustive()
    }
}

fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(200).collect())
}

fn observe_date(r: &reqwest::Response) {
    if let Some(date) = r
        .headers()
        .get(reqwest::header::DATE)
        .and_then(|d| d.to_str().ok())
    {
        crate::clock::observe_date(date);
    }
}

/// Times a credential from its arrival: the controller says when to refresh and when it
/// expires in its own time; only the span between the two (half the lifetime) is used.
fn held(r: EnrollResponse) -> Held {
    let half = (r.expires_at - r.refresh_after)
        .to_std()
        .unwrap_or(Duration::ZERO);
    let now = tokio::time::Instant::now();
    Held {
        token: r.credential,
        refresh_at: now + half,
        expires: now + half * 2,
    }
}

impl Credentials {
    /// `client` is the (TLS-configured) client used for the controller.
    pub fn new(
        method: AuthMethod,
        client: reqwest::Client,
        base: &str,
        vm_id: &str,
        pool_id: &str,
        boot_id: &str,
    ) -> Credentials {
        Credentials {
            method,
            client,
            metadata: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            base: base.trim_end_matches('/').to_owned(),
            vm_id: vm_id.to_owned(),
            pool_id: pool_id.to_owned(),
            boot_id: boot_id.to_owned(),
            held: RwLock::new(None),
            last_attempt: Mutex::new(None),
        }
    }

    /// Does this agent authenticate at all?
    pub fn enabled(&self) -> bool {
        self.method != AuthMethod::None
    }

    fn current(&self) -> Option<Held> {
        self.held
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .filter(|h| {
                // Short-lived credentials get a proportionally smaller margin.
                let margin = Duration::from_secs(EXPIRY_MARGIN_SECS as u64)
                    .min(h.expires.saturating_duration_since(h.refresh_at) / 2);
                h.expires
                    .saturating_duration_since(tokio::time::Instant::now())
                    > margin
            })
    }

    fn store(&self, r: EnrollResponse) -> String {
        let token = r.credential.clone();
        *self
            .held
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(held(r));
        token
    }

    /// The credential to send now, enrolling first if there is none. `None` when the agent
    /// does not authenticate.
    pub async fn bearer(&self) -> Result<Option<String>, AuthError> {
        if !self.enabled() {
            return Ok(None);
        }
        if let Some(h) = self.current() {
            return Ok(Some(h.token));
        }
        self.enroll().await.map(Some)
    }

    /// The controller refused `token` (401): forget it, so the next request enrolls again.
    pub fn rejected(&self, token: &str) {
        let mut held = self
            .held
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if held.as_ref().is_some_and(|h| h.token == token) {
            warn!("The controller no longer accepts this VM's credential; enrolling again");
            *held = None;
        }
    }

    async fn proof(&self) -> Result<EnrollRequest, AuthError> {
        let mut req = EnrollRequest {
            vm_id: self.vm_id.clone(),
            pool_id: self.pool_id.clone(),
            method: EnrollMethod::Bootstrap,
            identity_token: None,
            bootstrap_secret: None,
            enrollment_token: None,
            boot_id: Some(self.boot_id.clone()),
        };
        match &self.method {
            AuthMethod::None => {}
            AuthMethod::Bootstrap { secret_file } => {
                let text = tokio::fs::read_to_string(secret_file).await.map_err(|e| {
                    AuthError::Secret {
                        path: secret_file.display().to_string(),
                        reason: e.to_string(),
                    }
                })?;
                req.bootstrap_secret = Some(text.trim().to_owned());
            }
            AuthMethod::Token { token_file } => {
                let text =
                    tokio::fs::read_to_string(token_file)
                        .await
                        .map_err(|e| AuthError::Secret {
                            path: token_file.display().to_string(),
                            reason: e.to_string(),
                        })?;
                req.method = EnrollMethod::Token;
                req.enrollment_token = Some(text.trim().to_owned());
            }
            AuthMethod::Gce {
                metadata_base,
                audience,
            } => {
                let url = format!(
                    "{}/computeMetadata/v1/instance/service-accounts/default/identity",
                    metadata_base.trim_end_matches('/')
                );
                let r = self
                    .metadata
                    .get(url)
                    .header("Metadata-Flavor", "Google")
                    .query(&[("audience", audience.as_str()), ("format", "full")])
                    .send()
                    .await
                    .map_err(|e| AuthError::IdentityToken(e.to_string()))?;
                if !r.status().is_success() {
                    return Err(AuthError::IdentityToken(format!(
                        "metadata server answered {}",
                        r.status()
                    )));
                }
                let token = r
                    .text()
                    .await
                    .map_err(|e| AuthError::IdentityToken(e.to_string()))?;
                req.method = EnrollMethod::Gce;
                req.identity_token = Some(token.trim().to_owned());
            }
        }
        Ok(req)
    }

    /// Proves the VM's identity and takes the credential the controller issues.
    pub async fn enroll(&self) -> Result<String, AuthError> {
        let mut last = self.last_attempt.lock().await;
        // Someone else may have enrolled while this caller waited for the lock.
        if let Some(h) = self.current() {
            return Ok(h.token);
        }
        if last.is_some_and(|t| t.elapsed() < MIN_ATTEMPT_GAP) {
            return Err(AuthError::TooSoon);
        }
        *last = Some(tokio::time::Instant::now());
        let req = self.proof().await?;
        let r = self
            .client
            .post(format!("{}/api/v1/enroll", self.base))
            .json(&req)
            .send()
            .await
            .map_err(|e| AuthError::Request(crate::transport::error_chain(&e)))?;
        observe_date(&r);
        let code = r.status().as_u16();
        let body = r
            .text()
            .await
            .map_err(|e| AuthError::Request(e.to_string()))?;
        if code != 200 {
            return Err(AuthError::Refused {
                code,
                message: error_message(&body),
            });
        }
        let parsed: EnrollResponse = serde_json::from_str(&body)
            .map_err(|e| AuthError::Request(format!("unreadable enrollment answer: {e}")))?;
        info!(method = ?req.method, expires_at = %parsed.expires_at, "Enrolled with the controller");
        Ok(self.store(parsed))
    }

    /// Exchanges the current credential for a fresh one.
    async fn refresh(&self) -> Result<(), AuthError> {
        let Some(h) = self.current() else {
            self.enroll().await?;
            return Ok(());
        };
        let r = self
            .client
            .post(format!(
                "{}/api/v1/vms/{}/credential",
                self.base, self.vm_id
            ))
            .bearer_auth(&h.token)
            .send()
            .await
            .map_err(|e| AuthError::Request(crate::transport::error_chain(&e)))?;
        observe_date(&r);
        let code = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        if code == 401 {
            // The chain ended (or the controller's key changed): prove identity again.
            self.rejected(&h.token);
            self.enroll().await?;
            return Ok(());
        }
        if code != 200 {
            return Err(AuthError::Refused {
                code,
                message: error_message(&body),
            });
        }
        let parsed: EnrollResponse = serde_json::from_str(&body)
            .map_err(|e| AuthError::Request(format!("unreadable refresh answer: {e}")))?;
        self.store(parsed);
        Ok(())
    }

    /// Renews the credential at half its lifetime until `stop`.
    pub async fn keep_fresh(&self, mut stop: watch::Receiver<bool>) {
        if !self.enabled() {
            return;
        }
        let mut backoff =
            crate::transport::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            let wait = match self.current() {
                Some(h) => h
                    .refresh_at
                    .saturating_duration_since(tokio::time::Instant::now()),
                // Nothing held yet: the first request enrolls; look again shortly.
                None => Duration::from_secs(1),
            };
            tokio::select! {
                _ = stop.changed() => if *stop.borrow() { return },
                () = tokio::time::sleep(wait) => {}
            }
            if self
                .current()
                .is_none_or(|h| h.refresh_at > tokio::time::Instant::now())
            {
                continue;
            }
            match self.refresh().await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    let d = backoff.next_delay();
                    warn!(error = %e, retry_in_ms = d.as_millis() as u64, "Credential refresh failed");
                    tokio::select! {
                        _ = stop.changed() => if *stop.borrow() { return },
                        () = tokio::time::sleep(d) => {}
                    }
                }
            }
        }
    }
}
