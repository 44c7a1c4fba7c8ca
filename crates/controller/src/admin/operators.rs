//! Who is calling (`/admin/whoami`), the audit trail every admin action writes, and the
//! audit log's read API.

use super::*;

pub(super) fn actor(p: Option<&Extension<Principal>>) -> String {
    p.map_or_else(|| "unknown".to_owned(), |Extension(p)| p.actor())
}

/// Records an admin action and how it ended (`Ok(detail)` or the error).
pub(super) async fn audit_action(
    app: &Controller,
    actor: String,
    action: &str,
    target: String,
    peer: SocketAddr,
    result: Result<String, &ApiError>,
) {
    app.audit()
        .action(
            actor,
            action,
            target,
            Some(peer),
            result.map_err(|e| (e.code(), e.to_string())),
        )
        .await;
}

/// Who is calling.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    /// `operator`, or `anonymous` in open mode.
    pub kind: String,
    pub name: Option<String>,
    pub token_id: Option<String>,
    pub role: String,
}

/// Who the token belongs to and its role.
#[utoipa::path(get, path = "/api/v1/admin/whoami", tag = "operators",
    responses((status = 200, body = WhoAmI), (status = 401, description = "no or bad token")))]
pub(super) async fn whoami(principal: Option<Extension<Principal>>) -> Json<WhoAmI> {
    Json(match principal.map(|Extension(p)| p) {
        Some(Principal::Operator(o)) => WhoAmI {
            kind: "operator".into(),
            name: Some(o.name),
            token_id: Some(o.token_id),
            role: o.role.as_str().into(),
        },
        _ => WhoAmI {
            kind: "anonymous".into(),
            name: None,
            token_id: None,
            role: "admin".into(),
        },
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct AuditQuery {
    /// Page size, 1 to 500 (default 100).
    limit: Option<u32>,
    /// `next_before` of the previous page.
    before: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    /// Newest first.
    pub entries: Vec<AuditView>,
    pub next_before: Option<i64>,
}

/// The audit log of admin actions, newest first.
#[utoipa::path(get, path = "/api/v1/admin/audit", tag = "operators", params(AuditQuery),
    responses((status = 200, body = AuditPage), (status = 400, description = "bad parameter")))]
pub(super) async fn audit(
    State(app): State<AppState>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let q = query(q)?;
    let limit = page_limit(q.limit)?;
    let rows = app.reads().audit_list(q.before, limit).await?;
    let next_before = next_page(&rows, limit, |r| r.seq);
    Ok(Json(AuditPage {
        entries: rows.iter().map(AuditView::from).collect(),
        next_before,
    }))
}
