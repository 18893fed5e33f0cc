//! The guest's virtual CPU as a deprivileging VMM keeps it, and what such a
//! VMM does on the guest's behalf: reading its descriptor tables, and
//! reflecting exceptions, interrupts and system calls into the guest kernel
//! through the guest's own IDT and TSS.
//!
//! Ring compression: the guest kernel (virtual CPL 0) really runs at CPL 1.
//! Its code and stack segments are loaded with DPL 1 and RPL 1; what the VMM
//! shows the guest (interrupt frames, `sregs`) has the RPL the guest expects.
//! RFLAGS.IF and IOPL of the guest kernel are virtual: the real IF stays 1 so
//! the VMM sees every interrupt, the real IOPL stays 0 so port I/O traps.

use arch::paging::Paging;
use arch::{cr0, efer, rflags, vector, Gate};
use vcpu::{DescriptorTable, Regs, SRegs, Segment, VcpuExit};
use x86::{sreg, Cpu};

use crate::walk::{self, Fault};

/// The guest's view of the privileged CPU state.
#[derive(Clone, Debug, Default)]
pub struct Virt {
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    pub tr: Segment,
    pub ldtr: Segment,
    /// RFLAGS.IF of the guest kernel.
    pub vif: bool,
    /// RFLAGS.IOPL of the guest kernel.
    pub iopl: u8,
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub fmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter: [u64; 3],
}

impl Virt {
    /// Takes the guest's view of the system registers (what the VMM sets).
    pub fn load(&mut self, s: &SRegs) {
        self.cr0 = s.cr0 | cr0::ET;
        self.cr2 = s.cr2;
        self.cr3 = s.cr3;
        self.cr4 = s.cr4;
        self.efer = s.efer;
        self.gdtr = s.gdt;
        self.idtr = s.idt;
        self.tr = s.tr;
        self.ldtr = s.ldt;
    }

    /// The guest's paging: `None` with paging off.
    pub fn paging(&self) -> Option<Paging> {
        walk::guest_paging(self.cr0, self.cr3, self.cr4, self.efer)
    }

    /// Whether the guest is in long mode (EFER.LMA): else in legacy
    /// protected mode, with 8-byte gates and system descriptors and 32-bit
    /// interrupt frames.
    pub fn long_mode(&self) -> bool {
        self.efer & efer::LMA != 0
    }

    /// Whether the guest is in real mode (CR0.PE clear): the real CPU then
    /// runs it in virtual-8086 mode (see [`real_mode_segment`]).
    pub fn real_mode(&self) -> bool {
        self.cr0 & cr0::PE == 0
    }
}

/// A segment of a real-mode guest as the real CPU runs it in virtual-8086
/// mode: the guest's hidden base, limit and size kept (a far jump right
/// after clearing CR0.PE still runs from the protected-mode base; a limit
/// above 64 KiB, "unreal mode", stays), readable and writable (code: also
/// executable), present, DPL 3.
pub fn real_mode_segment(mut s: Segment, code: bool) -> Segment {
    s = decompress(s);
    s.unusable = false;
    s.present = true;
    s.s = true;
    s.type_ = if code { 0xb } else { 0x3 };
    s.dpl = 3;
    s.l = false;
    s.g = s.limit > 0xfffff;
    s
}

/// The guest's view of a segment of the real CPU in virtual-8086 mode: its
/// DPL is 0, as the hidden part of every segment in real mode.
pub fn real_mode_view(mut s: Segment) -> Segment {
    s.dpl = 0;
    s
}

/// A segment as the deprivileged guest kernel really runs with it: DPL 0
/// becomes DPL 1; code and stack selectors get RPL 1.
pub fn compress(mut s: Segment, rpl: bool) -> Segment {
    if !s.unusable && s.dpl == 0 {
        s.dpl = 1;
        if rpl {
            s.selector |= 1;
        }
    }
    s
}

/// The guest's view of a compressed segment.
pub fn decompress(mut s: Segment) -> Segment {
    if s.dpl == 1 {
        s.dpl = 0;
        s.selector &= !3;
    }
    s
}

/// The system registers the real CPU runs a deprivileged guest with, for the
/// guest's `s`: its segments compressed to ring 1, the VMM's empty IDT, a task
/// register without an I/O bitmap (port I/O at CPL 1 faults), CR0.WP set.
pub fn real_sregs(s: &SRegs) -> SRegs {
    let mut real = *s;
    real.cs = compress(s.cs, true);
    real.ss = if s.ss.unusable || s.ss.selector & !3 == 0 {
        if s.cs.dpl == 0 {
            null_stack()
        } else {
            s.ss
        }
    } else {
        compress(s.ss, true)
    };
    for (dst, src) in [
        (&mut real.ds, s.ds),
        (&mut real.es, s.es),
        (&mut real.fs, s.fs),
        (&mut real.gs, s.gs),
    ] {
        *dst = compress(src, false);
    }
    real.idt = DescriptorTable { base: 0, limit: 0 };
    real.tr = Segment {
        type_: 0xb,
        present: true,
        ..Default::default()
    };
    real.cr0 = s.cr0 | cr0::WP | cr0::ET;
    real
}

/// The NULL stack segment of a kernel entered from user mode (RPL = CPL 1).
pub fn null_stack() -> Segment {
    Segment {
        selector: 1,
        dpl: 1,
        unusable: true,
        ..Default::default()
    }
}

/// A flat 64-bit code or data segment of DPL = the selector's RPL (what
/// SYSCALL and SYSRET load).
pub fn flat(selector: u16, code: bool) -> Segment {
    Segment::flat(selector, code, code, !code)
}

/// The guest kernel's vCPU: the real CPU plus the virtual state.
pub struct Guest {
    pub cpu: Cpu,
    pub v: Virt,
}

impl Guest {
    /// The guest's CPL: its kernel runs at real CPL 1.
    pub fn vcpl(&self) -> u8 {
        // In real mode the real CPU is in virtual-8086 mode at CPL 3, on the
        // guest's behalf at its CPL 0.
        if self.cpu.cpl() == 3 && !self.v.real_mode() {
            3
        } else {
            0
        }
    }

    /// The virtual CPU beside the real one, for a debugger (`monitor
    /// virt`).
    pub fn describe(&self) -> String {
        let v = &self.v;
        format!(
            "virtual cpl={} (real cpl={}) virtual if={} iopl={}\n\
             guest cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} (real cr3={:#x})\n\
             guest gdtr={:#x}/{:#x} idtr={:#x}/{:#x} tr={:#x}\n\
             guest lstar={:#x} star={:#x} fmask={:#x} kernel_gs_base={:#x}",
            self.vcpl(),
            self.cpu.cpl(),
            v.vif as u8,
            v.iopl,
            v.cr0,
            v.cr3,
            v.cr4,
            v.efer,
            self.cpu.cr3,
            v.gdtr.base,
            v.gdtr.limit,
            v.idtr.base,
            v.idtr.limit,
            v.tr.selector,
            v.lstar,
            v.star,
            v.fmask,
            v.kernel_gs_base,
        )
    }

    /// RFLAGS as the guest sees them.
    pub fn vflags(&self) -> u64 {
        let r = self.cpu.rflags;
        if self.vcpl() == 3 {
            return r;
        }
        (r & !(rflags::IF | rflags::IOPL | rflags::VM))
            | if self.v.vif { rflags::IF } else { 0 }
            | ((self.v.iopl as u64) << 12)
    }

    /// Sets RFLAGS from the guest's view: IF and IOPL of the kernel stay virtual.
    pub fn set_vflags(&mut self, f: u64) {
        if self.vcpl() == 3 {
            self.cpu.rflags = (f & !rflags::IOPL) | rflags::IF | rflags::FIXED;
            return;
        }
        self.v.vif = f & rflags::IF != 0;
        self.v.iopl = ((f >> 12) & 3) as u8;
        // Real mode runs in virtual-8086 mode: VM is the real CPU's alone.
        let vm = if self.v.real_mode() { rflags::VM } else { 0 };
        self.cpu.rflags = (f & !(rflags::IOPL | rflags::VM)) | rflags::IF | rflags::FIXED | vm;
    }

    pub fn read(&mut self, lin: u64, buf: &mut [u8]) -> Result<(), Fault> {
        walk::access(&mut self.cpu, self.v.paging(), lin, buf, false, false)
    }

    pub fn write(&mut self, lin: u64, data: &[u8]) -> Result<(), Fault> {
        let mut b = data.to_vec();
        walk::access(&mut self.cpu, self.v.paging(), lin, &mut b, true, false)
    }

    /// A write of the guest's own instruction (one the VMM emulates), with
    /// the rights of the guest's CPL: a user-mode instruction's operand is
    /// a user access.
    pub fn write_operand(&mut self, lin: u64, data: &[u8]) -> Result<(), Fault> {
        let mut b = data.to_vec();
        let user = self.vcpl() == 3;
        walk::access(&mut self.cpu, self.v.paging(), lin, &mut b, true, user)
    }

    /// A read of the guest's own instruction, as [`Guest::write_operand`].
    pub fn read_operand(&mut self, lin: u64, buf: &mut [u8]) -> Result<(), Fault> {
        let user = self.vcpl() == 3;
        walk::access(&mut self.cpu, self.v.paging(), lin, buf, false, user)
    }

    pub fn read_u64(&mut self, lin: u64) -> Result<u64, Fault> {
        let mut b = [0u8; 8];
        self.read(lin, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads the 8-byte descriptor of `sel` from the guest's GDT or LDT:
    /// (its linear address, raw).
    pub fn descriptor(&mut self, sel: u16) -> Result<(u64, u64), Fault> {
        let t = if sel & 4 != 0 {
            DescriptorTable {
                base: self.v.ldtr.base,
                limit: if self.v.ldtr.unusable {
                    0
                } else {
                    self.v.ldtr.limit as u16
                },
            }
        } else {
            self.v.gdtr
        };
        let idx = (sel & !7) as u64;
        if idx + 7 > t.limit as u64 || (sel & 4 != 0 && self.v.ldtr.unusable) {
            return Err(Fault::gp((sel & !3) as u32));
        }
        let a = t.base.wrapping_add(idx);
        Ok((a, self.read_u64(a)?))
    }

    /// The registers as the guest sees them.
    pub fn regs(&self) -> Regs {
        let mut r = self.cpu.regs();
        r.rflags = self.vflags();
        r
    }

    pub fn set_regs(&mut self, regs: &Regs) {
        self.cpu.set_regs(regs);
        self.set_vflags(regs.rflags);
    }

    /// The system registers as the guest sees them: its own control
    /// registers, descriptor tables and selectors.
    pub fn sregs(&self) -> SRegs {
        let mut s = self.cpu.sregs();
        let v = &self.v;
        for seg in [
            &mut s.cs, &mut s.ss, &mut s.ds, &mut s.es, &mut s.fs, &mut s.gs,
        ] {
            *seg = if v.real_mode() {
                real_mode_view(*seg)
            } else {
                decompress(*seg)
            };
        }
        s.cr0 = v.cr0;
        s.cr2 = v.cr2;
        s.cr3 = v.cr3;
        s.cr4 = v.cr4;
        s.efer = v.efer;
        s.gdt = v.gdtr;
        s.idt = v.idtr;
        s.tr = v.tr;
        s.ldt = v.ldtr;
        s
    }

    /// SYSCALL from guest user mode into the guest kernel, with the guest's
    /// STAR, LSTAR and FMASK; #UD (reflected) if the guest has not enabled it.
    pub fn syscall(&mut self, next_rip: u64) -> Option<VcpuExit<'static>> {
        if self.v.efer & efer::SCE == 0 {
            let rip = self.cpu.rip;
            return self.reflect(vector::UD, None, rip, false);
        }
        let flags_v = self.vflags() & !rflags::RF;
        self.cpu.gpr[1] = next_rip;
        self.cpu.gpr[11] = flags_v;
        let sel = ((self.v.star >> 32) & 0xfffc) as u16;
        self.cpu.seg[sreg::CS] = compress(flat(sel, true), true);
        self.cpu.seg[sreg::SS] = compress(flat(sel.wrapping_add(8), false), true);
        self.cpu.rip = self.v.lstar;
        let f = flags_v & !(self.v.fmask | rflags::RF);
        self.cpu.refresh_mode();
        self.set_vflags(f);
        None
    }

    /// Delivers a fault-class exception (`ret` is the faulting instruction)
    /// through the guest's IDT: the frame's RFLAGS has RF set, as the CPU
    /// pushes it for every fault but an instruction breakpoint's #DB (SDM
    /// vol. 3 17.3.1.1); `rf` false leaves RF as it is (a #DB, whose traps
    /// and instruction-breakpoint faults push it so).
    pub fn reflect_fault(
        &mut self,
        vector: u8,
        code: Option<u32>,
        ret: u64,
        rf: bool,
    ) -> Option<VcpuExit<'static>> {
        if rf {
            self.cpu.rflags |= rflags::RF;
        }
        self.reflect(vector, code, ret, false)
    }

    /// Delivers an event to the guest kernel through its IDT, with the
    /// double-fault rules: `None`, or the shutdown exit of a triple fault.
    /// The frame's RFLAGS has RF as the CPU has it (see
    /// [`Guest::reflect_fault`]); delivery clears it.
    pub fn reflect(
        &mut self,
        vector: u8,
        code: Option<u32>,
        ret: u64,
        soft: bool,
    ) -> Option<VcpuExit<'static>> {
        self.cpu.revoke_grants();
        let (mut v, mut code, mut soft, mut ret) = (vector, code, soft, ret);
        loop {
            match self.deliver(v, code, soft, ret) {
                Ok(()) => return None,
                Err(f) => {
                    if let Some(a) = f.cr2 {
                        self.v.cr2 = a;
                    }
                    if soft {
                        // A fault of INT n's delivery (the gate's DPL, a
                        // missing gate) is the instruction's, not a fault
                        // during an exception's delivery (no #DF, whatever
                        // n is): it returns to the INT, with RF set as for
                        // any fault.
                        v = f.vector;
                        code = f.code;
                        ret = self.cpu.rip;
                        self.cpu.rflags |= rflags::RF;
                        soft = false;
                        continue;
                    }
                    if v == vector::DF {
                        return Some(VcpuExit::Shutdown);
                    }
                    let class = |x: u8| match x {
                        0 | 10..=13 => 1,
                        14 => 2,
                        _ => 0,
                    };
                    let (a, b) = (class(v), class(f.vector));
                    if (a == 1 && b == 1) || (a == 2 && b != 0) {
                        v = vector::DF;
                        code = Some(0);
                    } else {
                        v = f.vector;
                        code = f.code;
                    }
                }
            }
        }
    }

    fn deliver(&mut self, v: u8, code: Option<u32>, soft: bool, ret: u64) -> Result<(), Fault> {
        if self.v.real_mode() {
            return self.deliver_real(v, ret);
        }
        if !self.v.long_mode() {
            return self.deliver_legacy(v, code, soft, ret);
        }
        let vcpl = self.vcpl();
        let gate_err = (v as u32) * 8 + 2;
        if v as u64 * 16 + 15 > self.v.idtr.limit as u64 {
            return Err(Fault::gp(gate_err));
        }
        let a = self.v.idtr.base.wrapping_add(v as u64 * 16);
        let lo = self.read_u64(a)?;
        let hi = self.read_u64(a.wrapping_add(8))?;
        let gate = Gate::from_descriptor(lo, hi);
        if gate.type_ != 0xe && gate.type_ != 0xf {
            return Err(Fault::gp(gate_err));
        }
        if soft && gate.dpl < vcpl {
            return Err(Fault::gp(gate_err));
        }
        if !gate.present {
            return Err(Fault {
                vector: vector::NP,
                code: Some(gate_err),
                cr2: None,
            });
        }
        let (sel, off, ist) = (gate.selector, gate.offset, gate.ist as u64);
        let serr = (sel & !3) as u32;
        if sel & !3 == 0 {
            return Err(Fault::gp(0));
        }
        let (_, raw) = self.descriptor(sel)?;
        let d = Segment::from_descriptor(sel & !3, raw);
        // Handlers run in the guest kernel (DPL 0): that is all this VMM
        // deprivileges.
        if !d.s || d.type_ & 8 == 0 || d.dpl != 0 || !d.l || d.db {
            return Err(Fault::gp(serr));
        }
        if !d.present {
            return Err(Fault {
                vector: vector::NP,
                code: Some(serr),
                cr2: None,
            });
        }
        let from_user = vcpl == 3;
        let tss = self.v.tr.base;
        let mut sp = if ist != 0 {
            self.read_u64(tss.wrapping_add(0x24 + 8 * (ist - 1)))?
        } else if from_user {
            self.read_u64(tss.wrapping_add(4))?
        } else {
            self.cpu.gpr[4]
        };
        sp &= !0xf;
        let ss = self.cpu.seg[sreg::SS];
        let cs = self.cpu.seg[sreg::CS];
        let (ss_v, cs_v) = if from_user {
            (ss.selector, cs.selector)
        } else {
            (ss.selector & !3, cs.selector & !3)
        };
        let mut frame = vec![
            ss_v as u64,
            self.cpu.gpr[4],
            self.vflags(),
            cs_v as u64,
            ret,
        ];
        if let Some(c) = code {
            frame.push(c as u64);
        }
        let n = frame.len() as u64;
        let mut bytes = Vec::with_capacity(frame.len() * 8);
        for x in frame.iter().rev() {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        let top = sp.wrapping_sub(8 * n);
        self.write(top, &bytes)?;
        // Committed: enter the handler at real CPL 1.
        self.cpu.seg[sreg::CS] = compress(d, true);
        if from_user {
            self.cpu.seg[sreg::SS] = null_stack();
        }
        self.cpu.gpr[4] = top;
        self.cpu.rip = off;
        if from_user {
            // The kernel's IF and IOPL start as the user's were (they are in
            // the frame too); from now on they are virtual.
            self.v.vif = self.cpu.rflags & rflags::IF != 0;
            self.v.iopl = ((self.cpu.rflags >> 12) & 3) as u8;
            self.cpu.rflags = (self.cpu.rflags & !rflags::IOPL) | rflags::IF;
        }
        self.cpu.rflags &= !(rflags::TF | rflags::NT | rflags::RF | rflags::VM);
        if gate.type_ == 0xe {
            self.v.vif = false;
        }
        self.cpu.refresh_mode();
        Ok(())
    }

    /// Delivery through a legacy protected-mode IDT (the guest is not in
    /// long mode): 8-byte 32-bit interrupt and trap gates, a 32-bit frame
    /// (EFLAGS, CS, EIP, the error code) on the current stack, or from user
    /// mode on the stack SS0:ESP0 of the guest's 32-bit TSS with the user's
    /// SS and ESP pushed first (SDM vol. 3 6.12.1). Task gates and 16-bit
    /// gates are not delivered (#GP, as a missing gate).
    fn deliver_legacy(
        &mut self,
        v: u8,
        code: Option<u32>,
        soft: bool,
        ret: u64,
    ) -> Result<(), Fault> {
        let vcpl = self.vcpl();
        let gate_err = (v as u32) * 8 + 2;
        if v as u64 * 8 + 7 > self.v.idtr.limit as u64 {
            return Err(Fault::gp(gate_err));
        }
        let a = self.v.idtr.base.wrapping_add(v as u64 * 8) & 0xffff_ffff;
        let raw = self.read_u64(a)?;
        let type_ = ((raw >> 40) & 0xf) as u8;
        let dpl = ((raw >> 45) & 3) as u8;
        let present = raw & (1 << 47) != 0;
        let sel = (raw >> 16) as u16;
        let off = (raw & 0xffff) | ((raw >> 32) & 0xffff_0000);
        if type_ != 0xe && type_ != 0xf {
            return Err(Fault::gp(gate_err));
        }
        if soft && dpl < vcpl {
            return Err(Fault::gp(gate_err));
        }
        if !present {
            return Err(Fault {
                vector: vector::NP,
                code: Some(gate_err),
                cr2: None,
            });
        }
        let serr = (sel & !3) as u32;
        if sel & !3 == 0 {
            return Err(Fault::gp(0));
        }
        let (_, draw) = self.descriptor(sel)?;
        let mut d = Segment::from_descriptor(sel & !3, draw);
        // The L bit means nothing outside long mode.
        d.l = false;
        if !d.s || d.type_ & 8 == 0 || d.dpl != 0 {
            return Err(Fault::gp(serr));
        }
        if !d.present {
            return Err(Fault {
                vector: vector::NP,
                code: Some(serr),
                cr2: None,
            });
        }
        let from_user = vcpl == 3;
        let ss = self.cpu.seg[sreg::SS];
        let cs = self.cpu.seg[sreg::CS];
        let esp = self.cpu.gpr[4] & 0xffff_ffff;
        let (stack, sp, mut frame) = if from_user {
            let tss = self.v.tr.base;
            let mut b = [0u8; 6];
            self.read(tss.wrapping_add(4) & 0xffff_ffff, &mut b)?;
            let esp0 = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64;
            let ss0 = u16::from_le_bytes([b[4], b[5]]);
            let tss_err = (self.v.tr.selector & !3) as u32;
            if ss0 & !3 == 0 || ss0 & 3 != 0 {
                return Err(Fault {
                    vector: vector::TS,
                    code: Some(tss_err),
                    cr2: None,
                });
            }
            let (_, sraw) = self.descriptor(ss0)?;
            let s0 = Segment::from_descriptor(ss0, sraw);
            if !s0.s || s0.type_ & 0xa != 2 || s0.dpl != 0 {
                return Err(Fault {
                    vector: vector::TS,
                    code: Some((ss0 & !3) as u32),
                    cr2: None,
                });
            }
            if !s0.present {
                return Err(Fault {
                    vector: vector::SS,
                    code: Some((ss0 & !3) as u32),
                    cr2: None,
                });
            }
            (
                compress(s0, true),
                esp0,
                vec![ss.selector as u32, esp as u32],
            )
        } else {
            (ss, esp, Vec::new())
        };
        frame.push(self.vflags() as u32);
        frame.push(if from_user {
            cs.selector
        } else {
            cs.selector & !3
        } as u32);
        frame.push(ret as u32);
        if let Some(c) = code {
            frame.push(c);
        }
        let top = (sp.wrapping_sub(4 * frame.len() as u64)) & 0xffff_ffff;
        let bytes: Vec<u8> = frame.iter().rev().flat_map(|x| x.to_le_bytes()).collect();
        self.write(stack.base.wrapping_add(top) & 0xffff_ffff, &bytes)?;
        // Committed: enter the handler at real CPL 1.
        self.cpu.seg[sreg::CS] = compress(d, true);
        if from_user {
            self.cpu.seg[sreg::SS] = stack;
            self.v.vif = self.cpu.rflags & rflags::IF != 0;
            self.v.iopl = ((self.cpu.rflags >> 12) & 3) as u8;
            self.cpu.rflags = (self.cpu.rflags & !rflags::IOPL) | rflags::IF;
        }
        self.cpu.gpr[4] = top;
        self.cpu.rip = off;
        self.cpu.rflags &= !(rflags::TF | rflags::NT | rflags::RF | rflags::VM);
        if type_ == 0xe {
            self.v.vif = false;
        }
        self.cpu.refresh_mode();
        Ok(())
    }

    /// Delivery in real mode (SDM vol. 3 20.1.4): the 4-byte vector `v` of
    /// the interrupt vector table at IDTR.base (#GP if it is beyond
    /// IDTR.limit); FLAGS, CS and IP pushed on SS:SP (16-bit, no error
    /// code; #SS if the stack wraps below 0 with SP under 6), IF, TF and AC
    /// cleared, CS:IP loaded from the vector. The real CPU stays in
    /// virtual-8086 mode; the new CS gets the real-mode base (selector
    /// times 16) and keeps its limit.
    fn deliver_real(&mut self, v: u8, ret: u64) -> Result<(), Fault> {
        let at = v as u64 * 4;
        if at + 3 > self.v.idtr.limit as u64 {
            return Err(Fault::gp(v as u32 * 8 + 2));
        }
        let mut b = [0u8; 4];
        self.read(self.v.idtr.base.wrapping_add(at) & 0xffff_ffff, &mut b)?;
        let (ip, cs) = (
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[2], b[3]]),
        );
        let ss = self.cpu.seg[sreg::SS];
        let wide = ss.db;
        let m = if wide { 0xffff_ffff } else { 0xffff };
        let sp = self.cpu.gpr[4] & m;
        let flags = (self.vflags() & 0xffff) as u16;
        let old_cs = self.cpu.seg[sreg::CS].selector;
        // Each word is pushed on its own: SP wraps within the segment; a
        // word that would straddle its end (an odd SP) is #SS.
        let mut words = Vec::with_capacity(3);
        let mut top = sp;
        for w in [flags, old_cs, ret as u16] {
            top = top.wrapping_sub(2) & m;
            if top + 1 > ss.limit as u64 || top == m {
                return Err(Fault {
                    vector: vector::SS,
                    code: Some(0),
                    cr2: None,
                });
            }
            words.push((top, w));
        }
        for (at, w) in words {
            self.write(ss.base.wrapping_add(at) & 0xffff_ffff, &w.to_le_bytes())?;
        }
        // Committed.
        self.cpu.gpr[4] = if wide {
            top
        } else {
            (self.cpu.gpr[4] & !0xffff) | top
        };
        let c = &mut self.cpu.seg[sreg::CS];
        c.selector = cs;
        c.base = (cs as u64) << 4;
        self.cpu.rip = ip as u64;
        self.v.vif = false;
        self.cpu.rflags &= !(rflags::TF | rflags::AC | rflags::RF);
        self.cpu.refresh_mode();
        Ok(())
    }
}
