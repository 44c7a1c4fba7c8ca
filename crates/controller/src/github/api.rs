//! The REST client: GitHub's required headers, one bounded timeout, typed errors, and the
//! rate-limit gate. A call GitHub refused with a rate limit blocks every later call of the
//! same client (one App or PAT) until GitHub said it may try again; a transient failure
//! (5xx, timeout) is retried a few times with jitter. Nothing here loops on its own.

use super::GitHubError;
use super::metrics::{AccountLabel, GitHubMetrics, RequestLabels, endpoint};
use super::rules::{Answer, classify};
use crate::clock::Clock;
use crate::model::Millis;
use reqwest::Method;
use serde_json::Value;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// The REST API version we speak (GitHub's default when the header is absent).
pub const API_VERSION: &str = "2022-11-28";
/// Longest a call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Tries of a call that fails transiently (5xx, timeout), including the first.
const TRANSIENT_TRIES: u32 = 3;

/// A successful answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// `null` for an empty body (204).
    pub body: Value,
    /// The `Link` header's `rel="next"` page, if any.
    pub next: Option<String>,
}

/// One GitHub API base (github.com, or a GHES host) with one credential's rate-limit state.
#[derive(Debug)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    clock: Clock,
    metrics: GitHubMetrics,
    /// `app:<id>` or `pat`, for the metrics.
    account: String,
    /// Controller time (ms) before which no call is made, after a rate limit.
    blocked_until: Mutex<Millis>,
    /// `X-RateLimit-Remaining` of the last answer (-1 before any).
    remaining: AtomicI64,
}

impl Api {
    pub fn new(api_url: &str, clock: Clock) -> Result<Api, GitHubError> {
        Api::with_metrics(api_url, clock, GitHubMetrics::default(), "app")
    }

    /// A client whose calls are counted in `metrics` under `account`.
    pub fn with_metrics(
        api_url: &str,
        clock: Clock,
        metrics: GitHubMetrics,
        account: &str,
    ) -> Result<Api, GitHubError> {
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .user_agent(concat!("mig-controller/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| GitHubError::Config(format!("HTTP client: {e}")))?;
        Ok(Api {
            http,
            base: api_url.trim_end_matches('/').to_owned(),
            clock,
            metrics,
            account: account.to_owned(),
            blocked_until: Mutex::new(0),
            remaining: AtomicI64::new(-1),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// `X-RateLimit-Remaining` as last seen, if any answer carried it.
    pub fn rate_limit_remaining(&self) -> Option<u64> {
        u64::try_from(self.remaining.load(Ordering::Relaxed)).ok()
    }

    /// How long calls are held back by a rate limit, if they are.
    pub fn blocked_for(&self) -> Option<Duration> {
        let until = *self
            .blocked_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let left = until - self.clock.now_ms();
        (left > 0).then(|| Duration::from_millis(left as u64))
    }

    fn block(&self, secs: u64) {
        let until = self.clock.now_ms() + (secs as Millis) * 1000;
        let mut b = self
            .blocked_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *b = (*b).max(until);
    }

    /// The URL of `path` (an API path, or a `Link` URL GitHub gave us). A URL elsewhere is
    /// refused: the credential goes only to the API it is for.
    fn url(&self, path: &str) -> Result<String, GitHubError> {
        if path.starts_with('/') {
            return Ok(format!("{}{path}", self.base));
        }
        if path.starts_with(&format!("{}/", self.base)) {
            return Ok(path.to_owned());
        }
        Err(GitHubError::BadAnswer(format!(
            "a link outside {}: {path}",
            self.base
        )))
    }

    /// One call, retried a few times with jitter while it fails transiently.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        bearer: &str,
        body: Option<&Value>,
    ) -> Result<Reply, GitHubError> {
        let mut backoff =
            miglet_proto::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
        let mut tries = 0;
        loop {
            tries += 1;
            match self.call_once(method.clone(), path, bearer, body).await {
                Err(e) if e.is_transient() && tries < TRANSIENT_TRIES => {
                    let wait = backoff.next_delay();
                    tracing::debug!(path, error = %e, wait_ms = wait.as_millis() as u64, "GitHub call failed; trying again");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    /// One call, no retry.
    pub async fn call_once(
        &self,
        method: Method,
        path: &str,
        bearer: &str,
        body: Option<&Value>,
    ) -> Result<Reply, GitHubError> {
        if let Some(left) = self.blocked_for() {
            return Err(GitHubError::RateLimited {
                retry_in_secs: left.as_secs().max(1),
                message: "held back after a rate limit".into(),
            });
        }
        let method_name = method.to_string();
        let mut req = self
            .http
            .request(method, self.url(path)?)
            .header("Accept", "application/vnd.github+json")
            .header("X-GitHub-Api-Version", API_VERSION)
            .bearer_auth(bearer);
        if let Some(b) = body {
            req = req.json(b);
        }
        let endpoint = endpoint(method_name.as_str(), path);
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                self.count(endpoint, 0);
                return Err(GitHubError::Transport(crate::error::chain(&e)));
            }
        };
        let status = resp.status().as_u16();
        self.count(endpoint, status);
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let retry_after = header("retry-after").and_then(|v| v.trim().parse().ok());
        let remaining = header("x-ratelimit-remaining").and_then(|v| v.trim().parse().ok());
        let reset = header("x-ratelimit-reset").and_then(|v| v.trim().parse().ok());
        let next = header("link").and_then(|l| next_link(&l));
        if let Some(r) = remaining {
            let r = i64::try_from(r).unwrap_or(i64::MAX);
            self.remaining.store(r, Ordering::Relaxed);
            self.metrics
                .rate_limit_remaining
                .get_or_create(&AccountLabel {
                    account: self.account.clone(),
                })
                .set(r);
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| GitHubError::Transport(crate::error::chain(&e)))?;
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        let message = body["message"].as_str().unwrap_or_default();
        let answer = Answer {
            status,
            retry_after,
            remaining,
            reset,
            message,
        };
        match classify(&answer, self.clock.now_secs()) {
            Ok(()) => Ok(Reply { status, body, next }),
            Err(e) => {
                if let GitHubError::RateLimited { retry_in_secs, .. } = &e {
                    self.block(*retry_in_secs);
                }
                Err(e)
            }
        }
    }
}

impl Api {
    fn count(&self, endpoint: String, status: u16) {
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                endpoint,
                status: status.to_string(),
            })
            .inc();
    }

    /// The metrics this client records into, and its account label.
    pub fn metrics(&self) -> (&GitHubMetrics, &str) {
        (&self.metrics, &self.account)
    }
}

/// The `rel="next"` URL of a `Link` header.
pub fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params
            .split(';')
            .any(|p| p.trim() == "rel=\"next\"")
            .then(|| {
                url.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_owned()
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_page_is_read_from_the_link_header() {
        let link = "<https://api.github.com/orgs/a/actions/runners?page=2>; rel=\"next\", <https://api.github.com/orgs/a/actions/runners?page=5>; rel=\"last\"";
        assert_eq!(
            next_link(link).as_deref(),
            Some("https://api.github.com/orgs/a/actions/runners?page=2")
        );
        assert_eq!(next_link("<https://x/?page=1>; rel=\"prev\""), None);
    }

    #[test]
    fn the_credential_goes_only_to_its_api() -> Result<(), GitHubError> {
        let api = Api::new("https://api.github.com/", Clock::system())?;
        assert_eq!(api.url("/orgs/a")?, "https://api.github.com/orgs/a");
        assert!(api.url("https://api.github.com/orgs/a?page=2").is_ok());
        assert!(api.url("https://evil.example/orgs/a").is_err());
        assert!(api.url("https://api.github.com.evil.example/x").is_err());
        Ok(())
    }
}
