//! VM entry (VMLAUNCH/VMRESUME): the checks on the controls, the host state
//! and the guest state (SDM vol. 3C ch. 27; docs/vmx.md lists which are
//! done), the guest-state load, the VM-entry MSR-load list and event
//! injection.

use arch::rflags::{IF, VM};
use arch::{canonical, cr0, cr4, efer, msr};

use super::exit::GUEST_REGS;
use super::fields::*;
use super::{ctl, ctl_ok, error, VmFail, VmResult, CR0_FIXED0, NO_VMCS};
use crate::{Cpu, Stop};

/// The MSRs an MSR-load or MSR-store list may name: those the CPU keeps
/// itself, but FS/GS base, the x2APIC range and the VMX MSRs.
fn list_msr(index: u32) -> bool {
    use arch::msr::*;
    matches!(
        index,
        EFER | STAR
            | LSTAR
            | CSTAR
            | FMASK
            | KERNEL_GS_BASE
            | TSC_AUX
            | PAT
            | TSC
            | SYSENTER_CS
            | SYSENTER_ESP
            | SYSENTER_EIP
    )
}

/// A PAT value whose eight entries are all valid memory types.
fn pat_ok(pat: u64) -> bool {
    (0..8).all(|k| matches!((pat >> (8 * k)) & 0xff, 0 | 1 | 4 | 5 | 6 | 7))
}

/// Limit and granularity agree: G=0 if any of limit bits 11:0 is 0, G=1 if
/// any of bits 31:20 is 1.
fn limit_ok(limit: u32, g: bool) -> bool {
    (limit & 0xfff == 0xfff || !g) && (limit >> 20 == 0 || g)
}

/// Exception vectors that push an error code.
fn has_error_code(v: u8) -> bool {
    matches!(v, 8 | 10..=14 | 17)
}

impl Cpu {
    /// The VM-execution, VM-exit and VM-entry controls (error 7).
    fn check_controls(&self) -> bool {
        let v = &self.vmx.vmcs;
        let cap = |m| self.vmx_msr(m).unwrap_or(0);
        let pin = v.get32(PIN_BASED_VM_EXEC_CONTROL);
        let proc = v.get32(CPU_BASED_VM_EXEC_CONTROL);
        let proc2 = self.secondary_controls();
        // IA32_VMX_BASIC bit 55: the checks use the TRUE capability MSRs.
        if !ctl_ok(pin, cap(msr::VMX_TRUE_PINBASED_CTLS))
            || !ctl_ok(proc, cap(msr::VMX_TRUE_PROCBASED_CTLS))
            || !ctl_ok(proc2, cap(msr::VMX_PROCBASED_CTLS2))
            || !ctl_ok(v.get32(VM_EXIT_CONTROLS), cap(msr::VMX_TRUE_EXIT_CTLS))
            || !ctl_ok(v.get32(VM_ENTRY_CONTROLS), cap(msr::VMX_TRUE_ENTRY_CTLS))
        {
            return false;
        }
        if v.get32(CR3_TARGET_COUNT) > 4 {
            return false;
        }
        if proc2 & ctl::UNRESTRICTED_GUEST != 0 && proc2 & ctl::ENABLE_EPT == 0 {
            return false;
        }
        if proc & ctl::USE_IO_BITMAPS != 0
            && !(self.vmx_addr_ok(v.get(IO_BITMAP_A)) && self.vmx_addr_ok(v.get(IO_BITMAP_B)))
        {
            return false;
        }
        if proc & ctl::USE_MSR_BITMAPS != 0 && !self.vmx_addr_ok(v.get(MSR_BITMAP)) {
            return false;
        }
        // Virtual NMIs need NMI exiting; NMI-window exiting needs virtual NMIs.
        if (pin & ctl::VIRTUAL_NMIS != 0 && pin & ctl::NMI_EXITING == 0)
            || (proc & ctl::NMI_WINDOW_EXITING != 0 && pin & ctl::VIRTUAL_NMIS == 0)
        {
            return false;
        }
        if proc2 & ctl::ENABLE_VPID != 0 && v.get(VIRTUAL_PROCESSOR_ID) == 0 {
            return false;
        }
        if proc2 & ctl::ENABLE_EPT != 0 {
            let eptp = v.get(EPT_POINTER);
            // Write-back or uncacheable, a 4-level walk, no A/D flags, no
            // reserved bits.
            let ok = matches!(eptp & 7, 0 | 6)
                && (eptp >> 3) & 7 == 3
                && eptp & 0xfc0 == 0
                && eptp >> self.phys_bits() == 0;
            if !ok {
                return false;
            }
        }
        for (count, addr) in [
            (VM_EXIT_MSR_STORE_COUNT, VM_EXIT_MSR_STORE_ADDR),
            (VM_EXIT_MSR_LOAD_COUNT, VM_EXIT_MSR_LOAD_ADDR),
            (VM_ENTRY_MSR_LOAD_COUNT, VM_ENTRY_MSR_LOAD_ADDR),
        ] {
            let (n, a) = (v.get(count), v.get(addr));
            let end = a.wrapping_add(16 * n.min(512));
            if n > 512
                || (n != 0 && (a & 0xf != 0 || end < a || (end - 1) >> self.phys_bits() != 0))
            {
                return false;
            }
        }
        self.check_injection()
    }

    /// The secondary processor-based controls in effect (0 unless activated).
    pub(crate) fn secondary_controls(&self) -> u32 {
        let v = &self.vmx.vmcs;
        if v.get32(CPU_BASED_VM_EXEC_CONTROL) & ctl::ACTIVATE_SECONDARY != 0 {
            v.get32(SECONDARY_VM_EXEC_CONTROL)
        } else {
            0
        }
    }

    /// The VM-entry interruption-information field and its companions.
    fn check_injection(&self) -> bool {
        let v = &self.vmx.vmcs;
        let info = v.get32(VM_ENTRY_INTR_INFO_FIELD);
        if info & (1 << 31) == 0 {
            return true;
        }
        let vector = info as u8;
        let kind = (info >> 8) & 7;
        let code = info & (1 << 11) != 0;
        let type_ok = match kind {
            0 | 4 => true,
            2 => vector == 2,
            3 => vector < 32,
            5 | 6 => true,
            _ => false,
        };
        let pe = v.get(GUEST_CR0) & cr0::PE != 0;
        let code_ok = code == (pe && kind == 3 && has_error_code(vector));
        let len = v.get32(VM_ENTRY_INSTRUCTION_LEN);
        let len_ok = !matches!(kind, 4..=6) || (1..=15).contains(&len);
        let errc_ok = !code || v.get32(VM_ENTRY_EXCEPTION_ERROR_CODE) >> 16 == 0;
        type_ok && code_ok && len_ok && errc_ok && info & 0x7fff_f000 == 0
    }

    /// The host-state area (error 8).
    fn check_host_state(&self) -> bool {
        let v = &self.vmx.vmcs;
        let exit_ctl = v.get32(VM_EXIT_CONTROLS);
        let long = exit_ctl & ctl::HOST_ADDR_SPACE_SIZE != 0;
        let host_cr0 = v.get(HOST_CR0);
        let host_cr4 = v.get(HOST_CR4);
        if host_cr0 & CR0_FIXED0 != CR0_FIXED0 || host_cr0 >> 32 != 0 {
            return false;
        }
        if host_cr4 & cr4::VMXE == 0 || host_cr4 & !Self::cr4_fixed1() != 0 {
            return false;
        }
        if v.get(HOST_CR3) >> self.phys_bits() != 0 {
            return false;
        }
        let bases = [
            HOST_FS_BASE,
            HOST_GS_BASE,
            HOST_TR_BASE,
            HOST_GDTR_BASE,
            HOST_IDTR_BASE,
            HOST_IA32_SYSENTER_ESP,
            HOST_IA32_SYSENTER_EIP,
        ];
        if bases.iter().any(|&f| !canonical(v.get(f))) {
            return false;
        }
        let sels = [
            HOST_ES_SELECTOR,
            HOST_CS_SELECTOR,
            HOST_SS_SELECTOR,
            HOST_DS_SELECTOR,
            HOST_FS_SELECTOR,
            HOST_GS_SELECTOR,
            HOST_TR_SELECTOR,
        ];
        if sels.iter().any(|&f| v.get(f) & 7 != 0) {
            return false;
        }
        if v.get(HOST_CS_SELECTOR) == 0 || v.get(HOST_TR_SELECTOR) == 0 {
            return false;
        }
        if !long && v.get(HOST_SS_SELECTOR) == 0 {
            return false;
        }
        // The host address-space size follows the current mode.
        if long != (self.efer & efer::LMA != 0) {
            return false;
        }
        let rip = v.get(HOST_RIP);
        if long {
            if host_cr4 & cr4::PAE == 0 || !canonical(rip) {
                return false;
            }
        } else if v.get32(VM_ENTRY_CONTROLS) & ctl::IA32E_MODE_GUEST != 0 || rip >> 32 != 0 {
            return false;
        }
        if exit_ctl & ctl::LOAD_HOST_EFER != 0 {
            let e = v.get(HOST_IA32_EFER);
            let lm = e & efer::LMA != 0;
            if e & !(efer::SCE | efer::LME | efer::LMA | efer::NXE) != 0
                || lm != long
                || (e & efer::LME != 0) != long
            {
                return false;
            }
        }
        if exit_ctl & ctl::LOAD_HOST_PAT != 0 && !pat_ok(v.get(HOST_IA32_PAT)) {
            return false;
        }
        true
    }

    /// The guest-state area; Err(exit qualification) on failure.
    fn check_guest_state(&self) -> Result<(), u64> {
        let v = &self.vmx.vmcs;
        let entry = v.get32(VM_ENTRY_CONTROLS);
        let ia32e = entry & ctl::IA32E_MODE_GUEST != 0;
        let gcr0 = v.get(GUEST_CR0);
        let gcr4 = v.get(GUEST_CR4);
        let fail = Err(0);
        // Control registers.
        // Unrestricted guest: PE and PG may be 0 (but PG needs PE).
        let unrestricted = self.secondary_controls() & ctl::UNRESTRICTED_GUEST != 0;
        let fixed0 = if unrestricted {
            CR0_FIXED0 & !(cr0::PE | cr0::PG)
        } else {
            CR0_FIXED0
        };
        if gcr0 & fixed0 != fixed0 || gcr0 >> 32 != 0 {
            return fail;
        }
        if gcr0 & cr0::PG != 0 && gcr0 & cr0::PE == 0 {
            return fail;
        }
        if ia32e && gcr0 & cr0::PG == 0 {
            return fail;
        }
        if gcr4 & cr4::VMXE == 0 || gcr4 & !Self::cr4_fixed1() != 0 {
            return fail;
        }
        if ia32e && gcr4 & cr4::PAE == 0 {
            return fail;
        }
        if v.get(GUEST_CR3) >> self.phys_bits() != 0 {
            return fail;
        }
        if v.get(GUEST_DR7) >> 32 != 0 {
            return fail;
        }
        if !canonical(v.get(GUEST_SYSENTER_ESP)) || !canonical(v.get(GUEST_SYSENTER_EIP)) {
            return fail;
        }
        if entry & ctl::LOAD_GUEST_PAT != 0 && !pat_ok(v.get(GUEST_IA32_PAT)) {
            return fail;
        }
        if entry & ctl::LOAD_GUEST_EFER != 0 {
            let e = v.get(GUEST_IA32_EFER);
            if e & !(efer::SCE | efer::LME | efer::LMA | efer::NXE) != 0
                || (e & efer::LMA != 0) != ia32e
                || (gcr0 & cr0::PG != 0 && (e & efer::LME != 0) != ia32e)
            {
                return fail;
            }
        }
        // RFLAGS.
        let rflags = v.get(GUEST_RFLAGS);
        if rflags >> 22 != 0 || rflags & 0x8028 != 0 || rflags & 2 == 0 {
            return fail;
        }
        // RFLAGS.VM needs protected mode outside IA-32e mode (26.3.1.4).
        let v8086 = rflags & VM != 0;
        if v8086 && (ia32e || gcr0 & cr0::PE == 0) {
            return fail;
        }
        let seg = |k| self.vmcs_segment(k);
        let (cs, ss, tr, ldtr) = (seg(1), seg(2), seg(7), seg(6));
        if v8086 {
            // Virtual-8086 mode (26.3.1.2): CS, SS, DS, ES, FS and GS each
            // with base = selector << 4, limit 0xffff and access rights
            // 0xf3 (a present, accessed read/write data segment, DPL 3).
            for k in 0..6 {
                let d = seg(k);
                if d.base != (d.selector as u64) << 4
                    || d.limit != 0xffff
                    || d.unusable
                    || d.type_ != 3
                    || !d.s
                    || d.dpl != 3
                    || !d.present
                    || d.db
                    || d.l
                    || d.g
                    || d.avl
                {
                    return fail;
                }
            }
        }
        if tr.unusable || tr.selector & 4 != 0 || tr.s || !tr.present {
            return fail;
        }
        let tr_type_ok = if ia32e {
            tr.type_ == 11
        } else {
            tr.type_ == 3 || tr.type_ == 11
        };
        if !tr_type_ok || !canonical(tr.base) || !limit_ok(tr.limit, tr.g) {
            return fail;
        }
        if !ldtr.unusable
            && (ldtr.selector & 4 != 0
                || ldtr.type_ != 2
                || ldtr.s
                || !ldtr.present
                || !canonical(ldtr.base)
                || !limit_ok(ldtr.limit, ldtr.g))
        {
            return fail;
        }
        // Outside virtual-8086 mode (checked above), the segments' own
        // checks.
        if !v8086 {
            // An unrestricted guest's CS may be a read/write accessed data
            // segment with DPL 0 (as real mode leaves it).
            let data_cs = unrestricted && cs.type_ == 3;
            if cs.unusable
                || !(matches!(cs.type_, 9 | 11 | 13 | 15) || data_cs)
                || !cs.s
                || !cs.present
            {
                return fail;
            }
            let conforming = cs.type_ & 4 != 0 && !data_cs;
            if data_cs && cs.dpl != 0 {
                return fail;
            }
            if !data_cs && ((!conforming && cs.dpl != ss.dpl) || (conforming && cs.dpl > ss.dpl)) {
                return fail;
            }
            if gcr0 & cr0::PE == 0 && !ss.unusable && ss.dpl != 0 {
                return fail;
            }
            if ia32e && cs.l && cs.db {
                return fail;
            }
            if cs.base >> 32 != 0 || !limit_ok(cs.limit, cs.g) {
                return fail;
            }
            if !unrestricted && ss.selector & 3 != cs.selector & 3 {
                return fail;
            }
            if !ss.unusable
                && (!matches!(ss.type_, 3 | 7)
                    || !ss.s
                    || !ss.present
                    || (!unrestricted && ss.dpl as u16 != ss.selector & 3)
                    || !limit_ok(ss.limit, ss.g))
            {
                return fail;
            }
            for k in [0, 3, 4, 5] {
                let d = seg(k);
                if d.unusable {
                    continue;
                }
                let code = d.type_ & 8 != 0;
                if d.type_ & 1 == 0
                    || (code && d.type_ & 2 == 0)
                    || !d.s
                    || !d.present
                    || !limit_ok(d.limit, d.g)
                {
                    return fail;
                }
                let base_ok = if k >= 4 {
                    canonical(d.base)
                } else {
                    d.base >> 32 == 0
                };
                if !base_ok {
                    return fail;
                }
            }
        }
        // Descriptor tables.
        if !canonical(v.get(GUEST_GDTR_BASE)) || !canonical(v.get(GUEST_IDTR_BASE)) {
            return fail;
        }
        if v.get32(GUEST_GDTR_LIMIT) >> 16 != 0 || v.get32(GUEST_IDTR_LIMIT) >> 16 != 0 {
            return fail;
        }
        // RIP.
        let rip = v.get(GUEST_RIP);
        if ia32e && cs.l {
            if !canonical(rip) {
                return fail;
            }
        } else if rip >> 32 != 0 {
            return fail;
        }
        // Activity and interruptibility state.
        let activity = v.get32(GUEST_ACTIVITY_STATE);
        if activity > 1 || (activity == 1 && ss.dpl != 0) {
            return fail;
        }
        let intr = v.get32(GUEST_INTERRUPTIBILITY_INFO);
        if intr >> 4 != 0 || intr & 3 == 3 || intr & 4 != 0 {
            return fail;
        }
        if intr & 1 != 0 && rflags & IF == 0 {
            return fail;
        }
        let inj = v.get32(VM_ENTRY_INTR_INFO_FIELD);
        if inj & (1 << 31) != 0 {
            let kind = (inj >> 8) & 7;
            if kind == 0 && (rflags & IF == 0 || intr & 3 != 0) {
                return fail;
            }
            if kind == 2 && intr & 2 != 0 {
                return fail;
            }
        }
        let pending = v.get(GUEST_PENDING_DBG_EXCEPTIONS);
        if pending & !0x1_500f != 0 {
            return fail;
        }
        // The VMCS link pointer (VMCS shadowing is not offered).
        let link = v.get(VMCS_LINK_POINTER);
        if link != u64::MAX {
            let ok = self.vmx_addr_ok(link)
                && self.mem.read_u32(link) == Some(super::REVISION)
                && link != self.vmx.current;
            if !ok {
                return Err(4);
            }
        }
        Ok(())
    }

    fn load_guest_state(&mut self) {
        let entry = self.vmx.vmcs.get32(VM_ENTRY_CONTROLS);
        self.load_regs_and_msrs(
            &GUEST_REGS,
            entry & ctl::IA32E_MODE_GUEST != 0,
            entry & ctl::LOAD_GUEST_EFER != 0,
            entry & ctl::LOAD_GUEST_PAT != 0,
        );
        for k in 0..6 {
            self.seg[k] = self.vmcs_segment(k as u32);
        }
        self.ldtr = self.vmcs_segment(6);
        self.tr = self.vmcs_segment(7);
        let v = &self.vmx.vmcs;
        self.gdtr = vcpu::DescriptorTable {
            base: v.get(GUEST_GDTR_BASE),
            limit: v.get(GUEST_GDTR_LIMIT) as u16,
        };
        self.idtr = vcpu::DescriptorTable {
            base: v.get(GUEST_IDTR_BASE),
            limit: v.get(GUEST_IDTR_LIMIT) as u16,
        };
        self.gpr[4] = v.get(GUEST_RSP);
        self.rip = v.get(GUEST_RIP);
        self.next_rip = self.rip;
        self.rflags = v.get(GUEST_RFLAGS);
        // "Load debug controls" is always 1 here (ENTRY_DEFAULT1).
        let dr7 = v.get(GUEST_DR7);
        let intr = v.get32(GUEST_INTERRUPTIBILITY_INFO);
        self.inhibit = intr & 3 != 0;
        self.vmx.nmi_blocked = intr & 8 != 0;
        self.halted = v.get32(GUEST_ACTIVITY_STATE) == 1;
        self.vmx.timer_deadline = if v.get32(PIN_BASED_VM_EXEC_CONTROL) & ctl::PREEMPTION_TIMER != 0
        {
            let ticks = v.get32(VMX_PREEMPTION_TIMER_VALUE) as u64;
            Some(self.tsc().wrapping_add(ticks << super::TIMER_RATE))
        } else {
            None
        };
        self.load_dr7(dr7);
        self.vmx.non_root = true;
        self.vmx.mtf_from = u64::MAX;
        self.vmx.pin = self.vmx.vmcs.get32(PIN_BASED_VM_EXEC_CONTROL);
        self.vmx.proc = self.vmx.vmcs.get32(CPU_BASED_VM_EXEC_CONTROL);
        self.vmx.ept = (self.secondary_controls() & ctl::ENABLE_EPT != 0)
            .then(|| self.vmx.vmcs.get(EPT_POINTER));
        self.tlb_enter();
        self.mode_changed();
    }

    /// Processes an MSR-load list (VM entry, or VM exit for the host);
    /// Err(entry number, from 1) if an entry cannot be loaded.
    pub(crate) fn load_msr_list(&mut self, addr: u64, count: u64) -> Result<(), u64> {
        for n in 0..count {
            let at = addr.wrapping_add(16 * n);
            let (Some(index), Some(reserved), Some(value)) = (
                self.mem.read_u32(at),
                self.mem.read_u32(at.wrapping_add(4)),
                self.mem.read_u64(at.wrapping_add(8)),
            ) else {
                return Err(n + 1);
            };
            if reserved != 0 || !list_msr(index) || self.wrmsr(index, value).is_err() {
                return Err(n + 1);
            }
        }
        Ok(())
    }

    /// Processes the VM-exit MSR-store list: the guest's values.
    pub(crate) fn store_msr_list(&mut self, addr: u64, count: u64) -> Result<(), u64> {
        for n in 0..count {
            let at = addr.wrapping_add(16 * n);
            let (Some(index), Some(0)) =
                (self.mem.read_u32(at), self.mem.read_u32(at.wrapping_add(4)))
            else {
                return Err(n + 1);
            };
            if !list_msr(index) {
                return Err(n + 1);
            }
            let Ok(v) = self.rdmsr(index) else {
                return Err(n + 1);
            };
            if !self.mem.write(at.wrapping_add(8), &v.to_le_bytes()) {
                return Err(n + 1);
            }
        }
        Ok(())
    }

    /// VMLAUNCH (`launch`) or VMRESUME of the current VMCS. Ok(()) when the
    /// guest runs, or when the entry failed with a VM-entry-failure exit
    /// (the host then runs); Err for VMfailInvalid/VMfailValid.
    pub fn vm_entry(&mut self, launch: bool) -> VmResult {
        if self.vmx.current == NO_VMCS || !self.vmx.on || self.vmx.non_root {
            return Err(VmFail::Invalid);
        }
        if launch && self.vmx.vmcs.launched {
            return Err(VmFail::Valid(error::VMLAUNCH_NONCLEAR));
        }
        if !launch && !self.vmx.vmcs.launched {
            return Err(VmFail::Valid(error::VMRESUME_NONLAUNCHED));
        }
        if !self.check_controls() {
            return Err(VmFail::Valid(error::ENTRY_INVALID_CONTROLS));
        }
        if !self.check_host_state() {
            return Err(VmFail::Valid(error::ENTRY_INVALID_HOST_STATE));
        }
        if let Err(qual) = self.check_guest_state() {
            self.vm_entry_failure(reason::INVALID_GUEST_STATE, qual);
            return Ok(());
        }
        self.load_guest_state();
        let (addr, count) = (
            self.vmx.vmcs.get(VM_ENTRY_MSR_LOAD_ADDR),
            self.vmx.vmcs.get(VM_ENTRY_MSR_LOAD_COUNT),
        );
        if let Err(n) = self.load_msr_list(addr, count) {
            self.vm_entry_failure(reason::MSR_LOAD_FAIL, n);
            return Ok(());
        }
        if launch {
            self.vmx.vmcs.launched = true;
        }
        self.vmx_trace(format_args!(
            "entry ({}) rip={:#x}",
            if launch { "launch" } else { "resume" },
            self.rip
        ));
        self.inject_event();
        Ok(())
    }

    /// Delivers the event of the VM-entry interruption-information field
    /// through the guest's IDT.
    fn inject_event(&mut self) {
        let v = &self.vmx.vmcs;
        let info = v.get32(VM_ENTRY_INTR_INFO_FIELD);
        if info & (1 << 31) == 0 {
            return;
        }
        let vector = info as u8;
        let kind = (info >> 8) & 7;
        let code = (info & (1 << 11) != 0).then(|| v.get32(VM_ENTRY_EXCEPTION_ERROR_CODE));
        let len = v.get32(VM_ENTRY_INSTRUCTION_LEN) as u64;
        let (soft, ret) = match kind {
            4 | 6 => (true, self.rip.wrapping_add(len)),
            5 => (false, self.rip.wrapping_add(len)),
            _ => (false, self.rip),
        };
        if kind == 2 {
            self.vmx.nmi_blocked = true;
        }
        self.halted = false;
        self.vmx_trace(format_args!(
            "inject vector {vector} type {kind} code {code:?}"
        ));
        self.vmx_delivering(vector, kind, code);
        match self.deliver(vector, code, soft, ret, (kind < 4) as u32) {
            Ok(()) => self.vmx.vectoring = None,
            Err(Stop::VmExit) => {}
            Err(Stop::Exc(v2, c2)) => {
                if !self.exception(v2, c2) {
                    self.vmx_triple_fault();
                }
            }
            Err(Stop::Exit) => {
                self.pending = crate::Pending::Unimplemented(format!(
                    "delivery of injected vector {vector} touches MMIO"
                ));
            }
        }
    }
}
