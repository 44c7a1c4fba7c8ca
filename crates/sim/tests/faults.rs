//! The fault-injection suite at its small size: `miglet-faults --small` against freshly built
//! `mig-controller`, `miglet` and runner stand-in binaries. Every check the suite makes must
//! pass; its figures are for RELIABILITY.md.

use std::path::{Path, PathBuf};
use std::time::Duration;

const FAULTS: &str = env!("CARGO_BIN_EXE_miglet-faults");

/// Builds the binaries the suite starts, with this test's profile, next to `miglet-faults`
/// (cargo does nothing for what is up to date; a stale binary is never used).
fn build_siblings() {
    let dir: PathBuf = Path::new(FAULTS)
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "mig-controller",
        "-p",
        "miglet",
        "-p",
        "miglet-sim",
        "--bins",
    ]);
    if dir.file_name().is_some_and(|d| d == "release") {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().is_ok_and(|s| s.success()),
        "could not build the binaries the fault suite starts"
    );
}

#[tokio::test]
async fn the_fault_suite_passes_at_its_small_size()
-> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    build_siblings();
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("faults.json");
    let out = tokio::time::timeout(
        Duration::from_secs(600),
        tokio::process::Command::new(FAULTS)
            .args(["--scenario", "all", "--small", "--json"])
            .arg(&json)
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: String = stderr
        .lines()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(out.status.success(), "{stdout}\n{tail}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    for scenario in ["crash", "partition", "disk", "floods"] {
        let s = &report[scenario];
        if s["figures"]["skipped"].is_string() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must run {scenario}: {s}"
            );
            continue;
        }
        let checks = s["checks"].as_array().ok_or(format!("{scenario}: {s}"))?;
        assert!(!checks.is_empty(), "{scenario} checked nothing");
        for c in checks {
            assert_eq!(c["ok"], true, "{scenario}: {c}");
        }
    }
    Ok(())
}
