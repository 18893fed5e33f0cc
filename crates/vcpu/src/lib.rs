//! The engine contract of visor.
//!
//! Every CPU-virtualization engine (hardware-assisted through KVM, and later the
//! software engines) implements [`Vm`] and [`Vcpu`]. Engines know nothing about
//! devices: a [`Vcpu::run`] call returns a [`VcpuExit`] that borrows the exit's data
//! buffer, and the one VMM loop completes it against the machine's buses before it
//! calls `run` again.
//!
//! A debugger attached to the VMM (`visor run --gdb`) reaches the guest
//! through [`Vcpu::set_guest_debug`] ([`GuestDebug`]: breakpoints,
//! watchpoints, single-step the guest cannot see) and [`VcpuExit::Debug`].

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The segment register image lives with the other architectural definitions.
pub use arch::Segment;

mod clock;
pub use clock::GuestClock;

/// General-purpose registers, instruction pointer and flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    /// RAX.
    pub rax: u64,
    /// RBX.
    pub rbx: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// RSP.
    pub rsp: u64,
    /// RBP.
    pub rbp: u64,
    /// R8.
    pub r8: u64,
    /// R9.
    pub r9: u64,
    /// R10.
    pub r10: u64,
    /// R11.
    pub r11: u64,
    /// R12.
    pub r12: u64,
    /// R13.
    pub r13: u64,
    /// R14.
    pub r14: u64,
    /// R15.
    pub r15: u64,
    /// The instruction pointer.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
}

/// GDTR / IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    /// Linear base address.
    pub base: u64,
    /// Limit (size - 1).
    pub limit: u16,
}

/// System registers: segments, descriptor tables, control registers and EFER.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SRegs {
    /// CS.
    pub cs: Segment,
    /// DS.
    pub ds: Segment,
    /// ES.
    pub es: Segment,
    /// FS.
    pub fs: Segment,
    /// GS.
    pub gs: Segment,
    /// SS.
    pub ss: Segment,
    /// The task register.
    pub tr: Segment,
    /// The LDT register.
    pub ldt: Segment,
    /// GDTR.
    pub gdt: DescriptorTable,
    /// IDTR.
    pub idt: DescriptorTable,
    /// CR0.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8.
    pub cr8: u64,
    /// IA32_EFER.
    pub efer: u64,
}

/// Why `Vcpu::run` returned. Data-carrying exits borrow the engine's exit buffer:
/// the VMM fills `data` of a read before the next `run`, which completes the
/// instruction.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// `IN`/`INS` from `port`; `data` holds `count * size` bytes to fill
    /// (`count > 1` for a `REP INS` that the engine batched).
    IoIn {
        /// The port.
        port: u16,
        /// Bytes per access (1, 2 or 4).
        size: u8,
        /// The bytes to fill.
        data: &'a mut [u8],
    },
    /// `OUT`/`OUTS` to `port`; `data` holds `count * size` bytes.
    IoOut {
        /// The port.
        port: u16,
        /// Bytes per access (1, 2 or 4).
        size: u8,
        /// The bytes written.
        data: &'a [u8],
    },
    /// A read of guest-physical `addr` that no RAM backs.
    MmioRead {
        /// The guest-physical address.
        addr: u64,
        /// The bytes to fill.
        data: &'a mut [u8],
    },
    /// A write of guest-physical `addr` that no RAM backs.
    MmioWrite {
        /// The guest-physical address.
        addr: u64,
        /// The bytes written.
        data: &'a [u8],
    },
    /// `RDMSR` of an MSR the engine does not implement: the VMM fills `data`, or
    /// sets `fault` to 1 to raise #GP in the guest.
    MsrRead {
        /// The MSR (ECX).
        index: u32,
        /// The value to return.
        data: &'a mut u64,
        /// 1 to raise #GP instead.
        fault: &'a mut u8,
    },
    /// `WRMSR` of an MSR the engine does not implement; `fault` as for reads.
    MsrWrite {
        /// The MSR (ECX).
        index: u32,
        /// The value (EDX:EAX).
        value: u64,
        /// 1 to raise #GP instead.
        fault: &'a mut u8,
    },
    /// `HLT` with no interrupt the engine itself can deliver.
    Hlt,
    /// The guest caused a shutdown (triple fault).
    Shutdown,
    /// The engine could not enter the guest (invalid guest state).
    FailEntry {
        /// The hardware's (or the engine's) entry-failure reason.
        reason: u64,
    },
    /// The engine returned without a guest event (signal, immediate exit).
    Interrupted,
    /// The guest executed a valid instruction the engine does not implement;
    /// `what` reads `unimplemented instruction <mnemonic> at <rip>`.
    Unimplemented {
        /// What, in one line.
        what: String,
    },
    /// An exit the engine has no portable name for.
    Other {
        /// Why, in one line.
        reason: String,
    },
    /// The guest made a hypercall through the engine's own entry (`int 0x82`
    /// under `pv`): the number and arguments are in the registers, RIP is past
    /// the entry instruction.
    Hypercall,
    /// A debug event the VMM asked for with [`Vcpu::set_guest_debug`] (the
    /// guest never sees it): RIP is where the guest stopped.
    Debug(DebugEvent),
}

/// What a debugger attached to the VMM asks of a vCPU, as KVM's
/// `KVM_SET_GUEST_DEBUG` does: invisible to the guest (its own debug
/// registers and RFLAGS.TF are untouched). The VMM sets it again before
/// every resume; an engine compares addresses with RIP and with the linear
/// addresses the guest accesses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestDebug {
    /// Stop after one instruction (interrupts are held while stepping, as
    /// QEMU's and KVM's debuggers do by default, unless the vCPU is halted).
    pub single_step: bool,
    /// Stop before the instruction at each of these RIP values (software
    /// breakpoints: the engine compares RIP, guest memory is not patched).
    pub breakpoints: Vec<u64>,
    /// Stop before the instruction at each of these linear addresses
    /// (hardware breakpoints; an engine may limit their number).
    pub hw_breakpoints: Vec<u64>,
    /// Stop after an instruction that accessed one of these ranges.
    pub watchpoints: Vec<Watchpoint>,
}

impl GuestDebug {
    /// Whether anything is asked at all.
    pub fn is_active(&self) -> bool {
        self.single_step
            || !self.breakpoints.is_empty()
            || !self.hw_breakpoints.is_empty()
            || !self.watchpoints.is_empty()
    }
}

/// A range of linear addresses whose accesses stop the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watchpoint {
    /// The first linear address.
    pub addr: u64,
    /// The length in bytes (at least 1).
    pub len: u64,
    /// Which accesses.
    pub kind: WatchKind,
}

/// The accesses a [`Watchpoint`] catches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchKind {
    /// Writes.
    Write,
    /// Reads.
    Read,
    /// Reads and writes.
    Access,
}

/// Why a vCPU stopped for the debugger ([`VcpuExit::Debug`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugEvent {
    /// One instruction ran (or an exception was delivered).
    Step,
    /// RIP reached a breakpoint; the instruction there has not run.
    Breakpoint,
    /// The instruction before RIP accessed linear `addr` of a watchpoint.
    Watch {
        /// The address accessed (the first in the watched range).
        addr: u64,
        /// What the access was: [`WatchKind::Read`] or [`WatchKind::Write`].
        kind: WatchKind,
    },
}

impl VcpuExit<'_> {
    /// A short stable name for statistics.
    pub fn name(&self) -> &'static str {
        match self {
            VcpuExit::IoIn { .. } => "io_in",
            VcpuExit::IoOut { .. } => "io_out",
            VcpuExit::MmioRead { .. } => "mmio_read",
            VcpuExit::MmioWrite { .. } => "mmio_write",
            VcpuExit::MsrRead { .. } => "msr_read",
            VcpuExit::MsrWrite { .. } => "msr_write",
            VcpuExit::Hlt => "hlt",
            VcpuExit::Shutdown => "shutdown",
            VcpuExit::FailEntry { .. } => "fail_entry",
            VcpuExit::Interrupted => "interrupted",
            VcpuExit::Unimplemented { .. } => "unimplemented",
            VcpuExit::Other { .. } => "other",
            VcpuExit::Hypercall => "hypercall",
            VcpuExit::Debug(_) => "debug",
        }
    }
}

/// An engine error: the engine itself failed (not the guest).
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A system call of the engine failed.
    #[error("{op}: {source}")]
    Os {
        /// What the engine was doing.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Anything else the engine could not do, in one line.
    #[error("{0}")]
    Engine(String),
}

impl VcpuError {
    /// An OS error of `op`.
    pub fn os(op: &'static str, source: impl Into<std::io::Error>) -> Self {
        VcpuError::Os {
            op,
            source: source.into(),
        }
    }
}

/// The result of an engine operation.
pub type Result<T> = std::result::Result<T, VcpuError>;

/// One virtual CPU of an engine.
pub trait Vcpu {
    /// Runs the guest until the next exit the VMM must handle.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    /// The general-purpose registers, RIP and RFLAGS.
    fn regs(&self) -> Result<Regs>;
    /// Sets the general-purpose registers, RIP and RFLAGS.
    fn set_regs(&mut self, regs: &Regs) -> Result<()>;
    /// The system registers.
    fn sregs(&self) -> Result<SRegs>;
    /// Sets the system registers (a mode change, a new address space: the
    /// engine drops what depended on the old ones).
    fn set_sregs(&mut self, sregs: &SRegs) -> Result<()>;
    /// Counters the engine keeps itself (for example exits handled inside the host
    /// kernel), reported beside the VMM's own statistics.
    fn engine_counters(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
    /// The vCPU's kick: the VMM keeps it to make `run` return `Interrupted`
    /// from another thread (see [`Kick`]). The same handle every time.
    fn kick(&self) -> Arc<Kick>;
    /// The VMM (or anything outside the engine) wrote `len` bytes of guest
    /// memory at guest-physical `gpa` since the last `run`. An engine that
    /// caches anything derived from guest memory (decoded or translated code)
    /// drops what the write may have changed; the VMM must report every such
    /// write before the next `run`. It does not flush cached address
    /// translations: a VMM that changes page tables flushes them explicitly.
    fn memory_written(&mut self, gpa: u64, len: u64);
    /// Drops every translation the vCPU caches from the guest's page tables,
    /// global ones included, and leaves the guest's state (CR3 included) as it
    /// is. The VMM calls it after it changed the guest's page tables itself
    /// (the `mmu_update` hypercall), so that the guest sees the change at
    /// once. Setting the same [`SRegs`] again is not a flush.
    fn flush_tlb(&mut self) -> Result<()>;
    /// The paravirtual side of an engine whose guest kernel runs
    /// deprivileged (engine `pv`): what the hypercall service does there on
    /// the kernel's behalf. `None`, the default, for engines that run the
    /// guest kernel with the privilege to do it itself.
    fn as_pv(&mut self) -> Option<&mut dyn Paravirtual> {
        None
    }
    /// Sets what a debugger attached to the VMM asks of the vCPU (see
    /// [`GuestDebug`]); the next `run` returns [`VcpuExit::Debug`] when it
    /// happens. The default: the engine cannot.
    fn set_guest_debug(&mut self, debug: &GuestDebug) -> Result<()> {
        let _ = debug;
        Err(VcpuError::Engine(
            "this engine cannot debug its guest".into(),
        ))
    }
    /// The vCPU was stopped (for a debugger) for `paused`: an engine whose
    /// clocks and timers run on the host clock moves them on by as much, so
    /// that the guest does not see the time pass. The default does nothing.
    fn time_paused(&mut self, paused: Duration) {
        let _ = paused;
    }
    /// Lines about the engine's own state for a debugger's `monitor`
    /// command `what` (`vmcs`, `virt`, `translation`), or `None` if the
    /// engine has no such state.
    fn debug_info(&mut self, what: &str) -> Option<String> {
        let _ = what;
        None
    }
}

/// What the hypercall service does for a deprivileged guest kernel that the
/// kernel may not do itself ([`Vcpu::as_pv`]).
pub trait Paravirtual {
    /// Where SYSCALL from user mode enters the kernel (`set_callbacks` with
    /// kind SYSCALL): LSTAR = `entry`, STAR = `star`, FMASK = `fmask`, and
    /// EFER.SCE set.
    fn set_syscall_entry(&mut self, entry: u64, star: u64, fmask: u64) -> Result<()>;
}

/// The kick of one vCPU: makes its current or next [`Vcpu::run`] return
/// [`VcpuExit::Interrupted`] promptly, from any thread, as KVM's
/// `immediate_exit` and a signal do. Engines never return `Interrupted` on a
/// timer of their own: the VMM kicks when it wants the loop back (`--timeout`,
/// a register dump).
///
/// [`Kick::kick`] only stores to atomics, wakes a futex and signals a thread,
/// so it may be called from a signal handler.
///
/// The kick also carries the vCPU's wake-up word: an engine that waits in the
/// host for a guest interrupt (HLT) waits on it with [`Kick::wait`], and
/// whatever raises an interrupt for the vCPU calls [`Kick::wake`].
#[derive(Debug, Default)]
pub struct Kick {
    /// A kick that the engine has not taken yet.
    requested: AtomicBool,
    /// The futex word: bumped by every wake-up.
    word: AtomicU32,
    /// The thread id (gettid) inside `run` of an engine that blocks in the host
    /// kernel (KVM_RUN), to signal; 0 when none.
    thread: AtomicU64,
}

/// The signal [`Kick::kick`] sends a thread registered with
/// [`Kick::enter_blocking`]; the VMM installs a handler for it that does
/// nothing and does not set `SA_RESTART`, so a blocking ioctl returns `EINTR`.
pub const KICK_SIGNAL: i32 = libc::SIGUSR1;

impl Kick {
    /// A new kick, shared between the engine and the VMM.
    pub fn new() -> Arc<Kick> {
        Arc::new(Kick::default())
    }

    /// Asks the vCPU to return `Interrupted`. A kick that lands while an engine
    /// that blocks in the host kernel is between its check and its entry is
    /// seen at the guest's next exit: a caller that needs a bound repeats it.
    pub fn kick(&self) {
        self.requested.store(true, Ordering::SeqCst);
        self.wake();
        let tid = self.thread.load(Ordering::SeqCst);
        if tid != 0 {
            // SAFETY: tgkill takes plain integers and is async-signal-safe. It
            // reaches only threads of this process (the thread group is ours):
            // if the registered thread has left and its id was reused, the
            // signal goes to another thread of visor, where KICK_SIGNAL's
            // handler does nothing.
            unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    libc::getpid(),
                    tid as libc::pid_t,
                    KICK_SIGNAL,
                )
            };
        }
    }

    /// Takes a pending kick (the engine returns `Interrupted` if true).
    pub fn take(&self) -> bool {
        self.requested.load(Ordering::Relaxed) && self.requested.swap(false, Ordering::SeqCst)
    }

    /// Whether a kick is pending, without taking it.
    pub fn pending(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Wakes a vCPU waiting in [`Kick::wait`] (an interrupt was raised for it).
    pub fn wake(&self) {
        self.word.fetch_add(1, Ordering::SeqCst);
        // SAFETY: FUTEX_WAKE on the address of a live AtomicU32 that this
        // struct owns; the kernel only compares and wakes, never writes it.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.word.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                i32::MAX,
            )
        };
    }

    /// The wake-up word: read it before checking for work, then pass it to
    /// [`Kick::wait`], so that a wake-up in between is not lost.
    pub fn seen(&self) -> u32 {
        self.word.load(Ordering::SeqCst)
    }

    /// Waits until [`Kick::wake`] or [`Kick::kick`] has been called since
    /// `seen` was read, or `timeout` has passed (`None`: no timeout).
    pub fn wait(&self, seen: u32, timeout: Option<Duration>) {
        if self.pending() {
            return;
        }
        let ts = timeout.map(|d| libc::timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        });
        let tsp = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: FUTEX_WAIT on a live AtomicU32 owned by this struct, with a
        // timeout that is null or points at a timespec on this stack frame;
        // the kernel returns at once if the word no longer equals `seen`.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.word.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                seen,
                tsp,
            )
        };
    }

    /// The calling thread is about to block in the host kernel for the vCPU
    /// (KVM_RUN): a kick from now on signals it with [`KICK_SIGNAL`].
    pub fn enter_blocking(&self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.thread.store(tid as u64, Ordering::SeqCst);
    }

    /// The thread registered with [`Kick::enter_blocking`] is back.
    pub fn leave_blocking(&self) {
        self.thread.store(0, Ordering::SeqCst);
    }
}

/// An interrupt request line of the virtual platform (an ISA IRQ / GSI).
pub trait IrqLine: Send + Sync {
    /// Signals one edge on the line.
    fn trigger(&self) -> std::io::Result<()>;
}

/// A virtual machine of an engine: owns the vCPUs and the interrupt controller.
pub trait Vm {
    /// Creates vCPU `id` (visor runs one, id 0).
    fn create_vcpu(&mut self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// The interrupt line `gsi`, if the engine models an interrupt controller.
    fn irq_line(&self, gsi: u32) -> Result<Option<Arc<dyn IrqLine>>>;
    /// A line that delivers interrupt `vector` straight to vCPU 0 (an MSI), for
    /// paravirtual event channels; `None` if the engine cannot.
    fn vector_line(&self, vector: u8) -> Result<Option<Arc<dyn IrqLine>>>;
}

impl fmt::Display for Regs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rax={:016x} rbx={:016x} rcx={:016x} rdx={:016x}",
            self.rax, self.rbx, self.rcx, self.rdx
        )?;
        writeln!(
            f,
            "rsi={:016x} rdi={:016x} rsp={:016x} rbp={:016x}",
            self.rsi, self.rdi, self.rsp, self.rbp
        )?;
        writeln!(
            f,
            "r8 ={:016x} r9 ={:016x} r10={:016x} r11={:016x}",
            self.r8, self.r9, self.r10, self.r11
        )?;
        writeln!(
            f,
            "r12={:016x} r13={:016x} r14={:016x} r15={:016x}",
            self.r12, self.r13, self.r14, self.r15
        )?;
        write!(f, "rip={:016x} rflags={:016x}", self.rip, self.rflags)
    }
}

impl fmt::Display for SRegs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cr0={:016x} cr2={:016x} cr3={:016x} cr4={:016x} efer={:x}",
            self.cr0, self.cr2, self.cr3, self.cr4, self.efer
        )?;
        for (name, s) in [
            ("cs", &self.cs),
            ("ss", &self.ss),
            ("ds", &self.ds),
            ("tr", &self.tr),
        ] {
            writeln!(
                f,
                "{name}={:04x} base={:016x} limit={:08x} type={:x} dpl={} l={} db={}",
                s.selector, s.base, s.limit, s.type_, s.dpl, s.l as u8, s.db as u8
            )?;
        }
        write!(
            f,
            "gdt={:016x}/{:04x} idt={:016x}/{:04x}",
            self.gdt.base, self.gdt.limit, self.idt.base, self.idt.limit
        )
    }
}
