//! Layered settings: `config/default.toml`, then `config/{APP_ENV}.toml`, then the environment
//! (the `layered` crate, which `cargo xtask` reads them with too).
//!
//! Every setting has its default, with a comment, in `config/default.toml`. An environment file
//! (`APP_ENV=production` reads `config/production.toml`) overrides some of them, and environment
//! variables override both: `APP__DATABASE__MAX_SIZE=50` sets `database.max_size`. `DATABASE_URL`
//! is honoured too, below `APP__DATABASE__URL`. Unknown keys and bad values stop start-up with an
//! error naming the key.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use service::ServiceConfig;
use service::settings::{ClientConfig, DbConfig};

/// Every setting of the service and its tools.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// The HTTP server (`[server]`).
    pub server: ServerSettings,
    /// Start-up behaviour (`[startup]`).
    pub startup: StartupSettings,
    /// Logs (`[telemetry]`).
    pub telemetry: TelemetrySettings,
    /// The PostgreSQL pool (`[database]`).
    pub database: DbConfig,
    /// The recommendation-service client (`[recommendations]`).
    pub recommendations: ClientConfig,
    /// The orchestration layer: database gate, dashboard limits, batch limits (`[service]`).
    pub service: ServiceConfig,
}

/// The HTTP server's address, workers and connection limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address to listen on.
    pub host: IpAddr,
    /// Port to listen on; 0 picks a free one.
    pub port: u16,
    /// Worker threads; 0 means one per CPU core.
    pub workers: usize,
    /// On SIGTERM or SIGINT, how long in-flight requests may take to finish before the server
    /// closes their connections.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long an idle keep-alive connection stays open.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// How long a client may take to send a request's headers, and then again its body (cuts
    /// off clients that dribble either).
    #[serde(with = "humantime_serde")]
    pub client_request_timeout: Duration,
    /// How long a client may take to close its side after the response.
    #[serde(with = "humantime_serde")]
    pub client_disconnect_timeout: Duration,
    /// Most concurrent connections per worker; more wait in the listen backlog.
    pub max_connections_per_worker: usize,
    /// Most pending connections in the listen backlog.
    pub backlog: u32,
    /// Largest accepted JSON body, in bytes.
    pub json_limit: usize,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 8000,
            workers: 0,
            shutdown_grace: Duration::from_secs(10),
            keep_alive: Duration::from_secs(5),
            client_request_timeout: Duration::from_secs(5),
            client_disconnect_timeout: Duration::from_secs(1),
            max_connections_per_worker: 4096,
            backlog: 2048,
            json_limit: 64 * 1024,
        }
    }
}

/// What the server does before it accepts requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StartupSettings {
    /// How long to keep retrying (with backoff) until the database answers, before giving up.
    #[serde(with = "humantime_serde")]
    pub db_wait: Duration,
}

impl Default for StartupSettings {
    fn default() -> Self {
        Self {
            db_wait: Duration::from_secs(30),
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// Filter in `tracing` syntax: `info`, `debug`, `api=debug,info`. `RUST_LOG` overrides it.
    pub level: String,
    /// `text` for people, `json` for log collectors.
    pub format: LogFormat,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// The shape of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Why the settings could not be loaded.
pub use layered::Error as SettingsError;

impl Settings {
    /// Loads the settings from `APP_CONFIG_DIR` (default `config`) and the process environment.
    ///
    /// # Errors
    ///
    /// [`SettingsError`] naming the file or key that is wrong.
    pub fn load() -> Result<Self, SettingsError> {
        layered::load()
    }

    /// Loads the settings from `dir` with `env` standing in for the process environment.
    ///
    /// # Errors
    ///
    /// [`SettingsError`] naming the file or key that is wrong.
    pub fn load_from(dir: &Path, env: &HashMap<String, String>) -> Result<Self, SettingsError> {
        layered::load_from(dir, env)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use std::path::PathBuf;

    use super::*;

    fn config_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config")
    }

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn default_toml_matches_the_built_in_defaults() {
        let mut loaded = Settings::load_from(&config_dir(), &env(&[])).unwrap();
        let built_in = Settings::default();
        for (section, loaded, built_in) in [
            (
                "server",
                format!("{:?}", loaded.server),
                format!("{:?}", built_in.server),
            ),
            (
                "startup",
                format!("{:?}", loaded.startup),
                format!("{:?}", built_in.startup),
            ),
            (
                "telemetry",
                format!("{:?}", loaded.telemetry),
                format!("{:?}", built_in.telemetry),
            ),
            (
                "recommendations",
                format!("{:?}", loaded.recommendations),
                format!("{:?}", built_in.recommendations),
            ),
            (
                "service",
                format!("{:?}", loaded.service),
                format!("{:?}", built_in.service),
            ),
        ] {
            assert_eq!(
                loaded, built_in,
                "[{section}] in default.toml differs from the code"
            );
        }
        // The library default has no password file; the project's config points at the local
        // cluster's.
        assert_eq!(
            loaded.database.password_file.take(),
            Some(PathBuf::from("target/pg/dev/password"))
        );
        assert_eq!(
            format!("{:?}", loaded.database),
            format!("{:?}", built_in.database)
        );
    }

    #[test]
    fn environment_overrides_files_and_database_url_is_honoured() {
        let settings = Settings::load_from(
            &config_dir(),
            &env(&[
                ("APP__DATABASE__MAX_SIZE", "7"),
                ("APP__DATABASE__WAIT_TIMEOUT", "250ms"),
                ("DATABASE_URL", "postgres://a@b/c"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.database.max_size, 7);
        assert_eq!(settings.database.wait_timeout, Duration::from_millis(250));
        assert_eq!(settings.database.url, "postgres://a@b/c");

        let settings = Settings::load_from(
            &config_dir(),
            &env(&[
                ("APP__DATABASE__URL", "postgres://x@y/z"),
                ("DATABASE_URL", "postgres://a@b/c"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.database.url, "postgres://x@y/z");
    }

    #[test]
    fn environment_strings_are_not_reinterpreted() {
        // A password that looks like a number, a boolean or a float stays exactly as typed.
        for password in ["0123", "1e3", "TRUE", "nan", "007"] {
            let settings = Settings::load_from(
                &config_dir(),
                &env(&[("APP__DATABASE__PASSWORD", password)]),
            )
            .unwrap();
            assert_eq!(
                settings.database.password.unwrap().expose(),
                password,
                "{password}"
            );
        }
        let settings = Settings::load_from(
            &config_dir(),
            &env(&[("APP__RECOMMENDATIONS__HEDGE__ENABLED", "true")]),
        )
        .unwrap();
        assert!(settings.recommendations.hedge.enabled);
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let err = Settings::load_from(&config_dir(), &env(&[("APP__DATABASE__MAX_SIZE", "lots")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_size"), "{err}");

        let err = Settings::load_from(
            &config_dir(),
            &env(&[("APP__DATABASE__WAIT_TIMEOUT", "soon")]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("wait_timeout"), "{err}");

        let err = Settings::load_from(&config_dir(), &env(&[("APP__DATABASE__COLOUR", "blue")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn an_environment_file_overrides_the_defaults() {
        let dir = std::env::temp_dir().join(format!("settings-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(config_dir().join("default.toml"), dir.join("default.toml")).unwrap();
        std::fs::write(dir.join("staging.toml"), "[database]\nmax_size = 3\n").unwrap();
        let settings = Settings::load_from(&dir, &env(&[("APP_ENV", "staging")])).unwrap();
        assert_eq!(settings.database.max_size, 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_config_dir_says_where_it_looked() {
        let err = Settings::load_from(Path::new("/nonexistent"), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/default.toml"), "{err}");
    }
}
