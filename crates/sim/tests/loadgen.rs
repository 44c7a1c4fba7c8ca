//! A small load run: the real `miglet-loadgen` against the real `mig-controller` it starts.
//! It checks the run works and reports what it should; figures are for BENCHMARKS.md, not
//! asserted here.

use std::path::{Path, PathBuf};
use std::time::Duration;

const LOADGEN: &str = env!("CARGO_BIN_EXE_miglet-loadgen");

fn controller_binary() -> PathBuf {
    let bin = Path::new(LOADGEN).with_file_name("mig-controller");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "mig-controller", "--bin", "mig-controller"])
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "could not build mig-controller"
        );
    }
    bin
}

#[tokio::test]
async fn small_load_run_reports_every_figure()
-> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("report.json");
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(LOADGEN)
            .args([
                "--agents",
                "20",
                "--http-share",
                "0.25",
                "--heartbeat-secs",
                "1",
            ])
            .args([
                "--events-per-sec",
                "20",
                "--commands-per-sec",
                "5",
                "--duration-secs",
                "3",
            ])
            .arg("--controller-bin")
            .arg(controller_binary())
            .arg("--json")
            .arg(&json)
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("command enqueue-to-receipt"), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    assert_eq!(r["agents_connected"], 20, "{r}");
    assert_eq!(
        (r["streams"].as_u64(), r["http_agents"].as_u64()),
        (Some(15), Some(5))
    );
    assert_eq!(r["registration_latency_ms"]["n"], 20, "{r}");
    assert!(r["events_per_sec"].as_f64().is_some_and(|e| e > 0.0), "{r}");
    assert!(
        r["heartbeats_per_sec"].as_f64().is_some_and(|h| h > 0.0),
        "{r}"
    );
    assert!(
        r["commands_enqueued"].as_u64().is_some_and(|c| c > 0),
        "{r}"
    );
    assert!(r["command_latency_ms"]["p50"].as_f64().is_some(), "{r}");
    for k in ["agents", "heartbeats", "events", "enqueue"] {
        assert_eq!(r["errors"][k], 0, "{k}: {r}");
    }
    assert!(
        r["controller"]["peak_rss_mib"]
            .as_f64()
            .is_some_and(|m| m > 0.0),
        "{r}"
    );
    Ok(())
}
