//! The hot path as tower layers over a forwarding service, outermost first:
//!
//! 1. [`AccessLog`]: gives the request its decision id, and writes the access log line.
//! 2. [`Identify`]: who the request acts for (401 unknown, 403 suspended, 503 ledger backlog).
//! 3. [`Meter`] (in `meter.rs`): the request's phases — **cost** → **claim** its idempotency
//!    key → **decide** and hold → call the inner service → **respond** (settle as the body
//!    streams, or release).
//! 4. the inner service: [`super::forward::Forward`], or any service answering
//!    `Request<Body>` with `Response<B>` and a [`GatewayError`] when it fails.
//!
//! Nothing here touches the store. The decision runs against the account's in-memory view
//! under its lock (no `.await` while it is held); the hold then travels with the response body
//! and ends when the body does. Each layer passes what it learnt down in the request's
//! extensions ([`DecisionId`], the `Arc<Account>`, [`Attribution`]) and up in the response's
//! ([`LogFields`], read by the access log).

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use http::header::HeaderName;
use http::{HeaderValue, Request};
use tower::{Layer, Service};
use uuid::Uuid;

pub use super::meter::Meter;
use crate::app::App;
use crate::clock::Stopwatch;
use crate::identity::identify;
use crate::ids::AccountId;
use crate::rescue::GatewayError;
use crate::waterfall::FeatureId;

/// Header carrying the decision id on every answer.
pub const DECISION_ID: HeaderName = HeaderName::from_static("x-flowgate-decision-id");
/// Header naming the decision that charged a replayed `Idempotency-Key`.
pub const REPLAY_OF: HeaderName = HeaderName::from_static("x-flowgate-replay-of");
/// Header saying which layers paid how many units of an admitted request.
pub const POOLS: HeaderName = HeaderName::from_static("x-flowgate-pools");
/// Set on the answer to a request that ran in shadow mode: what enforcing would have done,
/// `would-admit; credits=N` or `would-deny; code=…` (the upstream's answer is unchanged).
pub const SHADOW: HeaderName = HeaderName::from_static("x-flowgate-shadow");
/// Set on an answer given from a kept response (Stripe's name for it).
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(super) const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// A boxed future of a layer's answer.
pub(super) type Answer = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

/// The request's decision id, chosen by [`AccessLog`] (request extension).
#[derive(Debug, Clone, Copy)]
pub struct DecisionId(pub Uuid);

/// Who a forwarded request is for, set by [`Meter`] for the inner service (request extension).
#[derive(Debug, Clone)]
pub struct Attribution {
    /// The account the request acts for.
    pub account: AccountId,
    /// The decision that let it through.
    pub decision_id: Uuid,
}

/// What the layers learnt about a request, for its access log line (response extension).
#[derive(Debug, Clone, Default)]
pub struct LogFields {
    pub(super) account: Option<AccountId>,
    pub(super) units: u64,
    pub(super) outcome: LogOutcome,
}

/// The access log's `decision` field; formatted only when the line is written, so that an
/// admitted request builds no string for it.
#[derive(Debug, Clone, Default)]
pub(super) enum LogOutcome {
    #[default]
    None,
    Replay,
    Denied(&'static str),
    Admitted {
        draws: usize,
    },
    /// Forwarded in shadow mode; enforcing would have denied it with this code, if any.
    Shadow {
        denied: Option<&'static str>,
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
            LogOutcome::Shadow { denied: None } => f.write_str("shadow:admitted"),
            LogOutcome::Shadow { denied: Some(code) } => write!(f, "shadow:denied:{code}"),
            LogOutcome::UpstreamError(status) => write!(f, "upstream_error:{status}"),
            LogOutcome::Error(message) => f.write_str(message),
        }
    }
}

/// An error's answer, with what the log needs to say about it.
pub(super) fn refused(error: GatewayError, log: LogFields) -> Response {
    let outcome = LogOutcome::Error(error.to_string());
    let mut response = error.into_response();
    response
        .extensions_mut()
        .insert(LogFields { outcome, ..log });
    response
}

// === AccessLog ===

/// Outermost layer: the decision id, `x-request-id`, and one access log line per request.
#[derive(Clone)]
pub struct AccessLog<S> {
    inner: S,
    app: Arc<App>,
    feature: FeatureId,
}

impl<S> AccessLog<S> {
    /// The layer, for requests of `feature`.
    pub fn layer(app: Arc<App>, feature: FeatureId) -> impl Layer<S, Service = AccessLog<S>> {
        tower::layer::layer_fn(move |inner| AccessLog {
            inner,
            app: app.clone(),
            feature,
        })
    }
}

impl<S> Service<Request<Body>> for AccessLog<S>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Answer {
        let started = Stopwatch::start();
        let decision_id = Uuid::now_v7();
        req.extensions_mut().insert(DecisionId(decision_id));
        let request_id = req.headers().get(&REQUEST_ID).cloned();
        let (app, feature) = (self.app.clone(), self.feature);
        // The ready clone serves this call; the fresh clone waits for the next (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let Ok(mut response) = inner.call(req).await;
            let log = response
                .extensions_mut()
                .remove::<LogFields>()
                .unwrap_or_default();
            let id = HeaderValue::try_from(decision_id.to_string())
                .unwrap_or(HeaderValue::from_static("-"));
            let request_id = request_id.unwrap_or_else(|| id.clone());
            tracing::info!(
                target: "flowgate::access",
                request_id = request_id.to_str().unwrap_or("-"),
                decision_id = %decision_id,
                account = log.account.as_deref().unwrap_or("-"),
                feature = &*app.settings.features[feature.0 as usize],
                units = log.units,
                decision = %log.outcome,
                status = response.status().as_u16(),
                latency_us = started.elapsed().as_micros() as u64,
                "request"
            );
            let headers = response.headers_mut();
            headers.insert(REQUEST_ID, request_id);
            headers.insert(DECISION_ID, id);
            Ok(response)
        })
    }
}

// === Identify ===

/// Finds the account (API key or trusted header) and refuses what cannot go on: unknown
/// credentials (401), a suspended account (403), a ledger too far behind (503).
#[derive(Clone)]
pub struct Identify<S> {
    inner: S,
    app: Arc<App>,
}

impl<S> Identify<S> {
    /// The layer.
    pub fn layer(app: Arc<App>) -> impl Layer<S, Service = Identify<S>> {
        tower::layer::layer_fn(move |inner| Identify {
            inner,
            app: app.clone(),
        })
    }
}

impl<S> Service<Request<Body>> for Identify<S>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response;
    type Error = Infallible;
    /// A refusal at once, or the inner service's own future (not boxed again).
    type Future = Either<Ready<Result<Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let account = match identify(&self.app, req.headers()) {
            Ok(account) => account,
            Err(e) => return Either::Left(ready(Ok(refused(e, LogFields::default())))),
        };
        let log = LogFields {
            account: Some(account.id.clone()),
            ..LogFields::default()
        };
        let refusal = if account.suspended {
            Some(GatewayError::Suspended)
        } else if self.app.ledger.full() {
            Some(GatewayError::LedgerBacklog)
        } else {
            None
        };
        if let Some(e) = refusal {
            return Either::Left(ready(Ok(refused(e, log))));
        }
        req.extensions_mut().insert(account);
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Either::Right(inner.call(req))
    }
}
