//! Shadow mode's cost per request against enforcing (docs/BENCHMARKS.md, "Shadow mode").
//!
//!     cargo bench --bench shadow
//!
//! The gateway's own request path without the network: `Identify → Meter` over an inner
//! service that answers at once, for one account of a running gateway (SQLite ledger, its
//! writer committing in the background). The plan's window of 1 000 fills in the warm-up, so
//! the measured requests are paid by credits: enforcing holds and charges them (usage,
//! monetization and balance-update rows), shadow decides the same and records only the usage
//! event. Each sample runs its requests in batches of `BATCH`, timed, and lets the ledger
//! drain between batches, untimed: the queue never reaches `ledger_queue_max` (past it the
//! gateway would answer 503 and the numbers would mean nothing).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use flowgate::clock::{Clock, Stopwatch};
use flowgate::config::Settings;
use flowgate::gateway::Gateway;
use flowgate::gateway::layers::{Identify, Meter};
use flowgate::rescue::GatewayError;
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};

const BATCH: u64 = 2_000;

fn config(db: &str, shadow: bool) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
[log]
level = "warn"
[store]
url = "sqlite://{db}"
ledger_queue_max = 100000
[identity]
mode = "api_key"
[upstreams.api]
url = "http://127.0.0.1:9"
[[routes]]
method = "POST"
path = "/v1/tasks"
feature = "task"
upstream = "api"
cost = {{ fixed = 1 }}
[plans.bench]
price_version = "bench-1"
shadow = {shadow}
prices = {{ task = 1 }}
[[plans.bench.layers]]
kind = "usage_limit"
windows = [{{ name = "5h", duration = "5h", limit = 1000 }}]
[[plans.bench.layers]]
kind = "credits"
[[accounts]]
id = "bench"
plan = "bench"
api_keys = ["sk-bench"]
[[accounts.grants]]
id = "bench-credits"
kind = "credits"
amount = 1000000000000
"#
    )
}

fn request() -> http::Request<Body> {
    http::Request::post("/v1/tasks")
        .header("authorization", "Bearer sk-bench")
        .body(Body::empty())
        .unwrap_or_default()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut group = c.benchmark_group("request path");
    group.measurement_time(Duration::from_secs(8));
    for (name, shadow) in [("enforcing", false), ("shadow", true)] {
        let db = dir.path().join(format!("{name}.db"));
        let settings = Settings::parse(&config(&db.display().to_string(), shadow)).expect("config");
        let gateway = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            Gateway::start(settings, listener, Clock::System)
                .await
                .expect("gateway")
        });
        let app = gateway.app();
        let route = Arc::new(app.settings.routes[0].clone());
        let service = ServiceBuilder::new()
            .layer(Identify::layer(app.clone()))
            .layer(Meter::layer(app.clone(), route))
            .service(tower::service_fn(|_req: http::Request<Body>| async {
                Ok::<_, GatewayError>(http::Response::new(Full::new(Bytes::from_static(
                    br#"{"id":"task_1"}"#,
                ))))
            }));
        let one = || {
            let service = service.clone();
            async move {
                let Ok(response) = service.oneshot(request()).await;
                assert!(response.status().is_success(), "{}", response.status());
                let _ = response.into_body().collect().await;
            }
        };
        let drain = || async {
            while app.ledger.depth() > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        rt.block_on(async {
            for _ in 0..1_500 {
                one().await;
            }
            drain().await;
        });
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut timed = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let n = left.min(BATCH);
                        let started = Stopwatch::start();
                        for _ in 0..n {
                            one().await;
                        }
                        timed += started.elapsed();
                        left -= n;
                        drain().await;
                    }
                    timed
                })
            })
        });
        rt.block_on(gateway.shutdown());
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
