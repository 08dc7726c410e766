//! What a client sees when something fails: the one place that decides the
//! SQLSTATE and message of every error the proxy itself reports.

use bytes::BytesMut;
use pgferry_wire::messages::{encode_error_fields, encode_error_response};
use pgferry_wire::{ErrorFields, Severity};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SessionError {
    /// Every configured backend refused or timed out. (The address is for
    /// pgferry's log, not for clients.)
    #[error("could not connect to backend {backend}: {reason}")]
    BackendUnreachable {
        backend: String,
        address: String,
        reason: String,
    },
    /// The backend went away in the middle of the session.
    #[error("server closed the connection unexpectedly (backend {backend})")]
    BackendClosed { backend: String },
    /// The backend broke the protocol (bad frame, unexpected message).
    #[error("backend {backend} sent an invalid message: {reason}")]
    BackendProtocol { backend: String, reason: String },
    /// The backend refused the proxy's login.
    #[error("backend {backend} rejected the login: {reason}")]
    BackendLogin { backend: String, reason: String },
    /// An ErrorResponse from the backend during startup, relayed as is.
    #[error("backend error: {}", .0.message().unwrap_or("(no message)"))]
    BackendError(ErrorFields),
    #[error("invalid frontend message: {0}")]
    ClientProtocol(String),
    /// A startup parameter only pgferry may send to a backend (CockroachDB's
    /// `crdb:` ones: a revival token would make the backend login skip its
    /// authentication rules). CockroachDB's sqlproxy refuses it alike.
    #[error("parameter {0} is not allowed")]
    ForbiddenParameter(String),
    #[error("{0}")]
    UnsupportedProtocol(String),
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
    #[error("password authentication failed for user \"{user}\"")]
    AuthFailed { user: String },
    /// Refused by the back-off after failed attempts from this (IP, user). Word for word and
    /// SQLSTATE the same as a wrong password, so a client learns nothing from being throttled;
    /// only the proxy's log and metrics tell the two apart.
    #[error("password authentication failed for user \"{user}\"")]
    AuthThrottled {
        user: String,
        retry_in: std::time::Duration,
    },
    #[error("TLS is required: connect with sslmode=require")]
    TlsRequired,
    /// The client said it can bind but thinks we cannot, although we offered
    /// SCRAM-SHA-256-PLUS: the mechanism list it saw was altered (a downgrade).
    /// PostgreSQL's message.
    #[error(
        "SCRAM channel binding negotiation error: the client supports SCRAM channel binding \
         but thinks the server does not. However, this server does support channel binding."
    )]
    ChannelBindingNegotiation,
    /// The client's channel binding data is not the hash of our certificate: it
    /// reached us through something holding another certificate. PostgreSQL's message.
    #[error("SCRAM channel binding check failed")]
    ChannelBindingCheckFailed,
    #[error("sorry, too many clients already (max_client_connections)")]
    TooManyConnections,
    /// `[audit] on_overflow = "reject_connections"` and the backlog is full.
    #[error("sorry, too many clients already (audit log backlog is full)")]
    AuditBacklogFull,
    #[error("terminating connection due to administrator command")]
    AdminShutdown,
    /// Every backend is draining, drained or removed: none takes sessions.
    /// The class PostgreSQL uses for "cannot connect now", which drivers
    /// and poolers retry.
    #[error("no backend is taking new sessions (all are draining, drained or removed)")]
    NoBackendAvailable,
    /// A migration failed after the old backend could no longer keep the
    /// session.
    #[error("terminating connection: migration to another backend failed: {0}")]
    MigrationFailed(String),
    /// The client asked for protocol 3.2 (and was given it), but no backend
    /// that took the login speaks it. PostgreSQL's class for an
    /// unsupported protocol.
    #[error("no backend speaks protocol 3.2, which this session uses")]
    ProtocolUnavailable,
    /// A startup option pgferry reads itself had a bad value.
    /// PostgreSQL's class for a bad option value.
    #[error("{0}")]
    InvalidStartupOption(String),
    /// The primary went away while a request was in flight: what it did
    /// (a COMMIT, an autocommitted write) is not known.
    #[error("connection to the primary of cluster {cluster} was lost while a statement was in flight (failover); whether it committed is unknown")]
    FailoverOutcomeUnknown { cluster: String },
    /// The primary went away while the session was inside a transaction
    /// (nothing in flight): the transaction is gone.
    #[error("connection to the primary of cluster {cluster} was lost (failover); the open transaction was rolled back")]
    FailoverInTransaction { cluster: String },
    /// The primary went away while the session was idle, and its state
    /// (settings, prepared statements) is not known to pgferry, or no new
    /// primary came up in time.
    #[error("terminating connection: the primary of cluster {cluster} went away (failover) and this session could not be carried over: {why}")]
    FailoverNotRehomed { cluster: String, why: String },
    /// A switchover promoted the new primary, but this session could not
    /// be moved to it; it must not stay on the fenced old primary.
    #[error("terminating connection: the primary was switched over and this session could not be moved: {0}")]
    SwitchoverNotMoved(String),
    /// `[auth] auth_query` could not be run on any backend (none takes
    /// sessions, none answered in time, the lookup itself failed). The
    /// class of "no backend available", which drivers retry; the same words
    /// whoever the user is, so they tell nothing about which users exist.
    /// (The cause is for pgferry's log, not for clients.)
    #[error("cannot authenticate now: pgferry could not look the user up on any backend")]
    AuthLookupFailed { cause: String },
    /// Asked for the admin console's database as a user not in
    /// `[admin] console_users`.
    #[error("permission denied: user \"{user}\" may not use the pgferry admin console")]
    ConsoleNotAllowed { user: String },
    #[error("internal proxy error: {0}")]
    Internal(String),
}

impl SessionError {
    /// The SQLSTATE the client receives.
    pub fn sqlstate(&self) -> &str {
        match self {
            SessionError::BackendUnreachable { .. }
            | SessionError::BackendClosed { .. }
            | SessionError::MigrationFailed(_) => "08006",
            SessionError::BackendProtocol { .. }
            | SessionError::ClientProtocol(_)
            | SessionError::ForbiddenParameter(_) => "08P01",
            SessionError::BackendLogin { .. } => "08004",
            SessionError::BackendError(f) => match f.sqlstate() {
                Some(s) if s.len() == 5 => s,
                _ => "XX000",
            },
            SessionError::UnsupportedProtocol(_) | SessionError::ProtocolUnavailable => "0A000",
            SessionError::AuthFailed { .. } | SessionError::AuthThrottled { .. } => "28P01",
            SessionError::TlsRequired
            | SessionError::NoUser
            | SessionError::ChannelBindingNegotiation
            | SessionError::ChannelBindingCheckFailed
            | SessionError::ConsoleNotAllowed { .. } => "28000",
            SessionError::TooManyConnections | SessionError::AuditBacklogFull => "53300",
            SessionError::AdminShutdown
            | SessionError::FailoverNotRehomed { .. }
            | SessionError::SwitchoverNotMoved(_) => "57P01",
            SessionError::InvalidStartupOption(_) => "22023",
            SessionError::FailoverOutcomeUnknown { .. } => "08007",
            SessionError::FailoverInTransaction { .. } => "08006",
            SessionError::NoBackendAvailable | SessionError::AuthLookupFailed { .. } => "57P03",
            SessionError::Internal(_) => "XX000",
        }
    }

    /// Appends the FATAL ErrorResponse the client should receive.
    pub fn encode_for_client(&self, buf: &mut BytesMut) {
        let res = match self {
            // Relayed exactly as the backend sent it (severity, detail, hint).
            SessionError::BackendError(fields)
                if fields.sqlstate().is_some_and(|s| s.len() == 5) =>
            {
                encode_error_fields(buf, fields)
            }
            _ => encode_error_response(buf, Severity::Fatal, self.sqlstate(), &self.to_string()),
        };
        if let Err(e) = res {
            // Only an absurdly long message can fail to encode; say less.
            tracing::warn!(error = %e, "could not encode error for client");
            let _ = encode_error_response(buf, Severity::Fatal, "XX000", "internal proxy error");
        }
    }

    /// Name used in logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            SessionError::BackendUnreachable { .. } => "backend_unreachable",
            SessionError::BackendClosed { .. } => "backend_closed",
            SessionError::BackendProtocol { .. } => "backend_protocol",
            SessionError::BackendLogin { .. } => "backend_login",
            SessionError::BackendError(_) => "backend_error",
            SessionError::ClientProtocol(_) => "client_protocol",
            SessionError::ForbiddenParameter(_) => "forbidden_parameter",
            SessionError::UnsupportedProtocol(_) => "unsupported_protocol",
            SessionError::NoUser => "no_user",
            SessionError::AuthFailed { .. } => "auth_failed",
            SessionError::AuthThrottled { .. } => "auth_throttled",
            SessionError::TlsRequired => "tls_required",
            SessionError::ChannelBindingNegotiation => "channel_binding_negotiation",
            SessionError::ChannelBindingCheckFailed => "channel_binding_check_failed",
            SessionError::TooManyConnections => "too_many_connections",
            SessionError::AuditBacklogFull => "audit_backlog_full",
            SessionError::AdminShutdown => "admin_shutdown",
            SessionError::NoBackendAvailable => "no_backend_available",
            SessionError::MigrationFailed(_) => "migration_failed",
            SessionError::ProtocolUnavailable => "protocol_unavailable",
            SessionError::InvalidStartupOption(_) => "invalid_startup_option",
            SessionError::FailoverOutcomeUnknown { .. } => "failover_outcome_unknown",
            SessionError::FailoverInTransaction { .. } => "failover_in_transaction",
            SessionError::FailoverNotRehomed { .. } => "failover_not_rehomed",
            SessionError::SwitchoverNotMoved(_) => "switchover_not_moved",
            SessionError::AuthLookupFailed { .. } => "auth_lookup_failed",
            SessionError::ConsoleNotAllowed { .. } => "console_not_allowed",
            SessionError::Internal(_) => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgferry_wire::messages::take_message;

    fn client_sees(e: SessionError) -> ErrorFields {
        let mut buf = BytesMut::new();
        e.encode_for_client(&mut buf);
        let m = take_message(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(m.tag, b'E');
        ErrorFields::decode(&m.body).unwrap()
    }

    #[test]
    fn sqlstates() {
        let f = client_sees(SessionError::AuthFailed { user: "bob".into() });
        assert_eq!(f.sqlstate(), Some("28P01"));
        assert_eq!(
            f.message(),
            Some("password authentication failed for user \"bob\"")
        );
        // Throttled: byte for byte what a wrong password gets.
        let throttled = SessionError::AuthThrottled {
            user: "bob".into(),
            retry_in: std::time::Duration::from_secs(3),
        };
        assert_eq!(client_sees(throttled), f);
        assert_eq!(
            client_sees(SessionError::TlsRequired).sqlstate(),
            Some("28000")
        );
        let f = client_sees(SessionError::ProtocolUnavailable);
        assert_eq!(f.sqlstate(), Some("0A000"));
        assert!(f.message().is_some_and(|m| m.contains("3.2")));
        let f = client_sees(SessionError::ChannelBindingCheckFailed);
        assert_eq!(f.sqlstate(), Some("28000"));
        assert_eq!(f.message(), Some("SCRAM channel binding check failed"));
        let f = client_sees(SessionError::ChannelBindingNegotiation);
        assert_eq!(f.sqlstate(), Some("28000"));
        assert!(f
            .message()
            .unwrap()
            .starts_with("SCRAM channel binding negotiation error"));
        assert_eq!(
            client_sees(SessionError::NoBackendAvailable).sqlstate(),
            Some("57P03")
        );
        // A failed user lookup: the cause stays in pgferry's log.
        let f = client_sees(SessionError::AuthLookupFailed {
            cause: "backend pg1: permission denied for view pg_shadow".into(),
        });
        assert_eq!(f.sqlstate(), Some("57P03"));
        assert_eq!(
            f.message(),
            Some("cannot authenticate now: pgferry could not look the user up on any backend")
        );
        for (e, code) in [
            (SessionError::InvalidStartupOption("bad".into()), "22023"),
            (SessionError::ForbiddenParameter("crdb:x".into()), "08P01"),
            (
                SessionError::FailoverOutcomeUnknown {
                    cluster: "main".into(),
                },
                "08007",
            ),
            (
                SessionError::FailoverInTransaction {
                    cluster: "main".into(),
                },
                "08006",
            ),
            (SessionError::SwitchoverNotMoved("x".into()), "57P01"),
        ] {
            assert_eq!(client_sees(e).sqlstate(), Some(code));
        }
        let f = client_sees(SessionError::BackendUnreachable {
            backend: "pg1".into(),
            address: "127.0.0.1:1".into(),
            reason: "refused".into(),
        });
        assert_eq!(f.sqlstate(), Some("08006"));
        assert!(f
            .message()
            .unwrap()
            .starts_with("could not connect to backend pg1"));
        assert!(
            !f.message().unwrap().contains("127.0.0.1"),
            "no addresses for clients"
        );
        assert_eq!(
            client_sees(SessionError::ClientProtocol("x".into())).sqlstate(),
            Some("08P01")
        );
        let relayed = ErrorFields {
            fields: vec![
                (b'S', "FATAL".into()),
                (b'C', "3D000".into()),
                (b'M', "no db".into()),
            ],
        };
        assert_eq!(
            client_sees(SessionError::BackendError(relayed.clone())),
            relayed
        );
    }
}
