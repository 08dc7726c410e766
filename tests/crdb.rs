//! CockroachDB backends (issue 16, design in `docs/crdb-design.md`): a
//! session moves between two nodes of one cluster by `SHOW TRANSFER STATE
//! WITH '<key>'` on the old node, a login to the new one with the session
//! revival token (no password), and `crdb_internal.deserialize_session` of
//! the state there. What CockroachDB refuses (an open transaction,
//! temporary schemas, root, tokens disabled) comes back as a 409 with its
//! own words; a target that cannot be reached, refuses the token or fails
//! the deserialize is a 409 too and the session stays; an old node that
//! drops the connection in the middle of its answer ends the session
//! (500, the client gets 08006). After a move the client's cancel key
//! cancels on the new node, and no token ever reaches pgferry's log.
//!
//! No CockroachDB binary can be installed on the machines these tests run
//! on, so the nodes are the scripted wire peer of
//! `tests/common/crdb_peer.rs`, which behaves as CockroachDB's source
//! describes (the files are cited there) and records what it sees for the
//! assertions. `real_cockroach_session_moves_between_two_nodes` runs the
//! same move against real nodes when a `cockroach` binary is on PATH.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::crdb_peer::{CrdbCluster, Event, Fault, Login, TOKEN_PARAM};
use common::*;
use tokio_postgres::SimpleQueryMessage;

/// root's password on the peer (and in pgferry's userlist for the root
/// test).
const ROOT_PASSWORD: &str = "root-secret";

fn peer(nodes: usize) -> CrdbCluster {
    CrdbCluster::start(nodes, &[(USER, PASSWORD), ("root", ROOT_PASSWORD)])
}

/// pgferry in front of `cluster`'s nodes, every one `dialect =
/// "cockroachdb"`.
fn crdb_proxy(cluster: &CrdbCluster) -> ProxyProcess {
    ProxyProcess::start(ProxyOptions {
        backend_dialect: Some("cockroachdb".into()),
        ..ProxyOptions::bare(cluster.backends())
    })
}

async fn connect_as(
    proxy: &ProxyProcess,
    user: &str,
    password: &str,
    app: &str,
) -> tokio_postgres::Client {
    let (c, conn) = tokio_config(proxy, user, password)
        .application_name(app)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect through pgferry");
    tokio::spawn(conn);
    c
}

/// A session named `app` with `timezone` set (for checking that it is kept
/// or carried), and the node it is on.
async fn session_with_timezone(
    proxy: &ProxyProcess,
    app: &str,
    timezone: &str,
) -> (tokio_postgres::Client, usize) {
    let c = connect_app(proxy, app).await;
    c.batch_execute(&format!("SET timezone = '{timezone}'"))
        .await
        .expect("set timezone");
    let from = node_id(&c).await;
    (c, from)
}

/// A session named `app` whose connection task is kept, to see how it ends.
async fn watched_session(
    proxy: &ProxyProcess,
    app: &str,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let (client, conn) = tokio_config(proxy, USER, PASSWORD)
        .application_name(app)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    (client, tokio::spawn(conn))
}

/// The SQLSTATE a session that should be over ended with: its next query's
/// error, or its connection's.
async fn ended_with(
    client: &tokio_postgres::Client,
    conn: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) -> Option<String> {
    let e = client
        .simple_query("SELECT 1")
        .await
        .expect_err("the session survived");
    let conn_result = conn.await.expect("join");
    let code = sqlstate(&e).or_else(|| conn_result.as_ref().err().and_then(sqlstate));
    eprintln!("ended: query {e}; connection {conn_result:?}");
    code
}

async fn connect_app(proxy: &ProxyProcess, app: &str) -> tokio_postgres::Client {
    connect_as(proxy, USER, PASSWORD, app).await
}

/// Rows of a simple query, each as its columns' text (None for NULL).
async fn rows(c: &tokio_postgres::Client, sql: &str) -> Vec<Vec<Option<String>>> {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect()
}

/// The first column of the only row.
async fn value(c: &tokio_postgres::Client, sql: &str) -> String {
    let rows = rows(c, sql).await;
    assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
    rows[0][0].clone().unwrap_or_else(|| panic!("{sql}: NULL"))
}

/// The node the session runs on, by the node's own word.
async fn node_id(c: &tokio_postgres::Client) -> usize {
    value(c, "SELECT crdb_internal.node_id()")
        .await
        .parse()
        .expect("a node id")
}

/// `POST /v1/connections/{id}/transfer` for the session named `app`.
fn transfer(proxy: &ProxyProcess, app: &str, body: &str) -> (u16, serde_json::Value) {
    let id = proxy.connection_by_app(app)["id"]
        .as_str()
        .expect("id")
        .to_owned();
    admin_json(
        proxy.admin,
        "POST",
        &format!("/v1/connections/{id}/transfer"),
        body,
    )
}

/// Runs blocking test code (admin requests, waits on the peer) from an
/// async test (multi-threaded runtime).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn to_body(node: usize) -> String {
    format!(r#"{{"to": "n{node}"}}"#)
}

/// The other node of a two-node cluster.
fn other(node: usize) -> usize {
    3 - node
}

fn is_transfer_query(sql: &str) -> bool {
    sql.to_uppercase().starts_with("SHOW TRANSFER STATE")
}

/// A 409 whose reason contains `why`.
fn assert_refused(status: u16, out: &serde_json::Value, why: &str) {
    assert_eq!(status, 409, "{out}");
    assert_eq!(out["outcome"], "recoverable_error", "{out}");
    let reason = out["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(why), "{out}");
}

const RECOVERABLE: &str = "pgferry_conn_migration_error_recoverable_total";
const FATAL: &str = "pgferry_conn_migration_error_fatal_total";
const SUCCESS: &str = "pgferry_conn_migration_success_total";
const STATE_BYTES: &str = "pgferry_conn_migration_state_bytes_count";

// ---- the peer on its own ----

/// tokio-postgres straight to a peer node (password login).
async fn connect_peer(cluster: &CrdbCluster, node: usize) -> tokio_postgres::Client {
    let addr = cluster.node(node).addr;
    let (c, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(addr.port())
        .user(USER)
        .password(PASSWORD)
        .dbname(DB)
        .application_name("direct")
        .connect_timeout(Duration::from_secs(10))
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect to the peer");
    tokio::spawn(conn);
    c
}

/// A raw token login to `node`: the messages up to ReadyForQuery, or up to
/// the ErrorResponse that refused it.
fn token_login(
    cluster: &CrdbCluster,
    node: usize,
    user: &str,
    token: &str,
) -> (TcpStream, Vec<raw::Msg>) {
    let mut s = TcpStream::connect(cluster.node(node).addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(&raw::startup_packet(
        raw::PROTOCOL_3_0,
        &[
            ("user", user),
            ("database", DB),
            ("application_name", "someotherapp"),
            (TOKEN_PARAM, token),
        ],
    ))
    .expect("send startup");
    let mut msgs = Vec::new();
    while let Some(m) = raw::read_msg(&mut s) {
        let end = m.tag == b'Z' || m.tag == b'E';
        msgs.push(m);
        if end {
            break;
        }
    }
    (s, msgs)
}

fn raw_simple(s: &mut TcpStream, sql: &str) -> Vec<raw::Msg> {
    s.write_all(&raw::query(sql)).expect("send query");
    let mut msgs = Vec::new();
    while let Some(m) = raw::read_msg(s) {
        let end = m.tag == b'Z';
        msgs.push(m);
        if end {
            return msgs;
        }
    }
    panic!("connection closed during {sql}: {msgs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_peer_answers_an_error_row_inside_a_transaction() {
    let cluster = peer(1);
    let c = connect_peer(&cluster, 1).await;
    c.batch_execute("BEGIN").await.expect("begin");
    let msgs = c
        .simple_query("SHOW TRANSFER STATE WITH 'in-txn-key'")
        .await
        .expect("an error row, not an ErrorResponse");
    let row = msgs
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("one row");
    let names: Vec<&str> = row.columns().iter().map(|c| c.name()).collect();
    assert_eq!(
        names,
        [
            "error",
            "session_state_base64",
            "session_revival_token_base64",
            "transfer_key"
        ]
    );
    assert_eq!(
        row.get(0),
        Some("cannot serialize a session which is inside a transaction")
    );
    assert_eq!((row.get(1), row.get(2)), (None, None));
    assert_eq!(row.get(3), Some("in-txn-key"));
    assert!(
        msgs.iter()
            .any(|m| matches!(m, SimpleQueryMessage::CommandComplete(1))),
        "{msgs:?}"
    );
    // An observer statement: the transaction is still open (without a key,
    // three columns).
    let again = rows(&c, "SHOW TRANSFER STATE").await;
    assert_eq!(
        again,
        [vec![
            Some("cannot serialize a session which is inside a transaction".to_owned()),
            None,
            None
        ]]
    );
    c.batch_execute("COMMIT").await.expect("commit");
    let after = rows(&c, "SHOW TRANSFER STATE WITH 'k2'").await;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0][0], None, "{after:?}");
    assert!(after[0][1].is_some() && after[0][2].is_some());
    assert_eq!(after[0][3].as_deref(), Some("k2"));
    assert_eq!(cluster.issued_tokens(), [after[0][2].clone().unwrap()]);
}

/// The peer's own round trip, as sqlproxy does it, without pgferry: state
/// and token from n1, token login to n2 (no authentication request),
/// deserialize there; tokens are not one-shot and name their user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_peer_revives_a_session_on_another_node() {
    let cluster = peer(2);
    let c = connect_peer(&cluster, 1).await;
    c.batch_execute("SET timezone = 'Asia/Tokyo'; SET application_name = 'carl'")
        .await
        .expect("set");
    let row = rows(&c, "SHOW TRANSFER STATE").await.remove(0);
    assert_eq!(row[0], None, "{row:?}");
    let (state, token) = (row[1].clone().unwrap(), row[2].clone().unwrap());

    let n2 = cluster.node(2).addr;
    let (mut s, login) = blocking(|| token_login(&cluster, 2, USER, &token));
    assert_eq!(raw::tags(&login), "RSSSSSSSSSSSKZ", "{login:?}");
    assert_eq!(login[0].body, 0u32.to_be_bytes(), "AuthenticationOk");
    let pid = i32::from_be_bytes(login[12].body[0..4].try_into().unwrap());
    assert_eq!(pid >> 20, 2, "BackendKeyData names node 2");
    let reply = raw_simple(
        &mut s,
        &format!("SELECT crdb_internal.deserialize_session(decode('{state}', 'base64'))"),
    );
    assert_eq!(raw::tags(&reply), "TDCZ", "{reply:?}");
    assert_eq!(reply[1].first_column().as_deref(), Some("t"));
    assert_eq!(reply[3].body, b"I");
    let tz = raw_simple(&mut s, "SHOW timezone");
    assert_eq!(tz[1].first_column().as_deref(), Some("Asia/Tokyo"));
    let app = raw_simple(&mut s, "SHOW application_name");
    assert_eq!(app[1].first_column().as_deref(), Some("carl"));

    // Not one-shot; but only for its own user.
    let (_s2, again) = blocking(|| token_login(&cluster, 2, USER, &token));
    assert_eq!(raw::tags(&again).chars().last(), Some('Z'));
    let (_s3, wrong) = blocking(|| token_login(&cluster, 2, "root", &token));
    let e = wrong.last().expect("a reply");
    assert_eq!(e.tag, b'E');
    assert_eq!(e.sqlstate().as_deref(), Some("28000"));
    assert!(
        e.field(b'M')
            .unwrap_or_default()
            .starts_with("invalid session revival token: "),
        "{:?}",
        e.field(b'M')
    );
    let (_s4, bad) = blocking(|| token_login(&cluster, 2, USER, "not base64!"));
    assert_eq!(
        bad.last().and_then(raw::Msg::sqlstate).as_deref(),
        Some("08P01")
    );

    // A cancel on the node that issued the key is matched; on another
    // node it is not.
    let secret = i32::from_be_bytes(login[12].body[4..8].try_into().unwrap());
    blocking(|| raw::send_cancel(n2, pid, secret));
    blocking(|| raw::send_cancel(cluster.node(1).addr, pid, secret));
    let events = blocking(|| {
        cluster.wait_for(Duration::from_secs(10), "two cancels", |e| {
            e.iter()
                .filter(|e| matches!(e, Event::Cancel { .. }))
                .count()
                == 2
        })
    });
    let cancels: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Cancel { .. }))
        .collect();
    assert_eq!(
        cancels,
        [
            &Event::Cancel {
                node: 2,
                matched: true
            },
            &Event::Cancel {
                node: 1,
                matched: false
            }
        ]
    );
    assert_eq!(cluster.logins(2, Login::Token), 2);
    assert_eq!(cluster.logins(2, Login::Password), 0);
}

// ---- pgferry ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_session_with_settings_moves_between_nodes_by_token_login() {
    let cluster = peer(2);
    let proxy = crdb_proxy(&cluster);
    let c = connect_app(&proxy, "mover").await;
    c.batch_execute(
        "SET timezone = 'Asia/Tokyo'; SET search_path = shop, public; SET app.tenant = 'acme'",
    )
    .await
    .expect("settings");
    let from = node_id(&c).await;
    let to = other(from);
    assert_eq!(cluster.logins(from, Login::Password), 1);

    let (status, out) = blocking(|| transfer(&proxy, "mover", &to_body(to)));
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["outcome"], "success", "{out}");
    assert_eq!(out["to"], format!("n{to}"));

    assert_eq!(node_id(&c).await, to, "the session did not move");
    assert_eq!(value(&c, "SHOW timezone").await, "Asia/Tokyo");
    assert_eq!(value(&c, "SHOW search_path").await, "shop, public");
    assert_eq!(value(&c, "SHOW app.tenant").await, "acme");
    assert_eq!(value(&c, "SHOW application_name").await, "mover");

    // The new node saw one token login and no password; the old one the
    // SHOW TRANSFER STATE with a key, the new one the deserialize.
    assert_eq!(cluster.logins(to, Login::Token), 1);
    assert_eq!(cluster.logins(to, Login::Password), 0);
    let asked: Vec<String> = cluster
        .queries_on(from)
        .into_iter()
        .filter(|q| is_transfer_query(q))
        .collect();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(
        asked[0].starts_with("SHOW TRANSFER STATE WITH '"),
        "{asked:?}"
    );
    assert!(cluster
        .queries_on(to)
        .iter()
        .any(|q| q.starts_with("SELECT crdb_internal.deserialize_session(decode('")));
    assert_eq!(cluster.issued_tokens().len(), 1);
    // The old node's connection is closed.
    blocking(|| {
        cluster.wait_for(Duration::from_secs(10), "the old connection closed", |e| {
            e.contains(&Event::Closed { node: from as u32 })
        })
    });
    assert_eq!(cluster.sessions_on(from), 0);
    assert_eq!(cluster.sessions_on(to), 1);

    assert_eq!(proxy.metric(SUCCESS), 1.0);
    assert_eq!(proxy.metric(STATE_BYTES), 1.0);
    let view = proxy.connection_by_app("mover");
    assert_eq!(view["backend"], format!("n{to}"));
    assert_eq!(view["migrations"], 1);

    // And back: a second token, a second move.
    let (status, out) = blocking(|| transfer(&proxy, "mover", &to_body(from)));
    assert_eq!(status, 200, "{out}");
    assert_eq!(node_id(&c).await, from);
    assert_eq!(value(&c, "SHOW app.tenant").await, "acme");
    assert_eq!(cluster.logins(from, Login::Token), 1);
    assert_eq!(proxy.metric(STATE_BYTES), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_error_row_gives_409_with_cockroachs_reason() {
    let cluster = peer(2);
    let proxy = crdb_proxy(&cluster);

    // A temporary table: CockroachDB cannot serialize the session.
    let c = connect_app(&proxy, "temp").await;
    c.batch_execute("SET timezone = 'Europe/Paris'; CREATE TEMP TABLE scratch(v int)")
        .await
        .expect("setup");
    let from = node_id(&c).await;
    let (status, out) = blocking(|| transfer(&proxy, "temp", &to_body(other(from))));
    assert_eq!(status, 409, "{out}");
    assert_eq!(out["outcome"], "recoverable_error", "{out}");
    assert_eq!(
        out["reason"], "cannot serialize session with temporary schemas",
        "{out}"
    );
    // Untouched: same node, still working, settings kept.
    assert_eq!(node_id(&c).await, from);
    assert_eq!(value(&c, "SHOW timezone").await, "Europe/Paris");
    assert_eq!(value(&c, "SELECT 1").await, "1");
    assert_eq!(proxy.metric(RECOVERABLE), 1.0);

    // Refused before any token question: tokens off change nothing.
    cluster.set_revival_enabled(false);
    let (status, out) = blocking(|| transfer(&proxy, "temp", &to_body(other(from))));
    assert_eq!(status, 409, "{out}");
    assert_eq!(
        out["reason"], "cannot serialize session with temporary schemas",
        "{out}"
    );
    assert_eq!(node_id(&c).await, from);
    assert_eq!(proxy.metric(RECOVERABLE), 2.0);

    // Nobody logged in with a token anywhere; no token was issued.
    assert_eq!(
        cluster.logins(1, Login::Token) + cluster.logins(2, Login::Token),
        0
    );
    assert!(cluster.issued_tokens().is_empty());
    assert_eq!(proxy.metric(STATE_BYTES), 0.0);
    assert_eq!(proxy.metric(SUCCESS), 0.0);
}

/// Draining a node moves its sessions, each with its own settings, to the
/// other nodes by token logins; one CockroachDB cannot serialize (a
/// temporary table) stays, untouched, and the report says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_drain_moves_a_nodes_sessions_and_leaves_the_unmovable_one() {
    let cluster = peer(3);
    let proxy = crdb_proxy(&cluster);
    let mut on_n1 = Vec::new();
    let mut others = Vec::new();
    for i in 0..6 {
        let (c, node) =
            session_with_timezone(&proxy, &format!("d{i}"), &format!("Etc/GMT+{i}")).await;
        if node == 1 {
            on_n1.push((i, c));
        } else {
            others.push(c);
        }
    }
    // Least connections: two sessions per node.
    assert_eq!(on_n1.len(), 2, "sessions per node: {:?}", proxy.backends());
    let (stuck, _) = &on_n1[0];
    on_n1[0]
        .1
        .batch_execute("CREATE TEMP TABLE scratch(v int)")
        .await
        .expect("temp table");
    let (status, report) = blocking(|| {
        admin_json(
            proxy.admin,
            "POST",
            "/v1/backends/n1/drain",
            r#"{"timeout_ms": 3000}"#,
        )
    });
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["moved"], 1, "{report}");
    assert_eq!(report["remaining"], 1, "{report}");
    let failure = report["failures"][0]["reason"].as_str().unwrap_or_default();
    assert_eq!(
        failure, "cannot serialize session with temporary schemas",
        "{report}"
    );
    for (i, c) in &on_n1 {
        let node = node_id(c).await;
        if i == stuck {
            assert_eq!(node, 1, "the session with a temporary table moved");
        } else {
            assert_ne!(node, 1, "d{i} is still on n1");
            assert_eq!(cluster.logins(node, Login::Token), 1);
        }
        assert_eq!(value(c, "SHOW timezone").await, format!("Etc/GMT+{i}"));
    }
    // The other nodes' sessions were not asked.
    for c in &others {
        assert_ne!(node_id(c).await, 1);
    }
    assert_eq!(cluster.issued_tokens().len(), 1);
    assert_eq!(proxy.backends()["n1"]["state"], "draining");
}

/// A node that serializes the session but issues no token (the system
/// tenant of every self-hosted cluster, or the setting off): the state is
/// taken with `serialize_session()` and the target logged in to with the
/// client's password, as for a new session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_without_revival_tokens_a_session_moves_with_a_password_login() {
    let cluster = peer(2);
    cluster.set_revival_enabled(false);
    let proxy = crdb_proxy(&cluster);
    let c = connect_app(&proxy, "tokenless").await;
    c.batch_execute("SET timezone = 'Africa/Nairobi'; SET app.tenant = 'zeta'")
        .await
        .expect("settings");
    let from = node_id(&c).await;
    let to = other(from);
    let (status, out) = blocking(|| transfer(&proxy, "tokenless", &to_body(to)));
    assert_eq!(status, 200, "{out}");
    assert_eq!(node_id(&c).await, to, "the session did not move");
    assert_eq!(value(&c, "SHOW timezone").await, "Africa/Nairobi");
    assert_eq!(value(&c, "SHOW app.tenant").await, "zeta");
    assert_eq!(value(&c, "SHOW application_name").await, "tokenless");
    // Asked for the transfer state first, then for the state alone.
    let asked = cluster.queries_on(from);
    let show = asked.iter().position(|q| is_transfer_query(q));
    let serialize = asked
        .iter()
        .position(|q| q.contains("crdb_internal.serialize_session()"));
    assert!(
        matches!((show, serialize), (Some(a), Some(b)) if a < b),
        "{asked:?}"
    );
    assert_eq!(cluster.logins(to, Login::Password), 1);
    assert_eq!(cluster.logins(to, Login::Token), 0);
    assert!(cluster.issued_tokens().is_empty());
    assert_eq!(proxy.metric(SUCCESS), 1.0);
    assert_eq!(proxy.metric(STATE_BYTES), 1.0);
}

/// CockroachDB issues no token for root; root's session moves with its
/// password, as above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_root_session_moves_with_a_password_login() {
    let cluster = peer(2);
    let proxy = ProxyProcess::start(ProxyOptions {
        backend_dialect: Some("cockroachdb".into()),
        userlist: Some(format!(
            "\"{USER}\" \"{PASSWORD}\"\n\"root\" \"{ROOT_PASSWORD}\"\n"
        )),
        ..ProxyOptions::bare(cluster.backends())
    });
    let c = connect_as(&proxy, "root", ROOT_PASSWORD, "rooted").await;
    c.batch_execute("SET timezone = 'Europe/Oslo'")
        .await
        .expect("set");
    let from = node_id(&c).await;
    let (status, out) = blocking(|| transfer(&proxy, "rooted", &to_body(other(from))));
    assert_eq!(status, 200, "{out}");
    assert_eq!(node_id(&c).await, other(from));
    assert_eq!(value(&c, "SHOW timezone").await, "Europe/Oslo");
    assert_eq!(cluster.logins(other(from), Login::Token), 0);
    assert_eq!(cluster.logins(other(from), Login::Password), 1);
    assert!(cluster.issued_tokens().is_empty());
    assert_eq!(proxy.metric(SUCCESS), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_move_asked_in_a_transaction_happens_after_commit() {
    let cluster = peer(2);
    let proxy = crdb_proxy(&cluster);
    let c = connect_app(&proxy, "txn").await;
    let from = node_id(&c).await;
    let to = other(from);
    c.batch_execute("BEGIN; SET app.step = 'one'")
        .await
        .expect("begin");
    let id = proxy.connection_by_app("txn")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let admin = proxy.admin;
    let body = format!(r#"{{"to": "n{to}", "timeout_ms": 20000}}"#);
    let pending = std::thread::spawn(move || {
        admin_json(
            admin,
            "POST",
            &format!("/v1/connections/{id}/transfer"),
            &body,
        )
    });
    blocking(|| {
        wait_until(Duration::from_secs(10), "state transferring", || {
            has_session_in_state(admin, "txn", "transferring")
        })
    });
    // Held: still on the old node, and pgferry has not asked it anything.
    assert_eq!(node_id(&c).await, from, "moved inside a transaction");
    c.batch_execute("SET app.step = 'two'; COMMIT")
        .await
        .expect("commit");
    let (status, out) = blocking(|| pending.join().expect("join"));
    assert_eq!(status, 200, "{out}");
    assert_eq!(node_id(&c).await, to);
    assert_eq!(value(&c, "SHOW app.step").await, "two");

    // On the old node: the COMMIT came before the only SHOW TRANSFER STATE.
    let on_from = cluster.queries_on(from);
    let commit = on_from
        .iter()
        .position(|q| q.contains("COMMIT"))
        .expect("the COMMIT");
    let asked: Vec<usize> = on_from
        .iter()
        .enumerate()
        .filter(|(_, q)| is_transfer_query(q))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(asked.len(), 1, "{on_from:?}");
    assert!(
        asked[0] > commit,
        "asked inside the transaction: {on_from:?}"
    );
    assert_eq!(proxy.metric(RECOVERABLE), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_dial_failure_is_recoverable() {
    let cluster = peer(1);
    let dead = RefusedPort::reserve();
    let mut backends = cluster.backends();
    backends.push(("dead".into(), dead.addr.to_string()));
    let proxy = ProxyProcess::start(ProxyOptions {
        backend_dialect: Some("cockroachdb".into()),
        ..ProxyOptions::bare(backends)
    });
    let c = connect_app(&proxy, "to-dead").await;
    assert_eq!(node_id(&c).await, 1);
    c.batch_execute("SET timezone = 'America/Lima'")
        .await
        .expect("set");
    let (status, out) = blocking(|| transfer(&proxy, "to-dead", r#"{"to": "dead"}"#));
    assert_refused(status, &out, "could not connect to dead");
    // The state was asked for (the dial needs the token), then the move
    // given up; the session is as it was.
    assert_eq!(cluster.issued_tokens().len(), 1);
    assert_eq!(node_id(&c).await, 1);
    assert_eq!(value(&c, "SHOW timezone").await, "America/Lima");
    assert_eq!(proxy.metric(RECOVERABLE), 1.0);
    assert_eq!(proxy.metric(FATAL), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_refused_token_is_recoverable() {
    let cluster = peer(2);
    let proxy = crdb_proxy(&cluster);
    let (c, from) = session_with_timezone(&proxy, "refused", "Africa/Nairobi").await;
    let to = other(from);
    cluster.set_fault(to, Fault::RefuseTokens);
    let (status, out) = blocking(|| transfer(&proxy, "refused", &to_body(to)));
    assert_refused(status, &out, "invalid session revival token");
    assert_eq!(node_id(&c).await, from);
    assert_eq!(value(&c, "SHOW timezone").await, "Africa/Nairobi");
    assert_eq!(cluster.logins(to, Login::Token), 0);
    assert_eq!(cluster.sessions_on(to), 0);
    assert_eq!(proxy.metric(RECOVERABLE), 1.0);

    // Once the node takes tokens again, the same session moves.
    cluster.set_fault(to, Fault::None);
    let (status, out) = blocking(|| transfer(&proxy, "refused", &to_body(to)));
    assert_eq!(status, 200, "{out}");
    assert_eq!(node_id(&c).await, to);
    assert_eq!(value(&c, "SHOW timezone").await, "Africa/Nairobi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_deserialize_failure_is_recoverable() {
    let cluster = peer(2);
    let proxy = crdb_proxy(&cluster);
    let (c, from) = session_with_timezone(&proxy, "undeserializable", "Asia/Kolkata").await;
    let to = other(from);
    cluster.set_fault(to, Fault::FailDeserialize);
    let (status, out) = blocking(|| transfer(&proxy, "undeserializable", &to_body(to)));
    assert_refused(status, &out, "error deserializing session");
    // The new node had the token login, then pgferry dropped it.
    assert_eq!(cluster.logins(to, Login::Token), 1);
    blocking(|| {
        cluster.wait_for(
            Duration::from_secs(10),
            "the new node's connection closed",
            |e| e.contains(&Event::Closed { node: to as u32 }),
        )
    });
    assert_eq!(cluster.sessions_on(to), 0);
    assert_eq!(node_id(&c).await, from);
    assert_eq!(value(&c, "SHOW timezone").await, "Asia/Kolkata");
    assert_eq!(proxy.metric(RECOVERABLE), 1.0);
    assert_eq!(proxy.metric(SUCCESS), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_old_node_dropping_mid_transfer_gives_08006() {
    let cluster = peer(2);
    let proxy = crdb_proxy(&cluster);
    let (client, conn) = watched_session(&proxy, "dropped").await;
    let from = node_id(&client).await;
    let to = other(from);
    cluster.set_fault(from, Fault::DropInTransferState);
    let (status, out) = blocking(|| transfer(&proxy, "dropped", &to_body(to)));
    assert_eq!(status, 500, "{out}");
    assert_eq!(out["outcome"], "fatal_error", "{out}");
    assert_eq!(ended_with(&client, conn).await.as_deref(), Some("08006"));
    assert_eq!(proxy.metric(FATAL), 1.0);
    assert_eq!(proxy.metric(RECOVERABLE), 0.0);
    assert_eq!(cluster.logins(to, Login::Token), 0);
    // Everyone else is still served.
    cluster.set_fault(from, Fault::None);
    let other_client = connect_app(&proxy, "bystander").await;
    assert_eq!(value(&other_client, "SELECT 1").await, "1");
}

/// A node that closes without a word as the transfer starts has ended the
/// session (as for PostgreSQL: 410, not a pgferry failure); the client
/// gets 08006, as from any backend that goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_old_node_closing_before_it_answers_ends_the_session() {
    let cluster = peer(2);
    let proxy = crdb_proxy(&cluster);
    let (client, conn) = watched_session(&proxy, "closed").await;
    let from = node_id(&client).await;
    cluster.set_fault(from, Fault::CloseOnTransferState);
    let (status, out) = blocking(|| transfer(&proxy, "closed", &to_body(other(from))));
    assert_eq!(status, 410, "{out}");
    assert_eq!(out["outcome"], "session_ended", "{out}");
    assert_eq!(ended_with(&client, conn).await.as_deref(), Some("08006"));
    assert_eq!(proxy.metric(FATAL), 0.0);
    assert_eq!(
        proxy.metric("pgferry_conn_migration_session_ended_total"),
        1.0
    );
    assert_eq!(cluster.logins(other(from), Login::Token), 0);
}

/// An answer later than `capture_timeout` abandons the move (409) but is
/// still read to its end by pgferry, so it never reaches the client out of
/// turn: the session stays where it was, in step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_late_transfer_state_keeps_the_session_in_step() {
    let cluster = peer(2);
    let proxy = ProxyProcess::start(ProxyOptions {
        backend_dialect: Some("cockroachdb".into()),
        migration_extra: "capture_timeout = \"300ms\"".into(),
        ..ProxyOptions::bare(cluster.backends())
    });
    let (c, from) = session_with_timezone(&proxy, "late", "America/Lima").await;
    cluster.set_fault(from, Fault::SlowTransferState(Duration::from_millis(1500)));
    let (status, out) = blocking(|| transfer(&proxy, "late", &to_body(other(from))));
    assert_refused(status, &out, "later than capture_timeout");
    // The next answers are the client's own, from the same node.
    assert_eq!(value(&c, "SELECT 1").await, "1");
    assert_eq!(node_id(&c).await, from);
    assert_eq!(value(&c, "SHOW timezone").await, "America/Lima");
    assert_eq!(cluster.logins(other(from), Login::Token), 0);
    assert_eq!(proxy.metric(RECOVERABLE), 1.0);
    assert_eq!(proxy.metric(SUCCESS), 0.0);
    // Asked again once the node is quick: it moves.
    cluster.set_fault(from, Fault::None);
    let (status, out) = blocking(|| transfer(&proxy, "late", &to_body(other(from))));
    assert_eq!(status, 200, "{out}");
    assert_eq!(node_id(&c).await, other(from));
    assert_eq!(value(&c, "SHOW timezone").await, "America/Lima");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_cancel_after_move_reaches_the_new_node() {
    let cluster = peer(2);
    let proxy = crdb_proxy(&cluster);
    let c = connect_app(&proxy, "cancelled").await;
    let from = node_id(&c).await;
    let to = other(from);
    let (status, out) = blocking(|| transfer(&proxy, "cancelled", &to_body(to)));
    assert_eq!(status, 200, "{out}");
    assert_eq!(node_id(&c).await, to);

    let token = c.cancel_token();
    let sleeper = tokio::spawn(async move {
        let r = c.simple_query("SELECT pg_sleep(30)").await.map(|_| ());
        (r, c)
    });
    blocking(|| {
        cluster.wait_for(Duration::from_secs(10), "pg_sleep on the new node", |e| {
            e.iter().any(|e| {
                matches!(e, Event::Query { node, sql } if *node as usize == to && sql.contains("pg_sleep"))
            })
        })
    });
    let sent = Instant::now();
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel");
    let (result, _c) = sleeper.await.expect("join");
    let e = result.expect_err("not cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
    assert!(sent.elapsed() < Duration::from_secs(10));
    let cancels: Vec<Event> = cluster
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::Cancel { .. }))
        .collect();
    assert_eq!(
        cancels,
        [Event::Cancel {
            node: to as u32,
            matched: true
        }]
    );
}

/// Every token the peer issued, moved or refused, is absent from the log
/// (pgferry_proxy at debug, as the harness starts it), in both formats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_revival_token_never_logged() {
    for format in ["text", "json"] {
        let cluster = peer(2);
        let proxy = ProxyProcess::start(ProxyOptions {
            backend_dialect: Some("cockroachdb".into()),
            extra_sections: format!("[log]\nformat = \"{format}\"\n"),
            ..ProxyOptions::bare(cluster.backends())
        });
        let c = connect_app(&proxy, "secretive").await;
        let first = node_id(&c).await;
        // A move, a move back, then one the new node refuses and one it
        // fails to deserialize (error paths are where a credential would
        // slip into a message).
        for (to, fault, code) in [
            (other(first), Fault::None, 200),
            (first, Fault::None, 200),
            (other(first), Fault::RefuseTokens, 409),
            (other(first), Fault::FailDeserialize, 409),
        ] {
            cluster.set_fault(to, fault);
            let (status, out) = blocking(|| transfer(&proxy, "secretive", &to_body(to)));
            assert_eq!(status, code, "{format}: {out}");
            cluster.set_fault(to, Fault::None);
        }
        assert_eq!(node_id(&c).await, first);
        drop(c);
        blocking(|| {
            wait_until(Duration::from_secs(10), "the migration lines", || {
                proxy.log().matches("migration finished").count() >= 4
            })
        });
        let tokens = cluster.issued_tokens();
        assert_eq!(tokens.len(), 4, "{format}");
        let log = proxy.log();
        assert!(
            log.contains("DEBUG") || log.contains("\"level\":\"DEBUG\""),
            "{format}: pgferry is not logging at debug:\n{log}"
        );
        for t in &tokens {
            assert!(
                !log.contains(t.as_str()),
                "{format}: a revival token in the log:\n{log}"
            );
            // Nor a recognisable piece of it.
            assert!(
                !log.contains(&t[..16]),
                "{format}: part of a token in the log"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_startup_with_a_revival_token_is_refused() {
    let cluster = peer(1);
    let proxy = crdb_proxy(&cluster);
    // A real token, so that a pgferry passing it on would log in with it.
    let direct = connect_peer(&cluster, 1).await;
    let token = rows(&direct, "SHOW TRANSFER STATE").await[0][2]
        .clone()
        .expect("a token");
    drop(direct);
    for (param, value) in [
        (TOKEN_PARAM, token.as_str()),
        ("crdb:remote_addr", "10.0.0.1:5432"),
    ] {
        let msgs = blocking(|| {
            let mut s = TcpStream::connect(proxy.addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            s.write_all(&raw::startup_packet(
                raw::PROTOCOL_3_0,
                &[("user", USER), ("database", DB), (param, value)],
            ))
            .expect("startup");
            let mut msgs = Vec::new();
            while let Some(m) = raw::read_msg(&mut s) {
                msgs.push(m);
            }
            msgs
        });
        let first = msgs.first().unwrap_or_else(|| panic!("{param}: no answer"));
        assert_eq!(first.tag, b'E', "{param}: {msgs:?}");
        assert_eq!(first.field(b'S').as_deref(), Some("FATAL"));
        assert_eq!(first.sqlstate().as_deref(), Some("08P01"), "{param}");
        assert_eq!(
            first.field(b'M'),
            Some(format!("parameter {param} is not allowed"))
        );
        assert_eq!(msgs.len(), 1, "{param}: {msgs:?}");
    }
    // Only the direct password login ever reached the node.
    assert_eq!(cluster.logins(1, Login::Token), 0);
    assert_eq!(cluster.logins(1, Login::Password), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_dialect_detected_at_login() {
    let cluster = peer(3);
    let proxy = ProxyProcess::start(ProxyOptions {
        // n1 and n2 auto; n3 said to be CockroachDB.
        backend_dialects: vec![("n3".into(), "cockroachdb".into())],
        ..ProxyOptions::bare(cluster.backends())
    });
    let dialects = |p: &ProxyProcess| -> Vec<String> {
        let b = p.backends();
        ["n1", "n2", "n3"]
            .iter()
            .map(|n| b[*n]["dialect"].as_str().unwrap_or("missing").to_owned())
            .collect()
    };
    assert_eq!(dialects(&proxy), ["unknown", "unknown", "cockroachdb"]);
    let c = connect_app(&proxy, "detect").await;
    let on = node_id(&c).await;
    let expected: Vec<&str> = (1..=3)
        .map(|n| {
            if n == on || n == 3 {
                "cockroachdb"
            } else {
                "unknown"
            }
        })
        .collect();
    blocking(|| {
        wait_until(Duration::from_secs(10), "the dialect detected", || {
            dialects(&proxy) == expected
        })
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crdb_move_to_a_postgres_backend_is_refused() {
    let cluster = peer(2);
    // n2 is set to postgres: the setting wins over what its login says.
    let proxy = ProxyProcess::start(ProxyOptions {
        backend_dialect: Some("cockroachdb".into()),
        backend_dialects: vec![("n2".into(), "postgres".into())],
        ..ProxyOptions::bare(cluster.backends())
    });
    let b = proxy.backends();
    assert_eq!(b["n1"]["dialect"], "cockroachdb");
    assert_eq!(b["n2"]["dialect"], "postgres");
    let c = connect_app(&proxy, "crossing").await;
    let from = node_id(&c).await;
    let to = other(from);
    let (status, out) = blocking(|| transfer(&proxy, "crossing", &to_body(to)));
    assert_eq!(status, 409, "{out}");
    assert_eq!(out["outcome"], "recoverable_error", "{out}");
    let reason = out["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("postgres") && reason.contains("cockroachdb"),
        "{out}"
    );
    // Refused before anything was asked of either node.
    assert_eq!(node_id(&c).await, from);
    assert!(
        !cluster
            .queries_on(from)
            .iter()
            .any(|q| is_transfer_query(q) || q.contains("pg_catalog")),
        "{:?}",
        cluster.queries_on(from)
    );
    assert_eq!(cluster.logins(to, Login::Token), 0);
    assert_eq!(cluster.logins(to, Login::Password), 0);
    assert_eq!(proxy.metric(RECOVERABLE), 1.0);
}

// ---- a real CockroachDB, when there is one ----

/// Two real nodes (`cockroach start --insecure`, joined, `cockroach
/// init`), killed on drop.
struct RealCockroach {
    nodes: Vec<std::process::Child>,
    sql: Vec<std::net::SocketAddr>,
    _dir: tempfile::TempDir,
}

impl Drop for RealCockroach {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let _ = n.kill();
            let _ = n.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}

fn start_real_cockroach(bin: &std::path::Path) -> Result<RealCockroach, String> {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let rpc: Vec<u16> = (0..2).map(|_| free_port()).collect();
    let join = rpc
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut real = RealCockroach {
        nodes: Vec::new(),
        sql: Vec::new(),
        _dir: dir,
    };
    for (i, port) in rpc.iter().enumerate() {
        let sql = free_port();
        let child = Command::new(bin)
            .arg("start")
            .arg("--insecure")
            .arg(format!(
                "--store={}",
                real._dir.path().join(format!("n{i}")).display()
            ))
            .arg(format!("--listen-addr=127.0.0.1:{port}"))
            .arg(format!("--sql-addr=127.0.0.1:{sql}"))
            .arg(format!("--http-addr=127.0.0.1:{}", free_port()))
            .arg(format!("--join={join}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cockroach start: {e}"))?;
        real.nodes.push(child);
        real.sql.push(([127, 0, 0, 1], sql).into());
    }
    let init = Command::new(bin)
        .args(["init", "--insecure"])
        .arg(format!("--host=127.0.0.1:{}", rpc[0]))
        .output()
        .map_err(|e| format!("cockroach init: {e}"))?;
    if !init.status.success() {
        return Err(format!("cockroach init: {}", stderr(&init)));
    }
    // The system tenant issues no revival tokens whatever the setting:
    // the move takes the password path (serialize_session, a login).
    let setup = "CREATE USER IF NOT EXISTS app; CREATE DATABASE IF NOT EXISTS app; \
                 GRANT ALL ON DATABASE app TO app";
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(bin)
            .args(["sql", "--insecure", "-e", setup])
            .arg(format!("--host={}", real.sql[0]))
            .output()
            .map_err(|e| format!("cockroach sql: {e}"))?;
        if out.status.success() {
            return Ok(real);
        }
        if Instant::now() > deadline {
            return Err(format!("cluster setup: {}", stderr(&out)));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cockroach_session_moves_between_two_nodes() {
    let Some(bin) = which("cockroach") else {
        eprintln!("skipped: no cockroach binary on PATH (the scripted peer covers the dialect)");
        return;
    };
    let real = blocking(|| start_real_cockroach(&bin)).expect("start two CockroachDB nodes");
    // Insecure nodes trust every login; pgferry's password is not asked.
    let backends = vec![
        ("n1".to_owned(), real.sql[0].to_string()),
        ("n2".to_owned(), real.sql[1].to_string()),
    ];
    let proxy = ProxyProcess::start(ProxyOptions::bare(backends));
    let c = connect_app(&proxy, "real").await;
    c.batch_execute("SET timezone = 'Asia/Tokyo'; SET application_name = 'real'")
        .await
        .expect("settings");
    let before = node_id(&c).await;
    // Which backend name is which node id is up to the cluster.
    let on = proxy.connection_by_app("real")["backend"]
        .as_str()
        .expect("backend")
        .to_owned();
    let to = if on == "n1" { "n2" } else { "n1" };
    let body = format!(r#"{{"to": "{to}"}}"#);
    let (status, out) = blocking(|| transfer(&proxy, "real", &body));
    assert_eq!(status, 200, "{out}");
    assert_ne!(node_id(&c).await, before, "the session did not move");
    assert_eq!(value(&c, "SHOW timezone").await, "Asia/Tokyo");
    assert_eq!(proxy.backends()["n1"]["dialect"], "cockroachdb");
}
