//! The `exec` provider: an external program does the work, one run per call, so any
//! infrastructure (a cloud CLI, a hypervisor's API, a script) can be a pool's provider
//! without changing the controller.
//!
//! The program is run as `<command> <args...> <action>` where the action is `create`,
//! `delete` or `list`; it gets a JSON request on standard input (secrets travel only there,
//! never in arguments or the environment, which other users of the host can read):
//!
//! * `create`: `{"pool_id": "...", "instances": [{"name": "...", "settings": {"KEY": "value"},
//!   "secret_files": {"file name": "content"}}]}`. Creating a name that exists must change
//!   nothing.
//! * `delete`: `{"pool_id": "...", "names": ["..."]}`. Deleting a name that is gone must
//!   succeed.
//! * `list`: `{"pool_id": "..."}`; the program prints `{"instances": [{"name": "...",
//!   "id": "..." (optional), "status": "creating" | "running" | "stopping" | "stopped",
//!   "created_at": <Unix ms> (optional)}]}` on standard output.
//!
//! Exit status 0 is success; 75 (`EX_TEMPFAIL`) says "try again later" (a quota, a busy
//! API); anything else is a failure someone must fix. A run that takes longer than the
//! timeout is killed and tried again later. What the program writes on standard error (its
//! last 2 KiB) goes into the error the pool view shows; its output is read up to 4 MiB.

use super::{
    InstanceSpec, InstanceStatus, Provider, ProviderError, ProviderFuture, ProviderInstance,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The exit status that means "try again later" (`EX_TEMPFAIL` of sysexits.h).
pub const EXIT_RETRY: i32 = 75;
/// Standard output read at most.
const MAX_OUTPUT: u64 = 4 << 20;
/// Standard error kept for the error message, and read at most.
const STDERR_KEPT: usize = 2048;
const MAX_STDERR: u64 = 64 << 10;

/// How an `exec` pool runs its program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSettings {
    pub command: PathBuf,
    /// Arguments before the action.
    pub args: Vec<String>,
    /// Environment for the program (besides `MIG_POOL_ID`).
    pub env: Vec<(String, String)>,
    /// A run longer than this is killed (and tried again later).
    pub timeout: Duration,
}

#[derive(Debug)]
pub struct ExecProvider {
    pool_id: String,
    settings: ExecSettings,
}

#[derive(Serialize)]
struct CreateRequest<'a> {
    pool_id: &'a str,
    instances: Vec<CreateInstance<'a>>,
}

#[derive(Serialize)]
struct CreateInstance<'a> {
    name: &'a str,
    settings: BTreeMap<&'a str, &'a str>,
    secret_files: BTreeMap<&'a str, &'a str>,
}

#[derive(Serialize)]
struct DeleteRequest<'a> {
    pool_id: &'a str,
    names: &'a [String],
}

#[derive(Serialize)]
struct ListRequest<'a> {
    pool_id: &'a str,
}

#[derive(Deserialize)]
struct ListAnswer {
    instances: Vec<ListedInstance>,
}

#[derive(Deserialize)]
struct ListedInstance {
    name: String,
    id: Option<String>,
    status: String,
    created_at: Option<i64>,
}

impl ExecProvider {
    pub fn new(pool_id: &str, settings: ExecSettings) -> ExecProvider {
        ExecProvider {
            pool_id: pool_id.to_owned(),
            settings,
        }
    }

    /// Runs the program for `action` with `request` on its standard input; its standard
    /// output when it succeeded.
    async fn run(&self, action: &str, request: &impl Serialize) -> Result<Vec<u8>, ProviderError> {
        let s = &self.settings;
        let input = serde_json::to_vec(request)
            .map_err(|e| ProviderError::Fatal(format!("exec provider request: {e}")))?;
        let mut child = tokio::process::Command::new(&s.command)
            .args(&s.args)
            .arg(action)
            .envs(s.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("MIG_POOL_ID", &self.pool_id)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group, so a run that times out is stopped with whatever it
            // started.
            .process_group(0)
            .spawn()
            .map_err(|e| {
                let what = format!(
                    "exec provider {} cannot be started: {e}",
                    s.command.display()
                );
                // Being replaced right now (ETXTBSY) passes; a missing or forbidden program
                // does not.
                if e.kind() == std::io::ErrorKind::ExecutableFileBusy {
                    ProviderError::Retryable(what)
                } else {
                    ProviderError::Fatal(what)
                }
            })?;
        let group = child.id().and_then(|id| i32::try_from(id).ok());
        let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(ProviderError::Fatal("exec provider pipes".into()));
        };
        let work = async {
            // The program may exit without reading all of its input: that is its business.
            let _ = stdin.write_all(&input).await;
            drop(stdin);
            let mut out = Vec::new();
            let mut err = Vec::new();
            let mut limited_out = stdout.take(MAX_OUTPUT);
            let mut limited_err = (&mut stderr).take(MAX_STDERR);
            let (read_out, _) = tokio::join!(
                limited_out.read_to_end(&mut out),
                limited_err.read_to_end(&mut err)
            );
            let status = child.wait().await;
            (read_out.map(|_| out), err, status)
        };
        let Ok((out, err, status)) = tokio::time::timeout(s.timeout, work).await else {
            if let Some(pid) = group {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Err(ProviderError::Retryable(format!(
                "exec provider {action} took longer than {} s and was stopped",
                s.timeout.as_secs()
            )));
        };
        let status =
            status.map_err(|e| ProviderError::Retryable(format!("exec provider {action}: {e}")))?;
        let said = tail(&err);
        match status.code() {
            Some(0) => out.map_err(|e| {
                ProviderError::Retryable(format!("exec provider {action} output: {e}"))
            }),
            Some(EXIT_RETRY) => Err(ProviderError::Retryable(format!(
                "exec provider {action} asked to try again later: {said}"
            ))),
            code => Err(ProviderError::Fatal(format!(
                "exec provider {action} failed ({}): {said}",
                code.map_or_else(|| "killed by a signal".to_owned(), |c| format!("exit {c}"))
            ))),
        }
    }
}

/// The last [`STDERR_KEPT`] bytes of what the program said, on one line.
fn tail(err: &[u8]) -> String {
    let text = String::from_utf8_lossy(err);
    let text = text.trim();
    let start = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|i| text.len() - i <= STDERR_KEPT)
        .unwrap_or(text.len());
    let kept = text[start..].replace('\n', " | ");
    if kept.is_empty() {
        "(nothing on standard error)".into()
    } else {
        kept
    }
}

fn status(s: &str) -> Result<InstanceStatus, ProviderError> {
    Ok(match s {
        "creating" => InstanceStatus::Creating,
        "running" => InstanceStatus::Running,
        "stopping" => InstanceStatus::Stopping,
        "stopped" => InstanceStatus::Stopped,
        other => {
            return Err(ProviderError::Fatal(format!(
                "exec provider list: unknown status {other:?} (creating, running, stopping, stopped)"
            )));
        }
    })
}

impl Provider for ExecProvider {
    fn kind(&self) -> &'static str {
        "exec"
    }

    fn create<'a>(&'a self, specs: &'a [InstanceSpec]) -> ProviderFuture<'a, ()> {
        Box::pin(async move {
            let request = CreateRequest {
                pool_id: &self.pool_id,
                instances: specs
                    .iter()
                    .map(|s| CreateInstance {
                        name: &s.name,
                        settings: s
                            .settings
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect(),
                        secret_files: s
                            .secret_files
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect(),
                    })
                    .collect(),
            };
            self.run("create", &request).await.map(drop)
        })
    }

    fn delete<'a>(&'a self, names: &'a [String]) -> ProviderFuture<'a, ()> {
        Box::pin(async move {
            let request = DeleteRequest {
                pool_id: &self.pool_id,
                names,
            };
            self.run("delete", &request).await.map(drop)
        })
    }

    fn list(&self) -> ProviderFuture<'_, Vec<ProviderInstance>> {
        Box::pin(async move {
            let out = self
                .run(
                    "list",
                    &ListRequest {
                        pool_id: &self.pool_id,
                    },
                )
                .await?;
            let answer: ListAnswer = serde_json::from_slice(&out).map_err(|e| {
                ProviderError::Fatal(format!(
                    "exec provider list printed no {{\"instances\": [...]}}: {e}"
                ))
            })?;
            answer
                .instances
                .into_iter()
                .map(|i| {
                    miglet_proto::ids::validate_vm_id(&i.name).map_err(|e| {
                        ProviderError::Fatal(format!("exec provider list: instance name: {e}"))
                    })?;
                    Ok(ProviderInstance {
                        status: status(&i.status)?,
                        name: i.name,
                        id: i.id,
                        created_at: i.created_at,
                        trouble: None,
                    })
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_end_of_what_the_program_said_is_kept_on_one_line() {
        assert_eq!(tail(b""), "(nothing on standard error)");
        assert_eq!(
            tail(b"quota exceeded\nregion x\n"),
            "quota exceeded | region x"
        );
        let long = "é".repeat(3000);
        let kept = tail(long.as_bytes());
        assert!(kept.len() <= STDERR_KEPT && kept.chars().all(|c| c == 'é'));
    }
}
