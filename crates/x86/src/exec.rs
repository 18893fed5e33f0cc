//! Instruction execution: operands, the integer instruction set, string and
//! port instructions. System instructions are in system.rs, x87/SSE in fpu.rs.

use iced_x86::{Code, ConditionCode, Instruction, Mnemonic as M, OpKind, Register};

use crate::alu::{self, mask, sext};
use arch::paging::Access;
use arch::rflags::*;
use arch::{canonical, cr0, vector};

use crate::{exc, exc_code, sreg, Cpu, CpuExit, Stop, R};

/// Most iterations of a REP string instruction per step (the rest continue at
/// the next step, so interrupts and budgets stay responsive).
const REP_CHUNK: u32 = 16384;

/// A destination operand, located once for read-modify-write.
#[derive(Clone, Copy)]
pub(crate) enum Dst {
    Reg(Register),
    Mem(u64),
}

#[inline(always)]
pub(crate) fn reg_size(r: Register) -> usize {
    match r as usize {
        1..=20 => 1,
        21..=36 => 2,
        37..=52 => 4,
        53..=68 => 8,
        71..=76 => 2,
        _ => 8,
    }
}

impl Cpu {
    // ---- registers and operands -----------------------------------------

    #[inline(always)]
    pub(crate) fn reg(&self, r: Register) -> u64 {
        let n = r as usize;
        match n {
            1..=4 => self.gpr[n - 1] & 0xff,
            5..=8 => (self.gpr[n - 5] >> 8) & 0xff,
            9..=20 => self.gpr[n - 5] & 0xff,
            21..=36 => self.gpr[n - 21] & 0xffff,
            37..=52 => self.gpr[n - 37] & 0xffff_ffff,
            53..=68 => self.gpr[n - 53],
            71..=76 => self.seg[n - 71].selector as u64,
            _ => 0,
        }
    }

    #[inline(always)]
    pub(crate) fn set_reg(&mut self, r: Register, v: u64) {
        let n = r as usize;
        match n {
            1..=4 => self.gpr[n - 1] = (self.gpr[n - 1] & !0xff) | (v & 0xff),
            5..=8 => self.gpr[n - 5] = (self.gpr[n - 5] & !0xff00) | ((v & 0xff) << 8),
            9..=20 => self.gpr[n - 5] = (self.gpr[n - 5] & !0xff) | (v & 0xff),
            21..=36 => self.gpr[n - 21] = (self.gpr[n - 21] & !0xffff) | (v & 0xffff),
            37..=52 => self.gpr[n - 37] = v & 0xffff_ffff,
            53..=68 => self.gpr[n - 53] = v,
            _ => {}
        }
    }

    /// Sets register number `idx` with an operand of `sz` bytes (legacy
    /// semantics: 8/16-bit writes merge, 32-bit writes zero-extend).
    #[inline(always)]
    pub(crate) fn set_gpr_sz(&mut self, idx: usize, sz: usize, v: u64) {
        let g = &mut self.gpr[idx];
        *g = match sz {
            1 => (*g & !0xff) | (v & 0xff),
            2 => (*g & !0xffff) | (v & 0xffff),
            4 => v & 0xffff_ffff,
            _ => v,
        };
    }

    /// The effective address of the memory operand.
    #[inline]
    pub(crate) fn ea(&self, i: &Instruction) -> u64 {
        let base = i.memory_base();
        let index = i.memory_index();
        let mut a = i.memory_displacement64();
        if base == Register::RIP {
            return a;
        }
        if base == Register::EIP {
            return a & 0xffff_ffff;
        }
        let mut width = 0;
        if base != Register::None {
            a = a.wrapping_add(self.reg(base));
            width = reg_size(base);
        }
        if index != Register::None {
            a = a.wrapping_add(self.reg(index).wrapping_mul(i.memory_index_scale() as u64));
            width = reg_size(index);
        }
        if width == 0 {
            width = match i.memory_displ_size() {
                2 => 2,
                4 => 4,
                _ => 8,
            };
        }
        match width {
            2 => a & 0xffff,
            4 => a & 0xffff_ffff,
            _ => a,
        }
    }

    /// Linear address of `ea` in segment `seg`.
    #[inline]
    pub(crate) fn lin(&self, seg: usize, ea: u64) -> R<u64> {
        if self.long64 {
            let l = if seg >= sreg::FS {
                ea.wrapping_add(self.seg[seg].base)
            } else {
                ea
            };
            if !canonical(l) {
                return exc_code(
                    if seg == sreg::SS {
                        vector::SS
                    } else {
                        vector::GP
                    },
                    0,
                );
            }
            Ok(l)
        } else {
            Ok(self.seg[seg].base.wrapping_add(ea) & 0xffff_ffff)
        }
    }

    #[inline]
    pub(crate) fn mem_seg(i: &Instruction) -> usize {
        let s = i.memory_segment() as usize;
        if (71..=76).contains(&s) {
            s - 71
        } else {
            sreg::DS
        }
    }

    /// Linear address of the instruction's memory operand.
    #[inline]
    pub(crate) fn mem_lin(&self, i: &Instruction) -> R<u64> {
        self.lin(Self::mem_seg(i), self.ea(i))
    }

    #[inline]
    pub(crate) fn opsz(&self, i: &Instruction, n: u32) -> usize {
        match i.op_kind(n) {
            OpKind::Register => reg_size(i.op_register(n)),
            OpKind::Memory => i.memory_size().size(),
            OpKind::Immediate8 | OpKind::Immediate8_2nd => 1,
            OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
            OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
            _ => 8,
        }
    }

    #[inline]
    pub(crate) fn read_op(&mut self, i: &Instruction, n: u32, sz: usize) -> R<u64> {
        match i.op_kind(n) {
            OpKind::Register => Ok(self.reg(i.op_register(n))),
            OpKind::Memory => {
                let l = self.mem_lin(i)?;
                self.rd(l, sz)
            }
            _ => Ok(i.immediate(n) & mask(sz)),
        }
    }

    #[inline]
    pub(crate) fn write_op(&mut self, i: &Instruction, n: u32, sz: usize, v: u64) -> R<()> {
        match i.op_kind(n) {
            OpKind::Register => {
                self.set_reg(i.op_register(n), v);
                Ok(())
            }
            _ => {
                let l = self.mem_lin(i)?;
                self.wr(l, sz, v)
            }
        }
    }

    #[inline]
    pub(crate) fn dst(&self, i: &Instruction) -> R<Dst> {
        match i.op0_kind() {
            OpKind::Register => Ok(Dst::Reg(i.op0_register())),
            _ => Ok(Dst::Mem(self.mem_lin(i)?)),
        }
    }

    #[inline]
    pub(crate) fn dst_read(&mut self, d: Dst, sz: usize) -> R<u64> {
        match d {
            Dst::Reg(r) => Ok(self.reg(r)),
            Dst::Mem(l) => self.rd(l, sz),
        }
    }

    /// The destination's value for a read-modify-write: a memory operand
    /// is checked for writing first.
    #[inline]
    pub(crate) fn dst_read_rmw(&mut self, d: Dst, sz: usize) -> R<u64> {
        match d {
            Dst::Reg(r) => Ok(self.reg(r)),
            Dst::Mem(l) => self.rd_rmw(l, sz),
        }
    }

    #[inline]
    pub(crate) fn dst_write(&mut self, d: Dst, sz: usize, v: u64) -> R<()> {
        match d {
            Dst::Reg(r) => {
                self.set_reg(r, v);
                Ok(())
            }
            Dst::Mem(l) => self.wr(l, sz, v),
        }
    }

    #[inline(always)]
    pub(crate) fn set_arith(&mut self, f: u64) {
        self.rflags = (self.rflags & !ARITH) | f;
    }

    // ---- stack ---------------------------------------------------------

    /// Mask of the stack pointer: 64-bit mode, else SS.B.
    #[inline]
    pub(crate) fn sp_mask(&self) -> u64 {
        if self.long64 {
            !0
        } else if self.seg[sreg::SS].db {
            0xffff_ffff
        } else {
            0xffff
        }
    }

    #[inline]
    pub(crate) fn set_sp(&mut self, v: u64) {
        let m = self.sp_mask();
        self.gpr[4] = (self.gpr[4] & !m) | (v & m);
    }

    #[inline]
    pub(crate) fn push(&mut self, v: u64, sz: usize) -> R<()> {
        let m = self.sp_mask();
        let sp = self.gpr[4].wrapping_sub(sz as u64) & m;
        let l = self.lin(sreg::SS, sp)?;
        self.wr(l, sz, v)?;
        self.set_sp(sp);
        Ok(())
    }

    /// Reads the value `off` bytes above the top of the stack.
    #[inline]
    pub(crate) fn peek(&mut self, off: u64, sz: usize) -> R<u64> {
        let m = self.sp_mask();
        let l = self.lin(sreg::SS, self.gpr[4].wrapping_add(off) & m)?;
        self.rd(l, sz)
    }

    #[inline]
    pub(crate) fn pop(&mut self, sz: usize) -> R<u64> {
        let v = self.peek(0, sz)?;
        let sp = self.gpr[4].wrapping_add(sz as u64);
        self.set_sp(sp);
        Ok(v)
    }

    /// Operand size of a push/pop-like instruction.
    #[inline]
    fn stack_sz(i: &Instruction) -> usize {
        (i.stack_pointer_increment().unsigned_abs() as usize).clamp(2, 8)
    }

    // ---- conditions ----------------------------------------------------

    #[inline]
    pub(crate) fn cond(&self, cc: ConditionCode) -> bool {
        alu::condition(self.rflags, cc as u8)
    }

    #[inline]
    fn ip_mask(&self) -> u64 {
        match self.bits {
            64 => !0,
            32 => 0xffff_ffff,
            _ => 0xffff,
        }
    }

    pub(crate) fn require_cpl0(&self) -> R<()> {
        if self.cpl != 0 && !self.grant {
            return exc_code(vector::GP, 0);
        }
        Ok(())
    }

    fn iopl(&self) -> u8 {
        ((self.rflags >> 12) & 3) as u8
    }

    /// Virtual-8086 mode's IOPL-sensitive instructions (PUSHF, POPF, INT n,
    /// IRET; CLI and STI through [`Cpu::iopl_ok`]) raise #GP(0) below IOPL
    /// 3 (SDM vol. 3 20.2.7; no VME).
    pub(crate) fn v86_iopl(&self) -> R<()> {
        if self.rflags & VM != 0 && self.iopl() < 3 {
            return exc_code(vector::GP, 0);
        }
        Ok(())
    }

    /// Whether IF-changing instructions are allowed (CPL <= IOPL).
    fn iopl_ok(&self) -> bool {
        self.cr0 & cr0::PE == 0 || self.cpl <= self.iopl()
    }

    // ---- the step ------------------------------------------------------

    /// Executes one instruction.
    #[inline]
    pub(crate) fn step(&mut self) -> R<()> {
        let p = self.fetch_uop()?;
        // SAFETY: `fetch_uop` gives a valid pointer; copied at once.
        let u = unsafe { *p };
        if self.trace {
            // Tracing: the generic path.
            let i = self.code.insn_of(&u);
            self.exec_insn(&i)?;
        } else {
            self.next_rip = u.ip.wrapping_add(u.len as u64);
            (u.run)(self, &u)?;
        }
        self.rip = self.next_rip;
        Ok(())
    }

    /// Runs decoded instruction `i` (at RIP); sets `next_rip`.
    pub(crate) fn exec_insn(&mut self, i: &Instruction) -> R<()> {
        if self.trace {
            eprintln!("emu: {:#x} {:?} rsp={:#x}", self.rip, i.code(), self.gpr[4]);
        }
        self.next_rip = i.next_ip() & self.ip_mask();
        if self.intercepts.sensitive && !self.sensitive_ok && self.cpl != 0 {
            // At CPL 3 only the stores of system registers (SGDT, SIDT,
            // SLDT, STR, SMSW: they show the VMM's, where user mode runs
            // natively), in virtual-8086 mode only SGDT, SIDT and SMSW (SLDT
            // and STR are #UD there): the others fault at CPL 3 (#GP below
            // IOPL 3) or show user mode as it is.
            let v86 = self.rflags & VM != 0;
            if let Some(mnemonic) = crate::intercept::sensitive(i).filter(|m| {
                self.cpl != 3
                    || matches!(*m, "sgdt" | "sidt" | "smsw")
                    || (!v86 && matches!(*m, "sldt" | "str"))
            }) {
                let next_rip = self.next_rip;
                return self.event_exit(CpuExit::Sensitive { mnemonic, next_rip });
            }
        }
        if !(self.vmx.non_root && self.vmx_intercept(i)?) {
            match self.exec_fast(i) {
                Some(r) => r?,
                None => self.exec(i)?,
            }
        }
        Ok(())
    }

    /// The most frequent instruction forms of compiled 64-bit code, run
    /// without the call into `exec` and its generic operand queries (same
    /// semantics); `None` leaves the instruction to `exec`.
    #[inline(always)]
    fn exec_fast(&mut self, i: &Instruction) -> Option<R<()>> {
        // GPR index of a 32- or 64-bit register (iced numbers them in order).
        let r32 = |r: Register| r as usize - Register::EAX as usize;
        let r64 = |r: Register| r as usize - Register::RAX as usize;
        if self.long64 && i.is_jcc_short_or_near() {
            if self.cond(i.condition_code()) {
                self.next_rip = i.near_branch_target();
            }
            return Some(Ok(()));
        }
        // ALU forms: (operation as in `alu2`, 8 = TEST; operand size).
        let alu = match i.code() {
            Code::Add_rm64_r64
            | Code::Add_r64_rm64
            | Code::Add_rm64_imm8
            | Code::Add_rm64_imm32 => Some((0, 8)),
            Code::Add_rm32_r32
            | Code::Add_r32_rm32
            | Code::Add_rm32_imm8
            | Code::Add_rm32_imm32 => Some((0, 4)),
            Code::Sub_rm64_r64
            | Code::Sub_r64_rm64
            | Code::Sub_rm64_imm8
            | Code::Sub_rm64_imm32 => Some((5, 8)),
            Code::Sub_rm32_r32
            | Code::Sub_r32_rm32
            | Code::Sub_rm32_imm8
            | Code::Sub_rm32_imm32 => Some((5, 4)),
            Code::And_rm64_r64 | Code::And_rm64_imm8 | Code::And_rm64_imm32 => Some((4, 8)),
            Code::And_rm32_r32 | Code::And_rm32_imm8 | Code::And_rm32_imm32 => Some((4, 4)),
            Code::Or_rm64_r64 | Code::Or_rm32_r32 => {
                Some((1, if i.code() == Code::Or_rm64_r64 { 8 } else { 4 }))
            }
            Code::Xor_rm64_r64 | Code::Xor_r64_rm64 => Some((6, 8)),
            Code::Xor_rm32_r32 | Code::Xor_r32_rm32 => Some((6, 4)),
            Code::Cmp_rm64_r64
            | Code::Cmp_r64_rm64
            | Code::Cmp_rm64_imm8
            | Code::Cmp_rm64_imm32 => Some((7, 8)),
            Code::Cmp_rm32_r32
            | Code::Cmp_r32_rm32
            | Code::Cmp_rm32_imm8
            | Code::Cmp_rm32_imm32 => Some((7, 4)),
            Code::Test_rm64_r64 => Some((8, 8)),
            Code::Test_rm32_r32 => Some((8, 4)),
            _ => None,
        };
        if let Some((op, sz)) = alu {
            return Some(self.alu_fast(i, op, sz));
        }
        Some(match i.code() {
            Code::Mov_r32_rm32 => {
                let v = if i.op1_kind() == OpKind::Register {
                    self.gpr[r32(i.op1_register())] & 0xffff_ffff
                } else {
                    match self.mem_lin(i).and_then(|l| self.rd(l, 4)) {
                        Ok(v) => v,
                        Err(e) => return Some(Err(e)),
                    }
                };
                self.gpr[r32(i.op0_register())] = v;
                Ok(())
            }
            Code::Mov_rm32_r32 | Code::Mov_rm64_r64 => {
                let wide = i.code() == Code::Mov_rm64_r64;
                let (src, sz) = if wide {
                    (self.gpr[r64(i.op1_register())], 8)
                } else {
                    (self.gpr[r32(i.op1_register())] & 0xffff_ffff, 4)
                };
                if i.op0_kind() == OpKind::Register {
                    let d = i.op0_register();
                    self.gpr[if wide { r64(d) } else { r32(d) }] = src;
                    Ok(())
                } else {
                    self.mem_lin(i).and_then(|l| self.wr(l, sz, src))
                }
            }
            Code::Lea_r64_m => {
                self.gpr[r64(i.op0_register())] = self.ea(i);
                Ok(())
            }
            Code::Mov_r64_rm64 => {
                let v = if i.op1_kind() == OpKind::Register {
                    self.gpr[r64(i.op1_register())]
                } else {
                    match self.mem_lin(i).and_then(|l| self.rd(l, 8)) {
                        Ok(v) => v,
                        Err(e) => return Some(Err(e)),
                    }
                };
                self.gpr[r64(i.op0_register())] = v;
                Ok(())
            }
            Code::Mov_r32_imm32 => {
                self.gpr[r32(i.op0_register())] = i.immediate(1) & 0xffff_ffff;
                Ok(())
            }
            Code::Mov_r64_imm64 => {
                self.gpr[r64(i.op0_register())] = i.immediate(1);
                Ok(())
            }
            Code::Push_r64 => self.push(self.gpr[r64(i.op0_register())], 8),
            Code::Pop_r64 => match self.pop(8) {
                Ok(v) => {
                    self.gpr[r64(i.op0_register())] = v;
                    Ok(())
                }
                Err(e) => Err(e),
            },
            Code::Call_rel32_64 => {
                let ret = self.next_rip;
                self.push(ret, 8)
                    .map(|()| self.next_rip = i.near_branch_target())
            }
            Code::Retnq => self.pop(8).map(|t| self.next_rip = t),
            Code::Jmp_rel8_64 | Code::Jmp_rel32_64 => {
                self.next_rip = i.near_branch_target();
                Ok(())
            }
            _ => return None,
        })
    }

    /// ADD, SUB, AND, OR, XOR, CMP (`op` as in `alu2`) and TEST (8) of
    /// 32- or 64-bit operands, for `exec_fast`.
    #[inline(always)]
    fn alu_fast(&mut self, i: &Instruction, op: u8, sz: usize) -> R<()> {
        let a = self.read_op(i, 0, sz)?;
        let b = self.read_op(i, 1, sz)? & mask(sz);
        let (r, f) = alu::binary(op, a, b, false, sz);
        if op != 7 && op != 8 {
            self.write_op(i, 0, sz, r)?;
        }
        self.set_arith(f);
        Ok(())
    }

    fn unimpl<T>(&mut self, i: &Instruction) -> R<T> {
        let name = format!("{:?}", i.mnemonic()).to_lowercase();
        let what = format!("unimplemented instruction {name} at {:#x}", self.rip);
        self.unimplemented(what)
    }

    fn exec(&mut self, i: &Instruction) -> R<()> {
        match i.mnemonic() {
            M::Mov => self.mov(i),
            M::Add => self.alu2(i, 0),
            M::Or => self.alu2(i, 1),
            M::Adc => self.alu2(i, 2),
            M::Sbb => self.alu2(i, 3),
            M::And => self.alu2(i, 4),
            M::Sub => self.alu2(i, 5),
            M::Xor => self.alu2(i, 6),
            M::Cmp => self.alu2(i, 7),
            M::Test => {
                let sz = self.opsz(i, 0);
                let a = self.read_op(i, 0, sz)?;
                let b = self.read_op(i, 1, sz)?;
                let (_, f) = alu::logic(a & b, sz);
                self.set_arith(f);
                Ok(())
            }
            M::Inc | M::Dec => {
                let sz = self.opsz(i, 0);
                let d = self.dst(i)?;
                let a = self.dst_read_rmw(d, sz)?;
                let (r, f) = if i.mnemonic() == M::Inc {
                    alu::add(a, 1, false, sz)
                } else {
                    alu::sub(a, 1, false, sz)
                };
                self.dst_write(d, sz, r)?;
                self.set_arith((f & !CF) | (self.rflags & CF));
                Ok(())
            }
            M::Not => {
                let sz = self.opsz(i, 0);
                let d = self.dst(i)?;
                let a = self.dst_read_rmw(d, sz)?;
                self.dst_write(d, sz, !a & mask(sz))
            }
            M::Neg => {
                let sz = self.opsz(i, 0);
                let d = self.dst(i)?;
                let a = self.dst_read_rmw(d, sz)?;
                let (r, f) = alu::sub(0, a, false, sz);
                self.dst_write(d, sz, r)?;
                self.set_arith(f);
                Ok(())
            }
            M::Lea => {
                let sz = self.opsz(i, 0);
                let a = self.ea(i) & mask(sz);
                self.set_reg(i.op0_register(), a);
                Ok(())
            }
            M::Movzx => {
                let sz = self.opsz(i, 1);
                let v = self.read_op(i, 1, sz)?;
                self.set_reg(i.op0_register(), v);
                Ok(())
            }
            M::Movsx | M::Movsxd => {
                let sz = self.opsz(i, 1);
                let v = self.read_op(i, 1, sz)?;
                let dsz = self.opsz(i, 0);
                self.set_reg(i.op0_register(), sext(v, sz) & mask(dsz));
                Ok(())
            }
            M::Xchg => {
                let sz = self.opsz(i, 0);
                if i.op0_kind() == OpKind::Register && i.op1_kind() == OpKind::Register {
                    let (a, b) = (self.reg(i.op0_register()), self.reg(i.op1_register()));
                    self.set_reg(i.op0_register(), b);
                    self.set_reg(i.op1_register(), a);
                    return Ok(());
                }
                // One operand is memory.
                let (mreg, _) = if i.op0_kind() == OpKind::Register {
                    (i.op0_register(), 0)
                } else {
                    (i.op1_register(), 1)
                };
                let l = self.mem_lin(i)?;
                let m = self.rd_rmw(l, sz)?;
                self.wr(l, sz, self.reg(mreg))?;
                self.set_reg(mreg, m);
                Ok(())
            }
            M::Cmpxchg => {
                let sz = self.opsz(i, 0);
                let d = self.dst(i)?;
                let dv = self.dst_read_rmw(d, sz)?;
                let acc = self.gpr[0] & mask(sz);
                let src = self.reg(i.op1_register());
                let (_, f) = alu::sub(acc, dv, false, sz);
                if acc == dv {
                    self.dst_write(d, sz, src)?;
                } else {
                    if let Dst::Mem(_) = d {
                        self.dst_write(d, sz, dv)?;
                    }
                    self.set_gpr_sz(0, sz, dv);
                }
                self.set_arith(f);
                Ok(())
            }
            M::Cmpxchg8b | M::Cmpxchg16b => {
                let sz = if i.mnemonic() == M::Cmpxchg8b { 4 } else { 8 };
                let l = self.mem_lin(i)?;
                if sz == 8 && l & 15 != 0 {
                    return exc_code(vector::GP, 0);
                }
                let lo = self.rd(l, sz)?;
                let hi = self.rd(l.wrapping_add(sz as u64), sz)?;
                let m = mask(sz);
                let (eax, edx) = (self.gpr[0] & m, self.gpr[2] & m);
                if lo == eax && hi == edx {
                    let (ebx, ecx) = (self.gpr[3] & m, self.gpr[1] & m);
                    self.wr(l, sz, ebx)?;
                    self.wr(l.wrapping_add(sz as u64), sz, ecx)?;
                    self.rflags |= ZF;
                } else {
                    self.wr(l, sz, lo)?;
                    self.wr(l.wrapping_add(sz as u64), sz, hi)?;
                    self.set_gpr_sz(0, sz, lo);
                    self.set_gpr_sz(2, sz, hi);
                    self.rflags &= !ZF;
                }
                Ok(())
            }
            M::Xadd => {
                let sz = self.opsz(i, 0);
                let d = self.dst(i)?;
                let dv = self.dst_read_rmw(d, sz)?;
                let src = self.reg(i.op1_register());
                let (r, f) = alu::add(dv, src, false, sz);
                self.dst_write(d, sz, r)?;
                self.set_reg(i.op1_register(), dv);
                if let Dst::Reg(_) = d {
                    // xadd reg, reg: the destination gets the sum even if the
                    // two are the same register.
                    self.dst_write(d, sz, r)?;
                }
                self.set_arith(f);
                Ok(())
            }
            M::Push => self.push_insn(i),
            M::Pop => self.pop_insn(i),
            M::Pushf | M::Pushfd | M::Pushfq => {
                self.v86_iopl()?;
                let sz = Self::stack_sz(i);
                self.push(self.rflags & !(RF | VM) & mask(sz), sz)
            }
            M::Popf | M::Popfd | M::Popfq => {
                self.v86_iopl()?;
                let sz = Self::stack_sz(i);
                let v = self.pop(sz)?;
                self.write_flags(v, sz);
                Ok(())
            }
            M::Pusha | M::Pushad => {
                let sz = if i.mnemonic() == M::Pushad { 4 } else { 2 };
                let sp = self.gpr[4];
                for r in 0..8 {
                    let v = if r == 4 { sp } else { self.gpr[r] };
                    self.push(v & mask(sz), sz)?;
                }
                Ok(())
            }
            M::Popa | M::Popad => {
                let sz = if i.mnemonic() == M::Popad { 4 } else { 2 };
                for r in (0..8).rev() {
                    let v = self.pop(sz)?;
                    if r != 4 {
                        self.set_gpr_sz(r, sz, v);
                    }
                }
                Ok(())
            }
            M::Cbw => {
                let v = sext(self.gpr[0], 1);
                self.set_gpr_sz(0, 2, v);
                Ok(())
            }
            M::Cwde => {
                let v = sext(self.gpr[0], 2);
                self.set_gpr_sz(0, 4, v);
                Ok(())
            }
            M::Cdqe => {
                self.gpr[0] = sext(self.gpr[0], 4);
                Ok(())
            }
            M::Cwd | M::Cdq | M::Cqo => {
                let sz = match i.mnemonic() {
                    M::Cwd => 2,
                    M::Cdq => 4,
                    _ => 8,
                };
                let neg = self.gpr[0] & alu::sign_bit(sz) != 0;
                self.set_gpr_sz(2, sz, if neg { !0 } else { 0 });
                Ok(())
            }
            M::Bswap => {
                let r = i.op0_register();
                let sz = reg_size(r);
                let v = self.reg(r);
                let s = match sz {
                    8 => v.swap_bytes(),
                    4 => (v as u32).swap_bytes() as u64,
                    _ => 0, // undefined for 16-bit operands
                };
                self.set_reg(r, s);
                Ok(())
            }
            M::Mul | M::Imul if i.op_count() == 1 => self.mul1(i),
            M::Imul => {
                let sz = self.opsz(i, 0);
                let (a, b) = if i.op_count() == 2 {
                    (self.reg(i.op0_register()), self.read_op(i, 1, sz)?)
                } else {
                    (self.read_op(i, 1, sz)?, i.immediate(2) & mask(sz))
                };
                let (r, f) = alu::imul(a, b, sz);
                self.set_reg(i.op0_register(), r);
                self.set_arith(f);
                Ok(())
            }
            M::Div | M::Idiv => self.div(i),
            M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shl | M::Sal | M::Shr | M::Sar => {
                let op = match i.mnemonic() {
                    M::Rol => 0,
                    M::Ror => 1,
                    M::Rcl => 2,
                    M::Rcr => 3,
                    M::Shr => 5,
                    M::Sar => 7,
                    _ => 4,
                };
                let sz = self.opsz(i, 0);
                let cnt = if i.op_count() == 1 {
                    1
                } else {
                    self.read_op(i, 1, 1)? as u32
                } & if sz == 8 { 63 } else { 31 };
                let d = self.dst(i)?;
                let a = self.dst_read_rmw(d, sz)?;
                if cnt == 0 {
                    // The destination is still written (as the CPU does), for
                    // the fault behaviour of read-only memory.
                    return self.dst_write(d, sz, a);
                }
                let (r, f) = alu::shift(op, a, cnt, sz, self.rflags);
                self.dst_write(d, sz, r)?;
                self.set_arith(f);
                Ok(())
            }
            M::Shld | M::Shrd => {
                let sz = self.opsz(i, 0);
                let cnt = self.read_op(i, 2, 1)? as u32 & if sz == 8 { 63 } else { 31 };
                let d = self.dst(i)?;
                let a = self.dst_read(d, sz)?;
                if cnt == 0 {
                    return Ok(());
                }
                let b = self.reg(i.op1_register());
                let (r, f) = alu::shld(i.mnemonic() == M::Shld, a, b, cnt, sz, self.rflags);
                self.dst_write(d, sz, r)?;
                self.set_arith(f);
                Ok(())
            }
            M::Bt | M::Bts | M::Btr | M::Btc => self.bt(i),
            M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt => {
                let sz = self.opsz(i, 0);
                let v = self.read_op(i, 1, sz)?;
                let m = i.mnemonic();
                let true_cnt =
                    (m == M::Tzcnt && self.cpuid.bmi1) || (m == M::Lzcnt && self.cpuid.abm);
                let forward = m == M::Bsf || m == M::Tzcnt;
                if true_cnt {
                    let bits = (sz * 8) as u64;
                    let r = if forward {
                        (v.trailing_zeros() as u64).min(bits)
                    } else {
                        (v.leading_zeros() as u64).saturating_sub(64 - bits)
                    };
                    self.set_reg(i.op0_register(), r);
                    let mut f = self.rflags & !(CF | ZF);
                    if v == 0 {
                        f |= CF;
                    }
                    if r == 0 {
                        f |= ZF;
                    }
                    self.rflags = f;
                    return Ok(());
                }
                if v == 0 {
                    self.rflags |= ZF;
                } else {
                    let r = if forward {
                        v.trailing_zeros()
                    } else {
                        63 - v.leading_zeros()
                    };
                    self.set_reg(i.op0_register(), r as u64);
                    self.rflags &= !ZF;
                }
                Ok(())
            }
            M::Popcnt => {
                let sz = self.opsz(i, 0);
                let v = self.read_op(i, 1, sz)?;
                let r = v.count_ones() as u64;
                self.set_reg(i.op0_register(), r);
                self.set_arith(if v == 0 { ZF } else { 0 });
                Ok(())
            }
            m if crate::uop::is_setcc(m) => {
                let v = self.cond(i.condition_code()) as u64;
                self.write_op(i, 0, 1, v)
            }
            m if crate::uop::is_cmov(m) => {
                let sz = self.opsz(i, 0);
                let src = self.read_op(i, 1, sz)?;
                let r = i.op0_register();
                let v = if self.cond(i.condition_code()) {
                    src
                } else {
                    self.reg(r)
                };
                self.set_reg(r, v);
                Ok(())
            }
            M::Ja
            | M::Jae
            | M::Jb
            | M::Jbe
            | M::Je
            | M::Jg
            | M::Jge
            | M::Jl
            | M::Jle
            | M::Jne
            | M::Jno
            | M::Jnp
            | M::Jns
            | M::Jo
            | M::Jp
            | M::Js => {
                if self.cond(i.condition_code()) {
                    self.next_rip = i.near_branch_target();
                }
                Ok(())
            }
            M::Jmp => self.jmp(i),
            M::Call => self.call(i),
            M::Ret => {
                let imm = if i.op_count() == 1 { i.immediate(0) } else { 0 };
                let sz = match i.code() {
                    Code::Retnw | Code::Retnw_imm16 => 2,
                    Code::Retnd | Code::Retnd_imm16 => 4,
                    _ => 8,
                };
                let old = self.gpr[4];
                let t = self.pop(sz)?;
                // A non-canonical return address is the RET's #GP(0), RSP
                // unchanged (SDM vol. 2 RET).
                if self.long64 && !canonical(t) {
                    self.gpr[4] = old;
                    return exc_code(vector::GP, 0);
                }
                let sp = self.gpr[4].wrapping_add(imm);
                self.set_sp(sp);
                self.next_rip = t;
                Ok(())
            }
            M::Jcxz | M::Jecxz | M::Jrcxz => {
                let sz = match i.mnemonic() {
                    M::Jcxz => 2,
                    M::Jecxz => 4,
                    _ => 8,
                };
                if self.gpr[1] & mask(sz) == 0 {
                    self.next_rip = i.near_branch_target();
                }
                Ok(())
            }
            M::Loop | M::Loope | M::Loopne => {
                let sz = match i.code() {
                    Code::Loop_rel8_16_CX
                    | Code::Loop_rel8_32_CX
                    | Code::Loope_rel8_16_CX
                    | Code::Loope_rel8_32_CX
                    | Code::Loopne_rel8_16_CX
                    | Code::Loopne_rel8_32_CX => 2,
                    Code::Loop_rel8_16_RCX
                    | Code::Loop_rel8_64_RCX
                    | Code::Loope_rel8_16_RCX
                    | Code::Loope_rel8_64_RCX
                    | Code::Loopne_rel8_16_RCX
                    | Code::Loopne_rel8_64_RCX => 8,
                    _ => 4,
                };
                let c = self.gpr[1].wrapping_sub(1) & mask(sz);
                self.set_gpr_sz(1, sz, c);
                let z = self.rflags & ZF != 0;
                let take = c != 0
                    && match i.mnemonic() {
                        M::Loope => z,
                        M::Loopne => !z,
                        _ => true,
                    };
                if take {
                    self.next_rip = i.near_branch_target();
                }
                Ok(())
            }
            M::Enter => self.enter(i),
            M::Leave => {
                let sz = match i.code() {
                    Code::Leavew => 2,
                    Code::Leaved => 4,
                    _ => 8,
                };
                let m = self.sp_mask();
                let bp = self.gpr[5] & m;
                let l = self.lin(sreg::SS, bp)?;
                let v = self.rd(l, sz)?;
                self.set_sp(bp.wrapping_add(sz as u64));
                self.set_gpr_sz(5, sz, v);
                Ok(())
            }
            M::Clc => {
                self.rflags &= !CF;
                Ok(())
            }
            M::Stc => {
                self.rflags |= CF;
                Ok(())
            }
            M::Cmc => {
                self.rflags ^= CF;
                Ok(())
            }
            M::Cld => {
                self.rflags &= !DF;
                Ok(())
            }
            M::Std => {
                self.rflags |= DF;
                Ok(())
            }
            M::Cli => {
                if !self.iopl_ok() {
                    return exc_code(vector::GP, 0);
                }
                self.rflags &= !IF;
                Ok(())
            }
            M::Sti => {
                if !self.iopl_ok() {
                    return exc_code(vector::GP, 0);
                }
                if self.rflags & IF == 0 {
                    self.inhibit = true;
                }
                self.rflags |= IF;
                Ok(())
            }
            M::Lahf => {
                let ah = (self.rflags & (SF | ZF | AF | PF | CF)) | 2;
                self.set_reg(Register::AH, ah);
                Ok(())
            }
            M::Sahf => {
                let ah = self.reg(Register::AH);
                let m = SF | ZF | AF | PF | CF;
                self.rflags = (self.rflags & !m) | (ah & m);
                Ok(())
            }
            M::Xlatb => {
                let sz = if self.bits == 64 { 8 } else { 4 };
                let a = (self.gpr[3].wrapping_add(self.gpr[0] & 0xff)) & mask(sz);
                let l = self.lin(Self::mem_seg(i), a)?;
                let v = self.rd(l, 1)?;
                self.set_gpr_sz(0, 1, v);
                Ok(())
            }
            M::Nop
            | M::Pause
            | M::Lfence
            | M::Mfence
            | M::Sfence
            | M::Prefetchnta
            | M::Prefetcht0
            | M::Prefetcht1
            | M::Prefetcht2
            | M::Prefetchw => Ok(()),
            m if crate::model::hint_nop(m) => Ok(()),
            M::Clflush | M::Clflushopt => {
                // Checks the address like a read.
                let l = self.mem_lin(i)?;
                self.translate(l, Access::Read, self.acc_r)?;
                Ok(())
            }
            M::Hlt => {
                self.require_cpl0()?;
                self.halted = true;
                Ok(())
            }
            M::In | M::Out => self.port_io(i),
            M::Movsb
            | M::Movsw
            | M::Movsq
            | M::Stosb
            | M::Stosw
            | M::Stosd
            | M::Stosq
            | M::Lodsb
            | M::Lodsw
            | M::Lodsd
            | M::Lodsq
            | M::Cmpsb
            | M::Cmpsw
            | M::Cmpsq
            | M::Scasb
            | M::Scasw
            | M::Scasd
            | M::Scasq => self.string(i),
            M::Movsd if i.code() == Code::Movsd_m32_m32 => self.string(i),
            M::Cmpsd if i.code() == Code::Cmpsd_m32_m32 => self.string(i),
            M::Insb | M::Insw | M::Insd => self.ins(i),
            M::Outsb | M::Outsw | M::Outsd => self.outs(i),
            M::Ud0 | M::Ud1 | M::Ud2 => exc(vector::UD),
            _ => self.exec_system(i),
        }
    }

    pub(crate) fn unknown(&mut self, i: &Instruction) -> R<()> {
        self.unimpl(i)
    }

    fn alu2(&mut self, i: &Instruction, op: u8) -> R<()> {
        let sz = self.opsz(i, 0);
        let d = self.dst(i)?;
        // CMP (7) only reads.
        let a = if op == 7 {
            self.dst_read(d, sz)?
        } else {
            self.dst_read_rmw(d, sz)?
        };
        let b = self.read_op(i, 1, sz)?;
        let (r, f) = alu::binary(op, a, b, self.rflags & CF != 0, sz);
        if op != 7 {
            self.dst_write(d, sz, r)?;
        }
        self.set_arith(f);
        Ok(())
    }

    fn mov(&mut self, i: &Instruction) -> R<()> {
        let k0 = i.op0_kind();
        let k1 = i.op1_kind();
        if k0 == OpKind::Register {
            let r0 = i.op0_register();
            if r0.is_segment_register() {
                let sel = self.read_op(i, 1, 2)? as u16;
                let s = r0 as usize - 71;
                self.load_seg(s, sel)?;
                if s == sreg::SS {
                    self.inhibit = true;
                    self.ss_shadow = true;
                }
                return Ok(());
            }
            if r0.is_cr() {
                return self.write_cr(
                    r0 as usize - Register::CR0 as usize,
                    self.reg(i.op1_register()),
                );
            }
            if r0.is_dr() {
                let v = self.reg(i.op1_register());
                return self.write_dr(r0 as usize - Register::DR0 as usize, v);
            }
        }
        if k1 == OpKind::Register {
            let r1 = i.op1_register();
            if r1.is_cr() {
                let v = self.read_cr(r1 as usize - Register::CR0 as usize)?;
                self.set_reg(i.op0_register(), v);
                return Ok(());
            }
            if r1.is_dr() {
                let v = self.read_dr(r1 as usize - Register::DR0 as usize)?;
                self.set_reg(i.op0_register(), v);
                return Ok(());
            }
            if r1.is_segment_register() {
                let v = self.reg(r1);
                let sz = if k0 == OpKind::Register {
                    reg_size(i.op0_register())
                } else {
                    2
                };
                return self.write_op(i, 0, sz, v);
            }
        }
        let sz = self.opsz(i, 0);
        let v = self.read_op(i, 1, sz)?;
        self.write_op(i, 0, sz, v)
    }

    fn push_insn(&mut self, i: &Instruction) -> R<()> {
        let sz = Self::stack_sz(i);
        let v = match i.op0_kind() {
            OpKind::Register => self.reg(i.op0_register()),
            OpKind::Memory => {
                let l = self.mem_lin(i)?;
                self.rd(l, sz)?
            }
            _ => i.immediate(0) & mask(sz),
        };
        self.push(v, sz)
    }

    fn pop_insn(&mut self, i: &Instruction) -> R<()> {
        let sz = Self::stack_sz(i);
        if i.op0_kind() == OpKind::Register {
            let r = i.op0_register();
            if r.is_segment_register() {
                let v = self.peek(0, sz)?;
                let s = r as usize - 71;
                self.load_seg(s, v as u16)?;
                self.pop(sz)?;
                if s == sreg::SS {
                    self.inhibit = true;
                    self.ss_shadow = true;
                }
                return Ok(());
            }
            let v = self.pop(sz)?;
            self.set_reg(r, v);
            return Ok(());
        }
        // pop [mem]: the address is computed with the incremented RSP.
        let v = self.peek(0, sz)?;
        let old = self.gpr[4];
        self.set_sp(old.wrapping_add(sz as u64));
        let r = self.write_op(i, 0, sz, v);
        if r.is_err() {
            self.gpr[4] = old;
        }
        r
    }

    /// POPF/IRET flag loading with the privilege rules.
    pub(crate) fn write_flags(&mut self, v: u64, sz: usize) {
        let mut m = WRITABLE & !(IOPL | IF);
        if self.cpl == 0 || self.cr0 & cr0::PE == 0 {
            m |= IOPL | IF;
        } else if self.cpl <= self.iopl() {
            m |= IF;
        }
        m &= mask(sz);
        let old_if = self.rflags & IF;
        self.rflags = (self.rflags & !m) | (v & m) | FIXED;
        if old_if == 0 && self.rflags & IF != 0 {
            // Like STI, but the CPU recognizes interrupts right after POPF;
            // nothing to do.
        }
    }

    fn mul1(&mut self, i: &Instruction) -> R<()> {
        let sz = self.opsz(i, 0);
        let src = self.read_op(i, 0, sz)?;
        let a = self.gpr[0] & mask(sz);
        let signed = i.mnemonic() == M::Imul;
        let (lo, hi, over) = if signed {
            let p = (sext(a, sz) as i64 as i128) * (sext(src, sz) as i64 as i128);
            let lo = (p as u64) & mask(sz);
            let hi = ((p >> (sz * 8)) as u64) & mask(sz);
            (lo, hi, sext(lo, sz) as i64 as i128 != p)
        } else {
            let p = (a as u128) * (src as u128);
            let lo = (p as u64) & mask(sz);
            let hi = ((p >> (sz * 8)) as u64) & mask(sz);
            (lo, hi, hi != 0)
        };
        if sz == 1 {
            self.set_gpr_sz(0, 2, lo | (hi << 8));
        } else {
            self.set_gpr_sz(0, sz, lo);
            self.set_gpr_sz(2, sz, hi);
        }
        let mut f = alu::szp(lo, sz);
        if over {
            f |= CF | OF;
        }
        self.set_arith(f);
        Ok(())
    }

    fn div(&mut self, i: &Instruction) -> R<()> {
        let sz = self.opsz(i, 0);
        let d = self.read_op(i, 0, sz)?;
        self.divide(d, sz, i.mnemonic() == M::Idiv)
    }

    /// DIV (IDIV if `signed`) of rDX:rAX (AX for bytes) by `d`.
    #[inline]
    pub(crate) fn divide(&mut self, d: u64, sz: usize, signed: bool) -> R<()> {
        if d == 0 {
            return exc(vector::DE);
        }
        let bits = sz * 8;
        let (lo, hi) = if sz == 1 {
            (self.gpr[0] & 0xff, (self.gpr[0] >> 8) & 0xff)
        } else {
            (self.gpr[0] & mask(sz), self.gpr[2] & mask(sz))
        };
        let n = ((hi as u128) << bits) | lo as u128;
        let (q, r) = if !signed {
            let q = n / d as u128;
            if q > mask(sz) as u128 {
                return exc(vector::DE);
            }
            (q as u64, (n % d as u128) as u64)
        } else {
            // Sign-extend the 2*bits dividend.
            let sh = 128 - 2 * bits;
            let n = ((n << sh) as i128) >> sh;
            let dv = sext(d, sz) as i64 as i128;
            if dv == -1 && n == i128::MIN {
                return exc(vector::DE);
            }
            let q = n / dv;
            let r = n % dv;
            let min = -(1i128 << (bits - 1));
            let max = (1i128 << (bits - 1)) - 1;
            if q < min || q > max {
                return exc(vector::DE);
            }
            ((q as u64) & mask(sz), (r as u64) & mask(sz))
        };
        if sz == 1 {
            self.set_gpr_sz(0, 2, q | (r << 8));
        } else {
            self.set_gpr_sz(0, sz, q);
            self.set_gpr_sz(2, sz, r);
        }
        Ok(())
    }

    fn bt(&mut self, i: &Instruction) -> R<()> {
        let sz = self.opsz(i, 0);
        let bits = (sz * 8) as u64;
        let off = self.read_op(i, 1, sz)?;
        let m = i.mnemonic();
        let (d, bit, width) = if i.op0_kind() == OpKind::Memory && i.op1_kind() == OpKind::Register
        {
            // The bit offset is signed and may reach outside the operand.
            let s = sext(off, sz) as i64;
            // The CPU accesses the operand-sized unit holding the bit: its
            // alignment is what #AC checks.
            let unit = self
                .ea(i)
                .wrapping_add(((s >> (bits.trailing_zeros())) as u64).wrapping_mul(sz as u64));
            let unit = self.lin(Self::mem_seg(i), unit)?;
            if unit & (sz as u64 - 1) != 0 && self.alignment_checked(self.acc_r) {
                return crate::exc_code(arch::vector::AC, 0);
            }
            let ea = self.ea(i).wrapping_add((s >> 3) as u64);
            let l = self.lin(Self::mem_seg(i), ea)?;
            (Dst::Mem(l), (s & 7) as u64, 1)
        } else {
            (self.dst(i)?, off & (bits - 1), sz)
        };
        let v = if m == M::Bt {
            self.dst_read(d, width)?
        } else {
            self.dst_read_rmw(d, width)?
        };
        let cf = (v >> bit) & 1 != 0;
        let nv = match m {
            M::Bts => Some(v | (1 << bit)),
            M::Btr => Some(v & !(1 << bit)),
            M::Btc => Some(v ^ (1 << bit)),
            _ => None,
        };
        if let Some(nv) = nv {
            self.dst_write(d, width, nv)?;
        }
        if cf {
            self.rflags |= CF;
        } else {
            self.rflags &= !CF;
        }
        Ok(())
    }

    /// Selector and offset of a far JMP/CALL with an immediate pointer.
    fn far_immediate(i: &Instruction) -> (u16, u64) {
        let off = if i.op0_kind() == OpKind::FarBranch16 {
            i.far_branch16() as u64
        } else {
            i.far_branch32() as u64
        };
        (i.far_branch_selector(), off)
    }

    /// Selector and offset of a far JMP/CALL through a memory pointer
    /// (m16:16, m16:32 or m16:64: the offset, then the 2-byte selector).
    fn far_pointer(&mut self, i: &Instruction) -> R<(u16, u64)> {
        let osz = i.memory_size().size() - 2;
        let l = self.mem_lin(i)?;
        let off = self.rd(l, osz)?;
        let sel = self.rd(l.wrapping_add(osz as u64), 2)? as u16;
        Ok((sel, off))
    }

    /// A near JMP or CALL through a register or memory to a non-canonical
    /// target raises #GP(0) at the JMP or CALL itself, before CALL pushes
    /// (SDM vol. 2 JMP, CALL: 64-bit mode exceptions).
    fn near_target(&self, t: u64) -> R<()> {
        if self.long64 && !canonical(t) {
            return exc_code(vector::GP, 0);
        }
        Ok(())
    }

    fn jmp(&mut self, i: &Instruction) -> R<()> {
        match i.op0_kind() {
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                self.next_rip = i.near_branch_target();
                Ok(())
            }
            OpKind::FarBranch16 | OpKind::FarBranch32 => {
                let (sel, off) = Self::far_immediate(i);
                self.far_jump(sel, off, false)
            }
            _ => match i.code() {
                Code::Jmp_m1616 | Code::Jmp_m1632 | Code::Jmp_m1664 => {
                    let (sel, off) = self.far_pointer(i)?;
                    self.far_jump(sel, off, false)
                }
                _ => {
                    let sz = self.opsz(i, 0);
                    let t = self.read_op(i, 0, sz)?;
                    self.near_target(t)?;
                    self.next_rip = t;
                    Ok(())
                }
            },
        }
    }

    fn call(&mut self, i: &Instruction) -> R<()> {
        match i.op0_kind() {
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                let sz = Self::stack_sz(i);
                self.push(self.next_rip, sz)?;
                self.next_rip = i.near_branch_target();
                Ok(())
            }
            OpKind::FarBranch16 | OpKind::FarBranch32 => {
                let (sel, off) = Self::far_immediate(i);
                self.far_jump(sel, off, true)
            }
            _ => match i.code() {
                Code::Call_m1616 | Code::Call_m1632 | Code::Call_m1664 => {
                    let (sel, off) = self.far_pointer(i)?;
                    self.far_jump(sel, off, true)
                }
                _ => {
                    let sz = self.opsz(i, 0);
                    let t = self.read_op(i, 0, sz)?;
                    self.near_target(t)?;
                    self.push(self.next_rip, Self::stack_sz(i))?;
                    self.next_rip = t;
                    Ok(())
                }
            },
        }
    }

    fn enter(&mut self, i: &Instruction) -> R<()> {
        let sz = match i.code() {
            Code::Enterw_imm16_imm8 => 2,
            Code::Enterd_imm16_imm8 => 4,
            _ => 8,
        };
        let size = i.immediate(0) & 0xffff;
        let level = i.immediate(1) & 31;
        let m = self.sp_mask();
        let old_sp = self.gpr[4];
        let old_bp = self.gpr[5];
        let r = (|| {
            self.push(self.gpr[5] & mask(sz), sz)?;
            let frame = self.gpr[4] & m;
            if level > 0 {
                let mut bp = self.gpr[5];
                for _ in 1..level {
                    bp = bp.wrapping_sub(sz as u64);
                    let l = self.lin(sreg::SS, bp & m)?;
                    let v = self.rd(l, sz)?;
                    self.push(v, sz)?;
                }
                self.push(frame, sz)?;
            }
            let nsp = self.gpr[4].wrapping_sub(size);
            let l = self.lin(sreg::SS, nsp & m)?;
            // The new stack top must be writable.
            self.translate(l, Access::Write, self.acc_w)?;
            self.set_gpr_sz(5, sz, frame);
            self.set_sp(nsp);
            Ok(())
        })();
        if r.is_err() {
            self.gpr[4] = old_sp;
            self.gpr[5] = old_bp;
        }
        r
    }

    // ---- string instructions -------------------------------------------

    /// Address size of a string instruction.
    pub(crate) fn string_asz(i: &Instruction) -> usize {
        for n in 0..i.op_count() {
            match i.op_kind(n) {
                OpKind::MemorySegSI | OpKind::MemorySegDI | OpKind::MemoryESDI => return 2,
                OpKind::MemorySegESI | OpKind::MemorySegEDI | OpKind::MemoryESEDI => return 4,
                OpKind::MemorySegRSI | OpKind::MemorySegRDI | OpKind::MemoryESRDI => return 8,
                _ => {}
            }
        }
        8
    }

    /// Adds `delta` to register `idx` as an address register of `asz` bytes.
    #[inline]
    fn bump(&mut self, idx: usize, delta: u64, asz: usize) {
        let v = self.gpr[idx].wrapping_add(delta);
        self.set_gpr_sz(idx, asz, v);
    }

    fn string(&mut self, i: &Instruction) -> R<()> {
        let m = i.mnemonic();
        let sz = i.memory_size().size().clamp(1, 8);
        let asz = Self::string_asz(i);
        let am = mask(asz);
        let rep = i.has_rep_prefix() || i.has_repne_prefix();
        let delta = if self.rflags & DF != 0 {
            (sz as u64).wrapping_neg()
        } else {
            sz as u64
        };
        let src_seg = Self::mem_seg(i);
        // REP MOVS and STOS forward in 64-bit code, without data
        // breakpoints: a page's worth at once where the TLB maps RAM.
        let movs = matches!(m, M::Movsb | M::Movsw | M::Movsd | M::Movsq);
        let bulk = rep
            && (movs || matches!(m, M::Stosb | M::Stosw | M::Stosd | M::Stosq))
            && delta == sz as u64
            && self.long64
            && asz == 8
            && !self.watching
            && !self.watching();
        let mut n = 0u32;
        loop {
            if rep && self.gpr[1] & am == 0 {
                return Ok(());
            }
            if bulk {
                let dst = self.lin(sreg::ES, self.gpr[7])?;
                let src = if movs {
                    Some(self.lin(src_seg, self.gpr[6])?)
                } else {
                    None
                };
                let max = self.gpr[1].min(u64::from(REP_CHUNK - n));
                let done = self.rep_bulk(dst, src, sz, self.gpr[0], max);
                if done > 0 {
                    let bytes = done * sz as u64;
                    self.gpr[7] = self.gpr[7].wrapping_add(bytes);
                    if movs {
                        self.gpr[6] = self.gpr[6].wrapping_add(bytes);
                    }
                    self.gpr[1] -= done;
                    n += done as u32;
                    if self.gpr[1] == 0 {
                        return Ok(());
                    }
                    if n >= REP_CHUNK {
                        self.next_rip = self.rip;
                        return Ok(());
                    }
                    continue;
                }
            }
            let mut zf_stop = None;
            match m {
                M::Movsb | M::Movsw | M::Movsd | M::Movsq => {
                    let s = self.lin(src_seg, self.gpr[6] & am)?;
                    let v = self.rd(s, sz)?;
                    let d = self.lin(sreg::ES, self.gpr[7] & am)?;
                    self.wr(d, sz, v)?;
                    self.bump(6, delta, asz);
                    self.bump(7, delta, asz);
                }
                M::Stosb | M::Stosw | M::Stosd | M::Stosq => {
                    let d = self.lin(sreg::ES, self.gpr[7] & am)?;
                    self.wr(d, sz, self.gpr[0] & mask(sz))?;
                    self.bump(7, delta, asz);
                }
                M::Lodsb | M::Lodsw | M::Lodsd | M::Lodsq => {
                    let s = self.lin(src_seg, self.gpr[6] & am)?;
                    let v = self.rd(s, sz)?;
                    self.set_gpr_sz(0, sz, v);
                    self.bump(6, delta, asz);
                }
                M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq => {
                    let s = self.lin(src_seg, self.gpr[6] & am)?;
                    let a = self.rd(s, sz)?;
                    let d = self.lin(sreg::ES, self.gpr[7] & am)?;
                    let b = self.rd(d, sz)?;
                    let (_, f) = alu::sub(a, b, false, sz);
                    self.set_arith(f);
                    self.bump(6, delta, asz);
                    self.bump(7, delta, asz);
                    zf_stop = Some(f & ZF != 0);
                }
                _ => {
                    // SCAS
                    let d = self.lin(sreg::ES, self.gpr[7] & am)?;
                    let b = self.rd(d, sz)?;
                    let (_, f) = alu::sub(self.gpr[0] & mask(sz), b, false, sz);
                    self.set_arith(f);
                    self.bump(7, delta, asz);
                    zf_stop = Some(f & ZF != 0);
                }
            }
            if !rep {
                return Ok(());
            }
            self.bump(1, u64::MAX, asz);
            if let Some(zf) = zf_stop {
                // REPE stops on ZF=0, REPNE on ZF=1.
                if (i.has_repe_prefix() && !zf) || (i.has_repne_prefix() && zf) {
                    return Ok(());
                }
            }
            if self.gpr[1] & am == 0 {
                return Ok(());
            }
            n += 1;
            if n >= REP_CHUNK || self.io_touched {
                // Continue with the same instruction at the next step.
                self.next_rip = self.rip;
                return Ok(());
            }
        }
    }

    /// Checks port access rights: CPL <= IOPL, else the TSS I/O bitmap.
    pub(crate) fn io_check(&mut self, port: u16, sz: usize) -> R<()> {
        self.watch_io(port, sz);
        let pe = self.cr0 & cr0::PE != 0;
        if !pe || self.grant || (self.cpl <= self.iopl() && self.rflags & VM == 0) {
            return Ok(());
        }
        let tr = self.tr;
        if tr.limit < 0x67 {
            return exc_code(vector::GP, 0);
        }
        let base = self.rd_as(tr.base.wrapping_add(0x66), 2, crate::mmu::A_R_S)?;
        let at = base + (port as u64 >> 3);
        if at + 1 > tr.limit as u64 {
            return exc_code(vector::GP, 0);
        }
        let bits = self.rd_as(tr.base.wrapping_add(at), 2, crate::mmu::A_R_S)?;
        let want = ((1u64 << sz) - 1) << (port & 7);
        if bits & want != 0 {
            return exc_code(vector::GP, 0);
        }
        Ok(())
    }

    fn port_io(&mut self, i: &Instruction) -> R<()> {
        let (port_op, data_op) = if i.mnemonic() == M::In {
            (1, 0)
        } else {
            (0, 1)
        };
        let port = if i.op_kind(port_op) == OpKind::Register {
            self.gpr[2] as u16
        } else {
            i.immediate(port_op) as u16
        };
        let r = i.op_register(data_op);
        let sz = reg_size(r);
        self.io_check(port, sz)?;
        if i.mnemonic() == M::In {
            let mut b = [0u8; 4];
            self.input(
                CpuExit::IoIn {
                    port,
                    size: sz as u8,
                    count: 1,
                },
                &mut b[..sz],
            )?;
            self.set_reg(r, u32::from_le_bytes(b) as u64);
        } else {
            let v = self.reg(r).to_le_bytes();
            self.output(
                CpuExit::IoOut {
                    port,
                    size: sz as u8,
                    count: 1,
                },
                &v[..sz],
            );
        }
        Ok(())
    }

    /// Elements of `sz` bytes a string I/O batch may take: up to the count,
    /// within the page of `lin`, at most 4 KiB.
    fn batch(&self, lin: u64, sz: usize, count: u64) -> usize {
        let off = (lin & 0xfff) as usize;
        let room = if self.rflags & DF != 0 {
            off / sz + 1
        } else {
            (0x1000 - off) / sz
        };
        (count.min(room as u64).max(1) as usize).min(4096 / sz)
    }

    fn ins(&mut self, i: &Instruction) -> R<()> {
        let sz = i.memory_size().size().clamp(1, 4);
        let asz = Self::string_asz(i);
        let am = mask(asz);
        let rep = i.has_rep_prefix() || i.has_repne_prefix();
        let port = self.gpr[2] as u16;
        self.io_check(port, sz)?;
        let count = if rep { self.gpr[1] & am } else { 1 };
        if count == 0 {
            return Ok(());
        }
        let d = self.lin(sreg::ES, self.gpr[7] & am)?;
        let n = self.batch(d, sz, count);
        let down = self.rflags & DF != 0;
        // The destination must be writable before the port is read.
        let lo = if down {
            d.wrapping_sub(((n - 1) * sz) as u64)
        } else {
            d
        };
        self.translate(lo, Access::Write, self.acc_w)?;
        self.translate(
            lo.wrapping_add((n * sz) as u64 - 1),
            Access::Write,
            self.acc_w,
        )?;
        let mut buf = [0u8; 4096];
        self.input(
            CpuExit::IoIn {
                port,
                size: sz as u8,
                count: n as u32,
            },
            &mut buf[..n * sz],
        )?;
        let delta = if down {
            (sz as u64).wrapping_neg()
        } else {
            sz as u64
        };
        for k in 0..n {
            let mut e = [0u8; 8];
            e[..sz].copy_from_slice(&buf[k * sz..(k + 1) * sz]);
            let d = self.lin(sreg::ES, self.gpr[7] & am)?;
            self.wr(d, sz, u64::from_le_bytes(e))?;
            self.bump(7, delta, asz);
            if rep {
                self.bump(1, u64::MAX, asz);
            }
        }
        if rep && self.gpr[1] & am != 0 {
            self.next_rip = self.rip;
        }
        Ok(())
    }

    fn outs(&mut self, i: &Instruction) -> R<()> {
        let sz = i.memory_size().size().clamp(1, 4);
        let asz = Self::string_asz(i);
        let am = mask(asz);
        let rep = i.has_rep_prefix() || i.has_repne_prefix();
        let port = self.gpr[2] as u16;
        self.io_check(port, sz)?;
        let count = if rep { self.gpr[1] & am } else { 1 };
        if count == 0 {
            return Ok(());
        }
        let seg = Self::mem_seg(i);
        let s = self.lin(seg, self.gpr[6] & am)?;
        let n = self.batch(s, sz, count);
        let down = self.rflags & DF != 0;
        let delta = if down {
            (sz as u64).wrapping_neg()
        } else {
            sz as u64
        };
        let mut buf = [0u8; 4096];
        let mut addr = self.gpr[6];
        for k in 0..n {
            let l = self.lin(seg, addr & am)?;
            let v = self.rd(l, sz)?;
            buf[k * sz..(k + 1) * sz].copy_from_slice(&v.to_le_bytes()[..sz]);
            addr = addr.wrapping_add(delta);
        }
        for _ in 0..n {
            self.bump(6, delta, asz);
            if rep {
                self.bump(1, u64::MAX, asz);
            }
        }
        self.output(
            CpuExit::IoOut {
                port,
                size: sz as u8,
                count: n as u32,
            },
            &buf[..n * sz],
        );
        if rep && self.gpr[1] & am != 0 {
            self.next_rip = self.rip;
        }
        Ok(())
    }
}

#[allow(dead_code)]
fn _unused(_: Stop) {}
