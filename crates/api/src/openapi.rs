//! The OpenAPI document, generated from the handlers' annotations and the response types, so it
//! cannot drift from the code. Served at `/openapi.json`; no UI assets are bundled or fetched.

use utoipa::OpenApi;

use crate::routes;

/// `{"status":"success","data":{...dashboard...}}`.
#[derive(Debug, utoipa::ToSchema)]
pub struct DashboardEnvelope {
    /// Always `"success"`.
    #[schema(example = "success")]
    pub status: String,
    /// The dashboard.
    pub data: service::Dashboard,
}

/// `{"status":"success","data":{"results":[...],"errors":[...]}}`.
#[derive(Debug, utoipa::ToSchema)]
pub struct BatchEnvelope {
    /// Always `"success"`.
    #[schema(example = "success")]
    pub status: String,
    /// The summaries.
    pub data: service::BatchSummary,
}

/// The API's description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "dashboard",
        description = "A user dashboard assembled from PostgreSQL and a recommendation service in \
                       one structured fan-out. Every error is `{\"status\":\"error\",\"error\":\
                       {\"code\":...,\"message\":...}}`.",
    ),
    paths(
        routes::dashboard,
        routes::batch,
        routes::healthz,
        routes::readyz,
        routes::metrics,
        routes::openapi,
    ),
    tags(
        (name = "dashboard", description = "One user's dashboard"),
        (name = "batch", description = "Summaries of many users"),
        (name = "operations", description = "Health, readiness, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// The document as JSON.
pub fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"cannot render the OpenAPI document: {e}\"}}"))
}
