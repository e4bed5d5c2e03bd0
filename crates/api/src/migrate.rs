//! `api migrate [--status] [--dir migrations]`: applies the pending `.sql` files of a directory to
//! the configured database, or lists applied and pending ones. A deploy runs it once (a Job or an
//! init container) before the new version serves; `cargo xtask up` and the tests run it too.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use api::settings::Settings;
use service::migrations;

/// Arguments of `api migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// List applied and pending migrations instead of applying anything.
    #[arg(long)]
    status: bool,
    /// The directory of `V{n}__{name}.sql` files.
    #[arg(long, default_value = "migrations")]
    dir: PathBuf,
}

/// Runs `api migrate`.
pub async fn run(settings: &Settings, args: &MigrateArgs) -> Result<()> {
    let database = &settings.database;
    let target = database.masked_url();
    let dir = args.dir.as_path();
    if args.status {
        let status = migrations::status_of(database, dir)
            .await
            .with_context(|| format!("cannot read the migrations of {target}"))?;
        println!("database: {target}");
        for m in &status.applied {
            let mark = if status.divergent.contains(m) {
                "EDITED "
            } else {
                "applied"
            };
            let applied_on = m.applied_on.as_deref().unwrap_or("");
            println!("  {mark}  V{}__{}  {applied_on}", m.version, m.name);
        }
        for m in &status.pending {
            println!("  pending  V{}__{}", m.version, m.name);
        }
        if status.applied.is_empty() && status.pending.is_empty() {
            println!("  no migrations in {}", dir.display());
        }
        if !status.divergent.is_empty() {
            bail!(
                "{} applied migration(s) were edited or removed after being applied",
                status.divergent.len()
            );
        }
        return Ok(());
    }
    let applied = migrations::apply_to(database, dir)
        .await
        .with_context(|| format!("cannot migrate {target} from {}", dir.display()))?;
    if applied.is_empty() {
        println!("{target}: up to date, nothing to apply");
    } else {
        for m in &applied {
            println!("applied V{}__{}", m.version, m.name);
        }
        println!("{target}: {} migration(s) applied", applied.len());
    }
    Ok(())
}
