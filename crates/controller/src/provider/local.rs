//! The `local` provider: each VM is a `miglet` process on this machine, with its own
//! directory (`<work_dir>/<name>/`: `data/`, `runner/` copied from the pool's runner
//! template, `secrets/`, `miglet.log`, `pid`, `created`), started in its own process group.
//! It is what the demo and the end-to-end tests use, and a usable provider for a bare-metal
//! box. The directory is the record: a controller restarted finds its VMs again by listing
//! them, and processes outlive the controller.

use super::{
    InstanceSpec, InstanceStatus, Provider, ProviderError, ProviderFuture, ProviderInstance,
};
use crate::model::Millis;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

/// How a `local` pool runs its VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSettings {
    /// The agent binary.
    pub miglet_bin: PathBuf,
    /// A runner directory (the official runner, or the stand-in) copied into each VM.
    pub runner_template: PathBuf,
    /// Where each VM's directory is made.
    pub work_dir: PathBuf,
    /// Environment given to every VM's agent (after the per-VM settings).
    pub env: Vec<(String, String)>,
    /// Command-line arguments for every VM's agent.
    pub args: Vec<String>,
    /// A deleted VM's agent gets this long after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
}

#[derive(Debug)]
pub struct LocalProvider {
    settings: LocalSettings,
    /// Agents this process started, so their exit is reaped (adopted ones are not ours).
    children: Mutex<HashMap<String, tokio::process::Child>>,
}

fn fatal(what: &str, path: &Path, e: std::io::Error) -> ProviderError {
    ProviderError::Fatal(format!("{what} {}: {e}", path.display()))
}

/// Copies a directory tree (files keep their permissions).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn now_ms() -> Millis {
    chrono::Utc::now().timestamp_millis()
}

/// A VM name is a directory name here: the ids the controller accepts, nothing else.
fn checked(name: &str) -> Result<&str, ProviderError> {
    miglet_proto::ids::validate_vm_id(name)
        .map(|()| name)
        .map_err(|e| ProviderError::Fatal(format!("instance name {name:?}: {e}")))
}

impl LocalProvider {
    pub fn new(settings: LocalSettings) -> LocalProvider {
        LocalProvider {
            settings,
            children: Mutex::new(HashMap::new()),
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.settings.work_dir.join(name)
    }

    fn children(&self) -> std::sync::MutexGuard<'_, HashMap<String, tokio::process::Child>> {
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn pid(&self, name: &str) -> Option<i32> {
        std::fs::read_to_string(self.dir(name).join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Is the VM's agent running? A child of ours that exited is reaped here.
    fn alive(&self, name: &str) -> bool {
        if let Some(child) = self.children().get_mut(name) {
            return matches!(child.try_wait(), Ok(None));
        }
        self.pid(name)
            .is_some_and(|p| p > 0 && kill(Pid::from_raw(p), None).is_ok())
    }

    fn create_one(&self, spec: &InstanceSpec) -> Result<(), ProviderError> {
        let name = checked(&spec.name)?;
        let dir = self.dir(name);
        if dir.join("pid").exists() {
            return Ok(());
        }
        let runner = dir.join("runner");
        copy_tree(&self.settings.runner_template, &runner)
            .map_err(|e| fatal("cannot copy the runner template to", &runner, e))?;
        let secrets = dir.join("secrets");
        std::fs::create_dir_all(&secrets).map_err(|e| fatal("cannot create", &secrets, e))?;
        let mut env: Vec<(String, String)> = Vec::new();
        for (var, value) in &spec.secret_files {
            let file = secrets.join(var.to_ascii_lowercase());
            write_private(&file, value).map_err(|e| fatal("cannot write", &file, e))?;
            env.push((var.clone(), file.display().to_string()));
        }
        let log = dir.join("miglet.log");
        let log_file = std::fs::File::create(&log).map_err(|e| fatal("cannot create", &log, e))?;
        std::fs::write(dir.join("created"), now_ms().to_string())
            .map_err(|e| fatal("cannot write in", &dir, e))?;
        let mut cmd = tokio::process::Command::new(&self.settings.miglet_bin);
        cmd.args(&self.settings.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MIGLET_VM_ID", name)
            .env("MIGLET_POOL_ID", &spec.pool_id)
            .env("MIGLET_DATA_DIR", dir.join("data"))
            .env("MIGLET_RUNNER_DIR", &runner)
            .env("MIGLET_METADATA", "false")
            // The controller deletes the VM after its job (as with a MIG): the agent stays.
            .env("MIGLET_POST_JOB_ACTION", "none")
            .envs(spec.settings.iter().cloned())
            .envs(env)
            .envs(self.settings.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| fatal("cannot start the agent", &self.settings.miglet_bin, e))?;
        let pid = child.id().unwrap_or_default();
        std::fs::write(dir.join("pid"), pid.to_string())
            .map_err(|e| fatal("cannot write in", &dir, e))?;
        self.children().insert(name.to_owned(), child);
        tracing::info!(vm_id = name, pool_id = %spec.pool_id, pid, "Local VM started");
        Ok(())
    }

    /// Deletes the named VMs: every agent is sent SIGTERM first and they are waited for
    /// together (a batch takes one `stop_grace`, not one each), then SIGKILL for any still
    /// running, then their directories go.
    async fn delete_all(&self, names: &[String]) -> Result<(), ProviderError> {
        let mut signalled = Vec::new();
        for name in names {
            let name = checked(name)?;
            if let Some(pid) = self.pid(name).filter(|p| *p > 0) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
                signalled.push((name, pid));
            }
        }
        let deadline = tokio::time::Instant::now() + self.settings.stop_grace;
        while signalled.iter().any(|(n, _)| self.alive(n)) && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for (name, pid) in &signalled {
            if self.alive(name) {
                let _ = killpg(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            if let Some(mut child) = self.children().remove(*name) {
                let _ = child.start_kill();
                let _ = child.try_wait();
            }
        }
        for name in names {
            let dir = self.dir(name);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(vm_id = %name, "Local VM deleted"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ProviderError::Retryable(format!(
                        "cannot remove {}: {e}",
                        dir.display()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

impl Provider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn create<'a>(&'a self, specs: &'a [InstanceSpec]) -> ProviderFuture<'a, ()> {
        Box::pin(async move {
            std::fs::create_dir_all(&self.settings.work_dir)
                .map_err(|e| fatal("cannot create", &self.settings.work_dir, e))?;
            specs.iter().try_for_each(|s| self.create_one(s))
        })
    }

    fn delete<'a>(&'a self, names: &'a [String]) -> ProviderFuture<'a, ()> {
        Box::pin(self.delete_all(names))
    }

    fn list(&self) -> ProviderFuture<'_, Vec<ProviderInstance>> {
        Box::pin(async move {
            let entries = match std::fs::read_dir(&self.settings.work_dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(fatal("cannot list", &self.settings.work_dir, e)),
            };
            let mut out = Vec::new();
            for entry in entries.flatten() {
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let created_at = std::fs::read_to_string(entry.path().join("created"))
                    .ok()
                    .and_then(|t| t.trim().parse().ok());
                if created_at.is_none() || checked(&name).is_err() {
                    continue;
                }
                let status = if self.pid(&name).is_none() {
                    InstanceStatus::Creating
                } else if self.alive(&name) {
                    InstanceStatus::Running
                } else {
                    InstanceStatus::Stopped
                };
                out.push(ProviderInstance {
                    name,
                    id: None,
                    status,
                    created_at,
                    trouble: None,
                });
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
    }
}
