//! The TOML config file's shape, with its defaults; checked and merged in [`super::Settings::resolve`].

use super::*;

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
    pub metrics_addr: Option<SocketAddr>,
    pub auth_mode: Option<AuthMode>,
    #[serde(default)]
    pub auth: AuthFileConfig,
    pub tls: Option<TlsFileConfig>,
    #[serde(default)]
    pub limits: LimitsFileConfig,
    #[serde(default)]
    pub retention: RetentionFileConfig,
    /// Registration config per pool id; the key `"*"` serves every pool not listed.
    #[serde(default)]
    pub pools: HashMap<String, PoolConfig>,
    #[serde(default)]
    pub webhook: WebhookFileConfig,
}

/// `[webhook]` of the config file: GitHub's `workflow_job` deliveries to
/// `POST /api/v1/github/webhook`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookFileConfig {
    /// The webhook's secret (as set on GitHub), re-read at every delivery; without it the
    /// endpoint answers 404.
    pub secret_file: Option<PathBuf>,
    /// How often the backstop poll asks GitHub's API about jobs the webhooks may have
    /// missed, for the scaled pools with GitHub credentials [default: 60; 0: never].
    pub backstop_interval_secs: Option<u64>,
    /// GitHub API calls one backstop pass may make per scope [default: 30, at most 1000].
    pub backstop_max_calls: Option<usize>,
}

/// `[auth]` of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFileConfig {
    pub audience: Option<String>,
    pub google_jwks_url: Option<String>,
    pub credential_key_file: Option<PathBuf>,
    pub credential_ttl_secs: Option<u64>,
    /// A VM must enroll again this long after its last identity proof [default: 7 days].
    pub credential_max_lifetime_secs: Option<u64>,
    /// Identity tokens older than this are refused [default: 300].
    pub identity_token_max_age_secs: Option<u64>,
}

/// `[tls]` of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFileConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
    /// How often the files are checked for changes [default: 10].
    pub reload_interval_secs: Option<u64>,
}

/// `[limits]` of the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFileConfig {
    pub per_vm_per_second: Option<u32>,
    pub per_vm_burst: Option<u32>,
    pub per_addr_per_second: Option<u32>,
    pub per_addr_burst: Option<u32>,
    /// A client must send a request's headers within this many seconds [default: 10].
    pub header_timeout_secs: Option<u64>,
    /// Open connections at most, both listeners together [default: the open-file limit
    /// less 512 kept for the store and files].
    pub max_connections: Option<usize>,
    /// Open connections at most from one source address, per listener [default: 4096,
    /// room for a fleet behind one NAT].
    pub max_connections_per_addr: Option<usize>,
    /// TLS handshake plus (gRPC) the HTTP/2 preface must be done within this [default: 10].
    pub handshake_timeout_secs: Option<u64>,
    /// A gRPC connection with no stream or request for this long is closed [default: 30].
    pub grpc_idle_timeout_secs: Option<u64>,
}

/// Connection caps and deadlines of both listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnSettings {
    /// `None`: derived from the open-file limit at start.
    pub max_connections: Option<usize>,
    pub max_connections_per_addr: usize,
    pub handshake_timeout: Duration,
    pub grpc_idle_timeout: Duration,
}

/// `[retention]` of the config file: how long history is kept.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionFileConfig {
    /// Every heartbeat is kept this long [default: 86400, one day].
    pub heartbeat_full_secs: Option<u64>,
    /// After that, one heartbeat per VM per this many seconds [default: 300].
    pub heartbeat_bucket_secs: Option<u64>,
    /// Heartbeats older than this are deleted [default: 1209600, 14 days].
    pub heartbeat_max_age_secs: Option<u64>,
    /// Events older than this are deleted; 0 keeps them forever [default: 7776000, 90 days].
    pub event_max_age_secs: Option<u64>,
}

/// Effective retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionSettings {
    pub heartbeat_full: Duration,
    pub heartbeat_bucket: Duration,
    pub heartbeat_max_age: Duration,
    pub event_max_age: Option<Duration>,
    /// How often a retention pass runs.
    pub interval: Duration,
}

/// `[pools.<id>.enrollment]`: how the pool's VMs prove who they are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentConfig {
    /// File holding the pool's bootstrap secret (at least 16 characters), re-read at use.
    /// It proves only membership of the pool.
    pub bootstrap_secret_file: Option<PathBuf>,
    /// Accept one-time enrollment tokens minted for single VMs (they prove the VM).
    #[serde(default)]
    pub enrollment_tokens: bool,
    /// Every VM id of the pool starts with this (whatever the proof), so the pool's
    /// bootstrap secret enrolls only ids of its own range.
    pub vm_id_prefix: Option<String>,
    pub gce: Option<GceConfig>,
}

/// `[pools.<id>.enrollment.gce]`: which GCE instances belong to the pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GceConfig {
    pub project_id: String,
    #[serde(default)]
    pub zones: Vec<String>,
    pub instance_name_prefix: Option<String>,
    pub service_account: Option<String>,
}

/// `[pools.<id>]` of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Where runners register (`config.sh --url`); derived from `[github]` when that is set.
    #[serde(default)]
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
    #[serde(default)]
    pub enrollment: EnrollmentConfig,
    /// Credentials the controller mints registrations with, instead of `token`/`token_file`.
    pub github: Option<GitHubConfig>,
    /// Where the pool's VMs come from; with it the controller sizes the pool itself.
    pub provider: Option<ProviderConfig>,
    /// Spare VMs kept ready beyond queued jobs [default: 0].
    pub min_idle: Option<u32>,
    /// VMs at most, busy ones included [default: 10].
    pub max_size: Option<u32>,
    /// A spare idle VM is removed after this long [default: 600].
    pub idle_timeout_secs: Option<u64>,
    /// An idle VM older than this is replaced [default: 86400].
    pub max_vm_lifetime_secs: Option<u64>,
    /// Created → `vm_started`, at most [default: 300].
    pub boot_timeout_secs: Option<u64>,
    /// `vm_started` → runner online, at most [default: 300].
    pub registration_timeout_secs: Option<u64>,
    /// VMs created per scaler pass, at most [default: 10].
    pub scale_up_step: Option<u32>,
    /// VMs created in any 60 seconds, at most, for a provider's quotas [default: no limit].
    pub scale_up_per_minute: Option<u32>,
}

/// `[pools.<id>.provider]`: where the pool's VMs come from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// `local` (each VM a `miglet` process on this machine), `exec` (an external program
    /// creates, deletes and lists the VMs) or `gce-mig` (a Compute managed instance group).
    pub kind: String,
    /// exec: the program (run as `<command> <args...> create|delete|list`).
    pub command: Option<PathBuf>,
    /// exec: a run longer than this is stopped and tried again later [default: 120].
    pub timeout_secs: Option<u64>,
    /// gce-mig: the group's project, its `zone` or `region`, and its name.
    pub project: Option<String>,
    pub zone: Option<String>,
    pub region: Option<String>,
    pub instance_group_manager: Option<String>,
    /// gce-mig: a service-account key file [default: the metadata server's token, when the
    /// controller runs on GCE/GKE].
    pub key_file: Option<PathBuf>,
    /// gce-mig: Compute's API root [default: `https://compute.googleapis.com/compute/v1`].
    pub compute_api_url: Option<String>,
    /// gce-mig: the metadata server [default: `http://metadata.google.internal`].
    pub metadata_url: Option<String>,
    /// gce-mig: `warn` (default) or `refuse` to scale while the group has settings that
    /// delete busy VMs (an autoscaler that scales in, zone redistribution, proactive updates,
    /// autohealing with a short initial delay).
    pub unsafe_mig_settings: Option<String>,
    /// local: the agent binary [default: `miglet` next to the controller, else on PATH].
    pub miglet_bin: Option<PathBuf>,
    /// local: the runner directory copied into each VM (required).
    pub runner_template: Option<PathBuf>,
    /// local: where VM directories are made [default: `<data_dir>/local-vms/<pool>`].
    pub work_dir: Option<PathBuf>,
    /// local: environment for every VM's agent (e.g. `MIGLET_CA_FILE`); exec: for the
    /// program.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// local: command-line arguments for every VM's agent; exec: the program's arguments
    /// before the action.
    #[serde(default)]
    pub args: Vec<String>,
    /// local: a deleted VM's agent gets this long to stop [default: 30].
    pub stop_grace_secs: Option<u64>,
}

/// `[pools.<id>.github]`: the runner scope and the credentials registrations are minted with.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitHubConfig {
    /// The runner scope: exactly one of `org`, `repo` (`owner/name`) or `enterprise`.
    pub org: Option<String>,
    pub repo: Option<String>,
    pub enterprise: Option<String>,
    /// `https://api.github.com`, or `https://HOST/api/v3` for GitHub Enterprise Server.
    pub api_url: Option<String>,
    /// The runner group by name [default: the scope's default group].
    pub runner_group: Option<String>,
    /// A GitHub App: its id and private key (PEM); the installation is found from the scope
    /// unless given.
    pub app_id: Option<u64>,
    pub private_key_file: Option<PathBuf>,
    pub installation_id: Option<u64>,
    /// Or a personal access token in a file (re-read at use).
    pub pat_file: Option<PathBuf>,
    /// `jit` (one just-in-time runner per VM boot) or `token` (a registration token for
    /// `config.sh`) [default: jit].
    pub registration: Option<String>,
    /// Mints (registration tokens and JIT configs) per minute for this App or PAT, shared by
    /// the pools that use it [default: 150, under GitHub's secondary limit of about 180].
    pub mint_budget_per_minute: Option<u32>,
    /// Label added to every runner this controller registers, to tell them from others in
    /// the scope (other controllers' included) [default: `mig-<installation id>`, the id
    /// kept in the data dir's `installation-id`; set it to share runners between replicas].
    pub controller_label: Option<String>,
}

pub(super) fn default_group() -> String {
    "default".into()
}

pub(super) fn default_labels() -> Vec<String> {
    ["self-hosted", "linux", "x64"].map(String::from).to_vec()
}

pub(super) fn default_token_ttl() -> u64 {
    3600
}
