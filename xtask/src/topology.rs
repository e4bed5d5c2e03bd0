//! The scale-out topology on this machine, as one value: a PostgreSQL primary and optionally a
//! streaming replica, a PgBouncer in front of each, the stand-in recommendation service, N API
//! instances and nginx in front of them: all on 127.0.0.1, or with [`TopologyOptions::hosts`]
//! the stand-in and each instance on a host of its own (a network namespace, see
//! [`crate::netns`]), reaching PgBouncer on the machine's bridge address, and nginx reaching
//! them on theirs.
//!
//! [`Topology::start`] brings the parts up in that order and [`Topology::stop`] stops them in
//! reverse. Every part is held by a value that stops or kills it when dropped, so a start that
//! fails half-way, an interrupted command or a panic leaves no process behind. The handles a
//! fault run needs (kill or restart an instance, stop a database, restart PgBouncer, read
//! PgBouncer's pools) are methods; nothing here prints unless [`TopologyOptions::progress`] says so.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::netns::{Host, Network};
use crate::nginx::{Nginx, NginxConfig, self_signed_certificate};
use crate::pg::Cluster;
use crate::pgbouncer::PgBouncer;
use crate::stack::{ApiProcess, Upstream, answers_200, free_port, prepare_database};

/// The database the instances read.
pub const DATABASE: &str = "dashboard";
/// How long an instance gets to drain after SIGTERM before it is killed (its shutdown grace is
/// 10 s by default).
const INSTANCE_STOP_PATIENCE: Duration = Duration::from_secs(15);
/// How long a (re)started instance may take to answer `/readyz` with 200.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// The 127.0.0.1 ports of every part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports {
    /// nginx, HTTPS.
    pub https: u16,
    /// nginx, plain HTTP.
    pub http: u16,
    /// PostgreSQL primary.
    pub primary: u16,
    /// PostgreSQL replica.
    pub replica: u16,
    /// PgBouncer in front of the primary.
    pub pgbouncer: u16,
    /// PgBouncer in front of the replica.
    pub replica_pgbouncer: u16,
    /// The stand-in recommendation service.
    pub upstream: u16,
    /// The API instances, in order.
    pub instances: Vec<u16>,
}

impl Ports {
    /// Fixed ports from `base`: HTTPS on `base`, plain HTTP on `base + 1`, the primary, the
    /// replica, their PgBouncers and the stand-in on `base + 2` to `base + 6`, instance `i` on
    /// `base + 10 + i`.
    pub fn from_base(base: u16, instances: usize) -> Self {
        let at = |offset: usize| base.saturating_add(u16::try_from(offset).unwrap_or(u16::MAX));
        Self {
            https: base,
            http: at(1),
            primary: at(2),
            replica: at(3),
            pgbouncer: at(4),
            replica_pgbouncer: at(5),
            upstream: at(6),
            instances: (0..instances).map(|i| at(10 + i)).collect(),
        }
    }

    /// Ports that nothing listens on right now.
    ///
    /// # Errors
    ///
    /// When no port can be bound.
    pub fn free(instances: usize) -> Result<Self> {
        Ok(Self {
            https: free_port()?,
            http: free_port()?,
            primary: free_port()?,
            replica: free_port()?,
            pgbouncer: free_port()?,
            replica_pgbouncer: free_port()?,
            upstream: free_port()?,
            instances: (0..instances).map(|_| free_port()).collect::<Result<_>>()?,
        })
    }
}

/// What [`Topology::start`] brings up.
#[derive(Debug, Clone)]
pub struct TopologyOptions {
    /// Where every part keeps its files (the primary's data survives between runs, so the seed
    /// happens once; the replica is copied afresh at each start). One topology at a time runs
    /// from a directory (a lock file says so). Relative paths here and in the binaries' are
    /// taken from the workspace root, where `config/` is.
    pub dir: PathBuf,
    /// The API instances behind nginx.
    pub instances: usize,
    /// Whether to run a streaming replica (with its PgBouncer) for the reads.
    pub replica: bool,
    /// Users to seed when the primary has none.
    pub users: u32,
    /// The ports; `None` picks free ones.
    pub ports: Option<Ports>,
    /// The `api` binary.
    pub api_binary: PathBuf,
    /// The `upstream` binary (the stand-in recommendation service).
    pub upstream_binary: PathBuf,
    /// Extra flags of the stand-in (`--delay-ms 5`, faults).
    pub upstream_flags: Vec<String>,
    /// Whether the instances reach the databases through PgBouncer (with
    /// `database.statements = "unnamed"`), or directly (prepared statements): the latter is the
    /// baseline a hop's cost is measured against.
    pub via_pgbouncer: bool,
    /// Extra `APP__…` settings of every instance, applied last (they win).
    pub api_settings: Vec<(String, String)>,
    /// Whether the instances' own output reaches the terminal.
    pub instance_output: bool,
    /// Whether each step is announced on standard output (`==> …`).
    pub progress: bool,
    /// Whether the stand-in and each instance run on a host of their own (network namespaces;
    /// root only, and through PgBouncer only: the databases stay on the machine).
    pub hosts: bool,
}

impl Default for TopologyOptions {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("target/cluster"),
            instances: 3,
            replica: true,
            users: 100_000,
            ports: None,
            api_binary: PathBuf::from(crate::stack::RELEASE_API),
            upstream_binary: PathBuf::from("target/release/upstream"),
            upstream_flags: Vec::new(),
            via_pgbouncer: true,
            api_settings: Vec::new(),
            instance_output: false,
            progress: false,
            hosts: false,
        }
    }
}

/// The running topology. Dropping it kills what runs and stops the databases; [`Topology::stop`]
/// stops everything gracefully instead.
#[derive(Debug)]
pub struct Topology {
    // Fields drop in this order: the front first, the databases last.
    nginx: Option<Nginx>,
    instances: Vec<Option<ApiProcess>>,
    upstream: Option<Upstream>,
    replica_pgbouncer: Option<PgBouncer>,
    pgbouncer: PgBouncer,
    replica: Option<Running>,
    primary: Running,
    /// The hosts (the stand-in's, then the instances'), removed after everything above stopped.
    network: Option<Network>,
    ports: Ports,
    api_binary: String,
    /// The settings every instance starts with (besides its port).
    instance_settings: Vec<(String, String)>,
    instance_output: bool,
    /// Held while the topology runs: no other one starts from its directory.
    _lock: std::fs::File,
}

impl Topology {
    /// Brings up every part in order (primary, replica, PgBouncers, stand-in, instances, nginx),
    /// migrating and seeding the primary's database when needed, and returns once nginx
    /// listens and every instance answers `/readyz` with 200.
    ///
    /// # Errors
    ///
    /// When a part does not come up; whatever had started is stopped again.
    pub async fn start(options: &TopologyOptions) -> Result<Self> {
        let started = Instant::now();
        let step = |what: &str| {
            if options.progress {
                println!("==> {what} ({:.1} s)", started.elapsed().as_secs_f64());
            }
        };
        let ports = match &options.ports {
            Some(ports) => ports.clone(),
            None => Ports::free(options.instances)?,
        };
        // A port taken by something else would be found only later, and not always (a foreign
        // listener accepts a readiness probe too); the databases' ports are checked by them.
        let mut ours = vec![ports.https, ports.http, ports.pgbouncer, ports.upstream];
        ours.extend(options.replica.then_some(ports.replica_pgbouncer));
        ours.extend(&ports.instances);
        for port in ours {
            std::net::TcpListener::bind(("127.0.0.1", port)).with_context(|| {
                format!("127.0.0.1:{port} is in use (another cluster running? choose other ports)")
            })?;
        }
        let dir = &options.dir;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let lock =
            std::fs::File::create(dir.join("lock")).context("cannot create the lock file")?;
        lock.try_lock()
            .map_err(|e| anyhow::anyhow!("another topology runs from {} ({e})", dir.display()))?;
        let api_binary = options.api_binary.to_string_lossy().into_owned();
        let network = if options.hosts {
            if !options.via_pgbouncer {
                bail!("hosts of their own need PgBouncer: it is what listens on the bridge");
            }
            step("making a host for the stand-in and each instance (network namespaces)");
            let mut names = vec!["upstream".to_owned()];
            names.extend((0..ports.instances.len()).map(|i| format!("api{i}")));
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            Some(Network::create(ports.https, &names)?)
        } else {
            None
        };
        let gateway = network.as_ref().map(|n| n.gateway);

        step("starting the PostgreSQL primary");
        let settings = ["shared_buffers=128MB", "max_connections=200"].map(String::from);
        let primary = Running(Cluster::new(
            &dir.join("primary"),
            ports.primary,
            "dashboard",
            settings.to_vec(),
        )?);
        primary.0.start().await?;
        primary.0.create_database(DATABASE, None)?;
        step("migrating (and seeding when empty)");
        let url = primary.0.url(DATABASE)?;
        prepare_database(&options.api_binary, &url, options.users).await?;

        let replica = if options.replica {
            step("copying the replica (pg_basebackup -R) and starting it");
            let mut replica = primary
                .0
                .create_replica(&dir.join("replica"), ports.replica)?;
            // Copied afresh at each start, so durability is worth nothing; without fsync its
            // first start also skips syncing the whole copy (seconds on a busy disk).
            replica.settings.push("fsync=off".to_owned());
            let replica = Running(replica);
            replica.0.start().await?;
            replica
                .0
                .wait_for_replay(&primary.0, Duration::from_secs(30))
                .await?;
            Some(replica)
        } else {
            None
        };

        step("starting PgBouncer");
        let pgbouncer = PgBouncer::start_listening(
            &dir.join("pgbouncer"),
            ports.pgbouncer,
            &primary.0,
            gateway,
        )
        .await?;
        let replica_pgbouncer = match &replica {
            Some(replica) => Some(
                PgBouncer::start_listening(
                    &dir.join("pgbouncer-replica"),
                    ports.replica_pgbouncer,
                    &replica.0,
                    gateway,
                )
                .await?,
            ),
            None => None,
        };

        step("starting the stand-in recommendation service");
        let upstream_binary = options.upstream_binary.to_string_lossy();
        let upstream_host = network.as_ref().map(|n| &n.hosts()[0]);
        let upstream = Upstream::start_on(
            upstream_host,
            &upstream_binary,
            ports.upstream,
            &options.upstream_flags,
        )
        .await?;
        if let Some((stand_in, first)) = network
            .as_ref()
            .and_then(|network| Some((network.hosts().first()?, network.hosts().get(1)?)))
        {
            // Host to host crosses the bridge, which a firewall may stop (Docker's FORWARD
            // policy with br_netfilter): say so now rather than as timed-out recommendations.
            let to = std::net::SocketAddr::from((stand_in.address, ports.upstream));
            if !first.reaches(to).await {
                bail!(
                    "host {} cannot reach the stand-in at {to} across the bridge (a firewall \
                     that filters bridged traffic?); run with --loopback",
                    first.namespace
                );
            }
        }

        let instance_settings = instance_settings(
            options,
            &primary.0,
            replica.as_ref().map(|r| &r.0),
            &pgbouncer,
            replica_pgbouncer.as_ref(),
            &upstream.base_url,
            gateway,
        )?;
        let mut topology = Self {
            nginx: None,
            instances: Vec::new(),
            upstream: Some(upstream),
            replica_pgbouncer,
            pgbouncer,
            replica,
            primary,
            network,
            ports,
            api_binary,
            instance_settings,
            instance_output: options.instance_output,
            _lock: lock,
        };
        step(&format!(
            "starting {} API instances",
            topology.ports.instances.len()
        ));
        for i in 0..topology.ports.instances.len() {
            let instance = topology.start_instance(i).await?;
            topology.instances.push(Some(instance));
        }

        step("starting nginx");
        let (certificate, key) = self_signed_certificate(&dir.join("tls"))?;
        let config = NginxConfig {
            https_port: topology.ports.https,
            http_port: topology.ports.http,
            upstreams: (0..topology.instance_count())
                .map(|i| topology.instance_address(i))
                .collect(),
            certificate,
            key,
        };
        topology.nginx = Some(Nginx::start(&dir.join("nginx"), &config).await?);
        step("ready");
        Ok(topology)
    }

    /// The ports of every part.
    pub fn ports(&self) -> &Ports {
        &self.ports
    }

    /// nginx's HTTPS URL, `https://127.0.0.1:PORT`.
    pub fn https_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.https)
    }

    /// nginx's plain-HTTP URL (127.0.0.1 only), for tools that do not speak TLS.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.http)
    }

    /// The number of API instances.
    pub fn instance_count(&self) -> usize {
        self.ports.instances.len()
    }

    /// Instance `i`'s host, when it has one of its own.
    fn instance_host(&self, i: usize) -> Option<&Host> {
        self.network.as_ref().map(|n| &n.hosts()[1 + i])
    }

    /// Instance `i`'s address: 127.0.0.1 or its host's, and its port.
    pub fn instance_address(&self, i: usize) -> std::net::SocketAddr {
        let ip = self.instance_host(i).map_or(
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            |host| std::net::IpAddr::V4(host.address),
        );
        std::net::SocketAddr::new(ip, self.ports.instances[i])
    }

    /// Instance `i`'s own URL, `http://ADDRESS:PORT`.
    pub fn instance_url(&self, i: usize) -> String {
        format!("http://{}", self.instance_address(i))
    }

    /// This machine's address on the hosts' bridge, when there are hosts.
    pub fn gateway(&self) -> Option<std::net::Ipv4Addr> {
        self.network.as_ref().map(|n| n.gateway)
    }

    /// The hosts of their own (the stand-in's, then each instance's), when there are.
    pub fn hosts(&self) -> &[Host] {
        self.network.as_ref().map_or(&[], |n| n.hosts())
    }

    /// Instance `i`'s `/metrics` URL.
    pub fn metrics_url(&self, i: usize) -> String {
        format!("{}/metrics", self.instance_url(i))
    }

    /// Instance `i`'s process id, while it runs.
    pub fn instance_pid(&self, i: usize) -> Option<u32> {
        self.instances.get(i)?.as_ref()?.pid()
    }

    /// nginx's master process id (its workers are its children), while it runs.
    pub fn nginx_pid(&self) -> Option<u32> {
        self.nginx.as_ref()?.pid()
    }

    /// The stand-in recommendation service's process id, while it runs.
    pub fn upstream_pid(&self) -> Option<u32> {
        self.upstream.as_ref()?.pid()
    }

    /// The PgBouncers' process ids (the primary's, then the replica's), while they run.
    pub fn pgbouncer_pids(&self) -> Vec<u32> {
        std::iter::once(&self.pgbouncer)
            .chain(&self.replica_pgbouncer)
            .filter_map(PgBouncer::pid)
            .collect()
    }

    /// Kills instance `i` with SIGKILL (no draining) and reaps it.
    ///
    /// # Errors
    ///
    /// When `i` is out of range or waiting for it fails.
    pub async fn kill_instance(&mut self, i: usize) -> Result<()> {
        let slot = self.instances.get_mut(i).context("no such instance")?;
        if let Some(mut instance) = slot.take() {
            let child = instance.child_mut();
            child.start_kill().context("cannot kill the instance")?;
            tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .context("the killed instance did not exit within 5 s")??;
        }
        Ok(())
    }

    /// Stops instance `i` with SIGTERM (it drains; killed after 15 s), starts it again on the
    /// same port and waits until `/readyz` answers 200. A killed instance is just started.
    ///
    /// # Errors
    ///
    /// When it cannot be stopped, does not start, or is not ready within 30 s.
    pub async fn restart_instance(&mut self, i: usize) -> Result<()> {
        let slot = self.instances.get_mut(i).context("no such instance")?;
        if let Some(instance) = slot.take() {
            instance.stop(INSTANCE_STOP_PATIENCE).await?;
        }
        let instance = self.start_instance(i).await?;
        self.instances[i] = Some(instance);
        Ok(())
    }

    /// The primary cluster.
    pub fn primary(&self) -> &Cluster {
        &self.primary.0
    }

    /// The replica cluster, when there is one.
    pub fn replica(&self) -> Option<&Cluster> {
        self.replica.as_ref().map(|r| &r.0)
    }

    /// Stops the primary (fast shutdown).
    ///
    /// # Errors
    ///
    /// When `pg_ctl stop` fails.
    pub fn stop_primary(&self) -> Result<()> {
        self.primary.0.stop().map(drop)
    }

    /// Starts the primary again and waits until it accepts connections.
    ///
    /// # Errors
    ///
    /// When it does not come up.
    pub async fn start_primary(&self) -> Result<()> {
        self.primary.0.start().await
    }

    /// Stops the replica (fast shutdown).
    ///
    /// # Errors
    ///
    /// When there is no replica or `pg_ctl stop` fails.
    pub fn stop_replica(&self) -> Result<()> {
        self.replica().context("no replica")?.stop().map(drop)
    }

    /// Starts the replica again and waits until it accepts connections.
    ///
    /// # Errors
    ///
    /// When there is no replica or it does not come up.
    pub async fn start_replica(&self) -> Result<()> {
        self.replica().context("no replica")?.start().await
    }

    /// The PgBouncer in front of the primary (to stop, restart, or ask for its pools).
    pub fn pgbouncer(&mut self) -> &mut PgBouncer {
        &mut self.pgbouncer
    }

    /// The PgBouncer in front of the replica, when there is one.
    pub fn replica_pgbouncer(&mut self) -> Option<&mut PgBouncer> {
        self.replica_pgbouncer.as_mut()
    }

    /// Restarts the PgBouncer in front of the primary (immediate shutdown, then start).
    ///
    /// # Errors
    ///
    /// When it does not come back within 10 s.
    pub async fn restart_pgbouncer(&mut self) -> Result<()> {
        self.pgbouncer.restart().await
    }

    /// Runs `command` (`SHOW POOLS`, `SHOW SERVERS`) on the admin console of the PgBouncer in
    /// front of the primary (`replica: false`) or the replica's, returning psql's unaligned rows.
    ///
    /// # Errors
    ///
    /// When there is no such PgBouncer or it does not answer.
    pub fn pgbouncer_admin(&self, replica: bool, command: &str) -> Result<String> {
        let bouncer = if replica {
            self.replica_pgbouncer.as_ref().context("no replica")?
        } else {
            &self.pgbouncer
        };
        bouncer.admin(command)
    }

    /// Stops everything in reverse order: nginx, the instances (SIGTERM, draining), the stand-in,
    /// the PgBouncers, the replica, the primary. Goes on after a failure and returns the first.
    ///
    /// # Errors
    ///
    /// The first part that could not be stopped cleanly.
    pub async fn stop(mut self) -> Result<()> {
        let mut first_error: Option<anyhow::Error> = None;
        let mut note = |result: Result<()>| {
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        };
        if let Some(nginx) = self.nginx.take() {
            note(nginx.stop().await);
        }
        for slot in &mut self.instances {
            if let Some(instance) = slot.take() {
                note(instance.stop(INSTANCE_STOP_PATIENCE).await.map(drop));
            }
        }
        if let Some(upstream) = self.upstream.take() {
            upstream.stop().await;
        }
        if let Some(bouncer) = &mut self.replica_pgbouncer {
            note(bouncer.stop().await);
        }
        note(self.pgbouncer.stop().await);
        if let Some(replica) = &self.replica {
            note(replica.0.stop().map(drop));
        }
        note(self.primary.0.stop().map(drop));
        first_error.map_or(Ok(()), Err)
    }

    /// Starts instance `i` on its port with the shared settings and waits for `/readyz` 200.
    async fn start_instance(&self, i: usize) -> Result<ApiProcess> {
        let port = self.ports.instances[i];
        let settings: Vec<(&str, String)> = self
            .instance_settings
            .iter()
            .map(|(key, value)| (key.as_str(), value.clone()))
            .collect();
        let instance = ApiProcess::start_on(
            self.instance_host(i),
            &self.api_binary,
            port,
            &settings,
            !self.instance_output,
        )
        .await
        .with_context(|| format!("instance {i} (port {port}) did not start"))?;
        let address = self.instance_address(i).to_string();
        let deadline = Instant::now() + READY_DEADLINE;
        while !answers_200(&address, "/readyz").await {
            if Instant::now() >= deadline {
                bail!(
                    "instance {i} (port {port}) did not answer /readyz with 200 in {READY_DEADLINE:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(instance)
    }
}

/// The settings every instance starts with: its databases (through PgBouncer or not), the
/// stand-in, and nginx as its one trusted proxy. With hosts of their own, the machine (PgBouncer
/// and nginx) is at `gateway`.
fn instance_settings(
    options: &TopologyOptions,
    primary: &Cluster,
    replica: Option<&Cluster>,
    pgbouncer: &PgBouncer,
    replica_pgbouncer: Option<&PgBouncer>,
    upstream: &str,
    gateway: Option<std::net::Ipv4Addr>,
) -> Result<Vec<(String, String)>> {
    let machine = gateway.map_or_else(|| "127.0.0.1".to_owned(), |ip| ip.to_string());
    let url = |port: u16| format!("postgres://{}@{machine}:{port}/{DATABASE}", primary.user);
    let (primary_port, replica_port) = if options.via_pgbouncer {
        (pgbouncer.port, replica_pgbouncer.map(|b| b.port))
    } else {
        (primary.port, replica.map(|r| r.port))
    };
    // The replica is a copy of the primary: one password, from the primary's file.
    let password_file = primary.password_file();
    let mut settings = vec![
        ("APP__DATABASE__URL".to_owned(), url(primary_port)),
        (
            "APP__DATABASE__PASSWORD_FILE".to_owned(),
            password_file.to_string_lossy().into_owned(),
        ),
        (
            "APP__RECOMMENDATIONS__BASE_URL".to_owned(),
            upstream.to_owned(),
        ),
        // nginx, whose X-Forwarded-For the rate limiter believes.
        (
            "APP__RATE_LIMIT__TRUSTED_PROXIES".to_owned(),
            machine.clone(),
        ),
    ];
    if options.via_pgbouncer {
        settings.push(("APP__DATABASE__STATEMENTS".to_owned(), "unnamed".to_owned()));
    }
    if let Some(port) = replica_port {
        settings.push(("APP__DATABASE__REPLICA_URLS".to_owned(), url(port)));
    }
    settings.extend(options.api_settings.iter().cloned());
    Ok(settings)
}

/// A cluster this topology started: stopped when dropped.
#[derive(Debug)]
struct Running(Cluster);

impl Drop for Running {
    fn drop(&mut self) {
        if let Err(e) = self.0.stop() {
            eprintln!(
                "warning: could not stop the cluster on port {}: {e:#}",
                self.0.port
            );
        }
    }
}

/// A server run in the foreground as a child process, in a process group of its own (the
/// terminal's Ctrl-C reaches only the command, which stops the parts in order): stopped with a
/// signal and a bounded wait, and killed with its whole group (nginx's workers) when dropped.
#[derive(Debug)]
pub struct Foreground {
    child: Child,
    name: &'static str,
    stopped: bool,
}

impl Foreground {
    /// Spawns `command` with standard input closed and its output appended to `output` (the
    /// servers log to their own files; this catches what they say before opening them).
    ///
    /// # Errors
    ///
    /// When `output` cannot be opened or the program cannot be started.
    pub fn spawn(mut command: Command, name: &'static str, output: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(output)
            .with_context(|| format!("cannot open {}", output.display()))?;
        let copy = file
            .try_clone()
            .with_context(|| format!("cannot open {}", output.display()))?;
        let child = command
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(file)
            .stderr(copy)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Self {
            child,
            name,
            stopped: false,
        })
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    ///
    /// # Errors
    ///
    /// When it cannot be polled.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("cannot poll {}", self.name))
    }

    /// Sends `signal` to its group, waits up to `grace` for it to exit, then kills the group.
    ///
    /// # Errors
    ///
    /// When it does not exit even after SIGKILL.
    pub async fn stop(mut self, signal: Signal, grace: Duration) -> Result<()> {
        self.signal(signal);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            self.signal(Signal::SIGKILL);
            tokio::time::timeout(Duration::from_secs(5), self.child.wait())
                .await
                .with_context(|| format!("{} did not exit after SIGKILL", self.name))?
                .with_context(|| format!("cannot wait for {}", self.name))?;
        }
        // Whatever of the group is left (nothing, when the leader waited for its workers).
        self.signal(Signal::SIGKILL);
        self.stopped = true;
        Ok(())
    }

    fn signal(&self, signal: Signal) {
        if let Some(id) = self.child.id().and_then(|id| i32::try_from(id).ok()) {
            let _ = killpg(Pid::from_raw(id), signal);
        }
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if !self.stopped {
            self.signal(Signal::SIGKILL);
        }
    }
}

/// Stops a server that a run which died left behind: the process in `pidfile`, if it is still
/// `program` (SIGTERM, then SIGKILL after 5 s).
pub async fn stop_stale(pidfile: &Path, program: &str) {
    let Some(pid) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())
    else {
        return;
    };
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let is_it =
        || std::fs::read_to_string(proc.join("comm")).is_ok_and(|comm| comm.trim() == program);
    if !is_it() {
        return;
    }
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
    for _ in 0..100 {
        if !is_it() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// The path of `program`: on `PATH`, else in `/usr/sbin` (where Debian puts nginx and PgBouncer,
/// not on an ordinary user's `PATH`).
///
/// # Errors
///
/// When it is not installed.
pub fn find_program(program: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .with_context(|| format!("{program} is not installed (apt-get install {program})"))
}

/// The last `lines` lines of `file`, or a note that it cannot be read.
pub fn tail(file: &Path, lines: usize) -> String {
    match std::fs::read_to_string(file) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read it: {e})"),
    }
}
