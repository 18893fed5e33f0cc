//! Engine `kvm`: the guest runs on the host CPU under VT-x/AMD-V through Linux KVM.
//! visor's VMM sees only the exits KVM does not handle in the host kernel
//! (port I/O, MMIO, HLT without an in-kernel irqchip, shutdown); KVM's own
//! per-vCPU counters report the rest.

use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_pit_config, kvm_regs, kvm_segment, kvm_userspace_memory_region,
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};
use vcpu::{IrqLine, Kick, Regs, Result, SRegs, Segment, Vcpu, VcpuError, VcpuExit};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// Options of a KVM virtual machine.
#[derive(Clone, Copy, Debug, Default)]
pub struct KvmConfig {
    /// Emulate the PIC, IOAPIC, local APIC and PIT in the host kernel (needed by
    /// Linux). Without it, HLT exits to the VMM.
    pub irqchip: bool,
    /// Put this 12-byte signature at CPUID 0x4000_0000 (with the features leaf
    /// 0x4000_0001: hypercall page through `hypercall::MSR_HYPERCALL_PAGE`) and
    /// move KVM's own leaves to 0x4000_0100, where Linux also finds them.
    pub pv_signature: Option<[u8; 12]>,
}

/// True when the host's KVM is PVM (the pagetable-based `kvm_pvm` module), which
/// runs guest user mode natively but emulates guest ring 0 instruction by
/// instruction.
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Why this host's KVM cannot run a Linux guest to user space, or `None` if
/// it can: PVM does not carry out user-mode SYSCALL and INT 0x80, so init
/// dies at its first system call (and ring 0 runs at about 1.3 M instructions
/// a second, so the kernel alone takes most of an hour to get there).
pub fn linux_userspace_unsupported() -> Option<&'static str> {
    host_is_pvm().then_some("/dev/kvm here is PVM, which cannot run Linux user space")
}

/// Linux kernel parameters this host's KVM needs.
///
/// PVM emulates every guest ring-0 instruction with KVM's instruction emulator,
/// which lacks several instructions that Linux picks by CPUID, and it answers the
/// guest's CPUID from the host CPU, ignoring the VMM's KVM_SET_CPUID2. So the
/// features are turned off in the guest kernel instead:
///
/// | parameter | feature | instruction the emulator lacks |
/// |---|---|---|
/// | `noxsave` | XSAVE (and AVX with it) | XSAVE/XRSTOR |
/// | `nopcid`, `noinvpcid` | PCID, INVPCID | INVPCID |
/// | `nofsgsbase` | FSGSBASE | RD/WR FS/GS BASE |
/// | `clearcpuid=141` | CX16 | CMPXCHG16B |
/// | `clearcpuid=151` | POPCNT | POPCNT |
/// | `clearcpuid=158,306` | RDRAND, RDSEED | RDRAND, RDSEED |
/// | `clearcpuid=308` | SMAP | CLAC/STAC |
/// | `clearcpuid=534` | RDPID | RDPID |
/// | `clearcpuid=129,137,147,148,153` | PCLMULQDQ, SSSE3, SSE4.1, SSE4.2, AES-NI | LDMXCSR and SSE: without them the kernel's SIMD library code (BLAKE2s for the entropy pool, CRC, AES) stays on its integer paths |
///
/// And, for time only: `initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init`
/// skips two boot-time passes over every ftrace record and trace event format
/// (minutes of emulated ring 0; they only affect tracing), and `cryptomgr.notests`
/// skips the crypto self-tests, whose 60 s waits otherwise stall the boot.
pub fn linux_parameters() -> &'static [&'static str] {
    if host_is_pvm() {
        &[
            "noxsave",
            "nopcid",
            "noinvpcid",
            "nofsgsbase",
            "clearcpuid=129,137,141,147,148,151,153,158,306,308,534",
            "initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init",
            "cryptomgr.notests",
        ]
    } else {
        &[]
    }
}

/// The KVM device: `/dev/kvm`, or the path in `VISOR_KVM_DEVICE`.
pub fn device_path() -> String {
    std::env::var("VISOR_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".into())
}

fn open() -> std::result::Result<Kvm, String> {
    let path = device_path();
    let c =
        std::ffi::CString::new(path.clone()).map_err(|_| format!("bad device path {path:?}"))?;
    Kvm::new_with_path(c).map_err(|e| open_error(&path, e))
}

/// Why KVM cannot be used here, or `None` if it can.
pub fn unavailable_reason() -> Option<String> {
    match open() {
        Ok(kvm) => {
            if !kvm.check_extension(Cap::UserMemory) {
                Some("/dev/kvm lacks KVM_CAP_USER_MEMORY".into())
            } else {
                None
            }
        }
        Err(e) => Some(e),
    }
}

fn open_error(path: &str, e: kvm_ioctls::Error) -> String {
    let what = match e.errno() {
        libc::ENOENT => "does not exist (no KVM in this kernel, or not passed to this container)",
        libc::EACCES | libc::EPERM => "is not accessible to this user (join the kvm group)",
        _ => "cannot be opened",
    };
    format!("{path} {what}: {e}")
}

fn os(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |e| VcpuError::os(op, std::io::Error::from_raw_os_error(e.errno()))
}

/// A KVM virtual machine over visor's guest memory.
pub struct KvmVm {
    kvm: Kvm,
    vm: Arc<VmFd>,
    config: KvmConfig,
    /// The guest memory KVM's memory slots point into, held so that its
    /// mappings outlive the VM (declared after `vm`: dropped after it).
    mem: GuestMemoryMmap<()>,
}

impl KvmVm {
    /// Creates a VM whose RAM is `mem`. The VM and each of its vCPUs hold a
    /// clone of `mem` (the same mappings), so the memory KVM writes into stays
    /// mapped for as long as KVM can reach it.
    pub fn new(mem: &GuestMemoryMmap<()>, config: KvmConfig) -> Result<Self> {
        let kvm = open().map_err(VcpuError::Engine)?;
        let vm = kvm.create_vm().map_err(os("KVM_CREATE_VM"))?;
        let mem = mem.clone();
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VcpuError::Engine(format!("guest memory not mapped: {e}")))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` is the start of a live mmap of `region.len()` bytes of
            // `mem`. KVM reads and writes it while the VM exists: in ioctls on the
            // VM and on its vCPUs. The kernel's VM lives until its last file
            // descriptor closes, the VM's own (`vm`) or a vCPU's, and `KvmVm` and
            // every `KvmVcpu` hold a clone of `mem` that they drop after their
            // descriptor, so the mapping outlives every access. (An `Msi` line
            // holds the VM's descriptor without a clone, but signalling an MSI
            // does not touch guest memory.) The slots do not overlap because
            // vm-memory's regions do not.
            unsafe { vm.set_user_memory_region(r) }.map_err(os("KVM_SET_USER_MEMORY_REGION"))?;
        }
        // RDMSR/WRMSR of MSRs KVM does not know exit to the VMM (paravirtual
        // MSRs such as the hypercall page) instead of raising #GP. Hosts without
        // the capability keep KVM's #GP.
        let user_msr = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
            args: [kvm_bindings::KVM_MSR_EXIT_REASON_UNKNOWN as u64, 0, 0, 0],
            ..Default::default()
        };
        let _ = vm.enable_cap(&user_msr);
        vm.set_tss_address(0xfffb_d000)
            .map_err(os("KVM_SET_TSS_ADDR"))?;
        if config.irqchip {
            vm.create_irq_chip().map_err(os("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.create_pit2(pit).map_err(os("KVM_CREATE_PIT2"))?;
            vm.set_gsi_routing(&isa_routing()?)
                .map_err(os("KVM_SET_GSI_ROUTING"))?;
        }
        Ok(KvmVm {
            kvm,
            vm: Arc::new(vm),
            config,
            mem,
        })
    }
}

/// The GSI routing of a PC whose MADT says ISA IRQ 0 is GSI 2 (what QEMU
/// installs): GSI n (n < 16, not 2) reaches the PICs on input n and the
/// IOAPIC on pin n, except GSI 0 (the in-kernel PIT's, and the HPET's in
/// legacy replacement mode), which reaches IOAPIC pin 2; GSIs 16-23 the
/// IOAPIC's pins of the same number. KVM's default routing sends GSI 0 to
/// IOAPIC pin 0, where a guest that follows the MADT never looks.
fn isa_routing() -> Result<kvm_bindings::KvmIrqRouting> {
    use kvm_bindings::{
        kvm_irq_routing_entry, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQ_ROUTING_IRQCHIP,
    };
    let route = |gsi: u32, irqchip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = irqchip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut entries = Vec::new();
    for gsi in 0..16u32 {
        // Input 2 of the master is the slave's cascade.
        if gsi != 2 {
            let (chip, pin) = if gsi < 8 {
                (KVM_IRQCHIP_PIC_MASTER, gsi)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
            };
            entries.push(route(gsi, chip, pin));
        }
    }
    for gsi in 0..24u32 {
        match gsi {
            0 => entries.push(route(0, KVM_IRQCHIP_IOAPIC, 2)),
            2 => {}
            _ => entries.push(route(gsi, KVM_IRQCHIP_IOAPIC, gsi)),
        }
    }
    let mut table = kvm_bindings::KvmIrqRouting::new(0)
        .map_err(|e| VcpuError::Engine(format!("GSI routing table: {e:?}")))?;
    for e in entries {
        table
            .push(e)
            .map_err(|e| VcpuError::Engine(format!("GSI routing table: {e:?}")))?;
    }
    Ok(table)
}

struct Irqfd(EventFd);

/// An MSI to vCPU 0 with a fixed vector (KVM_SIGNAL_MSI).
struct Msi {
    vm: Arc<VmFd>,
    vector: u8,
}

impl IrqLine for Msi {
    fn trigger(&self) -> std::io::Result<()> {
        let msi = kvm_bindings::kvm_msi {
            address_lo: 0xfee0_0000,
            data: self.vector as u32,
            ..Default::default()
        };
        self.vm
            .signal_msi(msi)
            .map(|_| ())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl IrqLine for Irqfd {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl KvmVm {
    /// Creates vCPU `id` with KVM's supported CPUID, a reset FPU and (with the
    /// irqchip) the local APIC in virtual-wire mode.
    pub fn create_kvm_vcpu(&mut self, id: u32) -> Result<KvmVcpu> {
        let fd = self
            .vm
            .create_vcpu(id as u64)
            .map_err(os("KVM_CREATE_VCPU"))?;
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(os("KVM_GET_SUPPORTED_CPUID"))?;
        let mut entries = supported.as_slice().to_vec();
        for e in entries.iter_mut() {
            if e.function == 1 {
                // Initial APIC id in EBX[31:24].
                e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24);
            }
        }
        if let Some(sig) = self.config.pv_signature {
            pv_leaves(&mut entries, sig);
        }
        // The guest's TSC ticks at the rate KVM gives it (the host's TSC
        // unless scaled); 0 (unknown) where KVM cannot tell.
        let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
        timing_leaf(&mut entries, tsc_khz, self.config.irqchip);
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|e| VcpuError::Engine(format!("CPUID table: {e:?}")))?;
        fd.set_cpuid2(&cpuid).map_err(os("KVM_SET_CPUID2"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(os("KVM_SET_FPU"))?;
        if self.config.irqchip {
            // LINT0 delivers the 8259's ExtINT, LINT1 NMI: the virtual-wire setup a
            // PC BIOS leaves behind.
            let mut lapic = fd.get_lapic().map_err(os("KVM_GET_LAPIC"))?;
            let reg = |l: &mut kvm_bindings::kvm_lapic_state, off: usize, v: u32| {
                for (i, b) in v.to_le_bytes().iter().enumerate() {
                    l.regs[off + i] = *b as _;
                }
            };
            reg(&mut lapic, 0x350, 0x700); // LVT LINT0: ExtINT
            reg(&mut lapic, 0x360, 0x400); // LVT LINT1: NMI
            fd.set_lapic(&lapic).map_err(os("KVM_SET_LAPIC"))?;
        }
        let stats = open_stats(&fd);
        Ok(KvmVcpu {
            fd,
            stats,
            completed_by_vmm: 0,
            kick: Kick::new(),
            debug_slots: [None; 4],
            _mem: self.mem.clone(),
        })
    }
}

fn leaf(function: u32, [eax, ebx, ecx, edx]: [u32; 4]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    }
}

/// Moves KVM's hypervisor leaves from 0x4000_00xx to 0x4000_01xx and puts
/// visor's at 0x4000_0000 (signature) and 0x4000_0001 (features).
fn pv_leaves(entries: &mut Vec<kvm_cpuid_entry2>, sig: [u8; 12]) {
    let w = |i: usize| u32::from_le_bytes(sig[i * 4..i * 4 + 4].try_into().unwrap_or([0; 4]));
    for e in entries.iter_mut() {
        if e.function & 0xffff_ff00 == 0x4000_0000 {
            e.function += 0x100;
            if e.function == 0x4000_0100 {
                e.eax += 0x100; // its max leaf moves with it
            }
        }
    }
    entries.push(leaf(
        hypercall::CPUID_SIGNATURE_LEAF,
        [hypercall::CPUID_FEATURES_LEAF, w(0), w(1), w(2)],
    ));
    entries.push(leaf(
        hypercall::CPUID_FEATURES_LEAF,
        [
            hypercall::FEATURE_HYPERCALL_PAGE,
            hypercall::MSR_HYPERCALL_PAGE,
            hypercall::VERSION,
            0,
        ],
    ));
}

/// visor's timing leaf (`hypercall::CPUID_TIMING_LEAF`): the TSC's frequency
/// and the local APIC timer's (KVM's counts at 1 GHz) in kHz. The highest
/// hypervisor leaf of 0x4000_0000 (visor's or KVM's own) is raised to reach
/// it, as QEMU does for the same leaf.
fn timing_leaf(entries: &mut Vec<kvm_cpuid_entry2>, tsc_khz: u32, apic: bool) {
    let timing = hypercall::CPUID_TIMING_LEAF;
    entries.retain(|e| e.function != timing);
    match entries
        .iter_mut()
        .find(|e| e.function == hypercall::CPUID_SIGNATURE_LEAF)
    {
        Some(e) => e.eax = e.eax.max(timing),
        None => entries.push(leaf(hypercall::CPUID_SIGNATURE_LEAF, [timing, 0, 0, 0])),
    }
    let apic_khz = if apic { 1_000_000 } else { 0 };
    entries.push(leaf(timing, [tsc_khz, apic_khz, 0, 0]));
}

impl vcpu::Vm for KvmVm {
    fn create_vcpu(&mut self, id: u32) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(self.create_kvm_vcpu(id)?))
    }

    fn irq_line(&self, gsi: u32) -> Result<Option<Arc<dyn IrqLine>>> {
        if !self.config.irqchip {
            return Ok(None);
        }
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VcpuError::os("eventfd", e))?;
        self.vm.register_irqfd(&evt, gsi).map_err(os("KVM_IRQFD"))?;
        Ok(Some(Arc::new(Irqfd(evt))))
    }

    fn vector_line(&self, vector: u8) -> Result<Option<Arc<dyn IrqLine>>> {
        if !self.config.irqchip {
            return Ok(None);
        }
        Ok(Some(Arc::new(Msi {
            vm: self.vm.clone(),
            vector,
        })))
    }
}

/// A vCPU of a [`KvmVm`].
pub struct KvmVcpu {
    fd: VcpuFd,
    /// KVM's binary statistics of this vCPU (KVM_GET_STATS_FD), where the host has them.
    stats: Option<std::fs::File>,
    /// Instructions the engine completed after KVM's emulator gave up on them.
    completed_by_vmm: u64,
    /// The kick: checked before KVM_RUN, and while the thread is in KVM_RUN
    /// a kick signals it ([`vcpu::KICK_SIGNAL`], whose handler the VMM
    /// installs) so that KVM_RUN returns EINTR.
    kick: Arc<Kick>,
    /// What the VMM's debugger put in the debug registers KVM_SET_GUEST_DEBUG
    /// offers (DR0-DR3): breakpoints (`None` kind) and watchpoints.
    debug_slots: [Option<(u64, Option<vcpu::WatchKind>)>; 4],
    /// The guest memory: `fd` keeps the kernel's VM, and with it the memory
    /// slots, alive after the [`KvmVm`] is gone (see `KvmVm::new`).
    _mem: GuestMemoryMmap<()>,
}

impl KvmVcpu {
    /// The KVM vCPU itself, for code that drives KVM_RUN directly (benchmarks).
    pub fn fd(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// The KVM_EXIT_INTERNAL_ERROR details: suberror and, for emulation
    /// failures, the instruction bytes.
    fn internal_error_data(&mut self) -> (u32, Vec<u64>) {
        let run = self.fd.get_kvm_run();
        // SAFETY: called right after KVM_EXIT_INTERNAL_ERROR, so `internal` is the
        // active union member.
        let ie = unsafe { run.__bindgen_anon_1.internal };
        let n = (ie.ndata as usize).min(ie.data.len());
        (ie.suberror, ie.data[..n].to_vec())
    }

    fn internal_error(&mut self) -> String {
        let (sub, data) = self.internal_error_data();
        let what = match sub {
            1 => "instruction emulation failed",
            2 => "simultaneous exceptions",
            3 => "delivery event",
            _ => "other",
        };
        let mut s = format!("KVM internal error {sub} ({what})");
        if let Some((len, bytes)) = emulation_bytes(sub, &data) {
            s += &format!(", instruction {:02x?}", &bytes[..len.min(15)]);
        }
        s
    }

    /// Completes instructions that KVM's emulator gives up on, as the CPU would.
    /// Hosts that emulate guest ring 0 (PVM) send every guest-kernel instruction
    /// through that emulator, and Linux executes these two at boot:
    /// - INT3 (the emulator delivers software interrupts only in real mode):
    ///   RIP moves past it and #BP is injected;
    /// - FWAIT: #MF if an unmasked x87 exception is pending (FSW.ES), else nothing.
    fn complete_failed_emulation(&mut self) -> Result<bool> {
        let (sub, data) = self.internal_error_data();
        let Some((_, bytes)) = emulation_bytes(sub, &data) else {
            return Ok(false);
        };
        let inject = match bytes[0] {
            0xcc => Some(3),
            0x9b => {
                let fpu = self.fd.get_fpu().map_err(os("KVM_GET_FPU"))?;
                (fpu.fsw & 0x80 != 0).then_some(16)
            }
            _ => return Ok(false),
        };
        let mut regs = self.fd.get_regs().map_err(os("KVM_GET_REGS"))?;
        regs.rip = regs.rip.wrapping_add(1);
        self.fd.set_regs(&regs).map_err(os("KVM_SET_REGS"))?;
        if let Some(vector) = inject {
            let mut ev = self
                .fd
                .get_vcpu_events()
                .map_err(os("KVM_GET_VCPU_EVENTS"))?;
            ev.exception.injected = 1;
            ev.exception.nr = vector;
            ev.exception.has_error_code = 0;
            ev.exception.error_code = 0;
            self.fd
                .set_vcpu_events(&ev)
                .map_err(os("KVM_SET_VCPU_EVENTS"))?;
        }
        self.completed_by_vmm += 1;
        Ok(true)
    }
}

/// KVM's counters reported beside the VMM's: every exit, including those KVM
/// handles in the host kernel.
const KVM_COUNTERS: &[&str] = &[
    "exits",
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "irq_exits",
    "irq_window_exits",
    "request_irq_exits",
    "signal_exits",
    "insn_emulation",
    "insn_emulation_fail",
    "hypercalls",
    "pf_taken",
    "irq_injections",
    "exits_userspace",
];

fn open_stats(fd: &VcpuFd) -> Option<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    const KVM_GET_STATS_FD: libc::c_ulong = 0xaece; // _IO(KVMIO, 0xce)
                                                    // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new descriptor
                                                    // (or -1); it does not touch our memory.
    let raw = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _) };
    // SAFETY: on success `raw` is a fresh descriptor that nothing else owns.
    (raw >= 0).then(|| unsafe { std::fs::File::from_raw_fd(raw) })
}

/// Reads the cumulative counters named in KVM_COUNTERS from a stats descriptor.
fn read_stats(f: &std::fs::File) -> Vec<(String, u64)> {
    use std::os::unix::fs::FileExt;
    let rd = |off: u64, len: usize| -> Option<Vec<u8>> {
        let mut b = vec![0u8; len];
        f.read_exact_at(&mut b, off).ok()?;
        Some(b)
    };
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
    let Some(h) = rd(0, 24) else {
        return Vec::new();
    };
    let (name_size, num, desc_off, data_off) = (
        u32_at(&h, 4) as usize,
        u32_at(&h, 8) as usize,
        u32_at(&h, 16) as u64,
        u32_at(&h, 20) as u64,
    );
    let desc_size = 16 + name_size;
    let Some(descs) = rd(desc_off, desc_size.saturating_mul(num.min(4096))) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for d in descs.chunks_exact(desc_size) {
        let name_bytes = &d[16..];
        let end = name_bytes
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(name_bytes.len());
        let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
        if !KVM_COUNTERS.contains(&name.as_str()) {
            continue;
        }
        let offset = u32_at(d, 8) as u64;
        if let Some(v) = rd(data_off + offset, 8) {
            out.push((
                format!("kvm.{name}"),
                u64::from_le_bytes(v.try_into().unwrap_or([0; 8])),
            ));
        }
    }
    out
}

/// The instruction bytes of a KVM emulation failure, when KVM provides them
/// (flag KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES in data[0]).
fn emulation_bytes(suberror: u32, data: &[u64]) -> Option<(usize, [u8; 15])> {
    if suberror != 1 || data.len() < 3 || data[0] & 1 == 0 {
        return None;
    }
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&data[1].to_le_bytes());
    raw[8..].copy_from_slice(&data[2].to_le_bytes());
    let mut bytes = [0u8; 15];
    bytes.copy_from_slice(&raw[1..]);
    Some((raw[0] as usize, bytes))
}

enum Kind {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    MsrRead,
    MsrWrite,
}

/// DR6.BS: a single step.
const DR6_BS: u64 = 1 << 14;

impl KvmVcpu {
    /// The debug exit whose DR6 is `dr6`: the step, or the slot that hit.
    fn debug_exit(&self, dr6: u64) -> VcpuExit<'static> {
        for (i, slot) in self.debug_slots.iter().enumerate() {
            match slot {
                Some((_, None)) if dr6 & (1 << i) != 0 => {
                    return VcpuExit::Debug(vcpu::DebugEvent::Breakpoint)
                }
                Some((addr, Some(kind))) if dr6 & (1 << i) != 0 => {
                    return VcpuExit::Debug(vcpu::DebugEvent::Watch {
                        addr: *addr,
                        kind: *kind,
                    })
                }
                _ => {}
            }
        }
        if dr6 & DR6_BS != 0 {
            return VcpuExit::Debug(vcpu::DebugEvent::Step);
        }
        VcpuExit::Other {
            reason: format!("a debug exit with DR6 {dr6:#x} and no slot of the debugger"),
        }
    }
}

/// DR7's bits for slot `i`: enabled (L), the condition and the length.
fn dr7_slot(i: usize, watch: Option<(vcpu::WatchKind, u64)>) -> Result<u64> {
    let (rw, len) = match watch {
        None => (0b00, 0b00),
        Some((kind, len)) => (
            match kind {
                vcpu::WatchKind::Write => 0b01,
                // x86 has no read-only condition: reads and writes.
                vcpu::WatchKind::Read | vcpu::WatchKind::Access => 0b11,
            },
            match len {
                1 => 0b00,
                2 => 0b01,
                4 => 0b11,
                8 => 0b10,
                _ => {
                    return Err(VcpuError::Engine(format!(
                        "a watchpoint of {len} bytes does not fit a debug register (1, 2, 4 or 8)"
                    )))
                }
            },
        ),
    };
    Ok((1 << (i * 2)) | (rw << (16 + i * 4)) | (len << (18 + i * 4)))
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        self.kick.enter_blocking();
        if self.kick.take() {
            self.kick.leave_blocking();
            return Ok(VcpuExit::Interrupted);
        }
        let r = self.fd.run();
        self.kick.leave_blocking();
        let kind = match r {
            Ok(KvmExit::IoIn(..)) => Kind::IoIn,
            Ok(KvmExit::IoOut(..)) => Kind::IoOut,
            Ok(KvmExit::MmioRead(..)) => Kind::MmioRead,
            Ok(KvmExit::MmioWrite(..)) => Kind::MmioWrite,
            Ok(KvmExit::X86Rdmsr(..)) => Kind::MsrRead,
            Ok(KvmExit::X86Wrmsr(..)) => Kind::MsrWrite,
            Ok(KvmExit::Hlt) => return Ok(VcpuExit::Hlt),
            Ok(KvmExit::Shutdown) => return Ok(VcpuExit::Shutdown),
            Ok(KvmExit::FailEntry(reason, _cpu)) => return Ok(VcpuExit::FailEntry { reason }),
            Ok(KvmExit::Intr) => return Ok(VcpuExit::Interrupted),
            Ok(KvmExit::Debug(d)) => return Ok(self.debug_exit(d.dr6)),
            Ok(KvmExit::InternalError) => {
                if self.complete_failed_emulation()? {
                    return Ok(VcpuExit::Interrupted);
                }
                return Ok(VcpuExit::Other {
                    reason: self.internal_error(),
                });
            }
            Ok(other) => {
                return Ok(VcpuExit::Other {
                    reason: format!("{other:?}"),
                })
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(VcpuExit::Interrupted)
            }
            Err(e) => return Err(os("KVM_RUN")(e)),
        };
        let run = self.fd.get_kvm_run();
        let base = run as *mut kvm_bindings::kvm_run as *mut u8;
        match kind {
            Kind::IoIn | Kind::IoOut => {
                // SAFETY: the last exit was KVM_EXIT_IO, so `io` is the active union member.
                let io = unsafe { run.__bindgen_anon_1.io };
                let len = io.size as usize * io.count as usize;
                // SAFETY: KVM places the I/O data at `data_offset` inside the vCPU's
                // kvm_run mapping (at least KVM_GET_VCPU_MMAP_SIZE bytes), and the
                // slice borrows `self` mutably, so nothing else touches it until the
                // next `run`.
                let data = unsafe {
                    std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), len)
                };
                Ok(if matches!(kind, Kind::IoIn) {
                    VcpuExit::IoIn {
                        port: io.port,
                        size: io.size,
                        data,
                    }
                } else {
                    VcpuExit::IoOut {
                        port: io.port,
                        size: io.size,
                        data,
                    }
                })
            }
            Kind::MsrRead | Kind::MsrWrite => {
                // SAFETY: the last exit was KVM_EXIT_X86_RDMSR/WRMSR, so `msr` is the
                // active union member.
                let msr = unsafe { &mut run.__bindgen_anon_1.msr };
                msr.error = 0;
                Ok(if matches!(kind, Kind::MsrRead) {
                    VcpuExit::MsrRead {
                        index: msr.index,
                        data: &mut msr.data,
                        fault: &mut msr.error,
                    }
                } else {
                    VcpuExit::MsrWrite {
                        index: msr.index,
                        value: msr.data,
                        fault: &mut msr.error,
                    }
                })
            }
            Kind::MmioRead | Kind::MmioWrite => {
                // SAFETY: the last exit was KVM_EXIT_MMIO, so `mmio` is the active member.
                let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
                let len = (mmio.len as usize).min(mmio.data.len());
                let addr = mmio.phys_addr;
                let data = &mut mmio.data[..len];
                Ok(if matches!(kind, Kind::MmioRead) {
                    VcpuExit::MmioRead { addr, data }
                } else {
                    VcpuExit::MmioWrite { addr, data }
                })
            }
        }
    }

    fn regs(&self) -> Result<Regs> {
        let r = self.fd.get_regs().map_err(os("KVM_GET_REGS"))?;
        Ok(Regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        })
    }

    fn set_regs(&mut self, r: &Regs) -> Result<()> {
        let k = kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        };
        self.fd.set_regs(&k).map_err(os("KVM_SET_REGS"))
    }

    fn kick(&self) -> Arc<Kick> {
        self.kick.clone()
    }

    /// The hardware reads guest memory itself: nothing is cached.
    fn memory_written(&mut self, _gpa: u64, _len: u64) {}

    fn engine_counters(&self) -> Vec<(String, u64)> {
        let mut v = self.stats.as_ref().map(read_stats).unwrap_or_default();
        if self.completed_by_vmm > 0 {
            v.push(("insns_completed_by_vmm".into(), self.completed_by_vmm));
        }
        v
    }

    fn sregs(&self) -> Result<SRegs> {
        let s = self.fd.get_sregs().map_err(os("KVM_GET_SREGS"))?;
        Ok(SRegs {
            cs: from_kvm(&s.cs),
            ds: from_kvm(&s.ds),
            es: from_kvm(&s.es),
            fs: from_kvm(&s.fs),
            gs: from_kvm(&s.gs),
            ss: from_kvm(&s.ss),
            tr: from_kvm(&s.tr),
            ldt: from_kvm(&s.ldt),
            gdt: vcpu::DescriptorTable {
                base: s.gdt.base,
                limit: s.gdt.limit,
            },
            idt: vcpu::DescriptorTable {
                base: s.idt.base,
                limit: s.idt.limit,
            },
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
        })
    }

    fn set_sregs(&mut self, n: &SRegs) -> Result<()> {
        // Start from KVM's state so the APIC base and pending interrupts survive.
        let mut s = self.fd.get_sregs().map_err(os("KVM_GET_SREGS"))?;
        s.cs = to_kvm(&n.cs);
        s.ds = to_kvm(&n.ds);
        s.es = to_kvm(&n.es);
        s.fs = to_kvm(&n.fs);
        s.gs = to_kvm(&n.gs);
        s.ss = to_kvm(&n.ss);
        s.tr = to_kvm(&n.tr);
        s.ldt = to_kvm(&n.ldt);
        s.gdt.base = n.gdt.base;
        s.gdt.limit = n.gdt.limit;
        s.idt.base = n.idt.base;
        s.idt.limit = n.idt.limit;
        s.cr0 = n.cr0;
        s.cr2 = n.cr2;
        s.cr3 = n.cr3;
        s.cr4 = n.cr4;
        s.cr8 = n.cr8;
        s.efer = n.efer;
        self.fd.set_sregs(&s).map_err(os("KVM_SET_SREGS"))
    }

    /// KVM_SET_SREGS flushes only when it changes CR0, CR3, CR4 or EFER: it
    /// then resets KVM's MMU context for the vCPU, which drops every
    /// translation, global ones included (and newer kernels also request a
    /// guest TLB flush). Setting the same registers again flushes nothing.
    /// So this sets CR3 with PWT (bit 3, always a legal CR3 bit) flipped,
    /// then the real CR3 again: the guest's registers end as they were.
    /// Through KVM_SET_GUEST_DEBUG: every breakpoint, software or hardware,
    /// and every watchpoint takes one of the four debug registers KVM offers
    /// (guest memory is never patched); more is an error.
    fn set_guest_debug(&mut self, debug: &vcpu::GuestDebug) -> Result<()> {
        let mut dbg = kvm_bindings::kvm_guest_debug::default();
        let mut slots = [None; 4];
        let wanted: Vec<(u64, Option<(vcpu::WatchKind, u64)>)> = debug
            .breakpoints
            .iter()
            .chain(&debug.hw_breakpoints)
            .map(|&a| (a, None))
            .chain(
                debug
                    .watchpoints
                    .iter()
                    .map(|w| (w.addr, Some((w.kind, w.len)))),
            )
            .collect();
        if wanted.len() > 4 {
            return Err(VcpuError::Engine(format!(
                "{} breakpoints and watchpoints: KVM offers 4 debug registers",
                wanted.len()
            )));
        }
        let mut dr7 = 0;
        for (i, &(addr, watch)) in wanted.iter().enumerate() {
            dr7 |= dr7_slot(i, watch)?;
            dbg.arch.debugreg[i] = addr;
            slots[i] = Some((addr, watch.map(|(k, _)| k)));
        }
        dbg.arch.debugreg[7] = dr7;
        if debug.is_active() {
            dbg.control = kvm_bindings::KVM_GUESTDBG_ENABLE;
            if debug.single_step {
                dbg.control |= kvm_bindings::KVM_GUESTDBG_SINGLESTEP;
            }
            if !wanted.is_empty() {
                dbg.control |= kvm_bindings::KVM_GUESTDBG_USE_HW_BP;
            }
        }
        self.fd
            .set_guest_debug(&dbg)
            .map_err(os("KVM_SET_GUEST_DEBUG"))?;
        self.debug_slots = slots;
        Ok(())
    }

    fn flush_tlb(&mut self) -> Result<()> {
        const PWT: u64 = 1 << 3;
        let mut s = self.fd.get_sregs().map_err(os("KVM_GET_SREGS"))?;
        s.cr3 ^= PWT;
        self.fd.set_sregs(&s).map_err(os("KVM_SET_SREGS"))?;
        s.cr3 ^= PWT;
        self.fd.set_sregs(&s).map_err(os("KVM_SET_SREGS"))
    }

    /// `apic`: KVM's in-kernel local APIC (KVM_GET_LAPIC), in the lines
    /// the software engines give; `None` without the in-kernel irqchip.
    fn debug_info(&mut self, what: &str) -> Option<String> {
        if what != "apic" {
            return None;
        }
        let l = self.fd.get_lapic().ok()?;
        Some(describe_lapic(&l.regs.map(|b| b as u8)))
    }
}

/// KVM's local APIC register page (KVM_GET_LAPIC), decoded: ID, TPR, SVR,
/// ISR, IRR and ESR, the LVT entries, and the timer.
fn describe_lapic(page: &[u8; 1024]) -> String {
    let reg =
        |off: usize| u32::from_le_bytes([page[off], page[off + 1], page[off + 2], page[off + 3]]);
    // The 256 bits of ISR or IRR: eight registers 16 bytes apart.
    let bits = |base: usize| {
        (0..256usize)
            .filter(|&v| reg(base + (v / 32) * 0x10) & (1 << (v % 32)) != 0)
            .map(|v| format!("{v:#x}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "apic id={} tpr={:#x} svr={:#x} isr=[{}] irr=[{}] esr={:#x}\n\
         apic lvt timer={:#x} lint0={:#x} lint1={:#x} error={:#x}\n\
         apic timer initial={:#x} current={:#x} divide={:#x}",
        reg(0x20) >> 24,
        reg(0x80),
        reg(0xf0),
        bits(0x100),
        bits(0x200),
        reg(0x280),
        reg(0x320),
        reg(0x350),
        reg(0x360),
        reg(0x370),
        reg(0x380),
        reg(0x390),
        reg(0x3e0),
    )
}

fn from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present as u8,
        dpl: s.dpl,
        db: s.db as u8,
        s: s.s as u8,
        l: s.l as u8,
        g: s.g as u8,
        avl: s.avl as u8,
        unusable: s.unusable as u8,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The register page decoded: the ID in bits 31:24, ISR and IRR as
    /// vector lists, the LVT entries and the timer's registers.
    #[test]
    fn lapic_page_decoded() {
        let mut page = [0u8; 1024];
        let mut put = |off: usize, v: u32| page[off..off + 4].copy_from_slice(&v.to_le_bytes());
        put(0x20, 3 << 24);
        put(0xf0, 0x1ff);
        put(0x100 + 0x10, 1 << 1); // ISR: vector 0x21
        put(0x200 + 0x70, 1 << 31); // IRR: vector 0xff
        put(0x320, 0x2_00ec);
        put(0x350, 0x700);
        put(0x380, 0x1000);
        put(0x390, 0x800);
        put(0x3e0, 0xb);
        let d = describe_lapic(&page);
        assert!(
            d.starts_with("apic id=3 tpr=0x0 svr=0x1ff isr=[0x21] irr=[0xff]"),
            "{d}"
        );
        assert!(d.contains("lvt timer=0x200ec lint0=0x700"), "{d}");
        assert!(
            d.contains("timer initial=0x1000 current=0x800 divide=0xb"),
            "{d}"
        );
    }
}
