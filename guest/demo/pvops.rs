//! pv_ops: the one table through which the kernel does every low-level
//! operation. [`init`] picks the table at boot: visor's hypercalls when CPUID
//! leaf 0x4000_0000 carries `hypercall::SIGNATURE` and leaf 0x4000_0001 offers a
//! hypercall page, native instructions otherwise. The same binary runs both ways.
//!
//! Hypercall `n` is a call to the stub at `page + n * 32` with the arguments in
//! RDI, RSI, RDX, R10, R8 and the result in RAX (crates/hypercall).
//!
//! Operations the hypercall ABI does not cover (interrupt enable/disable, port
//! I/O) stay native in both tables. The timer event of the paravirtual table is
//! a fixed interrupt on the bound vector; under the `kvm` engine it arrives
//! through the local APIC, so the kernel software-enables the APIC at boot (see
//! [`apic_enable`]) and acknowledges each tick with an APIC EOI in both modes.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use hypercall::{nr, MmuUpdate, TrapInfo};

use crate::console::Line;
use crate::{cpu, desc, fatal, Global};

/// The kernel's low-level operations.
pub struct PvOps {
    /// "native" or "pv", for the final report.
    pub mode: &'static str,
    /// Loads a PML4 (physical address).
    pub write_cr3: fn(u64),
    /// Writes the page-table entry at physical `pte` with `val`, then drops the
    /// TLB entry of virtual `va` (no flush when `va` is [`NO_FLUSH`]).
    pub set_pte: fn(pte: u64, val: u64, va: u64),
    /// Installs the interrupt gates.
    pub load_idt: fn(&[desc::Gate]),
    /// The stack the CPU switches to on a trap from user mode (TSS.RSP0).
    pub set_kernel_stack: fn(u64),
    /// Disables interrupts. The kernel runs with them disabled; they are
    /// enabled only in user mode (IRETQ/SYSRETQ restore IF) and by `halt`.
    pub irq_disable: fn(),
    /// Enables interrupts and waits for one, atomically (STI; HLT: no wake-up
    /// is lost between the two); the handler runs, then it returns with
    /// interrupts disabled again.
    pub halt: fn(),
    pub console_write: fn(&[u8]),
    /// Starts a periodic timer interrupt: vector, period in nanoseconds.
    pub timer_start: fn(u8, u64),
    /// Acknowledges a timer interrupt (and re-arms a one-shot timer).
    pub timer_ack: fn(),
    pub inb: fn(u16) -> u8,
    pub outb: fn(u16, u8),
    pub outw: fn(u16, u16),
    /// Powers the machine off; `code` 0 is a clean shutdown.
    pub shutdown: fn(u64) -> !,
    /// The address of the last page fault (CR2).
    pub read_cr2: fn() -> u64,
    /// Writes the interrupt priority the kernel runs at, unchanged: CR8 (the
    /// TPR) = 0 natively, where IF alone masks interrupts; the event mask
    /// (masked) with hypercalls. Only the `cr8wr` benchmark uses it.
    pub set_priority: fn(),
    /// Starts benchmark phase `n`, or ends it (0): the platform's
    /// `BENCH_PHASE` port, or the `bench_phase` hypercall without port I/O.
    pub bench_phase: fn(u32),
}

/// `set_pte` without a TLB flush (the table is not live yet).
pub const NO_FLUSH: u64 = u64::MAX;

static NATIVE: PvOps = PvOps {
    mode: "native",
    write_cr3: native::write_cr3,
    set_pte: native::set_pte,
    load_idt: native::load_idt,
    set_kernel_stack: desc::set_rsp0,
    irq_disable: cpu::cli,
    halt: native::halt,
    console_write: native::console_write,
    timer_start: native::timer_start,
    timer_ack: apic_eoi,
    inb: cpu::inb,
    outb: cpu::outb,
    outw: cpu::outw,
    shutdown: native::shutdown,
    read_cr2: cpu::read_cr2,
    set_priority: native::set_priority,
    bench_phase: native::bench_phase,
};

static PARAVIRT: PvOps = PvOps {
    mode: "pv",
    write_cr3: pv::write_cr3,
    set_pte: pv::set_pte,
    load_idt: pv::load_idt,
    set_kernel_stack: pv::set_kernel_stack,
    irq_disable: cpu::cli,
    halt: pv::halt,
    console_write: pv::console_write,
    timer_start: pv::timer_start,
    timer_ack: pv::timer_ack,
    inb: cpu::inb,
    outb: cpu::outb,
    outw: cpu::outw,
    shutdown: pv::shutdown,
    read_cr2: cpu::read_cr2,
    set_priority: pv::mask_events,
    bench_phase: native::bench_phase,
};

/// The kernel runs deprivileged (engine `pv`): no privileged instruction at
/// all, so interrupt masking, halting, CR2 and the timer acknowledgement are
/// hypercalls too, and there is no local APIC.
static DEPRIVILEGED: PvOps = PvOps {
    mode: "pv-deprivileged",
    irq_disable: pv::mask_events,
    halt: pv::block_with_events,
    timer_ack: pv::timer_rearm,
    read_cr2: pv::get_cr2,
    bench_phase: pv::bench_phase,
    ..PARAVIRT
};

static PV_MODE: AtomicBool = AtomicBool::new(false);
static DEPRIV_MODE: AtomicBool = AtomicBool::new(false);

/// The table in use.
pub fn ops() -> &'static PvOps {
    if DEPRIV_MODE.load(Relaxed) {
        &DEPRIVILEGED
    } else if PV_MODE.load(Relaxed) {
        &PARAVIRT
    } else {
        &NATIVE
    }
}

/// Whether the kernel uses visor's hypercalls (deprivileged or not).
pub fn paravirtual() -> bool {
    PV_MODE.load(Relaxed)
}

/// Whether the kernel runs deprivileged (every privileged operation is a
/// hypercall).
pub fn deprivileged() -> bool {
    DEPRIV_MODE.load(Relaxed)
}

/// The return to an interrupted context of a deprivileged kernel: the
/// `iret` stub (0 when the kernel returns with IRETQ/SYSRETQ itself).
pub static IRET_STUB: AtomicU64 = AtomicU64::new(0);

/// `set_gdt`: the kernel's GDT and task register, for a deprivileged kernel.
pub fn set_gdt(table: u64, entries: u64, tss: u16) {
    pv::check("set_gdt", pv::call(nr::SET_GDT, [table, entries, tss as u64, 0, 0]));
}

/// `set_callbacks(SYSCALL)`: the system-call entry, for a deprivileged kernel.
pub fn set_syscall_callback(entry: u64, star: u64, fmask: u64) {
    pv::check(
        "set_callbacks",
        pv::call(
            nr::SET_CALLBACKS,
            [hypercall::callback::SYSCALL, entry, star, fmask, 0],
        ),
    );
}

pub fn write_cr3(pml4: u64) {
    (ops().write_cr3)(pml4)
}

pub fn set_pte(pte: u64, val: u64, va: u64) {
    (ops().set_pte)(pte, val, va)
}

pub fn console_write(b: &[u8]) {
    (ops().console_write)(b)
}

pub fn halt() {
    (ops().halt)()
}

pub fn timer_ack() {
    (ops().timer_ack)()
}

/// The null hypercall (`version`), in paravirtual mode.
pub fn version() -> i64 {
    pv::call(nr::VERSION, [0; 5])
}

/// Picks the table: hypercalls if visor advertises them, native otherwise.
pub fn init() {
    let sig = cpu::cpuid(hypercall::CPUID_SIGNATURE_LEAF);
    let mut name = [0u8; 12];
    for (i, w) in sig[1..].iter().enumerate() {
        name[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    let mut l = Line::new();
    l.s("demo: hypervisor signature \"").ascii(&name).s("\": ");
    if name == hypercall::SIGNATURE {
        let f = cpu::cpuid(hypercall::CPUID_FEATURES_LEAF);
        if f[0] & hypercall::FEATURE_HYPERCALL_PAGE != 0 {
            let page = HYPERCALL_PAGE.with(|p| p as *mut Page as u64);
            let depriv = f[0] & hypercall::FEATURE_DEPRIVILEGED != 0;
            if depriv {
                // No WRMSR in a deprivileged kernel: the page is registered
                // with a bare `int 0x82`.
                let r: i64;
                // SAFETY: the hypercall entry of a deprivileged kernel; it
                // clobbers only RAX.
                unsafe {
                    asm!("int 0x82", inlateout("rax") nr::SET_HYPERCALL_PAGE => r,
                         in("rdi") page | 1, options(nostack))
                };
                pv::check("set_hypercall_page", r);
            } else {
                // SAFETY: visor's hypercall-page MSR (its index is EBX of the
                // features leaf); the page is kernel memory set aside for the stubs.
                unsafe { cpu::wrmsr(f[1], page | 1) };
            }
            PAGE_ADDR.store(page, Relaxed);
            PV_MODE.store(true, Relaxed);
            if depriv {
                DEPRIV_MODE.store(true, Relaxed);
                IRET_STUB.store(page + nr::IRET * hypercall::STUB_SIZE as u64, Relaxed);
            }
            let v = version();
            l.s(if depriv {
                "pv_ops use hypercalls, deprivileged (ABI "
            } else {
                "pv_ops use hypercalls (ABI "
            })
                .n((v >> 16) as u64)
                .s(".")
                .n((v & 0xffff) as u64)
                .s(", page at ")
                .x(page)
                .s(")")
                .end();
            return;
        }
    }
    l.s("pv_ops use native instructions").end();
}

/// Local APIC (xAPIC MMIO at its reset base, identity-mapped by the kernel).
const APIC_BASE: u64 = 0xfee0_0000;
const APIC_EOI: u64 = 0xb0;
const APIC_SVR: u64 = 0xf0;
const APIC_LVT_TIMER: u64 = 0x320;
const APIC_TIMER_INIT: u64 = 0x380;
const APIC_TIMER_DIV: u64 = 0x3e0;
pub const SPURIOUS_VECTOR: u8 = 0xff;

fn apic_write(reg: u64, v: u32) {
    // SAFETY: an xAPIC register, mapped uncached by the kernel page tables.
    unsafe { ((APIC_BASE + reg) as *mut u32).write_volatile(v) }
}

/// Masks the legacy 8259 PICs and software-enables the local APIC (spurious
/// vector 0xff): KVM's APIC drops fixed interrupts, the paravirtual timer event
/// included, while it is software-disabled.
pub fn apic_enable() {
    if deprivileged() {
        // No APIC and no PIC: events come through the trap table.
        return;
    }
    let o = ops();
    (o.outb)(0x21, 0xff);
    (o.outb)(0xa1, 0xff);
    apic_write(APIC_SVR, 0x100 | SPURIOUS_VECTOR as u32);
}

fn apic_eoi() {
    apic_write(APIC_EOI, 0);
}

mod native {
    use super::*;

    pub fn write_cr3(pml4: u64) {
        // SAFETY: every page table the kernel loads maps the kernel (mm.rs).
        unsafe { cpu::write_cr3(pml4) }
    }

    pub fn set_pte(pte: u64, val: u64, va: u64) {
        // SAFETY: `pte` is an entry of a page table the kernel owns,
        // identity-mapped (mm.rs).
        unsafe { (pte as *mut u64).write_volatile(val) };
        if va != NO_FLUSH {
            cpu::invlpg(va);
        }
    }

    #[repr(C, align(4096))]
    struct Idt([u64; 512]);

    static IDT: Global<Idt> = Global::new(Idt([0; 512]));

    pub fn load_idt(gates: &[desc::Gate]) {
        let base = IDT.with(|idt| {
            for g in gates {
                let (lo, hi) = g.descriptor();
                let i = g.vector as usize * 2;
                idt.0[i] = lo;
                idt.0[i + 1] = hi;
            }
            idt.0.as_ptr() as u64
        });
        // SAFETY: a static table of 256 gates.
        unsafe { cpu::lidt(base, 0xfff) }
    }

    pub fn halt() {
        // SAFETY: `halt` is called from the idle loop, which holds no kernel
        // state while it waits.
        unsafe { cpu::enable_and_halt() }
    }

    /// COM1, polled.
    pub fn console_write(bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                put(b'\r');
            }
            put(b);
        }
    }

    fn put(b: u8) {
        let o = ops();
        // Wait for the transmitter holding register to empty (LSR bit 5).
        while (o.inb)(abi::port::COM1 + 5) & 0x20 == 0 {}
        (o.outb)(abi::port::COM1, b);
    }

    /// The APIC timer, periodic. KVM's APIC timer counts at 1 GHz, so with
    /// divide-by-1 the initial count is the period in nanoseconds.
    pub fn timer_start(vector: u8, period_ns: u64) {
        apic_write(APIC_TIMER_DIV, 0xb);
        apic_write(APIC_LVT_TIMER, 1 << 17 | vector as u32);
        apic_write(APIC_TIMER_INIT, period_ns.min(u32::MAX as u64) as u32);
    }

    pub fn set_priority() {
        cpu::write_cr8(0);
    }

    pub fn bench_phase(n: u32) {
        cpu::outl(abi::port::BENCH_PHASE, n);
    }

    pub fn shutdown(code: u64) -> ! {
        if code == 0 {
            (ops().outw)(abi::port::POWER, abi::port::POWER_OFF);
        }
        crate::fail(code as u8)
    }
}

/// The guest-physical page visor fills with hypercall stubs.
#[repr(C, align(4096))]
struct Page([u8; 4096]);

static HYPERCALL_PAGE: Global<Page> = Global::new(Page([0; 4096]));
static PAGE_ADDR: AtomicU64 = AtomicU64::new(0);
/// The period of the paravirtual timer, re-armed on every tick (one-shot).
static PV_TIMER_NS: AtomicU64 = AtomicU64::new(0);

mod pv {
    use super::*;

    /// Hypercall `n` with `a` in RDI, RSI, RDX, R10, R8.
    pub fn call(n: u64, a: [u64; 5]) -> i64 {
        let stub = PAGE_ADDR.load(Relaxed) + n * hypercall::STUB_SIZE as u64;
        let ret: i64;
        // SAFETY: visor wrote the stubs when the MSR was set; a stub clobbers
        // only RAX and the flags and returns. Arguments pointing to memory are
        // identity-mapped kernel addresses, valid for the call.
        unsafe {
            asm!("call {stub}", stub = in(reg) stub,
                 in("rdi") a[0], in("rsi") a[1], in("rdx") a[2], in("r10") a[3], in("r8") a[4],
                 lateout("rax") ret);
        }
        ret
    }

    pub fn check(what: &str, r: i64) {
        if r < 0 {
            Line::new()
                .s("demo: panic: hypercall ")
                .s(what)
                .s(" failed with ")
                .i(r)
                .end();
            crate::fail(1);
        }
    }

    pub fn write_cr3(pml4: u64) {
        check("new_baseptr", call(nr::NEW_BASEPTR, [pml4, 0, 0, 0, 0]));
    }

    /// One `mmu_update` request; visor flushes the TLB entries it affects.
    pub fn set_pte(pte: u64, val: u64, _va: u64) {
        let req = MmuUpdate { ptr: pte, val };
        let done = call(
            nr::MMU_UPDATE,
            [&req as *const MmuUpdate as u64, 1, 0, 0, 0],
        );
        if done != 1 {
            check("mmu_update", -1);
        }
    }

    const MAX_GATES: usize = 40;
    static TRAPS: Global<[TrapInfo; MAX_GATES]> = Global::new(
        [TrapInfo {
            vector: 0,
            flags: 0,
            cs: 0,
            _pad: 0,
            address: 0,
        }; MAX_GATES],
    );

    /// `set_trap_table`: flags bits 0-1 are the gate's DPL, bit 2 makes it an
    /// interrupt gate (the kernel always runs with interrupts off).
    pub fn load_idt(gates: &[desc::Gate]) {
        if gates.len() > MAX_GATES {
            fatal("too many interrupt gates");
        }
        let ptr = TRAPS.with(|t| {
            for (slot, g) in t.iter_mut().zip(gates) {
                *slot = TrapInfo {
                    vector: g.vector,
                    flags: g.dpl | 4,
                    cs: desc::KERNEL_CS,
                    _pad: 0,
                    address: g.handler,
                };
            }
            t.as_ptr() as u64
        });
        check(
            "set_trap_table",
            call(nr::SET_TRAP_TABLE, [ptr, gates.len() as u64, 0, 0, 0]),
        );
    }

    pub fn set_kernel_stack(rsp: u64) {
        check(
            "stack_switch",
            call(nr::STACK_SWITCH, [desc::KERNEL_DS as u64, rsp, 0, 0, 0]),
        );
    }

    /// `sched_op(BLOCK)` with interrupts enabled: the pending event is
    /// delivered, then the kernel continues with interrupts off.
    pub fn halt() {
        let stub = PAGE_ADDR.load(Relaxed) + nr::SCHED_OP * hypercall::STUB_SIZE as u64;
        // SAFETY: as in `call`; the idle loop holds no kernel state while
        // interrupts are enabled here.
        unsafe {
            asm!("sti", "call {stub}", "cli", stub = in(reg) stub,
                 in("rdi") hypercall::sched::BLOCK, in("rsi") 0u64, lateout("rax") _);
        }
    }

    pub fn console_write(bytes: &[u8]) {
        call(
            nr::CONSOLE_IO,
            [
                hypercall::console::WRITE,
                bytes.as_ptr() as u64,
                bytes.len() as u64,
                0,
                0,
            ],
        );
    }

    /// Binds the timer VIRQ to `vector` and arms the one-shot timer.
    pub fn timer_start(vector: u8, period_ns: u64) {
        use hypercall::event::{BIND_VIRQ, VIRQ_TIMER};
        PV_TIMER_NS.store(period_ns, Relaxed);
        check(
            "event_channel_op",
            call(
                nr::EVENT_CHANNEL_OP,
                [BIND_VIRQ, VIRQ_TIMER, vector as u64, 0, 0],
            ),
        );
        check(
            "set_timer_op",
            call(nr::SET_TIMER_OP, [period_ns, 0, 0, 0, 0]),
        );
    }

    pub fn timer_ack() {
        apic_eoi();
        call(nr::SET_TIMER_OP, [PV_TIMER_NS.load(Relaxed), 0, 0, 0, 0]);
    }

    /// `set_event_mask(1)`: the deprivileged kernel's CLI.
    pub fn mask_events() {
        call(nr::SET_EVENT_MASK, [1, 0, 0, 0, 0]);
    }

    /// Unmasks events and blocks until one is due; the event is delivered
    /// (to its trap-table handler) before events are masked again.
    pub fn block_with_events() {
        call(nr::SET_EVENT_MASK, [0, 0, 0, 0, 0]);
        call(nr::SCHED_OP, [hypercall::sched::BLOCK, 0, 0, 0, 0]);
        call(nr::SET_EVENT_MASK, [1, 0, 0, 0, 0]);
    }

    /// Re-arms the one-shot timer (events need no acknowledgement).
    pub fn timer_rearm() {
        call(nr::SET_TIMER_OP, [PV_TIMER_NS.load(Relaxed), 0, 0, 0, 0]);
    }

    pub fn bench_phase(n: u32) {
        call(nr::BENCH_PHASE, [n as u64, 0, 0, 0, 0]);
    }

    pub fn get_cr2() -> u64 {
        call(nr::GET_CR2, [0; 5]) as u64
    }

    pub fn shutdown(code: u64) -> ! {
        call(nr::SCHED_OP, [hypercall::sched::SHUTDOWN, code, 0, 0, 0]);
        native::shutdown(code)
    }
}
