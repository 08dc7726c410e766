//! `pgferry sandbox`: two local PostgreSQL clusters from the installed
//! server binaries, a user and database on both, TLS, a userlist and a
//! config, and the proxy in front. Ctrl-C or SIGTERM stops all of it.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use pgferry_pgcluster::{Cluster, ClusterOptions, ServerBinaries, StopMode};
use pgferry_proxy::Config;
use tokio::sync::watch;

const AUDIT_USER: &str = "pgferry_audit";
const AUDIT_PASSWORD: &str = "pgferry_audit";

#[derive(clap::Args)]
pub struct SandboxArgs {
    /// State directory: clusters, certificates, userlist and config.
    /// Reused on the next run.
    #[arg(long, default_value = ".pgferry-sandbox")]
    dir: PathBuf,
    /// Proxy port (the next free one is used if it is taken).
    #[arg(long, default_value_t = 6432)]
    port: u16,
    /// Admin HTTP port (the next free one is used if it is taken).
    #[arg(long, default_value_t = 9930)]
    admin_port: u16,
    /// Application user and database created on both clusters.
    #[arg(long, default_value = "app")]
    user: String,
    /// The application user's password.
    #[arg(long, default_value = "app")]
    password: String,
}

pub async fn run(args: SandboxArgs) -> anyhow::Result<()> {
    let bins = tokio::task::spawn_blocking(ServerBinaries::find).await??;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    eprintln!(
        "pgferry sandbox: PostgreSQL {} from {}; state in {}",
        bins.version,
        bins.bindir.display(),
        dir.display()
    );

    let mut clusters = Vec::new();
    for name in ["pg1", "pg2"] {
        let (bins, dir) = (bins.clone(), dir.clone());
        let cluster = tokio::task::spawn_blocking(move || {
            Cluster::start(&bins, &dir, ClusterOptions::named(name))
        })
        .await?
        .with_context(|| format!("cannot start cluster {name}"))?;
        clusters.push(cluster);
    }
    // From here on the clusters are stopped whatever happens.
    let result = serve(&args, &dir, &clusters).await;
    for mut c in clusters {
        let name = c.name().to_owned();
        let stopped = tokio::task::spawn_blocking(move || c.stop(StopMode::Fast)).await;
        match stopped {
            Ok(Ok(())) => eprintln!("pgferry sandbox: stopped {name}"),
            Ok(Err(e)) => eprintln!("pgferry sandbox: stopping {name}: {e}"),
            Err(e) => eprintln!("pgferry sandbox: stopping {name}: {e}"),
        }
    }
    result
}

async fn serve(args: &SandboxArgs, dir: &Path, clusters: &[Cluster]) -> anyhow::Result<()> {
    for c in clusters {
        c.ensure_user_and_database(&args.user, &args.password, &args.user)?;
    }
    // The audit log goes to its own database on the first cluster.
    let audit_db = clusters
        .first()
        .ok_or_else(|| anyhow::anyhow!("no cluster started"))?;
    audit_db.ensure_user_and_database(AUDIT_USER, AUDIT_PASSWORD, AUDIT_USER)?;
    let (cert, key) = write_certificate(dir)?;
    let userlist = dir.join("users.txt");
    std::fs::write(
        &userlist,
        format!(
            "\"{}\" \"{}\"\n",
            args.user.replace('"', "\"\""),
            args.password.replace('"', "\"\"")
        ),
    )?;
    let port = free_port(args.port)?;
    let admin_port = free_port(args.admin_port)?;
    let mut toml = format!(
        "# Written by `pgferry sandbox`; rewritten on every start.\n\
         [proxy]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
         shutdown_timeout = \"2s\"\n\n\
         [tls]\ncert = {cert:?}\nkey = {key:?}\nrequire = false\n\n\
         [auth]\nuserlist = {userlist:?}\n\n\
         [audit]\nurl = \"host=127.0.0.1 port={audit_port} user={AUDIT_USER} password={AUDIT_PASSWORD} dbname={AUDIT_USER}\"\n",
        audit_port = audit_db.port(),
    );
    for c in clusters {
        toml.push_str(&format!(
            "\n[[backend]]\nname = \"{}\"\naddress = \"{}\"\n",
            c.name(),
            c.addr()
        ));
    }
    let config_path = dir.join("pgferry.toml");
    std::fs::write(&config_path, &toml)?;
    let config = Config::load(&config_path)?;

    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        crate::serve::shutdown_signal().await;
        let _ = tx.send(true);
    });
    let user = args.user.clone();
    let password = args.password.clone();
    let backends: Vec<String> = clusters
        .iter()
        .map(|c| format!("{} on {}", c.name(), c.addr()))
        .collect();
    crate::serve::run(
        config,
        Some(config_path.clone()),
        rx,
        move |addr: SocketAddr| {
            println!();
            println!("pgferry sandbox is ready.");
            println!();
            println!(
                "  psql \"postgresql://{user}:{password}@127.0.0.1:{}/{user}?sslmode=require\"",
                addr.port()
            );
            println!();
            println!("  admin:    http://127.0.0.1:{admin_port}/metrics");
            println!("  audit:    table pgferry_connection_log in database {AUDIT_USER} on pg1");
            println!("  backends: {}", backends.join(", "));
            println!("  config:   {}", config_path.display());
            println!("  ctl:      pgferry ctl --admin http://127.0.0.1:{admin_port} backends");
            println!();
            println!("Ctrl-C stops pgferry and both clusters.");
        },
    )
    .await
}

/// A self-signed certificate for localhost, made once per state dir.
fn write_certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert_path = dir.join("server.crt");
    let key_path = dir.join("server.key");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .context("cannot make a TLS certificate")?;
    std::fs::write(&cert_path, ck.cert.pem())?;
    write_private(&key_path, ck.signing_key.serialize_pem().as_bytes())?;
    Ok((cert_path, key_path))
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

/// `wanted` if free, else the next free port above it.
fn free_port(wanted: u16) -> anyhow::Result<u16> {
    for port in wanted..wanted.saturating_add(100) {
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in {wanted}..{}", wanted.saturating_add(100))
}
