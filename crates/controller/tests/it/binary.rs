//! The real `mig-controller` binary: start on port 0, serve, stop on SIGTERM, restart on the
//! same data dir, and export the sample controller's layout.

use super::common::*;
use serde_json::{Value, json};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_mig-controller");

struct Child {
    child: tokio::process::Child,
    base: String,
    grpc: String,
}

async fn spawn(
    data_dir: &Path,
    log: &Path,
) -> Result<Child, Box<dyn std::error::Error + Send + Sync>> {
    spawn_with(data_dir, log, &[]).await
}

async fn spawn_with(
    data_dir: &Path,
    log: &Path,
    extra_env: &[(&str, &str)],
) -> Result<Child, Box<dyn std::error::Error + Send + Sync>> {
    let addr_file = data_dir.join("addr.json");
    let _ = std::fs::remove_file(&addr_file);
    let log_file = std::fs::File::create(log)?;
    let child = tokio::process::Command::new(BIN)
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--addr-file")
        .arg(&addr_file)
        .env("MIG_CONTROLLER_STATIC_TOKEN", TOKEN)
        .env("MIG_CONTROLLER_RUNNER_URL", "https://github.com/bin-org")
        .env_remove("RUST_LOG")
        .envs(extra_env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()?;
    let f = addr_file.clone();
    wait_until("the controller's address file", || {
        let f = f.clone();
        async move { f.exists() }
    })
    .await;
    let addrs: Value = serde_json::from_str(&std::fs::read_to_string(&addr_file)?)?;
    let http = addrs["http_addr"].as_str().ok_or("http_addr")?;
    let grpc = addrs["grpc_addr"].as_str().ok_or("grpc_addr")?;
    Ok(Child {
        child,
        base: format!("http://{http}"),
        grpc: format!("http://{grpc}"),
    })
}

async fn sigterm(
    mut c: Child,
) -> Result<std::process::ExitStatus, Box<dyn std::error::Error + Send + Sync>> {
    let pid = c.child.id().ok_or("no pid")?;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    assert!(status.success());
    Ok(tokio::time::timeout(Duration::from_secs(20), c.child.wait()).await??)
}

#[tokio::test]
async fn binary_serves_stops_on_sigterm_restarts_and_exports() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let client = reqwest::Client::builder().timeout(WAIT).build()?;

    let c = spawn(&data, &dir.path().join("run1.log")).await?;
    // Authenticated by default, with what one command needs set up in the data dir.
    let health: Value = client
        .get(format!("{}/health", c.base))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(health["auth_mode"], "authenticated");
    let vm_started =
        json!({"type":"vm_started","vm_id":"vm-bin","pool_id":"pool-001","org_id":"org-001"});
    let r = client
        .post(format!("{}/api/v1/vms/vm-bin/events", c.base))
        .json(&vm_started)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 401);
    let secret = std::fs::read_to_string(data.join("dev-bootstrap-secret"))?;
    let enrolled: Value = client
        .post(format!("{}/api/v1/enroll", c.base))
        .json(&json!({"vm_id":"vm-bin","pool_id":"pool-001","method":"bootstrap","bootstrap_secret":secret.trim()}))
        .send()
        .await?
        .json()
        .await?;
    let cred = enrolled["credential"]
        .as_str()
        .ok_or("no credential")?
        .to_owned();
    let r = client
        .post(format!("{}/api/v1/vms/vm-bin/events", c.base))
        .bearer_auth(&cred)
        .json(&vm_started)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    let r = client
        .post(format!("{}/api/v1/vms/vm-bin/heartbeat", c.base))
        .bearer_auth(&cred)
        .json(&json!({"type":"job_heartbeat","vm_id":"vm-bin","miglet_state":"ready"}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    let r = client
        .post(format!("{}/api/v1/vms/vm-bin/registration-token", c.base))
        .bearer_auth(&cred)
        .json(&json!({"pool_id":"pool-001"}))
        .send()
        .await?;
    assert_eq!(
        r.json::<Value>().await?["runner_url"],
        "https://github.com/bin-org"
    );
    let status = sigterm(c).await?;
    assert!(status.success(), "exit status {status:?}");
    let log1 = std::fs::read_to_string(dir.path().join("run1.log"))?;
    assert!(log1.contains("MIG controller listening"), "{log1}");
    assert!(log1.contains("shutdown complete"), "{log1}");
    assert!(
        log1.contains("development defaults"),
        "dev defaults must be warned about"
    );

    // Restart on the same data dir: the registration queued before the stop is still there.
    let c = spawn(&data, &dir.path().join("run2.log")).await?;
    let body: Value = client
        .get(format!("{}/api/v1/vms/vm-bin/commands", c.base))
        .bearer_auth(&cred)
        .send()
        .await?
        .json()
        .await?;
    let cmds = body["commands"].as_array().ok_or("commands")?;
    assert_eq!(cmds.len(), 1, "{body}");
    assert_eq!(cmds[0]["parameters"]["registration_token"], TOKEN);
    assert!(sigterm(c).await?.success());

    // Export: the sample controller's per-VM layout, with no token anywhere.
    let out = dir.path().join("export");
    let status = std::process::Command::new(BIN)
        .args(["export", "--data-dir"])
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .status()?;
    assert!(status.success());
    let mut names: Vec<String> = std::fs::read_dir(out.join("vm-bin"))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    let has = |prefix: &str| {
        names
            .iter()
            .any(|n| n.starts_with(prefix) && n.ends_with(".json"))
    };
    for prefix in [
        "event-vm_started-",
        "heartbeat-",
        "registration-token-request-",
        "registration-token-response-",
        "command-register_runner-",
        "vm.json",
    ] {
        assert!(has(prefix), "missing {prefix}* in {names:?}");
    }
    let started = names
        .iter()
        .find(|n| n.starts_with("event-vm_started-"))
        .ok_or("event file")?;
    let body: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("vm-bin").join(started))?)?;
    assert_eq!(
        body,
        json!({"type":"vm_started","vm_id":"vm-bin","pool_id":"pool-001","org_id":"org-001"})
    );
    for (path, text) in all_bytes_under(&out)
        .into_iter()
        .chain(all_bytes_under(&data))
    {
        assert!(!text.contains(TOKEN), "token found in {}", path.display());
    }
    for log in ["run1.log", "run2.log"] {
        let text = std::fs::read_to_string(dir.path().join(log))?;
        assert!(!text.contains(TOKEN), "token found in {log}");
        for line in text.lines() {
            serde_json::from_str::<Value>(line)
                .map_err(|e| format!("not a JSON log line ({e}): {line}"))?;
        }
    }
    Ok(())
}

/// Runs `serve` with `args` and `env` (bounded); its exit code and standard error.
async fn serve_output(
    data_dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<(Option<i32>, String), Box<dyn std::error::Error + Send + Sync>> {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(BIN)
            .args([
                "serve",
                "--http-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Every invalid setting fails at start with exit 78 and a message naming it: in the file,
/// in a file it names (secrets, token files, TLS), in a flag, in the environment.
#[tokio::test]
async fn invalid_config_exits_with_the_config_code() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let cfg = d.join("bad.toml");
    let write_cfg = |text: &str| std::fs::write(&cfg, text);
    let cfg_arg = ["--config", cfg.to_str().ok_or("path")?];
    let secret = d.join("pool.secret");
    let token = d.join("token");
    std::fs::write(&token, "ghs_fromfile")?;
    let pool = |secret_file: &Path, token_file: &Path, url: &str| {
        format!(
            "[pools.p]\nrunner_url = {url:?}\ntoken_file = {token_file:?}\n[pools.p.enrollment]\nbootstrap_secret_file = {secret_file:?}\n"
        )
    };
    let cases: Vec<(String, Option<&str>, &str)> = vec![
        (
            "[pools.p]\nrunner_url = \"https://github.com/x\"\n".into(),
            None,
            "token or token_file",
        ),
        (
            pool(&secret, &token, "https://github.com/x"),
            None,
            "pools.p.enrollment.bootstrap_secret_file",
        ),
        (
            pool(&secret, &token, "https://github.com/x"),
            Some("short"),
            "pools.p.enrollment.bootstrap_secret_file",
        ),
        (
            pool(&secret, &d.join("missing-token"), "https://github.com/x"),
            Some("a-long-enough-secret-0123"),
            "pools.p.token_file",
        ),
        (
            pool(&secret, &token, "github.com/x"),
            Some("a-long-enough-secret-0123"),
            "pools.p.runner_url",
        ),
    ];
    for (text, secret_content, named) in cases {
        write_cfg(&text)?;
        match secret_content {
            Some(s) => std::fs::write(&secret, s)?,
            None => {
                let _ = std::fs::remove_file(&secret);
            }
        }
        let (code, err) = serve_output(&d.join("data"), &cfg_arg, &[]).await?;
        assert_eq!(code, Some(78), "{text}: {err}");
        assert!(err.contains(named), "{named} not named: {err}");
        assert!(!err.contains("ghs_fromfile"), "{err}");
    }
    // Flags and environment values that do not parse.
    let (code, err) = serve_output(
        &d.join("data"),
        &["--heartbeat-interval-secs", "often"],
        &[],
    )
    .await?;
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("--heartbeat-interval-secs"), "{err}");
    let (code, err) = serve_output(
        &d.join("data"),
        &[],
        &[("MIG_CONTROLLER_AUTH_MODE", "sometimes")],
    )
    .await?;
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("--auth-mode"), "{err}");
    // TLS files that do not hold a certificate are found at start too.
    std::fs::write(d.join("cert.pem"), "not a certificate")?;
    std::fs::write(d.join("key.pem"), "not a key")?;
    let (code, err) = serve_output(
        &d.join("data"),
        &[
            "--tls-cert",
            d.join("cert.pem").to_str().ok_or("path")?,
            "--tls-key",
            d.join("key.pem").to_str().ok_or("path")?,
        ],
        &[],
    )
    .await?;
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("TLS"), "{err}");
    // Help is not an error.
    let (code, _) = serve_output(&d.join("data"), &["--help"], &[]).await?;
    assert_eq!(code, Some(0));
    Ok(())
}

fn run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .env_remove("MIG_CONTROLLER_DATA_DIR")
        .output()
        .unwrap_or_else(|e| panic!("run {args:?}: {e}"))
}

/// `certs init` makes a CA, a server and a client certificate the controller and a client
/// accept for mutual TLS; `certs client` adds one; keys are private; nothing is overwritten.
#[tokio::test]
async fn certs_subcommand_makes_a_working_pki() -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let tls = dir.path().join("tls");
    let tls_s = tls.display().to_string();
    let out = run(&[
        "certs",
        "init",
        "--out",
        &tls_s,
        "--host",
        "localhost",
        "--host",
        "127.0.0.1",
        "--client",
        "agents",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["certs", "client", "--dir", &tls_s, "--name", "ops"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for key in [
        "ca-key.pem",
        "server-key.pem",
        "agents-key.pem",
        "ops-key.pem",
    ] {
        let mode = std::fs::metadata(tls.join(key))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let again = run(&["certs", "init", "--out", &tls_s, "--host", "localhost"]);
    assert!(
        !again.status.success(),
        "a second init must not overwrite the CA"
    );

    let t = tls.clone();
    let mut s = TestServer::start_with(|st| {
        st.tls = Some(mig_controller::config::TlsSettings {
            cert_file: t.join("server.pem"),
            key_file: t.join("server-key.pem"),
            client_ca_file: Some(t.join("ca.pem")),
            reload_interval: Duration::from_secs(10),
        });
    })
    .await;
    let read = |f: &str| std::fs::read_to_string(tls.join(f)).unwrap_or_default();
    for client in ["agents", "ops"] {
        let id = mig_controller::pki::Pem {
            cert: read(&format!("{client}.pem")),
            key: read(&format!("{client}-key.pem")),
        };
        s.use_https(&read("ca.pem"), Some(&id));
        let (status, body) = s.get("/health").await;
        assert_eq!(status, 200, "{client}: {body}");
    }
    s.stop().await;
    Ok(())
}

/// Operator tokens from the CLI: created (printed once), listed without their secret,
/// revoked once; each step is in the audit log.
#[tokio::test]
async fn token_subcommands_create_list_revoke_and_audit() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data").display().to_string();
    let out = run(&[
        "token",
        "create",
        "--name",
        "grafana",
        "--role",
        "read-only",
        "--data-dir",
        &data,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?.trim().to_owned();
    let id = token
        .strip_prefix("migop_")
        .and_then(|r| r.split('_').next())
        .ok_or("token shape")?
        .to_owned();
    let list = run(&["token", "list", "--data-dir", &data]);
    let listed = String::from_utf8(list.stdout)?;
    assert!(listed.contains(&id) && listed.contains("grafana") && listed.contains("read-only"));
    assert!(listed.contains("active"));
    assert!(!listed.contains(&token), "the secret is never shown again");
    let bad = run(&[
        "token",
        "create",
        "--name",
        "no spaces",
        "--role",
        "admin",
        "--data-dir",
        &data,
    ]);
    assert!(!bad.status.success());
    assert!(
        run(&["token", "revoke", "--data-dir", &data, &id])
            .status
            .success()
    );
    let again = run(&["token", "revoke", "--data-dir", &data, &id]);
    assert!(!again.status.success(), "revoking twice is an error");
    let listed = String::from_utf8(run(&["token", "list", "--data-dir", &data]).stdout)?;
    assert!(listed.contains("revoked"));
    let audit = run(&["audit", "--json", "--data-dir", &data]);
    let lines: Vec<Value> = String::from_utf8(audit.stdout)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let actions: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["action"].as_str().unwrap_or_default(),
                l["outcome"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("operator_token.revoke", "error: not_found"),
            ("operator_token.revoke", "ok"),
            ("operator_token.create", "ok"),
        ]
    );
    assert!(
        lines
            .iter()
            .all(|l| l["actor"].as_str().is_some_and(|a| a.starts_with("cli:")))
    );
    Ok(())
}

/// `open` mode only when asked for (here through the environment): warned about at start-up,
/// shown in `/health`, and the base contract works with no credential.
#[tokio::test]
async fn open_mode_is_explicit_warned_and_visible() -> TestResult {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("open.log");
    let c = spawn_with(
        &dir.path().join("data"),
        &log,
        &[("MIG_CONTROLLER_AUTH_MODE", "open")],
    )
    .await?;
    let client = reqwest::Client::builder().timeout(WAIT).build()?;
    let health: Value = client
        .get(format!("{}/health", c.base))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(health["auth_mode"], "open");
    let r = client
        .post(format!("{}/api/v1/vms/vm-open/events", c.base))
        .json(&json!({"type":"vm_started","vm_id":"vm-open","pool_id":"pool-001"}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    assert!(sigterm(c).await?.success());
    let text = std::fs::read_to_string(&log)?;
    assert!(text.contains("AUTH MODE OPEN"), "{text}");
    assert!(
        !dir.path().join("data/initial-admin-token").exists(),
        "no operator token is minted in open mode"
    );
    Ok(())
}

/// Hole 4: after `kill -9` and a restart no VM shows a stream that is not open; a VM that
/// connects again shows connected.
#[tokio::test]
async fn connection_state_is_true_after_a_crash() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let client = reqwest::Client::builder().timeout(WAIT).build()?;
    let mut c = spawn(&data, &dir.path().join("run1.log")).await?;
    let secret = std::fs::read_to_string(data.join("dev-bootstrap-secret"))?;
    let enroll = |vm: &str| json!({"vm_id":vm,"pool_id":"pool-001","method":"bootstrap","bootstrap_secret":secret.trim()});
    let mut creds = Vec::new();
    for vm in ["vm-k1", "vm-k2"] {
        let enrolled: Value = client
            .post(format!("{}/api/v1/enroll", c.base))
            .json(&enroll(vm))
            .send()
            .await?
            .json()
            .await?;
        creds.push(
            enrolled["credential"]
                .as_str()
                .ok_or("credential")?
                .to_owned(),
        );
    }
    let admin = std::fs::read_to_string(data.join("initial-admin-token"))?;
    let connected = |base: String, vm: &'static str| {
        let client = client.clone();
        let admin = admin.trim().to_owned();
        async move {
            let v: Value = client
                .get(format!("{base}/api/v1/admin/vms/{vm}"))
                .bearer_auth(admin)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            v["vm"]["connected"].as_bool()
        }
    };
    let _a1 = GrpcAgent::connect_with(&c.grpc, "vm-k1", "pool-001", "b1", Some(&creds[0])).await;
    let _a2 = GrpcAgent::connect_with(&c.grpc, "vm-k2", "pool-001", "b2", Some(&creds[1])).await;
    for vm in ["vm-k1", "vm-k2"] {
        let base = c.base.clone();
        wait_until("connected before the crash", || {
            let f = connected(base.clone(), vm);
            async move { f.await == Some(true) }
        })
        .await;
    }
    c.child.start_kill()?;
    c.child.wait().await?;
    let c = spawn(&data, &dir.path().join("run2.log")).await?;
    for vm in ["vm-k1", "vm-k2"] {
        assert_eq!(
            connected(c.base.clone(), vm).await,
            Some(false),
            "{vm} has no stream after the restart"
        );
    }
    let _a1 = GrpcAgent::connect_with(&c.grpc, "vm-k1", "pool-001", "b1", Some(&creds[0])).await;
    let base = c.base.clone();
    wait_until("vm-k1 connected again", || {
        let f = connected(base.clone(), "vm-k1");
        async move { f.await == Some(true) }
    })
    .await;
    assert_eq!(connected(c.base.clone(), "vm-k2").await, Some(false));
    assert!(sigterm(c).await?.success());
    Ok(())
}

/// Hole 3 against the real binary at a low open-file limit: a flood of silent sockets to both
/// listeners from many addresses is shed at the caps, never reaching the file limit, and
/// `/health`, enrollment and a real stream keep working; the shedding is logged.
#[tokio::test]
async fn a_connection_flood_cannot_take_the_controller_down() -> TestResult {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    let addr_file = data.join("addr.json");
    let log = dir.path().join("flood.log");
    // The shell sets a 1,024-file limit (soft and hard) and becomes the controller.
    let mut child = tokio::process::Command::new("bash")
        .arg("-c")
        .arg("ulimit -n 1024 && exec \"$0\" \"$@\"")
        .arg(BIN)
        .args([
            "serve",
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .arg("--data-dir")
        .arg(&data)
        .arg("--addr-file")
        .arg(&addr_file)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()?;
    let f = addr_file.clone();
    wait_until("the controller's address file", || {
        let f = f.clone();
        async move { f.exists() }
    })
    .await;
    let addrs: Value = serde_json::from_str(&std::fs::read_to_string(&addr_file)?)?;
    let http: std::net::SocketAddr = addrs["http_addr"].as_str().ok_or("http")?.parse()?;
    let grpc: std::net::SocketAddr = addrs["grpc_addr"].as_str().ok_or("grpc")?.parse()?;
    // 1,500 silent sockets to gRPC and 300 to HTTP, from 30 addresses.
    let mut flood = Vec::new();
    for i in 0..1800u32 {
        let from = std::net::IpAddr::from([127, 0, 1, (i % 30) as u8 + 2]);
        let to = if i < 1500 { grpc } else { http };
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(std::net::SocketAddr::new(from, 0))?;
        if let Ok(c) = socket.connect(to).await {
            flood.push(c);
        }
    }
    let client = reqwest::Client::builder().timeout(WAIT).build()?;
    let base = format!("http://{http}");
    let health = client.get(format!("{base}/health")).send().await?;
    assert_eq!(health.status().as_u16(), 200);
    let secret = std::fs::read_to_string(data.join("dev-bootstrap-secret"))?;
    let enrolled: Value = client
        .post(format!("{base}/api/v1/enroll"))
        .json(&json!({"vm_id":"vm-fd","pool_id":"pool-001","method":"bootstrap","bootstrap_secret":secret.trim()}))
        .send()
        .await?
        .json()
        .await?;
    let cred = enrolled["credential"].as_str().ok_or("credential")?;
    let mut a = GrpcAgent::connect_with(
        &format!("http://{grpc}"),
        "vm-fd",
        "pool-001",
        "b1",
        Some(cred),
    )
    .await;
    assert_eq!(a.recv_command().await.r#type, "register_runner");
    drop(flood);
    child.start_kill()?;
    child.wait().await?;
    let text = std::fs::read_to_string(&log)?;
    assert!(text.contains("Shedding load"), "no shedding logged");
    assert!(
        !text.contains("Cannot accept connections"),
        "the caps keep accept from running out of files"
    );
    Ok(())
}
