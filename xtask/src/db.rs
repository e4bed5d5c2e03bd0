//! `cargo xtask db start|stop|status|url`: the development cluster described by the settings.
//!
//! Its port, superuser and database name come from `database.url`; where it lives and its server
//! settings from `[local_cluster]`.

use std::str::FromStr;

use anyhow::{Context, Result, bail};
use api::settings::Settings;
use clap::{Args, Subcommand};

use crate::pg::{Cluster, State};

/// Arguments of `cargo xtask db`.
#[derive(Debug, Args)]
pub struct DbArgs {
    #[command(subcommand)]
    action: DbAction,
}

#[derive(Debug, Subcommand)]
enum DbAction {
    /// Create the local cluster if needed, start it, and create the database; returns once it
    /// accepts connections. Does nothing when it already runs.
    Start,
    /// Stop the local cluster (running statements are cancelled).
    Stop,
    /// Say whether the local cluster exists and runs, and where.
    Status,
    /// Print the database URL, password included, for psql and other tools.
    Url,
}

/// Runs `cargo xtask db`.
pub async fn run(args: DbArgs) -> Result<()> {
    let settings = Settings::load().context("cannot load the settings")?;
    let (cluster, database) = dev_cluster(&settings)?;
    match args.action {
        DbAction::Start => {
            let was = cluster.state()?;
            start(&cluster, &database).await?;
            let verb = if was == State::Running {
                "already running"
            } else {
                "started"
            };
            println!(
                "PostgreSQL {verb} on 127.0.0.1:{} (database {database}, data {}, log {})",
                cluster.port,
                cluster.data_dir().display(),
                cluster.log_file().display()
            );
        }
        DbAction::Stop => {
            if cluster.stop()? {
                println!("PostgreSQL stopped");
            } else {
                println!("PostgreSQL was not running");
            }
        }
        DbAction::Status => {
            let state = cluster.state()?;
            let text = match state {
                State::Uninitialized => "not created (run `cargo xtask db start`)",
                State::Stopped => "stopped",
                State::Running => "running",
            };
            println!("cluster:  {text}");
            println!("url:      {}", settings.database.masked_url());
            println!("data:     {}", cluster.data_dir().display());
            println!("log:      {}", cluster.log_file().display());
        }
        DbAction::Url => {
            println!("{}", cluster.db_config(&database)?.url);
        }
    }
    Ok(())
}

/// The development cluster and database name the settings point at.
///
/// # Errors
///
/// When `database.url` does not point at a cluster on this machine.
pub fn dev_cluster(settings: &Settings) -> Result<(Cluster, String)> {
    let pg = tokio_postgres::Config::from_str(&settings.database.url)
        .context("database.url is not a valid PostgreSQL URL")?;
    let local = pg.get_hosts().iter().all(|host| match host {
        tokio_postgres::config::Host::Tcp(name) => name == "127.0.0.1" || name == "localhost",
        tokio_postgres::config::Host::Unix(_) => false,
    });
    if !local {
        bail!(
            "database.url ({}) does not point at 127.0.0.1, so it is not the local cluster that \
             `cargo xtask db` manages",
            settings.database.masked_url()
        );
    }
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let user = pg.get_user().unwrap_or("postgres").to_owned();
    let database = pg.get_dbname().unwrap_or(&user).to_owned();
    let cluster = Cluster::new(
        &settings.local_cluster.dir,
        port,
        &user,
        settings.local_cluster.server_settings.clone(),
    )?;
    Ok((cluster, database))
}

/// Starts `cluster` and creates `database` on it when missing.
///
/// # Errors
///
/// When the server does not come up or the database cannot be created.
pub async fn start(cluster: &Cluster, database: &str) -> Result<()> {
    cluster.start().await?;
    create_database(cluster, database, None).await
}

/// Creates `database` (optionally as a copy of `template`) unless it exists.
///
/// # Errors
///
/// When the name is not a plain identifier or the server refuses.
pub async fn create_database(
    cluster: &Cluster,
    database: &str,
    template: Option<&str>,
) -> Result<()> {
    for name in std::iter::once(database).chain(template) {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("database name {name:?} must be letters, digits and underscores");
        }
    }
    let client = repository::connect(&cluster.db_config("postgres")?)
        .await
        .context("cannot connect to the local cluster")?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&database])
        .await
        .context("cannot list databases")?
        .is_some();
    if !exists {
        let template = template
            .map(|t| format!(" TEMPLATE \"{t}\""))
            .unwrap_or_default();
        client
            .batch_execute(&format!("CREATE DATABASE \"{database}\"{template}"))
            .await
            .with_context(|| format!("cannot create database {database}"))?;
    }
    Ok(())
}
