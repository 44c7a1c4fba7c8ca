//! A Compute Engine managed instance group stand-in, following the research file's checklist
//! (gcp.md §1.11): the real paths and verbs (`listManagedInstances` and `resize` are POSTs,
//! `resize` takes `size` in the query), operations that go `PENDING` → `RUNNING` → `DONE`
//! with the instances changing afterwards (`CREATING` with no id, then `PROVISIONING` →
//! `STAGING` → `RUNNING`; `DELETING` before they vanish), `requestId` deduplication echoed as
//! `clientOperationId`, `deleteInstances` validation (`skipInstancesOnValidationError`), a
//! `resize` down that deletes whichever VMs it likes (counted, so tests prove nobody used it),
//! failures on demand in Compute's error envelope, stock-outs (`CREATING` retried forever with
//! a `lastAttempt` error) and autohealing that recreates a VM stopped out of band under its
//! name with a new id. Every call needs an access token [`FakeGoogle`] issued (401 otherwise).
//!
//! Time is real: each step of an instance or an operation takes [`FakeMig::set_step`] (100 ms
//! by default), computed when asked.

use crate::google::FakeGoogle;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{OriginalUri, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the group lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Zone(String),
    /// A region and the zones its instances spread over.
    Region(String, Vec<String>),
}

/// A failure the next matching calls get.
#[derive(Debug, Clone)]
pub struct MigFailure {
    /// Applies to paths containing this (empty: any).
    pub path_contains: String,
    pub status: u16,
    /// Compute's `errors[].reason` (e.g. `rateLimitExceeded`).
    pub reason: String,
    pub message: String,
    pub times: usize,
}

#[derive(Debug, Clone)]
struct Inst {
    id: u64,
    zone: String,
    created: Instant,
    deleting_since: Option<Instant>,
    /// Stays `CREATING` with this `lastAttempt` error (a stock-out, a quota).
    failing: Option<(String, String)>,
}

#[derive(Debug, Clone)]
struct Op {
    name: String,
    op_type: String,
    request_id: Option<String>,
    started: Instant,
}

#[derive(Debug)]
struct MigState {
    project: String,
    location: Location,
    name: String,
    /// Settings `get` returns (`updatePolicy`, `autoHealingPolicies`, `status.autoscaler`).
    settings: Value,
    instances: BTreeMap<String, Inst>,
    target_size: i64,
    ops: HashMap<String, Op>,
    by_request: HashMap<String, String>,
    failures: Vec<MigFailure>,
    calls: Vec<(String, String, u16)>,
    resize_downs: usize,
    stockout: Option<(String, String)>,
    step: Duration,
    next_id: u64,
}

/// The group and its API.
#[derive(Debug, Clone)]
pub struct FakeMig {
    state: Arc<Mutex<MigState>>,
    google: FakeGoogle,
}

impl FakeMig {
    /// An empty group `name` in `project` at `location`, with safe settings, accepting the
    /// access tokens `google` issued.
    pub fn new(google: FakeGoogle, project: &str, location: Location, name: &str) -> FakeMig {
        let mut settings = json!({
            "updatePolicy": {"type": "OPPORTUNISTIC", "instanceRedistributionType": "NONE"},
        });
        if matches!(location, Location::Zone(_))
            && let Some(p) = settings["updatePolicy"].as_object_mut()
        {
            p.remove("instanceRedistributionType");
        }
        FakeMig {
            google,
            state: Arc::new(Mutex::new(MigState {
                project: project.into(),
                location,
                name: name.into(),
                settings,
                instances: BTreeMap::new(),
                target_size: 0,
                ops: HashMap::new(),
                by_request: HashMap::new(),
                failures: Vec::new(),
                calls: Vec::new(),
                resize_downs: 0,
                stockout: None,
                step: Duration::from_millis(100),
                next_id: 4_000_000_000_000_000_001,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MigState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long each step of an instance or operation takes.
    pub fn set_step(&self, step: Duration) {
        self.lock().step = step;
    }

    /// Replaces part of what `get` returns (e.g. `{"updatePolicy": {"type": "PROACTIVE"}}`).
    pub fn set_settings(&self, settings: Value) {
        self.lock().settings = settings;
    }

    /// The next calls whose path contains `path_contains` fail like this.
    pub fn fail(&self, f: MigFailure) {
        self.lock().failures.push(f);
    }

    /// New instances stay `CREATING` with this `lastAttempt` error (e.g.
    /// `ZONE_RESOURCE_POOL_EXHAUSTED`) until cleared with `None`.
    pub fn set_stockout(&self, error: Option<(&str, &str)>) {
        self.lock().stockout = error.map(|(c, m)| (c.to_owned(), m.to_owned()));
    }

    /// A VM stopped outside the group (a guest shutdown): autohealing recreates it under the
    /// same name with a new id.
    pub fn stop_out_of_band(&self, name: &str) -> bool {
        let mut s = self.lock();
        let id = s.next_id;
        let Some(i) = s.instances.get_mut(name) else {
            return false;
        };
        i.id = id;
        i.created = Instant::now();
        s.next_id += 1;
        true
    }

    /// Instance names the group has (deleting ones included) with their ids (0: not yet).
    pub fn instances(&self) -> Vec<(String, u64)> {
        let s = self.lock();
        let now = Instant::now();
        s.instances
            .iter()
            .filter(|(_, i)| !gone(i, s.step, now))
            .map(|(n, i)| {
                (
                    n.clone(),
                    if steps(i.created, s.step, now) >= 1 {
                        i.id
                    } else {
                        0
                    },
                )
            })
            .collect()
    }

    pub fn target_size(&self) -> i64 {
        self.lock().target_size
    }

    /// How many `resize` calls asked for fewer VMs (the trap: it deletes whatever it likes).
    pub fn resize_downs(&self) -> usize {
        self.lock().resize_downs
    }

    /// Every call so far: (method, path, status).
    pub fn calls(&self) -> Vec<(String, String, u16)> {
        self.lock().calls.clone()
    }

    /// Serves the API under `/compute/v1/`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/compute/v1/{*path}", axum::routing::any(api))
            .with_state(self.clone())
    }
}

fn steps(since: Instant, step: Duration, now: Instant) -> u32 {
    let ms = step.as_millis().max(1);
    u32::try_from(now.saturating_duration_since(since).as_millis() / ms).unwrap_or(u32::MAX)
}

fn gone(i: &Inst, step: Duration, now: Instant) -> bool {
    i.deleting_since.is_some_and(|d| steps(d, step, now) >= 2)
}

fn error(status: u16, reason: &str, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        axum::Json(json!({"error": {"code": status, "message": message,
            "errors": [{"domain": "global", "reason": reason, "message": message}]}})),
    )
        .into_response()
}

async fn api(
    State(m): State<FakeMig>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let resp = answer(&m, &method, &path, &query, &headers, &body);
    let status = resp.status().as_u16();
    m.lock().calls.push((method.to_string(), path, status));
    resp
}

fn answer(
    m: &FakeMig,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !m.google.access_token_valid(bearer) {
        return error(
            401,
            "authError",
            "Request had invalid authentication credentials.",
        );
    }
    let mut s = m.lock();
    if let Some(f) = s
        .failures
        .iter_mut()
        .find(|f| f.times > 0 && path.contains(&f.path_contains))
    {
        f.times -= 1;
        return error(f.status, &f.reason.clone(), &f.message.clone());
    }
    let seg: Vec<&str> = path.trim_start_matches("/compute/v1/").split('/').collect();
    let (scope_kind, scope) = match s.location.clone() {
        Location::Zone(z) => ("zones", z),
        Location::Region(r, _) => ("regions", r),
    };
    let project = s.project.clone();
    let name = s.name.clone();
    match seg.as_slice() {
        ["projects", p, k, l, "operations", op, rest @ ..]
            if *p == project && *k == scope_kind && *l == scope =>
        {
            let get = rest.is_empty() && method == Method::GET;
            let wait = matches!(rest, ["wait"]) && method == Method::POST;
            if !(get || wait) {
                return error(404, "notFound", "not found");
            }
            match s.ops.get(*op).cloned() {
                Some(o) => axum::Json(op_json(&s, &o)).into_response(),
                None => error(
                    404,
                    "notFound",
                    &format!("The resource 'operations/{op}' was not found"),
                ),
            }
        }
        ["projects", p, k, l, "instanceGroupManagers", g, rest @ ..]
            if *p == project && *k == scope_kind && *l == scope && *g == name =>
        {
            igm_call(&mut s, method, rest, query, body)
        }
        _ => error(
            404,
            "notFound",
            &format!("The resource '{path}' was not found"),
        ),
    }
}

fn igm_call(
    s: &mut MigState,
    method: &Method,
    rest: &[&str],
    query: &HashMap<String, String>,
    body: &[u8],
) -> Response {
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return error(
                    400,
                    "parseError",
                    &format!("Invalid JSON payload received. {e}"),
                );
            }
        }
    };
    let request_id = query.get("requestId").cloned();
    if let Some(id) = &request_id {
        if id == "00000000-0000-0000-0000-000000000000" || uuid::Uuid::parse_str(id).is_err() {
            return error(400, "invalid", "Invalid value for field 'requestId'");
        }
        if let Some(op) = s.by_request.get(id).and_then(|n| s.ops.get(n)).cloned() {
            return axum::Json(op_json(s, &op)).into_response();
        }
    }
    match (method, rest) {
        (&Method::GET, []) => axum::Json(igm_json(s)).into_response(),
        (&Method::POST, ["listManagedInstances"]) => {
            let now = Instant::now();
            let step = s.step;
            s.instances.retain(|_, i| !gone(i, step, now));
            let list: Vec<Value> = s
                .instances
                .iter()
                .map(|(n, i)| managed(s, n, i, now))
                .collect();
            axum::Json(json!({"managedInstances": list})).into_response()
        }
        (&Method::POST, ["createInstances"]) => create(s, &body, request_id),
        (&Method::POST, ["deleteInstances"]) => delete(s, &body, request_id),
        (&Method::POST, ["resize"]) => {
            let Some(size) = query.get("size").and_then(|v| v.parse::<i64>().ok()) else {
                return error(400, "required", "Required parameter: size");
            };
            resize(s, size, request_id)
        }
        _ => error(404, "notFound", "not found"),
    }
}

fn create(s: &mut MigState, body: &Value, request_id: Option<String>) -> Response {
    let names: Vec<String> = body["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect();
    if names.is_empty() || names.len() > 1000 {
        return error(
            400,
            "invalid",
            "instances: 1 to 1000 per-instance configs with a name",
        );
    }
    if let Some(dup) = names.iter().find(|n| s.instances.contains_key(*n)) {
        return error(
            400,
            "alreadyExists",
            &format!("Instance '{dup}' already exists in the group"),
        );
    }
    let zones = match &s.location {
        Location::Zone(z) => vec![z.clone()],
        Location::Region(_, zs) => zs.clone(),
    };
    for (k, n) in names.iter().enumerate() {
        let id = s.next_id;
        s.next_id += 1;
        s.instances.insert(
            n.clone(),
            Inst {
                id,
                zone: zones[k % zones.len().max(1)].clone(),
                created: Instant::now(),
                deleting_since: None,
                failing: s.stockout.clone(),
            },
        );
    }
    s.target_size += names.len() as i64;
    new_op(
        s,
        "compute.instanceGroupManagers.createInstances",
        request_id,
    )
}

fn delete(s: &mut MigState, body: &Value, request_id: Option<String>) -> Response {
    let skip = body["skipInstancesOnValidationError"]
        .as_bool()
        .unwrap_or(false);
    let mut names = Vec::new();
    for url in body["instances"].as_array().into_iter().flatten() {
        let Some(url) = url.as_str() else {
            return error(400, "invalid", "instances must be URLs");
        };
        let parts: Vec<&str> = url.split('/').collect();
        let Some(pos) = parts.iter().position(|p| *p == "instances") else {
            return error(
                400,
                "invalid",
                &format!("Invalid value for field 'instances': '{url}'"),
            );
        };
        let (Some(zone), Some(name)) = (parts.get(pos.wrapping_sub(1)), parts.get(pos + 1)) else {
            return error(
                400,
                "invalid",
                &format!("Invalid value for field 'instances': '{url}'"),
            );
        };
        names.push((zone.to_string(), name.to_string()));
    }
    if names.is_empty() {
        return error(400, "invalid", "instances: at least one");
    }
    let now = Instant::now();
    let mut marked = 0;
    for (zone, name) in &names {
        let member = s
            .instances
            .get(name)
            .filter(|i| i.deleting_since.is_none() && !gone(i, s.step, now));
        match member {
            Some(i) if &i.zone != zone => {
                return error(
                    400,
                    "invalid",
                    &format!("Instance '{name}' is not in zone '{zone}'"),
                );
            }
            Some(_) => {}
            None if skip => continue,
            None => {
                return error(
                    400,
                    "invalid",
                    &format!(
                        "The instance '{name}' is not a member of the group or is already being deleted"
                    ),
                );
            }
        }
        if let Some(i) = s.instances.get_mut(name) {
            i.deleting_since = Some(now);
            marked += 1;
        }
    }
    s.target_size -= marked;
    new_op(
        s,
        "compute.instanceGroupManagers.deleteInstances",
        request_id,
    )
}

/// The trap: a smaller size deletes the newest running VMs, whatever they do.
fn resize(s: &mut MigState, size: i64, request_id: Option<String>) -> Response {
    if size < s.target_size {
        s.resize_downs += 1;
        let now = Instant::now();
        let mut live: Vec<(String, Instant)> = s
            .instances
            .iter()
            .filter(|(_, i)| i.deleting_since.is_none())
            .map(|(n, i)| (n.clone(), i.created))
            .collect();
        live.sort_by_key(|(_, c)| std::cmp::Reverse(*c));
        let excess = usize::try_from(s.target_size - size).unwrap_or(0);
        for (n, _) in live.into_iter().take(excess) {
            if let Some(i) = s.instances.get_mut(&n) {
                i.deleting_since = Some(now);
            }
        }
    }
    s.target_size = size.max(0);
    new_op(s, "compute.instanceGroupManagers.resize", request_id)
}

fn new_op(s: &mut MigState, op_type: &str, request_id: Option<String>) -> Response {
    let name = format!("operation-{}", uuid::Uuid::new_v4().simple());
    let op = Op {
        name: name.clone(),
        op_type: op_type.into(),
        request_id: request_id.clone(),
        started: Instant::now(),
    };
    if let Some(id) = request_id {
        s.by_request.insert(id, name.clone());
    }
    s.ops.insert(name, op.clone());
    axum::Json(op_json(s, &op)).into_response()
}

fn location_path(s: &MigState) -> String {
    match &s.location {
        Location::Zone(z) => format!("projects/{}/zones/{z}", s.project),
        Location::Region(r, _) => format!("projects/{}/regions/{r}", s.project),
    }
}

fn op_json(s: &MigState, o: &Op) -> Value {
    let status = match steps(o.started, s.step, Instant::now()) {
        0 => "PENDING",
        1 => "RUNNING",
        _ => "DONE",
    };
    let base = format!("https://www.googleapis.com/compute/v1/{}", location_path(s));
    json!({
        "kind": "compute#operation",
        "id": "7391846205930012345",
        "name": o.name,
        "operationType": o.op_type,
        "status": status,
        "progress": if status == "DONE" { 100 } else { 0 },
        "clientOperationId": o.request_id,
        "targetLink": format!("{base}/instanceGroupManagers/{}", s.name),
        "selfLink": format!("{base}/operations/{}", o.name),
    })
}

fn igm_json(s: &MigState) -> Value {
    let mut v = s.settings.clone();
    let base = format!("https://www.googleapis.com/compute/v1/{}", location_path(s));
    if let Some(o) = v.as_object_mut() {
        o.insert("kind".into(), json!("compute#instanceGroupManager"));
        o.insert("name".into(), json!(s.name));
        o.insert("targetSize".into(), json!(s.target_size));
        o.insert(
            "selfLink".into(),
            json!(format!("{base}/instanceGroupManagers/{}", s.name)),
        );
        o.insert("listManagedInstancesResults".into(), json!("PAGELESS"));
    }
    v
}

fn managed(s: &MigState, name: &str, i: &Inst, now: Instant) -> Value {
    let url = format!(
        "https://www.googleapis.com/compute/v1/projects/{}/zones/{}/instances/{name}",
        s.project, i.zone
    );
    if i.deleting_since.is_some() {
        return json!({"instance": url, "name": name, "id": i.id.to_string(),
            "currentAction": "DELETING", "instanceStatus": "STOPPING", "targetStatus": "DELETED"});
    }
    if let Some((code, message)) = &i.failing {
        return json!({"instance": url, "name": name, "currentAction": "CREATING",
            "targetStatus": "RUNNING",
            "lastAttempt": {"errors": {"errors": [{"code": code, "message": message}]}}});
    }
    let (action, status, id) = match steps(i.created, s.step, now) {
        0 => ("CREATING", "", None),
        1 => ("CREATING", "PROVISIONING", Some(i.id)),
        2 => ("CREATING", "STAGING", Some(i.id)),
        _ => ("NONE", "RUNNING", Some(i.id)),
    };
    let mut v = json!({"instance": url, "name": name, "currentAction": action,
        "targetStatus": "RUNNING", "version": {"instanceTemplate": "global/instanceTemplates/ci"}});
    if let Some(id) = id {
        v["id"] = json!(id.to_string());
        v["instanceStatus"] = json!(status);
    }
    v
}
