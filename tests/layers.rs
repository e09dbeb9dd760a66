//! The metering layers over a service that is not the proxy: the same identify → meter stack
//! in front of a plain `tower::service_fn`, called without a socket. What it answers is
//! metered, held and charged exactly as a forwarded request would be.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Body;
use common::{Harness, StoreKind};
use flowgate::gateway::layers::{AccessLog, Identify, Meter};
use flowgate::rescue::GatewayError;
use http_body_util::BodyExt;
use tower::{ServiceBuilder, ServiceExt};

store_tests!(a_plain_service_behind_the_layers_is_metered_and_charged);

async fn a_plain_service_behind_the_layers_is_metered_and_charged(store: StoreKind) {
    let h = Harness::start(store).await;
    let app = h.gateway().app().clone();
    let route = Arc::new(
        app.settings
            .routes
            .iter()
            .find(|r| r.path == "/v1/tasks")
            .expect("the tasks route")
            .clone(),
    );
    let calls = Arc::new(AtomicU64::new(0));
    let inner = {
        let calls = calls.clone();
        tower::service_fn(move |req: http::Request<Body>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::Relaxed);
                // The meter tells the inner service who the request is for.
                let attributed = req
                    .extensions()
                    .get::<flowgate::gateway::layers::Attribution>()
                    .map(|a| a.account.to_string());
                let body = format!("{{\"for\":{:?}}}", attributed.unwrap_or_default());
                Ok::<_, GatewayError>(http::Response::new(Body::from(body)))
            }
        })
    };
    let stack = ServiceBuilder::new()
        .layer(AccessLog::layer(app.clone(), route.feature))
        .layer(Identify::layer(app.clone()))
        .layer(Meter::layer(app.clone(), route.clone()))
        .service(inner);

    let request = |units: u64| {
        http::Request::post("/v1/tasks")
            .header("authorization", "Bearer sk-alice")
            .header("x-units", units)
            .body(Body::empty())
            .expect("a request")
    };
    // 3 units from the 5-hour window, then 2 units × 5 credits.
    let r = stack.clone().oneshot(request(5)).await.expect("infallible");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-flowgate-pools"], "limits=3,credits=2");
    assert!(r.headers().contains_key("x-flowgate-decision-id"));
    let body = r.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], br#"{"for":"alice"}"#);
    assert_eq!(h.stored_balance("alice").await, 90);

    // Unknown credentials never reach the service.
    let mut anonymous = request(1);
    anonymous.headers_mut().remove("authorization");
    let r = stack.clone().oneshot(anonymous).await.expect("infallible");
    assert_eq!(r.status(), 401);
    assert_eq!(calls.load(Ordering::Relaxed), 1);

    // A denial never reaches it either: 18 credits left buy 3 units, not 20 (the window
    // resets later, so the answer is 429).
    let r = stack.oneshot(request(20)).await.expect("infallible");
    assert_eq!(r.status(), 429);
    assert_eq!(calls.load(Ordering::Relaxed), 1);
    h.settle_ledger().await;
    let events = h.store().await.usage_events("alice", 10).await.unwrap();
    assert_eq!(events.len(), 2, "the charge and the denial are recorded");
}
