//! `[auth] auth_user` + `auth_query`, as PgBouncer's: the SCRAM verifier of
//! a user the userlist does not have, fetched from a backend.
//!
//! pgferry logs in to a backend that takes sessions as `auth_user` (with
//! the userlist's password for it) on `auth_dbname`, and runs `auth_query`
//! with the user name as `$1` over the extended protocol (never spliced
//! into the SQL). One row (name, SCRAM verifier) is a user who can log in:
//! the exchange runs against that verifier, and the session logs in to
//! backends by SCRAM pass-through with the ClientKey the client's proof
//! yields (no password is ever known). No row, NULL, an md5 hash or a
//! plaintext password is a user who cannot: the exchange runs against the
//! mock verifier, exactly as for a name nobody knows, and fails like a
//! wrong password.
//!
//! Answers, found or not, are kept for `auth_query_ttl` (so a role dropped
//! on the server can log in for at most that long after its last lookup),
//! for at most [`MAX_ENTRIES`] users. Concurrent logins of one user share
//! one lookup. A lookup that fails (no backend, timeout, the query itself)
//! is not kept, and fails the logins waiting for it with one error for
//! every user name.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pgferry_auth::{ScramVerifier, Secret, UserList};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, warn};
use zeroize::{Zeroize, Zeroizing};

use crate::backend::admin_conn::{AdminConn, AdminLogin, ParamResult};
use crate::backend::dial::DialSettings;
use crate::backend::login::BackendCredentials;
use crate::backend::role::TargetSessionAttrs;
use crate::backend::Backend;
use crate::config::{AuthSection, ConfigError};
use crate::ProxyContext;

/// Users whose answer is kept at most; past it, expired answers go first,
/// then the ones closest to expiry.
pub const MAX_ENTRIES: usize = 10_000;
/// Lookups running at once (each one is a backend connection): a flood of
/// made-up names queues here instead of on the backends.
const MAX_RUNNING: usize = 4;

/// What a lookup says about a user.
#[derive(Clone)]
pub enum Answer {
    /// The user's SCRAM verifier, as the backend holds it.
    Found(ScramVerifier),
    /// No such user, or one pgferry cannot log in (no SCRAM verifier).
    NoSuchUser,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Answer::Found(_) => "Found(..)",
            Answer::NoSuchUser => "NoSuchUser",
        })
    }
}

/// Why there is no answer. Never kept: the next login tries again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// `auth_user` has no usable password in the userlist (it was
    /// reloaded without one).
    #[error("auth_user: {0}")]
    AuthUser(String),
    #[error("no backend takes sessions")]
    NoBackend,
    #[error("{0}")]
    Backends(String),
    #[error("no lookup slot free within {0:?} (too many running)")]
    Busy(Duration),
    #[error("the lookup ended without an answer")]
    Lost,
}

type Outcome = Result<Answer, LookupError>;
type Pending = watch::Receiver<Option<Outcome>>;

enum Slot {
    Ready { answer: Answer, expires: Instant },
    Running(Pending),
}

/// How a login gets its answer.
enum Begin {
    Hit(Answer),
    /// Another login's lookup is running: wait for it.
    Join(Pending),
    /// Run the lookup and send its outcome.
    Lead(watch::Sender<Option<Outcome>>, Pending),
}

struct Cache {
    entries: HashMap<String, Slot>,
    /// Users whose unusable secret was already logged.
    warned: HashSet<String>,
}

struct Shared {
    cache: Mutex<Cache>,
    running: Semaphore,
    max_entries: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Cache> {
        // Every critical section leaves the map whole.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin(&self, user: &str, now: Instant) -> Begin {
        let mut c = self.lock();
        match c.entries.get(user) {
            Some(Slot::Ready { answer, expires }) if now < *expires => {
                return Begin::Hit(answer.clone())
            }
            // A lookup whose task died without a word is not waited for.
            Some(Slot::Running(rx)) if rx.has_changed().is_ok() => return Begin::Join(rx.clone()),
            _ => {}
        }
        c.entries.remove(user);
        c.make_room(now, self.max_entries);
        let (tx, rx) = watch::channel(None);
        c.entries.insert(user.to_owned(), Slot::Running(rx.clone()));
        Begin::Lead(tx, rx)
    }

    /// Keeps `outcome` of the lookup `mine` for `ttl` if it is an answer.
    fn finish(&self, user: &str, mine: &Pending, outcome: &Outcome, ttl: Duration, now: Instant) {
        let mut c = self.lock();
        let ours = matches!(c.entries.get(user), Some(Slot::Running(rx)) if rx.same_channel(mine));
        if !ours {
            return;
        }
        match outcome {
            Ok(answer) if !ttl.is_zero() => {
                c.entries.insert(
                    user.to_owned(),
                    Slot::Ready {
                        answer: answer.clone(),
                        expires: now + ttl,
                    },
                );
            }
            _ => {
                c.entries.remove(user);
            }
        }
    }

    /// True the first time `user` is reported (per process, within bounds).
    fn first_warning(&self, user: &str) -> bool {
        let mut c = self.lock();
        if c.warned.len() >= self.max_entries {
            c.warned.clear();
        }
        c.warned.insert(user.to_owned())
    }
}

impl Cache {
    /// Makes room for one more entry: expired answers go, then the one
    /// closest to expiry. Running lookups stay (they are bounded by the
    /// connections waiting for them).
    fn make_room(&mut self, now: Instant, max: usize) {
        if self.entries.len() < max {
            return;
        }
        self.entries
            .retain(|_, s| !matches!(s, Slot::Ready { expires, .. } if *expires <= now));
        if self.entries.len() < max {
            return;
        }
        let oldest = self
            .entries
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Ready { expires, .. } => Some((*expires, k)),
                Slot::Running(_) => None,
            })
            .min()
            .map(|(_, k)| k.clone());
        if let Some(k) = oldest {
            self.entries.remove(&k);
        }
    }
}

/// `[auth] auth_user`, `auth_query`, `auth_dbname`, `auth_query_ttl`, and
/// the answers kept.
pub struct AuthQuery {
    auth_user: String,
    database: String,
    sql: String,
    ttl: Duration,
    /// Every wait of a lookup: a lookup slot, each dial, each query.
    timeout: Duration,
    shared: Arc<Shared>,
}

impl AuthQuery {
    /// `None` without `auth_user`. `users` must give `auth_user` a
    /// plaintext password: pgferry cannot log in with a verifier alone.
    pub fn from_config(
        auth: &AuthSection,
        users: &UserList,
        timeout: Duration,
    ) -> Result<Option<Self>, ConfigError> {
        let Some(auth_user) = &auth.auth_user else {
            return Ok(None);
        };
        credentials_of(users, auth_user).map_err(|reason| ConfigError::Invalid {
            file: auth.userlist.display().to_string(),
            key: "auth.auth_user".into(),
            reason,
        })?;
        Ok(Some(Self::new(
            auth_user,
            &auth.auth_dbname,
            &auth.auth_query,
            auth.auth_query_ttl,
            timeout,
            MAX_ENTRIES,
        )))
    }

    fn new(
        auth_user: &str,
        database: &str,
        sql: &str,
        ttl: Duration,
        timeout: Duration,
        max_entries: usize,
    ) -> Self {
        Self {
            auth_user: auth_user.to_owned(),
            database: database.to_owned(),
            sql: sql.to_owned(),
            ttl,
            timeout,
            shared: Arc::new(Shared {
                cache: Mutex::new(Cache {
                    entries: HashMap::new(),
                    warned: HashSet::new(),
                }),
                running: Semaphore::new(MAX_RUNNING),
                max_entries: max_entries.max(1),
            }),
        }
    }

    /// Users with an answer kept or a lookup running.
    pub fn len(&self) -> usize {
        self.shared.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The answer for `user`: kept, joined, or looked up on a backend.
    pub async fn lookup(&self, ctx: &ProxyContext, user: &str) -> Outcome {
        self.lookup_with(user, || {
            let job = Job {
                user: user.to_owned(),
                auth_user: self.auth_user.clone(),
                database: self.database.clone(),
                sql: self.sql.clone(),
                timeout: self.timeout,
                dial: ctx.dial.clone(),
                candidates: ctx.backends.candidates(TargetSessionAttrs::Any),
                shared: self.shared.clone(),
            };
            let credentials = credentials_of(&ctx.users(), &self.auth_user);
            async move {
                let credentials = credentials.map_err(LookupError::AuthUser)?;
                job.run(credentials).await
            }
        })
        .await
    }

    /// `lookup` with the lookup itself made by `start`. It runs in a task
    /// of its own, so a client that leaves does not abandon the logins
    /// waiting with it, and its answer is kept all the same.
    async fn lookup_with<F, Fut>(&self, user: &str, start: F) -> Outcome
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let mut rx = match self.shared.begin(user, Instant::now()) {
            Begin::Hit(answer) => return Ok(answer),
            Begin::Join(rx) => rx,
            Begin::Lead(tx, rx) => {
                let lookup = start();
                let (shared, ttl, user, mine) =
                    (self.shared.clone(), self.ttl, user.to_owned(), rx.clone());
                tokio::spawn(async move {
                    let outcome = lookup.await;
                    shared.finish(&user, &mine, &outcome, ttl, Instant::now());
                    let _ = tx.send(Some(outcome));
                });
                rx
            }
        };
        // The task's every wait has a deadline; if it dies, the sender goes.
        let outcome = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        };
        outcome.unwrap_or(Err(LookupError::Lost))
    }
}

/// How `auth_user` logs in: with its userlist password.
fn credentials_of(users: &UserList, auth_user: &str) -> Result<BackendCredentials, String> {
    let entry = users.get(auth_user).ok_or_else(|| {
        format!(
            "{auth_user:?} is not in the userlist; pgferry logs in as auth_user with the \
             userlist's password for it"
        )
    })?;
    match &entry.secret {
        Secret::Plain(p) => Ok(BackendCredentials::Password {
            password: Zeroizing::new(p.to_string()),
            keys: entry.backend_keys.clone(),
        }),
        Secret::Verifier(_) => Err(format!(
            "the userlist holds a SCRAM verifier for {auth_user:?}, and pgferry cannot log in \
             with a verifier alone: give its plaintext password"
        )),
    }
}

/// One lookup, on the first backend that answers.
struct Job {
    user: String,
    auth_user: String,
    database: String,
    sql: String,
    timeout: Duration,
    dial: DialSettings,
    candidates: Vec<Arc<Backend>>,
    shared: Arc<Shared>,
}

impl Job {
    async fn run(self, credentials: BackendCredentials) -> Outcome {
        let _slot = match tokio::time::timeout(self.timeout, self.shared.running.acquire()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(LookupError::Lost),
            Err(_) => return Err(LookupError::Busy(self.timeout)),
        };
        if self.candidates.is_empty() {
            return Err(LookupError::NoBackend);
        }
        let login = AdminLogin::for_user(&self.auth_user, &self.database, credentials);
        let mut causes = Vec::new();
        for backend in &self.candidates {
            match self.on(backend.clone(), &login).await {
                Ok(answer) => {
                    let found = matches!(answer, Answer::Found(_));
                    debug!(user = %self.user, backend = %backend.name, found, "auth_query answered");
                    return Ok(answer);
                }
                Err(e) => {
                    warn!(user = %self.user, backend = %backend.name, error = %e,
                        "auth_query failed on this backend");
                    causes.push(format!("backend {}: {e}", backend.name));
                }
            }
        }
        Err(LookupError::Backends(causes.join("; ")))
    }

    async fn on(&self, backend: Arc<Backend>, login: &AdminLogin) -> Result<Answer, String> {
        let mut conn = AdminConn::open(backend, login, &self.dial)
            .await
            .map_err(|e| format!("login as auth_user {:?}: {e}", self.auth_user))?;
        // Two rows are enough to tell one from several.
        let r = conn
            .query_params(&self.sql, &[Some(&self.user)], 2, self.timeout)
            .await;
        tokio::spawn(conn.close());
        let result = r.map_err(|e| format!("auth_query: {e}"))?;
        self.answer(result)
    }

    /// What the rows say about the user; `Err` for rows no auth_query
    /// should return (a wrong query, which every user would hit).
    fn answer(&self, mut result: ParamResult) -> Result<Answer, String> {
        if result.columns.len() < 2 {
            return Err(format!(
                "auth_query must return two columns (user name, password), it returns {}",
                result.columns.len()
            ));
        }
        if result.rows.len() > 1 || result.truncated {
            return Err("auth_query returned more than one row for one user name".into());
        }
        let Some(mut row) = result.rows.pop() else {
            return Ok(Answer::NoSuchUser);
        };
        let mut secret = row.get_mut(1).and_then(Option::take);
        let answer = match (row.first().and_then(Option::as_deref), secret.as_deref()) {
            // PgBouncer's documented function (RETURNS record) answers an
            // unknown name with one row of NULLs.
            (None, None) => Answer::NoSuchUser,
            (Some(name), _) if name != self.user => {
                self.cannot_log_in("auth_query returned a row of another user name");
                Answer::NoSuchUser
            }
            (None, _) => {
                self.cannot_log_in("auth_query returned NULL for the user name");
                Answer::NoSuchUser
            }
            (_, None) => {
                self.cannot_log_in("the user has no password (NULL)");
                Answer::NoSuchUser
            }
            (_, Some(s)) if s.starts_with("SCRAM-SHA-256$") => match ScramVerifier::parse(s) {
                Ok(v) => Answer::Found(v),
                Err(e) => {
                    self.cannot_log_in(&format!("the user's SCRAM verifier is invalid: {e}"));
                    Answer::NoSuchUser
                }
            },
            (_, Some(s)) if s.starts_with("md5") => {
                self.cannot_log_in("the user's password is an md5 hash");
                Answer::NoSuchUser
            }
            (_, Some(_)) => {
                self.cannot_log_in("the user's password is not a SCRAM verifier");
                Answer::NoSuchUser
            }
        };
        if let Some(s) = secret.as_mut() {
            s.zeroize();
        }
        Ok(answer)
    }

    fn cannot_log_in(&self, why: &str) {
        if self.shared.first_warning(&self.user) {
            warn!(user = %self.user, reason = why,
                "auth_query: this user cannot log in through pgferry (only a SCRAM-SHA-256 \
                 verifier will do); logins fail as with a wrong password");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn aq(ttl: Duration, max_entries: usize) -> AuthQuery {
        AuthQuery::new(
            "lookup",
            "postgres",
            "SELECT usename, passwd FROM pg_shadow WHERE usename = $1",
            ttl,
            Duration::from_secs(5),
            max_entries,
        )
    }

    fn verifier() -> ScramVerifier {
        ScramVerifier::from_password("pw", b"salt", 4096)
    }

    fn job(shared: Arc<Shared>) -> Job {
        Job {
            user: "bob".into(),
            auth_user: "lookup".into(),
            database: "postgres".into(),
            sql: "x".into(),
            timeout: Duration::from_secs(1),
            dial: DialSettings {
                tls_mode: Default::default(),
                tls: None,
                connect_timeout: Duration::from_secs(1),
                keepalive: Duration::from_secs(1),
                max_message_len: 1 << 20,
                own_listener: Arc::default(),
            },
            candidates: Vec::new(),
            shared,
        }
    }

    fn rows(columns: usize, rows: &[&[Option<&str>]]) -> ParamResult {
        ParamResult {
            columns: (0..columns).map(|i| format!("c{i}")).collect(),
            rows: rows
                .iter()
                .map(|r| r.iter().map(|c| c.map(str::to_owned)).collect())
                .collect(),
            truncated: false,
        }
    }

    #[tokio::test]
    async fn concurrent_logins_share_one_lookup_and_its_answer_is_kept_for_the_ttl() {
        let q = Arc::new(aq(Duration::from_secs(60), 100));
        let runs = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let mut waiting = Vec::new();
        for _ in 0..8 {
            let (q, runs, gate) = (q.clone(), runs.clone(), gate.clone());
            waiting.push(tokio::spawn(async move {
                q.lookup_with("bob", move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _ = gate.acquire().await;
                    Ok(Answer::Found(verifier()))
                })
                .await
            }));
        }
        // Every login is in (one of them leading), then the lookup ends.
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // Enough for every lookup, should there be more than one.
        gate.add_permits(8);
        for w in waiting {
            assert!(matches!(w.await.unwrap(), Ok(Answer::Found(_))));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Kept: no second lookup.
        let again = q
            .lookup_with("bob", || async { Err(LookupError::NoBackend) })
            .await;
        assert!(matches!(again, Ok(Answer::Found(_))));
        assert_eq!(q.len(), 1);
    }

    #[tokio::test]
    async fn failures_are_not_kept_and_answers_expire() {
        let q = aq(Duration::from_millis(1), 100);
        let failed = q
            .lookup_with("bob", || async { Err(LookupError::NoBackend) })
            .await;
        assert_eq!(failed.unwrap_err(), LookupError::NoBackend);
        assert!(q.is_empty(), "a failure is not an answer");
        let found = q
            .lookup_with("bob", || async { Ok(Answer::NoSuchUser) })
            .await;
        assert!(matches!(found, Ok(Answer::NoSuchUser)));
        // Past the TTL (answers are kept from the lookup's end), the next
        // login looks up again.
        let now = Instant::now() + Duration::from_millis(2);
        assert!(matches!(q.shared.begin("bob", now), Begin::Lead(..)));
    }

    #[tokio::test]
    async fn a_zero_ttl_keeps_nothing() {
        let q = aq(Duration::ZERO, 100);
        let r = q
            .lookup_with("bob", || async { Ok(Answer::Found(verifier())) })
            .await;
        assert!(matches!(r, Ok(Answer::Found(_))));
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn a_lookup_that_dies_fails_its_waiters_and_is_not_waited_for_again() {
        let q = aq(Duration::from_secs(60), 100);
        let r = q
            .lookup_with("bob", || async { panic!("lookup task panics") })
            .await;
        assert_eq!(r.unwrap_err(), LookupError::Lost);
        let r = q
            .lookup_with("bob", || async { Ok(Answer::NoSuchUser) })
            .await;
        assert!(matches!(r, Ok(Answer::NoSuchUser)));
    }

    #[test]
    fn the_cache_is_bounded_dropping_expired_then_oldest_answers() {
        let q = aq(Duration::from_secs(60), 3);
        let s = &q.shared;
        let t0 = Instant::now();
        for (i, user) in ["a", "b", "c"].iter().enumerate() {
            let Begin::Lead(_tx, rx) = s.begin(user, t0) else {
                panic!("lead")
            };
            let at = t0 + Duration::from_secs(i as u64);
            s.finish(
                user,
                &rx,
                &Ok(Answer::NoSuchUser),
                Duration::from_secs(60),
                at,
            );
        }
        assert_eq!(q.len(), 3);
        // Full: "a" expires first and goes.
        let Begin::Lead(_tx, _rx) = s.begin("d", t0 + Duration::from_secs(3)) else {
            panic!("lead")
        };
        assert_eq!(q.len(), 3);
        assert!(matches!(
            s.begin("b", t0 + Duration::from_secs(3)),
            Begin::Hit(_)
        ));
        assert!(!s.lock().entries.contains_key("a"));
        // Past everyone's expiry, the expired all go at once.
        let later = t0 + Duration::from_secs(100);
        let Begin::Lead(_tx2, _rx2) = s.begin("e", later) else {
            panic!("lead")
        };
        assert!(s.lock().entries.len() <= 2, "only running lookups stay");
    }

    #[test]
    fn rows_are_read_strictly() {
        let shared = aq(Duration::from_secs(1), 10).shared;
        let j = job(shared);
        let v = verifier().to_pg_string();
        assert!(matches!(
            j.answer(rows(2, &[&[Some("bob"), Some(&v)]])),
            Ok(Answer::Found(found)) if found.to_pg_string() == v
        ));
        assert!(matches!(j.answer(rows(2, &[])), Ok(Answer::NoSuchUser)));
        assert!(matches!(
            j.answer(rows(2, &[&[None, None]])),
            Ok(Answer::NoSuchUser)
        ));
        for (secret, why) in [
            (None, "NULL"),
            (Some("md5d41d8cd98f00b204e9800998ecf8427e"), "md5"),
            (Some("plaintext"), "plaintext"),
            (Some("SCRAM-SHA-256$broken"), "invalid verifier"),
        ] {
            assert!(
                matches!(
                    j.answer(rows(2, &[&[Some("bob"), secret]])),
                    Ok(Answer::NoSuchUser)
                ),
                "{why}"
            );
        }
        // Logged once, not at every login.
        assert!(!j.shared.first_warning("bob"));
        assert!(j.shared.first_warning("carol"));
        // Another user's row (a query that ignores $1) never logs bob in.
        assert!(matches!(
            j.answer(rows(2, &[&[Some("alice"), Some(&v)]])),
            Ok(Answer::NoSuchUser)
        ));
        assert!(matches!(
            j.answer(rows(2, &[&[None, Some(&v)]])),
            Ok(Answer::NoSuchUser)
        ));
        // Wrong shapes are errors, not "no such user".
        assert!(j.answer(rows(1, &[])).is_err());
        assert!(j
            .answer(rows(
                2,
                &[&[Some("bob"), Some(&v)], &[Some("bob"), Some(&v)]]
            ))
            .is_err());
        let mut truncated = rows(2, &[&[Some("bob"), Some(&v)]]);
        truncated.truncated = true;
        assert!(j.answer(truncated).is_err());
    }

    #[tokio::test]
    async fn no_backend_is_an_error() {
        let j = job(aq(Duration::from_secs(1), 10).shared);
        let creds = BackendCredentials::Password {
            password: Zeroizing::new("pw".into()),
            keys: Default::default(),
        };
        assert_eq!(j.run(creds).await.unwrap_err(), LookupError::NoBackend);
    }

    #[test]
    fn auth_user_needs_a_plaintext_password_in_the_userlist() {
        let options = pgferry_auth::LoadOptions {
            iterations: Some(16),
            ..pgferry_auth::LoadOptions::new(Arc::new(pgferry_auth::InstallationSecret::random()))
        };
        let text = format!(
            "\"lookup\" \"pw\"\n\"copied\" \"{}\"\n",
            verifier().to_pg_string()
        );
        let (users, _) = UserList::parse(&text, "users.txt", &options).unwrap();
        assert!(matches!(
            credentials_of(&users, "lookup"),
            Ok(BackendCredentials::Password { .. })
        ));
        assert!(credentials_of(&users, "copied")
            .unwrap_err()
            .contains("verifier"));
        assert!(credentials_of(&users, "nobody")
            .unwrap_err()
            .contains("not in the userlist"));
    }
}
