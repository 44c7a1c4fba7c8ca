//! A small load run: the real `miglet-loadgen` against the real `mig-controller` it starts.
//! It checks the run works and reports what it should; figures are for BENCHMARKS.md, not
//! asserted here.

use std::path::{Path, PathBuf};
use std::time::Duration;

const LOADGEN: &str = env!("CARGO_BIN_EXE_miglet-loadgen");

/// The controller binary next to the load generator, (re)built now so a stale one from an
/// earlier build is never used (cargo does nothing when it is up to date).
fn controller_binary() -> PathBuf {
    let bin = Path::new(LOADGEN).with_file_name("mig-controller");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "mig-controller",
        "--bin",
        "mig-controller",
    ]);
    if bin
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|d| d == "release")
    {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().is_ok_and(|s| s.success()),
        "could not build mig-controller"
    );
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
                "--poll-secs",
                "1",
                "--joins-per-sec",
                "2",
            ])
            .args([
                "--events-per-sec",
                "20",
                "--commands-per-sec",
                "5",
                "--duration-secs",
                "3",
                "--baseline-secs",
                "2",
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
    assert!(stdout.contains("command to agent, stream"), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let c = &r["controller"];
    assert_eq!(c["agents_connected"], 20, "{r}");
    assert_eq!(
        (c["streams"].as_u64(), c["http_agents"].as_u64()),
        (Some(15 + c["joined"].as_u64().unwrap_or(0)), Some(5)),
        "{r}"
    );
    // Every agent got its registration: the ramp's over either transport, the joiners'
    // over their streams.
    assert_eq!(c["registration_ramp_ms"]["n"], 20, "{r}");
    assert!(c["joined"].as_u64().is_some_and(|j| j > 0), "{r}");
    assert_eq!(c["registration_steady_ms"]["n"], c["joined"], "{r}");
    assert_eq!(
        c["registration_steady_parts_ms"]["ready_to_register"]["n"], c["joined"],
        "{r}"
    );
    assert!(c["events_per_sec"].as_f64().is_some_and(|e| e > 0.0), "{r}");
    assert!(
        c["heartbeats_per_sec"].as_f64().is_some_and(|h| h > 0.0),
        "{r}"
    );
    assert!(
        c["commands_enqueued"].as_u64().is_some_and(|n| n > 0),
        "{r}"
    );
    assert_eq!(c["commands_not_received"], 0, "{r}");
    assert!(
        c["command_latency_stream_ms"]["p50"].as_f64().is_some(),
        "{r}"
    );
    for k in [
        "agents",
        "heartbeats",
        "events",
        "enqueue",
        "refused_on_stream",
    ] {
        assert_eq!(c["errors"][k], 0, "{k}: {r}");
    }
    // Nothing lost: the controller's own counters saw every heartbeat and event sent.
    assert_eq!(
        r["stored"]["heartbeats"].as_f64(),
        c["heartbeats_sent"].as_f64(),
        "{r}"
    );
    let started = 20 + c["joined"].as_u64().unwrap_or(0);
    assert_eq!(
        r["stored"]["events"].as_f64(),
        c["events_sent"].as_u64().map(|e| (e + started) as f64),
        "{r}"
    );
    // Read back from the store after the controller stopped: every acknowledged event is
    // there, once.
    let k = &r["store_check"];
    assert!(k["acknowledged"].as_u64().is_some_and(|n| n > 20), "{r}");
    assert_eq!(
        (k["lost"].as_u64(), k["duplicated"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );
    assert!(
        c["server"]["peak_rss_mib"]
            .as_f64()
            .is_some_and(|m| m > 0.0),
        "{r}"
    );
    // The baseline ran the same stream fleet against the echo server.
    assert_eq!(r["baseline"]["agents_connected"], 15, "{r}");
    assert!(
        r["baseline"]["command_latency_stream_ms"]["n"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{r}"
    );
    assert!(r["loopback_rtt_ms"]["p99"].as_f64().is_some(), "{r}");
    assert!(
        r["storage"]["db_bytes_after"]
            .as_u64()
            .is_some_and(|b| b > 0),
        "{r}"
    );
    Ok(())
}
