//! The API contract at `/openapi.json` and Swagger UI at `/docs`, both served from the binary (no
//! CDN), outside the API keys like the ops endpoints: the contract is no secret.

use axum::Router;
use utoipa::Modify;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa_swagger_ui::SwaggerUi;

/// `/openapi.json` and `/docs` for `spec`.
pub fn router(spec: OpenApi) -> Router {
    Router::new().merge(SwaggerUi::new("/docs").url("/openapi.json", spec))
}

/// Adds the two ways of sending an API key (`Authorization: Bearer` or `X-Api-Key`), needed only
/// when the service has keys configured (`API_KEYS`).
pub struct ApiKeys;

impl Modify for ApiKeys {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components
            .add_security_scheme("api_key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))));
        // Anonymous where no keys are configured; else either scheme.
        openapi.security = Some(vec![
            SecurityRequirement::default(),
            SecurityRequirement::new("bearer", Vec::<String>::new()),
            SecurityRequirement::new("api_key", Vec::<String>::new()),
        ]);
    }
}
