//! `miglet-loadgen`: simulates a fleet of MIGlet agents against a real controller on
//! loopback and reports what the controller sustained.
//!
//! Each simulated agent enrolls with the pool's bootstrap secret, announces `vm_started`
//! over HTTP, then either opens the gRPC stream (most) or polls over HTTP (`--http-share`),
//! acknowledges `register_runner` and every other command, and heartbeats every
//! `--heartbeat-secs`. Meanwhile job events are posted at `--events-per-sec` across the
//! fleet and `set_log_level` commands are queued through the admin API at
//! `--commands-per-sec`; the time from the enqueue call to the agent receiving the command is
//! measured. With `--spawn-controller` (the default when no `--http` is given) it starts the
//! `mig-controller` binary next to its own, on loopback with port 0, and samples its CPU and
//! RSS from /proc. Runs are bounded by `--duration-secs`.

use anyhow::{Context, bail};
use clap::Parser;
use miglet_proto::pb::command_service_client::CommandServiceClient;
use miglet_proto::pb::{self, MiGletMessage, controller_message, mi_glet_message};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Debug, Parser)]
#[command(
    name = "miglet-loadgen",
    about = "Load a MIG controller with simulated agents"
)]
struct Args {
    /// Simulated agents.
    #[arg(long, default_value_t = 200)]
    agents: usize,
    /// Share of agents that poll over HTTP instead of streaming (0 to 1).
    #[arg(long, default_value_t = 0.1)]
    http_share: f64,
    #[arg(long, default_value_t = 10)]
    heartbeat_secs: u64,
    /// Job events per second across the fleet.
    #[arg(long, default_value_t = 50.0)]
    events_per_sec: f64,
    /// Commands queued per second through the admin API.
    #[arg(long, default_value_t = 5.0)]
    commands_per_sec: f64,
    /// Measured window after every agent is up.
    #[arg(long, default_value_t = 30)]
    duration_secs: u64,
    /// Controller HTTP base URL (then also --grpc, --secret-file, --admin-token-file).
    #[arg(long)]
    http: Option<String>,
    #[arg(long)]
    grpc: Option<String>,
    #[arg(long)]
    secret_file: Option<PathBuf>,
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// PID of the controller, for CPU and RSS figures.
    #[arg(long)]
    controller_pid: Option<u32>,
    /// The mig-controller binary to start [default: next to this one].
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    #[arg(long, default_value = "loadgen")]
    pool: String,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Default)]
struct Counters {
    heartbeats: AtomicU64,
    heartbeat_errors: AtomicU64,
    events: AtomicU64,
    event_errors: AtomicU64,
    commands_received: AtomicU64,
    enqueue_errors: AtomicU64,
    agent_errors: AtomicU64,
    streams_up: AtomicU64,
    http_agents_up: AtomicU64,
}

#[derive(Default)]
struct Timings {
    /// Command id -> when the enqueue call was made.
    enqueued: HashMap<String, Instant>,
    /// Command id -> when an agent received it.
    received: HashMap<String, Instant>,
    /// vm_started sent -> register_runner received, ms.
    registration_ms: Vec<f64>,
}

struct Shared {
    args: Args,
    http: reqwest::Client,
    base: String,
    grpc: String,
    secret: String,
    counters: Counters,
    timings: Mutex<Timings>,
    creds: Mutex<Vec<(String, String)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn enroll(s: &Shared, vm: &str) -> anyhow::Result<String> {
    let r: Value = s
        .http
        .post(format!("{}/api/v1/enroll", s.base))
        .json(&json!({"vm_id": vm, "pool_id": s.args.pool, "method": "bootstrap", "bootstrap_secret": s.secret}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    r["credential"]
        .as_str()
        .map(str::to_owned)
        .context("no credential in the enrollment answer")
}

async fn post(s: &Shared, cred: &str, vm: &str, what: &str, body: Value) -> anyhow::Result<Value> {
    Ok(s.http
        .post(format!("{}/api/v1/vms/{vm}/{what}", s.base))
        .bearer_auth(cred)
        .json(&body)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?)
}

fn heartbeat_msg(vm: &str) -> MiGletMessage {
    MiGletMessage {
        message: Some(mi_glet_message::Message::Heartbeat(pb::Heartbeat {
            vm_id: vm.into(),
            miglet_state: "idle".into(),
            timestamp: chrono::Utc::now().timestamp(),
            ..Default::default()
        })),
    }
}

fn note_command(s: &Shared, id: &str, started: Instant) {
    s.counters.commands_received.fetch_add(1, Ordering::Relaxed);
    let mut t = lock(&s.timings);
    if id.starts_with("register-") {
        t.registration_ms
            .push(started.elapsed().as_secs_f64() * 1000.0);
    } else {
        t.received.entry(id.to_owned()).or_insert_with(Instant::now);
    }
}

/// One simulated agent, until `stop`.
async fn agent(
    s: Arc<Shared>,
    vm: String,
    over_http: bool,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let cred = enroll(&s, &vm).await?;
    lock(&s.creds).push((vm.clone(), cred.clone()));
    let started = Instant::now();
    post(&s, &cred, &vm, "events", json!({"type":"vm_started","vm_id":vm,"pool_id":s.args.pool,"event_id":format!("{vm}-start")})).await?;
    let every = Duration::from_secs(s.args.heartbeat_secs.max(1));
    let offset = Duration::from_millis(rand_ms(every.as_millis() as u64));
    if over_http {
        s.counters.http_agents_up.fetch_add(1, Ordering::Relaxed);
        let mut next_beat = tokio::time::Instant::now() + offset;
        let mut poll = tokio::time::interval(Duration::from_secs(1));
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            tokio::select! {
                _ = poll.tick() => {
                    let r = s.http.get(format!("{}/api/v1/vms/{vm}/commands", s.base)).bearer_auth(&cred).send().await;
                    let body: Value = match r { Ok(r) => r.json().await.unwrap_or(Value::Null), Err(_) => Value::Null };
                    for c in body["commands"].as_array().cloned().unwrap_or_default() {
                        let id = c["id"].as_str().unwrap_or_default().to_owned();
                        note_command(&s, &id, started);
                        let _ = post(&s, &cred, &vm, &format!("commands/{id}/ack"), json!({"success": true})).await;
                    }
                }
                () = tokio::time::sleep_until(next_beat) => {
                    next_beat += every;
                    match post(&s, &cred, &vm, "heartbeat", json!({"type":"job_heartbeat","vm_id":vm,"miglet_state":"idle"})).await {
                        Ok(_) => s.counters.heartbeats.fetch_add(1, Ordering::Relaxed),
                        Err(_) => s.counters.heartbeat_errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
        }
    }
    let channel = tonic::transport::Endpoint::from_shared(s.grpc.clone())?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let (tx, rx) = mpsc::channel::<MiGletMessage>(16);
    tx.send(MiGletMessage {
        message: Some(mi_glet_message::Message::Connect(pb::ConnectRequest {
            vm_id: vm.clone(),
            pool_id: s.args.pool.clone(),
            version: "loadgen".into(),
            ..Default::default()
        })),
    })
    .await?;
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {cred}").parse()?);
    let mut inbound = CommandServiceClient::new(channel)
        .stream_commands(req)
        .await?
        .into_inner();
    s.counters.streams_up.fetch_add(1, Ordering::Relaxed);
    let mut next_beat = tokio::time::Instant::now() + offset;
    let mut stop = stop;
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(()),
            () = tokio::time::sleep_until(next_beat) => {
                next_beat += every;
                if tx.send(heartbeat_msg(&vm)).await.is_ok() {
                    s.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
                } else {
                    s.counters.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            m = inbound.message() => match m {
                Ok(Some(pb::ControllerMessage { message: Some(controller_message::Message::Command(c)) })) => {
                    note_command(&s, &c.id, started);
                    let ack = MiGletMessage { message: Some(mi_glet_message::Message::CommandAck(pb::CommandAck {
                        command_id: c.id, success: true, message: "ok".into(), result: Default::default() })) };
                    let _ = tx.send(ack).await;
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("stream closed by the controller"),
                Err(st) => bail!("stream failed: {st}"),
            },
        }
    }
}

fn rand_ms(max: u64) -> u64 {
    // Spread start times without a dependency: the low bits of the clock are random enough.
    let n = chrono::Utc::now().timestamp_subsec_nanos() as u64;
    if max == 0 { 0 } else { n % max }
}

/// Posts job events at the configured rate, round-robin over enrolled agents.
async fn events(s: Arc<Shared>, stop: tokio::sync::watch::Receiver<bool>) {
    if s.args.events_per_sec <= 0.0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / s.args.events_per_sec));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut n = 0usize;
    let mut inflight = tokio::task::JoinSet::new();
    while !*stop.borrow() {
        tick.tick().await;
        let pick = {
            let c = lock(&s.creds);
            if c.is_empty() {
                None
            } else {
                Some(c[n % c.len()].clone())
            }
        };
        n += 1;
        let Some((vm, cred)) = pick else { continue };
        let s2 = s.clone();
        let ty = if n.is_multiple_of(2) {
            "job_started"
        } else {
            "job_completed"
        };
        inflight.spawn(async move {
            let body = json!({"type": ty, "vm_id": vm, "run_id": format!("{n}"), "event_id": format!("{vm}-{n}")});
            match post(&s2, &cred, &vm, "events", body).await {
                Ok(_) => s2.counters.events.fetch_add(1, Ordering::Relaxed),
                Err(_) => s2.counters.event_errors.fetch_add(1, Ordering::Relaxed),
            };
        });
        while inflight.len() > 256 {
            let _ = inflight.join_next().await;
        }
    }
    while inflight.join_next().await.is_some() {}
}

/// Queues `set_log_level` for random agents at the configured rate.
async fn commands(s: Arc<Shared>, token: String, stop: tokio::sync::watch::Receiver<bool>) {
    if s.args.commands_per_sec <= 0.0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / s.args.commands_per_sec));
    let mut n = 0usize;
    while !*stop.borrow() {
        tick.tick().await;
        let vm = {
            let c = lock(&s.creds);
            if c.is_empty() {
                continue;
            }
            c[(n * 7919) % c.len()].0.clone()
        };
        n += 1;
        let t0 = Instant::now();
        let r = s
            .http
            .post(format!("{}/api/v1/admin/vms/{vm}/commands", s.base))
            .bearer_auth(&token)
            .json(&json!({"type":"set_log_level","parameters":{"level":"info"}}))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => {
                let v: Value = r.json().await.unwrap_or(Value::Null);
                if let Some(id) = v["command"]["id"].as_str() {
                    lock(&s.timings).enqueued.insert(id.to_owned(), t0);
                }
            }
            _ => {
                s.counters.enqueue_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn proc_stat(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((ticks, rss_kb))
}

struct Spawned {
    child: tokio::process::Child,
    /// Removed after the run.
    dir: PathBuf,
}

async fn spawn_controller(
    bin: PathBuf,
    dir: PathBuf,
) -> anyhow::Result<(Spawned, String, String, u32)> {
    std::fs::create_dir_all(&dir)?;
    let addr_file = dir.join("addr.json");
    let child = tokio::process::Command::new(&bin)
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--rate-limit-per-addr",
            "0",
            "--rate-limit-per-vm",
            "0",
            "--log-level",
            "warn",
        ])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--addr-file")
        .arg(&addr_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("controller.log"))?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let pid = child.id().context("controller pid")?;
    for _ in 0..200 {
        if addr_file.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let addrs: Value = serde_json::from_str(
        &std::fs::read_to_string(&addr_file).context("the controller did not start")?,
    )?;
    let http = format!(
        "http://{}",
        addrs["http_addr"].as_str().context("http_addr")?
    );
    let grpc = format!(
        "http://{}",
        addrs["grpc_addr"].as_str().context("grpc_addr")?
    );
    Ok((Spawned { child, dir }, http, grpc, pid))
}

#[allow(clippy::print_stdout)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    let mut spawned = None;
    let (base, grpc, secret_file, token_file) = match (&args.http, &args.grpc) {
        (Some(h), Some(g)) => (
            h.clone(),
            g.clone(),
            args.secret_file
                .clone()
                .context("--secret-file is needed with --http")?,
            args.admin_token_file
                .clone()
                .context("--admin-token-file is needed with --http")?,
        ),
        (None, None) => {
            let bin = match &args.controller_bin {
                Some(b) => b.clone(),
                None => std::env::current_exe()?.with_file_name("mig-controller"),
            };
            let dir = std::env::temp_dir().join(format!("miglet-loadgen-{}", std::process::id()));
            let (sp, h, g, pid) = spawn_controller(bin, dir.clone()).await?;
            args.controller_pid = Some(pid);
            spawned = Some(sp);
            (
                h,
                g,
                dir.join("data/dev-bootstrap-secret"),
                dir.join("data/initial-admin-token"),
            )
        }
        _ => bail!("give both --http and --grpc, or neither (to start a controller)"),
    };
    let secret = std::fs::read_to_string(&secret_file)
        .with_context(|| format!("{}", secret_file.display()))?
        .trim()
        .to_owned();
    let token = std::fs::read_to_string(&token_file)
        .with_context(|| format!("{}", token_file.display()))?
        .trim()
        .to_owned();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(512)
        .build()?;
    let s = Arc::new(Shared {
        http,
        base,
        grpc,
        secret,
        counters: Counters::default(),
        timings: Mutex::new(Timings::default()),
        creds: Mutex::new(Vec::new()),
        args,
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let n = s.args.agents;
    let http_agents = (n as f64 * s.args.http_share.clamp(0.0, 1.0)).round() as usize;
    eprintln!("starting {n} agents ({http_agents} over HTTP polling) ...");
    let ramp = Instant::now();
    let mut agents = tokio::task::JoinSet::new();
    for i in 0..n {
        let s2 = s.clone();
        let stop = stop_rx.clone();
        agents.spawn(async move {
            if let Err(e) = agent(s2.clone(), format!("lg-{i:06}"), i < http_agents, stop).await {
                s2.counters.agent_errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("agent lg-{i:06}: {e:#}");
            }
        });
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while (s.counters.streams_up.load(Ordering::Relaxed)
        + s.counters.http_agents_up.load(Ordering::Relaxed))
        < n as u64
        && s.counters.agent_errors.load(Ordering::Relaxed) == 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ramp_secs = ramp.elapsed().as_secs_f64();
    eprintln!(
        "agents up in {ramp_secs:.1} s; measuring for {} s ...",
        s.args.duration_secs
    );
    let hb0 = s.counters.heartbeats.load(Ordering::Relaxed);
    let ev0 = s.counters.events.load(Ordering::Relaxed);
    let cpu0 = s.args.controller_pid.and_then(proc_stat);
    let t0 = Instant::now();
    let ev_task = tokio::spawn(events(s.clone(), stop_rx.clone()));
    let cmd_task = tokio::spawn(commands(s.clone(), token, stop_rx.clone()));
    let mut peak_rss = 0u64;
    while t0.elapsed() < Duration::from_secs(s.args.duration_secs) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some((_, rss)) = s.args.controller_pid.and_then(proc_stat) {
            peak_rss = peak_rss.max(rss);
        }
    }
    let window = t0.elapsed().as_secs_f64();
    let cpu1 = s.args.controller_pid.and_then(proc_stat);
    let hb = s.counters.heartbeats.load(Ordering::Relaxed) - hb0;
    let ev = s.counters.events.load(Ordering::Relaxed) - ev0;
    // Let the last commands arrive, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = ev_task.await;
        let _ = cmd_task.await;
        while agents.join_next().await.is_some() {}
    })
    .await;
    let (cmd_ms, lost_commands, reg_ms, enqueued) = {
        let t = lock(&s.timings);
        let mut cmd_ms: Vec<f64> = t
            .enqueued
            .iter()
            .filter_map(|(id, at)| {
                t.received
                    .get(id)
                    .map(|r| r.saturating_duration_since(*at).as_secs_f64() * 1000.0)
            })
            .collect();
        let lost = t
            .enqueued
            .keys()
            .filter(|id| !t.received.contains_key(*id))
            .count();
        cmd_ms.sort_by(f64::total_cmp);
        let mut reg_ms = t.registration_ms.clone();
        reg_ms.sort_by(f64::total_cmp);
        (cmd_ms, lost, reg_ms, t.enqueued.len())
    };
    let tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let cpu = match (cpu0, cpu1) {
        (Some((a, _)), Some((b, _))) => Some((b - a) as f64 / tck / window * 100.0),
        _ => None,
    };
    let c = &s.counters;
    let report = json!({
        "agents": n,
        "agents_connected": c.streams_up.load(Ordering::Relaxed) + c.http_agents_up.load(Ordering::Relaxed),
        "streams": c.streams_up.load(Ordering::Relaxed),
        "http_agents": c.http_agents_up.load(Ordering::Relaxed),
        "ramp_secs": ramp_secs,
        "window_secs": window,
        "heartbeats_per_sec": hb as f64 / window,
        "events_per_sec": ev as f64 / window,
        "commands_enqueued": enqueued,
        "commands_not_received": lost_commands,
        "command_latency_ms": {"p50": percentile(&cmd_ms, 0.5), "p99": percentile(&cmd_ms, 0.99), "max": cmd_ms.last().copied().unwrap_or(f64::NAN)},
        "registration_latency_ms": {"p50": percentile(&reg_ms, 0.5), "p99": percentile(&reg_ms, 0.99), "n": reg_ms.len()},
        "errors": {"agents": c.agent_errors.load(Ordering::Relaxed), "heartbeats": c.heartbeat_errors.load(Ordering::Relaxed),
                   "events": c.event_errors.load(Ordering::Relaxed), "enqueue": c.enqueue_errors.load(Ordering::Relaxed)},
        "controller": {"cpu_percent_of_one_core": cpu, "peak_rss_mib": peak_rss as f64 / 1024.0},
    });
    println!(
        "{:<44} {} of {} ({} + {})",
        "agents connected (streams + HTTP)",
        report["agents_connected"],
        n,
        report["streams"],
        report["http_agents"]
    );
    println!(
        "{:<44} {:.1} s",
        "ramp-up (enroll, vm_started, connect)", ramp_secs
    );
    println!(
        "{:<44} {:.1}",
        "heartbeats/s sent and accepted",
        report["heartbeats_per_sec"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<44} {:.1}",
        "events/s accepted",
        report["events_per_sec"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<44} p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} commands, {} not received)",
        "command enqueue-to-receipt",
        percentile(&cmd_ms, 0.5),
        percentile(&cmd_ms, 0.99),
        cmd_ms.last().copied().unwrap_or(f64::NAN),
        enqueued,
        lost_commands
    );
    println!(
        "{:<44} p50 {:.1} ms, p99 {:.1} ms ({} VMs)",
        "vm_started-to-register_runner",
        percentile(&reg_ms, 0.5),
        percentile(&reg_ms, 0.99),
        reg_ms.len()
    );
    println!(
        "{:<44} {}",
        "errors (agents, heartbeats, events, enqueue)", report["errors"]
    );
    println!(
        "{:<44} CPU {}, peak RSS {:.1} MiB",
        "controller",
        cpu.map_or("n/a".into(), |c| format!("{c:.1} % of one core")),
        peak_rss as f64 / 1024.0
    );
    if let Some(path) = &s.args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    if let Some(mut sp) = spawned {
        let _ = sp.child.kill().await;
        let _ = sp.child.wait().await;
        let _ = std::fs::remove_dir_all(&sp.dir);
    }
    Ok(())
}
