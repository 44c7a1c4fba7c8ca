//! The durable command queue: offline delivery, redelivery after reconnect, restarts.

use super::common::*;
use miglet_proto::command::Command;
use std::time::Duration;

fn drain() -> Command {
    Command::Drain {
        reason: "scale down".into(),
        timeout_seconds: Some(300),
    }
}

#[tokio::test]
async fn command_queued_while_offline_is_delivered_on_connect() -> TestResult {
    let mut s = TestServer::start().await;
    let mut a = s.grpc_connect("vm-off", "p", "").await;
    let reg = a.recv_command().await;
    a.ack(&reg.id, true, "ok").await;
    wait_command_state(s.app(), &reg.id, "acknowledged").await;
    drop(a);
    let store = s.app().store().clone();
    wait_until("disconnect", || {
        let store = store.clone();
        async move { matches!(store.vm_get("vm-off").await, Ok(Some(v)) if !v.connected) }
    })
    .await;
    let queued = s.app().enqueue("vm-off", drain(), "test", None).await?;
    let shutdown = s
        .app()
        .enqueue(
            "vm-off",
            Command::Shutdown {
                reason: "bye".into(),
                force: true,
            },
            "test",
            None,
        )
        .await?;
    assert_eq!(
        store
            .command_get(&queued.id)
            .await?
            .map(|c| c.state.as_str()),
        Some("pending")
    );
    let mut b = s.grpc_connect("vm-off", "p", "").await;
    let first = b.recv_command().await;
    let second = b.recv_command().await;
    // In queue order, with the contract's placement.
    assert_eq!(
        (first.id.as_str(), second.id.as_str()),
        (queued.id.as_str(), shutdown.id.as_str())
    );
    assert_eq!(first.int_params.get("timeout_seconds"), Some(&300));
    assert_eq!(second.bool_params.get("force"), Some(&true));
    // They went out with the connect_ack while the open's write was committing; that write
    // lands: both are recorded as delivered and the VM as connected.
    wait_command_state(s.app(), &queued.id, "delivered").await;
    wait_command_state(s.app(), &shutdown.id, "delivered").await;
    assert!(matches!(store.vm_get("vm-off").await?, Some(v) if v.connected));
    // Pushed live to a connected VM as well.
    let live = s
        .app()
        .enqueue(
            "vm-off",
            Command::SetLogLevel {
                level: miglet_proto::command::LogLevel::Debug,
            },
            "test",
            None,
        )
        .await?;
    let third = b.recv_command().await;
    assert_eq!(third.id, live.id);
    assert_eq!(
        third.string_params.get("level").map(String::as_str),
        Some("debug")
    );
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn unacknowledged_command_is_redelivered_after_reconnect_and_done_once() -> TestResult {
    let mut s = TestServer::start().await;
    let mut a = s.grpc_connect("vm-re", "p", "b1").await;
    let reg = a.recv_command().await;
    a.ack(&reg.id, true, "ok").await;
    let cmd = s.app().enqueue("vm-re", drain(), "test", None).await?;
    let got = a.recv_command().await;
    assert_eq!(got.id, cmd.id);
    // The agent dies before acknowledging.
    drop(a);
    let mut b = s.grpc_connect("vm-re", "p", "b1").await;
    let again = b.recv_command().await;
    assert_eq!(
        again.id, cmd.id,
        "same id, so the agent can execute it once"
    );
    b.ack(&again.id, true, "draining").await;
    wait_command_state(s.app(), &cmd.id, "acknowledged").await;
    drop(b);
    let mut c = s.grpc_connect("vm-re", "p", "b1").await;
    c.expect_no_command(Duration::from_millis(700)).await;
    let stored = s.app().store().command_get(&cmd.id).await?.ok_or("cmd")?;
    assert_eq!(stored.delivery_count, 2);
    assert_eq!(stored.result_message.as_deref(), Some("draining"));
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn unacknowledged_command_is_redelivered_after_timeout_on_the_same_stream() -> TestResult {
    let mut s = TestServer::start_with(|st| st.redelivery_timeout = Duration::from_secs(1)).await;
    let mut a = s.grpc_connect("vm-to", "p", "").await;
    let reg = a.recv_command().await;
    // Not acknowledged: comes again on the same stream after the timeout.
    let again = a.recv_command().await;
    assert_eq!(again.id, reg.id);
    a.ack(&reg.id, true, "ok").await;
    wait_command_state(s.app(), &reg.id, "acknowledged").await;
    a.expect_no_command(Duration::from_millis(1500)).await;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn restart_on_the_same_data_dir_keeps_vms_events_and_pending_commands() -> TestResult {
    let mut s = TestServer::start().await;
    s.vm_started("vm-keep", "pool-001").await;
    let (status, _) = s
        .post(
            "/api/v1/vms/vm-keep/events",
            &serde_json::json!({"type":"job_started","vm_id":"vm-keep","run_id":"5","event_id":"x1"}),
        )
        .await;
    assert_eq!(status, 200);
    let queued = s.app().enqueue("vm-keep", drain(), "test", None).await?;
    let dir = s.data_dir.clone();
    let guard = s.stop().await;

    let mut s2 = TestServer::start_in(&dir, |_| {}).await;
    let store = s2.app().store();
    let vm = store.vm_get("vm-keep").await?.ok_or("VM lost in restart")?;
    assert_eq!(
        (vm.pool_id.as_str(), vm.state.as_str()),
        ("pool-001", "job_running")
    );
    assert_eq!(store.events_for_vm("vm-keep").await?.len(), 2);
    // The resent event is still recognised after the restart.
    let (_, body) = s2
        .post(
            "/api/v1/vms/vm-keep/events",
            &serde_json::json!({"type":"job_started","vm_id":"vm-keep","run_id":"5","event_id":"x1"}),
        )
        .await;
    assert_eq!(body["duplicate"], true);
    // Both pending commands survive. The drain goes out; the registration stays held back,
    // because a job already started on this boot (its token is never handed out again).
    let cmds = s2.poll("vm-keep").await;
    let ids: Vec<&str> = cmds.iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(ids, [queued.id.as_str()], "{cmds:?}");
    assert!(!serde_json::to_string(&cmds)?.contains(TOKEN));
    let stored = s2.app().store().commands_for_vm("vm-keep").await?;
    assert!(
        stored
            .iter()
            .any(|c| c.command_type == "register_runner" && c.state.as_str() == "pending"),
        "{stored:?}"
    );
    s2.stop().await;
    drop(guard);
    Ok(())
}

#[tokio::test]
async fn delivery_the_store_refused_is_tried_again_on_the_open_stream() -> TestResult {
    // The stream marks a command delivered before sending it; when that write fails (a full
    // disk), the command stays pending and the stream must try again by itself: nothing else
    // (no ack, no new command, no redelivery timer: nothing is open) would wake it.
    let mut s = TestServer::start().await;
    let mut a = s.grpc_connect("vm-refused", "p", "").await;
    let reg = a.recv_command().await;
    a.ack(&reg.id, true, "ok").await;
    wait_command_state(s.app(), &reg.id, "acknowledged").await;
    s.app()
        .store()
        .fail_next_writes(1, |m| {
            matches!(m, mig_controller::store::Mutation::MarkDelivered { .. })
        })
        .await;
    let queued = s.app().enqueue("vm-refused", drain(), "test", None).await?;
    let got = a.recv_command().await;
    assert_eq!(got.id, queued.id);
    let c = s
        .app()
        .store()
        .command_get(&queued.id)
        .await?
        .ok_or("command")?;
    assert_eq!(c.delivery_count, 1, "the refused delivery is not counted");
    s.stop().await;
    Ok(())
}
