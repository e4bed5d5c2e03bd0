//! The dashboard's sources, what can go wrong with each, and how long each took.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use taskgroup::{Limit, Outcome};
use tokio::time::Instant;

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
    /// The source was cut off by a time limit that it enforces itself rather than leaving it to
    /// the task group (the recommendation call, so that the client's breaker sees the timeout).
    /// It reads exactly as a timeout enforced by the group does.
    #[error("timed out after {after:?} ({limit})")]
    TimedOut {
        /// The length of the limit.
        after: Duration,
        /// Which limit: `recommendations timeout` or `dashboard deadline`.
        limit: &'static str,
    },
}

impl SourceError {
    /// A short, stable label for metrics and machine-readable responses.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceError::NotFound => "not_found",
            SourceError::Busy(_) => "busy",
            SourceError::Database(e) => e.kind(),
            SourceError::Recommendations(e) => e.kind().as_str(),
            SourceError::TimedOut { .. } => "timeout",
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

    /// Whether the database as a whole is out of reach or overloaded (rather than one statement
    /// failing): the answer is "try again later".
    pub fn is_unavailable(&self) -> bool {
        match self {
            SourceError::Busy(_) => true,
            SourceError::Database(e) => e.is_unavailable(),
            _ => false,
        }
    }
}

/// One entry of a dashboard's `errors` list: which source failed, how, and a message fit for
/// the client (no SQL, no internals).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SourceFailure {
    /// The source that failed.
    pub source: Source,
    /// A short, stable label: `timeout`, `unavailable`, `busy`, `status`, `circuit_open`,
    /// `saturated`, ...
    pub kind: &'static str,
    /// What happened, in one line.
    pub error: String,
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

/// Turns a child's outcome into the `errors` entry and the status it stands for.
pub(crate) fn describe<T>(
    source: Source,
    outcome: &Outcome<T, SourceError>,
    deadline: (&str, Duration),
) -> (SourceStatus, Option<SourceFailure>) {
    let failure = |kind: &'static str, error: String| SourceFailure {
        source,
        kind,
        error,
    };
    match outcome {
        Outcome::Ok(_) => (SourceStatus::Ok, None),
        Outcome::Err(e @ SourceError::TimedOut { .. }) => (
            SourceStatus::Timeout,
            Some(failure(e.kind(), e.public_message())),
        ),
        Outcome::Err(e) => {
            e.log(source.as_str());
            (
                SourceStatus::Error,
                Some(failure(e.kind(), e.public_message())),
            )
        }
        Outcome::TimedOut(timeout) => {
            // The configured length of the limit, not the group's measured budget, which starts
            // a few microseconds after the request did.
            let (which, after) = match timeout.limit {
                Limit::Child => (format!("{source} timeout"), timeout.after),
                Limit::Group => (deadline.0.to_owned(), deadline.1),
            };
            (
                SourceStatus::Timeout,
                Some(failure(
                    "timeout",
                    format!("timed out after {after:?} ({which})"),
                )),
            )
        }
        Outcome::Panicked(_) => (
            SourceStatus::Error,
            Some(failure("internal", "internal error".to_owned())),
        ),
        Outcome::Cancelled(_) => (SourceStatus::Cancelled, None),
    }
}
