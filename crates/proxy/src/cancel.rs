//! The cancel map: pgferry's own cancel keys, each mapped to the backend
//! that currently serves the session.
//!
//! Clients only ever see keys pgferry made up, so a session can change
//! backends (migration) without its cancel key changing. Touched at connect,
//! disconnect, migration and cancel: never on the forwarding path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use pgferry_wire::CancelKey;
use tokio::io::AsyncWriteExt;

/// Where a cancel for one session must go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    pub backend: String,
    pub address: SocketAddr,
    /// The backend's own BackendKeyData.
    pub key: CancelKey,
}

#[derive(Default)]
pub struct CancelMap {
    inner: Mutex<HashMap<CancelKey, CancelTarget>>,
}

impl CancelMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes up a fresh key, unique among live sessions, for `target`.
    pub fn register(&self, target: CancelTarget) -> CancelKey {
        let mut map = self.lock();
        loop {
            let key = CancelKey {
                pid: rand::random::<i32>() & 0x7fff_ffff,
                secret: rand::random(),
            };
            if let std::collections::hash_map::Entry::Vacant(v) = map.entry(key) {
                v.insert(target);
                return key;
            }
        }
    }

    /// Points an existing key at a new backend (after a migration).
    pub fn retarget(&self, key: CancelKey, target: CancelTarget) {
        self.lock().insert(key, target);
    }

    pub fn remove(&self, key: CancelKey) {
        self.lock().remove(&key);
    }

    pub fn lookup(&self, key: CancelKey) -> Option<CancelTarget> {
        self.lock().get(&key).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CancelKey, CancelTarget>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (single inserts/removes), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sends a CancelRequest to the backend, as libpq does: a fresh plain TCP
/// connection carrying only the 16-byte packet.
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

    #[test]
    fn keys_are_unique_and_retargetable() {
        let map = CancelMap::new();
        let t = |port| CancelTarget {
            backend: "pg1".into(),
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            key: CancelKey { pid: 1, secret: 2 },
        };
        let keys: Vec<_> = (0..1000).map(|_| map.register(t(1))).collect();
        assert_eq!(map.len(), 1000);
        assert!(keys.iter().all(|k| k.pid >= 0));
        map.retarget(keys[0], t(2));
        assert_eq!(map.lookup(keys[0]).unwrap().address.port(), 2);
        map.remove(keys[0]);
        assert!(map.lookup(keys[0]).is_none());
        assert!(map.lookup(CancelKey { pid: -1, secret: 0 }).is_none());
    }
}
