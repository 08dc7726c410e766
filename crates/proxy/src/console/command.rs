//! The console's language: a query text split into commands, each parsed
//! into a [`Command`]. Keywords are case-insensitive; names may be bare
//! (letters, digits, `_`, `-`, `.`) or double-quoted; session ids are
//! single-quoted (or bare); `TIMEOUT n` is in seconds, or a quoted
//! duration like `'1500ms'`.

use std::time::Duration;

/// One console command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show(Show),
    Transfer {
        id: String,
        to: Option<String>,
        timeout: Option<Duration>,
    },
    Drain {
        backend: String,
        timeout: Option<Duration>,
    },
    Activate {
        backend: String,
    },
    Rebalance {
        timeout: Option<Duration>,
    },
    Reload,
    Pause {
        backend: Option<String>,
        timeout: Option<Duration>,
    },
    Resume {
        backend: Option<String>,
    },
    Shutdown,
    Switchover {
        from: String,
        to: String,
        timeout: Option<Duration>,
    },
    /// `SET x = y` and `SET x TO y`: accepted and ignored, as PgBouncer's
    /// console does, so that drivers which set things on connect work.
    Set,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Backends,
    /// `SHOW SESSIONS`, alias `SHOW CLIENTS`.
    Sessions,
    Servers,
    Stats,
    Migrations,
    Config,
    Version,
    Help,
}

/// What the console says to a command it does not know (42601).
pub const USAGE: &str = "commands: SHOW BACKENDS | SESSIONS | CLIENTS | SERVERS | STATS | \
MIGRATIONS | CONFIG | VERSION | HELP; TRANSFER '<id>' [TO <backend>] [TIMEOUT <s>]; \
DRAIN <backend> [TIMEOUT <s>]; ACTIVATE <backend>; REBALANCE [TIMEOUT <s>]; RELOAD; \
PAUSE [<backend>] [TIMEOUT <s>]; RESUME [<backend>]; SWITCHOVER <from> TO <to> [TIMEOUT <s>]; \
SHUTDOWN";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// A bare word, kept as written (keywords are compared ignoring case).
    Word(String),
    /// A double-quoted name.
    Quoted(String),
    /// A single-quoted literal.
    Literal(String),
}

impl Token {
    fn is_keyword(&self, kw: &str) -> bool {
        matches!(self, Token::Word(w) if w.eq_ignore_ascii_case(kw))
    }
}

/// Splits a query text into statements at `;` outside quotes; blank ones
/// are dropped (an all-blank text is no statement: EmptyQueryResponse).
pub fn split_statements(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quote) = (0, None::<char>);
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, ';') => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        if c == '\'' || c == '"' {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next() {
                    // A doubled quote stands for itself, as in SQL.
                    Some(x) if x == c && chars.peek() == Some(&c) => {
                        chars.next();
                        s.push(c);
                    }
                    Some(x) if x == c => break,
                    Some(x) => s.push(x),
                    None => return Err(format!("unterminated {c}quoted{c} text")),
                }
            }
            tokens.push(if c == '"' {
                Token::Quoted(s)
            } else {
                Token::Literal(s)
            });
            continue;
        }
        if c == '=' {
            chars.next();
            tokens.push(Token::Word("=".into()));
            continue;
        }
        let mut w = String::new();
        while let Some(&x) = chars.peek() {
            if x.is_alphanumeric() || matches!(x, '_' | '-' | '.' | ':') {
                w.push(x);
                chars.next();
            } else {
                break;
            }
        }
        if w.is_empty() {
            return Err(format!("unexpected character {c:?}"));
        }
        tokens.push(Token::Word(w));
    }
    Ok(tokens)
}

/// Why a statement did not parse: an unknown command (answered with the
/// list of commands) or a known one used wrongly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    Unknown(String),
    Usage(String),
}

impl ParseError {
    pub fn message(&self) -> String {
        match self {
            ParseError::Unknown(what) => format!("unknown command {what:?}; {USAGE}"),
            ParseError::Usage(why) => why.clone(),
        }
    }
}

struct Cursor {
    tokens: std::vec::IntoIter<Token>,
    verb: &'static str,
    usage: &'static str,
}

impl Cursor {
    fn usage(&self) -> ParseError {
        ParseError::Usage(format!("usage: {}", self.usage))
    }

    fn next(&mut self) -> Option<Token> {
        self.tokens.next()
    }

    fn name(&mut self) -> Result<String, ParseError> {
        match self.next() {
            Some(Token::Word(w)) | Some(Token::Quoted(w)) | Some(Token::Literal(w)) => Ok(w),
            None => Err(self.usage()),
        }
    }

    fn seconds(&mut self) -> Result<Duration, ParseError> {
        let verb = self.verb;
        let bad = |v: &str| {
            ParseError::Usage(format!(
                "{verb}: TIMEOUT takes seconds (10) or a duration ('1500ms'), not {v:?}"
            ))
        };
        match self.next() {
            Some(Token::Word(w)) => match w.parse::<f64>() {
                Ok(s) if s.is_finite() && s > 0.0 && s <= 86_400.0 => {
                    Ok(Duration::from_secs_f64(s))
                }
                _ => Err(bad(&w)),
            },
            Some(Token::Literal(l)) => match humantime::parse_duration(&l) {
                Ok(d) if !d.is_zero() && d <= Duration::from_secs(86_400) => Ok(d),
                _ => Err(bad(&l)),
            },
            Some(Token::Quoted(q)) => Err(bad(&q)),
            None => Err(self.usage()),
        }
    }

    /// `[TIMEOUT n]` and then the end.
    fn timeout_then_end(&mut self) -> Result<Option<Duration>, ParseError> {
        match self.next() {
            None => Ok(None),
            Some(t) if t.is_keyword("timeout") => {
                let d = self.seconds()?;
                self.end()?;
                Ok(Some(d))
            }
            Some(_) => Err(self.usage()),
        }
    }

    fn end(&mut self) -> Result<(), ParseError> {
        match self.next() {
            None => Ok(()),
            Some(_) => Err(self.usage()),
        }
    }
}

/// Parses one statement (no `;`).
pub fn parse(statement: &str) -> Result<Command, ParseError> {
    let tokens = tokenize(statement).map_err(ParseError::Usage)?;
    let Some(Token::Word(first)) = tokens.first().cloned() else {
        return Err(ParseError::Unknown(statement.trim().to_owned()));
    };
    let verb = first.to_ascii_uppercase();
    let (verb, usage): (&'static str, &'static str) = match verb.as_str() {
        "SHOW" => ("SHOW", "SHOW BACKENDS | SESSIONS | CLIENTS | SERVERS | STATS | MIGRATIONS | CONFIG | VERSION | HELP"),
        "TRANSFER" => ("TRANSFER", "TRANSFER '<session id>' [TO <backend>] [TIMEOUT <seconds>]"),
        "DRAIN" => ("DRAIN", "DRAIN <backend> [TIMEOUT <seconds>]"),
        "ACTIVATE" => ("ACTIVATE", "ACTIVATE <backend>"),
        "REBALANCE" => ("REBALANCE", "REBALANCE [TIMEOUT <seconds>]"),
        "RELOAD" => ("RELOAD", "RELOAD"),
        "PAUSE" => ("PAUSE", "PAUSE [<backend>] [TIMEOUT <seconds>]"),
        "RESUME" => ("RESUME", "RESUME [<backend>]"),
        "SHUTDOWN" => ("SHUTDOWN", "SHUTDOWN"),
        "SWITCHOVER" => ("SWITCHOVER", "SWITCHOVER <from> TO <to> [TIMEOUT <seconds>]"),
        "SET" => ("SET", "SET <name> = <value>"),
        _ => return Err(ParseError::Unknown(first)),
    };
    let mut c = Cursor {
        tokens: tokens.into_iter(),
        verb,
        usage,
    };
    c.next();
    match verb {
        "SHOW" => {
            let what = match c.next() {
                Some(Token::Word(w)) => w.to_ascii_uppercase(),
                _ => return Err(c.usage()),
            };
            let show = match what.as_str() {
                "BACKENDS" => Show::Backends,
                "SESSIONS" | "CLIENTS" => Show::Sessions,
                "SERVERS" => Show::Servers,
                "STATS" => Show::Stats,
                "MIGRATIONS" => Show::Migrations,
                "CONFIG" => Show::Config,
                "VERSION" => Show::Version,
                "HELP" => Show::Help,
                _ => return Err(ParseError::Unknown(format!("SHOW {what}"))),
            };
            c.end()?;
            Ok(Command::Show(show))
        }
        "TRANSFER" => {
            let id = c.name()?;
            let (mut to, mut timeout) = (None, None);
            while let Some(t) = c.next() {
                if t.is_keyword("to") && to.is_none() {
                    to = Some(c.name()?);
                } else if t.is_keyword("timeout") && timeout.is_none() {
                    timeout = Some(c.seconds()?);
                } else {
                    return Err(c.usage());
                }
            }
            Ok(Command::Transfer { id, to, timeout })
        }
        "DRAIN" => {
            let backend = c.name()?;
            let timeout = c.timeout_then_end()?;
            Ok(Command::Drain { backend, timeout })
        }
        "ACTIVATE" => {
            let backend = c.name()?;
            c.end()?;
            Ok(Command::Activate { backend })
        }
        "REBALANCE" => Ok(Command::Rebalance {
            timeout: c.timeout_then_end()?,
        }),
        "RELOAD" => c.end().map(|_| Command::Reload),
        "SHUTDOWN" => c.end().map(|_| Command::Shutdown),
        "PAUSE" => {
            let (mut backend, mut timeout) = (None, None);
            while let Some(t) = c.next() {
                if t.is_keyword("timeout") && timeout.is_none() {
                    timeout = Some(c.seconds()?);
                } else if backend.is_none() && timeout.is_none() {
                    backend = Some(match t {
                        Token::Word(w) | Token::Quoted(w) | Token::Literal(w) => w,
                    });
                } else {
                    return Err(c.usage());
                }
            }
            Ok(Command::Pause { backend, timeout })
        }
        "RESUME" => {
            let backend = match c.next() {
                None => None,
                Some(Token::Word(w) | Token::Quoted(w) | Token::Literal(w)) => Some(w),
            };
            c.end()?;
            Ok(Command::Resume { backend })
        }
        "SWITCHOVER" => {
            let from = c.name()?;
            match c.next() {
                Some(t) if t.is_keyword("to") => {}
                _ => return Err(c.usage()),
            }
            let to = c.name()?;
            let timeout = c.timeout_then_end()?;
            Ok(Command::Switchover { from, to, timeout })
        }
        "SET" => Ok(Command::Set),
        _ => Err(ParseError::Unknown(first)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_and_aliases() {
        assert_eq!(parse("show backends"), Ok(Command::Show(Show::Backends)));
        assert_eq!(parse("SHOW CLIENTS"), Ok(Command::Show(Show::Sessions)));
        assert_eq!(parse("Show Sessions "), Ok(Command::Show(Show::Sessions)));
        assert!(matches!(parse("SHOW POOLS"), Err(ParseError::Unknown(_))));
        assert!(matches!(
            parse("SHOW BACKENDS x"),
            Err(ParseError::Usage(_))
        ));
    }

    #[test]
    fn verbs_with_arguments() {
        assert_eq!(
            parse("TRANSFER '6f1c' TO pg2 TIMEOUT 5"),
            Ok(Command::Transfer {
                id: "6f1c".into(),
                to: Some("pg2".into()),
                timeout: Some(Duration::from_secs(5))
            })
        );
        assert_eq!(
            parse("drain \"pg-1\" timeout '1500ms'"),
            Ok(Command::Drain {
                backend: "pg-1".into(),
                timeout: Some(Duration::from_millis(1500))
            })
        );
        assert_eq!(
            parse("PAUSE TIMEOUT 2"),
            Ok(Command::Pause {
                backend: None,
                timeout: Some(Duration::from_secs(2))
            })
        );
        assert_eq!(
            parse("pause pg1"),
            Ok(Command::Pause {
                backend: Some("pg1".into()),
                timeout: None
            })
        );
        assert_eq!(
            parse("SWITCHOVER pg1 TO pg2"),
            Ok(Command::Switchover {
                from: "pg1".into(),
                to: "pg2".into(),
                timeout: None
            })
        );
        assert!(matches!(parse("DRAIN"), Err(ParseError::Usage(_))));
        assert!(matches!(
            parse("DRAIN pg1 TIMEOUT 0"),
            Err(ParseError::Usage(_))
        ));
        assert!(matches!(
            parse("DRAIN pg1 TIMEOUT -1"),
            Err(ParseError::Usage(_))
        ));
        assert!(matches!(parse("RELOAD now"), Err(ParseError::Usage(_))));
        assert!(matches!(parse("SELECT 1"), Err(ParseError::Unknown(_))));
        assert!(matches!(parse("TRANSFER 'x"), Err(ParseError::Usage(_))));
    }

    #[test]
    fn statements_split_outside_quotes() {
        assert_eq!(
            split_statements("SHOW VERSION; TRANSFER 'a;b';;  "),
            vec!["SHOW VERSION", " TRANSFER 'a;b'"]
        );
        assert!(split_statements(" ; ").is_empty());
    }
}
