//! GitHub as the controller talks to it: where a pool's runners live (its [`Scope`]), how the
//! controller proves itself (a GitHub App or a PAT), and the REST calls it makes (registration
//! tokens, just-in-time runner configs, runner groups, listing and deleting runners).
//!
//! * [`api`]: one HTTP client per API base with the headers GitHub requires, typed errors
//!   ([`GitHubError`]), and the rate-limit rules (primary limit, `Retry-After`, secondary
//!   limits): a refused call blocks the client until GitHub says it may try again, so nothing
//!   hot-loops.
//! * [`app`]: GitHub App authentication: the app JWT and the installation token, cached and
//!   refreshed before it expires (and once after a 401).
//! * [`demand`]: the backstop poll of jobs, for webhooks that were lost.
//! * [`rules`]: the pure decisions (how a response is classified, when a cached token is due,
//!   the mint budget), each a function of `now`.

pub mod api;
pub mod app;
pub mod demand;
pub mod metrics;
pub mod rules;
pub mod source;
pub mod webhook;

use std::path::PathBuf;
use thiserror::Error;

/// Where a pool's runners are registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Org(String),
    Repo { owner: String, repo: String },
    Enterprise(String),
}

impl Scope {
    /// `/orgs/acme`, `/repos/acme/app` or `/enterprises/acme-corp`: the prefix of the scope's
    /// `actions/runners` paths.
    pub fn path(&self) -> String {
        match self {
            Scope::Org(o) => format!("/orgs/{o}"),
            Scope::Repo { owner, repo } => format!("/repos/{owner}/{repo}"),
            Scope::Enterprise(e) => format!("/enterprises/{e}"),
        }
    }

    /// Where a GitHub App's installation for this scope is found (enterprise runners cannot
    /// be managed by an App).
    pub fn installation_path(&self) -> Option<String> {
        match self {
            Scope::Enterprise(_) => None,
            other => Some(format!("{}/installation", other.path())),
        }
    }

    /// The runner groups of the scope: organizations and enterprises have them; a repository's
    /// runners are always in the default group (id 1).
    pub fn runner_groups_path(&self) -> Option<String> {
        match self {
            Scope::Repo { .. } => None,
            other => Some(format!("{}/actions/runner-groups", other.path())),
        }
    }

    /// The URL `config.sh --url` takes for this scope, on the web host of `api_url`
    /// (`https://api.github.com` → `https://github.com`; GHES `https://HOST/api/v3` →
    /// `https://HOST`).
    pub fn runner_url(&self, api_url: &str) -> String {
        let api = api_url.trim_end_matches('/');
        let web = if let Some(host) = api.strip_prefix("https://api.") {
            format!("https://{host}")
        } else if let Some(base) = api.strip_suffix("/api/v3") {
            base.to_owned()
        } else {
            api.to_owned()
        };
        match self {
            Scope::Org(o) => format!("{web}/{o}"),
            Scope::Repo { owner, repo } => format!("{web}/{owner}/{repo}"),
            Scope::Enterprise(e) => format!("{web}/enterprises/{e}"),
        }
    }
}

/// How the controller proves itself to GitHub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A GitHub App: its id, its private key (PEM file) and, optionally, the installation
    /// (found from the scope otherwise).
    App {
        app_id: u64,
        private_key_file: PathBuf,
        installation_id: Option<u64>,
    },
    /// A personal access token read from a file at every use.
    Pat { file: PathBuf },
}

/// What `register_runner` carries for a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// A just-in-time runner config (one runner, one job), minted per VM boot.
    #[default]
    Jit,
    /// A registration token for `config.sh`.
    Token,
}

#[derive(Debug, Error)]
pub enum GitHubError {
    /// GitHub refused for now (primary or secondary rate limit): try again after `retry_in_secs`.
    #[error("GitHub rate limit: {message}; retrying in {retry_in_secs} s")]
    RateLimited { retry_in_secs: u64, message: String },
    /// The credential does not verify (after one refresh for an App).
    #[error("GitHub refused the credential (401): {0}; check the App id and key, or the PAT")]
    Unauthorized(String),
    /// The credential verifies but may not do this.
    #[error(
        "GitHub forbids this (403): {0}; check the App's or PAT's permissions (organization self-hosted runners, or repository administration)"
    )]
    Forbidden(String),
    #[error("not found on GitHub (404): {0}")]
    NotFound(String),
    /// 409/422: e.g. a runner with this name exists, or a busy runner cannot be deleted.
    #[error("GitHub rejected the request ({status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("GitHub answered {status}: {message}")]
    Server { status: u16, message: String },
    #[error("GitHub could not be reached: {0}")]
    Transport(String),
    #[error("GitHub's answer is not what its API documents: {0}")]
    BadAnswer(String),
    #[error("{0}")]
    Config(String),
}

impl GitHubError {
    /// Worth trying again soon by itself (5xx, timeouts); rate limits carry their own wait.
    pub fn is_transient(&self) -> bool {
        matches!(self, GitHubError::Server { .. } | GitHubError::Transport(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_paths_and_runner_urls() {
        let org = Scope::Org("acme".into());
        let repo = Scope::Repo {
            owner: "acme".into(),
            repo: "app".into(),
        };
        let ent = Scope::Enterprise("acme-corp".into());
        assert_eq!(org.path(), "/orgs/acme");
        assert_eq!(
            repo.installation_path().as_deref(),
            Some("/repos/acme/app/installation")
        );
        assert_eq!(ent.installation_path(), None);
        assert_eq!(repo.runner_groups_path(), None);
        assert_eq!(
            org.runner_groups_path().as_deref(),
            Some("/orgs/acme/actions/runner-groups")
        );
        assert_eq!(
            org.runner_url("https://api.github.com"),
            "https://github.com/acme"
        );
        assert_eq!(
            repo.runner_url("https://ghe.example.com/api/v3/"),
            "https://ghe.example.com/acme/app"
        );
        assert_eq!(
            ent.runner_url("https://api.github.com"),
            "https://github.com/enterprises/acme-corp"
        );
        // A stand-in on loopback keeps its own base.
        assert_eq!(
            org.runner_url("http://127.0.0.1:9"),
            "http://127.0.0.1:9/acme"
        );
    }
}
