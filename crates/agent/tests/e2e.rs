//! End to end: the real `miglet` binary against the real controller (in-process, loopback,
//! port 0), with the runner stand-in and the fake GitHub of `miglet-sim`. Every wait is
//! bounded.

mod support;

use support::*;
async fn full_lifecycle(grpc: bool) -> R {
    let env = env().await;
    let mut ctl = Controller::start(&env.dir.path().join("ctl"), &env.ctl()).await;
    env.github
        .enqueue_job(job("build (linux)", "Succeeded", 800));
    let vm = if grpc { "vm-grpc" } else { "vm-http" };
    let mut agent = Agent::spawn(&env, vm, ctl.http, grpc.then_some(ctl.grpc), &[]);
    let code = agent.wait_exit(60).await;
    assert_eq!(code, Some(0), "log:\n{}", agent.log_text());
    let types = ctl.event_types(vm).await;
    assert_eq!(
        types,
        [
            "vm_started",
            "runner_registered",
            "job_started",
            "job_completed",
            "vm_shutting_down"
        ],
        "log:\n{}",
        agent.log_text()
    );
    let started = ctl.event(vm, "job_started").await.ok_or("job_started")?;
    assert_eq!(started["run_id"], "777001");
    assert_eq!(started["job_name"], "build (linux)");
    assert_eq!(started["repository"], "acme/widgets");
    assert_eq!(started["commit"], "0123abcd");
    assert_eq!(started["branch"], "refs/heads/main");
    let done = ctl
        .event(vm, "job_completed")
        .await
        .ok_or("job_completed")?;
    assert_eq!(
        (done["result"].as_str(), done["success"].as_bool()),
        (Some("Succeeded"), Some(true))
    );
    assert!(done["duration"].as_i64().is_some());
    // One registration, acknowledged; the runner registered with GitHub with our labels.
    let cmds = ctl.app().store().commands_for_vm(vm).await?;
    assert_eq!(cmds.len(), 1);
    assert_eq!(cmds[0].state.as_str(), "acknowledged");
    let runners = env.github.runners();
    assert_eq!(runners.len(), 1);
    assert_eq!(runners[0].labels, ["self-hosted", "Linux", "X64", "e2e"]);
    assert!(runners[0].ephemeral);
    assert_eq!(env.github.reports()[0].result, "Succeeded");
    // Heartbeats arrived with real figures.
    let hbs = ctl.app().store().heartbeats_for_vm(vm).await?;
    assert!(!hbs.is_empty());
    assert!(
        hbs.iter()
            .any(|h| h.memory_total_bytes.unwrap_or(0) > 0 && h.disk_total_bytes.unwrap_or(0) > 0)
    );
    let log = agent.log_text();
    if grpc {
        assert!(log.contains("Connection accepted by controller"), "{log}");
        let via = cmds[0].delivered_via.clone().unwrap_or_default();
        assert!(
            via.starts_with("grpc:"),
            "register_runner went out via {via}"
        );
    } else {
        assert!(
            log.contains("gRPC stream disabled: using HTTP polling only"),
            "{log}"
        );
        assert_eq!(cmds[0].delivered_via.as_deref(), Some("http"));
    }
    let mut at = 0;
    for line in [
        "Controller acknowledgment received, transitioning to ready state",
        "MIGlet is ready - polling controller for registration config",
        "Received register_runner command from controller",
        "Registration config received, transitioning to registering runner",
    ] {
        let pos = log[at..]
            .find(line)
            .ok_or_else(|| format!("missing or out of order: {line}\n{log}"))?;
        at += pos + line.len();
    }
    // It enrolled with the pool's bootstrap secret over mutual TLS.
    assert!(agent.log_text().contains("Enrolled with the controller"));
    let log = ctl.app().store().vm_log_for_vm(vm).await?;
    assert!(
        log.iter().any(|l| l.kind == "enrolled"
            && l.detail
                .as_deref()
                .is_some_and(|d| d.contains("method=bootstrap"))),
        "{log:?}"
    );
    assert_no_token(&env, &agent);
    assert!(
        std::fs::read_dir(agent.data.join("spool"))?
            .filter_map(|e| e.ok())
            .all(|e| e.path().is_dir()),
        "spool drained"
    );
    ctl.stop().await;
    Ok(())
}

#[tokio::test]
async fn full_lifecycle_over_the_grpc_stream() -> R {
    full_lifecycle(true).await
}

#[tokio::test]
async fn full_lifecycle_with_http_polling_only() -> R {
    full_lifecycle(false).await
}

#[tokio::test]
async fn controller_down_at_start_then_up() -> R {
    let env = env().await;
    let mut ctl = Controller::start(&env.dir.path().join("ctl"), &env.ctl()).await;
    ctl.stop().await;
    env.github.enqueue_job(job("late", "Succeeded", 200));
    let mut agent = Agent::spawn(&env, "vm-late", ctl.http, Some(ctl.grpc), &[]);
    let log = agent.log.clone();
    wait_for(
        "the agent to retry while the controller is down",
        30,
        || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .matches("Waiting for the controller to acknowledge vm_started")
                    .count()
                    >= 2
            }
        },
    )
    .await;
    assert!(
        agent.child.try_wait()?.is_none(),
        "the agent waits for the controller"
    );
    ctl.restart().await;
    let code = tokio::time::timeout(Duration::from_secs(30), agent.child.wait()).await;
    if !matches!(code, Ok(Ok(ref s)) if s.code() == Some(0)) {
        let store = ctl.app().store();
        panic!(
            "agent did not finish: {code:?}\nvm: {:?}\ncommands: {:?}\nvmlog: {:?}\nagent:\n{}",
            store.vm_get("vm-late").await,
            store.commands_for_vm("vm-late").await,
            store.vm_log_for_vm("vm-late").await,
            agent.log_text()
        );
    }
    let types = ctl.event_types("vm-late").await;
    assert_eq!(
        types,
        [
            "vm_started",
            "runner_registered",
            "job_started",
            "job_completed",
            "vm_shutting_down"
        ]
    );
    ctl.stop().await;
    Ok(())
}

#[tokio::test]
async fn controller_restarted_while_a_job_runs() -> R {
    let (env, mut ctl, mut agent) = agent_at(
        "vm-restart",
        Some(job("long", "Succeeded", 5000)),
        "job_started",
    )
    .await;
    ctl.restart().await;
    assert_eq!(
        agent.wait_exit(60).await,
        Some(0),
        "log:\n{}",
        agent.log_text()
    );
    let types = ctl.event_types("vm-restart").await;
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
        ctl.app().store().commands_for_vm("vm-restart").await?.len(),
        1,
        "no second registration"
    );
    assert_eq!(env.github.registrations(), 1);
    ctl.stop().await;
    Ok(())
}

#[tokio::test]
async fn drain_during_a_job_lets_it_finish() -> R {
    let (_env, mut ctl, mut agent) = agent_at(
        "vm-drain",
        Some(job("drained", "Succeeded", 3000)),
        "job_started",
    )
    .await;
    let app = ctl.app().clone();
    let drain = app
        .enqueue(
            "vm-drain",
            Command::Drain {
                reason: "scale in".into(),
                timeout_seconds: Some(120),
            },
            "e2e",
            None,
        )
        .await?;
    assert_eq!(
        agent.wait_exit(60).await,
        Some(0),
        "log:\n{}",
        agent.log_text()
    );
    let cmd = app.store().command_get(&drain.id).await?.ok_or("drain")?;
    assert_eq!(cmd.state.as_str(), "acknowledged");
    let done = ctl
        .event("vm-drain", "job_completed")
        .await
        .ok_or("job_completed")?;
    assert_eq!(done["result"], "Succeeded", "the job was not interrupted");
    assert_eq!(
        ctl.event_types("vm-drain").await.last().map(String::as_str),
        Some("vm_shutting_down")
    );
    ctl.stop().await;
    Ok(())
}

#[tokio::test]
async fn forced_shutdown_stops_a_running_job() -> R {
    let (_env, mut ctl, mut agent) = agent_at(
        "vm-force",
        Some(job("endless", "Succeeded", 120_000)),
        "job_started",
    )
    .await;
    let app = ctl.app().clone();
    let started = tokio::time::Instant::now();
    app.enqueue(
        "vm-force",
        Command::Shutdown {
            reason: "now".into(),
            force: true,
        },
        "e2e",
        None,
    )
    .await?;
    assert_eq!(
        agent.wait_exit(30).await,
        Some(0),
        "log:\n{}",
        agent.log_text()
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    let done = ctl
        .event("vm-force", "job_completed")
        .await
        .ok_or("job_completed")?;
    assert_eq!(done["result"], "Canceled");
    assert_eq!(
        ctl.event_types("vm-force").await.last().map(String::as_str),
        Some("vm_shutting_down")
    );
    ctl.stop().await;
    Ok(())
}

#[tokio::test]
async fn sigterm_takes_the_shutdown_path() -> R {
    let (_env, mut ctl, mut agent) = agent_at("vm-term", None, "runner_registered").await;
    let pid = nix::unistd::Pid::from_raw(agent.child.id().ok_or("pid")? as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    assert_eq!(
        agent.wait_exit(30).await,
        Some(0),
        "log:\n{}",
        agent.log_text()
    );
    assert_eq!(
        ctl.event_types("vm-term").await,
        ["vm_started", "runner_registered", "vm_shutting_down"]
    );
    let log = agent.log_text();
    assert!(log.contains("Stopping the runner (SIGINT)"), "{log}");
    ctl.stop().await;
    Ok(())
}

#[tokio::test]
async fn set_log_level_changes_output_live() -> R {
    let (_env, mut ctl, mut agent) = agent_at("vm-log", None, "runner_registered").await;
    let app = ctl.app().clone();
    assert!(
        !agent.log_text().contains("DEBUG"),
        "no debug output at info"
    );
    let c = app
        .enqueue(
            "vm-log",
            Command::SetLogLevel {
                level: miglet_proto::command::LogLevel::Debug,
            },
            "e2e",
            None,
        )
        .await?;
    wait_for("set_log_level acknowledged", 20, || {
        let app = app.clone();
        let id = c.id.clone();
        async move {
            app.store()
                .command_get(&id)
                .await
                .ok()
                .flatten()
                .is_some_and(|c| c.state.as_str() == "acknowledged")
        }
    })
    .await;
    app.enqueue(
        "vm-log",
        Command::UpdateConfig {
            key: "heartbeat_interval".into(),
            value: "1s".into(),
        },
        "e2e",
        None,
    )
    .await?;
    let log_path = agent.log.clone();
    wait_for("debug output", 20, || {
        let p = log_path.clone();
        async move {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .contains("DEBUG")
        }
    })
    .await;
    // update_config took effect: the agent says so, and heartbeats now come every second
    // (they came every 2 s).
    wait_for("the new heartbeat interval", 20, || {
        let p = log_path.clone();
        async move {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .contains("Heartbeat interval changed")
        }
    })
    .await;
    let since = chrono::Utc::now().timestamp_millis();
    wait_for("three heartbeats at the new interval", 20, || {
        let app = app.clone();
        async move {
            app.store()
                .heartbeats_for_vm("vm-log")
                .await
                .is_ok_and(|h| h.iter().filter(|h| h.received_at > since).count() >= 3)
        }
    })
    .await;
    let recent: Vec<i64> = app
        .store()
        .heartbeats_for_vm("vm-log")
        .await?
        .iter()
        .map(|h| h.received_at)
        .filter(|t| *t > since)
        .collect();
    let gaps: Vec<i64> = recent.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().any(|g| *g < 1_600),
        "heartbeats still 2 s apart: {gaps:?}"
    );
    app.enqueue(
        "vm-log",
        Command::Shutdown {
            reason: String::new(),
            force: false,
        },
        "e2e",
        None,
    )
    .await?;
    assert_eq!(agent.wait_exit(30).await, Some(0));
    ctl.stop().await;
    Ok(())
}

/// A controller that speaks only the base contract: acknowledges vm_started, hands out the
/// commands it is given over `GET .../commands` once, records everything, has no ack route.
mod base_controller {
    use axum::Json;
    use axum::extract::{Path, State};
    use axum::routing::{get, post};
    use serde_json::{Value, json};
    use std::sync::{Arc, Mutex};

    #[derive(Default, Clone)]
    pub struct Base {
        pub events: Arc<Mutex<Vec<Value>>>,
        pub queue: Arc<Mutex<Vec<Value>>>,
        pub acks: Arc<Mutex<Vec<(String, Value)>>>,
    }

    impl Base {
        pub fn router(&self) -> axum::Router {
            axum::Router::new()
                .route("/api/v1/vms/{vm}/events", post(event))
                .route(
                    "/api/v1/vms/{vm}/heartbeat",
                    post(|| async { Json(json!({"status":"received"})) }),
                )
                .route("/api/v1/vms/{vm}/commands", get(commands))
                .route("/api/v1/vms/{vm}/commands/{id}/ack", post(ack))
                .with_state(self.clone())
        }
    }

    async fn event(
        State(b): State<Base>,
        Path(vm): Path<String>,
        Json(v): Json<Value>,
    ) -> Json<Value> {
        let started = v["type"] == "vm_started";
        b.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(v);
        if started {
            Json(json!({"status":"acknowledged","acknowledged":true,"vm_id":vm,"message":"ok"}))
        } else {
            Json(json!({"status":"received","vm_id":vm,"message":"Event received and stored"}))
        }
    }

    async fn commands(State(b): State<Base>, Path(vm): Path<String>) -> Json<Value> {
        let cmds: Vec<Value> = std::mem::take(
            &mut *b
                .queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        // The prototype answered `null` for no commands.
        Json(
            json!({"commands": if cmds.is_empty() { Value::Null } else { Value::Array(cmds) }, "vm_id": vm}),
        )
    }

    async fn ack(
        State(b): State<Base>,
        Path((_vm, id)): Path<(String, String)>,
        Json(v): Json<Value>,
    ) -> Json<Value> {
        b.acks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((id, v));
        Json(json!({"status":"received"}))
    }
}

#[tokio::test]
async fn bad_register_runner_is_refused_with_a_failed_ack_and_no_runner() -> R {
    let env = env().await;
    let base = base_controller::Base::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = base.router();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let lock = |m: &std::sync::Mutex<Vec<serde_json::Value>>| {
        m.lock().map(|v| v.clone()).unwrap_or_default()
    };
    base.queue.lock().map_err(|_| "lock")?.extend([
        serde_json::json!({"id":"reg-no-token","type":"register_runner","created_at":"2024-01-15T10:30:00Z",
            "parameters":{"runner_url": env.github_url,"runner_group":"default","labels":["self-hosted"]}}),
        serde_json::json!({"id":"reg-expired","type":"register_runner","created_at":"2024-01-15T10:30:00Z",
            "parameters":{"registration_token": TOKEN,"runner_url": env.github_url,"runner_group":"default",
            "labels":["self-hosted"],"expires_at":"2024-01-15T11:30:00Z"}}),
    ]);
    let mut agent = Agent::spawn_plain(&env, "vm-bad", addr, None, &[]);
    let acks = base.acks.clone();
    wait_for("two acks", 30, || {
        let acks = acks.clone();
        async move { acks.lock().map(|a| a.len() >= 2).unwrap_or(false) }
    })
    .await;
    let acks = base.acks.lock().map(|a| a.clone()).map_err(|_| "lock")?;
    assert_eq!(acks[0].0, "reg-no-token");
    assert_eq!(acks[0].1["success"], false);
    assert_eq!(
        acks[0].1["message"],
        "register_runner needs registration_token or jit_config"
    );
    assert_eq!(acks[1].0, "reg-expired");
    assert_eq!(acks[1].1["success"], false);
    assert!(
        acks[1].1["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("registration token expired at"))
    );
    assert!(env.github.runners().is_empty(), "no runner was configured");
    assert!(!env.dir.path().join("runner/.runner").exists());
    // Still waiting in ready; a shutdown command ends it.
    base.queue.lock().map_err(|_| "lock")?.push(serde_json::json!({"id":"bye","type":"shutdown","created_at":"2024-01-15T10:30:00Z","parameters":{"force":false}}));
    assert_eq!(
        agent.wait_exit(30).await,
        Some(0),
        "log:\n{}",
        agent.log_text()
    );
    let types: Vec<String> = lock(&base.events)
        .iter()
        .filter_map(|e| e["type"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(types, ["vm_started", "vm_shutting_down"]);
    assert_no_token(&env, &agent);
    server.abort();
    Ok(())
}

#[tokio::test]
async fn missing_required_setting_exits_with_the_config_code() -> R {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(MIGLET)
            .env_clear()
            .env("MIGLET_METADATA", "false")
            .env("MIGLET_VM_ID", "vm-1")
            .output(),
    )
    .await??;
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pool_id (MIGLET_POOL_ID) is required"),
        "{err}"
    );
    Ok(())
}

/// The example env file under deploy/ is accepted: with it the agent gets past configuration
/// and stops only at the (deliberately) missing runner.
#[tokio::test]
async fn deploy_example_env_file_is_valid() -> R {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/miglet.env.example");
    let text = std::fs::read_to_string(&example)?;
    let tmp = tempfile::tempdir()?;
    let mut cmd = tokio::process::Command::new(MIGLET);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("not KEY=VALUE: {line}"))?;
        assert!(
            !v.contains('#'),
            "systemd EnvironmentFile has no trailing comments: {line}"
        );
        cmd.env(k, v);
    }
    cmd.env("MIGLET_DATA_DIR", tmp.path().join("data"))
        .env("MIGLET_RUNNER_DIR", tmp.path().join("no-runner"))
        .env("MIGLET_METADATA", "false")
        // On GCE this one comes from the metadata server (the instance name).
        .env("MIGLET_VM_ID", "instance-from-metadata");
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output()).await??;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("no runner in"), "{err}");
    assert!(!err.contains("configuration error"), "{err}");
    Ok(())
}

/// As root, the agent runs config.sh, the listener and the job (hooks included) as the
/// configured unprivileged user. Needs root and `useradd`; otherwise there is nothing to test.
#[tokio::test]
async fn runner_runs_as_the_configured_unprivileged_user() -> R {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(());
    }
    const USER: &str = "miglet-e2e-runner";
    if nix::unistd::User::from_name(USER)?.is_none() {
        let st = std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ])
            .status();
        if !st.is_ok_and(|s| s.success()) && nix::unistd::User::from_name(USER)?.is_none() {
            return Err("useradd failed".into());
        }
    }
    let uid = nix::unistd::User::from_name(USER)?.ok_or("user")?.uid;
    let env = env().await;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let mut ctl = Controller::start(&env.dir.path().join("ctl"), &env.ctl()).await;
    env.github.enqueue_job(job("as-user", "Succeeded", 300));
    let mut agent = Agent::spawn(
        &env,
        "vm-user",
        ctl.http,
        Some(ctl.grpc),
        &[("MIGLET_RUNNER_USER", USER)],
    );
    let code = agent.wait_exit(60).await;
    assert_eq!(code, Some(0), "log:\n{}", agent.log_text());
    let started = ctl
        .event("vm-user", "job_started")
        .await
        .ok_or("job_started")?;
    assert_eq!(
        started["run_id"], "777001",
        "the hook ran as the user and reached the agent"
    );
    use std::os::unix::fs::MetadataExt;
    let diag = env.dir.path().join("runner/_diag");
    let owners: Vec<u32> = std::fs::read_dir(&diag)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.uid())
        .collect();
    assert!(
        !owners.is_empty() && owners.iter().all(|o| *o == uid.as_raw()),
        "runner files owned by {owners:?}, not {uid}"
    );
    ctl.stop().await;
    Ok(())
}

/// On GCE the agent watches `instance/preempted`; when it turns TRUE the agent drains: the
/// running job finishes, nothing new is taken, the agent reports and exits.
#[tokio::test]
async fn preemption_drains_the_agent() -> R {
    let env = env().await;
    // A GCE VM: it proves who it is with an instance identity token, not a secret.
    let meta = miglet_sim::metadata::FakeMetadata::default().with_identity(
        env.google.clone(),
        miglet_sim::google::Instance::new(GCE_PROJECT, "us-central1-a", "vm-preempt"),
    );
    meta.set("instance/name", "vm-preempt");
    meta.set("instance/preempted", "FALSE");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let meta_addr = listener.local_addr()?;
    let router = meta.router();
    let meta_task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let mut ctl = Controller::start(&env.dir.path().join("ctl"), &env.ctl()).await;
    env.github.enqueue_job(job("spot", "Succeeded", 8000));
    let meta_url = format!("http://{meta_addr}");
    let mut agent = Agent::spawn(
        &env,
        "vm-preempt",
        ctl.http,
        Some(ctl.grpc),
        &[
            ("MIGLET_METADATA", "true"),
            ("MIGLET_METADATA_URL", &meta_url),
            ("MIGLET_AUTH", "gce"),
            ("MIGLET_AUDIENCE", AUDIENCE),
        ],
    );
    let app = ctl.app().clone();
    wait_event(&app, "vm-preempt", "job_started").await;
    meta.set("instance/preempted", "TRUE");
    assert_eq!(
        agent.wait_exit(60).await,
        Some(0),
        "log:\n{}",
        agent.log_text()
    );
    assert!(
        agent
            .log_text()
            .contains("GCE reports this VM preempted: draining")
    );
    let done = ctl
        .event("vm-preempt", "job_completed")
        .await
        .ok_or("job_completed")?;
    assert_eq!(
        done["result"], "Succeeded",
        "the running job was allowed to finish"
    );
    let types = ctl.event_types("vm-preempt").await;
    assert!(types.contains(&"error".to_owned()), "{types:?}");
    assert_eq!(types.last().map(String::as_str), Some("vm_shutting_down"));
    let log = ctl.app().store().vm_log_for_vm("vm-preempt").await?;
    assert!(
        log.iter().any(|l| l.kind == "enrolled"
            && l.detail
                .as_deref()
                .is_some_and(|d| d.contains("method=gce project=e2e-project"))),
        "{log:?}"
    );
    assert!(meta.identity_requests() >= 1);
    ctl.stop().await;
    meta_task.abort();
    Ok(())
}

/// A full run with the real controller binary (TLS, mutual TLS, bootstrap enrollment, debug
/// logs on both sides, an operator acting through the admin API), then every log line of
/// both programs and every stored row is searched for every token, secret and key.
#[tokio::test]
async fn no_secret_reaches_a_log_line_or_a_stored_row() -> R {
    let env = env().await;
    let dir = env.dir.path();
    let data = dir.join("ctl-bin");
    std::fs::write(dir.join("github.token"), TOKEN)?;
    let config = format!(
        r#"
http_addr = "127.0.0.1:0"
grpc_addr = "127.0.0.1:0"
log_format = "json"
log_level = "debug"
reconcile_interval_secs = 1
[tls]
cert_file = "{tls}/server.pem"
key_file = "{tls}/server-key.pem"
client_ca_file = "{tls}/ca.pem"
[pools."*"]
runner_url = "{github}"
token_file = "{dir}/github.token"
labels = ["self-hosted", "linux", "x64", "e2e"]
enrollment = {{ bootstrap_secret_file = "{dir}/pool.secret" }}
[pools.pool-gh]
labels = ["self-hosted", "linux", "x64", "e2e"]
enrollment = {{ bootstrap_secret_file = "{dir}/pool.secret" }}
[pools.pool-gh.github]
org = "test-org"
api_url = "{api}"
app_id = {app_id}
private_key_file = "{dir}/app.pem"
"#,
        tls = env.tls("").display(),
        github = env.github_url,
        dir = dir.display(),
        api = env.github_api,
        app_id = APP_ID,
    );
    std::fs::write(dir.join("app.pem"), miglet_sim::github::APP_PRIVATE_KEY)?;
    let github_app = env.github.clone().with_app(APP_ID, APP_INSTALLATION);
    std::fs::write(dir.join("controller.toml"), config)?;
    let bin = controller_binary();
    let ctl_log = dir.join("controller.log");
    let addr_file = dir.join("addr.json");
    let mut ctl = tokio::process::Command::new(&bin)
        .arg("serve")
        .arg("--config")
        .arg(dir.join("controller.toml"))
        .arg("--data-dir")
        .arg(&data)
        .arg("--addr-file")
        .arg(&addr_file)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&ctl_log)?)
        .kill_on_drop(true)
        .spawn()?;
    wait_for("the controller's address file", 30, || {
        let f = addr_file.clone();
        async move { f.exists() }
    })
    .await;
    let addrs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&addr_file)?)?;
    let http: SocketAddr = addrs["http_addr"].as_str().ok_or("http_addr")?.parse()?;
    let grpc: SocketAddr = addrs["grpc_addr"].as_str().ok_or("grpc_addr")?.parse()?;

    // An operator token, made with the CLI while the controller runs.
    let out = std::process::Command::new(&bin)
        .args([
            "token",
            "create",
            "--name",
            "alice",
            "--role",
            "admin",
            "--data-dir",
        ])
        .arg(&data)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let operator = String::from_utf8(out.stdout)?.trim().to_owned();
    assert!(operator.starts_with("migop_"));

    env.github.enqueue_job(job("scan", "Succeeded", 1500));
    let mut agent = Agent::spawn(
        &env,
        "vm-scan",
        http,
        Some(grpc),
        &[("MIGLET_LOGGING_LEVEL", "debug")],
    );
    // The operator changes the agent's log level through the admin API (over mutual TLS).
    let client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&std::fs::read(
            env.tls("ca.pem"),
        )?)?])
        .identity(reqwest::Identity::from_pem(
            format!(
                "{}{}",
                std::fs::read_to_string(env.tls("client.pem"))?,
                std::fs::read_to_string(env.tls("client-key.pem"))?
            )
            .as_bytes(),
        )?)
        .timeout(Duration::from_secs(10))
        .build()?;
    let base = format!("https://{http}");
    wait_for("vm-scan known to the controller", 30, || {
        let (client, base, op) = (client.clone(), base.clone(), operator.clone());
        async move {
            client
                .get(format!("{base}/api/v1/admin/vms/vm-scan"))
                .bearer_auth(op)
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 200)
        }
    })
    .await;
    let r = client
        .post(format!("{base}/api/v1/admin/vms/vm-scan/commands"))
        .bearer_auth(&operator)
        .json(&serde_json::json!({"type":"set_log_level","parameters":{"level":"debug"}}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 201);
    assert_eq!(
        agent.wait_exit(60).await,
        Some(0),
        "log:\n{}",
        agent.log_text()
    );
    // Then a VM of a pool whose runners the controller mints with a GitHub App (JIT).
    github_app.enqueue_job(job("scan-jit", "Succeeded", 500));
    let mut jit_agent = Agent::spawn(
        &env,
        "vm-scan-gh",
        http,
        Some(grpc),
        &[
            ("MIGLET_LOGGING_LEVEL", "debug"),
            ("MIGLET_POOL_ID", "pool-gh"),
        ],
    );
    assert_eq!(
        jit_agent.wait_exit(60).await,
        Some(0),
        "log:\n{}",
        jit_agent.log_text()
    );
    assert!(
        github_app
            .rest_calls()
            .iter()
            .any(|(_, p, s)| p.ends_with("/generate-jitconfig") && *s == 201),
        "the JIT runner was minted on GitHub"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ctl.id().ok_or("pid")? as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = tokio::time::timeout(Duration::from_secs(20), ctl.wait()).await??;
    assert!(status.success());

    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let mut secrets: Vec<(String, String)> = vec![
        ("GitHub registration token".into(), TOKEN.into()),
        ("pool bootstrap secret".into(), env.secret.clone()),
        ("operator token".into(), operator.clone()),
        (
            "initial admin token".into(),
            read(data.join("initial-admin-token")).trim().to_owned(),
        ),
        (
            "credential signing key".into(),
            read(data.join("credential.key")).trim().to_owned(),
        ),
        ("a VM credential".into(), "migvm1.".into()),
        ("an operator token".into(), "migop_".into()),
        ("a private key".into(), "PRIVATE KEY".into()),
    ];
    // What the GitHub App pool handled: the App's key, installation tokens (`ghs_`), and the
    // JIT runner config (base64 of a JSON object of the runner's files).
    for line in miglet_sim::github::APP_PRIVATE_KEY
        .lines()
        .filter(|l| !l.starts_with("-----"))
    {
        secrets.push(("a line of the GitHub App key".into(), line.to_owned()));
    }
    secrets.push(("an installation token".into(), "ghs_".into()));
    secrets.push((
        "a JIT runner config".into(),
        "eyIuY3JlZGVudGlhbHMiOiI".into(),
    ));
    for key in ["server-key.pem", "client-key.pem", "ca-key.pem"] {
        for line in read(env.tls(key))
            .lines()
            .filter(|l| !l.starts_with("-----"))
        {
            secrets.push((format!("a line of {key}"), line.to_owned()));
        }
    }
    let ctl_text = read(ctl_log.clone());
    let agent_text = format!("{}\n{}", agent.log_text(), jit_agent.log_text());
    assert!(ctl_text.lines().count() > 20 && ctl_text.contains("\"level\":\"DEBUG\""));
    assert!(agent_text.contains("DEBUG"));
    let rows = dump_sqlite(&data.join("controller.db")).await?;
    assert!(rows.iter().any(|r| r.starts_with("events:")));
    assert!(rows.iter().any(|r| r.starts_with("operator_tokens:")));
    assert!(
        rows.iter()
            .any(|r| r.starts_with("audit_log:") && r.contains("command.enqueue"))
    );
    let places = [
        ("the controller log".to_owned(), ctl_text.as_str()),
        ("the agent log".to_owned(), agent_text.as_str()),
    ]
    .into_iter()
    .chain(rows.iter().map(|r| ("a stored row".to_owned(), r.as_str())));
    if let Some(leak) = miglet_sim::testkit::first_leak(&secrets, places) {
        panic!("{leak}");
    }
    assert_no_token(&env, &agent);
    Ok(())
}

/// Credentials live 4 s here: the agent refreshes them at half-life, a stream opened with an
/// old one is closed at its expiry and reopened with the new one, and a 9 s job runs through
/// all of it with every event stored once and no second enrollment.
#[tokio::test]
async fn short_lived_credentials_are_refreshed_without_losing_anything() -> R {
    let env = env().await;
    let cfg = CtlConfig {
        credential_ttl: Duration::from_secs(4),
        ..env.ctl()
    };
    let mut ctl = Controller::start(&env.dir.path().join("ctl"), &cfg).await;
    env.github.enqueue_job(job("long", "Succeeded", 9000));
    let mut agent = Agent::spawn(&env, "vm-ttl", ctl.http, Some(ctl.grpc), &[]);
    assert_eq!(
        agent.wait_exit(60).await,
        Some(0),
        "log:\n{}",
        agent.log_text()
    );
    let types = ctl.event_types("vm-ttl").await;
    assert_eq!(
        types,
        [
            "vm_started",
            "runner_registered",
            "job_started",
            "job_completed",
            "vm_shutting_down"
        ]
    );
    let log = ctl.app().store().vm_log_for_vm("vm-ttl").await?;
    let enrolled = log.iter().filter(|l| l.kind == "enrolled").count();
    assert_eq!(enrolled, 1, "refreshes, not new enrollments: {log:?}");
    assert!(
        log.iter().any(|l| l.kind == "stream_disconnected"
            && l.detail
                .as_deref()
                .is_some_and(|d| d.contains("credential expired"))),
        "{log:?}"
    );
    assert!(
        log.iter().filter(|l| l.kind == "stream_connected").count() >= 2,
        "{log:?}"
    );
    assert_no_token(&env, &agent);
    ctl.stop().await;
    Ok(())
}

/// An agent with the wrong bootstrap secret gets nowhere, says why, and nothing of it is
/// stored; given the right one it proceeds (the secret file is re-read at each attempt).
#[tokio::test]
async fn wrong_bootstrap_secret_is_refused_and_reported() -> R {
    let env = env().await;
    let mut ctl = Controller::start(&env.dir.path().join("ctl"), &env.ctl()).await;
    let wrong = env.dir.path().join("wrong.secret");
    std::fs::write(&wrong, "not-the-pool-secret-at-all")?;
    let wrong_s = wrong.display().to_string();
    let mut agent = Agent::spawn(
        &env,
        "vm-wrong",
        ctl.http,
        Some(ctl.grpc),
        &[("MIGLET_BOOTSTRAP_SECRET_FILE", &wrong_s)],
    );
    let log = agent.log.clone();
    wait_for("the refusal in the agent log", 30, || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .is_ok_and(|t| t.contains("wrong bootstrap secret for pool"))
        }
    })
    .await;
    assert!(
        agent
            .log_text()
            .contains("does not accept this VM's identity")
    );
    assert!(ctl.app().store().vm_get("vm-wrong").await?.is_none());
    // The secret the agent presented is in no log line, nor in the controller's answer.
    assert!(!agent.log_text().contains("not-the-pool-secret-at-all"));
    std::fs::write(&wrong, &env.secret)?;
    wait_event(ctl.app(), "vm-wrong", "vm_started").await;
    assert!(!agent.log_text().contains(&env.secret));
    agent.child.kill().await?;
    ctl.stop().await;
    Ok(())
}

/// The dashboard in headless Chromium against a controller with live agents: they are
/// listed with their states, a VM's timeline and its charts show, and Drain is acknowledged.
#[tokio::test]
async fn dashboard_in_a_real_browser() -> R {
    tokio::time::timeout(Duration::from_secs(240), dashboard_in_a_real_browser_run())
        .await
        .map_err(|_| "the browser test did not finish within 240 s")?
}

async fn dashboard_in_a_real_browser_run() -> R {
    use fantoccini::Locator;
    let Some(browser) = Browser::open().await? else {
        return Ok(());
    };
    let shots = screenshots()?;
    let env = env().await;
    let webhook_secret = "dashboard-test-webhook-secret-0123";
    let secret_file = env.dir.path().join("webhook.secret");
    std::fs::write(&secret_file, webhook_secret)?;
    let cfg = CtlConfig {
        plain_http: true,
        webhook_secret_file: Some(secret_file),
        ..env.ctl()
    };
    let mut ctl = Controller::start(&env.dir.path().join("ctl"), &cfg).await;
    env.github
        .enqueue_job(job("dashboard demo", "Succeeded", 60_000));
    // A job from GitHub's webhook that no runner here can take (it asks for a GPU): the
    // jobs page lists it, queued, with no pool.
    let hooked = env.github.clone().with_webhook(
        &format!("http://{}/api/v1/github/webhook", ctl.http),
        webhook_secret,
    );
    hooked.enqueue_job(miglet_sim::github::Job {
        id: 8080,
        labels: vec!["self-hosted".into(), "gpu".into()],
        ..job("gpu render", "Succeeded", 1_000)
    });
    let secret = env.dir.path().join("pool.secret").display().to_string();
    let extra = [("MIGLET_BOOTSTRAP_SECRET_FILE", secret.as_str())];
    let mut busy = Agent::spawn_with(
        &env,
        "vm-dash-busy",
        "http",
        ctl.http,
        Some(ctl.grpc),
        &extra,
    );
    wait_event(ctl.app(), "vm-dash-busy", "job_started").await;
    let mut idle = Agent::spawn_with(
        &env,
        "vm-dash-idle",
        "http",
        ctl.http,
        Some(ctl.grpc),
        &extra,
    );
    wait_event(ctl.app(), "vm-dash-idle", "runner_registered").await;
    let token = std::fs::read_to_string(env.dir.path().join("ctl/initial-admin-token"))?;

    let c = &browser.c;
    let result = async {
        let base = format!("http://{}", ctl.http);
        browser.sign_in(&base, &token).await?;
        // Both VMs listed, each with its own state in its own row.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let state_cell = |vm: &str| {
            format!("//table[@id='vms']//tr[.//a[text()='{vm}']]/td[@data-field='state']")
        };
        loop {
            let mut shown = Vec::new();
            for vm in ["vm-dash-busy", "vm-dash-idle"] {
                let text = match c.find(Locator::XPath(&state_cell(vm))).await {
                    Ok(t) => t.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                shown.push(text);
            }
            if shown == ["job_running", "idle"] {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("VM table never showed both VMs' states: {shown:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        std::fs::write(shots.join("dashboard-fleet.png"), c.screenshot().await?)?;
        // A VM's page with its timeline.
        fresh_click(c, Locator::LinkText("vm-dash-idle")).await?;
        let timeline = fresh_text(c, Locator::Css("#timeline")).await?;
        if !(timeline.contains("vm_started")
            && timeline.contains("runner_registered")
            && timeline.contains("enrolled"))
        {
            return Err(format!("timeline incomplete: {timeline}").into());
        }
        let shown_state = fresh_text(c, Locator::Css("dd[data-field=state]")).await?;
        if shown_state != "idle" {
            return Err(format!("VM page shows state {shown_state:?}").into());
        }
        // Its CPU chart has axes with units and a time scale (the page refreshes every 5 s
        // until two heartbeats are in).
        let (ok, labels) = charts_until(c, Duration::from_secs(30), |l| {
            l.contains("time (UTC)") && l.contains("100%") && l.contains("CPU")
        })
        .await?;
        if !ok {
            return Err(format!("no CPU chart with axes: {labels:?}").into());
        }
        std::fs::write(shots.join("dashboard-vm.png"), c.screenshot().await?)?;
        // Drain, confirm, and see it acknowledged.
        fresh_click(c, Locator::Css("#drain")).await?;
        c.accept_alert().await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let text = fresh_text(c, Locator::Css("#command-result"))
                .await
                .unwrap_or_default();
            if text.contains("drain acknowledged") {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("drain not acknowledged in the page: {text:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        std::fs::write(shots.join("dashboard-drained.png"), c.screenshot().await?)?;
        // Event search.
        c.goto(&format!("{base}/dashboard/#/events?type=job_started"))
            .await?;
        let events = fresh_text(c, Locator::Css("#events")).await?;
        if !events.contains("vm-dash-busy") {
            return Err(format!("event search: {events}").into());
        }
        // Jobs from the webhook.
        c.goto(&format!("{base}/dashboard/#/jobs")).await?;
        let jobs = fresh_text(c, Locator::Css("#jobs")).await?;
        if !(jobs.contains("gpu render") && jobs.contains("queued") && jobs.contains("no pool")) {
            return Err(format!("jobs page: {jobs}").into());
        }
        std::fs::write(shots.join("dashboard-jobs.png"), c.screenshot().await?)?;
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    browser.close().await;
    result?;
    let drains: Vec<_> = ctl
        .app()
        .store()
        .commands_for_vm("vm-dash-idle")
        .await?
        .into_iter()
        .filter(|c| c.command_type == "drain")
        .collect();
    assert!(
        drains
            .iter()
            .any(|d| d.state.as_str() == "acknowledged" && d.source.starts_with("operator:"))
    );
    let _ = busy.child.kill().await;
    let _ = idle.child.kill().await;
    ctl.stop().await;
    Ok(())
}

/// A pool whose registrations the controller mints on GitHub with an App (the stand-in): a
/// real `miglet` gets a just-in-time runner config, the runner stand-in connects with it and
/// runs the job GitHub dispatches, and once the VM is done the runner is gone from GitHub's
/// list. The App's key and every token it handed out appear in no log and no stored row.
#[tokio::test]
async fn jit_runner_minted_with_a_github_app_runs_a_job_end_to_end() -> R {
    let env = env().await;
    let github = env.github.clone().with_app(APP_ID, APP_INSTALLATION);
    let cfg = CtlConfig {
        github_app: Some(GitHubMint {
            api_url: env.github_api.clone(),
            mode: mig_controller::github::Mode::Jit,
            pat_file: None,
        }),
        ..env.ctl()
    };
    let mut ctl = Controller::start(&env.dir.path().join("ctl"), &cfg).await;
    github.enqueue_job(job("jit build", "Succeeded", 500));
    let vm = "vm-jit";
    let mut agent = Agent::spawn(&env, vm, ctl.http, Some(ctl.grpc), &[]);
    let code = agent.wait_exit(60).await;
    assert_eq!(code, Some(0), "log:\n{}", agent.log_text());
    let types = ctl.event_types(vm).await;
    assert!(types.contains(&"job_completed".to_owned()), "{types:?}");
    assert_eq!(github.reports().len(), 1);
    assert_eq!(github.reports()[0].result, "Succeeded");
    // One JIT runner, named for the VM's boot, with the pool's labels and ours; it removed
    // itself after its one job, so GitHub lists nothing.
    let runners = github.runners();
    assert_eq!(runners.len(), 1, "{runners:?}");
    assert_eq!(runners[0].name, format!("{vm}-1"));
    assert!(runners[0].labels.contains(&"mig-controller".to_owned()));
    assert!(runners[0].labels.contains(&"e2e".to_owned()));
    assert_eq!(runners[0].status, "deleted");
    assert!(github.listed_runners().is_empty());
    let calls = github.rest_calls();
    assert_eq!(
        calls
            .iter()
            .filter(|(_, p, _)| p.ends_with("/generate-jitconfig"))
            .count(),
        1,
        "{calls:?}"
    );
    // The register_runner went out with a JIT config and is stored without it.
    let cmds = ctl.app().store().commands_for_vm(vm).await?;
    assert_eq!(cmds.len(), 1);
    assert_eq!(cmds[0].state.as_str(), "acknowledged");
    let stored = serde_json::to_string(&cmds[0].parameters)?;
    assert!(
        !stored.contains("encoded") && !stored.contains("ghs_"),
        "{stored}"
    );
    assert!(
        agent
            .log_text()
            .contains("Received register_runner command from controller")
    );
    ctl.stop().await;
    let rows = dump_sqlite(&env.dir.path().join("ctl").join("controller.db")).await?;
    let key_lines: Vec<String> = miglet_sim::github::APP_PRIVATE_KEY
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::to_owned)
        .collect();
    let mut secrets: Vec<(String, String)> = key_lines
        .into_iter()
        .map(|l| ("a line of the App key".to_owned(), l))
        .collect();
    secrets.push(("an installation token".into(), "ghs_".into()));
    let agent_text = agent.log_text();
    let places = std::iter::once(("the agent log".to_owned(), agent_text.as_str()))
        .chain(rows.iter().map(|r| ("a stored row".to_owned(), r.as_str())));
    if let Some(leak) = miglet_sim::testkit::first_leak(&secrets, places) {
        panic!("{leak}");
    }
    Ok(())
}

/// The same with a PAT and registration tokens: the controller mints a registration token,
/// the runner registers with it through `config.sh`, runs its job and removes itself; the
/// PAT and the minted token appear in no log and no stored row.
#[tokio::test]
async fn registration_token_minted_with_a_pat_runs_a_job_end_to_end() -> R {
    let env = env().await;
    let pat = "github_pat_E2ETESTSECRET0123456789";
    let github = env.github.clone().with_pat(pat);
    let pat_file = env.dir.path().join("github-pat");
    std::fs::write(&pat_file, format!("{pat}\n"))?;
    let cfg = CtlConfig {
        github_app: Some(GitHubMint {
            api_url: env.github_api.clone(),
            mode: mig_controller::github::Mode::Token,
            pat_file: Some(pat_file),
        }),
        ..env.ctl()
    };
    let mut ctl = Controller::start(&env.dir.path().join("ctl"), &cfg).await;
    github.enqueue_job(job("pat build", "Succeeded", 500));
    let vm = "vm-pat";
    let mut agent = Agent::spawn(&env, vm, ctl.http, Some(ctl.grpc), &[]);
    let code = agent.wait_exit(60).await;
    assert_eq!(code, Some(0), "log:\n{}", agent.log_text());
    assert_eq!(github.reports().len(), 1);
    let runners = github.runners();
    assert_eq!(runners.len(), 1, "{runners:?}");
    assert_eq!(
        runners[0].status, "deleted",
        "the ephemeral runner removed itself"
    );
    // Named and labelled as this controller's, so that its cleanup can find it.
    assert_eq!(runners[0].name, format!("{vm}-1"));
    assert!(
        runners[0].labels.iter().any(|l| l.starts_with("mig-")),
        "{runners:?}"
    );
    let minted: Vec<_> = github
        .rest_calls()
        .into_iter()
        .filter(|(_, p, s)| p.ends_with("/registration-token") && *s == 201)
        .collect();
    assert_eq!(minted.len(), 1, "{minted:?}");
    assert_eq!(
        github.registrations(),
        1,
        "the runner registered with the minted token"
    );
    ctl.stop().await;
    let rows = dump_sqlite(&env.dir.path().join("ctl").join("controller.db")).await?;
    let secrets = vec![("the PAT".to_owned(), pat.to_owned())];
    let agent_text = agent.log_text();
    let places = std::iter::once(("the agent log".to_owned(), agent_text.as_str()))
        .chain(rows.iter().map(|r| ("a stored row".to_owned(), r.as_str())));
    if let Some(leak) = miglet_sim::testkit::first_leak(&secrets, places) {
        panic!("{leak}");
    }
    Ok(())
}
