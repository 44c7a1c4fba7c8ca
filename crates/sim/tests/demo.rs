//! The README's first command works: `miglet-sim demo` brings up the fleet, runs jobs
//! through VMs it creates (minting just-in-time runners on the stand-in's GitHub App, while
//! some webhooks are lost), and leaves no VM behind when it stops.

use std::time::Duration;

#[tokio::test]
async fn the_demo_fleet_runs_jobs_and_cleans_up() {
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_miglet-sim"));
    assert!(
        exe.with_file_name("miglet").is_file(),
        "the demo needs the miglet binary next to miglet-sim: run the tests with --workspace"
    );
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&exe)
            .args(["demo", "--dir"])
            .arg(dir.path())
            .args([
                "--http-addr",
                "127.0.0.1:0",
                "--grpc-addr",
                "127.0.0.1:0",
                "--jobs-per-minute",
                "60",
                "--job-seconds",
                "1",
                "--run-for-secs",
                "25",
                "--lose-every-nth-webhook",
                "4",
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("the demo did not stop"))
    .unwrap_or_else(|e| panic!("run the demo: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("The demo fleet is up"), "{stdout}");
    assert!(stdout.contains("/dashboard"), "{stdout}");
    assert!(stdout.contains("operator token:  migop_"), "{stdout}");
    let done = stdout
        .lines()
        .filter_map(|l| {
            l.rsplit_once("jobs done ")
                .and_then(|(_, n)| n.trim().parse::<u32>().ok())
        })
        .max()
        .unwrap_or(0);
    assert!(done >= 3, "jobs ran through the fleet:\n{stdout}\n{stderr}");
    assert!(stderr.contains("Scaler created VMs"), "{stderr}");
    // Jobs still run while webhooks are lost (the backstop poll's own test is the fleet
    // end-to-end test, where every delivery of a job is lost).
    assert!(
        stdout.contains("losing every 4th webhook delivery"),
        "{stdout}"
    );
    let left = std::fs::read_dir(dir.path().join("vms")).map_or(0, |d| d.count());
    assert_eq!(left, 0, "every demo VM is stopped");
}

/// BENCHMARKS.md's scale-out command works (small: one round, four VMs) and prints its
/// figures.
#[tokio::test]
async fn the_scale_benchmark_runs_and_prints_its_figures() {
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_miglet-sim"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(&exe)
            .args(["scale-bench", "--dir"])
            .arg(dir.path())
            .args(["--vms", "4", "--step", "2", "--rounds", "1"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("the benchmark did not finish"))
    .unwrap_or_else(|e| panic!("run the benchmark: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for figure in ["cold pool", "warm pool", "0 -> 4"] {
        assert!(stdout.contains(figure), "{figure} missing:\n{stdout}");
    }
}
