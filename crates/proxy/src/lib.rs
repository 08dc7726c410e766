//! pgferry's proxy core.
//!
//! Owns the serving path: accepting clients (`listener`), TLS and startup
//! negotiation and authentication at the proxy (`client`), choosing and
//! dialing backends (`backend`), the per-session forwarder (`forwarder`),
//! cancel keys (`cancel`), the live-session registry (`registry`) and the
//! one place that decides what a client sees on failure (`errors`).
//! It must not block the forwarding path on anything shared: one task per
//! session owns both of its sockets, and the only locks are taken at
//! connect, disconnect and cancel time.

pub mod backend;
pub mod cancel;
pub mod client;
pub mod config;
pub mod errors;
pub mod forwarder;
pub mod listener;
pub mod metrics;
pub mod registry;
pub mod session;
pub mod stream;
pub mod tls;
pub mod transfer;

use std::future::Future;
use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;

use backend::dial::DialSettings;
use backend::BackendSet;
use cancel::CancelMap;
use client::handshake::TlsPolicy;
pub use config::Config;
pub use metrics::Metrics;
use pgferry_auth::UserList;
use registry::Registry;

#[derive(Debug, Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    #[error("userlist: {0}")]
    UserList(#[from] pgferry_auth::UserListError),
    #[error("tls: {0}")]
    Tls(#[from] tls::TlsConfigError),
    #[error("backends: {0}")]
    Backends(String),
}

/// Everything sessions share. Read-only after start.
pub struct ProxyContext {
    pub config: Config,
    pub users: UserList,
    pub tls: TlsPolicy,
    pub dial: DialSettings,
    pub backends: BackendSet,
    pub cancel_map: CancelMap,
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
}

pub struct Proxy {
    ctx: Arc<ProxyContext>,
}

impl Proxy {
    pub fn new(config: Config) -> Result<Self, StartError> {
        let metrics = Arc::new(Metrics::new());
        let users = UserList::load(&config.auth.userlist)?;
        let acceptor = match &config.tls {
            Some(t) => Some(client::handshake::acceptor(tls::server_config(t)?)),
            None => None,
        };
        let tls = TlsPolicy {
            acceptor,
            require: config.tls.as_ref().is_some_and(|t| t.require),
        };
        let dial = DialSettings {
            tls_mode: config.backend_tls.mode,
            tls: tls::backend_client_config(&config.backend_tls)?,
            connect_timeout: config.proxy.connect_timeout,
            keepalive: config.proxy.tcp_keepalive,
            max_message_len: config.proxy.max_message_length,
        };
        let backends = BackendSet::new(&config.backends, &metrics).map_err(StartError::Backends)?;
        Ok(Self {
            ctx: Arc::new(ProxyContext {
                users,
                tls,
                dial,
                backends,
                cancel_map: CancelMap::new(),
                metrics,
                registry: Registry::new(),
                config,
            }),
        })
    }

    pub fn context(&self) -> &Arc<ProxyContext> {
        &self.ctx
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.ctx.metrics.clone()
    }

    /// Serves clients from `listener` until `shutdown` resolves, then lets
    /// sessions finish (up to `shutdown_timeout`) and closes the rest.
    pub async fn serve(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        listener::accept_loop(self.ctx.clone(), listener, shutdown).await
    }
}
