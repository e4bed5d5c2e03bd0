//! `cargo xtask bench <what>`: benchmarks that are about wall-clock behaviour rather than CPU cost
//! (the CPU-cost benchmarks are criterion benches, `cargo bench -p <crate>`).
//!
//! `fanout` is the seed article's section 九 on the real clock: ten mock database queries of
//! 100 ms each, run one after another, with `futures::future::join_all`, and in a task group,
//! printing the same four lines as the seed (serial, join, task group, speed-up). It shows that
//! a task group costs nothing measurable next to `join_all` for I/O-bound fan-out while adding
//! its guarantees.

use std::convert::Infallible;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use clap::{Args, Subcommand};
use taskgroup::TaskGroup;

/// Arguments of `cargo xtask bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

/// The benchmarks `cargo xtask bench` can run.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The seed's section 九: mock queries run serially, with join_all, and in a task group.
    Fanout(FanoutArgs),
    /// pgbench running the dashboard's three SELECTs, then the dashboard itself under the same
    /// load: how close the service gets to PostgreSQL's own ceiling.
    DbCeiling(crate::perf::PerfArgs),
    /// Dashboard latency at a low open-loop rate with a slow recommendation service: about the
    /// slowest source, not the sum.
    Latency(LatencyArgs),
    /// Dashboard throughput with the three reads pipelined on one connection vs on three.
    Modes(crate::perf::PerfArgs),
    /// Time per batch of ids, one statement per chunk vs one per id.
    Batch(BatchArgs),
    /// The seed's own FastAPI service (bench/seed-fastapi) and this one, under the same load.
    Peer(crate::perf::PerfArgs),
    /// The seed's own FastAPI service and this one asked for the same 200 dashboards (10 of them
    /// unknown users): every difference, field by field, with why it is meant (fails on one that
    /// is not).
    SeedDiff(crate::perf::PerfArgs),
    /// This service against a bare handler (`bench/baseline`) and pgbench's ceiling, under wrk
    /// (uniform and Zipf ids) and this project's generator: throughput and CPU per dashboard.
    Overhead(OverheadArgs),
    /// Dashboards/s with no authentication, HS256 and ES256 tokens, and a token minted per
    /// request, under the same load.
    Auth(crate::perf::PerfArgs),
    /// The scale-out topology: each hop's cost (prepared vs unnamed statements, PgBouncer,
    /// nginx in HTTP and HTTPS) and 1, 2, 3 instances behind nginx, with the CPU split by
    /// process group, under wrk, in alternating rounds.
    Scaleout(crate::scaleout::ScaleoutArgs),
    /// Every benchmark above, then the README's Performance table.
    Report(crate::perf::ReportArgs),
}

/// Arguments of `cargo xtask bench overhead`.
#[derive(Debug, Args)]
pub struct OverheadArgs {
    #[command(flatten)]
    perf: crate::perf::PerfArgs,
    /// Also count instructions per dashboard of each server under valgrind's callgrind.
    #[arg(long)]
    callgrind: bool,
}

/// Arguments of `cargo xtask bench latency`.
#[derive(Debug, Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    perf: crate::perf::PerfArgs,
    /// Latency the stand-in recommendation service adds, in milliseconds.
    #[arg(long, default_value_t = 50)]
    upstream_delay_ms: u64,
    /// Open-loop arrival rate, requests per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
}

/// Arguments of `cargo xtask bench batch`.
#[derive(Debug, Args)]
pub struct BatchArgs {
    #[command(flatten)]
    perf: crate::perf::PerfArgs,
    /// Ids per batch (at most the API's limit, 1000).
    #[arg(long, default_value_t = 1000)]
    ids: usize,
    /// Batches timed per configuration (after one warm-up batch).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
}

/// Arguments of `cargo xtask bench fanout`.
#[derive(Debug, Args)]
pub struct FanoutArgs {
    /// How many mock queries to run (1 to 100000).
    #[arg(long, default_value_t = 10)]
    queries: u32,
    /// How long each mock query takes, in milliseconds (1 to 60000).
    #[arg(long, default_value_t = 100)]
    query_ms: u64,
}

/// Runs the chosen benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Fanout(args) => fanout(args).await,
        BenchCommand::DbCeiling(args) => crate::perf::run_db_ceiling(args).await,
        BenchCommand::Latency(args) => {
            crate::perf::run_latency(args.perf, args.upstream_delay_ms, args.rate).await
        }
        BenchCommand::Modes(args) => crate::perf::run_modes(args).await,
        BenchCommand::Auth(args) => crate::perf::run_auth(args).await,
        BenchCommand::Batch(args) => crate::perf::run_batch(args.perf, args.ids, args.rounds).await,
        BenchCommand::Peer(args) => crate::perf::run_peer(args).await,
        BenchCommand::SeedDiff(args) => crate::seed_diff::run(args).await,
        BenchCommand::Overhead(args) => crate::overhead::run(args.perf, args.callgrind).await,
        BenchCommand::Scaleout(args) => crate::scaleout::run(args).await,
        BenchCommand::Report(args) => crate::perf::run_report(args).await,
    }
}

/// The seed's `mock_query`: waits like a database round trip, then answers `i * 2`.
async fn mock_query(i: u64, latency: Duration) -> u64 {
    tokio::time::sleep(latency).await;
    i * 2
}

/// Runs `work` under `bound`, timing it on the real clock.
async fn timed<T>(
    what: &str,
    bound: Duration,
    work: impl Future<Output = T>,
) -> anyhow::Result<(T, Duration)> {
    let start = Instant::now();
    let value = tokio::time::timeout(bound, work)
        .await
        .with_context(|| format!("{what} did not finish within {bound:?}"))?;
    Ok((value, start.elapsed()))
}

async fn fanout(args: FanoutArgs) -> anyhow::Result<()> {
    ensure!(
        (1..=100_000).contains(&args.queries),
        "--queries must be between 1 and 100000, not {}",
        args.queries
    );
    ensure!(
        (1..=60_000).contains(&args.query_ms),
        "--query-ms must be between 1 and 60000, not {}",
        args.query_ms
    );
    let n = u64::from(args.queries);
    let latency = Duration::from_millis(args.query_ms);
    let expected: Vec<u64> = (0..n).map(|i| i * 2).collect();
    // Generous bounds: the serial run takes n * latency, the concurrent ones about one latency.
    let serial_bound = latency * args.queries * 2 + Duration::from_secs(5);
    let concurrent_bound = latency * 2 + Duration::from_secs(5);

    let (serial, serial_time) = timed("the serial run", serial_bound, async {
        let mut results = Vec::with_capacity(expected.len());
        for i in 0..n {
            results.push(mock_query(i, latency).await);
        }
        results
    })
    .await?;
    ensure!(serial == expected, "the serial run returned wrong results");

    let (joined, join_time) = timed(
        "join_all",
        concurrent_bound,
        futures::future::join_all((0..n).map(|i| mock_query(i, latency))),
    )
    .await?;
    ensure!(joined == expected, "join_all returned wrong results");

    let (grouped, group_time) = timed("the task group", concurrent_bound, async {
        let group = TaskGroup::<Infallible>::builder()
            .name("fanout")
            .timeout(concurrent_bound)
            .build()?;
        let handles: Vec<_> = (0..n)
            .map(|i| {
                group.spawn(format!("query{i}"), async move {
                    Ok(mock_query(i, latency).await)
                })
            })
            .collect();
        group.join().await.context("the task group failed")?;
        handles
            .into_iter()
            .map(|handle| handle.output().context("a query produced no result"))
            .collect::<anyhow::Result<Vec<u64>>>()
    })
    .await?;
    ensure!(
        grouped? == expected,
        "the task group returned wrong results"
    );

    // The seed's four lines, with its own labels alongside.
    println!("serial (串行耗时): {:.3}s", serial_time.as_secs_f64());
    println!("join_all (gather耗时): {:.3}s", join_time.as_secs_f64());
    println!(
        "task group (TaskGroup耗时): {:.3}s",
        group_time.as_secs_f64()
    );
    println!(
        "speed-up (并发提升): {:.1}x",
        serial_time.as_secs_f64() / group_time.as_secs_f64()
    );
    Ok(())
}
