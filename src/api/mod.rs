//! The admin API, the user API and the OpenAPI document that describes them.
//!
//! - **Admin** (`/admin/v1/...`, [`admin`]): accounts and their plans, API keys, idempotent
//!   grants, balances and windows, the ledger. Authenticated by a bearer token whose SHA-256
//!   is configured (`admin.token_hashes`, `FLOWGATE_ADMIN_TOKENS`); with none configured every
//!   admin path answers 404.
//! - **User** (`/v1/me/...`, [`user`]): the caller's own limits, balances and recent
//!   decisions, identified exactly as the proxy identifies it (API key or trusted header).
//!   There is no account parameter: another account's data cannot be named.
//! - **Decisions** (`/v1/decisions/{decision_id}`): why a request was allowed or denied, with
//!   its ledger records; for the owning account or an admin.
//! - **Usage page** (`/usage`, [`page`]): the user API's numbers as HTML for a browser.
//! - `/openapi.json` ([`openapi`]): generated from the handlers' annotations; the router is
//!   built from the same annotations, so every path served is documented.
//!
//! Reads of balances and windows come from the in-memory view (what the next request is
//! decided against, holds included); reads of the ledger come from the store. Every write goes
//! to the store in one transaction, then into the view, so the next proxied request sees it.

pub mod admin;
pub mod model;
pub mod openapi;
pub mod page;
pub mod user;

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::request::Parts;
use http::{HeaderMap, header};
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::accounts::Account;
use crate::app::App;
use crate::identity::identify;
pub use crate::rescue::ApiError;

/// Largest request body the APIs read.
pub const BODY_BYTES_MAX: usize = 64 * 1024;
/// Most events one page of the ledger or of recent decisions holds.
pub const PAGE_LIMIT_MAX: u32 = 500;
/// Events per page when the caller does not say.
pub const PAGE_LIMIT_DEFAULT: u32 = 50;

/// The API routes (admin, user, decisions, `/openapi.json`), to merge into the gateway's
/// router, and the OpenAPI document they serve.
pub fn router(app: &Arc<App>) -> (Router<Arc<App>>, utoipa::openapi::OpenApi) {
    let admin = OpenApiRouter::new()
        .routes(routes!(admin::create_account))
        .routes(routes!(admin::get_account, admin::update_account))
        .routes(routes!(admin::create_api_key, admin::list_api_keys))
        .routes(routes!(admin::revoke_api_key))
        .routes(routes!(admin::grant))
        .routes(routes!(admin::balances))
        .routes(routes!(admin::ledger))
        .routes(routes!(admin::refund))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            require_admin,
        ));
    let (routes, doc) = OpenApiRouter::with_openapi(openapi::base())
        .merge(admin)
        .routes(routes!(user::usage))
        .routes(routes!(user::decisions))
        .routes(routes!(user::decision))
        .split_for_parts();
    let json: Arc<str> = match doc.to_json() {
        Ok(json) => json.into(),
        Err(e) => {
            tracing::error!(error = %e, "OpenAPI document could not be serialised");
            "{}".into()
        }
    };
    let routes = routes.route(
        "/openapi.json",
        get(move || {
            let json = json.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    json.to_string(),
                )
            }
        }),
    );
    (routes, doc)
}

/// Lets a request through to the admin handlers only with an admin token.
async fn require_admin(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    match admin_token(&app, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Checks `Authorization: Bearer <token>` against the configured admin token hashes. The
/// token is hashed and compared in constant time with every hash; it is never logged.
fn admin_token(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let admin = &app.settings.admin;
    if !admin.enabled() {
        return Err(ApiError::AdminDisabled);
    }
    let token = bearer(headers).ok_or(ApiError::MissingAdminToken)?;
    let digest = crate::config::sha256(token);
    let matched = admin
        .token_hashes
        .iter()
        .fold(subtle::Choice::from(0), |found, hash| {
            found | hash.ct_eq(&digest)
        });
    if bool::from(matched) {
        Ok(())
    } else {
        Err(ApiError::InvalidAdminToken)
    }
}

/// The token of an `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The account making a user-API call, identified as the proxy identifies it.
pub struct Me(pub Arc<Account>);

impl FromRequestParts<Arc<App>> for Me {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Me, ApiError> {
        identify(app, &parts.headers)
            .map(Me)
            .map_err(ApiError::Identity)
    }
}

/// Who is asking, where both an admin and the owning account may: an admin token wins; anything
/// else must identify an account as the proxy does.
pub enum Caller {
    /// An admin token.
    Admin,
    /// An account.
    Account(Arc<Account>),
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Caller, ApiError> {
        if admin_token(app, &parts.headers).is_ok() {
            return Ok(Caller::Admin);
        }
        identify(app, &parts.headers)
            .map(Caller::Account)
            .map_err(ApiError::Identity)
    }
}

/// A JSON body whose errors name the field at fault (`amount`, `features[1]`), read up to
/// [`BODY_BYTES_MAX`].
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<ApiJson<T>, ApiError> {
        let bytes = axum::body::to_bytes(req.into_body(), BODY_BYTES_MAX)
            .await
            .map_err(|_| {
                ApiError::invalid(
                    "body_too_large",
                    "body",
                    format!("the body is larger than {BODY_BYTES_MAX} bytes"),
                )
            })?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(&mut de)
            .map(ApiJson)
            .map_err(|e| {
                let path = e.path().to_string();
                let inner = e.into_inner();
                let message = inner.to_string();
                // A missing or unknown field is reported at its parent, or at itself.
                let field = match (named_in(&message), path.as_str()) {
                    (Some(name), ".") => name.to_owned(),
                    (Some(name), p) if p != name && !p.ends_with(&format!(".{name}")) => {
                        format!("{p}.{name}")
                    }
                    (_, ".") => "body".to_owned(),
                    _ => path,
                };
                ApiError::invalid("invalid_value", field, message)
            })
    }
}

/// The field serde names in "missing field `x`" and "unknown field `x`, expected …".
fn named_in(message: &str) -> Option<&str> {
    let rest = message
        .strip_prefix("missing field `")
        .or_else(|| message.strip_prefix("unknown field `"))?;
    rest.split('`').next()
}

/// The query string's parameters, each checked by name: an unknown one is an error naming it.
pub struct Query(Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for Query {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Query, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(query)
            .map(Query)
            .map_err(|e| ApiError::invalid("invalid_value", "query", e.to_string()))
    }
}

impl Query {
    /// Fails on a parameter not in `known`.
    pub fn only(&self, known: &[&str]) -> Result<(), ApiError> {
        match self.0.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            Some((k, _)) => Err(ApiError::invalid(
                "unknown_parameter",
                format!("query:{k}"),
                format!("unknown query parameter (known: {})", known.join(", ")),
            )),
            None => Ok(()),
        }
    }

    /// The integer parameter `name` in `min..=max`, if given.
    pub fn int(&self, name: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        let Some((_, v)) = self.0.iter().find(|(k, _)| k == name) else {
            return Ok(None);
        };
        match v.parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::invalid(
                "invalid_value",
                format!("query:{name}"),
                format!("must be an integer from {min} to {max}"),
            )),
        }
    }

    /// The page size: `limit`, 1 to [`PAGE_LIMIT_MAX`], default [`PAGE_LIMIT_DEFAULT`].
    pub fn limit(&self) -> Result<u32, ApiError> {
        Ok(self
            .int("limit", 1, i64::from(PAGE_LIMIT_MAX))?
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(PAGE_LIMIT_DEFAULT))
    }
}
