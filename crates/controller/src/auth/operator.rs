//! Operator API tokens: `migop_<id>_<secret>`.
//!
//! The id is public (it names the token in listings and the audit log); the secret is 32
//! random bytes, shown once at creation and stored only as its SHA-256 (a hash of 256 random
//! bits needs no slow KDF). Verifying a token looks up its id and compares hashes in
//! constant time.

use super::{Operator, Role, random_bytes, sha256_hex};
use crate::store::{Millis, OperatorTokenRecord};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
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
    let id_bytes = random_bytes(8).map_err(|_| OperatorTokenError::Random)?;
    let id: String = id_bytes.iter().map(|b| format!("{b:02x}")).collect();
    let secret = B64.encode(random_bytes(32).map_err(|_| OperatorTokenError::Random)?);
    let token = format!("{PREFIX}{id}_{secret}");
    Ok(NewToken {
        token,
        record: OperatorTokenRecord {
            id,
            name: name.to_owned(),
            role,
            secret_hash: sha256_hex(secret.as_bytes()),
            created_at: now,
            created_by: created_by.to_owned(),
            expires_at,
            revoked_at: None,
        },
    })
}

/// Splits a token into its id and secret.
pub fn parse(token: &str) -> Result<(&str, &str), OperatorTokenError> {
    let rest = token
        .strip_prefix(PREFIX)
        .ok_or(OperatorTokenError::Malformed)?;
    let (id, secret) = rest.split_once('_').ok_or(OperatorTokenError::Malformed)?;
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) || secret.len() < 32 {
        return Err(OperatorTokenError::Malformed);
    }
    Ok((id, secret))
}

/// Checks `secret` against the stored `record` at `now`.
pub fn check(
    record: &OperatorTokenRecord,
    secret: &str,
    now: Millis,
) -> Result<Operator, OperatorTokenError> {
    let presented = sha256_hex(secret.as_bytes());
    aws_lc_rs::constant_time::verify_slices_are_equal(
        presented.as_bytes(),
        record.secret_hash.as_bytes(),
    )
    .map_err(|_| OperatorTokenError::Wrong)?;
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
