//! Engine `pv`: paravirtualization, as Xen does it for x86.
//!
//! The guest kernel knows it is virtualized (CPUID leaf 0x4000_0001 carries
//! `FEATURE_DEPRIVILEGED`) and runs deprivileged at real CPL 1 on visor's
//! software CPU. It executes no privileged instruction: each operation it
//! needs is a hypercall, entered with `int 0x82` from the hypercall page and
//! carried out by the VMM's one hypercall service (crates/hypercalls). A
//! privileged instruction is not emulated: it ends the run with its RIP.
//!
//! Memory: the CPU walks the guest's own page tables (no shadows); the kernel
//! changes them only through `mmu_update`, which the VMM validates, and loads
//! them through `new_baseptr`. Virtual interrupts are events: a timer event
//! bound to a vector is delivered through the guest's trap table (the
//! callback it registered) when its event mask allows, with nothing to
//! acknowledge. SYSCALL from user mode enters at the callback the kernel
//! registered with `set_callbacks`; the return to user mode is the `iret`
//! hypercall.

use std::sync::Arc;

use arch::paging::Access;
use arch::{cr0, efer, pf, vector};
use iced_x86::{Code, Instruction, Mnemonic as M, OpKind};
use machine::paging::table_frames;
use softplat::{Platform, Step};
use vcpu::{IrqLine, Kick, Paravirtual, Regs, Result, SRegs, Vcpu, VcpuExit};
use vm_memory::GuestMemoryMmap;
use x86::{Cpu, CpuExit, CpuidTable, IrqMode, PhysMem};

use crate::virt::{real_sregs, Guest, Virt};
use crate::walk;

pub struct PvVm {
    mem: GuestMemoryMmap<()>,
    /// Only the vector lines (event channels): no local APIC, no PICs.
    platform: Arc<Platform>,
}

impl PvVm {
    pub fn new(mem: &GuestMemoryMmap<()>) -> Result<PvVm> {
        Ok(PvVm {
            mem: mem.clone(),
            platform: Arc::new(Platform::new(false, false)),
        })
    }

    /// visor's PV leaves with `FEATURE_DEPRIVILEGED`, and no local APIC.
    pub fn cpuid() -> CpuidTable {
        let features = [
            hypercall::FEATURE_HYPERCALL_PAGE | hypercall::FEATURE_DEPRIVILEGED,
            hypercall::MSR_HYPERCALL_PAGE,
            hypercall::VERSION,
            0,
        ];
        let mut t = CpuidTable::software_cpu(false, Some((hypercall::SIGNATURE, features)));
        // No VMX for a deprivileged kernel.
        let (a, b, c, d) = t.query(1, 0);
        t.set(1, None, [a, b, c & !(1 << 5), d]);
        t
    }

    pub fn create_pv_vcpu(&mut self) -> PvVcpu {
        let mut cpu = Cpu::new(PhysMem::new(&self.mem), Self::cpuid());
        cpu.intercepts.exceptions = !0;
        cpu.intercepts.soft_int = true;
        cpu.intercepts.syscall = true;
        cpu.intercepts.irq = IrqMode::Hold;
        PvVcpu {
            g: Guest {
                cpu,
                v: Virt::default(),
            },
            platform: self.platform.clone(),
            pending: [0; 4],
            c: Counters::default(),
        }
    }
}

impl vcpu::Vm for PvVm {
    fn create_vcpu(&mut self, _id: u32) -> Result<Box<dyn Vcpu>> {
        Ok(Box::new(self.create_pv_vcpu()))
    }

    fn irq_line(&self, _gsi: u32) -> Result<Option<Arc<dyn IrqLine>>> {
        Ok(None)
    }

    /// An event channel: raising it delivers `vector` through the guest's
    /// trap table.
    fn vector_line(&self, vector: u8) -> Result<Option<Arc<dyn IrqLine>>> {
        Ok(Some(self.platform.vector_line(vector)))
    }
}

#[derive(Default)]
struct Counters {
    events: u64,
    exceptions: u64,
    page_faults: u64,
    soft_ints: u64,
    syscalls: u64,
    hypercalls: u64,
}

pub struct PvVcpu {
    g: Guest,
    platform: Arc<Platform>,
    /// Events raised and not yet delivered, one bit per vector.
    pending: [u64; 4],
    c: Counters,
}

/// Instructions a deprivileged kernel may not execute (they fault at CPL 1).
fn privileged(i: &Instruction) -> bool {
    let control = |k: u32| {
        i.op_kind(k) == OpKind::Register && {
            let r = i.op_register(k);
            r.is_cr() || r.is_dr() || r.is_segment_register()
        }
    };
    match i.mnemonic() {
        M::Cli
        | M::Sti
        | M::Hlt
        | M::In
        | M::Out
        | M::Insb
        | M::Insw
        | M::Insd
        | M::Outsb
        | M::Outsw
        | M::Outsd
        | M::Lgdt
        | M::Lidt
        | M::Ltr
        | M::Lldt
        | M::Invlpg
        | M::Rdmsr
        | M::Wrmsr
        | M::Swapgs
        | M::Sysretq
        | M::Sysret
        | M::Lmsw
        | M::Clts
        | M::Wbinvd
        | M::Invd
        | M::Xsetbv
        | M::Invpcid
        | M::Rdpmc => true,
        M::Pop => control(0),
        M::Iretq | M::Iretd | M::Iret => i.code() == Code::Iretq,
        M::Mov => control(0) || control(1),
        _ => false,
    }
}

impl PvVcpu {
    /// Delivers the highest pending event if the kernel's event mask allows.
    fn deliver_event(&mut self) -> Option<Option<VcpuExit<'static>>> {
        for (p, t) in self.pending.iter_mut().zip(self.platform.lines().take()) {
            *p |= t;
        }
        if !self.g.v.vif && self.g.vcpl() == 0 {
            return None;
        }
        let (w, bits) = self
            .pending
            .iter()
            .enumerate()
            .rev()
            .find(|(_, b)| **b != 0)?;
        let bit = 63 - bits.leading_zeros();
        self.pending[w] &= !(1u64 << bit);
        self.c.events += 1;
        let rip = self.g.cpu.rip;
        Some(
            self.g
                .reflect((w * 64 + bit as usize) as u8, None, rip, false),
        )
    }

    fn exception(&mut self, v: u8, code: Option<u32>) -> Option<VcpuExit<'static>> {
        let rip = self.g.cpu.rip;
        if v == vector::GP && self.g.vcpl() == 0 {
            if let Ok(i) = self.g.cpu.current_instruction() {
                if privileged(&i) {
                    let name = format!("{:?}", i.mnemonic()).to_lowercase();
                    return Some(VcpuExit::Other {
                        reason: format!(
                            "pv: privileged instruction {name} at {rip:#x} in the deprivileged kernel (a PV kernel uses hypercalls; visor does not emulate it)"
                        ),
                    });
                }
            }
        }
        let write_fault = pf::PRESENT | pf::WRITE;
        if v == vector::PF && code.unwrap_or(0) & write_fault == write_fault {
            // A write the guest's tables allow to a protected frame: the
            // kernel wrote a live page table directly.
            let lin = self.g.cpu.cr2;
            let user = code.unwrap_or(0) & pf::USER != 0;
            let m = self
                .g
                .v
                .paging()
                .and_then(|pg| walk::walk(&mut self.g.cpu, pg, lin, Access::Write, user).ok());
            if let Some(m) = m {
                if self.g.cpu.write_protected(m.page) {
                    return Some(VcpuExit::Other {
                        reason: format!(
                            "pv: write to a live page table (frame {:#x}, address {lin:#x}) at {rip:#x}: a PV kernel changes its page tables with mmu_update",
                            m.page
                        ),
                    });
                }
            }
        }
        if v == vector::PF {
            self.c.page_faults += 1;
            self.g.v.cr2 = self.g.cpu.cr2;
        } else {
            self.c.exceptions += 1;
        }
        // A fault pushes RF set; a #DB here is a trap (single-step, a data
        // breakpoint) or an instruction breakpoint, pushed as it is.
        self.g.reflect_fault(v, code, rip, v != vector::DB)
    }
}

impl softplat::Engine for PvVcpu {
    type Reply = std::convert::Infallible;

    fn cpu(&mut self) -> &mut Cpu {
        &mut self.g.cpu
    }

    fn platform(&self) -> &Platform {
        &self.platform
    }

    /// Pending events are delivered before guest code runs.
    fn prepare(&mut self) -> Step<Self::Reply> {
        while let Some(e) = self.deliver_event() {
            if let Some(e) = e {
                return Step::Exit(e);
            }
        }
        Step::Run
    }

    fn exit(&mut self, exit: CpuExit) -> Step<Self::Reply> {
        let handled = match exit {
            CpuExit::Exception { vector, code } => self.exception(vector, code),
            CpuExit::SoftInt {
                vector,
                next_rip,
                soft,
            } => {
                if vector == hypercall::HYPERCALL_VECTOR && self.g.vcpl() == 0 {
                    self.c.hypercalls += 1;
                    self.g.cpu.rip = next_rip;
                    return Step::Exit(VcpuExit::Hypercall);
                }
                self.c.soft_ints += 1;
                self.g.reflect(vector, None, next_rip, soft)
            }
            CpuExit::Syscall { next_rip } => {
                self.c.syscalls += 1;
                self.g.syscall(next_rip)
            }
            e => return Step::Common(e),
        };
        crate::trap::handled(handled)
    }

    fn reply(&mut self, reply: Self::Reply) -> VcpuExit<'_> {
        match reply {}
    }
}

impl PvVcpu {
    /// The live page tables change only through `mmu_update`: protects the
    /// frames of the current tree from the kernel's own writes.
    fn protect_tables(&mut self) {
        let cpu = &self.g.cpu;
        let frames = table_frames(|pa| cpu.ram_read_u64(pa), self.g.v.cr3).unwrap_or_default();
        self.g.cpu.set_write_protected(&frames);
    }
}

/// The system-call MSRs are the virtual CPU's: the real CPU's SYSCALL exits
/// to the engine, which enters the kernel where they say.
impl Paravirtual for PvVcpu {
    fn set_syscall_entry(&mut self, entry: u64, star: u64, fmask: u64) -> Result<()> {
        let v = &mut self.g.v;
        v.lstar = entry;
        v.star = star;
        v.fmask = fmask;
        v.efer |= efer::SCE;
        Ok(())
    }
}

impl Vcpu for PvVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        if self.g.v.efer & efer::LMA == 0 || self.g.v.cr0 & cr0::PG == 0 {
            return Ok(VcpuExit::Unimplemented {
                what: "the pv engine runs 64-bit long-mode guests with paging on".into(),
            });
        }
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

    /// `virt`: the virtual CPU and the events waiting (the kernel runs on
    /// its own page tables: no shadow).
    fn debug_info(&mut self, what: &str) -> Option<String> {
        if what != "virt" {
            return softplat::debug_info(self, what);
        }
        let mut s = self.g.describe();
        let waiting: Vec<String> = (0..256u32)
            .filter(|&v| self.pending[(v / 64) as usize] & (1 << (v % 64)) != 0)
            .map(|v| format!("{v:#x}"))
            .collect();
        s.push_str(&format!(
            "\npaging: the guest's own tables (no shadow); events pending: [{}]",
            waiting.join(",")
        ));
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

    /// The guest's view, as the VMM sets it (boot state, `new_baseptr`,
    /// `set_gdt`, `set_trap_table`, `iret`). The real CPU runs the kernel's
    /// segments at CPL 1 on the guest's own page tables.
    fn set_sregs(&mut self, s: &SRegs) -> Result<()> {
        let g = &mut self.g;
        let paging_changed = g.v.cr3 != s.cr3
            || g.v.cr0 != (s.cr0 | cr0::ET)
            || g.v.cr4 != s.cr4
            || g.v.efer != s.efer;
        g.v.load(s);
        let flags_v = g.vflags();
        let real = real_sregs(s);
        if paging_changed {
            g.cpu.set_sregs(&real);
        } else {
            // The same paging registers: the translations stand (a flush is
            // `flush_tlb`); only the segments change (the data segments and
            // the FS/GS bases too, as a debugger may write them).
            g.cpu.seg[x86::sreg::CS] = real.cs;
            g.cpu.seg[x86::sreg::SS] = real.ss;
            g.cpu.seg[x86::sreg::DS] = real.ds;
            g.cpu.seg[x86::sreg::ES] = real.es;
            g.cpu.seg[x86::sreg::FS] = real.fs;
            g.cpu.seg[x86::sreg::GS] = real.gs;
            g.cpu.cr2 = s.cr2;
            g.cpu.refresh_mode();
        }
        g.cpu.gdtr = s.gdt;
        g.set_vflags(flags_v);
        self.protect_tables();
        Ok(())
    }

    /// After `mmu_update`: the CPU's TLB goes, and the write protection
    /// follows the tables the update linked in or out.
    fn flush_tlb(&mut self) -> Result<()> {
        self.g.cpu.flush_tlb(true);
        self.protect_tables();
        Ok(())
    }

    fn as_pv(&mut self) -> Option<&mut dyn Paravirtual> {
        Some(self)
    }

    fn engine_counters(&self) -> Vec<(String, u64)> {
        let c = &self.c;
        let mut v = vec![("guest_instructions".to_string(), self.g.cpu.retired)];
        for (k, n) in [
            ("events", c.events),
            ("exceptions", c.exceptions),
            ("page_faults", c.page_faults),
            ("soft_ints", c.soft_ints),
            ("syscalls", c.syscalls),
        ] {
            v.push((format!("reflected/{k}"), n));
        }
        v.push(("hypercall_entries".to_string(), c.hypercalls));
        v
    }
}
