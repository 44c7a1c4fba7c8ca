//! Stand-ins for what tests and demos cannot reach, speaking the real protocols:
//!
//! * [`github`]: the GitHub side of a self-hosted runner: the registration-token exchange that
//!   `config.sh` performs, and job dispatch to a registered runner (driven by the test).
//! * [`runner_dir`]: installs a runner directory (`config.sh`, `run.sh`, `env.sh`,
//!   `bin/Runner.Listener`) whose listener is the `fake-runner-listener` binary of this crate.
//! * [`metadata`]: the GCE metadata server, including instance identity tokens.
//! * [`google`]: Google's token signing keys: the JWKS endpoint the controller verifies
//!   instance identity tokens against, and the minting of such tokens.
//! * [`fleet`]: simulated agents that speak the contract like the real one (reconnecting
//!   and replaying what was not acknowledged), for the load generator and the fault suite.
//! * [`proxy`]: a TCP proxy that breaks the agent-controller path on command (delay,
//!   blackhole, half-open, reset) and gives a restarted controller a stable address.
//!
//! * [`testkit`]: what both test suites need: bounded waits, files read back, secret scans.
//!
//! Nothing here is linked into the agent or the controller.

pub mod fleet;
pub mod gce_mig;
pub mod github;
pub mod google;
pub mod google_oauth;
pub mod metadata;
pub mod proxy;
pub mod runner_dir;
pub mod testkit;

/// The runner version the stand-in reports.
pub const RUNNER_VERSION: &str = "2.336.0";
