//! Running the proxy and its admin server until a shutdown signal.

use std::path::Path;

use anyhow::Context;
use pgferry_admin::AdminState;
use pgferry_proxy::{Config, Proxy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

pub async fn run_from_file(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    });
    run(config, rx, |_| {}).await
}

/// Serves until `stop` turns true. `ready` is called once both listeners
/// are bound, with the proxy's address.
pub async fn run(
    config: Config,
    mut stop: watch::Receiver<bool>,
    ready: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    let proxy = Proxy::new(config.clone())?;
    let listener = TcpListener::bind(config.proxy.listen)
        .await
        .with_context(|| format!("cannot listen on {} (proxy.listen)", config.proxy.listen))?;
    let addr = listener.local_addr()?;
    if let Some(admin_addr) = config.proxy.admin_listen {
        let admin = TcpListener::bind(admin_addr)
            .await
            .with_context(|| format!("cannot listen on {admin_addr} (proxy.admin_listen)"))?;
        let state = AdminState {
            metrics: proxy.metrics(),
            proxy: proxy.context().clone(),
        };
        let mut admin_stop = stop.clone();
        info!(address = %admin.local_addr()?, "admin API listening");
        tokio::spawn(async move {
            let stopped = async move {
                let _ = admin_stop.wait_for(|s| *s).await;
            };
            if let Err(e) = pgferry_admin::serve(admin, state, stopped).await {
                tracing::error!(error = %e, "admin server failed");
            }
        });
    }
    info!(
        address = %addr,
        backends = config.backends.len(),
        tls = config.tls.is_some(),
        "pgferry listening"
    );
    ready(addr);
    proxy
        .serve(listener, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    info!("pgferry stopped");
    Ok(())
}

/// SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received"),
                _ = int.recv() => info!("SIGINT received"),
            }
        }
        _ => {
            // Without signal handlers the process ends on the default
            // action anyway; wait forever rather than exit at once.
            std::future::pending::<()>().await
        }
    }
}
