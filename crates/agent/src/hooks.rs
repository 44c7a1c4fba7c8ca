//! The runner's job hooks. The agent writes two scripts that call `miglet hook <kind>`; the
//! runner runs them (as `bash -e`) at job start and end with the job's `GITHUB_*` environment,
//! and `miglet hook` drops a JSON file into the agent's inbox, which the agent reads.
//! `miglet hook` always exits 0: a failing started hook would fail the user's job.

use miglet_proto::event::JobDetails;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const STARTED: &str = "job-started";
pub const COMPLETED: &str = "job-completed";

/// What a hook reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookReport {
    pub kind: String,
    pub run_id: Option<String>,
    pub run_attempt: Option<String>,
    pub job: Option<String>,
    pub repository: Option<String>,
    pub sha: Option<String>,
    pub git_ref: Option<String>,
    pub workflow: Option<String>,
    pub runner_name: Option<String>,
}

impl HookReport {
    pub fn from_env(kind: &str) -> HookReport {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        HookReport {
            kind: kind.to_owned(),
            run_id: var("GITHUB_RUN_ID"),
            run_attempt: var("GITHUB_RUN_ATTEMPT"),
            job: var("GITHUB_JOB"),
            repository: var("GITHUB_REPOSITORY"),
            sha: var("GITHUB_SHA"),
            git_ref: var("GITHUB_REF"),
            workflow: var("GITHUB_WORKFLOW"),
            runner_name: var("RUNNER_NAME"),
        }
    }

    pub fn details(&self) -> JobDetails {
        JobDetails {
            job_id: self.job.clone(),
            run_id: self.run_id.clone(),
            repository: self.repository.clone(),
            branch: self.git_ref.clone(),
            commit: self.sha.clone(),
            ..JobDetails::default()
        }
    }
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// Paths of the installed hook scripts and the inbox.
#[derive(Debug, Clone)]
pub struct Hooks {
    pub started: PathBuf,
    pub completed: PathBuf,
    pub inbox: PathBuf,
}

/// Writes the hook scripts under `data_dir/hooks` pointing at `agent_exe`. The inbox is
/// writable by the runner's user (it may not be the agent's), but not listable.
pub fn install(data_dir: &Path, agent_exe: &Path) -> std::io::Result<Hooks> {
    let dir = data_dir.join("hooks");
    let inbox = dir.join("inbox");
    std::fs::create_dir_all(&inbox)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&inbox, std::fs::Permissions::from_mode(0o1733))?;
    let mut paths = Vec::new();
    for kind in [STARTED, COMPLETED] {
        let path = dir.join(format!("{kind}.sh"));
        let script = format!(
            "#!/bin/bash\n# Installed by miglet: reports the job to the agent. Never fails the job.\nexec {} hook {kind} --inbox {} || true\n",
            shell_quote(agent_exe),
            shell_quote(&inbox)
        );
        std::fs::write(&path, script)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        paths.push(path);
    }
    let completed = paths.pop().unwrap_or_default();
    let started = paths.pop().unwrap_or_default();
    Ok(Hooks {
        started,
        completed,
        inbox,
    })
}

/// `miglet hook KIND --inbox DIR`: writes the report atomically. Errors are printed, not
/// returned as a failure.
pub fn run_hook(kind: &str, inbox: &Path) {
    let report = HookReport::from_env(kind);
    let name = format!(
        "{:020}-{}.json",
        chrono::Utc::now().timestamp_micros(),
        uuid::Uuid::new_v4().simple()
    );
    let tmp = inbox.join(format!(".{name}.tmp"));
    let result = serde_json::to_vec(&report)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, inbox.join(&name)));
    if let Err(e) = result {
        eprintln!("miglet hook: could not report {kind} to the agent: {e}");
    }
}

/// Takes every report in the inbox, oldest first.
pub fn drain_inbox(inbox: &Path) -> Vec<HookReport> {
    let Ok(entries) = std::fs::read_dir(inbox) else {
        return Vec::new();
    };
    let mut names: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    names.sort();
    let mut out = Vec::new();
    for p in names {
        if let Ok(bytes) = std::fs::read(&p)
            && let Ok(r) = serde_json::from_slice::<HookReport>(&bytes)
        {
            out.push(r);
        }
        let _ = std::fs::remove_file(&p);
    }
    out
}
