//! The backstop poll against the GitHub stand-in over loopback: jobs the webhooks never told
//! of are found through the repositories' runs, stored jobs are looked up and follow GitHub
//! forward (or are marked vanished when GitHub no longer knows them), and a pass never makes
//! more calls than it is allowed.

use super::common::TestResult;
use super::github::{APP_ID, INSTALLATION, source_for};
use mig_controller::clock::Clock;
use mig_controller::github::Scope;
use mig_controller::github::demand::PollQuery;
use mig_controller::lifecycle::JobStatus;
use miglet_sim::github::{FakeGitHub, Job};
use serde_json::json;

async fn stand_in() -> Result<(FakeGitHub, String), Box<dyn std::error::Error + Send + Sync>> {
    let gh = FakeGitHub::new(&[]).with_app(APP_ID, INSTALLATION);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (addr, _task) = gh.serve(listener).await?;
    Ok((gh, format!("http://{addr}")))
}

fn job(id: u64, repo: &str, run: u64) -> Job {
    Job {
        id,
        name: format!("job {id}"),
        repository: repo.into(),
        run_id: run.to_string(),
        labels: vec!["self-hosted".into(), "linux".into()],
        ..Job::default()
    }
}

/// The REST calls the stand-in answered for the backstop (runs, jobs, repositories).
fn poll_calls(gh: &FakeGitHub) -> usize {
    gh.rest_calls()
        .iter()
        .filter(|(_, p, _)| {
            p.contains("/actions/runs") || p.contains("/actions/jobs/") || p.ends_with("/repos")
        })
        .count()
}

#[tokio::test]
async fn queued_jobs_of_the_organizations_repositories_are_found_within_the_call_allowance()
-> TestResult {
    let (gh, base) = stand_in().await?;
    // Two repositories of the organization, one elsewhere; three runs, one with two jobs.
    gh.enqueue_job(job(11, "acme/app", 100));
    gh.enqueue_job(job(12, "acme/app", 100));
    gh.enqueue_job(job(21, "acme/lib", 200));
    gh.enqueue_job(job(31, "other/x", 300));
    let src = source_for(&base, &Clock::system(), Scope::Org("acme".into()))?;
    let report = src
        .poll(&PollQuery {
            max_calls: 30,
            ..PollQuery::default()
        })
        .await;
    assert_eq!(report.stopped, None);
    let mut ids: Vec<i64> = report.jobs.iter().map(|j| j.job_id).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        vec![11, 12, 21],
        "the other organization's job is not ours"
    );
    assert!(report.jobs.iter().all(|j| j.status == JobStatus::Queued));
    let app = report.jobs.iter().find(|j| j.job_id == 12);
    assert_eq!(
        app.map(|j| (j.repository.as_str(), j.run_id)),
        Some(("acme/app", 100))
    );
    // 1 repository list + 2 × (queued runs, in-progress runs) + 2 runs' jobs.
    assert_eq!(report.calls, 7);
    assert_eq!(poll_calls(&gh), 7);

    // A pass allowed 3 calls makes 3 and says nothing is wrong: the rest waits.
    let before = poll_calls(&gh);
    let small = src
        .poll(&PollQuery {
            max_calls: 3,
            ..PollQuery::default()
        })
        .await;
    assert_eq!(small.calls, 3);
    assert_eq!(poll_calls(&gh) - before, 3);
    Ok(())
}

#[tokio::test]
async fn stored_jobs_are_looked_up_and_follow_github_or_vanish() -> TestResult {
    let (gh, base) = stand_in().await?;
    gh.enqueue_job(job(41, "acme/app", 400));
    // A runner takes the job and finishes it; no webhook told anyone.
    let http = reqwest::Client::new();
    http.post(format!("{base}/_sim/runners"))
        .json(&json!({"name": "vm-1-1", "labels": ["self-hosted", "linux"], "group": "Default", "ephemeral": true, "url": "", "replace": false}))
        .send()
        .await?
        .error_for_status()?;
    let taken: serde_json::Value = http
        .get(format!("{base}/_sim/runners/vm-1-1/job"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(taken["id"], 41);
    let src = source_for(
        &base,
        &Clock::system(),
        Scope::Repo {
            owner: "acme".into(),
            repo: "app".into(),
        },
    )?;
    let query = PollQuery {
        check: vec![("acme/app".into(), 41), ("acme/app".into(), 999)],
        seen: vec![],
        max_calls: 10,
    };
    let report = src.poll(&query).await;
    let j = report.jobs.iter().find(|j| j.job_id == 41);
    assert_eq!(j.map(|j| j.status), Some(JobStatus::InProgress));
    assert_eq!(
        j.and_then(|j| j.runner_name.as_deref()),
        Some("vm-1-1"),
        "the runner that took it, so the job is tied to its VM"
    );
    assert_eq!(report.vanished, vec![999]);

    http.post(format!("{base}/_sim/reports"))
        .json(&json!({"runner": "vm-1-1", "name": "job 41", "result": "Failed"}))
        .send()
        .await?
        .error_for_status()?;
    let report = src.poll(&query).await;
    let j = report.jobs.iter().find(|j| j.job_id == 41);
    assert_eq!(j.map(|j| j.status), Some(JobStatus::Completed));
    assert_eq!(j.and_then(|j| j.conclusion.as_deref()), Some("failure"));
    Ok(())
}

#[tokio::test]
async fn a_rate_limited_pass_stops_and_says_why() -> TestResult {
    let (gh, base) = stand_in().await?;
    gh.enqueue_job(job(51, "acme/app", 500));
    gh.fail(miglet_sim::github::Failure {
        path_contains: "/actions/runs".into(),
        status: 403,
        message: "You have exceeded a secondary rate limit".into(),
        retry_after: Some(60),
        times: 1,
    });
    let src = source_for(&base, &Clock::system(), Scope::Org("acme".into()))?;
    let query = PollQuery {
        seen: vec!["acme/app".into()],
        max_calls: 30,
        ..PollQuery::default()
    };
    let report = src.poll(&query).await;
    assert!(
        report
            .stopped
            .as_deref()
            .is_some_and(|s| s.contains("rate limit")),
        "{report:?}"
    );
    // Held back until GitHub's wait is over: the next pass makes no call at all.
    let before = poll_calls(&gh);
    let again = src.poll(&query).await;
    assert!(again.stopped.is_some());
    assert_eq!(poll_calls(&gh), before);
    Ok(())
}
