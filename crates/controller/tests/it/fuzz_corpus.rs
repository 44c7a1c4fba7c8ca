//! Replays the fuzz corpora of the controller's parsers on stable (see `fuzz/`).

use mig_controller::fuzzing::{controller_toml, credentials};
use miglet_proto::fuzzing::replay;

#[test]
fn controller_toml_corpus() {
    assert!(
        replay(
            env!("CARGO_MANIFEST_DIR"),
            "controller_toml",
            controller_toml
        ) > 0
    );
}

#[test]
fn credentials_corpus() {
    assert!(replay(env!("CARGO_MANIFEST_DIR"), "credentials", credentials) > 0);
}
