//! PostgreSQL wire protocol pieces for pgferry. No IO.
//!
//! Owns: message framing by header peek ([`frame`]), the untagged startup
//! packets ([`startup`]), and the few typed messages the proxy itself reads
//! or writes ([`messages`]). It must not decode messages that are only
//! being forwarded, and it must never panic on bytes from a peer: every
//! parser returns an error instead.

pub mod frame;
pub mod messages;
pub mod result_set;
pub mod startup;

pub use frame::{
    Flow, FrameError, FrameScanner, FrameVisitor, DEFAULT_MAX_MESSAGE_LEN, HEADER_LEN,
};
pub use messages::{tag, DecodeError, EncodeError, ErrorFields, RawMessage, Severity};
pub use startup::{
    CancelKey, CancelSecret, StartupError, StartupMessage, StartupPacket, MAX_STARTUP_PACKET_LEN,
};
