//! The export side of a TLS hand-off (docs/handoff-design.md 2.2, 2.4): the
//! per-connection [`TrafficSecrets`] key log, the record-boundary-tracking
//! [`Tracked`] IO under rustls, the serializable [`TlsState`], and
//! [`Stream::freeze`] / [`Frozen::thaw`], which take a stream out of rustls
//! (or out of a [`ContinuedTls`]) and make it a [`ContinuedTls`] again.

use std::io::{self, Read};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::{ConnectionCommon, ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use zeroize::{Zeroize, Zeroizing};

use super::continued::{next_secret, traffic_key_iv, ContinuedTls};
use crate::stream::Stream;

const CLIENT_TRAFFIC_SECRET_0: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_TRAFFIC_SECRET_0: &str = "SERVER_TRAFFIC_SECRET_0";
/// KeyUpdates searched for the generation in use (design 2.4).
const MAX_GENERATIONS: usize = 16;

// ---- the state that travels ----

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsAead {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

/// Which end of the TLS connection pgferry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsSide {
    /// Toward a client: pgferry was the rustls server.
    Server,
    /// Toward a backend: pgferry was the rustls client.
    Client,
}

/// One direction of a TLS record layer. Zeroized on drop.
#[derive(Serialize, Deserialize)]
pub struct DirectionState {
    /// The next record's sequence number.
    pub(crate) seq: u64,
    #[serde(with = "b64")]
    pub(crate) key: Vec<u8>,
    /// 12 bytes; for TLS 1.2 AES-GCM the 4-byte salt then the explicit-nonce seed.
    #[serde(with = "b64")]
    pub(crate) iv: Vec<u8>,
    /// TLS 1.3: the traffic secret of `key`'s generation (for KeyUpdate).
    #[serde(with = "b64_opt", default)]
    pub(crate) secret: Option<Vec<u8>>,
}

impl Drop for DirectionState {
    fn drop(&mut self) {
        self.key.zeroize();
        self.iv.zeroize();
        if let Some(s) = &mut self.secret {
            s.zeroize();
        }
    }
}

impl std::fmt::Debug for DirectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectionState")
            .field("seq", &self.seq)
            .field("key", &"<secret>")
            .field("iv", &"<secret>")
            .field("secret", &self.secret.as_ref().map(|_| "<secret>"))
            .finish()
    }
}

/// A TLS record layer frozen at a record boundary: enough to continue it in
/// another process (serde, for the hand-off's state blob). Its secrets are
/// zeroized on drop and never printed.
#[derive(Debug, Serialize, Deserialize)]
pub struct TlsState {
    pub(crate) version: TlsVersion,
    pub(crate) aead: TlsAead,
    pub(crate) side: TlsSide,
    /// What we send.
    pub(crate) tx: DirectionState,
    /// What we receive.
    pub(crate) rx: DirectionState,
}

impl TlsState {
    pub fn version(&self) -> TlsVersion {
        self.version
    }

    pub fn aead(&self) -> TlsAead {
        self.aead
    }

    pub fn side(&self) -> TlsSide {
        self.side
    }

    /// Lengths and presence of what the version needs (a state from another
    /// process is input, not trusted to be well-formed).
    pub(crate) fn validate(&self) -> io::Result<()> {
        let bad = |what: &str| {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("TLS state: {what}"),
            ))
        };
        for d in [&self.tx, &self.rx] {
            if d.key.len() != self.aead.key_len() {
                return bad("key length");
            }
            if d.iv.len() != 12 {
                return bad("IV length");
            }
            match (self.version, &d.secret) {
                (TlsVersion::Tls13, Some(s)) if s.len() == self.aead.hash_len() => {}
                (TlsVersion::Tls13, _) => return bad("TLS 1.3 traffic secret"),
                (TlsVersion::Tls12, None) => {}
                (TlsVersion::Tls12, Some(_)) => return bad("traffic secret in TLS 1.2"),
            }
        }
        Ok(())
    }
}

/// Base64 for the byte fields: a JSON array of numbers would be four times larger.
mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};
    use zeroize::Zeroizing;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(v));
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = Zeroizing::new(String::deserialize(d)?);
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

mod b64_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::b64::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::b64")] Vec<u8>);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

// ---- the key log ----

/// A connection's TLS 1.3 `*_TRAFFIC_SECRET_0`, the only secrets rustls
/// gives that a KeyUpdate after a hand-off needs. One per connection (a
/// clone of the shared config carries it); zeroized on drop.
#[derive(Default)]
pub struct TrafficSecrets {
    client: Mutex<Option<Zeroizing<Vec<u8>>>>,
    server: Mutex<Option<Zeroizing<Vec<u8>>>>,
}

impl std::fmt::Debug for TrafficSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrafficSecrets")
    }
}

impl TrafficSecrets {
    fn get(slot: &Mutex<Option<Zeroizing<Vec<u8>>>>) -> Option<Zeroizing<Vec<u8>>> {
        // A poisoned lock still holds a whole value (a plain assignment).
        slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn client(&self) -> Option<Zeroizing<Vec<u8>>> {
        Self::get(&self.client)
    }

    fn server(&self) -> Option<Zeroizing<Vec<u8>>> {
        Self::get(&self.server)
    }
}

impl rustls::KeyLog for TrafficSecrets {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        let slot = match label {
            CLIENT_TRAFFIC_SECRET_0 => &self.client,
            SERVER_TRAFFIC_SECRET_0 => &self.server,
            _ => return,
        };
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Zeroizing::new(secret.to_vec()));
    }

    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_TRAFFIC_SECRET_0 || label == SERVER_TRAFFIC_SECRET_0
    }
}

/// A connection's own `ServerConfig`: the shared one with its key log.
pub fn server_config(
    shared: &Arc<rustls::ServerConfig>,
) -> (Arc<rustls::ServerConfig>, Arc<TrafficSecrets>) {
    let secrets = Arc::new(TrafficSecrets::default());
    let mut cfg = (**shared).clone();
    cfg.key_log = secrets.clone();
    (Arc::new(cfg), secrets)
}

/// A backend dial's own `ClientConfig`: the shared one with its key log.
pub fn client_config(
    shared: &Arc<rustls::ClientConfig>,
) -> (Arc<rustls::ClientConfig>, Arc<TrafficSecrets>) {
    let secrets = Arc::new(TrafficSecrets::default());
    let mut cfg = (**shared).clone();
    cfg.key_log = secrets.clone();
    (Arc::new(cfg), secrets)
}

// ---- the IO under rustls ----

/// The socket under a rustls stream. It follows the 5-byte record headers of
/// the bytes it passes up (no copy: bodies are skipped by arithmetic), so a
/// hand-off knows whether rustls holds part of a record; it also remembers
/// EOF, IO errors and shutdown, which tokio-rustls keeps to itself. It
/// carries the connection's key log.
pub struct Tracked<S> {
    inner: S,
    secrets: Arc<TrafficSecrets>,
    header: [u8; 5],
    header_have: usize,
    body_left: usize,
    /// Bytes passed up so far (lets tests wait for exactly what a peer sent).
    passed: u64,
    eof: bool,
    io_error: bool,
    shut_down: bool,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, secrets: Arc<TrafficSecrets>) -> Self {
        Tracked {
            inner,
            secrets,
            header: [0; 5],
            header_have: 0,
            body_left: 0,
            passed: 0,
            eof: false,
            io_error: false,
            shut_down: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Everything passed up ends with a whole record.
    pub fn at_record_boundary(&self) -> bool {
        self.header_have == 0 && self.body_left == 0
    }

    /// Bytes still to come for the current record to be whole (0 at a boundary).
    fn rest_of_record(&self) -> usize {
        if self.header_have > 0 {
            self.header.len() - self.header_have
        } else {
            self.body_left
        }
    }

    fn observe(&mut self, mut bytes: &[u8]) {
        self.passed += bytes.len() as u64;
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (self.header.len() - self.header_have).min(bytes.len());
            self.header[self.header_have..self.header_have + n].copy_from_slice(&bytes[..n]);
            self.header_have += n;
            bytes = &bytes[n..];
            if self.header_have == self.header.len() {
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.header_have = 0;
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) => {
                let fresh = &buf.filled()[before..];
                if fresh.is_empty() && buf.remaining() > 0 {
                    this.eof = true;
                }
                this.observe(fresh);
            }
            Poll::Ready(Err(_)) => this.io_error = true,
            Poll::Pending => {}
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Err(_))) {
            this.io_error = true;
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Err(_))) {
            this.io_error = true;
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.shut_down = true;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// `read_tls`'s view of the socket while a partial record is finished: never
/// more than the record's rest, so rustls ends exactly at a boundary.
struct RestOfRecord<'a>(&'a mut Tracked<TcpStream>);

impl Read for RestOfRecord<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let max = self.0.rest_of_record().min(buf.len());
        match self.0.inner.try_read(&mut buf[..max]) {
            Ok(n) => {
                if n == 0 && max > 0 {
                    self.0.eof = true;
                }
                self.0.observe(&buf[..n]);
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    self.0.io_error = true;
                }
                Err(e)
            }
        }
    }
}

// ---- freezing ----

/// A socket taken out of its stream at a hand-off: the TCP socket, the TLS record
/// state if any, and plaintext already decrypted but not yet read by the session.
pub struct Frozen {
    pub tcp: TcpStream,
    pub tls: Option<TlsState>,
    pub pending: Vec<u8>,
}

impl Frozen {
    /// The stream to go on with, in this process or another: Plain, or Continued with `pending`
    /// served first on reads. The tcp must already be registered with the current tokio runtime.
    /// A plain stream has nowhere to keep `pending`: it must be empty then.
    pub fn thaw(self) -> io::Result<Stream> {
        match self.tls {
            None if self.pending.is_empty() => Ok(Stream::Plain(self.tcp)),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "plaintext pending on a plain stream",
            )),
            Some(state) => Ok(Stream::Continued(Box::new(ContinuedTls::new(
                self.tcp,
                &state,
                self.pending,
            )?))),
        }
    }
}

/// What `freeze` needs of a tokio-rustls stream, server or client side.
trait RustlsStream: AsyncWrite + Unpin + Sized {
    type Data;
    type Conn: std::ops::DerefMut<Target = ConnectionCommon<Self::Data>>;
    const SIDE: TlsSide;
    fn parts(&mut self) -> (&mut Tracked<TcpStream>, &mut ConnectionCommon<Self::Data>);
    fn into_parts(self) -> (Tracked<TcpStream>, Self::Conn);
    fn extract(conn: Self::Conn) -> Result<ExtractedSecrets, rustls::Error>;
    fn wrap(self: Box<Self>) -> Stream;
}

impl RustlsStream for tokio_rustls::server::TlsStream<Tracked<TcpStream>> {
    type Data = rustls::server::ServerConnectionData;
    type Conn = rustls::ServerConnection;
    const SIDE: TlsSide = TlsSide::Server;
    fn parts(&mut self) -> (&mut Tracked<TcpStream>, &mut ConnectionCommon<Self::Data>) {
        let (io, conn) = self.get_mut();
        (io, conn)
    }
    fn into_parts(self) -> (Tracked<TcpStream>, Self::Conn) {
        self.into_inner()
    }
    fn extract(conn: Self::Conn) -> Result<ExtractedSecrets, rustls::Error> {
        conn.dangerous_extract_secrets()
    }
    fn wrap(self: Box<Self>) -> Stream {
        Stream::ServerTls(self)
    }
}

impl RustlsStream for tokio_rustls::client::TlsStream<Tracked<TcpStream>> {
    type Data = rustls::client::ClientConnectionData;
    type Conn = rustls::ClientConnection;
    const SIDE: TlsSide = TlsSide::Client;
    fn parts(&mut self) -> (&mut Tracked<TcpStream>, &mut ConnectionCommon<Self::Data>) {
        let (io, conn) = self.get_mut();
        (io, conn)
    }
    fn into_parts(self) -> (Tracked<TcpStream>, Self::Conn) {
        self.into_inner()
    }
    fn extract(conn: Self::Conn) -> Result<ExtractedSecrets, rustls::Error> {
        conn.dangerous_extract_secrets()
    }
    fn wrap(self: Box<Self>) -> Stream {
        Stream::ClientTls(self)
    }
}

impl Stream {
    /// At a safe point (the session's pumps are paused and hold nothing of this stream): turn the
    /// stream into what can be handed to another process. Plain -> Frozen{tls: None, pending: empty}.
    /// ServerTls/ClientTls -> the 2.2 steps, waiting at most `wait` for a partial record.
    /// Continued -> its export. On refusal the stream comes back unharmed with a reason (for logs
    /// and metrics; short, no secrets).
    ///
    /// One case cannot give the stream back as it was: rustls's connection is
    /// consumed by the extraction, and if its keys then match no generation of
    /// the logged secret (a bug, not a peer's doing) the stream comes back as a
    /// `Continued` that fails every operation.
    pub async fn freeze(self, wait: Duration) -> Result<Frozen, (Stream, String)> {
        match self {
            Stream::Plain(tcp) => Ok(Frozen {
                tcp,
                tls: None,
                pending: Vec::new(),
            }),
            Stream::ServerTls(s) => freeze_rustls(s, wait).await,
            Stream::ClientTls(s) => freeze_rustls(s, wait).await,
            Stream::Continued(c) => match c.freeze(wait).await {
                Ok((tcp, state, pending)) => Ok(Frozen {
                    tcp,
                    tls: Some(state),
                    pending,
                }),
                Err((c, why)) => Err((Stream::Continued(c), why)),
            },
        }
    }
}

/// Which of our AEADs, or `None` for a suite we do not continue.
fn suite_of(suite: rustls::SupportedCipherSuite) -> Option<(TlsVersion, TlsAead)> {
    use rustls::CipherSuite as C;
    Some(match suite.suite() {
        C::TLS13_AES_128_GCM_SHA256 => (TlsVersion::Tls13, TlsAead::Aes128Gcm),
        C::TLS13_AES_256_GCM_SHA384 => (TlsVersion::Tls13, TlsAead::Aes256Gcm),
        C::TLS13_CHACHA20_POLY1305_SHA256 => (TlsVersion::Tls13, TlsAead::Chacha20Poly1305),
        C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => {
            (TlsVersion::Tls12, TlsAead::Aes128Gcm)
        }
        C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => {
            (TlsVersion::Tls12, TlsAead::Aes256Gcm)
        }
        C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        | C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => {
            (TlsVersion::Tls12, TlsAead::Chacha20Poly1305)
        }
        _ => return None,
    })
}

/// The 2.2 checks that need no IO: why not, or the version and AEAD.
fn check<T: RustlsStream>(s: &mut T) -> Result<(TlsVersion, TlsAead), String> {
    let (io, conn) = s.parts();
    if conn.is_handshaking() {
        return Err("TLS handshake not complete".into());
    }
    if io.eof || io.io_error || io.shut_down {
        return Err("TLS stream closed or failed".into());
    }
    let state = conn
        .process_new_packets()
        .map_err(|e| format!("TLS stream failed: {e}"))?;
    if state.peer_has_closed() {
        return Err("peer closed the TLS stream".into());
    }
    let (version, aead) = conn
        .negotiated_cipher_suite()
        .and_then(suite_of)
        .ok_or("TLS cipher suite not supported for hand-off")?;
    let expected = match version {
        TlsVersion::Tls12 => ProtocolVersion::TLSv1_2,
        TlsVersion::Tls13 => ProtocolVersion::TLSv1_3,
    };
    if conn.protocol_version() != Some(expected) {
        return Err("TLS version and suite disagree".into());
    }
    if version == TlsVersion::Tls13
        && (io.secrets.client().is_none() || io.secrets.server().is_none())
    {
        return Err("TLS 1.3 traffic secrets not logged".into());
    }
    Ok((version, aead))
}

/// Reads the rest of a record rustls holds in part (design 2.2, 1).
async fn finish_record<T: RustlsStream>(s: &mut T) -> Result<(), String> {
    loop {
        let (io, conn) = s.parts();
        if io.at_record_boundary() {
            return Ok(());
        }
        io.inner
            .readable()
            .await
            .map_err(|e| format!("TLS socket: {e}"))?;
        match conn.read_tls(&mut RestOfRecord(io)) {
            Ok(0) => return Err("peer closed the TLS stream".into()),
            Ok(_) => {
                conn.process_new_packets()
                    .map_err(|e| format!("TLS stream failed: {e}"))?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("TLS socket: {e}")),
        }
    }
}

async fn freeze_rustls<T: RustlsStream>(
    mut s: Box<T>,
    wait: Duration,
) -> Result<Frozen, (Stream, String)> {
    let (version, aead) = match check(&mut *s) {
        Ok(v) => v,
        Err(why) => return Err((s.wrap(), why)),
    };
    // Everything that can fail comes before the extraction, which consumes
    // rustls's connection: up to there, a refusal leaves the stream as it was.
    let settled = tokio::time::timeout(wait, async {
        finish_record(&mut *s).await?;
        let (_, conn) = s.parts();
        if version == TlsVersion::Tls13 {
            // Flushes a KeyUpdate answer rustls would otherwise lose (2.2, 3).
            conn.refresh_traffic_keys()
                .map_err(|e| format!("TLS KeyUpdate: {e}"))?;
        }
        s.flush().await.map_err(|e| format!("TLS flush: {e}"))
    })
    .await;
    match settled {
        Err(_) => {
            return Err((
                s.wrap(),
                "TLS record or output did not complete in time".into(),
            ))
        }
        Ok(Err(why)) => return Err((s.wrap(), why)),
        Ok(Ok(())) => {}
    }
    let (io, conn) = s.parts();
    let state = match conn.process_new_packets() {
        Ok(state) => state,
        Err(e) => return Err((s.wrap(), format!("TLS stream failed: {e}"))),
    };
    if state.peer_has_closed() {
        return Err((s.wrap(), "peer closed the TLS stream".into()));
    }
    if conn.wants_write() || !io.at_record_boundary() || io.eof || io.io_error {
        return Err((s.wrap(), "TLS stream not quiet".into()));
    }
    // Draining exactly what rustls holds cannot fail half-way: it reads its buffer.
    let mut pending = vec![0u8; state.plaintext_bytes_to_read()];
    let mut filled = 0;
    while filled < pending.len() {
        match conn.reader().read(&mut pending[filled..]) {
            Ok(n) if n > 0 => filled += n,
            _ => break,
        }
    }
    pending.truncate(filled);

    let (io, conn) = s.into_parts();
    let secrets = io.secrets.clone();
    let tcp = io.inner;
    let broken = |tcp: TcpStream, why: String| -> (Stream, String) {
        let failed = ContinuedTls::failed(tcp, T::SIDE, why.clone());
        (Stream::Continued(Box::new(failed)), why)
    };
    let extracted = match T::extract(conn) {
        Ok(x) => x,
        Err(e) => return Err(broken(tcp, format!("TLS secret extraction: {e}"))),
    };
    match state_from(extracted, version, aead, T::SIDE, &secrets) {
        Ok(tls) => Ok(Frozen {
            tcp,
            tls: Some(tls),
            pending,
        }),
        Err(why) => Err(broken(tcp, why)),
    }
}

fn split(secrets: ConnectionTrafficSecrets) -> Option<(TlsAead, Zeroizing<Vec<u8>>, Vec<u8>)> {
    Some(match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (
            TlsAead::Aes128Gcm,
            Zeroizing::new(key.as_ref().to_vec()),
            iv.as_ref().to_vec(),
        ),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (
            TlsAead::Aes256Gcm,
            Zeroizing::new(key.as_ref().to_vec()),
            iv.as_ref().to_vec(),
        ),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (
            TlsAead::Chacha20Poly1305,
            Zeroizing::new(key.as_ref().to_vec()),
            iv.as_ref().to_vec(),
        ),
        _ => return None,
    })
}

/// The traffic secret whose key and IV are these: generation 0 from the
/// key log, then forward through KeyUpdates (design 2.4).
fn find_generation(
    aead: TlsAead,
    secret0: &[u8],
    key: &[u8],
    iv: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    let mut secret = Zeroizing::new(secret0.to_vec());
    for _ in 0..=MAX_GENERATIONS {
        let (k, i) = traffic_key_iv(aead, &secret).ok()?;
        if bool::from(k.ct_eq(key)) && bool::from(i.ct_eq(iv)) {
            return Some(secret);
        }
        secret = next_secret(aead, &secret).ok()?;
    }
    None
}

fn state_from(
    x: ExtractedSecrets,
    version: TlsVersion,
    aead: TlsAead,
    side: TlsSide,
    logged: &TrafficSecrets,
) -> Result<TlsState, String> {
    let (tx_seq, tx) = x.tx;
    let (rx_seq, rx) = x.rx;
    let (tx_aead, tx_key, tx_iv) = split(tx).ok_or("TLS: unknown traffic secrets")?;
    let (rx_aead, rx_key, rx_iv) = split(rx).ok_or("TLS: unknown traffic secrets")?;
    if tx_aead != aead || rx_aead != aead {
        return Err("TLS: extracted keys do not match the suite".into());
    }
    let (tx_secret, rx_secret) = match version {
        TlsVersion::Tls12 => (None, None),
        TlsVersion::Tls13 => {
            let (ours, theirs) = match side {
                TlsSide::Server => (logged.server(), logged.client()),
                TlsSide::Client => (logged.client(), logged.server()),
            };
            let (Some(ours), Some(theirs)) = (ours, theirs) else {
                return Err("TLS 1.3 traffic secrets not logged".into());
            };
            let tx = find_generation(aead, &ours, &tx_key, &tx_iv)
                .ok_or("TLS: no traffic secret generation matches the send key")?;
            let rx = find_generation(aead, &theirs, &rx_key, &rx_iv)
                .ok_or("TLS: no traffic secret generation matches the receive key")?;
            (Some(tx.to_vec()), Some(rx.to_vec()))
        }
    };
    let state = TlsState {
        version,
        aead,
        side,
        tx: DirectionState {
            seq: tx_seq,
            key: tx_key.to_vec(),
            iv: tx_iv,
            secret: tx_secret,
        },
        rx: DirectionState {
            seq: rx_seq,
            key: rx_key.to_vec(),
            iv: rx_iv,
            secret: rx_secret,
        },
    };
    state.validate().map_err(|e| e.to_string())?;
    Ok(state)
}

/// Real rustls peers over loopback TCP, for the tests here and in `continued`.
#[cfg(test)]
pub(crate) mod testkit {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::SupportedCipherSuite;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
    use tokio::net::{TcpListener, TcpStream};

    use super::{client_config, server_config, Frozen, TlsSide, TlsState, Tracked};
    use crate::stream::Stream;

    pub const WAIT: Duration = Duration::from_secs(10);

    /// The six AEAD suites of rustls's ring provider, TLS 1.3 first.
    pub fn suites() -> Vec<SupportedCipherSuite> {
        use rustls::crypto::ring::cipher_suite as cs;
        vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ]
    }

    pub fn is_tls13(suite: SupportedCipherSuite) -> bool {
        matches!(suite, SupportedCipherSuite::Tls13(_))
    }

    fn provider(suite: SupportedCipherSuite) -> Arc<rustls::crypto::CryptoProvider> {
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites = vec![suite];
        Arc::new(p)
    }

    fn versions(
        suite: SupportedCipherSuite,
    ) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        static TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
        if is_tls13(suite) {
            TLS13
        } else {
            TLS12
        }
    }

    /// ECDSA P-256: the TLS 1.2 suites of the ring provider are ECDSA ones.
    fn cert() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (cert.der().clone(), der)
    }

    fn configs(
        suite: SupportedCipherSuite,
    ) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let (cert, key) = cert();
        let mut server = rustls::ServerConfig::builder_with_provider(provider(suite))
            .with_protocol_versions(versions(suite))
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider(suite))
            .with_protocol_versions(versions(suite))
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.enable_secret_extraction = true;
        (Arc::new(server), Arc::new(client))
    }

    /// The peer's socket: can capture what rustls writes instead of sending
    /// it, so a test decides which bytes reach us, and when.
    pub struct Tap {
        pub tcp: TcpStream,
        capture: Option<Vec<u8>>,
    }

    impl AsyncRead for Tap {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Tap {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let this = self.get_mut();
            match &mut this.capture {
                Some(c) => {
                    c.extend_from_slice(buf);
                    Poll::Ready(Ok(buf.len()))
                }
                None => Pin::new(&mut this.tcp).poll_write(cx, buf),
            }
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
        }
    }

    /// The other end: a tokio-rustls client (we are the server) or server.
    pub enum Peer {
        Client(Box<tokio_rustls::client::TlsStream<Tap>>),
        Server(Box<tokio_rustls::server::TlsStream<Tap>>),
    }

    impl Peer {
        fn tap(&mut self) -> &mut Tap {
            match self {
                Peer::Client(s) => s.get_mut().0,
                Peer::Server(s) => s.get_mut().0,
            }
        }

        /// Asks us for a KeyUpdate (TLS 1.3); it goes out with the next write or flush.
        pub fn refresh_traffic_keys(&mut self) {
            match self {
                Peer::Client(s) => s.get_mut().1.refresh_traffic_keys().unwrap(),
                Peer::Server(s) => s.get_mut().1.refresh_traffic_keys().unwrap(),
            }
        }

        /// The records rustls writes for `msg` (then a flush), captured, not sent.
        pub async fn seal(&mut self, msg: &[u8]) -> Vec<u8> {
            self.tap().capture = Some(Vec::new());
            self.write_all(msg).await.unwrap();
            self.flush().await.unwrap();
            self.tap().capture.take().unwrap()
        }

        /// Raw bytes onto the wire, under rustls.
        pub async fn send_raw(&mut self, bytes: &[u8]) {
            self.tap().tcp.write_all(bytes).await.unwrap();
        }
    }

    macro_rules! each_peer {
        ($self:ident, $s:ident => $e:expr) => {
            match $self.get_mut() {
                Peer::Client($s) => {
                    let $s = Pin::new($s.as_mut());
                    $e
                }
                Peer::Server($s) => {
                    let $s = Pin::new($s.as_mut());
                    $e
                }
            }
        };
    }

    impl AsyncRead for Peer {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            each_peer!(self, s => s.poll_read(cx, buf))
        }
    }

    impl AsyncWrite for Peer {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            each_peer!(self, s => s.poll_write(cx, buf))
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            each_peer!(self, s => s.poll_flush(cx))
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            each_peer!(self, s => s.poll_shutdown(cx))
        }
    }

    pub async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    /// A handshaken pair: our stream (as the session holds it) and a rustls peer.
    pub async fn pair(suite: SupportedCipherSuite, side: TlsSide) -> (Stream, Peer) {
        let (server, client) = configs(suite);
        let (client_tcp, server_tcp) = tcp_pair().await;
        let name = ServerName::try_from("localhost").unwrap();
        match side {
            TlsSide::Server => {
                let (cfg, secrets) = server_config(&server);
                let ours =
                    tokio_rustls::TlsAcceptor::from(cfg).accept(Tracked::new(server_tcp, secrets));
                let peer = tokio_rustls::TlsConnector::from(client).connect(
                    name,
                    Tap {
                        tcp: client_tcp,
                        capture: None,
                    },
                );
                let (ours, peer) = tokio::join!(ours, peer);
                (
                    Stream::ServerTls(Box::new(ours.unwrap())),
                    Peer::Client(Box::new(peer.unwrap())),
                )
            }
            TlsSide::Client => {
                let (cfg, secrets) = client_config(&client);
                let ours = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, Tracked::new(client_tcp, secrets));
                let peer = tokio_rustls::TlsAcceptor::from(server).accept(Tap {
                    tcp: server_tcp,
                    capture: None,
                });
                let (ours, peer) = tokio::join!(ours, peer);
                (
                    Stream::ClientTls(Box::new(ours.unwrap())),
                    Peer::Server(Box::new(peer.unwrap())),
                )
            }
        }
    }

    fn message(len: usize, tag: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ tag).collect()
    }

    /// `len` bytes each way, written and read concurrently (larger than the
    /// socket buffers is fine), checked byte for byte.
    pub async fn exchange(ours: &mut Stream, peer: &mut Peer, len: usize, tag: u8) {
        let to_peer = message(len, tag);
        let to_us = message(len, !tag);
        let mut got_peer = vec![0u8; len];
        let mut got_us = vec![0u8; len];
        let (ours_r, ours_w) = tokio::io::split(&mut *ours);
        let (peer_r, peer_w) = tokio::io::split(&mut *peer);
        let (mut ours_r, mut ours_w, mut peer_r, mut peer_w) = (ours_r, ours_w, peer_r, peer_w);
        let (a, b, c, d) = tokio::time::timeout(WAIT, async {
            tokio::join!(
                async {
                    ours_w.write_all(&to_peer).await?;
                    ours_w.flush().await
                },
                peer_r.read_exact(&mut got_peer),
                async {
                    peer_w.write_all(&to_us).await?;
                    peer_w.flush().await
                },
                ours_r.read_exact(&mut got_us),
            )
        })
        .await
        .expect("exchange timed out");
        a.unwrap();
        b.unwrap();
        c.unwrap();
        d.unwrap();
        assert!(got_peer == to_peer, "peer got other bytes than we sent");
        assert!(got_us == to_us, "we got other bytes than the peer sent");
    }

    /// Freeze, carry the state as another process would (JSON, the fd out of
    /// and back into tokio), thaw.
    pub async fn hand_over(stream: Stream) -> Stream {
        let frozen = match stream.freeze(WAIT).await {
            Ok(f) => f,
            Err((_, why)) => panic!("freeze refused: {why}"),
        };
        let json = serde_json::to_string(&frozen.tls).unwrap();
        if let Some(tls) = &frozen.tls {
            let shown = format!("{tls:?}");
            assert!(
                !shown.contains(&format!("{:?}", tls.tx.key)),
                "Debug shows a key"
            );
        }
        let tls: Option<TlsState> = serde_json::from_str(&json).unwrap();
        let fd = frozen.tcp.into_std().unwrap();
        let tcp = TcpStream::from_std(fd).unwrap();
        let stream = Frozen {
            tcp,
            tls,
            pending: frozen.pending,
        }
        .thaw()
        .unwrap();
        assert!(matches!(stream, Stream::Continued(_)));
        stream
    }

    /// A peer's read, bounded: a test fails rather than hangs.
    pub async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(WAIT, f).await.expect("timed out")
    }

    /// Our rustls stream's IO.
    pub fn tracked(s: &Stream) -> &Tracked<TcpStream> {
        match s {
            Stream::ServerTls(s) => s.get_ref().0,
            Stream::ClientTls(s) => s.get_ref().0,
            _ => panic!("not a rustls stream"),
        }
    }

    /// Polls our stream's read side until `done` holds; reading plaintext
    /// before that is a test failure.
    pub async fn drive_until(s: &mut Stream, done: impl Fn(&Stream) -> bool) {
        let mut buf = [0u8; 1];
        tokio::time::timeout(
            WAIT,
            std::future::poll_fn(|cx| {
                let mut rb = ReadBuf::new(&mut buf);
                if let Poll::Ready(r) = Pin::new(&mut *s).poll_read(cx, &mut rb) {
                    panic!("read finished early: {r:?}, {:?}", rb.filled());
                }
                if done(s) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }),
        )
        .await
        .expect("drive_until timed out");
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::testkit::*;
    use super::*;

    fn sides() -> [TlsSide; 2] {
        [TlsSide::Server, TlsSide::Client]
    }

    /// Data both ways, plaintext rustls had decrypted but we had not read,
    /// 100 KB messages, A → B → C, KeyUpdates asked by the peer after each
    /// thaw, then close_notify both ways.
    #[tokio::test]
    async fn continues_across_two_hand_offs() {
        for suite in suites() {
            for side in sides() {
                let what = format!("{:?} {side:?}", suite.suite());
                let (mut ours, mut peer) = pair(suite, side).await;
                exchange(&mut ours, &mut peer, 1000, 1).await;

                // Decrypted by rustls, only partly read by the session.
                let msg: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
                peer.write_all(&msg).await.unwrap();
                peer.flush().await.unwrap();
                let mut got = vec![0u8; msg.len()];
                ours.read_exact(&mut got[..100]).await.unwrap();

                let mut ours = hand_over(ours).await;
                ours.read_exact(&mut got[100..]).await.unwrap();
                assert!(got == msg, "{what}: plaintext lost across the freeze");
                exchange(&mut ours, &mut peer, 100_000, 2).await;
                if is_tls13(suite) {
                    peer.refresh_traffic_keys();
                    exchange(&mut ours, &mut peer, 5000, 3).await;
                }

                let mut ours = hand_over(ours).await;
                exchange(&mut ours, &mut peer, 100_000, 4).await;
                if is_tls13(suite) {
                    peer.refresh_traffic_keys();
                    exchange(&mut ours, &mut peer, 100_000, 5).await;
                }

                // close_notify from the peer: EOF for us, not an error.
                peer.shutdown().await.unwrap();
                let mut buf = [0u8; 16];
                assert_eq!(ours.read(&mut buf).await.unwrap(), 0, "{what}");
                // And ours: rustls gives Ok(0) only after a close_notify.
                ours.shutdown().await.unwrap();
                assert_eq!(within(peer.read(&mut buf)).await.unwrap(), 0, "{what}");
            }
        }
    }

    /// A record rustls holds in part: the freeze waits for the rest, and
    /// without it gives the stream back, which still works.
    #[tokio::test]
    async fn partial_record_is_finished_or_refused() {
        for suite in suites() {
            for side in sides() {
                let what = format!("{:?} {side:?}", suite.suite());
                let (mut ours, mut peer) = pair(suite, side).await;
                exchange(&mut ours, &mut peer, 100, 1).await;
                let msg = vec![0x5a; 500];
                let wire = peer.seal(&msg).await;
                peer.send_raw(&wire[..10]).await;
                drive_until(&mut ours, |s| !tracked(s).at_record_boundary()).await;

                let (ours, why) = match ours.freeze(std::time::Duration::from_millis(50)).await {
                    Ok(_) => panic!("{what}: froze inside a record"),
                    Err(back) => back,
                };
                assert!(why.contains("in time"), "{what}: {why}");
                assert!(matches!(ours, Stream::ServerTls(_) | Stream::ClientTls(_)));

                // The rest arrives: first a freeze that completes the record...
                peer.send_raw(&wire[10..]).await;
                let mut ours = hand_over(ours).await;
                let mut got = vec![0u8; msg.len()];
                ours.read_exact(&mut got).await.unwrap();
                assert_eq!(got, msg, "{what}");
                exchange(&mut ours, &mut peer, 20_000, 2).await;
            }
        }
        // ...and a refused stream goes on as it was.
        let suite = suites()[0];
        let (mut ours, mut peer) = pair(suite, TlsSide::Server).await;
        let wire = peer.seal(b"hello").await;
        peer.send_raw(&wire[..3]).await;
        drive_until(&mut ours, |s| !tracked(s).at_record_boundary()).await;
        let (mut ours, _) = match ours.freeze(std::time::Duration::from_millis(20)).await {
            Ok(_) => panic!("froze inside a record"),
            Err(back) => back,
        };
        peer.send_raw(&wire[3..]).await;
        let mut got = [0u8; 5];
        ours.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        exchange(&mut ours, &mut peer, 1000, 3).await;
    }

    /// Design 2.2 case 3: the peer asks for a KeyUpdate while the session is
    /// idle; rustls queues its answer and would lose it at the extraction.
    #[tokio::test]
    async fn pending_key_update_answer_survives() {
        for suite in suites().into_iter().filter(|s| is_tls13(*s)) {
            for side in sides() {
                let what = format!("{:?} {side:?}", suite.suite());
                let (mut ours, mut peer) = pair(suite, side).await;
                exchange(&mut ours, &mut peer, 100, 1).await;
                peer.refresh_traffic_keys();
                let wire = peer.seal(b"").await;
                assert!(!wire.is_empty(), "{what}: no KeyUpdate written");
                let target = tracked(&ours).passed + wire.len() as u64;
                peer.send_raw(&wire).await;
                drive_until(&mut ours, |s| tracked(s).passed >= target).await;

                let mut ours = hand_over(ours).await;
                exchange(&mut ours, &mut peer, 50_000, 2).await;
                let mut ours = hand_over(ours).await;
                exchange(&mut ours, &mut peer, 1000, 3).await;
            }
        }
    }

    /// A record altered on the wire after the hand-off: an error for us, and
    /// the peer hears of it (bad_record_mac).
    #[tokio::test]
    async fn corrupted_record_is_an_error() {
        for suite in suites() {
            for side in sides() {
                let what = format!("{:?} {side:?}", suite.suite());
                let (ours, mut peer) = pair(suite, side).await;
                let mut ours = hand_over(ours).await;
                exchange(&mut ours, &mut peer, 100, 1).await;
                let mut wire = peer.seal(&[7u8; 200]).await;
                let last = wire.len() - 1;
                wire[last] ^= 0x01;
                peer.send_raw(&wire).await;
                let mut buf = [0u8; 200];
                let err = ours.read_exact(&mut buf).await.unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{what}: {err}");
                let heard = within(peer.read(&mut buf)).await;
                assert!(
                    heard
                        .as_ref()
                        .is_err_and(|e| e.to_string().contains("BadRecordMac")),
                    "{what}: no bad_record_mac alert: {heard:?}"
                );
                // Still an error later, and no freeze of a failed stream.
                assert!(ours.write_all(b"x").await.is_err(), "{what}");
                assert!(ours.freeze(WAIT).await.is_err(), "{what}");
            }
        }
    }

    /// Our own KeyUpdates (the per-key record limit, lowered) read by rustls,
    /// and rustls's answers read by us; in 1.2 the limit closes, as rustls does.
    #[tokio::test]
    async fn key_limit_rekeys_or_closes() {
        for suite in suites() {
            for side in sides() {
                let what = format!("{:?} {side:?}", suite.suite());
                let (ours, mut peer) = pair(suite, side).await;
                let mut ours = hand_over(ours).await;
                let Stream::Continued(c) = &mut ours else {
                    unreachable!()
                };
                // 1.3: a new key every two records; 1.2: the key is spent already.
                c.set_tx_limit(if is_tls13(suite) { 2 } else { 0 });
                if is_tls13(suite) {
                    exchange(&mut ours, &mut peer, 100_000, 1).await;
                    let mut ours = hand_over(ours).await;
                    exchange(&mut ours, &mut peer, 100_000, 2).await;
                } else {
                    let err = ours.write_all(&[1u8; 100]).await.unwrap_err();
                    assert!(err.to_string().contains("exhausted"), "{what}: {err}");
                    let mut buf = [0u8; 8];
                    assert_eq!(within(peer.read(&mut buf)).await.unwrap(), 0, "{what}");
                }
            }
        }
    }

    /// Refusals leave the stream usable, or say why it is not.
    #[tokio::test]
    async fn refuses_a_closed_peer_and_plain_goes_through() {
        let suite = suites()[0];
        let (mut ours, mut peer) = pair(suite, TlsSide::Server).await;
        peer.shutdown().await.unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(ours.read(&mut buf).await.unwrap(), 0);
        let (back, why) = match ours.freeze(WAIT).await {
            Ok(_) => panic!("froze a closed stream"),
            Err(back) => back,
        };
        assert!(why.contains("closed"), "{why}");
        assert!(matches!(back, Stream::ServerTls(_)));

        let (a, mut b) = tcp_pair().await;
        let frozen = Stream::Plain(a)
            .freeze(WAIT)
            .await
            .map_err(|(_, w)| w)
            .unwrap();
        assert!(frozen.tls.is_none() && frozen.pending.is_empty());
        let mut plain = frozen.thaw().unwrap();
        assert!(matches!(plain, Stream::Plain(_)));
        b.write_all(b"ok").await.unwrap();
        plain.read_exact(&mut buf[..2]).await.unwrap();
        assert_eq!(&buf[..2], b"ok");
    }

    #[test]
    fn tracked_follows_record_boundaries() {
        let mut t = Tracked::new((), Arc::new(TrafficSecrets::default()));
        assert!(t.at_record_boundary());
        t.observe(&[23, 3, 3]);
        assert!(!t.at_record_boundary());
        assert_eq!(t.rest_of_record(), 2);
        t.observe(&[0, 4, 1, 2]);
        assert_eq!(t.rest_of_record(), 2);
        // The rest of the body, a whole empty record and the next header.
        t.observe(&[3, 4, 23, 3, 3, 0, 0, 21, 3, 3, 0, 2]);
        assert!(!t.at_record_boundary());
        assert_eq!(t.rest_of_record(), 2);
        t.observe(&[1, 0]);
        assert!(t.at_record_boundary());
        assert_eq!(t.passed, 21);
    }

    #[test]
    fn state_validation_rejects_malformed_input() {
        let good = || TlsState {
            version: TlsVersion::Tls13,
            aead: TlsAead::Aes256Gcm,
            side: TlsSide::Server,
            tx: DirectionState {
                seq: 0,
                key: vec![1; 32],
                iv: vec![2; 12],
                secret: Some(vec![3; 48]),
            },
            rx: DirectionState {
                seq: 5,
                key: vec![4; 32],
                iv: vec![5; 12],
                secret: Some(vec![6; 48]),
            },
        };
        good().validate().unwrap();
        let json = serde_json::to_string(&good()).unwrap();
        let back: TlsState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.rx.seq, 5);
        assert_eq!(back.tx.secret.as_deref(), Some(&[3u8; 48][..]));
        let mut s = good();
        s.tx.key.pop();
        assert!(s.validate().is_err());
        let mut s = good();
        s.rx.secret = Some(vec![0; 32]);
        assert!(s.validate().is_err());
        let mut s = good();
        s.version = TlsVersion::Tls12;
        assert!(s.validate().is_err());
        assert!(!format!("{:?}", good()).contains("[1, 1"));
    }
}
