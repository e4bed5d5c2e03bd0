//! Why a call failed, in a form callers can match on, count and show.
//!
//! Each [`RecommendationError`] displays as one line that an end user of the dashboard API can
//! read (it ends up in the response's `errors` list), while the underlying cause stays reachable
//! through [`std::error::Error::source`] for logs. [`ErrorKind`] is the short, stable label for
//! metrics and the load generator.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::time::Duration;

use http::StatusCode;

/// A boxed cause, kept for logs.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;

/// Why a call to the recommendation service failed.
///
/// Deliberately exhaustive: inside this workspace a new variant should be a compile error in
/// every `match` that maps errors to responses or metrics.
#[derive(Debug, thiserror::Error)]
pub enum RecommendationError {
    /// No complete answer arrived within the call's time budget (the configured timeout, or the
    /// caller's deadline if that came first).
    #[error("recommendation service did not answer within {}", DisplayDuration(*.after))]
    Timeout {
        /// The budget the call had.
        after: Duration,
    },
    /// The service could not be reached, or the connection broke before a complete answer.
    #[error("recommendation service unavailable: {reason}")]
    Unavailable {
        /// What went wrong, in a few words.
        reason: &'static str,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// The service answered with a status other than `200 OK`.
    #[error("recommendation service answered {}{}", status_text(*.status), body_suffix(.body))]
    Status {
        /// The status received.
        status: StatusCode,
        /// The start of the body (at most 200 characters, on one line), often an error message.
        body: String,
    },
    /// The body was larger than the configured limit.
    #[error("recommendation service sent a response larger than the {limit}-byte limit")]
    TooLarge {
        /// The configured limit, in bytes.
        limit: usize,
    },
    /// The body was not the expected JSON: invalid, truncated, or without an `items` list.
    #[error("recommendation service sent an invalid response: {source}")]
    Decode {
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
    /// The circuit breaker is open: the service failed repeatedly, so it is not being called
    /// until the cool-down ends.
    #[error("recommendation service temporarily skipped after repeated failures")]
    CircuitOpen {
        /// How long until a probe call is allowed (zero while a probe is in flight).
        retry_in: Duration,
    },
}

impl RecommendationError {
    /// The short label of this error for metrics and logs.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::Unavailable { .. } => ErrorKind::Unavailable,
            Self::Status { .. } => ErrorKind::Status,
            Self::TooLarge { .. } => ErrorKind::TooLarge,
            Self::Decode { .. } => ErrorKind::Decode,
            Self::CircuitOpen { .. } => ErrorKind::CircuitOpen,
        }
    }

    /// Whether this outcome says the service is unhealthy, and so counts towards opening the
    /// circuit. A 4xx answer (other than 429) is about the request, not the service; a circuit
    /// rejection is not an outcome of the service at all.
    pub fn is_service_failure(&self) -> bool {
        match self {
            Self::Status { status, .. } => {
                !status.is_client_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            Self::CircuitOpen { .. } => false,
            Self::Timeout { .. }
            | Self::Unavailable { .. }
            | Self::TooLarge { .. }
            | Self::Decode { .. } => true,
        }
    }

    /// Builds [`RecommendationError::Unavailable`] from a transport error, naming the most
    /// specific cause found in its chain.
    pub(crate) fn unavailable(source: impl Into<BoxError>) -> Self {
        let source = source.into();
        Self::Unavailable {
            reason: describe_transport_error(&*source),
            source,
        }
    }
}

/// The stable short label of a [`RecommendationError`], for metrics labels and load reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// [`RecommendationError::Timeout`]: `timeout`.
    Timeout,
    /// [`RecommendationError::Unavailable`]: `unavailable`.
    Unavailable,
    /// [`RecommendationError::Status`]: `status`.
    Status,
    /// [`RecommendationError::TooLarge`]: `too_large`.
    TooLarge,
    /// [`RecommendationError::Decode`]: `decode`.
    Decode,
    /// [`RecommendationError::CircuitOpen`]: `circuit_open`.
    CircuitOpen,
}

impl ErrorKind {
    /// Every kind, in a fixed order, so metrics can be registered up front.
    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::Timeout,
        ErrorKind::Unavailable,
        ErrorKind::Status,
        ErrorKind::TooLarge,
        ErrorKind::Decode,
        ErrorKind::CircuitOpen,
    ];

    /// The label: `timeout`, `unavailable`, `status`, `too_large`, `decode` or `circuit_open`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Status => "status",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Decode => "decode",
            ErrorKind::CircuitOpen => "circuit_open",
        }
    }

    /// The position of this kind in [`ErrorKind::ALL`].
    pub(crate) const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a [`RecommendationClient`](crate::RecommendationClient) could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `base_url` is not an `http://host[:port][/prefix]` URL.
    #[error("invalid recommendations.base_url {url:?}: {reason}")]
    BaseUrl {
        /// The configured value.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A numeric setting is out of range.
    #[error("invalid recommendations.{field}: {reason}")]
    Value {
        /// The setting, e.g. `breaker.failure_threshold`.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Formats a duration for people: `250ms`, `5s`, `1.5s`.
struct DisplayDuration(Duration);

impl fmt::Display for DisplayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.0.as_millis();
        if millis < 1000 {
            write!(f, "{millis}ms")
        } else if millis.is_multiple_of(1000) {
            write!(f, "{}s", millis / 1000)
        } else {
            write!(f, "{:.1}s", self.0.as_secs_f64())
        }
    }
}

fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

fn body_suffix(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

/// The longest body excerpt kept in [`RecommendationError::Status`], in characters.
pub(crate) const BODY_EXCERPT_CHARS: usize = 200;

/// Turns the start of an error body into one printable line of at most
/// [`BODY_EXCERPT_CHARS`] characters: invalid UTF-8 is replaced, control characters and runs of
/// whitespace become one space, and a cut is marked with `…`.
pub(crate) fn one_line_excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len().min(BODY_EXCERPT_CHARS + 3));
    let mut chars = 0;
    let mut pending_space = false;
    for c in text.chars() {
        if c.is_whitespace() || c.is_control() {
            pending_space = !out.is_empty();
            continue;
        }
        if chars + usize::from(pending_space) >= BODY_EXCERPT_CHARS {
            out.push('…');
            return out;
        }
        if pending_space {
            out.push(' ');
            chars += 1;
            pending_space = false;
        }
        out.push(c);
        chars += 1;
    }
    out
}

/// Names the most useful cause in a transport error's chain, in words an end user can follow.
fn describe_transport_error(error: &(dyn StdError + 'static)) -> &'static str {
    let mut connect = false;
    let mut incomplete = false;
    let mut cause: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<io::Error>() {
            return match io.kind() {
                io::ErrorKind::ConnectionRefused => "connection refused",
                io::ErrorKind::ConnectionReset => "connection reset",
                io::ErrorKind::ConnectionAborted => "connection aborted",
                io::ErrorKind::TimedOut => "connection timed out",
                io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof => "connection closed",
                io::ErrorKind::AddrNotAvailable | io::ErrorKind::AddrInUse => {
                    "no local address available"
                }
                _ if connect => "could not connect",
                _ => "network error",
            };
        }
        if let Some(client) = current.downcast_ref::<hyper_util::client::legacy::Error>() {
            connect |= client.is_connect();
        }
        if let Some(hyper) = current.downcast_ref::<hyper::Error>() {
            if hyper.is_incomplete_message() {
                incomplete = true;
            } else if hyper.is_parse() || hyper.is_parse_status() {
                return "invalid HTTP response";
            } else if hyper.is_timeout() {
                return "connection timed out";
            }
        }
        cause = current.source();
    }
    if incomplete {
        "connection closed before a complete response"
    } else if connect {
        "could not connect"
    } else {
        "request failed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_have_stable_labels_in_a_fixed_order() {
        let labels: Vec<&str> = ErrorKind::ALL.iter().map(|kind| kind.as_str()).collect();
        assert_eq!(
            labels,
            [
                "timeout",
                "unavailable",
                "status",
                "too_large",
                "decode",
                "circuit_open"
            ]
        );
        for (index, kind) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(kind.index(), index);
            assert_eq!(kind.to_string(), kind.as_str());
        }
    }

    #[test]
    fn messages_are_single_readable_lines() {
        let decode = serde_json::from_slice::<serde_json::Value>(b"{\"items\": [").unwrap_err();
        let cases = [
            (
                RecommendationError::Timeout {
                    after: Duration::from_millis(250),
                },
                "recommendation service did not answer within 250ms",
            ),
            (
                RecommendationError::Timeout {
                    after: Duration::from_millis(1500),
                },
                "recommendation service did not answer within 1.5s",
            ),
            (
                RecommendationError::unavailable(io::Error::from(io::ErrorKind::ConnectionRefused)),
                "recommendation service unavailable: connection refused",
            ),
            (
                RecommendationError::Status {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    body: "{\"error\":\"overloaded\"}".to_owned(),
                },
                "recommendation service answered 503 Service Unavailable: {\"error\":\"overloaded\"}",
            ),
            (
                RecommendationError::Status {
                    status: StatusCode::from_u16(599).unwrap(),
                    body: String::new(),
                },
                "recommendation service answered 599",
            ),
            (
                RecommendationError::TooLarge { limit: 1024 },
                "recommendation service sent a response larger than the 1024-byte limit",
            ),
            (
                RecommendationError::Decode { source: decode },
                "recommendation service sent an invalid response: EOF while parsing a list at line 1 column 11",
            ),
            (
                RecommendationError::CircuitOpen {
                    retry_in: Duration::from_secs(3),
                },
                "recommendation service temporarily skipped after repeated failures",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
            assert!(!message.contains('\n'));
        }
    }

    #[test]
    fn only_service_side_outcomes_count_as_failures() {
        let status = |code| RecommendationError::Status {
            status: StatusCode::from_u16(code).unwrap(),
            body: String::new(),
        };
        assert!(status(500).is_service_failure());
        assert!(status(503).is_service_failure());
        assert!(status(429).is_service_failure());
        assert!(!status(404).is_service_failure());
        assert!(!status(400).is_service_failure());
        assert!(
            !RecommendationError::CircuitOpen {
                retry_in: Duration::ZERO
            }
            .is_service_failure()
        );
        assert!(RecommendationError::TooLarge { limit: 1 }.is_service_failure());
    }

    #[test]
    fn excerpts_are_one_bounded_line() {
        assert_eq!(
            one_line_excerpt(b"  plain  text \r\n\tmore\n"),
            "plain text more"
        );
        assert_eq!(one_line_excerpt(b"bad \xff byte"), "bad \u{fffd} byte");
        let long = "a".repeat(500);
        let excerpt = one_line_excerpt(long.as_bytes());
        assert_eq!(excerpt.chars().count(), BODY_EXCERPT_CHARS + 1);
        assert!(excerpt.ends_with('…'));
        assert_eq!(one_line_excerpt(b""), "");
        let exact = "b".repeat(BODY_EXCERPT_CHARS);
        assert_eq!(one_line_excerpt(exact.as_bytes()), exact);
    }
}
