//! Floods against the real controller binary at a 4,096-file limit: silent sockets from many
//! addresses on both listeners, slow TLS handshakes, many streams for one VM, oversized gRPC
//! messages, and a burst of enrollments at 10,000 a minute. Through all of it `/health`
//! answers, enrollment works, real streams open, and the controller neither runs out of
//! files nor keeps what it should have closed.

use crate::harness::{Ctl, POOL, SimFleet, github};
use crate::{Check, Opts};
use anyhow::Context;
use miglet_proto::pb::command_service_client::CommandServiceClient;
use miglet_proto::pb::{self, MiGletMessage, controller_message, mi_glet_message};
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::net::{TcpSocket, TcpStream};
use tokio_stream::wrappers::ReceiverStream;

const NOFILE: u64 = 4096;

async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(from, 0))?;
    s.connect(to).await
}

fn addr_of(url: &str) -> anyhow::Result<SocketAddr> {
    Ok(url.trim_start_matches("http://").parse()?)
}

/// The sum of a metric's samples.
async fn metric(ctl: &Ctl, name: &str) -> f64 {
    let text = match reqwest::get(&ctl.metrics).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return -1.0,
    };
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `/health` round trip, ms (straight to the controller).
async fn health_ms(ctl: &Ctl) -> Option<f64> {
    let t = Instant::now();
    let r = reqwest::Client::new()
        .get(format!("{}/health", ctl.direct_http))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    r.status()
        .is_success()
        .then(|| t.elapsed().as_secs_f64() * 1000.0)
}

async fn enroll(
    http: &reqwest::Client,
    base: &str,
    secret: &str,
    vm: &str,
) -> anyhow::Result<String> {
    let v: serde_json::Value = http
        .post(format!("{base}/api/v1/enroll"))
        .json(&json!({"vm_id": vm, "pool_id": POOL, "method": "bootstrap", "bootstrap_secret": secret}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    v["credential"]
        .as_str()
        .map(str::to_owned)
        .context("no credential")
}

/// Opens a stream for `vm` and returns it once the controller accepted it.
async fn open_stream(
    grpc: &str,
    vm: &str,
    cred: &str,
) -> anyhow::Result<(
    tokio::sync::mpsc::Sender<MiGletMessage>,
    tonic::Streaming<pb::ControllerMessage>,
)> {
    let channel = tonic::transport::Endpoint::from_shared(grpc.to_owned())?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(MiGletMessage {
        message: Some(mi_glet_message::Message::Connect(pb::ConnectRequest {
            vm_id: vm.into(),
            pool_id: POOL.into(),
            ..Default::default()
        })),
    })
    .await?;
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {cred}").parse()?);
    let mut inbound = CommandServiceClient::new(channel)
        .stream_commands(req)
        .await?
        .into_inner();
    match inbound.message().await? {
        Some(pb::ControllerMessage {
            message: Some(controller_message::Message::ConnectAck(a)),
        }) if a.accepted => Ok((tx, inbound)),
        other => anyhow::bail!("no connect_ack: {other:?}"),
    }
}

pub async fn run(
    o: &Opts,
    dir: &std::path::Path,
) -> anyhow::Result<(serde_json::Value, Vec<Check>)> {
    let (_gh, github_url) = github().await?;
    let mut ctl = Ctl::start_limited(
        &dir.join("ctl"),
        &["--config", &write_config(dir)?],
        &github_url,
        Some(NOFILE),
    )
    .await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let secret = ctl.secret()?;
    // Straight to the controller: through the proxy every client would be 127.0.0.1.
    let http_addr = addr_of(&ctl.direct_http)?;
    let grpc_direct = ctl.direct_grpc.clone();
    let grpc_addr = addr_of(&grpc_direct)?;
    let health_before = health_ms(&ctl).await;

    // 1. Silent sockets: more than the controller has files for, from many addresses.
    let silent = o.flood_sockets;
    let mut held = Vec::with_capacity(silent);
    let flood_started = Instant::now();
    for i in 0..silent {
        // 10 clients: each past the per-address cap, together past the listeners' totals.
        let from = IpAddr::from([127, 0, 2, (i % 10) as u8 + 1]);
        let to = if i % 5 == 4 { http_addr } else { grpc_addr };
        if let Ok(c) = connect_from(from, to).await {
            held.push(c);
        }
    }
    let flood_secs = flood_started.elapsed().as_secs_f64();
    let health_during = health_ms(&ctl).await;
    let enroll_during = enroll(&http, &ctl.direct_http, &secret, "flood-real").await;
    let stream_during = match &enroll_during {
        Ok(cred) => open_stream(&grpc_direct, "flood-real", cred)
            .await
            .map(|_| ()),
        Err(e) => Err(anyhow::anyhow!("{e:#}")),
    };
    let refused = metric(&ctl, "mig_connections_refused_total").await;
    drop(held);

    // 2. Many streams for one VM at once: one stays.
    let cred = enroll(&http, &ctl.direct_http, &secret, "flood-one").await?;
    let mut opened = tokio::task::JoinSet::new();
    for _ in 0..o.streams_one_vm {
        let (g, c) = (grpc_direct.clone(), cred.clone());
        opened.spawn(async move { open_stream(&g, "flood-one", &c).await });
    }
    let mut streams = Vec::new();
    while let Some(r) = opened.join_next().await {
        if let Ok(Ok(s)) = r {
            streams.push(s);
        }
    }
    let opened_ok = streams.len();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut connected = metric(&ctl, "mig_streams_connected").await;
    while connected > 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        connected = metric(&ctl, "mig_streams_connected").await;
    }

    // Their connections count against this address's cap (200 here); close them, and give
    // the controller a moment to see it, before the next part opens more.
    drop(streams);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&ctl, "mig_connections_open{listener=\"grpc\"}").await > 10.0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 3. An oversized message ends its stream and nobody else's.
    let big = enroll(&http, &ctl.direct_http, &secret, "flood-big").await?;
    let (tx, mut inbound) = open_stream(&grpc_direct, "flood-big", &big).await?;
    let (_keep_tx, mut keep_rx) = open_stream(
        &grpc_direct,
        "flood-real",
        &enroll(&http, &ctl.direct_http, &secret, "flood-real").await?,
    )
    .await?;
    let huge = "x".repeat(2 << 20);
    let _ = tx
        .send(MiGletMessage {
            message: Some(mi_glet_message::Message::Event(pb::EventNotification {
                r#type: "job_started".into(),
                data: [("padding".to_owned(), huge)].into(),
                ..Default::default()
            })),
        })
        .await;
    let oversized = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return "closed".to_owned(),
                Err(st) => return format!("{:?}", st.code()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| "still open".into());
    // The other stream still delivers: queue a command for it.
    let admin = ctl.admin_token()?;
    let enq = http
        .post(format!(
            "{}/api/v1/admin/vms/flood-real/commands",
            ctl.direct_http
        ))
        .bearer_auth(&admin)
        .json(&json!({"type":"set_log_level","parameters":{"level":"info"}}))
        .send()
        .await?
        .status();
    let other_ok = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match keep_rx.message().await {
                Ok(Some(pb::ControllerMessage {
                    message: Some(controller_message::Message::Command(c)),
                })) if c.r#type == "set_log_level" => return true,
                Ok(Some(_)) => continue,
                _ => return false,
            }
        }
    })
    .await
    .unwrap_or(false);

    // 4. Enrollments at 10,000 a minute.
    let n = o.enrollments;
    let per_sec = 10_000.0 / 60.0;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let due = Duration::from_secs_f64(i as f64 / per_sec);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let (h, base, s) = (http.clone(), ctl.direct_http.clone(), secret.clone());
        set.spawn(async move {
            let t = Instant::now();
            enroll(&h, &base, &s, &format!("enr-{i:05}"))
                .await
                .map(|_| t.elapsed().as_secs_f64() * 1000.0)
        });
    }
    let mut lat = Vec::new();
    let mut enroll_failed = 0;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(ms)) => lat.push(ms),
            _ => enroll_failed += 1,
        }
    }
    let enroll_secs = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
    };

    // 5. Slow TLS handshakes, on a controller with TLS: closed at the deadline, while a real
    // TLS client is served.
    let tls = slow_tls_handshakes(dir, o.slow_handshakes).await?;

    // 6. A small fleet still works after all of it.
    let sim = SimFleet::start(&ctl, 50, 0.2, Duration::from_secs(2)).await?;
    let fleet_up = sim.wait_up(50, Duration::from_secs(60)).await;
    sim.stop().await;
    ctl.stop().await?;
    let logs = ctl.logs();
    let shed_logged = logs.contains("Shedding load");
    let out_of_files = logs.contains("Cannot accept connections");
    let checks = vec![
        Check::new(
            "/health answered during the flood",
            usize::from(health_during.is_some()),
            1,
        ),
        Check::new(
            "enrollment worked during the flood",
            usize::from(enroll_during.is_ok()),
            1,
        ),
        Check::new(
            "a real stream opened during the flood",
            usize::from(stream_during.is_ok()),
            1,
        ),
        Check::at_least("connections refused or evicted at the caps", refused, 1.0),
        Check::new("shedding logged", usize::from(shed_logged), 1),
        Check::new(
            "the controller ran out of files",
            usize::from(out_of_files),
            0,
        ),
        Check::new(
            "streams left open for one VM after many opened",
            connected as usize,
            1,
        ),
        Check::new(
            "the oversized message's stream ended with RESOURCE_EXHAUSTED or OUT_OF_RANGE",
            usize::from(
                oversized.contains("ResourceExhausted") || oversized.contains("OutOfRange"),
            ),
            1,
        ),
        Check::new(
            "another VM's stream still got its command",
            usize::from(other_ok && enq.is_success()),
            1,
        ),
        Check::new("enrollments refused at 10,000 a minute", enroll_failed, 0),
        Check::new(
            "a fleet connects after the floods",
            usize::from(fleet_up.is_ok()),
            1,
        ),
        Check::new(
            "slow TLS handshakes still open after the deadline",
            tls.still_open,
            0,
        ),
        Check::new(
            "a TLS client served during the slow handshakes",
            usize::from(tls.served),
            1,
        ),
    ];
    let figures = json!({
        "open_file_limit": NOFILE,
        "silent_sockets": silent,
        "flood_open_secs": flood_secs,
        "connections_refused_or_evicted": refused,
        "health_ms_before": health_before,
        "health_ms_during_flood": health_during,
        "streams_opened_for_one_vm": opened_ok,
        "oversized_stream_end": oversized,
        "enrollments": n,
        "enrollment_secs": enroll_secs,
        "enrollment_ms_p50": pct(0.5),
        "enrollment_ms_p99": pct(0.99),
        "slow_tls_handshakes": tls.sockets,
        "slow_tls_closed_within_ms": tls.closed_within_ms,
    });
    Ok((figures, checks))
}

/// A config whose limits let a test see them act in seconds.
fn write_config(dir: &std::path::Path) -> anyhow::Result<String> {
    let path = dir.join("floods.toml");
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        &path,
        "[limits]\nmax_connections_per_addr = 200\nhandshake_timeout_secs = 3\ngrpc_idle_timeout_secs = 5\n",
    )?;
    Ok(path.display().to_string())
}

/// What the slow-handshake part saw.
struct SlowTls {
    sockets: usize,
    still_open: usize,
    served: bool,
    closed_within_ms: f64,
}

/// `n` sockets that start a TLS handshake (a record header, no more) and stall, against a
/// TLS controller with a 3 s handshake deadline.
async fn slow_tls_handshakes(dir: &std::path::Path, n: usize) -> anyhow::Result<SlowTls> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls_dir = dir.join("tls");
    let certs = tokio::process::Command::new(crate::harness::sibling("mig-controller")?)
        .args([
            "certs",
            "init",
            "--host",
            "127.0.0.1",
            "--host",
            "localhost",
            "--out",
        ])
        .arg(&tls_dir)
        .output()
        .await?;
    anyhow::ensure!(certs.status.success(), "certs init failed");
    let (_gh, github_url) = github().await?;
    let (cert, key) = (tls_dir.join("server.pem"), tls_dir.join("server-key.pem"));
    let mut ctl = Ctl::start(
        &dir.join("ctl-tls"),
        &[
            "--config",
            &write_config(dir)?,
            "--tls-cert",
            cert.to_str().unwrap_or_default(),
            "--tls-key",
            key.to_str().unwrap_or_default(),
        ],
        &github_url,
    )
    .await?;
    let grpc = addr_of(&ctl.direct_grpc)?;
    let https = ctl.direct_http.replace("http://", "https://");
    let mut socks = Vec::new();
    for i in 0..n {
        let from = IpAddr::from([127, 0, 9, (i % 200) as u8 + 1]);
        if let Ok(mut s) = connect_from(from, grpc).await {
            // A TLS record header announcing a handshake that never comes.
            let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await;
            socks.push(s);
        }
    }
    let started = Instant::now();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(tls_dir.join("ca.pem"))?)?;
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(5))
        .build()?;
    let served = client
        .get(format!("{https}/health"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    // Every stalled socket is closed by the deadline (3 s) plus a margin.
    let mut still_open = 0;
    let mut buf = [0u8; 64];
    for s in &mut socks {
        let left = Duration::from_secs(6).saturating_sub(started.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(_) => {}
            Err(_) => still_open += 1,
        }
    }
    let closed_within_ms = started.elapsed().as_secs_f64() * 1000.0;
    ctl.stop().await?;
    Ok(SlowTls {
        sockets: socks.len(),
        still_open,
        served,
        closed_within_ms,
    })
}
