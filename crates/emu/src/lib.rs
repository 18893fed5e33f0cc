//! Engine `emu`: no virtualization. visor's software x86-64 CPU (crates/x86)
//! runs the guest at its real privilege, every instruction interpreted; it is
//! the baseline of the other engines and their oracle.
//!
//! Port I/O, MMIO outside RAM and MSRs the CPU does not know leave the engine
//! as exits, like KVM's. With `irqchip`, the engine models a local APIC
//! (lapic.rs; its timer runs on the host clock at 1 GHz like KVM's) and
//! [`vcpu::Vm::vector_line`] delivers fixed interrupts into it; HLT then waits
//! inside the engine for the next interrupt. Without it, HLT exits.

pub mod fuzz;
pub mod lapic;
pub mod legacy;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vcpu::{IrqLine, Regs, Result, SRegs, Vcpu, VcpuExit};
use vm_memory::GuestMemoryMmap;
use x86::{Cpu, CpuExit, CpuidTable, PhysMem};

pub use lapic::{Lapic, Lines};
pub use legacy::Legacy;

/// Instructions per `Cpu::run` call: the local APIC is polled in between.
pub const SLICE: u64 = 20_000;
/// Longest time `run` stays in the engine without an exit, so that the VMM can
/// notice a stop request (`--timeout`).
pub const MAX_RUN: Duration = Duration::from_millis(20);

/// The VMM notices a stop request (`--timeout`) only on `Interrupted`, and a
/// signal does not interrupt the software CPU: the engines built on it return
/// `Interrupted` at least every [`MAX_RUN`], however often the guest exits
/// otherwise. This keeps the time of the current period.
#[derive(Default)]
pub struct RunClock {
    last: Option<Instant>,
}

impl RunClock {
    /// When the current period began (the first `run`, or the last
    /// `Interrupted`).
    pub fn start(&mut self) -> Instant {
        *self.last.get_or_insert_with(Instant::now)
    }

    /// Whether the period that began at `start` is over; if so, the next one
    /// begins now and `run` is to return `Interrupted`.
    pub fn expired(&mut self, start: Instant) -> bool {
        if start.elapsed() < MAX_RUN {
            return false;
        }
        self.restart();
        true
    }

    /// Begins a new period (`run` returns `Interrupted` for another reason).
    pub fn restart(&mut self) {
        self.last = Some(Instant::now());
    }
}

/// Options of an `emu` virtual machine.
#[derive(Clone, Copy, Debug, Default)]
pub struct EmuConfig {
    /// Model a local APIC (timer, vector lines); HLT then waits for it.
    pub irqchip: bool,
    /// visor's paravirtual CPUID leaves (signature at 0x4000_0000, features at
    /// 0x4000_0001), as the `kvm` engine offers them.
    pub pv_signature: Option<[u8; 12]>,
    /// Log the guest's own VMX instructions and VM exits (nested VMX).
    pub trace_vmx: bool,
}

pub struct EmuVm {
    mem: GuestMemoryMmap<()>,
    config: EmuConfig,
    lines: Arc<Lines>,
    /// With `irqchip`: the PICs and the PIT.
    legacy: Option<Arc<Mutex<Legacy>>>,
}

impl EmuVm {
    /// A VM on guest memory `mem` (its regions are shared, not copied).
    pub fn new(mem: &GuestMemoryMmap<()>, config: EmuConfig) -> Result<EmuVm> {
        Ok(EmuVm {
            mem: mem.clone(),
            config,
            lines: Arc::new(Lines::default()),
            legacy: config
                .irqchip
                .then(|| Arc::new(Mutex::new(Legacy::default()))),
        })
    }

    /// The CPUID table of the engine's CPU.
    pub fn cpuid(&self, id: u32) -> CpuidTable {
        let pv = self.config.pv_signature.map(|sig| {
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
        let mut t = CpuidTable::software_cpu(self.config.irqchip, pv);
        let (a, b, c, d) = t.query(1, 0);
        t.set(1, None, [a, (b & 0x00ff_ffff) | (id << 24), c, d]);
        t
    }

    /// The guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The vector lines of the local APICs (they wake a halted vCPU).
    pub fn lines(&self) -> Arc<Lines> {
        self.lines.clone()
    }

    /// A software CPU `id` with physical memory `mem` (the guest's, or more),
    /// the engine's CPUID table and, with `irqchip`, a local APIC.
    pub fn create_cpu(&self, id: u32, mem: &GuestMemoryMmap) -> Cpu {
        let mut cpu = Cpu::new(PhysMem::new(mem), self.cpuid(id));
        cpu.vmx.trace = self.config.trace_vmx;
        // VISOR_EMU_TRACE=1 prints every instruction (debugging only).
        cpu.trace = std::env::var_os("VISOR_EMU_TRACE").is_some_and(|v| v == "1");
        if self.config.irqchip {
            let mut lapic = Lapic::new(id, self.lines.clone());
            if let Some(l) = self.legacy.clone().filter(|_| id == 0) {
                lapic = lapic.with_legacy(l);
            }
            cpu.local = Some(Box::new(lapic));
        }
        cpu
    }

    /// The PICs and the PIT (with `irqchip`; engines that answer their
    /// ports use [`legacy_io`]).
    pub fn legacy(&self) -> Option<Arc<Mutex<Legacy>>> {
        self.legacy.clone()
    }

    pub fn create_emu_vcpu(&mut self, id: u32) -> EmuVcpu {
        let cpu = self.create_cpu(id, &self.mem);
        EmuVcpu {
            cpu,
            irqchip: self.config.irqchip,
            lines: self.lines.clone(),
            legacy: self.legacy(),
            clock: RunClock::default(),
        }
    }
}

/// Waits for the next interrupt of `cpu`'s local APIC (its timer) or of a
/// vector line, at most until MAX_RUN has passed since `start`: false if
/// that time is up.
pub fn wait_for_interrupt(cpu: &Cpu, lines: &Lines, start: Instant) -> bool {
    let now = Instant::now();
    let left = MAX_RUN.saturating_sub(now - start);
    if left.is_zero() {
        return false;
    }
    let wait = match cpu.local_deadline() {
        Some(d) => d.saturating_duration_since(now).min(left),
        None => left,
    };
    if !wait.is_zero() {
        lines.wait(wait);
    }
    true
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
        CpuExit::VmExit => VcpuExit::Unimplemented {
            what: "a VM exit with no VMM to handle it".into(),
        },
    }
}

/// A fixed interrupt with one vector to vCPU 0 (also the event line of the
/// engines built on the software CPU).
pub struct VectorLine {
    lines: Arc<Lines>,
    vector: u8,
}

impl VectorLine {
    pub fn new(lines: Arc<Lines>, vector: u8) -> VectorLine {
        VectorLine { lines, vector }
    }
}

impl IrqLine for VectorLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.lines.raise(self.vector);
        Ok(())
    }
}

impl vcpu::Vm for EmuVm {
    fn create_vcpu(&mut self, id: u32) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(self.create_emu_vcpu(id)))
    }

    fn irq_line(&self, gsi: u32) -> Result<Option<Arc<dyn IrqLine>>> {
        // ISA IRQs go to the PICs.
        let Some(legacy) = self.legacy().filter(|_| gsi < 16) else {
            return Ok(None);
        };
        Ok(Some(Arc::new(legacy::IrqPin {
            legacy,
            lines: self.lines.clone(),
            irq: gsi as u8,
        })))
    }

    fn vector_line(&self, vector: u8) -> Result<Option<Arc<dyn IrqLine>>> {
        if !self.config.irqchip {
            return Ok(None);
        }
        Ok(Some(Arc::new(VectorLine::new(self.lines.clone(), vector))))
    }
}

pub struct EmuVcpu {
    cpu: Cpu,
    irqchip: bool,
    lines: Arc<Lines>,
    legacy: Option<Arc<Mutex<Legacy>>>,
    clock: RunClock,
}

impl EmuVcpu {
    /// The software CPU itself (tests, benchmarks).
    pub fn cpu(&mut self) -> &mut Cpu {
        &mut self.cpu
    }
}

impl Vcpu for EmuVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        // The VMM may have written guest memory since the last exit.
        self.cpu.note_external_writes();
        let start = self.clock.start();
        if self.clock.expired(start) {
            return Ok(VcpuExit::Interrupted);
        }
        let exit = loop {
            match self.cpu.run(SLICE) {
                CpuExit::Budget => {
                    if self.clock.expired(start) {
                        return Ok(VcpuExit::Interrupted);
                    }
                }
                CpuExit::Hlt => {
                    if !self.irqchip || !self.cpu.interrupts_enabled() {
                        return Ok(VcpuExit::Hlt);
                    }
                    if !wait_for_interrupt(&self.cpu, &self.lines, start) {
                        self.clock.restart();
                        return Ok(VcpuExit::Interrupted);
                    }
                }
                e => {
                    if let Some(l) = &self.legacy {
                        if legacy_io(&mut self.cpu, l, &e) {
                            continue;
                        }
                    }
                    break e;
                }
            }
        };
        Ok(vcpu_exit(&mut self.cpu, exit))
    }

    fn regs(&self) -> Result<Regs> {
        Ok(self.cpu.regs())
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<()> {
        self.cpu.set_regs(regs);
        Ok(())
    }

    fn sregs(&self) -> Result<SRegs> {
        Ok(self.cpu.sregs())
    }

    fn set_sregs(&mut self, sregs: &SRegs) -> Result<()> {
        self.cpu.set_sregs(sregs);
        Ok(())
    }

    fn engine_counters(&self) -> Vec<(String, u64)> {
        vec![("guest_instructions".into(), self.cpu.retired)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;
    use vcpu::Vm as _;
    use vm_memory::{Bytes, GuestAddress};

    const CODE: u64 = 0x10_0000;
    const HANDLER: u64 = 0x10_0800;
    const IDT: u64 = 0x8000;

    /// 16 MiB of guest memory with visor's long-mode boot state and an IDT
    /// at IDT (0xfee0_0000 is inside the boot identity map of 4 GiB).
    fn long_mode_mem() -> (GuestMemoryMmap<()>, SRegs) {
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let mut sregs = machine::boot::long_mode(&mem).unwrap();
        sregs.idt = vcpu::DescriptorTable {
            base: IDT,
            limit: 0xfff,
        };
        (mem, sregs)
    }

    /// An `emu` VM with an irqchip and its vCPU 0, about to run CODE.
    fn vm_at_code(mem: &GuestMemoryMmap<()>, sregs: &SRegs) -> (EmuVm, Box<dyn Vcpu>) {
        let mut vm = EmuVm::new(
            mem,
            EmuConfig {
                irqchip: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        vcpu.set_sregs(sregs).unwrap();
        vcpu.set_regs(&Regs {
            rip: CODE,
            rsp: 0x8_0000,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
        (vm, vcpu)
    }

    /// A vector line raised from another thread wakes `sti; hlt` through the
    /// local APIC; the handler's EOI and port write come back as exits.
    #[test]
    fn vector_line_wakes_halted_guest() {
        let (mem, sregs) = long_mode_mem();
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(rbx, lapic::APIC_BASE).unwrap();
        a.mov(dword_ptr(rbx + 0xf0), 0x1ff).unwrap(); // SVR: enable
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.sti().unwrap();
        a.hlt().unwrap();
        a.jmp(l).unwrap();
        let code = a.assemble(CODE).unwrap();
        mem.write_slice(&code, GuestAddress(CODE)).unwrap();
        let mut h = CodeAssembler::new(64).unwrap();
        h.mov(dword_ptr(rbx + 0xb0), 0).unwrap(); // EOI
        h.mov(al, 0x42).unwrap();
        h.out(0x80, al).unwrap();
        h.iretq().unwrap();
        mem.write_slice(&h.assemble(HANDLER).unwrap(), GuestAddress(HANDLER))
            .unwrap();
        let lo: u64 = (HANDLER & 0xffff)
            | (0x10 << 16)
            | (0x8e00u64 << 32)
            | ((HANDLER >> 16 & 0xffff) << 48);
        mem.write_obj(lo, GuestAddress(IDT + 0x50 * 16)).unwrap();
        mem.write_obj(0u64, GuestAddress(IDT + 0x50 * 16 + 8))
            .unwrap();

        let (vm, mut vcpu) = vm_at_code(&mem, &sregs);
        let line = vm.vector_line(0x50).unwrap().expect("a vector line");
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            line.trigger().unwrap();
        });
        let mut interrupted = 0;
        loop {
            match vcpu.run().unwrap() {
                VcpuExit::Interrupted => interrupted += 1,
                VcpuExit::IoOut { port, data, .. } => {
                    assert_eq!((port, data.to_vec()), (0x80, vec![0x42]));
                    break;
                }
                e => panic!("unexpected exit {e:?}"),
            }
            assert!(interrupted < 100, "the interrupt never came");
        }
        t.join().unwrap();
        assert!(vcpu.engine_counters()[0].1 >= 6);
        assert!(vm.irq_line(16).unwrap().is_none(), "ISA IRQs only");
    }

    /// The legacy platform end to end: the guest programs the PICs (vectors
    /// 0x20-0x2f) and the PIT's channel 0 (periodic, 2 ms) with port I/O that
    /// the engine answers itself, then halts; IRQ 0 comes in through LINT0
    /// (ExtINT), and IRQ 4 from a device thread wakes it too. Each handler
    /// reports on port 0x80 and sends the PIC an EOI.
    #[test]
    fn pic_and_pit_interrupts_reach_a_halted_guest() {
        let (mem, sregs) = long_mode_mem();
        let mut a = CodeAssembler::new(64).unwrap();
        for (port, v) in legacy::PIC_INIT.into_iter().chain([
            (0x21, 0xec), // unmask IRQ 0, 1 and 4
            (0x43, 0x34), // channel 0: lo/hi, mode 2
            (0x40, 0x9a),
            (0x40, 0x09), // 2458 ticks: about 2 ms
        ]) {
            a.mov(al, v as i32).unwrap();
            a.out(port as i32, al).unwrap();
        }
        a.in_(al, 0x21).unwrap();
        a.out(0x81, al).unwrap(); // the mask reads back
        let mut l = a.create_label();
        a.set_label(&mut l).unwrap();
        a.sti().unwrap();
        a.hlt().unwrap();
        a.jmp(l).unwrap();
        mem.write_slice(&a.assemble(CODE).unwrap(), GuestAddress(CODE))
            .unwrap();
        for (vector, tag) in [(0x20u64, 0xa0u8), (0x24, 0xa4)] {
            let at = HANDLER + (vector - 0x20) * 0x40;
            let mut h = CodeAssembler::new(64).unwrap();
            h.push(rax).unwrap();
            h.mov(al, tag as i32).unwrap();
            h.out(0x80, al).unwrap();
            h.mov(al, 0x20).unwrap();
            h.out(0x20, al).unwrap(); // EOI
            h.pop(rax).unwrap();
            h.iretq().unwrap();
            mem.write_slice(&h.assemble(at).unwrap(), GuestAddress(at))
                .unwrap();
            let lo: u64 =
                (at & 0xffff) | (0x10 << 16) | (0x8e00u64 << 32) | ((at >> 16 & 0xffff) << 48);
            mem.write_obj(lo, GuestAddress(IDT + vector * 16)).unwrap();
            mem.write_obj(0u64, GuestAddress(IDT + vector * 16 + 8))
                .unwrap();
        }
        let (vm, mut vcpu) = vm_at_code(&mem, &sregs);
        let irq4 = vm.irq_line(4).unwrap().expect("ISA IRQ 4");
        let start = Instant::now();
        let (mut ticks, mut irq4_seen, mut mask) = (0, false, None);
        let mut fired = false;
        while start.elapsed() < Duration::from_secs(5) && (ticks < 5 || !irq4_seen) {
            if ticks >= 2 && !fired {
                irq4.trigger().unwrap();
                fired = true;
            }
            match vcpu.run().unwrap() {
                VcpuExit::Interrupted => {}
                VcpuExit::IoOut {
                    port: 0x81, data, ..
                } => mask = Some(data[0]),
                VcpuExit::IoOut {
                    port: 0x80, data, ..
                } => match data[0] {
                    0xa0 => ticks += 1,
                    0xa4 => irq4_seen = true,
                    v => panic!("unexpected tag {v:#x}"),
                },
                e => panic!("unexpected exit {e:?}"),
            }
        }
        assert_eq!(mask, Some(0xec));
        assert!(ticks >= 5, "PIT ticks: {ticks}");
        assert!(irq4_seen, "IRQ 4 from the device line");
        // 5 ticks of 2 ms: not much sooner than 10 ms.
        assert!(start.elapsed() >= Duration::from_millis(8));
    }
}
