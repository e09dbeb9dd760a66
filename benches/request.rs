//! One charged request through the gateway's own layers, without the network
//! (docs/BENCHMARKS.md, "The request path in-process"):
//!
//!     cargo bench --bench request
//!
//! `AccessLog → Identify → Meter` over an inner service that answers at once with a JSON body
//! carrying `usage`, for one account of a running gateway (SQLite ledger, its writer committing
//! on the runtime's workers). Two numbers: the time per request (criterion), and the heap
//! allocations and bytes the request makes on its own thread (a counting global allocator
//! with per-thread counters, so the ledger writer's allocations on the workers are not
//! counted). Two routes: `fixed` (a fixed cost, nothing read from the response) and
//! `settled` (the charge settled from the response's `usage.units`). The window of 1 000 fills
//! in the warm-up, so the measured requests are paid by credits.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use flowgate::clock::{Clock, Stopwatch};
use flowgate::config::Settings;
use flowgate::gateway::Gateway;
use flowgate::gateway::layers::{AccessLog, Identify, Meter};
use flowgate::rescue::GatewayError;
use http_body_util::{BodyExt, Full};
use tower::{ServiceBuilder, ServiceExt};

/// Counts this thread's allocations and bytes.
struct Counting;

thread_local! {
    static COUNTS: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // `try_with`: a thread being torn down has no counters left; it is not counted.
        let _ = COUNTS.try_with(|c| {
            let (n, bytes) = c.get();
            c.set((n + 1, bytes + layout.size() as u64));
        });
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = COUNTS.try_with(|c| {
            let (n, bytes) = c.get();
            c.set((n + 1, bytes + new_size as u64));
        });
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const BATCH: u64 = 2_000;

fn config(db: &str) -> String {
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
[[routes]]
method = "POST"
path = "/v1/settled"
feature = "task"
upstream = "api"
cost = {{ fixed = 2 }}
settle = {{ json = "/usage/units" }}
[plans.bench]
price_version = "bench-1"
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

fn request(path: &str) -> http::Request<Body> {
    http::Request::post(path)
        .header("authorization", "Bearer sk-bench")
        .header("content-type", "application/json")
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
    let db = dir.path().join("request.db");
    let settings = Settings::parse(&config(&db.display().to_string())).expect("config");
    let gateway = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        Gateway::start(settings, listener, Clock::System)
            .await
            .expect("gateway")
    });
    let app = gateway.app();
    let mut group = c.benchmark_group("request path");
    group.measurement_time(Duration::from_secs(8));
    for (name, index) in [("fixed", 0), ("settled", 1)] {
        let route = Arc::new(app.settings.routes[index].clone());
        let path = route.path.clone();
        let service = ServiceBuilder::new()
            .layer(AccessLog::layer(app.clone(), route.feature))
            .layer(Identify::layer(app.clone()))
            .layer(Meter::layer(app.clone(), route))
            .service(tower::service_fn(|_req: http::Request<Body>| async {
                let mut response = http::Response::new(Full::new(Bytes::from_static(
                    br#"{"id":"task_1","usage":{"units":1}}"#,
                )));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                Ok::<_, GatewayError>(response)
            }));
        let one = || {
            let service = service.clone();
            let req = request(&path);
            async move {
                let Ok(response) = service.oneshot(req).await;
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
            let n = 10_000u64;
            let before = COUNTS.with(Cell::get);
            for _ in 0..n {
                one().await;
            }
            let after = COUNTS.with(Cell::get);
            println!(
                "{name}: {:.1} allocations, {:.0} bytes allocated per request (request thread)",
                (after.0 - before.0) as f64 / n as f64,
                (after.1 - before.1) as f64 / n as f64,
            );
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
    }
    group.finish();
    rt.block_on(gateway.shutdown());
}

criterion_group!(benches, bench);
criterion_main!(benches);
