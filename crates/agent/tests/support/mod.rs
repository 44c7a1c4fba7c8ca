//! What the agent's end-to-end test binaries share: the real controller in-process (behind
//! fault proxies, so it can restart on a new port while agents keep one address), the fake
//! GitHub and Google, the runner stand-in, and the real `miglet` binary. Every wait is
//! bounded.

#![allow(dead_code, unused_imports)]

pub use mig_controller::auth::enroll::PoolEnrollment;
pub use mig_controller::auth::gce::GceRule;
pub use mig_controller::config::{Settings as ControllerSettings, TlsSettings};
pub use mig_controller::pki;
pub use mig_controller::server::{self, RunningServer};
pub use mig_controller::token::{PoolRegistration, Pools, StaticToken};
pub use miglet_proto::command::Command;
pub use miglet_sim::github::{FakeGitHub, Job};
pub use miglet_sim::google::FakeGoogle;
pub use miglet_sim::proxy::{FaultProxy, Mode};
pub use std::future::Future;
pub use std::net::SocketAddr;
pub use std::path::{Path, PathBuf};
pub use std::process::Stdio;
pub use std::sync::Arc;
pub use std::time::Duration;

pub mod browser;
pub use browser::{Browser, charts_until, fresh, fresh_click, fresh_text, screenshots};

pub type R = Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub const TOKEN: &str = "AHTE2ESECRETREGISTRATIONTOKEN42";
pub const MIGLET: &str = env!("CARGO_BIN_EXE_miglet");

/// A binary of this workspace, built next to `miglet` with the same profile. It is always
/// (re)built once per test process: cargo does nothing when it is up to date, and a stale
/// binary from an earlier build is never used.
pub fn sibling_binary(package: &str, name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let dir = Path::new(MIGLET)
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default();
    let bin = dir.join(name);
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !built.iter().any(|b| b == name) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", package, "--bin", name]);
        if dir.file_name().is_some_and(|d| d == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status();
        assert!(status.is_ok_and(|s| s.success()), "could not build {name}");
        built.push(name.to_owned());
    }
    bin
}

/// The runner stand-in's binary.
pub fn listener_binary() -> PathBuf {
    sibling_binary("miglet-sim", "fake-runner-listener")
}

/// Polls `cond` until it holds, at most `secs` seconds.
pub async fn wait_for<F, Fut>(what: &str, secs: u64, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    miglet_sim::testkit::wait_for(what, Duration::from_secs(secs), cond).await;
}

/// Waits until the controller has recorded command `id` in `state`.
pub async fn wait_command_state(app: &Arc<mig_controller::app::Controller>, id: &str, state: &str) {
    wait_for(&format!("command {id} {state}"), 30, || {
        let app = app.clone();
        async move {
            app.store()
                .command_get(id)
                .await
                .ok()
                .flatten()
                .is_some_and(|c| c.state.as_str() == state)
        }
    })
    .await;
}

/// Waits until the controller has stored an event of `ty` for `vm`.
pub async fn wait_event(app: &Arc<mig_controller::app::Controller>, vm: &str, ty: &str) {
    wait_for(&format!("{ty} of {vm} stored"), 30, || {
        let app = app.clone();
        async move {
            app.store()
                .events_for_vm(vm)
                .await
                .is_ok_and(|e| e.iter().any(|e| e.event_type == ty))
        }
    })
    .await;
}

/// Controller, fake GitHub and agent up (with `job` queued, if any), once the controller has
/// stored the agent's `event`.
pub async fn agent_at(vm: &str, job: Option<Job>, event: &str) -> (Env, Controller, Agent) {
    let env = env().await;
    let ctl = Controller::start(&env.dir.path().join("ctl"), &env.ctl()).await;
    if let Some(job) = job {
        env.github.enqueue_job(job);
    }
    let agent = Agent::spawn(&env, vm, ctl.http, Some(ctl.grpc), &[]);
    wait_event(ctl.app(), vm, event).await;
    (env, ctl, agent)
}

/// The controller in-process, reached through two fault proxies: `http` and `grpc` are the
/// proxies' addresses, which stay the same when the controller restarts on new ports.
pub struct Controller {
    pub server: Option<RunningServer>,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub http_proxy: FaultProxy,
    pub grpc_proxy: FaultProxy,
    pub data: PathBuf,
    pub cfg: CtlConfig,
}

/// What the test controller is configured with: GitHub, TLS with mutual TLS, and the pool's
/// enrollment (bootstrap secret, or GCE identity tokens checked against the fake Google).
#[derive(Clone)]
pub struct CtlConfig {
    pub github_url: String,
    pub tls_dir: PathBuf,
    pub secret_file: PathBuf,
    pub jwks_url: String,
    pub credential_ttl: Duration,
    /// No TLS (for the browser test, whose browser has no client certificate).
    pub plain_http: bool,
    /// Registrations minted on the GitHub stand-in instead of a static token.
    pub github_app: Option<GitHubMint>,
    /// The pool `pool-e2e` sized by the scaler with the local provider, and the webhook.
    pub scaled: Option<ScaledPool>,
    /// The GitHub webhook's secret, for a controller that takes webhooks without a sized pool.
    pub webhook_secret_file: Option<PathBuf>,
}

/// A pool the controller creates VMs for (`local` provider: real `miglet` processes).
#[derive(Debug, Clone)]
pub struct ScaledPool {
    pub policy: mig_controller::lifecycle::ScalePolicy,
    pub local: mig_controller::provider::local::LocalSettings,
    pub webhook_secret_file: PathBuf,
}

/// How the controller mints on the GitHub stand-in.
#[derive(Debug, Clone)]
pub struct GitHubMint {
    /// The stand-in's REST API base.
    pub api_url: String,
    pub mode: mig_controller::github::Mode,
    /// A PAT in this file instead of the test App.
    pub pat_file: Option<PathBuf>,
}

/// The test GitHub App the stand-in accepts.
pub const APP_ID: u64 = 31337;
pub const APP_INSTALLATION: u64 = 4711;

/// The pool's token source: the static token, or GitHub minting through the stand-in.
fn token_source(cfg: &CtlConfig) -> Arc<dyn mig_controller::token::TokenSource> {
    use mig_controller::github::{Scope, api::Api, app, rules::MintBudget, source};
    let Some(mint) = &cfg.github_app else {
        return Arc::new(StaticToken::new(TOKEN.into(), Duration::from_secs(3600)));
    };
    let clock = mig_controller::clock::Clock::system();
    let scope = Scope::Org("test-org".into());
    let auth = match &mint.pat_file {
        Some(file) => app::Auth::Pat(file.clone()),
        None => {
            let key = app::key_from_pem(miglet_sim::github::APP_PRIVATE_KEY.as_bytes())
                .unwrap_or_else(|e| panic!("app key: {e}"));
            app::Auth::App(app::AppAuth::new(
                APP_ID,
                key,
                None,
                scope.clone(),
                clock.clone(),
            ))
        }
    };
    let account = Arc::new(source::Account {
        api: Api::new(&mint.api_url, clock.clone()).unwrap_or_else(|e| panic!("api: {e}")),
        auth,
        budget: std::sync::Mutex::new(MintBudget::new(150)),
    });
    let mode = mint.mode;
    Arc::new(source::GitHubSource::new(
        account,
        scope,
        mode,
        None,
        "mig-controller".into(),
        clock,
    ))
}

/// The audience agents and the controller agree on for GCE identity tokens.
pub const AUDIENCE: &str = "https://mig-controller.e2e.test";
pub const GCE_PROJECT: &str = "e2e-project";

pub fn controller_settings(
    data: &Path,
    cfg: &CtlConfig,
    http: SocketAddr,
    grpc: SocketAddr,
) -> ControllerSettings {
    let mut s = ControllerSettings::for_tests(data, TOKEN);
    s.http_addr = http;
    s.grpc_addr = grpc;
    s.redelivery_timeout = Duration::from_secs(2);
    s.reconcile_interval = Duration::from_secs(1);
    s.pools = Pools::new(
        Default::default(),
        Some(PoolRegistration {
            runner_url: cfg.github_url.clone(),
            runner_group: "default".into(),
            labels: vec![
                "self-hosted".into(),
                "linux".into(),
                "x64".into(),
                "e2e".into(),
            ],
            token: token_source(cfg),
            scaling: None,
            enrollment: PoolEnrollment {
                bootstrap_secret_file: Some(cfg.secret_file.clone()),
                gce: Some(GceRule {
                    project_id: GCE_PROJECT.into(),
                    zones: vec![],
                    instance_name_prefix: None,
                    service_account: None,
                }),
                enrollment_tokens: true,
                vm_id_prefix: None,
            },
        }),
    );
    s.webhook_secret_file = cfg.webhook_secret_file.clone();
    s.backstop.interval = Some(Duration::from_secs(1));
    if let Some(scaled) = &cfg.scaled
        && let Ok(fallback) = s.pools.get("pool-e2e")
    {
        let mut pool = fallback.clone();
        pool.scaling = Some(mig_controller::provider::PoolScaling {
            policy: scaled.policy.clone(),
            provider: Arc::new(mig_controller::provider::local::LocalProvider::new(
                scaled.local.clone(),
            )),
        });
        s.pools = Pools::new(
            [("pool-e2e".to_owned(), pool)].into(),
            Some(fallback.clone()),
        );
        s.webhook_secret_file = Some(scaled.webhook_secret_file.clone());
    }
    s.enroll.audience = Some(AUDIENCE.into());
    s.enroll.credential_ttl = cfg.credential_ttl;
    s.enroll.google_jwks_url = cfg.jwks_url.clone();
    s.tls = (!cfg.plain_http).then(|| TlsSettings {
        cert_file: cfg.tls_dir.join("server.pem"),
        key_file: cfg.tls_dir.join("server-key.pem"),
        client_ca_file: Some(cfg.tls_dir.join("ca.pem")),
        reload_interval: Duration::from_secs(10),
    });
    s
}

impl Controller {
    pub async fn start(data: &Path, cfg: &CtlConfig) -> Controller {
        let running = Self::serve(data, cfg).await;
        let http_proxy = FaultProxy::start(running.http_addr)
            .await
            .unwrap_or_else(|e| panic!("proxy: {e}"));
        let grpc_proxy = FaultProxy::start(running.grpc_addr)
            .await
            .unwrap_or_else(|e| panic!("proxy: {e}"));
        Controller {
            http: http_proxy.addr(),
            grpc: grpc_proxy.addr(),
            http_proxy,
            grpc_proxy,
            server: Some(running),
            data: data.to_owned(),
            cfg: cfg.clone(),
        }
    }

    /// The controller on fresh loopback ports.
    async fn serve(data: &Path, cfg: &CtlConfig) -> RunningServer {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let s = controller_settings(data, cfg, any, any);
        let (h, g) = server::bind(&s)
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        server::start(s, h, g)
            .await
            .unwrap_or_else(|e| panic!("start: {e}"))
    }

    /// Graceful shutdown. The proxies stay: connections to them are reset until a restart.
    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(20), s.shutdown())
                .await
                .unwrap_or_else(|_| panic!("controller shutdown hung"));
        }
    }

    /// Stops (if running) and starts again on the same data dir, on new ports behind the
    /// same proxy addresses.
    pub async fn restart(&mut self) {
        self.stop().await;
        let running = Self::serve(&self.data, &self.cfg).await;
        self.http_proxy.set_upstream(running.http_addr);
        self.grpc_proxy.set_upstream(running.grpc_addr);
        self.server = Some(running);
    }

    pub fn app(&self) -> &Arc<mig_controller::app::Controller> {
        match &self.server {
            Some(s) => &s.app,
            None => panic!("controller stopped"),
        }
    }

    pub async fn event_types(&self, vm: &str) -> Vec<String> {
        self.app()
            .store()
            .events_for_vm(vm)
            .await
            .map(|e| e.into_iter().map(|e| e.event_type).collect())
            .unwrap_or_default()
    }

    pub async fn event(&self, vm: &str, ty: &str) -> Option<serde_json::Value> {
        let events = self.app().store().events_for_vm(vm).await.ok()?;
        let e = events.into_iter().find(|e| e.event_type == ty)?;
        let report: serde_json::Value = serde_json::from_str(&e.data).ok()?;
        Some(report["fields"].clone())
    }
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub github: FakeGitHub,
    pub github_url: String,
    /// The stand-in's REST API base.
    pub github_api: String,
    pub google: FakeGoogle,
    pub jwks_url: String,
    /// The pool's bootstrap secret.
    pub secret: String,
}

pub const SECRET: &str = "e2e-pool-bootstrap-secret-7f3a9c";

impl Env {
    pub fn ctl(&self) -> CtlConfig {
        CtlConfig {
            github_url: self.github_url.clone(),
            tls_dir: self.dir.path().join("tls"),
            secret_file: self.dir.path().join("pool.secret"),
            jwks_url: self.jwks_url.clone(),
            credential_ttl: Duration::from_secs(3600),
            plain_http: false,
            github_app: None,
            scaled: None,
            webhook_secret_file: None,
        }
    }

    pub fn tls(&self, file: &str) -> PathBuf {
        self.dir.path().join("tls").join(file)
    }
}

pub async fn serve_router(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

pub async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let github = FakeGitHub::new(&[TOKEN]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (addr, _task) = github
        .serve(listener)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let runner = dir.path().join("runner");
    miglet_sim::runner_dir::install(&runner, &listener_binary())
        .unwrap_or_else(|e| panic!("install runner: {e}"));
    // A private CA, the controller's certificate and the agents' client certificate.
    let tls = dir.path().join("tls");
    let ca = pki::new_ca("e2e CA", 2).unwrap_or_else(|e| panic!("{e}"));
    let names = ["127.0.0.1".to_owned(), "localhost".to_owned()];
    let server = pki::issue(&ca, pki::Usage::Server, &names, 2).unwrap_or_else(|e| panic!("{e}"));
    let client = pki::issue(&ca, pki::Usage::Client, &["e2e-agents".to_owned()], 2)
        .unwrap_or_else(|e| panic!("{e}"));
    pki::write(&tls, "ca", &ca).unwrap_or_else(|e| panic!("{e}"));
    pki::write(&tls, "server", &server).unwrap_or_else(|e| panic!("{e}"));
    pki::write(&tls, "client", &client).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("pool.secret"), SECRET).unwrap_or_else(|e| panic!("{e}"));
    let google = FakeGoogle::new();
    let google_addr = serve_router(google.router()).await;
    Env {
        dir,
        github,
        github_url: format!("http://{addr}/test-org"),
        github_api: format!("http://{addr}"),
        google,
        jwks_url: format!("http://{google_addr}/oauth2/v3/certs"),
        secret: SECRET.into(),
    }
}

pub struct Agent {
    pub child: tokio::process::Child,
    pub log: PathBuf,
    pub data: PathBuf,
}

impl Agent {
    /// An agent of the e2e pool against the test controller: HTTPS and gRPC over TLS with a
    /// client certificate, enrolled with the pool's bootstrap secret.
    pub fn spawn(
        env: &Env,
        vm: &str,
        http: SocketAddr,
        grpc: Option<SocketAddr>,
        extra: &[(&str, &str)],
    ) -> Agent {
        let secure = [
            ("MIGLET_CA_FILE", env.tls("ca.pem")),
            ("MIGLET_CLIENT_CERT", env.tls("client.pem")),
            ("MIGLET_CLIENT_KEY", env.tls("client-key.pem")),
            (
                "MIGLET_BOOTSTRAP_SECRET_FILE",
                env.dir.path().join("pool.secret"),
            ),
        ];
        let secure: Vec<(&str, String)> = secure
            .iter()
            .map(|(k, v)| (*k, v.display().to_string()))
            .collect();
        let mut all: Vec<(&str, &str)> = secure.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(extra);
        Self::spawn_with(env, vm, "https", http, grpc, &all)
    }

    /// [`Agent::spawn`] on a VM whose clock is off by `skew` (faketime's syntax, e.g.
    /// `+3h`); monotonic time is left alone, as on a real VM with a wrong wall clock.
    pub fn spawn_skewed(
        env: &Env,
        vm: &str,
        http: SocketAddr,
        grpc: Option<SocketAddr>,
        skew: &str,
    ) -> Agent {
        let secure = [
            ("MIGLET_CA_FILE", env.tls("ca.pem")),
            ("MIGLET_CLIENT_CERT", env.tls("client.pem")),
            ("MIGLET_CLIENT_KEY", env.tls("client-key.pem")),
            (
                "MIGLET_BOOTSTRAP_SECRET_FILE",
                env.dir.path().join("pool.secret"),
            ),
        ];
        let secure: Vec<(&str, String)> = secure
            .iter()
            .map(|(k, v)| (*k, v.display().to_string()))
            .collect();
        let mut all: Vec<(&str, &str)> = secure.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.push(("FAKETIME_DONT_FAKE_MONOTONIC", "1"));
        Self::spawn_wrapped(
            env,
            vm,
            "https",
            http,
            grpc,
            &all,
            &["faketime", "-f", skew],
        )
    }

    /// An agent speaking the base contract over plain HTTP with no credential.
    pub fn spawn_plain(
        env: &Env,
        vm: &str,
        http: SocketAddr,
        grpc: Option<SocketAddr>,
        extra: &[(&str, &str)],
    ) -> Agent {
        let mut all = vec![("MIGLET_AUTH", "none")];
        all.extend_from_slice(extra);
        Self::spawn_with(env, vm, "http", http, grpc, &all)
    }

    pub fn spawn_with(
        env: &Env,
        vm: &str,
        scheme: &str,
        http: SocketAddr,
        grpc: Option<SocketAddr>,
        extra: &[(&str, &str)],
    ) -> Agent {
        Self::spawn_wrapped(env, vm, scheme, http, grpc, extra, &[])
    }

    /// [`Agent::spawn_with`], run under `wrapper` (e.g. `faketime -f +3h`).
    pub fn spawn_wrapped(
        env: &Env,
        vm: &str,
        scheme: &str,
        http: SocketAddr,
        grpc: Option<SocketAddr>,
        extra: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Agent {
        let data = env.dir.path().join(format!("agent-{vm}"));
        let log = env.dir.path().join(format!("agent-{vm}.log"));
        let log_file = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = tokio::process::Command::new(program);
                c.args(args).arg(MIGLET);
                c
            }
            None => tokio::process::Command::new(MIGLET),
        };
        if !extra.iter().any(|(k, _)| *k == "MIGLET_RUNNER_USER") {
            cmd.arg("--runner-user=");
        }
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MIGLET_POOL_ID", "pool-e2e")
            .env("MIGLET_VM_ID", vm)
            .env("MIGLET_ORG_ID", "org-e2e")
            .env("MIGLET_CONTROLLER_ENDPOINT", format!("{scheme}://{http}"))
            .env(
                "MIGLET_CONTROLLER_GRPC_ENDPOINT",
                grpc.map_or("disabled".to_owned(), |g| format!("{scheme}://{g}")),
            )
            .env("MIGLET_DATA_DIR", &data)
            .env("MIGLET_RUNNER_DIR", env.dir.path().join("runner"))
            .env("MIGLET_HEARTBEAT_INTERVAL", "2s")
            .env("MIGLET_POLL_INTERVAL", "1s")
            .env("MIGLET_SHUTDOWN_GRACE_PERIOD", "3s")
            .env("MIGLET_METADATA", "false")
            .env("MIGLET_BOOT_ID", format!("boot-{vm}"));
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn miglet: {e}"));
        Agent { child, log, data }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        match tokio::time::timeout(Duration::from_secs(secs), self.child.wait()).await {
            Ok(Ok(s)) => s.code(),
            _ => panic!(
                "agent did not exit within {secs} s; log:\n{}",
                self.log_text()
            ),
        }
    }
}

pub fn job(name: &str, result: &str, ms: u64) -> Job {
    Job {
        name: name.into(),
        job_key: "build".into(),
        result: result.into(),
        duration_ms: ms,
        run_id: "777001".into(),
        repository: "acme/widgets".into(),
        sha: "0123abcd".into(),
        git_ref: "refs/heads/main".into(),
        runner: String::new(),
        ..Job::default()
    }
}

pub fn count(v: &[String], ty: &str) -> usize {
    v.iter().filter(|t| *t == ty).count()
}

/// No file the agent or the runner wrote, and no log line, holds the token.
pub fn assert_no_token(env: &Env, agent: &Agent) {
    assert!(!agent.log_text().contains(TOKEN), "token in the agent log");
    for dir in [agent.data.clone(), env.dir.path().join("runner")] {
        for (p, text) in miglet_sim::testkit::all_bytes_under(&dir) {
            if p.file_name().is_some_and(|n| n != "Runner.Listener") {
                assert!(!text.contains(TOKEN), "token found in {}", p.display());
            }
        }
    }
}

/// The real `mig-controller` binary.
pub fn controller_binary() -> PathBuf {
    sibling_binary("mig-controller", "mig-controller")
}

/// Every value of every row of every table of a SQLite file, as text.
pub async fn dump_sqlite(
    path: &Path,
) -> Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>> {
    use sqlx::{Column, ConnectOptions, Row};
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await?;
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
            .fetch_all(&mut conn)
            .await?;
    let mut out = Vec::new();
    for t in tables {
        // Table names come from sqlite_master of our own test database.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT * FROM \"{t}\"")))
            .fetch_all(&mut conn)
            .await?;
        for r in rows {
            let mut line = format!("{t}:");
            for c in r.columns() {
                let i = c.ordinal();
                let v = if let Ok(v) = r.try_get::<Option<String>, _>(i) {
                    v.unwrap_or_default()
                } else if let Ok(v) = r.try_get::<Option<i64>, _>(i) {
                    v.map(|n| n.to_string()).unwrap_or_default()
                } else if let Ok(v) = r.try_get::<Option<f64>, _>(i) {
                    v.map(|n| n.to_string()).unwrap_or_default()
                } else {
                    let b: Option<Vec<u8>> = r.try_get(i)?;
                    String::from_utf8_lossy(&b.unwrap_or_default()).into_owned()
                };
                line.push(' ');
                line.push_str(&v);
            }
            out.push(line);
        }
    }
    Ok(out)
}
