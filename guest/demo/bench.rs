//! The nanobenchmarks (`--cmdline bench`; docs/costs.md): operations whose
//! cost depends on how the CPU is virtualized, each timed with RDTSC over
//! many iterations after a warm-up. One line per benchmark:
//!
//! `bench: name=<name> mode=native|pv iterations=<n> cycles_per_op=<x> ns_per_op=<y>`
//!
//! or, where the operation cannot be measured here,
//! `bench: name=<name> mode=<mode> unavailable=<why>`.
//!
//! Each timed loop runs inside a phase announced to visor
//! (`pv_ops.bench_phase`), which records the engine's counters at both ends,
//! so that `visor compare` can say what one operation cost in mechanism.
//!
//! The kernel-mode benchmarks (`in`, `cr8wr`, `call/ret`, `ptemod`,
//! `hypercall`, `cpuid`) run here at boot, in the bench process's address
//! space; the user-mode ones (`syscall` through `int 0x80`,
//! `syscall/sysret`, `pgfault`, `divzero`) run in the bench process
//! ([`crate::user::bench`]), which reports through two system calls.
//!
//! Command line: `bench` runs them; `iterations=N` fixes the count (else each
//! loop is sized to take about `bench_ms=M` milliseconds, 20 by default).
//! The TSC's frequency comes from visor's CPUID leaf 0x4000_0010.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use abi::bench as id;

use crate::console::Line;
use crate::mm::{self, OWNED, PAGE};
use arch::pte::{NX, RW, US};
use crate::{cpu, pvops};

static ENABLED: AtomicBool = AtomicBool::new(false);
/// `iterations=N`, or 0: sized to TARGET.
static FIXED: AtomicU64 = AtomicU64::new(0);
/// TSC ticks a timed loop should take.
static TARGET: AtomicU64 = AtomicU64::new(0);
/// The TSC's frequency in kHz, 0 if visor did not say.
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);
/// System calls the kernel completed itself (see `Kernel::complete_gate`)
/// and `pgfault` faults it resolved: when the user phase under way started,
/// and during the last one.
static AT_START: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static IN_PHASE: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// `pgfault` faults resolved so far.
static FAULTS: AtomicU64 = AtomicU64::new(0);
/// `ptemod`'s page-table entry: its address, value and page.
static PTE: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// Iterations each benchmark runs before it is timed.
pub const WARMUP: u64 = 16;
/// The most iterations a sized loop gets.
pub const MAX_ITERATIONS: u64 = 1 << 22;
const DEFAULT_MS: u64 = 20;
/// `pgfault`'s two user pages: touching one maps it and unmaps the other.
pub const FAULT_PAGES: u64 = 0x7000_0000;
/// `ptemod`'s user page.
const PTE_PAGE: u64 = 0x7000_4000;
/// `div rcx`, `divzero`'s instruction: the kernel steps over it.
pub const DIV_RCX: [u8; 3] = [0x48, 0xf7, 0xf1];

/// Reads the command line: whether to benchmark, and how long.
pub fn configure(cmdline: &[u8]) {
    if !cmdline.split(|&b| b == b' ').any(|w| w == b"bench") {
        return;
    }
    ENABLED.store(true, Relaxed);
    FIXED.store(
        crate::parameter(cmdline, b"iterations=").unwrap_or(0),
        Relaxed,
    );
    let max = cpu::cpuid(hypercall::CPUID_SIGNATURE_LEAF)[0];
    let khz = if max >= hypercall::CPUID_TIMING_LEAF {
        cpu::cpuid(hypercall::CPUID_TIMING_LEAF)[0] as u64
    } else {
        0
    };
    TSC_KHZ.store(khz, Relaxed);
    let ms = crate::parameter(cmdline, b"bench_ms=").unwrap_or(DEFAULT_MS);
    // Without a frequency, a 1 GHz TSC is as good a guess as any.
    let per_ms = if khz == 0 { 1_000_000 } else { khz };
    TARGET.store(ms.max(1).saturating_mul(per_ms), Relaxed);
    let mut l = Line::new();
    l.s("bench: tsc_khz=");
    if khz == 0 {
        l.s("unknown");
    } else {
        l.n(khz);
    }
    l.s(" iterations=");
    match FIXED.load(Relaxed) {
        0 => l.s("sized to ").n(ms).s(" ms"),
        n => l.n(n),
    };
    l.end();
}

pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// The bench process's arguments: the fixed iteration count (0: sized) and
/// the TSC ticks a sized loop should take.
pub fn params() -> (u64, u64) {
    (FIXED.load(Relaxed), TARGET.load(Relaxed))
}

/// How many iterations to time `run` (which runs `n` and returns the TSC
/// ticks they took) for, after a warm-up: `fixed` if not 0, else the count
/// that takes about `target` ticks, found by doubling. Inlined, so that user
/// code can use it (user.rs).
#[inline(always)]
pub fn iterations(fixed: u64, target: u64, run: fn(u64) -> u64) -> u64 {
    run(WARMUP);
    if fixed != 0 {
        return fixed;
    }
    let mut n = WARMUP;
    loop {
        let t = run(n);
        if t >= target / 8 || n >= MAX_ITERATIONS {
            // No closures: user code must not call into the kernel image.
            let scaled = match n.checked_mul(target) {
                Some(x) => match x.checked_div(t) {
                    Some(s) => s,
                    None => MAX_ITERATIONS,
                },
                None => MAX_ITERATIONS,
            };
            return if scaled > MAX_ITERATIONS {
                MAX_ITERATIONS
            } else if scaled < 1 {
                1
            } else {
                scaled
            };
        }
        n *= 2;
    }
}

fn mode() -> &'static str {
    if pvops::paravirtual() {
        "pv"
    } else {
        "native"
    }
}

fn line(phase: u32) -> Line {
    let mut l = Line::new();
    l.s("bench: name=")
        .s(id::name(phase).unwrap_or("?"))
        .s(" mode=")
        .s(mode());
    l
}

fn unavailable(phase: u32, why: &str) -> Line {
    let mut l = line(phase);
    l.s(" unavailable=").s(why);
    l
}

fn report(phase: u32, n: u64, ticks: u64) {
    // Hundredths of a tick, and of a nanosecond, per operation.
    let c100 = ticks.saturating_mul(100).checked_div(n).unwrap_or(0);
    let khz = TSC_KHZ.load(Relaxed);
    let ns100 = match c100.checked_mul(1_000_000) {
        Some(x) => x.checked_div(khz),
        None => c100.checked_div(khz).map(|x| x.saturating_mul(1_000_000)),
    };
    let mut l = line(phase);
    l.s(" iterations=")
        .n(n)
        .s(" cycles_per_op=")
        .f2(c100)
        .s(" ns_per_op=");
    match ns100 {
        Some(v) => l.f2(v),
        None => l.s("unknown"),
    };
    l.end();
}

/// Times one kernel-mode benchmark inside its phase, after its baseline
/// (`abi::bench::BASELINE`), and reports it.
fn measure(phase: u32, run: fn(u64) -> u64) {
    let (fixed, target) = params();
    let n = iterations(fixed, target, run);
    let ops = pvops::ops();
    let mut t = 0;
    for (p, count) in [(phase | id::BASELINE, 0), (phase, n)] {
        (ops.bench_phase)(p);
        t = run(count);
        (ops.bench_phase)(0);
    }
    report(phase, n, t);
}

/// `timed!(n, |i| body)`: runs `body` `n` times (`i` counting), returning the
/// TSC ticks they took. A macro, so that user code can use it.
macro_rules! timed {
    ($n:expr, |$i:ident| $body:expr) => {{
        let n: u64 = $n;
        let t0 = $crate::cpu::rdtsc();
        let mut $i: u64 = 0;
        while $i < n {
            $body;
            $i += 1;
        }
        $crate::cpu::rdtsc().wrapping_sub(t0)
    }};
}
pub(crate) use timed;

/// A port read from a device: COM1's line status register.
fn port_in(n: u64) -> u64 {
    let inb = pvops::ops().inb;
    timed!(n, |_i| inb(abi::port::COM1 + 5))
}

fn cr8_write(n: u64) -> u64 {
    let set = pvops::ops().set_priority;
    timed!(n, |_i| set())
}

fn call_ret(n: u64) -> u64 {
    // SAFETY: a call to a `ret` right after it; the stack has room for the
    // return address (the kernel has no red zone to clobber).
    timed!(n, |_i| unsafe { core::arch::asm!("call 2f", "jmp 3f", "2: ret", "3:") })
}

/// Changes `ptemod`'s entry (its RW bit, back and forth) and drops the
/// page's TLB entry: `set_pte`, a store and INVLPG or one `mmu_update`.
/// The caller restores the entry.
fn pte_modify(n: u64) -> u64 {
    let [pte, val, va] = [0, 1, 2].map(|i| PTE[i].load(Relaxed));
    let set = pvops::ops().set_pte;
    timed!(n, |i| set(pte, val ^ ((i & 1) ^ 1) * RW, va))
}

fn null_hypercall(n: u64) -> u64 {
    timed!(n, |_i| pvops::version())
}

fn cpuid(n: u64) -> u64 {
    timed!(n, |_i| cpu::cpuid(0))
}

/// The kernel-mode benchmarks, in the bench process's address space `pml4`
/// (loaded).
pub fn kernel(pml4: u64) {
    if pvops::deprivileged() {
        unavailable(id::IN, "a deprivileged PV kernel has no port I/O").end();
    } else {
        measure(id::IN, port_in);
    }
    measure(id::CR8WR, cr8_write);
    measure(id::CALL_RET, call_ret);
    let pte = match mm::alloc() {
        Some(frame) if mm::map(pml4, PTE_PAGE, frame, US | RW | NX | OWNED) => {
            mm::pte(pml4, PTE_PAGE)
        }
        _ => None,
    };
    match pte {
        Some((addr, val)) => {
            for (slot, v) in PTE.iter().zip([addr, val, PTE_PAGE]) {
                slot.store(v, Relaxed);
            }
            measure(id::PTEMOD, pte_modify);
            pvops::set_pte(addr, val, PTE_PAGE);
        }
        None => unavailable(id::PTEMOD, "out of memory").end(),
    }
    if pvops::paravirtual() {
        measure(id::HYPERCALL, null_hypercall);
    } else {
        unavailable(id::HYPERCALL, "paravirtual mode only").end();
    }
    measure(id::CPUID, cpuid);
}

/// `bench_phase(n)` from the bench process; `fixups` is the count of system
/// calls the kernel completed itself so far.
pub fn user_phase(phase: u32, fixups: u64) {
    let now = [fixups, FAULTS.load(Relaxed)];
    for i in 0..2 {
        if phase != 0 {
            AT_START[i].store(now[i], Relaxed);
        } else {
            IN_PHASE[i].store(now[i].wrapping_sub(AT_START[i].load(Relaxed)), Relaxed);
        }
    }
    (pvops::ops().bench_phase)(phase);
}

/// `bench_report(phase, n, ticks)` from the bench process. What did not
/// measure the operation is reported unavailable: a system-call benchmark
/// whose gates the kernel had to complete itself (a CPU that does not carry
/// them out from user mode, as KVM on PVM hosts) measured that repair; a
/// `pgfault` whose touches did not all fault (a stale TLB entry outlived
/// `set_pte`) measured plain stores.
pub fn user_report(phase: u32, n: u64, ticks: u64) {
    let [fixups, faults] = [0, 1].map(|i| IN_PHASE[i].load(Relaxed));
    if id::name(phase).is_none() || n == 0 {
        return;
    }
    if phase == id::PGFAULT && faults < n {
        let mut l = unavailable(phase, "");
        if faults == 0 {
            l.s("no touch faulted");
        } else {
            l.s("only ").n(faults).s(" of ").n(n).s(" touches faulted");
        }
        l.s(": the TLB kept translations that set_pte removed").end();
        return;
    }
    if fixups > 1 {
        let gate = if phase == id::SYSCALL {
            "int 0x80"
        } else {
            "syscall"
        };
        let mut l = unavailable(phase, "the CPU did not carry out ");
        l.s(gate).s(" from user mode: the kernel completed ");
        // One more completed call ended the phase.
        if fixups - 1 >= n {
            l.s("each call");
        } else {
            l.n(fixups - 1).s(" of ").n(n).s(" calls");
        }
        l.s(" itself").end();
        return;
    }
    report(phase, n, ticks);
}

/// `pgfault`: a fault on one of its two pages maps that page (moving the
/// other's frame to it, or a new frame the first time). False if `addr` is
/// not one of them.
pub fn resolve_fault(pml4: u64, addr: u64) -> bool {
    if !enabled() || !(FAULT_PAGES..FAULT_PAGES + 2 * PAGE).contains(&addr) {
        return false;
    }
    let page = addr & !(PAGE - 1);
    let resolved = mm::move_page(pml4, page ^ PAGE, page)
        || match mm::alloc() {
            Some(frame) => {
                let mapped = mm::map(pml4, page, frame, US | RW | NX | OWNED);
                if !mapped {
                    mm::free(frame);
                }
                mapped
            }
            None => false,
        };
    if resolved {
        FAULTS.fetch_add(1, Relaxed);
    }
    resolved
}
