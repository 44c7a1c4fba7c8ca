//! The I/O shell around [`Machine`]: one core task owns the state machine and performs its
//! actions; small tasks feed it inputs (stream, HTTP poller, runner supervisor, hook inbox,
//! ticker, signals) and carry its output (the event outbox, heartbeats).
//!
//! ```text
//!  stream ─┐                       ┌─> spool ─> outbox ──HTTP──> controller
//!  poller ─┼─> core (Machine::step)┼─> acks (stream or HTTP)
//!  runner ─┤                       ├─> supervisor (config.sh, Runner.Listener)
//!  hooks ──┤                       └─> snapshot ─> heartbeats (stream or HTTP)
//!  ticks ──┘
//! ```

use crate::auth::Credentials;
use crate::config::Settings;
use crate::health::Sampler;
use crate::hooks::{self, Hooks};
use crate::lock;
use crate::machine::{Action, Input, Machine, PostJobAction, Via};
use crate::outgoing::{Kept, Outgoing};
use crate::runner::{RunnerSettings, Supervisor};
use crate::spool::Spool;
use crate::transport::{
    Backoff, Http, StreamTarget, command_input, grpc_tls, http_client, run_stream,
};
use miglet_proto::command::LogLevel;
use miglet_proto::event::{CurrentJob, HeartbeatReport};
use miglet_proto::json::EventBody;
use miglet_proto::pb::{self, MiGletMessage, mi_glet_message};
use miglet_proto::state::MigletState;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, error, info, warn};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// How long `Finish` waits for the spool to drain before exiting anyway (what is left stays
/// on disk and is sent by the next start).
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Error)]
pub enum AgentError {
    #[error("failed to prepare {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Changes the log filter live.
pub type LogControl = Arc<dyn Fn(LogLevel) + Send + Sync>;

/// How the agent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub code: u8,
    pub post: PostJobAction,
}

/// What heartbeats report, refreshed after every core step.
#[derive(Debug, Clone)]
struct Snapshot {
    state: MigletState,
    runner_state: &'static str,
    runner_configured: bool,
    runner_name: Option<String>,
    labels: Vec<String>,
    job: Option<CurrentJob>,
}

fn snapshot(m: &Machine) -> Snapshot {
    let runner_state = match (m.runner_alive, m.job.is_some()) {
        (true, true) => "running",
        (true, false) => "idle",
        _ => "offline",
    };
    Snapshot {
        state: m.state,
        runner_state,
        runner_configured: m.runner_alive,
        runner_name: m.runner_name.clone(),
        labels: m.labels.clone(),
        job: m.job.as_ref().map(|j| CurrentJob {
            job_id: j.details.job_id.clone().or_else(|| j.name.clone()),
            run_id: j.details.run_id.clone(),
            job_name: j.name.clone(),
            repository: j.details.repository.clone(),
            branch: j.details.branch.clone(),
            commit: j.details.commit.clone(),
            status: Some("running".into()),
            started_at: chrono::DateTime::from_timestamp_millis(j.started_at),
        }),
    }
}

struct Shared {
    settings: Settings,
    http: Http,
    /// Events waiting for the controller: spooled on disk, in memory only if the disk fails.
    spool: Mutex<Outgoing>,
    outbox_wake: Notify,
    stream_out: mpsc::Sender<MiGletMessage>,
    connected: watch::Receiver<bool>,
}

/// The core's time: the controller's, as this VM sees it (see [`crate::clock`]), so that
/// registration expiry is judged right even on a VM whose clock is off.
fn now_ms() -> i64 {
    crate::clock::controller_now_ms()
}

/// Runs the agent until it finishes. `agent_exe` is the `miglet` binary (the hooks call it).
pub async fn run(
    settings: Settings,
    log: LogControl,
    agent_exe: PathBuf,
) -> Result<Outcome, AgentError> {
    let setup = |what: &'static str| {
        move |e: Box<dyn std::error::Error + Send + Sync>| AgentError::Setup { what, source: e }
    };
    std::fs::create_dir_all(&settings.data_dir).map_err(|e| setup("the data dir")(Box::new(e)))?;
    let spool = Spool::open(&settings.data_dir.join("spool"), settings.spool_max_events)
        .map_err(|e| setup("the event spool")(Box::new(e)))?;
    let hooks: Hooks = hooks::install(&settings.data_dir, &agent_exe)
        .map_err(|e| setup("the job hooks")(Box::new(e)))?;
    let client = http_client(&settings.tls, settings.controller_timeout)
        .map_err(|e| setup("the HTTP client")(Box::new(e)))?;
    let grpc_tls = match &settings.controller_grpc_endpoint {
        Some(ep) => grpc_tls(ep, &settings.tls).map_err(|e| setup("gRPC TLS")(Box::new(e)))?,
        None => None,
    };
    let creds = Arc::new(Credentials::new(
        settings.auth.clone(),
        client.clone(),
        &settings.controller_endpoint,
        &settings.vm_id,
        &settings.pool_id,
        &settings.boot_id,
    ));
    let http = Http::new(
        client,
        &settings.controller_endpoint,
        &settings.vm_id,
        creds.clone(),
    );
    let spool = Outgoing::new(spool);
    let pending = spool.len();
    if pending > 0 {
        info!(pending, "Replaying events spooled before the last stop");
    }

    let (core_tx, mut core_rx) = mpsc::channel::<Input>(256);
    let (stream_tx, stream_rx) = mpsc::channel::<MiGletMessage>(64);
    let (connected_tx, connected_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (interval_tx, interval_rx) = watch::channel(settings.heartbeat_interval);
    let heartbeat_now = Arc::new(Notify::new());

    let shared = Arc::new(Shared {
        settings: settings.clone(),
        http,
        spool: Mutex::new(spool),
        outbox_wake: Notify::new(),
        stream_out: stream_tx,
        connected: connected_rx.clone(),
    });
    let mut machine = Machine::new(settings.post_job_action);
    let executed_log = settings.data_dir.join("executed-commands.jsonl");
    machine.restore_executed(read_executed(&executed_log));
    let (snap_tx, snap_rx) = watch::channel(snapshot(&machine));

    let supervisor = Supervisor::new(
        RunnerSettings {
            dir: settings.runner_dir.clone(),
            work_dir: settings.runner_work_dir.clone(),
            user: settings.runner_user.clone(),
            default_name: settings.vm_id.clone(),
            grace: settings.shutdown_grace,
            hooks: hooks.clone(),
        },
        core_tx.clone(),
    );

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(outbox(
        shared.clone(),
        core_tx.clone(),
        stop_rx.clone(),
    )));
    if let Some(endpoint) = settings.controller_grpc_endpoint.clone() {
        let connect = pb::ConnectRequest {
            vm_id: settings.vm_id.clone(),
            pool_id: settings.pool_id.clone(),
            org_id: settings.org_id.clone(),
            version: VERSION.into(),
            boot_id: settings.boot_id.clone(),
        };
        let mut snap = snap_rx.clone();
        let (core, stop) = (core_tx.clone(), stop_rx.clone());
        let stream_creds = creds.clone();
        tasks.push(tokio::spawn(async move {
            // The stream opens right after the vm_started acknowledgment (PROTOCOL.md).
            let acked = snap
                .wait_for(|s| {
                    !matches!(
                        s.state,
                        MigletState::Initializing | MigletState::WaitingForController
                    )
                })
                .await
                .is_ok();
            if acked {
                let target = StreamTarget {
                    endpoint,
                    tls: grpc_tls,
                    creds: stream_creds,
                    connect,
                };
                run_stream(target, core, stream_rx, connected_tx, stop).await;
            }
        }));
    } else {
        info!("gRPC stream disabled: using HTTP polling only");
    }
    {
        let (creds, stop) = (creds.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move { creds.keep_fresh(stop).await }));
    }
    tasks.push(tokio::spawn(poller(
        shared.clone(),
        core_tx.clone(),
        snap_rx.clone(),
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(heartbeats(
        shared.clone(),
        snap_rx.clone(),
        interval_rx,
        heartbeat_now.clone(),
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(hook_inbox(
        hooks.inbox.clone(),
        core_tx.clone(),
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(ticker(core_tx.clone(), stop_rx.clone())));
    if let Some(base) = settings.preemption_watch.clone() {
        tasks.push(tokio::spawn(watch_preemption(
            base,
            core_tx.clone(),
            stop_rx.clone(),
        )));
    }
    tasks.push(tokio::spawn(signals(
        core_tx.clone(),
        supervisor.clone(),
        stop_rx.clone(),
    )));

    let mut outcome = None;
    let mut pending_inputs = vec![Input::Started];
    'core: loop {
        let input = match pending_inputs.pop() {
            Some(i) => i,
            None => match core_rx.recv().await {
                Some(i) => i,
                None => break,
            },
        };
        if !matches!(input, Input::Tick | Input::RunnerLine(_)) {
            debug!(input = ?input_name(&input), state = %machine.state, "Core input");
        }
        let before = machine.state;
        let actions = machine.step(input, now_ms());
        if machine.state != before {
            info!(from = %before, to = %machine.state, "State transition");
        }
        let _ = snap_tx.send(snapshot(&machine));
        for action in actions {
            match action {
                Action::Event { event_type, fields } => {
                    if let Some(unusable) = emit_event(&shared, event_type, fields) {
                        pending_inputs.push(Input::SpoolUnusable(unusable));
                    }
                }
                Action::Ack {
                    id,
                    via,
                    success,
                    message,
                } => {
                    record_executed(&executed_log, &id, success, &message);
                    send_ack(&shared, id, via, success, message);
                }
                Action::Log(line) => info!("{line}"),
                Action::Failed { reason } => error!(
                    %reason,
                    "MIGlet entered the error state and stops (exit code 70): {reason}. The VM takes no job; look at the runner's output above, fix the image or configuration, and replace the VM"
                ),
                Action::StartRunner(params) => supervisor.start(params),
                Action::RestartRunner { after } => supervisor.restart(after),
                Action::StopRunner { force } => supervisor.stop(force),
                Action::SetLogLevel(level) => {
                    log(level);
                    info!(level = level.as_str(), "Log level changed");
                }
                Action::SetHeartbeatInterval(d) => {
                    info!(
                        interval_ms = d.as_millis() as u64,
                        "Heartbeat interval changed"
                    );
                    let _ = interval_tx.send(d);
                }
                Action::SendHeartbeat => heartbeat_now.notify_one(),
                Action::Finish { code, post } => {
                    outcome = Some(Outcome { code, post });
                    break 'core;
                }
            }
        }
    }
    // Let the final heartbeat and acks go out, flush the spool, then stop every task.
    heartbeat_now.notify_one();
    tokio::time::sleep(Duration::from_millis(100)).await;
    flush(&shared).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
    }
    Ok(outcome.unwrap_or(Outcome {
        code: 0,
        post: PostJobAction::Exit,
    }))
}

fn input_name(i: &Input) -> String {
    match i {
        Input::Command { id, parsed, .. } => format!(
            "command {id} ({})",
            parsed
                .as_ref()
                .map(|c| c.type_name())
                .unwrap_or("unreadable")
        ),
        Input::HookStarted(_) => "job-started hook".into(),
        Input::HookCompleted(_) => "job-completed hook".into(),
        other => format!("{other:?}"),
    }
}

/// Queues an event for the controller. Answers why, if this is the event that found the
/// spool unusable (the core then stops taking work).
fn emit_event(
    shared: &Shared,
    event_type: &'static str,
    mut fields: serde_json::Map<String, Value>,
) -> Option<String> {
    let s = &shared.settings;
    if event_type == "vm_started" {
        fields.insert("version".into(), Value::String(VERSION.into()));
        fields.insert(
            "cpu".into(),
            json!(
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            ),
        );
        if let Some(mem) = crate::health::Sampler::default()
            .sample()
            .memory_total_bytes
        {
            fields.insert("memory".into(), json!(mem >> 20));
        }
    }
    let body = EventBody {
        event_type: event_type.into(),
        timestamp: Some(crate::clock::controller_now()),
        vm_id: Some(s.vm_id.clone()),
        pool_id: Some(s.pool_id.clone()),
        org_id: Some(s.org_id.clone()).filter(|o| !o.is_empty()),
        metadata: None,
        event_id: Some(uuid::Uuid::now_v7().to_string()),
        boot_id: Some(s.boot_id.clone()),
        fields,
    };
    let mut out = lock(&shared.spool);
    let was_on_disk = out.in_memory() == 0;
    let unusable = match out.push(body) {
        Kept::OnDisk => {
            debug!(event_type, "Event spooled");
            None
        }
        Kept::InMemory(e) => {
            if was_on_disk {
                error!(
                    event_type,
                    error = %e,
                    spool = %shared.settings.data_dir.join("spool").display(),
                    "The event spool refuses writes: events are kept in memory until it takes them again, and this VM takes no new job (draining). Free disk space or fix the spool directory's permissions; events are lost only if the agent dies before then"
                );
            }
            was_on_disk.then(|| e.to_string())
        }
    };
    if out.dropped > 0 {
        error!(
            dropped = out.dropped,
            "Events dropped: the spool refused writes and the in-memory queue was full"
        );
        out.dropped = 0;
    }
    drop(out);
    shared.outbox_wake.notify_one();
    unusable
}

/// Appends an acknowledged command to the executed-commands record (fsynced: a command must
/// not run twice because the agent restarted).
fn record_executed(path: &std::path::Path, id: &str, success: bool, message: &str) {
    use std::io::Write;
    let line = json!({"id": id, "success": success, "message": message}).to_string();
    let res = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "{line}").and_then(|()| f.sync_data()));
    if let Err(e) = res {
        warn!(error = %e, "Cannot record an executed command");
    }
}

/// The last executed commands recorded before this start.
fn read_executed(path: &std::path::Path) -> Vec<(String, bool, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out: Vec<(String, bool, String)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            Some((
                v["id"].as_str()?.to_owned(),
                v["success"].as_bool()?,
                v["message"].as_str().unwrap_or_default().to_owned(),
            ))
        })
        .collect();
    let keep = crate::machine::REMEMBERED_COMMANDS;
    if out.len() > keep {
        out.drain(..out.len() - keep);
        // Compact the file so it stays bounded.
        let body: String = out
            .iter()
            .map(|(id, ok, msg)| format!("{}\n", json!({"id": id, "success": ok, "message": msg})))
            .collect();
        let _ = std::fs::write(path, body);
    }
    out
}

fn send_ack(shared: &Arc<Shared>, id: String, via: Via, success: bool, message: String) {
    info!(command_id = %id, success, message = %message, "Acknowledging command");
    if via == Via::Stream && *shared.connected.borrow() {
        let msg = MiGletMessage {
            message: Some(mi_glet_message::Message::CommandAck(pb::CommandAck {
                command_id: id.clone(),
                success,
                message: message.clone(),
                result: Default::default(),
            })),
        };
        if shared.stream_out.try_send(msg).is_ok() {
            return;
        }
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        for _ in 0..5 {
            match shared.http.ack(&id, success, &message).await {
                Ok(()) => return,
                Err(e) if e.is_permanent() => {
                    // A base-contract controller has no ack endpoint.
                    debug!(command_id = %id, error = %e, "Controller does not take this ack");
                    return;
                }
                Err(e) => {
                    debug!(command_id = %id, error = %e, "Ack failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        warn!(command_id = %id, "Could not deliver the acknowledgment; the controller will redeliver and get it again");
    });
}

/// Sends spooled events in order, one at a time; an event leaves the spool only once the
/// controller answered 200.
async fn outbox(shared: Arc<Shared>, core: mpsc::Sender<Input>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::of(miglet_proto::backoff::EVENT_RETRY);
    loop {
        let entry = {
            let mut out = lock(&shared.spool);
            if out.in_memory() > 0
                && let Ok(n) = out.settle()
            {
                info!(
                    events = n,
                    "The event spool takes writes again; the events kept in memory are on disk"
                );
            }
            match out.first() {
                Ok(e) => e,
                Err(e) => {
                    error!(error = %e, "Cannot read the spool");
                    None
                }
            }
        };
        let Some(entry) = entry else {
            tokio::select! {
                () = shared.outbox_wake.notified() => continue,
                _ = stop.changed() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        };
        let is_vm_started = entry.body.event_type == "vm_started";
        match shared.http.post_event(&entry.body).await {
            Ok(ack) if is_vm_started && !ack.is_ack() => {
                warn!(message = ?ack.message, "Controller did not acknowledge vm_started; retrying");
            }
            Ok(_) => {
                backoff.reset();
                if let Err(e) = lock(&shared.spool).remove(entry.key) {
                    error!(error = %e, "Cannot remove a delivered event from the spool");
                }
                debug!(event_type = %entry.body.event_type, "Event delivered");
                if is_vm_started {
                    let _ = core.send(Input::VmStartedAcked).await;
                }
                continue;
            }
            Err(e) if e.is_permanent() => {
                error!(event_type = %entry.body.event_type, error = %e, "Controller refused the event for good; set aside in spool/rejected");
                let _ = lock(&shared.spool).reject(entry.key);
                if is_vm_started {
                    // Nothing can proceed without the acknowledgment: keep asking with a fresh one.
                    if let Some(reason) = emit_event(&shared, "vm_started", Default::default()) {
                        let _ = core.send(Input::SpoolUnusable(reason)).await;
                    }
                }
                continue;
            }
            Err(e) if e.is_auth() => {
                warn!(event_type = %entry.body.event_type, error = %e, "The controller does not accept this VM's identity; check the enrollment settings (MIGLET_AUTH, MIGLET_BOOTSTRAP_SECRET_FILE) and the pool's");
            }
            Err(e) => {
                debug!(event_type = %entry.body.event_type, error = %e, "Event not delivered yet");
            }
        }
        let wait = backoff.next_delay();
        if is_vm_started {
            info!(
                retry_in_ms = wait.as_millis() as u64,
                "Waiting for the controller to acknowledge vm_started"
            );
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Waits (bounded) until every spooled event is delivered.
async fn flush(shared: &Shared) {
    let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
    loop {
        let (left, in_memory) = {
            let out = lock(&shared.spool);
            (out.len(), out.in_memory())
        };
        if left == 0 {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            if in_memory > 0 {
                error!(
                    left,
                    in_memory,
                    "Exiting with undelivered events, some of them only in memory (the spool refused them): those are lost"
                );
            } else {
                warn!(
                    left,
                    "Exiting with undelivered events; they stay spooled for the next start"
                );
            }
            return;
        }
        shared.outbox_wake.notify_one();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `GET .../commands` while the agent takes commands and the stream is down.
async fn poller(
    shared: Arc<Shared>,
    core: mpsc::Sender<Input>,
    snap: watch::Receiver<Snapshot>,
    mut stop: watch::Receiver<bool>,
) {
    let mut first = true;
    loop {
        let wait = if first {
            Duration::from_secs(1)
        } else {
            shared.settings.poll_interval
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        let state = snap.borrow().state;
        let takes_commands = !matches!(
            state,
            MigletState::Initializing | MigletState::WaitingForController
        );
        if !takes_commands || *shared.connected.borrow() {
            continue;
        }
        first = false;
        match shared.http.poll_commands().await {
            Ok(commands) => {
                for c in &commands {
                    if c.command_type == "register_runner" {
                        debug!(command_id = %c.id, "Received command from controller over HTTP");
                    }
                    if core.send(command_input(c, Via::Http)).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => debug!(error = %e, "Command poll failed"),
        }
    }
}

/// Heartbeats on the interval and on demand (every state change), over the stream when it is
/// up, else over HTTP. A heartbeat that cannot be sent is dropped, never queued.
async fn heartbeats(
    shared: Arc<Shared>,
    snap: watch::Receiver<Snapshot>,
    mut interval: watch::Receiver<Duration>,
    now: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut sampler = Sampler::default();
    let _ = sampler.sample();
    loop {
        let period = *interval.borrow();
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = now.notified() => {}
            _ = interval.changed() => continue,
            _ = stop.changed() => return,
        }
        let s = snap.borrow().clone();
        if matches!(
            s.state,
            MigletState::Initializing | MigletState::WaitingForController
        ) {
            // The boot flow: nothing but vm_started until the controller acknowledged it.
            continue;
        }
        let cfg = &shared.settings;
        let report = HeartbeatReport {
            vm_id: None,
            timestamp: Some(crate::clock::controller_now()),
            pool_id: Some(cfg.pool_id.clone()),
            org_id: Some(cfg.org_id.clone()).filter(|o| !o.is_empty()),
            boot_id: Some(cfg.boot_id.clone()),
            miglet_state: Some(s.state.as_str().into()),
            runner_state: Some(s.runner_state.into()),
            runner_configured: Some(s.runner_configured),
            runner_name: s.runner_name.clone(),
            runner_labels: s.labels.clone(),
            health: sampler.sample(),
            current_job: s.job.clone(),
        };
        if *shared.connected.borrow() {
            let msg = MiGletMessage {
                message: Some(mi_glet_message::Message::Heartbeat(
                    report.to_pb(&cfg.vm_id),
                )),
            };
            if shared.stream_out.try_send(msg).is_ok() {
                continue;
            }
        }
        if let Err(e) = shared
            .http
            .post_heartbeat(&report.to_json(&cfg.vm_id))
            .await
        {
            debug!(error = %e, "Heartbeat dropped");
        }
    }
}

async fn hook_inbox(inbox: PathBuf, core: mpsc::Sender<Input>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => return,
        }
        for report in hooks::drain_inbox(&inbox) {
            let input = if report.kind == hooks::STARTED {
                Input::HookStarted(report.details())
            } else {
                Input::HookCompleted(report.details())
            };
            if core.send(input).await.is_err() {
                return;
            }
        }
    }
}

/// Polls GCE metadata `instance/preempted` every 5 s; `TRUE` drains the agent at once
/// (GCE gives a preempted VM about 30 s).
pub async fn watch_preemption(
    base: String,
    core: mpsc::Sender<Input>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(client) = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
    else {
        return;
    };
    let url = format!(
        "{}/computeMetadata/v1/instance/preempted",
        base.trim_end_matches('/')
    );
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.changed() => return,
        }
        let answer = match client
            .get(&url)
            .header("Metadata-Flavor", "Google")
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
            _ => continue,
        };
        if answer.trim().eq_ignore_ascii_case("TRUE") {
            warn!("GCE reports this VM preempted: draining");
            let _ = core.send(Input::Preempted).await;
            return;
        }
    }
}

async fn ticker(core: mpsc::Sender<Input>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
        if core.send(Input::Tick).await.is_err() {
            return;
        }
    }
}

/// SIGTERM/SIGINT take the `shutdown` path; a second signal kills the runner at once.
async fn signals(
    core: mpsc::Sender<Input>,
    supervisor: Arc<Supervisor>,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("Cannot watch SIGTERM/SIGINT");
        return;
    };
    let mut seen = 0;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = stop.changed() => return,
        }
        seen += 1;
        if seen == 1 {
            info!("Stop signal received: shutting down gracefully");
            let _ = core.send(Input::Signal).await;
        } else {
            warn!("Second stop signal: stopping the runner now");
            supervisor.stop(true);
        }
    }
}
