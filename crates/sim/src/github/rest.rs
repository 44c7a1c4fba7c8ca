//! The REST API side of the GitHub stand-in, as the controller uses it (research file §5):
//! App authentication (the app JWT verified against the App's public key, `iat`/`exp` rules,
//! installation tokens of an hour), PATs, registration tokens, just-in-time runner configs the
//! runner stand-in can decode and connect with, runner groups, listing (paginated, `Link`) and
//! deleting runners, and failures on demand (401, 403 secondary rate limit with
//! `Retry-After`, 404, 409/422, 5xx).

use super::*;
use axum::body::Bytes;
use axum::extract::{OriginalUri, Query};
use axum::http::Method;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

/// The test App's private key (PKCS#1 PEM, as GitHub hands it out) and its public half.
pub const APP_PRIVATE_KEY: &str = include_str!("../../keys/github-app-test.pem");
const APP_PUBLIC_KEY: &str = include_str!("../../keys/github-app-test.pub.pem");

/// A failure the next matching REST calls get instead of their answer.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Applies to paths containing this (empty: any).
    pub path_contains: String,
    pub status: u16,
    pub message: String,
    pub retry_after: Option<u64>,
    /// How many calls it applies to.
    pub times: usize,
}

/// REST state of the stand-in.
#[derive(Debug, Default)]
pub(super) struct Rest {
    pub app_id: Option<u64>,
    pub installation_id: u64,
    pub pats: Vec<String>,
    /// Installation tokens and their expiry (Unix s).
    pub installation_tokens: HashMap<String, i64>,
    pub installation_token_ttl_secs: i64,
    pub failures: Vec<Failure>,
    /// Every REST call: (method, path, status).
    pub calls: Vec<(String, String, u16)>,
    pub next_runner_id: u64,
    /// Runner ids by name (REST view of the runners).
    pub runner_ids: HashMap<String, u64>,
    pub busy: Vec<String>,
    pub groups: Vec<(u64, String)>,
}

impl FakeGitHub {
    /// Accepts the test App ([`APP_PRIVATE_KEY`]) as `app_id`, installed as `installation_id`.
    pub fn with_app(self, app_id: u64, installation_id: u64) -> FakeGitHub {
        {
            let mut g = self.lock();
            g.rest.app_id = Some(app_id);
            g.rest.installation_id = installation_id;
        }
        self
    }

    /// Accepts `pat` as a personal access token.
    pub fn with_pat(self, pat: &str) -> FakeGitHub {
        self.lock().rest.pats.push(pat.to_owned());
        self
    }

    /// Installation tokens issued from now on live this long (GitHub: an hour).
    pub fn set_installation_token_ttl(&self, secs: i64) {
        self.lock().rest.installation_token_ttl_secs = secs;
    }

    /// Adds a runner group.
    pub fn add_group(&self, id: u64, name: &str) {
        self.lock().rest.groups.push((id, name.to_owned()));
    }

    /// The next `times` REST calls whose path contains `path_contains` fail like this.
    pub fn fail(&self, failure: Failure) {
        self.lock().rest.failures.push(failure);
    }

    /// Revokes every installation token (a 401 for whoever uses one next).
    pub fn revoke_installation_tokens(&self) {
        self.lock().rest.installation_tokens.clear();
    }

    /// Marks a runner busy (it cannot be deleted).
    pub fn set_busy(&self, runner: &str, busy: bool) {
        let mut g = self.lock();
        g.rest.busy.retain(|r| r != runner);
        if busy {
            g.rest.busy.push(runner.to_owned());
        }
    }

    /// Every REST call so far: (method, path, status).
    pub fn rest_calls(&self) -> Vec<(String, String, u16)> {
        self.lock().rest.calls.clone()
    }

    /// The runners GitHub lists (registered and not removed), by name.
    pub fn listed_runners(&self) -> Vec<String> {
        let g = self.lock();
        let mut v: Vec<String> = g
            .rest
            .runner_ids
            .keys()
            .filter(|n| g.runners.get(*n).is_none_or(|r| r.status != "deleted"))
            .cloned()
            .collect();
        v.sort();
        v
    }
}

pub(super) fn error(status: u16, message: &str) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        Json(json!({"message": message, "documentation_url": "https://docs.github.com/rest"})),
    )
        .into_response()
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .unwrap_or_default()
        .to_rfc3339()
}

/// Verifies an app JWT as GitHub does: RS256 by the App's key, `iss` the app id, `exp` in the
/// future and at most 10 minutes after `iat`.
fn app_jwt_ok(token: &str, app_id: u64) -> Result<(), String> {
    let key = DecodingKey::from_rsa_pem(APP_PUBLIC_KEY.as_bytes()).map_err(|e| e.to_string())?;
    let mut v = Validation::new(Algorithm::RS256);
    v.set_required_spec_claims(&["exp", "iat", "iss"]);
    v.leeway = 0;
    let data = jsonwebtoken::decode::<Value>(token, &key, &v).map_err(|e| e.to_string())?;
    let c = data.claims;
    let iss = c["iss"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| c["iss"].as_u64().map(|n| n.to_string()));
    if iss.as_deref() != Some(app_id.to_string().as_str()) {
        return Err("'iss' is not this App".into());
    }
    let (iat, exp) = (
        c["iat"].as_i64().unwrap_or(0),
        c["exp"].as_i64().unwrap_or(0),
    );
    if exp - iat > 600 || iat > now_secs() + 60 {
        return Err("'Expiration time' claim ('exp') is too far in the future".into());
    }
    Ok(())
}

/// The REST handler: `/app/...`, `/orgs|repos|enterprises/.../installation` and
/// `.../actions/runners...`, `.../actions/runner-groups`.
pub(super) async fn rest(
    State(g): State<FakeGitHub>,
    method: Method,
    OriginalUri(uri): OriginalUri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let resp = answer(&g, &method, &path, &query, &headers, &body);
    let status = resp.status().as_u16();
    g.lock().rest.calls.push((method.to_string(), path, status));
    resp
}

fn answer(
    g: &FakeGitHub,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    if header("user-agent").is_empty() {
        return error(
            403,
            "Request forbidden by administrative rules. Please make sure your request has a User-Agent header",
        );
    }
    let mut inner = g.lock();
    if let Some(f) = inner
        .rest
        .failures
        .iter_mut()
        .find(|f| f.times > 0 && path.contains(&f.path_contains))
    {
        f.times -= 1;
        let (status, message, retry) = (f.status, f.message.clone(), f.retry_after);
        let mut resp = error(status, &message);
        if let Some(r) = retry
            && let Ok(v) = r.to_string().parse()
        {
            resp.headers_mut().insert("retry-after", v);
        }
        return resp;
    }
    let bearer = header("authorization")
        .strip_prefix("Bearer ")
        .unwrap_or_default()
        .to_owned();
    let seg: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // App endpoints: the app JWT.
    if seg.first() == Some(&"app") || seg.last() == Some(&"installation") {
        let Some(app_id) = inner.rest.app_id else {
            return error(404, "Not Found");
        };
        if let Err(e) = app_jwt_ok(&bearer, app_id) {
            return error(401, &format!("A JSON web token could not be decoded: {e}"));
        }
        return app_call(&mut inner, method, &seg);
    }
    // Everything else: an installation token or a PAT.
    let now = now_secs();
    let valid_install = inner
        .rest
        .installation_tokens
        .get(&bearer)
        .is_some_and(|exp| *exp > now);
    if !(valid_install || inner.rest.pats.contains(&bearer)) {
        return error(401, "Bad credentials");
    }
    if let (&Method::GET, ["orgs", org, "repos"]) = (method, seg.as_slice()) {
        return jobs::org_repos(&inner, org, query);
    }
    let Some(at) = seg.iter().position(|s| *s == "actions") else {
        return error(404, "Not Found");
    };
    let scope = seg[..at].join("/");
    if let (&Method::GET, ["repos", owner, repo]) = (method, &seg[..at])
        && let Some(resp) =
            jobs::rest_call(&inner, &format!("{owner}/{repo}"), &seg[at + 1..], query)
    {
        return resp;
    }
    let origin = format!("http://{}", header("host"));
    runners_call(
        &mut inner,
        method,
        (&origin, &scope),
        &seg[at + 1..],
        query,
        body,
    )
}

fn app_call(inner: &mut Inner, method: &Method, seg: &[&str]) -> Response {
    match (method, seg) {
        (&Method::GET, [.., "installation"]) => {
            Json(json!({"id": inner.rest.installation_id, "app_id": inner.rest.app_id}))
                .into_response()
        }
        (&Method::POST, ["app", "installations", id, "access_tokens"]) => {
            if id.parse::<u64>().ok() != Some(inner.rest.installation_id) {
                return error(404, "Not Found");
            }
            let ttl = match inner.rest.installation_token_ttl_secs {
                0 => 3600,
                t => t,
            };
            let token = format!("ghs_{}", uuid::Uuid::new_v4().simple());
            let exp = now_secs() + ttl;
            inner.rest.installation_tokens.insert(token.clone(), exp);
            (
                StatusCode::CREATED,
                Json(json!({"token": token, "expires_at": rfc3339(exp), "permissions": {"organization_self_hosted_runners": "write"}})),
            )
                .into_response()
        }
        _ => error(404, "Not Found"),
    }
}

fn runner_json(inner: &Inner, name: &str, id: u64) -> Value {
    let r = inner.runners.get(name);
    let online = r.is_some_and(|r| r.status == "online");
    json!({
        "id": id,
        "name": name,
        "os": "linux",
        "status": if online { "online" } else { "offline" },
        "busy": inner.rest.busy.iter().any(|b| b == name),
        "ephemeral": r.is_some_and(|r| r.ephemeral),
        "labels": r.map(|r| r.labels.iter().map(|l| json!({"name": l, "type": "custom"})).collect::<Vec<_>>()).unwrap_or_default(),
    })
}

fn runners_call(
    inner: &mut Inner,
    method: &Method,
    (origin, scope): (&str, &str),
    rest: &[&str],
    query: &HashMap<String, String>,
    body: &[u8],
) -> Response {
    match (method, rest) {
        (&Method::POST, ["runners", "registration-token"]) => {
            let token: String = uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .to_ascii_uppercase()
                .chars()
                .take(29)
                .collect();
            inner.tokens.push(token.clone());
            (
                StatusCode::CREATED,
                Json(json!({"token": token, "expires_at": rfc3339(now_secs() + 3600)})),
            )
                .into_response()
        }
        (&Method::POST, ["runners", "generate-jitconfig"]) => jit(inner, origin, scope, body),
        (&Method::GET, ["runners"]) => list(inner, origin, scope, query),
        (&Method::DELETE, ["runners", id]) => {
            let Ok(id) = id.parse::<u64>() else {
                return error(404, "Not Found");
            };
            let Some(name) = inner
                .rest
                .runner_ids
                .iter()
                .find(|(_, v)| **v == id)
                .map(|(k, _)| k.clone())
            else {
                return error(404, "Not Found");
            };
            if inner.rest.busy.contains(&name) {
                return error(
                    422,
                    &format!("Bad request - Runner \"{name}\" is still running a job"),
                );
            }
            inner.rest.runner_ids.remove(&name);
            if let Some(r) = inner.runners.get_mut(&name) {
                r.status = "deleted".into();
            }
            StatusCode::NO_CONTENT.into_response()
        }
        (&Method::GET, ["runner-groups"]) => {
            let mut groups = vec![json!({"id": 1, "name": "Default", "default": true})];
            groups.extend(
                inner
                    .rest
                    .groups
                    .iter()
                    .map(|(id, name)| json!({"id": id, "name": name, "default": false})),
            );
            Json(json!({"total_count": groups.len(), "runner_groups": groups})).into_response()
        }
        _ => error(404, "Not Found"),
    }
}

fn jit(inner: &mut Inner, origin: &str, scope: &str, body: &[u8]) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return error(400, "Problems parsing JSON");
    };
    let Some(name) = req["name"].as_str().filter(|n| !n.is_empty()) else {
        return error(422, "Invalid input: object is missing required key: name");
    };
    let Some(group) = req["runner_group_id"].as_u64() else {
        return error(
            422,
            "Invalid input: object is missing required key: runner_group_id",
        );
    };
    if group != 1 && !inner.rest.groups.iter().any(|(id, _)| *id == group) {
        return error(404, "Not Found");
    }
    let labels: Vec<String> = req["labels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.as_str().map(str::to_owned))
        .collect();
    if labels.is_empty() || labels.len() > 100 {
        return error(422, "Invalid input: labels must hold 1 to 100 items");
    }
    if inner.rest.runner_ids.contains_key(name) {
        return error(
            409,
            "Already exists - A runner with the name already exists.",
        );
    }
    inner.rest.next_runner_id += 1;
    let id = inner.rest.next_runner_id;
    let work = req["work_folder"].as_str().unwrap_or("_work");
    // What `.runner` holds for a configured runner; the listener stand-in connects with it.
    let owner = scope.rsplit('/').next().unwrap_or_default();
    let url = format!("{origin}/{owner}");
    let settings = json!({
        "agentId": id, "agentName": name, "poolId": group, "poolName": "Default",
        "serverUrl": "", "gitHubUrl": url, "workFolder": work, "useV2Flow": true,
        "ephemeral": true, "disableUpdate": true,
    });
    let creds = json!({"scheme": "OAuth", "data": {"clientId": uuid::Uuid::new_v4().to_string()}});
    let files = json!({
        ".runner": B64.encode(settings.to_string()),
        ".credentials": B64.encode(creds.to_string()),
        ".credentials_rsaparams": B64.encode("{}"),
    });
    inner.rest.runner_ids.insert(name.to_owned(), id);
    inner.runners.insert(
        name.to_owned(),
        RegisteredRunner {
            name: name.to_owned(),
            labels,
            group: group.to_string(),
            ephemeral: true,
            url,
            status: "offline".into(),
        },
    );
    let runner = runner_json(inner, name, id);
    (
        StatusCode::CREATED,
        Json(json!({"runner": runner, "encoded_jit_config": B64.encode(files.to_string())})),
    )
        .into_response()
}

fn list(inner: &Inner, origin: &str, scope: &str, query: &HashMap<String, String>) -> Response {
    let per_page: usize = query
        .get("per_page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(30)
        .clamp(1, 100);
    let page: usize = query
        .get("page")
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .max(1);
    // A runner that removed itself (an ephemeral runner after its job) is gone.
    let mut all: Vec<(&String, &u64)> = inner
        .rest
        .runner_ids
        .iter()
        .filter(|(n, _)| inner.runners.get(*n).is_none_or(|r| r.status != "deleted"))
        .collect();
    all.sort_by_key(|(_, id)| **id);
    if let Some(name) = query.get("name") {
        all.retain(|(n, _)| *n == name);
    }
    let total = all.len();
    let runners: Vec<Value> = all
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|(n, id)| runner_json(inner, n, **id))
        .collect();
    let mut resp = Json(json!({"total_count": total, "runners": runners})).into_response();
    if page * per_page < total
        && let Ok(v) = format!(
            "<{origin}/{scope}/actions/runners?per_page={per_page}&page={}>; rel=\"next\"",
            page + 1
        )
        .parse()
    {
        resp.headers_mut().insert("link", v);
    }
    resp
}
