//! Streaming standbys made with pg_basebackup, promotion, and a former
//! primary rebuilt as a standby of the promoted one.

use std::error::Error;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use pgferry_pgcluster::{Cluster, ClusterError, ClusterOptions, ServerBinaries, StopMode};

type TestResult = Result<(), Box<dyn Error>>;

const CATCH_UP: Duration = Duration::from_secs(60);

fn values(c: &Cluster) -> Result<String, ClusterError> {
    c.psql(
        "postgres",
        "select string_agg(x::text, ',' order by x) from t",
    )
}

#[test]
fn standby_streams_is_promoted_and_the_old_primary_is_rebuilt() -> TestResult {
    let bins = ServerBinaries::find_or_install()?;
    let mut primary = Cluster::start_temp(&bins, ClusterOptions::named("primary"))?;
    let mut opts = ClusterOptions::named("standby");
    // Ignored: the copy has the primary's roles.
    opts.superuser = "nobody".into();
    let standby = Cluster::start_standby_temp(&primary, opts)?;
    assert!(standby.is_temp());
    assert_eq!(standby.superuser(), primary.superuser());
    assert_ne!(standby.port(), primary.port());
    assert_eq!(
        standby.psql("postgres", "show port")?,
        standby.port().to_string(),
        "the standby's own pgferry.conf, not the copied one"
    );
    assert!(standby.is_in_recovery()?);
    assert!(!primary.is_in_recovery()?);
    let conninfo = standby.psql("postgres", "show primary_conninfo")?;
    assert!(
        conninfo.contains(&format!("port={}", primary.port())) && conninfo.contains("password="),
        "{conninfo}"
    );

    primary.psql(
        "postgres",
        "create table t(x int primary key); insert into t values (1)",
    )?;
    standby.wait_replayed(&primary, CATCH_UP)?;
    assert_eq!(values(&standby)?, "1");
    // The walsender reports "streaming" once it has noticed it caught up.
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let state = primary.psql(
            "postgres",
            "select application_name || ' ' || state from pg_stat_replication",
        )?;
        if state == "standby streaming" {
            break;
        }
        assert!(Instant::now() < deadline, "pg_stat_replication: {state:?}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let err = standby
        .psql(
            "postgres",
            "\\set VERBOSITY verbose\ninsert into t values (2)",
        )
        .err()
        .ok_or("a write on the standby should fail")?;
    assert!(
        err.to_string().contains("25006"),
        "read_only_sql_transaction expected: {err}"
    );

    // Switchover as pgferry does it: fence the primary read-only, let the
    // standby catch up, stop the old primary, promote the standby.
    primary.psql(
        "postgres",
        "ALTER SYSTEM SET default_transaction_read_only = on;\nSELECT pg_reload_conf();",
    )?;
    standby.wait_replayed(&primary, CATCH_UP)?;
    let old_port = primary.port();
    primary.stop(StopMode::Fast)?;
    standby.promote(Duration::from_secs(60))?;
    assert!(!standby.is_in_recovery()?);
    standby.psql("postgres", "insert into t values (3)")?;
    assert!(
        matches!(
            standby.promote(Duration::from_secs(5)),
            Err(ClusterError::NotStandby { .. })
        ),
        "a primary cannot be promoted"
    );

    // The former primary comes back as a standby of the new one, same port.
    primary.rebuild_as_standby_of(&standby)?;
    assert_eq!(primary.port(), old_port);
    assert!(primary.is_in_recovery()?);
    primary.wait_replayed(&standby, CATCH_UP)?;
    assert_eq!(values(&primary)?, "1,3");
    standby.psql("postgres", "insert into t values (4)")?;
    primary.wait_replayed(&standby, CATCH_UP)?;
    assert_eq!(values(&primary)?, "1,3,4");
    assert!(primary
        .psql("postgres", "insert into t values (5)")
        .is_err());
    assert!(
        matches!(
            standby.wait_replayed(&primary, CATCH_UP),
            Err(ClusterError::Psql { .. })
        ),
        "a standby cannot be the primary of wait_replayed"
    );

    // Rebuilding a running standby again works too (stop first).
    primary.rebuild_as_standby_of(&standby)?;
    assert_eq!(primary.port(), old_port);
    primary.wait_replayed(&standby, CATCH_UP)?;
    assert_eq!(values(&primary)?, "1,3,4");
    Ok(())
}

#[test]
fn kept_standby_is_reused_and_follows_a_moved_primary() -> TestResult {
    let bins = ServerBinaries::find_or_install()?;
    let dir = tempfile::tempdir()?;
    // The clusters run as an unprivileged user when we are root.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;

    let primary = Cluster::start(&bins, dir.path(), ClusterOptions::named("p"))?;
    let first_port = primary.port();
    {
        let s = Cluster::start_standby(dir.path(), &primary, ClusterOptions::named("s"))?;
        assert!(!s.is_temp());
        assert!(s.is_in_recovery()?);
    } // dropped: fast stop, directory kept
    assert!(dir.path().join("s").join("PG_VERSION").is_file());
    assert!(
        !dir.path().join(".s.basebackup").exists(),
        "the staging dir was moved into place"
    );
    drop(primary);

    // The primary comes back on another port, with new data.
    let mut opts = ClusterOptions::named("p");
    let port = loop {
        let p = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if p != first_port {
            break p;
        }
    };
    opts.port = Some(port);
    let primary = Cluster::start(&bins, dir.path(), opts)?;
    primary.psql(
        "postgres",
        "create table t(x int); insert into t values (7)",
    )?;

    // A marker in the standby's data dir shows it is reused, not re-copied.
    let marker = dir.path().join("s").join("pgcluster-test-marker");
    std::fs::write(&marker, "kept")?;
    let s = Cluster::start_standby(dir.path(), &primary, ClusterOptions::named("s"))?;
    assert!(marker.exists(), "the existing standby was replaced");
    assert!(s.is_in_recovery()?);
    s.follow(&primary)?;
    s.wait_replayed(&primary, CATCH_UP)?;
    assert_eq!(s.psql("postgres", "select x from t")?, "7");
    assert!(matches!(
        primary.follow(&s),
        Err(ClusterError::NotStandby { .. })
    ));

    // A non-empty directory that is no cluster is not ours to replace.
    let junk = dir.path().join("junk");
    std::fs::create_dir(&junk)?;
    std::fs::write(junk.join("file"), "x")?;
    let r = Cluster::start_standby(dir.path(), &primary, ClusterOptions::named("junk"));
    assert!(matches!(r, Err(ClusterError::Io { .. })), "{r:?}");
    assert!(junk.join("file").exists());
    Ok(())
}
