//! Bad input gets a clear 4xx JSON error and never loses or corrupts stored data.

use super::common::*;
use serde_json::json;

#[tokio::test]
async fn every_bad_input_is_refused_and_nothing_stored_is_harmed() -> TestResult {
    // Open mode: authentication would refuse most of these before validation sees them
    // (tests/it/auth.rs covers that); here the validation itself is under test.
    let mut s = TestServer::start_open().await;
    s.vm_started("vm-ok", "p").await;
    let (_, _) = s
        .post(
            "/api/v1/vms/vm-ok/events",
            &json!({"type":"job_started","vm_id":"vm-ok","run_id":"1"}),
        )
        .await;
    let store = s.app().store().clone();
    let events_before = store.events_for_vm("vm-ok").await?;
    let vm_before = store.vm_get("vm-ok").await?;

    // Invalid vm ids, in every endpoint.
    for bad in [
        "..",
        "a..b",
        "-lead",
        "has%20space",
        "%2E%2E%2Fetc",
        "a%2Fb",
        &"x".repeat(129),
    ] {
        for (method, path) in [
            ("POST", format!("/api/v1/vms/{bad}/events")),
            ("POST", format!("/api/v1/vms/{bad}/heartbeat")),
            ("POST", format!("/api/v1/vms/{bad}/registration-token")),
            ("GET", format!("/api/v1/vms/{bad}/commands")),
            ("POST", format!("/api/v1/vms/{bad}/commands/c1/ack")),
        ] {
            let (status, body) = if method == "GET" {
                s.get(&path).await
            } else {
                let b = if path.ends_with("/ack") {
                    json!({"success":true})
                } else {
                    json!({"type":"vm_started"})
                };
                s.post(&path, &b).await
            };
            // Some (like "a%2Fb") do not match any route: 404 is right for them.
            assert!(
                status == 400 || status == 404,
                "{method} {path}: {status} {body}"
            );
            assert!(
                body["error"].is_string() && body["code"].is_string(),
                "{method} {path}: {body}"
            );
        }
    }

    // Malformed JSON (the sample answered 200).
    for raw in [
        "{bad",
        "",
        "[]",
        "\"x\"",
        "{\"type\": 5}",
        "{\"vm_id\":\"vm-ok\"}",
    ] {
        let (status, body) = s.post_raw("/api/v1/vms/vm-ok/events", raw.into()).await;
        assert_eq!(status, 400, "{raw:?}: {body}");
        assert_eq!(body["code"], "bad_request");
    }
    let (status, _) = s
        .post_raw("/api/v1/vms/vm-ok/heartbeat", "{nope".into())
        .await;
    assert_eq!(status, 400);
    let (status, _) = s
        .post_raw("/api/v1/vms/vm-ok/commands/x/ack", "{}".into())
        .await;
    assert_eq!(status, 400, "ack without success");
    // Bad field values.
    for body in [
        json!({"type":"../../x","vm_id":"vm-ok"}),
        json!({"type":"job_started","vm_id":"vm-other"}),
        json!({"type":"job_started","pool_id":"bad/pool"}),
        json!({"type":"job_started","event_id":"a b"}),
        json!({"type":"job_started","timestamp":"yesterday"}),
    ] {
        let (status, resp) = s.post("/api/v1/vms/vm-ok/events", &body).await;
        assert_eq!(status, 400, "{body}: {resp}");
    }

    // Too large.
    let big = format!(
        "{{\"type\":\"job_started\",\"pad\":\"{}\"}}",
        "a".repeat(1 << 20)
    );
    let (status, body) = s.post_raw("/api/v1/vms/vm-ok/events", big).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (413, Some("payload_too_large"))
    );

    // Wrong method, unknown path.
    let r = s
        .client
        .delete(format!("{}/api/v1/vms/vm-ok/events", s.base))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(
        r.json::<serde_json::Value>().await?["code"],
        "method_not_allowed"
    );
    let r = s
        .client
        .get(format!("{}/api/v1/vms/vm-ok/events", s.base))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 405);
    let (status, body) = s.get("/api/v1/nothing-here").await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let (status, _) = s.get("/api/v1/vms/vm-ok/events/extra/events").await;
    assert_eq!(status, 404, "extra segments are not tolerated");

    // Acknowledging a command that is not this VM's.
    s.vm_started("vm-two", "p").await;
    let theirs = s.poll("vm-two").await;
    let their_id = theirs[0]["id"].as_str().ok_or("id")?;
    let (status, _) = s
        .post(
            &format!("/api/v1/vms/vm-ok/commands/{their_id}/ack"),
            &json!({"success":false}),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(
        store.command_get(their_id).await?.map(|c| c.state.as_str()),
        Some("delivered")
    );

    // A heartbeat missing every optional part is accepted (the sample crashed).
    let (status, _) = s.post("/api/v1/vms/vm-ok/heartbeat", &json!({})).await;
    assert_eq!(status, 200);
    let (status, _) = s
        .post(
            "/api/v1/vms/vm-ok/heartbeat",
            &json!({"type":"job_heartbeat","vm_health":{},"current_job":{}}),
        )
        .await;
    assert_eq!(status, 200);

    // Nothing stored was lost or changed by the bad requests.
    assert_eq!(store.events_for_vm("vm-ok").await?, events_before);
    let vm_after = store.vm_get("vm-ok").await?.ok_or("vm")?;
    let vm_before = vm_before.ok_or("vm")?;
    assert_eq!(
        (vm_after.boot_seq, vm_after.state.clone()),
        (vm_before.boot_seq, vm_before.state.clone())
    );
    let ids: Vec<String> = store
        .vms_list()
        .await?
        .into_iter()
        .map(|v| v.vm_id)
        .collect();
    assert_eq!(ids, ["vm-ok", "vm-two"]);
    s.stop().await;
    Ok(())
}
