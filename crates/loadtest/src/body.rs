//! What the generator looks for inside answers, because it knows this service.
//!
//! A dashboard answer can be a 200 that still lacks a source: its `data.errors` lists them as
//! `{"source": "recommendations", "kind": "timeout", "error": "..."}`. A batch answer lists per-id
//! failures in `data.errors`. Error answers carry `{"error": {"code": "...", ...}}`. Only those
//! fields are decoded; the rest of the body is skipped without allocating, and strings are
//! borrowed from the body unless they contain escapes.

use std::borrow::Cow;

use serde::Deserialize;

use crate::{RequestKind, stats::is_success};

/// What an answer's body said, borrowed from the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Findings<'a> {
    /// Nothing to count (a plain success, or a body the generator does not inspect).
    Nothing,
    /// A dashboard answer and the sources it lacks (possibly none).
    Sources(Vec<SourceError<'a>>),
    /// A batch answer and its per-id failures (possibly none).
    BatchIds(Vec<IdError<'a>>),
    /// An error answer's `error.code`, or a placeholder when the body has none.
    ErrorCode(Cow<'a, str>),
    /// A successful answer whose body is not the expected JSON.
    Undecodable,
}

/// One missing source in a dashboard answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct SourceError<'a> {
    /// Which source failed, e.g. `recommendations`.
    #[serde(borrow)]
    pub source: Cow<'a, str>,
    /// The failure's kind, e.g. `timeout`.
    #[serde(default)]
    pub kind: Option<Cow<'a, str>>,
    /// The failure as text.
    #[serde(default)]
    pub error: Option<Cow<'a, str>>,
}

impl SourceError<'_> {
    /// The kind to count it under: `kind`, or the error text when the kind is absent.
    pub(crate) fn kind(&self) -> &str {
        self.kind
            .as_deref()
            .or(self.error.as_deref())
            .unwrap_or("(unspecified)")
    }
}

/// One failed id in a batch answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct IdError<'a> {
    /// The failure's kind, e.g. `not_found`.
    #[serde(default)]
    pub kind: Option<Cow<'a, str>>,
    /// The error text.
    #[serde(default)]
    pub error: Option<Cow<'a, str>>,
}

impl IdError<'_> {
    /// What to count it under: `kind`, or the error text when the kind is absent.
    pub(crate) fn text(&self) -> &str {
        self.kind
            .as_deref()
            .or(self.error.as_deref())
            .unwrap_or("(unspecified)")
    }
}

#[derive(Deserialize)]
struct DashboardEnvelope<'a> {
    #[serde(borrow)]
    data: DashboardData<'a>,
}

#[derive(Deserialize)]
struct DashboardData<'a> {
    #[serde(borrow, default)]
    errors: Vec<SourceError<'a>>,
}

#[derive(Deserialize)]
struct BatchEnvelope<'a> {
    #[serde(borrow)]
    data: BatchData<'a>,
}

#[derive(Deserialize)]
struct BatchData<'a> {
    #[serde(borrow, default)]
    errors: Vec<IdError<'a>>,
}

#[derive(Deserialize)]
struct ErrorEnvelope<'a> {
    #[serde(borrow)]
    error: ApiError<'a>,
}

#[derive(Deserialize)]
struct ApiError<'a> {
    #[serde(borrow)]
    code: Cow<'a, str>,
}

/// Reads what matters out of an answer to a request of `kind`.
pub(crate) fn inspect(kind: RequestKind, status: u16, body: &[u8]) -> Findings<'_> {
    if !is_success(status) {
        return match serde_json::from_slice::<ErrorEnvelope<'_>>(body) {
            Ok(envelope) => Findings::ErrorCode(envelope.error.code),
            Err(_) => Findings::ErrorCode(Cow::Borrowed("(no error code)")),
        };
    }
    match kind {
        RequestKind::Recommendations => Findings::Nothing,
        RequestKind::Dashboard => match serde_json::from_slice::<DashboardEnvelope<'_>>(body) {
            Ok(envelope) => Findings::Sources(envelope.data.errors),
            Err(_) => Findings::Undecodable,
        },
        RequestKind::Batch => match serde_json::from_slice::<BatchEnvelope<'_>>(body) {
            Ok(envelope) => Findings::BatchIds(envelope.data.errors),
            Err(_) => Findings::Undecodable,
        },
    }
}

/// Whether the generator reads the body of an answer to `kind` with `status`; other bodies are
/// counted and dropped unread.
pub(crate) fn wants_body(kind: RequestKind, status: u16) -> bool {
    kind != RequestKind::Recommendations || !is_success(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dashboard_source_errors_fall_back_to_the_error_text() {
        let body = br#"{"status":"success","data":{"profile":{"id":1,"name":"A \"quoted\" name"},
            "orders":[{"id":1,"total":"9.50"}],"reviews":[],"recommendations":[],
            "errors":[{"source":"recommendations","kind":"timeout","error":"timed out after 250ms"},
                      {"source":"reviews","error":"pool \"exhausted\""}]}}"#;
        let Findings::Sources(errors) = inspect(RequestKind::Dashboard, 200, body) else {
            panic!("not a dashboard finding");
        };
        let kinds: Vec<(&str, &str)> = errors.iter().map(|e| (&*e.source, e.kind())).collect();
        assert_eq!(
            kinds,
            [
                ("recommendations", "timeout"),
                ("reviews", "pool \"exhausted\"")
            ]
        );
        // Unescaped strings are borrowed from the body, escaped ones owned.
        assert!(matches!(errors[0].source, Cow::Borrowed(_)));
    }

    #[test]
    fn complete_dashboards_have_no_errors() {
        let body = br#"{"status":"success","data":{"profile":{},"orders":[],"reviews":[],"recommendations":[]}}"#;
        assert_eq!(
            inspect(RequestKind::Dashboard, 200, body),
            Findings::Sources(vec![])
        );
        assert_eq!(
            inspect(RequestKind::Dashboard, 200, b"<html>"),
            Findings::Undecodable
        );
        assert_eq!(
            inspect(RequestKind::Dashboard, 200, br#"{"status":"success"}"#),
            Findings::Undecodable
        );
    }

    #[test]
    fn batch_id_errors_are_listed() {
        let body = br#"{"status":"success","data":{"results":[{"user_id":2}],
            "errors":[{"user_id":1,"error":"user not found"},{"user_id":3,"kind":"not_found","error":"user not found"}]}}"#;
        let Findings::BatchIds(errors) = inspect(RequestKind::Batch, 200, body) else {
            panic!("not a batch finding");
        };
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].text(), "user not found");
        assert_eq!(errors[1].text(), "not_found");
    }

    #[test]
    fn error_answers_give_their_code() {
        let body = br#"{"status":"error","error":{"code":"not_found","message":"no user 7"}}"#;
        assert_eq!(
            inspect(RequestKind::Dashboard, 404, body),
            Findings::ErrorCode(Cow::Borrowed("not_found"))
        );
        assert_eq!(
            inspect(RequestKind::Batch, 503, b"Service Unavailable"),
            Findings::ErrorCode(Cow::Borrowed("(no error code)"))
        );
        assert_eq!(
            inspect(RequestKind::Recommendations, 200, b"[1,2,3]"),
            Findings::Nothing
        );
        assert!(!wants_body(RequestKind::Recommendations, 200));
        assert!(wants_body(RequestKind::Recommendations, 500));
        assert!(wants_body(RequestKind::Dashboard, 200));
    }
}
