//! The `exec` provider against a real program (a POSIX shell stand-in that keeps its
//! instances as files): requests on standard input, the instance list on standard output,
//! idempotent creates and deletes, secrets only on standard input, exit 75 as "try again",
//! other failures with what the program said, and a run past its timeout stopped.

use super::common::TestResult;
use mig_controller::provider::exec::{ExecProvider, ExecSettings};
use mig_controller::provider::{InstanceSpec, InstanceStatus, Provider, ProviderError};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

/// The stand-in program: the action is its last argument; `fail-<action>` (an exit code)
/// and `sleep-<action>` (seconds) in its state directory inject a failure or a delay once.
const PROGRAM: &str = r#"#!/bin/sh
for a; do action="$a"; done
state="$STATE"
req=$(cat)
echo "$action" >> "$state/calls"
printf '%s' "$req" > "$state/last-$action.json"
printf '%s\n' "$*" > "$state/argv-$action"
env > "$state/env-$action"
if [ -f "$state/sleep-$action" ]; then s=$(cat "$state/sleep-$action"); rm "$state/sleep-$action"; sleep "$s"; fi
if [ -f "$state/fail-$action" ]; then code=$(cat "$state/fail-$action"); rm "$state/fail-$action"; echo "quota exceeded in zone-a" >&2; exit "$code"; fi
case "$action" in
create)
  for n in $(printf '%s' "$req" | grep -o '"name":"[^"]*"' | sed 's/"name":"\(.*\)"/\1/'); do
    [ -f "$state/vm-$n" ] || echo creating > "$state/vm-$n"
  done ;;
delete)
  for n in $(printf '%s' "$req" | grep -o '"names":\[[^]]*\]' | grep -o '"[^"]*"' | tr -d '"' | grep -v '^names$'); do
    rm -f "$state/vm-$n"
  done ;;
list)
  printf '{"instances":['
  sep=""
  for f in "$state"/vm-*; do
    [ -f "$f" ] || continue
    n=${f##*/vm-}
    printf '%s{"name":"%s","status":"%s","id":"id-%s"}' "$sep" "$n" "$(cat "$f")" "$n"
    sep=","
    echo running > "$f"
  done
  printf ']}\n' ;;
*) echo "unknown action $action" >&2; exit 64 ;;
esac
"#;

fn setup(dir: &Path, timeout: Duration) -> std::io::Result<ExecProvider> {
    let program = dir.join("provider.sh");
    std::fs::write(&program, PROGRAM)?;
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755))?;
    let state = dir.join("state");
    std::fs::create_dir_all(&state)?;
    // Run through `sh`: executing a file just written races with other tests' forks that
    // still hold it open for writing (ETXTBSY).
    Ok(ExecProvider::new(
        "exec-pool",
        ExecSettings {
            command: "/bin/sh".into(),
            args: vec![
                program.display().to_string(),
                "--project".into(),
                "ci".into(),
            ],
            env: vec![("STATE".into(), state.display().to_string())],
            timeout,
        },
    ))
}

fn spec(name: &str) -> InstanceSpec {
    InstanceSpec {
        name: name.into(),
        pool_id: "exec-pool".into(),
        settings: vec![("MIGLET_POOL_ID".into(), "exec-pool".into())],
        secret_files: vec![(
            "MIGLET_ENROLLMENT_TOKEN_FILE".into(),
            format!("one-time-secret-of-{name}"),
        )],
    }
}

async fn statuses(p: &ExecProvider) -> Result<Vec<(String, InstanceStatus)>, ProviderError> {
    let mut v: Vec<_> = p
        .list()
        .await?
        .into_iter()
        .map(|i| (i.name, i.status))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

#[tokio::test]
async fn an_exec_program_creates_lists_and_deletes_idempotently() -> TestResult {
    let dir = tempfile::tempdir()?;
    let p = setup(dir.path(), Duration::from_secs(20))?;
    let state = dir.path().join("state");
    assert_eq!(p.kind(), "exec");
    p.create(&[spec("vm-a"), spec("vm-b")]).await?;
    // Asked twice: nothing changes.
    p.create(&[spec("vm-a")]).await?;
    assert_eq!(
        statuses(&p).await?,
        vec![
            ("vm-a".to_owned(), InstanceStatus::Creating),
            ("vm-b".to_owned(), InstanceStatus::Creating)
        ]
    );
    let listed = p.list().await?;
    assert!(listed.iter().all(|i| i.status == InstanceStatus::Running));
    assert_eq!(
        listed
            .iter()
            .find(|i| i.name == "vm-a")
            .and_then(|i| i.id.clone()),
        Some("id-vm-a".into())
    );
    // The request carried the per-VM settings and secret on standard input, and the
    // secret is nowhere in the program's arguments or environment.
    let request: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("last-create.json"))?)?;
    assert_eq!(request["pool_id"], "exec-pool");
    assert_eq!(
        request["instances"][0]["secret_files"]["MIGLET_ENROLLMENT_TOKEN_FILE"],
        "one-time-secret-of-vm-a"
    );
    assert_eq!(
        request["instances"][0]["settings"]["MIGLET_POOL_ID"],
        "exec-pool"
    );
    let argv = std::fs::read_to_string(state.join("argv-create"))?;
    assert_eq!(argv.trim(), "--project ci create");
    let env = std::fs::read_to_string(state.join("env-create"))?;
    assert!(env.contains("MIG_POOL_ID=exec-pool"), "{env}");
    assert!(!env.contains("one-time-secret") && !argv.contains("one-time-secret"));
    // Deleting a name twice, or one that never existed, is fine.
    p.delete(&["vm-a".to_owned(), "vm-zz".to_owned()]).await?;
    p.delete(&["vm-a".to_owned()]).await?;
    assert_eq!(
        statuses(&p).await?,
        vec![("vm-b".to_owned(), InstanceStatus::Running)]
    );
    Ok(())
}

#[tokio::test]
async fn failures_say_whether_to_try_again_and_what_the_program_said() -> TestResult {
    let dir = tempfile::tempdir()?;
    let p = setup(dir.path(), Duration::from_secs(2))?;
    let state = dir.path().join("state");
    std::fs::write(state.join("fail-create"), "75")?;
    match p.create(&[spec("vm-q")]).await {
        Err(ProviderError::Retryable(m)) => assert!(m.contains("quota exceeded in zone-a"), "{m}"),
        other => panic!("exit 75 is worth retrying: {other:?}"),
    }
    std::fs::write(state.join("fail-delete"), "3")?;
    match p.delete(&["vm-q".to_owned()]).await {
        Err(ProviderError::Fatal(m)) => {
            assert!(m.contains("exit 3") && m.contains("quota exceeded"), "{m}")
        }
        other => panic!("exit 3 needs someone to fix it: {other:?}"),
    }
    // A run past its timeout is stopped and worth trying again.
    std::fs::write(state.join("sleep-list"), "30")?;
    let started = std::time::Instant::now();
    match p.list().await {
        Err(ProviderError::Retryable(m)) => assert!(m.contains("longer than 2 s"), "{m}"),
        other => panic!("a hung program is retried later: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(15));
    // Stopped with what it started: its `sleep` does not outlive it.
    let sleepers = std::process::Command::new("pgrep")
        .args(["-f", "^sleep 30$"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    assert!(sleepers.is_empty(), "left running: {sleepers}");
    // The next call works again.
    p.create(&[spec("vm-q")]).await?;
    assert_eq!(statuses(&p).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_program_that_cannot_run_or_answers_nonsense_is_a_fatal_error() -> TestResult {
    let dir = tempfile::tempdir()?;
    let missing = ExecProvider::new(
        "exec-pool",
        ExecSettings {
            command: dir.path().join("no-such-program"),
            args: vec![],
            env: vec![],
            timeout: Duration::from_secs(5),
        },
    );
    assert!(matches!(missing.list().await, Err(ProviderError::Fatal(_))));
    let liar = dir.path().join("liar.sh");
    std::fs::write(
        &liar,
        "#!/bin/sh\ncat >/dev/null\necho '{\"instances\":[{\"name\":\"../etc\",\"status\":\"running\"}]}'\n",
    )?;
    std::fs::set_permissions(&liar, std::fs::Permissions::from_mode(0o755))?;
    let p = ExecProvider::new(
        "exec-pool",
        ExecSettings {
            command: "/bin/sh".into(),
            args: vec![liar.display().to_string()],
            env: vec![],
            timeout: Duration::from_secs(5),
        },
    );
    match p.list().await {
        Err(ProviderError::Fatal(m)) => assert!(m.contains("instance name"), "{m}"),
        other => panic!("a bad name is refused: {other:?}"),
    }
    Ok(())
}

/// The scaler through the `exec` provider, on the controller's clock: queued jobs make VMs
/// at most `scale_up_per_minute` a minute (deleted ones counted), and VMs that never boot are
/// deleted through the program after `boot_timeout`, with the reason on record.
#[tokio::test]
async fn the_scaler_drives_an_exec_program_within_its_rate_limit() -> TestResult {
    use mig_controller::lifecycle::ScalePolicy;
    let dir = tempfile::tempdir()?;
    let provider = std::sync::Arc::new(setup(dir.path(), Duration::from_secs(20))?);
    let state = dir.path().join("state");
    const SECRET: &str = "exec-webhook-secret-0123456789";
    let s = super::common::scaled_server(
        "exec-pool",
        "exec",
        ScalePolicy {
            min_idle: 0,
            max_size: 10,
            idle_timeout: 60_000,
            max_vm_lifetime: 3_600_000,
            boot_timeout: 300_000,
            registration_timeout: 300_000,
            scale_up_step: 10,
            scale_up_per_minute: Some(2),
        },
        provider.clone(),
        SECRET,
    )
    .await;
    for id in 1..=5 {
        let body = super::jobs::job("queued", 7000 + id, &["self-hosted", "exec"], None);
        let (status, _) =
            super::jobs::deliver(&s, "workflow_job", &format!("d-{id}"), &body, Some(SECRET)).await;
        assert_eq!(status, 200);
    }
    let vms = || {
        std::fs::read_dir(&state)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("vm-"))
                    .count()
            })
            .unwrap_or(0)
    };
    super::common::wait_until("two VMs", || async { vms() == 2 }).await;
    // Several passes later, still two: the minute's allowance is spent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(vms(), 2, "held to scale_up_per_minute");
    // A minute later (the controller's clock), two more.
    s.app().clock().advance(Duration::from_secs(61));
    super::common::wait_until("four VMs", || async { vms() == 4 }).await;
    // They never boot: past boot_timeout they are deleted through the program.
    s.app().clock().advance(Duration::from_secs(301));
    super::common::wait_until("the unbooted VMs deleted", || async {
        let deleted = s
            .app()
            .store()
            .instances_deleted(100)
            .await
            .unwrap_or_default();
        deleted
            .iter()
            .filter(|i| i.delete_reason.as_deref() == Some("boot_timeout"))
            .count()
            >= 4
    })
    .await;
    let calls = std::fs::read_to_string(state.join("calls"))?;
    assert!(calls.lines().any(|l| l == "delete"), "{calls}");
    assert!(
        calls.lines().filter(|l| *l == "create").count() >= 2,
        "{calls}"
    );
    Ok(())
}
