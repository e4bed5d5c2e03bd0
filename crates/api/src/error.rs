//! The API's one error type and the JSON error body every failure answers with.
//!
//! Every error, including actix's own extractor failures (malformed JSON, wrong content type,
//! body too large, unknown route, wrong method), is sent as
//! `{"status":"error","error":{"code":"...","message":"..."}}` with the matching status code. The
//! message says what the client can do about it; internals (SQL, driver messages, stack traces)
//! are logged with the request id and never sent.

use actix_web::error::{JsonPayloadError, PathError, PayloadError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use serde::Serialize;

/// A failed request: status, stable code, and a message fit for the client.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u32>,
    /// `WWW-Authenticate` of a 401 or 403.
    challenge: Option<String>,
}

/// The body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Always `"error"`.
    #[schema(example = "error")]
    pub status: &'static str,
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The machine-readable code and the human-readable message of an error.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable code: `invalid_user_id`, `invalid_batch`, `invalid_json`, `payload_too_large`,
    /// `request_timeout`, `unsupported_media_type`, `not_found`, `user_not_found`,
    /// `method_not_allowed`, `unauthorized`, `forbidden`, `rate_limited`, `unavailable`,
    /// `deadline_exceeded`, `internal`.
    pub code: String,
    /// One sentence for a human.
    pub message: String,
}

/// The longest message sent, in bytes. A parser's message can quote the client's input (an
/// unknown field's name, say), which may be as long as the body; an echo is cut here.
pub const MAX_MESSAGE: usize = 300;

impl ApiError {
    /// An error with any status, code and message (cut to [`MAX_MESSAGE`] bytes, with `…`).
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE - '…'.len_utf8();
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        Self {
            status,
            code,
            message,
            retry_after: None,
            challenge: None,
        }
    }

    /// The same error with a `WWW-Authenticate` challenge.
    #[must_use]
    pub fn with_challenge(mut self, challenge: String) -> Self {
        self.challenge = Some(challenge);
        self
    }

    /// 429: the client is over its rate; it may retry after `retry_after` seconds.
    pub fn too_many_requests(retry_after: u32) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests from this client; retry after the time in Retry-After",
            )
        }
    }

    /// 400: the request is malformed in a way the code names.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 for a route that does not exist.
    pub fn route_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such endpoint; see /openapi.json",
        )
    }

    /// 503: a dependency is unavailable; the client may retry after `retry_after` seconds.
    pub fn unavailable(message: impl Into<String>, retry_after: u32) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }

    /// 499 (nginx's "client closed request"): the client went away (or half-closed its side)
    /// before the answer was ready, so the work was cancelled. It is sent in case the client only
    /// half-closed; mostly it exists for logs and metrics.
    pub fn client_closed() -> Self {
        Self::new(
            StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            "client_closed_request",
            "the client closed the connection before the answer was ready",
        )
    }

    /// 500 for a bug; the details go to the log, not to the client.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; it has been logged",
        )
    }

    /// The stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The client-facing message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(seconds) = self.retry_after {
            response.insert_header((header::RETRY_AFTER, HeaderValue::from(seconds)));
        }
        if let Some(challenge) = &self.challenge {
            response.insert_header((
                header::WWW_AUTHENTICATE,
                crate::auth::challenge_value(challenge),
            ));
        }
        response.json(ErrorBody {
            status: "error",
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message.clone(),
            },
        })
    }
}

/// Maps actix's JSON extractor failures onto the JSON error shape.
pub fn json_error(error: JsonPayloadError, _request: &HttpRequest) -> actix_web::Error {
    let api = match &error {
        JsonPayloadError::OverflowKnownLength { limit, .. }
        | JsonPayloadError::Overflow { limit } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {limit} bytes"),
        ),
        JsonPayloadError::Payload(PayloadError::Io(e))
            if e.kind() == std::io::ErrorKind::TimedOut =>
        {
            return request_timeout(error);
        }
        JsonPayloadError::ContentType => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the request body must be JSON (Content-Type: application/json)",
        ),
        JsonPayloadError::Deserialize(e) if e.is_data() => ApiError::bad_request(
            "invalid_batch",
            format!("the request body is not valid: {e}"),
        ),
        JsonPayloadError::Deserialize(e) => ApiError::bad_request(
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        ),
        _ => ApiError::bad_request("invalid_body", "the request body could not be read"),
    };
    actix_web::error::InternalError::from_response(error, api.error_response()).into()
}

/// 408 for a body that did not arrive within the request timeout (see [`crate::middleware`]).
/// The rest of the body may still be on its way, so the connection is closed rather than read on.
fn request_timeout(error: JsonPayloadError) -> actix_web::Error {
    let mut response = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        "the request body was not received in time",
    )
    .error_response();
    response
        .head_mut()
        .set_connection_type(actix_web::http::ConnectionType::Close);
    actix_web::error::InternalError::from_response(error, response).into()
}

/// Maps actix's path extractor failures onto the JSON error shape.
pub fn path_error(error: PathError, _request: &HttpRequest) -> actix_web::Error {
    let api = ApiError::bad_request("invalid_path", "a path parameter could not be parsed");
    actix_web::error::InternalError::from_response(error, api.error_response()).into()
}

/// Maps actix's query-string extractor failures onto the JSON error shape.
pub fn query_error(error: QueryPayloadError, _request: &HttpRequest) -> actix_web::Error {
    let api = ApiError::bad_request("invalid_query", "the query string could not be parsed");
    actix_web::error::InternalError::from_response(error, api.error_response()).into()
}

/// The handler behind every unknown route.
pub async fn not_found() -> HttpResponse {
    ApiError::route_not_found().error_response()
}

/// The answer to a known route called with a method it does not take; `allow` lists the methods
/// it does take, for the `Allow` header (RFC 9110 section 15.5.6).
pub async fn method_not_allowed(allow: &'static str) -> HttpResponse {
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method; see /openapi.json",
    )
    .error_response();
    response.headers_mut().insert(
        actix_web::http::header::ALLOW,
        actix_web::http::header::HeaderValue::from_static(allow),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_that_echoes_long_input_is_cut() {
        let long = format!("unknown field `{}`", "é".repeat(5_000));
        let error = ApiError::bad_request("invalid_batch", long);
        assert!(error.message().len() <= MAX_MESSAGE);
        assert!(error.message().ends_with('…'));
        let short = ApiError::bad_request("invalid_batch", "unknown field `x`");
        assert_eq!(short.message(), "unknown field `x`");
    }
}
