//! TLS on both listeners: the right CA works, a wrong one fails; mutual TLS refuses clients
//! without a certificate; new certificates are picked up without a restart.

use super::common::*;
use mig_controller::config::TlsSettings;
use mig_controller::pki::{self, Pem, Usage};
use miglet_proto::pb::command_service_client::CommandServiceClient;
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

fn names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}

struct Pki {
    ca: Pem,
    client: Pem,
}

fn make_pki(dir: &Path) -> Result<Pki, Box<dyn std::error::Error + Send + Sync>> {
    let ca = pki::new_ca("test CA", 30)?;
    let server = pki::issue(&ca, Usage::Server, &names(), 30)?;
    pki::write(dir, "server", &server)?;
    std::fs::write(dir.join("ca.pem"), &ca.cert)?;
    let client = pki::issue(&ca, Usage::Client, &["vm-tls".to_owned()], 30)?;
    Ok(Pki { ca, client })
}

fn tls_settings(dir: &Path, mutual: bool) -> TlsSettings {
    TlsSettings {
        cert_file: dir.join("server.pem"),
        key_file: dir.join("server-key.pem"),
        client_ca_file: mutual.then(|| dir.join("ca.pem")),
        reload_interval: Duration::from_millis(200),
    }
}

fn https_client(ca: &str, identity: Option<&Pem>) -> reqwest::Client {
    let mut b =
        reqwest::Client::builder()
            .timeout(WAIT)
            .tls_certs_only([
                reqwest::Certificate::from_pem(ca.as_bytes()).unwrap_or_else(|e| panic!("CA: {e}"))
            ]);
    if let Some(id) = identity {
        let pem = format!("{}{}", id.cert, id.key);
        b = b.identity(
            reqwest::Identity::from_pem(pem.as_bytes()).unwrap_or_else(|e| panic!("identity: {e}")),
        );
    }
    b.build().unwrap_or_else(|e| panic!("client: {e}"))
}

/// Asserts `res` failed for `reason` (a TLS alert or verification error's name), not for
/// anything else.
fn refused<T: std::fmt::Debug>(res: Result<T, String>, reason: &str) {
    match res {
        Err(e) if e.contains(reason) => {}
        other => panic!("expected a refusal for {reason}, got {other:?}"),
    }
}

async fn https_health(s: &TestServer, ca: &str, identity: Option<&Pem>) -> Result<u16, String> {
    let url = format!("{}/health", s.base.replace("http://", "https://"));
    https_client(ca, identity)
        .get(url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("{e:?}"))
}

/// Opens a gRPC stream over TLS as an enrolled VM and waits for the ConnectAck.
async fn grpc_over_tls(s: &TestServer, ca: &str, identity: Option<&Pem>) -> Result<(), String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(&id.cert, &id.key));
    }
    let url = s.grpc.replace("http://", "https://");
    let channel = Channel::from_shared(url)
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect_timeout(WAIT)
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    // The credential comes over the HTTPS listener with the test's own (good) client, so
    // only the gRPC listener's TLS decides the outcome.
    let cred = s.try_enroll("vm-tls", "p").await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(connect_msg("vm-tls", "p", ""))
        .await
        .map_err(|e| e.to_string())?;
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {cred}").parse().map_err(|_| "metadata")?,
    );
    let mut inbound = CommandServiceClient::new(channel)
        .stream_commands(req)
        .await
        .map_err(|e| format!("{e:?}"))?
        .into_inner();
    match tokio::time::timeout(WAIT, inbound.message()).await {
        Ok(Ok(Some(m))) => match m.message {
            Some(miglet_proto::pb::controller_message::Message::ConnectAck(a)) if a.accepted => {
                Ok(())
            }
            other => Err(format!("unexpected {other:?}")),
        },
        other => Err(format!("no ConnectAck: {other:?}")),
    }
}

#[tokio::test]
async fn tls_on_both_listeners_right_ca_works_wrong_ca_fails() -> TestResult {
    let dir = tempfile::tempdir()?;
    let p = make_pki(dir.path())?;
    let other_ca = pki::new_ca("someone else's CA", 30)?;
    let d = dir.path().to_owned();
    let mut s = TestServer::start_with(|st| st.tls = Some(tls_settings(&d, false))).await;
    s.use_https(&p.ca.cert, None);
    assert_eq!(https_health(&s, &p.ca.cert, None).await, Ok(200));
    refused(
        https_health(&s, &other_ca.cert, None).await,
        "InvalidCertificate(UnknownIssuer)",
    );
    // Plain HTTP to the TLS listener gets no answer (the TLS layer takes it for garbage).
    let plain = reqwest::Client::builder().timeout(WAIT).build()?;
    let answer = plain
        .get(format!("{}/health", s.base.replace("https://", "http://")))
        .send()
        .await;
    assert!(
        answer.as_ref().is_err_and(|e| !e.is_timeout()),
        "{answer:?}"
    );
    grpc_over_tls(&s, &p.ca.cert, None).await?;
    refused(
        grpc_over_tls(&s, &other_ca.cert, None).await,
        "InvalidCertificate(UnknownIssuer)",
    );
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate() -> TestResult {
    let dir = tempfile::tempdir()?;
    let p = make_pki(dir.path())?;
    let d = dir.path().to_owned();
    let mut s = TestServer::start_with(|st| st.tls = Some(tls_settings(&d, true))).await;
    s.use_https(&p.ca.cert, Some(&p.client));
    refused(
        https_health(&s, &p.ca.cert, None).await,
        "CertificateRequired",
    );
    assert_eq!(https_health(&s, &p.ca.cert, Some(&p.client)).await, Ok(200));
    // A client certificate from another CA is refused too.
    let other_ca = pki::new_ca("other", 30)?;
    let stranger = pki::issue(&other_ca, Usage::Client, &["x".to_owned()], 30)?;
    refused(
        https_health(&s, &p.ca.cert, Some(&stranger)).await,
        "UnknownCA",
    );
    refused(
        grpc_over_tls(&s, &p.ca.cert, None).await,
        "CertificateRequired",
    );
    grpc_over_tls(&s, &p.ca.cert, Some(&p.client)).await?;
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn new_certificates_are_used_without_a_restart() -> TestResult {
    let dir = tempfile::tempdir()?;
    let p = make_pki(dir.path())?;
    let d = dir.path().to_owned();
    let mut s = TestServer::start_with(|st| st.tls = Some(tls_settings(&d, false))).await;
    assert_eq!(https_health(&s, &p.ca.cert, None).await, Ok(200));
    // Rotate to a certificate from a new CA.
    let new_ca = pki::new_ca("rotated CA", 30)?;
    let server = pki::issue(&new_ca, Usage::Server, &names(), 30)?;
    // mtime granularity: make sure the files look changed.
    tokio::time::sleep(Duration::from_millis(20)).await;
    pki::write(dir.path(), "server", &server)?;
    let mut switched = false;
    for _ in 0..100 {
        if https_health(&s, &new_ca.cert, None).await == Ok(200) {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(switched, "the new certificate was not picked up");
    refused(
        https_health(&s, &p.ca.cert, None).await,
        "InvalidCertificate(UnknownIssuer)",
    );
    // The gRPC listener switched too.
    s.use_https(&new_ca.cert, None);
    grpc_over_tls(&s, &new_ca.cert, None).await?;
    refused(
        grpc_over_tls(&s, &p.ca.cert, None).await,
        "InvalidCertificate(UnknownIssuer)",
    );
    // A broken file is ignored (once the watcher has seen it); the current certificate
    // stays in use.
    let files = s
        .server
        .as_ref()
        .and_then(|r| r.tls.clone())
        .ok_or("TLS files")?;
    std::fs::write(dir.path().join("server.pem"), "garbage")?;
    wait_until("the watcher to reject the broken file", || {
        let files = files.clone();
        async move { files.rejected_reloads() > 0 }
    })
    .await;
    assert_eq!(https_health(&s, &new_ca.cert, None).await, Ok(200));
    s.stop().await;
    Ok(())
}
