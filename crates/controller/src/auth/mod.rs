//! Who is calling, and what they may do.
//!
//! Two kinds of caller:
//! * a **VM**, holding a credential minted by the controller at enrollment ([`credential`]),
//!   bound to one `vm_id` and pool; it proves its identity once per boot with a GCE instance
//!   identity token ([`gce`]) or its pool's bootstrap secret;
//! * an **operator**, holding an API token with a [`Role`] ([`operator`]); only a hash of it
//!   is stored.
//!
//! [`route`] classifies a request path and [`authorize`] decides, both pure, so the rules are
//! unit-tested without sockets. [`limits`] holds the per-VM and per-address rate limits.

pub mod credential;
pub mod enroll;
pub mod enrollment_token;
pub mod gce;
pub mod limits;
pub mod operator;
pub mod secret_token;

use axum::http;
use serde::{Deserialize, Serialize};

/// `authenticated` (the default) or `open` (development only: nobody is asked who they are).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    Authenticated,
    Open,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Authenticated => "authenticated",
            AuthMode::Open => "open",
        }
    }
}

pub use crate::model::Role;

/// A verified operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    pub token_id: String,
    pub name: String,
    pub role: Role,
}

impl Operator {
    /// How the operator appears in the audit log.
    pub fn actor(&self) -> String {
        format!("operator:{}({})", self.name, self.token_id)
    }
}

/// Whoever made a request, once verified. In `open` mode every caller is [`Principal::Open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Vm(credential::VmClaims),
    Operator(Operator),
    Open,
}

impl Principal {
    pub fn actor(&self) -> String {
        match self {
            Principal::Vm(c) => format!("vm:{}", c.vm_id),
            Principal::Operator(o) => o.actor(),
            Principal::Open => "anonymous (open mode)".into(),
        }
    }
}

/// What a request path is, for authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Needs no credential (`/health`, enrollment).
    Public,
    /// An agent endpoint of this VM.
    Vm(String),
    /// The operator API; `write` for anything but reads.
    Admin { write: bool },
    /// Not an endpoint we serve (answered 404 after authentication).
    Other,
}

/// Classifies `path` (and whether `method` changes state).
pub fn route(method: &http::Method, path: &str) -> Route {
    if path == "/health"
        || path == "/api/v1/enroll"
        // Authenticated by its HMAC signature, in the handler.
        || path == "/api/v1/github/webhook"
        || path == "/"
        || path == "/dashboard"
        || path.starts_with("/dashboard/")
    {
        return Route::Public;
    }
    if let Some(rest) = path.strip_prefix("/api/v1/vms/") {
        let vm = rest.split('/').next().unwrap_or_default();
        return Route::Vm(vm.to_owned());
    }
    if path.starts_with("/api/v1/admin/") || path == "/api/v1/admin" {
        let write = !matches!(
            *method,
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
        );
        return Route::Admin { write };
    }
    Route::Other
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// 401 / `UNAUTHENTICATED`.
    #[error("{0}")]
    Unauthenticated(String),
    /// 403 / `PERMISSION_DENIED`.
    #[error("{0}")]
    Forbidden(String),
}

/// May `who` use `route`? `who` is `None` when no credential came with the request.
pub fn authorize(route: &Route, who: Option<&Principal>) -> Result<(), Denied> {
    match (route, who) {
        // An unknown path is 404 for everyone: answering 401 would tell a prober nothing
        // useful either way, and a client with a typo deserves the real reason.
        (Route::Public | Route::Other, _) | (_, Some(Principal::Open)) => Ok(()),
        (_, None) => Err(Denied::Unauthenticated(
            "this endpoint needs a credential: Authorization: Bearer <token>".into(),
        )),
        (Route::Vm(vm), Some(Principal::Vm(c))) => {
            if c.vm_id == *vm {
                Ok(())
            } else {
                Err(Denied::Forbidden(format!(
                    "the credential of VM {:?} cannot act for VM {vm:?}",
                    c.vm_id
                )))
            }
        }
        (Route::Vm(_), Some(Principal::Operator(_))) => Err(Denied::Forbidden(
            "operator tokens cannot use agent endpoints".into(),
        )),
        (Route::Admin { write }, Some(Principal::Operator(o))) => {
            if *write && o.role != Role::Admin {
                Err(Denied::Forbidden(format!(
                    "operator {:?} has the {} role; this needs admin",
                    o.name, o.role
                )))
            } else {
                Ok(())
            }
        }
        (Route::Admin { .. }, Some(Principal::Vm(_))) => Err(Denied::Forbidden(
            "VM credentials cannot use the operator API".into(),
        )),
    }
}

/// The names a VM's message gives for itself; `None` or empty means not named.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Named<'a> {
    pub vm_id: Option<&'a str>,
    pub pool_id: Option<&'a str>,
    pub org_id: Option<&'a str>,
}

/// The pool and org the controller knows a VM by. The pool is fixed by the VM's first proven
/// identity; only an operator moves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNames {
    pub pool_id: String,
    pub org_id: String,
}

/// Why a VM's message was refused by [`check_names`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The message contradicts itself (open mode, where nobody proved anything): 400.
    #[error("{0}")]
    Inconsistent(String),
    /// The message, or the credential it came with, names someone else: 403.
    #[error("{0}")]
    Forbidden(String),
}

fn named(v: Option<&str>) -> Option<&str> {
    v.filter(|s| !s.is_empty())
}

/// The one rule every transport applies to every message a VM sends: may `caller` act for
/// `vm_id` with a message that names `named`, given what is `known` of the VM?
///
/// * A VM credential acts only for its own VM, only in its own pool, and only while that is
///   still the VM's pool (an operator may have moved the VM); a message naming another VM,
///   pool or org than the credential and the VM's record is refused, never stored under
///   other names.
/// * In open mode nobody proved anything: a message naming another VM than it is about is
///   inconsistent; pools are checked against the configuration by the caller.
pub fn check_names(
    caller: &Principal,
    vm_id: &str,
    message: &Named<'_>,
    known: Option<&VmNames>,
) -> Result<(), NameError> {
    let other_vm = named(message.vm_id).filter(|v| *v != vm_id);
    let claims = match caller {
        Principal::Open => {
            return match other_vm {
                Some(v) => Err(NameError::Inconsistent(format!(
                    "vm_id in the message ({v:?}) does not match the VM it is about ({vm_id:?})"
                ))),
                None => Ok(()),
            };
        }
        Principal::Operator(_) => {
            return Err(NameError::Forbidden(
                "operator tokens cannot act as a VM".into(),
            ));
        }
        Principal::Vm(c) => c,
    };
    if claims.vm_id != vm_id {
        return Err(NameError::Forbidden(format!(
            "the credential of VM {:?} cannot act for VM {vm_id:?}",
            claims.vm_id
        )));
    }
    if let Some(v) = other_vm {
        return Err(NameError::Forbidden(format!(
            "the credential of VM {vm_id:?} cannot send a message for VM {v:?}"
        )));
    }
    if let Some(p) = named(message.pool_id).filter(|p| *p != claims.pool_id) {
        return Err(NameError::Forbidden(format!(
            "the credential is for pool {:?}, not {p:?}",
            claims.pool_id
        )));
    }
    if let Some(k) = known {
        if k.pool_id != claims.pool_id {
            return Err(NameError::Forbidden(format!(
                "VM {vm_id:?} belongs to pool {:?}; a credential for pool {:?} cannot act for it (enroll with the proof of pool {:?})",
                k.pool_id, claims.pool_id, k.pool_id
            )));
        }
        if let Some(o) = named(message.org_id)
            && !k.org_id.is_empty()
            && o != k.org_id
        {
            return Err(NameError::Forbidden(format!(
                "VM {vm_id:?} belongs to org {:?}, not {o:?}",
                k.org_id
            )));
        }
    }
    Ok(())
}

/// Which pool an enrollment into `requested` binds the VM to: `Ok(true)` binds it now (its
/// first proven identity), `Ok(false)` confirms the pool it already has; another pool is
/// refused. `stored` is the pool of the VM's record, `bound` that of an earlier enrollment.
pub fn enrollment_binding(
    vm_id: &str,
    requested: &str,
    stored: Option<&str>,
    bound: Option<&str>,
) -> Result<bool, Denied> {
    match stored.or(bound) {
        None => Ok(true),
        Some(p) if p == requested => Ok(bound.is_none()),
        Some(p) => Err(Denied::Forbidden(format!(
            "VM {vm_id:?} belongs to pool {p:?}; it cannot enroll into pool {requested:?} (an operator can move it, or use a new VM id)"
        ))),
    }
}

/// How a caller whose token did not verify appears in the audit log: by the public id of an
/// operator token (never its secret), else by the kind of thing it sent.
pub fn unverified_actor(token: Option<&str>) -> String {
    match token {
        None => "anonymous".into(),
        Some(t) => match operator::parse(t) {
            Ok((id, _)) => format!("unverified token {id}"),
            Err(_) if t.starts_with("migvm1.") => "unverified VM credential".into(),
            Err(_) => "unverified bearer token".into(),
        },
    }
}

/// The bearer token of an `Authorization` header value, if it is one.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Hex SHA-256, for storing digests of secrets and identity tokens.
pub fn sha256_hex(data: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` random bytes from the system's CSPRNG.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, aws_lc_rs::error::Unspecified> {
    let mut buf = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut buf)?;
    Ok(buf)
}

/// Why the gate turned a caller away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Over a rate limit (per address or per VM): retry after this long.
    Limited(std::time::Duration),
    /// Not authenticated, or not allowed on this route.
    Denied(Denied),
}

/// Everything a front end needs to decide about a caller. Both transports go through the
/// same three steps, in this order: [`Gatekeeper::check_peer`] (per-address limit),
/// [`Gatekeeper::principal`] (who the credential proves), [`Gatekeeper::admit`] (may that
/// caller use this route, and the per-VM limit). The app's operations then check the names
/// each message carries against the caller ([`check_names`]).
#[derive(Debug)]
pub struct Gatekeeper {
    pub mode: AuthMode,
    pub enroller: enroll::Enroller,
    pub limits: limits::RateLimits,
}

impl Gatekeeper {
    /// The per-address rate limit, before anything else is read.
    pub fn check_peer(&self, peer: Option<std::net::IpAddr>) -> Result<(), Refused> {
        match peer {
            Some(ip) => self.limits.check_addr(ip).map_err(Refused::Limited),
            None => Ok(()),
        }
    }

    /// Whether `caller` may use `route` ([`authorize`]), then, for a VM's route, that VM's
    /// rate limit (also applied to every message on its stream).
    pub fn admit(&self, route: &Route, caller: Option<&Principal>) -> Result<(), Refused> {
        authorize(route, caller).map_err(Refused::Denied)?;
        match route {
            Route::Vm(vm_id) => self.check_vm_rate(vm_id),
            _ => Ok(()),
        }
    }

    /// The per-VM rate limit alone: for each message on a stream already admitted.
    pub fn check_vm_rate(&self, vm_id: &str) -> Result<(), Refused> {
        self.limits.check_vm(vm_id).map_err(Refused::Limited)
    }

    /// Verifies `token` (the bearer token, if any). `Ok(None)`: no credential came. In `open`
    /// mode everyone is [`Principal::Open`].
    pub async fn principal(
        &self,
        store: &crate::store::Reads,
        token: Option<&str>,
    ) -> Result<Option<Principal>, Denied> {
        if self.mode == AuthMode::Open {
            return Ok(Some(Principal::Open));
        }
        let Some(token) = token else {
            return Ok(None);
        };
        if token.starts_with(operator::PREFIX) {
            let (id, secret) =
                operator::parse(token).map_err(|e| Denied::Unauthenticated(e.to_string()))?;
            let record = store
                .operator_token_get(id)
                .await
                .map_err(|e| {
                    tracing::error!(error = %miglet_proto::error_chain(&e), "Operator token lookup failed");
                    Denied::Unauthenticated("operator token could not be checked; retry".into())
                })?
                .ok_or_else(|| {
                    Denied::Unauthenticated(operator::OperatorTokenError::Wrong.to_string())
                })?;
            let now = self.enroller.clock().now_ms();
            return operator::check(&record, secret, now)
                .map(|o| Some(Principal::Operator(o)))
                .map_err(|e| Denied::Unauthenticated(e.to_string()));
        }
        self.vm(token).map(|c| Some(Principal::Vm(c)))
    }

    /// Verifies a VM credential (no store lookup).
    pub fn vm(&self, token: &str) -> Result<credential::VmClaims, Denied> {
        self.enroller
            .verify(token)
            .map_err(|e| Denied::Unauthenticated(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    fn vm(id: &str) -> Principal {
        Principal::Vm(credential::VmClaims {
            vm_id: id.into(),
            pool_id: "p".into(),
            issued_at: 0,
            expires_at: 1,
            enrolled_at: 0,
            credential_id: "c".into(),
        })
    }

    fn op(role: Role) -> Principal {
        Principal::Operator(Operator {
            token_id: "t".into(),
            name: "alice".into(),
            role,
        })
    }

    #[test]
    fn routes_are_classified() {
        assert_eq!(route(&Method::GET, "/health"), Route::Public);
        assert_eq!(route(&Method::POST, "/api/v1/enroll"), Route::Public);
        assert_eq!(route(&Method::GET, "/dashboard/app.js"), Route::Public);
        assert_eq!(
            route(&Method::GET, "/api/v1/vms/a-1/commands"),
            Route::Vm("a-1".into())
        );
        assert_eq!(
            route(&Method::GET, "/api/v1/admin/vms"),
            Route::Admin { write: false }
        );
        assert_eq!(
            route(&Method::POST, "/api/v1/admin/vms/x/commands"),
            Route::Admin { write: true }
        );
        assert_eq!(route(&Method::GET, "/nope"), Route::Other);
    }

    #[test]
    fn who_may_do_what() {
        let vm_a = Route::Vm("a".into());
        assert!(authorize(&Route::Public, None).is_ok());
        assert!(matches!(
            authorize(&vm_a, None),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(authorize(&vm_a, Some(&vm("a"))).is_ok());
        assert!(matches!(
            authorize(&vm_a, Some(&vm("b"))),
            Err(Denied::Forbidden(_))
        ));
        assert!(matches!(
            authorize(&vm_a, Some(&op(Role::Admin))),
            Err(Denied::Forbidden(_))
        ));
        let read = Route::Admin { write: false };
        let write = Route::Admin { write: true };
        assert!(authorize(&read, Some(&op(Role::ReadOnly))).is_ok());
        assert!(matches!(
            authorize(&write, Some(&op(Role::ReadOnly))),
            Err(Denied::Forbidden(_))
        ));
        assert!(authorize(&write, Some(&op(Role::Admin))).is_ok());
        assert!(matches!(
            authorize(&read, Some(&vm("a"))),
            Err(Denied::Forbidden(_))
        ));
        assert!(authorize(&write, Some(&Principal::Open)).is_ok());
        // Unknown paths are left to the router's 404, credential or not.
        assert!(authorize(&Route::Other, None).is_ok());
    }

    fn names(pool: &str, org: &str) -> VmNames {
        VmNames {
            pool_id: pool.into(),
            org_id: org.into(),
        }
    }

    #[test]
    fn a_vm_credential_acts_only_for_its_vm_pool_and_org() {
        let a = vm("a");
        let ok = Named {
            vm_id: Some("a"),
            pool_id: Some("p"),
            org_id: Some("o"),
        };
        let known = names("p", "o");
        assert_eq!(check_names(&a, "a", &ok, Some(&known)), Ok(()));
        assert_eq!(check_names(&a, "a", &Named::default(), None), Ok(()));
        // Empty names are "not named".
        let empty = Named {
            vm_id: Some(""),
            pool_id: Some(""),
            org_id: Some(""),
        };
        assert_eq!(check_names(&a, "a", &empty, Some(&known)), Ok(()));
        let refused = |n: Named<'_>, k: Option<&VmNames>, vm_id: &str| {
            matches!(check_names(&a, vm_id, &n, k), Err(NameError::Forbidden(_)))
        };
        assert!(refused(ok, Some(&known), "b"), "another VM's path");
        assert!(refused(
            Named {
                vm_id: Some("b"),
                ..ok
            },
            Some(&known),
            "a"
        ));
        assert!(refused(
            Named {
                pool_id: Some("q"),
                ..ok
            },
            None,
            "a"
        ));
        assert!(refused(ok, Some(&names("q", "o")), "a"), "VM moved away");
        assert!(refused(
            Named {
                org_id: Some("x"),
                ..ok
            },
            Some(&known),
            "a"
        ));
        // An org not known yet is learnt, not refused.
        assert_eq!(check_names(&a, "a", &ok, Some(&names("p", ""))), Ok(()));
        assert!(matches!(
            check_names(&op(Role::Admin), "a", &ok, None),
            Err(NameError::Forbidden(_))
        ));
    }

    #[test]
    fn open_mode_only_checks_consistency() {
        let n = Named {
            vm_id: Some("b"),
            ..Named::default()
        };
        assert!(matches!(
            check_names(&Principal::Open, "a", &n, None),
            Err(NameError::Inconsistent(_))
        ));
        let n = Named {
            vm_id: Some("a"),
            pool_id: Some("anything"),
            org_id: Some("x"),
        };
        assert_eq!(
            check_names(&Principal::Open, "a", &n, Some(&names("p", "o"))),
            Ok(())
        );
    }

    #[test]
    fn the_first_proven_identity_fixes_the_pool() {
        assert_eq!(enrollment_binding("v", "p", None, None), Ok(true));
        assert_eq!(enrollment_binding("v", "p", None, Some("p")), Ok(false));
        assert_eq!(enrollment_binding("v", "p", Some("p"), None), Ok(true));
        assert_eq!(
            enrollment_binding("v", "p", Some("p"), Some("p")),
            Ok(false)
        );
        assert!(enrollment_binding("v", "p", Some("q"), None).is_err());
        assert!(enrollment_binding("v", "p", None, Some("q")).is_err());
        // The record wins over an older binding (an operator moved the VM).
        assert!(enrollment_binding("v", "p", Some("q"), Some("p")).is_err());
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
    }
}
