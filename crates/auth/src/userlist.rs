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

use std::sync::Arc;

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::scram::{user_salt, ScramError, ScramVerifier, DEFAULT_ITERATIONS};
use crate::secret::InstallationSecret;

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
    /// For `Secret::Plain`: derived at load with the salt [`user_salt`] gives (stable across
    /// reloads and restarts) and the list's iteration count, so each login costs no PBKDF2; kept
    /// across reloads while the password stays the same. For `Secret::Verifier`: that verifier.
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

/// How a userlist is turned into verifiers.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Keys plaintext entries' salts and unknown users' mock verifiers.
    pub secret: Arc<InstallationSecret>,
    /// Iteration count for plaintext entries and mock verifiers. `None`: the dominant count of
    /// the file's verifier entries (the most common; the highest among equally common ones),
    /// [`DEFAULT_ITERATIONS`] without any; so a made-up user looks like most real ones.
    pub iterations: Option<u32>,
    /// The list loaded before: its plaintext entries whose user, password, salt and iteration
    /// count are unchanged are reused as they are (verifier and backend keys), so a reload only
    /// runs PBKDF2 for what changed.
    pub previous: Option<Arc<UserList>>,
}

impl LoadOptions {
    pub fn new(secret: Arc<InstallationSecret>) -> Self {
        Self {
            secret,
            iterations: None,
            previous: None,
        }
    }
}

/// What a load cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Plaintext entries whose verifier was derived (PBKDF2) by this load.
    pub derived: usize,
    /// Plaintext entries taken over unchanged from the previous list.
    pub reused: usize,
}

/// All users allowed through the proxy.
#[derive(Clone, Debug)]
pub struct UserList {
    users: HashMap<String, UserEntry>,
    /// Iteration count of plaintext entries and mock verifiers.
    iterations: u32,
    secret: Arc<InstallationSecret>,
}

impl UserList {
    /// Reads the file and parses it with the path as origin for error messages. Runs PBKDF2 for
    /// every plaintext entry not reused from `options.previous`: CPU-bound, keep it off async
    /// runtimes' worker threads.
    pub fn load(path: &Path, options: &LoadOptions) -> Result<(Self, LoadStats), UserListError> {
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
        Self::parse(text, &origin, options)
    }

    /// Parses userlist text; `origin` names the source in error messages.
    pub fn parse(
        text: &str,
        origin: &str,
        options: &LoadOptions,
    ) -> Result<(Self, LoadStats), UserListError> {
        let secrets = parse_secrets(text, origin)?;
        let iterations = options
            .iterations
            .unwrap_or_else(|| dominant_iterations(secrets.values()));
        let previous = options.previous.as_deref();
        let mut stats = LoadStats::default();
        let mut users = HashMap::with_capacity(secrets.len());
        for (name, secret) in secrets {
            let entry = match secret {
                Secret::Verifier(verifier) => UserEntry {
                    name: name.clone(),
                    secret: Secret::Verifier(verifier.clone()),
                    verifier,
                    backend_keys: Default::default(),
                },
                Secret::Plain(password) => {
                    let salt = user_salt(&options.secret, &name);
                    match previous.and_then(|p| p.reusable(&name, &password, &salt, iterations)) {
                        Some(old) => {
                            stats.reused += 1;
                            old
                        }
                        None => {
                            stats.derived += 1;
                            UserEntry {
                                verifier: ScramVerifier::from_password(
                                    &password, &salt, iterations,
                                ),
                                name: name.clone(),
                                secret: Secret::Plain(password),
                                backend_keys: Default::default(),
                            }
                        }
                    }
                }
            };
            users.insert(name, entry);
        }
        Ok((
            Self {
                users,
                iterations,
                secret: options.secret.clone(),
            },
            stats,
        ))
    }

    /// This list's entry for `name` if it was derived from the same password, salt and
    /// iteration count, so it can be taken over as it is.
    fn reusable(
        &self,
        name: &str,
        password: &str,
        salt: &[u8],
        iterations: u32,
    ) -> Option<UserEntry> {
        let old = self.users.get(name)?;
        let Secret::Plain(old_password) = &old.secret else {
            return None;
        };
        let same = bool::from(old_password.as_bytes().ct_eq(password.as_bytes()))
            && old.verifier.salt == salt
            && old.verifier.iterations == iterations;
        same.then(|| old.clone())
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

    /// Iteration count of plaintext entries and mock verifiers.
    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    /// Verifier to run the exchange against, and whether the user is known. For unknown users a
    /// mock verifier (see [`ScramVerifier::mock`]) with the salt a plaintext entry of that name
    /// would have and the list's iteration count, so the exchange does not reveal which users
    /// exist.
    pub fn verifier_for(&self, user: &str) -> (ScramVerifier, bool) {
        match self.users.get(user) {
            Some(entry) => (entry.verifier.clone(), true),
            None => (
                ScramVerifier::mock(&self.secret, user, self.iterations),
                false,
            ),
        }
    }
}

/// Each user's secret as written, the later line winning; nothing derived yet.
fn parse_secrets(text: &str, origin: &str) -> Result<HashMap<String, Secret>, UserListError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut secrets = HashMap::new();
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
        let secret = parse_secret(&name, secret, origin, line)?;
        secrets.insert(name, secret);
    }
    Ok(secrets)
}

fn parse_secret(
    name: &str,
    secret: Zeroizing<String>,
    origin: &str,
    line: usize,
) -> Result<Secret, UserListError> {
    if secret.starts_with("SCRAM-SHA-256$") {
        let verifier =
            ScramVerifier::parse(&secret).map_err(|source| UserListError::InvalidVerifier {
                origin: origin.to_owned(),
                line,
                user: name.to_owned(),
                source,
            })?;
        return Ok(Secret::Verifier(verifier));
    }
    if is_md5_hash(&secret) {
        return Err(UserListError::Md5 {
            origin: origin.to_owned(),
            line,
            user: name.to_owned(),
        });
    }
    Ok(Secret::Plain(secret))
}

/// The most common iteration count among verifier entries (the highest among equally common
/// ones, so the choice does not depend on map order); the default without any.
fn dominant_iterations<'a>(secrets: impl Iterator<Item = &'a Secret>) -> u32 {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for s in secrets {
        if let Secret::Verifier(v) = s {
            *counts.entry(v.iterations).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|&(iterations, n)| (n, iterations))
        .map_or(DEFAULT_ITERATIONS, |(iterations, _)| iterations)
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

    fn options() -> LoadOptions {
        LoadOptions::new(Arc::new(InstallationSecret::random()))
    }

    fn parse(text: &str) -> Result<UserList, UserListError> {
        UserList::parse(text, "users.txt", &options()).map(|(list, _)| list)
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
        let e = UserList::load(&path, &options()).unwrap_err().to_string();
        assert_eq!(e, format!("{}:2: file is not valid UTF-8", path.display()));
        std::fs::write(&path, b"\"a\" \"b\"\n").unwrap();
        assert_eq!(UserList::load(&path, &options()).unwrap().0.len(), 1);
        let missing = dir.join("missing.txt");
        let e = UserList::load(&missing, &options())
            .unwrap_err()
            .to_string();
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

    fn verifier(iterations: u32, salt: &[u8]) -> String {
        ScramVerifier::from_password("x", salt, iterations).to_pg_string()
    }

    #[test]
    fn salts_are_stable_per_installation_and_shared_with_the_mock() {
        let opts = options();
        let text = "\"a\" \"pw\"\n\"b\" \"pw\"\n";
        let (first, _) = UserList::parse(text, "t", &opts).unwrap();
        let (second, _) = UserList::parse(text, "t", &opts).unwrap();
        let a1 = &first.get("a").unwrap().verifier;
        assert_eq!(a1.salt, second.get("a").unwrap().verifier.salt);
        assert_eq!(a1.salt.len(), 16);
        assert_ne!(a1.salt, first.get("b").unwrap().verifier.salt);
        // Probing "a" before it is added sees the salt it gets once added.
        let (empty, _) = UserList::parse("", "t", &opts).unwrap();
        let (mock, known) = empty.verifier_for("a");
        assert!(!known);
        assert_eq!(mock.salt, a1.salt);
        // Another installation, other salts.
        let (other, _) = UserList::parse(text, "t", &options()).unwrap();
        assert_ne!(other.get("a").unwrap().verifier.salt, a1.salt);
    }

    #[test]
    fn mock_and_plaintext_iterations_follow_the_dominant_verifier_count() {
        let text = format!(
            "\"v1\" \"{}\"\n\"v2\" \"{}\"\n\"v3\" \"{}\"\n\"p\" \"pw\"\n",
            verifier(8192, b"salt-one"),
            verifier(8192, b"salt-two"),
            verifier(4096, b"salt-three"),
        );
        let (list, _) = UserList::parse(&text, "t", &options()).unwrap();
        assert_eq!(list.iterations(), 8192);
        assert_eq!(list.verifier_for("nobody").0.iterations, 8192);
        assert_eq!(list.get("p").unwrap().verifier.iterations, 8192);
        // The plaintext verifier is still the password's.
        let p = &list.get("p").unwrap().verifier;
        assert!(ScramVerifier::from_password("pw", &p.salt, 8192) == *p);
        // A tie goes to the higher count; none at all gives PostgreSQL's default.
        let tie = format!(
            "\"v1\" \"{}\"\n\"v2\" \"{}\"\n",
            verifier(4096, b"s1"),
            verifier(10000, b"s2")
        );
        assert_eq!(
            UserList::parse(&tie, "t", &options())
                .unwrap()
                .0
                .iterations(),
            10000
        );
        assert_eq!(parse("\"p\" \"pw\"").unwrap().iterations(), 4096);
        // A configured count wins.
        let mut opts = options();
        opts.iterations = Some(5000);
        let (list, _) = UserList::parse(&text, "t", &opts).unwrap();
        assert_eq!(list.verifier_for("nobody").0.iterations, 5000);
        assert_eq!(list.get("p").unwrap().verifier.iterations, 5000);
        assert_eq!(list.get("v1").unwrap().verifier.iterations, 8192);
    }

    #[test]
    fn a_reload_derives_only_what_changed() {
        let mut opts = options();
        let (first, stats) = UserList::parse("\"a\" \"pw\"\n\"b\" \"pw\"\n", "t", &opts).unwrap();
        assert_eq!(
            stats,
            LoadStats {
                derived: 2,
                reused: 0
            }
        );
        let first = Arc::new(first);
        opts.previous = Some(first.clone());
        let (second, stats) =
            UserList::parse("\"a\" \"pw\"\n\"b\" \"new\"\n\"c\" \"pw\"\n", "t", &opts).unwrap();
        assert_eq!(
            stats,
            LoadStats {
                derived: 2,
                reused: 1
            }
        );
        // Reused: the very same backend keys; changed: fresh ones, for the new password.
        let (a1, a2) = (first.get("a").unwrap(), second.get("a").unwrap());
        assert!(Arc::ptr_eq(&a1.backend_keys, &a2.backend_keys));
        assert!(a1.verifier == a2.verifier);
        let (b1, b2) = (first.get("b").unwrap(), second.get("b").unwrap());
        assert!(!Arc::ptr_eq(&b1.backend_keys, &b2.backend_keys));
        assert!(ScramVerifier::from_password("new", &b2.verifier.salt, 4096) == b2.verifier);
        // A changed iteration count derives everything again.
        opts.iterations = Some(4097);
        let (_, stats) = UserList::parse("\"a\" \"pw\"\n", "t", &opts).unwrap();
        assert_eq!(
            stats,
            LoadStats {
                derived: 1,
                reused: 0
            }
        );
        // A duplicate line is derived once (the later one).
        let (list, stats) = UserList::parse("\"d\" \"1\"\n\"d\" \"2\"\n", "t", &options()).unwrap();
        assert_eq!(stats.derived, 1);
        assert!(matches!(&list.get("d").unwrap().secret, Secret::Plain(p) if p.as_str() == "2"));
    }
}
