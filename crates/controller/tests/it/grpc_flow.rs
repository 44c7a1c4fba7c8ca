//! The gRPC stream: connect, ConnectAck, pushed register_runner, acks, events, heartbeats,
//! errors, replacement and shutdown.

use super::common::*;
use miglet_proto::pb::{self, controller_message, mi_glet_message};
use std::collections::HashMap;
use std::time::Duration;

fn event(vm: &str, ty: &str, id: Option<&str>, extra: &[(&str, &str)]) -> mi_glet_message::Message {
    let mut data: HashMap<String, String> = extra
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    if let Some(id) = id {
        data.insert("event_id".into(), id.into());
    }
    mi_glet_message::Message::Event(pb::EventNotification {
        r#type: ty.into(),
        vm_id: vm.into(),
        pool_id: "pool-001".into(),
        org_id: String::new(),
        data,
        timestamp: chrono::Utc::now().timestamp(),
    })
}

#[tokio::test]
async fn grpc_flow_connect_register_ack_events_heartbeats() -> TestResult {
    let mut s = TestServer::start().await;
    // A VM the controller has never seen connects without vm_started: that counts as one.
    let mut agent = s.grpc_connect("vm-g1", "pool-001", "").await;
    let reg = agent.recv_command().await;
    assert_eq!(reg.r#type, "register_runner");
    assert_eq!(
        reg.string_params
            .get("registration_token")
            .map(String::as_str),
        Some(TOKEN)
    );
    assert_eq!(
        reg.string_params.get("runner_url").map(String::as_str),
        Some("https://github.com/test-org")
    );
    assert_eq!(
        reg.string_params.get("runner_group").map(String::as_str),
        Some("default")
    );
    assert_eq!(reg.string_array_params, ["self-hosted", "linux", "x64"]);
    assert!(reg.created_at > 0);
    agent
        .ack(&reg.id, true, "Registration config received")
        .await;
    wait_command_state(s.app(), &reg.id, "acknowledged").await;

    // Events with ids are acknowledged once durable; a resend is stored once.
    agent
        .send(event(
            "vm-g1",
            "runner_registered",
            Some("e1"),
            &[("runner_url", "https://github.com/test-org")],
        ))
        .await;
    agent
        .send(event(
            "vm-g1",
            "job_started",
            Some("e2"),
            &[("job_id", "build"), ("run_id", "99")],
        ))
        .await;
    agent
        .send(event(
            "vm-g1",
            "job_started",
            Some("e2"),
            &[("job_id", "build"), ("run_id", "99")],
        ))
        .await;
    let mut acked = Vec::new();
    while acked.len() < 3 {
        match agent.recv().await {
            Some(controller_message::Message::EventAck(a)) => acked.extend(a.event_ids),
            other => panic!("expected EventAck, got {other:?}"),
        }
    }
    assert_eq!(acked, ["e1", "e2", "e2"]);
    // A prototype agent's event without an id, and its heartbeat with nothing optional.
    agent
        .send(event(
            "vm-g1",
            "job_completed",
            None,
            &[("job_id", "build"), ("run_id", "99"), ("success", "true")],
        ))
        .await;
    agent
        .send(mi_glet_message::Message::Heartbeat(pb::Heartbeat {
            vm_id: "vm-g1".into(),
            ..Default::default()
        }))
        .await;
    agent
        .send(mi_glet_message::Message::Heartbeat(pb::Heartbeat {
            vm_id: "vm-g1".into(),
            pool_id: "pool-001".into(),
            health: Some(pb::VmHealth {
                cpu_usage_percent: 37.5,
                memory_total_bytes: 8 << 30,
                memory_used_bytes: 2 << 30,
                ..Default::default()
            }),
            runner_state: Some(pb::RunnerState {
                state: "idle".into(),
                configured: true,
                ..Default::default()
            }),
            miglet_state: "idle".into(),
            timestamp: chrono::Utc::now().timestamp(),
            ..Default::default()
        }))
        .await;
    agent
        .send(mi_glet_message::Message::Error(pb::ErrorNotification {
            code: "runner_config_failed".into(),
            message: "config.sh exited 1".into(),
            ..Default::default()
        }))
        .await;
    let store = s.app().store().clone();
    wait_until("heartbeats and events stored", || {
        let store = store.clone();
        async move {
            store
                .heartbeats_for_vm("vm-g1")
                .await
                .map(|h| h.len())
                .unwrap_or(0)
                == 2
                && store
                    .events_for_vm("vm-g1")
                    .await
                    .map(|e| e.len())
                    .unwrap_or(0)
                    == 4
        }
    })
    .await;
    let events = store.events_for_vm("vm-g1").await?;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        ["runner_registered", "job_started", "job_completed", "error"]
    );
    assert!(events.iter().all(|e| e.transport == "grpc"));
    let vm = store.vm_get("vm-g1").await?.ok_or("vm")?;
    assert_eq!(vm.state, "idle");
    assert!(vm.connected);
    assert_eq!(vm.latest_health.and_then(|h| h.cpu_percent), Some(37.5));

    // Bad input on the stream gets an error message; the stream stays up.
    agent.send(event("vm-g1", "../../etc", None, &[])).await;
    match agent.recv().await {
        Some(controller_message::Message::Error(e)) => assert_eq!(e.code, "invalid_event"),
        other => panic!("expected an error, got {other:?}"),
    }
    agent
        .send(event("vm-OTHER", "job_started", None, &[]))
        .await;
    match agent.recv().await {
        Some(controller_message::Message::Error(e)) => {
            assert_eq!(e.code, "permission_denied", "{e:?}");
            assert!(e.message.contains("for VM \"vm-OTHER\""), "{e:?}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    assert_eq!(store.events_for_vm("vm-g1").await?.len(), 4);
    assert!(store.vm_get("vm-OTHER").await?.is_none());

    // Disconnect is recorded.
    drop(agent);
    wait_until("disconnect recorded", || {
        let store = store.clone();
        async move { matches!(store.vm_get("vm-g1").await, Ok(Some(v)) if !v.connected) }
    })
    .await;
    let kinds: Vec<String> = store
        .vm_log_for_vm("vm-g1")
        .await?
        .into_iter()
        .map(|l| l.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            "enrolled",
            "boot_started",
            "stream_connected",
            "stream_disconnected"
        ]
    );
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn first_message_must_be_connect_and_ids_are_validated() -> TestResult {
    // Open mode, so the checks after authentication are what answers.
    let mut s = TestServer::start_open().await;
    let hb = pb::MiGletMessage {
        message: Some(mi_glet_message::Message::Heartbeat(pb::Heartbeat::default())),
    };
    let mut a = s.grpc_open(hb).await.map(Some).or_else(|st| {
        assert_eq!(st.code(), tonic::Code::FailedPrecondition, "{st}");
        Ok::<_, tonic::Status>(None)
    })?;
    if let Some(a) = a.as_mut() {
        let st = a
            .recv_within(WAIT)
            .await
            .err()
            .ok_or("expected an error status")?;
        assert_eq!(st.code(), tonic::Code::FailedPrecondition);
    }
    let res = s.grpc_open(connect_msg("../evil", "p", "")).await;
    let code = refusal_code(res).await?;
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(s.app().store().vms_list().await?.is_empty());
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn reconnect_never_registers_again_and_new_stream_replaces_old() -> TestResult {
    let mut s = TestServer::start().await;
    let mut a = s.grpc_connect("vm-r", "p", "").await;
    let reg = a.recv_command().await;
    a.ack(&reg.id, true, "ok").await;
    wait_command_state(s.app(), &reg.id, "acknowledged").await;
    drop(a);
    // Reconnect: no second register_runner.
    let mut b = s.grpc_connect("vm-r", "p", "").await;
    b.expect_no_command(Duration::from_millis(700)).await;
    // A second stream for the same VM replaces the first, which is told so.
    let mut c = s.grpc_connect("vm-r", "p", "").await;
    let st = loop {
        match b.recv_within(WAIT).await {
            Err(st) => break st,
            Ok(None) => return Err("old stream ended without a status".into()),
            Ok(Some(_)) => continue,
        }
    };
    assert_eq!(st.code(), tonic::Code::Aborted);
    c.expect_no_command(Duration::from_millis(300)).await;
    // The replaced stream's end (once recorded) does not mark the VM disconnected.
    let store = s.app().store().clone();
    wait_until("the replaced stream's end to be recorded", || {
        let store = store.clone();
        async move {
            store
                .vm_log_for_vm("vm-r")
                .await
                .is_ok_and(|l| l.iter().any(|e| e.kind == "stream_replaced"))
        }
    })
    .await;
    let vm = s.app().store().vm_get("vm-r").await?.ok_or("vm")?;
    assert!(vm.connected);
    assert_eq!(vm.boot_seq, 1);
    assert_eq!(s.app().store().commands_for_vm("vm-r").await?.len(), 1);
    // A connect naming a new boot is a new lifecycle and gets a new registration.
    drop(c);
    let mut d = s.grpc_connect("vm-r", "p", "boot-xyz").await;
    let reg2 = d.recv_command().await;
    assert_eq!(reg2.r#type, "register_runner");
    assert_ne!(reg2.id, reg.id);
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn shutdown_closes_streams_and_health_service_serves() -> TestResult {
    let mut s = TestServer::start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(s.grpc.clone())?
            .connect()
            .await?,
    );
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "miglet.commands.CommandService".into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut a = s.grpc_connect("vm-s", "p", "").await;
    let _reg = a.recv_command().await;
    s.stop().await;
    // The stream ends (cleanly or with a status) promptly.
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match a.rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "stream still open after shutdown");
    Ok(())
}
