//! `pgferry sandbox`: two local PostgreSQL clusters from the installed
//! server binaries (installed first when missing, as root on Debian), a
//! user and database on both, TLS, a userlist and a config, and the proxy
//! in front. Ctrl-C or SIGTERM stops all of it.
//!
//! With `--replica`, pg1 is a primary and pg2 its streaming standby, both
//! in one backend cluster, so a switchover can be tried. Their state lives
//! under `<dir>/replica/`, apart from the two independent clusters, so
//! switching modes never mixes them; the audit log goes to a third cluster
//! there (`audit`), because a switchover fences the old primary read-only
//! and the audit writer must keep working through it.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use pgferry_pgcluster::{Cluster, ClusterOptions, ServerBinaries, StopMode};
use pgferry_proxy::Config;
use tokio::sync::watch;

const AUDIT_USER: &str = "pgferry_audit";
const AUDIT_PASSWORD: &str = "pgferry_audit";
/// The backend cluster both replica-mode backends belong to.
const REPLICA_CLUSTER: &str = "main";
/// Replica mode's state, under the state directory.
const REPLICA_DIR: &str = "replica";
/// How long a kept standby may take to catch up before it is rebuilt.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// The state directory when `--dir` is not given.
const DEFAULT_DIR: &str = ".pgferry-sandbox";
/// The state directory instead of [`DEFAULT_DIR`] when we are root and the
/// user that runs PostgreSQL cannot enter the default one (a checkout under
/// `/root`, mode 0700, on a fresh machine).
const ROOT_FALLBACK_DIR: &str = "/var/lib/pgferry-sandbox";

#[derive(clap::Args)]
pub struct SandboxArgs {
    /// State directory: clusters, certificates, userlist and config.
    /// Reused on the next run.
    #[arg(long, default_value = DEFAULT_DIR)]
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
    /// pg1 a primary and pg2 its streaming standby (one backend cluster,
    /// to try switchovers), with the audit log in a third cluster; state
    /// under <dir>/replica.
    #[arg(long)]
    replica: bool,
}

/// The clusters a sandbox runs.
struct Started {
    /// The proxy's backends, in config order (pg1, pg2).
    backends: Vec<Cluster>,
    /// Replica mode only.
    replica: Option<Replica>,
}

struct Replica {
    /// Index of the primary in `backends` (the other is its standby).
    primary: usize,
    /// Holds the audit database (replica mode).
    audit: Cluster,
}

impl Started {
    fn into_clusters(self) -> Vec<Cluster> {
        let mut all = self.backends;
        all.extend(self.replica.map(|r| r.audit));
        all
    }
}

pub async fn run(args: SandboxArgs) -> anyhow::Result<()> {
    // Installs Debian's postgresql when it is missing and we are root on
    // Debian (saying so on stderr); otherwise stops here with the command.
    let bins = tokio::task::spawn_blocking(ServerBinaries::find_or_install).await??;
    let requested = args.dir.clone();
    let dir = tokio::task::spawn_blocking(move || {
        let default = requested == Path::new(DEFAULT_DIR);
        state_dir(&requested, default, Path::new(ROOT_FALLBACK_DIR))
    })
    .await??;
    eprintln!(
        "pgferry sandbox: PostgreSQL {} from {}; state in {}",
        bins.version,
        bins.bindir.display(),
        dir.display()
    );

    let started = if args.replica {
        let (bins, dir) = (bins.clone(), dir.clone());
        tokio::task::spawn_blocking(move || start_replica(&bins, &dir))
            .await??
            .0
    } else {
        let mut backends = Vec::new();
        for name in ["pg1", "pg2"] {
            let (bins, dir) = (bins.clone(), dir.clone());
            let cluster = tokio::task::spawn_blocking(move || {
                Cluster::start(&bins, &dir, ClusterOptions::named(name))
            })
            .await?
            .with_context(|| format!("cannot start cluster {name}"))?;
            backends.push(cluster);
        }
        Started {
            backends,
            replica: None,
        }
    };
    // From here on the clusters are stopped whatever happens.
    let result = serve(&args, &dir, &started).await;
    for mut c in started.into_clusters() {
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

/// Creates the state directory and returns its canonical path. As root the
/// clusters run as an unprivileged user, which must be able to enter it:
/// when it cannot and the directory is the default one, the state goes to
/// `fallback` ([`ROOT_FALLBACK_DIR`]) instead (an explicit `--dir` is an
/// error then).
fn state_dir(requested: &Path, default: bool, fallback: &Path) -> anyhow::Result<PathBuf> {
    let existed = requested.exists();
    std::fs::create_dir_all(requested)
        .with_context(|| format!("cannot create {}", requested.display()))?;
    let dir = std::fs::canonicalize(requested)
        .with_context(|| format!("cannot resolve {}", requested.display()))?;
    match pgferry_pgcluster::check_server_access(&dir) {
        Ok(()) => Ok(dir),
        Err(pgferry_pgcluster::ClusterError::NotTraversable { path, user }) if default => {
            if !existed {
                // Ours and empty: leave nothing behind.
                let _ = std::fs::remove_dir(&dir);
            }
            std::fs::create_dir_all(fallback)
                .with_context(|| format!("cannot create {}", fallback.display()))?;
            std::fs::set_permissions(
                fallback,
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .with_context(|| format!("cannot chmod {}", fallback.display()))?;
            pgferry_pgcluster::check_server_access(fallback)?;
            eprintln!(
                "pgferry sandbox: user {user} (who runs PostgreSQL, as this is root) cannot \
                 enter {}, so the state goes to {} (--dir to choose another)",
                path.display(),
                fallback.display()
            );
            Ok(fallback.to_path_buf())
        }
        Err(e) => Err(e.into()),
    }
}

/// Starts pg1 and pg2 under `<dir>/replica` as a primary and its streaming
/// standby, and the audit cluster. A fresh pair is pg1 primary, pg2 a base
/// backup of it. A pair left by an earlier run is reused if one is a primary
/// and the other streams from it; otherwise (say after a switchover: the
/// promoted one is primary, the old primary is fenced read-only) the
/// non-primary is rebuilt as a standby with a fresh base backup. Returns
/// also the names of the rebuilt clusters (for tests).
fn start_replica(bins: &ServerBinaries, dir: &Path) -> anyhow::Result<(Started, Vec<String>)> {
    let rdir = dir.join(REPLICA_DIR);
    std::fs::create_dir_all(&rdir).with_context(|| format!("cannot create {}", rdir.display()))?;
    let names = ["pg1", "pg2"];
    let exists = |name: &str| rdir.join(name).join("PG_VERSION").is_file();
    let mut rebuilt = Vec::new();

    // Start what is there (each as it is: primary, standby or fenced old
    // primary); configured primaries first so standbys can connect.
    let mut slots: [Option<Cluster>; 2] = [None, None];
    let mut order: Vec<usize> = (0..2).filter(|&i| exists(names[i])).collect();
    order.sort_by_key(|&i| rdir.join(names[i]).join("standby.signal").is_file());
    for i in order {
        let c =
            Cluster::start(bins, &rdir, ClusterOptions::named(names[i])).with_context(|| {
                format!(
                    "cannot start cluster {} (if it is the standby, removing {} has it made anew)",
                    names[i],
                    rdir.join(names[i]).display()
                )
            })?;
        slots[i] = Some(c);
    }
    if slots.iter().all(Option::is_none) {
        eprintln!("pgferry sandbox: creating pg1 (the primary)");
        slots[0] = Some(
            Cluster::start(bins, &rdir, ClusterOptions::named("pg1"))
                .context("cannot start cluster pg1")?,
        );
    }

    // Which one is the primary: not in recovery; of two, the one on the
    // higher timeline (a promotion starts a new one; the fenced old primary
    // stays on its own).
    let mut primaries = Vec::new();
    for (i, c) in slots.iter().enumerate() {
        if let Some(c) = c {
            if !c.is_in_recovery()? {
                primaries.push((timeline(c)?, i));
            }
        }
    }
    let primary = match primaries
        .iter()
        .max_by_key(|(tli, i)| (*tli, std::cmp::Reverse(*i)))
    {
        Some(&(_, i)) => i,
        None => {
            // Only standbys, with no primary to follow: promote the first.
            let (i, c) = slots
                .iter()
                .enumerate()
                .find_map(|(i, c)| c.as_ref().map(|c| (i, c)))
                .ok_or_else(|| anyhow::anyhow!("neither pg1 nor pg2 started"))?;
            eprintln!(
                "pgferry sandbox: neither pg1 nor pg2 is a primary; promoting {}",
                c.name()
            );
            c.promote(Duration::from_secs(60))?;
            i
        }
    };
    let other = 1 - primary;
    let [s0, s1] = &mut slots;
    let (p, o) = if primary == 0 { (s0, s1) } else { (s1, s0) };
    let p = p
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the primary is missing"))?;
    let (pname, oname) = (names[primary], names[other]);
    match o {
        None => {
            eprintln!("pgferry sandbox: creating {oname} as a standby of {pname}");
            *o = Some(
                Cluster::start_standby(&rdir, p, ClusterOptions::named(oname))
                    .with_context(|| format!("cannot make {oname} a standby of {pname}"))?,
            );
        }
        Some(c) => {
            let rebuild_why = if c.is_in_recovery()? {
                // Its primary_conninfo names the port of the last run.
                match c
                    .follow(p)
                    .and_then(|()| c.wait_replayed(p, CATCH_UP_TIMEOUT))
                {
                    Ok(()) => None,
                    Err(e) => Some(format!("it does not stream from {pname} ({e})")),
                }
            } else {
                Some(format!(
                    "it is a former primary (after a switchover {pname} is the primary)"
                ))
            };
            if let Some(why) = rebuild_why {
                eprintln!(
                    "pgferry sandbox: {oname} is not a standby of {pname}: {why}; \
                     rebuilding {oname} as a standby of {pname} with a fresh base backup"
                );
                c.rebuild_as_standby_of(p)
                    .with_context(|| format!("cannot rebuild {oname} as a standby of {pname}"))?;
                rebuilt.push(oname.to_owned());
            }
        }
    }

    let audit = Cluster::start(bins, &rdir, ClusterOptions::named("audit"))
        .context("cannot start cluster audit")?;
    let backends = slots
        .into_iter()
        .zip(names)
        .map(|(c, name)| c.ok_or_else(|| anyhow::anyhow!("{name} is missing")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!("pgferry sandbox: {pname} is the primary, {oname} its streaming standby");
    Ok((
        Started {
            backends,
            replica: Some(Replica { primary, audit }),
        },
        rebuilt,
    ))
}

/// The timeline a primary writes on (the first 8 hex digits of its WAL file name).
fn timeline(c: &Cluster) -> anyhow::Result<u32> {
    let name = c.psql("postgres", "SELECT pg_walfile_name(pg_current_wal_lsn())")?;
    name.get(..8)
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| anyhow::anyhow!("{}: unexpected WAL file name {name:?}", c.name()))
}

async fn serve(args: &SandboxArgs, dir: &Path, started: &Started) -> anyhow::Result<()> {
    let clusters = &started.backends;
    let audit_db = match &started.replica {
        None => {
            for c in clusters {
                c.ensure_user_and_database(&args.user, &args.password, &args.user)?;
            }
            // The audit log goes to its own database on the first cluster.
            clusters
                .first()
                .ok_or_else(|| anyhow::anyhow!("no cluster started"))?
        }
        Some(r) => {
            let primary = &clusters[r.primary];
            primary.ensure_user_and_database(&args.user, &args.password, &args.user)?;
            // So the standby knows the user before a session lands there.
            for c in clusters.iter().filter(|c| c.name() != primary.name()) {
                c.wait_replayed(primary, CATCH_UP_TIMEOUT)?;
            }
            &r.audit
        }
    };
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
    let input = ConfigInput {
        port,
        admin_port,
        cert: &cert,
        key: &key,
        userlist: &userlist,
        audit_port: audit_db.port(),
        backends: clusters
            .iter()
            .map(|c| (c.name().to_owned(), c.addr()))
            .collect(),
    };
    let toml = match &started.replica {
        None => config_toml(&input),
        Some(r) => {
            let admin = &clusters[r.primary];
            replica_config_toml(&input, admin.superuser(), admin.superuser_password())
        }
    };
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
    let roles = started.replica.as_ref().map(|r| {
        let standby = 1 - r.primary;
        (
            clusters[r.primary].name().to_owned(),
            clusters.get(standby).map(|c| c.name().to_owned()),
        )
    });
    let backends: Vec<String> = clusters
        .iter()
        .map(|c| {
            let role = match &roles {
                Some((p, _)) if p == c.name() => " (primary)",
                Some(_) => " (standby)",
                None => "",
            };
            format!("{} on {}{role}", c.name(), c.addr())
        })
        .collect();
    let audit_where = match &started.replica {
        None => "on pg1".to_owned(),
        Some(r) => format!("on {} (its own cluster)", r.audit.name()),
    };
    crate::serve::run(
        config,
        Some(config_path.clone()),
        rx,
        crate::serve::Start::Fresh,
        move |addr: SocketAddr| {
            let url = format!(
                "postgresql://{user}:{password}@127.0.0.1:{}/{user}?sslmode=require",
                addr.port()
            );
            let admin = format!("http://127.0.0.1:{admin_port}");
            println!();
            println!("pgferry sandbox is ready.");
            println!();
            println!("  psql \"{url}\"");
            println!();
            println!("  admin:    {admin}/metrics");
            println!(
                "  audit:    table pgferry_connection_log in database {AUDIT_USER} {audit_where}"
            );
            println!("  backends: {}", backends.join(", "));
            println!("  config:   {}", config_path.display());
            println!("  ctl:      pgferry ctl --admin {admin} backends");
            println!();
            match &roles {
                None => println!("Ctrl-C stops pgferry and both clusters."),
                Some((primary, standby)) => {
                    let standby = standby.as_deref().unwrap_or("?");
                    println!("Try a switchover under load: fill and run pgbench through pgferry,");
                    println!();
                    println!("  pgbench -i \"{url}\"");
                    println!("  pgbench -c 8 -T 60 -P 1 \"{url}\"");
                    println!();
                    println!("and meanwhile, in another terminal:");
                    println!();
                    println!("  pgferry ctl --admin {admin} switchover {primary} {standby}");
                    println!();
                    println!(
                        "Ctrl-C stops pgferry and the three clusters; the next start makes \
                         {primary} a standby again if it was switched away from."
                    );
                }
            }
        },
    )
    .await
}

/// What the config says, whatever the mode.
struct ConfigInput<'a> {
    port: u16,
    admin_port: u16,
    cert: &'a Path,
    key: &'a Path,
    userlist: &'a Path,
    /// The cluster holding the audit database.
    audit_port: u16,
    /// Name and address of each backend, in order.
    backends: Vec<(String, SocketAddr)>,
}

/// `[proxy]`, `[tls]`, `[auth]` and `[audit]`: the same in both modes.
fn config_head(c: &ConfigInput) -> String {
    format!(
        "# Written by `pgferry sandbox`; rewritten on every start.\n\
         [proxy]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
         shutdown_timeout = \"2s\"\n\n\
         [tls]\ncert = {cert}\nkey = {key}\nrequire = false\n\n\
         [auth]\nuserlist = {userlist}\n\n\
         [audit]\nurl = \"host=127.0.0.1 port={audit_port} user={AUDIT_USER} password={AUDIT_PASSWORD} dbname={AUDIT_USER}\"\n",
        port = c.port,
        admin_port = c.admin_port,
        cert = toml_path(c.cert),
        key = toml_path(c.key),
        userlist = toml_path(c.userlist),
        audit_port = c.audit_port,
    )
}

/// The config of the two independent clusters.
fn config_toml(c: &ConfigInput) -> String {
    let mut toml = config_head(c);
    for (name, addr) in &c.backends {
        toml.push_str(&format!(
            "\n[[backend]]\nname = {}\naddress = \"{addr}\"\n",
            toml_str(name)
        ));
    }
    toml
}

/// The config of replica mode: both backends in one backend cluster, the
/// login pgferry uses for role checks and switchovers, and promotion by SQL.
fn replica_config_toml(c: &ConfigInput, admin_user: &str, admin_password: &str) -> String {
    let mut toml = config_head(c);
    for (name, addr) in &c.backends {
        toml.push_str(&format!(
            "\n[[backend]]\nname = {}\naddress = \"{addr}\"\ncluster = {}\n",
            toml_str(name),
            toml_str(REPLICA_CLUSTER)
        ));
    }
    toml.push_str(&format!(
        "\n[backend_admin]\n\
         # pgferry's own login for role checks and switchovers (a superuser here).\n\
         user = {}\npassword = {}\ndatabase = \"postgres\"\n\n\
         [switchover]\npromote = \"sql\"\n",
        toml_str(admin_user),
        toml_str(admin_password)
    ));
    toml
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_path(p: &Path) -> String {
    toml_str(&p.to_string_lossy())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(paths: &'a (PathBuf, PathBuf, PathBuf)) -> ConfigInput<'a> {
        ConfigInput {
            port: 6432,
            admin_port: 9930,
            cert: &paths.0,
            key: &paths.1,
            userlist: &paths.2,
            audit_port: 5434,
            backends: vec![
                ("pg1".to_owned(), SocketAddr::from(([127, 0, 0, 1], 5432))),
                ("pg2".to_owned(), SocketAddr::from(([127, 0, 0, 1], 5433))),
            ],
        }
    }

    fn paths() -> (PathBuf, PathBuf, PathBuf) {
        (
            PathBuf::from("/state/server.crt"),
            PathBuf::from("/state/server.key"),
            PathBuf::from("/state/users \"x\".txt"),
        )
    }

    #[test]
    fn two_cluster_config_loads() {
        let paths = paths();
        let toml = config_toml(&input(&paths));
        let config = Config::parse(&toml, "sandbox", Path::new("/state"))
            .unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert_eq!(config.backends.len(), 2);
        assert!(!toml.contains("cluster ="), "{toml}");
    }

    #[test]
    fn replica_config_has_the_switchover_keys() {
        let paths = paths();
        let toml = replica_config_toml(&input(&paths), "postgres", "postgres");
        for backend in [
            "[[backend]]\nname = \"pg1\"\naddress = \"127.0.0.1:5432\"\ncluster = \"main\"\n",
            "[[backend]]\nname = \"pg2\"\naddress = \"127.0.0.1:5433\"\ncluster = \"main\"\n",
        ] {
            assert!(toml.contains(backend), "{backend:?} missing from\n{toml}");
        }
        let tail = "\n[backend_admin]\n\
             # pgferry's own login for role checks and switchovers (a superuser here).\n\
             user = \"postgres\"\n\
             password = \"postgres\"\n\
             database = \"postgres\"\n\
             \n\
             [switchover]\n\
             promote = \"sql\"\n";
        assert!(toml.ends_with(tail), "{toml}");
        assert!(
            toml.contains("[audit]\nurl = \"host=127.0.0.1 port=5434 "),
            "{toml}"
        );

        // Without the keys the proxy side adds, it is today's config.
        let today: String = toml
            .split("\n[backend_admin]")
            .next()
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with("cluster = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let config = Config::parse(&today, "sandbox", Path::new("/state"))
            .unwrap_or_else(|e| panic!("{e}\n{today}"));
        assert_eq!(config.backends.len(), 2);
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000A\"");
        assert_eq!(toml_str("héllo"), "\"héllo\"");
    }

    fn values(c: &Cluster) -> anyhow::Result<String> {
        Ok(c.psql(
            "postgres",
            "select string_agg(x::text, ',' order by x) from t",
        )?)
    }

    fn pair(started: &Started) -> anyhow::Result<(&Cluster, &Cluster, usize)> {
        let r = started
            .replica
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("not replica mode"))?;
        match &started.backends[..] {
            [pg1, pg2] => Ok((pg1, pg2, r.primary)),
            other => bail!("{} backends", other.len()),
        }
    }

    /// As root, a default state directory the server user cannot enter
    /// (under a 0700 directory, like a checkout in /root) moves to the
    /// fallback; an explicit one is an error naming the directory. Not
    /// root, the directory is used as it is.
    #[test]
    fn an_unreachable_default_state_dir_moves_to_the_fallback_as_root() -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let closed = tempfile::tempdir()?; // 0700
        std::fs::set_permissions(closed.path(), PermissionsExt::from_mode(0o700))?;
        let open = tempfile::tempdir()?;
        std::fs::set_permissions(open.path(), PermissionsExt::from_mode(0o755))?;
        let requested = closed.path().join("checkout/.pgferry-sandbox");
        let fallback = open.path().join("pgferry-sandbox");
        let root = nix::unistd::geteuid().is_root();

        let dir = state_dir(&requested, true, &fallback)?;
        if root {
            assert_eq!(dir, fallback);
            assert!(fallback.is_dir());
            assert!(!requested.exists(), "the unused default is removed");
            let err = state_dir(&requested, false, &fallback)
                .expect_err("an explicit --dir the server user cannot enter");
            assert!(
                err.to_string()
                    .contains(&closed.path().display().to_string()),
                "{err:#}"
            );
        } else {
            assert_eq!(dir, std::fs::canonicalize(&requested)?);
            assert!(!fallback.exists());
        }
        Ok(())
    }

    /// The cluster side of `--replica` across restarts and a switchover
    /// (done here by hand as pgferry does it: fence read-only, promote).
    #[test]
    fn replica_pair_is_made_kept_and_repaired_after_a_switchover() -> anyhow::Result<()> {
        let bins = ServerBinaries::find_or_install()?;
        let dir = tempfile::tempdir()?;
        // The clusters run as an unprivileged user when we are root.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let wait = CATCH_UP_TIMEOUT;

        // Fresh: pg1 primary, pg2 its standby, audit apart.
        let (started, rebuilt) = start_replica(&bins, dir.path())?;
        let (pg1, pg2, primary) = pair(&started)?;
        assert_eq!((primary, rebuilt.len()), (0, 0));
        assert!(!pg1.is_in_recovery()? && pg2.is_in_recovery()?);
        let audit = started.replica.as_ref().map(|r| r.audit.name());
        assert_eq!(audit, Some("audit"));
        assert!(dir.path().join("replica/audit/PG_VERSION").is_file());
        assert!(
            !dir.path().join("pg1").exists(),
            "replica mode stays in replica/"
        );
        pg1.psql(
            "postgres",
            "create table t(x int); insert into t values (1)",
        )?;
        pg2.wait_replayed(pg1, wait)?;
        assert_eq!(values(pg2)?, "1");
        drop(started);

        // Restarted (new ports): the pair is kept, pg2 follows pg1 again.
        let (started, rebuilt) = start_replica(&bins, dir.path())?;
        let (pg1, pg2, primary) = pair(&started)?;
        assert_eq!((primary, rebuilt.len()), (0, 0));
        pg1.psql("postgres", "insert into t values (2)")?;
        pg2.wait_replayed(pg1, wait)?;
        assert_eq!(values(pg2)?, "1,2");
        // Switchover pg1 -> pg2.
        pg1.psql(
            "postgres",
            "ALTER SYSTEM SET default_transaction_read_only = on;\nSELECT pg_reload_conf();",
        )?;
        pg2.promote(Duration::from_secs(60))?;
        pg2.psql("postgres", "insert into t values (3)")?;
        drop(started);

        // pg2 primary, pg1 a fenced former primary: pg1 is rebuilt.
        let (started, rebuilt) = start_replica(&bins, dir.path())?;
        let (pg1, pg2, primary) = pair(&started)?;
        assert_eq!((primary, rebuilt), (1, vec!["pg1".to_owned()]));
        assert!(pg1.is_in_recovery()? && !pg2.is_in_recovery()?);
        pg1.wait_replayed(pg2, wait)?;
        assert_eq!(values(pg1)?, "1,2,3");
        drop(started);

        // pg2 primary with pg1 its standby is kept as it is.
        let (started, rebuilt) = start_replica(&bins, dir.path())?;
        let (pg1, pg2, primary) = pair(&started)?;
        assert_eq!((primary, rebuilt.len()), (1, 0));
        pg2.psql("postgres", "insert into t values (4)")?;
        pg1.wait_replayed(pg2, wait)?;
        assert_eq!(values(pg1)?, "1,2,3,4");
        Ok(())
    }
}
