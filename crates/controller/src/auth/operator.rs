//! Operator API tokens: `migop_<id>_<secret>`.
//!
//! The id is public (it names the token in listings and the audit log); the secret is 32
//! random bytes, shown once at creation and stored only as its SHA-256 (a hash of 256 random
//! bits needs no slow KDF). Verifying a token looks up its id and compares hashes in
//! constant time.

use super::secret_token;
use super::{Operator, Role};
use crate::store::{Millis, OperatorTokenRecord};
use thiserror::Error;

pub const PREFIX: &str = "migop_";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum OperatorTokenError {
    #[error("not an operator token")]
    Malformed,
    #[error("unknown or wrong operator token")]
    Wrong,
    #[error("operator token was revoked")]
    Revoked,
    #[error("operator token expired")]
    Expired,
    #[error("invalid token name: {0}")]
    BadName(String),
    #[error("no randomness available")]
    Random,
}

/// A freshly minted token: `token` is shown to the operator once and never again.
#[derive(Debug)]
pub struct NewToken {
    pub token: String,
    pub record: OperatorTokenRecord,
}

/// Mints a token for `name` with `role`.
pub fn mint(
    name: &str,
    role: Role,
    created_by: &str,
    now: Millis,
    expires_at: Option<Millis>,
) -> Result<NewToken, OperatorTokenError> {
    miglet_proto::ids::validate_id("name", name)
        .map_err(|e| OperatorTokenError::BadName(e.to_string()))?;
    let parts = secret_token::new_parts().ok_or(OperatorTokenError::Random)?;
    Ok(NewToken {
        token: secret_token::render(PREFIX, &parts),
        record: OperatorTokenRecord {
            id: parts.id,
            name: name.to_owned(),
            role,
            secret_hash: parts.hash,
            created_at: now,
            created_by: created_by.to_owned(),
            expires_at,
            revoked_at: None,
        },
    })
}

/// Splits a token into its id and secret.
pub fn parse(token: &str) -> Result<(&str, &str), OperatorTokenError> {
    secret_token::split(PREFIX, token).ok_or(OperatorTokenError::Malformed)
}

/// Checks `secret` against the stored `record` at `now`.
pub fn check(
    record: &OperatorTokenRecord,
    secret: &str,
    now: Millis,
) -> Result<Operator, OperatorTokenError> {
    if !secret_token::matches(secret, &record.secret_hash) {
        return Err(OperatorTokenError::Wrong);
    }
    if record.revoked_at.is_some() {
        return Err(OperatorTokenError::Revoked);
    }
    if record.expires_at.is_some_and(|e| e <= now) {
        return Err(OperatorTokenError::Expired);
    }
    Ok(Operator {
        token_id: record.id.clone(),
        name: record.name.clone(),
        role: record.role,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_parse_check() -> Result<(), OperatorTokenError> {
        let t = mint("alice", Role::ReadOnly, "cli", 1000, Some(5000))?;
        assert!(!t.token.contains(&t.record.secret_hash));
        let (id, secret) = parse(&t.token)?;
        assert_eq!(id, t.record.id);
        let op = check(&t.record, secret, 2000)?;
        assert_eq!((op.name.as_str(), op.role), ("alice", Role::ReadOnly));
        assert_eq!(
            check(&t.record, &format!("{secret}x"), 2000),
            Err(OperatorTokenError::Wrong)
        );
        assert_eq!(
            check(&t.record, secret, 5000),
            Err(OperatorTokenError::Expired)
        );
        let revoked = OperatorTokenRecord {
            revoked_at: Some(1500),
            ..t.record.clone()
        };
        assert_eq!(
            check(&revoked, secret, 2000),
            Err(OperatorTokenError::Revoked)
        );
        for bad in [
            "",
            "migop_",
            "migop_zz_x",
            "migvm1.x.y",
            "migop_0123456789abcdef_short",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(mint("bad name!", Role::Admin, "cli", 0, None).is_err());
        Ok(())
    }
}
