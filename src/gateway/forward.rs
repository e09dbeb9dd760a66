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

use super::layers::{Attribution, DECISION_ID};
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
}

impl Forward {
    /// The forwarding service of `route`.
    pub fn new(app: Arc<App>, route: Arc<Route>) -> Forward {
        Forward { app, route }
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
        let (app, route) = (self.app.clone(), self.route.clone());
        Box::pin(async move { forward(&app, &route, req).await })
    }
}

/// Sends the request to the route's upstream and waits (at most `upstream_timeout_ms`) for
/// its response headers. The body is not awaited: it streams.
async fn forward(
    app: &App,
    route: &Route,
    req: Request<Body>,
) -> Result<Response<hyper::body::Incoming>, GatewayError> {
    let (mut parts, body) = req.into_parts();
    let upstream = &app.settings.upstreams[route.upstream];
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = http::Uri::builder()
        .scheme("http")
        .authority(upstream.base.clone())
        .path_and_query(path)
        .build()
        .map_err(|_| GatewayError::Internal)?;
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
    let request = Request::from_parts(parts, body);
    let started = crate::clock::Stopwatch::start();
    let result = tokio::time::timeout(app.upstream_timeout, app.client.request(request)).await;
    app.metrics
        .upstream_seconds
        .with_label_values(&[&upstream.name])
        .observe(started.seconds());
    match result {
        Err(_) => Err(GatewayError::UpstreamTimeout),
        Ok(Err(e)) => {
            tracing::warn!(upstream = %upstream.name, error = %e, "upstream request failed");
            Err(GatewayError::UpstreamUnavailable)
        }
        Ok(Ok(mut response)) => {
            strip_hop_by_hop(response.headers_mut());
            Ok(response)
        }
    }
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
