//! Developer commands for the dashboard workspace, reached as `cargo xtask <command>`.
//!
//! Everything a developer or CI does by hand lives here, in Rust, so it behaves the same on every
//! machine: running a local PostgreSQL cluster, migrating and seeding it, running the tests against a
//! throwaway cluster, serving the stand-in recommendation service, load tests and benchmarks.

mod bench;
mod chaos;
mod db;
mod loadtest;
mod migrate;
mod overhead;
mod perf;
mod pg;
mod schemathesis;
mod seed;
mod seed_diff;
mod stack;
mod test;
mod up;
mod upstream;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// Developer commands for the dashboard workspace.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start everything (PostgreSQL, migrations, seed data, the stand-in recommendation service)
    /// and serve the API in the foreground; Ctrl-C stops it all.
    Up(up::UpArgs),
    /// Run the project-local PostgreSQL cluster: start, stop, status, url.
    Db(db::DbArgs),
    /// Apply pending migrations from migrations/ (or list them with --status).
    Migrate(migrate::MigrateArgs),
    /// Fill the database with deterministic pseudo-random users, orders and reviews.
    Seed(seed::SeedArgs),
    /// Run every test against a throwaway PostgreSQL cluster (the project's test command).
    Test(test::TestArgs),
    /// Serve the stand-in recommendation service (with optional latency and faults) until Ctrl-C.
    Upstream(upstream::UpstreamArgs),
    /// Load the service (or the stand-in upstream) and report latency, throughput and errors.
    Loadtest(loadtest::Args),
    /// Faults, overload and hostile clients against the real service (database restart, pool
    /// exhaustion, upstream faults, abandoned requests, shutdown under load, slow clients), with a
    /// PASS/FAIL report; exits non-zero on any FAIL.
    Chaos(chaos::ChaosArgs),
    /// Wall-clock benchmarks, such as the seed's fan-out comparison (`bench fanout`).
    Bench(bench::BenchArgs),
}

impl Command {
    /// Commands whose speed is what they serve or measure: a debug build would misreport it.
    fn wants_release_build(&self) -> bool {
        matches!(
            self,
            Command::Up(_)
                | Command::Upstream(_)
                | Command::Loadtest(_)
                | Command::Bench(_)
                | Command::Chaos(_)
        )
    }
}

/// Replaces this debug-built process with the same command from a release build.
fn exec_release() -> std::io::Error {
    use std::os::unix::process::CommandExt as _;
    eprintln!("(building xtask in release mode: this command measures or serves at full speed)");
    std::process::Command::new(up::cargo())
        .args(["run", "--quiet", "--release", "--package", "xtask", "--"])
        .args(std::env::args_os().skip(1))
        .exec()
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if cfg!(debug_assertions) && cli.command.wants_release_build() {
        let error = exec_release();
        eprintln!("error: cannot run the release build of xtask: {error}");
        return ExitCode::FAILURE;
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One readable line per cause; a backtrace helps nobody running a developer command.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Paths in the settings (config/, migrations/, target/) are relative to the workspace root,
    // wherever `cargo xtask` was typed.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask is not inside the workspace")?;
    std::env::set_current_dir(root).context("cannot enter the workspace root")?;
    match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Db(args) => db::run(args).await,
        Command::Migrate(args) => migrate::run(args).await,
        Command::Seed(args) => seed::run(args).await,
        Command::Test(args) => test::run(args).await,
        Command::Upstream(args) => upstream::run(args).await,
        Command::Loadtest(args) => loadtest::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Chaos(args) => chaos::run(args).await,
    }
}
