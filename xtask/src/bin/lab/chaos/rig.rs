//! What the chaos scenarios run against: a throwaway PostgreSQL cluster, API processes, and the
//! probes that look inside them (`/metrics`, `pg_stat_activity`, `/proc`).
//!
//! The cluster lives under `target/pg/chaos` on a free port and is deleted when the [`Rig`] is
//! dropped, whatever happened. Each scenario starts API processes of its own from
//! `target/release/api`, on free ports, with their log in `target/chaos/<name>.log` and a
//! `database.application_name` of their own, so the database's view of them can be told apart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use repository::DbConfig;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::client;
use xtask::pg::Cluster;
use xtask::stack;

/// The throwaway cluster's home.
const CLUSTER_DIR: &str = "target/pg/chaos";
/// Where the API logs go.
pub const LOG_DIR: &str = "target/chaos";
/// The database the API reads.
const DATABASE: &str = "dashboard";

/// The cluster and how to reach it; dropping it deletes the cluster.
pub struct Rig {
    cluster: Cluster,
    /// Superuser settings for the dashboard database (password in the URL).
    pub db: DbConfig,
    password: String,
    /// Users seeded (ids 1 to this).
    pub users: u64,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Err(e) = self.cluster.destroy() {
            eprintln!("warning: could not remove the chaos cluster: {e:#}");
        }
    }
}

impl Rig {
    /// Creates, starts, migrates and seeds a cluster of its own.
    ///
    /// # Errors
    ///
    /// When PostgreSQL cannot be started or the database prepared.
    pub async fn start(users: u32) -> Result<Self> {
        let port = stack::free_port()?;
        let cluster = Cluster::throwaway(Path::new(CLUSTER_DIR), port)?;
        // A run that was killed may have left its cluster behind.
        cluster.destroy()?;
        // Built first, so that the cluster is removed on every way out of here.
        let mut rig = Self {
            db: DbConfig::default(),
            password: String::new(),
            cluster,
            users: u64::from(users),
        };
        rig.cluster.start().await?;
        rig.cluster.create_database(DATABASE, None)?;
        let url = rig.cluster.url(DATABASE)?;
        let mut db = DbConfig::with_url(url.clone());
        db.application_name = "chaos-monitor".to_owned();
        rig.password = std::fs::read_to_string(rig.cluster.password_file())
            .context("cannot read the chaos cluster's password")?
            .trim()
            .to_owned();
        rig.db = db;
        stack::prepare_database(Path::new(stack::RELEASE_API), &url, users).await?;
        std::fs::create_dir_all(LOG_DIR).with_context(|| format!("cannot create {LOG_DIR}"))?;
        Ok(rig)
    }

    /// The cluster's port.
    pub fn port(&self) -> u16 {
        self.cluster.port
    }

    /// Stops PostgreSQL (fast shutdown: running statements are cancelled, sessions ended).
    /// Runs on a blocking thread, so load tasks keep running meanwhile.
    ///
    /// # Errors
    ///
    /// When `pg_ctl stop` fails.
    pub async fn stop_database(&self) -> Result<()> {
        let cluster = self.cluster.clone();
        tokio::task::spawn_blocking(move || cluster.stop())
            .await
            .context("the pg_ctl thread failed")??;
        Ok(())
    }

    /// Starts PostgreSQL again and returns once it accepts connections.
    ///
    /// # Errors
    ///
    /// When it does not come up.
    pub async fn start_database(&self) -> Result<()> {
        let cluster = self.cluster.clone();
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || runtime.block_on(cluster.start()))
            .await
            .context("the pg_ctl thread failed")?
    }

    /// A monitoring connection (application name `chaos-monitor`).
    ///
    /// # Errors
    ///
    /// When the database cannot be reached.
    pub async fn monitor(&self) -> Result<tokio_postgres::Client> {
        repository::connect(&self.db)
            .await
            .context("cannot connect to the chaos cluster")
    }

    /// The API's sessions in `pg_stat_activity`, counted by state (`active`, `idle`, ...).
    ///
    /// # Errors
    ///
    /// When the query fails.
    pub async fn sessions(&self, application_name: &str) -> Result<BTreeMap<String, i64>> {
        let client = self.monitor().await?;
        let rows = client
            .query(
                "SELECT coalesce(state, 'unknown'), count(*) FROM pg_stat_activity \
                 WHERE application_name = $1 GROUP BY 1",
                &[&application_name],
            )
            .await
            .context("cannot read pg_stat_activity")?;
        Ok(rows
            .iter()
            .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1)))
            .collect())
    }

    /// Takes an `ACCESS EXCLUSIVE` lock on `table` in an open transaction, so every statement
    /// that reads it waits: a stalled database, made from outside the API. The lock is held
    /// until [`TableLock::release`] or until the value is dropped (the connection closes).
    ///
    /// # Errors
    ///
    /// When the lock cannot be taken.
    pub async fn lock_table(&self, table: &str) -> Result<TableLock> {
        let client = self.monitor().await?;
        client
            .batch_execute(&format!(
                "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
            ))
            .await
            .with_context(|| format!("cannot lock {table}"))?;
        Ok(TableLock { client })
    }

    /// Starts an API process named `name` with the given extra settings (`APP__...` pairs) and
    /// waits until it answers `/healthz`.
    ///
    /// # Errors
    ///
    /// When it cannot start or does not become healthy.
    pub async fn api(&self, name: &str, settings: &[(&str, String)]) -> Result<Api> {
        let port = stack::free_port()?;
        let log = Path::new(LOG_DIR).join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let log_err = log_file.try_clone().context("cannot share the log file")?;
        let application_name = format!("chaos-{name}");
        let mut command = Command::new("target/release/api");
        command
            .env("APP__SERVER__PORT", port.to_string())
            .env(
                "APP__DATABASE__URL",
                format!(
                    "postgres://dashboard@127.0.0.1:{}/{DATABASE}",
                    self.cluster.port
                ),
            )
            .env("APP__DATABASE__PASSWORD", &self.password)
            .env("APP__DATABASE__APPLICATION_NAME", &application_name)
            .env("APP__TELEMETRY__LEVEL", "info")
            .env_remove("DATABASE_URL")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .kill_on_drop(true);
        for (key, value) in settings {
            command.env(key, value);
        }
        let child = command.spawn().context("cannot start target/release/api")?;
        let mut api = Api {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            application_name,
            log,
        };
        api.wait_until_healthy().await?;
        Ok(api)
    }
}

/// A lock held from outside the API; see [`Rig::lock_table`].
pub struct TableLock {
    client: tokio_postgres::Client,
}

impl TableLock {
    /// Ends the transaction, releasing the lock.
    ///
    /// # Errors
    ///
    /// When the database does not answer.
    pub async fn release(self) -> Result<()> {
        self.client
            .batch_execute("ROLLBACK")
            .await
            .context("cannot release the lock")
    }
}

/// One API process.
pub struct Api {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its `application_name` in `pg_stat_activity`.
    pub application_name: String,
    /// Its log file.
    pub log: PathBuf,
}

impl Api {
    async fn wait_until_healthy(&mut self) -> Result<()> {
        let address = self.addr.to_string();
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the API exited during start-up ({status}); see {}",
                    self.log.display()
                );
            }
            if stack::healthz(&address).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the API did not answer /healthz within 30 s")
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// One line of `/proc/PID/status`, in KiB (`VmHWM`, `VmRSS`).
    pub fn memory_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Open sockets of the process (listener, client connections and their watchers, database
    /// and upstream connections).
    pub fn open_sockets(&self) -> Option<usize> {
        let pid = self.pid()?;
        let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        Some(
            entries
                .flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
                })
                .count(),
        )
    }

    /// The current `/metrics`.
    ///
    /// # Errors
    ///
    /// When the API does not answer it.
    pub async fn metrics(&self) -> Result<Metrics> {
        metrics_at(self.addr).await
    }

    /// Polls `/metrics` until `settled` holds or `within` passes; returns the last reading and
    /// how long it took.
    ///
    /// # Errors
    ///
    /// When `/metrics` cannot be read.
    pub async fn metrics_when(
        &self,
        within: Duration,
        settled: impl Fn(&Metrics) -> bool,
    ) -> Result<(Metrics, Duration, bool)> {
        let started = Instant::now();
        loop {
            let metrics = self.metrics().await?;
            // The scrape itself is a request in flight: it is not counted against settling.
            if settled(&metrics) {
                return Ok((metrics, started.elapsed(), true));
            }
            if started.elapsed() >= within {
                return Ok((metrics, started.elapsed(), false));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM.
    ///
    /// # Errors
    ///
    /// When `kill` cannot be run.
    pub async fn terminate(&self) -> Result<()> {
        let pid = self.pid().context("the API has already exited")?;
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        Ok(())
    }

    /// Waits for the process to exit, at most `patience`; kills it after that.
    ///
    /// # Errors
    ///
    /// When waiting fails.
    pub async fn wait_exit(&mut self, patience: Duration) -> Result<(ExitStatus, bool)> {
        match tokio::time::timeout(patience, self.child.wait()).await {
            Ok(status) => Ok((status?, true)),
            Err(_) => {
                self.child.kill().await?;
                Ok((self.child.wait().await?, false))
            }
        }
    }

    /// Stops the process gracefully (SIGTERM, then SIGKILL after 15 s).
    ///
    /// # Errors
    ///
    /// When signalling or waiting fails.
    pub async fn stop(mut self) -> Result<ExitStatus> {
        if self.is_running() {
            self.terminate().await?;
        }
        Ok(self.wait_exit(Duration::from_secs(15)).await?.0)
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The `/metrics` of the API listening at `addr`, read within 2 s.
///
/// # Errors
///
/// When it does not answer 200 in time.
pub async fn metrics_at(addr: SocketAddr) -> Result<Metrics> {
    let answer = client::fetch(
        addr,
        &client::get("/metrics", false),
        Duration::from_secs(2),
    )
    .await
    .map_err(|lost| anyhow::anyhow!("{addr}/metrics failed: {}", lost.failure.as_str()))?;
    if answer.status != 200 {
        bail!("{addr}/metrics answered {}", answer.status);
    }
    Ok(Metrics::parse(&answer.text()))
}

/// A parsed `/metrics` page: every sample by its full name with labels.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    samples: BTreeMap<String, f64>,
}

impl Metrics {
    /// Parses the Prometheus/OpenMetrics text format.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .filter_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect();
        Self { samples }
    }

    /// A sample without labels (a gauge), or `NaN` when absent.
    pub fn get(&self, name: &str) -> f64 {
        self.samples.get(name).copied().unwrap_or(f64::NAN)
    }

    /// Live task-group children, database slots in use, pool size, idle, waiting and requests in
    /// flight, as one line for the report.
    pub fn state_line(&self) -> String {
        format!(
            "live children {}, db slots in use {}, pool size {} idle {} waiting {} (max {}), requests in flight {}",
            self.get("taskgroup_live_children"),
            self.get("db_slots_in_use"),
            self.get("db_pool_size"),
            self.get("db_pool_idle"),
            self.get("db_pool_waiting"),
            self.get("db_pool_max_size"),
            self.get("http_requests_in_flight"),
        )
    }

    /// Nothing left behind: no live children, no slot in use, every pooled connection idle,
    /// nobody waiting, and no request in flight but the scrape itself.
    pub fn is_quiet(&self) -> bool {
        self.get("taskgroup_live_children") == 0.0
            && self.get("db_slots_in_use") == 0.0
            && self.get("db_pool_waiting") == 0.0
            && self.get("db_pool_idle") == self.get("db_pool_size")
            && self.get("http_requests_in_flight") <= 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_gauges_and_labelled_samples() {
        let metrics = Metrics::parse(
            "# HELP db_pool_size Connections open now.\n# TYPE db_pool_size gauge\n\
             db_pool_size 20\ndb_pool_idle 20\n\
             dashboard_source_errors_total{source=\"recommendations\",kind=\"timeout\"} 3\n\
             dashboard_source_errors_total{source=\"recommendations\",kind=\"status\"} 2\n\
             dashboard_source_errors_total{source=\"orders\",kind=\"timeout\"} 1\n# EOF\n",
        );
        assert_eq!(metrics.get("db_pool_size"), 20.0);
        assert!(metrics.get("missing").is_nan());
        assert_eq!(
            metrics.get("dashboard_source_errors_total{source=\"orders\",kind=\"timeout\"}"),
            1.0
        );
    }
}
