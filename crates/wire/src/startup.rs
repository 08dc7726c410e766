//! The untagged packets a client may send first: StartupMessage,
//! SSLRequest, GSSENCRequest and CancelRequest.

use bytes::{BufMut, BytesMut};
use thiserror::Error;

/// PostgreSQL's limit for a startup packet (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_PACKET_LEN: usize = 10_000;

pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
pub const PROTOCOL_3_0: u32 = 196_608;
/// Protocol 3.2 (PostgreSQL 18): cancel keys of up to 256 bytes.
pub const PROTOCOL_3_2: u32 = 196_610;
/// PostgreSQL 18's limit for a cancel key's secret (3.0 keys have 4 bytes).
pub const MAX_CANCEL_SECRET_LEN: usize = 256;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StartupError {
    #[error("invalid startup packet length {0}")]
    InvalidLength(u32),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    /// PostgreSQL would take the last value and pgferry authenticates the
    /// first: a repeated `user` could log in as another role.
    #[error("startup packet repeats the parameter \"{0}\"")]
    DuplicateParameter(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    CancelRequest(CancelKey),
    Startup(StartupMessage),
}

/// A cancel key: the (process id, secret) pair of BackendKeyData.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: CancelSecret,
}

/// A cancel key's secret: 4 bytes in protocol 3.0, up to 256 in 3.2.
/// 3.0 secrets are kept inline (most sessions, and memory per idle
/// session matters); longer ones on the heap. The representation is
/// canonical (4 bytes is always `Short`), so the derived Eq and Hash
/// compare the bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CancelSecret(SecretRepr);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum SecretRepr {
    Short([u8; 4]),
    Long(Box<[u8]>),
}

impl CancelSecret {
    /// A secret of `bytes`, which must be 4..=256 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        match bytes.len() {
            4 => Some(Self(SecretRepr::Short([
                bytes[0], bytes[1], bytes[2], bytes[3],
            ]))),
            5..=MAX_CANCEL_SECRET_LEN => Some(Self(SecretRepr::Long(bytes.into()))),
            _ => None,
        }
    }

    /// A protocol 3.0 secret.
    pub fn from_i32(secret: i32) -> Self {
        Self(SecretRepr::Short(secret.to_be_bytes()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            SecretRepr::Short(b) => b,
            SecretRepr::Long(b) => b,
        }
    }

    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

impl CancelKey {
    /// The complete CancelRequest packet for this key: 12 + secret bytes.
    pub fn request_packet(&self) -> Vec<u8> {
        let secret = self.secret.as_bytes();
        let mut p = Vec::with_capacity(12 + secret.len());
        p.extend_from_slice(&(12 + secret.len() as u32).to_be_bytes());
        p.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        p.extend_from_slice(&self.pid.to_be_bytes());
        p.extend_from_slice(secret);
        p
    }
}

/// A protocol 3.x StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub minor_version: u16,
    /// Parameters in the order the client sent them (user, database,
    /// options, application_name, GUCs ...). `_pq_.` protocol options are
    /// kept apart in `protocol_options`.
    pub params: Vec<(String, String)>,
    pub protocol_options: Vec<String>,
}

impl StartupMessage {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn user(&self) -> &str {
        self.param("user").unwrap_or_default()
    }

    /// The database, defaulting to the user name as PostgreSQL does.
    pub fn database(&self) -> &str {
        match self.param("database") {
            Some(db) if !db.is_empty() => db,
            _ => self.user(),
        }
    }

    /// The whole protocol number of this session (`PROTOCOL_3_0` or
    /// `PROTOCOL_3_2`): after negotiation, `minor_version` is the version
    /// the session speaks, not what the client first asked for.
    pub fn protocol(&self) -> u32 {
        (3 << 16) | u32::from(self.minor_version)
    }

    /// Encodes a StartupMessage with the same parameters and protocol
    /// version, for the backend (protocol options are not passed on).
    pub fn encode_for_backend(&self, buf: &mut BytesMut) {
        self.encode_for_backend_with(buf, &[]);
    }

    /// Same, with `extra` parameters added at the end (a login credential
    /// that must not be kept in the message itself).
    pub fn encode_for_backend_with(&self, buf: &mut BytesMut, extra: &[(&str, &str)]) {
        let pairs = || {
            self.params
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .chain(extra.iter().copied())
        };
        let body_len: usize = 4 + pairs().map(|(k, v)| k.len() + v.len() + 2).sum::<usize>() + 1;
        buf.put_u32((body_len + 4) as u32);
        buf.put_u32(self.protocol());
        for (k, v) in pairs() {
            buf.put_slice(k.as_bytes());
            buf.put_u8(0);
            buf.put_slice(v.as_bytes());
            buf.put_u8(0);
        }
        buf.put_u8(0);
    }
}

/// Validates the 4-byte length prefix of a startup packet and returns how
/// many bytes follow it.
pub fn startup_body_len(prefix: [u8; 4]) -> Result<usize, StartupError> {
    let len = u32::from_be_bytes(prefix);
    // 8 = length + code: the smallest well-formed packet.
    if !(8..=MAX_STARTUP_PACKET_LEN as u32).contains(&len) {
        return Err(StartupError::InvalidLength(len));
    }
    Ok(len as usize - 4)
}

/// Parses what follows the length prefix.
pub fn parse_startup_body(body: &[u8]) -> Result<StartupPacket, StartupError> {
    let code_bytes: [u8; 4] = body
        .get(0..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(StartupError::Malformed("missing protocol code"))?;
    let code = u32::from_be_bytes(code_bytes);
    let rest = &body[4..];
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
            if !rest.is_empty() {
                return Err(StartupError::Malformed("trailing bytes after request code"));
            }
            Ok(if code == SSL_REQUEST_CODE {
                StartupPacket::SslRequest
            } else {
                StartupPacket::GssEncRequest
            })
        }
        CANCEL_REQUEST_CODE => {
            // 3.0 keys have 4 bytes of secret, 3.2 keys up to 256.
            let (pid, secret) = match rest.split_first_chunk::<4>() {
                Some((pid, secret)) => (i32::from_be_bytes(*pid), secret),
                None => return Err(StartupError::Malformed("cancel request without a key")),
            };
            let secret = CancelSecret::from_bytes(secret).ok_or(StartupError::Malformed(
                "cancel request secret must have 4 to 256 bytes",
            ))?;
            Ok(StartupPacket::CancelRequest(CancelKey { pid, secret }))
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol { major, minor });
            }
            parse_params(rest, minor).map(StartupPacket::Startup)
        }
    }
}

fn parse_params(mut rest: &[u8], minor_version: u16) -> Result<StartupMessage, StartupError> {
    let mut params = Vec::new();
    let mut protocol_options = Vec::new();
    loop {
        let key = take_cstr(&mut rest)?;
        if key.is_empty() {
            break;
        }
        let value = take_cstr(&mut rest)?;
        if params.iter().any(|(k, _): &(String, String)| k == key)
            || protocol_options.iter().any(|o: &String| o == key)
        {
            return Err(StartupError::DuplicateParameter(key.to_owned()));
        }
        if let Some(opt) = key.strip_prefix("_pq_.") {
            protocol_options.push(format!("_pq_.{opt}"));
        } else {
            params.push((key.to_owned(), value.to_owned()));
        }
    }
    if !rest.is_empty() {
        return Err(StartupError::Malformed("bytes after the final terminator"));
    }
    let msg = StartupMessage {
        minor_version,
        params,
        protocol_options,
    };
    if msg.user().is_empty() {
        return Err(StartupError::NoUser);
    }
    Ok(msg)
}

fn take_cstr<'a>(rest: &mut &'a [u8]) -> Result<&'a str, StartupError> {
    let nul = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or(StartupError::Malformed("missing string terminator"))?;
    let s = std::str::from_utf8(&rest[..nul])
        .map_err(|_| StartupError::Malformed("parameter is not valid UTF-8"))?;
    *rest = &rest[nul + 1..];
    Ok(s)
}

/// The 8-byte SSLRequest packet the proxy sends to a backend.
pub fn ssl_request_packet() -> [u8; 8] {
    let mut p = [0u8; 8];
    p[0..4].copy_from_slice(&8u32.to_be_bytes());
    p[4..8].copy_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn parses_startup_and_roundtrips() {
        let body = packet(
            PROTOCOL_3_0,
            b"user\0alice\0database\0shop\0application_name\0psql\0_pq_.x\0\x31\0\0",
        );
        let StartupPacket::Startup(m) = parse_startup_body(&body).unwrap() else {
            panic!("not a startup message")
        };
        assert_eq!(m.user(), "alice");
        assert_eq!(m.database(), "shop");
        assert_eq!(m.param("application_name"), Some("psql"));
        assert_eq!(m.protocol_options, vec!["_pq_.x".to_owned()]);
        let mut buf = BytesMut::new();
        m.encode_for_backend(&mut buf);
        let len = startup_body_len(buf[0..4].try_into().unwrap()).unwrap();
        assert_eq!(len, buf.len() - 4);
        let StartupPacket::Startup(again) = parse_startup_body(&buf[4..]).unwrap() else {
            panic!()
        };
        assert_eq!(again.params, m.params);
        assert!(again.protocol_options.is_empty());
    }

    #[test]
    fn database_defaults_to_user() {
        let body = packet(PROTOCOL_3_0, b"user\0bob\0\0");
        let StartupPacket::Startup(m) = parse_startup_body(&body).unwrap() else {
            panic!()
        };
        assert_eq!(m.database(), "bob");
    }

    #[test]
    fn special_requests() {
        assert_eq!(
            parse_startup_body(&packet(SSL_REQUEST_CODE, b"")),
            Ok(StartupPacket::SslRequest)
        );
        assert_eq!(
            parse_startup_body(&packet(GSSENC_REQUEST_CODE, b"")),
            Ok(StartupPacket::GssEncRequest)
        );
        let key = CancelKey {
            pid: 42,
            secret: CancelSecret::from_i32(-7),
        };
        let p = key.request_packet();
        assert_eq!(startup_body_len(p[0..4].try_into().unwrap()), Ok(12));
        assert_eq!(
            parse_startup_body(&p[4..]),
            Ok(StartupPacket::CancelRequest(key))
        );
        // Protocol 3.2's long keys: packet length 12 + secret length.
        for len in [5, 32, MAX_CANCEL_SECRET_LEN] {
            let secret: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let key = CancelKey {
                pid: 7,
                secret: CancelSecret::from_bytes(&secret).unwrap(),
            };
            let p = key.request_packet();
            assert_eq!(p.len(), 12 + len);
            assert_eq!(startup_body_len(p[0..4].try_into().unwrap()), Ok(8 + len));
            assert_eq!(
                parse_startup_body(&p[4..]),
                Ok(StartupPacket::CancelRequest(key))
            );
        }
        // The same four bytes make the same key however they were built.
        assert_eq!(
            CancelSecret::from_bytes(&(-7i32).to_be_bytes()),
            Some(CancelSecret::from_i32(-7))
        );
    }

    #[test]
    fn rejects_bad_packets() {
        assert_eq!(
            startup_body_len(4u32.to_be_bytes()),
            Err(StartupError::InvalidLength(4))
        );
        assert!(startup_body_len(0x7fff_ffffu32.to_be_bytes()).is_err());
        assert!(startup_body_len(10_001u32.to_be_bytes()).is_err());
        assert_eq!(startup_body_len(10_000u32.to_be_bytes()), Ok(9_996));
        assert!(matches!(
            parse_startup_body(&packet(0x0002_0000, b"")),
            Err(StartupError::UnsupportedProtocol { major: 2, .. })
        ));
        assert_eq!(
            parse_startup_body(&packet(PROTOCOL_3_0, b"database\0x\0\0")),
            Err(StartupError::NoUser)
        );
        assert!(parse_startup_body(&packet(PROTOCOL_3_0, b"user\0x")).is_err());
        assert!(parse_startup_body(&packet(PROTOCOL_3_0, b"user\0x\0\0junk")).is_err());
        assert!(parse_startup_body(&packet(CANCEL_REQUEST_CODE, b"1234")).is_err());
        assert!(parse_startup_body(&packet(CANCEL_REQUEST_CODE, b"1234567")).is_err());
        assert!(parse_startup_body(&packet(CANCEL_REQUEST_CODE, &[1; 4 + 257])).is_err());
        for twice in [
            &b"user\0app\0database\0app\0user\0postgres\0\0"[..],
            b"user\0app\0database\0app\0database\0postgres\0\0",
            b"user\0app\0_pq_.x\0\x31\0_pq_.x\0\x31\0\0",
        ] {
            assert!(matches!(
                parse_startup_body(&packet(PROTOCOL_3_0, twice)),
                Err(StartupError::DuplicateParameter(_))
            ));
        }
        assert!(parse_startup_body(&[1, 2]).is_err());
        // Never panics on arbitrary bytes.
        let mut seed = 0x1234_5678u32;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    (seed & 0xff) as u8
                })
                .collect();
            let _ = parse_startup_body(&bytes);
        }
    }
}
