//! The group-commit writer: one task owns the write connection, takes every queued batch
//! that is waiting (up to [`MAX_GROUP`]) into one transaction, and answers each batch once it
//! is durable. A failing group is retried batch by batch in savepoints so one bad batch
//! fails alone.

use super::*;

/// How many [`Store::write`] calls share one transaction at most.
pub(super) const MAX_GROUP: usize = 1024;
/// A group commit slower than this is logged as a warning.
pub(super) const SLOW_COMMIT: Duration = Duration::from_millis(100);
/// Notes a failed write: a full disk sets `disk_full` (see [`checkpoint_loop`]).
pub(super) fn note_failure(disk_full: &AtomicBool, e: &StoreError) {
    if e.is_disk_full() {
        disk_full.store(true, Ordering::Relaxed);
    }
}

/// The single writer: takes every queued write, applies each in its own savepoint inside one
/// transaction, commits (one fsync for the group), then answers every caller.
pub(super) async fn writer_loop(
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

/// Commits a group of calls in one transaction (one fsync), answering each call.
pub(super) async fn commit_group(
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
    let (results, failed) = apply_fast(conn, group).await;
    let Some(index) = failed else {
        finish(conn, results, disk_full).await;
        log_commit(size, started.elapsed());
        return;
    };
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
}

type Answered = Vec<(Reply, Result<Vec<Outcome>, StoreError>)>;

/// Applies every call of the group in the open transaction, without savepoints. Returns
/// each call's result and, if one failed, the index of the first failure (the calls after
/// it are not applied).
async fn apply_fast(
    conn: &mut SqliteConnection,
    group: Vec<(Vec<Mutation>, Reply)>,
) -> (Answered, Option<usize>) {
    let mut results: Answered = Vec::with_capacity(group.len());
    let mut failed = None;
    let mut items = group.into_iter().peekable();
    while let Some(first) = items.next() {
        if failed.is_some() {
            results.push((first.1, Err(StoreError::Closed)));
            continue;
        }
        let mut run = next_run(first, &mut items);
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
        let Some((batch, reply)) = run.pop() else {
            continue;
        };
        match apply_batch(conn, batch).await {
            Ok(outcomes) => results.push((reply, Ok(outcomes))),
            Err(e) => {
                failed = Some(results.len());
                results.push((reply, Err(e)));
            }
        }
    }
    (results, failed)
}

/// `first` and the calls after it that can share multi-row statements with it: consecutive
/// heartbeats and job events of distinct VMs (the bulk of the fleet's writes), at most
/// [`MAX_RUN`]. A call that cannot is a run of one.
fn next_run(
    first: (Vec<Mutation>, Reply),
    items: &mut std::iter::Peekable<std::vec::IntoIter<(Vec<Mutation>, Reply)>>,
) -> Vec<(Vec<Mutation>, Reply)> {
    let Some(first_vm) = coalescible_vm(&first.0).map(str::to_owned) else {
        return vec![first];
    };
    let mut seen = std::collections::HashSet::from([first_vm]);
    let mut run = vec![first];
    while run.len() < MAX_RUN
        && let Some(next) =
            items.next_if(|(b, _)| coalescible_vm(b).is_some_and(|vm| !seen.contains(vm)))
    {
        if let Some(vm) = coalescible_vm(&next.0) {
            seen.insert(vm.to_owned());
        }
        run.push(next);
    }
    run
}

fn log_commit(size: usize, elapsed: std::time::Duration) {
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
pub(super) async fn commit_with_savepoints(
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
pub(super) async fn finish(
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
pub(super) fn coalescible_vm(batch: &[Mutation]) -> Option<&str> {
    match batch {
        [Mutation::Heartbeat { row, vm }] if row.vm_id == vm.vm_id => Some(&vm.vm_id),
        [Mutation::IngestHeartbeat(input)] => Some(&input.vm_id),
        [Mutation::InsertEvent(e)] => Some(&e.vm_id),
        [Mutation::InsertEvent(e), Mutation::PutVm(v)] if e.vm_id == v.vm_id => Some(&v.vm_id),
        _ => None,
    }
}

/// Applies a run of coalescible batches (see [`coalescible_vm`]; distinct VMs, so their
/// order does not matter) with a few multi-row statements; answers each batch's outcomes.
pub(super) async fn apply_run(
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

pub(super) async fn apply_batch(
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

pub(super) fn clone_err(e: &sqlx::Error) -> sqlx::Error {
    sqlx::Error::Protocol(e.to_string())
}

pub(super) async fn apply_in_savepoint(
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
