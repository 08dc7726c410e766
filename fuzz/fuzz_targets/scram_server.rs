//! The SCRAM server's client-first and client-final parsing, plain and
//! with channel binding: arbitrary messages are refused, never a panic,
//! and never accepted (the fuzzer does not know the password).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgferry_auth::scram::{ChannelBinding, ScramServer, ScramVerifier};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let split = rest.iter().position(|&b| b == 0xff).unwrap_or(rest.len());
    let (first, last) = rest.split_at(split);
    let last = last.get(1..).unwrap_or_default();
    let verifier = ScramVerifier::from_password("fuzz-secret", b"0123456789abcdef", 1);
    let binding = match mode % 3 {
        0 => ChannelBinding::None,
        1 => ChannelBinding::TlsUnbindable,
        _ => ChannelBinding::TlsServerEndPoint(vec![7u8; 32]),
    };
    let mechanism = if mode & 0x80 != 0 {
        "SCRAM-SHA-256-PLUS"
    } else {
        "SCRAM-SHA-256"
    };
    let mut server = ScramServer::with_channel_binding(verifier, mode & 0x40 != 0, binding);
    if server.handle_client_first(mechanism, first).is_ok() {
        assert!(
            server.handle_client_final(last).is_err(),
            "a made-up proof was accepted"
        );
    }
});
