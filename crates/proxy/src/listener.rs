//! Accepting clients: the connection limit, one task per connection, and
//! graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::errors::SessionError;
use crate::session;
use crate::ProxyContext;

/// Connections over the limit that may be getting their "too many
/// clients" answer at once; beyond that they are dropped unanswered.
const MAX_REFUSALS_IN_FLIGHT: usize = 1024;

pub async fn accept_loop(
    ctx: Arc<ProxyContext>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(ctx.config.proxy.max_client_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        ctx.metrics.client_connections_accepted.inc();
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(session::serve(ctx.clone(), tcp, peer, permit));
            }
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
