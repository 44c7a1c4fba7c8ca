//! `/admin/pools`: each pool's VMs by state and health.

use super::*;

/// A pool at a glance.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolSummary {
    pub pool_id: String,
    pub total: i64,
    /// Streams open now.
    pub connected: i64,
    #[schema(value_type = Object)]
    pub by_state: BTreeMap<String, i64>,
    #[schema(value_type = Object)]
    pub by_health: BTreeMap<String, i64>,
    /// The runner labels the pool registers with (from the controller's config).
    pub labels: Vec<String>,
    /// How minting registrations on GitHub has been going, for a pool that mints them.
    pub registration: Option<crate::token::SourceStatus>,
    /// The pool's latest alert (e.g. a runner version GitHub no longer accepts).
    pub alert: Option<crate::token::PoolAlert>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolList {
    pub pools: Vec<PoolSummary>,
}

/// Every pool with VMs, with counts by state and health.
#[utoipa::path(get, path = "/api/v1/admin/pools", tag = "pools",
    responses((status = 200, body = PoolList)))]
pub(super) async fn list_pools(State(app): State<AppState>) -> Result<Json<PoolList>, ApiError> {
    let mut pools: BTreeMap<String, PoolSummary> = BTreeMap::new();
    for c in app.reads().pool_counts().await? {
        let p = pools
            .entry(c.pool_id.clone())
            .or_insert_with(|| PoolSummary {
                pool_id: c.pool_id.clone(),
                total: 0,
                connected: 0,
                by_state: BTreeMap::new(),
                by_health: BTreeMap::new(),
                labels: app
                    .settings()
                    .pools
                    .get(&c.pool_id)
                    .map(|r| r.labels.clone())
                    .unwrap_or_default(),
                alert: app.pool_alert(&c.pool_id),
                registration: app
                    .settings()
                    .pools
                    .get(&c.pool_id)
                    .ok()
                    .and_then(|r| r.token.status()),
            });
        p.total += c.count;
        p.connected += c.connected;
        *p.by_state.entry(c.state).or_default() += c.count;
        *p.by_health.entry(c.health.as_str().to_owned()).or_default() += c.count;
    }
    Ok(Json(PoolList {
        pools: pools.into_values().collect(),
    }))
}
