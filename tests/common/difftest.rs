//! Differential tester: the hardware is the oracle.
//!
//! Random sequences of general-purpose integer instructions are assembled with
//! iced-x86, run at CPL 3 from the same random initial state on engine `kvm`
//! (where guest user mode runs natively, also on PVM hosts) and on engine `emu`
//! (visor's software CPU), and the results are compared: all 16 GPRs, RIP, RFLAGS
//! and the scratch memory (a data page and the user stack page). Outside x87
//! sequences, one instruction in five may be a forward conditional branch
//! over the next one to four (on flags the SDM defines there), so that
//! `bt`'s branches inside blocks (superblocks: joins and side exits) are
//! compared too.
//!
//! # SSE and SSE2
//!
//! Sequences also hold SSE/SSE2 instructions (floating-point arithmetic,
//! comparisons, conversions, moves, shuffles, the integer instructions on XMM
//! registers). Each sequence starts by loading XMM0-15 from the stack page
//! and MXCSR with a random rounding mode, DAZ, FTZ and exception flags (all
//! exceptions masked), and ends by storing XMM0-15 and MXCSR there, so that
//! the XMM state and MXCSR's flags are compared as memory. The data page holds
//! interesting floating-point values (zeros, denormals, infinities, quiet and
//! signaling NaNs, the conversions' boundaries, random normals). RCPPS/RSQRTPS
//! are not generated: their approximations are implementation-specific
//! (the SDM only bounds their error; unit tests check that bound).
//!
//! MMX and the SSE/SSE2 instructions on MM registers are generated too:
//! the sequence starts with FNINIT and loads MM0-7 from the stack page, and
//! ends by storing MM0-7 and the x87 status word (TOP) there.
//!
//! # x87
//!
//! With `Options::x87` (the default; `VISOR_DIFF_X87=0`, `--no-x87` turn it
//! off), half the sequences are x87 sequences: after the MM loads, EMMS,
//! FLDCW of a random control word (precision and rounding control; every
//! exception masked, so no #MF), 0-8 loads onto the stack (FLD m80 of
//! sixteen 80-bit values with edge encodings in the stack page, FLD
//! m64/m32, FILD m32), then x87 instructions among the others: register
//! forms (ModR/M ranges, undocumented aliases included, FPREM and FPREM1)
//! and memory forms on the data page (FBLD and FBSTP included). Half of
//! them end with one transcendental (FSIN, FCOS, FSINCOS, FPTAN, FPATAN,
//! F2XM1, FYL2X, FYL2XP1) after an FXSAVE of the state it starts from:
//! its result is compared within 1 ulp (`tolerate_tail`). Every sequence
//! ends with FXSAVE, whose FOP, FIP, FDP and MXCSR_MASK fields it clears
//! (implementation-specific), so that ST0-7, FSW, FCW and the abridged FTW
//! are compared as memory; the condition codes that the SDM leaves
//! undefined, or where this AMD host departs from it, are left out
//! (`Gen::x87_cc`).
//!
//! # Undefined flags
//!
//! The generator tracks, per arithmetic flag (CF PF AF ZF SF OF), whether its
//! current value is *defined* by the SDM: every flag starts defined (the initial
//! value is known); an instruction that writes a flag with a defined value makes
//! it defined, one that leaves it undefined makes it undefined, and one that does
//! not affect it leaves its status alone. At the end, only the defined flags are
//! compared (all non-arithmetic RFLAGS bits are always compared). Count-dependent
//! cases are computed exactly: shift/rotate counts are immediates, or CL set by a
//! `mov cl, imm8` right before the shift, so the masked count is known. An
//! instruction that *reads* flags (ADC/SBB: CF, CMOVcc/SETcc: their condition) is
//! only generated while the flags it reads are defined, so an undefined flag
//! never leaks into a register or memory.
//!
//! # How a sequence runs
//!
//! The vCPU is put straight into CPL 3 through `set_sregs` (user code and data
//! segments of DPL 3 from a GDT that adds them to the boot GDT; page tables with
//! the U bit) with IOPL 3 in RFLAGS. A ring-0 `iretq` stub is not used: on PVM
//! hosts guest ring 0 runs in KVM's instruction emulator, which cannot carry out
//! a 64-bit IRET (the stub triple-faulted). The sequence ends with `out 0x80, al`,
//! legal at CPL 3 with IOPL 3 and by the TSS I/O bitmap (which is what PVM
//! checks), which exits as port I/O on both engines; the
//! port's device stops the VMM loop. One VM per engine is reused for all
//! sequences: registers, segment state, code and the scratch memory are reset
//! before each. RFLAGS.IOPL is not compared (no sequence can change it, and PVM
//! reports it as 0 after the exit).
//!
//! # Where it runs
//!
//! One implementation, two front ends: tests/differential.rs (10,000 sequences,
//! seed and count overridable with `VISOR_DIFF_SEED` and `VISOR_DIFF_COUNT`) and
//! examples/difftest.rs for long runs
//! (`cargo run --release --example difftest -- --count 1000000 --seed S`); both
//! include this file with `#[path]`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arch::gdt_entry;
use arch::pte::{P, RW, US};
use arch::rflags::{AF, ARITH, CF, IOPL, OF, PF, SF, ZF};
use iced_x86::code_asm::*;
use iced_x86::{Decoder, DecoderOptions, OpKind};
use machine::bus::{Action, Device, StopReason};
use vcpu::{Regs, SRegs};
use visor::{Engine, HolePolicy, Outcome, Stats, Vm, VmOptions};
use vm_memory::{Bytes, GuestAddress};

#[path = "difftest_system.rs"]
mod system;
pub use system::run_system;

const GDT: u64 = 0x600;
const CODE: u64 = 0x40_0000;
const SCRATCH: u64 = 0x60_0000;
/// Data page at SCRATCH, user stack page right after it.
const SCRATCH_LEN: usize = 0x2000;
const USTACK: u64 = SCRATCH + 0x2000 - 0x80;
const PORT: u16 = 0x80;
/// XMM0-15's initial values and MXCSR's (in the stack page), where they
/// are stored at the end.
const XMM_IN: i32 = 0x1800;
const MXCSR_IN: i32 = 0x1900;
const XMM_OUT: i32 = 0x1a00;
const MXCSR_OUT: i32 = 0x1b00;
/// MM0-7 in and out, and the x87 status word out.
const MM_IN: i32 = 0x1910;
const MM_OUT: i32 = 0x1b10;
const FSW_OUT: i32 = 0x1b50;
/// The x87 control word loaded at the start of an x87 sequence.
const FCW_IN: i32 = 0x1960;
/// Sixteen 80-bit values (16 bytes apart) for FLD m80.
const F80_IN: i32 = 0x1600;
/// FXSAVE's image at the end of every sequence (FOP, FIP, FDP and
/// MXCSR_MASK cleared by the sequence: implementation-specific).
const FX_OUT: i32 = 0x1200;
/// FXSAVE's image before the transcendental that may end an x87 sequence
/// (its implementation-specific fields are not cleared: not compared).
const FX_PRE: i32 = 0x1400;
/// The condition codes in the x87 status word.
const FSW_C0: u16 = 0x100;
const FSW_C1: u16 = 0x200;
const FSW_C2: u16 = 0x400;
const FSW_C3: u16 = 0x4000;
const SEL_UDATA: u16 = 0x2b;
const SEL_UCODE: u16 = 0x33;

const ALL_BUT_AF: u64 = CF | PF | ZF | SF | OF;
/// RFLAGS bit 1, always set.
const FIXED_FLAGS: u64 = 2;

/// The seed of the test's sequences.
pub const DEFAULT_SEED: u64 = 0x5eed_d1ff_0000_0001;
const MAX_LEN: usize = 24;

/// Stops the VMM loop at the end of a sequence.
struct StopPort;

impl Device for StopPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) -> Action {
        Action::Stop(StopReason::DebugExit(0))
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.below(one_in) == 0
    }
    /// An interesting 64-bit value: random, small, or near a boundary.
    fn value(&mut self) -> u64 {
        match self.below(6) {
            0 => self.below(4),
            1 => 0u64.wrapping_sub(self.below(4)),
            2 => (1u64 << self.below(64))
                .wrapping_add(self.below(3))
                .wrapping_sub(1),
            3 => self.next() & 0xffff_ffff,
            _ => self.next(),
        }
    }
    /// An interesting single-precision encoding.
    fn single(&mut self) -> u32 {
        let s = (self.below(2) as u32) << 31;
        let frac = self.next() as u32 & 0x7f_ffff;
        s | match self.below(14) {
            0 => 0,
            1 => 0x3f80_0000,
            2 => 0x7f80_0000,
            3 => 0x7fc0_0000 | (frac & (0xff * self.below(2) as u32)),
            4 => 0x7f80_0000 | (frac >> 1).max(1),
            5 => frac.max(1),
            6 => 0x7f7f_ffff - self.below(2) as u32,
            7 => 0x0080_0000 + self.below(2) as u32,
            // The integers' boundaries: 2^31, 2^63 and their neighbours.
            8 => [0x4f00_0000, 0x5f00_0000][self.below(2) as usize] - 1 + self.below(3) as u32,
            9 => (0x3f00 + self.below(0x300) as u32) << 16,
            // Exponents at the edges: overflow, underflow.
            10 => ((0xf0 + self.below(16) as u32) << 23) | frac,
            11 => ((1 + self.below(16) as u32) << 23) | frac,
            12 => ((0x60 + self.below(0x40) as u32) << 23) | frac,
            _ => self.next() as u32 & 0x7fff_ffff,
        }
    }
    /// An interesting double-precision encoding.
    fn double(&mut self) -> u64 {
        let s = self.below(2) << 63;
        let frac = self.next() & 0xf_ffff_ffff_ffff;
        s | match self.below(14) {
            0 => 0,
            1 => 0x3ff0_0000_0000_0000,
            2 => 0x7ff0_0000_0000_0000,
            3 => 0x7ff8_0000_0000_0000 | (frac & (0xffff * self.below(2))),
            4 => 0x7ff0_0000_0000_0000 | (frac >> 1).max(1),
            5 => frac.max(1),
            6 => 0x7fef_ffff_ffff_ffff - self.below(2),
            7 => 0x0010_0000_0000_0000 + self.below(2),
            8 => {
                [0x41e0_0000_0000_0000, 0x43e0_0000_0000_0000][self.below(2) as usize] - 1
                    + self.below(3)
            }
            9 => (0x3fe0 + self.below(0x60)) << 48,
            10 => ((0x7e0 + self.below(0x20)) << 52) | frac,
            11 => ((1 + self.below(0x20)) << 52) | frac,
            // Near single precision's range, for CVTSD2SS.
            12 => ((0x360 + self.below(0xa0)) << 52) | frac,
            _ => self.next() & 0x7fff_ffff_ffff_ffff,
        }
    }
    /// An interesting 80-bit value (sign and exponent, significand).
    fn f80(&mut self) -> (u16, u64) {
        let s = (self.below(2) as u16) << 15;
        let sig = self.next();
        let int = 1u64 << 63;
        let (e, m) = match self.below(14) {
            0 => (0, 0),
            1 => (0x7fff, int),
            2 => (
                0x7fff,
                0xc000_0000_0000_0000 | (sig & (u64::MAX >> (2 + self.below(62)))),
            ),
            3 => (0x7fff, int | (sig >> 2).max(1)),
            4 => (0, (sig >> 1).max(1)),
            5 => (0, sig | int),
            6 => (1 + self.below(0x7ffe) as u16, sig & !int),
            7 => (0x3fff + self.below(70) as u16 - 4, sig | int),
            8 => (0x7ffe - self.below(8) as u16, sig | int),
            9 => (1 + self.below(8) as u16, sig | int),
            // Few significant bits: exact sums, halfway cases.
            10 => (
                0x3fff + self.below(8) as u16,
                int | (sig & !(u64::MAX >> (2 + self.below(12)))),
            ),
            11 => (
                0x3fff - 64 + self.below(128) as u16,
                (sig | int) & !(u64::MAX >> (25 + self.below(31))),
            ),
            _ => (self.below(0x7fff) as u16, sig | int),
        };
        (s | e, m)
    }
    /// Eight bytes of floating-point data (one double or two singles) or a
    /// `value`.
    fn fp_chunk(&mut self) -> u64 {
        match self.below(3) {
            0 => self.double(),
            1 => self.single() as u64 | (self.single() as u64) << 32,
            _ => self.value(),
        }
    }
}

const R64: [AsmRegister64; 16] = [
    rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
];
const R32: [AsmRegister32; 16] = [
    eax, ecx, edx, ebx, esp, ebp, esi, edi, r8d, r9d, r10d, r11d, r12d, r13d, r14d, r15d,
];
const R16: [AsmRegister16; 16] = [
    ax, cx, dx, bx, sp, bp, si, di, r8w, r9w, r10w, r11w, r12w, r13w, r14w, r15w,
];
const R8: [AsmRegister8; 16] = [
    al, cl, dl, bl, spl, bpl, sil, dil, r8b, r9b, r10b, r11b, r12b, r13b, r14b, r15b,
];

/// Register, register.
macro_rules! rr {
    ($a:expr, $op:ident, $sz:expr, $d:expr, $s:expr) => {
        match $sz {
            1 => $a.$op(R8[$d], R8[$s]),
            2 => $a.$op(R16[$d], R16[$s]),
            4 => $a.$op(R32[$d], R32[$s]),
            _ => $a.$op(R64[$d], R64[$s]),
        }
        .unwrap()
    };
}
/// Register, immediate.
macro_rules! ri {
    ($a:expr, $op:ident, $sz:expr, $d:expr, $i:expr) => {
        match $sz {
            1 => $a.$op(R8[$d], $i),
            2 => $a.$op(R16[$d], $i),
            4 => $a.$op(R32[$d], $i),
            _ => $a.$op(R64[$d], $i),
        }
        .unwrap()
    };
}
/// The scratch byte at `disp` as a memory operand: [r15 + disp], or the same
/// address through an index, [r15 + r15*2 + disp - 2*SCRATCH] or
/// [r15*4 + disp - 3*SCRATCH] (R15 holds SCRATCH throughout), so that every
/// addressing form is compared.
fn at(disp: i32) -> AsmMemoryOperand {
    let s = SCRATCH as i32;
    match disp % 4 {
        2 => r15 + r15 * 2 + (disp - 2 * s),
        3 => r15 * 4 + (disp - 3 * s),
        _ => r15 + disp,
    }
}

/// Register, memory.
macro_rules! rm {
    ($a:expr, $op:ident, $sz:expr, $d:expr, $disp:expr) => {
        match $sz {
            1 => $a.$op(R8[$d], byte_ptr(at($disp))),
            2 => $a.$op(R16[$d], word_ptr(at($disp))),
            4 => $a.$op(R32[$d], dword_ptr(at($disp))),
            _ => $a.$op(R64[$d], qword_ptr(at($disp))),
        }
        .unwrap()
    };
}
/// Memory, register.
macro_rules! mr {
    ($a:expr, $op:ident, $sz:expr, $disp:expr, $s:expr) => {
        match $sz {
            1 => $a.$op(byte_ptr(at($disp)), R8[$s]),
            2 => $a.$op(word_ptr(at($disp)), R16[$s]),
            4 => $a.$op(dword_ptr(at($disp)), R32[$s]),
            _ => $a.$op(qword_ptr(at($disp)), R64[$s]),
        }
        .unwrap()
    };
}
/// Memory, immediate (or CL).
macro_rules! mi {
    ($a:expr, $op:ident, $sz:expr, $disp:expr, $i:expr) => {
        match $sz {
            1 => $a.$op(byte_ptr(at($disp)), $i),
            2 => $a.$op(word_ptr(at($disp)), $i),
            4 => $a.$op(dword_ptr(at($disp)), $i),
            _ => $a.$op(qword_ptr(at($disp)), $i),
        }
        .unwrap()
    };
}
/// One register operand.
macro_rules! r1 {
    ($a:expr, $op:ident, $sz:expr, $d:expr) => {
        match $sz {
            1 => $a.$op(R8[$d]),
            2 => $a.$op(R16[$d]),
            4 => $a.$op(R32[$d]),
            _ => $a.$op(R64[$d]),
        }
        .unwrap()
    };
}
/// One memory operand.
macro_rules! m1 {
    ($a:expr, $op:ident, $sz:expr, $disp:expr) => {
        match $sz {
            1 => $a.$op(byte_ptr(at($disp))),
            2 => $a.$op(word_ptr(at($disp))),
            4 => $a.$op(dword_ptr(at($disp))),
            _ => $a.$op(qword_ptr(at($disp))),
        }
        .unwrap()
    };
}

/// Flags each condition code (0..16, the low nibble of Jcc/SETcc/CMOVcc) reads.
fn cc_flags(cc: u8) -> u64 {
    match cc >> 1 {
        0 => OF,
        1 => CF,
        2 => ZF,
        3 => CF | ZF,
        4 => SF,
        5 => PF,
        6 => SF | OF,
        _ => ZF | SF | OF,
    }
}

/// The operands of an SSE instruction in the generator's table.
#[derive(Clone, Copy)]
enum Sse {
    /// xmm, xmm/m128 (aligned).
    A,
    /// `A` with an immediate byte (below 8 if `true`: a predicate).
    AI(bool),
    /// xmm, xmm/m128 (any alignment).
    U,
    /// xmm, xmm/m32 or m64 (any alignment).
    S,
    /// `S` with a predicate (0..8).
    SI,
    /// COMIS/UCOMIS: `S` that writes the arithmetic flags.
    Comi,
    /// xmm, r/m32 or r/m64 (CVTSI2SS/SD, MOVD/MOVQ to XMM).
    FromGpr,
    /// r32/r64, xmm/m32 or m64 (CVT(T)SS2SI/SD2SI).
    ToGpr,
    /// r32/r64, xmm register (MOVMSKPS/PD, PMOVMSKB).
    Msk,
    /// xmm/m, xmm (stores; an aligned m128 if `true`).
    St(bool),
    /// m, xmm (memory only; an aligned m128 if `true`).
    StM(bool),
    /// xmm, m64 (memory only).
    Ld,
    /// Shift by an immediate: the ModRM reg fields that exist.
    Sh(&'static [u8]),
    /// PINSRW xmm, r32/m16, imm8.
    Pinsrw,
    /// PEXTRW r32, xmm, imm8.
    Pextrw,
    /// r/m32 or r/m64, xmm (MOVD/MOVQ from XMM).
    MovOut,
    /// MASKMOVDQU xmm, xmm (stores at DS:RDI).
    Mask,
    /// mm, mm/m64 (with an immediate if `true`).
    Mm(bool),
    /// MMX shift by an immediate: the ModRM reg fields that exist.
    MmSh(&'static [u8]),
    /// mm, r/m32 or r/m64 (MOVD/MOVQ), or r/m, mm if `true`.
    MmGpr(bool),
    /// r32, mm (PMOVMSKB; PEXTRW with an immediate if `true`).
    GprMm(bool),
    /// PINSRW mm, r32/m16, imm8.
    MmPinsrw,
    /// mm/m64, mm (a store; memory only if `true`).
    MmSt(bool),
    /// MASKMOVQ mm, mm.
    MmMask,
    /// xmm, mm (or m64 if `true`): MOVQ2DQ, CVTPI2PS/PD.
    XmmMm(bool),
    /// mm, xmm (or memory of that many bytes, 0 for none): MOVDQ2Q,
    /// CVT(T)PS2PI, CVT(T)PD2PI.
    MmXmm(i32),
    /// EMMS.
    Emms,
}

/// The SSE/SSE2 instructions generated: mandatory prefix, opcode (after
/// 0x0f), operands.
#[rustfmt::skip]
const SSE: &[(u8, u8, Sse)] = {
    use Sse::*;
    &[
        // SQRT, ADD, MUL, SUB, MIN, DIV, MAX: ps, pd, ss, sd.
        (0, 0x51, A), (0x66, 0x51, A), (0xf3, 0x51, S), (0xf2, 0x51, S),
        (0, 0x58, A), (0x66, 0x58, A), (0xf3, 0x58, S), (0xf2, 0x58, S),
        (0, 0x59, A), (0x66, 0x59, A), (0xf3, 0x59, S), (0xf2, 0x59, S),
        (0, 0x5c, A), (0x66, 0x5c, A), (0xf3, 0x5c, S), (0xf2, 0x5c, S),
        (0, 0x5d, A), (0x66, 0x5d, A), (0xf3, 0x5d, S), (0xf2, 0x5d, S),
        (0, 0x5e, A), (0x66, 0x5e, A), (0xf3, 0x5e, S), (0xf2, 0x5e, S),
        (0, 0x5f, A), (0x66, 0x5f, A), (0xf3, 0x5f, S), (0xf2, 0x5f, S),
        // CMPcc, COMIS, UCOMIS.
        (0, 0xc2, AI(true)), (0x66, 0xc2, AI(true)), (0xf3, 0xc2, SI), (0xf2, 0xc2, SI),
        (0, 0x2e, Comi), (0x66, 0x2e, Comi), (0, 0x2f, Comi), (0x66, 0x2f, Comi),
        // AND, ANDN, OR, XOR; UNPCKL, UNPCKH, SHUF.
        (0, 0x54, A), (0x66, 0x54, A), (0, 0x55, A), (0x66, 0x55, A),
        (0, 0x56, A), (0x66, 0x56, A), (0, 0x57, A), (0x66, 0x57, A),
        (0, 0x14, A), (0x66, 0x14, A), (0, 0x15, A), (0x66, 0x15, A),
        (0, 0xc6, AI(false)), (0x66, 0xc6, AI(false)),
        // Conversions.
        (0, 0x5a, S), (0x66, 0x5a, A), (0xf3, 0x5a, S), (0xf2, 0x5a, S),
        (0, 0x5b, A), (0x66, 0x5b, A), (0xf3, 0x5b, A),
        (0x66, 0xe6, A), (0xf2, 0xe6, A), (0xf3, 0xe6, S),
        (0xf3, 0x2a, FromGpr), (0xf2, 0x2a, FromGpr),
        (0xf3, 0x2c, ToGpr), (0xf2, 0x2c, ToGpr), (0xf3, 0x2d, ToGpr), (0xf2, 0x2d, ToGpr),
        // Moves.
        (0, 0x10, U), (0x66, 0x10, U), (0xf3, 0x10, S), (0xf2, 0x10, S),
        (0, 0x11, St(false)), (0x66, 0x11, St(false)), (0xf3, 0x11, St(false)),
        (0xf2, 0x11, St(false)),
        (0, 0x28, A), (0x66, 0x28, A), (0, 0x29, St(true)), (0x66, 0x29, St(true)),
        (0, 0x12, S), (0, 0x16, S), (0x66, 0x12, Ld), (0x66, 0x16, Ld),
        (0, 0x13, StM(false)), (0x66, 0x13, StM(false)), (0, 0x17, StM(false)),
        (0x66, 0x17, StM(false)),
        (0, 0x2b, StM(true)), (0x66, 0x2b, StM(true)), (0x66, 0xe7, StM(true)),
        (0, 0x50, Msk), (0x66, 0x50, Msk), (0x66, 0xd7, Msk),
        (0x66, 0x6e, FromGpr), (0x66, 0x7e, MovOut), (0xf3, 0x7e, S), (0x66, 0xd6, St(false)),
        (0x66, 0x6f, A), (0xf3, 0x6f, U), (0x66, 0x7f, St(true)), (0xf3, 0x7f, St(false)),
        // SSE2 integer.
        (0x66, 0x60, A), (0x66, 0x61, A), (0x66, 0x62, A), (0x66, 0x63, A),
        (0x66, 0x64, A), (0x66, 0x65, A), (0x66, 0x66, A), (0x66, 0x67, A),
        (0x66, 0x68, A), (0x66, 0x69, A), (0x66, 0x6a, A), (0x66, 0x6b, A),
        (0x66, 0x6c, A), (0x66, 0x6d, A), (0x66, 0x74, A), (0x66, 0x75, A), (0x66, 0x76, A),
        (0x66, 0x70, AI(false)), (0xf3, 0x70, AI(false)), (0xf2, 0x70, AI(false)),
        (0x66, 0x71, Sh(&[2, 4, 6])), (0x66, 0x72, Sh(&[2, 4, 6])), (0x66, 0x73, Sh(&[2, 3, 6, 7])),
        (0x66, 0xd1, A), (0x66, 0xd2, A), (0x66, 0xd3, A), (0x66, 0xd4, A), (0x66, 0xd5, A),
        (0x66, 0xd8, A), (0x66, 0xd9, A), (0x66, 0xda, A), (0x66, 0xdb, A),
        (0x66, 0xdc, A), (0x66, 0xdd, A), (0x66, 0xde, A), (0x66, 0xdf, A),
        (0x66, 0xe0, A), (0x66, 0xe1, A), (0x66, 0xe2, A), (0x66, 0xe3, A),
        (0x66, 0xe4, A), (0x66, 0xe5, A),
        (0x66, 0xe8, A), (0x66, 0xe9, A), (0x66, 0xea, A), (0x66, 0xeb, A),
        (0x66, 0xec, A), (0x66, 0xed, A), (0x66, 0xee, A), (0x66, 0xef, A),
        (0x66, 0xf1, A), (0x66, 0xf2, A), (0x66, 0xf3, A), (0x66, 0xf4, A),
        (0x66, 0xf5, A), (0x66, 0xf6, A),
        (0x66, 0xf8, A), (0x66, 0xf9, A), (0x66, 0xfa, A), (0x66, 0xfb, A),
        (0x66, 0xfc, A), (0x66, 0xfd, A), (0x66, 0xfe, A),
        (0x66, 0xc4, Pinsrw), (0x66, 0xc5, Pextrw), (0x66, 0xf7, Mask),
        // MMX, and the SSE/SSE2 instructions on MM registers.
        (0, 0x60, Mm(false)), (0, 0x61, Mm(false)), (0, 0x62, Mm(false)), (0, 0x63, Mm(false)),
        (0, 0x64, Mm(false)), (0, 0x65, Mm(false)), (0, 0x66, Mm(false)), (0, 0x67, Mm(false)),
        (0, 0x68, Mm(false)), (0, 0x69, Mm(false)), (0, 0x6a, Mm(false)), (0, 0x6b, Mm(false)),
        (0, 0x74, Mm(false)), (0, 0x75, Mm(false)), (0, 0x76, Mm(false)), (0, 0x70, Mm(true)),
        (0, 0x71, MmSh(&[2, 4, 6])), (0, 0x72, MmSh(&[2, 4, 6])), (0, 0x73, MmSh(&[2, 6])),
        (0, 0xd1, Mm(false)), (0, 0xd2, Mm(false)), (0, 0xd3, Mm(false)), (0, 0xd4, Mm(false)),
        (0, 0xd5, Mm(false)), (0, 0xd8, Mm(false)), (0, 0xd9, Mm(false)), (0, 0xda, Mm(false)),
        (0, 0xdb, Mm(false)), (0, 0xdc, Mm(false)), (0, 0xdd, Mm(false)), (0, 0xde, Mm(false)),
        (0, 0xdf, Mm(false)), (0, 0xe0, Mm(false)), (0, 0xe1, Mm(false)), (0, 0xe2, Mm(false)),
        (0, 0xe3, Mm(false)), (0, 0xe4, Mm(false)), (0, 0xe5, Mm(false)), (0, 0xe8, Mm(false)),
        (0, 0xe9, Mm(false)), (0, 0xea, Mm(false)), (0, 0xeb, Mm(false)), (0, 0xec, Mm(false)),
        (0, 0xed, Mm(false)), (0, 0xee, Mm(false)), (0, 0xef, Mm(false)), (0, 0xf1, Mm(false)),
        (0, 0xf2, Mm(false)), (0, 0xf3, Mm(false)), (0, 0xf4, Mm(false)), (0, 0xf5, Mm(false)),
        (0, 0xf6, Mm(false)), (0, 0xf8, Mm(false)), (0, 0xf9, Mm(false)), (0, 0xfa, Mm(false)),
        (0, 0xfb, Mm(false)), (0, 0xfc, Mm(false)), (0, 0xfd, Mm(false)), (0, 0xfe, Mm(false)),
        (0, 0x6e, MmGpr(false)), (0, 0x7e, MmGpr(true)), (0, 0x6f, Mm(false)), (0, 0x7f, MmSt(false)),
        (0, 0xe7, MmSt(true)), (0, 0xd7, GprMm(false)), (0, 0xc5, GprMm(true)), (0, 0xc4, MmPinsrw),
        (0, 0xf7, MmMask), (0xf3, 0xd6, XmmMm(false)), (0xf2, 0xd6, MmXmm(0)),
        (0, 0x2a, XmmMm(true)), (0x66, 0x2a, XmmMm(true)), (0, 0x2c, MmXmm(8)), (0, 0x2d, MmXmm(8)),
        (0x66, 0x2c, MmXmm(16)), (0x66, 0x2d, MmXmm(16)), (0, 0x77, Emms),
    ]
};

struct Gen<'r> {
    rng: &'r mut Rng,
    a: CodeAssembler,
    /// Arithmetic flags whose current value the SDM defines.
    defined: u64,
    /// An x87 sequence (x87 instructions generated).
    x87: bool,
    /// The condition codes (C0 C1 C2 C3 in the status word) whose value
    /// at the end is not compared: see [`Gen::x87_cc`].
    cc_skip: u16,
    /// SSE and MMX instructions generated too (not in the system-level
    /// sequences, whose #AC checks cover integer accesses only).
    sse: bool,
}

impl Gen<'_> {
    fn flags(&mut self, defined: u64, undefined: u64) {
        self.defined = (self.defined & !undefined) | defined;
    }
    /// A register the sequence may write: not RSP (stack) nor R15 (scratch base).
    fn dst(&mut self) -> usize {
        loop {
            let r = self.rng.below(15) as usize;
            if r != 4 {
                return r;
            }
        }
    }
    fn src(&mut self) -> usize {
        self.rng.below(16) as usize
    }
    fn size(&mut self) -> u32 {
        [1, 2, 4, 8][self.rng.below(4) as usize]
    }
    fn size_no8(&mut self) -> u32 {
        [2, 4, 8][self.rng.below(3) as usize]
    }
    fn disp(&mut self) -> i32 {
        self.rng.below(0x1000 - 8) as i32
    }
    fn imm(&mut self, sz: u32) -> i32 {
        let v = self.rng.value();
        match sz {
            1 => v as i8 as i32,
            2 => v as i16 as i32,
            _ => v as i32,
        }
    }
    /// Raw bytes: optional 0x66, REX, opcode bytes, ModRM for `reg` with a
    /// register (`rm` < 16) or [r15 + disp32] (`rm` = None).
    fn raw(&mut self, sz: u32, opcode: &[u8], reg: usize, rm: Option<usize>, disp: i32) {
        let mut b = Vec::new();
        if sz == 2 {
            b.push(0x66);
        }
        let rmr = rm.unwrap_or(15);
        let rex = 0x40
            | if sz == 8 { 8 } else { 0 }
            | if reg >= 8 { 4 } else { 0 }
            | if rmr >= 8 { 1 } else { 0 };
        b.push(rex);
        b.extend_from_slice(opcode);
        match rm {
            Some(r) => b.push(0xc0 | ((reg as u8 & 7) << 3) | (r as u8 & 7)),
            None => {
                b.push(0x80 | ((reg as u8 & 7) << 3) | 7);
                b.extend_from_slice(&disp.to_le_bytes());
            }
        }
        self.a.db(&b).unwrap();
    }

    /// An SSE instruction: mandatory prefix, REX (W, R, B), 0x0f, `op`,
    /// ModRM for `reg` with a register `rm` or [r15 + disp32], an immediate.
    #[allow(clippy::too_many_arguments)]
    fn sse_raw(
        &mut self,
        pfx: u8,
        w: bool,
        op: u8,
        reg: usize,
        rm: Option<usize>,
        disp: i32,
        imm: Option<u8>,
    ) {
        let mut b = Vec::new();
        if pfx != 0 {
            b.push(pfx);
        }
        let rmr = rm.unwrap_or(15);
        b.push(0x40 | (w as u8) << 3 | ((reg >= 8) as u8) << 2 | (rmr >= 8) as u8);
        b.extend_from_slice(&[0x0f, op]);
        match rm {
            Some(r) => b.push(0xc0 | ((reg as u8 & 7) << 3) | (r as u8 & 7)),
            None => {
                b.push(0x80 | ((reg as u8 & 7) << 3) | 7);
                b.extend_from_slice(&disp.to_le_bytes());
            }
        }
        b.extend(imm);
        self.a.db(&b).unwrap();
    }

    /// XMM0-15 and MXCSR from the stack page (`fill_fp_scratch`), the x87
    /// initialized, MM0-7 from the stack page: the state the SSE, MMX and
    /// x87 instructions start from, the same on every engine.
    fn load_simd_state(&mut self) {
        for k in 0..16 {
            self.sse_raw(0xf3, false, 0x6f, k, None, XMM_IN + 16 * k as i32, None);
        }
        self.a.ldmxcsr(dword_ptr(r15 + MXCSR_IN)).unwrap();
        self.a.fninit().unwrap();
        for k in 0..8 {
            self.sse_raw(0, false, 0x6f, k, None, MM_IN + 8 * k as i32, None);
        }
    }

    /// One instruction of the SSE table, random operands.
    fn sse(&mut self) {
        let (pfx, op, kind) = SSE[self.rng.below(SSE.len() as u64) as usize];
        let (x, y) = (self.rng.below(16) as usize, self.rng.below(16) as usize);
        let mem = self.rng.chance(3);
        let disp16 = self.rng.below(0x1000 - 16) as i32;
        let aligned = disp16 & !15;
        let imm = self.rng.next() as u8;
        let w = self.rng.chance(2);
        let rm = |m: bool| (!m).then_some(y);
        match kind {
            Sse::A => self.sse_raw(pfx, false, op, x, rm(mem), aligned, None),
            Sse::AI(pred) => {
                let imm = if pred { imm & 7 } else { imm };
                self.sse_raw(pfx, false, op, x, rm(mem), aligned, Some(imm))
            }
            Sse::U => self.sse_raw(pfx, false, op, x, rm(mem), disp16, None),
            Sse::S => self.sse_raw(pfx, false, op, x, rm(mem), disp16, None),
            Sse::SI => self.sse_raw(pfx, false, op, x, rm(mem), disp16, Some(imm & 7)),
            Sse::Comi => {
                self.sse_raw(pfx, false, op, x, rm(mem), disp16, None);
                self.flags(ARITH, 0);
            }
            Sse::FromGpr => {
                let g = self.src();
                self.sse_raw(pfx, w, op, x, rm(mem).map(|_| g), disp16, None)
            }
            Sse::ToGpr | Sse::Msk => {
                let d = self.dst();
                let mem = mem && matches!(kind, Sse::ToGpr);
                self.sse_raw(pfx, w, op, d, rm(mem), disp16, None)
            }
            Sse::St(true) => self.sse_raw(pfx, false, op, x, rm(mem), aligned, None),
            Sse::St(false) => self.sse_raw(pfx, false, op, x, rm(mem), disp16, None),
            Sse::StM(a) => {
                let disp = if a { aligned } else { disp16 };
                self.sse_raw(pfx, false, op, x, None, disp, None)
            }
            Sse::Ld => self.sse_raw(pfx, false, op, x, None, disp16, None),
            Sse::Sh(regs) => {
                let r = regs[self.rng.below(regs.len() as u64) as usize] as usize;
                let count = if self.rng.chance(4) { imm } else { imm & 0x3f };
                self.sse_raw(pfx, false, op, r, Some(y), 0, Some(count))
            }
            Sse::Pinsrw => {
                let g = self.src();
                self.sse_raw(pfx, false, op, x, rm(mem).map(|_| g), disp16, Some(imm))
            }
            Sse::Pextrw => {
                let d = self.dst();
                self.sse_raw(pfx, false, op, d, Some(y), 0, Some(imm))
            }
            Sse::MovOut => {
                let d = self.dst();
                // reg = the XMM source, rm = the destination.
                self.sse_raw(pfx, w, op, x, rm(mem).map(|_| d), disp16, None)
            }
            Sse::Mask => {
                self.a.lea(rdi, r15 + disp16).unwrap();
                self.sse_raw(pfx, false, op, x, Some(y), 0, None)
            }
            Sse::Mm(i) => {
                let imm = i.then_some(imm);
                self.sse_raw(pfx, false, op, x & 7, rm(mem).map(|r| r & 7), disp16, imm)
            }
            Sse::MmSh(regs) => {
                let r = regs[self.rng.below(regs.len() as u64) as usize] as usize;
                let count = if self.rng.chance(4) { imm } else { imm & 0x3f };
                self.sse_raw(pfx, false, op, r, Some(y & 7), 0, Some(count))
            }
            Sse::MmGpr(to_gpr) => {
                let g = if to_gpr { self.dst() } else { self.src() };
                self.sse_raw(pfx, w, op, x & 7, rm(mem).map(|_| g), disp16, None)
            }
            Sse::GprMm(i) => {
                let d = self.dst();
                self.sse_raw(pfx, false, op, d, Some(y & 7), 0, i.then_some(imm))
            }
            Sse::MmPinsrw => {
                let g = self.src();
                self.sse_raw(pfx, false, op, x & 7, rm(mem).map(|_| g), disp16, Some(imm))
            }
            Sse::MmSt(mem_only) => {
                let rm = rm(mem || mem_only).map(|r| r & 7);
                self.sse_raw(pfx, false, op, x & 7, rm, disp16, None)
            }
            Sse::MmMask => {
                self.a.lea(rdi, r15 + disp16).unwrap();
                self.sse_raw(pfx, false, op, x & 7, Some(y & 7), 0, None)
            }
            Sse::XmmMm(mem_ok) => {
                let rm = rm(mem && mem_ok).map(|r| r & 7);
                self.sse_raw(pfx, false, op, x, rm, disp16, None)
            }
            Sse::MmXmm(size) => {
                let disp = if size == 16 { aligned } else { disp16 };
                self.sse_raw(pfx, false, op, x & 7, rm(mem && size > 0), disp, None)
            }
            Sse::Emms => self.a.db(&[0x0f, 0x77]).unwrap(),
        }
    }

    fn alu2(&mut self) {
        let mut op = self.rng.below(8);
        // ADC/SBB read CF: only while it is defined.
        if (op == 1 || op == 3) && self.defined & CF == 0 {
            op -= 1;
        }
        let sz = self.size();
        let form = self.rng.below(5);
        let (d, s, disp) = (self.dst(), self.src(), self.disp());
        let imm = self.imm(sz);
        macro_rules! forms {
            ($op:ident) => {
                match form {
                    0 => rr!(self.a, $op, sz, d, s),
                    1 => ri!(self.a, $op, sz, d, imm),
                    2 => rm!(self.a, $op, sz, d, disp),
                    3 => mr!(self.a, $op, sz, disp, s),
                    _ => mi!(self.a, $op, sz, disp, imm),
                }
            };
        }
        match op {
            0 => forms!(add),
            1 => forms!(adc),
            2 => forms!(sub),
            3 => forms!(sbb),
            4 => forms!(and),
            5 => forms!(or),
            6 => forms!(xor),
            _ => forms!(cmp),
        }
        if (4..7).contains(&op) {
            self.flags(ALL_BUT_AF, AF);
        } else {
            self.flags(ARITH, 0);
        }
    }

    fn shift(&mut self) {
        let op = self.rng.below(5);
        let sz = self.size();
        let by_cl = self.rng.chance(3);
        let count: u32 = if by_cl {
            self.rng.below(256) as u32
        } else if self.rng.chance(3) {
            1
        } else {
            self.rng.below(64) as u32
        };
        if by_cl {
            self.a.mov(cl, count as i32 as i8 as i32).unwrap();
        }
        let mem = self.rng.chance(4);
        let (d, disp) = (self.dst(), self.disp());
        macro_rules! go {
            ($op:ident) => {
                match (mem, by_cl) {
                    (false, false) => ri!(self.a, $op, sz, d, count as i32),
                    (false, true) => ri!(self.a, $op, sz, d, cl),
                    (true, false) => mi!(self.a, $op, sz, disp, count as i32),
                    (true, true) => mi!(self.a, $op, sz, disp, cl),
                }
            };
        }
        match op {
            0 => go!(shl),
            1 => go!(shr),
            2 => go!(sar),
            3 => go!(rol),
            _ => go!(ror),
        }
        let c = count & if sz == 8 { 63 } else { 31 };
        if c == 0 {
            return; // flags unaffected
        }
        let of = if c == 1 { OF } else { 0 };
        if op < 3 {
            // SHL/SHR: CF undefined when the count is >= the operand size.
            let cf = if op < 2 && c >= sz * 8 { 0 } else { CF };
            self.flags(cf | of | SF | ZF | PF, (CF & !cf) | (OF & !of) | AF);
        } else {
            self.flags(CF | of, OF & !of);
        }
    }

    fn one(&mut self) {
        let op = self.rng.below(4);
        let sz = self.size();
        let mem = self.rng.chance(3);
        let (d, disp) = (self.dst(), self.disp());
        macro_rules! go {
            ($op:ident) => {
                if mem {
                    m1!(self.a, $op, sz, disp)
                } else {
                    r1!(self.a, $op, sz, d)
                }
            };
        }
        match op {
            0 => {
                go!(inc);
                self.flags(ARITH & !CF, 0)
            }
            1 => {
                go!(dec);
                self.flags(ARITH & !CF, 0)
            }
            2 => {
                go!(neg);
                self.flags(ARITH, 0)
            }
            _ => go!(not),
        }
    }

    fn imul(&mut self) {
        let sz = self.size_no8();
        let (d, s, disp) = (self.dst(), self.src(), self.disp());
        let imm = self.imm(sz);
        let a = &mut self.a;
        match (self.rng.below(4), sz) {
            (0, 2) => a.imul_2(R16[d], R16[s]),
            (0, 4) => a.imul_2(R32[d], R32[s]),
            (0, _) => a.imul_2(R64[d], R64[s]),
            (1, 2) => a.imul_2(R16[d], word_ptr(at(disp))),
            (1, 4) => a.imul_2(R32[d], dword_ptr(at(disp))),
            (1, _) => a.imul_2(R64[d], qword_ptr(at(disp))),
            (2, 2) => a.imul_3(R16[d], R16[s], imm),
            (2, 4) => a.imul_3(R32[d], R32[s], imm),
            (2, _) => a.imul_3(R64[d], R64[s], imm),
            (_, 2) => a.imul_3(R16[d], word_ptr(at(disp)), imm),
            (_, 4) => a.imul_3(R32[d], dword_ptr(at(disp)), imm),
            (_, _) => a.imul_3(R64[d], qword_ptr(at(disp)), imm),
        }
        .unwrap();
        self.flags(CF | OF, SF | ZF | AF | PF);
    }

    fn mul(&mut self) {
        let sz = self.size();
        let (s, disp) = (self.src(), self.disp());
        let mem = self.rng.chance(3);
        if self.rng.chance(2) {
            if mem {
                m1!(self.a, mul, sz, disp)
            } else {
                r1!(self.a, mul, sz, s)
            }
        } else if mem {
            m1!(self.a, imul, sz, disp)
        } else {
            r1!(self.a, imul, sz, s)
        }
        self.flags(CF | OF, SF | ZF | AF | PF);
    }

    /// DIV with RDX = 0 and an odd divisor: no #DE (quotient <= dividend).
    fn div(&mut self) {
        let sz = self.size_no8();
        let d = loop {
            let d = self.dst();
            if d != 0 && d != 2 {
                break d;
            }
        };
        ri!(self.a, or, sz, d, 1);
        self.a.xor(edx, edx).unwrap();
        r1!(self.a, div, sz, d);
        self.flags(0, ARITH);
    }

    fn lea(&mut self) {
        let sz = self.size_no8();
        let d = self.dst();
        let b = self.src();
        let i = loop {
            let i = self.src();
            if i != 4 {
                break i;
            }
        };
        let scale = [1u32, 2, 4, 8][self.rng.below(4) as usize];
        let disp = self.rng.value() as i32;
        let a32 = self.rng.chance(3);
        let a = &mut self.a;
        if a32 {
            let m = R32[b] + R32[i] * scale + disp;
            match sz {
                2 => a.lea(R16[d], m),
                4 => a.lea(R32[d], m),
                _ => a.lea(R64[d], m),
            }
        } else {
            let m = R64[b] + R64[i] * scale + disp;
            match sz {
                2 => a.lea(R16[d], m),
                4 => a.lea(R32[d], m),
                _ => a.lea(R64[d], m),
            }
        }
        .unwrap();
    }

    fn extend(&mut self) {
        let (d, s, disp) = (self.dst(), self.src(), self.disp());
        let mem = self.rng.chance(3);
        let a = &mut self.a;
        let sign = self.rng.chance(2);
        let which = self.rng.below(6);
        macro_rules! go {
            ($op:ident) => {
                match (which, mem) {
                    (0, false) => a.$op(R16[d], R8[s]),
                    (0, true) => a.$op(R16[d], byte_ptr(at(disp))),
                    (1, false) => a.$op(R32[d], R8[s]),
                    (1, true) => a.$op(R32[d], byte_ptr(at(disp))),
                    (2, false) => a.$op(R64[d], R8[s]),
                    (2, true) => a.$op(R64[d], byte_ptr(at(disp))),
                    (3, false) => a.$op(R32[d], R16[s]),
                    (3, true) => a.$op(R32[d], word_ptr(at(disp))),
                    (_, false) => a.$op(R64[d], R16[s]),
                    (_, true) => a.$op(R64[d], word_ptr(at(disp))),
                }
            };
        }
        if which == 5 && sign {
            if mem {
                a.movsxd(R64[d], dword_ptr(at(disp)))
            } else {
                a.movsxd(R64[d], R32[s])
            }
        } else if sign {
            go!(movsx)
        } else {
            go!(movzx)
        }
        .unwrap();
    }

    fn mov(&mut self) {
        let sz = self.size();
        let (d, s, disp) = (self.dst(), self.src(), self.disp());
        let imm = self.imm(sz);
        match self.rng.below(5) {
            0 => rr!(self.a, mov, sz, d, s),
            1 => match sz {
                1 => self.a.mov(R8[d], imm),
                2 => self.a.mov(R16[d], imm),
                4 => self.a.mov(R32[d], imm),
                _ => self.a.mov(R64[d], self.rng.value()),
            }
            .unwrap(),
            2 => rm!(self.a, mov, sz, d, disp),
            3 => mr!(self.a, mov, sz, disp, s),
            _ => mi!(self.a, mov, sz, disp, imm),
        }
    }

    fn test(&mut self) {
        let sz = self.size();
        let (d, s, disp) = (self.dst(), self.src(), self.disp());
        let imm = self.imm(sz);
        match self.rng.below(3) {
            0 => rr!(self.a, test, sz, d, s),
            1 => ri!(self.a, test, sz, d, imm),
            _ => mr!(self.a, test, sz, disp, s),
        }
        self.flags(ALL_BUT_AF, AF);
    }

    fn xchg(&mut self) {
        let sz = self.size();
        let (d, s, disp) = (self.dst(), self.dst(), self.disp());
        if self.rng.chance(2) {
            rr!(self.a, xchg, sz, d, s)
        } else {
            mr!(self.a, xchg, sz, disp, s)
        }
    }

    fn bswap(&mut self) {
        let d = self.dst();
        if self.rng.chance(2) {
            self.a.bswap(R32[d]).unwrap()
        } else {
            self.a.bswap(R64[d]).unwrap()
        }
    }

    /// A condition code whose flags are all defined, if any.
    fn cc(&mut self) -> Option<u8> {
        for _ in 0..8 {
            let cc = self.rng.below(16) as u8;
            if cc_flags(cc) & !self.defined == 0 {
                return Some(cc);
            }
        }
        None
    }

    fn cmov(&mut self) {
        let Some(cc) = self.cc() else { return };
        let sz = self.size_no8();
        let (d, s, disp) = (self.dst(), self.src(), self.disp());
        let rm = (!self.rng.chance(3)).then_some(s);
        self.raw(sz, &[0x0f, 0x40 + cc], d, rm, disp);
    }

    fn setcc(&mut self) {
        let Some(cc) = self.cc() else { return };
        let (d, disp) = (self.dst(), self.disp());
        let rm = (!self.rng.chance(3)).then_some(d);
        self.raw(1, &[0x0f, 0x90 + cc], 0, rm, disp);
    }

    fn bt(&mut self) {
        let op = self.rng.below(4);
        let sz = self.size_no8();
        let (d, s, disp) = (self.dst(), self.dst(), self.disp());
        let form = self.rng.below(4);
        if form == 2 {
            // A register bit offset into memory: keep it inside the operand.
            ri!(self.a, and, sz, s, (sz * 8 - 1) as i32);
            self.flags(ALL_BUT_AF, AF);
        }
        let imm = self.rng.below(256) as i32;
        macro_rules! go {
            ($op:ident) => {
                match (form, sz) {
                    (0, 2) => self.a.$op(R16[d], R16[s]),
                    (0, 4) => self.a.$op(R32[d], R32[s]),
                    (0, _) => self.a.$op(R64[d], R64[s]),
                    (1, 2) => self.a.$op(R16[d], imm),
                    (1, 4) => self.a.$op(R32[d], imm),
                    (1, _) => self.a.$op(R64[d], imm),
                    (2, 2) => self.a.$op(word_ptr(at(disp)), R16[s]),
                    (2, 4) => self.a.$op(dword_ptr(at(disp)), R32[s]),
                    (2, _) => self.a.$op(qword_ptr(at(disp)), R64[s]),
                    (_, 2) => self.a.$op(word_ptr(at(disp)), imm),
                    (_, 4) => self.a.$op(dword_ptr(at(disp)), imm),
                    (_, _) => self.a.$op(qword_ptr(at(disp)), imm),
                }
                .unwrap()
            };
        }
        match op {
            0 => go!(bt),
            1 => go!(bts),
            2 => go!(btr),
            _ => go!(btc),
        }
        self.flags(CF, OF | SF | AF | PF);
    }

    fn push_pop(&mut self) {
        let (s, d, disp, disp2) = (self.src(), self.dst(), self.disp(), self.disp());
        let imm = self.imm(4);
        let a = &mut self.a;
        match self.rng.below(3) {
            0 => a.push(R64[s]),
            1 => a.push(qword_ptr(at(disp))),
            _ => a.push(imm),
        }
        .unwrap();
        if self.rng.chance(3) {
            a.pop(qword_ptr(at(disp2)))
        } else {
            a.pop(R64[d])
        }
        .unwrap();
    }

    /// A load onto the x87 stack: FLD m80 (the 80-bit values), FLD m64,
    /// FLD m32, FILD m32.
    fn fp_load(&mut self) {
        self.cc_skip &= !FSW_C1;
        match self.rng.below(4) {
            0 | 1 => {
                let slot = self.rng.below(16) as i32;
                self.raw(4, &[0xdb], 5, None, F80_IN + 16 * slot);
            }
            2 => {
                let d = self.disp();
                self.raw(4, &[0xdd], 0, None, d);
            }
            _ => {
                let d = self.disp();
                let op = [0xd9, 0xdb][self.rng.below(2) as usize];
                self.raw(4, &[op], 0, None, d);
            }
        }
    }

    /// An x87 instruction: register forms (ranges of ModRM bytes) and
    /// memory forms on the data page.
    fn fp(&mut self) {
        #[rustfmt::skip]
        const REG: &[(u8, u8, u8)] = &[
            (0xd8, 0xc0, 0xff), (0xd9, 0xc0, 0xcf), (0xd9, 0xd0, 0xd0), (0xd9, 0xd8, 0xdf),
            (0xd9, 0xe0, 0xe1), (0xd9, 0xe4, 0xe5), (0xd9, 0xe8, 0xee), (0xd9, 0xf6, 0xf7),
            (0xd9, 0xfa, 0xfa), (0xd9, 0xfc, 0xfd), (0xd9, 0xf4, 0xf4), (0xd9, 0xf5, 0xf5),
            (0xd9, 0xf8, 0xf8),
            (0xda, 0xc0, 0xdf), (0xda, 0xe9, 0xe9), (0xdb, 0xc0, 0xdf), (0xdb, 0xe2, 0xe2),
            (0xdb, 0xe8, 0xf7), (0xdc, 0xc0, 0xff), (0xdd, 0xc0, 0xef), (0xde, 0xc0, 0xd7),
            (0xde, 0xd9, 0xd9), (0xde, 0xe0, 0xff), (0xdf, 0xc0, 0xdf), (0xdf, 0xe0, 0xe0),
            (0xdf, 0xe8, 0xf7),
        ];
        // Memory forms: opcode and the ModRM reg fields generated (not
        // FISTTP: SSE3, which the model does not advertise). FPREM, FPREM1
        // (register forms above), FBLD and FBSTP are exact: anywhere.
        #[rustfmt::skip]
        const MEM: &[(u8, &[u8])] = &[
            (0xd8, &[0, 1, 2, 3, 4, 5, 6, 7]), (0xdc, &[0, 1, 2, 3, 4, 5, 6, 7]),
            (0xda, &[0, 1, 2, 3, 4, 5, 6, 7]), (0xde, &[0, 1, 2, 3, 4, 5, 6, 7]),
            (0xd9, &[0, 2, 3, 7]), (0xdd, &[0, 2, 3, 7]), (0xdb, &[0, 2, 3, 7]),
            (0xdf, &[0, 2, 3, 4, 5, 6, 7]),
        ];
        if self.rng.chance(6) {
            return self.fp_load();
        }
        if self.rng.chance(3) {
            let (op, regs) = MEM[self.rng.below(MEM.len() as u64) as usize];
            let reg = regs[self.rng.below(regs.len() as u64) as usize];
            if op == 0xdd && reg == 7 && self.cc_skip != 0 {
                // FNSTSW m16: as FNSTSW AX.
                return;
            }
            let d = self.rng.below(0x1000 - 16) as i32;
            self.raw(4, &[op], reg as usize, None, d);
            // All write C1 (FNSTCW and FNSTSW: none); FCOM m, FICOM m:
            // C0-C3.
            match (op, reg) {
                (0xd9 | 0xdd, 7) => {}
                (0xd8 | 0xdc | 0xda | 0xde, 2 | 3) => self.cc_skip = 0,
                _ => self.cc_skip &= !FSW_C1,
            }
            return;
        }
        let (op, lo, hi) = REG[self.rng.below(REG.len() as u64) as usize];
        let modrm = lo + self.rng.below((hi - lo) as u64 + 1) as u8;
        if op == 0xdf && modrm == 0xe0 && self.cc_skip != 0 {
            // FNSTSW AX would show condition codes not compared.
            return;
        }
        let fcmov = (op == 0xda || op == 0xdb) && modrm < 0xe0;
        if fcmov && (CF | ZF | PF) & !self.defined != 0 {
            return;
        }
        if (op == 0xdb || op == 0xdf) && modrm >= 0xe8 {
            // FCOMI, FUCOMI(P): ZF, PF, CF; OF, SF, AF cleared.
            self.flags(ARITH, 0);
        }
        self.a.db(&[op, modrm]).unwrap();
        self.x87_cc(op, modrm);
    }

    /// The condition codes after the register form `op modrm`, where this
    /// host's x87 (AMD) and the SDM part ways, are not compared until an
    /// instruction writes them again:
    /// - FCOMI, FCOMIP, FUCOMI, FUCOMIP: the SDM has C1 "set to 0" (vol. 2
    ///   FCOMI/FCOMIP/FUCOMI/FUCOMIP, FPU flags affected); the host leaves
    ///   it.
    /// - FNOP, FNCLEX, FFREE (and the undocumented FFREEP): C0-C3 are
    ///   undefined (vol. 2 FNOP, FCLEX/FNCLEX, FFREE).
    ///
    /// FCOM, FUCOM, FTST, FXAM and their pops write all four; FPREM and
    /// FPREM1 C1 and C2 (C0 and C3 only with ordered operands); FCMOVcc,
    /// FNSTSW: none; every other instruction C1.
    fn x87_cc(&mut self, op: u8, modrm: u8) {
        const ALL: u16 = FSW_C0 | FSW_C1 | FSW_C2 | FSW_C3;
        match (op, modrm) {
            (0xdb | 0xdf, 0xe8..=0xf7) => self.cc_skip |= FSW_C1,
            (0xd9, 0xd0) | (0xdb, 0xe2) | (0xdd | 0xdf, 0xc0..=0xc7) => self.cc_skip |= ALL,
            (0xd8 | 0xdc, 0xd0..=0xdf)
            | (0xd9, 0xe4 | 0xe5)
            | (0xda, 0xe9)
            | (0xdd, 0xe0..=0xef)
            | (0xde, 0xd0..=0xd7 | 0xd9) => self.cc_skip = 0,
            (0xd9, 0xf5 | 0xf8) => self.cc_skip &= !(FSW_C1 | FSW_C2),
            (0xda | 0xdb, 0xc0..=0xdf) | (0xdf, 0xe0) => {}
            _ => self.cc_skip &= !FSW_C1,
        }
    }

    /// Clears the implementation-specific fields of the FXSAVE image at
    /// `at`: FOP, FIP, FDP and MXCSR_MASK.
    fn clear_fx(&mut self, at: i32) {
        self.a.mov(word_ptr(r15 + (at + 6)), 0).unwrap();
        self.a.mov(qword_ptr(r15 + (at + 8)), 0).unwrap();
        self.a.mov(qword_ptr(r15 + (at + 16)), 0).unwrap();
        self.a.mov(dword_ptr(r15 + (at + 28)), 0).unwrap();
    }

    fn insn(&mut self) {
        if self.x87 && self.rng.chance(2) {
            return self.fp();
        }
        match self.rng.below(if self.sse { 24 } else { 18 }) {
            18.. => self.sse(),
            0 | 1 => self.mov(),
            2..=4 => self.alu2(),
            5 => self.test(),
            6 => self.one(),
            7 | 8 => self.shift(),
            9 => self.imul(),
            10 => self.mul(),
            11 => self.div(),
            12 => self.lea(),
            13 => self.extend(),
            14 => {
                if self.rng.chance(2) {
                    self.bswap()
                } else {
                    self.xchg()
                }
            }
            15 => {
                if self.rng.chance(2) {
                    self.cmov()
                } else {
                    self.setcc()
                }
            }
            16 => self.bt(),
            _ => self.push_pop(),
        }
    }
}

/// The transcendentals (the ModRM byte after D9): F2XM1, FYL2X, FPTAN,
/// FPATAN, FYL2XP1, FSINCOS, FSIN, FCOS. One of them may end an x87
/// sequence (see [`tolerate_tail`]).
const TAILS: [u8; 8] = [0xf0, 0xf1, 0xf2, 0xf3, 0xf9, 0xfb, 0xfe, 0xff];

/// Jcc with condition `cc` (the low nibble of its opcode) to `l`.
fn branch(a: &mut CodeAssembler, cc: u8, l: CodeLabel) {
    match cc {
        0 => a.jo(l),
        1 => a.jno(l),
        2 => a.jb(l),
        3 => a.jae(l),
        4 => a.je(l),
        5 => a.jne(l),
        6 => a.jbe(l),
        7 => a.ja(l),
        8 => a.js(l),
        9 => a.jns(l),
        10 => a.jp(l),
        11 => a.jnp(l),
        12 => a.jl(l),
        13 => a.jge(l),
        14 => a.jle(l),
        _ => a.jg(l),
    }
    .unwrap();
}

/// A random sequence: code bytes, the mask of arithmetic flags defined at
/// its end, and what its x87 comparison leaves out.
fn generate(rng: &mut Rng, x87: bool) -> (Vec<u8>, u64, Tail) {
    let mut g = Gen {
        rng,
        a: CodeAssembler::new(64).unwrap(),
        defined: ARITH,
        x87: false,
        cc_skip: 0,
        sse: true,
    };
    g.load_simd_state();
    g.x87 = x87 && g.rng.chance(2);
    if g.x87 {
        // EMMS, the control word, then 0-8 values on the stack.
        g.a.db(&[0x0f, 0x77]).unwrap();
        g.raw(4, &[0xd9], 5, None, FCW_IN);
        for _ in 0..g.rng.below(9) {
            g.fp_load();
        }
    }
    let n = 1 + g.rng.below(MAX_LEN as u64);
    // Forward conditional branches over the next 1-4 instructions (one open
    // at a time), on flags the SDM defines there: the flags defined after
    // the join are those defined on both ways.
    let mut open: Option<(CodeLabel, u64, u64)> = None;
    for _ in 0..n {
        if open.is_none() && !g.x87 && g.rng.chance(5) {
            if let Some(cc) = g.cc() {
                let l = g.a.create_label();
                branch(&mut g.a, cc, l);
                open = Some((l, 1 + g.rng.below(4), g.defined));
            }
        }
        g.insn();
        if let Some((mut l, left, defined)) = open {
            if left == 1 {
                g.a.set_label(&mut l).unwrap();
                g.defined &= defined;
                open = None;
                // (The label takes the next instruction: one follows.)
                g.a.nop().unwrap();
            } else {
                open = Some((l, left - 1, defined));
            }
        }
    }
    if let Some((mut l, _, defined)) = open {
        g.a.set_label(&mut l).unwrap();
        g.defined &= defined;
        g.a.nop().unwrap();
    }
    let tail = (g.x87 && g.rng.chance(2)).then(|| TAILS[g.rng.below(8) as usize]);
    let pre_skip = g.cc_skip;
    if let Some(op) = tail {
        if matches!(op, 0xf2 | 0xfb | 0xfe | 0xff) {
            // FSIN, FCOS, FSINCOS, FPTAN write C2 (C1: tolerate_tail).
            g.cc_skip &= !FSW_C2;
        }
        // The state it starts from, then the transcendental.
        g.raw(4, &[0x0f, 0xae], 0, None, FX_PRE);
        g.clear_fx(FX_PRE);
        g.a.db(&[0xd9, op]).unwrap();
    }
    for k in 0..16 {
        g.sse_raw(0xf3, false, 0x7f, k, None, XMM_OUT + 16 * k as i32, None);
    }
    g.a.stmxcsr(dword_ptr(r15 + MXCSR_OUT)).unwrap();
    for k in 0..8 {
        g.sse_raw(0, false, 0x7f, k, None, MM_OUT + 8 * k as i32, None);
    }
    g.a.fnstsw(word_ptr(r15 + FSW_OUT)).unwrap();
    g.raw(4, &[0x0f, 0xae], 0, None, FX_OUT);
    g.clear_fx(FX_OUT);
    g.a.out(PORT as i32, al).unwrap();
    let defined = g.defined;
    let tail = Tail {
        op: tail,
        cc_skip: g.cc_skip,
        pre_skip,
    };
    (g.a.assemble(CODE).unwrap(), defined, tail)
}

/// What the comparison of an x87 sequence leaves out: the transcendental
/// that ends it (`op`, see [`tolerate_tail`]) and the condition codes
/// `cc_skip` (see [`Gen::x87_cc`]).
struct Tail {
    op: Option<u8>,
    cc_skip: u16,
    /// `cc_skip` before the transcendental (for the FXSAVE image there).
    pre_skip: u16,
}

fn disassemble(code: &[u8]) -> String {
    let mut out = String::new();
    let mut dec = Decoder::with_ip(64, code, CODE, DecoderOptions::NONE);
    for ins in &mut dec {
        let off = (ins.ip() - CODE) as usize;
        let bytes: Vec<String> = code[off..off + ins.len()]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let ops: Vec<String> = (0..ins.op_count())
            .map(|i| match ins.op_kind(i) {
                OpKind::Register => format!("{:?}", ins.op_register(i)),
                OpKind::Memory => format!(
                    "[{:?}+{:?}*{}+{:#x}]",
                    ins.memory_base(),
                    ins.memory_index(),
                    ins.memory_index_scale(),
                    ins.memory_displacement64()
                ),
                k => match ins.try_immediate(i) {
                    Ok(v) => format!("{v:#x}"),
                    Err(_) => format!("{k:?}"),
                },
            })
            .collect();
        out += &format!(
            "  {:#x}: {:<36} {:?} {}\n",
            ins.ip(),
            bytes.join(" "),
            ins.code(),
            ops.join(", ")
        );
    }
    out
}

struct Runner {
    engine: Engine,
    vm: Vm,
    stats: Stats,
    sregs: SRegs,
}

impl Runner {
    fn new(engine: Engine) -> Result<Runner, String> {
        // bt translates at first sight: each sequence runs once. trap is
        // compared as a virtualizable x86 (`--trap-sensitive`): its holes
        // are tests/trap.rs's.
        let opts = VmOptions {
            bt_hot: Some(0),
            holes: HolePolicy::Trap,
            ..VmOptions::default()
        };
        let mut vm = Vm::new(engine, 16 << 20, opts)
            .map_err(|e| format!("engine {engine}: creating the VM: {e}"))?;
        let mut sregs = machine::boot::long_mode(&vm.mem).map_err(|e| e.to_string())?;
        let mem = &vm.mem;
        let write = |v: u64, at: u64| {
            mem.write_obj(v, GuestAddress(at))
                .map_err(|e| format!("writing {at:#x}: {e}"))
        };
        // The boot GDT plus user data (0x2b) and 64-bit user code (0x33).
        let entries = [
            0,
            gdt_entry(0xc09b, 0, 0xfffff),
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x008b, 0, 0x67),
            0,
            gdt_entry(0xc0f3, 0, 0xfffff),
            gdt_entry(0xa0fb, 0, 0xfffff),
        ];
        for (i, e) in entries.iter().enumerate() {
            write(*e, GDT + 8 * i as u64)?;
        }
        sregs.gdt.base = GDT;
        sregs.gdt.limit = (entries.len() * 8 - 1) as u16;
        // Identity map of the first GiB (2 MiB pages), user-accessible but for the
        // first 2 MiB (GDT, page tables, ring-0 stub and stack).
        const P_RW_U: u64 = P | RW | US;
        let read = |at: u64| {
            mem.read_obj::<u64>(GuestAddress(at))
                .map_err(|e| format!("reading {at:#x}: {e}"))
        };
        let pml4 = sregs.cr3;
        let pdpt = read(pml4)? & !0xfff;
        let pd = read(pdpt)? & !0xfff;
        write(pdpt | P_RW_U, pml4)?;
        write(pd | P_RW_U, pdpt)?;
        for i in 0..512u64 {
            let u = if i == 0 { 0 } else { 4 };
            write((i << 21) | 0x83 | u, pd + i * 8)?;
        }
        // Enter at CPL 3 directly: user code and stack segments.
        let mut ucode = vcpu::Segment::flat(SEL_UCODE, true, true, false);
        ucode.dpl = 3;
        let mut udata = vcpu::Segment::flat(SEL_UDATA, false, false, true);
        udata.dpl = 3;
        sregs.cs = ucode;
        sregs.ss = udata;
        sregs.ds = udata;
        sregs.es = udata;
        sregs.fs = udata;
        sregs.gs = udata;
        vm.pio
            .insert(PORT as u64, 1, Arc::new(Mutex::new(StopPort)))
            .map_err(|e| e.to_string())?;
        system::install(&mut vm, &mut sregs)?;
        Ok(Runner {
            engine,
            vm,
            stats: Stats::new(engine.name()),
            sregs,
        })
    }

    /// Runs `code` at CPL 3 from `init` (its RSP is the user stack) and `scratch`.
    fn run(&mut self, code: &[u8], init: &Regs, scratch: &[u8]) -> Result<(Regs, Vec<u8>), String> {
        self.vm.write_memory(CODE, code)?;
        self.vm.write_memory(SCRATCH, scratch)?;
        self.vm
            .set_cpu_state(init, &self.sregs)
            .map_err(|e| e.to_string())?;
        let out = self.vm.run(&mut self.stats).map_err(|e| e.to_string())?;
        if !matches!(out, Outcome::Stopped(StopReason::DebugExit(0))) {
            return Err(format!(
                "unexpected outcome {}\n{}",
                out.describe(),
                out.dump().unwrap_or_default()
            ));
        }
        let regs = self.vm.vcpu.regs().map_err(|e| e.to_string())?;
        let mut mem_out = vec![0u8; SCRATCH_LEN];
        self.vm
            .mem
            .read_slice(&mut mem_out, GuestAddress(SCRATCH))
            .map_err(|e| e.to_string())?;
        Ok((regs, mem_out))
    }
}

fn gprs(r: &Regs) -> [u64; 17] {
    [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip,
    ]
}

/// XMM0-15 and MXCSR as stored in `scratch` at `xmm` and `mxcsr`.
fn sse_state(scratch: &[u8], xmm: i32, mxcsr: i32) -> String {
    let word = |at: usize, n: usize| {
        let mut b = [0u8; 16];
        b[..n].copy_from_slice(&scratch[at..at + n]);
        u128::from_le_bytes(b)
    };
    let mut s = String::new();
    for k in 0..16 {
        s += &format!(
            "xmm{k:<2}={:032x}{}",
            word(xmm as usize + 16 * k, 16),
            if k % 2 == 1 { "\n" } else { " " }
        );
    }
    for k in 0..8 {
        s += &format!(
            "mm{k}={:016x}{}",
            word(MM_IN as usize + 8 * k, 8),
            if k % 4 == 3 { "\n" } else { " " }
        );
    }
    s + &format!("mxcsr={:#x}\n", word(mxcsr as usize, 4))
}

fn mem_diff(a: &[u8], b: &[u8]) -> String {
    let mut s = String::new();
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x != y {
            s += &format!("  {:#x}: kvm {x:02x} emu {y:02x}\n", SCRATCH + i as u64);
        }
    }
    s
}

/// A differential run: `count` sequences from `seed`.
pub struct Options {
    /// The engine whose results are right (`kvm`: the hardware), and the
    /// one checked against it.
    pub oracle: Engine,
    pub subject: Engine,
    pub seed: u64,
    pub count: u64,
    /// Go on after a divergence (else the run ends at the first one).
    pub keep_going: bool,
    /// Generate x87 sequences.
    pub x87: bool,
}

pub struct Summary {
    pub sequences: u64,
    pub divergences: u64,
    pub elapsed: Duration,
}

/// A seed in decimal or 0x-hex.
pub fn parse_seed(s: &str) -> Result<u64, String> {
    let s = s.trim();
    s.strip_prefix("0x")
        .map_or_else(|| s.parse(), |h| u64::from_str_radix(h, 16))
        .map_err(|_| format!("seed {s:?}: not a number (decimal or 0x-hex)"))
}

/// Runs the sequences on `kvm` and `emu` and compares them. `divergence` gets
/// the report of each divergence (disassembly, initial state, both results);
/// `progress` is called after every sequence with the number done so far.
/// Errors are set-up failures (an engine cannot create the VM).
pub fn run(
    opts: &Options,
    divergence: impl FnMut(&str),
    progress: impl FnMut(u64, u64),
) -> Result<Summary, String> {
    let seed = opts.seed;
    drive(opts, seed, divergence, progress, |rng, hw, sw, scratch| {
        let (code, defined, tail) = generate(rng, opts.x87);
        let init = random_regs(rng);
        fill_fp_scratch(rng, scratch);
        let (what, detail) = compare(hw, sw, &code, defined, &init, scratch, tail)?;
        Some(format!(
            "divergence (seed {seed:#x}; rerun with VISOR_DIFF_SEED={seed:#x}): {what}\n\
             code:\n{}initial:\n{init}\n{}{detail}",
            disassemble(&code),
            sse_state(scratch, XMM_IN, MXCSR_IN)
        ))
    })
}

/// Scratch memory for the integer, SSE and x87 sequences: interesting
/// floating-point bit patterns, MXCSR with every exception masked and
/// random flags, rounding, DAZ and FTZ; the x87 control word with every
/// exception masked and random precision and rounding; and the x87 stack's
/// initial values.
fn fill_fp_scratch(rng: &mut Rng, scratch: &mut [u8]) {
    for chunk in scratch.chunks_mut(8) {
        chunk.copy_from_slice(&rng.fp_chunk().to_le_bytes());
    }
    let mxcsr = 0x1f80
        | (rng.next() as u32 & 0x3f)
        | (rng.below(4) as u32) << 13
        | if rng.chance(4) { 0x40 } else { 0 }
        | if rng.chance(4) { 0x8000 } else { 0 };
    let at = MXCSR_IN as usize;
    scratch[at..at + 4].copy_from_slice(&mxcsr.to_le_bytes());
    let fcw = 0x7f | [0, 2, 3][rng.below(3) as usize] << 8 | (rng.below(4) as u16) << 10;
    let at = FCW_IN as usize;
    scratch[at..at + 2].copy_from_slice(&fcw.to_le_bytes());
    for k in 0..16 {
        let (se, sig) = rng.f80();
        let at = F80_IN as usize + 16 * k;
        scratch[at..at + 8].copy_from_slice(&sig.to_le_bytes());
        scratch[at + 8..at + 10].copy_from_slice(&se.to_le_bytes());
    }
}

/// The loop of a run: `one` generates sequence after sequence from the
/// random numbers of `rng_seed`, runs each on the oracle's and the
/// subject's runner and reports its divergence, if any.
fn drive(
    opts: &Options,
    rng_seed: u64,
    mut divergence: impl FnMut(&str),
    mut progress: impl FnMut(u64, u64),
    mut one: impl FnMut(&mut Rng, &mut Runner, &mut Runner, &mut [u8]) -> Option<String>,
) -> Result<Summary, String> {
    let mut rng = Rng(rng_seed);
    let mut hw = Runner::new(opts.oracle)?;
    let mut sw = Runner::new(opts.subject)?;
    let start = Instant::now();
    let mut scratch = vec![0u8; SCRATCH_LEN];
    let mut divergences = 0;
    let mut n = 0;
    while n < opts.count {
        n += 1;
        if let Some(report) = one(&mut rng, &mut hw, &mut sw, &mut scratch) {
            divergences += 1;
            divergence(&format!("sequence {}: {report}", n - 1));
            if !opts.keep_going {
                break;
            }
        }
        progress(n, divergences);
    }
    Ok(Summary {
        sequences: n,
        divergences,
        elapsed: start.elapsed(),
    })
}

/// Random initial registers: RSP the user stack, R15 the scratch base, RIP
/// the code; IOPL 3, IF, reserved bit 1 and random arithmetic flags.
fn random_regs(rng: &mut Rng) -> Regs {
    let mut v = [0u64; 16];
    for x in v.iter_mut() {
        *x = rng.value();
    }
    Regs {
        rax: v[0],
        rcx: v[1],
        rdx: v[2],
        rbx: v[3],
        rsp: USTACK,
        rbp: v[5],
        rsi: v[6],
        rdi: v[7],
        r8: v[8],
        r9: v[9],
        r10: v[10],
        r11: v[11],
        r12: v[12],
        r13: v[13],
        r14: v[14],
        r15: SCRATCH,
        rip: CODE,
        rflags: IOPL | 0x200 | FIXED_FLAGS | (rng.next() & ARITH),
    }
}

/// The comparison of a sequence that ends with transcendental `op` (the
/// ModRM byte after D9): the SDM bounds the transcendentals' error (1 ulp,
/// vol. 1 8.3.10) without fixing their last bit, and this host's x87 (AMD)
/// rounds it differently from visor (which rounds nearly exact values
/// once: FPTAN(1) is 0x3fff:c75922e5f71d2dc5 correctly rounded, the host
/// gives ...dc6). So a result register (in the final FXSAVE image and as
/// the MM register over its significand) that is within 1 ulp of the
/// hardware's counts as equal, and C1 ("rounded up", vol. 2 FSIN and the
/// others) is not compared: with the same result the host's C1 still
/// differs at times (FPTAN of tiny arguments, exact results, reduced
/// precision control), where the SDM says no more than "rounded up". F2XM1 of |x| > 1 and FYL2XP1 of |x| >= 1 -
/// sqrt(2)/2 are undefined (vol. 2 F2XM1, FYL2XP1: "the result is
/// undefined"; this host gives x back for F2XM1): their result and
/// exception flags are not compared.
fn tolerate_tail(op: u8, hm: &[u8], sm: &mut [u8]) {
    let word = |m: &[u8], at: i32| u16::from_le_bytes([m[at as usize], m[at as usize + 1]]);
    let f80 = |m: &[u8], at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&m[at..at + 8]);
        (
            u16::from_le_bytes([m[at + 8], m[at + 9]]),
            u64::from_le_bytes(b),
        )
    };
    let top = ((word(hm, FX_PRE + 2) >> 11) & 7) as usize;
    // ST(0) before: undefined results beyond the domains.
    let (se, sig) = f80(hm, FX_PRE as usize + 32);
    let exp = se & 0x7fff;
    let valid = word(hm, FX_PRE + 4) >> top & 1 == 1;
    let beyond = valid
        && exp != 0x7fff
        && sig != 0
        && match op {
            0xf0 => exp >= 0x3fff && (exp, sig) != (0x3fff, 1 << 63),
            // 1 - sqrt(2)/2 = 0x3ffd:95f619980c4336f7...
            0xf9 => exp > 0x3ffd || (exp == 0x3ffd && sig >= 0x95f6_1998_0c43_36f7),
            _ => false,
        };
    let regs: &[usize] = match op {
        0xf0 | 0xfe | 0xff => &[top],
        0xf2 | 0xfb => &[top, (top + 7) & 7],
        _ => &[(top + 1) & 7],
    };
    let copy = |at: usize, n: usize, sm: &mut [u8]| sm[at..at + n].copy_from_slice(&hm[at..at + n]);
    for &p in regs {
        let at = FX_OUT as usize + 32 + 16 * p;
        let (x, y) = (f80(hm, at), f80(sm, at));
        let next = |(se, sig): (u16, u64)| match sig.checked_add(1) {
            Some(s) if se & 0x7fff != 0 || s >> 63 == 0 => (se, s),
            _ => (se + 1, 1 << 63),
        };
        let finite = |v: (u16, u64)| v.0 & 0x7fff != 0x7fff;
        let near = finite(x) && finite(y) && (next(x) == y || next(y) == x);
        if near || beyond {
            copy(at, 10, sm);
            copy(MM_OUT as usize + 8 * p, 8, sm);
        }
    }
    // F2XM1 of ±1 and FYL2X of a power of two have exact results (2^1 - 1
    // = 1, 3 * log2(8) = 9): the SDM's #P is for a result that "cannot be
    // represented exactly" (vol. 2 F2XM1, FYL2X, FPU exceptions), and
    // visor sets no PE; this host sets it (and UE with it when the exact
    // result is tiny: masked underflow is flagged only when inexact, vol. 1
    // 4.9.1.5). The same result with PE only on the host: PE and UE not
    // compared (unless PE was already set before).
    let exact_pe = matches!(op, 0xf0 | 0xf1)
        && word(hm, FX_PRE + 2) & 0x20 == 0
        && word(hm, FX_OUT + 2) & 0x20 != 0
        && word(sm, FX_OUT + 2) & 0x20 == 0
        && regs.iter().all(|&p| {
            let at = FX_OUT as usize + 32 + 16 * p;
            hm[at..at + 10] == sm[at..at + 10]
        });
    // C1, and the exception flags (with ES and B) of an undefined result.
    let mask: u16 = if beyond {
        0x82bf
    } else if exact_pe {
        0x0230
    } else {
        0x0200
    };
    for at in [FSW_OUT, FX_OUT + 2] {
        let v = (word(sm, at) & !mask) | (word(hm, at) & mask);
        sm[at as usize..at as usize + 2].copy_from_slice(&v.to_le_bytes());
    }
}

/// Runs one sequence on both engines: what differs and the details, if anything.
fn compare(
    hw: &mut Runner,
    sw: &mut Runner,
    code: &[u8],
    defined: u64,
    init: &Regs,
    scratch: &[u8],
    tail: Tail,
) -> Option<(&'static str, String)> {
    let (hr, hm) = match hw.run(code, init, scratch) {
        Ok(r) => r,
        Err(e) => return Some(("oracle run", e)),
    };
    let (sr, mut sm) = match sw.run(code, init, scratch) {
        Ok(r) => r,
        Err(e) => return Some(("subject run", e)),
    };
    // The state a final transcendental started from (FCW, FSW, ST0, ST1).
    let tail_state = match tail.op {
        Some(op) => {
            let at = FX_PRE as usize;
            let st = |k: usize| {
                let r = &hm[at + 32 + 16 * k..at + 42 + 16 * k];
                let mut b = [0u8; 8];
                b.copy_from_slice(&r[..8]);
                format!(
                    "{:04x}:{:016x}",
                    u16::from_le_bytes([r[8], r[9]]),
                    u64::from_le_bytes(b)
                )
            };
            format!(
                "before D9 {op:02x}: fcw {:04x} fsw {:04x} ftw {:02x} st0 {} st1 {}\n",
                u16::from_le_bytes([hm[at], hm[at + 1]]),
                u16::from_le_bytes([hm[at + 2], hm[at + 3]]),
                hm[at + 4],
                st(0),
                st(1)
            )
        }
        None => String::new(),
    };
    if let Some(op) = tail.op {
        tolerate_tail(op, &hm, &mut sm);
    }
    for (at, skip) in [
        (FSW_OUT as usize, tail.cc_skip),
        (FX_OUT as usize + 2, tail.cc_skip),
        (FX_PRE as usize + 2, tail.pre_skip),
    ] {
        let (h, s) = (&hm[at..at + 2], &sm[at..at + 2]);
        let (h, s) = (
            u16::from_le_bytes([h[0], h[1]]),
            u16::from_le_bytes([s[0], s[1]]),
        );
        let v = (s & !skip) | (h & skip);
        sm[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    // IOPL is not compared: the sequences cannot change it, and PVM reports
    // RFLAGS.IOPL as 0 after the exit (it keeps the guest's IOPL to itself).
    let mask = !(ARITH & !defined) & !IOPL;
    let states = format!(
        "{}:\n{hr}\n{}:\n{sr}\ncompared flags mask {mask:#x}",
        hw.engine, sw.engine
    );
    if gprs(&hr) != gprs(&sr) {
        Some(("registers", states))
    } else if hr.rflags & mask != sr.rflags & mask {
        Some(("rflags", states))
    } else if hm != sm {
        Some((
            "scratch memory",
            format!("{states}\n{tail_state}{}", mem_diff(&hm, &sm)),
        ))
    } else {
        None
    }
}
