//! Database settings: where the server is, how big the pool is, and how long anything may wait.
//!
//! deadpool leaves every pool timeout unset by default, which lets `Pool::get` wait forever when
//! the server is down or the pool is exhausted. Every limit here has a finite default instead, so
//! each wait on the database is bounded.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::Error;

/// Settings of the PostgreSQL pool, read from the `[database]` section of the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DbConfig {
    /// Connection URL (`postgres://user@host:port/dbname`). A password in it is honoured but
    /// better kept out of files: see [`DbConfig::password`] and [`DbConfig::password_file`].
    pub url: String,
    /// The password, usually from the environment (`APP__DATABASE__PASSWORD`). Never logged.
    pub password: Option<Secret>,
    /// A file holding the password, read when neither the URL nor `password` has one. A missing
    /// file means no password, so a local cluster that was never started does not stop start-up.
    pub password_file: Option<PathBuf>,
    /// PEM file of the roots a server's certificate must chain to when a URL says
    /// `sslmode=require` (the system's roots when unset); see the `tls` module.
    pub tls_ca_file: Option<PathBuf>,
    /// Maximum number of pooled connections.
    pub max_size: usize,
    /// How long a caller waits for a free connection before getting [`Error::PoolTimeout`].
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// How long opening a new connection may take (TCP connect, authentication, start-up).
    #[serde(with = "humantime_serde")]
    pub create_timeout: Duration,
    /// How long the health check of a returned connection may take before it is replaced.
    #[serde(with = "humantime_serde")]
    pub recycle_timeout: Duration,
    /// Server-side `statement_timeout`: the server cancels any statement running longer. Sent in
    /// the start-up packet with [`Statements::Prepared`], with `SET LOCAL` in each connection
    /// lease's transaction with [`Statements::Unnamed`].
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// How statements reach the server: see [`Statements`].
    pub statements: Statements,
    /// Read replicas (hot standbys, or poolers in front of them). The reads go to one that
    /// answers and is at most [`DbConfig::replica_max_lag`] behind, the primary otherwise. In a
    /// file a list; in the environment one string of URLs separated by spaces. The password
    /// settings apply to them as to [`DbConfig::url`].
    #[serde(deserialize_with = "urls")]
    pub replica_urls: Vec<String>,
    /// A replica further behind its primary than this is skipped until it catches up.
    #[serde(with = "humantime_serde")]
    pub replica_max_lag: Duration,
    /// A read on a replica with no answer within this runs on the primary instead (a replica
    /// gone behind a pooler makes reads wait rather than fail); each replica check is bounded
    /// by it too.
    #[serde(with = "humantime_serde")]
    pub replica_timeout: Duration,
    /// How often each database's reachability (and a replica's lag) is checked, in the
    /// background of the requests that read.
    #[serde(with = "humantime_serde")]
    pub health_check_interval: Duration,
    /// `application_name` shown in `pg_stat_activity`.
    pub application_name: String,
    /// At most this many orders are returned for one user, newest first.
    pub orders_limit: i64,
    /// At most this many reviews are returned for one user.
    pub reviews_limit: i64,
}

impl Default for DbConfig {
    fn default() -> Self {
        Self {
            url: "postgres://dashboard@127.0.0.1:54320/dashboard".to_owned(),
            password: None,
            password_file: None,
            tls_ca_file: None,
            max_size: 20,
            wait_timeout: Duration::from_secs(1),
            create_timeout: Duration::from_secs(2),
            recycle_timeout: Duration::from_secs(1),
            statement_timeout: Duration::from_secs(30),
            statements: Statements::Prepared,
            replica_urls: Vec::new(),
            replica_max_lag: Duration::from_secs(5),
            replica_timeout: Duration::from_millis(250),
            health_check_interval: Duration::from_secs(1),
            application_name: "dashboard".to_owned(),
            orders_limit: 100,
            reviews_limit: 100,
        }
    }
}

impl DbConfig {
    /// A configuration with defaults for everything but the URL.
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// Parses the URL and applies the password, the timeouts and the session settings.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the URL does not parse, a limit is out of range, or the password
    /// file exists but cannot be read.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, Error> {
        self.pg_config_of(&self.url, "database.url")
    }

    /// [`DbConfig::pg_config`] for each of [`DbConfig::replica_urls`], in order.
    ///
    /// # Errors
    ///
    /// As [`DbConfig::pg_config`]; the message names the replica's position.
    pub fn replica_pg_configs(&self) -> Result<Vec<tokio_postgres::Config>, Error> {
        self.replica_urls
            .iter()
            .enumerate()
            .map(|(i, url)| self.pg_config_of(url, &format!("database.replica_urls[{i}]")))
            .collect()
    }

    fn pg_config_of(&self, url: &str, key: &str) -> Result<tokio_postgres::Config, Error> {
        // libpq's `verify-full` is what `require` does here (see the `tls` module); the driver
        // knows only disable, prefer and require. `verify-ca` (no host name check) is refused
        // rather than quietly made stricter or weaker.
        if url.contains("sslmode=verify-ca") {
            return Err(Error::Config(format!(
                "{key}: sslmode=verify-ca is not supported; use sslmode=verify-full (or require, \
                 the same here: the certificate and the host name are verified)"
            )));
        }
        let url = url.replace("sslmode=verify-full", "sslmode=require");
        let mut pg = tokio_postgres::Config::from_str(&url)
            .map_err(|e| Error::Config(format!("{key} is not a valid PostgreSQL URL: {e}")))?;
        if pg.get_password().is_none() {
            if let Some(password) = &self.password {
                pg.password(password.expose());
            } else if let Some(path) = &self.password_file {
                match std::fs::read_to_string(path) {
                    Ok(text) => {
                        pg.password(text.trim_end_matches(['\n', '\r']));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(Error::Config(format!(
                            "database.password_file {} cannot be read: {e}",
                            path.display()
                        )));
                    }
                }
            }
        }
        if self.max_size == 0 {
            return Err(Error::Config("database.max_size must be at least 1".into()));
        }
        for (key, value) in [
            ("database.wait_timeout", self.wait_timeout),
            ("database.create_timeout", self.create_timeout),
            ("database.recycle_timeout", self.recycle_timeout),
            ("database.statement_timeout", self.statement_timeout),
            ("database.replica_max_lag", self.replica_max_lag),
            ("database.replica_timeout", self.replica_timeout),
            ("database.health_check_interval", self.health_check_interval),
        ] {
            if value.is_zero() {
                return Err(Error::Config(format!("{key} must be greater than zero")));
            }
        }
        for (key, value) in [
            ("database.orders_limit", self.orders_limit),
            ("database.reviews_limit", self.reviews_limit),
        ] {
            if !(1..=10_000).contains(&value) {
                return Err(Error::Config(format!("{key} must be 1 to 10000")));
            }
        }
        pg.application_name(&self.application_name);
        pg.connect_timeout(self.create_timeout);
        if self.statements == Statements::Prepared {
            // Sent in the start-up packet, so the setting costs no extra round trip per
            // connection. A transaction pooler refuses start-up options: see `Statements`.
            pg.options(format!(
                "-c statement_timeout={}",
                self.statement_timeout.as_millis()
            ));
        }
        Ok(pg)
    }

    /// The URL as it may be logged: see [`mask_url`].
    pub fn masked_url(&self) -> String {
        mask_url(&self.url)
    }
}

/// How statements reach the server.
///
/// A transaction pooler (PgBouncer in `pool_mode = transaction`) hands each transaction to
/// whichever server connection is free, so nothing may outlive a transaction: PgBouncer 1.18
/// knows no named prepared statements, and refuses start-up `options`. [`Statements::Unnamed`]
/// keeps each connection lease in one transaction, so that its pipelined statements stay on one
/// server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Statements {
    /// Named statements prepared once per connection and cached (two round trips the first
    /// time, one after); `statement_timeout` in the start-up packet. For direct connections
    /// and session pooling.
    #[default]
    Prepared,
    /// Unnamed statements (`query_typed`: parse, bind and execute in one round trip, every time),
    /// inside a `BEGIN READ ONLY` that also sets `statement_timeout` with `SET LOCAL`, sent
    /// pipelined with the first statement of a lease and committed when the lease ends. For
    /// transaction poolers.
    Unnamed,
}

/// Reads a list of URLs: a list, or one string of URLs separated by whitespace (an environment
/// variable cannot hold a list).
fn urls<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(text) => text.split_whitespace().map(str::to_owned).collect(),
        OneOrMany::Many(list) => list,
    })
}

/// A connection string as it may be logged: rebuilt from its parsed parts (user, hosts, ports,
/// database), so no password survives, whichever form it was given in (`user:password@`,
/// `?password=`, or `password=` in the key-value form). A password is shown as `***`.
pub fn mask_url(url: &str) -> String {
    let Ok(pg) =
        tokio_postgres::Config::from_str(&url.replace("sslmode=verify-full", "sslmode=require"))
    else {
        return "<unparsable database URL>".to_owned();
    };
    let mut text = String::from("postgres://");
    if let Some(user) = pg.get_user() {
        text.push_str(user);
        if pg.get_password().is_some() {
            text.push_str(":***");
        }
        text.push('@');
    }
    let ports = pg.get_ports();
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            match ports.get(i).or(ports.first()) {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    text.push_str(&hosts.join(","));
    if let Some(dbname) = pg.get_dbname() {
        text.push('/');
        text.push_str(dbname);
    }
    text
}

/// A secret string whose `Debug` and `Display` never show the value.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_the_password_and_nothing_else() {
        assert_eq!(
            mask_url("postgres://app:s3cr%40t@db:5432/x?sslmode=disable"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            mask_url("postgres://app@db:5432/x"),
            "postgres://app@db:5432/x"
        );
        // Every form tokio-postgres accepts a password in.
        for url in [
            "postgres://app@db:5432/x?password=hunter2",
            "host=db port=5432 user=app password=hunter2 dbname=x",
            "postgres://app:hunter2@db:5432/x",
        ] {
            let masked = mask_url(url);
            assert!(!masked.contains("hunter2"), "{masked}");
            assert_eq!(masked, "postgres://app:***@db:5432/x");
        }
        assert_eq!(mask_url("not a url"), "<unparsable database URL>");
    }

    #[test]
    fn libpq_sslmodes_map_onto_what_the_driver_knows() {
        use tokio_postgres::config::SslMode;
        let mode = |url: &str| {
            DbConfig::with_url(url.to_owned())
                .pg_config()
                .map(|pg| pg.get_ssl_mode())
        };
        assert!(matches!(mode("postgres://u@h/d"), Ok(SslMode::Prefer)));
        assert!(matches!(
            mode("postgres://u@h/d?sslmode=require"),
            Ok(SslMode::Require)
        ));
        assert!(matches!(
            mode("postgres://u@h/d?sslmode=verify-full"),
            Ok(SslMode::Require)
        ));
        assert!(matches!(
            mode("postgres://u@h/d?sslmode=disable"),
            Ok(SslMode::Disable)
        ));
        let refused = mode("postgres://u@h/d?sslmode=verify-ca")
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("database.url") && refused.contains("verify-ca"),
            "{refused}"
        );
    }

    #[test]
    fn secrets_never_print() {
        let config = DbConfig {
            password: Some(Secret::new("hunter2")),
            ..DbConfig::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(Secret::new("hunter2").to_string(), "***");
    }

    #[test]
    fn password_precedence_url_then_setting_then_file() {
        let dir = std::env::temp_dir().join(format!("repo-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "from-file\n").unwrap();

        let mut config = DbConfig::with_url("postgres://u:from-url@h/d");
        config.password = Some(Secret::new("from-setting"));
        config.password_file = Some(file.clone());
        assert_eq!(
            config.pg_config().unwrap().get_password(),
            Some(&b"from-url"[..])
        );

        config.url = "postgres://u@h/d".into();
        assert_eq!(
            config.pg_config().unwrap().get_password(),
            Some(&b"from-setting"[..])
        );

        config.password = None;
        assert_eq!(
            config.pg_config().unwrap().get_password(),
            Some(&b"from-file"[..])
        );

        config.password_file = Some(dir.join("missing"));
        assert_eq!(config.pg_config().unwrap().get_password(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut config = DbConfig::with_url("not a url");
        let err = config.pg_config().unwrap_err().to_string();
        assert!(err.contains("database.url"), "{err}");

        config = DbConfig {
            max_size: 0,
            ..DbConfig::default()
        };
        let err = config.pg_config().unwrap_err().to_string();
        assert!(err.contains("database.max_size"), "{err}");

        config = DbConfig {
            wait_timeout: Duration::ZERO,
            ..DbConfig::default()
        };
        let err = config.pg_config().unwrap_err().to_string();
        assert!(err.contains("database.wait_timeout"), "{err}");
    }

    #[test]
    fn session_settings_travel_in_the_startup_packet() {
        let pg = DbConfig::default().pg_config().unwrap();
        assert_eq!(pg.get_options(), Some("-c statement_timeout=30000"));
        assert_eq!(pg.get_application_name(), Some("dashboard"));
    }

    #[test]
    fn unnamed_statements_send_no_startup_options_a_pooler_would_refuse() {
        let config = DbConfig {
            statements: Statements::Unnamed,
            ..DbConfig::default()
        };
        assert_eq!(config.pg_config().unwrap().get_options(), None);
    }

    #[test]
    fn replica_urls_come_as_a_list_or_one_string_and_bad_ones_are_named() {
        #[derive(Deserialize)]
        struct Wrap {
            #[serde(deserialize_with = "urls")]
            replica_urls: Vec<String>,
        }
        let from_env: Wrap =
            serde_json::from_str(r#"{"replica_urls": " postgres://a/x  postgres://b/x "}"#)
                .unwrap();
        assert_eq!(from_env.replica_urls, ["postgres://a/x", "postgres://b/x"]);
        let from_file: Wrap =
            serde_json::from_str(r#"{"replica_urls": ["postgres://a/x"]}"#).unwrap();
        assert_eq!(from_file.replica_urls, ["postgres://a/x"]);

        let config = DbConfig {
            replica_urls: vec!["postgres://a/x".into(), "nope".into()],
            ..DbConfig::default()
        };
        let err = config.replica_pg_configs().unwrap_err().to_string();
        assert!(err.contains("database.replica_urls[1]"), "{err}");
    }
}
