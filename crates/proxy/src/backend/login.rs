//! Answering a backend's authentication requests on the client's behalf:
//! cleartext, md5 or SCRAM-SHA-256 with the userlist's password, or SCRAM
//! with the ClientKey recovered from the client's own exchange.

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

pub struct Login<'a> {
    user: &'a str,
    credentials: &'a BackendCredentials,
    scram: Option<ScramClient>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum LoginStep {
    /// A reply was appended to the output buffer (or none was needed).
    Continue,
    Authenticated,
}

impl<'a> Login<'a> {
    pub fn new(user: &'a str, credentials: &'a BackendCredentials) -> Self {
        Self {
            user,
            credentials,
            scram: None,
        }
    }

    /// Handles one Authentication request, appending the reply to `out`.
    /// Errors are the reason the login cannot go on.
    pub fn respond(&mut self, req: AuthRequest, out: &mut BytesMut) -> Result<LoginStep, String> {
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
                let mut client = match self.credentials {
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
        match self.credentials {
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
