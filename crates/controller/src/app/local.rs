//! Operations on the store when no controller serves it (yet): the local CLI
//! (`mig-controller token ...`, `enrollment-token create`) and the start of `serve`. Each is one
//! atomic write of the change with its audit row, so front ends never write rows themselves.

use crate::auth::Role;
use crate::auth::enrollment_token::{self, EnrollmentTokenError, NewEnrollmentToken};
use crate::auth::operator::{self, NewToken, OperatorTokenError};
use crate::store::{AuditRow, Millis, Mutation, Outcome, Store, StoreError};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LocalError {
    #[error(transparent)]
    OperatorToken(#[from] OperatorTokenError),
    #[error(transparent)]
    EnrollmentToken(#[from] EnrollmentTokenError),
    #[error("the store refused the write")]
    Store(#[from] StoreError),
}

/// Who acts, from where, at what time: the audit row's frame.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub name: &'a str,
    /// `Some("local")` for the CLI; `None` for the controller itself.
    pub remote: Option<&'a str>,
    pub now: Millis,
}

impl Actor<'_> {
    fn audit(
        &self,
        action: &str,
        target: String,
        outcome: &str,
        detail: Option<String>,
    ) -> AuditRow {
        AuditRow {
            seq: 0,
            at: self.now,
            actor: self.name.to_owned(),
            action: action.to_owned(),
            target: Some(target),
            remote_addr: self.remote.map(str::to_owned),
            outcome: outcome.to_owned(),
            detail,
        }
    }
}

/// Mints an operator token and stores it with its audit row.
pub async fn create_operator_token(
    store: &Store,
    by: Actor<'_>,
    name: &str,
    role: Role,
    expires_at: Option<Millis>,
) -> Result<NewToken, LocalError> {
    let minted = operator::mint(name, role, by.name, by.now, expires_at)?;
    store_operator_token(store, by, &minted, None).await?;
    Ok(minted)
}

/// Stores a minted operator token with its audit row (for a caller that must put the token
/// somewhere first, like the first start's file). `note` is added to the row's detail.
pub async fn store_operator_token(
    store: &Store,
    by: Actor<'_>,
    minted: &NewToken,
    note: Option<&str>,
) -> Result<(), StoreError> {
    let r = &minted.record;
    let mut detail = format!("name={} role={}", r.name, r.role);
    if let Some(n) = note {
        detail.push(' ');
        detail.push_str(n);
    }
    let audit = by.audit(
        "operator_token.create",
        format!("operator_token:{}", r.id),
        "ok",
        Some(detail),
    );
    store
        .write(vec![
            Mutation::InsertOperatorToken(r.clone()),
            Mutation::Audit(audit),
        ])
        .await?;
    Ok(())
}

/// Revokes an active operator token; the attempt is audited either way. Returns whether a
/// token was revoked.
pub async fn revoke_operator_token(
    store: &Store,
    by: Actor<'_>,
    id: &str,
) -> Result<bool, LocalError> {
    let outcomes = store
        .write(vec![Mutation::RevokeOperatorToken {
            id: id.to_owned(),
            at: by.now,
        }])
        .await?;
    let revoked = outcomes.first() == Some(&Outcome::Applied(true));
    let outcome = if revoked { "ok" } else { "error: not_found" };
    let audit = by.audit(
        "operator_token.revoke",
        format!("operator_token:{id}"),
        outcome,
        None,
    );
    store.write(vec![Mutation::Audit(audit)]).await?;
    Ok(revoked)
}

/// Mints a one-time enrollment token for `vm_id` in `pool_id` and stores it (only its hash)
/// with its audit row.
pub async fn create_enrollment_token(
    store: &Store,
    by: Actor<'_>,
    vm_id: &str,
    pool_id: &str,
    ttl_secs: u64,
) -> Result<NewEnrollmentToken, LocalError> {
    let minted = enrollment_token::mint(vm_id, pool_id, by.name, by.now, ttl_secs)?;
    let audit = by.audit(
        "enrollment_token.create",
        format!("vm:{vm_id}"),
        "ok",
        Some(format!(
            "token_id={} pool={pool_id} ttl_secs={ttl_secs}",
            minted.record.id
        )),
    );
    store
        .write(vec![
            Mutation::InsertEnrollmentToken(minted.record.clone()),
            Mutation::Audit(audit),
        ])
        .await?;
    Ok(minted)
}

/// A new controller process holds no stream yet: every VM recorded as connected is marked
/// disconnected (with a log line each). Returns how many were.
pub async fn reset_connections(store: &Store, at: Millis) -> Result<u64, StoreError> {
    let out = store.write(vec![Mutation::ResetConnections { at }]).await?;
    Ok(match out.first() {
        Some(Outcome::Count(n)) => *n,
        _ => 0,
    })
}
