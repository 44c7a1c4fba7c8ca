//! Listener plumbing shared by both front ends: accepting TCP connections under caps (per
//! source address and in total), the TLS handshake and, for gRPC, the HTTP/2 client preface
//! (both within one deadline, off the accept loop so a slow client cannot stall others),
//! closing connections that stay idle, shedding load with a clear log line, and serving
//! HTTP/1.1 with a header read timeout and graceful shutdown.
//!
//! Every connection holds a slot in its listener's [`ConnTracker`] until it closes, so one
//! client (or a flood of half-open sockets) can never take the file descriptors that the
//! other listener, the store and real agents need.

mod conn;
mod tracker;

pub use conn::*;
pub use tracker::*;

use crate::tls::TlsFiles;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use rustls::ServerConfig;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, warn};

/// Accepted connections waiting for a server to take them.
const BACKLOG: usize = 1024;
/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Refusals are logged at most this often per listener (with how many there were).
const SHED_LOG_EVERY: Duration = Duration::from_secs(10);
/// Which TLS config a listener uses, if any.
#[derive(Debug, Clone)]
pub enum Security {
    Plain,
    Tls {
        files: Arc<TlsFiles>,
        pick: fn(&TlsFiles) -> Arc<ServerConfig>,
    },
}

/// Accepts connections on `listener` until `stop` under `tracker`'s caps; each connection's
/// TLS handshake and HTTP/2 preface run in a task of their own within the policy's deadline,
/// and the ready ones are handed out on the returned channel.
pub fn accept(
    listener: TcpListener,
    security: Security,
    tracker: Arc<ConnTracker>,
    stop: CancellationToken,
) -> mpsc::Receiver<(Conn, SocketAddr)> {
    let (tx, rx) = mpsc::channel(BACKLOG);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(10);
        loop {
            let (tcp, peer) = tokio::select! {
                () = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => {
                        backoff = Duration::from_millis(10);
                        c
                    }
                    Err(e) => {
                        // EMFILE and friends: back off (up to a second) instead of spinning.
                        tracker.accept_failed(&e);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
            };
            let slot = match tracker.admit(peer.ip()) {
                Ok(s) => s,
                Err(refusal) => {
                    // Closed at once: the socket is given back, nobody waits on it.
                    drop(tcp);
                    tracker.refused(refusal, peer.ip());
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            let security = security.clone();
            let tracker = tracker.clone();
            tokio::spawn(async move {
                if let Some(conn) = ready_conn(tcp, peer, slot, &security, tracker).await {
                    let _ = tx.send((conn, peer)).await;
                }
            });
        }
    });
    rx
}

/// One accepted connection's TLS handshake and HTTP/2 preface, within the policy's deadline:
/// the connection ready to serve, or `None` (closed, counted, logged at debug).
async fn ready_conn(
    tcp: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    security: &Security,
    tracker: Arc<ConnTracker>,
) -> Option<Conn> {
    let policy = tracker.policy();
    let (id, evicted) = tracker.track_unproven();
    let ready = tokio::select! {
        () = evicted.cancelled() => {
            debug!(%peer, listener = policy.listener, "Connection evicted during its handshake: the listener is full");
            return None;
        }
        r = tokio::time::timeout(
            policy.handshake_timeout,
            handshake(tcp, security, policy.h2_preface),
        ) => r,
    };
    let (io, prefix) = match ready {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracker.proven(id);
            tracker.metrics.count("handshake");
            debug!(%peer, listener = policy.listener, error = %e, "Connection closed during its handshake");
            return None;
        }
        Err(_) => {
            tracker.proven(id);
            tracker.metrics.count("handshake");
            debug!(%peer, listener = policy.listener, "Connection closed: no TLS handshake / first bytes within the deadline");
            return None;
        }
    };
    // HTTP/1.1: the first bytes of a request prove a client. gRPC: only its first request
    // or stream does (an HTTP/2 preface costs nothing to send), and until then the listener
    // may evict it.
    let h2 = policy.h2_preface;
    if !h2 {
        tracker.proven(id);
    }
    let idle_timeout = policy.idle_timeout;
    let unproven = h2.then_some((tracker, id));
    Some(Conn::new(
        io,
        prefix,
        peer,
        idle_timeout,
        unproven,
        h2.then_some(evicted),
        slot,
    ))
}

/// TLS (if configured), then the HTTP/2 client preface (if asked for).
async fn handshake(
    tcp: TcpStream,
    security: &Security,
    h2_preface: bool,
) -> io::Result<(Io, Vec<u8>)> {
    let mut io = match security {
        Security::Plain => Io::Plain(tcp),
        Security::Tls { files, pick } => {
            let acceptor = tokio_rustls::TlsAcceptor::from(pick(files));
            Io::Tls(Box::new(acceptor.accept(tcp).await?))
        }
    };
    let mut prefix = Vec::new();
    if h2_preface {
        let mut preface = [0u8; 24];
        match &mut io {
            Io::Plain(s) => s.read_exact(&mut preface).await?,
            Io::Tls(t) => t.read_exact(&mut preface).await?,
        };
        if &preface != H2_PREFACE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not an HTTP/2 client (gRPC needs HTTP/2)",
            ));
        }
        prefix.extend_from_slice(&preface);
    } else {
        // The first bytes of the first request (the rest is the HTTP server's to read).
        let mut first = [0u8; 512];
        let n = match &mut io {
            Io::Plain(s) => s.read(&mut first).await?,
            Io::Tls(t) => t.read(&mut first).await?,
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before sending a request",
            ));
        }
        prefix.extend_from_slice(&first[..n]);
    }
    Ok((io, prefix))
}

/// Serves `router` over HTTP/1.1 on the connections of `incoming` until `stop`, then waits
/// up to `grace` for open connections to finish their requests.
pub async fn serve_http(
    mut incoming: mpsc::Receiver<(Conn, SocketAddr)>,
    router: Router,
    header_timeout: Duration,
    stop: CancellationToken,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    loop {
        let (conn, peer) = tokio::select! {
            () = stop.cancelled() => break,
            c = incoming.recv() => match c {
                Some(c) => c,
                None => break,
            },
        };
        let svc = router.clone().map_request(
            move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            },
        );
        let connection =
            builder.serve_connection(TokioIo::new(conn), TowerToHyperService::new(svc));
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(incoming);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("HTTP connections still open after the grace period");
    }
}

/// A tower layer for the gRPC server: every request marks its connection busy while its
/// handler runs, so short requests (health checks) keep a connection from idling out.
#[derive(Debug, Clone, Copy, Default)]
pub struct ActivityLayer;

impl<S> tower::Layer<S> for ActivityLayer {
    type Service = ActivityService<S>;

    fn layer(&self, inner: S) -> ActivityService<S> {
        ActivityService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct ActivityService<S> {
    inner: S,
}

impl<S, B> tower::Service<axum::http::Request<B>> for ActivityService<S>
where
    S: tower::Service<axum::http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> S::Future {
        if let Some(meta) = req.extensions().get::<ConnMeta>() {
            meta.activity.touch();
        }
        self.inner.call(req)
    }
}
