//! Quoting helpers for SQL text and libpq connection strings.

/// Quotes an SQL identifier: `a"b` becomes `"a""b"`.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quotes an SQL string literal like PostgreSQL's `quote_literal`: single quotes
/// are doubled, and if the value contains a backslash it is written as an
/// `E'...'` literal with doubled backslashes, so the result is correct whatever
/// `standard_conforming_strings` is set to.
pub fn quote_literal(value: &str) -> String {
    let body = value.replace('\'', "''");
    if value.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

/// Quotes a value for a libpq `key=value` connection string.
pub(crate) fn conninfo_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// Formats a `postgresql.conf` value: values already wrapped in single quotes are
/// written verbatim, everything else is quoted (PostgreSQL accepts quoted values
/// for every parameter type, including numbers and booleans).
pub(crate) fn conf_value(value: &str) -> String {
    if value.len() >= 2 && value.starts_with('\'') && value.ends_with('\'') {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\'', "''"))
    }
}

/// A dollar-quote tag (`$pgferry$`, `$pgferry1$`, ...) that does not occur in `body`.
pub(crate) fn dollar_tag(body: &str) -> String {
    let mut n = 0u32;
    loop {
        let tag = if n == 0 {
            "$pgferry$".to_owned()
        } else {
            format!("$pgferry{n}$")
        };
        if !body.contains(&tag) {
            return tag;
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b'"), "E'a\\\\b'''");
        assert_eq!(conninfo_value("a b'c\\"), "'a b\\'c\\\\'");
        assert_eq!(conf_value("64MB"), "'64MB'");
        assert_eq!(conf_value("'all'"), "'all'");
        assert_eq!(conf_value("a'b"), "'a''b'");
        assert_eq!(dollar_tag("x"), "$pgferry$");
        assert_eq!(dollar_tag("$pgferry$"), "$pgferry1$");
    }
}
