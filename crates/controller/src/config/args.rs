//! `mig-controller serve` flags (each also read from `MIG_CONTROLLER_<NAME>`).

use super::*;

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
    /// Prometheus metrics listener, e.g. 127.0.0.1:9090 [default: off].
    #[arg(long, env = "MIG_CONTROLLER_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// `authenticated` (default): VMs enroll and carry credentials, operators use API tokens.
    /// `open`: no authentication at all, for development only.
    #[arg(long, env = "MIG_CONTROLLER_AUTH_MODE", value_enum)]
    pub auth_mode: Option<AuthMode>,
    /// Audience GCE identity tokens must carry: the controller URL the agents use.
    #[arg(long, env = "MIG_CONTROLLER_AUDIENCE")]
    pub audience: Option<String>,
    /// Where Google's identity token signing keys (JWKS) are fetched from.
    #[arg(long, env = "MIG_CONTROLLER_GOOGLE_JWKS_URL")]
    pub google_jwks_url: Option<String>,
    /// File with the key VM credentials are signed with [default: <data-dir>/credential.key,
    /// created if missing]. Replicas must share it.
    #[arg(long, env = "MIG_CONTROLLER_CREDENTIAL_KEY_FILE")]
    pub credential_key_file: Option<PathBuf>,
    /// Lifetime of one VM credential, seconds [default: 3600].
    #[arg(long, env = "MIG_CONTROLLER_CREDENTIAL_TTL_SECS")]
    pub credential_ttl_secs: Option<u64>,
    /// PEM certificate chain for TLS on both listeners (with --tls-key).
    #[arg(long, env = "MIG_CONTROLLER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "MIG_CONTROLLER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mutual TLS).
    #[arg(long, env = "MIG_CONTROLLER_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Requests per second allowed per VM, 0 = unlimited [default: 20, burst 100].
    #[arg(long, env = "MIG_CONTROLLER_RATE_LIMIT_PER_VM")]
    pub rate_limit_per_vm: Option<u32>,
    /// Requests per second allowed per client address, 0 = unlimited [default: 200, burst 1000].
    #[arg(long, env = "MIG_CONTROLLER_RATE_LIMIT_PER_ADDR")]
    pub rate_limit_per_addr: Option<u32>,
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
