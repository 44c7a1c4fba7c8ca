//! The controller's Google access token against the stand-ins over loopback: the JWT-bearer
//! grant with a service-account key file (checked by the token endpoint as Google checks it),
//! the metadata server's token, caching until shortly before expiry, a fresh token after a
//! 401, and clear errors for a refused grant or something that is not a metadata server.

use super::common::TestResult;
use mig_controller::clock::Clock;
use mig_controller::gce::GceError;
use mig_controller::gce::auth::{GoogleAuth, GoogleCredentials};
use miglet_sim::google::{FakeGoogle, Instance};
use miglet_sim::metadata::FakeMetadata;
use std::time::Duration;

async fn serve(router: axum::Router) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok(format!("http://{addr}"))
}

#[tokio::test]
async fn a_key_file_is_exchanged_for_a_token_that_is_cached_until_near_its_end() -> TestResult {
    let google = FakeGoogle::new();
    let base = serve(google.router()).await?;
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("sa.json");
    std::fs::write(&key, google.service_account_key(&format!("{base}/token")))?;
    let clock = Clock::adjustable();
    let auth = GoogleAuth::new(GoogleCredentials::KeyFile(key.clone()), clock.clone())?;
    let first = auth.token().await?;
    assert!(google.access_token_valid(&first));
    assert_eq!(auth.token().await?, first, "cached");
    assert_eq!(google.token_grants(), 1);
    // 56 minutes on: within five minutes of its hour, a new one is fetched.
    clock.advance(Duration::from_secs(56 * 60));
    let second = auth.token().await?;
    assert_ne!(second, first);
    assert_eq!(google.token_grants(), 2);
    // After a 401, the next call fetches a new token.
    auth.invalidate().await;
    assert_ne!(auth.token().await?, second);
    assert_eq!(google.token_grants(), 3);
    Ok(())
}

#[tokio::test]
async fn a_refused_grant_says_why() -> TestResult {
    let google = FakeGoogle::new();
    let base = serve(google.router()).await?;
    let dir = tempfile::tempdir()?;
    // A key whose token_uri is not the endpoint it posts to: the audience does not match.
    let mut key: serde_json::Value =
        serde_json::from_str(&google.service_account_key(&format!("{base}/token")))?;
    key["token_uri"] = format!("{base}/token?elsewhere").into();
    let file = dir.path().join("sa.json");
    std::fs::write(&file, key.to_string())?;
    let auth = GoogleAuth::new(GoogleCredentials::KeyFile(file), Clock::system())?;
    match auth.token().await {
        Err(GceError::Auth(m)) => assert!(m.contains("invalid_grant"), "{m}"),
        other => panic!("the grant must be refused: {other:?}"),
    }
    assert_eq!(google.token_grants(), 0);
    let missing = GoogleAuth::new(
        GoogleCredentials::KeyFile(dir.path().join("nope.json")),
        Clock::system(),
    )?;
    assert!(matches!(missing.token().await, Err(GceError::Config(_))));
    Ok(())
}

#[tokio::test]
async fn the_metadata_server_gives_the_vms_service_account_token() -> TestResult {
    let google = FakeGoogle::new();
    let metadata = FakeMetadata::default().with_identity(
        google.clone(),
        Instance::new("e2e-project", "europe-west1-b", "ctl"),
    );
    let base = serve(metadata.router()).await?;
    let auth = GoogleAuth::new(
        GoogleCredentials::Metadata { base: base.clone() },
        Clock::system(),
    )?;
    let token = auth.token().await?;
    assert!(google.access_token_valid(&token));
    // Something that is not a metadata server (no Metadata-Flavor in its answers).
    let impostor = serve(axum::Router::new().route(
        "/computeMetadata/v1/{*p}",
        axum::routing::get(|| async {
            axum::Json(serde_json::json!({"access_token": "x", "expires_in": 3600}))
        }),
    ))
    .await?;
    let fooled = GoogleAuth::new(
        GoogleCredentials::Metadata { base: impostor },
        Clock::system(),
    )?;
    match fooled.token().await {
        Err(GceError::Auth(m)) => assert!(m.contains("not a GCE metadata server"), "{m}"),
        other => panic!("an impostor is refused: {other:?}"),
    }
    Ok(())
}
