//! The controller's durable store: every VM, event, heartbeat, registration and command.
//!
//! All SQL of the controller lives in this module, behind the one [`Store`] type; nothing
//! else in the crate knows there is a database. Read method names are resource-first
//! (`vm_get`, `events_for_vm`, `commands_open_for_vm`, ...), declared once on [`Reads`].
//!
//! Writes are expressed as data ([`Mutation`]) and handed to a single writer task that
//! group-commits: every [`Store::write`] call is one atomic unit (it fails or succeeds alone),
//! many of them share one transaction and one fsync, and the call returns only after that
//! transaction is durable. This gives the throughput of batching while each request is still
//! acknowledged only after its data is on disk. Heartbeats and job events of many VMs in one
//! group share multi-row statements. Reads use a separate connection pool and see every
//! committed write.
//!
//! Today the backend is SQLite (WAL, `synchronous=FULL`). A PostgreSQL backend will be a
//! second implementation of the same methods, selected when the store is opened; the rest of
//! the controller does not change.
//!
//! # What a backend guarantees
//!
//! * **Atomic, durable, ordered writes.** A [`Store::write`] batch is applied entirely or
//!   not at all, and its answer comes only once it is durable (a crash after the answer
//!   loses nothing); batches are applied in the order they were submitted
//!   ([`Store::submit`] returns once queued, so a caller holding a VM's lock keeps its order).
//!   A failed batch fails alone, never its neighbours in a group commit.
//! * **Reads see every answered write** ([`Reads`], a pool of read connections).
//! * **Row operations, no rules.** Each [`Mutation`] is one row operation whose result is
//!   reported in its [`Outcome`]. Those that must be idempotent say so on their variant:
//!   an event is stored once per `(vm_id, event_id)` (`Inserted(false)` for a repeat); a
//!   used identity token or enrollment token is claimed once; a command moves only along
//!   [`crate::lifecycle::may_transition`], whatever the caller asks (`Applied(false)`);
//!   `MarkDelivered` and `ExpireCommands` touch only commands the same table allows. The
//!   decisions themselves (which VM is silent and what that does, what a heartbeat does
//!   to a VM, which command expires) are computed by [`crate::lifecycle`] and passed in, or
//!   applied by calling it in the writer (`IngestHeartbeat`). A write that acts on what a
//!   sweep read (`SilenceVm`) is a compare-and-set on that read, so a VM heard from in
//!   between is left alone.
//! * **Candidate reads narrow, the lifecycle decides.** A read that feeds a sweep
//!   (`vms_silent_before`, `vms_needing_registration`) may filter with indexed predicates so
//!   that a pass over 20,000 VMs reads only the few that can change; it must return a
//!   superset of what the lifecycle would act on (tested against the lifecycle's own
//!   predicate), and the caller re-checks every row with the lifecycle.
//! * **Errors say what happened, not what was stored**: [`StoreError`] never carries row
//!   data (which may hold secrets); a full disk is recognisable ([`StoreError::is_disk_full`]).
//! * **Schema history is append-only**: numbered migrations, each applied once; an
//!   existing data dir keeps opening.

mod sqlite;

use chrono::Utc;
use serde::Serialize;
use serde_json::{Map, Value};
use std::path::Path;
use thiserror::Error;

pub use crate::model::*;
pub use sqlite::{Reads, SqliteStore};

/// Store failures. Messages never contain stored data (which may hold secrets).
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("failed to open the database at {path}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("failed to apply migration {version} ({name})")]
    Migrate {
        version: i64,
        name: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
    #[error("the store is closed")]
    Closed,
}

impl From<crate::model::UnknownValue> for StoreError {
    fn from(e: crate::model::UnknownValue) -> StoreError {
        StoreError::Corrupt(e.0)
    }
}

impl StoreError {
    /// What an operator should do about this failure, for the ERROR line that reports it.
    pub fn advice(&self) -> &'static str {
        let code = match self {
            StoreError::Query(_) => self.sqlite_code(),
            StoreError::Open { .. } => {
                return "check that the data dir exists, is writable by the controller, and is not used by another controller process";
            }
            StoreError::Migrate { .. } => {
                return "the data dir's schema could not be upgraded: restore the data dir from a backup or report the error";
            }
            StoreError::Closed => return "the controller is shutting down; the client retries",
            StoreError::Corrupt(_) => {
                return "a stored row does not read back: restore the data dir from a backup or report the error";
            }
        };
        match code {
            Some(13) => {
                "the disk holding the data dir is full: free space there; writes resume by themselves, clients retry, and nothing was acknowledged that is not stored"
            }
            Some(8) => "the data dir is read-only: make it writable by the controller",
            Some(10) => "the disk holding the data dir failed an I/O: check the disk",
            Some(5 | 6) => "the database is locked: is another process using the data dir?",
            _ => {
                "the write was not stored and the client retries; if this repeats, check the data dir's disk"
            }
        }
    }
}

impl StoreError {
    /// SQLite's primary result code of a failed query, if it has one (the extended codes
    /// keep it in the low byte). A failure replayed to a group's callers keeps only its
    /// text, so the code is read from that too.
    pub fn sqlite_code(&self) -> Option<i64> {
        let StoreError::Query(e) = self else {
            return None;
        };
        let code = match e {
            sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
            other => other
                .to_string()
                .split("(code: ")
                .nth(1)
                .and_then(|rest| rest.split(')').next())
                .map(str::to_owned),
        };
        code.and_then(|c| c.parse::<i64>().ok()).map(|c| c & 0xff)
    }

    /// Whether the disk holding the store is full (`SQLITE_FULL`).
    pub fn is_disk_full(&self) -> bool {
        self.sqlite_code() == Some(13)
    }
}

/// One retention pass (times in Unix ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prune {
    /// Heartbeats received at or after this are all kept.
    pub heartbeats_full_after: Millis,
    /// Older ones keep one per VM per bucket of this many ms ...
    pub heartbeat_bucket_ms: Millis,
    /// ... and those received before this are deleted.
    pub heartbeats_drop_before: Millis,
    /// Events received before this are deleted; `None` keeps them all. Completed jobs and
    /// deleted instances last changed before it go too.
    pub events_drop_before: Option<Millis>,
    /// Rows of each kind deleted at most per pass.
    pub limit: i64,
}

/// Which VMs a page lists, in `vm_id` order after `after`.
#[derive(Debug, Clone, Default)]
pub struct VmFilter {
    /// `Some(empty)` matches nothing.
    pub pools: Option<Vec<String>>,
    pub state: Option<String>,
    pub health: Option<Health>,
    /// Substring of the VM id or of its current job (run id, repository, job name).
    pub text: Option<String>,
    pub after: Option<String>,
    pub limit: u32,
}

/// Which events a page lists: newest first below `before_seq`, or oldest first above
/// `after_seq` (for following a live stream).
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub types: Vec<String>,
    pub vm_id: Option<String>,
    pub pool_id: Option<String>,
    /// Received at or after (Unix ms).
    pub since: Option<Millis>,
    /// Received before (Unix ms).
    pub until: Option<Millis>,
    /// Substring of the event's data.
    pub text: Option<String>,
    pub before_seq: Option<i64>,
    pub after_seq: Option<i64>,
    pub limit: u32,
}

/// Which commands a page lists, newest first below `before_seq`.
#[derive(Debug, Clone, Default)]
pub struct CommandFilter {
    pub vm_id: Option<String>,
    pub state: Option<CommandState>,
    pub command_type: Option<String>,
    pub before_seq: Option<i64>,
    pub limit: u32,
}

/// What the metrics read from the store at each scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetGauges {
    /// Per pool: the oldest last heartbeat (or boot, if none yet) of a live VM.
    pub oldest_heartbeat_by_pool: Vec<(String, Millis)>,
    /// Per state: when the VM that has been in it longest entered it.
    pub oldest_by_state: Vec<(String, Millis)>,
    pub commands_by_state: Vec<(String, i64)>,
}

/// How many VMs of a pool are in one state and health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolCount {
    pub pool_id: String,
    pub state: String,
    pub health: Health,
    pub count: i64,
    pub connected: i64,
}

/// One write. A [`Store::write`] call applies a list of them atomically.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Insert or replace the whole VM row.
    PutVm(VmRecord),
    /// Note contact with a VM (any message) and mark it healthy again.
    TouchVm {
        vm_id: String,
        at: Millis,
    },
    SetConnected {
        vm_id: String,
        connected: bool,
        at: Millis,
    },
    /// Insert an event unless its `(vm_id, event_id)` is stored already:
    /// [`Outcome::Inserted`] says which.
    InsertEvent(EventRow),
    Heartbeat {
        row: HeartbeatRow,
        vm: HeartbeatVmUpdate,
    },
    /// Apply a heartbeat to the VM as stored when the write runs (adopting an unknown VM):
    /// no read before the write, and consecutive heartbeats share statements.
    IngestHeartbeat(Box<HeartbeatInput>),
    InsertRegistration(RegistrationRow),
    InsertCommand(CommandRecord),
    /// Move a command to `to` if the transition table ([`crate::lifecycle::may_transition`])
    /// allows it from its current state: [`Outcome::Applied`] says whether.
    CommandTransition {
        id: String,
        to: CommandState,
        at: Millis,
        detail: Option<String>,
        result_message: Option<String>,
        result: Option<Map<String, Value>>,
    },
    /// Fault injection for tests: put a command back in `state` as a restore from an older
    /// backup would (the transition table does not apply; nothing in the controller sends it).
    #[doc(hidden)]
    RestoreCommandState {
        id: String,
        state: CommandState,
        at: Millis,
    },
    /// Record that open commands went out on `via`.
    MarkDelivered {
        ids: Vec<String>,
        at: Millis,
        via: String,
    },
    VmLog(VmLogRow),
    InsertOperatorToken(OperatorTokenRecord),
    /// Revoke an operator token unless revoked already: [`Outcome::Applied`] says whether.
    RevokeOperatorToken {
        id: String,
        at: Millis,
    },
    Audit(AuditRow),
    /// Record that an identity token (by hash) was exchanged, unless it was before:
    /// [`Outcome::Inserted`] is false for a replay. Also forgets tokens past their expiry.
    ClaimIdentityToken {
        token_hash: String,
        vm_id: String,
        now: Millis,
        expires_at: Millis,
    },
    /// Bind a VM id to a pool unless it is bound already: [`Outcome::Inserted`] says whether.
    BindVm(VmBinding),
    /// Bind a VM id to a pool, replacing any binding (an operator's move).
    RebindVm(VmBinding),
    /// Mark every VM disconnected (a new controller process holds no stream yet), logging
    /// `stream_disconnected` for each that was marked connected: [`Outcome::Count`].
    ResetConnections {
        at: Millis,
    },
    InsertEnrollmentToken(EnrollmentTokenRecord),
    /// Use an enrollment token unless it was used before: [`Outcome::Applied`] says whether.
    /// Also forgets tokens that expired more than a day ago.
    UseEnrollmentToken {
        id: String,
        at: Millis,
    },
    /// Thin and drop old history: [`Outcome::Pruned`] says how many rows went.
    PruneHistory(Prune),
    /// Expire every open command whose `expires_at` is at or before `now`:
    /// [`Outcome::Expired`].
    ExpireCommands {
        now: Millis,
    },
    /// What silence does to one VM ([`crate::lifecycle::silent_change`]), applied only if
    /// the VM is still as the sweep read it (`seen_at` is its `last_seen_at` then, and the
    /// health or state the change starts from): a VM heard from since is left alone.
    /// Logged in the VM's log: [`Outcome::Applied`].
    SilenceVm {
        vm_id: String,
        seen_at: Millis,
        change: SilentChange,
        at: Millis,
    },
    /// Record a webhook delivery as applied unless it was before: [`Outcome::Inserted`] is
    /// false for a redelivery. Also forgets deliveries older than `forget_before`.
    ClaimDelivery {
        delivery_id: String,
        at: Millis,
        forget_before: Millis,
    },
    /// Insert or replace a job's row, unless the stored row is at a later status (a late
    /// delivery never moves a job back): [`Outcome::Applied`] says whether.
    PutJob(JobRecord),
    /// Insert or replace an instance's row.
    PutInstance(InstanceRecord),
}

/// The result of one [`Mutation`], in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done,
    Inserted(bool),
    Applied(bool),
    Expired(Vec<ExpiredCommand>),
    /// `scaling`: completed jobs and deleted instances.
    Pruned {
        heartbeats: u64,
        events: u64,
        scaling: u64,
    },
    Count(u64),
}

/// A queued write (see [`Store::submit`]).
#[derive(Debug)]
pub struct PendingWrite {
    reply: sqlite::Pending,
    started: std::time::Instant,
    write_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl PendingWrite {
    /// Waits until the write is committed; its outcomes, or why it failed.
    pub async fn durable(self) -> Result<Vec<Outcome>, StoreError> {
        let out = self.reply.await.map_err(|_| StoreError::Closed)?;
        self.write_seconds
            .observe(self.started.elapsed().as_secs_f64());
        out
    }
}

/// The store handle. Cheap to clone. Reads are the methods of [`Reads`], which the handle
/// derefs to; writes go through [`Store::write`] / [`Store::submit`].
#[derive(Debug, Clone)]
pub struct Store {
    backend: SqliteStore,
    /// Seconds each [`Store::write`] took, queueing and commit included.
    write_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Store {
    /// Opens (creating if needed) the embedded SQLite store in `data_dir` and applies any
    /// pending migrations.
    pub async fn open_sqlite(data_dir: &Path) -> Result<Store, StoreError> {
        Ok(Store {
            backend: SqliteStore::open(data_dir).await?,
            write_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 14),
            ),
        })
    }

    /// Applies `batch` atomically; returns once it is durable.
    pub async fn write(&self, batch: Vec<Mutation>) -> Result<Vec<Outcome>, StoreError> {
        self.submit(batch).await?.durable().await
    }

    /// Queues `batch` to be applied atomically after every batch queued before it, and
    /// returns without waiting for the commit: [`PendingWrite::durable`] waits. Callers
    /// that hold a VM's lock keep it until then, so nothing reads the VM in between.
    pub async fn submit(&self, batch: Vec<Mutation>) -> Result<PendingWrite, StoreError> {
        let started = std::time::Instant::now();
        Ok(PendingWrite {
            reply: self.backend.submit(batch).await?,
            started,
            write_seconds: self.write_seconds.clone(),
        })
    }

    /// The write latency histogram (for the metrics registry).
    pub fn write_seconds(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.write_seconds.clone()
    }

    /// Fault injection for tests: the next `writes` writes (batches) holding a mutation that
    /// `hits` (from those not yet committed) fail as on a full disk.
    #[doc(hidden)]
    pub async fn fail_next_writes(&self, writes: usize, hits: fn(&Mutation) -> bool) {
        self.backend.fail_next_writes(writes, hits).await;
    }

    /// Commits everything queued, then stops the writer. Later writes fail with `Closed`.
    pub async fn close(&self) {
        self.backend.close().await;
    }
}

impl std::ops::Deref for Store {
    type Target = Reads;

    fn deref(&self) -> &Reads {
        self.backend.reads()
    }
}
