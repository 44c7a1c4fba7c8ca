//! The backstop poll's REST calls: what GitHub says of the jobs we hold open
//! (`GET /repos/{owner}/{repo}/actions/jobs/{job_id}`) and of the queued work of the
//! repositories a pool serves (`GET /repos/{owner}/{repo}/actions/runs?status=...`, then
//! `GET .../actions/runs/{run_id}/jobs?filter=latest`; an organization's most recently pushed
//! repositories from `GET /orgs/{org}/repos?sort=pushed`). A pass makes at most
//! [`PollQuery::max_calls`] calls and none while the account's remaining rate limit is below
//! [`RATE_RESERVE`], which is kept for minting and runner cleanup.

use super::source::GitHubSource;
use super::webhook::parse_rest_job;
use super::{GitHubError, Scope};
use crate::lifecycle::repositories_to_read;
pub use crate::token::{PollQuery, PollReport};

/// Below this many calls left in the hour, the backstop poll waits for the limit to reset.
pub const RATE_RESERVE: u64 = 1_000;
/// Repositories whose runs one pass reads, at most.
pub const MAX_REPOSITORIES: usize = 10;
/// Runs of one status listed per repository and pass (one call). GitHub lists the newest
/// first; the pass reads their jobs oldest first, so when its calls run out it is the
/// newest runs (the shortest waits) that wait for the next pass.
const RUNS_PER_PAGE: usize = 100;
/// An organization's repositories read for discovery (most recently pushed).
const ORG_REPOSITORIES: usize = 10;

/// A pass's calls, counted against its allowance.
struct Pass<'a> {
    source: &'a GitHubSource,
    left: usize,
    report: PollReport,
}

impl Pass<'_> {
    /// One GET, if the allowance has one left (`Ok(None)`: it has not).
    async fn get(&mut self, path: &str) -> Result<Option<serde_json::Value>, GitHubError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        self.report.calls += 1;
        self.source.get(path).await.map(|r| Some(r.body))
    }

    /// Looks up one stored job.
    async fn check(&mut self, repo: &str, job_id: i64) -> Result<(), GitHubError> {
        match self
            .get(&format!("/repos/{repo}/actions/jobs/{job_id}"))
            .await
        {
            Ok(Some(body)) => {
                self.take(repo, body);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(GitHubError::NotFound(_)) => {
                self.report.vanished.push(job_id);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads the jobs of `repo`'s runs in `status` (one page of runs, each run's latest
    /// jobs). A repository GitHub does not show us (404) is skipped.
    async fn runs(&mut self, repo: &str, status: &str) -> Result<(), GitHubError> {
        let path = format!("/repos/{repo}/actions/runs?status={status}&per_page={RUNS_PER_PAGE}");
        let runs = match self.get(&path).await {
            Ok(Some(body)) => body,
            Ok(None) | Err(GitHubError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let ids: Vec<u64> = runs["workflow_runs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["id"].as_u64())
            .collect();
        for run in ids.into_iter().rev() {
            let path = format!("/repos/{repo}/actions/runs/{run}/jobs?filter=latest&per_page=100");
            match self.get(&path).await {
                Ok(Some(mut body)) => {
                    if let Some(jobs) = body.get_mut("jobs").map(serde_json::Value::take)
                        && let serde_json::Value::Array(jobs) = jobs
                    {
                        for job in jobs {
                            self.take(repo, job);
                        }
                    }
                }
                Ok(None) => break,
                Err(GitHubError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// An organization's most recently pushed repositories.
    async fn org_recent(&mut self, org: &str) -> Result<Vec<String>, GitHubError> {
        let path =
            format!("/orgs/{org}/repos?sort=pushed&direction=desc&per_page={ORG_REPOSITORIES}");
        Ok(match self.get(&path).await? {
            Some(body) => body
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["full_name"].as_str().map(str::to_owned))
                .collect(),
            None => Vec::new(),
        })
    }

    /// Keeps a job object GitHub answered with; one that does not read as a job is
    /// skipped (and said once per pass at debug level: GitHub's answers are not ours to fix).
    fn take(&mut self, repo: &str, job: serde_json::Value) {
        match parse_rest_job(repo, job) {
            Ok(Some(update)) => self.report.add(update),
            Ok(None) => {}
            Err(e) => tracing::debug!(repo, error = %e, "Backstop poll skipped a job object"),
        }
    }
}

impl GitHubSource {
    /// One backstop pass for this source's scope: the checks, then discovery, within the
    /// query's calls. A rate limit or an error ends the pass early; what was learned until
    /// then is reported.
    pub async fn poll(&self, query: &PollQuery) -> PollReport {
        if let Some(left) = self.account().api.rate_limit_remaining()
            && left < RATE_RESERVE
        {
            return PollReport {
                stopped: Some(format!(
                    "{left} GitHub API calls left this hour; the poll waits for the limit to reset"
                )),
                ..PollReport::default()
            };
        }
        let mut pass = Pass {
            source: self,
            left: query.max_calls,
            report: PollReport::default(),
        };
        if let Err(e) = discover(&mut pass, query, self.scope()).await {
            pass.report.stopped = Some(crate::error::chain(&e));
        }
        pass.report
    }
}

async fn discover(
    pass: &mut Pass<'_>,
    query: &PollQuery,
    scope: &Scope,
) -> Result<(), GitHubError> {
    // The caller chose how many checks (half the allowance: `lifecycle::jobs_to_check`).
    for (repo, id) in &query.check {
        pass.check(repo, *id).await?;
    }
    let (scope_repo, org_recent) = match scope {
        Scope::Repo { owner, repo } => (Some(format!("{owner}/{repo}")), Vec::new()),
        Scope::Org(org) if pass.left > 1 => (None, pass.org_recent(org).await?),
        _ => (None, Vec::new()),
    };
    let repos = repositories_to_read(
        scope_repo.as_deref(),
        &query.seen,
        &org_recent,
        MAX_REPOSITORIES,
    );
    for status in ["queued", "in_progress"] {
        for repo in &repos {
            if pass.left == 0 {
                return Ok(());
            }
            pass.runs(repo, status).await?;
        }
    }
    Ok(())
}
