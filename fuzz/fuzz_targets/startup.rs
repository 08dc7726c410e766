//! Startup packets (StartupMessage, SSLRequest, GSSENCRequest,
//! CancelRequest): the length check and the body parser never panic, and
//! a parsed StartupMessage re-encodes to a packet that parses the same.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgferry_wire::startup::{parse_startup_body, startup_body_len};
use pgferry_wire::StartupPacket;

fuzz_target!(|data: &[u8]| {
    if let Some(prefix) = data.get(0..4) {
        let _ = startup_body_len([prefix[0], prefix[1], prefix[2], prefix[3]]);
    }
    if let Ok(StartupPacket::Startup(m)) = parse_startup_body(data) {
        let mut buf = BytesMut::new();
        m.encode_for_backend(&mut buf);
        let again = parse_startup_body(&buf[4..]).expect("re-encoded startup parses");
        let StartupPacket::Startup(again) = again else {
            panic!("re-encoded startup is not a StartupMessage")
        };
        assert_eq!(again.params, m.params);
    }
});
