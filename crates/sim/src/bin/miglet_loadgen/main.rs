//! `miglet-loadgen`: simulates a fleet of MIGlet agents against a real controller on
//! loopback and reports what the controller sustained, next to baselines measured in the same
//! run on the same machine.
//!
//! A run has three parts:
//! 1. loopback TCP round-trip time;
//! 2. the transport baseline: the same fleet, driven the same way, against a bare tonic echo
//!    server speaking the controller's service (a child process, like the controller);
//! 3. the controller: it is started next to this binary (or given with `--http`/`--grpc`),
//!    the agents enroll, announce `vm_started`, stream (or poll over HTTP), heartbeat, send
//!    job events and acknowledge commands queued through the admin API; agents also join
//!    during the measured window, which times `vm_started`-to-`register_runner` on a loaded
//!    fleet.
//!
//! Every figure is printed as a table and can be written as JSON (`--json`). Runs are bounded
//! in time and count and only use loopback.

mod echo;

use anyhow::{Context, bail};
use clap::Parser;
use miglet_sim::fleet::{AgentSpec, Conn, Fleet, Target, Via, lock};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};

#[derive(Debug, Parser)]
#[command(
    name = "miglet-loadgen",
    about = "Load a MIG controller with simulated agents"
)]
struct Args {
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Share of agents that poll over HTTP instead of streaming (0 to 1).
    #[arg(long, default_value_t = 0.05)]
    http_share: f64,
    #[arg(long, default_value_t = 10)]
    heartbeat_secs: u64,
    /// How often HTTP agents poll for commands (the agent's default is 5 s).
    #[arg(long, default_value_t = 5)]
    poll_secs: u64,
    /// Job events per second across the fleet.
    #[arg(long, default_value_t = 100.0)]
    events_per_sec: f64,
    /// Commands queued per second through the admin API.
    #[arg(long, default_value_t = 10.0)]
    commands_per_sec: f64,
    /// New agents per second joining the loaded fleet during the measured window.
    #[arg(long, default_value_t = 2.0)]
    joins_per_sec: f64,
    /// Measured window after every agent is up.
    #[arg(long, default_value_t = 30)]
    duration_secs: u64,
    /// Agents sharing one HTTP/2 connection [default: 1, more only if the open-file limit
    /// cannot hold one connection per agent].
    #[arg(long)]
    agents_per_connection: Option<usize>,
    /// Skip the echo-server baseline.
    #[arg(long)]
    no_baseline: bool,
    /// Measured window of the baseline [default: the smaller of --duration-secs and 20].
    #[arg(long)]
    baseline_secs: Option<u64>,
    /// Controller HTTP base URL (then also --grpc, --secret-file, --admin-token-file).
    #[arg(long)]
    http: Option<String>,
    #[arg(long)]
    grpc: Option<String>,
    #[arg(long)]
    secret_file: Option<PathBuf>,
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// The controller's /metrics URL, to count what it stored.
    #[arg(long)]
    metrics_url: Option<String>,
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
    /// Internal: serve the echo baseline, writing its address to this file.
    #[arg(long, hide = true)]
    serve_echo: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Figures

/// p50, p99 and max of `xs` (sorted here), in the unit given.
fn lat(mut xs: Vec<f64>) -> Value {
    xs.sort_by(f64::total_cmp);
    json!({
        "n": xs.len(),
        "p50": pct(&xs, 0.50),
        "p99": pct(&xs, 0.99),
        "max": xs.last().copied(),
    })
}

fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i.min(sorted.len() - 1)).copied()
}

/// CPU ticks (user + system) and RSS in KiB of a process.
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

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// Raises this process's open-file limit to its hard limit; answers the limit now in force.
fn raise_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// Sums the samples of a counter family in a Prometheus/OpenMetrics text exposition.
fn metric_sum(text: &str, family: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(family) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// The database's size on disk: main file and write-ahead log.
fn db_bytes(data: &Path) -> u64 {
    file_len(&data.join("controller.db")) + file_len(&data.join("controller.db-wal"))
}

// ---------------------------------------------------------------------------------------------
// Child processes

struct Child {
    child: tokio::process::Child,
    pid: u32,
    /// Removed after the run.
    dir: PathBuf,
}

impl Child {
    /// SIGTERM, then wait (bounded); kill if it does not stop.
    async fn stop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
            let _ = self.child.wait().await;
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn wait_for_file(path: &Path, child: &mut tokio::process::Child) -> anyhow::Result<Value> {
    for _ in 0..600 {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str::<Value>(&text)
        {
            return Ok(v);
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("the child exited ({status}) before it listened");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{} did not appear within 30 s", path.display())
}

async fn spawn_controller(bin: &Path, dir: PathBuf) -> anyhow::Result<(Child, Value)> {
    std::fs::create_dir_all(&dir)?;
    let addr_file = dir.join("addr.json");
    // Every simulated agent connects from 127.0.0.1, and this sandbox's open-file limit
    // (20,000) is what the 20,000-agent scenario needs: the per-address cap (a NAT'd
    // fleet's 4,096) and the total kept below the limit would refuse the fleet being
    // measured. Past the real limit the controller backs off accepting, as before the caps.
    let config = dir.join("loadgen.toml");
    std::fs::write(
        &config,
        "[limits]\nmax_connections = 100000\nmax_connections_per_addr = 100000\n",
    )?;
    let mut child = tokio::process::Command::new(bin)
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
        ])
        .arg("--config")
        .arg(&config)
        .args(["--metrics-addr", "127.0.0.1:0", "--log-level", "warn"])
        // Load from one address is the point here; the abuse limits would refuse it.
        .args(["--rate-limit-per-addr", "0", "--rate-limit-per-vm", "0"])
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
    let addrs = wait_for_file(&addr_file, &mut child)
        .await
        .with_context(|| format!("the controller did not start; see {}", dir.display()))?;
    Ok((Child { child, pid, dir }, addrs))
}

async fn spawn_echo(dir: PathBuf) -> anyhow::Result<(Child, String)> {
    std::fs::create_dir_all(&dir)?;
    let addr_file = dir.join("echo-addr.json");
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--serve-echo")
        .arg(&addr_file)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the echo server")?;
    let pid = child.id().context("echo pid")?;
    let addrs = wait_for_file(&addr_file, &mut child).await?;
    let grpc = format!(
        "http://{}",
        addrs["grpc_addr"].as_str().context("grpc_addr")?
    );
    Ok((Child { child, pid, dir }, grpc))
}

// ---------------------------------------------------------------------------------------------
// One measured phase

struct Phase {
    agents: usize,
    http_agents: usize,
    joins_per_sec: f64,
    window: Duration,
    events_per_sec: f64,
    commands_per_sec: f64,
    server_pid: Option<u32>,
}

async fn run_phase(f: Arc<Fleet>, p: &Phase, label: &str) -> anyhow::Result<Value> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let n = p.agents;
    eprintln!(
        "[{label}] starting {n} agents ({} polling over HTTP, {} per connection) ...",
        p.http_agents, f.per_connection
    );
    let ramp = Instant::now();
    let mut agents = tokio::task::JoinSet::new();
    let start = |agents: &mut tokio::task::JoinSet<()>, spec: AgentSpec| {
        let f = f.clone();
        let stop = stop_rx.clone();
        agents.spawn(async move {
            let vm = spec.vm.clone();
            if let Err(e) = f.clone().agent(spec, stop).await
                && f.counters.agent_errors.fetch_add(1, Ordering::Relaxed) < 10
            {
                eprintln!("agent {vm}: {e:#}");
            }
        });
    };
    // Pollers first so the stream agents fill whole connections.
    let mut stream_index = 0usize;
    for i in 0..n {
        let over_http = i < p.http_agents;
        let conn = if over_http {
            Conn::Own
        } else {
            stream_index += 1;
            Conn::Shared((stream_index - 1) / f.per_connection)
        };
        start(
            &mut agents,
            AgentSpec {
                vm: format!("lg-{i:06}"),
                over_http,
                conn,
                joiner: false,
            },
        );
        if i % 250 == 249 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let ramp_deadline = Instant::now() + Duration::from_secs(60 + n as u64 / 50);
    let up = |f: &Fleet| {
        f.counters.streams_up.load(Ordering::Relaxed)
            + f.counters.http_agents_up.load(Ordering::Relaxed)
    };
    while up(&f) < n as u64
        && f.counters.agent_errors.load(Ordering::Relaxed) == 0
        && Instant::now() < ramp_deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ramp_secs = ramp.elapsed().as_secs_f64();
    let connected = up(&f);
    eprintln!(
        "[{label}] {connected} agents up in {ramp_secs:.1} s; measuring for {} s ...",
        p.window.as_secs()
    );

    let c = &f.counters;
    let hb0 = c.heartbeats_sent.load(Ordering::Relaxed);
    let ev0 = c.events_accepted.load(Ordering::Relaxed);
    let server0 = p.server_pid.and_then(proc_stat);
    let self0 = proc_stat(std::process::id());
    let t0 = Instant::now();
    let (gen_stop_tx, gen_stop_rx) = watch::channel(false);
    let ev_task = tokio::spawn(f.clone().events(p.events_per_sec, gen_stop_rx.clone()));
    let cmd_task = tokio::spawn(f.clone().commands(p.commands_per_sec, gen_stop_rx.clone()));
    let mut joined = 0usize;
    let mut peak_rss = 0u64;
    let mut next_sample = Instant::now();
    while t0.elapsed() < p.window {
        let due = (t0.elapsed().as_secs_f64() * p.joins_per_sec) as usize;
        while joined < due {
            start(
                &mut agents,
                AgentSpec {
                    vm: format!("lg-j-{joined:05}"),
                    over_http: false,
                    conn: Conn::Own,
                    joiner: true,
                },
            );
            joined += 1;
        }
        if Instant::now() >= next_sample {
            next_sample += Duration::from_secs(1);
            if let Some((_, rss)) = p.server_pid.and_then(proc_stat) {
                peak_rss = peak_rss.max(rss);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let window = t0.elapsed().as_secs_f64();
    let server1 = p.server_pid.and_then(proc_stat);
    let self1 = proc_stat(std::process::id());
    let hb = c.heartbeats_sent.load(Ordering::Relaxed) - hb0;
    let ev = c.events_accepted.load(Ordering::Relaxed) - ev0;
    let _ = gen_stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        let _ = ev_task.await;
        let _ = cmd_task.await;
    })
    .await;
    // Every queued command should arrive; wait (bounded) for the last ones.
    let grace = Instant::now() + Duration::from_secs(10);
    loop {
        let missing = {
            let t = lock(&f.timings);
            t.enqueued
                .keys()
                .filter(|id| !t.received.contains_key(*id))
                .count()
        };
        let regs = {
            let t = lock(&f.timings);
            t.registration_steady_ms.len()
        };
        if (missing == 0 && (regs >= joined || label == "baseline")) || Instant::now() > grace {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let not_received: Vec<String> = {
        let t = lock(&f.timings);
        t.enqueued
            .keys()
            .filter(|id| !t.received.contains_key(*id))
            .cloned()
            .collect()
    };
    let mut missing_states = serde_json::Map::new();
    for id in not_received.iter().take(20) {
        missing_states.insert(id.clone(), Value::String(f.command_state(id).await));
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while agents.join_next().await.is_some() {}
    })
    .await;
    let unregistered: Vec<String> = {
        let t = lock(&f.timings);
        (0..n)
            .map(|i| format!("lg-{i:06}"))
            .chain((0..joined).map(|i| format!("lg-j-{i:05}")))
            .filter(|vm| !t.registered.contains(vm))
            .collect()
    };

    let (all, stream, http, reg_ramp, reg_steady, enqueued) = {
        let t = lock(&f.timings);
        let mut all = Vec::new();
        let mut stream = Vec::new();
        let mut http = Vec::new();
        for (id, at) in &t.enqueued {
            if let Some((got, via)) = t.received.get(id) {
                let ms = got.saturating_duration_since(*at).as_secs_f64() * 1000.0;
                all.push(ms);
                match via {
                    Via::Stream => stream.push(ms),
                    Via::Http => http.push(ms),
                }
            }
        }
        (
            all,
            stream,
            http,
            t.registration_ramp_ms.clone(),
            t.registration_steady_ms.clone(),
            t.enqueued.len(),
        )
    };
    let phases = {
        let t = lock(&f.timings);
        let part = |k: usize| lat(t.join_phases.iter().map(|p| p[k]).collect());
        // The wait in `ready`: from the vm_started acknowledgment to the register_runner, the
        // interval the seed's 5 s polling makes 2.5 s on average.
        let ready = lat(t.join_phases.iter().map(|p| p[1] + p[2]).collect());
        json!({"vm_started_request": part(0), "stream_open": part(1), "connect_ack_to_register": part(2), "ready_to_register": ready})
    };
    let tck = clock_ticks();
    let cpu = |a: Option<(u64, u64)>, b: Option<(u64, u64)>| match (a, b) {
        (Some((a, _)), Some((b, _))) => Some((b.saturating_sub(a)) as f64 / tck / window * 100.0),
        _ => None,
    };
    Ok(json!({
        "agents": n,
        "agents_connected": connected,
        "streams": c.streams_up.load(Ordering::Relaxed),
        "http_agents": c.http_agents_up.load(Ordering::Relaxed),
        "agents_per_connection": f.per_connection,
        "joined": joined,
        "ramp_secs": ramp_secs,
        "window_secs": window,
        "heartbeats_per_sec": hb as f64 / window,
        "events_per_sec": ev as f64 / window,
        "heartbeats_sent": c.heartbeats_sent.load(Ordering::Relaxed),
        "events_sent": c.events_sent.load(Ordering::Relaxed),
        "events_accepted": c.events_accepted.load(Ordering::Relaxed),
        "commands_enqueued": enqueued,
        "commands_not_received": not_received.len(),
        "commands_not_received_states": missing_states,
        "command_latency_ms": lat(all),
        "command_latency_stream_ms": lat(stream),
        "command_latency_http_ms": lat(http),
        "registration_ramp_ms": lat(reg_ramp),
        "registration_steady_ms": lat(reg_steady),
        "registration_steady_parts_ms": phases,
        "agents_without_registration": if label == "baseline" { json!(null) } else { json!(unregistered.len()) },
        "agents_without_registration_sample": unregistered.iter().take(10).collect::<Vec<_>>(),
        "errors": {
            "agents": c.agent_errors.load(Ordering::Relaxed),
            "heartbeats": c.heartbeat_errors.load(Ordering::Relaxed),
            "events": c.event_errors.load(Ordering::Relaxed),
            "enqueue": c.enqueue_errors.load(Ordering::Relaxed),
            "refused_on_stream": c.stream_errors.load(Ordering::Relaxed),
        },
        "recovered": {
            "reconnects": c.reconnects.load(Ordering::Relaxed),
            "retried_attempts": c.retries.load(Ordering::Relaxed),
            "events_retried": c.events_retried.load(Ordering::Relaxed),
        },
        "events_acknowledged": lock(&f.acknowledged).len(),
        "server": {
            "cpu_percent_of_one_core": cpu(server0, server1),
            "peak_rss_mib": (peak_rss > 0).then(|| peak_rss as f64 / 1024.0),
        },
        "loadgen_cpu_percent_of_one_core": cpu(self0, self1),
        "agent_hours": f.agent_millis.load(Ordering::Relaxed) as f64 / 3_600_000.0,
    }))
}

fn fleet(a: &Args, target: Target, grpc: String, per_connection: usize, slots: usize) -> Fleet {
    Fleet::new(
        target,
        grpc,
        a.pool.clone(),
        Duration::from_secs(a.heartbeat_secs.max(1)),
        Duration::from_secs(a.poll_secs.max(1)),
        per_connection,
        slots,
    )
}

// ---------------------------------------------------------------------------------------------
// Report

fn f(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 1.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.3}"),
        None => "-".into(),
    }
}

fn ratio(a: &Value, b: &Value) -> Value {
    match (a.as_f64(), b.as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => Value::Null,
    }
}

fn lat_cell(v: &Value) -> String {
    format!(
        "p50 {} / p99 {} / max {} ms",
        f(&v["p50"]),
        f(&v["p99"]),
        f(&v["max"])
    )
}

#[allow(clippy::print_stdout)]
fn print_report(r: &Value) {
    let c = &r["controller"];
    let b = &r["baseline"];
    let row = |what: &str, ours: String, base: String, rat: &Value| {
        let rat = match rat {
            Value::String(s) => s.clone(),
            v => v.as_f64().map_or("-".into(), |x| format!("{x:.1}x")),
        };
        println!("{what:<38} {ours:<40} {base:<34} {rat}");
    };
    row(
        "",
        "controller".into(),
        "baseline (echo / loopback)".into(),
        &json!("ratio"),
    );
    row(
        "agents connected",
        format!(
            "{} of {} (+{} joined; {} streams, {} HTTP), {} per conn",
            c["agents_connected"],
            c["agents"],
            c["joined"],
            c["streams"],
            c["http_agents"],
            c["agents_per_connection"]
        ),
        format!("{} of {}", b["agents_connected"], b["agents"]),
        &Value::Null,
    );
    row(
        "ramp-up",
        format!("{} s", f(&c["ramp_secs"])),
        format!("{} s", f(&b["ramp_secs"])),
        &ratio(&c["ramp_secs"], &b["ramp_secs"]),
    );
    row(
        "heartbeats/s (sent; stored below)",
        f(&c["heartbeats_per_sec"]),
        f(&b["heartbeats_per_sec"]),
        &Value::Null,
    );
    row(
        "events/s accepted",
        f(&c["events_per_sec"]),
        f(&b["events_per_sec"]),
        &Value::Null,
    );
    row(
        "command to agent, stream",
        lat_cell(&c["command_latency_stream_ms"]),
        format!("echo {}", lat_cell(&b["command_latency_stream_ms"])),
        &ratio(
            &c["command_latency_stream_ms"]["p99"],
            &b["command_latency_stream_ms"]["p99"],
        ),
    );
    row(
        "  (ratio to loopback RTT p99)",
        String::new(),
        format!(
            "loopback p50 {} / p99 {} ms",
            f(&r["loopback_rtt_ms"]["p50"]),
            f(&r["loopback_rtt_ms"]["p99"])
        ),
        &ratio(
            &c["command_latency_stream_ms"]["p99"],
            &r["loopback_rtt_ms"]["p99"],
        ),
    );
    row(
        "command to agent, HTTP polling",
        lat_cell(&c["command_latency_http_ms"]),
        format!("poll interval {} s", r["args"]["poll_secs"]),
        &Value::Null,
    );
    row(
        "vm_started-to-register_runner, steady",
        lat_cell(&c["registration_steady_ms"]),
        format!("{} VMs joined", c["registration_steady_ms"]["n"]),
        &Value::Null,
    );
    for (label, key) in [
        ("  vm_started request", "vm_started_request"),
        ("  stream open (connect to connect_ack)", "stream_open"),
        (
            "  connect_ack to register_runner",
            "connect_ack_to_register",
        ),
        ("  in ready (ack to register_runner)", "ready_to_register"),
    ] {
        row(
            label,
            lat_cell(&c["registration_steady_parts_ms"][key]),
            String::new(),
            &Value::Null,
        );
    }
    row(
        "vm_started-to-register_runner, ramp",
        lat_cell(&c["registration_ramp_ms"]),
        format!("{} VMs", c["registration_ramp_ms"]["n"]),
        &Value::Null,
    );
    row(
        "server CPU (% of one core)",
        f(&c["server"]["cpu_percent_of_one_core"]),
        f(&b["server"]["cpu_percent_of_one_core"]),
        &ratio(
            &c["server"]["cpu_percent_of_one_core"],
            &b["server"]["cpu_percent_of_one_core"],
        ),
    );
    row(
        "server peak RSS (MiB)",
        f(&c["server"]["peak_rss_mib"]),
        f(&b["server"]["peak_rss_mib"]),
        &ratio(&c["server"]["peak_rss_mib"], &b["server"]["peak_rss_mib"]),
    );
    row(
        "load generator CPU (% of one core)",
        f(&c["loadgen_cpu_percent_of_one_core"]),
        f(&b["loadgen_cpu_percent_of_one_core"]),
        &Value::Null,
    );
    let s = &r["stored"];
    println!(
        "{:<38} heartbeats {} of {} sent, events {} of {} sent (+ vm_started)",
        "stored by the controller (its counters)",
        s["heartbeats"],
        c["heartbeats_sent"],
        s["events"],
        c["events_sent"]
    );
    println!(
        "{:<38} {} agents, {} heartbeats, {} events, {} enqueue; {} refused on streams; {} commands not received {}",
        "errors",
        c["errors"]["agents"],
        c["errors"]["heartbeats"],
        c["errors"]["events"],
        c["errors"]["enqueue"],
        c["errors"]["refused_on_stream"],
        c["commands_not_received"],
        c["commands_not_received_states"]
    );
    println!(
        "{:<38} {} stream reconnects, {} retried attempts, {} events sent again",
        "recovered (retried, not errors)",
        c["recovered"]["reconnects"],
        c["recovered"]["retried_attempts"],
        c["recovered"]["events_retried"]
    );
    let k = &r["store_check"];
    if !k.is_null() {
        println!(
            "{:<38} {} acknowledged; lost (acknowledged, not stored) {}; stored twice {} {}",
            "acknowledged events in the store",
            k["acknowledged"],
            k["lost"],
            k["duplicated"],
            if k["lost_sample"].as_array().is_some_and(|s| !s.is_empty()) {
                k["lost_sample"].to_string()
            } else {
                String::new()
            }
        );
    }
    if let Some(mib) = r["storage"]["mib_per_1000_vm_hours"].as_f64() {
        println!(
            "{:<38} {:.1} MiB over {:.2} VM-hours -> {:.0} MiB per 1,000 VM-hours (before retention)",
            "database growth",
            r["storage"]["growth_mib"].as_f64().unwrap_or(0.0),
            r["storage"]["vm_hours"].as_f64().unwrap_or(0.0),
            mib
        );
    }
}

// ---------------------------------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(addr_file) = &args.serve_echo {
        raise_nofile();
        return rt.block_on(echo::serve(addr_file));
    }
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let nofile = raise_nofile();
    let n = args.agents;
    let http_agents = (n as f64 * args.http_share.clamp(0.0, 1.0)).round() as usize;
    let stream_agents = n - http_agents;
    let joiners = (args.joins_per_sec.max(0.0) * args.duration_secs as f64).ceil() as usize;
    // Each side holds one socket per connection; leave room for HTTP, joiners and files.
    const HTTP_CONNECTIONS: usize = 256;
    let budget = (nofile as usize)
        .saturating_sub(HTTP_CONNECTIONS + joiners + 300)
        .max(1);
    let per_connection = args
        .agents_per_connection
        .unwrap_or_else(|| stream_agents.div_ceil(budget))
        .max(1);
    if per_connection > 1 && args.agents_per_connection.is_none() {
        eprintln!(
            "open-file limit {nofile} cannot hold one connection per agent: {per_connection} agents share each connection"
        );
    }
    let slots = stream_agents.div_ceil(per_connection).max(1);
    let window = Duration::from_secs(args.duration_secs);
    let tmp = std::env::temp_dir().join(format!("miglet-loadgen-{}", std::process::id()));

    let rtt = echo::loopback_rtt(2000).context("loopback round trips")?;
    let loopback = lat(rtt);

    let baseline = if args.no_baseline {
        Value::Null
    } else {
        let (mut echo, grpc) = spawn_echo(tmp.join("echo")).await?;
        let f = Arc::new(fleet(&args, Target::Echo, grpc, per_connection, slots));
        let phase = Phase {
            agents: stream_agents,
            http_agents: 0,
            joins_per_sec: 0.0,
            window: Duration::from_secs(args.baseline_secs.unwrap_or(args.duration_secs.min(20))),
            events_per_sec: args.events_per_sec,
            commands_per_sec: args.commands_per_sec,
            server_pid: Some(echo.pid),
        };
        let r = run_phase(f, &phase, "baseline").await?;
        echo.stop().await;
        r
    };

    let mut controller_child = None;
    let (base, grpc, secret_file, token_file, metrics_url, data_dir) =
        match (&args.http, &args.grpc) {
            (Some(h), Some(g)) => (
                h.clone(),
                g.clone(),
                args.secret_file
                    .clone()
                    .context("--secret-file is needed with --http")?,
                args.admin_token_file
                    .clone()
                    .context("--admin-token-file is needed with --http")?,
                args.metrics_url.clone(),
                None,
            ),
            (None, None) => {
                let bin = match &args.controller_bin {
                    Some(b) => b.clone(),
                    None => std::env::current_exe()?.with_file_name("mig-controller"),
                };
                let dir = tmp.join("controller");
                let (child, addrs) = spawn_controller(&bin, dir.clone()).await?;
                controller_child = Some(child);
                let addr = |k: &str| -> anyhow::Result<String> {
                    Ok(format!(
                        "http://{}",
                        addrs[k].as_str().context("address file")?
                    ))
                };
                let data = dir.join("data");
                (
                    addr("http_addr")?,
                    addr("grpc_addr")?,
                    data.join("dev-bootstrap-secret"),
                    data.join("initial-admin-token"),
                    Some(format!("{}/metrics", addr("metrics_addr")?)),
                    Some(data),
                )
            }
            _ => bail!("give both --http and --grpc, or neither (to start a controller)"),
        };
    let read = |p: &Path| -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(p)
            .with_context(|| p.display().to_string())?
            .trim()
            .to_owned())
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(HTTP_CONNECTIONS)
        .build()?;
    let target = Target::Controller {
        http: http.clone(),
        base,
        secret: read(&secret_file)?,
        admin_token: read(&token_file)?,
        http_permits: Semaphore::new(HTTP_CONNECTIONS),
    };
    let db_before = data_dir.as_deref().map(db_bytes);
    let pid = args
        .controller_pid
        .or(controller_child.as_ref().map(|c| c.pid));
    let f = Arc::new(fleet(&args, target, grpc, per_connection, slots));
    let phase = Phase {
        agents: n,
        http_agents,
        joins_per_sec: args.joins_per_sec,
        window,
        events_per_sec: args.events_per_sec,
        commands_per_sec: args.commands_per_sec,
        server_pid: pid,
    };
    let mut ours = run_phase(f.clone(), &phase, "controller").await?;
    let stored = match &metrics_url {
        Some(url) => {
            // The last messages sent before the agents stopped may still be on their way
            // through the controller: read its counters until they account for everything
            // sent, or for at most 10 s.
            let want_hb = ours["heartbeats_sent"].as_f64().unwrap_or(0.0);
            let started = (n as u64 + ours["joined"].as_u64().unwrap_or(0)) as f64;
            let want_ev = ours["events_sent"].as_f64().unwrap_or(0.0) + started;
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                let text = http.get(url).send().await?.text().await?;
                let hb = metric_sum(&text, "mig_heartbeats_ingested_total");
                let ev = metric_sum(&text, "mig_events_ingested_total");
                let complete = hb.unwrap_or(0.0) >= want_hb && ev.unwrap_or(0.0) >= want_ev;
                if complete || Instant::now() > until {
                    break json!({ "heartbeats": hb, "events": ev });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        None => Value::Null,
    };
    let mut storage = Value::Null;
    let mut store_check = Value::Null;
    if let Some(mut child) = controller_child {
        child.stop().await;
        if let Some(data) = &data_dir {
            let store = mig_controller::store::Store::open_sqlite(data).await?;
            store_check = serde_json::to_value(f.check_store(&store).await?)?;
            store.close().await;
        }
        if let (Some(data), Some(before)) = (&data_dir, db_before) {
            let after = db_bytes(data);
            let hours = ours["agent_hours"].as_f64().unwrap_or(0.0);
            let growth = after.saturating_sub(before) as f64 / (1 << 20) as f64;
            storage = json!({
                "db_bytes_before": before,
                "db_bytes_after": after,
                "growth_mib": growth,
                "vm_hours": hours,
                "mib_per_1000_vm_hours": (hours > 0.0).then(|| growth / hours * 1000.0),
            });
        }
    }
    if let Some(o) = ours.as_object_mut() {
        o.remove("agent_hours");
    }
    let report = json!({
        "args": {
            "agents": n, "http_share": args.http_share, "heartbeat_secs": args.heartbeat_secs,
            "poll_secs": args.poll_secs, "events_per_sec": args.events_per_sec,
            "commands_per_sec": args.commands_per_sec, "joins_per_sec": args.joins_per_sec,
            "duration_secs": args.duration_secs, "open_file_limit": nofile,
        },
        "loopback_rtt_ms": loopback,
        "baseline": baseline,
        "controller": ours,
        "stored": stored,
        "store_check": store_check,
        "storage": storage,
    });
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_metric_sums() {
        let v = lat(vec![5.0, 1.0, 3.0]);
        assert_eq!(v["p50"], 3.0);
        assert_eq!(v["max"], 5.0);
        assert_eq!(lat(vec![])["p50"], Value::Null);
        let text = "# TYPE mig_heartbeats_ingested counter\n\
                    mig_heartbeats_ingested_total{transport=\"grpc\"} 10\n\
                    mig_heartbeats_ingested_total{transport=\"http\"} 5\n\
                    mig_heartbeats_ingested_created 1\n";
        assert_eq!(
            metric_sum(text, "mig_heartbeats_ingested_total"),
            Some(15.0)
        );
        assert_eq!(metric_sum(text, "mig_events_ingested_total"), None);
    }
}
