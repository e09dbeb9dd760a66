//! The response body of an admitted request: passed through frame by frame, and the hold
//! settled when the upstream's last frame has gone by.
//!
//! With strict durability the last frame (the last data of a body of known length, or the end
//! of a chunked one) is held back until the charge is committed, so a client never sees a
//! complete response whose usage a crash could still lose.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use std::sync::Arc;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::clock::Clock;
use crate::hold::{Growth, Hold};
use crate::metrics::Metrics;
use crate::settle::{Measured, SettleReader};
use crate::usage::Outcome;
use crate::watch::{Cover, Step, Watcher};

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
    /// A watched stream's watcher (routes with `watch`, event streams only).
    watch: Option<Watching>,
    /// The last frame has been given: nothing more comes.
    finished: bool,
}

/// What watching a stream needs besides its [`Watcher`].
pub struct Watching {
    /// Reads progress and decides what passes.
    pub watcher: Watcher,
    /// The feature's name, for the error event of a stopped stream.
    pub feature: Arc<str>,
    /// The gateway's clock: progress by time, and when the hold grows.
    pub clock: Clock,
    /// Counts how watched streams end.
    pub metrics: Arc<Metrics>,
}

/// The upstream's last frame (`None`: the end of a chunked body), held until `commit` resolves.
/// Only a completed body is charged, so only a successful ending is ever held.
struct Last<D> {
    frame: Option<Frame<D>>,
    commit: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl<B: Body> MeteredBody<B> {
    /// Wraps `inner`; `hold` ends with it, settled by what `settle` reads, if given, and
    /// grown as `watch` reads the stream's progress, if given.
    pub fn new(
        inner: B,
        hold: Hold,
        settle: Option<SettleReader>,
        watch: Option<Watching>,
    ) -> Self {
        MeteredBody {
            inner,
            hold: Some(hold),
            settle,
            last: None,
            watch,
            finished: false,
        }
    }
}

impl<B> Body for MeteredBody<B>
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
        if let Some(last) = &mut this.last {
            ready!(last.commit.as_mut().poll(cx));
            this.finished = true;
            return Poll::Ready(this.last.take().and_then(|l| l.frame).map(Ok));
        }
        if this.finished {
            return Poll::Ready(None);
        }
        let (frame, stopped) = loop {
            let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
            match (&mut this.watch, &mut this.hold) {
                (Some(watch), Some(hold)) => {
                    let step = match &frame {
                        Some(Ok(f)) => match f.data_ref() {
                            // A body that ends with this frame: its tail goes with it.
                            Some(data) if this.inner.is_end_stream() => {
                                watch.feed(data, hold).then(|| watch.end(hold))
                            }
                            Some(data) => watch.feed(data, hold),
                            None => break (frame, None), // trailers pass as they are
                        },
                        Some(Err(_)) => break (frame, None),
                        None => watch.end(hold),
                    };
                    match step {
                        Step::Pass(bytes) if bytes.is_empty() => {
                            if frame.is_none() || this.inner.is_end_stream() {
                                break (None, None);
                            } // else: no whole event yet, read on
                        }
                        Step::Pass(bytes) => {
                            // The rest of a stream's tail goes as its last frame.
                            let last = frame.is_none() || this.inner.is_end_stream();
                            this.finished = last;
                            break (Some(Ok(Frame::data(bytes))), None);
                        }
                        Step::Stop { pass, denial } => {
                            let event = crate::rescue::proxy::stream_stopped_event(
                                &watch.feature,
                                watch.watcher.progress(),
                                &denial,
                            );
                            let mut out = bytes::BytesMut::with_capacity(pass.len() + event.len());
                            out.extend_from_slice(&pass);
                            out.extend_from_slice(&event);
                            this.finished = true;
                            break (Some(Ok(Frame::data(out.freeze()))), Some(()));
                        }
                    }
                }
                _ => break (frame, None),
            }
        };
        if let Some(Ok(f)) = &frame
            && let Some(data) = f.data_ref()
        {
            if let Some(reader) = &mut this.settle {
                reader.observe(data);
            }
            if let Some(hold) = &mut this.hold {
                hold.observe(data);
            }
        }
        let ended = match &frame {
            None => Some(Outcome::Completed),
            Some(Err(_)) => Some(Outcome::UpstreamAborted),
            _ if stopped.is_some() || this.finished => Some(Outcome::Completed),
            // A body of known length is over with its last byte: the server may not poll again.
            Some(Ok(_)) if this.inner.is_end_stream() => Some(Outcome::Completed),
            Some(Ok(_)) => None,
        };
        if let Some(outcome) = ended
            && let Some(mut hold) = this.hold.take()
        {
            if outcome == Outcome::Completed {
                let reader = this.settle.take();
                let watched = this.watch.as_ref().map(|w| &w.watcher);
                if let Some(measured) = settled(reader, watched) {
                    hold.settle(measured);
                }
                if let Some(watch) = &this.watch {
                    watch.count_ending(hold.units());
                }
            }
            this.finished = true;
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
        self.last.is_none() && (self.finished || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a completed stream cost: what the response reported, if the route settles from it;
/// else a watched stream's progress; else nothing (the estimate stands).
fn settled(
    reader: Option<SettleReader>,
    watched: Option<&Watcher>,
) -> Option<Result<Measured, crate::settle::SettleError>> {
    match (reader, watched) {
        // A stopped stream never sent what the upstream would have reported: it costs what
        // was delivered.
        (_, Some(w)) if w.stopped() => Some(Ok(Measured::Units(w.progress()))),
        (Some(r), _) if r.settles() => Some(r.finish()),
        (_, Some(w)) => Some(Ok(Measured::Units(w.progress()))),
        _ => None,
    }
}

impl Watching {
    /// Feeds a piece of the upstream's stream to the watcher, growing `hold` as it asks.
    fn feed(&mut self, data: &[u8], hold: &mut Hold) -> Step {
        let stops = self.watcher.stops();
        let now = self.clock.now_ms();
        self.watcher
            .feed(data, now, |total| cover(hold, total, stops))
    }

    /// The upstream's stream ended: the watcher's last event.
    fn end(&mut self, hold: &mut Hold) -> Step {
        let stops = self.watcher.stops();
        let now = self.clock.now_ms();
        self.watcher.end(now, |total| cover(hold, total, stops))
    }

    /// Counts how the stream ended, given the units it held at the end.
    fn count_ending(&self, held: u64) {
        let ending = if self.watcher.stopped() {
            "stopped"
        } else if self.watcher.progress() > held {
            "forgiven"
        } else {
            "paid"
        };
        self.metrics
            .watched_streams
            .with_label_values(&[ending])
            .inc();
    }
}

/// Asks `hold` to hold `total` units for its stream: all of it when the stream stops when the
/// account cannot pay, else as much as the account can.
fn cover(hold: &mut Hold, total: u64, whole: bool) -> Cover {
    let held = hold.units();
    if total <= held {
        return Cover::Covered;
    }
    match hold.grow(total - held, whole) {
        Growth::Held => Cover::Covered,
        Growth::Partly(_) => Cover::Partly,
        Growth::Refused(denial) => Cover::Refused(denial),
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
                    let watched = self.watch.as_ref().map(|w| &w.watcher);
                    if let Some(measured) = settled(Some(reader), watched) {
                        hold.settle(measured);
                    }
                    if let Some(watch) = &self.watch {
                        watch.count_ending(hold.units());
                    }
                    // Nobody is left to wait for a strict commit: the client has gone.
                    let _ = hold.end(Outcome::Completed);
                }
                _ => drop(hold),
            }
        }
    }
}
