//! The real `migctl` binary against a real controller (in-process, loopback, port 0).

use mig_controller::config::Settings;
use mig_controller::server::{self, RunningServer};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

type R = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const MIGCTL: &str = env!("CARGO_BIN_EXE_migctl");

struct Fleet {
    server: Option<RunningServer>,
    base: String,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl Fleet {
    /// A controller with VMs vm-1 (pool-a, running a job), vm-2 (pool-a) and vm-3 (pool-b).
    async fn start() -> Fleet {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut s = Settings::for_tests(&dir.path().join("data"), "TESTTOKEN-migctl");
        let secret = dir.path().join("webhook.secret");
        std::fs::write(&secret, WEBHOOK_SECRET).unwrap_or_else(|e| panic!("{e}"));
        s.webhook_secret_file = Some(secret);
        let (h, g) = server::bind(&s).await.unwrap_or_else(|e| panic!("{e}"));
        let running = server::start(s, h, g)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let f = Fleet {
            base: format!("http://{}", running.http_addr),
            server: Some(running),
            dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_else(|e| panic!("{e}")),
        };
        for (vm, pool) in [("vm-1", "pool-a"), ("vm-2", "pool-a"), ("vm-3", "pool-b")] {
            f.vm_post(
                vm,
                pool,
                "events",
                json!({"type":"vm_started","vm_id":vm,"pool_id":pool}),
            )
            .await;
        }
        f.vm_post(
            "vm-1",
            "pool-a",
            "events",
            json!({"type":"job_started","vm_id":"vm-1","run_id":"4242","repository":"acme/app"}),
        )
        .await;
        f
    }

    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    async fn credential(&self, vm: &str, pool: &str) -> String {
        let secret =
            std::fs::read_to_string(self.data().join("dev-bootstrap-secret")).unwrap_or_default();
        let r: Value = self
            .http
            .post(format!("{}/api/v1/enroll", self.base))
            .json(&json!({"vm_id":vm,"pool_id":pool,"method":"bootstrap","bootstrap_secret":secret.trim()}))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .unwrap_or_else(|e| panic!("enroll: {e}"))
            .json()
            .await
            .unwrap_or(Value::Null);
        r["credential"].as_str().unwrap_or_default().to_owned()
    }

    async fn vm_post(&self, vm: &str, pool: &str, what: &str, body: Value) -> Value {
        let cred = self.credential(vm, pool).await;
        self.http
            .post(format!("{}/api/v1/vms/{vm}/{what}", self.base))
            .bearer_auth(cred)
            .json(&body)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .unwrap_or_else(|e| panic!("POST {what}: {e}"))
            .json()
            .await
            .unwrap_or(Value::Null)
    }

    /// Runs migctl with the endpoint and the initial admin token.
    async fn migctl(&self, args: &[&str]) -> (i32, String, String) {
        self.migctl_env(
            args,
            &[
                ("MIGCTL_ENDPOINT", self.base.clone()),
                (
                    "MIGCTL_TOKEN_FILE",
                    self.data()
                        .join("initial-admin-token")
                        .display()
                        .to_string(),
                ),
            ],
        )
        .await
    }

    async fn migctl_env(&self, args: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
        let mut cmd = tokio::process::Command::new(MIGCTL);
        cmd.args(args)
            .env_clear()
            .env("HOME", self.dir.path())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("migctl {args:?} hung"))
            .unwrap_or_else(|e| panic!("migctl: {e}"));
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

const WEBHOOK_SECRET: &str = "migctl-test-webhook-secret-0123";

#[tokio::test]
async fn lists_shows_and_searches() -> R {
    let mut f = Fleet::start().await;
    let (code, out, err) = f.migctl(&["vms", "list"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("VM") && lines[0].contains("STATE"),
        "{out}"
    );
    assert_eq!(lines.len(), 4, "{out}");
    assert!(
        out.contains("vm-1") && out.contains("job_running") && out.contains("4242 acme/app"),
        "{out}"
    );

    let (code, out, _) = f
        .migctl(&["vms", "list", "--pool", "pool-b", "-o", "json"])
        .await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out)?;
    assert_eq!(v["vms"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["vms"][0]["vm_id"], "vm-3");

    let (code, out, _) = f.migctl(&["vms", "list", "--limit", "1", "--all"]).await;
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 4, "all pages followed: {out}");

    let (code, out, err) = f.migctl(&["vms", "show", "vm-1"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("TIMELINE") && out.contains("vm_started") && out.contains("job_started"),
        "{out}"
    );
    assert!(out.contains("register_runner pending"), "{out}");

    let (code, out, _) = f
        .migctl(&["events", "search", "--type", "job_started"])
        .await;
    assert_eq!(code, 0);
    assert!(out.contains("vm-1") && out.contains("run_id=4242"), "{out}");
    assert!(!out.contains("vm_started"), "{out}");

    let (code, out, _) = f.migctl(&["pools"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("pool-a") && out.contains("pool-b"), "{out}");
    assert!(out.contains("SCALING"), "{out}");

    // A job from GitHub's webhook, taken by vm-1's runner.
    for (action, runner) in [("queued", None), ("in_progress", Some("vm-1"))] {
        let body = json!({
            "action": action,
            "workflow_job": {"id": 5150, "run_id": 77, "name": "lint", "labels": ["self-hosted"],
                             "runner_name": runner, "created_at": "2026-12-04T10:00:00Z"},
            "repository": {"full_name": "acme/app"}
        })
        .to_string();
        let r = f
            .http
            .post(format!("{}/api/v1/github/webhook", f.base))
            .header("X-GitHub-Event", "workflow_job")
            .header("X-GitHub-Delivery", format!("d-{action}"))
            .header(
                "X-Hub-Signature-256",
                mig_controller::github::webhook::sign(WEBHOOK_SECRET.as_bytes(), body.as_bytes()),
            )
            .body(body)
            .send()
            .await?;
        assert_eq!(r.status(), 200);
    }
    let (code, out, err) = f.migctl(&["jobs"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("JOB") && out.contains("QUEUED"), "{out}");
    assert!(
        out.contains("5150")
            && out.contains("acme/app")
            && out.contains("vm-1")
            && out.contains("in_progress"),
        "{out}"
    );
    f.stop().await;
    Ok(())
}

#[tokio::test]
async fn drain_waits_for_the_acknowledgment_and_watch_follows_events() -> R {
    let mut f = Fleet::start().await;
    // vm-2 acts as its agent: polls and acknowledges whatever arrives.
    let cred = f.credential("vm-2", "pool-a").await;
    let (base, http) = (f.base.clone(), f.http.clone());
    let agent = tokio::spawn(async move {
        for _ in 0..200 {
            let r: Value = match http
                .get(format!("{base}/api/v1/vms/vm-2/commands"))
                .bearer_auth(&cred)
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            for c in r["commands"].as_array().cloned().unwrap_or_default() {
                let id = c["id"].as_str().unwrap_or_default().to_owned();
                let _ = http
                    .post(format!("{base}/api/v1/vms/vm-2/commands/{id}/ack"))
                    .bearer_auth(&cred)
                    .json(&json!({"success": true, "message": "draining now"}))
                    .send()
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let (code, out, err) = f
        .migctl(&[
            "drain",
            "vm-2",
            "--reason",
            "kernel update",
            "--wait",
            "--wait-timeout",
            "30",
        ])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("acknowledged") && out.contains("draining now"),
        "{out}"
    );
    // --wait says what it waits for, and each acknowledgment as it comes.
    assert!(
        err.contains("Waiting up to 30 s for 1 command(s)")
            && err.contains("drain on vm-2: acknowledged"),
        "{err}"
    );
    agent.abort();
    let (code, out, _) = f
        .migctl(&["log-level", "--pool", "pool-a", "debug", "-o", "json"])
        .await;
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out)?;
    assert_eq!(v["commands"].as_array().map(Vec::len), Some(2));

    // watch: start it, wait until it says it is watching, then report a job end.
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let watch = {
        let base = f.base.clone();
        let token = f.data().join("initial-admin-token").display().to_string();
        let home = f.dir.path().to_owned();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut child = tokio::process::Command::new(MIGCTL)
                .args(["watch", "--type", "job_completed", "--count", "1"])
                .env_clear()
                .env("HOME", home)
                .env("MIGCTL_ENDPOINT", base)
                .env("MIGCTL_TOKEN_FILE", token)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()?;
            let stderr = child.stderr.take().ok_or("stderr")?;
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            let mut ready = Some(ready_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("Watching live events")
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(());
                }
            }
            let out =
                tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await??;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(out)
        })
    };
    tokio::time::timeout(Duration::from_secs(30), ready_rx).await??;
    f.vm_post(
        "vm-1",
        "pool-a",
        "events",
        json!({"type":"job_completed","vm_id":"vm-1","run_id":"4242","result":"Succeeded"}),
    )
    .await;
    let out = watch.await??;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("vm-1")
            && text.contains("job_completed")
            && text.contains("result=Succeeded"),
        "{text}"
    );
    f.stop().await;
    Ok(())
}

#[tokio::test]
async fn errors_are_useful_and_the_config_file_works() -> R {
    let mut f = Fleet::start().await;
    let (code, _, err) = f
        .migctl_env(
            &["vms", "list"],
            &[
                ("MIGCTL_ENDPOINT", f.base.clone()),
                (
                    "MIGCTL_TOKEN",
                    "migop_0123456789abcdef_wrongwrongwrongwrongwrongwrongwrong".into(),
                ),
            ],
        )
        .await;
    assert_eq!(code, 1);
    assert!(err.contains("refused the token"), "{err}");
    let (code, _, err) = f
        .migctl_env(&["vms", "list"], &[("MIGCTL_ENDPOINT", f.base.clone())])
        .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("no operator token")
            && err.contains("--token-file")
            && err.contains("MIGCTL_TOKEN_FILE"),
        "{err}"
    );
    let (code, _, err) = f
        .migctl_env(
            &["vms", "list"],
            &[
                ("MIGCTL_ENDPOINT", "http://127.0.0.1:9".into()),
                ("MIGCTL_TOKEN", "x".into()),
            ],
        )
        .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot reach the controller at http://127.0.0.1:9"),
        "{err}"
    );
    let (code, _, err) = f.migctl(&["vms", "show", "vm-nope"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("unknown VM"), "{err}");
    // The README's examples on a controller without those pools say so, not an empty table
    // or a bare 404.
    let (code, out, _) = f
        .migctl(&[
            "vms",
            "list",
            "--pool",
            "linux-x64",
            "--state",
            "job_running",
        ])
        .await;
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        "No VMs match pool \"linux-x64\", state \"job_running\"."
    );
    let (code, _, err) = f
        .migctl(&["shutdown", "--pool", "linux-x64", "--force"])
        .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("pool \"linux-x64\" has no VMs") && err.contains("migctl pools"),
        "{err}"
    );
    let (code, _, err) = f.migctl(&["drain", "vm-nope"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no VM \"vm-nope\""), "{err}");
    // Every option says what it is for.
    for cmd in [
        &["drain", "-h"][..],
        &["watch", "-h"],
        &["vms", "list", "-h"],
    ] {
        let out = std::process::Command::new(MIGCTL).args(cmd).output()?;
        let help = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let opt = line.trim_start();
            if !opt.starts_with('-') {
                continue;
            }
            // The text is on the option's line, or (when clap wraps) on the next one.
            let same_line = opt.split_whitespace().count() > 2;
            let next_line = lines
                .get(i + 1)
                .map(|n| n.trim_start())
                .is_some_and(|n| !n.is_empty() && !n.starts_with('-'));
            assert!(
                same_line || next_line || opt.contains("--help"),
                "no help text: {line:?} in {cmd:?}"
            );
        }
    }
    // The config file (default location under $HOME/.config).
    let cfg = f.dir.path().join(".config/migctl");
    std::fs::create_dir_all(&cfg)?;
    std::fs::write(
        cfg.join("config.toml"),
        format!(
            "endpoint = \"{}\"\ntoken_file = \"{}\"\n",
            f.base,
            f.data().join("initial-admin-token").display()
        ),
    )?;
    let (code, out, err) = f.migctl_env(&["vms", "list", "-o", "json"], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(serde_json::from_str::<Value>(&out).is_ok());
    std::fs::write(cfg.join("config.toml"), "endpont = \"typo\"\n")?;
    let (code, _, err) = f.migctl_env(&["vms", "list"], &[]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("config file") && err.contains("not valid"),
        "{err}"
    );
    let _ = Path::new(MIGCTL);
    f.stop().await;
    Ok(())
}
