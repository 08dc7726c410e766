//! pgferry's proxy core.
//!
//! Owns the serving path: accepting clients (`listener`), TLS and startup
//! negotiation and authentication at the proxy (`client`), choosing and
//! dialing backends (`backend`), the per-session forwarder (`forwarder`),
//! cancel keys (`cancel`), the live-session registry (`registry`), moving
//! a session (`transfer`), draining, rebalancing and health checks
//! (`balancer`), switching a cluster's primary over to a standby
//! (`switchover`), what becomes of sessions whose primary died
//! (`failover`), config reload (`reload`) and the one place that decides
//! what a client sees on failure (`errors`), and handing the whole
//! process over to a new one (`handoff`).
//! It must not block the forwarding path on anything shared: one task per
//! session owns both of its sockets, and the only locks are taken at
//! connect, disconnect and cancel time.

pub mod backend;
pub mod balancer;
pub mod cancel;
pub mod client;
pub mod config;
pub mod console;
pub mod errors;
pub mod failover;
pub mod forwarder;
pub mod handoff;
pub mod listener;
pub mod metrics;
pub mod parameters;
pub mod registry;
pub mod reload;
pub mod secret_file;
pub mod session;
pub mod stream;
pub mod switchover;
pub mod systemd;
pub mod tls;
pub mod transfer;
pub mod verbs;

use std::future::Future;
use std::sync::{Arc, RwLock};

use thiserror::Error;
use tokio::net::TcpListener;

use backend::dial::DialSettings;
use backend::BackendSet;
use balancer::BalancerState;
use cancel::CancelMap;
use client::handshake::TlsPolicy;
pub use config::Config;
pub use metrics::Metrics;
use pgferry_auth::{InstallationSecret, LoadOptions, UserList};
use registry::Registry;

#[derive(Debug, Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    #[error("userlist: {0}")]
    UserList(#[from] pgferry_auth::UserListError),
    #[error("auth secret: {0}")]
    Secret(#[from] secret_file::SecretFileError),
    /// The thread loading the userlist ended without an answer (it panicked).
    #[error("userlist: loading did not finish: {0}")]
    UserListTask(String),
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsConfigError),
    #[error("backends: {0}")]
    Backends(String),
    #[error("audit: {0}")]
    Audit(String),
}

/// Everything sessions share. Read-only after start, except the backend
/// set and the userlist (admin API, config reload), which sessions read
/// only while connecting.
pub struct ProxyContext {
    /// As loaded at start; a reload changes `backends` and the userlist,
    /// not this.
    pub config: Config,
    users: RwLock<Arc<UserList>>,
    /// From `[auth] secret_file`, read at start: keys user salts and mock verifiers.
    auth_secret: Arc<InstallationSecret>,
    /// Back-off after failed client authentications.
    pub throttle: client::throttle::AuthThrottle,
    /// `[auth] auth_user`: users the userlist lacks, looked up on backends.
    pub auth_query: Option<client::auth_query::AuthQuery>,
    pub tls: TlsPolicy,
    pub dial: DialSettings,
    pub backends: BackendSet,
    pub cancel_map: CancelMap,
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
    /// The audit log, when `[audit]` is configured.
    pub audit: Option<pgferry_audit::AuditHandle>,
    pub balancer: BalancerState,
    /// Warm spare server connections for migrations (`[migration] warm_spares`).
    pub spares: transfer::spares::SparePool,
    /// Planned switchovers: the running one, the last report, the gate.
    pub switchover: switchover::Switchovers,
    /// `[backend_admin]`: pgferry's own login (its SCRAM keys are derived
    /// once and kept).
    pub admin_login: Option<backend::admin_conn::AdminLogin>,
    /// Places under `max_client_connections`: taken by every accepted
    /// connection and by every session adopted from another process.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Hand-off of this process to a new one, or from an old one.
    pub handoff: handoff::HandoffState,
    /// What the admin verbs share: the config file, the stop switch, the
    /// recent migrations.
    pub hooks: verbs::AdminHooks,
}

impl ProxyContext {
    /// The userlist as of now.
    pub fn users(&self) -> Arc<UserList> {
        // Replacing the Arc cannot leave it half-written.
        self.users.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_users(&self, users: UserList) {
        *self.users.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(users);
    }

    /// How a userlist is loaded under `auth` (a reload's `[auth]`), reusing what the current
    /// list already derived.
    pub fn user_load_options(&self, auth: &config::AuthSection) -> LoadOptions {
        LoadOptions {
            secret: self.auth_secret.clone(),
            iterations: auth.scram_iterations,
            previous: Some(self.users()),
        }
    }
}

pub struct Proxy {
    ctx: Arc<ProxyContext>,
    /// Runs from `serve` until the sessions are gone.
    batcher: std::sync::Mutex<Option<pgferry_audit::Batcher>>,
}

/// `host:port` naming this process in audit rows by default.
fn default_proxy_id(listen: std::net::SocketAddr) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "pgferry".to_owned());
    format!("{host}:{}", listen.port())
}

fn audit_from_config(
    config: &Config,
    metrics: &Metrics,
) -> Result<
    (
        Option<pgferry_audit::AuditHandle>,
        Option<pgferry_audit::Batcher>,
    ),
    StartError,
> {
    let Some(a) = &config.audit else {
        tracing::info!("audit log off (no [audit] section in the config)");
        return Ok((None, None));
    };
    let settings = pgferry_audit::AuditSettings {
        url: a.url.clone(),
        schema: a.schema.clone(),
        proxy_id: a
            .proxy_id
            .clone()
            .unwrap_or_else(|| default_proxy_id(config.proxy.listen)),
        flush_interval: a.flush_interval,
        batch_size: a.batch_size,
        max_pending_rows: a.max_pending_rows,
        on_overflow: match a.on_overflow {
            config::OnOverflow::Drop => pgferry_audit::Overflow::Drop,
            config::OnOverflow::RejectConnections => pgferry_audit::Overflow::RejectConnections,
        },
        shutdown_flush_timeout: a.shutdown_flush_timeout,
        write_timeout: a.write_timeout,
        retention: a.retention,
        retention_interval: a.retention_interval,
    };
    let audit_metrics = pgferry_audit::AuditMetrics::register(&metrics.registry)
        .map_err(|e| StartError::Audit(e.to_string()))?;
    let sink = pgferry_audit::PgSink::new(
        &settings.url,
        settings.schema.as_deref(),
        &settings.proxy_id,
        settings.write_timeout,
    )
    .map_err(|e| StartError::Audit(e.to_string()))?;
    let handle = pgferry_audit::AuditHandle::new(&settings, audit_metrics.clone());
    let batcher = pgferry_audit::Batcher::new(handle.clone(), sink, &settings, audit_metrics);
    tracing::info!(proxy_id = %settings.proxy_id, "audit log on");
    Ok((Some(handle), Some(batcher)))
}

impl Proxy {
    pub fn new(config: Config) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new());
        let auth_secret = Arc::new(secret_file::load_or_create(&config.auth.secret_file)?);
        let (users, stats) = UserList::load(
            &config.auth.userlist,
            &LoadOptions {
                secret: auth_secret.clone(),
                iterations: config.auth.scram_iterations,
                previous: None,
            },
        )?;
        tracing::info!(
            users = users.len(),
            derived = stats.derived,
            scram_iterations = users.iterations(),
            "userlist loaded"
        );
        let auth_query = client::auth_query::AuthQuery::from_config(
            &config.auth,
            &users,
            config.proxy.connect_timeout,
        )?;
        let throttle = client::throttle::AuthThrottle::new(
            client::throttle::ThrottleSettings {
                enabled: config.auth.throttle,
                initial: config.auth.throttle_initial,
                max: config.auth.throttle_max,
                max_entries: config.auth.throttle_max_entries,
            },
            metrics.auth_throttled.clone(),
        );
        let (acceptor, end_point) = match &config.tls {
            Some(t) => {
                let server = tls::server_tls(t)?;
                (
                    Some(client::handshake::acceptor(server.config)),
                    server.end_point,
                )
            }
            None => (None, None),
        };
        let tls = TlsPolicy {
            acceptor,
            require: config.tls.as_ref().is_some_and(|t| t.require),
            end_point,
        };
        let dial = DialSettings {
            tls_mode: config.backend_tls.mode,
            tls: tls::backend_client_config(&config.backend_tls)?,
            connect_timeout: config.proxy.connect_timeout,
            keepalive: config.proxy.tcp_keepalive,
            max_message_len: config.proxy.max_message_length,
            own_listener: Arc::default(),
        };
        let backends =
            BackendSet::new(&config.backends, metrics.clone()).map_err(StartError::Backends)?;
        let (audit, batcher) = audit_from_config(&config, &metrics)?;
        Ok(Self {
            batcher: std::sync::Mutex::new(batcher),
            ctx: Arc::new(ProxyContext {
                audit,
                users: RwLock::new(Arc::new(users)),
                auth_secret,
                throttle,
                auth_query,
                balancer: BalancerState::default(),
                switchover: switchover::Switchovers::default(),
                admin_login: config
                    .backend_admin
                    .as_ref()
                    .map(backend::admin_conn::AdminLogin::new),
                spares: transfer::spares::SparePool::new(
                    config.migration.warm_spares,
                    metrics.clone(),
                ),
                tls,
                dial,
                backends,
                cancel_map: CancelMap::new(),
                metrics,
                registry: Registry::new(),
                slots: Arc::new(tokio::sync::Semaphore::new(
                    config.proxy.max_client_connections,
                )),
                handoff: handoff::HandoffState::default(),
                hooks: verbs::AdminHooks::default(),
                config,
            }),
        })
    }

    /// The audit log writes nothing until `until` resolves (a new process
    /// waits for the old one's last writes: `handoff::take`).
    pub fn hold_audit_writes(&self, until: tokio::sync::oneshot::Receiver<()>) {
        if let Some(b) = self
            .batcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            b.hold_writes(until);
        }
    }

    pub fn context(&self) -> &Arc<ProxyContext> {
        &self.ctx
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.ctx.metrics.clone()
    }

    /// Applies a re-read config file (see `reload`).
    pub async fn reload(&self, config: &Config) -> Result<reload::ReloadSummary, StartError> {
        reload::apply(&self.ctx, config).await
    }

    /// Serves clients from `listener` until `shutdown` resolves, then lets
    /// sessions finish (up to `shutdown_timeout`) and closes the rest.
    /// Health checks and rebalancing run meanwhile. The audit log's final
    /// flush runs after the last session ended.
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        if let Ok(addr) = listener.local_addr() {
            let _ = self.ctx.dial.own_listener.set(addr);
        }
        let batcher = self
            .batcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (stop_audit, audit_stopped) = tokio::sync::watch::channel(false);
        let audit_task = batcher.map(|b| tokio::spawn(b.run(audit_stopped)));
        // Roles are known before the first client arrives: a read-write
        // session must not land on a standby because no check ran yet.
        // (A takeover ran them before taking the listener: connections
        // wait in its accept queue from then on.)
        if self.ctx.admin_login.is_some() && !self.ctx.handoff.is_successor() {
            balancer::health::check_all(&self.ctx).await;
        }
        let (stop_balancer, balancer_stopped) = tokio::sync::watch::channel(false);
        let balancer_task =
            tokio::spawn(balancer::run_background(self.ctx.clone(), balancer_stopped));
        // A hand-off that gave everything away ends this process too.
        let shutdown = async {
            tokio::select! {
                _ = shutdown => {}
                _ = self.ctx.handoff.finished() => {}
            }
        };
        listener::accept_loop(self.ctx.clone(), listener, shutdown).await;
        let _ = stop_balancer.send(true);
        let _ = balancer_task.await;
        let _ = stop_audit.send(true);
        if let Some(task) = audit_task {
            let _ = task.await;
        }
    }
}
