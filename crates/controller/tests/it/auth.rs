//! Authentication and authorization on every endpoint and on the gRPC stream; enrollment by
//! bootstrap secret and by GCE identity token (against a local Google key server); operator
//! roles and the audit log; rate limits and header timeouts.

use super::common::*;
use miglet_sim::google::{FakeGoogle, Instance};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn vm_endpoints(vm: &str) -> Vec<(&'static str, String, Option<Value>)> {
    vec![
        (
            "POST",
            format!("/api/v1/vms/{vm}/events"),
            Some(json!({"type":"vm_started","vm_id":vm,"pool_id":"p"})),
        ),
        (
            "POST",
            format!("/api/v1/vms/{vm}/heartbeat"),
            Some(json!({"type":"job_heartbeat","vm_id":vm})),
        ),
        (
            "POST",
            format!("/api/v1/vms/{vm}/registration-token"),
            Some(json!({})),
        ),
        ("GET", format!("/api/v1/vms/{vm}/commands"), None),
        (
            "POST",
            format!("/api/v1/vms/{vm}/commands/c-1/ack"),
            Some(json!({"success":true})),
        ),
        ("POST", format!("/api/v1/vms/{vm}/credential"), None),
    ]
}

#[tokio::test]
async fn every_endpoint_needs_the_right_vm_credential() -> TestResult {
    let mut s = TestServer::start().await;
    let cred_a = s.enroll("vm-a", "p").await;
    let cred_b = s.enroll("vm-b", "p").await;
    let admin = s.admin_token();
    for (method, path, body) in vm_endpoints("vm-b") {
        let (status, resp, headers) = request(&s, method, &path, None, body.clone()).await;
        assert_eq!(status, 401, "{method} {path} without credential: {resp}");
        assert_eq!(resp["code"], "unauthenticated");
        assert!(headers.contains_key("www-authenticate"));
        let (status, resp, _) =
            request(&s, method, &path, Some("migvm1.bogus.sig"), body.clone()).await;
        assert_eq!(status, 401, "{method} {path} with garbage: {resp}");
        let (status, resp, _) = request(&s, method, &path, Some(&cred_a), body.clone()).await;
        assert_eq!(
            status, 403,
            "{method} {path} with VM A's credential: {resp}"
        );
        assert_eq!(resp["code"], "permission_denied");
        let (status, resp, _) = request(&s, method, &path, Some(&admin), body.clone()).await;
        assert_eq!(
            status, 403,
            "{method} {path} with an operator token: {resp}"
        );
    }
    // The owner gets through (vm_started first, so the others have a VM to talk about).
    for (method, path, body) in vm_endpoints("vm-b") {
        let (status, resp, _) = request(&s, method, &path, Some(&cred_b), body).await;
        assert!(
            status == 200 || (path.ends_with("/ack") && status == 404),
            "{method} {path} as its owner: {status} {resp}"
        );
    }
    // A tampered credential (claims for vm-b pasted on vm-a's signature) is refused.
    let (head_a, sig_a) = cred_a.rsplit_once('.').ok_or("credential shape")?;
    let (head_b, _) = cred_b.rsplit_once('.').ok_or("credential shape")?;
    assert_ne!(head_a, head_b);
    let forged = format!("{head_b}.{sig_a}");
    let (status, _, _) = request(&s, "GET", "/api/v1/vms/vm-b/commands", Some(&forged), None).await;
    assert_eq!(status, 401);
    // A credential is bound to its pool too.
    let (status, resp, _) = request(
        &s,
        "POST",
        "/api/v1/vms/vm-b/events",
        Some(&cred_b),
        Some(json!({"type":"vm_started","vm_id":"vm-b","pool_id":"other-pool"})),
    )
    .await;
    assert_eq!(status, 403, "{resp}");
    // Refresh hands out a new credential for the same VM and pool.
    let (status, fresh, _) = request(
        &s,
        "POST",
        "/api/v1/vms/vm-b/credential",
        Some(&cred_b),
        None,
    )
    .await;
    assert_eq!(status, 200, "{fresh}");
    assert_eq!(
        (fresh["vm_id"].as_str(), fresh["pool_id"].as_str()),
        (Some("vm-b"), Some("p"))
    );
    let fresh = fresh["credential"].as_str().ok_or("credential")?;
    assert_ne!(fresh, cred_b);
    let (status, _, _) = request(&s, "GET", "/api/v1/vms/vm-b/commands", Some(fresh), None).await;
    assert_eq!(status, 200);
    // Health is public and says how the controller runs.
    let (status, health, _) = request(&s, "GET", "/health", None, None).await;
    assert_eq!(
        (status, health["auth_mode"].as_str()),
        (200, Some("authenticated"))
    );
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn expired_credentials_are_refused() -> TestResult {
    let mut s =
        TestServer::start_with(|st| st.enroll.credential_ttl = Duration::from_secs(60)).await;
    let cred = s.enroll("vm-e", "p").await;
    let (status, _, _) = request(&s, "GET", "/api/v1/vms/vm-e/commands", Some(&cred), None).await;
    assert_eq!(status, 200);
    // The controller's clock moves past the lifetime; a loaded machine's own pauses cannot.
    s.app().clock().advance(Duration::from_secs(61));
    let (status, body, _) =
        request(&s, "GET", "/api/v1/vms/vm-e/commands", Some(&cred), None).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("expired"),
        "{body}"
    );
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn grpc_stream_needs_the_right_vm_credential() -> TestResult {
    let mut s = TestServer::start().await;
    let cred_a = s.enroll("vm-ga", "pool-001").await;
    for (cred, code) in [
        (None, tonic::Code::Unauthenticated),
        (Some("migvm1.x.y"), tonic::Code::Unauthenticated),
        (Some(cred_a.as_str()), tonic::Code::PermissionDenied),
    ] {
        let res = GrpcAgent::open_with(&s.grpc, connect_msg("vm-gb", "pool-001", ""), cred).await;
        let got = refusal_code(res).await?;
        assert_eq!(got, code, "credential {cred:?}");
    }
    // A's credential naming another pool is refused as well.
    let res = GrpcAgent::open_with(&s.grpc, connect_msg("vm-ga", "other", ""), Some(&cred_a)).await;
    let got = refusal_code(res).await?;
    assert_eq!(got, tonic::Code::PermissionDenied);
    assert!(s.app().store().vm_get("vm-gb").await?.is_none());
    // The owner connects.
    let mut a = GrpcAgent::connect_with(&s.grpc, "vm-ga", "pool-001", "", Some(&cred_a)).await;
    let reg = a.recv_command().await;
    assert_eq!(reg.r#type, "register_runner");
    // Events on the stream are bound to the credential's pool too.
    let before = s.app().store().events_for_vm("vm-ga").await?.len();
    a.send(miglet_proto::pb::mi_glet_message::Message::Event(
        miglet_proto::pb::EventNotification {
            r#type: "runner_registered".into(),
            vm_id: "vm-ga".into(),
            pool_id: "other".into(),
            ..Default::default()
        },
    ))
    .await;
    let refused = loop {
        match a.recv().await {
            Some(miglet_proto::pb::controller_message::Message::Error(e)) => break e,
            Some(_) => continue,
            None => return Err("stream ended".into()),
        }
    };
    assert_eq!(refused.code, "permission_denied", "{refused:?}");
    assert_eq!(s.app().store().events_for_vm("vm-ga").await?.len(), before);
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn bootstrap_secrets_enroll_only_into_their_pool() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_owned();
    let mut s = TestServer::start_with(|st| pools(st, &d, "http://127.0.0.1:9/none")).await;
    let enroll = |pool: &str, secret: &str| json!({"vm_id":"vm-1","pool_id":pool,"method":"bootstrap","bootstrap_secret":secret});
    let (status, body) = enroll_raw(&s, enroll("p", "secret-of-pool-p-0123456789")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["pool_id"], "p");
    let (status, body) = enroll_raw(&s, enroll("q", "secret-of-pool-p-0123456789")).await;
    assert_eq!(status, 401, "P's secret must not enroll into Q: {body}");
    let (status, body) = enroll_raw(&s, enroll("p", "wrong-secret-0123456789")).await;
    assert_eq!(status, 401, "{body}");
    assert!(!body.to_string().contains("secret-of-pool"), "{body}");
    let (status, _) = enroll_raw(&s, enroll("g", "secret-of-pool-p-0123456789")).await;
    assert_eq!(status, 401, "a GCE-only pool takes no secrets");
    let (status, _) = enroll_raw(&s, enroll("unknown", "secret-of-pool-p-0123456789")).await;
    assert_eq!(status, 401);
    let (status, body) = enroll_raw(
        &s,
        json!({"vm_id":"../x","pool_id":"p","method":"bootstrap","bootstrap_secret":"x"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = enroll_raw(
        &s,
        json!({"vm_id":"vm-1","pool_id":"p","method":"bootstrap"}),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = enroll_raw(
        &s,
        json!({"vm_id":"vm-1","pool_id":"p","method":"telepathy"}),
    )
    .await;
    assert_eq!(status, 400);
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn gce_identity_tokens_are_verified_bound_and_used_once() -> TestResult {
    let google = FakeGoogle::new();
    google.publish(&[0]);
    let jwks = format!("{}/oauth2/v3/certs", serve(google.router()).await);
    let dir = tempfile::tempdir()?;
    let d = dir.path().to_owned();
    let mut s = TestServer::start_with(|st| pools(st, &d, &jwks)).await;
    let vm = Instance::new("acme-ci", "us-central1-a", "gce-abcd");
    let enroll = |token: &str, vm_id: &str| json!({"vm_id":vm_id,"pool_id":"g","method":"gce","identity_token":token});
    let good = google.identity_token(&vm, AUDIENCE)?;
    let (status, body) = enroll_raw(&s, enroll(&good, "gce-abcd")).await;
    assert_eq!(status, 200, "{body}");
    let cred = body["credential"].as_str().ok_or("credential")?.to_owned();
    // Replay: the same token again, even for the same VM.
    let (status, body) = enroll_raw(&s, enroll(&good, "gce-abcd")).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("already used"),
        "{body}"
    );

    let mut cases: Vec<(&str, String, &str)> = Vec::new();
    let mut claims = FakeGoogle::claims(&vm, AUDIENCE);
    claims["exp"] = json!(chrono::Utc::now().timestamp() - 120);
    claims["iat"] = json!(chrono::Utc::now().timestamp() - 3720);
    cases.push(("expired", google.sign(&claims)?, "gce-abcd"));
    let mut claims = FakeGoogle::claims(&vm, AUDIENCE);
    claims["iat"] = json!(chrono::Utc::now().timestamp() - 1200);
    cases.push(("issued too long ago", google.sign(&claims)?, "gce-abcd"));
    cases.push((
        "wrong audience",
        google.identity_token(&vm, "https://other.example")?,
        "gce-abcd",
    ));
    cases.push((
        "wrong project",
        google.identity_token(
            &Instance::new("evil-proj", "us-central1-a", "gce-abcd"),
            AUDIENCE,
        )?,
        "gce-abcd",
    ));
    cases.push((
        "wrong zone",
        google.identity_token(
            &Instance::new("acme-ci", "europe-west1-b", "gce-abcd"),
            AUDIENCE,
        )?,
        "gce-abcd",
    ));
    cases.push((
        "another instance's token",
        google.identity_token(&vm, AUDIENCE)?,
        "gce-other",
    ));
    let fresh = google.identity_token(&vm, AUDIENCE)?;
    let mut parts: Vec<String> = fresh.split('.').map(str::to_owned).collect();
    // Tampered: the payload of a token for another project under this signature.
    let other = google.identity_token(
        &Instance::new("acme-ci", "us-central1-a", "gce-zzzz"),
        AUDIENCE,
    )?;
    parts[1] = other.split('.').nth(1).unwrap_or_default().to_owned();
    cases.push(("tampered", parts.join("."), "gce-zzzz"));
    let mut standard = FakeGoogle::claims(&vm, AUDIENCE);
    if let Some(o) = standard.as_object_mut() {
        o.remove("google");
    }
    cases.push(("standard format", google.sign(&standard)?, "gce-abcd"));
    let mut wrong_iss = FakeGoogle::claims(&vm, AUDIENCE);
    wrong_iss["iss"] = json!("https://evil.example");
    cases.push(("wrong issuer", google.sign(&wrong_iss)?, "gce-abcd"));
    google.sign_with(1);
    cases.push((
        "unpublished key",
        google.identity_token(&vm, AUDIENCE)?,
        "gce-abcd",
    ));
    google.sign_with(0);
    cases.push(("not a JWT", "not-a-jwt".into(), "gce-abcd"));
    for (what, token, vm_id) in cases {
        let (status, body) = enroll_raw(&s, enroll(&token, vm_id)).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert!(!body.to_string().contains(&token), "{what}: token echoed");
    }
    // Key rotation: once Google publishes the new key, its tokens verify (after the refetch
    // pause for unknown keys).
    google.publish(&[0, 1]);
    google.sign_with(1);
    s.app()
        .clock()
        .advance(mig_controller::auth::gce::MIN_REFETCH + Duration::from_millis(100));
    let (status, body) = enroll_raw(
        &s,
        enroll(&google.identity_token(&vm, AUDIENCE)?, "gce-abcd"),
    )
    .await;
    assert_eq!(status, 200, "rotated key: {body}");
    // The credential from the GCE enrollment works for its VM.
    let (status, _, _) = request(
        &s,
        "GET",
        "/api/v1/vms/gce-abcd/commands",
        Some(&cred),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let log = s.app().store().vm_log_for_vm("gce-abcd").await?;
    assert!(log.iter().any(|l| {
        l.kind == "enrolled"
            && l.detail
                .as_deref()
                .unwrap_or_default()
                .contains("method=gce")
    }));
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn operator_roles_and_the_audit_log() -> TestResult {
    let mut s = TestServer::start().await;
    s.vm_started("vm-op", "pool-001").await;
    let admin = s.admin_token();
    let store = s.app().store().clone();
    let now = chrono::Utc::now().timestamp_millis();
    let ro = mig_controller::auth::operator::mint(
        "viewer",
        mig_controller::auth::Role::ReadOnly,
        "test",
        now,
        None,
    )?;
    store
        .write(vec![mig_controller::store::Mutation::InsertOperatorToken(
            ro.record.clone(),
        )])
        .await?;
    let drain = json!({"type":"drain","parameters":{"reason":"test","timeout_seconds":60}});
    let path = "/api/v1/admin/vms/vm-op/commands";
    // Every operator route: no token 401, a VM credential 403.
    let vm_cred = s.credential("vm-op", None).await.ok_or("vm credential")?;
    // (The last column: what a read-only token's GET of the same path gets.)
    for (method, route, body, read_only_get) in [
        ("GET", "/api/v1/admin/whoami", None, 200),
        ("GET", "/api/v1/admin/vms", None, 200),
        ("GET", "/api/v1/admin/vms/vm-op", None, 200),
        (
            "POST",
            "/api/v1/admin/vms/vm-op/commands",
            Some(drain.clone()),
            405,
        ),
        ("GET", "/api/v1/admin/commands/c-1", None, 404),
        ("GET", "/api/v1/admin/audit", None, 200),
    ] {
        let (status, _, _) = request(&s, method, route, None, body.clone()).await;
        assert_eq!(status, 401, "{method} {route} without a token");
        let (status, _, _) = request(&s, method, route, Some(&vm_cred), body.clone()).await;
        assert_eq!(status, 403, "{method} {route} with a VM credential");
        let (status, body, _) = request(&s, "GET", route, Some(&ro.token), None).await;
        assert_eq!(
            status, read_only_get,
            "GET {route} with a read-only token: {body}"
        );
    }
    let (status, who, _) = request(&s, "GET", "/api/v1/admin/whoami", Some(&ro.token), None).await;
    assert_eq!(status, 200);
    assert_eq!(
        (who["name"].as_str(), who["role"].as_str()),
        (Some("viewer"), Some("read-only"))
    );
    // No token, a VM credential, a wrong secret: 401 / 403.
    let (status, _, _) = request(&s, "GET", "/api/v1/admin/vms", None, None).await;
    assert_eq!(status, 401);
    let (status, _, _) = request(&s, "GET", "/api/v1/admin/vms", Some(&vm_cred), None).await;
    assert_eq!(status, 403);
    let wrong = format!("{}x", &ro.token[..ro.token.len() - 1]);
    let (status, _, _) = request(&s, "GET", "/api/v1/admin/vms", Some(&wrong), None).await;
    assert_eq!(status, 401);
    // Read-only reads, but cannot enqueue.
    let (status, list, _) = request(&s, "GET", "/api/v1/admin/vms", Some(&ro.token), None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["vms"].as_array().map(Vec::len), Some(1));
    let (status, body, _) = request(&s, "POST", path, Some(&ro.token), Some(drain.clone())).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        store
            .commands_for_vm("vm-op")
            .await?
            .iter()
            .all(|c| c.command_type != "drain")
    );
    // Admin enqueues; the command can be followed to its state.
    let (status, body, _) = request(&s, "POST", path, Some(&admin), Some(drain.clone())).await;
    assert_eq!(status, 201, "{body}");
    let id = body["command"]["id"].as_str().ok_or("id")?.to_owned();
    assert_eq!(
        body["command"]["source"],
        format!(
            "operator:initial-admin({})",
            admin.split('_').nth(1).unwrap_or_default()
        )
    );
    let (status, cmd, _) = request(
        &s,
        "GET",
        &format!("/api/v1/admin/commands/{id}"),
        Some(&ro.token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{cmd}");
    assert_eq!(cmd["command"]["state"], "pending");
    // Bad input to the admin API is a 400 and is audited too.
    let (status, _, _) = request(
        &s,
        "POST",
        path,
        Some(&admin),
        Some(json!({"type":"reboot"})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _, _) =
        request(&s, "GET", "/api/v1/admin/audit?limit=0", Some(&admin), None).await;
    assert_eq!(status, 400);
    // The audit log: who, what, on what, from where, how it ended.
    let (status, audit, _) = request(
        &s,
        "GET",
        "/api/v1/admin/audit?limit=10",
        Some(&ro.token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{audit}");
    let entries = audit["entries"].as_array().ok_or("entries")?;
    let outcomes: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap_or_default(),
                e["outcome"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        outcomes.contains(&("command.enqueue", "ok")),
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&("command.enqueue", "error: bad_request")),
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&("POST /api/v1/admin/vms/vm-op/commands", "denied")),
        "{outcomes:?}"
    );
    let ok = entries
        .iter()
        .find(|e| e["outcome"] == "ok" && e["action"] == "command.enqueue")
        .ok_or("ok entry")?;
    assert_eq!(ok["target"], "vm:vm-op");
    assert_eq!(ok["remote_addr"], "127.0.0.1");
    assert!(
        ok["actor"]
            .as_str()
            .unwrap_or_default()
            .starts_with("operator:initial-admin(")
    );
    // Revocation takes effect at once.
    store
        .write(vec![mig_controller::store::Mutation::RevokeOperatorToken {
            id: ro.record.id.clone(),
            at: now,
        }])
        .await?;
    let (status, _, _) = request(&s, "GET", "/api/v1/admin/vms", Some(&ro.token), None).await;
    assert_eq!(status, 401);
    // Nothing stored holds a token secret.
    let dump = all_bytes_under(&s.data_dir);
    for (path, text) in &dump {
        if path.ends_with("initial-admin-token") {
            continue;
        }
        assert!(
            !text.contains(&ro.token) && !text.contains(&admin),
            "{}",
            path.display()
        );
    }
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() -> TestResult {
    let mut s = TestServer::start_with(|st| {
        st.per_vm_limit = mig_controller::auth::limits::Limit {
            per_second: 1,
            burst: 3,
        };
    })
    .await;
    let cred = s.enroll("vm-rl", "p").await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..6 {
        let (status, _, headers) =
            request(&s, "GET", "/api/v1/vms/vm-rl/commands", Some(&cred), None).await;
        statuses.push(status);
        if status == 429 {
            retry_after = headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
        }
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert_eq!(
        statuses.iter().filter(|&&c| c == 200).count(),
        3,
        "{statuses:?}"
    );
    assert!(retry_after.is_some_and(|v| v.parse::<u64>().is_ok_and(|n| n >= 1)));
    // On the stream the per-VM limit refuses messages with a notice; the stream stays up.
    let mut a = s.grpc_connect("vm-rl3", "p", "").await;
    for _ in 0..6 {
        a.send(miglet_proto::pb::mi_glet_message::Message::Heartbeat(
            miglet_proto::pb::Heartbeat {
                vm_id: "vm-rl3".into(),
                ..Default::default()
            },
        ))
        .await;
    }
    let notice = loop {
        match a.recv().await {
            Some(miglet_proto::pb::controller_message::Message::Error(e)) => break e,
            Some(_) => continue,
            None => return Err("stream ended".into()),
        }
    };
    assert_eq!(notice.code, "rate_limited", "{notice:?}");
    assert!(
        s.app().store().heartbeats_for_vm("vm-rl3").await?.len() < 6,
        "refused heartbeats are not stored"
    );
    // Another VM is not affected.
    let other = s.enroll("vm-rl2", "p").await;
    let (status, _, _) =
        request(&s, "GET", "/api/v1/vms/vm-rl2/commands", Some(&other), None).await;
    assert_eq!(status, 200);
    s.stop().await;

    let mut s = TestServer::start_with(|st| {
        st.per_addr_limit = mig_controller::auth::limits::Limit {
            per_second: 1,
            burst: 2,
        };
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(request(&s, "GET", "/health", None, None).await.0);
    }
    assert_eq!(statuses[..2], [200, 200]);
    assert!(statuses[2..].contains(&429), "{statuses:?}");
    s.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() -> TestResult {
    let mut s = TestServer::start_with(|st| st.header_timeout = Duration::from_secs(1)).await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await?;
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await?;
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    // The server answers 408 or just closes; either way the read ends well before WAIT.
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection still open after 5 s");
    assert!(started.elapsed() < Duration::from_secs(4));
    s.stop().await;
    Ok(())
}
