//! A fake GitHub for self-hosted runners.
//!
//! Real endpoint: `POST {api}/actions/runner-registration` with `Authorization: RemoteAuth
//! <registration token>` and `{"url": ..., "runner_event": "register"|"remove"}`; for hosts
//! other than github.com the API base is `https://HOST/api/v3`, which is what the stand-in
//! listener calls. A token that is not valid (unknown or expired) gets 404, as on GitHub.
//!
//! Simulation endpoints (prefix `/_sim`) stand in for the Actions service's session and job
//! messages: runners add themselves, poll for a job, report the result; tests queue jobs and
//! read what happened.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

mod jobs;
mod rest;
pub use rest::{APP_PRIVATE_KEY, Failure};

/// A job the test wants a runner to run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Job {
    /// Display name printed by the runner (`Running job: <name>`).
    pub name: String,
    /// The job's YAML key (`GITHUB_JOB`).
    #[serde(default)]
    pub job_key: String,
    /// `Succeeded`, `Failed`, `Canceled`, ... (the runner's TaskResult names).
    #[serde(default = "succeeded")]
    pub result: String,
    #[serde(default)]
    pub duration_ms: u64,
    #[serde(default)]
    pub run_id: String,
    #[serde(default)]
    pub repository: String,
    #[serde(default)]
    pub sha: String,
    #[serde(default)]
    pub git_ref: String,
    /// Only this runner may take it; any registered runner when empty.
    #[serde(default)]
    pub runner: String,
    /// The job's id (as in `workflow_job.id`); with a webhook set, its deliveries name it.
    #[serde(default)]
    pub id: u64,
    /// The job's `runs-on` labels: only a runner with all of them takes it (every runner
    /// has `self-hosted`, `linux` and `x64`, as GitHub's do).
    #[serde(default)]
    pub labels: Vec<String>,
}

/// Where the stand-in delivers `workflow_job` webhooks, signed with the secret.
#[derive(Debug, Clone, Default)]
struct Webhook {
    url: String,
    secret: String,
    /// Deliveries to drop (a lost webhook), counted down.
    lose: u32,
    /// Drop every this-many-th delivery as well (0: none).
    lose_every: u64,
    tried: u64,
    sent: u64,
}

fn succeeded() -> String {
    "Succeeded".into()
}

/// A runner as registered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RegisteredRunner {
    pub name: String,
    pub labels: Vec<String>,
    pub group: String,
    pub ephemeral: bool,
    pub url: String,
    /// `online` while polling, `deleted` after an ephemeral job or removal.
    pub status: String,
}

/// A finished job as the runner reported it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobReport {
    pub runner: String,
    pub name: String,
    pub result: String,
}

#[derive(Debug, Default)]
struct Inner {
    tokens: Vec<String>,
    registrations: Vec<String>,
    runners: HashMap<String, RegisteredRunner>,
    queue: VecDeque<Job>,
    reports: Vec<JobReport>,
    rest: rest::Rest,
    webhook: Option<Webhook>,
    /// The job each runner took, for its `completed` delivery.
    taken: HashMap<String, Job>,
    /// Every job with an id, as the REST API shows it.
    jobs: BTreeMap<u64, jobs::JobState>,
    job_seq: u64,
}

#[derive(Debug, Clone, Default)]
pub struct FakeGitHub {
    inner: Arc<Mutex<Inner>>,
}

impl FakeGitHub {
    /// A fake that accepts the given registration tokens.
    pub fn new(tokens: &[&str]) -> FakeGitHub {
        let g = FakeGitHub::default();
        g.lock().tokens = tokens.iter().map(|t| (*t).to_owned()).collect();
        g
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn enqueue_job(&self, job: Job) {
        let mut inner = self.lock();
        deliver(&mut inner, "queued", &job, None, None);
        inner.queue.push_back(job);
    }

    /// Delivers `workflow_job` webhooks (queued when a job is enqueued, in_progress when a
    /// runner takes it, completed when it reports) to `url`, signed with `secret` as GitHub
    /// signs them.
    pub fn with_webhook(self, url: &str, secret: &str) -> FakeGitHub {
        self.lock().webhook = Some(Webhook {
            url: url.to_owned(),
            secret: secret.to_owned(),
            ..Webhook::default()
        });
        self
    }

    /// Drops the next `n` webhook deliveries (GitHub does not retry them).
    pub fn lose_webhooks(&self, n: u32) {
        if let Some(w) = self.lock().webhook.as_mut() {
            w.lose = n;
        }
    }

    /// Drops every `k`-th webhook delivery from now on (0: none), as a flaky network would.
    pub fn lose_every(&self, k: u64) {
        if let Some(w) = self.lock().webhook.as_mut() {
            w.lose_every = k;
        }
    }

    /// Jobs queued that no runner has taken.
    pub fn queued_jobs(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn runners(&self) -> Vec<RegisteredRunner> {
        let mut v: Vec<_> = self.lock().runners.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn reports(&self) -> Vec<JobReport> {
        self.lock().reports.clone()
    }

    /// How many registration-token exchanges succeeded.
    pub fn registrations(&self) -> usize {
        self.lock().registrations.len()
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/api/v3/actions/runner-registration", post(exchange))
            .route("/_sim/runners", get(list_runners).post(add_runner))
            .route("/_sim/runners/{name}/job", get(next_job))
            .route("/_sim/runners/{name}/delete", post(delete_runner))
            .route("/_sim/reports", post(report))
            .route("/_sim/jobs", post(add_job))
            .fallback(rest::rest)
            .with_state(self.clone())
    }

    /// Serves on `listener` until the returned task is aborted.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
    ) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
        let addr = listener.local_addr()?;
        let router = self.router();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok((addr, task))
    }
}

#[derive(Deserialize)]
struct ExchangeBody {
    url: String,
    runner_event: String,
}

async fn exchange(
    State(g): State<FakeGitHub>,
    headers: HeaderMap,
    Json(body): Json<ExchangeBody>,
) -> Response {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("RemoteAuth "))
        .unwrap_or_default()
        .to_owned();
    let mut inner = g.lock();
    if !inner.tokens.contains(&token) {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"message": "Not Found"})),
        )
            .into_response();
    }
    if body.runner_event == "register" {
        inner.registrations.push(body.url.clone());
    }
    Json(serde_json::json!({
        "url": body.url,
        "token_schema": "OAuthAccessToken",
        "token": format!("svc-{}", uuid::Uuid::new_v4().simple()),
        "use_v2_flow": true,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct AddRunner {
    name: String,
    labels: Vec<String>,
    group: String,
    ephemeral: bool,
    url: String,
    replace: bool,
}

async fn add_runner(State(g): State<FakeGitHub>, Json(r): Json<AddRunner>) -> StatusCode {
    let mut inner = g.lock();
    if let Some(existing) = inner.runners.get(&r.name)
        && existing.status != "deleted"
        && !r.replace
    {
        return StatusCode::CONFLICT;
    }
    inner.runners.insert(
        r.name.clone(),
        RegisteredRunner {
            name: r.name,
            labels: r.labels,
            group: r.group,
            ephemeral: r.ephemeral,
            url: r.url,
            status: "online".into(),
        },
    );
    StatusCode::CREATED
}

async fn list_runners(State(g): State<FakeGitHub>) -> Json<Vec<RegisteredRunner>> {
    Json(g.runners())
}

async fn next_job(State(g): State<FakeGitHub>, Path(name): Path<String>) -> Response {
    let mut inner = g.lock();
    match inner.runners.get_mut(&name) {
        // A JIT runner is online once its listener polls.
        Some(r) if r.status != "deleted" => r.status = "online".into(),
        _ => return (StatusCode::NOT_FOUND, "runner not registered").into_response(),
    }
    let labels = inner
        .runners
        .get(&name)
        .map(|r| r.labels.clone())
        .unwrap_or_default();
    let pos = inner
        .queue
        .iter()
        .position(|j| (j.runner.is_empty() || j.runner == name) && can_run(&labels, &j.labels));
    match pos.and_then(|p| inner.queue.remove(p)) {
        Some(job) => {
            deliver(&mut inner, "in_progress", &job, Some(&name), None);
            inner.taken.insert(name, job.clone());
            Json(job).into_response()
        }
        None => StatusCode::NO_CONTENT.into_response(),
    }
}

async fn delete_runner(State(g): State<FakeGitHub>, Path(name): Path<String>) -> StatusCode {
    match g.lock().runners.get_mut(&name) {
        Some(r) => {
            r.status = "deleted".into();
            StatusCode::NO_CONTENT
        }
        None => StatusCode::NOT_FOUND,
    }
}

async fn report(State(g): State<FakeGitHub>, Json(r): Json<JobReport>) -> StatusCode {
    let mut inner = g.lock();
    if let Some(job) = inner.taken.remove(&r.runner) {
        let conclusion = match r.result.as_str() {
            "Succeeded" | "SucceededWithIssues" => "success",
            "Canceled" => "cancelled",
            _ => "failure",
        };
        deliver(
            &mut inner,
            "completed",
            &job,
            Some(&r.runner),
            Some(conclusion),
        );
    }
    inner.reports.push(r);
    StatusCode::NO_CONTENT
}

/// Whether a runner with `runner` labels may take a job asking for `wanted` (GitHub's
/// default labels are every runner's).
fn can_run(runner: &[String], wanted: &[String]) -> bool {
    wanted.iter().all(|w| {
        ["self-hosted", "linux", "x64"]
            .iter()
            .any(|d| d.eq_ignore_ascii_case(w))
            || runner.iter().any(|l| l.eq_ignore_ascii_case(w))
    })
}

/// Records that a job moved (for the REST API) and sends one `workflow_job` delivery in the
/// background, as GitHub's hookshot does: raw JSON
/// body, `X-GitHub-Event`, a fresh `X-GitHub-Delivery`, `X-Hub-Signature-256`.
fn deliver(
    inner: &mut Inner,
    action: &str,
    job: &Job,
    runner: Option<&str>,
    conclusion: Option<&str>,
) {
    jobs::track(inner, action, job, runner, conclusion);
    let Some(hook) = inner.webhook.as_mut() else {
        return;
    };
    if job.id == 0 {
        return;
    }
    hook.tried += 1;
    if hook.lose > 0 {
        hook.lose -= 1;
        return;
    }
    if hook.lose_every > 0 && hook.tried.is_multiple_of(hook.lose_every) {
        return;
    }
    hook.sent += 1;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let body = serde_json::json!({
        "action": action,
        "workflow_job": {
            "id": job.id,
            "run_id": jobs::run_id(job),
            "run_attempt": 1,
            "name": job.name,
            "workflow_name": "CI",
            "status": action,
            "conclusion": conclusion,
            "labels": job.labels,
            "runner_name": runner,
            "created_at": now,
            "started_at": (action != "queued").then_some(&now),
            "completed_at": (action == "completed").then_some(&now),
        },
        "repository": {"full_name": jobs::repository(job)},
    })
    .to_string();
    let signature = mig_controller::github::webhook::sign(hook.secret.as_bytes(), body.as_bytes());
    let url = hook.url.clone();
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let sent = client
            .post(&url)
            .header("X-GitHub-Event", "workflow_job")
            .header("X-GitHub-Delivery", uuid::Uuid::new_v4().to_string())
            .header("X-Hub-Signature-256", signature)
            .header("User-Agent", "GitHub-Hookshot/miglet-sim")
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await;
        if let Err(e) = sent {
            eprintln!("webhook delivery to {url} failed: {e}");
        }
    });
}

async fn add_job(State(g): State<FakeGitHub>, Json(job): Json<Job>) -> StatusCode {
    g.enqueue_job(job);
    StatusCode::CREATED
}
