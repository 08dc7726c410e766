//! The client side of a session before forwarding starts: TLS and
//! startup negotiation, then authentication terminated at the proxy
//! (with users from the userlist, or looked up on a backend: `auth_query`).

pub mod auth;
pub mod auth_query;
pub mod handshake;
pub mod throttle;
