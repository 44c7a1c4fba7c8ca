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
}

async fn spawn(
    data_dir: &Path,
    log: &Path,
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
    Ok(Child {
        child,
        base: format!("http://{http}"),
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

#[tokio::test]
async fn invalid_config_exits_with_the_config_code() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[pools.p]\nrunner_url = \"https://github.com/x\"\n")?;
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(BIN)
            .args([
                "serve",
                "--http-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.path())
            .output(),
    )
    .await??;
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token or token_file"), "{err}");
    Ok(())
}
