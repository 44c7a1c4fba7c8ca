//! The agent under faults: every exit of the runner, a missing runner user, the agent killed
//! with SIGKILL mid-job and restarted, a spool that refuses writes, the controller's path
//! broken (blackholed, half-open, reset) and healed. The real `miglet` binary, the real
//! controller behind fault proxies, the runner stand-in told how to fail. Every wait is
//! bounded.

mod support;

use support::*;

/// Waits until the agent's log holds `text`.
async fn wait_log(agent: &Agent, text: &str, secs: u64) {
    let log = agent.log.clone();
    let what = format!("{text:?} in the agent log");
    wait_for(&what, secs, || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .contains(text)
        }
    })
    .await;
}

/// The `fields` of every stored event of `vm` of type `ty`.
async fn events_of(ctl: &Controller, vm: &str, ty: &str) -> Vec<serde_json::Value> {
    ctl.app()
        .store()
        .events_for_vm(vm)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.event_type == ty)
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(&e.data).ok())
        .map(|d| d["fields"].clone())
        .collect()
}

/// The runner's listener fails as `fault` says (see `miglet_sim::runner_dir::FAULT_FILE`);
/// the agent reports it and ends with exit code 70, the reason logged at ERROR.
async fn runner_fails(vm: &str, fault: &str, exit_code: Option<i64>, says: &str) -> R {
    let env = env().await;
    miglet_sim::runner_dir::inject_fault(&env.dir.path().join("runner"), fault)?;
    let mut ctl = Controller::start(&env.dir.path().join("ctl"), &env.ctl()).await;
    env.github.enqueue_job(job("doomed", "Succeeded", 3_000));
    let mut agent = Agent::spawn(&env, vm, ctl.http, Some(ctl.grpc), &[]);
    assert_eq!(
        agent.wait_exit(60).await,
        Some(70),
        "log:\n{}",
        agent.log_text()
    );
    wait_event(ctl.app(), vm, "vm_shutting_down").await;
    let crashed = events_of(&ctl, vm, "runner_crashed").await;
    assert_eq!(crashed.len(), 1, "{crashed:?}");
    assert_eq!(crashed[0]["exit_code"].as_i64(), exit_code, "{crashed:?}");
    let log = agent.log_text();
    let error_line = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("error state"))
        .unwrap_or_else(|| panic!("no ERROR line with the reason:\n{log}"));
    assert!(error_line.contains(says), "{error_line}");
    let vm_row = ctl.app().store().vm_get(vm).await?.ok_or("vm")?;
    assert_eq!(vm_row.state, "shutting_down");
    ctl.stop().await;
    Ok(())
}

#[tokio::test]
async fn runner_session_conflict_ends_the_agent_with_70() -> R {
    runner_fails("vm-x5", "5", Some(5), "session conflict (5)").await
}

#[tokio::test]
async fn runner_unknown_exit_code_ends_the_agent_with_70() -> R {
    runner_fails("vm-x7", "7", Some(7), "code 7").await
}

#[tokio::test]
async fn runner_killed_by_a_signal_ends_the_agent_with_70() -> R {
    runner_fails("vm-xsig", "abort", None, "signal").await
}

/// A retryable exit while a job runs loses the job with the listener: a crash, not a retry.
#[tokio::test]
async fn runner_exit_2_mid_job_is_a_crash() -> R {
    runner_fails("vm-x2job", "mid-job:2", Some(2), "code 2").await
}

#[tokio::test]
async fn runner_death_by_signal_mid_job_is_a_crash() -> R {
    runner_fails("vm-xsigjob", "mid-job:abort", None, "signal").await
}

/// Exit codes 3 and 4 (the runner updating itself) restart the listener at once, like its
/// own wrapper does; the job then runs and the agent exits 0.
#[tokio::test]
async fn runner_update_exits_restart_the_listener() -> R {
    for (vm, code) in [("vm-x3", "3"), ("vm-x4", "4")] {
        let env = env().await;
        miglet_sim::runner_dir::inject_fault(&env.dir.path().join("runner"), code)?;
        let mut ctl = Controller::start(&env.dir.path().join("ctl"), &env.ctl()).await;
        env.github
            .enqueue_job(job("after-update", "Succeeded", 200));
        let mut agent = Agent::spawn(&env, vm, ctl.http, Some(ctl.grpc), &[]);
        assert_eq!(
            agent.wait_exit(60).await,
            Some(0),
            "exit {code}; log:\n{}",
            agent.log_text()
        );
        let types = ctl.event_types(vm).await;
        assert_eq!(count(&types, "runner_crashed"), 0, "{types:?}");
        assert_eq!(count(&types, "job_completed"), 1, "{types:?}");
        assert_eq!(env.github.registrations(), 1, "configured once");
        ctl.stop().await;
    }
    Ok(())
}

/// As root, a runner user that does not exist is found at start: exit 78 and how to fix it,
/// before the VM announces itself and takes a registration it could never use.
#[tokio::test]
async fn a_missing_runner_user_is_caught_at_start() -> R {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: needs root (only root switches to the runner user)");
        return Ok(());
    }
    let env = env().await;
    let mut ctl = Controller::start(&env.dir.path().join("ctl"), &env.ctl()).await;
    let mut agent = Agent::spawn(
        &env,
        "vm-nouser",
        ctl.http,
        Some(ctl.grpc),
        &[("MIGLET_RUNNER_USER", "no-such-user-miglet")],
    );
    assert_eq!(agent.wait_exit(30).await, Some(78));
    let log = agent.log_text();
    assert!(
        log.contains("no-such-user-miglet") && log.contains("useradd"),
        "{log}"
    );
    assert!(
        ctl.app().store().vm_get("vm-nouser").await?.is_none(),
        "nothing announced"
    );
    ctl.stop().await;
    Ok(())
}

/// The agent is killed with SIGKILL while its events cannot reach the controller, then
/// started again on the same data dir: the spooled events are sent, each stored once, and
/// a command it executed before the kill is acknowledged again from its record, not run
/// again.
#[tokio::test]
async fn a_killed_agent_replays_its_spool_and_runs_no_command_twice() -> R {
    let vm = "vm-replay";
    let (env, mut ctl, mut agent) =
        agent_at(vm, Some(job("long", "Succeeded", 4_000)), "job_started").await;
    let app = ctl.app().clone();
    // A command the agent executes and acknowledges.
    let cmd = app
        .enqueue(
            vm,
            miglet_proto::command::Command::SetLogLevel {
                level: miglet_proto::command::LogLevel::Debug,
            },
            "e2e",
            None,
        )
        .await?;
    wait_command_state(&app, &cmd.id, "acknowledged").await;
    // The path breaks; the job ends; its events wait in the spool.
    ctl.http_proxy.set_mode(Mode::Blackhole);
    ctl.grpc_proxy.set_mode(Mode::Reset);
    let spool = agent.data.join("spool");
    wait_for("job_completed spooled", 30, || {
        let spool = spool.clone();
        async move {
            std::fs::read_dir(&spool).is_ok_and(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .any(|t| t.contains("job_completed"))
            })
        }
    })
    .await;
    agent.child.start_kill()?;
    agent.child.wait().await?;
    assert!(count(&ctl.event_types(vm).await, "job_completed") == 0);
    // The controller forgets the acknowledgment (as after a restore from backup), so it will
    // hand the command out again.
    app.store()
        .write(vec![mig_controller::store::Mutation::RestoreCommandState {
            id: cmd.id.clone(),
            state: mig_controller::store::CommandState::Delivered,
            at: chrono::Utc::now().timestamp_millis() - 60_000,
        }])
        .await?;
    ctl.http_proxy.set_mode(Mode::Pass);
    ctl.grpc_proxy.set_mode(Mode::Pass);
    let first_log = agent.log_text();
    let mut again = Agent::spawn(&env, vm, ctl.http, Some(ctl.grpc), &[]);
    wait_event(&app, vm, "job_completed").await;
    wait_command_state(&app, &cmd.id, "acknowledged").await;
    let types = ctl.event_types(vm).await;
    for ty in ["runner_registered", "job_started", "job_completed"] {
        assert_eq!(count(&types, ty), 1, "{ty} in {types:?}");
    }
    // The restarted agent announces itself again; it is the same boot, not a new one.
    assert_eq!(app.store().vm_get(vm).await?.map(|v| v.boot_seq), Some(1));
    assert_eq!(
        app.store()
            .commands_for_vm(vm)
            .await?
            .iter()
            .filter(|c| c.command_type == "register_runner")
            .count(),
        1,
        "no second registration"
    );
    assert_eq!(env.github.registrations(), 1);
    let second_log = again.log_text();
    assert_eq!(
        first_log.matches("Log level changed").count()
            + second_log.matches("Log level changed").count(),
        1,
        "set_log_level ran once:\n{second_log}"
    );
    assert!(second_log.contains("Replaying events spooled before the last stop"));
    again.child.start_kill()?;
    again.child.wait().await?;
    ctl.stop().await;
    Ok(())
}

/// The spool holds one event and the controller is unreachable: the job's second event
/// cannot go to disk. The agent keeps it in memory, says so at ERROR, stops taking work
/// (draining) and reports it; when the path heals every event arrives, in order, once.
#[tokio::test]
async fn a_full_spool_stops_new_work_and_loses_nothing() -> R {
    let vm = "vm-spoolfull";
    let env = env().await;
    let mut ctl = Controller::start(&env.dir.path().join("ctl"), &env.ctl()).await;
    let mut agent = Agent::spawn(
        &env,
        vm,
        ctl.http,
        Some(ctl.grpc),
        &[("MIGLET_SPOOL_MAX_EVENTS", "1")],
    );
    wait_event(ctl.app(), vm, "runner_registered").await;
    ctl.http_proxy.set_mode(Mode::Blackhole);
    ctl.grpc_proxy.set_mode(Mode::Reset);
    env.github.enqueue_job(job("squeezed", "Succeeded", 1_500));
    wait_log(&agent, "The event spool refuses writes", 30).await;
    let log = agent.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("The event spool refuses writes"))
        .unwrap_or_default();
    assert!(
        line.contains("ERROR")
            && line.contains("takes no new job")
            && line.contains("job_completed"),
        "{line}"
    );
    // No job was running any more: draining means shutting down at once.
    wait_log(&agent, "to=shutting_down", 30).await;
    ctl.http_proxy.set_mode(Mode::Pass);
    ctl.grpc_proxy.set_mode(Mode::Pass);
    assert_eq!(
        agent.wait_exit(60).await,
        Some(0),
        "log:\n{}",
        agent.log_text()
    );
    let types = ctl.event_types(vm).await;
    for ty in [
        "vm_started",
        "runner_registered",
        "job_started",
        "job_completed",
        "error",
        "vm_shutting_down",
    ] {
        assert_eq!(count(&types, ty), 1, "{ty} in {types:?}");
    }
    let pos = |ty: &str| types.iter().position(|t| t == ty);
    assert!(pos("job_started") < pos("job_completed"), "{types:?}");
    assert!(pos("job_completed") < pos("error"), "{types:?}");
    assert!(pos("error") < pos("vm_shutting_down"), "{types:?}");
    let errors = events_of(&ctl, vm, "error").await;
    assert_eq!(errors[0]["code"], "spool_unavailable", "{errors:?}");
    ctl.stop().await;
    Ok(())
}

/// The agent-controller path blackholed, then half-open, then reset, while a job runs (each
/// for 1.5 s: the fault's length, not a wait for anything): the agent falls back, spools and
/// reconnects, and when the path heals everything arrives once. (The 60 s partition, with
/// the controller marking the VM unhealthy and healthy again, is in `miglet-faults`.)
#[tokio::test]
async fn a_broken_path_heals_with_nothing_lost_or_duplicated() -> R {
    let vm = "vm-partition";
    let (_env, mut ctl, mut agent) = agent_at(
        vm,
        Some(job("through-the-storm", "Succeeded", 6_000)),
        "job_started",
    )
    .await;
    let app = ctl.app().clone();
    for mode in [Mode::Blackhole, Mode::HalfOpen, Mode::Reset] {
        ctl.http_proxy.set_mode(mode);
        ctl.grpc_proxy.set_mode(mode);
        tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    }
    ctl.http_proxy.set_mode(Mode::Pass);
    ctl.grpc_proxy.set_mode(Mode::Pass);
    assert_eq!(
        agent.wait_exit(60).await,
        Some(0),
        "log:\n{}",
        agent.log_text()
    );
    let types = ctl.event_types(vm).await;
    for ty in [
        "vm_started",
        "runner_registered",
        "job_started",
        "job_completed",
        "vm_shutting_down",
    ] {
        assert_eq!(count(&types, ty), 1, "{ty} in {types:?}");
    }
    assert_eq!(
        app.store().commands_for_vm(vm).await?.len(),
        1,
        "one registration"
    );
    ctl.stop().await;
    Ok(())
}

/// The VM's clock is three hours ahead, or behind, the controller's (and credentials live
/// 4 s, so they are refreshed during the job): the agent judges every expiry in the
/// controller's time, so it registers, refreshes, runs its job and reports it, once, with
/// event times in the controller's time (from its first answer on); it says its clock is
/// off. Needs `faketime` (Debian's
/// package; `.ci/run` installs it).
#[tokio::test]
async fn a_vm_clock_off_by_hours_changes_nothing() -> R {
    let has_faketime = std::process::Command::new("faketime")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_faketime {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install faketime (see .ci/run)"
        );
        eprintln!("SKIPPED: faketime not installed (apt-get install faketime)");
        return Ok(());
    }
    for (vm, skew) in [("vm-ahead", "+3h"), ("vm-behind", "-3h")] {
        let env = env().await;
        let cfg = CtlConfig {
            credential_ttl: std::time::Duration::from_secs(4),
            ..env.ctl()
        };
        let mut ctl = Controller::start(&env.dir.path().join("ctl"), &cfg).await;
        env.github.enqueue_job(job("skewed", "Succeeded", 6_000));
        let mut agent = Agent::spawn_skewed(&env, vm, ctl.http, Some(ctl.grpc), skew);
        assert_eq!(
            agent.wait_exit(60).await,
            Some(0),
            "{skew}: log:\n{}",
            agent.log_text()
        );
        let types = ctl.event_types(vm).await;
        for ty in [
            "vm_started",
            "runner_registered",
            "job_started",
            "job_completed",
            "vm_shutting_down",
        ] {
            assert_eq!(count(&types, ty), 1, "{skew}: {ty} in {types:?}");
        }
        assert_eq!(env.github.registrations(), 1, "{skew}");
        let log = agent.log_text();
        assert!(
            log.contains("clock is off from the controller's"),
            "{skew}: {log}"
        );
        assert_eq!(
            log.matches("Enrolled with the controller").count(),
            1,
            "{skew}: refreshed, not re-enrolled"
        );
        // Event times are the controller's, within the time the test took (all but
        // vm_started: it is stamped before the agent has heard from the controller).
        for e in ctl
            .app()
            .store()
            .events_for_vm(vm)
            .await?
            .into_iter()
            .filter(|e| e.event_type != "vm_started")
        {
            let at = e.occurred_at.ok_or("occurred_at")?;
            assert!(
                (at - e.received_at).abs() < 60_000,
                "{skew}: {} stamped {} ms from its arrival",
                e.event_type,
                at - e.received_at
            );
        }
        ctl.stop().await;
    }
    Ok(())
}
