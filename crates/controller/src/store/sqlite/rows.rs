//! Row mapping: SQLite rows to records, and the small text helpers queries share.

use super::*;

pub(super) fn parse_json<T: serde::de::DeserializeOwned>(
    col: &str,
    s: Option<String>,
) -> Result<Option<T>, StoreError> {
    s.map(|s| serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("{col}: {e}"))))
        .transpose()
}

pub(super) fn operator_token_from_row(r: &SqliteRow) -> Result<OperatorTokenRecord, StoreError> {
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
pub(super) fn like_pattern(text: &str) -> String {
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

pub(super) fn heartbeat_from_row(r: &SqliteRow) -> Result<HeartbeatRow, StoreError> {
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

pub(super) fn event_from_row(r: &SqliteRow) -> Result<EventRow, StoreError> {
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

pub(super) fn vm_from_row(r: &SqliteRow) -> Result<VmRecord, StoreError> {
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

pub(super) fn command_from_row(r: &SqliteRow) -> Result<CommandRecord, StoreError> {
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
