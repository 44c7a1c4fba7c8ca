//! Agent settings: flags > `MIGLET_*` environment > YAML file > GCE metadata server >
//! defaults. A missing or invalid required setting is a [`ConfigError`]; the binary exits
//! with [`crate::machine::exit_code::CONFIG`].

use crate::machine::{PostJobAction, parse_duration};
use clap::Args;
use miglet_proto::settings::layered;
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{0} is required (flag, MIGLET_* environment, config file or GCE metadata)")]
    Missing(&'static str),
    #[error("invalid {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("failed to read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid YAML for miglet")]
    Parse {
        path: String,
        #[source]
        source: serde_yaml_ng::Error,
    },
}

/// Command-line flags; each also reads `MIGLET_<NAME>`.
#[derive(Debug, Clone, Default, Args)]
pub struct AgentArgs {
    /// YAML config file.
    #[arg(long, env = "MIGLET_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "MIGLET_POOL_ID")]
    pub pool_id: Option<String>,
    /// Default: the GCE instance name.
    #[arg(long, env = "MIGLET_VM_ID")]
    pub vm_id: Option<String>,
    #[arg(long, env = "MIGLET_ORG_ID")]
    pub org_id: Option<String>,
    /// Controller HTTP base URL, e.g. http://10.0.0.2:8080.
    #[arg(long, env = "MIGLET_CONTROLLER_ENDPOINT")]
    pub controller_endpoint: Option<String>,
    /// Controller gRPC URL [default: the HTTP endpoint's host, port 50051]; `disabled` uses
    /// HTTP polling only.
    #[arg(long, env = "MIGLET_CONTROLLER_GRPC_ENDPOINT")]
    pub controller_grpc_endpoint: Option<String>,
    /// trace, debug, info, warn, error [default: info].
    #[arg(long, env = "MIGLET_LOGGING_LEVEL")]
    pub logging_level: Option<String>,
    /// text or json [default: text].
    #[arg(long, env = "MIGLET_LOGGING_FORMAT")]
    pub logging_format: Option<String>,
    /// Spool and state [default: /var/lib/miglet].
    #[arg(long, env = "MIGLET_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Events the on-disk spool holds at most while the controller is unreachable; past it
    /// events wait in memory and the VM takes no new job [default: 10000].
    #[arg(long, env = "MIGLET_SPOOL_MAX_EVENTS")]
    pub spool_max_events: Option<usize>,
    /// Installed runner [default: /opt/actions-runner].
    #[arg(long, env = "MIGLET_RUNNER_DIR")]
    pub runner_dir: Option<PathBuf>,
    /// Runner work folder [default: _work under the runner dir].
    #[arg(long, env = "MIGLET_RUNNER_WORK_DIR")]
    pub runner_work_dir: Option<String>,
    /// Unprivileged user the runner runs as when the agent is root [default: runner]; empty
    /// runs it as root (RUNNER_ALLOW_RUNASROOT).
    #[arg(long, env = "MIGLET_RUNNER_USER")]
    pub runner_user: Option<String>,
    /// Download the runner from this URL (a release .tar.gz) when runner_dir has none.
    #[arg(long, env = "MIGLET_RUNNER_DOWNLOAD_URL")]
    pub runner_download_url: Option<String>,
    /// SHA-256 (hex) the download must have.
    #[arg(long, env = "MIGLET_RUNNER_SHA256")]
    pub runner_sha256: Option<String>,
    /// exit, poweroff or none [default: exit].
    #[arg(long, env = "MIGLET_POST_JOB_ACTION")]
    pub post_job_action: Option<String>,
    /// e.g. 15s [default: 15s].
    #[arg(long, env = "MIGLET_HEARTBEAT_INTERVAL")]
    pub heartbeat_interval: Option<String>,
    /// Command polling interval while the stream is down [default: 5s].
    #[arg(long, env = "MIGLET_POLL_INTERVAL")]
    pub poll_interval: Option<String>,
    /// Time the runner gets to stop after SIGINT before SIGKILL [default: 30s].
    #[arg(long, env = "MIGLET_SHUTDOWN_GRACE_PERIOD")]
    pub shutdown_grace_period: Option<String>,
    /// HTTP request timeout towards the controller [default: 30s].
    #[arg(long, env = "MIGLET_CONTROLLER_TIMEOUT")]
    pub controller_timeout: Option<String>,
    /// GCE metadata server base URL [default: http://metadata.google.internal].
    #[arg(long, env = "MIGLET_METADATA_URL")]
    pub metadata_url: Option<String>,
    /// Ask the metadata server for settings that are still missing: auto, true, false
    /// [default: auto = only when something required is missing].
    #[arg(long, env = "MIGLET_METADATA")]
    pub metadata: Option<String>,
    /// Identifies this boot [default: /proc/sys/kernel/random/boot_id].
    #[arg(long, env = "MIGLET_BOOT_ID")]
    pub boot_id: Option<String>,
    /// How to prove the VM's identity to the controller: auto (an enrollment token if its
    /// file is set, else the bootstrap secret if its file is set, else a GCE identity token
    /// when on GCE, else none), token, bootstrap, gce, none.
    #[arg(long, env = "MIGLET_AUTH")]
    pub auth: Option<String>,
    /// File holding the pool's bootstrap secret (proves membership of the pool).
    #[arg(long, env = "MIGLET_BOOTSTRAP_SECRET_FILE")]
    pub bootstrap_secret_file: Option<PathBuf>,
    /// File holding a one-time enrollment token minted for this VM (proves the VM; usable
    /// once).
    #[arg(long, env = "MIGLET_ENROLLMENT_TOKEN_FILE")]
    pub enrollment_token_file: Option<PathBuf>,
    /// Audience of GCE identity tokens [default: the controller endpoint].
    #[arg(long, env = "MIGLET_AUDIENCE")]
    pub audience: Option<String>,
    /// PEM CA bundle the controller's certificate must chain to (instead of the system roots).
    #[arg(long, env = "MIGLET_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with MIGLET_CLIENT_KEY).
    #[arg(long, env = "MIGLET_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(long, env = "MIGLET_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
}

/// The YAML file (the prototype's shape).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub pool_id: Option<String>,
    pub vm_id: Option<String>,
    pub org_id: Option<String>,
    #[serde(default)]
    pub controller: FileController,
    #[serde(default)]
    pub logging: FileLogging,
    #[serde(default)]
    pub heartbeat: FileHeartbeat,
    #[serde(default)]
    pub shutdown: FileShutdown,
    #[serde(default)]
    pub runner: FileRunner,
    pub data_dir: Option<PathBuf>,
    pub poll_interval: Option<String>,
    #[serde(default)]
    pub metadata: FileMetadata,
    #[serde(default)]
    pub auth: FileAuth,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileController {
    pub endpoint: Option<String>,
    pub grpc_endpoint: Option<String>,
    pub timeout: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// `auth:` of the YAML config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAuth {
    pub method: Option<String>,
    pub bootstrap_secret_file: Option<PathBuf>,
    pub enrollment_token_file: Option<PathBuf>,
    pub audience: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLogging {
    pub level: Option<String>,
    pub format: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHeartbeat {
    pub interval: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileShutdown {
    pub grace_period: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRunner {
    pub dir: Option<PathBuf>,
    pub work_dir: Option<String>,
    pub user: Option<String>,
    pub download_url: Option<String>,
    pub sha256: Option<String>,
    pub post_job_action: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMetadata {
    pub url: Option<String>,
    pub enabled: Option<String>,
}

/// What the metadata server said (instance name and `instance/attributes/miglet-*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataValues {
    pub instance_name: Option<String>,
    pub pool_id: Option<String>,
    pub org_id: Option<String>,
    pub controller_endpoint: Option<String>,
    pub controller_grpc_endpoint: Option<String>,
}

/// Effective settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub pool_id: String,
    pub vm_id: String,
    pub org_id: String,
    pub controller_endpoint: String,
    /// None: HTTP polling only.
    pub controller_grpc_endpoint: Option<String>,
    pub logging_level: String,
    pub logging_json: bool,
    pub data_dir: PathBuf,
    pub spool_max_events: usize,
    pub runner_dir: PathBuf,
    pub runner_work_dir: String,
    pub runner_user: Option<String>,
    pub runner_download_url: Option<String>,
    pub runner_sha256: Option<String>,
    pub post_job_action: PostJobAction,
    pub heartbeat_interval: Duration,
    pub poll_interval: Duration,
    pub shutdown_grace: Duration,
    pub controller_timeout: Duration,
    pub boot_id: String,
    /// Base URL of the metadata server to watch for preemption; None when metadata is off or
    /// was not found (not on GCE).
    pub preemption_watch: Option<String>,
    /// How the VM proves who it is.
    pub auth: AuthMethod,
    pub tls: TlsFiles,
}

/// How the VM enrolls with the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMethod {
    /// No credential (a controller in open mode).
    None,
    /// The pool's bootstrap secret, read from this file at each enrollment.
    Bootstrap { secret_file: PathBuf },
    /// A one-time enrollment token for this VM, read from this file.
    Token { token_file: PathBuf },
    /// A GCE instance identity token from the metadata server.
    Gce {
        metadata_base: String,
        audience: String,
    },
}

/// TLS files for talking to the controller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// Trust only this CA bundle (instead of the system roots).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, for mutual TLS.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl FileConfig {
    pub fn load(path: &std::path::Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        serde_yaml_ng::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }
}

fn duration(
    name: &'static str,
    v: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => parse_duration(&s)
            .filter(|d| !d.is_zero())
            .ok_or(ConfigError::Invalid {
                name,
                reason: format!("{s:?} is not a duration like 15s, 1m or a number of seconds"),
            }),
    }
}

/// Whether the metadata server should be asked: `auto` asks only when a required setting is
/// missing.
pub fn wants_metadata(args: &AgentArgs, file: &FileConfig) -> bool {
    let mode = layered([args.metadata.as_ref(), file.metadata.enabled.as_ref()])
        .unwrap_or_else(|| "auto".into());
    match mode.as_str() {
        "true" | "1" => true,
        "false" | "0" => false,
        _ => {
            layered([args.pool_id.as_ref(), file.pool_id.as_ref()]).is_none()
                || layered([args.vm_id.as_ref(), file.vm_id.as_ref()]).is_none()
                || layered([
                    args.controller_endpoint.as_ref(),
                    file.controller.endpoint.as_ref(),
                ])
                .is_none()
        }
    }
}

pub fn metadata_base(args: &AgentArgs, file: &FileConfig) -> String {
    layered([args.metadata_url.as_ref(), file.metadata.url.as_ref()])
        .unwrap_or_else(|| "http://metadata.google.internal".into())
}

/// Reads the instance name and `miglet-*` attributes. Unreachable server or missing keys
/// leave the values empty; the caller decides what is required.
pub async fn fetch_metadata(base: &str) -> MetadataValues {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
    {
        Ok(c) => c,
        Err(_) => return MetadataValues::default(),
    };
    let get = |path: &'static str| {
        let client = client.clone();
        let url = format!("{}/computeMetadata/v1/{path}", base.trim_end_matches('/'));
        async move {
            let r = client
                .get(url)
                .header("Metadata-Flavor", "Google")
                .send()
                .await
                .ok()?;
            if !r.status().is_success() {
                return None;
            }
            let t = r.text().await.ok()?;
            Some(t.trim().to_owned()).filter(|s| !s.is_empty())
        }
    };
    MetadataValues {
        instance_name: get("instance/name").await,
        pool_id: get("instance/attributes/miglet-pool-id").await,
        org_id: get("instance/attributes/miglet-org-id").await,
        controller_endpoint: get("instance/attributes/miglet-controller-endpoint").await,
        controller_grpc_endpoint: get("instance/attributes/miglet-controller-grpc-endpoint").await,
    }
}

/// The gRPC endpoint derived from the HTTP one: same scheme and host, port 50051.
pub fn derive_grpc_endpoint(http: &str) -> Option<String> {
    let (scheme, rest) = http.split_once("://")?;
    let authority = rest.split('/').next()?;
    let host = if let Some(end) = authority.strip_prefix('[').and_then(|a| a.find(']')) {
        &authority[..end + 2]
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    Some(format!("{scheme}://{host}:50051"))
}

fn read_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Does `auto` authentication need to know whether this is a GCE VM?
pub fn auth_needs_gce_probe(args: &AgentArgs, file: &FileConfig) -> bool {
    let method =
        layered([args.auth.as_ref(), file.auth.method.as_ref()]).unwrap_or_else(|| "auto".into());
    let metadata_off = matches!(
        layered([args.metadata.as_ref(), file.metadata.enabled.as_ref()]).as_deref(),
        Some("false" | "0")
    );
    method == "auto"
        && !metadata_off
        && args.bootstrap_secret_file.is_none()
        && file.auth.bootstrap_secret_file.is_none()
        && args.enrollment_token_file.is_none()
        && file.auth.enrollment_token_file.is_none()
}

fn resolve_auth(
    args: &AgentArgs,
    file: &FileConfig,
    meta: &MetadataValues,
    endpoint: &str,
) -> Result<AuthMethod, ConfigError> {
    let method =
        layered([args.auth.as_ref(), file.auth.method.as_ref()]).unwrap_or_else(|| "auto".into());
    let secret = layered([
        args.bootstrap_secret_file.as_ref(),
        file.auth.bootstrap_secret_file.as_ref(),
    ]);
    let token = layered([
        args.enrollment_token_file.as_ref(),
        file.auth.enrollment_token_file.as_ref(),
    ]);
    let gce = || AuthMethod::Gce {
        metadata_base: metadata_base(args, file),
        audience: layered([args.audience.as_ref(), file.auth.audience.as_ref()])
            .unwrap_or_else(|| endpoint.to_owned()),
    };
    Ok(match method.as_str() {
        "none" => AuthMethod::None,
        "bootstrap" => AuthMethod::Bootstrap {
            secret_file: secret.ok_or(ConfigError::Missing(
                "bootstrap secret file (MIGLET_BOOTSTRAP_SECRET_FILE)",
            ))?,
        },
        "token" => AuthMethod::Token {
            token_file: token.ok_or(ConfigError::Missing(
                "enrollment token file (MIGLET_ENROLLMENT_TOKEN_FILE)",
            ))?,
        },
        "gce" => gce(),
        "auto" => match (token, secret) {
            (Some(token_file), _) => AuthMethod::Token { token_file },
            (None, Some(secret_file)) => AuthMethod::Bootstrap { secret_file },
            (None, None) if meta.instance_name.is_some() => gce(),
            (None, None) => AuthMethod::None,
        },
        other => {
            return Err(ConfigError::Invalid {
                name: "auth",
                reason: format!("{other:?} (auto, token, bootstrap, gce, none)"),
            });
        }
    })
}

fn check_id(name: &'static str, v: &str) -> Result<(), ConfigError> {
    miglet_proto::ids::validate_id(name, v).map_err(|e| ConfigError::Invalid {
        name,
        reason: e.to_string(),
    })
}

impl Settings {
    pub fn resolve(
        args: &AgentArgs,
        file: &FileConfig,
        meta: &MetadataValues,
        running_as_root: bool,
    ) -> Result<Settings, ConfigError> {
        let pool_id = layered([
            args.pool_id.as_ref(),
            file.pool_id.as_ref(),
            meta.pool_id.as_ref(),
        ])
        .ok_or(ConfigError::Missing("pool_id (MIGLET_POOL_ID)"))?;
        let vm_id = layered([
            args.vm_id.as_ref(),
            file.vm_id.as_ref(),
            meta.instance_name.as_ref(),
        ])
        .ok_or(ConfigError::Missing("vm_id (MIGLET_VM_ID)"))?;
        check_id("pool_id", &pool_id)?;
        check_id("vm_id", &vm_id)?;
        let org_id = layered([
            args.org_id.as_ref(),
            file.org_id.as_ref(),
            meta.org_id.as_ref(),
        ])
        .unwrap_or_default();
        if !org_id.is_empty() {
            check_id("org_id", &org_id)?;
        }
        let endpoint = layered([
            args.controller_endpoint.as_ref(),
            file.controller.endpoint.as_ref(),
            meta.controller_endpoint.as_ref(),
        ])
        .ok_or(ConfigError::Missing(
            "controller endpoint (MIGLET_CONTROLLER_ENDPOINT)",
        ))?;
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                name: "controller endpoint",
                reason: format!("{endpoint:?} must start with http:// or https://"),
            });
        }
        let grpc = match layered([
            args.controller_grpc_endpoint.as_ref(),
            file.controller.grpc_endpoint.as_ref(),
            meta.controller_grpc_endpoint.as_ref(),
        ]) {
            Some(g) if g == "disabled" || g == "none" => None,
            Some(g) if g.contains("://") => Some(g),
            Some(g) => Some(format!("http://{g}")),
            None => derive_grpc_endpoint(&endpoint),
        };
        let level = layered([args.logging_level.as_ref(), file.logging.level.as_ref()])
            .unwrap_or_else(|| "info".into());
        if miglet_proto::command::LogLevel::parse(&level).is_none() {
            return Err(ConfigError::Invalid {
                name: "logging level",
                reason: format!("{level:?} (trace, debug, info, warn, error)"),
            });
        }
        let format = layered([args.logging_format.as_ref(), file.logging.format.as_ref()])
            .unwrap_or_else(|| "text".into());
        let logging_json = match format.as_str() {
            "json" => true,
            "text" => false,
            other => {
                return Err(ConfigError::Invalid {
                    name: "logging format",
                    reason: format!("{other:?} (text, json)"),
                });
            }
        };
        let post = layered([
            args.post_job_action.as_ref(),
            file.runner.post_job_action.as_ref(),
        ])
        .unwrap_or_else(|| "exit".into());
        let post_job_action = PostJobAction::parse(&post).ok_or(ConfigError::Invalid {
            name: "post_job_action",
            reason: format!("{post:?} (exit, poweroff, none)"),
        })?;
        let runner_user = match layered([args.runner_user.as_ref(), file.runner.user.as_ref()]) {
            Some(u) => Some(u),
            // An explicit empty value means "run as root".
            None if args.runner_user.is_some() || file.runner.user.is_some() => None,
            None if running_as_root => Some("runner".into()),
            None => None,
        };
        let sha = layered([args.runner_sha256.as_ref(), file.runner.sha256.as_ref()])
            .map(|s| s.to_ascii_lowercase());
        let download = layered([
            args.runner_download_url.as_ref(),
            file.runner.download_url.as_ref(),
        ]);
        if download.is_some()
            && !sha
                .as_ref()
                .is_some_and(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(ConfigError::Invalid {
                name: "runner_sha256",
                reason: "a runner download URL needs the 64-hex-digit SHA-256 of the archive"
                    .into(),
            });
        }
        let auth = resolve_auth(args, file, meta, &endpoint)?;
        let client = match (
            layered([
                args.client_cert.as_ref(),
                file.controller.client_cert.as_ref(),
            ]),
            layered([
                args.client_key.as_ref(),
                file.controller.client_key.as_ref(),
            ]),
        ) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid {
                    name: "client_cert",
                    reason: "set both MIGLET_CLIENT_CERT and MIGLET_CLIENT_KEY".into(),
                });
            }
        };
        let tls = TlsFiles {
            ca_file: layered([args.ca_file.as_ref(), file.controller.ca_file.as_ref()]),
            client,
        };
        if (tls.ca_file.is_some() || tls.client.is_some()) && !endpoint.starts_with("https://") {
            return Err(ConfigError::Invalid {
                name: "ca_file",
                reason: "TLS files are set but the controller endpoint is not https://".into(),
            });
        }
        Ok(Settings {
            pool_id,
            vm_id,
            org_id,
            controller_endpoint: endpoint,
            controller_grpc_endpoint: grpc,
            logging_level: level,
            logging_json,
            data_dir: layered([args.data_dir.as_ref(), file.data_dir.as_ref()])
                .unwrap_or_else(|| PathBuf::from("/var/lib/miglet")),
            spool_max_events: match args.spool_max_events.unwrap_or(10_000) {
                0 => {
                    return Err(ConfigError::Invalid {
                        name: "spool_max_events",
                        reason: "must be at least 1".into(),
                    });
                }
                n => n,
            },
            runner_dir: layered([args.runner_dir.as_ref(), file.runner.dir.as_ref()])
                .unwrap_or_else(|| PathBuf::from("/opt/actions-runner")),
            runner_work_dir: layered([
                args.runner_work_dir.as_ref(),
                file.runner.work_dir.as_ref(),
            ])
            .unwrap_or_else(|| "_work".into()),
            runner_user,
            runner_download_url: download,
            runner_sha256: sha,
            post_job_action,
            heartbeat_interval: duration(
                "heartbeat_interval",
                layered([
                    args.heartbeat_interval.as_ref(),
                    file.heartbeat.interval.as_ref(),
                ]),
                Duration::from_secs(15),
            )?,
            poll_interval: duration(
                "poll_interval",
                layered([args.poll_interval.as_ref(), file.poll_interval.as_ref()]),
                Duration::from_secs(5),
            )?,
            shutdown_grace: duration(
                "shutdown_grace_period",
                layered([
                    args.shutdown_grace_period.as_ref(),
                    file.shutdown.grace_period.as_ref(),
                ]),
                Duration::from_secs(30),
            )?,
            controller_timeout: duration(
                "controller_timeout",
                layered([
                    args.controller_timeout.as_ref(),
                    file.controller.timeout.as_ref(),
                ]),
                Duration::from_secs(30),
            )?,
            boot_id: layered([args.boot_id.as_ref()]).unwrap_or_else(read_boot_id),
            preemption_watch: None,
            auth,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> AgentArgs {
        AgentArgs {
            pool_id: Some("pool-a".into()),
            vm_id: Some("vm-1".into()),
            controller_endpoint: Some("http://ctl:8080".into()),
            ..AgentArgs::default()
        }
    }

    #[test]
    fn auth_and_tls_resolution() -> Result<(), ConfigError> {
        let none = MetadataValues::default();
        let on_gce = MetadataValues {
            instance_name: Some("vm-1".into()),
            ..MetadataValues::default()
        };
        let file = FileConfig::default();
        // auto: no secret, not on GCE -> none; on GCE -> identity token for the endpoint.
        assert_eq!(
            Settings::resolve(&args(), &file, &none, false)?.auth,
            AuthMethod::None
        );
        assert_eq!(
            Settings::resolve(&args(), &file, &on_gce, false)?.auth,
            AuthMethod::Gce {
                metadata_base: "http://metadata.google.internal".into(),
                audience: "http://ctl:8080".into(),
            }
        );
        // A secret file wins in auto mode.
        let with_secret = AgentArgs {
            bootstrap_secret_file: Some("/etc/miglet/secret".into()),
            ..args()
        };
        assert_eq!(
            Settings::resolve(&with_secret, &file, &on_gce, false)?.auth,
            AuthMethod::Bootstrap {
                secret_file: "/etc/miglet/secret".into()
            }
        );
        // Explicit methods, and their errors.
        let bootstrap_without_file = AgentArgs {
            auth: Some("bootstrap".into()),
            ..args()
        };
        assert!(Settings::resolve(&bootstrap_without_file, &file, &none, false).is_err());
        let bad = AgentArgs {
            auth: Some("kerberos".into()),
            ..args()
        };
        assert!(Settings::resolve(&bad, &file, &none, false).is_err());
        let audience = AgentArgs {
            auth: Some("gce".into()),
            audience: Some("https://mig.example".into()),
            ..args()
        };
        assert!(matches!(
            Settings::resolve(&audience, &file, &none, false)?.auth,
            AuthMethod::Gce { audience, .. } if audience == "https://mig.example"
        ));
        // TLS files need an https endpoint, and a client cert needs its key.
        let ca_on_http = AgentArgs {
            ca_file: Some("/ca.pem".into()),
            ..args()
        };
        assert!(Settings::resolve(&ca_on_http, &file, &none, false).is_err());
        let half_client = AgentArgs {
            controller_endpoint: Some("https://ctl:8443".into()),
            client_cert: Some("/c.pem".into()),
            ..args()
        };
        assert!(Settings::resolve(&half_client, &file, &none, false).is_err());
        let tls = AgentArgs {
            controller_endpoint: Some("https://ctl:8443".into()),
            ca_file: Some("/ca.pem".into()),
            client_cert: Some("/c.pem".into()),
            client_key: Some("/k.pem".into()),
            ..args()
        };
        let s = Settings::resolve(&tls, &file, &none, false)?;
        assert_eq!(s.tls.client, Some(("/c.pem".into(), "/k.pem".into())));
        assert_eq!(
            s.controller_grpc_endpoint.as_deref(),
            Some("https://ctl:50051")
        );
        // No probe of the metadata server when it is switched off or a secret is set.
        let off = AgentArgs {
            metadata: Some("false".into()),
            ..args()
        };
        assert!(!auth_needs_gce_probe(&off, &file));
        assert!(!auth_needs_gce_probe(&with_secret, &file));
        assert!(auth_needs_gce_probe(&args(), &file));
        Ok(())
    }

    #[test]
    fn defaults_and_grpc_derivation() -> Result<(), ConfigError> {
        let s = Settings::resolve(
            &args(),
            &FileConfig::default(),
            &MetadataValues::default(),
            false,
        )?;
        assert_eq!(
            s.controller_grpc_endpoint.as_deref(),
            Some("http://ctl:50051")
        );
        assert_eq!(s.heartbeat_interval, Duration::from_secs(15));
        assert_eq!(s.poll_interval, Duration::from_secs(5));
        assert_eq!(s.post_job_action, PostJobAction::Exit);
        assert_eq!(s.runner_user, None);
        let root = Settings::resolve(
            &args(),
            &FileConfig::default(),
            &MetadataValues::default(),
            true,
        )?;
        assert_eq!(
            root.runner_user.as_deref(),
            Some("runner"),
            "root runs the runner unprivileged by default"
        );
        assert_eq!(
            derive_grpc_endpoint("https://[::1]:8443/x").as_deref(),
            Some("https://[::1]:50051")
        );
        assert_eq!(
            derive_grpc_endpoint("http://10.0.0.2").as_deref(),
            Some("http://10.0.0.2:50051")
        );
        Ok(())
    }

    #[test]
    fn precedence_flags_file_metadata() -> Result<(), Box<dyn std::error::Error>> {
        let file: FileConfig = serde_yaml_ng::from_str(
            "pool_id: from-file\norg_id: org-file\ncontroller:\n  endpoint: http://file:8080\n  grpc_endpoint: disabled\nheartbeat:\n  interval: 20s\nrunner:\n  user: \"\"\n",
        )?;
        let meta = MetadataValues {
            instance_name: Some("gce-instance-7".into()),
            pool_id: Some("from-meta".into()),
            org_id: Some("org-meta".into()),
            controller_endpoint: Some("http://meta:8080".into()),
            controller_grpc_endpoint: None,
        };
        let a = AgentArgs {
            pool_id: Some("from-flag".into()),
            ..AgentArgs::default()
        };
        let s = Settings::resolve(&a, &file, &meta, true)?;
        assert_eq!(s.pool_id, "from-flag");
        assert_eq!(
            s.vm_id, "gce-instance-7",
            "instance name is the default vm_id"
        );
        assert_eq!(s.org_id, "org-file");
        assert_eq!(s.controller_endpoint, "http://file:8080");
        assert_eq!(s.controller_grpc_endpoint, None);
        assert_eq!(s.heartbeat_interval, Duration::from_secs(20));
        assert_eq!(
            s.runner_user, None,
            "an explicit empty user runs the runner as root"
        );
        Ok(())
    }

    #[test]
    fn missing_and_invalid_settings_are_named() {
        let mut a = args();
        a.pool_id = None;
        let e = Settings::resolve(
            &a,
            &FileConfig::default(),
            &MetadataValues::default(),
            false,
        );
        assert!(matches!(e, Err(ConfigError::Missing(m)) if m.starts_with("pool_id")));
        for (mutate, name) in [
            (
                Box::new(|a: &mut AgentArgs| a.vm_id = Some("../x".into()))
                    as Box<dyn Fn(&mut AgentArgs)>,
                "vm_id",
            ),
            (
                Box::new(|a: &mut AgentArgs| a.controller_endpoint = Some("ctl:8080".into())),
                "controller endpoint",
            ),
            (
                Box::new(|a: &mut AgentArgs| a.heartbeat_interval = Some("often".into())),
                "heartbeat_interval",
            ),
            (
                Box::new(|a: &mut AgentArgs| a.post_job_action = Some("reboot".into())),
                "post_job_action",
            ),
            (
                Box::new(|a: &mut AgentArgs| a.logging_format = Some("xml".into())),
                "logging format",
            ),
            (
                Box::new(|a: &mut AgentArgs| a.runner_download_url = Some("http://x/r.tgz".into())),
                "runner_sha256",
            ),
        ] {
            let mut a = args();
            mutate(&mut a);
            match Settings::resolve(
                &a,
                &FileConfig::default(),
                &MetadataValues::default(),
                false,
            ) {
                Err(ConfigError::Invalid { name: n, .. }) => assert_eq!(n, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(
            serde_yaml_ng::from_str::<FileConfig>("pool_idd: x").is_err(),
            "typos are refused"
        );
    }

    #[tokio::test]
    async fn metadata_server_values() -> Result<(), Box<dyn std::error::Error>> {
        let m = miglet_sim::metadata::FakeMetadata::default();
        m.set("instance/name", "mig-abc1\n");
        m.set("instance/attributes/miglet-pool-id", "linux-x64");
        m.set(
            "instance/attributes/miglet-controller-endpoint",
            "http://10.0.0.2:8080",
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let router = m.router();
        let task = tokio::spawn(async move { axum_serve(listener, router).await });
        let v = fetch_metadata(&format!("http://{addr}")).await;
        task.abort();
        assert_eq!(v.instance_name.as_deref(), Some("mig-abc1"));
        assert_eq!(v.pool_id.as_deref(), Some("linux-x64"));
        assert_eq!(v.org_id, None);
        let s = Settings::resolve(&AgentArgs::default(), &FileConfig::default(), &v, false)?;
        assert_eq!(
            (s.vm_id.as_str(), s.pool_id.as_str()),
            ("mig-abc1", "linux-x64")
        );
        assert_eq!(
            s.controller_grpc_endpoint.as_deref(),
            Some("http://10.0.0.2:50051")
        );
        // Unreachable: nothing, quickly.
        let none = fetch_metadata("http://127.0.0.1:9").await;
        assert_eq!(none, MetadataValues::default());
        Ok(())
    }

    async fn axum_serve(listener: tokio::net::TcpListener, router: axum::Router) {
        let _ = axum::serve(listener, router).await;
    }
}
