//! A harness for tiny guests assembled in the tests: a 16 MiB VM in visor's
//! 64-bit boot state, a recording device on ports 0x80..0x84 and on an MMIO
//! page, the isa-debug-exit port, and helpers to install IDT gates.

use std::sync::{Arc, Mutex};

use iced_x86::code_asm::*;
use machine::bus::{Action, Device};
use vcpu::{DescriptorTable, Regs, SRegs};
use visor::{Engine, Outcome, Stats, Vm, VmOptions};
use vm_memory::{Bytes, GuestAddress};

pub const CODE: u64 = 0x10_0000;
pub const DATA: u64 = 0x11_0000;
pub const IDT: u64 = 0x8000;
pub const STACK: u64 = 0x80000;

/// Records every access; reads return `base + offset` in each byte.
#[derive(Default)]
pub struct Recorder {
    pub writes: Vec<(u64, Vec<u8>)>,
    pub reads: Vec<(u64, usize)>,
}

impl Device for Recorder {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.reads.push((offset, data.len()));
        for (i, b) in data.iter_mut().enumerate() {
            *b = 0xa0u8.wrapping_add(offset as u8).wrapping_add(i as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Action {
        self.writes.push((offset, data.to_vec()));
        Action::Continue
    }
}

pub struct Guest {
    pub vm: Vm,
    pub ports: Arc<Mutex<Recorder>>,
    pub mmio: Arc<Mutex<Recorder>>,
    pub stats: Stats,
}

pub const PORT_BASE: u64 = 0x80;
pub const MMIO_BASE: u64 = 0xd000_0000;

impl Guest {
    /// A 16 MiB guest in 64-bit long mode (visor's boot state), `code` at CODE.
    pub fn long_mode(engine: Engine, code: &[u8]) -> Guest {
        Guest::long_mode_with(engine, code, VmOptions::default())
    }

    /// As [`Guest::long_mode`], with VM options.
    pub fn long_mode_with(engine: Engine, code: &[u8], opts: VmOptions) -> Guest {
        let vm = Vm::new(engine, 16 << 20, opts).expect("create vm");
        let sregs = machine::boot::long_mode(&vm.mem).unwrap();
        vm.mem.write_slice(code, GuestAddress(CODE)).unwrap();
        Guest::start(vm, engine, &sregs)
    }

    /// `vm` set to start at CODE, RSP at STACK, in the mode of `sregs`.
    pub fn start(mut vm: Vm, engine: Engine, sregs: &SRegs) -> Guest {
        let regs = Regs {
            rip: CODE,
            rsp: STACK,
            rflags: 2,
            ..Default::default()
        };
        vm.set_cpu_state(&regs, sregs).unwrap();
        Guest::finish(vm, engine)
    }

    pub fn finish(mut vm: Vm, engine: Engine) -> Guest {
        let ports = Arc::new(Mutex::new(Recorder::default()));
        let mmio = Arc::new(Mutex::new(Recorder::default()));
        vm.pio.insert(PORT_BASE, 4, ports.clone()).unwrap();
        vm.pio
            .insert(
                abi::port::DEBUG_EXIT as u64,
                1,
                Arc::new(Mutex::new(machine::devices::DebugExit)),
            )
            .unwrap();
        vm.mmio.insert(MMIO_BASE, 0x1000, mmio.clone()).unwrap();
        Guest {
            vm,
            ports,
            mmio,
            stats: Stats::new(engine.name()),
        }
    }

    pub fn run(&mut self) -> Outcome {
        self.vm.run(&mut self.stats).expect("engine error")
    }

    pub fn regs(&self) -> Regs {
        self.vm.vcpu.regs().unwrap()
    }

    pub fn exits(&self, name: &str) -> u64 {
        self.stats.exits.get(name).map_or(0, |e| e.count)
    }
}

/// Registers the hypercall page at `page` as the engine's guest kernel can:
/// WRMSR to the hypercall-page MSR, or under `pv`, whose kernel may not
/// execute WRMSR, the bootstrap hypercall through a bare `int 0x82` (RAX:
/// its result).
pub fn hypercall_page(a: &mut CodeAssembler, engine: Engine, page: u64) -> Result<(), IcedError> {
    if engine == Engine::Pv {
        a.mov(eax, hypercall::nr::SET_HYPERCALL_PAGE as u32)?;
        a.mov(rdi, page | 1)?;
        a.int(0x82)
    } else {
        a.mov(ecx, hypercall::MSR_HYPERCALL_PAGE)?;
        a.mov(eax, (page | 1) as u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()
    }
}

/// The start of the last 2 MiB of the address space.
pub const TOP: u64 = 0xffff_ffff_ffe0_0000;

/// Maps the last 2 MiB of the address space (from [`TOP`]) to guest-physical
/// `frame` (2 MiB aligned), through new tables at `tables` (two pages) linked
/// into the boot page tables: hypercall arguments up there then translate, and
/// only the VMM's address arithmetic can fail.
pub fn map_top(g: &Guest, tables: u64, frame: u64) {
    let (pdpt, pd) = (tables, tables + 0x1000);
    for (at, entry) in [
        (abi::BOOT_PML4 + 511 * 8, pdpt | 3),
        (pdpt + 511 * 8, pd | 3),
        (pd + 511 * 8, frame | 0x83),
    ] {
        g.vm.mem.write_obj(entry, GuestAddress(at)).unwrap();
    }
}

/// The address of hypercall `n`'s stub in the hypercall page at `page`.
pub fn stub(page: u64, n: u64) -> u64 {
    page + n * hypercall::STUB_SIZE as u64
}

pub fn asm64(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(CODE).unwrap()
}

pub fn assert_halted(o: &Outcome) {
    assert!(
        matches!(o, Outcome::Halted { .. }),
        "expected HLT, got {o:?}"
    );
}

/// Writes a 64-bit interrupt gate for `vector` to the IDT at IDT and loads
/// IDTR with that table.
pub fn set_gate(g: &mut Guest, vector: u64, handler: u64) {
    let lo: u64 = (handler & 0xffff)
        | ((abi::SEL_CODE64 as u64) << 16)
        | (0x8e00u64 << 32)
        | ((handler >> 16 & 0xffff) << 48);
    let hi: u64 = handler >> 32;
    g.vm.mem
        .write_obj(lo, GuestAddress(IDT + vector * 16))
        .unwrap();
    g.vm.mem
        .write_obj(hi, GuestAddress(IDT + vector * 16 + 8))
        .unwrap();
    let mut s = g.vm.vcpu.sregs().unwrap();
    s.idt = DescriptorTable {
        base: IDT,
        limit: 256 * 16 - 1,
    };
    g.vm.vcpu.set_sregs(&s).unwrap();
}
