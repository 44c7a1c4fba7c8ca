//! Where registration config comes from: per-pool runner settings plus a token source.
//!
//! [`TokenSource`] is the seam for GitHub App / PAT minting (a later issue). Today there are
//! two sources: a static token from the config, and a token file re-read on every use (so a
//! sidecar can rotate it).

use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// A registration token with its expiry. `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedToken {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("token", &"[REDACTED]")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

#[derive(Debug, Error)]
pub enum TokenError {
    #[error("failed to read token file {path}")]
    ReadFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {path} is empty")]
    EmptyFile { path: String },
    #[error("no registration config for pool {0:?}")]
    UnknownPool(String),
    /// The source's own failure (e.g. GitHub's answer), with its cause.
    #[error(transparent)]
    Remote(Box<dyn std::error::Error + Send + Sync>),
    /// The pool's mint budget is spent for now; the registration waits its turn.
    #[error("the pool's GitHub mint budget is spent; next mint in {0} ms")]
    Budget(i64),
}

/// The runner a `register_runner` is for.
#[derive(Debug, Clone, Copy)]
pub struct RunnerRequest<'a> {
    /// Unique per VM boot.
    pub runner_name: &'a str,
    pub labels: &'a [String],
    pub work_folder: &'a str,
}

/// What a runner registers with.
#[derive(Clone, PartialEq, Eq)]
pub enum Registration {
    /// A registration token for `config.sh`.
    Token(IssuedToken),
    /// A just-in-time runner config (`run.sh --jitconfig`), for one runner GitHub already
    /// knows by `runner_id`.
    Jit {
        config: String,
        runner_id: u64,
        expires_at: DateTime<Utc>,
    },
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Registration::Token(t) => t.fmt(f),
            Registration::Jit {
                runner_id,
                expires_at,
                ..
            } => f
                .debug_struct("Jit")
                .field("config", &"[REDACTED]")
                .field("runner_id", runner_id)
                .field("expires_at", expires_at)
                .finish(),
        }
    }
}

/// How a pool's minting has been going, for operators (the admin API's pool view).
#[derive(
    Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct SourceStatus {
    /// When a registration was last minted (Unix ms).
    pub last_ok_at: Option<i64>,
    /// The last failure to mint and when (Unix ms); cleared by the next success.
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
}

/// Something about a pool an operator must act on (e.g. a runner version GitHub no longer
/// accepts), with the VM that showed it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct PoolAlert {
    /// When it was last seen (Unix ms).
    pub at: i64,
    pub vm_id: String,
    pub message: String,
}

/// What removing a runner on GitHub came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    Deleted,
    /// GitHub no longer knew it.
    Gone,
    /// GitHub refused: it is running a job.
    Busy,
}

/// What one backstop poll pass asks (GitHub sources answer it; see `github::demand`).
#[derive(Debug, Clone, Default)]
pub struct PollQuery {
    /// Stored jobs to look up, most urgent first: (repository, job id).
    pub check: Vec<(String, i64)>,
    /// Repositories the pools' jobs came from, most recent first.
    pub seen: Vec<String>,
    /// Calls the pass may make in all.
    pub max_calls: usize,
}

/// What one pass learned.
#[derive(Debug, Clone, Default)]
pub struct PollReport {
    /// Jobs as GitHub reports them (each once).
    pub jobs: Vec<crate::lifecycle::JobUpdate>,
    /// Checked jobs GitHub no longer knows (404).
    pub vanished: Vec<i64>,
    pub calls: usize,
    /// Why the pass stopped before it was done (a rate limit, an error), if it did.
    pub stopped: Option<String>,
}

impl PollReport {
    /// Keeps `job`, replacing an earlier answer about the same job.
    pub fn add(&mut self, job: crate::lifecycle::JobUpdate) {
        match self.jobs.iter_mut().find(|j| j.job_id == job.job_id) {
            Some(known) => *known = job,
            None => self.jobs.push(job),
        }
    }
}

/// A backstop poll's report; `None` from a source that cannot ask GitHub about jobs.
pub type PollFuture<'a> = Pin<Box<dyn Future<Output = Option<PollReport>> + Send + 'a>>;

pub type RunnersFuture<'a> = Pin<
    Box<
        dyn Future<Output = Result<Option<Vec<crate::lifecycle::GitHubRunner>>, TokenError>>
            + Send
            + 'a,
    >,
>;
pub type RemoveFuture<'a> = Pin<Box<dyn Future<Output = Result<Removed, TokenError>> + Send + 'a>>;

pub type RegistrationFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Registration, TokenError>> + Send + 'a>>;

pub type TokenFuture<'a> =
    Pin<Box<dyn Future<Output = Result<IssuedToken, TokenError>> + Send + 'a>>;

/// Produces registration tokens for one pool.
pub trait TokenSource: Send + Sync + fmt::Debug {
    /// A token to hand out at `now` (the controller's time). Called once per delivery of a
    /// `register_runner`, right before it goes out, so a minted token is as fresh as it can be.
    fn registration_token(&self, now: DateTime<Utc>) -> TokenFuture<'_>;

    /// How long a `register_runner` for this source stays deliverable once queued: the
    /// lifetime of the tokens it issues. A delivery never carries a token past either.
    fn lifetime(&self) -> Duration;

    /// What the runner of `request` registers with at `now`: by default a registration
    /// token; a GitHub source in JIT mode mints the runner itself.
    fn registration<'a>(
        &'a self,
        request: RunnerRequest<'a>,
        now: DateTime<Utc>,
    ) -> RegistrationFuture<'a> {
        let _ = request;
        Box::pin(async move { self.registration_token(now).await.map(Registration::Token) })
    }

    /// Tells the source this controller installation's id (from its data dir), for what it
    /// registers on GitHub.
    fn bind_installation(&self, installation_id: &str) {
        let _ = installation_id;
    }

    /// How minting has been going (`None` for a source with nothing to report).
    fn status(&self) -> Option<SourceStatus> {
        None
    }

    /// The runners on GitHub this controller registered for the source's scope (those with
    /// its label); `None` when the source does not manage runners (a static token).
    fn our_runners(&self) -> RunnersFuture<'_> {
        Box::pin(async { Ok(None) })
    }

    /// Removes a runner on GitHub by id.
    fn remove_runner(&self, runner_id: u64) -> RemoveFuture<'_> {
        let _ = runner_id;
        Box::pin(async { Ok(Removed::Gone) })
    }

    /// Removes our runner named `name`: by `id` when it is known (remembered from its
    /// mint), else found by name among the scope's runners that carry our label. A runner
    /// GitHub reports busy is left alone.
    fn remove_runner_named<'a>(&'a self, name: &'a str, id: Option<u64>) -> RemoveFuture<'a> {
        let _ = (name, id);
        Box::pin(async { Ok(Removed::Gone) })
    }

    /// The label that marks this controller's runners, for a source that registers runners
    /// it will clean up (`None`: the source does not manage runners). A registration token
    /// carries it in the command's labels, with the runner's name.
    fn runner_label(&self) -> Option<String> {
        None
    }

    /// Pools whose sources answer the same key share one backstop poll (same API and
    /// scope); `None` for a source that cannot poll (a static token).
    fn poll_key(&self) -> Option<String> {
        None
    }

    /// One backstop poll pass.
    fn poll_jobs<'a>(&'a self, query: &'a PollQuery) -> PollFuture<'a> {
        let _ = query;
        Box::pin(async { None })
    }

    /// Checked once at start-up, so that a source that cannot work stops the controller
    /// with a clear message instead of failing every registration later.
    fn check_at_start(&self) -> Result<(), TokenError> {
        Ok(())
    }
}

/// A fixed token, treated as valid for `ttl` from each issue.
pub struct StaticToken {
    token: String,
    ttl: Duration,
}

impl StaticToken {
    pub fn new(token: String, ttl: Duration) -> StaticToken {
        StaticToken { token, ttl }
    }
}

impl fmt::Debug for StaticToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticToken")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn expiry(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(1))
}

impl TokenSource for StaticToken {
    fn lifetime(&self) -> Duration {
        self.ttl
    }

    fn registration_token(&self, now: DateTime<Utc>) -> TokenFuture<'_> {
        let issued = IssuedToken {
            token: self.token.clone(),
            expires_at: expiry(now, self.ttl),
        };
        Box::pin(async move { Ok(issued) })
    }
}

/// A token read from a file (whitespace-trimmed) at every use.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    ttl: Duration,
}

impl TokenFile {
    pub fn new(path: PathBuf, ttl: Duration) -> TokenFile {
        TokenFile { path, ttl }
    }
}

impl TokenSource for TokenFile {
    fn lifetime(&self) -> Duration {
        self.ttl
    }

    fn check_at_start(&self) -> Result<(), TokenError> {
        let path = self.path.display().to_string();
        let text = std::fs::read_to_string(&self.path).map_err(|source| TokenError::ReadFile {
            path: path.clone(),
            source,
        })?;
        if text.trim().is_empty() {
            return Err(TokenError::EmptyFile { path });
        }
        Ok(())
    }

    fn registration_token(&self, now: DateTime<Utc>) -> TokenFuture<'_> {
        Box::pin(async move {
            let path = self.path.display().to_string();
            let text = tokio::fs::read_to_string(&self.path)
                .await
                .map_err(|source| TokenError::ReadFile {
                    path: path.clone(),
                    source,
                })?;
            let token = text.trim();
            if token.is_empty() {
                return Err(TokenError::EmptyFile { path });
            }
            Ok(IssuedToken {
                token: token.to_owned(),
                expires_at: expiry(now, self.ttl),
            })
        })
    }
}

/// Runner settings and token source of one pool.
#[derive(Debug, Clone)]
pub struct PoolRegistration {
    pub runner_url: String,
    pub runner_group: String,
    pub labels: Vec<String>,
    pub token: Arc<dyn TokenSource>,
    /// How the pool's VMs prove their identity.
    pub enrollment: crate::auth::enroll::PoolEnrollment,
    /// Set when the controller creates and deletes the pool's VMs (`[pools.<id>.provider]`);
    /// otherwise someone else creates them and the controller watches.
    pub scaling: Option<crate::provider::PoolScaling>,
}

/// Registration config by pool id, with an optional fallback for pools not listed.
#[derive(Debug, Clone, Default)]
pub struct Pools {
    by_id: HashMap<String, PoolRegistration>,
    fallback: Option<PoolRegistration>,
}

impl Pools {
    pub fn new(
        by_id: HashMap<String, PoolRegistration>,
        fallback: Option<PoolRegistration>,
    ) -> Pools {
        Pools { by_id, fallback }
    }

    pub fn get(&self, pool_id: &str) -> Result<&PoolRegistration, TokenError> {
        self.by_id
            .get(pool_id)
            .or(self.fallback.as_ref())
            .ok_or_else(|| TokenError::UnknownPool(pool_id.to_owned()))
    }

    /// A test: does pool `id`'s runner config carry `label`?
    pub fn with_label<'a>(&'a self, label: &'a str) -> impl Fn(&str) -> bool + 'a {
        move |pool| {
            self.get(pool)
                .is_ok_and(|r| r.labels.iter().any(|l| l == label))
        }
    }

    /// Every pool's id and settings; the fallback is listed as `"*"`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &PoolRegistration)> {
        self.by_id
            .iter()
            .map(|(id, p)| (id.as_str(), p))
            .chain(self.fallback.as_ref().map(|p| ("*", p)))
    }

    /// Does any pool mint its registrations on GitHub (a source that reports its minting)?
    pub fn any_github(&self) -> bool {
        self.by_id
            .values()
            .chain(self.fallback.as_ref())
            .any(|p| p.token.status().is_some())
    }

    /// Does any pool have a provider (the controller creates its VMs)?
    pub fn any_scaled(&self) -> bool {
        self.by_id.values().any(|p| p.scaling.is_some())
    }

    /// Does any pool enroll VMs with GCE identity tokens?
    pub fn any_gce(&self) -> bool {
        self.by_id
            .values()
            .chain(self.fallback.as_ref())
            .any(|p| p.enrollment.gce.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn token_file_is_reread_and_trimmed() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("token");
        std::fs::write(&path, "  first\n")?;
        let src = TokenFile::new(path.clone(), Duration::from_secs(60));
        assert_eq!(src.registration_token(Utc::now()).await?.token, "first");
        std::fs::write(&path, "second")?;
        let t = src.registration_token(Utc::now()).await?;
        assert_eq!(t.token, "second");
        assert!(t.expires_at > Utc::now());
        assert!(!format!("{t:?}").contains("second"));
        std::fs::write(&path, "\n")?;
        assert!(matches!(
            src.registration_token(Utc::now()).await,
            Err(TokenError::EmptyFile { .. })
        ));
        Ok(())
    }

    #[test]
    fn pools_fall_back() {
        let reg = |url: &str| PoolRegistration {
            runner_url: url.into(),
            runner_group: "default".into(),
            labels: vec![],
            token: Arc::new(StaticToken::new("t".into(), Duration::from_secs(1))),
            scaling: None,
            enrollment: Default::default(),
        };
        let pools = Pools::new([("a".to_owned(), reg("A"))].into(), None);
        assert!(pools.get("b").is_err());
        let pools = Pools::new([("a".to_owned(), reg("A"))].into(), Some(reg("ANY")));
        assert_eq!(
            pools.get("a").map(|p| p.runner_url.as_str()).ok(),
            Some("A")
        );
        assert_eq!(
            pools.get("b").map(|p| p.runner_url.as_str()).ok(),
            Some("ANY")
        );
    }
}
