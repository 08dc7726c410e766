//! The userlist file, in PgBouncer `auth_file` format.
//!
//! Each line is `"username" "secret"`; inside quotes a double quote is written `""`. Blank lines
//! and lines starting with `;` or `#` are ignored, as are fields after the second (PgBouncer
//! ignores them). A secret starting with `SCRAM-SHA-256$` is a verifier; `md5` + 32 hex digits
//! is an md5 hash, which we reject (SCRAM cannot be run from it); anything else is a plaintext
//! password. When a user appears twice the later line wins, as in PgBouncer.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use rand::RngCore;
use zeroize::Zeroizing;

use crate::scram::{ScramError, ScramVerifier, DEFAULT_ITERATIONS, DEFAULT_SALT_LEN};

/// A user's secret as written in the file.
#[derive(Clone)]
pub enum Secret {
    Plain(Zeroizing<String>),
    Verifier(ScramVerifier),
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Plain(_) => f.write_str("Plain(..)"),
            Secret::Verifier(v) => f.debug_tuple("Verifier").field(v).finish(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct UserEntry {
    pub name: String,
    pub secret: Secret,
    /// For `Secret::Plain`: derived once at load with a random 16-byte salt and 4096 iterations,
    /// so each login costs no PBKDF2. For `Secret::Verifier`: that verifier.
    pub verifier: ScramVerifier,
    /// For `Secret::Plain`: keys derived for backends' salts, shared by all
    /// of this user's sessions.
    pub backend_keys: std::sync::Arc<crate::scram::DerivedKeys>,
}

/// Errors loading a userlist; each names the origin (file path) and, for content errors, the
/// 1-based line number.
#[derive(Debug, thiserror::Error)]
pub enum UserListError {
    #[error("{origin}: {source}")]
    Io {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}:{line}: file is not valid UTF-8")]
    NotUtf8 { origin: String, line: usize },
    #[error("{origin}:{line}: {reason}")]
    Syntax {
        origin: String,
        line: usize,
        reason: &'static str,
    },
    #[error(
        "{origin}:{line}: user {user:?}: md5 hashes are not supported; \
         use a plaintext password or a SCRAM-SHA-256 verifier"
    )]
    Md5 {
        origin: String,
        line: usize,
        user: String,
    },
    #[error("{origin}:{line}: user {user:?}: {source}")]
    InvalidVerifier {
        origin: String,
        line: usize,
        user: String,
        #[source]
        source: ScramError,
    },
}

/// All users allowed through the proxy.
#[derive(Clone, Debug, Default)]
pub struct UserList {
    users: HashMap<String, UserEntry>,
}

impl UserList {
    /// Reads the file and parses it with the path as origin for error messages.
    pub fn load(path: &Path) -> Result<Self, UserListError> {
        let origin = path.display().to_string();
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| UserListError::Io {
            origin: origin.clone(),
            source,
        })?);
        let text = match std::str::from_utf8(&bytes) {
            Ok(text) => text,
            Err(e) => {
                let valid = bytes.get(..e.valid_up_to()).unwrap_or_default();
                let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
                return Err(UserListError::NotUtf8 { origin, line });
            }
        };
        Self::parse(text, &origin)
    }

    /// Parses userlist text; `origin` names the source in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Self, UserListError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut users = HashMap::new();
        for (idx, raw_line) in text.lines().enumerate() {
            let line = idx + 1;
            let syntax = |reason| UserListError::Syntax {
                origin: origin.to_owned(),
                line,
                reason,
            };
            let trimmed = raw_line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
                continue;
            }
            let (name, rest) = parse_quoted(trimmed).map_err(syntax)?;
            let rest = rest.trim_start();
            if !rest.starts_with('"') {
                return Err(syntax("expected two quoted strings"));
            }
            // Whatever follows the second field is ignored, like PgBouncer does.
            let (secret, _) = parse_quoted(rest).map_err(syntax)?;
            let secret = Zeroizing::new(secret);
            if name.is_empty() {
                return Err(syntax("empty user name"));
            }
            if secret.is_empty() {
                // PostgreSQL refuses empty passwords too; an empty secret is surely a mistake.
                return Err(syntax("empty password"));
            }
            let entry = build_entry(name, secret, origin, line)?;
            users.insert(entry.name.clone(), entry);
        }
        Ok(Self { users })
    }

    pub fn get(&self, user: &str) -> Option<&UserEntry> {
        self.users.get(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Verifier to run the exchange against, and whether the user is known. For unknown users a
    /// deterministic mock verifier (see [`ScramVerifier::mock`]) so repeated probes see a stable
    /// salt and the exchange does not reveal which users exist.
    pub fn verifier_for(&self, user: &str) -> (ScramVerifier, bool) {
        match self.users.get(user) {
            Some(entry) => (entry.verifier.clone(), true),
            None => (ScramVerifier::mock(user), false),
        }
    }
}

fn build_entry(
    name: String,
    secret: Zeroizing<String>,
    origin: &str,
    line: usize,
) -> Result<UserEntry, UserListError> {
    if secret.starts_with("SCRAM-SHA-256$") {
        let verifier =
            ScramVerifier::parse(&secret).map_err(|source| UserListError::InvalidVerifier {
                origin: origin.to_owned(),
                line,
                user: name.clone(),
                source,
            })?;
        return Ok(UserEntry {
            name,
            secret: Secret::Verifier(verifier.clone()),
            verifier,
            backend_keys: Default::default(),
        });
    }
    if is_md5_hash(&secret) {
        return Err(UserListError::Md5 {
            origin: origin.to_owned(),
            line,
            user: name,
        });
    }
    let mut salt = [0u8; DEFAULT_SALT_LEN];
    rand::rng().fill_bytes(&mut salt);
    let verifier = ScramVerifier::from_password(&secret, &salt, DEFAULT_ITERATIONS);
    Ok(UserEntry {
        name,
        secret: Secret::Plain(secret),
        verifier,
        backend_keys: Default::default(),
    })
}

fn is_md5_hash(secret: &str) -> bool {
    secret
        .strip_prefix("md5")
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Parses a `"..."` field at the start of `s` (`""` inside stands for `"`); returns the
/// unquoted value and the rest of the line after the closing quote.
fn parse_quoted(s: &str) -> Result<(String, &str), &'static str> {
    let body = s.strip_prefix('"').ok_or("expected two quoted strings")?;
    let mut value = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        if c != '"' {
            value.push(c);
            continue;
        }
        // A quote is either the first half of an escaped `""` or the closing quote.
        let after = body.get(i + 1..).unwrap_or_default();
        if after.starts_with('"') {
            value.push('"');
            chars.next();
        } else {
            return Ok((value, after));
        }
    }
    // Zero the partial copy: it may be the start of a password.
    drop(Zeroizing::new(value));
    Err("unterminated quoted string")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<UserList, UserListError> {
        UserList::parse(text, "users.txt")
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("expected an error for {text:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_plain_verifier_comments_and_quotes() {
        let v = ScramVerifier::from_password("pw2", b"0123456789abcdef", 4096).to_pg_string();
        let text = format!(
            "; comment\n# another\n\n  \"alice\" \"pa\"\"ss\"\n\"bo\"\"b\" \"{v}\" extra fields\r\n"
        );
        let list = parse(&text).unwrap();
        assert_eq!(list.len(), 2);
        assert!(!list.is_empty());
        let alice = list.get("alice").unwrap();
        match &alice.secret {
            Secret::Plain(p) => assert_eq!(p.as_str(), "pa\"ss"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(alice.verifier.iterations, 4096);
        assert_eq!(alice.verifier.salt.len(), 16);
        // The derived verifier is for the password.
        let again = ScramVerifier::from_password("pa\"ss", &alice.verifier.salt, 4096);
        assert!(again == alice.verifier);
        let bob = list.get("bo\"b").unwrap();
        assert!(matches!(bob.secret, Secret::Verifier(_)));
        assert_eq!(bob.verifier.to_pg_string(), v);
        assert!(list.get("carol").is_none());
    }

    #[test]
    fn later_duplicate_wins() {
        let list = parse("\"u\" \"first\"\n\"u\" \"second\"\n").unwrap();
        assert_eq!(list.len(), 1);
        match &list.get("u").unwrap().secret {
            Secret::Plain(p) => assert_eq!(p.as_str(), "second"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn errors_name_origin_and_line() {
        assert_eq!(
            err("\"a\" \"b\"\n\"x\"\n"),
            "users.txt:2: expected two quoted strings"
        );
        assert_eq!(
            err("\n\"a\" \"b\n"),
            "users.txt:2: unterminated quoted string"
        );
        assert_eq!(
            err("\"a \"b\"\n"),
            "users.txt:1: expected two quoted strings"
        );
        assert_eq!(
            err("alice \"b\""),
            "users.txt:1: expected two quoted strings"
        );
        assert_eq!(err("\"a\" b"), "users.txt:1: expected two quoted strings");
        assert_eq!(err("\"\" \"b\""), "users.txt:1: empty user name");
        assert_eq!(err("\"a\" \"\""), "users.txt:1: empty password");
        let e = err("# x\n\"a\" \"SCRAM-SHA-256$4096:c2FsdA==$bad\"\n");
        assert!(
            e.starts_with("users.txt:2: user \"a\": invalid SCRAM verifier"),
            "{e}"
        );
    }

    #[test]
    fn md5_rejected_but_md5_prefixed_password_allowed() {
        let e = err("\"a\" \"md5 0123\"\n\"b\" \"md50123456789abcdef0123456789ABCDEF\"\n");
        assert_eq!(
            e,
            "users.txt:2: user \"b\": md5 hashes are not supported; \
             use a plaintext password or a SCRAM-SHA-256 verifier"
        );
        // Not 32 hex digits: a plaintext password that happens to start with md5.
        let list = parse("\"a\" \"md5notahash\"").unwrap();
        assert!(matches!(list.get("a").unwrap().secret, Secret::Plain(_)));
    }

    #[test]
    fn debug_does_not_leak_secrets() {
        let list = parse("\"a\" \"hunter2\"").unwrap();
        let dbg = format!("{list:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("Plain(..)"), "{dbg}");
        let v = &list.get("a").unwrap().verifier;
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, v.stored_key);
        assert!(!dbg.contains(&b64));
    }

    #[test]
    fn load_reports_path_and_bad_utf8() {
        let dir = std::env::temp_dir().join(format!("pgferry-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("users.txt");
        std::fs::write(&path, b"\"a\" \"b\"\n\"c\" \"\xff\"\n").unwrap();
        let e = UserList::load(&path).unwrap_err().to_string();
        assert_eq!(e, format!("{}:2: file is not valid UTF-8", path.display()));
        std::fs::write(&path, b"\"a\" \"b\"\n").unwrap();
        assert_eq!(UserList::load(&path).unwrap().len(), 1);
        let missing = dir.join("missing.txt");
        let e = UserList::load(&missing).unwrap_err().to_string();
        assert!(e.starts_with(&missing.display().to_string()), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn verifier_for_known_and_unknown() {
        let list = parse("\"a\" \"pw\"").unwrap();
        let (v, known) = list.verifier_for("a");
        assert!(known);
        assert!(v == list.get("a").unwrap().verifier);
        let (m1, known) = list.verifier_for("nobody");
        assert!(!known);
        let (m2, _) = list.verifier_for("nobody");
        let (other, _) = list.verifier_for("somebody");
        assert_eq!(m1.salt, m2.salt);
        assert_eq!(m1.salt.len(), 16);
        assert_eq!(m1.iterations, 4096);
        assert_ne!(m1.salt, other.salt);
    }
}
