//! `ContinuedTls`: the TLS record layer of a session whose handshake was done
//! elsewhere (by rustls, in this process or another), continued from a
//! [`TlsState`] with ring's AEADs and HKDF (docs/handoff-design.md 3.1, 3.2,
//! 3.4). It owns framing, nonces, additional data, the TLS 1.3 inner content
//! type, KeyUpdate, alerts, renegotiation refusal and the sequence-number key
//! limits; all cryptography is ring's. It can be frozen again ([`ContinuedTls::freeze`]),
//! so a session can move A → B → C.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf::{self, KeyType};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use super::handover::{DirectionState, TlsAead, TlsSide, TlsState, TlsVersion};

const HEADER_LEN: usize = 5;
/// Largest plaintext fragment (RFC 8446 5.1, RFC 5246 6.2.1).
const MAX_PLAIN: usize = 1 << 14;
/// Largest ciphertext body a peer may send: 2^14 + 256 in 1.3, 2^14 + 2048 in 1.2.
const MAX_CIPHER_13: usize = MAX_PLAIN + 256;
const MAX_CIPHER_12: usize = MAX_PLAIN + 2048;
const MAX_RECORD: usize = HEADER_LEN + MAX_CIPHER_12;
const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 12;
/// TLS 1.2 AES-GCM sends 8 bytes of the nonce in each record.
const EXPLICIT_NONCE_LEN: usize = 8;
/// Ciphertext queued before a write waits for the socket: four full records.
const OUT_HIGH: usize = 4 * MAX_PLAIN;
/// rustls's sequence-number limits (record_layer.rs): near the soft limit a
/// key is retired; at the hard one nothing more is sealed with it.
const SEQ_SOFT_LIMIT: u64 = 0xffff_ffff_ffff_0000;
const SEQ_HARD_LIMIT: u64 = 0xffff_ffff_ffff_fffe;

// Content types.
const CT_CHANGE_CIPHER_SPEC: u8 = 20;
const CT_ALERT: u8 = 21;
const CT_HANDSHAKE: u8 = 22;
const CT_APPLICATION_DATA: u8 = 23;
// Alert levels and descriptions.
const LEVEL_WARNING: u8 = 1;
const LEVEL_FATAL: u8 = 2;
const CLOSE_NOTIFY: u8 = 0;
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const ILLEGAL_PARAMETER: u8 = 47;
const DECODE_ERROR: u8 = 50;
const USER_CANCELED: u8 = 90;
const NO_RENEGOTIATION: u8 = 100;
// Handshake types that may come after the handshake.
const HS_HELLO_REQUEST: u8 = 0;
const HS_CLIENT_HELLO: u8 = 1;
const HS_NEW_SESSION_TICKET: u8 = 4;
const HS_KEY_UPDATE: u8 = 24;
// rustls's tolerance counters (common_state.rs `TemperCounters`, conn.rs).
const ALLOWED_WARNING_ALERTS: u8 = 4;
const ALLOWED_RENEGOTIATION_REQUESTS: u8 = 1;
const ALLOWED_KEY_UPDATE_REQUESTS: u8 = 32;
const ALLOWED_EMPTY_FRAGMENTS: u8 = 32;

impl TlsAead {
    fn ring(self) -> &'static aead::Algorithm {
        match self {
            TlsAead::Aes128Gcm => &aead::AES_128_GCM,
            TlsAead::Aes256Gcm => &aead::AES_256_GCM,
            TlsAead::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    pub(crate) fn key_len(self) -> usize {
        self.ring().key_len()
    }

    /// The TLS 1.3 suite's hash: SHA-384 for AES-256-GCM, SHA-256 for the others.
    fn hkdf(self) -> hkdf::Algorithm {
        match self {
            TlsAead::Aes256Gcm => hkdf::HKDF_SHA384,
            TlsAead::Aes128Gcm | TlsAead::Chacha20Poly1305 => hkdf::HKDF_SHA256,
        }
    }

    pub(crate) fn hash_len(self) -> usize {
        self.hkdf().len()
    }

    /// Records per key before rustls retires it (crypto/ring/tls1{2,3}.rs).
    fn confidentiality_limit(self) -> u64 {
        match self {
            TlsAead::Aes128Gcm | TlsAead::Aes256Gcm => 1 << 24,
            TlsAead::Chacha20Poly1305 => u64::MAX,
        }
    }
}

fn crypto_err(what: &str) -> io::Error {
    io::Error::other(format!("TLS: {what} failed"))
}

/// A `ring::hkdf::KeyType` of any length, for HKDF-Expand.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label(secret, label, "", len) of RFC 8446 7.1.
fn expand_label(
    alg: hkdf::Algorithm,
    secret: &[u8],
    label: &[u8],
    len: usize,
) -> io::Result<Zeroizing<Vec<u8>>> {
    let prk = hkdf::Prk::new_less_safe(alg, secret);
    let out_len = u16::try_from(len).map_err(|_| crypto_err("HKDF length"))?;
    let label_len = u8::try_from(6 + label.len()).map_err(|_| crypto_err("HKDF label"))?;
    let out_len = out_len.to_be_bytes();
    let info: [&[u8]; 5] = [&out_len, &[label_len], b"tls13 ", label, &[0]];
    let mut out = Zeroizing::new(vec![0u8; len]);
    prk.expand(&info, Len(len))
        .and_then(|okm| okm.fill(&mut out))
        .map_err(|_| crypto_err("HKDF-Expand"))?;
    Ok(out)
}

/// A key and an IV, wiped on drop.
pub(crate) type KeyIv = (Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>);

/// The key and IV a TLS 1.3 traffic secret gives (RFC 8446 7.3).
pub(crate) fn traffic_key_iv(aead: TlsAead, secret: &[u8]) -> io::Result<KeyIv> {
    let key = expand_label(aead.hkdf(), secret, b"key", aead.key_len())?;
    let iv = expand_label(aead.hkdf(), secret, b"iv", NONCE_LEN)?;
    Ok((key, iv))
}

/// application_traffic_secret_N+1 (RFC 8446 7.2).
pub(crate) fn next_secret(aead: TlsAead, secret: &[u8]) -> io::Result<Zeroizing<Vec<u8>>> {
    expand_label(aead.hkdf(), secret, b"traffic upd", aead.hash_len())
}

/// One direction's keys: what seals (or opens) the next record.
struct Direction {
    key: LessSafeKey,
    /// Kept for export only: a `LessSafeKey` does not give its bytes back.
    raw_key: Zeroizing<Vec<u8>>,
    iv: Zeroizing<[u8; NONCE_LEN]>,
    seq: u64,
    /// TLS 1.3 only: the traffic secret of this key's generation.
    secret: Option<Zeroizing<Vec<u8>>>,
}

impl Direction {
    fn new(
        aead: TlsAead,
        key: &[u8],
        iv: &[u8],
        seq: u64,
        secret: Option<Zeroizing<Vec<u8>>>,
    ) -> io::Result<Self> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let unbound = UnboundKey::new(aead.ring(), key).map_err(|_| bad("TLS state: bad key"))?;
        let iv: [u8; NONCE_LEN] = iv.try_into().map_err(|_| bad("TLS state: bad IV"))?;
        Ok(Direction {
            key: LessSafeKey::new(unbound),
            raw_key: Zeroizing::new(key.to_vec()),
            iv: Zeroizing::new(iv),
            seq,
            secret,
        })
    }

    /// IV XOR (0^4 || seq): the nonce of TLS 1.3, TLS 1.2 ChaCha20, and what
    /// rustls (and so we) use for TLS 1.2 AES-GCM's explicit part.
    fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut n = *self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    /// The next TLS 1.3 generation, at sequence 0.
    fn next(&self, aead: TlsAead) -> io::Result<Direction> {
        let secret = self
            .secret
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "TLS: no traffic secret"))?;
        let secret = next_secret(aead, secret)?;
        let (key, iv) = traffic_key_iv(aead, &secret)?;
        Direction::new(aead, &key, &iv, 0, Some(secret))
    }

    fn export(&self) -> DirectionState {
        DirectionState {
            seq: self.seq,
            key: self.raw_key.to_vec(),
            iv: self.iv.to_vec(),
            secret: self.secret.as_ref().map(|s| s.to_vec()),
        }
    }
}

/// The 13 bytes of TLS 1.2 additional data: seq || type || version || length.
fn tls12_aad(seq: u64, typ: u8, len: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9] = 3;
    aad[10] = 3;
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aad
}

/// A TLS session's record layer over its TCP socket, after a hand-off.
pub struct ContinuedTls {
    tcp: TcpStream,
    version: TlsVersion,
    aead: TlsAead,
    side: TlsSide,
    tx: Direction,
    rx: Direction,
    /// Records sealed with one key before it is retired (rustls's `write_seq_max`).
    tx_limit: u64,
    /// Ciphertext read, not yet opened: `inbuf[in_start..in_end]`.
    inbuf: Box<[u8]>,
    in_start: usize,
    in_end: usize,
    /// Plaintext opened (or carried over), not yet read: `plain[plain_pos..]`.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Ciphertext sealed, not yet written: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    /// close_notify received: reads give EOF.
    peer_closed: bool,
    /// TCP EOF seen.
    eof: bool,
    /// close_notify (or a fatal alert) sent: nothing more is sealed.
    sent_close: bool,
    /// A fatal error: every later operation fails with it.
    failed: Option<(io::ErrorKind, String)>,
    warnings_left: u8,
    renegotiations_left: u8,
    key_updates_left: u8,
    empty_left: u8,
}

impl std::fmt::Debug for ContinuedTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContinuedTls")
            .field("version", &self.version)
            .field("aead", &self.aead)
            .field("side", &self.side)
            .field("tx_seq", &self.tx.seq)
            .field("rx_seq", &self.rx.seq)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl ContinuedTls {
    /// Continue from `state` on `tcp`; `pending` (plaintext decrypted before
    /// the hand-off) is served first. `tcp` must be registered with the
    /// current runtime.
    pub fn new(tcp: TcpStream, state: &TlsState, pending: Vec<u8>) -> io::Result<Self> {
        state.validate()?;
        let direction = |d: &DirectionState| {
            let secret = d.secret.as_ref().map(|s| Zeroizing::new(s.clone()));
            Direction::new(state.aead, &d.key, &d.iv, d.seq, secret)
        };
        let tx = direction(&state.tx)?;
        let rx = direction(&state.rx)?;
        Ok(Self::with(
            tcp,
            state.version,
            state.aead,
            state.side,
            tx,
            rx,
            pending,
        ))
    }

    fn with(
        tcp: TcpStream,
        version: TlsVersion,
        aead: TlsAead,
        side: TlsSide,
        tx: Direction,
        rx: Direction,
        pending: Vec<u8>,
    ) -> Self {
        ContinuedTls {
            tcp,
            version,
            aead,
            side,
            tx,
            rx,
            tx_limit: SEQ_SOFT_LIMIT.min(aead.confidentiality_limit()),
            inbuf: vec![0u8; MAX_RECORD].into_boxed_slice(),
            in_start: 0,
            in_end: 0,
            plain: pending,
            plain_pos: 0,
            out: Vec::new(),
            out_pos: 0,
            peer_closed: false,
            eof: false,
            sent_close: false,
            failed: None,
            warnings_left: ALLOWED_WARNING_ALERTS,
            renegotiations_left: ALLOWED_RENEGOTIATION_REQUESTS,
            key_updates_left: ALLOWED_KEY_UPDATE_REQUESTS,
            empty_left: ALLOWED_EMPTY_FRAGMENTS,
        }
    }

    /// A stream that only fails with `why`: for a socket whose TLS state was
    /// consumed but could not be rebuilt (it must not be spoken to in
    /// plaintext). The zero keys are never used: every path checks `failed` first.
    pub(crate) fn failed(tcp: TcpStream, side: TlsSide, why: String) -> Self {
        let aead = TlsAead::Aes128Gcm;
        let zero = || {
            let key = UnboundKey::new(aead.ring(), &[0u8; 16])
                .expect("16 bytes is an AES-128 key (a constant, not input)");
            Direction {
                key: LessSafeKey::new(key),
                raw_key: Zeroizing::new(Vec::new()),
                iv: Zeroizing::new([0; NONCE_LEN]),
                seq: 0,
                secret: None,
            }
        };
        let mut s = Self::with(
            tcp,
            TlsVersion::Tls12,
            aead,
            side,
            zero(),
            zero(),
            Vec::new(),
        );
        s.sent_close = true;
        s.failed = Some((io::ErrorKind::InvalidData, why));
        s
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn version(&self) -> TlsVersion {
        self.version
    }

    pub fn aead(&self) -> TlsAead {
        self.aead
    }

    /// Nothing has arrived that is not read yet: no plaintext or ciphertext
    /// held here, and a peek finds the socket empty.
    pub fn is_silent(&self) -> bool {
        if self.plain_pos < self.plain.len()
            || self.in_start < self.in_end
            || self.peer_closed
            || self.eof
            || self.failed.is_some()
        {
            return false;
        }
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        matches!(
            socket2::SockRef::from(&self.tcp).peek(&mut byte),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }

    /// Lower the per-key record limit (tests of the key-exhaustion paths).
    #[cfg(test)]
    pub(crate) fn set_tx_limit(&mut self, limit: u64) {
        self.tx_limit = limit;
    }

    fn failure(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|(kind, why)| io::Error::new(*kind, why.clone()))
    }

    /// Ends the session: queues a fatal alert if one is due (and a key is
    /// still usable), tries to send it, and remembers the error.
    fn fail(&mut self, alert: Option<u8>, why: impl Into<String>) -> io::Error {
        let why = format!("TLS: {}", why.into());
        if let (Some(desc), None, false) = (alert, &self.failed, self.sent_close) {
            if self.seal_record(CT_ALERT, &[LEVEL_FATAL, desc]).is_ok() {
                self.try_write_out();
            }
        }
        self.sent_close = true;
        if self.failed.is_none() {
            self.failed = Some((io::ErrorKind::InvalidData, why.clone()));
        }
        io::Error::new(io::ErrorKind::InvalidData, why)
    }

    // ---- sending ----

    /// Seals one record of `typ` carrying `data` (≤ 2^14 bytes) onto `out`.
    fn seal_record(&mut self, typ: u8, data: &[u8]) -> io::Result<()> {
        debug_assert!(data.len() <= MAX_PLAIN);
        if self.tx.seq >= SEQ_HARD_LIMIT {
            return Err(io::Error::other("TLS: sequence number exhausted"));
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos >= OUT_HIGH {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        let start = self.out.len();
        let nonce = self.tx.nonce();
        let sealed = match self.version {
            TlsVersion::Tls13 => {
                let len = data.len() + 1 + TAG_LEN;
                let header = record_header(CT_APPLICATION_DATA, len);
                self.out.extend_from_slice(&header);
                self.out.extend_from_slice(data);
                self.out.push(typ);
                self.tx.key.seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(header),
                    &mut self.out[start + HEADER_LEN..],
                )
            }
            TlsVersion::Tls12 => {
                let explicit = self.aead != TlsAead::Chacha20Poly1305;
                let explicit_len = if explicit { EXPLICIT_NONCE_LEN } else { 0 };
                let header = record_header(typ, explicit_len + data.len() + TAG_LEN);
                self.out.extend_from_slice(&header);
                if explicit {
                    self.out.extend_from_slice(&nonce[4..]);
                }
                let body = self.out.len();
                self.out.extend_from_slice(data);
                self.tx.key.seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(tls12_aad(self.tx.seq, typ, data.len())),
                    &mut self.out[body..],
                )
            }
        };
        match sealed {
            Ok(tag) => {
                self.out.extend_from_slice(tag.as_ref());
                self.tx.seq += 1;
                Ok(())
            }
            Err(_) => {
                self.out.truncate(start);
                Err(crypto_err("seal"))
            }
        }
    }

    /// A KeyUpdate under the current key, then the next generation for tx.
    fn send_key_update(&mut self, request_peer: bool) -> io::Result<()> {
        self.seal_record(
            CT_HANDSHAKE,
            &[HS_KEY_UPDATE, 0, 0, 1, u8::from(request_peer)],
        )?;
        self.tx = self.tx.next(self.aead)?;
        Ok(())
    }

    /// At the key's record limit: a new key in 1.3, the end in 1.2 (as rustls).
    fn before_app_record(&mut self) -> io::Result<()> {
        if self.tx.seq < self.tx_limit {
            return Ok(());
        }
        match self.version {
            TlsVersion::Tls13 => self.send_key_update(true),
            TlsVersion::Tls12 => {
                if self
                    .seal_record(CT_ALERT, &[LEVEL_WARNING, CLOSE_NOTIFY])
                    .is_ok()
                {
                    self.try_write_out();
                }
                self.sent_close = true;
                let why = "TLS: traffic keys exhausted, connection closed".to_string();
                self.failed = Some((io::ErrorKind::Other, why.clone()));
                Err(io::Error::other(why))
            }
        }
    }

    /// Writes queued ciphertext without registering a waker (used from the
    /// read side, whose waker must not take the writer's place, and for
    /// alerts of a stream that fails). A plain non-blocking send: tokio's
    /// `try_write` would trust its readiness cache, empty on a socket just
    /// registered at a thaw, and not even try.
    fn try_write_out(&mut self) {
        let sock = socket2::SockRef::from(&self.tcp);
        while self.out_pos < self.out.len() {
            match sock.send(&self.out[self.out_pos..]) {
                Ok(0) | Err(_) => return,
                Ok(n) => self.out_pos += n,
            }
        }
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.out.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    fn writable(&self) -> io::Result<()> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        if self.sent_close {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS: close_notify already sent",
            ));
        }
        Ok(())
    }

    // ---- receiving ----

    fn max_body(&self) -> usize {
        match self.version {
            TlsVersion::Tls13 => MAX_CIPHER_13,
            TlsVersion::Tls12 => MAX_CIPHER_12,
        }
    }

    /// Bytes still missing for the record at the front of `inbuf` (0: none started).
    fn missing(&self) -> usize {
        let have = self.in_end - self.in_start;
        if have == 0 {
            0
        } else if have < HEADER_LEN {
            HEADER_LEN - have
        } else {
            let h = &self.inbuf[self.in_start..];
            let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
            (HEADER_LEN + len).saturating_sub(have)
        }
    }

    /// Reads at most `max` bytes of ciphertext from the socket.
    fn poll_fill(&mut self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<usize>> {
        if self.in_start == self.in_end {
            self.in_start = 0;
            self.in_end = 0;
        } else if self.in_start > 0 {
            // Room for a whole record at the front: one record never exceeds the buffer.
            self.inbuf.copy_within(self.in_start..self.in_end, 0);
            self.in_end -= self.in_start;
            self.in_start = 0;
        }
        let end = self.inbuf.len().min(self.in_end + max);
        let mut rb = ReadBuf::new(&mut self.inbuf[self.in_end..end]);
        match ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut rb)) {
            Ok(()) => {
                let n = rb.filled().len();
                self.in_end += n;
                if n == 0 {
                    self.eof = true;
                }
                Poll::Ready(Ok(n))
            }
            Err(e) => {
                let kind = e.kind();
                self.failed = Some((kind, format!("TLS socket: {e}")));
                self.sent_close = true;
                Poll::Ready(Err(e))
            }
        }
    }

    /// Opens and handles the record at the front of `inbuf`; `false` when it
    /// is not complete yet.
    fn process_record(&mut self) -> io::Result<bool> {
        let have = self.in_end - self.in_start;
        if have < HEADER_LEN {
            return Ok(false);
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&self.inbuf[self.in_start..self.in_start + HEADER_LEN]);
        let outer = header[0];
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if header[1] != 3 {
            return Err(self.fail(Some(DECODE_ERROR), "bad record version"));
        }
        if len > self.max_body() {
            return Err(self.fail(Some(RECORD_OVERFLOW), "record too long"));
        }
        if have < HEADER_LEN + len {
            return Ok(false);
        }
        let body = self.in_start + HEADER_LEN;
        self.in_start = body + len;
        if self.rx.seq >= SEQ_SOFT_LIMIT && !self.sent_close {
            // As rustls: the peer is about to wrap its counter; say goodbye first.
            if self
                .seal_record(CT_ALERT, &[LEVEL_WARNING, CLOSE_NOTIFY])
                .is_ok()
            {
                self.try_write_out();
            }
            self.sent_close = true;
        }
        let (typ, start, plen) = match self.version {
            TlsVersion::Tls13 => {
                if outer != CT_APPLICATION_DATA {
                    return Err(self.fail(Some(UNEXPECTED_MESSAGE), "unencrypted record"));
                }
                let nonce = self.rx.nonce();
                let opened = self.rx.key.open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(header),
                    &mut self.inbuf[body..body + len],
                );
                let Ok(inner) = opened else {
                    return Err(self.fail(Some(BAD_RECORD_MAC), "record does not decrypt"));
                };
                // Content || type || zero padding: the last non-zero byte is the type.
                let Some(at) = inner.iter().rposition(|&b| b != 0) else {
                    return Err(self.fail(Some(UNEXPECTED_MESSAGE), "record without type"));
                };
                (inner[at], body, at)
            }
            TlsVersion::Tls12 => {
                let explicit = if self.aead == TlsAead::Chacha20Poly1305 {
                    0
                } else {
                    EXPLICIT_NONCE_LEN
                };
                if len < explicit + TAG_LEN {
                    return Err(self.fail(Some(BAD_RECORD_MAC), "record too short"));
                }
                let nonce = if explicit == 0 {
                    self.rx.nonce()
                } else {
                    let mut n = [0u8; NONCE_LEN];
                    n[..4].copy_from_slice(&self.rx.iv[..4]);
                    n[4..].copy_from_slice(&self.inbuf[body..body + EXPLICIT_NONCE_LEN]);
                    n
                };
                let plen = len - explicit - TAG_LEN;
                let aad = tls12_aad(self.rx.seq, outer, plen);
                let opened = self.rx.key.open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    &mut self.inbuf[body + explicit..body + len],
                );
                if opened.is_err() {
                    return Err(self.fail(Some(BAD_RECORD_MAC), "record does not decrypt"));
                }
                (outer, body + explicit, plen)
            }
        };
        self.rx.seq += 1;
        if plen > MAX_PLAIN {
            return Err(self.fail(Some(RECORD_OVERFLOW), "plaintext too long"));
        }
        match typ {
            CT_APPLICATION_DATA => {
                if plen == 0 {
                    if self.empty_left == 0 {
                        return Err(self.fail(Some(UNEXPECTED_MESSAGE), "too many empty records"));
                    }
                    self.empty_left -= 1;
                } else {
                    self.empty_left = ALLOWED_EMPTY_FRAGMENTS;
                    self.key_updates_left = ALLOWED_KEY_UPDATE_REQUESTS;
                }
                if self.plain_pos == self.plain.len() {
                    self.plain.clear();
                    self.plain_pos = 0;
                }
                self.plain
                    .extend_from_slice(&self.inbuf[start..start + plen]);
            }
            CT_ALERT => {
                if plen != 2 {
                    return Err(self.fail(Some(DECODE_ERROR), "bad alert"));
                }
                let (level, desc) = (self.inbuf[start], self.inbuf[start + 1]);
                self.on_alert(level, desc)?;
            }
            CT_HANDSHAKE => {
                let msg = Zeroizing::new(self.inbuf[start..start + plen].to_vec());
                self.on_handshake(&msg)?;
            }
            CT_CHANGE_CIPHER_SPEC => {
                return Err(self.fail(
                    Some(UNEXPECTED_MESSAGE),
                    "change_cipher_spec after the handshake",
                ));
            }
            _ => return Err(self.fail(Some(UNEXPECTED_MESSAGE), "unknown content type")),
        }
        Ok(true)
    }

    fn on_alert(&mut self, level: u8, desc: u8) -> io::Result<()> {
        if level != LEVEL_WARNING && level != LEVEL_FATAL {
            return Err(self.fail(Some(ILLEGAL_PARAMETER), "bad alert level"));
        }
        if desc == CLOSE_NOTIFY {
            // "Any data received after a closure alert MUST be ignored" (RFC 8446 6.1).
            self.peer_closed = true;
            self.in_start = self.in_end;
            return Ok(());
        }
        if level == LEVEL_WARNING {
            if self.warnings_left == 0 {
                return Err(self.fail(Some(UNEXPECTED_MESSAGE), "too many warning alerts"));
            }
            self.warnings_left -= 1;
            // Warnings are outlawed in 1.3, except user_canceled (as rustls).
            if self.version == TlsVersion::Tls13 && desc != USER_CANCELED {
                return Err(self.fail(
                    Some(DECODE_ERROR),
                    format!("warning alert {desc} in TLS 1.3"),
                ));
            }
            return Ok(());
        }
        self.sent_close = true;
        let why = format!("TLS: peer sent fatal alert {desc}");
        self.failed = Some((io::ErrorKind::InvalidData, why.clone()));
        Err(io::Error::new(io::ErrorKind::InvalidData, why))
    }

    fn on_handshake(&mut self, mut rest: &[u8]) -> io::Result<()> {
        while !rest.is_empty() {
            if rest.len() < 4 {
                return Err(self.fail(
                    Some(UNEXPECTED_MESSAGE),
                    "handshake message split over records",
                ));
            }
            let typ = rest[0];
            let len = usize::from(rest[1]) << 16 | usize::from(rest[2]) << 8 | usize::from(rest[3]);
            if rest.len() < 4 + len {
                return Err(self.fail(
                    Some(UNEXPECTED_MESSAGE),
                    "handshake message split over records",
                ));
            }
            let body = &rest[4..4 + len];
            rest = &rest[4 + len..];
            match (self.version, typ, self.side) {
                (TlsVersion::Tls13, HS_KEY_UPDATE, _) => {
                    if body.len() != 1 {
                        return Err(self.fail(Some(DECODE_ERROR), "bad KeyUpdate"));
                    }
                    // A key change must end its record (RFC 8446 5.1).
                    if !rest.is_empty() {
                        return Err(self.fail(Some(UNEXPECTED_MESSAGE), "data after KeyUpdate"));
                    }
                    let requested = match body[0] {
                        0 => false,
                        1 => true,
                        _ => {
                            return Err(self.fail(Some(ILLEGAL_PARAMETER), "bad KeyUpdate request"))
                        }
                    };
                    if self.key_updates_left == 0 {
                        return Err(self.fail(Some(UNEXPECTED_MESSAGE), "too many KeyUpdates"));
                    }
                    self.key_updates_left -= 1;
                    if requested && !self.sent_close {
                        // Our answer goes under the old key, ahead of any later data.
                        if let Err(e) = self.send_key_update(false) {
                            return Err(self.fail(None, format!("KeyUpdate answer: {e}")));
                        }
                        self.try_write_out();
                    }
                    match self.rx.next(self.aead) {
                        Ok(next) => self.rx = next,
                        Err(e) => return Err(self.fail(None, format!("KeyUpdate: {e}"))),
                    }
                }
                // A ticket only offers a resumption a handed-over connection never makes.
                (TlsVersion::Tls13, HS_NEW_SESSION_TICKET, TlsSide::Client) => {}
                (TlsVersion::Tls12, HS_CLIENT_HELLO, TlsSide::Server)
                | (TlsVersion::Tls12, HS_HELLO_REQUEST, TlsSide::Client) => {
                    if self.renegotiations_left == 0 {
                        return Err(
                            self.fail(Some(UNEXPECTED_MESSAGE), "too many renegotiation requests")
                        );
                    }
                    self.renegotiations_left -= 1;
                    if !self.sent_close {
                        self.seal_record(CT_ALERT, &[LEVEL_WARNING, NO_RENEGOTIATION])?;
                        self.try_write_out();
                    }
                    // The rest of a renegotiation attempt is not ours to read.
                    return Ok(());
                }
                _ => {
                    return Err(self.fail(
                        Some(UNEXPECTED_MESSAGE),
                        format!("unexpected handshake message {typ}"),
                    ))
                }
            }
        }
        Ok(())
    }

    // ---- hand-off ----

    fn refusal(&self) -> Option<String> {
        if let Some((_, why)) = &self.failed {
            return Some(format!("TLS stream failed: {why}"));
        }
        if self.peer_closed || self.eof {
            return Some("peer closed the TLS stream".into());
        }
        if self.sent_close {
            return Some("TLS stream closed".into());
        }
        None
    }

    /// Completes a partial record, opens what is buffered and sends what is queued.
    async fn settle(&mut self) -> io::Result<()> {
        loop {
            while self.process_record()? {}
            if self.peer_closed {
                return Ok(());
            }
            let need = self.missing();
            if need == 0 {
                break;
            }
            let n = std::future::poll_fn(|cx| self.poll_fill(cx, need)).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        std::future::poll_fn(|cx| self.poll_drain(cx)).await
    }

    /// Freeze again for the next hand-off: the socket, the record state and
    /// the plaintext not read yet. Waits at most `wait` for a partial record
    /// and queued output; on refusal the stream comes back with a reason.
    pub async fn freeze(
        mut self: Box<Self>,
        wait: Duration,
    ) -> Result<(TcpStream, TlsState, Vec<u8>), (Box<Self>, String)> {
        if let Some(why) = self.refusal() {
            return Err((self, why));
        }
        let settled = tokio::time::timeout(wait, self.settle()).await;
        match settled {
            Err(_) => return Err((self, "TLS record or output did not complete in time".into())),
            Ok(Err(e)) => return Err((self, format!("TLS stream: {e}"))),
            Ok(Ok(())) => {}
        }
        if let Some(why) = self.refusal() {
            return Err((self, why));
        }
        let this = *self;
        let state = TlsState {
            version: this.version,
            aead: this.aead,
            side: this.side,
            tx: this.tx.export(),
            rx: this.rx.export(),
        };
        let pending = this.plain[this.plain_pos..].to_vec();
        Ok((this.tcp, state, pending))
    }
}

fn record_header(typ: u8, len: usize) -> [u8; HEADER_LEN] {
    let len = (len as u16).to_be_bytes();
    [typ, 3, 3, len[0], len[1]]
}

impl AsyncRead for ContinuedTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_pos < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_pos);
                buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                if this.plain_pos == this.plain.len() {
                    this.plain.clear();
                    this.plain_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = this.failure() {
                return Poll::Ready(Err(e));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if this.process_record()? {
                continue;
            }
            // Control answers (KeyUpdate, no_renegotiation) go out even if nobody writes.
            this.try_write_out();
            if this.eof {
                // As rustls: EOF without close_notify is an error.
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            ready!(this.poll_fill(cx, MAX_RECORD))?;
        }
    }
}

impl AsyncWrite for ContinuedTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.writable()?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.out.len() - this.out_pos >= OUT_HIGH {
            if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
            if this.out.len() - this.out_pos >= OUT_HIGH {
                return Poll::Pending;
            }
        }
        let take = buf.len().min(OUT_HIGH);
        let mut done = 0;
        for chunk in buf[..take].chunks(MAX_PLAIN) {
            let sealed = this
                .before_app_record()
                .and_then(|()| this.seal_record(CT_APPLICATION_DATA, chunk));
            match sealed {
                Ok(()) => done += chunk.len(),
                Err(e) if done == 0 => return Poll::Ready(Err(e)),
                Err(_) => break,
            }
        }
        // Start sending now; the rest goes on the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(done))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.failure() {
            return Poll::Ready(Err(e));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.failed.is_none() && !this.sent_close {
            this.seal_record(CT_ALERT, &[LEVEL_WARNING, CLOSE_NOTIFY])?;
            this.sent_close = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::tls::handover::testkit::{tcp_pair, WAIT};

    const AEADS: [TlsAead; 3] = [
        TlsAead::Aes128Gcm,
        TlsAead::Aes256Gcm,
        TlsAead::Chacha20Poly1305,
    ];

    fn direction(aead: TlsAead, version: TlsVersion, fill: u8, seq: u64) -> DirectionState {
        DirectionState {
            seq,
            key: vec![fill; aead.key_len()],
            iv: vec![fill ^ 0x55; NONCE_LEN],
            secret: (version == TlsVersion::Tls13).then(|| vec![fill ^ 0xaa; aead.hash_len()]),
        }
    }

    /// Two continued ends of one connection: `a` the server side, `b` the
    /// client side, each with the other's keys.
    async fn mirrored(version: TlsVersion, aead: TlsAead) -> (ContinuedTls, ContinuedTls) {
        let (ta, tb) = tcp_pair().await;
        let state = |side, tx: u8, rx: u8| TlsState {
            version,
            aead,
            side,
            tx: direction(aead, version, tx, 7),
            rx: direction(aead, version, rx, 7),
        };
        let a = ContinuedTls::new(ta, &state(TlsSide::Server, 1, 2), Vec::new()).unwrap();
        let b = ContinuedTls::new(tb, &state(TlsSide::Client, 2, 1), b"carried".to_vec()).unwrap();
        (a, b)
    }

    /// A record as a misbehaving (or just unusual) peer would send it.
    async fn inject(s: &mut ContinuedTls, typ: u8, data: &[u8]) {
        s.seal_record(typ, data).unwrap();
        std::future::poll_fn(|cx| s.poll_drain(cx)).await.unwrap();
    }

    async fn expect(s: &mut ContinuedTls, want: &[u8]) {
        let mut got = vec![0u8; want.len()];
        tokio::time::timeout(WAIT, s.read_exact(&mut got))
            .await
            .expect("read timed out")
            .unwrap();
        assert_eq!(got, want);
    }

    async fn read_err(s: &mut ContinuedTls) -> io::Error {
        let mut buf = [0u8; 16];
        tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("read timed out")
            .unwrap_err()
    }

    #[tokio::test]
    async fn records_of_every_size_and_key_updates_both_ways() {
        for version in [TlsVersion::Tls12, TlsVersion::Tls13] {
            for aead in AEADS {
                let (mut a, mut b) = mirrored(version, aead).await;
                expect(&mut b, b"carried").await;
                for (i, len) in [1usize, 15, 16, 17, 16383, 16384, 16385, 70_000]
                    .into_iter()
                    .enumerate()
                {
                    let msg: Vec<u8> = (0..len).map(|j| (j * 31 + i) as u8).collect();
                    let (w, ()) = tokio::join!(
                        async {
                            a.write_all(&msg).await?;
                            a.flush().await
                        },
                        expect(&mut b, &msg)
                    );
                    w.unwrap();
                    if version == TlsVersion::Tls13 {
                        // Alternate who asks; the answer comes back before more data.
                        let (asker, other) = if i % 2 == 0 {
                            (&mut a, &mut b)
                        } else {
                            (&mut b, &mut a)
                        };
                        asker.send_key_update(true).unwrap();
                        asker.write_all(b"after").await.unwrap();
                        asker.flush().await.unwrap();
                        expect(other, b"after").await;
                        other.write_all(b"reply").await.unwrap();
                        other.flush().await.unwrap();
                        expect(asker, b"reply").await;
                    }
                }
                if version == TlsVersion::Tls13 {
                    assert_eq!(a.tx.secret.as_deref(), b.rx.secret.as_deref());
                    assert_eq!(b.tx.secret.as_deref(), a.rx.secret.as_deref());
                    assert_ne!(a.tx.seq, 7, "no KeyUpdate happened");
                }
            }
        }
    }

    #[tokio::test]
    async fn renegotiation_is_refused_and_the_session_goes_on() {
        for aead in AEADS {
            let (mut a, mut b) = mirrored(TlsVersion::Tls12, aead).await;
            expect(&mut b, b"carried").await;
            // HelloRequest from the server side, then a ClientHello stub from the client side.
            inject(&mut a, CT_HANDSHAKE, &[HS_HELLO_REQUEST, 0, 0, 0]).await;
            a.write_all(b"one").await.unwrap();
            a.flush().await.unwrap();
            expect(&mut b, b"one").await;
            inject(&mut b, CT_HANDSHAKE, &[HS_CLIENT_HELLO, 0, 0, 2, 3, 3]).await;
            b.write_all(b"two").await.unwrap();
            b.flush().await.unwrap();
            // `a` reads b's no_renegotiation warning first (ignored), then `two`...
            expect(&mut a, b"two").await;
            assert_eq!(a.warnings_left, ALLOWED_WARNING_ALERTS - 1);
            // ...and `b` has a's warning waiting before `three`.
            a.write_all(b"three").await.unwrap();
            a.flush().await.unwrap();
            expect(&mut b, b"three").await;
            assert_eq!(b.warnings_left, ALLOWED_WARNING_ALERTS - 1);
            // A second attempt is one too many, as for rustls.
            inject(&mut a, CT_HANDSHAKE, &[HS_HELLO_REQUEST, 0, 0, 0]).await;
            assert_eq!(read_err(&mut b).await.kind(), io::ErrorKind::InvalidData);
        }
    }

    #[tokio::test]
    async fn new_session_ticket_is_ignored_only_by_a_client() {
        let (mut a, mut b) = mirrored(TlsVersion::Tls13, TlsAead::Aes128Gcm).await;
        let ticket = [HS_NEW_SESSION_TICKET, 0, 0, 3, 1, 2, 3];
        inject(&mut a, CT_HANDSHAKE, &ticket).await;
        a.write_all(b"x").await.unwrap();
        a.flush().await.unwrap();
        expect(&mut b, b"carriedx").await;
        inject(&mut b, CT_HANDSHAKE, &ticket).await;
        let err = read_err(&mut a).await;
        assert!(err.to_string().contains("unexpected handshake"), "{err}");
    }

    #[tokio::test]
    async fn alerts() {
        // 1.3: user_canceled is ignored, any other warning is fatal.
        let (mut a, mut b) = mirrored(TlsVersion::Tls13, TlsAead::Chacha20Poly1305).await;
        inject(&mut a, CT_ALERT, &[LEVEL_WARNING, USER_CANCELED]).await;
        a.write_all(b"!").await.unwrap();
        a.flush().await.unwrap();
        expect(&mut b, b"carried!").await;
        inject(&mut a, CT_ALERT, &[LEVEL_WARNING, 42]).await;
        assert!(read_err(&mut b).await.to_string().contains("warning alert"));

        // 1.2: a warning is ignored; a fatal alert ends the session.
        let (mut a, mut b) = mirrored(TlsVersion::Tls12, TlsAead::Aes256Gcm).await;
        inject(&mut a, CT_ALERT, &[LEVEL_WARNING, 42]).await;
        a.write_all(b"!").await.unwrap();
        a.flush().await.unwrap();
        expect(&mut b, b"carried!").await;
        inject(&mut a, CT_ALERT, &[LEVEL_FATAL, 40]).await;
        assert!(read_err(&mut b)
            .await
            .to_string()
            .contains("fatal alert 40"));
        assert!(b.write_all(b"x").await.is_err());

        // close_notify: EOF, and later records are ignored.
        let (mut a, mut b) = mirrored(TlsVersion::Tls13, TlsAead::Aes128Gcm).await;
        expect(&mut b, b"carried").await;
        a.shutdown().await.unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(b.read(&mut buf).await.unwrap(), 0);
        assert!(!b.is_silent() && b.refusal().is_some());
    }

    #[tokio::test]
    async fn malformed_records_are_fatal() {
        // Longer than the version allows.
        let (mut a, mut b) = mirrored(TlsVersion::Tls13, TlsAead::Aes128Gcm).await;
        expect(&mut b, b"carried").await;
        let mut big = record_header(CT_APPLICATION_DATA, MAX_CIPHER_13 + 1).to_vec();
        big.resize(HEADER_LEN + MAX_CIPHER_13 + 1, 0);
        a.tcp.write_all(&big).await.unwrap();
        assert!(read_err(&mut b).await.to_string().contains("too long"));

        // An unencrypted record after a 1.3 handshake (e.g. change_cipher_spec).
        let (mut a, mut b) = mirrored(TlsVersion::Tls13, TlsAead::Aes128Gcm).await;
        expect(&mut b, b"carried").await;
        a.tcp
            .write_all(&[CT_CHANGE_CIPHER_SPEC, 3, 3, 0, 1, 1])
            .await
            .unwrap();
        assert!(read_err(&mut b).await.to_string().contains("unencrypted"));

        // A KeyUpdate with data after it in the same record.
        let (mut a, mut b) = mirrored(TlsVersion::Tls13, TlsAead::Aes256Gcm).await;
        expect(&mut b, b"carried").await;
        inject(
            &mut a,
            CT_HANDSHAKE,
            &[HS_KEY_UPDATE, 0, 0, 1, 0, HS_KEY_UPDATE, 0, 0, 1, 0],
        )
        .await;
        assert!(read_err(&mut b)
            .await
            .to_string()
            .contains("after KeyUpdate"));

        // EOF inside a record, without close_notify.
        let (mut a, mut b) = mirrored(TlsVersion::Tls12, TlsAead::Chacha20Poly1305).await;
        expect(&mut b, b"carried").await;
        a.tcp
            .write_all(&[CT_APPLICATION_DATA, 3, 3, 0, 40, 1, 2])
            .await
            .unwrap();
        a.tcp.shutdown().await.unwrap();
        assert_eq!(read_err(&mut b).await.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn freeze_completes_a_partial_record_and_keeps_plaintext() {
        let (mut a, b) = mirrored(TlsVersion::Tls13, TlsAead::Aes128Gcm).await;
        a.write_all(b"whole").await.unwrap();
        a.flush().await.unwrap();
        // b's carried plaintext stays unread, and a record arrives in two
        // halves around the freeze.
        let start = a.out.len();
        a.seal_record(CT_APPLICATION_DATA, b"split").unwrap();
        let wire = a.out[start..].to_vec();
        a.out.truncate(start);
        a.tcp.write_all(&wire[..4]).await.unwrap();
        // Into b's buffer: `whole`'s record (27 bytes) and 4 of the next.
        let mut b = Box::new(b);
        while b.in_end - b.in_start < 27 + 4 {
            let n = std::future::poll_fn(|cx| b.poll_fill(cx, MAX_RECORD))
                .await
                .unwrap();
            assert!(n > 0);
        }
        let (b_back, why) = match b.freeze(Duration::from_millis(30)).await {
            Ok(_) => panic!("froze inside a record"),
            Err(back) => back,
        };
        assert!(why.contains("in time"), "{why}");
        b = b_back;
        a.tcp.write_all(&wire[4..]).await.unwrap();
        let (tcp, state, pending) = b.freeze(WAIT).await.map_err(|(_, w)| w).unwrap();
        assert_eq!(pending, b"carriedwholesplit");
        let mut c = ContinuedTls::new(tcp, &state, pending).unwrap();
        expect(&mut c, b"carriedwholesplit").await;
        a.write_all(b"more").await.unwrap();
        a.flush().await.unwrap();
        expect(&mut c, b"more").await;
    }
}
