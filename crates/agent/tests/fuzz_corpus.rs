//! Replays the fuzz corpora of the agent's parsers on stable (see `fuzz/`).

use miglet::fuzzing::{agent_yaml, runner_line};
use miglet_proto::fuzzing::replay;

#[test]
fn runner_line_corpus() {
    assert!(replay(env!("CARGO_MANIFEST_DIR"), "runner_line", runner_line) > 0);
}

#[test]
fn agent_yaml_corpus() {
    assert!(replay(env!("CARGO_MANIFEST_DIR"), "agent_yaml", agent_yaml) > 0);
}
