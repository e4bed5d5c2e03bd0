//! `cargo xtask cluster up`: the scale-out topology on this machine, in the foreground.
//!
//! Builds the API and the stand-in in release mode, then starts [`xtask::topology::Topology`]:
//! a PostgreSQL primary (its own cluster under `target/cluster/`, seeded once) and optionally a
//! streaming replica, a PgBouncer in front of each, N API instances reading through them, and
//! nginx serving HTTPS in front of the instances. Run as root, the stand-in and each instance are
//! hosts of their own (network namespaces joined by veth pairs to a bridge, removed at the end);
//! otherwise, or with `--loopback`, everything listens on 127.0.0.1. It prints the URLs and runs
//! until Ctrl-C or
//! SIGTERM, then stops everything it started, in reverse order; a failed start stops what had
//! started too. `cargo xtask cluster chaos` runs the fault scenarios against it: the `lab`
//! binary's `cluster-chaos`, built in release.

use std::time::Instant;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use xtask::netns::Network;
use xtask::stack;
use xtask::topology::{DATABASE, Ports, Topology, TopologyOptions};

/// Arguments of `cargo xtask cluster`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Start the topology in the foreground and print its URLs; Ctrl-C stops it all.
    Up(UpArgs),
    /// Faults under load (an instance killed, a rolling restart, the replica, PgBouncer and the
    /// databases stopped) with a PASS/FAIL report; exits non-zero on any FAIL. `--help` lists
    /// the scenarios.
    #[command(disable_help_flag = true)]
    Chaos(crate::Forward),
}

/// Arguments of `cargo xtask cluster up`.
#[derive(Debug, Args)]
struct UpArgs {
    /// API instances behind nginx.
    #[arg(long, default_value_t = 3)]
    instances: usize,
    /// Also run a streaming replica (pg_basebackup -R) with its own PgBouncer, for the reads.
    #[arg(long)]
    replica: bool,
    /// Users to seed when the cluster's database is empty.
    #[arg(long, default_value_t = 100_000)]
    users: u32,
    /// nginx's HTTPS port; the other parts take the ports just above it (printed at start).
    #[arg(long, default_value_t = 8443)]
    port: u16,
    /// Worker threads per instance (`server.workers`; 0: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Show the instances' logs on the terminal.
    #[arg(long)]
    logs: bool,
    /// Everything on 127.0.0.1, even as root (no network namespaces).
    #[arg(long)]
    loopback: bool,
}

/// Runs `cargo xtask cluster`.
pub async fn run(args: ClusterArgs) -> Result<()> {
    match args.command {
        ClusterCommand::Up(args) => up(args).await,
        ClusterCommand::Chaos(f) => Err(crate::cargo_run("lab", Some("cluster-chaos"), &f)),
    }
}

async fn up(args: UpArgs) -> Result<()> {
    println!("==> building the API and the stand-in recommendation service (release)");
    tokio::select! {
        built = stack::build_release(&["api", "upstream"]) => built?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
    let started = Instant::now();
    let mut options = TopologyOptions {
        instances: args.instances,
        replica: args.replica,
        users: args.users,
        ports: Some(Ports::from_base(args.port, args.instances)),
        instance_output: args.logs,
        progress: true,
        hosts: !args.loopback && Network::available(),
        ..TopologyOptions::default()
    };
    if args.workers > 0 {
        options
            .api_settings
            .push(("APP__SERVER__WORKERS".to_owned(), args.workers.to_string()));
    }
    // Dropping the start on Ctrl-C stops whatever had started.
    let topology = tokio::select! {
        topology = Topology::start(&options) => topology?,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    };
    print_urls(&topology, started.elapsed().as_secs_f64(), &options);

    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    println!("==> stopping nginx, the instances, the stand-in, PgBouncer, PostgreSQL");
    topology.stop().await?;
    println!("stopped");
    Ok(())
}

fn print_urls(topology: &Topology, seconds: f64, options: &TopologyOptions) {
    let ports = topology.ports();
    let https = topology.https_url();
    let cert = options.dir.join("tls/cert.pem");
    println!("\nThe cluster is up ({seconds:.1} s). Try:");
    println!(
        "  curl --cacert {} {https}/api/users/42/dashboard   (or curl -k)",
        cert.display()
    );
    println!(
        "  curl {}/api/users/42/dashboard   (plain HTTP on 127.0.0.1 only, for tools without TLS)",
        topology.http_url()
    );
    for i in 0..topology.instance_count() {
        println!(
            "  instance {i}: {} (pid {}), metrics {}",
            topology.instance_url(i),
            topology
                .instance_pid(i)
                .map_or_else(|| "-".to_owned(), |p| p.to_string()),
            topology.metrics_url(i)
        );
    }
    if let (Some((upstream, instances)), Some(machine)) =
        (topology.hosts().split_first(), topology.gateway())
    {
        println!(
            "  hosts (network namespaces): the stand-in {} ({}); instances {}; \
             nginx, PgBouncer and PostgreSQL on this machine ({machine} on the bridge)",
            upstream.address,
            upstream.namespace,
            instances
                .iter()
                .map(|host| host.address.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        );
    }
    let user = &topology.primary().user;
    let password_file = topology.primary().password_file();
    println!(
        "  PgBouncer → primary: postgres://{user}@127.0.0.1:{}/{DATABASE} (admin: database pgbouncer, SHOW POOLS)",
        ports.pgbouncer
    );
    println!(
        "  PostgreSQL primary: postgres://{user}@127.0.0.1:{}/{DATABASE}",
        ports.primary
    );
    if topology.replica().is_some() {
        println!(
            "  PgBouncer → replica: postgres://{user}@127.0.0.1:{}/{DATABASE}",
            ports.replica_pgbouncer
        );
        println!(
            "  PostgreSQL replica (hot standby): postgres://{user}@127.0.0.1:{}/{DATABASE}",
            ports.replica
        );
    }
    println!(
        "  password: {}; logs and data under {}",
        password_file.display(),
        options.dir.display()
    );
    println!("Ctrl-C stops everything this command started.\n");
}
