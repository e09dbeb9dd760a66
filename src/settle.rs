//! Reading a request's true cost from its response, for routes whose request cost is an
//! estimate: a response header, a field of a JSON body, or a field of the last server-sent
//! event that carries it (OpenAI-style streams end with a `usage` object).
//!
//! A [`SettleReader`] sees the response as it passes, without holding it back: a JSON body is
//! copied aside (up to [`BODY_BYTES_MAX`]), an event stream is scanned line by line. What it
//! finds is read once the body has ended.

use bytes::BytesMut;
use http::HeaderMap;

use std::sync::Arc;

use crate::config::{DimensionPointer, SettleRule};
use crate::cost::UNITS_MAX;
use crate::waterfall::{Quantities, Units};

/// Largest JSON response body copied aside to read its cost.
pub const BODY_BYTES_MAX: usize = 1 << 20;
/// Longest SSE line kept while waiting for its end; a longer line is skipped.
const LINE_BYTES_MAX: usize = 64 << 10;

/// Why a response's cost could not be read (the estimate is charged instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettleError {
    /// The value was not there.
    #[error("the response has no {0}")]
    Missing(String),
    /// The value was there but not a whole number of units.
    #[error("{0} is not a whole number from 0 to {UNITS_MAX}")]
    NotUnits(String),
    /// The JSON body was larger than what is copied aside.
    #[error("the response body is larger than {BODY_BYTES_MAX} bytes")]
    TooLarge,
}

/// What a response reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Measured {
    /// The feature's units.
    Units(Units),
    /// Each dimension's quantity (the plan's rates turn them into units).
    Quantities(Quantities),
}

/// Watches one response for its cost.
#[derive(Debug)]
pub struct SettleReader {
    state: State,
}

/// What a reader looks for in a JSON document.
#[derive(Debug)]
enum Target {
    /// The integer at a pointer.
    One(String),
    /// Each dimension's integer.
    Dimensions(Vec<(Arc<str>, DimensionPointer)>),
    /// Nothing: the route does not settle; the stream is only watched for its `[DONE]`.
    Nothing,
}

#[derive(Debug)]
enum State {
    /// Known from the headers.
    Done(Result<Measured, SettleError>),
    /// A JSON body, copied aside.
    Json {
        target: Target,
        body: BytesMut,
        too_large: bool,
    },
    /// An event stream: the current partial line, and the last value found.
    Sse {
        target: Target,
        line: BytesMut,
        skipping: bool,
        last: Option<Result<Measured, SettleError>>,
        /// The stream's terminal event (`data: [DONE]`) has gone by.
        done: bool,
        /// The keys the target reads (`"total_tokens"`, quoted): a line without any of them
        /// is not parsed (most events of a stream carry no usage).
        needles: Vec<Vec<u8>>,
    },
}

impl State {
    fn json(target: Target) -> State {
        State::Json {
            target,
            body: BytesMut::new(),
            too_large: false,
        }
    }

    fn sse(target: Target) -> State {
        let needles = match &target {
            Target::Nothing => Vec::new(),
            Target::One(p) => vec![key_needle(p)],
            Target::Dimensions(d) => d
                .iter()
                .flat_map(|(_, at)| at.pointers().map(key_needle))
                .collect(),
        };
        State::Sse {
            target,
            line: BytesMut::new(),
            skipping: false,
            last: None,
            done: false,
            needles,
        }
    }
}

impl Target {
    /// What `doc` reports, or `None` if it has none of it (an event without usage).
    fn read(&self, doc: &serde_json::Value) -> Option<Result<Measured, SettleError>> {
        match self {
            Target::Nothing => None,
            Target::One(pointer) => {
                doc.pointer(pointer)?;
                Some(units_at(doc, pointer).map(Measured::Units))
            }
            Target::Dimensions(dims) => {
                if !dims
                    .iter()
                    .any(|(_, at)| at.pointers().any(|p| doc.pointer(p).is_some()))
                {
                    return None;
                }
                let mut out = Quantities::new();
                for (name, at) in dims {
                    // Absent beside the others: none of it (a server that reports no cached
                    // tokens, say).
                    let get = |p: &str| match doc.pointer(p) {
                        None => Ok(0),
                        Some(_) => units_at(doc, p),
                    };
                    let n = match at {
                        DimensionPointer::At(p) => get(p),
                        DimensionPointer::Difference { at, minus } => {
                            get(at).and_then(|a| get(minus).map(|m| a.saturating_sub(m)))
                        }
                    };
                    match n {
                        Ok(n) => out.push((name.clone(), n)),
                        Err(e) => return Some(Err(e)),
                    }
                }
                Some(Ok(Measured::Quantities(out)))
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Target::Nothing => "nothing".into(),
            Target::One(p) => p.clone(),
            Target::Dimensions(d) => d.iter().map(|(n, _)| &**n).collect::<Vec<_>>().join(", "),
        }
    }
}

/// Whether the response is a server-sent event stream.
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("text/event-stream"))
}

impl SettleReader {
    /// A reader for `rule`, given the response's headers.
    pub fn new(rule: &SettleRule, headers: &HeaderMap) -> SettleReader {
        let one = |p: &String| Target::One(p.clone());
        let state = match rule {
            SettleRule::Header(name) => State::Done(match headers.get(name.as_str()) {
                None => Err(SettleError::Missing(format!("header {name}"))),
                Some(v) => v
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<Units>().ok())
                    .filter(|u| *u <= UNITS_MAX)
                    .map(Measured::Units)
                    .ok_or_else(|| SettleError::NotUnits(format!("header {name}"))),
            }),
            SettleRule::Json(pointer) => State::json(one(pointer)),
            SettleRule::Sse(pointer) => State::sse(one(pointer)),
            SettleRule::Body(pointer) if is_event_stream(headers) => State::sse(one(pointer)),
            SettleRule::Body(pointer) => State::json(one(pointer)),
            SettleRule::Dimensions(dims) => {
                let target = Target::Dimensions(
                    dims.iter()
                        .map(|(name, at)| (name.as_str().into(), at.clone()))
                        .collect(),
                );
                if is_event_stream(headers) {
                    State::sse(target)
                } else {
                    State::json(target)
                }
            }
        };
        SettleReader { state }
    }

    /// Sees the next piece of the body.
    pub fn observe(&mut self, mut chunk: &[u8]) {
        match &mut self.state {
            State::Done(_) => {}
            State::Json {
                body, too_large, ..
            } => {
                if body.len() + chunk.len() > BODY_BYTES_MAX {
                    *too_large = true;
                    body.clear();
                } else if !*too_large {
                    body.extend_from_slice(chunk);
                }
            }
            State::Sse {
                target,
                line,
                skipping,
                last,
                done,
                needles,
            } => {
                while !chunk.is_empty() {
                    let end = chunk.iter().position(|b| *b == b'\n');
                    let (piece, rest) = match end {
                        Some(i) => (&chunk[..i], &chunk[i + 1..]),
                        None => (chunk, &[][..]),
                    };
                    if !*skipping {
                        if line.len() + piece.len() > LINE_BYTES_MAX {
                            *skipping = true;
                            line.clear();
                        } else {
                            line.extend_from_slice(piece);
                        }
                    }
                    if end.is_some() {
                        if !*skipping
                            && mentions(line, needles)
                            && let Some(found) = sse_line(line, target)
                        {
                            *last = Some(found);
                        }
                        if !*skipping && is_done(line) {
                            *done = true;
                        }
                        line.clear();
                        *skipping = false;
                    }
                    chunk = rest;
                }
            }
        }
    }

    /// For a route that does not settle: watches an event stream for its `[DONE]` only (see
    /// [`SettleReader::delivered`]); `None` for any other response.
    pub fn done_watcher(headers: &HeaderMap) -> Option<SettleReader> {
        is_event_stream(headers).then(|| SettleReader {
            state: State::sse(Target::Nothing),
        })
    }

    /// Whether the reader settles the cost (`false` for a [`SettleReader::done_watcher`]).
    pub fn settles(&self) -> bool {
        !matches!(
            self.state,
            State::Sse {
                target: Target::Nothing,
                ..
            }
        )
    }

    /// Whether an event stream's terminal event (`data: [DONE]`, as OpenAI-style streams end)
    /// has gone by: the response is delivered even if the client closes before the body's
    /// formal end (OpenAI's SDKs stop reading at `[DONE]`).
    pub fn delivered(&self) -> bool {
        matches!(self.state, State::Sse { done: true, .. })
    }

    /// What the response reported, once its body has ended.
    pub fn finish(self) -> Result<Measured, SettleError> {
        match self.state {
            State::Done(result) => result,
            State::Json {
                target,
                body,
                too_large,
            } => {
                if too_large {
                    return Err(SettleError::TooLarge);
                }
                let missing =
                    || SettleError::Missing(format!("JSON body with {}", target.describe()));
                let doc: serde_json::Value =
                    serde_json::from_slice(&body).map_err(|_| missing())?;
                target.read(&doc).unwrap_or_else(|| Err(missing()))
            }
            State::Sse {
                target, line, last, ..
            } => {
                // A stream may end without a final newline.
                sse_line(&line, &target).or(last).unwrap_or_else(|| {
                    Err(SettleError::Missing(format!(
                        "event with {}",
                        target.describe()
                    )))
                })
            }
        }
    }

    /// The units the response reported, for a rule that measures units (not dimensions).
    pub fn finish_units(self) -> Result<Units, SettleError> {
        match self.finish()? {
            Measured::Units(u) => Ok(u),
            Measured::Quantities(_) => Err(SettleError::Missing("units".into())),
        }
    }
}

/// Whether the line is an OpenAI-style stream's terminal `data: [DONE]`.
fn is_done(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.strip_prefix(b"data:")
        .is_some_and(|d| d.trim_ascii() == b"[DONE]")
}

/// The last key of a JSON pointer as it appears in JSON text: `"/usage/total_tokens"` →
/// `"total_tokens"` with its quotes (`~1` and `~0` decoded). A key the upstream writes with
/// JSON escapes (`"tot\u0061l"`) is not found this way; no server we know of does that.
pub fn key_needle(pointer: &str) -> Vec<u8> {
    let last = pointer.rsplit('/').next().unwrap_or("");
    let key = last.replace("~1", "/").replace("~0", "~");
    let mut needle = Vec::with_capacity(key.len() + 2);
    needle.push(b'"');
    needle.extend_from_slice(key.as_bytes());
    needle.push(b'"');
    needle
}

/// Whether `line` contains any of `needles` (so might carry what a reader looks for).
pub fn mentions(line: &[u8], needles: &[Vec<u8>]) -> bool {
    needles
        .iter()
        .any(|n| memchr::memmem::find(line, n).is_some())
}

/// What a `data:` line's JSON reports, if the line has it.
fn sse_line(line: &[u8], target: &Target) -> Option<Result<Measured, SettleError>> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let data = line.strip_prefix(b"data:")?;
    let doc: serde_json::Value = serde_json::from_slice(data.trim_ascii()).ok()?;
    target.read(&doc)
}

fn units_at(doc: &serde_json::Value, pointer: &str) -> Result<Units, SettleError> {
    doc.pointer(pointer)
        .ok_or_else(|| SettleError::Missing(pointer.to_owned()))?
        .as_u64()
        .filter(|u| *u <= UNITS_MAX)
        .ok_or_else(|| SettleError::NotUnits(pointer.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(
        rule: &SettleRule,
        headers: &HeaderMap,
        chunks: &[&[u8]],
    ) -> Result<Units, SettleError> {
        let mut r = SettleReader::new(rule, headers);
        for c in chunks {
            r.observe(c);
        }
        r.finish_units()
    }

    #[test]
    fn reads_a_header() {
        let mut h = HeaderMap::new();
        h.insert("x-usage", " 42 ".parse().unwrap());
        assert_eq!(read(&SettleRule::Header("x-usage".into()), &h, &[]), Ok(42));
        let none = HeaderMap::new();
        assert!(matches!(
            read(&SettleRule::Header("x-usage".into()), &none, &[]),
            Err(SettleError::Missing(_))
        ));
    }

    #[test]
    fn a_body_rule_reads_a_stream_or_a_json_body_by_content_type() {
        let rule = SettleRule::Body("/usage/total_tokens".into());
        let mut sse = HeaderMap::new();
        sse.insert(
            "content-type",
            "text/event-stream; charset=utf-8".parse().unwrap(),
        );
        let stream: &[&[u8]] = &[
            b"data: {\"choices\":[]}\n\n",
            b"data: {\"usage\":{\"total_tokens\":31}}\n\ndata: [DONE]\n\n",
        ];
        assert_eq!(read(&rule, &sse, stream), Ok(31));
        let mut json = HeaderMap::new();
        json.insert("content-type", "application/json".parse().unwrap());
        assert_eq!(
            read(&rule, &json, &[b"{\"usage\":{\"total_tokens\":12}}"]),
            Ok(12)
        );
        // The same stream read as JSON finds nothing: the content type decides.
        assert!(read(&rule, &json, stream).is_err());
    }

    #[test]
    fn reads_a_json_body_split_across_chunks() {
        let rule = SettleRule::Json("/usage/units".into());
        let h = HeaderMap::new();
        assert_eq!(read(&rule, &h, &[b"{\"usage\":{\"un", b"its\":7}}"]), Ok(7));
        assert_eq!(
            read(&rule, &h, &[b"{\"usage\":{\"units\":-1}}"]),
            Err(SettleError::NotUnits("/usage/units".into()))
        );
    }

    #[test]
    fn reads_the_last_event_that_has_the_field() {
        let rule = SettleRule::Sse("/usage/total".into());
        let h = HeaderMap::new();
        let stream: &[&[u8]] = &[
            b"data: {\"usage\":{\"total\":1}}\n\ndata: {\"text\":\"hi\"}\n",
            b"\ndata: {\"usage\":{\"to",
            b"tal\":9}}\r\n\r\n",
            b"data: [DONE]\n\n",
        ];
        assert_eq!(read(&rule, &h, stream), Ok(9));
        assert!(matches!(
            read(&rule, &h, &[b"data: {\"text\":\"no usage\"}\n\n"]),
            Err(SettleError::Missing(_))
        ));
    }

    #[test]
    fn a_route_without_settle_watches_only_an_event_streams_done() {
        let mut sse = HeaderMap::new();
        sse.insert("content-type", "text/event-stream".parse().unwrap());
        let mut w = SettleReader::done_watcher(&sse).expect("an event stream is watched");
        assert!(!w.settles());
        w.observe(b"data: {\"usage\":{\"total_tokens\":3}}\n\ndata: [DONE]\n\n");
        assert!(w.delivered());
        assert!(SettleReader::done_watcher(&HeaderMap::new()).is_none());
        let settling = SettleReader::new(&SettleRule::Sse("/n".into()), &sse);
        assert!(settling.settles());
    }

    #[test]
    fn a_stream_is_delivered_once_its_done_event_has_gone_by() {
        let rule = SettleRule::Body("/usage/total_tokens".into());
        let mut sse = HeaderMap::new();
        sse.insert("content-type", "text/event-stream".parse().unwrap());
        let mut r = SettleReader::new(&rule, &sse);
        r.observe(b"data: {\"usage\":{\"total_tokens\":3}}\n\n");
        assert!(!r.delivered());
        r.observe(b"data: [DO");
        assert!(!r.delivered(), "only a whole line counts");
        r.observe(b"NE]\r\n\r\n");
        assert!(r.delivered());
        assert_eq!(r.finish_units(), Ok(3));
        // A JSON body is never "delivered" early: its end is the body's end.
        let r = SettleReader::new(&rule, &HeaderMap::new());
        assert!(!r.delivered());
    }

    #[test]
    fn dimensions_are_read_from_the_last_usage_event_or_the_json_body() {
        use std::collections::BTreeMap;
        let dims: BTreeMap<String, DimensionPointer> = [
            (
                "input".to_owned(),
                DimensionPointer::Difference {
                    at: "/usage/prompt_tokens".into(),
                    minus: "/usage/cached".into(),
                },
            ),
            (
                "cached".to_owned(),
                DimensionPointer::At("/usage/cached".into()),
            ),
            (
                "output".to_owned(),
                DimensionPointer::At("/usage/completion_tokens".into()),
            ),
        ]
        .into_iter()
        .collect();
        let rule = SettleRule::Dimensions(dims);
        let q = |m: Result<Measured, SettleError>| match m {
            Ok(Measured::Quantities(q)) => q
                .iter()
                .map(|(d, n)| (d.to_string(), *n))
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        let mut json = SettleReader::new(&rule, &HeaderMap::new());
        json.observe(br#"{"usage":{"prompt_tokens":10,"cached":4,"completion_tokens":7}}"#);
        assert_eq!(
            q(json.finish()),
            [
                ("cached".into(), 4),
                ("input".into(), 6),
                ("output".into(), 7)
            ]
        );
        // A usage object without the cached count: it counts 0.
        let mut sse = HeaderMap::new();
        sse.insert("content-type", "text/event-stream".parse().unwrap());
        let mut stream = SettleReader::new(&rule, &sse);
        stream.observe(b"data: {\"choices\":[{\"delta\":{}}]}\n\n");
        stream.observe(
            b"data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
        );
        assert_eq!(
            q(stream.finish()),
            [
                ("cached".into(), 0),
                ("input".into(), 3),
                ("output".into(), 2)
            ]
        );
        // No usage at all: missing, and the estimate stands.
        let mut none = SettleReader::new(&rule, &sse);
        none.observe(b"data: {\"choices\":[]}\n\n");
        assert!(matches!(none.finish(), Err(SettleError::Missing(_))));
    }

    #[test]
    fn only_lines_naming_the_key_are_parsed() {
        assert_eq!(key_needle("/usage/total_tokens"), b"\"total_tokens\"");
        assert_eq!(key_needle("/a~1b~0c"), b"\"a/b~c\"");
        let needles = [key_needle("/usage/total_tokens")];
        assert!(mentions(br#"data: {"usage":{"total_tokens":3}}"#, &needles));
        assert!(!mentions(
            br#"data: {"choices":[{"delta":{"content":"total"}}]}"#,
            &needles
        ));
        // A key with a slash in it is found by its decoded name.
        let rule = SettleRule::Sse("/usage/a~1b".into());
        let stream: &[&[u8]] = &[b"data: {\"usage\":{\"a/b\":4}}\n\n"];
        assert_eq!(read(&rule, &HeaderMap::new(), stream), Ok(4));
    }

    #[test]
    fn a_huge_body_is_not_kept() {
        let rule = SettleRule::Json("/n".into());
        let big = vec![b' '; BODY_BYTES_MAX];
        assert_eq!(
            read(&rule, &HeaderMap::new(), &[b"{\"n\":1}", &big]),
            Err(SettleError::TooLarge)
        );
    }
}
