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

pub(super) const APP_ID: u64 = 4242;
pub(super) const INSTALLATION: u64 = 77;

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
    source_in(
        base,
        clock,
        (mode, budget),
        metrics,
        Scope::Org("acme".into()),
    )
}

/// A JIT source on the test App for `scope`.
pub(super) fn source_for(
    base: &str,
    clock: &Clock,
    scope: Scope,
) -> Result<GitHubSource, GitHubError> {
    source_in(
        base,
        clock,
        (Mode::Jit, 60),
        GitHubMetrics::default(),
        scope,
    )
}

/// A source on the test App: `mode` and mint `budget`, calls counted in `metrics`.
fn source_in(
    base: &str,
    clock: &Clock,
    (mode, budget): (Mode, u32),
    metrics: GitHubMetrics,
    scope: Scope,
) -> Result<GitHubSource, GitHubError> {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(APP_PRIVATE_KEY.as_bytes())
        .map_err(|e| GitHubError::Config(e.to_string()))?;
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

type ServerAndSource = (super::common::TestServer, Arc<GitHubSource>);

/// A controller whose fallback pool mints on the stand-in at `base`, recording into the
/// controller's GitHub metrics; and that pool's source, for the test to mint with too.
async fn server_with_source(
    base: &str,
    clock: &Clock,
) -> Result<ServerAndSource, Box<dyn std::error::Error + Send + Sync>> {
    server_with_budget(base, clock, 150).await
}

/// The same, with a mint budget of `budget` a minute. The background loops run once at
/// start: the test drives every pass itself.
async fn server_with_budget(
    base: &str,
    clock: &Clock,
    budget: u32,
) -> Result<ServerAndSource, Box<dyn std::error::Error + Send + Sync>> {
    let slot = Arc::new(std::sync::Mutex::new(None));
    let shared = slot.clone();
    let s = super::common::TestServer::start_with(|st| {
        st.reconcile_interval = Duration::from_secs(3600);
        // Hundreds of VMs ask from one loopback address: measured here is the mint budget,
        // not the per-address request limit (which a fast run would reach).
        st.per_addr_limit = mig_controller::auth::limits::Limit {
            per_second: 0,
            burst: 0,
        };
        let src = Arc::new(
            source_with(base, clock, Mode::Jit, budget, st.github_metrics.clone())
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
    // Its old runner is removed at once (found by name: this one was not minted through a
    // delivery, so no id was remembered); the cleanup pass has nothing left to do.
    assert_eq!(app.remove_ended_runners(app.clock().now_ms()).await, 1);
    assert!(gh.listed_runners().is_empty());
    assert_eq!(app.cleanup_runners(now).await?, (0, 0));
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

/// Posts an event of the VM's first boot.
async fn event(s: &super::common::TestServer, vm: &str, kind: &str, extra: serde_json::Value) {
    let mut body = serde_json::json!({"type": kind, "vm_id": vm, "pool_id": "pool-001"});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let (status, answer) = s.post(&format!("/api/v1/vms/{vm}/events"), &body).await;
    assert_eq!(status, 200, "{answer}");
}

/// A VM booted and given its JIT runner over HTTP; returns the runner's name.
async fn vm_with_runner(s: &super::common::TestServer, vm: &str) -> String {
    s.vm_started(vm, "pool-001").await;
    let got = s.poll(vm).await;
    assert_eq!(got.len(), 1, "{got:?}");
    got[0]["parameters"]["runner_name"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn deletes(gh: &FakeGitHub) -> Vec<(String, u16)> {
    gh.rest_calls()
        .into_iter()
        .filter(|(m, _, _)| m == "DELETE")
        .map(|(_, p, s)| (p, s))
        .collect()
}

/// When a VM shuts down, its runner is removed by the id GitHub gave it at mint time (no
/// listing), and the removal is on the VM's timeline; a VM whose job completed gives its
/// ephemeral runner a minute to remove itself first; a busy runner is never deleted.
#[tokio::test]
async fn an_ended_boots_runner_is_removed_by_its_minted_id() -> TestResult {
    let (gh, base) = stand_in().await?;
    let clock = Clock::adjustable();
    let (s, _src) = server_with_source(&base, &clock).await?;
    let app = s.app();
    let shutting = vm_with_runner(&s, "vm-down").await;
    let finished = vm_with_runner(&s, "vm-done").await;
    let busy = vm_with_runner(&s, "vm-busy").await;
    assert_eq!(
        gh.listed_runners(),
        [busy.as_str(), finished.as_str(), shutting.as_str()]
    );
    let listings_before = calls_to(&gh, "/actions/runners?per_page=100");

    event(&s, "vm-down", "vm_shutting_down", serde_json::json!({})).await;
    event(
        &s,
        "vm-done",
        "job_started",
        serde_json::json!({"job_id": "j1"}),
    )
    .await;
    event(
        &s,
        "vm-done",
        "job_completed",
        serde_json::json!({"job_id": "j1", "result": "succeeded"}),
    )
    .await;
    gh.set_busy(&busy, true);
    event(&s, "vm-busy", "vm_shutting_down", serde_json::json!({})).await;

    let now = app.clock().now_ms();
    assert_eq!(app.remove_ended_runners(now).await, 1, "the shut-down VM's");
    assert_eq!(gh.listed_runners(), [busy.as_str(), finished.as_str()]);
    // The busy runner's DELETE is refused by GitHub (422) and it stays; it is not retried.
    let mut tried = deletes(&gh);
    tried.sort();
    assert_eq!(
        tried,
        [
            ("/orgs/acme/actions/runners/1".to_owned(), 204),
            ("/orgs/acme/actions/runners/3".to_owned(), 422)
        ]
    );
    assert_eq!(
        calls_to(&gh, "/actions/runners?per_page=100"),
        listings_before,
        "removed by id, no listing"
    );
    let log = app.store().vm_log_for_vm("vm-down").await?;
    let removed: Vec<_> = log
        .iter()
        .filter(|l| l.kind == "github_runner_removed")
        .collect();
    assert_eq!(removed.len(), 1, "{log:?}");
    assert!(
        removed[0]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("vm_ended") && d.contains("\"runner_id\":1")),
        "{removed:?}"
    );

    // The finished job's runner had a minute to remove itself; it did not, so it goes.
    app.clock().advance(Duration::from_secs(59));
    assert_eq!(app.remove_ended_runners(app.clock().now_ms()).await, 0);
    app.clock().advance(Duration::from_secs(1));
    assert_eq!(app.remove_ended_runners(app.clock().now_ms()).await, 1);
    assert_eq!(gh.listed_runners(), [busy.as_str()]);
    // Nothing is tried twice.
    app.clock().advance(Duration::from_secs(600));
    assert_eq!(app.remove_ended_runners(app.clock().now_ms()).await, 0);
    assert_eq!(deletes(&gh).len(), 3);
    // The busy one is the cleanup pass's, once its VM went quiet after shutting down
    // (terminated): marked, then removed once GitHub says idle.
    app.reconcile_once().await?;
    let now = app.clock().now_ms();
    assert_eq!(app.cleanup_runners(now).await?, (1, 0));
    assert_eq!(app.cleanup_runners(now).await?, (0, 0));
    gh.set_busy(&busy, false);
    assert_eq!(app.cleanup_runners(now).await?, (0, 1));
    assert!(gh.listed_runners().is_empty());
    assert!(
        app.render_metrics()
            .await
            .contains("mig_github_runners_deleted_total 3")
    );
    Ok(())
}

/// A boot storm through a running controller: 500 VMs ask over HTTP while the budget allows
/// 180 mints a minute. Mints stay within the budget each minute, every VM gets its runner
/// within three minutes, and scarce mints go in the order VMs first asked, however their
/// retries fall (the second minute's asks come in reverse order).
#[tokio::test]
async fn a_boot_storm_through_the_controller_is_served_in_order_within_the_budget() -> TestResult {
    let (gh, base) = stand_in().await?;
    // The test's clock moves a minute between rounds; real time flows too, and refills the
    // budget by 3 a second while a round runs.
    let clock = Clock::adjustable();
    let (s, _src) = server_with_budget(&base, &clock, 180).await?;
    let names: Vec<String> = (0..500).map(|i| format!("vm-{i:03}")).collect();
    for n in &names {
        s.vm_started(n, "pool-001").await;
    }
    let mut served = vec![false; names.len()];
    let mut minutes = 0;
    while !served.iter().all(|s| *s) {
        assert!(minutes < 3, "500 runners within 3 minutes at 180 a minute");
        let order: Vec<usize> = if minutes % 2 == 0 {
            (0..names.len()).collect()
        } else {
            (0..names.len()).rev().collect()
        };
        let first_waiting = served.iter().position(|s| !s).unwrap_or(0);
        let round = std::time::Instant::now();
        let mut this_minute = Vec::new();
        for i in order {
            if served[i] {
                continue;
            }
            let got = s.poll(&names[i]).await;
            if let Some(c) = got.first() {
                assert!(c["parameters"]["jit_config"].as_str().is_some(), "{c}");
                served[i] = true;
                this_minute.push(i);
            }
        }
        let refilled = (round.elapsed().as_secs_f64() * 3.0).ceil() as usize;
        this_minute.sort_unstable();
        assert!(
            this_minute.len() <= 180 + refilled,
            "{} mints in one minute (+{refilled} refilled while it ran)",
            this_minute.len()
        );
        assert_eq!(
            this_minute,
            (first_waiting..first_waiting + this_minute.len()).collect::<Vec<_>>(),
            "minute {minutes}: the VMs that asked first, not those that retried first"
        );
        if minutes == 0 {
            let m = s.app().render_metrics().await;
            let waiting = 500 - this_minute.len();
            assert!(
                m.contains(&format!(
                    "mig_github_mint_waiting{{account=\"app:4242\"}} {waiting}"
                )),
                "{m}"
            );
        }
        clock.advance(Duration::from_secs(60));
        minutes += 1;
    }
    assert_eq!(
        calls_to(&gh, "/generate-jitconfig"),
        500,
        "each minted once"
    );
    for n in names.iter().step_by(50) {
        let cmds = s.app().store().commands_for_vm(n).await?;
        assert_eq!(cmds.len(), 1, "one registration for {n}");
    }
    Ok(())
}

/// Enterprise and repository pools mint, list and remove under their own paths (a PAT:
/// enterprise runners cannot be managed by an App); a repository's runners are in the
/// default group without a group lookup.
#[tokio::test]
async fn enterprise_and_repository_scopes_mint_under_their_own_paths() -> TestResult {
    let (gh, base) = stand_in().await?;
    let pat = "ghp_SCOPETEST0123456789";
    let gh = gh.with_pat(pat);
    let dir = tempfile::tempdir()?;
    let pat_file = dir.path().join("pat");
    std::fs::write(&pat_file, pat)?;
    let clock = Clock::adjustable();
    let scopes = [
        (
            Scope::Enterprise("acme-corp".into()),
            "/enterprises/acme-corp",
        ),
        (
            Scope::Repo {
                owner: "acme".into(),
                repo: "app".into(),
            },
            "/repos/acme/app",
        ),
    ];
    for (scope, prefix) in scopes {
        let account = Arc::new(Account {
            api: Api::with_metrics(&base, clock.clone(), GitHubMetrics::default(), "pat")?,
            auth: Auth::Pat(pat_file.clone()),
            budget: std::sync::Mutex::new(MintBudget::new(150)),
        });
        let src = GitHubSource::new(
            account.clone(),
            scope.clone(),
            Mode::Jit,
            None,
            "mig-test".into(),
            clock.clone(),
        );
        let name = format!("vm{}-1", prefix.len());
        let Registration::Jit { runner_id, .. } = jit(&src, &clock, &name).await? else {
            return Err("not JIT".into());
        };
        let token_src = GitHubSource::new(
            account,
            scope,
            Mode::Token,
            None,
            "mig-test".into(),
            clock.clone(),
        );
        assert!(matches!(
            jit(&token_src, &clock, "unused").await?,
            Registration::Token(_)
        ));
        let listed = src.our_runners().await?.unwrap_or_default();
        assert!(listed.iter().any(|r| r.id == runner_id), "{listed:?}");
        src.remove_runner(runner_id).await?;
        for end in [
            "/actions/runners/generate-jitconfig".to_owned(),
            "/actions/runners/registration-token".to_owned(),
            format!("/actions/runners/{runner_id}"),
        ] {
            let path = format!("{prefix}{end}");
            assert!(
                gh.rest_calls().iter().any(|(_, p, _)| *p == path),
                "{path} not called: {:?}",
                gh.rest_calls()
            );
        }
    }
    assert_eq!(
        calls_to(&gh, "/runner-groups"),
        0,
        "no named group, no lookup"
    );
    Ok(())
}
