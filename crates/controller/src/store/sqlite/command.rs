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

/// Moves a command to `to` if [`crate::lifecycle::may_transition`] allows it from the state
/// it is in: `Applied(false)` when it is unknown or the table refuses.
pub(super) async fn transition(
    conn: &mut SqliteConnection,
    id: String,
    to: CommandState,
    at: Millis,
    detail: Option<String>,
    result_message: Option<String>,
    result: Option<Map<String, Value>>,
) -> Result<Outcome, StoreError> {
    let current: Option<String> = sqlx::query_scalar("SELECT state FROM commands WHERE id = ?")
        .bind(&id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(current) = current else {
        return Ok(Outcome::Applied(false));
    };
    let current: CommandState = current.parse()?;
    if !crate::lifecycle::may_transition(current, to) {
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

/// `('pending', 'delivered')`: the states the transition table lets a command leave for
/// `to`, as an SQL list, so the set-wise statements below follow the same table.
fn states_into(to: CommandState) -> String {
    let names: Vec<String> = crate::lifecycle::from_states(to)
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    format!("({})", names.join(", "))
}

static MARK_DELIVERED: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE commands SET state = 'delivered', delivered_at = ?, delivered_via = ?, \
         delivery_count = delivery_count + 1 WHERE id = ? AND state IN {}",
        states_into(CommandState::Delivered)
    )
});

static EXPIRE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE commands SET state = 'expired', finished_at = ?1, \
         result_message = COALESCE(result_message, 'expired before acknowledgment') \
         WHERE state IN {} AND expires_at IS NOT NULL AND expires_at <= ?1 \
         RETURNING id, vm_id, command_type",
        states_into(CommandState::Expired)
    )
});

/// A command put back in `state` (and its delivery time to `at`), outside the transition table:
/// fault injection only, for what a restore from an older backup does.
pub(super) async fn restore_state(
    conn: &mut SqliteConnection,
    id: String,
    state: CommandState,
    at: Millis,
) -> Result<Outcome, StoreError> {
    let done = sqlx::query(
        "UPDATE commands SET state = ?, delivered_at = ?, finished_at = NULL WHERE id = ?",
    )
    .bind(state.as_str())
    .bind(at)
    .bind(&id)
    .execute(&mut *conn)
    .await?;
    Ok(Outcome::Applied(done.rows_affected() > 0))
}

/// Commands sent on a transport: pending or delivered → delivered, counted.
pub(super) async fn mark_delivered(
    conn: &mut SqliteConnection,
    ids: Vec<String>,
    at: Millis,
    via: String,
) -> Result<Outcome, StoreError> {
    for id in ids {
        let res = sqlx::query(sqlx::AssertSqlSafe(MARK_DELIVERED.as_str()))
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

/// Open commands past `expires_at` → expired (the app makes a VM whose registration
/// expired forget it).
pub(super) async fn expire_commands(
    conn: &mut SqliteConnection,
    now: Millis,
) -> Result<Outcome, StoreError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(EXPIRE.as_str()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_wise_statements_follow_the_transition_table() {
        assert_eq!(
            states_into(CommandState::Delivered),
            "('pending', 'delivered')"
        );
        assert_eq!(
            states_into(CommandState::Expired),
            "('pending', 'delivered')"
        );
        assert!(MARK_DELIVERED.contains("state IN ('pending', 'delivered')"));
        assert!(EXPIRE.contains("WHERE state IN ('pending', 'delivered') AND"));
    }
}
