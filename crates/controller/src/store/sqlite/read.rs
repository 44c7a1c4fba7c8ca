//! The read side: queries on the read-only pool, one method per question the app, the
//! admin API and the metrics ask. Declared once, here: [`super::super::Store`] derefs to
//! [`Reads`], and the admin API holds only a `&Reads`.

use super::*;

impl Reads {
    pub async fn vm_get(&self, vm_id: &str) -> Result<Option<VmRecord>, StoreError> {
        sqlx::query("SELECT * FROM vms WHERE vm_id = ?")
            .bind(vm_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| vm_from_row(&r))
            .transpose()
    }

    pub async fn vms_list(&self) -> Result<Vec<VmRecord>, StoreError> {
        sqlx::query("SELECT * FROM vms ORDER BY vm_id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(vm_from_row)
            .collect()
    }

    /// The VMs of one pool (through the `(pool_id, state)` index), for the scaler's pass.
    pub async fn vms_in_pool(&self, pool_id: &str) -> Result<Vec<VmRecord>, StoreError> {
        sqlx::query("SELECT * FROM vms WHERE pool_id = ?")
            .bind(pool_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(vm_from_row)
            .collect()
    }

    /// The VMs last seen before `before` that silence may still change: a superset of
    /// those [`crate::lifecycle::may_change_when_silent`] allows (not terminated; lost only
    /// if shutting down), through the `(health, last_seen_at)` and `(state, ...)` indexes.
    pub async fn vms_silent_before(&self, before: Millis) -> Result<Vec<SilentVm>, StoreError> {
        let rows = sqlx::query(
            "SELECT vm_id, state, health, connected, last_seen_at FROM vms \
             WHERE last_seen_at < ?1 AND health IN ('healthy', 'unhealthy') \
             AND state != 'terminated' \
             UNION SELECT vm_id, state, health, connected, last_seen_at FROM vms \
             WHERE state = 'shutting_down' AND last_seen_at < ?1 ORDER BY vm_id",
        )
        .bind(before)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SilentVm {
                    vm_id: r.try_get("vm_id")?,
                    state: r.try_get("state")?,
                    health: r.try_get::<String, _>("health")?.parse()?,
                    connected: r.try_get("connected")?,
                    last_seen_at: r.try_get("last_seen_at")?,
                })
            })
            .collect()
    }

    pub async fn vms_needing_registration(&self) -> Result<Vec<VmRecord>, StoreError> {
        sqlx::query(
            "SELECT * FROM vms WHERE registration_command_id IS NULL AND runner_registered = 0 \
             AND state = 'ready' \
             AND health != 'lost' ORDER BY vm_id",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(vm_from_row)
        .collect()
    }

    pub async fn event_exists(&self, vm_id: &str, event_id: &str) -> Result<bool, StoreError> {
        Ok(
            sqlx::query("SELECT 1 FROM events WHERE vm_id = ? AND event_id = ?")
                .bind(vm_id)
                .bind(event_id)
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }

    pub async fn events_for_vm(&self, vm_id: &str) -> Result<Vec<EventRow>, StoreError> {
        sqlx::query("SELECT * FROM events WHERE vm_id = ? ORDER BY seq")
            .bind(vm_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(event_from_row)
            .collect()
    }

    pub async fn heartbeats_for_vm(&self, vm_id: &str) -> Result<Vec<HeartbeatRow>, StoreError> {
        sqlx::query("SELECT * FROM heartbeats WHERE vm_id = ? ORDER BY seq")
            .bind(vm_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(heartbeat_from_row)
            .collect()
    }

    pub async fn vms_page(&self, f: &VmFilter) -> Result<Vec<VmRecord>, StoreError> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM vms WHERE 1 = 1");
        if let Some(pools) = &f.pools {
            if pools.is_empty() {
                return Ok(Vec::new());
            }
            q.push(" AND pool_id IN (");
            let mut sep = q.separated(", ");
            for p in pools {
                sep.push_bind(p.clone());
            }
            q.push(")");
        }
        if let Some(state) = &f.state {
            q.push(" AND state = ").push_bind(state.clone());
        }
        if let Some(health) = f.health {
            q.push(" AND health = ").push_bind(health.as_str());
        }
        if let Some(text) = &f.text {
            let pattern = like_pattern(text);
            // The VM id, or a value (never a key) of its current job.
            q.push(" AND (vm_id LIKE ")
                .push_bind(pattern.clone())
                .push(" ESCAPE '\\' OR (current_job LIKE ")
                .push_bind(pattern.clone())
                .push(
                    " ESCAPE '\\' AND EXISTS (SELECT 1 FROM json_tree(vms.current_job) t \
                     WHERE t.type IN ('text', 'integer', 'real') AND t.atom LIKE ",
                )
                .push_bind(pattern)
                .push(" ESCAPE '\\')))");
        }
        if let Some(after) = &f.after {
            q.push(" AND vm_id > ").push_bind(after.clone());
        }
        q.push(" ORDER BY vm_id LIMIT ")
            .push_bind(i64::from(f.limit));
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(vm_from_row)
            .collect()
    }

    pub async fn events_page(&self, f: &EventFilter) -> Result<Vec<EventRow>, StoreError> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT e.* FROM events e");
        if f.pool_id.is_some() {
            q.push(" JOIN vms v ON v.vm_id = e.vm_id");
        }
        q.push(" WHERE 1 = 1");
        if let Some(pool) = &f.pool_id {
            q.push(" AND v.pool_id = ").push_bind(pool.clone());
        }
        if let Some(vm) = &f.vm_id {
            q.push(" AND e.vm_id = ").push_bind(vm.clone());
        }
        if !f.types.is_empty() {
            q.push(" AND e.event_type IN (");
            let mut sep = q.separated(", ");
            for t in &f.types {
                sep.push_bind(t.clone());
            }
            q.push(")");
        }
        if let Some(since) = f.since {
            q.push(" AND e.received_at >= ").push_bind(since);
        }
        if let Some(until) = f.until {
            q.push(" AND e.received_at < ").push_bind(until);
        }
        if let Some(text) = &f.text {
            // A value (never a key or the JSON around it) of the event's fields or metadata.
            // The plain LIKE over the document is a cheap first cut.
            let pattern = like_pattern(text);
            q.push(" AND e.data LIKE ")
                .push_bind(pattern.clone())
                .push(
                    " ESCAPE '\\' AND EXISTS (SELECT 1 FROM json_tree(e.data) t \
                     WHERE (t.fullkey LIKE '$.fields.%' OR t.fullkey LIKE '$.metadata.%') \
                     AND t.type IN ('text', 'integer', 'real') AND t.atom LIKE ",
                )
                .push_bind(pattern)
                .push(" ESCAPE '\\')");
        }
        if let Some(before) = f.before_seq {
            q.push(" AND e.seq < ").push_bind(before);
        }
        if let Some(after) = f.after_seq {
            q.push(" AND e.seq > ").push_bind(after);
            q.push(" ORDER BY e.seq ASC LIMIT ");
        } else {
            q.push(" ORDER BY e.seq DESC LIMIT ");
        }
        q.push_bind(i64::from(f.limit));
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(event_from_row)
            .collect()
    }

    pub async fn heartbeats_page(
        &self,
        vm_id: &str,
        since: Option<Millis>,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<HeartbeatRow>, StoreError> {
        sqlx::query(
            "SELECT * FROM heartbeats WHERE vm_id = ? AND received_at >= ? AND seq < ? \
             ORDER BY seq DESC LIMIT ?",
        )
        .bind(vm_id)
        .bind(since.unwrap_or(0))
        .bind(before_seq.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(heartbeat_from_row)
        .collect()
    }

    pub async fn fleet_gauges(&self) -> Result<FleetGauges, StoreError> {
        let heartbeats = sqlx::query(
            "SELECT pool_id, MIN(COALESCE(last_heartbeat_at, booted_at)) AS oldest FROM vms \
             WHERE health != 'lost' AND state != 'terminated' GROUP BY pool_id",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("pool_id")?, r.try_get("oldest")?)))
        .collect::<Result<Vec<(String, Millis)>, StoreError>>()?;
        let states = sqlx::query(
            "SELECT state, MIN(COALESCE(state_since, updated_at)) AS oldest FROM vms \
             WHERE health != 'lost' GROUP BY state",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("state")?, r.try_get("oldest")?)))
        .collect::<Result<Vec<(String, Millis)>, StoreError>>()?;
        let commands = sqlx::query("SELECT state, COUNT(*) AS n FROM commands GROUP BY state")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
            .collect::<Result<Vec<(String, i64)>, StoreError>>()?;
        Ok(FleetGauges {
            oldest_heartbeat_by_pool: heartbeats,
            oldest_by_state: states,
            commands_by_state: commands,
        })
    }

    pub async fn pool_counts(&self) -> Result<Vec<PoolCount>, StoreError> {
        sqlx::query(
            "SELECT pool_id, state, health, COUNT(*) AS n, SUM(connected) AS connected \
             FROM vms GROUP BY pool_id, state, health ORDER BY pool_id, state, health",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            let health: String = r.try_get("health")?;
            Ok(PoolCount {
                pool_id: r.try_get("pool_id")?,
                state: r.try_get("state")?,
                health: health.parse()?,
                count: r.try_get("n")?,
                connected: r.try_get::<Option<i64>, _>("connected")?.unwrap_or(0),
            })
        })
        .collect()
    }

    pub async fn commands_page(&self, f: &CommandFilter) -> Result<Vec<CommandRecord>, StoreError> {
        let mut q = QueryBuilder::<Sqlite>::new("SELECT * FROM commands WHERE 1 = 1");
        if let Some(vm) = &f.vm_id {
            q.push(" AND vm_id = ").push_bind(vm.clone());
        }
        if let Some(state) = f.state {
            q.push(" AND state = ").push_bind(state.as_str());
        }
        if let Some(t) = &f.command_type {
            q.push(" AND command_type = ").push_bind(t.clone());
        }
        if let Some(before) = f.before_seq {
            q.push(" AND seq < ").push_bind(before);
        }
        q.push(" ORDER BY seq DESC LIMIT ")
            .push_bind(i64::from(f.limit));
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(command_from_row)
            .collect()
    }

    pub async fn registrations_for_vm(
        &self,
        vm_id: &str,
    ) -> Result<Vec<RegistrationRow>, StoreError> {
        sqlx::query("SELECT * FROM registrations WHERE vm_id = ? ORDER BY seq")
            .bind(vm_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(RegistrationRow {
                    seq: r.try_get("seq")?,
                    vm_id: r.try_get("vm_id")?,
                    requested_at: r.try_get("requested_at")?,
                    request: r.try_get("request")?,
                    response: r.try_get("response")?,
                })
            })
            .collect()
    }

    pub async fn command_get(&self, id: &str) -> Result<Option<CommandRecord>, StoreError> {
        sqlx::query("SELECT * FROM commands WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| command_from_row(&r))
            .transpose()
    }

    /// Every command of a VM, oldest first.
    pub async fn commands_for_vm(&self, vm_id: &str) -> Result<Vec<CommandRecord>, StoreError> {
        self.commands_of(vm_id, false).await
    }

    /// Pending and delivered commands of a VM, in queue order.
    pub async fn commands_open_for_vm(
        &self,
        vm_id: &str,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        self.commands_of(vm_id, true).await
    }

    async fn commands_of(
        &self,
        vm_id: &str,
        open_only: bool,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let sql = if open_only {
            "SELECT * FROM commands WHERE vm_id = ? AND state IN ('pending', 'delivered') ORDER BY seq"
        } else {
            "SELECT * FROM commands WHERE vm_id = ? ORDER BY seq"
        };
        sqlx::query(sql)
            .bind(vm_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(command_from_row)
            .collect()
    }

    pub async fn command_transitions(
        &self,
        command_id: &str,
    ) -> Result<Vec<CommandTransition>, StoreError> {
        sqlx::query("SELECT * FROM command_transitions WHERE command_id = ? ORDER BY seq")
            .bind(command_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(CommandTransition {
                    command_id: r.try_get("command_id")?,
                    at: r.try_get("at")?,
                    from_state: r.try_get("from_state")?,
                    to_state: r.try_get("to_state")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    pub async fn operator_token_get(
        &self,
        id: &str,
    ) -> Result<Option<OperatorTokenRecord>, StoreError> {
        sqlx::query("SELECT * FROM operator_tokens WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| operator_token_from_row(&r))
            .transpose()
    }

    pub async fn operator_tokens_list(&self) -> Result<Vec<OperatorTokenRecord>, StoreError> {
        sqlx::query("SELECT * FROM operator_tokens ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(operator_token_from_row)
            .collect()
    }

    pub async fn audit_list(
        &self,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AuditRow>, StoreError> {
        sqlx::query("SELECT * FROM audit_log WHERE seq < ? ORDER BY seq DESC LIMIT ?")
            .bind(before_seq.unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(AuditRow {
                    seq: r.try_get("seq")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    remote_addr: r.try_get("remote_addr")?,
                    outcome: r.try_get("outcome")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    pub async fn vm_log_for_vm(&self, vm_id: &str) -> Result<Vec<VmLogRow>, StoreError> {
        sqlx::query("SELECT * FROM vm_log WHERE vm_id = ? ORDER BY seq")
            .bind(vm_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(vm_log_row)
            .collect()
    }

    pub async fn job_get(&self, job_id: i64) -> Result<Option<JobRecord>, StoreError> {
        sqlx::query("SELECT * FROM jobs WHERE job_id = ?")
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| job::job_from_row(&r))
            .transpose()
    }

    /// The jobs of `pool_id` not completed yet (queued, waiting or in progress), oldest
    /// first: what the scaler sizes the pool by.
    pub async fn jobs_open_for_pool(&self, pool_id: &str) -> Result<Vec<JobRecord>, StoreError> {
        sqlx::query(
            "SELECT * FROM jobs WHERE pool_id = ? AND status IN ('queued', 'waiting', 'in_progress')              ORDER BY queued_at, job_id",
        )
        .bind(pool_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(job::job_from_row)
        .collect()
    }

    /// The repositories `pool_id`'s jobs came from since `since`, most recent first, at
    /// most `limit`.
    pub async fn job_repositories(
        &self,
        pool_id: &str,
        since: Millis,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT repository FROM jobs WHERE pool_id = ? AND updated_at >= ? \
             GROUP BY repository ORDER BY MAX(updated_at) DESC LIMIT ?",
        )
        .bind(pool_id)
        .bind(since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// How long `pool_id`'s jobs that started since `since` waited (ms), the latest
    /// `limit`.
    pub async fn job_queue_times(
        &self,
        pool_id: &str,
        since: Millis,
        limit: u32,
    ) -> Result<Vec<Millis>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT MAX(started_at - queued_at, 0) FROM jobs \
             WHERE pool_id = ? AND started_at >= ? ORDER BY started_at DESC LIMIT ?",
        )
        .bind(pool_id)
        .bind(since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// How many instances of `pool_id` were asked for since `since` (deleted ones too).
    pub async fn instances_requested_since(
        &self,
        pool_id: &str,
        since: Millis,
    ) -> Result<u32, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM instances WHERE pool_id = ? AND requested_at >= ?",
        )
        .bind(pool_id)
        .bind(since)
        .fetch_one(&self.pool)
        .await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// The instances of `pool_id` not deleted yet.
    pub async fn instances_live(&self, pool_id: &str) -> Result<Vec<InstanceRecord>, StoreError> {
        sqlx::query(
            "SELECT * FROM instances WHERE pool_id = ? AND state != 'deleted' ORDER BY name",
        )
        .bind(pool_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(job::instance_from_row)
        .collect()
    }

    /// The `limit` instances deleted last, newest first (with why).
    pub async fn instances_deleted(&self, limit: u32) -> Result<Vec<InstanceRecord>, StoreError> {
        sqlx::query(
            "SELECT * FROM instances WHERE state = 'deleted' ORDER BY deleted_at DESC LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(job::instance_from_row)
        .collect()
    }

    pub async fn instance_get(&self, name: &str) -> Result<Option<InstanceRecord>, StoreError> {
        sqlx::query("SELECT * FROM instances WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| job::instance_from_row(&r))
            .transpose()
    }

    /// The `limit` jobs updated last, newest first.
    pub async fn jobs_recent(&self, limit: u32) -> Result<Vec<JobRecord>, StoreError> {
        sqlx::query("SELECT * FROM jobs ORDER BY updated_at DESC, job_id DESC LIMIT ?")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(job::job_from_row)
            .collect()
    }

    /// The VM's latest `limit` log rows of one kind, newest first (walks the VM's index).
    pub async fn vm_log_latest(
        &self,
        vm_id: &str,
        kind: &str,
        limit: u32,
    ) -> Result<Vec<VmLogRow>, StoreError> {
        sqlx::query("SELECT * FROM vm_log WHERE vm_id = ? AND kind = ? ORDER BY seq DESC LIMIT ?")
            .bind(vm_id)
            .bind(kind)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(vm_log_row)
            .collect()
    }
}

fn vm_log_row(r: &sqlx::sqlite::SqliteRow) -> Result<VmLogRow, StoreError> {
    Ok(VmLogRow {
        vm_id: r.try_get("vm_id")?,
        at: r.try_get("at")?,
        kind: r.try_get("kind")?,
        detail: r.try_get("detail")?,
    })
}
