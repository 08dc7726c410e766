//! The installation secret's file (`[auth] secret_file`): 64 hex digits, created with mode 0600
//! when absent. The secret keys user salts and mock verifiers, so it must survive restarts; its
//! value is never logged.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use pgferry_auth::secret::SECRET_LEN;
use pgferry_auth::InstallationSecret;
use thiserror::Error;
use zeroize::Zeroizing;

#[derive(Debug, Error)]
pub enum SecretFileError {
    #[error("{path}: {source} (create it with `openssl rand -hex 32`, mode 0600, or set [auth] secret_file)")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: expected {} hex digits (the file holds a random secret; delete it to make a new one, which changes every user's salt)", SECRET_LEN * 2)]
    Format { path: String },
}

/// Reads the secret from `path`, or creates the file with a fresh one.
pub fn load_or_create(path: &Path) -> Result<InstallationSecret, SecretFileError> {
    let shown = path.display().to_string();
    let io = |source| SecretFileError::Io {
        path: shown.clone(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            if let Ok(meta) = std::fs::metadata(path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(file = %shown, "the auth secret file is readable by others; chmod 600 it");
                }
            }
            decode(&bytes).ok_or(SecretFileError::Format { path: shown })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = InstallationSecret::random();
            let mut text = Zeroizing::new(encode(secret.expose()));
            text.push('\n');
            // create_new: two processes starting at once must not overwrite each other's file.
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
            match created {
                Ok(mut f) => {
                    f.write_all(text.as_bytes()).map_err(io)?;
                    f.sync_all().map_err(io)?;
                    tracing::info!(file = %shown, "created the auth secret file");
                    Ok(secret)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create(path),
                Err(e) => Err(io(e)),
            }
        }
        Err(e) => Err(io(e)),
    }
}

fn decode(bytes: &[u8]) -> Option<InstallationSecret> {
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if text.len() != SECRET_LEN * 2 {
        return None;
    }
    let mut out = Zeroizing::new([0u8; SECRET_LEN]);
    for (dst, pair) in out.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
        let hi = char::from(*pair.first()?).to_digit(16)?;
        let lo = char::from(*pair.get(1)?).to_digit(16)?;
        *dst = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(InstallationSecret::from_bytes(*out))
}

fn encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_mode_0600_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let first = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = load_or_create(&path).unwrap();
        assert_eq!(first.expose(), again.expose());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert!(!format!("{first:?}").contains(text.trim()));
    }

    #[test]
    fn bad_contents_are_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        for bad in ["", "abc", &"zz".repeat(32), &"ab".repeat(33)] {
            std::fs::write(&path, bad).unwrap();
            let e = load_or_create(&path).unwrap_err().to_string();
            assert!(e.starts_with(&path.display().to_string()), "{e}");
            assert!(e.contains("64 hex digits"), "{e}");
        }
        std::fs::write(&path, format!("{}\n", "aB".repeat(32))).unwrap();
        assert_eq!(load_or_create(&path).unwrap().expose(), &[0xab; 32]);
    }
}
