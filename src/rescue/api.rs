//! Every way an admin or user API call can fail, and its HTTP answer.
//!
//! The body has the proxy's shape, `{"error": {"type", "code", "message", "field"}}`; `field`
//! names what to fix (a JSON field of the body, `query:<name>`, `header:<name>`, or a path
//! parameter). A caller's mistake is not logged; a store failure is logged once here and
//! answered with a generic 500.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::json;

use super::{GatewayError, body, no_retry};
use crate::store::StoreError;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No admin token is configured: the admin API does not exist.
    #[error("admin API disabled")]
    AdminDisabled,
    /// No bearer token in `Authorization`.
    #[error("missing admin token")]
    MissingAdminToken,
    /// The bearer token is not an admin token.
    #[error("invalid admin token")]
    InvalidAdminToken,
    /// The caller could not be identified as an account (the proxy's answers: 401, 403).
    #[error(transparent)]
    Identity(GatewayError),
    /// A value in the request is missing or wrong.
    #[error("{field}: {message}")]
    Invalid {
        /// What is wrong (a stable code).
        code: &'static str,
        /// Where: a body field, `query:<name>`, `header:<name>` or a path parameter.
        field: String,
        /// What is wrong, for a person.
        message: String,
    },
    /// No account has this id.
    #[error("account not found")]
    AccountNotFound {
        /// The field that named it.
        field: &'static str,
    },
    /// No decision with this id is visible to the caller (unknown, not yet recorded, or
    /// another account's: the answer is the same).
    #[error("decision not found")]
    DecisionNotFound,
    /// An account with this id exists already.
    #[error("account exists")]
    AccountExists,
    /// The account has no API key with this prefix.
    #[error("API key not found")]
    ApiKeyNotFound,
    /// Several live API keys of the account start with this prefix.
    #[error("API key prefix is ambiguous")]
    ApiKeyPrefixAmbiguous {
        /// How many live keys share it.
        keys: usize,
    },
    /// The account is declared in the config file, which re-asserts its plan and suspension
    /// at every start: an API change would be silently undone.
    #[error("account managed by the config file")]
    AccountInConfig {
        /// The field that cannot be changed here.
        field: &'static str,
    },
    /// The `Idempotency-Key` was used before for a different grant.
    #[error("idempotency key reused")]
    IdempotencyKeyReused {
        /// The grant given under this key before.
        grant_id: i64,
    },
    /// Something other than the caller failed; the reason is logged, not sent.
    #[error("internal: {reason}")]
    Internal {
        /// What failed.
        reason: String,
    },
    /// The store failed; details are logged, not sent.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl ApiError {
    /// A missing or wrong value.
    pub fn invalid(
        code: &'static str,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError::Invalid {
            code,
            field: field.into(),
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use ApiError as E;
        match self {
            E::AdminDisabled => no_retry(body(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "admin_api_disabled",
                "the admin API is disabled: no admin token is configured (admin.token_hashes or FLOWGATE_ADMIN_TOKENS)".into(),
                json!({}),
            )),
            E::MissingAdminToken => no_retry(body(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing_admin_token",
                "send an admin token as Authorization: Bearer <token>".into(),
                json!({ "field": "header:authorization" }),
            )),
            E::InvalidAdminToken => no_retry(body(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_admin_token",
                "the admin token is not valid".into(),
                json!({ "field": "header:authorization" }),
            )),
            E::Identity(e) => e.into_response(),
            E::Invalid {
                code,
                field,
                message,
            } => no_retry(body(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                code,
                message,
                json!({ "field": field }),
            )),
            E::AccountNotFound { field } => no_retry(body(
                StatusCode::NOT_FOUND,
                "not_found_error",
                "account_not_found",
                "no account has this id".into(),
                json!({ "field": field }),
            )),
            E::DecisionNotFound => no_retry(body(
                StatusCode::NOT_FOUND,
                "not_found_error",
                "decision_not_found",
                "no decision with this id is recorded for you (a decision is recorded within milliseconds of its response)".into(),
                json!({ "field": "decision_id" }),
            )),
            E::ApiKeyNotFound => no_retry(body(
                StatusCode::NOT_FOUND,
                "not_found_error",
                "api_key_not_found",
                "the account has no API key with this prefix (GET its api-keys to list them)".into(),
                json!({ "field": "prefix" }),
            )),
            E::ApiKeyPrefixAmbiguous { keys } => no_retry(body(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "api_key_prefix_ambiguous",
                format!("{keys} live API keys of the account start with this prefix: nothing was revoked"),
                json!({ "field": "prefix", "keys": keys }),
            )),
            E::AccountExists => no_retry(body(
                StatusCode::CONFLICT,
                "conflict_error",
                "account_exists",
                "an account with this id exists already".into(),
                json!({ "field": "id" }),
            )),
            E::AccountInConfig { field } => no_retry(body(
                StatusCode::CONFLICT,
                "conflict_error",
                "account_in_config",
                "this account is declared in the config file, which sets its plan and suspension at every start: change it there".into(),
                json!({ "field": field }),
            )),
            E::IdempotencyKeyReused { grant_id } => no_retry(body(
                StatusCode::CONFLICT,
                "conflict_error",
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different grant; use a new key for a new grant".into(),
                json!({ "field": "header:idempotency-key", "grant_id": grant_id }),
            )),
            E::Internal { reason } => {
                tracing::error!(%reason, "API call failed");
                internal()
            }
            E::Store(e) => {
                tracing::error!(error = %e, "API call failed in the store");
                internal()
            }
        }
    }
}

fn internal() -> Response {
    body(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
        "internal_error",
        "the gateway failed; retrying is safe (a grant is given once per Idempotency-Key)".into(),
        json!({}),
    )
}
