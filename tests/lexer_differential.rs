//! The SQL lexer that cuts a `PREPARE` out of a multi-statement string
//! (`transfer/prepare_text.rs`), checked against PostgreSQL's own: strings
//! made of tricky pieces (quotes, `E''` escapes, dollar quotes, quoted
//! identifiers, both kinds of comment, semicolons inside all of them) are
//! run whole on a real server, which keeps the whole string as the
//! statement's text; the cut must then run on its own and prepare a
//! statement that answers exactly as the original does. The fuzz target
//! `sql_lexers` covers arbitrary bytes; this covers what a server accepts.

mod common;

use common::*;
use pgferry_proxy::transfer::prepare_text::find_prepare;

/// Pieces of SQL that each make a whole statement, with `;` where a naive
/// split would go wrong.
const STATEMENTS: &[&str] = &[
    "SELECT 'a;b'",
    "SELECT $x$ ; ' $x$",
    "SELECT $$;$$",
    "SELECT 1 AS \"we;ird\"\"name\"",
    "/* ; */ SELECT 2",
    "SELECT 3 -- ; trailing\n",
    "SELECT /* nested /* ; */ still */ 4",
    "SET search_path = public",
    "SELECT E'\\';' AS esc",
    "SELECT (SELECT ';')",
];

/// Bodies for the PREPARE: an expression, possibly with tricky text.
const BODIES: &[&str] = &[
    "SELECT 'p;q' AS v",
    "SELECT $t$;$t$ || $1::text AS v",
    "SELECT E'x\\';' AS v",
    "SELECT 1 AS \";\" -- ;\n",
    "SELECT (SELECT 'a' /* ; */) AS v",
];

/// A small deterministic generator (xorshift), so a failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

async fn rows(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_cut_prepare_runs_on_postgresql_and_prepares_the_same_statement() {
    let e = env();
    let (c, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(e.pg1.port())
        .user(USER)
        .password(PASSWORD)
        .dbname(DB)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut checked = 0;
    for round in 0..200 {
        let backslash_escapes = round % 4 == 3;
        let mut parts: Vec<String> = (0..rng.next(3))
            .map(|_| STATEMENTS[rng.next(STATEMENTS.len())].to_owned())
            .collect();
        let body = BODIES[rng.next(BODIES.len())];
        // With standard_conforming_strings off, E'' pieces mean the same.
        if backslash_escapes && body.contains("E'") {
            continue;
        }
        let params = if body.contains("$1") { "(text)" } else { "" };
        let prepare = format!("PREPARE p{params} AS {body}");
        parts.insert(rng.next(parts.len() + 1), prepare.clone());
        for _ in 0..rng.next(2) {
            parts.push(STATEMENTS[rng.next(STATEMENTS.len())].to_owned());
        }
        let whole = parts.join(";\n");
        let setup = if backslash_escapes {
            "SET standard_conforming_strings = off"
        } else {
            "SET standard_conforming_strings = on"
        };
        rows(&c, &format!("DEALLOCATE ALL; {setup}")).await;
        // PostgreSQL accepts it whole (by construction) and keeps it whole.
        if c.simple_query(&whole).await.is_err() {
            continue;
        }
        let kept = rows(
            &c,
            "SELECT statement FROM pg_prepared_statements WHERE name = 'p'",
        )
        .await;
        assert_eq!(
            kept,
            vec![whole.clone()],
            "the server keeps the whole string"
        );
        let execute = if params.is_empty() {
            "EXECUTE p"
        } else {
            "EXECUTE p('z')"
        };
        let before = rows(&c, execute).await;
        let cut = find_prepare(&whole, "p", backslash_escapes)
            .unwrap_or_else(|| panic!("no PREPARE found in {whole:?}"));
        // Exactly the PREPARE that was put in, nothing before or after it.
        assert_eq!(cut, prepare.trim(), "in {whole:?}");
        rows(&c, "DEALLOCATE p").await;
        c.simple_query(cut)
            .await
            .unwrap_or_else(|e| panic!("the cut {cut:?} of {whole:?} does not run: {e}"));
        assert_eq!(rows(&c, execute).await, before, "{whole:?} -> {cut:?}");
        // And the cut is one statement: nothing else of the string ran.
        let n = rows(&c, "SELECT count(*) FROM pg_prepared_statements").await;
        assert_eq!(n, vec!["1".to_owned()]);
        checked += 1;
    }
    assert!(
        checked >= 100,
        "only {checked} strings were valid SQL: the generator proves little"
    );
}
