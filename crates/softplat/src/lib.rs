//! The platform of the engines built on the software CPU, and their one run
//! loop.
//!
//! KVM models the interrupt controllers and the timer of a PC in the host
//! kernel; the software engines (`emu`, `vmx`, `trap`, `pv`, and `bt`) get
//! theirs from this crate instead, so that no engine imports another:
//! - [`lapic`]: the local APIC (registers, timer on the host clock, vector
//!   lines raised from other threads) and [`Lines`], the wake-up of a vCPU;
//! - [`legacy`]: the 8259A PIC pair and the 8254 PIT, reaching the CPU through
//!   LINT0 (ExtINT), and [`ioapic`], the I/O APIC the ISA IRQs reach too
//!   (its registers answered by vCPU 0's local APIC device);
//! - [`Platform`]: one VM's set of them, with its interrupt lines for the
//!   engine contract (`irq_line`, `vector_line`) and the vCPU's [`Kick`];
//! - [`run`]: the run loop, written once. An engine supplies an [`Engine`]
//!   hook: what to do before each slice of guest execution (deliver an event,
//!   enter VMX non-root mode, wait while halted), how to run a slice (the
//!   software CPU's interpreter, or translated code), and what each exit
//!   means to it. The loop does the rest the same way for all: kicks, HLT
//!   waits on the platform's timers and lines, the PIC and PIT ports, and the
//!   contract exit of everything else.

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod fuzz;
pub mod ioapic;
pub mod lapic;
pub mod legacy;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use vcpu::{IrqLine, Kick, Result, VcpuExit};
use vm_memory::GuestMemoryMmap;
use x86::{Cpu, CpuExit, CpuidTable, Local, PhysMem};

pub use lapic::{Lapic, Lines, APIC_BASE};
pub use legacy::Legacy;

/// Instructions per slice of [`Engine::slice`]: the local APIC and the kick
/// are looked at in between.
pub const SLICE: u64 = 20_000;

/// One VM's software platform: the vector lines and the vCPU's kick, and
/// optionally local APICs and the legacy PICs and PIT.
pub struct Platform {
    lines: Arc<Lines>,
    legacy: Option<Arc<Mutex<Legacy>>>,
    lapic: bool,
}

impl Platform {
    /// A platform; `lapic`: local APICs (and with `legacy`, the PICs and the
    /// PIT behind vCPU 0's LINT0).
    pub fn new(lapic: bool, legacy: bool) -> Platform {
        Platform {
            lines: Arc::new(Lines::default()),
            legacy: (lapic && legacy).then(|| Arc::new(Mutex::new(Legacy::default()))),
            lapic,
        }
    }

    /// Whether the platform has local APICs (an interrupt controller).
    pub fn has_lapic(&self) -> bool {
        self.lapic
    }

    /// The vector lines (they wake a halted vCPU).
    pub fn lines(&self) -> &Arc<Lines> {
        &self.lines
    }

    /// The kick of vCPU 0 (visor's VMs have one vCPU).
    pub fn kick(&self) -> Arc<Kick> {
        self.lines.kick_handle().clone()
    }

    /// The PICs and the PIT, if the platform has them.
    pub fn legacy(&self) -> Option<&Arc<Mutex<Legacy>>> {
        self.legacy.as_ref()
    }

    /// The local APIC of vCPU `id`, if the platform has them.
    pub fn lapic(&self, id: u32) -> Option<Box<dyn Local>> {
        if !self.lapic {
            return None;
        }
        let mut lapic = Lapic::new(id, self.lines.clone());
        if let Some(l) = self.legacy.clone().filter(|_| id == 0) {
            lapic = lapic.with_legacy(l);
        }
        Some(Box::new(lapic))
    }

    /// The CPUID table of the software CPU `id` on this platform: the local
    /// APIC as the platform has it, and visor's paravirtual leaves (signature
    /// at 0x4000_0000, features at 0x4000_0001) with `pv_signature`.
    pub fn cpuid(&self, id: u32, pv_signature: Option<[u8; 12]>) -> CpuidTable {
        let pv = pv_signature.map(|sig| {
            (
                sig,
                [
                    hypercall::FEATURE_HYPERCALL_PAGE,
                    hypercall::MSR_HYPERCALL_PAGE,
                    hypercall::VERSION,
                    0,
                ],
            )
        });
        let mut t = CpuidTable::software_cpu(self.lapic, pv);
        let (a, b, c, d) = t.query(1, 0);
        t.set(1, None, [a, (b & 0x00ff_ffff) | (id << 24), c, d]);
        t
    }

    /// A software CPU `id` on physical memory `mem` (the guest's, or more)
    /// with CPUID table `cpuid` and this platform's local APIC.
    /// `VISOR_EMU_TRACE=1` in the environment prints every instruction
    /// (debugging only).
    pub fn create_cpu(&self, id: u32, mem: &GuestMemoryMmap, cpuid: CpuidTable) -> Cpu {
        let mut cpu = Cpu::new(PhysMem::new(mem), cpuid);
        cpu.trace = std::env::var_os("VISOR_EMU_TRACE").is_some_and(|v| v == "1");
        cpu.local = self.lapic(id);
        cpu
    }

    /// ISA interrupt line `gsi` (to the PICs), if the platform has them.
    pub fn irq_line(&self, gsi: u32) -> Option<Arc<dyn IrqLine>> {
        let legacy = self.legacy.clone().filter(|_| gsi < 16)?;
        Some(Arc::new(legacy::IrqPin {
            legacy,
            lines: self.lines.clone(),
            irq: gsi as u8,
        }))
    }

    /// A line that raises fixed interrupt `vector` in vCPU 0's local APIC,
    /// if the platform has local APICs (the engine contract's
    /// `Vm::vector_line` of the engines that model the APIC).
    pub fn apic_vector_line(&self, vector: u8) -> Option<Arc<dyn IrqLine>> {
        self.lapic.then(|| self.vector_line(vector))
    }

    /// A line that raises fixed interrupt `vector` on vCPU 0.
    pub fn vector_line(&self, vector: u8) -> Arc<dyn IrqLine> {
        Arc::new(VectorLine {
            lines: self.lines.clone(),
            vector,
        })
    }
}

/// A fixed interrupt with one vector to vCPU 0 (an MSI; also the event line
/// of the paravirtual engines).
struct VectorLine {
    lines: Arc<Lines>,
    vector: u8,
}

impl IrqLine for VectorLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.lines.raise(self.vector);
        Ok(())
    }
}

/// What an engine's hook says the loop is to do next.
pub enum Step<R> {
    /// Run guest code (or run on).
    Run,
    /// The vCPU is halted until an interrupt of its platform: the loop waits
    /// for the local APIC's next timer deadline, a raised line or a kick, then
    /// asks [`Engine::prepare`] again.
    Wait,
    /// Return this exit to the VMM.
    Exit(VcpuExit<'static>),
    /// The engine itself failed: `run` returns this error.
    Fail(vcpu::VcpuError),
    /// Return the exit [`Engine::reply`] makes of this (one that borrows the
    /// engine's own buffers).
    Reply(R),
    /// The common handling of a CPU exit: port I/O to the PICs and the PIT is
    /// answered in the platform and the CPU runs on; anything else becomes
    /// the contract's exit ([`vcpu_exit`]).
    Common(CpuExit),
}

/// The hook of one engine on the software CPU.
pub trait Engine {
    /// Exits the engine describes itself (see [`Step::Reply`]).
    type Reply;
    /// The software CPU.
    fn cpu(&mut self) -> &mut Cpu;
    /// The VM's platform.
    fn platform(&self) -> &Platform;
    /// Before each slice: what must happen before guest code runs.
    fn prepare(&mut self) -> Step<Self::Reply> {
        Step::Run
    }
    /// Runs guest code until an exit or the end of a slice
    /// ([`CpuExit::Budget`], which the loop handles).
    fn slice(&mut self) -> CpuExit {
        self.cpu().run(SLICE)
    }
    /// What an exit of [`Engine::slice`] means to this engine.
    fn exit(&mut self, exit: CpuExit) -> Step<Self::Reply>;
    /// The contract exit of a [`Step::Reply`].
    fn reply(&mut self, reply: Self::Reply) -> VcpuExit<'_>;
}

/// The run loop of every engine on the software CPU: `Vcpu::run` of each is
/// this, with its hook. It returns `Interrupted` when the vCPU was kicked,
/// and otherwise only at an exit the VMM must handle.
pub fn run<E: Engine>(e: &mut E) -> Result<VcpuExit<'_>> {
    loop {
        if e.platform().lines.kick_handle().take() {
            return Ok(VcpuExit::Interrupted);
        }
        let step = match e.prepare() {
            Step::Run => match e.slice() {
                CpuExit::Budget => Step::Run,
                CpuExit::Debug(d) => Step::Exit(VcpuExit::Debug(d)),
                x => e.exit(x),
            },
            s => s,
        };
        match step {
            Step::Run => {}
            Step::Wait => {
                let lines = e.platform().lines.clone();
                wait_for_interrupt(e.cpu(), &lines);
            }
            Step::Exit(x) => return Ok(x),
            Step::Fail(e) => return Err(e),
            Step::Reply(r) => return Ok(e.reply(r)),
            Step::Common(x) => {
                if let Some(l) = e.platform().legacy.clone() {
                    if legacy_io(e.cpu(), &l, &x) {
                        continue;
                    }
                }
                return Ok(vcpu_exit(e.cpu(), x));
            }
        }
    }
}

/// What an exit means to an engine that runs the guest at its real
/// privilege (`emu`, `bt`): HLT waits in the engine when an interrupt can end
/// it (a local APIC, and IF set); everything gets the common handling.
pub fn plain_exit<R>(platform: &Platform, cpu: &Cpu, exit: CpuExit) -> Step<R> {
    match exit {
        CpuExit::Hlt if platform.has_lapic() && cpu.interrupts_enabled() => Step::Wait,
        e => Step::Common(e),
    }
}

/// Waits for the next interrupt of `cpu`'s local APIC (its timer, the PIT
/// behind it), a raised vector line, or a kick.
fn wait_for_interrupt(cpu: &Cpu, lines: &Lines) {
    let timeout = cpu
        .local_deadline()
        .map(|d| d.saturating_duration_since(Instant::now()));
    if timeout.is_some_and(|t| t.is_zero()) {
        return;
    }
    lines.wait(timeout);
}

/// Answers port I/O to the PICs and the PIT inside the engine, as KVM's
/// in-kernel irqchip does: true if `exit` was such an access (then the CPU
/// runs on, replaying an input).
pub fn legacy_io(cpu: &mut Cpu, legacy: &Mutex<Legacy>, exit: &CpuExit) -> bool {
    let (port, size, input) = match *exit {
        CpuExit::IoIn { port, size, .. } => (port, size, true),
        CpuExit::IoOut { port, size, .. } => (port, size, false),
        _ => return false,
    };
    if !legacy::claims_port(port) {
        return false;
    }
    legacy.lock().unwrap_or_else(|p| p.into_inner()).transfer(
        port,
        size as usize,
        cpu.exit_data(),
        input,
    );
    true
}

/// The engine-contract exit of a CPU exit that needs the VMM: port I/O, MMIO,
/// MSRs, HLT, shutdown, unimplemented. Intercepted events (which an engine
/// handles itself) become an internal-error `Unimplemented`.
pub fn vcpu_exit(cpu: &mut Cpu, exit: CpuExit) -> VcpuExit<'_> {
    match exit {
        CpuExit::IoIn { port, size, .. } => VcpuExit::IoIn {
            port,
            size,
            data: cpu.exit_data(),
        },
        CpuExit::IoOut { port, size, .. } => VcpuExit::IoOut {
            port,
            size,
            data: cpu.exit_data(),
        },
        CpuExit::MmioRead { addr } => VcpuExit::MmioRead {
            addr,
            data: cpu.exit_data(),
        },
        CpuExit::MmioWrite { addr } => VcpuExit::MmioWrite {
            addr,
            data: cpu.exit_data(),
        },
        CpuExit::MsrRead { index } => VcpuExit::MsrRead {
            index,
            data: &mut cpu.msr_data,
            fault: &mut cpu.msr_fault,
        },
        CpuExit::MsrWrite { index, value } => VcpuExit::MsrWrite {
            index,
            value,
            fault: &mut cpu.msr_fault,
        },
        CpuExit::Hlt => VcpuExit::Hlt,
        CpuExit::Shutdown => VcpuExit::Shutdown,
        CpuExit::Budget => VcpuExit::Interrupted,
        CpuExit::Unimplemented(what) => VcpuExit::Unimplemented { what },
        e @ (CpuExit::Exception { .. }
        | CpuExit::SoftInt { .. }
        | CpuExit::Syscall { .. }
        | CpuExit::Interrupt
        | CpuExit::Sensitive { .. }) => VcpuExit::Unimplemented {
            what: format!("internal: intercepted event {e:?} reached the VMM"),
        },
        CpuExit::Debug(d) => VcpuExit::Debug(d),
        CpuExit::VmExit => VcpuExit::Unimplemented {
            what: "a VM exit with no VMM to handle it".into(),
        },
    }
}

/// What the engines on the software CPU show a debugger's monitor
/// (`Vcpu::debug_info`): `apic`, the local APIC (and PICs/PIT); what else
/// an engine shows, it answers before asking this.
pub fn debug_info<E: Engine>(e: &mut E, what: &str) -> Option<String> {
    match what {
        "apic" => e.cpu().debug_local_state(),
        _ => None,
    }
}

/// The engine-contract methods of a vCPU whose state is the software CPU's
/// own (`emu`, `bt`): registers, system registers, the kick, memory written
/// by the VMM, TLB flushes. For a type with fields `cpu: Cpu` and
/// `platform: Arc<Platform>`; expands inside its `impl vcpu::Vcpu`.
#[macro_export]
macro_rules! plain_cpu_state {
    () => {
        fn regs(&self) -> vcpu::Result<vcpu::Regs> {
            Ok(self.cpu.regs())
        }

        fn set_regs(&mut self, regs: &vcpu::Regs) -> vcpu::Result<()> {
            self.cpu.set_regs(regs);
            Ok(())
        }

        fn sregs(&self) -> vcpu::Result<vcpu::SRegs> {
            Ok(self.cpu.sregs())
        }

        fn set_sregs(&mut self, sregs: &vcpu::SRegs) -> vcpu::Result<()> {
            self.cpu.set_sregs(sregs);
            Ok(())
        }

        fn kick(&self) -> std::sync::Arc<vcpu::Kick> {
            self.platform.kick()
        }

        fn memory_written(&mut self, gpa: u64, len: u64) {
            self.cpu.external_write(gpa, len);
        }

        /// The software CPU's TLB is all the translations there are.
        fn flush_tlb(&mut self) -> vcpu::Result<()> {
            self.cpu.flush_tlb(true);
            Ok(())
        }

        fn set_guest_debug(&mut self, debug: &vcpu::GuestDebug) -> vcpu::Result<()> {
            self.cpu.set_guest_debug(debug);
            Ok(())
        }

        fn time_paused(&mut self, paused: std::time::Duration) {
            self.cpu.time_paused(paused);
        }
    };
}
