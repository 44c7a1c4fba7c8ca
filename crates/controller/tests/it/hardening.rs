//! Regression tests for the holes found by probing the controller as an attacker and as an
//! operator would: a VM's pool is fixed by its first proven identity on every transport,
//! heartbeats are bound like events, unknown paths are 404 before authentication, refused
//! admin writes are audited (bounded), and open mode only admits configured pools.

use super::common::*;
use miglet_proto::pb::{self, controller_message, mi_glet_message};
use serde_json::{Value, json};

const P_SECRET: &str = "secret-of-pool-p-0123456789";
const Q_SECRET: &str = "secret-of-pool-q-0123456789";

fn enroll_body(vm: &str, pool: &str, secret: &str) -> Value {
    json!({"vm_id": vm, "pool_id": pool, "method": "bootstrap", "bootstrap_secret": secret})
}

async fn enroll_ok(s: &TestServer, vm: &str, pool: &str, secret: &str) -> String {
    let (status, body) = enroll_raw(s, enroll_body(vm, pool, secret)).await;
    assert_eq!(status, 200, "enroll {vm} into {pool}: {body}");
    body["credential"]
        .as_str()
        .unwrap_or_else(|| panic!("no credential: {body}"))
        .to_owned()
}

async fn two_pools() -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let d = dir.path().to_owned();
    let s = TestServer::start_with(|st| pools(st, &d, "http://127.0.0.1:9/none")).await;
    (s, dir)
}

/// The next `ErrorNotification` on a stream (other messages are skipped).
async fn next_error(a: &mut GrpcAgent) -> pb::ErrorNotification {
    loop {
        match a.recv().await {
            Some(controller_message::Message::Error(e)) => return e,
            Some(_) => continue,
            None => panic!("stream ended while waiting for an error notice"),
        }
    }
}

/// Hole 1: with pool P's secret nobody may enroll as a VM of pool Q, before or after that
/// VM's first contact, and so cannot read Q's registration token.
#[tokio::test]
async fn another_pools_secret_cannot_enroll_as_a_vm_of_this_pool() -> TestResult {
    let (mut s, _dir) = two_pools().await;
    // vm-x belongs to pool q: it enrolls with q's secret and boots.
    let cred_q = enroll_ok(&s, "vm-x", "q", Q_SECRET).await;
    let (status, body, _) = request(
        &s,
        "POST",
        "/api/v1/vms/vm-x/events",
        Some(&cred_q),
        Some(json!({"type":"vm_started","vm_id":"vm-x","pool_id":"q","org_id":"org-001"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Pool p's secret holder tries to enroll as vm-x: refused, and nothing moves.
    let (status, body) = enroll_raw(&s, enroll_body("vm-x", "p", P_SECRET)).await;
    assert_eq!(status, 403, "P's secret must not enroll a VM of Q: {body}");
    assert_eq!(body["code"], "permission_denied");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("\"q\""),
        "the refusal names the VM's pool: {body}"
    );
    let vm = s.app().store().vm_get("vm-x").await?.ok_or("vm-x")?;
    assert_eq!(vm.pool_id, "q");
    // The pool is fixed by the first proven identity even before the VM's first contact.
    enroll_ok(&s, "vm-y", "q", Q_SECRET).await;
    let (status, body) = enroll_raw(&s, enroll_body("vm-y", "p", P_SECRET)).await;
    assert_eq!(status, 403, "{body}");
    // Enrolling again into the VM's own pool still works (a rebooted VM re-enrolls).
    enroll_ok(&s, "vm-x", "q", Q_SECRET).await;
    enroll_ok(&s, "vm-y", "q", Q_SECRET).await;
    // The refusals are on the VM's controller log.
    let log = s.app().store().vm_log_for_vm("vm-x").await?;
    assert!(
        log.iter().any(|l| l.kind == "enrollment_refused"
            && l.detail.as_deref().unwrap_or_default().contains("pool=p")),
        "{log:?}"
    );
    s.stop().await;
    Ok(())
}

/// Hole 1, the other half: a credential whose pool is not the VM's stored pool (here: one
/// from before an operator moved the VM) acts on no endpoint and opens no stream; the move
/// is audited, and the VM enrolls into its new pool.
#[tokio::test]
async fn a_credential_for_another_pool_is_refused_everywhere() -> TestResult {
    let (mut s, _dir) = two_pools().await;
    let admin = s.admin_token();
    let cred_q = enroll_ok(&s, "vm-m", "q", Q_SECRET).await;
    let (status, body, _) = request(
        &s,
        "POST",
        "/api/v1/vms/vm-m/events",
        Some(&cred_q),
        Some(json!({"type":"vm_started","vm_id":"vm-m","pool_id":"q","org_id":"org-001"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // The operator moves the VM to pool p (a read-only token may not).
    let (status, body, _) = request(
        &s,
        "POST",
        "/api/v1/admin/vms/vm-m/pool",
        Some(&admin),
        Some(json!({"pool_id": "nope-pool", "reason": "typo"})),
    )
    .await;
    assert_eq!(status, 400, "moving into an unconfigured pool: {body}");
    let (status, body, _) = request(
        &s,
        "POST",
        "/api/v1/admin/vms/vm-m/pool",
        Some(&admin),
        Some(json!({"pool_id": "p", "reason": "rebalance"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["vm"]["pool_id"], "p");
    // The stale credential (pool q) is refused on every agent endpoint ...
    for (method, path, body) in [
        (
            "POST",
            "/api/v1/vms/vm-m/events",
            Some(json!({"type":"runner_registered","vm_id":"vm-m"})),
        ),
        (
            "POST",
            "/api/v1/vms/vm-m/heartbeat",
            Some(json!({"type":"job_heartbeat","vm_id":"vm-m"})),
        ),
        (
            "POST",
            "/api/v1/vms/vm-m/registration-token",
            Some(json!({})),
        ),
        ("GET", "/api/v1/vms/vm-m/commands", None),
        (
            "POST",
            "/api/v1/vms/vm-m/commands/c-1/ack",
            Some(json!({"success": true})),
        ),
        ("POST", "/api/v1/vms/vm-m/credential", None),
    ] {
        let (status, resp, _) = request(&s, method, path, Some(&cred_q), body).await;
        assert_eq!(status, 403, "{method} {path} with a stale pool: {resp}");
        assert_eq!(resp["code"], "permission_denied", "{resp}");
        assert!(
            !resp.to_string().contains(TOKEN),
            "no registration token in a refusal: {resp}"
        );
    }
    // ... and on the stream.
    let res = GrpcAgent::open_with(&s.grpc, connect_msg("vm-m", "q", ""), Some(&cred_q)).await;
    assert_eq!(refusal_code(res).await?, tonic::Code::PermissionDenied);
    let res = GrpcAgent::open_with(&s.grpc, connect_msg("vm-m", "", ""), Some(&cred_q)).await;
    assert_eq!(refusal_code(res).await?, tonic::Code::PermissionDenied);
    let vm = s.app().store().vm_get("vm-m").await?.ok_or("vm-m")?;
    assert_eq!(vm.pool_id, "p", "nothing moved the VM back");
    // The move is audited, with who, what and why.
    let (_, audit, _) = request(&s, "GET", "/api/v1/admin/audit", Some(&admin), None).await;
    let entry = audit["entries"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["action"] == "vm.move_pool"))
        .ok_or(format!("no move in the audit log: {audit}"))?;
    assert_eq!(entry["outcome"], "ok");
    assert_eq!(entry["target"], "vm:vm-m");
    let detail = entry["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("from=q") && detail.contains("to=p") && detail.contains("rebalance"),
        "{detail}"
    );
    // In its new pool the VM enrolls with p's proof, and q's proof no longer works for it.
    let (status, body) = enroll_raw(&s, enroll_body("vm-m", "q", Q_SECRET)).await;
    assert_eq!(status, 403, "{body}");
    let cred_p = enroll_ok(&s, "vm-m", "p", P_SECRET).await;
    let (status, body, _) =
        request(&s, "GET", "/api/v1/vms/vm-m/commands", Some(&cred_p), None).await;
    assert_eq!(status, 200, "{body}");
    s.stop().await;
    Ok(())
}

/// Hole 2: heartbeats are bound to the credential exactly like events; a refused heartbeat
/// creates nothing, so no attacker-named pool reaches the pool list or the metrics.
#[tokio::test]
async fn heartbeats_are_bound_to_the_credentials_vm_pool_and_org() -> TestResult {
    let mut s = TestServer::start_with(|st| {
        st.metrics_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
    })
    .await;
    let admin = s.admin_token();
    let cred = s.enroll("vm-h", "pool-001").await;
    let hb = |pool: &str, org: &str| json!({"type":"job_heartbeat","vm_id":"vm-h","pool_id":pool,"org_id":org,"miglet_state":"idle"});
    // First contact naming another pool: refused, nothing created.
    let (status, body, _) = request(
        &s,
        "POST",
        "/api/v1/vms/vm-h/heartbeat",
        Some(&cred),
        Some(hb("attacker-pool", "org-001")),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "permission_denied");
    assert!(s.app().store().vm_get("vm-h").await?.is_none());
    // Its own pool: stored.
    let (status, body, _) = request(
        &s,
        "POST",
        "/api/v1/vms/vm-h/heartbeat",
        Some(&cred),
        Some(hb("pool-001", "org-001")),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // Once known, another pool or another org is refused and not stored.
    for (pool, org) in [("attacker-pool", "org-001"), ("pool-001", "attacker-org")] {
        let (status, body, _) = request(
            &s,
            "POST",
            "/api/v1/vms/vm-h/heartbeat",
            Some(&cred),
            Some(hb(pool, org)),
        )
        .await;
        assert_eq!(status, 403, "pool {pool} org {org}: {body}");
    }
    assert_eq!(s.app().store().heartbeats_for_vm("vm-h").await?.len(), 1);
    // Events naming another org are refused too.
    let (status, body, _) = request(
        &s,
        "POST",
        "/api/v1/vms/vm-h/events",
        Some(&cred),
        Some(json!({"type":"runner_registered","vm_id":"vm-h","org_id":"attacker-org"})),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    // A heartbeat on the stream naming another VM or pool is refused, not stored under the
    // stream's VM; one naming nothing is the stream's.
    let mut a = s.grpc_connect("vm-s", "pool-001", "").await;
    for (vm, pool) in [("vm-other", ""), ("", "attacker-pool")] {
        a.send(mi_glet_message::Message::Heartbeat(pb::Heartbeat {
            vm_id: vm.into(),
            pool_id: pool.into(),
            miglet_state: "idle".into(),
            ..Default::default()
        }))
        .await;
        let notice = next_error(&mut a).await;
        assert_eq!(notice.code, "permission_denied", "{notice:?}");
    }
    a.send(mi_glet_message::Message::Heartbeat(pb::Heartbeat {
        miglet_state: "idle".into(),
        ..Default::default()
    }))
    .await;
    let store = s.app().store().clone();
    wait_until("the stream's own heartbeat", || {
        let store = store.clone();
        async move {
            store
                .heartbeats_for_vm("vm-s")
                .await
                .is_ok_and(|h| h.len() == 1)
        }
    })
    .await;
    assert!(s.app().store().vm_get("vm-other").await?.is_none());
    // No attacker-named pool anywhere an operator looks.
    let (_, pools, _) = request(&s, "GET", "/api/v1/admin/pools", Some(&admin), None).await;
    assert!(!pools.to_string().contains("attacker"), "{pools}");
    let metrics_addr = s
        .server
        .as_ref()
        .and_then(|r| r.metrics_addr)
        .ok_or("metrics")?;
    let text = s
        .client
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(text.contains("pool-001"), "metrics name the real pool");
    assert!(!text.contains("attacker"), "{text}");
    s.stop().await;
    Ok(())
}

/// Hole 2, open mode: nobody proves anything, so a pool on first contact must be one the
/// configuration serves; otherwise anyone could add pools (and metric labels) at will.
#[tokio::test]
async fn open_mode_admits_only_configured_pools() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_owned();
    let mut s = TestServer::start_with(|st| {
        pools(st, &d, "http://127.0.0.1:9/none");
        st.auth_mode = mig_controller::auth::AuthMode::Open;
    })
    .await;
    for (path, body) in [
        (
            "/api/v1/vms/vm-o1/events",
            json!({"type":"vm_started","vm_id":"vm-o1","pool_id":"made-up","org_id":"o"}),
        ),
        (
            "/api/v1/vms/vm-o2/heartbeat",
            json!({"type":"job_heartbeat","vm_id":"vm-o2","pool_id":"made-up"}),
        ),
        (
            "/api/v1/vms/vm-o3/heartbeat",
            json!({"type":"job_heartbeat","vm_id":"vm-o3"}),
        ),
    ] {
        let (status, resp) = s.post(path, &body).await;
        assert_eq!(status, 403, "{path} {body}: {resp}");
        assert!(
            resp["error"]
                .as_str()
                .unwrap_or_default()
                .contains("not configured"),
            "{resp}"
        );
    }
    let res = s.grpc_open(connect_msg("vm-o4", "made-up", "")).await;
    assert_eq!(refusal_code(res).await?, tonic::Code::PermissionDenied);
    for vm in ["vm-o1", "vm-o2", "vm-o3", "vm-o4"] {
        assert!(s.app().store().vm_get(vm).await?.is_none(), "{vm}");
    }
    // A configured pool works as the base contract says.
    let ack = s.vm_started("vm-o5", "p").await;
    assert_eq!(ack["acknowledged"], true);
    assert_eq!(s.poll("vm-o5").await.len(), 1);
    s.stop().await;
    Ok(())
}

/// Hole 8: an unknown path is 404 whether or not a credential came with it.
#[tokio::test]
async fn unknown_paths_are_404_without_a_credential() -> TestResult {
    let mut s = TestServer::start().await;
    for path in ["/nope", "/api/v1/nope", "/api/v2/vms"] {
        let (status, body, _) = request(&s, "GET", path, None, None).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["code"], "not_found");
    }
    s.stop().await;
    Ok(())
}

/// Hole 5: admin writes refused for a missing, wrong or revoked token are audited, and a
/// flood of anonymous refusals cannot flood the audit log.
#[tokio::test]
async fn refused_admin_writes_without_a_valid_token_are_audited_and_bounded() -> TestResult {
    let mut s = TestServer::start_with(|st| {
        st.reconcile_interval = std::time::Duration::from_millis(200);
    })
    .await;
    s.vm_started("vm-au", "pool-001").await;
    let admin = s.admin_token();
    let path = "/api/v1/admin/vms/vm-au/commands";
    let drain = json!({"type":"drain","parameters":{"reason":"x"}});
    let (status, _, _) = request(&s, "POST", path, None, Some(drain.clone())).await;
    assert_eq!(status, 401);
    let (status, _, _) = request(
        &s,
        "POST",
        path,
        Some("migop_nosuchid_secret"),
        Some(drain.clone()),
    )
    .await;
    assert_eq!(status, 401);
    // A revoked token.
    let now = chrono::Utc::now().timestamp_millis();
    let minted = mig_controller::auth::operator::mint(
        "leaver",
        mig_controller::auth::Role::Admin,
        "test",
        now,
        None,
    )?;
    s.app()
        .store()
        .write(vec![
            mig_controller::store::Mutation::InsertOperatorToken(minted.record.clone()),
            mig_controller::store::Mutation::RevokeOperatorToken {
                id: minted.record.id.clone(),
                at: now,
            },
        ])
        .await?;
    let (status, _, _) = request(&s, "POST", path, Some(&minted.token), Some(drain.clone())).await;
    assert_eq!(status, 401);
    let entries =
        |audit: &Value| -> Vec<Value> { audit["entries"].as_array().cloned().unwrap_or_default() };
    let (_, audit, _) = request(
        &s,
        "GET",
        "/api/v1/admin/audit?limit=100",
        Some(&admin),
        None,
    )
    .await;
    let refused: Vec<Value> = entries(&audit)
        .into_iter()
        .filter(|e| e["outcome"].as_str().unwrap_or_default() == "unauthenticated")
        .collect();
    assert_eq!(refused.len(), 3, "{audit}");
    assert!(
        refused
            .iter()
            .all(|e| e["action"] == format!("POST {path}"))
    );
    assert!(
        refused
            .iter()
            .any(|e| e["actor"] == format!("unverified token {}", minted.record.id)),
        "a revoked token is named by its id: {refused:?}"
    );
    assert!(refused.iter().any(|e| e["actor"] == "anonymous"));
    assert!(
        !audit.to_string().contains(&minted.token),
        "never the secret"
    );
    // A flood of anonymous refusals writes a bounded number of rows and says what it dropped.
    let mut statuses = std::collections::BTreeSet::new();
    for _ in 0..300 {
        let (status, _, _) = request(&s, "POST", path, None, Some(drain.clone())).await;
        statuses.insert(status);
    }
    assert_eq!(statuses, [401].into());
    let rows = s.app().store().audit_list(None, 1000).await?;
    let anonymous = rows
        .iter()
        .filter(|r| r.outcome == "unauthenticated")
        .count();
    assert!(
        (4..=60).contains(&anonymous),
        "{anonymous} rows for 303 refusals"
    );
    // What was not recorded is summed up in one row by the next reconciler pass.
    let store = s.app().store().clone();
    wait_until("a summary of the refusals not recorded", || {
        let store = store.clone();
        async move {
            store.audit_list(None, 20).await.is_ok_and(|rows| {
                rows.iter().any(|r| {
                    r.action == "audit.suppressed"
                        && r.detail
                            .as_deref()
                            .unwrap_or_default()
                            .contains("refusals not recorded")
                })
            })
        }
    })
    .await;
    s.stop().await;
    Ok(())
}

/// The tighter options: a pool's bootstrap secret confined to the pool's VM id prefix, and
/// one-time enrollment tokens that prove one VM.
#[tokio::test]
async fn enrollment_tokens_prove_one_vm_once_and_prefixes_confine_secrets() -> TestResult {
    let (mut s, _dir) = two_pools().await;
    let admin = s.admin_token();
    const T_SECRET: &str = "secret-of-pool-t-0123456789";
    // Pool t's secret enrolls only ids starting with "t-".
    enroll_ok(&s, "t-1", "t", T_SECRET).await;
    let (status, body) = enroll_raw(&s, enroll_body("x-1", "t", T_SECRET)).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("\"t-\""),
        "{body}"
    );
    // An operator mints a token for t-9.
    let mint = |vm: &str, pool: &str| json!({"vm_id": vm, "pool_id": pool, "ttl_secs": 600});
    let (status, minted, _) = request(
        &s,
        "POST",
        "/api/v1/admin/enrollment-tokens",
        Some(&admin),
        Some(mint("t-9", "t")),
    )
    .await;
    assert_eq!(status, 201, "{minted}");
    let token = minted["token"].as_str().ok_or("token")?.to_owned();
    assert!(token.starts_with("migenr_"));
    // A pool that does not accept tokens gets none.
    let (status, body, _) = request(
        &s,
        "POST",
        "/api/v1/admin/enrollment-tokens",
        Some(&admin),
        Some(mint("p-1", "p")),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let by_token = |vm: &str, pool: &str, t: &str| json!({"vm_id": vm, "pool_id": pool, "method": "token", "enrollment_token": t});
    // Not for another VM, nor into another pool ...
    let (status, body) = enroll_raw(&s, by_token("t-8", "t", &token)).await;
    assert_eq!(status, 401, "{body}");
    // ... once for its own VM ...
    let (status, body) = enroll_raw(&s, by_token("t-9", "t", &token)).await;
    assert_eq!(status, 200, "{body}");
    let cred = body["credential"].as_str().ok_or("credential")?.to_owned();
    let (status, _, _) = request(&s, "GET", "/api/v1/vms/t-9/commands", Some(&cred), None).await;
    assert_eq!(status, 200);
    // ... and never again.
    let (status, body) = enroll_raw(&s, by_token("t-9", "t", &token)).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("already used"),
        "{body}"
    );
    // A forged secret with a real id is refused too.
    let (id, _) = token
        .trim_start_matches("migenr_")
        .split_once('_')
        .ok_or("shape")?;
    let forged = format!("migenr_{id}_{}", "A".repeat(43));
    let (status, _) = enroll_raw(&s, by_token("t-9", "t", &forged)).await;
    assert_eq!(status, 401);
    // Minting is audited without the token; the store holds only its hash.
    let (_, audit, _) = request(&s, "GET", "/api/v1/admin/audit", Some(&admin), None).await;
    assert!(audit.to_string().contains("enrollment_token.create"));
    assert!(!audit.to_string().contains(&token));
    for (path, text) in all_bytes_under(&s.data_dir) {
        assert!(!text.contains(&token), "{}", path.display());
    }
    s.stop().await;
    Ok(())
}

/// Hole 8: an unparsable cursor is a 400; event and VM search match values, never keys or
/// JSON punctuation; an unknown event type is accepted, stored typed as `unknown`, counted,
/// and changes no state.
#[tokio::test]
async fn cursors_search_and_unknown_event_types() -> TestResult {
    let mut s = TestServer::start_with(|st| {
        st.metrics_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
    })
    .await;
    let admin = s.admin_token();
    s.vm_started("vm-q1", "pool-001").await;
    let (status, body) = s
        .post(
            "/api/v1/vms/vm-q1/events",
            &json!({"type":"job_started","vm_id":"vm-q1","repository":"acme/app","run_id":"42"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for cursor in ["..%2Fx", "a%20b", "%25"] {
        let (status, body, _) = request(
            &s,
            "GET",
            &format!("/api/v1/admin/vms?cursor={cursor}"),
            Some(&admin),
            None,
        )
        .await;
        assert_eq!(status, 400, "cursor {cursor}: {body}");
    }
    let search = |q: &str| format!("/api/v1/admin/events?q={q}");
    let count = |v: &Value| v["events"].as_array().map_or(0, Vec::len);
    // `_` and `"` appear in every stored document's keys and quoting; no value has them.
    for q in ["_", "%22", "repository", "event_type", "%7B"] {
        let (status, body, _) = request(&s, "GET", &search(q), Some(&admin), None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(count(&body), 0, "q={q} matched: {body}");
    }
    let (_, body, _) = request(&s, "GET", &search("acme%2Fapp"), Some(&admin), None).await;
    assert_eq!(count(&body), 1, "{body}");
    let (_, body, _) = request(&s, "GET", &search("42"), Some(&admin), None).await;
    assert_eq!(count(&body), 1, "{body}");
    // The VM list's text search matches the current job's values, not its keys.
    let (_, body, _) = request(&s, "GET", "/api/v1/admin/vms?q=run_id", Some(&admin), None).await;
    assert_eq!(body["vms"].as_array().map(Vec::len), Some(0), "{body}");
    let (_, body, _) = request(&s, "GET", "/api/v1/admin/vms?q=acme", Some(&admin), None).await;
    assert_eq!(body["vms"].as_array().map(Vec::len), Some(1), "{body}");
    // An unknown event type: accepted, stored as `unknown` with its name kept, no state change.
    let before = s.app().store().vm_get("vm-q1").await?.ok_or("vm")?;
    let (status, body) = s
        .post(
            "/api/v1/vms/vm-q1/events",
            &json!({"type":"vm_exploded","vm_id":"vm-q1","event_id":"u-1"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let events = s.app().store().events_for_vm("vm-q1").await?;
    let stored = events.last().ok_or("event")?;
    assert_eq!(stored.event_type, "unknown");
    assert!(stored.data.contains("vm_exploded"), "{}", stored.data);
    let after = s.app().store().vm_get("vm-q1").await?.ok_or("vm")?;
    assert_eq!(
        (&after.state, &after.current_job, after.boot_seq),
        (&before.state, &before.current_job, before.boot_seq)
    );
    let (_, body, _) = request(
        &s,
        "GET",
        "/api/v1/admin/events?type=unknown",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(count(&body), 1, "{body}");
    let metrics_addr = s
        .server
        .as_ref()
        .and_then(|r| r.metrics_addr)
        .ok_or("metrics")?;
    let text = s
        .client
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        text.contains("mig_events_ingested_total{type=\"unknown\"} 1"),
        "{text}"
    );
    assert!(!text.contains("vm_exploded"));
    s.stop().await;
    Ok(())
}
