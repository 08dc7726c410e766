//! One direction of a session: read raw bytes, let the frame scanner see
//! them, write them on. Nothing is decoded or copied beyond the one read
//! buffer, and that buffer is only held while there is data in flight.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use pgferry_wire::{FrameError, FrameScanner, FrameVisitor};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::buffer_pool;

/// Reads per poll before yielding, so one busy direction cannot starve the
/// other or the rest of the worker thread.
const READS_PER_POLL: usize = 16;

#[derive(Debug)]
pub enum PumpError {
    Read(io::Error),
    Write(io::Error),
    Frame(FrameError),
}

#[derive(Debug)]
pub struct Pump {
    buf: Option<Box<[u8]>>,
    /// `buf[written..scanned]` may be written; `buf[scanned..filled]` was
    /// read but not yet released by the scanner (held at a pause).
    written: usize,
    scanned: usize,
    filled: usize,
    eof: bool,
    needs_flush: bool,
    /// The visitor paused after a message; nothing more is scanned (so
    /// nothing more is forwarded) until `resume`.
    paused: bool,
    scanner: FrameScanner,
    /// Bytes written since the caller last took the count.
    pub(crate) bytes_unreported: u64,
}

impl Pump {
    pub fn new(max_message_len: u32) -> Self {
        Self {
            buf: None,
            written: 0,
            scanned: 0,
            filled: 0,
            eof: false,
            needs_flush: false,
            paused: false,
            scanner: FrameScanner::new(max_message_len),
            bytes_unreported: 0,
        }
    }

    /// No message is partly forwarded and nothing read is waiting to be
    /// written: the peer has seen only whole messages.
    pub fn at_boundary(&self) -> bool {
        self.scanner.at_boundary() && self.filled == 0
    }

    /// Everything released has been written and no message is partly
    /// forwarded; bytes held back after a pause may remain buffered.
    pub fn is_drained(&self) -> bool {
        self.scanner.at_boundary() && self.written == self.scanned
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Reads again after its source ended (the source was replaced: a
    /// session rehomed after its primary died). Only at a boundary.
    pub fn reopen(&mut self) {
        self.eof = false;
    }

    /// Lets a paused pump go on with what it holds and then read again.
    pub fn resume(&mut self) {
        self.paused = false;
    }

    /// Takes the bytes held back after a pause (read, not yet scanned) when
    /// everything before them has been written; the pump is then empty.
    /// For the forwarder switching to message-by-message forwarding.
    pub fn take_held(&mut self) -> Vec<u8> {
        if !self.is_drained() {
            return Vec::new();
        }
        let held = match &self.buf {
            Some(buf) => buf[self.scanned..self.filled].to_vec(),
            None => Vec::new(),
        };
        self.written = 0;
        self.scanned = 0;
        self.filled = 0;
        self.release();
        held
    }

    /// Starts an empty pump with bytes another process read from this
    /// pump's source and did not scan (`handoff`): they are scanned and
    /// forwarded before anything is read. False (nothing taken) if they do
    /// not fit one buffer, which `take_held` never gives.
    pub fn preload(&mut self, held: &[u8]) -> bool {
        if held.is_empty() {
            return true;
        }
        if self.buf.is_some() || held.len() > buffer_pool::BUFFER_SIZE {
            return false;
        }
        let mut buf = buffer_pool::take();
        buf[..held.len()].copy_from_slice(held);
        self.buf = Some(buf);
        self.written = 0;
        self.scanned = 0;
        self.filled = held.len();
        true
    }

    /// Holds a read buffer right now (for memory accounting and tests).
    pub fn holds_buffer(&self) -> bool {
        self.buf.is_some()
    }

    pub fn take_bytes(&mut self) -> u64 {
        std::mem::take(&mut self.bytes_unreported)
    }

    /// Moves bytes from `src` to `dst` until `src` ends (Ready(Ok)), an
    /// error occurs, or neither side can make progress (Pending).
    pub fn poll_forward<R, W, V>(
        &mut self,
        cx: &mut Context<'_>,
        mut src: Pin<&mut R>,
        mut dst: Pin<&mut W>,
        visitor: &mut V,
    ) -> Poll<Result<(), PumpError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
        V: FrameVisitor,
    {
        let mut reads = 0;
        loop {
            // Write what the scanner has released.
            if let Some(buf) = &self.buf {
                while self.written < self.scanned {
                    match dst
                        .as_mut()
                        .poll_write(cx, &buf[self.written..self.scanned])
                    {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(PumpError::Write(
                                io::ErrorKind::WriteZero.into(),
                            )))
                        }
                        Poll::Ready(Ok(n)) => {
                            self.written += n;
                            self.bytes_unreported += n as u64;
                            self.needs_flush = true;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::Write(e))),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
            if self.needs_flush {
                match dst.as_mut().poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.needs_flush = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::Write(e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.written == self.filled {
                self.written = 0;
                self.scanned = 0;
                self.filled = 0;
            }
            if self.paused {
                // Held at a pause point; the forwarder resumes us.
                self.release();
                return Poll::Pending;
            }
            if self.scanned < self.filled {
                // Bytes just read, or held back by an earlier pause.
                if let Some(buf) = &self.buf {
                    let scan = self
                        .scanner
                        .scan(&buf[self.scanned..self.filled], visitor)
                        .map_err(PumpError::Frame)?;
                    self.scanned += scan.consumed;
                    self.paused = scan.paused;
                }
                continue;
            }
            if self.eof {
                self.release();
                return Poll::Ready(Ok(()));
            }
            if reads == READS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            reads += 1;

            let buf = self.buf.get_or_insert_with(buffer_pool::take);
            let mut rb = ReadBuf::new(&mut buf[self.filled..]);
            match src.as_mut().poll_read(cx, &mut rb) {
                Poll::Pending => {
                    self.release();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpError::Read(e))),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.eof = true;
                        continue;
                    }
                    // Scanned at the top of the loop, before anything is written.
                    self.filled += n;
                }
            }
        }
    }

    /// Gives the buffer back when it holds nothing.
    fn release(&mut self) {
        if self.filled == 0 {
            if let Some(b) = self.buf.take() {
                buffer_pool::give(b);
            }
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            buffer_pool::give(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forwarder::tracker::{CopyState, SessionTracker, TxStatus};
    use std::future::poll_fn;

    /// Yields its bytes `chunk` at a time, returning Pending between reads
    /// (as a socket would), then EOF.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
        pending_next: bool,
    }

    impl Trickle {
        fn new(data: Vec<u8>, chunk: usize) -> Self {
            Self {
                data,
                pos: 0,
                chunk,
                pending_next: false,
            }
        }
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.pending_next {
                self.pending_next = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.pending_next = true;
            let n = self
                .chunk
                .min(self.data.len() - self.pos)
                .min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.data[start..start + n]);
            self.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    /// Accepts at most `chunk` bytes per write, Pending every other call.
    struct SlowSink {
        out: Vec<u8>,
        chunk: usize,
        pending_next: bool,
    }

    impl AsyncWrite for SlowSink {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.pending_next {
                self.pending_next = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.pending_next = true;
            let n = self.chunk.min(buf.len());
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// A client pipelining simple and extended queries.
    fn client_stream() -> Vec<u8> {
        [
            msg(b'Q', b"select 1\0"),
            msg(b'P', b"\0select $1\0\0\0"),
            msg(b'B', &[0; 10]),
            msg(b'E', &[0; 5]),
            msg(b'S', b""),
            msg(b'F', &[0; 12]),
            msg(b'Q', b"begin\0"),
        ]
        .concat()
    }

    /// The server's answers: three ReadyForQuery, the last one 'T'.
    fn server_stream() -> Vec<u8> {
        [
            msg(b'T', &[0; 30]),
            msg(b'D', &[1; 400]),
            msg(b'C', b"SELECT 1\0"),
            msg(b'Z', b"I"),
            msg(b'1', b""),
            msg(b'2', b""),
            msg(b'D', &[2; 20_000]), // larger than one pump buffer
            msg(b'C', b"SELECT 1\0"),
            msg(b'Z', b"I"),
            msg(b'S', b"application_name\0moved\0"),
            msg(b'V', &[0; 8]),
            msg(b'Z', b"I"),
            msg(b'C', b"BEGIN\0"),
            msg(b'Z', b"T"),
        ]
        .concat()
    }

    async fn pump_all(
        pump: &mut Pump,
        src: &mut Trickle,
        dst: &mut SlowSink,
        tracker: &mut SessionTracker,
        request: bool,
    ) {
        poll_fn(|cx| {
            let r = if request {
                pump.poll_forward(
                    cx,
                    Pin::new(&mut *src),
                    Pin::new(&mut *dst),
                    &mut tracker.request_side(),
                )
            } else {
                pump.poll_forward(
                    cx,
                    Pin::new(&mut *src),
                    Pin::new(&mut *dst),
                    &mut tracker.response_side(),
                )
            };
            r.map(|r| r.expect("pump failed"))
        })
        .await
    }

    #[tokio::test]
    async fn byte_at_a_time_is_exact() {
        for (read_chunk, write_chunk) in [(1, 1), (1, 7), (3, 1), (4096, 5), (100_000, 100_000)] {
            let mut tracker = SessionTracker::new(b'I', Default::default());
            let mut req = Pump::new(1 << 30);
            let mut src = Trickle::new(client_stream(), read_chunk);
            let mut dst = SlowSink {
                out: vec![],
                chunk: write_chunk,
                pending_next: false,
            };
            pump_all(&mut req, &mut src, &mut dst, &mut tracker, true).await;
            assert_eq!(
                dst.out,
                client_stream(),
                "request bytes altered ({read_chunk},{write_chunk})"
            );
            assert_eq!(tracker.outstanding(), 4, "Q, S, F, Q are sync points");
            assert_eq!(tracker.last_request().map(|s| s.tag), Some(b'Q'));
            assert_eq!(tracker.clock(), 7);
            assert!(req.at_boundary());
            assert!(!req.holds_buffer(), "buffer kept after draining");
            assert_eq!(req.take_bytes(), client_stream().len() as u64);

            let mut resp = Pump::new(1 << 30);
            let mut src = Trickle::new(server_stream(), read_chunk);
            let mut dst = SlowSink {
                out: vec![],
                chunk: write_chunk,
                pending_next: false,
            };
            pump_all(&mut resp, &mut src, &mut dst, &mut tracker, false).await;
            assert_eq!(dst.out, server_stream(), "response bytes altered");
            assert_eq!(tracker.outstanding(), 0);
            assert_eq!(tracker.tx_status(), TxStatus::InTransaction);
            assert!(!tracker.is_quiescent());
            assert_eq!(tracker.last_response().map(|s| s.tag), Some(b'Z'));
            assert_eq!(
                tracker.clock(),
                7 + 14,
                "one tick per message, both directions"
            );
            assert!(tracker.parameters().contains("application_name", "moved"));
        }
    }

    #[tokio::test]
    async fn extended_copy_in_discounts_ignored_syncs() {
        // libpq's extended COPY FROM STDIN: P B E S, then (after
        // CopyInResponse) d d c S. The server ignores the first Sync.
        let mut tracker = SessionTracker::new(b'I', Default::default());
        let run = |bytes: Vec<u8>, tracker: &mut SessionTracker, request: bool| {
            let mut t = std::mem::replace(tracker, SessionTracker::new(b'I', Default::default()));
            async move {
                let mut p = Pump::new(1 << 30);
                let mut src = Trickle::new(bytes, 2);
                let mut dst = SlowSink {
                    out: vec![],
                    chunk: 3,
                    pending_next: false,
                };
                pump_all(&mut p, &mut src, &mut dst, &mut t, request).await;
                t
            }
        };
        let head = [
            msg(b'P', b"\0copy t from stdin\0\0\0"),
            msg(b'B', &[0; 10]),
            msg(b'E', &[0; 5]),
            msg(b'S', b""),
        ]
        .concat();
        tracker = run(head, &mut tracker, true).await;
        assert_eq!(tracker.outstanding(), 1);
        tracker = run(
            [msg(b'1', b""), msg(b'2', b""), msg(b'G', &[0, 0, 0])].concat(),
            &mut tracker,
            false,
        )
        .await;
        assert_eq!(tracker.copy(), CopyState::In);
        tracker = run(
            [
                msg(b'd', b"1\n"),
                msg(b'd', b"2\n"),
                msg(b'c', b""),
                msg(b'S', b""),
            ]
            .concat(),
            &mut tracker,
            true,
        )
        .await;
        assert_eq!(
            tracker.outstanding(),
            1,
            "the Sync sent during copy-in is not answered"
        );
        tracker = run(
            [msg(b'C', b"COPY 2\0"), msg(b'Z', b"I")].concat(),
            &mut tracker,
            false,
        )
        .await;
        assert_eq!(tracker.outstanding(), 0);
        assert_eq!(tracker.copy(), CopyState::None);
        assert!(tracker.is_quiescent());
    }

    #[tokio::test]
    async fn oversized_and_short_lengths_are_errors() {
        let mut tracker = SessionTracker::new(b'I', Default::default());
        for bad in [vec![b'Q', 0, 0, 0, 2], vec![b'Q', 0x10, 0, 0, 0]] {
            let mut p = Pump::new(1 << 20);
            let mut src = Trickle::new(bad, 1);
            let mut dst = SlowSink {
                out: vec![],
                chunk: 1,
                pending_next: false,
            };
            let err = poll_fn(|cx| {
                p.poll_forward(
                    cx,
                    Pin::new(&mut src),
                    Pin::new(&mut dst),
                    &mut tracker.request_side(),
                )
            })
            .await;
            assert!(matches!(err, Err(PumpError::Frame(_))), "{err:?}");
            // Bytes of a header split across reads pass before its length
            // can be checked; the complete bad header never does, and the
            // session closes both sides right after the error.
            assert!(
                dst.out.len() < 5,
                "a bad header was forwarded: {:?}",
                dst.out
            );
        }
    }
}
