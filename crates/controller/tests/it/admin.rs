//! The operator API: every route, its filters, pagination and bad parameters.

use super::common::*;
use serde_json::{Value, json};

struct Op {
    token: String,
}

impl Op {
    async fn get(&self, s: &TestServer, path: &str) -> (u16, Value) {
        let r = s
            .client
            .get(format!("{}{path}", s.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, s: &TestServer, path: &str, body: &Value) -> (u16, Value) {
        let r = s
            .client
            .post(format!("{}{path}", s.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// GET that must answer 200.
    async fn ok(&self, s: &TestServer, path: &str) -> Value {
        let (status, body) = self.get(s, path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }
}

fn ids(v: &Value, list: &str, field: &str) -> Vec<String> {
    v[list]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x[field].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Three VMs in two pools, one running a job, one with heartbeats, one lost.
async fn fleet() -> (TestServer, Op) {
    let s = TestServer::start().await;
    let op = Op {
        token: s.admin_token(),
    };
    for (vm, pool) in [
        ("vm-a1", "pool-a"),
        ("vm-a2", "pool-a"),
        ("vm-b1", "pool-b"),
    ] {
        s.vm_started(vm, pool).await;
    }
    let (status, _) = s
        .post(
            "/api/v1/vms/vm-a1/events",
            &json!({"type":"job_started","vm_id":"vm-a1","run_id":"9001","repository":"acme/rocket","job_name":"build"}),
        )
        .await;
    assert_eq!(status, 200);
    for i in 0..5 {
        let (status, _) = s
            .post(
                "/api/v1/vms/vm-a2/heartbeat",
                &json!({"type":"job_heartbeat","vm_id":"vm-a2","miglet_state":"idle","vm_health":{"cpu_usage_percent": 10.0 + f64::from(i)}}),
            )
            .await;
        assert_eq!(status, 200);
    }
    (s, op)
}

#[tokio::test]
async fn vms_are_listed_filtered_and_paged() -> TestResult {
    let (mut s, op) = fleet().await;
    let all = op.ok(&s, "/api/v1/admin/vms").await;
    assert_eq!(ids(&all, "vms", "vm_id"), ["vm-a1", "vm-a2", "vm-b1"]);
    assert_eq!(all["next_cursor"], Value::Null);
    let a = op.ok(&s, "/api/v1/admin/vms?pool=pool-a").await;
    assert_eq!(ids(&a, "vms", "vm_id"), ["vm-a1", "vm-a2"]);
    let running = op.ok(&s, "/api/v1/admin/vms?state=job_running").await;
    assert_eq!(ids(&running, "vms", "vm_id"), ["vm-a1"]);
    assert_eq!(running["vms"][0]["current_job"]["run_id"], "9001");
    let text = op.ok(&s, "/api/v1/admin/vms?q=rocket").await;
    assert_eq!(ids(&text, "vms", "vm_id"), ["vm-a1"]);
    let healthy = op
        .ok(&s, "/api/v1/admin/vms?health=healthy&pool=pool-b")
        .await;
    assert_eq!(ids(&healthy, "vms", "vm_id"), ["vm-b1"]);
    // The development pool registers runners with these labels.
    let labelled = op.ok(&s, "/api/v1/admin/vms?label=linux").await;
    assert_eq!(ids(&labelled, "vms", "vm_id").len(), 3);
    let none = op.ok(&s, "/api/v1/admin/vms?label=gpu").await;
    assert!(ids(&none, "vms", "vm_id").is_empty());
    // Pages of two.
    let p1 = op.ok(&s, "/api/v1/admin/vms?limit=2").await;
    assert_eq!(ids(&p1, "vms", "vm_id"), ["vm-a1", "vm-a2"]);
    let cursor = p1["next_cursor"].as_str().ok_or("cursor")?;
    let p2 = op
        .ok(&s, &format!("/api/v1/admin/vms?limit=2&cursor={cursor}"))
        .await;
    assert_eq!(ids(&p2, "vms", "vm_id"), ["vm-b1"]);
    assert_eq!(p2["next_cursor"], Value::Null);
    // Bad parameters: 400 with a message.
    for bad in [
        "/api/v1/admin/vms?limit=0",
        "/api/v1/admin/vms?limit=501",
        "/api/v1/admin/vms?limit=x",
        "/api/v1/admin/vms?health=sick",
        "/api/v1/admin/vms?colour=red",
    ] {
        let (status, body) = op.get(&s, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{bad}: {body}"
        );
    }
    // One VM.
    let one = op.ok(&s, "/api/v1/admin/vms/vm-a1").await;
    assert_eq!(one["vm"]["state"], "job_running");
    assert_eq!(one["commands"][0]["type"], "register_runner");
    assert_eq!(
        one["commands"][0]["parameters"]["registration_token"],
        "[REDACTED]"
    );
    assert_eq!(op.get(&s, "/api/v1/admin/vms/vm-none").await.0, 404);
    assert_eq!(op.get(&s, "/api/v1/admin/vms/a..b").await.0, 400);
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn timeline_heartbeats_and_events() -> TestResult {
    let (mut s, op) = fleet().await;
    let t = op.ok(&s, "/api/v1/admin/vms/vm-a1/timeline").await;
    let whats: Vec<String> = t["entries"]
        .as_array()
        .ok_or("entries")?
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e["source"].as_str().unwrap_or(""),
                e["what"].as_str().unwrap_or("")
            )
        })
        .collect();
    let pos = |w: &str| whats.iter().position(|x| x == w);
    let (enrolled, boot, started, reg, job) = (
        pos("controller:enrolled"),
        pos("controller:boot_started"),
        pos("event:vm_started"),
        pos("command:register_runner pending"),
        pos("event:job_started"),
    );
    // Every entry is there (a missing one would compare as smaller than any), in order.
    let order = [enrolled, boot, started, reg, job];
    assert!(order.iter().all(Option::is_some), "{whats:?}");
    assert!(enrolled < boot && started < job, "{whats:?}");
    assert_eq!(t["truncated"], false);
    let short = op.ok(&s, "/api/v1/admin/vms/vm-a1/timeline?limit=2").await;
    assert_eq!(short["entries"].as_array().map(Vec::len), Some(2));
    assert_eq!(short["truncated"], true);
    assert_eq!(op.get(&s, "/api/v1/admin/vms/nobody/timeline").await.0, 404);

    let hb = op
        .ok(&s, "/api/v1/admin/vms/vm-a2/heartbeats?limit=3")
        .await;
    let cpu: Vec<f64> = hb["heartbeats"]
        .as_array()
        .ok_or("heartbeats")?
        .iter()
        .filter_map(|h| h["cpu_percent"].as_f64())
        .collect();
    assert_eq!(cpu, [14.0, 13.0, 12.0], "newest first");
    let before = hb["next_before"].as_i64().ok_or("next_before")?;
    let hb2 = op
        .ok(
            &s,
            &format!("/api/v1/admin/vms/vm-a2/heartbeats?limit=3&before={before}"),
        )
        .await;
    assert_eq!(hb2["heartbeats"].as_array().map(Vec::len), Some(2));
    let future = op
        .ok(
            &s,
            "/api/v1/admin/vms/vm-a2/heartbeats?since=2100-01-01T00:00:00Z",
        )
        .await;
    assert_eq!(future["heartbeats"].as_array().map(Vec::len), Some(0));
    assert_eq!(
        op.get(&s, "/api/v1/admin/vms/vm-a2/heartbeats?since=yesterday")
            .await
            .0,
        400
    );

    let ev = op.ok(&s, "/api/v1/admin/events?type=job_started").await;
    assert_eq!(ids(&ev, "events", "vm_id"), ["vm-a1"]);
    assert_eq!(ev["events"][0]["data"]["run_id"], "9001");
    let by_text = op.ok(&s, "/api/v1/admin/events?q=acme/rocket").await;
    assert_eq!(ids(&by_text, "events", "type"), ["job_started"]);
    let pool_b = op.ok(&s, "/api/v1/admin/events?pool=pool-b").await;
    assert_eq!(ids(&pool_b, "events", "vm_id"), ["vm-b1"]);
    let two_types = op
        .ok(
            &s,
            "/api/v1/admin/events?type=vm_started,job_started&vm=vm-a1",
        )
        .await;
    assert_eq!(
        ids(&two_types, "events", "type"),
        ["job_started", "vm_started"]
    );
    let paged = op.ok(&s, "/api/v1/admin/events?limit=2").await;
    let next = paged["next_before"].as_i64().ok_or("next_before")?;
    let rest = op
        .ok(&s, &format!("/api/v1/admin/events?before={next}"))
        .await;
    assert_eq!(
        paged["events"].as_array().map(Vec::len).unwrap_or(0)
            + rest["events"].as_array().map(Vec::len).unwrap_or(0),
        4
    );
    let empty = op
        .ok(
            &s,
            "/api/v1/admin/events?since=2000-01-01T00:00:00Z&until=2000-01-02T00:00:00Z",
        )
        .await;
    assert_eq!(empty["events"].as_array().map(Vec::len), Some(0));
    for bad in [
        "/api/v1/admin/events?since=soon",
        "/api/v1/admin/events?since=2000-01-02T00:00:00Z&until=2000-01-01T00:00:00Z",
        "/api/v1/admin/events?type=bad%20type",
        "/api/v1/admin/events?vm=../x",
        "/api/v1/admin/events?limit=1000",
    ] {
        let (status, body) = op.get(&s, bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn commands_for_a_vm_and_a_pool_are_followed_to_their_ack() -> TestResult {
    let (mut s, op) = fleet().await;
    let drain = json!({"type":"drain","parameters":{"reason":"maintenance","timeout_seconds":60}});
    let (status, one) = op
        .post(&s, "/api/v1/admin/vms/vm-b1/commands", &drain)
        .await;
    assert_eq!(status, 201, "{one}");
    let id = one["command"]["id"].as_str().ok_or("id")?.to_owned();
    assert_eq!(one["command"]["state"], "pending");
    // The VM polls it and acknowledges: the API shows the state and the latency.
    let got = s.poll("vm-b1").await;
    assert!(got.iter().any(|c| c["id"] == id.as_str()));
    let (status, _) = s
        .post(
            &format!("/api/v1/vms/vm-b1/commands/{id}/ack"),
            &json!({"success":true,"message":"draining"}),
        )
        .await;
    assert_eq!(status, 200);
    let followed = op.ok(&s, &format!("/api/v1/admin/commands/{id}")).await;
    assert_eq!(followed["command"]["state"], "acknowledged");
    assert!(
        followed["command"]["ack_latency_ms"]
            .as_i64()
            .is_some_and(|l| l >= 0)
    );
    let states: Vec<&str> = followed["transitions"]
        .as_array()
        .ok_or("transitions")?
        .iter()
        .filter_map(|t| t["to_state"].as_str())
        .collect();
    assert_eq!(states, ["pending", "delivered", "acknowledged"]);
    assert_eq!(op.get(&s, "/api/v1/admin/commands/nope").await.0, 404);

    // A whole pool; a lost VM is skipped.
    s.app()
        .store()
        .write(vec![mig_controller::store::Mutation::PutVm({
            let mut b1 = s.app().store().vm_get("vm-b1").await?.ok_or("vm")?;
            b1.health = mig_controller::store::Health::Lost;
            b1
        })])
        .await?;
    let vm = s.app().store().vm_get("vm-a2").await?.ok_or("vm")?;
    let mut lost = vm.clone();
    lost.health = mig_controller::store::Health::Lost;
    let mut a1 = s.app().store().vm_get("vm-a1").await?.ok_or("vm")?;
    a1.health = mig_controller::store::Health::Healthy;
    s.app()
        .store()
        .write(vec![
            mig_controller::store::Mutation::PutVm(lost),
            mig_controller::store::Mutation::PutVm(a1),
        ])
        .await?;
    let level = json!({"type":"set_log_level","parameters":{"level":"debug"}});
    let (status, pool) = op
        .post(&s, "/api/v1/admin/pools/pool-a/commands", &level)
        .await;
    assert_eq!(status, 201, "{pool}");
    assert_eq!(ids(&pool, "commands", "vm_id"), ["vm-a1"]);
    assert!(pool["skipped"]["vm-a2"].is_string());
    assert_eq!(
        op.post(&s, "/api/v1/admin/pools/pool-none/commands", &level)
            .await
            .0,
        404
    );
    // Bad commands.
    for bad in [
        json!({"type":"reboot"}),
        json!({"type":"register_runner","parameters":{}}),
        json!({"type":"drain","ttl_secs":0}),
        json!({"type":"drain","unknown":1}),
        json!({"type":"set_log_level","parameters":{"level":"loud"}}),
    ] {
        let (status, body) = op.post(&s, "/api/v1/admin/vms/vm-b1/commands", &bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    // Listing.
    let acked = op.ok(&s, "/api/v1/admin/commands?state=acknowledged").await;
    assert!(ids(&acked, "commands", "id").contains(&id));
    let by_vm = op
        .ok(&s, "/api/v1/admin/commands?vm=vm-a1&type=set_log_level")
        .await;
    assert_eq!(ids(&by_vm, "commands", "vm_id"), ["vm-a1"]);
    assert_eq!(op.get(&s, "/api/v1/admin/commands?state=lost").await.0, 400);
    // Pools.
    let pools = op.ok(&s, "/api/v1/admin/pools").await;
    let a = pools["pools"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["pool_id"] == "pool-a"))
        .ok_or("pool-a")?;
    assert_eq!(a["total"], 2);
    assert_eq!(a["by_health"]["lost"], 1);
    assert!(a["labels"].as_array().is_some_and(|l| !l.is_empty()));
    // A pool's size over time exists only for pools the controller sizes.
    assert_eq!(
        op.get(&s, "/api/v1/admin/pools/pool-a/history").await.0,
        404
    );
    assert_eq!(
        op.get(&s, "/api/v1/admin/pools/pool-a/history?minutes=0")
            .await
            .0,
        400
    );
    assert_eq!(
        op.get(&s, "/api/v1/admin/pools/pool-a/history?minutes=121")
            .await
            .0,
        400
    );
    // The document is served.
    let doc = op.ok(&s, "/api/v1/admin/openapi.json").await;
    assert!(doc["paths"]["/api/v1/admin/vms"].is_object());
    // Audit: both enqueues and the pool one.
    let audit = op.ok(&s, "/api/v1/admin/audit?limit=50").await;
    let actions: Vec<String> = ids(&audit, "entries", "action");
    assert!(
        actions.iter().any(|a| a == "command.enqueue_pool"),
        "{actions:?}"
    );
    s.stop().await;
    Ok(())
}

/// Reads an SSE response until `want` appears in it (bounded).
async fn read_until(resp: &mut reqwest::Response, want: &str) -> String {
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !text.contains(want) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(c))) => text.push_str(&String::from_utf8_lossy(&c)),
            other => panic!("stream ended or stalled before {want:?}: {other:?}\n{text}"),
        }
    }
    text
}

#[tokio::test]
async fn live_events_arrive_as_server_sent_events_and_resume() -> TestResult {
    let (mut s, op) = fleet().await;
    let url = format!("{}/api/v1/admin/events/stream?type=job_completed", s.base);
    let mut live = s.client.get(&url).bearer_auth(&op.token).send().await?;
    assert_eq!(live.status().as_u16(), 200);
    assert!(
        live.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"))
    );
    let (status, _) = s
        .post(
            "/api/v1/vms/vm-a1/events",
            &json!({"type":"job_completed","vm_id":"vm-a1","run_id":"9001","result":"Succeeded"}),
        )
        .await;
    assert_eq!(status, 200);
    let text = read_until(&mut live, "\n\n").await;
    assert!(text.contains("event: job_completed"), "{text}");
    assert!(text.contains("\"run_id\":\"9001\""), "{text}");
    assert!(!text.contains("vm_started"), "filtered by type: {text}");
    drop(live);
    // Resuming from the start replays what was missed, in order.
    let mut again = s
        .client
        .get(format!(
            "{}/api/v1/admin/events/stream?type=vm_started",
            s.base
        ))
        .bearer_auth(&op.token)
        .header("last-event-id", "0")
        .send()
        .await?;
    let text = read_until(&mut again, "vm-b1").await;
    let order: Vec<usize> = ["vm-a1", "vm-a2", "vm-b1"]
        .iter()
        .filter_map(|v| text.find(v))
        .collect();
    assert!(
        order.len() == 3 && order.windows(2).all(|w| w[0] < w[1]),
        "{text}"
    );
    // Bad filters are refused before the stream starts; a read-only token may watch.
    let (status, _) = op.get(&s, "/api/v1/admin/events/stream?vm=../x").await;
    assert_eq!(status, 400);
    let (status, _) = op.get(&s, "/api/v1/admin/events/stream?colour=red").await;
    assert_eq!(status, 400);
    drop(again);
    s.stop().await;
    Ok(())
}
