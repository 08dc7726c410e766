//! SCRAM-SHA-256-PLUS (tls-server-end-point channel binding) between libpq
//! and pgferry, against real PostgreSQL 15 clusters. The binding is to
//! pgferry's own certificate (rcgen's ECDSA P-256 / SHA-256 here); libpq
//! computes its side with OpenSSL, so this also checks our hash choice
//! against an independent implementation.

mod common;

use common::*;

fn query(url: &str) -> std::process::Output {
    psql(url, &["-Atc", "select 40 + 2"], &[])
}

fn assert_answers(out: &std::process::Output) {
    assert!(out.status.success(), "psql failed: {}", stderr(out));
    assert_eq!(stdout(out).trim(), "42");
}

#[test]
fn channel_binding_require_over_tls_logs_in() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    // libpq refuses to finish unless the exchange was SCRAM-SHA-256-PLUS.
    assert_answers(&query(&proxy.url(
        USER,
        PASSWORD,
        "sslmode=require&channel_binding=require",
    )));
}

#[test]
fn channel_binding_require_with_pass_through_user() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    // ptuser has only a verifier: the backend login uses the ClientKey
    // recovered from a bound exchange.
    assert_answers(&query(&proxy.url(
        PT_USER,
        PT_PASSWORD,
        "sslmode=require&channel_binding=require",
    )));
}

#[test]
fn channel_binding_require_failures_look_alike() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    // A wrong password and an unknown user fail the same way in a bound
    // exchange (the mock verifier takes the same path).
    for (user, password) in [(USER, "wrong"), ("nobody", PASSWORD)] {
        let out = query(&proxy.url(user, password, "sslmode=require&channel_binding=require"));
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "password authentication failed for user \"{user}\""
            )),
            "{user}: {err}"
        );
    }
}

#[test]
fn plaintext_clients_are_not_offered_plus() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    // libpq itself refuses: nothing to bind to without TLS.
    let out = query(&proxy.url(USER, PASSWORD, "sslmode=disable&channel_binding=require"));
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("channel binding required, but SSL not in use"),
        "{err}"
    );
    // libpq's default (prefer) on plaintext: had we offered -PLUS here,
    // libpq would stop with "server offered SCRAM-SHA-256-PLUS
    // authentication over a non-SSL connection".
    for (user, password) in [(USER, PASSWORD), (PT_USER, PT_PASSWORD)] {
        assert_answers(&query(&proxy.url(user, password, "sslmode=disable")));
    }
}

#[test]
fn channel_binding_disable_and_prefer_over_tls_still_log_in() {
    let proxy = ProxyProcess::start(ProxyOptions::default());
    // disable: libpq takes plain SCRAM-SHA-256 ("n") although -PLUS is
    // offered; prefer (libpq's default) takes -PLUS.
    for mode in ["disable", "prefer"] {
        for (user, password) in [(USER, PASSWORD), (PT_USER, PT_PASSWORD)] {
            let params = format!("sslmode=require&channel_binding={mode}");
            assert_answers(&query(&proxy.url(user, password, &params)));
        }
    }
}
