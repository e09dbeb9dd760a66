//! Every way a proxied request can be refused, and its HTTP answer.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use serde_json::json;

use super::{body, no_retry};

use crate::clock::format_duration;
use crate::config::CreditsDenial;
use crate::cost::CostError;
use crate::waterfall::{Decision, Denial, Millis, Plan, WindowStatus};

/// Why a request was not (or could not be) served.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// No credentials in the identity header.
    #[error("missing credentials")]
    MissingCredentials {
        /// The header that should carry them.
        header: String,
    },
    /// The API key matches no account.
    #[error("invalid API key")]
    InvalidApiKey,
    /// The trusted header names no known account.
    #[error("unknown account")]
    UnknownAccount,
    /// The account is suspended.
    #[error("account suspended")]
    Suspended,
    /// The request's cost could not be read.
    #[error("invalid cost: {0}")]
    InvalidCost(#[from] CostError),
    /// The request body is larger than the gateway reads.
    #[error("request body too large")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The client sent the body too slowly (`client_body_timeout_ms`).
    #[error("request body timeout")]
    BodyTimeout,
    /// The `Idempotency-Key` header is not a short printable string.
    #[error("invalid idempotency key")]
    InvalidIdempotencyKey,
    /// A request with the same `Idempotency-Key` is still running.
    #[error("idempotency key in use")]
    IdempotencyKeyInUse {
        /// The decision of the running request.
        decision_id: uuid::Uuid,
    },
    /// The key's request completed and was charged, and its response was too large (or too
    /// long a stream) to keep: it is not run again.
    #[error("idempotency key completed")]
    IdempotencyKeyCompleted {
        /// The decision that ran it.
        decision_id: uuid::Uuid,
    },
    /// The key was used before for a different request (method, path or body).
    #[error("idempotency key reused for another request")]
    IdempotencyKeyMismatch {
        /// The decision of the first request.
        decision_id: uuid::Uuid,
    },
    /// The waterfall denied the request.
    #[error("denied")]
    Denied(Box<DenialReport>),
    /// Too much usage is waiting to be recorded; new work waits until the ledger catches up.
    #[error("ledger backlog")]
    LedgerBacklog,
    /// A strict account's slice could not be leased: the store did not answer.
    #[error("lease unavailable")]
    LeaseUnavailable,
    /// The upstream did not answer in time.
    #[error("upstream timeout")]
    UpstreamTimeout,
    /// The upstream could not be reached.
    #[error("upstream unavailable")]
    UpstreamUnavailable,
    /// No route matches.
    #[error("no route")]
    RouteNotFound,
    /// A bug; details are logged, not sent.
    #[error("internal error")]
    Internal,
}

/// A denial with everything needed to explain it.
#[derive(Debug)]
pub struct DenialReport {
    /// Why.
    pub denial: Denial,
    /// How credit shortfalls are answered.
    pub credits_denial: CreditsDenial,
    /// The feature's name.
    pub feature: String,
    /// Units asked for.
    pub units: u64,
    /// Price per unit in force.
    pub credits_per_unit: u64,
    /// Credits the account could spend on the feature.
    pub credits_available: u64,
    /// Every layer checked and what it had, with windows in detail.
    pub layers: serde_json::Value,
    /// Now, to turn the retry time into seconds.
    pub now: Millis,
}

fn retry_after(mut response: Response, seconds: u64) -> Response {
    let h = response.headers_mut();
    h.insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
    h.insert(
        "retry-after-ms",
        HeaderValue::from(seconds.saturating_mul(1000)),
    );
    response
}

/// One usage-limit window's numbers at the decision, copied out of the account's lock.
#[derive(Debug, Clone)]
pub struct WindowReport {
    layer: u8,
    name: std::sync::Arc<str>,
    reset: &'static str,
    time_zone: Option<&'static str>,
    limit: u64,
    used: u64,
    remaining: u64,
    reset_at: Millis,
}

impl WindowReport {
    /// The numbers of `status`, a window of the plan's layer `layer`.
    pub fn of(layer: u8, status: &WindowStatus<'_>) -> WindowReport {
        WindowReport {
            layer,
            name: status.window.name.clone(),
            reset: status.window.reset_name(),
            time_zone: status.window.zone().map(|z| z.name()),
            limit: status.window.limit,
            used: status.used,
            remaining: status.remaining,
            reset_at: status.reset_at,
        }
    }
}

impl DenialReport {
    /// Every layer a decision checked, with what it had and gave, and each usage-limit window
    /// in detail (limit, used, remaining, reset time): the explanation attached to a denial.
    pub fn layers(plan: &Plan, decision: &Decision, windows: &[WindowReport]) -> serde_json::Value {
        let layers = decision
            .layers
            .iter()
            .filter_map(|r| {
                let layer = plan.layers.get(r.layer as usize)?;
                let mut v = json!({
                    "layer": &*layer.name,
                    "kind": layer.kind.tag(),
                    "eligible": r.eligible,
                    "available_units": r.available_units,
                });
                if let Some(c) = r.available_credits {
                    v["available_credits"] = json!(c);
                }
                if let Some(at) = r.reset_at {
                    v["reset_at"] = json!(crate::clock::rfc3339(at));
                }
                if let crate::waterfall::LayerKind::Workspace { member_cap } = &layer.kind {
                    v["pool_credits"] = json!(r.pool_credits);
                    v["cap_left"] = json!(r.cap_left);
                    v["member_cap"] = json!(member_cap.map(|c| c.credits));
                }
                if let crate::waterfall::LayerKind::UsageLimit { .. } = layer.kind {
                    v["windows"] = windows
                        .iter()
                        .filter(|w| w.layer == r.layer)
                        .map(|w| {
                            json!({
                                "name": &*w.name,
                                "reset": w.reset,
                                "time_zone": w.time_zone,
                                "limit": w.limit,
                                "used": w.used,
                                "remaining": w.remaining,
                                "reset_at": crate::clock::rfc3339(w.reset_at),
                            })
                        })
                        .collect();
                }
                Some(v)
            })
            .collect();
        serde_json::Value::Array(layers)
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        use GatewayError as E;
        match self {
            E::MissingCredentials { header } => no_retry(body(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing_api_key",
                format!("no credentials: send your API key in the {header} header"),
                json!({ "field": format!("header:{header}") }),
            )),
            E::InvalidApiKey => no_retry(body(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
                "the API key is not valid".into(),
                json!({}),
            )),
            E::UnknownAccount => no_retry(body(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "unknown_account",
                "the account is not known to the gateway".into(),
                json!({}),
            )),
            E::Suspended => no_retry(body(
                StatusCode::FORBIDDEN,
                "permission_error",
                "account_suspended",
                "the account is suspended".into(),
                json!({}),
            )),
            E::InvalidCost(e) => no_retry(body(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_cost",
                e.to_string(),
                json!({ "field": e.field() }),
            )),
            E::BodyTooLarge { limit } => no_retry(body(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "body_too_large",
                format!("the request body is larger than {limit} bytes"),
                json!({ "field": "body" }),
            )),
            E::BodyTimeout => body(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "request_body_timeout",
                "the request body did not arrive in time".into(),
                json!({ "field": "body" }),
            ),
            E::InvalidIdempotencyKey => no_retry(body(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
                json!({ "field": "header:idempotency-key" }),
            )),
            E::IdempotencyKeyInUse { decision_id } => retry_after(
                body(
                    StatusCode::CONFLICT,
                    "conflict_error",
                    "idempotency_key_in_use",
                    "a request with this Idempotency-Key is still running; retry when it has finished".into(),
                    json!({ "original_decision_id": decision_id.to_string() }),
                ),
                1,
            ),
            E::IdempotencyKeyCompleted { decision_id } => no_retry(body(
                StatusCode::CONFLICT,
                "conflict_error",
                "idempotency_key_completed",
                "a request with this Idempotency-Key has completed and was charged; its response was too large to keep, so it is not run again: look it up by its decision id, or send a new key to run it again".into(),
                json!({ "original_decision_id": decision_id.to_string() }),
            )),
            E::IdempotencyKeyMismatch { decision_id } => no_retry(body(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "idempotency_key_reused",
                "this Idempotency-Key was used for a different request (method, path or body); send a new key".into(),
                json!({ "original_decision_id": decision_id.to_string(), "field": "header:idempotency-key" }),
            )),
            E::Denied(report) => report.into_response(),
            E::LedgerBacklog => retry_after(
                body(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded_error",
                    "ledger_backlog",
                    "usage is waiting to be recorded; retry shortly".into(),
                    json!({}),
                ),
                1,
            ),
            E::LeaseUnavailable => retry_after(
                body(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded_error",
                    "lease_unavailable",
                    "this account's limits are shared exactly between gateways, and the ledger that shares them did not answer; retry shortly".into(),
                    json!({}),
                ),
                1,
            ),
            E::UpstreamTimeout => body(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                "upstream_timeout",
                "the upstream did not answer in time; nothing was charged".into(),
                json!({}),
            ),
            E::UpstreamUnavailable => body(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                "upstream_unavailable",
                "the upstream could not be reached; nothing was charged".into(),
                json!({}),
            ),
            E::RouteNotFound => no_retry(body(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "route_not_found",
                "no route matches this method and path".into(),
                json!({}),
            )),
            E::Internal => body(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "internal_error",
                "the gateway failed; nothing was charged".into(),
                json!({}),
            ),
        }
    }
}

impl IntoResponse for DenialReport {
    fn into_response(self) -> Response {
        let common = json!({
            "feature": self.feature,
            "units": self.units,
            "credits_per_unit": self.credits_per_unit,
            "credits_available": self.credits_available,
            "layers": self.layers,
        });
        match self.denial {
            Denial::UsageLimitReached { retry_at } => {
                let seconds = ((retry_at - self.now).max(0) as u64).div_ceil(1000).max(1);
                let mut extra = common;
                extra["reset_at"] = json!(crate::clock::rfc3339(retry_at));
                extra["retry_after_seconds"] = json!(seconds);
                let message = format!(
                    "usage limit reached for {}: retry after {} (at {}), or add credits to continue now ({} available, {} needed per unit)",
                    self.feature,
                    format_duration(seconds),
                    crate::clock::rfc3339(retry_at),
                    self.credits_available,
                    self.credits_per_unit
                );
                retry_after(
                    body(
                        StatusCode::TOO_MANY_REQUESTS,
                        "usage_limit_reached",
                        "usage_limit_reached",
                        message,
                        extra,
                    ),
                    seconds,
                )
            }
            Denial::InsufficientCredits {
                needed_credits,
                available_credits,
            } => {
                let mut extra = common;
                extra["credits_needed"] = json!(needed_credits);
                let short = needed_credits
                    .checked_div(self.credits_per_unit)
                    .unwrap_or(0);
                let message = format!(
                    "insufficient credits for {}: {short} of the {} units asked for are not covered by the plan's limits or the {available_credits} credits available; they need {needed_credits} more credits ({} per unit). Waiting will not help",
                    self.feature, self.units, self.credits_per_unit
                );
                let (status, kind, code) = match self.credits_denial {
                    CreditsDenial::PaymentRequired => (
                        StatusCode::PAYMENT_REQUIRED,
                        "insufficient_credits",
                        "insufficient_credits",
                    ),
                    CreditsDenial::InsufficientQuota => (
                        StatusCode::TOO_MANY_REQUESTS,
                        "insufficient_quota",
                        "insufficient_quota",
                    ),
                };
                no_retry(body(status, kind, code, message, extra))
            }
            Denial::NotEntitled => no_retry(body(
                StatusCode::FORBIDDEN,
                "permission_error",
                "not_entitled",
                format!("the account's plan does not include {}", self.feature),
                common,
            )),
            Denial::ConcurrencyLimit { limit, running } => {
                let mut extra = common;
                extra["limit"] = json!(limit);
                extra["running"] = json!(running);
                let message = format!(
                    "{running} requests of {} are running, the plan's limit at once is {limit}: retry when one has finished",
                    self.feature
                );
                // Nobody knows when a running request ends; a second is a polite first wait.
                retry_after(
                    body(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limit_error",
                        "concurrency_limit_reached",
                        message,
                        extra,
                    ),
                    1,
                )
            }
        }
    }
}

/// The last event of a watched stream the gateway stopped because the account could not pay
/// for what came next: the error body's shape as an SSE `data:` event (OpenAI's SDKs raise an
/// event carrying `error` as an `APIError`), then the stream ends.
pub fn stream_stopped_event(feature: &str, delivered: u64, denial: &Denial) -> bytes::Bytes {
    let (kind, why) = match denial {
        Denial::UsageLimitReached { .. } => ("usage_limit_reached", "its usage limit is reached"),
        Denial::InsufficientCredits { .. } => (
            "insufficient_credits",
            "the account has no credits left to pay for more",
        ),
        Denial::NotEntitled => ("permission_error", "the plan does not include it"),
        Denial::ConcurrencyLimit { .. } => ("rate_limit_error", "too many requests are running"),
    };
    let error = json!({
        "error": {
            "type": kind,
            "code": "stream_stopped",
            "message": format!(
                "the stream was stopped after {delivered} units of {feature}: {why}; those {delivered} units were charged"
            ),
            "units_delivered": delivered,
        }
    });
    bytes::Bytes::from(format!("data: {error}\n\n"))
}
