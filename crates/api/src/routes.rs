//! The HTTP handlers: the dashboard and batch routes and the operational endpoints. Each handler
//! parses its input into the service's types, calls the service, and maps the typed answer to a
//! status and a JSON body; no decision about the data is made here.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_TYPE, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};
use service::{BatchError, DashboardError, ErrorKind, SourceFailure, SourceTiming, UserId};

use crate::AppState;
use crate::disconnect::unless_disconnected;
use crate::error::ApiError;

/// How long `/readyz` waits for the database.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// The envelope of every successful response: `{"status":"success","data":...}`.
#[derive(Debug, Serialize)]
pub struct Success<T> {
    /// Always `"success"`.
    pub status: &'static str,
    /// The payload.
    pub data: T,
}

impl<T: Serialize> Success<T> {
    fn response(data: T) -> HttpResponse {
        HttpResponse::Ok().json(Success {
            status: "success",
            data,
        })
    }
}

/// The body of `POST /api/users/batch`: a JSON object, and only that (serde's derived
/// implementation would also take `[[1, 2]]`, and name this type in its error messages).
#[derive(Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"user_ids": [1, 2, 3]}))]
pub struct BatchRequest {
    /// 1 to 1000 positive user ids; duplicates are summarised once.
    #[schema(min_items = 1, max_items = 1000)]
    pub user_ids: Vec<UserId>,
}

impl<'de> Deserialize<'de> for BatchRequest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            user_ids: Vec<UserId>,
        }

        struct Object;

        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = BatchRequest;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(r#"an object {"user_ids": [...]}"#)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                let fields =
                    Fields::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(BatchRequest {
                    user_ids: fields.user_ids,
                })
            }
        }

        deserializer.deserialize_map(Object)
    }
}

/// Parses a user id from the path: its one canonical spelling (see [`UserId`]).
fn parse_user_id(text: &str) -> Result<UserId, ApiError> {
    text.parse().map_err(|e: service::InvalidUserId| {
        ApiError::bad_request("invalid_user_id", e.to_string())
    })
}

/// `Server-Timing`: each source's duration and outcome, which browsers' developer tools draw.
///
/// Durations are written with integer arithmetic (milliseconds with two decimals from the
/// microseconds): formatting four `f64`s was about 6 000 instructions per dashboard, most of
/// what this header cost (callgrind, `cargo xtask bench overhead --callgrind`).
fn server_timing(timings: &[SourceTiming]) -> Option<HeaderValue> {
    let mut value = String::with_capacity(160);
    let mut number = itoa::Buffer::new();
    for (i, timing) in timings.iter().enumerate() {
        if i > 0 {
            value.push_str(", ");
        }
        // Rounded to the hundredth of a millisecond, as `{:.2}` would.
        let hundredths = (timing.elapsed.as_micros() + 5) / 10;
        value.push_str(timing.source.as_str());
        value.push_str(";dur=");
        value.push_str(number.format(hundredths / 100));
        value.push('.');
        let fraction = hundredths % 100;
        if fraction < 10 {
            value.push('0');
        }
        value.push_str(number.format(fraction));
        value.push_str(";desc=\"");
        value.push_str(timing.status.as_str());
        value.push('"');
    }
    HeaderValue::from_str(&value).ok()
}

/// The 503 a failed essential source answers with, without internals.
fn profile_unavailable(errors: &[SourceFailure]) -> ApiError {
    let message = match errors.first().map(|e| e.kind) {
        Some(ErrorKind::Busy | ErrorKind::PoolTimeout) => "the database is busy; retry shortly",
        Some(ErrorKind::Timeout) => "the user's profile took too long to read; retry shortly",
        _ => "the user's profile cannot be read right now; retry shortly",
    };
    ApiError::unavailable(message, 1)
}

/// `GET /api/users/{user_id}/dashboard`: the user's profile, orders, reviews and
/// recommendations, fetched at once.
#[utoipa::path(
    get,
    path = "/api/users/{user_id}/dashboard",
    tag = "dashboard",
    params(("user_id" = UserId, Path, description = "A positive 64-bit user id, in plain decimal digits without leading zeros")),
    responses(
        (status = 200, description = "The dashboard; `errors` lists sources that failed (the rest is still there)", body = crate::openapi::DashboardEnvelope,
         headers(("Server-Timing" = String, description = "Each source's duration (ms) and outcome"))),
        (status = 400, description = "user_id is not a positive 64-bit integer", body = crate::error::ErrorBody),
        (status = 404, description = "No such user", body = crate::error::ErrorBody),
        (status = 503, description = "The profile cannot be read right now", body = crate::error::ErrorBody,
         headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
        (status = 504, description = "The deadline passed before the profile was known", body = crate::error::ErrorBody),
        (status = 500, description = "A bug (logged with the request id)", body = crate::error::ErrorBody),
    )
)]
pub async fn dashboard(
    request: HttpRequest,
    state: web::Data<AppState>,
    user_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user_id = parse_user_id(&user_id)?;
    let Some(result) = unless_disconnected(&request, state.service.dashboard(user_id)).await else {
        return Err(ApiError::client_closed());
    };
    let (timings, errors) = match &result {
        Ok(dashboard) => (&dashboard.timings[..], &dashboard.errors[..]),
        Err(error) => (error.timings(), error.errors()),
    };
    state.metrics.observe_dashboard(timings, errors);
    let timing = server_timing(timings);
    let mut response = match result {
        Ok(dashboard) => Success::response(dashboard),
        Err(DashboardError::NotFound { user_id, .. }) => {
            actix_web::ResponseError::error_response(&ApiError::new(
                StatusCode::NOT_FOUND,
                "user_not_found",
                format!("user {user_id} does not exist"),
            ))
        }
        Err(DashboardError::Unavailable { errors, .. }) => {
            tracing::warn!(%user_id, ?errors, "dashboard unavailable");
            actix_web::ResponseError::error_response(&profile_unavailable(&errors))
        }
        Err(DashboardError::DeadlineExceeded { errors, .. }) => {
            tracing::warn!(%user_id, ?errors, "dashboard deadline exceeded");
            actix_web::ResponseError::error_response(&ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "deadline_exceeded",
                "the dashboard's deadline passed before the user's profile was read",
            ))
        }
        Err(DashboardError::Internal { message, .. }) => {
            tracing::error!(%user_id, %message, "dashboard failed");
            actix_web::ResponseError::error_response(&ApiError::internal())
        }
    };
    if let Some(timing) = timing {
        response.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static("server-timing"),
            timing,
        );
    }
    Ok(response)
}

/// `POST /api/users/batch`: profile and order summary for up to 1000 users.
#[utoipa::path(
    post,
    path = "/api/users/batch",
    tag = "batch",
    request_body(content = BatchRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "Summaries in input order (each id once); ids that could not be summarised are in `errors`", body = crate::openapi::BatchEnvelope),
        (status = 400, description = "Malformed JSON, or user_ids is not 1 to 1000 positive integers", body = crate::error::ErrorBody),
        (status = 408, description = "The body did not arrive within the request timeout", body = crate::error::ErrorBody),
        (status = 413, description = "The body is larger than 64 KiB", body = crate::error::ErrorBody),
        (status = 415, description = "The body is not application/json", body = crate::error::ErrorBody),
        (status = 503, description = "The database is unavailable, or so busy that no user could be summarised", body = crate::error::ErrorBody,
         headers(("Retry-After" = u32, description = "Seconds to wait before retrying"))),
        (status = 504, description = "The batch's deadline passed", body = crate::error::ErrorBody),
        (status = 500, description = "A bug (logged with the request id)", body = crate::error::ErrorBody),
    )
)]
pub async fn batch(
    request: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<BatchRequest>,
) -> Result<HttpResponse, ApiError> {
    let Some(result) = unless_disconnected(&request, state.service.summaries(&body.user_ids)).await
    else {
        return Err(ApiError::client_closed());
    };
    match result {
        Ok(summary) => Ok(Success::response(summary)),
        Err(BatchError::Overloaded) => Err(ApiError::unavailable(
            "the database is busy: no user could be summarised; retry shortly",
            1,
        )),
        Err(BatchError::Invalid(message)) => Err(ApiError::bad_request("invalid_batch", message)),
        Err(BatchError::Unavailable(cause)) => {
            tracing::warn!(%cause, "batch failed: database unavailable");
            Err(ApiError::unavailable(
                "the database is unavailable; retry shortly",
                1,
            ))
        }
        Err(BatchError::DeadlineExceeded) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "deadline_exceeded",
            "the batch's deadline passed; ask for fewer ids",
        )),
        Err(BatchError::Internal(message)) => {
            tracing::error!(%message, "batch failed");
            Err(ApiError::internal())
        }
    }
}

/// Liveness and readiness answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok` (alive) or `ready` (dependencies answer).
    pub status: &'static str,
    /// Readiness only: each database and whether reads can use it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub databases: Vec<DatabaseReport>,
}

/// One database in a readiness answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DatabaseReport {
    /// `primary`, or `replica-N` for the N-th of `database.replica_urls`.
    #[schema(example = "replica-1")]
    pub name: String,
    /// `primary` or `replica`.
    #[schema(example = "replica")]
    pub role: &'static str,
    /// `up`, `lagging` (a replica too far behind: skipped), `down`, or `unchecked`.
    #[schema(example = "up")]
    pub reach: &'static str,
    /// A replica's replay lag at its last check, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_ms: Option<u64>,
}

impl From<&service::DatabaseState> for DatabaseReport {
    fn from(state: &service::DatabaseState) -> Self {
        Self {
            name: state.name.clone(),
            role: state.role.as_str(),
            reach: state.reach.as_str(),
            lag_ms: state.lag_ms,
        }
    }
}

/// `GET /healthz`: the process is alive and serving.
#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = Health))
)]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health {
        status: "ok",
        databases: Vec::new(),
    })
}

/// `GET /readyz`: the database answers, so requests can be served.
#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "The database does not answer", body = crate::error::ErrorBody),
    )
)]
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    match state.service.readiness(READY_TIMEOUT).await {
        Ok(databases) => Ok(HttpResponse::Ok().json(Health {
            status: "ready",
            databases: databases.iter().map(DatabaseReport::from).collect(),
        })),
        Err(not_ready) => {
            tracing::warn!(%not_ready, "not ready");
            Err(ApiError::unavailable("the database does not answer", 1))
        }
    }
}

/// `GET /metrics`: Prometheus metrics in the OpenMetrics text format.
#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Metrics", content_type = "application/openmetrics-text", body = String))
)]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let text = state.metrics.render(&state.service, state.in_flight.get());
    HttpResponse::Ok()
        .insert_header((
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ))
        .body(text)
}

/// `GET /openapi.json`: this API described in OpenAPI 3.1.
#[utoipa::path(
    get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object))
)]
pub async fn openapi(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(state.openapi.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_positive_plain_integers() {
        assert_eq!(parse_user_id("42").unwrap().get(), 42);
        assert_eq!(parse_user_id("9223372036854775807").unwrap(), UserId::MAX);
        for bad in [
            "",
            "0",
            "-1",
            "+1",
            "abc",
            "1.5",
            " 1",
            "1e3",
            "99999999999999999999",
            "9223372036854775808",
            "０",
            "1 ",
            "01",
            "007",
            "00000000000000000000000000000001",
        ] {
            let err = parse_user_id(bad).unwrap_err();
            assert_eq!(err.code(), "invalid_user_id", "{bad:?}");
        }
    }

    #[test]
    fn a_batch_body_is_an_object_with_user_ids_only() {
        let parse = |text: &str| serde_json::from_str::<BatchRequest>(text);
        let ids: Vec<i64> = parse(r#"{"user_ids":[1,2]}"#)
            .unwrap()
            .user_ids
            .into_iter()
            .map(UserId::get)
            .collect();
        assert_eq!(ids, [1, 2]);
        for (text, expected) in [
            (
                "[[1]]",
                r#"invalid type: sequence, expected an object {"user_ids": [...]}"#,
            ),
            (
                "[]",
                r#"invalid type: sequence, expected an object {"user_ids": [...]}"#,
            ),
            ("{}", "missing field `user_ids`"),
            (
                r#"{"user_ids":[1],"x":1}"#,
                "unknown field `x`, expected `user_ids`",
            ),
        ] {
            let message = parse(text).unwrap_err().to_string();
            assert!(message.starts_with(expected), "{text}: {message}");
            assert!(!message.contains("BatchRequest"), "{text}: {message}");
        }
    }

    #[test]
    fn server_timing_lists_every_source() {
        let timings = [
            SourceTiming {
                source: service::Source::Profile,
                elapsed: Duration::from_micros(1500),
                status: service::SourceStatus::Ok,
            },
            SourceTiming {
                source: service::Source::Recommendations,
                elapsed: Duration::from_millis(300),
                status: service::SourceStatus::Timeout,
            },
        ];
        let value = server_timing(&timings).unwrap();
        assert_eq!(
            value.to_str().unwrap(),
            "profile;dur=1.50;desc=\"ok\", recommendations;dur=300.00;desc=\"timeout\""
        );
    }
}
