//! Every hypercall's success and error paths, on a vCPU without a CPU
//! ([`crate::double`]) and 16 MiB of guest RAM in visor's long-mode boot state
//! (the first 4 GiB identity-mapped with 2 MiB pages). [`T::map_top`] maps
//! the last 2 MiB of the address space too, so that arguments near 2^64
//! translate and only the arithmetic can fail.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hypercall::{callback, console, event, sched};
use machine::devices::Capture;

use super::*;
use crate::double::{CountingLine, LineVm, RegisterVcpu, SyscallMsrs};

const RAM: u64 = 16 << 20;
const DATA: u64 = 0x20_0000;
const STACK: u64 = 0x30_0000;
const GDT: u64 = 0x30_8000;
/// New page tables: the top mapping's, and a second PML4.
const TABLES: u64 = 0x50_0000;
/// What the last 2 MiB of the address space map to.
const TOP_FRAME: u64 = 0x60_0000;
const TOP: u64 = 0xffff_ffff_ffe0_0000;
/// The pointer of issue 11: 16 bytes below 2^64.
const NEAR_TOP: u64 = 0xffff_ffff_ffff_fff0;
/// Beyond the boot identity map: translates nowhere.
const UNMAPPED: u64 = 5 << 30;
const IF: u64 = 1 << 9;

/// A service, a guest and its vCPU.
struct T {
    mem: GuestMemory,
    vcpu: RegisterVcpu,
    vm: LineVm,
    hc: Hypercalls,
    console: Capture,
}

impl T {
    fn new() -> T {
        let mem = machine::MemoryLayout::new(RAM).unwrap().create().unwrap();
        let sregs = machine::boot::long_mode(&mem).unwrap();
        let console = Capture::default();
        T {
            vcpu: RegisterVcpu {
                regs: Regs {
                    rip: 0x10_0000,
                    rsp: STACK,
                    rflags: 2 | IF,
                    ..Default::default()
                },
                sregs,
                ..Default::default()
            },
            mem,
            vm: LineVm {
                vectors: true,
                ..Default::default()
            },
            hc: Hypercalls::new(true, hypercall::port_io_stub, Box::new(console.clone())),
            console,
        }
    }

    /// A deprivileged kernel's engine (the PV extension).
    fn pv() -> T {
        let mut t = T::new();
        t.vcpu.syscall = Some(SyscallMsrs::default());
        t
    }

    /// Hypercall `n` with `args` (the rest 0): RAX and what comes next.
    fn call_after(&mut self, n: u64, args: &[u64]) -> (i64, After) {
        let mut a = [0u64; 5];
        a[..args.len()].copy_from_slice(args);
        let r = &mut self.vcpu.regs;
        (r.rax, r.rdi, r.rsi, r.rdx, r.r10, r.r8) = (n, a[0], a[1], a[2], a[3], a[4]);
        let call = self.hc.call(&self.mem, &mut self.vcpu, &self.vm).unwrap();
        assert_eq!(call.number, n & 0xffff_ffff);
        (self.vcpu.regs.rax as i64, call.after)
    }

    /// Hypercall `n`, which does not stop the VM: RAX.
    fn call(&mut self, n: u64, args: &[u64]) -> i64 {
        let (r, after) = self.call_after(n, args);
        assert_eq!(after, After::Resume);
        r
    }

    fn put(&self, gpa: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(gpa)).unwrap();
    }

    fn get(&self, gpa: u64) -> u64 {
        self.mem.read_obj(GuestAddress(gpa)).unwrap()
    }

    /// Maps the last 2 MiB of the address space to TOP_FRAME.
    fn map_top(&self) {
        let (pdpt, pd) = (TABLES, TABLES + 0x1000);
        self.put(abi::BOOT_PML4 + 511 * 8, pdpt | 3);
        self.put(pdpt + 511 * 8, pd | 3);
        self.put(pd + 511 * 8, TOP_FRAME | 0x83);
    }
}

/// Where top-half address `va` lies after [`T::map_top`].
fn top_pa(va: u64) -> u64 {
    TOP_FRAME + (va - TOP)
}

fn trap_info(vector: u8, flags: u8, address: u64) -> [u64; 2] {
    [
        vector as u64 | (flags as u64) << 8 | (abi::SEL_CODE64 as u64) << 16,
        address,
    ]
}

#[test]
fn abi_structures_have_the_abi_layout() {
    use std::mem::size_of;
    assert_eq!(size_of::<Wire<TrapInfo>>(), 16);
    assert_eq!(size_of::<Wire<MmuUpdate>>(), 16);
    assert_eq!(size_of::<Wire<MulticallEntry>>(), 56);
    assert_eq!(MULTICALL_RESULT, 48);
}

#[test]
fn hypercall_page_msr() {
    let mut t = T::new();
    assert!(t.hc.set_page(&t.mem, DATA | 1));
    assert_eq!(t.hc.page(), Some(DATA));
    let mut page = [0u8; 0x1000];
    t.mem.read_slice(&mut page, GuestAddress(DATA)).unwrap();
    for n in 0..nr::COUNT as usize {
        let at = n * STUB_SIZE;
        assert_eq!(page[at..at + STUB_SIZE], hypercall::port_io_stub(n as u32));
    }
    assert!(page[nr::COUNT as usize * STUB_SIZE..]
        .iter()
        .all(|&b| b == 0xcc));
    // Disabled, then refused outside RAM and at the top of the address space.
    assert!(t.hc.set_page(&t.mem, DATA));
    assert_eq!(t.hc.page(), None);
    assert!(!t.hc.set_page(&t.mem, RAM | 1));
    assert!(!t.hc.set_page(&t.mem, u64::MAX));
    assert_eq!(t.hc.page(), None);
}

#[test]
fn set_hypercall_page() {
    let mut t = T::new();
    assert_eq!(t.call(nr::SET_HYPERCALL_PAGE, &[DATA | 1]), 0);
    assert_eq!(t.hc.page(), Some(DATA));
    assert_eq!(t.call(nr::SET_HYPERCALL_PAGE, &[RAM | 1]), EINVAL);
    assert_eq!(t.call(nr::SET_HYPERCALL_PAGE, &[u64::MAX]), EINVAL);
    assert_eq!(t.hc.page(), Some(DATA));
    // Not advertised (`--no-pv`): no such hypercall.
    t.hc.advertised = false;
    assert_eq!(t.call(nr::SET_HYPERCALL_PAGE, &[DATA | 1]), ENOSYS);
}

#[test]
fn version_and_unknown_numbers() {
    let mut t = T::new();
    assert_eq!(t.call(nr::VERSION, &[]), hypercall::VERSION as i64);
    // The number is RAX's low half.
    assert_eq!(
        t.call(0xdead_beef_0000_0000 | nr::VERSION, &[]),
        hypercall::VERSION as i64
    );
    for n in [nr::COUNT, 0x7777, 0xffff_ffff, u64::MAX] {
        assert_eq!(t.call(n, &[u64::MAX; 5]), ENOSYS, "{n:#x}");
    }
    assert_eq!(t.hc.counts[nr::VERSION as usize], 2);
}

#[test]
fn set_trap_table() {
    let mut t = T::new();
    let handler = 0xffff_8000_1234_5678u64;
    let entries = [trap_info(14, 4, handler), trap_info(0x80, 3, 0x40_1000)];
    for (i, e) in entries.iter().enumerate() {
        t.put(DATA + 16 * i as u64, e[0]);
        t.put(DATA + 16 * i as u64 + 8, e[1]);
    }
    assert_eq!(t.call(nr::SET_TRAP_TABLE, &[DATA, 2]), 0);
    assert_eq!(
        t.vcpu.sregs.idt,
        vcpu::DescriptorTable {
            base: PV_IDT,
            limit: 0xfff
        }
    );
    // #PF: a present DPL-0 interrupt gate; 0x80: a DPL-3 trap gate.
    let pf = Segment::from_descriptor(0, t.get(PV_IDT + 14 * 16));
    assert_eq!((pf.type_, pf.present, pf.dpl, pf.s), (0xe, true, 0, false));
    let lo = t.get(PV_IDT + 14 * 16);
    assert_eq!(lo & 0xffff | (lo >> 48) << 16, handler & 0xffff_ffff);
    assert_eq!(t.get(PV_IDT + 14 * 16 + 8), handler >> 32);
    assert_eq!((lo >> 16) & 0xffff, abi::SEL_CODE64 as u64);
    let int80 = Segment::from_descriptor(0, t.get(PV_IDT + 0x80 * 16));
    assert_eq!((int80.type_, int80.present, int80.dpl), (0xf, true, 3));
    assert_eq!(t.call(nr::SET_TRAP_TABLE, &[DATA, 0]), 0, "an empty table");

    t.vcpu.sregs.idt = vcpu::DescriptorTable::default();
    let before_idt = t.vcpu.sregs;
    assert_eq!(t.call(nr::SET_TRAP_TABLE, &[DATA, 257]), EINVAL);
    assert_eq!(t.call(nr::SET_TRAP_TABLE, &[UNMAPPED, 1]), EFAULT);
    assert_eq!(t.call(nr::SET_TRAP_TABLE, &[RAM - 8, 1]), EFAULT);
    // Entry 0 at 2^64 - 16 is readable; entry 1 would lie at 2^64.
    t.map_top();
    t.put(top_pa(NEAR_TOP), entries[0][0]);
    t.put(top_pa(NEAR_TOP) + 8, entries[0][1]);
    assert_eq!(t.call(nr::SET_TRAP_TABLE, &[NEAR_TOP, 1]), 0);
    t.vcpu.sregs = before_idt;
    assert_eq!(t.call(nr::SET_TRAP_TABLE, &[NEAR_TOP, 2]), EFAULT);
    assert_eq!(t.call(nr::SET_TRAP_TABLE, &[NEAR_TOP, 256]), EFAULT);
    assert_eq!(t.vcpu.sregs, before_idt, "a failed call loads no IDT");
}

#[test]
fn mmu_update() {
    let mut t = T::new();
    // Map 1 GiB (PD 1, entry 0) to 6 MiB, then unmap it again.
    let pde = abi::BOOT_PD + 0x1000;
    for (i, (ptr, val)) in [(pde, 0x60_0000 | 0x83), (pde, 0)].iter().enumerate() {
        t.put(DATA + 16 * i as u64, *ptr);
        t.put(DATA + 16 * i as u64 + 8, *val);
    }
    assert_eq!(t.call(nr::MMU_UPDATE, &[DATA, 1]), 1);
    assert_eq!(t.get(pde), 0x60_0083);
    assert_eq!(t.vcpu.flushes, 1, "a flush after the batch");
    assert_eq!(t.call(nr::MMU_UPDATE, &[DATA, 2]), 2);
    assert_eq!(t.get(pde), 0);
    assert_eq!(t.vcpu.flushes, 2, "one flush per batch");

    // The batch stops at the first invalid request: each of these comes
    // after a valid one, and before an invalid one.
    t.put(DATA + 32, RAM);
    for (ptr, val) in [
        (RAM, 0),                     // the entry outside RAM
        (pde + 4, 0),                 // misaligned
        (pde, (1u64 << 40) | 3),      // maps a frame outside RAM
        (pde, (RAM - 0x1000) | 0x83), // a frame at the end of RAM: valid
        (u64::MAX - 7, 0),            // the entry at the top of the address space
    ] {
        t.put(DATA + 16, ptr);
        t.put(DATA + 24, val);
        let applied = t.call(nr::MMU_UPDATE, &[DATA, 3]);
        let valid = val == (RAM - 0x1000) | 0x83;
        assert_eq!(applied, 1 + valid as i64, "{ptr:#x} {val:#x}");
    }
    let flushes = t.vcpu.flushes;
    assert_eq!(t.call(nr::MMU_UPDATE, &[DATA, 0]), 0);
    assert_eq!(t.call(nr::MMU_UPDATE, &[UNMAPPED, 1]), 0);
    assert_eq!(t.vcpu.flushes, flushes, "no flush without an update");
    // Near 2^64: request 0 is applied, request 1 would lie at 2^64.
    t.map_top();
    t.put(top_pa(NEAR_TOP), pde);
    t.put(top_pa(NEAR_TOP) + 8, 0x60_0083);
    assert_eq!(t.call(nr::MMU_UPDATE, &[NEAR_TOP, 2]), 1);
    assert_eq!(t.call(nr::MMU_UPDATE, &[NEAR_TOP, u64::MAX]), 1);
    assert_eq!(t.call(nr::MMU_UPDATE, &[u64::MAX - 7, 1]), 0);
    assert_eq!(t.vcpu.flushes, flushes + 2);
}

#[test]
fn new_baseptr() {
    let mut t = T::new();
    let root = TABLES + 0x2000;
    // A copy of the boot PML4.
    t.put(root, t.get(abi::BOOT_PML4));
    assert_eq!(t.call(nr::NEW_BASEPTR, &[root]), 0);
    assert_eq!(t.vcpu.sregs.cr3, root);
    // Later hypercalls translate through the new tables.
    t.mem.write_slice(b"via root", GuestAddress(DATA)).unwrap();
    assert_eq!(t.call(nr::CONSOLE_IO, &[console::WRITE, DATA, 8]), 8);

    let bad = TABLES + 0x3000;
    t.put(bad, (1u64 << 40) | 3); // links a PDPT outside RAM
    for cr3 in [root + 8, RAM, bad, NEAR_TOP, !0xfff] {
        assert_eq!(t.call(nr::NEW_BASEPTR, &[cr3]), EINVAL, "{cr3:#x}");
    }
    assert_eq!(t.vcpu.sregs.cr3, root);
    assert_eq!(t.console.contents(), b"via root");
}

#[test]
fn stack_switch() {
    let mut t = T::new();
    // The boot TSS lies at guest-physical 0: RSP0 at 4.
    assert_eq!(t.call(nr::STACK_SWITCH, &[0x18, 0x1234_5678_9abc]), 0);
    assert_eq!(t.get(4), 0x1234_5678_9abc);
    t.vcpu.sregs.tr.base = UNMAPPED;
    assert_eq!(t.call(nr::STACK_SWITCH, &[0x18, 1]), EFAULT);
    // TSS.RSP0 would lie past 2^64: `tr.base + 4` overflows.
    t.map_top();
    for base in [u64::MAX - 1, u64::MAX - 3, u64::MAX - 8] {
        t.vcpu.sregs.tr.base = base;
        assert_eq!(t.call(nr::STACK_SWITCH, &[0x18, 1]), EFAULT, "{base:#x}");
    }
    t.vcpu.sregs.tr.base = NEAR_TOP - 4;
    assert_eq!(t.call(nr::STACK_SWITCH, &[0x18, 7]), 0);
    assert_eq!(t.get(top_pa(NEAR_TOP)), 7);
    t.vcpu.sregs.tr.limit = 0xa;
    assert_eq!(t.call(nr::STACK_SWITCH, &[0x18, 1]), EINVAL, "no TSS");
}

#[test]
fn console_io() {
    let mut t = T::new();
    t.mem.write_slice(b"hello", GuestAddress(DATA)).unwrap();
    assert_eq!(t.call(nr::CONSOLE_IO, &[console::WRITE, DATA, 5]), 5);
    assert_eq!(t.console.contents(), b"hello");
    // At most 64 KiB at a time.
    assert_eq!(
        t.call(nr::CONSOLE_IO, &[console::WRITE, DATA, u64::MAX]),
        1 << 16
    );
    assert_eq!(t.console.contents().len(), 5 + (1 << 16));
    assert_eq!(t.call(nr::CONSOLE_IO, &[1, DATA, 5]), EINVAL);
    assert_eq!(
        t.call(nr::CONSOLE_IO, &[console::WRITE, UNMAPPED, 5]),
        EFAULT
    );
    t.map_top();
    assert_eq!(t.call(nr::CONSOLE_IO, &[console::WRITE, NEAR_TOP, 16]), 16);
    assert_eq!(
        t.call(nr::CONSOLE_IO, &[console::WRITE, NEAR_TOP, 17]),
        EFAULT
    );
    assert_eq!(t.console.contents().len(), 5 + (1 << 16) + 16);
}

#[test]
fn sched_op() {
    let mut t = T::new();
    assert_eq!(t.call(nr::SCHED_OP, &[sched::YIELD]), 0);
    // No timer armed: BLOCK returns at once.
    let start = Instant::now();
    assert_eq!(t.call(nr::SCHED_OP, &[sched::BLOCK]), 0);
    assert!(start.elapsed() < Duration::from_millis(500));
    // An armed timer: BLOCK waits for it.
    assert_eq!(t.call(nr::SET_TIMER_OP, &[30_000_000]), 0);
    assert_eq!(t.call(nr::SCHED_OP, &[sched::BLOCK]), 0);
    assert!(start.elapsed() >= Duration::from_millis(25));
    // ... at most `max_block`.
    t.hc.set_max_block(Duration::ZERO);
    assert_eq!(t.call(nr::SET_TIMER_OP, &[10_000_000_000]), 0);
    let start = Instant::now();
    assert_eq!(t.call(nr::SCHED_OP, &[sched::BLOCK]), 0);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(
        t.call_after(nr::SCHED_OP, &[sched::SHUTDOWN, 7]),
        (0, After::Shutdown(7))
    );
    assert_eq!(t.call(nr::SCHED_OP, &[3]), EINVAL);
    assert_eq!(t.call(nr::SCHED_OP, &[u64::MAX]), EINVAL);
}

/// On the VM's guest clock, the timer does not fall due while the clock
/// stands (a debugger holds the guest), and falls due after the resume
/// once the rest of its time has passed.
#[test]
fn the_timer_stands_with_the_guest_clock() {
    let mut t = T::new();
    let clock: std::sync::Arc<vcpu::GuestClock> = Default::default();
    t.hc.set_clock(clock.clone());
    let bind = [event::BIND_VIRQ, event::VIRQ_TIMER, 0x40];
    assert_eq!(t.call(nr::EVENT_CHANNEL_OP, &bind), 0);
    let line = t.vm.lines.lock().unwrap()[0].clone();
    // Due in 40 ms of the guest's time; the clock stands at once.
    assert_eq!(t.call(nr::SET_TIMER_OP, &[40_000_000]), 0);
    clock.pause();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(line.edges(), 0, "fell due while the clock stood");
    clock.resume();
    let resumed = Instant::now();
    assert!(wait_edges(&line, 1));
    // (A loaded host may wake the thread late, never early.)
    assert!(resumed.elapsed() >= Duration::from_millis(30));
    // BLOCK waits in the guest's time too.
    assert_eq!(t.call(nr::SET_TIMER_OP, &[30_000_000]), 0);
    let start = Instant::now();
    assert_eq!(t.call(nr::SCHED_OP, &[sched::BLOCK]), 0);
    assert!(start.elapsed() >= Duration::from_millis(25));
}

/// Waits up to 5 s for `line` to have `n` edges.
fn wait_edges(line: &CountingLine, n: u64) -> bool {
    let start = Instant::now();
    while line.edges() < n && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    line.edges() == n
}

#[test]
fn timer_events_through_an_event_channel() {
    let mut t = T::new();
    let bind = [event::BIND_VIRQ, event::VIRQ_TIMER, 0x40];
    assert_eq!(t.call(nr::EVENT_CHANNEL_OP, &bind), 0);
    let line = t.vm.lines.lock().unwrap()[0].clone();
    assert_eq!(line.vector, 0x40);
    assert_eq!(t.call(nr::SET_TIMER_OP, &[1_000_000]), 0);
    assert!(wait_edges(&line, 1));
    assert_eq!(t.hc.timer_events(), 1);
    // One-shot: no second event.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(line.edges(), 1);
    // Masked: the expiry is dropped.
    let mask = [event::MASK, event::VIRQ_TIMER, 1];
    assert_eq!(t.call(nr::EVENT_CHANNEL_OP, &mask), 0);
    assert_eq!(t.call(nr::SET_TIMER_OP, &[1_000_000]), 0);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(line.edges(), 1);
    let unmask = [event::MASK, event::VIRQ_TIMER, 0];
    assert_eq!(t.call(nr::EVENT_CHANNEL_OP, &unmask), 0);
    // Cancelled: nothing.
    assert_eq!(t.call(nr::SET_TIMER_OP, &[50_000_000]), 0);
    assert_eq!(t.call(nr::SET_TIMER_OP, &[0]), 0);
    std::thread::sleep(Duration::from_millis(80));
    assert_eq!(line.edges(), 1);
    // The largest timeout is accepted (and lies centuries away).
    assert_eq!(t.call(nr::SET_TIMER_OP, &[u64::MAX]), 0);
    assert_eq!(t.call(nr::SET_TIMER_OP, &[1]), 0);
    assert!(wait_edges(&line, 2));
}

#[test]
fn event_channel_errors() {
    let mut t = T::new();
    for bad in [
        [event::BIND_VIRQ, event::VIRQ_TIMER, 31],
        [event::BIND_VIRQ, event::VIRQ_TIMER, 256],
        [event::BIND_VIRQ, event::VIRQ_TIMER, u64::MAX],
        [event::BIND_VIRQ, event::VIRQ_CONSOLE, 0x40],
        [event::MASK, event::VIRQ_CONSOLE, 1],
        [2, event::VIRQ_TIMER, 0x40],
        [u64::MAX, u64::MAX, u64::MAX],
    ] {
        assert_eq!(t.call(nr::EVENT_CHANNEL_OP, &bad), EINVAL, "{bad:x?}");
    }
    assert!(t.vm.lines.lock().unwrap().is_empty());
    // An engine that cannot deliver vectors.
    t.vm.vectors = false;
    let bind = [event::BIND_VIRQ, event::VIRQ_TIMER, 0x40];
    assert_eq!(t.call(nr::EVENT_CHANNEL_OP, &bind), ENOSYS);
}

/// The timer's thread ends with the service: dropping it frees the state
/// the thread shared (the line's only other holder is the VM's list).
#[test]
fn timer_thread_ends_with_the_service() {
    for _ in 0..20 {
        let mut t = T::new();
        let bind = [event::BIND_VIRQ, event::VIRQ_TIMER, 0x40];
        assert_eq!(t.call(nr::EVENT_CHANNEL_OP, &bind), 0);
        assert_eq!(t.call(nr::SET_TIMER_OP, &[3_600_000_000_000]), 0);
        let line = t.vm.lines.lock().unwrap()[0].clone();
        assert_eq!(Arc::strong_count(&line), 3);
        drop(t.hc);
        assert_eq!(Arc::strong_count(&line), 2, "the timer let go of it");
    }
}

fn multicall_entry(t: &T, at: u64, n: u64, args: [u64; 5]) {
    t.put(at, n);
    for (i, a) in args.iter().enumerate() {
        t.put(at + 8 + 8 * i as u64, *a);
    }
    t.put(at + 48, 0x5555);
}

#[test]
fn multicall() {
    let mut t = T::new();
    t.vcpu.sregs.cr2 = 0xdead_b000;
    let calls = [
        (nr::VERSION, [0; 5]),
        (nr::GET_CR2, [0; 5]),
        (nr::SCHED_OP, [9, 0, 0, 0, 0]),
        (nr::MULTICALL, [DATA, 1, 0, 0, 0]),
        (nr::IRET, [0; 5]),
        (nr::SET_EVENT_MASK, [1, 0, 0, 0, 0]),
        (0x7777, [0; 5]),
    ];
    for (i, (n, a)) in calls.iter().enumerate() {
        multicall_entry(&t, DATA + 56 * i as u64, *n, *a);
    }
    assert_eq!(t.call(nr::MULTICALL, &[DATA, calls.len() as u64]), 0);
    let results: Vec<i64> = (0..calls.len() as u64)
        .map(|i| t.get(DATA + 56 * i + 48) as i64)
        .collect();
    assert_eq!(
        results,
        [
            hypercall::VERSION as i64,
            0xdead_b000,
            EINVAL,
            EINVAL, // nested
            EINVAL, // changes the caller's registers
            EINVAL,
            ENOSYS
        ]
    );
    assert_eq!(t.vcpu.regs.rflags & IF, IF, "the event mask is untouched");
    assert_eq!(t.hc.counts[nr::VERSION as usize], 1);
    assert_eq!(t.hc.counts[nr::MULTICALL as usize], 2);
    assert_eq!(t.call(nr::MULTICALL, &[DATA, 0]), 0);

    // A shutdown inside a batch does not stop the VM.
    multicall_entry(&t, DATA, nr::SCHED_OP, [sched::SHUTDOWN, 3, 0, 0, 0]);
    multicall_entry(&t, DATA + 56, nr::VERSION, [0; 5]);
    assert_eq!(
        t.call_after(nr::MULTICALL, &[DATA, 2]),
        (EINVAL, After::Resume)
    );
    assert_eq!((t.get(DATA + 48), t.get(DATA + 56 + 48)), (0, 0x5555));

    assert_eq!(t.call(nr::MULTICALL, &[UNMAPPED, 1]), EFAULT);
    assert_eq!(t.call(nr::MULTICALL, &[RAM - 55, 1]), EFAULT);
    // At most 1024 entries (here all `set_trap_table(0, 0)`).
    t.mem
        .write_slice(&vec![0u8; 56 * 1100], GuestAddress(DATA))
        .unwrap();
    let before = t.hc.counts[nr::SET_TRAP_TABLE as usize];
    assert_eq!(t.call(nr::MULTICALL, &[DATA, u64::MAX]), 0);
    assert_eq!(t.hc.counts[nr::SET_TRAP_TABLE as usize] - before, 1024);

    // Entry 0 ends at 2^64 - 1; entry 1 would start at 2^64.
    t.map_top();
    let last = u64::MAX - 55;
    multicall_entry(&t, top_pa(last), nr::VERSION, [0; 5]);
    assert_eq!(t.call(nr::MULTICALL, &[last, 2]), EFAULT);
    assert_eq!(t.get(top_pa(last) + 48), hypercall::VERSION as u64);
    assert_eq!(t.call(nr::MULTICALL, &[last, 1]), 0);
    // Entry 0 itself would cross 2^64.
    assert_eq!(t.call(nr::MULTICALL, &[NEAR_TOP, 1]), EFAULT);
}

const KCODE: u64 = 0x00af_9a00_0000_ffff;
const KDATA: u64 = 0x00cf_9200_0000_ffff;
const UDATA: u64 = 0x00cf_f200_0000_ffff;
const UCODE: u64 = 0x00af_fa00_0000_ffff;

/// A 64-bit TSS descriptor (two slots) for `base`, limit 0x67.
fn tss_descriptor(base: u64) -> [u64; 2] {
    let lo = 0x67 | (base & 0xff_ffff) << 16 | 0x89 << 40 | (base >> 24 & 0xff) << 56;
    [lo, base >> 32]
}

/// Writes `entries` as a GDT at `at`.
fn write_gdt(t: &T, at: u64, entries: &[u64]) {
    for (i, e) in entries.iter().enumerate() {
        t.put(at + 8 * i as u64, *e);
    }
}

#[test]
fn set_gdt() {
    let mut t = T::new();
    let tss_base = 0xffff_8000_0040_0000u64;
    let [tss_lo, tss_hi] = tss_descriptor(tss_base);
    write_gdt(&t, GDT, &[0, KCODE, KDATA, UDATA, UCODE, tss_lo, tss_hi]);
    assert_eq!(t.call(nr::SET_GDT, &[GDT, 7, 0x28]), 0);
    let s = t.vcpu.sregs;
    assert_eq!((s.gdt.base, s.gdt.limit), (GDT, 7 * 8 - 1));
    assert_eq!(
        (s.tr.selector, s.tr.base, s.tr.limit),
        (0x28, tss_base, 0x67)
    );
    assert_eq!(s.tr.type_, 0xb, "the TSS is busy");
    assert_eq!(
        t.get(GDT + 0x28),
        tss_lo | 2 << 40,
        "and marked busy in the GDT"
    );
    // Without a TSS: the task register stays.
    assert_eq!(t.call(nr::SET_GDT, &[GDT, 5, 0]), 0);
    assert_eq!(t.vcpu.sregs.gdt.limit, 5 * 8 - 1);
    assert_eq!(t.vcpu.sregs.tr, s.tr);

    let before = t.vcpu.sregs;
    for (table, entries, tss) in [
        (GDT, 0, 0),
        (GDT, 65, 0),
        (GDT, u64::MAX, 0),
        (GDT, 7, 0x2c), // not a multiple of 8
        (GDT, 6, 0x28), // the upper half would lie past the table
        (GDT, 7, 0x08), // not a TSS
        (GDT, 4, 0),    // fine...
    ] {
        let r = t.call(nr::SET_GDT, &[table, entries, tss]);
        if entries == 4 {
            assert_eq!(r, 0);
            t.vcpu.sregs = before;
        } else {
            assert_eq!(r, EINVAL, "{entries} {tss:#x}");
        }
    }
    // A call gate, an LDT, a TSS elsewhere than the selector says.
    for system in [0x0000_8c00_0010_0000u64, 0x0000_8200_0000_ffff, tss_lo] {
        write_gdt(&t, GDT + 8, &[system]);
        assert_eq!(t.call(nr::SET_GDT, &[GDT, 2, 0]), EINVAL, "{system:#x}");
    }
    // A TSS whose limit is too small for a 64-bit TSS.
    write_gdt(&t, GDT + 8, &[KCODE]);
    write_gdt(&t, GDT + 0x28, &[tss_lo & !0xffff | 0x20]);
    assert_eq!(t.call(nr::SET_GDT, &[GDT, 7, 0x28]), EINVAL);
    assert_eq!(t.call(nr::SET_GDT, &[UNMAPPED, 2, 0]), EFAULT);
    assert_eq!(t.call(nr::SET_GDT, &[RAM - 8, 2, 0]), EFAULT);
    // Near 2^64: entries 0 and 1 fit, entry 2 would lie at 2^64.
    t.map_top();
    assert_eq!(t.call(nr::SET_GDT, &[NEAR_TOP, 3, 0]), EFAULT);
    assert_eq!(t.call(nr::SET_GDT, &[NEAR_TOP, 64, 0]), EFAULT);
    assert_eq!(t.vcpu.sregs, before, "failed calls change nothing");
    assert_eq!(t.call(nr::SET_GDT, &[NEAR_TOP, 2, 0]), 0);
}

#[test]
fn set_callbacks() {
    let mut t = T::pv();
    t.vcpu.sregs.efer &= !arch::efer::SCE;
    let entry = 0xffff_8000_0010_0000u64;
    let star = 0x0023_0010_0000_0000u64;
    let args = [callback::SYSCALL, entry, star, 0xffff_ffff_0004_0700];
    assert_eq!(t.call(nr::SET_CALLBACKS, &args), 0);
    assert_eq!(
        t.vcpu.syscall,
        Some(SyscallMsrs {
            entry,
            star,
            fmask: 0x4_0700
        })
    );
    assert_ne!(t.vcpu.sregs.efer & arch::efer::SCE, 0);
    assert_eq!(t.call(nr::SET_CALLBACKS, &[1, entry, star, 0]), EINVAL);
    let non_canonical = [callback::SYSCALL, 0x8000_0000_0000, star, 0];
    assert_eq!(t.call(nr::SET_CALLBACKS, &non_canonical), EINVAL);
    // An engine whose kernel writes the MSRs itself.
    let mut t = T::new();
    assert_eq!(t.call(nr::SET_CALLBACKS, &args), ENOSYS);
    assert_eq!(t.vcpu.syscall, None);
}

/// Writes an `iret` frame at `rsp`: the stub's return address, RAX, RIP,
/// CS, RFLAGS, RSP, SS.
fn iret_frame(t: &T, rsp: u64, frame: [u64; 6]) {
    t.put(rsp, 0xdead);
    for (i, w) in frame.iter().enumerate() {
        t.put(rsp + 8 + 8 * i as u64, *w);
    }
}

#[test]
fn iret() {
    let mut t = T::new();
    write_gdt(&t, GDT, &[0, KCODE, KDATA, UDATA, UCODE]);
    t.vcpu.sregs.gdt = vcpu::DescriptorTable {
        base: GDT,
        limit: 5 * 8 - 1,
    };
    // To user mode (CS 0x23, SS 0x1b).
    let user = [
        0x77,
        0x40_0000,
        0x23,
        0xffff_ffff_ffff_ffff,
        0x7fff_f000,
        0x1b,
    ];
    iret_frame(&t, STACK, user);
    t.call(nr::IRET, &[]);
    let r = t.vcpu.regs;
    assert_eq!((r.rax, r.rip, r.rsp), (0x77, 0x40_0000, 0x7fff_f000));
    assert_eq!(r.rflags, 0x3f_7fd5 | 2, "only the flags a return may set");
    let s = t.vcpu.sregs;
    assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l), (0x23, 3, true));
    assert_eq!((s.ss.selector, s.ss.dpl), (0x1b, 3));
    // To the kernel (CS 0x08) with a null SS.
    t.vcpu.regs.rsp = STACK;
    iret_frame(&t, STACK, [1, 0xffff_8000_0000_1000, 0x08, 2, STACK, 0]);
    t.call(nr::IRET, &[]);
    assert_eq!(t.vcpu.regs.rip, 0xffff_8000_0000_1000);
    assert_eq!(t.vcpu.sregs.cs.selector, 0x08);
    assert!(t.vcpu.sregs.ss.unusable);

    let bad_frames: [([u64; 6], &str); 8] = [
        ([0, 0x1000, 0x21, 2, STACK, 0x19], "RPL 1"),
        ([0, 0x1000, 0x23, 2, STACK, 0x10], "SS RPL differs"),
        (
            [0, 0x8000_0000_0000, 0x08, 2, STACK, 0],
            "RIP not canonical",
        ),
        ([0, 0x1000, 0x10, 2, STACK, 0], "CS is data"),
        ([0, 0x1000, 0x1b, 2, STACK, 0x1b], "CS is user data"),
        ([0, 0x1000, 0x80, 2, STACK, 0], "CS past the GDT limit"),
        ([0, 0x1000, 0x0c, 2, STACK, 0], "CS in the LDT"),
        (
            [0, 0x1000, 0x23, 2, STACK, 0x13],
            "SS is kernel data at RPL 3",
        ),
    ];
    for (frame, what) in bad_frames {
        t.vcpu.regs.rsp = STACK;
        iret_frame(&t, STACK, frame);
        let (regs, sregs) = (t.vcpu.regs, t.vcpu.sregs);
        assert_eq!(t.call(nr::IRET, &[]), EINVAL, "{what}");
        assert_eq!(
            t.vcpu.regs,
            Regs {
                rax: EINVAL as u64,
                ..regs
            },
            "{what}"
        );
        assert_eq!(t.vcpu.sregs, sregs, "{what}");
    }
    t.vcpu.regs.rsp = UNMAPPED;
    assert_eq!(t.call(nr::IRET, &[]), EFAULT);
    t.vcpu.regs.rsp = RAM - 16;
    assert_eq!(t.call(nr::IRET, &[]), EFAULT);
    // The frame would wrap past 2^64 (two of its words are readable there).
    t.map_top();
    iret_frame(&t, 0, user);
    for rsp in [NEAR_TOP, u64::MAX - 7, u64::MAX] {
        t.vcpu.regs.rsp = rsp;
        assert_eq!(t.call(nr::IRET, &[]), EFAULT, "{rsp:#x}");
    }
    assert_eq!(t.hc.counts[nr::IRET as usize], 15);
}

#[test]
fn set_event_mask() {
    let mut t = T::new();
    assert_eq!(t.call(nr::SET_EVENT_MASK, &[1]), 0, "was unmasked");
    assert_eq!(t.vcpu.regs.rflags & IF, 0);
    assert_eq!(t.call(nr::SET_EVENT_MASK, &[1]), 1, "was masked");
    assert_eq!(t.call(nr::SET_EVENT_MASK, &[0]), 1);
    assert_eq!(t.vcpu.regs.rflags & IF, IF);
    assert_eq!(t.call(nr::SET_EVENT_MASK, &[u64::MAX]), 0);
    assert_eq!(t.vcpu.regs.rflags & IF, 0, "any non-zero masks");
}

/// `bench_phase(n)` is the VMM loop's: the service answers 0 and hands it
/// the phase; not inside a multicall.
#[test]
fn bench_phase() {
    let mut t = T::new();
    assert_eq!(
        t.call_after(nr::BENCH_PHASE, &[3]),
        (0, After::BenchPhase(3))
    );
    assert_eq!(
        t.call_after(nr::BENCH_PHASE, &[1 << 32]),
        (0, After::BenchPhase(0)),
        "a 32-bit phase number"
    );
    multicall_entry(&t, DATA, nr::BENCH_PHASE, [5, 0, 0, 0, 0]);
    assert_eq!(t.call(nr::MULTICALL, &[DATA, 1]), 0);
    assert_eq!(t.get(DATA + 48) as i64, ENOSYS);
    assert_eq!(t.hc.counts[nr::BENCH_PHASE as usize], 3);
}

#[test]
fn get_cr2() {
    let mut t = T::new();
    t.vcpu.sregs.cr2 = 0x7fff_dead_b000;
    assert_eq!(t.call(nr::GET_CR2, &[]), 0x7fff_dead_b000);
    assert_eq!(t.hc.counts[nr::GET_CR2 as usize], 1);
}

/// Every guest-memory write of a hypercall is reported to the engine
/// (`Vcpu::memory_written`, for what it caches from guest memory), piece by
/// piece where a write crosses pages.
#[test]
fn writes_are_reported() {
    let mut t = T::new();
    let expect_reported = |t: &mut T, n: u64, args: &[u64], result: i64, ranges: &[(u64, u64)]| {
        t.vcpu.written.clear();
        assert_eq!(t.call(n, args), result, "{}", hypercall::name(n));
        assert_eq!(t.vcpu.written, ranges, "{}", hypercall::name(n));
    };
    expect_reported(
        &mut t,
        nr::SET_HYPERCALL_PAGE,
        &[DATA | 1],
        0,
        &[(DATA, 0x1000)],
    );
    expect_reported(&mut t, nr::SET_HYPERCALL_PAGE, &[0], 0, &[]);
    expect_reported(&mut t, nr::STACK_SWITCH, &[0, 5], 0, &[(4, 8)]);
    // A TSS whose RSP0 crosses a page boundary.
    t.vcpu.sregs.tr.base = DATA + 0x2ff8;
    expect_reported(
        &mut t,
        nr::STACK_SWITCH,
        &[0, 5],
        0,
        &[(DATA + 0x2ffc, 4), (DATA + 0x3000, 4)],
    );
    let (pde, entry) = (abi::BOOT_PD + 0x1000, DATA + 0x1000);
    t.put(entry, pde);
    t.put(entry + 8, 0x60_0083);
    expect_reported(&mut t, nr::MMU_UPDATE, &[entry, 1], 1, &[(pde, 8)]);
    multicall_entry(&t, entry, nr::VERSION, [0; 5]);
    expect_reported(&mut t, nr::MULTICALL, &[entry, 1], 0, &[(entry + 48, 8)]);
    let [lo, hi] = trap_info(14, 0, 0x1000);
    t.put(entry, lo);
    t.put(entry + 8, hi);
    expect_reported(
        &mut t,
        nr::SET_TRAP_TABLE,
        &[entry, 1],
        0,
        &[(PV_IDT + 14 * 16, 16)],
    );
    let [tss_lo, tss_hi] = tss_descriptor(0x40_0000);
    write_gdt(&t, GDT, &[0, KCODE, tss_lo, tss_hi]);
    expect_reported(&mut t, nr::SET_GDT, &[GDT, 4, 0x10], 0, &[(GDT + 0x10, 8)]);
    // Failed calls write nothing.
    expect_reported(&mut t, nr::SET_GDT, &[UNMAPPED, 4, 0x10], EFAULT, &[]);
    expect_reported(&mut t, nr::MULTICALL, &[UNMAPPED, 1], EFAULT, &[]);
}
