//! Drives the runner stand-in the way an agent does and checks what the agent can observe.

use miglet_sim::github::{FakeGitHub, Job};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

type R = Result<(), Box<dyn std::error::Error + Send + Sync>>;
const LISTENER: &str = env!("CARGO_BIN_EXE_fake-runner-listener");
const TOKEN: &str = "AHTREGTOKEN";

async fn github() -> Result<(FakeGitHub, String), Box<dyn std::error::Error + Send + Sync>> {
    let g = FakeGitHub::new(&[TOKEN]);
    let (addr, _task) = g
        .serve(tokio::net::TcpListener::bind("127.0.0.1:0").await?)
        .await?;
    Ok((g, format!("http://{addr}/test-org")))
}

async fn config(
    dir: &Path,
    url: &str,
    token: &str,
    extra: &[&str],
) -> std::io::Result<std::process::Output> {
    tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(dir.join("config.sh"))
            .args([
                "--unattended",
                "--url",
                url,
                "--name",
                "vm-1",
                "--labels",
                "pool-a,self-hosted",
                "--runnergroup",
                "ci",
                "--work",
                "_work",
                "--ephemeral",
                "--disableupdate",
            ])
            .args(extra)
            .env("ACTIONS_RUNNER_INPUT_TOKEN", token)
            .env("RUNNER_ALLOW_RUNASROOT", "1")
            .output(),
    )
    .await
    .map_err(|_| std::io::Error::other("config.sh timed out"))?
}

#[tokio::test]
async fn configure_run_one_job_with_hooks_then_exit_as_ephemeral() -> R {
    let (gh, url) = github().await?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("runner");
    miglet_sim::runner_dir::install(&dir, Path::new(LISTENER))?;

    let out = config(&dir, &url, TOKEN, &[]).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "# Authentication",
        "√ Connected to GitHub",
        "√ Runner successfully added",
        "√ Settings Saved.",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in {stdout}");
    }
    let runner = std::fs::read(dir.join(".runner"))?;
    assert_eq!(&runner[..3], &[0xEF, 0xBB, 0xBF], ".runner has a UTF-8 BOM");
    let settings: serde_json::Value = serde_json::from_slice(&runner[3..])?;
    assert_eq!(
        (
            settings["agentName"].as_str(),
            settings["ephemeral"].as_bool()
        ),
        (Some("vm-1"), Some(true))
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(dir.join(".credentials_rsaparams"))?
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(dir.join(".env").exists() && dir.join(".path").exists());
    let runners = gh.runners();
    assert_eq!(runners[0].labels, ["self-hosted", "Linux", "X64", "pool-a"]);
    assert_eq!(runners[0].group, "ci");

    // Configuring again is refused.
    let again = config(&dir, &url, TOKEN, &[]).await?;
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already configured"));

    // Hooks write their env where the test can read it.
    let hook = tmp.path().join("hook.sh");
    let seen = tmp.path().join("seen");
    std::fs::write(
        &hook,
        format!(
            "echo \"$1 $GITHUB_RUN_ID $GITHUB_JOB $GITHUB_REPOSITORY $GITHUB_SHA $GITHUB_REF ${{ACTIONS_RUNNER_INPUT_TOKEN:-none}}\" >> {}\n",
            seen.display()
        ),
    )?;
    gh.enqueue_job(Job {
        name: "build (ubuntu)".into(),
        job_key: "build".into(),
        result: "Failed".into(),
        duration_ms: 100,
        run_id: "4242".into(),
        repository: "acme/app".into(),
        sha: "abc123".into(),
        git_ref: "refs/heads/main".into(),
        runner: String::new(),
        ..Job::default()
    });
    let mut child = tokio::process::Command::new(dir.join("bin/Runner.Listener"))
        .arg("run")
        .current_dir(&dir)
        .env("ACTIONS_RUNNER_HOOK_JOB_STARTED", &hook)
        .env("ACTIONS_RUNNER_HOOK_JOB_COMPLETED", &hook)
        .env("ACTIONS_RUNNER_INPUT_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut seen_lines = Vec::new();
    let status = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(l) = lines.next_line().await? {
            seen_lines.push(l);
        }
        child.wait().await
    })
    .await??;
    assert!(status.success(), "{seen_lines:?}");
    let text = seen_lines.join("\n");
    assert!(text.contains("Current runner version: '2.336.0'"), "{text}");
    // `<yyyy-MM-dd HH:mm:ssZ>: <text>`, the runner's timestamp format.
    let has = |suffix: &str| {
        seen_lines.iter().any(|l| {
            l.len() > 22
                && l.ends_with(suffix)
                && l.as_bytes()[10] == b' '
                && l.as_bytes()[19] == b'Z'
                && l[..20].chars().filter(char::is_ascii_digit).count() == 14
        })
    };
    assert!(has(": Listening for Jobs"), "{text}");
    assert!(has(": Running job: build (ubuntu)"), "{text}");
    assert!(
        has(": Job build (ubuntu) completed with result: Failed"),
        "{text}"
    );
    assert!(
        text.contains("√ Removed .credentials") && text.contains("√ Removed .runner"),
        "{text}"
    );
    assert!(!dir.join(".runner").exists());
    let hook_lines = std::fs::read_to_string(&seen)?;
    assert_eq!(hook_lines.lines().count(), 2, "{hook_lines}");
    assert!(
        hook_lines
            .lines()
            .all(|l| l.contains(" 4242 build acme/app abc123 refs/heads/main none")),
        "{hook_lines}"
    );
    assert_eq!(gh.reports()[0].result, "Failed");
    assert_eq!(gh.runners()[0].status, "deleted");
    Ok(())
}

#[tokio::test]
async fn bad_token_fails_like_the_real_runner() -> R {
    let (_gh, url) = github().await?;
    let tmp = tempfile::tempdir()?;
    miglet_sim::runner_dir::install(tmp.path(), Path::new(LISTENER))?;
    let out = config(tmp.path(), &url, "WRONG", &[]).await?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Http response code: NotFound from 'POST "),
        "{err}"
    );
    assert!(
        err.contains("Response status code does not indicate success: 404 (Not Found)."),
        "{err}"
    );
    assert!(!tmp.path().join(".runner").exists());
    Ok(())
}

#[tokio::test]
async fn root_is_refused_without_the_override_and_run_needs_config() -> R {
    let tmp = tempfile::tempdir()?;
    miglet_sim::runner_dir::install(tmp.path(), Path::new(LISTENER))?;
    if nix::unistd::Uid::effective().is_root() {
        let out = tokio::process::Command::new(tmp.path().join("config.sh"))
            .args(["--url", "http://127.0.0.1:1/x"])
            .env_remove("RUNNER_ALLOW_RUNASROOT")
            .output()
            .await?;
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "Must not run with sudo"
        );
    }
    let out = tokio::process::Command::new(tmp.path().join("bin/Runner.Listener"))
        .arg("run")
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("Not configured. Run config.(sh/cmd) to configure the runner.")
    );
    Ok(())
}

#[tokio::test]
async fn sigint_while_idle_exits_zero_and_keeps_config() -> R {
    let (_gh, url) = github().await?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    miglet_sim::runner_dir::install(dir, Path::new(LISTENER))?;
    assert!(config(dir, &url, TOKEN, &[]).await?.status.success());
    let mut child = tokio::process::Command::new(dir.join("bin/Runner.Listener"))
        .arg("run")
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(l) = lines.next_line().await? {
            if l.ends_with("Listening for Jobs") {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await??;
    let pid = nix::unistd::Pid::from_raw(child.id().ok_or("pid")? as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
    assert_eq!(status.code(), Some(0));
    assert_eq!(lines.next_line().await?.as_deref(), Some("Exiting..."));
    assert!(
        dir.join(".runner").exists(),
        "SIGINT does not delete local config"
    );
    Ok(())
}
