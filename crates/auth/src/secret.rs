//! The per-installation secret that user salts and mock verifiers are derived from.

use std::fmt;

use rand::RngCore;
use zeroize::Zeroizing;

/// Length of the secret in bytes.
pub const SECRET_LEN: usize = 32;

/// Keys the salts of plaintext userlist entries and the mock verifiers of unknown users. It must
/// outlive restarts (the proxy keeps it in a file): a salt that changes on restart, while an
/// unknown user's stays put, would tell the two apart. Zeroed on drop; `Debug` redacts it.
pub struct InstallationSecret(Zeroizing<[u8; SECRET_LEN]>);

impl InstallationSecret {
    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// A fresh random secret (for a new installation, and for tests).
    pub fn random() -> Self {
        let mut s = Zeroizing::new([0u8; SECRET_LEN]);
        rand::rng().fill_bytes(&mut *s);
        Self(s)
    }

    /// The bytes, for writing the secret's file.
    pub fn expose(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }

    pub(crate) fn key(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }
}

impl fmt::Debug for InstallationSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InstallationSecret(..)")
    }
}
