//! Logs: `tracing` with a filter from the settings (or `RUST_LOG`), as text or JSON lines.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::settings::{LogFormat, TelemetrySettings};

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `telemetry.level` (or `RUST_LOG`) is not a valid filter.
    #[error("telemetry.level {level:?} is not a valid log filter: {message}")]
    BadFilter {
        /// The filter given.
        level: String,
        /// What the parser said.
        message: String,
    },
}

/// Installs the global subscriber. A second call (tests building several applications) keeps the
/// first subscriber.
///
/// # Errors
///
/// [`TelemetryError::BadFilter`] when the filter does not parse.
pub fn init(settings: &TelemetrySettings) -> Result<(), TelemetryError> {
    let level = std::env::var("RUST_LOG").unwrap_or_else(|_| settings.level.clone());
    let filter = EnvFilter::try_new(&level).map_err(|e| TelemetryError::BadFilter {
        level: level.clone(),
        message: e.to_string(),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::NONE)
        .with_target(true)
        // Colour only for a person at a terminal (and not with NO_COLOR set): a log collector
        // reading a pipe would store the escape codes.
        .with_ansi(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    let _ = match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}
