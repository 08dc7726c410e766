//! One client session from accept to close: negotiate, authenticate, pick
//! and dial a backend, forward, and say goodbye properly on every path.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use pgferry_wire::messages::{encode_backend_key_data, encode_ready_for_query, encode_terminate};
use pgferry_wire::{tag, CancelKey, StartupMessage};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::backend::dial::{self, DialError, ServerConnection};
use crate::backend::login::{BackendCredentials, LoginAuth};
use crate::backend::role::TargetSessionAttrs;
use crate::backend::BackendLease;
use crate::cancel::{send_cancel, CancelRoute, CancelTarget, SecretLen};
use crate::client::auth::{authenticate, AuthOutcome};
use crate::client::handshake::{negotiate, Negotiated, NegotiationFailure};
use crate::errors::SessionError;
use crate::failover;
use crate::forwarder::tracker::SessionTracker;
use crate::forwarder::{
    control_channel, ForwardEnd, Forwarder, ForwarderParts, HoldWord, Interrupt, TransferOutcome,
    TransferRequest,
};
use crate::metrics::MigrationResult;
use crate::parameters::ParameterList;
use crate::registry::{Registration, SessionInfo};
use crate::stream::{tune_socket, Stream};
use crate::transfer::{self, Remembered, ServerSide, SessionIdentity, TransferError};
use crate::ProxyContext;
use tracing::Instrument;

/// Time allowed for last words (an ErrorResponse, a Terminate, TLS
/// close_notify) to a peer that may not be reading.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);

/// Keeps `pgferry_client_connections` right on every exit path.
pub(crate) struct ClientGauge(prometheus::IntGauge);

impl ClientGauge {
    /// Counts one more client connection until dropped.
    pub(crate) fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}
impl Drop for ClientGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves one client connection. `slot` is its place under
/// `max_client_connections`, held until the connection ends.
pub async fn serve(
    ctx: Arc<ProxyContext>,
    tcp: TcpStream,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
) {
    let gauge = ClientGauge::new(&ctx.metrics.client_connections);
    tune_socket(&tcp, ctx.config.proxy.tcp_keepalive);
    let trail = AuditTrail {
        audit: ctx.audit.as_ref(),
        id: Uuid::new_v4(),
        accepted_at: SystemTime::now(),
        peer,
    };

    // The setup futures are boxed so that the task, which lives as long as
    // the session, is sized for forwarding only.
    // Lines from the setup say whose connection it is, as the session's do.
    let span = tracing::info_span!(
        "session",
        id = %trail.id,
        %peer,
        user = tracing::field::Empty,
        database = tracing::field::Empty,
    );
    let setup = tokio::time::timeout(
        ctx.config.proxy.startup_timeout,
        Box::pin(login(&ctx, tcp, peer, &trail).instrument(span.clone())),
    )
    .await;
    let (client, startup, credentials) = match setup {
        Err(_) => {
            debug!(%peer, "startup deadline passed; closing");
            return;
        }
        Ok(None) => return,
        Ok(Some(x)) => x,
    };
    span.record("user", startup.user());
    span.record("database", startup.database());
    // The admin console's database is never forwarded: pgferry answers it.
    if startup.database() == ctx.config.admin.console_database {
        if !ctx
            .config
            .admin
            .console_users
            .iter()
            .any(|u| u == startup.user())
        {
            let err = SessionError::ConsoleNotAllowed {
                user: startup.user().to_owned(),
            };
            warn!(%peer, user = startup.user(), "refusing the admin console to a user not in [admin] console_users");
            goodbye(client, &err).await;
            trail.ended(err.kind(), 0, 0);
            return;
        }
        crate::console::serve(ctx.clone(), client, startup, peer)
            .instrument(span)
            .await;
        trail.ended("client_closed", 0, 0);
        return;
    }
    let attrs = match TargetSessionAttrs::for_session(&startup, &ctx.config.routing.read_only_users)
    {
        Ok(a) => a,
        Err(why) => {
            let err = SessionError::InvalidStartupOption(why);
            info!(%peer, error = %err, "refusing connection");
            goodbye(client, &err).await;
            trail.ended(err.kind(), 0, 0);
            return;
        }
    };
    let connecting = Box::pin(
        connect_backend(&ctx, client, &startup, &credentials, attrs, peer).instrument(span),
    );
    let (client, server) = match connecting.await {
        Ok(x) => x,
        Err(reason) => {
            trail.ended(reason, 0, 0);
            return;
        }
    };
    // The session goes on in a task of its own, whose future holds only
    // what forwarding needs (`SessionTask`): this task, with its setup
    // steps and its slots for what they handed over, ends now.
    let basics = SessionBasics {
        startup,
        credentials,
        attrs,
        id: trail.id,
        accepted_at: trail.accepted_at,
        peer,
    };
    let established = Box::pin(establish(&ctx, client, server, basics, (gauge, slot))).await;
    if let Some((session, parts)) = established {
        start(session, parts);
    }
}

/// Who a session is, handed from its setup to its own task.
pub(crate) struct SessionBasics {
    pub startup: StartupMessage,
    pub credentials: BackendCredentials,
    pub attrs: TargetSessionAttrs,
    pub id: Uuid,
    pub accepted_at: SystemTime,
    pub peer: SocketAddr,
}

/// This connection's audit row; does nothing without `[audit]`.
struct AuditTrail<'a> {
    audit: Option<&'a pgferry_audit::AuditHandle>,
    id: Uuid,
    accepted_at: SystemTime,
    peer: SocketAddr,
}

impl AuditTrail<'_> {
    fn info(&self, startup: &StartupMessage) -> pgferry_audit::ConnectInfo {
        pgferry_audit::ConnectInfo {
            id: self.id,
            at: self.accepted_at,
            client_addr: Some(self.peer.ip()),
            user: startup.user().to_owned(),
            database: startup.database().to_owned(),
            application_name: startup.param("application_name").map(str::to_owned),
        }
    }

    fn connected(&self, startup: &StartupMessage) {
        if let Some(a) = self.audit {
            a.connect(self.info(startup));
        }
    }

    fn auth_failed(&self, startup: &StartupMessage) {
        if let Some(a) = self.audit {
            a.auth_failed(self.info(startup));
        }
    }

    /// A connection that ended before it had a session.
    fn refused(&self, startup: &StartupMessage, reason: &str) {
        self.connected(startup);
        self.ended(reason, 0, 0);
    }

    fn migrated(&self, record: pgferry_audit::MigrationRecord) {
        if let Some(a) = self.audit {
            a.migrated(record);
        }
    }

    fn ended(&self, reason: &str, bytes_from_client: u64, bytes_to_client: u64) {
        if let Some(a) = self.audit {
            a.disconnect(
                self.id,
                SystemTime::now(),
                reason,
                bytes_from_client,
                bytes_to_client,
            );
        }
    }
}

/// A connection refused because `max_client_connections` is reached: it
/// still gets a proper answer (and cancel requests are still honoured).
pub async fn serve_over_limit(ctx: Arc<ProxyContext>, tcp: TcpStream) {
    let fut = async {
        match negotiate(tcp, &ctx.tls, ctx.config.proxy.max_protocol).await {
            Ok(Negotiated::Cancel(key)) => {
                forward_cancel(&ctx, &key).await;
            }
            Ok(Negotiated::Session { stream, .. }) | Err(NegotiationFailure::Reply(stream, _)) => {
                goodbye(stream, &SessionError::TooManyConnections).await
            }
            Err(NegotiationFailure::Silent(_)) => {}
        }
    };
    let _ = tokio::time::timeout(ctx.config.proxy.startup_timeout, fut).await;
}

/// Negotiation and client authentication. `None`: the connection is done
/// (cancel request, client left, or an error already reported).
async fn login(
    ctx: &ProxyContext,
    tcp: TcpStream,
    peer: SocketAddr,
    trail: &AuditTrail<'_>,
) -> Option<(Stream, StartupMessage, BackendCredentials)> {
    let (mut stream, startup) = match negotiate(tcp, &ctx.tls, ctx.config.proxy.max_protocol).await
    {
        Ok(Negotiated::Session { stream, startup }) => (stream, startup),
        Ok(Negotiated::Cancel(key)) => {
            forward_cancel(ctx, &key).await;
            return None;
        }
        Err(NegotiationFailure::Silent(why)) => {
            debug!(%peer, %why, "closing connection during negotiation");
            return None;
        }
        Err(NegotiationFailure::Reply(stream, err)) => {
            info!(%peer, error = %err, "refusing connection");
            goodbye(stream, &err).await;
            return None;
        }
    };
    // An unaudited connection is not acceptable in this mode.
    if ctx
        .audit
        .as_ref()
        .is_some_and(|a| !a.admits_new_connection())
    {
        warn!(%peer, "refusing connection: audit backlog is full");
        goodbye(stream, &SessionError::AuditBacklogFull).await;
        return None;
    }
    match authenticate(&mut stream, peer.ip(), startup.user(), ctx).await {
        Ok(AuthOutcome::Authenticated(creds)) => {
            trail.connected(&startup);
            Some((stream, startup, creds))
        }
        Ok(AuthOutcome::ClientLeft) => {
            trail.refused(&startup, "client_left");
            None
        }
        Err(err) => {
            if matches!(err, SessionError::AuthFailed { .. }) {
                ctx.metrics.auth_failures.inc();
                trail.auth_failed(&startup);
                warn!(%peer, user = startup.user(), "password authentication failed");
            } else if let SessionError::AuthThrottled { retry_in, .. } = &err {
                trail.auth_failed(&startup);
                warn!(%peer, user = startup.user(), retry_in_ms = retry_in.as_millis() as u64,
                    "authentication throttled after failed attempts");
            } else {
                trail.refused(&startup, err.kind());
                info!(%peer, error = %err, "authentication aborted");
            }
            goodbye(stream, &err).await;
            None
        }
    }
}

/// Routes a cancel request to the backend of the session holding `key`.
/// True when a session held it (PostgreSQL ignores unknown keys; so do we).
pub(crate) async fn forward_cancel(ctx: &ProxyContext, key: &CancelKey) -> bool {
    // A move's capture, dial and replay are each bounded by connect_timeout.
    let wait = ctx.config.proxy.connect_timeout * 3;
    let mut route = ctx.cancel_map.route(key, wait).await;
    if route == CancelRoute::Unknown {
        // While an old pgferry process hands its sessions over, it may
        // still serve this one: it routes the cancel itself. It may also
        // have handed it over meanwhile: then it is here now.
        if let Some(previous) = ctx.handoff.previous() {
            if previous.cancel(key).await == Some(true) {
                return true;
            }
            route = ctx.cancel_map.route(key, wait).await;
        }
    }
    let target = match route {
        CancelRoute::Send(target) => target,
        // Unknown keys are ignored silently, as PostgreSQL does.
        CancelRoute::Unknown => {
            debug!("cancel request with unknown key");
            return false;
        }
        CancelRoute::StillMoving => {
            warn!("cancel request dropped: its session was still moving");
            return true;
        }
        CancelRoute::NothingToCancel => {
            debug!("cancel request dropped: its session was idle through a move");
            return true;
        }
    };
    if let Err(e) = send_cancel(&target, ctx.config.proxy.connect_timeout).await {
        warn!(backend = %target.backend, error = %e, "could not forward cancel request");
    }
    true
}

/// Tries backends in least-connections order until one accepts the login.
/// On failure the client has been told why; the error's kind is returned.
async fn connect_backend(
    ctx: &ProxyContext,
    mut client: Stream,
    startup: &StartupMessage,
    credentials: &BackendCredentials,
    attrs: TargetSessionAttrs,
    peer: SocketAddr,
) -> Result<(Stream, (ServerConnection, BytesMut)), &'static str> {
    // A switchover holding its cluster's sessions, and no other backend
    // for a read-write login: it waits for the new primary rather than
    // fail for want of one.
    if attrs == TargetSessionAttrs::ReadWrite
        && ctx.switchover.is_holding()
        && !ctx
            .backends
            .candidates(attrs)
            .first()
            .is_some_and(|b| b.accepts_sessions())
    {
        ctx.switchover.wait_for_new_primary().await;
    }
    let mut first_failure: Option<SessionError> = None;
    for backend in ctx.backends.candidates(attrs) {
        let mut relay = BytesMut::new();
        let name = backend.name.clone();
        let address = backend.address.clone();
        let err = match dial::connect(
            BackendLease::new(backend),
            &ctx.dial,
            startup,
            LoginAuth::Credentials(credentials),
            &mut relay,
        )
        .await
        {
            Ok(server) => return Ok((client, (server, relay))),
            Err(DialError::Unreachable(reason)) => {
                ctx.metrics
                    .backend_dial_errors
                    .with_label_values(&[name.as_str()])
                    .inc();
                warn!(backend = %name, %address, %reason, "backend unreachable");
                first_failure.get_or_insert(SessionError::BackendUnreachable {
                    backend: name,
                    address,
                    reason,
                });
                continue;
            }
            // Restarting or shutting down: the next backend may take it;
            // if none does, the client hears this server's own words.
            Err(DialError::NotAcceptingLogins(fields)) => {
                info!(backend = %name, "backend takes no logins now; trying the next one");
                first_failure.get_or_insert(SessionError::BackendError(fields));
                continue;
            }
            // A 3.2 session on a backend older than PostgreSQL 18: like a
            // 57P03, another backend may serve it.
            Err(DialError::ProtocolTooOld { .. }) => {
                info!(backend = %name, "backend does not speak protocol 3.2; trying the next one");
                first_failure.get_or_insert(SessionError::ProtocolUnavailable);
                continue;
            }
            Err(DialError::Login(reason)) => SessionError::BackendLogin {
                backend: name,
                reason,
            },
            Err(DialError::Protocol(reason)) => SessionError::BackendProtocol {
                backend: name,
                reason,
            },
            Err(DialError::Server(fields)) => SessionError::BackendError(fields),
        };
        info!(%peer, error = %err, "backend refused the session");
        goodbye_ref(&mut client, &err).await;
        return Err(err.kind());
    }
    let err = first_failure.unwrap_or(SessionError::NoBackendAvailable);
    goodbye(client, &err).await;
    Err(err.kind())
}

/// Registers the session (cancel map, registry) and tells the client it
/// may start: the last setup step, boxed by its caller like the others.
async fn establish(
    ctx: &Arc<ProxyContext>,
    mut client: Stream,
    (server, relay): (ServerConnection, BytesMut),
    basics: SessionBasics,
    held: (ClientGauge, OwnedSemaphorePermit),
) -> Option<(Session, ForwarderParts)> {
    if let Some(a) = &ctx.audit {
        a.backend(basics.id, &server.backend().name);
    }
    let cancel_key = ctx.cancel_map.register(
        CancelTarget {
            backend: server.backend().name.clone(),
            address: server.peer,
            key: server.key.clone(),
        },
        SecretLen::for_minor_version(basics.startup.minor_version),
    );
    let keys = SessionKeys {
        ctx: ctx.clone(),
        cancel_key,
    };

    // Listed before the client hears ReadyForQuery: a client that asks the
    // admin API about itself right after connecting must find itself.
    let (control_tx, control_rx) = control_channel();
    let registration = ctx.registry.register(
        SessionInfo {
            id: basics.id,
            client_addr: basics.peer,
            user: basics.startup.user().to_owned(),
            database: basics.startup.database().to_owned(),
            application_name: basics.startup.param("application_name").map(str::to_owned),
            backend: server.backend().name.clone(),
            connected_at: SystemTime::now(),
            migrations: 0,
            transferring: false,
            last_migrated: None,
        },
        control_tx,
    );
    let mut hello = relay;
    if encode_backend_key_data(&mut hello, &keys.cancel_key).is_err()
        || encode_ready_for_query(&mut hello, server.ready_status).is_err()
    {
        return None;
    }
    send_all(&mut client, hello).await.ok()?;

    debug!(id = %basics.id, peer = %basics.peer, user = basics.startup.user(), backend = %server.backend().name, "session started");

    let ServerConnection {
        stream: server_stream,
        lease,
        parameters,
        ready_status,
        peer: server_peer,
        key: server_key,
    } = server;
    let server = ServerSide {
        lease,
        peer: server_peer,
        key: server_key,
        known: None,
    };
    let parts = ForwarderParts {
        client,
        server: server_stream,
        tracker: SessionTracker::new(ready_status, parameters),
        control: control_rx,
        held_from_client: Vec::new(),
        deferred: Vec::new(),
        bytes_from_client: 0,
        bytes_to_client: 0,
    };
    let session = Session::new(keys, basics, server, registration, held)?;
    Some((session, parts))
}

/// A session with its own backend and its place in the registry and the
/// cancel map: one that logged in here, or one handed over from another
/// pgferry process (`handoff::take`).
pub(crate) struct Established<'c> {
    pub basics: SessionBasics,
    pub server: ServerSide,
    pub cancel_guard: CancelGuard<'c>,
    pub registration: Registration,
    pub _held: (ClientGauge, OwnedSemaphorePermit),
}

/// Starts forwarding an established session in a task of its own and
/// returns at once; the session ends (with a goodbye) or is handed over to
/// a new pgferry process there.
pub(crate) async fn live(ctx: &Arc<ProxyContext>, est: Established<'_>, parts: ForwarderParts) {
    let Established {
        basics,
        server,
        cancel_guard,
        registration,
        _held,
    } = est;
    let keys = SessionKeys {
        ctx: ctx.clone(),
        cancel_key: cancel_guard.into_key(),
    };
    if let Some(session) = Session::new(keys, basics, server, registration, _held) {
        start(session, parts);
    }
}

/// Spawns the session's task.
fn start(session: Session, parts: ForwarderParts) {
    let max_len = session.keys.ctx.config.proxy.max_message_length;
    let metrics = session.keys.ctx.metrics.clone();
    if let Ok(fwd) = Forwarder::from_parts(parts, max_len, metrics) {
        tokio::spawn(SessionTask(TaskState::Forwarding(Box::new(Live {
            session,
            fwd,
        }))));
    }
}

/// The session's cancel key, removed from the map when the session ends;
/// its `ctx` is the session's handle on the proxy.
struct SessionKeys {
    ctx: Arc<ProxyContext>,
    cancel_key: CancelKey,
}

impl Drop for SessionKeys {
    fn drop(&mut self) {
        self.ctx.cancel_map.remove(&self.cancel_key);
    }
}

/// Everything pgferry holds for one live session besides its forwarder,
/// owned by the session's task (`Live`). Kept lean: an idle session is this,
/// its forwarder, its registry entry (which is its control channel) and
/// tokio's two socket registrations. No tracing span is held while it
/// forwards (the subscriber's registry kept ~0.5 KiB per live span); the
/// `session` span is made afresh for each event worth a line.
pub(crate) struct Session {
    keys: SessionKeys,
    server: ServerSide,
    /// Startup parameters packed into one allocation (a `StartupMessage`
    /// is two allocations per parameter); rebuilt when a move needs one.
    startup: ParameterList,
    minor_version: u16,
    protocol_options: Box<[String]>,
    credentials: BackendCredentials,
    attrs: TargetSessionAttrs,
    id: Uuid,
    accepted_at: SystemTime,
    peer: SocketAddr,
    /// Its warm-spare key and the holder of its demand (when spares are on).
    spares: Option<Box<SpareHold>>,
    _registration: Registration,
    _held: (ClientGauge, OwnedSemaphorePermit),
}

/// A session's demand for warm spares, held by a small task of its own
/// (the pool's handle borrows the context) until the session drops it.
struct SpareHold {
    params: transfer::spares::Params,
    _release: tokio::sync::oneshot::Sender<()>,
}

impl Session {
    fn new(
        keys: SessionKeys,
        basics: SessionBasics,
        server: ServerSide,
        registration: Registration,
        held: (ClientGauge, OwnedSemaphorePermit),
    ) -> Option<Self> {
        let SessionBasics {
            startup,
            credentials,
            attrs,
            id,
            accepted_at,
            peer,
        } = basics;
        let spares = keys.ctx.spares.enabled().then(|| {
            let params: transfer::spares::Params =
                Arc::new((startup.minor_version, startup.params.clone()));
            let (release, released) = tokio::sync::oneshot::channel::<()>();
            let (ctx, startup, credentials) =
                (keys.ctx.clone(), startup.clone(), credentials.clone());
            tokio::spawn(async move {
                // Spares for this session's parameters, on every backend,
                // until it ends.
                let demand = ctx.spares.register(&startup, &credentials);
                drop((startup, credentials));
                transfer::spares::refill(&ctx, demand.params());
                let _ = released.await;
            });
            Box::new(SpareHold {
                params,
                _release: release,
            })
        });
        Some(Session {
            keys,
            server,
            startup: ParameterList::from_pairs(
                startup.params.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            ),
            minor_version: startup.minor_version,
            protocol_options: startup.protocol_options.into_boxed_slice(),
            credentials,
            attrs,
            id,
            accepted_at,
            peer,
            spares,
            _registration: registration,
            _held: held,
        })
    }

    /// The client's StartupMessage again (for a move's dial, a hand-off).
    fn startup_message(&self) -> StartupMessage {
        StartupMessage {
            minor_version: self.minor_version,
            params: self
                .startup
                .iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect(),
            protocol_options: self.protocol_options.to_vec(),
        }
    }

    /// The `session` span for lines about this session now.
    fn span(&self, startup: &StartupMessage) -> tracing::Span {
        tracing::info_span!(
            "session",
            id = %self.id,
            user = startup.user(),
            database = startup.database(),
            backend = %self.server.backend().name,
        )
    }
}

/// A forwarding session: what its task owns.
struct Live {
    session: Session,
    fwd: Forwarder<'static>,
}

/// The session's task. While it forwards, the task's future is one box
/// pointer and the forwarder is polled in place: nothing else is kept per
/// idle session. Anything else (a move, a failover, a state sweep, the
/// end) runs as a boxed future that owns the session and gives it back.
struct SessionTask(TaskState);

enum TaskState {
    Forwarding(Box<Live>),
    Busy(Pin<Box<dyn Future<Output = Option<Box<Live>>> + Send>>),
    Done,
}

impl Future for SessionTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let state = &mut self.get_mut().0;
        loop {
            match state {
                TaskState::Forwarding(live) => {
                    let interrupt = match live.fwd.poll_session(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(i) => i,
                    };
                    let TaskState::Forwarding(live) = std::mem::replace(state, TaskState::Done)
                    else {
                        return Poll::Ready(());
                    };
                    *state = TaskState::Busy(Box::pin(interrupted(live, interrupt)));
                }
                TaskState::Busy(busy) => match busy.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(live)) => *state = TaskState::Forwarding(live),
                    Poll::Ready(None) => {
                        *state = TaskState::Done;
                        return Poll::Ready(());
                    }
                },
                TaskState::Done => return Poll::Ready(()),
            }
        }
    }
}

/// Handles what stopped the forwarder, in the session's span. `Some`:
/// forwarding goes on.
async fn interrupted(mut live: Box<Live>, interrupt: Interrupt) -> Option<Box<Live>> {
    let startup = live.session.startup_message();
    let span = live.session.span(&startup);
    async move {
        let stop = {
            let Live { session, fwd } = &mut *live;
            let s = &mut *session;
            let identity = SessionIdentity {
                id: s.id,
                startup: &startup,
                credentials: &s.credentials,
                cancel_key: &s.keys.cancel_key,
                spare_params: s.spares.as_ref().map(|h| &h.params),
                attrs: s.attrs,
            };
            let trail = AuditTrail {
                audit: s.keys.ctx.audit.as_ref(),
                id: s.id,
                accepted_at: s.accepted_at,
                peer: s.peer,
            };
            on_interrupt(
                &s.keys.ctx,
                fwd,
                &mut s.server,
                &identity,
                &trail,
                interrupt,
            )
            .await
        };
        match stop {
            None => Some(live),
            Some(Stop::Ended(end)) => {
                let Live { session: s, fwd } = &mut *live;
                let reason = finish(fwd, end, &s.server.backend().name, s.id).await;
                let trail = AuditTrail {
                    audit: s.keys.ctx.audit.as_ref(),
                    id: s.id,
                    accepted_at: s.accepted_at,
                    peer: s.peer,
                };
                trail.ended(reason, fwd.bytes_from_client, fwd.bytes_to_client);
                None
            }
            Some(Stop::HandOff(request)) => hand_off(live, startup, request).await,
        }
    }
    .instrument(span)
    .await
}

/// At a safe point, asked to go to a new pgferry process: offers it there.
async fn hand_off(
    live: Box<Live>,
    startup: StartupMessage,
    request: TransferRequest,
) -> Option<Box<Live>> {
    let Live { session: s, fwd } = *live;
    let Session {
        keys,
        server,
        startup: packed,
        minor_version,
        protocol_options,
        credentials,
        attrs,
        id,
        accepted_at,
        peer,
        spares,
        _registration,
        _held,
    } = s;
    let basics = SessionBasics {
        startup,
        credentials,
        attrs,
        id,
        accepted_at,
        peer,
    };
    let ctx = &keys.ctx;
    let identity = SessionIdentity {
        id,
        startup: &basics.startup,
        credentials: &basics.credentials,
        cancel_key: &keys.cancel_key,
        spare_params: spares.as_ref().map(|h| &h.params),
        attrs,
    };
    let given =
        crate::handoff::give::offer(ctx, &basics, &server, &identity, fwd.into_parts(), request)
            .await;
    match given {
        // Its sockets, cancel key, audit row and slot in the registry are
        // the new process's now: no goodbye.
        crate::handoff::give::Offered::Given => None,
        crate::handoff::give::Offered::Kept(parts) => {
            let max_len = ctx.config.proxy.max_message_length;
            let mut fwd = Forwarder::from_parts(*parts, max_len, ctx.metrics.clone()).ok()?;
            fwd.resume_after_transfer();
            let SessionBasics { credentials, .. } = basics;
            Some(Box::new(Live {
                session: Session {
                    keys,
                    server,
                    startup: packed,
                    minor_version,
                    protocol_options,
                    credentials,
                    attrs,
                    id,
                    accepted_at,
                    peer,
                    spares,
                    _registration,
                    _held,
                },
                fwd,
            }))
        }
        crate::handoff::give::Offered::Lost(why) => {
            // Frozen and then not resumable here (cannot happen short of a
            // broken runtime): the client hears why.
            warn!(%id, %why, "session lost in a failed hand-off");
            if let Some(a) = &ctx.audit {
                a.disconnect(id, SystemTime::now(), "handoff_failed", 0, 0);
            }
            None
        }
    }
}

/// Why forwarding stopped for good.
enum Stop {
    Ended(ForwardEnd),
    /// At a safe point, asked to go to a new pgferry process.
    HandOff(TransferRequest),
}

/// Migrations, failover and state sweeps happen here, inside the
/// session's own task. `None`: forwarding goes on.
async fn on_interrupt(
    ctx: &Arc<ProxyContext>,
    fwd: &mut Forwarder<'_>,
    server: &mut ServerSide,
    identity: &SessionIdentity<'_>,
    trail: &AuditTrail<'_>,
    interrupt: Interrupt,
) -> Option<Stop> {
    let id = identity.id;
    match interrupt {
        Interrupt::Ended(end @ (ForwardEnd::ServerClosed | ForwardEnd::ServerIo(_))) => {
            let from = server.backend().name.clone();
            let lost_at = SystemTime::now();
            let started = Instant::now();
            let after = Box::pin(failover::after_server_loss(ctx, fwd, server, identity)).await;
            match after {
                None => Some(Stop::Ended(end)),
                Some(failover::AfterLoss::Close(err)) => {
                    Some(Stop::Ended(ForwardEnd::Terminated(err)))
                }
                Some(failover::AfterLoss::Rehomed(to)) => {
                    ctx.registry.record_migration(id, &to);
                    trail.migrated(pgferry_audit::MigrationRecord {
                        id: Uuid::new_v4(),
                        connection_id: id,
                        from_backend: from,
                        to_backend: Some(to),
                        started_at: lost_at,
                        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
                        outcome: "rehomed".to_owned(),
                        reason: Some("its primary went away".to_owned()),
                    });
                    None
                }
            }
        }
        Interrupt::Ended(end) => Some(Stop::Ended(end)),
        Interrupt::Remember => {
            // Cancels wait, as during a move: they must not hit the capture.
            let moving = ctx.cancel_map.moving(identity.cancel_key);
            let r = transfer::remember(ctx, fwd, server, identity, false).await;
            moving.end(fwd.client_sent_during_hold());
            match r {
                Ok(transfer::Remembered::Captured) => ctx.metrics.state_remembered.inc(),
                Ok(_) => {}
                Err(TransferError::BackendEnded { .. }) => {
                    return Some(Stop::Ended(ForwardEnd::ServerClosed))
                }
                Err(TransferError::Fatal(reason) | TransferError::Recoverable(reason)) => {
                    return Some(Stop::Ended(ForwardEnd::Terminated(
                        SessionError::MigrationFailed(reason),
                    )))
                }
            }
            fwd.resume_after_transfer();
            None
        }
        Interrupt::SafePoint(request) if request.hand_off => Some(Stop::HandOff(request)),
        Interrupt::SafePoint(TransferRequest {
            pause: Some(mut pause),
            reply,
            ..
        }) => {
            // An admin's PAUSE: the client's next request waits here.
            let _ = pause.held.send(());
            tokio::select! {
                _ = pause.release.wait_for(|go| *go) => {}
                _ = tokio::time::sleep_until(pause.until.into()) => {}
            }
            let _ = reply.send(TransferOutcome::RecoverableError("paused".into()));
            fwd.resume_after_transfer();
            None
        }
        Interrupt::SafePoint(request) => {
            let fatal = migrate(ctx, fwd, server, identity, request, trail).await;
            if let Some(end) = fatal {
                return Some(Stop::Ended(end));
            }
            fwd.settle_queued_commands();
            None
        }
    }
}

/// Why a move asked for during a hand-off of this process is refused.
const HANDOFF_RUNNING: &str = "pgferry is handing its sessions over to a new process";

/// Writes `bytes` and flushes; the buffer is dropped after.
async fn send_all(stream: &mut Stream, bytes: BytesMut) -> std::io::Result<()> {
    stream.write_all(&bytes).await?;
    stream.flush().await
}

/// Runs one transfer at a safe point and answers its requester. Returns
/// how the session ends when the transfer ended it.
async fn migrate(
    ctx: &Arc<ProxyContext>,
    fwd: &mut Forwarder<'_>,
    server: &mut ServerSide,
    identity: &SessionIdentity<'_>,
    mut request: TransferRequest,
    trail: &AuditTrail<'_>,
) -> Option<ForwardEnd> {
    let paused_at = Instant::now();
    // A switchover's hold: held here, at the safe point, until its word.
    let switchover = request.hold.is_some();
    // Sessions are on their way to a new pgferry process: a move now
    // would only race it (the hand-off comes first; moves resume there).
    if !switchover && ctx.handoff.in_progress() {
        fwd.resume_after_transfer();
        ctx.metrics.migrations.record(MigrationResult::Recoverable);
        let _ = request
            .reply
            .send(TransferOutcome::RecoverableError(HANDOFF_RUNNING.into()));
        return None;
    }
    if let Some(hold) = request.hold.take() {
        // The state is captured now, while the old primary is surely up.
        let moving = ctx.cancel_map.moving(identity.cancel_key);
        let known = transfer::remember(ctx, fwd, server, identity, true).await;
        moving.end(fwd.client_sent_during_hold());
        let known = match known {
            Ok(Remembered::Captured | Remembered::AlreadyKnown) => Ok(()),
            Ok(Remembered::Unknown(why)) => Err(why),
            // The session ends (no answer on `held`): gone, it blocks no
            // switchover.
            Err(TransferError::BackendEnded { .. }) => return Some(ForwardEnd::ServerClosed),
            Err(TransferError::Fatal(why) | TransferError::Recoverable(why)) => {
                return Some(ForwardEnd::Terminated(SessionError::MigrationFailed(why)));
            }
        };
        let movable = known.is_ok();
        let _ = hold.held.send(known);
        let word = if movable {
            tokio::time::timeout_at(hold.until.into(), hold.word).await
        } else {
            Ok(Ok(HoldWord::Release))
        };
        match word {
            Ok(Ok(HoldWord::MoveTo(to))) => request.to = Some(to),
            // Released, or the switchover gave up on it (or is gone):
            // not a migration attempt; the session goes on where it is.
            _ => {
                fwd.resume_after_transfer();
                let _ = request.reply.send(TransferOutcome::RecoverableError(
                    "released by the switchover".into(),
                ));
                return None;
            }
        }
    }
    let from = server.backend().name.clone();
    let started_at = SystemTime::now()
        .checked_sub(request.requested_at.elapsed())
        .unwrap_or_else(SystemTime::now);
    let span = tracing::info_span!(
        "migration",
        session = %identity.id,
        from = %from,
        to = tracing::field::Empty,
        outcome = tracing::field::Empty,
        reason = tracing::field::Empty,
    );
    let from_name = from.clone();
    ctx.registry.set_transferring(identity.id, true);
    // The client's cancels wait until the move is over: they must reach
    // the client's queries, never the capture or replay.
    let moving = ctx.cancel_map.moving(identity.cancel_key);
    let result = transfer::transfer(
        ctx,
        fwd,
        server,
        identity,
        request.to.as_deref(),
        switchover,
    )
    .instrument(span.clone())
    .await;
    moving.end(fwd.client_sent_during_hold());
    ctx.registry.set_transferring(identity.id, false);
    let (outcome, fatal) = match result {
        Ok(to) => {
            fwd.resume_after_transfer();
            if let Some(params) = identity.spare_params {
                transfer::spares::refill(ctx, params);
            }
            ctx.registry.record_migration(identity.id, &to);
            // The session's span (this code runs in it): its backend now.
            tracing::Span::current().record("backend", to.as_str());
            span.record("to", to.as_str());
            span.record("outcome", "success");
            let pause = paused_at.elapsed();
            ctx.metrics.migration_pause.observe(pause.as_secs_f64());
            let duration = request.requested_at.elapsed();
            ctx.metrics
                .migration_duration
                .observe(duration.as_secs_f64());
            ctx.metrics.migrations.record(MigrationResult::Success);
            let outcome = TransferOutcome::Success {
                from,
                to,
                duration,
                pause,
            };
            (outcome, None)
        }
        Err(TransferError::Recoverable(reason)) => {
            fwd.resume_after_transfer();
            span.record("outcome", "recoverable_error");
            span.record("reason", reason.as_str());
            ctx.metrics.migrations.record(MigrationResult::Recoverable);
            (TransferOutcome::RecoverableError(reason), None)
        }
        Err(TransferError::Fatal(reason)) => {
            span.record("outcome", "fatal_error");
            span.record("reason", reason.as_str());
            ctx.metrics.migrations.record(MigrationResult::Fatal);
            (
                TransferOutcome::FatalError(reason.clone()),
                Some(ForwardEnd::Terminated(SessionError::MigrationFailed(
                    reason,
                ))),
            )
        }
        Err(TransferError::BackendEnded { .. }) => {
            // The client has the server's own words (or, if it said none,
            // gets what a closed backend gets); not pgferry's failure.
            span.record("outcome", "session_ended");
            span.record("reason", transfer::BACKEND_ENDED);
            ctx.metrics.migrations.record(MigrationResult::SessionEnded);
            (
                TransferOutcome::SessionEnded(transfer::BACKEND_ENDED.into()),
                Some(ForwardEnd::ServerClosed),
            )
        }
    };
    span.in_scope(|| info!("migration finished"));
    let (outcome_name, to_backend, reason) = match &outcome {
        TransferOutcome::Success { to, .. } => ("success", Some(to.clone()), None),
        TransferOutcome::RecoverableError(r) => ("recoverable_error", None, Some(r.clone())),
        TransferOutcome::FatalError(r) => ("fatal_error", None, Some(r.clone())),
        TransferOutcome::SessionEnded(r) => ("session_ended", None, Some(r.clone())),
    };
    ctx.hooks.record_migration(crate::verbs::MigrationView {
        session: identity.id,
        from: from_name.clone(),
        to: to_backend.clone(),
        started_at,
        duration: request.requested_at.elapsed(),
        outcome: outcome_name,
        reason: reason.clone(),
    });
    trail.migrated(pgferry_audit::MigrationRecord {
        id: Uuid::new_v4(),
        connection_id: identity.id,
        from_backend: from_name,
        to_backend,
        started_at,
        duration_ms: request.requested_at.elapsed().as_secs_f64() * 1000.0,
        outcome: outcome_name.to_owned(),
        reason,
    });
    let _ = request.reply.send(outcome);
    fatal
}

/// Last words on both sockets, according to why forwarding stopped.
/// Returns the disconnect reason for the audit log.
async fn finish(fwd: &mut Forwarder<'_>, end: ForwardEnd, backend: &str, id: Uuid) -> &'static str {
    match &end {
        ForwardEnd::ClientClosed | ForwardEnd::ServerClosed => debug!(%id, ?end, "session ended"),
        _ => info!(%id, ?end, "session ended"),
    }
    let server_alive = !matches!(end, ForwardEnd::ServerClosed | ForwardEnd::ServerIo(_));
    let reason = match &end {
        ForwardEnd::ClientClosed => "client_closed",
        ForwardEnd::ServerClosed if fwd.tracker.client_terminated() => "client_closed",
        ForwardEnd::ServerClosed => "server_closed",
        ForwardEnd::ClientIo(_) => "client_error",
        ForwardEnd::ServerIo(_) => "server_error",
        ForwardEnd::ClientProtocol(_) => "client_protocol",
        ForwardEnd::ServerProtocol(_) => "backend_protocol",
        ForwardEnd::Terminated(err) => err.kind(),
    };
    let client_error = match end {
        ForwardEnd::ClientClosed | ForwardEnd::ClientIo(_) => None,
        ForwardEnd::ServerClosed | ForwardEnd::ServerIo(_) => {
            // PostgreSQL usually says why itself (FATAL 57P01 ...) before
            // closing; one error is enough.
            let server_said_why =
                fwd.tracker.last_response().map(|s| s.tag) == Some(tag::ERROR_RESPONSE);
            (!fwd.tracker.client_terminated() && !server_said_why).then(|| {
                SessionError::BackendClosed {
                    backend: backend.to_owned(),
                }
            })
        }
        ForwardEnd::ClientProtocol(e) => Some(SessionError::ClientProtocol(e.to_string())),
        ForwardEnd::ServerProtocol(e) => Some(SessionError::BackendProtocol {
            backend: backend.to_owned(),
            reason: e.to_string(),
        }),
        ForwardEnd::Terminated(err) => Some(err),
    };
    // An ErrorResponse may only go between two messages.
    if let Some(err) = client_error {
        if fwd.response_at_boundary() {
            goodbye_ref(&mut fwd.client, &err).await;
        }
    }
    if server_alive && !fwd.tracker.client_terminated() && fwd.request_at_boundary() {
        let mut x = BytesMut::new();
        if encode_terminate(&mut x).is_ok() {
            let _ = tokio::time::timeout(GOODBYE_TIMEOUT, fwd.server.write_all(&x)).await;
        }
    }
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, fwd.server.shutdown()).await;
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, fwd.client.shutdown()).await;
    reason
}

/// Removes the session's cancel key from the map when the session ends.
pub(crate) struct CancelGuard<'a>(pub &'a ProxyContext, pub CancelKey);

impl CancelGuard<'_> {
    /// The key, no longer removed by this guard (a `SessionKeys` takes
    /// that over).
    fn into_key(self) -> CancelKey {
        let mut guard = std::mem::ManuallyDrop::new(self);
        // What is left behind owns nothing and is never dropped.
        std::mem::replace(
            &mut guard.1,
            CancelKey {
                pid: 0,
                secret: pgferry_wire::CancelSecret::from_i32(0),
            },
        )
    }
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        self.0.cancel_map.remove(&self.1);
    }
}

/// Sends a FATAL ErrorResponse and closes.
async fn goodbye(mut stream: Stream, err: &SessionError) {
    goodbye_ref(&mut stream, err).await;
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, stream.shutdown()).await;
}

async fn goodbye_ref(stream: &mut Stream, err: &SessionError) {
    let mut buf = BytesMut::new();
    err.encode_for_client(&mut buf);
    let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
        stream.write_all(&buf).await?;
        stream.flush().await
    })
    .await;
}
