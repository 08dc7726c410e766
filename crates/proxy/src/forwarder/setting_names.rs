//! Finding the names of custom settings (`app.tenant`) a client sets with
//! `SET` or `set_config(...)`. PostgreSQL hides placeholders from
//! `pg_settings`, so a migration can only carry what it has seen named.
//! A cheap scan, not a parser: a name it misses can still be listed in
//! `[migration] carry_settings`.

/// Names found are appended to `found` (lower-cased, deduplicated, at most
/// `MAX_NAMES` in all).
pub const MAX_NAMES: usize = 64;

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$'
}

fn starts_with_ci(s: &[u8], word: &[u8]) -> bool {
    s.len() >= word.len() && s[..word.len()].eq_ignore_ascii_case(word)
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && s[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

pub fn find_custom_settings(sql: &[u8], found: &mut Vec<String>) {
    let mut i = 0;
    while i + 3 <= sql.len() {
        if !starts_with_ci(&sql[i..], b"set") || (i > 0 && is_ident(sql[i - 1])) {
            i += 1;
            continue;
        }
        let after = i + 3;
        let name = if starts_with_ci(&sql[after..], b"_config") {
            // set_config('name', ...)
            let j = skip_ws(sql, after + 7);
            let j = if sql.get(j) == Some(&b'(') {
                skip_ws(sql, j + 1)
            } else {
                sql.len()
            };
            if sql.get(j) == Some(&b'\'') {
                let start = j + 1;
                let end = sql[start..]
                    .iter()
                    .position(|&b| b == b'\'')
                    .map(|p| start + p);
                end.map(|e| sql[start..e].to_vec())
            } else {
                None
            }
        } else if sql.get(after).is_some_and(|b| b.is_ascii_whitespace()) {
            // SET [SESSION | LOCAL] name
            let mut j = skip_ws(sql, after);
            for kw in [&b"session"[..], b"local"] {
                if starts_with_ci(&sql[j..], kw)
                    && sql
                        .get(j + kw.len())
                        .is_some_and(|b| b.is_ascii_whitespace())
                {
                    j = skip_ws(sql, j + kw.len());
                }
            }
            let start = j;
            while j < sql.len() && (is_ident(sql[j]) || sql[j] == b'.' || sql[j] == b'"') {
                j += 1;
            }
            Some(
                sql[start..j]
                    .iter()
                    .filter(|&&b| b != b'"')
                    .copied()
                    .collect(),
            )
        } else {
            None
        };
        if let Some(name) = name {
            if name.contains(&b'.') && name.iter().all(|&b| is_ident(b) || b == b'.') {
                let name = String::from_utf8_lossy(&name).to_ascii_lowercase();
                if found.len() < MAX_NAMES && !found.contains(&name) {
                    found.push(name);
                }
            }
        }
        i = after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(sql: &str) -> Vec<String> {
        let mut v = Vec::new();
        find_custom_settings(sql.as_bytes(), &mut v);
        v
    }

    #[test]
    fn finds_set_and_set_config() {
        assert_eq!(names("SET app.tenant = 'acme'"), vec!["app.tenant"]);
        assert_eq!(
            names("set session My.Var to 1; SET LOCAL x.y=2"),
            vec!["my.var", "x.y"]
        );
        assert_eq!(
            names("select set_config( 'app.user', 'bob', false)"),
            vec!["app.user"]
        );
        assert_eq!(names("SET \"app\".\"quoted\" = 1"), vec!["app.quoted"]);
    }

    #[test]
    fn ignores_the_rest() {
        assert!(names("SET search_path = a, b").is_empty());
        assert!(names("select offset_x.y from reset z.w").is_empty());
        assert!(names("update t set a.b = 1").len() <= 1); // harmless: carried only if set
        assert!(names("").is_empty());
        assert!(names("set").is_empty());
        assert!(names("set_config(").is_empty());
    }
}
