//! Running the proxy and its admin server until a shutdown signal.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use pgferry_admin::AdminState;
use pgferry_proxy::listener::{self, Backlog};
use pgferry_proxy::{Config, Proxy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

pub async fn run_from_file(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    });
    run(config, Some(path.to_owned()), rx, |_| {}).await
}

/// Serves until `stop` turns true. `ready` is called once both listeners
/// are bound, with the proxy's address. With `config_path`, SIGHUP
/// re-reads that file.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    mut stop: watch::Receiver<bool>,
    ready: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    raise_fd_limit(config.proxy.max_client_connections);
    let proxy = Arc::new(Proxy::new(config.clone())?);
    if let Some(path) = config_path {
        tokio::spawn(reload_on_sighup(proxy.clone(), path, stop.clone()));
    }
    let backlog = Backlog::new(
        config.proxy.listen_backlog,
        config.proxy.max_client_connections,
    );
    if !backlog.somaxconn_read {
        warn!(
            assumed = backlog.somaxconn,
            "cannot read /proc/sys/net/core/somaxconn; assuming it for the listen backlog"
        );
    }
    if config.proxy.listen_backlog.is_some() && backlog.requested > backlog.somaxconn {
        warn!(
            listen_backlog = backlog.requested,
            somaxconn = backlog.somaxconn,
            "proxy.listen_backlog is above net.core.somaxconn, which caps it; raise the sysctl to get more"
        );
    }
    let listener = listener::bind(config.proxy.listen, backlog.effective())
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
        backlog = backlog.effective(),
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

/// Raises the soft limit on open files to the hard one: every session holds
/// two sockets, and systemd's default soft limit (1,024) would cap pgferry
/// at about 500 sessions whatever its hard limit allows.
fn raise_fd_limit(max_client_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        warn!("cannot read the open files limit");
        return;
    };
    let mut limit = soft;
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => {
                info!(
                    from = soft,
                    to = hard,
                    "raised the soft limit on open files"
                );
                limit = hard;
            }
            Err(e) => warn!(error = %e, soft, hard, "cannot raise the soft limit on open files"),
        }
    }
    // A client and a backend socket per session, plus listeners, admin
    // connections, health probes, spares and the audit connection.
    let needed = (max_client_connections as u64)
        .saturating_mul(2)
        .saturating_add(256);
    if limit < needed {
        warn!(
            limit,
            needed,
            max_client_connections,
            "the open files limit is too low for max_client_connections; raise LimitNOFILE (systemd) or ulimit -n"
        );
    }
}

/// Re-reads the config file on every SIGHUP until `stop`; a file that
/// does not load is reported and changes nothing.
async fn reload_on_sighup(proxy: Arc<Proxy>, path: PathBuf, mut stop: watch::Receiver<bool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP; config reload is off");
            return;
        }
    };
    loop {
        tokio::select! {
            r = hup.recv() => if r.is_none() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        info!(file = %path.display(), "SIGHUP received: reloading the config");
        let applied = match Config::load(&path) {
            Ok(c) => proxy.reload(&c).await.map_err(anyhow::Error::from),
            Err(e) => Err(anyhow::Error::from(e)),
        };
        match applied {
            Ok(s) => info!(
                added = ?s.added,
                removing = ?s.removing,
                users = s.users,
                users_derived = s.users_derived,
                users_reused = s.users_reused,
                userlist_ms = s.userlist_took.as_millis() as u64,
                "config reloaded (backends and userlist; other settings need a restart)"
            ),
            Err(e) => {
                error!(error = %format!("{e:#}"), "config reload failed; keeping the current config")
            }
        }
    }
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
