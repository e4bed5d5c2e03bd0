//! `cargo xtask migrate [--status]`: applies the pending files of `migrations/`, or lists them.

use std::path::Path;

use anyhow::{Context, Result, bail};
use api::settings::Settings;
use clap::Args;
use repository::migrations::{self, MigrationInfo};

/// Arguments of `cargo xtask migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// List applied and pending migrations instead of applying anything.
    #[arg(long)]
    status: bool,
}

/// The directory of migration files, relative to the workspace root.
pub const MIGRATIONS_DIR: &str = "migrations";

/// Runs `cargo xtask migrate`.
pub async fn run(args: MigrateArgs) -> Result<()> {
    let settings = Settings::load().context("cannot load the settings")?;
    let database = &settings.database;
    let mut client = repository::connect(database).await.with_context(|| {
        format!(
            "cannot connect to {} (for the local cluster, run `cargo xtask db start` first)",
            database.masked_url()
        )
    })?;
    let dir = Path::new(MIGRATIONS_DIR);
    if args.status {
        let status = migrations::status(&mut client, dir).await?;
        println!("database: {}", database.masked_url());
        for m in &status.applied {
            let mark = if status.divergent.contains(m) {
                "EDITED "
            } else {
                "applied"
            };
            println!(
                "  {mark}  V{}__{}  {}",
                m.version,
                m.name,
                m.applied_on.as_deref().unwrap_or("")
            );
        }
        for m in &status.pending {
            println!("  pending  V{}__{}", m.version, m.name);
        }
        if status.applied.is_empty() && status.pending.is_empty() {
            println!("  no migrations in {MIGRATIONS_DIR}/");
        }
        if !status.divergent.is_empty() {
            bail!(
                "{} applied migration(s) were edited or removed after being applied",
                status.divergent.len()
            );
        }
        return Ok(());
    }
    let applied = apply(&mut client, dir).await?;
    if applied.is_empty() {
        println!("{}: up to date, nothing to apply", database.masked_url());
    } else {
        for m in &applied {
            println!("applied V{}__{}", m.version, m.name);
        }
        println!(
            "{}: {} migration(s) applied",
            database.masked_url(),
            applied.len()
        );
    }
    Ok(())
}

/// Applies the pending migrations of `dir` over `client`.
///
/// # Errors
///
/// When a migration fails or an applied one was edited.
pub async fn apply(client: &mut tokio_postgres::Client, dir: &Path) -> Result<Vec<MigrationInfo>> {
    migrations::apply(client, dir)
        .await
        .with_context(|| format!("cannot migrate from {}", dir.display()))
}
