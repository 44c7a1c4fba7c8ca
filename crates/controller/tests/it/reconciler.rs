//! Health tracking and command expiry.

use super::common::*;
use mig_controller::store::Health;
use mig_controller::token::{PoolRegistration, Pools, StaticToken};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn silent_vm_becomes_unhealthy_then_lost_and_recovers() -> TestResult {
    let mut s = TestServer::start_with(|st| {
        st.heartbeat_interval = Duration::from_secs(1);
        st.unhealthy_after_missed = 1;
        st.lost_after_missed = 2;
        st.reconcile_interval = Duration::from_secs(3600);
    })
    .await;
    s.vm_started("vm-h", "p").await;
    let app = s.app().clone();
    app.clock().advance(Duration::from_millis(1100));
    app.reconcile_once().await?;
    assert_eq!(
        app.store().vm_get("vm-h").await?.map(|v| v.health),
        Some(Health::Unhealthy)
    );
    app.clock().advance(Duration::from_millis(1000));
    app.reconcile_once().await?;
    assert_eq!(
        app.store().vm_get("vm-h").await?.map(|v| v.health),
        Some(Health::Lost)
    );
    let (status, _) = s
        .post(
            "/api/v1/vms/vm-h/heartbeat",
            &serde_json::json!({"type":"job_heartbeat"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        app.store().vm_get("vm-h").await?.map(|v| v.health),
        Some(Health::Healthy)
    );
    let details: Vec<String> = app
        .store()
        .vm_log_for_vm("vm-h")
        .await?
        .into_iter()
        .filter(|l| l.kind == "health_changed")
        .filter_map(|l| l.detail)
        .collect();
    assert_eq!(
        details,
        [
            "healthy -> unhealthy",
            "unhealthy -> lost",
            "lost -> healthy"
        ]
    );
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn expired_register_runner_is_never_delivered_and_a_fresh_one_is_issued() -> TestResult {
    let mut s = TestServer::start_with(|st| {
        let reg = PoolRegistration {
            runner_url: "https://github.com/short".into(),
            runner_group: "default".into(),
            labels: vec!["self-hosted".into()],
            token: Arc::new(StaticToken::new(TOKEN.into(), Duration::from_secs(1))),
            scaling: None,
            enrollment: mig_controller::auth::enroll::PoolEnrollment {
                bootstrap_secret_file: Some(mig_controller::config::dev_secret_file(&st.data_dir)),
                ..Default::default()
            },
        };
        st.pools = Pools::new(Default::default(), Some(reg));
        st.reconcile_interval = Duration::from_secs(3600);
    })
    .await;
    s.vm_started("vm-x", "p").await;
    let app = s.app().clone();
    let first = app
        .store()
        .vm_get("vm-x")
        .await?
        .and_then(|v| v.registration_command_id)
        .ok_or("no registration")?;
    app.clock().advance(Duration::from_millis(1100));
    // Past its expiry: a poll hands out nothing stale.
    let polled = s.poll("vm-x").await;
    assert!(
        polled.iter().all(|c| c["id"] != first.as_str()),
        "expired command delivered: {polled:?}"
    );
    let report = app.reconcile_once().await?;
    assert_eq!(report.expired_commands, 1);
    let stored = app.store().command_get(&first).await?.ok_or("cmd")?;
    assert_eq!(
        (stored.state.as_str(), stored.delivery_count),
        ("expired", 0)
    );
    assert_eq!(report.registrations_issued, 1);
    let fresh = s.poll("vm-x").await;
    assert_eq!(fresh.len(), 1);
    assert_eq!(fresh[0]["type"], "register_runner");
    assert_ne!(fresh[0]["id"], first.as_str());
    s.stop().await;
    Ok(())
}
