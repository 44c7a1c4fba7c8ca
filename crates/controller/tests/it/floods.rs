//! Hole 3: connection floods. Sockets that never speak are closed after the handshake
//! deadline, gRPC connections that open no stream after the idle timeout, connections over
//! the per-address and total caps at once; through all of it `/health`, enrollment and a
//! real agent's stream keep working.

use super::common::*;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection to `to` from the loopback address `from` (any 127/8 address works on
/// Linux), so a test can play several clients.
async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

fn addr(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .parse()
        .unwrap_or_else(|e| panic!("address {url}: {e}"))
}

/// Whether the server closed `conn` within `within` (a read gives EOF or an error).
async fn closed_within(conn: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

async fn metric(s: &TestServer, name: &str) -> f64 {
    let metrics = s
        .server
        .as_ref()
        .and_then(|r| r.metrics_addr)
        .unwrap_or_else(|| panic!("metrics listener"));
    let text = s
        .client
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("metrics: {e}"))
        .text()
        .await
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn silent_and_streamless_grpc_connections_are_closed() -> TestResult {
    let mut s = TestServer::start_with(|st| {
        st.conn.handshake_timeout = Duration::from_secs(1);
        st.conn.grpc_idle_timeout = Duration::from_secs(1);
        st.metrics_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let grpc = addr(&s.grpc);
    // Never sends the HTTP/2 preface: closed after the handshake deadline.
    let mut silent = TcpStream::connect(grpc).await?;
    let started = std::time::Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(4)).await);
    assert!(started.elapsed() >= Duration::from_millis(900));
    // Sends something that is not HTTP/2: closed at once.
    let mut wrong = TcpStream::connect(grpc).await?;
    wrong
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n12345678")
        .await?;
    assert!(closed_within(&mut wrong, Duration::from_millis(900)).await);
    // A real HTTP/2 client that never opens a stream: closed after the idle timeout.
    let idle = tonic::transport::Endpoint::from_shared(s.grpc.clone())?
        .connect()
        .await?;
    let started = std::time::Instant::now();
    let open_before = metric(&s, "mig_connections_open{listener=\"grpc\"}").await;
    assert!(open_before >= 1.0, "{open_before}");
    wait_until("the idle connection to be closed", || async {
        metric(&s, "mig_connections_open{listener=\"grpc\"}").await < open_before
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    drop(idle);
    // A stream keeps its connection open past the idle timeout, and keeps working. (Real
    // sockets on a real clock: the idle rule itself is unit-tested on paused time.)
    let mut a = s.grpc_connect("vm-fl1", "pool-001", "b1").await;
    let reg = a.recv_command().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.ack(&reg.id, true, "ok").await;
    wait_command_state(s.app(), &reg.id, "acknowledged").await;
    assert!(
        metric(
            &s,
            "mig_connections_refused_total{listener=\"grpc\",reason=\"handshake\"}"
        )
        .await
            >= 2.0
    );
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn connection_caps_shed_a_flood_and_real_clients_still_get_in() -> TestResult {
    let mut s = TestServer::start_with(|st| {
        st.conn.max_connections_per_addr = 50;
        st.conn.max_connections = Some(800);
        st.conn.handshake_timeout = Duration::from_secs(30);
        st.metrics_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let grpc = addr(&s.grpc);
    let http = addr(&s.base);
    // One flooding client: 200 silent sockets to each listener from 127.0.0.2.
    let flooder: IpAddr = [127, 0, 0, 2].into();
    let mut held = Vec::new();
    for target in [grpc, http] {
        for _ in 0..200 {
            held.push(connect_from(flooder, target).await?);
        }
    }
    // Only the per-address cap's worth stay open on each listener; the rest are closed.
    let mut closed = 0;
    for c in &mut held {
        if closed_within(c, Duration::from_millis(50)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 300, "200 over the cap of 50, on each listener");
    let refused = metric(&s, "mig_connections_refused_total").await;
    assert!(refused >= 300.0, "{refused}");
    // Everyone else is served: health, enrollment, a real agent's stream.
    let (status, _) = s.get("/health").await;
    assert_eq!(status, 200);
    let mut a = s.grpc_connect("vm-fl2", "pool-001", "b1").await;
    let reg = a.recv_command().await;
    assert_eq!(reg.r#type, "register_runner");
    // Many flooders together fill the listener (700 gRPC slots of the 800), not the file
    // limit; a full listener makes room for a newcomer by evicting the oldest connection
    // that never proved itself, so real clients still get in.
    let mut more = Vec::new();
    for i in 3..=20u8 {
        for _ in 0..50 {
            match connect_from([127, 0, 0, i].into(), grpc).await {
                Ok(c) => more.push(c),
                Err(e) => panic!("connect: {e}"),
            }
        }
    }
    wait_until("the gRPC listener to settle at its cap", || async {
        metric(&s, "mig_connections_open{listener=\"grpc\"}").await <= 700.0
    })
    .await;
    assert!(
        metric(
            &s,
            "mig_connections_refused_total{listener=\"grpc\",reason=\"evicted\"}"
        )
        .await
            > 0.0
    );
    let mut b = s.grpc_connect("vm-fl4", "pool-001", "b1").await;
    assert_eq!(b.recv_command().await.r#type, "register_runner");
    // The earlier agent, proven by its stream, was never evicted.
    a.ack(&reg.id, true, "ok").await;
    wait_command_state(s.app(), &reg.id, "acknowledged").await;
    let (status, _) = s.get("/health").await;
    assert_eq!(status, 200, "the HTTP listener has its own share");
    // When the flood goes away, the slots come back.
    drop(more);
    drop(held);
    wait_until("the flood's slots to come back", || async {
        metric(&s, "mig_connections_open{listener=\"grpc\"}").await <= 2.0
    })
    .await;
    let _b = s.grpc_connect("vm-fl3", "pool-001", "b1").await;
    s.stop().await;
    Ok(())
}

/// HTTP/1.1 keep-alive connections that send no new request are closed after the header
/// timeout, like connections that never send one.
#[tokio::test]
async fn idle_http_connections_are_closed() -> TestResult {
    let mut s = TestServer::start_with(|st| st.header_timeout = Duration::from_secs(1)).await;
    let http = addr(&s.base);
    let mut conn = TcpStream::connect(http).await?;
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, conn.read(&mut buf)).await??;
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(closed_within(&mut conn, Duration::from_secs(3)).await);
    let mut silent = TcpStream::connect(http).await?;
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
    s.stop().await;
    Ok(())
}
