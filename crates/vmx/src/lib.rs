//! Engine `vmx`: a VMM written as VT-x software. The guest runs on visor's
//! software CPU in VMX non-root operation; this crate is the root-mode VMM
//! and drives the CPU only through VMX operations (the Rust API of the same
//! code that implements the guest-visible instructions, crates/x86/src/vmx):
//! it enables VMX, executes VMXON, VMCLEAR and VMPTRLD of a VMCS, VMWRITEs
//! the host state, the guest state and the controls (HLT, I/O, CPUID,
//! external-interrupt exiting, EPT mapping guest RAM), VMLAUNCHes, and on
//! each VM exit VMREADs the reason and qualification, completes the exit
//! against the machine model and VMRESUMEs.
//!
//! - I/O: IN/OUT through the exit qualification and RAX; string I/O, and
//!   MMIO found by EPT violations, are completed by passing the port or page
//!   through and single-stepping the instruction with the monitor trap flag.
//! - CPUID from the engine's table, VMX hidden; the secondary controls
//!   that instructions it advertises need (RDTSCP, INVPCID, XSAVES) are
//!   derived from it, and what the CPU's VMX cannot enable is hidden
//!   ([`guest_cpuid`]); HLT as the HLT activity
//!   state until an interrupt is due; external interrupts acknowledged on
//!   exit and injected through VM-entry event injection (interrupt-window
//!   exiting while the guest cannot take them).
//! - VMCALL is the hypercall instruction of paravirtual guests.
//! - "Unrestricted guest" (as KVM on Intel): a guest with paging off (a
//!   Multiboot kernel) enters as it is, on EPT; CR0.NE, which VMX operation
//!   needs, is the VMM's (guest/host mask, read shadow), and a MOV to CR0
//!   that exits for it is completed here, entering or leaving IA-32e mode.
//!   The controls are adjusted to the TRUE capability MSRs, so CR3 accesses
//!   do not exit.
//!
//! The VMM's own structures (VMXON and VMCS regions, I/O and MSR bitmaps,
//! EPT tables) live in memory after guest RAM that no EPT entry maps.

use std::collections::VecDeque;
use std::sync::Arc;

use arch::msr::{self, feature_control};
use arch::{cr0, cr4, efer, pte, rflags};
use softplat::{Platform, Step};
use vcpu::{IrqLine, Kick, Regs, Result, SRegs, Segment, Vcpu, VcpuError, VcpuExit};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};
use x86::vmx::fields::{self as f, reason};
use x86::vmx::{ctl, VmFail};
use x86::{Cpu, CpuExit, CpuidTable};

/// Size of the VMM's private memory.
const PRIVATE_SIZE: u64 = 4 << 20;
/// Offsets in it.
const VMXON_REGION: u64 = 0;
const VMCS_REGION: u64 = 0x1000;
const IO_BITMAP_A: u64 = 0x2000;
const IO_BITMAP_B: u64 = 0x3000;
const MSR_BITMAP: u64 = 0x4000;
/// IA32_APIC_BASE: the global enable (bit 11).
const APIC_GLOBAL_ENABLE: u64 = 1 << 11;
const EPT_PML4: u64 = 0x5000;
/// The guest's virtual-processor identifier: its translations are tagged
/// with it and survive VM exits.
const VPID: u16 = 1;
/// EPT tables are allocated from here on.
const EPT_POOL: u64 = 0x6000;

/// EPT entry bits: read, write, execute, write-back memory type, 2 MiB page.
const EPT_RWX: u64 = 7;
const EPT_WB: u64 = 6 << 3;
const EPT_PS: u64 = 1 << 7;
const TWO_MB: u64 = 2 << 20;

const APIC_PAGE: u64 = 0xfee0_0000;
/// Interruption information: valid, #UD and #GP (hardware exceptions).
const INJECT_UD: u64 = 0x8000_0306;
const INJECT_GP: u64 = 0x8000_0b0d;

/// Instructions the CPU model's CPUID can advertise that VMX non-root
/// operation executes only with a secondary control set (#UD without it):
/// (leaf, subleaf, register 0..=3 for EAX..EDX, bit, control).
const CPUID_CONTROLS: [(u32, u32, usize, u32, u32); 3] = [
    (0x8000_0001, 0, 3, 27, ctl::ENABLE_RDTSCP),
    (7, 0, 1, 10, ctl::ENABLE_INVPCID),
    (0xd, 1, 0, 3, ctl::ENABLE_XSAVES),
];

/// The CPUID the guest is shown and the secondary controls it needs, derived
/// as KVM derives them: each instruction of [`CPUID_CONTROLS`] the model
/// advertises gets its control where the CPU's VMX allows it (`proc2_cap`,
/// IA32_VMX_PROCBASED_CTLS2) and is hidden where it does not. VMX itself is
/// not offered to the guest.
pub fn guest_cpuid(model: &CpuidTable, proc2_cap: u64) -> (CpuidTable, u32) {
    let mut shown = model.clone();
    let mut controls = 0;
    let mut clear = |leaf: u32, sub: u32, reg: usize, bit: u32| {
        if let Some(e) = shown
            .entries
            .iter_mut()
            .find(|e| e.function == leaf && e.index.is_none_or(|i| i == sub))
        {
            e.regs[reg] &= !(1 << bit);
        }
    };
    clear(1, 0, 2, 5); // VMX
    for (leaf, sub, reg, bit, control) in CPUID_CONTROLS {
        let (a, b, c, d) = model.query(leaf, sub);
        if [a, b, c, d][reg] & (1 << bit) == 0 {
            continue;
        }
        if (proc2_cap >> 32) as u32 & control != 0 {
            controls |= control;
        } else {
            clear(leaf, sub, reg, bit);
        }
    }
    (shown, controls)
}

/// Options of a `vmx` virtual machine.
#[derive(Clone, Copy, Debug, Default)]
pub struct VmxConfig {
    /// A local APIC (timer, vector lines); its interrupts are injected.
    pub irqchip: bool,
    /// visor's paravirtual CPUID leaves, as for `emu`.
    pub pv_signature: Option<[u8; 12]>,
    /// Log each VMX operation and each VM exit, decoded, on stderr.
    pub trace: bool,
    /// Print the VMCS, grouped by area, when the vCPU goes away.
    pub dump_vmcs: bool,
}

/// A `vmx` virtual machine: guest memory and the software platform.
pub struct VmxVm {
    mem: GuestMemoryMmap,
    platform: Arc<Platform>,
    config: VmxConfig,
}

impl VmxVm {
    pub fn new(mem: &GuestMemoryMmap, config: VmxConfig) -> Result<VmxVm> {
        Ok(VmxVm {
            mem: mem.clone(),
            platform: Arc::new(Platform::new(config.irqchip, true)),
            config,
        })
    }
}

impl vcpu::Vm for VmxVm {
    fn create_vcpu(&mut self, id: u32) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(VmxVcpu::new(self, id)?))
    }

    fn irq_line(&self, gsi: u32) -> Result<Option<Arc<dyn IrqLine>>> {
        Ok(self.platform.irq_line(gsi))
    }

    fn vector_line(&self, vector: u8) -> Result<Option<Arc<dyn IrqLine>>> {
        Ok(self.platform.apic_vector_line(vector))
    }
}

/// An exit the VMM completes at the next `run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    None,
    /// IN: `io` holds the bytes for AL/AX/EAX.
    In {
        size: u8,
    },
    /// RDMSR/WRMSR: `msr_data`/`msr_fault` hold the answer.
    Msr {
        write: bool,
    },
}

/// What is being single-stepped with the monitor trap flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stepping {
    None,
    /// String I/O with the ports passed through.
    Io {
        port: u16,
        size: u8,
    },
    /// An MMIO access with its page mapped through.
    Mmio {
        gpa: u64,
    },
}

/// What `run` returns, before borrowing the buffers.
pub enum Reply {
    IoIn { port: u16, size: u8 },
    IoOut { port: u16, size: u8 },
    MsrRead { index: u32 },
    MsrWrite { index: u32, value: u64 },
    Hlt,
    Shutdown,
    FailEntry(u64),
    Other(String),
}

pub struct VmxVcpu {
    cpu: Cpu,
    /// Guest memory plus the private memory (the CPU's physical memory).
    mem: GuestMemoryMmap,
    /// Base of the private memory.
    private: u64,
    /// Next free page of the EPT pool.
    ept_next: u64,
    /// The local APIC, and the PICs and the PIT, whose ports the engine
    /// answers (as `emu`).
    platform: Arc<Platform>,
    trace: bool,
    dump_vmcs: bool,
    /// The CPUID the guest is shown ([`guest_cpuid`]).
    shown: CpuidTable,
    /// Exit reasons (basic, below 128) whose first exit was dumped.
    dumped: u128,
    launched: bool,
    pending: Pending,
    stepping: Stepping,
    /// Vectors acknowledged on exit, waiting to be injected.
    irqs: VecDeque<u8>,
    io: [u8; 8],
    msr_data: u64,
    msr_fault: u8,
    /// The first VMREAD or VMWRITE of the VMM that failed.
    failed: std::cell::Cell<Option<(&'static str, u32, VmFail)>>,
}

fn vmx_error(what: &str, f: VmFail) -> VcpuError {
    VcpuError::Engine(format!("vmx: {what}: {f:?}"))
}

impl VmxVcpu {
    fn new(vm: &VmxVm, id: u32) -> Result<VmxVcpu> {
        let config = vm.config;
        let guest = &vm.mem;
        let private = (guest.last_addr().0 + 1).next_multiple_of(TWO_MB);
        let region =
            GuestRegionMmap::from_range(GuestAddress(private), PRIVATE_SIZE as usize, None)
                .map_err(|e| VcpuError::Engine(format!("vmx: private memory: {e}")))?;
        let mem = guest
            .insert_region(Arc::new(region))
            .map_err(|e| VcpuError::Engine(format!("vmx: private memory: {e}")))?;
        let cpuid = vm.platform.cpuid(id, config.pv_signature);
        let mut cpu = vm.platform.create_cpu(id, &mem, cpuid);
        cpu.vmx.trace = config.trace;
        cpu.vmx.stop_on_exit = true;
        let mut v = VmxVcpu {
            cpu,
            mem,
            private,
            ept_next: private + EPT_POOL,
            platform: vm.platform.clone(),
            trace: config.trace,
            dump_vmcs: config.dump_vmcs,
            shown: CpuidTable::default(),
            dumped: 0,
            launched: false,
            pending: Pending::None,
            stepping: Stepping::None,
            irqs: VecDeque::new(),
            io: [0; 8],
            msr_data: 0,
            msr_fault: 0,
            failed: std::cell::Cell::new(None),
        };
        v.enable_vmx()?;
        v.setup_vmcs()?;
        v.map_guest_memory()?;
        Ok(v)
    }

    fn log(&self, what: std::fmt::Arguments) {
        if self.trace {
            eprintln!("vmx: {what}");
        }
    }

    /// VMREAD of a field the VMM's own VMCS must have. A failure is a bug of
    /// this VMM: it is kept (the first one) and ends the run with an error at
    /// the next check ([`VmxVcpu::check`]); the read gives 0 meanwhile.
    fn vmread(&self, field: u32) -> u64 {
        let v = match self.cpu.vmread(field as u64) {
            Ok(v) => v,
            Err(e) => {
                self.fail(field, "vmread", e);
                0
            }
        };
        self.log(format_args!(
            "vmread {} -> {v:#x}",
            f::name(field).unwrap_or("?")
        ));
        v
    }

    fn vmwrite(&mut self, field: u32, v: u64) {
        self.log(format_args!(
            "vmwrite {} <- {v:#x}",
            f::name(field).unwrap_or("?")
        ));
        if let Err(e) = self.cpu.vmwrite(field as u64, v) {
            self.log(format_args!("vmwrite failed: {e:?}"));
            self.fail(field, "vmwrite", e);
        }
    }

    /// Keeps the first failed VMREAD/VMWRITE.
    fn fail(&self, field: u32, op: &'static str, e: VmFail) {
        if self.failed.get().is_none() {
            self.failed.set(Some((op, field, e)));
        }
    }

    /// An error if one of the VMM's VMREADs or VMWRITEs failed: the VMM's
    /// view of the guest is wrong, so the run must not go on.
    fn check(&self) -> Result<()> {
        match self.failed.get() {
            None => Ok(()),
            Some((op, field, e)) => Err(VcpuError::Engine(format!(
                "vmx: {op} of {} ({field:#x}) failed: {e:?}",
                f::name(field).unwrap_or("an unknown field")
            ))),
        }
    }

    fn write_private(&self, at: u64, bytes: &[u8]) -> Result<()> {
        self.mem
            .write_slice(bytes, GuestAddress(at))
            .map_err(|e| VcpuError::Engine(format!("vmx: private memory: {e}")))
    }

    fn read_private(&self, at: u64) -> u64 {
        self.mem.read_obj(GuestAddress(at)).unwrap_or(0)
    }

    /// The root-mode state VMXON needs (protected mode with paging, NE,
    /// CR4.VMXE, IA-32e mode), IA32_FEATURE_CONTROL, then VMXON, VMCLEAR and
    /// VMPTRLD.
    fn enable_vmx(&mut self) -> Result<()> {
        let code = Segment::flat(0x08, true, true, false);
        let data = Segment::flat(0x10, false, false, true);
        self.cpu.set_sregs(&SRegs {
            cs: code,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr: Segment::tss(0x18, 0, 0x67),
            ldt: Segment {
                unusable: true,
                ..Default::default()
            },
            cr0: cr0::PG | cr0::NE | cr0::ET | cr0::PE,
            cr4: cr4::PAE | cr4::VMXE,
            efer: efer::LME | efer::LMA,
            ..Default::default()
        });
        self.cpu.vmx.feature_control = feature_control::LOCK | feature_control::VMXON_OUTSIDE_SMX;
        let revision = self.cpu.vmx_msr(msr::VMX_BASIC).unwrap_or(0) as u32 & 0x7fff_ffff;
        for r in [VMXON_REGION, VMCS_REGION] {
            self.write_private(self.private + r, &revision.to_le_bytes())?;
        }
        let (vmxon, vmcs) = (self.private + VMXON_REGION, self.private + VMCS_REGION);
        self.cpu.vmxon(vmxon).map_err(|e| vmx_error("VMXON", e))?;
        self.log(format_args!("vmxon {vmxon:#x}"));
        self.cpu
            .vmclear(vmcs)
            .map_err(|e| vmx_error("VMCLEAR", e))?;
        self.log(format_args!("vmclear {vmcs:#x}"));
        self.cpu
            .vmptrld(vmcs)
            .map_err(|e| vmx_error("VMPTRLD", e))?;
        self.log(format_args!("vmptrld {vmcs:#x}"));
        Ok(())
    }

    /// `want` adjusted to a control capability MSR: its TRUE counterpart
    /// where IA32_VMX_BASIC bit 55 offers them (so default1 controls the
    /// VMM does not want, CR3-load/store exiting, stay clear, as KVM does
    /// with EPT).
    fn adjust(&self, msr: u32, want: u32) -> u32 {
        let basic = self.cpu.vmx_msr(msr::VMX_BASIC).unwrap_or(0);
        let msr = match msr {
            msr::VMX_PINBASED_CTLS..=msr::VMX_ENTRY_CTLS if basic & (1 << 55) != 0 => {
                msr + (msr::VMX_TRUE_PINBASED_CTLS - msr::VMX_PINBASED_CTLS)
            }
            m => m,
        };
        let cap = self.cpu.vmx_msr(msr).unwrap_or(0);
        (want | cap as u32) & (cap >> 32) as u32
    }

    fn setup_vmcs(&mut self) -> Result<()> {
        let pin = self.adjust(
            msr::VMX_PINBASED_CTLS,
            if self.platform.has_lapic() {
                ctl::EXT_INTR_EXITING
            } else {
                0
            },
        );
        let proc = self.adjust(
            msr::VMX_PROCBASED_CTLS,
            ctl::HLT_EXITING | ctl::USE_IO_BITMAPS | ctl::USE_MSR_BITMAPS | ctl::ACTIVATE_SECONDARY,
        );
        let proc2_cap = self.cpu.vmx_msr(msr::VMX_PROCBASED_CTLS2).unwrap_or(0);
        let (shown, needed) = guest_cpuid(&self.cpu.cpuid, proc2_cap);
        self.shown = shown;
        let proc2 = self.adjust(
            msr::VMX_PROCBASED_CTLS2,
            ctl::ENABLE_EPT | ctl::ENABLE_VPID | ctl::UNRESTRICTED_GUEST | needed,
        );
        let exit = self.adjust(
            msr::VMX_EXIT_CTLS,
            ctl::HOST_ADDR_SPACE_SIZE | ctl::ACK_INTR_ON_EXIT | ctl::SAVE_EFER,
        );
        let entry = self.adjust(msr::VMX_ENTRY_CTLS, ctl::LOAD_GUEST_EFER);
        // Every port exits; no MSR in the bitmaps' ranges does (the CPU
        // implements them), the others exit.
        self.write_private(self.private + IO_BITMAP_A, &[0xff; 0x2000])?;
        self.write_private(self.private + MSR_BITMAP, &[0; 0x1000])?;
        let p = self.private;
        let fields: [(u32, u64); 32] = [
            (f::PIN_BASED_VM_EXEC_CONTROL, pin as u64),
            (f::CPU_BASED_VM_EXEC_CONTROL, proc as u64),
            (f::SECONDARY_VM_EXEC_CONTROL, proc2 as u64),
            (f::VM_EXIT_CONTROLS, exit as u64),
            (f::VM_ENTRY_CONTROLS, entry as u64),
            (f::EXCEPTION_BITMAP, 0),
            (f::IO_BITMAP_A, p + IO_BITMAP_A),
            (f::IO_BITMAP_B, p + IO_BITMAP_B),
            (f::MSR_BITMAP, p + MSR_BITMAP),
            (f::EPT_POINTER, (p + EPT_PML4) | 6 | (3 << 3)),
            (f::VIRTUAL_PROCESSOR_ID, VPID as u64),
            (f::VMCS_LINK_POINTER, u64::MAX),
            (f::HOST_CR0, self.cpu.cr0),
            (f::HOST_CR3, 0),
            (f::HOST_CR4, self.cpu.cr4),
            (f::HOST_CS_SELECTOR, 0x08),
            (f::HOST_SS_SELECTOR, 0x10),
            (f::HOST_DS_SELECTOR, 0x10),
            (f::HOST_ES_SELECTOR, 0x10),
            (f::HOST_FS_SELECTOR, 0x10),
            (f::HOST_GS_SELECTOR, 0x10),
            (f::HOST_TR_SELECTOR, 0x18),
            (f::HOST_IA32_EFER, self.cpu.sregs().efer),
            (f::HOST_RIP, 0),
            (f::HOST_RSP, 0),
            (f::GUEST_DR7, 0x400),
            (f::GUEST_ACTIVITY_STATE, 0),
            (f::GUEST_INTERRUPTIBILITY_INFO, 0),
            (f::GUEST_RFLAGS, 2),
            (f::CR0_GUEST_HOST_MASK, 0),
            (f::CR4_GUEST_HOST_MASK, 0),
            (f::CR3_TARGET_COUNT, 0),
        ];
        for (field, v) in fields {
            self.vmwrite(field, v);
        }
        Ok(())
    }

    /// A zeroed page of the EPT pool.
    fn ept_page(&mut self) -> Result<u64> {
        let at = self.ept_next;
        if at + 0x1000 > self.private + PRIVATE_SIZE {
            return Err(VcpuError::Engine("vmx: EPT pool exhausted".into()));
        }
        self.ept_next += 0x1000;
        self.write_private(at, &[0; 0x1000])?;
        Ok(at)
    }

    /// The EPT table entry address for `gpa` at `level` (0: PTE, 1: PDE),
    /// allocating the tables above it.
    fn ept_slot(&mut self, gpa: u64, level: u32) -> Result<u64> {
        let mut table = self.private + EPT_PML4;
        for l in (level + 1..4).rev() {
            let at = table + ((gpa >> (12 + 9 * l)) & 0x1ff) * 8;
            let e = self.read_private(at);
            table = if e & EPT_RWX != 0 {
                e & pte::ADDR
            } else {
                let t = self.ept_page()?;
                self.write_private(at, &(t | EPT_RWX).to_le_bytes())?;
                t
            };
        }
        Ok(table + ((gpa >> (12 + 9 * level)) & 0x1ff) * 8)
    }

    /// Maps guest-physical page `gpa` (4 KiB) to the same host-physical
    /// address with `perm`, or unmaps it (`perm` 0).
    fn ept_map_4k(&mut self, gpa: u64, perm: u64) -> Result<()> {
        let at = self.ept_slot(gpa, 0)?;
        let e = if perm == 0 { 0 } else { gpa | perm | EPT_WB };
        self.write_private(at, &e.to_le_bytes())
    }

    /// EPT identity-maps guest RAM (2 MiB pages where a whole 2 MiB is RAM)
    /// and, with a local APIC, its page (and the I/O APIC's); everything
    /// else is MMIO.
    fn map_guest_memory(&mut self) -> Result<()> {
        self.write_private(self.private + EPT_PML4, &[0; 0x1000])?;
        let ranges: Vec<(u64, u64)> = self
            .mem
            .iter()
            .map(|r| (r.start_addr().0, r.start_addr().0 + r.len()))
            .filter(|&(s, _)| s < self.private)
            .collect();
        for (start, end) in ranges {
            let mut a = start;
            while a < end {
                if a % TWO_MB == 0 && a + TWO_MB <= end {
                    let at = self.ept_slot(a, 1)?;
                    self.write_private(at, &(a | EPT_RWX | EPT_WB | EPT_PS).to_le_bytes())?;
                    a += TWO_MB;
                } else {
                    self.ept_map_4k(a, EPT_RWX)?;
                    a += 0x1000;
                }
            }
        }
        if self.platform.has_lapic() {
            self.ept_map_4k(APIC_PAGE, 3)?;
        }
        if self.platform.legacy().is_some() {
            // The I/O APIC, answered by the CPU's local device as the APIC.
            self.ept_map_4k(softplat::ioapic::IOAPIC_BASE, 3)?;
        }
        Ok(())
    }

    fn gpr(&self, n: u64) -> u64 {
        if n == 4 {
            self.vmread(f::GUEST_RSP)
        } else {
            self.cpu.gpr[n as usize & 15]
        }
    }

    fn set_gpr(&mut self, n: u64, v: u64) {
        if n == 4 {
            self.vmwrite(f::GUEST_RSP, v);
        } else {
            self.cpu.gpr[n as usize & 15] = v;
        }
    }

    /// Moves the guest past the instruction that exited (STI/MOV-SS blocking
    /// ends with it).
    fn skip_instruction(&mut self) {
        let rip = self.vmread(f::GUEST_RIP) + self.vmread(f::VM_EXIT_INSTRUCTION_LEN);
        self.vmwrite(f::GUEST_RIP, rip);
        let intr = self.vmread(f::GUEST_INTERRUPTIBILITY_INFO);
        if intr & 3 != 0 {
            self.vmwrite(f::GUEST_INTERRUPTIBILITY_INFO, intr & !3);
        }
    }

    /// Completes the exit the VMM answered.
    fn complete_pending(&mut self) {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::None => {}
            Pending::In { size } => {
                let mut b = [0u8; 8];
                b[..size as usize].copy_from_slice(&self.io[..size as usize]);
                let v = u64::from_le_bytes(b);
                let rax = self.cpu.gpr[0];
                self.cpu.gpr[0] = match size {
                    1 => (rax & !0xff) | v,
                    2 => (rax & !0xffff) | v,
                    _ => v & 0xffff_ffff,
                };
                self.skip_instruction();
            }
            Pending::Msr { write } => {
                if self.msr_fault != 0 {
                    self.vmwrite(f::VM_ENTRY_INTR_INFO_FIELD, INJECT_GP);
                    self.vmwrite(f::VM_ENTRY_EXCEPTION_ERROR_CODE, 0);
                    return;
                }
                if !write {
                    self.cpu.gpr[0] = self.msr_data & 0xffff_ffff;
                    self.cpu.gpr[2] = self.msr_data >> 32;
                }
                self.skip_instruction();
            }
        }
    }

    /// Injects the next acknowledged interrupt if the guest can take it,
    /// else asks for an interrupt-window exit.
    fn inject_interrupt(&mut self) {
        let proc = self.vmread(f::CPU_BASED_VM_EXEC_CONTROL) as u32;
        if let Some(&v) = self.irqs.front() {
            let open = self.vmread(f::GUEST_RFLAGS) & rflags::IF != 0
                && self.vmread(f::GUEST_INTERRUPTIBILITY_INFO) & 3 == 0
                && self.vmread(f::VM_ENTRY_INTR_INFO_FIELD) & (1 << 31) == 0;
            if open {
                self.irqs.pop_front();
                self.vmwrite(f::VM_ENTRY_INTR_INFO_FIELD, 0x8000_0000 | v as u64);
                self.vmwrite(f::GUEST_ACTIVITY_STATE, 0);
            }
        }
        let want = if self.irqs.is_empty() {
            proc & !ctl::INTR_WINDOW_EXITING
        } else {
            proc | ctl::INTR_WINDOW_EXITING
        };
        if want != proc {
            self.vmwrite(f::CPU_BASED_VM_EXEC_CONTROL, want as u64);
        }
    }

    /// VMLAUNCH or VMRESUME; a `Reply` if the entry failed.
    fn enter(&mut self) -> Option<Reply> {
        self.inject_interrupt();
        let r = self.cpu.vm_entry(!self.launched);
        self.log(format_args!(
            "{} -> {r:?}",
            if self.launched {
                "vmresume"
            } else {
                "vmlaunch"
            }
        ));
        if let Err(e) = r {
            let n = match e {
                VmFail::Valid(n) => n as u64,
                VmFail::Invalid => 0,
            };
            return Some(Reply::FailEntry(n));
        }
        if self.cpu.take_vm_exit() {
            return Some(Reply::FailEntry(self.vmread(f::VM_EXIT_REASON)));
        }
        self.launched = true;
        None
    }

    /// Single-steps the exiting instruction with the monitor trap flag.
    fn single_step(&mut self, s: Stepping) {
        self.stepping = s;
        let proc = self.vmread(f::CPU_BASED_VM_EXEC_CONTROL) as u32;
        self.vmwrite(
            f::CPU_BASED_VM_EXEC_CONTROL,
            (proc | ctl::MONITOR_TRAP_FLAG) as u64,
        );
    }

    /// Sets or clears the I/O-bitmap bits of `size` ports at `port`.
    fn io_bitmap(&mut self, port: u16, size: u8, exit: bool) -> Result<()> {
        for p in port as u32..port as u32 + size as u32 {
            let p = p & 0xffff;
            let at = self.private + IO_BITMAP_A + (p / 8) as u64;
            let mut b = [0u8];
            let _ = self.mem.read_slice(&mut b, GuestAddress(at));
            let bit = 1 << (p & 7);
            b[0] = if exit { b[0] | bit } else { b[0] & !bit };
            self.write_private(at, &b)?;
        }
        Ok(())
    }

    /// The single-stepped instruction completed: the pass-through ends.
    fn end_single_step(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.stepping, Stepping::None) {
            Stepping::Io { port, size } => self.io_bitmap(port, size, true)?,
            Stepping::Mmio { gpa } => {
                self.ept_map_4k(gpa, 0)?;
                let _ = self.cpu.invept(2, 0);
            }
            Stepping::None => {}
        }
        let proc = self.vmread(f::CPU_BASED_VM_EXEC_CONTROL) as u32;
        self.vmwrite(
            f::CPU_BASED_VM_EXEC_CONTROL,
            (proc & !ctl::MONITOR_TRAP_FLAG) as u64,
        );
        Ok(())
    }

    /// The guest's CR0 went from `old` to `new` through the VMM: turning
    /// paging on with EFER.LME enters IA-32e mode (EFER.LMA and the entry
    /// control), turning it off leaves it, as the CPU does for a MOV to CR0.
    fn paging_changed(&mut self, old: u64, new: u64) {
        let (was, now) = (old & cr0::PG != 0, new & cr0::PG != 0);
        if was == now {
            return;
        }
        let e = self.vmread(f::GUEST_IA32_EFER);
        let lma = now && e & efer::LME != 0;
        self.vmwrite(
            f::GUEST_IA32_EFER,
            if lma { e | efer::LMA } else { e & !efer::LMA },
        );
        let entry = self.vmread(f::VM_ENTRY_CONTROLS) as u32 & !ctl::IA32E_MODE_GUEST;
        let ia32e = if lma { ctl::IA32E_MODE_GUEST } else { 0 };
        self.vmwrite(f::VM_ENTRY_CONTROLS, (entry | ia32e) as u64);
    }

    /// Handles the VM exit that just happened: None to resume the guest.
    fn handle_exit(&mut self) -> Result<Option<Reply>> {
        let why = self.vmread(f::VM_EXIT_REASON) as u32;
        let qual = self.vmread(f::EXIT_QUALIFICATION);
        let basic = why & 0xffff;
        if self.dump_vmcs && basic < 128 && self.dumped & (1 << basic) == 0 {
            // `--dump-vmcs`: the VMCS at the first exit of each reason.
            self.dumped |= 1 << basic;
            eprint!(
                "vmx: VMCS at the first {} exit\n{}",
                reason::name(basic),
                self.cpu.dump_vmcs()
            );
        }
        Ok(match basic {
            reason::CPUID => {
                let (leaf, sub) = (self.cpu.gpr[0] as u32, self.cpu.gpr[1] as u32);
                let (a, b, c, mut d) = self.shown.query(leaf, sub);
                // CPUID.1:EDX.APIC follows IA32_APIC_BASE's global enable
                // (SDM vol. 3 10.4.3), as KVM updates it at run time; the
                // guest's WRMSR to it does not exit (the MSR bitmap), so
                // the CPU holds the guest's value.
                if leaf == 1 && self.cpu.msr.apic_base & APIC_GLOBAL_ENABLE == 0 {
                    d &= !x86::model::leaf1_edx::APIC;
                }
                for (n, v) in [(0, a), (3, b), (1, c), (2, d)] {
                    self.cpu.gpr[n] = v as u64;
                }
                self.skip_instruction();
                None
            }
            reason::HLT => {
                self.skip_instruction();
                if self.platform.has_lapic() && self.vmread(f::GUEST_RFLAGS) & rflags::IF != 0 {
                    // Wait in the HLT activity state for an interrupt.
                    self.vmwrite(f::GUEST_ACTIVITY_STATE, 1);
                    None
                } else {
                    Some(Reply::Hlt)
                }
            }
            reason::IO_INSTRUCTION => {
                let port = (qual >> 16) as u16;
                let size = (qual & 7) as u8 + 1;
                let input = qual & 8 != 0;
                let legacy = self
                    .platform
                    .legacy()
                    .cloned()
                    .filter(|_| softplat::legacy::claims_port(port));
                if qual & 16 != 0 {
                    self.io_bitmap(port, size, false)?;
                    self.single_step(Stepping::Io { port, size });
                    None
                } else if let Some(l) = legacy {
                    // The PICs and the PIT answer inside the engine.
                    let n = size as usize;
                    if !input {
                        self.io = self.cpu.gpr[0].to_le_bytes();
                    }
                    l.lock().unwrap_or_else(|p| p.into_inner()).transfer(
                        port,
                        n,
                        &mut self.io[..n],
                        input,
                    );
                    if input {
                        self.pending = Pending::In { size };
                        self.complete_pending();
                    } else {
                        self.skip_instruction();
                    }
                    None
                } else if input {
                    self.io = [0xff; 8];
                    self.pending = Pending::In { size };
                    Some(Reply::IoIn { port, size })
                } else {
                    self.io = self.cpu.gpr[0].to_le_bytes();
                    self.skip_instruction();
                    Some(Reply::IoOut { port, size })
                }
            }
            reason::MSR_READ | reason::MSR_WRITE => {
                let write = why & 0xffff == reason::MSR_WRITE;
                let index = self.cpu.gpr[1] as u32;
                self.pending = Pending::Msr { write };
                self.msr_data = 0;
                self.msr_fault = 0;
                Some(if write {
                    let value = (self.cpu.gpr[2] << 32) | (self.cpu.gpr[0] & 0xffff_ffff);
                    Reply::MsrWrite { index, value }
                } else {
                    Reply::MsrRead { index }
                })
            }
            reason::EPT_VIOLATION => {
                let gpa = self.vmread(f::GUEST_PHYSICAL_ADDRESS) & !0xfff;
                self.ept_map_4k(gpa, EPT_RWX)?;
                self.single_step(Stepping::Mmio { gpa });
                None
            }
            reason::MONITOR_TRAP_FLAG => {
                self.end_single_step()?;
                None
            }
            reason::EXTERNAL_INTERRUPT => {
                let info = self.vmread(f::VM_EXIT_INTR_INFO);
                if info & (1 << 31) != 0 {
                    self.irqs.push_back(info as u8);
                }
                None
            }
            reason::INTERRUPT_WINDOW => None,
            reason::TRIPLE_FAULT => Some(Reply::Shutdown),
            reason::VMCALL => {
                // The hypercall instruction: the VMM's hypercall port.
                let n = self.cpu.gpr[0] & 0xffff_ffff;
                self.log(format_args!("hypercall {n} ({})", hypercall::name(n)));
                self.io = self.cpu.gpr[0].to_le_bytes();
                self.skip_instruction();
                Some(Reply::IoOut {
                    port: hypercall::HYPERCALL_PORT as u16,
                    size: 4,
                })
            }
            reason::CR_ACCESS => {
                let (cr, kind, gpr) = (qual & 15, (qual >> 4) & 3, (qual >> 8) & 15);
                match (cr, kind) {
                    (0, 0) => {
                        // MOV to CR0 that changes NE against the shadow:
                        // the guest's value in the shadow, NE kept set.
                        let v = self.gpr(gpr) & 0xffff_ffff;
                        if v & cr0::PG != 0 && v & cr0::PE == 0 {
                            self.vmwrite(f::VM_ENTRY_INTR_INFO_FIELD, INJECT_GP);
                            self.vmwrite(f::VM_ENTRY_EXCEPTION_ERROR_CODE, 0);
                            return Ok(None);
                        }
                        let old = self.vmread(f::GUEST_CR0);
                        self.vmwrite(f::GUEST_CR0, v | cr0::ET | cr0::NE);
                        self.vmwrite(f::CR0_READ_SHADOW, v);
                        self.paging_changed(old, v);
                    }
                    (3, 0) => {
                        let width = self.cpu.phys_bits();
                        let v = self.gpr(gpr) & ((1 << width) - 1);
                        self.vmwrite(f::GUEST_CR3, v);
                    }
                    (4, 0) => {
                        // Setting CR4.VMXE: VMX is not offered.
                        self.vmwrite(f::VM_ENTRY_INTR_INFO_FIELD, INJECT_GP);
                        self.vmwrite(f::VM_ENTRY_EXCEPTION_ERROR_CODE, 0);
                        return Ok(None);
                    }
                    (3, 1) => {
                        let v = self.vmread(f::GUEST_CR3);
                        self.set_gpr(gpr, v);
                    }
                    _ => return Ok(Some(Reply::Other(format!("CR access {qual:#x}")))),
                }
                self.skip_instruction();
                None
            }
            reason::INVD => {
                self.skip_instruction();
                None
            }
            reason::VMCLEAR..=reason::VMXON | reason::INVEPT | reason::INVVPID => {
                // VMX is not offered to the guest.
                self.vmwrite(f::VM_ENTRY_INTR_INFO_FIELD, INJECT_UD);
                None
            }
            _ => Some(Reply::Other(format!(
                "VM exit {} ({}), qualification {qual:#x}",
                why,
                reason::name(why)
            ))),
        })
    }

    fn out(&mut self, o: Reply) -> VcpuExit<'_> {
        match o {
            Reply::IoIn { port, size } => VcpuExit::IoIn {
                port,
                size,
                data: &mut self.io[..size as usize],
            },
            Reply::IoOut { port, size } => VcpuExit::IoOut {
                port,
                size,
                data: &self.io[..size as usize],
            },
            Reply::MsrRead { index } => VcpuExit::MsrRead {
                index,
                data: &mut self.msr_data,
                fault: &mut self.msr_fault,
            },
            Reply::MsrWrite { index, value } => VcpuExit::MsrWrite {
                index,
                value,
                fault: &mut self.msr_fault,
            },
            Reply::Hlt => VcpuExit::Hlt,
            Reply::Shutdown => VcpuExit::Shutdown,
            Reply::FailEntry(reason) => VcpuExit::FailEntry { reason },
            Reply::Other(reason) => VcpuExit::Other { reason },
        }
    }
}

impl softplat::Engine for VmxVcpu {
    type Reply = Reply;

    fn cpu(&mut self) -> &mut Cpu {
        &mut self.cpu
    }

    fn platform(&self) -> &Platform {
        &self.platform
    }

    /// VM entry (launch or resume) when the CPU is in root mode.
    fn prepare(&mut self) -> Step<Reply> {
        if let Err(e) = self.check() {
            return Step::Fail(e);
        }
        if !self.cpu.vmx.non_root {
            if let Some(o) = self.enter() {
                return Step::Reply(o);
            }
        }
        Step::Run
    }

    fn exit(&mut self, exit: CpuExit) -> Step<Reply> {
        match exit {
            CpuExit::VmExit => match self.handle_exit().and_then(|o| self.check().map(|()| o)) {
                Ok(Some(o)) => Step::Reply(o),
                Ok(None) => Step::Run,
                Err(e) => Step::Fail(e),
            },
            // The guest waits in the HLT activity state.
            CpuExit::Hlt if self.platform.has_lapic() => Step::Wait,
            e => Step::Common(e),
        }
    }

    fn reply(&mut self, reply: Reply) -> VcpuExit<'_> {
        self.out(reply)
    }
}

impl Vcpu for VmxVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        self.complete_pending();
        softplat::run(self)
    }

    fn kick(&self) -> Arc<Kick> {
        self.platform.kick()
    }

    fn memory_written(&mut self, gpa: u64, len: u64) {
        self.cpu.external_write(gpa, len);
    }

    fn set_guest_debug(&mut self, debug: &vcpu::GuestDebug) -> Result<()> {
        self.cpu.set_guest_debug(debug);
        Ok(())
    }

    fn time_paused(&mut self, paused: std::time::Duration) {
        self.cpu.time_paused(paused);
    }

    /// `vmcs`: the VMCS decoded by area, as `--dump-vmcs` prints it.
    fn debug_info(&mut self, what: &str) -> Option<String> {
        if what != "vmcs" {
            return softplat::debug_info(self, what);
        }
        Some(self.cpu.dump_vmcs())
    }

    fn regs(&self) -> Result<Regs> {
        let mut r = self.cpu.regs();
        if !self.cpu.vmx.non_root {
            r.rsp = self.vmread(f::GUEST_RSP);
            r.rip = self.vmread(f::GUEST_RIP);
            r.rflags = self.vmread(f::GUEST_RFLAGS);
        }
        self.check().map(|()| r)
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<()> {
        if self.cpu.vmx.non_root {
            self.cpu.set_regs(regs);
            return Ok(());
        }
        let (rip, rsp) = (self.cpu.rip, self.cpu.gpr[4]);
        self.cpu.set_regs(&Regs { rip, rsp, ..*regs });
        if regs.rip != self.vmread(f::GUEST_RIP) {
            // Another instruction: what the old one waited for is void.
            self.pending = Pending::None;
        }
        self.vmwrite(f::GUEST_RSP, regs.rsp);
        self.vmwrite(f::GUEST_RIP, regs.rip);
        self.vmwrite(f::GUEST_RFLAGS, regs.rflags | 2);
        self.check()
    }

    fn sregs(&self) -> Result<SRegs> {
        let vmxe = cr4::VMXE;
        if self.cpu.vmx.non_root {
            // The live state: CR4.VMXE as the guest reads it.
            let mut s = self.cpu.sregs();
            s.cr4 = (s.cr4 & !vmxe) | (self.vmread(f::CR4_READ_SHADOW) & vmxe);
            s.cr0 = (s.cr0 & !cr0::NE) | (self.vmread(f::CR0_READ_SHADOW) & cr0::NE);
            return Ok(s);
        }
        let seg = |k: u32| {
            let (sel, base, limit, ar) = x86::vmx::guest_seg_fields(k);
            x86::vmx::segment(
                self.vmread(sel) as u16,
                self.vmread(base),
                self.vmread(limit) as u32,
                self.vmread(ar) as u32,
            )
        };
        self.check()?;
        Ok(SRegs {
            es: seg(0),
            cs: seg(1),
            ss: seg(2),
            ds: seg(3),
            fs: seg(4),
            gs: seg(5),
            ldt: seg(6),
            tr: seg(7),
            gdt: vcpu::DescriptorTable {
                base: self.vmread(f::GUEST_GDTR_BASE),
                limit: self.vmread(f::GUEST_GDTR_LIMIT) as u16,
            },
            idt: vcpu::DescriptorTable {
                base: self.vmread(f::GUEST_IDTR_BASE),
                limit: self.vmread(f::GUEST_IDTR_LIMIT) as u16,
            },
            cr0: (self.vmread(f::GUEST_CR0) & !cr0::NE)
                | (self.vmread(f::CR0_READ_SHADOW) & cr0::NE),
            cr2: self.cpu.cr2,
            cr3: self.vmread(f::GUEST_CR3),
            cr4: self.vmread(f::GUEST_CR4) & !cr4::VMXE,
            cr8: self.cpu.cr8,
            efer: self.vmread(f::GUEST_IA32_EFER),
        })
    }

    fn set_sregs(&mut self, s: &SRegs) -> Result<()> {
        if self.cpu.vmx.non_root {
            self.cpu.set_sregs(&SRegs {
                cr0: s.cr0 | cr0::NE,
                cr4: s.cr4 | cr4::VMXE,
                ..*s
            });
            self.vmwrite(f::CR4_READ_SHADOW, s.cr4);
            self.vmwrite(f::CR0_READ_SHADOW, s.cr0);
            return Ok(());
        }
        let segs = [s.es, s.cs, s.ss, s.ds, s.fs, s.gs, s.ldt, s.tr];
        for (k, sg) in segs.iter().enumerate() {
            let (sel, base, limit, ar) = x86::vmx::guest_seg_fields(k as u32);
            let mut sg = *sg;
            if !sg.unusable && sg.s {
                sg.type_ |= 1; // loaded segments are accessed
            }
            self.vmwrite(sel, sg.selector as u64);
            self.vmwrite(base, sg.base);
            self.vmwrite(limit, sg.limit as u64);
            self.vmwrite(ar, x86::vmx::access_rights(&sg) as u64);
        }
        let fields = [
            (f::GUEST_GDTR_BASE, s.gdt.base),
            (f::GUEST_GDTR_LIMIT, s.gdt.limit as u64),
            (f::GUEST_IDTR_BASE, s.idt.base),
            (f::GUEST_IDTR_LIMIT, s.idt.limit as u64),
            (f::GUEST_CR0, s.cr0 | cr0::ET | cr0::NE),
            (f::GUEST_CR3, s.cr3),
            (f::GUEST_CR4, s.cr4 | cr4::VMXE),
            (f::GUEST_IA32_EFER, s.efer),
        ];
        for (field, v) in fields {
            self.vmwrite(field, v);
        }
        let entry = self.vmread(f::VM_ENTRY_CONTROLS) as u32 & !ctl::IA32E_MODE_GUEST;
        let lma = s.efer & efer::LMA != 0;
        let ia32e = if lma { ctl::IA32E_MODE_GUEST } else { 0 };
        self.vmwrite(f::VM_ENTRY_CONTROLS, (entry | ia32e) as u64);
        // CR4.VMXE is the VMM's: the guest reads its own value. So is
        // CR0.NE, which VMX operation needs set (a Multiboot kernel starts
        // with it clear), as KVM keeps it.
        self.vmwrite(f::CR4_GUEST_HOST_MASK, cr4::VMXE);
        self.vmwrite(f::CR4_READ_SHADOW, s.cr4);
        self.vmwrite(f::CR0_GUEST_HOST_MASK, cr0::NE);
        self.vmwrite(f::CR0_READ_SHADOW, s.cr0);
        self.cpu.cr2 = s.cr2;
        self.cpu.cr8 = s.cr8 & 0xf;
        self.check()
    }

    /// In VMX non-root operation the CPU's TLB is the guest's. Otherwise the
    /// guest's translations are stored under its VPID and come back at the
    /// next VM entry: the VMM drops them with INVVPID (single context), as a
    /// VT-x hypervisor does after it changed the guest's page tables.
    fn flush_tlb(&mut self) -> Result<()> {
        if self.cpu.vmx.non_root {
            self.cpu.flush_tlb(true);
            return Ok(());
        }
        self.log(format_args!("invvpid single-context {VPID}"));
        self.cpu
            .invvpid(1, VPID as u64, 0)
            .map_err(|e| vmx_error("INVVPID", e))
    }

    fn engine_counters(&self) -> Vec<(String, u64)> {
        let mut v = vec![("guest_instructions".to_string(), self.cpu.retired)];
        for (k, &n) in self.cpu.vmx.exit_counts.iter().enumerate() {
            if n != 0 {
                v.push((format!("vmx_exits/{}", reason::name(k as u32)), n));
            }
        }
        v
    }
}

impl Drop for VmxVcpu {
    fn drop(&mut self) {
        if self.dump_vmcs {
            eprint!("{}", self.cpu.dump_vmcs());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;
    use vcpu::Vm as _;

    const CODE: u64 = 0x10_0000;
    const IDT: u64 = 0x8000;

    /// A 64-bit guest with a local APIC: `sti; hlt` waits in the HLT
    /// activity state; a vector line's interrupt exits (acknowledged on
    /// exit) and is injected; the handler's OUT comes back as an exit. The
    /// counters name the VMX exit reasons.
    #[test]
    fn interrupt_injected_into_a_halted_guest() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let mut sregs = machine::boot::long_mode(&mem).unwrap();
        sregs.idt = vcpu::DescriptorTable {
            base: IDT,
            limit: 0xfff,
        };
        let handler = CODE + 0x100;
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(rbx, APIC_PAGE).unwrap();
        a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap(); // enable the APIC
        a.sti().unwrap();
        a.hlt().unwrap();
        a.ud2().unwrap();
        mem.write_slice(&a.assemble(CODE).unwrap(), GuestAddress(CODE))
            .unwrap();
        let mut h = CodeAssembler::new(64).unwrap();
        h.mov(dword_ptr(rbx + 0xb0), 0).unwrap(); // EOI
        h.mov(eax, 0x77u32).unwrap();
        h.out(0x80, al).unwrap();
        h.hlt().unwrap();
        mem.write_slice(&h.assemble(handler).unwrap(), GuestAddress(handler))
            .unwrap();
        let gate = (handler & 0xffff)
            | (0x10 << 16)
            | (0x8e00u64 << 32)
            | ((handler >> 16 & 0xffff) << 48);
        mem.write_obj(gate, GuestAddress(IDT + 0x50 * 16)).unwrap();

        let config = VmxConfig {
            irqchip: true,
            ..Default::default()
        };
        let mut vm = VmxVm::new(&mem, config).unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let mut regs = Regs::default();
        (regs.rip, regs.rsp, regs.rflags) = (CODE, 0x8_0000, 2);
        vcpu.set_sregs(&sregs).unwrap();
        vcpu.set_regs(&regs).unwrap();
        assert_eq!(vcpu.sregs().unwrap().cr4 & cr4::VMXE, 0);
        let line = vm.vector_line(0x50).unwrap().expect("a vector line");
        // The guest halts first; the line rises later, from another thread.
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(40));
            line.trigger().unwrap();
        });
        let mut n = 0;
        loop {
            match vcpu.run().unwrap() {
                VcpuExit::Interrupted => {
                    n += 1;
                    assert!(n < 500, "the interrupt never came");
                }
                VcpuExit::IoOut { port, data, .. } => {
                    assert_eq!((port, data.to_vec()), (0x80, vec![0x77]));
                    break;
                }
                e => panic!("unexpected exit {e:?}"),
            }
        }
        t.join().unwrap();
        let counters = vcpu.engine_counters();
        let count = |name: &str| {
            counters
                .iter()
                .find(|c| c.0 == format!("vmx_exits/{name}"))
                .map_or(0, |c| c.1)
        };
        assert_eq!(count("HLT"), 1);
        assert_eq!(count("EXTERNAL_INTERRUPT"), 1);
        assert_eq!(count("IO_INSTRUCTION"), 1);
        assert_eq!(count("EPT_VIOLATION"), 0, "the APIC page is mapped");
        assert_eq!(vcpu.regs().unwrap().rip, handler + 17, "past the OUT");
    }

    /// A VMWRITE of the VMM that fails (a field no VMCS has) ends the run
    /// with an error naming it, instead of going on with a wrong VMCS.
    #[test]
    fn failed_vmwrite_ends_the_run() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let vm = VmxVm::new(&mem, VmxConfig::default()).unwrap();
        let mut v = VmxVcpu::new(&vm, 0).unwrap();
        v.set_sregs(&machine::boot::long_mode(&mem).unwrap())
            .unwrap();
        v.vmwrite(0x7fff_fffe, 1);
        let e = v.run().map(|x| x.name()).unwrap_err().to_string();
        assert!(e.contains("vmwrite") && e.contains("0x7ffffffe"), "{e}");
        assert!(v.regs().is_err(), "the state is not trusted either");
    }

    /// The secondary controls come from the CPUID the guest is shown: an
    /// advertised instruction gets its control where the VMX capability MSR
    /// allows it and is hidden where it does not; VMX is never shown.
    #[test]
    fn controls_follow_the_shown_cpuid() {
        let mut model = CpuidTable::software_cpu(true, None);
        model.set(7, Some(0), [0, 1 << 10, 0, 0]); // INVPCID
        model.set(0xd, Some(1), [1 << 3, 0, 0, 0]); // XSAVES
        let cap = ((ctl::ENABLE_EPT | ctl::ENABLE_RDTSCP | ctl::ENABLE_INVPCID) as u64) << 32;
        let (shown, controls) = guest_cpuid(&model, cap);
        assert_eq!(controls, ctl::ENABLE_RDTSCP | ctl::ENABLE_INVPCID);
        assert_ne!(shown.query(0x8000_0001, 0).3 & (1 << 27), 0, "RDTSCP");
        assert_ne!(shown.query(7, 0).1 & (1 << 10), 0, "INVPCID");
        assert_eq!(shown.query(0xd, 1).0 & (1 << 3), 0, "XSAVES hidden");
        assert_eq!(shown.query(1, 0).2 & (1 << 5), 0, "VMX hidden");
        // Without the RDTSCP control the guest is not told about RDTSCP.
        let (shown, controls) = guest_cpuid(&model, 0);
        assert_eq!(controls, 0);
        assert_eq!(shown.query(0x8000_0001, 0).3 & (1 << 27), 0);
        // The engine's own CPU: RDTSCP advertised and enabled.
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let vm = VmxVm::new(&mem, VmxConfig::default()).unwrap();
        let v = VmxVcpu::new(&vm, 0).unwrap();
        let proc2 = v.vmread(f::SECONDARY_VM_EXEC_CONTROL) as u32;
        assert_ne!(proc2 & ctl::ENABLE_RDTSCP, 0);
    }
}
