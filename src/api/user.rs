//! The user API, scoped to the caller's own account, and the decision explanation.
//!
//! The caller is identified exactly as the proxy identifies it ([`super::Me`]): no handler
//! takes an account id, so another account's numbers cannot be asked for. A decision is shown
//! to the account that made the request, or to an admin; to anyone else it does not exist.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};

use super::model::{DecisionBody, LedgerPageBody, UsageBody};
use super::openapi::ErrorBody;
use super::{ApiError, Caller, Me, Query};
use crate::app::App;
use crate::store::Page;

/// Your limits (each usage-limit window with its reset time, the free tier) and your balances
/// by pool, as your next request will be decided.
#[utoipa::path(
    get,
    path = "/v1/me/usage",
    tag = "user",
    security(("api_key" = [])),
    responses(
        (status = 200, description = "Your windows, free tier and balances", body = UsageBody),
        (status = 401, description = "Missing or unknown credentials", body = ErrorBody),
    )
)]
pub async fn usage(State(app): State<Arc<App>>, Me(account): Me) -> Json<UsageBody> {
    Json(UsageBody::of(&account, &app.settings, app.clock.now_ms()))
}

/// Your recent requests, newest first: each decision with its reasons (every layer checked,
/// the denial if any), and what was charged. Page with `before` (the previous page's `next`).
#[utoipa::path(
    get,
    path = "/v1/me/decisions",
    tag = "user",
    security(("api_key" = [])),
    params(
        ("before" = Option<i64>, Query, description = "Only events before this usage event id (the previous page's `next`)"),
        ("limit" = Option<u32>, Query, description = "Events per page, 1 to 500 (default 50)"),
    ),
    responses(
        (status = 200, description = "Your recent decisions", body = LedgerPageBody),
        (status = 400, description = "A query parameter is wrong (`field` names it)", body = ErrorBody),
        (status = 401, description = "Missing or unknown credentials", body = ErrorBody),
    )
)]
pub async fn decisions(
    State(app): State<Arc<App>>,
    Me(account): Me,
    query: Query,
) -> Result<Json<LedgerPageBody>, ApiError> {
    query.only(&["before", "limit"])?;
    let before = query.int("before", 1, i64::MAX)?;
    let limit = query.limit()?;
    let events = app
        .store
        .ledger_page(&account.id, Page::Before(before), limit)
        .await?;
    Ok(Json(LedgerPageBody::new(
        account.id.to_string(),
        events,
        limit,
    )))
}

/// Why a request was allowed or denied: every layer checked, what it had and gave, the price
/// version, and the usage event, monetization event and balance updates recorded for it. For
/// the account that made the request, or an admin. Recorded within milliseconds of the answer.
#[utoipa::path(
    get,
    path = "/v1/decisions/{decision_id}",
    tag = "user",
    security(("api_key" = []), ("admin_token" = [])),
    params(("decision_id" = String, Path, description = "The `x-flowgate-decision-id` of a response")),
    responses(
        (status = 200, description = "The decision and its ledger records", body = DecisionBody),
        (status = 400, description = "Not a decision id", body = ErrorBody),
        (status = 401, description = "Missing or unknown credentials", body = ErrorBody),
        (status = 404, description = "No such decision for you", body = ErrorBody),
    )
)]
pub async fn decision(
    State(app): State<Arc<App>>,
    caller: Caller,
    Path(decision_id): Path<String>,
) -> Result<Json<DecisionBody>, ApiError> {
    let id = uuid::Uuid::parse_str(&decision_id).map_err(|_| {
        ApiError::invalid(
            "invalid_value",
            "decision_id",
            "not a decision id (a UUID, as in x-flowgate-decision-id)",
        )
    })?;
    let event = app
        .store
        .ledger_event(&id.to_string())
        .await?
        .ok_or(ApiError::DecisionNotFound)?;
    if let Caller::Account(account) = &caller {
        if *account.id != *event.usage.account_id {
            return Err(ApiError::DecisionNotFound);
        }
    }
    Ok(Json(event.into()))
}
