//! The vocabulary of failure shared by every layer above the drivers: [`ErrorKind`], what went
//! wrong with a source, and [`Limit`], which time limit fired. Each has its wire name here and
//! nowhere else; metrics, responses and logs all use these.

use std::fmt;

use serde::Serialize;

use crate::Source;

/// Why a source (or a user of a batch) has no data: the `kind` of an `errors` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// No such user.
    NotFound,
    /// No database slot became free within the wait budget.
    Busy,
    /// No pooled connection became free within the pool's wait.
    PoolTimeout,
    /// A time limit fired (see [`Limit`]).
    Timeout,
    /// The database or the recommendation service could not be reached.
    Unavailable,
    /// The statement was cancelled.
    Cancelled,
    /// The database rejected a statement (a bug or bad data).
    Query,
    /// The pool is closed: the process is shutting down.
    Closed,
    /// The database settings are unusable.
    Config,
    /// The recommendation service answered with an error status.
    Status,
    /// The recommendation service's answer was larger than the limit.
    TooLarge,
    /// The recommendation service's answer was not JSON with an `items` array.
    Decode,
    /// The recommendation service kept failing, so calls fail fast for a while.
    CircuitOpen,
    /// This process had too many recommendation calls in flight to send another in time.
    Saturated,
    /// A bug (a source panicked).
    Internal,
}

impl ErrorKind {
    /// Every kind, so metrics can be registered up front.
    pub const ALL: [ErrorKind; 15] = [
        ErrorKind::NotFound,
        ErrorKind::Busy,
        ErrorKind::PoolTimeout,
        ErrorKind::Timeout,
        ErrorKind::Unavailable,
        ErrorKind::Cancelled,
        ErrorKind::Query,
        ErrorKind::Closed,
        ErrorKind::Config,
        ErrorKind::Status,
        ErrorKind::TooLarge,
        ErrorKind::Decode,
        ErrorKind::CircuitOpen,
        ErrorKind::Saturated,
        ErrorKind::Internal,
    ];

    /// The wire name: `not_found`, `busy`, `pool_timeout`, `timeout`, ...
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Busy => "busy",
            ErrorKind::PoolTimeout => "pool_timeout",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Query => "query",
            ErrorKind::Closed => "closed",
            ErrorKind::Config => "config",
            ErrorKind::Status => "status",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Decode => "decode",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::Saturated => "saturated",
            ErrorKind::Internal => "internal",
        }
    }

    /// Whether this says "the database is overloaded or out of reach, try again later" rather
    /// than anything about the data asked for.
    pub const fn is_overload(self) -> bool {
        matches!(
            self,
            ErrorKind::Busy
                | ErrorKind::PoolTimeout
                | ErrorKind::Timeout
                | ErrorKind::Unavailable
                | ErrorKind::Closed
        )
    }
}

/// Compares with a wire name: `kind == "busy"`.
impl PartialEq<&str> for ErrorKind {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which time limit cut something off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// A dashboard source's own timeout.
    Source(Source),
    /// The whole dashboard's deadline.
    DashboardDeadline,
    /// One batch chunk's timeout.
    BatchChunk,
    /// The whole batch's deadline.
    BatchDeadline,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Source(source) => write!(f, "{source} timeout"),
            Limit::DashboardDeadline => f.write_str("dashboard deadline"),
            Limit::BatchChunk => f.write_str("batch chunk timeout"),
            Limit::BatchDeadline => f.write_str("batch deadline"),
        }
    }
}
