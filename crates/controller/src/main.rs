//! `mig-controller`: `serve` runs the controller; `export` writes the sample controller's
//! folder layout from a data dir.

use anyhow::Context;
use clap::{Parser, Subcommand};
use mig_controller::config::{ConfigError, LogFormat, ServeArgs, Settings};
use mig_controller::server;
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
    /// Write every stored VM's data as the sample controller's per-VM JSON files.
    Export {
        /// Data dir of the controller.
        #[arg(
            long,
            env = "MIG_CONTROLLER_DATA_DIR",
            default_value = "./controller_data"
        )]
        data_dir: PathBuf,
        /// Folder to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
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
    let cli = Cli::parse();
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
        Cmd::Export { data_dir, out } => {
            init_logging(LogFormat::Text, "warn");
            runtime.block_on(export(data_dir, out))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.downcast_ref::<ConfigError>().is_some() {
                eprintln!("mig-controller: {e:#}");
                return ExitCode::from(EXIT_CONFIG);
            }
            tracing::error!("{e:#}");
            eprintln!("mig-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    init_logging(settings.log_format, &settings.log_level);
    if settings.dev_defaults {
        tracing::warn!(
            "No pools configured: every pool gets development defaults (runner URL from MIG_CONTROLLER_RUNNER_URL, group default, labels self-hosted,linux,x64, token from MIG_CONTROLLER_STATIC_TOKEN or a placeholder). Do not use this in production."
        );
    }
    let addr_file = settings.addr_file.clone();
    let (http, grpc) = server::bind(&settings).await?;
    let running = server::start(settings, http, grpc).await?;
    if let Some(path) = addr_file {
        let doc = serde_json::json!({
            "http_addr": running.http_addr.to_string(),
            "grpc_addr": running.grpc_addr.to_string(),
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
