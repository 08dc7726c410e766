//! Live sessions, for the admin API and for shutdown: who is connected and
//! how to reach each session's control channel. Touched at connect and
//! disconnect only, never while forwarding.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use tokio::sync::Notify;
use uuid::Uuid;

use crate::errors::SessionError;
use crate::forwarder::{ControlCommand, ControlSender};

#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub id: Uuid,
    pub client_addr: SocketAddr,
    pub user: String,
    pub database: String,
    pub application_name: Option<String>,
    pub backend: String,
    pub connected_at: SystemTime,
    pub migrations: u32,
    /// A migration of this session is running right now.
    pub transferring: bool,
    /// When it last moved (the balancer's cool-down counts from here).
    pub last_migrated: Option<Instant>,
}

struct Entry {
    info: SessionInfo,
    control: ControlSender,
}

#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<Uuid, Entry>>,
    emptied: Notify,
}

/// Removes the session from the registry when dropped.
pub struct Registration {
    registry: Arc<Registry>,
    id: Uuid,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.registry.lock();
        map.remove(&self.id);
        if map.is_empty() {
            self.registry.emptied.notify_waiters();
        }
    }
}

impl Registry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, Entry>> {
        // Single inserts/removes cannot leave the map half-updated.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(self: &Arc<Self>, info: SessionInfo, control: ControlSender) -> Registration {
        let id = info.id;
        self.lock().insert(id, Entry { info, control });
        Registration {
            registry: self.clone(),
            id,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn list(&self) -> Vec<SessionInfo> {
        self.lock().values().map(|e| e.info.clone()).collect()
    }

    /// The session is being moved (or has stopped being moved).
    pub fn set_transferring(&self, id: Uuid, on: bool) {
        if let Some(e) = self.lock().get_mut(&id) {
            e.info.transferring = on;
        }
    }

    /// The session now runs on `backend`.
    pub fn record_migration(&self, id: Uuid, backend: &str) {
        if let Some(e) = self.lock().get_mut(&id) {
            e.info.backend = backend.to_owned();
            e.info.migrations += 1;
            e.info.last_migrated = Some(Instant::now());
        }
    }

    pub fn get(&self, id: Uuid) -> Option<(SessionInfo, ControlSender)> {
        self.lock()
            .get(&id)
            .map(|e| (e.info.clone(), e.control.clone()))
    }

    /// The sessions running on `backend`, with their control channels.
    pub fn on_backend(&self, backend: &str) -> Vec<(SessionInfo, ControlSender)> {
        self.lock()
            .values()
            .filter(|e| e.info.backend == backend)
            .map(|e| (e.info.clone(), e.control.clone()))
            .collect()
    }

    /// Asks the sessions on `backend` to close at their next message
    /// boundary; returns how many were asked.
    pub fn terminate_on(&self, backend: &str, make: impl Fn() -> SessionError) -> usize {
        let controls: Vec<_> = self
            .on_backend(backend)
            .into_iter()
            .map(|(_, c)| c)
            .collect();
        for c in &controls {
            let _ = c.try_send(ControlCommand::Terminate(make()));
        }
        controls.len()
    }

    /// Asks every session to close at its next message boundary.
    pub fn terminate_all(&self, make: impl Fn() -> SessionError) {
        let controls: Vec<_> = self.lock().values().map(|e| e.control.clone()).collect();
        for c in controls {
            let _ = c.try_send(ControlCommand::Terminate(make()));
        }
    }

    /// Resolves once no session is registered.
    pub async fn wait_empty(&self) {
        loop {
            let notified = self.emptied.notified();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }
}
