//! Who a VM is: pool bindings made at enrollment, one-time enrollment tokens, and the
//! connection flags a restart resets.

use super::super::{EnrollmentTokenRecord, Outcome, StoreError, VmBinding};
use sqlx::Row;
use sqlx::sqlite::{SqliteConnection, SqliteRow};

/// An expired enrollment token is kept this long (for the audit trail of a late attempt),
/// then forgotten.
const EXPIRED_TOKEN_KEPT_MS: i64 = 86_400_000;

pub(super) async fn bind(
    conn: &mut SqliteConnection,
    b: &VmBinding,
    replace: bool,
) -> Result<Outcome, StoreError> {
    let sql = if replace {
        "INSERT INTO vm_bindings (vm_id, pool_id, bound_at, proof) VALUES (?, ?, ?, ?) \
         ON CONFLICT (vm_id) DO UPDATE SET pool_id = excluded.pool_id, \
         bound_at = excluded.bound_at, proof = excluded.proof"
    } else {
        "INSERT OR IGNORE INTO vm_bindings (vm_id, pool_id, bound_at, proof) VALUES (?, ?, ?, ?)"
    };
    let done = sqlx::query(sql)
        .bind(&b.vm_id)
        .bind(&b.pool_id)
        .bind(b.bound_at)
        .bind(&b.proof)
        .execute(&mut *conn)
        .await?;
    Ok(Outcome::Inserted(done.rows_affected() > 0))
}

pub(super) async fn reset_connections(
    conn: &mut SqliteConnection,
    at: i64,
) -> Result<Outcome, StoreError> {
    sqlx::query(
        "INSERT INTO vm_log (vm_id, at, kind, detail) SELECT vm_id, ?, 'stream_disconnected', \
         '{\"reason\":\"the controller restarted; the stream did not survive it\"}' \
         FROM vms WHERE connected != 0",
    )
    .bind(at)
    .execute(&mut *conn)
    .await?;
    let done = sqlx::query("UPDATE vms SET connected = 0 WHERE connected != 0")
        .execute(&mut *conn)
        .await?;
    Ok(Outcome::Count(done.rows_affected()))
}

pub(super) async fn insert_enrollment_token(
    conn: &mut SqliteConnection,
    t: &EnrollmentTokenRecord,
) -> Result<Outcome, StoreError> {
    sqlx::query(
        "INSERT INTO enrollment_tokens (id, vm_id, pool_id, secret_hash, created_at, created_by, \
         expires_at, used_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&t.id)
    .bind(&t.vm_id)
    .bind(&t.pool_id)
    .bind(&t.secret_hash)
    .bind(t.created_at)
    .bind(&t.created_by)
    .bind(t.expires_at)
    .bind(t.used_at)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Done)
}

pub(super) async fn use_enrollment_token(
    conn: &mut SqliteConnection,
    id: &str,
    at: i64,
) -> Result<Outcome, StoreError> {
    sqlx::query("DELETE FROM enrollment_tokens WHERE expires_at < ?")
        .bind(at - EXPIRED_TOKEN_KEPT_MS)
        .execute(&mut *conn)
        .await?;
    let done = sqlx::query(
        "UPDATE enrollment_tokens SET used_at = ? WHERE id = ? AND used_at IS NULL \
         AND expires_at > ?",
    )
    .bind(at)
    .bind(id)
    .bind(at)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Applied(done.rows_affected() > 0))
}

fn binding_from_row(r: &SqliteRow) -> Result<VmBinding, StoreError> {
    Ok(VmBinding {
        vm_id: r.try_get("vm_id")?,
        pool_id: r.try_get("pool_id")?,
        bound_at: r.try_get("bound_at")?,
        proof: r.try_get("proof")?,
    })
}

fn enrollment_token_from_row(r: &SqliteRow) -> Result<EnrollmentTokenRecord, StoreError> {
    Ok(EnrollmentTokenRecord {
        id: r.try_get("id")?,
        vm_id: r.try_get("vm_id")?,
        pool_id: r.try_get("pool_id")?,
        secret_hash: r.try_get("secret_hash")?,
        created_at: r.try_get("created_at")?,
        created_by: r.try_get("created_by")?,
        expires_at: r.try_get("expires_at")?,
        used_at: r.try_get("used_at")?,
    })
}

impl super::Reads {
    pub async fn vm_binding_get(&self, vm_id: &str) -> Result<Option<VmBinding>, StoreError> {
        sqlx::query("SELECT * FROM vm_bindings WHERE vm_id = ?")
            .bind(vm_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| binding_from_row(&r))
            .transpose()
    }

    pub async fn enrollment_token_get(
        &self,
        id: &str,
    ) -> Result<Option<EnrollmentTokenRecord>, StoreError> {
        sqlx::query("SELECT * FROM enrollment_tokens WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| enrollment_token_from_row(&r))
            .transpose()
    }
}
