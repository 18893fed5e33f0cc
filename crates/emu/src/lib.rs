//! Engine `emu`: no virtualization. visor's software x86-64 CPU (crates/x86)
//! runs the guest at its real privilege, every instruction interpreted; it is
//! the baseline of the other engines and their oracle.
//!
//! Port I/O, MMIO outside RAM and MSRs the CPU does not know leave the engine
//! as exits, like KVM's. With `irqchip`, the engine has the software platform
//! (crates/softplat: a local APIC whose timer runs on the host clock at 1 GHz
//! like KVM's, the PICs and the PIT) and [`vcpu::Vm::vector_line`] delivers
//! fixed interrupts into it; HLT then waits inside the engine for the next
//! interrupt. Without it, HLT exits. The run loop is the platform's
//! ([`softplat::run`]); this crate is its simplest hook.

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

/// The fuzzing harness of the software CPU (it lives with the platform, so
/// that every engine on the software CPU can use it).
pub use softplat::fuzz;

use std::sync::Arc;

use softplat::{Platform, Step};
use vcpu::{IrqLine, Result, Vcpu, VcpuExit};
use vm_memory::GuestMemoryMmap;
use x86::{Cpu, CpuExit};

/// Options of an `emu` virtual machine.
#[derive(Clone, Copy, Debug, Default)]
pub struct EmuConfig {
    /// Model a local APIC (timer, vector lines) and the PICs and PIT; HLT then
    /// waits for them.
    pub irqchip: bool,
    /// visor's paravirtual CPUID leaves (signature at 0x4000_0000, features at
    /// 0x4000_0001), as the `kvm` engine offers them.
    pub pv_signature: Option<[u8; 12]>,
    /// Log the guest's own VMX instructions and VM exits (nested VMX).
    pub trace_vmx: bool,
}

/// An `emu` virtual machine: guest memory and the software platform.
pub struct EmuVm {
    mem: GuestMemoryMmap<()>,
    config: EmuConfig,
    platform: Arc<Platform>,
}

impl EmuVm {
    /// A VM on guest memory `mem` (its regions are shared, not copied).
    pub fn new(mem: &GuestMemoryMmap<()>, config: EmuConfig) -> Result<EmuVm> {
        Ok(EmuVm {
            mem: mem.clone(),
            config,
            platform: Arc::new(Platform::new(config.irqchip, true)),
        })
    }

    /// The guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The software CPU `id`.
    fn create_cpu(&self, id: u32) -> Cpu {
        let cpuid = self.platform.cpuid(id, self.config.pv_signature);
        let mut cpu = self.platform.create_cpu(id, &self.mem, cpuid);
        cpu.vmx.trace = self.config.trace_vmx;
        cpu
    }

    /// The vCPU `id` of this VM.
    pub fn create_emu_vcpu(&mut self, id: u32) -> EmuVcpu {
        let cpu = self.create_cpu(id);
        EmuVcpu {
            cpu,
            platform: self.platform.clone(),
        }
    }
}

impl vcpu::Vm for EmuVm {
    fn create_vcpu(&mut self, id: u32) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(self.create_emu_vcpu(id)))
    }

    fn irq_line(&self, gsi: u32) -> Result<Option<Arc<dyn IrqLine>>> {
        Ok(self.platform.irq_line(gsi))
    }

    fn vector_line(&self, vector: u8) -> Result<Option<Arc<dyn IrqLine>>> {
        Ok(self.platform.apic_vector_line(vector))
    }
}

/// The vCPU of engine `emu`.
pub struct EmuVcpu {
    cpu: Cpu,
    platform: Arc<Platform>,
}

impl EmuVcpu {
    /// The software CPU itself (tests, benchmarks).
    pub fn cpu(&mut self) -> &mut Cpu {
        &mut self.cpu
    }
}

impl softplat::Engine for EmuVcpu {
    type Reply = std::convert::Infallible;

    fn cpu(&mut self) -> &mut Cpu {
        &mut self.cpu
    }

    fn platform(&self) -> &Platform {
        &self.platform
    }

    fn exit(&mut self, exit: CpuExit) -> Step<Self::Reply> {
        softplat::plain_exit(&self.platform, &self.cpu, exit)
    }

    fn reply(&mut self, reply: Self::Reply) -> VcpuExit<'_> {
        match reply {}
    }
}

impl Vcpu for EmuVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        softplat::run(self)
    }

    softplat::plain_cpu_state!();

    fn debug_info(&mut self, what: &str) -> Option<String> {
        softplat::debug_info(self, what)
    }

    fn engine_counters(&self) -> Vec<(String, u64)> {
        vec![("guest_instructions".into(), self.cpu.retired)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;
    use softplat::{lapic, legacy};
    use std::time::{Duration, Instant};
    use vcpu::Vm as _;
    use vcpu::{Regs, SRegs};
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

    /// The contract's kick: a guest that spins forever and one halted with
    /// nothing to wake it each come back with `Interrupted` when another
    /// thread kicks the vCPU, and not before.
    #[test]
    fn kick_interrupts_a_spinning_and_a_halted_guest() {
        let (mem, sregs) = long_mode_mem();
        let mut a = CodeAssembler::new(64).unwrap();
        let mut spin = a.create_label();
        a.out(0x80, al).unwrap();
        a.set_label(&mut spin).unwrap();
        a.pause().unwrap();
        a.jmp(spin).unwrap();
        mem.write_slice(&a.assemble(CODE).unwrap(), GuestAddress(CODE))
            .unwrap();
        let mut h = CodeAssembler::new(64).unwrap();
        h.sti().unwrap();
        h.hlt().unwrap();
        h.out(0x81, al).unwrap();
        mem.write_slice(&h.assemble(HANDLER).unwrap(), GuestAddress(HANDLER))
            .unwrap();
        let (_vm, mut vcpu) = vm_at_code(&mem, &sregs);
        // The first OUT shows the guest runs; then it spins without exits.
        assert!(matches!(
            vcpu.run().unwrap(),
            VcpuExit::IoOut { port: 0x80, .. }
        ));
        let kick = vcpu.kick();
        for round in 0..2 {
            let k = kick.clone();
            let t = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                k.kick();
            });
            let start = Instant::now();
            let e = vcpu.run().unwrap().name();
            assert_eq!(e, "interrupted", "round {round}");
            assert!(
                start.elapsed() >= Duration::from_millis(25),
                "round {round}"
            );
            t.join().unwrap();
            // Round 2: the guest halts with interrupts on and no timer.
            let mut r = vcpu.regs().unwrap();
            r.rip = HANDLER;
            vcpu.set_regs(&r).unwrap();
        }
    }

    /// The VMM's debugger on the software CPU: a breakpoint in code the
    /// guest rewrites stays (memory is not patched) and is passed when the
    /// run resumes there; read and write watchpoints stop after the
    /// instruction; a step runs one instruction, and one that exits to the
    /// VMM (OUT) ends its step after the exit; the guest's RFLAGS.TF and
    /// debug registers are untouched.
    #[test]
    fn guest_debug_breakpoints_watchpoints_and_steps() {
        use vcpu::{DebugEvent, GuestDebug, WatchKind, Watchpoint};
        const DATA: u64 = 0x20_0000;
        let (mem, sregs) = long_mode_mem();
        let mut a = CodeAssembler::new(64).unwrap();
        let mut target = a.create_label();
        a.lea(rbx, ptr(target)).unwrap();
        // The guest rewrites the instruction at `target` (a NOP, with the
        // same byte: a real write that drops what was decoded there).
        a.mov(byte_ptr(rbx), 0x90).unwrap();
        a.set_label(&mut target).unwrap();
        a.nop().unwrap();
        a.mov(rax, qword_ptr(DATA)).unwrap(); // read
        a.mov(qword_ptr(DATA + 8), rax).unwrap(); // write
        a.out(0x80, al).unwrap();
        a.nop().unwrap();
        a.hlt().unwrap();
        let code = a.assemble(CODE).unwrap();
        mem.write_slice(&code, GuestAddress(CODE)).unwrap();
        mem.write_obj(0x1234u64, GuestAddress(DATA)).unwrap();
        // Where each instruction is (by decoding the bytes).
        let mut d = iced_x86::Decoder::with_ip(64, &code, CODE, 0);
        let ips: Vec<u64> =
            std::iter::from_fn(|| d.can_decode().then(|| d.decode().ip())).collect();
        let (nop_at, write_at, out_at, after_out) = (ips[2], ips[4], ips[5], ips[6]);

        let (_vm, mut vcpu) = vm_at_code(&mem, &sregs);
        let dbg = GuestDebug {
            breakpoints: vec![nop_at],
            watchpoints: vec![
                Watchpoint {
                    addr: DATA,
                    len: 8,
                    kind: WatchKind::Read,
                },
                Watchpoint {
                    addr: DATA + 12,
                    len: 1,
                    kind: WatchKind::Write,
                },
            ],
            ..Default::default()
        };
        vcpu.set_guest_debug(&dbg).unwrap();
        let run = |vcpu: &mut Box<dyn Vcpu>| match vcpu.run().unwrap() {
            VcpuExit::Debug(e) => (e, vcpu.regs().unwrap().rip),
            e => panic!("unexpected exit {e:?}"),
        };
        assert_eq!(run(&mut vcpu), (DebugEvent::Breakpoint, nop_at));
        // Resumed at the breakpoint: passed; the read stops after the load.
        vcpu.set_guest_debug(&dbg).unwrap();
        assert_eq!(
            run(&mut vcpu),
            (
                DebugEvent::Watch {
                    addr: DATA,
                    kind: WatchKind::Read
                },
                write_at
            )
        );
        assert_eq!(vcpu.regs().unwrap().rax, 0x1234);
        vcpu.set_guest_debug(&dbg).unwrap();
        assert_eq!(
            run(&mut vcpu),
            (
                DebugEvent::Watch {
                    addr: DATA + 12,
                    kind: WatchKind::Write
                },
                out_at
            )
        );
        // A step over OUT: the port exit first, then the step's end.
        let step = GuestDebug {
            single_step: true,
            ..Default::default()
        };
        vcpu.set_guest_debug(&step).unwrap();
        assert!(matches!(
            vcpu.run().unwrap(),
            VcpuExit::IoOut { port: 0x80, .. }
        ));
        assert_eq!(run(&mut vcpu), (DebugEvent::Step, after_out));
        assert_eq!(vcpu.regs().unwrap().rflags & (1 << 8), 0, "TF untouched");
        // Without debugging the guest runs on to HLT.
        vcpu.set_guest_debug(&GuestDebug::default()).unwrap();
        assert!(matches!(vcpu.run().unwrap(), VcpuExit::Hlt));
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
