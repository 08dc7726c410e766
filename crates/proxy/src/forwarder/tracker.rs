//! What the forwarder knows about a session from the headers it has seen:
//! sync points outstanding, transaction status, COPY, parameter status and
//! a logical clock. This is what decides whether a session is at a safe
//! point for a transfer.

use pgferry_wire::messages::decode_parameter_status;

use crate::parameters::ParameterList;

use super::extended::{Extended, Unnamed};
use super::setting_names::find_custom_settings;
use pgferry_wire::{tag, Flow, FrameVisitor};

/// The last ReadyForQuery's transaction status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyState {
    None,
    In,
    Out,
    Both,
}

/// A message's type byte and the logical-clock tick at which its header
/// passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub tag: u8,
    pub tick: u64,
}

/// ParameterStatus bodies longer than this are not tracked (they are still
/// forwarded); real ones are tens of bytes.
const MAX_PARAMETER_STATUS: usize = 8 * 1024;
/// How much of a Query or Parse text is scanned for setting names.
const MAX_SCANNED_TEXT: usize = 4 * 1024;

/// `SessionTracker::carry`: the tracker's knowledge at a safe point.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrackerCarry {
    pub clock: u64,
    pub last_request: Option<(u8, u64)>,
    pub last_response: Option<(u8, u64)>,
    pub parameters: Vec<(String, String)>,
    pub custom_settings: Vec<String>,
    pub unnamed: UnnamedCarry,
}

/// `Unnamed`, as it travels.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum UnnamedCarry {
    None,
    Known(Vec<u8>),
    TooLarge,
    Unknown,
}

#[derive(Debug, Clone)]
pub struct SessionTracker {
    clock: u64,
    last_request: Option<Stamp>,
    last_response: Option<Stamp>,
    /// Sync points (Query, Sync, FunctionCall) forwarded minus
    /// ReadyForQuery received.
    outstanding: u32,
    tx_status: TxStatus,
    copy: CopyState,
    /// Syncs sent since the client's last message that was not Sync, Flush
    /// or CopyData: if that message started a COPY FROM STDIN, the server
    /// ignores those Syncs (it is in copy-in mode), so they are taken back
    /// when the client ends the COPY.
    syncs_in_copy: u32,
    client_terminated: bool,
    /// A transfer waits for a safe point: stop the request direction right
    /// after the next sync point, so its answer can drain.
    hold_at_sync: bool,
    parameters: ParameterList,
    capture: Vec<u8>,
    /// Start of each Query/Parse text, scanned for custom setting names.
    request_text: Vec<u8>,
    custom_settings: Vec<String>,
    /// Unanswered extended-protocol messages and the unnamed statement.
    extended: Extended,
}

impl SessionTracker {
    pub fn new(initial_status: u8, parameters: ParameterList) -> Self {
        Self {
            clock: 0,
            last_request: None,
            last_response: None,
            outstanding: 0,
            tx_status: TxStatus::from_byte(initial_status).unwrap_or(TxStatus::Idle),
            copy: CopyState::None,
            syncs_in_copy: 0,
            client_terminated: false,
            hold_at_sync: false,
            parameters,
            capture: Vec::new(),
            request_text: Vec::new(),
            custom_settings: Vec::new(),
            extended: Extended::default(),
        }
    }

    /// What a session at a safe point knows that another process must
    /// know too (`handoff`): everything else is empty or zero there.
    pub fn carry(&self) -> TrackerCarry {
        TrackerCarry {
            clock: self.clock,
            last_request: self.last_request.map(|s| (s.tag, s.tick)),
            last_response: self.last_response.map(|s| (s.tag, s.tick)),
            parameters: self
                .parameters
                .iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect(),
            custom_settings: self.custom_settings.clone(),
            unnamed: match self.extended.unnamed() {
                Unnamed::None => UnnamedCarry::None,
                Unnamed::Known(body) => UnnamedCarry::Known(body.to_vec()),
                Unnamed::TooLarge => UnnamedCarry::TooLarge,
                Unnamed::Unknown => UnnamedCarry::Unknown,
            },
        }
    }

    /// A tracker at a safe point, as `carry` described it.
    pub fn from_carry(c: TrackerCarry) -> Self {
        let mut t = Self::new(
            b'I',
            ParameterList::from_pairs(c.parameters.iter().map(|(n, v)| (n.as_str(), v.as_str()))),
        );
        t.clock = c.clock;
        t.last_request = c.last_request.map(|(tag, tick)| Stamp { tag, tick });
        t.last_response = c.last_response.map(|(tag, tick)| Stamp { tag, tick });
        t.custom_settings = c.custom_settings;
        t.extended.set_unnamed(match c.unnamed {
            UnnamedCarry::None => Unnamed::None,
            UnnamedCarry::Known(body) => Unnamed::Known(body.into_boxed_slice()),
            UnnamedCarry::TooLarge => Unnamed::TooLarge,
            UnnamedCarry::Unknown => Unnamed::Unknown,
        });
        t
    }

    pub fn outstanding(&self) -> u32 {
        self.outstanding
    }
    pub fn tx_status(&self) -> TxStatus {
        self.tx_status
    }
    pub fn copy(&self) -> CopyState {
        self.copy
    }
    pub fn last_request(&self) -> Option<Stamp> {
        self.last_request
    }
    pub fn last_response(&self) -> Option<Stamp> {
        self.last_response
    }
    pub fn clock(&self) -> u64 {
        self.clock
    }
    /// The client sent Terminate ('X').
    pub fn client_terminated(&self) -> bool {
        self.client_terminated
    }
    /// Custom settings (`app.tenant`) the client has named in SET or
    /// set_config.
    pub fn custom_settings(&self) -> &[String] {
        &self.custom_settings
    }

    /// pgferry sends a Parse of its own ahead of the client's next message
    /// (`careful`); the tracker matches its answer apart.
    pub fn inject_parse(&mut self, name: String, body: Box<[u8]>) {
        self.extended.inject(name, body);
    }

    /// The server's next answer is to an injected Parse.
    pub fn next_answer_is_injected(&self) -> bool {
        self.extended.front_is_injected()
    }

    /// An injected Parse succeeded; its ParseComplete is not forwarded.
    pub fn injected_parse_complete(&mut self) {
        self.extended.injected_parse_complete();
    }

    /// (name, re-created?) of the injected Parses settled since last asked.
    pub fn take_injected_outcomes(&mut self) -> Vec<(String, bool)> {
        self.extended.take_injected_outcomes()
    }

    /// A message the proxy itself relayed to the client during a move.
    pub fn note_relayed(&mut self, tag: u8) {
        self.last_response = Some(self.tick(tag));
    }

    pub fn set_hold_at_sync(&mut self, hold: bool) {
        self.hold_at_sync = hold;
    }

    /// Replaces the parameters after a transfer (the client has been told
    /// about every difference).
    pub fn set_parameters(&mut self, parameters: ParameterList) {
        self.parameters = parameters;
    }

    /// A ParameterStatus the proxy itself relayed to the client during a
    /// move (a reload the capture made the old backend process, say): the
    /// swap must know the client saw it.
    pub fn note_parameter(&mut self, body: &[u8]) {
        if let Ok((name, value)) = decode_parameter_status(body) {
            self.parameters.set(&name, &value);
        }
    }

    /// ParameterStatus values as the client last saw them.
    pub fn parameters(&self) -> &ParameterList {
        &self.parameters
    }

    /// The unnamed prepared statement, as the server has it.
    pub fn unnamed_statement(&self) -> &Unnamed {
        self.extended.unnamed()
    }

    /// The client is inside an extended-protocol exchange it has not
    /// synced (a Parse, Bind, Describe or Execute since its last sync
    /// point): the server holds an implicit transaction open.
    pub fn in_unsynced_exchange(&self) -> bool {
        self.extended.unsynced()
    }

    /// No request is waiting for an answer, no transaction is open (not
    /// even the implicit one of an unsynced extended-protocol exchange) and
    /// no COPY runs. (Whether a message is half-forwarded is the pumps'
    /// part.)
    pub fn is_quiescent(&self) -> bool {
        self.outstanding == 0
            && self.tx_status == TxStatus::Idle
            && self.copy == CopyState::None
            && !self.extended.unsynced()
    }

    fn tick(&mut self, tag: u8) -> Stamp {
        self.clock += 1;
        Stamp {
            tag,
            tick: self.clock,
        }
    }

    pub fn request_side(&mut self) -> RequestSide<'_> {
        RequestSide(self)
    }
    pub fn response_side(&mut self) -> ResponseSide<'_> {
        ResponseSide(self)
    }
}

/// Visitor for client -> server messages.
pub struct RequestSide<'a>(&'a mut SessionTracker);

impl FrameVisitor for RequestSide<'_> {
    fn start(&mut self, t: u8, len: u32) -> bool {
        let s = &mut *self.0;
        s.last_request = Some(s.tick(t));
        let extended_body = s.extended.request_start(t, len);
        match t {
            tag::QUERY | tag::FUNCTION_CALL => {
                s.outstanding += 1;
                s.syncs_in_copy = 0;
            }
            tag::SYNC => {
                s.outstanding += 1;
                s.syncs_in_copy += 1;
            }
            b'H' | tag::COPY_DATA => {}
            tag::COPY_DONE | tag::COPY_FAIL => {
                if s.copy == CopyState::In {
                    s.outstanding = s.outstanding.saturating_sub(s.syncs_in_copy);
                    s.extended.forget_trailing_syncs(s.syncs_in_copy);
                }
                s.syncs_in_copy = 0;
            }
            tag::TERMINATE => s.client_terminated = true,
            _ => s.syncs_in_copy = 0,
        }
        if matches!(t, tag::QUERY | tag::PARSE) {
            s.request_text.clear();
            return true;
        }
        extended_body
    }

    fn body(&mut self, t: u8, chunk: &[u8]) {
        let s = &mut *self.0;
        if matches!(t, tag::PARSE | tag::CLOSE) {
            s.extended.request_body(chunk);
        }
        if matches!(t, tag::QUERY | tag::PARSE) {
            let room = MAX_SCANNED_TEXT.saturating_sub(s.request_text.len());
            s.request_text
                .extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
    }

    fn end(&mut self, t: u8) -> Flow {
        self.0.extended.request_end(t);
        if matches!(t, tag::QUERY | tag::PARSE) {
            let s = &mut *self.0;
            // Cheap pre-check before the scan proper.
            if s.request_text
                .windows(3)
                .any(|w| w.eq_ignore_ascii_case(b"set"))
            {
                find_custom_settings(&s.request_text, &mut s.custom_settings);
            }
        }
        let sync_point = matches!(t, tag::QUERY | tag::SYNC | tag::FUNCTION_CALL);
        if sync_point && self.0.hold_at_sync {
            Flow::Pause
        } else {
            Flow::Continue
        }
    }
}

/// Visitor for server -> client messages.
pub struct ResponseSide<'a>(&'a mut SessionTracker);

impl FrameVisitor for ResponseSide<'_> {
    fn start(&mut self, t: u8, _len: u32) -> bool {
        let s = &mut *self.0;
        s.last_response = Some(s.tick(t));
        match t {
            tag::READY_FOR_QUERY | tag::PARAMETER_STATUS => {
                s.capture.clear();
                true
            }
            tag::COPY_IN_RESPONSE => {
                s.copy = CopyState::In;
                false
            }
            tag::COPY_OUT_RESPONSE => {
                s.copy = CopyState::Out;
                false
            }
            tag::COPY_BOTH_RESPONSE => {
                s.copy = CopyState::Both;
                false
            }
            _ => false,
        }
    }

    fn body(&mut self, _tag: u8, chunk: &[u8]) {
        let s = &mut *self.0;
        if s.capture.len() + chunk.len() <= MAX_PARAMETER_STATUS {
            s.capture.extend_from_slice(chunk);
        }
    }

    fn end(&mut self, t: u8) -> Flow {
        let s = &mut *self.0;
        match t {
            tag::READY_FOR_QUERY => {
                s.outstanding = s.outstanding.saturating_sub(1);
                if let [b] = s.capture[..] {
                    if let Some(st) = TxStatus::from_byte(b) {
                        s.tx_status = st;
                    }
                }
                s.copy = CopyState::None;
            }
            tag::PARAMETER_STATUS => {
                if let Ok((name, value)) = decode_parameter_status(&s.capture) {
                    s.parameters.set(&name, &value);
                }
            }
            _ => {}
        }
        // Rows and COPY data are most of what a server sends and answer no
        // extended-protocol message: the matching never looks at them.
        if !matches!(t, tag::DATA_ROW | tag::COPY_DATA) {
            s.extended.response_end(t, s.outstanding == 0);
        }
        Flow::Continue
    }
}
