//! Engine `trap`: classic trap-and-emulate.
//!
//! The guest kernel runs deprivileged at real CPL 1 on visor's software CPU.
//! Every exception, software interrupt, SYSCALL and interrupt comes to this
//! VMM first (the CPU's intercepts); a privileged instruction of the kernel
//! faults with #GP and is emulated here on the virtual CPU state
//! ([`crate::virt::Virt`]); everything else is reflected into the guest kernel
//! through its own IDT. Memory is virtualized with shadow page tables
//! ([`crate::shadow`]). The sensitive unprivileged instructions that do not
//! fault at CPL 1 (Popek and Goldberg's problem with x86) are caught by the CPU
//! and, by [`HolePolicy`], reported as virtualization holes, made fatal, or
//! trapped and emulated as on a virtualizable x86. A guest in real mode,
//! which has no privilege levels to lower, runs in virtual-8086 mode at IOPL
//! 0, where its sensitive instructions fault too (`TrapVcpu::load_sregs`).

use std::collections::BTreeMap;
use std::sync::Arc;

use arch::paging::Access;
use arch::{canonical, cr0, cr4, desc, efer, msr, pf, rflags, vector};
use iced_x86::{Code, Instruction, Mnemonic as M, OpKind};
use softplat::{Platform, Step};
use vcpu::{DescriptorTable, IrqLine, Kick, Regs, Result, SRegs, Segment, Vcpu, VcpuExit};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use x86::{sreg, Cpu, CpuExit, CpuidTable, IrqMode, PhysMem};

use crate::shadow::Shadow;
use crate::virt::{compress, decompress, null_stack, real_mode_segment, real_sregs, Guest, Virt};
use crate::walk::{self, Fault, PHYS_BITS};

/// Engine-private memory (shadow page tables): above the guest's physical
/// address width, so no guest page-table entry can name it.
const PRIVATE_BASE: u64 = 1 << 47;
const PRIVATE_PAGES: u64 = 4096;

/// The guest's CR0 bits the real CPU runs with (the FPU's and alignment
/// checking); PE, PG and WP are the VMM's.
const REAL_CR0: u64 = cr0::MP | cr0::EM | cr0::TS | cr0::NE | cr0::AM;

/// The guest's CR4 bits the real CPU runs with: SSE's enables, and TSD (so
/// that RDTSC in guest user mode faults as the guest asked; the kernel's,
/// at CPL 1, faults too and runs again with the CPL-0 grant).
const REAL_CR4: u64 = cr4::OSFXSR | cr4::OSXMMEXCPT | cr4::OSXSAVE | cr4::TSD;

/// What the engine does when the deprivileged kernel executes a sensitive
/// unprivileged instruction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HolePolicy {
    /// Let it run (as on real x86), count it, and log its first occurrence
    /// with what the guest saw versus what it would have seen at CPL 0.
    #[default]
    Report,
    /// End the run at the first one, with the explanation (`--strict-holes`).
    Strict,
    /// Model a virtualizable x86 where they trap, and emulate them
    /// (`--trap-sensitive`).
    Trap,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct TrapConfig {
    /// A local APIC in the engine (timer, vector lines); HLT waits for it.
    pub irqchip: bool,
    pub holes: HolePolicy,
}

pub struct TrapVm {
    mem: GuestMemoryMmap<()>,
    config: TrapConfig,
    /// With `irqchip`, the PC's interrupt controllers and timer as the
    /// other software engines have them: a local APIC, the PICs, the IOAPIC
    /// and the PIT.
    platform: Arc<Platform>,
}

impl TrapVm {
    pub fn new(mem: &GuestMemoryMmap<()>, config: TrapConfig) -> Result<TrapVm> {
        Ok(TrapVm {
            mem: mem.clone(),
            config,
            platform: Arc::new(Platform::new(config.irqchip, true)),
        })
    }

    /// The CPUID the guest sees: the software CPU's, without visor's
    /// paravirtual leaves (the guest is not told it is virtualized); the
    /// model's physical-address width ([`PHYS_BITS`]) leaves room for the
    /// engine's memory.
    pub fn cpuid(irqchip: bool, id: u32) -> CpuidTable {
        let mut t = CpuidTable::software_cpu(irqchip, None);
        let (a, b, c, d) = t.query(1, 0);
        // No VMX for a deprivileged kernel (CR4.VMXE is refused).
        t.set(
            1,
            None,
            [a, (b & 0x00ff_ffff) | (id << 24), c & !(1 << 5), d],
        );
        t
    }

    pub fn create_trap_vcpu(&mut self, id: u32) -> Result<TrapVcpu> {
        let private = GuestMemoryMmap::<()>::from_ranges(&[(
            GuestAddress(PRIVATE_BASE),
            (PRIVATE_PAGES * 0x1000) as usize,
        )])
        .map_err(|e| vcpu::VcpuError::Engine(format!("trap engine memory: {e}")))?;
        let mut mem = PhysMem::new(&self.mem);
        if mem.end() > PRIVATE_BASE {
            return Err(vcpu::VcpuError::Engine(
                "guest memory overlaps the trap engine's private memory".into(),
            ));
        }
        mem.add_private(&private);
        let mut cpu = Cpu::new(mem, Self::cpuid(self.config.irqchip, id));
        cpu.local = self.platform.lapic(id);
        cpu.intercepts.exceptions = !0;
        cpu.intercepts.soft_int = true;
        cpu.intercepts.syscall = true;
        cpu.intercepts.sensitive = true;
        cpu.intercepts.cpuid_faulting = true;
        cpu.intercepts.irq = IrqMode::Exit;
        Ok(TrapVcpu {
            g: Guest {
                cpu,
                v: Virt::default(),
            },
            shadow: Shadow::new(PRIVATE_BASE, PRIVATE_PAGES),
            _private: private,
            policy: self.config.holes,
            platform: self.platform.clone(),
            halted: false,
            c: Counters::default(),
            pf_streak: (0, 0, 0),
        })
    }
}

impl vcpu::Vm for TrapVm {
    fn create_vcpu(&mut self, id: u32) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(self.create_trap_vcpu(id)?))
    }

    fn irq_line(&self, gsi: u32) -> Result<Option<Arc<dyn IrqLine>>> {
        Ok(self.platform.irq_line(gsi))
    }

    fn vector_line(&self, vector: u8) -> Result<Option<Arc<dyn IrqLine>>> {
        Ok(self.platform.apic_vector_line(vector))
    }
}

/// What the engine counts (`--stats`).
#[derive(Default)]
struct Counters {
    traps: BTreeMap<&'static str, u64>,
    holes: BTreeMap<&'static str, u64>,
    page_faults: u64,
    reflected_page_faults: u64,
    interrupts: u64,
    exceptions: u64,
    nmis: u64,
    soft_ints: u64,
    syscalls: u64,
}

pub struct TrapVcpu {
    g: Guest,
    shadow: Shadow,
    _private: GuestMemoryMmap<()>,
    policy: HolePolicy,
    platform: Arc<Platform>,
    /// The guest kernel executed HLT (emulated): waiting for an interrupt.
    halted: bool,
    c: Counters,
    /// (rip, address, count) of consecutive shadow faults that were filled.
    pf_streak: (u64, u64, u32),
}

/// How an emulated instruction ended.
enum Done {
    /// Completed: continue after it.
    Next,
    /// Let the CPU run it again with CPL 0 rights (port I/O, CPUID,
    /// pass-through MSRs): its exits go to the VMM as usual.
    Rerun,
    /// The emulation set RIP itself.
    Jumped,
    /// HLT.
    Halt,
}

/// The name a trapped instruction is counted under.
fn trap_name(i: &Instruction) -> &'static str {
    let reg = |k: u32| (i.op_kind(k) == OpKind::Register).then(|| i.op_register(k));
    if i.mnemonic() != M::Mov {
        return mnemonic_name(i.mnemonic());
    }
    match (reg(0), reg(1)) {
        (Some(r), _) if r.is_cr() => match r.number() {
            0 => "mov to cr0",
            2 => "mov to cr2",
            3 => "mov to cr3",
            4 => "mov to cr4",
            _ => "mov to cr8",
        },
        (_, Some(r)) if r.is_cr() => match r.number() {
            0 => "mov from cr0",
            2 => "mov from cr2",
            3 => "mov from cr3",
            4 => "mov from cr4",
            _ => "mov from cr8",
        },
        (Some(r), _) if r.is_dr() => "mov to dr",
        (_, Some(r)) if r.is_dr() => "mov from dr",
        _ => "mov to sreg",
    }
}

fn mnemonic_name(m: M) -> &'static str {
    match m {
        M::Cli => "cli",
        M::Sti => "sti",
        M::Hlt => "hlt",
        M::In => "in",
        M::Out => "out",
        M::Insb | M::Insw | M::Insd => "ins",
        M::Outsb | M::Outsw | M::Outsd => "outs",
        M::Cpuid => "cpuid",
        M::Pop => "pop sreg",
        M::Lgdt => "lgdt",
        M::Lidt => "lidt",
        M::Ltr => "ltr",
        M::Lldt => "lldt",
        M::Invlpg => "invlpg",
        M::Rdmsr => "rdmsr",
        M::Wrmsr => "wrmsr",
        M::Swapgs => "swapgs",
        M::Iretq => "iretq",
        M::Iretd => "iretd",
        M::Iret => "iret",
        M::Pushf | M::Pushfd => "pushf",
        M::Popf | M::Popfd => "popf",
        M::Sysretq => "sysretq",
        M::Lmsw => "lmsw",
        M::Clts => "clts",
        M::Wbinvd => "wbinvd",
        M::Rdpmc => "rdpmc",
        M::Rdtsc | M::Rdtscp => "rdtsc",
        M::Invd => "invd",
        M::Retf => "retf",
        M::Jmp => "jmp far",
        M::Call => "call far",
        _ => "other",
    }
}

/// The offset size of a far JMP/CALL, through memory (m16:16, m16:32,
/// m16:64) or direct (ptr16:16, ptr16:32, outside 64-bit mode), or `None`
/// for any other JMP/CALL.
fn far_offset_size(i: &Instruction) -> Option<usize> {
    match i.code() {
        Code::Jmp_m1616 | Code::Call_m1616 | Code::Jmp_ptr1616 | Code::Call_ptr1616 => Some(2),
        Code::Jmp_m1632 | Code::Call_m1632 | Code::Jmp_ptr1632 | Code::Call_ptr1632 => Some(4),
        Code::Jmp_m1664 | Code::Call_m1664 => Some(8),
        _ => None,
    }
}

impl TrapVcpu {
    fn reflect_fault(&mut self, f: Fault) -> Option<VcpuExit<'static>> {
        if let Some(a) = f.cr2 {
            self.g.v.cr2 = a;
        }
        let rip = self.g.cpu.rip;
        self.g
            .reflect_fault(f.vector, f.code, rip, f.vector != vector::DB)
    }

    /// A #PF of the real CPU: a shadow miss to fill, or the guest's own fault.
    fn page_fault(&mut self, code: u32) -> Option<VcpuExit<'static>> {
        self.c.page_faults += 1;
        let lin = self.g.cpu.cr2;
        let user = code & pf::USER != 0;
        let acc = if code & pf::FETCH != 0 {
            Access::Exec
        } else if code & pf::WRITE != 0 {
            Access::Write
        } else {
            Access::Read
        };
        let pg = self.g.v.paging();
        let walked = match pg {
            // Paging off: the identity shadow, built page by page. MMIO
            // pages map to themselves too: the CPU's access to them exits
            // to the VMM as on any engine.
            None => Ok(walk::identity(lin)),
            Some(pg) => walk::walk(&mut self.g.cpu, pg, lin, acc, user),
        };
        match walked {
            Ok(m) => {
                let rip = self.g.cpu.rip;
                let key = (rip, lin & !0xfff);
                if (self.pf_streak.0, self.pf_streak.1) == key {
                    self.pf_streak.2 += 1;
                    if self.pf_streak.2 > 8 {
                        return Some(VcpuExit::Other {
                            reason: format!(
                                "trap: shadow paging makes no progress at {rip:#x} (address {lin:#x}, error code {code:#x})"
                            ),
                        });
                    }
                } else {
                    self.pf_streak = (key.0, key.1, 0);
                }
                let wp = pg.is_none_or(|pg| pg.wp);
                let force_write = acc == Access::Write && !user && !m.writable && !wp;
                self.shadow.map(&mut self.g.cpu, lin, &m, force_write);
                None
            }
            Err(code) => {
                self.c.reflected_page_faults += 1;
                self.g.v.cr2 = lin;
                let rip = self.g.cpu.rip;
                self.g.reflect_fault(vector::PF, Some(code), rip, true)
            }
        }
    }

    fn exception(&mut self, v: u8, code: Option<u32>) -> Option<VcpuExit<'static>> {
        if v == vector::NMI {
            // An NMI of the local APIC (the CPU's NMI intercept): through
            // the guest's IDT, blocked until the guest's IRET.
            self.halted = false;
            self.c.nmis += 1;
            let rip = self.g.cpu.rip;
            return self.g.reflect(v, None, rip, false);
        }
        if v == vector::PF {
            return self.page_fault(code.unwrap_or(0));
        }
        if v == vector::GP && self.g.cpu.privilege_granted() {
            // The emulated instruction's own #GP (an MSR outside the CPU
            // model): the guest's.
            self.g.cpu.revoke_grants();
        } else if v == vector::GP {
            // A privileged instruction of the guest kernel (or CPUID, which
            // faults at any CPL > 0 here).
            let i = match self.g.cpu.current_instruction() {
                Ok(i) => i,
                Err((v2, c2)) => {
                    let rip = self.g.cpu.rip;
                    return self.g.reflect_fault(v2, c2, rip, true);
                }
            };
            let emulate = if self.g.vcpl() == 0 {
                true
            } else {
                // User mode: CPUID (faulting here at any CPL > 0), and port I/O
                // that the guest's own TSS I/O bitmap allows (the real task
                // register has none).
                i.mnemonic() == M::Cpuid || self.user_io_permitted(&i)
            };
            if self.g.v.real_mode() && i.mnemonic() == M::Int {
                // INT n in virtual-8086 mode at IOPL 0: through the guest's
                // real-mode interrupt vector table.
                *self.c.traps.entry("int").or_default() += 1;
                let next = i.next_ip() & 0xffff_ffff;
                return self.g.reflect(i.immediate8(), None, next, true);
            }
            if emulate {
                if let Some(r) = self.emulate(&i) {
                    return r;
                }
            }
        }
        self.c.exceptions += 1;
        let rip = self.g.cpu.rip;
        // Every exception that reaches here is a fault but #DB, which is
        // one only as MOV DR's general detect (run with the grant).
        let rf = v != vector::DB || self.g.cpu.privilege_granted();
        self.g.reflect_fault(v, code, rip, rf)
    }

    /// Whether the guest's TSS I/O permission bitmap lets user mode run the
    /// port I/O instruction `i` (the check the CPU makes at CPL > IOPL).
    fn user_io_permitted(&mut self, i: &Instruction) -> bool {
        let (port, size) = match i.mnemonic() {
            M::In | M::Out => {
                let (p, d) = if i.mnemonic() == M::In {
                    (1, 0)
                } else {
                    (0, 1)
                };
                let port = if i.op_kind(p) == OpKind::Register {
                    self.g.cpu.gpr[2] as u16
                } else {
                    i.immediate(p) as u16
                };
                (port, i.op_register(d).size() as u64)
            }
            M::Insb | M::Insw | M::Insd | M::Outsb | M::Outsw | M::Outsd => (
                self.g.cpu.gpr[2] as u16,
                i.memory_size().size().clamp(1, 4) as u64,
            ),
            _ => return false,
        };
        let tr = self.g.v.tr;
        if tr.unusable || tr.limit < 0x67 {
            return false;
        }
        let mut b = [0u8; 2];
        if self.g.read(tr.base.wrapping_add(0x66), &mut b).is_err() {
            return false;
        }
        let at = u16::from_le_bytes(b) as u64 + (port as u64 >> 3);
        if at + 1 > tr.limit as u64 || self.g.read(tr.base.wrapping_add(at), &mut b).is_err() {
            return false;
        }
        let want = ((1u64 << size) - 1) << (port & 7);
        u16::from_le_bytes(b) as u64 & want == 0
    }

    /// Emulates a faulting privileged instruction. `None` if it is not one
    /// (the #GP is the guest's own and is reflected); else the exit, if any.
    fn emulate(&mut self, i: &Instruction) -> Option<Option<VcpuExit<'static>>> {
        let tf = self.g.cpu.rflags & rflags::TF != 0;
        let r = match self.emulate_insn(i) {
            Ok(Some(d)) => d,
            Ok(None) => return None,
            Err(EmuErr::Fault(f)) => return Some(self.reflect_fault(f)),
            Err(EmuErr::Unsupported(what)) => return Some(Some(VcpuExit::Unimplemented { what })),
        };
        *self.c.traps.entry(trap_name(i)).or_default() += 1;
        match r {
            Done::Next => self.g.cpu.rip = i.next_ip(),
            // The CPU runs it again, single-step trap and all.
            Done::Rerun => {
                self.g.cpu.grant_privilege_once();
                return Some(None);
            }
            Done::Jumped => {}
            Done::Halt => {
                self.g.cpu.rip = i.next_ip();
                // With TF, the single-step #DB after HLT wakes it at once
                // (as the software CPU delivers it).
                self.halted = !tf;
            }
        }
        // The single-step trap the instruction owes, as if the CPU had run
        // it; MOV SS and POP SS delay it by one instruction.
        let loads_ss = matches!(i.mnemonic(), M::Mov | M::Pop)
            && i.op0_kind() == OpKind::Register
            && i.op0_register() == iced_x86::Register::SS;
        self.g.cpu.emulated_instruction_done(tf, loads_ss);
        Some(None)
    }

    fn operand_address(&self, i: &Instruction) -> Emu<u64> {
        self.g.cpu.memory_operand_address(i).ok_or(gp(0))
    }

    /// Reads a 16-bit operand (register or memory).
    fn read_u16_operand(&mut self, i: &Instruction, op: u32) -> Emu<u16> {
        if i.op_kind(op) == OpKind::Register {
            return Ok(self.g.cpu.register(i.op_register(op)) as u16);
        }
        let a = self.operand_address(i)?;
        let mut b = [0u8; 2];
        self.g.read_operand(a, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Writes a selector-like value to a register (zero-extended) or m16.
    fn write_u16_operand(&mut self, i: &Instruction, op: u32, v: u64) -> Emu<()> {
        if i.op_kind(op) == OpKind::Register {
            let r = i.op_register(op);
            self.g.cpu.set_register(r, v & mask(r.size() as u32 * 8));
            return Ok(());
        }
        let a = self.operand_address(i)?;
        Ok(self.g.write_operand(a, &(v as u16).to_le_bytes())?)
    }

    fn emulate_insn(&mut self, i: &Instruction) -> Emu<Option<Done>> {
        let g = &mut self.g;
        Ok(Some(match i.mnemonic() {
            M::Cli => {
                g.v.vif = false;
                Done::Next
            }
            M::Sti => {
                if !g.v.vif {
                    g.cpu.set_interrupt_shadow();
                }
                g.v.vif = true;
                Done::Next
            }
            M::Hlt => Done::Halt,
            M::Pushf | M::Pushfd if g.v.real_mode() => {
                self.pushf(i)?;
                Done::Next
            }
            M::Popf | M::Popfd if g.v.real_mode() => {
                self.popf(i)?;
                Done::Next
            }
            M::Iret | M::Iretd if g.v.real_mode() => self.real_iret(i)?,
            M::Rdtsc | M::Rdtscp => Done::Rerun,
            M::In
            | M::Out
            | M::Insb
            | M::Insw
            | M::Insd
            | M::Outsb
            | M::Outsw
            | M::Outsd
            | M::Cpuid => Done::Rerun,
            M::Wbinvd | M::Invd => Done::Next,
            M::Mov if i.op0_kind() == OpKind::Register && i.op0_register().is_cr() => {
                let v = g.cpu.register(i.op1_register());
                let n = i.op0_register().number();
                self.write_cr(n, v)?
            }
            M::Mov if i.op1_kind() == OpKind::Register && i.op1_register().is_cr() => {
                let v = match i.op1_register().number() {
                    0 => g.v.cr0,
                    2 => g.v.cr2,
                    3 => g.v.cr3,
                    4 => g.v.cr4,
                    8 => g.cpu.cr8,
                    _ => return Err(ud()),
                };
                g.cpu.set_register(i.op0_register(), v);
                Done::Next
            }
            // The CPU's debug registers are the guest's: its breakpoints
            // raise #DB, which the engine reflects.
            M::Mov if i.op0_kind() == OpKind::Register && i.op0_register().is_dr() => Done::Rerun,
            M::Mov if i.op1_kind() == OpKind::Register && i.op1_register().is_dr() => Done::Rerun,
            M::Mov
                if i.op0_kind() == OpKind::Register && i.op0_register().is_segment_register() =>
            {
                let sel = self.read_u16_operand(i, 1)?;
                self.load_sreg(x86::seg_index(i.op0_register()), sel)?;
                Done::Next
            }
            M::Pop
                if i.op0_kind() == OpKind::Register && i.op0_register().is_segment_register() =>
            {
                let sz = (i.stack_pointer_increment().unsigned_abs() as u64).clamp(2, 8);
                let sp = g.cpu.gpr[4];
                let at = self.stack_linear(sp);
                let mut b = [0u8; 2];
                self.g.read(at, &mut b)?;
                self.load_sreg(x86::seg_index(i.op0_register()), u16::from_le_bytes(b))?;
                self.set_sp(sp.wrapping_add(sz));
                Done::Next
            }
            M::Lgdt | M::Lidt => {
                // 10 bytes in 64-bit mode, else 6: a 32-bit base (24 bits
                // with a 16-bit operand size).
                let a = self.operand_address(i)?;
                let long64 = self.g.cpu.code_bits() == 64;
                let mut b = [0u8; 10];
                self.g.read(a, &mut b[..if long64 { 10 } else { 6 }])?;
                let base = u64::from_le_bytes(b[2..10].try_into().unwrap_or_default());
                let base = if long64 {
                    base
                } else if i.code() == Code::Lgdt_m1632_16 || i.code() == Code::Lidt_m1632_16 {
                    base & 0xff_ffff
                } else {
                    base & 0xffff_ffff
                };
                let t = DescriptorTable {
                    limit: u16::from_le_bytes([b[0], b[1]]),
                    base,
                };
                if i.mnemonic() == M::Lgdt {
                    self.g.v.gdtr = t;
                    // The real CPU reads the guest's own GDT (native IRETQ to
                    // user, segment loads that do not fault).
                    self.g.cpu.gdtr = t;
                } else {
                    self.g.v.idtr = t;
                }
                Done::Next
            }
            M::Ltr => {
                let sel = self.read_u16_operand(i, 0)?;
                self.g.v.tr = self.system_segment(sel, &[9])?;
                let (a, raw) = self.g.descriptor(sel)?;
                self.g
                    .write(a.wrapping_add(5), &[((raw | desc::TSS_BUSY) >> 40) as u8])?;
                self.g.v.tr.type_ = 0xb;
                Done::Next
            }
            M::Lldt => {
                let sel = self.read_u16_operand(i, 0)?;
                let s = if sel & !3 == 0 {
                    Segment {
                        unusable: true,
                        ..Default::default()
                    }
                } else {
                    self.system_segment(sel, &[2])?
                };
                self.g.v.ldtr = s;
                self.g.cpu.ldtr = s;
                Done::Next
            }
            M::Invlpg => {
                // A non-canonical address (no address here) is a no-op.
                if let Some(a) = self.g.cpu.memory_operand_address(i) {
                    self.shadow.invalidate(&mut self.g.cpu, a);
                }
                Done::Next
            }
            M::Rdmsr => match self.rdmsr(self.g.cpu.gpr[1] as u32)? {
                Some(v) => {
                    self.g.cpu.gpr[0] = v & 0xffff_ffff;
                    self.g.cpu.gpr[2] = v >> 32;
                    Done::Next
                }
                None => Done::Rerun,
            },
            M::Wrmsr => {
                let (index, v) = (
                    g.cpu.gpr[1] as u32,
                    (g.cpu.gpr[2] << 32) | (g.cpu.gpr[0] & 0xffff_ffff),
                );
                if self.wrmsr(index, v)? {
                    Done::Next
                } else {
                    Done::Rerun
                }
            }
            M::Swapgs => {
                std::mem::swap(&mut g.cpu.seg[sreg::GS].base, &mut g.v.kernel_gs_base);
                Done::Next
            }
            M::Iretq if i.code() == Code::Iretq => self.iretq()?,
            // (IRETD in 64-bit mode pops SS:ESP too: not emulated, its #GP
            // is the guest's.)
            M::Iretd if i.code() == Code::Iretd && self.g.cpu.code_bits() != 64 => self.iretd()?,
            M::Retf => self.far_return(i)?,
            M::Jmp | M::Call if far_offset_size(i).is_some() => self.far_transfer(i)?,
            M::Sysretq if i.code() == Code::Sysretq => self.sysretq()?,
            M::Lmsw => {
                let v = self.read_u16_operand(i, 0)? as u64;
                let cr0 = (self.g.v.cr0 & !0xe) | (v & 0xf) | (self.g.v.cr0 & 1);
                self.write_cr(0, cr0)?
            }
            M::Clts => {
                let cr0 = self.g.v.cr0 & !cr0::TS;
                self.write_cr(0, cr0)?
            }
            // The CPU model decides, with the kernel's privilege: RDPMC has
            // no counters to read (#GP), and XSAVE, INVPCID, MONITOR/MWAIT
            // and PKU are not advertised (#UD); the fault is the guest's.
            M::Rdpmc | M::Xsetbv | M::Invpcid | M::Monitor | M::Mwait | M::Wrpkru => Done::Rerun,
            _ => return Ok(None),
        }))
    }

    /// The kernel code segment of a far transfer to selector `sel` with RPL
    /// 0 (one that faults at CPL 1 because the descriptor has DPL 0): in
    /// long mode a 64-bit segment or a compatibility-mode one, outside it a
    /// 16- or 32-bit one (the L bit means nothing there).
    fn kernel_code(&mut self, sel: u16) -> Emu<Segment> {
        let err = (sel & !3) as u32;
        if sel & 3 != 0 || sel & !3 == 0 {
            return Err(gp(err));
        }
        let (_, raw) = self.g.descriptor(sel)?;
        let mut d = Segment::from_descriptor(sel, raw);
        if !self.g.v.long_mode() {
            d.l = false;
        }
        if !d.s || d.type_ & 8 == 0 || d.dpl != 0 || (d.l && d.db) {
            return Err(gp(err));
        }
        if !d.present {
            return Err(fault(vector::NP, err));
        }
        Ok(compress(d, true))
    }

    /// RETF to the kernel's own code segment (a return to user mode runs
    /// natively; one that faults is the guest's).
    fn far_return(&mut self, i: &Instruction) -> Emu<Done> {
        let sz = match i.code() {
            Code::Retfq | Code::Retfq_imm16 => 8,
            Code::Retfw | Code::Retfw_imm16 => 2,
            _ => 4,
        };
        let sp = self.g.cpu.gpr[4];
        let mut b = [0u8; 16];
        let at = self.stack_linear(sp);
        self.g.read(at, &mut b[..2 * sz])?;
        let word = |k: usize| {
            let mut w = [0u8; 8];
            w[..sz].copy_from_slice(&b[k * sz..k * sz + sz]);
            u64::from_le_bytes(w)
        };
        let (rip, sel) = (word(0), word(1) as u16);
        if sel & 3 != 0 {
            return Err(gp((sel & !3) as u32));
        }
        let cs = self.kernel_code(sel)?;
        let rip = target_ip(&cs, rip)?;
        let imm = if i.op_count() > 0 { i.immediate(0) } else { 0 };
        self.g.cpu.seg[sreg::CS] = cs;
        self.g.cpu.rip = rip;
        self.set_sp(sp.wrapping_add(2 * sz as u64).wrapping_add(imm));
        self.g.cpu.refresh_mode();
        Ok(Done::Jumped)
    }

    /// Far JMP or CALL through memory to the kernel's own code segment.
    fn far_transfer(&mut self, i: &Instruction) -> Emu<Done> {
        let Some(sz) = far_offset_size(i) else {
            return Err(ud());
        };
        let (target, sel) = if i.op0_kind() == OpKind::FarBranch16 {
            (i.far_branch16() as u64, i.far_branch_selector())
        } else if i.op0_kind() == OpKind::FarBranch32 {
            (i.far_branch32() as u64, i.far_branch_selector())
        } else {
            let a = self.operand_address(i)?;
            let mut b = [0u8; 10];
            self.g.read(a, &mut b[..sz + 2])?;
            let mut w = [0u8; 8];
            w[..sz].copy_from_slice(&b[..sz]);
            (
                u64::from_le_bytes(w),
                u16::from_le_bytes([b[sz], b[sz + 1]]),
            )
        };
        let cs = self.kernel_code(sel)?;
        let target = target_ip(&cs, target)?;
        if i.mnemonic() == M::Call {
            // Push the caller's CS (as the guest knows it) and return address.
            let old_cs = (self.g.cpu.seg[sreg::CS].selector & !3) as u64;
            let sp = self.g.cpu.gpr[4];
            let mut frame = Vec::with_capacity(2 * sz);
            frame.extend_from_slice(&i.next_ip().to_le_bytes()[..sz]);
            frame.extend_from_slice(&old_cs.to_le_bytes()[..sz]);
            let top = sp.wrapping_sub(2 * sz as u64);
            let at = self.stack_linear(top);
            self.g.write(at, &frame)?;
            self.set_sp(top);
        }
        self.g.cpu.seg[sreg::CS] = cs;
        self.g.cpu.rip = target;
        self.g.cpu.refresh_mode();
        Ok(Done::Jumped)
    }

    /// The linear address of the stack at `sp`: outside 64-bit mode SS's
    /// base is added and the address is ESP's or SP's (by SS's B bit).
    fn stack_linear(&self, sp: u64) -> u64 {
        let cpu = &self.g.cpu;
        if cpu.code_bits() == 64 {
            return sp;
        }
        let ss = cpu.seg[sreg::SS];
        let off = if ss.db { sp & 0xffff_ffff } else { sp & 0xffff };
        ss.base.wrapping_add(off) & 0xffff_ffff
    }

    /// Sets the stack pointer as a stack operation of the current mode does
    /// (RSP, ESP or SP by SS's B bit).
    fn set_sp(&mut self, v: u64) {
        let cpu = &mut self.g.cpu;
        cpu.gpr[4] = if cpu.code_bits() == 64 {
            v
        } else if cpu.seg[sreg::SS].db {
            v & 0xffff_ffff
        } else {
            (cpu.gpr[4] & !0xffff) | (v & 0xffff)
        };
    }

    /// A system descriptor (TSS: type 9, LDT: type 2) of the guest's GDT:
    /// 16 bytes in long mode, 8 outside it.
    fn system_segment(&mut self, sel: u16, types: &[u8]) -> Emu<Segment> {
        if sel & 4 != 0 || sel & !3 == 0 {
            return Err(gp((sel & !3) as u32));
        }
        let (a, raw) = self.g.descriptor(sel)?;
        let hi = if self.g.v.long_mode() {
            self.g.read_u64(a.wrapping_add(8))?
        } else {
            0
        };
        let mut s = Segment::from_descriptor(sel, raw);
        if s.s || !types.contains(&s.type_) {
            return Err(gp((sel & !3) as u32));
        }
        if !s.present {
            return Err(fault(vector::NP, (sel & !3) as u32));
        }
        s.base |= (hi & 0xffff_ffff) << 32;
        Ok(s)
    }

    /// MOV to a segment register the guest kernel could not load at CPL 1.
    fn load_sreg(&mut self, s: usize, sel: u16) -> Emu<()> {
        let rpl = (sel & 3) as u8;
        if sel & !3 == 0 {
            if s == sreg::SS && rpl != 0 {
                return Err(gp(0));
            }
            self.g.cpu.seg[s] = if s == sreg::SS {
                null_stack()
            } else {
                let base = if s >= sreg::FS {
                    self.g.cpu.seg[s].base
                } else {
                    0
                };
                Segment {
                    selector: sel,
                    base,
                    unusable: true,
                    ..Default::default()
                }
            };
            return Ok(());
        }
        let (a, raw) = self.g.descriptor(sel)?;
        let d = Segment::from_descriptor(sel, raw);
        let err = (sel & !3) as u32;
        let ok = if s == sreg::SS {
            d.s && d.type_ & 0xa == 2 && d.dpl == 0 && rpl == 0
        } else {
            let conforming = d.type_ & 0xc == 0xc;
            d.s && (d.type_ & 8 == 0 || d.type_ & 2 != 0) && (conforming || d.dpl >= rpl)
        };
        if !ok {
            return Err(gp(err));
        }
        if !d.present {
            return Err(fault(
                if s == sreg::SS {
                    vector::SS
                } else {
                    vector::NP
                },
                err,
            ));
        }
        if raw & desc::ACCESSED == 0 {
            self.g
                .write(a.wrapping_add(5), &[((raw | desc::ACCESSED) >> 40) as u8])?;
        }
        self.g.cpu.seg[s] = compress(d, s == sreg::SS);
        if s == sreg::SS {
            self.g.cpu.set_interrupt_shadow();
        }
        Ok(())
    }

    fn write_cr(&mut self, n: usize, v: u64) -> Emu<Done> {
        let g = &mut self.g;
        match n {
            0 => {
                let nw_without_cd = v & cr0::NW != 0 && v & cr0::CD == 0;
                if v >> 32 != 0 || (v & cr0::PG != 0 && v & cr0::PE == 0) || nw_without_cd {
                    return Err(gp(0));
                }
                let old = g.v.cr0;
                let (pg_on, pg_off) = (
                    old & cr0::PG == 0 && v & cr0::PG != 0,
                    old & cr0::PG != 0 && v & cr0::PG == 0,
                );
                // Entering and leaving long mode (SDM vol. 3 9.8.5): paging
                // on with EFER.LME activates it (PAE required); paging off
                // ends it, but not from 64-bit code.
                if pg_on && g.v.efer & efer::LME != 0 {
                    if g.v.cr4 & cr4::PAE == 0 {
                        return Err(gp(0));
                    }
                    g.v.efer |= efer::LMA;
                } else if pg_on && g.v.cr4 & cr4::PAE != 0 {
                    self.check_pdptes(self.g.v.cr3)?;
                } else if pg_off && g.v.long_mode() {
                    if g.cpu.code_bits() == 64 {
                        return Err(gp(0));
                    }
                    g.v.efer &= !efer::LMA;
                }
                if (old ^ v) & cr0::PE != 0 {
                    // Into or out of real mode: the real CPU goes from long
                    // mode to virtual-8086 mode or back, the segments' hidden
                    // parts kept as the guest left them.
                    let f = self.g.vflags();
                    let mut s = self.g.sregs();
                    s.cr0 = v | cr0::ET;
                    s.efer = self.g.v.efer;
                    self.load_sregs(&s);
                    self.g.set_vflags(f);
                    self.g.cpu.refresh_mode();
                    return Ok(Done::Next);
                }
                let g = &mut self.g;
                g.v.cr0 = v | cr0::ET;
                // The real PG and WP stay set: the shadow enforces the
                // guest's view (its identity map with paging off).
                // (In real mode the real CPU runs without paging.)
                let paging = if v & cr0::PE != 0 {
                    cr0::WP | cr0::PG
                } else {
                    0
                };
                g.cpu.cr0 = (g.cpu.cr0 & !REAL_CR0) | (v & REAL_CR0) | paging | cr0::PE | cr0::ET;
                if (old ^ v) & (cr0::WP | cr0::PG) != 0 {
                    self.shadow.reset(&mut self.g.cpu);
                }
                self.g.cpu.refresh_mode();
            }
            2 => g.v.cr2 = v,
            3 => {
                // Bits beyond the physical-address width are reserved.
                if v >> PHYS_BITS != 0 {
                    return Err(gp(0));
                }
                // PAE paging loads the four PDPTEs here.
                if g.v.cr0 & cr0::PG != 0 && !g.v.long_mode() && g.v.cr4 & cr4::PAE != 0 {
                    self.check_pdptes(v)?;
                }
                self.g.v.cr3 = v;
                self.shadow.reset(&mut self.g.cpu);
            }
            4 => {
                // No VMX for a deprivileged guest; PAE stays on in long mode.
                if v & cr4::VMXE != 0 || (g.v.long_mode() && v & cr4::PAE == 0) {
                    return Err(gp(0));
                }
                let paging_bits = cr4::PAE | cr4::PSE | cr4::PGE;
                if g.v.cr0 & cr0::PG != 0
                    && !g.v.long_mode()
                    && v & cr4::PAE != 0
                    && (g.v.cr4 ^ v) & paging_bits != 0
                {
                    self.check_pdptes(self.g.v.cr3)?;
                }
                let g = &mut self.g;
                g.v.cr4 = v;
                g.cpu.cr4 = (g.cpu.cr4 & !REAL_CR4) | (v & REAL_CR4) | cr4::PAE;
                self.shadow.reset(&mut self.g.cpu);
                self.g.cpu.refresh_mode();
            }
            8 => {
                if v > 15 {
                    return Err(gp(0));
                }
                g.cpu.cr8 = v;
                if let Some(l) = g.cpu.local.as_mut() {
                    l.set_tpr(v);
                }
            }
            _ => return Err(ud()),
        }
        Ok(Done::Next)
    }

    /// The load of PAE paging's four PDPTEs from `cr3` (MOV to CR3, or to
    /// CR0/CR4 turning PAE paging on): #GP if a present one has reserved
    /// bits set (SDM vol. 3 4.4.1). The walk reads them from memory on each
    /// shadow fill rather than from registers loaded here.
    fn check_pdptes(&mut self, cr3: u64) -> Emu<()> {
        let base = cr3 & 0xffff_ffe0;
        for k in 0..4u64 {
            let mut b = [0u8; 8];
            if !self.g.cpu.ram_read(base + 8 * k, &mut b) {
                b = [0; 8];
            }
            let e = u64::from_le_bytes(b);
            let reserved = 0x1e6 | (!0u64 << PHYS_BITS);
            if e & arch::pte::P != 0 && e & reserved != 0 {
                return Err(gp(0));
            }
        }
        Ok(())
    }

    /// RDMSR of an MSR the VMM keeps virtual; `None`: the CPU's own.
    fn rdmsr(&mut self, index: u32) -> Emu<Option<u64>> {
        let v = &self.g.v;
        Ok(Some(match index {
            msr::EFER => v.efer,
            msr::STAR => v.star,
            msr::LSTAR => v.lstar,
            msr::CSTAR => v.cstar,
            msr::FMASK => v.fmask,
            msr::KERNEL_GS_BASE => v.kernel_gs_base,
            msr::SYSENTER_CS => v.sysenter[0],
            msr::SYSENTER_ESP => v.sysenter[1],
            msr::SYSENTER_EIP => v.sysenter[2],
            _ => return Ok(None),
        }))
    }

    /// WRMSR of a virtual MSR (true), or one the CPU handles (false).
    fn wrmsr(&mut self, index: u32, val: u64) -> Emu<bool> {
        let v = &mut self.g.v;
        let canon = |x: u64| if canonical(x) { Ok(x) } else { Err(gp(0)) };
        match index {
            msr::EFER => {
                let allowed = efer::SCE | efer::LME | efer::LMA | efer::NXE;
                if val & !allowed != 0 {
                    return Err(gp(0));
                }
                // LME changes only with paging off.
                if (val ^ v.efer) & efer::LME != 0 && v.cr0 & cr0::PG != 0 {
                    return Err(gp(0));
                }
                let nx_changed = (v.efer ^ val) & efer::NXE != 0;
                v.efer = (val & !efer::LMA) | (v.efer & efer::LMA);
                if nx_changed {
                    self.shadow.reset(&mut self.g.cpu);
                }
            }
            msr::STAR => v.star = val,
            msr::LSTAR => v.lstar = canon(val)?,
            msr::CSTAR => v.cstar = canon(val)?,
            msr::FMASK => v.fmask = val & 0xffff_ffff,
            msr::KERNEL_GS_BASE => v.kernel_gs_base = canon(val)?,
            msr::SYSENTER_CS => v.sysenter[0] = val,
            msr::SYSENTER_ESP => v.sysenter[1] = canon(val)?,
            msr::SYSENTER_EIP => v.sysenter[2] = canon(val)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// IRETQ of the guest kernel: a return to virtual CPL 0 faults at CPL 1
    /// and is done here; a return to user mode runs natively (and so never
    /// comes here unless its frame is bad, which the guest sees as #GP).
    /// Sets the guest's system registers and runs the real CPU to match.
    /// The real CPU is in long mode with paging on the shadow (4-level, NX
    /// available) for every protected-mode guest: a guest in legacy
    /// protected mode runs in compatibility mode (32- or 16-bit code
    /// segments), with paging off on the identity shadow. A guest in real
    /// mode runs in virtual-8086 mode without paging (linear addresses are
    /// the guest's physical ones, as in real mode), at IOPL 0 and with a
    /// task register without an I/O bitmap, so that CLI, STI, PUSHF, POPF,
    /// INT n, IRET, HLT, port I/O and every privileged instruction fault to
    /// this VMM (SDM vol. 3 20.2).
    fn load_sregs(&mut self, s: &SRegs) {
        self.g.v.load(s);
        let mut real = real_sregs(s);
        if s.cr0 & cr0::PE == 0 {
            real.cs = real_mode_segment(s.cs, true);
            for (dst, src) in [
                (&mut real.ss, s.ss),
                (&mut real.ds, s.ds),
                (&mut real.es, s.es),
                (&mut real.fs, s.fs),
                (&mut real.gs, s.gs),
            ] {
                *dst = real_mode_segment(src, false);
            }
            real.cr0 = (s.cr0 & REAL_CR0) | cr0::PE | cr0::ET;
            real.cr4 = s.cr4 & REAL_CR4;
            real.efer = 0;
        } else {
            if s.efer & efer::LMA == 0 {
                for seg in [
                    &mut real.cs,
                    &mut real.ss,
                    &mut real.ds,
                    &mut real.es,
                    &mut real.fs,
                    &mut real.gs,
                ] {
                    seg.l = false;
                }
            }
            real.cr0 |= cr0::PE | cr0::PG;
            real.cr4 = (s.cr4 & REAL_CR4) | cr4::PAE;
            real.efer = (s.efer & efer::SCE) | efer::LME | efer::LMA | efer::NXE;
        }
        self.g.cpu.set_sregs(&real);
        self.shadow.reset(&mut self.g.cpu);
    }

    /// PUSHF of the guest kernel, emulated: its view of the flags (virtual
    /// IF and IOPL; never VM or RF) as wide as the instruction pushes them.
    fn pushf(&mut self, i: &Instruction) -> Emu<()> {
        let sz = (i.stack_pointer_increment().unsigned_abs() as u64).clamp(2, 8);
        let v = self.g.vflags() & !(rflags::RF | rflags::VM);
        self.push_stack(v, sz)
    }

    /// POPF of the guest kernel, emulated as at CPL 0: every writable flag
    /// in the operand's width (IF and IOPL into the virtual ones), RF
    /// cleared as at the end of any instruction; VM, VIF and VIP stay.
    fn popf(&mut self, i: &Instruction) -> Emu<()> {
        let sz = (i.stack_pointer_increment().unsigned_abs() as u64).clamp(2, 8);
        let popped = self.pop_stack(sz)?;
        let m = rflags::WRITABLE & !rflags::RF & mask(sz as u32 * 8);
        let f = (self.g.vflags() & !(m | rflags::RF)) | (popped & m);
        self.g.set_vflags(f);
        Ok(())
    }

    /// A push on the guest's stack as the current mode addresses it (RSP;
    /// SS:ESP or SS:SP by SS's B bit outside 64-bit mode).
    fn push_stack(&mut self, v: u64, sz: u64) -> Emu<()> {
        let sp = self.g.cpu.gpr[4].wrapping_sub(sz);
        let at = self.stack_linear(sp);
        self.g.write(at, &v.to_le_bytes()[..sz as usize])?;
        self.set_sp(sp);
        Ok(())
    }

    /// A pop from the guest's stack, as [`TrapVcpu::push_stack`].
    fn pop_stack(&mut self, sz: u64) -> Emu<u64> {
        let sp = self.g.cpu.gpr[4];
        let at = self.stack_linear(sp);
        let mut b = [0u8; 8];
        self.g.read(at, &mut b[..sz as usize])?;
        self.set_sp(sp.wrapping_add(sz));
        Ok(u64::from_le_bytes(b))
    }

    /// IRET of a real-mode guest (SDM vol. 2 IRET, real-address mode): IP,
    /// CS and FLAGS popped (EIP, CS and EFLAGS with a 32-bit operand size;
    /// #GP if EIP is beyond CS's limit), CS loaded as real mode loads it;
    /// VM, VIF and VIP keep their values.
    fn real_iret(&mut self, i: &Instruction) -> Emu<Done> {
        let sz = if i.code() == Code::Iretd { 4 } else { 2 };
        let sp = self.g.cpu.gpr[4];
        let at = self.stack_linear(sp);
        let mut b = [0u8; 12];
        self.g.read(at, &mut b[..3 * sz])?;
        let word = |k: usize| {
            let mut x = [0u8; 8];
            x[..sz].copy_from_slice(&b[k * sz..(k + 1) * sz]);
            u64::from_le_bytes(x)
        };
        let (ip, cs, fl) = (word(0), word(1) as u16, word(2));
        if ip > self.g.cpu.seg[sreg::CS].limit as u64 {
            return Err(gp(0));
        }
        self.set_sp(sp.wrapping_add(3 * sz as u64));
        let keep = rflags::VM | rflags::VIF | rflags::VIP | rflags::RF;
        let m = rflags::WRITABLE & !keep & mask(sz as u32 * 8);
        let f = (self.g.vflags() & !(m | rflags::RF)) | (fl & m);
        self.g.set_vflags(f);
        let c = &mut self.g.cpu.seg[sreg::CS];
        c.selector = cs;
        c.base = (cs as u64) << 4;
        self.g.cpu.rip = ip;
        self.g.cpu.end_nmi_blocking();
        self.g.cpu.refresh_mode();
        Ok(Done::Jumped)
    }

    fn iretq(&mut self) -> Emu<Done> {
        let sp = self.g.cpu.gpr[4];
        let mut b = [0u8; 40];
        self.g.read(sp, &mut b)?;
        let q = |k: usize| u64::from_le_bytes(b[k * 8..k * 8 + 8].try_into().unwrap_or_default());
        let (rip, cs, fl, rsp, ss) = (q(0), q(1) as u16, q(2), q(3), q(4) as u16);
        if cs & 3 != 0 {
            // Not a return to the kernel: the CPU's #GP stands.
            return Err(gp((cs & !3) as u32));
        }
        let (_, raw) = self.g.descriptor(cs)?;
        let d = Segment::from_descriptor(cs, raw);
        if !d.s || d.type_ & 8 == 0 || d.dpl != 0 || !d.l || d.db || !canonical(rip) {
            return Err(gp((cs & !3) as u32));
        }
        let ss_seg = if ss & !3 == 0 {
            null_stack()
        } else {
            let (_, sraw) = self.g.descriptor(ss)?;
            let s = Segment::from_descriptor(ss, sraw);
            if !s.s || s.type_ & 0xa != 2 || s.dpl != 0 || ss & 3 != 0 {
                return Err(gp((ss & !3) as u32));
            }
            compress(s, true)
        };
        let g = &mut self.g;
        g.cpu.seg[sreg::CS] = compress(d, true);
        g.cpu.seg[sreg::SS] = ss_seg;
        g.cpu.gpr[4] = rsp;
        g.cpu.rip = rip;
        let keep = rflags::VM | rflags::VIF | rflags::VIP;
        let f = (fl & rflags::WRITABLE & !keep) | rflags::FIXED;
        g.set_vflags(f);
        g.cpu.end_nmi_blocking();
        g.cpu.refresh_mode();
        Ok(Done::Jumped)
    }

    /// IRETD of the guest kernel outside 64-bit mode (legacy protected mode,
    /// or compatibility mode in long mode): a return to the kernel's own
    /// privilege faults at CPL 1 and is done here (EIP, CS and EFLAGS
    /// popped, the stack stays); a return to user mode runs natively.
    /// Task returns (NT) and returns to virtual-8086 mode are not emulated.
    fn iretd(&mut self) -> Emu<Done> {
        if self.g.vflags() & rflags::NT != 0 {
            return Err(EmuErr::Unsupported(String::from(
                "the trap engine does not emulate task switches (IRET with NT set)",
            )));
        }
        let sp = self.g.cpu.gpr[4];
        let at = self.stack_linear(sp);
        let mut b = [0u8; 12];
        self.g.read(at, &mut b)?;
        let d = |k: usize| {
            u32::from_le_bytes(b[k * 4..k * 4 + 4].try_into().unwrap_or_default()) as u64
        };
        let (eip, cs, fl) = (d(0), d(1) as u16, d(2));
        if cs & 3 != 0 {
            // Not a return to the kernel: the CPU's #GP stands.
            return Err(gp((cs & !3) as u32));
        }
        if fl & rflags::VM != 0 && !self.g.v.long_mode() {
            return Err(EmuErr::Unsupported(String::from(
                "the trap engine does not run virtual-8086 mode (IRET to VM=1)",
            )));
        }
        let seg = self.kernel_code(cs)?;
        let eip = target_ip(&seg, eip)?;
        let g = &mut self.g;
        g.cpu.seg[sreg::CS] = seg;
        g.cpu.rip = eip;
        self.set_sp(sp.wrapping_add(12));
        let g = &mut self.g;
        // EFLAGS' upper half (VM, VIF, VIP, ID, AC) as IRETD at CPL 0
        // outside virtual-8086 mode: VM, VIF and VIP keep their values.
        let keep = rflags::VM | rflags::VIF | rflags::VIP;
        let f = (fl & rflags::WRITABLE & !keep) | (g.vflags() & keep) | rflags::FIXED;
        g.set_vflags(f);
        g.cpu.end_nmi_blocking();
        g.cpu.refresh_mode();
        Ok(Done::Jumped)
    }

    /// SYSRETQ of the guest kernel: back to user mode with the guest's STAR.
    fn sysretq(&mut self) -> Emu<Done> {
        let g = &mut self.g;
        if g.v.efer & efer::SCE == 0 {
            return Err(ud());
        }
        let rcx = g.cpu.gpr[1];
        if !canonical(rcx) {
            return Err(gp(0));
        }
        let base = ((g.v.star >> 48) & 0xfffc) as u16;
        g.cpu.seg[sreg::CS] = crate::virt::flat(base.wrapping_add(16) | 3, true);
        g.cpu.seg[sreg::SS] = crate::virt::flat(base.wrapping_add(8) | 3, false);
        g.cpu.rip = rcx;
        let f = g.cpu.gpr[11];
        g.cpu.rflags = (f & rflags::SYSRET_LOADED & !rflags::IOPL)
            | rflags::IF
            | (f & rflags::IOPL)
            | rflags::FIXED;
        g.cpu.refresh_mode();
        Ok(Done::Jumped)
    }

    /// A sensitive unprivileged instruction at CPL 1.
    fn sensitive(&mut self, mnemonic: &'static str) -> Option<VcpuExit<'static>> {
        let first = !self.c.holes.contains_key(mnemonic);
        if self.policy != HolePolicy::Trap {
            *self.c.holes.entry(mnemonic).or_default() += 1;
        }
        match self.policy {
            HolePolicy::Report => {
                if first {
                    eprintln!(
                        "visor: trap: virtualization hole: {}",
                        self.explain(mnemonic)
                    );
                }
                self.g.cpu.allow_sensitive_once();
                None
            }
            HolePolicy::Strict => Some(VcpuExit::Other {
                reason: format!(
                    "virtualization hole (--strict-holes): {}",
                    self.explain(mnemonic)
                ),
            }),
            HolePolicy::Trap => {
                let i = match self.g.cpu.current_instruction() {
                    Ok(i) => i,
                    Err((v, c)) => {
                        let rip = self.g.cpu.rip;
                        return self.g.reflect_fault(v, c, rip, true);
                    }
                };
                match self.emulate_sensitive(&i) {
                    Ok(d) => {
                        *self.c.traps.entry(mnemonic).or_default() += 1;
                        match d {
                            Done::Rerun => {
                                self.g.cpu.grant_privilege_once();
                                self.g.cpu.allow_sensitive_once();
                            }
                            _ => self.g.cpu.rip = i.next_ip(),
                        }
                        None
                    }
                    Err(EmuErr::Fault(f)) => self.reflect_fault(f),
                    Err(EmuErr::Unsupported(what)) => Some(VcpuExit::Unimplemented {
                        what: format!("{what}: {mnemonic} at {:#x}", self.g.cpu.rip),
                    }),
                }
            }
        }
    }

    /// What the guest kernel sees from a sensitive instruction at CPL 1,
    /// versus what it would see at CPL 0 on real hardware.
    fn explain(&mut self, mnemonic: &'static str) -> String {
        let rip = self.g.cpu.rip;
        let g = &mut self.g;
        let detail = match mnemonic {
            "pushf" => format!(
                "pushes IF={} IOPL={} (the real flags at CPL 1); at CPL 0 the kernel would push IF={} IOPL={}",
                (g.cpu.rflags >> 9) & 1,
                (g.cpu.rflags >> 12) & 3,
                g.v.vif as u8,
                g.v.iopl
            ),
            "popf" => {
                let top = g.read_u64(g.cpu.gpr[4]).unwrap_or(0);
                format!(
                    "pops IF={} IOPL={}, but at CPL 1 with IOPL 0 POPF changes neither: the kernel's IF stays {}; at CPL 0 it would become {}",
                    (top >> 9) & 1,
                    (top >> 12) & 3,
                    g.v.vif as u8,
                    (top >> 9) & 1
                )
            }
            "sgdt" => format!(
                "stores the GDTR the CPU uses (base {:#x} limit {:#x}); the guest's is base {:#x} limit {:#x} (this VMM runs the guest on its own GDT, so they agree)",
                g.cpu.gdtr.base, g.cpu.gdtr.limit, g.v.gdtr.base, g.v.gdtr.limit
            ),
            "sidt" => format!(
                "stores the VMM's IDTR (base {:#x} limit {:#x}) instead of the guest's (base {:#x} limit {:#x})",
                g.cpu.idtr.base, g.cpu.idtr.limit, g.v.idtr.base, g.v.idtr.limit
            ),
            "sldt" => format!(
                "stores LDTR {:#x}; the guest's is {:#x}",
                g.cpu.ldtr.selector, g.v.ldtr.selector
            ),
            "str" => format!(
                "stores the VMM's task register {:#x} instead of the guest's {:#x}",
                g.cpu.tr.selector, g.v.tr.selector
            ),
            "smsw" => format!(
                "stores the real CR0 low word {:#x} instead of the guest's {:#x}",
                g.cpu.cr0 & 0xffff,
                g.v.cr0 & 0xffff
            ),
            "mov from sreg" | "push sreg" => format!(
                "reads CS={:#x} SS={:#x} (RPL 1: the kernel runs in ring 1); at CPL 0 they would read CS={:#x} SS={:#x}",
                g.cpu.seg[sreg::CS].selector,
                g.cpu.seg[sreg::SS].selector,
                g.cpu.seg[sreg::CS].selector & !3,
                g.cpu.seg[sreg::SS].selector & !3
            ),
            "lar" | "lsl" | "verr" | "verw" => {
                "checks descriptors against CPL 1: those of DPL 0 are invisible (ZF=0) where the kernel at CPL 0 would see them".to_string()
            }
            _ => "behaves differently at CPL 1 than at CPL 0".to_string(),
        };
        format!("{mnemonic} at {rip:#x} did not trap: it {detail}")
    }

    /// A sensitive instruction trapped (`--trap-sensitive`): what it would
    /// have done at CPL 0.
    fn emulate_sensitive(&mut self, i: &Instruction) -> Emu<Done> {
        let g = &mut self.g;
        match i.mnemonic() {
            M::Pushf | M::Pushfd | M::Pushfq => self.pushf(i)?,
            M::Popf | M::Popfd | M::Popfq => self.popf(i)?,
            M::Sgdt | M::Sidt => {
                let t = if i.mnemonic() == M::Sgdt {
                    g.v.gdtr
                } else {
                    g.v.idtr
                };
                let a = self.operand_address(i)?;
                let mut b = [0u8; 10];
                b[..2].copy_from_slice(&t.limit.to_le_bytes());
                b[2..].copy_from_slice(&t.base.to_le_bytes());
                // 10 bytes in 64-bit mode, else 6 (a 32-bit base).
                let n = if self.g.cpu.code_bits() == 64 { 10 } else { 6 };
                self.g.write_operand(a, &b[..n])?;
            }
            M::Sldt | M::Str => {
                let v = if i.mnemonic() == M::Sldt {
                    g.v.ldtr.selector
                } else {
                    g.v.tr.selector
                };
                self.write_u16_operand(i, 0, v as u64)?;
            }
            M::Smsw => {
                let v = g.v.cr0;
                self.write_u16_operand_full(i, v)?;
            }
            M::Mov => {
                let s = i.op1_register();
                let v = decompress(g.cpu.seg[x86::seg_index(s)]).selector;
                self.write_u16_operand(i, 0, v as u64)?;
            }
            M::Push => {
                let s = i.op0_register();
                let v = decompress(g.cpu.seg[x86::seg_index(s)]).selector as u64;
                let sz = (i.stack_pointer_increment().unsigned_abs() as u64).clamp(2, 8);
                let sp = g.cpu.gpr[4].wrapping_sub(sz);
                g.write(sp, &v.to_le_bytes()[..sz as usize])?;
                g.cpu.gpr[4] = sp;
            }
            // LAR/LSL/VERR/VERW: the CPU checks them again with CPL 0 rights.
            M::Lar | M::Lsl | M::Verr | M::Verw => return Ok(Done::Rerun),
            _ => {
                return Err(EmuErr::Unsupported(String::from(
                    "no emulation for this sensitive instruction",
                )));
            }
        }
        Ok(Done::Next)
    }

    /// SMSW: a register gets CR0 (as wide as the register), memory 16 bits.
    fn write_u16_operand_full(&mut self, i: &Instruction, v: u64) -> Emu<()> {
        if i.op0_kind() == OpKind::Register {
            let r = i.op0_register();
            self.g.cpu.set_register(r, v & mask(r.size() as u32 * 8));
            return Ok(());
        }
        self.write_u16_operand(i, 0, v & 0xffff)
    }

    /// HLT of the guest kernel: waits for an interrupt. An exit if the VMM
    /// must see it (nothing can wake the guest, or time to return).
    /// The guest kernel halted: it goes on when its local APIC has an
    /// interrupt for it, or stops the run if nothing can wake it.
    fn wait_halted(&mut self) -> Step<std::convert::Infallible> {
        if self.g.cpu.nmi_deliverable() {
            self.halted = false;
            return Step::Run;
        }
        if !self.g.v.vif || !self.platform.has_lapic() {
            return Step::Exit(VcpuExit::Hlt);
        }
        let ready = self.g.cpu.local.as_mut().is_some_and(|l| l.poll());
        if ready {
            self.halted = false;
            return Step::Run;
        }
        Step::Wait
    }

    fn interrupt(&mut self) -> Option<VcpuExit<'static>> {
        let v = self.g.cpu.local.as_mut().and_then(|l| l.ack())?;
        self.halted = false;
        self.c.interrupts += 1;
        let rip = self.g.cpu.rip;
        self.g.reflect(v, None, rip, false)
    }
}

fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        !0
    } else {
        (1u64 << bits) - 1
    }
}

/// The instruction pointer a far transfer into code segment `cs` lands at:
/// canonical in a 64-bit segment, else within the segment's limit (#GP(0)
/// otherwise), as wide as the segment's default operand size.
fn target_ip(cs: &Segment, ip: u64) -> Emu<u64> {
    if cs.l {
        return if canonical(ip) { Ok(ip) } else { Err(gp(0)) };
    }
    let ip = ip & if cs.db { 0xffff_ffff } else { 0xffff };
    if ip > cs.limit as u64 {
        return Err(gp(0));
    }
    Ok(ip)
}

/// Why an emulation did not complete.
enum EmuErr {
    /// The architectural fault the guest gets.
    Fault(Fault),
    /// Something this engine does not do; one line says what.
    Unsupported(String),
}

impl From<Fault> for EmuErr {
    fn from(f: Fault) -> EmuErr {
        EmuErr::Fault(f)
    }
}

type Emu<T> = std::result::Result<T, EmuErr>;

fn gp(code: u32) -> EmuErr {
    EmuErr::Fault(Fault::gp(code))
}

fn ud() -> EmuErr {
    EmuErr::Fault(Fault {
        vector: vector::UD,
        code: None,
        cr2: None,
    })
}

fn fault(vector: u8, code: u32) -> EmuErr {
    EmuErr::Fault(Fault {
        vector,
        code: Some(code),
        cr2: None,
    })
}

/// An exit the engine handled itself, or the one the VMM gets.
pub(crate) fn handled<R>(e: Option<VcpuExit<'static>>) -> Step<R> {
    e.map_or(Step::Run, Step::Exit)
}

impl softplat::Engine for TrapVcpu {
    type Reply = std::convert::Infallible;

    fn cpu(&mut self) -> &mut Cpu {
        &mut self.g.cpu
    }

    fn platform(&self) -> &Platform {
        &self.platform
    }

    /// A halted kernel waits; the CPU's interrupts exit while the virtual
    /// IF (or user mode) lets the guest take them.
    fn prepare(&mut self) -> Step<Self::Reply> {
        if self.halted {
            let s = self.wait_halted();
            if !matches!(s, Step::Run) {
                return s;
            }
        }
        let take = self.g.v.vif || self.g.vcpl() == 3;
        let cpu = &mut self.g.cpu;
        cpu.intercepts.irq = if take { IrqMode::Exit } else { IrqMode::Hold };
        Step::Run
    }

    fn exit(&mut self, exit: CpuExit) -> Step<Self::Reply> {
        match exit {
            CpuExit::Exception { vector, code } => handled(self.exception(vector, code)),
            CpuExit::SoftInt {
                vector,
                next_rip,
                soft,
            } => {
                self.c.soft_ints += 1;
                handled(self.g.reflect(vector, None, next_rip, soft))
            }
            CpuExit::Syscall { next_rip } => {
                self.c.syscalls += 1;
                handled(self.g.syscall(next_rip))
            }
            CpuExit::Interrupt => handled(self.interrupt()),
            CpuExit::Sensitive { mnemonic, .. } => handled(self.sensitive(mnemonic)),
            e => Step::Common(e),
        }
    }

    fn reply(&mut self, reply: Self::Reply) -> VcpuExit<'_> {
        match reply {}
    }
}

impl Vcpu for TrapVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        softplat::run(self)
    }

    fn kick(&self) -> Arc<Kick> {
        self.platform.kick()
    }

    fn memory_written(&mut self, gpa: u64, len: u64) {
        self.g.cpu.external_write(gpa, len);
    }

    fn set_guest_debug(&mut self, debug: &vcpu::GuestDebug) -> Result<()> {
        self.g.cpu.set_guest_debug(debug);
        Ok(())
    }

    fn time_paused(&mut self, paused: std::time::Duration) {
        self.g.cpu.time_paused(paused);
    }

    /// `virt`: the virtual CPU, the shadow tables, the holes so far.
    fn debug_info(&mut self, what: &str) -> Option<String> {
        if what != "virt" {
            return softplat::debug_info(self, what);
        }
        let mut s = self.g.describe();
        s.push_str(&format!(
            "\nshadow paging: root {:#x}, {} leaves filled, {} flushes, {} invalidations; halted={}",
            self.shadow.root,
            self.shadow.fills,
            self.shadow.flushes,
            self.shadow.invalidations,
            self.halted
        ));
        if self.c.holes.is_empty() {
            s.push_str("\nholes so far: none");
        }
        for (k, n) in &self.c.holes {
            s.push_str(&format!("\nhole {k}: {n} times"));
        }
        Some(s)
    }

    fn regs(&self) -> Result<Regs> {
        Ok(self.g.regs())
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<()> {
        self.g.set_regs(regs);
        Ok(())
    }

    fn sregs(&self) -> Result<SRegs> {
        Ok(self.g.sregs())
    }

    fn set_sregs(&mut self, s: &SRegs) -> Result<()> {
        self.load_sregs(s);
        let r = self.g.cpu.regs();
        // Re-split IF/IOPL now that the CPL is known.
        self.g.set_vflags(r.rflags);
        self.g.cpu.refresh_mode();
        Ok(())
    }

    /// The shadow tables are this engine's TLB: they go, as on a guest CR3
    /// write.
    fn flush_tlb(&mut self) -> Result<()> {
        self.shadow.reset(&mut self.g.cpu);
        Ok(())
    }

    fn engine_counters(&self) -> Vec<(String, u64)> {
        let c = &self.c;
        let mut v = vec![("guest_instructions".to_string(), self.g.cpu.retired)];
        for (k, n) in &c.traps {
            v.push((format!("traps/{k}"), *n));
        }
        for (k, n) in &c.holes {
            v.push((format!("holes/{k}"), *n));
        }
        for (k, n) in [
            ("page_faults", c.page_faults),
            ("fills", self.shadow.fills),
            ("flushes", self.shadow.flushes),
            ("invalidations", self.shadow.invalidations),
            ("reflected_page_faults", c.reflected_page_faults),
        ] {
            v.push((format!("shadow/{k}"), n));
        }
        for (k, n) in [
            ("interrupts", c.interrupts),
            ("exceptions", c.exceptions),
            ("nmis", c.nmis),
            ("soft_ints", c.soft_ints),
            ("syscalls", c.syscalls),
        ] {
            v.push((format!("reflected/{k}"), n));
        }
        v
    }
}
