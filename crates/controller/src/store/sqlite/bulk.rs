//! Multi-row writes: runs of job events, VM records and heartbeats coalesced into few
//! statements.

use super::*;

/// Most rows written by one multi-row statement (and most batches coalesced into a run).
pub(super) const MAX_RUN: usize = 256;
/// `(k placeholders), ...` for `n` rows.
pub(super) fn value_rows(n: usize, k: usize) -> String {
    vec![format!("({})", vec!["?"; k].join(", ")); n].join(", ")
}

/// Power-of-two chunks up to [`MAX_RUN`] rows keep the set of distinct statements (and so
/// the prepared-statement cache) small.
pub(super) fn chunk_len(left: usize) -> usize {
    1usize << left.clamp(1, MAX_RUN).ilog2()
}

/// Inserts events (duplicates of a stored `(vm_id, event_id)` are skipped); answers, in
/// order, whether each was inserted.
pub(super) async fn insert_events(
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
pub(super) async fn put_vms(
    conn: &mut SqliteConnection,
    vms: &[&VmRecord],
) -> Result<(), StoreError> {
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

/// The heartbeats of a run as rows and VM updates: those given as such, and those to apply
/// to the stored VM, read with one query. A VM not stored yet is adopted here, alone.
pub(super) async fn resolve_heartbeats(
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
pub(super) async fn apply_heartbeats(
    conn: &mut SqliteConnection,
    run: &[(Vec<Mutation>, Reply)],
) -> Result<(), StoreError> {
    let beats = resolve_heartbeats(conn, run).await?;
    write_heartbeats(conn, &beats).await
}

/// Stores heartbeat rows and applies their VM updates (distinct VMs): the rows, a
/// `health_changed` log line for each VM that was not healthy, and the updates, three
/// statements per chunk.
pub(super) async fn write_heartbeats(
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
