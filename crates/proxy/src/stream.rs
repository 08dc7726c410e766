//! A socket that is plain TCP or TLS, on either side of the proxy.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::continued::ContinuedTls;
use crate::tls::handover::Tracked;

/// Boxed TLS variants keep the enum (and so every idle session) small.
pub enum Stream {
    Plain(TcpStream),
    ServerTls(Box<tokio_rustls::server::TlsStream<Tracked<TcpStream>>>),
    ClientTls(Box<tokio_rustls::client::TlsStream<Tracked<TcpStream>>>),
    /// A TLS session continued after a hand-off, either side.
    Continued(Box<ContinuedTls>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Stream::Plain(_))
    }

    /// Nothing has arrived that is not read yet (a peek; consumes nothing
    /// and registers no waker). A rustls stream may hold decrypted bytes the
    /// socket cannot show, so it never counts as silent; a continued one
    /// knows what it holds.
    pub fn is_silent(&self) -> bool {
        match self {
            Stream::Plain(s) => {
                let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
                // Non-blocking socket: WouldBlock means nothing is there.
                matches!(
                    socket2::SockRef::from(s).peek(&mut byte),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock
                )
            }
            Stream::ServerTls(_) | Stream::ClientTls(_) => false,
            Stream::Continued(s) => s.is_silent(),
        }
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::ServerTls(s) => s.get_ref().0.get_ref(),
            Stream::ClientTls(s) => s.get_ref().0.get_ref(),
            Stream::Continued(s) => s.tcp(),
        }
    }
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::ServerTls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
            Stream::ClientTls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
            Stream::Continued($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::ServerTls(s) => s.is_write_vectored(),
            Stream::ClientTls(s) => s.is_write_vectored(),
            Stream::Continued(s) => s.is_write_vectored(),
        }
    }
}

/// TCP_NODELAY and keepalive on a client or backend socket.
pub fn tune_socket(tcp: &TcpStream, keepalive: std::time::Duration) {
    let sock = socket2::SockRef::from(tcp);
    let ka = socket2::TcpKeepalive::new()
        .with_time(keepalive)
        .with_interval(std::time::Duration::from_secs(10));
    if let Err(e) = sock
        .set_tcp_nodelay(true)
        .and_then(|_| sock.set_tcp_keepalive(&ka))
    {
        tracing::debug!(error = %e, "could not set socket options");
    }
}
