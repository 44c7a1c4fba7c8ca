//! Jobs and workflow runs as GitHub's REST API shows them (research file §5.4, §5.8): what
//! the controller's backstop poll reads when webhooks were lost.
//!
//! * `GET /repos/{owner}/{repo}/actions/jobs/{job_id}`: one job (404 when unknown);
//! * `GET /repos/{owner}/{repo}/actions/runs?status=...&per_page=...`: the repository's
//!   runs, newest first; a run is `queued` while none of its jobs started, `completed` when
//!   all are, `in_progress` otherwise;
//! * `GET /repos/{owner}/{repo}/actions/runs/{run_id}/jobs`: a run's jobs;
//! * `GET /orgs/{org}/repos?sort=pushed`: the organization's repositories that have jobs,
//!   most recently active first.
//!
//! Every job the stand-in queues (with an id) is recorded here as it moves, whether or not
//! its webhook deliveries were lost.

use super::*;
use serde_json::{Value, json};

/// The repository of a job that names none.
const DEFAULT_REPOSITORY: &str = "acme/app";

/// One job's REST view.
#[derive(Debug, Clone)]
pub(super) struct JobState {
    job: Job,
    status: &'static str,
    runner: Option<String>,
    conclusion: Option<String>,
    created_at: String,
    started_at: Option<String>,
    completed_at: Option<String>,
    /// When it last changed, for ordering runs and repositories.
    seq: u64,
}

pub(super) fn repository(job: &Job) -> &str {
    if job.repository.contains('/') {
        &job.repository
    } else {
        DEFAULT_REPOSITORY
    }
}

pub(super) fn run_id(job: &Job) -> u64 {
    job.run_id.parse().unwrap_or(job.id)
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Records that `job` moved to `action` (`queued`, `in_progress`, `completed`).
pub(super) fn track(
    inner: &mut Inner,
    action: &str,
    job: &Job,
    runner: Option<&str>,
    conclusion: Option<&str>,
) {
    if job.id == 0 {
        return;
    }
    inner.job_seq += 1;
    let seq = inner.job_seq;
    let now = now_rfc3339();
    let state = inner.jobs.entry(job.id).or_insert_with(|| JobState {
        job: job.clone(),
        status: "queued",
        runner: None,
        conclusion: None,
        created_at: now.clone(),
        started_at: None,
        completed_at: None,
        seq,
    });
    state.seq = seq;
    match action {
        "in_progress" => {
            state.status = "in_progress";
            state.runner = runner.map(str::to_owned);
            state.started_at = Some(now);
        }
        "completed" => {
            state.status = "completed";
            state.conclusion = conclusion.map(str::to_owned);
            state.started_at.get_or_insert_with(|| now.clone());
            state.completed_at = Some(now);
        }
        _ => {}
    }
}

fn job_json(inner: &Inner, s: &JobState) -> Value {
    json!({
        "id": s.job.id,
        "run_id": run_id(&s.job),
        "run_attempt": 1,
        "status": s.status,
        "conclusion": s.conclusion,
        "name": s.job.name,
        "workflow_name": "CI",
        "head_branch": "main",
        "labels": s.job.labels,
        "runner_name": s.runner,
        "runner_id": s.runner.as_ref().and_then(|r| inner.rest.runner_ids.get(r)),
        "created_at": s.created_at,
        "started_at": s.started_at,
        "completed_at": s.completed_at,
    })
}

fn jobs_of<'a>(inner: &'a Inner, repo: &'a str) -> impl Iterator<Item = &'a JobState> + 'a {
    inner
        .jobs
        .values()
        .filter(move |s| repository(&s.job).eq_ignore_ascii_case(repo))
}

/// A run's status from its jobs' (GitHub's rule: queued until one starts, completed when
/// all are).
fn run_status<'a>(jobs: impl Iterator<Item = &'a JobState>) -> &'static str {
    let (mut all_queued, mut all_done) = (true, true);
    for j in jobs {
        all_queued &= j.status == "queued";
        all_done &= j.status == "completed";
    }
    match (all_queued, all_done) {
        (true, _) => "queued",
        (_, true) => "completed",
        _ => "in_progress",
    }
}

fn per_page(query: &HashMap<String, String>, default: usize) -> usize {
    query
        .get("per_page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(default)
        .clamp(1, 100)
}

/// `GET /repos/{owner}/{repo}/actions/{rest..}` for jobs and runs; `None` for another path.
pub(super) fn rest_call(
    inner: &Inner,
    repo: &str,
    rest: &[&str],
    query: &HashMap<String, String>,
) -> Option<Response> {
    Some(match rest {
        ["jobs", id] => {
            let found = id
                .parse::<u64>()
                .ok()
                .and_then(|id| inner.jobs.get(&id))
                .filter(|s| repository(&s.job).eq_ignore_ascii_case(repo));
            match found {
                Some(s) => Json(job_json(inner, s)).into_response(),
                None => rest::error(404, "Not Found"),
            }
        }
        ["runs"] => {
            let mut runs: BTreeMap<u64, Vec<&JobState>> = BTreeMap::new();
            for s in jobs_of(inner, repo) {
                runs.entry(run_id(&s.job)).or_default().push(s);
            }
            let mut listed: Vec<(u64, &'static str)> = runs
                .iter()
                .map(|(id, jobs)| (*id, run_status(jobs.iter().copied())))
                .filter(|(_, st)| query.get("status").is_none_or(|want| want == st))
                .collect();
            // Newest first, as GitHub lists them.
            listed.sort_by_key(|(id, _)| std::cmp::Reverse(*id));
            let total = listed.len();
            let page: Vec<Value> = listed
                .iter()
                .take(per_page(query, 30))
                .map(|(id, st)| json!({"id": id, "status": st, "repository": {"full_name": repo}}))
                .collect();
            Json(json!({"total_count": total, "workflow_runs": page})).into_response()
        }
        ["runs", id, "jobs"] => {
            let id: u64 = id.parse().unwrap_or(0);
            let jobs: Vec<Value> = jobs_of(inner, repo)
                .filter(|s| run_id(&s.job) == id)
                .take(per_page(query, 30))
                .map(|s| job_json(inner, s))
                .collect();
            if jobs.is_empty() {
                return Some(rest::error(404, "Not Found"));
            }
            Json(json!({"total_count": jobs.len(), "jobs": jobs})).into_response()
        }
        _ => return None,
    })
}

/// `GET /orgs/{org}/repos`: the organization's repositories that have jobs, most recently
/// active first (as `sort=pushed` would list them).
pub(super) fn org_repos(inner: &Inner, org: &str, query: &HashMap<String, String>) -> Response {
    let mut latest: HashMap<&str, u64> = HashMap::new();
    for s in inner.jobs.values() {
        let repo = repository(&s.job);
        if repo
            .split_once('/')
            .is_some_and(|(o, _)| o.eq_ignore_ascii_case(org))
        {
            let e = latest.entry(repo).or_default();
            *e = (*e).max(s.seq);
        }
    }
    let mut repos: Vec<(&str, u64)> = latest.into_iter().collect();
    repos.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let out: Vec<Value> = repos
        .iter()
        .take(per_page(query, 30))
        .map(|(r, _)| json!({"full_name": r, "name": r.split_once('/').map(|(_, n)| n)}))
        .collect();
    Json(Value::Array(out)).into_response()
}
