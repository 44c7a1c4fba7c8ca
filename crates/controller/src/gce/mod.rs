//! Google Compute Engine as the controller drives it (issue 16, in progress): how the
//! controller gets an access token ([`auth`]: the metadata server when it runs on GCE/GKE, a
//! service-account key otherwise), the calls on one managed instance group ([`mig`]), the
//! `gce-mig` provider over them ([`provider`]), and the pure rules of managed instance groups
//! ([`rules`]: which MIG settings delete busy VMs, how Compute's errors are classified, what a
//! managed instance's state means to the scaler). The provider lives here, not under
//! `provider/`, so that `provider` never depends on `gce`.

pub mod auth;
pub mod mig;
pub mod provider;
pub mod rules;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum GceError {
    /// No access token could be had (a bad key file, a refused grant, no metadata server).
    #[error("Google authentication failed: {0}")]
    Auth(String),
    #[error("Google could not be reached: {0}")]
    Transport(String),
    #[error("Google's answer is not what its API documents: {0}")]
    BadAnswer(String),
    #[error("{0}")]
    Config(String),
}

impl GceError {
    /// Worth trying again soon by itself.
    pub fn is_transient(&self) -> bool {
        matches!(self, GceError::Transport(_))
    }
}
