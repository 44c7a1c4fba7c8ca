mod commands;
mod contract;
mod events;
mod identity;
mod operators;
mod pools;
mod query;
mod views;
mod vms;

use commands::*;
use events::*;
use operators::*;
use pools::*;
use query::*;
use views::*;
use vms::*;

use crate::app::Controller;
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{body_bytes, path_one};
use crate::store::{
    AuditRow, CommandFilter, CommandRecord, CommandState, EventFilter, EventRow, Health,
    HeartbeatRow, Millis, VmFilter, VmRecord,
};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use miglet_proto::command::Command;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

type AppState = Arc<Controller>;

/// Most rows one page returns.
pub const MAX_PAGE: u32 = 500;
const DEFAULT_PAGE: u32 = 100;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "MIG controller operator API",
        description = "Read the fleet and steer it. Authenticate with an operator token: `Authorization: Bearer migop_...`. GET needs the read-only role, everything else admin."
    ),
    modifiers(&BearerAuth),
    security(("operator_token" = [])),
    tags(
        (name = "vms", description = "VMs, their timelines and heartbeats"),
        (name = "events", description = "Event search"),
        (name = "commands", description = "Queue commands and follow them"),
        (name = "pools", description = "Pool summaries"),
        (name = "operators", description = "Who is calling; the audit log"),
        (name = "identity", description = "Which pool a VM belongs to, and how a VM proves who it is"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "operator_token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

fn router_and_doc() -> (axum::Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(whoami))
        .routes(routes!(list_vms))
        .routes(routes!(get_vm))
        .routes(routes!(vm_timeline))
        .routes(routes!(vm_heartbeats))
        .routes(routes!(enqueue))
        .routes(routes!(enqueue_pool))
        .routes(routes!(search_events))
        .routes(routes!(event_stream))
        .routes(routes!(list_commands))
        .routes(routes!(get_command))
        .routes(routes!(list_pools))
        .routes(routes!(list_jobs))
        .routes(routes!(pool_history))
        .routes(routes!(identity::move_pool))
        .routes(routes!(identity::create_enrollment_token))
        .routes(routes!(audit))
        .routes(routes!(openapi_json))
        .split_for_parts();
    utoipa::Modify::modify(&contract::Contract, &mut doc);
    (router, doc)
}

pub fn routes() -> axum::Router<AppState> {
    router_and_doc().0
}

/// The OpenAPI document of the operator API, generated from the code.
pub fn openapi() -> utoipa::openapi::OpenApi {
    router_and_doc().1
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/api/v1/admin/openapi.json", tag = "operators",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi_json() -> Json<Value> {
    Json(serde_json::to_value(openapi()).unwrap_or(Value::Null))
}

/// The checked-in document's path, relative to the workspace root.
pub const OPENAPI_FILE: &str = "docs/openapi.json";

/// The document as it is checked in: pretty JSON with a final newline.
pub fn openapi_text() -> String {
    let mut text = openapi().to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in `docs/openapi.json` is what the code generates. To refresh it:
    /// `cargo run -p mig-controller -- openapi > docs/openapi.json`.
    #[test]
    fn checked_in_openapi_document_matches_the_code() -> Result<(), Box<dyn std::error::Error>> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(OPENAPI_FILE);
        let checked_in = std::fs::read_to_string(&path)?;
        assert!(
            checked_in == openapi_text(),
            "{} is out of date: run `cargo run -p mig-controller -- openapi > {OPENAPI_FILE}`",
            path.display()
        );
        Ok(())
    }

    #[test]
    fn every_route_is_documented() {
        let doc = openapi();
        let paths: Vec<&String> = doc.paths.paths.keys().collect();
        for p in [
            "/api/v1/admin/vms",
            "/api/v1/admin/vms/{vm_id}",
            "/api/v1/admin/vms/{vm_id}/timeline",
            "/api/v1/admin/vms/{vm_id}/heartbeats",
            "/api/v1/admin/vms/{vm_id}/commands",
            "/api/v1/admin/pools/{pool_id}/commands",
            "/api/v1/admin/events",
            "/api/v1/admin/commands",
            "/api/v1/admin/commands/{command_id}",
            "/api/v1/admin/pools",
            "/api/v1/admin/jobs",
            "/api/v1/admin/pools/{pool_id}/history",
            "/api/v1/admin/audit",
            "/api/v1/admin/whoami",
        ] {
            assert!(
                paths.iter().any(|x| x.as_str() == p),
                "{p} missing from {paths:?}"
            );
        }
    }
}
