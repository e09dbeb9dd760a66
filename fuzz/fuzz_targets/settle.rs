//! Settle readers fed an untrusted response in arbitrary chunks: never a panic, the same
//! answer whatever the chunking (units, or every dimension's quantity), a cost within
//! `UNITS_MAX`, and `[DONE]` seen the same way.
#![no_main]

use flowgate::config::{DimensionPointer, SettleRule};
use flowgate::cost::UNITS_MAX;
use flowgate::settle::{Measured, SettleReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let plain = http::HeaderMap::new();
    let mut stream = http::HeaderMap::new();
    stream.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    let dimensions = SettleRule::Dimensions(
        [
            (
                "input".to_owned(),
                DimensionPointer::Difference {
                    at: "/usage/prompt_tokens".to_owned(),
                    minus: "/usage/cached".to_owned(),
                },
            ),
            (
                "output".to_owned(),
                DimensionPointer::At("/usage/completion_tokens".to_owned()),
            ),
        ]
        .into_iter()
        .collect(),
    );
    for (rule, headers) in [
        (SettleRule::Sse("/usage/total_tokens".to_owned()), &plain),
        (SettleRule::Json("/usage/units".to_owned()), &plain),
        (SettleRule::Body("/usage/total_tokens".to_owned()), &plain),
        (SettleRule::Body("/usage/total_tokens".to_owned()), &stream),
        (dimensions.clone(), &plain),
        (dimensions.clone(), &stream),
    ] {
        let mut whole = SettleReader::new(&rule, headers);
        whole.observe(body);
        let whole_done = whole.delivered();
        let whole = whole.finish();
        // The same bytes in chunks of `cut` bytes (an SSE event split across TCP reads).
        let mut chunked = SettleReader::new(&rule, headers);
        for chunk in body.chunks(usize::from(cut).max(1)) {
            chunked.observe(chunk);
        }
        assert_eq!(whole_done, chunked.delivered(), "chunking changed [DONE]");
        let chunked = chunked.finish();
        assert_eq!(
            whole.as_ref().ok(),
            chunked.as_ref().ok(),
            "chunking changed the settled cost"
        );
        match whole {
            Ok(Measured::Units(n)) => assert!(n <= UNITS_MAX),
            Ok(Measured::Quantities(q)) => assert!(q.iter().all(|(_, n)| *n <= UNITS_MAX)),
            Err(_) => {}
        }
    }
});
