//! Forwarding message by message, for a session that holds prepared
//! statements its current backend does not have: they would not parse when
//! the session moved (their table was dropped, say). PostgreSQL keeps such
//! a statement and fails only when it is used, so the session may move; and
//! so that the client still gets what the old server would have said, the
//! statement's Parse is sent ahead of the client's first Bind or Describe
//! of it. If it fails, the client gets that error (and the server skips the
//! rest up to Sync, as the old server would have after its failing Bind);
//! if it succeeds (the table is back), its ParseComplete is not passed on
//! and the statement is no longer deferred.
//!
//! Slower than the pumps (whole messages are buffered and looked at), and
//! used only by such sessions, until every deferred statement is
//! re-created or closed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use pgferry_wire::messages::take_message;
use pgferry_wire::{tag, FrameScanner};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::tracker::SessionTracker;
use super::ForwardEnd;
use crate::backend::dial::put_raw;
use crate::stream::Stream;

/// A prepared statement the current backend does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deferred {
    pub name: String,
    /// The body of the Parse that re-creates it.
    pub parse: Box<[u8]>,
}

#[derive(Debug)]
pub struct Careful {
    deferred: Vec<Deferred>,
    /// Deferred statements whose Parse was sent and not yet answered (not
    /// sent again meanwhile: a second Parse would fail as a duplicate).
    in_flight: Vec<Deferred>,
    req_in: BytesMut,
    req_out: BytesMut,
    resp_in: BytesMut,
    resp_out: BytesMut,
    req_flush: bool,
    resp_flush: bool,
    /// Stopped after a sync point for a transfer, like a paused pump.
    req_paused: bool,
    req_scanner: FrameScanner,
    resp_scanner: FrameScanner,
    max_len: u32,
    /// Bytes written since the forwarder last took the counts.
    pub(crate) to_server: u64,
    pub(crate) to_client: u64,
}

/// A statement name in a client message, if the message names one: Bind
/// (its statement), Describe / Close of a statement, Parse.
fn statement_named(t: u8, body: &[u8]) -> Option<&[u8]> {
    let cstr = |b: &'_ [u8]| -> Option<usize> { b.iter().position(|&c| c == 0) };
    match t {
        tag::BIND => {
            let portal_end = cstr(body)?;
            let rest = body.get(portal_end + 1..)?;
            Some(&rest[..cstr(rest)?])
        }
        tag::DESCRIBE | tag::CLOSE if body.first() == Some(&b'S') => {
            let rest = &body[1..];
            Some(&rest[..cstr(rest)?])
        }
        tag::PARSE => Some(&body[..cstr(body)?]),
        _ => None,
    }
}

impl Careful {
    /// Starts with `held`: client bytes the request pump held during the
    /// move that deferred these statements.
    pub fn new(deferred: Vec<Deferred>, held: Vec<u8>, max_len: u32) -> Self {
        Self {
            deferred,
            in_flight: Vec::new(),
            req_in: BytesMut::from(&held[..]),
            req_out: BytesMut::new(),
            resp_in: BytesMut::new(),
            resp_out: BytesMut::new(),
            req_flush: false,
            resp_flush: false,
            req_paused: false,
            req_scanner: FrameScanner::new(max_len),
            resp_scanner: FrameScanner::new(max_len),
            max_len,
            to_server: 0,
            to_client: 0,
        }
    }

    /// More statements deferred by a later move.
    pub fn defer(&mut self, more: Vec<Deferred>) {
        for d in more {
            self.deferred.retain(|x| x.name != d.name);
            self.deferred.push(d);
        }
    }

    /// Every statement the backend may not have, in flight or not.
    pub fn deferred(&self) -> impl Iterator<Item = &Deferred> {
        self.deferred.iter().chain(&self.in_flight)
    }

    pub fn resume(&mut self) {
        self.req_paused = false;
    }

    pub fn is_paused(&self) -> bool {
        self.req_paused
    }

    /// Nothing is half-forwarded either way; held client bytes may remain.
    pub fn at_safe_point(&self) -> bool {
        self.req_out.is_empty() && self.response_at_boundary()
    }

    pub fn response_at_boundary(&self) -> bool {
        self.resp_in.is_empty() && self.resp_out.is_empty()
    }

    pub fn request_at_boundary(&self) -> bool {
        self.req_in.is_empty() && self.req_out.is_empty()
    }

    /// Every deferred statement is back or closed and nothing is buffered:
    /// the pumps can take over again.
    pub fn done(&self) -> bool {
        self.deferred.is_empty()
            && self.in_flight.is_empty()
            && self.request_at_boundary()
            && self.response_at_boundary()
    }

    /// Client bytes held for the session's next backend, for a move.
    pub fn take_held(&mut self) -> Vec<u8> {
        self.req_in.split().to_vec()
    }

    pub fn poll(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut Stream,
        server: &mut Stream,
        tracker: &mut SessionTracker,
    ) -> Poll<ForwardEnd> {
        if let Poll::Ready(end) = self.poll_requests(cx, client, server, tracker) {
            return Poll::Ready(end);
        }
        self.poll_responses(cx, client, server, tracker)
    }

    fn poll_requests(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut Stream,
        server: &mut Stream,
        tracker: &mut SessionTracker,
    ) -> Poll<ForwardEnd> {
        loop {
            match write_out(cx, server, &mut self.req_out, &mut self.req_flush) {
                Poll::Ready(Ok(n)) => self.to_server += n,
                Poll::Ready(Err(e)) => return Poll::Ready(ForwardEnd::ServerIo(e)),
                Poll::Pending => return Poll::Pending,
            }
            if self.req_paused {
                return Poll::Pending;
            }
            match take_message(&mut self.req_in, self.max_len) {
                Err(e) => return Poll::Ready(ForwardEnd::ClientProtocol(e)),
                Ok(Some(m)) => {
                    self.request(m.tag, &m.body, tracker);
                    continue;
                }
                Ok(None) => {}
            }
            match read_in(cx, client, &mut self.req_in) {
                Poll::Ready(Ok(0)) => return Poll::Ready(ForwardEnd::ClientClosed),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(ForwardEnd::ClientIo(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn request(&mut self, t: u8, body: &[u8], tracker: &mut SessionTracker) {
        let named = statement_named(t, body)
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| self.deferred.iter().position(|d| d.name == n));
        if let Some(i) = named {
            match t {
                // The client replaces or drops it: the backend's answer is
                // the right one from here on.
                tag::PARSE | tag::CLOSE => {
                    self.deferred.remove(i);
                }
                _ => {
                    let d = self.deferred.remove(i);
                    put_raw(&mut self.req_out, tag::PARSE, &d.parse);
                    tracker.inject_parse(d.name.clone(), d.parse.clone());
                    self.in_flight.push(d);
                }
            }
        }
        let start = self.req_out.len();
        put_raw(&mut self.req_out, t, body);
        let scan = self
            .req_scanner
            .scan(&self.req_out[start..], &mut tracker.request_side());
        // A whole message: the scan cannot fail on its length (take_message
        // checked it); a pause is the transfer's hold.
        if scan.is_ok_and(|s| s.paused) {
            self.req_paused = true;
        }
    }

    fn poll_responses(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut Stream,
        server: &mut Stream,
        tracker: &mut SessionTracker,
    ) -> Poll<ForwardEnd> {
        loop {
            match write_out(cx, client, &mut self.resp_out, &mut self.resp_flush) {
                Poll::Ready(Ok(n)) => self.to_client += n,
                Poll::Ready(Err(e)) => return Poll::Ready(ForwardEnd::ClientIo(e)),
                Poll::Pending => return Poll::Pending,
            }
            match take_message(&mut self.resp_in, self.max_len) {
                Err(e) => return Poll::Ready(ForwardEnd::ServerProtocol(e)),
                Ok(Some(m)) => {
                    if m.tag == tag::PARSE_COMPLETE && tracker.next_answer_is_injected() {
                        // Ours: the statement is back on this backend.
                        tracker.injected_parse_complete();
                    } else {
                        let start = self.resp_out.len();
                        put_raw(&mut self.resp_out, m.tag, &m.body);
                        let _ = self
                            .resp_scanner
                            .scan(&self.resp_out[start..], &mut tracker.response_side());
                    }
                    for (name, recreated) in tracker.take_injected_outcomes() {
                        if let Some(i) = self.in_flight.iter().position(|d| d.name == name) {
                            let d = self.in_flight.remove(i);
                            if !recreated {
                                self.deferred.push(d);
                            }
                        }
                    }
                    continue;
                }
                Ok(None) => {}
            }
            match read_in(cx, server, &mut self.resp_in) {
                Poll::Ready(Ok(0)) => return Poll::Ready(ForwardEnd::ServerClosed),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(ForwardEnd::ServerIo(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Writes and flushes all of `out`; Ready(Ok(bytes written)) when empty.
fn write_out(
    cx: &mut Context<'_>,
    dst: &mut Stream,
    out: &mut BytesMut,
    needs_flush: &mut bool,
) -> Poll<io::Result<u64>> {
    let mut written = 0u64;
    while !out.is_empty() {
        match Pin::new(&mut *dst).poll_write(cx, out) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                out.advance(n);
                written += n as u64;
                *needs_flush = true;
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    }
    if *needs_flush {
        match Pin::new(&mut *dst).poll_flush(cx) {
            Poll::Ready(Ok(())) => *needs_flush = false,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    }
    Poll::Ready(Ok(written))
}

/// One read into `buf`; Ready(Ok(0)) at EOF.
fn read_in(cx: &mut Context<'_>, src: &mut Stream, buf: &mut BytesMut) -> Poll<io::Result<usize>> {
    let mut chunk = [0u8; 8192];
    let mut rb = ReadBuf::new(&mut chunk);
    match Pin::new(src).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) => {
            buf.extend_from_slice(rb.filled());
            Poll::Ready(Ok(rb.filled().len()))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_statement_a_message_names() {
        assert_eq!(statement_named(tag::BIND, b"p\0s1\0\0\0"), Some(&b"s1"[..]));
        assert_eq!(statement_named(tag::BIND, b"\0\0\0\0"), Some(&b""[..]));
        assert_eq!(statement_named(tag::DESCRIBE, b"Ss1\0"), Some(&b"s1"[..]));
        assert_eq!(statement_named(tag::DESCRIBE, b"Pp1\0"), None);
        assert_eq!(statement_named(tag::CLOSE, b"Ss1\0"), Some(&b"s1"[..]));
        assert_eq!(
            statement_named(tag::PARSE, b"s1\0select 1\0\0\0"),
            Some(&b"s1"[..])
        );
        assert_eq!(statement_named(tag::EXECUTE, b"\0\0\0\0\0"), None);
        assert_eq!(statement_named(tag::BIND, b"p"), None);
    }
}
