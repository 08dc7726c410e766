//! Backends for orchestrators: drain under load, add + rebalance, health
//! checks against a stopped server, config reload on SIGHUP, forced
//! removal. Real clusters throughout; the ones a test stops are its own.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use pgferry_pgcluster::StopMode;

fn json_post(proxy: &ProxyProcess, path: &str, body: &str) -> (u16, serde_json::Value) {
    admin_json(proxy.admin, "POST", path, body)
}

fn count(list: &[String], backend: &str) -> usize {
    list.iter().filter(|b| *b == backend).count()
}

#[test]
fn drain_under_pgbench_load_moves_every_session_and_the_backend_can_stop() {
    let e = env();
    let mut d1 = own_cluster("drain1");
    // The same pgbench tables on both backends, as on a replicated pair.
    for port in [d1.port(), e.pg2.port()] {
        pgbench(port, &["-i", "-s", "1", "-q"]);
    }
    let proxy = ProxyProcess::start(ProxyOptions {
        backends: vec![
            ("pg1".into(), d1.addr().to_string()),
            ("pg2".into(), e.pg2.addr().to_string()),
        ],
        ..Default::default()
    });
    let port = proxy.port();
    let bench = std::thread::spawn(move || {
        pgbench(
            port,
            &["-c", "32", "-j", "2", "-T", "20", "-M", "prepared", "-n"],
        )
    });
    wait_until(Duration::from_secs(20), "32 pgbench sessions", || {
        sessions_of(proxy.admin, "pgbench").len() == 32
    });
    let on_pg1 = count(&backends_of_sessions(proxy.admin), "pg1");
    assert!(
        on_pg1 >= 8,
        "least connections should give pg1 about half: {on_pg1}"
    );

    let (status, report) = json_post(&proxy, "/v1/backends/pg1/drain", r#"{"timeout_ms": 30000}"#);
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["remaining"], 0, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert!(
        report["moved"].as_u64().unwrap_or(0) >= on_pg1 as u64,
        "{report}"
    );
    assert_eq!(count(&backends_of_sessions(proxy.admin), "pg1"), 0);
    let pg1 = &proxy.backends()["pg1"];
    assert_eq!(pg1["state"], "drained", "{pg1}");
    assert_eq!(pg1["sessions"], 0, "{pg1}");
    assert_eq!(
        proxy.metric("pgferry_drain_in_progress{backend=\"pg1\"}"),
        0.0
    );
    assert_eq!(
        proxy.metric("pgferry_backend_sessions{backend=\"pg1\"}"),
        0.0
    );
    // The old server connections end right after each swap.
    wait_until(Duration::from_secs(10), "no client sessions on pg1", || {
        app_sessions_on(&d1) == 0
    });

    // Stopping the drained server changes nothing for the clients.
    d1.stop(StopMode::Fast).expect("stop pg1");
    let out = bench.join().expect("pgbench thread");
    assert_eq!(
        number_after(&out, "number of failed transactions:"),
        0.0,
        "{out}"
    );
    assert!(
        number_after(&out, "number of transactions actually processed:") > 0.0,
        "{out}"
    );
    assert_eq!(count(&backends_of_sessions(proxy.admin), "pg1"), 0);
}

#[tokio::test]
async fn a_backend_added_through_the_api_gets_sessions_after_rebalance() {
    let pg3 = tokio::task::spawn_blocking(|| own_cluster("rebal3"))
        .await
        .expect("join");
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(connect(&proxy, USER, PASSWORD).await.expect("connect"));
    }
    let admin = proxy.admin;
    let body = format!(r#"{{"name": "pg3", "address": "{}"}}"#, pg3.addr());
    let (status, added) = admin_json(admin, "POST", "/v1/backends", &body);
    assert_eq!(status, 201, "{added}");
    assert_eq!(added["state"], "active");
    assert_eq!(added["sessions"], 0);
    let (status, dup) = admin_json(admin, "POST", "/v1/backends", &body);
    assert_eq!(status, 409, "{dup}");
    let (status, bad) = admin_json(
        admin,
        "POST",
        "/v1/backends",
        r#"{"name": "x", "address": "nope"}"#,
    );
    assert_eq!(status, 400, "{bad}");

    let (status, report) =
        tokio::task::spawn_blocking(move || admin_json(admin, "POST", "/v1/rebalance", ""))
            .await
            .expect("join");
    assert_eq!(status, 200, "{report}");
    assert!(report["moved"].as_u64().unwrap_or(0) > 0, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    let moves = report["moves"].as_array().expect("moves");
    assert!(
        moves
            .iter()
            .all(|m| m["to"] == "pg3" && m["outcome"] == "success"),
        "{report}"
    );

    let counts: Vec<f64> = proxy
        .backends()
        .values()
        .map(|b| b["sessions"].as_f64().expect("sessions"))
        .collect();
    assert_eq!(counts.len(), 3);
    let mean = counts.iter().sum::<f64>() / 3.0;
    let band = (0.15 * mean).max(1.0);
    assert!(
        counts.iter().all(|c| (c - mean).abs() <= band),
        "{counts:?}"
    );
    let on_pg3 = count(&backends_of_sessions(admin), "pg3");
    assert!(on_pg3 >= 5, "{on_pg3}");
    wait_until(
        Duration::from_secs(10),
        "pg3's sessions in pg_stat_activity",
        || app_sessions_on(&pg3) == on_pg3,
    );
    // Every client still works, wherever it is now.
    for (c, _) in &clients {
        let v: i32 = c
            .query_one("SELECT 41 + 1", &[])
            .await
            .expect("query")
            .get(0);
        assert_eq!(v, 42);
    }
    // Balanced now: a second call moves nothing.
    let (_, again) =
        tokio::task::spawn_blocking(move || admin_json(admin, "POST", "/v1/rebalance", ""))
            .await
            .expect("join");
    assert_eq!(again["moves"].as_array().map(Vec::len), Some(0), "{again}");
    assert!(proxy.metric("pgferry_rebalance_moves_total") >= on_pg3 as f64);
}

#[tokio::test]
async fn a_stopped_backend_turns_unhealthy_gets_no_sessions_and_comes_back() {
    let mut h1 = tokio::task::spawn_blocking(|| own_cluster("health1"))
        .await
        .expect("join");
    let e = env();
    // Default health settings: every 5 s, unhealthy after 3 failures.
    let proxy = ProxyProcess::start(ProxyOptions {
        backends: vec![
            ("pg1".into(), h1.addr().to_string()),
            ("pg2".into(), e.pg2.addr().to_string()),
        ],
        ..Default::default()
    });
    assert_eq!(proxy.backends()["pg1"]["state"], "active");
    assert_eq!(proxy.metric("pgferry_backend_up{backend=\"pg1\"}"), 1.0);

    let stopped_at = Instant::now();
    let mut h1 = tokio::task::spawn_blocking(move || {
        h1.stop(StopMode::Immediate).expect("stop");
        h1
    })
    .await
    .expect("join");
    let admin = proxy.admin;
    let state_of = move |name: &str| {
        let (_, list) = admin_json(admin, "GET", "/v1/backends", "");
        list.as_array()
            .into_iter()
            .flatten()
            .find(|b| b["name"] == name)
            .map(|b| {
                (
                    b["state"].as_str().unwrap_or("").to_owned(),
                    b["healthy"].as_bool(),
                )
            })
    };
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(20), "pg1 unhealthy", || {
            state_of("pg1") == Some(("unhealthy".into(), Some(false)))
        })
    })
    .await
    .expect("join");
    assert!(stopped_at.elapsed() <= Duration::from_secs(20));
    assert_eq!(proxy.metric("pgferry_backend_up{backend=\"pg1\"}"), 0.0);
    assert!(
        proxy.log().contains("backend is unhealthy"),
        "{}",
        proxy.log()
    );

    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(connect(&proxy, USER, PASSWORD).await.expect("connect"));
    }
    let on = backends_of_sessions(proxy.admin);
    assert_eq!(count(&on, "pg2"), 6, "{on:?}");

    let h1 = tokio::task::spawn_blocking(move || {
        h1.restart().expect("start again");
        h1
    })
    .await
    .expect("join");
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(30), "pg1 active again", || {
            state_of("pg1") == Some(("active".into(), Some(true)))
        })
    })
    .await
    .expect("join");
    assert_eq!(proxy.metric("pgferry_backend_up{backend=\"pg1\"}"), 1.0);
    // The emptier backend takes the next session.
    clients.push(connect(&proxy, USER, PASSWORD).await.expect("connect"));
    assert_eq!(count(&backends_of_sessions(proxy.admin), "pg1"), 1);
    drop(h1);
}

#[tokio::test]
async fn sighup_removing_a_backend_drains_it_rereads_the_userlist_and_an_invalid_file_changes_nothing(
) {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    // ptuser is in the userlist now...
    let (pt, _) = connect(&proxy, PT_USER, PT_PASSWORD).await.expect("ptuser");
    drop(pt);
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(connect(&proxy, USER, PASSWORD).await.expect("connect"));
    }
    assert_eq!(count(&backends_of_sessions(proxy.admin), "pg2"), 3);
    let path = proxy.config_path();
    let original = std::fs::read_to_string(&path).expect("config");
    let pg2_block = format!(
        "[[backend]]\nname = \"pg2\"\naddress = \"{}\"\n",
        env().pg2.addr()
    );
    assert!(original.contains(&pg2_block));
    std::fs::write(&path, original.replace(&pg2_block, "")).expect("write");
    // ... and not after the reload.
    let users = proxy.dir.path().join("users.txt");
    let userlist = std::fs::read_to_string(&users).expect("userlist");
    let without_pt: String = userlist
        .lines()
        .filter(|l| !l.starts_with(&format!("\"{PT_USER}\"")))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without_pt, userlist);
    std::fs::write(&users, &without_pt).expect("write userlist");
    proxy.signal(Signal::SIGHUP);
    let admin = proxy.admin;
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(30), "pg2 drained and removed", || {
            let (_, list) = admin_json(admin, "GET", "/v1/backends", "");
            list.as_array()
                .is_some_and(|l| l.len() == 1 && l[0]["name"] == "pg1")
        })
    })
    .await
    .expect("join");
    assert_eq!(count(&backends_of_sessions(admin), "pg1"), 6);
    for (c, _) in &clients {
        c.simple_query("SELECT 1").await.expect("session survived");
    }
    assert!(proxy.log().contains("config reloaded"), "{}", proxy.log());
    let Err(e) = connect(&proxy, PT_USER, PT_PASSWORD).await else {
        panic!("ptuser is gone from the userlist, yet logged in");
    };
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");

    // An invalid file: logged, nothing changes.
    std::fs::write(&path, "[proxy\nthis is not toml").expect("write");
    proxy.signal(Signal::SIGHUP);
    let log_of = || proxy.log();
    tokio::task::spawn_blocking({
        let p = proxy.log.clone();
        move || {
            wait_until(
                Duration::from_secs(10),
                "the reload error in the log",
                || {
                    p.lock()
                        .map(|l| l.contains("config reload failed"))
                        .unwrap_or(false)
                },
            )
        }
    })
    .await
    .expect("join");
    assert!(log_of().contains("(syntax)"), "{}", log_of());
    let now = proxy.backends();
    assert_eq!(now.keys().collect::<Vec<_>>(), ["pg1"]);
    assert_eq!(now["pg1"]["state"], "active");
    assert_eq!(count(&backends_of_sessions(admin), "pg1"), 6);

    // Putting it back in the file adds it again.
    std::fs::write(&path, &original).expect("write");
    proxy.signal(Signal::SIGHUP);
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(10), "pg2 back", || {
            let (_, list) = admin_json(admin, "GET", "/v1/backends", "");
            list.as_array().is_some_and(|l| {
                l.iter()
                    .any(|b| b["name"] == "pg2" && b["state"] == "active")
            })
        })
    })
    .await
    .expect("join");
}

#[tokio::test]
async fn removing_a_busy_backend_needs_force_which_closes_its_sessions_with_57p01() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(&proxy, USER, PASSWORD).await.expect("connect"));
    }
    let admin = proxy.admin;
    let (status, body) = admin_json(admin, "DELETE", "/v1/backends/pg2", "");
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["sessions"], 2, "{body}");
    let (status, body) = admin_json(admin, "DELETE", "/v1/backends/nope", "");
    assert_eq!(status, 404, "{body}");
    let (status, body) = admin_json(admin, "POST", "/v1/backends/nope/drain", "");
    assert_eq!(status, 404, "{body}");

    let (status, body) = tokio::task::spawn_blocking(move || {
        admin_json(admin, "DELETE", "/v1/backends/pg2?force=true", "")
    })
    .await
    .expect("join");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["closed"], 2, "{body}");
    assert_eq!(proxy.backends().keys().collect::<Vec<_>>(), ["pg1"]);
    let mut closed = 0;
    for (c, conn) in clients {
        match c.simple_query("SELECT 1").await {
            Ok(_) => {}
            Err(_) => {
                closed += 1;
                let e = conn.await.expect("join").expect_err("closed with an error");
                assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e}");
            }
        }
    }
    assert_eq!(closed, 2);
    // New sessions go to what is left.
    let (c, _) = connect(&proxy, USER, PASSWORD).await.expect("connect");
    c.simple_query("SELECT 1").await.expect("query");
    assert!(backends_of_sessions(admin).iter().all(|b| b == "pg1"));

    // Drain then activate: back to taking sessions.
    let (status, r) = tokio::task::spawn_blocking(move || {
        admin_json(
            admin,
            "POST",
            "/v1/backends/pg1/drain",
            r#"{"timeout_ms": 500}"#,
        )
    })
    .await
    .expect("join");
    assert_eq!(status, 200, "{r}");
    assert!(
        r["remaining"].as_u64().unwrap_or(0) > 0,
        "nowhere to go: {r}"
    );
    assert!(
        r["failures"].as_array().is_some_and(|f| !f.is_empty()),
        "{r}"
    );
    assert_eq!(proxy.backends()["pg1"]["state"], "draining");
    // Nothing takes new sessions now: PostgreSQL's "cannot connect now".
    let Err(e) = connect(&proxy, USER, PASSWORD).await else {
        panic!("a session started while every backend was draining");
    };
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e}");
    let (status, b) = admin_json(admin, "POST", "/v1/backends/pg1/activate", "");
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["state"], "active");
    connect(&proxy, USER, PASSWORD).await.expect("active again");
}

#[tokio::test]
async fn automatic_rebalance_gives_a_new_backend_its_share() {
    let pg3 = tokio::task::spawn_blocking(|| own_cluster("auto3"))
        .await
        .expect("join");
    let proxy = ProxyProcess::start(ProxyOptions {
        extra_sections: "[balancer]\nrebalance_interval = \"1s\"\n".into(),
        ..Default::default()
    });
    let mut clients = Vec::new();
    for _ in 0..12 {
        clients.push(connect(&proxy, USER, PASSWORD).await.expect("connect"));
    }
    let admin = proxy.admin;
    let body = format!(r#"{{"name": "pg3", "address": "{}"}}"#, pg3.addr());
    let (status, added) = admin_json(admin, "POST", "/v1/backends", &body);
    assert_eq!(status, 201, "{added}");
    // Nobody calls /v1/rebalance: the balancer's own loop does it.
    tokio::task::spawn_blocking(move || {
        wait_until(Duration::from_secs(20), "pg3 given its share", || {
            let on = backends_of_sessions(admin);
            (3..=5).contains(&count(&on, "pg3"))
                && (3..=5).contains(&count(&on, "pg1"))
                && (3..=5).contains(&count(&on, "pg2"))
        })
    })
    .await
    .expect("join");
    for (c, _) in &clients {
        c.simple_query("SELECT 1").await.expect("query");
    }
    assert!(
        proxy.log().contains("rebalance finished"),
        "{}",
        proxy.log()
    );
}

#[tokio::test]
async fn sessions_that_just_moved_are_left_alone_until_their_cooldown_passes() {
    let proxy = ProxyProcess::start(ProxyOptions {
        extra_sections: "[balancer]\ncooldown = \"6s\"\n".into(),
        ..Default::default()
    });
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(connect(&proxy, USER, PASSWORD).await.expect("connect"));
    }
    let admin = proxy.admin;
    // Everything onto pg2 by hand, every session moved at least once: each
    // goes to the other backend, then those now on pg1 go to pg2.
    let moved_at = Instant::now();
    let move_to = |id: &str, to: &str| {
        let path = format!("/v1/connections/{id}/transfer");
        let (status, r) = admin_json(admin, "POST", &path, &format!(r#"{{"to": "{to}"}}"#));
        assert_eq!(status, 200, "{r}");
    };
    let (_, list) = admin_json(admin, "GET", "/v1/connections", "");
    for c in list.as_array().expect("list") {
        let to = if c["backend"] == "pg1" { "pg2" } else { "pg1" };
        move_to(c["id"].as_str().expect("id"), to);
    }
    let (_, list) = admin_json(admin, "GET", "/v1/connections", "");
    for c in list.as_array().expect("list") {
        if c["backend"] == "pg1" {
            move_to(c["id"].as_str().expect("id"), "pg2");
        }
    }
    let last_moved_at = Instant::now();
    assert_eq!(count(&backends_of_sessions(admin), "pg2"), 8);
    let (status, r) = admin_json(admin, "POST", "/v1/rebalance", "");
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        r["moves"].as_array().map(Vec::len),
        Some(0),
        "cooling down: {r}"
    );
    // (Twelve moves; a loaded 2-core machine has taken over 2 s.)
    assert!(
        moved_at.elapsed() < Duration::from_secs(5),
        "too slow to test the cool-down"
    );

    // The cool-down is the thing under test: let it pass.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(last_moved_at.elapsed())).await;
    let (status, r) =
        tokio::task::spawn_blocking(move || admin_json(admin, "POST", "/v1/rebalance", ""))
            .await
            .expect("join");
    assert_eq!(status, 200, "{r}");
    // Mean 4, band 1: 3 moves reach 3 / 5.
    assert_eq!(r["moved"], 3, "{r}");
    assert_eq!(count(&backends_of_sessions(admin), "pg1"), 3);
    for (c, _) in &clients {
        c.simple_query("SELECT 1").await.expect("query");
    }
}
