//! Replays the fuzz corpora of the protocol's parsers on stable (see `fuzz/`).

use miglet_proto::fuzzing::{json_body, protobuf, replay};

#[test]
fn json_bodies_corpus() {
    assert!(replay(env!("CARGO_MANIFEST_DIR"), "json_bodies", json_body) > 0);
}

#[test]
fn protobuf_corpus() {
    assert!(replay(env!("CARGO_MANIFEST_DIR"), "protobuf", protobuf) > 0);
}
