//! Talking to the controller: the HTTP client (base contract plus the command ack) and the
//! gRPC stream with reconnects.
//!
//! The stream task is the only writer of its stream: everything the agent sends on it goes
//! through one channel. Keepalive pings are sent every 5 minutes at most, the minimum that
//! default gRPC servers accept (more frequent pings get a GOAWAY `too_many_pings`).

use crate::auth::Credentials;
use crate::config::TlsFiles;
use crate::machine::{Input, Via};
use miglet_proto::command::CommandEnvelope;
use miglet_proto::json::{
    AnyAck, CommandAckBody, CommandJson, CommandsResponse, EventBody, HeartbeatBody,
};
use miglet_proto::pb::command_service_client::CommandServiceClient;
use miglet_proto::pb::{self, MiGletMessage, controller_message, mi_glet_message};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("request to the controller failed")]
    Request(#[from] reqwest::Error),
    #[error("controller answered {code}: {body}")]
    Status { code: u16, body: String },
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

impl TransportError {
    /// The controller refuses this request for good (retrying cannot help). Authentication
    /// refusals are not: a new credential may fix them.
    /// The controller does not accept who this agent says it is (or it could not enroll).
    pub fn is_auth(&self) -> bool {
        matches!(self, TransportError::Auth(_))
            || matches!(
                self,
                TransportError::Status {
                    code: 401 | 403,
                    ..
                }
            )
    }

    pub fn is_permanent(&self) -> bool {
        matches!(self, TransportError::Status { code, .. }
            if (400..500).contains(code) && ![401, 403, 408, 429].contains(code))
    }
}

pub use miglet_proto::error_chain;

fn read_file(what: &str, path: &std::path::Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|e| TransportError::Tls(format!("{what} {}: {e}", path.display())))
}

/// The HTTP client for the controller: trusts only `tls.ca_file` when set (else the system
/// roots) and presents the client certificate when set.
pub fn http_client(tls: &TlsFiles, timeout: Duration) -> Result<reqwest::Client, TransportError> {
    let mut b = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5))
        // The controller closes keep-alive connections idle for its header timeout (10 s by
        // default); dropping them first avoids sending on one as it closes.
        .pool_idle_timeout(Duration::from_secs(8));
    if let Some(ca) = &tls.ca_file {
        let certs = reqwest::Certificate::from_pem_bundle(&read_file("CA file", ca)?)
            .map_err(|e| TransportError::Tls(format!("CA file {}: {e}", ca.display())))?;
        b = b.tls_certs_only(certs);
    }
    if let Some((cert, key)) = &tls.client {
        let mut pem = read_file("client certificate", cert)?;
        pem.push(b'\n');
        pem.extend(read_file("client key", key)?);
        b = b.identity(
            reqwest::Identity::from_pem(&pem)
                .map_err(|e| TransportError::Tls(format!("client certificate: {e}")))?,
        );
    }
    Ok(b.build()?)
}

/// The gRPC TLS config for an `https://` endpoint (None for `http://`).
pub fn grpc_tls(
    endpoint: &str,
    tls: &TlsFiles,
) -> Result<Option<tonic::transport::ClientTlsConfig>, TransportError> {
    if !endpoint.starts_with("https://") {
        return Ok(None);
    }
    let mut c = tonic::transport::ClientTlsConfig::new();
    c = match &tls.ca_file {
        Some(ca) => c.ca_certificate(tonic::transport::Certificate::from_pem(read_file(
            "CA file", ca,
        )?)),
        None => c.with_native_roots(),
    };
    if let Some((cert, key)) = &tls.client {
        c = c.identity(tonic::transport::Identity::from_pem(
            read_file("client certificate", cert)?,
            read_file("client key", key)?,
        ));
    }
    Ok(Some(c))
}

pub use miglet_proto::backoff::Backoff;

#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
    base: String,
    vm_id: String,
    creds: Arc<Credentials>,
}

fn excerpt(s: &str) -> String {
    s.chars().take(300).collect()
}

impl Http {
    /// `client` comes from [`http_client`]; `creds` supplies the credential of each request.
    pub fn new(client: reqwest::Client, base: &str, vm_id: &str, creds: Arc<Credentials>) -> Http {
        Http {
            client,
            base: base.trim_end_matches('/').to_owned(),
            vm_id: vm_id.to_owned(),
            creds,
        }
    }

    fn url(&self, suffix: &str) -> String {
        format!("{}/api/v1/vms/{}/{suffix}", self.base, self.vm_id)
    }

    /// Sends with the current credential; a 401 drops it so the next request enrolls again.
    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, TransportError> {
        let token = self.creds.bearer().await?;
        let rb = match &token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        };
        let r = rb.send().await?;
        if let Some(date) = r
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|d| d.to_str().ok())
        {
            crate::clock::observe_date(date);
        }
        if r.status().as_u16() == 401
            && let Some(t) = &token
        {
            self.creds.rejected(t);
        }
        Self::check(r).await
    }

    async fn check(r: reqwest::Response) -> Result<reqwest::Response, TransportError> {
        if r.status().as_u16() == 200 {
            return Ok(r);
        }
        let code = r.status().as_u16();
        let body = r.text().await.unwrap_or_default();
        Err(TransportError::Status {
            code,
            body: excerpt(&body),
        })
    }

    /// Posts an event; `Ok` means the controller stored it (HTTP 200).
    pub async fn post_event(&self, body: &EventBody) -> Result<AnyAck, TransportError> {
        let r = self
            .send(self.client.post(self.url("events")).json(body))
            .await?;
        Ok(r.json::<AnyAck>().await.unwrap_or_default())
    }

    pub async fn post_heartbeat(&self, body: &HeartbeatBody) -> Result<(), TransportError> {
        self.send(self.client.post(self.url("heartbeat")).json(body))
            .await?;
        Ok(())
    }

    pub async fn poll_commands(&self) -> Result<Vec<CommandJson>, TransportError> {
        let r = self.send(self.client.get(self.url("commands"))).await?;
        let text = r.text().await?;
        serde_json::from_str::<CommandsResponse>(&text)
            .map(|c| c.commands)
            .map_err(|e| TransportError::Status {
                code: 200,
                body: format!("unreadable commands answer: {e}"),
            })
    }

    pub async fn ack(&self, id: &str, success: bool, message: &str) -> Result<(), TransportError> {
        let body = CommandAckBody {
            success,
            message: message.to_owned(),
            result: Default::default(),
        };
        self.send(
            self.client
                .post(self.url(&format!("commands/{id}/ack")))
                .json(&body),
        )
        .await?;
        Ok(())
    }
}

/// Turns a JSON command into a core input (a parse failure is still an input: it is
/// acknowledged as failed).
pub fn command_input(c: &CommandJson, via: Via) -> Input {
    Input::Command {
        id: c.id.clone(),
        via,
        parsed: CommandEnvelope::from_json(c).map(|e| e.command),
    }
}

/// Where and as whom the stream connects.
#[derive(Debug, Clone)]
pub struct StreamTarget {
    pub endpoint: String,
    /// Set for `https://` endpoints.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    pub creds: Arc<Credentials>,
    /// Sent first on every new stream.
    pub connect: pb::ConnectRequest,
}

/// Keeps a stream to the controller open while `stop` is false: connect, `ConnectRequest`
/// first, wait for `ConnectAck`, then forward commands to the core and `outbound` to the
/// controller. `connected` says whether a stream is up.
pub async fn run_stream(
    target: StreamTarget,
    core: mpsc::Sender<Input>,
    mut outbound: mpsc::Receiver<MiGletMessage>,
    connected: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::of(miglet_proto::backoff::STREAM_RECONNECT);
    loop {
        if *stop.borrow() {
            return;
        }
        let started = tokio::time::Instant::now();
        match session(&target, &core, &mut outbound, &connected, &mut stop).await {
            Ok(()) => return,
            Err(reason) => {
                let _ = connected.send(false);
                if started.elapsed() > Duration::from_secs(60) {
                    backoff.reset();
                }
                let wait = backoff.next_delay();
                info!(%reason, retry_in_ms = wait.as_millis() as u64, "Controller stream unavailable; using HTTP polling until it is back");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

async fn session(
    target: &StreamTarget,
    core: &mpsc::Sender<Input>,
    outbound: &mut mpsc::Receiver<MiGletMessage>,
    connected: &watch::Sender<bool>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let StreamTarget {
        endpoint,
        tls,
        creds,
        connect,
    } = target;
    let mut ep = tonic::transport::Endpoint::from_shared(endpoint.clone())
        .map_err(|e| format!("bad endpoint: {e}"))?;
    if let Some(tls) = tls {
        ep = ep
            .tls_config(tls.clone())
            .map_err(|e| format!("TLS setup failed: {e}"))?;
    }
    let token = creds
        .bearer()
        .await
        .map_err(|e| format!("no credential: {e}"))?;
    let channel = ep
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(300))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(false)
        .connect()
        .await
        .map_err(|e| format!("connect failed: {}", error_chain(&e)))?;
    let mut client = CommandServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<MiGletMessage>(64);
    tx.send(MiGletMessage {
        message: Some(mi_glet_message::Message::Connect(connect.clone())),
    })
    .await
    .map_err(|_| "stream closed".to_owned())?;
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(t) = &token {
        let value = format!("Bearer {t}")
            .parse()
            .map_err(|_| "credential is not valid metadata".to_owned())?;
        request.metadata_mut().insert("authorization", value);
    }
    let refused = |s: tonic::Status| {
        if s.code() == tonic::Code::Unauthenticated
            && let Some(t) = &token
        {
            creds.rejected(t);
        }
        format!("stream refused: {} {}", s.code(), s.message())
    };
    let mut inbound = client
        .stream_commands(request)
        .await
        .map_err(refused)?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .map_err(|_| "no ConnectAck within 10 s".to_owned())?
        .map_err(refused)?;
    match first.and_then(|m| m.message) {
        Some(controller_message::Message::ConnectAck(ack)) if ack.accepted => {
            info!(server_version = %ack.server_version, "Connection accepted by controller");
        }
        Some(controller_message::Message::ConnectAck(ack)) => {
            return Err(format!(
                "connection rejected by controller: {}",
                ack.message
            ));
        }
        other => return Err(format!("expected ConnectAck, got {other:?}")),
    }
    let _ = connected.send(true);
    loop {
        tokio::select! {
            _ = stop.changed() => {
                if *stop.borrow() {
                    // Let what is queued go out (final acks and heartbeat), then close.
                    while let Ok(m) = outbound.try_recv() {
                        let _ = tx.send(m).await;
                    }
                    return Ok(());
                }
            }
            m = outbound.recv() => match m {
                Some(m) => {
                    if tx.send(m).await.is_err() {
                        return Err("stream closed while sending".into());
                    }
                }
                None => return Ok(()),
            },
            msg = inbound.message() => match msg {
                Ok(Some(m)) => match m.message {
                    Some(controller_message::Message::Command(c)) => {
                        debug!(command_id = %c.id, command_type = %c.r#type, "Received command from controller");
                        let input = Input::Command {
                            id: c.id.clone(),
                            via: Via::Stream,
                            parsed: CommandEnvelope::from_pb(&c).map(|e| e.command),
                        };
                        if core.send(input).await.is_err() {
                            return Ok(());
                        }
                    }
                    Some(controller_message::Message::Error(e)) => {
                        warn!(code = %e.code, message = %e.message, "Controller reported an error");
                    }
                    Some(controller_message::Message::EventAck(_) | controller_message::Message::ConnectAck(_)) | None => {}
                },
                Ok(None) => return Err("controller closed the stream".into()),
                Err(s) => return Err(format!("stream broken: {} {}", s.code(), s.message())),
                // (An expired credential ends the stream with UNAUTHENTICATED; the next
                // session uses the refreshed one.)
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_errors() {
        let e = |code| TransportError::Status {
            code,
            body: String::new(),
        };
        assert!(e(400).is_permanent());
        assert!(!e(429).is_permanent());
        assert!(!e(503).is_permanent());
    }
}

#[cfg(test)]
mod tls_tests {
    use super::*;

    /// The controller may be behind HTTPS: the client speaks TLS (rustls) with the system's
    /// roots, and fails cleanly (no panic) against a peer that is not TLS.
    #[tokio::test]
    async fn https_endpoints_are_supported() -> Result<(), Box<dyn std::error::Error>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            // A plain-TCP peer that closes at once: the TLS handshake must fail, not hang.
            while let Ok((s, _)) = listener.accept().await {
                drop(s);
            }
        });
        let client = http_client(&TlsFiles::default(), Duration::from_secs(5))?;
        let creds = Arc::new(Credentials::new(
            crate::config::AuthMethod::None,
            client.clone(),
            "https://x",
            "vm-1",
            "p",
            "b",
        ));
        let http = Http::new(client, &format!("https://{addr}"), "vm-1", creds);
        let err = http
            .poll_commands()
            .await
            .err()
            .ok_or("a non-TLS peer cannot answer")?;
        assert!(matches!(err, TransportError::Request(_)), "{err}");
        server.abort();
        Ok(())
    }
}
