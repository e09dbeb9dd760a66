//! The hot path, in named phases: identify → cost → decide and hold → forward → settle.
//!
//! Nothing here touches the store. The decision runs against the account's in-memory view
//! under its lock (no `.await` while it is held); the hold then travels with the response
//! body and ends when the body does.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, request};
use http_body::Body as _;
use http_body_util::BodyExt;
use uuid::Uuid;

use super::body::MeteredBody;
use crate::accounts::Account;
use crate::app::App;
use crate::config::{IdentityMode, Route};
use crate::cost;
use crate::hold::Hold;
use crate::idempotency::Claim;
use crate::identity::identify;
use crate::ids::{AccountId, IdempotencyKey};
use crate::quota::Quota;
use crate::rescue::{DenialReport, GatewayError};
use crate::settle::SettleReader;
use crate::usage::{LedgerEntry, Outcome};
use crate::waterfall::{self, Decision, Millis};

/// Header carrying the decision id on every answer.
pub const DECISION_ID: HeaderName = HeaderName::from_static("x-flowgate-decision-id");
/// Header naming the decision that charged a replayed `Idempotency-Key`.
pub const REPLAY_OF: HeaderName = HeaderName::from_static("x-flowgate-replay-of");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Header saying which layers paid how many units of an admitted request.
pub const POOLS: HeaderName = HeaderName::from_static("x-flowgate-pools");
const ACCOUNT: HeaderName = HeaderName::from_static("x-flowgate-account");

/// Handles one proxied request on `route`.
pub(super) async fn handle(app: Arc<App>, route: Arc<Route>, req: Request) -> Response {
    let started = crate::clock::Stopwatch::start();
    let decision_id = Uuid::now_v7();
    let request_id = req.headers().get(&REQUEST_ID).cloned();
    let mut log = Log::default();
    let mut response = match proxy(&app, &route, req, decision_id, &mut log).await {
        Ok(r) => r,
        Err(e) => {
            log.outcome = LogOutcome::Error(e.to_string());
            e.into_response()
        }
    };
    let id =
        HeaderValue::try_from(decision_id.to_string()).unwrap_or(HeaderValue::from_static("-"));
    let request_id = request_id.unwrap_or_else(|| id.clone());
    tracing::info!(
        target: "flowgate::access",
        request_id = request_id.to_str().unwrap_or("-"),
        decision_id = %decision_id,
        account = log.account.as_deref().unwrap_or("-"),
        feature = &*app.settings.features[route.feature.0 as usize],
        units = log.units,
        decision = %log.outcome,
        status = response.status().as_u16(),
        latency_us = started.elapsed().as_micros() as u64,
        "request"
    );
    let headers = response.headers_mut();
    headers.insert(REQUEST_ID, request_id);
    headers.insert(DECISION_ID, id);
    response
}

/// What the access log line says about a request.
#[derive(Default)]
struct Log {
    account: Option<AccountId>,
    units: u64,
    outcome: LogOutcome,
}

/// The access log's `decision` field; formatted only when the line is written, so that an
/// admitted request builds no string for it.
#[derive(Default)]
enum LogOutcome {
    #[default]
    None,
    Replay,
    Denied(&'static str),
    Admitted {
        draws: usize,
    },
    UpstreamError(u16),
    /// A refusal before or after the decision (the error's message).
    Error(String),
}

impl std::fmt::Display for LogOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogOutcome::None => Ok(()),
            LogOutcome::Replay => f.write_str("replay"),
            LogOutcome::Denied(code) => write!(f, "denied:{code}"),
            LogOutcome::Admitted { draws } => write!(f, "admitted:{draws}"),
            LogOutcome::UpstreamError(status) => write!(f, "upstream_error:{status}"),
            LogOutcome::Error(message) => f.write_str(message),
        }
    }
}

async fn proxy(
    app: &App,
    route: &Route,
    req: Request,
    decision_id: Uuid,
    log: &mut Log,
) -> Result<Response, GatewayError> {
    // Phase 1: identify.
    let account = identify(app, req.headers())?;
    log.account = Some(account.id.clone());
    if account.suspended {
        return Err(GatewayError::Suspended);
    }
    if app.ledger.full() {
        return Err(GatewayError::LedgerBacklog);
    }

    // Phase 2: cost.
    let (parts, body) = req.into_parts();
    let (units, body) = if cost::needs_body(&route.cost) {
        let limit = app.settings.server.request_body_bytes_max;
        let bytes = http_body_util::Limited::new(body, limit)
            .collect()
            .await
            .map_err(|_| GatewayError::BodyTooLarge { limit })?
            .to_bytes();
        (
            cost::units(&route.cost, &parts.headers, &bytes)?,
            Body::from(bytes),
        )
    } else {
        (cost::units(&route.cost, &parts.headers, &[])?, body)
    };
    log.units = units;
    let idempotency_key = match parts.headers.get(&IDEMPOTENCY_KEY) {
        None => None,
        Some(v) => Some(idempotency_key(v)?),
    };

    // Phase 3: decide and hold.
    let claim = match &idempotency_key {
        None => None,
        Some(key) => match app.idempotency.claim(&account.id, key, decision_id) {
            Claim::Claimed(claim) => Some(claim),
            Claim::InFlight(id) => {
                return Err(GatewayError::IdempotencyKeyInUse { decision_id: id });
            }
            Claim::Charged(original) => {
                log.outcome = LogOutcome::Replay;
                return replay(
                    app,
                    route,
                    &account,
                    parts,
                    body,
                    decision_id,
                    original,
                    units,
                    key.clone(),
                )
                .await;
            }
        },
    };
    let now = app.clock.now_ms();
    let feature = route.feature;
    let decide_started = crate::clock::Stopwatch::start();
    let (decision, quota, denial_layers) = account.with_state(|plan, state| {
        let decision = waterfall::decide(plan, state, feature, units, now);
        let denial_layers = if decision.admitted() {
            waterfall::reserve(plan, state, &decision, now);
            None
        } else {
            Some(super::explain_layers(plan, state, &decision, now))
        };
        (
            decision,
            Quota::snapshot(plan, state, feature, now),
            denial_layers,
        )
    });
    app.metrics
        .decision_seconds
        .observe(decide_started.elapsed().as_secs_f64());
    let feature_name = &app.settings.features[feature.0 as usize];
    let entry = new_entry(
        app,
        &account,
        route,
        decision,
        decision_id,
        idempotency_key,
        now,
    );

    if let Some(layers) = denial_layers {
        let Some(denial) = entry.decision.denial else {
            return Err(GatewayError::Internal);
        };
        log.outcome = LogOutcome::Denied(denial_code(&denial));
        app.metrics
            .decisions
            .with_label_values(&[feature_name, denial_code(&denial)])
            .inc();
        let report = DenialReport {
            denial,
            credits_denial: app.settings.server.credits_denial,
            feature: entry.feature.to_string(),
            units,
            credits_per_unit: entry.decision.credits_per_unit,
            credits_available: quota.credits,
            layers,
            now,
        };
        app.ledger.push(LedgerEntry {
            outcome: Outcome::Denied,
            code: Some(denial_code(&denial)),
            completed_at: now,
            ..entry
        });
        let mut response = GatewayError::Denied(Box::new(report)).into_response();
        quota.apply(response.headers_mut(), &app.rate_limit_headers);
        return Ok(response);
    }
    log.outcome = LogOutcome::Admitted {
        draws: entry.decision.draws.len(),
    };
    let pools = pools_header(&account.plan, &entry.decision);
    app.metrics
        .decisions
        .with_label_values(&[feature_name, "admitted"])
        .inc();
    for report in entry.decision.layers.iter().filter(|r| r.gave_units > 0) {
        if let Some(layer) = account.plan.layers.get(report.layer as usize) {
            app.metrics
                .layer_units
                .with_label_values(&[feature_name, &layer.name])
                .inc_by(report.gave_units);
        }
    }
    let mut hold = Hold::new(
        account.clone(),
        entry,
        claim,
        app.ledger.clone(),
        app.clock.clone(),
    );

    // Phase 4: forward. Dropping this future (client gone) drops the hold: released.
    let upstream = forward(app, route, &account, parts, body, decision_id).await;
    let response = match upstream {
        Ok(r) => r,
        Err(e) => {
            hold.end(if matches!(e, GatewayError::UpstreamTimeout) {
                Outcome::UpstreamTimeout
            } else {
                Outcome::UpstreamUnavailable
            });
            return Err(e);
        }
    };

    // Phase 5: settle when the body has been delivered; release at once if it failed.
    hold.set_upstream_status(response.status().as_u16());
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    quota.apply(&mut parts.headers, &app.rate_limit_headers);
    parts.headers.insert(POOLS, pools);
    let body = if !parts.status.is_success() {
        log.outcome = LogOutcome::UpstreamError(parts.status.as_u16());
        hold.end(Outcome::UpstreamError);
        Body::new(body)
    } else {
        let settle = route
            .settle
            .as_ref()
            .map(|rule| SettleReader::new(rule, &parts.headers));
        if body.is_end_stream() {
            if let Some(reader) = settle {
                hold.settle(reader.finish());
            }
            hold.end(Outcome::Completed);
            Body::new(body)
        } else {
            hold.on_drop(Outcome::ClientAborted);
            Body::new(MeteredBody::new(body, hold, settle))
        }
    };
    Ok(Response::from_parts(parts, body))
}

/// A repeat of a key already charged: forwarded (the upstream may answer it from its own
/// idempotency cache), recorded, not charged.
#[allow(clippy::too_many_arguments)]
async fn replay(
    app: &App,
    route: &Route,
    account: &Arc<Account>,
    parts: request::Parts,
    body: Body,
    decision_id: Uuid,
    original: Uuid,
    units: u64,
    key: IdempotencyKey,
) -> Result<Response, GatewayError> {
    let now = app.clock.now_ms();
    let decision = Decision {
        feature: route.feature,
        units,
        credits_per_unit: account.plan.price(route.feature).unwrap_or(0),
        denial: None,
        draws: Default::default(),
        layers: Default::default(),
    };
    let mut entry = new_entry(app, account, route, decision, decision_id, Some(key), now);
    entry.outcome = Outcome::Replay;
    let result = forward(app, route, account, parts, body, decision_id).await;
    entry.upstream_status = result.as_ref().ok().map(|r| r.status().as_u16());
    entry.completed_at = app.clock.now_ms();
    app.ledger.push(entry);
    let response = result?;
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(v) = HeaderValue::try_from(original.to_string()) {
        parts.headers.insert(REPLAY_OF, v);
    }
    Ok(Response::from_parts(parts, Body::new(body)))
}

fn new_entry(
    app: &App,
    account: &Account,
    route: &Route,
    decision: Decision,
    decision_id: Uuid,
    idempotency_key: Option<IdempotencyKey>,
    now: Millis,
) -> LedgerEntry {
    LedgerEntry {
        decision_id,
        account: account.id.clone(),
        plan: account.plan.clone(),
        feature: app.settings.features[route.feature.0 as usize].clone(),
        used_units: decision.units,
        forgiven_units: 0,
        decision,
        outcome: Outcome::Internal,
        code: None,
        upstream_status: None,
        idempotency_key,
        decided_at: now,
        completed_at: now,
    }
}

/// `x-flowgate-pools`: which layers paid how many units, e.g. `tasks=3,credits=7`.
fn pools_header(plan: &waterfall::Plan, decision: &Decision) -> HeaderValue {
    let mut out = String::new();
    for report in decision.layers.iter().filter(|r| r.gave_units > 0) {
        if let Some(layer) = plan.layers.get(report.layer as usize) {
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(&layer.name);
            out.push('=');
            out.push_str(&report.gave_units.to_string());
        }
    }
    HeaderValue::try_from(out).unwrap_or(HeaderValue::from_static(""))
}

fn denial_code(denial: &waterfall::Denial) -> &'static str {
    match denial {
        waterfall::Denial::UsageLimitReached { .. } => "usage_limit_reached",
        waterfall::Denial::InsufficientCredits { .. } => "insufficient_credits",
        waterfall::Denial::NotEntitled => "not_entitled",
    }
}

fn idempotency_key(value: &HeaderValue) -> Result<IdempotencyKey, GatewayError> {
    value
        .to_str()
        .ok()
        .and_then(|k| IdempotencyKey::parse(k).ok())
        .ok_or(GatewayError::InvalidIdempotencyKey)
}

/// Sends the request to the route's upstream and waits (at most `upstream_timeout_ms`) for
/// its response headers. The body is not awaited: it streams.
async fn forward(
    app: &App,
    route: &Route,
    account: &Account,
    mut parts: request::Parts,
    body: Body,
    decision_id: Uuid,
) -> Result<http::Response<hyper::body::Incoming>, GatewayError> {
    let upstream = &app.settings.upstreams[route.upstream];
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = http::Uri::builder()
        .scheme("http")
        .authority(upstream.base.clone())
        .path_and_query(path)
        .build()
        .map_err(|_| GatewayError::Internal)?;
    parts.version = http::Version::HTTP_11;
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    if app.settings.identity.mode == IdentityMode::ApiKey {
        // The upstream trusts the gateway; the client's key is not its business.
        headers.remove(app.settings.identity.header.as_str());
    }
    if let Ok(v) = HeaderValue::try_from(&*account.id) {
        headers.insert(ACCOUNT, v);
    }
    if let Ok(v) = HeaderValue::try_from(decision_id.to_string()) {
        headers.insert(DECISION_ID, v);
    }
    let request = http::Request::from_parts(parts, body);
    let started = crate::clock::Stopwatch::start();
    let result = tokio::time::timeout(app.upstream_timeout, app.client.request(request)).await;
    app.metrics
        .upstream_seconds
        .with_label_values(&[&upstream.name])
        .observe(started.elapsed().as_secs_f64());
    match result {
        Err(_) => Err(GatewayError::UpstreamTimeout),
        Ok(Err(e)) => {
            tracing::warn!(upstream = %upstream.name, error = %e, "upstream request failed");
            Err(GatewayError::UpstreamUnavailable)
        }
        Ok(Ok(response)) => Ok(response),
    }
}

/// Removes the headers that describe one connection, not the message (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(listed) = headers.get(header::CONNECTION).cloned() {
        if let Ok(listed) = listed.to_str() {
            for name in listed.split(',') {
                headers.remove(name.trim());
            }
        }
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}
