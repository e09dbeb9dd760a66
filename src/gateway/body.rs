//! The response body of an admitted request: passed through frame by frame, and the hold
//! settled when the upstream's last frame has gone by.
//!
//! With strict durability the last frame (the last data of a body of known length, or the end
//! of a chunked one) is held back until the charge is committed, so a client never sees a
//! complete response whose usage a crash could still lose.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};

use crate::settle::SettleReader;

use crate::hold::Hold;
use crate::usage::Outcome;

/// Streams `inner` unchanged (no buffering: an SSE event reaches the client when the upstream
/// sends it) and ends the hold: settled at the end of the stream, released on an upstream
/// error, and released by the hold's own `Drop` if the client goes away first.
pub struct MeteredBody<B: Body> {
    inner: B,
    hold: Option<Hold>,
    /// Reads the true cost as the body passes, for routes that settle from the response.
    settle: Option<SettleReader>,
    /// Strict durability: the last frame, waiting for its charge's commit.
    last: Option<Last<B::Data>>,
}

/// The upstream's last frame (`None`: the end of a chunked body), held until `commit` resolves.
/// Only a completed body is charged, so only a successful ending is ever held.
struct Last<D> {
    frame: Option<Frame<D>>,
    commit: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl<B: Body> MeteredBody<B> {
    /// Wraps `inner`; `hold` ends with it, settled by what `settle` reads, if given.
    pub fn new(inner: B, hold: Hold, settle: Option<SettleReader>) -> Self {
        MeteredBody {
            inner,
            hold: Some(hold),
            settle,
            last: None,
        }
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body + Unpin,
    B::Data: Buf + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Some(last) = &mut this.last {
            ready!(last.commit.as_mut().poll(cx));
            return Poll::Ready(this.last.take().and_then(|l| l.frame).map(Ok));
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(data) = f.data_ref()
        {
            if let Some(reader) = &mut this.settle {
                reader.observe(data.chunk());
            }
            if let Some(hold) = &mut this.hold {
                hold.observe(data.chunk());
            }
        }
        let ended = match &frame {
            None => Some(Outcome::Completed),
            Some(Err(_)) => Some(Outcome::UpstreamAborted),
            // A body of known length is over with its last byte: the server may not poll again.
            Some(Ok(_)) if this.inner.is_end_stream() => Some(Outcome::Completed),
            Some(Ok(_)) => None,
        };
        if let Some(outcome) = ended
            && let Some(mut hold) = this.hold.take()
        {
            if outcome == Outcome::Completed
                && let Some(reader) = this.settle.take()
                && reader.settles()
            {
                hold.settle(reader.finish());
            }
            if let Some(commit) = hold.end(outcome) {
                this.last = Some(Last {
                    frame: frame.and_then(Result::ok),
                    commit: Box::pin(commit.wait()),
                });
                return self.poll_frame(cx); // waits on the commit, then yields the frame
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.last.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body> Drop for MeteredBody<B> {
    /// A client that closes after an event stream's terminal event (as OpenAI's SDKs do at
    /// `data: [DONE]`) got the whole response: it is charged as completed, not abandoned. Any
    /// other early close is left to the hold's own `Drop` (released, not charged).
    fn drop(&mut self) {
        if let Some(mut hold) = self.hold.take() {
            match self.settle.take() {
                Some(reader) if reader.delivered() => {
                    if reader.settles() {
                        hold.settle(reader.finish());
                    }
                    // Nobody is left to wait for a strict commit: the client has gone.
                    let _ = hold.end(Outcome::Completed);
                }
                _ => drop(hold),
            }
        }
    }
}
