//! The few typed messages the proxy itself reads or writes.
//!
//! Writing goes through pgwire's message types. Reading does not: pgwire's
//! decoders use `Buf::get_*`, which panic on a truncated body, and decode
//! strings lossily, so the messages the proxy reads from the network are
//! parsed here with bounds-checked readers that return errors.
//! Forwarded messages are never decoded at all.

use bytes::{Bytes, BytesMut};
use pgwire::messages::extendedquery::{Bind, Describe, Execute, Parse, Sync};
use pgwire::messages::response::{ErrorResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::simplequery::Query;
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, Password,
    SASLInitialResponse, SASLResponse, SecretKey,
};
use pgwire::messages::terminate::Terminate;
use pgwire::messages::Message;
use thiserror::Error;

use crate::frame::{FrameError, HEADER_LEN};

/// Message type bytes the proxy looks at.
pub mod tag {
    // Frontend.
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const SYNC: u8 = b'S';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const PASSWORD: u8 = b'p';
    pub const TERMINATE: u8 = b'X';
    pub const COPY_DONE: u8 = b'c';
    pub const COPY_FAIL: u8 = b'f';
    pub const COPY_DATA: u8 = b'd';
    pub const BIND: u8 = b'B';
    pub const CLOSE: u8 = b'C';
    pub const DESCRIBE: u8 = b'D';
    pub const EXECUTE: u8 = b'E';
    pub const FLUSH: u8 = b'H';
    // Backend.
    pub const AUTHENTICATION: u8 = b'R';
    pub const PARAMETER_STATUS: u8 = b'S';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const DATA_ROW: u8 = b'D';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const COPY_IN_RESPONSE: u8 = b'G';
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const BIND_COMPLETE: u8 = b'2';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const NO_DATA: u8 = b'n';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    pub const PORTAL_SUSPENDED: u8 = b's';
    pub const NOTIFICATION_RESPONSE: u8 = b'A';
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("malformed {what} message: {why}")]
    Malformed {
        what: &'static str,
        why: &'static str,
    },
    #[error("unexpected message type {0:?}")]
    UnexpectedTag(char),
}

#[derive(Debug, Error)]
#[error("cannot encode message: {0}")]
pub struct EncodeError(String);

impl EncodeError {
    pub(crate) fn new(why: &str) -> Self {
        Self(why.to_owned())
    }
}

pub(crate) fn enc<M: Message>(m: &M, buf: &mut BytesMut) -> Result<(), EncodeError> {
    m.encode(buf).map_err(|e| EncodeError(e.to_string()))
}

/// One complete message taken off a control-path buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    pub tag: u8,
    pub body: Bytes,
}

/// Takes one complete message off the front of `buf`, if it holds one.
/// For the control path (startup, authentication); the forwarder does
/// not use it.
pub fn take_message(buf: &mut BytesMut, max_len: u32) -> Result<Option<RawMessage>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::InvalidLength { tag, len });
    }
    if len > max_len {
        return Err(FrameError::TooLong {
            tag,
            len,
            max: max_len,
        });
    }
    let total = len as usize + 1;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    let body = frame.split_off(HEADER_LEN).freeze();
    Ok(Some(RawMessage { tag, body }))
}

/// Bounds-checked reader over a message body.
#[derive(Debug, Clone)]
pub struct BodyReader<'a> {
    what: &'static str,
    rest: &'a [u8],
}

impl<'a> BodyReader<'a> {
    pub fn new(what: &'static str, body: &'a [u8]) -> Self {
        Self { what, rest: body }
    }

    fn err(&self, why: &'static str) -> DecodeError {
        DecodeError::Malformed {
            what: self.what,
            why,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self.rest.split_first().ok_or(self.err("truncated"))?;
        self.rest = rest;
        Ok(b)
    }

    pub fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, DecodeError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(self.err("truncated"));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    pub fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        let nul = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(self.err("missing string terminator"))?;
        let s = std::str::from_utf8(&self.rest[..nul]).map_err(|_| self.err("invalid UTF-8"))?;
        self.rest = &self.rest[nul + 1..];
        Ok(s)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }
}

/// An Authentication request from a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    CleartextPassword,
    Md5Password {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue {
        data: Bytes,
    },
    SaslFinal {
        data: Bytes,
    },
    /// Kerberos, GSS, SSPI ...: not something the proxy can answer.
    Unsupported(i32),
}

impl AuthRequest {
    pub fn decode(body: &Bytes) -> Result<Self, DecodeError> {
        let mut r = BodyReader::new("Authentication", body);
        let code = r.i32()?;
        Ok(match code {
            0 => AuthRequest::Ok,
            3 => AuthRequest::CleartextPassword,
            5 => {
                let s = r.bytes(4)?;
                AuthRequest::Md5Password {
                    salt: [s[0], s[1], s[2], s[3]],
                }
            }
            10 => {
                let mut mechanisms = Vec::new();
                loop {
                    let m = r.cstr()?;
                    if m.is_empty() {
                        break;
                    }
                    mechanisms.push(m.to_owned());
                }
                AuthRequest::Sasl { mechanisms }
            }
            11 => AuthRequest::SaslContinue {
                data: body.slice(4..),
            },
            12 => AuthRequest::SaslFinal {
                data: body.slice(4..),
            },
            other => AuthRequest::Unsupported(other),
        })
    }
}

/// The fields of an ErrorResponse or NoticeResponse.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    pub fields: Vec<(u8, String)>,
}

impl ErrorFields {
    pub fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let mut r = BodyReader::new("ErrorResponse", body);
        let mut fields = Vec::new();
        loop {
            let code = r.u8()?;
            if code == 0 {
                return Ok(Self { fields });
            }
            // Server messages may be in a non-UTF-8 encoding before the
            // client_encoding is known; keep them readable, not fatal.
            let nul = r
                .rest
                .iter()
                .position(|&b| b == 0)
                .ok_or(r.err("missing string terminator"))?;
            let value = String::from_utf8_lossy(&r.rest[..nul]).into_owned();
            r.rest = &r.rest[nul + 1..];
            fields.push((code, value));
        }
    }

    pub fn get(&self, code: u8) -> Option<&str> {
        self.fields
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_str())
    }

    /// FATAL or PANIC: the server ends the session after sending it.
    /// (`V` is the untranslated severity; servers before 9.6 send only `S`.)
    pub fn ends_session(&self) -> bool {
        matches!(
            self.get(b'V').or_else(|| self.get(b'S')),
            Some("FATAL" | "PANIC")
        )
    }

    pub fn sqlstate(&self) -> Option<&str> {
        self.get(b'C')
    }

    pub fn message(&self) -> Option<&str> {
        self.get(b'M')
    }
}

pub fn decode_parameter_status(body: &[u8]) -> Result<(String, String), DecodeError> {
    let mut r = BodyReader::new("ParameterStatus", body);
    let name = r.cstr()?.to_owned();
    let value = r.cstr()?.to_owned();
    Ok((name, value))
}

/// BackendKeyData: a 4-byte secret in protocol 3.0, up to 256 bytes in
/// 3.2 (its length is what the message length leaves).
pub fn decode_backend_key_data(body: &[u8]) -> Result<crate::CancelKey, DecodeError> {
    let mut r = BodyReader::new("BackendKeyData", body);
    let pid = r.i32()?;
    let secret = body
        .get(4..)
        .and_then(crate::startup::CancelSecret::from_bytes)
        .ok_or(DecodeError::Malformed {
            what: "BackendKeyData",
            why: "secret must have 4 to 256 bytes",
        })?;
    Ok(crate::CancelKey { pid, secret })
}

/// NegotiateProtocolVersion: the newest protocol the server speaks (the
/// whole number, as PostgreSQL sends it) and the options it did not know.
pub fn decode_negotiate_protocol_version(body: &[u8]) -> Result<(u32, Vec<String>), DecodeError> {
    let mut r = BodyReader::new("NegotiateProtocolVersion", body);
    let newest = r.i32()? as u32;
    let count = r.i32()?;
    let mut options = Vec::new();
    for _ in 0..count.max(0) {
        options.push(r.cstr()?.to_owned());
    }
    if !r.is_empty() {
        return Err(DecodeError::Malformed {
            what: "NegotiateProtocolVersion",
            why: "bytes after the option names",
        });
    }
    Ok((newest, options))
}

pub fn decode_ready_for_query(body: &[u8]) -> Result<u8, DecodeError> {
    match body {
        [s @ (b'I' | b'T' | b'E')] => Ok(*s),
        _ => Err(DecodeError::Malformed {
            what: "ReadyForQuery",
            why: "status must be one of I, T, E",
        }),
    }
}

/// Column names of a RowDescription.
pub fn decode_row_description(body: &[u8]) -> Result<Vec<String>, DecodeError> {
    let mut r = BodyReader::new("RowDescription", body);
    let n = r.i16()?;
    let mut names = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        names.push(r.cstr()?.to_owned());
        r.bytes(18)?; // table oid, column, type oid, size, modifier, format
    }
    Ok(names)
}

/// Column values of a DataRow (text format); `None` is SQL NULL.
pub fn decode_data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, DecodeError> {
    let mut r = BodyReader::new("DataRow", body);
    let n = r.i16()?;
    let mut cols = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = r.i32()?;
        cols.push(if len < 0 {
            None
        } else {
            Some(r.bytes(len as usize)?)
        });
    }
    Ok(cols)
}

pub fn decode_command_complete(body: &[u8]) -> Result<&str, DecodeError> {
    let mut r = BodyReader::new("CommandComplete", body);
    r.cstr()
}

// ---- Encoders (pgwire) --------------------------------------------------

/// Severity of an ErrorResponse the proxy writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

pub fn encode_error_response(
    buf: &mut BytesMut,
    severity: Severity,
    sqlstate: &str,
    message: &str,
) -> Result<(), EncodeError> {
    let fields = vec![
        (b'S', severity.as_str().to_owned()),
        (b'V', severity.as_str().to_owned()),
        (b'C', sqlstate.to_owned()),
        (b'M', message.to_owned()),
    ];
    enc(&ErrorResponse::new(fields), buf)
}

/// Re-encodes fields read from a backend (used when the proxy relays a
/// backend's startup error after reading it).
pub fn encode_error_fields(buf: &mut BytesMut, fields: &ErrorFields) -> Result<(), EncodeError> {
    enc(&ErrorResponse::new(fields.fields.clone()), buf)
}

pub fn encode_auth_ok(buf: &mut BytesMut) -> Result<(), EncodeError> {
    enc(&Authentication::Ok, buf)
}

pub fn encode_auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) -> Result<(), EncodeError> {
    let m = mechanisms.iter().map(|s| (*s).to_owned()).collect();
    enc(&Authentication::SASL(m), buf)
}

pub fn encode_auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) -> Result<(), EncodeError> {
    enc(
        &Authentication::SASLContinue(Bytes::copy_from_slice(data)),
        buf,
    )
}

pub fn encode_auth_sasl_final(buf: &mut BytesMut, data: &[u8]) -> Result<(), EncodeError> {
    enc(
        &Authentication::SASLFinal(Bytes::copy_from_slice(data)),
        buf,
    )
}

pub fn encode_parameter_status(
    buf: &mut BytesMut,
    name: &str,
    value: &str,
) -> Result<(), EncodeError> {
    enc(
        &ParameterStatus::new(name.to_owned(), value.to_owned()),
        buf,
    )
}

pub fn encode_backend_key_data(
    buf: &mut BytesMut,
    key: &crate::CancelKey,
) -> Result<(), EncodeError> {
    let secret = match key.secret.as_bytes() {
        b @ [_, _, _, _] => SecretKey::I32(i32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        b => SecretKey::Bytes(Bytes::copy_from_slice(b)),
    };
    enc(&BackendKeyData::new(key.pid, secret), buf)
}

pub fn encode_ready_for_query(buf: &mut BytesMut, status: u8) -> Result<(), EncodeError> {
    let status = match status {
        b'T' => TransactionStatus::Transaction,
        b'E' => TransactionStatus::Error,
        _ => TransactionStatus::Idle,
    };
    enc(&ReadyForQuery::new(status), buf)
}

/// `newest` is the whole protocol number (`PROTOCOL_3_0`), as PostgreSQL
/// sends it and libpq reads it, although the protocol chapter speaks of
/// the minor version.
pub fn encode_negotiate_protocol_version(
    buf: &mut BytesMut,
    newest: u32,
    unsupported: &[String],
) -> Result<(), EncodeError> {
    enc(
        &NegotiateProtocolVersion::new(newest as i32, unsupported.to_vec()),
        buf,
    )
}

pub fn encode_password(buf: &mut BytesMut, password: &str) -> Result<(), EncodeError> {
    enc(&Password::new(password.to_owned()), buf)
}

pub fn encode_sasl_initial_response(
    buf: &mut BytesMut,
    mechanism: &str,
    data: &[u8],
) -> Result<(), EncodeError> {
    enc(
        &SASLInitialResponse::new(mechanism.to_owned(), Some(Bytes::copy_from_slice(data))),
        buf,
    )
}

pub fn encode_sasl_response(buf: &mut BytesMut, data: &[u8]) -> Result<(), EncodeError> {
    enc(&SASLResponse::new(Bytes::copy_from_slice(data)), buf)
}

pub fn encode_query(buf: &mut BytesMut, sql: &str) -> Result<(), EncodeError> {
    enc(&Query::new(sql.to_owned()), buf)
}

pub fn encode_parse(
    buf: &mut BytesMut,
    name: &str,
    sql: &str,
    param_types: &[u32],
) -> Result<(), EncodeError> {
    let name = (!name.is_empty()).then(|| name.to_owned());
    enc(&Parse::new(name, sql.to_owned(), param_types.to_vec()), buf)
}

/// Which object a Describe asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DescribeTarget {
    Statement,
    Portal,
}

/// Bind of `statement` to `portal` (empty: the unnamed ones) with
/// `params` in text format (`None`: NULL); results in text format.
pub fn encode_bind(
    buf: &mut BytesMut,
    portal: &str,
    statement: &str,
    params: &[Option<&[u8]>],
) -> Result<(), EncodeError> {
    // The count goes on the wire as an Int16, which PostgreSQL reads unsigned.
    if params.len() > usize::from(u16::MAX) {
        return Err(EncodeError(format!(
            "{} parameters; a Bind carries at most {}",
            params.len(),
            u16::MAX
        )));
    }
    if params.iter().flatten().any(|p| p.len() > i32::MAX as usize) {
        return Err(EncodeError("a parameter longer than 2 GiB".into()));
    }
    let name = |n: &str| (!n.is_empty()).then(|| n.to_owned());
    let values = params
        .iter()
        .map(|p| p.map(Bytes::copy_from_slice))
        .collect();
    enc(
        &Bind::new(
            name(portal),
            name(statement),
            Vec::new(),
            values,
            Vec::new(),
        ),
        buf,
    )
}

pub fn encode_describe(
    buf: &mut BytesMut,
    target: DescribeTarget,
    name: &str,
) -> Result<(), EncodeError> {
    let kind = match target {
        DescribeTarget::Statement => b'S',
        DescribeTarget::Portal => b'P',
    };
    let name = (!name.is_empty()).then(|| name.to_owned());
    enc(&Describe::new(kind, name), buf)
}

/// Execute of `portal` (empty: the unnamed one), returning at most
/// `max_rows` rows (0: all).
pub fn encode_execute(buf: &mut BytesMut, portal: &str, max_rows: u32) -> Result<(), EncodeError> {
    let max_rows = i32::try_from(max_rows)
        .map_err(|_| EncodeError(format!("max_rows {max_rows} is above {}", i32::MAX)))?;
    let portal = (!portal.is_empty()).then(|| portal.to_owned());
    enc(&Execute::new(portal, max_rows), buf)
}

pub fn encode_sync(buf: &mut BytesMut) -> Result<(), EncodeError> {
    enc(&Sync::new(), buf)
}

pub fn encode_terminate(buf: &mut BytesMut) -> Result<(), EncodeError> {
    enc(&Terminate::new(), buf)
}

/// SASLInitialResponse from a client: mechanism and data.
pub fn decode_sasl_initial_response(body: &[u8]) -> Result<(String, Vec<u8>), DecodeError> {
    let mut r = BodyReader::new("SASLInitialResponse", body);
    let mechanism = r.cstr()?.to_owned();
    let len = r.i32()?;
    let data = if len < 0 {
        Vec::new()
    } else {
        r.bytes(len as usize)?.to_vec()
    };
    if !r.is_empty() {
        return Err(DecodeError::Malformed {
            what: "SASLInitialResponse",
            why: "trailing bytes",
        });
    }
    Ok((mechanism, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::startup::CancelSecret;
    use crate::CancelKey;

    fn take(buf: &mut BytesMut) -> RawMessage {
        take_message(buf, 1 << 20).unwrap().unwrap()
    }

    #[test]
    fn encoders_round_trip_through_decoders() {
        let mut buf = BytesMut::new();
        encode_error_response(&mut buf, Severity::Fatal, "28P01", "bad").unwrap();
        encode_parameter_status(&mut buf, "server_version", "15.4").unwrap();
        let key = CancelKey {
            pid: 9,
            secret: CancelSecret::from_i32(-3),
        };
        encode_backend_key_data(&mut buf, &key).unwrap();
        let long = CancelKey {
            pid: 10,
            secret: CancelSecret::from_bytes(&[0xab; 32]).unwrap(),
        };
        encode_backend_key_data(&mut buf, &long).unwrap();
        encode_ready_for_query(&mut buf, b'T').unwrap();
        encode_auth_sasl(&mut buf, &["SCRAM-SHA-256"]).unwrap();
        encode_auth_sasl_final(&mut buf, b"v=xyz").unwrap();
        encode_sasl_initial_response(&mut buf, "SCRAM-SHA-256", b"n,,n=,r=abc").unwrap();

        let m = take(&mut buf);
        assert_eq!(m.tag, tag::ERROR_RESPONSE);
        let f = ErrorFields::decode(&m.body).unwrap();
        assert_eq!(f.sqlstate(), Some("28P01"));
        assert_eq!(f.message(), Some("bad"));
        assert_eq!(f.get(b'S'), Some("FATAL"));
        let m = take(&mut buf);
        assert_eq!(
            decode_parameter_status(&m.body).unwrap(),
            ("server_version".into(), "15.4".into())
        );
        assert_eq!(decode_backend_key_data(&take(&mut buf).body).unwrap(), key);
        let m = take(&mut buf);
        assert_eq!(m.body.len(), 4 + 32);
        assert_eq!(decode_backend_key_data(&m.body).unwrap(), long);
        assert_eq!(decode_ready_for_query(&take(&mut buf).body).unwrap(), b'T');
        assert_eq!(
            AuthRequest::decode(&take(&mut buf).body).unwrap(),
            AuthRequest::Sasl {
                mechanisms: vec!["SCRAM-SHA-256".into()]
            }
        );
        assert_eq!(
            AuthRequest::decode(&take(&mut buf).body).unwrap(),
            AuthRequest::SaslFinal {
                data: Bytes::from_static(b"v=xyz")
            }
        );
        let m = take(&mut buf);
        assert_eq!(m.tag, tag::PASSWORD);
        assert_eq!(
            decode_sasl_initial_response(&m.body).unwrap(),
            ("SCRAM-SHA-256".to_owned(), b"n,,n=,r=abc".to_vec())
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn extended_query_messages_have_the_protocol_layout() {
        let mut buf = BytesMut::new();
        encode_parse(&mut buf, "", "SELECT $1, $2", &[]).unwrap();
        encode_bind(&mut buf, "", "", &[Some(b"bob"), None]).unwrap();
        encode_describe(&mut buf, DescribeTarget::Portal, "").unwrap();
        encode_describe(&mut buf, DescribeTarget::Statement, "s1").unwrap();
        encode_execute(&mut buf, "", 2).unwrap();
        encode_bind(&mut buf, "p1", "s1", &[]).unwrap();
        encode_execute(&mut buf, "p1", 0).unwrap();
        encode_sync(&mut buf).unwrap();

        let m = take(&mut buf);
        assert_eq!(m.tag, tag::PARSE);
        assert_eq!(&m.body[..], b"\0SELECT $1, $2\0\0\0");
        let m = take(&mut buf);
        assert_eq!(m.tag, tag::BIND);
        let mut want = b"\0\0".to_vec(); // unnamed portal and statement
        want.extend_from_slice(&0i16.to_be_bytes()); // parameter formats: all text
        want.extend_from_slice(&2i16.to_be_bytes());
        want.extend_from_slice(&3i32.to_be_bytes());
        want.extend_from_slice(b"bob");
        want.extend_from_slice(&(-1i32).to_be_bytes()); // NULL
        want.extend_from_slice(&0i16.to_be_bytes()); // result formats: all text
        assert_eq!(&m.body[..], &want[..]);
        let m = take(&mut buf);
        assert_eq!((m.tag, &m.body[..]), (tag::DESCRIBE, &b"P\0"[..]));
        let m = take(&mut buf);
        assert_eq!((m.tag, &m.body[..]), (tag::DESCRIBE, &b"Ss1\0"[..]));
        let m = take(&mut buf);
        assert_eq!(m.tag, tag::EXECUTE);
        assert_eq!(&m.body[..], b"\0\0\0\0\x02");
        let m = take(&mut buf);
        assert_eq!(m.tag, tag::BIND);
        assert_eq!(&m.body[..], b"p1\0s1\0\0\0\0\0\0\0");
        let m = take(&mut buf);
        assert_eq!((m.tag, &m.body[..]), (tag::EXECUTE, &b"p1\0\0\0\0\0"[..]));
        let m = take(&mut buf);
        assert_eq!((m.tag, m.body.len()), (tag::SYNC, 0));
        assert!(buf.is_empty());
    }

    #[test]
    fn extended_query_encoders_refuse_what_the_protocol_cannot_carry() {
        let mut buf = BytesMut::new();
        let many = vec![None; usize::from(u16::MAX) + 1];
        assert!(encode_bind(&mut buf, "", "", &many).is_err());
        assert!(encode_execute(&mut buf, "", u32::MAX).is_err());
        assert!(buf.is_empty(), "nothing half-written");
        // The most a Bind may carry still goes.
        encode_bind(&mut buf, "", "", &many[1..]).unwrap();
        let m = take(&mut buf);
        assert_eq!(&m.body[4..6], &u16::MAX.to_be_bytes());
    }

    #[test]
    fn take_message_waits_for_whole_message() {
        let mut full = BytesMut::new();
        encode_query(&mut full, "select 1").unwrap();
        let bytes = full.clone();
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let got = take_message(&mut buf, 1 << 20).unwrap();
            assert_eq!(got.is_some(), i == bytes.len() - 1);
        }
    }

    #[test]
    fn decoders_reject_truncation_without_panicking() {
        let mut buf = BytesMut::new();
        encode_error_response(&mut buf, Severity::Error, "42000", "m").unwrap();
        encode_parameter_status(&mut buf, "a", "b").unwrap();
        encode_backend_key_data(
            &mut buf,
            &CancelKey {
                pid: 1,
                secret: CancelSecret::from_i32(2),
            },
        )
        .unwrap();
        encode_auth_sasl(&mut buf, &["SCRAM-SHA-256"]).unwrap();
        let mut msgs = Vec::new();
        while let Some(m) = take_message(&mut buf, 1 << 20).unwrap() {
            msgs.push(m);
        }
        for m in msgs {
            for cut in 0..m.body.len() {
                let body = m.body.slice(..cut);
                assert!(ErrorFields::decode(&body).is_err() || m.tag != tag::ERROR_RESPONSE);
                let _ = decode_parameter_status(&body);
                let _ = decode_backend_key_data(&body);
                let _ = AuthRequest::decode(&body);
                let _ = decode_row_description(&body);
                let _ = decode_data_row(&body);
                let _ = decode_sasl_initial_response(&body);
            }
        }
        assert!(decode_ready_for_query(b"X").is_err());
        assert!(decode_data_row(&[0, 1, 0x7f, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn data_row_and_row_description() {
        let mut body = vec![0, 2];
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            decode_data_row(&body).unwrap(),
            vec![Some(&b"abc"[..]), None]
        );
        let mut rd = vec![0, 1];
        rd.extend_from_slice(b"name\0");
        rd.extend_from_slice(&[0u8; 18]);
        assert_eq!(
            decode_row_description(&rd).unwrap(),
            vec!["name".to_owned()]
        );
    }

    #[test]
    fn negotiate_protocol_version_carries_the_whole_version() {
        let mut buf = BytesMut::new();
        encode_negotiate_protocol_version(
            &mut buf,
            crate::startup::PROTOCOL_3_0,
            &["_pq_.x".to_owned()],
        )
        .unwrap();
        let m = take_message(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(m.tag, tag::NEGOTIATE_PROTOCOL_VERSION);
        // 3.0 as libpq reads it (major in the high half), not "0".
        assert_eq!(&m.body[..4], &[0, 3, 0, 0]);
        assert_eq!(&m.body[4..8], &1u32.to_be_bytes());
        assert_eq!(&m.body[8..], b"_pq_.x\0");
        assert_eq!(
            decode_negotiate_protocol_version(&m.body).unwrap(),
            (crate::startup::PROTOCOL_3_0, vec!["_pq_.x".to_owned()])
        );
        assert!(decode_negotiate_protocol_version(&m.body[..9]).is_err());
    }

    #[test]
    fn fatal_and_panic_end_the_session() {
        let f = |sev: &str| ErrorFields {
            fields: vec![
                (b'S', sev.into()),
                (b'V', sev.into()),
                (b'C', "57P01".into()),
            ],
        };
        assert!(f("FATAL").ends_session());
        assert!(f("PANIC").ends_session());
        assert!(!f("ERROR").ends_session());
        // Translated S with the untranslated V: V decides.
        let mut translated = f("FATAL");
        translated.fields[0].1 = "FATAL (translated)".into();
        assert!(translated.ends_session());
    }
}
