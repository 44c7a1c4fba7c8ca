//! Controller settings: command-line flags > `MIG_CONTROLLER_*` environment > TOML config
//! file > defaults.

use crate::token::{PoolRegistration, Pools, StaticToken, TokenFile, TokenSource};
use clap::Args;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("invalid setting {name}: {reason}")]
    Invalid { name: String, reason: String },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `mig-controller serve` flags. Each is also read from `MIG_CONTROLLER_<NAME>`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML config file (pools, timings, addresses).
    #[arg(long, env = "MIG_CONTROLLER_CONFIG")]
    pub config: Option<PathBuf>,
    /// HTTP listen address [default: 0.0.0.0:8080].
    #[arg(long, env = "MIG_CONTROLLER_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// gRPC listen address [default: 0.0.0.0:50051].
    #[arg(long, env = "MIG_CONTROLLER_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// Directory of the embedded store [default: ./controller_data].
    #[arg(long, env = "MIG_CONTROLLER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, env = "MIG_CONTROLLER_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `mig_controller=debug` [default: info].
    #[arg(long, env = "MIG_CONTROLLER_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Expected heartbeat interval of agents, seconds [default: 15].
    #[arg(long, env = "MIG_CONTROLLER_HEARTBEAT_INTERVAL_SECS")]
    pub heartbeat_interval_secs: Option<u64>,
    /// Missed heartbeat intervals before a VM is unhealthy [default: 3].
    #[arg(long, env = "MIG_CONTROLLER_UNHEALTHY_AFTER_MISSED")]
    pub unhealthy_after_missed: Option<u32>,
    /// Missed heartbeat intervals before a VM is lost [default: 20].
    #[arg(long, env = "MIG_CONTROLLER_LOST_AFTER_MISSED")]
    pub lost_after_missed: Option<u32>,
    /// Seconds before an unacknowledged command is delivered again [default: 30].
    #[arg(long, env = "MIG_CONTROLLER_REDELIVERY_TIMEOUT_SECS")]
    pub redelivery_timeout_secs: Option<u64>,
    /// Seconds a queued command stays deliverable [default: 86400].
    #[arg(long, env = "MIG_CONTROLLER_COMMAND_TTL_SECS")]
    pub command_ttl_secs: Option<u64>,
    /// Seconds between reconciler passes (health, expiry, registrations) [default: 5].
    #[arg(long, env = "MIG_CONTROLLER_RECONCILE_INTERVAL_SECS")]
    pub reconcile_interval_secs: Option<u64>,
    /// Write the bound addresses as JSON to this file once listening (for supervisors and
    /// tests that start the controller on port 0).
    #[arg(long, env = "MIG_CONTROLLER_ADDR_FILE")]
    pub addr_file: Option<PathBuf>,
    /// Development default: runner URL for pools with no config.
    #[arg(long, env = "MIG_CONTROLLER_RUNNER_URL", hide = true)]
    pub runner_url: Option<String>,
    /// Development default: static registration token for pools with no config.
    #[arg(
        long,
        env = "MIG_CONTROLLER_STATIC_TOKEN",
        hide = true,
        hide_env_values = true
    )]
    pub static_token: Option<String>,
}

/// The TOML config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub http_addr: Option<SocketAddr>,
    pub grpc_addr: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub heartbeat_interval_secs: Option<u64>,
    pub unhealthy_after_missed: Option<u32>,
    pub lost_after_missed: Option<u32>,
    pub redelivery_timeout_secs: Option<u64>,
    pub command_ttl_secs: Option<u64>,
    pub reconcile_interval_secs: Option<u64>,
    /// Registration config per pool id; the key `"*"` serves every pool not listed.
    #[serde(default)]
    pub pools: HashMap<String, PoolConfig>,
}

/// `[pools.<id>]` of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub runner_url: String,
    #[serde(default = "default_group")]
    pub runner_group: String,
    #[serde(default = "default_labels")]
    pub labels: Vec<String>,
    /// A static registration token. Prefer `token_file`.
    pub token: Option<String>,
    /// A file holding the registration token, re-read at every use.
    pub token_file: Option<PathBuf>,
    /// How long an issued token is treated as valid, seconds [default: 3600].
    #[serde(default = "default_token_ttl")]
    pub token_ttl_secs: u64,
}

fn default_group() -> String {
    "default".into()
}

fn default_labels() -> Vec<String> {
    ["self-hosted", "linux", "x64"].map(String::from).to_vec()
}

fn default_token_ttl() -> u64 {
    3600
}

/// Effective settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    pub log_level: String,
    pub heartbeat_interval: Duration,
    pub unhealthy_after_missed: u32,
    pub lost_after_missed: u32,
    pub redelivery_timeout: Duration,
    pub command_ttl: Duration,
    pub reconcile_interval: Duration,
    pub addr_file: Option<PathBuf>,
    pub pools: Pools,
    /// Set when no pool was configured and development defaults are in use.
    pub dev_defaults: bool,
}

impl Settings {
    /// Defaults suitable for tests: loopback port 0 everywhere, the given data dir, and
    /// development pool defaults with `token`.
    pub fn for_tests(data_dir: &Path, token: &str) -> Settings {
        let mut args = ServeArgs {
            http_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            grpc_addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            data_dir: Some(data_dir.to_owned()),
            static_token: Some(token.to_owned()),
            runner_url: Some("https://github.com/test-org".into()),
            ..ServeArgs::default()
        };
        args.config = None;
        // Fixed, valid inputs: `resolve` cannot fail on them.
        Settings::resolve(args, FileConfig::default())
            .unwrap_or_else(|e| panic!("test settings are invalid: {e}"))
    }

    /// Reads the config file named by `args` (if any) and layers everything.
    pub fn load(args: ServeArgs) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.display().to_string(),
                    source: Box::new(source),
                })?
            }
        };
        Settings::resolve(args, file)
    }

    pub fn resolve(args: ServeArgs, file: FileConfig) -> Result<Settings, ConfigError> {
        let secs = |name: &str, v: u64| -> Result<Duration, ConfigError> {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    name: name.into(),
                    reason: "must be at least 1 second".into(),
                });
            }
            Ok(Duration::from_secs(v))
        };
        let unhealthy = args
            .unhealthy_after_missed
            .or(file.unhealthy_after_missed)
            .unwrap_or(3);
        let lost = args
            .lost_after_missed
            .or(file.lost_after_missed)
            .unwrap_or(20);
        if unhealthy == 0 || lost <= unhealthy {
            return Err(ConfigError::Invalid {
                name: "lost_after_missed".into(),
                reason: format!(
                    "needs 0 < unhealthy_after_missed ({unhealthy}) < lost_after_missed ({lost})"
                ),
            });
        }
        let (pools, dev_defaults) = build_pools(&args, &file.pools)?;
        Ok(Settings {
            http_addr: args
                .http_addr
                .or(file.http_addr)
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 8080))),
            grpc_addr: args
                .grpc_addr
                .or(file.grpc_addr)
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 50051))),
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./controller_data")),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            log_level: args
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            heartbeat_interval: secs(
                "heartbeat_interval_secs",
                args.heartbeat_interval_secs
                    .or(file.heartbeat_interval_secs)
                    .unwrap_or(15),
            )?,
            unhealthy_after_missed: unhealthy,
            lost_after_missed: lost,
            redelivery_timeout: secs(
                "redelivery_timeout_secs",
                args.redelivery_timeout_secs
                    .or(file.redelivery_timeout_secs)
                    .unwrap_or(30),
            )?,
            command_ttl: secs(
                "command_ttl_secs",
                args.command_ttl_secs
                    .or(file.command_ttl_secs)
                    .unwrap_or(86_400),
            )?,
            reconcile_interval: secs(
                "reconcile_interval_secs",
                args.reconcile_interval_secs
                    .or(file.reconcile_interval_secs)
                    .unwrap_or(5),
            )?,
            addr_file: args.addr_file,
            pools,
            dev_defaults,
        })
    }
}

fn build_pools(
    args: &ServeArgs,
    pools: &HashMap<String, PoolConfig>,
) -> Result<(Pools, bool), ConfigError> {
    if pools.is_empty() {
        let token = args
            .static_token
            .clone()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| format!("DEV-NOT-A-GITHUB-TOKEN-{}", uuid::Uuid::new_v4().simple()));
        let reg = PoolRegistration {
            runner_url: args
                .runner_url
                .clone()
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| "https://github.com/example-org".into()),
            runner_group: default_group(),
            labels: default_labels(),
            token: Arc::new(StaticToken::new(
                token,
                Duration::from_secs(default_token_ttl()),
            )),
        };
        return Ok((Pools::new(HashMap::new(), Some(reg)), true));
    }
    let mut by_id = HashMap::new();
    let mut fallback = None;
    for (id, p) in pools {
        if id != "*" {
            miglet_proto::ids::validate_id("pool id", id).map_err(|e| ConfigError::Invalid {
                name: format!("pools.{id}"),
                reason: e.to_string(),
            })?;
        }
        let name = format!("pools.{id}");
        let ttl = Duration::from_secs(p.token_ttl_secs.max(1));
        let token: Arc<dyn TokenSource> = match (&p.token, &p.token_file) {
            (Some(t), None) if !t.is_empty() => Arc::new(StaticToken::new(t.clone(), ttl)),
            (None, Some(f)) => Arc::new(TokenFile::new(f.clone(), ttl)),
            _ => {
                return Err(ConfigError::Invalid {
                    name,
                    reason: "set exactly one of token or token_file".into(),
                });
            }
        };
        if p.runner_url.is_empty() {
            return Err(ConfigError::Invalid {
                name,
                reason: "runner_url is empty".into(),
            });
        }
        let reg = PoolRegistration {
            runner_url: p.runner_url.clone(),
            runner_group: p.runner_group.clone(),
            labels: p.labels.clone(),
            token,
        };
        if id == "*" {
            fallback = Some(reg);
        } else {
            by_id.insert(id.clone(), reg);
        }
    }
    Ok((Pools::new(by_id, fallback), false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_beat_defaults() -> Result<(), Box<dyn std::error::Error>> {
        let file: FileConfig = toml::from_str(
            r#"
            http_addr = "127.0.0.1:9000"
            grpc_addr = "127.0.0.1:9001"
            heartbeat_interval_secs = 20
            [pools.linux-x64]
            runner_url = "https://github.com/acme"
            token_file = "/run/secrets/token"
            [pools."*"]
            runner_url = "https://github.com/acme-other"
            token = "abc"
            labels = ["self-hosted"]
            "#,
        )?;
        let args = ServeArgs {
            http_addr: Some("127.0.0.1:1".parse()?),
            ..ServeArgs::default()
        };
        let s = Settings::resolve(args, file)?;
        assert_eq!(s.http_addr.port(), 1);
        assert_eq!(s.grpc_addr.port(), 9001);
        assert_eq!(s.heartbeat_interval, Duration::from_secs(20));
        assert_eq!(s.redelivery_timeout, Duration::from_secs(30));
        assert!(!s.dev_defaults);
        assert_eq!(
            s.pools.get("linux-x64")?.runner_url,
            "https://github.com/acme"
        );
        assert_eq!(s.pools.get("other")?.labels, vec!["self-hosted"]);
        Ok(())
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(toml::from_str::<FileConfig>("htp_addr = \"x\"").is_err());
        let file: FileConfig =
            toml::from_str("[pools.p]\nrunner_url = \"u\"\ntoken = \"a\"\ntoken_file = \"/f\"")
                .unwrap_or_default();
        assert!(Settings::resolve(ServeArgs::default(), file).is_err());
        let args = ServeArgs {
            unhealthy_after_missed: Some(5),
            lost_after_missed: Some(5),
            ..ServeArgs::default()
        };
        assert!(Settings::resolve(args, FileConfig::default()).is_err());
    }

    #[test]
    fn no_config_means_development_defaults() -> Result<(), Box<dyn std::error::Error>> {
        let s = Settings::resolve(ServeArgs::default(), FileConfig::default())?;
        assert!(s.dev_defaults);
        assert_eq!(s.http_addr.port(), 8080);
        assert_eq!(s.grpc_addr.port(), 50051);
        assert_eq!(s.pools.get("anything")?.runner_group, "default");
        Ok(())
    }
}
