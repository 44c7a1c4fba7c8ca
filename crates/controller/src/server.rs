//! Wires the store, the controller core, both front ends and the reconciler together.
//!
//! [`start`] takes already-bound listeners (binaries bind the configured addresses; tests
//! bind port 0) and returns a handle; [`RunningServer::shutdown`] stops accepting, closes
//! every stream, lets in-flight requests finish, stops the reconciler, and flushes the store,
//! each step bounded in time.

use crate::app::Controller;
use crate::auth::credential::{CredentialKey, write_secret_file};
use crate::auth::enroll::Enroller;
use crate::auth::limits::RateLimits;
use crate::auth::{AuthMode, Gatekeeper};
use crate::config::Settings;
use crate::grpc::{GrpcService, MAX_MESSAGE};
use crate::net::{ConnPolicy, ConnTracker, Security};
use crate::store::{Store, StoreError};
use crate::tls::TlsFiles;
use miglet_proto::pb::command_service_server::CommandServiceServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// How long shutdown waits for in-flight work before giving up on it.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("failed to bind {what} listener on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read the bound address")]
    LocalAddr(#[source] std::io::Error),
    #[error("failed to open the store")]
    Store(#[from] StoreError),
    #[error("TLS setup failed")]
    Tls(#[from] crate::tls::TlsError),
    #[error("credential key unusable")]
    Key(#[from] crate::auth::credential::KeyError),
    #[error("failed to write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the HTTP and gRPC listeners of `settings`.
pub async fn bind(settings: &Settings) -> Result<(TcpListener, TcpListener), ServeError> {
    let http = TcpListener::bind(settings.http_addr)
        .await
        .map_err(|source| ServeError::Bind {
            what: "HTTP",
            addr: settings.http_addr,
            source,
        })?;
    let grpc = TcpListener::bind(settings.grpc_addr)
        .await
        .map_err(|source| ServeError::Bind {
            what: "gRPC",
            addr: settings.grpc_addr,
            source,
        })?;
    Ok((http, grpc))
}

/// A running controller.
#[derive(Debug)]
pub struct RunningServer {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    /// Where `/metrics` is served, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    pub app: Arc<Controller>,
    /// The live TLS files, if TLS is on.
    pub tls: Option<Arc<TlsFiles>>,
    shutdown: CancellationToken,
    http_task: JoinHandle<()>,
    grpc_task: JoinHandle<()>,
    reconciler: JoinHandle<()>,
    /// The runner loop (where a pool mints on GitHub) and the scaler (where a pool has a
    /// provider).
    loops: Vec<JoinHandle<()>>,
    sessions: TaskTracker,
    store: Store,
}

/// Opens the store and starts serving on the given listeners.
pub async fn start(
    settings: Settings,
    http: TcpListener,
    grpc: TcpListener,
) -> Result<RunningServer, ServeError> {
    let mut settings = settings;
    // One clock for every rule, credentials included.
    settings.enroll.clock = settings.clock.clone();
    let http_addr = http.local_addr().map_err(ServeError::LocalAddr)?;
    let grpc_addr = grpc.local_addr().map_err(ServeError::LocalAddr)?;
    let store = Store::open_sqlite(&settings.data_dir).await?;
    reset_connections(&store, &settings.clock).await?;
    let gate = Gatekeeper {
        mode: settings.auth_mode,
        enroller: Enroller::new(
            CredentialKey::load_or_create(&settings.credential_key_file)?,
            settings.enroll.clone(),
        ),
        limits: RateLimits::new(settings.per_vm_limit, settings.per_addr_limit),
    };
    if settings.auth_mode == AuthMode::Authenticated {
        first_start_secrets(&settings, &store).await?;
    }
    bind_installation(&settings)?;
    let tls = settings.tls.as_ref().map(TlsFiles::load).transpose()?;
    let shutdown = CancellationToken::new();
    let settings = Arc::new(settings);
    let app = Controller::new(store.clone(), settings.clone(), shutdown.clone(), gate);
    let sessions = TaskTracker::new();
    let (http_security, grpc_security) = securities(tls.as_ref(), &shutdown);
    let (http_policy, grpc_policy) = conn_policies(&settings.conn, settings.header_timeout);
    info!(
        http_max = http_policy.max_total,
        grpc_max = grpc_policy.max_total,
        per_addr = grpc_policy.max_per_addr,
        "Connection caps"
    );
    let http_tracker = ConnTracker::new(http_policy, app.metrics().connections("http"));
    let grpc_tracker = ConnTracker::new(grpc_policy, app.metrics().connections("grpc"));
    let router = crate::http::router(app.clone());
    let http_conns = crate::net::accept(http, http_security, http_tracker, shutdown.clone());
    let http_task = tokio::spawn(crate::net::serve_http(
        http_conns,
        router,
        settings.header_timeout,
        shutdown.clone(),
        SHUTDOWN_GRACE,
    ));
    let grpc_conns = crate::net::accept(grpc, grpc_security, grpc_tracker, shutdown.clone());
    let grpc_task = tokio::spawn(serve_grpc(
        app.clone(),
        sessions.clone(),
        grpc_conns,
        shutdown.clone(),
    ));
    let metrics_addr = match settings.metrics_addr {
        None => None,
        Some(addr) => Some(serve_metrics(app.clone(), addr, shutdown.clone()).await?),
    };
    app.set_advertised(advertised(http_addr, grpc_addr, tls.is_some()));
    let (reconciler, loops) = background(&app, &settings, &shutdown);
    info!(%http_addr, %grpc_addr, data_dir = %settings.data_dir.display(), auth_mode = settings.auth_mode.as_str(), tls = tls.is_some(), mutual_tls = tls.as_ref().is_some_and(|t| t.mutual()), metrics_addr = ?metrics_addr, "MIG controller listening");
    Ok(RunningServer {
        http_addr,
        grpc_addr,
        metrics_addr,
        app,
        tls,
        shutdown,
        http_task,
        grpc_task,
        reconciler,
        loops,
        sessions,
        store,
    })
}

/// Where agents on this machine reach the listeners (an unspecified address is reached on
/// loopback).
fn advertised(http: SocketAddr, grpc: SocketAddr, tls: bool) -> crate::app::Advertised {
    let scheme = if tls { "https" } else { "http" };
    let url = |a: SocketAddr| {
        let ip = match a.ip() {
            std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
                std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
            }
            std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
                std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
            }
            ip => ip,
        };
        format!("{scheme}://{}", SocketAddr::new(ip, a.port()))
    };
    crate::app::Advertised {
        http: url(http),
        grpc: url(grpc),
    }
}

/// Only a pool that registers runners on GitHub needs this installation's id: it is read
/// (or created) in the data dir and given to every pool's source.
fn bind_installation(settings: &Settings) -> Result<(), ServeError> {
    if settings.pools.any_github() {
        let installation = installation_id(&settings.data_dir)?;
        for (_, pool) in settings.pools.iter() {
            pool.token.bind_installation(&installation);
        }
    }
    Ok(())
}

/// The background loops: the reconciler; the runner loop where a pool mints on GitHub; the
/// scaler where a pool has a provider.
fn background(
    app: &Arc<Controller>,
    settings: &Settings,
    shutdown: &CancellationToken,
) -> (JoinHandle<()>, Vec<JoinHandle<()>>) {
    let reconciler = tokio::spawn(reconcile_loop(
        app.clone(),
        settings.reconcile_interval,
        shutdown.clone(),
    ));
    let runner_loop = settings.pools.any_github().then(|| {
        tokio::spawn(runner_loop(
            app.clone(),
            settings.reconcile_interval,
            shutdown.clone(),
        ))
    });
    let scaler = settings.pools.any_scaled().then(|| {
        tokio::spawn(scale_loop(
            app.clone(),
            settings.reconcile_interval,
            shutdown.clone(),
        ))
    });
    let backstop = settings
        .backstop
        .interval
        .filter(|_| settings.pools.any_scaled())
        .map(|every| tokio::spawn(backstop_loop(app.clone(), every, shutdown.clone())));
    (
        reconciler,
        runner_loop
            .into_iter()
            .chain(scaler)
            .chain(backstop)
            .collect(),
    )
}

/// The backstop poll of GitHub's API, once per interval, until shutdown.
async fn backstop_loop(app: Arc<Controller>, every: Duration, shutdown: CancellationToken) {
    let pass = || {
        let app = app.clone();
        async move {
            app.backstop_once().await;
        }
    };
    passes(every, &shutdown, std::future::pending, pass).await;
}

/// Passes started by nudges are at least this far apart: a burst of changes (a fleet's
/// events) makes one more pass, not one each.
const SCALER_COALESCE: Duration = Duration::from_millis(200);

/// How long a nudge waits before its pass: nothing after a quiet spell (a queued job on a
/// cold pool is served at once), else until [`SCALER_COALESCE`] after the last nudged pass.
/// Timer passes do not count: they never delay new demand.
fn coalesce_wait(since_last_nudged_pass: Option<Duration>) -> Duration {
    since_last_nudged_pass.map_or(Duration::ZERO, |e| SCALER_COALESCE.saturating_sub(e))
}

/// The scaler: a pass per interval and whenever demand or a VM changes, until shutdown.
async fn scale_loop(app: Arc<Controller>, every: Duration, shutdown: CancellationToken) {
    let last_nudged: Arc<std::sync::Mutex<Option<tokio::time::Instant>>> = Arc::default();
    let nudged = || {
        let (app, last_nudged) = (app.clone(), last_nudged.clone());
        async move {
            app.scaler_nudged().await;
            let since = last_nudged
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .map(|t| t.elapsed());
            tokio::time::sleep(coalesce_wait(since)).await;
            *last_nudged
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Some(tokio::time::Instant::now());
        }
    };
    let pass = || {
        let app = app.clone();
        async move { app.scale_once().await }
    };
    passes(every, &shutdown, nudged, pass).await;
}

/// Runs `pass` once per `every`, and whenever `nudged` completes, until shutdown (which
/// also cuts a pass short: every step of these passes is tried again by the next one).
async fn passes<N, NF, P, PF>(every: Duration, shutdown: &CancellationToken, nudged: N, pass: P)
where
    N: Fn() -> NF,
    NF: std::future::Future<Output = ()>,
    P: Fn() -> PF,
    PF: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            () = nudged() => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = pass() => {}
        }
    }
}

/// Each listener's TLS config (watched for renewal until `shutdown`), or plain TCP.
fn securities(tls: Option<&Arc<TlsFiles>>, shutdown: &CancellationToken) -> (Security, Security) {
    match tls {
        None => (Security::Plain, Security::Plain),
        Some(files) => {
            tokio::spawn(files.clone().watch(shutdown.clone()));
            (
                Security::Tls {
                    files: files.clone(),
                    pick: TlsFiles::http,
                },
                Security::Tls {
                    files: files.clone(),
                    pick: TlsFiles::grpc,
                },
            )
        }
    }
}

/// The gRPC server (the command stream and gRPC health) on the accepted connections, until
/// `stop`.
async fn serve_grpc(
    app: Arc<Controller>,
    sessions: TaskTracker,
    conns: tokio::sync::mpsc::Receiver<(crate::net::Conn, std::net::SocketAddr)>,
    stop: CancellationToken,
) {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CommandServiceServer<GrpcService>>()
        .await;
    let service = CommandServiceServer::new(GrpcService::new(app, sessions))
        .max_decoding_message_size(MAX_MESSAGE);
    let incoming = ReceiverStream::new(conns).map(|(conn, _peer)| Ok::<_, std::io::Error>(conn));
    let serve = tonic::transport::Server::builder()
        // Finds dead peers on idle streams; far slower than any client's ping policy.
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(crate::net::ActivityLayer)
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned());
    if let Err(e) = serve.await {
        warn!(error = %e, "gRPC server stopped with an error");
    }
    health_reporter
        .set_not_serving::<CommandServiceServer<GrpcService>>()
        .await;
}

/// `GET /metrics` (OpenMetrics) on its own listener; returns the bound address.
async fn serve_metrics(
    app: Arc<Controller>,
    addr: std::net::SocketAddr,
    stop: CancellationToken,
) -> Result<std::net::SocketAddr, ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            what: "metrics",
            addr,
            source,
        })?;
    let bound = listener.local_addr().map_err(ServeError::LocalAddr)?;
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let app = app.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    app.render_metrics().await,
                )
            }
        }),
    );
    tokio::spawn(async move {
        let serve = axum::serve(listener, router).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = serve.await {
            warn!(error = %e, "Metrics server stopped with an error");
        }
    });
    Ok(bound)
}

/// File descriptors kept out of the connection caps: the store's connections, its WAL,
/// TLS and secret files re-read at use, the metrics listener, outbound HTTP.
const FD_RESERVE: usize = 512;

/// The caps of both listeners. Without an explicit total, the open-file limit less
/// [`FD_RESERVE`] is shared: an eighth (at most 4,096) for HTTP, the rest for gRPC streams.
/// An HTTP client's first bytes are due within the header timeout, like the rest of its
/// headers.
pub fn conn_policies(
    c: &crate::config::ConnSettings,
    header_timeout: Duration,
) -> (ConnPolicy, ConnPolicy) {
    let total = c.max_connections.unwrap_or_else(|| {
        use nix::sys::resource::{Resource, getrlimit};
        let soft = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
        (usize::try_from(soft).unwrap_or(usize::MAX))
            .saturating_sub(FD_RESERVE)
            .max(64)
    });
    let http = (total / 8).clamp(1, 4096);
    let grpc = total.saturating_sub(http).max(1);
    let policy = |listener, max_total, handshake_timeout, h2_preface, idle_timeout| ConnPolicy {
        listener,
        max_total,
        max_per_addr: c.max_connections_per_addr,
        handshake_timeout,
        h2_preface,
        idle_timeout,
    };
    (
        policy(
            "http",
            http,
            c.handshake_timeout.min(header_timeout),
            false,
            None,
        ),
        policy(
            "grpc",
            grpc,
            c.handshake_timeout,
            true,
            Some(c.grpc_idle_timeout),
        ),
    )
}

/// The file an automatically created first admin token is written to.
pub fn initial_admin_token_file(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("initial-admin-token")
}

/// What an authenticated controller needs on its first start so that it works in one
/// command: the development pool's bootstrap secret (only with development defaults) and, if
/// no operator token exists yet, an admin token. Both go to files only the owner can read;
/// neither is logged.
async fn first_start_secrets(settings: &Settings, store: &Store) -> Result<(), ServeError> {
    let write = |path: &std::path::Path, text: &str| {
        write_secret_file(path, text).map_err(|source| ServeError::Write {
            path: path.display().to_string(),
            source,
        })
    };
    if settings.dev_defaults {
        let path = crate::config::dev_secret_file(&settings.data_dir);
        if !path.exists() {
            let bytes = crate::auth::random_bytes(24).map_err(|_| ServeError::Write {
                path: path.display().to_string(),
                source: std::io::Error::other("no randomness available"),
            })?;
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            write(&path, &hex)?;
        }
    }
    if store.operator_tokens_list().await?.is_empty() {
        let now = settings.clock.now_ms();
        let minted = crate::auth::operator::mint(
            "initial-admin",
            crate::auth::Role::Admin,
            "controller (first start)",
            now,
            None,
        )
        .map_err(|e| ServeError::Write {
            path: "operator token".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        // The file first: a token stored but written nowhere would lock the operator out.
        let path = initial_admin_token_file(&settings.data_dir);
        write(&path, &minted.token)?;
        let by = crate::app::local::Actor {
            name: "controller (first start)",
            remote: None,
            now,
        };
        let note = format!("file={}", path.display());
        crate::app::local::store_operator_token(store, by, &minted, Some(&note)).await?;
        warn!(file = %path.display(), "No operator token existed: created an admin token in this file (readable by its owner only). Create named tokens with `mig-controller token create` and delete this file.");
    }
    Ok(())
}

/// This installation's id: random at the first start, kept in the data dir. It tells this
/// controller's runners on GitHub from those of any other.
fn installation_id(data_dir: &std::path::Path) -> Result<String, ServeError> {
    let path = data_dir.join("installation-id");
    if let Ok(text) = std::fs::read_to_string(&path)
        && !text.trim().is_empty()
    {
        return Ok(text.trim().to_owned());
    }
    let bytes = crate::auth::random_bytes(6).map_err(|_| ServeError::Write {
        path: path.display().to_string(),
        source: std::io::Error::other("no randomness available"),
    })?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, format!("{id}\n")).map_err(|source| ServeError::Write {
        path: path.display().to_string(),
        source,
    })?;
    Ok(id)
}

/// A new controller process holds no stream yet: whatever the last one recorded as connected
/// (it may have been killed before it could say otherwise) is not.
async fn reset_connections(store: &Store, clock: &crate::clock::Clock) -> Result<(), ServeError> {
    let n = crate::app::local::reset_connections(store, clock.now_ms()).await?;
    if n > 0 {
        info!(
            vms = n,
            "VMs the previous run recorded as connected are marked disconnected until they reconnect"
        );
    }
    Ok(())
}

/// The reconciler: one idempotent pass per interval, until shutdown.
async fn reconcile_loop(app: Arc<Controller>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        app.gate().limits.prune();
        app.audit().flush_suppressed().await;
        match app.reconcile_once().await {
            Ok(report) if report != Default::default() => info!(?report, "Reconciler pass"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "Reconciler pass failed; next pass retries"),
        }
    }
}

/// The runners on GitHub, in their own loop so that a slow GitHub never holds up the
/// reconciler: one pass per interval, until shutdown.
async fn runner_loop(app: Arc<Controller>, every: Duration, shutdown: CancellationToken) {
    let pass = || {
        let app = app.clone();
        async move {
            let report = app.runners_once().await;
            if report != Default::default() {
                info!(?report, "Runner pass");
            }
        }
    };
    passes(every, &shutdown, std::future::pending, pass).await;
}

impl RunningServer {
    /// A token that stops the server when cancelled (e.g. from a signal handler).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the shutdown token is cancelled, then shuts down.
    pub async fn run_until_stopped(self) {
        self.shutdown.cancelled().await;
        self.shutdown().await;
    }

    /// Graceful shutdown; see the module docs.
    pub async fn shutdown(self) {
        info!("Shutting down: closing listeners and streams");
        self.shutdown.cancel();
        let bounded = |what: &'static str, h: JoinHandle<()>| async move {
            match tokio::time::timeout(SHUTDOWN_GRACE, h).await {
                Ok(_) => {}
                Err(_) => warn!(what, "Did not stop within the grace period"),
            }
        };
        self.sessions.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.sessions.wait())
            .await
            .is_err()
        {
            warn!("Stream sessions did not end within the grace period");
        }
        bounded("gRPC server", self.grpc_task).await;
        bounded("HTTP server", self.http_task).await;
        bounded("reconciler", self.reconciler).await;
        for task in self.loops {
            bounded("background loop", task).await;
        }
        self.store.close().await;
        info!("Store flushed; shutdown complete");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nudge_after_a_quiet_spell_passes_at_once_and_a_burst_is_coalesced() {
        assert_eq!(coalesce_wait(None), Duration::ZERO);
        assert_eq!(coalesce_wait(Some(Duration::from_secs(5))), Duration::ZERO);
        assert_eq!(
            coalesce_wait(Some(Duration::from_millis(50))),
            Duration::from_millis(150)
        );
    }
}
