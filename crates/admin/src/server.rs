//! The admin listener's connections: the cap on how many are open, the
//! header and idle timeouts, and graceful shutdown.
//!
//! axum::serve has none of these knobs, and without them a few hundred
//! half-open admin connections hold file descriptors the database
//! listener needs. hyper's own `header_read_timeout` is not used: it runs
//! from the end of one response to the end of the next header, so it would
//! also close kept-alive connections after the (short) header timeout, and
//! the idle timeout could never be longer. The watchdog here tells the two
//! phases apart instead.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use pgferry_proxy::Metrics;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;
use tracing::{debug, warn};

/// `[proxy] admin_*` settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// At most one "limit reached" warning this often, so that a flood does
/// not also flood the log; the metric counts every refusal.
const REFUSAL_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown` resolves, then lets open
/// requests finish (idle connections close at once) and returns when every
/// connection has ended. Accepts only while `accepting` is true: during a
/// hand-off a new process holds a copy of the listener, and new admin
/// connections are its (the client listener pauses the same way).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut accepting: watch::Receiver<bool>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut refusals = Refusals::default();
    tokio::pin!(shutdown);
    loop {
        if !*accepting.borrow_and_update() {
            tokio::select! {
                _ = shutdown.as_mut() => break,
                _ = changed(&mut accepting) => continue,
            }
        }
        let accepted = tokio::select! {
            a = pgferry_proxy::listener::accept_until(
                &listener,
                shutdown.as_mut(),
                "admin accept failed",
            ) => a,
            _ = changed(&mut accepting) => continue,
        };
        let Some((tcp, peer)) = accepted else { break };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(serve_connection(
                    tcp,
                    router.clone(),
                    limits,
                    metrics.clone(),
                    stop_rx.clone(),
                    permit,
                ));
            }
            Err(_) => {
                // Closed unread: reading or answering would let the client
                // hold this fd as long as it likes.
                drop(tcp);
                metrics.admin_connections_rejected.inc();
                debug!(%peer, "admin connection refused: admin_max_connections reached");
                refusals.note(limits.max_connections);
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a permit until it ends. The count was
    // validated to fit (config::MAX_ADMIN_CONNECTIONS).
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    Ok(())
}

/// Resolves when `accepting` changes; never once its sender is gone (the
/// gate then stays as it was).
async fn changed(accepting: &mut watch::Receiver<bool>) {
    if accepting.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Rate limit of the "admin connection limit reached" warning.
#[derive(Default)]
struct Refusals {
    warned_at: Option<Instant>,
    since_warning: u64,
}

impl Refusals {
    fn note(&mut self, max_connections: usize) {
        self.since_warning += 1;
        let now = Instant::now();
        if self
            .warned_at
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_WARNING_INTERVAL)
        {
            warn!(
                admin_max_connections = max_connections,
                refused = self.since_warning,
                "admin connection limit reached; closing new admin connections unread"
            );
            self.warned_at = Some(now);
            self.since_warning = 0;
        }
    }
}

async fn serve_connection(
    tcp: TcpStream,
    router: Router,
    limits: Limits,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    metrics.admin_connections.inc();
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: tcp,
        activity: activity.clone(),
    });
    let service = Tracked {
        router,
        activity: activity.clone(),
    };
    let conn = hyper::server::conn::http1::Builder::new()
        // The watchdog below times headers; see the module comment.
        .header_read_timeout(None)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let (_, deadline) = activity.deadline(&limits);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "admin connection ended with an error");
                }
                break;
            }
            _ = activity.changed.notified() => {}
            _ = sleep_until(deadline) => {
                // The phase may have moved on while the timer fired.
                let (phase, now_due) = activity.deadline(&limits);
                if now_due.is_some_and(|d| d <= Instant::now()) {
                    metrics
                        .admin_connections_timed_out
                        .with_label_values(&[phase.label()])
                        .inc();
                    debug!(phase = phase.label(), "admin connection timed out; closing it");
                    // Dropping the connection closes the socket.
                    break;
                }
            }
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    metrics.admin_connections.dec();
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Where a connection is between requests, for its timeouts.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request header to be complete: since the accept, or
    /// since the first byte after an idle spell.
    Header { since: Instant },
    /// Kept alive after a response; no byte of the next request yet.
    Idle { since: Instant },
    /// Requests being handled: no timeout (a drain may take minutes).
    Busy { requests: usize },
}

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Header { .. } => "header",
            Phase::Idle { .. } => "idle",
            Phase::Busy { .. } => "busy",
        }
    }
}

/// A connection's phase, shared by its socket, its service and its watchdog.
struct Activity {
    phase: Mutex<Phase>,
    /// Wakes the watchdog when the phase changes. `notify_one` keeps a
    /// permit when nobody waits, so no change is missed.
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            phase: Mutex::new(Phase::Header {
                since: Instant::now(),
            }),
            changed: Notify::new(),
        }
    }

    fn update(&self, f: impl FnOnce(Phase) -> Option<Phase>) {
        let mut phase = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(next) = f(*phase) {
            *phase = next;
            drop(phase);
            self.changed.notify_one();
        }
    }

    fn deadline(&self, limits: &Limits) -> (Phase, Option<Instant>) {
        let phase = *self.phase.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = match phase {
            Phase::Header { since } => Some(since + limits.header_timeout),
            Phase::Idle { since } => Some(since + limits.idle_timeout),
            Phase::Busy { .. } => None,
        };
        (phase, deadline)
    }

    fn bytes_read(&self) {
        self.update(|p| match p {
            Phase::Idle { .. } => Some(Phase::Header {
                since: Instant::now(),
            }),
            _ => None,
        });
    }

    fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.update(|p| {
            Some(Phase::Busy {
                requests: match p {
                    Phase::Busy { requests } => requests + 1,
                    _ => 1,
                },
            })
        });
        RequestGuard(self.clone())
    }
}

/// Ends a request's busy phase when its handler is done (or dropped).
struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.update(|p| match p {
            Phase::Busy { requests } if requests > 1 => Some(Phase::Busy {
                requests: requests - 1,
            }),
            _ => Some(Phase::Idle {
                since: Instant::now(),
            }),
        });
    }
}

/// The router as a hyper service that marks its connection busy while a
/// request is handled.
#[derive(Clone)]
struct Tracked {
    router: Router,
    activity: Arc<Activity>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Tracked {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, req: hyper::Request<Incoming>) -> Self::Future {
        let guard = self.activity.request_started();
        let router = self.router.clone();
        let req: Request = req.map(Body::new);
        Box::pin(async move {
            let response = router.oneshot(req).await;
            drop(guard);
            response
        })
    }
}

/// The socket, telling its connection's `Activity` when bytes arrive.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
