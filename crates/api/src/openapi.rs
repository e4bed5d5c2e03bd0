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

/// The document as JSON; with `bearer`, the bearer scheme and the 401/403/429 answers of the
/// routes that need a token.
pub fn document(bearer: bool) -> String {
    let mut doc = ApiDoc::openapi();
    if bearer {
        add_bearer(&mut doc);
    }
    doc.to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\":\"cannot render the OpenAPI document: {e}\"}}"))
}

/// Declares `Authorization: Bearer <JWT>` on the dashboard and batch operations.
fn add_bearer(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::{
        HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    use utoipa::openapi::{Ref, RefOr, ResponseBuilder, content::ContentBuilder};
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .build(),
        ),
    );
    let error = |description: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build(),
        )
    };
    for path in ["/api/users/{user_id}/dashboard", "/api/users/batch"] {
        let Some(item) = doc.paths.paths.get_mut(path) else {
            continue;
        };
        for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
            operation.security = Some(vec![SecurityRequirement::new(
                "bearer",
                Vec::<String>::new(),
            )]);
            let responses = &mut operation.responses.responses;
            responses.insert("401".into(), error("No token, or one that does not verify"));
            responses.insert(
                "403".into(),
                error("A valid token without the right to this"),
            );
            responses.insert(
                "429".into(),
                error("Too many requests from this client; see Retry-After"),
            );
        }
    }
}
