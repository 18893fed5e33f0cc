//! Privileged instructions, one small function each. Only [`pvops`](crate::pvops)
//! and the boot code call the ones the paravirtual interface replaces.

use core::arch::asm;

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O in the guest kernel at CPL 0.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

pub fn outw(port: u16, v: u16) {
    // SAFETY: port I/O in the guest kernel at CPL 0.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    }
}

pub fn outl(port: u16, v: u32) {
    // SAFETY: port I/O in the guest kernel at CPL 0.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O in the guest kernel at CPL 0.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// CPUID `leaf` (subleaf 0): EAX, EBX, ECX, EDX.
pub fn cpuid(leaf: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: CPUID has no side effects; RBX is saved because LLVM reserves it.
    unsafe {
        asm!("mov {t:r}, rbx", "cpuid", "xchg {t:r}, rbx",
             t = out(reg) b, inout("eax") leaf => a, inout("ecx") 0 => c, out("edx") d,
             options(nomem, nostack, preserves_flags));
    }
    [a, b, c, d]
}

pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading an architectural MSR at CPL 0 has no side effects.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi,
             options(nomem, nostack, preserves_flags));
    }
    (hi as u64) << 32 | lo as u64
}

/// # Safety
/// The MSR must exist and the value must keep the kernel's invariants.
pub unsafe fn wrmsr(msr: u32, v: u64) {
    // SAFETY: the caller's contract.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32,
             options(nostack, preserves_flags));
    }
}

pub fn read_cr2() -> u64 {
    let v;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// # Safety
/// `pml4` must be a page table that maps the running kernel.
pub unsafe fn write_cr3(pml4: u64) {
    // SAFETY: the caller's contract.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) }
}

/// Sets the task priority (CR8, the local APIC's TPR).
pub fn write_cr8(v: u64) {
    // SAFETY: the kernel runs with interrupts disabled; a task priority only
    // masks interrupts further.
    unsafe { asm!("mov cr8, {}", in(reg) v, options(nomem, nostack, preserves_flags)) }
}

/// The time-stamp counter (RDTSC, allowed at every privilege level).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC reads a counter; CR4.TSD is clear, so user mode may too.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (hi as u64) << 32 | lo as u64
}

pub fn invlpg(va: u64) {
    // SAFETY: dropping a TLB entry is always safe.
    unsafe { asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) }
}

/// Fills the 4 KiB page at identity-mapped `pa` with zeros (512 `stosq`).
///
/// # Safety
/// The page must be RAM the caller owns.
pub unsafe fn zero_page(pa: u64) {
    // SAFETY: the caller's contract.
    unsafe {
        asm!("rep stosq", inout("rcx") 512u64 => _, inout("rdi") pa => _, in("rax") 0u64,
             options(nostack, preserves_flags));
    }
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// # Safety
/// `base..base + limit + 1` must stay a valid GDT for as long as it is loaded.
pub unsafe fn lgdt(base: u64, limit: u16) {
    let p = DescriptorPointer { limit, base };
    // SAFETY: the caller's contract.
    unsafe { asm!("lgdt [{}]", in(reg) &p, options(readonly, nostack, preserves_flags)) }
}

/// # Safety
/// `base..base + limit + 1` must stay a valid IDT for as long as it is loaded.
pub unsafe fn lidt(base: u64, limit: u16) {
    let p = DescriptorPointer { limit, base };
    // SAFETY: the caller's contract.
    unsafe { asm!("lidt [{}]", in(reg) &p, options(readonly, nostack, preserves_flags)) }
}

/// Reloads DS, ES, SS with `data` and FS, GS with the null selector.
///
/// # Safety
/// `data` must be a flat writable data segment of the loaded GDT.
pub unsafe fn load_data_segments(data: u16) {
    // SAFETY: the caller's contract.
    unsafe {
        asm!("mov ds, {0:x}", "mov es, {0:x}", "mov ss, {0:x}", "mov fs, {1:x}", "mov gs, {1:x}",
             in(reg) data, in(reg) 0u16, options(nostack, preserves_flags));
    }
}

/// # Safety
/// `sel` must select an available TSS descriptor of the loaded GDT.
pub unsafe fn ltr(sel: u16) {
    // SAFETY: the caller's contract.
    unsafe { asm!("ltr {0:x}", in(reg) sel, options(nostack, preserves_flags)) }
}

pub fn cli() {
    // SAFETY: masking interrupts is always safe for the kernel.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

/// Waits for an interrupt with interrupts enabled and returns with them disabled.
/// The handler runs in between, so this is a compiler barrier.
///
/// # Safety
/// Only where the kernel may be interrupted (it holds no kernel state).
pub unsafe fn enable_and_halt() {
    // SAFETY: the caller's contract; STI's one-instruction shadow makes
    // `sti; hlt` atomic, so no wake-up is lost.
    unsafe { asm!("sti", "hlt", "cli") }
}
