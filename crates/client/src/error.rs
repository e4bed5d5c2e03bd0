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
    /// caller's deadline if that came first). The request had been sent, and `queued` says how
    /// much of the budget went by before it could be; the one exception is a caller's deadline
    /// that had already passed when the call started, which sends nothing and has a zero `after`.
    #[error(
        "recommendation service did not answer within {}{}",
        DisplayDuration(*.after),
        queued_suffix(*.queued)
    )]
    Timeout {
        /// The budget the call had.
        after: Duration,
        /// How much of `after` the call spent waiting for a free in-flight slot in this client
        /// before its request was sent; the service had the rest.
        queued: Duration,
    },
    /// The call's whole budget went by waiting for a free in-flight slot in this client
    /// (`max_in_flight` requests were already out), so no request was sent. This is about this
    /// process's load, not the service's health.
    #[error(
        "recommendation client saturated: no connection slot within {}",
        DisplayDuration(*.after)
    )]
    Saturated {
        /// The budget the call had, all of it spent waiting.
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
            Self::Saturated { .. } => ErrorKind::Saturated,
            Self::Unavailable { .. } => ErrorKind::Unavailable,
            Self::Status { .. } => ErrorKind::Status,
            Self::TooLarge { .. } => ErrorKind::TooLarge,
            Self::Decode { .. } => ErrorKind::Decode,
            Self::CircuitOpen { .. } => ErrorKind::CircuitOpen,
        }
    }

    /// Whether this outcome says the service is unhealthy, and so counts towards opening the
    /// circuit.
    ///
    /// Only what the service did, or failed to do with the time it was given, counts:
    ///
    /// - a 4xx answer (other than 429) is about the request, not the service;
    /// - a circuit rejection, and a call that never got an in-flight slot
    ///   ([`Saturated`](Self::Saturated)), never reached the service at all;
    /// - a [`Timeout`](Self::Timeout) counts only if the service had more than half of the call's
    ///   budget, i.e. the call queued here for less than half of it. A call that queued for most
    ///   of its budget and then timed out says more about this client's queue than about the
    ///   service: under a sustained overload the FIFO queue hands slots to calls near their
    ///   deadline, and counting their timeouts would open the circuit on a healthy service. Calls
    ///   that are sent promptly (the normal case, and every call while the service hangs) count
    ///   in full.
    ///
    /// A timeout set by the caller's deadline counts like one set by the configured timeout, even
    /// when it is much shorter: the deadline is how long an answer is worth waiting for, and the
    /// service's dashboard passes its per-source timeout (by default 1 s, against the client's
    /// 5 s) so that a hanging service opens the circuit. A deadline already past when the call
    /// starts sends nothing and is not counted.
    pub fn is_service_failure(&self) -> bool {
        match self {
            Self::Status { status, .. } => {
                !status.is_client_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            Self::Timeout { after, queued } => *queued < after.saturating_sub(*queued),
            Self::CircuitOpen { .. } | Self::Saturated { .. } => false,
            Self::Unavailable { .. } | Self::TooLarge { .. } | Self::Decode { .. } => true,
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
    /// [`RecommendationError::Saturated`]: `saturated`.
    Saturated,
}

impl ErrorKind {
    /// Every kind, in a fixed order, so metrics can be registered up front. New kinds are added
    /// at the end, so existing positions never move.
    pub const ALL: [ErrorKind; 7] = [
        ErrorKind::Timeout,
        ErrorKind::Unavailable,
        ErrorKind::Status,
        ErrorKind::TooLarge,
        ErrorKind::Decode,
        ErrorKind::CircuitOpen,
        ErrorKind::Saturated,
    ];

    /// The label: `timeout`, `unavailable`, `status`, `too_large`, `decode`, `circuit_open` or
    /// `saturated`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Status => "status",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Decode => "decode",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::Saturated => "saturated",
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

/// Says how much of a timed-out call's budget went by before its request was sent, when any
/// noticeable part did: a message that only named the budget would overstate how long the service
/// had.
fn queued_suffix(queued: Duration) -> String {
    if queued.as_millis() == 0 {
        String::new()
    } else {
        format!(
            " ({} of it waiting for a connection slot)",
            DisplayDuration(queued)
        )
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
                "circuit_open",
                "saturated"
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
                    queued: Duration::ZERO,
                },
                "recommendation service did not answer within 250ms",
            ),
            (
                RecommendationError::Timeout {
                    after: Duration::from_millis(1500),
                    queued: Duration::from_micros(999),
                },
                "recommendation service did not answer within 1.5s",
            ),
            (
                RecommendationError::Timeout {
                    after: Duration::from_millis(300),
                    queued: Duration::from_millis(200),
                },
                "recommendation service did not answer within 300ms (200ms of it waiting for a connection slot)",
            ),
            (
                RecommendationError::Saturated {
                    after: Duration::from_millis(300),
                },
                "recommendation client saturated: no connection slot within 300ms",
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
        assert!(
            !RecommendationError::Saturated {
                after: Duration::from_secs(5)
            }
            .is_service_failure()
        );
    }

    #[test]
    fn a_timeout_counts_only_if_the_service_had_most_of_the_budget() {
        let timeout = |after: u64, queued: u64| RecommendationError::Timeout {
            after: Duration::from_millis(after),
            queued: Duration::from_millis(queued),
        };
        assert!(timeout(5000, 0).is_service_failure());
        assert!(timeout(300, 149).is_service_failure());
        // Half the budget spent queueing is not enough to judge the service on.
        assert!(!timeout(300, 150).is_service_failure());
        assert!(!timeout(300, 200).is_service_failure());
        assert!(!timeout(300, 300).is_service_failure());
        // A budget already spent before the call started: nothing was sent.
        assert!(!timeout(0, 0).is_service_failure());
        // However short the caller's deadline, a request that went out promptly counts.
        assert!(timeout(10, 0).is_service_failure());
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
