//! Answering a backend's authentication requests on the client's behalf:
//! cleartext, md5 or SCRAM-SHA-256 with the userlist's password, or SCRAM
//! with the ClientKey recovered from the client's own exchange; or no
//! answer at all, for a CockroachDB session revival token, which rides in
//! the StartupMessage.

use bytes::BytesMut;
use std::sync::Arc;

use pgferry_auth::{ClientKey, DerivedKeys, ScramClient, ScramCredential, ScramVerifier};
use pgferry_wire::messages::{
    encode_password, encode_sasl_initial_response, encode_sasl_response, AuthRequest,
};
use zeroize::Zeroizing;

/// What the proxy may use to log in to a backend as the client's user.
#[derive(Clone)]
pub enum BackendCredentials {
    /// The userlist's password, with the SCRAM keys already derived from
    /// it for backends' salts (shared by all of the user's sessions).
    Password {
        password: Zeroizing<String>,
        keys: Arc<DerivedKeys>,
    },
    /// SCRAM pass-through: the backend must hold the same verifier.
    PassThrough {
        client_key: ClientKey,
        verifier: ScramVerifier,
    },
}

impl std::fmt::Debug for BackendCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendCredentials::Password { .. } => "Password(..)",
            BackendCredentials::PassThrough { .. } => "PassThrough(..)",
        })
    }
}

const SCRAM: &str = "SCRAM-SHA-256";

/// The startup parameter a CockroachDB node takes a revival token in
/// (`pkg/sql/pgwire/pre_serve_options.go`).
pub const REVIVAL_TOKEN_PARAM: &str = "crdb:session_revival_token_base64";

/// A CockroachDB session revival token (standard base64): a bearer
/// credential for the session's user for ten minutes. No Display, no
/// Serialize, a Debug that shows nothing, zeroed when dropped: it must
/// never reach a log, an error text or an API answer.
pub struct RevivalToken(Zeroizing<String>);

impl std::fmt::Debug for RevivalToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RevivalToken(..)")
    }
}

/// Longest token accepted; CockroachDB's are a few hundred bytes.
const MAX_TOKEN_LEN: usize = 4096;

impl RevivalToken {
    /// From the column a node sent: non-empty standard base64 of at most
    /// 4 KiB, so it can go in a startup parameter (no NUL, nothing to
    /// quote). The error never contains the value.
    pub fn from_column(b: &[u8]) -> Result<Self, String> {
        if b.is_empty() || b.len() > MAX_TOKEN_LEN || !is_base64(b) {
            return Err(format!(
                "the session revival token is not base64 of 1 to {MAX_TOKEN_LEN} bytes"
            ));
        }
        // Checked ASCII above.
        let text = String::from_utf8(b.to_vec()).map_err(|_| "token is not text".to_owned())?;
        Ok(Self(Zeroizing::new(text)))
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

/// Standard base64 alphabet with padding only at the end.
pub fn is_base64(b: &[u8]) -> bool {
    let body = b.len() - b.iter().rev().take_while(|&&c| c == b'=').count();
    b.len() - body <= 2
        && b[..body]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

/// How a dial logs in.
#[derive(Clone, Copy, Debug)]
pub enum LoginAuth<'a> {
    /// As for a new session: answer the server's authentication requests.
    Credentials(&'a BackendCredentials),
    /// A CockroachDB token login: the token goes in the StartupMessage and
    /// the node asks for nothing (`authSessionRevivalToken`,
    /// `pkg/sql/pgwire/auth_methods.go`).
    RevivalToken(&'a RevivalToken),
}

pub struct Login<'a> {
    user: &'a str,
    auth: LoginAuth<'a>,
    scram: Option<ScramClient>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum LoginStep {
    /// A reply was appended to the output buffer (or none was needed).
    Continue,
    Authenticated,
}

impl<'a> Login<'a> {
    pub fn new(user: &'a str, auth: LoginAuth<'a>) -> Self {
        Self {
            user,
            auth,
            scram: None,
        }
    }

    /// Handles one Authentication request, appending the reply to `out`.
    /// Errors are the reason the login cannot go on.
    pub fn respond(&mut self, req: AuthRequest, out: &mut BytesMut) -> Result<LoginStep, String> {
        let credentials = match self.auth {
            LoginAuth::Credentials(c) => c,
            // No password is ever sent on a token login.
            LoginAuth::RevivalToken(_) => {
                return match req {
                    AuthRequest::Ok => Ok(LoginStep::Authenticated),
                    other => Err(format!(
                        "backend asked for {} after a session revival token login \
                         (CockroachDB asks for nothing)",
                        describe(&other)
                    )),
                }
            }
        };
        match req {
            AuthRequest::Ok => Ok(LoginStep::Authenticated),
            AuthRequest::CleartextPassword => {
                let pw = self.password("cleartext password")?;
                encode_password(out, pw).map_err(|e| e.to_string())?;
                Ok(LoginStep::Continue)
            }
            AuthRequest::Md5Password { salt } => {
                let pw = self.password("md5")?;
                let hash = postgres_protocol::authentication::md5_hash(
                    self.user.as_bytes(),
                    pw.as_bytes(),
                    salt,
                );
                encode_password(out, &hash).map_err(|e| e.to_string())?;
                Ok(LoginStep::Continue)
            }
            AuthRequest::Sasl { mechanisms } => {
                if !mechanisms.iter().any(|m| m == SCRAM) {
                    return Err(format!(
                        "backend offers only SASL mechanisms {mechanisms:?}"
                    ));
                }
                let mut client = match credentials {
                    BackendCredentials::Password { password, keys } => {
                        ScramClient::with_derived_keys(
                            ScramCredential::Password(password.to_string()),
                            keys.clone(),
                        )
                    }
                    BackendCredentials::PassThrough {
                        client_key,
                        verifier,
                    } => ScramClient::new(ScramCredential::ClientKey {
                        client_key: client_key.clone(),
                        verifier: verifier.clone(),
                    }),
                };
                let first = client.client_first();
                encode_sasl_initial_response(out, SCRAM, &first).map_err(|e| e.to_string())?;
                self.scram = Some(client);
                Ok(LoginStep::Continue)
            }
            AuthRequest::SaslContinue { data } => {
                let client = self.scram.as_mut().ok_or("SASLContinue before SASL")?;
                let fin = client
                    .handle_server_first(&data)
                    .map_err(|e| format!("SCRAM: {e}"))?;
                encode_sasl_response(out, &fin).map_err(|e| e.to_string())?;
                Ok(LoginStep::Continue)
            }
            AuthRequest::SaslFinal { data } => {
                let client = self.scram.as_mut().ok_or("SASLFinal before SASL")?;
                client
                    .handle_server_final(&data)
                    .map_err(|e| format!("SCRAM: {e}"))?;
                Ok(LoginStep::Continue)
            }
            AuthRequest::Unsupported(code) => Err(format!(
                "backend asks for authentication method {code}, which pgferry cannot answer"
            )),
        }
    }

    fn password(&self, method: &str) -> Result<&'a str, String> {
        let LoginAuth::Credentials(credentials) = self.auth else {
            return Err(format!("backend asks for {method} authentication"));
        };
        match credentials {
            BackendCredentials::Password { password, .. } => Ok(password.as_str()),
            BackendCredentials::PassThrough { .. } => Err(format!(
                "backend asks for {method} authentication, but the userlist holds only a \
                 SCRAM verifier for user {:?}: configure the backend for scram-sha-256 or \
                 put the password in the userlist",
                self.user
            )),
        }
    }
}

/// An authentication request's name, for an error.
fn describe(req: &AuthRequest) -> String {
    match req {
        AuthRequest::Ok => "nothing".into(),
        AuthRequest::CleartextPassword => "a cleartext password".into(),
        AuthRequest::Md5Password { .. } => "an md5 password".into(),
        AuthRequest::Sasl { .. }
        | AuthRequest::SaslContinue { .. }
        | AuthRequest::SaslFinal { .. } => "SASL authentication".into(),
        AuthRequest::Unsupported(code) => format!("authentication method {code}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_login_answers_no_password_request() {
        let token = RevivalToken::from_column(b"c2VjcmV0LXRva2Vu").unwrap();
        let mut login = Login::new("app", LoginAuth::RevivalToken(&token));
        let mut out = BytesMut::new();
        let err = login
            .respond(AuthRequest::CleartextPassword, &mut out)
            .unwrap_err();
        assert!(err.contains("cleartext"), "{err}");
        assert!(out.is_empty());
        assert_eq!(
            login.respond(AuthRequest::Ok, &mut out),
            Ok(LoginStep::Authenticated)
        );
    }

    #[test]
    fn tokens_are_base64_and_never_shown() {
        let token = RevivalToken::from_column(b"c2VjcmV0LXRva2Vu").unwrap();
        assert_eq!(format!("{token:?}"), "RevivalToken(..)");
        assert_eq!(token.expose(), "c2VjcmV0LXRva2Vu");
        for bad in [&b""[..], b"abc'--", b"ab\0c", b"a=b=", b"abc==="] {
            let err = RevivalToken::from_column(bad).unwrap_err();
            assert!(!err.contains("abc"), "{err}");
        }
        assert!(is_base64(b"YWJjZA=="));
    }
}
