//! The `gce-mig` provider against the managed-instance-group stand-in over loopback (access
//! tokens from a service-account key through the token stand-in): VMs created by name with
//! their own metadata, listed through their life (`CREATING` with no id, then running with
//! one), deleted only by `deleteInstances` naming them (idempotent; `resize` never called),
//! regional groups deleting in each VM's own zone, rate quotas answered as "try again", a
//! revoked token replaced, and the settings that delete busy VMs reported.

use super::common::TestResult;
use mig_controller::clock::Clock;
use mig_controller::gce::auth::{GoogleAuth, GoogleCredentials};
use mig_controller::gce::mig::{MigClient, MigLocation, MigRef};
use mig_controller::gce::provider::GceMigProvider;
use mig_controller::provider::{InstanceSpec, InstanceStatus, Provider, ProviderError};
use miglet_sim::gce_mig::{FakeMig, Location, MigFailure};
use miglet_sim::google::FakeGoogle;
use std::sync::Arc;
use std::time::Duration;

struct Setup {
    mig: FakeMig,
    google: FakeGoogle,
    provider: GceMigProvider,
    _dir: tempfile::TempDir,
}

async fn setup(regional: bool) -> Result<Setup, Box<dyn std::error::Error + Send + Sync>> {
    let google = FakeGoogle::new();
    let (location, mig_location) = if regional {
        (
            Location::Region(
                "europe-west1".into(),
                vec!["europe-west1-b".into(), "europe-west1-c".into()],
            ),
            MigLocation::Region("europe-west1".into()),
        )
    } else {
        (
            Location::Zone("europe-west1-b".into()),
            MigLocation::Zone("europe-west1-b".into()),
        )
    };
    let mig = FakeMig::new(google.clone(), "e2e-project", location, "ci-runners");
    mig.set_step(Duration::from_millis(50));
    let router = google.router().merge(mig.router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("sa.json");
    std::fs::write(&key, google.service_account_key(&format!("{base}/token")))?;
    let auth = Arc::new(GoogleAuth::new(
        GoogleCredentials::KeyFile(key),
        Clock::system(),
    )?);
    let client = MigClient::new(
        &format!("{base}/compute/v1"),
        auth,
        MigRef {
            project: "e2e-project".into(),
            location: mig_location,
            name: "ci-runners".into(),
        },
    )?;
    Ok(Setup {
        mig,
        google,
        provider: GceMigProvider::new(client, true),
        _dir: dir,
    })
}

/// Up to three VMs, no spare, timeouts long enough not to reap VMs that never boot here.
fn policy() -> mig_controller::lifecycle::ScalePolicy {
    mig_controller::lifecycle::ScalePolicy {
        min_idle: 0,
        max_size: 3,
        idle_timeout: 60_000,
        max_vm_lifetime: 3_600_000,
        boot_timeout: 300_000,
        registration_timeout: 300_000,
        scale_up_step: 3,
        scale_up_per_minute: None,
    }
}

fn spec(name: &str) -> InstanceSpec {
    InstanceSpec {
        name: name.into(),
        pool_id: "ci".into(),
        settings: vec![("MIGLET_POOL_ID".into(), "ci".into())],
        secret_files: vec![("MIGLET_ENROLLMENT_TOKEN".into(), format!("one-time-{name}"))],
    }
}

async fn statuses(p: &GceMigProvider) -> Vec<(String, InstanceStatus, Option<String>)> {
    let mut v: Vec<_> = p
        .list()
        .await
        .unwrap_or_else(|e| panic!("list: {e}"))
        .into_iter()
        .map(|i| (i.name, i.status, i.id))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[tokio::test]
async fn vms_are_created_by_name_listed_through_their_life_and_deleted_by_name() -> TestResult {
    let s = setup(false).await?;
    s.provider.create(&[spec("ci-a"), spec("ci-b")]).await?;
    assert_eq!(s.mig.target_size(), 2);
    // Just created: CREATING, no id yet (or provisioning with one).
    let first = statuses(&s.provider).await;
    assert_eq!(first.len(), 2);
    assert!(
        first
            .iter()
            .all(|(_, st, _)| *st == InstanceStatus::Creating),
        "{first:?}"
    );
    super::common::wait_until("both running", || async {
        statuses(&s.provider)
            .await
            .iter()
            .all(|(_, st, id)| *st == InstanceStatus::Running && id.is_some())
    })
    .await;
    // A name that is not a Compute name is refused before any call.
    assert!(matches!(
        s.provider.create(&[spec("CI_bad")]).await,
        Err(ProviderError::Fatal(_))
    ));
    s.provider.delete(&["ci-a".to_owned()]).await?;
    assert_eq!(s.mig.target_size(), 1);
    // Deleting it again (or a name never there) is fine.
    s.provider
        .delete(&["ci-a".to_owned(), "ci-zz".to_owned()])
        .await?;
    super::common::wait_until("ci-a gone", || async {
        statuses(&s.provider)
            .await
            .iter()
            .all(|(n, _, _)| n != "ci-a")
    })
    .await;
    assert_eq!(s.mig.resize_downs(), 0);
    assert!(
        s.mig
            .calls()
            .iter()
            .all(|(_, p, _)| !p.ends_with("/resize"))
    );
    // Each VM got its own metadata (settings and its one-time secret) in createInstances.
    assert!(
        s.mig
            .calls()
            .iter()
            .any(|(m, p, st)| m == "POST" && p.ends_with("/createInstances") && *st == 200)
    );
    Ok(())
}

#[tokio::test]
async fn a_vm_recreated_by_autohealing_comes_back_with_a_new_id() -> TestResult {
    let s = setup(false).await?;
    s.provider.create(&[spec("ci-heal")]).await?;
    super::common::wait_until("running", || async {
        statuses(&s.provider)
            .await
            .iter()
            .any(|(_, st, id)| *st == InstanceStatus::Running && id.is_some())
    })
    .await;
    let before = statuses(&s.provider).await[0].2.clone();
    assert!(s.mig.stop_out_of_band("ci-heal"));
    super::common::wait_until("recreated", || async {
        let now = statuses(&s.provider).await;
        now[0].1 == InstanceStatus::Running && now[0].2.is_some() && now[0].2 != before
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn a_regional_group_deletes_each_vm_in_its_own_zone() -> TestResult {
    let s = setup(true).await?;
    s.provider.create(&[spec("ci-r1"), spec("ci-r2")]).await?;
    s.provider
        .delete(&["ci-r1".to_owned(), "ci-r2".to_owned()])
        .await?;
    assert_eq!(s.mig.target_size(), 0);
    super::common::wait_until("both gone", || async {
        statuses(&s.provider).await.is_empty()
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn rate_quotas_are_retried_later_and_a_revoked_token_is_replaced() -> TestResult {
    let s = setup(false).await?;
    s.mig.fail(MigFailure {
        path_contains: "/createInstances".into(),
        status: 403,
        reason: "rateLimitExceeded".into(),
        message: "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute' of service 'compute.googleapis.com'".into(),
        times: 1,
    });
    match s.provider.create(&[spec("ci-q")]).await {
        Err(ProviderError::Retryable(m)) => assert!(m.contains("Quota exceeded"), "{m}"),
        other => panic!("a rate quota is retried later: {other:?}"),
    }
    assert_eq!(s.mig.target_size(), 0, "nothing was created");
    // 503 is retried within the call.
    s.mig.fail(MigFailure {
        path_contains: "/createInstances".into(),
        status: 503,
        reason: "backendError".into(),
        message: "Backend Error".into(),
        times: 1,
    });
    s.provider.create(&[spec("ci-q")]).await?;
    // A revoked token: the next call gets a new one and goes through.
    let grants = s.google.token_grants();
    s.google.revoke_access_tokens();
    assert_eq!(statuses(&s.provider).await.len(), 1);
    assert_eq!(s.google.token_grants(), grants + 1);
    // A permission problem is not retried.
    s.mig.fail(MigFailure {
        path_contains: "/deleteInstances".into(),
        status: 403,
        reason: "forbidden".into(),
        message: "Required 'compute.instanceGroupManagers.update' permission".into(),
        times: 1,
    });
    assert!(matches!(
        s.provider.delete(&["ci-q".to_owned()]).await,
        Err(ProviderError::Fatal(_))
    ));
    Ok(())
}

#[tokio::test]
async fn settings_that_delete_busy_vms_are_reported() -> TestResult {
    let s = setup(true).await?;
    assert!(s.provider.check_settings().await?.is_empty());
    s.mig.set_settings(serde_json::json!({
        "updatePolicy": {"type": "PROACTIVE", "instanceRedistributionType": "PROACTIVE"},
        "autoHealingPolicies": [{"healthCheck": "hc", "initialDelaySec": 30}],
        "status": {"autoscaler": "projects/e2e-project/regions/europe-west1/autoscalers/a"},
    }));
    let found: Vec<&str> = s
        .provider
        .check_settings()
        .await?
        .iter()
        .map(|p| p.setting)
        .collect();
    assert_eq!(
        found,
        [
            "autoscaler.autoscalingPolicy.mode",
            "updatePolicy.instanceRedistributionType",
            "updatePolicy.type",
            "autoHealingPolicies[].initialDelaySec"
        ]
    );
    // Configured to refuse: the scaler's preflight fails, saying how to fix it.
    match s.provider.preflight().await {
        Err(ProviderError::Fatal(m)) => {
            assert!(
                m.contains("set it to NONE") && m.contains("OPPORTUNISTIC"),
                "{m}"
            )
        }
        other => panic!("unsafe settings refused: {other:?}"),
    }
    Ok(())
}

/// The scaler through the `gce-mig` provider: a queued job makes a named VM with
/// `createInstances`; its Compute id is recorded; when the group recreates it under the same
/// name (a stop outside the controller), the VM's timeline says it is another VM. `resize` is
/// never called.
#[tokio::test]
async fn the_scaler_records_ids_and_sees_a_recreated_vm_as_another() -> TestResult {
    let s = setup(false).await?;
    let mig = s.mig.clone();
    let provider = Arc::new(s.provider);
    const SECRET: &str = "gce-webhook-secret-0123456789";
    let server =
        super::common::scaled_server("ci", "gce", policy(), provider.clone(), SECRET).await;
    let body = super::jobs::job("queued", 9100, &["self-hosted", "gce"], None);
    let (status, _) =
        super::jobs::deliver(&server, "workflow_job", "d-gce", &body, Some(SECRET)).await;
    assert_eq!(status, 200);
    let recorded = || async {
        server
            .app()
            .store()
            .instances_live("ci")
            .await
            .unwrap_or_default()
            .into_iter()
            .find(|i| i.provider_id.is_some())
    };
    super::common::wait_until("the VM's id recorded", || async {
        recorded().await.is_some()
    })
    .await;
    let first = recorded().await.ok_or("instance")?;
    assert!(mig.stop_out_of_band(&first.name));
    super::common::wait_until("the recreate noticed", || async {
        server
            .app()
            .store()
            .vm_log_for_vm(&first.name)
            .await
            .unwrap_or_default()
            .iter()
            .any(|l| l.kind == "vm_recreated")
    })
    .await;
    let now = recorded().await.ok_or("instance")?;
    assert_ne!(now.provider_id, first.provider_id);
    assert_eq!(mig.resize_downs(), 0);
    assert!(mig.calls().iter().all(|(_, p, _)| !p.ends_with("/resize")));
    Ok(())
}

/// A stock-out: the group keeps a VM `CREATING` with a `lastAttempt` error. The pool says so
/// (and why), and the scaler waits for that VM instead of asking for more.
#[tokio::test]
async fn a_stock_out_shows_on_the_pool_and_asks_for_nothing_more() -> TestResult {
    let s = setup(false).await?;
    let mig = s.mig.clone();
    mig.set_stockout(Some((
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "The zone 'europe-west1-b' does not have enough resources available",
    )));
    const SECRET: &str = "gce-webhook-secret-0123456789";
    let server =
        super::common::scaled_server("ci", "gce", policy(), Arc::new(s.provider), SECRET).await;
    let body = super::jobs::job("queued", 9200, &["self-hosted", "gce"], None);
    let (status, _) =
        super::jobs::deliver(&server, "workflow_job", "d-stock", &body, Some(SECRET)).await;
    assert_eq!(status, 200);
    super::common::wait_until("the stock-out on the pool", || async {
        server
            .app()
            .pool_scale_view("ci")
            .and_then(|v| v.provider_trouble)
            .is_some_and(|t| t.contains("ZONE_RESOURCE_POOL_EXHAUSTED") && t.contains("stock-out"))
    })
    .await;
    // Several passes later, still the one VM the job asked for.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(mig.instances().len(), 1);
    assert_eq!(mig.target_size(), 1);
    Ok(())
}
