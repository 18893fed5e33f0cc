//! The registry of engines: which exist, which work on this host, and how to
//! create a VM on one.

use std::fmt;

use machine::GuestMemory;
use vcpu::VcpuError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Engine {
    /// Hardware-assisted virtualization through Linux KVM.
    Kvm,
    /// No virtualization: visor's software CPU runs the guest at its real
    /// privilege (baseline and oracle).
    Emu,
    /// Trap-and-emulate: the guest kernel runs deprivileged on the software
    /// CPU, privileged instructions trap to the VMM, shadow page tables.
    Trap,
    /// Paravirtualization: the guest kernel runs deprivileged on the software
    /// CPU and uses hypercalls (`int 0x82`) for every privileged operation.
    Pv,
    /// Intel VMX in the software CPU, driven by a VMM written as VT-x
    /// software.
    Vmx,
    /// Binary translation: guest code translated into host x86-64 code in a
    /// code cache; what is not translated runs in the software CPU.
    Bt,
}

/// How a guest kernel runs on an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GuestMode {
    /// Natively: privileged instructions (`visor run --no-pv` where the
    /// engine offers the paravirtual interface).
    Native,
    /// Paravirtualized: visor's hypercalls (the default where the engine
    /// offers them).
    Pv,
}

impl GuestMode {
    pub fn name(self) -> &'static str {
        match self {
            GuestMode::Native => "native",
            GuestMode::Pv => "pv",
        }
    }
}

/// Engine-independent VM options.
#[derive(Clone, Copy, Debug, Default)]
pub struct VmOptions {
    /// An interrupt controller and timer in the engine (Linux needs them). Without
    /// one, HLT returns to the VMM.
    pub irqchip: bool,
    /// Advertise visor's paravirtual interface (CPUID leaves 0x4000_0000..,
    /// hypercall page MSR); `--no-pv` turns it off. The `trap` engine never
    /// does (its guest does not know it is virtualized); the `pv` engine
    /// always does.
    pub pv: bool,
    /// What the `trap` engine does with virtualization holes.
    pub holes: visor_deprivileged::HolePolicy,
    /// Log each VMX operation and VM exit (`--trace-vmx`): the VMM's on
    /// `vmx`, the guest's own (nested VMX) on `emu`.
    pub trace_vmx: bool,
    /// `vmx`: print the VMCS at the end (`--dump-vmcs`).
    pub dump_vmcs: bool,
    /// `bt`: the code cache's size in bytes (`--bt-cache`; default
    /// [`visor_bt::DEFAULT_CACHE`]).
    pub bt_cache: Option<usize>,
    /// `bt`: translate a block once the interpreter has reached its start
    /// this many times (`--bt-hot`; default [`visor_bt::DEFAULT_HOT`]).
    pub bt_hot: Option<u32>,
}

impl Engine {
    pub const ALL: &'static [Engine] = &[
        Engine::Kvm,
        Engine::Emu,
        Engine::Vmx,
        Engine::Trap,
        Engine::Pv,
        Engine::Bt,
    ];
    /// The engines `--engine auto` chooses from, best first: the fastest
    /// software engine (`bt`, binary translation) where KVM cannot run (or
    /// cannot run a Linux guest to user space); `emu` last.
    pub const AUTO: &'static [Engine] = &[Engine::Kvm, Engine::Bt, Engine::Emu];

    pub fn name(self) -> &'static str {
        match self {
            Engine::Kvm => "kvm",
            Engine::Emu => "emu",
            Engine::Vmx => "vmx",
            Engine::Trap => "trap",
            Engine::Pv => "pv",
            Engine::Bt => "bt",
        }
    }

    pub fn design(self) -> &'static str {
        match self {
            Engine::Kvm => "hardware-assisted (VT-x/AMD-V through Linux KVM)",
            Engine::Emu => "software CPU, guest at its real privilege (baseline, oracle)",
            Engine::Vmx => {
                "Intel VMX in the software CPU, driven by a VMM written as VT-x software"
            }
            Engine::Trap => "trap-and-emulate: deprivileged guest kernel, shadow page tables",
            Engine::Pv => "paravirtualization: deprivileged PV kernel, hypercalls through int 0x82",
            Engine::Bt => {
                "binary translation: guest code translated into host code, the rest interpreted"
            }
        }
    }

    pub fn from_name(name: &str) -> Option<Engine> {
        Engine::ALL.iter().copied().find(|e| e.name() == name)
    }

    /// The engines' names, comma-separated.
    pub fn names() -> String {
        let names: Vec<_> = Engine::ALL.iter().map(|e| e.name()).collect();
        names.join(", ")
    }

    /// The ways a kernel can run on this engine: natively, paravirtualized
    /// (hypercalls), or both. `trap` never tells its guest it is
    /// virtualized; `pv` always does.
    pub fn guest_modes(self) -> &'static [GuestMode] {
        match self {
            Engine::Kvm | Engine::Emu | Engine::Vmx | Engine::Bt => {
                &[GuestMode::Native, GuestMode::Pv]
            }
            Engine::Trap => &[GuestMode::Native],
            Engine::Pv => &[GuestMode::Pv],
        }
    }

    /// Whether the engine starts a kernel of this kind. A Multiboot kernel
    /// starts in 32-bit protected mode with paging off: `pv`'s kernels (as
    /// Xen's 64-bit PV guests) start in long mode with paging on (`trap`
    /// runs it deprivileged on an identity shadow). `Err` says so and names
    /// the engines that can.
    pub fn boots(self, kind: machine::loader::KernelKind) -> Result<(), String> {
        use machine::loader::KernelKind;
        let starts = |e: Engine| !(e == Engine::Pv && kind == KernelKind::Multiboot);
        if starts(self) {
            return Ok(());
        }
        let can: Vec<_> = Engine::ALL
            .iter()
            .filter(|e| starts(**e))
            .map(|e| e.name())
            .collect();
        let why = "runs paravirtualized kernels, which start in 64-bit long mode with paging on";
        Err(format!(
            "engine {self} {why}; a {} kernel starts in 32-bit protected mode with paging off: \
             run it on engine {}",
            kind.name(),
            can.join(", ")
        ))
    }

    /// Whether the guest's time stands while a debugger holds it. On the
    /// software engines it does: their TSC, local APIC timer and PIT, and
    /// the VM's HPET, PM timer and PV timer, skip the time stopped. KVM's
    /// TSC, kvmclock, in-kernel local APIC timer and PIT run on the host's
    /// clock through a stop, so under `kvm` visor's own timers run on too:
    /// every clock the guest reads agrees with the others (README).
    pub fn time_stands_when_stopped(self) -> bool {
        self != Engine::Kvm
    }

    /// `None` when the engine can run here, else why not.
    pub fn unavailable_reason(self) -> Option<String> {
        match self {
            Engine::Kvm => visor_kvm::unavailable_reason(),
            Engine::Emu | Engine::Vmx | Engine::Trap | Engine::Pv | Engine::Bt => None,
        }
    }

    /// The hypercall-page stub for hypercall `n` on this engine.
    pub fn hypercall_stub(self) -> fn(u32) -> [u8; hypercall::STUB_SIZE] {
        match self {
            // The VMM loop turns OUT to the hypercall port into a hypercall on
            // every engine.
            Engine::Kvm | Engine::Emu | Engine::Trap | Engine::Bt => hypercall::port_io_stub,
            // The deprivileged kernel may not do port I/O.
            Engine::Pv => hypercall::int82_stub,
            // The vmx engine takes VMCALL as the hypercall instruction.
            Engine::Vmx => hypercall::vmcall_stub,
        }
    }

    /// Linux kernel parameters a guest needs on this engine here.
    pub fn linux_parameters(self) -> &'static [&'static str] {
        match self {
            Engine::Kvm => visor_kvm::linux_parameters(),
            Engine::Emu | Engine::Vmx | Engine::Trap | Engine::Pv | Engine::Bt => &[],
        }
    }

    /// Why this engine cannot run a Linux guest to user space on this host
    /// although it is available (KVM on a PVM host), or `None`.
    pub fn linux_limit(self) -> Option<&'static str> {
        match self {
            Engine::Kvm => visor_kvm::linux_userspace_unsupported(),
            Engine::Emu | Engine::Vmx | Engine::Trap | Engine::Pv | Engine::Bt => None,
        }
    }

    /// The best engine available on this host (`--engine auto`) for a
    /// kernel, `linux` if it is a Linux kernel: with the reason an engine
    /// ahead of it was passed over for Linux, if one was (the caller says
    /// so in one line).
    pub fn auto(linux: bool) -> Result<(Engine, Option<&'static str>), String> {
        let mut why = Vec::new();
        let mut passed = None;
        for &e in Engine::AUTO {
            match e.unavailable_reason() {
                None => match e.linux_limit().filter(|_| linux) {
                    Some(limit) => {
                        passed.get_or_insert(limit);
                        why.push(format!("{}: {limit}", e.name()));
                    }
                    None => return Ok((e, passed)),
                },
                Some(r) => why.push(format!("{}: {r}", e.name())),
            }
        }
        Err(format!("no engine can run here ({})", why.join("; ")))
    }

    pub fn create_vm(
        self,
        mem: &GuestMemory,
        opts: VmOptions,
    ) -> Result<Box<dyn vcpu::Vm>, VcpuError> {
        match self {
            Engine::Kvm => Ok(Box::new(visor_kvm::KvmVm::new(
                mem,
                visor_kvm::KvmConfig {
                    irqchip: opts.irqchip,
                    pv_signature: opts.pv.then_some(hypercall::SIGNATURE),
                },
            )?)),
            Engine::Emu => Ok(Box::new(visor_emu::EmuVm::new(
                mem,
                visor_emu::EmuConfig {
                    irqchip: opts.irqchip,
                    pv_signature: opts.pv.then_some(hypercall::SIGNATURE),
                    trace_vmx: opts.trace_vmx,
                },
            )?)),
            Engine::Vmx => Ok(Box::new(visor_vmx::VmxVm::new(
                mem,
                visor_vmx::VmxConfig {
                    irqchip: opts.irqchip,
                    pv_signature: opts.pv.then_some(hypercall::SIGNATURE),
                    trace: opts.trace_vmx,
                    dump_vmcs: opts.dump_vmcs,
                },
            )?)),
            Engine::Trap => Ok(Box::new(visor_deprivileged::TrapVm::new(
                mem,
                visor_deprivileged::TrapConfig {
                    irqchip: opts.irqchip,
                    holes: opts.holes,
                },
            )?)),
            Engine::Pv => Ok(Box::new(visor_deprivileged::PvVm::new(mem)?)),
            Engine::Bt => Ok(Box::new(visor_bt::BtVm::new(
                mem,
                visor_bt::BtConfig {
                    irqchip: opts.irqchip,
                    pv_signature: opts.pv.then_some(hypercall::SIGNATURE),
                    cache_size: opts.bt_cache.unwrap_or(visor_bt::DEFAULT_CACHE),
                    hot: opts.bt_hot.unwrap_or(visor_bt::DEFAULT_HOT),
                },
            )?)),
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
