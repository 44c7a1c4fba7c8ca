//! Supervises the GitHub Actions runner: checks (or downloads and verifies) the installation,
//! configures it with `config.sh` (token only in `ACTIONS_RUNNER_INPUT_TOKEN`, never argv or
//! logs), runs `bin/Runner.Listener run` directly in its own process group so its real exit
//! code is seen, feeds every output line to the core, and stops it with SIGINT, then SIGKILL
//! to the whole group after the grace period.

use crate::hooks::Hooks;
use crate::lock;
use crate::machine::Input;
use miglet_proto::command::RegisterRunner;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Labels the runner adds itself; passing them again is at best redundant.
const DEFAULT_LABELS: &[&str] = &["self-hosted", "linux", "x64"];

#[derive(Debug, Error)]
pub enum InstallError {
    #[error("no runner in {0} (config.sh and bin/Runner.Listener) and no download URL configured")]
    Missing(String),
    #[error("runner download from {url} failed")]
    Download {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("runner download from {url} answered HTTP {code}")]
    DownloadStatus { url: String, code: u16 },
    #[error("runner archive SHA-256 is {actual}, expected {expected}; not unpacked")]
    Checksum { expected: String, actual: String },
    #[error("failed to unpack the runner into {dir}: {reason}")]
    Unpack { dir: String, reason: String },
}

pub fn is_installed(dir: &Path) -> bool {
    dir.join("config.sh").is_file() && dir.join("bin").join("Runner.Listener").is_file()
}

/// Makes sure a runner is installed in `dir`, downloading `url` (verified against `sha256`
/// before anything is unpacked) when it is not. A download already in `dir` is reused.
pub async fn ensure_installed(
    dir: &Path,
    download: Option<(&str, &str)>,
) -> Result<(), InstallError> {
    if is_installed(dir) {
        return Ok(());
    }
    let Some((url, expected)) = download else {
        return Err(InstallError::Missing(dir.display().to_string()));
    };
    let unpack_err = |reason: String| InstallError::Unpack {
        dir: dir.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| unpack_err(e.to_string()))?;
    info!(url, dir = %dir.display(), "Downloading the runner");
    let resp = reqwest::get(url)
        .await
        .map_err(|source| InstallError::Download {
            url: url.into(),
            source,
        })?;
    if !resp.status().is_success() {
        return Err(InstallError::DownloadStatus {
            url: url.into(),
            code: resp.status().as_u16(),
        });
    }
    let bytes = resp
        .bytes()
        .await
        .map_err(|source| InstallError::Download {
            url: url.into(),
            source,
        })?;
    let actual = format!("{:x}", Sha256::digest(&bytes));
    if actual != expected.to_ascii_lowercase() {
        return Err(InstallError::Checksum {
            expected: expected.into(),
            actual,
        });
    }
    let archive = dir.join(".runner-download.tar.gz");
    std::fs::write(&archive, &bytes).map_err(|e| unpack_err(e.to_string()))?;
    let out = Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(dir)
        .output()
        .await
        .map_err(|e| unpack_err(e.to_string()))?;
    let _ = std::fs::remove_file(&archive);
    if !out.status.success() {
        return Err(unpack_err(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    if !is_installed(dir) {
        return Err(unpack_err(
            "the archive has no config.sh and bin/Runner.Listener".into(),
        ));
    }
    info!(dir = %dir.display(), sha256 = %actual, "Runner installed");
    Ok(())
}

/// What the supervisor needs to know.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    pub dir: PathBuf,
    pub work_dir: String,
    /// Run config.sh and the listener as this user (when the agent is root).
    pub user: Option<String>,
    pub default_name: String,
    pub grace: Duration,
    pub hooks: Hooks,
}

#[derive(Debug)]
pub struct Supervisor {
    settings: RunnerSettings,
    core: mpsc::Sender<Input>,
    pid: Mutex<Option<i32>>,
}

/// Replaces every occurrence of `secret` in `line`.
fn redact(line: &str, secret: Option<&str>) -> String {
    match secret {
        Some(s) if !s.is_empty() && line.contains(s) => line.replace(s, "[REDACTED]"),
        _ => line.to_owned(),
    }
}

impl Supervisor {
    pub fn new(settings: RunnerSettings, core: mpsc::Sender<Input>) -> Arc<Supervisor> {
        Arc::new(Supervisor {
            settings,
            core,
            pid: Mutex::new(None),
        })
    }

    fn command(&self, program: &Path) -> Result<Command, String> {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.settings.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let root = nix::unistd::Uid::effective().is_root();
        match (&self.settings.user, root) {
            (Some(name), true) => {
                let user = nix::unistd::User::from_name(name)
                    .map_err(|e| format!("cannot look up runner user {name}: {e}"))?
                    .ok_or_else(|| format!("runner user {name} does not exist"))?;
                cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
                cmd.env("HOME", &user.dir).env("USER", name);
            }
            (None, true) => {
                cmd.env("RUNNER_ALLOW_RUNASROOT", "1");
            }
            _ => {}
        }
        Ok(cmd)
    }

    /// Gives the runner directory to the runner's user (once per configure).
    async fn hand_over_dir(&self) -> Result<(), String> {
        let (Some(user), true) = (&self.settings.user, nix::unistd::Uid::effective().is_root())
        else {
            return Ok(());
        };
        let out = Command::new("chown")
            .arg("-R")
            .arg(format!("{user}:"))
            .arg(&self.settings.dir)
            .output()
            .await
            .map_err(|e| format!("chown failed: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "chown of the runner dir failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Configures (unless JIT) and starts the listener; reports through the core channel.
    pub fn start(self: &Arc<Self>, params: RegisterRunner) {
        let me = self.clone();
        tokio::spawn(async move {
            let configured = if params.jit_config.is_some() {
                Ok(())
            } else {
                me.configure(&params).await
            };
            let ok = configured.is_ok();
            let _ = me.core.send(Input::RunnerConfigured(configured)).await;
            if ok {
                me.run_listener(params.jit_config).await;
            }
        });
    }

    /// Starts the listener again (after a retryable exit or a self-update).
    pub fn restart(self: &Arc<Self>, after: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            me.run_listener(None).await;
        });
    }

    async fn configure(&self, r: &RegisterRunner) -> Result<(), String> {
        let token = r.registration_token.clone().unwrap_or_default();
        // A configuration left from an earlier start of this agent would make config.sh
        // refuse: remove it locally (the controller's registration is ephemeral anyway).
        if self.settings.dir.join(".runner").exists() {
            warn!("Removing a runner configuration left from an earlier start");
            for f in [".runner", ".credentials", ".credentials_rsaparams"] {
                let _ = std::fs::remove_file(self.settings.dir.join(f));
            }
        }
        self.hand_over_dir().await?;
        let labels: Vec<&str> = r
            .labels
            .iter()
            .map(String::as_str)
            .filter(|l| !DEFAULT_LABELS.iter().any(|d| d.eq_ignore_ascii_case(l)))
            .collect();
        let name = r
            .runner_name
            .clone()
            .unwrap_or_else(|| self.settings.default_name.clone());
        let mut cmd = self.command(&self.settings.dir.join("config.sh"))?;
        cmd.args([
            "--unattended",
            "--url",
            &r.runner_url,
            "--name",
            &name,
            "--work",
            &self.settings.work_dir,
        ])
        .args(["--ephemeral", "--disableupdate", "--replace"]);
        if !r.runner_group.is_empty() && !r.runner_group.eq_ignore_ascii_case("default") {
            cmd.args(["--runnergroup", &r.runner_group]);
        }
        if !labels.is_empty() {
            cmd.args(["--labels", &labels.join(",")]);
        }
        cmd.env("ACTIONS_RUNNER_INPUT_TOKEN", &token);
        info!(runner_url = %r.runner_url, runner_name = %name, labels = ?r.labels, "Configuring the runner");
        let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
            .await
            .map_err(|_| "config.sh did not finish within 5 minutes".to_owned())?
            .map_err(|e| format!("cannot run config.sh: {e}"))?;
        let secret = Some(token.as_str());
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        for line in stdout
            .lines()
            .chain(stderr.lines())
            .filter(|l| !l.trim().is_empty())
        {
            info!(source = "runner-config", "{}", redact(line, secret));
        }
        if out.status.success() {
            Ok(())
        } else {
            let last = stderr
                .lines()
                .chain(stdout.lines())
                .rfind(|l| !l.trim().is_empty())
                .unwrap_or("");
            Err(redact(
                &format!(
                    "config.sh exited {}: {last}",
                    out.status.code().unwrap_or(-1)
                ),
                secret,
            ))
        }
    }

    async fn run_listener(&self, jit: Option<String>) {
        let listener = self.settings.dir.join("bin").join("Runner.Listener");
        let mut cmd = match self.command(&listener) {
            Ok(c) => c,
            Err(e) => {
                let _ = self.core.send(Input::RunnerConfigured(Err(e))).await;
                return;
            }
        };
        cmd.arg("run")
            .process_group(0)
            .env(
                "ACTIONS_RUNNER_HOOK_JOB_STARTED",
                &self.settings.hooks.started,
            )
            .env(
                "ACTIONS_RUNNER_HOOK_JOB_COMPLETED",
                &self.settings.hooks.completed,
            )
            // A runner version GitHub no longer accepts exits with its own code (7) instead
            // of 1, so the controller can say so on the pool.
            .env("ACTIONS_RUNNER_RETURN_VERSION_DEPRECATED_EXIT_CODE", "true");
        if let Some(j) = &jit {
            cmd.env("ACTIONS_RUNNER_INPUT_JITCONFIG", j);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "Cannot start the runner listener");
                let _ = self.core.send(Input::RunnerExited { code: None }).await;
                return;
            }
        };
        let pid = child.id().map(|p| p as i32);
        *lock(&self.pid) = pid;
        info!(pid = ?pid, "Runner listener started");
        let secret = jit.clone();
        let readers: Vec<_> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        .map(|stream| {
            let core = self.core.clone();
            let secret = secret.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let line = redact(&line, secret.as_deref());
                    info!(source = "runner", "{line}");
                    if core.send(Input::RunnerLine(line)).await.is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
        let status = child.wait().await;
        // Every line the runner printed is in before its exit is reported.
        for r in readers {
            let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
        }
        *lock(&self.pid) = None;
        let code = status.ok().and_then(|s| s.code());
        info!(code = ?code, "Runner listener exited");
        let _ = self.core.send(Input::RunnerExited { code }).await;
    }

    /// SIGINT to the listener (the runner's graceful stop), then SIGKILL to its process group
    /// after the grace period; `force` kills at once.
    pub fn stop(self: &Arc<Self>, force: bool) {
        let Some(pid) = *lock(&self.pid) else {
            return;
        };
        if force {
            warn!(pid, "Killing the runner");
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            return;
        }
        info!(
            pid,
            grace_secs = self.settings.grace.as_secs(),
            "Stopping the runner (SIGINT)"
        );
        let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        let me = self.clone();
        let grace = self.settings.grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if *lock(&me.pid) == Some(pid) {
                warn!(pid, "Runner still running after the grace period; SIGKILL");
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
        });
    }
}

/// Checked at start, as root: the user the runner is to run as must exist, or every
/// registration would fail later (`chown`, `setuid`). The message says how to fix it.
pub fn check_runner_user(user: Option<&str>, is_root: bool) -> Result<(), String> {
    let (Some(name), true) = (user, is_root) else {
        return Ok(());
    };
    match nix::unistd::User::from_name(name) {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(format!(
            "the runner user {name:?} does not exist on this VM: create it on the image \
             (`useradd --create-home --shell /bin/bash {name}`, as deploy/install.sh does), set \
             MIGLET_RUNNER_USER to an existing user, or set it empty to run the runner as root"
        )),
        Err(e) => Err(format!("cannot look up the runner user {name:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_runner_user_is_found_before_any_job() {
        assert_eq!(check_runner_user(Some("root"), true), Ok(()));
        assert_eq!(check_runner_user(None, true), Ok(()));
        assert_eq!(check_runner_user(Some("no-such-user-x9"), false), Ok(()));
        let e = check_runner_user(Some("no-such-user-x9"), true).err();
        assert!(e.as_deref().is_some_and(|m| m.contains("useradd")), "{e:?}");
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact("token AHT123 here", Some("AHT123")),
            "token [REDACTED] here"
        );
        assert_eq!(redact("nothing", Some("")), "nothing");
    }

    #[tokio::test]
    async fn download_is_verified_before_unpacking() -> Result<(), Box<dyn std::error::Error>> {
        use axum::routing::get;
        let src = tempfile::tempdir()?;
        std::fs::create_dir_all(src.path().join("bin"))?;
        std::fs::write(src.path().join("config.sh"), "#!/bin/bash\n")?;
        std::fs::write(src.path().join("bin/Runner.Listener"), "#!/bin/bash\n")?;
        let tgz = src.path().join("runner.tar.gz");
        let st = std::process::Command::new("tar")
            .arg("-czf")
            .arg(&tgz)
            .arg("-C")
            .arg(src.path())
            .args(["./config.sh", "./bin"])
            .status()?;
        assert!(st.success());
        let bytes = std::fs::read(&tgz)?;
        let sha = format!("{:x}", Sha256::digest(&bytes));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new().route("/r.tgz", get(move || async move { bytes.clone() }));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let url = format!("http://{addr}/r.tgz");
        let bad = tempfile::tempdir()?;
        let e = ensure_installed(bad.path(), Some((&url, &"0".repeat(64)))).await;
        assert!(matches!(e, Err(InstallError::Checksum { .. })), "{e:?}");
        assert!(
            !bad.path().join("config.sh").exists(),
            "nothing unpacked on a bad checksum"
        );
        let good = tempfile::tempdir()?;
        ensure_installed(good.path(), Some((&url, &sha))).await?;
        assert!(is_installed(good.path()));
        let none = tempfile::tempdir()?;
        assert!(matches!(
            ensure_installed(none.path(), None).await,
            Err(InstallError::Missing(_))
        ));
        task.abort();
        Ok(())
    }
}
