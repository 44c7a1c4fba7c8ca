//! Listener plumbing shared by both front ends: accepting TCP connections under caps (per
//! source address and in total), the TLS handshake and, for gRPC, the HTTP/2 client preface
//! (both within one deadline, off the accept loop so a slow client cannot stall others),
//! closing connections that stay idle, shedding load with a clear log line, and serving
//! HTTP/1.1 with a header read timeout and graceful shutdown.
//!
//! Every connection holds a slot in its listener's [`ConnTracker`] until it closes, so one
//! client (or a flood of half-open sockets) can never take the file descriptors that the
//! other listener, the store and real agents need.

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

/// Caps and deadlines of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnPolicy {
    /// `http` or `grpc`, in logs and metric labels.
    pub listener: &'static str,
    /// Open connections at most, all addresses together.
    pub max_total: usize,
    /// Open connections at most from one source address.
    pub max_per_addr: usize,
    /// The TLS handshake and the first bytes (HTTP/1.1: of a request; gRPC: the whole HTTP/2
    /// client preface) must arrive within this of the accept.
    pub handshake_timeout: Duration,
    /// Read and check the HTTP/2 client preface before handing the connection on (gRPC).
    pub h2_preface: bool,
    /// Close a connection that has had no request or stream in flight for this long
    /// (gRPC: covers a connection that never opens a stream). `None`: the server decides
    /// (HTTP/1.1 closes idle connections after its header read timeout).
    pub idle_timeout: Option<Duration>,
}

/// Labels of refused connections: which listener, and why.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RefusedLabels {
    pub listener: String,
    pub reason: String,
}

/// Connection counters of one listener, for the metrics.
#[derive(Debug, Clone, Default)]
pub struct ConnMetrics {
    pub listener: &'static str,
    pub open: Gauge,
    /// By listener and reason: `per_addr`, `total`, `evicted`, `handshake`.
    pub refused: Family<RefusedLabels, Counter>,
}

impl ConnMetrics {
    fn count(&self, reason: &str) {
        self.refused
            .get_or_create(&RefusedLabels {
                listener: self.listener.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// Open connections of one listener, by source address.
#[derive(Debug)]
pub struct ConnTracker {
    policy: ConnPolicy,
    total: AtomicUsize,
    by_addr: Mutex<HashMap<IpAddr, usize>>,
    metrics: ConnMetrics,
    shed: Mutex<ShedLog>,
    unproven: Mutex<Unproven>,
}

/// Connections that have not proven they are clients yet (no TLS handshake, no HTTP/2
/// preface, no first request), oldest first. When the listener is full, a new connection
/// takes the place of the oldest of them: a flood of silent sockets from many addresses can
/// fill the listener, but never keep a real client out.
#[derive(Debug, Default)]
struct Unproven {
    next: u64,
    order: std::collections::VecDeque<u64>,
    live: HashMap<u64, CancellationToken>,
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    PerAddr,
    Total,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::PerAddr => "per_addr",
            Refusal::Total => "total",
        }
    }
}

/// What was refused since the last log line.
#[derive(Debug, Default)]
struct ShedLog {
    last: Option<Instant>,
    per_addr: u64,
    total: u64,
    evicted: u64,
    accept_errors: u64,
    example: Option<IpAddr>,
}

/// A connection's place in its tracker, given back when the connection is dropped.
#[derive(Debug)]
pub struct Slot {
    tracker: Arc<ConnTracker>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.tracker.release(self.ip);
    }
}

impl ConnTracker {
    pub fn new(policy: ConnPolicy, metrics: ConnMetrics) -> Arc<ConnTracker> {
        Arc::new(ConnTracker {
            policy,
            total: AtomicUsize::new(0),
            by_addr: Mutex::new(HashMap::new()),
            metrics,
            shed: Mutex::new(ShedLog::default()),
            unproven: Mutex::new(Unproven::default()),
        })
    }

    fn unproven(&self) -> std::sync::MutexGuard<'_, Unproven> {
        self.unproven
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a new connection as not proven yet; the token is cancelled if it is evicted.
    fn track_unproven(&self) -> (u64, CancellationToken) {
        let mut u = self.unproven();
        u.next += 1;
        let id = u.next;
        let token = CancellationToken::new();
        u.order.push_back(id);
        u.live.insert(id, token.clone());
        (id, token)
    }

    /// The connection proved itself a client: it is no longer evictable.
    fn proven(&self, id: u64) {
        let mut u = self.unproven();
        u.live.remove(&id);
        // Keep the queue from growing with ids already gone.
        while u.order.front().is_some_and(|f| !u.live.contains_key(f)) {
            u.order.pop_front();
        }
    }

    /// Evicts the oldest connection that has not proven itself; whether there was one.
    fn evict_oldest(&self) -> bool {
        let mut u = self.unproven();
        while let Some(id) = u.order.pop_front() {
            if let Some(token) = u.live.remove(&id) {
                token.cancel();
                return true;
            }
        }
        false
    }

    pub fn policy(&self) -> &ConnPolicy {
        &self.policy
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    fn addrs(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.by_addr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for a new connection from `ip`, or why there is none. A full listener makes
    /// room by evicting its oldest unproven connection (which gives its slot back as soon as
    /// its task sees the eviction, so the total may run over by the evictions in flight).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let mut addrs = self.addrs();
        if addrs
            .get(&ip)
            .is_some_and(|n| *n >= self.policy.max_per_addr)
        {
            return Err(Refusal::PerAddr);
        }
        if self.total.load(Ordering::Relaxed) >= self.policy.max_total {
            if !self.evict_oldest() {
                return Err(Refusal::Total);
            }
            self.metrics.count("evicted");
            let mut log = self
                .shed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            log.evicted += 1;
            log.example.get_or_insert(ip);
            self.maybe_log(&mut log);
        }
        let n = addrs.entry(ip).or_insert(0);
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        self.metrics.open.inc();
        Ok(Slot {
            tracker: self.clone(),
            ip,
        })
    }

    fn release(&self, ip: IpAddr) {
        let mut addrs = self.addrs();
        if let Some(n) = addrs.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                addrs.remove(&ip);
            }
        }
        self.total.fetch_sub(1, Ordering::Relaxed);
        self.metrics.open.dec();
    }

    /// Counts a refusal and logs a summary at most every [`SHED_LOG_EVERY`].
    fn refused(&self, refusal: Refusal, ip: IpAddr) {
        self.metrics.count(refusal.as_str());
        let mut log = self
            .shed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match refusal {
            Refusal::PerAddr => log.per_addr += 1,
            Refusal::Total => log.total += 1,
        }
        log.example.get_or_insert(ip);
        self.maybe_log(&mut log);
    }

    fn accept_failed(&self, e: &io::Error) {
        let mut log = self
            .shed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        log.accept_errors += 1;
        if log.accept_errors == 1 {
            warn!(listener = self.policy.listener, error = %e, open = self.open(), "Cannot accept connections (out of file descriptors?); backing off. Raise the open-file limit or lower max_connections");
        }
        self.maybe_log(&mut log);
    }

    fn maybe_log(&self, log: &mut ShedLog) {
        let now = Instant::now();
        if log.last.is_some_and(|l| now < l + SHED_LOG_EVERY) {
            return;
        }
        log.last = Some(now);
        let p = &self.policy;
        if log.per_addr + log.total + log.evicted > 0 {
            warn!(
                listener = p.listener,
                over_per_addr = log.per_addr,
                over_total = log.total,
                evicted_silent = log.evicted,
                example_addr = ?log.example,
                open = self.open(),
                max_per_addr = p.max_per_addr,
                max_total = p.max_total,
                "Shedding load: closed new connections at once over the connection caps (max_connections_per_addr / max_connections in [limits]), or closed the oldest connections that had sent nothing to make room; a NAT'd fleet bigger than the per-address cap needs it raised"
            );
        }
        if log.accept_errors > 1 {
            warn!(
                listener = p.listener,
                failures = log.accept_errors,
                open = self.open(),
                "accept kept failing; backing off between attempts"
            );
        }
        *log = ShedLog {
            last: log.last,
            ..ShedLog::default()
        };
    }
}

/// Milliseconds since the process started, for activity stamps.
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    Instant::now().saturating_duration_since(start).as_millis() as u64
}

/// What is in flight on one connection, for its idle watch; its first request proves the
/// connection a client (see [`Unproven`]).
#[derive(Debug, Default)]
pub struct Activity {
    busy: AtomicUsize,
    last_ms: AtomicU64,
    unproven: Mutex<Option<(Arc<ConnTracker>, u64)>>,
}

/// Held while a request or stream is in flight on a connection.
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.last_ms.store(clock_ms(), Ordering::Relaxed);
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    fn new(unproven: Option<(Arc<ConnTracker>, u64)>) -> Arc<Activity> {
        Arc::new(Activity {
            busy: AtomicUsize::new(0),
            last_ms: AtomicU64::new(clock_ms()),
            unproven: Mutex::new(unproven),
        })
    }

    fn prove(&self) {
        let taken = self
            .unproven
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some((tracker, id)) = taken {
            tracker.proven(id);
        }
    }

    /// Marks the connection busy until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.prove();
        Busy(self.clone())
    }

    /// Notes a request (it keeps the connection from being idle for a while).
    pub fn touch(&self) {
        self.last_ms.store(clock_ms(), Ordering::Relaxed);
        self.prove();
    }
}

/// Who is on the other end of a gRPC connection, and what is in flight on it. Tonic puts it
/// in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnMeta {
    pub remote: SocketAddr,
    pub activity: Arc<Activity>,
}

/// Closes a connection (its next read fails) once it has been idle for `timeout`.
#[derive(Debug)]
struct IdleWatch {
    activity: Arc<Activity>,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl IdleWatch {
    /// Ready with an error once the connection is idle past its timeout.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        while self.sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if self.activity.busy.load(Ordering::Relaxed) > 0 {
                self.sleep.as_mut().reset(now + self.timeout);
                continue;
            }
            let idle_for = Duration::from_millis(
                clock_ms().saturating_sub(self.activity.last_ms.load(Ordering::Relaxed)),
            );
            if idle_for < self.timeout {
                self.sleep.as_mut().reset(now + (self.timeout - idle_for));
                continue;
            }
            return Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle with no request or stream",
            ));
        }
        Poll::Pending
    }
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection, with or without TLS, holding its slot.
#[derive(Debug)]
pub struct Conn {
    io: Io,
    /// Bytes read before the server took the connection (the HTTP/2 preface), replayed first.
    prefix: Vec<u8>,
    meta: ConnMeta,
    idle: Option<IdleWatch>,
    /// Ready when the listener evicted this connection before it proved itself.
    evicted: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
    _slot: Slot,
}

impl Conn {
    pub fn meta(&self) -> &ConnMeta {
        &self.meta
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(w) = &mut this.idle
            && let Poll::Ready(e) = w.poll_expired(cx)
        {
            return Poll::Ready(Err(e));
        }
        if let Some(ev) = &mut this.evicted
            && ev.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "evicted: the listener was full and this connection had sent no request",
            )));
        }
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.drain(..n);
            return Poll::Ready(Ok(()));
        }
        match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(t) => t.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnMeta;

    fn connect_info(&self) -> ConnMeta {
        self.meta.clone()
    }
}

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
                let policy = tracker.policy();
                let (id, evicted) = tracker.track_unproven();
                let ready = tokio::select! {
                    () = evicted.cancelled() => {
                        debug!(%peer, listener = policy.listener, "Connection evicted during its handshake: the listener is full");
                        return;
                    }
                    r = tokio::time::timeout(
                        policy.handshake_timeout,
                        handshake(tcp, &security, policy.h2_preface),
                    ) => r,
                };
                let (io, prefix) = match ready {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        tracker.proven(id);
                        tracker.metrics.count("handshake");
                        debug!(%peer, listener = policy.listener, error = %e, "Connection closed during its handshake");
                        return;
                    }
                    Err(_) => {
                        tracker.proven(id);
                        tracker.metrics.count("handshake");
                        debug!(%peer, listener = policy.listener, "Connection closed: no TLS handshake / first bytes within the deadline");
                        return;
                    }
                };
                // HTTP/1.1: the first bytes of a request prove a client. gRPC: only its first
                // request or stream does (an HTTP/2 preface costs nothing to send).
                let unproven = if policy.h2_preface {
                    Some((tracker.clone(), id))
                } else {
                    tracker.proven(id);
                    None
                };
                let activity = Activity::new(unproven);
                let idle = policy.idle_timeout.map(|timeout| IdleWatch {
                    activity: activity.clone(),
                    timeout,
                    sleep: Box::pin(tokio::time::sleep(timeout)),
                });
                let conn = Conn {
                    io,
                    prefix,
                    meta: ConnMeta {
                        remote: peer,
                        activity,
                    },
                    idle,
                    evicted: policy
                        .h2_preface
                        .then(|| Box::pin(evicted.cancelled_owned())),
                    _slot: slot,
                };
                let _ = tx.send((conn, peer)).await;
            });
        }
    });
    rx
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

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(per_addr: usize, total: usize) -> ConnPolicy {
        ConnPolicy {
            listener: "test",
            max_total: total,
            max_per_addr: per_addr,
            handshake_timeout: Duration::from_secs(1),
            h2_preface: false,
            idle_timeout: None,
        }
    }

    #[test]
    fn caps_per_address_and_in_total_and_slots_come_back() {
        let t = ConnTracker::new(policy(2, 3), ConnMetrics::default());
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = t.admit(a);
        let a2 = t.admit(a);
        assert!(a1.is_ok() && a2.is_ok());
        assert_eq!(t.admit(a).err(), Some(Refusal::PerAddr));
        let b1 = t.admit(b);
        assert!(b1.is_ok());
        assert_eq!(t.admit(b).err(), Some(Refusal::Total));
        assert_eq!(t.open(), 3);
        drop(a1);
        assert_eq!(t.open(), 2);
        assert!(t.admit(a).is_ok(), "a slot came back");
        drop((a2, b1));
        assert!(t.addrs().len() <= 1);
    }

    #[test]
    fn a_full_listener_evicts_its_oldest_unproven_connection() {
        let t = ConnTracker::new(policy(10, 2), ConnMetrics::default());
        let ip: IpAddr = [10, 0, 0, 1].into();
        let _s1 = t.admit(ip);
        let (id1, tok1) = t.track_unproven();
        let _s2 = t.admit(ip);
        let (_id2, tok2) = t.track_unproven();
        // The first proves itself; the listener is full; a newcomer evicts the second.
        t.proven(id1);
        let s3 = t.admit(ip);
        assert!(s3.is_ok());
        assert!(!tok1.is_cancelled() && tok2.is_cancelled());
        // Nobody left to evict: refused.
        assert_eq!(t.admit(ip).err(), Some(Refusal::Total));
        // Proven connections that finish leave nothing behind in the queue.
        assert!(t.unproven().order.is_empty() && t.unproven().live.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_expires_and_a_busy_one_does_not() {
        let activity = Activity::new(None);
        let mut w = IdleWatch {
            activity: activity.clone(),
            timeout: Duration::from_secs(30),
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(30))),
        };
        let poll = |w: &mut IdleWatch| {
            let waker = std::task::Waker::noop();
            let mut cx = Context::from_waker(waker);
            w.poll_expired(&mut cx).is_ready()
        };
        assert!(!poll(&mut w));
        let busy = activity.begin();
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(!poll(&mut w), "a stream is open");
        tokio::time::advance(Duration::from_secs(20)).await;
        drop(busy);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(!poll(&mut w), "idle for 20 s only");
        activity.touch();
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(!poll(&mut w), "a request 29 s ago");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(poll(&mut w), "idle for 31 s");
    }
}
