//! Row operations on heartbeats: ingest (decided in the writer, see [`crate::lifecycle`])
//! and retention.

use super::*;

/// A heartbeat read against the VM's stored record in the write transaction (a VM
/// first seen by its heartbeat is adopted).
pub(super) async fn ingest_heartbeat(
    conn: &mut SqliteConnection,
    input: Box<HeartbeatInput>,
) -> Result<Outcome, StoreError> {
    let found = sqlx::query("SELECT * FROM vms WHERE vm_id = ?")
        .bind(&input.vm_id)
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| vm_from_row(&r))
        .transpose()?;
    let vm = match found {
        Some(vm) => vm,
        None => {
            let vm = crate::lifecycle::adopt_for_heartbeat(&input);
            put_vms(conn, &[&vm]).await?;
            vm
        }
    };
    let (row, update) = crate::lifecycle::heartbeat_effect(&vm, &input);
    write_heartbeats(conn, &[(row, update)]).await?;
    Ok(Outcome::Done)
}

/// Retention, one bounded pass.
pub(super) async fn prune_history(
    conn: &mut SqliteConnection,
    p: Prune,
) -> Result<Outcome, StoreError> {
    // Heartbeats past the maximum age go; between that and the full-detail window
    // one per VM per bucket stays (the first); events past their maximum age go.
    // Each kind is bounded by `limit` rows per pass.
    let dropped = sqlx::query(
        "DELETE FROM heartbeats WHERE seq IN \
         (SELECT seq FROM heartbeats WHERE received_at < ? LIMIT ?)",
    )
    .bind(p.heartbeats_drop_before)
    .bind(p.limit)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    let thinned = sqlx::query(
        "DELETE FROM heartbeats WHERE seq IN (SELECT seq FROM \
         (SELECT seq, ROW_NUMBER() OVER (PARTITION BY vm_id, received_at / ?1 ORDER BY seq) AS rn \
          FROM heartbeats WHERE received_at >= ?2 AND received_at < ?3) \
         WHERE rn > 1 LIMIT ?4)",
    )
    .bind(p.heartbeat_bucket_ms.max(1))
    .bind(p.heartbeats_drop_before)
    .bind(p.heartbeats_full_after)
    .bind(p.limit)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    let events = match p.events_drop_before {
        None => 0,
        Some(before) => sqlx::query(
            "DELETE FROM events WHERE seq IN \
             (SELECT seq FROM events WHERE received_at < ? LIMIT ?)",
        )
        .bind(before)
        .bind(p.limit)
        .execute(&mut *conn)
        .await?
        .rows_affected(),
    };
    let scaling = match p.events_drop_before {
        None => 0,
        Some(before) => {
            let jobs = sqlx::query(
                "DELETE FROM jobs WHERE job_id IN (SELECT job_id FROM jobs \
                 WHERE updated_at < ? AND status = 'completed' LIMIT ?)",
            )
            .bind(before)
            .bind(p.limit)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            let instances = sqlx::query(
                "DELETE FROM instances WHERE name IN (SELECT name FROM instances \
                 WHERE state = 'deleted' AND deleted_at < ? LIMIT ?)",
            )
            .bind(before)
            .bind(p.limit)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            jobs + instances
        }
    };
    Ok(Outcome::Pruned {
        heartbeats: dropped + thinned,
        events,
        scaling,
    })
}
