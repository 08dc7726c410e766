//! Hand-off of a running pgferry to a new process (restart, upgrade)
//! without dropping a session.
//!
//! The new process (`pgferry run --takeover`) connects to the running
//! one's hand-off socket (`channel`), and the two speak the frames in
//! `protocol`: the old process passes its listening sockets first (one
//! accept queue, so no connection attempt is refused), then each session
//! at its own safe point: client socket, backend socket (the PostgreSQL
//! session itself never notices) and what the session knows (`state`),
//! TLS record state included (`tls::handover`). `give` is the old
//! process's side, `take` the new one's. The old process exits 0 once it
//! has nothing left.

pub mod channel;
pub mod give;
pub mod protocol;
pub mod state;
pub mod take;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// Hand-off state shared by the accept loop, sessions, the admin API and
/// the two sides' coordinators. Touched at hand-off time only.
pub struct HandoffState {
    /// The client accept loop accepts while this is true; the old process
    /// stops accepting while its listener is with the new one.
    accepting: watch::Sender<bool>,
    /// Duplicates of the listening sockets, to pass on.
    listeners: Mutex<Option<Listeners>>,
    /// Old process: the channel to the new one while sessions are handed
    /// over.
    port: Mutex<Option<Arc<give::Port>>>,
    /// New process: the channel to the old one while it lives (cancels
    /// for sessions it still serves go there).
    previous: Mutex<Option<Arc<take::Previous>>>,
    /// True once this process has handed everything over (it exits).
    finished: watch::Sender<bool>,
    /// What `GET /v1/handoff` reports.
    status: Mutex<Status>,
    /// How to start a successor (`POST /v1/handoff`, SIGUSR2): this
    /// process's executable and config file.
    successor: Mutex<Option<(PathBuf, PathBuf)>>,
    /// `start_successor` is running.
    starting: std::sync::atomic::AtomicBool,
    /// This process took over from another (`take::connect`).
    successor_of: std::sync::atomic::AtomicBool,
}

/// The listening sockets a new process takes over.
pub struct Listeners {
    pub proxy: OwnedFd,
    pub admin: Option<OwnedFd>,
}

/// Where the last hand-off this process took part in stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// None yet.
    #[default]
    Idle,
    /// Old process: a successor was started, or one said HELLO.
    Starting,
    /// Old process: the listeners are with the new one; sessions move.
    HandingOver,
    /// Old process: everything it could give is given (it exits when the
    /// rest end). New process: the old one has exited.
    Done,
    /// Old process: the new one went away or was refused; this one serves
    /// on and accepts again.
    Aborted,
    /// New process: adopting the old one's sessions.
    TakingOver,
}

impl Phase {
    /// The hand-off is over, one way or the other.
    pub fn is_over(self) -> bool {
        matches!(self, Phase::Done | Phase::Aborted)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Starting => "starting",
            Phase::HandingOver => "handing_over",
            Phase::Done => "done",
            Phase::Aborted => "aborted",
            Phase::TakingOver => "taking_over",
        }
    }
}

/// The last hand-off this process took part in, for the admin API.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub phase: Phase,
    pub role: Option<&'static str>,
    pub peer_pid: Option<i32>,
    pub handed_over: u64,
    pub kept: u64,
    pub resumed: u64,
    pub remaining: usize,
    pub error: Option<String>,
    /// This process's id (a status answered by the old or the new one).
    pub pid: u32,
}

impl Default for HandoffState {
    fn default() -> Self {
        Self {
            accepting: watch::channel(true).0,
            listeners: Mutex::new(None),
            port: Mutex::new(None),
            previous: Mutex::new(None),
            finished: watch::channel(false).0,
            status: Mutex::new(Status {
                phase: Phase::Idle,
                pid: std::process::id(),
                ..Status::default()
            }),
            successor: Mutex::new(None),
            starting: std::sync::atomic::AtomicBool::new(false),
            successor_of: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the
/// machine, so a pause that starts in the old process can be measured in
/// the new one.
pub(crate) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec())
                .unwrap_or(0)
                .saturating_mul(1_000_000_000)
                .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0))
        })
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Whole-value assignments only: a panic cannot leave a half-update.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl HandoffState {
    /// Follows `accepting` (the accept loop's gate).
    pub fn accepting(&self) -> watch::Receiver<bool> {
        self.accepting.subscribe()
    }

    fn set_accepting(&self, on: bool) {
        self.accepting.send_replace(on);
    }

    pub fn set_listeners(&self, listeners: Listeners) {
        *lock(&self.listeners) = Some(listeners);
    }

    /// Resolves once this process has handed everything over.
    pub async fn finished(&self) {
        let mut rx = self.finished.subscribe();
        let _ = rx.wait_for(|f| *f).await;
    }

    pub fn status(&self) -> Status {
        lock(&self.status).clone()
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut lock(&self.status));
    }

    pub fn set_successor(&self, exe: PathBuf, config: PathBuf) {
        *lock(&self.successor) = Some((exe, config));
    }

    /// A hand-off to a new process is running (moves, drains and
    /// switchovers wait for it to end).
    pub fn in_progress(&self) -> bool {
        lock(&self.port).is_some()
    }

    /// This process took its listeners over from a running pgferry.
    pub fn is_successor(&self) -> bool {
        self.successor_of.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(crate) fn port(&self) -> Option<Arc<give::Port>> {
        lock(&self.port).clone()
    }

    pub(crate) fn previous(&self) -> Option<Arc<take::Previous>> {
        lock(&self.previous).clone()
    }
}

/// Starts a new pgferry from this process's executable and config with
/// `--takeover`, and waits until the hand-off to it is over: "done" (it
/// has every session this process could give; this process exits when
/// the rest end) or "aborted" (this process serves on). One
/// implementation for `POST /v1/handoff`, `pgferry ctl handoff` and
/// SIGUSR2.
pub async fn start_successor(ctx: &crate::ProxyContext) -> Result<Status, String> {
    let Some((exe, config)) = lock(&ctx.handoff.successor).clone() else {
        return Err("this process was not started from a config file".into());
    };
    // One successor at a time, whoever asks (API, ctl, SIGUSR2).
    if ctx
        .handoff
        .starting
        .swap(true, std::sync::atomic::Ordering::AcqRel)
        || ctx.handoff.in_progress()
        || ctx.handoff.previous().is_some()
    {
        return Err("a hand-off is already running".into());
    }
    let result = run_successor(ctx, &exe, &config).await;
    ctx.handoff
        .starting
        .store(false, std::sync::atomic::Ordering::Release);
    if let Err(why) = &result {
        ctx.handoff.update(|s| {
            if s.phase != Phase::Done {
                s.phase = Phase::Aborted;
                s.error = Some(why.clone());
            }
        });
    }
    result
}

async fn run_successor(
    ctx: &crate::ProxyContext,
    exe: &std::path::Path,
    config: &std::path::Path,
) -> Result<Status, String> {
    ctx.handoff.update(|s| {
        s.phase = Phase::Starting;
        s.role = Some("old");
        s.error = None;
    });
    let mut child = tokio::process::Command::new(exe)
        .arg("run")
        .arg("--config")
        .arg(config)
        .arg("--takeover")
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let pid = child.id();
    tracing::info!(?pid, exe = %exe.display(), "started a new pgferry to take over");
    let mut finished = ctx.handoff.finished.subscribe();
    // Over when the status says so (for this child), or when the child
    // exits before that. "done" also sets `finished`, which wakes this at
    // once (the process is about to exit: its answer must go out first);
    // an abort is seen at the next look.
    loop {
        let status = ctx.handoff.status();
        if status.peer_pid.is_some_and(|p| Some(p as u32) == pid) && status.phase.is_over() {
            return Ok(status);
        }
        tokio::select! {
            exited = child.wait() => {
                let status = ctx.handoff.status();
                if status.phase == Phase::Done {
                    return Ok(status);
                }
                return Err(match exited {
                    Ok(code) => format!("the new process exited ({code}) before taking over"),
                    Err(e) => format!("the new process could not be watched: {e}"),
                });
            }
            _ = finished.changed() => {}
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
        }
    }
}
