//! The metering layer: how much of a request is allowed and from which pools, held while the
//! inner service answers, settled or released when the answer ends. Its phases, in order:
//! **cost** → **claim** the idempotency key → **decide** and hold → forward (the inner
//! service) → **respond**. See [`super::layers`] for the stack it sits in.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Request};
use http_body_util::BodyExt;
use smallvec::SmallVec;
use tower::{Layer, Service, ServiceExt};
use uuid::Uuid;

use super::body::{MeteredBody, Watching};
use super::coalesce::Coalesced;
use super::layers::{
    Answer, Attribution, DecisionId, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, LogFields, LogOutcome,
    POOLS, REPLAY_OF, SHADOW, refused,
};
use crate::accounts::Account;
use crate::app::App;
use crate::clock::Stopwatch;
use crate::config::{Durability, IdempotencyMode, Route};
use crate::cost;
use crate::hold::Hold;
use crate::idempotency::{self, Claim, Fingerprint, StoredResponse};
use crate::ids::IdempotencyKey;
use crate::quota::Quota;
use crate::rescue::{DenialReport, GatewayError, WindowReport};
use crate::settle::SettleReader;
use crate::usage::{LedgerEntry, Outcome, Shadow};
use crate::watch::Watcher;
use crate::waterfall::{self, Decision, LayerKind, Millis};

/// Decides how much of the request is allowed and from which pools, holds it while the inner
/// service answers, and settles or releases the hold when the answer ends.
#[derive(Clone)]
pub struct Meter<S> {
    inner: S,
    app: Arc<App>,
    route: Arc<Route>,
}

impl<S> Meter<S> {
    /// The layer, for requests of `route`.
    pub fn layer(app: Arc<App>, route: Arc<Route>) -> impl Layer<S, Service = Meter<S>> {
        tower::layer::layer_fn(move |inner| Meter {
            inner,
            app: app.clone(),
            route: route.clone(),
        })
    }
}

impl<S, B> Service<Request<Body>> for Meter<S>
where
    S: Service<Request<Body>, Response = http::Response<B>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError> + Send,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The inner service is made ready in `call`: its refusal is an answer, not an error.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Answer {
        let (app, route, inner) = (self.app.clone(), self.route.clone(), self.inner.clone());
        Box::pin(async move {
            let mut log = LogFields::default();
            match meter(&app, &route, inner, req, &mut log).await {
                Ok(mut response) => {
                    response.extensions_mut().insert(log);
                    Ok(response)
                }
                Err(e) => Ok(refused(e, log)),
            }
        })
    }
}

/// The phases of one metered request.
async fn meter<S, B>(
    app: &App,
    route: &Route,
    inner: S,
    req: Request<Body>,
    log: &mut LogFields,
) -> Result<Response, GatewayError>
where
    S: Service<Request<Body>, Response = http::Response<B>, Error = GatewayError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError> + Send,
{
    let decision_id = req
        .extensions()
        .get::<DecisionId>()
        .map_or_else(Uuid::now_v7, |d| d.0);
    let account = req
        .extensions()
        .get::<Arc<Account>>()
        .cloned()
        .ok_or(GatewayError::Internal)?;
    log.account = Some(account.id.clone());

    // A route that re-executes leaves the key to the upstream (it is forwarded as sent).
    let key = match req.headers().get(&IDEMPOTENCY_KEY) {
        Some(v) if route.idempotency == IdempotencyMode::Replay => Some(idempotency_key(v)?),
        _ => None,
    };
    let (units, fingerprint, model, mut req) =
        match cost_at_once(app, route, &account, req, key.is_some())? {
            Ok(costed) => costed,
            // Boxed: the body's wait would otherwise make every request's future larger.
            Err(req) => Box::pin(cost(app, route, &account, req, key.is_some())).await?,
        };
    log.units = units;
    req.extensions_mut().insert(Attribution {
        account: account.id.clone(),
        decision_id,
    });
    let claim = match &key {
        None => None,
        Some(key) => match app
            .idempotency
            .claim(&account.id, key, fingerprint, decision_id)
        {
            Claim::Claimed(claim) => Some(claim),
            Claim::InFlight(id) => {
                return Err(GatewayError::IdempotencyKeyInUse { decision_id: id });
            }
            Claim::Mismatch(id) => {
                return Err(GatewayError::IdempotencyKeyMismatch { decision_id: id });
            }
            Claim::Charged(original, stored) => {
                log.outcome = LogOutcome::Replay;
                let replay = Replay {
                    decision_id,
                    original,
                    units,
                    key: key.clone(),
                };
                return replay.answer(app, route, &account, stored.as_deref());
            }
        },
    };

    // A strict plan's request may first wait for lease rounds (`crate::strict`); after
    // `ROUNDS_MAX` of them it is decided on the slices it has.
    let shadow = in_shadow(app, route, &account);
    let mut rounds = 0;
    let (decided, now) = loop {
        let now = app.clock.now_ms();
        let lease_check = rounds < crate::strict::ROUNDS_MAX;
        if let Some(decided) = decide(app, route, &account, units, now, lease_check, shadow) {
            break (decided, now);
        }
        rounds += 1;
        Box::pin(app.strict.round(&account, route.feature, units))
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, account = %account.id, "strict-mode lease round failed");
                GatewayError::LeaseUnavailable
            })?;
    };
    let mut entry = new_entry(
        app,
        &account,
        route,
        decided.decision,
        decision_id,
        key,
        now,
    );
    entry.model = model;
    if shadow {
        let shadowed = Shadowed {
            entry,
            claim,
            quota: decided.quota,
            denial: decided.denial,
        };
        return Box::pin(forward_shadow(
            app, route, inner, req, &account, shadowed, log,
        ))
        .await;
    }
    let Some(denial) = decided.denial else {
        log.outcome = LogOutcome::Admitted {
            draws: entry.decision.draws.len(),
        };
        let pools = pools_header(&account.plan, &entry.decision);
        let mut hold = Hold::new(
            account.clone(),
            entry,
            claim,
            app.ledger.clone(),
            app.clock.clone(),
        );
        if app.settings.store.durability == Durability::Strict {
            hold.require_commit();
        }
        let held = Held {
            pools,
            hold,
            quota: decided.quota,
        };
        return forward_held(app, route, inner, req, held, log).await;
    };
    log.outcome = LogOutcome::Denied(denial.code);
    Ok(deny(
        app,
        &account,
        route,
        entry,
        denial,
        decided.quota,
        now,
    ))
}

/// What phase **cost** found: units, fingerprint, model, and the request to go on with.
type Costed = (u64, Fingerprint, Option<Arc<str>>, Request<Body>);

/// Phase **cost** when nothing of the body is needed: the units by the route's rule, from
/// the headers. `Ok(Err(req))`: the rule reads the body, a model, or a key: see [`cost`].
fn cost_at_once(
    app: &App,
    route: &Route,
    account: &Account,
    req: Request<Body>,
    keyed: bool,
) -> Result<Result<Costed, Request<Body>>, GatewayError> {
    if cost::needs_body(&route.cost) || route.model.is_some() || keyed {
        return Ok(Err(req));
    }
    let units = cost::units_or(&route.cost, route.cost_default, req.headers(), &[])?;
    let units = priced_estimate(app, route, account, None, units)?;
    Ok(Ok((units, Fingerprint::default(), None, req)))
}

/// Phase **cost**: the request's units by its route's rule (priced by the plan's rates when
/// the rule reads a dimension), its model when the route reads one, and, for a request with
/// an idempotency key, its fingerprint. A rule that reads the body, a model, or a key, takes
/// the body whole (at most `request_body_bytes_max`) and hands it on.
async fn cost(
    app: &App,
    route: &Route,
    account: &Account,
    req: Request<Body>,
    keyed: bool,
) -> Result<Costed, GatewayError> {
    let (parts, body) = req.into_parts();
    let limit = app.settings.server.request_body_bytes_max;
    let timeout = std::time::Duration::from_millis(app.settings.server.client_body_timeout_ms);
    let bytes = tokio::time::timeout(timeout, http_body_util::Limited::new(body, limit).collect())
        .await
        .map_err(|_| GatewayError::BodyTimeout)?
        .map_err(|_| GatewayError::BodyTooLarge { limit })?
        .to_bytes();
    let units = cost::units_or(&route.cost, route.cost_default, &parts.headers, &bytes)?;
    let model = match &route.model {
        Some(pointer) => cost::model(pointer, &bytes)?,
        None => None,
    };
    let units = priced_estimate(app, route, account, model.as_deref(), units)?;
    let print = if keyed {
        idempotency::fingerprint(&parts.method, &parts.uri, units, &bytes)
    } else {
        Fingerprint::default()
    };
    Ok((
        units,
        print,
        model,
        Request::from_parts(parts, Body::from(bytes)),
    ))
}

/// The estimate in units: `units` as they are, or, on a route whose rule reads a dimension
/// (`cost_dimension`), that quantity at the plan's rates for `model`. A model the plan's
/// rates do not price is refused, naming the field.
fn priced_estimate(
    app: &App,
    route: &Route,
    account: &Account,
    model: Option<&str>,
    units: u64,
) -> Result<u64, GatewayError> {
    let (_, prices) = account.plan.prices_at(app.clock.now_ms());
    let Some(rates) = prices.rates(route.feature) else {
        return Ok(units);
    };
    if rates.row(model).is_none() {
        return Err(cost::CostError::UnpricedModel {
            field: route.model.clone().unwrap_or_else(|| "model".into()),
            model: model.unwrap_or_default().to_owned(),
        }
        .into());
    }
    match &route.cost_dimension {
        None => Ok(units),
        Some(dim) => rates
            .units(model, [(&**dim, units)])
            .ok_or_else(|| cost::CostError::NotUnits(dim.to_string()).into()),
    }
}

fn idempotency_key(value: &HeaderValue) -> Result<IdempotencyKey, GatewayError> {
    value
        .to_str()
        .ok()
        .and_then(|k| IdempotencyKey::parse(k).ok())
        .ok_or(GatewayError::InvalidIdempotencyKey)
}

/// Whether the request runs in shadow mode: its route, its account's plan (by name, as the
/// configuration serving it has it: a reload switches it) or its account is.
fn in_shadow(app: &App, route: &Route, account: &Account) -> bool {
    route.shadow
        || account.shadow
        || (!app.settings.shadow_plans.is_empty()
            && app.settings.shadow_plans.contains(&*account.plan.name))
}

/// What phase **decide** found, read under the account's lock in one go.
struct Decided {
    decision: Decision,
    /// The numbers for the `x-ratelimit-*` headers, this request's hold included.
    quota: Quota,
    /// Why it was denied, with the windows' numbers; `None` when admitted (and held).
    denial: Option<Denied>,
}

/// A denial's facts, copied out of the lock; its JSON is built after the lock is released.
struct Denied {
    denial: waterfall::Denial,
    code: &'static str,
    windows: SmallVec<[WindowReport; 4]>,
}

/// Phase **decide**: the waterfall against the account's view; an admitted decision's draws
/// are reserved at once, under the same lock, so concurrent requests see each other's holds.
/// `None` when a strict plan's slices would not let the waterfall walk in order
/// (`lease_check`): a lease round comes first. A `shadow` decision is made the same way; only
/// its counted draws are held (`usage::shadow_part`): no balance is touched.
fn decide(
    app: &App,
    route: &Route,
    account: &Account,
    units: u64,
    now: Millis,
    lease_check: bool,
    shadow: bool,
) -> Option<Decided> {
    let feature = route.feature;
    let started = Stopwatch::start();
    let decided = account.with_states(|plan, state, pool| {
        if lease_check
            && plan.strict
            && !waterfall::lease_wants(plan, state, feature, units, now).is_empty()
        {
            return None;
        }
        let decision = waterfall::decide_in(plan, state, pool.as_deref(), feature, units, now);
        let denial = match decision.denial {
            None => {
                if shadow {
                    let held = crate::usage::shadow_part(&decision);
                    waterfall::reserve_in(plan, state, pool, &held, now);
                } else {
                    waterfall::reserve_in(plan, state, pool, &decision, now);
                }
                waterfall::start_request(plan, state, feature);
                None
            }
            Some(denial) => Some(Denied {
                denial,
                code: denial_code(&denial),
                windows: decision
                    .layers
                    .iter()
                    .filter(|r| {
                        matches!(
                            plan.layers.get(r.layer as usize).map(|l| &l.kind),
                            Some(LayerKind::UsageLimit { .. })
                        )
                    })
                    .flat_map(|r| {
                        state
                            .windows(plan, r.layer as usize, now)
                            .map(move |w| WindowReport::of(r.layer, &w))
                    })
                    .collect(),
            }),
        };
        Some(Decided {
            quota: Quota::snapshot(plan, state, feature, now),
            decision,
            denial,
        })
    })?;
    app.metrics.decision_seconds.observe(started.seconds());
    let feature_name = &app.settings.features[feature.0 as usize];
    let outcome = decided.denial.as_ref().map_or("admitted", |d| d.code);
    if shadow {
        // Counted apart: a would-be denial is not a denial, and shadow draws pay nothing.
        let verdict = if decided.denial.is_some() {
            "would_deny"
        } else {
            "would_admit"
        };
        app.metrics
            .shadow_decisions
            .with_label_values(&[feature_name, verdict, outcome])
            .inc();
        return Some(decided);
    }
    app.metrics
        .decisions
        .with_label_values(&[feature_name, outcome])
        .inc();
    if decided.denial.is_none() {
        for report in decided.decision.layers.iter().filter(|r| r.gave_units > 0) {
            if let Some(layer) = account.plan.layers.get(report.layer as usize) {
                app.metrics
                    .layer_units
                    .with_label_values(&[feature_name, &layer.name])
                    .inc_by(report.gave_units);
            }
        }
    }
    Some(decided)
}

/// A denied request: recorded, and answered with every layer's numbers.
fn deny(
    app: &App,
    account: &Account,
    route: &Route,
    entry: LedgerEntry,
    denied: Denied,
    quota: Quota,
    now: Millis,
) -> Response {
    let report = DenialReport {
        denial: denied.denial,
        credits_denial: app.settings.server.credits_denial,
        feature: app.settings.features[route.feature.0 as usize].to_string(),
        units: entry.decision.units,
        credits_per_unit: entry.decision.credits_per_unit,
        credits_available: quota.credits,
        layers: DenialReport::layers(&account.plan, &entry.decision, &denied.windows),
        now,
    };
    app.ledger.push(LedgerEntry {
        outcome: Outcome::Denied,
        code: Some(denied.code),
        completed_at: now,
        ..entry
    });
    let mut response = GatewayError::Denied(Box::new(report)).into_response();
    quota.apply(response.headers_mut(), &app.rate_limit_headers);
    response
}

/// An admitted request's hold and the headers its answer will carry.
struct Held {
    hold: Hold,
    quota: Quota,
    pools: HeaderValue,
}

/// Phases **forward** and **respond** of an admitted request. Dropping this future (the client
/// went away) drops the hold: released.
async fn forward_held<S, B>(
    app: &App,
    route: &Route,
    inner: S,
    req: Request<Body>,
    held: Held,
    log: &mut LogFields,
) -> Result<Response, GatewayError>
where
    S: Service<Request<Body>, Response = http::Response<B>, Error = GatewayError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError> + Send,
{
    let Held {
        mut hold,
        quota,
        pools,
    } = held;
    let response = match inner.oneshot(req).await {
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
    hold.set_upstream_status(response.status().as_u16());
    let (mut parts, body) = response.into_parts();
    if parts.status.is_success() {
        let content_type = parts.headers.get(http::header::CONTENT_TYPE).cloned();
        hold.capture(parts.status, content_type);
    }
    quota.apply(&mut parts.headers, &app.rate_limit_headers);
    parts.headers.insert(POOLS, pools);
    let body = if !parts.status.is_success() {
        log.outcome = LogOutcome::UpstreamError(parts.status.as_u16());
        hold.end(Outcome::UpstreamError);
        Body::new(body)
    } else {
        // A route that does not settle still watches a stream for its `[DONE]`: a client that
        // closes after it got the whole response (`MeteredBody`'s `Drop`).
        let settle = match &route.settle {
            Some(rule) => Some(SettleReader::new(rule, &parts.headers)),
            None => SettleReader::done_watcher(&parts.headers),
        };
        if body.is_end_stream() {
            if let Some(reader) = settle.filter(SettleReader::settles) {
                hold.settle(reader.finish());
            }
            if let Some(commit) = hold.end(Outcome::Completed) {
                commit.wait().await; // strict durability: answer once the charge is committed
            }
            Body::new(body)
        } else {
            hold.on_drop(Outcome::ClientAborted);
            // A watched route watches its event streams; any other body settles as usual.
            let watch = route
                .watch
                .as_ref()
                .filter(|_| crate::settle::is_event_stream(&parts.headers))
                .map(|rule| Watching {
                    watcher: Watcher::new(rule, app.clock.now_ms()),
                    feature: app.settings.features[route.feature.0 as usize].clone(),
                    clock: app.clock.clone(),
                    metrics: app.metrics.clone(),
                });
            Body::new(MeteredBody::new(Coalesced::new(body), hold, settle, watch))
        }
    };
    Ok(Response::from_parts(parts, body))
}

/// A shadow-mode request's decision, its entry and its claimed key.
struct Shadowed {
    entry: LedgerEntry,
    claim: Option<idempotency::ClaimedKey>,
    quota: Quota,
    denial: Option<Denied>,
}

/// A request in shadow mode: forwarded whatever the waterfall said, never charged, and
/// recorded with what enforcing would have done (the entry's `shadow`, and a would-be
/// denial's code), which the answer says too ([`SHADOW`]). The hold keeps only the decision's
/// counted draws (`crate::hold`).
async fn forward_shadow<S, B>(
    app: &App,
    route: &Route,
    inner: S,
    req: Request<Body>,
    account: &Arc<Account>,
    shadowed: Shadowed,
    log: &mut LogFields,
) -> Result<Response, GatewayError>
where
    S: Service<Request<Body>, Response = http::Response<B>, Error = GatewayError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<axum::BoxError> + Send,
{
    let Shadowed {
        mut entry,
        claim,
        quota,
        denial,
    } = shadowed;
    let verdict = match &denial {
        None => {
            entry.shadow = Some(Shadow::Admit);
            log.outcome = LogOutcome::Shadow { denied: None };
            format!("would-admit; credits={}", entry.decision.credits())
        }
        Some(denied) => {
            entry.shadow = Some(Shadow::Deny);
            entry.code = Some(denied.code);
            log.outcome = LogOutcome::Shadow {
                denied: Some(denied.code),
            };
            format!("would-deny; code={}", denied.code)
        }
    };
    let pools = pools_header(&account.plan, &entry.decision);
    // No commit to wait for, whatever the durability: nothing is charged.
    let hold = Hold::new(
        account.clone(),
        entry,
        claim,
        app.ledger.clone(),
        app.clock.clone(),
    );
    let held = Held { pools, hold, quota };
    let mut response = forward_held(app, route, inner, req, held, log).await?;
    if let Ok(v) = HeaderValue::try_from(verdict) {
        response.headers_mut().insert(SHADOW, v);
    }
    Ok(response)
}

/// A repeat of a key already charged: answered here with the kept response (or told the key
/// has completed), never forwarded, recorded, not charged.
struct Replay {
    decision_id: Uuid,
    original: Uuid,
    units: u64,
    key: IdempotencyKey,
}

impl Replay {
    fn answer(
        self,
        app: &App,
        route: &Route,
        account: &Account,
        stored: Option<&StoredResponse>,
    ) -> Result<Response, GatewayError> {
        let now = app.clock.now_ms();
        let (price_table, prices) = account.plan.prices_at(now);
        let decision = Decision {
            feature: route.feature,
            units: self.units,
            credits_per_unit: prices.price(route.feature).unwrap_or(0),
            price_table,
            denial: None,
            draws: Default::default(),
            layers: Default::default(),
        };
        let mut entry = new_entry(
            app,
            account,
            route,
            decision,
            self.decision_id,
            Some(self.key),
            now,
        );
        entry.outcome = Outcome::Replay;
        entry.code = Some(if stored.is_some() {
            "replayed_response"
        } else {
            "idempotency_key_completed"
        });
        app.ledger.push(entry);
        let Some(stored) = stored else {
            return Err(GatewayError::IdempotencyKeyCompleted {
                decision_id: self.original,
            });
        };
        let mut response = Response::new(Body::from(stored.body.clone()));
        *response.status_mut() = stored.status;
        let headers = response.headers_mut();
        if let Some(ct) = &stored.content_type {
            headers.insert(http::header::CONTENT_TYPE, ct.clone());
        }
        headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        if let Ok(v) = HeaderValue::try_from(self.original.to_string()) {
            headers.insert(REPLAY_OF, v);
        }
        Ok(response)
    }
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
        model: None,
        quantities: None,
        forgiven_units: 0,
        decision,
        outcome: Outcome::Internal,
        code: None,
        upstream_status: None,
        idempotency_key,
        decided_at: now,
        completed_at: now,
        committed: None,
        shadow: None,
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
        waterfall::Denial::ConcurrencyLimit { .. } => "concurrency_limit_reached",
    }
}
