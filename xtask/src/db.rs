//! `cargo xtask db start|stop|status|url`: the development cluster described by the settings.
//!
//! Its port, superuser and database name come from `database.url`; where it lives and its server
//! settings are below (they are the developer's, not the service's). Also `cargo xtask seed`.

use anyhow::Result;
use clap::{Args, Subcommand};
use xtask::pg::{State, dev_cluster, start};
use xtask::settings::Settings;

/// Arguments of `cargo xtask seed`.
#[derive(Debug, Args)]
pub struct SeedArgs {
    /// How many users to create (ids 1 to N); each gets about 10 orders and 3 reviews.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..=50_000_000))]
    users: u32,
    /// Delete every user, order and review first (the database must otherwise be empty).
    #[arg(long)]
    reset: bool,
}

/// Runs `cargo xtask seed` against the configured database.
pub fn seed(args: &SeedArgs) -> Result<()> {
    let settings = Settings::load()?;
    let url = settings.database.url_with_password()?;
    println!(
        "seeding {} users into {}",
        args.users,
        settings.database.masked_url()
    );
    let report = xtask::seed::seed(&url, args.users, args.reset)?;
    let seconds = report.load_time.as_secs_f64();
    println!(
        "seeded {} users, {} orders, {} reviews: {} rows in {seconds:.2} s ({:.0} rows/s)",
        report.users,
        report.orders,
        report.reviews,
        report.rows(),
        report.rows() as f64 / seconds.max(1e-9)
    );
    Ok(())
}

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
    let settings = Settings::load()?;
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
            println!("{}", cluster.url(&database)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use xtask::pg::DEV_CLUSTER_DIR;

    use super::*;

    #[test]
    fn the_configured_password_file_is_the_dev_clusters() {
        let settings = Settings::load_from(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../config"),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            settings.database.password_file.as_deref(),
            Some(Path::new(DEV_CLUSTER_DIR).join("password").as_path())
        );
    }
}
