//! What every fault scenario runs on: the real controller binary (killed, restarted, starved
//! of disk) behind fault proxies that give it stable addresses, real `miglet` agents with the
//! runner stand-in and the fake GitHub, and a fleet of simulated agents.

use anyhow::{Context, bail};
use miglet_sim::fleet::{AgentSpec, Conn, Fleet, Target};
use miglet_sim::github::{FakeGitHub, Job};
use miglet_sim::proxy::FaultProxy;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};

/// The registration token the fake GitHub accepts and the controller hands out.
pub const GITHUB_TOKEN: &str = "AHTFAULTSUITEREGISTRATIONTOKEN";
/// The pool of every agent here (the controller runs on development defaults).
pub const POOL: &str = "pool-faults";

/// A binary next to this one (the test builds them first).
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found: build it first (cargo build -p mig-controller -p miglet -p miglet-sim)",
            p.display()
        );
    }
    Ok(p)
}

/// The controller process, restartable on the same data dir. Agents reach it through the
/// proxies, whose addresses outlive every restart.
#[derive(Debug)]
pub struct Ctl {
    bin: PathBuf,
    pub dir: PathBuf,
    extra: Vec<String>,
    child: Option<tokio::process::Child>,
    pub http_proxy: FaultProxy,
    pub grpc_proxy: FaultProxy,
    pub metrics: String,
    /// The controller's own HTTP address (not through the proxy), for looking while the
    /// agents' path is broken.
    pub direct_http: String,
    /// The controller's own gRPC address.
    pub direct_grpc: String,
    runs: usize,
    nofile: Option<u64>,
}

impl Ctl {
    /// Starts `mig-controller serve` in `dir` with `extra` flags.
    pub async fn start(dir: &Path, extra: &[&str], github_url: &str) -> anyhow::Result<Ctl> {
        Self::start_limited(dir, extra, github_url, None).await
    }

    /// [`Ctl::start`] with the process's open-file limit set to `nofile` (soft and hard).
    pub async fn start_limited(
        dir: &Path,
        extra: &[&str],
        github_url: &str,
        nofile: Option<u64>,
    ) -> anyhow::Result<Ctl> {
        std::fs::create_dir_all(dir)?;
        let mut extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        extra.extend(["--runner-url".to_owned(), github_url.to_owned()]);
        let placeholder = "127.0.0.1:9".parse()?;
        let mut ctl = Ctl {
            bin: sibling("mig-controller")?,
            dir: dir.to_owned(),
            extra,
            child: None,
            http_proxy: FaultProxy::start(placeholder).await?,
            grpc_proxy: FaultProxy::start(placeholder).await?,
            metrics: String::new(),
            direct_http: String::new(),
            direct_grpc: String::new(),
            runs: 0,
            nofile,
        };
        ctl.spawn().await?;
        Ok(ctl)
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log(&self, run: usize) -> PathBuf {
        self.dir.join(format!("controller-{run}.log"))
    }

    /// Every log line of every run so far.
    pub fn logs(&self) -> String {
        (1..=self.runs)
            .map(|r| std::fs::read_to_string(self.log(r)).unwrap_or_default())
            .collect()
    }

    /// Starts the process (on new ports) and points the proxies at it.
    pub async fn spawn(&mut self) -> anyhow::Result<()> {
        self.runs += 1;
        let addr_file = self.dir.join("addr.json");
        let _ = std::fs::remove_file(&addr_file);
        let mut cmd = match self.nofile {
            // The shell sets the limit and becomes the controller.
            Some(n) => {
                let mut c = tokio::process::Command::new("bash");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(&self.bin);
                c
            }
            None => tokio::process::Command::new(&self.bin),
        };
        let mut child = cmd
            .args([
                "serve",
                "--http-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
            ])
            .args(["--metrics-addr", "127.0.0.1:0", "--log-format", "json"])
            .args(["--rate-limit-per-addr", "0", "--rate-limit-per-vm", "0"])
            .args(&self.extra)
            .arg("--data-dir")
            .arg(self.data())
            .arg("--addr-file")
            .arg(&addr_file)
            .env("MIG_CONTROLLER_STATIC_TOKEN", GITHUB_TOKEN)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(self.log(self.runs))?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        let addrs = wait_for_json(&addr_file, &mut child).await?;
        let addr = |k: &str| -> anyhow::Result<std::net::SocketAddr> {
            Ok(addrs[k].as_str().context("address file")?.parse()?)
        };
        self.http_proxy.set_upstream(addr("http_addr")?);
        self.grpc_proxy.set_upstream(addr("grpc_addr")?);
        self.metrics = format!("http://{}/metrics", addr("metrics_addr")?);
        self.direct_http = format!("http://{}", addr("http_addr")?);
        self.direct_grpc = format!("http://{}", addr("grpc_addr")?);
        self.child = Some(child);
        Ok(())
    }

    /// `kill -9`: no shutdown, no flush.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.start_kill()?;
            c.wait().await?;
        }
        Ok(())
    }

    /// SIGTERM and wait (bounded).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(Duration::from_secs(30), c.wait())
                .await
                .is_err()
            {
                c.start_kill()?;
                c.wait().await?;
                bail!("the controller did not stop within 30 s of SIGTERM");
            }
        }
        Ok(())
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.http_proxy.addr())
    }

    pub fn grpc(&self) -> String {
        format!("http://{}", self.grpc_proxy.addr())
    }

    pub fn secret(&self) -> anyhow::Result<String> {
        read_trimmed(&self.data().join("dev-bootstrap-secret"))
    }

    pub fn admin_token(&self) -> anyhow::Result<String> {
        read_trimmed(&self.data().join("initial-admin-token"))
    }

    /// Opens the store (the controller must be stopped).
    pub async fn store(&self) -> anyhow::Result<mig_controller::store::Store> {
        Ok(mig_controller::store::Store::open_sqlite(&self.data()).await?)
    }
}

pub fn read_trimmed(p: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(p)
        .with_context(|| p.display().to_string())?
        .trim()
        .to_owned())
}

async fn wait_for_json(path: &Path, child: &mut tokio::process::Child) -> anyhow::Result<Value> {
    for _ in 0..600 {
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str::<Value>(&text)
        {
            return Ok(v);
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("the controller exited ({status}) before it listened");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{} did not appear within 30 s", path.display())
}

/// The fake GitHub, serving on loopback.
pub async fn github() -> anyhow::Result<(FakeGitHub, String)> {
    let gh = FakeGitHub::new(&[GITHUB_TOKEN]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (addr, _task) = gh.serve(listener).await?;
    Ok((gh, format!("http://{addr}/fault-org")))
}

/// A job for a real agent.
pub fn job(name: &str, ms: u64) -> Job {
    Job {
        name: name.into(),
        job_key: "build".into(),
        result: "Succeeded".into(),
        duration_ms: ms,
        run_id: "9000".into(),
        repository: "acme/faults".into(),
        sha: "feedbeef".into(),
        git_ref: "refs/heads/main".into(),
        runner: String::new(),
        ..Job::default()
    }
}

/// A real `miglet` process.
#[derive(Debug)]
pub struct RealAgent {
    pub vm: String,
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

impl RealAgent {
    /// Starts `miglet` for `vm` against `ctl` (through its proxies), with its own runner dir.
    pub fn spawn(
        dir: &Path,
        ctl: &Ctl,
        vm: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<RealAgent> {
        let runner = dir.join(format!("runner-{vm}"));
        if !runner.exists() {
            miglet_sim::runner_dir::install(&runner, &sibling("fake-runner-listener")?)?;
        }
        let data = dir.join(format!("agent-{vm}"));
        let log = dir.join(format!("agent-{vm}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = tokio::process::Command::new(sibling("miglet")?)
            .arg("--runner-user=")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MIGLET_POOL_ID", POOL)
            .env("MIGLET_VM_ID", vm)
            .env("MIGLET_CONTROLLER_ENDPOINT", ctl.http())
            .env("MIGLET_CONTROLLER_GRPC_ENDPOINT", ctl.grpc())
            .env(
                "MIGLET_BOOTSTRAP_SECRET_FILE",
                ctl.data().join("dev-bootstrap-secret"),
            )
            .env("MIGLET_DATA_DIR", &data)
            .env("MIGLET_RUNNER_DIR", &runner)
            .env("MIGLET_HEARTBEAT_INTERVAL", "2s")
            .env("MIGLET_POLL_INTERVAL", "1s")
            .env("MIGLET_METADATA", "false")
            .env("MIGLET_BOOT_ID", format!("boot-{vm}"))
            .envs(extra.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .context("cannot start miglet")?;
        Ok(RealAgent {
            vm: vm.to_owned(),
            child,
            log,
        })
    }

    /// Waits (bounded) for the agent to exit; its exit code.
    pub async fn wait(&mut self, within: Duration) -> anyhow::Result<Option<i32>> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(r) => Ok(r?.code()),
            Err(_) => bail!(
                "agent {} still running after {} s; log {}",
                self.vm,
                within.as_secs(),
                self.log.display()
            ),
        }
    }
}

/// The simulated fleet against `ctl`, its agents started (`http_share` of them polling).
pub struct SimFleet {
    pub fleet: Arc<Fleet>,
    pub stop: watch::Sender<bool>,
    agents: tokio::task::JoinSet<()>,
    gen_stop: watch::Sender<bool>,
    generators: tokio::task::JoinSet<()>,
    pub stream_agents: usize,
}

impl std::fmt::Debug for SimFleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimFleet")
            .field("stream_agents", &self.stream_agents)
            .finish_non_exhaustive()
    }
}

impl SimFleet {
    pub async fn start(
        ctl: &Ctl,
        agents: usize,
        http_share: f64,
        heartbeat: Duration,
    ) -> anyhow::Result<SimFleet> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let target = Target::Controller {
            http,
            base: ctl.http(),
            secret: ctl.secret()?,
            admin_token: ctl.admin_token()?,
            http_permits: Semaphore::new(256),
        };
        let http_agents = (agents as f64 * http_share).round() as usize;
        let stream_agents = agents - http_agents;
        let fleet = Arc::new(Fleet::new(
            target,
            ctl.grpc(),
            POOL.into(),
            heartbeat,
            Duration::from_secs(1),
            1,
            stream_agents.max(1),
        ));
        let (stop, stop_rx) = watch::channel(false);
        let mut set = tokio::task::JoinSet::new();
        for i in 0..agents {
            let f = fleet.clone();
            let stop = stop_rx.clone();
            let spec = AgentSpec {
                vm: format!("sim-{i:05}"),
                over_http: i < http_agents,
                conn: Conn::Own,
                joiner: false,
            };
            set.spawn(async move {
                let vm = spec.vm.clone();
                if let Err(e) = f.clone().agent(spec, stop).await
                    && f.counters.agent_errors.fetch_add(1, Ordering::Relaxed) < 5
                {
                    eprintln!("agent {vm}: {e:#}");
                }
            });
        }
        let (gen_stop, _) = watch::channel(false);
        Ok(SimFleet {
            fleet,
            stop,
            agents: set,
            gen_stop,
            generators: tokio::task::JoinSet::new(),
            stream_agents,
        })
    }

    /// Waits (bounded) until every agent is up: streams open and pollers announced.
    pub async fn wait_up(&self, agents: usize, within: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let c = &self.fleet.counters;
        while (c.streams_open.load(Ordering::Relaxed) as usize) < self.stream_agents
            || (c.streams_up.load(Ordering::Relaxed) + c.http_agents_up.load(Ordering::Relaxed))
                < agents as u64
        {
            if started.elapsed() > within {
                bail!(
                    "only {} of {} streams open after {} s",
                    c.streams_open.load(Ordering::Relaxed),
                    self.stream_agents,
                    within.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(started.elapsed())
    }

    /// Waits (bounded) until every stream is open again; how long it took.
    pub async fn wait_reconnected(&self, within: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let c = &self.fleet.counters;
        while (c.streams_open.load(Ordering::Relaxed) as usize) < self.stream_agents {
            if started.elapsed() > within {
                bail!(
                    "{} of {} streams open {} s after the controller came back",
                    c.streams_open.load(Ordering::Relaxed),
                    self.stream_agents,
                    within.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(started.elapsed())
    }

    /// Starts the event and command generators.
    pub fn generate(&mut self, events_per_sec: f64, commands_per_sec: f64) {
        let (tx, rx) = watch::channel(false);
        self.gen_stop = tx;
        self.generators
            .spawn(self.fleet.clone().events(events_per_sec, rx.clone()));
        self.generators
            .spawn(self.fleet.clone().commands(commands_per_sec, rx));
    }

    /// Stops the generators (bounded), leaving the agents running.
    pub async fn stop_generating(&mut self) {
        let _ = self.gen_stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while self.generators.join_next().await.is_some() {}
        })
        .await;
    }

    /// Waits (bounded) until every queued command was received by its agent.
    pub async fn wait_commands_received(&self, within: Duration) -> usize {
        let started = Instant::now();
        loop {
            let missing = {
                let t = miglet_sim::fleet::lock(&self.fleet.timings);
                t.enqueued
                    .keys()
                    .filter(|id| !t.executed.contains(*id))
                    .count()
            };
            if missing == 0 || started.elapsed() > within {
                return missing;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) until the controller holds every queued command as acknowledged
    /// (asked through its admin API); how many are not.
    pub async fn wait_commands_acknowledged(&self, within: Duration) -> usize {
        let started = Instant::now();
        let mut left: Vec<String> = miglet_sim::fleet::lock(&self.fleet.timings)
            .enqueued
            .keys()
            .cloned()
            .collect();
        while !left.is_empty() && started.elapsed() < within {
            let mut still = Vec::new();
            for id in left {
                if self.fleet.command_state(&id).await != "acknowledged" {
                    still.push(id);
                }
            }
            left = still;
            if !left.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        for id in &left {
            let state = self.fleet.command_state(id).await;
            eprintln!("command {id} not acknowledged: {state}");
        }
        left.len()
    }

    /// Stops every agent (bounded).
    pub async fn stop(mut self) -> Arc<Fleet> {
        self.stop_generating().await;
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            while self.agents.join_next().await.is_some() {}
        })
        .await;
        self.fleet
    }
}

/// `register_runner` commands handed out more than once per VM boot, from the store.
pub async fn double_registrations(store: &mig_controller::store::Store) -> anyhow::Result<usize> {
    let mut doubles = 0;
    for vm in store.vms_list().await? {
        let mut per_boot: std::collections::HashMap<String, usize> = Default::default();
        for c in store.commands_for_vm(&vm.vm_id).await? {
            if c.command_type == "register_runner" && c.delivery_count > 0 {
                *per_boot
                    .entry(c.boot_id.clone().unwrap_or_default())
                    .or_default() += 1;
            }
        }
        doubles += per_boot.values().filter(|n| **n > 1).count();
    }
    Ok(doubles)
}

/// Commands the fleet queued that the store does not hold as acknowledged.
pub async fn unacknowledged_commands(
    store: &mig_controller::store::Store,
    fleet: &Fleet,
) -> anyhow::Result<Vec<(String, String)>> {
    let ids: Vec<String> = miglet_sim::fleet::lock(&fleet.timings)
        .enqueued
        .keys()
        .cloned()
        .collect();
    let mut out = Vec::new();
    for id in ids {
        let state = store
            .command_get(&id)
            .await?
            .map_or_else(|| "missing".to_owned(), |c| c.state.as_str().to_owned());
        if state != "acknowledged" {
            out.push((id, state));
        }
    }
    Ok(out)
}
