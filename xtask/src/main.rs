//! Developer commands for the dashboard workspace, reached as `cargo xtask <command>`.
//!
//! Everything a developer or CI does by hand lives here, in Rust, so it behaves the same on every
//! machine: running a local PostgreSQL cluster, migrating and seeding it, running the tests against a
//! throwaway cluster, serving the stand-in recommendation service, load tests and benchmarks.

use clap::{Parser, Subcommand};

/// Developer commands for the dashboard workspace.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}
