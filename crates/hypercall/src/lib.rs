//! visor's paravirtual hypercall ABI (`no_std`), shared by the VMM and its guests.
//! docs/hypercalls.md is the prose version.
//!
//! Discovery: CPUID leaf [`CPUID_SIGNATURE_LEAF`] returns [`SIGNATURE`] in
//! EBX, ECX, EDX; leaf [`CPUID_FEATURES_LEAF`] returns the feature bits in EAX,
//! the hypercall-page MSR index in EBX and [`VERSION`] in ECX.
//!
//! Entry: the guest writes `page_gpa | 1` to [`MSR_HYPERCALL_PAGE`]; visor fills
//! that 4 KiB page with one [`STUB_SIZE`]-byte stub per hypercall, stub `n` at
//! offset `n * STUB_SIZE`. A guest calls hypercall `n` by calling its stub with
//! the arguments in RDI, RSI, RDX, R10, R8; the result comes back in RAX (a
//! negative errno on failure). The stub loads RAX with `n` and executes the
//! engine's trapping instruction (port I/O to [`HYPERCALL_PORT`] under `kvm`,
//! `int 0x82` or `vmcall` under the software engines), then returns. Stubs
//! clobber nothing but RAX.
//!
//! Timing: CPUID leaf [`CPUID_TIMING_LEAF`] gives the TSC's frequency on every
//! engine, with or without the paravirtual interface.
#![no_std]

pub const CPUID_SIGNATURE_LEAF: u32 = 0x4000_0000;
pub const CPUID_FEATURES_LEAF: u32 = 0x4000_0001;
/// visor's timing leaf, at the place and in the layout VMware and QEMU use
/// for theirs: EAX the frequency of the TSC in kHz (RDTSC ticks per
/// millisecond), EBX the frequency of the local APIC timer's input clock in
/// kHz (0 without a local APIC), ECX and EDX 0. It describes the virtual
/// hardware, not the paravirtual interface, so `--no-pv` leaves it in place;
/// EAX of leaf 0x4000_0000 (the highest hypervisor leaf) reaches it.
pub const CPUID_TIMING_LEAF: u32 = 0x4000_0010;
/// EBX, ECX, EDX of leaf 0x4000_0000.
pub const SIGNATURE: [u8; 12] = *b"VisorVisorPV";
/// ABI version in ECX of leaf 0x4000_0001: major << 16 | minor.
pub const VERSION: u32 = 1 << 16;
/// EAX of leaf 0x4000_0001: a hypercall page is available.
pub const FEATURE_HYPERCALL_PAGE: u32 = 1 << 0;
/// EAX of leaf 0x4000_0001: the kernel runs deprivileged (engine `pv`): every
/// privileged operation must be a hypercall ([`nr::SET_GDT`],
/// [`nr::SET_CALLBACKS`], [`nr::IRET`], [`nr::SET_EVENT_MASK`],
/// [`nr::GET_CR2`]); a privileged instruction ends the guest. Events arrive on
/// the vectors of the trap table, with no local APIC to acknowledge.
pub const FEATURE_DEPRIVILEGED: u32 = 1 << 1;
pub const MSR_HYPERCALL_PAGE: u32 = 0x4000_0200;
/// Port whose 32-bit write is a hypercall under `kvm` (EAX = number).
pub const HYPERCALL_PORT: u8 = 0xf6;
pub const STUB_SIZE: usize = 32;

/// Hypercall numbers.
pub mod nr {
    pub const SET_TRAP_TABLE: u64 = 0;
    pub const MMU_UPDATE: u64 = 1;
    pub const NEW_BASEPTR: u64 = 2;
    pub const STACK_SWITCH: u64 = 3;
    pub const CONSOLE_IO: u64 = 4;
    pub const SCHED_OP: u64 = 5;
    pub const SET_TIMER_OP: u64 = 6;
    pub const EVENT_CHANNEL_OP: u64 = 7;
    pub const MULTICALL: u64 = 8;
    pub const VERSION: u64 = 9;
    /// `set_gdt(table, entries, tss_selector)`: loads the guest's GDT
    /// (code, data and one 64-bit TSS descriptor) and its task register.
    pub const SET_GDT: u64 = 10;
    /// `set_callbacks(kind, entry, star, fmask)`: where SYSCALL from user mode
    /// enters the kernel ([`super::callback::SYSCALL`]), with STAR's selectors
    /// and the RFLAGS bits it clears.
    pub const SET_CALLBACKS: u64 = 11;
    /// `iret()`: returns from the kernel's event or system-call frame. The
    /// stack holds the stub's return address, then RAX, RIP, CS, RFLAGS, RSP,
    /// SS; all are restored, RAX included. Does not return.
    pub const IRET: u64 = 12;
    /// `set_event_mask(masked)`: masks (1) or unmasks (0) event delivery, the
    /// kernel's interrupt flag; returns the previous mask.
    pub const SET_EVENT_MASK: u64 = 13;
    /// `get_cr2()`: the faulting address of the last page fault.
    pub const GET_CR2: u64 = 14;
    /// `set_hypercall_page(gpa | 1)`: what the hypercall-page MSR does, for a
    /// deprivileged kernel, which may not execute WRMSR. It is made with a
    /// bare `int 0x82` (there is no page yet).
    pub const SET_HYPERCALL_PAGE: u64 = 15;
    /// `bench_phase(n)`: starts benchmark phase `n` (ends the phase with 0),
    /// as a 32-bit write of `n` to the platform's `BENCH_PHASE` port does, for
    /// kernels that may not do port I/O. The VMM loop records the engine's
    /// counters (docs/costs.md); returns 0. Not inside a multicall.
    pub const BENCH_PHASE: u64 = 16;
    pub const COUNT: u64 = 17;
}

/// Kinds of `set_callbacks`.
pub mod callback {
    pub const SYSCALL: u64 = 0;
}

/// Name of hypercall `n`, for statistics.
pub fn name(n: u64) -> &'static str {
    match n {
        nr::SET_TRAP_TABLE => "set_trap_table",
        nr::MMU_UPDATE => "mmu_update",
        nr::NEW_BASEPTR => "new_baseptr",
        nr::STACK_SWITCH => "stack_switch",
        nr::CONSOLE_IO => "console_io",
        nr::SCHED_OP => "sched_op",
        nr::SET_TIMER_OP => "set_timer_op",
        nr::EVENT_CHANNEL_OP => "event_channel_op",
        nr::MULTICALL => "multicall",
        nr::VERSION => "version",
        nr::SET_GDT => "set_gdt",
        nr::SET_CALLBACKS => "set_callbacks",
        nr::IRET => "iret",
        nr::SET_EVENT_MASK => "set_event_mask",
        nr::GET_CR2 => "get_cr2",
        nr::SET_HYPERCALL_PAGE => "set_hypercall_page",
        nr::BENCH_PHASE => "bench_phase",
        _ => "invalid",
    }
}

/// Errors, returned negated in RAX.
pub mod errno {
    pub const EPERM: i64 = 1;
    pub const EFAULT: i64 = 14;
    pub const EINVAL: i64 = 22;
    pub const ENOSYS: i64 = 38;
}

/// `set_trap_table(entries: *const TrapInfo, count)`: the virtual IDT. An entry
/// with `address == 0` removes the vector.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TrapInfo {
    pub vector: u8,
    /// Bits 0-1: the lowest privilege allowed to raise it with INT n (3 for
    /// `int 0x80`). Bit 2: clear virtual IF on entry (interrupt gate).
    pub flags: u8,
    pub cs: u16,
    pub _pad: u32,
    pub address: u64,
}

/// One request of `mmu_update(reqs: *const MmuUpdate, count)`: write `val` to
/// the page-table entry at guest-physical `ptr`. visor checks that `ptr` lies in
/// a page-table page of the guest and that `val` maps guest RAM only; the
/// hypercall applies requests in order, stops at the first invalid one, and
/// returns how many it applied. The TLB entries the writes affect are flushed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MmuUpdate {
    pub ptr: u64,
    pub val: u64,
}

/// `sched_op(cmd, arg)`.
pub mod sched {
    /// Give up the CPU (returns at once on a single-vCPU VM).
    pub const YIELD: u64 = 0;
    /// Block until an event is pending (the paravirtual HLT).
    pub const BLOCK: u64 = 1;
    /// Shut the VM down with exit status `arg`.
    pub const SHUTDOWN: u64 = 2;
}

/// `console_io(cmd, buf, len)`.
pub mod console {
    /// Write `len` bytes at guest-virtual `buf` to the console.
    pub const WRITE: u64 = 0;
}

/// `event_channel_op(cmd, port, arg)`: events are delivered as virtual
/// interrupts through the trap table at the vector bound to the port.
pub mod event {
    /// Bind virtual IRQ `port` (one of the `VIRQ_*`) to vector `arg`.
    pub const BIND_VIRQ: u64 = 0;
    /// Mask (`arg` = 1) or unmask (`arg` = 0) the port.
    pub const MASK: u64 = 1;
    pub const VIRQ_TIMER: u64 = 0;
    pub const VIRQ_CONSOLE: u64 = 1;
}

/// One entry of `multicall(entries: *mut MulticallEntry, count)`: each is
/// executed in order and its result stored in `result`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MulticallEntry {
    pub nr: u64,
    pub args: [u64; 5],
    pub result: i64,
}

/// The stub for hypercall `n` under an engine whose hypercalls are port I/O
/// (`kvm`): `mov eax, n; out HYPERCALL_PORT, eax; ret`, padded with INT3.
pub fn port_io_stub(n: u32) -> [u8; STUB_SIZE] {
    let mut s = [0xcc; STUB_SIZE];
    s[0] = 0xb8; // mov eax, imm32
    s[1..5].copy_from_slice(&n.to_le_bytes());
    s[5] = 0xe7; // out imm8, eax
    s[6] = HYPERCALL_PORT;
    s[7] = 0xc3; // ret
    s
}

/// The vector of `int 0x82`, the hypercall entry under engine `pv` (as in
/// Xen's 32-bit ABI).
pub const HYPERCALL_VECTOR: u8 = 0x82;

/// The stub for hypercall `n` under an engine whose hypercalls are a software
/// interrupt (`pv`): `mov eax, n; int 0x82; ret`, padded with INT3.
pub fn int82_stub(n: u32) -> [u8; STUB_SIZE] {
    let mut s = [0xcc; STUB_SIZE];
    s[0] = 0xb8; // mov eax, imm32
    s[1..5].copy_from_slice(&n.to_le_bytes());
    s[5] = 0xcd; // int imm8
    s[6] = HYPERCALL_VECTOR;
    s[7] = 0xc3; // ret
    s
}

/// The stub of hypercall `n` for engines that trap VMCALL (`vmx`):
/// `mov eax, n; vmcall; ret`, padded with INT3.
pub fn vmcall_stub(n: u32) -> [u8; STUB_SIZE] {
    let mut s = [0xcc; STUB_SIZE];
    s[0] = 0xb8; // mov eax, imm32
    s[1..5].copy_from_slice(&n.to_le_bytes());
    s[5..8].copy_from_slice(&[0x0f, 0x01, 0xc1]); // vmcall
    s[8] = 0xc3; // ret
    s
}
