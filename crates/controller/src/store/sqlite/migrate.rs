//! The schema: numbered migrations, each applied once, in order, in its own transaction.

use super::*;

/// Numbered migrations, applied in order, each once. Never edit a released one: add a new one.
pub(super) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../../migrations/0001_init.sql")),
    (2, "auth", include_str!("../../../migrations/0002_auth.sql")),
    (
        3,
        "state_since",
        include_str!("../../../migrations/0003_state_since.sql"),
    ),
    (
        4,
        "retention",
        include_str!("../../../migrations/0004_retention.sql"),
    ),
    (
        5,
        "pool_binding",
        include_str!("../../../migrations/0005_pool_binding.sql"),
    ),
    (6, "jobs", include_str!("../../../migrations/0006_jobs.sql")),
    (
        7,
        "instances",
        include_str!("../../../migrations/0007_instances.sql"),
    ),
];

pub(super) async fn migrate(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY NOT NULL, \
         name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
    )
    .execute(&mut *conn)
    .await?;
    for &(version, name, sql) in MIGRATIONS {
        let applied = sqlx::query("SELECT 1 FROM schema_migrations WHERE version = ?")
            .bind(version)
            .fetch_optional(&mut *conn)
            .await?
            .is_some();
        if applied {
            continue;
        }
        let err = |source| StoreError::Migrate {
            version,
            name,
            source,
        };
        let mut tx = conn.begin().await.map_err(err)?;
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(err)?;
        sqlx::query("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)")
            .bind(version)
            .bind(name)
            .bind(Utc::now().timestamp_millis())
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
        tracing::info!(version, name, "Applied store migration");
    }
    Ok(())
}
