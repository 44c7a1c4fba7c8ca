//! The OpenAPI document's promises that the route annotations cannot state alone, written
//! once for every operation, so a client generated from `docs/openapi.json` (or a fuzzer
//! driven by it) sees exactly what the server does:
//!
//! * every failure answers the same JSON [`ErrorBody`] and every operation lists the
//!   failures the gate can give it (401, 429, and 403 for admin-only writes);
//! * ids in paths and filters carry the pattern [`miglet_proto::ids::validate_id`] enforces;
//! * page sizes, enums and command parameters are bounded as the handlers check them.
//!
//! The command bodies are typed here too ([`CommandParameters`]): the server parses them
//! with the same structs, so the document and the check cannot drift apart.

use crate::auth::enrollment_token::MAX_TTL_SECS as MAX_TOKEN_TTL_SECS;
use crate::error::ApiError;
use miglet_proto::command::{Command, LogLevel};
use miglet_proto::ids::MAX_ID_LEN;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use utoipa::{PartialSchema, ToSchema};

/// [`miglet_proto::ids::validate_id`] as a regular expression (ECMA-262, as JSON Schema uses).
pub fn id_pattern() -> String {
    format!(
        "^(?!.*\\.\\.)[A-Za-z0-9][A-Za-z0-9._-]{{0,{}}}$",
        MAX_ID_LEN - 1
    )
}

/// The error every failure answers with.
#[derive(Debug, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// For a program: `bad_request`, `unauthenticated`, `permission_denied`, `not_found`,
    /// `conflict`, `payload_too_large`, `rate_limited`, `unavailable` or `internal`.
    pub code: String,
}

/// `drain` parameters.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DrainParameters {
    /// Why (shown in the agent's log and events).
    pub reason: Option<String>,
    /// Seconds the running job may take before the agent stops waiting (0 or absent: no limit).
    #[schema(minimum = 0, maximum = 4_294_967_295_u64)]
    pub timeout_seconds: Option<u32>,
}

/// `shutdown` parameters.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShutdownParameters {
    pub reason: Option<String>,
    /// Stop without waiting for the running job.
    pub force: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// `set_log_level` parameters.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetLogLevelParameters {
    pub level: Level,
}

/// `update_config` parameters.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateConfigParameters {
    /// The agent setting, e.g. `heartbeat_interval`.
    #[schema(min_length = 1)]
    pub key: String,
    pub value: Option<String>,
}

/// The commands an operator may queue (`register_runner` is the controller's own).
pub const OPERATOR_COMMANDS: [&str; 4] = ["drain", "shutdown", "set_log_level", "update_config"];

/// Parses an operator command strictly: the type must be one an operator may queue and the
/// parameters exactly that type's (no unknown names, no wrong types).
pub fn parse_command(
    command_type: &str,
    parameters: &Map<String, Value>,
) -> Result<Command, String> {
    let value = Value::Object(parameters.clone());
    let strict = |e: serde_json::Error| format!("parameters of {command_type}: {e}");
    match command_type {
        "drain" => {
            let p: DrainParameters = serde_json::from_value(value).map_err(strict)?;
            Ok(Command::Drain {
                reason: p.reason.unwrap_or_default(),
                timeout_seconds: p.timeout_seconds.filter(|t| *t > 0).map(i64::from),
            })
        }
        "shutdown" => {
            let p: ShutdownParameters = serde_json::from_value(value).map_err(strict)?;
            Ok(Command::Shutdown {
                reason: p.reason.unwrap_or_default(),
                force: p.force.unwrap_or(false),
            })
        }
        "set_log_level" => {
            let p: SetLogLevelParameters = serde_json::from_value(value).map_err(strict)?;
            Ok(Command::SetLogLevel {
                level: match p.level {
                    Level::Trace => LogLevel::Trace,
                    Level::Debug => LogLevel::Debug,
                    Level::Info => LogLevel::Info,
                    Level::Warn => LogLevel::Warn,
                    Level::Error => LogLevel::Error,
                },
            })
        }
        "update_config" => {
            let p: UpdateConfigParameters = serde_json::from_value(value).map_err(strict)?;
            if p.key.is_empty() {
                return Err("parameters of update_config: key is empty".into());
            }
            Ok(Command::UpdateConfig {
                key: p.key,
                value: p.value.unwrap_or_default(),
            })
        }
        "register_runner" => Err("register_runner is issued by the controller itself".into()),
        other => Err(format!(
            "unknown command type {other:?} (one of {})",
            OPERATOR_COMMANDS.join(", ")
        )),
    }
}

/// Parses an admin request body. Numbers are read as JSON Schema reads them: `30.0` is the
/// integer 30 (serde alone would refuse it where an integer is expected).
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let malformed =
        |e: serde_json::Error| ApiError::BadRequest(format!("malformed JSON body: {e}"));
    let mut value: Value = serde_json::from_slice(bytes).map_err(malformed)?;
    integral_floats_as_integers(&mut value);
    serde_json::from_value(value).map_err(malformed)
}

fn integral_floats_as_integers(v: &mut Value) {
    match v {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            if let Some(f) = n.as_f64()
                && f.fract() == 0.0
                && f.abs() < 9.0e15
            {
                // Exact below 2^53; larger floats stay floats and are refused as such.
                *v = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        Value::Object(map) => map.values_mut().for_each(integral_floats_as_integers),
        _ => {}
    }
}

/// An RFC 3339 time as `chrono` parses it (calendar validity, e.g. no 30 February, is left
/// to the server, which answers 400).
const RFC3339_PATTERN: &str = "^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt ]([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$";

/// Most seconds a queued command may stay deliverable.
pub const MAX_COMMAND_TTL_SECS: u64 = 30 * 86_400;

/// Writes the promises above into the generated document.
pub struct Contract;

impl utoipa::Modify for Contract {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let Ok(mut doc) = serde_json::to_value(&*api) else {
            return;
        };
        apply(&mut doc);
        if let Ok(patched) = serde_json::from_value(doc) {
            *api = patched;
        }
    }
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

/// What the generated document cannot know: the exact shapes the handlers accept (command
/// bodies, ids, filters) and the error answers every operation can give.
fn apply(doc: &mut Value) {
    let id =
        json!({"type": "string", "pattern": id_pattern(), "minLength": 1, "maxLength": MAX_ID_LEN});
    add_schemas(&mut doc["components"]["schemas"], &id);
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            let write = method != "get";
            let has_parameters = constrain_parameters(path, op, &id);
            add_error_responses(&mut op["responses"], write, write || has_parameters);
        }
    }
}

/// The bodies' schemas: one shape per command type, ids where ids go.
fn add_schemas(schemas: &mut Value, id: &Value) {
    for (name, schema) in [
        ("ErrorBody", ErrorBody::schema()),
        ("DrainParameters", DrainParameters::schema()),
        ("ShutdownParameters", ShutdownParameters::schema()),
        ("SetLogLevelParameters", SetLogLevelParameters::schema()),
        ("UpdateConfigParameters", UpdateConfigParameters::schema()),
        ("Level", Level::schema()),
    ] {
        schemas[name] = serde_json::to_value(schema).unwrap_or(Value::Null);
    }
    let ttl = json!({
        "type": ["integer", "null"], "minimum": 1, "maximum": MAX_COMMAND_TTL_SECS,
        "description": "Seconds the command stays deliverable (default: the controller's command TTL)."
    });
    let variants: Vec<Value> = OPERATOR_COMMANDS
        .iter()
        .map(|t| {
            let params = match *t {
                "drain" => "DrainParameters",
                "shutdown" => "ShutdownParameters",
                "set_log_level" => "SetLogLevelParameters",
                _ => "UpdateConfigParameters",
            };
            let mut required = vec!["type"];
            if matches!(*t, "set_log_level" | "update_config") {
                required.push("parameters");
            }
            json!({
                "type": "object",
                "title": t,
                "required": required,
                "additionalProperties": false,
                "properties": {
                    "type": {"type": "string", "enum": [t]},
                    "parameters": {"$ref": format!("#/components/schemas/{params}")},
                    "ttl_secs": ttl,
                }
            })
        })
        .collect();
    schemas["EnqueueBody"] = json!({
        "description": "A command to queue: its type and that type's parameters (PROTOCOL.md).",
        "oneOf": variants,
    });
    for at in [
        &["MovePoolBody", "properties", "pool_id"],
        &["EnrollmentTokenBody", "properties", "vm_id"],
        &["EnrollmentTokenBody", "properties", "pool_id"],
    ] {
        set(schemas, at, id.clone());
    }
    set(
        schemas,
        &["EnrollmentTokenBody", "properties", "ttl_secs"],
        json!({"type": ["integer", "null"], "minimum": 1, "maximum": MAX_TOKEN_TTL_SECS,
               "description": "Lifetime in seconds (default 86400)."}),
    );
}

/// Path and query parameters constrained to exactly what the handler accepts (filters:
/// empty means "any"). Returns whether the operation takes any parameter.
fn constrain_parameters(path: &str, op: &mut Value, id: &Value) -> bool {
    let Some(params) = op["parameters"].as_array_mut() else {
        return false;
    };
    let id_or_any = json!({"type": "string", "pattern": format!("^$|{}", id_pattern()), "maxLength": MAX_ID_LEN});
    let one_of = |values: &[&str]| {
        let mut all = vec![""];
        all.extend_from_slice(values);
        json!({"type": "string", "enum": all})
    };
    let time = json!({"type": "string", "anyOf": [
        {"maxLength": 0},
        {"pattern": "^[+-]?[0-9]{1,18}$", "description": "Unix milliseconds"},
        {"format": "date-time", "pattern": RFC3339_PATTERN}
    ]});
    let any = !params.is_empty();
    for p in params {
        let name = p["name"].as_str().unwrap_or_default().to_owned();
        let place = p["in"].as_str().unwrap_or_default().to_owned();
        let schema = match (place.as_str(), name.as_str()) {
            ("path", _) => id.clone(),
            ("query", "vm" | "cursor") => id_or_any.clone(),
            ("query", "limit") => {
                json!({"type": "integer", "minimum": 1, "maximum": super::MAX_PAGE})
            }
            ("query", "minutes") => {
                json!({"type": "integer", "minimum": 1, "maximum": super::MAX_HISTORY_MINUTES})
            }
            ("query", "health") => one_of(&["healthy", "unhealthy", "lost"]),
            ("query", "state") if path.ends_with("/commands") => {
                one_of(&["pending", "delivered", "acknowledged", "failed", "expired"])
            }
            ("query", "type") if path.contains("/events") => json!({
                "type": "string",
                "pattern": "^[a-z0-9_]{0,64}(,[a-z0-9_]{0,64})*$"
            }),
            ("query", "since" | "until") => time.clone(),
            _ => continue,
        };
        p["schema"] = schema;
    }
    any
}

/// The error answers an operation can give, each with the `ErrorBody` shape.
fn add_error_responses(responses: &mut Value, write: bool, validated_input: bool) {
    let mut add = |code: &str, description: &str| {
        let entry = &mut responses[code];
        let description = entry["description"]
            .as_str()
            .filter(|d| !d.is_empty())
            .unwrap_or(description)
            .to_owned();
        *entry = error_response(&description);
    };
    add(
        "401",
        "no operator token, or one that is unknown, expired or revoked",
    );
    add("429", "over the per-address rate limit; see Retry-After");
    if write {
        add("403", "a read-only token");
        add("413", "body larger than the limit");
    }
    if validated_input {
        add("400", "bad parameter or body");
    }
    if let Some(codes) = responses.as_object_mut() {
        let existing: Vec<String> = codes.keys().cloned().collect();
        for code in existing {
            if code.starts_with('4') || code.starts_with('5') {
                let d = codes[&code]["description"]
                    .as_str()
                    .unwrap_or("failed")
                    .to_owned();
                codes[&code] = error_response(&d);
            }
        }
    }
}

fn set(root: &mut Value, path: &[&str], value: Value) {
    let mut at = root;
    for key in path {
        at = &mut at[*key];
    }
    *at = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_pattern_agrees_with_validate_id() {
        // The pattern is used by clients (JavaScript-style regular expressions); this checks
        // it by hand against a few ids either way instead of pulling a regex engine in.
        let p = id_pattern();
        assert!(p.starts_with("^(?!.*\\.\\.)"), "{p}");
        assert!(p.ends_with(&format!("{{0,{}}}$", MAX_ID_LEN - 1)), "{p}");
        for ok in ["vm-1", "a", "A.b_c-9"] {
            assert!(miglet_proto::ids::validate_id("id", ok).is_ok());
        }
        for bad in ["", "-a", "a..b", "a/b", "ä"] {
            assert!(miglet_proto::ids::validate_id("id", bad).is_err());
        }
    }

    #[test]
    fn times_the_pattern_admits_parse() {
        for t in [
            "2026-12-03T10:00:00Z",
            "2026-12-03t10:00:00z",
            "2026-12-03 10:00:00+01:00",
            "2026-12-31T23:59:60.123456789-23:59",
            "2026-12-03T10:00:00.1234567891Z",
        ] {
            assert!(chrono::DateTime::parse_from_rfc3339(t).is_ok(), "{t}");
        }
        for t in [
            "2026-12-03T10:00Z",
            "2026-12-03T10:00:00",
            "2026-12-03T10:00:00.Z",
        ] {
            assert!(chrono::DateTime::parse_from_rfc3339(t).is_err(), "{t}");
        }
    }

    #[test]
    fn integral_floats_are_integers_as_in_json_schema() {
        #[derive(Deserialize)]
        struct B {
            n: u64,
            m: Vec<i32>,
        }
        let b: Result<B, _> = parse_body(br#"{"n": 194.0, "m": [-2.0, 3]}"#);
        assert!(b.is_ok_and(|b| b.n == 194 && b.m == [-2, 3]));
        assert!(parse_body::<B>(br#"{"n": 1.5, "m": []}"#).is_err());
        assert!(parse_body::<B>(br#"{"n": 1e300, "m": []}"#).is_err());
    }

    #[test]
    fn command_parameters_are_strict() {
        let p = |v: Value| v.as_object().cloned().unwrap_or_default();
        assert!(parse_command("drain", &p(json!({}))).is_ok());
        assert!(parse_command("drain", &p(json!({"reason": "x", "timeout_seconds": 30}))).is_ok());
        assert!(parse_command("drain", &p(json!({"timeout_seconds": "30"}))).is_err());
        assert!(parse_command("drain", &p(json!({"extra": 1}))).is_err());
        assert!(parse_command("set_log_level", &p(json!({"level": "debug"}))).is_ok());
        assert!(parse_command("set_log_level", &p(json!({"level": "DEBUG"}))).is_err());
        assert!(parse_command("set_log_level", &p(json!({}))).is_err());
        assert!(parse_command("update_config", &p(json!({"key": ""}))).is_err());
        assert!(parse_command("update_config", &p(json!({"key": "k", "value": null}))).is_ok());
        let reg = parse_command("register_runner", &p(json!({})));
        assert!(reg.is_err_and(|e| e.contains("controller itself")));
        assert!(parse_command("array", &p(json!({}))).is_err_and(|e| e.contains("one of drain")));
    }

    #[test]
    fn every_operation_documents_the_gate_and_its_error_body() {
        let doc = serde_json::to_value(super::super::openapi()).unwrap_or_default();
        let paths = doc["paths"].as_object().cloned().unwrap_or_default();
        assert!(paths.len() >= 15);
        for (path, item) in &paths {
            for (method, op) in item.as_object().into_iter().flatten() {
                for code in ["401", "429"] {
                    assert_eq!(
                        op["responses"][code]["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{method} {path} {code}"
                    );
                }
            }
        }
        assert_eq!(
            doc["components"]["schemas"]["EnqueueBody"]["oneOf"]
                .as_array()
                .map(Vec::len),
            Some(4)
        );
    }
}
