//! Pools that run themselves, end to end: the real controller with a `local` pool (each VM
//! a real `miglet` process), the GitHub stand-in delivering signed `workflow_job` webhooks,
//! and the runner stand-in running the jobs.

mod support;

use mig_controller::lifecycle::ScalePolicy;
use mig_controller::provider::local::LocalSettings;
use miglet_sim::github::Job;
use std::time::Duration;
use support::*;

const WEBHOOK_SECRET: &str = "fleet-e2e-webhook-secret-0123456789";

fn policy(max_size: u32) -> ScalePolicy {
    ScalePolicy {
        min_idle: 0,
        max_size,
        idle_timeout: 60_000,
        max_vm_lifetime: 3_600_000,
        boot_timeout: 60_000,
        registration_timeout: 60_000,
        scale_up_step: 10,
        scale_up_per_minute: None,
    }
}

/// A controller whose `pool-e2e` is sized by the scaler, and the stand-in delivering its
/// webhooks to it.
async fn fleet(env: &Env, max_size: u32) -> Controller {
    fleet_with(env, policy(max_size), None).await
}

/// [`fleet`] with this policy, minting on the stand-in when `github` says so.
async fn fleet_with(env: &Env, policy: ScalePolicy, github: Option<GitHubMint>) -> Controller {
    let secret_file = env.dir.path().join("webhook.secret");
    std::fs::write(&secret_file, WEBHOOK_SECRET).unwrap_or_else(|e| panic!("{e}"));
    let local = LocalSettings {
        miglet_bin: MIGLET.into(),
        runner_template: env.dir.path().join("runner"),
        work_dir: env.dir.path().join("vms"),
        env: vec![
            (
                "MIGLET_BOOTSTRAP_SECRET_FILE".into(),
                env.dir.path().join("pool.secret").display().to_string(),
            ),
            ("MIGLET_ORG_ID".into(), "org-e2e".into()),
            ("MIGLET_HEARTBEAT_INTERVAL".into(), "2s".into()),
            ("MIGLET_POLL_INTERVAL".into(), "1s".into()),
            ("MIGLET_SHUTDOWN_GRACE_PERIOD".into(), "3s".into()),
        ],
        args: vec!["--runner-user=".into()],
        stop_grace: Duration::from_secs(5),
    };
    let cfg = CtlConfig {
        plain_http: true,
        github_app: github,
        scaled: Some(ScaledPool {
            policy,
            local,
            webhook_secret_file: secret_file,
        }),
        ..env.ctl()
    };
    let mut ctl = Controller::start(&env.dir.path().join("ctl"), &cfg).await;
    // Agents reach the controller through the test's proxies, which survive a restart; the
    // controller starts again with that setting before any VM exists.
    if let Some(scaled) = ctl.cfg.scaled.as_mut() {
        scaled.local.env.extend([
            (
                "MIGLET_CONTROLLER_ENDPOINT".to_owned(),
                format!("http://{}", ctl.http),
            ),
            (
                "MIGLET_CONTROLLER_GRPC_ENDPOINT".to_owned(),
                format!("http://{}", ctl.grpc),
            ),
        ]);
    }
    ctl.restart().await;
    let _ = env.github.clone().with_webhook(
        &format!("http://{}/api/v1/github/webhook", ctl.http),
        WEBHOOK_SECRET,
    );
    ctl
}

/// Waits (bounded) until the stand-in has `jobs` job reports, checking every 100 ms that
/// never more than `max` VMs exist; returns the most there were at once.
async fn run_jobs(env: &Env, jobs: usize, max: usize, limit: Duration) -> usize {
    let mut most = 0;
    let deadline = tokio::time::Instant::now() + limit;
    while env.github.reports().len() < jobs {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {jobs} jobs ran",
            env.github.reports().len()
        );
        most = most.max(vm_dirs(env));
        assert!(most <= max, "{most} VMs at once with max_size {max}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    most
}

/// Waits (bounded) until every VM is gone: its directory, and its instance recorded deleted.
async fn all_deleted(env: &Env, ctl: &Controller) {
    miglet_sim::testkit::wait_for(
        "every VM to be deleted",
        Duration::from_secs(30),
        || async {
            vm_dirs(env) == 0
                && instances_ever(ctl)
                    .await
                    .iter()
                    .all(|i| i.state == "deleted")
        },
    )
    .await;
}

/// Every instance the scaler ever recorded (live or deleted).
async fn instances_ever(ctl: &Controller) -> Vec<mig_controller::model::InstanceRecord> {
    let store = ctl.app().store();
    let mut all = store.instances_live("pool-e2e").await.unwrap_or_default();
    all.extend(store.instances_deleted(1000).await.unwrap_or_default());
    all
}

fn long_job(id: u64, ms: u64) -> Job {
    Job {
        duration_ms: ms,
        ..job(id)
    }
}

fn job(id: u64) -> Job {
    Job {
        name: format!("build {id}"),
        job_key: "build".into(),
        result: "Succeeded".into(),
        duration_ms: 300,
        run_id: format!("{}", id * 10),
        repository: "acme/widgets".into(),
        id,
        labels: vec!["self-hosted".into(), "e2e".into()],
        ..Job::default()
    }
}

/// The VM directories the local provider holds.
fn vm_dirs(env: &Env) -> usize {
    std::fs::read_dir(env.dir.path().join("vms")).map_or(0, |d| d.count())
}

#[tokio::test]
async fn a_queued_job_gets_a_vm_that_runs_it_and_is_deleted_after() {
    let env = env().await;
    let mut ctl = fleet(&env, 5).await;
    env.github.enqueue_job(job(101));
    let app = ctl.app();
    miglet_sim::testkit::wait_for("the job to complete", Duration::from_secs(90), || async {
        app.store()
            .job_get(101)
            .await
            .ok()
            .flatten()
            .is_some_and(|j| j.status == "completed")
    })
    .await;
    let stored = app
        .store()
        .job_get(101)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("job"));
    assert_eq!(stored.pool_id.as_deref(), Some("pool-e2e"));
    assert_eq!(stored.conclusion.as_deref(), Some("success"));
    let vm = stored
        .vm_id
        .clone()
        .unwrap_or_else(|| panic!("the job names its VM: {stored:?}"));
    assert!(vm.starts_with("pool-e2e-"), "{vm}");
    assert_eq!(env.github.reports().len(), 1);
    // The ephemeral VM is deleted once its job is done, and nothing replaces it.
    miglet_sim::testkit::wait_for("the VM to be deleted", Duration::from_secs(30), || async {
        app.store()
            .instance_get(&vm)
            .await
            .ok()
            .flatten()
            .is_some_and(|i| i.state == "deleted")
    })
    .await;
    let inst = app
        .store()
        .instance_get(&vm)
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("instance"));
    assert_eq!(inst.delete_reason.as_deref(), Some("job_done"));
    assert_eq!(vm_dirs(&env), 0, "the VM's process and directory are gone");
    let log = app.store().vm_log_for_vm(&vm).await.unwrap_or_default();
    assert!(log.iter().any(|l| l.kind == "vm_deleted"), "{log:?}");
    let created = log.iter().find(|l| l.kind == "vm_created");
    assert!(
        created
            .and_then(|l| l.detail.as_deref())
            .is_some_and(|d| d.contains("\"reason\":\"queued_jobs\"")),
        "the VM's timeline says why it was created: {log:?}"
    );
    // The pool view says what the scaler saw, and the job is listed with its VM.
    let token = std::fs::read_to_string(env.dir.path().join("ctl").join("initial-admin-token"))
        .unwrap_or_else(|e| panic!("admin token: {e}"));
    let admin = |path: &'static str| {
        let (url, token) = (
            format!("http://{}{path}", ctl.http),
            token.trim().to_owned(),
        );
        async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{path}: {e}"))
                .json::<serde_json::Value>()
                .await
                .unwrap_or_else(|e| panic!("{path}: {e}"))
        }
    };
    let pools = admin("/api/v1/admin/pools").await;
    let pool = pools["pools"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["pool_id"] == "pool-e2e"))
        .unwrap_or_else(|| panic!("{pools}"));
    assert_eq!(pool["scaling"]["provider"], "local", "{pool}");
    assert_eq!(pool["scaling"]["max_size"], 5, "{pool}");
    assert!(pool["scaling"]["last_pass_at"].is_i64(), "{pool}");
    assert_eq!(pool["scaling"]["after_job"], "delete", "{pool}");
    assert_eq!(pool["scaling"]["idle_timeout_secs"], 60, "{pool}");
    // The pool's size over time, as the fleet page charts it: it had the job's VM.
    let history = admin("/api/v1/admin/pools/pool-e2e/history?minutes=5").await;
    let samples = history["samples"].as_array().cloned().unwrap_or_default();
    assert!(
        samples.iter().any(|s| s["actual"].as_u64() >= Some(1)),
        "{history}"
    );
    assert!(
        samples
            .windows(2)
            .all(|w| w[0]["at"].as_i64() < w[1]["at"].as_i64()),
        "{history}"
    );
    let jobs = admin("/api/v1/admin/jobs").await;
    assert_eq!(jobs["jobs"][0]["job_id"], 101, "{jobs}");
    assert_eq!(jobs["jobs"][0]["vm_id"], vm.as_str(), "{jobs}");
    assert!(jobs["jobs"][0]["queue_ms"].is_i64(), "{jobs}");
    let pools = admin("/api/v1/admin/pools").await;
    let queue = &pools["pools"][0]["scaling"]["queue"];
    assert_eq!(queue["jobs_started"], 1, "{pools}");
    assert!(queue["p50_seconds"].is_number(), "{pools}");
    let m = app.render_metrics().await;
    for line in [
        "mig_pool_vms_created_total{pool=\"pool-e2e\"} 1",
        "mig_pool_vms_deleted_total{pool=\"pool-e2e\",reason=\"job_done\"} 1",
        "mig_job_queue_seconds_count{pool=\"pool-e2e\"} 1",
    ] {
        assert!(m.contains(line), "{line} not in:\n{m}");
    }
    ctl.stop().await;
}

#[tokio::test]
async fn fifty_jobs_at_once_never_make_more_vms_than_max_size() {
    let env = env().await;
    let mut ctl = fleet(&env, 10).await;
    for id in 1..=50 {
        env.github.enqueue_job(job(200 + id));
    }
    let app = ctl.app();
    let most = run_jobs(&env, 50, 10, Duration::from_secs(240)).await;
    assert!(most >= 5, "the pool scaled out ({most} at most)");
    all_deleted(&env, &ctl).await;
    let m = app.render_metrics().await;
    assert!(
        m.contains("mig_pool_vms_created_total{pool=\"pool-e2e\"} 50"),
        "{m}"
    );
    ctl.stop().await;
}

/// The controller restarts while the pool is scaling up (two VMs running jobs, two jobs
/// still queued behind max_size 2): the restarted scaler finds its VMs, creates none twice,
/// and every job runs, one VM each.
#[tokio::test]
async fn a_controller_restarted_mid_scale_up_creates_no_extra_vm_and_loses_no_job() {
    let env = env().await;
    let mut ctl = fleet(&env, 2).await;
    for id in 1..=4 {
        env.github.enqueue_job(long_job(400 + id, 6_000));
    }
    miglet_sim::testkit::wait_for("two jobs to start", Duration::from_secs(60), || async {
        env.github.queued_jobs() == 2
    })
    .await;
    assert_eq!(instances_ever(&ctl).await.len(), 2);
    ctl.restart().await;
    run_jobs(&env, 4, 2, Duration::from_secs(120)).await;
    all_deleted(&env, &ctl).await;
    let ever = instances_ever(&ctl).await;
    assert_eq!(ever.len(), 4, "one VM per job, none twice: {ever:?}");
    assert!(
        ever.iter()
            .all(|i| i.delete_reason.as_deref() == Some("job_done")),
        "{ever:?}"
    );
    ctl.stop().await;
}

/// A VM running a job is never deleted, even when its pool is scaled to zero and its
/// lifetime is over while the job runs: it goes once the job is done.
#[tokio::test]
async fn a_vm_running_a_job_outlives_a_scale_to_zero_and_its_lifetime() {
    let env = env().await;
    let mut ctl = fleet(&env, 1).await;
    env.github.enqueue_job(long_job(501, 8_000));
    miglet_sim::testkit::wait_for("the job to start", Duration::from_secs(60), || async {
        ctl.app()
            .store()
            .job_get(501)
            .await
            .ok()
            .flatten()
            .is_some_and(|j| j.status == "in_progress")
    })
    .await;
    // Scaled to zero, with a lifetime already over, while the job runs.
    if let Some(scaled) = ctl.cfg.scaled.as_mut() {
        scaled.policy.max_size = 0;
        scaled.policy.max_vm_lifetime = 1;
        scaled.policy.idle_timeout = 1;
    }
    ctl.restart().await;
    let vm = ctl
        .app()
        .store()
        .job_get(501)
        .await
        .ok()
        .flatten()
        .and_then(|j| j.vm_id)
        .unwrap_or_else(|| panic!("the job's VM"));
    while env.github.reports().is_empty() {
        let i = ctl.app().store().instance_get(&vm).await.ok().flatten();
        assert!(
            i.as_ref()
                .is_some_and(|i| i.state != "deleted" && i.drain_command_id.is_none()),
            "a VM running a job was drained or deleted: {i:?}"
        );
        assert_eq!(vm_dirs(&env), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    miglet_sim::testkit::wait_for(
        "the VM to go after its job",
        Duration::from_secs(30),
        || async {
            ctl.app()
                .store()
                .instance_get(&vm)
                .await
                .ok()
                .flatten()
                .is_some_and(|i| i.state == "deleted")
        },
    )
    .await;
    assert_eq!(vm_dirs(&env), 0);
    let i = ctl.app().store().instance_get(&vm).await.ok().flatten();
    assert_eq!(i.and_then(|i| i.delete_reason).as_deref(), Some("job_done"));
    ctl.stop().await;
}

/// Deliveries signed with another secret (a forger, or a misconfigured hook) are refused:
/// the job never reaches the store and no VM is created for it.
#[tokio::test]
async fn a_forged_webhook_creates_nothing() {
    let env = env().await;
    let mut ctl = fleet(&env, 3).await;
    let forger = miglet_sim::github::FakeGitHub::new(&[]).with_webhook(
        &format!("http://{}/api/v1/github/webhook", ctl.http),
        "not-the-webhook-secret-at-all-000",
    );
    forger.enqueue_job(job(666));
    let app = ctl.app().clone();
    miglet_sim::testkit::wait_for("the refusal", Duration::from_secs(10), || async {
        app.render_metrics().await.contains(
            "mig_webhook_deliveries_total{event=\"workflow_job\",result=\"bad_signature\"} 1",
        )
    })
    .await;
    // Give the scaler its passes: nothing is created.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(app.store().job_get(666).await.ok().flatten().is_none());
    assert_eq!(instances_ever(&ctl).await.len(), 0);
    assert_eq!(vm_dirs(&env), 0);
    ctl.stop().await;
}

/// Every webhook delivery of a job is lost. The backstop poll finds the queued job (through
/// the organization's most recently pushed repositories: no webhook ever named this one), a
/// VM runs it, and the poll follows the job through to completed, with the runner that ran
/// it; the job runs once and every VM is deleted.
#[tokio::test]
async fn a_job_whose_webhooks_are_all_lost_is_found_and_followed_by_the_backstop_poll() {
    let env = env().await;
    let _ = env.github.clone().with_app(APP_ID, APP_INSTALLATION);
    let github = GitHubMint {
        api_url: env.github_api.clone(),
        mode: mig_controller::github::Mode::Jit,
        pat_file: None,
    };
    let quick = ScalePolicy {
        idle_timeout: 2_000,
        ..policy(2)
    };
    let mut ctl = fleet_with(&env, quick, Some(github)).await;
    env.github.lose_webhooks(3);
    env.github.enqueue_job(Job {
        repository: "test-org/lost-hooks".into(),
        ..job(701)
    });
    let app = ctl.app().clone();
    miglet_sim::testkit::wait_for(
        "the poll to follow the job to completed",
        Duration::from_secs(90),
        || async {
            app.store()
                .job_get(701)
                .await
                .ok()
                .flatten()
                .is_some_and(|j| j.status == "completed")
        },
    )
    .await;
    let stored = app.store().job_get(701).await.ok().flatten();
    let stored = stored.unwrap_or_else(|| panic!("job 701"));
    assert_eq!(stored.pool_id.as_deref(), Some("pool-e2e"));
    assert_eq!(stored.conclusion.as_deref(), Some("success"));
    assert!(
        stored
            .vm_id
            .as_deref()
            .is_some_and(|v| v.starts_with("pool-e2e-")),
        "the poll tied the job to the VM that ran it: {stored:?}"
    );
    assert_eq!(env.github.reports().len(), 1, "the job ran once");
    all_deleted(&env, &ctl).await;
    // At most one VM beyond the job's: while the poll had not yet seen the job start, it
    // still counted as queued.
    assert!(instances_ever(&ctl).await.len() <= 2);
    let m = app.render_metrics().await;
    assert!(
        m.contains("mig_backstop_jobs_total{change=\"found\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("mig_backstop_jobs_total{change=\"moved\"}"),
        "{m}"
    );
    assert!(
        !m.contains("mig_webhook_deliveries_total{event=\"workflow_job\",result=\"applied\"}"),
        "no delivery of the job arrived: {m}"
    );
    ctl.stop().await;
}

/// The fleet page in a real browser charts the pool's size and queued jobs over time, with
/// axes, units and a time scale, and shows the pool's scaling rules.
#[tokio::test]
async fn the_fleet_page_charts_pool_size_and_queued_jobs() -> R {
    let Some(browser) = Browser::open().await? else {
        return Ok(());
    };
    let env = env().await;
    let mut ctl = fleet(&env, 2).await;
    for id in 1..=4 {
        env.github.enqueue_job(long_job(900 + id, 4_000));
    }
    // Samples are 10 s apart: wait for a second one while the jobs run.
    miglet_sim::testkit::wait_for(
        "two samples of the pool",
        Duration::from_secs(60),
        || async {
            ctl.app()
                .pool_history("pool-e2e", 0)
                .is_some_and(|h| h.len() >= 2 && h.iter().any(|s| s.queued_jobs > 0))
        },
    )
    .await;
    let token = std::fs::read_to_string(env.dir.path().join("ctl").join("initial-admin-token"))?;
    let result = async {
        browser
            .sign_in(&format!("http://{}", ctl.http), &token)
            .await?;
        let c = &browser.c;
        let (ok, labels) = charts_until(c, Duration::from_secs(30), |l| {
            l.contains("pool-e2e, ")
                && l.contains("time (UTC)")
                && l.contains("queued jobs")
                && l.contains("VMs")
        })
        .await?;
        if !ok {
            return Err(format!("no pool chart with axes: {labels:?}").into());
        }
        let rules = fresh_text(c, fantoccini::Locator::Css("[data-field=scaling]")).await?;
        if !(rules.contains("idle 60 s") && rules.contains("after a job: delete")) {
            return Err(format!("pool rules not shown: {rules}").into());
        }
        std::fs::write(
            screenshots()?.join("dashboard-pool-chart.png"),
            c.screenshot().await?,
        )?;
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    browser.close().await;
    result?;
    run_jobs(&env, 4, 2, Duration::from_secs(90)).await;
    ctl.stop().await;
    Ok(())
}
