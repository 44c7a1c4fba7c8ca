//! The `local` provider against real processes: creates are idempotent, a deleted VM's
//! process group is stopped and its directory removed, a VM that exits shows as stopped, a
//! new provider over the same directory finds the running VMs again (a controller restart),
//! and per-VM secrets are files only the owner can read.

use super::common::TestResult;
use mig_controller::provider::local::{LocalProvider, LocalSettings};
use mig_controller::provider::{InstanceSpec, InstanceStatus, Provider};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

/// A stand-in agent: records its environment and the secret it was given, then waits (or
/// exits at once when its VM id says so).
const AGENT: &str = r#"#!/bin/sh
env | sort > "$MIGLET_DATA_DIR.env"
cat "$MIGLET_ENROLLMENT_TOKEN_FILE" > "$MIGLET_DATA_DIR.secret"
case "$MIGLET_VM_ID" in *exits*) exit 0;; esac
exec sleep 300
"#;

fn spec(name: &str) -> InstanceSpec {
    InstanceSpec {
        name: name.into(),
        pool_id: "local-pool".into(),
        settings: vec![(
            "MIGLET_CONTROLLER_ENDPOINT".into(),
            "http://127.0.0.1:9".into(),
        )],
        secret_files: vec![(
            "MIGLET_ENROLLMENT_TOKEN_FILE".into(),
            format!("secret-of-{name}"),
        )],
    }
}

fn provider(dir: &std::path::Path) -> LocalProvider {
    LocalProvider::new(LocalSettings {
        miglet_bin: dir.join("agent.sh"),
        runner_template: dir.join("template"),
        work_dir: dir.join("vms"),
        env: vec![("MIGLET_HEARTBEAT_INTERVAL".into(), "2s".into())],
        args: vec![],
        stop_grace: Duration::from_secs(2),
    })
}

async fn status_of(p: &LocalProvider, name: &str) -> Option<InstanceStatus> {
    p.list()
        .await
        .ok()?
        .into_iter()
        .find(|i| i.name == name)
        .map(|i| i.status)
}

#[tokio::test]
async fn local_vms_are_created_once_listed_adopted_and_deleted() -> TestResult {
    let dir = tempfile::tempdir()?;
    let agent = dir.path().join("agent.sh");
    std::fs::write(&agent, AGENT)?;
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755))?;
    std::fs::create_dir_all(dir.path().join("template/bin"))?;
    std::fs::write(dir.path().join("template/config.sh"), "#!/bin/sh\n")?;
    std::fs::set_permissions(
        dir.path().join("template/config.sh"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    let p = provider(dir.path());
    let specs = [spec("vm-a"), spec("vm-b"), spec("vm-exits")];
    p.create(&specs).await?;
    p.create(&specs).await?;
    let vm_a = dir.path().join("vms/vm-a");
    // Wait (bounded) for the stand-ins to write what they saw.
    miglet_sim::testkit::wait_for("the stand-ins to start", Duration::from_secs(10), || {
        let ok =
            vm_a.join("data.env").exists() && dir.path().join("vms/vm-exits/data.secret").exists();
        async move { ok }
    })
    .await;
    let env = std::fs::read_to_string(vm_a.join("data.env"))?;
    for line in [
        "MIGLET_VM_ID=vm-a",
        "MIGLET_POOL_ID=local-pool",
        "MIGLET_POST_JOB_ACTION=none",
        "MIGLET_CONTROLLER_ENDPOINT=http://127.0.0.1:9",
        "MIGLET_HEARTBEAT_INTERVAL=2s",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} not in {env}");
    }
    assert!(
        !env.contains("secret-of-"),
        "the secret is a file, not a variable"
    );
    assert_eq!(
        std::fs::read_to_string(vm_a.join("data.secret"))?,
        "secret-of-vm-a"
    );
    let secret_file = vm_a.join("secrets/miglet_enrollment_token_file");
    assert_eq!(
        std::fs::metadata(&secret_file)?.permissions().mode() & 0o777,
        0o600
    );
    assert!(
        vm_a.join("runner/config.sh").exists(),
        "the runner template is copied"
    );
    assert!(
        std::fs::metadata(vm_a.join("runner/config.sh"))?
            .permissions()
            .mode()
            & 0o111
            != 0,
        "and stays executable"
    );
    let pid_a: i32 = std::fs::read_to_string(vm_a.join("pid"))?.trim().parse()?;

    miglet_sim::testkit::wait_for("vm-exits to stop", Duration::from_secs(10), || async {
        status_of(&p, "vm-exits").await == Some(InstanceStatus::Stopped)
    })
    .await;
    assert_eq!(status_of(&p, "vm-a").await, Some(InstanceStatus::Running));
    assert_eq!(p.list().await?.len(), 3, "created once each");

    // A new provider over the same directory (the controller restarted) sees the same VMs
    // and can delete one it did not start.
    drop(p);
    let p = provider(dir.path());
    assert_eq!(status_of(&p, "vm-a").await, Some(InstanceStatus::Running));
    p.delete(&["vm-a".into(), "vm-exits".into(), "never-made".into()])
        .await?;
    assert!(!vm_a.exists());
    miglet_sim::testkit::wait_for(
        "vm-a's process to end",
        Duration::from_secs(5),
        || async move { nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid_a), None).is_err() },
    )
    .await;
    let left: Vec<String> = p.list().await?.into_iter().map(|i| i.name).collect();
    assert_eq!(left, ["vm-b"]);
    p.delete(&["vm-b".into()]).await?;
    assert!(p.list().await?.is_empty());
    // A name that is not a VM id never becomes a path.
    assert!(p.create(&[spec("../escape")]).await.is_err());
    Ok(())
}
