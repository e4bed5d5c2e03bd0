//! `cargo xtask image`: the container image (work in progress).

use anyhow::Result;
use clap::Args;

/// Arguments of `cargo xtask image`.
#[derive(Debug, Args)]
pub struct ImageArgs {}

/// Runs `cargo xtask image`.
pub async fn run(_args: ImageArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
