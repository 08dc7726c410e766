//! The frame scanner and the session tracker (safe-point state, the
//! extended-protocol matching, custom-setting names) over arbitrary bytes
//! in both directions, split at arbitrary points. Whatever the bytes, the
//! scanner either consumes all of them or reports a frame error, and
//! splitting never changes what it sees.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgferry_proxy::forwarder::tracker::SessionTracker;
use pgferry_wire::FrameScanner;

const MAX: u32 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    // The first byte says where the server's bytes start and how reads are cut.
    let cut = rest.len() * usize::from(split) / 256;
    let (from_client, from_server) = rest.split_at(cut);
    let chunk = usize::from(split % 17) + 1;
    let mut tracker = SessionTracker::new(b'I', Default::default());
    let mut up = FrameScanner::new(MAX);
    let mut down = FrameScanner::new(MAX);
    let mut whole = FrameScanner::new(MAX);
    let mut reference = SessionTracker::new(b'I', Default::default());
    let whole_ok = whole
        .scan(from_client, &mut reference.request_side())
        .is_ok();
    let mut pieces_ok = true;
    for piece in from_client.chunks(chunk) {
        match up.scan(piece, &mut tracker.request_side()) {
            Ok(s) => assert!(s.paused || s.consumed == piece.len()),
            Err(_) => {
                pieces_ok = false;
                break;
            }
        }
    }
    assert_eq!(
        whole_ok, pieces_ok,
        "a split changed whether the stream is valid"
    );
    if whole_ok {
        assert_eq!(up.at_boundary(), whole.at_boundary());
        assert_eq!(tracker.outstanding(), reference.outstanding());
        assert_eq!(
            tracker.in_unsynced_exchange(),
            reference.in_unsynced_exchange()
        );
    }
    for piece in from_server.chunks(chunk) {
        if down.scan(piece, &mut tracker.response_side()).is_err() {
            break;
        }
    }
    let _ = tracker.is_quiescent();
    let _ = tracker.unnamed_statement();
});
