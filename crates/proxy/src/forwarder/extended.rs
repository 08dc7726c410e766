//! The extended-protocol messages the server has yet to answer, matched
//! to its answers in order (PostgreSQL answers every message in turn, and
//! after an error skips everything up to the next Sync).
//!
//! Two things depend on it. Whether the client is inside an exchange it
//! has not synced yet: PostgreSQL holds an implicit transaction open there,
//! so it is never a safe point, whatever ReadyForQuery said last. And what
//! the unnamed prepared statement is: `pg_prepared_statements` does not
//! list it, so a move carries it from what was seen here.

use std::collections::VecDeque;

use pgferry_wire::tag;

/// Unnamed statements longer than this (the Parse body) are not kept; a
/// session holding one cannot move (recoverable) until it is replaced.
pub const MAX_UNNAMED_STATEMENT: usize = 64 * 1024;
/// More unanswered messages than this and the matching gives up until the
/// session is quiet again; only a client pipelining without reading gets
/// here.
const MAX_AWAITING: usize = 1 << 16;

/// A client message waiting for its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Awaiting {
    Parse,
    /// A Parse of the unnamed statement; its body waits in `unnamed_bodies`.
    UnnamedParse,
    Bind,
    Close,
    CloseUnnamed,
    Describe,
    Execute,
    Sync,
    Query,
    FunctionCall,
    /// A Parse pgferry sent itself, to re-create a statement the client
    /// holds (see `inject`); its statement waits in `injected`.
    Injected,
}

impl Awaiting {
    /// Ends the skipping that follows an error, and is answered by
    /// ReadyForQuery.
    fn is_sync_point(self) -> bool {
        matches!(
            self,
            Awaiting::Sync | Awaiting::Query | Awaiting::FunctionCall
        )
    }
}

/// The unnamed prepared statement, as far as the proxy knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Unnamed {
    #[default]
    None,
    /// The body of the Parse that created it (name, query, parameter types).
    Known(Box<[u8]>),
    /// It exists, but its text was over `MAX_UNNAMED_STATEMENT`.
    TooLarge,
    /// The matching lost track (a desynchronised or overlong pipeline).
    Unknown,
}

#[derive(Debug, Clone, Default)]
pub struct Extended {
    awaiting: VecDeque<Awaiting>,
    /// One per `UnnamedParse` in `awaiting`, in order; `None`: too large.
    unnamed_bodies: VecDeque<Option<Box<[u8]>>>,
    unnamed: Unnamed,
    /// A Parse, Bind, Describe or Execute was sent since the last sync
    /// point: the server holds an implicit transaction open.
    unsynced: bool,
    /// Matching is suspended until the session is quiet again.
    lost: bool,
    /// (name, Parse body) per `Injected` in `awaiting`, in order.
    injected: VecDeque<(String, Box<[u8]>)>,
    /// (name, re-created?) of injected Parses that were answered, failed or
    /// skipped, for the forwarder to collect.
    outcomes: Vec<(String, bool)>,
    /// The body of the Parse or Close passing now.
    body: Vec<u8>,
    /// Its length as the header said.
    body_len: usize,
}

impl Extended {
    pub fn unsynced(&self) -> bool {
        self.unsynced
    }

    /// Restores the unnamed statement in a quiet session (`handoff`).
    pub fn set_unnamed(&mut self, unnamed: Unnamed) {
        self.unnamed = unnamed;
    }

    pub fn unnamed(&self) -> &Unnamed {
        &self.unnamed
    }

    /// A client message's header passed. True: send its body to
    /// `request_body`.
    pub fn request_start(&mut self, t: u8, len: u32) -> bool {
        match t {
            // These start PostgreSQL's implicit transaction (Close and
            // Flush do not: a lone Close + Flush leaves nothing open).
            tag::PARSE | tag::BIND | tag::DESCRIBE | tag::EXECUTE => self.unsynced = true,
            tag::SYNC | tag::QUERY | tag::FUNCTION_CALL => self.unsynced = false,
            _ => {}
        }
        if matches!(t, tag::PARSE | tag::CLOSE) {
            self.body.clear();
            self.body_len = (len as usize).saturating_sub(4);
            return true;
        }
        false
    }

    pub fn request_body(&mut self, chunk: &[u8]) {
        // A Parse is kept whole only if it may be the unnamed statement's
        // (its name, the first string, is empty) and small enough; of
        // anything else the first two bytes tell enough.
        let unnamed = self.body.first().or(chunk.first()) == Some(&0);
        let keep = if unnamed && self.body_len <= MAX_UNNAMED_STATEMENT {
            self.body_len
        } else {
            2
        };
        let room = keep.saturating_sub(self.body.len());
        self.body.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    /// A client message has passed whole.
    pub fn request_end(&mut self, t: u8) {
        let awaiting = match t {
            tag::PARSE if self.body.first() == Some(&0) => {
                let whole = self.body_len <= MAX_UNNAMED_STATEMENT;
                let body = std::mem::take(&mut self.body);
                self.unnamed_bodies
                    .push_back(whole.then(|| body.into_boxed_slice()));
                Awaiting::UnnamedParse
            }
            tag::PARSE => Awaiting::Parse,
            // Close of statement "" is 'S' and a terminator: six bytes.
            tag::CLOSE if self.body.as_slice() == b"S\0" && self.body_len == 2 => {
                Awaiting::CloseUnnamed
            }
            tag::CLOSE => Awaiting::Close,
            tag::BIND => Awaiting::Bind,
            tag::DESCRIBE => Awaiting::Describe,
            tag::EXECUTE => Awaiting::Execute,
            tag::SYNC => Awaiting::Sync,
            tag::QUERY => Awaiting::Query,
            tag::FUNCTION_CALL => Awaiting::FunctionCall,
            _ => return,
        };
        if self.lost {
            self.unnamed_bodies.clear();
            return;
        }
        if self.awaiting.len() == MAX_AWAITING {
            self.lose_track();
            return;
        }
        self.awaiting.push_back(awaiting);
    }

    /// pgferry sends a Parse of `name` (its `body`) ahead of the client's
    /// next message; its answer is the proxy's, not the client's.
    pub fn inject(&mut self, name: String, body: Box<[u8]>) {
        self.unsynced = true;
        if self.lost || self.awaiting.len() == MAX_AWAITING {
            // Untracked, its answer could not be told from the client's.
            self.lose_track();
            return;
        }
        self.awaiting.push_back(Awaiting::Injected);
        self.injected.push_back((name, body));
    }

    /// The server's next answer-to-a-message is about an injected Parse.
    pub fn front_is_injected(&self) -> bool {
        !self.lost && self.awaiting.front() == Some(&Awaiting::Injected)
    }

    /// The injected Parse at the front succeeded (its ParseComplete is not
    /// forwarded).
    pub fn injected_parse_complete(&mut self) {
        if self.awaiting.front() != Some(&Awaiting::Injected) {
            return;
        }
        self.awaiting.pop_front();
        if let Some((name, body)) = self.injected.pop_front() {
            if name.is_empty() {
                self.unnamed = Unnamed::Known(body);
            }
            self.outcomes.push((name, true));
        }
    }

    /// (name, re-created?) of the injected Parses settled since the last
    /// call.
    pub fn take_injected_outcomes(&mut self) -> Vec<(String, bool)> {
        std::mem::take(&mut self.outcomes)
    }

    /// Syncs sent during COPY FROM STDIN are ignored by the server; the
    /// tracker takes back the trailing `n` when the COPY ends.
    pub fn forget_trailing_syncs(&mut self, n: u32) {
        for _ in 0..n {
            if self.awaiting.back() == Some(&Awaiting::Sync) {
                self.awaiting.pop_back();
            }
        }
    }

    /// A server message has passed whole. `quiet`: after it, no sync point
    /// is outstanding (the tracker's count), so a lost matching can start
    /// afresh.
    pub fn response_end(&mut self, t: u8, quiet: bool) {
        if self.lost {
            if t == tag::READY_FOR_QUERY && quiet {
                self.awaiting.clear();
                self.unnamed_bodies.clear();
                let lost = self.injected.drain(..).map(|(name, _)| (name, false));
                self.outcomes.extend(lost);
                self.lost = false;
            }
            return;
        }
        let front = self.awaiting.front().copied();
        match (t, front) {
            (tag::PARSE_COMPLETE, Some(Awaiting::Parse))
            | (tag::BIND_COMPLETE, Some(Awaiting::Bind))
            | (tag::CLOSE_COMPLETE, Some(Awaiting::Close))
            | (tag::ROW_DESCRIPTION | tag::NO_DATA, Some(Awaiting::Describe))
            | (
                tag::COMMAND_COMPLETE | tag::EMPTY_QUERY_RESPONSE | tag::PORTAL_SUSPENDED,
                Some(Awaiting::Execute),
            ) => {
                self.awaiting.pop_front();
            }
            (tag::PARSE_COMPLETE, Some(Awaiting::UnnamedParse)) => {
                self.awaiting.pop_front();
                self.unnamed = match self.unnamed_bodies.pop_front().flatten() {
                    Some(body) => Unnamed::Known(body),
                    None => Unnamed::TooLarge,
                };
            }
            (tag::CLOSE_COMPLETE, Some(Awaiting::CloseUnnamed)) => {
                self.awaiting.pop_front();
                self.unnamed = Unnamed::None;
            }
            (tag::PARSE_COMPLETE | tag::BIND_COMPLETE | tag::CLOSE_COMPLETE, _) => {
                self.lose_track()
            }
            (tag::ERROR_RESPONSE, Some(a)) if !a.is_sync_point() => self.skip_to_sync(a),
            (tag::READY_FOR_QUERY, _) => self.ready(quiet),
            // Row descriptions and completions of a simple query, COPY,
            // notices, notifications: not answers this matching counts.
            _ => {}
        }
    }

    /// An ErrorResponse about `failed` (the oldest unanswered message):
    /// the server skips everything after it up to the next Sync.
    fn skip_to_sync(&mut self, failed: Awaiting) {
        self.awaiting.pop_front();
        match failed {
            Awaiting::UnnamedParse => {
                // A Parse of "" drops the old unnamed statement before parsing.
                self.unnamed_bodies.pop_front();
                self.unnamed = Unnamed::None;
            }
            Awaiting::Injected => {
                if let Some((name, _)) = self.injected.pop_front() {
                    if name.is_empty() {
                        self.unnamed = Unnamed::None;
                    }
                    self.outcomes.push((name, false));
                }
            }
            _ => {}
        }
        while let Some(&a) = self.awaiting.front() {
            if a.is_sync_point() {
                break;
            }
            // Skipped: what they would have replaced stays.
            match a {
                Awaiting::UnnamedParse => drop(self.unnamed_bodies.pop_front()),
                Awaiting::Injected => {
                    if let Some((name, _)) = self.injected.pop_front() {
                        self.outcomes.push((name, false));
                    }
                }
                _ => {}
            }
            self.awaiting.pop_front();
        }
    }

    fn ready(&mut self, quiet: bool) {
        match self.awaiting.pop_front() {
            // A simple query drops the unnamed statement.
            Some(Awaiting::Query) => self.unnamed = Unnamed::None,
            Some(a) if a.is_sync_point() => {}
            // An answer that never came for a message before this sync
            // point, or a ReadyForQuery for nothing seen sent.
            _ => {
                self.lose_track();
                self.response_end(tag::READY_FOR_QUERY, quiet);
            }
        }
    }

    fn lose_track(&mut self) {
        tracing::debug!("extended-protocol matching lost track; unnamed statement unknown");
        self.lost = true;
        self.unnamed = Unnamed::Unknown;
        let lost = self.injected.drain(..).map(|(name, _)| (name, false));
        self.outcomes.extend(lost);
    }
}

/// The query text and parameter type OIDs of a Parse body whose statement
/// name is empty.
pub fn decode_unnamed_parse(body: &[u8]) -> Option<(&str, Vec<u32>)> {
    let rest = body.strip_prefix(&[0])?;
    let nul = rest.iter().position(|&b| b == 0)?;
    let query = std::str::from_utf8(&rest[..nul]).ok()?;
    let rest = &rest[nul + 1..];
    let n = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
    let oids = rest.get(2..2 + 4 * n)?;
    if rest.len() != 2 + 4 * n {
        return None;
    }
    Some((
        query,
        oids.chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_body(name: &str, query: &str, oids: &[u32]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(query.as_bytes());
        b.push(0);
        b.extend_from_slice(&(oids.len() as u16).to_be_bytes());
        for o in oids {
            b.extend_from_slice(&o.to_be_bytes());
        }
        b
    }

    /// Feeds one client message, body in two pieces.
    fn send(x: &mut Extended, t: u8, body: &[u8]) {
        if x.request_start(t, body.len() as u32 + 4) {
            let (a, b) = body.split_at(body.len() / 2);
            x.request_body(a);
            x.request_body(b);
        }
        x.request_end(t);
    }

    fn answer(x: &mut Extended, tags: &[u8]) {
        for &t in tags {
            x.response_end(t, t == tag::READY_FOR_QUERY);
        }
    }

    fn known(x: &Extended) -> Option<(String, Vec<u32>)> {
        match x.unnamed() {
            Unnamed::Known(b) => decode_unnamed_parse(b).map(|(q, o)| (q.to_owned(), o)),
            _ => None,
        }
    }

    #[test]
    fn unsynced_exchange_until_sync() {
        let mut x = Extended::default();
        send(&mut x, tag::PARSE, &parse_body("", "insert", &[]));
        send(&mut x, tag::BIND, b"\0\0\0\0\0\0\0\0");
        send(&mut x, tag::EXECUTE, b"\0\0\0\0\0");
        send(&mut x, tag::FLUSH, b"");
        answer(&mut x, b"12C");
        assert!(
            x.unsynced(),
            "answered but not synced: still in the implicit transaction"
        );
        send(&mut x, tag::SYNC, b"");
        assert!(!x.unsynced());
        answer(&mut x, b"Z");
        assert_eq!(known(&x), Some(("insert".into(), vec![])));
    }

    #[test]
    fn unnamed_statement_follows_the_server() {
        let mut x = Extended::default();
        // Created, then reused in a later round trip.
        send(&mut x, tag::PARSE, &parse_body("", "select $1", &[23]));
        send(&mut x, tag::SYNC, b"");
        answer(&mut x, b"1Z");
        assert_eq!(known(&x), Some(("select $1".into(), vec![23])));
        // A named Parse leaves it alone.
        send(&mut x, tag::PARSE, &parse_body("s1", "select 2", &[]));
        send(&mut x, tag::SYNC, b"");
        answer(&mut x, b"1Z");
        assert!(known(&x).is_some());
        // An error before a Parse of "" skips it: the old one stays.
        send(&mut x, tag::BIND, b"nope\0\0\0\0\0\0\0");
        send(&mut x, tag::PARSE, &parse_body("", "select 3", &[]));
        send(&mut x, tag::SYNC, b"");
        answer(&mut x, b"EZ");
        assert_eq!(known(&x), Some(("select $1".into(), vec![23])));
        // A failing Parse of "" drops it.
        send(&mut x, tag::PARSE, &parse_body("", "selec", &[]));
        send(&mut x, tag::SYNC, b"");
        answer(&mut x, b"EZ");
        assert_eq!(x.unnamed(), &Unnamed::None);
        // A later error in the same exchange does not undo a good Parse.
        send(&mut x, tag::PARSE, &parse_body("", "select 1/0", &[]));
        send(&mut x, tag::BIND, b"\0\0\0\0\0\0\0\0");
        send(&mut x, tag::EXECUTE, b"\0\0\0\0\0");
        send(&mut x, tag::SYNC, b"");
        answer(&mut x, b"12EZ");
        assert_eq!(known(&x), Some(("select 1/0".into(), vec![])));
        // Close of "" and a simple query each drop it.
        send(&mut x, tag::CLOSE, b"S\0");
        send(&mut x, tag::SYNC, b"");
        answer(&mut x, b"3Z");
        assert_eq!(x.unnamed(), &Unnamed::None);
        send(&mut x, tag::PARSE, &parse_body("", "select 4", &[]));
        send(&mut x, tag::SYNC, b"");
        send(&mut x, tag::QUERY, b"select 5\0");
        answer(&mut x, b"1ZTDCZ");
        assert_eq!(x.unnamed(), &Unnamed::None);
    }

    #[test]
    fn describe_and_pipelines_match_in_order() {
        let mut x = Extended::default();
        for q in ["select 1", "select 2"] {
            send(&mut x, tag::PARSE, &parse_body("", q, &[]));
            send(&mut x, tag::DESCRIBE, b"S\0");
            send(&mut x, tag::BIND, b"\0\0\0\0\0\0\0\0");
            send(&mut x, tag::EXECUTE, b"\0\0\0\0\0");
            send(&mut x, tag::SYNC, b"");
        }
        answer(&mut x, b"1tT2DCZ");
        assert_eq!(known(&x), Some(("select 1".into(), vec![])));
        answer(&mut x, b"1tn2IZ");
        assert_eq!(known(&x), Some(("select 2".into(), vec![])));
        assert!(x.awaiting.is_empty() && x.unnamed_bodies.is_empty());
    }

    #[test]
    fn oversized_and_lost_are_never_taken_for_known() {
        let mut x = Extended::default();
        let big = "x".repeat(MAX_UNNAMED_STATEMENT);
        send(&mut x, tag::PARSE, &parse_body("", &big, &[]));
        send(&mut x, tag::SYNC, b"");
        answer(&mut x, b"1Z");
        assert_eq!(x.unnamed(), &Unnamed::TooLarge);
        // An answer that matches nothing: unknown until a simple query.
        answer(&mut x, b"2");
        assert_eq!(x.unnamed(), &Unnamed::Unknown);
        send(&mut x, tag::PARSE, &parse_body("", "select 1", &[]));
        send(&mut x, tag::SYNC, b"");
        answer(&mut x, b"1Z");
        assert_eq!(x.unnamed(), &Unnamed::Unknown, "still lost until quiet");
        send(&mut x, tag::QUERY, b"select 1\0");
        answer(&mut x, b"CZ");
        assert_eq!(x.unnamed(), &Unnamed::None);
    }

    #[test]
    fn injected_parses_are_matched_apart_from_the_clients() {
        let mut x = Extended::default();
        let body = parse_body("s1", "select 1", &[]).into_boxed_slice();
        // Re-created ahead of the client's Bind: its ParseComplete is ours.
        x.inject("s1".into(), body.clone());
        send(&mut x, tag::BIND, b"\0s1\0\0\0\0\0\0\0");
        send(&mut x, tag::EXECUTE, b"\0\0\0\0\0");
        send(&mut x, tag::SYNC, b"");
        assert!(x.front_is_injected());
        x.injected_parse_complete();
        assert!(!x.front_is_injected());
        answer(&mut x, b"2CZ");
        assert_eq!(x.take_injected_outcomes(), vec![("s1".to_owned(), true)]);
        // One that fails is the client's error (the Bind it precedes is
        // skipped, as the old server's Bind would have failed).
        x.inject("s1".into(), body.clone());
        send(&mut x, tag::BIND, b"\0s1\0\0\0\0\0\0\0");
        send(&mut x, tag::SYNC, b"");
        assert!(x.front_is_injected());
        answer(&mut x, b"EZ");
        assert_eq!(x.take_injected_outcomes(), vec![("s1".to_owned(), false)]);
        assert!(x.awaiting.is_empty() && x.injected.is_empty());
        // Skipped after an earlier error: neither answered nor reparsed.
        send(&mut x, tag::BIND, b"\0nope\0\0\0\0\0\0\0");
        x.inject("s1".into(), body);
        send(&mut x, tag::BIND, b"\0s1\0\0\0\0\0\0\0");
        send(&mut x, tag::SYNC, b"");
        answer(&mut x, b"EZ");
        assert_eq!(x.take_injected_outcomes(), vec![("s1".to_owned(), false)]);
        assert!(x.awaiting.is_empty() && x.injected.is_empty());
    }

    #[test]
    fn decodes_parse_bodies_strictly() {
        let b = parse_body("", "select $1, $2", &[23, 0]);
        assert_eq!(
            decode_unnamed_parse(&b),
            Some(("select $1, $2", vec![23, 0]))
        );
        assert_eq!(decode_unnamed_parse(&parse_body("n", "q", &[])), None);
        assert_eq!(decode_unnamed_parse(&b[..b.len() - 1]), None);
        assert_eq!(decode_unnamed_parse(&[0]), None);
    }
}
