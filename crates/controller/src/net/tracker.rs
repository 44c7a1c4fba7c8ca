//! Connection caps of one listener: how many from one source address and in total, the
//! oldest unproven connection evicted when full, refusals counted and logged at most every
//! few seconds.

use super::*;

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
    pub(super) fn count(&self, reason: &str) {
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
    pub(super) metrics: ConnMetrics,
    shed: Mutex<ShedLog>,
    unproven: Mutex<Unproven>,
}

/// Connections that have not proven they are clients yet (no TLS handshake, no HTTP/2
/// preface, no first request), oldest first. When the listener is full, a new connection
/// takes the place of the oldest of them: a flood of silent sockets from many addresses can
/// fill the listener, but never keep a real client out.
#[derive(Debug, Default)]
pub(super) struct Unproven {
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
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Refusal::PerAddr => "per_addr",
            Refusal::Total => "total",
        }
    }
}

/// What was refused since the last log line.
#[derive(Debug, Default)]
pub(super) struct ShedLog {
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

    pub(super) fn unproven(&self) -> std::sync::MutexGuard<'_, Unproven> {
        self.unproven
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a new connection as not proven yet; the token is cancelled if it is evicted.
    pub(super) fn track_unproven(&self) -> (u64, CancellationToken) {
        let mut u = self.unproven();
        u.next += 1;
        let id = u.next;
        let token = CancellationToken::new();
        u.order.push_back(id);
        u.live.insert(id, token.clone());
        (id, token)
    }

    /// The connection proved itself a client: it is no longer evictable.
    pub(super) fn proven(&self, id: u64) {
        let mut u = self.unproven();
        u.live.remove(&id);
        // Keep the queue from growing with ids already gone.
        while u.order.front().is_some_and(|f| !u.live.contains_key(f)) {
            u.order.pop_front();
        }
    }

    /// Evicts the oldest connection that has not proven itself; whether there was one.
    pub(super) fn evict_oldest(&self) -> bool {
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

    pub(super) fn addrs(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
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

    pub(super) fn release(&self, ip: IpAddr) {
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
    pub(super) fn refused(&self, refusal: Refusal, ip: IpAddr) {
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

    pub(super) fn accept_failed(&self, e: &io::Error) {
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

    pub(super) fn maybe_log(&self, log: &mut ShedLog) {
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
}
