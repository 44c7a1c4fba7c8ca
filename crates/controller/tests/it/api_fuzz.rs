//! Schema-driven fuzzing of the operator API: schemathesis (PyPI) generates requests from
//! `docs/openapi.json`, valid and invalid, sends them to a real controller over loopback and
//! checks every answer: no 5xx, every status and body as documented, invalid input refused
//! and valid input accepted (the few rules OpenAPI cannot state are listed, with why, in
//! `tests/api_fuzz/schemathesis.toml`).
//!
//! Needs `st` (schemathesis 4): `SCHEMATHESIS=/path/to/st`, or `st` on PATH. Without it the
//! test says it skipped, except under `CI`, where `.ci/run` installs it and its absence fails.
//! `MIG_API_FUZZ_SEED` replays a run; `MIG_API_FUZZ_EXAMPLES` sets cases per operation.

use super::common::*;
use mig_controller::auth::enroll::PoolEnrollment;
use mig_controller::auth::limits::Limit;
use mig_controller::token::{PoolRegistration, Pools, StaticToken};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

const SECRET: &str = "secret-of-pool-zero-0123456789";

fn schemathesis() -> Option<std::path::PathBuf> {
    let candidate = std::env::var_os("SCHEMATHESIS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "st".into());
    let out = std::process::Command::new(&candidate)
        .arg("--version")
        .output()
        .ok()?;
    // `st, version 4.x` (or `schemathesis, version 4.x`).
    let version = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && version.contains(", version 4.")).then_some(candidate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_api_answers_as_its_openapi_document_says() {
    let Some(st) = schemathesis() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install schemathesis (see .ci/run)"
        );
        eprintln!(
            "SKIPPED: schemathesis not found (pip install schemathesis, or set SCHEMATHESIS)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let secret_file = dir.path().join("zero.secret");
    std::fs::write(&secret_file, SECRET).unwrap_or_else(|e| panic!("write: {e}"));
    // The generator's smallest id is "0": a pool and a VM of that name make the by-id
    // operations answer with data, not only 404.
    let s = TestServer::start_with(|st| {
        let reg = || PoolRegistration {
            runner_url: "https://github.com/acme".into(),
            runner_group: "default".into(),
            labels: vec!["self-hosted".into()],
            token: Arc::new(StaticToken::new(
                "ghs_fuzz".into(),
                Duration::from_secs(600),
            )),
            scaling: None,
            enrollment: PoolEnrollment {
                bootstrap_secret_file: Some(secret_file.clone()),
                enrollment_tokens: true,
                ..PoolEnrollment::default()
            },
        };
        // A second pool to move VMs to.
        st.pools = Pools::new(
            [("0".to_owned(), reg()), ("1".to_owned(), reg())].into(),
            None,
        );
        // Measured here is the API, not the rate limiter (429 is documented and allowed).
        st.per_addr_limit = Limit {
            per_second: 0,
            burst: 0,
        };
    })
    .await;
    seed(&s).await;

    let seed_arg = std::env::var("MIG_API_FUZZ_SEED").ok();
    let examples = std::env::var("MIG_API_FUZZ_EXAMPLES").unwrap_or_else(|_| "40".into());
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/api_fuzz/schemathesis.toml"
    );
    let document = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
    let work = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let mut cmd = tokio::process::Command::new(&st);
    cmd.current_dir(work.path())
        .args(["--config-file", config, "--no-color", "run", document])
        .args(["--url", &s.base])
        .args([
            "--header",
            &format!("Authorization: Bearer {}", s.admin_token()),
        ])
        .args([
            "--checks",
            "all",
            "--max-examples",
            &examples,
            "--workers",
            "2",
        ])
        .args(["--generation-database", "none", "--request-timeout", "10"])
        // An endless stream; covered by the admin tests instead.
        .args(["--exclude-path", "/api/v1/admin/events/stream"])
        .kill_on_drop(true);
    if let Some(seed) = &seed_arg {
        cmd.args(["--seed", seed]);
    }
    let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("schemathesis ran longer than 600 s"))
        .unwrap_or_else(|e| panic!("run {}: {e}", st.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.contains("SUMMARY"))
        .collect();
    eprintln!("{}", summary.join("\n"));
    assert!(
        out.status.success(),
        "schemathesis found failures (replay with MIG_API_FUZZ_SEED):\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Tested: 17"),
        "not every operation was tested:\n{text}"
    );
    // Nothing a fuzzer sent left the store unreadable or lost the seeded data.
    let (status, vm, _) = request(
        &s,
        "GET",
        "/api/v1/admin/vms/0",
        Some(&s.admin_token()),
        None,
    )
    .await;
    assert_eq!(status, 200, "{vm}");
    let (status, events, _) = request(
        &s,
        "GET",
        "/api/v1/admin/events?vm=0&type=job_started",
        Some(&s.admin_token()),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        events["events"].as_array().map(Vec::len),
        Some(1),
        "{events}"
    );
}

/// A VM with events, heartbeats, commands and audit rows, so every list has something in it.
async fn seed(s: &TestServer) {
    let (status, body) = enroll_raw(
        s,
        json!({"vm_id": "0", "pool_id": "0", "method": "bootstrap", "bootstrap_secret": SECRET}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let cred = body["credential"].as_str().unwrap_or_default().to_owned();
    for event in [
        json!({"type": "vm_started", "vm_id": "0", "pool_id": "0", "org_id": "o"}),
        json!({"type": "runner_registered", "vm_id": "0", "pool_id": "0"}),
        json!({"type": "job_started", "vm_id": "0", "pool_id": "0",
               "metadata": {"job_id": "42", "run_id": "7", "repository": "acme/app"}}),
    ] {
        let (status, body, _) =
            request(s, "POST", "/api/v1/vms/0/events", Some(&cred), Some(event)).await;
        assert_eq!(status, 200, "{body}");
    }
    let hb = json!({"event_type": "job_heartbeat", "vm_id": "0", "pool_id": "0",
                    "miglet_state": "job_running", "vm_health": {"cpu_load": 12.5}});
    let (status, body, _) =
        request(s, "POST", "/api/v1/vms/0/heartbeat", Some(&cred), Some(hb)).await;
    assert_eq!(status, 200, "{body}");
    let admin = s.admin_token();
    let (status, body, _) = request(
        s,
        "POST",
        "/api/v1/admin/vms/0/commands",
        Some(&admin),
        Some(json!({"type": "set_log_level", "parameters": {"level": "debug"}})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}
