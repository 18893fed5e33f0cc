//! Intel VMX (VT-x) in the software CPU, after the Intel SDM vol. 3C: the
//! capability MSRs, VMX operation (VMXON/VMXOFF), the VMCS and its
//! instructions (VMCLEAR, VMPTRLD, VMPTRST, VMREAD, VMWRITE), VM entry
//! (VMLAUNCH/VMRESUME: checks, guest-state load, event injection), VMX
//! non-root operation with its VM exits, and VM exit (guest-state save,
//! host-state load). docs/vmx.md says what is implemented and what is not.
//!
//! The current VMCS is cached in the CPU ([`Vmcs`]) and written back to its
//! region in guest memory when it stops being current (VMCLEAR, VMPTRLD of
//! another VMCS, VMXOFF). The region's layout is the CPU's own: the revision
//! identifier at offset 0, the VMX-abort indicator at 4, the launch state at 8
//! (0 clear, 1 launched), then from offset 16 one 64-bit slot per supported
//! field, in the order of [`fields::FIELDS`].

mod entry;
mod ept;
mod exit;
pub use exit::{access_rights, guest_seg_fields, segment};
pub mod fields;
mod insn;
pub(crate) use insn::is_vmx;
mod intercept;
mod tlb;

use arch::cr4;
use arch::msr::{self, feature_control};
use arch::rflags::{ARITH, CF, ZF};

use crate::Cpu;
use fields::*;

/// The VMCS revision identifier (IA32_VMX_BASIC bits 30:0): "VISR".
pub const REVISION: u32 = 0x5253_4956;
/// Size of a VMXON or VMCS region.
pub const REGION_SIZE: u64 = 4096;
/// The offset of the first field slot in a VMCS region.
pub const REGION_FIELDS: u64 = 16;
/// "No current VMCS": the value VMPTRST stores.
pub const NO_VMCS: u64 = u64::MAX;
/// IA32_VMX_MISC bits 4:0: the preemption timer counts down every 2^5 TSC
/// ticks.
pub const TIMER_RATE: u32 = 5;

/// VM-execution, VM-exit and VM-entry control bits.
pub mod ctl {
    // Pin-based.
    pub const EXT_INTR_EXITING: u32 = 1 << 0;
    pub const NMI_EXITING: u32 = 1 << 3;
    pub const VIRTUAL_NMIS: u32 = 1 << 5;
    pub const PREEMPTION_TIMER: u32 = 1 << 6;
    // Primary processor-based.
    pub const INTR_WINDOW_EXITING: u32 = 1 << 2;
    pub const USE_TSC_OFFSETTING: u32 = 1 << 3;
    pub const HLT_EXITING: u32 = 1 << 7;
    pub const INVLPG_EXITING: u32 = 1 << 9;
    pub const MWAIT_EXITING: u32 = 1 << 10;
    pub const RDPMC_EXITING: u32 = 1 << 11;
    pub const RDTSC_EXITING: u32 = 1 << 12;
    pub const CR3_LOAD_EXITING: u32 = 1 << 15;
    pub const CR3_STORE_EXITING: u32 = 1 << 16;
    pub const CR8_LOAD_EXITING: u32 = 1 << 19;
    pub const CR8_STORE_EXITING: u32 = 1 << 20;
    pub const NMI_WINDOW_EXITING: u32 = 1 << 22;
    pub const MONITOR_TRAP_FLAG: u32 = 1 << 27;
    pub const MOV_DR_EXITING: u32 = 1 << 23;
    pub const UNCOND_IO_EXITING: u32 = 1 << 24;
    pub const USE_IO_BITMAPS: u32 = 1 << 25;
    pub const USE_MSR_BITMAPS: u32 = 1 << 28;
    pub const MONITOR_EXITING: u32 = 1 << 29;
    pub const PAUSE_EXITING: u32 = 1 << 30;
    pub const ACTIVATE_SECONDARY: u32 = 1 << 31;
    // Secondary processor-based.
    pub const ENABLE_EPT: u32 = 1 << 1;
    pub const ENABLE_RDTSCP: u32 = 1 << 3;
    pub const ENABLE_VPID: u32 = 1 << 5;
    pub const UNRESTRICTED_GUEST: u32 = 1 << 7;
    pub const ENABLE_INVPCID: u32 = 1 << 12;
    pub const ENABLE_XSAVES: u32 = 1 << 20;
    // VM-exit.
    pub const HOST_ADDR_SPACE_SIZE: u32 = 1 << 9;
    pub const ACK_INTR_ON_EXIT: u32 = 1 << 15;
    pub const SAVE_PAT: u32 = 1 << 18;
    pub const LOAD_HOST_PAT: u32 = 1 << 19;
    pub const SAVE_EFER: u32 = 1 << 20;
    pub const LOAD_HOST_EFER: u32 = 1 << 21;
    pub const SAVE_PREEMPTION_TIMER: u32 = 1 << 22;
    // VM-entry.
    pub const IA32E_MODE_GUEST: u32 = 1 << 9;
    pub const LOAD_GUEST_PAT: u32 = 1 << 14;
    pub const LOAD_GUEST_EFER: u32 = 1 << 15;

    /// Bits that must be 1 ("default1" classes).
    pub const PIN_DEFAULT1: u32 = 0x0000_0016;
    pub const PROC_DEFAULT1: u32 = 0x0401_e172;
    pub const EXIT_DEFAULT1: u32 = 0x0003_6dff;
    pub const ENTRY_DEFAULT1: u32 = 0x0000_11ff;

    /// The default1 bits that the TRUE capability MSRs let software clear
    /// (IA32_VMX_BASIC bit 55): CR3-load and CR3-store exiting. The other
    /// default1 bits stay 1 in the TRUE MSRs too (this CPU has no "load/save
    /// debug controls" to turn off).
    pub const PROC_TRUE_DEFAULT1: u32 = PROC_DEFAULT1 & !(CR3_LOAD_EXITING | CR3_STORE_EXITING);

    /// Bits that may be 1.
    pub const PIN_ALLOWED1: u32 =
        PIN_DEFAULT1 | EXT_INTR_EXITING | NMI_EXITING | VIRTUAL_NMIS | PREEMPTION_TIMER;
    pub const PROC_ALLOWED1: u32 = PROC_DEFAULT1
        | INTR_WINDOW_EXITING
        | USE_TSC_OFFSETTING
        | HLT_EXITING
        | INVLPG_EXITING
        | MWAIT_EXITING
        | RDPMC_EXITING
        | RDTSC_EXITING
        | CR3_LOAD_EXITING
        | CR3_STORE_EXITING
        | CR8_LOAD_EXITING
        | CR8_STORE_EXITING
        | NMI_WINDOW_EXITING
        | MOV_DR_EXITING
        | UNCOND_IO_EXITING
        | USE_IO_BITMAPS
        | USE_MSR_BITMAPS
        | MONITOR_TRAP_FLAG
        | MONITOR_EXITING
        | PAUSE_EXITING
        | ACTIVATE_SECONDARY;
    pub const PROC2_ALLOWED1: u32 = ENABLE_EPT | ENABLE_RDTSCP | ENABLE_VPID | UNRESTRICTED_GUEST;
    pub const EXIT_ALLOWED1: u32 = EXIT_DEFAULT1
        | HOST_ADDR_SPACE_SIZE
        | ACK_INTR_ON_EXIT
        | SAVE_PAT
        | LOAD_HOST_PAT
        | SAVE_EFER
        | LOAD_HOST_EFER
        | SAVE_PREEMPTION_TIMER;
    pub const ENTRY_ALLOWED1: u32 =
        ENTRY_DEFAULT1 | IA32E_MODE_GUEST | LOAD_GUEST_PAT | LOAD_GUEST_EFER;
}

/// CR0 bits that must be 1 in VMX operation (PE, NE, PG).
pub const CR0_FIXED0: u64 = 0x8000_0021;

impl Cpu {
    /// The CR0 bits that must be 1 now: [`CR0_FIXED0`], except PE and PG
    /// for a guest with "unrestricted guest" (SDM vol. 3C, 26.3.1.1 and
    /// 25.3: such a guest may run with protection or paging off).
    pub(crate) fn cr0_fixed0(&self) -> u64 {
        if self.vmx.non_root && self.secondary_controls() & ctl::UNRESTRICTED_GUEST != 0 {
            CR0_FIXED0 & !(arch::cr0::PE | arch::cr0::PG)
        } else {
            CR0_FIXED0
        }
    }
}

/// Why a VMX instruction failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmFail {
    /// VMfailInvalid: CF=1 (no current VMCS to hold an error number).
    Invalid,
    /// VMfailValid: ZF=1, the number in the VM-instruction error field.
    Valid(u32),
}

pub type VmResult = Result<(), VmFail>;

/// The current VMCS, cached in the CPU.
#[derive(Clone)]
pub struct Vmcs {
    /// Launch state: false clear, true launched.
    pub launched: bool,
    vals: [u64; FIELDS.len()],
}

impl Default for Vmcs {
    fn default() -> Vmcs {
        Vmcs {
            launched: false,
            vals: [0; FIELDS.len()],
        }
    }
}

impl Vmcs {
    /// The value of field `enc` (a full field, access type 0); 0 when the
    /// field is not supported.
    pub fn get(&self, enc: u32) -> u64 {
        slot(enc).map_or(0, |k| self.vals[k])
    }

    /// The low 32 bits of field `enc`.
    pub fn get32(&self, enc: u32) -> u32 {
        self.get(enc) as u32
    }

    /// Sets field `enc`, truncated to its width.
    pub fn set(&mut self, enc: u32, v: u64) {
        if let Some(k) = slot(enc) {
            self.vals[k] = match width(enc) {
                Width::W16 => v & 0xffff,
                Width::W32 => v & 0xffff_ffff,
                _ => v,
            };
        }
    }

    /// Every supported field with its value, in encoding order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &'static str, u64)> + '_ {
        FIELDS
            .iter()
            .zip(self.vals.iter())
            .map(|(&(enc, name), &v)| (enc, name, v))
    }
}

/// The VMX state of a logical processor.
#[derive(Clone)]
pub struct Vmx {
    /// IA32_FEATURE_CONTROL.
    pub feature_control: u64,
    /// In VMX operation (after VMXON).
    pub on: bool,
    /// In VMX non-root operation (a guest runs under the VMCS).
    pub non_root: bool,
    pub vmxon_ptr: u64,
    /// The current-VMCS pointer, [`NO_VMCS`] when there is none.
    pub current: u64,
    /// The current VMCS.
    pub vmcs: Vmcs,
    /// TSC value at which the VMX-preemption timer expires.
    pub(crate) timer_deadline: Option<u64>,
    /// Blocking by NMI in the guest (virtual-NMI blocking with "virtual
    /// NMIs"): set by an injected NMI, cleared by IRET.
    pub(crate) nmi_blocked: bool,
    /// The event whose delivery faulted (IDT-vectoring information and
    /// error code of the next VM exit).
    pub(crate) vectoring: Option<(u32, u32)>,
    /// The EPT pointer while a guest runs with EPT.
    pub(crate) ept: Option<u64>,
    /// The tag of the running guest's translations (None: not kept).
    pub(crate) tlb_tag: Option<tlb::Tag>,
    /// The root's translations while a guest with a VPID runs.
    pub(crate) root_tlb: Option<tlb::SavedTlb>,
    /// Translations of guests that are not running, by tag.
    pub(crate) tlbs: std::collections::HashMap<tlb::Tag, tlb::SavedTlb>,
    /// The pin-based and primary processor-based controls of the running
    /// guest (the VMCS cannot change while it runs).
    pub(crate) pin: u32,
    pub(crate) proc: u32,
    /// Instructions retired at the first instruction boundary after VM
    /// entry (`u64::MAX` before it): the monitor trap flag exits once the
    /// count moves.
    pub(crate) mtf_from: u64,
    /// VM exits end [`Cpu::run`] with [`crate::CpuExit::VmExit`] instead of
    /// continuing at the host RIP: the VMM is Rust code (the `vmx` engine).
    pub stop_on_exit: bool,
    /// A VM exit happened that `run` has not reported yet.
    pub(crate) exited: bool,
    /// CR2 before the last page fault set it (a #PF VM exit restores it).
    pub(crate) cr2_before_pf: u64,
    /// An INIT signal is pending (blocked in VMX root operation).
    pub(crate) init_pending: bool,
    /// That exit ended in a VMX abort: the CPU shuts down.
    pub(crate) aborted: bool,
    /// Log each VMX instruction and each VM exit on stderr.
    pub trace: bool,
    /// VM exits by basic exit reason.
    pub exit_counts: [u64; 66],
}

impl Default for Vmx {
    fn default() -> Vmx {
        Vmx {
            feature_control: 0,
            on: false,
            non_root: false,
            vmxon_ptr: 0,
            current: NO_VMCS,
            vmcs: Vmcs::default(),
            timer_deadline: None,
            nmi_blocked: false,
            vectoring: None,
            ept: None,
            mtf_from: 0,
            pin: 0,
            proc: 0,
            tlb_tag: None,
            root_tlb: None,
            tlbs: std::collections::HashMap::new(),
            stop_on_exit: false,
            exited: false,
            aborted: false,
            init_pending: false,
            cr2_before_pf: 0,
            trace: false,
            exit_counts: [0; 66],
        }
    }
}

/// IA32_VMX_* control MSR value: allowed-0 settings low, allowed-1 high.
fn ctl_msr(default1: u32, allowed1: u32) -> u64 {
    ((allowed1 as u64) << 32) | default1 as u64
}

/// Whether `v` respects the allowed settings of a control MSR value.
pub(crate) fn ctl_ok(v: u32, cap: u64) -> bool {
    let must = cap as u32;
    let may = (cap >> 32) as u32;
    v & must == must && v & !may == 0
}

impl Cpu {
    /// The physical-address width (CPUID 0x8000_0008 EAX[7:0]).
    pub fn phys_bits(&self) -> u32 {
        match self.cpuid.query(0x8000_0008, 0).0 & 0xff {
            0 => 36,
            n => n.min(52),
        }
    }

    /// A 4 KiB-aligned address within the physical-address width.
    pub(crate) fn vmx_addr_ok(&self, a: u64) -> bool {
        a & 0xfff == 0 && a >> self.phys_bits() == 0
    }

    /// CR4 bits that may be 1 in VMX operation (IA32_VMX_CR4_FIXED1).
    pub(crate) fn cr4_fixed1() -> u64 {
        0x7ff | cr4::VMXE
    }

    /// The VMX capability MSRs and IA32_FEATURE_CONTROL; None for others.
    pub fn vmx_msr(&self, index: u32) -> Option<u64> {
        use ctl::*;
        let ept = (1 << 0) // execute-only translations
            | (1 << 6) // page-walk length 4
            | (1 << 14) // write-back EPT structures
            | (1 << 16) // 2 MiB pages
            | (1 << 20) // INVEPT
            | (1 << 25) // single-context INVEPT
            | (1 << 26) // all-context INVEPT
            | (1 << 32) // INVVPID
            | (1 << 40) // individual-address INVVPID
            | (1 << 41) // single-context
            | (1 << 42) // all-context
            | (1 << 43); // single-context retaining globals
        Some(match index {
            msr::FEATURE_CONTROL => self.vmx.feature_control,
            // Write-back VMCS memory, INS/OUTS information, the TRUE
            // capability MSRs (bit 55).
            msr::VMX_BASIC => {
                REVISION as u64 | (REGION_SIZE << 32) | (6 << 50) | (1 << 54) | (1 << 55)
            }
            msr::VMX_PINBASED_CTLS => ctl_msr(PIN_DEFAULT1, PIN_ALLOWED1),
            msr::VMX_PROCBASED_CTLS => ctl_msr(PROC_DEFAULT1, PROC_ALLOWED1),
            msr::VMX_EXIT_CTLS => ctl_msr(EXIT_DEFAULT1, EXIT_ALLOWED1),
            msr::VMX_ENTRY_CTLS => ctl_msr(ENTRY_DEFAULT1, ENTRY_ALLOWED1),
            // Timer rate, EFER.LMA stored on exit, HLT activity state, 4 CR3
            // targets, up to 512 MSR-list entries.
            msr::VMX_MISC => TIMER_RATE as u64 | (1 << 5) | (1 << 6) | (4 << 16),
            msr::VMX_CR0_FIXED0 => CR0_FIXED0,
            msr::VMX_CR0_FIXED1 => 0xffff_ffff,
            msr::VMX_CR4_FIXED0 => cr4::VMXE,
            msr::VMX_CR4_FIXED1 => Self::cr4_fixed1(),
            msr::VMX_VMCS_ENUM => (highest_index() as u64) << 1,
            msr::VMX_PROCBASED_CTLS2 => ctl_msr(0, PROC2_ALLOWED1),
            msr::VMX_EPT_VPID_CAP => ept,
            // The TRUE controls: the same allowed-1 settings; allowed-0
            // settings a subset of the plain MSRs' (SDM vol. 3D, A.3).
            msr::VMX_TRUE_PINBASED_CTLS => ctl_msr(PIN_DEFAULT1, PIN_ALLOWED1),
            msr::VMX_TRUE_PROCBASED_CTLS => ctl_msr(PROC_TRUE_DEFAULT1, PROC_ALLOWED1),
            msr::VMX_TRUE_EXIT_CTLS => ctl_msr(EXIT_DEFAULT1, EXIT_ALLOWED1),
            msr::VMX_TRUE_ENTRY_CTLS => ctl_msr(ENTRY_DEFAULT1, ENTRY_ALLOWED1),
            _ => return None,
        })
    }

    /// WRMSR to IA32_FEATURE_CONTROL: false (#GP) when locked or reserved
    /// bits are set.
    pub(crate) fn write_feature_control(&mut self, v: u64) -> bool {
        let ok_bits = feature_control::LOCK
            | feature_control::VMXON_IN_SMX
            | feature_control::VMXON_OUTSIDE_SMX;
        if self.vmx.feature_control & feature_control::LOCK != 0 || v & !ok_bits != 0 {
            return false;
        }
        self.vmx.feature_control = v;
        true
    }

    /// VMsucceed: the arithmetic flags cleared.
    pub(crate) fn vm_succeed(&mut self) {
        self.rflags &= !ARITH;
    }

    /// VMfailInvalid or VMfailValid(number): VMfailValid needs a current
    /// VMCS, else it is VMfailInvalid.
    pub(crate) fn vm_fail(&mut self, f: VmFail) {
        self.rflags &= !ARITH;
        match f {
            VmFail::Valid(n) if self.vmx.current != NO_VMCS => {
                self.vmx.vmcs.set(VM_INSTRUCTION_ERROR, n as u64);
                self.rflags |= ZF;
            }
            _ => self.rflags |= CF,
        }
    }

    /// Sets the flags of a VMX instruction's result.
    pub(crate) fn vm_result(&mut self, r: VmResult) {
        match r {
            Ok(()) => self.vm_succeed(),
            Err(f) => self.vm_fail(f),
        }
    }

    // ---- the VMCS -------------------------------------------------------

    /// Writes the cached current VMCS back to its region.
    fn vmcs_flush(&mut self) {
        let base = self.vmx.current;
        if base == NO_VMCS {
            return;
        }
        let mut buf = vec![0u8; (REGION_FIELDS as usize) + 8 * FIELDS.len()];
        buf[..4].copy_from_slice(&REVISION.to_le_bytes());
        buf[8..12].copy_from_slice(&(self.vmx.vmcs.launched as u32).to_le_bytes());
        for (k, v) in self.vmx.vmcs.vals.iter().enumerate() {
            let at = REGION_FIELDS as usize + 8 * k;
            buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        // Keep the abort indicator the guest may have written.
        if let Some(abort) = self.mem.read_u32(base + 4) {
            buf[4..8].copy_from_slice(&abort.to_le_bytes());
        }
        self.mem.write(base, &buf);
    }

    /// Loads the VMCS region at `base` into the cache.
    fn vmcs_fetch(&mut self, base: u64) {
        let mut buf = vec![0u8; (REGION_FIELDS as usize) + 8 * FIELDS.len()];
        self.mem.read(base, &mut buf);
        let mut vmcs = Vmcs {
            launched: u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) == 1,
            ..Default::default()
        };
        for (k, &(enc, _)) in FIELDS.iter().enumerate() {
            let at = REGION_FIELDS as usize + 8 * k;
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[at..at + 8]);
            vmcs.set(enc, u64::from_le_bytes(b));
        }
        self.vmx.vmcs = vmcs;
    }

    /// VMXON with the VMXON region at `ptr`, once the #UD/#GP checks passed.
    pub fn vmxon(&mut self, ptr: u64) -> VmResult {
        if self.vmx.on {
            return Err(VmFail::Valid(error::VMXON_IN_ROOT));
        }
        if !self.vmx_addr_ok(ptr) || self.mem.read_u32(ptr) != Some(REVISION) {
            return Err(VmFail::Invalid);
        }
        self.vmx.on = true;
        self.vmx.vmxon_ptr = ptr;
        self.vmx.current = NO_VMCS;
        Ok(())
    }

    /// VMXOFF: leaves VMX operation (the current VMCS is written back).
    pub fn vmxoff(&mut self) -> VmResult {
        self.vmcs_flush();
        self.vmx.current = NO_VMCS;
        self.vmx.on = false;
        self.vmx.init_pending = false;
        Ok(())
    }

    /// VMCLEAR of the VMCS at `ptr`: written back if current, launch state
    /// clear.
    pub fn vmclear(&mut self, ptr: u64) -> VmResult {
        if !self.vmx_addr_ok(ptr) || self.mem.host(ptr, REGION_SIZE).is_none() {
            return Err(VmFail::Valid(error::VMCLEAR_INVALID_ADDRESS));
        }
        if ptr == self.vmx.vmxon_ptr {
            return Err(VmFail::Valid(error::VMCLEAR_VMXON_POINTER));
        }
        if ptr == self.vmx.current {
            self.vmx.vmcs.launched = false;
            self.vmcs_flush();
            self.vmx.current = NO_VMCS;
        } else {
            self.mem.write(ptr + 8, &0u32.to_le_bytes());
        }
        Ok(())
    }

    /// VMPTRLD: makes the VMCS at `ptr` current.
    pub fn vmptrld(&mut self, ptr: u64) -> VmResult {
        if !self.vmx_addr_ok(ptr) || self.mem.host(ptr, REGION_SIZE).is_none() {
            return Err(VmFail::Valid(error::VMPTRLD_INVALID_ADDRESS));
        }
        if ptr == self.vmx.vmxon_ptr {
            return Err(VmFail::Valid(error::VMPTRLD_VMXON_POINTER));
        }
        if self.mem.read_u32(ptr) != Some(REVISION) {
            return Err(VmFail::Valid(error::VMPTRLD_BAD_REVISION));
        }
        if ptr != self.vmx.current {
            self.vmcs_flush();
            self.vmx.current = ptr;
            self.vmcs_fetch(ptr);
        }
        Ok(())
    }

    /// VMPTRST: the current-VMCS pointer.
    pub fn vmptrst(&self) -> u64 {
        self.vmx.current
    }

    /// VMREAD of the field with encoding `enc` (as in the register operand).
    pub fn vmread(&self, enc: u64) -> Result<u64, VmFail> {
        if self.vmx.current == NO_VMCS {
            return Err(VmFail::Invalid);
        }
        let (k, high) = field_slot(enc).ok_or(VmFail::Valid(error::UNSUPPORTED_FIELD))?;
        let v = self.vmx.vmcs.vals[k];
        Ok(if high { v >> 32 } else { v })
    }

    /// VMWRITE of `v` to the field with encoding `enc`.
    pub fn vmwrite(&mut self, enc: u64, v: u64) -> VmResult {
        if self.vmx.current == NO_VMCS {
            return Err(VmFail::Invalid);
        }
        let (k, high) = field_slot(enc).ok_or(VmFail::Valid(error::UNSUPPORTED_FIELD))?;
        let enc = enc as u32;
        if area(enc) == Area::ReadOnly {
            return Err(VmFail::Valid(error::VMWRITE_READ_ONLY));
        }
        let slot = &mut self.vmx.vmcs.vals[k];
        *slot = if high {
            (*slot & 0xffff_ffff) | (v << 32)
        } else {
            match width(enc) {
                Width::W16 => v & 0xffff,
                Width::W32 => v & 0xffff_ffff,
                _ => v,
            }
        };
        Ok(())
    }

    /// The VMCS as text: each area's fields with names and values.
    pub fn dump_vmcs(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "VMCS at {:#x}:", self.vmx.current);
        for a in Area::ALL {
            let _ = writeln!(s, "  {}:", a.name());
            for (enc, name, v) in self.vmx.vmcs.iter().filter(|f| area(f.0) == a) {
                let _ = writeln!(s, "    {enc:#06x} {name:<32} {v:#x}");
            }
        }
        s
    }

    /// An INIT signal (visor has no IPIs; this is its only source): blocked
    /// in VMX root operation, a VM exit (reason 3) in VMX non-root operation
    /// at the next instruction boundary. Outside VMX operation the CPU does
    /// not model INIT and ignores it.
    pub fn signal_init(&mut self) {
        if self.vmx.on {
            self.vmx.init_pending = true;
        }
    }

    /// Whether a VM exit (or VM-entry failure) happened since the last call,
    /// with [`Vmx::stop_on_exit`].
    pub fn take_vm_exit(&mut self) -> bool {
        std::mem::take(&mut self.vmx.exited)
    }

    /// Logs a VMX event on stderr with [`Vmx::trace`].
    pub fn vmx_trace(&self, what: std::fmt::Arguments) {
        if self.vmx.trace {
            eprintln!("vmx: {what}");
        }
    }
}

/// The slot of the field a VMREAD/VMWRITE encoding names, and whether it is
/// the high half of a 64-bit field.
fn field_slot(enc: u64) -> Option<(usize, bool)> {
    if enc >> 32 != 0 || enc & 0xffff_0000 != 0 {
        return None;
    }
    let enc = enc as u32;
    let high = enc & 1 != 0;
    if high && width(enc) != Width::W64 {
        return None;
    }
    slot(enc & !1).map(|k| (k, high))
}

#[cfg(test)]
mod tests;
