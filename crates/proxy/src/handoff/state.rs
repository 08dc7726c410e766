//! What a session is, written down for the process that takes it over.
//!
//! One JSON document per session (`SESSION` frame), its two sockets beside
//! it as fds. The format is versioned apart from the channel's protocol:
//! `STATE_VERSION` is what this build writes and reads, and HELLO/WELCOME
//! agree on it before any session travels (docs/operations.md, "Restarting
//! pgferry itself", lists the versions). Field names are part of the
//! format: rename nothing without a new version.

use std::net::SocketAddr;
use std::time::SystemTime;

use pgferry_wire::{CancelKey, CancelSecret, StartupMessage};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::forwarder::careful::Deferred;
use crate::forwarder::tracker::TrackerCarry;
use crate::tls::handover::TlsState;

/// The state format this build writes, and the oldest and newest it reads.
pub const STATE_VERSION: u32 = 1;
pub const STATE_VERSIONS: (u32, u32) = (1, 1);

#[derive(Debug, Serialize, Deserialize)]
pub struct SessionState {
    /// `STATE_VERSION` of the writer (the one WELCOME chose).
    pub version: u32,
    pub id: Uuid,
    pub accepted_at: SystemTime,
    pub connected_at: SystemTime,
    pub peer: SocketAddr,
    pub startup: StartupCarry,
    pub credentials: CredentialsCarry,
    /// `TargetSessionAttrs::as_str`.
    pub attrs: String,
    /// The key the client holds (pgferry's own).
    pub client_key: KeyCarry,
    pub backend: BackendCarry,
    pub tracker: TrackerCarry,
    /// Client bytes read during the hold, not yet forwarded.
    #[serde(with = "b64")]
    pub held_from_client: Vec<u8>,
    /// Prepared statements the backend lacks (re-created before first use).
    pub deferred: Vec<DeferredCarry>,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    pub migrations: u32,
    /// The session's audit row, moved with it.
    pub audit: Option<pgferry_audit::HandedRow>,
    pub client_tls: Option<TlsState>,
    #[serde(with = "b64")]
    pub client_pending: Vec<u8>,
    pub server_tls: Option<TlsState>,
    #[serde(with = "b64")]
    pub server_pending: Vec<u8>,
    /// When the session stopped at its safe point in the old process
    /// (`monotonic_ns`): the new one measures the whole pause from it.
    pub paused_at_ns: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartupCarry {
    pub minor_version: u16,
    pub params: Vec<(String, String)>,
    pub protocol_options: Vec<String>,
}

impl From<&StartupMessage> for StartupCarry {
    fn from(m: &StartupMessage) -> Self {
        Self {
            minor_version: m.minor_version,
            params: m.params.clone(),
            protocol_options: m.protocol_options.clone(),
        }
    }
}

impl From<StartupCarry> for StartupMessage {
    fn from(c: StartupCarry) -> Self {
        Self {
            minor_version: c.minor_version,
            params: c.params,
            protocol_options: c.protocol_options,
        }
    }
}

/// How the session logs in to backends. A userlist password does not
/// travel: the new process has its own userlist. The SCRAM pass-through
/// key does (it exists only in memory), zeroized when dropped.
#[derive(Serialize, Deserialize)]
pub enum CredentialsCarry {
    Password,
    PassThrough {
        #[serde(with = "b64_secret")]
        client_key: Zeroizing<Vec<u8>>,
    },
}

impl std::fmt::Debug for CredentialsCarry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Password => "Password",
            Self::PassThrough { .. } => "PassThrough(..)",
        })
    }
}

/// A cancel key; its secret zeroized when dropped.
#[derive(Serialize, Deserialize)]
pub struct KeyCarry {
    pub pid: i32,
    #[serde(with = "b64_secret")]
    pub secret: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for KeyCarry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyCarry {{ pid: {}, .. }}", self.pid)
    }
}

impl From<&CancelKey> for KeyCarry {
    fn from(k: &CancelKey) -> Self {
        Self {
            pid: k.pid,
            secret: Zeroizing::new(k.secret.as_bytes().to_vec()),
        }
    }
}

impl KeyCarry {
    pub fn to_key(&self) -> Option<CancelKey> {
        Some(CancelKey {
            pid: self.pid,
            secret: CancelSecret::from_bytes(&self.secret)?,
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BackendCarry {
    /// The backend's name; the new process must have one by that name at
    /// the same address.
    pub name: String,
    pub address: String,
    /// The connected server's socket address.
    pub peer: SocketAddr,
    /// The server's own BackendKeyData.
    pub key: KeyCarry,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DeferredCarry {
    pub name: String,
    #[serde(with = "b64")]
    pub parse: Vec<u8>,
}

impl From<&Deferred> for DeferredCarry {
    fn from(d: &Deferred) -> Self {
        Self {
            name: d.name.clone(),
            parse: d.parse.to_vec(),
        }
    }
}

impl From<DeferredCarry> for Deferred {
    fn from(d: DeferredCarry) -> Self {
        Self {
            name: d.name,
            parse: d.parse.into_boxed_slice(),
        }
    }
}

/// Bytes as base64 text (JSON arrays of numbers would triple them).
mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

/// `b64` for secrets: the decoded copy is zeroized when dropped.
mod b64_secret {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};
    use zeroize::Zeroizing;

    pub fn serialize<S: Serializer>(v: &Zeroizing<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        let text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&v[..]));
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Zeroizing<Vec<u8>>, D::Error> {
        let text = Zeroizing::new(String::deserialize(d)?);
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(Zeroizing::new)
            .map_err(serde::de::Error::custom)
    }
}
