//! Demand from GitHub: `workflow_job` webhook deliveries over real HTTP, verified by their
//! signature, deduplicated, moved only forward, and matched to the most specific pool.

use super::common::{TestResult, TestServer};
use mig_controller::github::webhook::sign;
use serde_json::{Value, json};

const SECRET: &str = "webhook-secret-for-tests-0123456789";

/// A server with three pools (`general`, `gpu`, `arm`) and the webhook secret.
async fn server() -> TestServer {
    TestServer::start_with(|st| {
        let file = st.data_dir.join("webhook-secret");
        std::fs::create_dir_all(&st.data_dir).unwrap_or_else(|e| panic!("data dir: {e}"));
        std::fs::write(&file, format!("{SECRET}\n")).unwrap_or_else(|e| panic!("secret: {e}"));
        st.webhook_secret_file = Some(file);
        let base = st
            .pools
            .get("pool-001")
            .unwrap_or_else(|e| panic!("fallback pool: {e}"))
            .clone();
        let pool = |labels: &[&str]| {
            let mut p = base.clone();
            p.labels = labels.iter().map(|l| (*l).to_owned()).collect();
            p
        };
        let pools = [
            ("general", pool(&["self-hosted", "linux", "x64"])),
            ("gpu", pool(&["self-hosted", "linux", "x64", "gpu"])),
            ("arm", pool(&["self-hosted", "linux", "arm64"])),
        ]
        .into_iter()
        .map(|(id, p)| (id.to_owned(), p))
        .collect();
        st.pools = mig_controller::token::Pools::new(pools, None);
    })
    .await
}

pub(super) fn job(action: &str, id: i64, labels: &[&str], runner: Option<&str>) -> Value {
    json!({
        "action": action,
        "workflow_job": {
            "id": id, "run_id": id * 10, "run_attempt": 1, "name": format!("job {id}"),
            "workflow_name": "CI", "labels": labels, "status": action,
            "runner_name": runner, "created_at": "2026-12-04T10:00:00Z",
        },
        "repository": {"full_name": "acme/app"},
    })
}

/// Delivers `body` as GitHub does: signed with `secret` unless `None`.
pub(super) async fn deliver(
    s: &TestServer,
    event: &str,
    delivery: &str,
    body: &Value,
    secret: Option<&str>,
) -> (u16, Value) {
    let raw = body.to_string();
    let mut req = s
        .client
        .post(format!("{}/api/v1/github/webhook", s.base))
        .header("X-GitHub-Event", event)
        .header("X-GitHub-Delivery", delivery)
        .header("User-Agent", "GitHub-Hookshot/test")
        .header("Content-Type", "application/json");
    if let Some(secret) = secret {
        req = req.header(
            "X-Hub-Signature-256",
            sign(secret.as_bytes(), raw.as_bytes()),
        );
    }
    let resp = req
        .body(raw)
        .send()
        .await
        .unwrap_or_else(|e| panic!("webhook: {e}"));
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn forged_and_unsigned_deliveries_are_refused_and_store_nothing() -> TestResult {
    let s = server().await;
    let body = job("queued", 1, &["self-hosted", "linux"], None);
    let (status, answer) = deliver(&s, "workflow_job", "d-1", &body, None).await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(answer["code"], "unauthenticated");
    let (status, answer) = deliver(
        &s,
        "workflow_job",
        "d-1",
        &body,
        Some("not-the-secret-at-all"),
    )
    .await;
    assert_eq!(status, 401, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("same webhook secret"))
    );
    // Signed over other bytes: a body changed in transit.
    let raw = body.to_string();
    let resp = s
        .client
        .post(format!("{}/api/v1/github/webhook", s.base))
        .header("X-GitHub-Event", "workflow_job")
        .header("X-GitHub-Delivery", "d-2")
        .header(
            "X-Hub-Signature-256",
            sign(SECRET.as_bytes(), raw.as_bytes()),
        )
        .body(raw.replace("acme/app", "evil/app"))
        .send()
        .await?;
    assert_eq!(resp.status(), 401);
    assert!(s.app().store().jobs_recent(10).await?.is_empty());
    let m = s.app().render_metrics().await;
    for line in [
        "mig_webhook_deliveries_total{event=\"workflow_job\",result=\"unsigned\"} 1",
        "mig_webhook_deliveries_total{event=\"workflow_job\",result=\"bad_signature\"} 2",
    ] {
        assert!(m.contains(line), "{line} not in:\n{m}");
    }
    // Signed but malformed: 400, nothing stored.
    let (status, answer) = deliver(
        &s,
        "workflow_job",
        "d-3",
        &json!({"action": "queued", "workflow_job": {"id": -4, "run_id": 1}}),
        Some(SECRET),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(s.app().store().jobs_recent(10).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn jobs_follow_their_deliveries_forward_only_and_go_to_the_most_specific_pool() -> TestResult
{
    let s = server().await;
    let (status, answer) = deliver(&s, "ping", "p-1", &json!({"zen": "hi"}), Some(SECRET)).await;
    assert_eq!((status, answer["result"].as_str()), (200, Some("ignored")));

    let gpu_job = job("queued", 7, &["self-hosted", "Linux", "gpu"], None);
    let (status, answer) = deliver(&s, "workflow_job", "d-7a", &gpu_job, Some(SECRET)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["result"], "applied");
    assert_eq!(answer["pool_id"], "gpu");
    // The same delivery again, and the same step under a new delivery id: nothing changes.
    for id in ["d-7a", "d-7b"] {
        let (_, answer) = deliver(&s, "workflow_job", id, &gpu_job, Some(SECRET)).await;
        assert_eq!(answer["result"], "duplicate", "{id}");
    }
    // Runner `vm-gpu-1-1` is boot 1 of our VM `vm-gpu-1`.
    s.vm_started("vm-gpu-1", "gpu").await;
    let started = job(
        "in_progress",
        7,
        &["self-hosted", "Linux", "gpu"],
        Some("vm-gpu-1-1"),
    );
    let (_, answer) = deliver(&s, "workflow_job", "d-7c", &started, Some(SECRET)).await;
    assert_eq!(answer["result"], "applied");
    // A late `queued` after it started never moves it back.
    let (_, answer) = deliver(&s, "workflow_job", "d-7d", &gpu_job, Some(SECRET)).await;
    assert_eq!(answer["result"], "duplicate");
    let stored = s.app().store().job_get(7).await?.ok_or("job 7")?;
    assert_eq!(stored.status, "in_progress");
    assert_eq!(stored.pool_id.as_deref(), Some("gpu"));
    assert_eq!(stored.vm_id.as_deref(), Some("vm-gpu-1"), "the runner's VM");
    assert_eq!(stored.repository, "acme/app");
    assert!(stored.started_at.is_some());
    let done = job(
        "completed",
        7,
        &["self-hosted", "Linux", "gpu"],
        Some("vm-gpu-1-1"),
    );
    let (_, answer) = deliver(&s, "workflow_job", "d-7e", &done, Some(SECRET)).await;
    assert_eq!(answer["result"], "applied");
    assert_eq!(
        s.app().store().job_get(7).await?.ok_or("job 7")?.status,
        "completed"
    );

    // Other pools, and a job none of ours can run.
    let (_, answer) = deliver(
        &s,
        "workflow_job",
        "d-8",
        &job("queued", 8, &["self-hosted", "linux"], None),
        Some(SECRET),
    )
    .await;
    assert_eq!(
        answer["pool_id"], "arm",
        "a tie between general and arm goes to the first id"
    );
    let (_, answer) = deliver(
        &s,
        "workflow_job",
        "d-9",
        &job("queued", 9, &["x64"], None),
        Some(SECRET),
    )
    .await;
    assert_eq!(answer["pool_id"], "general");
    let (_, answer) = deliver(
        &s,
        "workflow_job",
        "d-10",
        &job("queued", 10, &["ubuntu-latest"], None),
        Some(SECRET),
    )
    .await;
    assert_eq!(
        (answer["result"].as_str(), &answer["pool_id"]),
        (Some("applied"), &Value::Null)
    );
    let open: Vec<i64> = s
        .app()
        .store()
        .jobs_open_for_pool("general")
        .await?
        .iter()
        .map(|j| j.job_id)
        .collect();
    assert_eq!(open, [9]);
    let m = s.app().render_metrics().await;
    for line in [
        "mig_job_queue_seconds_count{pool=\"gpu\"} 1",
        "mig_webhook_deliveries_total{event=\"workflow_job\",result=\"applied\"} 6",
        "mig_webhook_deliveries_total{event=\"workflow_job\",result=\"duplicate\"} 3",
        "mig_webhook_deliveries_total{event=\"ping\",result=\"ignored\"} 1",
    ] {
        assert!(m.contains(line), "{line} not in:\n{m}");
    }
    Ok(())
}

#[tokio::test]
async fn without_a_secret_there_is_no_webhook() -> TestResult {
    let s = TestServer::start().await;
    let (status, answer) = deliver(&s, "ping", "p-1", &json!({}), Some(SECRET)).await;
    assert_eq!(status, 404, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("[webhook] secret_file"))
    );
    Ok(())
}
