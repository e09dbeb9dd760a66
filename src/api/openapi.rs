//! The OpenAPI document of the admin and user APIs, served at `/openapi.json`.
//!
//! Paths and schemas come from the handlers' `#[utoipa::path]` annotations as the router is
//! built ([`super::router`]); this module adds what is common: the title, the tags, the two
//! security schemes and the error body.

use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// The error body every failure answers with (the proxy's shape).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// The class: `invalid_request_error`, `authentication_error`, `permission_error`,
    /// `not_found_error`, `conflict_error`, `internal_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A stable code, e.g. `invalid_value`, `account_not_found`, `invalid_admin_token`.
    pub code: String,
    /// What happened, for a person.
    pub message: String,
    /// What to fix: a body field (`amount`), `query:<name>`, `header:<name>`, or a path
    /// parameter (`account_id`).
    pub field: Option<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "flowgate admin and user APIs",
        description = "The admin API (accounts, plans, API keys, idempotent grants, balances, the ledger) and the user API (your own limits, balances and decisions) of the flowgate gateway. Proxied product routes are configured per deployment and are not listed here."
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&Security),
    tags(
        (name = "admin", description = "Operators: authenticated with an admin bearer token."),
        (name = "user", description = "End users: identified as the proxy identifies them (API key or trusted header)."),
    )
)]
struct Base;

/// Adds the security schemes: `admin_token` (bearer) and `api_key` (the proxy's identity).
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An admin token, configured as a SHA-256 hash (admin.token_hashes) or in FLOWGATE_ADMIN_TOKENS.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "authorization",
                "The caller's identity as the proxy reads it: `Bearer <API key>` in api_key mode, or the account id in the configured trusted header.",
            ))),
        );
    }
}

/// The document before the handlers' paths are added.
pub fn base() -> utoipa::openapi::OpenApi {
    let mut doc = Base::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}
