//! `[auth] auth_user` + `auth_query`: users the userlist does not have are
//! looked up on a backend, kept for `auth_query_ttl`, and log in to backends
//! by SCRAM pass-through. Real pgferry, real PostgreSQL.
//!
//! The two shared clusters are separate servers, so every role a test
//! makes is created on pg1 and copied with the very same verifier to pg2,
//! as the backends of one cluster would share it.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

/// A superuser pgferry looks users up as (the default auth_query reads
/// pg_shadow).
const LOOKUP: &str = "aq_lookup";
const LOOKUP_PASSWORD: &str = "aq-lookup-secret";

/// A role that is no superuser, allowed only to run a SECURITY DEFINER
/// function (PgBouncer's documented set-up).
const DEFINER_LOOKUP: &str = "aq_definer_lookup";
const DEFINER_LOOKUP_PASSWORD: &str = "aq-definer-secret";
const DEFINER_QUERY: &str = "SELECT uname, phash FROM aq_auth.user_lookup($1)";

fn on_both(sql: &str) {
    let e = env();
    for c in [&e.pg1, &e.pg2] {
        c.psql("postgres", sql)
            .unwrap_or_else(|err| panic!("{}: {sql}: {err}", c.name()));
    }
}

/// The lookup roles and the function, once per test binary.
fn setup() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        on_both(&format!(
            "CREATE ROLE {LOOKUP} LOGIN SUPERUSER PASSWORD '{LOOKUP_PASSWORD}'"
        ));
        on_both(&format!(
            "CREATE ROLE {DEFINER_LOOKUP} LOGIN PASSWORD '{DEFINER_LOOKUP_PASSWORD}';
             CREATE SCHEMA aq_auth;
             CREATE FUNCTION aq_auth.user_lookup(IN i_username text, OUT uname text, OUT phash text)
             RETURNS record AS $$
             BEGIN
                 SELECT usename, passwd FROM pg_catalog.pg_shadow
                 WHERE usename = i_username INTO uname, phash;
                 RETURN;
             END;
             $$ LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
             REVOKE ALL ON FUNCTION aq_auth.user_lookup(text) FROM PUBLIC;
             GRANT USAGE ON SCHEMA aq_auth TO {DEFINER_LOOKUP};
             GRANT EXECUTE ON FUNCTION aq_auth.user_lookup(text) TO {DEFINER_LOOKUP};"
        ));
    });
}

/// Creates login role `role` with `password` on pg1 and the very same
/// verifier on pg2; the verifier.
fn create_role(role: &str, password: &str) -> String {
    let e = env();
    e.pg1
        .psql(
            "postgres",
            &format!("CREATE ROLE {role} LOGIN PASSWORD '{password}'"),
        )
        .expect("create role on pg1");
    let verifier = e.pg1.scram_verifier(role).expect("verifier");
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    e.pg2
        .psql(
            "postgres",
            &format!("CREATE ROLE {role} LOGIN PASSWORD '{verifier}'"),
        )
        .expect("create role on pg2");
    assert_eq!(e.pg2.scram_verifier(role).expect("pg2 verifier"), verifier);
    verifier
}

/// pgferry with `auth_user` (in the userlist with its password, next to
/// app) and `extra` [auth] lines; no back-off, so that failed logins do
/// not make later ones wait.
fn pgferry(auth_user: &str, password: &str, extra: &str) -> ProxyProcess {
    ProxyProcess::start(ProxyOptions {
        userlist: Some(format!(
            "\"{USER}\" \"{PASSWORD}\"\n\"{auth_user}\" \"{password}\"\n"
        )),
        auth_extra: format!("auth_user = \"{auth_user}\"\nthrottle = false\n{extra}"),
        ..Default::default()
    })
}

/// Refused exactly as a wrong password is.
fn like_a_wrong_password(r: Result<impl Sized, tokio_postgres::Error>, user: &str) {
    let e = r.map(|_| ()).expect_err("login accepted");
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");
    assert_eq!(
        e.as_db_error().expect("db error").message(),
        format!("password authentication failed for user \"{user}\"")
    );
}

/// Refused because no lookup could be made: the same for every name.
fn lookup_failed(r: Result<impl Sized, tokio_postgres::Error>) {
    let e = r.map(|_| ()).expect_err("login accepted");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e}");
    assert_eq!(
        e.as_db_error().expect("db error").message(),
        "cannot authenticate now: pgferry could not look the user up on any backend"
    );
}

async fn current_user(c: &tokio_postgres::Client) -> String {
    c.query_one("SELECT current_user::text", &[])
        .await
        .expect("query")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_created_after_start_logs_in_and_after_drop_role_and_the_ttl_fails_like_a_wrong_password(
) {
    setup();
    let ttl = Duration::from_secs(1);
    let proxy = pgferry(LOOKUP, LOOKUP_PASSWORD, "auth_query_ttl = \"1s\"");
    let role = "aq_late";
    create_role(role, "late-secret");

    let (c, conn) = connect(&proxy, role, "late-secret")
        .await
        .expect("a role created after pgferry started logs in");
    assert_eq!(current_user(&c).await, role);
    // Its wrong password is a wrong password.
    like_a_wrong_password(connect(&proxy, role, "not-it").await, role);
    drop(c);
    conn.await.expect("join").expect("clean close");

    on_both(&format!("DROP ROLE {role}"));
    let dropped_at = Instant::now();
    // The answer kept from before the DROP outlives it by at most the TTL:
    // waiting that out is the event under test.
    tokio::time::sleep_until((dropped_at + ttl + Duration::from_millis(200)).into()).await;
    like_a_wrong_password(connect(&proxy, role, "late-secret").await, role);
    assert!(
        proxy.log().contains("password authentication failed"),
        "counted as a failed login"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_is_kept_for_the_ttl_and_a_failed_lookup_refuses_every_name_alike() {
    setup();
    // A lookup role of this test's own, to take away.
    let lookup = "aq_cache_lookup";
    on_both(&format!(
        "CREATE ROLE {lookup} LOGIN SUPERUSER PASSWORD 'cache-lookup-secret'"
    ));
    let proxy = pgferry(lookup, "cache-lookup-secret", "auth_query_ttl = \"10min\"");
    let role = "aq_kept";
    create_role(role, "kept-secret");
    create_role("aq_never_looked_up", "never-secret");
    let (c, _conn) = connect(&proxy, role, "kept-secret").await.expect("login");
    assert_eq!(current_user(&c).await, role);
    drop(c);
    // No more lookups can be made ...
    on_both(&format!("ALTER ROLE {lookup} NOLOGIN"));
    // ... yet the kept answer still logs the user in.
    let (c, _conn) = connect(&proxy, role, "kept-secret")
        .await
        .expect("login from the kept answer");
    assert_eq!(current_user(&c).await, role);
    // Names without a kept answer: a user who exists and one who does not
    // are refused alike, and not as a wrong password.
    lookup_failed(connect(&proxy, "aq_never_looked_up", "never-secret").await);
    lookup_failed(connect(&proxy, "aq_nobody_at_all", "x").await);
    // Two answers found (one kept), two lookups failed.
    assert_eq!(
        proxy.metric("pgferry_auth_query_total{result=\"found\"}"),
        2.0
    );
    assert_eq!(
        proxy.metric("pgferry_auth_query_total{result=\"failed\"}"),
        2.0
    );
    let log = proxy.log();
    assert!(
        log.contains("auth_query failed on this backend") && log.contains(lookup),
        "the cause is in pgferry's log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_unknown_to_the_userlist_and_the_backends_fails_like_a_wrong_password() {
    setup();
    let proxy = pgferry(LOOKUP, LOOKUP_PASSWORD, "");
    // Twice: from the lookup, then from the kept "no such user".
    for _ in 0..2 {
        like_a_wrong_password(connect(&proxy, "aq_nobody", "whatever").await, "aq_nobody");
    }
    // A userlist user is never looked up, and still logs in.
    let (c, _conn) = connect(&proxy, USER, PASSWORD).await.expect("app");
    assert_eq!(current_user(&c).await, USER);
    like_a_wrong_password(connect(&proxy, USER, "wrong").await, USER);
    assert_eq!(
        proxy.metric("pgferry_auth_query_total{result=\"no_such_user\"}"),
        2.0
    );
    assert_eq!(
        proxy.metric("pgferry_auth_query_total{result=\"found\"}"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_security_definer_function_serves_a_lookup_role_that_is_no_superuser() {
    setup();
    let query = format!("auth_query = \"{DEFINER_QUERY}\"");
    let proxy = pgferry(DEFINER_LOOKUP, DEFINER_LOOKUP_PASSWORD, &query);
    let role = "aq_via_function";
    create_role(role, "function-secret");
    let (c, _conn) = connect(&proxy, role, "function-secret")
        .await
        .expect("login through the function");
    assert_eq!(current_user(&c).await, role);
    like_a_wrong_password(connect(&proxy, role, "wrong").await, role);
    // The function answers an unknown name with a row of NULLs: no such
    // user, and nothing to warn about.
    like_a_wrong_password(
        connect(&proxy, "aq_not_in_pg_shadow", "x").await,
        "aq_not_in_pg_shadow",
    );
    assert!(
        !proxy.log().contains("cannot log in through pgferry"),
        "{}",
        proxy.log()
    );

    // The same role with the default query cannot read pg_shadow: the
    // lookup fails, and says why in the log only.
    let default_query = pgferry(DEFINER_LOOKUP, DEFINER_LOOKUP_PASSWORD, "");
    lookup_failed(connect(&default_query, role, "function-secret").await);
    let log = default_query.log();
    assert!(log.contains("permission denied"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_of_a_looked_up_user_moves_to_another_backend() {
    setup();
    let proxy = pgferry(LOOKUP, LOOKUP_PASSWORD, "");
    let role = "aq_mover";
    create_role(role, "mover-secret");
    let app = "aq-mover";
    let (c, conn) = tokio_config(&proxy, role, "mover-secret")
        .application_name(app)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("login");
    let _conn = tokio::spawn(conn);
    c.batch_execute("SET work_mem = '7MB'").await.expect("set");
    let before = proxy.connection_by_app(app);
    let from = before["backend"].as_str().expect("backend").to_owned();
    let id = before["id"].as_str().expect("id").to_owned();
    let to = if from == "pg1" { "pg2" } else { "pg1" };
    let admin = proxy.admin;
    let (status, moved) = tokio::task::block_in_place(|| {
        admin_json(
            admin,
            "POST",
            &format!("/v1/connections/{id}/transfer"),
            &format!(r#"{{"to": "{to}"}}"#),
        )
    });
    assert_eq!(status, 200, "{moved}");
    assert_eq!(moved["to"], to, "{moved}");
    // The session runs on the other server now, as the user, with its state.
    assert_eq!(current_user(&c).await, role);
    let work_mem: String = c
        .query_one("SHOW work_mem", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(work_mem, "7MB");
    assert_eq!(proxy.connection_by_app(app)["backend"], to);
    let target = if to == "pg1" { &env().pg1 } else { &env().pg2 };
    let seen = target
        .psql(
            "postgres",
            &format!("SELECT usename FROM pg_stat_activity WHERE application_name = '{app}'"),
        )
        .expect("pg_stat_activity");
    assert_eq!(seen, role, "the target server serves the session");
}

#[test]
fn pgferry_does_not_start_without_a_password_for_auth_user() {
    let dir = tempfile::tempdir().expect("tmp");
    let verifier = pgferry_auth::ScramVerifier::from_password("pw", b"salt", 4096).to_pg_string();
    std::fs::write(
        dir.path().join("users.txt"),
        format!("\"{USER}\" \"{PASSWORD}\"\n\"copied\" \"{verifier}\"\n"),
    )
    .expect("userlist");
    for (auth_user, why) in [
        ("copied", "cannot log in with a verifier alone"),
        ("absent", "is not in the userlist"),
    ] {
        let path = dir.path().join("pgferry.toml");
        std::fs::write(
            &path,
            format!(
                "[proxy]\nlisten = \"127.0.0.1:0\"\n[auth]\nuserlist = \"users.txt\"\n\
                 auth_user = \"{auth_user}\"\n[[backend]]\nname = \"pg1\"\naddress = \"127.0.0.1:5432\"\n"
            ),
        )
        .expect("config");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgferry"))
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .expect("run pgferry");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{auth_user}: started");
        assert!(
            err.contains("auth.auth_user") && err.contains(why),
            "{auth_user}: {err}"
        );
    }
}
