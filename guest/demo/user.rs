//! The user programs and their system-call interface.
//!
//! They run at CPL 3 from `.utext`, which link.ld places at virtual address
//! 0x4000_0000 (its load address is inside the kernel image); the kernel maps
//! it, and the constant data in `.urodata`, read-only into every process. So
//! user code may only reach code in `.utext` (functions marked
//! `#[link_section = ".utext"]`, or `#[inline(always)]` helpers) and data made
//! with [`ustr!`]; it must not make the compiler call into the kernel image:
//! no slice indexing (panics), no division by variables, no large copies or
//! fills (memcpy/memset). Each process has its own stack and heap.

use core::arch::asm;
use core::mem::MaybeUninit;

use crate::bench::timed;

/// System call numbers (RAX; arguments in RDI, RSI, RDX; result in RAX).
pub mod sys {
    /// write(fd, buf, len) -> bytes written
    pub const WRITE: u64 = 0;
    pub const GETPID: u64 = 1;
    pub const YIELD: u64 = 2;
    /// sleep(ticks)
    pub const SLEEP: u64 = 3;
    /// exit(code)
    pub const EXIT: u64 = 4;
    /// sbrk(increment) -> old break
    pub const SBRK: u64 = 5;
    /// send(pid, value): queues `value` in the mailbox of `pid`
    pub const SEND: u64 = 6;
    /// recv() -> value: blocks until the mailbox holds one
    pub const RECV: u64 = 7;
    /// ticks() -> timer ticks since boot
    pub const TICKS: u64 = 8;
    /// bench_phase(n): starts benchmark phase n, or ends it (0); only with
    /// `bench` on the kernel command line (bench.rs)
    pub const BENCH_PHASE: u64 = 9;
    /// bench_report(phase, iterations, ticks): the kernel prints the result
    pub const BENCH_REPORT: u64 = 10;
}

unsafe extern "C" {
    safe static __user_start: u8;
    safe static __urodata_start: u8;
    safe static __user_end: u8;
    safe static __user_lma: u8;
}

/// Where the user image is: virtual start, start of its read-only data,
/// end (page-aligned), and the physical address of its first page.
pub struct Image {
    pub start: u64,
    pub rodata: u64,
    pub end: u64,
    pub lma: u64,
}

pub fn image() -> Image {
    Image {
        start: &raw const __user_start as u64,
        rodata: &raw const __urodata_start as u64,
        end: &raw const __user_end as u64,
        lma: &raw const __user_lma as u64,
    }
}

/// A byte string in `.urodata`, readable by user code.
macro_rules! ustr {
    ($s:literal) => {{
        #[link_section = ".urodata"]
        static S: [u8; $s.len()] = *$s;
        &S
    }};
}

#[derive(Clone, Copy)]
enum Gate {
    Syscall,
    Int80,
}

#[inline(always)]
fn call(g: Gate, n: u64, a: u64, b: u64, c: u64) -> u64 {
    let r;
    match g {
        // SAFETY: the kernel's system calls preserve every register but RAX
        // (and RCX, R11, which `syscall` itself clobbers) and read only the
        // memory their arguments name.
        Gate::Syscall => unsafe {
            asm!("syscall", inlateout("rax") n => r, in("rdi") a, in("rsi") b, in("rdx") c,
                 lateout("rcx") _, lateout("r11") _, options(nostack));
        },
        // SAFETY: as above; `int 0x80` preserves every register but RAX.
        Gate::Int80 => unsafe {
            asm!("int 0x80", inlateout("rax") n => r, in("rdi") a, in("rsi") b, in("rdx") c,
                 options(nostack));
        },
    }
    r
}

#[inline(always)]
fn exit(g: Gate, code: u64) -> ! {
    call(g, sys::EXIT, code, 0, 0);
    #[allow(clippy::empty_loop)]
    loop {}
}

/// Writes one line: `say!(gate, |o| o.s(..).n(..))`.
macro_rules! say {
    ($g:expr, |$o:ident| $chain:expr) => {{
        let mut slot = MaybeUninit::uninit();
        let $o = Out::init(&mut slot, $g);
        $chain.end();
    }};
}

/// A line of output on the stack, written with one `write`.
struct Out {
    buf: MaybeUninit<[u8; Out::CAP]>,
    len: usize,
    gate: Gate,
}

impl Out {
    const CAP: usize = 120;

    /// Initializes `slot` field by field: building the struct as a value makes
    /// LLVM zero-fill the whole buffer with a `memset` call into the kernel.
    #[inline(always)]
    fn init(slot: &mut MaybeUninit<Out>, gate: Gate) -> &mut Out {
        let p = slot.as_mut_ptr();
        // SAFETY: `len` and `gate` are written before the reference is made;
        // `buf` may stay uninitialized.
        unsafe {
            (&raw mut (*p).len).write(0);
            (&raw mut (*p).gate).write(gate);
            &mut *p
        }
    }

    #[inline(always)]
    fn put(&mut self, b: u8) {
        if self.len < Self::CAP {
            // SAFETY: len < CAP: inside the buffer.
            unsafe { (self.buf.as_mut_ptr() as *mut u8).add(self.len).write(b) };
            self.len += 1;
        }
    }

    #[link_section = ".utext"]
    #[inline(never)]
    fn s(&mut self, s: &[u8]) -> &mut Self {
        let mut i = 0;
        while i < s.len() {
            // SAFETY: i < s.len(). Volatile keeps the loop a loop (no memcpy).
            self.put(unsafe { s.as_ptr().add(i).read_volatile() });
            i += 1;
        }
        self
    }

    #[link_section = ".utext"]
    #[inline(never)]
    fn n(&mut self, mut v: u64) -> &mut Self {
        let mut digits = MaybeUninit::<[u8; 20]>::uninit();
        let d = digits.as_mut_ptr() as *mut u8;
        let mut k = 0;
        loop {
            // SAFETY: a u64 has at most 20 decimal digits: k < 20.
            unsafe { d.add(k).write(b'0' + (v % 10) as u8) };
            k += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        while k > 0 {
            k -= 1;
            // SAFETY: digits 0..k were written above.
            self.put(unsafe { d.add(k).read() });
        }
        self
    }

    #[link_section = ".utext"]
    #[inline(never)]
    fn i(&mut self, v: i64) -> &mut Self {
        if v < 0 {
            self.put(b'-');
        }
        self.n(v.unsigned_abs())
    }

    #[link_section = ".utext"]
    #[inline(never)]
    fn x(&mut self, v: u64) -> &mut Self {
        self.put(b'0');
        self.put(b'x');
        let mut shift = 64;
        let mut started = false;
        while shift > 0 {
            shift -= 4;
            let d = (v >> shift & 0xf) as u8;
            if d != 0 || started || shift == 0 {
                started = true;
                self.put(if d < 10 { b'0' + d } else { b'a' + d - 10 });
            }
        }
        self
    }

    #[link_section = ".utext"]
    #[inline(never)]
    fn end(&mut self) {
        self.put(b'\n');
        let buf = self.buf.as_ptr() as u64;
        call(self.gate, sys::WRITE, 1, buf, self.len as u64);
        self.len = 0;
    }
}

/// Primes below this, in process A's sieve.
const SIEVE_LIMIT: u64 = 50_000;
/// π(50 000).
const PRIMES_BELOW_LIMIT: u64 = 5133;
/// Times A re-checks its sieve by trial division (CPU work at CPL 3, long
/// enough for the timer to preempt it), unless the kernel passes another
/// number (`passes=N` on its command line).
const CHECK_PASSES: u64 = 100;
/// D's naps, in timer ticks: long enough that D is the last process left and
/// the kernel idles.
const NAP_TICKS: u64 = 50;
/// Ping-pong rounds between B and C.
const ROUNDS: u64 = 400;
const REPLY: u64 = 1_000_000;
const EAGAIN: u64 = -11i64 as u64;

#[link_section = ".utext"]
#[inline(never)]
fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.checked_rem(d) == Some(0) {
            return false;
        }
        d += 1;
    }
    true
}

/// Process A (`syscall`): counts primes with a sieve in its demand-paged heap.
#[link_section = ".utext"]
pub extern "C" fn primes(arg: u64) -> ! {
    let g = Gate::Syscall;
    let passes = if arg == 0 { CHECK_PASSES } else { arg };
    let pid = call(g, sys::GETPID, 0, 0, 0);
    say!(g, |o| o
        .s(ustr!(b"A: pid "))
        .n(pid)
        .s(ustr!(b" (syscall): sieve of Eratosthenes below "))
        .n(SIEVE_LIMIT)
        .s(ustr!(b" in its sbrk heap")));
    let base = call(g, sys::SBRK, SIEVE_LIMIT, 0, 0);
    if (base as i64) < 0 {
        say!(g, |o| o.s(ustr!(b"A: sbrk failed")));
        exit(g, 2);
    }
    let sieve = base as *mut u8;
    let (mut count, mut largest) = (0, 0);
    let mut i = 2;
    while i < SIEVE_LIMIT {
        // SAFETY: i < SIEVE_LIMIT: inside the heap sbrk gave us (pages appear
        // on first touch, zeroed).
        if unsafe { sieve.add(i as usize).read_volatile() } == 0 {
            count += 1;
            largest = i;
            let mut j = i * i;
            while j < SIEVE_LIMIT {
                // SAFETY: j < SIEVE_LIMIT, as above.
                unsafe { sieve.add(j as usize).write_volatile(1) };
                j += i;
            }
        }
        i += 1;
    }
    say!(g, |o| o
        .s(ustr!(b"A: "))
        .n(count)
        .s(ustr!(b" primes below "))
        .n(SIEVE_LIMIT)
        .s(ustr!(b", the largest "))
        .n(largest)
        .s(ustr!(b"; checking by trial division")));
    let mut wrong = 0;
    for _ in 0..passes {
        let mut k = 2;
        while k < SIEVE_LIMIT {
            // SAFETY: k < SIEVE_LIMIT, as above.
            let marked = unsafe { sieve.add(k as usize).read_volatile() } != 0;
            if is_prime(k) == marked {
                wrong += 1;
            }
            k += 1;
        }
        call(g, sys::YIELD, 0, 0, 0);
    }
    call(
        g,
        sys::SBRK,
        (SIEVE_LIMIT as i64).wrapping_neg() as u64,
        0,
        0,
    );
    say!(g, |o| o
        .s(ustr!(b"A: trial division ("))
        .n(passes)
        .s(ustr!(b" passes, yielding between them) disagrees on "))
        .n(wrong)
        .s(ustr!(b" numbers; heap returned")));
    exit(
        g,
        if count == PRIMES_BELOW_LIMIT && wrong == 0 {
            0
        } else {
            1
        },
    )
}

#[link_section = ".utext"]
#[inline(never)]
fn send(g: Gate, to: u64, v: u64) -> bool {
    loop {
        match call(g, sys::SEND, to, v, 0) {
            0 => return true,
            EAGAIN => {
                call(g, sys::YIELD, 0, 0, 0);
            }
            _ => return false,
        }
    }
}

/// Process B (`int 0x80`): sends 1..=ROUNDS to `partner`, expects each back
/// plus REPLY.
#[link_section = ".utext"]
pub extern "C" fn ping(partner: u64) -> ! {
    let g = Gate::Int80;
    let pid = call(g, sys::GETPID, 0, 0, 0);
    say!(g, |o| o
        .s(ustr!(b"B: pid "))
        .n(pid)
        .s(ustr!(b" (int 0x80): ping-pong with pid "))
        .n(partner)
        .s(ustr!(b" for "))
        .n(ROUNDS)
        .s(ustr!(b" rounds")));
    for i in 1..=ROUNDS {
        if !send(g, partner, i) {
            say!(g, |o| o.s(ustr!(b"B: send failed")));
            exit(g, 3);
        }
        let reply = call(g, sys::RECV, 0, 0, 0);
        if reply != i + REPLY {
            say!(g, |o| o
                .s(ustr!(b"B: round "))
                .n(i)
                .s(ustr!(b": bad reply "))
                .n(reply));
            exit(g, 1);
        }
        if i % (ROUNDS / 4) == 0 {
            say!(g, |o| o
                .s(ustr!(b"B: round "))
                .n(i)
                .s(ustr!(b"/"))
                .n(ROUNDS)
                .s(ustr!(b", reply "))
                .n(reply)
                .s(ustr!(b", tick "))
                .n(call(g, sys::TICKS, 0, 0, 0)));
        }
    }
    exit(g, 0)
}

/// Process C (`syscall`): answers each value from `partner` with value + REPLY.
#[link_section = ".utext"]
pub extern "C" fn pong(partner: u64) -> ! {
    let g = Gate::Syscall;
    let pid = call(g, sys::GETPID, 0, 0, 0);
    say!(g, |o| o
        .s(ustr!(b"C: pid "))
        .n(pid)
        .s(ustr!(b" (syscall): answering pid "))
        .n(partner));
    for i in 1..=ROUNDS {
        let v = call(g, sys::RECV, 0, 0, 0);
        if v != i {
            say!(g, |o| o
                .s(ustr!(b"C: round "))
                .n(i)
                .s(ustr!(b": bad value "))
                .n(v));
            exit(g, 1);
        }
        if !send(g, partner, v + REPLY) {
            say!(g, |o| o.s(ustr!(b"C: send failed")));
            exit(g, 3);
        }
        if i % (ROUNDS / 2) == 0 {
            say!(g, |o| o
                .s(ustr!(b"C: answered "))
                .n(i)
                .s(ustr!(b"/"))
                .n(ROUNDS));
        }
    }
    exit(g, 0)
}

/// Process D (`int 0x80`): naps, checks that the kernel refuses a kernel
/// pointer, demand-pages two heap pages, then touches its break: the kernel
/// kills it.
#[link_section = ".utext"]
pub extern "C" fn sleeper(_arg: u64) -> ! {
    let g = Gate::Int80;
    let pid = call(g, sys::GETPID, 0, 0, 0);
    say!(g, |o| o
        .s(ustr!(b"D: pid "))
        .n(pid)
        .s(ustr!(b" (int 0x80): three naps of "))
        .n(NAP_TICKS)
        .s(ustr!(b" ticks, then a heap overrun")));
    for _ in 0..3 {
        let t0 = call(g, sys::TICKS, 0, 0, 0);
        call(g, sys::SLEEP, NAP_TICKS, 0, 0);
        let t1 = call(g, sys::TICKS, 0, 0, 0);
        say!(g, |o| o
            .s(ustr!(b"D: slept from tick "))
            .n(t0)
            .s(ustr!(b" to "))
            .n(t1));
    }
    let r = call(g, sys::WRITE, 1, 0x20_0000, 16) as i64;
    say!(g, |o| o
        .s(ustr!(b"D: write() of kernel memory returned "))
        .i(r));
    let heap = call(g, sys::SBRK, 2 * 4096, 0, 0);
    let p = heap as *mut u64;
    // SAFETY: both words lie in the two pages sbrk just added.
    let sum = unsafe {
        p.write_volatile(20);
        p.add(512).write_volatile(22);
        p.read_volatile() + p.add(512).read_volatile()
    };
    let brk = call(g, sys::SBRK, 0, 0, 0);
    say!(g, |o| o
        .s(ustr!(b"D: heap "))
        .x(heap)
        .s(ustr!(b".."))
        .x(brk)
        .s(ustr!(b" holds "))
        .n(sum)
        .s(ustr!(b"; now touching the break")));
    // SAFETY: deliberately outside the heap: the kernel kills the process.
    unsafe { (brk as *mut u8).write_volatile(1) };
    exit(g, 0)
}

/// The bench process (`--cmdline bench`, bench.rs): times the user-mode
/// nanobenchmarks, each inside a phase, and has the kernel report them.
/// `fixed`: the iteration count, or 0 to size each loop to take `target`
/// TSC ticks.
#[link_section = ".utext"]
pub extern "C" fn bench(fixed: u64, target: u64) -> ! {
    use abi::bench::{DIVZERO, PGFAULT, SYSCALL, SYSCALL_SYSRET};
    bench_one(SYSCALL, fixed, target, time_int80);
    bench_one(SYSCALL_SYSRET, fixed, target, time_syscall);
    bench_one(PGFAULT, fixed, target, time_pgfault);
    bench_one(DIVZERO, fixed, target, time_divzero);
    exit(Gate::Syscall, 0)
}

#[link_section = ".utext"]
#[inline(never)]
fn bench_one(phase: u32, fixed: u64, target: u64, run: fn(u64) -> u64) {
    let g = Gate::Syscall;
    let n = crate::bench::iterations(fixed, target, run);
    call(g, sys::BENCH_PHASE, (phase | abi::bench::BASELINE) as u64, 0, 0);
    run(0);
    call(g, sys::BENCH_PHASE, 0, 0, 0);
    call(g, sys::BENCH_PHASE, phase as u64, 0, 0);
    let t = run(n);
    call(g, sys::BENCH_PHASE, 0, 0, 0);
    call(g, sys::BENCH_REPORT, phase as u64, n, t);
}

#[link_section = ".utext"]
#[inline(never)]
fn time_int80(n: u64) -> u64 {
    timed!(n, |_i| call(Gate::Int80, sys::GETPID, 0, 0, 0))
}

#[link_section = ".utext"]
#[inline(never)]
fn time_syscall(n: u64) -> u64 {
    timed!(n, |_i| call(Gate::Syscall, sys::GETPID, 0, 0, 0))
}

/// Touches `pgfault`'s two pages in turn: each touch is a page fault that
/// the kernel resolves by mapping the page and unmapping the other.
#[link_section = ".utext"]
#[inline(never)]
fn time_pgfault(n: u64) -> u64 {
    timed!(n, |i| {
        let p = (crate::bench::FAULT_PAGES + (i & 1) * 4096) as *mut u64;
        // SAFETY: one of the two pages the kernel maps on the fault.
        unsafe { p.write_volatile(i) }
    })
}

/// Divides by zero: #DE goes to the kernel, which steps over the `div`.
#[link_section = ".utext"]
#[inline(never)]
fn time_divzero(n: u64) -> u64 {
    // SAFETY: `div rcx` (bench::DIV_RCX) with RCX = 0: the kernel returns
    // after it with every register unchanged.
    timed!(n, |_i| unsafe {
        asm!("div rcx", inout("rax") 1u64 => _, inout("rdx") 0u64 => _, in("rcx") 0u64,
             options(nomem, nostack))
    })
}
