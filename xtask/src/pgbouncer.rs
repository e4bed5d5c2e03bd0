//! PgBouncer in front of one PostgreSQL server, run in the foreground as a child process.
//!
//! Transaction pooling with a wildcard database entry (`* =`), so any database name works, the
//! tests' per-test databases included. Clients authenticate with SCRAM against a plain-text
//! `auth_file` holding the cluster's one role and password, which PgBouncer also uses to log in to
//! the server. The same role is PgBouncer's admin, for `SHOW POOLS` / `SHOW SERVERS` (checks
//! that no server session leaked). PgBouncer refuses to run as root, so as root it runs as the
//! `postgres` system user, in a directory that user can reach ([`ServerHome`]), like the clusters.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use tokio::process::Command;

use crate::pg::{Cluster, ServerHome, psql};
use crate::topology::{Foreground, find_program, stop_stale};

/// How long start-up may take before it is an error.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long a stop waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A PgBouncer pooling one PostgreSQL server on 127.0.0.1.
#[derive(Debug)]
pub struct PgBouncer {
    home: ServerHome,
    config: PathBuf,
    process: Option<Foreground>,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// The port of the PostgreSQL server it pools (127.0.0.1).
    pub server_port: u16,
    user: String,
    password: String,
}

impl PgBouncer {
    /// Writes the configuration into `state_dir` and starts PgBouncer on `port` in front of
    /// `server` (which should run), returning once it answers an admin query. A PgBouncer left
    /// running there by a run that died is stopped first.
    ///
    /// # Errors
    ///
    /// When PgBouncer is not installed, the files cannot be written, or it does not answer
    /// within 10 s (the error shows its log's last lines).
    pub async fn start(state_dir: &Path, port: u16, server: &Cluster) -> Result<Self> {
        Self::start_listening(state_dir, port, server, None).await
    }

    /// Like [`PgBouncer::start`], listening on `also` as well as 127.0.0.1 when given (the
    /// gateway address through which the topology's hosts reach it).
    ///
    /// # Errors
    ///
    /// As [`PgBouncer::start`].
    pub async fn start_listening(
        state_dir: &Path,
        port: u16,
        server: &Cluster,
        also: Option<std::net::Ipv4Addr>,
    ) -> Result<Self> {
        let home = ServerHome::new(state_dir)?;
        let password = std::fs::read_to_string(server.password_file())
            .with_context(|| format!("cannot read {}", server.password_file().display()))?
            .trim()
            .to_owned();
        let user = server.user.clone();
        home.write_private("userlist.txt", &format!("\"{user}\" \"{password}\"\n"))?;
        let listen = also.map_or_else(|| "127.0.0.1".to_owned(), |ip| format!("127.0.0.1,{ip}"));
        let config =
            home.write_private("pgbouncer.ini", &config(&home.dir, &listen, port, server))?;
        let mut bouncer = Self {
            home,
            config,
            process: None,
            port,
            server_port: server.port,
            user,
            password,
        };
        bouncer.spawn().await?;
        Ok(bouncer)
    }

    /// The URL of `database` through this PgBouncer, password included.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{database}",
            self.user, self.password, self.port
        )
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Foreground::pid)
    }

    /// The directory of its configuration and log.
    pub fn dir(&self) -> &Path {
        &self.home.dir
    }

    /// Its log file.
    pub fn log_file(&self) -> PathBuf {
        self.home.dir.join("pgbouncer.log")
    }

    /// Runs a command on the admin console (`SHOW POOLS`, `SHOW SERVERS`, …) and returns its rows
    /// as psql prints them unaligned (`|` between columns, no header).
    ///
    /// # Errors
    ///
    /// When PgBouncer does not answer or refuses the command.
    pub fn admin(&self, command: &str) -> Result<String> {
        psql(&self.url("pgbouncer"), command)
    }

    /// Stops it, if it runs: SIGTERM (immediate shutdown in 1.18: client connections are
    /// closed), then SIGKILL after 5 s.
    ///
    /// # Errors
    ///
    /// When waiting for it fails.
    pub async fn stop(&mut self) -> Result<()> {
        match self.process.take() {
            Some(process) => process.stop(Signal::SIGTERM, STOP_GRACE).await,
            None => Ok(()),
        }
    }

    /// Stops it if it runs, and starts it again on the same port with the same configuration.
    ///
    /// # Errors
    ///
    /// As [`PgBouncer::stop`] and [`PgBouncer::start`].
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.spawn().await
    }

    async fn spawn(&mut self) -> Result<()> {
        let pidfile = self.home.dir.join("pgbouncer.pid");
        stop_stale(&pidfile, "pgbouncer").await;
        let mut command: Command = self.home.command(&find_program("pgbouncer")?);
        command.arg(&self.config);
        // In the foreground it logs to standard error as well as to its log file.
        let mut process = Foreground::spawn(command, "pgbouncer", Path::new("/dev/null"))?;
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = process.exited()? {
                bail!(
                    "PgBouncer exited during start-up ({status}). Last lines of {}:\n{}",
                    self.log_file().display(),
                    crate::topology::tail(&self.log_file(), 10)
                );
            }
            let listening = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok();
            if listening && self.admin("SHOW VERSION").is_ok() {
                self.process = Some(process);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = process.stop(Signal::SIGKILL, STOP_GRACE).await;
                bail!(
                    "PgBouncer did not answer on 127.0.0.1:{} within {START_DEADLINE:?}. Last \
                     lines of {}:\n{}",
                    self.port,
                    self.log_file().display(),
                    crate::topology::tail(&self.log_file(), 10)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The configuration: transaction pooling of every database on `server`, bounded waits.
fn config(dir: &Path, listen: &str, port: u16, server: &Cluster) -> String {
    let dir = dir.display();
    format!(
        ";; Written by cargo xtask at each start.\n\
         [databases]\n\
         * = host=127.0.0.1 port={server_port}\n\
         \n\
         [pgbouncer]\n\
         listen_addr = {listen}\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = scram-sha-256\n\
         auth_file = {dir}/userlist.txt\n\
         admin_users = {user}\n\
         logfile = {dir}/pgbouncer.log\n\
         pidfile = {dir}/pgbouncer.pid\n\
         log_connections = 0\n\
         log_disconnections = 0\n\
         pool_mode = transaction\n\
         ;; Server connections per database and role; the clients (each instance's pool) may be\n\
         ;; many more. The per-role cap keeps many test databases within max_connections.\n\
         default_pool_size = 20\n\
         max_client_conn = 2000\n\
         max_user_connections = 100\n\
         server_idle_timeout = 30\n\
         ;; Every wait bounded. A server that is down fails new logins at once and is retried\n\
         ;; each second (used again within a second of coming back), but a connected client's\n\
         ;; query waits for it: at most the dashboard's 2 s deadline.\n\
         server_connect_timeout = 2\n\
         server_login_retry = 1\n\
         query_wait_timeout = 2\n\
         ;; Only what is harmless to drop; the API's `options` (statement_timeout) must not be.\n\
         ignore_startup_parameters = extra_float_digits\n",
        server_port = server.port,
        user = server.user,
    )
}
