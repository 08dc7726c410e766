//! Warm spares: server connections already dialed and logged in, kept per
//! (backend, client startup parameters), for migrations to land on without
//! paying for a dial and a login (about 5 ms here) while the session's
//! traffic is held.
//!
//! Only migrations take spares; a new client session always dials its own
//! connection. A spare is warmed up (the capture and replay queries, so the
//! new server process's catalog caches are filled off any session's pause)
//! and reset with `DISCARD ALL` before it is parked; nothing touches it until
//! a migration takes it, and one that the server closed meanwhile is
//! dropped for a fresh dial. Spares exist only while a session
//! with the same startup parameters does, and only on backends that take
//! sessions; they do not count as sessions on their backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::BytesMut;
use pgferry_wire::messages::encode_terminate;
use pgferry_wire::StartupMessage;
use std::pin::Pin;
use std::task::{Context, Waker};

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tracing::debug;

use crate::backend::dial::{self, DialError, ServerConnection};
use crate::backend::dialect::Dialect;
use crate::backend::login::{BackendCredentials, LoginAuth};
use crate::backend::{Backend, BackendLease};
use crate::metrics::Metrics;
use crate::stream::Stream;
use crate::ProxyContext;

/// The session's protocol minor version and its client's startup
/// parameters, in order: sessions with equal ones get identical server
/// connections (a 3.0 spare cannot serve a 3.2 session, nor the reverse).
pub type Params = Arc<(u16, Vec<(String, String)>)>;

struct Demand {
    sessions: usize,
    startup: StartupMessage,
    credentials: BackendCredentials,
}

#[derive(Default)]
struct Slot {
    ready: Vec<ServerConnection>,
    /// Dials in flight for this slot.
    filling: usize,
}

#[derive(Default)]
struct PoolState {
    demands: HashMap<Params, Demand>,
    slots: HashMap<(String, Params), Slot>,
}

pub struct SparePool {
    per_key: usize,
    state: Mutex<PoolState>,
    metrics: Arc<Metrics>,
}

/// Wants spares for its session's parameters for as long as it lives.
pub struct SpareDemand<'a> {
    pool: &'a SparePool,
    params: Params,
}

impl SpareDemand<'_> {
    /// The parameter set its spares are kept for.
    pub fn params(&self) -> &Params {
        &self.params
    }
}

impl Drop for SpareDemand<'_> {
    fn drop(&mut self) {
        let closing = {
            let mut st = self.pool.lock();
            let Some(d) = st.demands.get_mut(&self.params) else {
                return;
            };
            d.sessions -= 1;
            if d.sessions > 0 {
                return;
            }
            st.demands.remove(&self.params);
            let keys: Vec<_> = st
                .slots
                .keys()
                .filter(|(_, p)| *p == self.params)
                .cloned()
                .collect();
            keys.into_iter()
                .filter_map(|k| st.slots.remove(&k))
                .flat_map(|s| s.ready)
                .collect::<Vec<_>>()
        };
        self.pool.close(closing);
    }
}

impl SparePool {
    pub fn new(per_key: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            per_key,
            state: Mutex::new(PoolState::default()),
            metrics,
        }
    }

    pub fn enabled(&self) -> bool {
        self.per_key > 0
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Every change below is a single insert/remove/push/pop.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A session with these parameters started.
    pub fn register(
        &self,
        startup: &StartupMessage,
        credentials: &BackendCredentials,
    ) -> SpareDemand<'_> {
        let params: Params = Arc::new((startup.minor_version, startup.params.clone()));
        let mut st = self.lock();
        st.demands
            .entry(params.clone())
            .or_insert_with(|| Demand {
                sessions: 0,
                startup: startup.clone(),
                credentials: credentials.clone(),
            })
            .sessions += 1;
        SpareDemand { pool: self, params }
    }

    /// A ready spare on `backend` for these parameters (reset, and still
    /// connected as far as can be told without a round trip), counted as a
    /// session from now on.
    pub fn take(&self, backend: &str, params: &Params) -> Option<ServerConnection> {
        loop {
            let mut conn = {
                let mut st = self.lock();
                st.slots
                    .get_mut(&(backend.to_owned(), params.clone()))?
                    .ready
                    .pop()?
            };
            self.metrics.spares_idle.dec();
            if quiet(&mut conn.stream) {
                conn.lease = conn.lease.into_counted();
                return Some(conn);
            }
            debug!(backend, "warm spare was closed by the server; dropping it");
        }
    }

    /// Closes every spare on `backend` (it stopped taking sessions).
    pub fn discard_backend(&self, backend: &str) {
        let closing: Vec<_> = {
            let mut st = self.lock();
            let keys: Vec<_> = st
                .slots
                .keys()
                .filter(|(b, _)| b == backend)
                .cloned()
                .collect();
            keys.into_iter()
                .filter_map(|k| st.slots.remove(&k))
                .flat_map(|s| s.ready)
                .collect()
        };
        self.close(closing);
    }

    /// Says goodbye to spares off the caller's path.
    fn close(&self, conns: Vec<ServerConnection>) {
        if conns.is_empty() {
            return;
        }
        self.metrics.spares_idle.sub(conns.len() as i64);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // Dropping closes the sockets.
        };
        rt.spawn(async move {
            let mut bye = BytesMut::new();
            if encode_terminate(&mut bye).is_err() {
                return;
            }
            for mut c in conns {
                let _ = c.stream.write_all(&bye).await;
                let _ = c.stream.shutdown().await;
            }
        });
    }
}

/// Tops up every parameter set's spares (a backend started taking
/// sessions: added, activated, healthy again).
pub fn refill_all(ctx: &Arc<ProxyContext>) {
    if !ctx.spares.enabled() {
        return;
    }
    let all: Vec<Params> = ctx.spares.lock().demands.keys().cloned().collect();
    for params in &all {
        refill(ctx, params);
    }
}

/// Tops up the spares for `params` on every backend taking sessions.
pub fn refill(ctx: &Arc<ProxyContext>, params: &Params) {
    let pool = &ctx.spares;
    if !pool.enabled() {
        return;
    }
    // Spares are PostgreSQL's: reset with DISCARD ALL, warmed with the
    // capture query. A CockroachDB session's state comes with its token.
    let backends = ctx.backends.all();
    let postgres = backends
        .iter()
        .filter(|b| b.accepts_sessions() && b.speaks(Dialect::Postgres));
    for backend in postgres {
        let (missing, startup, credentials) = {
            let mut st = pool.lock();
            let Some(d) = st.demands.get(params) else {
                return;
            };
            let (startup, credentials) = (d.startup.clone(), d.credentials.clone());
            let slot = st
                .slots
                .entry((backend.name.clone(), params.clone()))
                .or_default();
            let missing = pool.per_key.saturating_sub(slot.ready.len() + slot.filling);
            slot.filling += missing;
            (missing, startup, credentials)
        };
        for _ in 0..missing {
            let (ctx, backend, params) = (ctx.clone(), backend.clone(), params.clone());
            let (startup, credentials) = (startup.clone(), credentials.clone());
            tokio::spawn(async move {
                fill_one(&ctx, backend, params, &startup, &credentials).await;
            });
        }
    }
}

async fn fill_one(
    ctx: &ProxyContext,
    backend: Arc<Backend>,
    params: Params,
    startup: &StartupMessage,
    credentials: &BackendCredentials,
) {
    let mut chatter = BytesMut::new();
    let max_len = ctx.config.proxy.max_message_length;
    let dialed = match dial::connect(
        BackendLease::idle(backend.clone()),
        &ctx.dial,
        startup,
        LoginAuth::Credentials(credentials),
        &mut chatter,
    )
    .await
    {
        Ok(c) => {
            // The first catalog-heavy queries on a new server process cost
            // several times what they cost later (cold caches); pay for the
            // capture and replay ones now, off any session's pause. What
            // this leaves behind, DISCARD ALL removes when the spare is taken.
            match simple_exchange(c, WARM_UP_SQL.get_or_init(warm_up_sql), max_len).await {
                Ok(c) => reset(c, max_len).await,
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    let pool = &ctx.spares;
    let unwanted = {
        let mut st = pool.lock();
        let wanted = st.demands.contains_key(&params) && backend.accepts_sessions();
        match st.slots.get_mut(&(backend.name.clone(), params)) {
            Some(slot) => {
                slot.filling = slot.filling.saturating_sub(1);
                match dialed {
                    Ok(conn) if wanted => {
                        slot.ready.push(conn);
                        pool.metrics.spares_idle.inc();
                        None
                    }
                    Ok(conn) => Some(conn),
                    Err(e) => {
                        debug!(backend = %backend.name, error = %e, "could not open a warm spare");
                        None
                    }
                }
            }
            None => dialed.ok(),
        }
    };
    if let Some(conn) = unwanted {
        pool.metrics.spares_idle.inc();
        pool.close(vec![conn]);
    }
}

static WARM_UP_SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn warm_up_sql() -> String {
    format!(
        "{}; SELECT set_config('application_name', current_setting('application_name'), false), \
         ARRAY['int4']::text[]::regtype[]::oid[]::text",
        super::capture::capture_query(&[], None)
    )
}

/// A parked connection has nothing to say: any byte (the FATAL of
/// `pg_terminate_backend`, an idle timeout) or EOF means it is gone.
fn quiet(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    Pin::new(stream).poll_read(&mut cx, &mut buf).is_pending()
}

/// Makes a connection as new: `DISCARD ALL`, up to ReadyForQuery.
pub async fn reset(conn: ServerConnection, max_len: u32) -> Result<ServerConnection, DialError> {
    simple_exchange(conn, "DISCARD ALL", max_len).await
}

/// Runs `sql` (one simple Query) and reads up to ReadyForQuery, keeping
/// ParameterStatus changes; any ErrorResponse fails it.
async fn simple_exchange(
    mut conn: ServerConnection,
    sql: &str,
    max_len: u32,
) -> Result<ServerConnection, DialError> {
    use crate::backend::admin_conn::{simple_query, AdminSqlError};
    match simple_query(&mut conn, sql, max_len).await {
        Ok(_) => Ok(conn),
        Err(AdminSqlError::Dial(e)) => Err(e),
        Err(AdminSqlError::Server(f)) => Err(DialError::Server(f)),
        Err(AdminSqlError::Timeout(d)) => {
            Err(DialError::Unreachable(format!("no answer within {d:?}")))
        }
    }
}
