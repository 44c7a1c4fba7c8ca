//! Who may act for a VM. Enrollment binds a VM id to the pool of its first proven identity;
//! every message a VM sends, on either transport, is checked against its caller and the VM's
//! stored pool by [`Controller::check_message`] (the rule itself is
//! [`crate::auth::check_names`]); an operator may move a VM to another pool; one-time
//! enrollment tokens are minted here.

use super::{Controller, bad};
use crate::auth::enrollment_token::{self, NewEnrollmentToken};
use crate::auth::{self, Named, Principal, VmNames};
use crate::error::ApiError;
use crate::store::{CommandState, Mutation, VmBinding, VmLogRow, VmRecord};
use miglet_proto::ids::{validate_id, validate_vm_id};
use miglet_proto::json::{EnrollRequest, EnrollResponse};
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use tracing::{info, warn};

/// Entries [`NameCache`] holds before it starts over (VMs are short-lived; ids churn).
const NAME_CACHE_MAX: usize = 200_000;

/// The pool and org of each VM, remembered so that a heartbeat (the fleet's most frequent
/// message) is checked against the VM's pool without a store read. Filled from every VM
/// record the controller reads or writes; a VM's pool changes only by an operator's move,
/// which updates it. Several replicas (a later issue) must also hear of each other's moves.
#[derive(Debug, Default)]
pub(crate) struct NameCache {
    map: Mutex<HashMap<String, VmNames>>,
}

impl NameCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VmNames>> {
        // Single inserts and removes cannot leave the map inconsistent.
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn get(&self, vm_id: &str) -> Option<VmNames> {
        self.lock().get(vm_id).cloned()
    }

    pub(crate) fn remember(&self, vm: &VmRecord) {
        self.remember_names(&vm.vm_id, names_of(vm));
    }

    pub(crate) fn remember_names(&self, vm_id: &str, names: VmNames) {
        let mut map = self.lock();
        if map.len() >= NAME_CACHE_MAX && !map.contains_key(vm_id) {
            map.clear();
        }
        map.insert(vm_id.to_owned(), names);
    }
}

/// The names a VM's record gives it.
pub(crate) fn names_of(vm: &VmRecord) -> VmNames {
    VmNames {
        pool_id: vm.pool_id.clone(),
        org_id: vm.org_id.clone(),
    }
}

/// The pool a VM credential is for; `None` for other callers.
pub(crate) fn credential_pool(caller: &Principal) -> Option<&str> {
    match caller {
        Principal::Vm(c) => Some(c.pool_id.as_str()),
        _ => None,
    }
}

/// Fills a message's pool from the caller's credential when the message names none (the
/// base contract's agents may leave it out).
pub(crate) fn fill_pool(caller: &Principal, pool_id: &mut Option<String>) {
    if pool_id.as_deref().is_none_or(str::is_empty)
        && let Some(p) = credential_pool(caller)
    {
        *pool_id = Some(p.to_owned());
    }
}

impl Controller {
    /// A message naming a pool this controller does not serve is refused: nobody can add
    /// pools (and metric labels) by sending messages.
    pub(crate) fn check_pool_served(&self, pool_id: &str) -> Result<(), ApiError> {
        self.settings.pools.get(pool_id).map(|_| ()).map_err(|_| {
            ApiError::Forbidden(format!(
                "pool {pool_id:?} is not configured on this controller"
            ))
        })
    }

    /// The one check every VM message passes, on either transport: it may come from
    /// `caller` for `vm_id` naming `named` (see [`auth::check_names`]); and a message that
    /// puts the VM into a pool (its first contact, or an open-mode agent naming another
    /// pool) must name one this controller serves.
    pub(crate) fn check_message(
        &self,
        caller: &Principal,
        vm_id: &str,
        named: &Named<'_>,
        known: Option<&VmNames>,
    ) -> Result<(), ApiError> {
        auth::check_names(caller, vm_id, named, known)?;
        let pool = named.pool_id.filter(|p| !p.is_empty());
        let lands_in = match known {
            None => Some(pool.unwrap_or("default")),
            Some(k) => pool.filter(|p| *p != k.pool_id),
        };
        if let Some(p) = lands_in {
            self.check_pool_served(p)?;
        }
        Ok(())
    }

    /// The names of a VM: remembered, else read (and remembered).
    pub(crate) async fn known_names(&self, vm_id: &str) -> Result<Option<VmNames>, ApiError> {
        if let Some(n) = self.names.get(vm_id) {
            return Ok(Some(n));
        }
        let vm = self.store.vm_get(vm_id).await?;
        if let Some(v) = &vm {
            self.names.remember(v);
        }
        self.names_for(vm_id, vm.as_ref()).await
    }

    /// The names of a VM from its record, or, for a VM that enrolled but has not made
    /// contact yet, the pool of its binding.
    pub(crate) async fn names_for(
        &self,
        vm_id: &str,
        record: Option<&VmRecord>,
    ) -> Result<Option<VmNames>, ApiError> {
        if let Some(v) = record {
            return Ok(Some(names_of(v)));
        }
        Ok(self.store.vm_binding_get(vm_id).await?.map(|b| VmNames {
            pool_id: b.pool_id,
            org_id: String::new(),
        }))
    }

    /// Checks a caller against what is known of the VM (an operation that names nothing
    /// but the VM: polls, acks, refreshes).
    pub(crate) async fn check_caller(
        &self,
        caller: &Principal,
        vm_id: &str,
        record: Option<&VmRecord>,
    ) -> Result<(), ApiError> {
        auth::check_names(caller, vm_id, &Named::default(), None)?;
        if matches!(caller, Principal::Vm(_)) {
            let known = self.names_for(vm_id, record).await?;
            auth::check_names(caller, vm_id, &Named::default(), known.as_ref())?;
        }
        Ok(())
    }

    /// Enrollment: checks the proof, binds the VM to the pool if this is its first proven
    /// identity (refusing another pool's proof for a VM already bound), and issues a
    /// credential. Every outcome is on the VM's controller log.
    pub async fn enroll(
        &self,
        req: &EnrollRequest,
        remote: Option<SocketAddr>,
    ) -> Result<EnrollResponse, ApiError> {
        let enroller = &self.gate.enroller;
        let rules = self
            .settings
            .pools
            .get(&req.pool_id)
            .map(|p| p.enrollment.clone())
            .unwrap_or_default();
        let proof = enroller.prove(&self.store, &rules, req).await?;
        let from = remote.map(|a| a.ip().to_string()).unwrap_or_default();
        let now = self.now_ms();
        let _guard = self.locks.lock(&req.vm_id).await;
        let stored = self.store.vm_get(&req.vm_id).await?;
        let bound = self.store.vm_binding_get(&req.vm_id).await?;
        let log = |kind: &str, detail: String| {
            Mutation::VmLog(VmLogRow {
                vm_id: req.vm_id.clone(),
                at: now,
                kind: kind.into(),
                detail: Some(detail),
            })
        };
        let detail = format!(
            "pool={} {} from={from} boot_id={}",
            req.pool_id,
            proof.detail,
            req.boot_id.as_deref().unwrap_or("-")
        );
        let binds = match auth::enrollment_binding(
            &req.vm_id,
            &req.pool_id,
            stored.as_ref().map(|v| v.pool_id.as_str()),
            bound.as_ref().map(|b| b.pool_id.as_str()),
        ) {
            Ok(b) => b,
            Err(denied) => {
                warn!(vm_id = %req.vm_id, pool_id = %req.pool_id, %from, reason = %denied, "Enrollment refused: the VM belongs to another pool. If it really moved, move it with POST /api/v1/admin/vms/{{vm_id}}/pool; otherwise someone holding another pool's proof tried to take it over");
                self.store
                    .write(vec![log("enrollment_refused", detail)])
                    .await?;
                return Err(ApiError::from(denied));
            }
        };
        let mut batch = Vec::with_capacity(2);
        if binds {
            batch.push(Mutation::BindVm(VmBinding {
                vm_id: req.vm_id.clone(),
                pool_id: req.pool_id.clone(),
                bound_at: now,
                proof: proof.detail.clone(),
            }));
        }
        batch.push(log("enrolled", detail));
        self.store.write(batch).await?;
        let secs = now / 1000;
        let response = enroller.issue(&req.vm_id, &req.pool_id, secs, secs);
        info!(vm_id = %req.vm_id, pool_id = %req.pool_id, method = ?req.method, %from, expires_at = %response.expires_at, bound_now = binds, "VM enrolled");
        Ok(response)
    }

    /// A fresh credential for a VM credential's holder, if the VM is still in that pool.
    pub async fn refresh_credential(&self, caller: &Principal) -> Result<EnrollResponse, ApiError> {
        let Principal::Vm(claims) = caller else {
            return Err(ApiError::Conflict(
                "no VM credential to refresh (the controller runs in open mode)".into(),
            ));
        };
        let known = self.known_names(&claims.vm_id).await?;
        auth::check_names(caller, &claims.vm_id, &Named::default(), known.as_ref())?;
        Ok(self.gate.enroller.refresh(claims)?)
    }

    /// An operator moves a VM (or a VM id bound by enrollment only) into another configured
    /// pool: the binding and the record change together, the old pool's open registration
    /// is superseded, and the VM's stream is closed. Credentials for the old pool stop
    /// working at once; the VM enrolls into the new pool with that pool's proof.
    pub async fn move_vm_pool(
        &self,
        vm_id: &str,
        pool_id: &str,
        actor: &str,
    ) -> Result<(String, Option<VmRecord>), ApiError> {
        validate_vm_id(vm_id).map_err(bad)?;
        validate_id("pool_id", pool_id).map_err(bad)?;
        self.settings.pools.get(pool_id).map_err(|_| {
            ApiError::BadRequest(format!(
                "pool {pool_id:?} is not configured on this controller"
            ))
        })?;
        let now = self.now_ms();
        let _guard = self.locks.lock(vm_id).await;
        let stored = self.store.vm_get(vm_id).await?;
        let bound = self.store.vm_binding_get(vm_id).await?;
        let from = match (&stored, &bound) {
            (Some(v), _) => v.pool_id.clone(),
            (None, Some(b)) => b.pool_id.clone(),
            (None, None) => return Err(ApiError::NotFound(format!("unknown VM {vm_id:?}"))),
        };
        if from == pool_id {
            return Err(ApiError::Conflict(format!(
                "VM {vm_id:?} is already in pool {pool_id:?}"
            )));
        }
        let mut batch = vec![Mutation::RebindVm(VmBinding {
            vm_id: vm_id.to_owned(),
            pool_id: pool_id.to_owned(),
            bound_at: now,
            proof: format!("moved by {actor}"),
        })];
        let moved = stored.map(|mut vm| {
            if let Some(old) = vm.registration_command_id.take() {
                batch.push(Mutation::CommandTransition {
                    id: old,
                    to: CommandState::Expired,
                    at: now,
                    detail: Some("superseded: the VM moved to another pool".into()),
                    result_message: Some("superseded: the VM moved to another pool".into()),
                    result: None,
                });
            }
            vm.pool_id = pool_id.to_owned();
            vm.updated_at = now;
            vm
        });
        if let Some(vm) = &moved {
            batch.push(Mutation::PutVm(vm.clone()));
        }
        batch.push(Mutation::VmLog(VmLogRow {
            vm_id: vm_id.to_owned(),
            at: now,
            kind: "pool_moved".into(),
            detail: Some(json!({"from": from, "to": pool_id, "by": actor}).to_string()),
        }));
        self.store.write(batch).await?;
        if let Some(vm) = &moved {
            self.names.remember(vm);
        }
        self.streams.close(vm_id);
        warn!(vm_id, from = %from, to = pool_id, actor, "VM moved to another pool; credentials for its old pool no longer act for it");
        Ok((from, moved))
    }

    /// Mints a one-time enrollment token for `vm_id` in `pool_id` (a pool that accepts them),
    /// valid `ttl_secs`. The caller shows the token once; only its hash is stored.
    pub async fn mint_enrollment_token(
        &self,
        vm_id: &str,
        pool_id: &str,
        ttl_secs: u64,
        actor: &str,
    ) -> Result<NewEnrollmentToken, ApiError> {
        validate_vm_id(vm_id).map_err(bad)?;
        validate_id("pool_id", pool_id).map_err(bad)?;
        let pool = self.settings.pools.get(pool_id).map_err(|_| {
            ApiError::BadRequest(format!(
                "pool {pool_id:?} is not configured on this controller"
            ))
        })?;
        if !pool.enrollment.enrollment_tokens {
            return Err(ApiError::BadRequest(format!(
                "pool {pool_id:?} does not accept enrollment tokens (set enrollment_tokens = true in [pools.{pool_id}.enrollment])"
            )));
        }
        let minted = enrollment_token::mint(vm_id, pool_id, actor, self.now_ms(), ttl_secs)
            .map_err(|e| match e {
                enrollment_token::EnrollmentTokenError::Random => {
                    ApiError::Unavailable(e.to_string())
                }
                other => ApiError::BadRequest(other.to_string()),
            })?;
        self.store
            .write(vec![Mutation::InsertEnrollmentToken(minted.record.clone())])
            .await?;
        info!(vm_id, pool_id, token_id = %minted.record.id, actor, "Enrollment token minted");
        Ok(minted)
    }
}
