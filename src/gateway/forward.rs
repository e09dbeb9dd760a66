//! The innermost service: sends a request to its route's upstream and answers with the
//! upstream's response, its body still streaming. The layers in [`super::layers`] sit in
//! front of it; they would sit in front of any other service of the same shape.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Request, Response};

use bytes::Bytes;

use super::layers::{Attribution, DECISION_ID};
use super::pool::Pools;
use crate::app::App;
use crate::config::{IdentityMode, Route};
use crate::rescue::GatewayError;

/// Header naming the account a forwarded request acts for (the upstream trusts the gateway).
const ACCOUNT: HeaderName = HeaderName::from_static("x-flowgate-account");

/// Forwards to one route's upstream through the shared pooled client.
#[derive(Clone)]
pub struct Forward {
    app: Arc<App>,
    route: Arc<Route>,
    pools: Arc<Pools>,
}

impl Forward {
    /// The forwarding service of `route`, over the upstreams' address `pools`.
    pub fn new(app: Arc<App>, route: Arc<Route>, pools: Arc<Pools>) -> Forward {
        Forward { app, route, pools }
    }
}

impl tower::Service<Request<Body>> for Forward {
    type Response = Response<hyper::body::Incoming>;
    type Error = GatewayError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, GatewayError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(())) // the pooled client queues; nothing to wait for here
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let (app, route, pools) = (self.app.clone(), self.route.clone(), self.pools.clone());
        Box::pin(async move { forward(&app, &pools, &route, req).await })
    }
}

/// Sends the request to one of the route's upstream addresses and waits (at most
/// `upstream_timeout_ms`) for its response headers. The body is not awaited: it streams. An
/// address that refuses the connection is left out for a while; the request then goes to the
/// next address only if none of it can have reached the first (a refused connection) and its
/// body can be sent again (held in memory: an upstream with several addresses, a body within
/// `request_body_bytes_max`). Nothing is retried once it may have been sent.
async fn forward(
    app: &App,
    pools: &Pools,
    route: &Route,
    req: Request<Body>,
) -> Result<Response<hyper::body::Incoming>, GatewayError> {
    let (mut parts, body) = req.into_parts();
    let upstream = &app.settings.upstreams[route.upstream];
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| http::uri::PathAndQuery::from_static("/"), Clone::clone);
    parts.version = http::Version::HTTP_11;
    let admitted = parts.extensions.remove::<Attribution>();
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    if app.settings.identity.mode == IdentityMode::ApiKey {
        // The upstream trusts the gateway; the client's key is not its business.
        headers.remove(app.settings.identity.header.as_str());
    }
    if let Some(admitted) = admitted {
        if let Ok(v) = HeaderValue::try_from(admitted.account.as_str()) {
            headers.insert(ACCOUNT, v);
        }
        if let Ok(v) = HeaderValue::try_from(admitted.decision_id.to_string()) {
            headers.insert(DECISION_ID, v);
        }
    }
    let order = pools.order(route.upstream, app.clock.now_ms());
    let replayable = if pools.several(route.upstream) {
        hold_body(app, body).await?
    } else {
        Err(body)
    };
    let (mut body, again) = match replayable {
        Ok(bytes) => (Some(Body::from(bytes.clone())), Some(bytes)),
        Err(body) => (Some(body), None),
    };
    // The headers go with the first attempt; a copy is kept only when a retry is possible.
    let mut headers = Some(std::mem::take(&mut parts.headers));
    let spare = again.as_ref().and(headers.clone());
    for (attempt, index) in order.iter().copied().enumerate() {
        let Some((authority, label)) = pools.address(route.upstream, index) else {
            break;
        };
        let Some(this_body) = body.take().or_else(|| again.clone().map(Body::from)) else {
            break;
        };
        let uri = http::Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query(path.clone())
            .build()
            .map_err(|_| GatewayError::Internal)?;
        let mut request = Request::new(this_body);
        *request.method_mut() = parts.method.clone();
        *request.uri_mut() = uri;
        *request.version_mut() = parts.version;
        *request.headers_mut() = headers.take().or_else(|| spare.clone()).unwrap_or_default();
        let started = crate::clock::Stopwatch::start();
        let result =
            tokio::time::timeout(app.upstream_timeout, app.client().request(request)).await;
        app.metrics
            .upstream_seconds
            .with_label_values(&[&upstream.name])
            .observe(started.seconds());
        let attempts = |result: &str| {
            app.metrics
                .upstream_attempts
                .with_label_values(&[&upstream.name, label, result])
                .inc();
        };
        match result {
            Err(_) => {
                attempts("timeout");
                return Err(GatewayError::UpstreamTimeout);
            }
            Ok(Err(e)) if e.is_connect() => {
                attempts("refused");
                pools.refused(route.upstream, index, app.clock.now_ms());
                tracing::warn!(upstream = %upstream.name, address = label, error = %e, "upstream address refused the connection");
                let more = attempt + 1 < order.len() && again.is_some();
                if !more {
                    return Err(GatewayError::UpstreamUnavailable);
                }
            }
            Ok(Err(e)) => {
                attempts("failed");
                tracing::warn!(upstream = %upstream.name, address = label, error = %e, "upstream request failed");
                return Err(GatewayError::UpstreamUnavailable);
            }
            Ok(Ok(mut response)) => {
                attempts("answered");
                strip_hop_by_hop(response.headers_mut());
                return Ok(response);
            }
        }
    }
    Err(GatewayError::UpstreamUnavailable)
}

/// The body in memory, when it is small enough to be sent again (`request_body_bytes_max`);
/// otherwise the body itself, to be streamed once.
async fn hold_body(app: &App, body: Body) -> Result<Result<Bytes, Body>, GatewayError> {
    use http_body::Body as _;
    let limit = app.settings.server.request_body_bytes_max as u64;
    if body.size_hint().upper().is_none_or(|n| n > limit) {
        return Ok(Err(body));
    }
    let timeout = std::time::Duration::from_millis(app.settings.server.client_body_timeout_ms);
    let collected = tokio::time::timeout(timeout, http_body_util::BodyExt::collect(body))
        .await
        .map_err(|_| GatewayError::BodyTimeout)?
        .map_err(|_| GatewayError::BodyTooLarge {
            limit: app.settings.server.request_body_bytes_max,
        })?;
    Ok(Ok(collected.to_bytes()))
}

/// Removes the headers that describe one connection, not the message (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(listed) = headers.get(header::CONNECTION).cloned()
        && let Ok(listed) = listed.to_str()
    {
        for name in listed.split(',') {
            headers.remove(name.trim());
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
