//! A pool's registrations minted on GitHub: registration tokens (cached until a few minutes
//! before they expire) or just-in-time runner configs (one per runner, kept for its
//! redeliveries), within the mint budget its App or PAT shares with other pools.

use super::api::Api;
use super::app::{Auth, expiry};
use super::metrics::{AccountLabel, KindLabel};
use super::rules::{MintBudget, due_for_refresh};
use super::{GitHubError, Mode, Scope};
use crate::clock::Clock;
use crate::lifecycle::GitHubRunner;
use crate::model::Millis;
use crate::token::{
    IssuedToken, PollFuture, PollQuery, Registration, RegistrationFuture, RemoveFuture, Removed,
    RunnerRequest, RunnersFuture, SourceStatus, TokenError, TokenFuture, TokenSource,
};
use chrono::{DateTime, Utc};
use reqwest::Method;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A registration token is handed out only while more than this much of its hour is left.
const TOKEN_MARGIN_MS: Millis = 10 * 60 * 1000;
/// GitHub's registration tokens live an hour; a JIT config has no documented end, and an
/// unused JIT runner is removed after a day offline: an hour bounds how long we hand one out.
const LIFETIME: Duration = Duration::from_secs(3600);
/// Pages of 100 runners read per cleanup pass, at most.
const MAX_PAGES: usize = 50;

/// One App or PAT on one API: its client, credential and mint budget, shared by every pool
/// that uses it.
#[derive(Debug)]
pub struct Account {
    pub api: Api,
    pub auth: Auth,
    pub budget: Mutex<MintBudget>,
}

impl Account {
    /// Takes one mint from the budget for `who`, or says when its turn may come (mints
    /// are handed out in the order they were first asked for).
    fn take_mint(&self, who: &str, now: Millis) -> Result<(), TokenError> {
        let mut budget = self
            .budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let taken = budget.take_for(who, now).map_err(TokenError::Budget);
        let (metrics, account) = self.api.metrics();
        let label = AccountLabel {
            account: account.to_owned(),
        };
        metrics
            .mint_budget_used
            .get_or_create(&label)
            .set(budget.used(now));
        metrics
            .mint_waiting
            .get_or_create(&label)
            .set(i64::try_from(budget.waiting()).unwrap_or(i64::MAX));
        taken
    }

    /// Records how long a mint took.
    fn minted(&self, kind: &str, started: std::time::Instant) {
        self.api
            .metrics()
            .0
            .mint_seconds
            .get_or_create(&KindLabel {
                kind: kind.to_owned(),
            })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// The GitHub side of one pool.
pub struct GitHubSource {
    account: Arc<Account>,
    scope: Scope,
    mode: Mode,
    /// The runner group by name (`None`: the default group, id 1).
    runner_group: Option<String>,
    /// Added to every runner, so that our runners can be told from others in the scope
    /// (another controller's included): configured, or bound at start to this
    /// installation's id ([`TokenSource::bind_installation`]).
    installation_label: std::sync::RwLock<String>,
    label_configured: bool,
    group_id: tokio::sync::Mutex<Option<u64>>,
    token: tokio::sync::Mutex<Option<IssuedToken>>,
    /// JIT configs by runner name, so a redelivery hands out the same runner.
    jit: Mutex<HashMap<String, Registration>>,
    status: Mutex<SourceStatus>,
    clock: Clock,
}

impl std::fmt::Debug for GitHubSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHubSource")
            .field("scope", &self.scope)
            .field("mode", &self.mode)
            .field("runner_group", &self.runner_group)
            .finish_non_exhaustive()
    }
}

impl GitHubSource {
    pub fn new(
        account: Arc<Account>,
        scope: Scope,
        mode: Mode,
        runner_group: Option<String>,
        installation_label: String,
        clock: Clock,
    ) -> GitHubSource {
        GitHubSource {
            account,
            scope,
            mode,
            runner_group,
            installation_label: std::sync::RwLock::new(installation_label),
            label_configured: true,
            group_id: tokio::sync::Mutex::new(None),
            token: tokio::sync::Mutex::new(None),
            jit: Mutex::new(HashMap::new()),
            status: Mutex::new(SourceStatus::default()),
            clock,
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<super::api::Reply, GitHubError> {
        let a = &self.account;
        a.auth.call(&a.api, method, path, body).await
    }

    /// A GET on the source's account.
    pub(super) async fn get(&self, path: &str) -> Result<super::api::Reply, GitHubError> {
        self.call(Method::GET, path, None).await
    }

    pub(super) fn account(&self) -> &Account {
        &self.account
    }

    pub(super) fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The runner group's id: 1 (Default) unless a group is named; looked up by name once
    /// and again when GitHub no longer knows the id.
    async fn group_id(&self) -> Result<u64, GitHubError> {
        let Some(name) = &self.runner_group else {
            return Ok(1);
        };
        let mut cached = self.group_id.lock().await;
        if let Some(id) = *cached {
            return Ok(id);
        }
        let Some(base) = self.scope.runner_groups_path() else {
            return Ok(1);
        };
        let mut next = Some(format!("{base}?per_page=100"));
        while let Some(page) = next.take() {
            let reply = self.call(Method::GET, &page, None).await?;
            let found = reply.body["runner_groups"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|g| g["name"].as_str() == Some(name.as_str()))
                .and_then(|g| g["id"].as_u64());
            if let Some(id) = found {
                *cached = Some(id);
                return Ok(id);
            }
            next = reply.next;
        }
        Err(GitHubError::NotFound(format!(
            "no runner group named {name:?} in {}",
            self.scope.path()
        )))
    }

    async fn registration_token_now(&self, now: DateTime<Utc>) -> Result<IssuedToken, TokenError> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref()
            && !due_for_refresh(
                t.expires_at.timestamp_millis(),
                now.timestamp_millis(),
                TOKEN_MARGIN_MS,
            )
        {
            return Ok(t.clone());
        }
        self.account
            .take_mint(&format!("token {}", self.scope.path()), self.clock.now_ms())?;
        let path = format!("{}/actions/runners/registration-token", self.scope.path());
        let started = std::time::Instant::now();
        let reply = self.call(Method::POST, &path, None).await?;
        self.account.minted("registration_token", started);
        let token = reply.body["token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| GitHubError::BadAnswer("registration token: no token".into()))?;
        let expires_at = DateTime::from_timestamp_millis(expiry(&reply.body)?)
            .ok_or_else(|| GitHubError::BadAnswer("registration token: bad expires_at".into()))?;
        let issued = IssuedToken {
            token: token.to_owned(),
            expires_at,
        };
        *cached = Some(issued.clone());
        Ok(issued)
    }

    async fn jit_now(
        &self,
        req: RunnerRequest<'_>,
        now: DateTime<Utc>,
    ) -> Result<Registration, TokenError> {
        let known = {
            let mut jit = self
                .jit
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // A config past its expiry is never handed out again (its command expires no
            // later), so the cache holds only runners that may still be delivered.
            jit.retain(
                |_, r| !matches!(r, Registration::Jit { expires_at, .. } if *expires_at <= now),
            );
            jit.get(req.runner_name).cloned()
        };
        if let Some(r) = known {
            return Ok(r);
        }
        let group = self.group_id().await?;
        self.account
            .take_mint(req.runner_name, self.clock.now_ms())?;
        let mut labels: Vec<&str> = req.labels.iter().map(String::as_str).collect();
        let ours = self.label();
        labels.push(&ours);
        let body = json!({
            "name": req.runner_name,
            "runner_group_id": group,
            "labels": labels,
            "work_folder": req.work_folder,
        });
        let path = format!("{}/actions/runners/generate-jitconfig", self.scope.path());
        let started = std::time::Instant::now();
        let answer = self.call(Method::POST, &path, Some(&body)).await;
        if answer.is_ok() {
            self.account.minted("jit", started);
        }
        let reply = match answer {
            // The group may have been deleted and made again: look it up next time.
            Err(GitHubError::NotFound(m)) => {
                *self.group_id.lock().await = None;
                return Err(GitHubError::NotFound(m).into());
            }
            other => other?,
        };
        let config = reply.body["encoded_jit_config"]
            .as_str()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                GitHubError::BadAnswer("generate-jitconfig: no encoded_jit_config".into())
            })?;
        let runner_id = reply.body["runner"]["id"]
            .as_u64()
            .ok_or_else(|| GitHubError::BadAnswer("generate-jitconfig: no runner id".into()))?;
        let expires_at =
            now + chrono::Duration::from_std(LIFETIME).unwrap_or(chrono::Duration::hours(1));
        let reg = Registration::Jit {
            config: config.to_owned(),
            runner_id,
            expires_at,
        };
        tracing::info!(
            runner_name = req.runner_name,
            runner_id,
            "JIT runner minted on GitHub"
        );
        self.jit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(req.runner_name.to_owned(), reg.clone());
        Ok(reg)
    }

    /// Every runner of the scope that carries our label (all pages).
    async fn list_ours(&self) -> Result<Vec<GitHubRunner>, GitHubError> {
        let mut out = Vec::new();
        let mut next = Some(format!(
            "{}/actions/runners?per_page=100",
            self.scope.path()
        ));
        let mut pages = 0;
        while let Some(page) = next.take() {
            pages += 1;
            if pages > MAX_PAGES {
                tracing::warn!(scope = %self.scope.path(), "More than {MAX_PAGES} pages of runners; the rest waits for the next pass");
                break;
            }
            let reply = self.call(Method::GET, &page, None).await?;
            out.extend(self.ours_in(&reply.body));
            next = reply.next;
        }
        Ok(out)
    }

    /// `DELETE` a runner by id; GitHub refuses (422) while it runs a job.
    async fn delete_runner(&self, runner_id: u64) -> Result<Removed, GitHubError> {
        let path = format!("{}/actions/runners/{runner_id}", self.scope.path());
        match self.call(Method::DELETE, &path, None).await {
            Ok(_) => Ok(Removed::Deleted),
            Err(GitHubError::NotFound(_)) => Ok(Removed::Gone),
            Err(GitHubError::Rejected { status: 422, .. }) => Ok(Removed::Busy),
            Err(e) => Err(e),
        }
    }

    /// Our runner named `name` (with our label), if the scope has one.
    async fn find_ours(&self, name: &str) -> Result<Option<GitHubRunner>, GitHubError> {
        let page = format!(
            "{}/actions/runners?per_page=100&name={}",
            self.scope.path(),
            urlencoding(name)
        );
        let reply = self.call(Method::GET, &page, None).await?;
        Ok(self
            .ours_in(&reply.body)
            .into_iter()
            .find(|r| r.name == name))
    }

    /// The runners of one page of a runner list that carry our label.
    fn ours_in(&self, page: &serde_json::Value) -> Vec<GitHubRunner> {
        let ours = self.label();
        page["runners"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| {
                r["labels"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|l| l["name"].as_str() == Some(ours.as_str()))
            })
            .filter_map(|r| {
                Some(GitHubRunner {
                    id: r["id"].as_u64()?,
                    name: r["name"].as_str()?.to_owned(),
                    online: r["status"].as_str() == Some("online"),
                    busy: r["busy"].as_bool().unwrap_or(true),
                })
            })
            .collect()
    }

    /// The label that marks our runners.
    pub fn label(&self) -> String {
        self.installation_label
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Marks our runners with this installation's label (bound at start) unless one is
    /// configured: two controllers in one scope must never take each other's runners for
    /// their own.
    pub fn label_from_installation(mut self) -> GitHubSource {
        self.label_configured = false;
        self
    }

    /// Notes how a mint went, for the pool view. Waiting for the budget is not a failure.
    fn note<T>(&self, result: &Result<T, TokenError>) {
        let now = self.clock.now_ms();
        let mut st = self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match result {
            Ok(_) => {
                st.last_ok_at = Some(now);
                st.last_error = None;
                st.last_error_at = None;
            }
            Err(TokenError::Budget(_)) => {}
            Err(e) => {
                st.last_error = Some(crate::error::chain(e));
                st.last_error_at = Some(now);
            }
        }
    }
}

impl From<GitHubError> for TokenError {
    fn from(e: GitHubError) -> TokenError {
        TokenError::Remote(Box::new(e))
    }
}

impl TokenSource for GitHubSource {
    fn registration_token(&self, now: DateTime<Utc>) -> TokenFuture<'_> {
        Box::pin(self.registration_token_now(now))
    }

    fn registration<'a>(
        &'a self,
        request: RunnerRequest<'a>,
        now: DateTime<Utc>,
    ) -> RegistrationFuture<'a> {
        Box::pin(async move {
            let result = match self.mode {
                Mode::Token => self
                    .registration_token_now(now)
                    .await
                    .map(Registration::Token),
                Mode::Jit => self.jit_now(request, now).await,
            };
            self.note(&result);
            result
        })
    }

    fn bind_installation(&self, installation_id: &str) {
        if !self.label_configured {
            *self
                .installation_label
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                format!("mig-{installation_id}");
        }
    }

    fn status(&self) -> Option<SourceStatus> {
        Some(
            self.status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }

    fn lifetime(&self) -> Duration {
        LIFETIME
    }

    fn our_runners(&self) -> RunnersFuture<'_> {
        Box::pin(async move { self.list_ours().await.map(Some).map_err(TokenError::from) })
    }

    fn remove_runner(&self, runner_id: u64) -> RemoveFuture<'_> {
        Box::pin(async move {
            self.delete_runner(runner_id)
                .await
                .map_err(TokenError::from)
        })
    }

    fn remove_runner_named<'a>(&'a self, name: &'a str, id: Option<u64>) -> RemoveFuture<'a> {
        Box::pin(async move {
            let id = match id {
                Some(id) => id,
                None => match self.find_ours(name).await? {
                    None => return Ok(Removed::Gone),
                    Some(r) if r.busy => return Ok(Removed::Busy),
                    Some(r) => r.id,
                },
            };
            self.delete_runner(id).await.map_err(TokenError::from)
        })
    }

    fn runner_label(&self) -> Option<String> {
        Some(self.label())
    }

    /// The API base and the scope: pools sharing them share one poll.
    fn poll_key(&self) -> Option<String> {
        Some(format!("{}{}", self.account.api.base(), self.scope.path()))
    }

    fn poll_jobs<'a>(&'a self, query: &'a PollQuery) -> PollFuture<'a> {
        Box::pin(async move { Some(self.poll(query).await) })
    }
}

/// `s` as a query value (unreserved characters as they are, the rest percent-encoded).
fn urlencoding(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
