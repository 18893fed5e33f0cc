//! VM exits: the exit-information fields, the guest-state save and the
//! host-state load (SDM vol. 3C ch. 28), and VM-entry failures that load the
//! host state the same way.

use arch::rflags::FIXED;
use arch::{cr0, efer, Segment};

use super::fields::*;
use super::{ctl, Cpu};
use crate::sreg;

/// What a VM exit reports besides the guest state.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Exit {
    pub reason: u32,
    pub qual: u64,
    /// VM-exit instruction length (exits caused by instructions).
    pub len: u32,
    /// VM-exit instruction information.
    pub info: u32,
    /// VM-exit interruption information and error code.
    pub intr: u32,
    pub intr_code: u32,
    /// Guest-linear address, when the exit reports one.
    pub linear: Option<u64>,
    /// Guest-physical address (EPT violations and misconfigurations).
    pub gpa: Option<u64>,
}

impl Exit {
    pub fn new(reason: u32, qual: u64) -> Exit {
        Exit {
            reason,
            qual,
            ..Default::default()
        }
    }
}

/// The access-rights field of a segment (SDM table 25-2).
pub fn access_rights(s: &Segment) -> u32 {
    if s.unusable {
        return 1 << 16;
    }
    (s.type_ as u32 & 0xf)
        | (s.s as u32) << 4
        | (s.dpl as u32 & 3) << 5
        | (s.present as u32) << 7
        | (s.avl as u32) << 12
        | (s.l as u32) << 13
        | (s.db as u32) << 14
        | (s.g as u32) << 15
}

/// A segment from its VMCS selector, base, limit and access rights.
pub fn segment(selector: u16, base: u64, limit: u32, ar: u32) -> Segment {
    Segment {
        base,
        limit,
        selector,
        type_: (ar & 0xf) as u8,
        s: ar & (1 << 4) != 0,
        dpl: ((ar >> 5) & 3) as u8,
        present: ar & (1 << 7) != 0,
        avl: ar & (1 << 12) != 0,
        l: ar & (1 << 13) != 0,
        db: ar & (1 << 14) != 0,
        g: ar & (1 << 15) != 0,
        unusable: ar & (1 << 16) != 0,
    }
}

/// Guest segment `k` (ES, CS, SS, DS, FS, GS, LDTR, TR): the encodings of its
/// selector, base, limit and access rights.
pub fn guest_seg_fields(k: u32) -> (u32, u32, u32, u32) {
    (
        GUEST_ES_SELECTOR + 2 * k,
        GUEST_ES_BASE + 2 * k,
        GUEST_ES_LIMIT + 2 * k,
        GUEST_ES_AR_BYTES + 2 * k,
    )
}

/// The exit decoded, for traces: what the qualification and the other
/// exit-information fields say, or nothing.
fn describe(e: &Exit) -> String {
    let q = e.qual;
    let kind = [
        "ext-int",
        "?",
        "NMI",
        "exception",
        "soft-int",
        "priv-soft-exc",
        "soft-exc",
        "other",
    ];
    match e.reason {
        reason::IO_INSTRUCTION => format!(
            " {}{}{} port {:#x} size {}",
            if q & 32 != 0 { "rep " } else { "" },
            if q & 8 != 0 { "in" } else { "out" },
            if q & 16 != 0 { "s" } else { "" },
            q >> 16,
            (q & 7) + 1
        ),
        reason::CR_ACCESS => {
            let (cr, gpr) = (q & 15, (q >> 8) & 15);
            match (q >> 4) & 3 {
                0 => format!(" mov cr{cr} <- r{gpr}"),
                1 => format!(" mov r{gpr} <- cr{cr}"),
                2 => " clts".into(),
                _ => format!(" lmsw {:#x}", q >> 16),
            }
        }
        reason::DR_ACCESS => format!(
            " mov {} dr{} (r{})",
            if q & 16 != 0 { "from" } else { "to" },
            q & 7,
            (q >> 8) & 15
        ),
        reason::EXCEPTION_NMI | reason::EXTERNAL_INTERRUPT if e.intr >> 31 != 0 => format!(
            " {} vector {}{}",
            kind[(e.intr >> 8) as usize & 7],
            e.intr & 0xff,
            if e.intr & (1 << 11) != 0 {
                format!(" error code {:#x}", e.intr_code)
            } else {
                String::new()
            }
        ),
        reason::EPT_VIOLATION => format!(
            " {} gpa {:#x} (allowed {}{}{})",
            match q & 7 {
                1 => "read",
                2 => "write",
                _ => "fetch",
            },
            e.gpa.unwrap_or(0),
            if q & 8 != 0 { "r" } else { "-" },
            if q & 16 != 0 { "w" } else { "-" },
            if q & 32 != 0 { "x" } else { "-" },
        ),
        reason::EPT_MISCONFIG => format!(" gpa {:#x}", e.gpa.unwrap_or(0)),
        reason::INVLPG => format!(" {q:#x}"),
        _ => String::new(),
    }
}

/// Interruption-information value: vector, type, error-code flag, valid.
pub(crate) fn intr_info(v: u8, kind: u32, code: Option<u32>) -> u32 {
    v as u32 | (kind << 8) | ((code.is_some() as u32) << 11) | (1 << 31)
}

/// The fields of CR0, CR3, CR4, IA32_EFER, IA32_PAT and the three
/// IA32_SYSENTER MSRs in the guest-state or the host-state area.
pub(crate) struct RegFields {
    cr: [u32; 3],
    efer: u32,
    pat: u32,
    sysenter: [u32; 3],
}

pub(crate) const GUEST_REGS: RegFields = RegFields {
    cr: [GUEST_CR0, GUEST_CR3, GUEST_CR4],
    efer: GUEST_IA32_EFER,
    pat: GUEST_IA32_PAT,
    sysenter: [GUEST_SYSENTER_CS, GUEST_SYSENTER_ESP, GUEST_SYSENTER_EIP],
};

const HOST_REGS: RegFields = RegFields {
    cr: [HOST_CR0, HOST_CR3, HOST_CR4],
    efer: HOST_IA32_EFER,
    pat: HOST_IA32_PAT,
    sysenter: [
        HOST_IA32_SYSENTER_CS,
        HOST_IA32_SYSENTER_ESP,
        HOST_IA32_SYSENTER_EIP,
    ],
};

impl Cpu {
    /// Loads the control registers, IA32_EFER (from its field if
    /// `load_efer`, else LMA and LME from `long`), IA32_PAT (if `load_pat`)
    /// and the SYSENTER MSRs from one area of the VMCS.
    pub(crate) fn load_regs_and_msrs(
        &mut self,
        f: &RegFields,
        long: bool,
        load_efer: bool,
        load_pat: bool,
    ) {
        let v = &self.vmx.vmcs;
        self.cr0 = v.get(f.cr[0]) | cr0::ET;
        self.cr3 = v.get(f.cr[1]);
        self.cr4 = v.get(f.cr[2]);
        if load_efer {
            self.efer = v.get(f.efer);
        } else if long {
            self.efer |= efer::LMA | efer::LME;
        } else {
            self.efer &= !(efer::LMA | efer::LME);
        }
        if load_pat {
            self.msr.pat = v.get(f.pat);
        }
        self.msr.sysenter_cs = v.get(f.sysenter[0]);
        self.msr.sysenter_esp = v.get(f.sysenter[1]);
        self.msr.sysenter_eip = v.get(f.sysenter[2]);
    }

    /// A guest segment as the VMCS holds it.
    pub(crate) fn vmcs_segment(&self, k: u32) -> Segment {
        let (sel, base, limit, ar) = guest_seg_fields(k);
        let v = &self.vmx.vmcs;
        segment(v.get(sel) as u16, v.get(base), v.get32(limit), v.get32(ar))
    }

    /// The guest segment registers in VMCS order (ES..GS, LDTR, TR).
    pub(crate) fn segs_vmcs_order(&self) -> [Segment; 8] {
        let s = &self.seg;
        [s[0], s[1], s[2], s[3], s[4], s[5], self.ldtr, self.tr]
    }

    fn save_guest_state(&mut self) {
        let segs = self.segs_vmcs_order();
        let timer_left = self.vmx.timer_deadline.map(|d| {
            let now = self.tsc();
            (d.saturating_sub(now) >> super::TIMER_RATE).min(u32::MAX as u64)
        });
        let lma = self.efer & efer::LMA != 0;
        let v = &mut self.vmx.vmcs;
        v.set(GUEST_CR0, self.cr0);
        v.set(GUEST_CR3, self.cr3);
        v.set(GUEST_CR4, self.cr4);
        // "Save debug controls" is always 1 here (EXIT_DEFAULT1).
        v.set(GUEST_DR7, self.dbg.dr7);
        v.set(GUEST_RSP, self.gpr[4]);
        v.set(GUEST_RIP, self.rip);
        v.set(GUEST_RFLAGS, self.rflags);
        for (k, s) in segs.iter().enumerate() {
            let (sel, base, limit, ar) = guest_seg_fields(k as u32);
            v.set(sel, s.selector as u64);
            v.set(base, s.base);
            v.set(limit, s.limit as u64);
            v.set(ar, access_rights(s) as u64);
        }
        v.set(GUEST_GDTR_BASE, self.gdtr.base);
        v.set(GUEST_GDTR_LIMIT, self.gdtr.limit as u64);
        v.set(GUEST_IDTR_BASE, self.idtr.base);
        v.set(GUEST_IDTR_LIMIT, self.idtr.limit as u64);
        v.set(GUEST_SYSENTER_CS, self.msr.sysenter_cs);
        v.set(GUEST_SYSENTER_ESP, self.msr.sysenter_esp);
        v.set(GUEST_SYSENTER_EIP, self.msr.sysenter_eip);
        let exit_ctl = v.get32(VM_EXIT_CONTROLS);
        if exit_ctl & ctl::SAVE_EFER != 0 {
            v.set(GUEST_IA32_EFER, self.efer);
        }
        if exit_ctl & ctl::SAVE_PAT != 0 {
            v.set(GUEST_IA32_PAT, self.msr.pat);
        }
        if exit_ctl & ctl::SAVE_PREEMPTION_TIMER != 0 {
            if let Some(left) = timer_left {
                v.set(VMX_PREEMPTION_TIMER_VALUE, left);
            }
        }
        let entry = v.get32(VM_ENTRY_CONTROLS) & !ctl::IA32E_MODE_GUEST;
        v.set(
            VM_ENTRY_CONTROLS,
            (entry | if lma { ctl::IA32E_MODE_GUEST } else { 0 }) as u64,
        );
        let intr = (self.inhibit as u64) | ((self.vmx.nmi_blocked as u64) << 3);
        v.set(GUEST_INTERRUPTIBILITY_INFO, intr);
        v.set(GUEST_ACTIVITY_STATE, self.halted as u64);
        v.set(GUEST_PENDING_DBG_EXCEPTIONS, 0);
    }

    /// Loads the host state of the current VMCS (a VM exit, or a VM entry
    /// that failed after the guest state was checked).
    fn load_host_state(&mut self) {
        // DR7 is 400H after a VM exit (SDM vol. 3 28.5.1).
        self.load_dr7(0x400);
        let exit_ctl = self.vmx.vmcs.get32(VM_EXIT_CONTROLS);
        let long = exit_ctl & ctl::HOST_ADDR_SPACE_SIZE != 0;
        self.load_regs_and_msrs(
            &HOST_REGS,
            long,
            exit_ctl & ctl::LOAD_HOST_EFER != 0,
            exit_ctl & ctl::LOAD_HOST_PAT != 0,
        );
        let v = &self.vmx.vmcs;
        let data = |sel: u64, base: u64| {
            let mut s = Segment::flat(sel as u16, false, false, true);
            s.dpl = 0;
            s.base = base;
            if sel == 0 {
                s.unusable = true;
            }
            s
        };
        let mut cs = Segment::flat(v.get(HOST_CS_SELECTOR) as u16, true, long, !long);
        cs.dpl = 0;
        self.seg[sreg::CS] = cs;
        self.seg[sreg::ES] = data(v.get(HOST_ES_SELECTOR), 0);
        self.seg[sreg::SS] = data(v.get(HOST_SS_SELECTOR), 0);
        self.seg[sreg::DS] = data(v.get(HOST_DS_SELECTOR), 0);
        self.seg[sreg::FS] = data(v.get(HOST_FS_SELECTOR), v.get(HOST_FS_BASE));
        self.seg[sreg::GS] = data(v.get(HOST_GS_SELECTOR), v.get(HOST_GS_BASE));
        self.tr = Segment::tss(v.get(HOST_TR_SELECTOR) as u16, v.get(HOST_TR_BASE), 0x67);
        self.ldtr = Segment {
            unusable: true,
            ..Default::default()
        };
        self.gdtr = vcpu::DescriptorTable {
            base: v.get(HOST_GDTR_BASE),
            limit: 0xffff,
        };
        self.idtr = vcpu::DescriptorTable {
            base: v.get(HOST_IDTR_BASE),
            limit: 0xffff,
        };
        self.gpr[4] = v.get(HOST_RSP);
        self.rip = v.get(HOST_RIP);
        self.next_rip = self.rip;
        self.rflags = FIXED;
        self.inhibit = false;
        self.halted = false;
        self.vmx.non_root = false;
        self.vmx.ept = None;
        self.vmx.timer_deadline = None;
        self.mode_changed();
        self.tlb_exit();
    }

    /// A VM exit: the exit information, the guest state saved, the host
    /// state loaded; execution continues at the host RIP.
    pub(crate) fn vm_exit(&mut self, e: Exit) {
        let vectoring = self.vmx.vectoring.take();
        let v = &mut self.vmx.vmcs;
        v.set(VM_EXIT_REASON, e.reason as u64);
        v.set(EXIT_QUALIFICATION, e.qual);
        v.set(VM_EXIT_INSTRUCTION_LEN, e.len as u64);
        v.set(VMX_INSTRUCTION_INFO, e.info as u64);
        v.set(VM_EXIT_INTR_INFO, e.intr as u64);
        v.set(VM_EXIT_INTR_ERROR_CODE, e.intr_code as u64);
        let (vinfo, vcode) = vectoring.unwrap_or((0, 0));
        v.set(IDT_VECTORING_INFO_FIELD, vinfo as u64);
        v.set(IDT_VECTORING_ERROR_CODE, vcode as u64);
        if let Some(l) = e.linear {
            v.set(GUEST_LINEAR_ADDRESS, l);
        }
        if let Some(g) = e.gpa {
            v.set(GUEST_PHYSICAL_ADDRESS, g);
        }
        let entry_info = v.get(VM_ENTRY_INTR_INFO_FIELD);
        v.set(VM_ENTRY_INTR_INFO_FIELD, entry_info & !(1 << 31));
        self.save_guest_state();
        let v = &self.vmx.vmcs;
        let lists = [
            (
                v.get(VM_EXIT_MSR_STORE_ADDR),
                v.get(VM_EXIT_MSR_STORE_COUNT),
            ),
            (v.get(VM_EXIT_MSR_LOAD_ADDR), v.get(VM_EXIT_MSR_LOAD_COUNT)),
        ];
        let stored = self.store_msr_list(lists[0].0, lists[0].1);
        self.count_exit(e.reason);
        self.vmx.exited = self.vmx.stop_on_exit;
        if self.vmx.trace {
            let what = describe(&e);
            self.vmx_trace(format_args!(
                "exit {}{what} (qual {:#x}) rip={:#x} len={} idt-vectoring={vinfo:#x}",
                reason::name(e.reason),
                e.qual,
                self.rip,
                e.len,
            ));
        }
        self.load_host_state();
        // VMX abort: 1 saving guest MSRs failed, 4 loading host MSRs did.
        let abort = match stored {
            Err(_) => Some(1),
            Ok(()) => self.load_msr_list(lists[1].0, lists[1].1).err().map(|_| 4),
        };
        if let Some(code) = abort {
            self.vmx_trace(format_args!("VMX abort {code}"));
            self.mem.write(
                self.vmx.current.wrapping_add(4),
                &(code as u32).to_le_bytes(),
            );
            self.vmx.aborted = true;
            self.vmx.exited = true;
        }
    }

    /// A VM entry that failed on the guest state or the MSR-load list:
    /// exit reason `basic` with bit 31, the host state loaded.
    pub(crate) fn vm_entry_failure(&mut self, basic: u32, qual: u64) {
        let reason = basic | reason::ENTRY_FAILURE;
        let v = &mut self.vmx.vmcs;
        v.set(VM_EXIT_REASON, reason as u64);
        v.set(EXIT_QUALIFICATION, qual);
        v.set(VM_EXIT_INTR_INFO, 0);
        self.count_exit(basic);
        self.vmx.exited = self.vmx.stop_on_exit;
        self.vmx_trace(format_args!(
            "entry failure: exit {basic} ({}) qual={qual:#x}",
            reason::name(basic)
        ));
        self.load_host_state();
    }

    fn count_exit(&mut self, reason: u32) {
        let k = (reason & 0xffff) as usize;
        let n = self.vmx.exit_counts.len();
        self.vmx.exit_counts[k.min(n - 1)] += 1;
    }
}
