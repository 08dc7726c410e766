//! `[log] format = "json"`: pgferry's lines are JSON objects, and every
//! line about a session names the session, its user, its database and its
//! backend (after a move, the new one).

use std::time::Duration;

mod common;

use common::{connect, wait_until, ProxyOptions, ProxyProcess, DB, PASSWORD, USER};

fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The `session` span's fields on a line, if it has one.
fn session_of(line: &serde_json::Value) -> Option<&serde_json::Value> {
    line["spans"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == "session")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_the_session_its_user_database_and_backend() {
    let proxy = ProxyProcess::start(ProxyOptions {
        extra_sections: "[log]\nformat = \"json\"\n".into(),
        ..ProxyOptions::default()
    });
    let (client, _conn) = connect(&proxy, USER, PASSWORD).await.expect("login");
    client.simple_query("SELECT 1").await.expect("query");
    let (_, list) = common::admin_json(proxy.admin, "GET", "/v1/connections", "");
    let id = list[0]["id"].as_str().expect("id").to_owned();
    let (code, moved) = common::admin_json(
        proxy.admin,
        "POST",
        &format!("/v1/connections/{id}/transfer"),
        "",
    );
    assert_eq!(code, 200, "{moved}");
    let to = moved["to"].as_str().unwrap().to_owned();
    client
        .simple_query("SELECT 1")
        .await
        .expect("after the move");
    drop(client);
    wait_until(Duration::from_secs(10), "the migration line", || {
        proxy.log().contains("migration finished")
    });

    let lines = json_lines(&proxy.log());
    assert!(!lines.is_empty(), "no JSON lines in:\n{}", proxy.log());
    // Every line is JSON (startup lines included).
    let text_lines = proxy
        .log()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('{'))
        .count();
    assert_eq!(text_lines, 0, "{}", proxy.log());
    let migration = lines
        .iter()
        .find(|l| l["fields"]["message"] == "migration finished")
        .expect("a migration line");
    let s = session_of(migration).expect("the session span on the migration line");
    assert_eq!(s["id"], id.as_str());
    assert_eq!(s["user"], USER);
    assert_eq!(s["database"], DB);
    // Recorded by the move: the backend it is on now.
    assert_eq!(s["backend"], to.as_str(), "{migration}");
}
