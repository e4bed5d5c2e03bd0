//! The one place that says how the service's settings are layered, so that the API and the
//! developer commands (`cargo xtask`), which read the same files, cannot disagree:
//!
//! 1. `{dir}/default.toml`: every setting with its default (required);
//! 2. `{dir}/{APP_ENV}.toml` when `APP_ENV` is set (optional);
//! 3. environment variables `APP__SECTION__KEY` (`APP__DATABASE__MAX_SIZE=50` sets
//!    `database.max_size`), and `DATABASE_URL` below `APP__DATABASE__URL`.
//!
//! The caller's type decides what is read and how strictly (`deny_unknown_fields`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat};
use serde::de::DeserializeOwned;

/// Why the settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file is unreadable or malformed, a key is unknown, or a value has the wrong type.
    #[error("invalid settings: {0}")]
    Invalid(#[from] config::ConfigError),
    /// `default.toml` is not where it should be.
    #[error(
        "settings file {0} not found (set APP_CONFIG_DIR to the directory holding default.toml)"
    )]
    MissingDefaults(PathBuf),
}

/// The settings directory: `APP_CONFIG_DIR`, or `config`.
#[must_use]
pub fn dir() -> PathBuf {
    std::env::var_os("APP_CONFIG_DIR").map_or_else(|| PathBuf::from("config"), PathBuf::from)
}

/// Loads `T` from [`dir()`] and the process environment.
///
/// # Errors
///
/// [`Error`] naming the file or key that is wrong.
pub fn load<T: DeserializeOwned>() -> Result<T, Error> {
    load_from(&dir(), &std::env::vars().collect())
}

/// Loads `T` from `dir`, with `env` standing in for the process environment.
///
/// # Errors
///
/// [`Error`] naming the file or key that is wrong.
pub fn load_from<T: DeserializeOwned>(
    dir: &Path,
    env: &HashMap<String, String>,
) -> Result<T, Error> {
    let defaults = dir.join("default.toml");
    if !defaults.is_file() {
        return Err(Error::MissingDefaults(defaults));
    }
    let mut builder = Config::builder().add_source(File::from(defaults).format(FileFormat::Toml));
    if let Some(app_env) = env.get("APP_ENV").filter(|v| !v.is_empty()) {
        builder = builder.add_source(
            File::from(dir.join(format!("{app_env}.toml")))
                .format(FileFormat::Toml)
                .required(false),
        );
    }
    let app_vars: config::Map<String, String> = env
        .iter()
        .filter(|(key, _)| key.starts_with("APP__"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    builder = builder.add_source(
        Environment::with_prefix("APP")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(false)
            .source(Some(app_vars)),
    );
    if !env.contains_key("APP__DATABASE__URL")
        && let Some(url) = env.get("DATABASE_URL").filter(|v| !v.is_empty())
    {
        builder = builder.set_override("database.url", url.as_str())?;
    }
    Ok(builder.build()?.try_deserialize()?)
}
