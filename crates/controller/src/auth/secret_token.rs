//! The shape shared by every token the controller mints and looks up by id (operator tokens
//! `migop_<id>_<secret>`, enrollment tokens `migenr_<id>_<secret>`): a public 16-hex-digit id
//! that names the token in listings and the audit log, and a secret of 32 random bytes shown
//! once and stored only as its SHA-256 (a hash of 256 random bits needs no slow KDF).

use super::{random_bytes, sha256_hex};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

/// A new token's parts.
#[derive(Debug)]
pub struct Parts {
    pub id: String,
    /// What goes after the id in the token, shown once.
    pub secret: String,
    /// What is stored.
    pub hash: String,
}

/// Fresh random parts; `None` when the system has no randomness to give.
pub fn new_parts() -> Option<Parts> {
    let id: String = random_bytes(8)
        .ok()?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let secret = B64.encode(random_bytes(32).ok()?);
    let hash = sha256_hex(secret.as_bytes());
    Some(Parts { id, secret, hash })
}

/// The token text for `prefix` and `parts`.
pub fn render(prefix: &str, parts: &Parts) -> String {
    format!("{prefix}{}_{}", parts.id, parts.secret)
}

/// Splits `token` into its id and secret if it has `prefix` and the right shape.
pub fn split<'a>(prefix: &str, token: &'a str) -> Option<(&'a str, &'a str)> {
    let (id, secret) = token.strip_prefix(prefix)?.split_once('_')?;
    (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) && secret.len() >= 32)
        .then_some((id, secret))
}

/// Whether `secret` is the one whose hash is `stored_hash`, compared in constant time.
pub fn matches(secret: &str, stored_hash: &str) -> bool {
    let presented = sha256_hex(secret.as_bytes());
    aws_lc_rs::constant_time::verify_slices_are_equal(presented.as_bytes(), stored_hash.as_bytes())
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_render_split_and_match() {
        let p = new_parts().unwrap_or_else(|| panic!("randomness"));
        let token = render("migx_", &p);
        let (id, secret) = split("migx_", &token).unwrap_or_else(|| panic!("split {token}"));
        assert_eq!((id, secret), (p.id.as_str(), p.secret.as_str()));
        assert!(matches(secret, &p.hash));
        assert!(!matches("other", &p.hash));
        assert!(split("migy_", &token).is_none());
        assert!(split("migx_", "migx_short_secret").is_none());
        assert!(split("migx_", &format!("migx_{}", p.secret)).is_none());
    }
}
