//! Operator actions on who a VM is: moving a VM to another pool, and minting a one-time
//! enrollment token for a VM. Both are admin-only and audited.

use super::{AppState, VmView, actor, audit_action, vm_id_of};
use crate::auth::Principal;
use crate::auth::enrollment_token::MAX_TTL_SECS;
use crate::error::ApiError;
use crate::extract::body_bytes;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use utoipa::ToSchema;

/// Longest reason kept with a move.
const MAX_REASON: usize = 512;
/// Default lifetime of an enrollment token: a day.
const DEFAULT_TOKEN_TTL_SECS: u64 = 86_400;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MovePoolBody {
    /// The pool the VM belongs to from now on (a pool this controller serves).
    pub pool_id: String,
    /// Why (kept in the audit log).
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolMoved {
    pub vm_id: String,
    pub from_pool: String,
    pub to_pool: String,
    /// The VM's record after the move; absent for a VM that enrolled but never made contact.
    pub vm: Option<VmView>,
}

/// Move a VM to another pool (admin). Its binding and record change together, the old
/// pool's open registration is superseded, its stream is closed, and credentials for the old
/// pool stop acting for it; the VM enrolls into the new pool with that pool's proof.
#[utoipa::path(post, path = "/api/v1/admin/vms/{vm_id}/pool", tag = "identity",
    params(("vm_id" = String, Path, description = "VM id")),
    request_body = MovePoolBody,
    responses((status = 200, body = PoolMoved), (status = 400, description = "bad body or unconfigured pool"),
        (status = 403, description = "read-only token"), (status = 404, description = "unknown VM"),
        (status = 409, description = "already in that pool")))]
pub(super) async fn move_pool(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    vm_id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<PoolMoved>, ApiError> {
    let who = actor(principal.as_ref());
    let vm_id = vm_id_of(vm_id)?;
    let mut reason = String::new();
    let result = async {
        let body: MovePoolBody = super::contract::parse_body(&body_bytes(body)?)?;
        reason = body.reason.unwrap_or_default();
        if reason.len() > MAX_REASON {
            return Err(ApiError::BadRequest(format!(
                "reason is longer than {MAX_REASON} bytes"
            )));
        }
        let (from, vm) = app.move_vm_pool(&vm_id, &body.pool_id, &who).await?;
        Ok(PoolMoved {
            vm_id: vm_id.clone(),
            from_pool: from,
            to_pool: body.pool_id,
            vm: vm.as_ref().map(VmView::from),
        })
    }
    .await;
    let summary = result
        .as_ref()
        .map(|m| format!("from={} to={} reason={reason:?}", m.from_pool, m.to_pool));
    audit_action(
        &app,
        who,
        "vm.move_pool",
        format!("vm:{vm_id}"),
        peer,
        summary,
    )
    .await;
    Ok(Json(result?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentTokenBody {
    pub vm_id: String,
    /// A pool that accepts enrollment tokens (`enrollment_tokens = true`).
    pub pool_id: String,
    /// Lifetime in seconds, 1 to 604800 (default 86400).
    pub ttl_secs: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnrollmentTokenCreated {
    /// Shown once: hand it to the VM (e.g. in its metadata) and nowhere else.
    pub token: String,
    pub id: String,
    pub vm_id: String,
    pub pool_id: String,
    pub expires_at: String,
}

/// Mint a one-time enrollment token for one VM (admin). The VM exchanges it once, before it
/// expires, for a credential of that pool (`method: token`); unlike a pool's bootstrap
/// secret it proves the VM itself.
#[utoipa::path(post, path = "/api/v1/admin/enrollment-tokens", tag = "identity",
    request_body = EnrollmentTokenBody,
    responses((status = 201, body = EnrollmentTokenCreated),
        (status = 400, description = "bad body, or the pool does not accept enrollment tokens"),
        (status = 403, description = "read-only token")))]
pub(super) async fn create_enrollment_token(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let who = actor(principal.as_ref());
    let mut target = "vm:?".to_owned();
    let result = async {
        let body: EnrollmentTokenBody = super::contract::parse_body(&body_bytes(body)?)?;
        target = format!("vm:{}", body.vm_id);
        let ttl = body.ttl_secs.unwrap_or(DEFAULT_TOKEN_TTL_SECS);
        if ttl == 0 || ttl > MAX_TTL_SECS {
            return Err(ApiError::BadRequest(format!(
                "ttl_secs must be 1 to {MAX_TTL_SECS}"
            )));
        }
        app.mint_enrollment_token(&body.vm_id, &body.pool_id, ttl, &who)
            .await
    }
    .await;
    let summary = result.as_ref().map(|t| {
        format!(
            "token_id={} pool={} expires_at={}",
            t.record.id,
            t.record.pool_id,
            super::time(t.record.expires_at)
        )
    });
    audit_action(&app, who, "enrollment_token.create", target, peer, summary).await;
    let minted = result?;
    Ok((
        StatusCode::CREATED,
        Json(EnrollmentTokenCreated {
            token: minted.token,
            id: minted.record.id,
            vm_id: minted.record.vm_id,
            pool_id: minted.record.pool_id,
            expires_at: super::time(minted.record.expires_at),
        }),
    ))
}
