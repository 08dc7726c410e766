//! The cancel map: the cancel key each client holds, mapped to the backend
//! that currently serves its session.
//!
//! A client's key carries the process id of the backend the session first
//! landed on (so `PQbackendPID` matches `pg_backend_pid()` and the pids in
//! notifications and server logs) and a secret pgferry made up. Cancels are
//! routed by the whole (pid, secret) pair, so pids that collide across
//! backends are harmless, and a session keeps its key when it moves.
//! The secret is 4 bytes for a protocol 3.0 session and 32 for a 3.2 one
//! (as PostgreSQL 18 hands out), whatever the backend's own key is.
//! Touched at connect, disconnect, migration and cancel: never on the
//! forwarding path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgferry_wire::{CancelKey, CancelSecret};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use crate::parameters::shared_name;

/// Where a cancel for one session must go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    pub backend: String,
    pub address: SocketAddr,
    /// The backend's own BackendKeyData.
    pub key: CancelKey,
}

/// Boxed in the map, with the backend's name shared: the table keeps
/// room for about twice the live sessions, so a 96-byte bucket (and a name
/// of its own) cost ~250 bytes per session where a pointer costs ~50.
#[derive(Debug)]
struct Entry {
    target: Target,
    /// The session is being moved: its current backend runs pgferry's own
    /// capture and replay, which a client's cancel must never hit.
    moving: bool,
    /// Moves ended so far, and whether the client had sent anything while
    /// the last one ran (see `MovingGuard::end`).
    moves_ended: u64,
    last_move_held_requests: bool,
}

/// What a cancel request should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelRoute {
    Send(CancelTarget),
    /// No live session holds this key (PostgreSQL ignores such requests).
    Unknown,
    /// The session is still moving after the wait allowed.
    StillMoving,
    /// It arrived during a move at whose start the session was idle and
    /// whose client sent nothing meanwhile: nothing ran for it to cancel,
    /// and an idle PostgreSQL backend ignores such a cancel too (sent late,
    /// it could hit the client's next query instead).
    NothingToCancel,
}

/// `CancelTarget` as the map keeps it.
#[derive(Debug)]
struct Target {
    backend: Arc<str>,
    address: SocketAddr,
    key: CancelKey,
}

impl From<CancelTarget> for Target {
    fn from(t: CancelTarget) -> Self {
        Target {
            backend: shared_name(&t.backend),
            address: t.address,
            key: t.key,
        }
    }
}

impl Target {
    fn to_target(&self) -> CancelTarget {
        CancelTarget {
            backend: self.backend.to_string(),
            address: self.address,
            key: self.key.clone(),
        }
    }
}

#[derive(Default)]
pub struct CancelMap {
    inner: Mutex<HashMap<CancelKey, Box<Entry>>>,
    /// Woken whenever a move ends or a key goes.
    changed: Notify,
}

impl CancelMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// The client's key for a session on `target`: the backend's process
    /// id with a fresh secret of `secret_len` bytes (4 for protocol 3.0,
    /// 32 for 3.2), unique among live sessions.
    pub fn register(&self, target: CancelTarget, secret_len: SecretLen) -> CancelKey {
        let mut map = self.lock();
        loop {
            let secret = match secret_len {
                SecretLen::Protocol30 => CancelSecret::from_i32(rand::random()),
                SecretLen::Protocol32 => {
                    let bytes: [u8; 32] = rand::random();
                    match CancelSecret::from_bytes(&bytes) {
                        Some(s) => s,
                        // 32 is within 4..=256: cannot happen.
                        None => CancelSecret::from_i32(rand::random()),
                    }
                }
            };
            let key = CancelKey {
                pid: target.key.pid,
                secret,
            };
            if let std::collections::hash_map::Entry::Vacant(v) = map.entry(key.clone()) {
                v.insert(Box::new(Entry {
                    target: target.into(),
                    moving: false,
                    moves_ended: 0,
                    last_move_held_requests: true,
                }));
                return key;
            }
        }
    }

    /// Registers a key a session already holds (one handed over from
    /// another pgferry process). False if a live session has it already.
    pub fn register_existing(&self, key: CancelKey, target: CancelTarget) -> bool {
        match self.lock().entry(key) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Box::new(Entry {
                    target: target.into(),
                    moving: false,
                    moves_ended: 0,
                    last_move_held_requests: true,
                }));
                true
            }
            std::collections::hash_map::Entry::Occupied(_) => false,
        }
    }

    /// Cancels for `key` wait (see `route`) until the guard is dropped.
    pub fn moving<'a>(&'a self, key: &'a CancelKey) -> MovingGuard<'a> {
        if let Some(e) = self.lock().get_mut(key) {
            e.moving = true;
        }
        MovingGuard {
            map: self,
            key,
            // Unless told otherwise: deliver.
            held_requests: true,
        }
    }

    /// Points an existing key at a new backend (after a migration).
    pub fn retarget(&self, key: &CancelKey, target: CancelTarget) {
        if let Some(e) = self.lock().get_mut(key) {
            e.target = target.into();
        }
    }

    pub fn remove(&self, key: &CancelKey) {
        self.lock().remove(key);
        self.changed.notify_waiters();
    }

    /// Where the session holding `key` runs now, moving or not.
    pub fn lookup(&self, key: &CancelKey) -> Option<CancelTarget> {
        self.lock().get(key).map(|e| e.target.to_target())
    }

    /// Where a cancel for `key` should go, waiting up to `wait` while the
    /// session moves: then it goes to the backend the session runs on
    /// afterwards, never into the move's own queries.
    pub async fn route(&self, key: &CancelKey, wait: Duration) -> CancelRoute {
        let deadline = tokio::time::Instant::now() + wait;
        // The moves count when this cancel first found its session moving.
        let mut held_since: Option<u64> = None;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so no change is missed.
            changed.as_mut().enable();
            match self.lock().get(key) {
                None => return CancelRoute::Unknown,
                Some(e) if !e.moving => {
                    let waited_out_a_move = held_since.is_some_and(|n| e.moves_ended > n);
                    if waited_out_a_move && !e.last_move_held_requests {
                        return CancelRoute::NothingToCancel;
                    }
                    return CancelRoute::Send(e.target.to_target());
                }
                Some(e) => {
                    held_since.get_or_insert(e.moves_ended);
                    tracing::debug!("cancel request held while its session moves");
                }
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return CancelRoute::StillMoving;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CancelKey, Box<Entry>>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (single inserts/removes), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long a secret a session's client key gets: its protocol's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretLen {
    Protocol30,
    Protocol32,
}

impl SecretLen {
    pub fn for_minor_version(minor: u16) -> Self {
        if minor >= 2 {
            SecretLen::Protocol32
        } else {
            SecretLen::Protocol30
        }
    }
}

/// Marks a session as moving for as long as it lives.
pub struct MovingGuard<'a> {
    map: &'a CancelMap,
    key: &'a CancelKey,
    held_requests: bool,
}

impl MovingGuard<'_> {
    /// The move is over; `held_requests`: the client sent something while
    /// it ran, which cancels held meanwhile are for.
    pub fn end(mut self, held_requests: bool) {
        self.held_requests = held_requests;
    }
}

impl Drop for MovingGuard<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.map.lock().get_mut(self.key) {
            e.moving = false;
            e.moves_ended += 1;
            e.last_move_held_requests = self.held_requests;
        }
        self.map.changed.notify_waiters();
    }
}

/// Sends a CancelRequest to the backend, as libpq does: a fresh plain TCP
/// connection carrying only the CancelRequest (16 bytes with a 3.0 key).
pub async fn send_cancel(
    target: &CancelTarget,
    timeout: std::time::Duration,
) -> std::io::Result<()> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(target.address).await?;
        s.write_all(&target.key.request_packet()).await?;
        s.flush().await?;
        // PostgreSQL closes the connection after processing the request;
        // waiting for that keeps the cancel ordered before our next step.
        let mut b = [0u8; 1];
        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut b).await;
        Ok(())
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "cancel request timed out")
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(port: u16) -> CancelTarget {
        CancelTarget {
            backend: "pg1".into(),
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            key: CancelKey {
                pid: 1,
                secret: CancelSecret::from_i32(2),
            },
        }
    }

    #[test]
    fn keys_carry_the_backend_pid_are_unique_and_retargetable() {
        let map = CancelMap::new();
        // Sessions on backends whose process ids collide all get their own key.
        let keys: Vec<_> = (0..1000)
            .map(|_| map.register(t(1), SecretLen::Protocol30))
            .collect();
        assert_eq!(map.len(), 1000);
        assert!(keys.iter().all(|k| k.pid == 1 && k.secret.len() == 4));
        map.retarget(&keys[0], t(2));
        assert_eq!(map.lookup(&keys[0]).unwrap().address.port(), 2);
        map.remove(&keys[0]);
        assert!(map.lookup(&keys[0]).is_none());
        let unknown = CancelKey {
            pid: -1,
            secret: CancelSecret::from_i32(0),
        };
        assert!(map.lookup(&unknown).is_none());
        // Protocol 3.2 sessions get 32-byte secrets, routed by all of them.
        let long = map.register(t(3), SecretLen::Protocol32);
        assert_eq!(long.secret.len(), 32);
        assert_eq!(map.lookup(&long).unwrap().address.port(), 3);
        let mut bytes = long.secret.as_bytes().to_vec();
        bytes[31] ^= 1;
        let near = CancelKey {
            pid: long.pid,
            secret: CancelSecret::from_bytes(&bytes).unwrap(),
        };
        assert!(map.lookup(&near).is_none());
        // Its first four bytes alone are another key.
        let prefix = CancelKey {
            pid: long.pid,
            secret: CancelSecret::from_bytes(&bytes[..4]).unwrap(),
        };
        assert!(map.lookup(&prefix).is_none());
    }

    #[tokio::test]
    async fn a_cancel_held_through_a_move_of_an_idle_session_is_dropped() {
        let map = std::sync::Arc::new(CancelMap::new());
        let key = map.register(t(1), SecretLen::Protocol30);
        let guard = map.moving(&key);
        let waiting = {
            let (map, key) = (map.clone(), key.clone());
            tokio::spawn(async move { map.route(&key, Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        // The client sent nothing while it moved: nothing to cancel.
        guard.end(false);
        assert_eq!(waiting.await.unwrap(), CancelRoute::NothingToCancel);
        // A cancel arriving after the move goes through.
        assert_eq!(
            map.route(&key, Duration::ZERO).await,
            CancelRoute::Send(t(1))
        );
    }

    #[tokio::test]
    async fn a_cancel_waits_for_a_move_and_goes_to_the_new_backend() {
        let map = std::sync::Arc::new(CancelMap::new());
        let key = map.register(t(1), SecretLen::Protocol32);
        let guard = map.moving(&key);
        let waiting = {
            let map = map.clone();
            let key = key.clone();
            tokio::spawn(async move { map.route(&key, Duration::from_secs(30)).await })
        };
        // Not answered while the move runs.
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        map.retarget(&key, t(2));
        drop(guard);
        assert_eq!(waiting.await.unwrap(), CancelRoute::Send(t(2)));
        // A move that outlasts the wait drops the cancel.
        let _guard = map.moving(&key);
        assert_eq!(
            map.route(&key, Duration::from_millis(10)).await,
            CancelRoute::StillMoving
        );
        let unknown = CancelKey {
            pid: 9,
            secret: CancelSecret::from_i32(9),
        };
        assert_eq!(
            map.route(&unknown, Duration::ZERO).await,
            CancelRoute::Unknown
        );
    }
}
