//! A small OpenAI-compatible API to put flowgate in front of: `/v1/chat/completions` (plain
//! JSON, or a stream of chunks ending with a `usage` chunk when `stream_options.include_usage`
//! asks for it, as OpenAI's API does) and `/v1/embeddings`.
//!
//! Its token counts are predictable, so that a test can work out every charge: a prompt costs
//! one token per whitespace-separated word of its messages' contents; a completion is
//! `max_completion_tokens` (or `max_tokens`) words, 12 when neither is given; the
//! `x-mock-cached-tokens` request header says how many prompt tokens were cached.
//! `flowgate mock-openai` serves it on its own (for `config/examples/openai.toml`).

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// Words in a completion when the request does not say.
const COMPLETION_TOKENS_DEFAULT: u64 = 12;
/// Most words a completion is made of (a test asking for more gets this many).
const COMPLETION_TOKENS_MAX: u64 = 4096;

/// A running mock OpenAI-compatible API.
pub struct MockOpenAi {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MockOpenAi {
    /// Starts on `addr` (port 0: an ephemeral one).
    pub async fn start(addr: SocketAddr) -> std::io::Result<MockOpenAi> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router()).await;
        });
        Ok(MockOpenAi { addr, task })
    }

    /// Its URL, `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves until the process is stopped (for `flowgate mock-openai`).
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }
}

impl Drop for MockOpenAi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn router() -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
}

fn bad_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": { "message": message, "type": "invalid_request_error" } })),
    )
        .into_response()
}

/// One token per whitespace-separated word.
fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn prompt_tokens(messages: &[Value]) -> u64 {
    messages
        .iter()
        .filter_map(|m| m.get("content"))
        .map(|c| match c {
            Value::String(s) => words(s),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .map(words)
                .sum(),
            _ => 0,
        })
        .sum()
}

fn usage(prompt: u64, cached: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": { "cached_tokens": cached.min(prompt) },
    })
}

async fn chat(headers: HeaderMap, body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("the body must be JSON");
    };
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return bad_request("messages is required");
    };
    let model = req.get("model").and_then(Value::as_str).unwrap_or("mock");
    let prompt = prompt_tokens(messages);
    let cached = headers
        .get("x-mock-cached-tokens")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let completion = req
        .get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(COMPLETION_TOKENS_DEFAULT)
        .min(COMPLETION_TOKENS_MAX);
    let text: Vec<String> = (0..completion).map(|i| format!("w{i}")).collect();
    let id = format!("chatcmpl-{}", uuid::Uuid::now_v7().simple());
    let streamed = req.get("stream").and_then(Value::as_bool) == Some(true);
    if !streamed {
        return axum::Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": text.join(" ") },
                "finish_reason": "stop",
            }],
            "usage": usage(prompt, cached, completion),
        }))
        .into_response();
    }
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
        })
    };
    let mut events: Vec<Value> = vec![chunk(
        json!({ "role": "assistant", "content": "" }),
        Value::Null,
    )];
    for (i, w) in text.iter().enumerate() {
        let piece = if i == 0 { w.clone() } else { format!(" {w}") };
        events.push(chunk(json!({ "content": piece }), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if include_usage {
        events.push(json!({
            "id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [], "usage": usage(prompt, cached, completion),
        }));
    }
    let mut frames: Vec<Result<Bytes, Infallible>> = events
        .into_iter()
        .map(|e| Ok(Bytes::from(format!("data: {e}\n\n"))))
        .collect();
    frames.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(futures_util::stream::iter(frames)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn embeddings(body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("the body must be JSON");
    };
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => return bad_request("input is required"),
    };
    let model = req.get("model").and_then(Value::as_str).unwrap_or("mock");
    let tokens: u64 = inputs.iter().map(|s| words(s)).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({ "object": "embedding", "index": i, "embedding": [words(s) as f64, 0.5, -0.5] })
        })
        .collect();
    axum::Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    }))
    .into_response()
}
