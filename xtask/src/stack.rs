//! The running stack that `up`, the benchmarks and the chaos runs share: a database prepared for
//! the dashboard, and the API as a child process built in release mode.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use repository::DbConfig;
use tokio::process::{Child, Command};

/// Applies pending migrations and seeds `users` users when the database has none.
///
/// # Errors
///
/// When the database cannot be reached, migrated or seeded.
pub async fn prepare_database(database: &DbConfig, users: u32) -> Result<()> {
    let mut client = repository::connect(database)
        .await
        .with_context(|| format!("cannot connect to {}", database.masked_url()))?;
    let applied =
        crate::migrate::apply(&mut client, Path::new(crate::migrate::MIGRATIONS_DIR)).await?;
    if !applied.is_empty() {
        println!("migrations: {} applied", applied.len());
    }
    // Seeding commits users first, then orders and reviews on other connections: users without
    // any order or review mean a seeding run was interrupted, so it is done again from scratch.
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM users), EXISTS (SELECT 1 FROM orders), \
                    EXISTS (SELECT 1 FROM reviews)",
            &[],
        )
        .await?;
    let (has_users, has_orders, has_reviews): (bool, bool, bool) =
        (row.get(0), row.get(1), row.get(2));
    let reseed = has_users && !(has_orders && has_reviews);
    if !has_users || reseed {
        if reseed {
            println!("the last seeding was interrupted; seeding again from scratch");
        }
        println!("seeding {users} users (once; the data stays for next time)");
        let report = crate::seed::seed(database, users, reseed, true).await?;
        println!(
            "seeded {} rows ({:.0} rows/s)",
            report.rows(),
            report.rows() as f64 / report.load_time.as_secs_f64().max(1e-9)
        );
    }
    Ok(())
}

/// The number of users in the database (ids are 1 to this).
///
/// # Errors
///
/// When the database cannot be queried.
pub async fn user_count(database: &DbConfig) -> Result<u64> {
    let client = repository::connect(database).await?;
    let max: Option<i64> = client
        .query_one("SELECT max(id) FROM users", &[])
        .await?
        .get(0);
    Ok(max.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
}

/// Builds the API in release mode (quietly; a no-op when it is up to date).
///
/// # Errors
///
/// When cargo fails.
pub async fn build_api() -> Result<()> {
    let built = Command::new(crate::up::cargo())
        .args(["build", "--release", "--quiet", "--package", "api"])
        .status()
        .await
        .context("cannot run cargo build")?;
    if !built.success() {
        bail!("building the API failed");
    }
    Ok(())
}

/// The API running as a child process.
#[derive(Debug)]
pub struct ApiProcess {
    child: Child,
    /// `http://host:port`.
    pub base: String,
}

impl ApiProcess {
    /// Starts `target/release/api` with extra `APP__...` settings and waits until it answers
    /// `/healthz`. The child is killed if this value is dropped without [`ApiProcess::stop`].
    ///
    /// # Errors
    ///
    /// When it cannot start or exits before it answers.
    pub async fn start(port: u16, settings: &[(&str, String)], quiet: bool) -> Result<Self> {
        Self::start_binary("target/release/api", port, settings, quiet).await
    }

    /// Like [`ApiProcess::start`], with another build of the API.
    ///
    /// # Errors
    ///
    /// When it cannot start or exits before it answers.
    pub async fn start_binary(
        binary: &str,
        port: u16,
        settings: &[(&str, String)],
        quiet: bool,
    ) -> Result<Self> {
        let mut command = Command::new(binary);
        command
            .env("APP__SERVER__PORT", port.to_string())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (key, value) in settings {
            command.env(key, value);
        }
        if quiet {
            command.stdout(Stdio::null());
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {binary}"))?;
        let mut api = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        api.wait_until_ready().await?;
        Ok(api)
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The child, to wait on it.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Peak resident memory so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
    }

    async fn wait_until_ready(&mut self) -> Result<()> {
        let address = self.base.trim_start_matches("http://").to_owned();
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait()? {
                bail!("the API exited during start-up ({status}); its log is above");
            }
            if healthz(&address).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "the API did not answer on {}/healthz within 60 s",
            self.base
        )
    }

    /// Asks the API to stop (SIGTERM: it drains in-flight requests) and waits at most `patience`
    /// before killing it.
    ///
    /// # Errors
    ///
    /// When waiting on the process fails.
    pub async fn stop(mut self, patience: Duration) -> Result<ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        match tokio::time::timeout(patience, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                eprintln!("the API did not stop within {patience:?}; killing it");
                self.child.kill().await?;
                Ok(self.child.wait().await?)
            }
        }
    }
}

/// One `GET /healthz` over a raw connection (xtask needs no HTTP client for this).
pub async fn healthz(address: &str) -> bool {
    answers_200(address, "/healthz").await
}

/// Whether `GET path` answers 200 within a second.
pub async fn answers_200(address: &str, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut tcp = tokio::net::TcpStream::connect(address).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: local\r\nconnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        tcp.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// A child started with `process_group(0)`: its whole group is signalled together, and killed
/// when this value is dropped, so no grandchild (a test binary, a uvicorn worker) outlives it.
#[derive(Debug)]
pub struct ProcessGroup {
    id: u32,
    stopped: bool,
}

impl ProcessGroup {
    /// The group led by `child`, if it is still running.
    pub fn of(child: &Child) -> Option<Self> {
        child.id().map(|id| Self { id, stopped: false })
    }

    /// Sends SIGTERM to the group, waits up to `grace` for it to go away, then sends SIGKILL.
    pub async fn stop(mut self, grace: Duration) {
        signal_group(self.id, "-TERM");
        let gone = tokio::time::timeout(grace, async {
            while group_alive(self.id) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if gone.is_err() {
            signal_group(self.id, "-KILL");
        }
        self.stopped = true;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if !self.stopped {
            signal_group(self.id, "-KILL");
        }
    }
}

fn signal_group(id: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .args([signal, "--", &format!("-{id}")])
        .stderr(Stdio::null())
        .status();
}

/// Whether any process of the group is left (`kill -0` on the group).
fn group_alive(id: u32) -> bool {
    std::process::Command::new("kill")
        .args(["-0", "--", &format!("-{id}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
///
/// # Errors
///
/// When no port can be bound.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}
