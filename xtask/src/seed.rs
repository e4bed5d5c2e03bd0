//! `cargo xtask seed --users N [--reset]`: deterministic pseudo-random users, orders and reviews.
//!
//! The rows are generated inside PostgreSQL by `xtask/sql/seed.sql`, run with psql: every value
//! is drawn from a hash of the user's id, so the same N always gives the same rows. The data is
//! skewed like real data (see the SQL). Generating in the server avoids shipping a million rows
//! over the wire: 100 000 users (about 1.3 million rows) take about 7 s on a 2-core machine.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The generator, run by psql from standard input.
const SEED_SQL: &str = include_str!("../sql/seed.sql");

/// What a seeding run wrote and how fast.
#[derive(Debug, Clone, Copy)]
pub struct SeedReport {
    /// Rows in `users`.
    pub users: u64,
    /// Rows in `orders`.
    pub orders: u64,
    /// Rows in `reviews`.
    pub reviews: u64,
    /// Time spent generating and loading, ANALYZE included.
    pub load_time: Duration,
}

impl SeedReport {
    /// All rows written.
    pub fn rows(&self) -> u64 {
        self.users + self.orders + self.reviews
    }
}

/// Fills the database at `url` (password included) with `users` users and their orders and
/// reviews. With `reset`, empties the three tables first; without it, refuses a database that
/// already has users.
///
/// # Errors
///
/// When the database is unreachable, has no schema, already has users (without `reset`), or the
/// generator fails.
pub fn seed(url: &str, users: u32, reset: bool) -> Result<SeedReport> {
    let query = |sql: &str| crate::pg::psql(url, sql);
    let has_schema = query("SELECT to_regclass('users') IS NOT NULL").with_context(
        || "cannot reach the database (for the local cluster, run `cargo xtask db start` first)",
    )?;
    if has_schema.trim() != "t" {
        bail!("the database has no `users` table: run `cargo xtask migrate` first");
    }
    let has_users = query("SELECT EXISTS (SELECT 1 FROM users)")?;
    if has_users.trim() == "t" && !reset {
        bail!(
            "the database already has users; seeding would mix old and new rows. Re-run with \
             --reset to delete every user, order and review first."
        );
    }
    if reset {
        query("TRUNCATE users, orders, reviews RESTART IDENTITY")
            .context("cannot truncate the tables")?;
    }

    let started = Instant::now();
    let mut psql = Command::new(crate::pg::find_bin_dir()?.join("psql"))
        .args(["-X", "-q", "-v", &format!("users={users}"), "-f", "-", url])
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run psql")?;
    if let Some(mut stdin) = psql.stdin.take() {
        stdin
            .write_all(SEED_SQL.as_bytes())
            .context("cannot send the generator to psql")?;
    }
    let output = psql.wait_with_output().context("psql failed")?;
    if !output.status.success() {
        bail!(
            "seeding failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let load_time = started.elapsed();

    let counts = query(
        "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM orders), \
                (SELECT count(*) FROM reviews)",
    )?;
    let counts: Vec<u64> = counts
        .trim()
        .split('|')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("unexpected counts from psql: {counts:?}"))?;
    let [users, orders, reviews] = counts[..] else {
        bail!("unexpected counts from psql: {counts:?}");
    };
    Ok(SeedReport {
        users,
        orders,
        reviews,
        load_time,
    })
}

#[cfg(test)]
mod tests {
    use testkit::TestDb;

    use super::*;

    fn checksum(db: &TestDb) -> String {
        crate::pg::psql(
            db.url(),
            "SELECT (SELECT md5(string_agg(u::text, '|' ORDER BY id)) FROM users u) \
                 || (SELECT md5(string_agg(o::text, '|' ORDER BY id)) FROM orders o) \
                 || (SELECT md5(string_agg(r::text, '|' ORDER BY id)) FROM reviews r)",
        )
        .unwrap()
    }

    #[tokio::test]
    async fn the_same_n_gives_the_same_rows() {
        let (a, b) = (TestDb::create().await, TestDb::create().await);
        let first = seed(a.url(), 3_000, false).unwrap();
        let second = seed(b.url(), 3_000, false).unwrap();
        assert_eq!(first.rows(), second.rows());
        assert_eq!(checksum(&a), checksum(&b));

        // Re-seeding with --reset reproduces the rows, identity ids included.
        seed(a.url(), 3_000, true).unwrap();
        assert_eq!(checksum(&a), checksum(&b));
    }

    #[tokio::test]
    async fn data_is_skewed_around_ten_orders_and_three_reviews() {
        let db = TestDb::create().await;
        let report = seed(db.url(), 5_000, false).unwrap();
        assert_eq!(report.users, 5_000);
        let per_user = report.orders as f64 / 5_000.0;
        assert!(
            (8.5..11.5).contains(&per_user),
            "{per_user} orders per user"
        );
        let per_user = report.reviews as f64 / 5_000.0;
        assert!(
            (2.4..3.6).contains(&per_user),
            "{per_user} reviews per user"
        );

        let row = crate::pg::psql(
            db.url(),
            "SELECT count(*) FILTER (WHERE n = 0), max(n) FROM \
             (SELECT u.id, count(o.id) AS n FROM users u LEFT JOIN orders o ON o.user_id = u.id \
              GROUP BY u.id) s",
        )
        .unwrap();
        let (without, most) = row.trim().split_once('|').unwrap();
        let (without, most): (i64, i64) = (without.parse().unwrap(), most.parse().unwrap());
        assert!(without > 300, "{without} users without orders");
        assert!(most >= 100, "the busiest user has only {most} orders");
    }

    #[tokio::test]
    async fn refuses_a_database_with_users_unless_reset() {
        let db = TestDb::create().await;
        seed(db.url(), 10, false).unwrap();
        let err = seed(db.url(), 10, false).unwrap_err().to_string();
        assert!(err.contains("--reset"), "{err}");
        let report = seed(db.url(), 20, true).unwrap();
        assert_eq!(report.users, 20);
    }

    #[tokio::test]
    async fn refuses_a_database_without_schema() {
        let db = TestDb::empty().await;
        let err = seed(db.url(), 10, false).unwrap_err().to_string();
        assert!(err.contains("cargo xtask migrate"), "{err}");
    }
}
