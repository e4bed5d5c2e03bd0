//! The service's performance benchmarks: `cargo xtask bench db-ceiling|latency|modes|batch|report`.
//!
//! Each one runs the real stack on this machine: the development PostgreSQL cluster (seeded with
//! 100 000 users if empty), the stand-in recommendation service in this process, the API as a
//! release-built child process on a free port, and the load generator in this process. They all
//! share the CPU, which is the honest setting for a 2-core machine: the figures that matter are
//! ratios measured in one run (the service against PostgreSQL's own ceiling, one query mode
//! against the other), not absolute numbers.
//!
//! Each benchmark is a module; `report` runs them all and writes the README's Performance table
//! (`target/bench/performance.md`, and the README itself with `--update-readme`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use loadtest::{Progress, Report, Scenario};
use tokio::process::Command;
use xtask::settings::{PgUrl, Settings};

use xtask::stack::{self, ApiProcess};

use crate::chaos::client;

/// Options shared by the benchmarks.
#[derive(Debug, Clone, Args)]
pub struct PerfArgs {
    /// Concurrent connections of closed-loop runs (and pgbench clients).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Measured duration of each run, in seconds.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Warm-up before each measured run, in seconds (excluded from the figures).
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Users to seed when the database is empty.
    #[arg(long, default_value_t = 100_000)]
    users: u32,
    /// Rounds of `db-ceiling` and `modes`: the two compared runs (pgbench and the dashboard; the
    /// two query modes) alternate this many times and medians are reported, so that a slow spell
    /// of a shared machine lands on both sides instead of on one.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
}

impl PerfArgs {
    /// Measured seconds of each run.
    pub(crate) fn duration(&self) -> u64 {
        self.duration
    }

    /// Connections of closed-loop runs, and pgbench clients.
    pub(crate) fn connections(&self) -> usize {
        self.connections
    }

    /// Rounds of alternating runs.
    pub(crate) fn rounds(&self) -> u32 {
        self.rounds
    }
}

/// Options of `report`.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    perf: PerfArgs,
    /// Also replace the Performance section of README.md with the new table.
    #[arg(long)]
    update_readme: bool,
}

/// Where the benchmarks write their reports.
const OUT_DIR: &str = "target/bench";

/// The dashboard's three statements, as pgbench runs them for a random user.
const PGBENCH_SCRIPT: &str = "\\set uid random(1, :users)
SELECT id, username, email, avatar FROM users WHERE id = :uid;
SELECT id, product, amount, created_at FROM orders WHERE user_id = :uid ORDER BY created_at DESC, id DESC LIMIT 100;
SELECT id, product_id, rating, content FROM reviews WHERE user_id = :uid ORDER BY id DESC LIMIT 100;
";

/// The running stack: settings, how many users there are, the stand-in.
pub(crate) struct Bench {
    settings: Settings,
    users: u64,
    upstream: upstream::Server,
    args: PerfArgs,
}

impl Bench {
    /// Starts the cluster, prepares the data, builds the API and starts the stand-in.
    pub(crate) async fn start(args: &PerfArgs, upstream_delay: Duration) -> Result<Self> {
        let settings = Settings::load()?;
        stack::build_release(&["api"]).await?;
        let (cluster, database) = xtask::pg::dev_cluster(&settings)?;
        xtask::pg::start(&cluster, &database).await?;
        let url = settings.database.url_with_password()?;
        stack::prepare_database(Path::new(stack::RELEASE_API), &url, args.users).await?;
        let users = stack::user_count(&url)?;
        if users == 0 {
            bail!("the database has no users");
        }
        let upstream = upstream::Server::start(upstream::Config {
            delay: upstream_delay,
            ..upstream::Config::default()
        })
        .await
        .context("cannot start the stand-in recommendation service")?;
        Ok(Self {
            settings,
            users,
            upstream,
            args: args.clone(),
        })
    }

    /// Starts an API with these extra settings.
    pub(crate) async fn api(&self, extra: &[(&str, String)]) -> Result<ApiProcess> {
        let mut settings = vec![
            ("APP__RECOMMENDATIONS__BASE_URL", self.upstream.base_url()),
            ("APP__TELEMETRY__LEVEL", "warn".to_owned()),
        ];
        settings.extend(extra.iter().cloned());
        ApiProcess::start(stack::free_port()?, &settings, true).await
    }

    pub(super) fn load(&self, api: &ApiProcess, scenario: Scenario) -> loadtest::Config {
        self.load_url(&api.base, scenario)
    }

    pub(crate) fn load_url(&self, url: &str, scenario: Scenario) -> loadtest::Config {
        loadtest::Config {
            url: Some(url.to_owned()),
            scenario,
            duration: Duration::from_secs(self.args.duration),
            warmup: Duration::from_secs(self.args.warmup),
            connections: self.args.connections,
            users: self.users,
            ..loadtest::Config::default()
        }
    }

    /// How many users there are (ids 1 to this).
    pub(crate) fn users(&self) -> u64 {
        self.users
    }

    /// The stand-in recommendation service's address.
    pub(crate) fn upstream_url(&self) -> String {
        self.upstream.base_url()
    }

    /// The database's URL, password included (for a peer that reads `DATABASE_URL`).
    pub(crate) fn database_url(&self) -> Result<String> {
        self.settings.database.url_with_password()
    }

    pub(crate) async fn stop(self) {
        self.upstream.shutdown().await;
    }
}

/// Runs a load and saves its report under [`OUT_DIR`].
async fn measure(config: &loadtest::Config, name: &str) -> Result<Report> {
    let report = loadtest::run(config, Progress::Auto)
        .await
        .with_context(|| format!("the {name} load run failed"))?;
    loadtest::write(&report, Path::new(OUT_DIR), name)
        .with_context(|| format!("cannot write the {name} report"))?;
    Ok(report)
}

mod auth;
mod batch;
mod ceiling;
mod latency;
mod modes;
mod peer;
mod report;

pub use auth::run_auth;
pub use batch::run_batch;
pub use ceiling::run_db_ceiling;
pub use latency::run_latency;
pub use modes::run_modes;
pub use peer::run_peer;
pub(crate) use peer::{peer_venv, start_seed};
pub use report::run_report;

/// pgbench's transactions per second for the dashboard's three statements.
pub(crate) async fn pgbench_tps(bench: &Bench) -> Result<f64> {
    let pg = PgUrl::parse(&bench.database_url()?)?;
    let password = pg.password.clone().unwrap_or_default();
    let (port, user, dbname) = (pg.port, pg.user, pg.database);
    std::fs::create_dir_all(OUT_DIR)?;
    let script = PathBuf::from(OUT_DIR).join("dashboard.pgbench");
    std::fs::write(&script, PGBENCH_SCRIPT)?;
    let clients = bench.args.connections.to_string();
    let seconds = bench.args.duration.to_string();
    println!("pgbench: the dashboard's 3 statements, -M prepared, {clients} clients, {seconds} s");
    let output = Command::new("pgbench")
        .env("PGPASSWORD", password)
        .args([
            "-n",
            "-M",
            "prepared",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .args(["-U", &user, "-c", &clients, "-j", "2", "-T", &seconds])
        .arg("-D")
        .arg(format!("users={}", bench.users))
        .arg("-f")
        .arg(&script)
        .arg(&dbname)
        .output()
        .await
        .context("cannot run pgbench (Debian package postgresql-client)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench failed: {}{}",
            text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix("tps = ")?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .with_context(|| format!("no tps line in pgbench's output:\n{text}"))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn listed(values: &[f64]) -> String {
    let parts: Vec<String> = values.iter().map(|v| format!("{v:.2}")).collect();
    parts.join(", ")
}

/// Measures each API in turn, `rounds` times (later rounds with at most 2 s of warm-up), so that
/// every setting sees the same machine; `load(i, api)` makes the load of API `i`, `labels[i]`
/// names it. Returns every round's report per API; the APIs are stopped either way.
pub(super) async fn alternate(
    bench: &Bench,
    apis: Vec<ApiProcess>,
    labels: &[&str],
    load: impl Fn(usize, &ApiProcess) -> loadtest::Config,
) -> Result<Vec<Vec<Report>>> {
    let result = async {
        let mut runs: Vec<Vec<Report>> = vec![Vec::new(); apis.len()];
        for round in 1..=bench.args.rounds {
            for (i, api) in apis.iter().enumerate() {
                let mut config = load(i, api);
                if round > 1 {
                    config.warmup = config.warmup.min(Duration::from_secs(2));
                }
                let label = labels.get(i).copied().unwrap_or("api");
                let name = format!("{}-{round}", label.replace([' ', ','], "-"));
                let report = measure(&config, &name).await?;
                println!(
                    "{label}, round {round}/{}:\n{}",
                    bench.args.rounds,
                    report.summary()
                );
                runs[i].push(report);
            }
        }
        Ok::<_, anyhow::Error>(runs)
    }
    .await;
    for api in apis {
        api.stop(Duration::from_secs(20)).await?;
    }
    result
}

/// The round whose successful throughput is the median.
pub(super) fn median_round(mut reports: Vec<Report>) -> Result<Report> {
    reports.sort_by(|a, b| a.measured.success_rps.total_cmp(&b.measured.success_rps));
    let middle = reports.len() / 2;
    reports
        .into_iter()
        .nth(middle)
        .context("no round was measured")
}
