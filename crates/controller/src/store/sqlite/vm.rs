//! Row operations on VMs: their record, contact, connection flag, log, and what silence
//! does to one (decided by the lifecycle).

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

/// What silence does to one VM, if the VM is still as the sweep read it: last seen at
/// `seen_at` and in the health (or, to terminate, the state) the change starts from.
pub(super) async fn silence_vm(
    conn: &mut SqliteConnection,
    vm_id: String,
    seen_at: Millis,
    change: SilentChange,
    at: Millis,
) -> Result<Outcome, StoreError> {
    let (done, kind, detail) = match change {
        SilentChange::Terminated => {
            let done = sqlx::query(
                "UPDATE vms SET state = 'terminated', connected = 0, updated_at = ?1, \
                 state_since = ?1 WHERE vm_id = ?2 AND last_seen_at = ?3 \
                 AND state = 'shutting_down' AND connected = 0",
            )
            .bind(at)
            .bind(&vm_id)
            .bind(seen_at)
            .execute(&mut *conn)
            .await?;
            (done, "terminated", "silent after shutting down".to_owned())
        }
        SilentChange::Health { from, to } => {
            let done = sqlx::query(
                "UPDATE vms SET health = ?, updated_at = ? WHERE vm_id = ? \
                 AND last_seen_at = ? AND health = ?",
            )
            .bind(to.as_str())
            .bind(at)
            .bind(&vm_id)
            .bind(seen_at)
            .bind(from.as_str())
            .execute(&mut *conn)
            .await?;
            let detail = format!("{} -> {}", from.as_str(), to.as_str());
            (done, "health_changed", detail)
        }
    };
    let applied = done.rows_affected() == 1;
    if applied {
        insert_vm_log(conn, &vm_id, at, kind, Some(&detail)).await?;
    }
    Ok(Outcome::Applied(applied))
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
