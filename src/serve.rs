//! Running the proxy and its admin server until a shutdown signal.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use pgferry_admin::AdminState;
use pgferry_proxy::handoff;
use pgferry_proxy::listener::{self, Backlog};
use pgferry_proxy::{Config, Proxy};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

pub async fn run_from_file(path: &Path, takeover: bool) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    });
    let start = if takeover {
        Start::Takeover
    } else {
        Start::Fresh
    };
    run(config, Some(path.to_owned()), rx, start, |_| {}).await
}

/// How `run` gets its listening sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Binds `listen` and `admin_listen`.
    Fresh,
    /// Takes them, and then the sessions, over from the pgferry running on
    /// `handoff_socket` (`pgferry run --takeover`).
    Takeover,
}

/// Serves until `stop` turns true. `ready` is called once both listeners
/// are bound, with the proxy's address. With `config_path`, SIGHUP
/// re-reads that file.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    stop: watch::Receiver<bool>,
    start: Start,
    ready: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    raise_fd_limit(config.proxy.max_client_connections);
    let proxy = Arc::new(Proxy::new(config.clone())?);
    let ctx = proxy.context().clone();
    if let (Some(path), Ok(exe)) = (&config_path, std::env::current_exe()) {
        ctx.handoff.set_successor(exe, path.clone());
    }
    // SHUTDOWN on the console stops it as SIGTERM does.
    let mut stop = {
        let (tx, rx) = watch::channel(false);
        let (mut outer, ctx) = (stop.clone(), ctx.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = outer.wait_for(|s| *s) => {}
                _ = ctx.hooks.shutdown_requested() => {}
            }
            let _ = tx.send(true);
        });
        rx
    };
    if let Some(path) = config_path {
        ctx.hooks.set_config_path(path);
        tokio::spawn(reload_on_sighup(proxy.clone(), stop.clone()));
    }
    let handoff_path = config.proxy.handoff_socket.clone();
    let (mut taking_over, handoff_listener) = match start {
        Start::Takeover => {
            let path = handoff_path
                .as_deref()
                .context("--takeover needs proxy.handoff_socket (it is off in this config)")?;
            let t = handoff::take::connect(&ctx, path)
                .await
                .map_err(anyhow::Error::msg)
                .context("takeover failed; the running pgferry goes on serving")?;
            (Some(t), None)
        }
        Start::Fresh => {
            // Before the TCP listeners: a running pgferry holds this
            // socket, and a second one must not start beside it.
            let l = match &handoff_path {
                Some(p) => Some(handoff::channel::HandoffListener::bind(p).with_context(|| {
                    format!(
                        "cannot listen on {} (proxy.handoff_socket); is a pgferry already running? \
                         `pgferry run --takeover` replaces it",
                        p.display()
                    )
                })?),
                None => None,
            };
            (None, l)
        }
    };
    let (audit_gate, audit_gate_rx) = tokio::sync::oneshot::channel();
    if taking_over.is_some() {
        // The old process writes its last audit rows as it exits; ours
        // (its sessions' rows among them) wait for that.
        proxy.hold_audit_writes(audit_gate_rx);
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
    let (listener, admin) = match &mut taking_over {
        Some(t) => {
            let listener = t
                .listener
                .take()
                .context("the takeover passed no listener")?;
            (listener, t.admin.take())
        }
        None => {
            let listener =
                listener::bind(config.proxy.listen, backlog.effective()).with_context(|| {
                    format!("cannot listen on {} (proxy.listen)", config.proxy.listen)
                })?;
            let admin = match config.proxy.admin_listen {
                Some(admin_addr) => {
                    Some(TcpListener::bind(admin_addr).await.with_context(|| {
                        format!("cannot listen on {admin_addr} (proxy.admin_listen)")
                    })?)
                }
                None => None,
            };
            (listener, admin)
        }
    };
    let addr = listener.local_addr()?;
    // Copies of the listening sockets, for a later hand-off.
    ctx.handoff.set_listeners(handoff::Listeners {
        proxy: listener.as_fd().try_clone_to_owned()?,
        admin: admin
            .as_ref()
            .map(|a| a.as_fd().try_clone_to_owned())
            .transpose()?,
    });
    let mut admin_task = None;
    if let Some(admin) = admin {
        let state = AdminState {
            metrics: proxy.metrics(),
            proxy: proxy.context().clone(),
        };
        let mut admin_stop = stop.clone();
        info!(address = %admin.local_addr()?, "admin API listening");
        admin_task = Some(tokio::spawn(async move {
            let stopped = async move {
                let _ = admin_stop.wait_for(|s| *s).await;
            };
            if let Err(e) = pgferry_admin::serve(admin, state, stopped).await {
                tracing::error!(error = %e, "admin server failed");
            }
        }));
    }
    info!(
        address = %addr,
        backlog = backlog.effective(),
        backends = config.backends.len(),
        tls = config.tls.is_some(),
        takeover = taking_over.is_some(),
        "pgferry listening"
    );
    match taking_over {
        Some(t) => {
            // Before the first accept: cancels for sessions the old
            // process still serves must find their way there.
            t.confirm_listening(&ctx).await;
            // systemd hears of this process (MAINPID=) once the old one has
            // handed over what it could (`TakingOver::run`).
            tokio::spawn(t.run(ctx.clone(), Some(audit_gate), handoff_path));
        }
        None => {
            drop(audit_gate);
            pgferry_proxy::systemd::notify("READY=1");
            if let Some(l) = handoff_listener {
                tokio::spawn(handoff::give::serve_takeovers(ctx.clone(), l));
            }
        }
    }
    tokio::spawn(takeover_on_sigusr2(ctx.clone(), stop.clone()));
    ready(addr);
    proxy
        .serve(listener, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    // The admin API answers what it was asked before the end (a
    // `POST /v1/handoff` that made this process hand everything over gets
    // its 200); it stops with the proxy.
    if let Some(task) = admin_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
    }
    info!("pgferry stopped");
    Ok(())
}

/// SIGUSR2 starts a successor that takes this process over
/// (`handoff::start_successor`, as `POST /v1/handoff` does).
async fn takeover_on_sigusr2(
    ctx: Arc<pgferry_proxy::ProxyContext>,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
        warn!("cannot listen for SIGUSR2; start a takeover with `pgferry run --takeover`");
        return;
    };
    loop {
        tokio::select! {
            r = usr2.recv() => if r.is_none() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        info!("SIGUSR2 received: starting a new pgferry to take this one over");
        match handoff::start_successor(&ctx).await {
            Ok(status) => info!(
                phase = status.phase.as_str(),
                "takeover requested by SIGUSR2 ended"
            ),
            Err(e) => error!(error = %e, "takeover requested by SIGUSR2 failed"),
        }
    }
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

/// Re-applies the config file on every SIGHUP until `stop`, as the
/// console's RELOAD does (`verbs::reload`); a file that does not load is
/// reported and changes nothing.
async fn reload_on_sighup(proxy: Arc<Proxy>, mut stop: watch::Receiver<bool>) {
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
        info!("SIGHUP received: reloading the config");
        // Logged by the verb, for every way it is asked for.
        let _ = pgferry_proxy::verbs::reload(proxy.context()).await;
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
