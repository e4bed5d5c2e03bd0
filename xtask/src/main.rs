//! Developer commands for the dashboard workspace, reached as `cargo xtask <command>`.
//!
//! Thin glue: it runs a local PostgreSQL cluster, builds the service's binaries (`api`, the
//! stand-in `upstream`, the `loadtest` generator) and starts them; it links none of them, so its
//! own build takes seconds. `chaos` and `bench` run the `lab` binary (this package with the `lab`
//! feature), built in release because they measure or stress at full speed.

mod cluster;
mod db;
mod image;
mod schemathesis;
mod test;
mod up;

use std::os::unix::process::CommandExt as _;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

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
    /// Apply pending migrations from migrations/ (or list them with --status): `api migrate`.
    #[command(disable_help_flag = true)]
    Migrate(Forward),
    /// Fill the database with deterministic pseudo-random users, orders and reviews.
    Seed(db::SeedArgs),
    /// Run every test against a throwaway PostgreSQL cluster (the project's test command).
    Test(test::TestArgs),
    /// Serve the stand-in recommendation service (with optional latency and faults) until Ctrl-C:
    /// the `upstream` binary; `--help` lists its flags.
    #[command(disable_help_flag = true)]
    Upstream(Forward),
    /// Load the service (or the stand-in upstream) and report latency, throughput and errors:
    /// the `loadtest` binary; `--help` lists its flags.
    #[command(disable_help_flag = true)]
    Loadtest(Forward),
    /// Faults, overload and hostile clients against the real service, with a PASS/FAIL report;
    /// exits non-zero on any FAIL. `--help` lists the scenarios.
    #[command(disable_help_flag = true)]
    Chaos(Forward),
    /// Benchmarks (fan-out, database ceiling, latency, overhead, …); `--help` lists them.
    #[command(disable_help_flag = true)]
    Bench(Forward),
    /// Scale-out on a real topology: PostgreSQL primary + streaming replica, PgBouncer,
    /// N API instances behind nginx with TLS (`up`), and its fault runs (`chaos`).
    Cluster(cluster::ClusterArgs),
    /// Build the container image (FROM scratch, podman) and optionally run it against the
    /// local database.
    Image(image::ImageArgs),
    /// Mint a development token with the local HS256 secret: `--sub 42 [--scope users:batch]
    /// [--ttl 1h]` (`api token`; `--help` lists its flags).
    #[command(disable_help_flag = true)]
    Token(Forward),
}

/// The arguments of a command that another binary runs, passed on untouched (`--help` included).
#[derive(Debug, Args)]
struct Forward {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    xtask::exit_code(run(cli).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    xtask::enter_workspace()?;
    match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Db(args) => db::run(args).await,
        Command::Seed(args) => db::seed(&args),
        Command::Test(args) => test::run(args).await,
        Command::Migrate(f) => Err(cargo_run("api", Some("migrate"), &f)),
        Command::Upstream(f) => Err(cargo_run("upstream", None, &f)),
        Command::Loadtest(f) => Err(cargo_run("loadtest", None, &f)),
        Command::Chaos(f) => Err(cargo_run("lab", Some("chaos"), &f)),
        Command::Bench(f) => Err(cargo_run("lab", Some("bench"), &f)),
        Command::Cluster(args) => cluster::run(args).await,
        Command::Image(args) => image::run(args).await,
        Command::Token(f) => {
            let secret = xtask::stack::dev_secret()?;
            Err(cargo_run_with(
                "api",
                Some("token"),
                &f,
                &[("APP__AUTH__SECRET", &secret)],
            ))
        }
    }
}

/// Replaces this process with `cargo run --release` of `binary` (`lab`: this package's, with the
/// `lab` feature), its `subcommand` and the forwarded arguments; returns only if cargo cannot
/// start. cargo's progress shows while it builds.
fn cargo_run(binary: &str, subcommand: Option<&str>, forward: &Forward) -> anyhow::Error {
    cargo_run_with(binary, subcommand, forward, &[])
}

/// [`cargo_run`] with extra environment variables.
fn cargo_run_with(
    binary: &str,
    subcommand: Option<&str>,
    forward: &Forward,
    env: &[(&str, &str)],
) -> anyhow::Error {
    let mut command = std::process::Command::new(xtask::stack::cargo());
    command.envs(env.iter().copied());
    command.args(["run", "--release"]);
    if binary == "lab" {
        command.args(["--package", "xtask", "--features", "lab", "--bin", "lab"]);
    } else {
        command.args(["--package", binary, "--bin", binary]);
    }
    let error = command
        .arg("--")
        .args(subcommand)
        .args(&forward.args)
        .exec();
    anyhow::anyhow!("cannot run cargo: {error}")
}
