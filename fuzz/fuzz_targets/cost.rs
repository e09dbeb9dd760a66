//! A request's cost read from untrusted headers and bodies: never a panic, and a cost is
//! always within `UNITS_MAX`.
#![no_main]

use flowgate::config::CostRule;
use flowgate::cost::{UNITS_MAX, units};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte: which pointer; the next line: a header value; the rest: the body.
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let pointer = ["/seconds", "/a/b/0", "/max_tokens", "/", "/~1x~0y"][pick as usize % 5];
    let (value, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_bytes(value) {
        headers.insert("x-units", v);
    }
    for rule in [
        CostRule::Json(pointer.to_owned()),
        CostRule::Header("x-units".to_owned()),
    ] {
        if let Ok(n) = units(&rule, &headers, body) {
            assert!(n <= UNITS_MAX);
        }
    }
});
