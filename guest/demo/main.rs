//! visor's demo OS: a small `no_std` kernel booted through visor's 64-bit boot
//! protocol (docs/boot-protocol.md).
//!
//! - its own GDT (with a 64-bit TSS: RSP0 and an IST stack) and IDT;
//! - per-process 4-level page tables: the kernel identity map is
//!   supervisor-only, user code and read-only data (`.utext`, `.urodata`, linked
//!   at 0x4000_0000) are shared read-only, stacks and heaps are private;
//! - the local APIC timer at 100 Hz drives a preemptive round-robin scheduler
//!   over user processes at CPL 3;
//! - system calls through `int 0x80` and `syscall`: write, getpid, yield, sleep,
//!   exit, sbrk (heap pages are demand-paged by the page-fault handler), send and
//!   recv (a small blocking mailbox per process), ticks;
//! - every low-level operation goes through one table, [`pvops::PvOps`]: native
//!   instructions, or visor's hypercalls when CPUID advertises them;
//! - with `bench` on the command line, the nanobenchmarks instead of the
//!   processes (bench.rs).
//!
//! The user programs (user.rs) run natively even where ring 0 is emulated, so
//! the kernel keeps its own work small. Nothing here uses SSE or `core::fmt`.
//!
//! On PVM hosts (KVM emulating guest ring 0) user-mode `syscall` and `int 0x80`
//! arrive half done, as a page fault at the `syscall` entry point and as #UD on
//! the `int 0x80` bytes; the kernel completes those gates itself (see
//! `Kernel::complete_gate` in proc.rs). Elsewhere the CPU runs them.
#![no_std]
#![no_main]

mod bench;
mod console;
mod cpu;
mod desc;
mod mm;
mod proc;
mod pvops;
#[path = "../rt.rs"]
mod rt;
mod trap;
mod user;

use core::arch::{asm, global_asm};
use core::cell::{Cell, UnsafeCell};

use abi::{BootInfo, MemoryRegion, BOOT_INFO_MAGIC, MEM_RAM};
use console::Line;

global_asm!(
    ".section .text.entry, \"ax\"",
    ".global _start",
    "_start:",
    "    and rsp, -16",
    "    call {main}",
    "2:  hlt",
    "    jmp 2b",
    main = sym kmain,
);

/// Kernel state behind a cell. The kernel runs on one CPU with interrupts
/// disabled, except in the idle loop, which holds no reference; `busy` turns
/// any nested use into a kernel panic instead of two live `&mut`.
pub struct Global<T> {
    busy: Cell<bool>,
    value: UnsafeCell<T>,
}

// SAFETY: one CPU, and `with` hands out at most one reference at a time.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    pub const fn new(value: T) -> Self {
        Global {
            busy: Cell::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Runs `f` with the only reference to the value.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        if self.busy.replace(true) {
            fatal("nested use of kernel state");
        }
        // SAFETY: `busy` was clear, so no other reference exists until it is
        // cleared again below.
        let r = f(unsafe { &mut *self.value.get() });
        self.busy.set(false);
        r
    }
}

/// Prints `demo: panic: <what>` and ends the run with a non-zero status.
pub fn fatal(what: &str) -> ! {
    Line::new().s("demo: panic: ").s(what).end();
    fail(1)
}

/// Ends the run through the isa-debug-exit port: visor exits with (code << 1) | 1.
pub fn fail(code: u8) -> ! {
    (pvops::ops().outb)(abi::port::DEBUG_EXIT, code);
    loop {
        // SAFETY: nothing is left to do; halting with interrupts off.
        unsafe { asm!("cli; hlt") }
    }
}

/// How many trial-division passes process A makes (`passes=N` on the command
/// line; 0: its default). Fewer make a short run for slow engines.
pub static PASSES: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// The decimal value after `key` in a space-separated command line.
pub fn parameter(cmdline: &[u8], key: &[u8]) -> Option<u64> {
    let word = cmdline
        .split(|&b| b == b' ')
        .find_map(|w| w.strip_prefix(key))?;
    let mut n: u64 = 0;
    for &d in word {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add((d - b'0') as u64)?;
    }
    (!word.is_empty()).then_some(n)
}

extern "C" fn kmain(info: &'static BootInfo) -> ! {
    if info.magic != BOOT_INFO_MAGIC {
        fatal("bad boot info magic");
    }
    // First of all: a deprivileged kernel may not even touch the serial port.
    pvops::init();
    Line::new()
        .s("visor demo guest: hello from 64-bit long mode")
        .end();
    // SAFETY: the boot protocol guarantees cmdline_len bytes at cmdline_addr.
    let cmdline = unsafe {
        core::slice::from_raw_parts(info.cmdline_addr as *const u8, info.cmdline_len as usize)
    };
    Line::new()
        .s("demo: cmdline \"")
        .ascii(cmdline)
        .s("\"")
        .end();
    if let Some(n) = parameter(cmdline, b"passes=") {
        PASSES.store(n, core::sync::atomic::Ordering::Relaxed);
    }
    bench::configure(cmdline);
    // SAFETY: the boot protocol guarantees mmap_count entries at mmap_addr.
    let mmap = unsafe {
        core::slice::from_raw_parts(
            info.mmap_addr as *const MemoryRegion,
            info.mmap_count as usize,
        )
    };
    let ram: u64 = mmap
        .iter()
        .filter(|r| r.kind == MEM_RAM)
        .map(|r| r.len)
        .sum();
    Line::new()
        .s("demo: ")
        .n(ram >> 20)
        .s(" MiB RAM in ")
        .n(mmap.len() as u64)
        .s(" memory regions")
        .end();
    (pvops::ops().irq_disable)();
    desc::init();
    mm::init(mmap);
    trap::init_syscall();
    proc::start()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut l = Line::new();
    l.s("demo: panic: ")
        .s(info.message().as_str().unwrap_or("kernel panic"));
    if let Some(loc) = info.location() {
        l.s(" at ").s(loc.file()).s(":").n(loc.line() as u64);
    }
    l.end();
    fail(1)
}
