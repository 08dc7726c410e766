//! The two sk_skb programs, in raw eBPF.
//!
//! Maps (fds baked into the code as `ld_imm64` pseudo-map loads):
//!
//! * `cookies` — HASH, socket cookie (u64) → [`CookieEntry`]: the slot key
//!   of that socket and its control flags ([`HOLD`], [`DETACH`]). Written
//!   only by userspace.
//! * `state` — ARRAY, slot key (u32) → [`STATE_SIZE`] bytes of per-socket
//!   counters (offsets below). Written only by the programs, zeroed by
//!   userspace before a socket is inserted.
//! * `sockmap` — SOCKMAP, slot key → socket. Key `2i` is a client, `2i+1`
//!   its backend; a socket's peer is `key ^ 1`.
//!
//! Framing: the parser returns `1 + length` for a PostgreSQL message
//! (type byte + big-endian int32 length that counts itself), but never more
//! than [`CHUNK`] bytes per frame: a longer message is cut into
//! continuation frames (the remainder is kept in the state map), because
//! strparser refuses messages bigger than the socket's `sk_rcvbuf` (which
//! is never autotuned while the parser owns the socket). The parser and the
//! verdict of one socket run strictly alternately (parse frame n, verdict
//! frame n, parse frame n+1...), so the parser can tell the verdict what
//! kind of frame it cut through the state map.

use crate::asm::*;

/// Largest frame the parser hands to strparser.
pub const CHUNK: i32 = 16 * 1024;
/// `-ESTRPIPE`: strparser stops and leaves the bytes in the TCP queue.
const ESTRPIPE: i32 = 86;
const SK_PASS: i32 = 1;

const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_SKB_LOAD_BYTES: i32 = 26;
const HELPER_GET_SOCKET_COOKIE: i32 = 46;
const HELPER_SK_REDIRECT_MAP: i32 = 52;

/// Flag: the parser refuses to start a new message (`-ESTRPIPE`): the frame
/// in progress completes and is redirected, every later byte stays in the
/// socket's TCP receive queue (for userspace once the socket is out of the
/// map). The verdict never passes bytes up (`SK_PASS`): on 6.14+ kernels
/// (6.18 included) `tcp_bpf_strp_read_sock` miscounts `copied_seq` when
/// passed bytes are still unread at the next parser run, and the socket's
/// stream is corrupt once it is back to plain TCP reads (measured here:
/// `WARNING ... tcp_recvmsg_locked`, bytes lost).
pub const HOLD: u32 = 1;

// Offsets in a state map value (all u64).
pub const ST_FRAMES_PARSED: i16 = 0;
pub const ST_FRAMES_DONE: i16 = 8;
pub const ST_MSGS: i16 = 16;
pub const ST_SYNCS: i16 = 24;
pub const ST_FWD_BYTES: i16 = 32;
pub const ST_LAST_STATUS: i16 = 48;
pub const ST_BAD_HDR: i16 = 56;
pub const ST_REMAINING: i16 = 64;
pub const ST_FRAME_KIND: i16 = 72;
pub const ST_FRAME_LEN: i16 = 80;
/// Bytes of the last frame's head skb after the frame (set by the verdict).
pub const ST_TRAIL: i16 = 88;
/// Offset of the current frame in its head skb (set by the parser).
pub const ST_CUR_OFF: i16 = 96;
/// 1 while `ST_CUR_OFF` is valid for the frame being parsed.
pub const ST_OFF_KNOWN: i16 = 104;
pub const STATE_SIZE: u32 = 112;

/// Value of the cookies map.
#[derive(Clone, Copy, Debug)]
pub struct CookieEntry {
    pub key: u32,
    pub flags: u32,
}

impl CookieEntry {
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&self.key.to_ne_bytes());
        b[4..].copy_from_slice(&self.flags.to_ne_bytes());
        b
    }
}

// Stack layout (r10-relative): cookie at -8, slot key at -16, the 5-byte
// header at -37 (type byte) so that its int32 length sits 4-aligned at -36
// (the verifier insists on aligned stack loads), ReadyForQuery status at -40.
const STK_COOKIE: i16 = -8;
const STK_KEY: i16 = -16;
const STK_HDR: i32 = -37;
const STK_LEN: i16 = -36;
const STK_STATUS: i16 = -40;

/// r7 = slot key, r8 = flags, r9 = state value; jumps to `missing` when the
/// socket is not registered. Expects the context in r6.
fn lookup_slot(p: &mut Program, cookies: i32, state: i32, missing: &'static str) {
    p.push(mov(R1, R6))
        .push(call(HELPER_GET_SOCKET_COOKIE))
        .push(stx(DW, R10, STK_COOKIE, R0))
        .extend(ld_map_fd(R1, cookies))
        .push(mov(R2, R10))
        .push(alu64_imm(ADD, R2, i32::from(STK_COOKIE)))
        .push(call(HELPER_MAP_LOOKUP))
        .jmp_to(JEQ, R0, 0, missing)
        .push(ldx(W, R7, R0, 0))
        .push(ldx(W, R8, R0, 4))
        .push(stx(W, R10, STK_KEY, R7))
        .extend(ld_map_fd(R1, state))
        .push(mov(R2, R10))
        .push(alu64_imm(ADD, R2, i32::from(STK_KEY)))
        .push(call(HELPER_MAP_LOOKUP))
        .jmp_to(JEQ, R0, 0, missing)
        .push(mov(R9, R0));
}

/// `bpf_skb_load_bytes(skb, state.cur_off + off, r10 + at, len)`; result
/// in r0.
fn load_bytes(p: &mut Program, off: i32, at: i32, len: i32) {
    p.push(mov(R1, R6))
        .push(ldx(DW, R2, R9, ST_CUR_OFF))
        .push(alu64_imm(ADD, R2, off))
        .push(mov(R3, R10))
        .push(alu64_imm(ADD, R3, at))
        .push(mov_imm(R4, len))
        .push(call(HELPER_SKB_LOAD_BYTES));
}

/// The verdicts' common end: adds r1 (bytes) to the slot's forwarded
/// count and redirects the skb to the peer's egress (slot key ^ 1); the
/// `pass` label (an unregistered socket) lets it through unredirected.
fn redirect_to_peer(p: &mut Program, sockmap: i32) {
    p.push(atomic_add64(R9, ST_FWD_BYTES, R1))
        .push(mov(R1, R6))
        .extend(ld_map_fd(R2, sockmap))
        .push(mov(R3, R7))
        .push(alu64_imm(XOR, R3, 1))
        .push(mov_imm(R4, 0))
        .push(call(HELPER_SK_REDIRECT_MAP))
        .push(exit())
        .label("pass")
        .push(mov_imm(R0, SK_PASS))
        .push(exit());
}

/// Counts the message whose 5-byte header is at `STK_HDR` (r7 = slot key:
/// odd is the server side): one in `ST_MSGS`; a sync point (the client's
/// Query, Sync, FunctionCall; the server's ReadyForQuery) in `ST_SYNCS`;
/// a ReadyForQuery's status byte, which `load_status` reads to
/// `STK_STATUS` (r0 = 0 when it could), in `ST_LAST_STATUS`. Every path
/// but the last goes to `done`; the last falls through.
fn count_message(p: &mut Program, load_status: impl FnOnce(&mut Program), done: &'static str) {
    inc(p, ST_MSGS);
    p.push(ldx(B, R2, R10, STK_HDR as i16))
        .push(mov(R3, R7))
        .push(alu64_imm(AND, R3, 1))
        .jmp_to(JNE, R3, 0, "backend")
        // Client side: Query, Sync and FunctionCall are sync points.
        .jmp_to(JEQ, R2, i32::from(b'Q'), "sync")
        .jmp_to(JEQ, R2, i32::from(b'S'), "sync")
        .jmp_to(JEQ, R2, i32::from(b'F'), "sync")
        .goto(done)
        .label("sync");
    inc(p, ST_SYNCS);
    p.goto(done)
        // Backend side: ReadyForQuery and its status byte.
        .label("backend")
        .jmp_to(JNE, R2, i32::from(b'Z'), done);
    inc(p, ST_SYNCS);
    load_status(p);
    p.jmp_to(JNE, R0, 0, done)
        .push(ldx(B, R1, R10, STK_STATUS))
        .push(stx(DW, R9, ST_LAST_STATUS, R1));
}

/// `lock state[off] += 1`.
fn inc(p: &mut Program, off: i16) {
    p.push(mov_imm(R1, 1)).push(atomic_add64(R9, off, R1));
}

/// `struct __sk_buff`: `len` (u32) is the first field.
const SKB_LEN: i16 = 0;
const JGT: u8 = 0x20;
const JLT: u8 = 0xa0;
const SUB: u8 = 0x10;

/// The stream parser: the length of the next frame, 0 for "need more
/// bytes", `-ESTRPIPE` to stop.
pub fn parser(cookies: i32, state: i32) -> Vec<Insn> {
    let mut p = Program::default();
    p.push(mov(R6, R1));
    lookup_slot(&mut p, cookies, state, "stop");
    // Where the frame starts in this skb (see the module docs): the first
    // call for a frame computes it from the previous frame's trailing
    // bytes; a retry after "need more" keeps it.
    // Held: refuse a new frame on its first parser call, while strparser
    // has accumulated nothing (a later -ESTRPIPE would lose the bytes
    // already taken; a frame already started is finished instead). Also
    // only between messages: the rest of a long message is framed.
    p.push(ldx(DW, R1, R9, ST_OFF_KNOWN))
        .jmp_to(JNE, R1, 0, "have_off")
        .push(ldx(DW, R1, R9, ST_REMAINING))
        .jmp_to(JNE, R1, 0, "not_held")
        .jmp_to(JSET, R8, HOLD as i32, "stop")
        .label("not_held")
        .push(ldx(DW, R1, R9, ST_TRAIL))
        .push(mov_imm(R2, 0))
        .jmp_to(JEQ, R1, 0, "set_off")
        .push(ldx(W, R2, R6, SKB_LEN))
        .push(alu64_reg(SUB, R2, R1))
        .label("set_off")
        .push(stx(DW, R9, ST_CUR_OFF, R2))
        .push(st_imm(DW, R9, ST_OFF_KNOWN, 1))
        .label("have_off")
        .push(ldx(DW, R1, R9, ST_REMAINING))
        .jmp_to(JEQ, R1, 0, "header")
        // Continuation of a long message: min(remaining, CHUNK), no header.
        .push(mov(R0, R1))
        .jmp_to(JGT, R0, CHUNK, "cont_cap")
        .goto("cont_len")
        .label("cont_cap")
        .push(mov_imm(R0, CHUNK))
        .label("cont_len")
        .push(alu64_reg(SUB, R1, R0))
        .push(stx(DW, R9, ST_REMAINING, R1))
        .push(st_imm(DW, R9, ST_FRAME_KIND, 1))
        .goto("emit")
        // A new message.
        .label("header");
    load_bytes(&mut p, 0, STK_HDR, 5);
    p.jmp_to(JNE, R0, 0, "need_more")
        .push(ldx(W, R0, R10, STK_LEN))
        .push(be32(R0))
        // A length below 4 is not PostgreSQL: stop, userspace will see it.
        .jmp_to(JLT, R0, 4, "stop")
        .push(alu64_imm(ADD, R0, 1))
        .push(mov(R1, R0))
        .jmp_to(JGT, R0, CHUNK, "hdr_cap")
        .goto("hdr_len")
        .label("hdr_cap")
        .push(mov_imm(R0, CHUNK))
        .label("hdr_len")
        .push(alu64_reg(SUB, R1, R0))
        .push(stx(DW, R9, ST_REMAINING, R1))
        .push(st_imm(DW, R9, ST_FRAME_KIND, 0))
        .label("emit")
        .push(stx(DW, R9, ST_FRAME_LEN, R0))
        .push(mov_imm(R1, 1))
        .push(atomic_add64(R9, ST_FRAMES_PARSED, R1))
        .push(exit())
        .label("need_more")
        .push(mov_imm(R0, 0))
        .push(exit())
        .label("stop")
        .push(mov_imm(R0, -ESTRPIPE))
        .push(exit());
    p.finish()
}

/// The verdict: counts, then redirects the frame to the peer socket
/// (egress). Frames of unregistered sockets are passed up (cannot happen:
/// cookies are registered before a socket enters the map).
pub fn verdict(cookies: i32, state: i32, sockmap: i32) -> Vec<Insn> {
    let mut p = Program::default();
    p.push(mov(R6, R1));
    lookup_slot(&mut p, cookies, state, "pass");
    inc(&mut p, ST_FRAMES_DONE);
    // Trailing bytes after this frame in its head skb: the next frame
    // starts there (the parser turns it into an offset).
    p.push(ldx(W, R1, R6, SKB_LEN))
        .push(ldx(DW, R2, R9, ST_CUR_OFF))
        .push(alu64_reg(SUB, R1, R2))
        .push(ldx(DW, R2, R9, ST_FRAME_LEN))
        .push(alu64_reg(SUB, R1, R2))
        .push(stx(DW, R9, ST_TRAIL, R1))
        .push(st_imm(DW, R9, ST_OFF_KNOWN, 0));
    p.push(ldx(DW, R1, R9, ST_FRAME_KIND))
        .jmp_to(JNE, R1, 0, "route");
    load_bytes(&mut p, 0, STK_HDR, 5);
    p.jmp_to(JNE, R0, 0, "bad");
    count_message(
        &mut p,
        |p| load_bytes(p, 5, i32::from(STK_STATUS), 1),
        "route",
    );
    p.goto("route").label("bad");
    inc(&mut p, ST_BAD_HDR);
    p.label("route").push(ldx(DW, R1, R9, ST_FRAME_LEN));
    redirect_to_peer(&mut p, sockmap);
    p.finish()
}

/// Verdict for [`crate::Framing::Segments`] (no stream parser): redirects
/// each received skb (a TCP segment, or several coalesced) to the peer
/// without looking at it. Counts nothing: the upper bound of what the
/// sockmap can buy, for the benchmark.
pub fn verdict_segments(cookies: i32, state: i32, sockmap: i32) -> Vec<Insn> {
    let mut p = Program::default();
    p.push(mov(R6, R1));
    lookup_slot(&mut p, cookies, state, "pass");
    p.push(ldx(W, R1, R6, SKB_LEN));
    redirect_to_peer(&mut p, sockmap);
    p.finish()
}

/// Most headers walked per skb by [`verdict_segments_counted`].
pub const WALK_MAX: i32 = 256;

/// Verdict for [`crate::Framing::SegmentsCounted`] (no stream parser):
/// walks the PostgreSQL headers inside each received skb with a bounded
/// loop, counting as [`verdict`] does, then redirects the whole skb.
/// `ST_REMAINING` carries the bytes of a message that continue into the
/// next skb. A header split across two skbs, or more than [`WALK_MAX`]
/// headers in one skb, is not handled yet: it bumps `ST_BAD_HDR` and the
/// counters of that socket are unreliable from then on (forwarding is not
/// affected). A prototype to measure the cost of counting without strparser.
pub fn verdict_segments_counted(cookies: i32, state: i32, sockmap: i32) -> Vec<Insn> {
    const POS: i16 = -48;
    const ITER: i16 = -56;
    const JGE: u8 = 0x30;
    let mut p = Program::default();
    p.push(mov(R6, R1));
    lookup_slot(&mut p, cookies, state, "pass");
    // r8 = skb->len (flags are not used in this mode).
    p.push(ldx(W, R8, R6, SKB_LEN))
        .push(ldx(DW, R1, R9, ST_REMAINING))
        // The whole skb continues the previous message.
        .push(mov(R2, R8))
        .push(alu64_reg(SUB, R2, R1))
        .jmp_to(JEQ, R1, 0, "start")
        .push(mov(R3, R1))
        .push(alu64_reg(SUB, R3, R8))
        // if remaining >= len: remaining -= len, done
        .jmp_to_reg(JGE, R1, R8, "all_cont")
        .goto("start")
        .label("all_cont")
        .push(stx(DW, R9, ST_REMAINING, R3))
        .goto("route")
        .label("start")
        .push(stx(DW, R10, POS, R1))
        .push(st_imm(DW, R9, ST_REMAINING, 0))
        .push(st_imm(DW, R10, ITER, 0))
        .label("loop")
        .push(ldx(DW, R1, R10, ITER))
        .jmp_to(JGE, R1, WALK_MAX, "bad")
        .push(alu64_imm(ADD, R1, 1))
        .push(stx(DW, R10, ITER, R1))
        .push(ldx(DW, R2, R10, POS))
        .jmp_to_reg(JGE, R2, R8, "route")
        // 5 header bytes at pos.
        .push(mov(R1, R6))
        .push(mov(R3, R10))
        .push(alu64_imm(ADD, R3, STK_HDR))
        .push(mov_imm(R4, 5))
        .push(call(HELPER_SKB_LOAD_BYTES))
        .jmp_to(JNE, R0, 0, "bad");
    count_message(
        &mut p,
        |p| {
            p.push(mov(R1, R6))
                .push(ldx(DW, R2, R10, POS))
                .push(alu64_imm(ADD, R2, 5))
                .push(mov(R3, R10))
                .push(alu64_imm(ADD, R3, i32::from(STK_STATUS)))
                .push(mov_imm(R4, 1))
                .push(call(HELPER_SKB_LOAD_BYTES));
        },
        "next",
    );
    p.label("next")
        // pos += 1 + len
        .push(ldx(W, R1, R10, STK_LEN))
        .push(be32(R1))
        .push(alu64_imm(ADD, R1, 1))
        .push(ldx(DW, R2, R10, POS))
        .push(alu64_reg(ADD, R2, R1))
        .push(stx(DW, R10, POS, R2))
        .jmp_to_reg(JGE, R2, R8, "tail")
        .goto("loop")
        // The message runs past this skb: carry the rest.
        .label("tail")
        .push(alu64_reg(SUB, R2, R8))
        .push(stx(DW, R9, ST_REMAINING, R2))
        .goto("route")
        .label("bad");
    inc(&mut p, ST_BAD_HDR);
    p.label("route").push(ldx(W, R1, R6, SKB_LEN));
    redirect_to_peer(&mut p, sockmap);
    p.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_assemble() {
        assert!(parser(3, 4).len() > 20);
        assert!(verdict(3, 4, 5).len() > 30);
    }
}
