//! The seed's HTTP flow, step by step, with the seed's JSON.

use super::common::*;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn seed_http_flow_step_by_step() -> TestResult {
    let mut s = TestServer::start().await;

    // Health.
    let (status, body) = s.get("/health").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));

    // 1. vm_started, exactly the seed's request; acknowledged without a token.
    let ack = s.vm_started("vm-123", "pool-001").await;
    assert_eq!(ack["status"], "acknowledged");
    assert_eq!(ack["acknowledged"], true);
    assert_eq!(ack["vm_id"], "vm-123");
    assert_eq!(ack["pool_id"], "pool-001");
    assert_eq!(ack["org_id"], "org-001");
    assert_eq!(
        ack["message"],
        "VM started event acknowledged - MIGlet is ready for registration config"
    );
    assert!(ack.get("registration_token").is_none());
    let vm = s
        .app()
        .store()
        .vm_get("vm-123")
        .await?
        .ok_or("vm not stored")?;
    assert_eq!(
        (vm.state.as_str(), vm.pool_id.as_str(), vm.org_id.as_str()),
        ("ready", "pool-001", "org-001")
    );

    // 2. The next poll hands out register_runner in the seed's shape.
    let commands = s.poll("vm-123").await;
    assert_eq!(commands.len(), 1, "{commands:?}");
    let c = &commands[0];
    assert_eq!(c["type"], "register_runner");
    assert!(
        c["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("register-vm-123-"))
    );
    let p = &c["parameters"];
    assert_eq!(p["registration_token"], TOKEN);
    assert_eq!(p["runner_url"], "https://github.com/test-org");
    assert_eq!(p["runner_group"], "default");
    assert_eq!(p["labels"], json!(["self-hosted", "linux", "x64"]));
    let expires =
        chrono::DateTime::parse_from_rfc3339(p["expires_at"].as_str().ok_or("expires_at")?)?;
    assert!(expires > chrono::Utc::now());
    chrono::DateTime::parse_from_rfc3339(c["created_at"].as_str().ok_or("created_at")?)?;

    // 3. Only once.
    assert!(s.poll("vm-123").await.is_empty());

    // 4. Heartbeat with the prototype's body, then one with nothing optional.
    let (status, body) = s
        .post(
            "/api/v1/vms/vm-123/heartbeat",
            &json!({"type":"job_heartbeat","timestamp":"2025-12-01T10:00:00.123456789+05:30",
                    "vm_id":"vm-123","pool_id":"pool-001","miglet_state":"idle",
                    "vm_health":{"cpu_load":12.5,"memory_used":512,"memory_total":2048,"disk_used":3,"disk_total":10},
                    "runner_state":"idle"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["status"].as_str(), body["message"].as_str()),
        (Some("received"), Some("Heartbeat received"))
    );
    let (status, _) = s
        .post(
            "/api/v1/vms/vm-123/heartbeat",
            &json!({"type":"job_heartbeat"}),
        )
        .await;
    assert_eq!(status, 200);

    // 4b. Registration config on request.
    let (status, reg) = s
        .post(
            "/api/v1/vms/vm-123/registration-token",
            &json!({"org_id":"org-001","pool_id":"pool-001","runner_group":"default","labels":null}),
        )
        .await;
    assert_eq!(status, 200, "{reg}");
    assert_eq!(reg["registration_token"], TOKEN);
    assert_eq!(reg["runner_group"], "default");
    assert_eq!(reg["labels"], json!(["self-hosted", "linux", "x64"]));

    // 5. Job events.
    for ev in [
        json!({"type":"runner_registered","vm_id":"vm-123","pool_id":"pool-001","runner_url":"https://github.com/test-org"}),
        json!({"type":"job_started","vm_id":"vm-123","pool_id":"pool-001","job_id":"build","run_id":"42","repository":"o/r"}),
    ] {
        let (status, body) = s.post("/api/v1/vms/vm-123/events", &ev).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "received");
        assert_eq!(body["acknowledged"], false);
        assert_eq!(body["message"], "Event received and stored");
    }
    let vm = s.app().store().vm_get("vm-123").await?.ok_or("vm")?;
    assert_eq!(vm.state, "job_running");
    assert_eq!(vm.current_job.and_then(|j| j.run_id).as_deref(), Some("42"));
    let (status, _) = s
        .post(
            "/api/v1/vms/vm-123/events",
            &json!({"type":"job_completed","vm_id":"vm-123","job_id":"build","run_id":"42","success":true,"duration":30}),
        )
        .await;
    assert_eq!(status, 200);

    // 6. Once a job started on this boot, the registration token is not handed out again.
    let (status, body) = s
        .post("/api/v1/vms/vm-123/registration-token", &json!({}))
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(!body.to_string().contains(TOKEN));

    // Everything stored once, in order.
    let store = s.app().store();
    let types: Vec<String> = store
        .events_for_vm("vm-123")
        .await?
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(
        types,
        [
            "vm_started",
            "runner_registered",
            "job_started",
            "job_completed"
        ]
    );
    assert_eq!(store.heartbeats_for_vm("vm-123").await?.len(), 2);
    let hb = &store.heartbeats_for_vm("vm-123").await?[0];
    assert_eq!(hb.memory_total_bytes, Some(2048 << 20));
    assert_eq!(store.registrations_for_vm("vm-123").await?.len(), 1);
    let vm = store.vm_get("vm-123").await?.ok_or("vm")?;
    assert_eq!(vm.state, "idle");
    assert!(vm.current_job.is_none());

    // The token is nowhere in the data dir.
    let dir = s.data_dir.clone();
    let _keep = s.stop().await;
    for (path, text) in all_bytes_under(&dir) {
        assert!(!text.contains(TOKEN), "token found in {}", path.display());
    }
    Ok(())
}

/// An agent that speaks only the base contract (HTTP, never acknowledges) gets
/// register_runner exactly once, even across redelivery timeouts and reconciler passes.
#[tokio::test]
async fn base_contract_agent_gets_register_runner_exactly_once() -> TestResult {
    let mut s = TestServer::start_with(|st| {
        st.redelivery_timeout = Duration::from_secs(1);
        st.reconcile_interval = Duration::from_secs(1);
    })
    .await;
    s.vm_started("vm-base", "pool-001").await;
    let mut registrations = 0;
    for _ in 0..4 {
        registrations += s
            .poll("vm-base")
            .await
            .iter()
            .filter(|c| c["type"] == "register_runner")
            .count();
    }
    // Past two redelivery timeouts, with a reconciler pass.
    s.app().clock().advance(Duration::from_millis(2500));
    s.app().reconcile_once().await?;
    for _ in 0..3 {
        registrations += s
            .poll("vm-base")
            .await
            .iter()
            .filter(|c| c["type"] == "register_runner")
            .count();
    }
    assert_eq!(registrations, 1);
    let cmds = s.app().store().commands_for_vm("vm-base").await?;
    assert_eq!(cmds.len(), 1);
    assert_eq!(
        (cmds[0].state.as_str(), cmds[0].delivery_count),
        ("delivered", 1)
    );
    // The stored parameters never hold the token.
    assert_eq!(cmds[0].parameters["registration_token"], "[REDACTED]");
    s.stop().await;
    Ok(())
}

/// An agent that acknowledges over HTTP gets an unacknowledged command again after the
/// redelivery timeout, and never after its ack.
#[tokio::test]
async fn http_ack_and_redelivery_for_acknowledging_agents() -> TestResult {
    // Long enough that a loaded machine's pauses never reach it; the test moves the clock.
    let mut s = TestServer::start_with(|st| st.redelivery_timeout = Duration::from_secs(60)).await;
    s.vm_started("vm-ack", "p").await;
    let reg = s.poll("vm-ack").await;
    let reg_id = reg[0]["id"].as_str().ok_or("id")?.to_owned();
    let (status, body) = s
        .post(
            &format!("/api/v1/vms/vm-ack/commands/{reg_id}/ack"),
            &json!({"success":true,"message":"Registration config received","result":{"runner_name":"vm-ack"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "acknowledged");
    // A second ack is idempotent.
    let (status, body) = s
        .post(
            &format!("/api/v1/vms/vm-ack/commands/{reg_id}/ack"),
            &json!({"success":false}),
        )
        .await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("acknowledged"))
    );

    let drain = s
        .app()
        .enqueue(
            "vm-ack",
            miglet_proto::command::Command::Drain {
                reason: "test".into(),
                timeout_seconds: Some(60),
            },
            "test",
            None,
        )
        .await?;
    let first = s.poll("vm-ack").await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["id"], drain.id.as_str());
    assert_eq!(
        first[0]["parameters"],
        json!({"reason":"test","timeout_seconds":60})
    );
    assert!(
        s.poll("vm-ack").await.is_empty(),
        "redelivered before the timeout"
    );
    s.app().clock().advance(Duration::from_secs(61));
    let again = s.poll("vm-ack").await;
    assert_eq!(again.len(), 1, "not redelivered after the timeout");
    let (status, body) = s
        .post(
            &format!("/api/v1/vms/vm-ack/commands/{}/ack", drain.id),
            &json!({"success":true,"message":"draining"}),
        )
        .await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("acknowledged"))
    );
    s.app().clock().advance(Duration::from_secs(61));
    assert!(s.poll("vm-ack").await.is_empty());
    let history: Vec<String> = s
        .app()
        .store()
        .command_transitions(&drain.id)
        .await?
        .into_iter()
        .map(|t| t.to_state)
        .collect();
    assert_eq!(
        history,
        ["pending", "delivered", "delivered", "acknowledged"]
    );
    let stored = s.app().store().command_get(&drain.id).await?.ok_or("cmd")?;
    assert_eq!(stored.result_message.as_deref(), Some("draining"));
    s.stop().await;
    Ok(())
}

/// A resent event (same event_id) is stored once; a resent vm_started with the same boot id
/// does not start a second boot or a second registration.
#[tokio::test]
async fn event_ids_deduplicate_and_boot_ids_prevent_double_registration() -> TestResult {
    let mut s = TestServer::start().await;
    let started =
        json!({"type":"vm_started","vm_id":"vm-d","pool_id":"p","event_id":"ev-1","boot_id":"b-1"});
    for _ in 0..3 {
        let (status, body) = s.post("/api/v1/vms/vm-d/events", &started).await;
        assert_eq!((status, body["acknowledged"].as_bool()), (200, Some(true)));
    }
    let started_again =
        json!({"type":"vm_started","vm_id":"vm-d","pool_id":"p","event_id":"ev-2","boot_id":"b-1"});
    assert_eq!(
        s.post("/api/v1/vms/vm-d/events", &started_again).await.0,
        200
    );
    let job =
        json!({"type":"job_started","vm_id":"vm-d","event_id":"ev-3","boot_id":"b-1","run_id":"1"});
    let (_, first) = s.post("/api/v1/vms/vm-d/events", &job).await;
    let (_, second) = s.post("/api/v1/vms/vm-d/events", &job).await;
    assert_eq!(
        (first["duplicate"].as_bool(), second["duplicate"].as_bool()),
        (Some(false), Some(true))
    );
    let store = s.app().store();
    assert_eq!(store.events_for_vm("vm-d").await?.len(), 3);
    let vm = store.vm_get("vm-d").await?.ok_or("vm")?;
    assert_eq!(vm.boot_seq, 1);
    assert_eq!(store.commands_for_vm("vm-d").await?.len(), 1);
    s.stop().await;
    Ok(())
}

/// A heartbeat that reaches the controller before the VM's `vm_started` (the controller was
/// down while the agent kept trying) must not keep that boot from being registered.
#[tokio::test]
async fn heartbeat_before_vm_started_does_not_block_registration() -> TestResult {
    let mut s = TestServer::start().await;
    let (status, _) = s
        .post(
            "/api/v1/vms/vm-early/heartbeat",
            &json!({"type":"job_heartbeat","vm_id":"vm-early","pool_id":"p","boot_id":"b-7","miglet_state":"waiting_for_controller"}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        s.poll("vm-early").await.is_empty(),
        "no registration before vm_started"
    );
    let (status, _) = s
        .post(
            "/api/v1/vms/vm-early/events",
            &json!({"type":"vm_started","vm_id":"vm-early","pool_id":"p","boot_id":"b-7","event_id":"e-1"}),
        )
        .await;
    assert_eq!(status, 200);
    let cmds = s.poll("vm-early").await;
    assert_eq!(cmds.len(), 1);
    assert_eq!(cmds[0]["type"], "register_runner");
    // A VM adopted from a heartbeat that says it already runs a runner is left alone.
    let (status, _) = s
        .post(
            "/api/v1/vms/vm-busy/heartbeat",
            &json!({"type":"job_heartbeat","vm_id":"vm-busy","boot_id":"b-1","miglet_state":"job_running"}),
        )
        .await;
    assert_eq!(status, 200);
    assert!(s.poll("vm-busy").await.is_empty());
    s.stop().await;
    Ok(())
}

/// A token source that is down until told otherwise, counting how often it is asked.
#[derive(Debug, Default)]
struct FlakySource {
    up: std::sync::atomic::AtomicBool,
    calls: std::sync::atomic::AtomicUsize,
}

impl mig_controller::token::TokenSource for FlakySource {
    fn registration_token(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> mig_controller::token::TokenFuture<'_> {
        use std::sync::atomic::Ordering::SeqCst;
        self.calls.fetch_add(1, SeqCst);
        let up = self.up.load(SeqCst);
        Box::pin(async move {
            if up {
                Ok(mig_controller::token::IssuedToken {
                    token: TOKEN.into(),
                    expires_at: now + chrono::Duration::minutes(10),
                })
            } else {
                Err(mig_controller::token::TokenError::EmptyFile {
                    path: "/run/token".into(),
                })
            }
        })
    }

    fn lifetime(&self) -> Duration {
        Duration::from_secs(3600)
    }
}

/// The token source is asked once per delivery of a `register_runner`, and only then: while
/// it is down the command stays queued (held back), and it goes out with a token as soon as
/// the source answers again, without a second registration.
#[tokio::test]
async fn registration_token_is_fetched_at_delivery_only() -> TestResult {
    use std::sync::atomic::Ordering::SeqCst;
    let source = Arc::new(FlakySource::default());
    let s = TestServer::start_with(|st| {
        let mut reg = st
            .pools
            .get("pool-001")
            .unwrap_or_else(|e| panic!("fallback pool: {e}"))
            .clone();
        reg.token = source.clone();
        st.pools = mig_controller::token::Pools::new(Default::default(), Some(reg));
    })
    .await;
    s.vm_started("vm-flaky", "pool-001").await;
    assert_eq!(
        source.calls.load(SeqCst),
        0,
        "queued without asking for a token"
    );
    for _ in 0..3 {
        assert!(
            s.poll("vm-flaky").await.is_empty(),
            "nothing without a token"
        );
    }
    assert_eq!(source.calls.load(SeqCst), 3, "one try per delivery attempt");
    let cmds = s.app().store().commands_for_vm("vm-flaky").await?;
    assert_eq!(cmds.len(), 1);
    assert_eq!(cmds[0].state.as_str(), "pending");
    source.up.store(true, SeqCst);
    let got = s.poll("vm-flaky").await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["type"], "register_runner");
    assert_eq!(got[0]["parameters"]["registration_token"], TOKEN);
    assert_eq!(source.calls.load(SeqCst), 4);
    let cmds = s.app().store().commands_for_vm("vm-flaky").await?;
    assert_eq!((cmds.len(), cmds[0].state.as_str()), (1, "delivered"));
    Ok(())
}
