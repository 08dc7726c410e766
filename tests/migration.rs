//! Live migration between two real PostgreSQL clusters with the same roles
//! and schema, driven through the admin API of the built binary.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn other_port(port: u16) -> u16 {
    let e = env();
    if port == e.pg1.port() {
        e.pg2.port()
    } else {
        e.pg1.port()
    }
}

async fn server_port(c: &tokio_postgres::Client) -> u16 {
    let row = c
        .query_one("select inet_server_port()", &[])
        .await
        .expect("port");
    row.get::<_, i32>(0) as u16
}

async fn setting(c: &tokio_postgres::Client, name: &str) -> String {
    c.query_one("select current_setting($1)", &[&name])
        .await
        .expect("setting")
        .get(0)
}

fn migration_proxy() -> ProxyProcess {
    ProxyProcess::start(ProxyOptions {
        proxy_extra: String::new(),
        migration_extra: "carry_settings = [\"app.region\"]".into(),
        ..Default::default()
    })
}

/// Transfers the session named `app` via the admin API, off the runtime.
async fn transfer(proxy: &ProxyProcess, app: &str, body: &str) -> (u16, serde_json::Value) {
    let id = proxy.connection_by_app(app)["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let body = body.to_owned();
    let admin = proxy.admin;
    tokio::task::spawn_blocking(move || admin_transfer(admin, &id, &body))
        .await
        .expect("join")
}

fn admin_transfer(admin: std::net::SocketAddr, id: &str, body: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).expect("admin");
    write!(
        s,
        "POST /v1/connections/{id}/transfer HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let json = resp
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(serde_json::Value::Null);
    (status, json)
}

async fn connect_app(proxy: &ProxyProcess, app: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_config(proxy, USER, PASSWORD)
        .application_name(app)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    c
}

#[tokio::test]
async fn idle_session_moves_with_settings_role_prepared_statements_and_cancel_key() {
    let proxy = migration_proxy();
    let c = connect_app(&proxy, "mover").await;
    let before = server_port(&c).await;
    c.batch_execute(
        "SET search_path = shop, public; SET TimeZone = 'Asia/Tokyo'; \
         SET statement_timeout = '12s'; SET application_name = 'mover'; \
         SET ROLE reader; SET app.tenant = 'acme'; \
         SELECT set_config(n, 'eu-west', false) FROM (SELECT 'app' || '.region' AS n) s; \
         PREPARE doubled(int) AS SELECT $1 * 2",
    )
    .await
    .expect("set up session");
    let stmt = c
        .prepare("select $1::int + 1, current_schema()")
        .await
        .expect("prepare");

    let (status, out) = transfer(&proxy, "mover", "").await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["outcome"], "success");
    assert!(out["duration_ms"].as_f64().expect("duration") >= 0.0);

    let after = server_port(&c).await;
    assert_eq!(after, other_port(before), "session did not move");
    assert_eq!(
        out["to"],
        if after == env().pg1.port() {
            "pg1"
        } else {
            "pg2"
        }
    );
    assert_eq!(setting(&c, "search_path").await, "shop, public");
    assert_eq!(setting(&c, "TimeZone").await, "Asia/Tokyo");
    assert_eq!(setting(&c, "statement_timeout").await, "12s");
    assert_eq!(setting(&c, "application_name").await, "mover");
    assert_eq!(setting(&c, "role").await, "reader");
    assert_eq!(setting(&c, "app.tenant").await, "acme");
    assert_eq!(setting(&c, "app.region").await, "eu-west", "carry_settings");
    let row = c
        .query_one(&stmt, &[&41i32])
        .await
        .expect("protocol-level statement");
    assert_eq!(row.get::<_, i32>(0), 42);
    assert_eq!(row.get::<_, String>(1), "shop");
    let row = c
        .query_one("EXECUTE doubled(21)", &[])
        .await
        .expect("SQL PREPARE");
    assert_eq!(row.get::<_, i32>(0), 42);

    // The client's cancel key now cancels on the new backend.
    let token = c.cancel_token();
    let sleeper = {
        let c = c;
        tokio::spawn(async move { (c.simple_query("select pg_sleep(60)").await.map(|_| ()), c) })
    };
    let cluster = cluster_by_port(after);
    tokio::task::spawn_blocking(move || {
        wait_until(
            Duration::from_secs(10),
            "pg_sleep on the new backend",
            || {
                cluster
                    .psql(
                        "postgres",
                        "select count(*) from pg_stat_activity where query = 'select pg_sleep(60)'",
                    )
                    .map(|n| n.trim() == "1")
                    .unwrap_or(false)
            },
        )
    })
    .await
    .expect("join");
    let sent = Instant::now();
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel");
    let (result, _c) = sleeper.await.expect("join");
    let e = result.expect_err("not cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"));
    assert!(sent.elapsed() < Duration::from_secs(1));

    let view = proxy.connection_by_app("mover");
    assert_eq!(view["migrations"], 1);
    assert_eq!(view["backend"], out["to"]);
    assert_eq!(proxy.metric("pgferry_conn_migration_success_total"), 1.0);
    assert_eq!(proxy.metric("pgferry_conn_migration_attempted_total"), 1.0);
    assert_eq!(
        proxy.metric("pgferry_conn_migration_pause_seconds_count"),
        1.0
    );
}
