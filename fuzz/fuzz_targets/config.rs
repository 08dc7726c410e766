//! The config file parser and its validation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgferry_proxy::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, "fuzz.toml", std::path::Path::new("/nonexistent"));
    }
});
