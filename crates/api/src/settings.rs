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
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
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
    /// Who may read what: bearer tokens (`[auth]`).
    pub auth: AuthSettings,
    /// Requests per client (`[rate_limit]`).
    pub rate_limit: RateLimitSettings,
    /// Browser front ends on other origins (`[cors]`).
    pub cors: CorsSettings,
}

/// Whether requests must carry a bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// No authentication: anyone who reaches the service reads any dashboard. The local default;
    /// refused with `APP_ENV=production` unless `allow_none_in_production` says so.
    #[default]
    None,
    /// A JWT bearer token on every dashboard and batch request.
    Jwt,
}

/// Bearer-token authentication and the scopes it checks.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// `none` or `jwt`.
    pub mode: AuthMode,
    /// HS256 shared secret (development; `APP__AUTH__SECRET`). Never put it in a file.
    pub secret: Option<String>,
    /// A JWKS file of public keys (RS256, ES256), chosen by the token's `kid`.
    pub jwks_path: Option<PathBuf>,
    /// When set, a token's `iss` must equal it.
    pub issuer: Option<String>,
    /// When set, a token's `aud` must contain it.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// The scope that reads any user's dashboard (a token whose `sub` is the user needs none).
    pub read_scope: String,
    /// The scope the batch endpoint needs.
    pub batch_scope: String,
    /// The scope `/metrics` and `/openapi.json` need when they are protected.
    pub ops_scope: String,
    /// Whether `/metrics` needs a token with `ops_scope` (in `jwt` mode).
    pub protect_metrics: bool,
    /// Whether `/openapi.json` needs a token with `ops_scope` (in `jwt` mode).
    pub protect_openapi: bool,
    /// Lets `APP_ENV=production` start in `none` mode.
    pub allow_none_in_production: bool,
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("mode", &self.mode)
            .field("secret", &self.secret.as_ref().map(|_| "***"))
            .field("jwks_path", &self.jwks_path)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .field("read_scope", &self.read_scope)
            .field("batch_scope", &self.batch_scope)
            .field("ops_scope", &self.ops_scope)
            .field("protect_metrics", &self.protect_metrics)
            .field("protect_openapi", &self.protect_openapi)
            .field("allow_none_in_production", &self.allow_none_in_production)
            .finish()
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            mode: AuthMode::None,
            secret: None,
            jwks_path: None,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
            read_scope: "dashboards:read".to_owned(),
            batch_scope: "users:batch".to_owned(),
            ops_scope: "ops:read".to_owned(),
            protect_metrics: false,
            protect_openapi: false,
            allow_none_in_production: false,
        }
    }
}

/// A token bucket per client: the token's subject, or the client's address without one.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Sustained requests per second per client; 0 turns the limit off.
    pub per_second: u32,
    /// Requests a client may send at once above the sustained rate.
    pub burst: u32,
    /// Proxies (load balancers) whose `X-Forwarded-For` is believed; from anyone else it is
    /// ignored and the peer address is the client. Addresses or ranges (`10.0.0.0/8`, for the
    /// pods of an ingress controller); in a file a list, in the environment one string of them
    /// separated by spaces.
    #[serde(deserialize_with = "networks")]
    pub trusted_proxies: Vec<IpNet>,
}

/// Reads a list of addresses or ranges: a list, or one string of them separated by whitespace
/// (an environment variable cannot hold a list). An address alone is a range of one.
fn networks<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let texts = match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(text) => text.split_whitespace().map(str::to_owned).collect(),
        OneOrMany::Many(list) => list,
    };
    texts
        .iter()
        .map(|text| {
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "rate_limit.trusted_proxies: {text:?} is not an address or a range"
                    ))
                })
        })
        .collect()
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            per_second: 0,
            burst: 20,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Cross-origin requests from browser front ends.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorsSettings {
    /// Origins allowed to call the API from a browser (`https://app.example.com`); none by default.
    pub allowed_origins: Vec<String>,
}

impl Settings {
    /// Refuses to run without authentication in production: `APP_ENV=production` with
    /// `auth.mode = "none"` needs `auth.allow_none_in_production = true`.
    ///
    /// # Errors
    ///
    /// One line saying what to set.
    pub fn check_production(&self, app_env: Option<&str>) -> Result<(), String> {
        if app_env == Some("production")
            && self.auth.mode == AuthMode::None
            && !self.auth.allow_none_in_production
        {
            return Err(
                "refusing to start: APP_ENV=production with auth.mode = \"none\" would serve \
                        every user's orders to anyone; set APP__AUTH__MODE=jwt (or \
                        APP__AUTH__ALLOW_NONE_IN_PRODUCTION=true to serve without authentication)"
                    .to_owned(),
            );
        }
        Ok(())
    }
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
    fn production_refuses_to_run_without_authentication_unless_told() {
        let mut settings = Settings::default();
        assert!(settings.check_production(None).is_ok());
        assert!(settings.check_production(Some("staging")).is_ok());
        let refusal = settings.check_production(Some("production")).unwrap_err();
        assert!(refusal.contains("APP__AUTH__MODE=jwt"), "{refusal}");
        assert!(!refusal.contains('\n'));
        settings.auth.allow_none_in_production = true;
        assert!(settings.check_production(Some("production")).is_ok());
        settings.auth = AuthSettings {
            mode: AuthMode::Jwt,
            ..AuthSettings::default()
        };
        assert!(settings.check_production(Some("production")).is_ok());
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
            (
                "auth",
                format!("{:?}", loaded.auth),
                format!("{:?}", built_in.auth),
            ),
            (
                "rate_limit",
                format!("{:?}", loaded.rate_limit),
                format!("{:?}", built_in.rate_limit),
            ),
            (
                "cors",
                format!("{:?}", loaded.cors),
                format!("{:?}", built_in.cors),
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
    fn lists_come_from_the_environment_as_strings_separated_by_spaces() {
        let settings = Settings::load_from(
            &config_dir(),
            &env(&[
                ("APP__RATE_LIMIT__TRUSTED_PROXIES", "127.0.0.1 10.1.0.0/16"),
                (
                    "APP__DATABASE__REPLICA_URLS",
                    "postgres://u@r1/d postgres://u@r2/d",
                ),
            ]),
        )
        .unwrap();
        let proxies: Vec<String> = settings
            .rate_limit
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(proxies, ["127.0.0.1/32", "10.1.0.0/16"]);
        assert_eq!(
            settings.database.replica_urls,
            ["postgres://u@r1/d", "postgres://u@r2/d"]
        );
        let err = Settings::load_from(
            &config_dir(),
            &env(&[("APP__RATE_LIMIT__TRUSTED_PROXIES", "10.0.0.1 nope")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("\"nope\" is not an address or a range"),
            "{err}"
        );
    }

    #[test]
    fn the_database_ca_file_comes_from_the_environment() {
        let settings = Settings::load_from(&config_dir(), &env(&[])).unwrap();
        assert_eq!(settings.database.tls_ca_file, None);
        let settings = Settings::load_from(
            &config_dir(),
            &env(&[("APP__DATABASE__TLS_CA_FILE", "/etc/dashboard/ca.crt")]),
        )
        .unwrap();
        assert_eq!(
            settings.database.tls_ca_file.as_deref(),
            Some(std::path::Path::new("/etc/dashboard/ca.crt"))
        );
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
