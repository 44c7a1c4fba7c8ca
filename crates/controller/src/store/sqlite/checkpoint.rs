//! The background WAL checkpointer: copies the WAL back once a second from a connection of
//! its own, starts it over once it is large and copied back, and empties it while the disk is full.

use super::*;

/// WAL frames (about 4 KiB each) above which the checkpointer empties the WAL file once it is
/// fully copied back. Under continuous writes SQLite never starts the WAL over by itself (a
/// writer only rewinds a WAL that was completely backfilled when its transaction began), so
/// without this the file grows for as long as the fleet writes.
pub(super) const WAL_RESET_FRAMES: i64 = 1024;
/// Attempts per tick at starting the WAL over, and the pause between them. Each attempt
/// takes the write lock only if it is free and gives it back at once if a reader still uses
/// the WAL (no busy handler): waiting for readers while holding the lock stalled the writer,
/// and SQLite's busy handler stretched each stall further (a 5–50 ms wait put the
/// 20,000-agent registration p99 at 20–44 ms).
pub(super) const RESET_ATTEMPTS: u32 = 5;
pub(super) const RESET_PAUSE: Duration = Duration::from_millis(2);
/// How often the background checkpointer copies the WAL back. Fleet writes dirty many index
/// pages per commit; copying once a second writes a hot page back once, not once per commit.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Copies the WAL back into the database from a connection of its own, so the writer never
/// pays for a checkpoint inside a commit (its own automatic checkpoint is only a safety net).
/// PASSIVE: never waits for, nor blocks, readers or the writer. Once the WAL holds more than
/// [`WAL_RESET_FRAMES`], all copied back, RESTART (up to [`RESET_ATTEMPTS`] tries that never
/// wait) so that the next write starts the WAL over. While the disk is full (`disk_full`), TRUNCATE: the same,
/// and it empties the WAL file, whose space is usually what the database needs to take writes
/// again.
pub(super) async fn checkpoint_loop(
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
                    if attempt < RESET_ATTEMPTS {
                        tokio::time::sleep(RESET_PAUSE).await;
                    }
                }
            }
        }
    }
    let _ = conn.close().await;
}

#[derive(Clone, Copy)]
pub(super) enum Checkpoint {
    Passive,
    Restart,
    Truncate,
}

/// Runs `PRAGMA wal_checkpoint(mode)`: (busy, frames in the WAL, frames copied back).
pub(super) async fn checkpoint(
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
/// before copied all of it back (`copied == frames`): then RESTART copies nothing, and an
/// attempt holds the write lock only for as long as it takes to see whether a reader still
/// uses the WAL ([`RESET_ATTEMPTS`] tries that never wait). If a reader kept the PASSIVE
/// checkpoint from copying everything, the next tick tries again. SQLite reports -1
/// frames when the connection is not in WAL mode.
pub(super) fn wal_needs_reset(frames: i64, copied: i64) -> bool {
    frames > WAL_RESET_FRAMES && copied == frames
}
