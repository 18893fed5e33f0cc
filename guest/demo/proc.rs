//! Processes, the preemptive round-robin scheduler and the system calls.
//!
//! A process is its address space and, while it is not running, its saved
//! [`Frame`]. The running process's registers are the frame on the kernel
//! stack; switching saves that frame into the process table and copies the
//! next process's frame over it.

use crate::console::Line;
use arch::pte::{NX, RW, US};
use arch::{pf, vector};

use crate::mm::{self, OWNED, PAGE};
use crate::trap::{self, Frame, INT80_VECTOR, SPURIOUS_VECTOR, SYSCALL_VECTOR, TIMER_VECTOR};
use crate::user::{self, sys};
use crate::{bench, cpu, fail, fatal, pvops, Global};

const MAX_PROCS: usize = 8;
/// Values a process's mailbox holds before `send` returns EAGAIN.
const MAILBOX: usize = 4;
pub const HEAP_BASE: u64 = 0x5000_0000;
const HEAP_LIMIT: u64 = 0x6000_0000;
const STACK_TOP: u64 = mm::USER_LIMIT;
const STACK_PAGES: u64 = 4;
/// 100 Hz.
const TIMER_PERIOD_NS: u64 = 10_000_000;
/// The exit code of a process the kernel kills.
const KILLED: i64 = -1;

const ESRCH: i64 = -3;
const EBADF: i64 = -9;
const EAGAIN: i64 = -11;
const ENOMEM: i64 = -12;
const EFAULT: i64 = -14;
const ENOSYS: i64 = -38;

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Ready,
    /// Until this tick.
    Sleeping(u64),
    /// Blocked in `recv` on an empty mailbox.
    Receiving,
}

#[derive(Clone, Copy)]
struct Process {
    pid: u64,
    state: State,
    /// Saved registers (valid while the process is not running).
    frame: Frame,
    pml4: u64,
    brk: u64,
    mailbox: [u64; MAILBOX],
    head: usize,
    queued: usize,
}

impl Process {
    const FREE: Process = Process {
        pid: 0,
        state: State::Free,
        frame: Frame::ZERO,
        pml4: 0,
        brk: 0,
        mailbox: [0; MAILBOX],
        head: 0,
        queued: 0,
    };
}

#[derive(Clone, Copy)]
struct Stats {
    syscalls: u64,
    via_int80: u64,
    pagefaults: u64,
    demand_paged: u64,
    timer_irqs: u64,
    switches: u64,
    killed: u64,
    failed: u64,
    /// System-call gates the kernel completed for the host (see complete_gate).
    gate_fixups: u64,
}

struct Kernel {
    procs: [Process; MAX_PROCS],
    /// Index of the running (or last run) process.
    current: usize,
    /// The loaded PML4.
    cr3: u64,
    ticks: u64,
    created: u64,
    alive: u64,
    /// Frames in use before the first process (the kernel's page tables).
    kernel_frames: u64,
    stats: Stats,
}

static KERNEL: Global<Kernel> = Global::new(Kernel {
    procs: [Process::FREE; MAX_PROCS],
    current: 0,
    cr3: 0,
    ticks: 0,
    created: 0,
    alive: 0,
    kernel_frames: 0,
    stats: Stats {
        syscalls: 0,
        via_int80: 0,
        pagefaults: 0,
        demand_paged: 0,
        timer_irqs: 0,
        switches: 0,
        killed: 0,
        failed: 0,
        gate_fixups: 0,
    },
});

/// Creates the user processes and runs the first one; the scheduler takes over.
/// With `bench` on the command line: the kernel-mode benchmarks, then the
/// bench process alone, without a timer.
pub fn start() -> ! {
    let (pml4, frame) = KERNEL.with(|k| {
        k.kernel_frames = mm::frames_in_use();
        if bench::enabled() {
            let (fixed, target) = bench::params();
            k.spawn("bench", user::bench as *const () as u64, fixed);
            k.procs[0].frame.rsi = target;
        } else {
            // pid 1: primes (syscall); 2 and 3: ping-pong partners (int 0x80
            // and syscall); 4: sleeps, then crosses its heap's end (int 0x80).
            let passes = crate::PASSES.load(core::sync::atomic::Ordering::Relaxed);
            k.spawn("primes", user::primes as *const () as u64, passes);
            k.spawn("ping", user::ping as *const () as u64, 3);
            k.spawn("pong", user::pong as *const () as u64, 2);
            k.spawn("sleeper", user::sleeper as *const () as u64, 0);
        }
        let p = &k.procs[0];
        k.current = 0;
        k.cr3 = p.pml4;
        (p.pml4, p.frame)
    });
    pvops::apic_enable();
    if bench::enabled() {
        pvops::write_cr3(pml4);
        bench::kernel(pml4);
        trap::enter_user(&frame)
    }
    (pvops::ops().timer_start)(TIMER_VECTOR as u8, TIMER_PERIOD_NS);
    Line::new()
        .s("demo: timer at 100 Hz (vector ")
        .x(TIMER_VECTOR)
        .s("), round-robin scheduler, entering user mode")
        .end();
    pvops::write_cr3(pml4);
    trap::enter_user(&frame)
}

/// A trap from user mode; on return `f` is the frame to resume.
pub fn trap(f: &mut Frame) {
    if KERNEL.with(|k| k.trap(f)) {
        schedule(f);
    }
}

/// A timer interrupt (from user mode, or in the idle loop).
pub fn tick() {
    KERNEL.with(|k| k.tick());
}

/// Saves the current process's frame (if it still exists) and loads the next
/// ready one, idling until there is one.
fn schedule(f: &mut Frame) {
    KERNEL.with(|k| {
        let cur = &mut k.procs[k.current];
        if cur.state != State::Free {
            cur.frame = *f;
        }
    });
    while !KERNEL.with(|k| k.pick(f)) {
        // Nothing ready: wait for the timer with no kernel state borrowed.
        pvops::halt();
    }
}

impl Kernel {
    fn spawn(&mut self, name: &str, entry: u64, arg: u64) {
        let Some(slot) = self.procs.iter().position(|p| p.state == State::Free) else {
            fatal("process table full");
        };
        let Some(pml4) = mm::new_space() else {
            fatal("out of memory");
        };
        let img = user::image();
        let mut ok = true;
        let mut va = img.start;
        while va < img.end {
            let nx = if va >= img.rodata { NX } else { 0 };
            ok &= mm::map(pml4, va, img.lma + (va - img.start), US | nx);
            va += PAGE;
        }
        for i in 1..=STACK_PAGES {
            ok &= match mm::alloc() {
                Some(frame) => mm::map(pml4, STACK_TOP - i * PAGE, frame, US | RW | NX | OWNED),
                None => false,
            };
        }
        if !ok {
            fatal("out of memory");
        }
        self.created += 1;
        self.alive += 1;
        let pid = self.created;
        self.procs[slot] = Process {
            pid,
            state: State::Ready,
            frame: Frame::user(entry, STACK_TOP - 8, arg),
            pml4,
            brk: HEAP_BASE,
            ..Process::FREE
        };
        Line::new()
            .s("demo: process ")
            .n(pid)
            .s(" (")
            .s(name)
            .s(") at ")
            .x(entry)
            .s(", address space ")
            .x(pml4)
            .end();
    }

    /// Handles a trap from the current process; true to reschedule.
    fn trap(&mut self, f: &mut Frame) -> bool {
        if self.complete_gate(f) {
            self.stats.gate_fixups += 1;
        }
        match f.vector {
            TIMER_VECTOR => {
                self.tick();
                true
            }
            SYSCALL_VECTOR | INT80_VECTOR => self.syscall(f),
            14 => self.page_fault(f),
            // `divzero`: step over the benchmark's division.
            0 if bench::enabled() && self.user_bytes_are(f.rip, &bench::DIV_RCX) => {
                f.rip += bench::DIV_RCX.len() as u64;
                false
            }
            SPURIOUS_VECTOR => false,
            v => {
                let pid = self.procs[self.current].pid;
                Line::new()
                    .s("demo: process ")
                    .n(pid)
                    .s(" killed: exception ")
                    .n(v)
                    .s(" (")
                    .s(trap::exception_name(v))
                    .s(") error ")
                    .x(f.error)
                    .s(" at rip ")
                    .x(f.rip)
                    .end();
                self.kill();
                true
            }
        }
    }

    /// Completes a system-call gate the host left half done, turning the
    /// frame into the one the gate should have produced. KVM on PVM hosts runs
    /// this kernel in PVM's non-PVM (bootstrap) mode, where user-mode `syscall`
    /// and `int n` go through KVM's instruction emulator: its SYSCALL cannot
    /// leave CPL 3 (RIP becomes LSTAR, RCX and R11 are set, RFLAGS masked, CS
    /// stays user: the fetch at LSTAR faults on the supervisor page), and it
    /// has no protected-mode INT n (KVM injects #UD at CPL > 0). On a CPU that
    /// runs the gates itself neither case arises.
    fn complete_gate(&self, f: &mut Frame) -> bool {
        if f.vector == vector::PF as u64
            && f.rip == trap::syscall_entry()
            && f.error & pf::FETCH as u64 != 0
        {
            f.rip = f.rcx;
            // RFLAGS as `syscall` saved it in R11, without IOPL or other
            // privileged bits (R11 is the user's here), with IF.
            f.rflags = (f.r11 & 0xcd5) | 0x202;
            f.vector = SYSCALL_VECTOR;
            f.error = 0;
            return true;
        }
        if f.vector == vector::UD as u64
            && self.user_byte(f.rip) == Some(0xcd)
            && self.user_byte(f.rip + 1) == Some(0x80)
        {
            f.rip += 2;
            f.vector = INT80_VECTOR;
            return true;
        }
        false
    }

    /// Whether the current process's memory at `va` holds `bytes`.
    fn user_bytes_are(&self, va: u64, bytes: &[u8]) -> bool {
        bytes
            .iter()
            .enumerate()
            .all(|(i, &b)| self.user_byte(va.wrapping_add(i as u64)) == Some(b))
    }

    /// A byte of the current process's memory, if mapped user-readable.
    fn user_byte(&self, va: u64) -> Option<u8> {
        let pa = mm::translate(self.cr3, va, false)?;
        // SAFETY: a user-readable frame of the process, RAM below 1 GiB and
        // therefore identity-mapped.
        Some(unsafe { (pa as *const u8).read_volatile() })
    }

    fn tick(&mut self) {
        pvops::timer_ack();
        self.ticks += 1;
        self.stats.timer_irqs += 1;
        for p in self.procs.iter_mut() {
            if let State::Sleeping(until) = p.state {
                if until <= self.ticks {
                    p.state = State::Ready;
                }
            }
        }
    }

    /// Loads the next ready process after the current one into `f`; false if
    /// none is ready. Ends the run when no process is left.
    fn pick(&mut self, f: &mut Frame) -> bool {
        for i in 1..=MAX_PROCS {
            let idx = (self.current + i) % MAX_PROCS;
            let p = &self.procs[idx];
            if p.state != State::Ready {
                continue;
            }
            *f = p.frame;
            if self.cr3 != p.pml4 {
                self.cr3 = p.pml4;
                pvops::write_cr3(p.pml4);
            }
            if idx != self.current {
                self.stats.switches += 1;
                self.current = idx;
            }
            return true;
        }
        if self.alive == 0 {
            self.finish();
        }
        if !self
            .procs
            .iter()
            .any(|p| matches!(p.state, State::Sleeping(_)))
        {
            fatal("deadlock: every process waits in recv");
        }
        false
    }

    fn syscall(&mut self, f: &mut Frame) -> bool {
        self.stats.syscalls += 1;
        if f.vector == INT80_VECTOR {
            self.stats.via_int80 += 1;
        }
        let (a, b, c) = (f.rdi, f.rsi, f.rdx);
        let cur = self.current;
        let r = match f.rax {
            sys::WRITE => self.write(a, b, c),
            sys::GETPID => self.procs[cur].pid as i64,
            sys::YIELD => {
                f.rax = 0;
                return true;
            }
            sys::SLEEP => {
                f.rax = 0;
                self.procs[cur].state = State::Sleeping(self.ticks + a.max(1));
                return true;
            }
            sys::EXIT => {
                self.exit(a as i64);
                return true;
            }
            sys::SBRK => self.sbrk(a as i64),
            sys::SEND => self.send(a, b),
            sys::RECV => {
                let p = &mut self.procs[cur];
                if p.queued == 0 {
                    p.state = State::Receiving;
                    return true;
                }
                let v = p.mailbox[p.head % MAILBOX];
                p.head = (p.head + 1) % MAILBOX;
                p.queued -= 1;
                v as i64
            }
            sys::TICKS => self.ticks as i64,
            sys::BENCH_PHASE if bench::enabled() => {
                bench::user_phase(a as u32, self.stats.gate_fixups);
                0
            }
            sys::BENCH_REPORT if bench::enabled() => {
                bench::user_report(a as u32, b, c);
                0
            }
            _ => ENOSYS,
        };
        f.rax = r as u64;
        false
    }

    /// write(fd 1 or 2, buf, len): copies from the process's memory by walking
    /// its page tables (pages not yet present are a fault: EFAULT).
    fn write(&mut self, fd: u64, buf: u64, len: u64) -> i64 {
        if fd != 1 && fd != 2 {
            return EBADF;
        }
        let pml4 = self.procs[self.current].pml4;
        let len = len.min(1 << 16);
        let mut done = 0;
        while done < len {
            let va = buf.wrapping_add(done);
            let Some(pa) = mm::translate(pml4, va, false) else {
                return if done > 0 { done as i64 } else { EFAULT };
            };
            let n = (len - done).min(PAGE - (va & (PAGE - 1)));
            // SAFETY: `pa..pa + n` lies in one user-readable frame of the
            // process, RAM below 1 GiB and therefore identity-mapped.
            let bytes = unsafe { core::slice::from_raw_parts(pa as *const u8, n as usize) };
            pvops::console_write(bytes);
            done += n;
        }
        done as i64
    }

    /// sbrk(increment): moves the break, returns the old one. Growing maps
    /// nothing (pages appear on first touch); shrinking frees whole pages.
    fn sbrk(&mut self, increment: i64) -> i64 {
        let p = &mut self.procs[self.current];
        let old = p.brk;
        let new = old.wrapping_add(increment as u64);
        if !(HEAP_BASE..=HEAP_LIMIT).contains(&new) {
            return ENOMEM;
        }
        let mut page = new.next_multiple_of(PAGE);
        while page < old {
            mm::unmap(p.pml4, page);
            page += PAGE;
        }
        p.brk = new;
        old as i64
    }

    fn send(&mut self, pid: u64, value: u64) -> i64 {
        let Some(t) = self
            .procs
            .iter_mut()
            .find(|p| p.state != State::Free && p.pid == pid)
        else {
            return ESRCH;
        };
        if t.state == State::Receiving {
            t.frame.rax = value;
            t.state = State::Ready;
        } else if t.queued == MAILBOX {
            return EAGAIN;
        } else {
            t.mailbox[(t.head + t.queued) % MAILBOX] = value;
            t.queued += 1;
        }
        0
    }

    /// Demand paging: a not-present fault inside [HEAP_BASE, brk) gets a
    /// zeroed frame; any other fault kills the process.
    fn page_fault(&mut self, f: &Frame) -> bool {
        let addr = (pvops::ops().read_cr2)();
        self.stats.pagefaults += 1;
        let p = &self.procs[self.current];
        if f.error & 1 == 0 && bench::resolve_fault(p.pml4, addr) {
            return false;
        }
        if f.error & 1 == 0 && (HEAP_BASE..p.brk).contains(&addr) {
            if let Some(frame) = mm::alloc() {
                if mm::map(p.pml4, addr & !(PAGE - 1), frame, US | RW | NX | OWNED) {
                    self.stats.demand_paged += 1;
                    return false;
                }
                mm::free(frame);
            }
            Line::new()
                .s("demo: process ")
                .n(p.pid)
                .s(" killed: out of memory at ")
                .x(addr)
                .end();
        } else {
            let mut l = Line::new();
            l.s("demo: process ")
                .n(p.pid)
                .s(" killed: page fault at ")
                .x(addr)
                .s(" (error ")
                .x(f.error)
                .s(", rip ")
                .x(f.rip)
                .s("): ");
            if f.error & 1 != 0 {
                l.s("protection violation").end();
            } else {
                l.s("outside its heap [")
                    .x(HEAP_BASE)
                    .s(", ")
                    .x(p.brk)
                    .s(")")
                    .end();
            }
        }
        self.kill();
        true
    }

    fn kill(&mut self) {
        self.stats.killed += 1;
        self.release(KILLED);
    }

    fn exit(&mut self, code: i64) {
        if code != 0 {
            self.stats.failed += 1;
        }
        self.release(code);
    }

    /// Ends the current process: leaves and frees its address space.
    fn release(&mut self, code: i64) {
        let kernel = mm::kernel_pml4();
        let p = &mut self.procs[self.current];
        Line::new()
            .s("demo: process ")
            .n(p.pid)
            .s(" exited with ")
            .i(code)
            .end();
        pvops::write_cr3(kernel);
        self.cr3 = kernel;
        mm::free_space(p.pml4);
        *p = Process::FREE;
        self.alive -= 1;
    }

    fn finish(&mut self) -> ! {
        let s = self.stats;
        let leaked = mm::frames_in_use() - self.kernel_frames;
        Line::new()
            .s("demo: ticks=")
            .n(self.ticks)
            .s(" context_switches=")
            .n(s.switches)
            .s(" syscalls_via_syscall=")
            .n(s.syscalls - s.via_int80)
            .s(" syscalls_via_int80=")
            .n(s.via_int80)
            .s(" demand_paged=")
            .n(s.demand_paged)
            .s(" killed=")
            .n(s.killed)
            .s(" failed=")
            .n(s.failed)
            .s(" frames_leaked=")
            .n(leaked)
            .s(" gate_fixups=")
            .n(s.gate_fixups)
            .end();
        let ops = pvops::ops();
        Line::new()
            .s("demo: done processes=")
            .n(self.created)
            .s(" syscalls=")
            .n(s.syscalls)
            .s(" pagefaults=")
            .n(s.pagefaults)
            .s(" timer_irqs=")
            .n(s.timer_irqs)
            .s(" mode=")
            .s(ops.mode)
            .end();
        if s.failed != 0 || leaked != 0 {
            fail(4);
        }
        (ops.shutdown)(0)
    }
}
