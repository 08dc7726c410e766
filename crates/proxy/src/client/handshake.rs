//! SSLRequest / GSSENCRequest / CancelRequest / StartupMessage negotiation.
//!
//! Packets are read with exact-length reads straight from the socket, never
//! through a buffer, so no plaintext byte can be carried over into a TLS
//! session (the CVE-2021-23214 class): whatever a client sends after
//! SSLRequest is handed to the TLS handshake, which rejects anything that
//! is not a ClientHello.

use std::sync::Arc;

use bytes::BytesMut;
use pgferry_auth::ChannelBinding;
use pgferry_wire::messages::encode_negotiate_protocol_version;
use pgferry_wire::startup::{parse_startup_body, startup_body_len};
use pgferry_wire::{CancelKey, StartupError, StartupMessage, StartupPacket};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::MaxProtocol;
use crate::errors::SessionError;
use crate::stream::Stream;

/// How a negotiation ended.
pub enum Negotiated {
    /// A client that wants a session, on a plain or TLS stream.
    Session {
        stream: Stream,
        startup: StartupMessage,
    },
    /// A cancel request; the connection carries nothing else.
    Cancel(CancelKey),
}

/// Failures before the client speaks the protocol properly.
pub enum NegotiationFailure {
    /// Close without a word (garbage, bad length, TLS failure, EOF): the
    /// peer may not speak PostgreSQL at all, as PostgreSQL itself does.
    Silent(String),
    /// Tell the client why, then close.
    Reply(Stream, SessionError),
}

pub struct TlsPolicy {
    /// The shared server config; each connection gets a clone with its own
    /// key log (`tls::handover::server_config`).
    pub acceptor: Option<Arc<rustls::ServerConfig>>,
    pub require: bool,
    /// `tls-server-end-point` data of the acceptor's certificate, built with it so the two
    /// cannot disagree; `None` without TLS or when the certificate gives no hash.
    pub end_point: Option<Vec<u8>>,
}

impl TlsPolicy {
    /// What SCRAM may bind to on this client stream: -PLUS only over our own TLS.
    pub fn channel_binding(&self, stream: &Stream) -> ChannelBinding {
        match (stream, &self.end_point) {
            (Stream::ServerTls(_), Some(hash)) => ChannelBinding::TlsServerEndPoint(hash.clone()),
            (Stream::ServerTls(_), None) => ChannelBinding::TlsUnbindable,
            // Plain, or (never for a client) the proxy's own client side.
            _ => ChannelBinding::None,
        }
    }
}

/// `max` is `[proxy] max_protocol`: the returned StartupMessage's
/// `minor_version` is the version the session speaks (what the client
/// asked for, capped by `max`), and is what backends are asked for.
pub async fn negotiate(
    tcp: TcpStream,
    tls: &TlsPolicy,
    max: MaxProtocol,
) -> Result<Negotiated, NegotiationFailure> {
    let mut stream = Stream::Plain(tcp);
    let mut offered_encryption = false;
    loop {
        let packet = match read_startup_packet(&mut stream).await {
            Ok(p) => p,
            Err(ReadFailure::Silent(why)) => return Err(NegotiationFailure::Silent(why)),
            Err(ReadFailure::Invalid(e)) => {
                let err = match e {
                    StartupError::UnsupportedProtocol { .. } => {
                        SessionError::UnsupportedProtocol(e.to_string())
                    }
                    StartupError::NoUser => SessionError::NoUser,
                    other => SessionError::ClientProtocol(other.to_string()),
                };
                return Err(NegotiationFailure::Reply(stream, err));
            }
        };
        match packet {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest
                if offered_encryption && stream.is_tls() =>
            {
                return Err(NegotiationFailure::Reply(
                    stream,
                    SessionError::ClientProtocol(
                        "SSL negotiation inside an encrypted session".into(),
                    ),
                ));
            }
            StartupPacket::SslRequest => {
                offered_encryption = true;
                let Stream::Plain(mut tcp) = stream else {
                    return Err(NegotiationFailure::Silent(
                        "SSLRequest on a TLS stream".into(),
                    ));
                };
                // A client must wait for our answer before it says more;
                // bytes already here were sent in plaintext and must not
                // be taken as part of what follows (CVE-2021-23214).
                if sent_early(&tcp) {
                    return Err(NegotiationFailure::Reply(
                        Stream::Plain(tcp),
                        SessionError::ClientProtocol(
                            "received unencrypted data after SSL request".into(),
                        ),
                    ));
                }
                let Some(shared) = &tls.acceptor else {
                    write_byte(&mut tcp, b'N').await?;
                    stream = Stream::Plain(tcp);
                    continue;
                };
                write_byte(&mut tcp, b'S').await?;
                let (cfg, secrets) = crate::tls::handover::server_config(shared);
                let tcp = crate::tls::handover::Tracked::new(tcp, secrets);
                match tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                    Ok(t) => stream = Stream::ServerTls(Box::new(t)),
                    Err(e) => {
                        return Err(NegotiationFailure::Silent(format!(
                            "TLS handshake failed: {e}"
                        )))
                    }
                }
            }
            StartupPacket::GssEncRequest => {
                let Stream::Plain(mut tcp) = stream else {
                    return Err(NegotiationFailure::Silent(
                        "GSSENCRequest on a TLS stream".into(),
                    ));
                };
                write_byte(&mut tcp, b'N').await?;
                stream = Stream::Plain(tcp);
            }
            StartupPacket::CancelRequest(key) => return Ok(Negotiated::Cancel(key)),
            StartupPacket::Startup(mut startup) => {
                if tls.require && !stream.is_tls() {
                    return Err(NegotiationFailure::Reply(stream, SessionError::TlsRequired));
                }
                // Startup parameters are passed on to the backend; these
                // are pgferry's own to send (a revival token login).
                if let Some((name, _)) = startup.params.iter().find(|(k, _)| k.starts_with("crdb:"))
                {
                    let e = SessionError::ForbiddenParameter(name.clone());
                    return Err(NegotiationFailure::Reply(stream, e));
                }
                let requested = startup.minor_version;
                startup.minor_version = max.session_minor(requested);
                // As PostgreSQL: a NegotiateProtocolVersion only when the
                // client asked for more than it gets, or sent options
                // (pgferry knows none of them).
                if requested != startup.minor_version || !startup.protocol_options.is_empty() {
                    let mut out = BytesMut::new();
                    if encode_negotiate_protocol_version(
                        &mut out,
                        startup.protocol(),
                        &startup.protocol_options,
                    )
                    .is_ok()
                    {
                        if let Err(e) = stream.write_all(&out).await {
                            return Err(NegotiationFailure::Silent(e.to_string()));
                        }
                    }
                }
                return Ok(Negotiated::Session { stream, startup });
            }
        }
    }
}

/// True when the peer has sent bytes we have not asked for yet. The socket
/// is non-blocking, so the peek returns at once.
fn sent_early(tcp: &TcpStream) -> bool {
    let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    matches!(socket2::SockRef::from(tcp).peek(&mut probe), Ok(n) if n > 0)
}

async fn write_byte(tcp: &mut TcpStream, b: u8) -> Result<(), NegotiationFailure> {
    tcp.write_all(&[b])
        .await
        .map_err(|e| NegotiationFailure::Silent(e.to_string()))
}

enum ReadFailure {
    Silent(String),
    Invalid(StartupError),
}

async fn read_startup_packet<S: AsyncRead + Unpin>(
    s: &mut S,
) -> Result<StartupPacket, ReadFailure> {
    let mut prefix = [0u8; 4];
    s.read_exact(&mut prefix)
        .await
        .map_err(|e| ReadFailure::Silent(format!("no startup packet: {e}")))?;
    // A bad length means we cannot trust anything that follows: close
    // without answering, as PostgreSQL does.
    let body_len = startup_body_len(prefix).map_err(|e| ReadFailure::Silent(e.to_string()))?;
    let mut body = vec![0u8; body_len];
    s.read_exact(&mut body)
        .await
        .map_err(|e| ReadFailure::Silent(format!("incomplete startup packet: {e}")))?;
    parse_startup_body(&body).map_err(ReadFailure::Invalid)
}

/// What `TlsPolicy::acceptor` holds for the configured certificate: the
/// shared config, from which each connection's acceptor is built.
pub fn acceptor(cfg: Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    cfg
}
