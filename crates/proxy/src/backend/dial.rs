//! Opening a server connection: TCP, optional TLS, StartupMessage, login,
//! and the startup chatter up to the first ReadyForQuery.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use pgferry_wire::messages::{
    decode_backend_key_data, decode_negotiate_protocol_version, decode_parameter_status,
    decode_ready_for_query, take_message, AuthRequest,
};
use pgferry_wire::startup::ssl_request_packet;
use pgferry_wire::{tag, CancelKey, ErrorFields, StartupMessage};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::dialect::Dialect;
use super::login::{Login, LoginAuth, LoginStep, REVIVAL_TOKEN_PARAM};
use super::{Backend, BackendLease};
use crate::config::BackendTlsMode;
use crate::parameters::ParameterList;
use crate::stream::{tune_socket, Stream};

/// How to reach backends, shared by every dial.
#[derive(Clone)]
pub struct DialSettings {
    pub tls_mode: BackendTlsMode,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
    pub keepalive: Duration,
    pub max_message_len: u32,
    /// Where this proxy accepts clients, once it is bound: a backend
    /// address that leads back here is a loop, refused at the dial instead
    /// of recursing until the process runs out of file descriptors.
    pub own_listener: Arc<OnceLock<SocketAddr>>,
}

impl DialSettings {
    /// Refuses a connection that reached this proxy's own listener.
    pub fn refuse_own_listener(&self, tcp: &TcpStream, peer: SocketAddr) -> Result<(), String> {
        let Some(listen) = self.own_listener.get() else {
            return Ok(());
        };
        if peer.port() != listen.port() {
            return Ok(());
        }
        let own = peer.ip() == listen.ip()
            || (listen.ip().is_unspecified()
                && (peer.ip().is_loopback()
                    || tcp.local_addr().is_ok_and(|local| local.ip() == peer.ip())));
        if own {
            Err(format!(
                "{peer} is this pgferry's own listen address (a backend must be a PostgreSQL server)"
            ))
        } else {
            Ok(())
        }
    }
}

/// SQLSTATE cannot_connect_now.
const CANNOT_CONNECT_NOW: &str = "57P03";

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    Login(String),
    #[error("{0}")]
    Protocol(String),
    #[error("backend error {}", .0.message().unwrap_or(""))]
    Server(ErrorFields),
    /// 57P03: the server takes no logins now (a restart, a shutdown). Try
    /// another backend; this one has been marked unhealthy.
    #[error("backend takes no logins now: {}", .0.message().unwrap_or(""))]
    NotAcceptingLogins(ErrorFields),
    /// The session speaks protocol 3.2 and this backend answered with an
    /// older version: it cannot serve it (its cancel keys, for one, are
    /// another length). Another backend may.
    #[error("backend speaks protocol {}.{}, the session {}.{}", .offered >> 16, .offered & 0xffff, .wanted >> 16, .wanted & 0xffff)]
    ProtocolTooOld { wanted: u32, offered: u32 },
}

/// An authenticated server connection, ready for queries.
pub struct ServerConnection {
    pub stream: Stream,
    pub lease: BackendLease,
    pub peer: SocketAddr,
    /// The backend's own cancel key.
    pub key: CancelKey,
    /// ParameterStatus values in the order received.
    pub parameters: ParameterList,
    pub ready_status: u8,
}

impl ServerConnection {
    pub fn backend(&self) -> &Arc<Backend> {
        self.lease.backend()
    }
}

/// Dials the lease's backend and logs in as the client. ParameterStatus
/// and NoticeResponse messages are appended, raw, to `relay` for the client.
/// The login tells what kind of server the backend is (`Backend::note_login`).
pub async fn connect(
    lease: BackendLease,
    settings: &DialSettings,
    startup: &StartupMessage,
    auth: LoginAuth<'_>,
    relay: &mut BytesMut,
) -> Result<ServerConnection, DialError> {
    let fut = connect_inner(lease, settings, startup, auth, relay);
    match tokio::time::timeout(settings.connect_timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(DialError::Unreachable(format!(
            "timed out after {:?}",
            settings.connect_timeout
        ))),
    }
}

async fn connect_inner(
    lease: BackendLease,
    settings: &DialSettings,
    startup: &StartupMessage,
    auth: LoginAuth<'_>,
    relay: &mut BytesMut,
) -> Result<ServerConnection, DialError> {
    let backend = lease.backend();
    let tcp = TcpStream::connect((backend.host.as_str(), backend.port))
        .await
        .map_err(|e| DialError::Unreachable(e.to_string()))?;
    let peer = tcp
        .peer_addr()
        .map_err(|e| DialError::Unreachable(e.to_string()))?;
    settings
        .refuse_own_listener(&tcp, peer)
        .map_err(DialError::Unreachable)?;
    tune_socket(&tcp, settings.keepalive);
    let mut stream = match (&settings.tls, settings.tls_mode) {
        (Some(cfg), BackendTlsMode::Require | BackendTlsMode::VerifyFull) => {
            start_tls(tcp, cfg.clone(), &backend.host).await?
        }
        _ => Stream::Plain(tcp),
    };

    let mut out = BytesMut::with_capacity(256);
    match auth {
        LoginAuth::Credentials(_) => startup.encode_for_backend(&mut out),
        // Added at encoding time only: the token is kept in no message.
        LoginAuth::RevivalToken(token) => {
            startup.encode_for_backend_with(&mut out, &[(REVIVAL_TOKEN_PARAM, token.expose())]);
        }
    }
    let written = write(&mut stream, &mut out).await;
    if matches!(auth, LoginAuth::RevivalToken(_)) {
        // The buffer held the token; clearing only resets the length.
        out.clear();
        out.resize(out.capacity(), 0);
        out.clear();
    }
    written?;

    let mut login = Login::new(startup.user(), auth);
    let mut inbuf = BytesMut::with_capacity(1024);
    let mut key = None;
    let mut parameters = Vec::new();
    let mut authenticated = false;
    loop {
        let msg = read_message(&mut stream, &mut inbuf, settings.max_message_len).await?;
        match msg.tag {
            tag::AUTHENTICATION => {
                if authenticated {
                    return Err(DialError::Protocol(
                        "authentication request after AuthenticationOk".into(),
                    ));
                }
                let req = AuthRequest::decode(&msg.body)
                    .map_err(|e| DialError::Protocol(e.to_string()))?;
                match login.respond(req, &mut out).map_err(DialError::Login)? {
                    LoginStep::Authenticated => authenticated = true,
                    LoginStep::Continue => write(&mut stream, &mut out).await?,
                }
            }
            tag::PARAMETER_STATUS => {
                let p = decode_parameter_status(&msg.body)
                    .map_err(|e| DialError::Protocol(e.to_string()))?;
                parameters.push(p);
                put_raw(relay, msg.tag, &msg.body);
            }
            tag::NOTICE_RESPONSE => put_raw(relay, msg.tag, &msg.body),
            tag::BACKEND_KEY_DATA => {
                key = Some(
                    decode_backend_key_data(&msg.body)
                        .map_err(|e| DialError::Protocol(e.to_string()))?,
                );
            }
            tag::ERROR_RESPONSE => {
                let fields = ErrorFields::decode(&msg.body)
                    .map_err(|e| DialError::Protocol(e.to_string()))?;
                if fields.sqlstate() == Some(CANNOT_CONNECT_NOW) {
                    if backend.refuses_logins() {
                        tracing::warn!(
                            backend = %backend.name,
                            reason = fields.message().unwrap_or(""),
                            "backend refuses logins (57P03): unhealthy until it passes its health check"
                        );
                    }
                    return Err(DialError::NotAcceptingLogins(fields));
                }
                return Err(DialError::Server(fields));
            }
            tag::NEGOTIATE_PROTOCOL_VERSION => {
                let (offered, _) = decode_negotiate_protocol_version(&msg.body)
                    .map_err(|e| DialError::Protocol(e.to_string()))?;
                // Only the protocol was asked for (pgferry passes no `_pq_.`
                // options on), so a downgrade is all this can say; a 3.0
                // session never gets one.
                if offered < startup.protocol() {
                    return Err(DialError::ProtocolTooOld {
                        wanted: startup.protocol(),
                        offered,
                    });
                }
            }
            tag::READY_FOR_QUERY if authenticated => {
                let ready_status = decode_ready_for_query(&msg.body)
                    .map_err(|e| DialError::Protocol(e.to_string()))?;
                let key = key.ok_or_else(|| {
                    DialError::Protocol("no BackendKeyData before ReadyForQuery".into())
                })?;
                if !inbuf.is_empty() {
                    return Err(DialError::Protocol(
                        "data after the first ReadyForQuery".into(),
                    ));
                }
                // Kept for the session's life: one allocation.
                let parameters = ParameterList::from_pairs(
                    parameters
                        .iter()
                        .map(|(n, v): &(String, String)| (n.as_str(), v.as_str())),
                );
                backend.note_login(Dialect::detect(&parameters));
                return Ok(ServerConnection {
                    stream,
                    lease,
                    peer,
                    key,
                    parameters,
                    ready_status,
                });
            }
            other => {
                return Err(DialError::Protocol(format!(
                    "unexpected message {:?} during startup",
                    other as char
                )))
            }
        }
    }
}

async fn start_tls(
    mut tcp: TcpStream,
    cfg: Arc<rustls::ClientConfig>,
    host: &str,
) -> Result<Stream, DialError> {
    tcp.write_all(&ssl_request_packet())
        .await
        .map_err(|e| DialError::Unreachable(e.to_string()))?;
    // Exactly one byte: anything the server sends after it belongs to the
    // TLS handshake (CVE-2021-23222).
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(|e| DialError::Unreachable(e.to_string()))?;
    match answer[0] {
        b'S' => {
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| DialError::Login(format!("invalid TLS server name {host:?}: {e}")))?;
            // A config of this dial's own, whose key log a hand-off reads.
            let (cfg, secrets) = crate::tls::handover::client_config(&cfg);
            let tcp = crate::tls::handover::Tracked::new(tcp, secrets);
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| DialError::Login(format!("TLS handshake with backend failed: {e}")))?;
            Ok(Stream::ClientTls(Box::new(tls)))
        }
        b'N' => Err(DialError::Login(
            "backend does not support TLS, and backend_tls requires it".into(),
        )),
        other => Err(DialError::Protocol(format!(
            "unexpected answer {other:#04x} to SSLRequest"
        ))),
    }
}

async fn write(stream: &mut Stream, out: &mut BytesMut) -> Result<(), DialError> {
    if out.is_empty() {
        return Ok(());
    }
    stream
        .write_all(out)
        .await
        .map_err(|e| DialError::Unreachable(e.to_string()))?;
    stream
        .flush()
        .await
        .map_err(|e| DialError::Unreachable(e.to_string()))?;
    out.clear();
    Ok(())
}

/// Reads one whole message (control path only).
pub async fn read_message(
    stream: &mut Stream,
    inbuf: &mut BytesMut,
    max_len: u32,
) -> Result<pgferry_wire::RawMessage, DialError> {
    loop {
        if let Some(m) =
            take_message(inbuf, max_len).map_err(|e| DialError::Protocol(e.to_string()))?
        {
            return Ok(m);
        }
        if inbuf.capacity() - inbuf.len() < 512 {
            inbuf.reserve(4096);
        }
        let n = stream
            .read_buf(inbuf)
            .await
            .map_err(|e| DialError::Unreachable(e.to_string()))?;
        if n == 0 {
            return Err(DialError::Unreachable(
                "backend closed the connection during startup".into(),
            ));
        }
    }
}

/// Appends a message, framed, to `buf`.
pub fn put_raw(buf: &mut BytesMut, tag: u8, body: &[u8]) {
    buf.put_u8(tag);
    buf.put_u32(body.len() as u32 + 4);
    buf.put_slice(body);
}
