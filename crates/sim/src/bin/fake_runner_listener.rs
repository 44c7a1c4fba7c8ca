//! Stand-in for the GitHub Actions runner's `bin/Runner.Listener` (see
//! `shared/research/actions-runner.md` §7). Commands `configure`, `remove`, `run`, `warmup`,
//! `--version`; the runner's flag grammar and `ACTIONS_RUNNER_INPUT_*` inputs; its output
//! lines, timestamps, files, exit codes, signal behaviour and job hooks. It talks to
//! `miglet_sim::github::FakeGitHub` at the `--url` host.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use miglet_sim::RUNNER_VERSION;
use miglet_sim::github::{Job, JobReport};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

const SECRET_INPUTS: &[&str] = &["token", "pat", "jitconfig", "windowslogonpassword"];

struct Args {
    commands: Vec<String>,
    flags: Vec<(String, Option<String>)>,
}

impl Args {
    /// The runner's grammar: leading words are commands; `--x value` (separate tokens);
    /// `--x` followed by another flag or nothing is a boolean; first occurrence wins.
    fn parse(raw: &[String]) -> Args {
        let mut commands = Vec::new();
        let mut flags: Vec<(String, Option<String>)> = Vec::new();
        let mut i = 0;
        while i < raw.len() {
            let a = &raw[i];
            if let Some(name) = a.strip_prefix("--") {
                let name = name.to_ascii_lowercase();
                let value = raw.get(i + 1).filter(|v| !v.starts_with('-')).cloned();
                if value.is_some() {
                    i += 1;
                }
                if !flags.iter().any(|(n, _)| *n == name) {
                    flags.push((name, value));
                }
            } else if flags.is_empty() {
                commands.push(a.to_ascii_lowercase());
            }
            i += 1;
        }
        Args { commands, flags }
    }

    fn value(&self, name: &str) -> Option<String> {
        self.flags
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.clone())
            .or_else(|| {
                std::env::var(format!(
                    "ACTIONS_RUNNER_INPUT_{}",
                    name.to_ascii_uppercase()
                ))
                .ok()
            })
            .filter(|v| !v.is_empty())
    }

    fn flag(&self, name: &str) -> bool {
        self.flags.iter().any(|(n, _)| n == name)
            || std::env::var(format!(
                "ACTIONS_RUNNER_INPUT_{}",
                name.to_ascii_uppercase()
            ))
            .ok()
            .as_deref()
                == Some("true")
    }

    fn warn_unknown(&self, command: &str, known: &[&str]) {
        let unknown: Vec<&str> = self
            .flags
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !known.contains(n))
            .collect();
        if !unknown.is_empty() {
            eprintln!(
                "Unrecognized command-line input arguments for command {command}: '{}'. For usage refer to: .\\config.cmd --help or ./config.sh --help",
                unknown.join(", ")
            );
        }
    }
}

/// A fault a test asks for, in `<runner root>/.sim-fault` (see [`miglet_sim::runner_dir`]):
/// the listener's next `run` exits with a code, or dies of a signal, at start or once a job
/// is running. The file is used up, so the restarted listener runs normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Exit(u8),
    Abort,
}

fn take_fault(dir: &Path) -> Option<(Fault, bool)> {
    let path = dir.join(miglet_sim::runner_dir::FAULT_FILE);
    let text = std::fs::read_to_string(&path).ok()?;
    let _ = std::fs::remove_file(&path);
    let text = text.trim();
    let (when, what) = text.split_once(':').unwrap_or(("start", text));
    let fault = match what {
        "abort" => Fault::Abort,
        code => Fault::Exit(code.parse().ok()?),
    };
    Some((fault, when == "mid-job"))
}

/// Carries out a fault: the exit code, or death by SIGABRT.
fn inflict(fault: Fault) -> u8 {
    match fault {
        Fault::Exit(code) => code,
        Fault::Abort => std::process::abort(),
    }
}

fn ts() -> String {
    chrono::Utc::now().format("%Y-%m-%d %H:%M:%SZ").to_string()
}

fn root() -> PathBuf {
    // bin/Runner.Listener -> the runner root.
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().and_then(Path::parent).map(Path::to_owned))
        .unwrap_or_else(|| PathBuf::from("."))
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Writes like .NET `File.WriteAllText(..., Encoding.UTF8)`: with a BOM.
fn write_bom_json(path: &Path, v: &Value) -> std::io::Result<()> {
    let mut bytes = vec![0xEF, 0xBB, 0xBF];
    bytes.extend(
        serde_json::to_string_pretty(v)
            .unwrap_or_default()
            .into_bytes(),
    );
    std::fs::write(path, bytes)
}

fn read_bom_json(path: &Path) -> Option<Value> {
    let bytes = std::fs::read(path).ok()?;
    let body = bytes
        .strip_prefix(&[0xEF, 0xBB, 0xBF][..])
        .unwrap_or(&bytes);
    serde_json::from_slice(body).ok()
}

/// `https://github.com/org` -> the fake's API base `scheme://host/api/v3`.
fn api_base(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split('/').next()?;
    Some(format!("{scheme}://{host}/api/v3"))
}

fn sim_base(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split('/').next()?;
    Some(format!("{scheme}://{host}/_sim"))
}

fn status_name(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        500 => "InternalServerError",
        _ => "Unknown",
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Error",
    }
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let args = Args::parse(&raw);
    if args.flag("version") {
        say(RUNNER_VERSION);
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("An error occurred: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match args.commands.first().map(String::as_str) {
        Some("configure") => rt.block_on(configure(&args)),
        Some("remove") => rt.block_on(remove(&args)),
        Some("run") | None => rt.block_on(run(&args)),
        Some("warmup") => 0,
        Some(other) => {
            eprintln!("An error occurred: unknown command {other}");
            1
        }
    };
    ExitCode::from(code)
}

async fn configure(args: &Args) -> u8 {
    args.warn_unknown(
        "configure",
        &[
            "url",
            "token",
            "pat",
            "name",
            "labels",
            "no-default-labels",
            "runnergroup",
            "work",
            "ephemeral",
            "disableupdate",
            "replace",
            "unattended",
        ],
    );
    let dir = root();
    say("");
    say("--------------------------------------------------------------------------------");
    say("|                     Self-hosted runner registration                          |");
    say("--------------------------------------------------------------------------------");
    if dir.join(".runner").exists() {
        eprintln!(
            "Cannot configure the runner because it is already configured. To reconfigure the runner, run 'config.cmd remove' or './config.sh remove' first."
        );
        return 1;
    }
    say("");
    say("# Authentication");
    say("");
    let Some(url) = args.value("url") else {
        eprintln!("Invalid configuration provided for url. Terminating unattended configuration.");
        return 1;
    };
    let Some(token) = args.value("token") else {
        eprintln!(
            "Invalid configuration provided for token. Terminating unattended configuration."
        );
        return 1;
    };
    let Some(api) = api_base(&url) else {
        eprintln!("Invalid configuration provided for url. Terminating unattended configuration.");
        return 1;
    };
    let client = reqwest::Client::new();
    let endpoint = format!("{api}/actions/runner-registration");
    let resp = client
        .post(&endpoint)
        .header("authorization", format!("RemoteAuth {token}"))
        .json(&json!({"url": url, "runner_event": "register"}))
        .send()
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let code = resp.status().as_u16();
    if !resp.status().is_success() {
        let body = resp.text().await.unwrap_or_default();
        eprintln!(
            "Http response code: {} from 'POST {endpoint}' (Request Id: {})",
            status_name(code),
            uuid::Uuid::new_v4()
        );
        eprintln!("{body}");
        eprintln!(
            "Response status code does not indicate success: {code} ({}).",
            reason(code)
        );
        return 1;
    }
    say("");
    say("√ Connected to GitHub");
    let rsa = dir.join(".credentials_rsaparams");
    let key = json!({"d": B64.encode(uuid::Uuid::new_v4().as_bytes()), "exponent": "AQAB", "modulus": B64.encode(uuid::Uuid::new_v4().as_bytes())});
    if write_bom_json(&rsa, &key).is_err()
        || std::fs::set_permissions(&rsa, std::fs::Permissions::from_mode(0o600)).is_err()
    {
        eprintln!("An error occurred: cannot write .credentials_rsaparams");
        return 1;
    }
    say("");
    say("# Runner Registration");
    say("");
    let name = args
        .value("name")
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "runner".into());
    let mut labels: Vec<String> = if args.flag("no-default-labels") {
        Vec::new()
    } else {
        vec!["self-hosted".into(), "Linux".into(), "X64".into()]
    };
    for l in args
        .value("labels")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        if !labels.iter().any(|x| x.eq_ignore_ascii_case(l)) {
            labels.push(l.to_owned());
        }
    }
    let group = args
        .value("runnergroup")
        .unwrap_or_else(|| "Default".into());
    let ephemeral = args.flag("ephemeral");
    let Some(sim) = sim_base(&url) else { return 1 };
    let add = client
        .post(format!("{sim}/runners"))
        .json(&json!({"name": name, "labels": labels, "group": group, "ephemeral": ephemeral, "url": url, "replace": args.flag("replace")}))
        .send()
        .await;
    match add.map(|r| r.status().as_u16()) {
        Ok(201) => {}
        Ok(409) => {
            say("A runner exists with the same name");
            eprintln!("A runner exists with the same name {name}.");
            return 1;
        }
        Ok(other) => {
            eprintln!("An error occurred: runner registration answered {other}");
            return 1;
        }
        Err(e) => {
            eprintln!("An error occurred: {e}");
            return 1;
        }
    }
    say("√ Runner successfully added");
    let creds = json!({"scheme": "OAuth", "data": {"clientId": uuid::Uuid::new_v4().to_string(), "authorizationUrl": format!("{sim}/oauth"), "requireFipsCryptography": "False"}});
    if write_bom_json(&dir.join(".credentials"), &creds).is_err() {
        return 1;
    }
    say("");
    say("# Runner settings");
    say("");
    let work = args.value("work").unwrap_or_else(|| "_work".into());
    let mut settings = json!({
        "agentId": 1,
        "agentName": name,
        "poolId": 1,
        "poolName": group,
        "serverUrl": sim,
        "gitHubUrl": url,
        "workFolder": work,
        "useV2Flow": true,
    });
    if ephemeral {
        settings["ephemeral"] = Value::Bool(true);
    }
    if args.flag("disableupdate") {
        settings["disableUpdate"] = Value::Bool(true);
    }
    if write_bom_json(&dir.join(".runner"), &settings).is_err() {
        return 1;
    }
    say("√ Settings Saved.");
    say("");
    0
}

fn remove_local_files(dir: &Path) {
    for (file, extra) in [
        (
            ".credentials",
            &[".credentials_migrated", ".credentials_rsaparams"][..],
        ),
        (".runner", &[".runner_migrated"][..]),
    ] {
        if dir.join(file).exists() {
            let _ = std::fs::remove_file(dir.join(file));
            say(&format!("√ Removed {file}"));
        } else {
            say(&format!("Does not exist. Skipping Removing {file}"));
        }
        for e in extra {
            let _ = std::fs::remove_file(dir.join(e));
        }
    }
}

async fn remove(args: &Args) -> u8 {
    let dir = root();
    say("");
    say("# Runner removal");
    say("");
    if !args.flag("local") {
        match read_bom_json(&dir.join(".runner")) {
            Some(settings) => {
                let name = settings["agentName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                if let Some(sim) = settings["gitHubUrl"].as_str().and_then(sim_base) {
                    let _ = reqwest::Client::new()
                        .post(format!("{sim}/runners/{name}/delete"))
                        .send()
                        .await;
                }
                say("");
                say("√ Runner removed successfully");
            }
            None => say(
                "Cannot connect to server, because config files are missing. Skipping removing runner from the server.",
            ),
        }
    }
    remove_local_files(&dir);
    0
}

/// Files of a `--jitconfig` blob: base64 of a JSON object {file name: base64 contents}.
fn apply_jit(dir: &Path, blob: &str) -> Result<(), String> {
    let json = B64.decode(blob.trim()).map_err(|e| e.to_string())?;
    let files: HashMap<String, String> =
        serde_json::from_slice(&json).map_err(|e| e.to_string())?;
    for (name, contents) in files {
        if name.contains('/') || name.contains("..") {
            return Err(format!("invalid file name {name}"));
        }
        let bytes = B64.decode(contents).map_err(|e| e.to_string())?;
        std::fs::write(dir.join(name), bytes).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `KEY=VALUE` lines of the runner root's `.env`, which the listener loads at start.
fn dot_env(dir: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join(".env"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        })
        .collect()
}

struct Diag {
    file: Option<std::fs::File>,
}

impl Diag {
    fn open(dir: &Path, host: &str) -> Diag {
        let d = dir.join("_diag");
        let _ = std::fs::create_dir_all(&d);
        let name = format!(
            "{host}_{}-utc.log",
            chrono::Utc::now().format("%Y%m%d-%H%M%S")
        );
        Diag {
            file: std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(d.join(name))
                .ok(),
        }
    }

    fn line(&mut self, source: &str, text: &str) {
        if let Some(f) = self.file.as_mut() {
            let _ = writeln!(
                f,
                "[{} INFO {source}] {text}",
                chrono::Utc::now().format("%Y-%m-%d %H:%M:%SZ")
            );
        }
    }
}

fn say_logged(diag: &mut Diag, line: &str) {
    say(line);
    diag.line("Terminal", &format!("WRITE LINE: {line}"));
}

async fn run(args: &Args) -> u8 {
    args.warn_unknown("run", &["once", "jitconfig", "startuptype"]);
    let dir = root();
    let fault = take_fault(&dir);
    if let Some((f, false)) = fault {
        return inflict(f);
    }
    if let Some(blob) = args.value("jitconfig")
        && let Err(e) = apply_jit(&dir, &blob)
    {
        eprintln!("{e}");
        return 1;
    }
    let Some(settings) = read_bom_json(&dir.join(".runner")) else {
        eprintln!(
            "An error occurred: Not configured. Run config.(sh/cmd) to configure the runner."
        );
        return 1;
    };
    let get = |k: &str| -> String {
        settings
            .as_object()
            .and_then(|o| o.iter().find(|(key, _)| key.eq_ignore_ascii_case(k)))
            .map(|(_, v)| {
                v.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string())
            })
            .unwrap_or_default()
    };
    let name = get("agentName");
    let url = get("gitHubUrl");
    let ephemeral = get("ephemeral") == "true";
    let work = dir.join(get("workFolder").trim_matches('"'));
    let Some(sim) = sim_base(&url) else {
        eprintln!("An error occurred: invalid gitHubUrl in .runner");
        return 1;
    };
    let env_file = dot_env(&dir);
    let mut diag = Diag::open(&dir, "Runner");
    let (Ok(mut sigint), Ok(mut sigterm)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("An error occurred: cannot install signal handlers");
        return 1;
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_default();
    if args.flag("once") {
        say(
            "Warning: '--once' is going to be deprecated in the future, please consider using '--ephemeral' during runner registration.",
        );
        say(
            "https://docs.github.com/en/actions/hosting-your-own-runners/autoscaling-with-self-hosted-runners#using-ephemeral-runners-for-autoscaling",
        );
    }
    say("");
    say("√ Connected to GitHub");
    say("");
    say_logged(
        &mut diag,
        &format!("Current runner version: '{RUNNER_VERSION}'"),
    );
    say_logged(&mut diag, &format!("{}: Listening for Jobs", ts()));
    let mut connect_error = false;
    loop {
        let job = tokio::select! {
            _ = sigint.recv() => { say("Exiting..."); return 0; }
            _ = sigterm.recv() => { say("Exiting..."); return 0; }
            r = client.get(format!("{sim}/runners/{name}/job")).send() => r,
        };
        let job: Job = match job {
            Ok(r) if r.status().as_u16() == 200 => match r.json().await {
                Ok(j) => j,
                Err(_) => continue,
            },
            Ok(r) if r.status().as_u16() == 404 => {
                say_logged(
                    &mut diag,
                    "The runner no longer exists on the server. Cleaning up local configuration.",
                );
                remove_local_files(&dir);
                return 0;
            }
            Ok(_) => {
                if connect_error {
                    connect_error = false;
                    say(&format!("{}: Runner reconnected.", ts()));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => {
                if !connect_error {
                    connect_error = true;
                    eprintln!(
                        "{}: Runner connect error: {e}. Retrying until reconnected.",
                        ts()
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if connect_error {
            connect_error = false;
            say(&format!("{}: Runner reconnected.", ts()));
        }
        say_logged(&mut diag, &format!("{}: Running job: {}", ts(), job.name));
        if let Some((f, true)) = fault {
            // Give the job-started hook time to report, as a crash mid-job would.
            tokio::time::sleep(Duration::from_millis(500)).await;
            return inflict(f);
        }
        let (result, stop) = run_job(
            &dir,
            &work,
            &name,
            &url,
            &job,
            &env_file,
            &mut sigint,
            &mut sigterm,
        )
        .await;
        say_logged(
            &mut diag,
            &format!("{}: Job {} completed with result: {result}", ts(), job.name),
        );
        let _ = client
            .post(format!("{sim}/reports"))
            .json(&JobReport {
                runner: name.clone(),
                name: job.name.clone(),
                result: result.clone(),
            })
            .send()
            .await;
        if stop {
            say("Exiting...");
            return 0;
        }
        if ephemeral || args.flag("once") {
            if ephemeral {
                let _ = client
                    .post(format!("{sim}/runners/{name}/delete"))
                    .send()
                    .await;
                remove_local_files(&dir);
            }
            return 0;
        }
    }
}

/// Runs one job: started hook, the job's "steps" (a sleep), completed hook. Returns the
/// result and whether a stop signal arrived (the job then ends `Canceled`).
#[allow(clippy::too_many_arguments)]
async fn run_job(
    dir: &Path,
    work: &Path,
    runner: &str,
    url: &str,
    job: &Job,
    env_file: &[(String, String)],
    sigint: &mut tokio::signal::unix::Signal,
    sigterm: &mut tokio::signal::unix::Signal,
) -> (String, bool) {
    let repo_name = job
        .repository
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("repo");
    let workspace = work.join(repo_name).join(repo_name);
    let _ = std::fs::create_dir_all(&workspace);
    let mut worker = Diag::open(dir, "Worker");
    worker.line(
        "Worker",
        &format!(
            "Job message: {{\"k\": \"run_id\", \"v\": \"{}\"}}",
            job.run_id
        ),
    );
    let server = url.split('/').take(3).collect::<Vec<_>>().join("/");
    let job_env: Vec<(String, String)> = vec![
        ("GITHUB_RUN_ID".into(), job.run_id.clone()),
        ("GITHUB_RUN_NUMBER".into(), "1".into()),
        ("GITHUB_RUN_ATTEMPT".into(), "1".into()),
        (
            "GITHUB_JOB".into(),
            if job.job_key.is_empty() {
                job.name.clone()
            } else {
                job.job_key.clone()
            },
        ),
        ("GITHUB_REPOSITORY".into(), job.repository.clone()),
        ("GITHUB_SHA".into(), job.sha.clone()),
        ("GITHUB_REF".into(), job.git_ref.clone()),
        ("GITHUB_WORKFLOW".into(), "CI".into()),
        ("GITHUB_EVENT_NAME".into(), "push".into()),
        ("GITHUB_SERVER_URL".into(), server),
        ("GITHUB_WORKSPACE".into(), workspace.display().to_string()),
        ("RUNNER_NAME".into(), runner.to_owned()),
        ("RUNNER_OS".into(), "Linux".into()),
        ("RUNNER_ARCH".into(), "X64".into()),
        ("RUNNER_ENVIRONMENT".into(), "self-hosted".into()),
        (
            "RUNNER_TRACKING_ID".into(),
            format!("github_{}", uuid::Uuid::new_v4()),
        ),
    ];
    let hook = |var: &str| -> Option<String> {
        std::env::var(var)
            .ok()
            .or_else(|| {
                env_file
                    .iter()
                    .find(|(k, _)| k == var)
                    .map(|(_, v)| v.clone())
            })
            .filter(|v| !v.is_empty())
    };
    let run_hook = |path: String, worker: &mut Diag| {
        let mut cmd = std::process::Command::new("bash");
        cmd.arg("-e").arg(&path).current_dir(&workspace);
        for (k, v) in env_file {
            cmd.env(k, v);
        }
        for (k, v) in &job_env {
            cmd.env(k, v);
        }
        for s in SECRET_INPUTS {
            cmd.env_remove(format!("ACTIONS_RUNNER_INPUT_{}", s.to_ascii_uppercase()));
        }
        match cmd.output() {
            Ok(out) => {
                worker.line("Worker", &String::from_utf8_lossy(&out.stdout));
                out.status.success()
            }
            Err(_) => false,
        }
    };
    let mut result = job.result.clone();
    if let Some(path) = hook("ACTIONS_RUNNER_HOOK_JOB_STARTED") {
        worker.line(
            "Worker",
            "A job started hook has been configured by the self-hosted runner administrator",
        );
        if !run_hook(path, &mut worker) {
            result = "Failed".into();
        }
    }
    let mut stop = false;
    if result != "Failed" || job.result == "Failed" {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(job.duration_ms)) => {}
            _ = sigint.recv() => { stop = true; result = "Canceled".into(); }
            _ = sigterm.recv() => { stop = true; result = "Canceled".into(); }
        }
    }
    if let Some(path) = hook("ACTIONS_RUNNER_HOOK_JOB_COMPLETED") {
        worker.line(
            "Worker",
            "A job completed hook has been configured by the self-hosted runner administrator",
        );
        let _ = run_hook(path, &mut worker);
    }
    (result, stop)
}
