//! System architecture: segments and descriptors, interrupt and exception
//! delivery (with the double-fault rules), IRET, far transfers, SYSCALL and
//! SYSRET, control registers, MSRs, CPUID and the descriptor-table
//! instructions.

use arch::rflags::*;
use arch::{canonical, cr0, cr4, desc, efer, msr, vector, Gate, Segment};
use iced_x86::{Code, Instruction, Mnemonic as M, OpKind};

use crate::alu::mask;
use crate::mmu::{A_R_S, A_W_S, A_W_U};
use crate::{exc, exc_code, sreg, Cpu, CpuExit, Pending, Stop, R};

/// The CR0 bits the architecture defines (PE MP EM TS ET NE WP AM NW CD PG).
const CR0_DEFINED: u64 = 0xe005_003f;

/// IA32_APIC_BASE: the global enable.
const APIC_ENABLE: u64 = 1 << 11;
/// IA32_APIC_BASE: this is the bootstrap processor.
const APIC_BSP: u64 = 1 << 8;

fn null_seg(selector: u16, dpl: u8) -> Segment {
    Segment {
        selector,
        dpl,
        unusable: true,
        ..Default::default()
    }
}

impl Cpu {
    fn protected(&self) -> bool {
        self.cr0 & cr0::PE != 0 && self.rflags & VM == 0
    }

    fn long_mode(&self) -> bool {
        self.efer & efer::LMA != 0
    }

    /// Reads the descriptor of `sel` (GDT or LDT): (its linear address, raw).
    pub(crate) fn read_descriptor(&mut self, sel: u16) -> R<(u64, u64)> {
        let (base, limit) = if sel & 4 != 0 {
            if self.ldtr.unusable {
                return exc_code(vector::GP, (sel & !3) as u32);
            }
            (self.ldtr.base, self.ldtr.limit as u64)
        } else {
            (self.gdtr.base, self.gdtr.limit as u64)
        };
        let idx = (sel & !7) as u64;
        if idx + 7 > limit {
            return exc_code(vector::GP, (sel & !3) as u32);
        }
        let a = base.wrapping_add(idx);
        let raw = self.rd_as(a, 8, A_R_S)?;
        Ok((a, raw))
    }

    fn set_accessed(&mut self, addr: u64, raw: u64) -> R<()> {
        if raw & desc::ACCESSED == 0 {
            let b = ((raw | desc::ACCESSED) >> 40) as u8;
            self.wr_as(addr.wrapping_add(5), 1, b as u64, A_W_S)?;
        }
        Ok(())
    }

    /// MOV/POP to a data or stack segment register.
    pub(crate) fn load_seg(&mut self, s: usize, sel: u16) -> R<()> {
        if !self.protected() {
            let seg = &mut self.seg[s];
            seg.selector = sel;
            seg.base = (sel as u64) << 4;
            if self.rflags & VM != 0 {
                seg.limit = 0xffff;
                seg.dpl = 3;
            }
            return Ok(());
        }
        if sel & !3 == 0 {
            if s == sreg::SS && !(self.long64 && self.cpl < 3 && (sel & 3) as u8 == self.cpl) {
                return exc_code(vector::GP, 0);
            }
            self.seg[s] = null_seg(sel, if s == sreg::SS { self.cpl } else { 0 });
            return Ok(());
        }
        let (addr, raw) = self.read_descriptor(sel)?;
        let d = match desc::data_segment_load(sel, raw, s == sreg::SS, self.cpl) {
            Ok(d) => d,
            Err((v, code)) => return exc_code(v, code),
        };
        self.set_accessed(addr, raw)?;
        self.seg[s] = d;
        Ok(())
    }

    /// The code segment for a far transfer to `sel`, checked for a jump or
    /// call at the current privilege (no gates).
    fn code_desc(&mut self, sel: u16) -> R<(u64, u64, Segment)> {
        if sel & !3 == 0 {
            return exc_code(vector::GP, 0);
        }
        let (addr, raw) = self.read_descriptor(sel)?;
        let d = Segment::from_descriptor(sel, raw);
        let err = (sel & !3) as u32;
        if !d.s || d.type_ & 8 == 0 {
            return exc_code(vector::GP, err);
        }
        if !d.present {
            return exc_code(vector::NP, err);
        }
        Ok((addr, raw, d))
    }

    /// Far JMP/CALL to `sel:off` (operand size `osz` for the pushes).
    pub(crate) fn far_jump(&mut self, sel: u16, off: u64, call: bool) -> R<()> {
        let osz = if self.bits == 64 {
            8
        } else {
            (self.bits / 8) as usize
        };
        self.far_transfer(sel, off, call, osz)
    }

    fn far_transfer(&mut self, sel: u16, off: u64, call: bool, osz: usize) -> R<()> {
        if !self.protected() {
            if call {
                self.push(self.seg[sreg::CS].selector as u64, osz)?;
                self.push(self.next_rip, osz)?;
            }
            let cs = &mut self.seg[sreg::CS];
            cs.selector = sel;
            cs.base = (sel as u64) << 4;
            self.next_rip = off & mask(osz);
            self.mode_changed();
            return Ok(());
        }
        if sel & !3 == 0 {
            return exc_code(vector::GP, 0);
        }
        let (addr, raw) = self.read_descriptor(sel)?;
        let cs = match desc::code_segment_jump(sel, raw, self.cpl, self.long_mode()) {
            Ok(cs) => cs,
            Err((v, code)) => return exc_code(v, code),
        };
        if call {
            let old_sp = self.gpr[4];
            let r = self
                .push(self.seg[sreg::CS].selector as u64, osz)
                .and_then(|_| self.push(self.next_rip, osz));
            if r.is_err() {
                self.gpr[4] = old_sp;
                return r;
            }
        }
        self.set_accessed(addr, raw)?;
        self.seg[sreg::CS] = cs;
        self.mode_changed();
        self.next_rip = if self.long64 { off } else { off & 0xffff_ffff };
        Ok(())
    }

    fn retf(&mut self, i: &Instruction) -> R<()> {
        let osz = match i.code() {
            Code::Retfw | Code::Retfw_imm16 => 2,
            Code::Retfd | Code::Retfd_imm16 => 4,
            _ => 8,
        };
        let imm = if i.op_count() == 1 { i.immediate(0) } else { 0 };
        let off = self.peek(0, osz)?;
        let sel = self.peek(osz as u64, osz)? as u16;
        if !self.protected() {
            let sp = self.gpr[4].wrapping_add(2 * osz as u64 + imm);
            self.set_sp(sp);
            let cs = &mut self.seg[sreg::CS];
            cs.selector = sel;
            cs.base = (sel as u64) << 4;
            self.next_rip = off & mask(osz);
            self.mode_changed();
            return Ok(());
        }
        let rpl = (sel & 3) as u8;
        if rpl < self.cpl {
            return exc_code(vector::GP, (sel & !3) as u32);
        }
        let (_, _, d) = self.code_desc(sel)?;
        if rpl == self.cpl {
            let sp = self.gpr[4].wrapping_add(2 * osz as u64 + imm);
            self.set_sp(sp);
            let mut cs = d;
            cs.type_ |= 1;
            self.seg[sreg::CS] = cs;
            self.mode_changed();
            self.next_rip = off;
            return Ok(());
        }
        // Return to an outer privilege level: SS:RSP follow.
        let base = 2 * osz as u64 + imm;
        let rsp = self.peek(base, osz)?;
        let ss = self.peek(base + osz as u64, osz)? as u16;
        let old_cpl = self.cpl;
        let old = (self.seg, self.gpr[4]);
        self.seg[sreg::CS] = d;
        self.mode_changed();
        if let Err(e) = self.load_seg(sreg::SS, ss) {
            self.seg = old.0;
            self.gpr[4] = old.1;
            self.mode_changed();
            return Err(e);
        }
        self.gpr[4] = rsp & mask(osz);
        let _ = old_cpl;
        self.null_data_segments();
        self.next_rip = off;
        Ok(())
    }

    /// After a return to an outer level: data segments the new CPL may not
    /// use are nulled.
    fn null_data_segments(&mut self) {
        for s in [sreg::ES, sreg::DS, sreg::FS, sreg::GS] {
            let d = self.seg[s];
            let conforming_code = d.type_ & 0xc == 0xc;
            if !d.unusable && d.s && !conforming_code && d.dpl < self.cpl {
                let base = d.base;
                self.seg[s] = null_seg(0, 0);
                if self.long64 && s >= sreg::FS {
                    self.seg[s].base = base;
                }
            }
        }
    }

    // ---- interrupts and exceptions -------------------------------------

    /// Delivers an exception, applying the double-fault rules; false if the
    /// CPU shut down (triple fault) or needs something unimplemented.
    pub(crate) fn exception(&mut self, v: u8, code: Option<u32>) -> bool {
        self.raise(v, code, true)
    }

    /// Delivers a trap-class #DB (single-step, data or I/O breakpoint)
    /// after the instruction; false as for [`Cpu::exception`].
    pub(crate) fn trap_exception(&mut self, v: u8) -> bool {
        self.raise(v, None, false)
    }

    /// Delivers exception `v`: a fault pushes RF set (but for an
    /// instruction breakpoint's #DB), a trap RF as it is (SDM vol. 3
    /// 18.3.1.1).
    fn raise(&mut self, v: u8, code: Option<u32>, fault: bool) -> bool {
        let (mut v, mut code) = (v, code);
        let ibp = std::mem::take(&mut self.ibp_fault);
        loop {
            if self.vmx.non_root && self.vmx_exception_exits(v, code) {
                return true;
            }
            if fault && !(ibp && v == vector::DB) {
                self.rflags |= RF;
            }
            if v == vector::DB {
                self.debug_delivered();
            }
            let ret = self.rip;
            self.vmx_delivering(v, 3, code);
            match self.deliver(v, code, false, ret, 1) {
                Ok(()) => {
                    self.halted = false;
                    self.vmx.vectoring = None;
                    return true;
                }
                Err(Stop::VmExit) => return true,
                Err(Stop::Exc(v2, c2)) => {
                    if v == vector::DF {
                        return self.vmx_triple_fault();
                    }
                    let class = |x: u8| match x {
                        0 | 10..=13 => 1,
                        14 => 2,
                        _ => 0,
                    };
                    let (a, b) = (class(v), class(v2));
                    if (a == 1 && b == 1) || (a == 2 && b != 0) {
                        v = vector::DF;
                        code = Some(0);
                    } else {
                        v = v2;
                        code = c2;
                    }
                }
                Err(Stop::Exit) => {
                    if !matches!(self.pending, Pending::Unimplemented(_)) {
                        self.pending = Pending::Unimplemented(format!(
                            "delivery of exception {v} touches MMIO (rip {:#x})",
                            self.rip
                        ));
                    }
                    return false;
                }
            }
        }
    }

    /// Takes a ready interrupt from the local device; an exit if delivery
    /// failed beyond recovery.
    pub(crate) fn take_interrupt(&mut self) -> Option<CpuExit> {
        let l = self.local.as_mut()?;
        let v = l.ack();
        self.irq_ready = l.pending();
        let v = v?;
        self.halted = false;
        self.vmx_delivering(v, 0, None);
        let r = self.deliver(v, None, false, self.rip, 1);
        if r.is_ok() {
            self.vmx.vectoring = None;
        }
        self.delivered(r, v)
    }

    /// The end of an interrupt's or NMI's delivery: nothing, or an exit if
    /// it failed beyond recovery.
    fn delivered(&mut self, r: R<()>, v: u8) -> Option<CpuExit> {
        match r {
            Ok(()) | Err(Stop::VmExit) => None,
            Err(Stop::Exc(v2, c2)) => {
                if self.exception(v2, c2) {
                    None
                } else {
                    Some(self.shutdown_or_unimplemented())
                }
            }
            Err(Stop::Exit) => Some(match std::mem::replace(&mut self.pending, Pending::None) {
                Pending::Unimplemented(s) => CpuExit::Unimplemented(s),
                _ => CpuExit::Unimplemented(format!("delivery of interrupt {v} touches MMIO")),
            }),
        }
    }

    /// Delivers a ready NMI of the local device (vector 2, SDM vol. 3
    /// 6.7.1): NMIs are blocked from now until the next IRET. An exit if
    /// delivery failed beyond recovery.
    pub(crate) fn take_nmi(&mut self) -> Option<CpuExit> {
        let l = self.local.as_mut()?;
        let taken = l.take_nmi();
        self.nmi_ready = l.nmi_pending();
        if !taken {
            return None;
        }
        self.halted = false;
        self.vmx.nmi_blocked = true;
        if self.intercepts.exceptions & (1 << vector::NMI) != 0 {
            return Some(CpuExit::Exception {
                vector: vector::NMI,
                code: None,
            });
        }
        self.vmx_delivering(vector::NMI, 2, None);
        let r = self.deliver(vector::NMI, None, false, self.rip, 1);
        if r.is_ok() {
            self.vmx.vectoring = None;
        }
        self.delivered(r, vector::NMI)
    }

    /// Delivers vector `v` through the IDT. `soft`: INT n (DPL check); `ret`:
    /// the RIP pushed; `ext`: the EXT bit for error codes of nested faults.
    pub(crate) fn deliver(
        &mut self,
        v: u8,
        code: Option<u32>,
        soft: bool,
        ret: u64,
        ext: u32,
    ) -> R<()> {
        if self.cr0 & cr0::PE == 0 {
            return self.deliver_real(v, ret);
        }
        let v86 = self.rflags & VM != 0;
        let long = self.long_mode();
        let esz: u64 = if long { 16 } else { 8 };
        let gate_err = (v as u32) * 8 + 2 + if soft { 0 } else { ext };
        if v as u64 * esz + esz - 1 > self.idtr.limit as u64 {
            return exc_code(vector::GP, gate_err);
        }
        let a = self.idtr.base.wrapping_add(v as u64 * esz);
        let lo = self.rd_as(a, 8, A_R_S)?;
        let hi = if long {
            self.rd_as(a.wrapping_add(8), 8, A_R_S)?
        } else {
            0
        };
        let gate = Gate::from_descriptor(lo, hi);
        let (typ, gdpl) = (gate.type_, gate.dpl);
        if !long && typ == 5 {
            return self.unimplemented(format!("task gate for vector {v}"));
        }
        let ok = if long {
            typ == 0xe || typ == 0xf
        } else {
            matches!(typ, 6 | 7 | 0xe | 0xf)
        };
        if !ok {
            return exc_code(vector::GP, gate_err);
        }
        if soft && gdpl < self.cpl {
            return exc_code(vector::GP, gate_err);
        }
        if !gate.present {
            return exc_code(vector::NP, gate_err);
        }
        let sel = gate.selector;
        let mut off = gate.offset;
        let ist = if long { gate.ist as u64 } else { 0 };
        if sel & !3 == 0 {
            return exc_code(vector::GP, ext);
        }
        let (_, raw) = self.read_descriptor(sel)?;
        let d = Segment::from_descriptor(sel, raw);
        let serr = (sel & !3) as u32 + ext;
        if !d.s || d.type_ & 8 == 0 || d.dpl > self.cpl {
            return exc_code(vector::GP, serr);
        }
        if long && (!d.l || d.db) {
            return exc_code(vector::GP, serr);
        }
        if !d.present {
            return exc_code(vector::NP, serr);
        }
        let conforming = d.type_ & 4 != 0;
        // From virtual-8086 mode only to a ring-0 non-conforming segment
        // (SDM vol. 3 20.3.1.1).
        if v86 && (conforming || d.dpl != 0) {
            return exc_code(vector::GP, serr);
        }
        let new_cpl = if conforming { self.cpl } else { d.dpl };
        let old_cs = self.seg[sreg::CS].selector as u64;
        let old_ss = self.seg[sreg::SS].selector as u64;
        let old_sp = self.gpr[4];
        let old_flags = self.rflags;
        let need = if new_cpl == 3 { A_W_U } else { A_W_S };
        let tss = self.tr.base;
        if long {
            let mut sp = if ist != 0 {
                self.rd_as(tss.wrapping_add(0x24 + 8 * (ist - 1)), 8, A_R_S)?
            } else if new_cpl < self.cpl {
                self.rd_as(tss.wrapping_add(4 + 8 * new_cpl as u64), 8, A_R_S)?
            } else {
                old_sp
            };
            sp &= !0xf;
            let mut frame = [0u64; 6];
            let mut n = 0;
            for x in [old_ss, old_sp, old_flags, old_cs, ret] {
                frame[n] = x;
                n += 1;
            }
            if let Some(c) = code {
                frame[n] = c as u64;
                n += 1;
            }
            for &x in &frame[..n] {
                sp = sp.wrapping_sub(8);
                if !canonical(sp) {
                    return exc_code(vector::SS, 0);
                }
                self.wr_as(sp, 8, x, need)?;
            }
            if new_cpl < self.cpl {
                let mut ss = null_seg(new_cpl as u16, new_cpl);
                ss.db = false;
                self.seg[sreg::SS] = ss;
            }
            self.gpr[4] = sp;
        } else {
            let gsz: usize = if typ & 8 != 0 { 4 } else { 2 };
            let (ss_seg, mut sp, switched) = if new_cpl < self.cpl {
                let esp = self.rd_as(tss.wrapping_add(4 + 8 * new_cpl as u64), 4, A_R_S)?;
                let ss = self.rd_as(tss.wrapping_add(8 + 8 * new_cpl as u64), 2, A_R_S)? as u16;
                if ss & !3 == 0 {
                    return exc_code(vector::TS, ext);
                }
                let (_, sraw) = self.read_descriptor(ss)?;
                let sd = Segment::from_descriptor(ss, sraw);
                if !sd.s || sd.type_ & 0xa != 2 || sd.dpl != new_cpl || (ss & 3) as u8 != new_cpl {
                    return exc_code(vector::TS, (ss & !3) as u32 + ext);
                }
                if !sd.present {
                    return exc_code(vector::SS, (ss & !3) as u32 + ext);
                }
                (sd, esp, true)
            } else {
                (self.seg[sreg::SS], old_sp, false)
            };
            let spm = if ss_seg.db { 0xffff_ffffu64 } else { 0xffff };
            let mut frame = [0u64; 10];
            let mut n = 0;
            if v86 {
                // GS, FS, DS and ES above the usual frame.
                for s in [sreg::GS, sreg::FS, sreg::DS, sreg::ES] {
                    frame[n] = self.seg[s].selector as u64;
                    n += 1;
                }
            }
            if switched {
                frame[n] = old_ss;
                frame[n + 1] = old_sp;
                n += 2;
            }
            for x in [old_flags, old_cs, ret] {
                frame[n] = x;
                n += 1;
            }
            if let Some(c) = code {
                frame[n] = c as u64;
                n += 1;
            }
            for &x in &frame[..n] {
                sp = sp.wrapping_sub(gsz as u64) & spm;
                let l = ss_seg.base.wrapping_add(sp) & 0xffff_ffff;
                self.wr_as(l, gsz, x & mask(gsz), need)?;
            }
            if switched {
                self.seg[sreg::SS] = ss_seg;
            }
            if v86 {
                for s in [sreg::GS, sreg::FS, sreg::DS, sreg::ES] {
                    self.seg[s] = null_seg(0, 0);
                }
            }
            self.gpr[4] = (self.gpr[4] & !spm) | (sp & spm);
            off &= if gsz == 2 { 0xffff } else { 0xffff_ffff };
        }
        let mut cs = d;
        cs.selector = (sel & !3) | new_cpl as u16;
        cs.type_ |= 1; // accessed, as the descriptor now is
        self.seg[sreg::CS] = cs;
        self.rip = off;
        self.next_rip = off;
        self.rflags &= !(TF | NT | RF | VM);
        if typ & 1 == 0 {
            self.rflags &= !IF;
        }
        self.mode_changed();
        Ok(())
    }

    fn deliver_real(&mut self, v: u8, ret: u64) -> R<()> {
        let a = v as u64 * 4;
        if a + 3 > self.idtr.limit as u64 {
            return exc_code(vector::GP, 0);
        }
        let ent = self.rd_as(self.idtr.base.wrapping_add(a), 4, A_R_S)?;
        self.push(self.rflags & 0xffff, 2)?;
        self.push(self.seg[sreg::CS].selector as u64, 2)?;
        self.push(ret & 0xffff, 2)?;
        let sel = (ent >> 16) as u16;
        let cs = &mut self.seg[sreg::CS];
        cs.selector = sel;
        cs.base = (sel as u64) << 4;
        self.rip = ent & 0xffff;
        self.next_rip = self.rip;
        self.rflags &= !(IF | TF | AC);
        self.mode_changed();
        Ok(())
    }

    /// INT n / INT3 / INTO / INT1: delivered as software interrupts with the
    /// return address after the instruction.
    fn soft_int(&mut self, v: u8, soft: bool) -> R<()> {
        if soft && v != vector::BP && v != vector::OF {
            // INT n (not INT3 or INTO).
            self.v86_iopl()?;
        }
        let ret = self.next_rip;
        self.soft_int_done = true;
        if self.intercepts.soft_int {
            return self.event_exit(CpuExit::SoftInt {
                vector: v,
                next_rip: ret,
                soft,
            });
        }
        let old_rip = self.rip;
        self.deliver(v, None, soft, ret, 0)?;
        // deliver() set rip/next_rip to the handler.
        let _ = old_rip;
        Ok(())
    }

    fn iret(&mut self, i: &Instruction) -> R<()> {
        let sz = match i.code() {
            Code::Iretw => 2,
            Code::Iretd => 4,
            _ => 8,
        };
        if !self.protected() {
            // Virtual-8086 mode: as in real mode with IOPL 3 (IOPL and VM
            // stay), else #GP(0).
            self.v86_iopl()?;
            let ip = self.peek(0, sz)?;
            let cs = self.peek(sz as u64, sz)? as u16;
            let fl = self.peek(2 * sz as u64, sz)?;
            let sp = self.gpr[4].wrapping_add(3 * sz as u64);
            self.set_sp(sp);
            self.write_flags(fl, sz);
            let c = &mut self.seg[sreg::CS];
            c.selector = cs;
            c.base = (cs as u64) << 4;
            self.next_rip = ip & mask(sz);
            self.mode_changed();
            self.vmx.nmi_blocked = false;
            return Ok(());
        }
        if self.rflags & NT != 0 && !self.long_mode() {
            return self.unimplemented(format!("iret task return at {:#x}", self.rip));
        }
        let ip = self.peek(0, sz)?;
        let cs = self.peek(sz as u64, sz)? as u16;
        let fl = self.peek(2 * sz as u64, sz)?;
        if fl & VM != 0 && self.cpl == 0 && sz == 4 && !self.long_mode() {
            return self.iret_to_v86(ip, cs, fl);
        }
        let new_cpl = (cs & 3) as u8;
        let err = (cs & !3) as u32;
        if new_cpl < self.cpl {
            return exc_code(vector::GP, err);
        }
        let (_, _, d) = self.code_desc(cs)?;
        let conforming = d.type_ & 4 != 0;
        if (conforming && d.dpl > new_cpl) || (!conforming && d.dpl != new_cpl) {
            return exc_code(vector::GP, err);
        }
        if self.long_mode() && d.l && d.db {
            return exc_code(vector::GP, err);
        }
        let pop_ss = self.long64 || new_cpl > self.cpl;
        let (new_sp, new_ss) = if pop_ss {
            let sp = self.peek(3 * sz as u64, sz)?;
            let ss = self.peek(4 * sz as u64, sz)? as u16;
            (sp, Some(ss))
        } else {
            (self.gpr[4].wrapping_add(3 * sz as u64), None)
        };
        let target64 = self.long_mode() && d.l;
        if target64 && !canonical(ip) {
            return exc_code(vector::GP, 0);
        }
        // Everything is read; check the new SS before changing state.
        let old = (self.seg, self.gpr[4], self.rflags);
        let old_cpl = self.cpl;
        self.write_flags(fl, sz);
        let mut c = d;
        c.type_ |= 1;
        self.seg[sreg::CS] = c;
        self.mode_changed();
        if let Some(ss) = new_ss {
            let r = if ss & !3 == 0 {
                if target64 && new_cpl < 3 {
                    self.seg[sreg::SS] = null_seg(ss, new_cpl);
                    Ok(())
                } else {
                    exc_code(vector::GP, 0)
                }
            } else {
                self.load_seg(sreg::SS, ss)
            };
            if let Err(e) = r {
                self.seg = old.0;
                self.gpr[4] = old.1;
                self.rflags = old.2;
                self.mode_changed();
                return Err(e);
            }
            self.gpr[4] = if target64 {
                new_sp
            } else {
                let m = if self.seg[sreg::SS].db {
                    0xffff_ffff
                } else {
                    0xffff
                };
                (self.gpr[4] & !m) | (new_sp & m)
            };
        } else {
            self.set_sp(new_sp);
        }
        if new_cpl > old_cpl {
            self.null_data_segments();
        }
        self.next_rip = if target64 { ip } else { ip & 0xffff_ffff };
        // IRET ends (virtual-)NMI blocking.
        self.vmx.nmi_blocked = false;
        Ok(())
    }

    /// IRET from ring 0 to virtual-8086 mode (SDM vol. 2 IRET,
    /// RETURN-TO-VIRTUAL-8086-MODE): EIP, CS, EFLAGS, then ESP, SS, ES, DS,
    /// FS and GS from the 32-bit stack; the segments loaded as in real mode
    /// as read/write data with DPL 3.
    fn iret_to_v86(&mut self, ip: u64, cs: u16, fl: u64) -> R<()> {
        let mut w = [0u64; 6];
        for (k, x) in w.iter_mut().enumerate() {
            *x = self.peek(4 * (3 + k as u64), 4)?;
        }
        let [esp, ss, es, ds, fs, gs] = w;
        self.rflags = (fl & (WRITABLE | VM | VIF | VIP) & 0xffff_ffff) | FIXED;
        for (s, sel) in [
            (sreg::CS, cs),
            (sreg::SS, ss as u16),
            (sreg::ES, es as u16),
            (sreg::DS, ds as u16),
            (sreg::FS, fs as u16),
            (sreg::GS, gs as u16),
        ] {
            self.seg[s] = Segment {
                selector: sel,
                base: (sel as u64) << 4,
                limit: 0xffff,
                // CS too: in virtual-8086 mode every segment has access
                // rights 0xf3 (as VM entry requires, SDM vol. 3 26.3.1.2).
                type_: 3,
                present: true,
                s: true,
                dpl: 3,
                ..Default::default()
            };
        }
        self.gpr[4] = esp & 0xffff_ffff;
        self.next_rip = ip & 0xffff;
        self.mode_changed();
        self.vmx.nmi_blocked = false;
        Ok(())
    }

    // ---- control registers and MSRs ------------------------------------

    pub(crate) fn read_cr(&mut self, n: usize) -> R<u64> {
        self.require_cpl0()?;
        Ok(match n {
            0 => self.cr0,
            2 => self.cr2,
            3 => self.cr3,
            4 => self.cr4,
            8 => self.cr8,
            _ => return exc(vector::UD),
        })
    }

    pub(crate) fn write_cr(&mut self, n: usize, v: u64) -> R<()> {
        self.require_cpl0()?;
        match n {
            0 => {
                // Bits 63:32 are reserved (#GP); the reserved bits below
                // them read as 0 whatever is written (SDM vol. 3 2.5).
                if v >> 32 != 0 {
                    return exc_code(vector::GP, 0);
                }
                let v = (v | cr0::ET) & CR0_DEFINED;
                let fixed0 = self.cr0_fixed0();
                if self.vmx.on && v & fixed0 != fixed0 {
                    return exc_code(vector::GP, 0);
                }
                if v & cr0::PG != 0 && v & cr0::PE == 0 {
                    return exc_code(vector::GP, 0);
                }
                if v & (1 << 29) != 0 && v & (1 << 30) == 0 {
                    return exc_code(vector::GP, 0); // NW without CD
                }
                let was_pg = self.cr0 & cr0::PG != 0;
                let pg = v & cr0::PG != 0;
                if pg && !was_pg && self.efer & efer::LME != 0 {
                    if self.cr4 & cr4::PAE == 0 {
                        return exc_code(vector::GP, 0);
                    }
                    self.efer |= efer::LMA;
                }
                if !pg && was_pg && self.long_mode() {
                    if self.long64 {
                        return exc_code(vector::GP, 0);
                    }
                    self.efer &= !efer::LMA;
                }
                if pg && !self.long_mode() && self.pae_legacy(v, self.cr4) {
                    let reload = (self.cr0 ^ v) & (cr0::PG | cr0::CD | cr0::NW) != 0;
                    if reload {
                        self.check_pdptes(self.cr3)?;
                    }
                }
                let changed = self.cr0 ^ v;
                self.cr0 = v;
                if changed & (cr0::PG | cr0::WP | cr0::PE) != 0 {
                    self.tlb_flush(true);
                }
                self.mode_changed();
            }
            2 => self.cr2 = v,
            3 => {
                // Bits from MAXPHYADDR up are reserved (no PCIDs: bit 63
                // too); outside long mode the operand has 32 bits.
                if v >> self.maxphyaddr != 0 {
                    return exc_code(vector::GP, 0);
                }
                if self.pae_legacy(self.cr0, self.cr4) {
                    self.check_pdptes(v)?;
                }
                self.cr3 = v;
                self.tlb_flush(false);
            }
            4 => {
                if v & !crate::model::cr4_allowed(&self.cpuid) != 0
                    || (self.vmx.on && v & cr4::VMXE == 0)
                {
                    return exc_code(vector::GP, 0);
                }
                if self.long_mode() && v & cr4::PAE == 0 {
                    return exc_code(vector::GP, 0);
                }
                if self.pae_legacy(self.cr0, v)
                    && (self.cr4 ^ v) & (cr4::PAE | cr4::PGE | cr4::PSE) != 0
                {
                    self.check_pdptes(self.cr3)?;
                }
                let changed = self.cr4 ^ v;
                self.cr4 = v;
                if changed & (cr4::PAE | cr4::PGE | cr4::PSE) != 0 {
                    self.tlb_flush(true);
                }
            }
            8 => {
                if v & !0xf != 0 {
                    return exc_code(vector::GP, 0);
                }
                self.cr8 = v;
                if let Some(l) = self.local.as_mut() {
                    l.set_tpr(v);
                    self.irq_ready = l.pending();
                }
            }
            _ => return exc(vector::UD),
        }
        Ok(())
    }

    /// PAE paging outside long mode with these CR0 and CR4: the PDPTEs
    /// are loaded from CR3 when CR3 is written and when paging or PAE is
    /// switched on.
    fn pae_legacy(&self, cr0v: u64, cr4v: u64) -> bool {
        cr0v & cr0::PG != 0 && cr4v & cr4::PAE != 0 && self.efer & efer::LMA == 0
    }

    /// Checks the four PDPTEs at `cr3` as their load does (SDM vol. 3
    /// 4.4.1): a present one with a reserved bit set (bits 2:1, 8:5, and
    /// those from MAXPHYADDR up) makes the instruction raise #GP(0).
    fn check_pdptes(&mut self, cr3: u64) -> R<()> {
        let reserved = 0x1e6 | !((1u64 << self.maxphyaddr) - 1);
        for k in 0..4 {
            let e = self.mem.read_u64((cr3 & 0xffff_ffe0) + 8 * k).unwrap_or(0);
            if e & 1 != 0 && e & reserved != 0 {
                return exc_code(vector::GP, 0);
            }
        }
        Ok(())
    }

    pub(crate) fn rdmsr(&mut self, index: u32) -> R<u64> {
        let m = &self.msr;
        Ok(match index {
            msr::EFER => self.efer,
            msr::STAR => m.star,
            msr::LSTAR => m.lstar,
            msr::CSTAR => m.cstar,
            msr::FMASK => m.fmask,
            msr::FS_BASE => self.seg[sreg::FS].base,
            msr::GS_BASE => self.seg[sreg::GS].base,
            msr::KERNEL_GS_BASE => m.kernel_gs_base,
            msr::TSC_AUX => m.tsc_aux,
            msr::TSC => self.tsc(),
            msr::APIC_BASE => m.apic_base,
            msr::PAT => m.pat,
            msr::SYSENTER_CS => m.sysenter_cs,
            msr::SYSENTER_ESP => m.sysenter_esp,
            msr::SYSENTER_EIP => m.sysenter_eip,
            msr::MISC_ENABLE => m.misc_enable,
            msr::MTRRCAP => 0x508,
            msr::MTRR_DEF_TYPE => m.mtrr_def_type,
            0x200..=0x20f | 0x250 | 0x258 | 0x259 | 0x268..=0x26f => {
                m.mtrr.get(&index).copied().unwrap_or(0)
            }
            msr::BIOS_SIGN_ID => crate::model::MICROCODE << 32,
            msr::ARCH_CAPABILITIES => crate::model::ARCH_CAPABILITIES,
            msr::DEBUGCTL => 0,
            msr::FEATURE_CONTROL | 0x480..=0x490 => match self.vmx_msr(index) {
                Some(v) => v,
                None => return exc_code(vector::GP, 0),
            },
            i if msr::HYPERVISOR_RANGE.contains(&i) => {
                return self.msr_exit(CpuExit::MsrRead { index })
            }
            // Not in the model (docs/cpu-model.md).
            _ => return exc_code(vector::GP, 0),
        })
    }

    pub(crate) fn wrmsr(&mut self, index: u32, v: u64) -> R<()> {
        match index {
            msr::FEATURE_CONTROL => {
                if !self.write_feature_control(v) {
                    return exc_code(vector::GP, 0);
                }
            }
            0x480..=0x490 => return exc_code(vector::GP, 0),
            msr::EFER => {
                let allowed = efer::SCE | efer::LME | efer::NXE;
                if v & !(allowed | efer::LMA) != 0 {
                    return exc_code(vector::GP, 0);
                }
                let new = (v & allowed) | (self.efer & efer::LMA);
                if self.cr0 & cr0::PG != 0 && (new ^ self.efer) & efer::LME != 0 {
                    return exc_code(vector::GP, 0);
                }
                let nx_changed = (new ^ self.efer) & efer::NXE != 0;
                self.efer = new;
                if nx_changed {
                    self.tlb_flush(true);
                }
                self.mode_changed();
            }
            msr::STAR => self.msr.star = v,
            msr::LSTAR
            | msr::CSTAR
            | msr::KERNEL_GS_BASE
            | msr::FS_BASE
            | msr::GS_BASE
            | msr::SYSENTER_ESP
            | msr::SYSENTER_EIP
                if !canonical(v) =>
            {
                return exc_code(vector::GP, 0)
            }
            msr::LSTAR => self.msr.lstar = v,
            msr::CSTAR => self.msr.cstar = v,
            msr::FMASK => self.msr.fmask = v & 0xffff_ffff,
            msr::FS_BASE => self.seg[sreg::FS].base = v,
            msr::GS_BASE => self.seg[sreg::GS].base = v,
            msr::KERNEL_GS_BASE => self.msr.kernel_gs_base = v,
            msr::TSC_AUX if v >> 32 != 0 => return exc_code(vector::GP, 0),
            msr::TSC_AUX => self.msr.tsc_aux = v,
            msr::TSC => {
                let now = self.tsc().wrapping_sub(self.tsc_offset);
                self.tsc_offset = v.wrapping_sub(now);
            }
            msr::APIC_BASE => self.write_apic_base(v)?,
            msr::PAT => {
                // Each entry a memory type: UC, WC, WT, WP, WB or UC-.
                if (0..8).any(|k| matches!((v >> (8 * k)) & 0xff, 2 | 3 | 8..)) {
                    return exc_code(vector::GP, 0);
                }
                self.msr.pat = v;
            }
            msr::SYSENTER_CS => self.msr.sysenter_cs = v,
            msr::SYSENTER_ESP => self.msr.sysenter_esp = v,
            msr::SYSENTER_EIP => self.msr.sysenter_eip = v,
            msr::MISC_ENABLE => self.msr.misc_enable = v,
            msr::MTRR_DEF_TYPE if v & !0xcff != 0 => return exc_code(vector::GP, 0),
            msr::MTRR_DEF_TYPE => self.msr.mtrr_def_type = v,
            0x200..=0x20f | 0x250 | 0x258 | 0x259 | 0x268..=0x26f => {
                self.msr.mtrr.insert(index, v);
            }
            // Writes start a microcode update on hardware: none here.
            msr::BIOS_SIGN_ID => {}
            // LBR and BTF (bits 0 and 1) and the rest are not modelled.
            msr::DEBUGCTL if v != 0 => return exc_code(vector::GP, 0),
            msr::DEBUGCTL => {}
            i if msr::HYPERVISOR_RANGE.contains(&i) => {
                self.msr_exit(CpuExit::MsrWrite { index, value: v })?;
            }
            // Read-only (IA32_ARCH_CAPABILITIES, IA32_MTRRCAP) or not in the
            // model (docs/cpu-model.md).
            _ => return exc_code(vector::GP, 0),
        }
        Ok(())
    }

    /// What CPUID `leaf`, `sub` returns on this CPU now: the table, with
    /// CPUID.1:EDX.APIC following IA32_APIC_BASE's global enable. (A VMM
    /// emulating CPUID for its guest asks this.)
    pub fn cpuid_of(&self, leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
        let (a, b, c, mut d) = self.cpuid.query(leaf, sub);
        if leaf == 1 && self.msr.apic_base & APIC_ENABLE == 0 {
            d &= !crate::model::leaf1_edx::APIC;
        }
        (a, b, c, d)
    }

    /// WRMSR to IA32_APIC_BASE (SDM vol. 3 10.4.4): bits 0-7, 9, 10 (no
    /// x2APIC) and those from MAXPHYADDR up are reserved; BSP (bit 8) is
    /// read-only. Clearing the global enable (bit 11) takes the local APIC
    /// off the bus and out of CPUID.1:EDX.
    fn write_apic_base(&mut self, v: u64) -> R<()> {
        let base_mask = ((1u64 << self.maxphyaddr) - 1) & !0xfff;
        if v & !(base_mask | APIC_ENABLE | APIC_BSP) != 0 {
            return exc_code(vector::GP, 0);
        }
        self.msr.apic_base = (v & !APIC_BSP) | (self.msr.apic_base & APIC_BSP);
        if let Some(l) = self.local.as_mut() {
            l.set_base(v & base_mask, v & APIC_ENABLE != 0);
            self.irq_ready = l.pending();
            self.nmi_ready = l.nmi_pending();
        }
        Ok(())
    }

    /// LGDT/LIDT operand: (limit, base).
    fn read_dtr(&mut self, i: &Instruction) -> R<(u16, u64)> {
        let l = self.mem_lin(i)?;
        let limit = self.rd(l, 2)? as u16;
        let base = if self.long64 {
            self.rd(l.wrapping_add(2), 8)?
        } else {
            let b = self.rd(l.wrapping_add(2), 4)?;
            if matches!(i.code(), Code::Lgdt_m1632_16 | Code::Lidt_m1632_16) {
                b & 0xff_ffff
            } else {
                b
            }
        };
        Ok((limit, base))
    }

    fn write_dtr(&mut self, i: &Instruction, limit: u16, base: u64) -> R<()> {
        let l = self.mem_lin(i)?;
        let bsz = if self.long64 { 8 } else { 4 };
        // One store of the whole pseudo-descriptor: both pages checked
        // before it is written; at CPL 3 with alignment checking it must be
        // word-aligned (SDM vol. 3 6.15, interrupt 17).
        let need = self.acc_w;
        if l & 1 != 0 && self.alignment_checked(need) {
            return exc_code(vector::AC, 0);
        }
        let mut b = [0u8; 10];
        b[..2].copy_from_slice(&limit.to_le_bytes());
        b[2..2 + bsz].copy_from_slice(&base.to_le_bytes()[..bsz]);
        self.write_bytes(l, &b[..2 + bsz], need)
    }

    /// A system descriptor (LDT, TSS) from the GDT: (address, segment).
    fn system_desc(&mut self, sel: u16) -> R<(u64, u64, Segment)> {
        if sel & 4 != 0 {
            return exc_code(vector::GP, (sel & !3) as u32);
        }
        let (addr, raw) = self.read_descriptor(sel)?;
        let mut d = Segment::from_descriptor(sel, raw);
        if self.long_mode() {
            if (sel & !7) as u64 + 15 > self.gdtr.limit as u64 {
                return exc_code(vector::GP, (sel & !3) as u32);
            }
            let hi = self.rd_as(addr.wrapping_add(8), 8, A_R_S)?;
            d.base |= (hi & 0xffff_ffff) << 32;
            // The upper half's type field must be 0, and the base canonical
            // (SDM vol. 2 LLDT, LTR: #GP(selector)).
            if (hi >> 40) & 0x1f != 0 || !canonical(d.base) {
                return exc_code(vector::GP, (sel & !3) as u32);
            }
        }
        Ok((addr, raw, d))
    }

    fn exec_ltr_lldt(&mut self, i: &Instruction) -> R<()> {
        self.require_cpl0()?;
        let sel = self.read_op(i, 0, 2)? as u16;
        if i.mnemonic() == M::Lldt {
            if sel & !3 == 0 {
                self.ldtr = null_seg(sel, 0);
                return Ok(());
            }
            let (_, _, d) = self.system_desc(sel)?;
            if d.s || d.type_ != 2 {
                return exc_code(vector::GP, (sel & !3) as u32);
            }
            if !d.present {
                return exc_code(vector::NP, (sel & !3) as u32);
            }
            self.ldtr = d;
            return Ok(());
        }
        if sel & !3 == 0 {
            return exc_code(vector::GP, 0);
        }
        let (addr, raw, mut d) = self.system_desc(sel)?;
        let avail = if self.long_mode() {
            d.type_ == 9
        } else {
            d.type_ == 9 || d.type_ == 1
        };
        if d.s || !avail {
            return exc_code(vector::GP, (sel & !3) as u32);
        }
        if !d.present {
            return exc_code(vector::NP, (sel & !3) as u32);
        }
        // Mark it busy.
        let b = ((raw | desc::TSS_BUSY) >> 40) as u8;
        self.wr_as(addr.wrapping_add(5), 1, b as u64, A_W_S)?;
        d.type_ |= 2;
        self.tr = d;
        Ok(())
    }

    pub(crate) fn exec_system(&mut self, i: &Instruction) -> R<()> {
        match i.mnemonic() {
            M::Int => self.soft_int(i.immediate(0) as u8, true),
            M::Int3 => self.soft_int(vector::BP, true),
            M::Into => {
                if self.long64 {
                    return exc(vector::UD);
                }
                if self.rflags & OF != 0 {
                    return self.soft_int(vector::OF, true);
                }
                Ok(())
            }
            M::Int1 => self.soft_int(vector::DB, false),
            M::Iret | M::Iretd | M::Iretq => self.iret(i),
            M::Retf => self.retf(i),
            M::Syscall => {
                if self.intercepts.syscall {
                    let next_rip = self.next_rip;
                    return self.event_exit(CpuExit::Syscall { next_rip });
                }
                // Intel: SYSCALL only in 64-bit mode.
                if self.efer & efer::SCE == 0 || !self.long64 {
                    return exc(vector::UD);
                }
                self.gpr[1] = self.next_rip;
                self.gpr[11] = self.rflags & !RF;
                self.rflags &= !(self.msr.fmask | RF);
                self.rflags |= FIXED;
                let sel = ((self.msr.star >> 32) & 0xfffc) as u16;
                self.seg[sreg::CS] = Segment::flat(sel, true, true, false);
                self.seg[sreg::SS] = Segment::flat(sel.wrapping_add(8), false, false, true);
                self.next_rip = if self.long64 {
                    self.msr.lstar
                } else {
                    self.msr.cstar & 0xffff_ffff
                };
                self.mode_changed();
                Ok(())
            }
            M::Sysret | M::Sysretq => {
                if self.efer & efer::SCE == 0 || !self.long64 {
                    return exc(vector::UD);
                }
                self.require_cpl0()?;
                let base = ((self.msr.star >> 48) & 0xfffc) as u16;
                if i.code() == Code::Sysretq {
                    if !canonical(self.gpr[1]) {
                        return exc_code(vector::GP, 0);
                    }
                    self.seg[sreg::CS] =
                        Segment::flat(base.wrapping_add(16) | 3, true, true, false);
                    self.next_rip = self.gpr[1];
                } else {
                    self.seg[sreg::CS] = Segment::flat(base | 3, true, false, true);
                    self.next_rip = self.gpr[1] & 0xffff_ffff;
                }
                self.seg[sreg::SS] = Segment::flat(base.wrapping_add(8) | 3, false, false, true);
                self.rflags = (self.gpr[11] & SYSRET_LOADED) | FIXED;
                self.mode_changed();
                Ok(())
            }
            M::Swapgs => {
                if !self.long64 {
                    return exc(vector::UD);
                }
                self.require_cpl0()?;
                std::mem::swap(&mut self.seg[sreg::GS].base, &mut self.msr.kernel_gs_base);
                Ok(())
            }
            M::Cpuid => {
                if self.intercepts.cpuid_faulting && self.cpl > 0 && !self.grant {
                    return exc_code(vector::GP, 0);
                }
                let (a, b, c, d) = self.cpuid_of(self.gpr[0] as u32, self.gpr[1] as u32);
                self.gpr[0] = a as u64;
                self.gpr[3] = b as u64;
                self.gpr[1] = c as u64;
                self.gpr[2] = d as u64;
                Ok(())
            }
            M::Rdtsc | M::Rdtscp => {
                // (A privilege grant reads it as at CPL 0.)
                if self.cr4 & cr4::TSD != 0 && self.cpl != 0 && !self.grant {
                    return exc_code(vector::GP, 0);
                }
                let t = self.tsc();
                self.gpr[0] = t & 0xffff_ffff;
                self.gpr[2] = t >> 32;
                if i.mnemonic() == M::Rdtscp {
                    self.gpr[1] = self.msr.tsc_aux;
                }
                Ok(())
            }
            M::Rdmsr => {
                self.require_cpl0()?;
                let v = self.rdmsr(self.gpr[1] as u32)?;
                self.gpr[0] = v & 0xffff_ffff;
                self.gpr[2] = v >> 32;
                Ok(())
            }
            M::Wrmsr => {
                self.require_cpl0()?;
                let v = (self.gpr[2] << 32) | (self.gpr[0] & 0xffff_ffff);
                self.wrmsr(self.gpr[1] as u32, v)
            }
            M::Rdpmc => exc_code(vector::GP, 0),
            M::Lgdt | M::Lidt => {
                self.require_cpl0()?;
                let (limit, base) = self.read_dtr(i)?;
                if self.long64 && !canonical(base) {
                    return exc_code(vector::GP, 0);
                }
                let t = vcpu::DescriptorTable { base, limit };
                if i.mnemonic() == M::Lgdt {
                    self.gdtr = t;
                } else {
                    self.idtr = t;
                }
                Ok(())
            }
            M::Sgdt => {
                let t = self.gdtr;
                self.write_dtr(i, t.limit, t.base)
            }
            M::Sidt => {
                let t = self.idtr;
                self.write_dtr(i, t.limit, t.base)
            }
            M::Lldt | M::Ltr => self.exec_ltr_lldt(i),
            M::Sldt | M::Str => {
                let v = if i.mnemonic() == M::Sldt {
                    self.ldtr.selector
                } else {
                    self.tr.selector
                } as u64;
                let sz = if i.op0_kind() == OpKind::Register {
                    crate::exec::reg_size(i.op0_register())
                } else {
                    2
                };
                self.write_op(i, 0, sz, v)
            }
            M::Smsw => {
                let sz = if i.op0_kind() == OpKind::Register {
                    crate::exec::reg_size(i.op0_register())
                } else {
                    2
                };
                self.write_op(i, 0, sz, self.cr0 & mask(sz))
            }
            M::Lmsw => {
                self.require_cpl0()?;
                let v = self.read_op(i, 0, 2)?;
                // PE can be set but not cleared.
                let new = (self.cr0 & !0xe) | (v & 0xf) | (self.cr0 & 1);
                self.write_cr(0, new)
            }
            M::Clts => {
                self.require_cpl0()?;
                self.cr0 &= !cr0::TS;
                Ok(())
            }
            M::Invlpg => {
                self.require_cpl0()?;
                // A non-canonical address is a no-op (SDM vol. 2 INVLPG).
                let seg = Self::mem_seg(i);
                let mut l = self.ea(i);
                if self.long64 {
                    if seg >= sreg::FS {
                        l = l.wrapping_add(self.seg[seg].base);
                    }
                    if !canonical(l) {
                        return Ok(());
                    }
                } else {
                    l = self.lin(seg, l)?;
                }
                self.tlb_flush_page(l);
                Ok(())
            }
            M::Wbinvd | M::Invd => self.require_cpl0(),
            M::Lss | M::Lfs | M::Lgs | M::Lds | M::Les => {
                let osz = crate::exec::reg_size(i.op0_register());
                let l = self.mem_lin(i)?;
                let off = self.rd(l, osz)?;
                let sel = self.rd(l.wrapping_add(osz as u64), 2)? as u16;
                let s = match i.mnemonic() {
                    M::Lss => sreg::SS,
                    M::Lfs => sreg::FS,
                    M::Lgs => sreg::GS,
                    M::Lds => sreg::DS,
                    _ => sreg::ES,
                };
                self.load_seg(s, sel)?;
                self.set_reg(i.op0_register(), off);
                Ok(())
            }
            M::Verr | M::Verw | M::Lar | M::Lsl => self.verify(i),
            m if crate::vmx::is_vmx(m) => self.exec_vmx(i),
            _ => self.exec_fpu(i),
        }
    }

    /// VERR/VERW/LAR/LSL: ZF tells whether the selector passes.
    fn verify(&mut self, i: &Instruction) -> R<()> {
        if !self.protected() {
            return exc(vector::UD);
        }
        let src = if i.mnemonic() == M::Verr || i.mnemonic() == M::Verw {
            0
        } else {
            1
        };
        let sel = self.read_op(i, src, 2)? as u16;
        let desc = if sel & !3 == 0 {
            None
        } else {
            // A selector beyond the table limit fails the check (ZF=0); a
            // fault reading the table (#PF) is raised.
            match self.read_descriptor(sel) {
                Ok(d) => Some(d),
                Err(Stop::Exc(vector::GP, _)) => None,
                Err(e) => return Err(e),
            }
        };
        let Some((_, raw)) = desc else {
            self.rflags &= !ZF;
            return Ok(());
        };
        let d = Segment::from_descriptor(sel, raw);
        let rpl = (sel & 3) as u8;
        let conforming_code = d.s && d.type_ & 0xc == 0xc;
        // A privilege grant (`grant_privilege_once`) checks as CPL 0.
        let cpl = if self.grant { 0 } else { self.cpl };
        let visible = conforming_code || (d.dpl >= cpl && d.dpl >= rpl);
        let ok = visible
            && match i.mnemonic() {
                M::Verr => d.s && (d.type_ & 8 == 0 || d.type_ & 2 != 0),
                M::Verw => d.s && d.type_ & 0xa == 2,
                _ => d.s || matches!(d.type_, 1 | 2 | 3 | 9 | 0xb),
            };
        if !ok {
            self.rflags &= !ZF;
            return Ok(());
        }
        self.rflags |= ZF;
        match i.mnemonic() {
            M::Lar => {
                let v = raw >> 32 & 0x00f0_ff00;
                self.set_reg(i.op0_register(), v);
            }
            M::Lsl => {
                self.set_reg(i.op0_register(), d.limit as u64);
            }
            _ => {}
        }
        Ok(())
    }
}
