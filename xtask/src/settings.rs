//! The few settings the developer commands need, read exactly as the service reads them (the
//! `layered` crate: the same files, the same `APP__SECTION__KEY` variables and `DATABASE_URL`).
//! Only the keys below are read; the service itself checks the rest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

/// The keys of the service's settings that `cargo xtask` uses.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// `[server]`.
    pub server: Server,
    /// `[database]`.
    pub database: Database,
    /// `[recommendations]`.
    pub recommendations: Recommendations,
}

/// `[server]`: where the API listens and how long it drains on SIGTERM.
#[derive(Debug, Clone, Deserialize)]
pub struct Server {
    /// The API's port on 127.0.0.1.
    pub port: u16,
    /// How long in-flight requests get after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

/// `[database]`: the URL and where its password comes from.
#[derive(Debug, Clone, Deserialize)]
pub struct Database {
    /// `postgres://user[:password]@host:port/database`.
    pub url: String,
    /// `APP__DATABASE__PASSWORD`, when set.
    pub password: Option<String>,
    /// A file holding the password (the local cluster's), used when nothing else gives one.
    pub password_file: Option<PathBuf>,
}

/// `[recommendations]`: where the service expects the recommendation service.
#[derive(Debug, Clone, Deserialize)]
pub struct Recommendations {
    /// `http://host:port[/prefix]`.
    pub base_url: String,
}

impl Settings {
    /// Loads the settings from `APP_CONFIG_DIR` (default `config`) and the process environment.
    ///
    /// # Errors
    ///
    /// When a file is missing or malformed, or a key has the wrong type.
    pub fn load() -> Result<Self> {
        Ok(layered::load()?)
    }

    /// Loads the settings from `dir`, with `env` standing in for the process environment.
    ///
    /// # Errors
    ///
    /// When a file is missing or malformed, or a key has the wrong type.
    pub fn load_from(dir: &Path, env: &HashMap<String, String>) -> Result<Self> {
        Ok(layered::load_from(dir, env)?)
    }
}

impl Database {
    /// The URL with the password in it (from the URL, `APP__DATABASE__PASSWORD` or the password
    /// file), for psql.
    ///
    /// # Errors
    ///
    /// When the URL is not `postgres://…@…`.
    pub fn url_with_password(&self) -> Result<String> {
        let url = PgUrl::parse(&self.url)?;
        if url.password.is_some() {
            return Ok(self.url.clone());
        }
        let password = self.password.clone().or_else(|| {
            let file = self.password_file.as_ref()?;
            Some(std::fs::read_to_string(file).ok()?.trim().to_owned())
        });
        Ok(match password {
            Some(password) => url.with_password(&password),
            None => self.url.clone(),
        })
    }

    /// The URL with any password replaced by `***`, for messages.
    pub fn masked_url(&self) -> String {
        match PgUrl::parse(&self.url) {
            Ok(url) if url.password.is_some() => url.with_password("***"),
            Ok(_) => self.url.clone(),
            Err(_) => "(an invalid database.url)".to_owned(),
        }
    }
}

/// The parts of a `postgres://user[:password]@host[:port][/database]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgUrl {
    /// The role.
    pub user: String,
    /// The password, when the URL has one.
    pub password: Option<String>,
    /// The host name or address.
    pub host: String,
    /// The port (5432 when absent).
    pub port: u16,
    /// The database (the user's name when absent).
    pub database: String,
}

impl PgUrl {
    /// Parses a URL of the shape above (no query parameters, no percent-escapes).
    ///
    /// # Errors
    ///
    /// When the URL has another shape.
    pub fn parse(url: &str) -> Result<Self> {
        let invalid =
            || "database.url is not of the form postgres://user[:password]@host[:port]/database";
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .with_context(invalid)?;
        let (credentials, rest) = rest.rsplit_once('@').with_context(invalid)?;
        let (user, password) = match credentials.split_once(':') {
            Some((user, password)) => (user, Some(password.to_owned())),
            None => (credentials, None),
        };
        let (authority, database) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().ok().with_context(invalid)?),
            None => (authority, 5432),
        };
        if user.is_empty() || host.is_empty() || database.contains(['?', '/']) {
            bail!(invalid());
        }
        let database = if database.is_empty() { user } else { database };
        Ok(Self {
            user: user.to_owned(),
            password,
            host: host.to_owned(),
            port,
            database: database.to_owned(),
        })
    }

    /// The URL again, with `password`.
    pub fn with_password(&self, password: &str) -> String {
        let Self {
            user,
            host,
            port,
            database,
            ..
        } = self;
        format!("postgres://{user}:{password}@{host}:{port}/{database}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
    }

    #[test]
    fn urls_are_taken_apart_and_masked() {
        let url = PgUrl::parse("postgres://dashboard:pw@127.0.0.1:54320/dashboard").unwrap();
        assert_eq!(url.user, "dashboard");
        assert_eq!(url.password.as_deref(), Some("pw"));
        assert_eq!((url.host.as_str(), url.port), ("127.0.0.1", 54320));
        assert_eq!(
            url.with_password("x"),
            "postgres://dashboard:x@127.0.0.1:54320/dashboard"
        );
        let bare = PgUrl::parse("postgresql://me@db").unwrap();
        assert_eq!((bare.port, bare.database.as_str()), (5432, "me"));
        for bad in [
            "http://x@y/z",
            "postgres://host:5432/db",
            "postgres://u@h:port/d",
            "postgres://u@h/d?sslmode=x",
        ] {
            assert!(PgUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_project_settings_load_and_the_environment_wins() {
        let env = HashMap::from([
            ("APP__SERVER__PORT".to_owned(), "8123".to_owned()),
            (
                "DATABASE_URL".to_owned(),
                "postgres://a:b@127.0.0.1:1/c".to_owned(),
            ),
        ]);
        let settings = Settings::load_from(&config_dir(), &env).unwrap();
        assert_eq!(settings.server.port, 8123);
        assert_eq!(settings.database.url, "postgres://a:b@127.0.0.1:1/c");
        assert_eq!(
            settings.database.masked_url(),
            "postgres://a:***@127.0.0.1:1/c"
        );
        assert!(settings.recommendations.base_url.starts_with("http://"));
    }
}
