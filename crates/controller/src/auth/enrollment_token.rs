//! One-time enrollment tokens: `migenr_<id>_<secret>`, minted for one VM id and one pool (by an
//! operator with `mig-controller enrollment-token create` or the admin API, or by the provider
//! that creates the VM), exchanged once for a credential before they expire.
//!
//! A pool's bootstrap secret proves only membership of the pool: whoever holds it may enroll
//! any VM id of that pool not bound yet. An enrollment token proves the VM: it names the one
//! VM id it is for, and a copy is worthless once the VM has used it.

use super::secret_token;
use crate::store::{EnrollmentTokenRecord, Millis};
use thiserror::Error;

pub const PREFIX: &str = "migenr_";

/// Longest lifetime an enrollment token may be given (7 days).
pub const MAX_TTL_SECS: u64 = 7 * 86_400;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnrollmentTokenError {
    #[error("not an enrollment token")]
    Malformed,
    #[error("unknown or wrong enrollment token")]
    Wrong,
    #[error("enrollment token is for another VM or pool")]
    OtherVm,
    #[error("enrollment token was already used; mint a new one")]
    Used,
    #[error("enrollment token expired; mint a new one")]
    Expired,
    #[error("enrollment token lifetime must be 1 s to {MAX_TTL_SECS} s")]
    BadTtl,
    #[error("no randomness available")]
    Random,
}

/// A freshly minted token: `token` is handed to the VM once and never shown again.
#[derive(Debug)]
pub struct NewEnrollmentToken {
    pub token: String,
    pub record: EnrollmentTokenRecord,
}

/// Mints a token for `vm_id` in `pool_id`, valid `ttl_secs` from `now`. The ids must be valid
/// (the caller checked them).
pub fn mint(
    vm_id: &str,
    pool_id: &str,
    created_by: &str,
    now: Millis,
    ttl_secs: u64,
) -> Result<NewEnrollmentToken, EnrollmentTokenError> {
    if ttl_secs == 0 || ttl_secs > MAX_TTL_SECS {
        return Err(EnrollmentTokenError::BadTtl);
    }
    let parts = secret_token::new_parts().ok_or(EnrollmentTokenError::Random)?;
    Ok(NewEnrollmentToken {
        token: secret_token::render(PREFIX, &parts),
        record: EnrollmentTokenRecord {
            id: parts.id,
            vm_id: vm_id.to_owned(),
            pool_id: pool_id.to_owned(),
            secret_hash: parts.hash,
            created_at: now,
            created_by: created_by.to_owned(),
            expires_at: now + (ttl_secs as Millis) * 1000,
            used_at: None,
        },
    })
}

/// Splits a token into its id and secret.
pub fn parse(token: &str) -> Result<(&str, &str), EnrollmentTokenError> {
    secret_token::split(PREFIX, token).ok_or(EnrollmentTokenError::Malformed)
}

/// May `secret` enroll `vm_id` into `pool_id` at `now`, given the stored `record`?
pub fn check(
    record: &EnrollmentTokenRecord,
    secret: &str,
    vm_id: &str,
    pool_id: &str,
    now: Millis,
) -> Result<(), EnrollmentTokenError> {
    if !secret_token::matches(secret, &record.secret_hash) {
        return Err(EnrollmentTokenError::Wrong);
    }
    if record.vm_id != vm_id || record.pool_id != pool_id {
        return Err(EnrollmentTokenError::OtherVm);
    }
    if record.used_at.is_some() {
        return Err(EnrollmentTokenError::Used);
    }
    if record.expires_at <= now {
        return Err(EnrollmentTokenError::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_enrolls_its_vm_once_before_it_expires() -> Result<(), EnrollmentTokenError> {
        let t = mint("vm-1", "p", "operator:alice", 1_000, 60)?;
        assert!(t.token.starts_with(PREFIX));
        assert!(!t.token.contains(&t.record.secret_hash));
        let (id, secret) = parse(&t.token)?;
        assert_eq!(id, t.record.id);
        assert_eq!(check(&t.record, secret, "vm-1", "p", 2_000), Ok(()));
        assert_eq!(
            check(&t.record, "x", "vm-1", "p", 2_000),
            Err(EnrollmentTokenError::Wrong)
        );
        assert_eq!(
            check(&t.record, secret, "vm-2", "p", 2_000),
            Err(EnrollmentTokenError::OtherVm)
        );
        assert_eq!(
            check(&t.record, secret, "vm-1", "q", 2_000),
            Err(EnrollmentTokenError::OtherVm)
        );
        assert_eq!(
            check(&t.record, secret, "vm-1", "p", 61_000),
            Err(EnrollmentTokenError::Expired)
        );
        let used = EnrollmentTokenRecord {
            used_at: Some(1_500),
            ..t.record.clone()
        };
        assert_eq!(
            check(&used, secret, "vm-1", "p", 2_000),
            Err(EnrollmentTokenError::Used)
        );
        assert_eq!(
            mint("vm-1", "p", "x", 0, 0).err(),
            Some(EnrollmentTokenError::BadTtl)
        );
        assert_eq!(
            mint("vm-1", "p", "x", 0, MAX_TTL_SECS + 1).err(),
            Some(EnrollmentTokenError::BadTtl)
        );
        assert_eq!(
            parse("migop_x").err(),
            Some(EnrollmentTokenError::Malformed)
        );
        Ok(())
    }
}
