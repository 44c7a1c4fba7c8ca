//! Installs a runner directory laid out like an extracted actions/runner release, whose
//! `bin/Runner.Listener` is this crate's `fake-runner-listener` binary.
//!
//! The scripts behave as the real ones do where an agent can observe it: `config.sh` refuses
//! root without `RUNNER_ALLOW_RUNASROOT`, sources `env.sh` (which writes `.env` and `.path`),
//! and dispatches `remove` or `configure` to the listener; `run.sh` loops on the listener with
//! run-helper's exit-code mapping and exits 0 except on its restart path.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const CONFIG_SH: &str = r#"#!/bin/bash
# Stand-in for actions/runner config.sh.
if [ "$(id -u)" -eq 0 ] && [ -z "$RUNNER_ALLOW_RUNASROOT" ]; then
    echo "Must not run with sudo"
    exit 1
fi
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" || exit 1
source ./env.sh
shopt -s nocasematch
if [[ "$1" == "remove" ]]; then
    ./bin/Runner.Listener "$@"
else
    ./bin/Runner.Listener configure "$@"
fi
"#;

const ENV_SH: &str = r#"#!/bin/bash
# Stand-in for actions/runner env.sh: record selected environment for the listener.
{
    for name in LANG JAVA_HOME ANT_HOME M2_HOME ANDROID_HOME GRADLE_HOME NVM_BIN NVM_PATH LD_LIBRARY_PATH PERL5LIB; do
        if [ -n "${!name}" ]; then
            echo "$name=${!name}"
        fi
    done
} > .env
echo "$PATH" > .path
"#;

const RUN_SH: &str = r#"#!/bin/bash
# Stand-in for actions/runner run.sh + run-helper.sh (default mode: no signal traps).
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" || exit 1
while :; do
    ./bin/Runner.Listener run $*
    rc=$?
    case $rc in
        0) echo "Runner listener exit with 0 return code, stop the service, no retry needed."; break ;;
        1) echo "Runner listener exit with terminated error, stop the service, no retry needed."; break ;;
        2) echo "Runner listener exit with retryable error, re-launch runner in 5 seconds."; sleep 5; echo "Restarting runner..."; continue ;;
        3|4) echo "Runner listener exit because of updating, re-launch runner after successful update"; echo "Restarting runner..."; continue ;;
        5) echo "Runner listener exit with Session Conflict error, stop the service, no retry needed."; break ;;
        *) echo "Exiting with unknown error code: $rc"; break ;;
    esac
done
echo "Exiting runner..."
exit 0
"#;

/// A file in the runner root that makes the stand-in listener's next `run` fail, for tests
/// of how an agent handles the runner's exit codes: `<code>` or `abort` (death by SIGABRT)
/// at start, or `mid-job:<code>` / `mid-job:abort` once a job is running. Used up once read.
pub const FAULT_FILE: &str = ".sim-fault";

/// Asks the listener in `dir` to fail its next run as `fault` says (see [`FAULT_FILE`]).
pub fn inject_fault(dir: &Path, fault: &str) -> io::Result<()> {
    std::fs::write(dir.join(FAULT_FILE), fault)
}

fn write_exec(path: &Path, contents: &[u8]) -> io::Result<()> {
    std::fs::write(path, contents)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}

/// Creates the runner layout in `dir` with `listener` copied to `bin/Runner.Listener`.
pub fn install(dir: &Path, listener: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::create_dir_all(dir.join("externals"))?;
    write_exec(&dir.join("config.sh"), CONFIG_SH.as_bytes())?;
    write_exec(&dir.join("env.sh"), ENV_SH.as_bytes())?;
    write_exec(&dir.join("run.sh"), RUN_SH.as_bytes())?;
    let target = dir.join("bin").join("Runner.Listener");
    std::fs::copy(listener, &target)?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))
}
