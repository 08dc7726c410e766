//! Kernel forwarding of plaintext PostgreSQL sessions with a BPF sockmap.
//!
//! After a session has logged in (userspace relayed the startup and the
//! authentication up to the first ReadyForQuery), its two sockets are put
//! into a `BPF_MAP_TYPE_SOCKMAP` with an `sk_skb` stream parser and verdict
//! attached: every PostgreSQL message that arrives on one socket is framed
//! by the parser, counted by the verdict and redirected to the other socket
//! inside the kernel. The process that owns the sockets is not woken for
//! steady-state traffic at all.
//!
//! The verdict keeps per-socket counters in a map ([`SlotState`]): sync
//! points the client asked for (Query, Sync, FunctionCall), ReadyForQuery
//! messages the server sent and the last one's status, so that a caller can
//! still find a safe transfer point. [`KernelForwarder::hold`] stops the
//! redirection of one side at the next message boundary: the bytes that
//! follow queue in that socket's TCP receive queue, and
//! [`KernelForwarder::detach`] hands both sockets back to userspace, where a
//! plain `read` returns them; no byte is lost or reordered.
//!
//! The programs are raw eBPF built by a tiny assembler ([`asm`]) and loaded
//! with the bpf(2) syscall: no clang, no libbpf, no BTF. Where BPF is not
//! allowed (no `CAP_BPF`, no `CONFIG_BPF_STREAM_PARSER`, a seccomp filter)
//! [`KernelForwarder::new`] fails with an error for which
//! [`KernelError::is_unavailable`] is true, and the caller keeps forwarding
//! in userspace. See `docs/kernel-forwarding.md`.

pub mod asm;
mod progs;
mod sys;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use progs::CHUNK;
use progs::*;

/// Why kernel forwarding cannot be used or an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The kernel refuses BPF to this process (EPERM/EACCES: not root, no
    /// CAP_BPF + CAP_NET_ADMIN, unprivileged BPF disabled, seccomp) or does
    /// not have what it needs (ENOSYS, EINVAL/EOPNOTSUPP on the map or
    /// program type: no CONFIG_BPF_SYSCALL / CONFIG_BPF_STREAM_PARSER).
    /// The caller should forward in userspace.
    #[error("kernel forwarding is not available here: {op}: {source}")]
    Unavailable {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The verifier rejected a program (a bug in this crate, or a kernel
    /// too old for an instruction it uses); carries the verifier's log.
    #[error("the kernel rejected the {prog} program: {source}\nverifier log:\n{log}")]
    Verifier {
        prog: &'static str,
        #[source]
        source: io::Error,
        log: String,
    },
    /// Every slot is in use.
    #[error("no free sockmap slot ({0} pairs in use)")]
    Full(u32),
    /// A socket could not be added (e.g. not a TCP socket, already in a
    /// sockmap, has a TLS ULP) or another bpf(2) call failed.
    #[error("{op}: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// `detach` did not find both directions quiet within its deadline:
    /// the slot stays attached, both sides held.
    #[error("detach: {0} not quiet within the deadline; the slot stays attached and held")]
    DetachTimeout(String),
}

impl KernelError {
    /// True when the caller should fall back to userspace forwarding.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, KernelError::Unavailable { .. })
    }

    fn setup(op: &'static str, source: io::Error) -> KernelError {
        match source.raw_os_error() {
            Some(libc::EPERM | libc::EACCES | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP) => {
                KernelError::Unavailable { op, source }
            }
            _ => KernelError::Sys { op, source },
        }
    }

    fn sys(op: &'static str, source: io::Error) -> KernelError {
        KernelError::Sys { op, source }
    }
}

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Which socket of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

/// A client/backend pair in the sockmap. Keep it until [`KernelForwarder::detach`];
/// dropping it without detaching leaves the pair forwarding in the kernel
/// (closing either socket removes it from the map).
#[derive(Debug)]
pub struct Slot {
    index: u32,
    client: RawFd,
    backend: RawFd,
    client_cookie: u64,
    backend_cookie: u64,
    /// `tcp_bytes_queued` of each socket when it was attached, plus what
    /// the caller declared it wrote since ([`KernelForwarder::wrote`]).
    client_base: AtomicU64,
    backend_base: AtomicU64,
}

impl Slot {
    /// The slot number (keys `2i` and `2i+1` in the sockmap).
    pub fn index(&self) -> u32 {
        self.index
    }

    fn key(&self, side: Side) -> u32 {
        match side {
            Side::Client => self.index * 2,
            Side::Backend => self.index * 2 + 1,
        }
    }
}

/// Counters of one pair, read from the state map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotState {
    /// Sync points the client sent (Query, Sync, FunctionCall) since attach.
    pub client_syncs: u64,
    /// ReadyForQuery messages the server sent since attach.
    pub server_ready: u64,
    /// Status byte of the last ReadyForQuery (`b'I'`, `b'T'`, `b'E'`), 0
    /// before the first one.
    pub last_status: u8,
    /// Messages seen per side.
    pub client_msgs: u64,
    pub server_msgs: u64,
    /// Bytes redirected to the peer per side.
    pub client_fwd_bytes: u64,
    pub server_fwd_bytes: u64,
    /// Frames whose header could not be read (should stay 0).
    pub bad_headers: u64,
    /// A frame is being assembled, or a long message is not finished.
    pub client_mid_message: bool,
    pub server_mid_message: bool,
}

impl SlotState {
    /// No request outstanding and the server idle: the counters agree and
    /// the last ReadyForQuery said 'I'. (The caller must also know that no
    /// extended-protocol exchange is open since that ReadyForQuery.)
    pub fn idle(&self) -> bool {
        self.client_syncs == self.server_ready
            && self.last_status == b'I'
            && !self.client_mid_message
            && !self.server_mid_message
    }
}

#[derive(Clone, Copy, Default)]
struct Raw {
    frames_parsed: u64,
    frames_done: u64,
    msgs: u64,
    syncs: u64,
    fwd: u64,
    last_status: u64,
    bad: u64,
    remaining: u64,
}

/// The loaded programs and maps. One per process is enough; it is `Sync`.
pub struct KernelForwarder {
    sockmap: OwnedFd,
    cookies: OwnedFd,
    state: OwnedFd,
    // Kept open for as long as the maps: the sockmap holds references.
    _parser: Option<OwnedFd>,
    _verdict: OwnedFd,
    capacity: u32,
    free: Mutex<Vec<u32>>,
}

impl std::fmt::Debug for KernelForwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelForwarder")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// How the programs see the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Stream parser + verdict: one verdict per PostgreSQL message (up to
    /// [`CHUNK`] bytes), counters and hold work. The default.
    Messages,
    /// Verdict only (no parser): one verdict per received skb, redirected
    /// unread. No counters, no hold, no safe detach: an upper bound for
    /// benchmarks, not for sessions that may have to move.
    Segments,
    /// Verdict only, walking the message headers inside each skb with a
    /// bounded loop: counters without strparser. Prototype: a header split
    /// across skbs is not handled yet (counted in `bad_headers`); no hold,
    /// no safe detach.
    SegmentsCounted,
}

/// How long `detach` waits for both directions to be quiet.
const DETACH_DEADLINE: Duration = Duration::from_secs(2);

impl KernelForwarder {
    /// Room for 4,096 pairs.
    pub fn new() -> Result<Self> {
        Self::with_capacity(4096)
    }

    /// Creates the maps, loads and attaches the programs
    /// ([`Framing::Messages`]).
    pub fn with_capacity(pairs: u32) -> Result<Self> {
        Self::with_framing(pairs, Framing::Messages)
    }

    /// As [`with_capacity`](Self::with_capacity), with the given framing.
    pub fn with_framing(pairs: u32, framing: Framing) -> Result<Self> {
        let entries = pairs.max(1) * 2;
        let sockmap = sys::map_create(sys::BPF_MAP_TYPE_SOCKMAP, 4, 4, entries, "pgf_sockmap")
            .map_err(|e| KernelError::setup("create the sockmap", e))?;
        let cookies = sys::map_create(sys::BPF_MAP_TYPE_HASH, 8, 8, entries, "pgf_cookies")
            .map_err(|e| KernelError::setup("create the cookie map", e))?;
        let state = sys::map_create(sys::BPF_MAP_TYPE_ARRAY, 4, STATE_SIZE, entries, "pgf_state")
            .map_err(|e| KernelError::setup("create the state map", e))?;
        let load = |prog: &'static str, insns: Vec<asm::Insn>, attach: u32| {
            sys::prog_load(sys::BPF_PROG_TYPE_SK_SKB, &insns, prog, attach).map_err(
                |(source, log)| {
                    if log.is_empty() {
                        KernelError::setup("load an sk_skb program", source)
                    } else {
                        KernelError::Verifier { prog, source, log }
                    }
                },
            )
        };
        let verdict_insns = match framing {
            Framing::Messages => {
                verdict(cookies.as_raw_fd(), state.as_raw_fd(), sockmap.as_raw_fd())
            }
            Framing::Segments => {
                verdict_segments(cookies.as_raw_fd(), state.as_raw_fd(), sockmap.as_raw_fd())
            }
            Framing::SegmentsCounted => verdict_segments_counted(
                cookies.as_raw_fd(),
                state.as_raw_fd(),
                sockmap.as_raw_fd(),
            ),
        };
        let verdict = load("pgf_verdict", verdict_insns, sys::BPF_SK_SKB_STREAM_VERDICT)?;
        let parser = match framing {
            Framing::Messages => {
                let parser = load(
                    "pgf_parser",
                    parser(cookies.as_raw_fd(), state.as_raw_fd()),
                    sys::BPF_SK_SKB_STREAM_PARSER,
                )?;
                sys::prog_attach(
                    sockmap.as_raw_fd(),
                    parser.as_raw_fd(),
                    sys::BPF_SK_SKB_STREAM_PARSER,
                )
                .map_err(|e| KernelError::setup("attach the stream parser", e))?;
                Some(parser)
            }
            Framing::Segments | Framing::SegmentsCounted => None,
        };
        sys::prog_attach(
            sockmap.as_raw_fd(),
            verdict.as_raw_fd(),
            sys::BPF_SK_SKB_STREAM_VERDICT,
        )
        .map_err(|e| KernelError::setup("attach the stream verdict", e))?;
        Ok(KernelForwarder {
            sockmap,
            cookies,
            state,
            _parser: parser,
            _verdict: verdict,
            capacity: pairs.max(1),
            free: Mutex::new((0..pairs.max(1)).rev().collect()),
        })
    }

    /// Puts a logged-in pair into the sockmap. Both sockets must be
    /// connected TCP sockets with nothing half-sent in either direction
    /// (call it right after the server's first ReadyForQuery, before that
    /// message is written to the client). The caller keeps ownership of the
    /// fds and must keep them open until [`detach`](Self::detach) or close.
    pub fn attach(&self, client: RawFd, backend: RawFd) -> Result<Slot> {
        let index = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            free.pop().ok_or(KernelError::Full(self.capacity))?
        };
        let result = self.attach_at(index, client, backend);
        if result.is_err() {
            self.free
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(index);
        }
        result
    }

    fn attach_at(&self, index: u32, client: RawFd, backend: RawFd) -> Result<Slot> {
        let client_cookie =
            sys::socket_cookie(client).map_err(|e| KernelError::sys("SO_COOKIE", e))?;
        let backend_cookie =
            sys::socket_cookie(backend).map_err(|e| KernelError::sys("SO_COOKIE", e))?;
        let client_base =
            sys::tcp_bytes_queued(client).map_err(|e| KernelError::sys("TCP_INFO", e))?;
        let backend_base =
            sys::tcp_bytes_queued(backend).map_err(|e| KernelError::sys("TCP_INFO", e))?;
        let slot = Slot {
            index,
            client,
            backend,
            client_cookie,
            backend_cookie,
            client_base: AtomicU64::new(client_base),
            backend_base: AtomicU64::new(backend_base),
        };
        let zero = [0u8; STATE_SIZE as usize];
        for (side, fd, cookie) in [
            (Side::Client, client, client_cookie),
            (Side::Backend, backend, backend_cookie),
        ] {
            let key = slot.key(side);
            sys::map_update(&self.state, &key.to_ne_bytes(), &zero, sys::BPF_ANY)
                .map_err(|e| KernelError::sys("reset the slot state", e))?;
            let entry = CookieEntry { key, flags: 0 };
            sys::map_update(
                &self.cookies,
                &cookie.to_ne_bytes(),
                &entry.to_bytes(),
                sys::BPF_ANY,
            )
            .map_err(|e| KernelError::sys("register the socket cookie", e))?;
            let _ = fd;
        }
        // Backend first: by the time the client is in the map (and can
        // send), its peer is there to redirect to.
        for side in [Side::Backend, Side::Client] {
            let fd = match side {
                Side::Client => client,
                Side::Backend => backend,
            };
            let key = slot.key(side);
            if let Err(e) = sys::map_update(
                &self.sockmap,
                &key.to_ne_bytes(),
                &(fd as u32).to_ne_bytes(),
                sys::BPF_ANY,
            ) {
                let _ = sys::map_delete(&self.sockmap, &slot.key(Side::Backend).to_ne_bytes());
                let _ = sys::map_delete(&self.cookies, &client_cookie.to_ne_bytes());
                let _ = sys::map_delete(&self.cookies, &backend_cookie.to_ne_bytes());
                return Err(KernelError::sys("insert the socket into the sockmap", e));
            }
        }
        Ok(slot)
    }

    fn raw(&self, key: u32) -> Result<Raw> {
        let mut v = [0u8; STATE_SIZE as usize];
        sys::map_lookup(&self.state, &key.to_ne_bytes(), &mut v)
            .map_err(|e| KernelError::sys("read the slot state", e))?;
        let at = |off: i16| {
            let o = off as usize;
            u64::from_ne_bytes(v[o..o + 8].try_into().unwrap_or([0; 8]))
        };
        Ok(Raw {
            frames_parsed: at(ST_FRAMES_PARSED),
            frames_done: at(ST_FRAMES_DONE),
            msgs: at(ST_MSGS),
            syncs: at(ST_SYNCS),
            fwd: at(ST_FWD_BYTES),
            last_status: at(ST_LAST_STATUS),
            bad: at(ST_BAD_HDR),
            remaining: at(ST_REMAINING),
        })
    }

    /// The pair's counters.
    pub fn state(&self, slot: &Slot) -> Result<SlotState> {
        let c = self.raw(slot.key(Side::Client))?;
        let b = self.raw(slot.key(Side::Backend))?;
        Ok(SlotState {
            client_syncs: c.syncs,
            server_ready: b.syncs,
            last_status: b.last_status as u8,
            client_msgs: c.msgs,
            server_msgs: b.msgs,
            client_fwd_bytes: c.fwd,
            server_fwd_bytes: b.fwd,
            bad_headers: c.bad + b.bad,
            client_mid_message: c.frames_parsed != c.frames_done || c.remaining != 0,
            server_mid_message: b.frames_parsed != b.frames_done || b.remaining != 0,
        })
    }

    fn set_flags(&self, slot: &Slot, side: Side, flags: u32) -> Result<()> {
        let cookie = match side {
            Side::Client => slot.client_cookie,
            Side::Backend => slot.backend_cookie,
        };
        let entry = CookieEntry {
            key: slot.key(side),
            flags,
        };
        sys::map_update(
            &self.cookies,
            &cookie.to_ne_bytes(),
            &entry.to_bytes(),
            sys::BPF_ANY,
        )
        .map_err(|e| KernelError::sys("set the slot flags", e))
    }

    /// Stops redirecting `side`'s messages at the next message boundary:
    /// a message already started is finished (and redirected), the bytes
    /// after it stay in the socket's TCP receive queue, unreadable until
    /// [`detach`](Self::detach) (while a socket is in the map its reads go
    /// through the sockmap's queue). The parser of that socket is stopped
    /// for good once it has refused a message: to forward in the kernel
    /// again, detach and attach the pair again.
    pub fn hold(&self, slot: &Slot, side: Side) -> Result<()> {
        self.set_flags(slot, side, HOLD)
    }

    /// Declares `n` bytes the caller wrote itself to `side`'s socket while
    /// it was attached (e.g. held bytes it forwarded), so that `detach`
    /// can tell when the kernel has sent everything it redirected.
    pub fn wrote(&self, slot: &Slot, side: Side, n: u64) {
        match side {
            Side::Client => slot.client_base.fetch_add(n, Ordering::Relaxed),
            Side::Backend => slot.backend_base.fetch_add(n, Ordering::Relaxed),
        };
    }

    /// Takes both sockets out of the sockmap without losing a byte: holds
    /// both sides (the parsers stop at the next message boundary; the
    /// following bytes stay in the TCP receive queues), waits until every
    /// frame in progress is done and every redirected byte is in the peer's
    /// send path, then removes the sockets from the map and clears the
    /// `ESTRPIPE` a stopped parser leaves as the socket error. Afterwards
    /// plain reads return everything not forwarded, in order.
    ///
    /// On [`KernelError::DetachTimeout`] the slot stays attached with both
    /// sides held (a peer that never finishes a message, or a full send
    /// buffer): call again, or close the sockets.
    pub fn detach(&self, slot: Slot) -> Result<(), (Slot, KernelError)> {
        for side in [Side::Client, Side::Backend] {
            if let Err(e) = self.set_flags(&slot, side, HOLD) {
                return Err((slot, e));
            }
        }
        let deadline = Instant::now() + DETACH_DEADLINE;
        let mut quiet_rounds = 0;
        loop {
            let before = match (
                self.raw(slot.key(Side::Client)),
                self.raw(slot.key(Side::Backend)),
            ) {
                (Ok(c), Ok(b)) => (c, b),
                (Err(e), _) | (_, Err(e)) => return Err((slot, e)),
            };
            std::thread::sleep(Duration::from_micros(200));
            let after = match (
                self.raw(slot.key(Side::Client)),
                self.raw(slot.key(Side::Backend)),
            ) {
                (Ok(c), Ok(b)) => (c, b),
                (Err(e), _) | (_, Err(e)) => return Err((slot, e)),
            };
            let settled = |x: &Raw, y: &Raw| {
                x.frames_parsed == y.frames_parsed
                    && x.frames_done == y.frames_done
                    && y.frames_parsed == y.frames_done
                    && y.remaining == 0
            };
            // Everything the peer redirected to a socket is in its send path.
            let sent = |fd: RawFd, base: &AtomicU64, redirected: u64| {
                sys::tcp_bytes_queued(fd)
                    .map(|q| q.wrapping_sub(base.load(Ordering::Relaxed)) >= redirected)
                    .unwrap_or(false)
            };
            let quiet = settled(&before.0, &after.0)
                && settled(&before.1, &after.1)
                && sent(slot.client, &slot.client_base, after.1.fwd)
                && sent(slot.backend, &slot.backend_base, after.0.fwd);
            quiet_rounds = if quiet { quiet_rounds + 1 } else { 0 };
            if quiet_rounds >= 2 {
                break;
            }
            if Instant::now() >= deadline {
                let queued = |fd: RawFd, base: &AtomicU64| {
                    sys::tcp_bytes_queued(fd)
                        .map(|q| q.wrapping_sub(base.load(Ordering::Relaxed)))
                        .unwrap_or(0)
                };
                let what = if !settled(&before.0, &after.0) {
                    "the client".to_owned()
                } else if !settled(&before.1, &after.1) {
                    "the server".to_owned()
                } else {
                    format!(
                        "the redirect queue (to the client {} of {} bytes, to the server {} of {})",
                        queued(slot.client, &slot.client_base),
                        after.1.fwd,
                        queued(slot.backend, &slot.backend_base),
                        after.0.fwd
                    )
                };
                return Err((slot, KernelError::DetachTimeout(what)));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        for side in [Side::Client, Side::Backend] {
            let key = slot.key(side);
            let cookie = match side {
                Side::Client => slot.client_cookie,
                Side::Backend => slot.backend_cookie,
            };
            if let Err(e) = sys::map_delete(&self.sockmap, &key.to_ne_bytes()) {
                // ENOENT: the socket was closed (and so removed) meanwhile.
                if e.raw_os_error() != Some(libc::ENOENT) {
                    return Err((
                        slot,
                        KernelError::sys("remove the socket from the sockmap", e),
                    ));
                }
            }
            let _ = sys::map_delete(&self.cookies, &cookie.to_ne_bytes());
        }
        // A parser stopped with -ESTRPIPE left that as the socket error.
        for fd in [slot.client, slot.backend] {
            let _ = sys::take_socket_error(fd);
        }
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(slot.index);
        Ok(())
    }

    /// Forgets a pair whose sockets were closed (closing removes them from
    /// the sockmap; this frees the slot and its cookie entries).
    pub fn forget(&self, slot: Slot) {
        for cookie in [slot.client_cookie, slot.backend_cookie] {
            let _ = sys::map_delete(&self.cookies, &cookie.to_ne_bytes());
        }
        for side in [Side::Client, Side::Backend] {
            let _ = sys::map_delete(&self.sockmap, &slot.key(side).to_ne_bytes());
        }
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(slot.index);
    }
}
