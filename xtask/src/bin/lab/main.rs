//! The lab: the chaos runs and the benchmarks, which drive the stand-in recommendation service
//! and the load generator in-process against the real API. Built in release with the `lab`
//! feature and run by `cargo xtask chaos …`, `cargo xtask cluster chaos …` and
//! `cargo xtask bench …`.

mod bench;
mod chaos;
mod cluster_chaos;
mod overhead;
mod perf;
mod scaleout;
mod seed_diff;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Chaos runs and benchmarks against the real service.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Faults, overload and hostile clients against the real service (database restart, pool
    /// exhaustion, upstream faults, abandoned requests, shutdown under load, slow clients), with a
    /// PASS/FAIL report; exits non-zero on any FAIL.
    Chaos(chaos::ChaosArgs),
    /// Faults against the scale-out topology (instances behind nginx, PgBouncer, a replica)
    /// under load, with a PASS/FAIL report; run by `cargo xtask cluster chaos`.
    ClusterChaos(cluster_chaos::ClusterChaosArgs),
    /// Wall-clock benchmarks, such as the seed's fan-out comparison (`bench fanout`).
    Bench(bench::BenchArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    xtask::exit_code(run(cli).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    xtask::enter_workspace()?;
    match cli.command {
        Command::Chaos(args) => chaos::run(args).await,
        Command::ClusterChaos(args) => cluster_chaos::run(args).await,
        Command::Bench(args) => bench::run(args).await,
    }
}
