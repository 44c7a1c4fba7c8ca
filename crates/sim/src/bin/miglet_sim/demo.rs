//! `miglet-sim demo`: a whole fleet on this machine in one command. The real controller
//! (SQLite, a `local` pool whose VMs are real `miglet` processes running the runner
//! stand-in), and the GitHub stand-in queuing `workflow_job`s at a steady rate with bursts
//! and quiet spells, delivering signed webhooks. The fleet scales up, runs the jobs and
//! scales down; the dashboard shows it.

use anyhow::Context;
use mig_controller::config::{ServeArgs, Settings};
use miglet_sim::github::{FakeGitHub, Job};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A line for the person running the demo, on standard output.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout().lock(), $($t)*);
    }};
}

/// The registration token the stand-in accepts (it is not a GitHub token).
const DEMO_TOKEN: &str = "DEMO-REGISTRATION-TOKEN-NOT-A-SECRET";
const POOL: &str = "demo";
/// The stand-in's GitHub App the demo mints just-in-time runners with.
const DEMO_APP_ID: u64 = 1001;
const DEMO_INSTALLATION: u64 = 2002;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where the demo keeps everything (the controller's data, the VMs' directories).
    #[arg(long, default_value = "./demo_data")]
    dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc_addr: SocketAddr,
    /// Jobs queued a minute while the demand is on.
    #[arg(long, default_value_t = 12)]
    jobs_per_minute: u32,
    /// How long each job runs, seconds.
    #[arg(long, default_value_t = 20)]
    job_seconds: u64,
    #[arg(long, default_value_t = 6)]
    max_size: u32,
    #[arg(long, default_value_t = 1)]
    min_idle: u32,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    run_for_secs: Option<u64>,
    /// Lose every N-th webhook delivery (0: none), to watch the backstop poll find what
    /// the webhooks missed.
    #[arg(long, default_value_t = 0)]
    lose_every_nth_webhook: u64,
}

/// A binary next to this one.
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name(name);
    anyhow::ensure!(
        path.is_file(),
        "{} not found: build every binary first (cargo build --release --locked --bins)",
        path.display()
    );
    Ok(path)
}

fn random_hex() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// Writes `text` to `path` unless it exists; returns what is in it.
fn keep_or_write(path: &Path, text: &str) -> anyhow::Result<String> {
    if !path.exists() {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(std::fs::read_to_string(path)?.trim().to_owned())
}

/// What a fleet on this machine is made of.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub dir: PathBuf,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub min_idle: u32,
    pub max_size: u32,
    pub scale_up_step: u32,
    /// Mint just-in-time runners with the stand-in's GitHub App (and poll it for lost
    /// webhooks), instead of a static registration token.
    pub github_app: bool,
}

/// The controller's TOML for a fleet.
fn config(a: &FleetSpec, dir: &Path, github: SocketAddr) -> anyhow::Result<String> {
    let bootstrap = dir.join("pool.secret");
    keep_or_write(&bootstrap, &random_hex())?;
    let webhook = dir.join("webhook.secret");
    keep_or_write(&webhook, &random_hex())?;
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    // Minted on the stand-in's App (a `[github]` table of its own), or a static token (keys
    // of the pool's table).
    let (pool_keys, github_table) = if a.github_app {
        let key = dir.join("github-app.pem");
        keep_or_write(&key, miglet_sim::github::APP_PRIVATE_KEY)?;
        (
            String::new(),
            format!(
                "[pools.{POOL}.github]\norg = \"demo-org\"\napi_url = \"http://{github}\"\napp_id = {DEMO_APP_ID}\nprivate_key_file = {}\nregistration = \"jit\"\n",
                q(&key)
            ),
        )
    } else {
        (
            format!("runner_url = \"http://{github}/demo-org\"\ntoken = \"{DEMO_TOKEN}\"\n"),
            String::new(),
        )
    };
    Ok(format!(
        r#"data_dir = {data}
http_addr = "{http}"
grpc_addr = "{grpc}"
reconcile_interval_secs = 2

[webhook]
secret_file = {webhook}
backstop_interval_secs = 15

[pools.{POOL}]
{pool_keys}labels = ["self-hosted", "linux", "x64", "demo"]
min_idle = {min_idle}
max_size = {max_size}
idle_timeout_secs = 45
boot_timeout_secs = 60
registration_timeout_secs = 60
scale_up_step = {step}

[pools.{POOL}.enrollment]
bootstrap_secret_file = {bootstrap}

[pools.{POOL}.provider]
kind = "local"
miglet_bin = {miglet}
runner_template = {runner}
work_dir = {vms}
args = ["--runner-user="]
stop_grace_secs = 5
env = {{ MIGLET_BOOTSTRAP_SECRET_FILE = {bootstrap}, MIGLET_ORG_ID = "demo-org", MIGLET_HEARTBEAT_INTERVAL = "2s", MIGLET_POLL_INTERVAL = "1s", MIGLET_LOG_LEVEL = "warn" }}

{github_table}"#,
        data = q(&dir.join("controller")),
        http = a.http_addr,
        grpc = a.grpc_addr,
        webhook = q(&webhook),
        min_idle = a.min_idle,
        max_size = a.max_size,
        step = a.scale_up_step,
        bootstrap = q(&bootstrap),
        miglet = q(&sibling("miglet")?),
        runner = q(&dir.join("runner")),
        vms = q(&dir.join("vms")),
    ))
}

/// Demand: a burst at start, then `per_minute` jobs a minute for two minutes and a quiet
/// minute (so the pool visibly shrinks), over and over.
async fn queue_jobs(github: FakeGitHub, per_minute: u32, job_seconds: u64) {
    let every = Duration::from_millis(60_000 / u64::from(per_minute.max(1)));
    let mut id: u64 = 1000;
    let job = |id: u64| Job {
        name: format!("build #{id}"),
        job_key: "build".into(),
        result: if id.is_multiple_of(7) {
            "Failed"
        } else {
            "Succeeded"
        }
        .into(),
        duration_ms: job_seconds * 1000 + (id % 5) * 1000,
        run_id: (id * 10).to_string(),
        repository: "demo-org/app".into(),
        id,
        labels: vec!["self-hosted".into(), "demo".into()],
        ..Job::default()
    };
    for _ in 0..4 {
        id += 1;
        github.enqueue_job(job(id));
    }
    loop {
        let busy_until = tokio::time::Instant::now() + Duration::from_secs(120);
        while tokio::time::Instant::now() < busy_until {
            tokio::time::sleep(every).await;
            id += 1;
            github.enqueue_job(job(id));
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

/// The controller (in this process, from a generated TOML) with a `local` pool, and the
/// GitHub stand-in delivering its webhooks to it.
pub struct Fleet {
    pub dir: PathBuf,
    pub server: mig_controller::server::RunningServer,
    pub github: FakeGitHub,
    pub github_addr: SocketAddr,
    pub data_dir: PathBuf,
}

impl Fleet {
    pub async fn start(spec: &FleetSpec) -> anyhow::Result<Fleet> {
        std::fs::create_dir_all(&spec.dir)?;
        let dir = std::fs::canonicalize(&spec.dir)?;
        let runner = dir.join("runner");
        if !runner.join("config.sh").exists() {
            miglet_sim::runner_dir::install(&runner, &sibling("fake-runner-listener")?)
                .context("installing the runner stand-in")?;
        }
        let github = FakeGitHub::new(&[DEMO_TOKEN]).with_app(DEMO_APP_ID, DEMO_INSTALLATION);
        let (github_addr, _task) = github
            .serve(tokio::net::TcpListener::bind("127.0.0.1:0").await?)
            .await?;
        let config_file = dir.join("controller.toml");
        std::fs::write(&config_file, config(spec, &dir, github_addr)?)?;
        let settings = Settings::load(ServeArgs {
            config: Some(config_file.clone()),
            ..ServeArgs::default()
        })
        .with_context(|| format!("the fleet's config {}", config_file.display()))?;
        let data_dir = settings.data_dir.clone();
        let (http, grpc) = mig_controller::server::bind(&settings).await?;
        let server = mig_controller::server::start(settings, http, grpc).await?;
        let github = github.with_webhook(
            &format!("http://{}/api/v1/github/webhook", server.http_addr),
            &std::fs::read_to_string(dir.join("webhook.secret"))?,
        );
        Ok(Fleet {
            dir,
            server,
            github,
            github_addr,
            data_dir,
        })
    }

    /// Stops the controller, then every VM it started (they outlive it).
    pub async fn stop(self) {
        self.server.shutdown().await;
        stop_vms(&self.dir).await;
    }
}

pub async fn run(a: DemoArgs) -> anyhow::Result<()> {
    let fleet = Fleet::start(&FleetSpec {
        dir: a.dir.clone(),
        http_addr: a.http_addr,
        grpc_addr: a.grpc_addr,
        min_idle: a.min_idle,
        max_size: a.max_size,
        scale_up_step: 4,
        github_app: true,
    })
    .await?;
    let (server, github, gh_addr, data_dir) = (
        &fleet.server,
        fleet.github.clone(),
        fleet.github_addr,
        fleet.data_dir.clone(),
    );
    let token =
        std::fs::read_to_string(mig_controller::server::initial_admin_token_file(&data_dir))
            .unwrap_or_else(|_| "(minted at the first start; see the data dir)".into());
    say!("\nThe demo fleet is up.");
    say!("  dashboard:       http://{}/dashboard", server.http_addr);
    say!("  operator token:  {}", token.trim());
    say!(
        "  migctl:          target/release/migctl --endpoint http://{} --token-file {} pools",
        server.http_addr,
        mig_controller::server::initial_admin_token_file(&data_dir).display()
    );
    say!(
        "  fake GitHub:     http://{gh_addr}   (jobs every {} s, in bursts)\n",
        60 / a.jobs_per_minute.max(1)
    );
    if a.lose_every_nth_webhook > 0 {
        github.lose_every(a.lose_every_nth_webhook);
        say!(
            "  losing every {}th webhook delivery: the backstop poll (every 15 s) finds them\n",
            a.lose_every_nth_webhook
        );
    }
    let jobs = tokio::spawn(queue_jobs(github.clone(), a.jobs_per_minute, a.job_seconds));
    let app = server.app.clone();
    let status = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            let v = app.pool_scale_view(POOL).unwrap_or_default();
            say!(
                "queued {:>3} | VMs {:>2} of {:>2} wanted ({} busy, {} spare) | jobs done {}",
                v.queued_jobs,
                v.actual,
                v.desired,
                v.busy,
                v.spare,
                github.reports().len()
            );
        }
    });
    match a.run_for_secs {
        Some(s) => tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(s)) => {}
            r = tokio::signal::ctrl_c() => r?,
        },
        None => tokio::signal::ctrl_c().await?,
    }
    jobs.abort();
    status.abort();
    say!("Stopping: the controller, then every demo VM.");
    fleet.stop().await;
    Ok(())
}

/// Stops every VM the demo's local provider started (they outlive the controller).
pub async fn stop_vms(dir: &Path) {
    use mig_controller::provider::Provider;
    let provider = mig_controller::provider::local::LocalProvider::new(
        mig_controller::provider::local::LocalSettings {
            miglet_bin: PathBuf::from("miglet"),
            runner_template: dir.join("runner"),
            work_dir: dir.join("vms"),
            env: Vec::new(),
            args: Vec::new(),
            stop_grace: Duration::from_secs(5),
        },
    );
    let names: Vec<String> = provider
        .list()
        .await
        .map(|l| l.into_iter().map(|i| i.name).collect())
        .unwrap_or_default();
    if let Err(e) = provider.delete(&names).await {
        say!("could not stop every demo VM: {e}");
    }
}
