//! Typed commands (controller -> agent) with lossless conversion to and from both wire forms:
//! the JSON command of `GET .../commands` and the gRPC [`pb::Command`].
//!
//! | type | JSON parameters | gRPC placement |
//! |---|---|---|
//! | `register_runner` | `registration_token`, `runner_url`, `runner_group`, `labels`, `expires_at`, `jit_config`, `runner_name` | strings in `string_params`, labels in `string_array_params` |
//! | `drain` | `reason`, `timeout_seconds` | `string_params`, `int_params` |
//! | `shutdown` | `reason`, `force` | `string_params`, `bool_params` |
//! | `set_log_level` | `level` | `string_params` |
//! | `update_config` | `key`, `value` | `string_params` |
//!
//! Readers are tolerant (extra parameters are ignored; numbers and booleans sent as strings
//! are accepted) but a missing required parameter is a [`CommandError`] that names it, so an
//! agent can acknowledge the command as failed with a clear message.

use crate::json::CommandJson;
use crate::pb;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use thiserror::Error;

pub const REGISTER_RUNNER: &str = "register_runner";
pub const DRAIN: &str = "drain";
pub const SHUTDOWN: &str = "shutdown";
pub const SET_LOG_LEVEL: &str = "set_log_level";
pub const UPDATE_CONFIG: &str = "update_config";

/// The value written in place of a secret wherever a command is stored or logged.
pub const REDACTED: &str = "[REDACTED]";

/// Fields that carry a GitHub secret, wherever they appear in a stored JSON object.
pub const SECRET_FIELDS: [&str; 2] = ["registration_token", "jit_config"];

/// Replaces every [`SECRET_FIELDS`] value of `object` with [`REDACTED`]: the one place the
/// controller redacts before it stores or logs a command's parameters or a registration
/// answer.
pub fn redact_secrets(object: &mut Map<String, Value>) {
    for key in SECRET_FIELDS {
        if let Some(v) = object.get_mut(key) {
            *v = Value::String(REDACTED.into());
        }
    }
}

/// A command with its identity, as queued and delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandEnvelope {
    pub id: String,
    pub created_at: DateTime<Utc>,
    pub command: Command,
}

/// What the controller asks an agent to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Configure and start the runner. Allowed only in `ready`.
    RegisterRunner(RegisterRunner),
    /// Finish the current job, take no new one, then shut down. Allowed in any live state.
    Drain {
        reason: String,
        timeout_seconds: Option<i64>,
    },
    /// Stop the runner (gracefully, or at once with `force`) and shut down.
    Shutdown { reason: String, force: bool },
    /// Change the agent's log level live.
    SetLogLevel { level: LogLevel },
    /// Change one agent setting live.
    UpdateConfig { key: String, value: String },
}

/// Parameters of `register_runner`. Either `registration_token` or `jit_config` is set.
#[derive(Clone, PartialEq)]
pub struct RegisterRunner {
    pub registration_token: Option<String>,
    pub jit_config: Option<String>,
    pub runner_url: String,
    pub runner_group: String,
    pub labels: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub runner_name: Option<String>,
}

impl fmt::Debug for RegisterRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterRunner")
            .field(
                "registration_token",
                &self.registration_token.as_ref().map(|_| REDACTED),
            )
            .field("jit_config", &self.jit_config.as_ref().map(|_| REDACTED))
            .field("runner_url", &self.runner_url)
            .field("runner_group", &self.runner_group)
            .field("labels", &self.labels)
            .field("expires_at", &self.expires_at)
            .field("runner_name", &self.runner_name)
            .finish()
    }
}

/// Log levels an agent accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<LogLevel> {
        Some(match s.to_ascii_lowercase().as_str() {
            "trace" => LogLevel::Trace,
            "debug" => LogLevel::Debug,
            "info" => LogLevel::Info,
            "warn" | "warning" => LogLevel::Warn,
            "error" => LogLevel::Error,
            _ => return None,
        })
    }
}

/// Why a wire command could not be turned into a [`Command`]. The message is meant for the
/// acknowledgment sent back to the controller.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CommandError {
    #[error("unknown command type {0:?}")]
    UnknownType(String),
    #[error("missing parameter {0}")]
    Missing(&'static str),
    #[error("parameter {name} is not a valid {expected}")]
    Invalid {
        name: &'static str,
        expected: &'static str,
    },
    #[error("register_runner needs registration_token or jit_config")]
    NoCredential,
}

impl Command {
    /// The wire `type` of this command.
    pub fn type_name(&self) -> &'static str {
        match self {
            Command::RegisterRunner(_) => REGISTER_RUNNER,
            Command::Drain { .. } => DRAIN,
            Command::Shutdown { .. } => SHUTDOWN,
            Command::SetLogLevel { .. } => SET_LOG_LEVEL,
            Command::UpdateConfig { .. } => UPDATE_CONFIG,
        }
    }

    /// JSON `parameters` with native JSON types.
    pub fn to_json_parameters(&self) -> Map<String, Value> {
        let mut p = Map::new();
        match self {
            Command::RegisterRunner(r) => {
                if let Some(t) = &r.registration_token {
                    p.insert("registration_token".into(), t.clone().into());
                }
                if let Some(j) = &r.jit_config {
                    p.insert("jit_config".into(), j.clone().into());
                }
                p.insert("runner_url".into(), r.runner_url.clone().into());
                p.insert("runner_group".into(), r.runner_group.clone().into());
                p.insert("labels".into(), r.labels.clone().into());
                if let Some(e) = r.expires_at {
                    p.insert("expires_at".into(), crate::rfc3339(e).into());
                }
                if let Some(n) = &r.runner_name {
                    p.insert("runner_name".into(), n.clone().into());
                }
            }
            Command::Drain {
                reason,
                timeout_seconds,
            } => {
                p.insert("reason".into(), reason.clone().into());
                if let Some(t) = timeout_seconds {
                    p.insert("timeout_seconds".into(), (*t).into());
                }
            }
            Command::Shutdown { reason, force } => {
                p.insert("reason".into(), reason.clone().into());
                p.insert("force".into(), (*force).into());
            }
            Command::SetLogLevel { level } => {
                p.insert("level".into(), level.as_str().into());
            }
            Command::UpdateConfig { key, value } => {
                p.insert("key".into(), key.clone().into());
                p.insert("value".into(), value.clone().into());
            }
        }
        p
    }

    /// The same parameters with every secret replaced by [`REDACTED`], for storage and logs.
    pub fn redacted_json_parameters(&self) -> Map<String, Value> {
        let mut p = self.to_json_parameters();
        redact_secrets(&mut p);
        p
    }

    /// Parses JSON `parameters` of a command of type `command_type`.
    pub fn from_json_parameters(
        command_type: &str,
        p: &Map<String, Value>,
    ) -> Result<Command, CommandError> {
        let params = JsonParams(p);
        params.to_command(command_type)
    }

    /// The gRPC form's parameter maps.
    fn to_pb_parts(&self) -> PbParts {
        let mut parts = PbParts::default();
        match self {
            Command::RegisterRunner(r) => {
                let s = &mut parts.strings;
                if let Some(t) = &r.registration_token {
                    s.insert("registration_token".into(), t.clone());
                }
                if let Some(j) = &r.jit_config {
                    s.insert("jit_config".into(), j.clone());
                }
                s.insert("runner_url".into(), r.runner_url.clone());
                s.insert("runner_group".into(), r.runner_group.clone());
                if let Some(e) = r.expires_at {
                    s.insert("expires_at".into(), crate::rfc3339(e));
                }
                if let Some(n) = &r.runner_name {
                    s.insert("runner_name".into(), n.clone());
                }
                parts.array = r.labels.clone();
            }
            Command::Drain {
                reason,
                timeout_seconds,
            } => {
                parts.strings.insert("reason".into(), reason.clone());
                if let Some(t) = timeout_seconds {
                    parts.ints.insert("timeout_seconds".into(), *t);
                }
            }
            Command::Shutdown { reason, force } => {
                parts.strings.insert("reason".into(), reason.clone());
                parts.bools.insert("force".into(), *force);
            }
            Command::SetLogLevel { level } => {
                parts.strings.insert("level".into(), level.as_str().into());
            }
            Command::UpdateConfig { key, value } => {
                parts.strings.insert("key".into(), key.clone());
                parts.strings.insert("value".into(), value.clone());
            }
        }
        parts
    }
}

impl CommandEnvelope {
    pub fn to_json(&self) -> CommandJson {
        CommandJson {
            id: self.id.clone(),
            command_type: self.command.type_name().to_owned(),
            parameters: self.command.to_json_parameters(),
            created_at: self.created_at,
        }
    }

    pub fn from_json(c: &CommandJson) -> Result<CommandEnvelope, CommandError> {
        Ok(CommandEnvelope {
            id: c.id.clone(),
            created_at: c.created_at,
            command: Command::from_json_parameters(&c.command_type, &c.parameters)?,
        })
    }

    pub fn to_pb(&self) -> pb::Command {
        let parts = self.command.to_pb_parts();
        pb::Command {
            id: self.id.clone(),
            r#type: self.command.type_name().to_owned(),
            string_params: parts.strings,
            int_params: parts.ints,
            bool_params: parts.bools,
            string_array_params: parts.array,
            created_at: self.created_at.timestamp(),
        }
    }

    pub fn from_pb(c: &pb::Command) -> Result<CommandEnvelope, CommandError> {
        let params = PbParams(c);
        Ok(CommandEnvelope {
            id: c.id.clone(),
            created_at: crate::from_unix(c.created_at).unwrap_or_default(),
            command: params.to_command(&c.r#type)?,
        })
    }
}

#[derive(Default)]
struct PbParts {
    strings: HashMap<String, String>,
    ints: HashMap<String, i64>,
    bools: HashMap<String, bool>,
    array: Vec<String>,
}

/// Read access shared by both wire forms, so one parser serves both.
trait Params {
    fn string(&self, name: &'static str) -> Result<Option<String>, CommandError>;
    fn int(&self, name: &'static str) -> Result<Option<i64>, CommandError>;
    fn bool(&self, name: &'static str) -> Result<Option<bool>, CommandError>;
    fn labels(&self) -> Result<Vec<String>, CommandError>;

    fn required(&self, name: &'static str) -> Result<String, CommandError> {
        match self.string(name)? {
            Some(s) if !s.is_empty() => Ok(s),
            _ => Err(CommandError::Missing(name)),
        }
    }

    fn non_empty(&self, name: &'static str) -> Result<Option<String>, CommandError> {
        Ok(self.string(name)?.filter(|s| !s.is_empty()))
    }

    fn to_command(&self, command_type: &str) -> Result<Command, CommandError> {
        Ok(match command_type {
            REGISTER_RUNNER => {
                let registration_token = self.non_empty("registration_token")?;
                let jit_config = self.non_empty("jit_config")?;
                if registration_token.is_none() && jit_config.is_none() {
                    return Err(CommandError::NoCredential);
                }
                let runner_url = if jit_config.is_some() {
                    self.string("runner_url")?.unwrap_or_default()
                } else {
                    self.required("runner_url")?
                };
                let expires_at = match self.non_empty("expires_at")? {
                    None => None,
                    Some(s) => Some(
                        DateTime::parse_from_rfc3339(&s)
                            .map_err(|_| CommandError::Invalid {
                                name: "expires_at",
                                expected: "RFC3339 time",
                            })?
                            .with_timezone(&Utc),
                    ),
                };
                Command::RegisterRunner(RegisterRunner {
                    registration_token,
                    jit_config,
                    runner_url,
                    runner_group: self
                        .non_empty("runner_group")?
                        .unwrap_or_else(|| "default".into()),
                    labels: self.labels()?,
                    expires_at,
                    runner_name: self.non_empty("runner_name")?,
                })
            }
            DRAIN => Command::Drain {
                reason: self.string("reason")?.unwrap_or_default(),
                timeout_seconds: self.int("timeout_seconds")?.filter(|t| *t > 0),
            },
            SHUTDOWN => Command::Shutdown {
                reason: self.string("reason")?.unwrap_or_default(),
                force: self.bool("force")?.unwrap_or(false),
            },
            SET_LOG_LEVEL => {
                let raw = self.required("level")?;
                Command::SetLogLevel {
                    level: LogLevel::parse(&raw).ok_or(CommandError::Invalid {
                        name: "level",
                        expected: "log level (trace, debug, info, warn, error)",
                    })?,
                }
            }
            UPDATE_CONFIG => Command::UpdateConfig {
                key: self.required("key")?,
                value: self.string("value")?.unwrap_or_default(),
            },
            other => return Err(CommandError::UnknownType(other.to_owned())),
        })
    }
}

struct JsonParams<'a>(&'a Map<String, Value>);

impl Params for JsonParams<'_> {
    fn string(&self, name: &'static str) -> Result<Option<String>, CommandError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(Value::Bool(b)) => Ok(Some(b.to_string())),
            Some(_) => Err(CommandError::Invalid {
                name,
                expected: "string",
            }),
        }
    }

    fn int(&self, name: &'static str) -> Result<Option<i64>, CommandError> {
        let bad = CommandError::Invalid {
            name,
            expected: "integer",
        };
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                .map(Some)
                .ok_or(bad),
            Some(Value::String(s)) => s.trim().parse().map(Some).map_err(|_| bad),
            Some(_) => Err(bad),
        }
    }

    fn bool(&self, name: &'static str) -> Result<Option<bool>, CommandError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) => parse_bool(s).map(Some).ok_or(CommandError::Invalid {
                name,
                expected: "boolean",
            }),
            Some(_) => Err(CommandError::Invalid {
                name,
                expected: "boolean",
            }),
        }
    }

    fn labels(&self) -> Result<Vec<String>, CommandError> {
        let bad = CommandError::Invalid {
            name: "labels",
            expected: "list of strings",
        };
        match self.0.get("labels") {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or(bad.clone()))
                .collect(),
            Some(Value::String(s)) => Ok(split_labels(s)),
            Some(_) => Err(bad),
        }
    }
}

struct PbParams<'a>(&'a pb::Command);

impl Params for PbParams<'_> {
    fn string(&self, name: &'static str) -> Result<Option<String>, CommandError> {
        Ok(self.0.string_params.get(name).cloned())
    }

    fn int(&self, name: &'static str) -> Result<Option<i64>, CommandError> {
        if let Some(v) = self.0.int_params.get(name) {
            return Ok(Some(*v));
        }
        match self.0.string_params.get(name) {
            None => Ok(None),
            Some(s) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| CommandError::Invalid {
                    name,
                    expected: "integer",
                }),
        }
    }

    fn bool(&self, name: &'static str) -> Result<Option<bool>, CommandError> {
        if let Some(v) = self.0.bool_params.get(name) {
            return Ok(Some(*v));
        }
        match self.0.string_params.get(name) {
            None => Ok(None),
            Some(s) => parse_bool(s).map(Some).ok_or(CommandError::Invalid {
                name,
                expected: "boolean",
            }),
        }
    }

    fn labels(&self) -> Result<Vec<String>, CommandError> {
        if !self.0.string_array_params.is_empty() {
            return Ok(self.0.string_array_params.clone());
        }
        Ok(self
            .0
            .string_params
            .get("labels")
            .map(|s| split_labels(s))
            .unwrap_or_default())
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" | "" => Some(false),
        _ => None,
    }
}

fn split_labels(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).single().unwrap_or_default()
    }

    fn samples() -> Vec<Command> {
        vec![
            Command::RegisterRunner(RegisterRunner {
                registration_token: Some("AHT123".into()),
                jit_config: None,
                runner_url: "https://github.com/org/repo".into(),
                runner_group: "default".into(),
                labels: vec!["self-hosted".into(), "linux".into(), "x64".into()],
                expires_at: Some(t(1_705_318_200)),
                runner_name: Some("vm-1".into()),
            }),
            Command::RegisterRunner(RegisterRunner {
                registration_token: None,
                jit_config: Some("eyJqaXQi".into()),
                runner_url: String::new(),
                runner_group: "g".into(),
                labels: vec![],
                expires_at: None,
                runner_name: None,
            }),
            Command::Drain {
                reason: "scale down".into(),
                timeout_seconds: Some(600),
            },
            Command::Drain {
                reason: String::new(),
                timeout_seconds: None,
            },
            Command::Shutdown {
                reason: "bye".into(),
                force: true,
            },
            Command::SetLogLevel {
                level: LogLevel::Debug,
            },
            Command::UpdateConfig {
                key: "heartbeat_interval".into(),
                value: "10s".into(),
            },
        ]
    }

    #[test]
    fn json_round_trip_is_lossless() {
        for (i, command) in samples().into_iter().enumerate() {
            let env = CommandEnvelope {
                id: format!("c{i}"),
                created_at: t(1_705_314_600),
                command,
            };
            let json = env.to_json();
            let text = serde_json::to_string(&json).unwrap_or_default();
            let reparsed: CommandJson =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(CommandEnvelope::from_json(&reparsed), Ok(env));
        }
    }

    #[test]
    fn grpc_round_trip_is_lossless_and_placed_as_the_contract_says() {
        for (i, command) in samples().into_iter().enumerate() {
            let env = CommandEnvelope {
                id: format!("c{i}"),
                created_at: t(1_705_314_600),
                command,
            };
            let pb = env.to_pb();
            assert_eq!(CommandEnvelope::from_pb(&pb), Ok(env.clone()));
            match &env.command {
                Command::RegisterRunner(r) => {
                    assert_eq!(pb.string_array_params, r.labels);
                    assert_eq!(pb.string_params.get("runner_group"), Some(&r.runner_group));
                }
                Command::Drain {
                    timeout_seconds: Some(s),
                    ..
                } => {
                    assert_eq!(pb.int_params.get("timeout_seconds"), Some(s));
                }
                Command::Shutdown { force, .. } => {
                    assert_eq!(pb.bool_params.get("force"), Some(force));
                }
                _ => {}
            }
            // JSON -> gRPC -> JSON as well.
            let via = CommandEnvelope::from_pb(&pb).map(|e| e.to_json());
            assert_eq!(via, Ok(env.to_json()));
        }
    }

    #[test]
    fn seed_register_runner_parses() {
        let c: CommandJson = serde_json::from_str(
            r#"{"id":"register-vm-123-1234567890","type":"register_runner",
                "parameters":{"registration_token":"AHTXXXXXXXXXXXXXXXXXXXX",
                "runner_url":"https://github.com/org/repo","runner_group":"default",
                "labels":["self-hosted","linux","x64"],"expires_at":"2024-01-15T11:30:00Z"},
                "created_at":"2024-01-15T10:30:00Z"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let env = CommandEnvelope::from_json(&c).unwrap_or_else(|e| panic!("{e}"));
        let Command::RegisterRunner(r) = env.command else {
            panic!("wrong variant")
        };
        assert_eq!(
            r.registration_token.as_deref(),
            Some("AHTXXXXXXXXXXXXXXXXXXXX")
        );
        assert_eq!(r.expires_at, Some(t(1_705_318_200)));
    }

    #[test]
    fn prototype_grpc_register_runner_without_expiry_parses() {
        let pb = pb::Command {
            id: "register-vm-1-1".into(),
            r#type: "register_runner".into(),
            string_params: [
                ("registration_token".to_owned(), "tok".to_owned()),
                ("runner_url".to_owned(), "https://github.com/o/r".to_owned()),
                ("runner_group".to_owned(), "default".to_owned()),
            ]
            .into(),
            string_array_params: vec!["self-hosted".into(), "monkci-miglet-tst1".into()],
            created_at: 1_700_000_000,
            ..Default::default()
        };
        let env = CommandEnvelope::from_pb(&pb).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            env.command,
            Command::RegisterRunner(RegisterRunner {
                expires_at: None,
                ..
            })
        ));
    }

    #[test]
    fn missing_or_bad_parameters_are_named() {
        let p = |v: Value| v.as_object().cloned().unwrap_or_default();
        let e = Command::from_json_parameters(
            "register_runner",
            &p(serde_json::json!({"runner_url":"u"})),
        );
        assert_eq!(e, Err(CommandError::NoCredential));
        let e = Command::from_json_parameters(
            "register_runner",
            &p(serde_json::json!({"registration_token":"t"})),
        );
        assert_eq!(e, Err(CommandError::Missing("runner_url")));
        let e = Command::from_json_parameters(
            "register_runner",
            &p(serde_json::json!({"registration_token":"t","runner_url":"u","expires_at":"soon"})),
        );
        assert!(matches!(
            e,
            Err(CommandError::Invalid {
                name: "expires_at",
                ..
            })
        ));
        let e =
            Command::from_json_parameters("set_log_level", &p(serde_json::json!({"level":"loud"})));
        assert!(matches!(
            e,
            Err(CommandError::Invalid { name: "level", .. })
        ));
        let e = Command::from_json_parameters("reboot", &Map::new());
        assert_eq!(e, Err(CommandError::UnknownType("reboot".into())));
        // Tolerant: strings for numbers and booleans, unknown extras ignored.
        let ok = Command::from_json_parameters(
            "drain",
            &p(serde_json::json!({"reason":"r","timeout_seconds":"30","extra":1})),
        );
        assert_eq!(
            ok,
            Ok(Command::Drain {
                reason: "r".into(),
                timeout_seconds: Some(30)
            })
        );
        let ok = Command::from_json_parameters("shutdown", &p(serde_json::json!({"force":"true"})));
        assert_eq!(
            ok,
            Ok(Command::Shutdown {
                reason: String::new(),
                force: true
            })
        );
    }

    #[test]
    fn redaction_hides_secrets_only() {
        let Some(Command::RegisterRunner(r)) = samples().into_iter().next() else {
            panic!("sample")
        };
        let c = Command::RegisterRunner(r);
        let red = c.redacted_json_parameters();
        assert_eq!(red["registration_token"], REDACTED);
        assert_eq!(red["runner_url"], "https://github.com/org/repo");
        assert!(!format!("{c:?}").contains("AHT123"));
    }

    #[test]
    fn a_registration_answer_is_redacted_by_the_same_rule() {
        let mut answer = serde_json::json!({
            "registration_token": "AHT123",
            "jit_config": "base64",
            "runner_url": "https://github.com/org",
        });
        let Value::Object(fields) = &mut answer else {
            panic!("object")
        };
        redact_secrets(fields);
        assert_eq!(answer["registration_token"], REDACTED);
        assert_eq!(answer["jit_config"], REDACTED);
        assert_eq!(answer["runner_url"], "https://github.com/org");
    }
}
