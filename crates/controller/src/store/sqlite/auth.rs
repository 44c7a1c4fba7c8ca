//! Row operations on operator tokens, the audit log and used identity tokens.

use super::*;

/// A new operator token (its hash only).
pub(super) async fn insert_operator_token(
    conn: &mut SqliteConnection,
    t: OperatorTokenRecord,
) -> Result<Outcome, StoreError> {
    sqlx::query(
        "INSERT INTO operator_tokens (id, name, role, secret_hash, created_at, created_by, \
         expires_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
    )
    .bind(&t.id)
    .bind(&t.name)
    .bind(t.role.as_str())
    .bind(&t.secret_hash)
    .bind(t.created_at)
    .bind(&t.created_by)
    .bind(t.expires_at)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Done)
}

/// Revokes a token once: `Applied(false)` if unknown or already revoked.
pub(super) async fn revoke_operator_token(
    conn: &mut SqliteConnection,
    id: String,
    at: Millis,
) -> Result<Outcome, StoreError> {
    let done = sqlx::query(
        "UPDATE operator_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
    )
    .bind(at)
    .bind(&id)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Applied(done.rows_affected() > 0))
}

/// One audit line.
pub(super) async fn audit(conn: &mut SqliteConnection, a: AuditRow) -> Result<Outcome, StoreError> {
    sqlx::query(
        "INSERT INTO audit_log (at, actor, action, target, remote_addr, outcome, detail) \
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(a.at)
    .bind(&a.actor)
    .bind(&a.action)
    .bind(&a.target)
    .bind(&a.remote_addr)
    .bind(&a.outcome)
    .bind(&a.detail)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Done)
}

/// Records a GCE identity token as used (replay protection): `Inserted(false)` if it was.
pub(super) async fn claim_identity_token(
    conn: &mut SqliteConnection,
    token_hash: String,
    vm_id: String,
    now: Millis,
    expires_at: Millis,
) -> Result<Outcome, StoreError> {
    sqlx::query("DELETE FROM identity_tokens_used WHERE expires_at < ?")
        .bind(now)
        .execute(&mut *conn)
        .await?;
    let done = sqlx::query(
        "INSERT OR IGNORE INTO identity_tokens_used (token_hash, vm_id, used_at, expires_at) \
         VALUES (?, ?, ?, ?)",
    )
    .bind(&token_hash)
    .bind(&vm_id)
    .bind(now)
    .bind(expires_at)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Inserted(done.rows_affected() > 0))
}
