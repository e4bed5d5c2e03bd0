//! The dashboard API server: settings, telemetry, build, serve until SIGTERM or SIGINT.

use anyhow::Context as _;
use mimalloc::MiMalloc;

/// mimalloc instead of glibc's malloc: a request allocates and frees many small buffers across
/// threads, which mimalloc serves with less work (measured with `cargo xtask bench db-ceiling`).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;
use api::Application;
use api::settings::Settings;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load().context("cannot load the settings")?;
    api::telemetry::init(&settings.telemetry).context("cannot set up logging")?;
    let application = Application::build(settings)
        .await
        .context("cannot start the dashboard API")?;
    application.run().await.context("the server failed")?;
    Ok(())
}
