//! Prometheus metrics on their own listener: every declared metric is updated by a normal
//! flow, and no label carries a VM id.

use super::common::*;
use serde_json::json;
use std::net::SocketAddr;

/// Sample lines of metric family `name` (OpenMetrics text).
fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ', '_']))
        })
        .collect()
}

fn value(line: &str) -> f64 {
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1.0)
}

#[tokio::test]
async fn every_declared_metric_is_updated_and_labels_stay_low_cardinality() -> TestResult {
    let mut s = TestServer::start_with(|st| {
        st.metrics_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let metrics_addr = s
        .server
        .as_ref()
        .and_then(|r| r.metrics_addr)
        .ok_or("metrics listener")?;
    // An HTTP agent: boots, gets its registration, acknowledges it, heartbeats, runs a job.
    s.vm_started("vm-m1", "pool-001").await;
    let reg = s.poll("vm-m1").await;
    let id = reg[0]["id"].as_str().ok_or("id")?.to_owned();
    let (status, _) = s
        .post(
            &format!("/api/v1/vms/vm-m1/commands/{id}/ack"),
            &json!({"success":true}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = s
        .post(
            "/api/v1/vms/vm-m1/heartbeat",
            &json!({"type":"job_heartbeat","miglet_state":"idle"}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = s
        .post(
            "/api/v1/vms/vm-m1/events",
            &json!({"type":"job_started","run_id":"1"}),
        )
        .await;
    assert_eq!(status, 200);
    // An unknown path is a 404, with or without a credential; it still counts.
    let (status, _) = s.get("/no/such/route").await;
    assert_eq!(status, 404);
    // A gRPC agent that stays connected.
    let mut g = s.grpc_connect("vm-m2", "pool-001", "").await;
    let c = g.recv_command().await;
    g.ack(&c.id, true, "ok").await;
    wait_command_state(s.app(), &c.id, "acknowledged").await;

    let text = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await?
        .text()
        .await?;
    let declared: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, k)| (n.to_owned(), k.to_owned()))
        .collect();
    assert!(declared.len() >= 11, "{declared:?}");
    for (name, kind) in &declared {
        let lines = samples(&text, name);
        let updated = match kind.as_str() {
            "counter" => lines.iter().any(|l| l.contains("_total") && value(l) > 0.0),
            "histogram" => lines.iter().any(|l| l.contains("_count") && value(l) > 0.0),
            _ => !lines.is_empty(),
        };
        assert!(updated, "metric {name} ({kind}) was never updated:\n{text}");
    }
    let one = |name: &str, labels: &str| {
        samples(&text, name)
            .into_iter()
            .find(|l| l.contains(labels))
            .map(value)
    };
    assert_eq!(one("mig_streams_connected", ""), Some(1.0));
    assert_eq!(
        one(
            "mig_vms",
            "pool=\"pool-001\",state=\"job_running\",health=\"healthy\""
        ),
        Some(1.0),
        "{text}"
    );
    assert!(one("mig_events_ingested", "type=\"job_started\"").is_some_and(|v| v >= 1.0));
    assert!(one("mig_heartbeats_ingested", "transport=\"http\"").is_some_and(|v| v >= 1.0));
    assert!(
        one(
            "mig_http_requests",
            "route=\"/api/v1/vms/{vm_id}/events\",method=\"POST\",status=\"200\""
        )
        .is_some_and(|v| v >= 2.0),
        "{text}"
    );
    assert!(one("mig_http_requests", "route=\"unmatched\"").is_some());
    assert!(one("mig_registration_latency_seconds_count", "").is_some_and(|v| v >= 2.0));
    assert!(
        one(
            "mig_command_ack_latency_seconds_count",
            "type=\"register_runner\""
        )
        .is_some_and(|v| v >= 2.0)
    );
    assert!(one("mig_vm_oldest_in_state_seconds", "state=\"ready\"").is_some());
    assert!(one("mig_commands", "state=\"acknowledged\"").is_some_and(|v| v >= 2.0));
    assert!(
        !text.contains("vm-m1") && !text.contains("vm-m2"),
        "a VM id in a label:\n{text}"
    );
    s.stop().await;
    Ok(())
}
