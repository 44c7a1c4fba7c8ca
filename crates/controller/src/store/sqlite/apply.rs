//! One [`Mutation`] applied to the write transaction: the dispatch to the row operation of
//! its kind, and the JSON helpers they share.

use super::*;

pub(super) fn to_json<T: Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(super) fn opt_json<T: Serialize>(v: &Option<T>) -> Result<Option<String>, StoreError> {
    v.as_ref().map(to_json).transpose()
}

/// Applies one mutation inside the write transaction: one row operation per kind, each in
/// the file of its resource.
pub(super) async fn apply(conn: &mut SqliteConnection, m: Mutation) -> Result<Outcome, StoreError> {
    match m {
        Mutation::PutVm(vm) => vm::put_vm(conn, vm).await,
        Mutation::TouchVm { vm_id, at } => vm::touch_vm(conn, vm_id, at).await,
        Mutation::SetConnected {
            vm_id,
            connected,
            at,
        } => vm::set_connected(conn, vm_id, connected, at).await,
        Mutation::VmLog(row) => vm::vm_log(conn, row).await,
        Mutation::SilenceVm {
            vm_id,
            seen_at,
            change,
            at,
        } => vm::silence_vm(conn, vm_id, seen_at, change, at).await,
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
        Mutation::IngestHeartbeat(input) => heartbeat::ingest_heartbeat(conn, input).await,
        Mutation::PruneHistory(p) => heartbeat::prune_history(conn, p).await,
        Mutation::InsertRegistration(r) => command::insert_registration(conn, r).await,
        Mutation::InsertCommand(c) => command::insert_command(conn, c).await,
        Mutation::CommandTransition {
            id,
            to,
            at,
            detail,
            result_message,
            result,
        } => command::transition(conn, id, to, at, detail, result_message, result).await,
        Mutation::MarkDelivered { ids, at, via } => {
            command::mark_delivered(conn, ids, at, via).await
        }
        Mutation::RestoreCommandState { id, state, at } => {
            command::restore_state(conn, id, state, at).await
        }
        Mutation::ExpireCommands { now } => command::expire_commands(conn, now).await,
        Mutation::InsertOperatorToken(t) => auth::insert_operator_token(conn, t).await,
        Mutation::RevokeOperatorToken { id, at } => auth::revoke_operator_token(conn, id, at).await,
        Mutation::Audit(a) => auth::audit(conn, a).await,
        Mutation::ClaimIdentityToken {
            token_hash,
            vm_id,
            now,
            expires_at,
        } => auth::claim_identity_token(conn, token_hash, vm_id, now, expires_at).await,
        Mutation::BindVm(b) => identity::bind(conn, &b, false).await,
        Mutation::RebindVm(b) => identity::bind(conn, &b, true).await,
        Mutation::ResetConnections { at } => identity::reset_connections(conn, at).await,
        Mutation::InsertEnrollmentToken(t) => identity::insert_enrollment_token(conn, &t).await,
        Mutation::UseEnrollmentToken { id, at } => {
            identity::use_enrollment_token(conn, &id, at).await
        }
        Mutation::ClaimDelivery {
            delivery_id,
            at,
            forget_before,
        } => job::claim_delivery(conn, &delivery_id, at, forget_before).await,
        Mutation::PutJob(j) => job::put_job(conn, j).await,
        Mutation::PutInstance(i) => job::put_instance(conn, i).await,
    }
}
