//! Schema migrations: the `.sql` files of a directory, applied in order with refinery.
//!
//! The files are read at run time, not embedded at compile time, so a newly added file is picked
//! up by the next run without rebuilding anything. Each migration runs in its own transaction
//! together with the row that records it (version, name, checksum) in `refinery_schema_history`.
//! An applied migration whose file was edited afterwards makes every later run refuse to go on,
//! and a session-level advisory lock keeps two runs from migrating the same database at once.

use std::path::{Path, PathBuf};

use refinery::error::Kind;
use refinery::{Migration, Runner};

use crate::{DbConfig, Error};

/// Arbitrary but fixed key of the advisory lock held while migrating ("migrate" in ASCII).
const LOCK_KEY: i64 = 0x006d_6967_7261_7465;

/// One migration as the database or the directory knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationInfo {
    /// The number in `V{version}__{name}.sql`.
    pub version: i32,
    /// The name in `V{version}__{name}.sql`.
    pub name: String,
    /// When it was applied (RFC 3339), for applied migrations.
    pub applied_on: Option<String>,
    /// refinery's checksum of version, name and SQL.
    pub checksum: u64,
}

impl From<&Migration> for MigrationInfo {
    fn from(migration: &Migration) -> Self {
        Self {
            version: migration.version(),
            name: migration.name().to_owned(),
            applied_on: migration.applied_on().map(ToString::to_string),
            checksum: migration.checksum(),
        }
    }
}

/// Applied and pending migrations of a database, compared with a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// Migrations recorded in the database, oldest first.
    pub applied: Vec<MigrationInfo>,
    /// Files not applied yet, in the order they will run.
    pub pending: Vec<MigrationInfo>,
    /// Applied migrations whose file now differs (edited after it was applied) or is gone.
    pub divergent: Vec<MigrationInfo>,
}

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    /// The directory or a file in it could not be read or has a bad name.
    #[error("cannot load migrations from {dir}: {message}")]
    Load {
        /// The migrations directory.
        dir: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// An applied migration's file was edited (or renamed) after it was applied.
    #[error(
        "migration V{version}__{name} was edited after it was applied (checksum differs); \
         add a new migration instead of changing an applied one"
    )]
    Divergent {
        /// Version of the applied migration.
        version: i32,
        /// Name of the applied migration.
        name: String,
    },
    /// An applied migration has no file any more, or a file older than the newest applied one
    /// was never applied.
    #[error(
        "migration V{version}__{name} is applied but missing from the directory, or out of order"
    )]
    Missing {
        /// Version of the migration.
        version: i32,
        /// Name of the migration.
        name: String,
    },
    /// A migration's SQL failed; its transaction was rolled back.
    #[error("migration failed: {0}")]
    Failed(String),
    /// The database could not be reached.
    #[error(transparent)]
    Database(#[from] Error),
}

fn load(dir: &Path) -> Result<Vec<Migration>, MigrationError> {
    refinery::load_sql_migrations(dir).map_err(|e| MigrationError::Load {
        dir: dir.to_owned(),
        message: e.to_string(),
    })
}

fn classify(error: refinery::Error, dir: &Path) -> MigrationError {
    match error.kind() {
        Kind::DivergentVersion(applied, _) => MigrationError::Divergent {
            version: applied.version(),
            name: applied.name().to_owned(),
        },
        Kind::MissingVersion(migration) => MigrationError::Missing {
            version: migration.version(),
            name: migration.name().to_owned(),
        },
        Kind::InvalidName | Kind::InvalidVersion | Kind::RepeatedVersion(_) => {
            MigrationError::Load {
                dir: dir.to_owned(),
                message: error.to_string(),
            }
        }
        _ => MigrationError::Failed(error.to_string().replace('\n', " ")),
    }
}

/// Applies every pending migration of `dir`, in version order, each in its own transaction.
/// Returns the migrations it applied (none when the database was up to date).
///
/// # Errors
///
/// [`MigrationError::Divergent`] when an applied file was edited, [`MigrationError::Failed`]
/// when a migration's SQL fails (earlier ones stay applied), and load or connection errors.
pub async fn apply(
    client: &mut tokio_postgres::Client,
    dir: &Path,
) -> Result<Vec<MigrationInfo>, MigrationError> {
    let migrations = load(dir)?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(Error::from)?;
    let result = Runner::new(&migrations).run_async(client).await;
    // Unlock even when migrating failed; if the connection is gone the lock went with it.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await;
    let report = result.map_err(|e| classify(e, dir))?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(MigrationInfo::from)
        .collect())
}

/// Compares the database's applied migrations with the files of `dir`, changing nothing.
///
/// # Errors
///
/// Load or connection errors.
pub async fn status(
    client: &mut tokio_postgres::Client,
    dir: &Path,
) -> Result<MigrationStatus, MigrationError> {
    let files = load(dir)?;
    let has_history = client
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL",
            &[],
        )
        .await
        .map_err(Error::from)?
        .get::<_, bool>(0);
    let applied = if has_history {
        Runner::new(&files)
            .get_applied_migrations_async(client)
            .await
            .map_err(|e| classify(e, dir))?
    } else {
        Vec::new()
    };
    let mut status = MigrationStatus {
        applied: applied.iter().map(MigrationInfo::from).collect(),
        pending: Vec::new(),
        divergent: Vec::new(),
    };
    for done in &applied {
        // refinery compares version, name and checksum; a missing or different file diverges.
        if !files.iter().any(|file| file == done) {
            status.divergent.push(MigrationInfo::from(done));
        }
    }
    for file in &files {
        if !applied.iter().any(|done| done.version() == file.version()) {
            status.pending.push(MigrationInfo::from(file));
        }
    }
    status.pending.sort_by_key(|m| m.version);
    Ok(status)
}

/// Connects to `config`'s database and applies the pending migrations of `dir` (see [`apply`]).
///
/// # Errors
///
/// As [`apply`], and [`MigrationError::Database`] when the database cannot be reached.
pub async fn apply_to(config: &DbConfig, dir: &Path) -> Result<Vec<MigrationInfo>, MigrationError> {
    let mut client = crate::connect(config).await?;
    apply(&mut client, dir).await
}

/// Connects to `config`'s database and compares it with `dir` (see [`status`]).
///
/// # Errors
///
/// As [`status`], and [`MigrationError::Database`] when the database cannot be reached.
pub async fn status_of(config: &DbConfig, dir: &Path) -> Result<MigrationStatus, MigrationError> {
    let mut client = crate::connect(config).await?;
    status(&mut client, dir).await
}
