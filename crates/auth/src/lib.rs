//! pgferry's credential code.
//!
//! This crate owns:
//! - the userlist file in PgBouncer `auth_file` format ([`userlist`]): who may log in and with
//!   which secret (plaintext password or SCRAM-SHA-256 verifier);
//! - the server side of SCRAM-SHA-256 and SCRAM-SHA-256-PLUS ([`ScramServer`],
//!   [`ChannelBinding`]): the proxy terminates client authentication itself;
//! - the client side of SCRAM-SHA-256 ([`ScramClient`]): the proxy authenticates to a PostgreSQL
//!   backend with a plaintext password, or with the `ClientKey` recovered from the client's own
//!   exchange ("SCRAM pass-through").
//!
//! What it must not do:
//! - no IO besides reading the userlist file in [`UserList::load`] (the proxy keeps the
//!   [`InstallationSecret`] file): messages come in and go out
//!   as byte slices, so the proxy owns sockets, framing and timeouts;
//! - never log or print secrets: every type holding a password, key or verifier has a `Debug`
//!   that redacts it, and secrets are zeroed on drop where the type owns them;
//! - never panic on bytes from a network peer or a file: every parse returns a typed error.

pub mod scram;
pub mod secret;
pub mod userlist;

pub use scram::{
    ChannelBinding, ClientKey, DerivedKeys, ScramClient, ScramCredential, ScramError, ScramServer,
    ScramServerFinal, ScramVerifier,
};
pub use secret::InstallationSecret;
pub use userlist::{LoadOptions, LoadStats, Secret, UserEntry, UserList, UserListError};
