//! Test support: a fresh PostgreSQL database for every test.
//!
//! `cargo xtask test` starts a throwaway cluster, migrates a template database on it, and runs the
//! tests with `DATABASE_URL` pointing at that template. [`TestDb::create`] copies the template
//! into a new database (`CREATE DATABASE ... TEMPLATE`), so every test owns its data and tests run
//! in parallel without seeing each other. The database is dropped when the [`TestDb`] is.
//!
//! A database test run without `DATABASE_URL` fails, saying to use `cargo xtask test`: it never
//! passes silently by skipping its checks.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use repository::DbConfig;

/// A database created for one test, dropped (with its connections) when this value is dropped.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    admin: DbConfig,
    config: DbConfig,
}

impl TestDb {
    /// A new database with the migrated schema and no rows.
    ///
    /// # Panics
    ///
    /// When `DATABASE_URL` is unset or the server cannot create the database: the test fails.
    pub async fn create() -> Self {
        let template = template_url();
        let template_name = database_name(&template);
        Self::create_from(&template, Some(&template_name)).await
    }

    /// A new, empty database (no schema at all), for migration tests.
    ///
    /// # Panics
    ///
    /// When `DATABASE_URL` is unset or the server cannot create the database: the test fails.
    pub async fn empty() -> Self {
        Self::create_from(&template_url(), None).await
    }

    async fn create_from(template_url: &str, template: Option<&str>) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "test_{}_{}_{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let admin = DbConfig::with_url(replace_database(template_url, "postgres"));
        let client = repository::connect(&admin).await.unwrap_or_else(|e| {
            panic!(
                "cannot reach the test cluster at {}: {e}",
                admin.masked_url()
            )
        });
        let template = template.unwrap_or("template0");
        client
            .batch_execute(&format!(
                "CREATE DATABASE \"{name}\" TEMPLATE \"{template}\""
            ))
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let config = DbConfig::with_url(replace_database(template_url, &name));
        Self {
            name,
            admin,
            config,
        }
    }

    /// Settings for a pool on this database (defaults for everything but the URL).
    pub fn config(&self) -> DbConfig {
        self.config.clone()
    }

    /// The connection URL of this database.
    pub fn url(&self) -> &str {
        &self.config.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Settings for this database through PgBouncer in transaction pooling mode (`PGBOUNCER_URL`,
    /// which `cargo xtask test` sets), with the unnamed statements a transaction pooler needs.
    ///
    /// # Panics
    ///
    /// When `PGBOUNCER_URL` is unset: the test fails.
    pub fn pgbouncer_config(&self) -> DbConfig {
        DbConfig {
            statements: repository::Statements::Unnamed,
            ..DbConfig::with_url(replace_database(&env_url("PGBOUNCER_URL"), &self.name))
        }
    }

    /// The URL of this database on the streaming replica of the test cluster (`REPLICA_URL`), or
    /// through the PgBouncer in front of that replica (`REPLICA_PGBOUNCER_URL`), once the
    /// replica has replayed everything written to the primary so far (waits at most 30 s).
    ///
    /// # Panics
    ///
    /// When the variable is unset or the replica does not catch up in time: the test fails.
    pub async fn replica_url(&self, through_pgbouncer: bool) -> String {
        let var = if through_pgbouncer {
            "REPLICA_PGBOUNCER_URL"
        } else {
            "REPLICA_URL"
        };
        let url = replace_database(&env_url(var), &self.name);
        self.wait_for_replica().await;
        url
    }

    /// Waits (at most 30 s) until the replica (`REPLICA_URL`) has replayed the primary's WAL up
    /// to now: what was written to this database is then readable there. The test cluster
    /// commits without waiting for the WAL to be written, so a transaction that commits
    /// synchronously flushes it first (otherwise the write position may be before the last
    /// commit).
    ///
    /// # Panics
    ///
    /// When it does not catch up in time.
    pub async fn wait_for_replica(&self) {
        let primary = repository::connect(&self.admin)
            .await
            .unwrap_or_else(|e| panic!("cannot reach the primary: {e}"));
        primary
            .batch_execute(
                "BEGIN; SET LOCAL synchronous_commit = on; SELECT txid_current(); COMMIT",
            )
            .await
            .unwrap_or_else(|e| panic!("cannot flush the primary's WAL: {e}"));
        let lsn: String = primary
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .and_then(|row| row.try_get(0))
            .unwrap_or_else(|e| panic!("cannot read the primary's WAL position: {e}"));
        let replica = DbConfig::with_url(replace_database(&env_url("REPLICA_URL"), "postgres"));
        let give_up = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(client) = repository::connect(&replica).await
                && let Ok(row) = client
                    .query_one(
                        "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                        &[&lsn],
                    )
                    .await
                && row.try_get::<_, bool>(0).unwrap_or(false)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "the replica did not replay up to {lsn} within 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Settings for the cluster's maintenance database, to run admin statements
    /// (for example to terminate this database's connections).
    pub fn admin_config(&self) -> DbConfig {
        self.admin.clone()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Dropping is async and Drop is not: do it on a thread with its own small runtime, so it
        // works whether or not the test's runtime is still running.
        let admin = self.admin.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let client = repository::connect(&admin).await.ok()?;
                // Bounded: PostgreSQL 15's DROP DATABASE waits until every backend has taken a
                // signal (a ProcSignalBarrier), which one still authenticating does not take. A
                // connection of this test that was half-way through its handshake when the test
                // ended (a background health check's, say) stays there while this blocks the
                // test's runtime, and the drop would wait for its statement timeout (30 s,
                // seen in `cargo xtask test`), holding up every other test's drop with it.
                client
                    .batch_execute("SET statement_timeout = '2s'")
                    .await
                    .ok()?;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
        // A database that could not be dropped only costs disk on a throwaway cluster, removed
        // with it at the end of the run.
        let _ = dropped;
    }
}

/// The small data set the service and API tests share: users 1 (`ada`: two orders, one review),
/// 2 (`bob`: nothing, no avatar) and 3 (`cy`: one order); ids above 3 do not exist.
///
/// # Panics
///
/// When the rows cannot be inserted: the test fails.
pub async fn insert_fixtures(db: &TestDb) {
    let client = repository::connect(&db.config())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", db.name()));
    client
        .batch_execute(
            "INSERT INTO users (id, username, email, avatar) VALUES
                 (1, 'ada', 'ada@example.com', 'https://img/ada.png'),
                 (2, 'bob', 'bob@example.com', NULL),
                 (3, 'cy', 'cy@example.com', NULL);
             INSERT INTO orders (user_id, product, amount, created_at) VALUES
                 (1, 'keyboard', 49.99, '2025-01-02 10:00:00+00'),
                 (1, 'mouse', 0.10, '2025-03-04 10:00:00+00'),
                 (3, 'lamp', 15.00, '2025-05-05 05:05:05+00');
             INSERT INTO reviews (user_id, product_id, rating, content) VALUES
                 (1, 501, 5, 'great');",
        )
        .await
        .unwrap_or_else(|e| panic!("cannot insert the fixtures: {e}"));
}

/// A table locked by another session (`ACCESS EXCLUSIVE`), so that statements touching it wait
/// on the server: a slow database, made on purpose. Released by [`TableLock::release`] or when
/// dropped (the session then ends and the lock with it).
#[derive(Debug)]
pub struct TableLock(tokio_postgres::Client);

impl TableLock {
    /// Locks `table` in `db` from a session of its own.
    ///
    /// # Panics
    ///
    /// When the lock cannot be taken: the test fails.
    pub async fn take(db: &TestDb, table: &str) -> Self {
        let client = repository::connect(&db.config())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", db.name()));
        client
            .batch_execute(&format!(
                "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
            ))
            .await
            .unwrap_or_else(|e| panic!("cannot lock {table}: {e}"));
        Self(client)
    }

    /// Releases the lock.
    ///
    /// # Panics
    ///
    /// When the session is gone: the test fails.
    pub async fn release(self) {
        self.0
            .batch_execute("ROLLBACK")
            .await
            .unwrap_or_else(|e| panic!("cannot release the lock: {e}"));
    }
}

/// The template database's URL from `DATABASE_URL`.
///
/// # Panics
///
/// When it is unset: database tests need the cluster that `cargo xtask test` starts.
pub fn template_url() -> String {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "DATABASE_URL is not set: database tests need a PostgreSQL server. \
             Run the tests with `cargo xtask test`, which starts a throwaway cluster."
        ),
    }
}

/// A URL from the environment that `cargo xtask test` sets.
fn env_url(var: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{var} is not set: this test needs the PgBouncer and the replica that \
             `cargo xtask test` starts next to its throwaway cluster."
        ),
    }
}

/// The database name at the end of a `postgres://.../name?params` URL.
fn database_name(url: &str) -> String {
    let path = url.split('?').next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or_default().to_owned()
}

/// The same URL with another database name.
fn replace_database(url: &str, database: &str) -> String {
    let (path, query) = match url.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (url, None),
    };
    let base = path.rsplit_once('/').map_or(path, |(base, _)| base);
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_the_database_name_only() {
        assert_eq!(
            replace_database("postgres://u:p@h:1/tpl?sslmode=disable", "x"),
            "postgres://u:p@h:1/x?sslmode=disable"
        );
        assert_eq!(database_name("postgres://u:p@h:1/tpl?a=b"), "tpl");
    }
}
