//! visor's CPU benchmark: a Multiboot v1 kernel that does integer work over
//! 8 MiB and prints a checksum on COM1, so that visor's software CPU, QEMU's
//! TCG and Bochs can run the same instructions and be timed against each
//! other (bench/cpu_speed.py).
//!
//! - The image is flat (Multiboot a.out kludge, loaded at 1 MiB), entered in
//!   32-bit protected mode without paging, as `qemu -kernel`, GRUB and visor
//!   do. A 32-bit stub identity-maps the first GiB with 2 MiB pages, enables
//!   long mode and calls [`bench_main`] in 64-bit mode.
//! - Each round fills 4 MiB with a pseudo-random sequence (xorshift64*),
//!   computes its CRC-32 (table-driven), sieves the primes below 4 Mi, and
//!   heap-sorts the 1 Mi 32-bit words; it prints a line of results, and the
//!   run ends with `bench: checksum 0x...` over all rounds.
//! - `rounds=N` on the command line sets the number of rounds (default 1).
//! - It ends through the isa-debug-exit port (value 0: visor and QEMU exit with
//!   status 1; 1 on a failed self-check: status 3), then through Bochs' shutdown
//!   port 0x8900 (the string `Shutdown`), which ends Bochs.
//!
//! Built by build.rs without SSE; `core::fmt` is not used (it is precompiled
//! with SSE).
#![no_std]
#![no_main]

#[path = "../rt.rs"]
mod rt;

use core::arch::{asm, global_asm};

use abi::port;

const DEFAULT_ROUNDS: u64 = 1;
const MAX_ROUNDS: u64 = 10_000;
/// 32-bit words sorted and checksummed per round (4 MiB).
const WORDS: usize = 1 << 20;
/// Sieve size in bytes (4 MiB).
const SIEVE: usize = 4 << 20;
/// Bochs' shutdown port: writing `Shutdown` to it ends the simulation.
const BOCHS_SHUTDOWN: u16 = 0x8900;
const MULTIBOOT_BOOT_MAGIC: u32 = 0x2bad_b002;

// The Multiboot header (flags: bit 1 asks for the memory fields, bit 16 says the
// header carries the load addresses) and the 32-bit entry.
global_asm!(
    ".section .multiboot, \"a\"",
    ".p2align 2",
    "mb_header:",
    ".long 0x1badb002",
    ".long 0x00010002",
    ".long -(0x1badb002 + 0x00010002)",
    ".long mb_header",
    ".long __image_start",
    ".long __load_end",
    ".long __bss_end",
    ".long _start",
    "",
    ".section .bss.boot, \"aw\", @nobits",
    ".p2align 12",
    "boot_pml4: .skip 4096",
    "boot_pdpt: .skip 4096",
    "boot_pd: .skip 4096",
    "boot_stack: .skip 65536",
    "boot_stack_top:",
    "",
    ".section .rodata.boot, \"a\"",
    ".p2align 3",
    "boot_gdt:",
    ".quad 0",
    ".quad 0x00af9a000000ffff", // 0x08: 64-bit code
    ".quad 0x00cf92000000ffff", // 0x10: data
    "boot_gdt_ptr:",
    ".word 23",
    ".long boot_gdt",
    "",
    ".section .text.boot, \"ax\"",
    ".code32",
    ".global _start",
    "_start:",
    "    cli",
    "    cld",
    "    mov ebp, eax", // Multiboot magic
    "    mov esi, ebx", // Multiboot information
    // Zero .bss (page tables, stack): not every loader clears it.
    "    mov edi, offset __bss_start",
    "    mov ecx, offset __bss_end",
    "    sub ecx, edi",
    "    xor eax, eax",
    "    rep stosb",
    // PML4[0] -> PDPT[0] -> PD: 512 pages of 2 MiB, the first GiB.
    "    mov dword ptr [boot_pml4], offset boot_pdpt + 3",
    "    mov dword ptr [boot_pdpt], offset boot_pd + 3",
    "    xor ecx, ecx",
    "2:  mov eax, ecx",
    "    shl eax, 21",
    "    or eax, 0x83",
    "    mov dword ptr [boot_pd + ecx * 8], eax",
    "    inc ecx",
    "    cmp ecx, 512",
    "    jne 2b",
    "    mov eax, cr4",
    "    or eax, 0x20", // PAE
    "    mov cr4, eax",
    "    mov eax, offset boot_pml4",
    "    mov cr3, eax",
    "    mov ecx, 0xc0000080", // EFER
    "    rdmsr",
    "    or eax, 0x100", // LME
    "    wrmsr",
    "    mov eax, cr0",
    "    or eax, 0x80000001", // PG | PE
    "    mov cr0, eax",
    "    lgdt [boot_gdt_ptr]",
    // jmp far 0x08:start64 (ptr16:32)
    "    .byte 0xea",
    "    .long start64",
    "    .word 0x08",
    ".code64",
    "start64:",
    "    mov eax, 0x10",
    "    mov ds, eax",
    "    mov es, eax",
    "    mov ss, eax",
    "    mov fs, eax",
    "    mov gs, eax",
    "    mov esp, offset boot_stack_top",
    "    mov edi, ebp",
    // ESI still holds the Multiboot information address.
    "    call {main}",
    "3:  hlt",
    "    jmp 3b",
    main = sym bench_main,
);

extern "C" {
    /// The first 2 MiB boundary after the image (link.ld).
    static __arena: u8;
}

fn outb(port: u16, v: u8) {
    // SAFETY: port output has no effect on memory the kernel uses.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// COM1 output, one byte at a time once the transmitter holding register is
/// empty (LSR bit 5).
struct Serial;

impl Serial {
    /// 115200 baud, 8 data bits, no parity, one stop bit: the line control
    /// register resets to 5-bit characters, which Bochs honours.
    fn init() {
        outb(port::COM1 + 3, 0x80); // LCR: divisor latch access
        outb(port::COM1, 1); // divisor 1
        outb(port::COM1 + 1, 0);
        outb(port::COM1 + 3, 0x03); // LCR: 8N1
    }

    fn byte(&self, b: u8) -> &Self {
        while inb(port::COM1 + 5) & 0x20 == 0 {}
        outb(port::COM1, b);
        self
    }

    fn s(&self, s: &str) -> &Self {
        for &b in s.as_bytes() {
            self.byte(b);
        }
        self
    }

    /// Unsigned decimal.
    fn dec(&self, v: u64) -> &Self {
        for &d in rt::decimal(v, &mut [0; 20]) {
            self.byte(d);
        }
        self
    }

    /// `digits` hexadecimal digits.
    fn hex(&self, v: u64, digits: u32) -> &Self {
        for k in (0..digits).rev() {
            self.byte(b"0123456789abcdef"[(v >> (4 * k)) as usize & 0xf]);
        }
        self
    }

    fn end(&self) {
        self.byte(b'\n');
    }

    /// Waits until the transmitter is idle (LSR bit 6): Bochs sends at the
    /// emulated baud rate and would stop before the last bytes are out.
    fn flush() {
        while inb(port::COM1 + 5) & 0x40 == 0 {}
    }
}

/// Ends the run: isa-debug-exit (visor, QEMU), then Bochs' shutdown port.
fn exit(code: u8) -> ! {
    Serial::flush();
    outb(port::DEBUG_EXIT, code);
    for &b in b"Shutdown" {
        outb(BOCHS_SHUTDOWN, b);
    }
    loop {
        // SAFETY: nothing is left to do; halting with interrupts off.
        unsafe { asm!("cli; hlt") }
    }
}

fn fail(what: &str) -> ! {
    Serial.s("bench: error: ").s(what).end();
    exit(1)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    fail("panic")
}

/// What the kernel needs from the Multiboot information: the usable top of
/// memory and the command line.
struct BootInfo {
    mem_top: Option<u64>,
    cmdline: &'static [u8],
}

/// # Safety
/// `mbi` must be the address of the Multiboot information the loader passed.
unsafe fn boot_info(mbi: u32) -> BootInfo {
    let field = |off: u32| {
        // SAFETY: the Multiboot information is at least 0x58 bytes at `mbi`.
        unsafe { core::ptr::read_volatile((mbi + off) as usize as *const u32) }
    };
    let flags = field(0);
    let mem_top = (flags & 1 != 0).then(|| 0x10_0000 + u64::from(field(8)) * 1024);
    let cmdline = if flags & 4 != 0 {
        let p = field(16) as usize as *const u8;
        let mut len = 0;
        // SAFETY: the loader passes a NUL-terminated string; at most 4 KiB of it
        // is read.
        while len < 4096 && unsafe { *p.add(len) } != 0 {
            len += 1;
        }
        // SAFETY: the `len` bytes just read.
        unsafe { core::slice::from_raw_parts(p, len) }
    } else {
        &[]
    };
    BootInfo { mem_top, cmdline }
}

/// `rounds=N` from the command line.
fn rounds(cmdline: &[u8]) -> u64 {
    for word in cmdline.split(|&b| b == b' ') {
        if let Some(v) = word.strip_prefix(b"rounds=") {
            let mut n = 0u64;
            for &d in v {
                if !d.is_ascii_digit() || n > MAX_ROUNDS {
                    fail("rounds=N wants a number from 1 to 10000");
                }
                n = n * 10 + u64::from(d - b'0');
            }
            if !(1..=MAX_ROUNDS).contains(&n) {
                fail("rounds=N wants a number from 1 to 10000");
            }
            return n;
        }
    }
    DEFAULT_ROUNDS
}

/// xorshift64* (Vigna).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The table of the reflected CRC-32 (polynomial 0xedb88320).
fn crc32_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    for (i, e) in t.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *e = c;
    }
    t
}

fn crc32(table: &[u32; 256], words: &[u32]) -> u32 {
    let mut c = !0u32;
    for &w in words {
        for b in w.to_le_bytes() {
            c = table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
        }
    }
    !c
}

/// Sieve of Eratosthenes over `flags` (one byte per number): the number of
/// primes below `flags.len()` and their sum.
fn sieve(flags: &mut [u8]) -> (u64, u64) {
    let n = flags.len();
    flags.fill(1);
    flags[0] = 0;
    flags[1] = 0;
    let mut i = 2;
    while i * i < n {
        if flags[i] != 0 {
            let mut j = i * i;
            while j < n {
                flags[j] = 0;
                j += i;
            }
        }
        i += 1;
    }
    let (mut count, mut sum) = (0, 0u64);
    for (k, &f) in flags.iter().enumerate() {
        if f != 0 {
            count += 1;
            sum += k as u64;
        }
    }
    (count, sum)
}

fn sift_down(a: &mut [u32], mut root: usize, end: usize) {
    loop {
        let mut child = 2 * root + 1;
        if child >= end {
            return;
        }
        if child + 1 < end && a[child] < a[child + 1] {
            child += 1;
        }
        if a[root] >= a[child] {
            return;
        }
        a.swap(root, child);
        root = child;
    }
}

fn heapsort(a: &mut [u32]) {
    let n = a.len();
    for root in (0..n / 2).rev() {
        sift_down(a, root, n);
    }
    for end in (1..n).rev() {
        a.swap(0, end);
        sift_down(a, 0, end);
    }
}

/// One round of work; returns its digest.
fn round(r: u64, table: &[u32; 256], words: &mut [u32], flags: &mut [u8]) -> u64 {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (r + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    for w in words.iter_mut() {
        *w = (rng.next() >> 32) as u32;
    }
    let crc = crc32(table, words);
    // A sieve size that changes with the round.
    let limit = flags.len() - (r as usize % 64) * 4096;
    let (primes, prime_sum) = sieve(&mut flags[..limit]);
    heapsort(words);
    if words.windows(2).any(|w| w[0] > w[1]) {
        fail("the sorted words are out of order");
    }
    let mut sorted = 0u64;
    for (i, &w) in words.iter().enumerate() {
        sorted = sorted
            .wrapping_mul(31)
            .wrapping_add(u64::from(w) ^ i as u64);
    }
    Serial
        .s("bench: round ")
        .dec(r)
        .s(" crc32 ")
        .hex(u64::from(crc), 8)
        .s(" primes ")
        .dec(primes)
        .s(" sum ")
        .dec(prime_sum)
        .s(" sorted ")
        .hex(sorted, 16)
        .end();
    u64::from(crc) ^ primes.rotate_left(32) ^ prime_sum.rotate_left(16) ^ sorted
}

extern "C" fn bench_main(magic: u32, mbi: u32) -> ! {
    Serial::init();
    if magic != MULTIBOOT_BOOT_MAGIC {
        fail("not started by a Multiboot loader");
    }
    // SAFETY: a Multiboot loader passed `mbi` (magic checked above).
    let info = unsafe { boot_info(mbi) };
    let rounds = rounds(info.cmdline);
    let arena = core::ptr::addr_of!(__arena) as usize;
    let arena_end = (arena + WORDS * 4 + SIEVE) as u64;
    match info.mem_top {
        Some(top) if top >= arena_end => {}
        _ => fail("needs RAM up to the end of the arena (16 MiB is enough)"),
    }
    // SAFETY: the arena lies in RAM (checked above), above the image, inside the
    // identity map, and nothing else uses it; the two slices do not overlap.
    let (words, flags) = unsafe {
        (
            core::slice::from_raw_parts_mut(arena as *mut u32, WORDS),
            core::slice::from_raw_parts_mut((arena + WORDS * 4) as *mut u8, SIEVE),
        )
    };
    Serial.s("bench: start, ").dec(rounds).s(" rounds").end();
    let table = crc32_table();
    let mut digest = 0xcbf2_9ce4_8422_2325u64;
    for r in 0..rounds {
        digest = (digest ^ round(r, &table, words, flags)).wrapping_mul(0x100_0000_01b3);
    }
    Serial.s("bench: checksum ").hex(digest, 16).end();
    exit(0)
}
