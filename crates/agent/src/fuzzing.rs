//! Entry points for the fuzz targets in `fuzz/` and the corpus replay tests (stable Rust):
//! what the agent parses from outside must never panic on any bytes.

use crate::config::{AgentArgs, FileConfig, MetadataValues, Settings};
use crate::machine::parse_runner_line;

/// A line the runner printed (stdout or stderr, any bytes).
pub fn runner_line(data: &[u8]) {
    let line = String::from_utf8_lossy(data);
    if let Some(parsed) = parse_runner_line(&line) {
        // What it found came from the line.
        let _ = format!("{parsed:?}");
    }
    for l in line.lines() {
        let _ = parse_runner_line(l);
    }
}

/// The agent's YAML config file, then layered into settings as at start.
pub fn agent_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = serde_yaml_ng::from_str::<FileConfig>(text) else {
        return;
    };
    for root in [false, true] {
        let _ = Settings::resolve(
            &AgentArgs::default(),
            &file,
            &MetadataValues::default(),
            root,
        );
    }
}
