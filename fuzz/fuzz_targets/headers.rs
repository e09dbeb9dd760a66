//! Untrusted header values: idempotency keys and API-key lookups never panic, and a key that
//! parses is what the client sent.
#![no_main]

use flowgate::ids::IdempotencyKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = http::HeaderValue::from_bytes(data) {
        if let Some(key) = value.to_str().ok().and_then(|s| IdempotencyKey::parse(s).ok()) {
            assert_eq!(key.as_str().as_bytes(), data);
            assert!(key.as_str().len() <= flowgate::ids::IDEMPOTENCY_KEY_BYTES_MAX);
        }
        let accounts = flowgate::accounts::Accounts::new();
        let _ = accounts.by_api_key(value.to_str().unwrap_or_default());
    }
});
