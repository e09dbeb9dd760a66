//! Any text as a config file: an error naming a key, or valid settings; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = flowgate::config::Settings::parse(text) {
            assert!(!e.key.is_empty());
        }
    }
});
