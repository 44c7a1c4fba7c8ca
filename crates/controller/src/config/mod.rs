//! Controller settings: command-line flags > `MIG_CONTROLLER_*` environment > TOML config
//! file > defaults.

use crate::auth::AuthMode;
use crate::auth::enroll::{EnrollSettings, PoolEnrollment};
use crate::auth::gce::{GOOGLE_JWKS_URL, GceRule};
use crate::auth::limits::Limit;
use crate::token::{PoolRegistration, Pools, StaticToken, TokenFile, TokenSource};
use clap::Args;
use miglet_proto::settings::layered;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

mod args;
mod file;
mod gce;
mod github;
mod pools;

pub use args::*;
pub use file::*;
use pools::build_pools;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Only the message and position: the parser's own rendering quotes the offending line,
    /// which may hold a token.
    #[error("config file {path} is not valid (line {line}): {message}")]
    Parse {
        path: String,
        line: usize,
        message: String,
    },
    #[error("invalid setting {name}: {reason}")]
    Invalid { name: String, reason: String },
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
    pub auth_mode: AuthMode,
    pub enroll: EnrollSettings,
    pub credential_key_file: PathBuf,
    pub tls: Option<TlsSettings>,
    pub per_vm_limit: Limit,
    pub per_addr_limit: Limit,
    pub header_timeout: Duration,
    pub conn: ConnSettings,
    /// Prometheus listener; off when `None`.
    pub metrics_addr: Option<SocketAddr>,
    pub retention: RetentionSettings,
    /// The controller's time (adjustable in tests).
    pub clock: crate::clock::Clock,
    /// Where every GitHub client records its calls (registered with the other metrics).
    pub github_metrics: crate::github::metrics::GitHubMetrics,
    /// The GitHub webhook's secret (`[webhook] secret_file`); no webhook endpoint without it.
    pub webhook_secret_file: Option<PathBuf>,
    pub backstop: Backstop,
}

/// The backstop poll of GitHub's API (`[webhook] backstop_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backstop {
    /// `None`: no poll.
    pub interval: Option<Duration>,
    pub max_calls: usize,
}

/// TLS files of both listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Set: mutual TLS, client certificates must chain to this CA.
    pub client_ca_file: Option<PathBuf>,
    pub reload_interval: Duration,
}

/// The development pool's bootstrap secret file, inside the data dir.
pub fn dev_secret_file(data_dir: &Path) -> PathBuf {
    data_dir.join("dev-bootstrap-secret")
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
        let mut s = Settings::resolve(args, FileConfig::default())
            .unwrap_or_else(|e| panic!("test settings are invalid: {e}"));
        s.clock = crate::clock::Clock::adjustable();
        s.enroll.clock = s.clock.clone();
        s
    }

    /// Checks what the settings name on disk, so that a setting that cannot work stops the
    /// controller at start with a message naming it (exit 78) instead of failing requests
    /// later: bootstrap secret files (readable, long enough), registration token files
    /// (readable, not empty), TLS files (readable). The development secret is created at
    /// start, so it is not checked here.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        for (id, pool) in self.pools.iter() {
            let name = format!("pools.{id}");
            if let Some(file) = &pool.enrollment.bootstrap_secret_file
                && !self.dev_defaults
            {
                crate::auth::enroll::read_secret_now(file).map_err(|reason| {
                    ConfigError::Invalid {
                        name: format!("{name}.enrollment.bootstrap_secret_file"),
                        reason,
                    }
                })?;
            }
            pool.token
                .check_at_start()
                .map_err(|e| ConfigError::Invalid {
                    name: format!("{name}.token_file"),
                    reason: crate::error::chain(&e),
                })?;
        }
        if let Some(file) = &self.webhook_secret_file {
            crate::github::webhook::read_secret(file).map_err(|reason| ConfigError::Invalid {
                name: "webhook.secret_file".into(),
                reason,
            })?;
        }
        if let Some(tls) = &self.tls {
            let files = [
                ("tls_cert", Some(&tls.cert_file)),
                ("tls_key", Some(&tls.key_file)),
                ("tls_client_ca", tls.client_ca_file.as_ref()),
            ];
            for (name, file) in files {
                if let Some(f) = file {
                    std::fs::metadata(f).map_err(|e| ConfigError::Invalid {
                        name: name.into(),
                        reason: format!("cannot read {}: {e}", f.display()),
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Reads the config file named by `args` (if any), layers everything, and checks the
    /// files the settings name.
    pub fn load(args: ServeArgs) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: path.display().to_string(),
                    line: e.span().map_or(0, |r| {
                        text[..r.start.min(text.len())].lines().count().max(1)
                    }),
                    message: e.message().to_owned(),
                })?
            }
        };
        let settings = Settings::resolve(args, file)?;
        settings.check_files()?;
        Ok(settings)
    }

    /// Flags (or their environment variables) over the file over defaults, for every
    /// setting ([`layered`]), checked. Each section that can be refused has its own
    /// function, called in the order errors are reported.
    pub fn resolve(args: ServeArgs, file: FileConfig) -> Result<Settings, ConfigError> {
        let (unhealthy, lost) = health_thresholds(&args, &file)?;
        let data_dir = layered([args.data_dir.as_ref(), file.data_dir.as_ref()])
            .unwrap_or_else(|| PathBuf::from("./controller_data"));
        let auth_mode = args.auth_mode.or(file.auth_mode).unwrap_or_default();
        let github_metrics = crate::github::metrics::GitHubMetrics::default();
        let (pools, dev_defaults) =
            build_pools(&args, &file.pools, &data_dir, auth_mode, &github_metrics)?;
        let audience = layered([args.audience.as_ref(), file.auth.audience.as_ref()]);
        if auth_mode == AuthMode::Authenticated && audience.is_none() && pools.any_gce() {
            return Err(ConfigError::Invalid {
                name: "audience".into(),
                reason: "a pool enrolls with GCE identity tokens, so set the audience (the controller URL the agents use)".into(),
            });
        }
        let enroll = enroll_settings(&args, &file, audience)?;
        let tls = tls_settings(&args, &file)?;
        let retention = retention_settings(&file)?;
        let t = timings(&args, &file)?;
        let (per_vm_limit, per_addr_limit) = rate_limits(&args, &file.limits);
        let header_timeout = secs(
            "header_timeout_secs",
            file.limits.header_timeout_secs.unwrap_or(10),
        )?;
        let conn = conn_settings(&file)?;
        Ok(Settings {
            http_addr: layered([args.http_addr.as_ref(), file.http_addr.as_ref()])
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 8080))),
            grpc_addr: layered([args.grpc_addr.as_ref(), file.grpc_addr.as_ref()])
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 50051))),
            credential_key_file: layered([
                args.credential_key_file.as_ref(),
                file.auth.credential_key_file.as_ref(),
            ])
            .unwrap_or_else(|| data_dir.join("credential.key")),
            data_dir,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            log_level: layered([args.log_level.as_ref(), file.log_level.as_ref()])
                .unwrap_or_else(|| "info".into()),
            heartbeat_interval: t.heartbeat_interval,
            unhealthy_after_missed: unhealthy,
            lost_after_missed: lost,
            redelivery_timeout: t.redelivery_timeout,
            command_ttl: t.command_ttl,
            reconcile_interval: t.reconcile_interval,
            addr_file: args.addr_file,
            pools,
            dev_defaults,
            auth_mode,
            enroll,
            tls,
            per_vm_limit,
            per_addr_limit,
            header_timeout,
            conn,
            metrics_addr: layered([args.metrics_addr.as_ref(), file.metrics_addr.as_ref()]),
            retention,
            clock: crate::clock::Clock::system(),
            github_metrics,
            webhook_secret_file: file.webhook.secret_file.clone(),
            backstop: backstop(&file.webhook)?,
        })
    }
}

fn backstop(w: &file::WebhookFileConfig) -> Result<Backstop, ConfigError> {
    let max_calls = w.backstop_max_calls.unwrap_or(30);
    if !(1..=1000).contains(&max_calls) {
        return Err(ConfigError::Invalid {
            name: "webhook.backstop_max_calls".into(),
            reason: format!("{max_calls} is not between 1 and 1000"),
        });
    }
    let interval = match w.backstop_interval_secs.unwrap_or(60) {
        0 => None,
        s @ 1..=86_400 => Some(Duration::from_secs(s)),
        s => {
            return Err(ConfigError::Invalid {
                name: "webhook.backstop_interval_secs".into(),
                reason: format!("{s} is more than a day; 0 turns the poll off"),
            });
        }
    };
    Ok(Backstop {
        interval,
        max_calls,
    })
}

/// The protocol's timings, each in whole seconds, at least one.
struct Timings {
    heartbeat_interval: Duration,
    redelivery_timeout: Duration,
    command_ttl: Duration,
    reconcile_interval: Duration,
}

fn timings(args: &ServeArgs, file: &FileConfig) -> Result<Timings, ConfigError> {
    let pick = |name: &str, flag: Option<u64>, in_file: Option<u64>, default: u64| {
        secs(
            name,
            layered([flag.as_ref(), in_file.as_ref()]).unwrap_or(default),
        )
    };
    Ok(Timings {
        heartbeat_interval: pick(
            "heartbeat_interval_secs",
            args.heartbeat_interval_secs,
            file.heartbeat_interval_secs,
            15,
        )?,
        redelivery_timeout: pick(
            "redelivery_timeout_secs",
            args.redelivery_timeout_secs,
            file.redelivery_timeout_secs,
            30,
        )?,
        command_ttl: pick(
            "command_ttl_secs",
            args.command_ttl_secs,
            file.command_ttl_secs,
            86_400,
        )?,
        reconcile_interval: pick(
            "reconcile_interval_secs",
            args.reconcile_interval_secs,
            file.reconcile_interval_secs,
            5,
        )?,
    })
}

/// Per-VM and per-address request rates (per second), with bursts of five seconds' worth
/// unless set.
fn rate_limits(args: &ServeArgs, l: &LimitsFileConfig) -> (Limit, Limit) {
    let per_vm = layered([
        args.rate_limit_per_vm.as_ref(),
        l.per_vm_per_second.as_ref(),
    ])
    .unwrap_or(20);
    let per_addr = layered([
        args.rate_limit_per_addr.as_ref(),
        l.per_addr_per_second.as_ref(),
    ])
    .unwrap_or(200);
    (
        Limit {
            per_second: per_vm,
            burst: l.per_vm_burst.unwrap_or(per_vm.saturating_mul(5)),
        },
        Limit {
            per_second: per_addr,
            burst: l.per_addr_burst.unwrap_or(per_addr.saturating_mul(5)),
        },
    )
}

/// A duration setting in whole seconds, at least one.
fn secs(name: &str, v: u64) -> Result<Duration, ConfigError> {
    if v == 0 {
        return Err(ConfigError::Invalid {
            name: name.into(),
            reason: "must be at least 1 second".into(),
        });
    }
    Ok(Duration::from_secs(v))
}

/// Missed heartbeat intervals before a VM is unhealthy, and before it is lost.
fn health_thresholds(args: &ServeArgs, file: &FileConfig) -> Result<(u32, u32), ConfigError> {
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
    Ok((unhealthy, lost))
}

/// How VMs enroll and how long their credentials last.
fn enroll_settings(
    args: &ServeArgs,
    file: &FileConfig,
    audience: Option<String>,
) -> Result<EnrollSettings, ConfigError> {
    Ok(EnrollSettings {
        credential_ttl: secs(
            "credential_ttl_secs",
            args.credential_ttl_secs
                .or(file.auth.credential_ttl_secs)
                .unwrap_or(3600),
        )?,
        max_lifetime: secs(
            "credential_max_lifetime_secs",
            file.auth.credential_max_lifetime_secs.unwrap_or(7 * 86_400),
        )?,
        audience,
        google_jwks_url: {
            let url = args
                .google_jwks_url
                .clone()
                .or(file.auth.google_jwks_url.clone())
                .unwrap_or_else(|| GOOGLE_JWKS_URL.into());
            check_url("google_jwks_url", &url)?;
            url
        },
        identity_max_age: secs(
            "identity_token_max_age_secs",
            file.auth.identity_token_max_age_secs.unwrap_or(300),
        )?,
        clock: crate::clock::Clock::system(),
    })
}

/// TLS from the flags (certificate and key together) or the file; mutual TLS needs both.
fn tls_settings(args: &ServeArgs, file: &FileConfig) -> Result<Option<TlsSettings>, ConfigError> {
    Ok(match (&args.tls_cert, &args.tls_key, &file.tls) {
        (Some(cert), Some(key), f) => Some(TlsSettings {
            cert_file: cert.clone(),
            key_file: key.clone(),
            client_ca_file: args
                .tls_client_ca
                .clone()
                .or(f.as_ref().and_then(|f| f.client_ca_file.clone())),
            reload_interval: Duration::from_secs(
                f.as_ref()
                    .and_then(|f| f.reload_interval_secs)
                    .unwrap_or(10)
                    .max(1),
            ),
        }),
        (None, None, Some(f)) => Some(TlsSettings {
            cert_file: f.cert_file.clone(),
            key_file: f.key_file.clone(),
            client_ca_file: args.tls_client_ca.clone().or(f.client_ca_file.clone()),
            reload_interval: Duration::from_secs(f.reload_interval_secs.unwrap_or(10).max(1)),
        }),
        (None, None, None) => {
            if args.tls_client_ca.is_some() {
                return Err(ConfigError::Invalid {
                    name: "tls_client_ca".into(),
                    reason: "mutual TLS needs --tls-cert and --tls-key too".into(),
                });
            }
            None
        }
        _ => {
            return Err(ConfigError::Invalid {
                name: "tls_cert".into(),
                reason: "set both --tls-cert and --tls-key".into(),
            });
        }
    })
}

/// How long history is kept, and how it is thinned.
fn retention_settings(file: &FileConfig) -> Result<RetentionSettings, ConfigError> {
    let r = &file.retention;
    let retention = RetentionSettings {
        heartbeat_full: secs(
            "retention.heartbeat_full_secs",
            r.heartbeat_full_secs.unwrap_or(86_400),
        )?,
        heartbeat_bucket: secs(
            "retention.heartbeat_bucket_secs",
            r.heartbeat_bucket_secs.unwrap_or(300),
        )?,
        heartbeat_max_age: secs(
            "retention.heartbeat_max_age_secs",
            r.heartbeat_max_age_secs.unwrap_or(14 * 86_400),
        )?,
        event_max_age: match r.event_max_age_secs.unwrap_or(90 * 86_400) {
            0 => None,
            s => Some(Duration::from_secs(s)),
        },
        interval: Duration::from_secs(600),
    };
    if retention.heartbeat_max_age < retention.heartbeat_full {
        return Err(ConfigError::Invalid {
            name: "retention.heartbeat_max_age_secs".into(),
            reason: "must be at least heartbeat_full_secs".into(),
        });
    }
    Ok(retention)
}

/// Connection caps and deadlines of both listeners.
fn conn_settings(file: &FileConfig) -> Result<ConnSettings, ConfigError> {
    let l = &file.limits;
    Ok(ConnSettings {
        max_connections: match l.max_connections {
            Some(n) if n < 2 => {
                return Err(ConfigError::Invalid {
                    name: "limits.max_connections".into(),
                    reason: "must be at least 2 (one per listener)".into(),
                });
            }
            other => other,
        },
        max_connections_per_addr: match l.max_connections_per_addr.unwrap_or(4096) {
            0 => {
                return Err(ConfigError::Invalid {
                    name: "limits.max_connections_per_addr".into(),
                    reason: "must be at least 1".into(),
                });
            }
            n => n,
        },
        handshake_timeout: secs(
            "limits.handshake_timeout_secs",
            l.handshake_timeout_secs.unwrap_or(10),
        )?,
        grpc_idle_timeout: secs(
            "limits.grpc_idle_timeout_secs",
            l.grpc_idle_timeout_secs.unwrap_or(30),
        )?,
    })
}

/// A runner URL (or any URL setting) must be an absolute `http(s)` URL with a host.
fn check_url(name: &str, value: &str) -> Result<(), ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        name: name.to_owned(),
        reason,
    };
    let url =
        reqwest::Url::parse(value).map_err(|e| invalid(format!("{value:?} is not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(format!(
            "{value:?} is not an http(s) URL with a host, e.g. https://github.com/acme"
        )));
    }
    Ok(())
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
            [pools.linux-x64.enrollment.gce]
            project_id = "acme-ci"
            zones = ["us-central1-a"]
            [pools."*"]
            runner_url = "https://github.com/acme-other"
            token = "abc"
            labels = ["self-hosted"]
            enrollment = { bootstrap_secret_file = "/run/secrets/pool" }
            [auth]
            audience = "https://mig.example:8080"
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
        assert_eq!(s.auth_mode, AuthMode::Authenticated);
        assert!(s.pools.get("linux-x64")?.enrollment.gce.is_some());
        Ok(())
    }

    #[test]
    fn retention_defaults_and_checks() -> Result<(), Box<dyn std::error::Error>> {
        let open = || ServeArgs {
            auth_mode: Some(AuthMode::Open),
            ..ServeArgs::default()
        };
        let d = Settings::resolve(open(), FileConfig::default())?.retention;
        assert_eq!(d.heartbeat_full, Duration::from_secs(86_400));
        assert_eq!(d.event_max_age, Some(Duration::from_secs(90 * 86_400)));
        let forever: FileConfig = toml::from_str("[retention]\nevent_max_age_secs = 0")?;
        assert_eq!(
            Settings::resolve(open(), forever)?.retention.event_max_age,
            None
        );
        let bad: FileConfig =
            toml::from_str("[retention]\nheartbeat_full_secs = 100\nheartbeat_max_age_secs = 50")?;
        assert_eq!(refused(open(), bad), "retention.heartbeat_max_age_secs");
        let unknown = toml::from_str::<FileConfig>("[retention]\nkeep = 1")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(unknown.contains("keep"), "{unknown}");
        Ok(())
    }

    #[test]
    fn parse_errors_do_not_quote_the_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[pools.p]\nrunner_url = \"https://github.com/acme\"\ntoken = \"ghs_SECRETVALUE\" oops\n",
        )?;
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        let e = Settings::load(args).err().ok_or("must fail")?;
        let text = format!("{:#}", anyhow::Error::from(e));
        assert!(!text.contains("ghs_SECRETVALUE"), "{text}");
        assert!(text.contains("line 3"), "{text}");
        Ok(())
    }

    /// The setting an invalid configuration names (the test fails if it is valid, or fails
    /// for another reason than a named setting).
    fn refused(args: ServeArgs, file: FileConfig) -> String {
        match Settings::resolve(args, file) {
            Err(ConfigError::Invalid { name, .. }) => name,
            Err(other) => panic!("refused for another reason: {other}"),
            Ok(_) => panic!("accepted an invalid configuration"),
        }
    }

    fn file(text: &str) -> FileConfig {
        toml::from_str(text).unwrap_or_else(|e| panic!("test TOML: {e}"))
    }

    const POOL: &str = "[pools.p]\nrunner_url = \"https://github.com/acme\"\ntoken = \"a\"\n";

    #[test]
    fn auth_settings_are_checked() -> Result<(), Box<dyn std::error::Error>> {
        // A pool that cannot enroll anyone is a config error in authenticated mode ...
        let no_method = file(POOL);
        assert_eq!(
            refused(ServeArgs::default(), no_method.clone()),
            "pools.p.enrollment"
        );
        // ... but fine in open mode.
        let open = ServeArgs {
            auth_mode: Some(AuthMode::Open),
            ..ServeArgs::default()
        };
        assert_eq!(
            Settings::resolve(open, no_method)?.auth_mode,
            AuthMode::Open
        );
        // Enrollment tokens alone are a method.
        let tokens = file(&format!(
            "{POOL}[pools.p.enrollment]\nenrollment_tokens = true"
        ));
        assert!(
            Settings::resolve(ServeArgs::default(), tokens)?
                .pools
                .get("p")?
                .enrollment
                .enrollment_tokens
        );
        // GCE enrollment needs an audience.
        let gce = file(&format!(
            "{POOL}[pools.p.enrollment.gce]\nproject_id = \"x\""
        ));
        assert_eq!(refused(ServeArgs::default(), gce), "audience");
        let bad_prefix = file(&format!(
            "{POOL}[pools.p.enrollment]\nenrollment_tokens = true\nvm_id_prefix = \"a/b\""
        ));
        assert_eq!(
            refused(ServeArgs::default(), bad_prefix),
            "pools.p.enrollment.vm_id_prefix"
        );
        // TLS needs both halves.
        let half = ServeArgs {
            tls_cert: Some("/c.pem".into()),
            ..ServeArgs::default()
        };
        assert_eq!(refused(half, FileConfig::default()), "tls_cert");
        let ca_only = ServeArgs {
            tls_client_ca: Some("/ca.pem".into()),
            ..ServeArgs::default()
        };
        assert_eq!(refused(ca_only, FileConfig::default()), "tls_client_ca");
        Ok(())
    }

    /// `[pools.<id>.github]`: an App pool derives its runner URL from the scope; the key is
    /// read at start; scope and credentials are each exactly one.
    #[test]
    fn github_pools_are_checked() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let key = dir.path().join("app.pem");
        std::fs::write(&key, miglet_sim::github::APP_PRIVATE_KEY)?;
        let pool = |github: &str| {
            file(&format!(
                "[pools.p.github]\n{github}\n[pools.p.enrollment]\nenrollment_tokens = true\n"
            ))
        };
        let app = format!("org = \"acme\"\napp_id = 1\nprivate_key_file = {key:?}");
        let s = Settings::resolve(ServeArgs::default(), pool(&app))?;
        assert_eq!(s.pools.get("p")?.runner_url, "https://github.com/acme");
        let cases = [
            (format!("{app}\npat_file = \"/p\""), "pools.p.github"),
            (
                "repo = \"acme\"\npat_file = \"/p\"".to_owned(),
                "pools.p.github.repo",
            ),
            (
                "org = \"a\"\nrepo = \"a/b\"\npat_file = \"/p\"".to_owned(),
                "pools.p.github",
            ),
            (
                format!("enterprise = \"e\"\napp_id = 1\nprivate_key_file = {key:?}"),
                "pools.p.github",
            ),
            (
                "org = \"acme\"\napp_id = 1\nprivate_key_file = \"/nonexistent.pem\"".to_owned(),
                "pools.p.github.private_key_file",
            ),
            (
                format!("{app}\nregistration = \"magic\""),
                "pools.p.github.registration",
            ),
        ];
        for (github, name) in cases {
            assert_eq!(
                refused(ServeArgs::default(), pool(&github)),
                name,
                "{github}"
            );
        }
        Ok(())
    }

    #[test]
    fn bad_config_is_refused() {
        let unknown = toml::from_str::<FileConfig>("htp_addr = \"x\"")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(unknown.contains("htp_addr"), "{unknown}");
        let both = file(&format!("{POOL}token_file = \"/f\""));
        assert_eq!(refused(ServeArgs::default(), both), "pools.p");
        let args = ServeArgs {
            unhealthy_after_missed: Some(5),
            lost_after_missed: Some(5),
            ..ServeArgs::default()
        };
        assert_eq!(refused(args, FileConfig::default()), "lost_after_missed");
        for url in ["u", "github.com/acme", "ftp://github.com/acme", "https://"] {
            let f = file(&format!(
                "[pools.p]\nrunner_url = \"{url}\"\ntoken = \"a\"\n[pools.p.enrollment]\nenrollment_tokens = true"
            ));
            assert_eq!(
                refused(ServeArgs::default(), f),
                "pools.p.runner_url",
                "{url}"
            );
        }
        let dev_url = ServeArgs {
            runner_url: Some("not a url".into()),
            ..ServeArgs::default()
        };
        assert_eq!(
            refused(dev_url, FileConfig::default()),
            "runner_url (MIG_CONTROLLER_RUNNER_URL)"
        );
    }

    /// What the settings name on disk is checked at start, with the setting named.
    #[test]
    fn files_are_checked_at_start() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let secret = dir.path().join("secret");
        let token = dir.path().join("token");
        let cfg = |secret_line: &str| {
            file(&format!(
                "[pools.p]\nrunner_url = \"https://github.com/acme\"\ntoken_file = {token:?}\n\
                 [pools.p.enrollment]\n{secret_line}"
            ))
        };
        let with_secret = format!("bootstrap_secret_file = {secret:?}");
        let check = |f: FileConfig| -> Result<(), String> {
            let s = Settings::resolve(ServeArgs::default(), f).map_err(|e| e.to_string())?;
            s.check_files().map_err(|e| match e {
                ConfigError::Invalid { name, reason } => format!("{name}: {reason}"),
                other => other.to_string(),
            })
        };
        std::fs::write(&token, "tok")?;
        // Missing, empty and short secrets are refused, naming the setting.
        for content in [None, Some(""), Some("short")] {
            match content {
                None => {
                    let _ = std::fs::remove_file(&secret);
                }
                Some(c) => std::fs::write(&secret, c)?,
            }
            let err = check(cfg(&with_secret)).err().ok_or("must fail")?;
            assert!(
                err.starts_with("pools.p.enrollment.bootstrap_secret_file:"),
                "{err}"
            );
            assert!(!err.contains("short"), "never quotes the secret: {err}");
        }
        std::fs::write(&secret, "a-long-enough-secret-0123")?;
        check(cfg(&with_secret))?;
        // A missing or empty token file too.
        std::fs::write(&token, "\n")?;
        let err = check(cfg(&with_secret)).err().ok_or("must fail")?;
        assert!(err.starts_with("pools.p.token_file:"), "{err}");
        std::fs::remove_file(&token)?;
        let err = check(cfg(&with_secret)).err().ok_or("must fail")?;
        assert!(err.starts_with("pools.p.token_file:"), "{err}");
        // TLS files that are not there.
        std::fs::write(&token, "tok")?;
        let mut s = Settings::resolve(ServeArgs::default(), cfg(&with_secret))?;
        s.tls = Some(TlsSettings {
            cert_file: dir.path().join("nope.pem"),
            key_file: dir.path().join("nope-key.pem"),
            client_ca_file: None,
            reload_interval: Duration::from_secs(10),
        });
        match s.check_files() {
            Err(ConfigError::Invalid { name, .. }) => assert_eq!(name, "tls_cert"),
            other => panic!("expected tls_cert to be refused, got {other:?}"),
        }
        Ok(())
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
