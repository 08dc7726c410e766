//! SCRAM-SHA-256 with the client, terminated at the proxy; SCRAM-SHA-256-PLUS
//! (channel binding to the proxy's own certificate) over TLS.
//!
//! Unknown users run the same exchange against a mock verifier and fail at
//! the same step with the same message as a wrong password, so neither the
//! answer nor its timing tells which user names exist. Failed attempts make
//! later ones from the same (client IP, user) wait (see `throttle`).
//!
//! A user the userlist does not have is looked up with `[auth] auth_query`
//! when `auth_user` is set (see `auth_query`): found, the exchange runs
//! against the backend's own verifier and the session logs in to backends
//! by SCRAM pass-through; not found, against the mock verifier as above.

use std::net::IpAddr;

use bytes::BytesMut;
use pgferry_auth::{ScramError, ScramServer, ScramServerFinal, ScramVerifier, Secret, UserEntry};
use pgferry_wire::messages::{
    decode_sasl_initial_response, encode_auth_ok, encode_auth_sasl, encode_auth_sasl_continue,
    encode_auth_sasl_final, take_message,
};
use pgferry_wire::tag;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::backend::login::BackendCredentials;
use crate::client::auth_query::Answer;
use crate::client::handshake::TlsPolicy;
use crate::client::throttle::Throttled;
use crate::errors::SessionError;
use crate::stream::Stream;
use crate::ProxyContext;

/// SASL tokens are small; PostgreSQL caps them at 64 KiB as well.
const MAX_AUTH_MESSAGE: u32 = 65_535;

pub enum AuthOutcome {
    /// AuthenticationOk was sent; these are the credentials for backends.
    Authenticated(BackendCredentials),
    /// The client hung up mid-exchange (psql does this to prompt for a
    /// password); not an authentication failure.
    ClientLeft,
}

/// Authenticates `user` from `peer`, under the back-off of [`crate::client::throttle`].
pub async fn authenticate(
    stream: &mut Stream,
    peer: IpAddr,
    user: &str,
    ctx: &ProxyContext,
) -> Result<AuthOutcome, SessionError> {
    let throttled = |t: Throttled| SessionError::AuthThrottled {
        user: user.to_owned(),
        retry_in: t.retry_in,
    };
    // Refused before any exchange: cheap, and the same for known and unknown users.
    let ticket = ctx.throttle.admit(peer, user).map_err(throttled)?;
    let users = ctx.users();
    let who = match (users.get(user), &ctx.auth_query) {
        (Some(entry), _) => Who::Listed(entry.clone()),
        (None, None) => Who::Unknown,
        (None, Some(aq)) => match aq.lookup(ctx, user).await {
            Ok(Answer::Found(verifier)) => {
                ctx.metrics.auth_query.with_label_values(&["found"]).inc();
                Who::LookedUp(verifier)
            }
            Ok(Answer::NoSuchUser) => {
                ctx.metrics
                    .auth_query
                    .with_label_values(&["no_such_user"])
                    .inc();
                Who::Unknown
            }
            Err(e) => {
                ctx.metrics.auth_query.with_label_values(&["failed"]).inc();
                tracing::warn!(user, error = %e, "auth_query: no answer; login refused");
                return Err(SessionError::AuthLookupFailed {
                    cause: e.to_string(),
                });
            }
        },
    };
    let (verifier, known) = match &who {
        Who::Listed(entry) => (entry.verifier.clone(), true),
        Who::LookedUp(verifier) => (verifier.clone(), true),
        // The mock verifier, exactly as without auth_query.
        Who::Unknown => users.verifier_for(user),
    };
    let mut out = BytesMut::with_capacity(256);
    let done = match exchange(stream, user, verifier, known, &ctx.tls, &mut out).await {
        Ok(Some(done)) => done,
        Ok(None) => return Ok(AuthOutcome::ClientLeft),
        Err(e) => {
            if matches!(e, SessionError::AuthFailed { .. }) {
                ctx.throttle.failed(ticket);
            }
            return Err(e);
        }
    };
    let credentials = match who {
        Who::Listed(entry) => match &entry.secret {
            Secret::Plain(p) => BackendCredentials::Password {
                password: Zeroizing::new(p.to_string()),
                keys: entry.backend_keys.clone(),
            },
            Secret::Verifier(v) => BackendCredentials::PassThrough {
                client_key: done.client_key,
                verifier: v.clone(),
            },
        },
        // No password is known: the backends must hold this very verifier,
        // which is what one of them answered with.
        Who::LookedUp(verifier) => BackendCredentials::PassThrough {
            client_key: done.client_key,
            verifier,
        },
        // A mock verifier never accepts a proof; should one, no.
        Who::Unknown => {
            return Err(SessionError::AuthFailed {
                user: user.to_owned(),
            })
        }
    };
    // Decided before the server signature goes out: it would confirm the password.
    ctx.throttle.succeeded(ticket).map_err(throttled)?;
    encode_auth_sasl_final(&mut out, &done.server_final).map_err(internal)?;
    encode_auth_ok(&mut out).map_err(internal)?;
    send(stream, &mut out).await?;
    Ok(AuthOutcome::Authenticated(credentials))
}

/// Where the user's verifier came from.
enum Who {
    Listed(UserEntry),
    /// `[auth] auth_query` found it on a backend.
    LookedUp(ScramVerifier),
    /// Nowhere: the exchange runs against a mock verifier.
    Unknown,
}

/// The SCRAM exchange up to a verified proof; `None` if the client left.
async fn exchange(
    stream: &mut Stream,
    user: &str,
    verifier: ScramVerifier,
    known: bool,
    tls: &TlsPolicy,
    out: &mut BytesMut,
) -> Result<Option<ScramServerFinal>, SessionError> {
    // Decided by the connection alone, so unknown users are offered the same mechanisms.
    let binding = tls.channel_binding(stream);
    let mechanisms = binding.mechanisms();
    let mut server = ScramServer::with_channel_binding(verifier, known, binding);
    let mut inbuf = BytesMut::with_capacity(512);
    let scram_err = |e: ScramError| match e {
        ScramError::AuthFailed => SessionError::AuthFailed {
            user: user.to_owned(),
        },
        ScramError::ChannelBindingNegotiation => SessionError::ChannelBindingNegotiation,
        ScramError::ChannelBindingMismatch => SessionError::ChannelBindingCheckFailed,
        other => SessionError::ClientProtocol(format!("SCRAM: {other}")),
    };

    encode_auth_sasl(out, mechanisms).map_err(internal)?;
    send(stream, out).await?;

    let Some(body) = read_password_message(stream, &mut inbuf).await? else {
        return Ok(None);
    };
    let (mechanism, data) = decode_sasl_initial_response(&body)
        .map_err(|e| SessionError::ClientProtocol(e.to_string()))?;
    let server_first = server
        .handle_client_first(&mechanism, &data)
        .map_err(scram_err)?;
    encode_auth_sasl_continue(out, &server_first).map_err(internal)?;
    send(stream, out).await?;

    let Some(body) = read_password_message(stream, &mut inbuf).await? else {
        return Ok(None);
    };
    server
        .handle_client_final(&body)
        .map(Some)
        .map_err(scram_err)
}

fn internal(e: impl std::fmt::Display) -> SessionError {
    SessionError::Internal(e.to_string())
}

async fn send(stream: &mut Stream, out: &mut BytesMut) -> Result<(), SessionError> {
    stream
        .write_all(out)
        .await
        .map_err(|e| SessionError::ClientProtocol(format!("write failed: {e}")))?;
    stream
        .flush()
        .await
        .map_err(|e| SessionError::ClientProtocol(format!("write failed: {e}")))?;
    out.clear();
    Ok(())
}

/// The body of the next 'p' message, or None if the client hung up.
async fn read_password_message(
    stream: &mut Stream,
    inbuf: &mut BytesMut,
) -> Result<Option<bytes::Bytes>, SessionError> {
    loop {
        match take_message(inbuf, MAX_AUTH_MESSAGE) {
            Ok(Some(m)) if m.tag == tag::PASSWORD => return Ok(Some(m.body)),
            Ok(Some(m)) if m.tag == tag::TERMINATE => return Ok(None),
            Ok(Some(m)) => {
                return Err(SessionError::ClientProtocol(format!(
                    "expected SASL response, got message type {:?}",
                    m.tag as char
                )))
            }
            Ok(None) => {}
            Err(e) => return Err(SessionError::ClientProtocol(e.to_string())),
        }
        match stream.read_buf(inbuf).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(_) => return Ok(None),
        }
    }
}
