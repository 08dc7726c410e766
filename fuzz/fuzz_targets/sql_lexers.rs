//! The SQL lexers behind a move: cutting one PREPARE out of a multi-
//! statement string (`transfer/prepare_text.rs`) and finding custom setting
//! names (`forwarder/setting_names.rs`). A cut is a substring of the input
//! that, lexed again, is that one PREPARE and nothing else. (Running the cut on a
//! real server, differentially, is a follow-up: docs/security.md.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgferry_proxy::forwarder::setting_names::find_custom_settings;
use pgferry_proxy::transfer::prepare_text::find_prepare;

fuzz_target!(|data: &[u8]| {
    let mut found = Vec::new();
    find_custom_settings(data, &mut found);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (name, sql) = text.split_once('\n').unwrap_or(("p", text));
    for backslash_escapes in [false, true] {
        if let Some(cut) = find_prepare(sql, name, backslash_escapes) {
            assert!(sql.contains(cut), "the cut is not part of the input");
            // The cut is that one PREPARE and nothing else.
            assert_eq!(
                find_prepare(cut, name, backslash_escapes),
                Some(cut),
                "the cut is not a PREPARE of its own"
            );
        }
    }
});
