//! Hand-off benchmark: N idle sessions (half of them TLS) on a running
//! pgferry (the built binary) taken over by a new process
//! (`pgferry run --takeover`), between two local PostgreSQL clusters.
//!
//!   cargo bench --bench handoff                       # 1,000 sessions
//!   SESSIONS=2000 HANDOFF_WINDOW=8 cargo bench --bench handoff
//!   cargo test --bench handoff                        # smoke: 20 sessions (in the suite)
//!
//! Prints the hand-off's wall time (takeover start to the old process's
//! exit) and the pause each session saw (its safe point in the old process
//! to forwarding in the new one, `pgferry_handoff_pause_seconds`, read as
//! histogram bucket bounds: an upper bound), then checks every session
//! still answers.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::{
    env_usize, http_text, raise_fd_limit, smoke, two_clusters, userlist_dir, PASSWORD, USER,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

fn main() {
    let smoke = smoke();
    let sessions = if smoke {
        20
    } else {
        env_usize("SESSIONS", 1000)
    };
    let window = env_usize("HANDOFF_WINDOW", 2);
    raise_fd_limit((sessions as u64) * 4 + 1000);
    let max_connections = [("max_connections", (sessions + 50).to_string())];
    let (pg1, pg2) = two_clusters("handoffbench", &max_connections);
    let dir = userlist_dir();
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).expect("certificate");
    std::fs::write(dir.path().join("server.crt"), ck.cert.pem()).expect("cert");
    std::fs::write(
        dir.path().join("server.key"),
        ck.signing_key.serialize_pem(),
    )
    .expect("key");
    let config = dir.path().join("pgferry.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             max_client_connections = {}\nhandoff_window = {window}\nshutdown_timeout = \"60s\"\n\
             [auth]\nuserlist = \"users.txt\"\n\
             [tls]\ncert = \"server.crt\"\nkey = \"server.key\"\n\
             [[backend]]\nname = \"pg1\"\naddress = \"{}\"\n\
             [[backend]]\nname = \"pg2\"\naddress = \"{}\"\n",
            sessions + 100,
            pg1.addr(),
            pg2.addr()
        ),
    )
    .expect("config");

    let (mut old, addr, _) = spawn(&config, false);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let tls = MakeRustls(
            pgferry_proxy::tls::backend_client_config(&pgferry_proxy::config::BackendTlsSection {
                mode: pgferry_proxy::config::BackendTlsMode::Require,
                ca: None,
            })
            .expect("tls config")
            .expect("tls on"),
        );
        let mut clients = Vec::with_capacity(sessions);
        for i in 0..sessions {
            let mut cfg = tokio_postgres::Config::new();
            cfg.host("127.0.0.1")
                .port(addr.port())
                .user(USER)
                .password(PASSWORD)
                .dbname(USER);
            let client = if i % 2 == 0 {
                cfg.ssl_mode(tokio_postgres::config::SslMode::Require);
                let (c, conn) = cfg.connect(tls.clone()).await.expect("connect over TLS");
                tokio::spawn(conn);
                c
            } else {
                let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.expect("connect");
                tokio::spawn(conn);
                c
            };
            client.simple_query("SELECT 1").await.expect("query");
            clients.push(client);
        }
        let started = Instant::now();
        let (mut new, new_addr, admin) = spawn(&config, true);
        assert_eq!(new_addr, addr, "the new process serves the same listener");
        let code = wait_exit(&mut old, Duration::from_secs(300));
        let took = started.elapsed();
        assert_eq!(code, Some(0), "the old process's exit code");
        let (_, metrics) = http_text(admin, "GET", "/metrics", "").await;
        let adopted = common::metric(
            &metrics,
            "pgferry_handoff_sessions_total{outcome=\"adopted\"}",
        );
        let (p50, p99, max) = (
            bucket_bound(&metrics, 0.50),
            bucket_bound(&metrics, 0.99),
            bucket_bound(&metrics, 1.0),
        );
        let mut failed = 0;
        for c in &clients {
            if c.simple_query("SELECT 1").await.is_err() {
                failed += 1;
            }
        }
        println!(
            "handoff: {sessions} idle sessions (half TLS), window {window}: {adopted} adopted in \
             {:.0} ms; pause p50 <= {:.1} ms, p99 <= {:.1} ms, max <= {:.1} ms; {failed} sessions \
             failed after",
            took.as_secs_f64() * 1000.0,
            p50 * 1000.0,
            p99 * 1000.0,
            max * 1000.0
        );
        assert_eq!(adopted as usize, sessions, "every session was adopted");
        assert_eq!(failed, 0, "sessions failed after the hand-off");
        drop(clients);
        let _ = new.kill();
        let _ = new.wait();
    });
}

/// The smallest bucket bound under which at least `q` of the observed
/// pauses fall.
fn bucket_bound(metrics: &str, q: f64) -> f64 {
    let count = common::metric(metrics, "pgferry_handoff_pause_seconds_count");
    let mut buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("pgferry_handoff_pause_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, n) = l.split_once("\"} ")?;
            Some((le.parse().unwrap_or(f64::INFINITY), n.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
        .into_iter()
        .find(|(_, n)| *n >= q * count)
        .map(|(le, _)| le)
        .unwrap_or(f64::INFINITY)
}

/// Starts the pgferry binary; returns once it accepts: (process, proxy
/// address, admin address).
fn spawn(config: &std::path::Path, takeover: bool) -> (Child, SocketAddr, SocketAddr) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgferry"));
    cmd.arg("run").arg("--config").arg(config);
    if takeover {
        cmd.arg("--takeover");
    }
    let mut child = cmd
        .env("RUST_LOG", "warn,pgferry=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgferry");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let field = |line: &str| -> Option<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix("address="))
                .and_then(|v| v.parse().ok())
        };
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("admin API listening") {
                let _ = tx.send(("admin", field(&line)));
            } else if line.contains("pgferry listening") {
                let _ = tx.send(("proxy", field(&line)));
            } else if line.contains("ERROR") || line.contains("pgferry:") {
                eprintln!("{line}");
            }
        }
    });
    let (mut proxy, mut admin) = (None, None);
    while proxy.is_none() || admin.is_none() {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(("admin", a)) => admin = a,
            Ok((_, a)) => proxy = a,
            Err(_) => panic!("pgferry did not start"),
        }
    }
    (child, proxy.expect("proxy"), admin.expect("admin"))
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s.code();
        }
        assert!(Instant::now() < deadline, "the old pgferry did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// tokio-postgres over tokio-rustls: TLS 1.3 clients for the benchmark.
#[derive(Clone)]
struct MakeRustls(Arc<rustls::ClientConfig>);

struct RustlsConnect(
    Arc<rustls::ClientConfig>,
    rustls::pki_types::ServerName<'static>,
);

struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> std::io::Result<RustlsConnect> {
        let name = rustls::pki_types::ServerName::try_from(domain.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnect(self.0.clone(), name))
    }
}

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = std::io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let s = tokio_rustls::TlsConnector::from(self.0)
                .connect(self.1, stream)
                .await?;
            Ok(RustlsStream(s))
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
