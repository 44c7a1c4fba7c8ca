//! SQLite implementation of the store (see the module docs of [`super`]).

mod identity;

use super::*;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, QueryBuilder, Row, Sqlite};
use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Numbered migrations, applied in order, each once. Never edit a released one: add a new one.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../../migrations/0001_init.sql")),
    (2, "auth", include_str!("../../../migrations/0002_auth.sql")),
    (
        3,
        "state_since",
        include_str!("../../../migrations/0003_state_since.sql"),
    ),
    (
        4,
        "retention",
        include_str!("../../../migrations/0004_retention.sql"),
    ),
    (
        5,
        "pool_binding",
        include_str!("../../../migrations/0005_pool_binding.sql"),
    ),
];

/// How many [`Store::write`] calls share one transaction at most.
const MAX_GROUP: usize = 1024;
/// The writer connection's page cache: 64 MiB (negative = KiB, SQLite's convention).
const WRITER_CACHE: &str = "-65536";
/// WAL pages before the writer checkpoints by itself (SQLite's default is 1,000): only if the
/// background checkpointer (every [`CHECKPOINT_EVERY`]) falls far behind.
const WAL_CHECKPOINT_PAGES: &str = "65536";
/// Bytes the WAL file keeps after a checkpoint resets it (it is truncated to this), so a
/// burst's WAL does not hold disk space for ever.
const WAL_SIZE_LIMIT: &str = "4194304";
/// WAL frames (about 4 KiB each) above which the checkpointer empties the WAL file once it is
/// fully copied back. Under continuous writes SQLite never starts the WAL over by itself (a
/// writer only rewinds a WAL that was completely backfilled when its transaction began), so
/// without this the file grows for as long as the fleet writes.
const WAL_RESET_FRAMES: i64 = 1024;
/// Attempts per tick at starting the WAL over, and the pause between them. Each attempt
/// takes the write lock only if it is free and gives it back at once if a reader still uses
/// the WAL (no busy handler): waiting for readers while holding the lock stalled the writer,
/// and SQLite's busy handler stretched each stall further (a 5–50 ms wait put the
/// 20,000-agent registration p99 at 20–44 ms).
const RESET_ATTEMPTS: u32 = 5;
const RESET_PAUSE: Duration = Duration::from_millis(2);
/// How often the background checkpointer copies the WAL back. Fleet writes dirty many index
/// pages per commit; copying once a second writes a hot page back once, not once per commit.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Most rows written by one multi-row statement (and most batches coalesced into a run).
const MAX_RUN: usize = 256;
/// A group commit slower than this is logged as a warning.
const SLOW_COMMIT: Duration = Duration::from_millis(100);
/// Queue depth in front of the writer; callers wait (backpressure) when it is full.
const QUEUE_DEPTH: usize = 8192;

type Reply = oneshot::Sender<Result<Vec<Outcome>, StoreError>>;
/// Which writes an injected fault hits.
pub type FaultMatch = fn(&Mutation) -> bool;
/// The answer to a submitted write.
pub type Pending = oneshot::Receiver<Result<Vec<Outcome>, StoreError>>;

enum Msg {
    Write(Vec<Mutation>, Reply),
    Close(oneshot::Sender<()>),
    /// Fail the next `n` writes that hold a mutation matching the predicate, as a full disk
    /// would (fault injection for tests).
    FailNext(usize, FaultMatch, oneshot::Sender<()>),
}

#[derive(Debug, Clone)]
pub struct SqliteStore {
    reads: SqlitePool,
    writes: mpsc::Sender<Msg>,
    writer: Arc<Mutex<Option<JoinHandle<()>>>>,
    checkpointer: Arc<Mutex<Option<Background>>>,
}

/// A background task and the token that stops it.
type Background = (CancellationToken, JoinHandle<()>);

impl SqliteStore {
    pub async fn open(data_dir: &Path) -> Result<SqliteStore, StoreError> {
        let path = data_dir.join("controller.db");
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        // Owner-only: the store holds the fleet's history and the operators' token hashes.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|e| open_err(sqlx::Error::Io(e)))?;
        let opts = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .pragma("temp_store", "memory")
            .log_statements(tracing::log::LevelFilter::Trace);
        // The writer's page cache stays valid (nothing else writes), so a large one keeps the
        // index pages that inserts land on in memory; readers' caches are reset by every
        // commit, so they keep SQLite's default.
        let mut writer = opts
            .clone()
            .pragma("cache_size", WRITER_CACHE)
            .pragma("wal_autocheckpoint", WAL_CHECKPOINT_PAGES)
            .pragma("journal_size_limit", WAL_SIZE_LIMIT)
            .connect()
            .await
            .map_err(open_err)?;
        migrate(&mut writer).await?;
        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(opts.clone().read_only(true))
            .await
            .map_err(open_err)?;
        let checkpoints = opts
            .clone()
            .busy_timeout(Duration::ZERO)
            .connect()
            .await
            .map_err(open_err)?;
        let stop = CancellationToken::new();
        // Set by the writer while writes fail because the disk is full; the checkpointer then
        // truncates the WAL, which is what gives the space back after a burst.
        let disk_full = Arc::new(AtomicBool::new(false));
        let checkpointer = tokio::spawn(checkpoint_loop(
            checkpoints,
            stop.clone(),
            disk_full.clone(),
        ));
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let handle = tokio::spawn(writer_loop(writer, rx, disk_full));
        Ok(SqliteStore {
            reads,
            writes: tx,
            writer: Arc::new(Mutex::new(Some(handle))),
            checkpointer: Arc::new(Mutex::new(Some((stop, checkpointer)))),
        })
    }

    /// Queues `batch` behind every write queued before it; the receiver answers once it is
    /// committed (or failed).
    pub async fn submit(&self, batch: Vec<Mutation>) -> Result<Pending, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.writes
            .send(Msg::Write(batch, reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    /// Fault injection for tests: the next `writes` writes holding a mutation that `hits`
    /// fail as on a full disk.
    #[doc(hidden)]
    pub async fn fail_next_writes(&self, writes: usize, hits: FaultMatch) {
        let (done, rx) = oneshot::channel();
        if self
            .writes
            .send(Msg::FailNext(writes, hits, done))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    pub async fn close(&self) {
        if let Some((stop, handle)) = self.checkpointer.lock().await.take() {
            stop.cancel();
            let _ = handle.await;
        }
        let (done, rx) = oneshot::channel();
        if self.writes.send(Msg::Close(done)).await.is_ok() {
            let _ = rx.await;
        }
        if let Some(handle) = self.writer.lock().await.take() {
            let _ = handle.await;
        }
        self.reads.close().await;
    }

    pub async fn vm_get(&self, vm_id: &str) -> Result<Option<VmRecord>, StoreError> {
        sqlx::query("SELECT * FROM vms WHERE vm_id = ?")
            .bind(vm_id)
            .fetch_optional(&self.reads)
            .await?
            .map(|r| vm_from_row(&r))
            .transpose()
    }

    pub async fn vms_list(&self) -> Result<Vec<VmRecord>, StoreError> {
        sqlx::query("SELECT * FROM vms ORDER BY vm_id")
            .fetch_all(&self.reads)
            .await?
            .iter()
            .map(vm_from_row)
            .collect()
    }

    pub async fn vms_needing_registration(&self) -> Result<Vec<VmRecord>, StoreError> {
        sqlx::query(
            "SELECT * FROM vms WHERE registration_command_id IS NULL AND runner_registered = 0 \
             AND state = 'ready' \
             AND health != 'lost' ORDER BY vm_id",
        )
        .fetch_all(&self.reads)
        .await?
        .iter()
        .map(vm_from_row)
        .collect()
    }

    pub async fn event_exists(&self, vm_id: &str, event_id: &str) -> Result<bool, StoreError> {
        Ok(
            sqlx::query("SELECT 1 FROM events WHERE vm_id = ? AND event_id = ?")
                .bind(vm_id)
                .bind(event_id)
                .fetch_optional(&self.reads)
                .await?
                .is_some(),
        )
    }

    pub async fn events_for_vm(&self, vm_id: &str) -> Result<Vec<EventRow>, StoreError> {
        sqlx::query("SELECT * FROM events WHERE vm_id = ? ORDER BY seq")
            .bind(vm_id)
            .fetch_all(&self.reads)
            .await?
            .iter()
            .map(event_from_row)
            .collect()
    }

    pub async fn heartbeats_for_vm(&self, vm_id: &str) -> Result<Vec<HeartbeatRow>, StoreError> {
        sqlx::query("SELECT * FROM heartbeats WHERE vm_id = ? ORDER BY seq")
            .bind(vm_id)
            .fetch_all(&self.reads)
            .await?
            .iter()
            .map(heartbeat_from_row)
            .collect()
    }

    pub async fn vms_page(&self, f: &VmFilter) -> Result<Vec<VmRecord>, StoreError> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM vms WHERE 1 = 1");
        if let Some(pools) = &f.pools {
            if pools.is_empty() {
                return Ok(Vec::new());
            }
            q.push(" AND pool_id IN (");
            let mut sep = q.separated(", ");
            for p in pools {
                sep.push_bind(p.clone());
            }
            q.push(")");
        }
        if let Some(state) = &f.state {
            q.push(" AND state = ").push_bind(state.clone());
        }
        if let Some(health) = f.health {
            q.push(" AND health = ").push_bind(health.as_str());
        }
        if let Some(text) = &f.text {
            let pattern = like_pattern(text);
            // The VM id, or a value (never a key) of its current job.
            q.push(" AND (vm_id LIKE ")
                .push_bind(pattern.clone())
                .push(" ESCAPE '\\' OR (current_job LIKE ")
                .push_bind(pattern.clone())
                .push(
                    " ESCAPE '\\' AND EXISTS (SELECT 1 FROM json_tree(vms.current_job) t \
                     WHERE t.type IN ('text', 'integer', 'real') AND t.atom LIKE ",
                )
                .push_bind(pattern)
                .push(" ESCAPE '\\')))");
        }
        if let Some(after) = &f.after {
            q.push(" AND vm_id > ").push_bind(after.clone());
        }
        q.push(" ORDER BY vm_id LIMIT ")
            .push_bind(i64::from(f.limit));
        q.build()
            .fetch_all(&self.reads)
            .await?
            .iter()
            .map(vm_from_row)
            .collect()
    }

    pub async fn events_page(&self, f: &EventFilter) -> Result<Vec<EventRow>, StoreError> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT e.* FROM events e");
        if f.pool_id.is_some() {
            q.push(" JOIN vms v ON v.vm_id = e.vm_id");
        }
        q.push(" WHERE 1 = 1");
        if let Some(pool) = &f.pool_id {
            q.push(" AND v.pool_id = ").push_bind(pool.clone());
        }
        if let Some(vm) = &f.vm_id {
            q.push(" AND e.vm_id = ").push_bind(vm.clone());
        }
        if !f.types.is_empty() {
            q.push(" AND e.event_type IN (");
            let mut sep = q.separated(", ");
            for t in &f.types {
                sep.push_bind(t.clone());
            }
            q.push(")");
        }
        if let Some(since) = f.since {
            q.push(" AND e.received_at >= ").push_bind(since);
        }
        if let Some(until) = f.until {
            q.push(" AND e.received_at < ").push_bind(until);
        }
        if let Some(text) = &f.text {
            // A value (never a key or the JSON around it) of the event's fields or metadata.
            // The plain LIKE over the document is a cheap first cut.
            let pattern = like_pattern(text);
            q.push(" AND e.data LIKE ")
                .push_bind(pattern.clone())
                .push(
                    " ESCAPE '\\' AND EXISTS (SELECT 1 FROM json_tree(e.data) t \
                     WHERE (t.fullkey LIKE '$.fields.%' OR t.fullkey LIKE '$.metadata.%') \
                     AND t.type IN ('text', 'integer', 'real') AND t.atom LIKE ",
                )
                .push_bind(pattern)
                .push(" ESCAPE '\\')");
        }
        if let Some(before) = f.before_seq {
            q.push(" AND e.seq < ").push_bind(before);
        }
        if let Some(after) = f.after_seq {
            q.push(" AND e.seq > ").push_bind(after);
            q.push(" ORDER BY e.seq ASC LIMIT ");
        } else {
            q.push(" ORDER BY e.seq DESC LIMIT ");
        }
        q.push_bind(i64::from(f.limit));
        q.build()
            .fetch_all(&self.reads)
            .await?
            .iter()
            .map(event_from_row)
            .collect()
    }

    pub async fn heartbeats_page(
        &self,
        vm_id: &str,
        since: Option<Millis>,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<HeartbeatRow>, StoreError> {
        sqlx::query(
            "SELECT * FROM heartbeats WHERE vm_id = ? AND received_at >= ? AND seq < ? \
             ORDER BY seq DESC LIMIT ?",
        )
        .bind(vm_id)
        .bind(since.unwrap_or(0))
        .bind(before_seq.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await?
        .iter()
        .map(heartbeat_from_row)
        .collect()
    }

    pub async fn fleet_gauges(&self) -> Result<FleetGauges, StoreError> {
        let heartbeats = sqlx::query(
            "SELECT pool_id, MIN(COALESCE(last_heartbeat_at, booted_at)) AS oldest FROM vms \
             WHERE health != 'lost' AND state != 'terminated' GROUP BY pool_id",
        )
        .fetch_all(&self.reads)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("pool_id")?, r.try_get("oldest")?)))
        .collect::<Result<Vec<(String, Millis)>, StoreError>>()?;
        let states = sqlx::query(
            "SELECT state, MIN(COALESCE(state_since, updated_at)) AS oldest FROM vms \
             WHERE health != 'lost' GROUP BY state",
        )
        .fetch_all(&self.reads)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("state")?, r.try_get("oldest")?)))
        .collect::<Result<Vec<(String, Millis)>, StoreError>>()?;
        let commands = sqlx::query("SELECT state, COUNT(*) AS n FROM commands GROUP BY state")
            .fetch_all(&self.reads)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
            .collect::<Result<Vec<(String, i64)>, StoreError>>()?;
        Ok(FleetGauges {
            oldest_heartbeat_by_pool: heartbeats,
            oldest_by_state: states,
            commands_by_state: commands,
        })
    }

    pub async fn pool_counts(&self) -> Result<Vec<PoolCount>, StoreError> {
        sqlx::query(
            "SELECT pool_id, state, health, COUNT(*) AS n, SUM(connected) AS connected \
             FROM vms GROUP BY pool_id, state, health ORDER BY pool_id, state, health",
        )
        .fetch_all(&self.reads)
        .await?
        .iter()
        .map(|r| {
            let health: String = r.try_get("health")?;
            Ok(PoolCount {
                pool_id: r.try_get("pool_id")?,
                state: r.try_get("state")?,
                health: health.parse()?,
                count: r.try_get("n")?,
                connected: r.try_get::<Option<i64>, _>("connected")?.unwrap_or(0),
            })
        })
        .collect()
    }

    pub async fn commands_page(&self, f: &CommandFilter) -> Result<Vec<CommandRecord>, StoreError> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM commands WHERE 1 = 1");
        if let Some(vm) = &f.vm_id {
            q.push(" AND vm_id = ").push_bind(vm.clone());
        }
        if let Some(state) = f.state {
            q.push(" AND state = ").push_bind(state.as_str());
        }
        if let Some(t) = &f.command_type {
            q.push(" AND command_type = ").push_bind(t.clone());
        }
        if let Some(before) = f.before_seq {
            q.push(" AND seq < ").push_bind(before);
        }
        q.push(" ORDER BY seq DESC LIMIT ")
            .push_bind(i64::from(f.limit));
        q.build()
            .fetch_all(&self.reads)
            .await?
            .iter()
            .map(command_from_row)
            .collect()
    }

    pub async fn registrations_for_vm(
        &self,
        vm_id: &str,
    ) -> Result<Vec<RegistrationRow>, StoreError> {
        sqlx::query("SELECT * FROM registrations WHERE vm_id = ? ORDER BY seq")
            .bind(vm_id)
            .fetch_all(&self.reads)
            .await?
            .iter()
            .map(|r| {
                Ok(RegistrationRow {
                    seq: r.try_get("seq")?,
                    vm_id: r.try_get("vm_id")?,
                    requested_at: r.try_get("requested_at")?,
                    request: r.try_get("request")?,
                    response: r.try_get("response")?,
                })
            })
            .collect()
    }

    pub async fn command_get(&self, id: &str) -> Result<Option<CommandRecord>, StoreError> {
        sqlx::query("SELECT * FROM commands WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.reads)
            .await?
            .map(|r| command_from_row(&r))
            .transpose()
    }

    pub async fn commands_for_vm(
        &self,
        vm_id: &str,
        open_only: bool,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let sql = if open_only {
            "SELECT * FROM commands WHERE vm_id = ? AND state IN ('pending', 'delivered') ORDER BY seq"
        } else {
            "SELECT * FROM commands WHERE vm_id = ? ORDER BY seq"
        };
        sqlx::query(sql)
            .bind(vm_id)
            .fetch_all(&self.reads)
            .await?
            .iter()
            .map(command_from_row)
            .collect()
    }

    pub async fn command_transitions(
        &self,
        command_id: &str,
    ) -> Result<Vec<CommandTransition>, StoreError> {
        sqlx::query("SELECT * FROM command_transitions WHERE command_id = ? ORDER BY seq")
            .bind(command_id)
            .fetch_all(&self.reads)
            .await?
            .iter()
            .map(|r| {
                Ok(CommandTransition {
                    command_id: r.try_get("command_id")?,
                    at: r.try_get("at")?,
                    from_state: r.try_get("from_state")?,
                    to_state: r.try_get("to_state")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    pub async fn operator_token_get(
        &self,
        id: &str,
    ) -> Result<Option<OperatorTokenRecord>, StoreError> {
        sqlx::query("SELECT * FROM operator_tokens WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.reads)
            .await?
            .map(|r| operator_token_from_row(&r))
            .transpose()
    }

    pub async fn operator_tokens_list(&self) -> Result<Vec<OperatorTokenRecord>, StoreError> {
        sqlx::query("SELECT * FROM operator_tokens ORDER BY created_at, id")
            .fetch_all(&self.reads)
            .await?
            .iter()
            .map(operator_token_from_row)
            .collect()
    }

    pub async fn audit_list(
        &self,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError> {
        sqlx::query("SELECT * FROM audit_log WHERE seq < ? ORDER BY seq DESC LIMIT ?")
            .bind(before_seq.unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&self.reads)
            .await?
            .iter()
            .map(|r| {
                Ok(AuditRow {
                    seq: r.try_get("seq")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    remote_addr: r.try_get("remote_addr")?,
                    outcome: r.try_get("outcome")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    pub async fn vm_log_for_vm(&self, vm_id: &str) -> Result<Vec<VmLogRow>, StoreError> {
        sqlx::query("SELECT * FROM vm_log WHERE vm_id = ? ORDER BY seq")
            .bind(vm_id)
            .fetch_all(&self.reads)
            .await?
            .iter()
            .map(|r| {
                Ok(VmLogRow {
                    vm_id: r.try_get("vm_id")?,
                    at: r.try_get("at")?,
                    kind: r.try_get("kind")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }
}

async fn migrate(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY NOT NULL, \
         name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
    )
    .execute(&mut *conn)
    .await?;
    for &(version, name, sql) in MIGRATIONS {
        let applied = sqlx::query("SELECT 1 FROM schema_migrations WHERE version = ?")
            .bind(version)
            .fetch_optional(&mut *conn)
            .await?
            .is_some();
        if applied {
            continue;
        }
        let err = |source| StoreError::Migrate {
            version,
            name,
            source,
        };
        let mut tx = conn.begin().await.map_err(err)?;
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(err)?;
        sqlx::query("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)")
            .bind(version)
            .bind(name)
            .bind(Utc::now().timestamp_millis())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        tracing::info!(version, name, "Applied store migration");
    }
    Ok(())
}

/// Copies the WAL back into the database from a connection of its own, so the writer never
/// pays for a checkpoint inside a commit (its own automatic checkpoint is only a safety net).
/// PASSIVE: never waits for, nor blocks, readers or the writer. Once the WAL holds more than
/// [`WAL_RESET_FRAMES`], all copied back, RESTART (up to [`RESET_ATTEMPTS`] tries that never
/// wait) so that the next write starts the WAL over. While the disk is full (`disk_full`), TRUNCATE: the same,
/// and it empties the WAL file, whose space is usually what the database needs to take writes
/// again.
async fn checkpoint_loop(
    mut conn: SqliteConnection,
    stop: CancellationToken,
    disk_full: Arc<AtomicBool>,
) {
    static FREED: crate::throttle::LogThrottle = crate::throttle::LogThrottle::new(10_000);
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {
                let full = disk_full.load(Ordering::Relaxed);
                let reset = full || match checkpoint(&mut conn, Checkpoint::Passive).await {
                    Ok((_, frames, copied)) => wal_needs_reset(frames, copied),
                    Err(e) => {
                        tracing::debug!(error = %e, "Background WAL checkpoint failed; will retry");
                        false
                    }
                };
                if !reset {
                    continue;
                }
                // RESTART makes the next writer start the WAL over (and cut the file to
                // WAL_SIZE_LIMIT) without giving the file's blocks back and allocating them
                // again; TRUNCATE empties the file, for when the disk needs that space.
                let mode = if full { Checkpoint::Truncate } else { Checkpoint::Restart };
                for attempt in 1..=RESET_ATTEMPTS {
                    match checkpoint(&mut conn, mode).await {
                        Ok((0, _, _)) => {
                            if full && FREED.allow_now().is_some() {
                                tracing::warn!("The data dir's disk is full: emptied the WAL file to give its space to new writes");
                            }
                            break;
                        }
                        Ok(_) => tracing::trace!(attempt, "WAL reset found the writer or a reader busy"),
                        Err(e) => tracing::trace!(attempt, error = %e, "WAL reset failed"),
                    }
                    tokio::time::sleep(RESET_PAUSE).await;
                }
            }
        }
    }
    let _ = conn.close().await;
}

#[derive(Clone, Copy)]
enum Checkpoint {
    Passive,
    Restart,
    Truncate,
}

/// Runs `PRAGMA wal_checkpoint(mode)`: (busy, frames in the WAL, frames copied back).
async fn checkpoint(
    conn: &mut SqliteConnection,
    mode: Checkpoint,
) -> Result<(i64, i64, i64), sqlx::Error> {
    let sql = match mode {
        Checkpoint::Passive => "PRAGMA wal_checkpoint(PASSIVE)",
        Checkpoint::Restart => "PRAGMA wal_checkpoint(RESTART)",
        Checkpoint::Truncate => "PRAGMA wal_checkpoint(TRUNCATE)",
    };
    let row = sqlx::query(sql).fetch_one(conn).await?;
    Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
}

/// Whether the WAL has grown past [`WAL_RESET_FRAMES`] and the PASSIVE checkpoint just
/// before copied all of it back (`copied == frames`): then RESTART copies nothing and holds up
/// the writer only while readers of an older snapshot finish, a few milliseconds at most. If
/// a reader kept it from copying everything, the next tick tries again. SQLite reports -1
/// frames when the connection is not in WAL mode.
fn wal_needs_reset(frames: i64, copied: i64) -> bool {
    frames > WAL_RESET_FRAMES && copied == frames
}

/// Notes a failed write: a full disk sets `disk_full` (see [`checkpoint_loop`]).
fn note_failure(disk_full: &AtomicBool, e: &StoreError) {
    if e.is_disk_full() {
        disk_full.store(true, Ordering::Relaxed);
    }
}

/// The single writer: takes every queued write, applies each in its own savepoint inside one
/// transaction, commits (one fsync for the group), then answers every caller.
async fn writer_loop(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<Msg>,
    disk_full: Arc<AtomicBool>,
) {
    let mut closing: Option<oneshot::Sender<()>> = None;
    let mut fault: (usize, FaultMatch) = (0, |_| false);
    while let Some(first) = rx.recv().await {
        let mut group: Vec<(Vec<Mutation>, Reply)> = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Write(batch, reply) => group.push((batch, reply)),
                Msg::Close(done) => closing = Some(done),
                Msg::FailNext(n, hits, done) => {
                    fault = (n, hits);
                    let _ = done.send(());
                }
            }
            if group.len() < MAX_GROUP && closing.is_none() {
                next = rx.try_recv().ok();
            }
        }
        if fault.0 > 0 {
            group.retain_mut(|(batch, reply)| {
                if fault.0 == 0 || !batch.iter().any(fault.1) {
                    return true;
                }
                fault.0 -= 1;
                let (dead, _) = oneshot::channel();
                let injected = std::io::Error::from(std::io::ErrorKind::StorageFull);
                let _ = std::mem::replace(reply, dead)
                    .send(Err(StoreError::Query(sqlx::Error::Io(injected))));
                false
            });
        }
        if !group.is_empty() {
            commit_group(&mut conn, group, &disk_full).await;
        }
        if closing.is_some() {
            // Commit whatever is still queued, then stop.
            rx.close();
            let mut rest = Vec::new();
            while let Ok(msg) = rx.try_recv() {
                if let Msg::Write(batch, reply) = msg {
                    rest.push((batch, reply));
                }
            }
            if !rest.is_empty() {
                commit_group(&mut conn, rest, &disk_full).await;
            }
            break;
        }
    }
    if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
    {
        tracing::warn!(error = %e, "WAL checkpoint at close failed");
    }
    let _ = conn.close().await;
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

async fn commit_group(
    conn: &mut SqliteConnection,
    group: Vec<(Vec<Mutation>, Reply)>,
    disk_full: &AtomicBool,
) {
    let started = std::time::Instant::now();
    let size = group.len();
    if let Err(e) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await {
        note_failure(disk_full, &StoreError::Query(clone_err(&e)));
        for (_, reply) in group {
            let _ = reply.send(Err(StoreError::Query(clone_err(&e))));
        }
        return;
    }
    // Fast path: the whole group without savepoints (two statements fewer per call, and
    // every statement is a round trip to SQLite's thread). Writes almost never fail; when
    // one does, the transaction is rolled back and the group is applied again with a
    // savepoint per call, so only the failing call fails. A group of one needs no retry:
    // its failure is the whole transaction's.
    let retry: Option<Vec<Vec<Mutation>>> =
        (size > 1).then(|| group.iter().map(|(b, _)| b.clone()).collect());
    let mut results: Vec<(Reply, Result<Vec<Outcome>, StoreError>)> = Vec::with_capacity(size);
    let mut failed = None;
    let mut items = group.into_iter().peekable();
    while let Some((batch, reply)) = items.next() {
        if failed.is_some() {
            results.push((reply, Err(StoreError::Closed)));
            continue;
        }
        // Consecutive heartbeats and job events of distinct VMs (the bulk of the fleet's
        // writes) are written together with multi-row statements.
        let (batch, reply) = if let Some(first_vm) = coalescible_vm(&batch) {
            let mut seen = std::collections::HashSet::from([first_vm.to_owned()]);
            let mut run = vec![(batch, reply)];
            while run.len() < MAX_RUN
                && let Some(next) =
                    items.next_if(|(b, _)| coalescible_vm(b).is_some_and(|vm| !seen.contains(vm)))
            {
                if let Some(vm) = coalescible_vm(&next.0) {
                    seen.insert(vm.to_owned());
                }
                run.push(next);
            }
            if run.len() > 1 {
                let at = results.len();
                match apply_run(conn, &run).await {
                    Ok(outcomes) => {
                        for ((_, reply), o) in run.into_iter().zip(outcomes) {
                            results.push((reply, Ok(o)));
                        }
                    }
                    Err(_) => {
                        for (_, reply) in run {
                            results.push((reply, Err(StoreError::Closed)));
                        }
                        failed = Some(at);
                    }
                }
                continue;
            }
            match run.pop() {
                Some(single) => single,
                None => continue,
            }
        } else {
            (batch, reply)
        };
        match apply_batch(conn, batch).await {
            Ok(outcomes) => results.push((reply, Ok(outcomes))),
            Err(e) => {
                failed = Some(results.len());
                results.push((reply, Err(e)));
            }
        }
    }
    if let Some(index) = failed {
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        if let Some((_, Err(e))) = results.get(index) {
            note_failure(disk_full, e);
        }
        match retry {
            None => {
                for (reply, res) in results {
                    let _ = reply.send(res);
                }
            }
            Some(batches) => {
                tracing::debug!(
                    size,
                    index,
                    "A write in a group failed; applying the group again with savepoints"
                );
                let replies = results.into_iter().map(|(r, _)| r).collect();
                commit_with_savepoints(conn, batches, replies, disk_full).await;
            }
        }
        return;
    }
    finish(conn, results, disk_full).await;
    let elapsed = started.elapsed();
    if elapsed > SLOW_COMMIT {
        tracing::warn!(
            size,
            elapsed_ms = elapsed.as_millis() as u64,
            "Slow store commit"
        );
    } else {
        tracing::trace!(
            size,
            elapsed_us = elapsed.as_micros() as u64,
            "Store group committed"
        );
    }
}

/// The careful path: each call in its own savepoint, so a failing call is undone alone.
async fn commit_with_savepoints(
    conn: &mut SqliteConnection,
    batches: Vec<Vec<Mutation>>,
    replies: Vec<Reply>,
    disk_full: &AtomicBool,
) {
    if let Err(e) = sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await {
        note_failure(disk_full, &StoreError::Query(clone_err(&e)));
        for reply in replies {
            let _ = reply.send(Err(StoreError::Query(clone_err(&e))));
        }
        return;
    }
    let mut results = Vec::with_capacity(replies.len());
    for (batch, reply) in batches.into_iter().zip(replies) {
        let res = apply_in_savepoint(conn, batch).await;
        results.push((reply, res));
    }
    finish(conn, results, disk_full).await;
}

/// Commits, then answers every caller: each its own result, or all the commit's failure.
async fn finish(
    conn: &mut SqliteConnection,
    results: Vec<(Reply, Result<Vec<Outcome>, StoreError>)>,
    disk_full: &AtomicBool,
) {
    static FAILED: crate::throttle::LogThrottle = crate::throttle::LogThrottle::new(1_000);
    match sqlx::query("COMMIT").execute(&mut *conn).await {
        Ok(_) => {
            disk_full.store(false, Ordering::Relaxed);
            for (reply, res) in results {
                let _ = reply.send(res);
            }
        }
        Err(e) => {
            let failure = StoreError::Query(clone_err(&e));
            note_failure(disk_full, &failure);
            if let Some(more) = FAILED.allow_now() {
                tracing::error!(
                    error = %e,
                    advice = failure.advice(),
                    similar_failures_not_logged = more,
                    "Store commit failed; the whole group is rejected"
                );
            }
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            for (reply, _) in results {
                let _ = reply.send(Err(StoreError::Query(clone_err(&e))));
            }
        }
    }
}

/// The VM of a batch that can share statements with its neighbours: a heartbeat, an event,
/// or an event with the VM's new record (what a job event stores), all about one VM.
fn coalescible_vm(batch: &[Mutation]) -> Option<&str> {
    match batch {
        [Mutation::Heartbeat { row, vm }] if row.vm_id == vm.vm_id => Some(&vm.vm_id),
        [Mutation::IngestHeartbeat(input)] => Some(&input.vm_id),
        [Mutation::InsertEvent(e)] => Some(&e.vm_id),
        [Mutation::InsertEvent(e), Mutation::PutVm(v)] if e.vm_id == v.vm_id => Some(&v.vm_id),
        _ => None,
    }
}

/// `(k placeholders), ...` for `n` rows.
fn value_rows(n: usize, k: usize) -> String {
    vec![format!("({})", vec!["?"; k].join(", ")); n].join(", ")
}

/// Power-of-two chunks up to [`MAX_RUN`] rows keep the set of distinct statements (and so
/// the prepared-statement cache) small.
fn chunk_len(left: usize) -> usize {
    1usize << left.clamp(1, MAX_RUN).ilog2()
}

/// Inserts events (duplicates of a stored `(vm_id, event_id)` are skipped); answers, in
/// order, whether each was inserted.
async fn insert_events(
    conn: &mut SqliteConnection,
    events: &[&EventRow],
) -> Result<Vec<bool>, StoreError> {
    let mut inserted = Vec::with_capacity(events.len());
    let mut rest = events;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(chunk_len(rest.len()));
        rest = tail;
        let sql = format!(
            "INSERT INTO events (vm_id, event_id, event_type, boot_id, transport, occurred_at, \
             received_at, data, raw) VALUES {} \
             ON CONFLICT (vm_id, event_id) WHERE event_id IS NOT NULL DO NOTHING \
             RETURNING vm_id, event_id",
            value_rows(chunk.len(), 9)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for e in chunk {
            q = q
                .bind(&e.vm_id)
                .bind(&e.event_id)
                .bind(&e.event_type)
                .bind(&e.boot_id)
                .bind(&e.transport)
                .bind(e.occurred_at)
                .bind(e.received_at)
                .bind(&e.data)
                .bind(&e.raw);
        }
        let mut stored = std::collections::HashSet::new();
        for r in q.fetch_all(&mut *conn).await? {
            if let Some(id) = r.try_get::<Option<String>, _>("event_id")? {
                stored.insert((r.try_get::<String, _>("vm_id")?, id));
            }
        }
        for e in chunk {
            inserted.push(match &e.event_id {
                // Events without an id are never deduplicated.
                None => true,
                Some(id) => stored.remove(&(e.vm_id.clone(), id.clone())),
            });
        }
    }
    Ok(inserted)
}

/// Inserts or replaces whole VM records (`state_since` moves only when the state changes).
/// The VMs must be distinct.
async fn put_vms(conn: &mut SqliteConnection, vms: &[&VmRecord]) -> Result<(), StoreError> {
    let mut rest = vms;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(chunk_len(rest.len()));
        rest = tail;
        let sql = format!(
            "INSERT INTO vms (vm_id, pool_id, org_id, boot_id, boot_seq, booted_at, \
             state, health, connected, last_seen_at, last_heartbeat_at, runner_state, current_job, \
             latest_health, registration_command_id, runner_registered, acks_commands, \
             agent_version, created_at, updated_at, job_started_at, state_since) VALUES {} \
             ON CONFLICT(vm_id) DO UPDATE SET pool_id = excluded.pool_id, \
             org_id = excluded.org_id, boot_id = excluded.boot_id, boot_seq = excluded.boot_seq, \
             booted_at = excluded.booted_at, state = excluded.state, health = excluded.health, \
             connected = excluded.connected, last_seen_at = excluded.last_seen_at, \
             last_heartbeat_at = excluded.last_heartbeat_at, runner_state = excluded.runner_state, \
             current_job = excluded.current_job, latest_health = excluded.latest_health, \
             registration_command_id = excluded.registration_command_id, \
             runner_registered = excluded.runner_registered, \
             acks_commands = excluded.acks_commands, agent_version = excluded.agent_version, \
             created_at = excluded.created_at, updated_at = excluded.updated_at, \
             job_started_at = excluded.job_started_at, \
             state_since = CASE WHEN vms.state = excluded.state THEN vms.state_since \
             ELSE excluded.updated_at END",
            value_rows(chunk.len(), 22)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for vm in chunk {
            q = q
                .bind(&vm.vm_id)
                .bind(&vm.pool_id)
                .bind(&vm.org_id)
                .bind(&vm.boot_id)
                .bind(vm.boot_seq)
                .bind(vm.booted_at)
                .bind(&vm.state)
                .bind(vm.health.as_str())
                .bind(vm.connected)
                .bind(vm.last_seen_at)
                .bind(vm.last_heartbeat_at)
                .bind(&vm.runner_state)
                .bind(opt_json(&vm.current_job)?)
                .bind(opt_json(&vm.latest_health)?)
                .bind(&vm.registration_command_id)
                .bind(vm.runner_registered)
                .bind(vm.acks_commands)
                .bind(&vm.agent_version)
                .bind(vm.created_at)
                .bind(vm.updated_at)
                .bind(vm.job_started_at)
                .bind(vm.updated_at);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Applies a run of coalescible batches (see [`coalescible_vm`]; distinct VMs, so their
/// order does not matter) with a few multi-row statements; answers each batch's outcomes.
async fn apply_run(
    conn: &mut SqliteConnection,
    run: &[(Vec<Mutation>, Reply)],
) -> Result<Vec<Vec<Outcome>>, StoreError> {
    let mut events = Vec::new();
    let mut vms = Vec::new();
    for (batch, _) in run {
        for m in batch {
            match m {
                Mutation::InsertEvent(e) => events.push(e),
                Mutation::PutVm(v) => vms.push(v),
                _ => {}
            }
        }
    }
    let mut inserted = insert_events(conn, &events).await?.into_iter();
    put_vms(conn, &vms).await?;
    apply_heartbeats(conn, run).await?;
    Ok(run
        .iter()
        .map(|(batch, _)| {
            batch
                .iter()
                .map(|m| match m {
                    Mutation::InsertEvent(_) => Outcome::Inserted(inserted.next().unwrap_or(false)),
                    _ => Outcome::Done,
                })
                .collect()
        })
        .collect())
}

/// The heartbeats of a run as rows and VM updates: those given as such, and those to apply
/// to the stored VM, read with one query. A VM not stored yet is adopted here, alone.
async fn resolve_heartbeats(
    conn: &mut SqliteConnection,
    run: &[(Vec<Mutation>, Reply)],
) -> Result<Vec<(HeartbeatRow, HeartbeatVmUpdate)>, StoreError> {
    let inputs: Vec<&HeartbeatInput> = run
        .iter()
        .filter_map(|(b, _)| match b.as_slice() {
            [Mutation::IngestHeartbeat(i)] => Some(&**i),
            _ => None,
        })
        .collect();
    let mut stored = std::collections::HashMap::new();
    if !inputs.is_empty() {
        let sql = format!(
            "SELECT * FROM vms WHERE vm_id IN ({})",
            vec!["?"; inputs.len()].join(", ")
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for i in &inputs {
            q = q.bind(&i.vm_id);
        }
        for r in q.fetch_all(&mut *conn).await? {
            let vm = vm_from_row(&r)?;
            stored.insert(vm.vm_id.clone(), vm);
        }
    }
    let mut out = Vec::with_capacity(run.len());
    for (batch, _) in run {
        match batch.as_slice() {
            [Mutation::Heartbeat { row, vm }] => out.push((row.clone(), vm.clone())),
            [Mutation::IngestHeartbeat(input)] => match stored.get(&input.vm_id) {
                Some(vm) => out.push(crate::lifecycle::heartbeat_effect(vm, input)),
                None => {
                    Box::pin(apply(conn, Mutation::IngestHeartbeat(input.clone()))).await?;
                }
            },
            _ => {}
        }
    }
    Ok(out)
}

/// Writes heartbeats of distinct VMs (each batch one `Mutation::Heartbeat`) with the effect
/// of applying them one by one: the rows, a `health_changed` log line for each VM that was
/// not healthy, and the VMs' updates, three statements per chunk.
async fn apply_heartbeats(
    conn: &mut SqliteConnection,
    run: &[(Vec<Mutation>, Reply)],
) -> Result<(), StoreError> {
    let beats = resolve_heartbeats(conn, run).await?;
    write_heartbeats(conn, &beats).await
}

/// Stores heartbeat rows and applies their VM updates (distinct VMs): the rows, a
/// `health_changed` log line for each VM that was not healthy, and the updates, three
/// statements per chunk.
async fn write_heartbeats(
    conn: &mut SqliteConnection,
    beats: &[(HeartbeatRow, HeartbeatVmUpdate)],
) -> Result<(), StoreError> {
    let mut rest = beats;
    while !rest.is_empty() {
        let n = chunk_len(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let rows = |k: usize| value_rows(n, k);
        let sql = format!(
            "INSERT INTO heartbeats (vm_id, transport, occurred_at, received_at, miglet_state, \
             runner_state, cpu_percent, memory_used_bytes, memory_total_bytes, disk_used_bytes, \
             disk_total_bytes, report) VALUES {}",
            rows(12)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (row, _) in chunk {
            q = q
                .bind(&row.vm_id)
                .bind(&row.transport)
                .bind(row.occurred_at)
                .bind(row.received_at)
                .bind(&row.miglet_state)
                .bind(&row.runner_state)
                .bind(row.cpu_percent)
                .bind(row.memory_used_bytes)
                .bind(row.memory_total_bytes)
                .bind(row.disk_used_bytes)
                .bind(row.disk_total_bytes)
                .bind(&row.report);
        }
        q.execute(&mut *conn).await?;
        let sql = format!(
            "WITH u(vm_id, at) AS (VALUES {}) \
             INSERT INTO vm_log (vm_id, at, kind, detail) \
             SELECT vms.vm_id, u.at, 'health_changed', vms.health || ' -> healthy' \
             FROM u JOIN vms ON vms.vm_id = u.vm_id WHERE vms.health != 'healthy'",
            rows(2)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (_, vm) in chunk {
            q = q.bind(&vm.vm_id).bind(vm.at);
        }
        q.execute(&mut *conn).await?;
        let sql = format!(
            "WITH u(vm_id, at, state, runner_state, current_job, latest_health) AS (VALUES {}) \
             UPDATE vms SET last_seen_at = MAX(vms.last_seen_at, u.at), last_heartbeat_at = u.at, \
             health = 'healthy', state = COALESCE(u.state, vms.state), \
             runner_state = COALESCE(u.runner_state, vms.runner_state), \
             current_job = u.current_job, latest_health = u.latest_health, updated_at = u.at \
             FROM u WHERE vms.vm_id = u.vm_id",
            rows(6)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (_, vm) in chunk {
            q = q
                .bind(&vm.vm_id)
                .bind(vm.at)
                .bind(&vm.state)
                .bind(&vm.runner_state)
                .bind(opt_json(&vm.current_job)?)
                .bind(to_json(&vm.latest_health)?);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

async fn apply_batch(
    conn: &mut SqliteConnection,
    batch: Vec<Mutation>,
) -> Result<Vec<Outcome>, StoreError> {
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut items = batch.into_iter().peekable();
    while let Some(m) = items.next() {
        // Consecutive events share multi-row statements.
        if let Mutation::InsertEvent(first) = m {
            let mut events = vec![first];
            while let Some(Mutation::InsertEvent(e)) =
                items.next_if(|n| matches!(n, Mutation::InsertEvent(_)))
            {
                events.push(e);
            }
            let refs: Vec<&EventRow> = events.iter().collect();
            outcomes.extend(
                insert_events(conn, &refs)
                    .await?
                    .into_iter()
                    .map(Outcome::Inserted),
            );
            continue;
        }
        outcomes.push(apply(conn, m).await?);
    }
    Ok(outcomes)
}

fn clone_err(e: &sqlx::Error) -> sqlx::Error {
    sqlx::Error::Protocol(e.to_string())
}

async fn apply_in_savepoint(
    conn: &mut SqliteConnection,
    batch: Vec<Mutation>,
) -> Result<Vec<Outcome>, StoreError> {
    sqlx::query("SAVEPOINT w").execute(&mut *conn).await?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for m in batch {
        match apply(conn, m).await {
            Ok(o) => outcomes.push(o),
            Err(e) => {
                sqlx::query("ROLLBACK TO SAVEPOINT w")
                    .execute(&mut *conn)
                    .await?;
                sqlx::query("RELEASE SAVEPOINT w")
                    .execute(&mut *conn)
                    .await?;
                return Err(e);
            }
        }
    }
    sqlx::query("RELEASE SAVEPOINT w")
        .execute(&mut *conn)
        .await?;
    Ok(outcomes)
}

fn to_json<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn opt_json<T: Serialize>(v: &Option<T>) -> Result<Option<String>, StoreError> {
    v.as_ref().map(to_json).transpose()
}

async fn apply(conn: &mut SqliteConnection, m: Mutation) -> Result<Outcome, StoreError> {
    match m {
        Mutation::PutVm(vm) => {
            put_vms(conn, &[&vm]).await?;
            Ok(Outcome::Done)
        }
        Mutation::TouchVm { vm_id, at } => {
            log_recovery(conn, &vm_id, at).await?;
            sqlx::query(
                "UPDATE vms SET last_seen_at = MAX(last_seen_at, ?), health = 'healthy', \
                 updated_at = ? WHERE vm_id = ?",
            )
            .bind(at)
            .bind(at)
            .bind(&vm_id)
            .execute(&mut *conn)
            .await?;
            Ok(Outcome::Done)
        }
        Mutation::SetConnected {
            vm_id,
            connected,
            at,
        } => {
            sqlx::query("UPDATE vms SET connected = ?, updated_at = ? WHERE vm_id = ?")
                .bind(connected)
                .bind(at)
                .bind(&vm_id)
                .execute(&mut *conn)
                .await?;
            Ok(Outcome::Done)
        }
        Mutation::InsertEvent(e) => {
            let inserted = insert_events(conn, &[&e]).await?;
            Ok(Outcome::Inserted(
                inserted.first().copied().unwrap_or(false),
            ))
        }
        Mutation::Heartbeat { row, vm } => {
            write_heartbeats(conn, &[(row, vm)]).await?;
            Ok(Outcome::Done)
        }
        Mutation::IngestHeartbeat(input) => {
            let found = sqlx::query("SELECT * FROM vms WHERE vm_id = ?")
                .bind(&input.vm_id)
                .fetch_optional(&mut *conn)
                .await?
                .map(|r| vm_from_row(&r))
                .transpose()?;
            let vm = match found {
                Some(vm) => vm,
                None => {
                    let vm = crate::lifecycle::adopt_for_heartbeat(&input);
                    Box::pin(apply(conn, Mutation::PutVm(vm.clone()))).await?;
                    vm
                }
            };
            let (row, update) = crate::lifecycle::heartbeat_effect(&vm, &input);
            Box::pin(apply(conn, Mutation::Heartbeat { row, vm: update })).await
        }
        Mutation::InsertRegistration(r) => {
            sqlx::query(
                "INSERT INTO registrations (vm_id, requested_at, request, response) VALUES (?, ?, ?, ?)",
            )
            .bind(&r.vm_id)
            .bind(r.requested_at)
            .bind(&r.request)
            .bind(&r.response)
            .execute(&mut *conn)
            .await?;
            Ok(Outcome::Done)
        }
        Mutation::InsertCommand(c) => {
            sqlx::query(
                "INSERT INTO commands (id, vm_id, boot_id, command_type, parameters, state, source, \
                 created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&c.id)
            .bind(&c.vm_id)
            .bind(&c.boot_id)
            .bind(&c.command_type)
            .bind(to_json(&c.parameters)?)
            .bind(c.state.as_str())
            .bind(&c.source)
            .bind(c.created_at)
            .bind(c.expires_at)
            .execute(&mut *conn)
            .await?;
            insert_transition(conn, &c.id, c.created_at, None, c.state, Some(&c.source)).await?;
            Ok(Outcome::Done)
        }
        Mutation::CommandTransition {
            id,
            from,
            to,
            at,
            detail,
            result_message,
            result,
        } => {
            let current: Option<String> =
                sqlx::query_scalar("SELECT state FROM commands WHERE id = ?")
                    .bind(&id)
                    .fetch_optional(&mut *conn)
                    .await?;
            let Some(current) = current else {
                return Ok(Outcome::Applied(false));
            };
            let current: CommandState = current.parse()?;
            if !from.contains(&current) {
                return Ok(Outcome::Applied(false));
            }
            let finished = (!to.is_open()).then_some(at);
            sqlx::query(
                "UPDATE commands SET state = ?, finished_at = COALESCE(?, finished_at), \
                 result_message = COALESCE(?, result_message), result = COALESCE(?, result) WHERE id = ?",
            )
            .bind(to.as_str())
            .bind(finished)
            .bind(&result_message)
            .bind(opt_json(&result)?)
            .bind(&id)
            .execute(&mut *conn)
            .await?;
            insert_transition(conn, &id, at, Some(current), to, detail.as_deref()).await?;
            Ok(Outcome::Applied(true))
        }
        Mutation::MarkDelivered { ids, at, via } => {
            for id in ids {
                let res = sqlx::query(
                    "UPDATE commands SET state = 'delivered', delivered_at = ?, delivered_via = ?, \
                     delivery_count = delivery_count + 1 WHERE id = ? AND state IN ('pending', 'delivered')",
                )
                .bind(at)
                .bind(&via)
                .bind(&id)
                .execute(&mut *conn)
                .await?;
                if res.rows_affected() == 1 {
                    sqlx::query(
                        "INSERT INTO command_transitions (command_id, at, from_state, to_state, detail) \
                         VALUES (?, ?, NULL, 'delivered', ?)",
                    )
                    .bind(&id)
                    .bind(at)
                    .bind(&via)
                    .execute(&mut *conn)
                    .await?;
                }
            }
            Ok(Outcome::Done)
        }
        Mutation::VmLog(row) => {
            sqlx::query("INSERT INTO vm_log (vm_id, at, kind, detail) VALUES (?, ?, ?, ?)")
                .bind(&row.vm_id)
                .bind(row.at)
                .bind(&row.kind)
                .bind(&row.detail)
                .execute(&mut *conn)
                .await?;
            Ok(Outcome::Done)
        }
        Mutation::InsertOperatorToken(t) => {
            sqlx::query(
                "INSERT INTO operator_tokens (id, name, role, secret_hash, created_at, created_by, \
                 expires_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
            )
            .bind(&t.id)
            .bind(&t.name)
            .bind(t.role.as_str())
            .bind(&t.secret_hash)
            .bind(t.created_at)
            .bind(&t.created_by)
            .bind(t.expires_at)
            .execute(&mut *conn)
            .await?;
            Ok(Outcome::Done)
        }
        Mutation::RevokeOperatorToken { id, at } => {
            let done = sqlx::query(
                "UPDATE operator_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            )
            .bind(at)
            .bind(&id)
            .execute(&mut *conn)
            .await?;
            Ok(Outcome::Applied(done.rows_affected() > 0))
        }
        Mutation::Audit(a) => {
            sqlx::query(
                "INSERT INTO audit_log (at, actor, action, target, remote_addr, outcome, detail) \
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(a.at)
            .bind(&a.actor)
            .bind(&a.action)
            .bind(&a.target)
            .bind(&a.remote_addr)
            .bind(&a.outcome)
            .bind(&a.detail)
            .execute(&mut *conn)
            .await?;
            Ok(Outcome::Done)
        }
        Mutation::ClaimIdentityToken {
            token_hash,
            vm_id,
            now,
            expires_at,
        } => {
            sqlx::query("DELETE FROM identity_tokens_used WHERE expires_at < ?")
                .bind(now)
                .execute(&mut *conn)
                .await?;
            let done = sqlx::query(
                "INSERT OR IGNORE INTO identity_tokens_used (token_hash, vm_id, used_at, expires_at) \
                 VALUES (?, ?, ?, ?)",
            )
            .bind(&token_hash)
            .bind(&vm_id)
            .bind(now)
            .bind(expires_at)
            .execute(&mut *conn)
            .await?;
            Ok(Outcome::Inserted(done.rows_affected() > 0))
        }
        Mutation::BindVm(b) => identity::bind(conn, &b, false).await,
        Mutation::RebindVm(b) => identity::bind(conn, &b, true).await,
        Mutation::ResetConnections { at } => identity::reset_connections(conn, at).await,
        Mutation::InsertEnrollmentToken(t) => identity::insert_enrollment_token(conn, &t).await,
        Mutation::UseEnrollmentToken { id, at } => {
            identity::use_enrollment_token(conn, &id, at).await
        }
        Mutation::PruneHistory(p) => {
            // Heartbeats past the maximum age go; between that and the full-detail window
            // one per VM per bucket stays (the first); events past their maximum age go.
            // Each kind is bounded by `limit` rows per pass.
            let dropped = sqlx::query(
                "DELETE FROM heartbeats WHERE seq IN \
                 (SELECT seq FROM heartbeats WHERE received_at < ? LIMIT ?)",
            )
            .bind(p.heartbeats_drop_before)
            .bind(p.limit)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            let thinned = sqlx::query(
                "DELETE FROM heartbeats WHERE seq IN (SELECT seq FROM \
                 (SELECT seq, ROW_NUMBER() OVER (PARTITION BY vm_id, received_at / ?1 ORDER BY seq) AS rn \
                  FROM heartbeats WHERE received_at >= ?2 AND received_at < ?3) \
                 WHERE rn > 1 LIMIT ?4)",
            )
            .bind(p.heartbeat_bucket_ms.max(1))
            .bind(p.heartbeats_drop_before)
            .bind(p.heartbeats_full_after)
            .bind(p.limit)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            let events = match p.events_drop_before {
                None => 0,
                Some(before) => sqlx::query(
                    "DELETE FROM events WHERE seq IN \
                     (SELECT seq FROM events WHERE received_at < ? LIMIT ?)",
                )
                .bind(before)
                .bind(p.limit)
                .execute(&mut *conn)
                .await?
                .rows_affected(),
            };
            Ok(Outcome::Pruned {
                heartbeats: dropped + thinned,
                events,
            })
        }
        Mutation::ExpireCommands { now } => {
            let rows = sqlx::query(
                "UPDATE commands SET state = 'expired', finished_at = ?1, \
                 result_message = COALESCE(result_message, 'expired before acknowledgment') \
                 WHERE state IN ('pending', 'delivered') AND expires_at IS NOT NULL AND expires_at <= ?1 \
                 RETURNING id, vm_id, command_type",
            )
            .bind(now)
            .fetch_all(&mut *conn)
            .await?;
            let mut expired = Vec::with_capacity(rows.len());
            for r in rows {
                let e = ExpiredCommand {
                    id: r.try_get("id")?,
                    vm_id: r.try_get("vm_id")?,
                    command_type: r.try_get("command_type")?,
                };
                sqlx::query(
                    "INSERT INTO command_transitions (command_id, at, from_state, to_state, detail) \
                     VALUES (?, ?, NULL, 'expired', 'expires_at passed')",
                )
                .bind(&e.id)
                .bind(now)
                .execute(&mut *conn)
                .await?;
                sqlx::query(
                    "UPDATE vms SET registration_command_id = NULL, updated_at = ? \
                     WHERE vm_id = ? AND registration_command_id = ?",
                )
                .bind(now)
                .bind(&e.vm_id)
                .bind(&e.id)
                .execute(&mut *conn)
                .await?;
                expired.push(e);
            }
            Ok(Outcome::Expired(expired))
        }
        Mutation::MarkSilentVms {
            now,
            unhealthy_before,
            lost_before,
        } => {
            let mut changes = Vec::new();
            // Shutting-down VMs that went quiet are done, not sick.
            let ended = sqlx::query(
                "UPDATE vms SET state = 'terminated', connected = 0, updated_at = ?1, state_since = ?1 \
                 WHERE state = 'shutting_down' AND last_seen_at < ?2 AND connected = 0 RETURNING vm_id",
            )
            .bind(now)
            .bind(unhealthy_before)
            .fetch_all(&mut *conn)
            .await?;
            for r in ended {
                let vm_id: String = r.try_get("vm_id")?;
                insert_vm_log(
                    conn,
                    &vm_id,
                    now,
                    "terminated",
                    Some("silent after shutting down"),
                )
                .await?;
            }
            for (to, before, from_states) in [
                (Health::Lost, lost_before, "('healthy', 'unhealthy')"),
                (Health::Unhealthy, unhealthy_before, "('healthy')"),
            ] {
                let sql = format!(
                    "SELECT vm_id, health FROM vms WHERE health IN {from_states} \
                     AND last_seen_at < ? AND state != 'terminated'"
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(before)
                    .fetch_all(&mut *conn)
                    .await?;
                for r in rows {
                    let vm_id: String = r.try_get("vm_id")?;
                    let old: String = r.try_get("health")?;
                    let from: Health = old.parse()?;
                    sqlx::query("UPDATE vms SET health = ?, updated_at = ? WHERE vm_id = ?")
                        .bind(to.as_str())
                        .bind(now)
                        .bind(&vm_id)
                        .execute(&mut *conn)
                        .await?;
                    let detail = format!("{} -> {}", from.as_str(), to.as_str());
                    insert_vm_log(conn, &vm_id, now, "health_changed", Some(&detail)).await?;
                    changes.push(HealthChange { vm_id, from, to });
                }
            }
            Ok(Outcome::HealthChanged(changes))
        }
    }
}

/// A VM that was unhealthy or lost and is heard from again: note it in its log.
async fn log_recovery(
    conn: &mut SqliteConnection,
    vm_id: &str,
    at: Millis,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO vm_log (vm_id, at, kind, detail) SELECT vm_id, ?, 'health_changed', \
         health || ' -> healthy' FROM vms WHERE vm_id = ? AND health != 'healthy'",
    )
    .bind(at)
    .bind(vm_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn insert_vm_log(
    conn: &mut SqliteConnection,
    vm_id: &str,
    at: Millis,
    kind: &str,
    detail: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO vm_log (vm_id, at, kind, detail) VALUES (?, ?, ?, ?)")
        .bind(vm_id)
        .bind(at)
        .bind(kind)
        .bind(detail)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn insert_transition(
    conn: &mut SqliteConnection,
    id: &str,
    at: Millis,
    from: Option<CommandState>,
    to: CommandState,
    detail: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO command_transitions (command_id, at, from_state, to_state, detail) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(id)
    .bind(at)
    .bind(from.map(CommandState::as_str))
    .bind(to.as_str())
    .bind(detail)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn parse_json<T: serde::de::DeserializeOwned>(
    col: &str,
    s: Option<String>,
) -> Result<Option<T>, StoreError> {
    s.map(|s| serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("{col}: {e}"))))
        .transpose()
}

fn operator_token_from_row(r: &SqliteRow) -> Result<OperatorTokenRecord, StoreError> {
    let role: String = r.try_get("role")?;
    Ok(OperatorTokenRecord {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        role: role
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("unknown operator role {role:?}")))?,
        secret_hash: r.try_get("secret_hash")?,
        created_at: r.try_get("created_at")?,
        created_by: r.try_get("created_by")?,
        expires_at: r.try_get("expires_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

/// `%text%` for LIKE, with `%`, `_` and `\` escaped.
fn like_pattern(text: &str) -> String {
    let mut p = String::with_capacity(text.len() + 2);
    p.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

fn heartbeat_from_row(r: &SqliteRow) -> Result<HeartbeatRow, StoreError> {
    Ok(HeartbeatRow {
        seq: r.try_get("seq")?,
        vm_id: r.try_get("vm_id")?,
        transport: r.try_get("transport")?,
        occurred_at: r.try_get("occurred_at")?,
        received_at: r.try_get("received_at")?,
        miglet_state: r.try_get("miglet_state")?,
        runner_state: r.try_get("runner_state")?,
        cpu_percent: r.try_get("cpu_percent")?,
        memory_used_bytes: r.try_get("memory_used_bytes")?,
        memory_total_bytes: r.try_get("memory_total_bytes")?,
        disk_used_bytes: r.try_get("disk_used_bytes")?,
        disk_total_bytes: r.try_get("disk_total_bytes")?,
        report: r.try_get("report")?,
    })
}

fn event_from_row(r: &SqliteRow) -> Result<EventRow, StoreError> {
    Ok(EventRow {
        seq: r.try_get("seq")?,
        vm_id: r.try_get("vm_id")?,
        event_id: r.try_get("event_id")?,
        event_type: r.try_get("event_type")?,
        boot_id: r.try_get("boot_id")?,
        transport: r.try_get("transport")?,
        occurred_at: r.try_get("occurred_at")?,
        received_at: r.try_get("received_at")?,
        data: r.try_get("data")?,
        raw: r.try_get("raw")?,
    })
}

fn vm_from_row(r: &SqliteRow) -> Result<VmRecord, StoreError> {
    let health: String = r.try_get("health")?;
    Ok(VmRecord {
        vm_id: r.try_get("vm_id")?,
        pool_id: r.try_get("pool_id")?,
        org_id: r.try_get("org_id")?,
        boot_id: r.try_get("boot_id")?,
        boot_seq: r.try_get("boot_seq")?,
        booted_at: r.try_get("booted_at")?,
        state: r.try_get("state")?,
        health: health.parse()?,
        connected: r.try_get("connected")?,
        last_seen_at: r.try_get("last_seen_at")?,
        last_heartbeat_at: r.try_get("last_heartbeat_at")?,
        runner_state: r.try_get("runner_state")?,
        current_job: parse_json("current_job", r.try_get("current_job")?)?,
        latest_health: parse_json("latest_health", r.try_get("latest_health")?)?,
        registration_command_id: r.try_get("registration_command_id")?,
        runner_registered: r.try_get("runner_registered")?,
        acks_commands: r.try_get("acks_commands")?,
        agent_version: r.try_get("agent_version")?,
        job_started_at: r.try_get("job_started_at")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn command_from_row(r: &SqliteRow) -> Result<CommandRecord, StoreError> {
    let state: String = r.try_get("state")?;
    let params: String = r.try_get("parameters")?;
    Ok(CommandRecord {
        seq: r.try_get("seq")?,
        id: r.try_get("id")?,
        vm_id: r.try_get("vm_id")?,
        boot_id: r.try_get("boot_id")?,
        command_type: r.try_get("command_type")?,
        parameters: serde_json::from_str(&params)
            .map_err(|e| StoreError::Corrupt(format!("parameters: {e}")))?,
        state: state.parse()?,
        source: r.try_get("source")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        delivered_at: r.try_get("delivered_at")?,
        delivered_via: r.try_get("delivered_via")?,
        delivery_count: r.try_get("delivery_count")?,
        finished_at: r.try_get("finished_at")?,
        result_message: r.try_get("result_message")?,
        result: parse_json("result", r.try_get("result")?)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type R = Result<(), Box<dyn std::error::Error>>;

    fn command(id: &str) -> CommandRecord {
        CommandRecord {
            seq: 0,
            id: id.into(),
            vm_id: "vm".into(),
            boot_id: None,
            command_type: "drain".into(),
            parameters: Map::new(),
            state: CommandState::Pending,
            source: "test".into(),
            created_at: 1,
            expires_at: None,
            delivered_at: None,
            delivered_via: None,
            delivery_count: 0,
            finished_at: None,
            result_message: None,
            result: None,
        }
    }

    fn event(id: Option<&str>) -> EventRow {
        EventRow {
            seq: 0,
            vm_id: "vm".into(),
            event_id: id.map(str::to_owned),
            event_type: "job_started".into(),
            boot_id: None,
            transport: "http".into(),
            occurred_at: None,
            received_at: 1,
            data: "{}".into(),
            raw: "{}".into(),
        }
    }

    fn heartbeat(vm: &str, at: Millis) -> Mutation {
        Mutation::Heartbeat {
            row: HeartbeatRow {
                seq: 0,
                vm_id: vm.into(),
                transport: "http".into(),
                occurred_at: None,
                received_at: at,
                miglet_state: None,
                runner_state: None,
                cpu_percent: None,
                memory_used_bytes: None,
                memory_total_bytes: None,
                disk_used_bytes: None,
                disk_total_bytes: None,
                report: "{}".into(),
            },
            vm: HeartbeatVmUpdate {
                vm_id: vm.into(),
                at,
                state: None,
                runner_state: None,
                current_job: None,
                latest_health: HealthFigures::default(),
            },
        }
    }

    /// Heartbeats: all kept in the full window, one per VM per bucket before it, none past
    /// the maximum age; events past their age deleted; the per-pass limit holds.
    #[tokio::test]
    async fn retention_thins_and_drops_old_history() -> R {
        let dir = tempfile::tempdir()?;
        let store = Store::open_sqlite(dir.path()).await?;
        let mut batch = Vec::new();
        for vm in ["a", "b"] {
            // Ages in ms below `now` = 1_000_000: 10 per bucket of 10_000 in [100_000, 200_000)
            // (to be thinned), 5 older than 500_000 (dropped), 20 recent (kept).
            for i in 0..100 {
                batch.push(heartbeat(vm, 1_000_000 - 100_000 - i * 1_000));
            }
            for i in 0..5 {
                batch.push(heartbeat(vm, 1_000_000 - 600_000 - i));
            }
            for i in 0..20 {
                batch.push(heartbeat(vm, 1_000_000 - i * 100));
            }
        }
        for (i, at) in [10, 20, 990_000].into_iter().enumerate() {
            batch.push(Mutation::InsertEvent(EventRow {
                received_at: at,
                ..event(Some(&format!("e{i}")))
            }));
        }
        store.write(batch).await?;
        let prune = Prune {
            heartbeats_full_after: 1_000_000 - 50_000,
            heartbeat_bucket_ms: 10_000,
            heartbeats_drop_before: 1_000_000 - 500_000,
            events_drop_before: Some(500_000),
            limit: 1_000,
        };
        let out = store
            .write(vec![Mutation::PruneHistory(prune.clone())])
            .await?;
        // Per VM: 5 dropped, 100 in 10(+1 partial) buckets thinned to one each, 20 kept.
        let left_a = store.heartbeats_for_vm("a").await?;
        let recent = left_a.iter().filter(|h| h.received_at >= 950_000).count();
        let thinned = left_a.iter().filter(|h| h.received_at < 950_000).count();
        assert_eq!(recent, 20);
        assert!((10..=11).contains(&thinned), "{thinned}");
        assert!(left_a.iter().all(|h| h.received_at >= 500_000));
        let events: Vec<Millis> = store
            .events_for_vm("vm")
            .await?
            .iter()
            .map(|e| e.received_at)
            .collect();
        assert_eq!(events, [990_000]);
        let Some(Outcome::Pruned { heartbeats, events }) = out.first() else {
            return Err("no prune outcome".into());
        };
        assert_eq!(
            (*heartbeats as usize, *events),
            (2 * (5 + 100 - thinned), 2)
        );
        // Idempotent: a second pass finds nothing.
        let again = store
            .write(vec![Mutation::PruneHistory(prune.clone())])
            .await?;
        assert_eq!(
            again.first(),
            Some(&Outcome::Pruned {
                heartbeats: 0,
                events: 0
            })
        );
        // The limit bounds one pass.
        store
            .write((0..30).map(|i| heartbeat("c", 10 + i)).collect())
            .await?;
        let limited = Prune { limit: 7, ..prune };
        let out = store.write(vec![Mutation::PruneHistory(limited)]).await?;
        assert_eq!(
            out.first(),
            Some(&Outcome::Pruned {
                heartbeats: 7,
                events: 0
            })
        );
        store.close().await;
        Ok(())
    }

    #[tokio::test]
    async fn migrations_apply_once_and_data_survives_reopen() -> R {
        let dir = tempfile::tempdir()?;
        let store = Store::open_sqlite(dir.path()).await?;
        store
            .write(vec![Mutation::InsertCommand(command("c1"))])
            .await?;
        store.close().await;
        let store = Store::open_sqlite(dir.path()).await?;
        assert!(store.command_get("c1").await?.is_some());
        let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM schema_migrations")
            .fetch_one(&store.backend.reads)
            .await?;
        assert_eq!(applied, MIGRATIONS.len() as i64);
        store.close().await;
        assert!(matches!(store.write(vec![]).await, Err(StoreError::Closed)));
        Ok(())
    }

    fn ingest(vm: &str, at: Millis) -> Mutation {
        let report = miglet_proto::event::HeartbeatReport {
            miglet_state: Some("job_running".into()),
            runner_state: Some("running".into()),
            boot_id: Some("boot-1".into()),
            ..Default::default()
        };
        Mutation::IngestHeartbeat(Box::new(HeartbeatInput {
            vm_id: vm.into(),
            report_json: serde_json::to_string(&report).unwrap_or_default(),
            report,
            transport: "grpc".into(),
            now: at,
            connected: true,
        }))
    }

    /// A fresh migrated database, driven through `commit_group` directly.
    async fn raw(dir: &Path, name: &str) -> Result<SqliteConnection, Box<dyn std::error::Error>> {
        let mut conn = SqliteConnectOptions::new()
            .filename(dir.join(name))
            .create_if_missing(true)
            .connect()
            .await?;
        migrate(&mut conn).await?;
        Ok(conn)
    }

    /// Applies batches as one group; answers each batch's outcomes (`None`: it failed).
    async fn group(
        conn: &mut SqliteConnection,
        batches: Vec<Vec<Mutation>>,
    ) -> Vec<Option<Vec<Outcome>>> {
        let mut replies = Vec::new();
        let mut items = Vec::new();
        for b in batches {
            let (tx, rx) = oneshot::channel();
            items.push((b, tx));
            replies.push(rx);
        }
        commit_group(conn, items, &AtomicBool::new(false)).await;
        let mut out = Vec::new();
        for r in replies {
            out.push(r.await.ok().and_then(Result::ok));
        }
        out
    }

    /// Every table the writes touch. Rows of one VM keep their order; `seq` values are not
    /// compared (rows of different VMs in one group may be numbered in another order).
    async fn dump(conn: &mut SqliteConnection) -> Result<String, sqlx::Error> {
        let q = "SELECT (SELECT json_group_array(json_array(vm_id, health, last_seen_at, \
                 last_heartbeat_at, state, runner_state, current_job, latest_health, updated_at)) \
                 FROM (SELECT * FROM vms ORDER BY vm_id)) || \
                 (SELECT json_group_array(json_array(vm_id, received_at, transport, report)) \
                 FROM (SELECT * FROM heartbeats ORDER BY vm_id, received_at, seq)) || \
                 (SELECT json_group_array(json_array(vm_id, at, kind, detail)) \
                 FROM (SELECT * FROM vm_log ORDER BY vm_id, at, kind)) || \
                 (SELECT json_group_array(json_array(id, state)) FROM (SELECT * FROM commands ORDER BY id)) || \
                 (SELECT json_group_array(json_array(vm_id, event_id, event_type, received_at, data)) \
                 FROM (SELECT * FROM events ORDER BY vm_id, received_at, event_id))";
        sqlx::query_scalar(q).fetch_one(conn).await
    }

    /// The multi-row heartbeat path (and its fallback after a failing write) leaves exactly
    /// what applying the same writes one at a time leaves.
    #[tokio::test]
    async fn grouped_heartbeats_match_one_at_a_time() -> R {
        let dir = tempfile::tempdir()?;
        let mut grouped = raw(dir.path(), "grouped.db").await?;
        let mut single = raw(dir.path(), "single.db").await?;
        let vms: Vec<Vec<Mutation>> = (0..40)
            .map(|i| {
                let mut vm =
                    crate::lifecycle::adopt(&format!("vm-{i:02}"), Some("p"), None, None, None, 1);
                if i % 3 == 0 {
                    vm.health = Health::Unhealthy;
                }
                vec![Mutation::PutVm(vm)]
            })
            .collect();
        let mut with_state = heartbeat("vm-05", 30);
        if let Mutation::Heartbeat { vm, .. } = &mut with_state {
            vm.state = Some("job_running".into());
            vm.runner_state = Some("running".into());
        }
        let round = |at: Millis, fail: bool| {
            let mut b: Vec<Vec<Mutation>> = (0..20)
                .map(|i| vec![heartbeat(&format!("vm-{i:02}"), at)])
                .collect();
            // A second heartbeat of the same VM ends a run; so does any other write.
            b.push(vec![heartbeat("vm-03", at + 1)]);
            b.push(vec![Mutation::InsertEvent(event(Some(&format!("e{at}"))))]);
            if fail {
                b.push(vec![Mutation::InsertCommand(command("dup"))]);
            }
            // Heartbeats as received, applied by the writer to the stored VM; one of a VM
            // never seen, which it adopts.
            b.extend((20..40).map(|i| vec![ingest(&format!("vm-{i:02}"), at)]));
            b.push(vec![ingest(&format!("vm-new-{at}"), at)]);
            // Job events with the VM's record, as ingest_event writes them; one repeats an
            // event id (not inserted again); one batch of several events.
            for i in 0..5 {
                let mut e = event(Some(&format!("job-{}", i % 4)));
                e.vm_id = format!("ev-vm-{}", i % 4);
                e.received_at = at;
                let mut v = crate::lifecycle::adopt(&e.vm_id, Some("p"), None, None, None, at);
                v.state = format!("s{at}");
                b.push(vec![Mutation::InsertEvent(e), Mutation::PutVm(v)]);
            }
            b.push(vec![
                Mutation::InsertEvent(event(Some(&format!("m{at}")))),
                Mutation::InsertEvent(event(None)),
                Mutation::InsertEvent(event(Some(&format!("m{at}")))),
            ]);
            b
        };
        for conn in [&mut grouped, &mut single] {
            for b in &vms {
                assert!(group(conn, vec![b.clone()]).await[0].is_some());
            }
            let dup = vec![Mutation::InsertCommand(command("dup"))];
            assert!(group(conn, vec![dup]).await[0].is_some());
        }
        // Two groups: the first takes the multi-row path, the second (with a failing write)
        // is rolled back and applied again with a savepoint per write.
        let mut first = round(10, false);
        first.push(vec![with_state.clone()]);
        let second = round(20, true);
        let mut oks = group(&mut grouped, first.clone()).await;
        oks.extend(group(&mut grouped, second.clone()).await);
        let mut one_by_one = Vec::new();
        for b in first.into_iter().chain(second) {
            one_by_one.extend(group(&mut single, vec![b]).await);
        }
        assert_eq!(oks, one_by_one);
        assert_eq!(
            oks.iter().filter(|o| o.is_none()).count(),
            1,
            "only the duplicate fails"
        );
        // Repeated ids: the fifth job event each round (same VM and id as the first), the
        // batch's repeat each round, and round two's job events (all stored in round one).
        let not_inserted = oks
            .iter()
            .flatten()
            .flatten()
            .filter(|o| **o == Outcome::Inserted(false))
            .count();
        assert_eq!(not_inserted, 2 + 2 + 4);
        let (a, b) = (dump(&mut grouped).await?, dump(&mut single).await?);
        assert_eq!(a, b);
        // The unhealthy third recovered once each, and was logged once each.
        let recovered: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM vm_log WHERE kind = 'health_changed' AND detail = 'unhealthy -> healthy'",
        )
        .fetch_one(&mut grouped)
        .await?;
        assert_eq!(recovered, 14);
        let beats: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM heartbeats")
            .fetch_one(&mut grouped)
            .await?;
        assert_eq!(beats, 2 * 42 + 1);
        let adopted: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM vms WHERE vm_id LIKE 'vm-new-%'")
                .fetch_one(&mut grouped)
                .await?;
        assert_eq!(adopted, 2);
        Ok(())
    }

    #[tokio::test]
    async fn a_failing_batch_does_not_take_its_group_down() -> R {
        let dir = tempfile::tempdir()?;
        let store = Store::open_sqlite(dir.path()).await?;
        store
            .write(vec![Mutation::InsertCommand(command("dup"))])
            .await?;
        // Many concurrent batches share group commits; the bad ones (duplicate id, and a
        // good mutation before it in the same batch) roll back alone.
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                let batch = if i % 10 == 0 {
                    vec![
                        Mutation::InsertCommand(command(&format!("partial-{i}"))),
                        Mutation::InsertCommand(command("dup")),
                    ]
                } else {
                    vec![Mutation::InsertEvent(event(Some(&format!("e{i}"))))]
                };
                (i, s.write(batch).await.is_ok())
            }));
        }
        for t in tasks {
            let (i, ok) = t.await?;
            assert_eq!(ok, i % 10 != 0, "batch {i}");
        }
        assert_eq!(store.events_for_vm("vm").await?.len(), 180);
        assert!(
            store.command_get("partial-0").await?.is_none(),
            "half a batch was kept"
        );
        store.close().await;
        Ok(())
    }

    #[tokio::test]
    async fn events_deduplicate_by_id_only() -> R {
        let dir = tempfile::tempdir()?;
        let store = Store::open_sqlite(dir.path()).await?;
        let out = store
            .write(vec![
                Mutation::InsertEvent(event(Some("x"))),
                Mutation::InsertEvent(event(Some("x"))),
                Mutation::InsertEvent(event(None)),
                Mutation::InsertEvent(event(None)),
            ])
            .await?;
        assert_eq!(
            out,
            vec![
                Outcome::Inserted(true),
                Outcome::Inserted(false),
                Outcome::Inserted(true),
                Outcome::Inserted(true)
            ]
        );
        store.close().await;
        Ok(())
    }

    #[tokio::test]
    async fn command_transitions_are_guarded_and_recorded() -> R {
        let dir = tempfile::tempdir()?;
        let store = Store::open_sqlite(dir.path()).await?;
        store
            .write(vec![Mutation::InsertCommand(command("c"))])
            .await?;
        let ack = |to| Mutation::CommandTransition {
            id: "c".into(),
            from: CommandState::OPEN,
            to,
            at: 5,
            detail: None,
            result_message: Some("done".into()),
            result: None,
        };
        let out = store
            .write(vec![
                ack(CommandState::Acknowledged),
                ack(CommandState::Failed),
            ])
            .await?;
        assert_eq!(out, vec![Outcome::Applied(true), Outcome::Applied(false)]);
        let c = store.command_get("c").await?.ok_or("missing")?;
        assert_eq!(
            (c.state, c.finished_at),
            (CommandState::Acknowledged, Some(5))
        );
        let states: Vec<String> = store
            .command_transitions("c")
            .await?
            .into_iter()
            .map(|t| t.to_state)
            .collect();
        assert_eq!(states, ["pending", "acknowledged"]);
        store.close().await;
        Ok(())
    }
}
