//! SCRAM-SHA-256 (RFC 5802 / RFC 7677) the way PostgreSQL speaks it, with SCRAM-SHA-256-PLUS
//! (`tls-server-end-point` channel binding, RFC 5929) on the server side.
//!
//! [`ScramServer`] runs the exchange toward a client, [`ScramClient`] toward a backend. Both are
//! small state machines fed with the SASL payloads (the bytes inside SASLInitialResponse,
//! SASLResponse, AuthenticationSASLContinue and AuthenticationSASLFinal); any error ends the
//! exchange, and later calls return [`ScramError::OutOfOrder`].

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};
use zeroize::{Zeroize, Zeroizing};

use crate::secret::InstallationSecret;

/// SCRAM without channel binding; offered on every connection.
pub const MECHANISM: &str = "SCRAM-SHA-256";

/// SCRAM with channel binding; offered only on TLS connections whose server certificate gives a
/// `tls-server-end-point` hash (see [`ChannelBinding`]).
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// The one channel binding type we (and PostgreSQL) support, RFC 5929.
pub const CBIND_TYPE: &str = "tls-server-end-point";

/// Prefix of a verifier as stored in `pg_authid.rolpassword`.
const VERIFIER_PREFIX: &str = "SCRAM-SHA-256$";

/// PostgreSQL's default iteration count (`scram_iterations`), used for derived and mock verifiers.
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// Salt length used by PostgreSQL (`SCRAM_DEFAULT_SALT_LEN`).
pub const DEFAULT_SALT_LEN: usize = 16;

/// Raw nonce bytes before base64; 18 like PostgreSQL and libpq (`SCRAM_RAW_NONCE_LEN`).
const RAW_NONCE_LEN: usize = 18;

const KEY_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Errors of a SCRAM exchange or of parsing a verifier.
#[derive(Debug, thiserror::Error)]
pub enum ScramError {
    /// Wrong password OR unknown user: indistinguishable on purpose.
    #[error("authentication failed")]
    AuthFailed,
    #[error("unsupported SASL mechanism {0:?}")]
    UnsupportedMechanism(String),
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// `p=<type>` with a type other than `tls-server-end-point`.
    #[error("unsupported SCRAM channel-binding type")]
    ChannelBindingUnsupported,
    /// The client sent `y` ("I support binding but you do not") although we offered
    /// SCRAM-SHA-256-PLUS: someone may have stripped it from the mechanism list.
    #[error("SCRAM channel binding negotiation error")]
    ChannelBindingNegotiation,
    /// The client bound the exchange to a different certificate than ours (or sent junk).
    #[error("SCRAM channel binding check failed")]
    ChannelBindingMismatch,
    #[error("server's SCRAM salt or iteration count differs from the userlist verifier")]
    VerifierMismatch,
    #[error("server signature mismatch")]
    ServerSignatureMismatch,
    #[error("invalid SCRAM verifier: {0}")]
    InvalidVerifier(&'static str),
    #[error("SCRAM exchange out of order")]
    OutOfOrder,
}

// ---------------------------------------------------------------------------------------------
// Primitives
// ---------------------------------------------------------------------------------------------

/// HMAC-SHA-256 keyed with a 32-byte key over the concatenation of `parts`.
fn hmac(key: &[u8; KEY_LEN], parts: &[&[u8]]) -> [u8; KEY_LEN] {
    // HMAC zero-pads keys shorter than the block size, so keying with the 32 bytes padded to
    // the 64-byte block is the same MAC; it lets us use the infallible `KeyInit::new` instead
    // of `new_from_slice`, which would need an unwrap.
    let mut block = Zeroizing::new([0u8; 64]);
    for (dst, src) in block.iter_mut().zip(key.iter()) {
        *dst = *src;
    }
    let mut mac = <HmacSha256 as hmac::digest::KeyInit>::new(&(*block).into());
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; KEY_LEN] {
    Sha256::digest(data).into()
}

fn xor(a: &[u8; KEY_LEN], b: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    let mut out = [0u8; KEY_LEN];
    for ((o, x), y) in out.iter_mut().zip(a.iter()).zip(b.iter()) {
        *o = x ^ y;
    }
    out
}

/// SASLprep the password; like PostgreSQL, fall back to the raw bytes when SASLprep rejects it
/// (prohibited characters etc.) so such passwords still work, just unnormalized.
fn normalize_password(password: &str) -> Zeroizing<Vec<u8>> {
    match stringprep::saslprep(password) {
        Ok(prepped) => Zeroizing::new(prepped.as_bytes().to_vec()),
        Err(_) => Zeroizing::new(password.as_bytes().to_vec()),
    }
}

fn salted_password(password: &str, salt: &[u8], iterations: u32) -> Zeroizing<[u8; KEY_LEN]> {
    let normalized = normalize_password(password);
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    pbkdf2::pbkdf2_hmac::<Sha256>(&normalized, salt, iterations, &mut *out);
    out
}

fn random_nonce() -> String {
    let mut raw = [0u8; RAW_NONCE_LEN];
    rand::rng().fill_bytes(&mut raw);
    B64.encode(raw)
}

fn decode_key(b64: &[u8]) -> Option<[u8; KEY_LEN]> {
    let bytes = Zeroizing::new(B64.decode(b64).ok()?);
    bytes.as_slice().try_into().ok()
}

// ---------------------------------------------------------------------------------------------
// Verifier and ClientKey
// ---------------------------------------------------------------------------------------------

/// What PostgreSQL stores for a SCRAM-SHA-256 role: enough to check a client's proof and to
/// prove the server's identity, not enough to log in by itself.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; KEY_LEN],
    pub server_key: [u8; KEY_LEN],
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are secret (StoredKey plus one sniffed exchange yields the ClientKey).
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl Drop for ScramVerifier {
    fn drop(&mut self) {
        self.stored_key.zeroize();
        self.server_key.zeroize();
    }
}

impl ScramVerifier {
    /// Parses `SCRAM-SHA-256$<iter>:<salt b64>$<StoredKey b64>:<ServerKey b64>` (as in
    /// `pg_authid.rolpassword`).
    pub fn parse(s: &str) -> Result<Self, ScramError> {
        let rest = s
            .strip_prefix(VERIFIER_PREFIX)
            .ok_or(ScramError::InvalidVerifier(
                "does not start with SCRAM-SHA-256$",
            ))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(ScramError::InvalidVerifier("missing '$' before the keys"))?;
        let (iter_str, salt_b64) = params.split_once(':').ok_or(ScramError::InvalidVerifier(
            "missing ':' between iterations and salt",
        ))?;
        let (stored_b64, server_b64) = keys.split_once(':').ok_or(ScramError::InvalidVerifier(
            "missing ':' between StoredKey and ServerKey",
        ))?;
        let iterations = parse_iterations(iter_str.as_bytes())
            .ok_or(ScramError::InvalidVerifier("bad iteration count"))?;
        let salt = B64
            .decode(salt_b64)
            .map_err(|_| ScramError::InvalidVerifier("salt is not valid base64"))?;
        if salt.is_empty() {
            return Err(ScramError::InvalidVerifier("empty salt"));
        }
        let stored_key = decode_key(stored_b64.as_bytes()).ok_or(ScramError::InvalidVerifier(
            "StoredKey is not 32 bytes of base64",
        ))?;
        let server_key = decode_key(server_b64.as_bytes()).ok_or(ScramError::InvalidVerifier(
            "ServerKey is not 32 bytes of base64",
        ))?;
        Ok(Self {
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }

    /// Derives a verifier from a plaintext password (SASLprep, PBKDF2-HMAC-SHA-256).
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        let salted = salted_password(password, salt, iterations);
        let client_key = Zeroizing::new(hmac(&salted, &[b"Client Key"]));
        Self {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&*client_key),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }

    /// Mock verifier for a user that does not exist, with `iterations` (the userlist's, see
    /// [`crate::UserList`]). Deterministic per (installation secret, user): its salt is the one a
    /// plaintext entry of that name gets ([`user_salt`]), so probes see the same stable salt
    /// whether or not the user exists, across reloads and restarts. Its keys are HMAC outputs
    /// nobody can invert to a ClientKey; [`ScramServer`] additionally refuses it via
    /// `known_user == false`.
    pub fn mock(secret: &InstallationSecret, user: &str, iterations: u32) -> Self {
        let key = secret.key();
        Self {
            iterations,
            salt: user_salt(secret, user),
            stored_key: hmac(key, &[b"mock stored key\0", user.as_bytes()]),
            server_key: hmac(key, &[b"mock server key\0", user.as_bytes()]),
        }
    }

    /// Inverse of [`ScramVerifier::parse`].
    pub fn to_pg_string(&self) -> String {
        format!(
            "{VERIFIER_PREFIX}{}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }

    /// Whether `client_key` belongs to this verifier (H(ClientKey) == StoredKey), constant time.
    pub fn matches_client_key(&self, client_key: &ClientKey) -> bool {
        sha256(&client_key.0[..]).ct_eq(&self.stored_key).into()
    }
}

/// The salt of `user`'s verifier when derived here (plaintext entries, mock verifiers):
/// HMAC(installation secret, user) truncated to PostgreSQL's 16 bytes. Stable across reloads and
/// restarts, distinct per user and per installation.
pub fn user_salt(secret: &InstallationSecret, user: &str) -> Vec<u8> {
    let full = hmac(secret.key(), &[b"user salt\0", user.as_bytes()]);
    full.iter().take(DEFAULT_SALT_LEN).copied().collect()
}

/// Decimal iteration count, 1..=u32::MAX, digits only (no sign, no spaces).
fn parse_iterations(s: &[u8]) -> Option<u32> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u32 = std::str::from_utf8(s).ok()?.parse().ok()?;
    (n > 0).then_some(n)
}

/// Login-equivalent secret recovered from a successful client exchange. Zeroed on drop.
/// Cloning is allowed because the proxy needs one per backend dial.
#[derive(Clone)]
pub struct ClientKey(Zeroizing<[u8; KEY_LEN]>);

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientKey(..)")
    }
}

impl ClientKey {
    /// The key's bytes, for handing a session to another pgferry process (never logged).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0[..]
    }

    /// A key from `as_bytes`; `None` for a wrong length.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Self(Zeroizing::new(arr)))
    }

    /// Derives the ClientKey from a plaintext password and a verifier's salt and iterations.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        let salted = salted_password(password, salt, iterations);
        Self(Zeroizing::new(hmac(&salted, &[b"Client Key"])))
    }
}

// ---------------------------------------------------------------------------------------------
// Message parsing helpers
// ---------------------------------------------------------------------------------------------

/// Splits `input` at the first ','; the second half is `None` when there is no comma.
fn split_field(input: &[u8]) -> (&[u8], Option<&[u8]>) {
    match input.iter().position(|&b| b == b',') {
        Some(i) => (
            input.get(..i).unwrap_or_default(),
            Some(input.get(i + 1..).unwrap_or_default()),
        ),
        None => (input, None),
    }
}

/// Value of a `<attr>=<value>` field, or `None` if the field is a different attribute.
fn attr_value(field: &[u8], attr: u8) -> Option<&[u8]> {
    match field {
        [a, b'=', value @ ..] if *a == attr => Some(value),
        _ => None,
    }
}

/// RFC 5802 `attr-val`: one ASCII letter, '=', value.
fn is_attr(field: &[u8]) -> bool {
    matches!(field, [a, b'=', ..] if a.is_ascii_alphabetic())
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E (printable ASCII except ',').
fn is_printable_nonce(nonce: &[u8]) -> bool {
    !nonce.is_empty()
        && nonce
            .iter()
            .all(|&b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// PostgreSQL reads SASL payloads as C strings; an embedded NUL is a protocol violation.
fn reject_nul(data: &[u8]) -> Result<(), ScramError> {
    if data.contains(&0) {
        return Err(ScramError::Malformed("message contains a NUL byte"));
    }
    Ok(())
}

/// The nonces we generate and accept are ASCII, so this never loses bytes.
fn ascii_string(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// What the client's connection to us allows for channel binding. Decided per connection (TLS
/// or not) from data computed once per server certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelBinding {
    /// Plaintext: nothing to bind to, only SCRAM-SHA-256 is offered.
    None,
    /// TLS, but no `tls-server-end-point` hash exists for our certificate (Ed25519 or an unknown
    /// signature algorithm): PostgreSQL cannot bind those either, so -PLUS is not offered.
    TlsUnbindable,
    /// TLS, with the RFC 5929 hash of our certificate: -PLUS is offered, first.
    TlsServerEndPoint(Vec<u8>),
}

impl ChannelBinding {
    /// The mechanisms for AuthenticationSASL, in PostgreSQL's order (strongest first).
    pub fn mechanisms(&self) -> &'static [&'static str] {
        match self {
            ChannelBinding::TlsServerEndPoint(_) => &[MECHANISM_PLUS, MECHANISM],
            ChannelBinding::None | ChannelBinding::TlsUnbindable => &[MECHANISM],
        }
    }

    fn offers_plus(&self) -> bool {
        matches!(self, ChannelBinding::TlsServerEndPoint(_))
    }
}

enum ServerState {
    Initial,
    SentFirst {
        /// What the client must send in `c=`: base64 of the gs2 header, followed by the
        /// channel binding data when bound.
        expected_cbind: String,
        /// Whether the exchange is SCRAM-SHA-256-PLUS (`p=tls-server-end-point`).
        bound: bool,
        client_first_bare: Vec<u8>,
        server_first: Vec<u8>,
        combined_nonce: Vec<u8>,
    },
    Done,
}

/// Server side of one SCRAM-SHA-256(-PLUS) exchange with a client.
pub struct ScramServer {
    verifier: ScramVerifier,
    known_user: bool,
    binding: ChannelBinding,
    state: ServerState,
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramServer").finish_non_exhaustive()
    }
}

/// Result of a successful client exchange.
#[derive(Debug)]
pub struct ScramServerFinal {
    /// server-final-message (`v=...`) to send in AuthenticationSASLFinal.
    pub server_final: Vec<u8>,
    /// The client's ClientKey, usable for SCRAM pass-through to backends.
    pub client_key: ClientKey,
}

impl ScramServer {
    /// `known_user == false` means `verifier` is a mock: the exchange runs fully but always fails
    /// at the final step, so a probe cannot tell unknown users from wrong passwords.
    /// The exchange runs as on a plaintext connection (no channel binding).
    pub fn new(verifier: ScramVerifier, known_user: bool) -> Self {
        Self::with_channel_binding(verifier, known_user, ChannelBinding::None)
    }

    /// Like [`ScramServer::new`] for a connection that allows `binding`; the mechanisms offered
    /// to the client must be `binding.mechanisms()`.
    pub fn with_channel_binding(
        verifier: ScramVerifier,
        known_user: bool,
        binding: ChannelBinding,
    ) -> Self {
        Self {
            verifier,
            known_user,
            binding,
            state: ServerState::Initial,
        }
    }

    /// `mechanism` is the name from SASLInitialResponse: "SCRAM-SHA-256", or
    /// "SCRAM-SHA-256-PLUS" when it was offered. `data` is the client-first-message. Returns the
    /// server-first-message.
    pub fn handle_client_first(
        &mut self,
        mechanism: &str,
        data: &[u8],
    ) -> Result<Vec<u8>, ScramError> {
        self.handle_client_first_with_nonce(mechanism, data, &random_nonce())
    }

    /// [`ScramServer::handle_client_first`] with a caller-chosen server nonce; for test vectors.
    pub(crate) fn handle_client_first_with_nonce(
        &mut self,
        mechanism: &str,
        data: &[u8],
        server_nonce: &str,
    ) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, ServerState::Initial) {
            self.state = ServerState::Done;
            return Err(ScramError::OutOfOrder);
        }
        // Any failure below ends the exchange.
        self.state = ServerState::Done;
        // -PLUS is accepted only where it was offered; PostgreSQL treats choosing it on a
        // plaintext connection like any other mechanism it does not support.
        let bound = match mechanism {
            MECHANISM => false,
            MECHANISM_PLUS if self.binding.offers_plus() => true,
            _ => return Err(ScramError::UnsupportedMechanism(mechanism.to_owned())),
        };
        reject_nul(data)?;

        // gs2-header = gs2-cbind-flag "," [ authzid ] ","; the flag must agree with the
        // mechanism (RFC 5802 section 6, PostgreSQL's read_client_first_message).
        let (flag, rest) = split_field(data);
        match flag {
            b"n" | b"y" if bound => {
                return Err(ScramError::Malformed(
                    "client selected SCRAM-SHA-256-PLUS, but sent no channel binding data",
                ))
            }
            b"n" => {}
            // "y": the client can bind but believes we cannot. We offered -PLUS, so the list
            // it saw was tampered with: a downgrade, refused as PostgreSQL does.
            b"y" if self.binding.offers_plus() => {
                return Err(ScramError::ChannelBindingNegotiation)
            }
            b"y" => {}
            [b'p', b'=', ..] if !bound => {
                return Err(ScramError::Malformed(
                    "client selected SCRAM-SHA-256 without channel binding, \
                     but sent channel binding data",
                ))
            }
            [b'p', b'=', cb_name @ ..] => {
                if cb_name != CBIND_TYPE.as_bytes() {
                    return Err(ScramError::ChannelBindingUnsupported);
                }
            }
            _ => return Err(ScramError::Malformed("bad channel binding flag")),
        }
        let rest = rest.ok_or(ScramError::Malformed("truncated gs2 header"))?;
        let (authzid, bare) = split_field(rest);
        // An authzid may be present; PostgreSQL uses the startup user, so we ignore it.
        if !authzid.is_empty() && attr_value(authzid, b'a').is_none() {
            return Err(ScramError::Malformed("bad authzid in gs2 header"));
        }
        let bare = bare.ok_or(ScramError::Malformed("truncated gs2 header"))?;
        let gs2_len = data.len().saturating_sub(bare.len());
        let gs2_header = data.get(..gs2_len).unwrap_or_default();

        // client-first-message-bare = [reserved-mext ","] username "," nonce ["," extensions]
        let (user_field, rest) = split_field(bare);
        if attr_value(user_field, b'm').is_some() {
            return Err(ScramError::Malformed("SCRAM extensions are not supported"));
        }
        // The username is ignored: PostgreSQL authenticates the user from the startup packet.
        attr_value(user_field, b'n').ok_or(ScramError::Malformed("expected username (n=)"))?;
        let rest = rest.ok_or(ScramError::Malformed("missing client nonce"))?;
        let (nonce_field, mut extensions) = split_field(rest);
        let client_nonce =
            attr_value(nonce_field, b'r').ok_or(ScramError::Malformed("expected nonce (r=)"))?;
        if !is_printable_nonce(client_nonce) {
            return Err(ScramError::Malformed(
                "client nonce is empty or not printable",
            ));
        }
        // Optional trailing extensions are ignored, as PostgreSQL does, but must be well-formed.
        while let Some(ext) = extensions {
            let (field, next) = split_field(ext);
            if !is_attr(field) {
                return Err(ScramError::Malformed(
                    "bad attribute in client-first-message",
                ));
            }
            extensions = next;
        }

        let mut combined_nonce = client_nonce.to_vec();
        combined_nonce.extend_from_slice(server_nonce.as_bytes());
        let mut server_first = b"r=".to_vec();
        server_first.extend_from_slice(&combined_nonce);
        server_first.extend_from_slice(
            format!(
                ",s={},i={}",
                B64.encode(&self.verifier.salt),
                self.verifier.iterations
            )
            .as_bytes(),
        );

        // cbind-input = gs2-header [ cbind-data ]: the data only for "p" (RFC 5802 section 7).
        let expected_cbind = match (&self.binding, bound) {
            (ChannelBinding::TlsServerEndPoint(hash), true) => {
                let mut input = gs2_header.to_vec();
                input.extend_from_slice(hash);
                B64.encode(input)
            }
            _ => B64.encode(gs2_header),
        };
        self.state = ServerState::SentFirst {
            expected_cbind,
            bound,
            client_first_bare: bare.to_vec(),
            server_first: server_first.clone(),
            combined_nonce,
        };
        Ok(server_first)
    }

    /// `data` is the client-final-message. On a correct proof returns the server-final-message
    /// (`v=...`) and the recovered ClientKey.
    pub fn handle_client_final(&mut self, data: &[u8]) -> Result<ScramServerFinal, ScramError> {
        let ServerState::SentFirst {
            expected_cbind,
            bound,
            client_first_bare,
            server_first,
            combined_nonce,
        } = std::mem::replace(&mut self.state, ServerState::Done)
        else {
            return Err(ScramError::OutOfOrder);
        };
        reject_nul(data)?;

        // client-final-message = channel-binding "," nonce ["," extensions] "," proof
        // The proof is last and its base64 has no ',', so split at the last comma.
        let split = data
            .iter()
            .rposition(|&b| b == b',')
            .ok_or(ScramError::Malformed("truncated client-final-message"))?;
        let without_proof = data.get(..split).unwrap_or_default();
        let proof_field = data.get(split + 1..).unwrap_or_default();
        let proof_b64 =
            attr_value(proof_field, b'p').ok_or(ScramError::Malformed("expected proof (p=)"))?;

        let (cbind_field, rest) = split_field(without_proof);
        let cbind = attr_value(cbind_field, b'c')
            .ok_or(ScramError::Malformed("expected channel binding (c=)"))?;
        if bound {
            // Constant time: the expected value is public, but the comparison should not
            // tell a prober how much of a forged binding was right. Checked before the proof,
            // like PostgreSQL, and the same way for mock users.
            if !bool::from(cbind.ct_eq(expected_cbind.as_bytes())) {
                return Err(ScramError::ChannelBindingMismatch);
            }
        } else if cbind != expected_cbind.as_bytes() {
            return Err(ScramError::Malformed(
                "channel binding data does not match gs2 header",
            ));
        }
        let rest = rest.ok_or(ScramError::Malformed(
            "missing nonce in client-final-message",
        ))?;
        let (nonce_field, mut extensions) = split_field(rest);
        let nonce =
            attr_value(nonce_field, b'r').ok_or(ScramError::Malformed("expected nonce (r=)"))?;
        if nonce != combined_nonce.as_slice() {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        while let Some(ext) = extensions {
            let (field, next) = split_field(ext);
            if !is_attr(field) {
                return Err(ScramError::Malformed(
                    "bad attribute in client-final-message",
                ));
            }
            extensions = next;
        }
        let proof = decode_key(proof_b64)
            .ok_or(ScramError::Malformed("proof is not 32 bytes of base64"))?;

        // client-final-without-proof exactly as the client sent and signed it: with -PLUS it
        // holds the binding data, and any other AuthMessage would recover a wrong ClientKey
        // for pass-through.
        let auth_message = [
            client_first_bare.as_slice(),
            b",",
            &server_first,
            b",",
            without_proof,
        ];
        let client_signature = hmac(&self.verifier.stored_key, &auth_message);
        let client_key = ClientKey(Zeroizing::new(xor(&proof, &client_signature)));
        // Computed for mock users too, so the failing path costs the same as the succeeding one.
        let server_signature = hmac(&self.verifier.server_key, &auth_message);
        let key_ok = sha256(&client_key.0[..]).ct_eq(&self.verifier.stored_key);
        if !bool::from(key_ok & Choice::from(u8::from(self.known_user))) {
            return Err(ScramError::AuthFailed);
        }
        let mut server_final = b"v=".to_vec();
        server_final.extend_from_slice(B64.encode(server_signature).as_bytes());
        Ok(ScramServerFinal {
            server_final,
            client_key,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// What the proxy authenticates to a backend with.
#[derive(Clone)]
pub enum ScramCredential {
    /// Plaintext password (zeroed on drop).
    Password(String),
    /// SCRAM pass-through: the client's ClientKey plus the verifier it was checked against,
    /// whose salt/iterations the backend must use and whose ServerKey checks the backend.
    ClientKey {
        client_key: ClientKey,
        verifier: ScramVerifier,
    },
}

impl Drop for ScramCredential {
    fn drop(&mut self) {
        if let ScramCredential::Password(p) = self {
            p.zeroize();
        }
    }
}

impl fmt::Debug for ScramCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScramCredential::Password(_) => f.write_str("Password(..)"),
            ScramCredential::ClientKey { verifier, .. } => f
                .debug_struct("ClientKey")
                .field("verifier", verifier)
                .finish_non_exhaustive(),
        }
    }
}

enum ClientState {
    Initial,
    SentFirst {
        client_nonce: String,
        client_first_bare: String,
    },
    SentFinal {
        server_signature: [u8; KEY_LEN],
    },
    Done,
}

/// Keys derived from one password, per (salt, iteration count). PBKDF2 is
/// the costly part of a SCRAM login and a backend's salt does not change, so
/// each user pays it once per backend rather than on every session and
/// every migration. Holds login-equivalent keys, like the password itself.
#[derive(Default)]
pub struct DerivedKeys {
    entries: std::sync::Mutex<Vec<DerivedEntry>>,
}

struct DerivedEntry {
    salt: Vec<u8>,
    iterations: u32,
    client_key: Zeroizing<[u8; KEY_LEN]>,
    server_key: Zeroizing<[u8; KEY_LEN]>,
}

/// Distinct (salt, iterations) pairs remembered per password: one per
/// backend that does not share its verifier.
const MAX_DERIVED: usize = 32;

impl DerivedKeys {
    fn get_or_derive(
        &self,
        password: &str,
        salt: &[u8],
        iterations: u32,
    ) -> (Zeroizing<[u8; KEY_LEN]>, Zeroizing<[u8; KEY_LEN]>) {
        if let Some(e) = self
            .lock()
            .iter()
            .find(|e| e.salt == salt && e.iterations == iterations)
        {
            return (e.client_key.clone(), e.server_key.clone());
        }
        let salted = salted_password(password, salt, iterations);
        let client_key = Zeroizing::new(hmac(&salted, &[b"Client Key"]));
        let server_key = Zeroizing::new(hmac(&salted, &[b"Server Key"]));
        let mut entries = self.lock();
        if entries.len() >= MAX_DERIVED {
            entries.remove(0);
        }
        entries.push(DerivedEntry {
            salt: salt.to_vec(),
            iterations,
            client_key: client_key.clone(),
            server_key: server_key.clone(),
        });
        (client_key, server_key)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<DerivedEntry>> {
        // Entries are pushed whole; a poisoned lock holds no half-entry.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many (salt, iterations) pairs are remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for DerivedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DerivedKeys({} entries)", self.len())
    }
}

/// Client side of one SCRAM-SHA-256 exchange with a backend.
pub struct ScramClient {
    credential: ScramCredential,
    state: ClientState,
    keys: Option<std::sync::Arc<DerivedKeys>>,
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramClient")
            .field("credential", &self.credential)
            .finish_non_exhaustive()
    }
}

impl ScramClient {
    pub fn new(credential: ScramCredential) -> Self {
        Self {
            credential,
            state: ClientState::Initial,
            keys: None,
        }
    }

    /// Like `new`, reusing (and filling) keys derived earlier from the same
    /// password.
    pub fn with_derived_keys(
        credential: ScramCredential,
        keys: std::sync::Arc<DerivedKeys>,
    ) -> Self {
        Self {
            credential,
            state: ClientState::Initial,
            keys: Some(keys),
        }
    }

    /// client-first-message: gs2 header `n,,` (no channel binding toward backends) and an empty
    /// username `n=` like libpq (the backend uses the startup user). Calling it again restarts
    /// the exchange with a fresh nonce.
    pub fn client_first(&mut self) -> Vec<u8> {
        self.client_first_with("", &random_nonce())
    }

    /// [`ScramClient::client_first`] with a caller-chosen username and nonce; for test vectors.
    pub(crate) fn client_first_with(&mut self, user: &str, nonce: &str) -> Vec<u8> {
        // RFC 5802 saslname: ',' and '=' are escaped.
        let user = user.replace('=', "=3D").replace(',', "=2C");
        let client_first_bare = format!("n={user},r={nonce}");
        let msg = format!("n,,{client_first_bare}").into_bytes();
        self.state = ClientState::SentFirst {
            client_nonce: nonce.to_owned(),
            client_first_bare,
        };
        msg
    }

    /// server-first-message -> client-final-message. In ClientKey mode the server's salt and
    /// iteration count must equal the verifier's, else [`ScramError::VerifierMismatch`] (the
    /// backend's verifier differs from the userlist's).
    pub fn handle_server_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let ClientState::SentFirst {
            client_nonce,
            client_first_bare,
        } = std::mem::replace(&mut self.state, ClientState::Done)
        else {
            return Err(ScramError::OutOfOrder);
        };
        reject_nul(data)?;

        // server-first-message = [reserved-mext ","] nonce "," salt "," iteration-count
        let (nonce_field, rest) = split_field(data);
        if attr_value(nonce_field, b'm').is_some() {
            return Err(ScramError::Malformed("SCRAM extensions are not supported"));
        }
        let nonce =
            attr_value(nonce_field, b'r').ok_or(ScramError::Malformed("expected nonce (r=)"))?;
        // The server must extend our nonce, or the exchange could be a replay.
        if nonce.len() <= client_nonce.len()
            || !nonce.starts_with(client_nonce.as_bytes())
            || !is_printable_nonce(nonce)
        {
            return Err(ScramError::Malformed(
                "server nonce does not extend the client nonce",
            ));
        }
        let rest = rest.ok_or(ScramError::Malformed("missing salt"))?;
        let (salt_field, rest) = split_field(rest);
        let salt_b64 =
            attr_value(salt_field, b's').ok_or(ScramError::Malformed("expected salt (s=)"))?;
        let salt = B64
            .decode(salt_b64)
            .map_err(|_| ScramError::Malformed("salt is not valid base64"))?;
        if salt.is_empty() {
            return Err(ScramError::Malformed("empty salt"));
        }
        let rest = rest.ok_or(ScramError::Malformed("missing iteration count"))?;
        let (iter_field, trailing) = split_field(rest);
        if trailing.is_some() {
            // libpq rejects anything after the iteration count too.
            return Err(ScramError::Malformed("garbage after iteration count"));
        }
        let iterations = attr_value(iter_field, b'i')
            .and_then(parse_iterations)
            .ok_or(ScramError::Malformed("bad iteration count (i=)"))?;

        let (client_key, stored_key, server_key) = match &self.credential {
            ScramCredential::Password(password) => {
                let (client_key, server_key) = match &self.keys {
                    Some(keys) => keys.get_or_derive(password, &salt, iterations),
                    None => {
                        let salted = salted_password(password, &salt, iterations);
                        (
                            Zeroizing::new(hmac(&salted, &[b"Client Key"])),
                            Zeroizing::new(hmac(&salted, &[b"Server Key"])),
                        )
                    }
                };
                let stored_key = sha256(&client_key[..]);
                (client_key, stored_key, server_key)
            }
            ScramCredential::ClientKey {
                client_key,
                verifier,
            } => {
                if salt != verifier.salt || iterations != verifier.iterations {
                    return Err(ScramError::VerifierMismatch);
                }
                (
                    client_key.0.clone(),
                    sha256(&client_key.0[..]),
                    Zeroizing::new(verifier.server_key),
                )
            }
        };

        let nonce_str = ascii_string(nonce);
        let without_proof = format!("c=biws,r={nonce_str}");
        let auth_message = [
            client_first_bare.as_bytes(),
            b",",
            data,
            b",",
            without_proof.as_bytes(),
        ];
        let client_signature = hmac(&stored_key, &auth_message);
        let proof = xor(&client_key, &client_signature);
        let server_signature = hmac(&server_key, &auth_message);

        self.state = ClientState::SentFinal { server_signature };
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Verifies the server signature in the server-final-message. `e=<error>` -> AuthFailed.
    pub fn handle_server_final(&mut self, data: &[u8]) -> Result<(), ScramError> {
        let ClientState::SentFinal { server_signature } =
            std::mem::replace(&mut self.state, ClientState::Done)
        else {
            return Err(ScramError::OutOfOrder);
        };
        reject_nul(data)?;
        if attr_value(data, b'e').is_some() {
            return Err(ScramError::AuthFailed);
        }
        let (field, trailing) = split_field(data);
        if trailing.is_some() {
            return Err(ScramError::Malformed("garbage after server signature"));
        }
        let verifier_b64 = attr_value(field, b'v')
            .ok_or(ScramError::Malformed("expected server signature (v=)"))?;
        let received = decode_key(verifier_b64).ok_or(ScramError::Malformed(
            "server signature is not 32 bytes of base64",
        ))?;
        if !bool::from(received.ct_eq(&server_signature)) {
            return Err(ScramError::ServerSignatureMismatch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
