//! The GitHub client and minting against the GitHub stand-in over loopback: the installation
//! token cached and replaced before it expires, a 401 answered by one refresh, a secondary
//! rate limit honoured without losing the registration, and a boot storm kept within the
//! mint budget with every runner minted once.

use super::common::TestResult;
use mig_controller::clock::Clock;
use mig_controller::github::api::Api;
use mig_controller::github::app::{AppAuth, Auth};
use mig_controller::github::metrics::GitHubMetrics;
use mig_controller::github::rules::MintBudget;
use mig_controller::github::source::{Account, GitHubSource};
use mig_controller::github::{GitHubError, Mode, Scope};
use mig_controller::token::{Registration, RunnerRequest, TokenError, TokenSource};
use miglet_sim::github::{APP_PRIVATE_KEY, Failure, FakeGitHub};
use std::sync::Arc;
use std::time::Duration;

const APP_ID: u64 = 4242;
const INSTALLATION: u64 = 77;

async fn stand_in() -> Result<(FakeGitHub, String), Box<dyn std::error::Error + Send + Sync>> {
    let gh = FakeGitHub::new(&[]).with_app(APP_ID, INSTALLATION);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (addr, _task) = gh.serve(listener).await?;
    Ok((gh, format!("http://{addr}")))
}

fn source(base: &str, clock: &Clock, mode: Mode, budget: u32) -> Result<GitHubSource, GitHubError> {
    source_with(base, clock, mode, budget, GitHubMetrics::default())
}

fn source_with(
    base: &str,
    clock: &Clock,
    mode: Mode,
    budget: u32,
    metrics: GitHubMetrics,
) -> Result<GitHubSource, GitHubError> {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(APP_PRIVATE_KEY.as_bytes())
        .map_err(|e| GitHubError::Config(e.to_string()))?;
    let scope = Scope::Org("acme".into());
    let account = Arc::new(Account {
        api: Api::with_metrics(base, clock.clone(), metrics, "app:4242")?,
        auth: Auth::App(AppAuth::new(
            APP_ID,
            key,
            None,
            scope.clone(),
            clock.clone(),
        )),
        budget: std::sync::Mutex::new(MintBudget::new(budget)),
    });
    Ok(GitHubSource::new(
        account,
        scope,
        mode,
        None,
        "mig-test".into(),
        clock.clone(),
    ))
}

fn calls_to(gh: &FakeGitHub, path_end: &str) -> usize {
    gh.rest_calls()
        .iter()
        .filter(|(_, p, _)| p.ends_with(path_end))
        .count()
}

fn labels() -> Vec<String> {
    vec!["self-hosted".into(), "linux".into()]
}

/// A controller whose fallback pool mints on the stand-in at `base`, recording into the
/// controller's GitHub metrics; and that pool's source, for the test to mint with too.
async fn server_with_source(
    base: &str,
    clock: &Clock,
) -> Result<(super::common::TestServer, Arc<GitHubSource>), Box<dyn std::error::Error + Send + Sync>>
{
    let slot = Arc::new(std::sync::Mutex::new(None));
    let shared = slot.clone();
    let s = super::common::TestServer::start_with(|st| {
        let src = Arc::new(
            source_with(base, clock, Mode::Jit, 150, st.github_metrics.clone())
                .unwrap_or_else(|e| panic!("source: {e}")),
        );
        *shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(src.clone());
        let mut reg = st
            .pools
            .get("pool-001")
            .unwrap_or_else(|e| panic!("fallback pool: {e}"))
            .clone();
        reg.token = src;
        st.pools = mig_controller::token::Pools::new(Default::default(), Some(reg));
    })
    .await;
    let src = slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
        .ok_or("source")?;
    Ok((s, src))
}

/// `GET /api/v1/admin/pools` with the initial admin token.
async fn admin_pools(s: &super::common::TestServer) -> reqwest::Result<serde_json::Value> {
    s.client
        .get(format!("{}/api/v1/admin/pools", s.base))
        .bearer_auth(s.admin_token())
        .send()
        .await?
        .json()
        .await
}

async fn jit(src: &GitHubSource, clock: &Clock, name: &str) -> Result<Registration, TokenError> {
    let labels = labels();
    let req = RunnerRequest {
        runner_name: name,
        labels: &labels,
        work_folder: "_work",
    };
    src.registration(req, clock.now()).await
}

#[tokio::test]
async fn installation_and_registration_tokens_are_cached_and_replaced_before_expiry() -> TestResult
{
    let (gh, base) = stand_in().await?;
    // Installation tokens of 330 s: with the 5-minute margin, one is used for 30 s.
    gh.set_installation_token_ttl(330);
    let clock = Clock::adjustable();
    let src = source(&base, &clock, Mode::Jit, 150)?;
    jit(&src, &clock, "vm-a-1").await?;
    jit(&src, &clock, "vm-b-1").await?;
    assert_eq!(
        calls_to(&gh, "/access_tokens"),
        1,
        "the installation token is reused"
    );
    assert_eq!(
        calls_to(&gh, "/installation"),
        1,
        "the installation is found once"
    );
    clock.advance(Duration::from_secs(31));
    jit(&src, &clock, "vm-c-1").await?;
    assert_eq!(
        calls_to(&gh, "/access_tokens"),
        2,
        "replaced before it expired"
    );
    assert!(
        gh.rest_calls().iter().all(|(_, _, status)| *status < 400),
        "no call failed: {:?}",
        gh.rest_calls()
    );
    // Registration tokens (mode `token`) are reused while they have time left.
    let tokens = source(&base, &clock, Mode::Token, 150)?;
    let first = tokens.registration_token(clock.now()).await?;
    let again = tokens.registration_token(clock.now()).await?;
    assert_eq!(first, again);
    assert_eq!(calls_to(&gh, "/registration-token"), 1);
    Ok(())
}

#[tokio::test]
async fn a_revoked_installation_token_is_replaced_once_and_the_call_succeeds() -> TestResult {
    let (gh, base) = stand_in().await?;
    let clock = Clock::adjustable();
    let src = source(&base, &clock, Mode::Jit, 150)?;
    assert!(matches!(
        jit(&src, &clock, "vm-1-1").await?,
        Registration::Jit { .. }
    ));
    gh.revoke_installation_tokens();
    let second = jit(&src, &clock, "vm-2-1").await?;
    let Registration::Jit {
        runner_id, config, ..
    } = second
    else {
        return Err("not a JIT config".into());
    };
    assert_eq!(runner_id, 2);
    assert!(!config.is_empty());
    assert_eq!(calls_to(&gh, "/access_tokens"), 2);
    let statuses: Vec<u16> = gh
        .rest_calls()
        .iter()
        .filter(|(_, p, _)| p.ends_with("/generate-jitconfig"))
        .map(|(_, _, s)| *s)
        .collect();
    assert_eq!(
        statuses,
        [201, 401, 201],
        "one 401, one refresh, one success"
    );
    // A redelivery of the same runner's command hands out the same config, minting nothing.
    assert!(matches!(
        jit(&src, &clock, "vm-2-1").await?,
        Registration::Jit { runner_id: 2, .. }
    ));
    assert_eq!(calls_to(&gh, "/generate-jitconfig"), 3);
    Ok(())
}

#[tokio::test]
async fn a_secondary_rate_limit_holds_every_call_until_retry_after() -> TestResult {
    let (gh, base) = stand_in().await?;
    let clock = Clock::adjustable();
    let src = source(&base, &clock, Mode::Jit, 150)?;
    gh.fail(Failure {
        path_contains: "generate-jitconfig".into(),
        status: 403,
        message: "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.".into(),
        retry_after: Some(30),
        times: 1,
    });
    let refused = jit(&src, &clock, "vm-r-1").await;
    assert!(
        matches!(&refused, Err(TokenError::Remote(e)) if e.to_string().contains("retrying in 30 s")),
        "{refused:?}"
    );
    let before = gh.rest_calls().len();
    // Held back: nothing reaches GitHub until the wait is over.
    for _ in 0..5 {
        assert!(jit(&src, &clock, "vm-r-1").await.is_err());
    }
    clock.advance(Duration::from_secs(29));
    assert!(jit(&src, &clock, "vm-r-1").await.is_err());
    assert_eq!(
        gh.rest_calls().len(),
        before,
        "no call while GitHub said to wait"
    );
    clock.advance(Duration::from_secs(2));
    assert!(matches!(
        jit(&src, &clock, "vm-r-1").await?,
        Registration::Jit { runner_id: 1, .. }
    ));
    Ok(())
}

#[tokio::test]
async fn a_boot_storm_of_500_stays_within_the_budget_and_every_runner_is_minted_once() -> TestResult
{
    let (gh, base) = stand_in().await?;
    let clock = Clock::adjustable();
    let src = Arc::new(source(&base, &clock, Mode::Jit, 180)?);
    let mut minted = std::collections::HashMap::new();
    let mut minutes = 0;
    while minted.len() < 500 {
        assert!(
            minutes <= 3,
            "500 runners need at most 3 minutes at 180 a minute"
        );
        let mut asks = Vec::new();
        for i in 0..500 {
            let name = format!("vm-{i}-1");
            if minted.contains_key(&name) {
                continue;
            }
            let (src, clock) = (src.clone(), clock.clone());
            asks.push(tokio::spawn(async move {
                let r = jit(&src, &clock, &name).await;
                (name, r)
            }));
        }
        let mut this_minute = 0;
        for a in asks {
            let (name, r) = a.await?;
            match r {
                Ok(Registration::Jit { runner_id, .. }) => {
                    this_minute += 1;
                    minted.insert(name, runner_id);
                }
                Ok(other) => return Err(format!("not JIT: {other:?}").into()),
                Err(TokenError::Budget(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        assert!(this_minute <= 180, "{this_minute} mints in one minute");
        clock.advance(Duration::from_secs(60));
        minutes += 1;
    }
    let ids: std::collections::HashSet<u64> = minted.values().copied().collect();
    assert_eq!(ids.len(), 500, "each runner minted once");
    assert_eq!(calls_to(&gh, "/generate-jitconfig"), 500);
    assert_eq!(gh.runners().len(), 500);
    Ok(())
}

/// Runners no VM needs are removed in two passes, never a busy one; the runner of a live VM
/// is left alone until the VM boots again.
#[tokio::test]
async fn stale_runners_are_removed_in_two_passes_and_never_a_busy_one() -> TestResult {
    let (gh, base) = stand_in().await?;
    let clock = Clock::adjustable();
    let (s, src) = server_with_source(&base, &clock).await?;
    s.vm_started("vm-live", "pool-001").await;
    for name in ["vm-live-1", "vm-gone-1", "vm-busy-1"] {
        jit(&src, &clock, name).await?;
    }
    gh.set_busy("vm-busy-1", true);
    let app = s.app();
    let now = app.clock().now_ms();
    assert_eq!(
        app.cleanup_runners(now).await?,
        (2, 0),
        "first pass only marks"
    );
    assert_eq!(gh.listed_runners(), ["vm-busy-1", "vm-gone-1", "vm-live-1"]);
    assert_eq!(
        app.cleanup_runners(now).await?,
        (0, 1),
        "second pass deletes the idle one"
    );
    assert_eq!(gh.listed_runners(), ["vm-busy-1", "vm-live-1"]);
    // The busy runner stays however many passes; once idle, it goes.
    assert_eq!(app.cleanup_runners(now).await?, (0, 0));
    gh.set_busy("vm-busy-1", false);
    assert_eq!(app.cleanup_runners(now).await?, (0, 1));
    assert_eq!(gh.listed_runners(), ["vm-live-1"]);
    // The VM boots again: its old runner is stale now.
    let (status, _) = s
        .post(
            "/api/v1/vms/vm-live/events",
            &serde_json::json!({"type": "vm_started", "vm_id": "vm-live", "pool_id": "pool-001", "boot_id": "second-boot"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(app.cleanup_runners(now).await?, (1, 0));
    assert_eq!(app.cleanup_runners(now).await?, (0, 1));
    assert!(gh.listed_runners().is_empty());
    let deletes: Vec<u16> = gh
        .rest_calls()
        .iter()
        .filter(|(m, _, _)| m == "DELETE")
        .map(|(_, _, s)| *s)
        .collect();
    assert_eq!(
        deletes,
        [204, 204, 204],
        "no delete was tried on a busy runner"
    );
    // What it cost, in the metrics.
    let m = app.render_metrics().await;
    for line in [
        "mig_github_requests_total{endpoint=\"POST generate-jitconfig\",status=\"201\"} 3",
        "mig_github_requests_total{endpoint=\"DELETE runner\",status=\"204\"} 3",
        "mig_github_runners_deleted_total 3",
        "mig_github_runners_stale 0",
        "mig_github_mint_seconds_count{kind=\"jit\"} 3",
    ] {
        assert!(m.contains(line), "{line} not in:\n{m}");
    }
    assert!(
        m.contains("mig_github_mint_budget_used_ratio{account=\"app:4242\"}"),
        "{m}"
    );
    Ok(())
}

/// GitHub refusing the credential (a 403 that is not a rate limit) leaves the VM waiting in
/// `ready` with its registration queued, shows the reason in the pool view, and the
/// registration goes out once GitHub accepts again: no crash, no second registration.
#[tokio::test]
async fn a_refused_mint_is_shown_on_the_pool_and_retried() -> TestResult {
    let (gh, base) = stand_in().await?;
    let clock = Clock::adjustable();
    let (s, _src) = server_with_source(&base, &clock).await?;
    gh.fail(Failure {
        path_contains: "generate-jitconfig".into(),
        status: 403,
        message: "Resource not accessible by integration".into(),
        retry_after: None,
        times: 1,
    });
    s.vm_started("vm-refused", "pool-001").await;
    assert!(s.poll("vm-refused").await.is_empty(), "held back");
    let view = admin_pools(&s).await?;
    let reg = &view["pools"][0]["registration"];
    assert!(
        reg["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("403") && e.contains("Resource not accessible")),
        "{view}"
    );
    let got = s.poll("vm-refused").await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["type"], "register_runner");
    assert!(
        got[0]["parameters"]["jit_config"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
    );
    assert_eq!(got[0]["parameters"]["runner_name"], "vm-refused-1");
    let view = admin_pools(&s).await?;
    assert!(
        view["pools"][0]["registration"]["last_error"].is_null(),
        "{view}"
    );
    assert!(
        view["pools"][0]["registration"]["last_ok_at"].is_i64(),
        "{view}"
    );
    let cmds = s.app().store().commands_for_vm("vm-refused").await?;
    assert_eq!(cmds.len(), 1, "one registration");
    // The runner GitHub minted for this boot is remembered on the VM's timeline.
    let log = s.app().store().vm_log_for_vm("vm-refused").await?;
    let minted: Vec<_> = log.iter().filter(|l| l.kind == "github_runner").collect();
    assert_eq!(minted.len(), 1, "{log:?}");
    let detail: serde_json::Value =
        serde_json::from_str(minted[0].detail.as_deref().unwrap_or("{}"))?;
    assert_eq!(detail["runner_id"], 1);
    assert_eq!(detail["runner_name"], "vm-refused-1");
    Ok(())
}

/// An agent that says its runner is idle while GitHub reports the runner offline is flagged
/// as a ghost after five minutes: on the VM's timeline and in the metrics, once.
#[tokio::test]
async fn a_ghost_runner_is_flagged_after_five_minutes() -> TestResult {
    let (gh, base) = stand_in().await?;
    let clock = Clock::adjustable();
    let (s, src) = server_with_source(&base, &clock).await?;
    s.vm_started("vm-ghost", "pool-001").await;
    let (status, _) = s
        .post(
            "/api/v1/vms/vm-ghost/heartbeat",
            &serde_json::json!({"type": "job_heartbeat", "vm_id": "vm-ghost", "miglet_state": "idle"}),
        )
        .await;
    assert_eq!(status, 200);
    jit(&src, &clock, "vm-ghost-1").await?;
    let app = s.app();
    let ghost_logs = || async {
        app.store()
            .vm_log_for_vm("vm-ghost")
            .await
            .map(|l| l.iter().filter(|l| l.kind == "ghost_runner").count())
    };
    app.cleanup_runners(app.clock().now_ms()).await?;
    assert_eq!(ghost_logs().await?, 0, "not yet");
    app.clock().advance(Duration::from_secs(5 * 60));
    for _ in 0..2 {
        assert_eq!(
            app.cleanup_runners(app.clock().now_ms()).await?,
            (0, 0),
            "a ghost is not deleted"
        );
    }
    assert_eq!(ghost_logs().await?, 1, "flagged once");
    assert!(
        app.render_metrics()
            .await
            .contains("mig_github_ghost_runners 1")
    );
    assert_eq!(gh.listed_runners(), ["vm-ghost-1"]);
    Ok(())
}

/// A pool configured in TOML marks its runners with this installation's label (kept in the
/// data dir), so another controller's runners in the same scope are never taken for ours.
#[tokio::test]
async fn runners_carry_this_installations_label_from_the_data_dir() -> TestResult {
    let (gh, base) = stand_in().await?;
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("app.pem");
    std::fs::write(&key, APP_PRIVATE_KEY)?;
    let toml = format!(
        "[pools.p]\n[pools.p.github]\norg = \"acme\"\napi_url = {base:?}\napp_id = {APP_ID}\nprivate_key_file = {key:?}\n[pools.p.enrollment]\nenrollment_tokens = true\n"
    );
    let file: mig_controller::config::FileConfig = toml::from_str(&toml)?;
    let resolved = mig_controller::config::Settings::resolve(
        mig_controller::config::ServeArgs::default(),
        file,
    )?;
    let s = super::common::TestServer::start_with(|st| {
        let mut reg = resolved
            .pools
            .get("p")
            .unwrap_or_else(|e| panic!("pool: {e}"))
            .clone();
        reg.enrollment = st
            .pools
            .get("pool-001")
            .unwrap_or_else(|e| panic!("fallback pool: {e}"))
            .enrollment
            .clone();
        st.pools = mig_controller::token::Pools::new(Default::default(), Some(reg));
    })
    .await;
    s.vm_started("vm-lbl", "pool-001").await;
    let got = s.poll("vm-lbl").await;
    assert_eq!(got.len(), 1, "{got:?}");
    let id = std::fs::read_to_string(s.data_dir.join("installation-id"))?;
    let label = format!("mig-{}", id.trim());
    assert_eq!(label.len(), 16, "{label}");
    let runners = gh.runners();
    assert_eq!(runners.len(), 1);
    assert!(
        runners[0].labels.contains(&label),
        "{:?}",
        runners[0].labels
    );
    Ok(())
}

/// A runner that exits because GitHub no longer accepts its version raises an alert on its
/// pool, with what to do.
#[tokio::test]
async fn a_deprecated_runner_raises_a_pool_alert() -> TestResult {
    let s = super::common::TestServer::start().await;
    s.vm_started("vm-old", "pool-001").await;
    let (status, _) = s
        .post(
            "/api/v1/vms/vm-old/events",
            &serde_json::json!({"type": "runner_crashed", "vm_id": "vm-old", "reason": "runner version deprecated by GitHub (exit code 7)", "exit_code": 7}),
        )
        .await;
    assert_eq!(status, 200);
    let view = admin_pools(&s).await?;
    let alert = &view["pools"][0]["alert"];
    assert_eq!(alert["vm_id"], "vm-old", "{view}");
    assert!(
        alert["message"]
            .as_str()
            .is_some_and(|m| m.contains("deprecated") && m.contains("update the runner")),
        "{view}"
    );
    Ok(())
}
