//! A project-local PostgreSQL cluster: initdb, start, stop and status, with no set-up.
//!
//! The cluster lives in a directory of the project (its data, its log and a generated password),
//! listens on 127.0.0.1 only, and keeps its Unix socket in its data directory, so it never clashes
//! with a system PostgreSQL. `initdb` refuses to run as root, so as root every server command runs
//! as the unprivileged `postgres` system user through `runuser`; when that user cannot reach the
//! project directory (a checkout under `/root`, say), the data moves to a directory under the
//! system temp dir, named after the project path so every run finds it again.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::settings::{PgUrl, Settings};

/// How long `start` waits for the server to accept connections.
/// Where the development cluster lives (data, log, password), relative to the workspace;
/// `database.password_file` in `config/default.toml` points into it.
pub const DEV_CLUSTER_DIR: &str = "target/pg/dev";
/// The development cluster's server settings.
const DEV_SERVER_SETTINGS: [&str; 2] = ["shared_buffers=256MB", "max_connections=200"];

const START_DEADLINE: Duration = Duration::from_secs(30);

/// A cluster on this machine, described by where it lives and how to reach it.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Root-owned directory with the password file (and, when reachable, the data).
    state_dir: PathBuf,
    /// Directory the server user owns: `data/` and `server.log`.
    server_dir: PathBuf,
    bin_dir: PathBuf,
    run_as: Option<SystemUser>,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Superuser role, created by initdb.
    pub user: String,
    /// Server settings written to the cluster's `xtask.conf` at each start.
    pub settings: Vec<String>,
}

#[derive(Debug, Clone)]
struct SystemUser {
    name: String,
    uid: u32,
    gid: u32,
}

/// What `pg_ctl status` and a connection attempt say about a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// `initdb` has not run.
    Uninitialized,
    /// Initialised, no server running.
    Stopped,
    /// A server is running.
    Running,
}

impl Cluster {
    /// Describes the cluster kept in `state_dir`, creating the directories it needs.
    ///
    /// # Errors
    ///
    /// When the PostgreSQL binaries are missing or the directories cannot be prepared.
    pub fn new(state_dir: &Path, port: u16, user: &str, settings: Vec<String>) -> Result<Self> {
        let bin_dir = find_bin_dir()?;
        let (state_dir, server_dir, run_as) = server_dirs(state_dir)?;
        Ok(Self {
            state_dir,
            server_dir,
            bin_dir,
            run_as,
            port,
            user: user.to_owned(),
            settings,
        })
    }

    /// Makes the server speak TLS from its next start (`ssl = on`): a certificate authority of
    /// this cluster's own and a server certificate it signed, for `localhost` and 127.0.0.1 (P-256,
    /// openssl). Returns the authority's certificate, which clients verify the server with.
    /// A replica made afterwards uses the same certificate.
    ///
    /// # Errors
    ///
    /// When openssl fails or the files cannot be written or handed to the server user.
    pub fn enable_tls(&mut self) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.server_dir)
            .with_context(|| format!("cannot create {}", self.server_dir.display()))?;
        let authority = self.state_dir.join("tls-ca.crt");
        let authority_key = self.state_dir.join("tls-ca.key");
        let (certificate, key) = (
            self.server_dir.join("server.crt"),
            self.server_dir.join("server.key"),
        );
        let p256 = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-noenc",
        ];
        openssl(
            &[
                &[
                    "req",
                    "-x509",
                    "-days",
                    "30",
                    "-subj",
                    "/CN=dashboard test CA",
                ],
                &p256[..],
                &["-addext", "basicConstraints=critical,CA:TRUE"],
                &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ],
            &authority_key,
            &authority,
        )?;
        let (ca, ca_key) = (authority.to_string_lossy(), authority_key.to_string_lossy());
        openssl(
            &[
                &["req", "-x509", "-days", "30", "-subj", "/CN=localhost"],
                &["-CA", &ca, "-CAkey", &ca_key],
                &p256[..],
                &["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                &["-addext", "basicConstraints=critical,CA:FALSE"],
                &["-addext", "extendedKeyUsage=serverAuth"],
            ],
            &key,
            &certificate,
        )?;
        // PostgreSQL refuses a key that others may read.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", key.display()))?;
        self.give_to_server_user(&key)?;
        self.give_to_server_user(&certificate)?;
        self.settings.extend([
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", certificate.display()),
            format!("ssl_key_file={}", key.display()),
        ]);
        Ok(authority)
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.server_dir.join("data")
    }

    /// The server's log file.
    pub fn log_file(&self) -> PathBuf {
        self.server_dir.join("server.log")
    }

    /// The file holding the superuser's password.
    pub fn password_file(&self) -> PathBuf {
        self.state_dir.join("password")
    }

    /// A cluster deleted after the run (tests, chaos): durability off, room for many connections.
    ///
    /// # Errors
    ///
    /// As [`Cluster::new`].
    pub fn throwaway(state_dir: &Path, port: u16) -> Result<Self> {
        let settings = [
            // Durability is worthless for a cluster deleted after the run; speed is not.
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            "max_connections=300",
            "shared_buffers=128MB",
        ];
        Self::new(
            state_dir,
            port,
            "dashboard",
            settings.map(String::from).to_vec(),
        )
    }

    /// The URL of `database` on this cluster, password included.
    ///
    /// # Errors
    ///
    /// When the password file cannot be read (the cluster was never initialised).
    pub fn url(&self, database: &str) -> Result<String> {
        let password = std::fs::read_to_string(self.password_file())
            .with_context(|| format!("cannot read {}", self.password_file().display()))?;
        Ok(format!(
            "postgres://{}:{}@127.0.0.1:{}/{database}",
            self.user,
            password.trim(),
            self.port
        ))
    }

    /// Runs one SQL command with psql on `database` and returns what it printed (unaligned,
    /// tuples only).
    ///
    /// # Errors
    ///
    /// When psql cannot connect or the command fails.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        run_psql(&self.bin_dir, &self.url(database)?, sql)
    }

    /// Creates `database` (optionally as a copy of `template`) unless it exists.
    ///
    /// # Errors
    ///
    /// When a name is not a plain identifier or the server refuses.
    pub fn create_database(&self, database: &str, template: Option<&str>) -> Result<()> {
        for name in std::iter::once(database).chain(template) {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                bail!("database name {name:?} must be letters, digits and underscores");
            }
        }
        let exists = self.psql(
            "postgres",
            &format!("SELECT 1 FROM pg_database WHERE datname = '{database}'"),
        )?;
        if exists.trim().is_empty() {
            let template = template
                .map(|t| format!(" TEMPLATE \"{t}\""))
                .unwrap_or_default();
            self.psql(
                "postgres",
                &format!("CREATE DATABASE \"{database}\"{template}"),
            )
            .with_context(|| format!("cannot create database {database}"))?;
        }
        Ok(())
    }

    /// Makes a streaming hot standby of this running cluster in `state_dir`, listening on `port`:
    /// a fresh `pg_basebackup -R` (any earlier copy there is stopped and replaced), with this
    /// cluster's superuser, password and server settings (and a 1 s `wal_retrieve_retry_interval`),
    /// streaming through a replication slot of its own. Start and stop it like any cluster.
    ///
    /// initdb's `pg_hba.conf` already lets replication connections in from 127.0.0.1 with the
    /// password, and the superuser may replicate, so the primary needs no change.
    ///
    /// # Errors
    ///
    /// When this cluster does not run, or the directories or the base backup fail.
    pub fn create_replica(&self, state_dir: &Path, port: u16) -> Result<Self> {
        // A replica cut off from its primary tries again every second rather than every 5 s (the
        // default): it streams again soon after a restarted primary is back.
        let mut settings = self.settings.clone();
        settings.push("wal_retrieve_retry_interval=1s".to_owned());
        let replica = Self::new(state_dir, port, &self.user, settings)?;
        replica.stop()?;
        let data = replica.data_dir();
        if data.exists() {
            std::fs::remove_dir_all(&data)
                .with_context(|| format!("cannot remove {}", data.display()))?;
        }
        let password = std::fs::read_to_string(self.password_file())
            .with_context(|| format!("cannot read {}", self.password_file().display()))?;
        write_private(&replica.password_file(), password.trim())?;
        // A replication slot keeps the primary from removing WAL the replica has not received
        // yet. Without one, a replica that stops receiving for a moment (restarted, cut off by a
        // test) while the primary writes fast (every CREATE DATABASE logs a whole database and
        // forces a checkpoint) finds its next segment gone and never catches up again. Slots of
        // replicas made earlier (inactive: their replica was stopped above) are dropped first,
        // or they would keep WAL forever.
        let slot = format!("xtask_replica_{port}");
        self.psql(
            "postgres",
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name LIKE 'xtask\\_replica\\_%' AND NOT active",
        )
        .context("cannot drop the replication slots of earlier replicas")?;
        let output = replica.run_with_env(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                &self.user,
                "-D",
                &data.to_string_lossy(),
                "-R",
                "-C",
                "-S",
                &slot,
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
            &[("PGPASSWORD", password.trim()), ("PGCONNECT_TIMEOUT", "5")],
        )?;
        if !output.status.success() {
            bail!(
                "pg_basebackup from 127.0.0.1:{} failed: {}",
                self.port,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(replica)
    }

    /// Waits until this replica has replayed everything `primary` had written when called.
    ///
    /// # Errors
    ///
    /// When either cannot be queried, or the replica is still behind after `timeout`.
    pub async fn wait_for_replay(&self, primary: &Cluster, timeout: Duration) -> Result<()> {
        // With synchronous_commit off, a commit may not be written yet, so the write position
        // could be before it (and the replica "caught up" without it). A transaction that
        // commits synchronously flushes everything before it; the write position after it is
        // then past every earlier commit. (The insert position is no good: after a record that
        // ends a page it points past the next page's header, which an idle primary may not
        // write for 15 s.)
        let lsn = primary.psql(
            "postgres",
            "BEGIN; SET LOCAL synchronous_commit = on; SELECT txid_current(); COMMIT; \
             SELECT pg_current_wal_lsn()",
        )?;
        let lsn = lsn.lines().last().unwrap_or_default().trim();
        let caught_up = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self.psql("postgres", &caught_up);
            if matches!(&answer, Ok(t) if t.trim() == "t") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the replica on 127.0.0.1:{} has not replayed up to {lsn} within {timeout:?} \
                     ({answer:?})",
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether the cluster exists and whether its server runs.
    ///
    /// # Errors
    ///
    /// When `pg_ctl` cannot be run.
    pub fn state(&self) -> Result<State> {
        if !self.data_dir().join("PG_VERSION").is_file() {
            return Ok(State::Uninitialized);
        }
        let output = self.run(
            "pg_ctl",
            &["status", "-D", &self.data_dir().to_string_lossy()],
        )?;
        // pg_ctl status: 0 running, 3 not running, 4 no accessible data directory.
        Ok(if output.status.success() {
            State::Running
        } else {
            State::Stopped
        })
    }

    /// Runs `initdb` with a newly generated password, when the cluster does not exist yet.
    ///
    /// # Errors
    ///
    /// When `initdb` fails; its output is included.
    pub fn init(&self) -> Result<()> {
        if self.state()? != State::Uninitialized {
            return Ok(());
        }
        let password = random_password()?;
        write_private(&self.password_file(), &password)?;
        // initdb reads the password from a file it must be able to open as the server user.
        let pwfile = self.server_dir.join("initdb.pw");
        write_private(&pwfile, &password)?;
        self.give_to_server_user(&pwfile)?;
        let data = self.data_dir();
        let result = self.run(
            "initdb",
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                &self.user,
                &format!("--pwfile={}", pwfile.display()),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ],
        );
        let _ = std::fs::remove_file(&pwfile);
        let output = result?;
        if !output.status.success() {
            bail!(
                "initdb failed for {}:\n{}{}",
                data.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .context("cannot open postgresql.conf")?;
        writeln!(
            conf,
            "\n# Written by cargo xtask at each start.\ninclude_if_exists = 'xtask.conf'"
        )
        .context("cannot write postgresql.conf")?;
        Ok(())
    }

    /// Starts the server unless it runs already, and returns once it accepts connections.
    ///
    /// # Errors
    ///
    /// When it does not come up within the deadline; the error shows the log's last lines.
    pub async fn start(&self) -> Result<()> {
        self.init()?;
        if self.state()? == State::Stopped {
            self.write_server_conf()?;
            let data = self.data_dir();
            let log = self.log_file();
            let output = self.run(
                "pg_ctl",
                &[
                    "start",
                    "-D",
                    &data.to_string_lossy(),
                    "-l",
                    &log.to_string_lossy(),
                    "-w",
                    "-t",
                    &START_DEADLINE.as_secs().to_string(),
                ],
            )?;
            if !output.status.success() {
                bail!(
                    "PostgreSQL did not start on 127.0.0.1:{}.\n{}\nLast lines of {}:\n{}",
                    self.port,
                    String::from_utf8_lossy(&output.stderr).trim(),
                    log.display(),
                    self.log_tail(20)
                );
            }
        }
        self.wait_until_ready().await
    }

    async fn wait_until_ready(&self) -> Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            // A query with this cluster's password, not just an open port: another server on
            // the port would answer pg_isready too.
            match self.psql("postgres", "SELECT 1") {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => bail!(
                    "PostgreSQL runs but does not accept connections on 127.0.0.1:{} ({e:#}).\n\
                     Is another server using that port, or was the cluster started with another \
                     port? Last lines of {}:\n{}",
                    self.port,
                    self.log_file().display(),
                    self.log_tail(20)
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Stops the server (fast shutdown: running statements are cancelled), if it runs.
    /// Returns whether it was running.
    ///
    /// # Errors
    ///
    /// When `pg_ctl stop` fails.
    pub fn stop(&self) -> Result<bool> {
        if self.state()? != State::Running {
            return Ok(false);
        }
        let output = self.run(
            "pg_ctl",
            &[
                "stop",
                "-D",
                &self.data_dir().to_string_lossy(),
                "-m",
                "fast",
                "-w",
                "-t",
                "30",
            ],
        )?;
        if !output.status.success() {
            bail!(
                "pg_ctl stop failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(true)
    }

    /// Stops the server and deletes the cluster's data, log and password.
    ///
    /// # Errors
    ///
    /// When stopping fails or the files cannot be removed.
    pub fn destroy(&self) -> Result<()> {
        self.stop()?;
        for path in [self.data_dir(), self.log_file(), self.password_file()] {
            if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else if path.exists() {
                std::fs::remove_file(&path)
            } else {
                Ok(())
            }
            .with_context(|| format!("cannot remove {}", path.display()))?;
        }
        Ok(())
    }

    /// Destroys the cluster and removes its directories as well.
    ///
    /// # Errors
    ///
    /// When stopping fails or the directories cannot be removed.
    pub fn remove_all(&self) -> Result<()> {
        self.destroy()?;
        for dir in [&self.server_dir, &self.state_dir] {
            if dir.exists() {
                std::fs::remove_dir_all(dir)
                    .with_context(|| format!("cannot remove {}", dir.display()))?;
            }
        }
        Ok(())
    }

    /// The last `lines` lines of the server log, or a note that there is none.
    pub fn log_tail(&self, lines: usize) -> String {
        match std::fs::read_to_string(self.log_file()) {
            Ok(text) => {
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("(no log: {e})"),
        }
    }

    fn write_server_conf(&self) -> Result<()> {
        let mut conf = format!(
            "# Written by cargo xtask at each start; edit config/default.toml instead.\n\
             port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n",
            self.port,
            self.data_dir().display()
        );
        for setting in &self.settings {
            let Some((name, value)) = setting.split_once('=') else {
                bail!("server setting {setting:?} is not of the form name=value");
            };
            let value = value.trim().replace('\'', "''");
            conf.push_str(&format!("{} = '{value}'\n", name.trim()));
        }
        let path = self.data_dir().join("xtask.conf");
        std::fs::write(&path, conf).with_context(|| format!("cannot write {}", path.display()))?;
        self.give_to_server_user(&path)
    }

    fn give_to_server_user(&self, path: &Path) -> Result<()> {
        if let Some(system_user) = &self.run_as {
            std::os::unix::fs::chown(path, Some(system_user.uid), Some(system_user.gid))
                .with_context(|| {
                    format!("cannot hand {} to {}", path.display(), system_user.name)
                })?;
        }
        Ok(())
    }

    /// Runs a server program, as the `postgres` user when this process is root.
    fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        self.run_with_env(program, args, &[])
    }

    /// [`Cluster::run`] with extra environment variables (runuser passes them on).
    fn run_with_env(&self, program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
        let path = self.bin_dir.join(program);
        let mut command = match &self.run_as {
            None => Command::new(&path),
            Some(system_user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", &system_user.name, "--"]).arg(&path);
                command
            }
        };
        // The server must not inherit our stdout: a test runner would wait for it to close.
        command
            .args(args)
            .envs(env.iter().copied())
            .current_dir(&self.server_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("cannot run {}", path.display()))
    }
}

/// Creates and resolves `state_dir`, and picks the user a server runs as (the `postgres` system
/// user when this process is root) and the directory it works in (`state_dir`, or one that user
/// can reach): `(state_dir, server_dir, run_as)`.
fn server_dirs(state_dir: &Path) -> Result<(PathBuf, PathBuf, Option<SystemUser>)> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let state_dir = state_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", state_dir.display()))?;
    let run_as = if running_as_root()? {
        Some(postgres_user()?)
    } else {
        None
    };
    let server_dir = match &run_as {
        None => state_dir.clone(),
        Some(system_user) => reachable_server_dir(&state_dir, system_user)?,
    };
    Ok((state_dir, server_dir, run_as))
}

/// A directory for another server program beside the clusters (PgBouncer), and the user it runs
/// as: like a cluster, the `postgres` system user when this process is root (PgBouncer refuses
/// to run as root), in a directory that user owns and can reach.
#[derive(Debug, Clone)]
pub struct ServerHome {
    /// The directory, owned by the server user.
    pub dir: PathBuf,
    run_as: Option<SystemUser>,
}

impl ServerHome {
    /// Prepares the directory for `state_dir` (`state_dir` itself when the server user can reach
    /// it, else one under the system temp dir, as for a cluster).
    ///
    /// # Errors
    ///
    /// When the directory cannot be prepared or, as root, the `postgres` user does not exist.
    pub fn new(state_dir: &Path) -> Result<Self> {
        let (_, dir, run_as) = server_dirs(state_dir)?;
        Ok(Self { dir, run_as })
    }

    /// A command that runs `program` as the server user, directly (no runuser in between, so
    /// its pid is the server's).
    pub fn command(&self, program: &Path) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(program);
        if let Some(system_user) = &self.run_as {
            command.uid(system_user.uid).gid(system_user.gid);
        }
        command.current_dir(&self.dir);
        command
    }

    /// Writes `contents` to `name` in the directory, readable by the server user only.
    ///
    /// # Errors
    ///
    /// When the file cannot be written or handed over.
    pub fn write_private(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        write_private(&path, contents)?;
        if let Some(system_user) = &self.run_as {
            std::os::unix::fs::chown(&path, Some(system_user.uid), Some(system_user.gid))
                .with_context(|| {
                    format!("cannot hand {} to {}", path.display(), system_user.name)
                })?;
        }
        Ok(path)
    }
}

/// Runs `openssl` with the argument groups in `args`, writing a key to `key` and a
/// certificate to `certificate`.
pub(crate) fn openssl(args: &[&[&str]], key: &Path, certificate: &Path) -> Result<()> {
    let output = Command::new("openssl")
        .args(args.iter().flat_map(|group| group.iter()))
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(certificate)
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot run openssl (apt-get install openssl)")?;
    if !output.status.success() {
        bail!(
            "openssl could not make {}: {}",
            certificate.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Runs one SQL command with psql against `url` (password included) and returns its output
/// (unaligned, tuples only). psql is a client: it runs as the current user, root included.
///
/// # Errors
///
/// When psql cannot be found or run, cannot connect, or the command fails.
pub fn psql(url: &str, sql: &str) -> Result<String> {
    run_psql(&find_bin_dir()?, url, sql)
}

/// [`psql`] with the programs' directory already found (a cluster knows it: its start-up check
/// runs psql every 100 ms).
fn run_psql(bin_dir: &Path, url: &str, sql: &str) -> Result<String> {
    let output = Command::new(bin_dir.join("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
            url,
        ])
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::null())
        .output()
        .context("cannot run psql")?;
    if !output.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The directory of the PostgreSQL programs (initdb, pg_ctl, psql): on `PATH`, else the newest
/// under `/usr/lib/postgresql`.
///
/// # Errors
///
/// When PostgreSQL is not installed.
pub fn find_bin_dir() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file());
    if let Some(dir) = on_path {
        // Debian links the programs into /usr/local/bin or /usr/bin; resolve to the real
        // directory so `pg_ctl` finds its own `postgres` next to it.
        let initdb = dir
            .join("initdb")
            .canonicalize()
            .unwrap_or(dir.join("initdb"));
        return Ok(initdb.parent().map_or(dir, Path::to_path_buf));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    versions.sort_by_key(|bin| {
        bin.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop().context(
        "PostgreSQL server programs (initdb, pg_ctl, postgres) were not found. \
         Install the Debian package `postgresql` (apt-get install postgresql).",
    )
}

pub(crate) fn running_as_root() -> Result<bool> {
    // /proc/self is owned by the process's effective user.
    Ok(std::fs::metadata("/proc/self")
        .context("cannot read /proc/self")?
        .uid()
        == 0)
}

fn postgres_user() -> Result<SystemUser> {
    let id = |flag: &str| -> Result<u32> {
        let output = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .context("cannot run `id`")?;
        if !output.status.success() {
            bail!(
                "running as root, so the cluster must run as the `postgres` system user, which \
                 does not exist. Install the Debian package `postgresql` (it creates the user) \
                 or run as an ordinary user."
            );
        }
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .context("unexpected output from `id`")
    };
    Ok(SystemUser {
        name: "postgres".to_owned(),
        uid: id("-u")?,
        gid: id("-g")?,
    })
}

/// A directory the server user owns and can reach: `state_dir` when every parent lets it through,
/// else one under the system temp dir.
fn reachable_server_dir(state_dir: &Path, system_user: &SystemUser) -> Result<PathBuf> {
    let can_reach = |dir: &Path| -> bool {
        Command::new("runuser")
            .args(["-u", &system_user.name, "--", "test", "-x"])
            .arg(dir)
            .status()
            .is_ok_and(|status| status.success())
    };
    let parent_reachable = state_dir.parent().is_some_and(can_reach);
    let dir = if parent_reachable {
        state_dir.to_path_buf()
    } else {
        let tag = fnv1a(state_dir.to_string_lossy().as_bytes());
        let name = state_dir
            .file_name()
            .map_or_else(|| "cluster".into(), |n| n.to_string_lossy().into_owned());
        std::env::temp_dir()
            .join(format!("dashboard-pg-{tag:016x}"))
            .join(name)
    };
    let chown = |path: &Path| {
        // lchown: never follow a symbolic link planted in a shared directory.
        std::os::unix::fs::lchown(path, Some(system_user.uid), Some(system_user.gid))
            .with_context(|| format!("cannot hand {} to {}", path.display(), system_user.name))
    };
    if dir == state_dir {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    } else {
        // Under the shared temp dir: create each level ourselves, refuse anything that was
        // already there and is a symbolic link or belongs to someone else.
        for level in [dir.parent().unwrap_or(&dir), dir.as_path()] {
            match std::fs::symlink_metadata(level) {
                Ok(meta) => {
                    let ours = meta.uid() == 0 || meta.uid() == system_user.uid;
                    if meta.file_type().is_symlink() || !meta.is_dir() || !ours {
                        bail!(
                            "{} exists and is not a directory owned by root or {}; remove it",
                            level.display(),
                            system_user.name
                        );
                    }
                }
                Err(_) => std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(level)
                    .with_context(|| format!("cannot create {}", level.display()))?,
            }
            chown(level)?;
        }
    }
    chown(&dir)?;
    if dir == state_dir {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot set permissions of {}", dir.display()))?;
    }
    if !can_reach(&dir) {
        bail!(
            "the postgres system user cannot reach {}; run as an ordinary user or move the project",
            dir.display()
        );
    }
    Ok(dir)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// 36 random hex characters from the kernel.
///
/// # Errors
///
/// When /dev/urandom cannot be read.
pub fn random_password() -> Result<String> {
    let mut bytes = [0u8; 18];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").context("cannot open /dev/urandom")?,
        &mut bytes,
    )
    .context("cannot read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a file only its owner can read.
/// Writes `contents` to a file only its owner can read.
///
/// # Errors
///
/// When the file cannot be written.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The development cluster and database name the settings point at.
///
/// # Errors
///
/// When `database.url` does not point at a cluster on this machine.
pub fn dev_cluster(settings: &Settings) -> Result<(Cluster, String)> {
    let url = PgUrl::parse(&settings.database.url)?;
    if url.host != "127.0.0.1" && url.host != "localhost" {
        bail!(
            "database.url ({}) does not point at 127.0.0.1, so it is not the local cluster that \
             `cargo xtask db` manages",
            settings.database.masked_url()
        );
    }
    let settings = DEV_SERVER_SETTINGS.map(String::from).to_vec();
    let cluster = Cluster::new(Path::new(DEV_CLUSTER_DIR), url.port, &url.user, settings)?;
    Ok((cluster, url.database))
}

/// Starts `cluster` and creates `database` on it when missing.
///
/// # Errors
///
/// When the server does not come up or the database cannot be created.
pub async fn start(cluster: &Cluster, database: &str) -> Result<()> {
    cluster.start().await?;
    cluster.create_database(database, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_dir_names_are_stable_per_path() {
        assert_eq!(fnv1a(b"/root/x/target/pg"), fnv1a(b"/root/x/target/pg"));
        assert_ne!(fnv1a(b"/root/x/target/pg"), fnv1a(b"/root/y/target/pg"));
    }

    #[test]
    fn passwords_are_random_hex() {
        let a = random_password().unwrap();
        let b = random_password().unwrap();
        assert_eq!(a.len(), 36);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
