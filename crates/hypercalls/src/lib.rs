//! visor's hypercall service: the VMM's one implementation of the paravirtual
//! hypercall ABI (`crates/hypercall`, docs/hypercalls.md), for every engine.
//!
//! It owns what a hypercall does: the hypercall page, the checks of every
//! argument, the guest-memory reads and writes, the PV timer and its thread,
//! the calls made by number. Engines only deliver the call (as a port-I/O
//! exit on `HYPERCALL_PORT`: the stub's OUT under `kvm`, `emu` and `trap`,
//! the stub's VMCALL under `vmx`; as its own hypercall exit from `int 0x82`
//! under `pv`) and answer through the engine contract (`vcpu`): registers,
//! [`vcpu::Vcpu::flush_tlb`] after page-table changes, and
//! [`vcpu::Vcpu::as_pv`] for what a deprivileged kernel may not do itself.
//! The service depends on no engine and not on the software CPU.
//!
//! Everything a hypercall touches is checked: guest-virtual arguments are
//! translated through the guest's page tables, physical addresses must be
//! guest RAM, and every address computed from guest values uses checked
//! arithmetic, so a guest gets the documented error (-EFAULT for an argument
//! that does not lie in its memory) and never a panic or a wrap-around.
//!
//! It is a crate of its own rather than a `std` feature of the ABI crate: the
//! guests build `hypercall` for bare metal, and it stays a leaf without
//! dependencies; this one needs threads, guest memory and the contract.
//!
//! [`fuzz`] is the fuzzing harness (the cargo-fuzz target `hypercall_args`
//! and its seeded run in `cargo test`); [`double`] the vCPU and VM without a
//! CPU that it and the unit tests drive the service with.

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod double;
pub mod fuzz;
mod timer;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use arch::rflags::IF;
use arch::{canonical, desc, pte, Gate, Segment};
use hypercall::{errno, nr, MmuUpdate, MulticallEntry, TrapInfo, STUB_SIZE};
use machine::paging::{read_virt, table_frames, write_virt};
use machine::GuestMemory;
use vcpu::{GuestClock, Regs, Vcpu, VcpuError};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use timer::Timer;

/// Guest-physical page where `set_trap_table` materializes the trap table as
/// a hardware IDT, for engines that run the guest kernel on the CPU's own
/// IDT (`kvm`). It lies in the reserved BIOS area, which PV guests keep
/// identity-mapped.
pub const PV_IDT: u64 = 0xf_0000;

/// The longest `sched_op(BLOCK)` waits for an armed timer by default.
pub const MAX_BLOCK: Duration = Duration::from_secs(1);

/// What a hypercall asks the VMM loop to do afterwards.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Run the guest on.
    Resume,
    /// `sched_op(SHUTDOWN, code)`: stop the VM with this status.
    Shutdown(u64),
    /// `bench_phase(n)`: a benchmark phase boundary, where the VMM loop
    /// records the engine's counters (docs/costs.md).
    BenchPhase(u32),
}

/// A hypercall the service carried out.
#[derive(Debug, PartialEq, Eq)]
pub struct Call {
    /// Its number (RAX's low 32 bits).
    pub number: u64,
    /// What the VMM loop does next.
    pub after: After,
}

/// Hypercall state of one VM.
pub struct Hypercalls {
    /// CPUID leaves 0x4000_0000.. advertise the ABI (`--no-pv` clears it).
    pub advertised: bool,
    page: Option<u64>,
    stub: fn(u32) -> [u8; STUB_SIZE],
    console: Box<dyn Write + Send>,
    /// Started by the first timer or event-channel hypercall; dropped (and
    /// its thread joined) with the service.
    timer: Option<Timer>,
    max_block: Duration,
    /// The guest's time, on which the timer's deadlines are kept.
    clock: Arc<GuestClock>,
    /// The calls made, by number (multicall entries included).
    pub counts: [u64; nr::COUNT as usize],
}

/// An ABI structure as guest memory holds it. The ABI crate has no
/// dependencies (guests build it), so its structures get `ByteValued` here.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct Wire<T>(T);

// SAFETY: TrapInfo is repr(C) of integers with its padding spelled out as a
// field (u8, u8, u16, u32, u64: 16 bytes, no implicit padding): every byte
// pattern is a valid value and every byte is initialized.
unsafe impl ByteValued for Wire<TrapInfo> {}
// SAFETY: MmuUpdate is repr(C) of two u64s: no padding, any bytes valid.
unsafe impl ByteValued for Wire<MmuUpdate> {}
// SAFETY: MulticallEntry is repr(C) of u64, [u64; 5] and i64 (56 bytes): no
// padding, any bytes valid.
unsafe impl ByteValued for Wire<MulticallEntry> {}

/// What one hypercall works on.
struct Ctx<'a> {
    mem: &'a GuestMemory,
    vcpu: &'a mut dyn Vcpu,
    vm: &'a dyn vcpu::Vm,
    cr3: u64,
}

impl Ctx<'_> {
    /// A `T` at guest-virtual `gva`; `None` if any byte of it does not
    /// translate to guest RAM.
    fn read<T: ByteValued>(&self, gva: u64) -> Option<T> {
        let mut v = T::zeroed();
        read_virt(self.mem, self.cr3, gva, v.as_mut_slice())?;
        Some(v)
    }

    /// Writes `v` at guest-virtual `gva` and tells the engine.
    fn write<T: ByteValued>(&mut self, gva: u64, v: T) -> Option<()> {
        let vcpu = &mut *self.vcpu;
        write_virt(self.mem, self.cr3, gva, v.as_slice(), |gpa, n| {
            vcpu.memory_written(gpa, n)
        })
    }
}

/// The address of element `i` of `size` bytes of an array at `base`; `None`
/// past the top of the address space.
fn element(base: u64, i: u64, size: u64) -> Option<u64> {
    base.checked_add(i.checked_mul(size)?)
}

const EFAULT: i64 = -errno::EFAULT;
const EINVAL: i64 = -errno::EINVAL;
const ENOSYS: i64 = -errno::ENOSYS;
const MULTICALL_SIZE: u64 = std::mem::size_of::<MulticallEntry>() as u64;
/// Offset of `MulticallEntry::result`.
const MULTICALL_RESULT: u64 = MULTICALL_SIZE - 8;

/// The segment of `sel` in the guest's GDT (read through its page tables).
fn descriptor(ctx: &Ctx, s: &vcpu::SRegs, sel: u16) -> Option<Segment> {
    let idx = (sel & !7) as u64;
    if sel & 4 != 0 || idx == 0 || idx + 7 > s.gdt.limit as u64 {
        return None;
    }
    let raw: u64 = ctx.read(s.gdt.base.checked_add(idx)?)?;
    Some(Segment::from_descriptor(sel, raw))
}

fn in_ram(mem: &GuestMemory, gpa: u64, len: u64) -> bool {
    len > 0
        && gpa.checked_add(len - 1).is_some_and(|last| {
            mem.address_in_range(GuestAddress(gpa)) && mem.address_in_range(GuestAddress(last))
        })
}

impl Hypercalls {
    /// The service of a VM: `advertised` as the guest's CPUID says, `stub`
    /// the engine's hypercall stub, `console` where `console_io` writes.
    pub fn new(
        advertised: bool,
        stub: fn(u32) -> [u8; STUB_SIZE],
        console: Box<dyn Write + Send>,
    ) -> Self {
        Hypercalls {
            advertised,
            page: None,
            stub,
            console,
            timer: None,
            max_block: MAX_BLOCK,
            clock: Arc::default(),
            counts: [0; nr::COUNT as usize],
        }
    }

    /// Caps how long `sched_op(BLOCK)` waits for the timer (a spurious
    /// wake-up, which the ABI allows); [`MAX_BLOCK`] by default.
    pub fn set_max_block(&mut self, max: Duration) {
        self.max_block = max;
    }

    /// Keeps the timer's deadlines on the VM's guest clock (which stands
    /// while a debugger holds the guest) rather than on a clock of its own.
    /// Call before the guest first uses the timer.
    pub fn set_clock(&mut self, clock: Arc<GuestClock>) {
        self.clock = clock;
    }

    /// The guest-physical address of the hypercall page, once set.
    pub fn page(&self) -> Option<u64> {
        self.page
    }

    /// WRMSR to the hypercall-page MSR: `gpa | 1` fills the page with the
    /// engine's stubs. Returns false (#GP) for a bad address. The caller
    /// tells the engine that the page was written.
    pub fn set_page(&mut self, mem: &GuestMemory, value: u64) -> bool {
        if value & 1 == 0 {
            self.page = None;
            return true;
        }
        let gpa = value & !0xfff;
        if !in_ram(mem, gpa, 0x1000) {
            return false;
        }
        let mut page = [0xccu8; 0x1000];
        for (n, stub) in page
            .chunks_exact_mut(STUB_SIZE)
            .take(nr::COUNT as usize)
            .enumerate()
        {
            stub.copy_from_slice(&(self.stub)(n as u32));
        }
        if mem.write_slice(&page, GuestAddress(gpa)).is_err() {
            return false;
        }
        self.page = Some(gpa);
        true
    }

    /// Carries out the hypercall in `vcpu`'s registers (number in RAX,
    /// arguments in RDI, RSI, RDX, R10, R8) and leaves the result in RAX.
    /// `Err` only when the engine fails or the host cannot start the timer
    /// thread: a bad request is the guest's error, in RAX.
    pub fn call(
        &mut self,
        mem: &GuestMemory,
        vcpu: &mut dyn Vcpu,
        vm: &dyn vcpu::Vm,
    ) -> Result<Call, VcpuError> {
        let mut regs = vcpu.regs()?;
        let cr3 = vcpu.sregs()?.cr3;
        let mut ctx = Ctx { mem, vcpu, vm, cr3 };
        let args = [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8];
        let number = regs.rax & 0xffff_ffff;
        let mut after = After::Resume;
        // The hypercalls that change the caller's registers themselves, and
        // the VMM loop's own.
        match number {
            nr::IRET => {
                self.count(number);
                if let Err(e) = self.iret(&mut ctx, &mut regs)? {
                    regs.rax = e as u64;
                }
            }
            nr::BENCH_PHASE => {
                self.count(number);
                regs.rax = 0;
                after = After::BenchPhase(args[0] as u32);
            }
            nr::SET_EVENT_MASK => {
                self.count(number);
                let old = regs.rflags & IF == 0;
                if args[0] != 0 {
                    regs.rflags &= !IF;
                } else {
                    regs.rflags |= IF;
                }
                regs.rax = old as u64;
            }
            _ => {
                let (result, a) = self.dispatch(&mut ctx, number, args, true)?;
                regs.rax = result as u64;
                after = a;
            }
        }
        ctx.vcpu.set_regs(&regs)?;
        Ok(Call { number, after })
    }

    fn count(&mut self, n: u64) {
        if let Some(c) = self.counts.get_mut(n as usize) {
            *c += 1;
        }
    }

    /// The timer, started on first use.
    fn timer(&mut self) -> Result<&Timer, VcpuError> {
        let t = match self.timer.take() {
            Some(t) => t,
            None => Timer::start(self.clock.clone())
                .map_err(|e| VcpuError::os("starting the PV timer thread", e))?,
        };
        Ok(self.timer.insert(t))
    }

    /// Hypercall `n` with arguments `a`; `top` unless it is a multicall entry.
    fn dispatch(
        &mut self,
        ctx: &mut Ctx,
        n: u64,
        a: [u64; 5],
        top: bool,
    ) -> Result<(i64, After), VcpuError> {
        self.count(n);
        let r = match n {
            nr::VERSION => hypercall::VERSION as i64,
            nr::CONSOLE_IO => self.console_io(ctx, a),
            nr::SCHED_OP => match a[0] {
                hypercall::sched::YIELD => 0,
                hypercall::sched::BLOCK => {
                    self.block();
                    0
                }
                hypercall::sched::SHUTDOWN => return Ok((0, After::Shutdown(a[1]))),
                _ => EINVAL,
            },
            nr::MMU_UPDATE => self.mmu_update(ctx, a[0], a[1])?,
            nr::NEW_BASEPTR => self.new_baseptr(ctx, a[0])?,
            nr::STACK_SWITCH => {
                // The kernel stack for traps from user mode: TSS.RSP0.
                let tr = ctx.vcpu.sregs()?.tr;
                if tr.limit < 0xb {
                    EINVAL
                } else {
                    match tr.base.checked_add(4).and_then(|at| ctx.write(at, a[1])) {
                        Some(()) => 0,
                        None => EFAULT,
                    }
                }
            }
            nr::SET_TRAP_TABLE => self.set_trap_table(ctx, a[0], a[1])?,
            nr::SET_TIMER_OP => {
                // A timeout the host clock cannot represent never expires.
                let deadline = (a[0] != 0)
                    .then(|| self.clock.now().checked_add(Duration::from_nanos(a[0])))
                    .flatten();
                self.timer()?.with(|t| t.deadline = deadline);
                0
            }
            nr::EVENT_CHANNEL_OP => self.event_channel_op(ctx, a)?,
            nr::MULTICALL if top => self.multicall(ctx, a[0], a[1])?,
            nr::SET_GDT => self.set_gdt(ctx, a)?,
            nr::SET_CALLBACKS => self.set_callbacks(ctx, a)?,
            nr::GET_CR2 => ctx.vcpu.sregs()?.cr2 as i64,
            nr::SET_HYPERCALL_PAGE if self.advertised => {
                if !self.set_page(ctx.mem, a[0]) {
                    EINVAL
                } else {
                    // The stubs were written (unless the page was disabled).
                    if let Some(gpa) = self.page.filter(|_| a[0] & 1 != 0) {
                        ctx.vcpu.memory_written(gpa, 0x1000);
                    }
                    0
                }
            }
            // Only as the hypercall itself: they change the caller's
            // registers, or nest.
            nr::IRET | nr::SET_EVENT_MASK | nr::MULTICALL => EINVAL,
            // `bench_phase` inside a multicall, and unknown numbers.
            _ => ENOSYS,
        };
        Ok((r, After::Resume))
    }

    /// `new_baseptr(cr3)`: the tree must be well formed, every table it
    /// links in guest RAM.
    fn new_baseptr(&mut self, ctx: &mut Ctx, cr3: u64) -> Result<i64, VcpuError> {
        let read = |pa: u64| ctx.mem.read_obj::<u64>(GuestAddress(pa)).ok();
        if cr3 & 0xfff != 0 || !in_ram(ctx.mem, cr3, 0x1000) || table_frames(read, cr3).is_err() {
            return Ok(EINVAL);
        }
        let mut s = ctx.vcpu.sregs()?;
        s.cr3 = cr3;
        ctx.vcpu.set_sregs(&s)?;
        ctx.cr3 = cr3;
        Ok(0)
    }

    /// `iret()`: pops RAX, RIP, CS, RFLAGS, RSP, SS (after the stub's return
    /// address) and returns there. The code and stack segments come from the
    /// guest's GDT and must be a 64-bit kernel (RPL 0) or user (RPL 3) pair.
    /// The inner `Err` is the guest's error.
    fn iret(&mut self, ctx: &mut Ctx, regs: &mut Regs) -> Result<Result<(), i64>, VcpuError> {
        let mut f = [0u64; 7];
        for (i, w) in f.iter_mut().enumerate() {
            match element(regs.rsp, i as u64, 8).and_then(|at| ctx.read::<u64>(at)) {
                Some(v) => *w = v,
                None => return Ok(Err(EFAULT)),
            }
        }
        let [_, rax, rip, cs, rflags, rsp, ss] = f;
        let (cs, ss) = (cs as u16, ss as u16);
        let rpl = cs & 3;
        if (rpl != 0 && rpl != 3) || ss & 3 != rpl || !canonical(rip) {
            return Ok(Err(EINVAL));
        }
        let mut s = ctx.vcpu.sregs()?;
        let Some(code) = descriptor(ctx, &s, cs) else {
            return Ok(Err(EINVAL));
        };
        if !code.s || code.type_ & 8 == 0 || !code.l || code.dpl as u16 != rpl || !code.present {
            return Ok(Err(EINVAL));
        }
        let stack = if ss & !3 == 0 && rpl == 0 {
            Segment {
                selector: ss,
                unusable: true,
                ..Default::default()
            }
        } else {
            match descriptor(ctx, &s, ss) {
                Some(d) if d.s && d.type_ & 0xa == 2 && d.dpl as u16 == rpl && d.present => d,
                _ => return Ok(Err(EINVAL)),
            }
        };
        s.cs = code;
        s.ss = stack;
        ctx.vcpu.set_sregs(&s)?;
        regs.rax = rax;
        regs.rip = rip;
        regs.rsp = rsp;
        regs.rflags = (rflags & 0x3f_7fd5) | 2;
        Ok(Ok(()))
    }

    /// `set_gdt(table, entries, tss_selector)`.
    fn set_gdt(&mut self, ctx: &mut Ctx, a: [u64; 5]) -> Result<i64, VcpuError> {
        let (table, entries, tss) = (a[0], a[1], a[2] as u16);
        // The TSS descriptor takes slots tss/8 and tss/8 + 1.
        let tss_fits = tss == 0 || (tss & 7 == 0 && tss as u64 / 8 + 1 < entries);
        if entries == 0 || entries > 64 || !tss_fits {
            return Ok(EINVAL);
        }
        let mut raw = Vec::with_capacity(entries as usize);
        for i in 0..entries {
            match element(table, i, 8).and_then(|at| ctx.read::<u64>(at)) {
                Some(d) => raw.push(d),
                None => return Ok(EFAULT),
            }
        }
        // Code and data descriptors only, but for the one TSS (two slots).
        let tss_slot = (tss != 0).then_some(tss as usize / 8);
        for (i, &d) in raw.iter().enumerate() {
            let system = d & desc::S == 0 && d & desc::PRESENT != 0;
            let tss_half = tss_slot.is_some_and(|t| i == t || i == t + 1);
            if system && !tss_half {
                return Ok(EINVAL);
            }
        }
        let mut s = ctx.vcpu.sregs()?;
        s.gdt = vcpu::DescriptorTable {
            base: table,
            limit: (entries * 8 - 1) as u16,
        };
        if let Some(t) = tss_slot {
            let mut tr = Segment::from_descriptor(tss, raw[t]);
            if tr.s || tr.type_ != 9 || !tr.present || tr.limit < 0x67 {
                return Ok(EINVAL);
            }
            tr.base |= (raw[t + 1] & 0xffff_ffff) << 32;
            tr.type_ = 0xb;
            let busy = raw[t] | desc::TSS_BUSY;
            // The slot was read above: its address does not overflow.
            if element(table, t as u64, 8)
                .and_then(|at| ctx.write(at, busy))
                .is_none()
            {
                return Ok(EFAULT);
            }
            s.tr = tr;
        }
        ctx.vcpu.set_sregs(&s)?;
        Ok(0)
    }

    /// `set_callbacks(SYSCALL, entry, star, fmask)`: the system-call MSRs,
    /// set through the engine for a kernel that may not write them itself.
    fn set_callbacks(&mut self, ctx: &mut Ctx, a: [u64; 5]) -> Result<i64, VcpuError> {
        if a[0] != hypercall::callback::SYSCALL || !canonical(a[1]) {
            return Ok(EINVAL);
        }
        match ctx.vcpu.as_pv() {
            Some(pv) => {
                pv.set_syscall_entry(a[1], a[2], a[3] & 0xffff_ffff)?;
                Ok(0)
            }
            None => Ok(ENOSYS),
        }
    }

    /// `sched_op(BLOCK)`: the vCPU waits until the next event is due. The only
    /// event source is the one-shot timer; without one armed this returns at
    /// once (a spurious wake-up, which the ABI allows).
    fn block(&self) {
        let Some(t) = &self.timer else {
            return;
        };
        if let Some(wait) = t.with(|s| s.deadline).and_then(|d| self.clock.until(d)) {
            std::thread::sleep(wait.min(self.max_block));
        }
    }

    fn console_io(&mut self, ctx: &Ctx, a: [u64; 5]) -> i64 {
        if a[0] != hypercall::console::WRITE {
            return EINVAL;
        }
        let len = a[2].min(1 << 16) as usize;
        let mut buf = vec![0u8; len];
        if read_virt(ctx.mem, ctx.cr3, a[1], &mut buf).is_none() {
            return EFAULT;
        }
        // The console is the VMM's output: a failed write is not the guest's
        // error.
        let _ = self.console.write_all(&buf);
        let _ = self.console.flush();
        len as i64
    }

    /// `mmu_update(reqs, count)`: the requests in order, up to the first
    /// invalid or unreadable one; the number applied.
    fn mmu_update(&mut self, ctx: &mut Ctx, reqs: u64, count: u64) -> Result<i64, VcpuError> {
        let mut done = 0i64;
        for i in 0..count.min(1 << 20) {
            let Some(Wire(req)) =
                element(reqs, i, 16).and_then(|at| ctx.read::<Wire<MmuUpdate>>(at))
            else {
                break;
            };
            if !valid_pte_write(ctx.mem, &req) {
                break;
            }
            if ctx.mem.write_obj(req.val, GuestAddress(req.ptr)).is_err() {
                break;
            }
            ctx.vcpu.memory_written(req.ptr, 8);
            done += 1;
        }
        if done > 0 {
            ctx.vcpu.flush_tlb()?;
        }
        Ok(done)
    }

    fn set_trap_table(&mut self, ctx: &mut Ctx, ptr: u64, count: u64) -> Result<i64, VcpuError> {
        if count > 256 {
            return Ok(EINVAL);
        }
        let mut entries = Vec::with_capacity(count as usize);
        for i in 0..count {
            match element(ptr, i, 16).and_then(|at| ctx.read::<Wire<TrapInfo>>(at)) {
                Some(Wire(t)) => entries.push(t),
                None => return Ok(EFAULT),
            }
        }
        // Materialize the table as the hardware IDT of an engine that runs the
        // guest kernel on the CPU.
        for t in &entries {
            let (lo, hi) = Gate {
                offset: t.address,
                selector: t.cs,
                ist: 0,
                type_: if t.flags & 4 != 0 { 0xe } else { 0xf },
                dpl: t.flags & 3,
                present: t.address != 0,
            }
            .descriptor();
            let at = PV_IDT + t.vector as u64 * 16;
            if ctx.mem.write_obj(lo, GuestAddress(at)).is_err()
                || ctx.mem.write_obj(hi, GuestAddress(at + 8)).is_err()
            {
                return Ok(EFAULT);
            }
            ctx.vcpu.memory_written(at, 16);
        }
        let mut s = ctx.vcpu.sregs()?;
        s.idt = vcpu::DescriptorTable {
            base: PV_IDT,
            limit: 0xfff,
        };
        ctx.vcpu.set_sregs(&s)?;
        Ok(0)
    }

    fn event_channel_op(&mut self, ctx: &Ctx, a: [u64; 5]) -> Result<i64, VcpuError> {
        use hypercall::event::*;
        match (a[0], a[1]) {
            (BIND_VIRQ, VIRQ_TIMER) => {
                let vector = match u8::try_from(a[2]) {
                    Ok(v) if v >= 32 => v,
                    _ => return Ok(EINVAL),
                };
                match ctx.vm.vector_line(vector)? {
                    Some(line) => {
                        self.timer()?.with(|t| t.line = Some(line));
                        Ok(0)
                    }
                    None => Ok(ENOSYS),
                }
            }
            (MASK, VIRQ_TIMER) => {
                self.timer()?.with(|t| t.masked = a[2] != 0);
                Ok(0)
            }
            _ => Ok(EINVAL),
        }
    }

    /// `multicall(entries, count)`: each entry in order, its result stored in
    /// it.
    fn multicall(&mut self, ctx: &mut Ctx, ptr: u64, count: u64) -> Result<i64, VcpuError> {
        for i in 0..count.min(1024) {
            let Some(at) = element(ptr, i, MULTICALL_SIZE) else {
                return Ok(EFAULT);
            };
            let Some(Wire(e)) = ctx.read::<Wire<MulticallEntry>>(at) else {
                return Ok(EFAULT);
            };
            let (r, after) = self.dispatch(ctx, e.nr, e.args, false)?;
            // The entry was read whole: its result field's address does not
            // overflow.
            let stored = at
                .checked_add(MULTICALL_RESULT)
                .and_then(|res| ctx.write(res, r));
            if stored.is_none() {
                return Ok(EFAULT);
            }
            if after != After::Resume {
                return Ok(EINVAL);
            }
        }
        Ok(0)
    }

    /// Timer events delivered so far.
    pub fn timer_events(&self) -> u64 {
        self.timer.as_ref().map_or(0, |t| t.with(|s| s.fired))
    }
}

/// A PTE write is allowed when the entry lies in guest RAM, 8-byte aligned,
/// and a present entry maps guest RAM only.
fn valid_pte_write(mem: &GuestMemory, r: &MmuUpdate) -> bool {
    if r.ptr & 7 != 0 || !in_ram(mem, r.ptr, 8) {
        return false;
    }
    r.val & pte::P == 0 || in_ram(mem, r.val & pte::ADDR, 0x1000)
}

#[cfg(test)]
mod tests;
