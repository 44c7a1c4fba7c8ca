//! The gRPC stream's life as the app sees it: open (with the commands waiting for the VM),
//! the commit of that open, what to send on a nudge, and close.

use super::*;

/// The ids and version a `ConnectRequest` carries, each valid.
fn check_connect(c: &pb::ConnectRequest) -> Result<(), ApiError> {
    validate_vm_id(&c.vm_id).map_err(bad)?;
    check_optional_id("pool_id", Some(&c.pool_id))?;
    check_optional_id("org_id", Some(&c.org_id))?;
    check_optional_id("boot_id", Some(&c.boot_id))?;
    if c.version.len() > 128 {
        return Err(ApiError::BadRequest(
            "version is longer than 128 characters".into(),
        ));
    }
    Ok(())
}

/// The VM's log line of a stream that opened.
fn connected_log(
    vm_id: &str,
    handle: &StreamHandle,
    remote: Option<SocketAddr>,
    version: &str,
    now: Millis,
) -> Mutation {
    let detail = json!({
        "stream_id": handle.stream_id,
        "remote": remote.map(|r| r.to_string()),
        "version": version,
    });
    Mutation::VmLog(VmLogRow {
        vm_id: vm_id.to_owned(),
        at: now,
        kind: "stream_connected".into(),
        detail: Some(detail.to_string()),
    })
}

impl Controller {
    /// Opens a stream session for a `ConnectRequest`. A connect from an unknown VM counts as
    /// its `vm_started`; a reconnect never causes a second registration.
    ///
    /// A reconnect's write (the VM is connected, what goes out now is marked delivered) is
    /// left in flight ([`StreamOpened::commit`] says when it is committed): what it hands out was stored before, and
    /// a delivery that is never recorded is only delivered again, which the agent
    /// de-duplicates. That keeps a group commit off the agent's wait for its commands.
    ///
    /// Longer than most (about 90 lines) on purpose: the stream registration it makes must
    /// be undone on each of its early returns while the VM's lock is held, and that is
    /// easiest to check in one place.
    pub async fn stream_open(
        self: &Arc<Self>,
        caller: &Principal,
        c: &pb::ConnectRequest,
        remote: Option<SocketAddr>,
    ) -> Result<StreamOpened, ApiError> {
        check_connect(c)?;
        let vm_id = c.vm_id.as_str();
        let mut pool_id = Some(c.pool_id.clone());
        fill_pool(caller, &mut pool_id);
        let named = Named {
            vm_id: Some(vm_id),
            pool_id: pool_id.as_deref(),
            org_id: Some(c.org_id.as_str()),
        };
        crate::auth::check_names(caller, vm_id, &named, None)?;
        let now = self.now_ms();
        let guard = self.locks.lock_owned(vm_id).await;
        let existing = self.store.vm_get(vm_id).await?;
        let known = self.names_for(vm_id, existing.as_ref()).await?;
        self.check_message(caller, vm_id, &named, known.as_ref())?;
        let contact = Contact {
            kind: ContactKind::Connect,
            boot_id: Some(c.boot_id.as_str()).filter(|s| !s.is_empty()),
            pool_id: pool_id.as_deref(),
            org_id: Some(c.org_id.as_str()),
            version: Some(c.version.as_str()),
        };
        let mut batch = Vec::with_capacity(6);
        let (mut vm, new_boot) = self.announce(&mut batch, existing.as_ref(), vm_id, &contact, now);
        vm.connected = true;
        self.names.remember(&vm);
        let handle = self.streams.register(vm_id);
        batch.extend(lifecycle::recovery_log(existing.as_ref(), &vm, now).map(Mutation::VmLog));
        // What is already waiting (a registration queued at vm_started, commands queued
        // while the VM was away) goes out with the connect_ack, marked in the same write.
        let via = lifecycle::stream_via(&handle.stream_id);
        let plan = match self.plan_for_open(&vm, &handle, new_boot, &via, now).await {
            Ok(p) => p,
            Err(e) => {
                self.streams.unregister(vm_id, handle.generation);
                return Err(e);
            }
        };
        let registration = self.put_vm_with_registration(&mut batch, &mut vm, now);
        batch.extend(plan.iter().flat_map(|p| p.writes.iter().cloned()));
        batch.push(connected_log(vm_id, &handle, remote, &c.version, now));
        let write = match self.store.submit(batch).await {
            Ok(w) => w,
            Err(e) => {
                self.streams.unregister(vm_id, handle.generation);
                return Err(e.into());
            }
        };
        self.note_runner_done(existing.as_ref(), &vm, None, now);
        let (commands, open) = match &plan {
            Some(p) => (
                p.envelopes.iter().map(CommandEnvelope::to_pb).collect(),
                p.open.len(),
            ),
            None => (Vec::new(), 0),
        };
        // A registration queued just now is handed out by the session's first pass.
        let deliver_now = registration.is_some() || plan.is_none();
        let commit = OpenCommit {
            write,
            _guard: guard,
            vm,
            plan,
            via,
            now,
            registration_id: registration.map(|r| r.id),
            remote,
            new_boot,
            stream_id: handle.stream_id.clone(),
        };
        let commit = if new_boot {
            if let Err(e) = self.stream_open_commit(commit).await {
                self.streams.unregister(vm_id, handle.generation);
                return Err(e);
            }
            None
        } else {
            // The lock stays with the app: a task of ours holds it until the write is
            // durable, and the session only waits for the answer.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let app = Arc::clone(self);
            tokio::spawn(async move {
                let _ = tx.send(app.stream_open_commit(commit).await);
            });
            Some(OpenSettling(rx))
        };
        Ok(StreamOpened {
            handle,
            commands,
            open,
            deliver_now,
            commit,
        })
    }

    /// What a reconnect hands out with its `connect_ack`: the commands already waiting (a
    /// registration queued at `vm_started`, commands queued while the VM was away), marked
    /// delivered in the open's write. A new boot's old commands were just superseded, so
    /// it has nothing to hand out yet.
    async fn plan_for_open(
        &self,
        vm: &VmRecord,
        handle: &StreamHandle,
        new_boot: bool,
        via: &str,
        now: Millis,
    ) -> Result<Option<DeliveryPlan>, ApiError> {
        if new_boot {
            return Ok(None);
        }
        let channel = Channel::Stream {
            stream_id: &handle.stream_id,
        };
        self.plan_delivery(vm, channel, via, now).await.map(Some)
    }

    /// Waits for a stream open's write to be committed, then logs the connect and the
    /// deliveries it recorded. On failure the session must end (the stream is still
    /// registered; [`Controller::stream_closed`] takes it out).
    async fn stream_open_commit(&self, commit: OpenCommit) -> Result<(), ApiError> {
        let OpenCommit {
            write,
            _guard,
            vm,
            plan,
            via,
            now,
            registration_id,
            remote,
            new_boot,
            stream_id,
        } = commit;
        write.durable().await?;
        info!(vm_id = %vm.vm_id, %stream_id, new_boot, remote = ?remote, "Stream connected");
        if let Some(id) = &registration_id {
            info!(vm_id = %vm.vm_id, command_id = %id, boot_id = %vm.boot_id, "Queued register_runner");
        }
        if let Some(p) = &plan {
            self.delivered(&vm, p, &via, now);
        }
        Ok(())
    }

    /// Ends a stream session. The VM is marked disconnected only if no newer stream took over.
    pub async fn stream_closed(&self, vm_id: &str, handle: &StreamHandle, reason: &str) {
        let now = self.now_ms();
        let _guard = self.locks.lock(vm_id).await;
        let current = self.streams.unregister(vm_id, handle.generation);
        let mut batch = Vec::with_capacity(2);
        if current {
            batch.push(Mutation::SetConnected {
                vm_id: vm_id.to_owned(),
                connected: false,
                at: now,
            });
        }
        batch.push(Mutation::VmLog(VmLogRow {
            vm_id: vm_id.to_owned(),
            at: now,
            kind: if current {
                "stream_disconnected"
            } else {
                "stream_replaced"
            }
            .into(),
            detail: Some(json!({"stream_id": handle.stream_id, "reason": reason}).to_string()),
        }));
        if let Err(e) = self.store.write(batch).await {
            warn!(vm_id, error = %crate::error::chain(&e), "Failed to record stream end");
        }
        info!(vm_id, stream_id = %handle.stream_id, reason, replaced = !current, "Stream closed");
    }

    /// The commands to push on a stream now (marked delivered), and how many stay open.
    pub async fn stream_deliverable(
        &self,
        caller: &Principal,
        vm_id: &str,
        handle: &StreamHandle,
    ) -> Result<(Vec<pb::Command>, usize), ApiError> {
        let _guard = self.locks.lock(vm_id).await;
        // A stream replaced by a newer one (registered under this lock) gets nothing more,
        // or the two would take turns redelivering the same command.
        if handle.replaced.is_cancelled() || handle.closed.is_cancelled() {
            return Ok((Vec::new(), 0));
        }
        let Some(vm) = self.store.vm_get(vm_id).await? else {
            return Ok((Vec::new(), 0));
        };
        // The VM may have been moved to another pool since the stream opened.
        self.check_caller(caller, vm_id, Some(&vm)).await?;
        let now = self.now_ms();
        let via = lifecycle::stream_via(&handle.stream_id);
        let (envs, open) = self
            .deliver_locked(
                &vm,
                Channel::Stream {
                    stream_id: &handle.stream_id,
                },
                &via,
                now,
            )
            .await?;
        Ok((envs.iter().map(CommandEnvelope::to_pb).collect(), open))
    }
}
