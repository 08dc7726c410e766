//! The old process's side: answer a new process on the hand-off socket,
//! pass the listeners, then hand each session over at its safe point, a
//! window of them at a time, until none is left (then exit) or the new
//! process is gone (then go on serving, accepting again).

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Semaphore};
use tracing::{info, warn};
use uuid::Uuid;

use super::channel::{Channel, HandoffListener};
use super::lock;
use super::protocol::{common_version, Frame, MAGIC, PROTOCOL_VERSIONS};
use super::state::{
    BackendCarry, CredentialsCarry, DeferredCarry, KeyCarry, SessionState, StartupCarry,
    STATE_VERSIONS,
};
use crate::backend::login::BackendCredentials;
use crate::forwarder::{ControlCommand, ForwarderParts, TransferOutcome, TransferRequest};
use crate::session::SessionBasics;
use crate::stream::Stream;
use crate::tls::handover::{Frozen, TlsState};
use crate::transfer::{ServerSide, SessionIdentity};
use crate::ProxyContext;

/// How long a step of the exchange before the sessions may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// The new process's start (config, userlist, health checks) before READY.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// A new process silent this long after a SESSION is killed.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a TLS stream may take to finish a record it is in the middle of.
const FREEZE_WAIT: Duration = Duration::from_millis(200);
/// Between two rounds of asking the sessions that are not at a safe point.
const ROUND_INTERVAL: Duration = Duration::from_millis(200);

/// The old process's end of a running hand-off, used by the sessions.
pub(crate) struct Port {
    channel: Arc<Channel>,
    state_version: u32,
    peer_pid: i32,
    waiting: Mutex<Waiting>,
    handed_over: AtomicU64,
    resumed: AtomicU64,
    /// Sessions the new process refused: not offered again (it would
    /// refuse again), they stay here.
    refused: Mutex<std::collections::HashSet<Uuid>>,
}

#[derive(Default)]
struct Waiting {
    /// The channel has ended: no verdict will come.
    closed: bool,
    verdicts: HashMap<Uuid, oneshot::Sender<Verdict>>,
}

enum Verdict {
    Ack,
    Nack(String),
}

/// What became of a session offered to the new process.
pub(crate) enum Offered {
    /// The new process has it: drop everything, say nothing.
    Given,
    /// It stays here: forwarding goes on from these parts.
    Kept(Box<ForwarderParts>),
    /// Frozen for the hand-off and then not resumable here.
    Lost(String),
}

/// Serves hand-off requests on `listener` for the life of the process.
pub async fn serve_takeovers(ctx: Arc<ProxyContext>, listener: HandoffListener) {
    loop {
        let (channel, pid) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "hand-off socket: accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        info!(peer_pid = pid, "a new pgferry process asks to take over");
        let gone = give_to(&ctx, Arc::new(channel), pid).await;
        if gone {
            // Everything was handed over: this process is exiting. Keep
            // the socket file until then so no third process starts as
            // if none ran.
            std::future::pending::<()>().await;
        }
    }
}

async fn recv_frame(channel: &Channel, within: Duration) -> Result<Frame, String> {
    match tokio::time::timeout(within, channel.recv()).await {
        Err(_) => Err("the new process said nothing in time".into()),
        Ok(Err(e)) => Err(format!("hand-off socket: {e}")),
        Ok(Ok(None)) => Err("the new process closed the hand-off socket".into()),
        Ok(Ok(Some((bytes, _fds)))) => Frame::decode(&bytes),
    }
}

async fn send_frame(
    channel: &Channel,
    frame: &Frame,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<(), String> {
    let bytes = frame.encode()?;
    channel
        .send(&bytes, fds)
        .await
        .map_err(|e| format!("hand-off socket: {e}"))
}

/// One hand-off, from HELLO to the last session. True when this process
/// has handed everything over and is to exit.
async fn give_to(ctx: &Arc<ProxyContext>, channel: Arc<Channel>, pid: i32) -> bool {
    let h = &ctx.handoff;
    if h.in_progress() || ctx.switchover.is_holding() {
        let _ = send_frame(
            &channel,
            &Frame::Refuse {
                reason: "a hand-off or a switchover is already running".into(),
            },
            &[],
        )
        .await;
        return false;
    }
    h.update(|s| {
        *s = super::Status {
            phase: super::Phase::Starting,
            role: Some("old"),
            peer_pid: Some(pid),
            pid: std::process::id(),
            ..Default::default()
        }
    });
    let state_version = match pass_listeners(ctx, &channel).await {
        Ok(v) => v,
        Err(why) => {
            warn!(reason = %why, "hand-off aborted; this process goes on serving");
            h.set_accepting(true);
            h.update(|s| {
                s.phase = super::Phase::Aborted;
                s.error = Some(why);
            });
            return false;
        }
    };
    info!(
        peer_pid = pid,
        "the new process accepts connections; handing sessions over"
    );
    ctx.metrics.handoff_in_progress.set(1);
    h.update(|s| s.phase = super::Phase::HandingOver);
    let port = Arc::new(Port {
        channel: channel.clone(),
        state_version,
        peer_pid: pid,
        waiting: Mutex::new(Waiting::default()),
        handed_over: AtomicU64::new(0),
        resumed: AtomicU64::new(0),
        refused: Mutex::new(Default::default()),
    });
    *lock(&h.port) = Some(port.clone());
    let closed = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(read_answers(ctx.clone(), port.clone(), closed.clone()));

    let kept = hand_over_sessions(ctx, &port, &closed).await;
    let new_lives = !closed.load(Ordering::Acquire);
    if new_lives {
        ctx.metrics
            .handoff_sessions
            .with_label_values(&["kept"])
            .inc_by(kept as u64);
        let _ = send_frame(&channel, &Frame::Done { kept }, &[]).await;
    }
    *lock(&h.port) = None;
    ctx.metrics.handoff_in_progress.set(0);
    let (handed_over, resumed) = (
        port.handed_over.load(Ordering::Relaxed),
        port.resumed.load(Ordering::Relaxed),
    );
    if !new_lives {
        // The new process died or hung up: this one serves on, everything
        // it did not hand over included, and accepts again.
        reader.abort();
        h.set_accepting(true);
        warn!(
            handed_over,
            resumed, "the new process is gone: accepting connections here again"
        );
        h.update(|s| {
            s.phase = super::Phase::Aborted;
            s.error = Some("the new process ended the hand-off".into());
            s.handed_over = handed_over;
            s.resumed = resumed;
        });
        return false;
    }
    info!(
        handed_over,
        kept, resumed, "hand-off done; this process exits once its last session ends"
    );
    h.update(|s| {
        s.phase = super::Phase::Done;
        s.handed_over = handed_over;
        s.resumed = resumed;
        s.kept = kept as u64;
        s.remaining = kept;
    });
    h.finished.send_replace(true);
    true
}

/// HELLO .. LISTENING. Returns the state version agreed on. On error the
/// caller starts accepting again (the listeners never left this process:
/// only copies of them did).
async fn pass_listeners(ctx: &ProxyContext, channel: &Channel) -> Result<u32, String> {
    let h = &ctx.handoff;
    let Frame::Hello {
        magic,
        protocol,
        state,
        version,
        pid,
    } = recv_frame(channel, STEP_TIMEOUT).await?
    else {
        return Err("the new process did not start with HELLO".into());
    };
    if magic != MAGIC {
        return Err("not a pgferry hand-off request".into());
    }
    let (Some(p), Some(v)) = (
        common_version(PROTOCOL_VERSIONS, protocol),
        common_version(STATE_VERSIONS, state),
    ) else {
        let reason = format!(
            "no common version: this pgferry speaks protocol {PROTOCOL_VERSIONS:?} and state \
             {STATE_VERSIONS:?}, the new one protocol {protocol:?} and state {state:?}"
        );
        let _ = send_frame(
            channel,
            &Frame::Refuse {
                reason: reason.clone(),
            },
            &[],
        )
        .await;
        return Err(reason);
    };
    info!(new_version = %version, new_pid = pid, protocol = p, state = v, "hand-off: versions agreed");
    send_frame(
        channel,
        &Frame::Welcome {
            protocol: p,
            state: v,
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
        },
        &[],
    )
    .await?;
    match recv_frame(channel, READY_TIMEOUT).await? {
        Frame::Ready => {}
        other => return Err(format!("expected READY, got {}", other.name())),
    }
    // From here until LISTENING (or the new process's end) nobody accepts:
    // connections wait in the one accept queue both processes share.
    h.set_accepting(false);
    let (frame, fds) = {
        let listeners = lock(&h.listeners);
        let Some(l) = listeners.as_ref() else {
            return Err("this process has no listening socket to pass".into());
        };
        let proxy = ctx
            .dial
            .own_listener
            .get()
            .copied()
            .ok_or("the proxy listener's address is unknown")?;
        let admin_addr = l.admin.as_ref().and_then(|fd| {
            socket2::SockRef::from(fd)
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
        });
        let mut fds = vec![l.proxy.try_clone().map_err(|e| e.to_string())?];
        if let Some(a) = &l.admin {
            fds.push(a.try_clone().map_err(|e| e.to_string())?);
        }
        (
            Frame::Listeners {
                proxy,
                admin: admin_addr,
            },
            fds,
        )
    };
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    send_frame(channel, &frame, &borrowed).await?;
    match recv_frame(channel, STEP_TIMEOUT).await? {
        Frame::Listening => Ok(v),
        other => Err(format!("expected LISTENING, got {}", other.name())),
    }
}

/// Reads ACK, NACK and CANCEL until the channel ends, then closes the port.
async fn read_answers(ctx: Arc<ProxyContext>, port: Arc<Port>, closed: Arc<AtomicBool>) {
    loop {
        let frame = match port.channel.recv().await {
            Ok(Some((bytes, _fds))) => Frame::decode(&bytes),
            Ok(None) => break,
            Err(e) => {
                warn!(error = %e, "hand-off socket failed");
                break;
            }
        };
        match frame {
            Ok(Frame::Ack { id }) => port.verdict(id, Verdict::Ack),
            Ok(Frame::Nack { id, reason }) => {
                lock(&port.refused).insert(id);
                port.verdict(id, Verdict::Nack(reason))
            }
            Ok(Frame::Cancel { req, key }) => {
                let ctx = ctx.clone();
                let port = port.clone();
                tokio::spawn(async move {
                    let found = match key.to_key() {
                        Some(key) => crate::session::forward_cancel(&ctx, &key).await,
                        None => false,
                    };
                    let _ = send_frame(&port.channel, &Frame::Cancelled { req, found }, &[]).await;
                });
            }
            Ok(other) => warn!(frame = other.name(), "unexpected hand-off frame; ignored"),
            Err(e) => {
                // A peer that writes garbage cannot be trusted with more.
                warn!(error = %e, "bad hand-off frame; ending the hand-off");
                break;
            }
        }
    }
    closed.store(true, Ordering::Release);
    let mut w = lock(&port.waiting);
    w.closed = true;
    // Dropping the senders tells each waiting session: no answer.
    w.verdicts.clear();
}

impl Port {
    fn verdict(&self, id: Uuid, v: Verdict) {
        if let Some(tx) = lock(&self.waiting).verdicts.remove(&id) {
            let _ = tx.send(v);
        }
    }

    /// Where the session's verdict will arrive; None if the channel ended.
    fn expect(&self, id: Uuid) -> Option<oneshot::Receiver<Verdict>> {
        let mut w = lock(&self.waiting);
        if w.closed {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        w.verdicts.insert(id, tx);
        Some(rx)
    }
}

/// Asks every session, `handoff_window` at a time, until none is left,
/// the new process is gone, or `shutdown_timeout` has passed. Returns how
/// many sessions stay here.
async fn hand_over_sessions(ctx: &Arc<ProxyContext>, port: &Port, closed: &AtomicBool) -> usize {
    let deadline = Instant::now() + ctx.config.proxy.shutdown_timeout;
    let window = Arc::new(Semaphore::new(ctx.config.proxy.handoff_window.max(1)));
    let ask_for = ctx.config.proxy.handoff_timeout;
    loop {
        let all = ctx.registry.list();
        // Sessions still logging in are not listed yet, but counted.
        let in_login = usize::try_from(ctx.metrics.client_connections.get())
            .unwrap_or(0)
            .saturating_sub(all.len());
        let remaining = all.len() + in_login;
        let sessions: Vec<_> = {
            let refused = lock(&port.refused);
            all.into_iter()
                .filter(|s| !refused.contains(&s.id))
                .collect()
        };
        ctx.handoff.update(|s| {
            s.remaining = remaining;
            s.handed_over = port.handed_over.load(Ordering::Relaxed);
            s.resumed = port.resumed.load(Ordering::Relaxed);
        });
        if remaining == 0 || closed.load(Ordering::Acquire) {
            return remaining;
        }
        if sessions.is_empty() && in_login == 0 {
            // Only sessions the new process refused are left.
            return remaining;
        }
        if Instant::now() >= deadline {
            warn!(
                sessions = remaining,
                "shutdown_timeout: sessions not handed over stay with this process"
            );
            return remaining;
        }
        let mut asks = tokio::task::JoinSet::new();
        for info in sessions {
            let Ok(permit) = window.clone().acquire_owned().await else {
                break;
            };
            if closed.load(Ordering::Acquire) {
                break;
            }
            let Some((_, control)) = ctx.registry.get(info.id) else {
                continue;
            };
            asks.spawn(async move {
                let (tx, rx) = oneshot::channel();
                let asked = control
                    .send(ControlCommand::HandOff {
                        timeout: ask_for,
                        reply: tx,
                    })
                    .await;
                let outcome = match asked {
                    Ok(()) => rx.await.ok(),
                    Err(_) => None,
                };
                drop(permit);
                outcome
            });
        }
        // Each ask ends handed over, or not yet (no safe point in time,
        // or refused): the next round tells.
        while asks.join_next().await.is_some() {}
        // Pacing between rounds: sessions in a transaction, or still
        // logging in, get time to reach their next safe point.
        tokio::time::sleep(ROUND_INTERVAL).await;
    }
}

/// Runs in the session's own task at its safe point: freezes both
/// sockets, sends them with the session's state, and waits for the
/// verdict. Exactly one process owns the session at every moment: this
/// one until an ACK arrives (or it resumes the session on NACK or at the
/// channel's end), the new one from its ACK on.
pub(crate) async fn offer(
    ctx: &ProxyContext,
    basics: &SessionBasics,
    server: &ServerSide,
    identity: &SessionIdentity<'_>,
    parts: ForwarderParts,
    request: TransferRequest,
) -> Offered {
    let reply = request.reply;
    let Some(port) = ctx.handoff.port() else {
        let _ = reply.send(TransferOutcome::RecoverableError(
            "no hand-off in progress".into(),
        ));
        return Offered::Kept(Box::new(parts));
    };
    let paused_at = Instant::now();
    let paused_at_ns = super::monotonic_ns();
    // Cancels wait while the session is in flight: they reach it here, or
    // (once it is gone) the new process.
    let moving = ctx.cancel_map.moving(identity.cancel_key);
    let (offered, why) = hand(ctx, &port, basics, server, identity, parts, paused_at_ns).await;
    moving.end(true);
    let pause = paused_at.elapsed();
    match &offered {
        Offered::Given => {
            port.handed_over.fetch_add(1, Ordering::Relaxed);
            ctx.metrics
                .handoff_sessions
                .with_label_values(&["handed_over"])
                .inc();
        }
        Offered::Kept(_) if why.starts_with(RESUMED) => {
            port.resumed.fetch_add(1, Ordering::Relaxed);
            ctx.metrics
                .handoff_sessions
                .with_label_values(&["resumed"])
                .inc();
        }
        _ => {}
    }
    let _ = reply.send(match offered {
        Offered::Given => TransferOutcome::Success {
            from: server.backend().name.clone(),
            to: server.backend().name.clone(),
            duration: request.requested_at.elapsed(),
            pause,
        },
        _ => TransferOutcome::RecoverableError(why),
    });
    offered
}

const RESUMED: &str = "resumed: ";

/// A stream taken out of the runtime to travel, and how to get it back.
struct Travelling {
    tcp: std::net::TcpStream,
    tls: Option<TlsState>,
    pending: Vec<u8>,
}

impl Travelling {
    fn new(f: Frozen) -> std::io::Result<Self> {
        Ok(Self {
            // Deregisters the socket from this process's epoll: the other
            // process's copy must not wake this one.
            tcp: f.tcp.into_std()?,
            tls: f.tls,
            pending: f.pending,
        })
    }

    fn back(self) -> std::io::Result<Stream> {
        Frozen {
            tcp: tokio::net::TcpStream::from_std(self.tcp)?,
            tls: self.tls,
            pending: self.pending,
        }
        .thaw()
    }
}

/// A forwarder's parts but its two sockets, while those are frozen.
struct Rest {
    tracker: crate::forwarder::tracker::SessionTracker,
    control: crate::forwarder::ControlReceiver,
    held_from_client: Vec<u8>,
    deferred: Vec<crate::forwarder::careful::Deferred>,
    bytes_from_client: u64,
    bytes_to_client: u64,
}

impl Rest {
    fn split(p: ForwarderParts) -> (Stream, Stream, Self) {
        let rest = Self {
            tracker: p.tracker,
            control: p.control,
            held_from_client: p.held_from_client,
            deferred: p.deferred,
            bytes_from_client: p.bytes_from_client,
            bytes_to_client: p.bytes_to_client,
        };
        (p.client, p.server, rest)
    }

    fn join(self, client: Stream, server: Stream) -> ForwarderParts {
        ForwarderParts {
            client,
            server,
            tracker: self.tracker,
            control: self.control,
            held_from_client: self.held_from_client,
            deferred: self.deferred,
            bytes_from_client: self.bytes_from_client,
            bytes_to_client: self.bytes_to_client,
        }
    }
}

/// `offer`'s work; the second value says why a kept session was kept
/// (`RESUMED` first when the new process had it and gave it back).
async fn hand(
    ctx: &ProxyContext,
    port: &Port,
    basics: &SessionBasics,
    server: &ServerSide,
    identity: &SessionIdentity<'_>,
    parts: ForwarderParts,
    paused_at_ns: u64,
) -> (Offered, String) {
    let (client, server_stream, mut rest) = Rest::split(parts);
    let client = match client.freeze(FREEZE_WAIT).await {
        Ok(f) => f,
        Err((client, why)) => {
            let parts = rest.join(client, server_stream);
            return (
                Offered::Kept(Box::new(parts)),
                format!("client socket: {why}"),
            );
        }
    };
    let server_frozen = match server_stream.freeze(FREEZE_WAIT).await {
        Ok(f) => f,
        Err((server_stream, why)) => {
            return match client.thaw() {
                Ok(client) => (
                    Offered::Kept(Box::new(rest.join(client, server_stream))),
                    format!("server socket: {why}"),
                ),
                Err(e) => (Offered::Lost(e.to_string()), String::new()),
            };
        }
    };
    let (client, server_t) = match (Travelling::new(client), Travelling::new(server_frozen)) {
        (Ok(c), Ok(s)) => (c, s),
        (Err(e), _) | (_, Err(e)) => return (Offered::Lost(e.to_string()), String::new()),
    };
    let (connected_at, migrations) = ctx
        .registry
        .get(identity.id)
        .map(|(i, _)| (i.connected_at, i.migrations))
        .unwrap_or((basics.accepted_at, 0));
    let audit_row = ctx.audit.as_ref().and_then(|a| a.hand_over(identity.id));
    let state = SessionState {
        version: port.state_version,
        id: identity.id,
        accepted_at: basics.accepted_at,
        connected_at,
        peer: basics.peer,
        startup: StartupCarry::from(identity.startup),
        credentials: match identity.credentials {
            BackendCredentials::Password { .. } => CredentialsCarry::Password,
            BackendCredentials::PassThrough { client_key, .. } => CredentialsCarry::PassThrough {
                client_key: zeroize::Zeroizing::new(client_key.as_bytes().to_vec()),
            },
        },
        attrs: identity.attrs.as_str().to_owned(),
        client_key: KeyCarry::from(identity.cancel_key),
        backend: BackendCarry {
            name: server.backend().name.clone(),
            address: server.backend().address.clone(),
            peer: server.peer,
            key: KeyCarry::from(&server.key),
        },
        tracker: rest.tracker.carry(),
        held_from_client: std::mem::take(&mut rest.held_from_client),
        deferred: rest.deferred.iter().map(DeferredCarry::from).collect(),
        bytes_from_client: rest.bytes_from_client,
        bytes_to_client: rest.bytes_to_client,
        migrations,
        audit: audit_row,
        client_tls: client.tls,
        client_pending: client.pending,
        server_tls: server_t.tls,
        server_pending: server_t.pending,
        paused_at_ns,
    };
    let frame = Frame::Session {
        state: Box::new(state),
    };
    let verdict = match port.expect(identity.id) {
        None => None,
        Some(rx) => {
            let sent = send_frame(
                &port.channel,
                &frame,
                &[client.tcp.as_fd(), server_t.tcp.as_fd()],
            )
            .await;
            match sent {
                Err(e) => {
                    warn!(session = %identity.id, error = %e, "could not send a session");
                    None
                }
                Ok(()) => wait_verdict(port, rx).await,
            }
        }
    };
    let why = match verdict {
        Some(Verdict::Ack) => {
            // The new process owns the sockets: closing our copies (no
            // shutdown, no goodbye) leaves them open there.
            drop((client.tcp, server_t.tcp));
            return (Offered::Given, String::new());
        }
        Some(Verdict::Nack(reason)) => {
            info!(session = %identity.id, %reason, "the new process refused a session; it stays here");
            format!("{RESUMED}refused by the new process: {reason}")
        }
        None => format!("{RESUMED}the new process ended the hand-off"),
    };
    let Frame::Session { state } = frame else {
        return (Offered::Lost("hand-off frame".into()), why);
    };
    let mut state = *state;
    if let (Some(a), Some(row)) = (ctx.audit.as_ref(), state.audit.take()) {
        a.adopt(row);
    }
    let client = Travelling {
        tcp: client.tcp,
        tls: state.client_tls.take(),
        pending: std::mem::take(&mut state.client_pending),
    };
    let server_t = Travelling {
        tcp: server_t.tcp,
        tls: state.server_tls.take(),
        pending: std::mem::take(&mut state.server_pending),
    };
    rest.held_from_client = std::mem::take(&mut state.held_from_client);
    let parts = match (client.back(), server_t.back()) {
        (Ok(c), Ok(s)) => rest.join(c, s),
        (Err(e), _) | (_, Err(e)) => return (Offered::Lost(e.to_string()), why),
    };
    (Offered::Kept(Box::new(parts)), why)
}

/// The verdict on one SESSION. A new process silent for `ACK_TIMEOUT` is
/// killed first: only then may this one decide, from what it read.
async fn wait_verdict(port: &Port, mut rx: oneshot::Receiver<Verdict>) -> Option<Verdict> {
    match tokio::time::timeout(ACK_TIMEOUT, &mut rx).await {
        Ok(v) => v.ok(),
        Err(_) => {
            warn!(
                peer_pid = port.peer_pid,
                "the new process did not answer a session in time; killing it"
            );
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(port.peer_pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            // Its end closes the channel; an ACK it wrote is still read.
            tokio::time::timeout(STEP_TIMEOUT, rx).await.ok()?.ok()
        }
    }
}
