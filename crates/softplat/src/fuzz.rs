//! Fuzzing harness of the software CPU and the engines built on it: arbitrary bytes run as guest code in
//! 64-bit mode, at CPL 3 or CPL 0, for a bounded number of instructions, with
//! every exit (port I/O, MMIO, MSRs) answered. Whatever the bytes are, the CPU
//! must not panic and must come back within its budget.
//!
//! [`exec_bytes`] is the one harness: the cargo-fuzz target
//! (fuzz/fuzz_targets/exec_bytes.rs) calls it under libFuzzer, and
//! crates/emu/tests/exec_bytes.rs calls it on pseudo-random inputs so that
//! `cargo test` exercises it on stable Rust.
//!
//! The input is a flags byte, then the code:
//!
//! | flags bit | meaning |
//! |---|---|
//! | 0 | run at CPL 0 (else CPL 3) |
//! | 1 | with a local APIC (MMIO at 0xfee0_0000, timer, self-IPIs) |
//! | 2 | RFLAGS.IF set |
//! | 3 | RFLAGS.IOPL 3 (port I/O allowed at CPL 3) |
//! | 4 | MSRs the VMM answers (0x4000_0000..=0x4000_ffff) fault |
//! | 5 | port, MMIO and MSR reads return all ones (else the input's bytes, cycled) |
//! | 6, 7 | ignored |
//!
//! The guest has 4 MiB of RAM, identity-mapped with 2 MiB pages over the first
//! 4 GiB (everything above RAM is MMIO). The first 2 MiB (GDT, IDT, TSS, page
//! tables, handler, kernel stack) are supervisor-only; the code is at 2 MiB in a
//! user page, followed by a page of `hlt`, with the user stack in the same
//! 2 MiB page. Every IDT gate (DPL 3) and LSTAR lead to a `hlt`, which ends the
//! run.

use std::sync::Arc;

use arch::pte::{P, PS, RW, US};
use arch::{cr0, cr4, efer, gdt_entry, rflags};
use vcpu::{DescriptorTable, Regs, SRegs, Segment};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use x86::{Cpu, CpuExit, CpuidTable, PhysMem};

use crate::{Lapic, Lines};

/// Instructions (and delivered exceptions) one input may use.
pub const BUDGET: u64 = 20_000;
/// Exits one input may take; each exit is one `Cpu::run`.
const MAX_EXITS: u64 = 4_000;

const RAM: u64 = 4 << 20;
const GDT: u64 = 0x1000;
const IDT: u64 = 0x2000;
const TSS: u64 = 0x3000;
const PML4: u64 = 0x4000;
const PDPT: u64 = 0x5000;
/// Four page directories, one per GiB.
const PD: u64 = 0x6000;
const HANDLER: u64 = 0xa000;
const KSTACK: u64 = 0x10_0000;
/// The pseudo-random numbers of the seeded harness runs (xorshift64*): the
/// same inputs on every run of `cargo test`.
pub struct Rng(pub u64);

impl Rng {
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Where the code runs.
pub const CODE: u64 = 0x20_0000;
/// Code longer than this is cut.
pub const MAX_CODE: usize = 0x10_0000;
const USTACK: u64 = CODE + MAX_CODE as u64 + 0x1000;

const SEL_KCODE: u16 = 0x08;
const SEL_KDATA: u16 = 0x10;
const SEL_UDATA: u16 = 0x1b;
const SEL_UCODE: u16 = 0x23;
const SEL_TSS: u16 = 0x28;

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum End {
    /// The instruction budget is used up.
    Budget,
    /// HLT (the handler of every exception and interrupt, or the code's own).
    Hlt,
    /// Triple fault.
    Shutdown,
    /// A valid instruction the CPU does not implement.
    Unimplemented,
    /// The exit limit was reached.
    Exits,
    /// An event for an engine (intercepts, a VM exit to a Rust VMM), which
    /// this harness never asks for.
    Event,
}

/// What one input did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Instructions retired.
    pub instructions: u64,
    /// Exits by kind: port input, port output, MMIO read, MMIO write, MSR read,
    /// MSR write.
    pub exits: [u64; 6],
    /// How the run ended.
    pub end: Option<End>,
    /// The registers at the end.
    pub regs: Option<Regs>,
    /// A hash of guest memory at the end (FNV-1a over all of RAM), if asked
    /// for; else 0.
    pub mem_hash: u64,
}

/// What the harness answers reads with: the input's own bytes, over and over
/// (so that the fuzzer steers them too), or all ones.
struct Answers<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Answers<'_> {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.bytes[self.pos % self.bytes.len()];
            self.pos = self.pos.wrapping_add(1);
        }
    }

    fn u64(&mut self) -> u64 {
        let mut b = [0; 8];
        self.fill(&mut b);
        u64::from_le_bytes(b)
    }
}

/// Writes the page tables, descriptor tables and handler; the CPU state to
/// start `code` with.
fn build(mem: &GuestMemoryMmap<()>, code: &[u8], flags: u8) -> Option<(Regs, SRegs)> {
    let w = |v: u64, at: u64| mem.write_obj(v, GuestAddress(at)).ok();
    w(PDPT | P | RW | US, PML4)?;
    for gib in 0..4u64 {
        let pd = PD + gib * 0x1000;
        w(pd | P | RW | US, PDPT + gib * 8)?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            let user = if addr == 0 { 0 } else { US };
            w(addr | P | RW | PS | user, pd + i * 8)?;
        }
    }
    let gdt = [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // 0x08 kernel code64
        gdt_entry(0xc093, 0, 0xfffff), // 0x10 kernel data
        gdt_entry(0xc0f3, 0, 0xfffff), // 0x18 user data
        gdt_entry(0xa0fb, 0, 0xfffff), // 0x20 user code64
        // 0x28: 64-bit TSS, busy (16 bytes).
        gdt_entry(0x008b, TSS, 0x67),
        TSS >> 32,
    ];
    for (i, e) in gdt.iter().enumerate() {
        w(*e, GDT + 8 * i as u64)?;
    }
    w(KSTACK << 32, TSS)?; // RSP0 at offset 4
    w(KSTACK >> 32, TSS + 8)?;
    for v in 0..256u64 {
        let lo = (HANDLER & 0xffff)
            | ((SEL_KCODE as u64) << 16)
            | (0xee00u64 << 32) // present, DPL 3, 64-bit interrupt gate
            | ((HANDLER >> 16 & 0xffff) << 48);
        w(lo, IDT + 16 * v)?;
        w(HANDLER >> 32, IDT + 16 * v + 8)?;
    }
    mem.write_slice(&[0xf4, 0xeb, 0xfd], GuestAddress(HANDLER)) // 1: hlt; jmp 1b
        .ok()?;
    mem.write_slice(code, GuestAddress(CODE)).ok()?;
    // Running off the end of the code halts (or faults into the handler at
    // CPL 3) instead of executing zeroed memory for the rest of the budget.
    mem.write_slice(&[0xf4; 0x1000], GuestAddress(CODE + code.len() as u64))
        .ok()?;

    let kernel = flags & 1 != 0;
    let (cs, ss) = if kernel {
        (
            Segment::flat(SEL_KCODE, true, true, false),
            Segment::flat(SEL_KDATA, false, false, true),
        )
    } else {
        (
            Segment::flat(SEL_UCODE, true, true, false),
            Segment::flat(SEL_UDATA, false, false, true),
        )
    };
    let sregs = SRegs {
        cs,
        ss,
        ds: ss,
        es: ss,
        fs: ss,
        gs: ss,
        tr: Segment::tss(SEL_TSS, TSS, 0x67),
        ldt: Segment {
            unusable: true,
            ..Default::default()
        },
        gdt: DescriptorTable {
            base: GDT,
            limit: (gdt.len() * 8 - 1) as u16,
        },
        idt: DescriptorTable {
            base: IDT,
            limit: 256 * 16 - 1,
        },
        cr0: cr0::PG | cr0::AM | cr0::WP | cr0::NE | cr0::ET | cr0::MP | cr0::PE,
        cr3: PML4,
        cr4: cr4::OSXMMEXCPT | cr4::OSFXSR | cr4::PGE | cr4::PAE,
        efer: efer::NXE | efer::LMA | efer::LME | efer::SCE,
        ..Default::default()
    };
    let mut rflags = rflags::FIXED;
    if flags & 4 != 0 {
        rflags |= rflags::IF;
    }
    if flags & 8 != 0 {
        rflags |= rflags::IOPL;
    }
    // Registers: pointers into RAM, MMIO and the APIC, and boundary values.
    let regs = Regs {
        rax: 0,
        rcx: 1,
        rdx: u64::MAX,
        rbx: CODE + 0x800,
        rsp: USTACK,
        rbp: USTACK - 0x100,
        rsi: CODE + 0x400,
        rdi: CODE + 0xc00,
        r8: 1 << 63,
        r9: 0xfee0_0000,
        r10: RAM,
        r11: 0x7fff_ffff,
        r12: 0x8000_0000,
        r13: 0xffff_8000_0000_0000,
        r14: 0x1234_5678_9abc_def0,
        r15: 0x80,
        rip: CODE,
        rflags,
    };
    Some((regs, sregs))
}

/// Runs `data` (a flags byte, then code) on a fresh software CPU; see the
/// module documentation. Never panics, whatever `data` is.
pub fn exec_bytes(data: &[u8]) -> Report {
    exec_bytes_with(data, false, |_| {}, |cpu, left, _: &mut ()| cpu.run(left))
}

/// [`exec_bytes`] with the CPU run by `run` (`Cpu::run`, or `Cpu::run_accel`
/// with an engine's accelerator made by `setup` on the CPU): the harness
/// of every engine built on the software CPU. With `hash_memory`, the report
/// has a hash of guest memory at the end (for comparing engines; 4 MiB to
/// read).
pub fn exec_bytes_with<S>(
    data: &[u8],
    hash_memory: bool,
    setup: impl FnOnce(&mut Cpu) -> S,
    run: impl FnMut(&mut Cpu, u64, &mut S) -> CpuExit,
) -> Report {
    exec_bytes_budget(data, hash_memory, BUDGET, setup, run)
}

/// [`exec_bytes_with`] with a budget of `budget` instructions instead of
/// [`BUDGET`] (an engine that may run past the budget is compared with the
/// oracle run for as many instructions as it ran).
pub fn exec_bytes_budget<S>(
    data: &[u8],
    hash_memory: bool,
    budget: u64,
    setup: impl FnOnce(&mut Cpu) -> S,
    mut run: impl FnMut(&mut Cpu, u64, &mut S) -> CpuExit,
) -> Report {
    let mut report = Report::default();
    let Some((&flags, code)) = data.split_first() else {
        return report;
    };
    let code = &code[..code.len().min(MAX_CODE)];
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]) else {
        return report;
    };
    let Some((regs, sregs)) = build(&mem, code, flags) else {
        return report;
    };
    let mut cpu = Cpu::new(
        PhysMem::new(&mem),
        CpuidTable::software_cpu(flags & 2 != 0, None),
    );
    if flags & 2 != 0 {
        cpu.local = Some(Box::new(Lapic::new(0, Arc::new(Lines::default()))));
    }
    cpu.msr.star = ((SEL_UDATA as u64 - 8) << 48) | ((SEL_KCODE as u64) << 32);
    cpu.msr.lstar = HANDLER;
    cpu.set_sregs(&sregs);
    cpu.set_regs(&regs);
    let mut state = setup(&mut cpu);
    let mut answers = Answers {
        bytes: if flags & 0x20 != 0 { &[0xff] } else { data },
        pos: 0,
    };
    let msr_fault = flags & 0x10 != 0;
    let mut exits = 0;
    report.end = Some(loop {
        let left = budget.saturating_sub(cpu.retired);
        if left == 0 {
            break End::Budget;
        }
        if exits == MAX_EXITS {
            break End::Exits;
        }
        exits += 1;
        match run(&mut cpu, left, &mut state) {
            CpuExit::IoIn { .. } => {
                report.exits[0] += 1;
                answers.fill(cpu.exit_data());
            }
            CpuExit::IoOut { .. } => report.exits[1] += 1,
            CpuExit::MmioRead { .. } => {
                report.exits[2] += 1;
                answers.fill(cpu.exit_data());
            }
            CpuExit::MmioWrite { .. } => report.exits[3] += 1,
            CpuExit::MsrRead { .. } => {
                report.exits[4] += 1;
                cpu.msr_fault = u8::from(msr_fault);
                cpu.msr_data = answers.u64();
            }
            CpuExit::MsrWrite { .. } => {
                report.exits[5] += 1;
                cpu.msr_fault = u8::from(msr_fault);
            }
            CpuExit::Hlt => break End::Hlt,
            CpuExit::Shutdown => break End::Shutdown,
            CpuExit::Budget => break End::Budget,
            CpuExit::Unimplemented(_) => break End::Unimplemented,
            CpuExit::Exception { .. }
            | CpuExit::SoftInt { .. }
            | CpuExit::Syscall { .. }
            | CpuExit::Interrupt
            | CpuExit::Sensitive { .. }
            | CpuExit::VmExit
            | CpuExit::Debug(_) => break End::Event,
        }
    });
    // The state must be readable whatever happened.
    let _ = cpu.sregs();
    report.regs = Some(cpu.regs());
    let mut ram = vec![0u8; if hash_memory { RAM as usize } else { 0 }];
    if hash_memory && mem.read_slice(&mut ram, GuestAddress(0)).is_ok() {
        report.mem_hash = ram.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        });
    }
    report.instructions = cpu.retired;
    report
}
