//! SQLite implementation of the store (see the module docs of [`super`]): the handle and how
//! it opens here; the writer, checkpointer, migrations, row operations and reads each in a
//! file of their own.

mod apply;
mod auth;
mod bulk;
mod checkpoint;
mod command;
mod heartbeat;
mod identity;
mod job;
mod migrate;
mod read;
mod rows;
mod vm;
mod writer;

use apply::*;
use bulk::*;
use checkpoint::*;
use migrate::*;
use rows::*;
use writer::*;

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

/// The writer connection's page cache: 64 MiB (negative = KiB, SQLite's convention).
const WRITER_CACHE: &str = "-65536";
/// WAL pages before the writer checkpoints by itself (SQLite's default is 1,000): only if the
/// background checkpointer (every [`CHECKPOINT_EVERY`]) falls far behind.
const WAL_CHECKPOINT_PAGES: &str = "65536";
/// Bytes the WAL file keeps after a checkpoint resets it (it is truncated to this), so a
/// burst's WAL does not hold disk space for ever.
const WAL_SIZE_LIMIT: &str = "4194304";
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

/// The read side of the store: a pool of read-only connections that see every committed
/// write. Every query is a method of this type (`read.rs`, `identity.rs`).
#[derive(Debug, Clone)]
pub struct Reads {
    pool: SqlitePool,
}

#[derive(Debug, Clone)]
pub struct SqliteStore {
    reads: Reads,
    writes: mpsc::Sender<Msg>,
    writer: Arc<Mutex<Option<JoinHandle<()>>>>,
    checkpointer: Arc<Mutex<Option<Background>>>,
}

/// A background task and the token that stops it.
type Background = (CancellationToken, JoinHandle<()>);

impl SqliteStore {
    /// The read side.
    pub fn reads(&self) -> &Reads {
        &self.reads
    }
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
            reads: Reads { pool: reads },
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
        self.reads.pool.close().await;
    }
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
                latest_health: miglet_proto::event::HealthFigures::default(),
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
        let Some(Outcome::Pruned {
            heartbeats, events, ..
        }) = out.first()
        else {
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
                events: 0,
                scaling: 0
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
                events: 0,
                scaling: 0
            })
        );
        store.close().await;
        Ok(())
    }

    fn vm_record(id: &str, state: &str, health: Health, connected: bool, seen: Millis) -> VmRecord {
        crate::lifecycle::test_vm(id, state, health, connected, seen)
    }

    /// The sweep's candidate read returns exactly the silent VMs the lifecycle says silence
    /// may change, and a silence write is a compare-and-set on what was read.
    #[tokio::test]
    async fn silent_candidates_follow_the_lifecycle_and_writes_compare_and_set() -> R {
        let dir = tempfile::tempdir()?;
        let store = Store::open_sqlite(dir.path()).await?;
        let mut batch = Vec::new();
        let mut expected = Vec::new();
        let states = [
            "ready",
            "idle",
            "job_running",
            "shutting_down",
            "terminated",
        ];
        for (i, state) in states.iter().enumerate() {
            for (j, health) in [Health::Healthy, Health::Unhealthy, Health::Lost]
                .into_iter()
                .enumerate()
            {
                for connected in [false, true] {
                    let id = format!("vm-{i}-{j}-{connected}");
                    if crate::lifecycle::may_change_when_silent(state, health) {
                        expected.push(id.clone());
                    }
                    batch.push(Mutation::PutVm(vm_record(&id, state, health, connected, 5)));
                    // Heard from recently: never a candidate.
                    let fresh = format!("fresh-{i}-{j}-{connected}");
                    batch.push(Mutation::PutVm(vm_record(
                        &fresh, state, health, connected, 50,
                    )));
                }
            }
        }
        store.write(batch).await?;
        let got: Vec<String> = store
            .vms_silent_before(10)
            .await?
            .into_iter()
            .map(|v| v.vm_id)
            .collect();
        expected.sort();
        assert_eq!(got, expected);

        let change = SilentChange::Health {
            from: Health::Healthy,
            to: Health::Unhealthy,
        };
        let silence = |seen_at| Mutation::SilenceVm {
            vm_id: "vm-1-0-false".into(),
            seen_at,
            change,
            at: 100,
        };
        // Read at 5, touched at 60 before the write: left alone.
        store
            .write(vec![Mutation::TouchVm {
                vm_id: "vm-1-0-false".into(),
                at: 60,
            }])
            .await?;
        assert_eq!(
            store.write(vec![silence(5)]).await?,
            [Outcome::Applied(false)]
        );
        assert_eq!(
            store.write(vec![silence(60)]).await?,
            [Outcome::Applied(true)]
        );
        assert_eq!(
            store.write(vec![silence(60)]).await?,
            [Outcome::Applied(false)]
        );
        let vm = store.vm_get("vm-1-0-false").await?.ok_or("vm")?;
        assert_eq!(vm.health, Health::Unhealthy);
        Ok(())
    }

    /// The reconciler's registration candidates are exactly the VMs the lifecycle says are
    /// due one.
    #[tokio::test]
    async fn registration_candidates_follow_the_lifecycle() -> R {
        let dir = tempfile::tempdir()?;
        let store = Store::open_sqlite(dir.path()).await?;
        let mut batch = Vec::new();
        let mut expected = Vec::new();
        let mut n = 0;
        for state in ["initializing", "ready", "idle", "shutting_down"] {
            for health in [Health::Healthy, Health::Unhealthy, Health::Lost] {
                for (pointed, registered) in [(false, false), (true, false), (false, true)] {
                    n += 1;
                    let mut vm = vm_record(&format!("vm-{n:02}"), state, health, false, 5);
                    vm.registration_command_id = pointed.then(|| "c".to_owned());
                    vm.runner_registered = registered;
                    if crate::lifecycle::needs_registration(&vm) {
                        expected.push(vm.vm_id.clone());
                    }
                    batch.push(Mutation::PutVm(vm));
                }
            }
        }
        store.write(batch).await?;
        let got: Vec<String> = store
            .vms_needing_registration()
            .await?
            .into_iter()
            .map(|v| v.vm_id)
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(got, expected);
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
            .fetch_one(&store.backend.reads.pool)
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
