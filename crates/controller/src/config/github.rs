//! `[pools.<id>.github]`: a pool's GitHub scope and credentials, checked at start (a wrong
//! key file or a scope an App cannot manage stops the controller with exit 78), and one
//! shared account (client, credential, mint budget) per App or PAT.

use super::*;
use crate::github::api::Api;
use crate::github::app::{AppAuth, Auth, load_key};
use crate::github::rules::MintBudget;
use crate::github::source::{Account, GitHubSource};
use crate::github::{Credentials, Mode, Scope};

/// Mints per minute per App or PAT unless configured: under GitHub's secondary limit on
/// POSTs to one endpoint (about 180 a minute), with room for the rest.
const DEFAULT_MINT_BUDGET: u32 = 150;

/// Accounts by API and credential, so pools that share an App share its client, token
/// cache and budget; all record into one set of metrics.
pub(super) struct Accounts {
    by_key: HashMap<(String, String), Arc<Account>>,
    metrics: crate::github::metrics::GitHubMetrics,
}

impl Accounts {
    pub(super) fn new(metrics: crate::github::metrics::GitHubMetrics) -> Accounts {
        Accounts {
            by_key: HashMap::new(),
            metrics,
        }
    }
}

fn invalid(name: String, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        reason: reason.into(),
    }
}

/// The scope: exactly one of `org`, `repo` (`owner/name`), `enterprise`.
fn scope(name: &str, g: &GitHubConfig) -> Result<Scope, ConfigError> {
    let id = |field: &'static str, v: &str| {
        miglet_proto::ids::validate_id(field, v)
            .map(|_| v.to_owned())
            .map_err(|e| invalid(format!("{name}.github.{field}"), e.to_string()))
    };
    match (&g.org, &g.repo, &g.enterprise) {
        (Some(o), None, None) => Ok(Scope::Org(id("org", o)?)),
        (None, Some(r), None) => {
            let Some((owner, repo)) = r.split_once('/') else {
                return Err(invalid(
                    format!("{name}.github.repo"),
                    format!("{r:?} is not owner/name"),
                ));
            };
            Ok(Scope::Repo {
                owner: id("repo", owner)?,
                repo: id("repo", repo)?,
            })
        }
        (None, None, Some(e)) => Ok(Scope::Enterprise(id("enterprise", e)?)),
        _ => Err(invalid(
            format!("{name}.github"),
            "set exactly one of org, repo (owner/name) or enterprise",
        )),
    }
}

/// The credentials: an App (`app_id` + `private_key_file`) or a PAT (`pat_file`).
fn credentials(name: &str, g: &GitHubConfig, scope: &Scope) -> Result<Credentials, ConfigError> {
    match (g.app_id, &g.private_key_file, &g.pat_file) {
        (Some(app_id), Some(key), None) => {
            if matches!(scope, Scope::Enterprise(_)) {
                return Err(invalid(
                    format!("{name}.github"),
                    "a GitHub App cannot manage enterprise runners; use pat_file",
                ));
            }
            Ok(Credentials::App {
                app_id,
                private_key_file: key.clone(),
                installation_id: g.installation_id,
            })
        }
        (None, None, Some(file)) => Ok(Credentials::Pat { file: file.clone() }),
        _ => Err(invalid(
            format!("{name}.github"),
            "set either app_id and private_key_file (a GitHub App) or pat_file (a PAT)",
        )),
    }
}

/// The shared account of these credentials on `api_url`, made on first use.
fn account(
    name: &str,
    api_url: &str,
    creds: &Credentials,
    scope: &Scope,
    budget: u32,
    accounts: &mut Accounts,
) -> Result<Arc<Account>, ConfigError> {
    let (key, label) = match creds {
        Credentials::App { app_id, .. } => (format!("app:{app_id}"), format!("app:{app_id}")),
        Credentials::Pat { file } => (format!("pat:{}", file.display()), "pat".to_owned()),
    };
    if let Some(a) = accounts.by_key.get(&(api_url.to_owned(), key.clone())) {
        return Ok(a.clone());
    }
    let clock = crate::clock::Clock::system();
    let auth = match creds {
        Credentials::App {
            app_id,
            private_key_file,
            installation_id,
        } => {
            let pem = load_key(private_key_file)
                .map_err(|e| invalid(format!("{name}.github.private_key_file"), e.to_string()))?;
            Auth::App(AppAuth::new(
                *app_id,
                pem,
                *installation_id,
                scope.clone(),
                clock.clone(),
            ))
        }
        Credentials::Pat { file } => Auth::Pat(file.clone()),
    };
    let api = Api::with_metrics(api_url, clock, accounts.metrics.clone(), &label)
        .map_err(|e| invalid(format!("{name}.github.api_url"), e.to_string()))?;
    let account = Arc::new(Account {
        api,
        auth,
        budget: std::sync::Mutex::new(MintBudget::new(budget)),
    });
    accounts
        .by_key
        .insert((api_url.to_owned(), key), account.clone());
    Ok(account)
}

/// A pool's GitHub token source and the runner URL of its scope.
pub(super) fn source(
    name: &str,
    g: &GitHubConfig,
    accounts: &mut Accounts,
) -> Result<(Arc<dyn TokenSource>, String), ConfigError> {
    let scope = scope(name, g)?;
    let creds = credentials(name, g, &scope)?;
    let api_url = g
        .api_url
        .clone()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "https://api.github.com".into());
    check_url(&format!("{name}.github.api_url"), &api_url)?;
    let mode = match g.registration.as_deref() {
        None | Some("jit") => Mode::Jit,
        Some("token") => Mode::Token,
        Some(other) => {
            return Err(invalid(
                format!("{name}.github.registration"),
                format!("{other:?} (jit, token)"),
            ));
        }
    };
    let budget = g.mint_budget_per_minute.unwrap_or(DEFAULT_MINT_BUDGET);
    if budget == 0 {
        return Err(invalid(
            format!("{name}.github.mint_budget_per_minute"),
            "must be at least 1",
        ));
    }
    let configured = g.controller_label.clone().filter(|l| !l.is_empty());
    let account = account(name, &api_url, &creds, &scope, budget, accounts)?;
    let runner_url = scope.runner_url(&api_url);
    let source = GitHubSource::new(
        account,
        scope,
        mode,
        g.runner_group.clone().filter(|n| !n.is_empty()),
        configured
            .clone()
            .unwrap_or_else(|| "mig-controller".into()),
        crate::clock::Clock::system(),
    );
    let source = if configured.is_some() {
        source
    } else {
        source.label_from_installation()
    };
    Ok((Arc::new(source), runner_url))
}
