//! visor's demo guest: a small `no_std` kernel booted through visor's 64-bit boot
//! protocol. It reports what it finds (CPU, memory map, command line), does some
//! arithmetic work, and powers the machine off through the power port.
#![no_std]
#![no_main]

use core::arch::{asm, global_asm};

use abi::{port, BootInfo, MemoryRegion, BOOT_INFO_MAGIC, MEM_RAM};

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

fn outb(port: u16, v: u8) {
    // SAFETY: port I/O in the guest kernel at CPL 0.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) }
}

fn outw(port: u16, v: u16) {
    // SAFETY: port I/O in the guest kernel at CPL 0.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack)) }
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O in the guest kernel at CPL 0.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) }
    v
}

/// COM1 output, polled. Hand-written number formatting: `core::fmt` is
/// precompiled with SSE, which this guest avoids (see build.rs).
struct Com1;

impl Com1 {
    fn put(&mut self, b: u8) {
        // Wait for the transmitter holding register to empty (LSR bit 5).
        while inb(port::COM1 + 5) & 0x20 == 0 {}
        outb(port::COM1, b);
    }

    fn bytes(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        self
    }

    fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    fn dec(&mut self, mut v: u64) -> &mut Self {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.bytes(&buf[i..])
    }

    fn hex(&mut self, v: u64) -> &mut Self {
        self.str("0x");
        let mut started = false;
        for i in (0..16).rev() {
            let d = ((v >> (i * 4)) & 0xf) as u8;
            if d != 0 || started || i == 0 {
                started = true;
                self.put(if d < 10 { b'0' + d } else { b'a' + d - 10 });
            }
        }
        self
    }

    /// Printable ASCII of `s`, other bytes as '.'.
    fn ascii(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            self.put(if (0x20..0x7f).contains(&b) { b } else { b'.' });
        }
        self
    }
}

fn cpuid(leaf: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: CPUID has no side effects; RBX is saved because LLVM reserves it.
    unsafe {
        asm!("mov {t:r}, rbx", "cpuid", "xchg {t:r}, rbx",
             t = out(reg) b, inout("eax") leaf => a, inout("ecx") 0 => c, out("edx") d,
             options(nomem, nostack));
    }
    [a, b, c, d]
}

fn text(words: &[u32]) -> [u8; 12] {
    let mut s = [b'?'; 12];
    for (i, w) in words.iter().take(3).enumerate() {
        s[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    s
}

fn power_off(code: u8) -> ! {
    if code == 0 {
        outw(port::POWER, port::POWER_OFF);
    }
    outb(port::DEBUG_EXIT, code);
    loop {
        // SAFETY: halting forever is what is left to do.
        unsafe { asm!("cli; hlt") }
    }
}

/// Counts primes below `n` with a sieve kept in a fixed buffer.
fn primes_below(n: usize) -> usize {
    static mut SIEVE: [u8; 65536] = [0; 65536];
    let n = n.min(65536);
    // SAFETY: single-threaded kernel; nothing else references SIEVE.
    let sieve = unsafe { &mut *core::ptr::addr_of_mut!(SIEVE) };
    let mut count = 0;
    for i in 2..n {
        if sieve[i] == 0 {
            count += 1;
            let mut j = i * i;
            while j < n {
                sieve[j] = 1;
                j += i;
            }
        }
    }
    count
}

extern "C" fn kmain(info: &BootInfo) -> ! {
    let mut out = Com1;
    if info.magic != BOOT_INFO_MAGIC {
        out.str("demo: panic: bad boot info magic ").hex(info.magic).str("\n");
        power_off(1);
    }
    out.str("visor demo guest: hello from 64-bit long mode\n");
    let v = cpuid(0);
    let h = cpuid(0x4000_0000);
    out.str("demo: cpu vendor \"")
        .ascii(&text(&[v[1], v[3], v[2]]))
        .str("\" hypervisor \"")
        .ascii(&text(&[h[1], h[2], h[3]]))
        .str("\"\n");
    // SAFETY: the boot protocol guarantees mmap_count entries at mmap_addr.
    let mmap = unsafe {
        core::slice::from_raw_parts(
            info.mmap_addr as *const MemoryRegion,
            info.mmap_count as usize,
        )
    };
    let ram: u64 = mmap.iter().filter(|r| r.kind == MEM_RAM).map(|r| r.len).sum();
    out.str("demo: ")
        .dec(mmap.len() as u64)
        .str(" memory regions, ")
        .dec(ram / 1024)
        .str(" KiB RAM\n");
    // SAFETY: the boot protocol guarantees cmdline_len bytes at cmdline_addr.
    let cmdline = unsafe {
        core::slice::from_raw_parts(info.cmdline_addr as *const u8, info.cmdline_len as usize)
    };
    out.str("demo: cmdline \"").ascii(cmdline).str("\"\n");
    let p = primes_below(65536);
    out.str("demo: ").dec(p as u64).str(" primes below 65536\n");
    out.str("demo: done\n");
    power_off(if p == 6542 { 0 } else { 2 })
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    Com1.str("demo: panic\n");
    power_off(3)
}
// The compiler lowers copies and fills to these symbols; with no libc they are ours.
// `rep movsb`/`rep stosb` keep LLVM from turning the loops back into calls.

#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and do not overlap.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: a forward copy is correct when dst is below src or disjoint.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: copying backwards with the direction flag set, restored after.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             options(nostack));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees both ranges are valid for n bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The precompiled `core` for this target was built with unwinding and names a
/// personality routine; with `panic=abort` nothing unwinds, so it is never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
