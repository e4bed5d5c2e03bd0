//! The running stack that `up`, the tests, the benchmarks and the chaos runs share: a database
//! prepared for the dashboard, and the service's binaries as child processes.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::netns::Host;
use crate::pg::psql;

/// Applies pending migrations (with `api migrate`, the binary at `api`) to the database at `url`
/// (password included) and seeds `users` users when it has none.
///
/// # Errors
///
/// When the database cannot be reached, migrated or seeded.
pub async fn prepare_database(api: &Path, url: &str, users: u32) -> Result<()> {
    let migrated = Command::new(api)
        .args(["migrate"])
        .env("APP__DATABASE__URL", url)
        .stdin(Stdio::null())
        .status()
        .await
        .with_context(|| format!("cannot run {} migrate", api.display()))?;
    if !migrated.success() {
        bail!("migrating the database failed ({migrated})");
    }
    // Seeding commits everything in one transaction, so users without any order or review mean
    // the data was changed by hand or by an older seeder: seed again from scratch.
    let state = psql(
        url,
        "SELECT EXISTS (SELECT 1 FROM users), EXISTS (SELECT 1 FROM orders) \
                AND EXISTS (SELECT 1 FROM reviews)",
    )?;
    let (has_users, complete) = match state.trim().split_once('|') {
        Some((users, rest)) => (users == "t", rest == "t"),
        None => bail!("unexpected answer from psql: {state:?}"),
    };
    let reseed = has_users && !complete;
    if !has_users || reseed {
        if reseed {
            println!("the users have no orders or reviews; seeding again from scratch");
        }
        println!("seeding {users} users (once; the data stays for next time)");
        let report = crate::seed::seed(url, users, reseed)?;
        println!(
            "seeded {} rows in {:.1} s",
            report.rows(),
            report.load_time.as_secs_f64()
        );
    }
    Ok(())
}

/// The number of users in the database at `url` (ids are 1 to this).
///
/// # Errors
///
/// When the database cannot be queried.
pub fn user_count(url: &str) -> Result<u64> {
    let max = psql(url, "SELECT coalesce(max(id), 0) FROM users")?;
    max.trim()
        .parse()
        .with_context(|| format!("unexpected answer from psql: {max:?}"))
}

/// Builds `packages`' binaries in release mode, with cargo's own progress on the terminal (a
/// no-op when they are up to date).
///
/// # Errors
///
/// When cargo fails.
pub async fn build_release(packages: &[&str]) -> Result<()> {
    let mut command = Command::new(cargo());
    command.args(["build", "--release"]);
    for package in packages {
        command.args(["--package", package]);
    }
    // In a group of its own, stopped with every rustc under it if this future is dropped (a
    // failed step beside it, Ctrl-C): no build goes on after the command has given up.
    let mut child = command
        .process_group(0)
        .spawn()
        .context("cannot run cargo build")?;
    let group = ProcessGroup::of(&child);
    let built = child.wait().await.context("cannot wait for cargo build")?;
    if let Some(mut group) = group {
        group.stopped = true;
    }
    if !built.success() {
        bail!("building {} failed", packages.join(", "));
    }
    Ok(())
}

/// The API built in release mode.
pub const RELEASE_API: &str = "target/release/api";

/// The cargo that runs this command (`CARGO` is set by `cargo run`).
pub fn cargo() -> std::ffi::OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
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
        Self::start_binary(RELEASE_API, port, settings, quiet).await
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
        Self::start_on(None, binary, port, settings, quiet).await
    }

    /// Like [`ApiProcess::start_binary`], on `host` (listening on its address) when given.
    ///
    /// # Errors
    ///
    /// When it cannot start or exits before it answers.
    pub async fn start_on(
        host: Option<&Host>,
        binary: &str,
        port: u16,
        settings: &[(&str, String)],
        quiet: bool,
    ) -> Result<Self> {
        let (mut command, address) = match host {
            Some(host) => {
                let mut command = host.command(binary);
                command.env("APP__SERVER__HOST", host.address.to_string());
                (command, host.address.to_string())
            }
            None => (Command::new(binary), "127.0.0.1".to_owned()),
        };
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
            base: format!("http://{address}:{port}"),
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
        if let Some(pid) = self.child.id().and_then(|id| i32::try_from(id).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
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
        signal_group(self.id, Some(Signal::SIGTERM));
        let gone = tokio::time::timeout(grace, async {
            while group_alive(self.id) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        if gone.is_err() {
            signal_group(self.id, Some(Signal::SIGKILL));
        }
        self.stopped = true;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if !self.stopped {
            signal_group(self.id, Some(Signal::SIGKILL));
        }
    }
}

/// Sends `signal` to the process group `id` (`None` only checks that it exists).
fn signal_group(id: u32, signal: Option<Signal>) -> bool {
    i32::try_from(id).is_ok_and(|id| killpg(Pid::from_raw(id), signal).is_ok())
}

/// Whether any process of the group is left.
fn group_alive(id: u32) -> bool {
    signal_group(id, None)
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

/// A child process that is killed when this value is dropped.
#[derive(Debug)]
pub struct Upstream {
    child: Child,
    /// `http://address:port`.
    pub base_url: String,
}

impl Upstream {
    /// Starts the stand-in recommendation service (the `upstream` binary at `binary`) on
    /// 127.0.0.1:`port` with extra flags, and waits until it accepts connections.
    ///
    /// # Errors
    ///
    /// When it cannot start, exits, or does not listen within 10 s.
    pub async fn start(binary: &str, port: u16, flags: &[String]) -> Result<Self> {
        Self::start_on(None, binary, port, flags).await
    }

    /// Like [`Upstream::start`], on `host` (listening on its address) when given.
    ///
    /// # Errors
    ///
    /// When it cannot start, exits, or does not listen within 10 s.
    pub async fn start_on(
        host: Option<&Host>,
        binary: &str,
        port: u16,
        flags: &[String],
    ) -> Result<Self> {
        let (mut command, ip) = match host {
            Some(host) => (host.command(binary), host.address.to_string()),
            None => (Command::new(binary), "127.0.0.1".to_owned()),
        };
        let mut child = command
            .arg("--host")
            .arg(&ip)
            .arg("--port")
            .arg(port.to_string())
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {binary}"))?;
        let address = format!("{ip}:{port}");
        for _ in 0..100 {
            if let Some(status) = child.try_wait()? {
                bail!("the stand-in recommendation service exited during start-up ({status})");
            }
            if tokio::net::TcpStream::connect(&address).await.is_ok() {
                return Ok(Self {
                    child,
                    base_url: format!("http://{address}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the stand-in recommendation service did not listen on {address} within 10 s")
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Asks it to stop (SIGTERM) and waits up to 5 s, then kills it.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id().and_then(|id| i32::try_from(id).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Where the local stack's HS256 secret lives (`cargo xtask up --auth`, `cargo xtask token`).
pub const DEV_SECRET: &str = "target/auth/secret";

/// The local stack's HS256 secret, made (64 random hex characters, mode 0600) the first time.
///
/// # Errors
///
/// When it cannot be read or written.
pub fn dev_secret() -> Result<String> {
    let path = Path::new(DEV_SECRET);
    if let Ok(secret) = std::fs::read_to_string(path)
        && secret.trim().len() >= 32
    {
        return Ok(secret.trim().to_owned());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let secret = format!(
        "{}{}",
        crate::pg::random_password()?,
        crate::pg::random_password()?
    );
    crate::pg::write_private(path, &secret)?;
    Ok(secret)
}

/// An HS256 token minted by the `api` binary at `api` (`api token`) with `secret`.
///
/// # Errors
///
/// When the binary fails.
pub async fn mint_token(
    api: &str,
    secret: &str,
    sub: &str,
    scopes: &[&str],
    ttl: &str,
) -> Result<String> {
    let mut command = Command::new(api);
    command.args(["token", "--sub", sub, "--ttl", ttl]);
    for scope in scopes {
        command.args(["--scope", scope]);
    }
    let output = command
        .env("APP__AUTH__SECRET", secret)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run {api} token"))?;
    if !output.status.success() {
        bail!(
            "{api} token failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}
