//! VMX non-root operation: which instructions and events cause VM exits
//! (SDM vol. 3C ch. 26), with their exit qualifications and instruction
//! information, and the instructions whose behaviour changes (CR0/CR4 reads
//! through the read shadows, RDTSC with TSC offsetting).

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::exit::{intr_info, Exit};
use super::fields::*;
use super::{ctl, insn};
use crate::alu::mask;
use crate::exec::reg_size;
use crate::{exc, exc_code, sreg, Cpu, R};
use arch::rflags::{IF, OF};
use arch::{cr4, vector};

/// The number (0-15) of a general-purpose register.
fn gpr_index(r: Register) -> u32 {
    let n = r as u32;
    match n {
        37..=52 => n - 37,
        53..=68 => n - 53,
        21..=36 => n - 21,
        _ => 0,
    }
}

/// Address-size code of the instruction-information field (0: 16-bit,
/// 1: 32-bit, 2: 64-bit).
fn asz_code(bytes: usize) -> u32 {
    match bytes {
        2 => 0,
        4 => 1,
        _ => 2,
    }
}

impl Cpu {
    fn proc_ctl(&self) -> u32 {
        self.vmx.proc
    }

    /// A VM exit caused by instruction `i`.
    fn insn_exit(&mut self, i: &Instruction, reason: u32, qual: u64, info: u32) -> R<bool> {
        let mut e = Exit::new(reason, qual);
        e.len = i.len() as u32;
        e.info = info;
        self.vm_exit(e);
        Ok(true)
    }

    /// In VMX non-root operation, before instruction `i` executes: Ok(true)
    /// if VMX handled it (a VM exit, or an instruction whose non-root
    /// behaviour differs), Ok(false) to execute it normally.
    pub(crate) fn vmx_intercept(&mut self, i: &Instruction) -> R<bool> {
        let proc = self.proc_ctl();
        match i.mnemonic() {
            M::Cpuid => self.insn_exit(i, reason::CPUID, 0, 0),
            M::Invd => {
                self.require_cpl0()?;
                self.insn_exit(i, reason::INVD, 0, 0)
            }
            M::Hlt if proc & ctl::HLT_EXITING != 0 => {
                self.require_cpl0()?;
                self.insn_exit(i, reason::HLT, 0, 0)
            }
            M::Invlpg if proc & ctl::INVLPG_EXITING != 0 => {
                self.require_cpl0()?;
                let l = self.mem_lin(i)?;
                self.insn_exit(i, reason::INVLPG, l, 0)
            }
            M::Rdpmc if proc & ctl::RDPMC_EXITING != 0 => {
                if self.cpl != 0 && self.cr4 & cr4::PCE == 0 {
                    return exc_code(vector::GP, 0);
                }
                self.insn_exit(i, reason::RDPMC, 0, 0)
            }
            M::Rdtsc | M::Rdtscp => self.vmx_rdtsc(i, proc),
            M::Mov => self.vmx_mov_cr_dr(i, proc),
            M::Clts | M::Lmsw | M::Smsw => self.vmx_cr0_insn(i),
            M::In | M::Out | M::Insb | M::Insw | M::Insd | M::Outsb | M::Outsw | M::Outsd => {
                self.vmx_io(i, proc)
            }
            M::Rdmsr | M::Wrmsr => {
                self.require_cpl0()?;
                let write = i.mnemonic() == M::Wrmsr;
                if !self.msr_exits(self.gpr[1] as u32, write) {
                    return Ok(false);
                }
                let r = if write {
                    reason::MSR_WRITE
                } else {
                    reason::MSR_READ
                };
                self.insn_exit(i, r, 0, 0)
            }
            M::Monitor if proc & ctl::MONITOR_EXITING != 0 => {
                self.insn_exit(i, reason::MONITOR, 0, 0)
            }
            M::Mwait if proc & ctl::MWAIT_EXITING != 0 => self.insn_exit(i, reason::MWAIT, 0, 0),
            M::Pause if proc & ctl::PAUSE_EXITING != 0 => self.insn_exit(i, reason::PAUSE, 0, 0),
            M::Int3 | M::Into | M::Int1 => self.vmx_soft_exception(i),
            m if insn::is_vmx(m) => self.vmx_insn_exit(i),
            _ => Ok(false),
        }
    }

    fn vmx_rdtsc(&mut self, i: &Instruction, proc: u32) -> R<bool> {
        let p = i.mnemonic() == M::Rdtscp;
        if p && self.secondary_controls() & ctl::ENABLE_RDTSCP == 0 {
            return exc(vector::UD);
        }
        if self.cr4 & cr4::TSD != 0 && self.cpl != 0 {
            return exc_code(vector::GP, 0);
        }
        if proc & ctl::RDTSC_EXITING != 0 {
            let r = if p { reason::RDTSCP } else { reason::RDTSC };
            return self.insn_exit(i, r, 0, 0);
        }
        if proc & ctl::USE_TSC_OFFSETTING == 0 {
            return Ok(false);
        }
        let t = self.tsc().wrapping_add(self.vmx.vmcs.get(TSC_OFFSET));
        self.gpr[0] = t & 0xffff_ffff;
        self.gpr[2] = t >> 32;
        if p {
            self.gpr[1] = self.msr.tsc_aux;
        }
        Ok(true)
    }

    /// The guest/host mask and read shadow of CR0 (`n` = 0) or CR4.
    fn cr_mask_shadow(&self, n: usize) -> (u64, u64) {
        let v = &self.vmx.vmcs;
        if n == 0 {
            (v.get(CR0_GUEST_HOST_MASK), v.get(CR0_READ_SHADOW))
        } else {
            (v.get(CR4_GUEST_HOST_MASK), v.get(CR4_READ_SHADOW))
        }
    }

    /// MOV to/from a control or debug register.
    fn vmx_mov_cr_dr(&mut self, i: &Instruction, proc: u32) -> R<bool> {
        if i.op0_kind() != OpKind::Register || i.op1_kind() != OpKind::Register {
            return Ok(false);
        }
        let (r0, r1) = (i.op0_register(), i.op1_register());
        if r0.is_dr() || r1.is_dr() {
            if proc & ctl::MOV_DR_EXITING == 0 {
                return Ok(false);
            }
            self.require_cpl0()?;
            let (dr, gp, from) = if r0.is_dr() { (r0, r1, 0) } else { (r1, r0, 1) };
            let n = (dr as u32 - Register::DR0 as u32) as u64;
            let qual = n | (from << 4) | ((gpr_index(gp) as u64) << 8);
            return self.insn_exit(i, reason::DR_ACCESS, qual, 0);
        }
        let (cr, gp, to) = if r0.is_cr() {
            (r0, r1, true)
        } else if r1.is_cr() {
            (r1, r0, false)
        } else {
            return Ok(false);
        };
        self.require_cpl0()?;
        let n = cr as usize - Register::CR0 as usize;
        let qual = n as u64 | ((gpr_index(gp) as u64) << 8);
        let v = &self.vmx.vmcs;
        if to {
            let val = self.reg(gp);
            match n {
                0 | 4 => {
                    let (mask, shadow) = self.cr_mask_shadow(n);
                    if (val ^ shadow) & mask != 0 {
                        return self.insn_exit(i, reason::CR_ACCESS, qual, 0);
                    }
                    let cur = if n == 0 { self.cr0 } else { self.cr4 };
                    self.write_cr(n, (val & !mask) | (cur & mask))?;
                    Ok(true)
                }
                3 if proc & ctl::CR3_LOAD_EXITING != 0 => {
                    let count = v.get(CR3_TARGET_COUNT).min(4) as u32;
                    let hit = (0..count).any(|k| v.get(CR3_TARGET_VALUE0 + 2 * k) == val);
                    if hit {
                        return Ok(false);
                    }
                    self.insn_exit(i, reason::CR_ACCESS, qual, 0)
                }
                8 if proc & ctl::CR8_LOAD_EXITING != 0 => {
                    self.insn_exit(i, reason::CR_ACCESS, qual, 0)
                }
                _ => Ok(false),
            }
        } else {
            let qual = qual | (1 << 4);
            match n {
                0 | 4 => {
                    let (mask, shadow) = self.cr_mask_shadow(n);
                    let cur = if n == 0 { self.cr0 } else { self.cr4 };
                    self.set_reg(gp, (cur & !mask) | (shadow & mask));
                    Ok(true)
                }
                3 if proc & ctl::CR3_STORE_EXITING != 0 => {
                    self.insn_exit(i, reason::CR_ACCESS, qual, 0)
                }
                8 if proc & ctl::CR8_STORE_EXITING != 0 => {
                    self.insn_exit(i, reason::CR_ACCESS, qual, 0)
                }
                _ => Ok(false),
            }
        }
    }

    /// CLTS, LMSW and SMSW against the CR0 guest/host mask and read shadow.
    fn vmx_cr0_insn(&mut self, i: &Instruction) -> R<bool> {
        let (mask, shadow) = self.cr_mask_shadow(0);
        let ts = 1 << 3;
        match i.mnemonic() {
            M::Smsw => {
                let sz = if i.op0_kind() == OpKind::Register {
                    reg_size(i.op0_register())
                } else {
                    2
                };
                let v = (self.cr0 & !mask) | (shadow & mask);
                self.write_op(i, 0, sz, v & crate::alu::mask(sz))?;
                Ok(true)
            }
            M::Clts => {
                self.require_cpl0()?;
                if mask & ts == 0 {
                    return Ok(false);
                }
                if shadow & ts != 0 {
                    return self.insn_exit(i, reason::CR_ACCESS, 2 << 4, 0);
                }
                // TS belongs to the host: CLTS leaves it alone.
                Ok(true)
            }
            _ => {
                self.require_cpl0()?;
                let src = self.read_op(i, 0, 2)?;
                let exits = (mask & 1 != 0 && shadow & 1 == 0 && src & 1 != 0)
                    || (mask & 0xe & (src ^ shadow)) != 0;
                if exits {
                    let mem = i.op0_kind() == OpKind::Memory;
                    let mut qual = (3 << 4) | ((mem as u64) << 6) | (src << 16);
                    let mut e = Exit::default();
                    if mem {
                        e.linear = Some(self.mem_lin(i)?);
                    } else {
                        qual |= (gpr_index(i.op0_register()) as u64) << 8;
                    }
                    e.reason = reason::CR_ACCESS;
                    e.qual = qual;
                    e.len = i.len() as u32;
                    self.vm_exit(e);
                    return Ok(true);
                }
                // The guest-owned bits among PE, MP, EM, TS; PE is only set.
                let own = 0xf & !mask;
                let mut new = (self.cr0 & !(own & 0xe)) | (src & own & 0xe);
                new |= src & own & 1;
                self.write_cr(0, new)?;
                Ok(true)
            }
        }
    }

    /// Whether the I/O bitmaps make an access of `size` bytes at `port` exit.
    fn io_bitmap_hit(&self, port: u16, size: usize) -> bool {
        let v = &self.vmx.vmcs;
        (0..size as u32).any(|k| {
            let p = port as u32 + k;
            if p > 0xffff {
                return true;
            }
            let base = if p < 0x8000 {
                v.get(IO_BITMAP_A)
            } else {
                v.get(IO_BITMAP_B)
            };
            let bit = p & 0x7fff;
            let mut b = [0u8];
            !self.mem.read(base + (bit / 8) as u64, &mut b) || b[0] & (1 << (bit & 7)) != 0
        })
    }

    /// Whether RDMSR (`write` false) or WRMSR of `index` exits.
    fn msr_exits(&self, index: u32, write: bool) -> bool {
        if self.proc_ctl() & ctl::USE_MSR_BITMAPS == 0 {
            return true;
        }
        let half = match index {
            0..=0x1fff => 0,
            0xc000_0000..=0xc000_1fff => 1024,
            _ => return true,
        };
        let off = half + if write { 2048 } else { 0 } + (index & 0x1fff) as u64 / 8;
        let mut b = [0u8];
        let base = self.vmx.vmcs.get(MSR_BITMAP);
        !self.mem.read(base + off, &mut b) || b[0] & (1 << (index & 7)) != 0
    }

    /// IN, OUT, INS, OUTS: unconditional I/O exiting or the I/O bitmaps.
    fn vmx_io(&mut self, i: &Instruction, proc: u32) -> R<bool> {
        let m = i.mnemonic();
        let string = !matches!(m, M::In | M::Out);
        let input = matches!(m, M::In | M::Insb | M::Insw | M::Insd);
        let (port, size, imm) = if string {
            (
                self.gpr[2] as u16,
                i.memory_size().size().clamp(1, 4),
                false,
            )
        } else {
            let (port_op, data_op) = if input { (1, 0) } else { (0, 1) };
            let size = reg_size(i.op_register(data_op));
            if i.op_kind(port_op) == OpKind::Register {
                (self.gpr[2] as u16, size, false)
            } else {
                (i.immediate(port_op) as u16, size, true)
            }
        };
        self.io_check(port, size)?;
        let exits = if proc & ctl::USE_IO_BITMAPS != 0 {
            self.io_bitmap_hit(port, size)
        } else {
            proc & ctl::UNCOND_IO_EXITING != 0
        };
        if !exits {
            return Ok(false);
        }
        let rep = string && (i.has_rep_prefix() || i.has_repne_prefix());
        let qual = (size as u64 - 1)
            | ((input as u64) << 3)
            | ((string as u64) << 4)
            | ((rep as u64) << 5)
            | ((imm as u64) << 6)
            | ((port as u64) << 16);
        let mut e = Exit::new(reason::IO_INSTRUCTION, qual);
        e.len = i.len() as u32;
        if string {
            let asz = Self::string_asz(i);
            let (seg, off) = if input {
                (sreg::ES, self.gpr[7])
            } else {
                (Self::mem_seg(i), self.gpr[6])
            };
            e.linear = Some(self.seg[seg].base.wrapping_add(off & mask(asz)));
            e.info = (asz_code(asz) << 7) | ((seg as u32) << 15);
        }
        self.vm_exit(e);
        Ok(true)
    }

    /// INT3, INTO and INT1 with their vector in the exception bitmap.
    fn vmx_soft_exception(&mut self, i: &Instruction) -> R<bool> {
        let (v, kind) = match i.mnemonic() {
            M::Int3 => (vector::BP, 6),
            M::Into => {
                if self.long64 || self.rflags & OF == 0 {
                    return Ok(false);
                }
                (vector::OF, 6)
            }
            _ => (vector::DB, 5),
        };
        if self.vmx.vmcs.get32(EXCEPTION_BITMAP) & (1 << v) == 0 {
            return Ok(false);
        }
        let mut e = Exit::new(reason::EXCEPTION_NMI, 0);
        e.intr = intr_info(v, kind, None);
        e.len = i.len() as u32;
        self.vm_exit(e);
        Ok(true)
    }

    /// The VM-exit instruction-information field of a VMX instruction.
    fn vmx_insn_info(&self, i: &Instruction) -> u32 {
        let m = i.mnemonic();
        let mut info = 0u32;
        let mem = (0..i.op_count()).any(|k| i.op_kind(k) == OpKind::Memory);
        if mem {
            let (base, index) = (i.memory_base(), i.memory_index());
            let asz = if base != Register::None && base != Register::RIP {
                reg_size(base)
            } else if index != Register::None {
                reg_size(index)
            } else if self.long64 {
                8
            } else {
                4
            };
            info |= (i.memory_index_scale().trailing_zeros()) & 3;
            info |= asz_code(asz) << 7;
            info |= (Self::mem_seg(i) as u32) << 15;
            if index == Register::None {
                info |= 1 << 22;
            } else {
                info |= gpr_index(index) << 18;
            }
            if base == Register::None || base == Register::RIP {
                info |= 1 << 27;
            } else {
                info |= gpr_index(base) << 23;
            }
        } else if matches!(m, M::Vmread | M::Vmwrite) {
            info |= 1 << 10;
            let rm = if m == M::Vmread {
                i.op0_register()
            } else {
                i.op1_register()
            };
            info |= gpr_index(rm) << 3;
        }
        let reg2 = match m {
            M::Vmread => Some(i.op1_register()),
            M::Vmwrite | M::Invept | M::Invvpid => Some(i.op0_register()),
            _ => None,
        };
        if let Some(r) = reg2 {
            info |= gpr_index(r) << 28;
        }
        info
    }

    /// A VMX instruction in VMX non-root operation.
    fn vmx_insn_exit(&mut self, i: &Instruction) -> R<bool> {
        self.vmx_mode_check()?;
        let r = match i.mnemonic() {
            M::Vmcall => reason::VMCALL,
            M::Vmclear => reason::VMCLEAR,
            M::Vmlaunch => reason::VMLAUNCH,
            M::Vmptrld => reason::VMPTRLD,
            M::Vmptrst => reason::VMPTRST,
            M::Vmread => reason::VMREAD,
            M::Vmresume => reason::VMRESUME,
            M::Vmwrite => reason::VMWRITE,
            M::Vmxoff => reason::VMXOFF,
            M::Vmxon => reason::VMXON,
            M::Invept => reason::INVEPT,
            _ => reason::INVVPID,
        };
        let mem = (0..i.op_count()).any(|k| i.op_kind(k) == OpKind::Memory);
        let qual = if mem { i.memory_displacement64() } else { 0 };
        let info = self.vmx_insn_info(i);
        self.insn_exit(i, r, qual, info)
    }

    /// An exception about to be delivered in VMX non-root operation: true if
    /// the exception bitmap made it a VM exit.
    pub(crate) fn vmx_exception_exits(&mut self, v: u8, code: Option<u32>) -> bool {
        let v_ = &self.vmx.vmcs;
        let bitmap = v_.get32(EXCEPTION_BITMAP);
        let hit = if v == vector::PF {
            let (m, mt) = (
                v_.get32(PAGE_FAULT_ERROR_CODE_MASK),
                v_.get32(PAGE_FAULT_ERROR_CODE_MATCH),
            );
            (code.unwrap_or(0) & m == mt) == (bitmap & (1 << 14) != 0)
        } else {
            v < 32 && bitmap & (1 << v) != 0
        };
        if !hit {
            return false;
        }
        let qual = if v == vector::PF {
            // The faulting address goes to the qualification, not to CR2.
            std::mem::replace(&mut self.cr2, self.vmx.cr2_before_pf)
        } else {
            0
        };
        let mut e = Exit::new(reason::EXCEPTION_NMI, qual);
        e.intr = intr_info(v, 3, code);
        e.intr_code = code.unwrap_or(0);
        self.vm_exit(e);
        true
    }

    /// An event (vector `v` of interruption type `kind`) is being delivered
    /// through the guest's IDT: the IDT-vectoring information of a VM exit
    /// that happens meanwhile.
    pub(crate) fn vmx_delivering(&mut self, v: u8, kind: u32, code: Option<u32>) {
        if self.vmx.non_root {
            self.vmx.vectoring = Some((intr_info(v, kind, code), code.unwrap_or(0)));
        }
    }

    /// A triple fault: a VM exit in VMX non-root operation (true), else
    /// false (the CPU shuts down).
    pub(crate) fn vmx_triple_fault(&mut self) -> bool {
        if !self.vmx.non_root {
            return false;
        }
        self.vmx.vectoring = None;
        self.vm_exit(Exit::new(reason::TRIPLE_FAULT, 0));
        true
    }

    /// Whether none of the exits that can come between any two
    /// instructions is armed (the preemption timer, the monitor trap flag,
    /// NMI- and interrupt-window exiting): then non-root code runs uops back
    /// to back, with `vmx_boundary` checked before each burst.
    pub(crate) fn vmx_quiet(&self) -> bool {
        self.vmx.timer_deadline.is_none()
            && self.vmx.proc
                & (ctl::MONITOR_TRAP_FLAG | ctl::NMI_WINDOW_EXITING | ctl::INTR_WINDOW_EXITING)
                == 0
    }

    /// Events at an instruction boundary in VMX non-root operation (the
    /// preemption timer, the interrupt window, external interrupts): true
    /// if one caused a VM exit. `blocked`: blocking by STI or MOV SS.
    pub(crate) fn vmx_boundary(&mut self, blocked: bool) -> bool {
        let (pin, proc) = (self.vmx.pin, self.vmx.proc);
        if std::mem::take(&mut self.vmx.init_pending) {
            self.vm_exit(Exit::new(reason::INIT, 0));
            return true;
        }
        if let Some(d) = self.vmx.timer_deadline {
            if self.tsc() >= d {
                self.vm_exit(Exit::new(reason::PREEMPTION_TIMER, 0));
                return true;
            }
        }
        if proc & ctl::MONITOR_TRAP_FLAG != 0 {
            // The first boundary after VM entry starts the count.
            if self.vmx.mtf_from == u64::MAX {
                self.vmx.mtf_from = self.retired;
            } else if self.retired != self.vmx.mtf_from {
                self.vm_exit(Exit::new(reason::MONITOR_TRAP_FLAG, 0));
                return true;
            }
        }
        if pin & ctl::NMI_EXITING != 0 && self.nmi_ready && !blocked {
            // An NMI of the local APIC: a VM exit that takes it (SDM vol. 3
            // 26.2, 28.2.2).
            let mut e = Exit::new(reason::EXCEPTION_NMI, 0);
            if let Some(l) = self.local.as_mut() {
                if l.take_nmi() {
                    e.intr = intr_info(arch::vector::NMI, 2, None);
                }
                self.nmi_ready = l.nmi_pending();
            }
            self.vm_exit(e);
            return true;
        }
        if proc & ctl::NMI_WINDOW_EXITING != 0 && !self.vmx.nmi_blocked && !blocked {
            self.vm_exit(Exit::new(reason::NMI_WINDOW, 0));
            return true;
        }
        if proc & ctl::INTR_WINDOW_EXITING != 0 && self.rflags & IF != 0 && !blocked {
            self.vm_exit(Exit::new(reason::INTERRUPT_WINDOW, 0));
            return true;
        }
        if pin & ctl::EXT_INTR_EXITING != 0 && self.irq_ready && !blocked {
            let mut e = Exit::new(reason::EXTERNAL_INTERRUPT, 0);
            if self.vmx.vmcs.get32(VM_EXIT_CONTROLS) & ctl::ACK_INTR_ON_EXIT != 0 {
                if let Some(l) = self.local.as_mut() {
                    if let Some(vec) = l.ack() {
                        e.intr = intr_info(vec, 0, None);
                    }
                    self.irq_ready = l.pending();
                }
            }
            self.vm_exit(e);
            return true;
        }
        false
    }
}
