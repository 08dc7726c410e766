//! Micro-benchmark of the forwarder's response pump.
//!
//! One `Pump` driven with `SessionTracker::response_side()` as its visitor
//! moves a pre-built server -> client byte stream from an in-memory reader
//! to an in-memory sink, inside a current-thread tokio runtime, polled with
//! `std::future::poll_fn` exactly as the forwarder polls it. No sockets, so
//! this measures the pump itself: buffer handling, the frame scanner and
//! the tracker's per-message work, plus one memcpy in (the "socket read").
//!
//! Three result streams, each `RowDescription, DataRow x N, CommandComplete,
//! ReadyForQuery`:
//!
//! * `kv_10B`: two-column key/value rows with 10 payload bytes (4-byte key,
//!   6-byte value); 25 bytes per DataRow on the wire. Many tiny messages.
//! * `analytic_350B`: eight-column rows of 350 bytes on the wire.
//! * `wide_30KiB`: one-column rows of 30 KiB, each larger than the pump's
//!   16 KiB buffer.
//!
//! The reader hands out at most 16 KiB per read, cycling through a few
//! sizes (full reads and partial TCP-segment-sized ones) so message
//! boundaries land everywhere in the buffer.
//!
//! `cargo bench --bench pump` runs criterion (throughput in bytes/s).
//! `PGFERRY_BENCH_SMOKE=1 cargo bench --bench pump` (and `cargo test`, which
//! runs bench targets without `--bench`) runs each case once and
//! checks the output is byte-for-byte the input and the tracker saw every
//! message (so a test/CI step can keep this from rotting).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::{Criterion, Throughput};
use pgferry_proxy::forwarder::pump::Pump;
use pgferry_proxy::forwarder::tracker::{CopyState, SessionTracker, TxStatus};
use pgferry_wire::DEFAULT_MAX_MESSAGE_LEN;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// About this many bytes of DataRows per iteration.
const STREAM_BYTES: usize = 4 << 20;

/// Read sizes the reader cycles through (each also capped by the space
/// left in the pump's buffer): full 16 KiB reads mixed with partial ones
/// of a few MSS-sized segments.
const READ_SIZES: [usize; 6] = [16 * 1024, 16 * 1024, 1448 * 3, 16 * 1024, 9000, 1448];

/// An in-memory "socket" holding a whole server response.
struct Source<'a> {
    data: &'a [u8],
    pos: usize,
    nth: usize,
}

impl<'a> Source<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            nth: 0,
        }
    }
}

impl AsyncRead for Source<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let want = READ_SIZES[self.nth % READ_SIZES.len()];
        self.nth += 1;
        let n = want.min(buf.remaining()).min(self.data.len() - self.pos);
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// A sink that always accepts everything; records it only in smoke mode.
struct Sink {
    bytes: usize,
    record: Option<Vec<u8>>,
}

impl AsyncWrite for Sink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.bytes += buf.len();
        if let Some(r) = &mut self.record {
            r.extend_from_slice(buf);
        }
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

/// A DataRow body: column count, then (length, bytes) per column.
fn data_row(cols: &[Vec<u8>]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(cols.len() as u16).to_be_bytes());
    for c in cols {
        b.extend_from_slice(&(c.len() as i32).to_be_bytes());
        b.extend_from_slice(c);
    }
    b
}

/// A RowDescription body for `n` text columns.
fn row_description(n: usize) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(n as u16).to_be_bytes());
    for i in 0..n {
        b.extend_from_slice(format!("col{i}\0").as_bytes());
        b.extend_from_slice(&0u32.to_be_bytes()); // table oid
        b.extend_from_slice(&0u16.to_be_bytes()); // attnum
        b.extend_from_slice(&25u32.to_be_bytes()); // text
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes()); // text format
    }
    b
}

struct Case {
    name: &'static str,
    stream: Vec<u8>,
    /// Messages in the stream (one clock tick each).
    messages: u64,
    row_wire_len: usize,
}

/// `RowDescription, rows..., CommandComplete, ReadyForQuery` with rows of
/// `ncols` columns whose DataRow is exactly `row_wire_len` bytes on the wire.
fn build(name: &'static str, ncols: usize, row_wire_len: usize) -> Case {
    // Wire: 1 tag + 4 len + 2 ncols + ncols * 4 lengths + payload.
    let payload = row_wire_len - 7 - 4 * ncols;
    let rows = (STREAM_BYTES / row_wire_len).max(1);
    let mut s = Vec::with_capacity(rows * row_wire_len + 1024);
    msg(&mut s, b'T', &row_description(ncols));
    for r in 0..rows {
        // Spread the payload over the columns; vary the bytes a little.
        let cols: Vec<Vec<u8>> = (0..ncols)
            .map(|c| {
                let len = payload / ncols + usize::from(c < payload % ncols);
                vec![b'a' + ((r + c) % 26) as u8; len]
            })
            .collect();
        let body = data_row(&cols);
        debug_assert_eq!(body.len() + 5, row_wire_len);
        msg(&mut s, b'D', &body);
    }
    msg(&mut s, b'C', format!("SELECT {rows}\0").as_bytes());
    msg(&mut s, b'Z', b"I");
    Case {
        name,
        stream: s,
        messages: rows as u64 + 3,
        row_wire_len,
    }
}

fn cases() -> Vec<Case> {
    vec![
        // 4-byte key + 6-byte value = 10 payload bytes, 25 on the wire.
        build("kv_10B", 2, 25),
        build("analytic_350B", 8, 350),
        build("wide_30KiB", 1, 30 * 1024),
    ]
}

/// Forwards the whole stream once; returns the sink and the tracker.
fn forward_once(
    rt: &tokio::runtime::Runtime,
    stream: &[u8],
    record: bool,
) -> (Sink, SessionTracker) {
    rt.block_on(async {
        let mut tracker = SessionTracker::new(b'I', Default::default());
        let mut pump = Pump::new(DEFAULT_MAX_MESSAGE_LEN);
        let mut src = Source::new(stream);
        let mut dst = Sink {
            bytes: 0,
            record: record.then(|| Vec::with_capacity(stream.len())),
        };
        poll_fn(|cx| {
            pump.poll_forward(
                cx,
                Pin::new(&mut src),
                Pin::new(&mut dst),
                &mut tracker.response_side(),
            )
        })
        .await
        .expect("pump failed");
        (dst, tracker)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime")
}

fn smoke() {
    let rt = runtime();
    for case in cases() {
        let (sink, tracker) = forward_once(&rt, &case.stream, true);
        let out = sink.record.expect("recorded");
        assert_eq!(
            out.len(),
            case.stream.len(),
            "{}: length differs",
            case.name
        );
        assert!(
            out == case.stream,
            "{}: output bytes differ from input",
            case.name
        );
        assert_eq!(
            tracker.clock(),
            case.messages,
            "{}: messages seen",
            case.name
        );
        assert_eq!(tracker.outstanding(), 0);
        assert_eq!(tracker.tx_status(), TxStatus::Idle);
        assert_eq!(tracker.copy(), CopyState::None);
        assert_eq!(tracker.last_response().map(|s| s.tag), Some(b'Z'));
        println!(
            "smoke {}: {} bytes, {} messages, {}-byte rows: ok",
            case.name,
            case.stream.len(),
            case.messages,
            case.row_wire_len
        );
    }
}

fn bench(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("pump_response");
    for case in cases() {
        group.throughput(Throughput::Bytes(case.stream.len() as u64));
        group.bench_function(case.name, |b| {
            b.iter(|| {
                let (sink, _) = forward_once(&rt, std::hint::black_box(&case.stream), false);
                assert_eq!(sink.bytes, case.stream.len());
            })
        });
    }
    group.finish();
}

fn main() {
    // `cargo test` (the suite) runs bench targets without --bench: smoke.
    if std::env::var_os("PGFERRY_BENCH_SMOKE").is_some_and(|v| v == "1")
        || !std::env::args().any(|a| a == "--bench")
    {
        smoke();
        return;
    }
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
}
