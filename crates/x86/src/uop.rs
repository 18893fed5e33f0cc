//! Pre-decoded instructions: each decoded instruction is also kept as a
//! `Uop`, whose operands (register numbers, the memory operand's parts, the
//! immediate, the branch target) are resolved once at decode time and whose
//! handler is picked for its exact form. The frequent forms of 64-bit code
//! get a handler of their own, specialised by operation, operand size and
//! condition; every other instruction gets `generic`, which runs the decoded
//! iced-x86 instruction through `exec` as before. Semantics are the same
//! either way (the same `alu` functions compute the flags).

use iced_x86::{Code, ConditionCode as CC, Instruction, Mnemonic as M, OpKind, Register};

use crate::alu::{self, mask};
use crate::{exc_code, sreg, Cpu, R};
use arch::rflags::*;
use arch::{canonical, vector};

/// A handler: executes the uop; `next_rip` is preset to the next instruction.
pub(crate) type Handler = fn(&mut Cpu, &Uop) -> R<()>;

/// No register.
const NONE: u8 = 0xff;

#[derive(Clone, Copy)]
pub(crate) struct Uop {
    pub run: Handler,
    /// Address of the instruction (RIP when it was decoded).
    pub ip: u64,
    /// Displacement of the memory operand (the absolute address when it is
    /// RIP-relative), or the branch target.
    pub disp: u64,
    /// Immediate operand, truncated to the operand size.
    pub imm: u64,
    pub len: u8,
    /// Destination and source registers (GPR numbers).
    pub r0: u8,
    pub r1: u8,
    /// Base and index registers of the memory operand, `NONE` if absent.
    pub base: u8,
    pub index: u8,
    /// log2 of the index scale.
    pub scale: u8,
    /// Segment of the memory operand (`sreg`).
    pub seg: u8,
    /// The instruction is in `CodeCache::uncached`, not in a page's cache.
    uncached: bool,
    /// A handler of its own (not `generic`): it changes nothing but
    /// registers, arithmetic flags, RIP and memory.
    fast: bool,
}

impl Uop {
    /// A placeholder, overwritten by a fetch.
    pub(crate) const EMPTY: Uop = Uop {
        run: generic,
        ip: 0,
        disp: 0,
        imm: 0,
        len: 0,
        r0: NONE,
        r1: NONE,
        base: NONE,
        index: NONE,
        scale: 0,
        seg: 0,
        uncached: false,
        fast: false,
    };

    /// The uop of `i`, decoded in `bits`-bit code.
    pub(crate) fn new(i: &Instruction, bits: u32) -> Uop {
        let mut u = Uop {
            run: generic,
            ip: i.ip(),
            disp: 0,
            imm: 0,
            len: i.len() as u8,
            r0: NONE,
            r1: NONE,
            base: NONE,
            index: NONE,
            scale: 0,
            seg: sreg::DS as u8,
            uncached: false,
            fast: false,
        };
        if bits == 64 {
            if let Some(run) = pick(i, &mut u) {
                u.run = run;
                u.fast = true;
            }
        }
        u
    }

    /// A uop that runs an instruction not kept in the decoded-page cache.
    pub(crate) fn uncached(i: &Instruction) -> Uop {
        // (Bits 0: no handler of its own, so `generic`.)
        let mut u = Uop::new(i, 0);
        u.uncached = true;
        u
    }

    pub(crate) fn is_uncached(&self) -> bool {
        self.uncached
    }

    pub(crate) fn is_fast(&self) -> bool {
        self.fast
    }
}

/// Any instruction: the decoded iced-x86 instruction through `exec`.
fn generic(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let i = cpu.code.insn_of(u);
    cpu.exec_insn(&i)
}

// ---- operands --------------------------------------------------------------

fn gpr64(r: Register) -> Option<u8> {
    let n = r as usize;
    (Register::RAX as usize..=Register::R15 as usize)
        .contains(&n)
        .then(|| (n - Register::RAX as usize) as u8)
}

fn gpr32(r: Register) -> Option<u8> {
    let n = r as usize;
    (Register::EAX as usize..=Register::R15D as usize)
        .contains(&n)
        .then(|| (n - Register::EAX as usize) as u8)
}

/// A byte register that is the low byte of a GPR (not AH, CH, DH, BH).
fn gpr8(r: Register) -> Option<u8> {
    let n = r as usize;
    if (Register::AL as usize..=Register::BL as usize).contains(&n) {
        Some((n - Register::AL as usize) as u8)
    } else if (Register::SPL as usize..=Register::R15L as usize).contains(&n) {
        Some((n - Register::SPL as usize + 4) as u8)
    } else {
        None
    }
}

fn gpr16(r: Register) -> Option<u8> {
    let n = r as usize;
    (Register::AX as usize..=Register::R15W as usize)
        .contains(&n)
        .then(|| (n - Register::AX as usize) as u8)
}

/// The GPR number of a register of `sz` bytes.
fn gpr(r: Register, sz: usize) -> Option<u8> {
    match sz {
        1 => gpr8(r),
        2 => gpr16(r),
        4 => gpr32(r),
        8 => gpr64(r),
        _ => None,
    }
}

/// Fills in the memory operand; `None` for forms left to `exec` (32-bit
/// addressing, absolute addresses).
fn memory(i: &Instruction, u: &mut Uop) -> Option<()> {
    let base = i.memory_base();
    let index = i.memory_index();
    if base == Register::RIP {
        if index != Register::None {
            return None;
        }
    } else {
        if base == Register::None && index == Register::None {
            return None;
        }
        if base != Register::None {
            u.base = gpr64(base)?;
        }
        if index != Register::None {
            u.index = gpr64(index)?;
            u.scale = i.memory_index_scale().trailing_zeros() as u8;
        }
    }
    u.disp = i.memory_displacement64();
    u.seg = Cpu::mem_seg(i) as u8;
    Some(())
}

/// The handler of `i`'s form, with `u`'s operands filled in.
fn pick(i: &Instruction, u: &mut Uop) -> Option<Handler> {
    if i.is_jcc_short_or_near() {
        u.disp = i.near_branch_target();
        return Some(by_cc!(jcc, i.condition_code()));
    }
    let k0 = i.op0_kind();
    let k1 = if i.op_count() > 1 {
        i.op1_kind()
    } else {
        OpKind::Register
    };
    let imm = matches!(
        k1,
        OpKind::Immediate8
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate32to64
            | OpKind::Immediate64
    );
    // Any other kind of second operand (string, far branch...) is not a
    // form with a handler.
    if !(imm || matches!(k1, OpKind::Register | OpKind::Memory)) {
        return None;
    }
    let mem0 = k0 == OpKind::Memory;
    let mem1 = k1 == OpKind::Memory;
    let mnem = i.mnemonic();
    match i.code() {
        Code::Jmp_rel8_64 | Code::Jmp_rel32_64 => {
            u.disp = i.near_branch_target();
            return Some(jmp);
        }
        Code::Call_rel32_64 => {
            u.disp = i.near_branch_target();
            return Some(call);
        }
        Code::Retnq => return Some(ret),
        Code::Push_r64 => {
            u.r0 = gpr64(i.op0_register())?;
            return Some(push);
        }
        Code::Pop_r64 => {
            u.r0 = gpr64(i.op0_register())?;
            return Some(pop);
        }
        Code::Lea_r64_m | Code::Lea_r32_m => {
            let sz = if i.code() == Code::Lea_r64_m { 8 } else { 4 };
            u.r0 = gpr(i.op0_register(), sz)?;
            memory(i, u)?;
            return Some(if sz == 8 { lea::<8> } else { lea::<4> });
        }
        Code::Movzx_r32_rm8 | Code::Movzx_r32_rm16 | Code::Movzx_r64_rm8 | Code::Movzx_r64_rm16 => {
            let dsz = if matches!(i.code(), Code::Movzx_r64_rm8 | Code::Movzx_r64_rm16) {
                8
            } else {
                4
            };
            let ssz = if matches!(i.code(), Code::Movzx_r32_rm8 | Code::Movzx_r64_rm8) {
                1
            } else {
                2
            };
            u.r0 = gpr(i.op0_register(), dsz)?;
            return Some(if mem1 {
                memory(i, u)?;
                if ssz == 1 {
                    movzx_load::<1>
                } else {
                    movzx_load::<2>
                }
            } else if ssz == 1 {
                u.r1 = gpr8(i.op1_register())?;
                movzx_rr::<1>
            } else {
                u.r1 = gpr16(i.op1_register())?;
                movzx_rr::<2>
            });
        }
        Code::Movsxd_r64_rm32
        | Code::Movsx_r32_rm8
        | Code::Movsx_r64_rm8
        | Code::Movsx_r32_rm16
        | Code::Movsx_r64_rm16 => {
            let (dsz, ssz) = match i.code() {
                Code::Movsxd_r64_rm32 => (8, 4),
                Code::Movsx_r32_rm8 => (4, 1),
                Code::Movsx_r64_rm8 => (8, 1),
                Code::Movsx_r32_rm16 => (4, 2),
                _ => (8, 2),
            };
            u.r0 = gpr(i.op0_register(), dsz)?;
            if mem1 {
                memory(i, u)?;
            } else {
                u.r1 = gpr(i.op1_register(), ssz)?;
            }
            return Some(match (mem1, dsz, ssz) {
                (false, 8, 4) => movsx_rr::<8, 4>,
                (false, 4, 1) => movsx_rr::<4, 1>,
                (false, 8, 1) => movsx_rr::<8, 1>,
                (false, 4, _) => movsx_rr::<4, 2>,
                (false, _, _) => movsx_rr::<8, 2>,
                (true, 8, 4) => movsx_load::<8, 4>,
                (true, 4, 1) => movsx_load::<4, 1>,
                (true, 8, 1) => movsx_load::<8, 1>,
                (true, 4, _) => movsx_load::<4, 2>,
                (true, _, _) => movsx_load::<8, 2>,
            });
        }
        Code::Imul_r32_rm32 | Code::Imul_r64_rm64 => {
            let sz = if i.code() == Code::Imul_r64_rm64 {
                8
            } else {
                4
            };
            u.r0 = gpr(i.op0_register(), sz)?;
            return Some(if mem1 {
                memory(i, u)?;
                by_sz!(imul_rm, sz)
            } else {
                u.r1 = gpr(i.op1_register(), sz)?;
                by_sz!(imul_rr, sz)
            });
        }
        Code::Div_rm32 | Code::Div_rm64 | Code::Idiv_rm32 | Code::Idiv_rm64 if !mem0 => {
            let sz = if matches!(i.code(), Code::Div_rm64 | Code::Idiv_rm64) {
                8
            } else {
                4
            };
            u.r0 = gpr(i.op0_register(), sz)?;
            let signed = mnem == M::Idiv;
            return Some(match (signed, sz) {
                (false, 4) => div_r::<false, 4>,
                (false, _) => div_r::<false, 8>,
                (true, 4) => div_r::<true, 4>,
                (true, _) => div_r::<true, 8>,
            });
        }
        _ => {}
    }
    let sz = match i.op0_kind() {
        OpKind::Register => i.op0_register().size(),
        OpKind::Memory => i.memory_size().size(),
        _ => return None,
    };
    // 16-bit operands: MOV only.
    if !(matches!(sz, 1 | 4 | 8) || (sz == 2 && mnem == M::Mov)) {
        return None;
    }
    if imm {
        u.imm = i.immediate(1) & mask(sz);
    }
    // Register operands: op0 into r0, op1 into r1.
    if !mem0 {
        u.r0 = gpr(i.op0_register(), sz)?;
    }
    if k1 == OpKind::Register && i.op_count() > 1 {
        u.r1 = gpr(i.op1_register(), sz)?;
    }
    if mem0 || mem1 {
        memory(i, u)?;
    }
    let alu_op = match mnem {
        M::Add => Some(ADD),
        M::Or => Some(OR),
        M::And => Some(AND),
        M::Sub => Some(SUB),
        M::Xor => Some(XOR),
        M::Cmp => Some(CMP),
        M::Test => Some(TEST),
        _ => None,
    };
    if let Some(op) = alu_op {
        if i.op_count() != 2 {
            return None;
        }
        return match (mem0, mem1, imm) {
            (false, false, false) => Some(by_op_sz!(alu_rr, op, sz)),
            (false, false, true) => Some(by_op_sz!(alu_ri, op, sz)),
            (false, true, _) => Some(by_op_sz!(alu_rm, op, sz)),
            (true, false, false) => Some(by_op_sz!(alu_mr, op, sz)),
            (true, false, true) => Some(by_op_sz!(alu_mi, op, sz)),
            _ => None,
        };
    }
    match mnem {
        M::Mov if i.op_count() == 2 => match (mem0, mem1, imm) {
            (false, false, false) => Some(by_sz!(mov_rr, sz)),
            (false, false, true) => Some(by_sz!(mov_ri, sz)),
            (false, true, _) => Some(by_sz!(load, sz)),
            (true, false, false) => Some(by_sz!(store, sz)),
            (true, false, true) => Some(by_sz!(store_imm, sz)),
            _ => None,
        },
        M::Inc | M::Dec if !mem0 && i.op_count() == 1 => Some(match (mnem == M::Dec, sz) {
            (false, 1) => incdec::<false, 1>,
            (false, 4) => incdec::<false, 4>,
            (false, _) => incdec::<false, 8>,
            (true, 1) => incdec::<true, 1>,
            (true, 4) => incdec::<true, 4>,
            (true, _) => incdec::<true, 8>,
        }),
        M::Shl | M::Shr | M::Sar if !mem0 && imm && sz != 1 => {
            let op = match mnem {
                M::Shl => SHL,
                M::Shr => SHR,
                _ => SAR,
            };
            u.imm &= if sz == 8 { 63 } else { 31 };
            Some(by_op_sz!(shift_ri, op, sz))
        }
        _ if i.condition_code() != CC::None && !mem0 && !mem1 => {
            let cc = i.condition_code();
            if is_setcc(mnem) && sz == 1 {
                if i.op_count() != 1 {
                    return None;
                }
                Some(by_cc!(setcc, cc))
            } else if i.op_count() == 2 && sz != 1 && is_cmov(mnem) {
                Some(if sz == 8 {
                    by_cc!(cmov8, cc)
                } else {
                    by_cc!(cmov4, cc)
                })
            } else {
                None
            }
        }
        _ => None,
    }
}

pub(crate) fn is_setcc(m: M) -> bool {
    matches!(
        m,
        M::Seta
            | M::Setae
            | M::Setb
            | M::Setbe
            | M::Sete
            | M::Setg
            | M::Setge
            | M::Setl
            | M::Setle
            | M::Setne
            | M::Setno
            | M::Setnp
            | M::Setns
            | M::Seto
            | M::Setp
            | M::Sets
    )
}

pub(crate) fn is_cmov(m: M) -> bool {
    matches!(
        m,
        M::Cmova
            | M::Cmovae
            | M::Cmovb
            | M::Cmovbe
            | M::Cmove
            | M::Cmovg
            | M::Cmovge
            | M::Cmovl
            | M::Cmovle
            | M::Cmovne
            | M::Cmovno
            | M::Cmovnp
            | M::Cmovns
            | M::Cmovo
            | M::Cmovp
            | M::Cmovs
    )
}

// ---- handler tables ----------------------------------------------------------

const ADD: u8 = 0;
const OR: u8 = 1;
const AND: u8 = 4;
const SUB: u8 = 5;
const XOR: u8 = 6;
const CMP: u8 = 7;
const TEST: u8 = 8;
const SHL: u8 = 4;
const SHR: u8 = 5;
const SAR: u8 = 7;

/// `$f::<SZ>` for a runtime size of 1, 2, 4 or 8.
macro_rules! by_sz {
    ($f:ident, $sz:expr) => {
        match $sz {
            1 => $f::<1> as Handler,
            2 => $f::<2>,
            4 => $f::<4>,
            _ => $f::<8>,
        }
    };
}
use by_sz;

/// `$f::<OP, SZ>` for a runtime operation and a size of 1, 4 or 8.
macro_rules! by_op_sz {
    ($f:ident, $op:expr, $sz:expr) => {
        match ($op, $sz) {
            (0, 1) => $f::<0, 1> as Handler,
            (0, 4) => $f::<0, 4>,
            (0, 8) => $f::<0, 8>,
            (1, 1) => $f::<1, 1>,
            (1, 4) => $f::<1, 4>,
            (1, 8) => $f::<1, 8>,
            (4, 1) => $f::<4, 1>,
            (4, 4) => $f::<4, 4>,
            (4, 8) => $f::<4, 8>,
            (5, 1) => $f::<5, 1>,
            (5, 4) => $f::<5, 4>,
            (5, 8) => $f::<5, 8>,
            (6, 1) => $f::<6, 1>,
            (6, 4) => $f::<6, 4>,
            (6, 8) => $f::<6, 8>,
            (7, 1) => $f::<7, 1>,
            (7, 4) => $f::<7, 4>,
            (7, 8) => $f::<7, 8>,
            (_, 1) => $f::<8, 1>,
            (_, 4) => $f::<8, 4>,
            _ => $f::<8, 8>,
        }
    };
}
use by_op_sz;

/// `$f::<CC>` for a runtime condition code (as `ConditionCode as u8`).
macro_rules! by_cc {
    ($f:ident, $cc:expr) => {
        match $cc {
            CC::o => $f::<{ CC::o as u8 }> as Handler,
            CC::no => $f::<{ CC::no as u8 }>,
            CC::b => $f::<{ CC::b as u8 }>,
            CC::ae => $f::<{ CC::ae as u8 }>,
            CC::e => $f::<{ CC::e as u8 }>,
            CC::ne => $f::<{ CC::ne as u8 }>,
            CC::be => $f::<{ CC::be as u8 }>,
            CC::a => $f::<{ CC::a as u8 }>,
            CC::s => $f::<{ CC::s as u8 }>,
            CC::ns => $f::<{ CC::ns as u8 }>,
            CC::p => $f::<{ CC::p as u8 }>,
            CC::np => $f::<{ CC::np as u8 }>,
            CC::l => $f::<{ CC::l as u8 }>,
            CC::ge => $f::<{ CC::ge as u8 }>,
            CC::le => $f::<{ CC::le as u8 }>,
            _ => $f::<{ CC::g as u8 }>,
        }
    };
}
use by_cc;

/// Condition `CC` (a `ConditionCode as u8`) on `f`.
#[inline(always)]
fn holds<const CC_: u8>(f: u64) -> bool {
    alu::condition(f, CC_)
}

// ---- operand access --------------------------------------------------------

impl Cpu {
    /// The effective address of the uop's memory operand (no segment).
    #[inline(always)]
    fn u_ea(&self, u: &Uop) -> u64 {
        let mut a = u.disp;
        if u.base != NONE {
            a = a.wrapping_add(self.gpr[u.base as usize & 15]);
        }
        if u.index != NONE {
            a = a.wrapping_add(self.gpr[u.index as usize & 15] << u.scale);
        }
        a
    }

    /// The linear address of the uop's memory operand (64-bit mode).
    #[inline(always)]
    fn u_lin(&self, u: &Uop) -> R<u64> {
        let mut a = self.u_ea(u);
        if u.seg >= sreg::FS as u8 {
            a = a.wrapping_add(self.seg[u.seg as usize & 7].base);
        }
        if !canonical(a) {
            let v = if u.seg == sreg::SS as u8 {
                vector::SS
            } else {
                vector::GP
            };
            return exc_code(v, 0);
        }
        Ok(a)
    }

    #[inline(always)]
    fn g(&self, r: u8) -> u64 {
        self.gpr[r as usize & 15]
    }

    /// Writes a register of `SZ` bytes (`set_gpr_sz`, the size known at
    /// compile time).
    #[inline(always)]
    fn set_g<const SZ: usize>(&mut self, r: u8, v: u64) {
        self.set_gpr_sz(r as usize & 15, SZ, v);
    }

    /// OP (`alu2` numbering, 8 = TEST) of `a` and `b`: sets the arithmetic
    /// flags and returns the result.
    #[inline(always)]
    fn u_alu<const OP: u8, const SZ: usize>(&mut self, a: u64, b: u64) -> u64 {
        let (r, f) = alu::binary(OP, a, b, false, SZ);
        self.set_arith(f);
        r
    }
}

const fn writes(op: u8) -> bool {
    op != CMP && op != TEST
}

// ---- handlers ----------------------------------------------------------------

fn jcc<const CC_: u8>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    if holds::<CC_>(cpu.rflags) {
        cpu.next_rip = u.disp;
    }
    Ok(())
}

fn jmp(cpu: &mut Cpu, u: &Uop) -> R<()> {
    cpu.next_rip = u.disp;
    Ok(())
}

fn call(cpu: &mut Cpu, u: &Uop) -> R<()> {
    cpu.push(cpu.next_rip, 8)?;
    cpu.next_rip = u.disp;
    Ok(())
}

/// RET: a non-canonical return address is the RET's #GP(0), with RSP
/// unchanged (SDM vol. 2 RET).
fn ret(cpu: &mut Cpu, _: &Uop) -> R<()> {
    let t = cpu.pop(8)?;
    if !canonical(t) {
        cpu.gpr[4] = cpu.gpr[4].wrapping_sub(8);
        return exc_code(vector::GP, 0);
    }
    cpu.next_rip = t;
    Ok(())
}

fn push(cpu: &mut Cpu, u: &Uop) -> R<()> {
    cpu.push(cpu.g(u.r0), 8)
}

fn pop(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let v = cpu.pop(8)?;
    cpu.set_g::<8>(u.r0, v);
    Ok(())
}

fn lea<const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let a = cpu.u_ea(u);
    cpu.set_g::<SZ>(u.r0, a);
    Ok(())
}

fn mov_rr<const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    cpu.set_g::<SZ>(u.r0, cpu.g(u.r1));
    Ok(())
}

/// MOVZX from a register: r0 gets the low SZ bytes of r1, zero-extended.
fn movzx_rr<const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    cpu.gpr[u.r0 as usize & 15] = cpu.g(u.r1) & mask(SZ);
    Ok(())
}

fn mov_ri<const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    cpu.set_g::<SZ>(u.r0, u.imm);
    Ok(())
}

fn load<const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let l = cpu.u_lin(u)?;
    let v = cpu.rd_inline(l, SZ)?;
    cpu.set_g::<SZ>(u.r0, v);
    Ok(())
}

/// MOVSX/MOVSXD from a register: the low SZ bytes of r1, sign-extended to
/// DSZ (a 32-bit destination zero-extends).
fn movsx_rr<const DSZ: usize, const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let v = crate::alu::sext(cpu.g(u.r1), SZ);
    cpu.set_g::<DSZ>(u.r0, v);
    Ok(())
}

fn movsx_load<const DSZ: usize, const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let l = cpu.u_lin(u)?;
    let v = crate::alu::sext(cpu.rd_inline(l, SZ)?, SZ);
    cpu.set_g::<DSZ>(u.r0, v);
    Ok(())
}

/// MOVZX from memory.
fn movzx_load<const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let l = cpu.u_lin(u)?;
    cpu.gpr[u.r0 as usize & 15] = cpu.rd_inline(l, SZ)?;
    Ok(())
}

fn store<const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let l = cpu.u_lin(u)?;
    cpu.wr_inline(l, SZ, cpu.g(u.r1))
}

fn store_imm<const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let l = cpu.u_lin(u)?;
    cpu.wr_inline(l, SZ, u.imm)
}

fn alu_rr<const OP: u8, const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let a = cpu.g(u.r0) & mask(SZ);
    let b = cpu.g(u.r1) & mask(SZ);
    let r = cpu.u_alu::<OP, SZ>(a, b);
    if writes(OP) {
        cpu.set_g::<SZ>(u.r0, r);
    }
    Ok(())
}

fn alu_ri<const OP: u8, const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let a = cpu.g(u.r0) & mask(SZ);
    let r = cpu.u_alu::<OP, SZ>(a, u.imm);
    if writes(OP) {
        cpu.set_g::<SZ>(u.r0, r);
    }
    Ok(())
}

fn alu_rm<const OP: u8, const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let l = cpu.u_lin(u)?;
    let b = cpu.rd_inline(l, SZ)?;
    let a = cpu.g(u.r0) & mask(SZ);
    let r = cpu.u_alu::<OP, SZ>(a, b);
    if writes(OP) {
        cpu.set_g::<SZ>(u.r0, r);
    }
    Ok(())
}

fn alu_mr<const OP: u8, const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let l = cpu.u_lin(u)?;
    let a = if writes(OP) {
        cpu.rd_rmw(l, SZ)?
    } else {
        cpu.rd_inline(l, SZ)?
    };
    let b = cpu.g(u.r1) & mask(SZ);
    let r = cpu.u_alu::<OP, SZ>(a, b);
    if writes(OP) {
        cpu.wr_inline(l, SZ, r)?;
    }
    Ok(())
}

fn alu_mi<const OP: u8, const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let l = cpu.u_lin(u)?;
    let a = if writes(OP) {
        cpu.rd_rmw(l, SZ)?
    } else {
        cpu.rd_inline(l, SZ)?
    };
    let r = cpu.u_alu::<OP, SZ>(a, u.imm);
    if writes(OP) {
        cpu.wr_inline(l, SZ, r)?;
    }
    Ok(())
}

/// SHL/SHR/SAR (`alu::shift` numbering) of a register by an immediate
/// (already masked).
fn shift_ri<const OP: u8, const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let a = cpu.g(u.r0) & mask(SZ);
    if u.imm == 0 {
        cpu.set_g::<SZ>(u.r0, a);
        return Ok(());
    }
    let (r, f) = alu::shift(OP, a, u.imm as u32, SZ, cpu.rflags);
    cpu.set_g::<SZ>(u.r0, r);
    cpu.set_arith(f);
    Ok(())
}

fn setcc<const CC_: u8>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let v = holds::<CC_>(cpu.rflags) as u64;
    cpu.set_g::<1>(u.r0, v);
    Ok(())
}

fn cmov8<const CC_: u8>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    if holds::<CC_>(cpu.rflags) {
        cpu.gpr[u.r0 as usize & 15] = cpu.g(u.r1);
    }
    Ok(())
}

fn cmov4<const CC_: u8>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    // A 32-bit CMOV zero-extends its destination whether or not it moves.
    let v = if holds::<CC_>(cpu.rflags) {
        cpu.g(u.r1)
    } else {
        cpu.g(u.r0)
    };
    cpu.set_g::<4>(u.r0, v);
    Ok(())
}

/// INC (DEC if `DEC`) of a register: CF is kept.
fn incdec<const DEC: bool, const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let a = cpu.g(u.r0) & mask(SZ);
    let (r, f) = if DEC {
        alu::sub(a, 1, false, SZ)
    } else {
        alu::add(a, 1, false, SZ)
    };
    cpu.set_g::<SZ>(u.r0, r);
    cpu.set_arith((f & !CF) | (cpu.rflags & CF));
    Ok(())
}

fn imul_rr<const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let (r, f) = alu::imul(cpu.g(u.r0) & mask(SZ), cpu.g(u.r1) & mask(SZ), SZ);
    cpu.set_g::<SZ>(u.r0, r);
    cpu.set_arith(f);
    Ok(())
}

fn imul_rm<const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    let l = cpu.u_lin(u)?;
    let b = cpu.rd_inline(l, SZ)?;
    let (r, f) = alu::imul(cpu.g(u.r0) & mask(SZ), b, SZ);
    cpu.set_g::<SZ>(u.r0, r);
    cpu.set_arith(f);
    Ok(())
}

/// DIV or IDIV by a register (#DE as `exec`).
fn div_r<const SIGNED: bool, const SZ: usize>(cpu: &mut Cpu, u: &Uop) -> R<()> {
    cpu.divide(cpu.g(u.r0) & mask(SZ), SZ, SIGNED)
}
