//! A tiny eBPF assembler: just the instructions the two sk_skb programs use.
//!
//! Encoding (`struct bpf_insn` in `linux/bpf.h`): one opcode byte, the
//! destination register in the low nibble and the source register in the
//! high nibble of the second byte, a signed 16-bit offset and a signed
//! 32-bit immediate, little-endian. `ld_imm64` takes two slots.

/// One eBPF instruction slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

// Instruction classes.
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const ST: u8 = 0x02;
const STX: u8 = 0x03;
const ALU: u8 = 0x04;
const JMP: u8 = 0x05;
const ALU64: u8 = 0x07;
// Sizes.
pub const W: u8 = 0x00;
pub const H: u8 = 0x08;
pub const B: u8 = 0x10;
pub const DW: u8 = 0x18;
// Modes.
const IMM: u8 = 0x00;
const MEM: u8 = 0x60;
const ATOMIC: u8 = 0xc0;
// Operand source.
const K: u8 = 0x00;
const X: u8 = 0x08;
// ALU operations.
pub const ADD: u8 = 0x00;
pub const AND: u8 = 0x50;
pub const XOR: u8 = 0xa0;
pub const MOV: u8 = 0xb0;
const END: u8 = 0xd0;
const TO_BE: u8 = 0x08;
// Jumps.
pub const JEQ: u8 = 0x10;
pub const JNE: u8 = 0x50;
pub const JSET: u8 = 0x40;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;
/// `src` of an `ld_imm64` whose immediate is a map file descriptor.
const PSEUDO_MAP_FD: u8 = 1;

pub const R0: u8 = 0;
pub const R1: u8 = 1;
pub const R2: u8 = 2;
pub const R3: u8 = 3;
pub const R4: u8 = 4;
pub const R6: u8 = 6;
pub const R7: u8 = 7;
pub const R8: u8 = 8;
pub const R9: u8 = 9;
/// The read-only frame pointer.
pub const R10: u8 = 10;

impl Insn {
    const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            dst,
            src,
            off,
            imm,
        }
    }

    /// The 8 bytes the kernel reads.
    pub fn encode(&self) -> [u8; 8] {
        let off = self.off.to_le_bytes();
        let imm = self.imm.to_le_bytes();
        [
            self.code,
            (self.dst & 0x0f) | (self.src << 4),
            off[0],
            off[1],
            imm[0],
            imm[1],
            imm[2],
            imm[3],
        ]
    }
}

/// `dst op= imm` (64-bit).
pub const fn alu64_imm(op: u8, dst: u8, imm: i32) -> Insn {
    Insn::new(ALU64 | op | K, dst, 0, 0, imm)
}

/// `dst op= src` (64-bit).
pub const fn alu64_reg(op: u8, dst: u8, src: u8) -> Insn {
    Insn::new(ALU64 | op | X, dst, src, 0, 0)
}

/// `dst = src` (64-bit).
pub const fn mov(dst: u8, src: u8) -> Insn {
    alu64_reg(MOV, dst, src)
}

/// `dst = imm` (64-bit, sign-extended).
pub const fn mov_imm(dst: u8, imm: i32) -> Insn {
    alu64_imm(MOV, dst, imm)
}

/// `dst = htobe32(dst)`: on this little-endian target a byte swap of the
/// low 32 bits, upper bits cleared.
pub const fn be32(dst: u8) -> Insn {
    Insn::new(ALU | END | TO_BE, dst, 0, 0, 32)
}

/// `dst = *(size *)(src + off)`.
pub const fn ldx(size: u8, dst: u8, src: u8, off: i16) -> Insn {
    Insn::new(LDX | MEM | size, dst, src, off, 0)
}

/// `*(size *)(dst + off) = src`.
pub const fn stx(size: u8, dst: u8, off: i16, src: u8) -> Insn {
    Insn::new(STX | MEM | size, dst, src, off, 0)
}

/// `*(size *)(dst + off) = imm`.
pub const fn st_imm(size: u8, dst: u8, off: i16, imm: i32) -> Insn {
    Insn::new(ST | MEM | size, dst, 0, off, imm)
}

/// `lock *(u64 *)(dst + off) += src`.
pub const fn atomic_add64(dst: u8, off: i16, src: u8) -> Insn {
    Insn::new(STX | ATOMIC | DW, dst, src, off, 0 /* BPF_ADD */)
}

/// `if dst op imm goto pc + 1 + off`.
pub const fn jmp_imm(op: u8, dst: u8, imm: i32, off: i16) -> Insn {
    Insn::new(JMP | op | K, dst, 0, off, imm)
}

/// `goto pc + 1 + off`.
pub const fn ja(off: i16) -> Insn {
    Insn::new(JMP, 0, 0, off, 0)
}

/// Calls helper number `id`: arguments in r1..r5, result in r0, r1..r5
/// clobbered.
pub const fn call(id: i32) -> Insn {
    Insn::new(JMP | CALL, 0, 0, 0, id)
}

pub const fn exit() -> Insn {
    Insn::new(JMP | EXIT, 0, 0, 0, 0)
}

/// `dst = map` (`ld_imm64` with a map fd): two slots.
pub const fn ld_map_fd(dst: u8, fd: i32) -> [Insn; 2] {
    [
        Insn::new(LD | DW | IMM, dst, PSEUDO_MAP_FD, 0, fd),
        Insn::new(0, 0, 0, 0, 0),
    ]
}

/// A program under construction with forward labels, so that jump offsets
/// are not counted by hand.
#[derive(Default)]
pub struct Program {
    insns: Vec<Insn>,
    /// (index of a jump, label it targets)
    fixups: Vec<(usize, &'static str)>,
    labels: Vec<(&'static str, usize)>,
}

impl Program {
    pub fn push(&mut self, insn: Insn) -> &mut Self {
        self.insns.push(insn);
        self
    }

    pub fn extend(&mut self, insns: impl IntoIterator<Item = Insn>) -> &mut Self {
        self.insns.extend(insns);
        self
    }

    /// A conditional jump (`op` on `dst` and `imm`) to `label`.
    pub fn jmp_to(&mut self, op: u8, dst: u8, imm: i32, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(jmp_imm(op, dst, imm, 0))
    }

    /// A conditional jump (`op` on `dst` and register `src`) to `label`.
    pub fn jmp_to_reg(&mut self, op: u8, dst: u8, src: u8, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(Insn::new(JMP | op | X, dst, src, 0, 0))
    }

    /// An unconditional jump to `label`.
    pub fn goto(&mut self, label: &'static str) -> &mut Self {
        self.fixups.push((self.insns.len(), label));
        self.push(ja(0))
    }

    /// Binds `label` to the next instruction.
    pub fn label(&mut self, label: &'static str) -> &mut Self {
        self.labels.push((label, self.insns.len()));
        self
    }

    /// The instructions with every jump resolved.
    ///
    /// # Panics
    /// On a jump to a label never bound (a bug in the program text, caught
    /// by the unit tests).
    pub fn finish(mut self) -> Vec<Insn> {
        for &(at, label) in &self.fixups {
            let target = self
                .labels
                .iter()
                .find(|(l, _)| *l == label)
                .map(|&(_, t)| t)
                .unwrap_or_else(|| panic!("unbound label {label}"));
            let off = target as i64 - at as i64 - 1;
            self.insns[at].off = i16::try_from(off).expect("jump within 32767 slots");
        }
        self.insns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_the_kernel_headers() {
        // r0 = 0; exit  (the smallest valid program)
        assert_eq!(mov_imm(R0, 0).encode(), [0xb7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(exit().encode(), [0x95, 0, 0, 0, 0, 0, 0, 0]);
        // r6 = r1
        assert_eq!(mov(R6, R1).encode(), [0xbf, 0x16, 0, 0, 0, 0, 0, 0]);
        // r0 = *(u32 *)(r10 - 32)
        assert_eq!(
            ldx(W, R0, R10, -32).encode(),
            [0x61, 0xa0, 0xe0, 0xff, 0, 0, 0, 0]
        );
        // call bpf_sk_redirect_map
        assert_eq!(call(52).encode(), [0x85, 0, 0, 0, 52, 0, 0, 0]);
        // r0 = be32 r0
        assert_eq!(be32(R0).encode(), [0xdc, 0, 0, 0, 32, 0, 0, 0]);
        // lock *(u64 *)(r8 + 8) += r1
        assert_eq!(
            atomic_add64(R8, 8, R1).encode(),
            [0xdb, 0x18, 8, 0, 0, 0, 0, 0]
        );
        let [a, b] = ld_map_fd(R1, 7);
        assert_eq!(a.encode(), [0x18, 0x11, 0, 0, 7, 0, 0, 0]);
        assert_eq!(b.encode(), [0; 8]);
    }

    #[test]
    fn labels_resolve_forward_and_backward() {
        let mut p = Program::default();
        p.label("top")
            .jmp_to(JEQ, R0, 0, "out")
            .push(mov_imm(R0, 1))
            .goto("top")
            .label("out")
            .push(exit());
        let insns = p.finish();
        assert_eq!(insns[0].off, 2);
        assert_eq!(insns[2].off, -3);
    }
}
