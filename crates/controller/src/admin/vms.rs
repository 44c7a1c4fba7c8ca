//! `/admin/vms`: the fleet, one VM, its timeline and its heartbeats.

use super::*;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct VmQuery {
    /// Only VMs of this pool.
    pool: Option<String>,
    /// Only VMs in this state.
    state: Option<String>,
    /// `healthy`, `unhealthy` or `lost`.
    health: Option<String>,
    /// Only VMs of pools whose runners carry this label.
    label: Option<String>,
    /// Text in the VM id or its current job (run id, repository, job name).
    q: Option<String>,
    /// Page size, 1 to 500 (default 100).
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VmPage {
    pub vms: Vec<VmView>,
    /// Pass as `cursor` for the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// VMs, filtered, in `vm_id` order.
#[utoipa::path(get, path = "/api/v1/admin/vms", tag = "vms", params(VmQuery),
    responses((status = 200, body = VmPage), (status = 400, description = "bad filter")))]
pub(super) async fn list_vms(
    State(app): State<AppState>,
    q: Result<Query<VmQuery>, QueryRejection>,
) -> Result<Json<VmPage>, ApiError> {
    let q = query(q)?;
    let limit = page_limit(q.limit)?;
    let health = given(q.health)
        .map(|h| {
            h.parse::<Health>()
                .map_err(|_| bad(format!("unknown health {h:?} (healthy, unhealthy, lost)")))
        })
        .transpose()?;
    let mut pools = non_empty(q.pool).map(|p| vec![p]);
    if let Some(label) = non_empty(q.label) {
        let with_label = app.settings().pools.with_label(&label);
        let seen: Vec<String> = app
            .reads()
            .pool_counts()
            .await?
            .into_iter()
            .map(|c| c.pool_id)
            .filter(|p| with_label(p))
            .collect();
        pools = Some(match pools {
            Some(p) => p.into_iter().filter(|x| seen.contains(x)).collect(),
            None => seen,
        });
    }
    let filter = VmFilter {
        pools,
        state: non_empty(q.state),
        health,
        text: non_empty(q.q),
        after: cursor(q.cursor)?,
        limit,
    };
    let vms = app.reads().vms_page(&filter).await?;
    let next_cursor = next_page(&vms, limit, |v| v.vm_id.clone());
    Ok(Json(VmPage {
        vms: vms.iter().map(VmView::from).collect(),
        next_cursor,
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VmDetail {
    pub vm: VmView,
    /// Its most recent commands, newest first.
    pub commands: Vec<CommandView>,
}

/// One VM with its recent commands.
#[utoipa::path(get, path = "/api/v1/admin/vms/{vm_id}", tag = "vms",
    params(("vm_id" = String, Path, description = "VM id")),
    responses((status = 200, body = VmDetail), (status = 404, description = "unknown VM")))]
pub(super) async fn get_vm(
    State(app): State<AppState>,
    vm_id: Result<Path<String>, PathRejection>,
) -> Result<Json<VmDetail>, ApiError> {
    let vm_id = vm_id_of(vm_id)?;
    let vm = app
        .reads()
        .vm_get(&vm_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("unknown VM {vm_id:?}")))?;
    let commands = app
        .reads()
        .commands_page(&CommandFilter {
            vm_id: Some(vm_id),
            limit: 50,
            ..CommandFilter::default()
        })
        .await?;
    Ok(Json(VmDetail {
        vm: VmView::from(&vm),
        commands: commands.iter().map(CommandView::from).collect(),
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct TimelineQuery {
    /// At most this many entries, the most recent (1 to 500, default 100).
    limit: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Timeline {
    pub vm_id: String,
    /// Oldest first.
    pub entries: Vec<TimelineEntry>,
    /// Whether older entries were left out.
    pub truncated: bool,
}

/// Everything that happened to a VM, in order: its events, what the controller observed, and
/// every command state change.
#[utoipa::path(get, path = "/api/v1/admin/vms/{vm_id}/timeline", tag = "vms",
    params(("vm_id" = String, Path, description = "VM id"), TimelineQuery),
    responses((status = 200, body = Timeline), (status = 404, description = "unknown VM")))]
pub(super) async fn vm_timeline(
    State(app): State<AppState>,
    vm_id: Result<Path<String>, PathRejection>,
    q: Result<Query<TimelineQuery>, QueryRejection>,
) -> Result<Json<Timeline>, ApiError> {
    let vm_id = vm_id_of(vm_id)?;
    let limit = page_limit(query(q)?.limit)? as usize;
    let store = app.reads();
    if store.vm_get(&vm_id).await?.is_none() {
        return Err(ApiError::NotFound(format!("unknown VM {vm_id:?}")));
    }
    let mut all: Vec<(Millis, u8, i64, TimelineEntry)> = Vec::new();
    for e in store.events_for_vm(&vm_id).await? {
        let view = EventView::from(&e);
        all.push((
            e.received_at,
            1,
            e.seq,
            TimelineEntry {
                at: time(e.received_at),
                source: "event".into(),
                what: e.event_type.clone(),
                detail: e.event_id.clone().map(|id| format!("event_id={id}")),
                data: view.data,
            },
        ));
    }
    for (i, l) in store.vm_log_for_vm(&vm_id).await?.into_iter().enumerate() {
        all.push((
            l.at,
            0,
            i as i64,
            TimelineEntry {
                at: time(l.at),
                source: "controller".into(),
                what: l.kind,
                detail: l.detail,
                data: Value::Object(Map::new()),
            },
        ));
    }
    for c in store.commands_for_vm(&vm_id).await? {
        for (i, t) in store
            .command_transitions(&c.id)
            .await?
            .into_iter()
            .enumerate()
        {
            all.push((
                t.at,
                2,
                c.seq * 1000 + i as i64,
                TimelineEntry {
                    at: time(t.at),
                    source: "command".into(),
                    what: format!("{} {}", c.command_type, t.to_state),
                    detail: t.detail,
                    data: serde_json::json!({ "command_id": c.id }),
                },
            ));
        }
    }
    all.sort_by_key(|(at, order, seq, _)| (*at, *order, *seq));
    let truncated = all.len() > limit;
    let skip = all.len().saturating_sub(limit);
    Ok(Json(Timeline {
        vm_id,
        entries: all.into_iter().skip(skip).map(|(_, _, _, e)| e).collect(),
        truncated,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct HeartbeatQuery {
    /// Only heartbeats received at or after this time (RFC 3339 or Unix ms).
    since: Option<String>,
    /// `next_before` of the previous page.
    before: Option<i64>,
    /// Page size, 1 to 500 (default 100).
    limit: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatPage {
    /// Newest first.
    pub heartbeats: Vec<HeartbeatView>,
    pub next_before: Option<i64>,
}

/// A VM's heartbeat history, newest first.
#[utoipa::path(get, path = "/api/v1/admin/vms/{vm_id}/heartbeats", tag = "vms",
    params(("vm_id" = String, Path, description = "VM id"), HeartbeatQuery),
    responses((status = 200, body = HeartbeatPage), (status = 400, description = "bad parameter")))]
pub(super) async fn vm_heartbeats(
    State(app): State<AppState>,
    vm_id: Result<Path<String>, PathRejection>,
    q: Result<Query<HeartbeatQuery>, QueryRejection>,
) -> Result<Json<HeartbeatPage>, ApiError> {
    let vm_id = vm_id_of(vm_id)?;
    let q = query(q)?;
    let limit = page_limit(q.limit)?;
    let since = given(q.since)
        .map(|s| parse_time("since", &s))
        .transpose()?;
    let rows = app
        .reads()
        .heartbeats_page(&vm_id, since, q.before, limit)
        .await?;
    let next_before = next_page(&rows, limit, |r| r.seq);
    Ok(Json(HeartbeatPage {
        heartbeats: rows.iter().map(HeartbeatView::from).collect(),
        next_before,
    }))
}
