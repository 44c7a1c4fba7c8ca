//! `/admin/pools`: each pool's VMs by state and health.

use super::*;

/// A pool at a glance.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolSummary {
    pub pool_id: String,
    pub total: i64,
    /// Streams open now.
    pub connected: i64,
    #[schema(value_type = Object)]
    pub by_state: BTreeMap<String, i64>,
    #[schema(value_type = Object)]
    pub by_health: BTreeMap<String, i64>,
    /// The runner labels the pool registers with (from the controller's config).
    pub labels: Vec<String>,
    /// How minting registrations on GitHub has been going, for a pool that mints them.
    pub registration: Option<crate::token::SourceStatus>,
    /// The pool's latest alert (e.g. a runner version GitHub no longer accepts).
    pub alert: Option<crate::token::PoolAlert>,
    /// For a pool the controller sizes (it has a provider): its rules and the last pass.
    pub scaling: Option<PoolScalingView>,
}

/// A sized pool's rules and what the scaler's last pass found.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolScalingView {
    /// `local`, later `gce-mig`.
    pub provider: String,
    pub min_idle: u32,
    pub max_size: u32,
    /// An idle VM beyond what is wanted is removed after this long.
    pub idle_timeout_secs: i64,
    /// An idle VM older than this is replaced (a busy one finishes its job first).
    pub max_vm_lifetime_secs: i64,
    /// Created → `vm_started`, at most, or the VM is reaped.
    pub boot_timeout_secs: i64,
    /// `vm_started` → runner online, at most, or the VM is reaped.
    pub registration_timeout_secs: i64,
    /// VMs created per scaler pass, at most.
    pub scale_up_step: u32,
    /// VMs created in any minute, at most (absent: no limit).
    pub scale_up_per_minute: Option<u32>,
    /// What happens to a VM once its (ephemeral) job is done: `delete` (the controller
    /// deletes it; the agent does not power itself off).
    pub after_job: String,
    /// VMs wanted: busy ones plus queued jobs plus `min_idle`, within `max_size`.
    pub desired: u32,
    /// VMs there are (not being deleted).
    pub actual: u32,
    pub busy: u32,
    pub spare: u32,
    /// Jobs queued for the pool that no VM has taken yet.
    pub queued_jobs: u32,
    /// How long the pool's jobs waited for a runner over the last hour.
    pub queue: crate::app::QueueStats,
    /// When the last pass ran (Unix ms; absent before the first).
    pub last_pass_at: Option<i64>,
    /// The last provider failure, until a pass succeeds.
    pub last_error: Option<String>,
    /// VMs the provider keeps failing to bring up, and why (a stock-out, a quota).
    pub provider_trouble: Option<String>,
}

async fn scaling_view(app: &AppState, pool_id: &str) -> Result<Option<PoolScalingView>, ApiError> {
    let pools = &app.settings().pools;
    let Some(scaling) = pools.get(pool_id).ok().and_then(|p| p.scaling.as_ref()) else {
        return Ok(None);
    };
    let last = app.pool_scale_view(pool_id).unwrap_or_default();
    let queue = app.pool_queue_stats(pool_id).await?;
    Ok(Some(PoolScalingView {
        queue,
        provider: scaling.provider.kind().to_owned(),
        min_idle: scaling.policy.min_idle,
        max_size: scaling.policy.max_size,
        idle_timeout_secs: scaling.policy.idle_timeout / 1000,
        max_vm_lifetime_secs: scaling.policy.max_vm_lifetime / 1000,
        boot_timeout_secs: scaling.policy.boot_timeout / 1000,
        registration_timeout_secs: scaling.policy.registration_timeout / 1000,
        scale_up_step: scaling.policy.scale_up_step,
        scale_up_per_minute: scaling.policy.scale_up_per_minute,
        after_job: "delete".into(),
        desired: last.desired,
        actual: last.actual,
        busy: last.busy,
        spare: last.spare,
        queued_jobs: last.queued_jobs,
        last_pass_at: (last.at > 0).then_some(last.at),
        last_error: last.last_error,
        provider_trouble: last.provider_trouble,
    }))
}

async fn empty_summary(app: &AppState, pool_id: &str) -> Result<PoolSummary, ApiError> {
    let reg = app.settings().pools.get(pool_id).ok();
    Ok(PoolSummary {
        pool_id: pool_id.to_owned(),
        total: 0,
        connected: 0,
        by_state: BTreeMap::new(),
        by_health: BTreeMap::new(),
        labels: reg.map(|r| r.labels.clone()).unwrap_or_default(),
        alert: app.pool_alert(pool_id),
        registration: reg.and_then(|r| r.token.status()),
        scaling: scaling_view(app, pool_id).await?,
    })
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolList {
    pub pools: Vec<PoolSummary>,
}

/// Every pool with VMs, and every pool the controller sizes (even at zero VMs), with
/// counts by state and health.
#[utoipa::path(get, path = "/api/v1/admin/pools", tag = "pools",
    responses((status = 200, body = PoolList)))]
pub(super) async fn list_pools(State(app): State<AppState>) -> Result<Json<PoolList>, ApiError> {
    let mut pools: BTreeMap<String, PoolSummary> = BTreeMap::new();
    for c in app.reads().pool_counts().await? {
        if !pools.contains_key(&c.pool_id) {
            pools.insert(c.pool_id.clone(), empty_summary(&app, &c.pool_id).await?);
        }
        let Some(p) = pools.get_mut(&c.pool_id) else {
            continue;
        };
        p.total += c.count;
        p.connected += c.connected;
        *p.by_state.entry(c.state).or_default() += c.count;
        *p.by_health.entry(c.health.as_str().to_owned()).or_default() += c.count;
    }
    for (id, reg) in app.settings().pools.iter() {
        if reg.scaling.is_some() && !pools.contains_key(id) {
            pools.insert(id.to_owned(), empty_summary(&app, id).await?);
        }
    }
    Ok(Json(PoolList {
        pools: pools.into_values().collect(),
    }))
}

/// One job GitHub told us of.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub job_id: i64,
    pub run_id: i64,
    pub repository: String,
    pub name: String,
    pub workflow_name: Option<String>,
    pub labels: Vec<String>,
    /// `queued`, `waiting`, `in_progress` or `completed`.
    pub status: String,
    pub conclusion: Option<String>,
    pub pool_id: Option<String>,
    pub vm_id: Option<String>,
    pub runner_name: Option<String>,
    /// Unix ms.
    pub queued_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    /// Queued → in progress, ms.
    pub queue_ms: Option<i64>,
    /// In progress → completed, ms.
    pub duration_ms: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobView>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobsQuery {
    /// At most this many, newest first [default: 100, at most 500].
    pub limit: Option<u32>,
}

/// The jobs updated last (from GitHub's `workflow_job` webhooks), newest first.
#[utoipa::path(get, path = "/api/v1/admin/jobs", tag = "pools", params(JobsQuery),
    responses((status = 200, body = JobList), (status = 400, description = "bad limit")))]
pub(super) async fn list_jobs(
    State(app): State<AppState>,
    q: Result<Query<JobsQuery>, QueryRejection>,
) -> Result<Json<JobList>, ApiError> {
    let q = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = page_limit(q.limit)?;
    let jobs = app.reads().jobs_recent(limit).await?;
    Ok(Json(JobList {
        jobs: jobs
            .into_iter()
            .map(|j| JobView {
                queue_ms: crate::lifecycle::queue_time(&j),
                duration_ms: j
                    .completed_at
                    .zip(j.started_at)
                    .map(|(c, s)| (c - s).max(0)),
                job_id: j.job_id,
                run_id: j.run_id,
                repository: j.repository,
                name: j.name,
                workflow_name: j.workflow_name,
                labels: j.labels,
                status: j.status,
                conclusion: j.conclusion,
                pool_id: j.pool_id,
                vm_id: j.vm_id,
                runner_name: j.runner_name,
                queued_at: j.queued_at,
                started_at: j.started_at,
                completed_at: j.completed_at,
            })
            .collect(),
    }))
}

/// The longest history asked for (what is kept: two hours).
pub(super) const MAX_HISTORY_MINUTES: u32 = 120;

/// A sized pool's recent samples.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolHistory {
    pub pool_id: String,
    /// Each sample is the last scaler pass within this many seconds.
    pub sample_secs: i64,
    /// Oldest first.
    pub samples: Vec<crate::app::PoolSample>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// The last this many minutes [default: 60, at most 120].
    pub minutes: Option<u32>,
}

/// Desired and actual VMs, busy VMs and queued jobs of a pool the controller sizes, over the
/// last minutes (kept in memory for two hours: a restart starts afresh).
#[utoipa::path(get, path = "/api/v1/admin/pools/{pool_id}/history", tag = "pools",
    params(("pool_id" = String, Path, description = "A pool the controller sizes"), HistoryQuery),
    responses((status = 200, body = PoolHistory), (status = 400, description = "bad minutes"),
        (status = 404, description = "no such sized pool")))]
pub(super) async fn pool_history(
    State(app): State<AppState>,
    pool_id: Result<Path<String>, PathRejection>,
    q: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Json<PoolHistory>, ApiError> {
    let pool_id = path_one(pool_id)?;
    miglet_proto::ids::validate_id("pool_id", &pool_id).map_err(bad)?;
    let q = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let minutes = q.minutes.unwrap_or(60);
    if !(1..=MAX_HISTORY_MINUTES).contains(&minutes) {
        return Err(ApiError::BadRequest(format!(
            "minutes must be 1 to {MAX_HISTORY_MINUTES}, not {minutes}"
        )));
    }
    let since = app.now_ms() - i64::from(minutes) * 60_000;
    let samples = app.pool_history(&pool_id, since).ok_or_else(|| {
        ApiError::NotFound(format!("{pool_id} is not a pool the controller sizes"))
    })?;
    Ok(Json(PoolHistory {
        pool_id,
        sample_secs: crate::app::SAMPLE_SECS,
        samples,
    }))
}
