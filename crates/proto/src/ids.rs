//! Identifiers that arrive from outside (URL paths, JSON bodies, gRPC messages) and end up in
//! storage keys and file names. Anything else is rejected before it reaches the store.

use thiserror::Error;

/// The longest accepted `vm_id`, `pool_id`, `org_id` or command id.
pub const MAX_ID_LEN: usize = 128;

/// Why an identifier was refused. The message is safe to show to the caller.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} is longer than {MAX_ID_LEN} characters")]
    TooLong { what: &'static str },
    #[error(
        "{what} must start with a letter or digit and contain only letters, digits, '.', '_' and '-'"
    )]
    BadCharacters { what: &'static str },
    #[error("{what} must not contain '..'")]
    DotDot { what: &'static str },
    #[error("{what} must be lower-case letters, digits and '_' (e.g. job_started)")]
    BadTypeName { what: &'static str },
}

/// Checks `value` against `[A-Za-z0-9][A-Za-z0-9._-]{0,127}` with no `..` anywhere, so it is
/// safe as a path component and a storage key. `what` names the field in the error.
pub fn validate_id(what: &'static str, value: &str) -> Result<(), IdError> {
    let bytes = value.as_bytes();
    let Some(first) = bytes.first() else {
        return Err(IdError::Empty { what });
    };
    if bytes.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { what });
    }
    if !first.is_ascii_alphanumeric()
        || !bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(IdError::BadCharacters { what });
    }
    if value.contains("..") {
        return Err(IdError::DotDot { what });
    }
    Ok(())
}

/// [`validate_id`] for a VM id.
pub fn validate_vm_id(value: &str) -> Result<(), IdError> {
    validate_id("vm_id", value)
}

/// Event and command types: lower-case words joined by `_` (`vm_started`), at most 64 bytes.
pub fn validate_type_name(what: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { what });
    }
    if value.len() > 64 {
        return Err(IdError::TooLong { what });
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(IdError::BadTypeName { what });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_ids() {
        for ok in [
            "vm-123",
            "a",
            "test-vm-001",
            "gke.node_1-a",
            "9",
            &"x".repeat(128),
        ] {
            assert_eq!(validate_vm_id(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_unsafe_ids() {
        let cases: [(&str, IdError); 8] = [
            ("", IdError::Empty { what: "vm_id" }),
            (&"x".repeat(129), IdError::TooLong { what: "vm_id" }),
            ("../etc", IdError::BadCharacters { what: "vm_id" }),
            ("a/b", IdError::BadCharacters { what: "vm_id" }),
            ("a..b", IdError::DotDot { what: "vm_id" }),
            ("-a", IdError::BadCharacters { what: "vm_id" }),
            ("a b", IdError::BadCharacters { what: "vm_id" }),
            ("vm\u{e9}", IdError::BadCharacters { what: "vm_id" }),
        ];
        for (bad, want) in cases {
            assert_eq!(validate_vm_id(bad), Err(want), "{bad:?}");
        }
    }

    #[test]
    fn type_names() {
        assert!(validate_type_name("type", "vm_started").is_ok());
        assert!(validate_type_name("type", "job_heartbeat").is_ok());
        assert!(validate_type_name("type", "../x").is_err());
        assert!(validate_type_name("type", "VM").is_err());
        assert!(validate_type_name("type", "").is_err());
    }
}
