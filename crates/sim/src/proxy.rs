//! A TCP proxy between agents and a controller that can break the path on command, for
//! fault-injection tests: pass traffic, delay it, blackhole it (connections stay open, bytes
//! vanish), half-open it (the agent's bytes arrive, the controller's never come back), reset
//! every connection, or refuse new ones. It also gives a controller that restarts on a new
//! port a stable address (`set_upstream`), so tests never rebind a port just released.
//!
//! TLS and HTTP/2 pass through untouched: it forwards bytes.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does to the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Forward everything, each chunk held back this long.
    Delay(Duration),
    /// Keep connections (and accept new ones) but forward nothing either way.
    Blackhole,
    /// Forward the agent's bytes to the controller; drop the controller's answers.
    HalfOpen,
    /// Reset every open connection (RST) and every new one at once.
    Reset,
}

/// Counters of what went through.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub dropped_bytes: AtomicU64,
    pub resets: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    upstream: Mutex<SocketAddr>,
    mode: watch::Sender<Mode>,
    stats: Stats,
}

/// A running proxy; dropped, it stops accepting (open connections end with their peers).
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.mode.send_replace(Mode::Reset);
    }
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            mode: watch::Sender::new(Mode::Pass),
            stats: Stats::default(),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let _ = client.set_nodelay(true);
                s.stats.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(s.clone(), client));
            }
        });
        Ok(FaultProxy { addr, shared, task })
    }

    /// Where agents connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where new connections go from now on (a restarted controller's new port).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self
            .shared
            .upstream
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = upstream;
    }

    /// Changes what happens to the path, for open connections and new ones.
    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }
}

/// Resets a socket: zero linger, then close (the peer sees RST).
fn reset(stream: TcpStream, stats: &Stats) {
    stats.resets.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn serve(shared: Arc<Shared>, client: TcpStream) {
    let mut mode = shared.mode.subscribe();
    let now = *mode.borrow_and_update();
    match now {
        Mode::Reset => return reset(client, &shared.stats),
        Mode::Blackhole => {
            // A connection made into a blackhole never reaches the server and stays dead
            // (the client must give up on it and reconnect), unless it is reset.
            let mut sink = [0u8; 4096];
            let (mut r, w) = client.into_split();
            loop {
                tokio::select! {
                    n = r.read(&mut sink) => match n {
                        Ok(0) | Err(_) => return,
                        Ok(n) => { shared.stats.dropped_bytes.fetch_add(n as u64, Ordering::Relaxed); }
                    },
                    changed = mode.changed() => {
                        if changed.is_err() { return; }
                        if *mode.borrow() == Mode::Reset {
                            if let Ok(s) = r.reunite(w) { reset(s, &shared.stats); }
                            return;
                        }
                    }
                }
            }
        }
        _ => {}
    }
    let target = *shared
        .upstream
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let server =
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            _ => return reset(client, &shared.stats),
        };
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = tokio::spawn(pump(cr, sw, shared.clone(), true));
    let down = tokio::spawn(pump(sr, cw, shared.clone(), false));
    // A pump that ends (EOF, error or reset) takes its halves with it; the other one sees
    // its peer go and ends too.
    let (a, b) = tokio::join!(up, down);
    if let (Ok(Some((cr, sw))), Ok(Some((sr, cw)))) = (a, b) {
        // Reset requested: both sockets get an RST.
        if let Ok(c) = cr.reunite(cw) {
            reset(c, &shared.stats);
        }
        if let Ok(s) = sr.reunite(sw) {
            reset(s, &shared.stats);
        }
    }
}

/// Copies `from` to `to` as the mode says. Answers the halves when the mode says reset.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    upstream: bool,
) -> Option<(OwnedReadHalf, OwnedWriteHalf)> {
    let mut mode = shared.mode.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if *mode.borrow_and_update() == Mode::Reset {
            return Some((from, to));
        }
        let n = tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return None;
                }
                Ok(n) => n,
            },
            changed = mode.changed() => {
                if changed.is_err() { return None; }
                continue;
            }
        };
        let now = *mode.borrow();
        let forward = match now {
            Mode::Pass => true,
            Mode::Delay(d) => {
                tokio::time::sleep(d).await;
                true
            }
            Mode::Blackhole => false,
            Mode::HalfOpen => upstream,
            Mode::Reset => return Some((from, to)),
        };
        if !forward {
            shared
                .stats
                .dropped_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return None;
        }
        let counter = if upstream {
            &shared.stats.bytes_up
        } else {
            &shared.stats.bytes_down
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> io::Result<SocketAddr> {
        let l = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = l.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(addr)
    }

    async fn roundtrip(c: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
        c.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        match tokio::time::timeout(within, c.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf.to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn modes_break_and_heal_the_path() -> Result<(), Box<dyn std::error::Error>> {
        let p = FaultProxy::start(echo_server().await?).await?;
        let mut c = TcpStream::connect(p.addr()).await?;
        let short = Duration::from_millis(300);
        assert_eq!(
            roundtrip(&mut c, short).await.as_deref(),
            Some(&b"ping"[..])
        );
        p.set_mode(Mode::Blackhole);
        assert_eq!(roundtrip(&mut c, short).await, None);
        p.set_mode(Mode::HalfOpen);
        assert_eq!(roundtrip(&mut c, short).await, None, "answers are dropped");
        p.set_mode(Mode::Pass);
        let mut fresh = TcpStream::connect(p.addr()).await?;
        assert!(roundtrip(&mut fresh, short).await.is_some());
        p.set_mode(Mode::Delay(Duration::from_millis(200)));
        let started = std::time::Instant::now();
        assert!(
            roundtrip(&mut fresh, Duration::from_secs(2))
                .await
                .is_some()
        );
        assert!(
            started.elapsed() >= Duration::from_millis(350),
            "delayed both ways"
        );
        p.set_mode(Mode::Reset);
        let mut buf = [0u8; 4];
        let r = tokio::time::timeout(Duration::from_secs(2), fresh.read(&mut buf)).await?;
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        assert!(p.stats().resets.load(Ordering::Relaxed) >= 1);
        // A new upstream for new connections (a controller restarted elsewhere).
        p.set_mode(Mode::Pass);
        p.set_upstream(echo_server().await?);
        let mut again = TcpStream::connect(p.addr()).await?;
        assert!(roundtrip(&mut again, short).await.is_some());
        Ok(())
    }
}
