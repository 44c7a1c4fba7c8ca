//! Helpers shared by the integration tests. Every wait is bounded.

use mig_controller::app::Controller;
use mig_controller::auth::enroll::PoolEnrollment;
use mig_controller::auth::gce::GceRule;
use mig_controller::config::Settings;
use mig_controller::server::{self, RunningServer};
use mig_controller::token::{PoolRegistration, Pools, StaticToken};
use miglet_proto::pb::command_service_client::CommandServiceClient;
use miglet_proto::pb::{
    self, ControllerMessage, MiGletMessage, controller_message, mi_glet_message,
};
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

pub const TOKEN: &str = "AHTTESTSECRETTOKEN0123456789";
pub const WAIT: Duration = Duration::from_secs(5);
pub const AUDIENCE: &str = "https://mig.test:8080";

pub struct TestServer {
    pub server: Option<RunningServer>,
    pub base: String,
    pub grpc: String,
    pub data_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
    pub client: reqwest::Client,
    /// Credentials by VM id (with the pool they are for), enrolled on first use.
    creds: std::sync::Mutex<HashMap<String, (String, String)>>,
}

/// The VM id of an agent endpoint path.
fn path_vm(path: &str) -> Option<&str> {
    path.strip_prefix("/api/v1/vms/")?.split('/').next()
}

pub fn settings(data_dir: &Path) -> Settings {
    Settings::for_tests(data_dir, TOKEN)
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Settings)) -> TestServer {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let path = dir.path().to_owned();
        let mut s = Self::start_in(&path, tweak).await;
        s._dir = Some(dir);
        s
    }

    /// Starts on an existing data dir (the caller keeps it alive).
    pub async fn start_in(data_dir: &Path, tweak: impl FnOnce(&mut Settings)) -> TestServer {
        let mut s = settings(data_dir);
        tweak(&mut s);
        let (http, grpc) = server::bind(&s)
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let running = server::start(s, http, grpc)
            .await
            .unwrap_or_else(|e| panic!("start: {e}"));
        TestServer {
            base: format!("http://{}", running.http_addr),
            grpc: format!("http://{}", running.grpc_addr),
            server: Some(running),
            data_dir: data_dir.to_owned(),
            _dir: None,
            client: reqwest::Client::builder()
                .timeout(WAIT)
                .build()
                .unwrap_or_else(|e| panic!("client: {e}")),
            creds: Default::default(),
        }
    }

    /// Talks HTTPS to the server from now on, trusting `ca` (and presenting `identity`).
    pub fn use_https(&mut self, ca: &str, identity: Option<&mig_controller::pki::Pem>) {
        self.base = self.base.replace("http://", "https://");
        let mut b =
            reqwest::Client::builder()
                .timeout(WAIT)
                .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes())
                    .unwrap_or_else(|e| panic!("CA: {e}"))]);
        if let Some(id) = identity {
            let pem = format!("{}{}", id.cert, id.key);
            b = b.identity(
                reqwest::Identity::from_pem(pem.as_bytes())
                    .unwrap_or_else(|e| panic!("identity: {e}")),
            );
        }
        self.client = b.build().unwrap_or_else(|e| panic!("client: {e}"));
    }

    /// A controller in `open` mode (the base contract with no authentication).
    pub async fn start_open() -> TestServer {
        Self::start_with(|s| s.auth_mode = mig_controller::auth::AuthMode::Open).await
    }

    /// The development pool's bootstrap secret.
    pub fn dev_secret(&self) -> String {
        std::fs::read_to_string(mig_controller::config::dev_secret_file(&self.data_dir))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    }

    /// The admin token the controller created on its first start.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(server::initial_admin_token_file(&self.data_dir))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| panic!("initial admin token: {e}"))
    }

    /// Enrolls `vm` into `pool` with the development bootstrap secret, over the server's
    /// current client (plain or TLS, see [`TestServer::use_https`]).
    pub async fn try_enroll(&self, vm: &str, pool: &str) -> Result<String, String> {
        let r = self
            .client
            .post(format!("{}/api/v1/enroll", self.base))
            .json(&serde_json::json!({
                "vm_id": vm, "pool_id": pool, "method": "bootstrap",
                "bootstrap_secret": self.dev_secret(),
            }))
            .send()
            .await
            .map_err(|e| format!("enroll: {e:?}"))?;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        if status != 200 {
            return Err(format!("enroll {vm}: {status} {body}"));
        }
        body["credential"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no credential: {body}"))
    }

    /// [`TestServer::try_enroll`] that must succeed.
    pub async fn enroll(&self, vm: &str, pool: &str) -> String {
        self.try_enroll(vm, pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The credential of `vm` for `pool` (or its last pool), enrolling when needed. None in
    /// open mode or for ids that cannot enroll.
    pub async fn credential(&self, vm: &str, pool: Option<&str>) -> Option<String> {
        if self.app().gate().mode == mig_controller::auth::AuthMode::Open
            || miglet_proto::ids::validate_vm_id(vm).is_err()
        {
            return None;
        }
        let known = self
            .creds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(vm)
            .cloned();
        let pool = match (pool.filter(|p| !p.is_empty()), &known) {
            (Some(p), _) => p.to_owned(),
            (None, Some((p, _))) => p.clone(),
            (None, None) => "pool-001".to_owned(),
        };
        if let Some((p, c)) = known
            && p == pool
        {
            return Some(c);
        }
        let cred = self.enroll(vm, &pool).await;
        self.creds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(vm.to_owned(), (pool, cred.clone()));
        Some(cred)
    }

    async fn auth(&self, path: &str, body: Option<&str>) -> Option<String> {
        let vm = path_vm(path)?;
        let pool = body
            .and_then(|b| serde_json::from_str::<Value>(b).ok())
            .and_then(|v| v["pool_id"].as_str().map(str::to_owned));
        self.credential(vm, pool.as_deref()).await
    }

    /// Opens a gRPC stream with the credential of the VM named in `first` (if a connect).
    pub async fn grpc_open(&self, first: MiGletMessage) -> Result<GrpcAgent, tonic::Status> {
        let cred = match &first.message {
            Some(mi_glet_message::Message::Connect(c)) => {
                self.credential(&c.vm_id, Some(&c.pool_id)).await
            }
            _ => None,
        };
        GrpcAgent::open_with(&self.grpc, first, cred.as_deref()).await
    }

    /// Connects over gRPC as `vm` (enrolled) and checks the ConnectAck.
    pub async fn grpc_connect(&self, vm: &str, pool: &str, boot: &str) -> GrpcAgent {
        let cred = self.credential(vm, Some(pool)).await;
        GrpcAgent::connect_with(&self.grpc, vm, pool, boot, cred.as_deref()).await
    }

    pub fn app(&self) -> &Arc<Controller> {
        match &self.server {
            Some(s) => &s.app,
            None => panic!("server stopped"),
        }
    }

    /// Graceful shutdown; the data dir stays (owned by the returned guard, if any).
    pub async fn stop(&mut self) -> Option<tempfile::TempDir> {
        if let Some(s) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(20), s.shutdown())
                .await
                .unwrap_or_else(|_| panic!("shutdown took longer than 20 s"));
        }
        self._dir.take()
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, body.to_string()).await
    }

    pub async fn post_raw(&self, path: &str, body: String) -> (u16, Value) {
        let mut req = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json");
        if let Some(c) = self.auth(path, Some(&body)).await {
            req = req.bearer_auth(c);
        }
        let r = req
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(c) = self.auth(path, None).await {
            req = req.bearer_auth(c);
        }
        let r = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `vm_started` over HTTP with the seed's body.
    pub async fn vm_started(&self, vm: &str, pool: &str) -> Value {
        let (status, body) = self
            .post(
                &format!("/api/v1/vms/{vm}/events"),
                &serde_json::json!({"type":"vm_started","vm_id":vm,"pool_id":pool,"org_id":"org-001"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    pub async fn poll(&self, vm: &str) -> Vec<Value> {
        let (status, body) = self.get(&format!("/api/v1/vms/{vm}/commands")).await;
        assert_eq!(status, 200, "{body}");
        body["commands"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("commands not an array: {body}"))
    }
}

/// Polls `cond` until it holds, at most `WAIT`.
pub async fn wait_until<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    miglet_sim::testkit::wait_for(what, WAIT, cond).await;
}

/// A raw gRPC agent: sends what the test says, returns what the controller sends.
pub struct GrpcAgent {
    pub tx: mpsc::Sender<MiGletMessage>,
    pub rx: tonic::Streaming<ControllerMessage>,
}

pub fn connect_msg(vm: &str, pool: &str, boot: &str) -> MiGletMessage {
    MiGletMessage {
        message: Some(mi_glet_message::Message::Connect(pb::ConnectRequest {
            vm_id: vm.into(),
            pool_id: pool.into(),
            org_id: "org-001".into(),
            version: "test".into(),
            boot_id: boot.into(),
        })),
    }
}

impl GrpcAgent {
    /// Opens a stream with `credential` (if any) and sends `first` (normally a connect).
    pub async fn open_with(
        url: &str,
        first: MiGletMessage,
        credential: Option<&str>,
    ) -> Result<GrpcAgent, tonic::Status> {
        let mut client = CommandServiceClient::connect(url.to_owned())
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(16);
        tx.send(first)
            .await
            .map_err(|_| tonic::Status::internal("send"))?;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(c) = credential {
            let value = format!("Bearer {c}")
                .parse()
                .map_err(|_| tonic::Status::internal("metadata"))?;
            request.metadata_mut().insert("authorization", value);
        }
        let inbound = client.stream_commands(request).await?.into_inner();
        Ok(GrpcAgent { tx, rx: inbound })
    }

    /// Connects and checks the ConnectAck.
    pub async fn connect_with(
        url: &str,
        vm: &str,
        pool: &str,
        boot: &str,
        credential: Option<&str>,
    ) -> GrpcAgent {
        let mut a = Self::open_with(url, connect_msg(vm, pool, boot), credential)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        match a.recv().await {
            Some(controller_message::Message::ConnectAck(ack)) => assert!(ack.accepted, "{ack:?}"),
            other => panic!("expected ConnectAck, got {other:?}"),
        }
        a
    }

    /// The next message, or None when the stream ended. Panics after `WAIT`.
    pub async fn recv(&mut self) -> Option<controller_message::Message> {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(m))) => m.message,
            Ok(Ok(None)) => None,
            Ok(Err(status)) => panic!("stream error: {status}"),
            Err(_) => panic!("no message within {WAIT:?}"),
        }
    }

    /// The next message within `d`, if any (stream errors are returned as Err).
    pub async fn recv_within(
        &mut self,
        d: Duration,
    ) -> Result<Option<controller_message::Message>, tonic::Status> {
        match tokio::time::timeout(d, self.rx.message()).await {
            Ok(Ok(Some(m))) => Ok(m.message),
            Ok(Ok(None)) => Ok(None),
            Ok(Err(status)) => Err(status),
            Err(_) => Ok(None),
        }
    }

    pub async fn recv_command(&mut self) -> pb::Command {
        loop {
            match self.recv().await {
                Some(controller_message::Message::Command(c)) => return c,
                Some(_) => continue,
                None => panic!("stream ended while waiting for a command"),
            }
        }
    }

    /// Asserts no command arrives within `d`.
    pub async fn expect_no_command(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            match self.recv_within(left).await {
                Ok(Some(controller_message::Message::Command(c))) => {
                    panic!("unexpected command {c:?}")
                }
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    }

    pub async fn send(&self, m: mi_glet_message::Message) {
        self.tx
            .send(MiGletMessage { message: Some(m) })
            .await
            .unwrap_or_else(|_| panic!("stream closed"));
    }

    pub async fn ack(&self, id: &str, success: bool, message: &str) {
        self.send(mi_glet_message::Message::CommandAck(pb::CommandAck {
            command_id: id.into(),
            success,
            message: message.into(),
            result: Default::default(),
        }))
        .await;
    }
}

/// The status code a stream was refused with: at open, or as its first message.
pub async fn refusal_code(
    res: Result<GrpcAgent, tonic::Status>,
) -> Result<tonic::Code, Box<dyn std::error::Error + Send + Sync>> {
    match res {
        Err(st) => Ok(st.code()),
        Ok(mut a) => Ok(a
            .recv_within(WAIT)
            .await
            .err()
            .map(|st| st.code())
            .ok_or("expected an error status")?),
    }
}

/// Waits until the controller has recorded the command's state.
pub async fn wait_command_state(app: &Controller, id: &str, state: &str) {
    let store = app.store().clone();
    let id = id.to_owned();
    let state = state.to_owned();
    wait_until(&format!("command {id} to be {state}"), || {
        let store = store.clone();
        let id = id.clone();
        let state = state.clone();
        async move {
            matches!(store.command_get(&id).await, Ok(Some(c)) if c.state.as_str() == state)
        }
    })
    .await;
}

pub use miglet_sim::testkit::all_bytes_under;

pub async fn serve(router: axum::Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("addr: {e}"));
    tokio::spawn(async move {
        let _ = axum::serve(l, router).await;
    });
    format!("http://{addr}")
}

/// Two pools with their own bootstrap secrets, and a GCE pool checked against `jwks`.
pub fn pools(st: &mut Settings, dir: &std::path::Path, jwks: &str) {
    let reg = |enrollment: PoolEnrollment| PoolRegistration {
        runner_url: "https://github.com/acme".into(),
        runner_group: "default".into(),
        labels: vec!["self-hosted".into()],
        token: Arc::new(StaticToken::new(TOKEN.into(), Duration::from_secs(600))),
        scaling: None,
        enrollment,
    };
    let secret = |name: &str, value: &str| {
        let p = dir.join(name);
        std::fs::write(&p, value).unwrap_or_else(|e| panic!("write secret: {e}"));
        Some(p)
    };
    let p = reg(PoolEnrollment {
        bootstrap_secret_file: secret("p.secret", "secret-of-pool-p-0123456789"),
        ..PoolEnrollment::default()
    });
    let q = reg(PoolEnrollment {
        bootstrap_secret_file: secret("q.secret", "secret-of-pool-q-0123456789"),
        ..PoolEnrollment::default()
    });
    let g = reg(PoolEnrollment {
        gce: Some(GceRule {
            project_id: "acme-ci".into(),
            zones: vec!["us-central1-a".into()],
            instance_name_prefix: Some("gce-".into()),
            service_account: None,
        }),
        ..PoolEnrollment::default()
    });
    // Pool t: one-time enrollment tokens, and a bootstrap secret that enrolls only `t-` ids.
    let t = reg(PoolEnrollment {
        bootstrap_secret_file: secret("t.secret", "secret-of-pool-t-0123456789"),
        enrollment_tokens: true,
        vm_id_prefix: Some("t-".into()),
        ..PoolEnrollment::default()
    });
    st.pools = Pools::new(
        [
            ("p".to_owned(), p),
            ("q".to_owned(), q),
            ("g".to_owned(), g),
            ("t".to_owned(), t),
        ]
        .into(),
        None,
    );
    st.enroll.audience = Some(AUDIENCE.into());
    st.enroll.google_jwks_url = jwks.to_owned();
}

pub async fn enroll_raw(s: &TestServer, body: Value) -> (u16, Value) {
    let r = s
        .client
        .post(format!("{}/api/v1/enroll", s.base))
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("enroll: {e}"));
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub async fn request(
    s: &TestServer,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let url = format!("{}{path}", s.base);
    let mut req = match method {
        "GET" => s.client.get(url),
        _ => s.client.post(url),
    };
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.json().await.unwrap_or(Value::Null), headers)
}

/// A server whose only pool, `pool_id`, is sized by the scaler with `provider` (labels
/// `self-hosted`, `linux`, `x64` and `label`), taking webhooks signed with `secret`, with a
/// pass every second.
pub async fn scaled_server(
    pool_id: &str,
    label: &str,
    policy: mig_controller::lifecycle::ScalePolicy,
    provider: Arc<dyn mig_controller::provider::Provider>,
    secret: &str,
) -> TestServer {
    TestServer::start_with(|st| {
        let file = st.data_dir.join("webhook-secret");
        std::fs::create_dir_all(&st.data_dir).unwrap_or_else(|e| panic!("data dir: {e}"));
        std::fs::write(&file, secret).unwrap_or_else(|e| panic!("secret: {e}"));
        st.webhook_secret_file = Some(file);
        st.reconcile_interval = Duration::from_secs(1);
        let mut pool = st
            .pools
            .get("pool-001")
            .unwrap_or_else(|e| panic!("fallback pool: {e}"))
            .clone();
        pool.labels = ["self-hosted", "linux", "x64", label]
            .map(String::from)
            .to_vec();
        pool.scaling = Some(mig_controller::provider::PoolScaling { policy, provider });
        st.pools = Pools::new([(pool_id.to_owned(), pool)].into(), None);
    })
    .await
}
