//! `miglet`: the agent (default), or `miglet hook <kind>` as called by the runner's job hooks.

use clap::{Parser, Subcommand};
use miglet::agent::{self, LogControl};
use miglet::config::{
    AgentArgs, FileConfig, MetadataValues, Settings, auth_needs_gce_probe, fetch_metadata,
    metadata_base, wants_metadata,
};
use miglet::machine::{PostJobAction, exit_code};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, reload};

#[derive(Debug, Parser)]
#[command(
    name = "miglet",
    version,
    about = "MIGlet: runs one ephemeral GitHub Actions runner under the MIG controller"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    args: AgentArgs,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Called by the runner's job hooks; reports the job to the running agent.
    Hook {
        /// job-started or job-completed
        kind: String,
        #[arg(long)]
        inbox: PathBuf,
    },
}

fn filter_for(level: &str) -> EnvFilter {
    EnvFilter::try_new(format!(
        "{level},h2=warn,hyper=warn,tower=warn,reqwest=warn"
    ))
    .unwrap_or_else(|_| EnvFilter::new("info"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::Hook { kind, inbox }) = cli.command {
        miglet::hooks::run_hook(&kind, &inbox);
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("miglet: cannot start the async runtime: {e}");
            return ExitCode::from(exit_code::RUNNER_FAILED);
        }
    };
    rt.block_on(async_main(cli.args))
}

async fn async_main(args: AgentArgs) -> ExitCode {
    let file = match &args.config {
        Some(p) => match FileConfig::load(p) {
            Ok(f) => f,
            Err(e) => return config_error(e),
        },
        None => FileConfig::default(),
    };
    // Also asked when `auto` authentication must know whether this is a GCE VM.
    let meta = if wants_metadata(&args, &file) || auth_needs_gce_probe(&args, &file) {
        fetch_metadata(&metadata_base(&args, &file)).await
    } else {
        MetadataValues::default()
    };
    let mut settings =
        match Settings::resolve(&args, &file, &meta, nix::unistd::Uid::effective().is_root()) {
            Ok(s) => s,
            Err(e) => return config_error(e),
        };
    // On GCE (the metadata server answered), watch for preemption.
    if meta.instance_name.is_some() {
        settings.preemption_watch = Some(metadata_base(&args, &file));
    }

    let (filter, handle) = reload::Layer::new(filter_for(&settings.logging_level));
    let registry = tracing_subscriber::registry().with(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if settings.logging_json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .init();
    }
    let log: LogControl = Arc::new(move |level| {
        let _ = handle.reload(filter_for(level.as_str()));
    });
    tracing::info!(
        vm_id = %settings.vm_id,
        pool_id = %settings.pool_id,
        controller = %settings.controller_endpoint,
        grpc = settings.controller_grpc_endpoint.as_deref().unwrap_or("disabled"),
        version = agent::VERSION,
        "MIGlet starting"
    );
    if settings.runner_user.is_none() && nix::unistd::Uid::effective().is_root() {
        tracing::warn!(
            "The runner will run as root (runner user set empty); jobs get root on this VM"
        );
    }
    let download = settings
        .runner_download_url
        .as_deref()
        .zip(settings.runner_sha256.as_deref());
    if let Err(e) = miglet::runner::ensure_installed(&settings.runner_dir, download).await {
        tracing::error!(error = %e, "Runner installation unusable");
        eprintln!("miglet: {e}");
        return ExitCode::from(exit_code::CONFIG);
    }
    if let Err(reason) = miglet::runner::check_runner_user(
        settings.runner_user.as_deref(),
        nix::unistd::Uid::effective().is_root(),
    ) {
        tracing::error!(%reason, "Runner user missing");
        eprintln!("miglet: configuration error: {reason}");
        return ExitCode::from(exit_code::CONFIG);
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("miglet"));
    match agent::run(settings, log, exe).await {
        Ok(outcome) => {
            tracing::info!(code = outcome.code, post = ?outcome.post, "MIGlet finished");
            if outcome.post == PostJobAction::Poweroff {
                poweroff().await;
            }
            ExitCode::from(outcome.code)
        }
        Err(e) => {
            tracing::error!(error = %anyhow::Error::from(e), "MIGlet failed");
            ExitCode::from(exit_code::RUNNER_FAILED)
        }
    }
}

fn config_error(e: impl std::error::Error + Send + Sync + 'static) -> ExitCode {
    eprintln!("miglet: configuration error: {:#}", anyhow::Error::from(e));
    ExitCode::from(exit_code::CONFIG)
}

async fn poweroff() {
    tracing::info!("Powering off");
    for cmd in [
        &["systemctl", "poweroff"][..],
        &["shutdown", "-h", "now"][..],
    ] {
        if let Ok(s) = tokio::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .status()
            .await
            && s.success()
        {
            return;
        }
    }
    tracing::error!("Poweroff failed: neither systemctl poweroff nor shutdown worked");
}
