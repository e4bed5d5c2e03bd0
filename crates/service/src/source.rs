//! The dashboard's sources, what can go wrong with each, and how long each took.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use taskgroup::Outcome;
use tokio::time::Instant;

use crate::kind::{ErrorKind, Limit};

/// One of the four things a dashboard is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The user's profile (essential).
    Profile,
    /// The user's recent orders.
    Orders,
    /// The user's reviews.
    Reviews,
    /// Products recommended by the external service.
    Recommendations,
}

impl Source {
    /// Every source, in the order responses list them.
    pub const ALL: [Source; 4] = [
        Source::Profile,
        Source::Orders,
        Source::Reviews,
        Source::Recommendations,
    ];

    /// The source's name in responses, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Profile => "profile",
            Source::Orders => "orders",
            Source::Reviews => "reviews",
            Source::Recommendations => "recommendations",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one source (or one batch chunk) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The profile shows no such user.
    #[error("user not found")]
    NotFound,
    /// No database slot became free within the wait budget.
    #[error("database busy: no connection slot free within {}ms", .0.as_millis())]
    Busy(Duration),
    /// The database failed.
    #[error(transparent)]
    Database(#[from] repository::Error),
    /// The recommendation service failed.
    #[error(transparent)]
    Recommendations(#[from] client::RecommendationError),
    /// A time limit cut the source off: one it enforces itself (the recommendation call, so that
    /// the client's breaker sees the timeout; a batch chunk), or, once described, one the task
    /// group enforced. Both read the same.
    #[error("timed out after {after:?} ({limit})")]
    TimedOut {
        /// The length of the limit.
        after: Duration,
        /// Which limit.
        limit: Limit,
    },
}

impl SourceError {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        use repository::Error as Db;
        match self {
            SourceError::NotFound => ErrorKind::NotFound,
            SourceError::Busy(_) => ErrorKind::Busy,
            SourceError::TimedOut { .. } => ErrorKind::Timeout,
            SourceError::Database(error) => match error {
                Db::PoolTimeout(_) => ErrorKind::PoolTimeout,
                Db::Unavailable(_) => ErrorKind::Unavailable,
                Db::Timeout => ErrorKind::Timeout,
                Db::Cancelled => ErrorKind::Cancelled,
                Db::Closed => ErrorKind::Closed,
                Db::Config(_) => ErrorKind::Config,
                // A new driver error is a query failure until it is told apart.
                _ => ErrorKind::Query,
            },
            SourceError::Recommendations(error) => recommendation_kind(error.kind()),
        }
    }

    /// The message a client of the API may see: one line that says what failed, without what the
    /// driver, the server or the recommendation service said (table names, types, login errors,
    /// a third party's error body). The full error goes to the log.
    pub fn public_message(&self) -> String {
        use client::RecommendationError as Rec;
        use repository::Error as Db;
        match self {
            SourceError::Recommendations(Rec::Status { status, .. }) => {
                format!("recommendation service answered {status}")
            }
            SourceError::Recommendations(Rec::Decode { .. }) => {
                "recommendation service sent an invalid response".to_owned()
            }
            SourceError::Database(Db::Unavailable(_)) => "database unavailable".to_owned(),
            SourceError::Database(Db::Query { code, .. }) => {
                format!("database query failed (SQLSTATE {code})")
            }
            SourceError::Database(Db::Config(_)) => "database misconfigured".to_owned(),
            other => other.to_string(),
        }
    }

    /// Logs the full error: at `warn` for database failures (a query error is a bug, an outage
    /// needs attention), at `debug` for the rest, which metrics count anyway.
    pub(crate) fn log(&self, source: &str) {
        match self {
            SourceError::Database(error) => tracing::warn!(source, %error, "source failed"),
            error => tracing::debug!(source, %error, "source failed"),
        }
    }

    /// The same error for another waiter of a shared read (see the `coalesce` module), which
    /// only ever fails with database-side errors.
    pub(crate) fn shared(&self) -> SourceError {
        match self {
            SourceError::NotFound => SourceError::NotFound,
            SourceError::Busy(wait) => SourceError::Busy(*wait),
            SourceError::Database(error) => SourceError::Database(error.clone()),
            SourceError::TimedOut { after, limit } => SourceError::TimedOut {
                after: *after,
                limit: *limit,
            },
            SourceError::Recommendations(error) => {
                SourceError::Database(repository::Error::Unavailable(error.to_string()))
            }
        }
    }

    /// Whether the database as a whole is out of reach (rather than one statement failing or
    /// one caller waiting too long): every other read would fail the same way.
    pub(crate) fn dooms_every_read(&self) -> bool {
        matches!(
            self,
            SourceError::Database(repository::Error::Closed | repository::Error::Unavailable(_))
        )
    }
}

/// The kind of a failed recommendation call.
pub(crate) fn recommendation_kind(kind: client::ErrorKind) -> ErrorKind {
    use client::ErrorKind as Rec;
    match kind {
        Rec::Timeout => ErrorKind::Timeout,
        Rec::Unavailable => ErrorKind::Unavailable,
        Rec::Status => ErrorKind::Status,
        Rec::TooLarge => ErrorKind::TooLarge,
        Rec::Decode => ErrorKind::Decode,
        Rec::CircuitOpen => ErrorKind::CircuitOpen,
        Rec::Saturated => ErrorKind::Saturated,
    }
}

/// One entry of a dashboard's `errors` list: which source failed, how, and a message fit for
/// the client (no SQL, no internals).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SourceFailure {
    /// The source that failed.
    pub source: Source,
    /// What kind of failure.
    pub kind: ErrorKind,
    /// What happened, in one line.
    pub error: String,
}

impl SourceFailure {
    pub(crate) fn new(source: Source, error: &SourceError) -> Self {
        SourceFailure {
            source,
            kind: error.kind(),
            error: error.public_message(),
        }
    }
}

/// How a source ended, for metrics and `Server-Timing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceStatus {
    /// It delivered its data.
    Ok,
    /// It failed with an error.
    Error,
    /// A time limit cut it off.
    Timeout,
    /// It was cancelled (the profile showed the user does not exist, or the profile failed).
    Cancelled,
}

impl SourceStatus {
    /// The status's label.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceStatus::Ok => "ok",
            SourceStatus::Error => "error",
            SourceStatus::Timeout => "timeout",
            SourceStatus::Cancelled => "cancelled",
        }
    }
}

/// How long one source took and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceTiming {
    /// The source.
    pub source: Source,
    /// From the start of the dashboard until the source finished or was cut off.
    pub elapsed: Duration,
    /// How it ended.
    pub status: SourceStatus,
}

/// Per-source stopwatches that stop when their source's future ends, however it ends: a future
/// cut off by a timeout or a cancellation is dropped, and dropping stops the watch too.
#[derive(Debug, Clone)]
pub(crate) struct Clocks {
    started: Instant,
    /// Microseconds since `started`, plus one (zero means "never stopped").
    stopped: Arc<[AtomicU64; 4]>,
}

impl Clocks {
    pub(crate) fn new(started: Instant) -> Self {
        Self {
            started,
            stopped: Arc::new(Default::default()),
        }
    }

    pub(crate) fn watch(&self, source: Source) -> Stopwatch {
        Stopwatch {
            clocks: self.clone(),
            source,
        }
    }

    pub(crate) fn elapsed(&self, source: Source) -> Duration {
        match self.stopped[source.index()].load(Ordering::Relaxed) {
            0 => self.started.elapsed(),
            micros => Duration::from_micros(micros - 1),
        }
    }
}

/// Stops its source's clock when dropped.
pub(crate) struct Stopwatch {
    clocks: Clocks,
    source: Source,
}

impl Drop for Stopwatch {
    fn drop(&mut self) {
        let micros = u64::try_from(self.clocks.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.clocks.stopped[self.source.index()].store(micros.saturating_add(1), Ordering::Relaxed);
    }
}

/// Turns a source's outcome into its status and, unless it succeeded or was merely cancelled,
/// its `errors` entry. Every way a source can end goes through here, the early ones (no database
/// connection at all) included. A time limit the task group enforced is described with the
/// configured length of the limit (`limits`: the source's own timeout and the deadline), not the
/// group's measured budget, which starts a few microseconds after the request did.
pub(crate) fn describe<T>(
    source: Source,
    outcome: &Outcome<T, SourceError>,
    limits: (Duration, (Limit, Duration)),
) -> (SourceStatus, Option<SourceFailure>) {
    match outcome {
        Outcome::Ok(_) => (SourceStatus::Ok, None),
        Outcome::Err(error) => {
            let status = match error {
                SourceError::TimedOut { .. } => SourceStatus::Timeout,
                error => {
                    error.log(source.as_str());
                    SourceStatus::Error
                }
            };
            (status, Some(SourceFailure::new(source, error)))
        }
        Outcome::TimedOut(timeout) => {
            let (after, limit) = match timeout.limit {
                taskgroup::Limit::Child => (limits.0, Limit::Source(source)),
                taskgroup::Limit::Group => (limits.1.1, limits.1.0),
            };
            let error = SourceError::TimedOut { after, limit };
            (
                SourceStatus::Timeout,
                Some(SourceFailure::new(source, &error)),
            )
        }
        Outcome::Panicked(_) => (
            SourceStatus::Error,
            Some(SourceFailure {
                source,
                kind: ErrorKind::Internal,
                error: "internal error".to_owned(),
            }),
        ),
        Outcome::Cancelled(_) => (SourceStatus::Cancelled, None),
    }
}
