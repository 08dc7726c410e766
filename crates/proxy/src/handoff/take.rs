//! The new process's side: ask the running pgferry to hand over, take its
//! listening sockets, then adopt each session it sends, and once it has
//! exited, become the process a later hand-off asks.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgferry_auth::{ClientKey, Secret};
use pgferry_wire::CancelKey;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tracing::{info, warn};
use zeroize::Zeroizing;

use super::channel::{Channel, HandoffListener};
use super::protocol::{offered_state_versions, Frame, MAGIC, PROTOCOL_VERSIONS};
use super::state::{CredentialsCarry, SessionState};
use super::{lock, Status};
use crate::backend::dialect::Dialect;
use crate::backend::login::BackendCredentials;
use crate::backend::role::TargetSessionAttrs;
use crate::backend::BackendLease;
use crate::cancel::CancelTarget;
use crate::forwarder::tracker::SessionTracker;
use crate::forwarder::{control_channel, ForwarderParts};
use crate::registry::SessionInfo;
use crate::session::{CancelGuard, ClientGauge, Established, SessionBasics};
use crate::stream::Stream;
use crate::tls::handover::Frozen;
use crate::transfer::ServerSide;
use crate::ProxyContext;

/// How long each step before the sessions may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cancel forwarded to the old process may take.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// The new process's end of the channel while the old process lives: a
/// cancel for a session the old one still serves goes there.
pub(crate) struct Previous {
    channel: Arc<Channel>,
    cancels: Mutex<HashMap<u64, oneshot::Sender<bool>>>,
    next: AtomicU64,
}

impl Previous {
    /// Asks the old process to route a cancel; Some(true) when it knew the
    /// key.
    pub(crate) async fn cancel(&self, key: &CancelKey) -> Option<bool> {
        let req = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.cancels).insert(req, tx);
        let frame = Frame::Cancel {
            req,
            key: key.into(),
        }
        .encode()
        .ok()?;
        if self.channel.send(&frame, &[]).await.is_err() {
            lock(&self.cancels).remove(&req);
            return None;
        }
        let answer = tokio::time::timeout(CANCEL_TIMEOUT, rx).await;
        lock(&self.cancels).remove(&req);
        answer.ok()?.ok()
    }
}

/// A hand-off in progress, seen from the new process.
pub struct TakingOver {
    channel: Arc<Channel>,
    old_pid: i32,
    state_version: u32,
    /// The old process's listening sockets, now this one's too (taken
    /// by the caller).
    pub listener: Option<TcpListener>,
    pub admin: Option<TcpListener>,
}

async fn recv_frame(channel: &Channel) -> Result<(Frame, Vec<OwnedFd>), String> {
    match tokio::time::timeout(STEP_TIMEOUT, channel.recv()).await {
        Err(_) => Err("the running pgferry said nothing in time".into()),
        Ok(Err(e)) => Err(format!("hand-off socket: {e}")),
        Ok(Ok(None)) => Err("the running pgferry closed the hand-off socket".into()),
        Ok(Ok(Some((bytes, fds)))) => Ok((Frame::decode(&bytes)?, fds)),
    }
}

async fn send_frame(channel: &Channel, frame: &Frame) -> Result<(), String> {
    let bytes = frame.encode()?;
    channel
        .send(&bytes, &[])
        .await
        .map_err(|e| format!("hand-off socket: {e}"))
}

fn listener_from(fd: OwnedFd) -> std::io::Result<TcpListener> {
    let std = std::net::TcpListener::from(fd);
    std.set_nonblocking(true)?;
    TcpListener::from_std(std)
}

/// HELLO .. LISTENERS: on success this process holds the listening
/// sockets (the old one has stopped accepting) and must say LISTENING
/// (`TakingOver::run`) at once. The health checks run before READY, so
/// the old process stops accepting only when this one is ready to serve.
pub async fn connect(ctx: &Arc<ProxyContext>, path: &Path) -> Result<TakingOver, String> {
    let (channel, old_pid) = Channel::connect(path).await.map_err(|e| {
        format!(
            "cannot reach a running pgferry at {} (proxy.handoff_socket): {e}",
            path.display()
        )
    })?;
    ctx.metrics.handoff_in_progress.set(1);
    ctx.handoff.update(|s| {
        *s = Status {
            phase: super::Phase::TakingOver,
            role: Some("new"),
            peer_pid: Some(old_pid),
            pid: std::process::id(),
            ..Status::default()
        }
    });
    send_frame(
        &channel,
        &Frame::Hello {
            magic: MAGIC.into(),
            protocol: PROTOCOL_VERSIONS,
            state: offered_state_versions(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
        },
    )
    .await?;
    let state_version = match recv_frame(&channel).await?.0 {
        Frame::Welcome { state, version, .. } => {
            info!(old_version = %version, old_pid, state_version = state, "the running pgferry agreed to hand over");
            state
        }
        Frame::Refuse { reason } => return Err(format!("the running pgferry refused: {reason}")),
        other => return Err(format!("expected WELCOME, got {}", other.name())),
    };
    // Roles known before the first client, as at any start, and before the
    // old process stops accepting.
    if ctx.admin_login.is_some() {
        crate::balancer::health::check_all(ctx).await;
    }
    ctx.handoff
        .successor_of
        .store(true, std::sync::atomic::Ordering::Release);
    send_frame(&channel, &Frame::Ready).await?;
    let (frame, mut fds) = recv_frame(&channel).await?;
    let Frame::Listeners { proxy, admin } = frame else {
        return Err(format!("expected LISTENERS, got {}", frame.name()));
    };
    if fds.is_empty() || fds.len() != 1 + usize::from(admin.is_some()) {
        return Err("LISTENERS came without its sockets".into());
    }
    let admin_fd = admin.is_some().then(|| fds.remove(1));
    let listener =
        listener_from(fds.remove(0)).map_err(|e| format!("proxy listener {proxy}: {e}"))?;
    let admin = admin_fd
        .map(listener_from)
        .transpose()
        .map_err(|e| format!("admin listener: {e}"))?;
    if listener.local_addr().ok() != Some(proxy) {
        return Err("the passed proxy listener is not the one announced".into());
    }
    if ctx.config.proxy.listen != proxy && ctx.config.proxy.listen.port() != 0 {
        warn!(configured = %ctx.config.proxy.listen, serving = %proxy,
            "proxy.listen changed: this process serves the listener it took over; a plain restart applies the new address");
    }
    Ok(TakingOver {
        channel: Arc::new(channel),
        old_pid,
        state_version,
        listener: Some(listener),
        admin,
    })
}

impl TakingOver {
    pub fn old_pid(&self) -> i32 {
        self.old_pid
    }

    /// Says LISTENING (this process accepts from now on) and opens the way
    /// for cancels of sessions the old process still serves. Called before
    /// this process accepts its first connection: a cancel accepted here
    /// earlier would find neither its session nor the old process, and be
    /// lost (it was, under load); and no CANCEL frame may go out before
    /// LISTENING, which the old process reads first.
    pub async fn confirm_listening(&self, ctx: &ProxyContext) {
        if let Err(e) = send_frame(&self.channel, &Frame::Listening).await {
            warn!(error = %e, "could not confirm the listeners; the old process takes them back");
        }
        *lock(&ctx.handoff.previous) = Some(Arc::new(Previous {
            channel: self.channel.clone(),
            cancels: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        }));
    }

    /// After `confirm_listening`: adopts sessions until the old process is
    /// gone, then opens `audit_gate` (the old process's last audit rows
    /// are written) and serves hand-offs on `handoff_socket` itself.
    pub async fn run(
        self,
        ctx: Arc<ProxyContext>,
        audit_gate: Option<oneshot::Sender<()>>,
        handoff_socket: Option<PathBuf>,
    ) {
        let channel = self.channel;
        let Some(previous) = ctx.handoff.previous() else {
            warn!("hand-off: run without confirm_listening; nothing to adopt");
            return;
        };
        let (mut adopted, mut refused) = (0u64, 0u64);
        let mut notified = false;
        loop {
            let (bytes, fds) = match channel.recv().await {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, "hand-off socket failed");
                    break;
                }
            };
            let frame = match Frame::decode(&bytes) {
                Ok(f) => f,
                Err(e) => {
                    warn!(error = %e, "bad hand-off frame; ending the hand-off");
                    break;
                }
            };
            match frame {
                Frame::Session { state } => {
                    let id = state.id;
                    if test_hook_die_at(adopted + refused + 1) {
                        warn!("PGFERRY_TEST_HANDOFF_DIE_AT_SESSION: exiting before the ACK (test hook)");
                        std::process::exit(70);
                    }
                    match adopt(&ctx, *state, fds, self.state_version) {
                        Ok(session) => {
                            // The ACK first: the old process stops touching
                            // the session when it reads it, and this one
                            // starts only after writing it.
                            let acked = send_frame(&channel, &Frame::Ack { id }).await;
                            if let Err(e) = acked {
                                // The old process is gone: the session is
                                // this one's (its copies closed with it).
                                warn!(session = %id, error = %e, "could not ACK a session; keeping it");
                            }
                            adopted += 1;
                            ctx.metrics
                                .handoff_sessions
                                .with_label_values(&["adopted"])
                                .inc();
                            session.start(ctx.clone());
                        }
                        Err(reason) => {
                            refused += 1;
                            ctx.metrics
                                .handoff_sessions
                                .with_label_values(&["refused"])
                                .inc();
                            warn!(session = %id, %reason, "refused a session; it stays with the old process");
                            let _ = send_frame(&channel, &Frame::Nack { id, reason }).await;
                        }
                    }
                    ctx.handoff.update(|s| {
                        s.handed_over = adopted;
                        s.kept = refused;
                    });
                }
                Frame::Cancelled { req, found } => {
                    if let Some(tx) = lock(&previous.cancels).remove(&req) {
                        let _ = tx.send(found);
                    }
                }
                Frame::Done { kept } => {
                    info!(
                        adopted,
                        kept, "the old process handed over what it could; it exits when empty"
                    );
                    ctx.handoff.update(|s| s.remaining = kept);
                    // Not before: while the old process may still take
                    // everything back, it is the service's main process.
                    main_process_now(&mut notified);
                }
                other => warn!(frame = other.name(), "unexpected hand-off frame; ignored"),
            }
        }
        // The channel ends when the old process does.
        main_process_now(&mut notified);
        *lock(&ctx.handoff.previous) = None;
        drop(audit_gate);
        ctx.metrics.handoff_in_progress.set(0);
        ctx.handoff.update(|s| {
            s.phase = super::Phase::Done;
            s.remaining = 0;
        });
        info!(
            adopted,
            refused, "the old process has exited; hand-off complete"
        );
        if let Some(path) = handoff_socket {
            match bind_after(&path, self.old_pid).await {
                Ok(l) => {
                    tokio::spawn(super::give::serve_takeovers(ctx, l));
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot listen on the hand-off socket; a later takeover of this process is not possible")
                }
            }
        }
    }
}

/// systemd (`Type=notify`, `NotifyAccess=all`): this process is the
/// service's main one from now on. Once.
fn main_process_now(notified: &mut bool) {
    if !std::mem::replace(notified, true) {
        crate::systemd::notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
    }
}

/// Binds the hand-off socket the old process leaves behind. The channel
/// ends as the old process exits, a moment before its own listening
/// socket closes: until then the path still answers, so a few tries.
async fn bind_after(path: &Path, old_pid: i32) -> std::io::Result<HandoffListener> {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        match HandoffListener::bind(path) {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tracing::debug!(old_pid, "the old process's hand-off socket is still open");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// `PGFERRY_TEST_HANDOFF_DIE_AT_SESSION=N`: the new process exits when
/// its Nth session arrives, before answering it (tests of an aborted
/// hand-off only): sessions 1..N-1 are its own and die with it.
fn test_hook_die_at(adopted: u64) -> bool {
    std::env::var("PGFERRY_TEST_HANDOFF_DIE_AT_SESSION")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n == adopted)
}

/// A session ready to run here, once its ACK is written.
pub(crate) struct Adopted {
    basics: SessionBasics,
    server: ServerSide,
    cancel_key: CancelKey,
    parts: ForwarderParts,
    registration: crate::registry::Registration,
    slot: OwnedSemaphorePermit,
    gauge: ClientGauge,
    paused_at_ns: u64,
}

impl Adopted {
    fn start(self, ctx: Arc<ProxyContext>) {
        // The session's whole pause: from its safe point in the old
        // process to forwarding here.
        let paused = super::monotonic_ns().saturating_sub(self.paused_at_ns);
        ctx.metrics.handoff_pause.observe(paused as f64 / 1e9);
        tokio::spawn(async move {
            let ctx = &ctx;
            let est = Established {
                basics: self.basics,
                server: self.server,
                cancel_guard: CancelGuard(ctx, self.cancel_key),
                registration: self.registration,
                _held: (self.gauge, self.slot),
            };
            crate::session::live(ctx, est, self.parts).await;
        });
    }
}

fn stream_from(
    fd: OwnedFd,
    tls: Option<crate::tls::handover::TlsState>,
    pending: Vec<u8>,
) -> Result<Stream, String> {
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::from_std(std).map_err(|e| e.to_string())?;
    Frozen { tcp, tls, pending }
        .thaw()
        .map_err(|e| format!("cannot continue the stream: {e}"))
}

/// Everything a session needs here, checked before anything is
/// registered; no I/O on its sockets. `Err`: the NACK's reason.
fn adopt(
    ctx: &Arc<ProxyContext>,
    mut state: SessionState,
    mut fds: Vec<OwnedFd>,
    version: u32,
) -> Result<Adopted, String> {
    if state.version != version {
        return Err(format!(
            "state version {} where {version} was agreed",
            state.version
        ));
    }
    if fds.len() != 2 {
        return Err(format!("{} sockets where 2 belong", fds.len()));
    }
    let backend = ctx
        .backends
        .get(&state.backend.name)
        .filter(|b| b.address == state.backend.address && !b.is_removed())
        .ok_or_else(|| format!("backend {} is not configured here", state.backend.name))?;
    let startup: pgferry_wire::StartupMessage = state.startup.clone().into();
    let users = ctx.users();
    let entry = users.get(startup.user()).ok_or_else(|| {
        format!(
            "user {:?} is not in this process's userlist",
            startup.user()
        )
    })?;
    let credentials = match (&entry.secret, &state.credentials) {
        (Secret::Plain(p), _) => BackendCredentials::Password {
            password: Zeroizing::new(p.to_string()),
            keys: entry.backend_keys.clone(),
        },
        (Secret::Verifier(v), CredentialsCarry::PassThrough { client_key }) => {
            let key = ClientKey::from_bytes(client_key).ok_or("bad pass-through key")?;
            if !v.matches_client_key(&key) {
                return Err("the user's verifier changed".into());
            }
            BackendCredentials::PassThrough {
                client_key: key,
                verifier: v.clone(),
            }
        }
        (Secret::Verifier(_), CredentialsCarry::Password) => {
            return Err("the user has a verifier here and no password travelled".into())
        }
    };
    let attrs = TargetSessionAttrs::parse(&state.attrs).ok_or("unknown session attributes")?;
    let client_key = state.client_key.to_key().ok_or("bad cancel key")?;
    let server_key = state.backend.key.to_key().ok_or("bad backend cancel key")?;
    let slot = ctx
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| "max_client_connections reached".to_owned())?;
    let server_fd = fds.remove(1);
    let client_fd = fds.remove(0);
    let client = stream_from(
        client_fd,
        state.client_tls.take(),
        std::mem::take(&mut state.client_pending),
    )?;
    let server_stream = stream_from(
        server_fd,
        state.server_tls.take(),
        std::mem::take(&mut state.server_pending),
    )?;
    let target = CancelTarget {
        backend: backend.name.clone(),
        address: state.backend.peer,
        key: server_key.clone(),
    };
    if !ctx.cancel_map.register_existing(client_key.clone(), target) {
        return Err("its cancel key is taken here".into());
    }
    // Nothing below can fail.
    let gauge = ClientGauge::new(&ctx.metrics.client_connections);
    let (control_tx, control_rx) = control_channel();
    let registration = ctx.registry.register(
        SessionInfo {
            id: state.id,
            client_addr: state.peer,
            user: startup.user().to_owned(),
            database: startup.database().to_owned(),
            application_name: startup.param("application_name").map(str::to_owned),
            backend: backend.name.clone(),
            connected_at: state.connected_at,
            migrations: state.migrations,
            transferring: false,
            last_migrated: None,
        },
        control_tx,
    );
    if let (Some(a), Some(row)) = (ctx.audit.as_ref(), state.audit.take()) {
        a.adopt(row);
    }
    let tracker = SessionTracker::from_carry(state.tracker);
    // What the session's own login reported tells this process, too, what
    // kind of server its backend is (no login of its own may have yet).
    backend.note_login(Dialect::detect(tracker.parameters()));
    let parts = ForwarderParts {
        client,
        server: server_stream,
        tracker,
        control: control_rx,
        held_from_client: std::mem::take(&mut state.held_from_client),
        deferred: std::mem::take(&mut state.deferred)
            .into_iter()
            .map(Into::into)
            .collect(),
        bytes_from_client: state.bytes_from_client,
        bytes_to_client: state.bytes_to_client,
    };
    Ok(Adopted {
        basics: SessionBasics {
            startup,
            credentials,
            attrs,
            id: state.id,
            accepted_at: state.accepted_at,
            peer: state.peer,
        },
        server: ServerSide {
            lease: BackendLease::new(backend),
            peer: state.backend.peer,
            key: server_key,
            known: None,
        },
        cancel_key: client_key,
        parts,
        registration,
        slot,
        gauge,
        paused_at_ns: state.paused_at_ns,
    })
}
