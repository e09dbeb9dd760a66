//! Settle readers fed an untrusted response in arbitrary chunks: never a panic, the same
//! answer whatever the chunking, and a cost within `UNITS_MAX`.
#![no_main]

use flowgate::config::SettleRule;
use flowgate::cost::UNITS_MAX;
use flowgate::settle::SettleReader;
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
    for (rule, headers) in [
        (SettleRule::Sse("/usage/total_tokens".to_owned()), &plain),
        (SettleRule::Json("/usage/units".to_owned()), &plain),
        (SettleRule::Body("/usage/total_tokens".to_owned()), &plain),
        (SettleRule::Body("/usage/total_tokens".to_owned()), &stream),
    ] {
        let mut whole = SettleReader::new(&rule, headers);
        whole.observe(body);
        let whole = whole.finish();
        // The same bytes in chunks of `cut` bytes (an SSE event split across TCP reads).
        let mut chunked = SettleReader::new(&rule, headers);
        for chunk in body.chunks(usize::from(cut).max(1)) {
            chunked.observe(chunk);
        }
        let chunked = chunked.finish();
        assert_eq!(
            whole.as_ref().ok(),
            chunked.as_ref().ok(),
            "chunking changed the settled cost"
        );
        if let Ok(n) = whole {
            assert!(n <= UNITS_MAX);
        }
    }
});
