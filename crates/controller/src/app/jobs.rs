//! Demand: GitHub's `workflow_job` webhook deliveries, checked, deduplicated and stored as
//! jobs matched to a pool ([`lifecycle::match_pool`], [`lifecycle::apply_job_update`]).

use super::*;
use crate::github::webhook::{self, Delivery, WebhookError};
use crate::model::JobRecord;

/// Deliveries are remembered (for deduplication) this long; GitHub redelivers on request
/// for up to three days.
const DELIVERIES_KEPT_MS: Millis = 7 * 24 * 3600 * 1000;

/// The headers of a webhook delivery that matter.
#[derive(Debug, Clone, Copy, Default)]
pub struct WebhookHeaders<'a> {
    /// `X-GitHub-Event`.
    pub event: Option<&'a str>,
    /// `X-GitHub-Delivery`.
    pub delivery: Option<&'a str>,
    /// `X-Hub-Signature-256`.
    pub signature: Option<&'a str>,
}

/// What became of a delivery.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WebhookAnswer {
    /// `applied`, `duplicate` (this delivery, or this step of the job, was seen before) or
    /// `ignored` (an event or action the controller does not act on; `ping`).
    pub result: &'static str,
    pub job_id: Option<i64>,
    /// The pool the job was matched to.
    pub pool_id: Option<String>,
    /// The job was not stored before (read under the job's lock).
    #[serde(skip)]
    pub new_job: bool,
}

/// How long a pool's jobs waited for a runner over the last hour.
#[derive(
    Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct QueueStats {
    /// Jobs that started in the last hour (the latest 1,000 are measured).
    pub jobs_started: u32,
    /// Median wait, seconds (absent without jobs).
    pub p50_seconds: Option<f64>,
    /// 90th percentile, seconds.
    pub p90_seconds: Option<f64>,
}

impl Controller {
    /// Queue times of `pool_id`'s jobs that started in the last hour.
    pub async fn pool_queue_stats(&self, pool_id: &str) -> Result<QueueStats, ApiError> {
        let since = self.now_ms() - 3600 * 1000;
        let waits = self.store.job_queue_times(pool_id, since, 1000).await?;
        let secs = |p| lifecycle::percentile(&waits, p).map(|ms| ms as f64 / 1000.0);
        Ok(QueueStats {
            jobs_started: u32::try_from(waits.len()).unwrap_or(u32::MAX),
            p50_seconds: secs(50),
            p90_seconds: secs(90),
        })
    }

    /// `POST /api/v1/github/webhook`: verifies the signature over the raw `body`, then
    /// stores what a `workflow_job` says. Unsigned or wrongly signed deliveries are refused
    /// (401) and counted; nothing is stored for them.
    pub async fn ingest_webhook(
        &self,
        headers: WebhookHeaders<'_>,
        body: &[u8],
    ) -> Result<WebhookAnswer, ApiError> {
        let event = headers.event.unwrap_or_default();
        let event_label = match event {
            "workflow_job" | "ping" => event,
            _ => "other",
        };
        let count = |result: &str| {
            self.metrics
                .scaling
                .webhook_deliveries
                .get_or_create(&crate::metrics::WebhookLabels {
                    event: event_label.into(),
                    result: result.into(),
                })
                .inc();
        };
        let Some(file) = &self.settings.webhook_secret_file else {
            return Err(ApiError::NotFound(
                "no webhook is configured here: set [webhook] secret_file".into(),
            ));
        };
        let secret = webhook::read_secret(file).map_err(|reason| {
            warn!(%reason, "Webhook delivery refused: the webhook secret cannot be read; fix [webhook] secret_file");
            ApiError::Unavailable("the webhook secret cannot be read".into())
        })?;
        if let Err(e) = webhook::verify_signature(&secret, body, headers.signature) {
            count(if e == WebhookError::Unsigned {
                "unsigned"
            } else {
                "bad_signature"
            });
            static REFUSED: crate::throttle::LogThrottle = crate::throttle::LogThrottle::new(1_000);
            if let Some(similar_not_logged) = REFUSED.allow_now() {
                warn!(error = %e, similar_not_logged, "Webhook delivery refused");
            }
            return Err(ApiError::Unauthorized(e.to_string()));
        }
        let delivery = headers
            .delivery
            .ok_or(WebhookError::MissingHeader("X-GitHub-Delivery"))
            .and_then(|d| {
                validate_id("X-GitHub-Delivery", d)
                    .map(|()| d)
                    .map_err(|_| WebhookError::MissingHeader("X-GitHub-Delivery"))
            })
            .map_err(|e| {
                count("bad_payload");
                bad(e)
            })?;
        let update = match webhook::parse(event, body) {
            Ok(Delivery::Job(u)) => u,
            Ok(Delivery::Ping | Delivery::Ignored(_)) => {
                count("ignored");
                return Ok(WebhookAnswer {
                    result: "ignored",
                    job_id: None,
                    pool_id: None,
                    new_job: false,
                });
            }
            Err(e) => {
                count("bad_payload");
                return Err(bad(e));
            }
        };
        let answer = self.apply_job(Some(delivery), &update).await?;
        count(answer.result);
        Ok(answer)
    }

    /// Applies what GitHub said of a job (a webhook `delivery`, or the backstop poll without
    /// one) under the job's lock: a delivery is claimed once, and the job moves only
    /// forward.
    pub(super) async fn apply_job(
        &self,
        delivery: Option<&str>,
        update: &lifecycle::JobUpdate,
    ) -> Result<WebhookAnswer, ApiError> {
        let now = self.now_ms();
        let _guard = self.locks.lock(&format!("job:{}", update.job_id)).await;
        let existing = self.store.job_get(update.job_id).await?;
        let pool_id = lifecycle::match_pool(
            &update.labels,
            self.settings
                .pools
                .iter()
                .filter(|(id, _)| *id != "*")
                .map(|(id, p)| (id, p.labels.as_slice())),
        );
        let vm_id = match update.runner_name.as_deref() {
            Some(runner) => self.vm_of_runner(runner).await?,
            None => None,
        };
        let job = lifecycle::apply_job_update(existing.as_ref(), update, pool_id, vm_id, now);
        let claim = delivery.map(|d| Mutation::ClaimDelivery {
            delivery_id: d.to_owned(),
            at: now,
            forget_before: now - DELIVERIES_KEPT_MS,
        });
        let claims = usize::from(claim.is_some());
        let batch: Vec<Mutation> = claim
            .into_iter()
            .chain(job.clone().map(Mutation::PutJob))
            .collect();
        let outcomes = if batch.is_empty() {
            Vec::new()
        } else {
            self.store.write(batch).await?
        };
        let fresh = claims == 0 || outcomes.first() == Some(&Outcome::Inserted(true));
        let applied = outcomes.get(claims) == Some(&Outcome::Applied(true));
        let shown = job.as_ref().or(existing.as_ref());
        if applied && let Some(j) = &job {
            self.job_changed(existing.as_ref(), j);
            self.nudge_scaler();
        }
        Ok(WebhookAnswer {
            result: if fresh && applied {
                "applied"
            } else {
                "duplicate"
            },
            job_id: Some(update.job_id),
            pool_id: shown.and_then(|j| j.pool_id.clone()),
            new_job: existing.is_none(),
        })
    }

    /// Which of our VMs a runner belongs to: runners we name are `<vm id>-<boot>`; a runner
    /// the agent named itself carries the VM id. `None` for a runner that is not ours.
    async fn vm_of_runner(&self, runner: &str) -> Result<Option<String>, ApiError> {
        let owner = lifecycle::runner_owner(runner).map(|(vm, _)| vm);
        for candidate in owner.into_iter().chain(std::iter::once(runner)) {
            if validate_vm_id(candidate).is_ok() && self.store.vm_get(candidate).await?.is_some() {
                return Ok(Some(candidate.to_owned()));
            }
        }
        Ok(None)
    }

    /// After a job's row changed: its queue time once it started, and a line in the log.
    fn job_changed(&self, old: Option<&JobRecord>, job: &JobRecord) {
        let was_started = old.is_some_and(|o| o.started_at.is_some());
        if !was_started && let (Some(wait), Some(pool)) = (lifecycle::queue_time(job), &job.pool_id)
        {
            self.metrics
                .scaling
                .job_queue_seconds
                .get_or_create(&crate::metrics::PoolLabel { pool: pool.clone() })
                .observe(wait as f64 / 1000.0);
        }
        if job.pool_id.is_none() && old.is_none() {
            info!(job_id = job.job_id, repository = %job.repository, labels = ?job.labels, "Job queued that no pool's labels match; no VM is started for it");
        } else {
            info!(job_id = job.job_id, repository = %job.repository, pool_id = ?job.pool_id, status = %job.status, vm_id = ?job.vm_id, "Job");
        }
    }
}
