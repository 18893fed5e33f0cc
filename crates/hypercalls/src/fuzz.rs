//! Fuzzing harness of the hypercall service: arbitrary bytes become a
//! guest's hypercalls (numbers, argument registers, the stack pointer) and the
//! memory they point at (multicall batches, trap tables, page-table updates,
//! descriptors), on a fresh service and a fresh guest of 1 MiB + 64 KiB each
//! time. Whatever the bytes are, the service must not panic, must return
//! only the results docs/hypercalls.md allows, must not touch state a failed
//! call may not touch, and must tell the engine of every byte of guest
//! memory it writes.
//!
//! [`hypercall_args`] is the one harness: the cargo-fuzz target
//! (fuzz/fuzz_targets/hypercall_args.rs) calls it under libFuzzer, and
//! crates/hypercalls/tests/hypercall_args.rs calls it on pseudo-random inputs
//! so that `cargo test` exercises it on stable Rust.
//!
//! The input is a flags byte, then operations until the input ends (at most
//! [`MAX_OPS`]):
//!
//! | flags bit | meaning |
//! |---|---|
//! | 0 | the engine offers the PV extension (`set_callbacks` works) |
//! | 1 | the engine delivers vectors (`event_channel_op` can bind) |
//! | 2 | the ABI is advertised (`set_hypercall_page` works) |
//!
//! | operation (byte % 8) | what |
//! |---|---|
//! | 0 | up to 255 bytes of the input into the data window |
//! | 1 | records into the data window: 0-8 GDT descriptors, `mmu_update` requests or multicall entries |
//! | 2 | 1-16 argument values as 64-bit words into the data window |
//! | 3 | a write of the hypercall-page MSR |
//! | 4-7 | a hypercall; on 7 with a new stack pointer |
//!
//! A hypercall's arguments are mostly of the kind its ABI expects (a pointer
//! into the data window, a count, a command, a selector, a vector, a
//! timeout, a page), and mostly what it reads is written first (the
//! descriptors of `set_gdt`, the requests of `mmu_update`, the batch of
//! `multicall`, the frame of `iret`), so that the success paths are
//! reached. A quarter of the arguments, and the words of operation 2, come
//! from classes that attack the checks: small numbers, values just below
//! 2^64 (0xffff_ffff_ffff_fff0 among them), values at the end of guest RAM
//! and of the boot identity map, pointers into the data window and the page
//! tables, PTE-shaped values, the edges of the canonical range, and raw
//! 64-bit words.

use std::time::Duration;

use hypercall::{errno, nr};
use machine::GuestMemory;
use vcpu::Regs;
use vm_memory::{Bytes, GuestAddress};

use crate::double::{LineVm, RegisterVcpu, SyscallMsrs};
use crate::{After, Hypercalls};

/// The data window the input writes, and where its pointers mostly point.
pub const DATA: u64 = 0x10_0000;
/// Size of the data window.
pub const WINDOW: u64 = 0x1_0000;
/// Guest RAM of each input: the boot structures, the PV IDT page, the data
/// window at its end.
pub const RAM: u64 = DATA + WINDOW;
/// Operations one input may make.
pub const MAX_OPS: usize = 64;
/// RIP at each hypercall: not canonical, so no successful `iret` leaves it.
const CALLER_RIP: u64 = 0x8000_0000_0000_0000;

/// Result classes of [`Report::outcomes`].
pub mod class {
    /// A result of zero or more.
    pub const OK: usize = 0;
    /// -EFAULT.
    pub const EFAULT: usize = 1;
    /// -EINVAL.
    pub const EINVAL: usize = 2;
    /// -ENOSYS.
    pub const ENOSYS: usize = 3;
    /// Any other negative value (`get_cr2` of a high address, a successful
    /// `iret` restoring a negative RAX).
    pub const OTHER: usize = 4;
}

/// Slots of [`Report::outcomes`]: one per hypercall, then one for every
/// other number.
pub const SLOTS: usize = nr::COUNT as usize + 1;

/// What one input did.
#[derive(Debug, Default)]
pub struct Report {
    /// Hypercalls made (multicall entries not counted).
    pub calls: u64,
    /// Results by number (the last slot: unknown numbers) and [`class`].
    pub outcomes: [[u64; 5]; SLOTS],
    /// The input ended with `sched_op(SHUTDOWN)`.
    pub shutdown: bool,
    /// TLB flushes the service asked of the vCPU.
    pub flushes: u64,
    /// Broken rules: what the service did that it may not. Empty unless the
    /// service has a bug.
    pub violations: Vec<String>,
}

/// The input, read front to back; zeros once it is used up.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(std::array::from_fn(|_| self.byte()))
    }

    /// A hypercall number: mostly valid ones and their neighbours, sometimes
    /// a raw 64-bit value (high bits in RAX are ignored by the ABI).
    fn number(&mut self) -> u64 {
        let b = self.byte();
        if b < 0xf0 {
            (b % (nr::COUNT as u8 + 2)) as u64
        } else {
            self.u64()
        }
    }

    /// An argument value from the hostile classes.
    fn arg(&mut self) -> u64 {
        let class = self.byte();
        let b = self.byte() as u64;
        match class % 13 {
            // Commands, kinds, flags, small counts.
            0 => b & 3,
            1 => b,
            2 => u64::MAX - b,
            // 16-byte aligned from 0xffff_ffff_ffff_fff0 down.
            3 => (u64::MAX - 0xf) - (b << 4),
            4 => RAM - b,
            // An array element size before the end of RAM.
            5 => RAM - [8, 16, 56][b as usize % 3] * (1 + (b >> 2) % 4),
            6 => self.pointer(),
            7 => DATA + (b << 3),
            8 => self.u64(),
            9 => self.table_entry(),
            10 => self.pte(),
            11 => [0x7fff_ffff_f000u64, 0xffff_8000_0000_0000, 0x8000_0000_0000][b as usize % 3]
                .wrapping_add(b >> 2),
            _ => abi::BOOT_IDENTITY_MAPPED - b,
        }
    }

    /// An 8-byte aligned pointer into the data window: mostly the start of
    /// one of its 16 pages, so that what one operation writes is what a
    /// later hypercall reads.
    fn pointer(&mut self) -> u64 {
        let b = self.byte() as u64;
        if b < 0xc0 {
            DATA + (b % 16) * 0x1000
        } else {
            DATA + ((self.u16() as u64 % WINDOW) & !7)
        }
    }

    /// The address of an entry of the boot page tables.
    fn table_entry(&mut self) -> u64 {
        abi::BOOT_PML4 + ((self.u16() as u64) << 3) % 0x6000
    }

    /// A PTE: a frame (in RAM or not), low flag bits.
    fn pte(&mut self) -> u64 {
        let b = self.byte() as u64;
        ((self.u16() as u64) << 12) | (b & 0x87)
    }

    /// An argument of `kind`: three times in four a value of that kind.
    fn typed(&mut self, kind: Kind) -> u64 {
        let b = self.byte();
        if b >= 0xc0 {
            return self.arg();
        }
        let c = self.byte() as u64;
        match kind {
            Kind::Pointer => self.pointer(),
            Kind::Count if b & 1 != 0 => c,
            Kind::Count => c % 10,
            Kind::Command => c % 4,
            Kind::Selector => c & 0x78,
            Kind::Vector => c,
            Kind::Nanos => c << (b % 24),
            // The boot tables, or a page of the data window (as a
            // hypercall-page value, enabled when odd).
            Kind::Page if b & 2 != 0 => abi::BOOT_PML4,
            Kind::Page => DATA + ((c % 16) << 12) + (b & 1) as u64,
            Kind::Address => [DATA, 0xffff_8000_0000_0000, 0x7fff_ffff_f000][b as usize % 3] + c,
            Kind::Value => self.u64(),
        }
    }

    /// The five arguments of hypercall `n`.
    fn args(&mut self, n: u64) -> [u64; 5] {
        use Kind::*;
        let kinds = match n {
            nr::SET_TRAP_TABLE | nr::MMU_UPDATE | nr::MULTICALL => [Pointer, Count],
            nr::CONSOLE_IO => [Command, Pointer],
            nr::NEW_BASEPTR | nr::SET_HYPERCALL_PAGE => [Page, Value],
            nr::STACK_SWITCH => [Selector, Address],
            nr::SCHED_OP => [Command, Value],
            nr::SET_TIMER_OP => [Nanos, Value],
            nr::EVENT_CHANNEL_OP => [Command, Command],
            nr::SET_GDT => [Pointer, Count],
            nr::SET_CALLBACKS => [Command, Address],
            _ => [Value, Value],
        };
        let third = match n {
            nr::CONSOLE_IO => Count,
            nr::EVENT_CHANNEL_OP => Vector,
            nr::SET_GDT => Selector,
            _ => Value,
        };
        let [a, b] = kinds;
        [a, b, third, Value, Value].map(|k| self.typed(k))
    }

    /// `count` records of `kind` (one frame), as 64-bit words.
    fn records(&mut self, kind: Record, count: u64) -> Vec<u64> {
        let mut words = Vec::new();
        match kind {
            Record::Descriptors => words.extend((0..count).map(|_| self.descriptor())),
            Record::Requests => {
                for _ in 0..count {
                    words.extend([self.table_entry(), self.pte()]);
                }
            }
            Record::Batch => {
                for _ in 0..count {
                    let n = self.number();
                    words.push(n);
                    words.extend(self.args(n));
                    words.push(self.u64());
                }
            }
            Record::Frame => {
                let cs = [0x08, 0x10, 0x23, 0x1b][self.byte() as usize % 4];
                let ss = [0, 0x18, 0x1b, 0x13][self.byte() as usize % 4];
                let (ret, rax) = (self.u64(), self.u64());
                let rip = self.typed(Kind::Address);
                words.extend([ret, rax, rip, cs, self.u64(), self.u64(), ss]);
            }
        }
        words
    }

    /// A GDT entry: the kinds `set_gdt` and `iret` tell apart.
    fn descriptor(&mut self) -> u64 {
        const KINDS: [u64; 9] = [
            0,
            0x00af_9a00_0000_ffff, // 64-bit kernel code
            0x00cf_9200_0000_ffff, // kernel data
            0x00af_fa00_0000_ffff, // 64-bit user code
            0x00cf_f200_0000_ffff, // user data
            0x00cf_9a00_0000_ffff, // 32-bit code
            0x0000_8900_0000_0067, // 64-bit TSS, lower half
            0x0000_8c00_0010_0000, // call gate
            0x0000_8200_0000_ffff, // LDT
        ];
        let b = self.byte() as usize;
        match KINDS.get(b % 12) {
            Some(d) => *d,
            None => self.arg(),
        }
    }
}

/// What the memory a hypercall reads holds, for [`Input::records`].
#[derive(Clone, Copy)]
enum Record {
    /// GDT entries (`set_gdt`).
    Descriptors,
    /// `MmuUpdate`s: an entry of the page tables and a PTE.
    Requests,
    /// `MulticallEntry`s.
    Batch,
    /// An `iret` frame: return address, RAX, RIP, CS, RFLAGS, RSP, SS.
    Frame,
}

/// What a hypercall argument is, for [`Input::typed`].
#[derive(Clone, Copy)]
enum Kind {
    Pointer,
    Count,
    Command,
    Selector,
    Vector,
    Nanos,
    Page,
    Address,
    Value,
}

/// Runs one input; see the module documentation.
pub fn hypercall_args(data: &[u8]) -> Report {
    let mut report = Report::default();
    let Some((&flags, rest)) = data.split_first() else {
        return report;
    };
    let mut input = Input(rest);
    let mem = match GuestMemory::from_ranges(&[(GuestAddress(0), RAM as usize)]) {
        Ok(m) => m,
        Err(e) => {
            report.violations.push(format!("no guest memory: {e}"));
            return report;
        }
    };
    let sregs = match machine::boot::long_mode(&mem) {
        Ok(s) => s,
        Err(e) => {
            report.violations.push(format!("no boot state: {e}"));
            return report;
        }
    };
    let mut vcpu = RegisterVcpu {
        regs: Regs {
            rsp: DATA + WINDOW / 2,
            rflags: 2,
            ..Default::default()
        },
        sregs,
        syscall: (flags & 1 != 0).then(SyscallMsrs::default),
        ..Default::default()
    };
    let mut snapshots = [vec![0u8; RAM as usize], vec![0u8; RAM as usize]];
    let vm = LineVm {
        vectors: flags & 2 != 0,
        ..Default::default()
    };
    let mut hc = Hypercalls::new(
        flags & 4 != 0,
        hypercall::port_io_stub,
        Box::new(std::io::sink()),
    );
    hc.set_max_block(Duration::ZERO);
    for _ in 0..MAX_OPS {
        if input.0.is_empty() || report.shutdown {
            break;
        }
        let op = input.byte();
        match op % 8 {
            0 => {
                let at = DATA + input.u16() as u64 % WINDOW;
                let len = (input.byte() as usize).min(input.0.len());
                let (bytes, rest) = input.0.split_at(len);
                input.0 = rest;
                // Bytes past the window's end (the end of RAM) are dropped.
                let _ = mem.write_slice(bytes, GuestAddress(at));
            }
            1 => {
                let at = input.pointer();
                let (kind, count) = (input.byte(), input.byte() as u64 % 9);
                let record =
                    [Record::Descriptors, Record::Requests, Record::Batch][kind as usize % 3];
                let words = input.records(record, count);
                put_words(&mem, at, words);
            }
            2 => {
                let at = input.pointer();
                let count = 1 + input.byte() % 16;
                let words: Vec<u64> = (0..count).map(|_| input.arg()).collect();
                put_words(&mem, at, words);
            }
            3 => {
                let page = hc.page();
                let value = input.typed(Kind::Page);
                let ok = hc.set_page(&mem, value);
                let expect_page = match (value & 1, ok) {
                    (0, _) => None,
                    (_, true) => Some(value & !0xfff),
                    (_, false) => page,
                };
                if !ok && value & 1 == 0 || hc.page() != expect_page {
                    report.violations.push(format!(
                        "hypercall-page MSR write {value:#x}: ok {ok}, page {:?}",
                        hc.page()
                    ));
                }
            }
            _ => {
                if op % 8 == 7 {
                    vcpu.regs.rsp = match input.byte() % 2 {
                        0 => input.pointer(),
                        _ => input.arg(),
                    };
                }
                vcpu.regs.rip = CALLER_RIP;
                vcpu.regs.rax = input.number();
                let n = vcpu.regs.rax & 0xffff_ffff;
                let [a0, a1, a2, a3, a4] = input.args(n);
                let r = &mut vcpu.regs;
                (r.rdi, r.rsi, r.rdx, r.r10, r.r8) = (a0, a1, a2, a3, a4);
                // Mostly, what the call reads is there: the records its
                // pointer argument points at, `iret`'s frame on the stack.
                let record = match n {
                    nr::SET_GDT => Some((a0, Record::Descriptors)),
                    nr::MMU_UPDATE => Some((a0, Record::Requests)),
                    nr::MULTICALL => Some((a0, Record::Batch)),
                    nr::IRET => Some((vcpu.regs.rsp, Record::Frame)),
                    _ => None,
                };
                if let Some((at, record)) = record.filter(|_| input.byte() < 0xc0) {
                    let words = input.records(record, a1.min(8));
                    put_words(&mem, at, words);
                }
                let guest = (&mem, &mut vcpu, &vm);
                one_call(guest, &mut hc, &mut snapshots, &mut report);
            }
        }
    }
    report.flushes = vcpu.flushes;
    // Dropping the service ends its timer thread (a hang here is a bug too).
    drop(hc);
    report
}

/// Writes `words` at guest-physical `at` on, as far as RAM (and 2^64) goes.
fn put_words(mem: &GuestMemory, at: u64, words: impl IntoIterator<Item = u64>) {
    for (i, w) in words.into_iter().enumerate() {
        let Some(a) = at.checked_add(8 * i as u64) else {
            return;
        };
        let _ = mem.write_obj(w, GuestAddress(a));
    }
}

/// One hypercall from the registers in `vcpu`, checked against the ABI.
/// `snapshots` are two buffers of the size of guest RAM, for the memory
/// before and after the call.
fn one_call(
    (mem, vcpu, vm): (&GuestMemory, &mut RegisterVcpu, &LineVm),
    hc: &mut Hypercalls,
    snapshots: &mut [Vec<u8>; 2],
    report: &mut Report,
) {
    let (regs, sregs, flushes) = (vcpu.regs, vcpu.sregs, vcpu.flushes);
    vcpu.written.clear();
    let _ = mem.read_slice(&mut snapshots[0], GuestAddress(0));
    let n = regs.rax & 0xffff_ffff;
    let args = [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8];
    let counted = hc.counts.get(n as usize).copied();
    report.calls += 1;
    let call = match hc.call(mem, vcpu, vm) {
        Ok(c) => c,
        Err(e) => {
            report
                .violations
                .push(format!("hypercall {n} {args:#x?}: error {e}"));
            return;
        }
    };
    let r = vcpu.regs.rax as i64;
    let class = match -r {
        errno::EFAULT => class::EFAULT,
        errno::EINVAL => class::EINVAL,
        errno::ENOSYS => class::ENOSYS,
        _ if r >= 0 => class::OK,
        _ => class::OTHER,
    };
    report.outcomes[(n as usize).min(SLOTS - 1)][class] += 1;
    let mut bad = Vec::new();
    if call.number != n {
        bad.push(format!("reported number {}", call.number));
    }
    let shutdown = n == nr::SCHED_OP && args[0] == hypercall::sched::SHUTDOWN;
    match call.after {
        After::Shutdown(code) if shutdown && code == args[1] => report.shutdown = true,
        After::BenchPhase(p) if n == nr::BENCH_PHASE && p == args[0] as u32 => {}
        After::Resume if !shutdown && n != nr::BENCH_PHASE => {}
        ref a => bad.push(format!("{a:?}")),
    }
    if counted.is_some_and(|c| hc.counts[n as usize] <= c) {
        bad.push("not counted".into());
    }
    let iret_done = n == nr::IRET && vcpu.regs.rip != regs.rip;
    // Only `iret` moves the guest; only `iret` and `set_event_mask` change
    // more registers than RAX.
    let expect_regs = Regs {
        rax: vcpu.regs.rax,
        rflags: if n == nr::SET_EVENT_MASK {
            vcpu.regs.rflags
        } else {
            regs.rflags
        },
        ..regs
    };
    if !iret_done && vcpu.regs != expect_regs {
        bad.push(format!("registers changed: {}", vcpu.regs));
    }
    if iret_done && vcpu.regs.rflags & !0x3f_7fd5 != 2 {
        bad.push(format!("iret to rflags {:#x}", vcpu.regs.rflags));
    }
    if n == nr::SET_EVENT_MASK {
        let masked = vcpu.regs.rflags & (1 << 9) == 0;
        if masked != (args[0] != 0) || r != (regs.rflags & (1 << 9) == 0) as i64 {
            bad.push(format!("event mask {:#x}", vcpu.regs.rflags));
        }
    }
    // The results each hypercall may give.
    let allowed = match n {
        nr::GET_CR2 => r == sregs.cr2 as i64,
        nr::IRET => iret_done || class == class::EFAULT || class == class::EINVAL,
        nr::VERSION => r == hypercall::VERSION as i64,
        nr::SET_EVENT_MASK => r == 0 || r == 1,
        nr::CONSOLE_IO => {
            (0..=1 << 16).contains(&r) || class == class::EFAULT || class == class::EINVAL
        }
        nr::MMU_UPDATE => r >= 0 && r as u64 <= args[1].min(1 << 20),
        nr::SET_TIMER_OP | nr::BENCH_PHASE => r == 0,
        nr::SET_TRAP_TABLE | nr::MULTICALL | nr::SET_GDT | nr::STACK_SWITCH => {
            r == 0 || class == class::EFAULT || class == class::EINVAL
        }
        nr::EVENT_CHANNEL_OP | nr::SET_CALLBACKS => {
            r == 0 || class == class::EINVAL || class == class::ENOSYS
        }
        nr::NEW_BASEPTR | nr::SCHED_OP => r == 0 || class == class::EINVAL,
        nr::SET_HYPERCALL_PAGE => {
            r == 0 || class == class::EINVAL || (!hc.advertised && class == class::ENOSYS)
        }
        _ => class == class::ENOSYS,
    };
    if !allowed {
        bad.push(format!("result {r:#x}"));
    }
    // A TLB flush follows applied page-table updates, and nothing else.
    let flushed = vcpu.flushes - flushes;
    let expect_flush = match n {
        nr::MMU_UPDATE => Some((r > 0) as u64),
        nr::MULTICALL => None,
        _ => Some(0),
    };
    if expect_flush.is_some_and(|f| f != flushed) {
        bad.push(format!("{flushed} TLB flushes"));
    }
    // A failed hypercall leaves the system registers alone, and so do those
    // that have none to change (a multicall's entries may have succeeded).
    let changes_sregs = matches!(
        n,
        nr::SET_TRAP_TABLE | nr::NEW_BASEPTR | nr::SET_GDT | nr::SET_CALLBACKS | nr::IRET
    );
    let failed = class != class::OK && n != nr::GET_CR2 && !iret_done;
    if n != nr::MULTICALL && (failed || !changes_sregs) && vcpu.sregs != sregs {
        bad.push(format!("system registers changed: {}", vcpu.sregs));
    }
    // Every byte the call changed lies in a range it reported written.
    let _ = mem.read_slice(&mut snapshots[1], GuestAddress(0));
    let [before, after] = &*snapshots;
    let pages = before.chunks(0x1000).zip(after.chunks(0x1000));
    for (p, (b, a)) in pages.enumerate().filter(|(_, (b, a))| b != a) {
        let base = p as u64 * 0x1000;
        let unreported = (b.iter().zip(a.iter()).enumerate())
            .find(|(i, (x, y))| x != y && !vcpu.reported(base + *i as u64, 1));
        if let Some((i, _)) = unreported {
            bad.push(format!(
                "wrote {:#x} without telling the engine",
                base + i as u64
            ));
        }
    }
    if !bad.is_empty() {
        report.violations.push(format!(
            "hypercall {n} args {args:#x?} rsp {:#x}: {}",
            regs.rsp,
            bad.join("; ")
        ));
    }
}
