//! `cargo xtask test [-- ARGS]`: the project's one test command.
//!
//! It starts a throwaway PostgreSQL cluster (its own data directory and a free port, apart from
//! the development cluster), migrates a template database on it, and runs the workspace's tests
//! with `DATABASE_URL` pointing at that template; each database test copies the template into a
//! database of its own. The cluster is stopped and deleted afterwards, whether the tests passed,
//! failed, or were interrupted with Ctrl-C.
//!
//! Next to that primary it starts a streaming replica of it (`pg_basebackup -R`) and a PgBouncer
//! (transaction pooling, any database name) in front of each, for the tests of the scale-out
//! paths: `PGBOUNCER_URL` (PgBouncer → primary), `REPLICA_URL` (the replica itself) and
//! `REPLICA_PGBOUNCER_URL` (PgBouncer → replica), all naming the template database with the
//! password in the URL, like `DATABASE_URL`. They go away with the primary.
//!
//! Each run has a cluster of its own (`target/pg/test-<pid>`, held by a lock file), so two runs
//! in one checkout do not remove each other's cluster; clusters whose run died are cleaned up by
//! the next run.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio::process::Command;

use xtask::pg::{Cluster, ServerHome};
use xtask::pgbouncer::PgBouncer;
use xtask::stack::{ProcessGroup, free_port};

/// Arguments of `cargo xtask test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// Arguments passed on to `cargo nextest run` (or `cargo test`), e.g. a test name filter.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

/// The template database the tests copy.
const TEMPLATE: &str = "dashboard_template";
/// Where the throwaway clusters live, apart from the development cluster.
const TEST_CLUSTERS: &str = "target/pg";
/// The prefix of a run's cluster directory; the process id follows.
const TEST_PREFIX: &str = "test-";

/// Stops and deletes the test cluster when dropped, so an error or a panic cannot leave it running.
struct ClusterGuard {
    cluster: Cluster,
    /// The replica and the PgBouncers, removed before the primary.
    scaleout: Option<Scaleout>,
    /// Held for the whole run: while it is locked, no other run removes this cluster.
    _lock: std::fs::File,
}

/// The replica of the test cluster and a PgBouncer in front of each database.
struct Scaleout {
    replica: Cluster,
    pgbouncer: PgBouncer,
    replica_pgbouncer: PgBouncer,
}

/// Where a run's replica and PgBouncers live, inside its cluster's directory.
const REPLICA_DIR: &str = "replica";
const PGBOUNCER_DIRS: [&str; 2] = ["pgbouncer", "pgbouncer-replica"];

impl Scaleout {
    /// Copies `primary` into a replica, starts it and puts a PgBouncer in front of each.
    async fn start(primary: &Cluster, dir: &Path) -> Result<Self> {
        let replica = primary.create_replica(&dir.join(REPLICA_DIR), free_port()?)?;
        let started = async {
            replica.start().await?;
            let pgbouncer =
                PgBouncer::start(&dir.join(PGBOUNCER_DIRS[0]), free_port()?, primary).await?;
            let replica_pgbouncer =
                PgBouncer::start(&dir.join(PGBOUNCER_DIRS[1]), free_port()?, &replica).await?;
            anyhow::Ok((pgbouncer, replica_pgbouncer))
        };
        match started.await {
            Ok((pgbouncer, replica_pgbouncer)) => Ok(Self {
                replica,
                pgbouncer,
                replica_pgbouncer,
            }),
            Err(e) => {
                // A PgBouncer that started is killed as it drops; the replica goes here.
                let _ = replica.remove_all();
                Err(e)
            }
        }
    }

    /// The variables the tests read, each naming `database`.
    fn env(&self, database: &str) -> Result<Vec<(&'static str, String)>> {
        Ok(vec![
            ("PGBOUNCER_URL", self.pgbouncer.url(database)),
            ("REPLICA_URL", self.replica.url(database)?),
            (
                "REPLICA_PGBOUNCER_URL",
                self.replica_pgbouncer.url(database),
            ),
        ])
    }
}

impl Drop for Scaleout {
    fn drop(&mut self) {
        // The PgBouncers are killed when their fields drop; their directories go with the
        // primary's unless the postgres user needed some elsewhere.
        for dir in [self.pgbouncer.dir(), self.replica_pgbouncer.dir()] {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Err(e) = self.replica.remove_all() {
            eprintln!("warning: could not remove the test replica: {e:#}");
        }
    }
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        drop(self.scaleout.take());
        if let Err(e) = self.cluster.remove_all() {
            eprintln!("warning: could not remove the test cluster: {e:#}");
        }
    }
}

/// Removes the clusters of runs that are gone (their lock file is no longer held).
async fn remove_stale_clusters() -> Result<()> {
    let Ok(entries) = std::fs::read_dir(TEST_CLUSTERS) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_run = name.starts_with(TEST_PREFIX) || name == "test";
        if !is_run || !entry.path().is_dir() {
            continue;
        }
        let lock_path = entry.path().join("lock");
        if let Ok(lock) = std::fs::OpenOptions::new().write(true).open(&lock_path)
            && lock.try_lock().is_err()
        {
            continue; // A live run holds it.
        }
        // A run killed outright leaves its PgBouncers and replica running too.
        for dir in PGBOUNCER_DIRS {
            let home = ServerHome::new(&entry.path().join(dir))?;
            xtask::topology::stop_stale(&home.dir.join("pgbouncer.pid"), "pgbouncer").await;
            let _ = std::fs::remove_dir_all(&home.dir);
        }
        Cluster::new(&entry.path().join(REPLICA_DIR), 0, "dashboard", Vec::new())?
            .remove_all()
            .with_context(|| format!("cannot remove the stale test replica of {name}"))?;
        let cluster = Cluster::new(&entry.path(), 0, "dashboard", Vec::new())?;
        cluster
            .remove_all()
            .with_context(|| format!("cannot remove the stale test cluster {name}"))?;
    }
    Ok(())
}

/// Runs `cargo xtask test`.
pub async fn run(args: TestArgs) -> Result<()> {
    remove_stale_clusters().await?;
    let dir = PathBuf::from(TEST_CLUSTERS).join(format!("{TEST_PREFIX}{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let lock = std::fs::File::create(dir.join("lock")).context("cannot create the lock file")?;
    lock.try_lock()
        .map_err(|e| anyhow::anyhow!("cannot lock {}: {e}", dir.display()))?;
    let port = free_port()?;
    let mut cluster = Cluster::throwaway(&dir, port)?;
    // TLS on, for the tests of `sslmode=require`; clients that do not ask for it stay plain.
    let tls_ca_file = cluster.enable_tls()?;
    let mut guard = ClusterGuard {
        cluster,
        scaleout: None,
        _lock: lock,
    };
    eprintln!("test cluster: starting on 127.0.0.1:{port}");
    guard.cluster.start().await?;
    guard.cluster.create_database(TEMPLATE, None)?;
    let started = std::time::Instant::now();
    let scaleout = Scaleout::start(&guard.cluster, &dir).await?;
    let mut test_env = vec![
        ("DATABASE_URL", guard.cluster.url(TEMPLATE)?),
        (
            "DATABASE_TLS_CA_FILE",
            tls_ca_file.canonicalize()?.to_string_lossy().into_owned(),
        ),
    ];
    test_env.extend(scaleout.env(TEMPLATE)?);
    eprintln!(
        "test cluster: replica on 127.0.0.1:{}, PgBouncers on :{} and :{} ({:.1} s)",
        scaleout.replica.port,
        scaleout.pgbouncer.port,
        scaleout.replica_pgbouncer.port,
        started.elapsed().as_secs_f64()
    );
    guard.scaleout = Some(scaleout);
    let template = guard.cluster.url(TEMPLATE)?;

    let nextest = Command::new("cargo")
        .args(["nextest", "--version"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success());
    // `-p crate` narrows the run; without it, everything in the workspace runs.
    let narrowed = args
        .args
        .iter()
        .any(|a| a == "-p" || a.starts_with("--package"));
    let scope: Vec<String> = if narrowed {
        Vec::new()
    } else {
        // The lab (chaos, benchmarks) is xtask's `lab` feature: its unit tests run too.
        ["--workspace", "--features", "xtask/lab"]
            .map(String::from)
            .to_vec()
    };
    let mut runs: Vec<Vec<String>> = Vec::new();
    if nextest {
        let mut run = vec!["nextest".into(), "run".into()];
        run.extend(scope.iter().cloned());
        run.extend(args.args.iter().cloned());
        runs.push(run);
        // nextest does not run doctests.
        let mut doc = vec!["test".into(), "--doc".into()];
        doc.extend(scope.iter().cloned());
        doc.extend(packages(&args.args));
        doc.extend(filter_for_doctests(&args.args));
        runs.push(doc);
    } else {
        eprintln!("cargo-nextest is not installed; using cargo test");
        // cargo test takes packages before `--` and test filters after it.
        let mut run = vec!["test".into()];
        run.extend(scope.iter().cloned());
        run.extend(packages(&args.args));
        let rest = without_packages(&args.args);
        if !rest.is_empty() {
            run.push("--".into());
            run.extend(rest);
        }
        runs.push(run);
    }

    let mut runs: Vec<(Vec<String>, CargoEnv)> =
        runs.into_iter().map(|run| (run, Vec::new())).collect();
    if args.args.is_empty() {
        // The whole suite includes taskgroup's loom model, built with its own cfg in its own
        // target directory (so the ordinary build is not rebuilt).
        runs.push((
            [
                "test",
                "-p",
                "taskgroup",
                "--release",
                "--lib",
                "loom_model",
            ]
            .map(String::from)
            .to_vec(),
            vec![
                ("RUSTFLAGS", "--cfg taskgroup_loom"),
                ("CARGO_TARGET_DIR", "target/loom"),
            ],
        ));
    }
    // Build first (the same command with --no-run, so nothing is built twice), then migrate the
    // template with the `api` binary that build made, then run.
    let mut build = runs[0].0.clone();
    build.push("--no-run".into());
    if let Some(filter) = build.iter().position(|a| a == "--") {
        build.truncate(filter); // cargo test takes --no-run before its `--`.
        build.push("--no-run".into());
    }
    let built = run_cargo(&build, &[], &test_env).await?;
    if !built.success() {
        drop(guard);
        bail!("`cargo {}` failed ({built})", build.join(" "));
    }
    migrate_template(&template, !narrowed).await?;
    for (run, env) in runs {
        let status = run_cargo(&run, &env, &test_env).await?;
        if !status.success() {
            drop(guard);
            bail!("`cargo {}` failed ({status})", run.join(" "));
        }
    }
    if args.args.is_empty() {
        // The OpenAPI document against the real server (the debug build the tests just made).
        let checked = crate::schemathesis::run(&guard.cluster, TEMPLATE).await;
        // The container image (that same build), migrating and serving on this cluster.
        let checked = match checked {
            Ok(()) => crate::image::test(&guard.cluster).await,
            failed => failed,
        };
        drop(guard);
        return checked;
    }
    drop(guard);
    Ok(())
}

/// Migrates the template database with the debug `api` binary (`api migrate`). The whole
/// suite's build has just made it; a narrowed run (`-p …`) builds it here, so a stale binary
/// never runs.
async fn migrate_template(url: &str, whole_suite: bool) -> Result<()> {
    const API: &str = "target/debug/api";
    if !whole_suite || !Path::new(API).is_file() {
        let built = Command::new("cargo")
            .args(["build", "--package", "api", "--bin", "api"])
            .status()
            .await
            .context("cannot run cargo build")?;
        if !built.success() {
            bail!("building the api binary failed");
        }
    }
    let migrate = Command::new(API)
        .arg("migrate")
        .env("APP__DATABASE__URL", url)
        .env("APP_CONFIG_DIR", "config")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(120), migrate)
        .await
        .context("api migrate did not finish within 120 s")?
        .context("cannot run api migrate")?;
    if !output.status.success() {
        bail!(
            "migrating the template failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    eprintln!("test cluster: template migrated");
    Ok(())
}

/// Environment variables for one cargo run, on top of the test environment.
type CargoEnv = Vec<(&'static str, &'static str)>;

/// The `-p NAME` pairs among the arguments, for the doctest run.
fn packages(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "-p" || arg == "--package" {
            out.push("-p".into());
            out.extend(it.next().cloned());
        } else if let Some(name) = arg.strip_prefix("--package=") {
            out.push(format!("--package={name}"));
        }
    }
    out
}

/// The arguments other than `-p NAME` pairs.
fn without_packages(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "-p" || arg == "--package" {
            it.next();
        } else if !arg.starts_with("--package=") {
            out.push(arg.clone());
        }
    }
    out
}

/// A test-name filter given to nextest, passed to the doctest run as well.
fn filter_for_doctests(args: &[String]) -> Vec<String> {
    match args.first() {
        Some(filter) if !filter.starts_with('-') => vec!["--".into(), filter.clone()],
        _ => Vec::new(),
    }
}

/// Runs cargo with the test environment (`test_env`: the databases' URLs) and `env`; Ctrl-C
/// stops it and still lets the caller clean up.
async fn run_cargo(
    args: &[String],
    env: &[(&str, &str)],
    test_env: &[(&str, String)],
) -> Result<ExitStatus> {
    let config_dir = std::env::current_dir()?.join("config");
    // In a process group of its own, so that stopping it stops nextest and every test binary
    // too, not just cargo.
    let mut child = Command::new("cargo")
        .args(args)
        .envs(test_env.iter().map(|(key, value)| (key, value)))
        .env("APP_CONFIG_DIR", config_dir)
        .envs(env.iter().copied())
        .process_group(0)
        .spawn()
        .context("cannot run cargo")?;
    let group = ProcessGroup::of(&child);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    let stopped = tokio::select! {
        status = child.wait() => return Ok(status?),
        _ = terminate.recv() => "terminated",
        _ = tokio::signal::ctrl_c() => "interrupted",
    };
    // Make sure every test process is gone before the cluster is removed under it.
    if let Some(group) = group {
        group.stop(std::time::Duration::from_secs(5)).await;
    }
    let _ = child.wait().await;
    bail!("{stopped}");
}
