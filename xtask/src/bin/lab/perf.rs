//! The service's performance benchmarks: `cargo xtask bench db-ceiling|latency|modes|batch|report`.
//!
//! Each one runs the real stack on this machine: the development PostgreSQL cluster (seeded with
//! 100 000 users if empty), the stand-in recommendation service in this process, the API as a
//! release-built child process on a free port, and the load generator in this process. They all
//! share the CPU, which is the honest setting for a 2-core machine: the figures that matter are
//! ratios measured in one run (the service against PostgreSQL's own ceiling, one query mode
//! against the other), not absolute numbers.
//!
//! `report` runs them all and writes the README's Performance table
//! (`target/bench/performance.md`, and the README itself with `--update-readme`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use loadtest::{Progress, Report, Scenario};
use tokio::process::Command;
use xtask::settings::{PgUrl, Settings};

use xtask::stack::{self, ApiProcess};

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

    fn load(&self, api: &ApiProcess, scenario: Scenario) -> loadtest::Config {
        self.load_url(&api.base, scenario)
    }

    pub(crate) fn load_url(&self, url: &str, scenario: Scenario) -> loadtest::Config {
        loadtest::Config {
            url: url.to_owned(),
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

/// The result of `db-ceiling`: the round whose ratio is the median, and every round's ratio.
struct Ceiling {
    pgbench_tps: f64,
    dashboard_rps: f64,
    dashboard_p99_ms: f64,
    error_rate: f64,
    peak_rss_mib: Option<f64>,
    ratios: Vec<f64>,
}

impl Ceiling {
    fn ratio(&self) -> f64 {
        self.dashboard_rps / self.pgbench_tps
    }

    fn rounds(&self) -> String {
        listed(&self.ratios)
    }
}

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

async fn db_ceiling(bench: &Bench) -> Result<Ceiling> {
    let api = bench.api(&[]).await?;
    let result = ceiling_rounds(bench, &api).await;
    let peak_rss_mib = api.peak_rss_kib().map(|kib| kib as f64 / 1024.0);
    api.stop(Duration::from_secs(20)).await?;
    let mut rounds = result?;
    let ratios: Vec<f64> = rounds
        .iter()
        .map(|(tps, report)| ratio(*tps, report))
        .collect();
    rounds.sort_by(|a, b| ratio(a.0, &a.1).total_cmp(&ratio(b.0, &b.1)));
    let (pgbench_tps, report) = rounds.swap_remove(rounds.len() / 2);
    Ok(Ceiling {
        pgbench_tps,
        dashboard_rps: report.measured.success_rps,
        dashboard_p99_ms: report.measured.latency.p99_ms,
        error_rate: report.measured.error_rate,
        peak_rss_mib,
        ratios,
    })
}

fn ratio(pgbench_tps: f64, report: &Report) -> f64 {
    report.measured.success_rps / pgbench_tps.max(1e-9)
}

/// pgbench, then the dashboard, `rounds` times; the API stays up (idle while pgbench runs).
async fn ceiling_rounds(bench: &Bench, api: &ApiProcess) -> Result<Vec<(f64, Report)>> {
    let mut rounds = Vec::new();
    for round in 1..=bench.args.rounds {
        let pgbench_tps = pgbench_tps(bench).await?;
        println!("pgbench: {pgbench_tps:.0} transactions/s");
        let mut config = bench.load(api, Scenario::Dashboard);
        if round > 1 {
            // The API's pool and caches are warm after the first round.
            config.warmup = config.warmup.min(Duration::from_secs(2));
        }
        let report = measure(&config, &format!("db-ceiling-dashboard-{round}")).await?;
        println!("{}", report.summary());
        println!(
            "round {round}/{}: pgbench {pgbench_tps:.0} tx/s, dashboard {:.0} req/s, ratio {:.2}\n",
            bench.args.rounds,
            report.measured.success_rps,
            ratio(pgbench_tps, &report)
        );
        rounds.push((pgbench_tps, report));
    }
    Ok(rounds)
}

/// The result of `latency`.
struct LatencyFigures {
    delay_ms: u64,
    rate: f64,
    achieved: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: f64,
}

async fn latency(bench: &Bench, delay_ms: u64, rate: f64) -> Result<LatencyFigures> {
    let api = bench.api(&[]).await?;
    let config = loadtest::Config {
        rate: Some(rate),
        ..bench.load(&api, Scenario::Dashboard)
    };
    let report = measure(&config, "latency-dashboard").await?;
    api.stop(Duration::from_secs(20)).await?;
    println!("{}", report.summary());
    Ok(LatencyFigures {
        delay_ms,
        rate,
        achieved: report.measured.attempts_rps,
        p50_ms: report.measured.latency.p50_ms,
        p99_ms: report.measured.latency.p99_ms,
        errors: report.measured.error_rate,
    })
}

/// Throughput and latency of one query mode.
struct ModeFigures {
    mode: &'static str,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Both query modes, one API each, measured alternately `rounds` times; each mode's figures are
/// those of its median round, and `ratios` the pipelined/pooled throughput of every round.
async fn modes(bench: &Bench) -> Result<(Vec<ModeFigures>, Vec<f64>)> {
    const MODES: [&str; 2] = ["pipelined", "pooled"];
    let mut apis = Vec::new();
    for mode in MODES {
        apis.push(
            bench
                .api(&[("APP__SERVICE__QUERY_MODE", mode.to_owned())])
                .await?,
        );
    }
    let result = async {
        let mut runs: [Vec<Report>; 2] = [Vec::new(), Vec::new()];
        for round in 1..=bench.args.rounds {
            for (i, (mode, api)) in MODES.iter().zip(&apis).enumerate() {
                let mut config = bench.load(api, Scenario::Dashboard);
                if round > 1 {
                    config.warmup = config.warmup.min(Duration::from_secs(2));
                }
                let report = measure(&config, &format!("mode-{mode}-{round}")).await?;
                println!(
                    "{mode}, round {round}/{}:\n{}",
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
    let [pipelined, pooled] = result?;
    let ratios = pipelined
        .iter()
        .zip(&pooled)
        .map(|(a, b)| a.measured.success_rps / b.measured.success_rps.max(1e-9))
        .collect();
    let figures = MODES
        .iter()
        .zip([pipelined, pooled])
        .map(|(mode, mut reports)| {
            reports.sort_by(|a, b| a.measured.success_rps.total_cmp(&b.measured.success_rps));
            let median = &reports[reports.len() / 2].measured;
            ModeFigures {
                mode,
                rps: median.success_rps,
                p50_ms: median.latency.p50_ms,
                p99_ms: median.latency.p99_ms,
            }
        })
        .collect();
    Ok((figures, ratios))
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

/// Time per batch of `ids` ids, for one chunk size.
struct BatchFigures {
    chunk_size: usize,
    mean_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

async fn batch(bench: &Bench, ids: usize, rounds: usize) -> Result<Vec<BatchFigures>> {
    let mut figures = Vec::new();
    for chunk_size in [50usize, 1] {
        let api = bench
            .api(&[
                ("APP__SERVICE__BATCH__CHUNK_SIZE", chunk_size.to_string()),
                ("APP__SERVICE__BATCH__CONCURRENCY", "20".to_owned()),
            ])
            .await?;
        let address = api.base.trim_start_matches("http://").to_owned();
        let mut times = Vec::with_capacity(rounds);
        for round in 0..rounds + 1 {
            // Spread the ids over the table, a different slice each round.
            let first = (round * ids) as u64 % bench.users.saturating_sub(ids as u64).max(1);
            let body = format!(
                "{{\"user_ids\":[{}]}}",
                (0..ids as u64)
                    .map(|i| (first + i + 1).to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            let started = Instant::now();
            let status = post(&address, "/api/users/batch", &body).await?;
            let elapsed = started.elapsed();
            if status != 200 {
                bail!("a batch of {ids} ids answered {status}");
            }
            // The first round warms the pool and the statement caches.
            if round > 0 {
                times.push(elapsed.as_secs_f64() * 1000.0);
            }
        }
        api.stop(Duration::from_secs(20)).await?;
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        let max = times.iter().copied().fold(0.0, f64::max);
        println!(
            "batch of {ids} ids, concurrency 20, {chunk_size} id(s) per statement: \
             mean {mean:.1} ms, min {min:.1} ms, max {max:.1} ms over {rounds} batches"
        );
        figures.push(BatchFigures {
            chunk_size,
            mean_ms: mean,
            min_ms: min,
            max_ms: max,
        });
    }
    Ok(figures)
}

/// One POST with a JSON body over a fresh connection; returns the status code.
async fn post(address: &str, path: &str, body: &str) -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(address).await?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut answer))
        .await
        .context("the batch took longer than 30 s")??;
    let head = String::from_utf8_lossy(&answer[..answer.len().min(32)]).into_owned();
    head.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP answer: {head:?}"))
}

/// The seed's FastAPI service next to ours.
struct PeerFigures {
    ours_rps: f64,
    ours_p99_ms: f64,
    seed_rps: f64,
    seed_p99_ms: f64,
    seed_errors: f64,
    workers: usize,
}

/// Where the seed's service and its Python environment live.
const PEER_DIR: &str = "bench/seed-fastapi";
const PEER_VENV: &str = "target/seed-fastapi-venv";

/// Creates the Python virtual environment for the seed's service, once.
pub(crate) async fn peer_venv() -> Result<PathBuf> {
    let venv = PathBuf::from(PEER_VENV);
    let uvicorn = venv.join("bin/uvicorn");
    if uvicorn.is_file() {
        return Ok(uvicorn);
    }
    println!("creating {PEER_VENV} with the seed's stack (FastAPI, uvicorn, asyncpg, httpx)");
    let created = Command::new("python3")
        .args(["-m", "venv", PEER_VENV])
        .status()
        .await
        .context("cannot run python3 (CPython 3.11+ with venv is needed)")?;
    if !created.success() {
        bail!("python3 -m venv {PEER_VENV} failed");
    }
    let installed = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "-r"])
        .arg(PathBuf::from(PEER_DIR).join("requirements.txt"))
        .status()
        .await
        .context("cannot run pip")?;
    if !installed.success() {
        let _ = std::fs::remove_dir_all(&venv);
        bail!("pip install failed (PyPI must be reachable)");
    }
    Ok(uvicorn)
}

/// The seed's FastAPI service, started on the bench's database and stand-in: the process, its
/// process group (uvicorn's workers go with it) and its address, once it answers.
pub(crate) async fn start_seed(
    bench: &Bench,
    uvicorn: &Path,
    workers: usize,
) -> Result<(tokio::process::Child, Option<stack::ProcessGroup>, String)> {
    let port = stack::free_port()?;
    let database_url = bench.database_url()?;
    // The article runs uvicorn with --workers 4; one per core is the fair match for this
    // service's one actix worker per core.
    let mut seed = Command::new(uvicorn)
        .args(["app:app", "--app-dir", PEER_DIR, "--host", "127.0.0.1"])
        .args([
            "--port",
            &port.to_string(),
            "--workers",
            &workers.to_string(),
        ])
        .args(["--no-access-log", "--log-level", "warning"])
        .env("DATABASE_URL", database_url)
        .env("RECOMMENDATIONS_URL", bench.upstream.base_url())
        // A group of its own: uvicorn's worker processes go with it on every path.
        .process_group(0)
        .spawn()
        .context("cannot start the seed's service with uvicorn")?;
    let group = stack::ProcessGroup::of(&seed);
    let address = format!("127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..300 {
        if let Some(status) = seed.try_wait()? {
            bail!("the seed's service exited during start-up ({status})");
        }
        if stack::answers_200(&address, "/api/users/1/dashboard").await {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !ready {
        bail!("the seed's service did not answer within 30 s");
    }
    Ok((seed, group, address))
}

async fn peer(bench: &Bench) -> Result<PeerFigures> {
    let uvicorn = peer_venv().await?;
    let workers = std::thread::available_parallelism().map_or(1, usize::from);

    let api = bench.api(&[]).await?;
    let ours = measure(&bench.load(&api, Scenario::Dashboard), "peer-rust").await?;
    api.stop(Duration::from_secs(20)).await?;
    println!("this service:\n{}", ours.summary());

    let (mut seed, group, address) = start_seed(bench, &uvicorn, workers).await?;
    let config = bench.load_url(&format!("http://{address}"), Scenario::Dashboard);
    let theirs = measure(&config, "peer-seed-fastapi").await;
    if let Some(group) = group {
        group.stop(Duration::from_secs(10)).await;
    }
    let _ = seed.wait().await;
    let theirs = theirs?;
    println!("the seed's FastAPI service:\n{}", theirs.summary());
    Ok(PeerFigures {
        ours_rps: ours.measured.success_rps,
        ours_p99_ms: ours.measured.latency.p99_ms,
        seed_rps: theirs.measured.success_rps,
        seed_p99_ms: theirs.measured.latency.p99_ms,
        seed_errors: theirs.measured.error_rate,
        workers,
    })
}

/// `cargo xtask bench peer`.
pub async fn run_peer(args: PerfArgs) -> Result<()> {
    let bench = Bench::start(&args, Duration::ZERO).await?;
    let result = peer(&bench).await;
    bench.stop().await;
    let figures = result?;
    println!(
        "\nthis service: {:.0} req/s (p99 {:.1} ms); the seed's FastAPI service: {:.0} req/s \
         (p99 {:.1} ms, errors {:.2}%); {:.1}x",
        figures.ours_rps,
        figures.ours_p99_ms,
        figures.seed_rps,
        figures.seed_p99_ms,
        figures.seed_errors * 100.0,
        figures.ours_rps / figures.seed_rps.max(1e-9)
    );
    Ok(())
}

/// `cargo xtask bench db-ceiling`.
pub async fn run_db_ceiling(args: PerfArgs) -> Result<()> {
    let bench = Bench::start(&args, Duration::ZERO).await?;
    let result = db_ceiling(&bench).await;
    bench.stop().await;
    let ceiling = result?;
    println!(
        "\nmedian round: pgbench ceiling {:.0} tx/s; dashboard {:.0} req/s; ratio {:.2} \
         (target >= 0.80); every round: {}",
        ceiling.pgbench_tps,
        ceiling.dashboard_rps,
        ceiling.ratio(),
        ceiling.rounds()
    );
    Ok(())
}

/// `cargo xtask bench latency`.
pub async fn run_latency(args: PerfArgs, delay_ms: u64, rate: f64) -> Result<()> {
    let bench = Bench::start(&args, Duration::from_millis(delay_ms)).await?;
    let result = latency(&bench, delay_ms, rate).await;
    bench.stop().await;
    let figures = result?;
    println!(
        "\nupstream delay {delay_ms} ms, open loop {rate:.0} req/s: p50 {:.1} ms, p99 {:.1} ms \
         (target p50 <= {} ms)",
        figures.p50_ms,
        figures.p99_ms,
        delay_ms + 2
    );
    Ok(())
}

/// `cargo xtask bench modes`.
pub async fn run_modes(args: PerfArgs) -> Result<()> {
    let bench = Bench::start(&args, Duration::ZERO).await?;
    let result = modes(&bench).await;
    bench.stop().await;
    let (figures, ratios) = result?;
    println!();
    for f in &figures {
        println!(
            "{:>9}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms (median round)",
            f.mode, f.rps, f.p50_ms, f.p99_ms
        );
    }
    println!(
        "pipelined / pooled: {:.2} (median; every round: {})",
        median(&ratios),
        listed(&ratios)
    );
    Ok(())
}

/// `cargo xtask bench batch`.
pub async fn run_batch(args: PerfArgs, ids: usize, rounds: usize) -> Result<()> {
    let bench = Bench::start(&args, Duration::ZERO).await?;
    let result = batch(&bench, ids, rounds).await;
    bench.stop().await;
    result.map(|_| ())
}

/// `cargo xtask bench report`: every benchmark, then the Performance table.
pub async fn run_report(args: ReportArgs) -> Result<()> {
    let started = Instant::now();
    let bench = Bench::start(&args.perf, Duration::ZERO).await?;
    let result = async {
        let ceiling = db_ceiling(&bench).await?;
        let modes = modes(&bench).await?;
        let batch = batch(&bench, 1000, 10).await?;
        let peer = peer(&bench).await?;
        Ok::<_, anyhow::Error>((ceiling, modes, batch, peer))
    }
    .await;
    bench.stop().await;
    let (ceiling, modes, batch, peer) = result?;
    let slow = Bench::start(&args.perf, Duration::from_millis(50)).await?;
    let result = latency(&slow, 50, 200.0).await;
    slow.stop().await;
    let latency = result?;

    let table = render(&args.perf, &ceiling, &latency, &modes, &batch, &peer);
    std::fs::create_dir_all(OUT_DIR)?;
    let path = PathBuf::from(OUT_DIR).join("performance.md");
    std::fs::write(&path, &table)?;
    println!("\n{table}");
    println!(
        "written to {} (all runs took {:.0} s)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    if args.update_readme {
        update_readme(&table)?;
        println!("README.md's Performance section updated");
    }
    Ok(())
}

fn render(
    args: &PerfArgs,
    ceiling: &Ceiling,
    latency: &LatencyFigures,
    modes: &(Vec<ModeFigures>, Vec<f64>),
    batch: &[BatchFigures],
    peer: &PeerFigures,
) -> String {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or_else(
            || "?".to_owned(),
            |kib| format!("{:.0} GiB", kib / 1024.0 / 1024.0),
        );
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Measured by `cargo xtask bench report` on a {cores}-core machine with {memory} of RAM, \
         release build. PostgreSQL, the API (actix-web, {cores} workers), the stand-in \
         recommendation service and the load generator all share those cores, so absolute \
         numbers are low; the ratios measured in one run are what carry over. Closed-loop runs \
         use {} connections, {} s measured after a {} s warm-up, ids uniform over the seeded \
         users. JSON and SVG reports of every run are in `target/bench/`.\n",
        args.connections, args.duration, args.warmup
    );
    let _ = writeln!(out, "| what | figure | target | command |");
    let _ = writeln!(out, "| --- | --- | --- | --- |");
    let _ = writeln!(
        out,
        "| PostgreSQL ceiling: pgbench, the dashboard's 3 SELECTs, `-M prepared`, {} clients (median round) | {:.0} tx/s | | `cargo xtask bench db-ceiling` |",
        args.connections, ceiling.pgbench_tps
    );
    let _ = writeln!(
        out,
        "| Dashboard throughput, upstream 0 ms (median round) | {:.0} req/s, p99 {:.1} ms, errors {:.2}% | | `cargo xtask bench db-ceiling` |",
        ceiling.dashboard_rps,
        ceiling.dashboard_p99_ms,
        ceiling.error_rate * 100.0
    );
    let _ = writeln!(
        out,
        "| Dashboard / pgbench ceiling, median of {} alternating rounds (each round: {}) | **{:.2}** | ≥ 0.80 | `cargo xtask bench db-ceiling` |",
        ceiling.ratios.len(),
        ceiling.rounds(),
        ceiling.ratio()
    );
    let _ = writeln!(
        out,
        "| Dashboard latency, upstream {} ms, open loop {:.0} req/s (achieved {:.0}) | p50 **{:.1} ms**, p99 {:.1} ms, errors {:.2}% | p50 ≤ {} ms | `cargo xtask bench latency` |",
        latency.delay_ms,
        latency.rate,
        latency.achieved,
        latency.p50_ms,
        latency.p99_ms,
        latency.errors * 100.0,
        latency.delay_ms + 2
    );
    let (modes, ratios) = modes;
    for mode in modes {
        let _ = writeln!(
            out,
            "| Dashboard, `query_mode = \"{}\"` (median of {} rounds) | {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms | | `cargo xtask bench modes` |",
            mode.mode,
            ratios.len(),
            mode.rps,
            mode.p50_ms,
            mode.p99_ms
        );
    }
    let _ = writeln!(
        out,
        "| Pipelined / pooled throughput, median of alternating rounds (each round: {}) | **{:.2}** | | `cargo xtask bench modes` |",
        listed(ratios),
        median(ratios)
    );
    for b in batch {
        let how = if b.chunk_size == 1 {
            "one statement per id (the seed's way)".to_owned()
        } else {
            format!("{} ids per statement (`= ANY($1)`)", b.chunk_size)
        };
        let _ = writeln!(
            out,
            "| Batch of 1000 ids, concurrency 20, {how} | {:.1} ms per batch (min {:.1}, max {:.1}) | | `cargo xtask bench batch` |",
            b.mean_ms, b.min_ms, b.max_ms
        );
    }
    let _ = writeln!(
        out,
        "| The seed's FastAPI + asyncpg + httpx service (`bench/seed-fastapi`, uvicorn, {} workers), same load | {:.0} req/s, p99 {:.1} ms, errors {:.2}% | | `cargo xtask bench peer` |",
        peer.workers,
        peer.seed_rps,
        peer.seed_p99_ms,
        peer.seed_errors * 100.0
    );
    let _ = writeln!(
        out,
        "| This service, same run | {:.0} req/s, p99 {:.1} ms: **{:.1}x** the seed's throughput | many times | `cargo xtask bench peer` |",
        peer.ours_rps,
        peer.ours_p99_ms,
        peer.ours_rps / peer.seed_rps.max(1e-9)
    );
    if let Some(rss) = ceiling.peak_rss_mib {
        let _ = writeln!(
            out,
            "| Peak RSS of the API during the {}-connection run | {rss:.1} MiB | | `cargo xtask bench db-ceiling` |",
            args.connections
        );
    }
    out
}

const README_BEGIN: &str =
    "<!-- performance:begin (written by cargo xtask bench report --update-readme) -->";
const README_END: &str = "<!-- performance:end -->";

fn update_readme(table: &str) -> Result<()> {
    let readme = std::fs::read_to_string("README.md").context("cannot read README.md")?;
    let (Some(begin), Some(end)) = (readme.find(README_BEGIN), readme.find(README_END)) else {
        bail!("README.md has no {README_BEGIN} ... {README_END} markers");
    };
    let updated = format!(
        "{}{README_BEGIN}\n{table}{}",
        &readme[..begin],
        &readme[end..]
    );
    std::fs::write("README.md", updated).context("cannot write README.md")
}
