//! Wires the store, the controller core, both front ends and the reconciler together.
//!
//! [`start`] takes already-bound listeners (binaries bind the configured addresses; tests
//! bind port 0) and returns a handle; [`RunningServer::shutdown`] stops accepting, closes
//! every stream, lets in-flight requests finish, stops the reconciler, and flushes the store,
//! each step bounded in time.

use crate::app::Controller;
use crate::config::Settings;
use crate::grpc::{GrpcService, MAX_MESSAGE};
use crate::store::{Store, StoreError};
use miglet_proto::pb::command_service_server::CommandServiceServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
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
    pub app: Arc<Controller>,
    shutdown: CancellationToken,
    http_task: JoinHandle<()>,
    grpc_task: JoinHandle<()>,
    reconciler: JoinHandle<()>,
    sessions: TaskTracker,
    store: Store,
}

/// Opens the store and starts serving on the given listeners.
pub async fn start(
    settings: Settings,
    http: TcpListener,
    grpc: TcpListener,
) -> Result<RunningServer, ServeError> {
    let http_addr = http.local_addr().map_err(ServeError::LocalAddr)?;
    let grpc_addr = grpc.local_addr().map_err(ServeError::LocalAddr)?;
    let store = Store::open_sqlite(&settings.data_dir).await?;
    let shutdown = CancellationToken::new();
    let settings = Arc::new(settings);
    let app = Controller::new(store.clone(), settings.clone(), shutdown.clone());
    let sessions = TaskTracker::new();

    let router = crate::http::router(app.clone());
    let stop = shutdown.clone();
    let http_task = tokio::spawn(async move {
        let serve = axum::serve(
            http,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = serve.await {
            warn!(error = %e, "HTTP server stopped with an error");
        }
    });

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CommandServiceServer<GrpcService>>()
        .await;
    let service = CommandServiceServer::new(GrpcService::new(app.clone(), sessions.clone()))
        .max_decoding_message_size(MAX_MESSAGE);
    let stop = shutdown.clone();
    let grpc_task = tokio::spawn(async move {
        let serve = tonic::transport::Server::builder()
            // Finds dead peers on idle streams; far slower than any client's ping policy.
            .http2_keepalive_interval(Some(Duration::from_secs(60)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(health_service)
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(grpc), stop.cancelled_owned());
        if let Err(e) = serve.await {
            warn!(error = %e, "gRPC server stopped with an error");
        }
        health_reporter
            .set_not_serving::<CommandServiceServer<GrpcService>>()
            .await;
    });

    let reconciler = tokio::spawn(reconcile_loop(
        app.clone(),
        settings.reconcile_interval,
        shutdown.clone(),
    ));
    info!(%http_addr, %grpc_addr, data_dir = %settings.data_dir.display(), "MIG controller listening");
    Ok(RunningServer {
        http_addr,
        grpc_addr,
        app,
        shutdown,
        http_task,
        grpc_task,
        reconciler,
        sessions,
        store,
    })
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
        match app.reconcile_once().await {
            Ok(report) if report != Default::default() => info!(?report, "Reconciler pass"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "Reconciler pass failed; next pass retries"),
        }
    }
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
        self.store.close().await;
        info!("Store flushed; shutdown complete");
    }
}
