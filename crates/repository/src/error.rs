//! The repository's error type, and how driver and pool errors map onto it.
//!
//! Callers decide on the variant, not on text: a pool timeout and a server that is down are both
//! "try again later", a statement timeout is "this query was too slow", and a query error is a bug
//! or bad data. The `Display` strings are one line and contain no SQL text; they are meant for
//! logs. They may quote the server (a table or role name), so the service layer shows clients a
//! fixed sentence per kind instead.

use std::time::Duration;

use deadpool_postgres::{PoolError, TimeoutType};
use tokio_postgres::error::SqlState;

/// What went wrong talking to PostgreSQL.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No pooled connection became free within the configured wait.
    #[error("no database connection free within {0:?}")]
    PoolTimeout(Duration),
    /// The server could not be reached or dropped the connection.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The server cancelled the statement because it ran past `statement_timeout`.
    #[error("query cancelled by the database statement timeout")]
    Timeout,
    /// The statement was cancelled on request (a cancelled caller sent a cancel request).
    #[error("query cancelled")]
    Cancelled,
    /// Any other error reported by the server, with its SQLSTATE code.
    #[error("database error {code}: {message}")]
    Query {
        /// The five-character SQLSTATE code.
        code: String,
        /// The server's primary message (no SQL text).
        message: String,
    },
    /// The pool was closed: the process is shutting down.
    #[error("database pool is closed")]
    Closed,
    /// The settings are unusable; the message names the key.
    #[error("invalid database settings: {0}")]
    Config(String),
}

impl Error {
    /// A stable, short name for the kind of error, for metrics and machine-readable responses.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::PoolTimeout(_) => "pool_timeout",
            Self::Unavailable(_) => "unavailable",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::Query { .. } => "query",
            Self::Closed => "closed",
            Self::Config(_) => "config",
        }
    }

    /// Whether the error says the database (not this one query) is out of reach right now.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::PoolTimeout(_) | Self::Unavailable(_) | Self::Closed
        )
    }

    pub(crate) fn from_pool(error: PoolError, wait: Duration) -> Self {
        match error {
            PoolError::Timeout(TimeoutType::Wait) => Self::PoolTimeout(wait),
            PoolError::Timeout(TimeoutType::Create) => {
                Self::Unavailable("connecting timed out".to_owned())
            }
            PoolError::Timeout(TimeoutType::Recycle) => {
                Self::Unavailable("checking a pooled connection timed out".to_owned())
            }
            // Whatever stops a new connection from being opened (refused, authentication, the
            // database not accepting connections) makes the database unavailable to the caller.
            PoolError::Backend(e) => match Self::from(e) {
                Self::Query { message, .. } => Self::Unavailable(message),
                other => other,
            },
            PoolError::Closed => Self::Closed,
            PoolError::NoRuntimeSpecified => {
                Self::Config("the pool was built without a runtime".to_owned())
            }
            PoolError::PostCreateHook(e) => Self::Unavailable(e.to_string()),
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(error: tokio_postgres::Error) -> Self {
        let Some(db) = error.as_db_error() else {
            // No server response: the socket failed, the server went away, or the connection
            // was already closed. All of these are "unavailable" to a caller.
            return Self::Unavailable(one_line(&error));
        };
        let code = db.code();
        if *code == SqlState::QUERY_CANCELED {
            // The same SQLSTATE covers both causes; only the message tells them apart.
            return if db.message().contains("statement timeout") {
                Self::Timeout
            } else {
                Self::Cancelled
            };
        }
        let class = &code.code()[..2];
        // 08: connection exception; 57P: operator intervention (shutdown, crash, cannot connect
        // now); 53: insufficient resources (too many connections, out of memory or disk).
        if class == "08" || class == "53" || code.code().starts_with("57P") {
            return Self::Unavailable(db.message().to_owned());
        }
        Self::Query {
            code: code.code().to_owned(),
            message: db.message().to_owned(),
        }
    }
}

/// Formats an error and its sources on one line.
fn one_line(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}
