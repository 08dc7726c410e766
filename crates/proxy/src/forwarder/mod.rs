//! The forwarder: one task per session moving bytes both ways.
//!
//! A single future polls the request pump (client -> server), the response
//! pump (server -> client) and the session's control channel. Each pump has
//! its own buffer, so neither direction can block the other; because one
//! task owns both sockets, pausing a direction is simply not polling it, and
//! a later transfer can swap the server socket with no lock in sight.

pub mod buffer_pool;
pub mod careful;
pub mod extended;
pub mod pump;
pub mod setting_names;
pub mod tracker;

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use crate::errors::SessionError;
use crate::metrics::{Metrics, MigrationResult};
use crate::stream::Stream;
use careful::{Careful, Deferred};
use pump::{Pump, PumpError};
use tracker::{CopyState, SessionTracker, Stamp, TxStatus};

/// The sending end of a session's control channel.
///
/// The channel is a short queue behind a lock in one small allocation,
/// which also holds the session's registry record (`registry.rs`): one
/// allocation per session for both. tokio's bounded mpsc cost ~800 bytes
/// per idle session (a 512-byte cache-padded channel and a 32-slot block)
/// for a queue that is empty nearly all its life.
pub struct ControlSender(Arc<ControlShared>);

/// The forwarder's end of the control channel.
pub struct ControlReceiver {
    shared: Arc<ControlShared>,
    /// The waker left in the queue by the last `Pending`, while no sender
    /// has signalled since: a data wake-up then checks `signal` alone and
    /// takes no lock (the forwarder polls its control channel on every
    /// wake-up).
    armed: Option<Waker>,
}

/// Commands that may queue before `send` waits.
const CONTROL_CAPACITY: usize = 8;

pub(crate) struct ControlShared {
    queue: Mutex<ControlQueue>,
    /// Set (under the queue's lock) when a command is queued or the last
    /// sender leaves; cleared by the receiver under the lock as it looks.
    signal: AtomicBool,
    /// Senders waiting for room.
    room: Notify,
    /// The registry's record of this session (`None` until registered).
    pub(crate) info: Mutex<Option<crate::registry::Record>>,
}

struct ControlQueue {
    /// Freed whenever it empties: a queue that once held a command must not
    /// keep its slots for the session's life.
    commands: VecDeque<Box<ControlCommand>>,
    receiver: Option<Waker>,
    senders: usize,
    receiver_gone: bool,
}

impl ControlShared {
    fn queue(&self) -> MutexGuard<'_, ControlQueue> {
        // Every update is a single push, pop or flag: a panic elsewhere
        // cannot leave the queue half-changed.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn info(&self) -> MutexGuard<'_, Option<crate::registry::Record>> {
        self.info.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A session's control channel (a few commands may queue).
pub fn control_channel() -> (ControlSender, ControlReceiver) {
    let shared = Arc::new(ControlShared {
        queue: Mutex::new(ControlQueue {
            commands: VecDeque::new(),
            receiver: None,
            senders: 1,
            receiver_gone: false,
        }),
        signal: AtomicBool::new(false),
        room: Notify::new(),
        info: Mutex::new(None),
    });
    (
        ControlSender(shared.clone()),
        ControlReceiver {
            shared,
            armed: None,
        },
    )
}

enum PushError {
    Full(ControlCommand),
    Gone,
}

impl ControlSender {
    /// Waits for room in the queue; fails if the session is gone.
    pub async fn send(&self, cmd: ControlCommand) -> Result<(), SessionGone> {
        let mut cmd = cmd;
        loop {
            // Registered before trying, so a pop in between is not missed.
            let room = self.0.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.push(cmd) {
                Ok(()) => return Ok(()),
                Err(PushError::Gone) => return Err(SessionGone),
                Err(PushError::Full(back)) => cmd = back,
            }
            room.await;
        }
    }

    /// Queues without waiting; fails if the session is gone or its queue
    /// is full.
    pub fn try_send(&self, cmd: ControlCommand) -> Result<(), SessionGone> {
        self.push(cmd).map_err(|_| SessionGone)
    }

    fn push(&self, cmd: ControlCommand) -> Result<(), PushError> {
        let waker = {
            let mut q = self.0.queue();
            if q.receiver_gone {
                return Err(PushError::Gone);
            }
            if q.commands.len() >= CONTROL_CAPACITY {
                return Err(PushError::Full(cmd));
            }
            q.commands.push_back(Box::new(cmd));
            self.0.signal.store(true, Ordering::Release);
            q.receiver.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// The shared allocation (the registry keeps its record there).
    pub(crate) fn shared(&self) -> &ControlShared {
        &self.0
    }
}

impl Clone for ControlSender {
    fn clone(&self) -> Self {
        self.0.queue().senders += 1;
        Self(self.0.clone())
    }
}

impl Drop for ControlSender {
    fn drop(&mut self) {
        let waker = {
            let mut q = self.0.queue();
            q.senders -= 1;
            if q.senders == 0 {
                self.0.signal.store(true, Ordering::Release);
                q.receiver.take()
            } else {
                None
            }
        };
        // The last sender gone: the receiver sees the channel closed.
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl std::fmt::Debug for ControlSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlSender")
    }
}

impl ControlReceiver {
    /// The next command; `Ready(None)` once every sender is gone.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Box<ControlCommand>>> {
        // Fast path: this task's waker is in the queue and nothing was
        // signalled since it was left there. A sender signals under the
        // lock and then wakes that waker, so nothing is missed.
        if !self.shared.signal.load(Ordering::Acquire)
            && self.armed.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        self.armed = None;
        let mut q = self.shared.queue();
        self.shared.signal.store(false, Ordering::Relaxed);
        if let Some(cmd) = q.commands.pop_front() {
            if q.commands.is_empty() {
                q.commands = VecDeque::new();
            } else {
                // More to take: the next poll must look again.
                self.shared.signal.store(true, Ordering::Relaxed);
            }
            drop(q);
            self.shared.room.notify_one();
            return Poll::Ready(Some(cmd));
        }
        if q.senders == 0 {
            self.shared.signal.store(true, Ordering::Relaxed);
            return Poll::Ready(None);
        }
        if !q.receiver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            q.receiver = Some(cx.waker().clone());
        }
        self.armed = q.receiver.clone();
        Poll::Pending
    }

    /// The next command if one is queued.
    fn try_recv(&mut self) -> Option<Box<ControlCommand>> {
        let mut q = self.shared.queue();
        let cmd = q.commands.pop_front()?;
        if q.commands.is_empty() {
            q.commands = VecDeque::new();
        }
        drop(q);
        self.shared.room.notify_one();
        Some(cmd)
    }
}

impl Drop for ControlReceiver {
    fn drop(&mut self) {
        // Queued commands are dropped: their requesters see their reply
        // channels close, as with any session that ended.
        let dropped = {
            let mut q = self.shared.queue();
            q.receiver_gone = true;
            q.receiver = None;
            std::mem::take(&mut q.commands)
        };
        drop(dropped);
        self.shared.room.notify_waiters();
    }
}

impl std::fmt::Debug for ControlReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlReceiver")
    }
}

/// The session has ended (or, for `try_send`, cannot take more commands).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionGone;

/// Commands other parts of the proxy send to a live session.
#[derive(Debug)]
pub enum ControlCommand {
    /// Reply with a snapshot of the session's protocol state.
    Inspect(oneshot::Sender<SessionSnapshot>),
    /// Move the session to another backend (`to`: a backend name, or the
    /// least-loaded other one) at its next safe point, waiting at most
    /// `timeout` for one.
    Transfer {
        to: Option<String>,
        timeout: Duration,
        reply: oneshot::Sender<TransferOutcome>,
        /// A switchover's hold: stop at the safe point and wait for its
        /// word before moving (or not).
        hold: Option<Hold>,
    },
    /// Hand the session over to a new pgferry process (`handoff`) at its
    /// next safe point, waiting at most `timeout` for one. The answer is
    /// `Success` (handed over), `RecoverableError` (it stays here).
    HandOff {
        timeout: Duration,
        reply: oneshot::Sender<TransferOutcome>,
    },
    /// Hold the session's traffic at its next safe point (within
    /// `timeout`) until `pause` says go (`verbs::pause`). The reply is
    /// `RecoverableError` when it never got there.
    Pause {
        timeout: Duration,
        reply: oneshot::Sender<TransferOutcome>,
        pause: PauseHold,
    },
    /// Close the session at the next message boundary with this error.
    Terminate(SessionError),
    /// The idle-state sweep (`[failover] remember_state_after`): if the
    /// client has sent nothing since the last sweep and the session is at
    /// a safe point, stop so its state can be captured and kept.
    Remember,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TransferOutcome {
    Success {
        from: String,
        to: String,
        /// From the request to the session running on `to`.
        duration: Duration,
        /// How long the session's traffic was held (safe point to resume).
        pause: Duration,
    },
    /// Nothing changed for the session; it stays where it was.
    RecoverableError(String),
    /// The session could not be kept and was closed.
    FatalError(String),
    /// The backend ended the session itself as the move ran (its FATAL
    /// reached the client): gone, but not through pgferry's fault.
    SessionEnded(String),
}

/// Why a transfer asked for during another one is refused.
pub const TRANSFER_IN_PROGRESS: &str = "another transfer of this session is in progress";

/// Why a session that sent Terminate is not moved.
pub const SESSION_CLOSING: &str = "session is closing";

/// A transfer that has found its safe point, handed to the session layer.
#[derive(Debug)]
pub struct TransferRequest {
    pub to: Option<String>,
    pub requested_at: Instant,
    pub reply: oneshot::Sender<TransferOutcome>,
    pub hold: Option<Hold>,
    /// Not a move but a hand-off to a new pgferry process: the same safe
    /// point, another destination (`handoff::give`).
    pub hand_off: bool,
    /// Not a move but an admin's PAUSE: held at the safe point, then on.
    pub pause: Option<PauseHold>,
}

/// An admin's PAUSE of one session: at its safe point it says so on
/// `held`, then holds its client's traffic until `release` turns true or
/// `until` passes (a pause never outlives `[admin] pause_limit`).
#[derive(Debug)]
pub struct PauseHold {
    pub held: oneshot::Sender<()>,
    pub release: tokio::sync::watch::Receiver<bool>,
    pub until: Instant,
}

/// A switchover's hold on one session: at its safe point the session
/// captures its state and says so on `held` (or why it cannot move) and,
/// its traffic held, waits for `word` (until `until`, then it lets itself
/// go).
#[derive(Debug)]
pub struct Hold {
    pub held: oneshot::Sender<Result<(), String>>,
    pub word: oneshot::Receiver<HoldWord>,
    pub until: Instant,
}

/// What a held session is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldWord {
    /// Move to this backend now.
    MoveTo(String),
    /// Go on where you are.
    Release,
}

/// Why `Forwarder::run` returned.
#[derive(Debug)]
pub enum Interrupt {
    /// Forwarding is over.
    Ended(ForwardEnd),
    /// A requested transfer may run now: no request outstanding, idle, no
    /// COPY, nothing half-forwarded either way. The request direction is
    /// held until `resume_after_transfer`.
    SafePoint(TransferRequest),
    /// Idle through a whole sweep interval and at a safe point: the
    /// session's state may be captured now (`Remember`).
    Remember,
}

/// A transfer waiting for its safe point (an explicit state, not flags).
/// Boxed: a 136-byte slot every idle session would otherwise carry.
enum TransferWait {
    None,
    Waiting(Box<Waiting>),
}

struct Waiting {
    request: TransferRequest,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

#[derive(Debug, Clone)]
pub struct SessionSnapshot {
    pub outstanding: u32,
    pub tx_status: TxStatus,
    pub copy: CopyState,
    pub last_request: Option<Stamp>,
    pub last_response: Option<Stamp>,
    /// Both directions are between messages and nothing is buffered.
    pub at_message_boundary: bool,
    pub request_buffer_held: bool,
    pub response_buffer_held: bool,
    /// A transfer is waiting for a safe point.
    pub transfer_pending: bool,
}

enum WaitStep {
    Ready(TransferRequest),
    Resumed,
    Waiting,
}

/// Why forwarding stopped.
#[derive(Debug)]
pub enum ForwardEnd {
    /// The client closed its side (after Terminate or not).
    ClientClosed,
    /// The backend closed its side.
    ServerClosed,
    ClientIo(std::io::Error),
    ServerIo(std::io::Error),
    ClientProtocol(pgferry_wire::FrameError),
    ServerProtocol(pgferry_wire::FrameError),
    /// A Terminate command was carried out at a message boundary.
    Terminated(SessionError),
}

/// A forwarder taken apart at a safe point (`Forwarder::into_parts`).
pub struct ForwarderParts {
    pub client: Stream,
    pub server: Stream,
    pub tracker: SessionTracker,
    pub control: ControlReceiver,
    pub held_from_client: Vec<u8>,
    pub deferred: Vec<Deferred>,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
}

pub struct Forwarder<'m> {
    pub client: Stream,
    pub server: Stream,
    pub request: Pump,
    pub response: Pump,
    pub tracker: SessionTracker,
    control: ControlReceiver,
    control_open: bool,
    /// Boxed, like `transfer`: rare, and every idle session carries the slot.
    pending_terminate: Option<Box<SessionError>>,
    transfer: TransferWait,
    /// The client's last message as the previous `Remember` sweep saw it.
    remember_seen: Option<Option<Stamp>>,
    remember_due: bool,
    /// Message-by-message forwarding while the backend lacks statements the
    /// client holds (boxed: almost no session ever has it).
    careful: Option<Box<Careful>>,
    max_message_len: u32,
    /// Owned, so that a session's one struct can hold its forwarder.
    metrics: Arc<Metrics>,
    /// Bytes forwarded in this session, per direction.
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    /// Vestigial (the forwarder once borrowed its metrics); kept so the
    /// `Forwarder<'_>` in other modules' signatures need not change.
    _metrics_borrow: PhantomData<&'m Metrics>,
}

impl<'m> Forwarder<'m> {
    pub fn new(
        client: Stream,
        server: Stream,
        tracker: SessionTracker,
        control: ControlReceiver,
        max_message_len: u32,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            server,
            request: Pump::new(max_message_len),
            response: Pump::new(max_message_len),
            tracker,
            control,
            control_open: true,
            pending_terminate: None,
            transfer: TransferWait::None,
            remember_seen: None,
            remember_due: false,
            careful: None,
            max_message_len,
            metrics,
            bytes_from_client: 0,
            bytes_to_client: 0,
            _metrics_borrow: PhantomData,
        }
    }

    /// Takes the forwarder apart at a safe point (a hand-off): the sockets,
    /// what the tracker knows, the bytes the client sent during the hold
    /// (read, not forwarded) and the statements being re-created.
    pub fn into_parts(mut self) -> ForwarderParts {
        let held = match &mut self.careful {
            Some(c) => c.take_held(),
            None => self.request.take_held(),
        };
        self.tracker.set_hold_at_sync(false);
        ForwarderParts {
            deferred: self.deferred_statements(),
            client: self.client,
            server: self.server,
            tracker: self.tracker,
            control: self.control,
            held_from_client: held,
            bytes_from_client: self.bytes_from_client,
            bytes_to_client: self.bytes_to_client,
        }
    }

    /// A forwarder again from `into_parts` (in this process or, after a
    /// hand-off, another): the held bytes go first, then the sockets.
    pub fn from_parts(
        parts: ForwarderParts,
        max_message_len: u32,
        metrics: Arc<Metrics>,
    ) -> Result<Self, Box<ForwarderParts>> {
        let mut fwd = Self::new(
            parts.client,
            parts.server,
            parts.tracker,
            parts.control,
            max_message_len,
            metrics,
        );
        fwd.bytes_from_client = parts.bytes_from_client;
        fwd.bytes_to_client = parts.bytes_to_client;
        if !fwd.request.preload(&parts.held_from_client) {
            // Cannot happen for bytes `into_parts` took (one buffer's worth).
            return Err(Box::new(
                fwd.into_parts_with(parts.held_from_client, parts.deferred),
            ));
        }
        fwd.defer_statements(parts.deferred);
        Ok(fwd)
    }

    fn into_parts_with(self, held: Vec<u8>, deferred: Vec<Deferred>) -> ForwarderParts {
        ForwarderParts {
            deferred,
            client: self.client,
            server: self.server,
            tracker: self.tracker,
            control: self.control,
            held_from_client: held,
            bytes_from_client: self.bytes_from_client,
            bytes_to_client: self.bytes_to_client,
        }
    }

    /// Forwards until one side ends or a transfer reaches its safe point;
    /// the sockets stay in `self` so the caller can transfer or say goodbye.
    pub async fn run(&mut self) -> Interrupt {
        poll_fn(|cx| self.poll_session(cx)).await
    }

    /// Forwards until the session ends, refusing transfers (for callers
    /// with no transfer machinery, such as tests of the pumps).
    pub async fn run_to_end(&mut self) -> ForwardEnd {
        loop {
            match self.run().await {
                Interrupt::Ended(end) => return end,
                Interrupt::SafePoint(req) => {
                    self.refuse_request(req, "transfers are not available");
                    self.resume_after_transfer();
                }
                Interrupt::Remember => {}
            }
        }
    }

    /// Answers a transfer request that never reached a transfer, counting
    /// it as a recoverable error like every other refusal.
    fn refuse(&self, reply: oneshot::Sender<TransferOutcome>, reason: &str) {
        self.metrics.migrations.record(MigrationResult::Recoverable);
        let _ = reply.send(TransferOutcome::RecoverableError(reason.into()));
    }

    /// Answers what queued on the control channel while a move ran. A
    /// transfer asked for meanwhile was asked of a session that has just
    /// moved (or stayed): carried out later it would only move the session
    /// again (ten concurrent requests made four moves in a row), so it is
    /// refused like one that finds a transfer waiting.
    pub fn settle_queued_commands(&mut self) {
        while let Some(cmd) = self.control.try_recv() {
            match *cmd {
                ControlCommand::Transfer { reply, .. } => self.refuse(reply, TRANSFER_IN_PROGRESS),
                ControlCommand::HandOff { reply, .. } | ControlCommand::Pause { reply, .. } => {
                    let _ = reply.send(TransferOutcome::RecoverableError(
                        TRANSFER_IN_PROGRESS.into(),
                    ));
                }
                other => self.handle(other),
            }
        }
    }

    /// Releases the request direction held for a transfer: bytes the
    /// client sent meanwhile go to whatever server is now in `self.server`.
    pub fn resume_after_transfer(&mut self) {
        self.tracker.set_hold_at_sync(false);
        self.request.resume();
        if let Some(c) = &mut self.careful {
            c.resume();
        }
    }

    /// Statements the session's (new) backend lacks: from now on they are
    /// re-created before their first use (`careful`).
    pub fn defer_statements(&mut self, deferred: Vec<Deferred>) {
        if deferred.is_empty() {
            return;
        }
        match &mut self.careful {
            Some(c) => c.defer(deferred),
            None => {
                let held = self.request.take_held();
                self.careful = Some(Box::new(Careful::new(deferred, held, self.max_message_len)));
            }
        }
    }

    /// Statements the backend may lack (carried by the forwarder across
    /// moves, since no capture can see them).
    pub fn deferred_statements(&self) -> Vec<Deferred> {
        self.careful
            .as_ref()
            .map(|c| c.deferred().cloned().collect())
            .unwrap_or_default()
    }

    /// The client has sent bytes that wait behind a transfer's hold (read
    /// and held, or still on its socket). A TLS socket cannot be peeked, so
    /// it always counts as having sent something.
    pub fn client_sent_during_hold(&self) -> bool {
        !self.request.at_boundary()
            || self
                .careful
                .as_ref()
                .is_some_and(|c| !c.request_at_boundary())
            || !self.client.is_silent()
    }

    /// Whether the session can go on on another server after losing its
    /// own: nothing in flight or half-forwarded either way, idle outside a
    /// transaction, and no deferred statements being re-created.
    pub fn can_rehome(&self) -> bool {
        self.careful.is_none()
            && self.request.is_drained()
            && self.request.at_boundary()
            && self.response.at_boundary()
            && self.tracker.is_quiescent()
    }

    /// After a new server socket was swapped in for one that was lost
    /// (the session was rehomed): forwarding can go on.
    pub fn replace_lost_server_after_swap(&mut self) {
        self.response.reopen();
        self.resume_after_transfer();
    }

    /// No message is half-forwarded to the client.
    pub fn response_at_boundary(&self) -> bool {
        self.response.at_boundary()
            && self
                .careful
                .as_ref()
                .is_none_or(|c| c.response_at_boundary())
    }

    /// No client message is half-forwarded to the server.
    pub fn request_at_boundary(&self) -> bool {
        self.request.at_boundary()
            && self
                .careful
                .as_ref()
                .is_none_or(|c| c.request_at_boundary())
    }

    fn request_paused(&self) -> bool {
        self.request.is_paused() || self.careful.as_ref().is_some_and(|c| c.is_paused())
    }

    /// True when a transfer may run right now.
    fn at_safe_point(&self) -> bool {
        self.request.is_drained()
            && self.response.at_boundary()
            && self.careful.as_ref().is_none_or(|c| c.at_safe_point())
            && self.tracker.is_quiescent()
    }

    fn snapshot(&self) -> SessionSnapshot {
        SessionSnapshot {
            outstanding: self.tracker.outstanding(),
            tx_status: self.tracker.tx_status(),
            copy: self.tracker.copy(),
            last_request: self.tracker.last_request(),
            last_response: self.tracker.last_response(),
            at_message_boundary: self.request.at_boundary() && self.response.at_boundary(),
            request_buffer_held: self.request.holds_buffer(),
            response_buffer_held: self.response.holds_buffer(),
            transfer_pending: matches!(self.transfer, TransferWait::Waiting(_)),
        }
    }

    fn wait_for_safe_point(&mut self, request: TransferRequest, timeout: Duration) {
        self.tracker.set_hold_at_sync(true);
        self.transfer = TransferWait::Waiting(Box::new(Waiting {
            request,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }));
    }

    /// `refuse` for a request that was waiting; a hand-off's refusal is not
    /// a migration and is not counted as one.
    fn refuse_request(&self, request: TransferRequest, reason: &str) {
        if request.hand_off || request.pause.is_some() {
            let _ = request
                .reply
                .send(TransferOutcome::RecoverableError(reason.into()));
        } else {
            self.refuse(request.reply, reason);
        }
    }

    /// A hand-off or a pause: refused while a move waits or the client is
    /// leaving, else waiting for the safe point.
    fn ask_for_safe_point(&mut self, request: TransferRequest, timeout: Duration) {
        if matches!(self.transfer, TransferWait::Waiting(_)) {
            self.refuse_request(request, TRANSFER_IN_PROGRESS);
        } else if self.tracker.client_terminated() {
            self.refuse_request(request, SESSION_CLOSING);
        } else {
            self.wait_for_safe_point(request, timeout);
        }
    }

    fn handle(&mut self, cmd: ControlCommand) {
        match cmd {
            ControlCommand::Inspect(reply) => {
                let _ = reply.send(self.snapshot());
            }
            ControlCommand::Transfer {
                to,
                timeout,
                reply,
                hold,
            } => {
                if matches!(self.transfer, TransferWait::Waiting(_)) {
                    self.refuse(reply, TRANSFER_IN_PROGRESS);
                    return;
                }
                if self.tracker.client_terminated() {
                    self.refuse(reply, SESSION_CLOSING);
                    return;
                }
                self.wait_for_safe_point(
                    TransferRequest {
                        to,
                        requested_at: Instant::now(),
                        reply,
                        hold,
                        hand_off: false,
                        pause: None,
                    },
                    timeout,
                );
            }
            ControlCommand::HandOff { timeout, reply } => {
                let request = TransferRequest {
                    to: None,
                    requested_at: Instant::now(),
                    reply,
                    hold: None,
                    hand_off: true,
                    pause: None,
                };
                self.ask_for_safe_point(request, timeout);
            }
            ControlCommand::Pause {
                timeout,
                reply,
                pause,
            } => {
                let request = TransferRequest {
                    to: None,
                    requested_at: Instant::now(),
                    reply,
                    hold: None,
                    hand_off: false,
                    pause: Some(pause),
                };
                self.ask_for_safe_point(request, timeout);
            }
            ControlCommand::Terminate(err) => self.pending_terminate = Some(Box::new(err)),
            ControlCommand::Remember => {
                let now = self.tracker.last_request();
                self.remember_due = self.remember_seen == Some(now);
                self.remember_seen = Some(now);
            }
        }
    }

    /// One poll of the session (the session task's own `Future` calls it).
    pub fn poll_session(&mut self, cx: &mut Context<'_>) -> Poll<Interrupt> {
        while self.control_open {
            match self.control.poll_recv(cx) {
                Poll::Ready(Some(cmd)) => self.handle(*cmd),
                Poll::Ready(None) => self.control_open = false,
                Poll::Pending => break,
            }
        }
        loop {
            let end = self.poll_pumps(cx);
            let (up, down) = (self.request.take_bytes(), self.response.take_bytes());
            self.bytes_from_client += up;
            self.bytes_to_client += down;
            self.metrics.bytes_client_to_server.inc_by(up);
            self.metrics.bytes_server_to_client.inc_by(down);
            if let Poll::Ready(end) = end {
                if let TransferWait::Waiting(w) =
                    std::mem::replace(&mut self.transfer, TransferWait::None)
                {
                    self.refuse_request(w.request, "session ended before a safe point");
                }
                return Poll::Ready(Interrupt::Ended(end));
            }
            if self.response_at_boundary() {
                if let Some(err) = self.pending_terminate.take() {
                    return Poll::Ready(Interrupt::Ended(ForwardEnd::Terminated(*err)));
                }
            }
            if std::mem::take(&mut self.remember_due)
                && matches!(self.transfer, TransferWait::None)
                && self.at_safe_point()
            {
                return Poll::Ready(Interrupt::Remember);
            }
            match self.poll_transfer_wait(cx) {
                WaitStep::Ready(req) => return Poll::Ready(Interrupt::SafePoint(req)),
                // The request direction was released: poll it again now.
                WaitStep::Resumed => continue,
                WaitStep::Waiting => return Poll::Pending,
            }
        }
    }

    fn poll_transfer_wait(&mut self, cx: &mut Context<'_>) -> WaitStep {
        if !matches!(self.transfer, TransferWait::Waiting(_)) {
            return WaitStep::Waiting;
        }
        // A client that sent Terminate is leaving: never move it (its
        // backend is closing the session, a capture would only fail).
        if self.tracker.client_terminated() {
            if let TransferWait::Waiting(w) =
                std::mem::replace(&mut self.transfer, TransferWait::None)
            {
                self.refuse_request(w.request, SESSION_CLOSING);
            }
            self.resume_after_transfer();
            return WaitStep::Resumed;
        }
        if self.at_safe_point() {
            if let TransferWait::Waiting(w) =
                std::mem::replace(&mut self.transfer, TransferWait::None)
            {
                return WaitStep::Ready(w.request);
            }
        }
        let expired = match &mut self.transfer {
            TransferWait::Waiting(w) => w.deadline.as_mut().poll(cx).is_ready(),
            TransferWait::None => false,
        };
        if expired {
            if let TransferWait::Waiting(w) =
                std::mem::replace(&mut self.transfer, TransferWait::None)
            {
                self.refuse_request(w.request, "no safe point before deadline");
            }
            self.resume_after_transfer();
            return WaitStep::Resumed;
        }
        // Held after a sync point whose answers have all arrived, but the
        // session is inside a transaction (or COPY): let it go on until
        // the next sync point.
        if self.request_paused() && self.tracker.outstanding() == 0 && self.response_at_boundary() {
            self.request.resume();
            if let Some(c) = &mut self.careful {
                c.resume();
            }
            return WaitStep::Resumed;
        }
        WaitStep::Waiting
    }

    fn poll_pumps(&mut self, cx: &mut Context<'_>) -> Poll<ForwardEnd> {
        if let Some(c) = &mut self.careful {
            let r = c.poll(cx, &mut self.client, &mut self.server, &mut self.tracker);
            let (up, down) = (
                std::mem::take(&mut c.to_server),
                std::mem::take(&mut c.to_client),
            );
            self.request.bytes_unreported += up;
            self.response.bytes_unreported += down;
            if r.is_pending() && c.done() {
                // Every statement is back: the pumps take over.
                self.careful = None;
                cx.waker().wake_by_ref();
            }
            return r;
        }
        // (Request first: what the client sent should reach the server
        // before we wait on the server's answer.)
        let mut side = self.tracker.request_side();
        match self.request.poll_forward(
            cx,
            Pin::new(&mut self.client),
            Pin::new(&mut self.server),
            &mut side,
        ) {
            Poll::Ready(Ok(())) => return Poll::Ready(ForwardEnd::ClientClosed),
            Poll::Ready(Err(PumpError::Read(e))) => return Poll::Ready(ForwardEnd::ClientIo(e)),
            Poll::Ready(Err(PumpError::Write(e))) => return Poll::Ready(ForwardEnd::ServerIo(e)),
            Poll::Ready(Err(PumpError::Frame(e))) => {
                return Poll::Ready(ForwardEnd::ClientProtocol(e))
            }
            Poll::Pending => {}
        }
        let mut side = self.tracker.response_side();
        match self.response.poll_forward(
            cx,
            Pin::new(&mut self.server),
            Pin::new(&mut self.client),
            &mut side,
        ) {
            Poll::Ready(Ok(())) => Poll::Ready(ForwardEnd::ServerClosed),
            Poll::Ready(Err(PumpError::Read(e))) => Poll::Ready(ForwardEnd::ServerIo(e)),
            Poll::Ready(Err(PumpError::Write(e))) => Poll::Ready(ForwardEnd::ClientIo(e)),
            Poll::Ready(Err(PumpError::Frame(e))) => Poll::Ready(ForwardEnd::ServerProtocol(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgferry_wire::messages::{tag, take_message};
    use pgferry_wire::ErrorFields;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Two connected loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// A forwarder between two loopback socket pairs: (forwarder, the
    /// application's end, the database's end, the control sender).
    async fn session(
        metrics: &Arc<Metrics>,
        status: u8,
    ) -> (Forwarder<'static>, TcpStream, TcpStream, ControlSender) {
        let (app, proxy_client) = pair().await;
        let (proxy_server, db) = pair().await;
        let (tx, rx) = control_channel();
        let fwd = Forwarder::new(
            Stream::Plain(proxy_client),
            Stream::Plain(proxy_server),
            SessionTracker::new(status, Default::default()),
            rx,
            1 << 20,
            metrics.clone(),
        );
        (fwd, app, db, tx)
    }

    fn msg(t: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![t];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[tokio::test]
    async fn control_channel_inspect_transfer_stub_and_terminate() {
        let metrics = Arc::new(Metrics::new());
        let (mut fwd, mut app, mut db, tx) = session(&metrics, b'I').await;
        let driver = async {
            // A query and its answer pass through; then the session is idle.
            app.write_all(&msg(b'Q', b"select 1\0")).await.unwrap();
            let mut got = vec![0u8; 14];
            db.read_exact(&mut got).await.unwrap();
            assert_eq!(got, msg(b'Q', b"select 1\0"));
            db.write_all(&[msg(b'C', b"SELECT 1\0"), msg(b'Z', b"I")].concat())
                .await
                .unwrap();
            let mut answer = vec![0u8; 14 + 6];
            app.read_exact(&mut answer).await.unwrap();

            let (stx, srx) = oneshot::channel();
            tx.send(ControlCommand::Inspect(stx)).await.unwrap();
            let snap = srx.await.unwrap();
            assert_eq!(snap.outstanding, 0);
            assert_eq!(snap.tx_status, TxStatus::Idle);
            assert!(snap.at_message_boundary);
            assert!(
                !snap.request_buffer_held && !snap.response_buffer_held,
                "idle session holds a buffer"
            );
            assert_eq!(snap.last_request.map(|s| s.tag), Some(b'Q'));
            assert_eq!(snap.last_response.map(|s| s.tag), Some(b'Z'));

            let (ttx, trx) = oneshot::channel();
            tx.send(ControlCommand::Transfer {
                to: None,
                timeout: Duration::from_secs(5),
                reply: ttx,
                hold: None,
            })
            .await
            .unwrap();
            // An idle session is at a safe point at once; this caller has
            // no transfer machinery and refuses it.
            assert_eq!(
                trx.await.unwrap(),
                TransferOutcome::RecoverableError("transfers are not available".into())
            );
            tx.send(ControlCommand::Terminate(SessionError::AdminShutdown))
                .await
                .unwrap();
        };
        let (end, ()) = tokio::join!(fwd.run_to_end(), driver);
        assert!(
            matches!(end, ForwardEnd::Terminated(SessionError::AdminShutdown)),
            "{end:?}"
        );
        assert_eq!(metrics.bytes_client_to_server.get(), 14);
        assert_eq!(metrics.bytes_server_to_client.get(), 20);
        // What the session layer then sends is decided by errors.rs.
        let mut buf = bytes::BytesMut::new();
        SessionError::AdminShutdown.encode_for_client(&mut buf);
        let m = take_message(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(m.tag, tag::ERROR_RESPONSE);
        assert_eq!(
            ErrorFields::decode(&m.body).unwrap().sqlstate(),
            Some("57P01")
        );
    }

    #[tokio::test]
    async fn terminate_waits_for_a_message_boundary() {
        let metrics = Arc::new(Metrics::new());
        let (mut fwd, mut app, mut db, tx) = session(&metrics, b'I').await;
        let row = msg(b'D', &[7u8; 100]);
        let driver = async {
            // Half a DataRow from the server, then the terminate request.
            db.write_all(&row[..40]).await.unwrap();
            let mut first = vec![0u8; 40];
            app.read_exact(&mut first).await.unwrap();
            tx.send(ControlCommand::Terminate(SessionError::AdminShutdown))
                .await
                .unwrap();
            // Let the forwarder see the command while mid-message.
            let (stx, srx) = oneshot::channel();
            tx.send(ControlCommand::Inspect(stx)).await.unwrap();
            assert!(!srx.await.unwrap().at_message_boundary);
            db.write_all(&row[40..]).await.unwrap();
            let mut rest = vec![0u8; row.len() - 40];
            app.read_exact(&mut rest).await.unwrap();
            assert_eq!([first, rest].concat(), row, "the row arrived whole");
        };
        let (end, ()) = tokio::join!(fwd.run_to_end(), driver);
        assert!(matches!(end, ForwardEnd::Terminated(_)), "{end:?}");
        assert!(fwd.response.at_boundary());
    }

    async fn expect_bytes(s: &mut TcpStream, want: &[u8]) {
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn transfer_waits_for_commit_and_held_bytes_go_to_the_new_server() {
        let metrics = Arc::new(Metrics::new());
        let (mut fwd, mut app, mut db, tx) = session(&metrics, b'I').await;
        let (ttx, trx) = oneshot::channel();
        let driver = async {
            app.write_all(&msg(b'Q', b"begin\0")).await.unwrap();
            expect_bytes(&mut db, &msg(b'Q', b"begin\0")).await;
            db.write_all(&[msg(b'C', b"BEGIN\0"), msg(b'Z', b"T")].concat())
                .await
                .unwrap();
            expect_bytes(&mut app, &[msg(b'C', b"BEGIN\0"), msg(b'Z', b"T")].concat()).await;
            tx.send(ControlCommand::Transfer {
                to: None,
                timeout: Duration::from_secs(30),
                reply: ttx,
                hold: None,
            })
            .await
            .unwrap();
            // Inside the transaction: forwarded, answered, not a safe point.
            app.write_all(&msg(b'Q', b"select 1\0")).await.unwrap();
            expect_bytes(&mut db, &msg(b'Q', b"select 1\0")).await;
            db.write_all(&msg(b'Z', b"T")).await.unwrap();
            expect_bytes(&mut app, &msg(b'Z', b"T")).await;
            app.write_all(&msg(b'Q', b"commit\0")).await.unwrap();
            expect_bytes(&mut db, &msg(b'Q', b"commit\0")).await;
            // Sent before COMMIT's answer: must wait for the transfer.
            app.write_all(&msg(b'Q', b"after\0")).await.unwrap();
            db.write_all(&msg(b'Z', b"I")).await.unwrap();
            expect_bytes(&mut app, &msg(b'Z', b"I")).await;
        };
        let (interrupt, ()) = tokio::join!(fwd.run(), driver);
        let Interrupt::SafePoint(req) = interrupt else {
            panic!("expected a safe point, got {interrupt:?}")
        };
        assert!(fwd.tracker.is_quiescent());
        // The session layer would dial and replay here; swap in a new server.
        let (new_server, mut new_db) = pair().await;
        let old = std::mem::replace(&mut fwd.server, Stream::Plain(new_server));
        let _ = req.reply.send(TransferOutcome::Success {
            from: "a".into(),
            to: "b".into(),
            duration: Duration::ZERO,
            pause: Duration::ZERO,
        });
        assert!(matches!(
            trx.await.unwrap(),
            TransferOutcome::Success { .. }
        ));
        fwd.resume_after_transfer();
        drop(old);
        let driver = async {
            expect_bytes(&mut new_db, &msg(b'Q', b"after\0")).await;
            new_db.write_all(&msg(b'Z', b"I")).await.unwrap();
            expect_bytes(&mut app, &msg(b'Z', b"I")).await;
            drop(app);
        };
        let (end, ()) = tokio::join!(fwd.run_to_end(), driver);
        assert!(matches!(end, ForwardEnd::ClientClosed), "{end:?}");
        // The old server never saw the held query.
        let mut rest = Vec::new();
        db.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "old server got {rest:?}");
    }

    #[tokio::test]
    async fn no_safe_point_before_deadline_is_recoverable_and_the_session_goes_on() {
        let metrics = Arc::new(Metrics::new());
        let (mut fwd, mut app, mut db, tx) = session(&metrics, b'T').await;
        let driver = async {
            let (ttx, trx) = oneshot::channel();
            tx.send(ControlCommand::Transfer {
                to: None,
                timeout: Duration::from_millis(50),
                reply: ttx,
                hold: None,
            })
            .await
            .unwrap();
            assert_eq!(
                trx.await.unwrap(),
                TransferOutcome::RecoverableError("no safe point before deadline".into())
            );
            app.write_all(&msg(b'Q', b"commit\0")).await.unwrap();
            expect_bytes(&mut db, &msg(b'Q', b"commit\0")).await;
            db.write_all(&msg(b'Z', b"I")).await.unwrap();
            expect_bytes(&mut app, &msg(b'Z', b"I")).await;
            drop(app);
        };
        let (interrupt, ()) = tokio::join!(fwd.run(), driver);
        assert!(
            matches!(interrupt, Interrupt::Ended(ForwardEnd::ClientClosed)),
            "{interrupt:?}"
        );
    }
}
