//! The backstop poll's rules: webhooks get lost (GitHub does not retry a failed delivery),
//! so once per interval the controller asks GitHub's REST API about the jobs it holds open
//! and about the queued work of the repositories it serves, within a fixed number of calls.
//!
//! * A stored job is **checked** when its row has not changed for a whole interval: queued
//!   jobs first (a queued job that really started or finished makes the scaler start a VM
//!   nobody needs), oldest first, then jobs in progress for more than [`RUNNING_CHECK_MS`].
//!   Checks take at most half of a pass's calls; discovery takes the rest.
//! * **Discovery** reads the queued and in-progress workflow runs of the pool's repositories:
//!   the repository of a repository-scoped pool, then the repositories the pool's jobs came
//!   from (most recent first), then an organization's most recently pushed ones.
//! * What GitHub answers goes through the same [`apply_job_update`](super::apply_job_update)
//!   as a webhook: a job only moves forward, so a poll and a late delivery never fight.

use super::{JobStatus, JobUpdate};
use crate::model::{JobRecord, Millis};

/// A job in progress is checked once its row has been quiet this long (jobs run for hours;
/// a lost `completed` only leaves the job's row stale, it does not start VMs).
pub const RUNNING_CHECK_MS: Millis = 10 * 60 * 1000;

/// The status of a job as GitHub's REST API reports it (`requested` and `pending` are
/// queued, for us: no runner has it).
pub fn rest_job_status(status: &str) -> Option<JobStatus> {
    match status {
        "requested" | "pending" => Some(JobStatus::Queued),
        other => JobStatus::parse(other),
    }
}

/// The stored jobs to ask GitHub about at `now` (repository, job id), most urgent first, at
/// most `limit`: queued or waiting jobs whose row has not changed for `quiet_ms`, oldest
/// first, then jobs in progress quiet for [`RUNNING_CHECK_MS`].
pub fn jobs_to_check(
    open: &[JobRecord],
    now: Millis,
    quiet_ms: Millis,
    limit: usize,
) -> Vec<(String, i64)> {
    let waiting = |j: &&JobRecord| {
        matches!(j.status.as_str(), "queued" | "waiting") && now - j.updated_at >= quiet_ms
    };
    let running =
        |j: &&JobRecord| j.status == "in_progress" && now - j.updated_at >= RUNNING_CHECK_MS;
    let mut first: Vec<&JobRecord> = open.iter().filter(waiting).collect();
    let mut then: Vec<&JobRecord> = open.iter().filter(running).collect();
    first.sort_by_key(|j| (j.updated_at, j.job_id));
    then.sort_by_key(|j| (j.updated_at, j.job_id));
    first
        .into_iter()
        .chain(then)
        .filter(|j| is_repository(&j.repository))
        .take(limit)
        .map(|j| (j.repository.clone(), j.job_id))
        .collect()
}

/// The repositories whose runs a pass reads, in order, at most `limit`: the scope's own
/// repository, then those the pool's jobs came from, then the organization's recent ones;
/// each once (GitHub's names are case-insensitive).
pub fn repositories_to_read<'a>(
    scope_repo: Option<&'a str>,
    seen: &'a [String],
    org_recent: &'a [String],
    limit: usize,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in scope_repo
        .into_iter()
        .chain(seen.iter().map(String::as_str))
        .chain(org_recent.iter().map(String::as_str))
    {
        if out.len() >= limit {
            break;
        }
        if is_repository(r) && !out.iter().any(|o| o.eq_ignore_ascii_case(r)) {
            out.push(r.to_owned());
        }
    }
    out
}

/// `owner/name` with both parts in GitHub's alphabet: the only repositories a path is
/// built from (a stored name came from a webhook, and goes into a URL).
pub fn is_repository(full_name: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 100
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && s != "."
            && s != ".."
    };
    matches!(full_name.split_once('/'), Some((o, n)) if ok(o) && ok(n))
}

/// What a job GitHub no longer knows (404: deleted with its run or repository) becomes:
/// completed, concluded `vanished`, so it stops counting as demand.
pub fn vanished(job: &JobRecord, now: Millis) -> JobUpdate {
    JobUpdate {
        job_id: job.job_id,
        run_id: job.run_id,
        run_attempt: job.run_attempt,
        repository: job.repository.clone(),
        name: job.name.clone(),
        workflow_name: job.workflow_name.clone(),
        labels: job.labels.clone(),
        status: JobStatus::Completed,
        conclusion: Some("vanished".into()),
        runner_name: None,
        created_at: None,
        started_at: None,
        completed_at: Some(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: i64, repo: &str, status: &str, updated_at: Millis) -> JobRecord {
        JobRecord {
            job_id: id,
            run_id: 1,
            run_attempt: 1,
            repository: repo.into(),
            name: "build".into(),
            workflow_name: None,
            labels: vec![],
            status: status.into(),
            conclusion: None,
            pool_id: Some("p".into()),
            runner_name: None,
            vm_id: None,
            queued_at: 0,
            started_at: None,
            completed_at: None,
            updated_at,
        }
    }

    #[test]
    fn quiet_queued_jobs_are_checked_first_then_long_running_ones() {
        let now = 100 * 60_000;
        let open = vec![
            job(1, "a/b", "in_progress", now - RUNNING_CHECK_MS - 1),
            job(2, "a/b", "queued", now - 30_000),
            job(3, "a/b", "queued", now - 120_000),
            job(4, "a/b", "waiting", now - 90_000),
            job(5, "a/b", "in_progress", now - 60_000),
            job(6, "../x", "queued", now - 500_000),
        ];
        let checks = jobs_to_check(&open, now, 60_000, 10);
        let ids: Vec<i64> = checks.iter().map(|(_, id)| *id).collect();
        // 2 changed too recently, 5 has not run long, 6 cannot be asked about.
        assert_eq!(ids, vec![3, 4, 1]);
        assert_eq!(jobs_to_check(&open, now, 60_000, 2).len(), 2);
        assert!(jobs_to_check(&open, now, 60_000, 0).is_empty());
    }

    #[test]
    fn repositories_come_in_order_once_each_within_the_limit() {
        let seen = vec!["acme/App".to_owned(), "acme/lib".to_owned()];
        let org = vec![
            "acme/app".to_owned(),
            "acme/web".to_owned(),
            "acme/x y".to_owned(),
            "acme/docs".to_owned(),
        ];
        assert_eq!(
            repositories_to_read(Some("acme/ops"), &seen, &org, 4),
            vec!["acme/ops", "acme/App", "acme/lib", "acme/web"]
        );
        assert_eq!(
            repositories_to_read(None, &seen, &org, 10),
            vec!["acme/App", "acme/lib", "acme/web", "acme/docs"]
        );
    }

    #[test]
    fn only_plain_repository_names_become_paths() {
        for ok in ["acme/app", "a-b/c_d.e", "A/B"] {
            assert!(is_repository(ok), "{ok}");
        }
        for bad in [
            "",
            "acme",
            "acme/",
            "/app",
            "acme/app/x",
            "acme/..",
            "acme/a?b",
            "acme/a b",
            "ä/b",
        ] {
            assert!(!is_repository(bad), "{bad}");
        }
    }

    #[test]
    fn github_rest_statuses_map_onto_job_steps() {
        assert_eq!(rest_job_status("pending"), Some(JobStatus::Queued));
        assert_eq!(rest_job_status("requested"), Some(JobStatus::Queued));
        assert_eq!(rest_job_status("waiting"), Some(JobStatus::Waiting));
        assert_eq!(rest_job_status("in_progress"), Some(JobStatus::InProgress));
        assert_eq!(rest_job_status("completed"), Some(JobStatus::Completed));
        assert_eq!(rest_job_status("bogus"), None);
    }
}
