//! The agent's lifecycle states as they appear on the wire (`miglet_state`).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Every state of PROTOCOL.md's boot flow. `Connecting` is the prototype's older name for
/// `WaitingForController` and is accepted when reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigletState {
    Initializing,
    #[serde(alias = "connecting")]
    WaitingForController,
    Ready,
    RegisteringRunner,
    Idle,
    JobRunning,
    Draining,
    ShuttingDown,
    Error,
}

impl MigletState {
    pub const ALL: [MigletState; 9] = [
        MigletState::Initializing,
        MigletState::WaitingForController,
        MigletState::Ready,
        MigletState::RegisteringRunner,
        MigletState::Idle,
        MigletState::JobRunning,
        MigletState::Draining,
        MigletState::ShuttingDown,
        MigletState::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MigletState::Initializing => "initializing",
            MigletState::WaitingForController => "waiting_for_controller",
            MigletState::Ready => "ready",
            MigletState::RegisteringRunner => "registering_runner",
            MigletState::Idle => "idle",
            MigletState::JobRunning => "job_running",
            MigletState::Draining => "draining",
            MigletState::ShuttingDown => "shutting_down",
            MigletState::Error => "error",
        }
    }
}

impl fmt::Display for MigletState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `miglet_state` string that is not one of the contract's states.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown miglet_state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for MigletState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "connecting" {
            return Ok(MigletState::WaitingForController);
        }
        MigletState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for st in MigletState::ALL {
            assert_eq!(st.as_str().parse::<MigletState>(), Ok(st));
            let json = serde_json::to_string(&st).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", st.as_str()));
        }
        assert_eq!(
            "connecting".parse::<MigletState>(),
            Ok(MigletState::WaitingForController)
        );
        assert!("bogus".parse::<MigletState>().is_err());
    }
}
