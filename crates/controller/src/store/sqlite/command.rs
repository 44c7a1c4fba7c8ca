//! Row operations on commands, their transitions, and the registrations issued.

use super::*;

/// A registration issued (the request and the response, token redacted by the caller).
pub(super) async fn insert_registration(
    conn: &mut SqliteConnection,
    r: RegistrationRow,
) -> Result<Outcome, StoreError> {
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

/// A new command and its first transition.
pub(super) async fn insert_command(
    conn: &mut SqliteConnection,
    c: CommandRecord,
) -> Result<Outcome, StoreError> {
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

/// A command transition as the caller asked for it.
pub(super) struct Transition {
    pub id: String,
    /// The states the command may be in; in any other the transition is not applied.
    pub from: &'static [CommandState],
    pub to: CommandState,
    pub at: Millis,
    pub detail: Option<String>,
    pub result_message: Option<String>,
    pub result: Option<Map<String, Value>>,
}

/// Moves a command from one of `t.from` to `t.to`: `Applied(false)` when it is unknown or in
/// another state.
pub(super) async fn transition(
    conn: &mut SqliteConnection,
    t: Transition,
) -> Result<Outcome, StoreError> {
    let Transition {
        id,
        from,
        to,
        at,
        detail,
        result_message,
        result,
    } = t;
    let current: Option<String> = sqlx::query_scalar("SELECT state FROM commands WHERE id = ?")
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

/// Commands sent on a transport: pending or delivered → delivered, counted.
pub(super) async fn mark_delivered(
    conn: &mut SqliteConnection,
    ids: Vec<String>,
    at: Millis,
    via: String,
) -> Result<Outcome, StoreError> {
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

/// Open commands past `expires_at` → expired; a VM whose registration expired forgets it.
pub(super) async fn expire_commands(
    conn: &mut SqliteConnection,
    now: Millis,
) -> Result<Outcome, StoreError> {
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

pub(super) async fn insert_transition(
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
