//! Watching an event stream while it flows: its progress, event by event, and whether the
//! account can pay for it.
//!
//! A long stream (a video render, an agent's task) is held at its estimate, but what it costs
//! is only known as it goes. A [`Watcher`] sits in the response path of a route with `watch`:
//! it passes on only whole events (a partial one waits for its end, so nothing is cut in the
//! middle), reads the progress each event brings — a field the upstream reports, the bytes
//! delivered, or the time since the response began — and asks, before passing an event on,
//! that the hold cover the progress including it. When the account cannot pay, the route's
//! policy decides: `finish` lets the stream run (the rest is forgiven when it settles),
//! `stop` withholds that event and ends the stream with an error event instead.
//!
//! This module is pure: the hold is reached through the `cover` function it is given, and
//! time is passed in.

use bytes::{Bytes, BytesMut};

use crate::config::{OnExhausted, Progress, WatchRule};
use crate::waterfall::{Denial, Millis, Units};

/// Longest event kept while waiting for its end; a longer one is passed on unread (its
/// progress is not counted until an event that fits brings it).
pub const EVENT_BYTES_MAX: usize = 256 << 10;

/// What the hold said when asked to cover a stream's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cover {
    /// Covered: the event may go.
    Covered,
    /// Covered in part; the stream runs on, and what is not covered is forgiven at the end.
    Partly,
    /// Not covered at all: the event must not go.
    Refused(Denial),
}

/// What to send the client after a piece of the upstream's stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// These bytes (whole events; possibly none yet).
    Pass(Bytes),
    /// These bytes, then the stream ends: the next event could not be paid for.
    Stop {
        /// The whole events before the one refused.
        pass: Bytes,
        /// Why it was refused.
        denial: Denial,
    },
}

impl Step {
    /// This step, then `next` if this one did not stop: both steps' bytes, in order.
    pub fn then(self, next: impl FnOnce() -> Step) -> Step {
        let Step::Pass(first) = self else {
            return self;
        };
        let join = |second: Bytes| {
            if first.is_empty() {
                return second;
            }
            let mut out = BytesMut::with_capacity(first.len() + second.len());
            out.extend_from_slice(&first);
            out.extend_from_slice(&second);
            out.freeze()
        };
        match next() {
            Step::Pass(second) => Step::Pass(join(second)),
            Step::Stop { pass, denial } => Step::Stop {
                pass: join(pass),
                denial,
            },
        }
    }
}

/// Watches one response. See the module docs.
#[derive(Debug)]
pub struct Watcher {
    progress_rule: Progress,
    /// The key an `sse` progress reads, quoted: an event without it is not parsed.
    needle: Vec<u8>,
    policy: OnExhausted,
    /// Received bytes not yet passed on: the events being read.
    pending: BytesMut,
    /// Where the scan for the end of the first pending event resumes.
    scanned: usize,
    /// Bytes passed on so far.
    delivered_bytes: u64,
    /// The progress of what was passed on, in units.
    progress: Units,
    /// When the response began (for time-based progress).
    started: Millis,
    /// The account could not pay all of it: no more asking (the `finish` policy).
    exhausted: bool,
    /// The stream was stopped: nothing more passes.
    stopped: bool,
}

impl Watcher {
    /// A watcher for a response that began at `now`.
    pub fn new(rule: &WatchRule, now: Millis) -> Watcher {
        let needle = match &rule.progress {
            Progress::Sse(pointer) => crate::settle::key_needle(pointer),
            _ => Vec::new(),
        };
        Watcher {
            needle,
            progress_rule: rule.progress.clone(),
            policy: rule.on_exhausted,
            pending: BytesMut::new(),
            scanned: 0,
            delivered_bytes: 0,
            progress: 0,
            started: now,
            exhausted: false,
            stopped: false,
        }
    }

    /// Whether a refusal stops the stream (the hold is then asked all or nothing).
    pub fn stops(&self) -> bool {
        self.policy == OnExhausted::Stop
    }

    /// The progress of what was passed on: the units the stream has used so far.
    pub fn progress(&self) -> Units {
        self.progress
    }

    /// Whether the stream was stopped.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Takes the next piece of the upstream's stream; `cover(total)` is asked to hold `total`
    /// units for the stream before an event that brings its progress to `total` passes.
    pub fn feed(&mut self, chunk: &[u8], now: Millis, cover: impl FnMut(Units) -> Cover) -> Step {
        if self.stopped {
            return Step::Pass(Bytes::new());
        }
        self.pending.extend_from_slice(chunk);
        self.pass_events(now, cover, false)
    }

    /// The upstream's stream has ended: what is left (an event without its blank line) goes
    /// as one last event, if it can be paid for.
    pub fn end(&mut self, now: Millis, cover: impl FnMut(Units) -> Cover) -> Step {
        if self.stopped {
            return Step::Pass(Bytes::new());
        }
        self.pass_events(now, cover, true)
    }

    fn pass_events(
        &mut self,
        now: Millis,
        mut cover: impl FnMut(Units) -> Cover,
        last: bool,
    ) -> Step {
        let mut pass = 0; // bytes of `pending` to pass on
        loop {
            let end = match event_end(&self.pending, self.scanned.max(pass)) {
                Some(end) => end,
                None if last && self.pending.len() > pass => self.pending.len(),
                None if self.pending.len() - pass > EVENT_BYTES_MAX => self.pending.len(),
                None => {
                    self.scanned = self.pending.len().saturating_sub(2).max(pass);
                    break;
                }
            };
            let event = &self.pending[pass..end];
            let progress = self.progress_after(event, now);
            if progress > self.progress && !self.exhausted {
                match cover(progress) {
                    Cover::Covered => {}
                    Cover::Partly => self.exhausted = true,
                    Cover::Refused(_) if !self.stops() => self.exhausted = true,
                    Cover::Refused(denial) => {
                        self.stopped = true;
                        let pass = self.pending.split_to(pass).freeze();
                        self.pending = BytesMut::new();
                        return Step::Stop { pass, denial };
                    }
                }
            }
            self.progress = self.progress.max(progress);
            self.delivered_bytes += event.len() as u64;
            pass = end;
        }
        self.scanned -= pass.min(self.scanned);
        Step::Pass(self.pending.split_to(pass).freeze())
    }

    /// The stream's progress once `event` is passed on as well.
    fn progress_after(&self, event: &[u8], now: Millis) -> Units {
        match &self.progress_rule {
            Progress::Sse(_)
                if !crate::settle::mentions(event, std::slice::from_ref(&self.needle)) =>
            {
                0
            }
            Progress::Sse(pointer) => reported(event, pointer).unwrap_or(0),
            Progress::Bytes(per_unit) => {
                (self.delivered_bytes + event.len() as u64).div_ceil(*per_unit)
            }
            Progress::Time(per_unit_ms) => {
                ((now - self.started).max(0) as u64).div_ceil(*per_unit_ms)
            }
        }
    }
}

/// The end (just past its blank line) of the first whole event in `buf`, looking from `from`.
/// Lines end with `\n` or `\r\n`.
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(nl) = buf.get(i..)?.iter().position(|b| *b == b'\n') {
        let after = i + nl + 1;
        match buf.get(after..) {
            Some([b'\n', ..]) => return Some(after + 1),
            Some([b'\r', b'\n', ..]) => return Some(after + 2),
            _ => i = after,
        }
    }
    None
}

/// The units an event's `data` reports at `pointer`, if it has them.
fn reported(event: &[u8], pointer: &str) -> Option<Units> {
    // An event's data is its `data:` lines joined by newlines (the SSE format).
    let mut data: Vec<u8> = Vec::new();
    for line in event.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(d) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(d.strip_prefix(b" ").unwrap_or(d));
        }
    }
    if data.is_empty() || data.trim_ascii() == b"[DONE]" {
        return None;
    }
    let doc: serde_json::Value = serde_json::from_slice(&data).ok()?;
    doc.pointer(pointer)?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(progress: Progress, on_exhausted: OnExhausted) -> WatchRule {
        WatchRule {
            progress,
            on_exhausted,
        }
    }

    fn ev(units: u64) -> String {
        format!("data: {{\"usage\":{{\"units\":{units}}}}}\n\n")
    }

    fn pass(step: Step) -> String {
        match step {
            Step::Pass(b) => String::from_utf8(b.to_vec()).unwrap(),
            other => panic!("expected a pass, got {other:?}"),
        }
    }

    /// An account that can pay for `limit` units: what `cover` answers.
    fn budget(limit: Units, asked: &mut Vec<Units>) -> impl FnMut(Units) -> Cover + '_ {
        move |total| {
            asked.push(total);
            if total <= limit {
                Cover::Covered
            } else {
                Cover::Refused(Denial::InsufficientCredits {
                    needed_credits: total,
                    available_credits: limit,
                })
            }
        }
    }

    #[test]
    fn passes_whole_events_only_and_asks_for_each_new_total() {
        let mut w = Watcher::new(
            &rule(Progress::Sse("/usage/units".into()), OnExhausted::Stop),
            0,
        );
        let mut asked = vec![];
        let stream = format!("{}{}{}", ev(1), ev(2), ev(3));
        let (a, b) = stream.split_at(ev(1).len() + 5); // the second event cut in its middle
        assert_eq!(pass(w.feed(a.as_bytes(), 0, budget(10, &mut asked))), ev(1));
        assert_eq!(
            pass(w.feed(b.as_bytes(), 0, budget(10, &mut asked))),
            format!("{}{}", ev(2), ev(3))
        );
        assert_eq!(asked, [1, 2, 3]);
        assert_eq!(w.progress(), 3);
    }

    #[test]
    fn stop_withholds_the_event_that_cannot_be_paid_and_everything_after() {
        let mut w = Watcher::new(
            &rule(Progress::Sse("/usage/units".into()), OnExhausted::Stop),
            0,
        );
        let mut asked = vec![];
        let stream = format!("{}{}{}", ev(2), ev(5), ev(6));
        match w.feed(stream.as_bytes(), 0, budget(4, &mut asked)) {
            Step::Stop { pass, denial } => {
                assert_eq!(pass, ev(2).as_bytes());
                assert!(matches!(denial, Denial::InsufficientCredits { .. }));
            }
            other => panic!("{other:?}"),
        }
        assert!(w.stopped());
        assert_eq!(w.progress(), 2, "only what was delivered counts");
        assert_eq!(pass(w.feed(ev(7).as_bytes(), 0, budget(4, &mut asked))), "");
        assert_eq!(asked, [2, 5]);
    }

    #[test]
    fn finish_lets_the_stream_run_and_stops_asking() {
        let mut w = Watcher::new(
            &rule(Progress::Sse("/usage/units".into()), OnExhausted::Finish),
            0,
        );
        let mut asked = vec![];
        let mut cover = |total| {
            asked.push(total);
            if total <= 2 {
                Cover::Covered
            } else {
                Cover::Partly
            }
        };
        let stream = format!("{}{}{}", ev(2), ev(5), ev(9));
        assert_eq!(pass(w.feed(stream.as_bytes(), 0, &mut cover)), stream);
        assert_eq!(w.progress(), 9);
        assert_eq!(asked, [2, 5], "no asking once the account is exhausted");
    }

    #[test]
    fn bytes_and_time_are_progress_too() {
        let mut w = Watcher::new(&rule(Progress::Bytes(10), OnExhausted::Stop), 0);
        let mut asked = vec![];
        let e = "data: 12345\n\n"; // 13 bytes
        assert_eq!(pass(w.feed(e.as_bytes(), 0, budget(10, &mut asked))), e);
        assert_eq!(pass(w.feed(e.as_bytes(), 0, budget(10, &mut asked))), e);
        assert_eq!(asked, [2, 3]);
        let mut t = Watcher::new(&rule(Progress::Time(1000), OnExhausted::Stop), 5_000);
        let mut asked = vec![];
        assert_eq!(pass(t.feed(e.as_bytes(), 5_500, budget(2, &mut asked))), e);
        assert_eq!(pass(t.feed(e.as_bytes(), 6_900, budget(2, &mut asked))), e);
        assert!(matches!(
            t.feed(e.as_bytes(), 7_001, budget(2, &mut asked)),
            Step::Stop { .. }
        ));
        assert_eq!(asked, [1, 2, 3]);
    }

    #[test]
    fn crlf_events_done_and_a_tail_without_its_blank_line() {
        let mut w = Watcher::new(&rule(Progress::Sse("/n".into()), OnExhausted::Stop), 0);
        let mut asked = vec![];
        let s = "event: x\r\ndata: {\"n\":\r\n\r\ndata: {\"n\":4}\r\n\r\ndata: [DONE]\r\n\r\ndata: {\"n\":6}";
        let out = pass(w.feed(s.as_bytes(), 0, budget(9, &mut asked)));
        assert!(out.ends_with("[DONE]\r\n\r\n"), "{out:?}");
        assert_eq!(
            asked,
            [4],
            "an unparsable event and [DONE] bring no progress"
        );
        assert_eq!(pass(w.end(0, budget(9, &mut asked))), "data: {\"n\":6}");
        assert_eq!((w.progress(), asked), (6, vec![4, 6]));
    }

    #[test]
    fn multi_line_data_is_one_document() {
        assert_eq!(
            reported(
                b"data: {\"usage\":\ndata: {\"units\": 7}}\n\n",
                "/usage/units"
            ),
            Some(7)
        );
        assert_eq!(reported(b": comment\n\n", "/usage/units"), None);
    }
}
