//! Joins the upstream body's frames that arrive together, so the client gets one write for
//! them instead of one per frame.
//!
//! hyper's client hands a response body over one chunk at a time: its connection task decodes
//! the next chunk only after the reader took the previous one, so a reader that asks again at
//! once always finds nothing. Ten SSE events read from the upstream in one `recv` thus left the
//! gateway as seven to ten `writev`s. Here, when the next frame is not ready, the body gives
//! way (wakes itself and returns `Pending`) so that the runtime runs the connection task,
//! woken when the frame was taken, before it polls this body again. The frames that task had
//! already read join the first. A frame the upstream has not sent yet is not waited for: the
//! held data goes out after [`TURNS`] turns of the scheduler without a new frame, so an event
//! stream's latency stays the network's.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

/// No joined frame grows past this: a large body still streams in pieces.
const JOINED_MAX: usize = 64 * 1024;

/// How many turns of the scheduler held data waits for another frame. One is not enough under
/// load: in the proxy benchmark's SSE case the next frame was there after the second turn, not
/// the first (the reason was not traced). With two, a 10-event stream leaves in one `writev`
/// (`STRACE=/tmp/st CASES=sse bash benches/proxy.sh`: 1.9 per stream in all, the upstream's
/// request included; 7.1 without joining).
const TURNS: u8 = 2;

/// `inner`, with the data frames that arrive within [`TURNS`] turns of the scheduler joined.
pub struct Coalesced<B: Body> {
    inner: B,
    /// Data taken from `inner` and not yet given.
    held: Held,
    /// What `inner` gave after the held data (trailers, an error, or its end), given next.
    after: Option<Option<Result<Frame<Bytes>, B::Error>>>,
    /// The turns this body gave way since its last new frame.
    yielded: u8,
}

/// Data waiting to be given: one frame as it came (no copy), or several copied into one.
enum Held {
    None,
    One(Bytes),
    Joined(BytesMut),
}

impl Held {
    fn len(&self) -> usize {
        match self {
            Held::None => 0,
            Held::One(b) => b.len(),
            Held::Joined(b) => b.len(),
        }
    }

    fn push(&mut self, data: Bytes) {
        *self = match std::mem::replace(self, Held::None) {
            Held::None => Held::One(data),
            Held::One(first) => {
                let mut joined = BytesMut::with_capacity(first.len() + data.len());
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&data);
                Held::Joined(joined)
            }
            Held::Joined(mut joined) => {
                joined.extend_from_slice(&data);
                Held::Joined(joined)
            }
        };
    }

    fn take(&mut self) -> Option<Bytes> {
        match std::mem::replace(self, Held::None) {
            Held::None => None,
            Held::One(b) => Some(b),
            Held::Joined(b) => Some(b.freeze()),
        }
    }
}

// Nothing here is pinned but `inner`, which is `Unpin` itself: the error held in `after` moves
// freely.
impl<B: Body + Unpin> Unpin for Coalesced<B> {}

impl<B: Body> Coalesced<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Coalesced {
            inner,
            held: Held::None,
            after: None,
            yielded: 0,
        }
    }
}

impl<B> Body for Coalesced<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(after) = this.after.take() {
            return Poll::Ready(after);
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.held.push(data);
                        this.yielded = 0;
                        // A body of known length that is over, or a piece large enough:
                        // nothing to wait for.
                        if this.inner.is_end_stream() || this.held.len() >= JOINED_MAX {
                            return Poll::Ready(this.held.take().map(|d| Ok(Frame::data(d))));
                        }
                    }
                    Err(trailers) => return this.give_then(Some(Ok(trailers))),
                },
                Poll::Ready(other) => return this.give_then(other),
                Poll::Pending => {
                    if matches!(this.held, Held::None) {
                        return Poll::Pending;
                    }
                    if this.yielded < TURNS {
                        this.yielded += 1;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    this.yielded = 0;
                    return Poll::Ready(this.held.take().map(|d| Ok(Frame::data(d))));
                }
            }
        }
    }

    /// True as soon as the held data has been given and only the end is left, so the
    /// server ends the body with its last data.
    fn is_end_stream(&self) -> bool {
        matches!(self.held, Held::None)
            && match &self.after {
                Some(next) => next.is_none(),
                None => self.inner.is_end_stream(),
            }
    }

    fn size_hint(&self) -> SizeHint {
        let held = self.held.len() as u64;
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

impl<B: Body<Data = Bytes>> Coalesced<B> {
    /// Gives the held data first, if any, and `next` after it.
    fn give_then(
        &mut self,
        next: Option<Result<Frame<Bytes>, B::Error>>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.held.take() {
            Some(data) => {
                self.after = Some(next);
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            None => Poll::Ready(next),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::StreamExt;
    use http_body_util::{BodyExt, Empty, StreamBody};
    use hyper::body::Frame;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    use super::{Coalesced, JOINED_MAX};

    /// An upstream on a loopback port answering every request with `pieces`, each sent after
    /// its delay (ms) as one chunk.
    async fn upstream(pieces: Vec<(u64, Bytes)>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let pieces = pieces.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        let stream = futures_util::stream::iter(pieces.clone()).then(
                            |(delay, bytes)| async move {
                                if delay > 0 {
                                    tokio::time::sleep(Duration::from_millis(delay)).await;
                                }
                                Ok::<_, Infallible>(Frame::data(bytes))
                            },
                        );
                        async move { Ok::<_, Infallible>(hyper::Response::new(StreamBody::new(stream))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        addr
    }

    /// The upstream's answer through [`Coalesced`], read by a task of its own (as a server
    /// connection reads it): each frame given, with how long after the request it came.
    async fn frames(addr: std::net::SocketAddr) -> Vec<(Bytes, Duration)> {
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let started = tokio::time::Instant::now();
        let response = client
            .get(format!("http://{addr}/").parse().unwrap())
            .await
            .unwrap();
        let mut body = Coalesced::new(response.into_body());
        tokio::spawn(async move {
            let mut frames = Vec::new();
            while let Some(frame) = body.frame().await {
                frames.push((frame.unwrap().into_data().unwrap(), started.elapsed()));
            }
            frames
        })
        .await
        .unwrap()
    }

    fn joined(frames: &[(Bytes, Duration)]) -> Vec<u8> {
        frames.iter().flat_map(|(b, _)| b.to_vec()).collect()
    }

    #[tokio::test]
    async fn events_sent_together_leave_together() {
        let events: Vec<(u64, Bytes)> = (0..10)
            .map(|i| (0, Bytes::from(format!("data: {{\"chunk\":{i}}}\n\n"))))
            .collect();
        let got = frames(upstream(events.clone()).await).await;
        assert_eq!(
            joined(&got),
            joined(
                &events
                    .iter()
                    .map(|(_, b)| (b.clone(), Duration::ZERO))
                    .collect::<Vec<_>>()
            )
        );
        // Unjoined, hyper gives ten frames.
        assert!(got.len() <= 2, "{} frames: {got:?}", got.len());
    }

    #[tokio::test]
    async fn an_event_sent_later_does_not_hold_back_the_one_before() {
        let got = frames(
            upstream(vec![
                (0, Bytes::from_static(b"data: first\n\n")),
                (300, Bytes::from_static(b"data: second\n\n")),
            ])
            .await,
        )
        .await;
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(&got[0].0[..], b"data: first\n\n");
        assert_eq!(&got[1].0[..], b"data: second\n\n");
        assert!(
            got[0].1 < Duration::from_millis(250),
            "the first event waited: {got:?}"
        );
    }

    #[tokio::test]
    async fn a_large_body_still_streams_in_pieces() {
        let pieces: Vec<(u64, Bytes)> = (0..64u8)
            .map(|i| (0, Bytes::from(vec![b'a' + i % 26; 4096])))
            .collect();
        let got = frames(upstream(pieces.clone()).await).await;
        let sent: Vec<u8> = pieces.iter().flat_map(|(_, b)| b.to_vec()).collect();
        assert_eq!(joined(&got), sent);
        assert!(got.len() >= 4, "256 KiB in {} frames", got.len());
        assert!(
            got.iter().all(|(b, _)| b.len() <= JOINED_MAX + 4096),
            "{:?}",
            got.iter().map(|(b, _)| b.len()).collect::<Vec<_>>()
        );
    }
}
