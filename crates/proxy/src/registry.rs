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
use crate::parameters::{shared_name, ParameterList};

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

/// What the registry keeps of a session, in its control channel's
/// allocation; a `SessionInfo` is made from it when asked. The names are
/// shared with every session that has the same (a `SessionInfo` held four
/// strings of its own).
pub(crate) struct Record {
    id: Uuid,
    client_addr: SocketAddr,
    /// user, database and application_name (when given), interned.
    names: ParameterList,
    backend: Arc<str>,
    connected_at: SystemTime,
    migrations: u32,
    transferring: bool,
    last_migrated: Option<Instant>,
}

impl Record {
    fn new(info: SessionInfo) -> Self {
        let mut names = vec![
            ("user", info.user.as_str()),
            ("database", info.database.as_str()),
        ];
        if let Some(app) = &info.application_name {
            names.push(("application_name", app.as_str()));
        }
        Record {
            id: info.id,
            client_addr: info.client_addr,
            names: ParameterList::from_pairs(names),
            backend: shared_name(&info.backend),
            connected_at: info.connected_at,
            migrations: info.migrations,
            transferring: info.transferring,
            last_migrated: info.last_migrated,
        }
    }

    fn info(&self) -> SessionInfo {
        let name = |n: &str| self.names.get(n).unwrap_or_default().to_owned();
        SessionInfo {
            id: self.id,
            client_addr: self.client_addr,
            user: name("user"),
            database: name("database"),
            application_name: self.names.get("application_name").map(str::to_owned),
            backend: self.backend.to_string(),
            connected_at: self.connected_at,
            migrations: self.migrations,
            transferring: self.transferring,
            last_migrated: self.last_migrated,
        }
    }
}

/// A session's entry is its control channel: the record lives in the
/// channel's allocation (`ControlShared::info`), so the map holds one
/// pointer per session and a session costs one allocation here, not a
/// 192-byte bucket (times the table's slack) plus a channel.
#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<Uuid, ControlSender>>,
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

fn info_of(control: &ControlSender) -> Option<SessionInfo> {
    control.shared().info().as_ref().map(Record::info)
}

impl Registry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Uuid, ControlSender>> {
        // Single inserts/removes cannot leave the map half-updated.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(self: &Arc<Self>, info: SessionInfo, control: ControlSender) -> Registration {
        let id = info.id;
        *control.shared().info() = Some(Record::new(info));
        self.lock().insert(id, control);
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
        self.lock().values().filter_map(info_of).collect()
    }

    /// The session is being moved (or has stopped being moved).
    pub fn set_transferring(&self, id: Uuid, on: bool) {
        if let Some(c) = self.lock().get(&id) {
            if let Some(info) = c.shared().info().as_mut() {
                info.transferring = on;
            }
        }
    }

    /// The session now runs on `backend`.
    pub fn record_migration(&self, id: Uuid, backend: &str) {
        if let Some(c) = self.lock().get(&id) {
            if let Some(info) = c.shared().info().as_mut() {
                if &*info.backend != backend {
                    info.backend = shared_name(backend);
                }
                info.migrations += 1;
                info.last_migrated = Some(Instant::now());
            }
        }
    }

    pub fn get(&self, id: Uuid) -> Option<(SessionInfo, ControlSender)> {
        let map = self.lock();
        let control = map.get(&id)?;
        Some((info_of(control)?, control.clone()))
    }

    /// The sessions running on `backend`, with their control channels.
    pub fn on_backend(&self, backend: &str) -> Vec<(SessionInfo, ControlSender)> {
        self.lock()
            .values()
            .filter_map(|c| {
                let info = c.shared().info();
                let info = info.as_ref().filter(|i| &*i.backend == backend)?.info();
                Some((info, c.clone()))
            })
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
        let controls: Vec<_> = self.lock().values().cloned().collect();
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
