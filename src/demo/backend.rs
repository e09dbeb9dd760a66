//! A small product API to put flowgate in front of: a Codex-like "tasks" API and a Sora-like
//! video API whose response streams (SSE), one event per rendered second.
//!
//! It is a real HTTP server on a loopback port, used by `flowgate demo` and by the integration
//! tests. Tests steer it with request headers: `x-mock-status` (answer with this status),
//! `x-mock-delay-ms` (wait before answering), `x-mock-interval-ms` (pause between SSE events),
//! `x-mock-usage` (the usage the answer reports, for settlement).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

/// A running mock backend.
pub struct MockBackend {
    addr: SocketAddr,
    counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

/// What the backend has seen, for assertions.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests received.
    pub requests: AtomicU64,
    /// Streams that were cut off before their last event (the client went away).
    pub streams_cut: AtomicU64,
}

impl MockBackend {
    /// Starts on an ephemeral loopback port.
    pub async fn start() -> std::io::Result<MockBackend> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let app = Router::new()
            .route("/v1/tasks", post(create_task))
            .route("/v1/tasks/{id}", get(get_task))
            .route("/v1/videos", post(render_video))
            .with_state(counters.clone());
        // Without TCP_NODELAY a stream's second event waits for the gateway's delayed ACK
        // (~40 ms): the demo's video events arrived in a clump.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(MockBackend {
            addr,
            counters,
            task,
        })
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its URL, `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What it has seen.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

impl Drop for MockBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

/// Applies `x-mock-delay-ms` and `x-mock-status`; returns an error answer if one was asked for.
async fn steer(counters: &Counters, headers: &HeaderMap) -> Option<Response> {
    counters.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(ms) = header_u64(headers, "x-mock-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = header_u64(headers, "x-mock-status")
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
        .filter(|s| !s.is_success())?;
    Some(
        (
            status,
            axum::Json(json!({ "error": { "message": "the backend failed (as asked)" } })),
        )
            .into_response(),
    )
}

async fn create_task(State(c): State<Arc<Counters>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = steer(&c, &headers).await {
        return r;
    }
    let n = c.requests.load(Ordering::Relaxed);
    let prompt = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("prompt").and_then(|p| p.as_str().map(str::to_owned)))
        .unwrap_or_default();
    let mut answer = json!({ "id": format!("task_{n}"), "status": "completed", "prompt": prompt, "result": "diff --git a/src/lib.rs ..." });
    // `x-mock-usage`: report this much usage, in a header and in the body (for settlement).
    match header_u64(&headers, "x-mock-usage") {
        Some(units) => {
            answer["usage"] = json!({ "units": units });
            ([("x-usage-units", units.to_string())], axum::Json(answer)).into_response()
        }
        None => axum::Json(answer).into_response(),
    }
}

async fn get_task(
    State(c): State<Arc<Counters>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = steer(&c, &headers).await {
        return r;
    }
    axum::Json(json!({ "id": id, "status": "completed" })).into_response()
}

/// Streams one SSE event per second of video, then a final event carrying the usage.
async fn render_video(State(c): State<Arc<Counters>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(r) = steer(&c, &headers).await {
        return r;
    }
    let seconds = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("seconds").and_then(|s| s.as_u64()))
        .unwrap_or(1);
    let interval = Duration::from_millis(header_u64(&headers, "x-mock-interval-ms").unwrap_or(10));
    // `x-mock-usage`: the render came out this long (its final event reports it).
    let used = header_u64(&headers, "x-mock-usage").unwrap_or(seconds);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1);
    tokio::spawn(async move {
        for s in 1..=seconds {
            let event = format!("event: progress\ndata: {{\"rendered_seconds\":{s}}}\n\n");
            if tx.send(Ok(Bytes::from(event))).await.is_err() {
                c.streams_cut.fetch_add(1, Ordering::Relaxed);
                return;
            }
            tokio::time::sleep(interval).await;
        }
        let done = format!(
            "event: done\ndata: {{\"status\":\"completed\",\"usage\":{{\"seconds\":{used}}}}}\n\n"
        );
        let _ = tx.send(Ok(Bytes::from(done))).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
