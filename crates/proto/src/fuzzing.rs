//! Entry points for the fuzz targets in `fuzz/` and the corpus replay tests (stable Rust).
//! Each takes arbitrary bytes as they would arrive from outside, must never panic, and checks
//! what must hold for any input the parsers accept (round trips, lossless conversions).

use crate::command::CommandEnvelope;
use crate::event::{EventReport, HeartbeatReport};
use crate::json::{
    CommandAckBody, CommandJson, CommandsResponse, EnrollRequest, EventBody, HeartbeatBody,
    RegistrationTokenRequest,
};
use crate::pb;
use prost::Message;

/// Runs `target` on every input of the corpus `fuzz/corpus/<name>` (from the repository
/// root, found from `manifest_dir`) and of `fuzz/regressions/<name>` (inputs that once failed,
/// kept by name; `cargo fuzz cmin` never touches them): what coverage-guided fuzzing found is
/// replayed on stable by the tests. Answers how many inputs ran; panics if the corpus is
/// missing.
pub fn replay(manifest_dir: &str, name: &str, target: fn(&[u8])) -> usize {
    let fuzz = std::path::Path::new(manifest_dir).join("../../fuzz");
    let corpus = fuzz.join("corpus").join(name);
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&corpus)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", corpus.display()))
        .chain(
            std::fs::read_dir(fuzz.join("regressions").join(name))
                .into_iter()
                .flatten(),
        )
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for f in &files {
        let data = match std::fs::read(f) {
            Ok(d) => d,
            // A fuzzer running beside the tests replaces inputs as it shrinks them.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", f.display()),
        };
        // Which input failed, if one does.
        let guard = Named(f);
        target(&data);
        std::mem::forget(guard);
    }
    files.len()
}

/// Names the corpus input a panic came from (dropped only while unwinding).
struct Named<'a>(&'a std::path::Path);

impl Drop for Named<'_> {
    fn drop(&mut self) {
        eprintln!("the input that failed: {}", self.0.display());
    }
}

/// An HTTP JSON body of any kind the controller or the agent reads.
pub fn json_body(data: &[u8]) {
    if let Ok(b) = serde_json::from_slice::<EventBody>(data) {
        // Typed views of any event never panic and survive a round trip through both forms.
        let report = EventReport::from_json(b);
        let _ = report.kind();
        let again = EventReport::from_json(report.to_json());
        assert_eq!(
            again.kind(),
            report.kind(),
            "event kind changed in a round trip"
        );
        let via_pb = EventReport::from_pb(&report.to_pb());
        assert_eq!(via_pb.event_type, report.event_type);
        let _ = serde_json::to_string(&report);
    }
    if let Ok(b) = serde_json::from_slice::<HeartbeatBody>(data) {
        let report = HeartbeatReport::from_json(b);
        sane_health(&report);
        let vm = report.vm_id.clone().unwrap_or_else(|| "vm".into());
        let again = HeartbeatReport::from_json(report.to_json(&vm));
        assert_eq!(again.miglet_state, report.miglet_state);
        let _ = report.to_pb(&vm);
    }
    if let Ok(c) = serde_json::from_slice::<CommandJson>(data) {
        command_json(&c);
    }
    if let Ok(r) = serde_json::from_slice::<CommandsResponse>(data) {
        for c in &r.commands {
            command_json(c);
        }
    }
    let _ = serde_json::from_slice::<CommandAckBody>(data);
    if let Ok(e) = serde_json::from_slice::<EnrollRequest>(data) {
        // Debug never shows the proofs.
        let shown = format!("{e:?}");
        for secret in [&e.bootstrap_secret, &e.identity_token, &e.enrollment_token]
            .into_iter()
            .flatten()
            .filter(|s| s.len() >= 8)
        {
            assert!(!shown.contains(secret.as_str()), "a proof in Debug output");
        }
    }
    let _ = serde_json::from_slice::<RegistrationTokenRequest>(data);
    if let Ok(s) = std::str::from_utf8(data) {
        if crate::ids::validate_id("id", s).is_ok() {
            assert!(
                !s.contains('/') && !s.contains("..") && s.len() <= crate::ids::MAX_ID_LEN,
                "an id that is not safe as a path component passed"
            );
        }
        let _ = crate::ids::validate_type_name("type", s);
    }
}

/// The message with its float fields' NaNs made comparable (NaN is not equal to itself; the
/// maps' order is not stable, so comparing encoded bytes would not do either).
fn without_nan(mut m: pb::MiGletMessage) -> pb::MiGletMessage {
    if let Some(pb::mi_glet_message::Message::Heartbeat(h)) = &mut m.message
        && let Some(health) = &mut h.health
    {
        for f in [
            &mut health.cpu_usage_percent,
            &mut health.memory_usage_percent,
            &mut health.disk_usage_percent,
        ] {
            if f.is_nan() {
                *f = -1.0;
            }
        }
    }
    m
}

/// Health figures that reach the store are finite and not negative, whatever was sent.
fn sane_health(r: &HeartbeatReport) {
    let h = &r.health;
    if let Some(c) = h.cpu_percent {
        assert!(c.is_finite() && c >= 0.0, "cpu figure {c} passed");
    }
    for b in [
        h.memory_used_bytes,
        h.memory_total_bytes,
        h.disk_used_bytes,
        h.disk_total_bytes,
    ]
    .into_iter()
    .flatten()
    {
        assert!(b >= 0, "negative byte count {b} passed");
    }
}

/// A command in JSON: its typed form converts to gRPC and back without loss.
fn command_json(c: &CommandJson) {
    let Ok(env) = CommandEnvelope::from_json(c) else {
        return;
    };
    let back = CommandEnvelope::from_pb(&env.to_pb());
    if let Ok(back) = back {
        assert_eq!(back.command, env.command, "command changed through gRPC");
    }
    let again = CommandEnvelope::from_json(&env.to_json());
    assert!(
        again.is_ok_and(|a| a.command == env.command),
        "command changed through JSON"
    );
}

/// A protobuf message off the stream, either direction.
pub fn protobuf(data: &[u8]) {
    if let Ok(m) = pb::MiGletMessage::decode(data) {
        let re = pb::MiGletMessage::decode(m.encode_to_vec().as_slice()).map(without_nan);
        assert_eq!(
            re.ok(),
            Some(without_nan(m.clone())),
            "agent message changed in a round trip"
        );
        match &m.message {
            Some(pb::mi_glet_message::Message::Event(e)) => {
                let report = EventReport::from_pb(e);
                let _ = report.kind();
                let _ = report.to_json();
            }
            Some(pb::mi_glet_message::Message::Heartbeat(h)) => {
                let report = HeartbeatReport::from_pb(h);
                sane_health(&report);
                let _ = report.to_json("vm");
            }
            _ => {}
        }
    }
    if let Ok(m) = pb::ControllerMessage::decode(data) {
        let re = pb::ControllerMessage::decode(m.encode_to_vec().as_slice());
        assert_eq!(
            re.ok().as_ref(),
            Some(&m),
            "controller message changed in a round trip"
        );
        if let Some(pb::controller_message::Message::Command(c)) = &m.message
            && let Ok(env) = CommandEnvelope::from_pb(c)
        {
            let back = CommandEnvelope::from_json(&env.to_json());
            assert!(
                back.is_ok_and(|b| b.command == env.command),
                "command changed through JSON"
            );
        }
    }
}
