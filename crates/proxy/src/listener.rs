//! Accepting clients: binding the listener with its backlog, the
//! connection limit, one task per connection (on the shared runtime, or on
//! a session thread of its own: `SessionThreads`), and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::errors::SessionError;
use crate::session;
use crate::ProxyContext;

/// Connections over the limit that may be getting their "too many
/// clients" answer at once; beyond that they are dropped unanswered.
const MAX_REFUSALS_IN_FLIGHT: usize = 1024;

/// Where Linux caps every listen backlog.
const SOMAXCONN_PATH: &str = "/proc/sys/net/core/somaxconn";
/// Assumed when `SOMAXCONN_PATH` cannot be read: Linux's default since 5.4.
const SOMAXCONN_FALLBACK: u32 = 4096;
/// Smallest derived backlog, whatever `max_client_connections` is.
const MIN_DEFAULT_BACKLOG: u32 = 1024;

/// The accept queue length of the client listener, and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// `listen_backlog`, or twice `max_client_connections` (at least
    /// 1024), as PostgreSQL derives its own from max_connections.
    pub requested: u32,
    /// The kernel's cap (`net.core.somaxconn`).
    pub somaxconn: u32,
    /// Whether `somaxconn` was read or assumed.
    pub somaxconn_read: bool,
}

impl Backlog {
    pub fn new(listen_backlog: Option<u32>, max_client_connections: usize) -> Self {
        let read = std::fs::read_to_string(SOMAXCONN_PATH)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        Self::from_parts(listen_backlog, max_client_connections, read)
    }

    fn from_parts(
        listen_backlog: Option<u32>,
        max_client_connections: usize,
        somaxconn: Option<u32>,
    ) -> Self {
        let derived = u32::try_from(max_client_connections.saturating_mul(2))
            .unwrap_or(u32::MAX)
            .max(MIN_DEFAULT_BACKLOG);
        Self {
            requested: listen_backlog.unwrap_or(derived),
            somaxconn: somaxconn.unwrap_or(SOMAXCONN_FALLBACK),
            somaxconn_read: somaxconn.is_some(),
        }
    }

    /// What the kernel will use: it silently truncates to somaxconn.
    pub fn effective(&self) -> u32 {
        self.requested.min(self.somaxconn)
    }
}

/// Binds `addr` with SO_REUSEADDR (as tokio's own bind does, so a restart
/// does not wait for TIME_WAIT) and `backlog`; tokio's bind always asks
/// for 128, which makes connection bursts wait for SYN retransmits.
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    TcpListener::from_std(socket.into())
}

/// The next connection, or None once `shutdown` resolves. Accept errors
/// (EMFILE and friends) are logged as `what` and backed off, not spun on.
pub async fn accept_until(
    listener: &TcpListener,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
    what: &str,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.as_mut() => return None,
            r = listener.accept() => r,
        };
        match accepted {
            Ok(x) => return Some(x),
            Err(e) => {
                warn!(error = %e, "{what}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

pub async fn accept_loop(
    ctx: Arc<ProxyContext>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let slots = ctx.slots.clone();
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    let mut accepting = ctx.handoff.accepting();
    let threads = match ctx.config.proxy.session_threads {
        0 => None,
        n => match SessionThreads::start(n) {
            Ok(t) => Some(t),
            Err(e) => {
                warn!(error = %e, "session threads could not start; sessions run on the shared runtime");
                None
            }
        },
    };
    tokio::pin!(shutdown);
    loop {
        // Paused while a new process holds the listener (`handoff`):
        // connections wait in the accept queue the two processes share.
        if !*accepting.borrow_and_update() {
            tokio::select! {
                _ = shutdown.as_mut() => break,
                _ = accepting.changed() => continue,
            }
        }
        let accepted = tokio::select! {
            a = accept_until(&listener, shutdown.as_mut(), "accept failed") => a,
            _ = accepting.changed() => continue,
        };
        let Some((tcp, peer)) = accepted else { break };
        ctx.metrics.client_connections_accepted.inc();
        match slots.clone().try_acquire_owned() {
            Ok(permit) => match &threads {
                Some(threads) => threads.serve(ctx.clone(), tcp, peer, permit),
                None => {
                    tokio::spawn(session::serve(ctx.clone(), tcp, peer, permit));
                }
            },
            Err(_) => {
                ctx.metrics.client_connections_rejected.inc();
                if let Ok(permit) = refusals.clone().try_acquire_owned() {
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        session::serve_over_limit(ctx, tcp).await;
                        drop(permit);
                    });
                }
            }
        }
    }
    drop(listener);
    let open = ctx.registry.len();
    if open > 0 {
        info!(
            sessions = open,
            timeout = ?ctx.config.proxy.shutdown_timeout,
            "no longer accepting; waiting for sessions to end"
        );
    }
    if tokio::time::timeout(ctx.config.proxy.shutdown_timeout, ctx.registry.wait_empty())
        .await
        .is_err()
    {
        info!(
            sessions = ctx.registry.len(),
            "shutdown timeout: closing remaining sessions"
        );
        ctx.registry.terminate_all(|| SessionError::AdminShutdown);
        let _ = tokio::time::timeout(Duration::from_secs(5), ctx.registry.wait_empty()).await;
    }
}

/// `[proxy] session_threads`: threads that each run a single-threaded
/// runtime for the sessions dealt to them. A session never leaves its
/// thread, so its wake-ups never cross threads (no work stealing, no
/// futex or eventfd hand-offs between workers); the price is no balancing
/// once a session is placed. The threads end when this is dropped (after
/// the accept loop has waited for the sessions).
struct SessionThreads {
    handles: Vec<tokio::runtime::Handle>,
    next: std::cell::Cell<usize>,
    _stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl SessionThreads {
    fn start(n: usize) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            stops.push(stop);
            std::thread::Builder::new()
                .name(format!("pgferry-sessions-{i}"))
                .spawn(move || {
                    // Ends when the sender is dropped or sends.
                    let _ = rt.block_on(stopped);
                })?;
        }
        Ok(Self {
            handles,
            next: std::cell::Cell::new(0),
            _stop: stops,
        })
    }

    /// Hands the connection to the next thread in turn; its socket is
    /// registered with that thread's reactor.
    fn serve(
        &self,
        ctx: Arc<ProxyContext>,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let i = self.next.get();
        self.next.set((i + 1) % self.handles.len());
        let tcp = match tcp.into_std() {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "could not hand a connection to a session thread");
                return;
            }
        };
        self.handles[i].spawn(async move {
            match tokio::net::TcpStream::from_std(tcp) {
                Ok(tcp) => session::serve(ctx, tcp, peer, permit).await,
                Err(e) => {
                    warn!(error = %e, "could not register a connection on its session thread")
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_defaults_like_postgresql_and_is_capped_by_somaxconn() {
        let b = Backlog::from_parts(None, 10_000, Some(4096));
        assert_eq!((b.requested, b.effective()), (20_000, 4096));
        let b = Backlog::from_parts(None, 100, Some(4096));
        assert_eq!(b.effective(), 1024);
        let b = Backlog::from_parts(None, 100, Some(512));
        assert_eq!(b.effective(), 512);
        let b = Backlog::from_parts(Some(700), 10_000, None);
        assert_eq!((b.effective(), b.somaxconn_read), (700, false));
        let b = Backlog::from_parts(None, 10_000, None);
        assert_eq!(b.effective(), SOMAXCONN_FALLBACK);
    }

    #[tokio::test]
    async fn a_bound_listener_accepts() {
        let l = bind(SocketAddr::from(([127, 0, 0, 1], 0)), 700).unwrap();
        let addr = l.local_addr().unwrap();
        let c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (s, peer) = l.accept().await.unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        drop(s);
    }
}
