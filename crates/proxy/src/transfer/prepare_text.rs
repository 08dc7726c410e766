//! Finding an SQL `PREPARE` in the query string that created it.
//!
//! For a statement made by SQL `PREPARE`, `pg_prepared_statements.statement`
//! holds the whole query string the client sent, which may hold other
//! statements too (`SET search_path = x; PREPARE p AS ...; INSERT ...`).
//! Replaying that string would run them all again on the target, so only
//! the `PREPARE` of the statement's own name is cut out of it, with a lexer
//! that knows PostgreSQL's quoting (strings, `E''` escapes, quoted
//! identifiers, dollar quotes, both kinds of comment) and does not split
//! inside parentheses.

use super::capture::SessionState;

/// The `PREPARE` statement named `name` in `text`, without its `;`.
/// `backslash_escapes`: `standard_conforming_strings` is off, so plain
/// `'...'` strings take backslash escapes too.
pub fn find_prepare<'a>(text: &'a str, name: &str, backslash_escapes: bool) -> Option<&'a str> {
    statements(text, backslash_escapes)
        .into_iter()
        .find(|s| prepared_name(s).as_deref() == Some(name))
        .map(str::trim)
}

/// Replaces the text of each SQL-prepared statement in `state` with its
/// own `PREPARE`; a statement whose `PREPARE` cannot be found refuses the
/// move (running the whole string again could repeat other statements).
pub fn isolate_prepares(state: &mut SessionState, backslash_escapes: bool) -> Result<(), String> {
    for p in state.prepared.iter_mut().filter(|p| p.from_sql) {
        match find_prepare(&p.statement, &p.name, backslash_escapes) {
            Some(own) => {
                if own.len() != p.statement.len() {
                    p.statement = own.to_owned();
                }
            }
            None => {
                return Err(format!(
                    "cannot find the PREPARE of statement {:?} in the query that created it",
                    p.name
                ))
            }
        }
    }
    Ok(())
}

/// Splits at top-level semicolons.
fn statements(text: &str, backslash_escapes: bool) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i, mut depth) = (0, 0, 0usize);
    while i < b.len() {
        match b[i] {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |p| i + p + 1);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => i = skip_block_comment(b, i),
            b'\'' => {
                let escapes = backslash_escapes || is_escape_string_prefix(b, i);
                i = skip_quoted(b, i, b'\'', escapes);
            }
            b'"' => i = skip_quoted(b, i, b'"', false),
            b'$' if !(i > 0 && is_ident_byte(b[i - 1])) => i = skip_dollar_quote(b, i),
            b'(' => {
                depth += 1;
                i += 1;
            }
            b')' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b';' if depth == 0 => {
                out.push(&text[start..i]);
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    out.push(&text[start..]);
    out
}

fn is_ident_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// `E'...'` (the `E` not part of a longer identifier).
fn is_escape_string_prefix(b: &[u8], quote: usize) -> bool {
    quote >= 1
        && matches!(b[quote - 1], b'e' | b'E')
        && !(quote >= 2 && is_ident_byte(b[quote - 2]))
}

/// Past the closing quote; a doubled quote is part of the text.
fn skip_quoted(b: &[u8], open: usize, q: u8, backslash: bool) -> usize {
    let mut i = open + 1;
    while i < b.len() {
        match b[i] {
            b'\\' if backslash => i += 2,
            c if c == q && b.get(i + 1) == Some(&q) => i += 2,
            c if c == q => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// Past the closing `*/`; block comments nest.
fn skip_block_comment(b: &[u8], open: usize) -> usize {
    let (mut i, mut depth) = (open + 2, 1usize);
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// `$tag$ ... $tag$`; a `$` that does not open one (`$1`) is one byte.
fn skip_dollar_quote(b: &[u8], open: usize) -> usize {
    let mut j = open + 1;
    if b.get(j).is_some_and(|c| c.is_ascii_digit()) {
        return open + 1;
    }
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) {
        j += 1;
    }
    if b.get(j) != Some(&b'$') {
        return open + 1;
    }
    let tag = &b[open..=j];
    let body = j + 1;
    b[body..]
        .windows(tag.len())
        .position(|w| w == tag)
        .map_or(b.len(), |p| body + p + tag.len())
}

/// The name a statement prepares, if it is a `PREPARE`: folded to lower
/// case unless quoted, as PostgreSQL does.
fn prepared_name(stmt: &str) -> Option<String> {
    let rest = skip_space_and_comments(stmt);
    let keyword = rest.get(..7)?;
    if !keyword.eq_ignore_ascii_case("prepare") {
        return None;
    }
    let after = &rest[7..];
    if !after.starts_with(|c: char| c.is_whitespace() || c == '/' || c == '-' || c == '"') {
        return None;
    }
    let rest = skip_space_and_comments(after);
    if let Some(quoted) = rest.strip_prefix('"') {
        let mut name = String::new();
        let mut chars = quoted.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    name.push('"');
                } else {
                    return Some(name);
                }
            } else {
                name.push(c);
            }
        }
        None
    } else {
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
            .unwrap_or(rest.len());
        (end > 0).then(|| rest[..end].to_ascii_lowercase())
    }
}

fn skip_space_and_comments(mut s: &str) -> &str {
    loop {
        s = s.trim_start();
        if let Some(r) = s.strip_prefix("--") {
            s = r.find('\n').map_or("", |p| &r[p + 1..]);
        } else if s.starts_with("/*") {
            s = &s[skip_block_comment(s.as_bytes(), 0).min(s.len())..];
        } else {
            return s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_the_prepare_out_of_a_multi_statement_string() {
        let text =
            "SET search_path = shop; PREPARE k(int) AS SELECT $1 + 1; INSERT INTO t VALUES (1)";
        assert_eq!(
            find_prepare(text, "k", false),
            Some("PREPARE k(int) AS SELECT $1 + 1")
        );
        assert_eq!(
            find_prepare("PREPARE k AS SELECT 1", "k", false),
            Some("PREPARE k AS SELECT 1")
        );
        assert_eq!(find_prepare(text, "other", false), None);
    }

    #[test]
    fn semicolons_inside_quotes_comments_and_parentheses_do_not_split() {
        let text = "/* a; b */ PREPARE q AS SELECT ';', \"x;y\", $f$ ; $f$, E'\\'; ', $1 -- ;\n\
                    FROM (SELECT 1) s; SELECT 2";
        let got = find_prepare(text, "q", false).unwrap();
        assert!(
            got.starts_with("/* a; b */ PREPARE q AS SELECT ';'"),
            "{got}"
        );
        assert!(got.ends_with("FROM (SELECT 1) s"), "{got}");
        let rule = "PREPARE r AS SELECT 1 WHERE EXISTS (SELECT 1; SELECT 2); SELECT 3";
        assert_eq!(
            find_prepare(rule, "r", false),
            Some("PREPARE r AS SELECT 1 WHERE EXISTS (SELECT 1; SELECT 2)")
        );
    }

    #[test]
    fn names_fold_like_postgresql() {
        assert!(find_prepare("prepare MyStmt as select 1", "mystmt", false).is_some());
        assert!(find_prepare("PREPARE \"MyStmt\" AS SELECT 1", "MyStmt", false).is_some());
        assert!(find_prepare("PREPARE \"a\"\"b\" AS SELECT 1", "a\"b", false).is_some());
        assert!(find_prepare("PREPARED_X", "d_x", false).is_none());
        assert!(find_prepare("-- c\nPREPARE/**/p AS SELECT 1", "p", false).is_some());
    }

    #[test]
    fn backslashes_in_plain_strings_only_when_told() {
        // With standard_conforming_strings off, '\'' is one quote inside.
        let text = "SELECT 'a\\'; PREPARE x AS SELECT 1'; PREPARE y AS SELECT 2";
        assert_eq!(find_prepare(text, "x", true), None);
        assert_eq!(find_prepare(text, "y", true), Some("PREPARE y AS SELECT 2"));
        // With it on, the backslash is a plain character and the quote
        // after `1` opens a string that runs to the end.
        assert_eq!(
            find_prepare(text, "x", false),
            Some("PREPARE x AS SELECT 1'; PREPARE y AS SELECT 2")
        );
        assert_eq!(find_prepare(text, "y", false), None);
    }

    #[test]
    fn unterminated_quotes_do_not_panic() {
        for text in [
            "PREPARE p AS SELECT 'x",
            "PREPARE p AS SELECT $a$ x",
            "/* x",
            "\"",
            "$",
            "E'\\",
        ] {
            let _ = find_prepare(text, "p", false);
            let _ = find_prepare(text, "p", true);
        }
    }
}
