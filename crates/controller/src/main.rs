//! `mig-controller`: `serve` runs the controller; `export` writes the sample controller's
//! folder layout from a data dir.

use anyhow::Context;
use clap::{Parser, Subcommand};
use mig_controller::app::local;
use mig_controller::auth::{AuthMode, Role};
use mig_controller::config::{ConfigError, LogFormat, ServeArgs, Settings};
use mig_controller::server;
use mig_controller::store::Store;
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

/// Exit code for an invalid configuration (sysexits EX_CONFIG), so a supervisor can tell it
/// from a crash.
const EXIT_CONFIG: u8 = 78;

#[derive(Debug, Parser)]
#[command(
    name = "mig-controller",
    version,
    about = "The MIG controller for MIGlet VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the HTTP and gRPC APIs.
    Serve(Box<ServeArgs>),
    /// Operator API tokens: create, list, revoke. Works on the data dir, also while the
    /// controller runs.
    #[command(subcommand)]
    Token(TokenCmd),
    /// One-time enrollment tokens: a VM exchanges one, once, for a credential of its pool
    /// (the pool must set `enrollment_tokens = true`). Works on the data dir.
    #[command(subcommand, name = "enrollment-token")]
    EnrollmentToken(EnrollmentTokenCmd),
    /// Show the audit log of admin actions, newest first.
    Audit {
        #[command(flatten)]
        data: DataDir,
        /// How many entries.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only entries older than this sequence number (for paging).
        #[arg(long)]
        before: Option<i64>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the operator API's OpenAPI document (the checked-in docs/openapi.json).
    Openapi,
    /// A private CA and certificates for TLS and mutual TLS.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Write every stored VM's data as the sample controller's per-VM JSON files.
    Export {
        #[command(flatten)]
        data: DataDir,
        /// Folder to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
}

// `--data-dir` of the commands that work on a controller's store.
#[derive(Debug, clap::Args)]
struct DataDir {
    /// Data dir of the controller.
    #[arg(
        long = "data-dir",
        env = "MIG_CONTROLLER_DATA_DIR",
        default_value = "./controller_data"
    )]
    path: PathBuf,
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Create a token; it is printed once, on standard output, and never stored.
    Create {
        #[command(flatten)]
        data: DataDir,
        /// Who or what the token is for (letters, digits, `.`, `_`, `-`).
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: Role,
        /// Expire the token after this many days (default: never).
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        data: DataDir,
    },
    /// Revoke a token by id; it stops working at once.
    Revoke {
        #[command(flatten)]
        data: DataDir,
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum EnrollmentTokenCmd {
    /// Mint a token for one VM id and pool; printed once on standard output, never stored.
    Create {
        #[command(flatten)]
        data: DataDir,
        /// The VM that may use it.
        #[arg(long)]
        vm_id: String,
        /// The pool it enrolls the VM into.
        #[arg(long)]
        pool: String,
        /// Lifetime in seconds (at most 7 days).
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCmd {
    /// Create a CA, a server certificate for the given names, and optionally client
    /// certificates, as PEM files in a folder.
    Init {
        /// Folder for ca.pem, ca-key.pem, server.pem, server-key.pem, <client>.pem, ...
        #[arg(long)]
        out: PathBuf,
        /// DNS names and IP addresses of the controller (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Also issue a client certificate with this name (repeatable), for mutual TLS.
        #[arg(long = "client")]
        clients: Vec<String>,
        /// Validity of the leaf certificates, days.
        #[arg(long, default_value_t = 90)]
        days: i64,
    },
    /// Issue one more client certificate from the CA in a folder made by `certs init`.
    Client {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 90)]
        days: i64,
    },
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}

fn main() -> ExitCode {
    // A flag or environment value that does not parse is an invalid setting like any other:
    // exit 78, not clap's 2, so a supervisor can tell it from a crash.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let _ = e.print();
            return match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_CONFIG),
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mig-controller: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Cmd::Serve(args) => match Settings::load(*args) {
            Ok(settings) => runtime.block_on(serve(settings)),
            Err(e) => {
                eprintln!("mig-controller: {:#}", anyhow::Error::from(e));
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        Cmd::Export { data, out } => {
            init_logging(LogFormat::Text, "warn");
            runtime.block_on(export(data.path, out))
        }
        Cmd::Token(cmd) => {
            init_logging(LogFormat::Text, "warn");
            runtime.block_on(token(cmd))
        }
        Cmd::EnrollmentToken(cmd) => {
            init_logging(LogFormat::Text, "warn");
            runtime.block_on(enrollment_token(cmd))
        }
        Cmd::Audit {
            data,
            limit,
            before,
            json,
        } => {
            init_logging(LogFormat::Text, "warn");
            runtime.block_on(audit(data.path, limit, before, json))
        }
        Cmd::Certs(cmd) => certs(cmd),
        Cmd::Openapi => print_openapi(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if is_config_error(&e) {
                eprintln!("mig-controller: {e:#}");
                tracing::error!("{e:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
            tracing::error!("{e:#}");
            eprintln!("mig-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `e` comes from a setting that cannot work (exit 78): the configuration itself,
/// or files it names that turn out unusable when the server starts (TLS, credential key).
fn is_config_error(e: &anyhow::Error) -> bool {
    use mig_controller::server::ServeError;
    e.downcast_ref::<ConfigError>().is_some()
        || matches!(
            e.downcast_ref::<ServeError>(),
            Some(ServeError::Tls(_) | ServeError::Key(_))
        )
}

/// Every VM holds a connection open, and the usual soft limit (1,024 open files) would cap the
/// fleet long before anything else does: raise it to the hard limit, as far as allowed.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "Raised the open-file limit"),
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "Cannot raise the open-file limit; each connected VM needs one")
            }
        },
        Ok((soft, _)) => tracing::info!(limit = soft, "Open-file limit (one per connected VM)"),
        Err(e) => tracing::warn!(error = %e, "Cannot read the open-file limit"),
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    init_logging(settings.log_format, &settings.log_level);
    raise_open_file_limit();
    if settings.auth_mode == AuthMode::Open {
        tracing::warn!(
            "AUTH MODE OPEN: nobody is asked who they are; anyone who can reach the listeners can read commands (including registration tokens) and act for any VM. Development only."
        );
    }
    if settings.dev_defaults {
        tracing::warn!(
            secret_file = %mig_controller::config::dev_secret_file(&settings.data_dir).display(),
            "No pools configured: every pool gets development defaults (runner URL from MIG_CONTROLLER_RUNNER_URL, group default, labels self-hosted,linux,x64, token from MIG_CONTROLLER_STATIC_TOKEN or a placeholder; agents enroll with the bootstrap secret in secret_file). Do not use this in production."
        );
    }
    if settings.tls.is_none() {
        tracing::warn!(
            "TLS is off: credentials and registration tokens cross the network in clear text. Set --tls-cert and --tls-key."
        );
    }
    let addr_file = settings.addr_file.clone();
    let (http, grpc) = server::bind(&settings).await?;
    let running = server::start(settings, http, grpc).await?;
    if let Some(path) = addr_file {
        let doc = serde_json::json!({
            "http_addr": running.http_addr.to_string(),
            "grpc_addr": running.grpc_addr.to_string(),
            "metrics_addr": running.metrics_addr.map(|a| a.to_string()),
        });
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, doc.to_string())
            .with_context(|| format!("failed to write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    let stop = running.shutdown_token();
    tokio::spawn(async move {
        wait_for_signal().await;
        stop.cancel();
    });
    running.run_until_stopped().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                _ = term.recv() => tracing::info!("SIGTERM received"),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "Cannot watch SIGTERM; only SIGINT stops the controller");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn export(data_dir: PathBuf, out: PathBuf) -> anyhow::Result<()> {
    if !data_dir.join("controller.db").exists() {
        anyhow::bail!("no controller store in {}", data_dir.display());
    }
    let store = mig_controller::store::Store::open_sqlite(&data_dir)
        .await
        .context("failed to open the store")?;
    let summary = mig_controller::export::export(&store, &out).await?;
    store.close().await;
    eprintln!(
        "Exported {} VMs ({} files) to {}",
        summary.vms,
        summary.files,
        out.display()
    );
    Ok(())
}

async fn open_store(data_dir: &std::path::Path) -> anyhow::Result<Store> {
    Store::open_sqlite(data_dir)
        .await
        .with_context(|| format!("failed to open the store in {}", data_dir.display()))
}

fn local_actor() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// The local CLI as the audit log names it.
fn by(actor: &str, now: i64) -> local::Actor<'_> {
    local::Actor {
        name: actor,
        remote: Some("local"),
        now,
    }
}

#[allow(clippy::print_stdout)]
async fn token(cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create {
            data,
            name,
            role,
            expires_in_days,
        } => {
            let store = open_store(&data.path).await?;
            let now = chrono::Utc::now().timestamp_millis();
            let expires = expires_in_days.map(|d| now + i64::from(d) * 86_400_000);
            let actor = local_actor();
            let minted =
                local::create_operator_token(&store, by(&actor, now), &name, role, expires).await?;
            store.close().await;
            eprintln!(
                "Created {role} token {} for {name:?}. It is shown once; store it now:",
                minted.record.id
            );
            println!("{}", minted.token);
        }
        TokenCmd::List { data } => {
            let store = open_store(&data.path).await?;
            let tokens = store.operator_tokens_list().await?;
            store.close().await;
            println!(
                "{:<18} {:<20} {:<10} {:<20} {:<20} STATE",
                "ID", "NAME", "ROLE", "CREATED", "EXPIRES"
            );
            let now = chrono::Utc::now().timestamp_millis();
            for t in tokens {
                let state = if t.revoked_at.is_some() {
                    "revoked"
                } else if t.expires_at.is_some_and(|e| e <= now) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{:<18} {:<20} {:<10} {:<20} {:<20} {state}",
                    t.id,
                    t.name,
                    t.role.as_str(),
                    when(t.created_at),
                    t.expires_at.map(when).unwrap_or_else(|| "never".into()),
                );
            }
        }
        TokenCmd::Revoke { data, id } => {
            let store = open_store(&data.path).await?;
            let now = chrono::Utc::now().timestamp_millis();
            let actor = local_actor();
            let revoked = local::revoke_operator_token(&store, by(&actor, now), &id).await?;
            store.close().await;
            if !revoked {
                anyhow::bail!("no active token with id {id:?}");
            }
            eprintln!("Revoked token {id}.");
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn enrollment_token(cmd: EnrollmentTokenCmd) -> anyhow::Result<()> {
    let EnrollmentTokenCmd::Create {
        data,
        vm_id,
        pool,
        ttl_secs,
    } = cmd;
    miglet_proto::ids::validate_vm_id(&vm_id)?;
    miglet_proto::ids::validate_id("pool", &pool)?;
    let store = open_store(&data.path).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let actor = local_actor();
    let minted =
        local::create_enrollment_token(&store, by(&actor, now), &vm_id, &pool, ttl_secs).await?;
    store.close().await;
    eprintln!(
        "Created enrollment token {} for VM {vm_id:?} in pool {pool:?}, valid {ttl_secs} s and once. It is shown once:",
        minted.record.id
    );
    println!("{}", minted.token);
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn audit(
    data_dir: PathBuf,
    limit: u32,
    before: Option<i64>,
    json: bool,
) -> anyhow::Result<()> {
    let store = open_store(&data_dir).await?;
    let rows = store.audit_list(before, limit.clamp(1, 10_000)).await?;
    store.close().await;
    if json {
        for r in rows {
            println!("{}", serde_json::to_string(&r)?);
        }
        return Ok(());
    }
    println!(
        "{:<6} {:<20} {:<36} {:<24} {:<28} {:<16} OUTCOME",
        "SEQ", "WHEN (UTC)", "ACTOR", "ACTION", "TARGET", "FROM"
    );
    for r in rows {
        println!(
            "{:<6} {:<20} {:<36} {:<24} {:<28} {:<16} {}{}",
            r.seq,
            when(r.at),
            r.actor,
            r.action,
            r.target.unwrap_or_default(),
            r.remote_addr.unwrap_or_default(),
            r.outcome,
            r.detail.map(|d| format!(" ({d})")).unwrap_or_default(),
        );
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
fn print_openapi() -> anyhow::Result<()> {
    print!("{}", mig_controller::admin::openapi_text());
    Ok(())
}

fn certs(cmd: CertsCmd) -> anyhow::Result<()> {
    use mig_controller::pki;
    match cmd {
        CertsCmd::Init {
            out,
            hosts,
            clients,
            days,
        } => {
            if out.join("ca-key.pem").exists() {
                anyhow::bail!(
                    "{} already holds a CA; refusing to overwrite it",
                    out.display()
                );
            }
            let ca = pki::new_ca("miglet private CA", 3650)?;
            pki::write(&out, "ca", &ca)?;
            let server = pki::issue(&ca, pki::Usage::Server, &hosts, days)?;
            pki::write(&out, "server", &server)?;
            for name in &clients {
                let c = pki::issue(&ca, pki::Usage::Client, std::slice::from_ref(name), days)?;
                pki::write(&out, name, &c)?;
            }
            eprintln!(
                "Wrote ca.pem, server.pem (for {}){} with their -key.pem files to {}. Keep ca-key.pem offline.",
                hosts.join(", "),
                if clients.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", {}",
                        clients
                            .iter()
                            .map(|c| format!("{c}.pem"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                },
                out.display()
            );
        }
        CertsCmd::Client { dir, name, days } => {
            miglet_proto::ids::validate_id("name", &name)?;
            let ca = pki::read(&dir, "ca")?;
            let c = pki::issue(&ca, pki::Usage::Client, std::slice::from_ref(&name), days)?;
            pki::write(&dir, &name, &c)?;
            eprintln!("Wrote {name}.pem and {name}-key.pem to {}", dir.display());
        }
    }
    Ok(())
}
