//! The tiny upstream of the proxy benchmark (benches/proxy.sh): answers `POST /v1/tasks` with a
//! small JSON body, `POST /v1/settled` with one that carries `usage.units`, and
//! `POST /v1/stream` with 10 server-sent events, on the port in `$PORT`.
//!
//!     PORT=9100 cargo bench --bench upstream

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{Full, StreamBody};
use hyper::body::Frame;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

const TASK: &[u8] = br#"{"id":"task_1","status":"completed","result":"ok"}"#;
const SETTLED: &[u8] = br#"{"id":"task_1","status":"completed","usage":{"units":1}}"#;
const EVENTS: usize = 10;

async fn answer(
    req: Request<hyper::body::Incoming>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let stream = req.uri().path() == "/v1/stream";
    let body = if req.uri().path() == "/v1/settled" {
        SETTLED
    } else {
        TASK
    };
    // Read the request body to its end, as a real API would.
    let _ = req.into_body().collect().await;
    if stream {
        let events = futures_util::stream::iter((0..EVENTS).map(|i| {
            let data = if i + 1 == EVENTS {
                "data: {\"usage\":{\"units\":1}}\n\n".to_owned()
            } else {
                format!("data: {{\"chunk\":{i}}}\n\n")
            };
            Ok::<_, Infallible>(Frame::data(Bytes::from(data)))
        }));
        let body = StreamBody::new(events).boxed();
        return Ok(Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap_or_default());
    }
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body)).boxed())
        .unwrap_or_default())
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    // `cargo bench` passes `--bench`; only run when asked to serve.
    let Ok(port) = std::env::var("PORT") else {
        println!("upstream: set PORT to serve (benches/proxy.sh does)");
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}
