//! The dashboard API server: settings, telemetry, build, serve until SIGTERM or SIGINT; or, as
//! `api migrate`, apply the schema migrations once and exit (what a deploy runs before the new
//! version serves).

mod migrate;
mod token;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mimalloc::MiMalloc;

/// mimalloc instead of glibc's malloc: a request allocates and frees many small buffers across
/// threads, which mimalloc serves with less work (measured with `cargo xtask bench db-ceiling`).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;
use api::Application;
use api::settings::Settings;

/// The dashboard API. Settings come from config/ and APP__SECTION__KEY environment variables.
#[derive(Debug, Parser)]
#[command(name = "api", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API until SIGTERM or SIGINT (what `api` alone does).
    Serve,
    /// Apply the pending migrations of a directory to `database.url`, then exit.
    Migrate(migrate::MigrateArgs),
    /// Print an HS256 token signed with `auth.secret` (APP__AUTH__SECRET), for development.
    Token(token::TokenArgs),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load().context("cannot load the settings")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let app_env = std::env::var("APP_ENV").ok();
            settings
                .check_production(app_env.as_deref())
                .map_err(anyhow::Error::msg)?;
            api::telemetry::init(&settings.telemetry).context("cannot set up logging")?;
            // Start-up may wait for the database (startup.db_wait); a SIGTERM meanwhile stops it.
            // One signal listener from here on, so none arriving in between is lost.
            let mut stop = Box::pin(api::shutdown_signal());
            let application = tokio::select! {
                built = Application::build(settings) => {
                    built.context("cannot start the dashboard API")?
                }
                signal = &mut stop => {
                    tracing::info!(signal, "stopped while starting");
                    return Ok(());
                }
            };
            application
                .run_until(stop)
                .await
                .context("the server failed")?;
        }
        Command::Migrate(args) => migrate::run(&settings, &args).await?,
        Command::Token(args) => println!("{}", token::mint(&settings.auth, &args)?),
    }
    Ok(())
}
