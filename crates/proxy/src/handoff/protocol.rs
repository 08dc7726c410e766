//! The frames on the hand-off socket and their order.
//!
//! ```text
//! new -> old  HELLO      protocol and state versions it speaks
//! old -> new  WELCOME    the versions chosen          | REFUSE {reason}
//! new         (health checks, as at any start)
//! new -> old  READY
//! old         (stops accepting, keeps its listening fds)
//! old -> new  LISTENERS  + fds [proxy, admin?]
//! new -> old  LISTENING  (the new process accepts from now on)
//! old -> new  SESSION    {state} + fds [client, server], each at its safe point
//! new -> old  ACK {id} | NACK {id, reason}
//! new -> old  CANCEL {req, key}   a cancel for a key the new one does not know
//! old -> new  CANCELLED {req, found}
//! old -> new  DONE {kept}  (the old process has nothing left to send)
//! ```
//! One frame is one JSON document in one SOCK_SEQPACKET message. Exactly one
//! process owns a session at any time: the old one touches a session it
//! sent again only on NACK, or at EOF without an ACK; the new one starts
//! no I/O on a session before its ACK is written (docs/handoff-design.md
//! 6.7).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::state::{KeyCarry, SessionState};

/// The channel protocol this build speaks (oldest, newest).
pub const PROTOCOL_VERSIONS: (u32, u32) = (1, 1);
pub const MAGIC: &str = "pgferry-handoff";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "frame", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Frame {
    Hello {
        magic: String,
        protocol: (u32, u32),
        state: (u32, u32),
        version: String,
        pid: u32,
    },
    Welcome {
        protocol: u32,
        state: u32,
        version: String,
        pid: u32,
    },
    Refuse {
        reason: String,
    },
    Ready,
    Listeners {
        proxy: SocketAddr,
        admin: Option<SocketAddr>,
    },
    Listening,
    Session {
        state: Box<SessionState>,
    },
    Ack {
        id: Uuid,
    },
    Nack {
        id: Uuid,
        reason: String,
    },
    Cancel {
        req: u64,
        key: KeyCarry,
    },
    Cancelled {
        req: u64,
        found: bool,
    },
    Done {
        kept: usize,
    },
}

impl Frame {
    pub fn encode(&self) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
        serde_json::to_vec(self)
            .map(zeroize::Zeroizing::new)
            .map_err(|e| format!("cannot encode a hand-off frame: {e}"))
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("bad hand-off frame: {e}"))
    }

    /// For log lines.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "HELLO",
            Frame::Welcome { .. } => "WELCOME",
            Frame::Refuse { .. } => "REFUSE",
            Frame::Ready => "READY",
            Frame::Listeners { .. } => "LISTENERS",
            Frame::Listening => "LISTENING",
            Frame::Session { .. } => "SESSION",
            Frame::Ack { .. } => "ACK",
            Frame::Nack { .. } => "NACK",
            Frame::Cancel { .. } => "CANCEL",
            Frame::Cancelled { .. } => "CANCELLED",
            Frame::Done { .. } => "DONE",
        }
    }
}

/// The highest version both ranges hold.
pub fn common_version(ours: (u32, u32), theirs: (u32, u32)) -> Option<u32> {
    let hi = ours.1.min(theirs.1);
    let lo = ours.0.max(theirs.0);
    (lo <= hi).then_some(hi)
}

/// The state versions this process offers: `PGFERRY_TEST_HANDOFF_STATE`
/// (`min-max`, tests of version skew only) or the build's own.
pub fn offered_state_versions() -> (u32, u32) {
    std::env::var("PGFERRY_TEST_HANDOFF_STATE")
        .ok()
        .and_then(|v| {
            let (a, b) = v.split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .unwrap_or(super::state::STATE_VERSIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_meet_at_the_highest_common_one() {
        assert_eq!(common_version((1, 3), (2, 5)), Some(3));
        assert_eq!(common_version((1, 1), (1, 1)), Some(1));
        assert_eq!(common_version((1, 1), (99, 99)), None);
    }

    #[test]
    fn frames_round_trip() {
        let f = Frame::Nack {
            id: Uuid::nil(),
            reason: "x".into(),
        };
        let bytes = f.encode().unwrap();
        assert!(
            matches!(Frame::decode(&bytes).unwrap(), Frame::Nack { reason, .. } if reason == "x")
        );
        assert!(Frame::decode(b"{\"frame\":\"NOPE\"}").is_err());
    }
}
