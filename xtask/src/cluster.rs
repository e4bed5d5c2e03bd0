//! `cargo xtask cluster`: the scale-out topology on this machine (work in progress).

use anyhow::Result;
use clap::Args;

/// Arguments of `cargo xtask cluster`.
#[derive(Debug, Args)]
pub struct ClusterArgs {}

/// Runs `cargo xtask cluster`.
pub async fn run(_args: ClusterArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
