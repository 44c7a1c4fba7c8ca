//! `miglet-sim`: the stand-ins as processes, for demos and benchmarks.
//!
//! * `miglet-sim github --token T [--addr 127.0.0.1:0] [--addr-file F] [--job NAME:RESULT:MS]...`
//!   serves the fake GitHub; the jobs are queued at start.
//! * `miglet-sim install-runner DIR`: installs the runner stand-in (with
//!   `fake-runner-listener` from next to this binary) into DIR.
//! * `miglet-sim demo [--dir D] [--jobs-per-minute N] ...`: the whole fleet on this
//!   machine (see `demo.rs`).

mod bench;
mod demo;

use anyhow::Context;
use miglet_sim::github::{FakeGitHub, Job};
use std::path::PathBuf;

fn usage() -> anyhow::Error {
    anyhow::anyhow!(
        "usage: miglet-sim github --token T [--addr A] [--addr-file F] [--job NAME:RESULT:MS]... | miglet-sim install-runner DIR | miglet-sim demo [--help] | miglet-sim scale-bench [--help]"
    )
}

#[derive(clap::Parser)]
#[command(name = "miglet-sim demo", about = "The whole fleet on this machine")]
struct DemoCli {
    #[command(flatten)]
    args: demo::DemoArgs,
}

#[derive(clap::Parser)]
#[command(
    name = "miglet-sim scale-bench",
    about = "Queue time on cold and warm local pools, and 0 to N VMs"
)]
struct BenchCli {
    #[command(flatten)]
    args: bench::BenchArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("demo") => {
            use clap::Parser;
            let cli = DemoCli::parse_from(std::env::args().skip(1));
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "warn,mig_controller::app::scaler=info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            demo::run(cli.args).await
        }
        Some("scale-bench") => {
            use clap::Parser;
            let cli = BenchCli::parse_from(std::env::args().skip(1));
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "error".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            bench::run(cli.args).await
        }
        Some("install-runner") => {
            let dir = PathBuf::from(args.get(1).ok_or_else(usage)?);
            let me = std::env::current_exe()?;
            let listener = me.with_file_name("fake-runner-listener");
            anyhow::ensure!(
                listener.exists(),
                "{} not found: build it with cargo build -p miglet-sim",
                listener.display()
            );
            miglet_sim::runner_dir::install(&dir, &listener)
                .with_context(|| format!("installing into {}", dir.display()))?;
            Ok(())
        }
        Some("github") => {
            let mut tokens = Vec::new();
            let mut addr = "127.0.0.1:0".to_owned();
            let mut addr_file = None;
            let mut jobs = Vec::new();
            let mut it = args.iter().skip(1);
            while let Some(a) = it.next() {
                let v = it.next().ok_or_else(usage)?;
                match a.as_str() {
                    "--token" => tokens.push(v.clone()),
                    "--addr" => addr = v.clone(),
                    "--addr-file" => addr_file = Some(PathBuf::from(v)),
                    "--job" => {
                        let mut p = v.splitn(3, ':');
                        jobs.push(Job {
                            name: p.next().unwrap_or("job").to_owned(),
                            result: p.next().unwrap_or("Succeeded").to_owned(),
                            duration_ms: p.next().and_then(|m| m.parse().ok()).unwrap_or(1000),
                            run_id: "1".into(),
                            repository: "demo/repo".into(),
                            ..Job::default()
                        });
                    }
                    _ => return Err(usage()),
                }
            }
            anyhow::ensure!(!tokens.is_empty(), "at least one --token is needed");
            let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
            let gh = FakeGitHub::new(&refs);
            for j in jobs {
                gh.enqueue_job(j);
            }
            let listener = tokio::net::TcpListener::bind(&addr).await?;
            let (bound, task) = gh.serve(listener).await?;
            eprintln!("fake GitHub on http://{bound}");
            if let Some(f) = addr_file {
                std::fs::write(&f, bound.to_string())?;
            }
            tokio::select! {
                _ = task => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            Ok(())
        }
        _ => Err(usage()),
    }
}
