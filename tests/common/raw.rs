//! A frontend that speaks the protocol message by message, for the cases
//! where what matters is exactly which messages are sent when (an unsynced
//! pipeline, a Terminate, a startup asking for protocol 3.2) and which
//! bytes come back (BackendKeyData, NegotiateProtocolVersion). It talks to
//! the real pgferry and, through it, real PostgreSQL servers; drivers are
//! proven in the driver matrix.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

pub const PROTOCOL_3_0: u32 = 196_608;
pub const PROTOCOL_3_2: u32 = 196_610;

/// One backend message: its tag and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// The SQLSTATE of an ErrorResponse or NoticeResponse.
    pub fn sqlstate(&self) -> Option<String> {
        self.field(b'C')
    }

    pub fn field(&self, code: u8) -> Option<String> {
        let mut rest = &self.body[..];
        while let Some((&c, tail)) = rest.split_first() {
            if c == 0 {
                return None;
            }
            let nul = tail.iter().position(|&b| b == 0)?;
            if c == code {
                return Some(String::from_utf8_lossy(&tail[..nul]).into_owned());
            }
            rest = &tail[nul + 1..];
        }
        None
    }

    /// The first column of a DataRow, as text.
    pub fn first_column(&self) -> Option<String> {
        let len = i32::from_be_bytes(self.body.get(2..6)?.try_into().ok()?);
        let len = usize::try_from(len).ok()?;
        Some(String::from_utf8_lossy(self.body.get(6..6 + len)?).into_owned())
    }
}

pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// From BackendKeyData.
    pub pid: i32,
    /// The secret of a 4-byte (protocol 3.0) key; 0 for a longer one.
    pub secret: i32,
    /// The whole secret, as sent (32 bytes from pgferry for protocol 3.2).
    pub secret_bytes: Vec<u8>,
}

/// A frontend message.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cstr(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(s.as_bytes());
    v.push(0);
}

pub fn parse(name: &str, query: &str, oids: &[u32]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, query);
    b.extend_from_slice(&(oids.len() as u16).to_be_bytes());
    for o in oids {
        b.extend_from_slice(&o.to_be_bytes());
    }
    message(b'P', &b)
}

/// Bind of `statement` to the unnamed portal, text parameters, text results.
pub fn bind(statement: &str, params: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, "");
    cstr(&mut b, statement);
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&(params.len() as u16).to_be_bytes());
    for p in params {
        b.extend_from_slice(&(p.len() as i32).to_be_bytes());
        b.extend_from_slice(p.as_bytes());
    }
    b.extend_from_slice(&0u16.to_be_bytes());
    message(b'B', &b)
}

pub fn execute() -> Vec<u8> {
    message(b'E', b"\0\0\0\0\0")
}

pub fn sync() -> Vec<u8> {
    message(b'S', b"")
}

pub fn flush() -> Vec<u8> {
    message(b'H', b"")
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    message(b'Q', &b)
}

pub fn terminate() -> Vec<u8> {
    message(b'X', b"")
}

/// A StartupMessage with any protocol number and parameters.
pub fn startup_packet(protocol: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut b = protocol.to_be_bytes().to_vec();
    for (k, v) in params {
        cstr(&mut b, k);
        cstr(&mut b, v);
    }
    b.push(0);
    let mut p = (b.len() as u32 + 4).to_be_bytes().to_vec();
    p.extend_from_slice(&b);
    p
}

/// Reads one message from a raw socket (None at EOF), for exchanges that
/// never get as far as a login.
pub fn read_msg(s: &mut TcpStream) -> Option<Msg> {
    let mut header = [0u8; 5];
    s.read_exact(&mut header).ok()?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let mut body = vec![0u8; len.checked_sub(4)?];
    s.read_exact(&mut body).ok()?;
    Some(Msg {
        tag: header[0],
        body,
    })
}

/// A CancelRequest for (pid, secret), sent on its own connection.
pub fn send_cancel(addr: SocketAddr, pid: i32, secret: i32) {
    send_cancel_key(addr, pid, &secret.to_be_bytes());
}

/// A CancelRequest with a secret of any length (protocol 3.2: up to 256
/// bytes, the packet 12 + that long).
pub fn send_cancel_key(addr: SocketAddr, pid: i32, secret: &[u8]) {
    let mut p = (12 + secret.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(&80_877_102u32.to_be_bytes());
    p.extend_from_slice(&pid.to_be_bytes());
    p.extend_from_slice(secret);
    let mut s = TcpStream::connect(addr).expect("connect for cancel");
    s.write_all(&p).expect("send cancel");
    // The proxy closes the connection when it has dealt with it.
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let _ = s.read(&mut [0u8; 1]);
}

impl RawClient {
    /// Connects and logs in (SCRAM-SHA-256 over plaintext), up to the first
    /// ReadyForQuery.
    pub fn connect(addr: SocketAddr, user: &str, password: &str, db: &str, app: &str) -> Self {
        let packet = startup_packet(
            PROTOCOL_3_0,
            &[("user", user), ("database", db), ("application_name", app)],
        );
        let (c, _) = Self::connect_with(addr, &packet, password);
        c
    }

    /// Sends `startup` as is and logs in; also returns the messages that
    /// came before the authentication request (NegotiateProtocolVersion).
    pub fn connect_with(addr: SocketAddr, startup: &[u8], password: &str) -> (Self, Vec<Msg>) {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut c = RawClient {
            stream,
            buf: Vec::new(),
            pid: 0,
            secret: 0,
            secret_bytes: Vec::new(),
        };
        c.send(startup);
        let mut before_auth = Vec::new();
        let mut scram = None;
        loop {
            let m = c.recv();
            match m.tag {
                b'R' => {
                    let kind = i32::from_be_bytes(m.body[0..4].try_into().expect("auth kind"));
                    match kind {
                        0 => {}
                        10 => {
                            let s = ScramSha256::new(
                                password.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            let mut b = Vec::new();
                            cstr(&mut b, "SCRAM-SHA-256");
                            b.extend_from_slice(&(s.message().len() as i32).to_be_bytes());
                            b.extend_from_slice(s.message());
                            c.send(&message(b'p', &b));
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().expect("SASL continue before start");
                            s.update(&m.body[4..]).expect("server-first");
                            c.send(&message(b'p', s.message()));
                        }
                        12 => {
                            let s = scram.as_mut().expect("SASL final before start");
                            s.finish(&m.body[4..]).expect("server signature");
                        }
                        other => panic!("unexpected authentication request {other}"),
                    }
                }
                b'K' => {
                    c.pid = i32::from_be_bytes(m.body[0..4].try_into().expect("pid"));
                    c.secret_bytes = m.body[4..].to_vec();
                    c.secret = <[u8; 4]>::try_from(&m.body[4..]).map_or(0, i32::from_be_bytes);
                }
                b'Z' => return (c, before_auth),
                b'E' => panic!("login failed: {:?}", m.field(b'M')),
                b'S' | b'N' => {}
                _ if scram.is_none() => before_auth.push(m),
                other => panic!("unexpected message {:?} during login", other as char),
            }
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// The next message; panics on EOF.
    pub fn recv(&mut self) -> Msg {
        self.try_recv().expect("connection closed")
    }

    /// The next message, or None at EOF (or a reset).
    pub fn try_recv(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().ok()?) as usize;
                if self.buf.len() > len {
                    let body = self.buf[5..1 + len].to_vec();
                    let tag = self.buf[0];
                    self.buf.drain(..1 + len);
                    return Some(Msg { tag, body });
                }
            }
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Messages up to and including the next one tagged `tag`.
    pub fn recv_until(&mut self, tag: u8) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self.recv();
            let done = m.tag == tag;
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Runs a simple query; its messages up to ReadyForQuery.
    pub fn simple(&mut self, sql: &str) -> Vec<Msg> {
        self.send(&query(sql));
        self.recv_until(b'Z')
    }

    /// The first column of the first row of a simple query.
    pub fn value(&mut self, sql: &str) -> String {
        let msgs = self.simple(sql);
        if let Some(e) = msgs.iter().find(|m| m.tag == b'E') {
            panic!("{sql}: {:?}", e.field(b'M'));
        }
        msgs.iter()
            .find(|m| m.tag == b'D')
            .and_then(Msg::first_column)
            .unwrap_or_else(|| panic!("{sql}: no row"))
    }
}

/// The tags of `msgs`, as a string ("12CZ").
pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}
