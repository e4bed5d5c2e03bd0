//! The service's settings: the `[service]` section of the configuration.

use std::time::Duration;

use serde::Deserialize;

/// How the dashboard's three reads use the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum QueryMode {
    /// Coalesced (the default): concurrent dashboards of a worker share their statements. A
    /// lone dashboard's three reads go out at once, pipelined on one connection; the reads that
    /// arrive while statements are in flight go out together next, one statement per source for
    /// all of them. See the `coalesce` module and the README's Performance section (1.9x the
    /// dashboards per second of `Pipelined` on the benchmark, the same latency at low load).
    #[default]
    Coalesced,
    /// One pooled connection per dashboard; the three statements are pipelined on it (sent
    /// without waiting for each other's answers). One database slot per dashboard.
    Pipelined,
    /// Three pooled connections per dashboard, one statement each. Three database slots.
    Pooled,
}

/// Settings of the orchestration layer.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// Most database slots in use at once across all requests of the process; each slot is one
    /// pooled connection in use. At most `database.max_size`.
    pub db_concurrency: usize,
    /// How long a source may wait for a database slot before it reports the database busy
    /// (further bounded by the request's deadline).
    #[serde(with = "humantime_serde")]
    pub db_slot_wait: Duration,
    /// How the dashboard's reads use the database.
    pub query_mode: QueryMode,
    /// The dashboard fan-out.
    pub dashboard: DashboardConfig,
    /// The batch summaries.
    pub batch: BatchConfig,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            db_concurrency: 20,
            db_slot_wait: Duration::from_millis(500),
            query_mode: QueryMode::default(),
            dashboard: DashboardConfig::default(),
            batch: BatchConfig::default(),
        }
    }
}

/// Time limits of the dashboard.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DashboardConfig {
    /// The whole dashboard's deadline: whatever has not finished by then is cut off.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// The profile read's own timeout.
    #[serde(with = "humantime_serde")]
    pub profile_timeout: Duration,
    /// The orders read's own timeout.
    #[serde(with = "humantime_serde")]
    pub orders_timeout: Duration,
    /// The reviews read's own timeout.
    #[serde(with = "humantime_serde")]
    pub reviews_timeout: Duration,
    /// The recommendation call's own timeout (the client's own timeout applies too).
    #[serde(with = "humantime_serde")]
    pub recommendations_timeout: Duration,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(2),
            profile_timeout: Duration::from_secs(2),
            orders_timeout: Duration::from_secs(1),
            reviews_timeout: Duration::from_secs(1),
            recommendations_timeout: Duration::from_secs(1),
        }
    }
}

/// Limits of the batch summaries.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Most chunks of one batch summarised at once (the seed's `max_concurrency = 20`). Across
    /// all batches of the process, chunks may take at most half the database slots, so batches
    /// cannot starve dashboards.
    pub concurrency: usize,
    /// Ids summarised by one statement (`id = ANY($1)`); 1 means one statement per id, as in the
    /// seed.
    pub chunk_size: usize,
    /// Most ids one batch may ask for.
    pub max_ids: usize,
    /// How long one chunk's statement may take (waiting for a slot included); a chunk cut off
    /// reports its ids as timed out, and the rest of the batch goes on.
    #[serde(with = "humantime_serde")]
    pub chunk_timeout: Duration,
    /// The whole batch's deadline.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            concurrency: 20,
            chunk_size: 50,
            max_ids: 1000,
            chunk_timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(10),
        }
    }
}

/// A setting that cannot work; the message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid service settings: {0}")]
pub struct ConfigError(pub String);

impl DashboardConfig {
    /// The own timeout of `source`.
    pub(crate) fn timeout(&self, source: crate::Source) -> Duration {
        match source {
            crate::Source::Profile => self.profile_timeout,
            crate::Source::Orders => self.orders_timeout,
            crate::Source::Reviews => self.reviews_timeout,
            crate::Source::Recommendations => self.recommendations_timeout,
        }
    }
}

impl ServiceConfig {
    /// Checks the settings against each other and against the pool size.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the first bad key.
    pub fn validate(&self, pool_size: usize) -> Result<(), ConfigError> {
        let fail = |message: String| Err(ConfigError(message));
        if self.db_concurrency == 0 {
            return fail("service.db_concurrency must be at least 1".into());
        }
        if self.db_concurrency > pool_size {
            return fail(format!(
                "service.db_concurrency ({}) must not exceed database.max_size ({pool_size}): \
                 a slot is a pooled connection",
                self.db_concurrency
            ));
        }
        let d = &self.dashboard;
        for (key, value) in [
            ("service.db_slot_wait", self.db_slot_wait),
            ("service.dashboard.deadline", d.deadline),
            ("service.dashboard.profile_timeout", d.profile_timeout),
            ("service.dashboard.orders_timeout", d.orders_timeout),
            ("service.dashboard.reviews_timeout", d.reviews_timeout),
            (
                "service.dashboard.recommendations_timeout",
                d.recommendations_timeout,
            ),
            ("service.batch.deadline", self.batch.deadline),
            ("service.batch.chunk_timeout", self.batch.chunk_timeout),
        ] {
            if value.is_zero() {
                return fail(format!("{key} must be greater than zero"));
            }
        }
        if self.batch.concurrency == 0 {
            return fail("service.batch.concurrency must be at least 1".into());
        }
        if self.batch.chunk_size == 0 {
            return fail("service.batch.chunk_size must be at least 1".into());
        }
        if self.batch.max_ids == 0 {
            return fail("service.batch.max_ids must be at least 1".into());
        }
        Ok(())
    }
}
