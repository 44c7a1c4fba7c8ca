//! Where a pool's VMs come from: one trait every provider implements (`local`: `miglet`
//! processes on this machine; `exec`: an external program per call; a GCE managed instance
//! group fits the same shape), used only by the scaler.
//!
//! Every call is **idempotent** and names its instances (the scaler chooses names and
//! records them before it asks): creating a name that exists, deleting one that is gone, or
//! asking twice changes nothing. A provider may work asynchronously (a MIG schedules what it
//! is asked): `create` returning means "asked", and [`Provider::list`] is the truth about
//! what exists. Errors say whether trying again can help.

pub mod exec;
pub mod local;

use crate::model::Millis;
use std::future::Future;
use std::pin::Pin;

/// One VM to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// The instance name, which is also the VM id its agent reports.
    pub name: String,
    pub pool_id: String,
    /// Per-VM settings for its agent (`MIGLET_*` environment variables, or metadata keys
    /// for a cloud provider).
    pub settings: Vec<(String, String)>,
    /// Per-VM secrets (e.g. a one-time enrollment token), never logged; a provider hands
    /// them to the VM as files or metadata only it can read.
    pub secret_files: Vec<(String, String)>,
}

/// What the provider says about an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceStatus {
    /// Asked for, not running yet.
    Creating,
    Running,
    /// Being deleted, or stopped and about to be.
    Stopping,
    /// Stopped on its own (the process exited, the VM powered off).
    Stopped,
}

impl InstanceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Creating => "creating",
            InstanceStatus::Running => "running",
            InstanceStatus::Stopping => "stopping",
            InstanceStatus::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderInstance {
    pub name: String,
    /// The provider's own id, when it has one (a GCE instance id: a name that comes back
    /// with another id is another VM).
    pub id: Option<String>,
    pub status: InstanceStatus,
    pub created_at: Option<Millis>,
    /// Why the provider cannot bring it up, while it keeps trying (a stock-out, a quota).
    pub trouble: Option<String>,
}

/// A provider failure.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Worth trying again later (a timeout, a quota, a stock-out, a busy API).
    #[error("{0} (will retry)")]
    Retryable(String),
    /// Will not work until someone changes something (a bad path, a permission).
    #[error("{0}")]
    Fatal(String),
}

/// A pool the scaler sizes: its rules and where its VMs come from.
#[derive(Debug, Clone)]
pub struct PoolScaling {
    pub policy: crate::lifecycle::ScalePolicy,
    pub provider: std::sync::Arc<dyn Provider>,
}

pub type ProviderFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, ProviderError>> + Send + 'a>>;

/// Creates, deletes and lists a pool's instances.
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// `local`, `gce-mig`, `exec`.
    fn kind(&self) -> &'static str;
    /// Asks for the instances (names that exist already are left as they are).
    fn create<'a>(&'a self, specs: &'a [InstanceSpec]) -> ProviderFuture<'a, ()>;
    /// Deletes the named instances (names that are gone are fine).
    fn delete<'a>(&'a self, names: &'a [String]) -> ProviderFuture<'a, ()>;
    /// Every instance of the pool the provider knows of.
    fn list(&self) -> ProviderFuture<'_, Vec<ProviderInstance>>;

    /// Checked before the pool's first pass (and again after a failure): warnings about the
    /// provider's own settings that can hurt running jobs, or an error when the pool must not
    /// be scaled until someone fixes them.
    fn preflight(&self) -> ProviderFuture<'_, Vec<String>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}
