//! Entry points for the fuzz targets in `fuzz/` and the corpus replay tests (stable Rust):
//! the controller's parsers of outside input must never panic on any bytes, and what they
//! accept must hold up.

use crate::auth::credential::{CredentialKey, VmClaims};
use crate::auth::{enrollment_token, gce, operator};
use crate::config::{FileConfig, ServeArgs, Settings};

/// The TOML config file, then layered into settings as at start. A parse error never quotes
/// the file's text: a line may hold a secret. The seeds carry a marker inside a string value
/// (`"..._SECRETVALUE_..."`) that no error message may repeat.
pub fn controller_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match toml::from_str::<FileConfig>(text) {
        Ok(file) => {
            let _ = Settings::resolve(ServeArgs::default(), file);
        }
        Err(e) => {
            let shown = crate::config::ConfigError::Parse {
                path: "controller.toml".into(),
                line: 1,
                message: e.message().to_owned(),
            }
            .to_string();
            let secret_value = text.lines().any(|l| {
                l.split_once('=').is_some_and(|(_, v)| {
                    let v = v.trim_start();
                    v.starts_with('"') && v.contains(MARKER)
                })
            });
            if secret_value {
                assert!(
                    !shown.contains(MARKER),
                    "the parse error quotes a value: {shown}"
                );
            }
        }
    }
}

const MARKER: &str = "SECRETVALUE";

/// Anything presented as a credential or token: VM credentials (verified with a key the
/// input does not know, so nothing verifies), operator and enrollment tokens, GCE identity
/// tokens up to the key lookup. Claims the input names survive being issued and verified.
pub fn credentials(data: &[u8]) {
    let key = CredentialKey::from_bytes(&[7u8; 32]);
    let text = String::from_utf8_lossy(data);
    assert!(
        key.verify(&text, 1_000_000_000).is_err(),
        "an input nobody signed verified"
    );
    let _ = operator::parse(&text);
    let _ = enrollment_token::parse(&text);
    let _ = gce::signing_key_id(&text);
    let _ = crate::auth::bearer(&text);
    // The input's bytes as claims: issued, they verify to the same claims.
    let mut parts = text.splitn(3, '\n');
    let claims = VmClaims {
        vm_id: parts.next().unwrap_or_default().to_owned(),
        pool_id: parts.next().unwrap_or_default().to_owned(),
        issued_at: 1_000,
        expires_at: 2_000,
        enrolled_at: 1_000,
        credential_id: parts.next().unwrap_or_default().to_owned(),
    };
    let token = key.issue(&claims);
    if token.len() <= 2048 {
        assert_eq!(key.verify(&token, 1_500).ok().as_ref(), Some(&claims));
        assert!(key.verify(&token, 2_000).is_err(), "expired yet verified");
    }
}
