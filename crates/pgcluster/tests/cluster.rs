//! Starts real clusters from the installed PostgreSQL server binaries.

use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgferry_pgcluster::{
    cleanup_stale_temp_dirs, Cluster, ClusterError, ClusterOptions, ServerBinaries, StopMode,
};

type TestResult = Result<(), Box<dyn Error>>;

const HELPER_ENV: &str = "PGCLUSTER_TEST_ORPHAN_HELPER";

#[test]
fn temp_cluster_lifecycle() -> TestResult {
    let bins = ServerBinaries::find_or_install()?;
    assert!(bins.version.starts_with(|c: char| c.is_ascii_digit()));
    let mut c = Cluster::start_temp(&bins, ClusterOptions::named("lifecycle"))?;
    let root: PathBuf = c
        .data_dir()
        .parent()
        .ok_or("data dir has no parent")?
        .to_path_buf();
    assert!(root.exists());
    assert!(c.is_running());
    assert!(c.pid().is_some());
    assert_eq!(c.addr().port(), c.port());

    // Awkward names exercise identifier/literal quoting; the second call must
    // succeed too (role exists: password reset; database exists: kept).
    let (user, pw, db) = ("app \"user\"", "pa's\\s", "app db");
    c.ensure_user_and_database(user, pw, db)?;
    c.ensure_user_and_database(user, pw, db)?;
    assert_eq!(c.psql(db, "select current_database()")?, db);
    assert_eq!(
        c.psql(
            db,
            "select pg_catalog.pg_get_userbyid(datdba) from pg_database where datname = current_database()"
        )?,
        user
    );
    assert_eq!(
        c.psql("postgres", "select 40 + 2; select 'x'")?,
        "42\nx",
        "multi-statement scripts return every result"
    );
    let verifier = c.scram_verifier(user)?;
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    assert!(matches!(
        c.scram_verifier("no such role"),
        Err(ClusterError::NoVerifier { .. })
    ));

    let err = c
        .psql("postgres", "select * from no_such_table")
        .err()
        .ok_or("psql should fail")?;
    assert!(err.to_string().contains("no_such_table"), "{err}");

    // Concurrent ensure from several threads on a shared cluster.
    std::thread::scope(|s| -> TestResult {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| c.ensure_user_and_database("par", "par", "pardb")))
            .collect();
        for h in handles {
            h.join().map_err(|_| "thread panicked")??;
        }
        Ok(())
    })?;

    let port = c.port();
    let addr = c.addr();
    c.stop(StopMode::Fast)?;
    assert!(!c.is_running());
    assert_eq!(c.pid(), None);
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "port still open after stop"
    );
    c.stop(StopMode::Fast)?; // no-op

    c.restart()?;
    assert!(c.is_running());
    assert_eq!(c.port(), port);
    assert_eq!(c.psql(db, "select 1")?, "1");
    c.restart()?; // restart while running stops first
    assert_eq!(c.psql(db, "select 2")?, "2");

    let log = std::fs::read_to_string(c.log_path())?;
    assert!(!log.is_empty() || c.log_path().exists());

    drop(c);
    assert!(!root.exists(), "temp dir {} not removed", root.display());
    Ok(())
}

#[test]
fn reused_directory_keeps_data_and_follows_port() -> TestResult {
    let bins = ServerBinaries::find_or_install()?;
    let dir = tempfile::tempdir()?;
    if nix::unistd::geteuid().is_root() {
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        // The server runs as an unprivileged user, which cannot reach it.
        let r = Cluster::start(&bins, dir.path(), ClusterOptions::named("reuse"));
        assert!(
            matches!(r, Err(ClusterError::NotTraversable { .. })),
            "{r:?}"
        );
        eprintln!("{}", r.err().map(|e| e.to_string()).unwrap_or_default());
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;

    let mut opts = ClusterOptions::named("reuse");
    opts.superuser = "boss".into();
    opts.superuser_password = "hunter2".into();
    opts.settings = vec![
        ("application_name".into(), "pgcluster test".into()),
        ("work_mem".into(), "'8MB'".into()),
    ];
    let first_port;
    {
        let c = Cluster::start(&bins, dir.path(), opts.clone())?;
        assert!(!c.is_temp());
        first_port = c.port();
        assert_eq!(c.superuser(), "boss");
        assert_eq!(c.psql("postgres", "show work_mem")?, "8MB");
        c.psql(
            "postgres",
            "create table kept(x int); insert into kept values (7)",
        )?;
    } // dropped: fast stop, directory and data kept
    assert!(dir.path().join("reuse").join("PG_VERSION").exists());

    let c = Cluster::start(&bins, dir.path(), opts)?;
    assert_ne!(c.port(), 0);
    let _ = first_port; // may or may not be reused; the server follows whatever we pick
    assert_eq!(c.psql("postgres", "select x from kept")?, "7");
    assert_eq!(
        c.psql("postgres", "show port")?,
        c.port().to_string(),
        "pgferry.conf was rewritten with the new port"
    );
    drop(c);
    assert!(dir.path().join("reuse").exists());
    Ok(())
}

#[test]
fn invalid_options_are_rejected() -> TestResult {
    let bins = ServerBinaries::find_or_install()?;
    for name in ["", "a/b", "..", "a b"] {
        let r = Cluster::start_temp(&bins, ClusterOptions::named(name));
        assert!(
            matches!(r, Err(ClusterError::InvalidOption(_))),
            "{name:?}: {r:?}"
        );
    }
    let mut bad = ClusterOptions::named("x");
    bad.settings = vec![("a = 1\nb".into(), "2".into())];
    assert!(matches!(
        Cluster::start_temp(&bins, bad),
        Err(ClusterError::InvalidOption(_))
    ));
    Ok(())
}

#[test]
fn bad_setting_reports_log_tail() -> TestResult {
    let bins = ServerBinaries::find_or_install()?;
    let mut opts = ClusterOptions::named("badconf");
    opts.settings = vec![("shared_buffers".into(), "lots".into())];
    let err = Cluster::start_temp(&bins, opts)
        .err()
        .ok_or("start should fail")?;
    let msg = err.to_string();
    assert!(matches!(err, ClusterError::StartFailed { .. }), "{msg}");
    assert!(msg.contains("shared_buffers"), "{msg}");
    eprintln!("{msg}");
    Ok(())
}

#[test]
fn cluster_outlives_the_thread_that_started_it() -> TestResult {
    // PDEATHSIG fires when the forking *thread* exits; the crate forks from a
    // dedicated spawner thread, so a cluster started by a short-lived thread
    // (like a test thread initializing a static) must survive it.
    let bins = ServerBinaries::find_or_install()?;
    let c = std::thread::spawn(move || Cluster::start_temp(&bins, ClusterOptions::named("thread")))
        .join()
        .map_err(|_| "starter thread panicked")??;
    std::thread::sleep(Duration::from_millis(500));
    assert!(c.is_running());
    assert_eq!(c.psql("postgres", "select 'alive'")?, "alive");
    Ok(())
}

/// Not a real test unless re-executed by `postmaster_dies_with_its_parent`:
/// starts a cluster, reports it and sleeps until killed.
#[test]
fn orphan_helper() -> TestResult {
    if std::env::var_os(HELPER_ENV).is_none() {
        return Ok(());
    }
    let bins = ServerBinaries::find_or_install()?;
    let c = Cluster::start_temp(&bins, ClusterOptions::named("orphan"))?;
    let pid = c.pid().ok_or("no pid")?;
    let root = c.data_dir().parent().ok_or("no parent")?.to_path_buf();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "ORPHAN pid={pid} port={} dir={}",
        c.port(),
        root.display()
    )?;
    out.flush()?;
    drop(out);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[test]
fn postmaster_dies_with_its_parent() -> TestResult {
    let exe = std::env::current_exe()?;
    let mut helper = Command::new(exe)
        .args([
            "--exact",
            "orphan_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = helper.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest prints "test orphan_helper ... " on the same line.
            if let Some((_, rest)) = line.split_once("ORPHAN ") {
                let _ = tx.send(rest.to_owned());
                break;
            }
        }
    });
    let report = match rx.recv_timeout(Duration::from_secs(90)) {
        Ok(r) => r,
        Err(e) => {
            let _ = helper.kill();
            let _ = helper.wait();
            return Err(format!("helper did not report a cluster: {e}").into());
        }
    };
    let field = |key: &str| -> Result<String, String> {
        report
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .map(str::to_owned)
            .ok_or_else(|| format!("no {key} in {report:?}"))
    };
    let pid: i32 = field("pid=")?.parse()?;
    let port: u16 = field("port=")?.parse()?;
    let dir = PathBuf::from(field("dir=")?);
    assert!(!process_gone(pid), "postmaster {pid} not running");

    kill(Pid::from_raw(i32::try_from(helper.id())?), Signal::SIGKILL)?;
    helper.wait()?;

    let deadline = Instant::now() + Duration::from_secs(30);
    while !process_gone(pid) {
        if Instant::now() >= deadline {
            // Do not leave it behind for the next run.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            return Err(format!("postmaster {pid} survived its parent for 30 s").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(1)
        )
        .is_err(),
        "something still listens on the orphan's port {port}"
    );

    // The helper's temp dir leaked (it was SIGKILLed); the stale sweep removes it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while dir.exists() {
        cleanup_stale_temp_dirs();
        if Instant::now() >= deadline {
            return Err(format!("stale dir {} not removed", dir.display()).into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Gone or a zombie (PID 1 in a container may not reap reparented children).
fn process_gone(pid: i32) -> bool {
    match kill(Pid::from_raw(pid), None) {
        Err(Errno::ESRCH) => true,
        _ => std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned))
            })
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}
