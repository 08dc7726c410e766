//! The client side of a session before forwarding starts: TLS and
//! startup negotiation, then authentication terminated at the proxy.

pub mod auth;
pub mod handshake;
pub mod throttle;
