//! visor's software x86-64 CPU.
//!
//! Instructions are decoded with iced-x86 and cached per guest-physical page
//! (a write to a page drops its decoded instructions; so does a change of the
//! page made outside the CPU, found by comparing a snapshot at the next
//! [`Cpu::note_external_writes`]). Memory goes through a software TLB over the
//! guest's 4-level (or PAE, or 2-level) page tables, with accessed and dirty
//! bits, NX, U/S and R/W with CR0.WP, and global pages; the walk that fills it
//! is `arch::paging`, as are the architectural definitions the CPU uses.
//!
//! Each cached instruction is also pre-decoded into a uop (`uop.rs`): the
//! frequent forms of 64-bit code (MOV, LEA, MOVZX/MOVSX, ALU, INC/DEC, IMUL,
//! DIV by a register, shifts by an immediate, Jcc, SETcc, CMOVcc, JMP, CALL,
//! RET, PUSH, POP) get a handler of their own with operands resolved at
//! decode time, and [`Cpu::run`] runs such uops back to back, without the
//! checks between instructions (interrupts, HLT, VMX) that only the other
//! instructions can make necessary. Everything else goes through the
//! generic path (`exec`).
//!
//! Accesses to guest-physical addresses that are not RAM are MMIO: unless the
//! CPU's local device ([`Local`], the local APIC) claims them, [`Cpu::run`]
//! returns an exit. Reads (and port input, MSRs the CPU does not know) abort the
//! instruction: the VMM fills [`Cpu::exit_data`], and the next `run` executes
//! the instruction again from its start, replaying the inputs it already got.
//! Writes (and port output) complete the instruction first and are handed out
//! afterwards, so an instruction either completes or is restarted cleanly.
//!
//! The CPU shows one model, whatever the host ([`model`], docs/cpu-model.md):
//! an instruction whose CPUID features the model does not advertise, or an
//! invalid encoding, raises #UD in the guest; MSRs outside the model raise
//! #GP. A valid instruction of the model that the CPU does not implement
//! ends the run with [`CpuExit::Unimplemented`]. The architecture's checks
//! follow the SDM: reserved bits in paging structures and control registers,
//! canonical addresses, debug registers and single-step (`debug.rs`), NMIs
//! from the local device with their blocking, real mode and virtual-8086
//! mode.
//!
//! The VMM's debugger (`guest_debug.rs`, [`Cpu::set_guest_debug`]) has
//! breakpoints, watchpoints and single-step of its own, invisible to the
//! guest: checked at instruction boundaries and on the slow memory path,
//! reported as [`CpuExit::Debug`].

mod alu;
mod cpuid;
mod debug;
mod decode;
mod exec;
mod f80;
mod f80x;
mod fpu;
mod guest_debug;
mod intercept;
pub mod mem;
mod mmu;
mod mmx;
pub mod model;
mod sse;
mod sse_fp;
mod system;
mod uop;
pub mod vmx;
mod x87;

use std::time::Instant;

use arch::{rflags, vector};
pub use cpuid::{CpuidTable, APIC_TIMER_KHZ, TSC_KHZ};
pub use debug::DebugRegs;
pub use fpu::Fpu;
pub use intercept::{seg_index, sensitive, Intercepts, IrqMode};
pub use mem::PhysMem;
pub use mmu::{TlbProbe, TLB_ALLOW, TLB_ENTRY_SIZE, TLB_HOST, TLB_PPAGE, TLB_VPAGE};
use vcpu::{DescriptorTable, Regs, SRegs, Segment};

/// Segment register numbers (the x86 encoding).
pub mod sreg {
    pub const ES: usize = 0;
    pub const CS: usize = 1;
    pub const SS: usize = 2;
    pub const DS: usize = 3;
    pub const FS: usize = 4;
    pub const GS: usize = 5;
}

/// A device inside the CPU's package that the CPU talks to directly (the local
/// APIC): MMIO it claims never leaves the engine, and it supplies interrupts.
pub trait Local {
    /// True if guest-physical `addr` is in this device's MMIO window.
    fn claims(&self, addr: u64) -> bool;
    fn read(&mut self, addr: u64, data: &mut [u8]);
    fn write(&mut self, addr: u64, data: &[u8]);
    /// Brings timers and external lines up to date; true if an interrupt is
    /// ready for delivery.
    fn poll(&mut self) -> bool;
    /// True if an interrupt is ready for delivery.
    fn pending(&self) -> bool;
    /// Accepts the highest-priority ready interrupt and returns its vector.
    fn ack(&mut self) -> Option<u8>;
    /// CR8 (task priority) was written.
    fn set_tpr(&mut self, _cr8: u64) {}
    /// IA32_APIC_BASE was written: the registers' physical page, and the
    /// global enable (a globally disabled APIC claims no MMIO and raises no
    /// interrupt).
    fn set_base(&mut self, _base: u64, _enabled: bool) {}
    /// True if an NMI is ready (a self-NMI through the ICR, LINT1 in NMI
    /// mode).
    fn nmi_pending(&self) -> bool {
        false
    }
    /// Takes the ready NMI.
    fn take_nmi(&mut self) -> bool {
        false
    }
    /// When the device will next raise an interrupt by itself (its timer).
    fn deadline(&self) -> Option<Instant> {
        None
    }
    /// The CPU was stopped for `paused` (a debugger): timers on the host
    /// clock move on by as much, so that the guest does not see it.
    fn time_paused(&mut self, _paused: std::time::Duration) {}
    /// Its state in a few lines, for a debugger (`monitor regs`).
    fn describe(&self) -> String {
        String::new()
    }
}

/// Runs guest code faster than the interpreter (the `bt` engine's
/// translated code): [`Cpu::run_accel`] asks it before each instruction it
/// would otherwise run in a burst of uops.
pub trait Accel {
    /// False for the interpreter alone (the hook compiles away).
    const ENABLED: bool = true;
    /// Runs guest instructions from RIP, at most `left`, as the interpreter
    /// would (registers, RIP, RFLAGS, memory and `retired` updated) and
    /// returns how many retired: `Some(0)` leaves the next instruction to
    /// the interpreter; `None` says in addition that nothing will ever run
    /// from this RIP's bytes in this mode (the CPU remembers it until the
    /// page's decoded code is dropped, and does not ask again). It must stop
    /// before any instruction that can fault, exit, or change what the
    /// checks between instructions look at.
    fn run(&mut self, cpu: &mut Cpu, left: u64) -> Option<u64>;
}

impl Cpu {
    /// Called by an accelerator's [`Accel::run`] that ran nothing and
    /// wants to be asked again only after the next control transfer (or
    /// the next burst of uops): the code from RIP is cold, and the
    /// interpreter runs the straight line from there without asking before
    /// each instruction.
    pub fn accel_cold(&mut self) {
        self.accel_cold = true;
    }
}

/// No accelerator: [`Cpu::run`].
struct NoAccel;

impl Accel for NoAccel {
    const ENABLED: bool = false;
    fn run(&mut self, _: &mut Cpu, _: u64) -> Option<u64> {
        Some(0)
    }
}

/// Why [`Cpu::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuExit {
    /// `IN`/`INS`: [`Cpu::exit_data`] (`size * count` bytes) is to be filled.
    IoIn { port: u16, size: u8, count: u32 },
    /// `OUT`/`OUTS`: [`Cpu::exit_data`] holds `size * count` bytes.
    IoOut { port: u16, size: u8, count: u32 },
    /// A read of non-RAM `addr`: fill [`Cpu::exit_data`].
    MmioRead { addr: u64 },
    /// A write of non-RAM `addr`: the bytes are in [`Cpu::exit_data`].
    MmioWrite { addr: u64 },
    /// RDMSR of an MSR the CPU does not implement: set `msr_data` or `msr_fault`.
    MsrRead { index: u32 },
    /// WRMSR of an MSR the CPU does not implement: set `msr_fault` to refuse.
    MsrWrite { index: u32, value: u64 },
    /// HLT, and no interrupt is ready.
    Hlt,
    /// Triple fault.
    Shutdown,
    /// The instruction budget of this `run` is used up.
    Budget,
    /// The guest needs something the CPU does not implement; one line says what.
    Unimplemented(String),
    /// An exception whose vector is in `Intercepts::exceptions`, not delivered:
    /// RIP is the faulting instruction (CR2 holds the address of a #PF).
    Exception { vector: u8, code: Option<u32> },
    /// INT n / INT3 / INTO / INT1 with `Intercepts::soft_int`, not executed:
    /// RIP is the instruction, `next_rip` the one after it. `soft`: the
    /// gate's DPL is checked against the CPL (INT n, INT3, INTO; not INT1,
    /// which is delivered as a #DB trap).
    SoftInt {
        vector: u8,
        next_rip: u64,
        soft: bool,
    },
    /// SYSCALL with `Intercepts::syscall`, not executed.
    Syscall { next_rip: u64 },
    /// An interrupt of the local device is ready (`IrqMode::Exit`); it is
    /// still pending there.
    Interrupt,
    /// A sensitive unprivileged instruction at CPL 1 or 2 with
    /// `Intercepts::sensitive`, not executed.
    Sensitive {
        mnemonic: &'static str,
        next_rip: u64,
    },
    /// A VM exit with [`vmx::Vmx::stop_on_exit`]: the VMM reads the VMCS.
    VmExit,
    /// An event the VMM's debugger asked for ([`Cpu::set_guest_debug`]).
    Debug(vcpu::DebugEvent),
}

/// How an instruction stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// An exception: vector and error code.
    Exc(u8, Option<u32>),
    /// The instruction needs the VMM (input, MSR) or hit something unimplemented;
    /// the details are in `Cpu::pending`.
    Exit,
    /// The instruction caused a VM exit in its middle (an EPT violation):
    /// the host state is loaded already.
    VmExit,
}

pub(crate) type R<T> = Result<T, Stop>;

#[inline]
pub(crate) fn exc<T>(vector: u8) -> R<T> {
    Err(Stop::Exc(vector, None))
}

#[inline]
pub(crate) fn exc_code<T>(vector: u8, code: u32) -> R<T> {
    Err(Stop::Exc(vector, Some(code)))
}

/// The MSRs the CPU keeps.
#[derive(Clone, Debug, Default)]
pub struct Msrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub fmask: u64,
    pub kernel_gs_base: u64,
    pub tsc_aux: u64,
    pub apic_base: u64,
    pub pat: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub misc_enable: u64,
    pub mtrr_def_type: u64,
    /// Variable-range MTRRs (0x200..0x210) and fixed-range ones, as written.
    pub mtrr: std::collections::BTreeMap<u32, u64>,
}

/// The pending exit of an aborted or completed instruction.
#[derive(Clone, Debug)]
pub(crate) enum Pending {
    None,
    /// An input exit whose bytes go to `replay[start..start + len]`.
    Input {
        exit: CpuExit,
        start: usize,
        len: usize,
    },
    /// An exit that needs the VMM's answer in `msr_data`/`msr_fault`.
    Msr(CpuExit),
    Unimplemented(String),
    /// An intercepted event (no input to replay).
    Event(CpuExit),
}

pub struct Cpu {
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    /// ES, CS, SS, DS, FS, GS.
    pub seg: [Segment; 6],
    pub tr: Segment,
    pub ldtr: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub msr: Msrs,
    pub fpu: Fpu,
    pub cpuid: CpuidTable,
    /// The local APIC, when the engine models one.
    pub local: Option<Box<dyn Local>>,
    /// Instructions retired.
    pub retired: u64,
    /// The VMM's answer to an MSR exit.
    pub msr_data: u64,
    /// Set to 1 by the VMM to make the MSR access raise #GP.
    pub msr_fault: u8,
    /// Set after HLT until an interrupt arrives.
    pub halted: bool,
    /// Print every instruction (RIP, encoding name, RSP) on stderr.
    pub trace: bool,
    /// Events handed to the engine instead of carried out.
    pub intercepts: Intercepts,
    /// CPL 0 rights for the current instruction (`grant_privilege_once`).
    pub(crate) grant: bool,
    /// No sensitive-instruction stop for the current instruction.
    pub(crate) sensitive_ok: bool,
    /// Frames an engine protects from writes at CPL > 0 (one bit per 4 KiB
    /// page of RAM; empty when none are).
    pub(crate) wp_frames: Vec<u64>,
    /// VMX operation: capabilities, the current VMCS, non-root state.
    pub vmx: vmx::Vmx,
    /// An interrupt of `local` is ready (cached `local.pending()`).
    pub(crate) irq_ready: bool,
    /// An NMI of `local` is ready (cached `local.nmi_pending()`).
    pub(crate) nmi_ready: bool,
    /// STI/MOV SS shadow: no interrupt before the next instruction completes.
    pub(crate) inhibit: bool,
    /// The VMM's debugger (breakpoints, watchpoints, single-step).
    pub(crate) debug: guest_debug::DebugState,
    /// The debug registers.
    pub dbg: DebugRegs,
    /// A data breakpoint is enabled (its pages get no fast TLB access).
    pub(crate) watching: bool,
    /// Breakpoints the current instruction hit (DR6 bits).
    pub(crate) db_hits: u64,
    /// A #DB trap waiting for the end of the instruction after MOV SS.
    pub(crate) db_deferred: u64,
    /// The current instruction is MOV SS or POP SS.
    pub(crate) ss_shadow: bool,
    /// The #DB being raised is an instruction breakpoint's (a fault that
    /// pushes RF as it is).
    pub(crate) ibp_fault: bool,
    /// The current instruction delivered a software interrupt.
    pub(crate) soft_int_done: bool,
    /// A #DB trap of the last instruction waits for delivery.
    pub(crate) db_trap: bool,
    /// MAXPHYADDR: that of `cpuid`, or wider if the memory the CPU has (an
    /// engine's private memory) needs it (taken at creation and by
    /// `set_sregs`).
    pub(crate) maxphyaddr: u32,

    // Cached mode.
    pub(crate) cpl: u8,
    /// 16, 32 or 64: the code size.
    pub(crate) bits: u32,
    /// 64-bit mode (long mode with a 64-bit CS).
    pub(crate) long64: bool,
    /// Access bits of the TLB for reads, writes and fetches at the current CPL.
    pub(crate) acc_r: u8,
    pub(crate) acc_w: u8,
    pub(crate) acc_x: u8,

    pub(crate) mem: PhysMem,
    pub(crate) tlb: Box<[mmu::TlbEntry]>,
    pub(crate) tlb_has_large: bool,
    /// Whether the TLB may hold pieces of 1 GiB pages.
    pub(crate) tlb_has_huge: bool,
    pub(crate) code: decode::CodeCache,

    /// Inputs this instruction already received (replayed when it runs again).
    pub(crate) replay: Vec<u8>,
    pub(crate) replay_pos: usize,
    /// Output of completed instructions waiting to be handed out: MMIO writes
    /// (address, start, length in `out`) and port output.
    pub(crate) out: Vec<u8>,
    pub(crate) out_queue: Vec<(CpuExit, usize, usize)>,
    pub(crate) out_next: usize,
    /// Whether the current instruction touched `replay` or `out`.
    pub(crate) io_touched: bool,
    /// The accelerator said the code at RIP is cold ([`Cpu::accel_cold`]).
    accel_cold: bool,
    pub(crate) pending: Pending,
    /// What [`Cpu::exit_data`] returns: (is output, start, len).
    xfer: (bool, usize, usize),
    msr_waiting: bool,

    /// The next instruction pointer of the instruction being executed.
    pub(crate) next_rip: u64,
    tsc_start: Instant,
    pub(crate) tsc_offset: u64,
}

impl Cpu {
    /// A CPU at the reset state (real mode), with RAM `mem`.
    pub fn new(mem: PhysMem, cpuid: CpuidTable) -> Cpu {
        let code = decode::CodeCache::new(mem.end());
        let mut seg = [Segment {
            limit: 0xffff,
            type_: 3,
            present: true,
            s: true,
            ..Default::default()
        }; 6];
        seg[sreg::CS].type_ = 0xb;
        let mut cpu = Cpu {
            gpr: [0; 16],
            rip: 0xfff0,
            rflags: rflags::FIXED,
            seg,
            tr: Segment {
                type_: 0xb,
                present: true,
                limit: 0xffff,
                ..Default::default()
            },
            ldtr: Segment {
                type_: 2,
                present: true,
                limit: 0xffff,
                ..Default::default()
            },
            gdtr: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idtr: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            cr0: arch::cr0::ET,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            msr: Msrs {
                pat: 0x0007_0406_0007_0406,
                apic_base: 0xfee0_0000 | (1 << 11) | (1 << 8),
                misc_enable: 1,
                ..Default::default()
            },
            fpu: Fpu::default(),
            cpuid,
            local: None,
            retired: 0,
            msr_data: 0,
            msr_fault: 0,
            halted: false,
            trace: false,
            intercepts: Intercepts::default(),
            grant: false,
            sensitive_ok: false,
            wp_frames: Vec::new(),
            vmx: vmx::Vmx::default(),
            irq_ready: false,
            nmi_ready: false,
            inhibit: false,
            debug: guest_debug::DebugState::default(),
            dbg: DebugRegs::default(),
            watching: false,
            db_hits: 0,
            db_deferred: 0,
            ss_shadow: false,
            ibp_fault: false,
            soft_int_done: false,
            db_trap: false,
            maxphyaddr: 36,
            cpl: 0,
            bits: 16,
            long64: false,
            acc_r: 0,
            acc_w: 0,
            acc_x: 0,
            mem,
            tlb: vec![mmu::TlbEntry::INVALID; mmu::TLB_SIZE].into_boxed_slice(),
            tlb_has_large: false,
            tlb_has_huge: false,
            code,
            replay: Vec::with_capacity(8192),
            replay_pos: 0,
            out: Vec::with_capacity(8192),
            out_queue: Vec::new(),
            out_next: 0,
            io_touched: false,
            accel_cold: false,
            pending: Pending::None,
            xfer: (false, 0, 0),
            msr_waiting: false,
            next_rip: 0,
            tsc_start: Instant::now(),
            tsc_offset: 0,
        };
        cpu.maxphyaddr = cpu.walk_width();
        cpu.mode_changed();
        cpu
    }

    fn walk_width(&self) -> u32 {
        self.phys_bits().max(self.mem.width())
    }

    /// The time-stamp counter: nanoseconds since the CPU was created (1 GHz,
    /// [`TSC_KHZ`], which CPUID leaf 0x4000_0010 tells the guest).
    pub fn tsc(&self) -> u64 {
        (self.tsc_start.elapsed().as_nanos() as u64).wrapping_add(self.tsc_offset)
    }

    pub fn regs(&self) -> Regs {
        let g = &self.gpr;
        Regs {
            rax: g[0],
            rcx: g[1],
            rdx: g[2],
            rbx: g[3],
            rsp: g[4],
            rbp: g[5],
            rsi: g[6],
            rdi: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: self.rip,
            rflags: self.rflags,
        }
    }

    pub fn set_regs(&mut self, r: &Regs) {
        if r.rip != self.rip {
            // A different instruction: whatever the old one received is void.
            self.abandon_instruction();
        }
        self.gpr = [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        self.rip = r.rip;
        self.rflags = (r.rflags & (rflags::WRITABLE | rflags::VM | rflags::VIF | rflags::VIP))
            | rflags::FIXED;
    }

    pub fn sregs(&self) -> SRegs {
        SRegs {
            es: self.seg[sreg::ES],
            cs: self.seg[sreg::CS],
            ss: self.seg[sreg::SS],
            ds: self.seg[sreg::DS],
            fs: self.seg[sreg::FS],
            gs: self.seg[sreg::GS],
            tr: self.tr,
            ldt: self.ldtr,
            gdt: self.gdtr,
            idt: self.idtr,
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            cr8: self.cr8,
            efer: self.efer,
        }
    }

    pub fn set_sregs(&mut self, s: &SRegs) {
        self.seg = [s.es, s.cs, s.ss, s.ds, s.fs, s.gs];
        self.tr = s.tr;
        self.ldtr = s.ldt;
        self.gdtr = s.gdt;
        self.idtr = s.idt;
        self.cr0 = s.cr0 | arch::cr0::ET;
        self.cr2 = s.cr2;
        self.cr3 = s.cr3;
        self.cr4 = s.cr4;
        self.cr8 = s.cr8 & 0xf;
        self.efer = s.efer;
        self.maxphyaddr = self.walk_width();
        self.tlb_flush(true);
        self.mode_changed();
    }

    /// Memory may have been changed outside the CPU, where is not known:
    /// decoded instructions are checked against memory before use.
    pub fn note_external_writes(&mut self) {
        self.code.new_epoch();
    }

    /// `len` bytes of guest-physical memory at `pa` were written outside the
    /// CPU (by the VMM between two `run`s): decoded instructions there are
    /// dropped. A range too large to walk page by page starts a new epoch
    /// instead (every page is checked against memory before use).
    pub fn external_write(&mut self, pa: u64, len: u64) {
        const MAX_PAGES: u64 = 256;
        if len == 0 {
            return;
        }
        let last = pa.saturating_add(len - 1);
        if (last >> 12) - (pa >> 12) >= MAX_PAGES {
            self.note_external_writes();
            return;
        }
        let mut at = pa;
        loop {
            let end = (at | 0xfff).min(last);
            if self.code.is_code(at & !0xfff) {
                self.code_written(at, (end - at + 1) as usize);
            }
            if end == last {
                break;
            }
            at = end + 1;
        }
    }

    /// The CPU was stopped for `paused` (by the VMM's debugger): the
    /// time-stamp counter and the local device's timers go on from where
    /// they were.
    pub fn time_paused(&mut self, paused: std::time::Duration) {
        let ns = u64::try_from(paused.as_nanos()).unwrap_or(u64::MAX);
        self.tsc_offset = self.tsc_offset.wrapping_sub(ns);
        if let Some(l) = self.local.as_mut() {
            l.time_paused(paused);
        }
    }

    /// When the local device will next raise an interrupt by itself.
    pub fn local_deadline(&self) -> Option<Instant> {
        self.local.as_ref().and_then(|l| l.deadline())
    }

    /// Whether interrupts are enabled (RFLAGS.IF).
    pub fn interrupts_enabled(&self) -> bool {
        self.rflags & rflags::IF != 0
    }

    /// The buffer of the last exit: the bytes to fill for `IoIn`/`MmioRead`,
    /// the bytes written for `IoOut`/`MmioWrite`.
    pub fn exit_data(&mut self) -> &mut [u8] {
        let (output, start, len) = self.xfer;
        let buf = if output {
            &mut self.out
        } else {
            &mut self.replay
        };
        let end = (start + len).min(buf.len());
        &mut buf[start.min(end)..end]
    }

    /// Recomputes what depends on CR0, CR4, EFER, CS and the CPL.
    pub(crate) fn mode_changed(&mut self) {
        let cs = &self.seg[sreg::CS];
        let lma = self.efer & arch::efer::LMA != 0;
        self.long64 = lma && cs.l;
        self.bits = if self.long64 {
            64
        } else if cs.db {
            32
        } else {
            16
        };
        self.cpl = if self.cr0 & arch::cr0::PE == 0 {
            0
        } else if self.rflags & rflags::VM != 0 {
            3
        } else if cs.s && cs.type_ & 0xc == 0xc {
            // A conforming code segment runs at the privilege of the code
            // that entered it (SDM vol. 3 5.8.1.2): its DPL may be lower;
            // every load of it sets the selector's RPL to that CPL.
            (cs.selector & 3) as u8
        } else {
            cs.dpl & 3
        };
        let user = self.cpl == 3;
        self.acc_r = if user { mmu::A_R_U } else { mmu::A_R_S };
        self.acc_w = if user { mmu::A_W_U } else { mmu::A_W_S };
        self.acc_x = if user { mmu::A_X_U } else { mmu::A_X_S };
        self.code.reset_fetch();
    }

    /// Runs up to `budget` instructions.
    pub fn run(&mut self, budget: u64) -> CpuExit {
        self.run_with(budget, &mut NoAccel)
    }

    /// Runs up to `budget` instructions, letting `accel` run those it can
    /// (translated code) wherever the interpreter would run a burst of uops:
    /// the checks between instructions (interrupts, HLT, VMX, traces)
    /// stay the interpreter's.
    pub fn run_accel<A: Accel>(&mut self, budget: u64, accel: &mut A) -> CpuExit {
        self.run_with(budget, accel)
    }

    #[inline(always)]
    fn run_with<A: Accel>(&mut self, budget: u64, accel: &mut A) -> CpuExit {
        if let Some(e) = self.next_output() {
            return e;
        }
        if self.msr_waiting {
            self.msr_waiting = false;
            self.replay.push(self.msr_fault);
            self.replay.extend_from_slice(&self.msr_data.to_le_bytes());
        }
        if let Some(l) = self.local.as_mut() {
            self.irq_ready = l.poll();
            self.nmi_ready = l.nmi_pending();
        }
        // Exceptions count against the budget too: a guest whose handlers
        // fault forever must still come back.
        let mut left = budget;
        loop {
            if self.vmx.exited {
                self.vmx.exited = false;
                if std::mem::take(&mut self.vmx.aborted) {
                    return CpuExit::Shutdown;
                }
                return CpuExit::VmExit;
            }
            let blocked = self.inhibit;
            self.inhibit = false;
            if self.db_trap {
                // The last instruction's #DB trap, before any interrupt.
                self.db_trap = false;
                if self.intercepts.exceptions & (1 << vector::DB) != 0 {
                    return CpuExit::Exception {
                        vector: vector::DB,
                        code: None,
                    };
                }
                if !self.trap_exception(vector::DB) {
                    return self.shutdown_or_unimplemented();
                }
                continue;
            }
            if self.vmx.non_root && self.vmx_boundary(blocked) {
                continue;
            }
            // An NMI: not in the shadow of STI or MOV SS, nor while NMIs
            // are blocked (from the delivery of one to the next IRET).
            if self.nmi_ready && !blocked && !self.vmx.nmi_blocked {
                if let Some(e) = self.take_nmi() {
                    return e;
                }
                continue;
            }
            let held = self.debug.active && self.debug.holds_interrupts(self.halted);
            if self.irq_ready && !blocked && !held && self.rflags & rflags::IF != 0 {
                match self.intercepts.irq {
                    IrqMode::Deliver => {
                        if let Some(e) = self.take_interrupt() {
                            return e;
                        }
                    }
                    IrqMode::Exit => return CpuExit::Interrupt,
                    IrqMode::Hold => {}
                }
            }
            if self.debug.active {
                if let Some(e) = self.debug_boundary() {
                    return e;
                }
            }
            if self.halted {
                return CpuExit::Hlt;
            }
            if left == 0 {
                return CpuExit::Budget;
            }
            // (Sensitive-instruction intercepts and VMX instruction exits
            // are checked by the generic path: no uop with a handler of its
            // own is sensitive or exits.)
            let plain = !(blocked
                || self.debug_active()
                || self.trace
                || (self.vmx.non_root && !self.vmx_quiet())
                || self.grant
                || self.sensitive_ok
                || self.debug.active);
            let r = if plain {
                self.burst(&mut left, accel)
            } else if self.debug_active() {
                left -= 1;
                self.step_debug()
            } else {
                left -= 1;
                self.step().map(|()| self.retired += 1)
            };
            match r {
                Ok(()) => {
                    self.grant = false;
                    self.sensitive_ok = false;
                    if self.io_touched {
                        self.io_touched = false;
                        self.replay.clear();
                        self.replay_pos = 0;
                        if let Some(e) = self.next_output() {
                            return e;
                        }
                    }
                }
                Err(Stop::Exc(v, code)) => {
                    self.inhibit = false;
                    self.end_instruction_io();
                    if self.intercepts.exceptions & (1 << v) != 0 {
                        // The engine may resolve it and run the instruction
                        // again (a shadow page fault): grants stay until it
                        // completes or the engine revokes them.
                        return CpuExit::Exception { vector: v, code };
                    }
                    self.grant = false;
                    self.sensitive_ok = false;
                    if !self.exception(v, code) {
                        return self.shutdown_or_unimplemented();
                    }
                }
                Err(Stop::VmExit) => {
                    self.inhibit = false;
                    self.end_instruction_io();
                }
                Err(Stop::Exit) => {
                    // Output of the aborted instruction is void; inputs stay
                    // for the replay.
                    self.out.clear();
                    self.out_queue.clear();
                    self.out_next = 0;
                    self.io_touched = false;
                    self.replay_pos = 0;
                    self.inhibit = blocked;
                    return self.take_pending();
                }
            }
        }
    }

    /// Runs uops back to back while nothing needs the checks between
    /// instructions of `run`: it stops after the budget, an instruction run
    /// by the generic path (which may change IF, the interrupt shadow, HLT,
    /// the mode...), or an instruction that touched I/O. The caller made sure
    /// no interrupt shadow, grant or trace is on, and in VMX non-root
    /// operation no exit between instructions is armed.
    #[inline(always)]
    fn burst<A: Accel>(&mut self, left: &mut u64, accel: &mut A) -> R<()> {
        // Whether to ask the accelerator before the next instruction: at
        // the start of the burst and after a control transfer, and before
        // every instruction unless it said the code here is cold
        // ([`Cpu::accel_cold`]).
        let mut ask = true;
        while *left > 0 {
            // Translated code does not check alignment (#AC): while CPL 3
            // code runs with CR0.AM and RFLAGS.AC, the interpreter runs it.
            if A::ENABLED && ask && !self.no_accel_here() && !self.alignment_checked(mmu::A_R_U) {
                self.accel_cold = false;
                match accel.run(self, *left) {
                    Some(n) => {
                        *left -= n.min(*left);
                        if *left == 0 {
                            break;
                        }
                    }
                    None => self.set_no_accel_here(),
                }
                ask = !self.accel_cold;
            }
            let p = self.fetch_uop()?;
            // SAFETY: the uop stays valid and unchanged while its handler
            // runs (see `fetch_uop`), and no `&mut` to it exists meanwhile.
            let u = unsafe { &*p };
            *left -= 1;
            let sequential = u.ip.wrapping_add(u.len as u64);
            self.next_rip = sequential;
            (u.run)(self, u)?;
            if A::ENABLED && self.next_rip != sequential {
                ask = true;
            }
            self.rip = self.next_rip;
            self.retired += 1;
            if !u.is_fast() || self.io_touched {
                break;
            }
        }
        Ok(())
    }

    /// One instruction with the debug checks around it; a #DB trap it
    /// raises is delivered before the next.
    fn step_debug(&mut self) -> R<()> {
        let tf = self.rflags & rflags::TF != 0;
        self.db_hits = 0;
        self.debug_before()?;
        self.ss_shadow = false;
        self.soft_int_done = false;
        self.step()?;
        self.retired += 1;
        self.db_trap = self.debug_after(tf, self.soft_int_done);
        Ok(())
    }

    pub(crate) fn shutdown_or_unimplemented(&mut self) -> CpuExit {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::Unimplemented(s) => CpuExit::Unimplemented(s),
            _ => CpuExit::Shutdown,
        }
    }

    /// The next queued output, if any.
    fn next_output(&mut self) -> Option<CpuExit> {
        if self.out_next < self.out_queue.len() {
            let (e, start, len) = self.out_queue[self.out_next].clone();
            self.out_next += 1;
            self.xfer = (true, start, len);
            return Some(e);
        }
        if !self.out_queue.is_empty() {
            self.out_queue.clear();
            self.out.clear();
            self.out_next = 0;
        }
        None
    }

    fn take_pending(&mut self) -> CpuExit {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::Input { exit, start, len } => {
                self.xfer = (false, start, len);
                exit
            }
            Pending::Msr(exit) => {
                self.msr_waiting = true;
                self.msr_data = 0;
                self.msr_fault = 0;
                exit
            }
            Pending::Unimplemented(s) => CpuExit::Unimplemented(s),
            Pending::Event(e) => e,
            Pending::None => CpuExit::Unimplemented("internal: exit without a reason".into()),
        }
    }

    /// An instruction ended (completed or faulted): its inputs are consumed.
    fn end_instruction_io(&mut self) {
        if self.io_touched {
            self.io_touched = false;
            self.replay.clear();
            self.replay_pos = 0;
            // Output of a faulting instruction is dropped (the queue is empty
            // when an instruction starts).
            self.out.clear();
            self.out_queue.clear();
            self.out_next = 0;
        }
    }

    /// Forgets a half-executed instruction (the VMM moved RIP).
    fn abandon_instruction(&mut self) {
        self.replay.clear();
        self.replay_pos = 0;
        self.msr_waiting = false;
        self.pending = Pending::None;
    }

    /// Records that the guest needs something not implemented, and stops.
    pub(crate) fn unimplemented<T>(&mut self, what: String) -> R<T> {
        self.pending = Pending::Unimplemented(what);
        Err(Stop::Exit)
    }

    /// Takes `buf.len()` bytes of input of the current instruction: replayed if
    /// already received, else the instruction is aborted with `exit`.
    pub(crate) fn input(&mut self, exit: CpuExit, buf: &mut [u8]) -> R<()> {
        self.io_touched = true;
        let n = buf.len();
        if self.replay_pos + n <= self.replay.len() {
            buf.copy_from_slice(&self.replay[self.replay_pos..self.replay_pos + n]);
            self.replay_pos += n;
            return Ok(());
        }
        let start = self.replay_pos;
        self.replay.truncate(start);
        self.replay.resize(start + n, 0xff);
        self.pending = Pending::Input {
            exit,
            start,
            len: n,
        };
        Err(Stop::Exit)
    }

    /// Queues output of the current instruction (handed out once it completes).
    pub(crate) fn output(&mut self, exit: CpuExit, data: &[u8]) {
        self.io_touched = true;
        let start = self.out.len();
        self.out.extend_from_slice(data);
        self.out_queue.push((exit, start, data.len()));
    }

    /// Asks the VMM about an MSR: replays the answer, else aborts with `exit`.
    /// Returns the value (reads) or Ok for an accepted write; #GP if refused.
    pub(crate) fn msr_exit(&mut self, exit: CpuExit) -> R<u64> {
        self.io_touched = true;
        if self.replay_pos + 9 <= self.replay.len() {
            let fault = self.replay[self.replay_pos];
            let mut b = [0u8; 8];
            b.copy_from_slice(&self.replay[self.replay_pos + 1..self.replay_pos + 9]);
            self.replay_pos += 9;
            if fault != 0 {
                return exc_code(vector::GP, 0);
            }
            return Ok(u64::from_le_bytes(b));
        }
        self.replay.truncate(self.replay_pos);
        self.pending = Pending::Msr(exit);
        Err(Stop::Exit)
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod x87_tests;
