//! The userlist parser (`"user" "password-or-verifier"` lines).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use pgferry_auth::{InstallationSecret, LoadOptions, UserList};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut options = LoadOptions::new(Arc::new(InstallationSecret::from_bytes([9; 32])));
    // One PBKDF2 round per plaintext entry: the parser is under test, not SHA-256.
    options.iterations = Some(1);
    if let Ok((list, _)) = UserList::parse(text, "fuzz", &options) {
        for line in text.lines().take(4) {
            let _ = list.verifier_for(line.trim());
        }
    }
});
