//! Row operations on VMs: their record, contact, connection flag, log and health sweep.

use super::*;

/// Inserts or replaces a VM's record.
pub(super) async fn put_vm(
    conn: &mut SqliteConnection,
    vm: VmRecord,
) -> Result<Outcome, StoreError> {
    put_vms(conn, &[&vm]).await?;
    Ok(Outcome::Done)
}

/// A contact: `last_seen_at` forward, the VM healthy again (a recovery goes on its log).
pub(super) async fn touch_vm(
    conn: &mut SqliteConnection,
    vm_id: String,
    at: Millis,
) -> Result<Outcome, StoreError> {
    log_recovery(conn, &vm_id, at).await?;
    sqlx::query(
        "UPDATE vms SET last_seen_at = MAX(last_seen_at, ?), health = 'healthy', \
         updated_at = ? WHERE vm_id = ?",
    )
    .bind(at)
    .bind(at)
    .bind(&vm_id)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Done)
}

/// Whether a stream is open for the VM.
pub(super) async fn set_connected(
    conn: &mut SqliteConnection,
    vm_id: String,
    connected: bool,
    at: Millis,
) -> Result<Outcome, StoreError> {
    sqlx::query("UPDATE vms SET connected = ?, updated_at = ? WHERE vm_id = ?")
        .bind(connected)
        .bind(at)
        .bind(&vm_id)
        .execute(&mut *conn)
        .await?;
    Ok(Outcome::Done)
}

/// One line of a VM's log.
pub(super) async fn vm_log(
    conn: &mut SqliteConnection,
    row: VmLogRow,
) -> Result<Outcome, StoreError> {
    sqlx::query("INSERT INTO vm_log (vm_id, at, kind, detail) VALUES (?, ?, ?, ?)")
        .bind(&row.vm_id)
        .bind(row.at)
        .bind(&row.kind)
        .bind(&row.detail)
        .execute(&mut *conn)
        .await?;
    Ok(Outcome::Done)
}

/// Silent VMs: shutting down and quiet → terminated; quiet past the thresholds the caller
/// computed → unhealthy, then lost. Each change on the VM's log.
pub(super) async fn mark_silent_vms(
    conn: &mut SqliteConnection,
    now: Millis,
    unhealthy_before: Millis,
    lost_before: Millis,
) -> Result<Outcome, StoreError> {
    let mut changes = Vec::new();
    // Shutting-down VMs that went quiet are done, not sick.
    let ended = sqlx::query(
        "UPDATE vms SET state = 'terminated', connected = 0, updated_at = ?1, state_since = ?1 \
         WHERE state = 'shutting_down' AND last_seen_at < ?2 AND connected = 0 RETURNING vm_id",
    )
    .bind(now)
    .bind(unhealthy_before)
    .fetch_all(&mut *conn)
    .await?;
    for r in ended {
        let vm_id: String = r.try_get("vm_id")?;
        insert_vm_log(
            conn,
            &vm_id,
            now,
            "terminated",
            Some("silent after shutting down"),
        )
        .await?;
    }
    for (to, before, from_states) in [
        (Health::Lost, lost_before, "('healthy', 'unhealthy')"),
        (Health::Unhealthy, unhealthy_before, "('healthy')"),
    ] {
        let sql = format!(
            "SELECT vm_id, health FROM vms WHERE health IN {from_states} \
             AND last_seen_at < ? AND state != 'terminated'"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(before)
            .fetch_all(&mut *conn)
            .await?;
        for r in rows {
            let vm_id: String = r.try_get("vm_id")?;
            let old: String = r.try_get("health")?;
            let from: Health = old.parse()?;
            sqlx::query("UPDATE vms SET health = ?, updated_at = ? WHERE vm_id = ?")
                .bind(to.as_str())
                .bind(now)
                .bind(&vm_id)
                .execute(&mut *conn)
                .await?;
            let detail = format!("{} -> {}", from.as_str(), to.as_str());
            insert_vm_log(conn, &vm_id, now, "health_changed", Some(&detail)).await?;
            changes.push(HealthChange { vm_id, from, to });
        }
    }
    Ok(Outcome::HealthChanged(changes))
}

/// A VM that was unhealthy or lost and is heard from again: note it in its log.
pub(super) async fn log_recovery(
    conn: &mut SqliteConnection,
    vm_id: &str,
    at: Millis,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO vm_log (vm_id, at, kind, detail) SELECT vm_id, ?, 'health_changed', \
         health || ' -> healthy' FROM vms WHERE vm_id = ? AND health != 'healthy'",
    )
    .bind(at)
    .bind(vm_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub(super) async fn insert_vm_log(
    conn: &mut SqliteConnection,
    vm_id: &str,
    at: Millis,
    kind: &str,
    detail: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO vm_log (vm_id, at, kind, detail) VALUES (?, ?, ?, ?)")
        .bind(vm_id)
        .bind(at)
        .bind(kind)
        .bind(detail)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
