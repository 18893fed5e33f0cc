//! Differential tester: the hardware is the oracle.
//!
//! Random sequences of general-purpose integer instructions are assembled with
//! iced-x86, run at CPL 3 from the same random initial state on engine `kvm`
//! (where guest user mode runs natively, also on PVM hosts) and on engine `emu`
//! (visor's software CPU), and the results are compared: all 16 GPRs, RIP, RFLAGS
//! and the scratch memory (a data page and the user stack page).
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
use visor::{Engine, Outcome, Stats, Vm, VmOptions};
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

struct Gen<'r> {
    rng: &'r mut Rng,
    a: CodeAssembler,
    /// Arithmetic flags whose current value the SDM defines.
    defined: u64,
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

    fn insn(&mut self) {
        match self.rng.below(18) {
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

/// A random sequence: code bytes and the mask of arithmetic flags defined at its end.
fn generate(rng: &mut Rng) -> (Vec<u8>, u64) {
    let mut g = Gen {
        rng,
        a: CodeAssembler::new(64).unwrap(),
        defined: ARITH,
    };
    let n = 1 + g.rng.below(MAX_LEN as u64);
    for _ in 0..n {
        g.insn();
    }
    g.a.out(PORT as i32, al).unwrap();
    let defined = g.defined;
    (g.a.assemble(CODE).unwrap(), defined)
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
        let mut vm = Vm::new(engine, 16 << 20, VmOptions::default())
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
        let (code, defined) = generate(rng);
        let init = random_regs(rng);
        fill_scratch(rng, scratch);
        let (what, detail) = compare(hw, sw, &code, defined, &init, scratch)?;
        Some(format!(
            "divergence (seed {seed:#x}; rerun with VISOR_DIFF_SEED={seed:#x}): {what}\n\
             code:\n{}initial:\n{init}\n{detail}",
            disassemble(&code)
        ))
    })
}

/// Random scratch memory.
fn fill_scratch(rng: &mut Rng, scratch: &mut [u8]) {
    for chunk in scratch.chunks_mut(8) {
        chunk.copy_from_slice(&rng.value().to_le_bytes());
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

/// Runs one sequence on both engines: what differs and the details, if anything.
fn compare(
    hw: &mut Runner,
    sw: &mut Runner,
    code: &[u8],
    defined: u64,
    init: &Regs,
    scratch: &[u8],
) -> Option<(&'static str, String)> {
    let (hr, hm) = match hw.run(code, init, scratch) {
        Ok(r) => r,
        Err(e) => return Some(("oracle run", e)),
    };
    let (sr, sm) = match sw.run(code, init, scratch) {
        Ok(r) => r,
        Err(e) => return Some(("subject run", e)),
    };
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
            format!("{states}\n{}", mem_diff(&hm, &sm)),
        ))
    } else {
        None
    }
}
