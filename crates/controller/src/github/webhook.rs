//! GitHub's webhook deliveries as the controller reads them: the `X-Hub-Signature-256`
//! check over the raw bytes (HMAC-SHA256 with the webhook secret, compared in constant
//! time) and the `workflow_job` payload turned into a [`JobUpdate`]. Pure: no I/O.

use crate::lifecycle::{JobStatus, JobUpdate};
use crate::model::Millis;
use aws_lc_rs::hmac;
use serde::Deserialize;

/// At most this many `runs-on` labels, of at most this many bytes, are accepted (GitHub
/// allows 100 labels per runner).
const MAX_LABELS: usize = 100;
const MAX_LABEL: usize = 256;
/// Longest repository (`owner/name`), job or workflow name accepted.
const MAX_NAME: usize = 1024;

/// Why a delivery is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("no X-Hub-Signature-256 header: every delivery must be signed with the webhook secret")]
    Unsigned,
    #[error(
        "X-Hub-Signature-256 does not match the body: check that GitHub and the controller have the same webhook secret"
    )]
    BadSignature,
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("bad workflow_job payload: {0}")]
    BadPayload(String),
}

/// The webhook secret in `path` (trimmed; at least
/// [`crate::auth::enroll::MIN_SECRET_LEN`] characters, like every secret file).
pub fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, String> {
    crate::auth::enroll::read_named_secret_now(
        path,
        "a webhook secret (the same value as the webhook's secret on GitHub)",
    )
    .map(String::into_bytes)
}

/// Checks `X-Hub-Signature-256: sha256=<hex>` against HMAC-SHA256(`secret`, `body`).
pub fn verify_signature(
    secret: &[u8],
    body: &[u8],
    header: Option<&str>,
) -> Result<(), WebhookError> {
    let header = header.ok_or(WebhookError::Unsigned)?;
    let hex = header
        .trim()
        .strip_prefix("sha256=")
        .ok_or(WebhookError::BadSignature)?;
    let tag = decode_hex(hex).ok_or(WebhookError::BadSignature)?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, body, &tag).map_err(|_| WebhookError::BadSignature)
}

/// The signature header value GitHub sends for `body` (for tests and stand-ins).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// What a delivery is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// `ping`: sent when the webhook is created.
    Ping,
    Job(JobUpdate),
    /// An event or action the controller does not act on.
    Ignored(String),
}

#[derive(Deserialize)]
struct Payload {
    action: Option<String>,
    workflow_job: Option<Job>,
    repository: Option<Repository>,
}

#[derive(Deserialize)]
struct Repository {
    full_name: Option<String>,
}

#[derive(Deserialize)]
struct Job {
    id: i64,
    run_id: i64,
    run_attempt: Option<i64>,
    name: Option<String>,
    workflow_name: Option<String>,
    #[serde(default)]
    labels: Vec<String>,
    /// The REST API's view of the job's step; a delivery's `action` is what counts there.
    status: Option<String>,
    conclusion: Option<String>,
    runner_name: Option<String>,
    created_at: Option<String>,
    started_at: Option<String>,
    completed_at: Option<String>,
}

fn time(s: Option<&str>) -> Option<Millis> {
    chrono::DateTime::parse_from_rfc3339(s?)
        .ok()
        .map(|t| t.timestamp_millis())
}

fn bounded(what: &str, s: Option<String>, max: usize) -> Result<Option<String>, WebhookError> {
    match s {
        Some(v) if v.len() > max => Err(WebhookError::BadPayload(format!(
            "{what} is longer than {max} bytes"
        ))),
        other => Ok(other),
    }
}

/// Reads a delivery of event `event` (the `X-GitHub-Event` header).
pub fn parse(event: &str, body: &[u8]) -> Result<Delivery, WebhookError> {
    match event {
        "ping" => return Ok(Delivery::Ping),
        "workflow_job" => {}
        other => return Ok(Delivery::Ignored(format!("event {other}"))),
    }
    let p: Payload =
        serde_json::from_slice(body).map_err(|e| WebhookError::BadPayload(e.to_string()))?;
    let action = p.action.unwrap_or_default();
    let Some(status) = JobStatus::parse(&action) else {
        return Ok(Delivery::Ignored(format!("workflow_job action {action:?}")));
    };
    let job = p
        .workflow_job
        .ok_or_else(|| WebhookError::BadPayload("no workflow_job".into()))?;
    let repository = bounded(
        "repository",
        p.repository.and_then(|r| r.full_name),
        MAX_NAME,
    )?
    .unwrap_or_default();
    job_update(repository, job, status).map(Delivery::Job)
}

/// A job object of GitHub's REST API (`GET /repos/{owner}/{repo}/actions/jobs/{id}`, or an
/// element of a run's `jobs`) of `repository`, checked as strictly as a delivery; `None`
/// for a status we do not follow.
pub fn parse_rest_job(
    repository: &str,
    job: serde_json::Value,
) -> Result<Option<JobUpdate>, WebhookError> {
    let job: Job =
        serde_json::from_value(job).map_err(|e| WebhookError::BadPayload(e.to_string()))?;
    let Some(status) = job
        .status
        .as_deref()
        .and_then(crate::lifecycle::rest_job_status)
    else {
        return Ok(None);
    };
    let repository =
        bounded("repository", Some(repository.to_owned()), MAX_NAME)?.unwrap_or_default();
    job_update(repository, job, status).map(Some)
}

fn job_update(repository: String, job: Job, status: JobStatus) -> Result<JobUpdate, WebhookError> {
    if job.id <= 0 || job.run_id <= 0 {
        return Err(WebhookError::BadPayload(
            "workflow_job.id and run_id must be positive".into(),
        ));
    }
    if job.labels.len() > MAX_LABELS
        || job
            .labels
            .iter()
            .any(|l| l.is_empty() || l.len() > MAX_LABEL)
    {
        return Err(WebhookError::BadPayload(format!(
            "labels: at most {MAX_LABELS}, each 1 to {MAX_LABEL} bytes"
        )));
    }
    Ok(JobUpdate {
        job_id: job.id,
        run_id: job.run_id,
        run_attempt: job.run_attempt.unwrap_or(1),
        repository,
        name: bounded("name", job.name, MAX_NAME)?.unwrap_or_default(),
        workflow_name: bounded("workflow_name", job.workflow_name, MAX_NAME)?,
        labels: job.labels,
        status,
        conclusion: bounded("conclusion", job.conclusion, MAX_LABEL)?,
        runner_name: bounded("runner_name", job.runner_name, MAX_LABEL)?,
        created_at: time(job.created_at.as_deref()),
        started_at: time(job.started_at.as_deref()),
        completed_at: time(job.completed_at.as_deref()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn githubs_test_vector_verifies() {
        let secret = b"It's a Secret to Everybody";
        let body = b"Hello, World!";
        let expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(sign(secret, body), expected);
        assert_eq!(verify_signature(secret, body, Some(expected)), Ok(()));
        assert_eq!(
            verify_signature(secret, b"Hello, World?", Some(expected)),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify_signature(b"another secret", body, Some(expected)),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify_signature(secret, body, None),
            Err(WebhookError::Unsigned)
        );
        for bad in [
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            "sha1=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            "sha256=757107",
            "sha256=zz7107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
            "sha256=é57107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e1",
        ] {
            assert_eq!(
                verify_signature(secret, body, Some(bad)),
                Err(WebhookError::BadSignature),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_workflow_job_delivery_is_read_by_its_action() {
        let body = serde_json::json!({
            "action": "in_progress",
            "workflow_job": {
                "id": 29679449, "run_id": 1280, "run_attempt": 2, "name": "build",
                "workflow_name": "CI", "labels": ["self-hosted", "linux"],
                // `status` disagrees with `action`, as published examples show: ignored.
                "status": "queued", "conclusion": null,
                "runner_name": "vm-1-1", "created_at": "2026-12-04T10:00:00Z",
                "started_at": "2026-12-04T10:00:30Z", "completed_at": null
            },
            "repository": {"full_name": "acme/app"}
        })
        .to_string();
        let Ok(Delivery::Job(u)) = parse("workflow_job", body.as_bytes()) else {
            panic!("a job");
        };
        assert_eq!(u.status, JobStatus::InProgress);
        assert_eq!((u.job_id, u.run_id, u.run_attempt), (29679449, 1280, 2));
        assert_eq!(u.repository, "acme/app");
        assert_eq!(u.runner_name.as_deref(), Some("vm-1-1"));
        assert_eq!(
            u.started_at.zip(u.created_at).map(|(s, c)| s - c),
            Some(30_000)
        );
        assert_eq!(parse("ping", b"{}"), Ok(Delivery::Ping));
        assert!(matches!(parse("push", b"{}"), Ok(Delivery::Ignored(_))));
        let odd =
            serde_json::json!({"action": "requested", "workflow_job": {"id": 1, "run_id": 1}});
        assert!(matches!(
            parse("workflow_job", odd.to_string().as_bytes()),
            Ok(Delivery::Ignored(_))
        ));
        for bad in [
            serde_json::json!({"action": "queued"}),
            serde_json::json!({"action": "queued", "workflow_job": {"id": 0, "run_id": 1}}),
            serde_json::json!({"action": "queued", "workflow_job": {"id": 1, "run_id": 1, "labels": [""]}}),
            serde_json::json!({"action": "queued", "workflow_job": {"id": "1", "run_id": 1}}),
        ] {
            assert!(
                matches!(
                    parse("workflow_job", bad.to_string().as_bytes()),
                    Err(WebhookError::BadPayload(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            parse("workflow_job", b"not json"),
            Err(WebhookError::BadPayload(_))
        ));
    }
}
