//! The MIGlet <-> MIG controller contract, in one place for both sides.
//!
//! * [`pb`]: the gRPC messages and service of `proto/commands.proto` (package
//!   `miglet.commands`), generated at build time.
//! * [`json`]: serde types for every HTTP JSON body of PROTOCOL.md.
//! * [`command`]: the typed [`command::Command`] enum with lossless conversion to and from
//!   both wire forms.
//! * [`event`]: typed events and heartbeats, transport-neutral, with conversion from both
//!   wire forms.
//! * [`ids`]: validation of identifiers that arrive from outside.
//! * [`codec`]: the gRPC codec (prost with small per-stream buffers).
//!
//! Encode and decode of each type sit next to each other so the two sides cannot drift.

pub mod backoff;
pub mod codec;
pub mod command;
pub mod event;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod json;
pub mod settings;
pub mod state;

/// Generated protobuf messages and the `CommandService` client and server.
#[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("miglet.commands");
}

/// Converts Unix seconds to a UTC time; out-of-range values become `None`.
pub fn from_unix(secs: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    if secs <= 0 {
        return None;
    }
    chrono::DateTime::from_timestamp(secs, 0)
}

/// Formats a time the way every JSON body of the contract does (RFC3339, UTC, `Z`).
pub fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Formats an error with its whole source chain (`a: b: c`), for logs and messages (TLS and
/// connection failures hide their reason in the chain).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
