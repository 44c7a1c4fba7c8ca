//! `/admin/commands` and enqueueing: queue a command for a VM or a pool, list and follow them.

use super::*;

/// A command to queue.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnqueueBody {
    /// `drain`, `shutdown`, `set_log_level` or `update_config`.
    #[serde(rename = "type")]
    pub command_type: String,
    /// As PROTOCOL.md defines them for the type.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    /// Seconds the command stays deliverable (default: the controller's command TTL).
    pub ttl_secs: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Enqueued {
    pub command: CommandView,
}

pub(super) fn parse_enqueue(
    body: Result<Bytes, BytesRejection>,
) -> Result<(Command, Option<Duration>), ApiError> {
    let bytes = body_bytes(body)?;
    let body: EnqueueBody = contract::parse_body(&bytes)?;
    let command = contract::parse_command(&body.command_type, &body.parameters).map_err(bad)?;
    let ttl = match body.ttl_secs {
        Some(s) if !(1..=contract::MAX_COMMAND_TTL_SECS).contains(&s) => {
            return Err(bad(format!(
                "ttl_secs must be 1 to {}",
                contract::MAX_COMMAND_TTL_SECS
            )));
        }
        Some(s) => Some(Duration::from_secs(s)),
        None => None,
    };
    Ok((command, ttl))
}

/// Queue a command for one VM (admin). It is delivered until the VM acknowledges it; follow
/// it at `/api/v1/admin/commands/{id}`.
#[utoipa::path(post, path = "/api/v1/admin/vms/{vm_id}/commands", tag = "commands",
    params(("vm_id" = String, Path, description = "VM id")),
    request_body = EnqueueBody,
    responses((status = 201, body = Enqueued), (status = 400, description = "bad command"),
        (status = 403, description = "read-only token"), (status = 404, description = "unknown VM")))]
pub(super) async fn enqueue(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    vm_id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let who = actor(principal.as_ref());
    let vm_id = path_one(vm_id)?;
    let result = async {
        let (command, ttl) = parse_enqueue(body)?;
        app.enqueue(&vm_id, command, &who, ttl).await
    }
    .await;
    let summary = result
        .as_ref()
        .map(|r| format!("command_id={} type={}", r.id, r.command_type));
    audit_action(
        &app,
        who,
        "command.enqueue",
        format!("vm:{vm_id}"),
        peer,
        summary,
    )
    .await;
    let record = result?;
    Ok((
        StatusCode::CREATED,
        Json(Enqueued {
            command: CommandView::from(&record),
        }),
    ))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolEnqueued {
    pub commands: Vec<CommandView>,
    /// VMs of the pool that got nothing (terminated or lost), with the reason.
    #[schema(value_type = Object)]
    pub skipped: BTreeMap<String, String>,
}

/// Queue a command for every live VM of a pool (admin); terminated and lost VMs are skipped.
#[utoipa::path(post, path = "/api/v1/admin/pools/{pool_id}/commands", tag = "commands",
    params(("pool_id" = String, Path, description = "pool id")),
    request_body = EnqueueBody,
    responses((status = 201, body = PoolEnqueued), (status = 400, description = "bad command"),
        (status = 403, description = "read-only token"), (status = 404, description = "no VM in the pool")))]
pub(super) async fn enqueue_pool(
    State(app): State<AppState>,
    principal: Option<Extension<Principal>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    pool_id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let who = actor(principal.as_ref());
    let pool_id = path_one(pool_id)?;
    let result = async {
        miglet_proto::ids::validate_id("pool_id", &pool_id).map_err(bad)?;
        let (command, ttl) = parse_enqueue(body)?;
        let mut vms = Vec::new();
        let mut after = None;
        loop {
            let page = app
                .reads()
                .vms_page(&VmFilter {
                    pools: Some(vec![pool_id.clone()]),
                    after: after.clone(),
                    limit: MAX_PAGE,
                    ..VmFilter::default()
                })
                .await?;
            let done = page.len() < MAX_PAGE as usize;
            after = page.last().map(|v| v.vm_id.clone());
            vms.extend(page);
            if done {
                break;
            }
        }
        if vms.is_empty() {
            return Err(ApiError::NotFound(format!("no VM in pool {pool_id:?}")));
        }
        let mut out = PoolEnqueued {
            commands: Vec::new(),
            skipped: BTreeMap::new(),
        };
        for vm in vms {
            if vm.state == "terminated" || vm.health == Health::Lost {
                out.skipped
                    .insert(vm.vm_id, format!("{} / {}", vm.state, vm.health.as_str()));
                continue;
            }
            let record = app.enqueue(&vm.vm_id, command.clone(), &who, ttl).await?;
            out.commands.push(CommandView::from(&record));
        }
        Ok(out)
    }
    .await;
    let summary = result.as_ref().map(|r| {
        format!(
            "queued={} skipped={} ids={}",
            r.commands.len(),
            r.skipped.len(),
            r.commands
                .iter()
                .map(|c| c.id.as_str())
                .collect::<Vec<_>>()
                .join(",")
        )
    });
    audit_action(
        &app,
        who,
        "command.enqueue_pool",
        format!("pool:{pool_id}"),
        peer,
        summary,
    )
    .await;
    Ok((StatusCode::CREATED, Json(result?)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct CommandQuery {
    /// Only this VM's commands.
    vm: Option<String>,
    /// `pending`, `delivered`, `acknowledged`, `failed` or `expired`.
    state: Option<String>,
    /// Command type.
    #[serde(rename = "type")]
    #[param(rename = "type")]
    command_type: Option<String>,
    /// `next_before` of the previous page.
    before: Option<i64>,
    /// Page size, 1 to 500 (default 100).
    limit: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CommandPage {
    /// Newest first.
    pub commands: Vec<CommandView>,
    pub next_before: Option<i64>,
}

/// Commands, newest first.
#[utoipa::path(get, path = "/api/v1/admin/commands", tag = "commands", params(CommandQuery),
    responses((status = 200, body = CommandPage), (status = 400, description = "bad filter")))]
pub(super) async fn list_commands(
    State(app): State<AppState>,
    q: Result<Query<CommandQuery>, QueryRejection>,
) -> Result<Json<CommandPage>, ApiError> {
    let q = query(q)?;
    let state = given(q.state)
        .map(|s| {
            s.parse::<CommandState>()
                .map_err(|_| bad(format!("unknown command state {s:?}")))
        })
        .transpose()?;
    let vm_id = vm_filter(q.vm)?;
    let filter = CommandFilter {
        vm_id,
        state,
        command_type: non_empty(q.command_type),
        before_seq: q.before,
        limit: page_limit(q.limit)?,
    };
    let rows = app.reads().commands_page(&filter).await?;
    let next_before = next_page(&rows, filter.limit, |r| r.seq);
    Ok(Json(CommandPage {
        commands: rows.iter().map(CommandView::from).collect(),
        next_before,
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TransitionView {
    pub at: String,
    pub from_state: Option<String>,
    pub to_state: String,
    pub detail: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CommandDetail {
    pub command: CommandView,
    /// Every state change, oldest first.
    pub transitions: Vec<TransitionView>,
}

/// One command and every state change it went through.
#[utoipa::path(get, path = "/api/v1/admin/commands/{command_id}", tag = "commands",
    params(("command_id" = String, Path, description = "command id")),
    responses((status = 200, body = CommandDetail), (status = 404, description = "unknown command")))]
pub(super) async fn get_command(
    State(app): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<CommandDetail>, ApiError> {
    let id = path_one(id)?;
    miglet_proto::ids::validate_id("command_id", &id).map_err(bad)?;
    let command = app
        .reads()
        .command_get(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("unknown command {id:?}")))?;
    let transitions = app.reads().command_transitions(&id).await?;
    Ok(Json(CommandDetail {
        command: CommandView::from(&command),
        transitions: transitions
            .into_iter()
            .map(|t| TransitionView {
                at: time(t.at),
                from_state: t.from_state,
                to_state: t.to_state,
                detail: t.detail,
            })
            .collect(),
    }))
}
