//! Reading a request's true cost from its response, for routes whose request cost is an
//! estimate: a response header, a field of a JSON body, or a field of the last server-sent
//! event that carries it (OpenAI-style streams end with a `usage` object).
//!
//! A [`SettleReader`] sees the response as it passes, without holding it back: a JSON body is
//! copied aside (up to [`BODY_BYTES_MAX`]), an event stream is scanned line by line. What it
//! finds is read once the body has ended.

use bytes::BytesMut;
use http::HeaderMap;

use crate::config::SettleRule;
use crate::cost::UNITS_MAX;
use crate::waterfall::Units;

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

/// Watches one response for its cost.
#[derive(Debug)]
pub struct SettleReader {
    state: State,
}

#[derive(Debug)]
enum State {
    /// Known from the headers.
    Done(Result<Units, SettleError>),
    /// A JSON body, copied aside.
    Json {
        pointer: String,
        body: BytesMut,
        too_large: bool,
    },
    /// An event stream: the current partial line, and the last value found.
    Sse {
        pointer: String,
        line: BytesMut,
        skipping: bool,
        last: Option<Result<Units, SettleError>>,
    },
}

impl State {
    fn json(pointer: &str) -> State {
        State::Json {
            pointer: pointer.to_owned(),
            body: BytesMut::new(),
            too_large: false,
        }
    }

    fn sse(pointer: &str) -> State {
        State::Sse {
            pointer: pointer.to_owned(),
            line: BytesMut::new(),
            skipping: false,
            last: None,
        }
    }
}

/// Whether the response is a server-sent event stream.
fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("text/event-stream"))
}

impl SettleReader {
    /// A reader for `rule`, given the response's headers.
    pub fn new(rule: &SettleRule, headers: &HeaderMap) -> SettleReader {
        let state = match rule {
            SettleRule::Header(name) => State::Done(match headers.get(name.as_str()) {
                None => Err(SettleError::Missing(format!("header {name}"))),
                Some(v) => v
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<Units>().ok())
                    .filter(|u| *u <= UNITS_MAX)
                    .ok_or_else(|| SettleError::NotUnits(format!("header {name}"))),
            }),
            SettleRule::Json(pointer) => State::json(pointer),
            SettleRule::Sse(pointer) => State::sse(pointer),
            SettleRule::Body(pointer) if is_event_stream(headers) => State::sse(pointer),
            SettleRule::Body(pointer) => State::json(pointer),
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
                pointer,
                line,
                skipping,
                last,
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
                        if !*skipping && let Some(found) = sse_line(line, pointer) {
                            *last = Some(found);
                        }
                        line.clear();
                        *skipping = false;
                    }
                    chunk = rest;
                }
            }
        }
    }

    /// The units the response reported, once its body has ended.
    pub fn finish(self) -> Result<Units, SettleError> {
        match self.state {
            State::Done(result) => result,
            State::Json {
                pointer,
                body,
                too_large,
            } => {
                if too_large {
                    return Err(SettleError::TooLarge);
                }
                let doc: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|_| SettleError::Missing(format!("JSON body with {pointer}")))?;
                units_at(&doc, &pointer)
            }
            State::Sse {
                pointer,
                line,
                last,
                ..
            } => {
                // A stream may end without a final newline.
                sse_line(&line, &pointer)
                    .or(last)
                    .unwrap_or_else(|| Err(SettleError::Missing(format!("event with {pointer}"))))
            }
        }
    }
}

/// The value at `pointer` of a `data:` line's JSON, if the line has it.
fn sse_line(line: &[u8], pointer: &str) -> Option<Result<Units, SettleError>> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let data = line.strip_prefix(b"data:")?;
    let doc: serde_json::Value = serde_json::from_slice(data.trim_ascii()).ok()?;
    doc.pointer(pointer)?;
    Some(units_at(&doc, pointer))
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
        r.finish()
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
    fn a_huge_body_is_not_kept() {
        let rule = SettleRule::Json("/n".into());
        let big = vec![b' '; BODY_BYTES_MAX];
        assert_eq!(
            read(&rule, &HeaderMap::new(), &[b"{\"n\":1}", &big]),
            Err(SettleError::TooLarge)
        );
    }
}
