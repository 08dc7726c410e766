//! The forwarder: one task per session moving bytes both ways.
//!
//! A single future polls the request pump (client -> server), the response
//! pump (server -> client) and the session's control channel. Each pump has
//! its own buffer, so neither direction can block the other; because one
//! task owns both sockets, pausing a direction is simply not polling it, and
//! a later transfer can swap the server socket with no lock in sight.

pub mod buffer_pool;
pub mod pump;
pub mod tracker;

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot};

use crate::errors::SessionError;
use crate::metrics::Metrics;
use crate::stream::Stream;
use pump::{Pump, PumpError};
use tracker::{CopyState, SessionTracker, Stamp, TxStatus};

/// Commands other parts of the proxy send to a live session.
#[derive(Debug)]
pub enum ControlCommand {
    /// Reply with a snapshot of the session's protocol state.
    Inspect(oneshot::Sender<SessionSnapshot>),
    /// Move the session to another backend. Not supported yet: answered
    /// with a recoverable error until live migration lands.
    Transfer {
        to: Option<String>,
        reply: oneshot::Sender<TransferOutcome>,
    },
    /// Close the session at the next message boundary with this error.
    Terminate(SessionError),
}

#[derive(Debug, Clone, PartialEq)]
pub enum TransferOutcome {
    Success { from: String, to: String },
    RecoverableError(String),
    FatalError(String),
}

#[derive(Debug, Clone)]
pub struct SessionSnapshot {
    pub outstanding: u32,
    pub tx_status: TxStatus,
    pub copy: CopyState,
    pub last_request: Option<Stamp>,
    pub last_response: Option<Stamp>,
    /// Both directions are between messages and nothing is buffered.
    pub at_message_boundary: bool,
    pub request_buffer_held: bool,
    pub response_buffer_held: bool,
}

/// Why forwarding stopped.
#[derive(Debug)]
pub enum ForwardEnd {
    /// The client closed its side (after Terminate or not).
    ClientClosed,
    /// The backend closed its side.
    ServerClosed,
    ClientIo(std::io::Error),
    ServerIo(std::io::Error),
    ClientProtocol(pgferry_wire::FrameError),
    ServerProtocol(pgferry_wire::FrameError),
    /// A Terminate command was carried out at a message boundary.
    Terminated(SessionError),
}

pub struct Forwarder<'m> {
    pub client: Stream,
    pub server: Stream,
    pub request: Pump,
    pub response: Pump,
    pub tracker: SessionTracker,
    control: mpsc::Receiver<ControlCommand>,
    control_open: bool,
    pending_terminate: Option<SessionError>,
    metrics: &'m Metrics,
}

impl<'m> Forwarder<'m> {
    pub fn new(
        client: Stream,
        server: Stream,
        tracker: SessionTracker,
        control: mpsc::Receiver<ControlCommand>,
        max_message_len: u32,
        metrics: &'m Metrics,
    ) -> Self {
        Self {
            client,
            server,
            request: Pump::new(max_message_len),
            response: Pump::new(max_message_len),
            tracker,
            control,
            control_open: true,
            pending_terminate: None,
            metrics,
        }
    }

    /// Forwards until one side ends; the sockets stay in `self` so the
    /// caller can say goodbye properly.
    pub async fn run(&mut self) -> ForwardEnd {
        poll_fn(|cx| self.poll_session(cx)).await
    }

    fn snapshot(&self) -> SessionSnapshot {
        SessionSnapshot {
            outstanding: self.tracker.outstanding(),
            tx_status: self.tracker.tx_status(),
            copy: self.tracker.copy(),
            last_request: self.tracker.last_request(),
            last_response: self.tracker.last_response(),
            at_message_boundary: self.request.at_boundary() && self.response.at_boundary(),
            request_buffer_held: self.request.holds_buffer(),
            response_buffer_held: self.response.holds_buffer(),
        }
    }

    fn handle(&mut self, cmd: ControlCommand) {
        match cmd {
            ControlCommand::Inspect(reply) => {
                let _ = reply.send(self.snapshot());
            }
            ControlCommand::Transfer { reply, .. } => {
                let _ = reply.send(TransferOutcome::RecoverableError(
                    "transfer not supported yet".into(),
                ));
            }
            ControlCommand::Terminate(err) => self.pending_terminate = Some(err),
        }
    }

    fn poll_session(&mut self, cx: &mut Context<'_>) -> Poll<ForwardEnd> {
        while self.control_open {
            match self.control.poll_recv(cx) {
                Poll::Ready(Some(cmd)) => self.handle(cmd),
                Poll::Ready(None) => self.control_open = false,
                Poll::Pending => break,
            }
        }
        let end = self.poll_pumps(cx);
        self.metrics
            .bytes_client_to_server
            .inc_by(self.request.take_bytes());
        self.metrics
            .bytes_server_to_client
            .inc_by(self.response.take_bytes());
        if end.is_pending() && self.response.at_boundary() {
            if let Some(err) = self.pending_terminate.take() {
                return Poll::Ready(ForwardEnd::Terminated(err));
            }
        }
        end
    }

    fn poll_pumps(&mut self, cx: &mut Context<'_>) -> Poll<ForwardEnd> {
        let mut side = self.tracker.request_side();
        match self.request.poll_forward(
            cx,
            Pin::new(&mut self.client),
            Pin::new(&mut self.server),
            &mut side,
        ) {
            Poll::Ready(Ok(())) => return Poll::Ready(ForwardEnd::ClientClosed),
            Poll::Ready(Err(PumpError::Read(e))) => return Poll::Ready(ForwardEnd::ClientIo(e)),
            Poll::Ready(Err(PumpError::Write(e))) => return Poll::Ready(ForwardEnd::ServerIo(e)),
            Poll::Ready(Err(PumpError::Frame(e))) => {
                return Poll::Ready(ForwardEnd::ClientProtocol(e))
            }
            Poll::Pending => {}
        }
        let mut side = self.tracker.response_side();
        match self.response.poll_forward(
            cx,
            Pin::new(&mut self.server),
            Pin::new(&mut self.client),
            &mut side,
        ) {
            Poll::Ready(Ok(())) => Poll::Ready(ForwardEnd::ServerClosed),
            Poll::Ready(Err(PumpError::Read(e))) => Poll::Ready(ForwardEnd::ServerIo(e)),
            Poll::Ready(Err(PumpError::Write(e))) => Poll::Ready(ForwardEnd::ClientIo(e)),
            Poll::Ready(Err(PumpError::Frame(e))) => Poll::Ready(ForwardEnd::ServerProtocol(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgferry_wire::messages::{tag, take_message};
    use pgferry_wire::ErrorFields;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Two connected loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    fn msg(t: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![t];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[tokio::test]
    async fn control_channel_inspect_transfer_stub_and_terminate() {
        let metrics = Metrics::new();
        let (mut app, proxy_client) = pair().await;
        let (proxy_server, mut db) = pair().await;
        let (tx, rx) = mpsc::channel(4);
        let mut fwd = Forwarder::new(
            Stream::Plain(proxy_client),
            Stream::Plain(proxy_server),
            SessionTracker::new(b'I', vec![]),
            rx,
            1 << 20,
            &metrics,
        );
        let driver = async {
            // A query and its answer pass through; then the session is idle.
            app.write_all(&msg(b'Q', b"select 1\0")).await.unwrap();
            let mut got = vec![0u8; 14];
            db.read_exact(&mut got).await.unwrap();
            assert_eq!(got, msg(b'Q', b"select 1\0"));
            db.write_all(&[msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")].concat())
                .await
                .unwrap();
            let mut answer = vec![0u8; 14 + 6];
            app.read_exact(&mut answer).await.unwrap();

            let (stx, srx) = oneshot::channel();
            tx.send(ControlCommand::Inspect(stx)).await.unwrap();
            let snap = srx.await.unwrap();
            assert_eq!(snap.outstanding, 0);
            assert_eq!(snap.tx_status, TxStatus::Idle);
            assert!(snap.at_message_boundary);
            assert!(
                !snap.request_buffer_held && !snap.response_buffer_held,
                "idle session holds a buffer"
            );
            assert_eq!(snap.last_request.map(|s| s.tag), Some(b'Q'));
            assert_eq!(snap.last_response.map(|s| s.tag), Some(b'Z'));

            let (ttx, trx) = oneshot::channel();
            tx.send(ControlCommand::Transfer {
                to: None,
                reply: ttx,
            })
            .await
            .unwrap();
            assert_eq!(
                trx.await.unwrap(),
                TransferOutcome::RecoverableError("transfer not supported yet".into())
            );
            tx.send(ControlCommand::Terminate(SessionError::AdminShutdown))
                .await
                .unwrap();
        };
        let (end, ()) = tokio::join!(fwd.run(), driver);
        assert!(
            matches!(end, ForwardEnd::Terminated(SessionError::AdminShutdown)),
            "{end:?}"
        );
        assert_eq!(metrics.bytes_client_to_server.get(), 14);
        assert_eq!(metrics.bytes_server_to_client.get(), 20);
        // What the session layer then sends is decided by errors.rs.
        let mut buf = bytes::BytesMut::new();
        SessionError::AdminShutdown.encode_for_client(&mut buf);
        let m = take_message(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(m.tag, tag::ERROR_RESPONSE);
        assert_eq!(
            ErrorFields::decode(&m.body).unwrap().sqlstate(),
            Some("57P01")
        );
    }

    #[tokio::test]
    async fn terminate_waits_for_a_message_boundary() {
        let metrics = Metrics::new();
        let (mut app, proxy_client) = pair().await;
        let (proxy_server, mut db) = pair().await;
        let (tx, rx) = mpsc::channel(4);
        let mut fwd = Forwarder::new(
            Stream::Plain(proxy_client),
            Stream::Plain(proxy_server),
            SessionTracker::new(b'I', vec![]),
            rx,
            1 << 20,
            &metrics,
        );
        let row = msg(b'D', &[7u8; 100]);
        let driver = async {
            // Half a DataRow from the server, then the terminate request.
            db.write_all(&row[..40]).await.unwrap();
            let mut first = vec![0u8; 40];
            app.read_exact(&mut first).await.unwrap();
            tx.send(ControlCommand::Terminate(SessionError::AdminShutdown))
                .await
                .unwrap();
            // Let the forwarder see the command while mid-message.
            let (stx, srx) = oneshot::channel();
            tx.send(ControlCommand::Inspect(stx)).await.unwrap();
            assert!(!srx.await.unwrap().at_message_boundary);
            db.write_all(&row[40..]).await.unwrap();
            let mut rest = vec![0u8; row.len() - 40];
            app.read_exact(&mut rest).await.unwrap();
            assert_eq!([first, rest].concat(), row, "the row arrived whole");
        };
        let (end, ()) = tokio::join!(fwd.run(), driver);
        assert!(matches!(end, ForwardEnd::Terminated(_)), "{end:?}");
        assert!(fwd.response.at_boundary());
    }
}
