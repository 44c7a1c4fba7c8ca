//! The controller's operations, shared by the HTTP and gRPC front ends.
//!
//! Every operation on a VM runs under that VM's lock (see [`VmLocks`]): read the record,
//! decide with the pure functions of [`crate::lifecycle`], write the outcome as one atomic
//! store batch, and only then answer. Work on different VMs runs in parallel and shares the
//! store's group commits.

mod announce;
mod backstop;
pub use backstop::BackstopPass;
mod delivery;
mod history;
pub use history::{PoolSample, SAMPLE_SECS};
mod identity;
mod ingest;
mod jobs;
pub use jobs::{QueueStats, WebhookAnswer, WebhookHeaders};
pub mod local;
mod reconcile;
mod registration;
mod runners;
mod scaler;
pub use scaler::{Advertised, PoolScaleView};
mod stream;

pub(crate) use identity::fill_pool;

use crate::auth::{Named, Principal};
use crate::config::Settings;
use crate::error::ApiError;
use crate::lifecycle::{self, Channel, Contact, ContactKind};
use crate::store::{
    CommandRecord, CommandState, EventRow, HeartbeatInput, Millis, Mutation, Outcome, PendingWrite,
    RegistrationRow, Store, VmLogRow, VmRecord, millis,
};
use crate::streams::{StreamHandle, Streams, VmLocks};
use miglet_proto::command::{
    Command, CommandEnvelope, REDACTED, REGISTER_RUNNER, RegisterRunner, redact_secrets,
};
use miglet_proto::event::{EventKind, EventReport, HeartbeatReport};
use miglet_proto::ids::{validate_id, validate_type_name, validate_vm_id};
use miglet_proto::json::{CommandJson, RegistrationTokenRequest, RegistrationTokenResponse};
use miglet_proto::pb;
use serde_json::{Map, Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Longest acknowledgment message kept.
const MAX_ACK_MESSAGE: usize = 4096;

/// Which transport a report arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Grpc,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Grpc => "grpc",
        }
    }
}

/// An agent's acknowledgment of one command.
#[derive(Debug)]
pub struct Ack<'a> {
    pub command_id: &'a str,
    pub success: bool,
    pub message: &'a str,
    pub result: Map<String, Value>,
    /// `http` or `grpc`, for the command's history.
    pub via: &'a str,
}

/// The result of storing an event.
#[derive(Debug, Clone)]
pub struct EventAccepted {
    pub vm: VmRecord,
    /// The event id was stored before; nothing changed.
    pub duplicate: bool,
}

/// A new stream session: its handle and what to send right after the `connect_ack`.
#[derive(Debug)]
pub struct StreamOpened {
    pub handle: StreamHandle,
    /// Commands already marked delivered on this stream.
    pub commands: Vec<pb::Command>,
    /// Commands still open for the VM (for redelivery timing).
    pub open: usize,
    /// The session should look for deliverable commands at once.
    pub deliver_now: bool,
    /// The open's write, still being committed: the session sends the `connect_ack` and
    /// `commands` (all stored before) at once, then waits for it with
    /// [`Controller::stream_open_commit`] before anything else. `None` when the write is
    /// already durable (a connect that starts a boot: that is the VM's `vm_started`).
    pub commit: Option<OpenSettling>,
}

/// A reconnect's write, committing in a task of the app that holds the VM's lock until it
/// is durable. The session waits on it before anything else happens on the stream.
#[derive(Debug)]
pub struct OpenSettling(tokio::sync::oneshot::Receiver<Result<(), ApiError>>);

impl OpenSettling {
    /// Waits until the open's write is committed (or failed; the session must then end).
    pub async fn settled(self) -> Result<(), ApiError> {
        self.0
            .await
            .unwrap_or(Err(ApiError::Store(crate::store::StoreError::Closed)))
    }
}

/// A stream open's write in flight, with the VM's lock held until it is committed.
#[derive(Debug)]
struct OpenCommit {
    write: PendingWrite,
    _guard: tokio::sync::OwnedMutexGuard<()>,
    vm: VmRecord,
    plan: Option<DeliveryPlan>,
    via: String,
    now: Millis,
    registration_id: Option<String>,
    remote: Option<SocketAddr>,
    new_boot: bool,
    stream_id: String,
}

/// Commands picked for delivery and the write that marks them delivered.
#[derive(Debug)]
struct DeliveryPlan {
    open: Vec<CommandRecord>,
    envelopes: Vec<CommandEnvelope>,
    /// Marks them delivered, and notes on the VM's log what GitHub minted for it.
    writes: Vec<Mutation>,
}

/// What one reconciler pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub expired_commands: usize,
    pub health_changes: usize,
    pub registrations_issued: usize,
    pub heartbeats_pruned: u64,
    pub events_pruned: u64,
}

/// What one pass over the runners on GitHub did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunnerReport {
    /// Runners of boots that ended, removed by id (or found gone already).
    pub removed_at_end: usize,
    /// Runners on GitHub no VM needs: marked this pass, and deleted (marked at an earlier one).
    pub runners_marked: usize,
    pub runners_deleted: usize,
}

#[derive(Debug)]
pub struct Controller {
    store: Store,
    settings: Arc<Settings>,
    streams: Streams,
    locks: VmLocks,
    shutdown: CancellationToken,
    gate: crate::auth::Gatekeeper,
    metrics: crate::metrics::Metrics,
    /// When the last retention pass ran (Unix ms).
    last_prune: std::sync::atomic::AtomicI64,
    /// Bumped after every stored event, so live views wake up at once.
    events_stored: tokio::sync::watch::Sender<u64>,
    /// Each VM's pool and org, for checks without a store read.
    names: identity::NameCache,
    audit: crate::audit::Audit,
    /// When the last GitHub runner cleanup ran (Unix ms), and the runners it marked stale.
    last_runner_cleanup: std::sync::atomic::AtomicI64,
    runner_marks: std::sync::Mutex<std::collections::HashSet<u64>>,
    /// The latest alert of each pool (in memory: the events that raised it are stored).
    pool_alerts: std::sync::Mutex<std::collections::HashMap<String, crate::token::PoolAlert>>,
    /// Runners that look like ghosts: since when (Unix ms), and whether flagged yet.
    ghost_since: std::sync::Mutex<std::collections::HashMap<u64, (Millis, bool)>>,
    /// Runners of boots that are done, by runner name, to remove from GitHub once due.
    ended_runners: std::sync::Mutex<std::collections::HashMap<String, runners::EndedRunner>>,
    /// Where agents of VMs the scaler creates reach this controller.
    advertised: std::sync::OnceLock<scaler::Advertised>,
    /// Asks the scaler for a pass (demand or a VM changed).
    scale_nudge: tokio::sync::Notify,
    /// The scaler's last figures per pool.
    pool_scale: std::sync::Mutex<std::collections::HashMap<String, scaler::PoolScaleView>>,
    /// Sized pools whose provider passed its preflight check.
    pool_preflighted: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Each sized pool's recent samples, for the dashboard's chart.
    pool_history:
        std::sync::Mutex<std::collections::HashMap<String, std::collections::VecDeque<PoolSample>>>,
}

/// Why a registration token is refused once a job ran on the VM's current boot.
const JOB_STARTED: &str = "a job already started on this VM's current boot; its registration token is not handed out again";

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

fn check_optional_id(what: &'static str, v: Option<&str>) -> Result<(), ApiError> {
    match v {
        Some(s) if !s.is_empty() => validate_id(what, s).map_err(bad),
        _ => Ok(()),
    }
}

impl Controller {
    pub fn new(
        store: Store,
        settings: Arc<Settings>,
        shutdown: CancellationToken,
        gate: crate::auth::Gatekeeper,
    ) -> Arc<Controller> {
        // GitHub's metrics only where a pool mints on GitHub, so a controller without one
        // exports none of them empty.
        let mints_on_github = settings.pools.any_github();
        let metrics = crate::metrics::Metrics::new(
            &store,
            mints_on_github.then_some(&settings.github_metrics),
        );
        Arc::new(Controller {
            metrics,
            audit: crate::audit::Audit::new(store.clone(), settings.clock.clone()),
            last_prune: std::sync::atomic::AtomicI64::new(0),
            last_runner_cleanup: std::sync::atomic::AtomicI64::new(0),
            runner_marks: Default::default(),
            ghost_since: Default::default(),
            ended_runners: Default::default(),
            advertised: Default::default(),
            scale_nudge: Default::default(),
            pool_scale: Default::default(),
            pool_history: Default::default(),
            pool_preflighted: Default::default(),
            pool_alerts: Default::default(),
            store,
            settings,
            streams: Streams::default(),
            locks: VmLocks::default(),
            shutdown,
            gate,
            events_stored: tokio::sync::watch::Sender::new(0),
            names: identity::NameCache::default(),
        })
    }

    /// Unix ms now, on the controller's clock.
    pub(crate) fn now_ms(&self) -> Millis {
        self.settings.clock.now_ms()
    }

    /// The latest alert of `pool_id`, if any.
    pub fn pool_alert(&self, pool_id: &str) -> Option<crate::token::PoolAlert> {
        self.pool_alerts().get(pool_id).cloned()
    }

    fn pool_alerts(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, crate::token::PoolAlert>> {
        self.pool_alerts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The controller's clock (tests move it forward instead of sleeping).
    pub fn clock(&self) -> &crate::clock::Clock {
        &self.settings.clock
    }

    /// The audit log's writer.
    pub fn audit(&self) -> &crate::audit::Audit {
        &self.audit
    }

    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// The metrics in the Prometheus text format, fleet gauges read now.
    pub async fn render_metrics(&self) -> String {
        self.metrics
            .render(&self.store, self.streams.count(), self.now_ms())
            .await
    }

    /// Changes after every stored event (for live event streams).
    pub fn events_stored(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events_stored.subscribe()
    }

    /// Authentication, authorization and rate limits.
    pub fn gate(&self) -> &crate::auth::Gatekeeper {
        &self.gate
    }

    /// The store's read side: all the admin API and the metrics may use.
    pub fn reads(&self) -> &crate::store::Reads {
        &self.store
    }

    /// The whole store, writes included: for the controller's own wiring and for tests. Front
    /// ends read through [`Controller::reads`] and write through the operations of this
    /// type (`tests/it/layers.rs` checks it).
    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn streams(&self) -> &Streams {
        &self.streams
    }

    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    fn redeliver_after(&self) -> Millis {
        self.settings.redelivery_timeout.as_millis() as Millis
    }
}
