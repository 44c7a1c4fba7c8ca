//! One accepted connection: its I/O (plain or TLS), what is in flight on it, and the idle
//! watch that closes it when nothing has been for the policy's idle time.

use super::*;

/// Milliseconds since the process started, for activity stamps.
pub(super) fn clock_ms() -> u64 {
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
    pub(super) fn new(unproven: Option<(Arc<ConnTracker>, u64)>) -> Arc<Activity> {
        Arc::new(Activity {
            busy: AtomicUsize::new(0),
            last_ms: AtomicU64::new(clock_ms()),
            unproven: Mutex::new(unproven),
        })
    }

    pub(super) fn prove(&self) {
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
pub(super) struct IdleWatch {
    activity: Arc<Activity>,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl IdleWatch {
    /// Ready with an error once the connection is idle past its timeout.
    pub(super) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
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
pub(super) enum Io {
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
    /// A connection past its handshake. `unproven`: the listener's tracker and this
    /// connection's id there, until its first request proves it; `evicted`: fires when the
    /// listener evicts it before that.
    pub(super) fn new(
        io: Io,
        prefix: Vec<u8>,
        remote: SocketAddr,
        idle_timeout: Option<Duration>,
        unproven: Option<(Arc<ConnTracker>, u64)>,
        evicted: Option<CancellationToken>,
        slot: Slot,
    ) -> Conn {
        let activity = Activity::new(unproven);
        let idle = idle_timeout.map(|timeout| IdleWatch {
            activity: activity.clone(),
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        });
        Conn {
            io,
            prefix,
            meta: ConnMeta { remote, activity },
            idle,
            evicted: evicted.map(|e| Box::pin(e.cancelled_owned())),
            _slot: slot,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

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
