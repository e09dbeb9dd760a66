//! Every failure, turned into an HTTP answer in one place (the proxy's refusals in [`proxy`],
//! the admin and user APIs' in [`api`], the usage page's in [`page`]).
//!
//! Each answer is a JSON body `{"error": {"type", "code", "message", ...}}` and the headers a
//! client (or an OpenAI/Anthropic SDK) needs to act on it: `Retry-After` when waiting helps,
//! `x-should-retry: false` when it does not.

pub mod api;
pub mod page;
pub mod proxy;

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use serde_json::json;

pub use api::ApiError;
pub use proxy::{DenialReport, GatewayError, WindowReport};

/// The error body every answer shares; `extra` adds fields beside `type`, `code`, `message`.
pub(crate) fn body(
    status: StatusCode,
    kind: &str,
    code: &str,
    message: String,
    extra: serde_json::Value,
) -> Response {
    let mut error = json!({ "type": kind, "code": code, "message": message });
    if let (Some(e), serde_json::Value::Object(extra)) = (error.as_object_mut(), extra) {
        e.extend(extra);
    }
    (status, Json(json!({ "error": error }))).into_response()
}

/// Tells SDKs that retrying will not help.
pub(crate) fn no_retry(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert("x-should-retry", HeaderValue::from_static("false"));
    response
}
