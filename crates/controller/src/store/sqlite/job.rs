//! Demand and supply: jobs GitHub told us of, the webhook deliveries already applied, and
//! the instances the scaler asked providers for.

use super::super::{InstanceRecord, JobRecord, Millis, Outcome, StoreError};
use super::apply::to_json;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnection, SqliteRow};

pub(super) async fn claim_delivery(
    conn: &mut SqliteConnection,
    delivery_id: &str,
    at: Millis,
    forget_before: Millis,
) -> Result<Outcome, StoreError> {
    sqlx::query("DELETE FROM webhook_deliveries WHERE received_at < ?")
        .bind(forget_before)
        .execute(&mut *conn)
        .await?;
    let done = sqlx::query(
        "INSERT OR IGNORE INTO webhook_deliveries (delivery_id, received_at) VALUES (?, ?)",
    )
    .bind(delivery_id)
    .bind(at)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Inserted(done.rows_affected() > 0))
}

/// Writes a job unless the stored one may not move to its status
/// ([`crate::lifecycle::job_may_move`]).
pub(super) async fn put_job(
    conn: &mut SqliteConnection,
    j: JobRecord,
) -> Result<Outcome, StoreError> {
    let current: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE job_id = ?")
        .bind(j.job_id)
        .fetch_optional(&mut *conn)
        .await?;
    if current.is_some_and(|c| !crate::lifecycle::job_may_move(&c, &j.status)) {
        return Ok(Outcome::Applied(false));
    }
    sqlx::query(
        "INSERT OR REPLACE INTO jobs (job_id, run_id, run_attempt, repository, name, \
         workflow_name, labels, status, conclusion, pool_id, runner_name, vm_id, queued_at, \
         started_at, completed_at, updated_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(j.job_id)
    .bind(j.run_id)
    .bind(j.run_attempt)
    .bind(&j.repository)
    .bind(&j.name)
    .bind(&j.workflow_name)
    .bind(to_json(&j.labels)?)
    .bind(&j.status)
    .bind(&j.conclusion)
    .bind(&j.pool_id)
    .bind(&j.runner_name)
    .bind(&j.vm_id)
    .bind(j.queued_at)
    .bind(j.started_at)
    .bind(j.completed_at)
    .bind(j.updated_at)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Applied(true))
}

pub(super) fn job_from_row(r: &SqliteRow) -> Result<JobRecord, StoreError> {
    let labels: String = r.try_get("labels")?;
    Ok(JobRecord {
        job_id: r.try_get("job_id")?,
        run_id: r.try_get("run_id")?,
        run_attempt: r.try_get("run_attempt")?,
        repository: r.try_get("repository")?,
        name: r.try_get("name")?,
        workflow_name: r.try_get("workflow_name")?,
        labels: serde_json::from_str(&labels)
            .map_err(|e| StoreError::Corrupt(format!("job labels: {e}")))?,
        status: r.try_get("status")?,
        conclusion: r.try_get("conclusion")?,
        pool_id: r.try_get("pool_id")?,
        runner_name: r.try_get("runner_name")?,
        vm_id: r.try_get("vm_id")?,
        queued_at: r.try_get("queued_at")?,
        started_at: r.try_get("started_at")?,
        completed_at: r.try_get("completed_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

pub(super) async fn put_instance(
    conn: &mut SqliteConnection,
    i: InstanceRecord,
) -> Result<Outcome, StoreError> {
    sqlx::query(
        "INSERT OR REPLACE INTO instances (name, pool_id, provider, state, requested_at, \
         provider_id, drain_command_id, drain_reason, delete_reason, deleted_at, updated_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&i.name)
    .bind(&i.pool_id)
    .bind(&i.provider)
    .bind(&i.state)
    .bind(i.requested_at)
    .bind(&i.provider_id)
    .bind(&i.drain_command_id)
    .bind(&i.drain_reason)
    .bind(&i.delete_reason)
    .bind(i.deleted_at)
    .bind(i.updated_at)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Done)
}

pub(super) fn instance_from_row(r: &SqliteRow) -> Result<InstanceRecord, StoreError> {
    Ok(InstanceRecord {
        name: r.try_get("name")?,
        pool_id: r.try_get("pool_id")?,
        provider: r.try_get("provider")?,
        state: r.try_get("state")?,
        requested_at: r.try_get("requested_at")?,
        provider_id: r.try_get("provider_id")?,
        drain_command_id: r.try_get("drain_command_id")?,
        drain_reason: r.try_get("drain_reason")?,
        delete_reason: r.try_get("delete_reason")?,
        deleted_at: r.try_get("deleted_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::super::super::{Mutation, Prune, Store};
    use super::*;

    type R = Result<(), Box<dyn std::error::Error>>;

    fn job(id: i64, status: &str, updated_at: Millis) -> JobRecord {
        JobRecord {
            job_id: id,
            run_id: 1,
            run_attempt: 1,
            repository: "acme/app".into(),
            name: "build".into(),
            workflow_name: None,
            labels: vec!["self-hosted".into()],
            status: status.into(),
            conclusion: None,
            pool_id: Some("p".into()),
            runner_name: None,
            vm_id: None,
            queued_at: updated_at,
            started_at: None,
            completed_at: None,
            updated_at,
        }
    }

    fn instance(name: &str, deleted_at: Option<Millis>) -> InstanceRecord {
        InstanceRecord {
            name: name.into(),
            pool_id: "p".into(),
            provider: "local".into(),
            state: if deleted_at.is_some() {
                "deleted"
            } else {
                "running"
            }
            .into(),
            requested_at: 0,
            provider_id: None,
            drain_command_id: None,
            drain_reason: None,
            delete_reason: None,
            deleted_at,
            updated_at: deleted_at.unwrap_or(0),
        }
    }

    /// Completed jobs and deleted instances older than the events' age go; open jobs, live
    /// instances and recent history stay.
    #[tokio::test]
    async fn retention_forgets_old_finished_jobs_and_deleted_instances() -> R {
        let dir = tempfile::tempdir()?;
        let store = Store::open_sqlite(dir.path()).await?;
        store
            .write(vec![
                Mutation::PutJob(job(1, "completed", 100)),
                Mutation::PutJob(job(2, "queued", 100)),
                Mutation::PutJob(job(3, "completed", 5_000)),
                Mutation::PutInstance(instance("gone-old", Some(100))),
                Mutation::PutInstance(instance("gone-new", Some(5_000))),
                Mutation::PutInstance(instance("live", None)),
            ])
            .await?;
        let prune = Prune {
            heartbeats_full_after: 0,
            heartbeat_bucket_ms: 1,
            heartbeats_drop_before: 0,
            events_drop_before: Some(1_000),
            limit: 100,
        };
        let out = store
            .write(vec![Mutation::PruneHistory(prune.clone())])
            .await?;
        assert!(
            matches!(out.first(), Some(Outcome::Pruned { scaling: 2, .. })),
            "{out:?}"
        );
        assert!(store.job_get(1).await?.is_none());
        assert!(store.job_get(2).await?.is_some(), "an open job stays");
        assert!(store.job_get(3).await?.is_some());
        assert!(store.instance_get("gone-old").await?.is_none());
        assert!(store.instance_get("gone-new").await?.is_some());
        assert!(store.instance_get("live").await?.is_some());
        // Events kept forever keep these too.
        let keep = Prune {
            events_drop_before: None,
            ..prune
        };
        let out = store.write(vec![Mutation::PruneHistory(keep)]).await?;
        assert!(matches!(
            out.first(),
            Some(Outcome::Pruned { scaling: 0, .. })
        ));
        store.close().await;
        Ok(())
    }
}
