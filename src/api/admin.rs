//! The admin API: accounts and their plans, API keys, grants, balances and the ledger.
//!
//! Every handler here runs behind the admin token check ([`super::router`]). Each write is one
//! store transaction, then the view re-reads the account from the store (`Accounts::refresh`),
//! as every other replica does when the store announces the change: the next proxied request
//! sees it.
//! Input is validated before anything is written; an error names the field at fault.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use utoipa::ToSchema;

use super::model::{
    AccountBody, ApiKeyBody, ApiKeyInfo, ApiKeyListBody, GrantBody, LedgerPageBody, UsageBody,
};
use super::openapi::ErrorBody;
use super::{ApiError, ApiJson, Query};
use crate::app::App;
use crate::config::{GrantSeed, KeySeed, parse_instant};
use crate::ids::IdempotencyKey;
use crate::store::{Granted, Page, Refund, Revoked, StoredGrant};
use crate::waterfall::{GrantKind, Millis};

/// Most credits one grant may give (with a handful of grants per account, sums stay far
/// below `u64::MAX`).
pub const GRANT_CREDITS_MAX: i64 = 1_000_000_000_000_000;
/// Longest account id.
pub const ACCOUNT_ID_BYTES_MAX: usize = 128;
/// Random bytes in a generated API key.
const API_KEY_BYTES: usize = 32;
/// What generated API keys start with (so that a leaked one is recognisable).
pub const API_KEY_PREFIX: &str = "fg_";

/// `POST /admin/v1/accounts`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    /// The account's id: 1 to 128 letters, digits, `_`, `-`, `.`, `:` or `@`.
    pub id: String,
    /// A plan of the config.
    pub plan: String,
    /// Whether its requests are refused from the start.
    #[serde(default)]
    pub suspended: bool,
    /// Shadow mode: its requests are decided and recorded but never blocked or charged.
    #[serde(default)]
    pub shadow: bool,
}

/// `PATCH /admin/v1/accounts/{account_id}`: what to change (at least one).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccountChange {
    /// A plan of the config. Usage-limit windows and the free tier are then counted under the
    /// new plan; grants carry over.
    pub plan: Option<String>,
    /// Whether its requests are refused (403 `account_suspended`).
    pub suspended: Option<bool>,
    /// Shadow mode: its requests are decided and recorded but never blocked or charged. Every
    /// replica switches for its next request (as for any account change).
    pub shadow: Option<bool>,
}

/// `POST /admin/v1/accounts/{account_id}/grants`. The `Idempotency-Key` header is the grant's
/// external id: a repeat with the same key and body returns the grant given before.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewGrant {
    /// `credits` (purchased), `promotion` or `enterprise` (a contract's pool).
    pub kind: String,
    /// Credits, at least 1.
    pub amount: i64,
    /// When it expires (RFC 3339, in the future); absent: never.
    pub expires_at: Option<String>,
    /// Spend priority: lower first, then earliest expiry. Default 0.
    #[serde(default)]
    pub priority: i32,
    /// Features it may pay for (names from the config's routes); absent: all.
    pub features: Option<Vec<String>>,
}

/// Creates an account on a plan.
#[utoipa::path(
    post,
    path = "/admin/v1/accounts",
    tag = "admin",
    security(("admin_token" = [])),
    request_body = NewAccount,
    responses(
        (status = 201, description = "Created", body = AccountBody),
        (status = 400, description = "A field is missing or wrong (`field` names it)", body = ErrorBody),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 409, description = "An account with this id exists", body = ErrorBody),
    )
)]
pub async fn create_account(
    State(app): State<Arc<App>>,
    ApiJson(new): ApiJson<NewAccount>,
) -> Result<(StatusCode, Json<AccountBody>), ApiError> {
    check_account_id(&new.id)?;
    plan(&app, &new.plan)?;
    let now = app.clock.now_ms();
    if !app
        .store
        .create_account(&new.id, &new.plan, (new.suspended, new.shadow), now)
        .await?
    {
        return Err(ApiError::AccountExists);
    }
    refresh(&app, &new.id).await?;
    tracing::info!(account = %new.id, plan = %new.plan, suspended = new.suspended, shadow = new.shadow, "admin: account created");
    Ok((
        StatusCode::CREATED,
        Json(account_body(&app, &new.id).await?),
    ))
}

/// Reads an account: plan, suspension, API key count and grants.
#[utoipa::path(
    get,
    path = "/admin/v1/accounts/{account_id}",
    tag = "admin",
    security(("admin_token" = [])),
    params(("account_id" = String, Path, description = "The account")),
    responses(
        (status = 200, description = "The account", body = AccountBody),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    )
)]
pub async fn get_account(
    State(app): State<Arc<App>>,
    Path(account_id): Path<String>,
) -> Result<Json<AccountBody>, ApiError> {
    Ok(Json(account_body(&app, &account_id).await?))
}

/// Changes an account's plan or suspends it (or both). Accounts declared in the config file
/// are changed there instead (409).
#[utoipa::path(
    patch,
    path = "/admin/v1/accounts/{account_id}",
    tag = "admin",
    security(("admin_token" = [])),
    params(("account_id" = String, Path, description = "The account")),
    request_body = AccountChange,
    responses(
        (status = 200, description = "The account after the change", body = AccountBody),
        (status = 400, description = "A field is missing or wrong (`field` names it)", body = ErrorBody),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 409, description = "The account is declared in the config file", body = ErrorBody),
    )
)]
pub async fn update_account(
    State(app): State<Arc<App>>,
    Path(account_id): Path<String>,
    ApiJson(change): ApiJson<AccountChange>,
) -> Result<Json<AccountBody>, ApiError> {
    if change.plan.is_none() && change.suspended.is_none() && change.shadow.is_none() {
        return Err(ApiError::invalid(
            "nothing_to_change",
            "body",
            "give plan, suspended or shadow (one or more)",
        ));
    }
    if let Some(name) = &change.plan {
        plan(&app, name)?;
    }
    if app.settings.accounts.iter().any(|a| a.id == account_id) {
        return Err(ApiError::AccountInConfig {
            field: if change.plan.is_some() {
                "plan"
            } else if change.suspended.is_some() {
                "suspended"
            } else {
                "shadow"
            },
        });
    }
    let row = app
        .store
        .update_account(
            &account_id,
            change.plan.as_deref(),
            (change.suspended, change.shadow),
        )
        .await?
        .ok_or(ApiError::AccountNotFound {
            field: "account_id",
        })?;
    refresh(&app, &account_id).await?;
    tracing::info!(account = %account_id, plan = %row.plan, suspended = row.suspended, shadow = row.shadow, "admin: account changed");
    Ok(Json(account_body(&app, &account_id).await?))
}

/// Creates an API key for an account. The key is in this answer only: the gateway stores its
/// SHA-256 and its prefix. It works on this replica's proxy at once, on the others within the
/// change bound.
#[utoipa::path(
    post,
    path = "/admin/v1/accounts/{account_id}/api-keys",
    tag = "admin",
    security(("admin_token" = [])),
    params(("account_id" = String, Path, description = "The account")),
    responses(
        (status = 201, description = "The new key, shown once", body = ApiKeyBody),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    )
)]
pub async fn create_api_key(
    State(app): State<Arc<App>>,
    Path(account_id): Path<String>,
) -> Result<(StatusCode, Json<ApiKeyBody>), ApiError> {
    let mut secret = [0u8; API_KEY_BYTES];
    getrandom::fill(&mut secret).map_err(|e| ApiError::Internal {
        reason: format!("the system's random number generator failed: {e}"),
    })?;
    let key = format!("{API_KEY_PREFIX}{}", hex::encode(secret));
    let stored = KeySeed::of(&key);
    app.store
        .add_api_key(&account_id, &stored, app.clock.now_ms())
        .await?
        .ok_or(ApiError::AccountNotFound {
            field: "account_id",
        })?;
    refresh(&app, &account_id).await?;
    tracing::info!(account = %account_id, prefix = %stored.prefix, "admin: API key created");
    Ok((
        StatusCode::CREATED,
        Json(ApiKeyBody {
            account: account_id,
            api_key: key,
            prefix: stored.prefix,
        }),
    ))
}

/// Lists an account's API keys by their prefixes (never the keys), revoked ones included.
#[utoipa::path(
    get,
    path = "/admin/v1/accounts/{account_id}/api-keys",
    tag = "admin",
    security(("admin_token" = [])),
    params(("account_id" = String, Path, description = "The account")),
    responses(
        (status = 200, description = "Its keys, oldest first", body = ApiKeyListBody),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    )
)]
pub async fn list_api_keys(
    State(app): State<Arc<App>>,
    Path(account_id): Path<String>,
) -> Result<Json<ApiKeyListBody>, ApiError> {
    if app.store.account(&account_id).await?.is_none() {
        return Err(ApiError::AccountNotFound {
            field: "account_id",
        });
    }
    let keys = app.store.api_keys(&account_id).await?;
    Ok(Json(ApiKeyListBody {
        account: account_id,
        api_keys: keys.into_iter().map(Into::into).collect(),
    }))
}

/// Revokes an API key, named by its prefix: from then on it identifies nobody, on every
/// replica (within the change bound, see the README). Revoking a revoked key changes nothing.
#[utoipa::path(
    delete,
    path = "/admin/v1/accounts/{account_id}/api-keys/{prefix}",
    tag = "admin",
    security(("admin_token" = [])),
    params(
        ("account_id" = String, Path, description = "The account"),
        ("prefix" = String, Path, description = "The key's prefix, as listed"),
    ),
    responses(
        (status = 200, description = "The key, revoked (now or before)", body = ApiKeyInfo),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such account, or no key with this prefix", body = ErrorBody),
        (status = 409, description = "Several live keys share the prefix: nothing was revoked", body = ErrorBody),
    )
)]
pub async fn revoke_api_key(
    State(app): State<Arc<App>>,
    Path((account_id, prefix)): Path<(String, String)>,
) -> Result<Json<ApiKeyInfo>, ApiError> {
    if app.store.account(&account_id).await?.is_none() {
        return Err(ApiError::AccountNotFound {
            field: "account_id",
        });
    }
    let key = match app
        .store
        .revoke_api_key(&account_id, &prefix, app.clock.now_ms())
        .await?
    {
        Revoked::Now(key) => {
            refresh(&app, &account_id).await?;
            tracing::info!(account = %account_id, %prefix, "admin: API key revoked");
            key
        }
        Revoked::Before(key) => key,
        Revoked::NotFound => return Err(ApiError::ApiKeyNotFound),
        Revoked::Ambiguous(keys) => return Err(ApiError::ApiKeyPrefixAmbiguous { keys }),
    };
    Ok(Json(key.into()))
}

/// Grants credits, a promotion or an enterprise pool, once per `Idempotency-Key`: a repeat
/// with the same key and body answers 200 with the grant given before and grants nothing more.
#[utoipa::path(
    post,
    path = "/admin/v1/accounts/{account_id}/grants",
    tag = "admin",
    security(("admin_token" = [])),
    params(
        ("account_id" = String, Path, description = "The account"),
        ("Idempotency-Key" = String, Header, description = "The grant's external id (1 to 255 visible ASCII characters): the same key never grants twice"),
    ),
    request_body = NewGrant,
    responses(
        (status = 201, description = "Granted now", body = GrantBody),
        (status = 200, description = "Granted before under this key; nothing more was granted", body = GrantBody),
        (status = 400, description = "A field is missing or wrong (`field` names it); nothing was written", body = ErrorBody),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
        (status = 409, description = "The key was used for a different grant", body = ErrorBody),
    )
)]
pub async fn grant(
    State(app): State<Arc<App>>,
    Path(account_id): Path<String>,
    headers: HeaderMap,
    ApiJson(new): ApiJson<NewGrant>,
) -> Result<(StatusCode, Json<GrantBody>), ApiError> {
    let now = app.clock.now_ms();
    let key = headers
        .get("idempotency-key")
        .ok_or_else(|| {
            ApiError::invalid(
                "missing_idempotency_key",
                "header:idempotency-key",
                "a grant needs an Idempotency-Key header: it becomes the grant's id, so that a retry never grants twice",
            )
        })?
        .to_str()
        .ok()
        .and_then(|k| IdempotencyKey::parse(k).ok())
        .ok_or_else(|| {
            ApiError::invalid(
                "invalid_idempotency_key",
                "header:idempotency-key",
                format!("Idempotency-Key {}", crate::ids::InvalidIdempotencyKey),
            )
        })?;
    let seed = validate_grant(&app, key.as_str(), new, now)?;
    let granted =
        app.store
            .grant(&account_id, &seed, now)
            .await?
            .ok_or(ApiError::AccountNotFound {
                field: "account_id",
            })?;
    match granted {
        Granted::Created(g) => {
            refresh(&app, &account_id).await?;
            tracing::info!(account = %account_id, grant_id = g.id, kind = g.kind.as_str(), amount = g.amount, "admin: granted");
            Ok((StatusCode::CREATED, Json(g.into())))
        }
        Granted::Existing(g) => {
            if !same_grant(&g, &seed) {
                return Err(ApiError::IdempotencyKeyReused { grant_id: g.id });
            }
            Ok((StatusCode::OK, Json(g.into())))
        }
    }
}

/// What `POST /admin/v1/decisions/{decision_id}/refund` did.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct RefundBody {
    /// The refunded decision.
    pub decision_id: String,
    /// `refunded` (now) or `already_refunded` (before: nothing changed).
    pub status: &'static str,
    /// Whose charge it was (absent when already refunded).
    pub account: Option<String>,
    /// Credits given back to the grants that paid them.
    pub credits: u64,
}

/// Refunds a charge: its credits go back to exactly the grants that paid them (each with a
/// `refund` balance update), its units back to the usage-limit windows and free tier it used.
/// Once per charge: a repeat answers `already_refunded` and changes nothing.
#[utoipa::path(
    post,
    path = "/admin/v1/decisions/{decision_id}/refund",
    tag = "admin",
    security(("admin_token" = [])),
    params(("decision_id" = String, Path, description = "The decision whose charge to refund")),
    responses(
        (status = 200, description = "Refunded now, or before", body = RefundBody),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 404, description = "No charge under this decision", body = ErrorBody),
    )
)]
pub async fn refund(
    State(app): State<Arc<App>>,
    Path(decision_id): Path<String>,
) -> Result<Json<RefundBody>, ApiError> {
    match app.store.refund(&decision_id, app.clock.now_ms()).await? {
        Refund::Refunded {
            account,
            draws,
            balances,
            credits,
        } => {
            app.accounts.refunded(&account, &draws, &balances);
            tracing::info!(%account, %decision_id, credits, "admin: refunded");
            Ok(Json(RefundBody {
                decision_id,
                status: "refunded",
                account: Some(account),
                credits,
            }))
        }
        Refund::AlreadyRefunded => Ok(Json(RefundBody {
            decision_id,
            status: "already_refunded",
            account: None,
            credits: 0,
        })),
        Refund::NotCharged => Err(ApiError::DecisionNotFound),
    }
}

/// Balances by pool and usage-limit windows with their reset times, as the next request will
/// be decided (holds of requests in flight taken).
#[utoipa::path(
    get,
    path = "/admin/v1/accounts/{account_id}/balances",
    tag = "admin",
    security(("admin_token" = [])),
    params(("account_id" = String, Path, description = "The account")),
    responses(
        (status = 200, description = "Windows, free tier and balances", body = UsageBody),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such account (or its plan is not in the config)", body = ErrorBody),
    )
)]
pub async fn balances(
    State(app): State<Arc<App>>,
    Path(account_id): Path<String>,
) -> Result<Json<UsageBody>, ApiError> {
    let account = app
        .accounts
        .get(&account_id)
        .ok_or(ApiError::AccountNotFound {
            field: "account_id",
        })?;
    Ok(Json(UsageBody::of(
        &account,
        &app.settings,
        app.clock.now_ms(),
    )))
}

/// The account's ledger, oldest first: each usage event with its monetization event and
/// balance updates. Page with `after` (the previous page's `next`).
#[utoipa::path(
    get,
    path = "/admin/v1/accounts/{account_id}/ledger",
    tag = "admin",
    security(("admin_token" = [])),
    params(
        ("account_id" = String, Path, description = "The account"),
        ("after" = Option<i64>, Query, description = "Only events after this usage event id (the previous page's `next`)"),
        ("limit" = Option<u32>, Query, description = "Events per page, 1 to 500 (default 50)"),
    ),
    responses(
        (status = 200, description = "A page of the ledger", body = LedgerPageBody),
        (status = 400, description = "A query parameter is wrong (`field` names it)", body = ErrorBody),
        (status = 401, description = "No or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such account", body = ErrorBody),
    )
)]
pub async fn ledger(
    State(app): State<Arc<App>>,
    Path(account_id): Path<String>,
    query: Query,
) -> Result<Json<LedgerPageBody>, ApiError> {
    query.only(&["after", "limit"])?;
    let after = query.int("after", 0, i64::MAX)?.unwrap_or(0);
    let limit = query.limit()?;
    if app.store.account(&account_id).await?.is_none() {
        return Err(ApiError::AccountNotFound {
            field: "account_id",
        });
    }
    let events = app
        .store
        .ledger_page(&account_id, Page::After(after), limit)
        .await?;
    Ok(Json(LedgerPageBody::new(account_id, events, limit)))
}

/// The account as the store has it.
async fn account_body(app: &App, id: &str) -> Result<AccountBody, ApiError> {
    let row = app
        .store
        .account(id)
        .await?
        .ok_or(ApiError::AccountNotFound {
            field: "account_id",
        })?;
    let grants = app.store.grants(id).await?;
    Ok(AccountBody::new(row, grants, &app.settings))
}

/// Makes the view's copy of the account what the store has now (`Accounts::refresh`).
async fn refresh(app: &App, id: &str) -> Result<(), ApiError> {
    Ok(app
        .accounts
        .refresh(&app.store, id, app.clock.now_ms())
        .await?)
}

/// An account id: 1 to 128 letters, digits, `_`, `-`, `.`, `:` or `@` (it travels in headers).
fn check_account_id(id: &str) -> Result<(), ApiError> {
    let valid = !id.is_empty()
        && id.len() <= ACCOUNT_ID_BYTES_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:@".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "invalid_value",
            "id",
            format!(
                "an account id is 1 to {ACCOUNT_ID_BYTES_MAX} letters, digits, '_', '-', '.', ':' or '@'"
            ),
        ))
    }
}

/// The configured plan called `name`.
fn plan(app: &App, name: &str) -> Result<Arc<crate::waterfall::Plan>, ApiError> {
    app.settings.plans.get(name).cloned().ok_or_else(|| {
        let mut known: Vec<&str> = app.settings.plans.keys().map(String::as_str).collect();
        known.sort_unstable();
        ApiError::invalid(
            "unknown_plan",
            "plan",
            format!(
                "unknown plan {name:?} (the config has: {})",
                known.join(", ")
            ),
        )
    })
}

/// Checks a grant request field by field, in the order of the body.
fn validate_grant(
    app: &App,
    external_id: &str,
    new: NewGrant,
    now: Millis,
) -> Result<GrantSeed, ApiError> {
    let kind = GrantKind::parse(&new.kind).ok_or_else(|| {
        ApiError::invalid(
            "unknown_kind",
            "kind",
            format!(
                "unknown grant kind {:?}: credits, promotion or enterprise",
                new.kind
            ),
        )
    })?;
    if !(1..=GRANT_CREDITS_MAX).contains(&new.amount) {
        return Err(ApiError::invalid(
            "invalid_amount",
            "amount",
            format!("must be a whole number of credits from 1 to {GRANT_CREDITS_MAX}"),
        ));
    }
    let expires_at = match &new.expires_at {
        None => None,
        Some(text) => {
            let at = parse_instant(text).ok_or_else(|| {
                ApiError::invalid(
                    "invalid_value",
                    "expires_at",
                    "not an RFC 3339 time like 2027-01-01T00:00:00Z",
                )
            })?;
            if at <= now {
                return Err(ApiError::invalid(
                    "expires_in_the_past",
                    "expires_at",
                    "the expiry is not in the future: the grant could never be used",
                ));
            }
            Some(at)
        }
    };
    if let Some(features) = &new.features {
        if features.is_empty() {
            return Err(ApiError::invalid(
                "invalid_value",
                "features",
                "an empty list would make the grant unusable; leave features out for all",
            ));
        }
        for (i, name) in features.iter().enumerate() {
            if app.settings.feature_id(name).is_none() {
                return Err(ApiError::invalid(
                    "unknown_feature",
                    format!("features[{i}]"),
                    format!(
                        "unknown feature {name:?} (the config's routes declare: {})",
                        app.settings.features.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(GrantSeed {
        external_id: external_id.to_owned(),
        kind,
        amount: new.amount.unsigned_abs(),
        expires_at,
        priority: new.priority,
        features: new.features,
    })
}

/// Whether a grant given before is the one asked for now.
fn same_grant(g: &StoredGrant, seed: &GrantSeed) -> bool {
    g.kind == seed.kind
        && g.amount == seed.amount
        && g.expires_at == seed.expires_at
        && g.priority == seed.priority
        && g.features == seed.features
}
