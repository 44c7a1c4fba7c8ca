use super::*;
use chrono::{TimeZone, Utc};

fn reg(expires_at: Option<i64>) -> Command {
    Command::RegisterRunner(RegisterRunner {
        registration_token: Some("tok".into()),
        jit_config: None,
        runner_url: "https://github.com/o".into(),
        runner_group: "default".into(),
        labels: vec!["self-hosted".into()],
        expires_at: expires_at.and_then(|s| Utc.timestamp_opt(s, 0).single()),
        runner_name: Some("vm-1".into()),
    })
}

fn cmd(id: &str, c: Command) -> Input {
    Input::Command {
        id: id.into(),
        via: Via::Stream,
        parsed: Ok(c),
    }
}

fn events(actions: &[Action]) -> Vec<&'static str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Event { event_type, .. } => Some(*event_type),
            _ => None,
        })
        .collect()
}

fn acks(actions: &[Action]) -> Vec<(bool, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Ack {
                success, message, ..
            } => Some((*success, message.clone())),
            _ => None,
        })
        .collect()
}

const NOW: Millis = 1_000_000;
const TS: &str = "2026-08-17 14:16:01Z";

/// A machine driven to `idle`.
fn idle() -> Machine {
    let mut m = Machine::new(PostJobAction::Exit);
    m.step(Input::Started, NOW);
    m.step(Input::VmStartedAcked, NOW);
    m.step(cmd("r1", reg(None)), NOW);
    m.step(Input::RunnerConfigured(Ok(())), NOW);
    m.step(Input::RunnerLine(format!("{TS}: Listening for Jobs")), NOW);
    assert_eq!(m.state, MigletState::Idle);
    m
}

#[test]
fn boot_flow_logs_the_four_lines_in_order() {
    let mut m = Machine::new(PostJobAction::Exit);
    let mut all = Vec::new();
    all.extend(m.step(Input::Started, NOW));
    assert_eq!(m.state, MigletState::WaitingForController);
    assert_eq!(events(&all), ["vm_started"]);
    all.extend(m.step(Input::VmStartedAcked, NOW));
    assert_eq!(m.state, MigletState::Ready);
    let a = m.step(cmd("r1", reg(Some(NOW / 1000 + 3600))), NOW);
    assert_eq!(m.state, MigletState::RegisteringRunner);
    assert!(
        matches!(a[0], Action::Ack { success: true, .. }),
        "ack comes first: {a:?}"
    );
    assert!(a.iter().any(|x| matches!(x, Action::StartRunner(_))));
    all.extend(a);
    let logs: Vec<&str> = all
        .iter()
        .filter_map(|a| match a {
            Action::Log(l) => Some(*l),
            _ => None,
        })
        .collect();
    assert_eq!(
        logs,
        [
            "Controller acknowledgment received, transitioning to ready state",
            "MIGlet is ready - polling controller for registration config",
            "Received register_runner command from controller",
            "Registration config received, transitioning to registering runner",
        ]
    );
    let a = m.step(Input::RunnerLine(format!("{TS}: Listening for Jobs")), NOW);
    assert_eq!(m.state, MigletState::Idle);
    assert_eq!(events(&a), ["runner_registered"]);
    assert!(a.contains(&Action::SendHeartbeat));
}

#[test]
fn job_uses_hook_details_and_completes_then_ephemeral_exit_shuts_down() {
    let mut m = idle();
    let a = m.step(
        Input::RunnerLine(format!("{TS}: Running job: build (ubuntu)")),
        NOW,
    );
    assert_eq!(m.state, MigletState::JobRunning);
    assert!(events(&a).is_empty(), "waits for the hook's details");
    let details = JobDetails {
        job_id: Some("build".into()),
        run_id: Some("4242".into()),
        repository: Some("acme/app".into()),
        branch: Some("refs/heads/main".into()),
        commit: Some("abc".into()),
        ..JobDetails::default()
    };
    let a = m.step(Input::HookStarted(details.clone()), NOW + 500);
    let Some(Action::Event {
        event_type: "job_started",
        fields,
    }) = a.first()
    else {
        panic!("{a:?}")
    };
    assert_eq!(fields["run_id"], "4242");
    assert_eq!(fields["job_name"], "build (ubuntu)");
    assert_eq!(fields["repository"], "acme/app");
    m.step(Input::HookCompleted(details), NOW + 30_000);
    let a = m.step(
        Input::RunnerLine(format!(
            "{TS}: Job build (ubuntu) completed with result: Failed"
        )),
        NOW + 30_400,
    );
    let Some(Action::Event {
        event_type: "job_completed",
        fields,
    }) = a.first()
    else {
        panic!("{a:?}")
    };
    assert_eq!(
        (fields["success"].as_bool(), fields["result"].as_str()),
        (Some(false), Some("Failed"))
    );
    assert_eq!(fields["duration"], 30);
    assert_eq!(fields["commit"], "abc");
    assert_eq!(m.state, MigletState::Idle);
    // The ephemeral runner exits 0 after its job: report, shut down, finish.
    let a = m.step(Input::RunnerExited { code: Some(0) }, NOW + 31_000);
    assert_eq!(events(&a), ["vm_shutting_down"]);
    assert!(a.contains(&Action::Finish {
        code: 0,
        post: PostJobAction::Exit
    }));
    assert_eq!(m.state, MigletState::ShuttingDown);
}

#[test]
fn job_started_is_reported_without_hooks_after_a_wait() {
    let mut m = idle();
    m.step(Input::RunnerLine(format!("{TS}: Running job: lint")), NOW);
    assert!(events(&m.step(Input::Tick, NOW + JOB_DETAILS_WAIT - 1)).is_empty());
    let a = m.step(Input::Tick, NOW + JOB_DETAILS_WAIT);
    assert_eq!(events(&a), ["job_started"]);
    assert!(
        events(&m.step(Input::Tick, NOW + 2 * JOB_DETAILS_WAIT)).is_empty(),
        "reported once"
    );
}

#[test]
fn register_runner_is_refused_outside_ready_and_when_expired() {
    // Before the controller acknowledged vm_started.
    let mut m = Machine::new(PostJobAction::Exit);
    m.step(Input::Started, NOW);
    let a = m.step(cmd("r0", reg(None)), NOW);
    assert_eq!(
        acks(&a),
        [(
            false,
            "register_runner is not allowed in state waiting_for_controller".to_owned()
        )]
    );
    assert!(!a.iter().any(|x| matches!(x, Action::StartRunner(_))));
    // Expired token.
    m.step(Input::VmStartedAcked, NOW);
    let a = m.step(cmd("r1", reg(Some(NOW / 1000 - 1))), NOW);
    assert!(
        acks(&a)[0].1.starts_with("registration token expired at "),
        "{a:?}"
    );
    assert_eq!(m.state, MigletState::Ready);
    assert!(!a.iter().any(|x| matches!(x, Action::StartRunner(_))));
    // Missing fields (parse errors) are acknowledged as failures.
    let a = m.step(
        Input::Command {
            id: "r2".into(),
            via: Via::Http,
            parsed: Err(CommandError::NoCredential),
        },
        NOW,
    );
    assert_eq!(
        acks(&a),
        [(
            false,
            "register_runner needs registration_token or jit_config".to_owned()
        )]
    );
    // While a job runs.
    let mut m = idle();
    m.step(Input::RunnerLine(format!("{TS}: Running job: x")), NOW);
    let a = m.step(cmd("r9", reg(None)), NOW);
    assert_eq!(
        acks(&a),
        [(
            false,
            "register_runner is not allowed in state job_running".to_owned()
        )]
    );
    assert_eq!(m.state, MigletState::JobRunning);
}

#[test]
fn a_command_id_is_executed_once_and_acknowledged_every_time() {
    let mut m = Machine::new(PostJobAction::Exit);
    m.step(Input::Started, NOW);
    m.step(Input::VmStartedAcked, NOW);
    let first = m.step(cmd("r1", reg(None)), NOW);
    assert_eq!(
        first
            .iter()
            .filter(|a| matches!(a, Action::StartRunner(_)))
            .count(),
        1
    );
    let again = m.step(cmd("r1", reg(None)), NOW);
    assert_eq!(
        again,
        vec![Action::Ack {
            id: "r1".into(),
            via: Via::Stream,
            success: true,
            message: "Registration config received".into()
        }]
    );
}

#[test]
fn executed_commands_survive_a_restart() {
    let mut m = Machine::new(PostJobAction::Exit);
    m.restore_executed([("d1".to_owned(), true, "draining".to_owned())]);
    m.step(Input::Started, NOW);
    m.step(Input::VmStartedAcked, NOW);
    let a = m.step(
        cmd(
            "d1",
            Command::Drain {
                reason: String::new(),
                timeout_seconds: None,
            },
        ),
        NOW,
    );
    assert_eq!(acks(&a), [(true, "draining".to_owned())]);
    assert_eq!(m.state, MigletState::Ready, "not executed again");
}

#[test]
fn drain_during_a_job_waits_then_shuts_down() {
    let mut m = idle();
    m.step(Input::RunnerLine(format!("{TS}: Running job: x")), NOW);
    let a = m.step(
        cmd(
            "d1",
            Command::Drain {
                reason: "scale".into(),
                timeout_seconds: Some(60),
            },
        ),
        NOW,
    );
    assert!(acks(&a)[0].0);
    assert_eq!(m.state, MigletState::Draining);
    assert!(
        !a.iter().any(|x| matches!(x, Action::StopRunner { .. })),
        "the job is not interrupted"
    );
    m.step(
        Input::RunnerLine(format!("{TS}: Job x completed with result: Succeeded")),
        NOW + 5_000,
    );
    assert_eq!(
        m.state,
        MigletState::Draining,
        "stays draining until the runner exits"
    );
    let a = m.step(Input::RunnerExited { code: Some(0) }, NOW + 6_000);
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Finish { code: 0, .. }))
    );
}

#[test]
fn drain_deadline_forces_the_runner_down() {
    let mut m = idle();
    m.step(Input::RunnerLine(format!("{TS}: Running job: x")), NOW);
    m.step(
        cmd(
            "d1",
            Command::Drain {
                reason: String::new(),
                timeout_seconds: Some(5),
            },
        ),
        NOW,
    );
    assert!(
        m.step(Input::Tick, NOW + 4_999)
            .iter()
            .all(|a| !matches!(a, Action::StopRunner { .. }))
    );
    let a = m.step(Input::Tick, NOW + 5_000);
    assert!(a.contains(&Action::StopRunner { force: true }));
    // Cut off before the hook reported: the job is still reported, started then canceled.
    let a = m.step(Input::RunnerExited { code: None }, NOW + 5_500);
    assert_eq!(
        events(&a),
        ["job_started", "job_completed", "vm_shutting_down"]
    );
}

#[test]
fn drain_while_idle_stops_the_runner_and_finishes() {
    let mut m = idle();
    let a = m.step(
        cmd(
            "d1",
            Command::Drain {
                reason: String::new(),
                timeout_seconds: None,
            },
        ),
        NOW,
    );
    assert!(a.contains(&Action::StopRunner { force: false }));
    let a = m.step(Input::RunnerExited { code: Some(0) }, NOW);
    assert!(a.iter().any(|x| matches!(x, Action::Finish { .. })));
    // In ready (no runner yet): finishes at once, and a late register_runner is refused.
    let mut m = Machine::new(PostJobAction::Poweroff);
    m.step(Input::Started, NOW);
    m.step(Input::VmStartedAcked, NOW);
    let a = m.step(
        cmd(
            "d",
            Command::Drain {
                reason: String::new(),
                timeout_seconds: None,
            },
        ),
        NOW,
    );
    assert!(a.contains(&Action::Finish {
        code: 0,
        post: PostJobAction::Poweroff
    }));
    let a = m.step(cmd("r", reg(None)), NOW);
    assert!(!acks(&a)[0].0);
}

#[test]
fn shutdown_graceful_and_forced() {
    let mut m = idle();
    let a = m.step(
        cmd(
            "s",
            Command::Shutdown {
                reason: String::new(),
                force: false,
            },
        ),
        NOW,
    );
    assert!(a.contains(&Action::StopRunner { force: false }));
    let a = m.step(
        cmd(
            "s2",
            Command::Shutdown {
                reason: String::new(),
                force: true,
            },
        ),
        NOW,
    );
    assert!(
        a.contains(&Action::StopRunner { force: true }),
        "force escalates: {a:?}"
    );
    // SIGTERM takes the same path.
    let mut m = idle();
    let a = m.step(Input::Signal, NOW);
    assert!(a.contains(&Action::StopRunner { force: false }));
    assert_eq!(m.state, MigletState::ShuttingDown);
}

#[test]
fn runner_failures_end_in_error_with_a_distinct_code() {
    let mut m = Machine::new(PostJobAction::None);
    m.step(Input::Started, NOW);
    m.step(Input::VmStartedAcked, NOW);
    m.step(cmd("r", reg(None)), NOW);
    let a = m.step(
        Input::RunnerConfigured(Err("config.sh exited 1".into())),
        NOW,
    );
    assert_eq!(events(&a), ["error", "vm_shutting_down"]);
    assert!(a.contains(&Action::Finish {
        code: exit_code::RUNNER_FAILED,
        post: PostJobAction::Exit
    }));
    assert_eq!(m.state, MigletState::Error);
    // A crash while idle.
    let mut m = idle();
    let a = m.step(Input::RunnerExited { code: Some(1) }, NOW);
    assert_eq!(events(&a), ["runner_crashed", "vm_shutting_down"]);
    assert_eq!(m.state, MigletState::Error);
    // Retryable exits restart the listener instead.
    let mut m = idle();
    let a = m.step(Input::RunnerExited { code: Some(2) }, NOW);
    assert_eq!(
        a,
        vec![Action::RestartRunner {
            after: Duration::from_secs(5)
        }]
    );
}

/// Every exit of the listener maps as the runner's own wrapper (run-helper) maps it: 2
/// (retryable) restarts after 5 s, 3 and 4 (update) at once; 0 before a job, 1, 5
/// (session conflict), any other code and a signal death end in `error` with the reason
/// logged at ERROR and exit code 70; a 2 while a job runs is a crash, not a retry.
#[test]
fn every_runner_exit_code_maps_as_the_runner_wrapper_does() {
    for (code, restart_after) in [(Some(2), 5), (Some(3), 1), (Some(4), 1)] {
        let mut m = idle();
        let a = m.step(Input::RunnerExited { code }, NOW);
        assert_eq!(
            a,
            vec![Action::RestartRunner {
                after: Duration::from_secs(restart_after)
            }],
            "{code:?}"
        );
        assert_eq!(m.state, MigletState::Idle);
    }
    let failed = |a: &[Action]| -> Option<String> {
        a.iter().find_map(|x| match x {
            Action::Failed { reason } => Some(reason.clone()),
            _ => None,
        })
    };
    for (code, says) in [
        (Some(0), "before running a job"),
        (Some(1), "terminated error (1)"),
        (Some(5), "session conflict (5)"),
        (Some(7), "code 7"),
        (None, "signal"),
    ] {
        let mut m = idle();
        let a = m.step(Input::RunnerExited { code }, NOW);
        assert_eq!(
            events(&a),
            ["runner_crashed", "vm_shutting_down"],
            "{code:?}"
        );
        assert_eq!(m.state, MigletState::Error, "{code:?}");
        let reason = failed(&a).unwrap_or_default();
        assert!(reason.contains(says), "{code:?}: {reason}");
        assert!(a.contains(&Action::Finish {
            code: exit_code::RUNNER_FAILED,
            post: PostJobAction::Exit
        }));
        let crashed = a.iter().find_map(|x| match x {
            Action::Event {
                event_type: "runner_crashed",
                fields,
            } => Some(fields.clone()),
            _ => None,
        });
        assert_eq!(
            crashed.and_then(|f| f.get("exit_code").cloned()),
            code.map(serde_json::Value::from),
            "{code:?}"
        );
    }
    // A retryable code while a job runs: the job is lost with the listener.
    let mut m = idle();
    m.step(Input::RunnerLine(format!("{TS}: Running job: build")), NOW);
    assert_eq!(m.state, MigletState::JobRunning);
    let a = m.step(Input::RunnerExited { code: Some(2) }, NOW + 1_000);
    assert!(!a.iter().any(|x| matches!(x, Action::RestartRunner { .. })));
    assert!(failed(&a).is_some_and(|r| r.contains("code 2")));
    assert_eq!(m.state, MigletState::Error);
    // A configuration failure says why, too.
    let mut m = Machine::new(PostJobAction::None);
    m.step(Input::Started, NOW);
    m.step(Input::VmStartedAcked, NOW);
    m.step(cmd("r", reg(None)), NOW);
    let a = m.step(
        Input::RunnerConfigured(Err("chown of the runner dir failed: invalid user".into())),
        NOW,
    );
    assert!(failed(&a).is_some_and(|r| r.contains("chown of the runner dir failed")));
}

#[test]
fn set_log_level_and_update_config() {
    let mut m = idle();
    let a = m.step(
        cmd(
            "l",
            Command::SetLogLevel {
                level: LogLevel::Debug,
            },
        ),
        NOW,
    );
    assert!(a.contains(&Action::SetLogLevel(LogLevel::Debug)));
    let a = m.step(
        cmd(
            "u1",
            Command::UpdateConfig {
                key: "heartbeat_interval".into(),
                value: "10s".into(),
            },
        ),
        NOW,
    );
    assert!(a.contains(&Action::SetHeartbeatInterval(Duration::from_secs(10))));
    let a = m.step(
        cmd(
            "u2",
            Command::UpdateConfig {
                key: "post_job_action".into(),
                value: "poweroff".into(),
            },
        ),
        NOW,
    );
    assert!(acks(&a)[0].0);
    assert_eq!(m.post_job_action, PostJobAction::Poweroff);
    let a = m.step(
        cmd(
            "u3",
            Command::UpdateConfig {
                key: "colour".into(),
                value: "red".into(),
            },
        ),
        NOW,
    );
    assert!(!acks(&a)[0].0);
    let a = m.step(
        cmd(
            "u4",
            Command::UpdateConfig {
                key: "heartbeat_interval".into(),
                value: "soon".into(),
            },
        ),
        NOW,
    );
    assert!(!acks(&a)[0].0);
}

#[test]
fn runner_lines_parse_strictly() {
    assert_eq!(
        parse_runner_line("2026-08-17 14:16:01Z: Running job: build (a, b)"),
        Some(RunnerLine::JobStarted("build (a, b)".into()))
    );
    assert_eq!(
        parse_runner_line(
            "2026-08-17 14:16:30Z: Job job: with: colons completed with result: Succeeded"
        ),
        Some(RunnerLine::JobCompleted {
            name: "job: with: colons".into(),
            result: "Succeeded".into()
        })
    );
    assert_eq!(
        parse_runner_line("2026-08-17 14:15:44Z: Listening for Jobs"),
        Some(RunnerLine::Listening)
    );
    // A job's own output that merely mentions the words is not a runner line.
    assert_eq!(parse_runner_line("echo Running job: fake"), None);
    assert_eq!(parse_runner_line("Running job: fake"), None);
}

#[test]
fn durations() {
    assert_eq!(parse_duration("15s"), Some(Duration::from_secs(15)));
    assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
    assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
    assert_eq!(parse_duration("x"), None);
}

#[test]
fn preemption_drains_at_once() {
    let mut m = idle();
    m.step(Input::RunnerLine(format!("{TS}: Running job: x")), NOW);
    let a = m.step(Input::Preempted, NOW);
    assert_eq!(m.state, MigletState::Draining);
    assert_eq!(events(&a), ["error"]);
    assert!(m.step(Input::Preempted, NOW).is_empty(), "once");
    // Idle: straight to shutting down.
    let mut m = idle();
    let a = m.step(Input::Preempted, NOW);
    assert!(a.contains(&Action::StopRunner { force: false }));
}

/// A spool that refuses writes stops new work: idle, the agent drains at once (and says so
/// in an `error` event); in a job, the job finishes and nothing new is taken.
#[test]
fn an_unusable_spool_stops_new_work() {
    let mut m = idle();
    let a = m.step(Input::SpoolUnusable("disk full".into()), NOW);
    assert_eq!(events(&a), ["error"]);
    assert!(a.contains(&Action::StopRunner { force: false }), "{a:?}");
    assert_eq!(m.state, MigletState::ShuttingDown);
    let mut m = idle();
    m.step(Input::RunnerLine(format!("{TS}: Running job: build")), NOW);
    let a = m.step(Input::SpoolUnusable("disk full".into()), NOW);
    assert_eq!(events(&a), ["error"]);
    assert_eq!(m.state, MigletState::Draining);
    // Reported once, however many events the spool refuses.
    let a = m.step(Input::SpoolUnusable("disk full".into()), NOW);
    assert!(events(&a).is_empty());
}
