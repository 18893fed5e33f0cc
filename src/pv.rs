//! The VMM's one implementation of visor's hypercall ABI (crates/hypercall,
//! docs/hypercalls.md). Engines only deliver the call: `kvm` as a port-I/O exit
//! on `HYPERCALL_PORT` from the hypercall page's stubs. Everything a hypercall
//! touches is checked: guest-virtual arguments are translated through the
//! guest's page tables, physical addresses must be guest RAM.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use arch::rflags::IF;
use arch::{canonical, desc, efer, msr, pte, Gate};
use hypercall::{errno, nr, MmuUpdate, MulticallEntry, TrapInfo, STUB_SIZE};
use machine::paging::{read_virt, write_virt};
use machine::GuestMemory;
use vcpu::{IrqLine, Regs, Vcpu};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Guest-physical page where, under engines that run the guest kernel on the
/// CPU's own IDT (`kvm`), `set_trap_table` materializes the trap table as a
/// hardware IDT. It lies in the reserved BIOS area, which PV guests keep
/// identity-mapped.
pub const PV_IDT: u64 = 0xf_0000;

/// What a hypercall asks the VMM loop to do afterwards.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    Resume,
    /// `sched_op(SHUTDOWN, code)`.
    Shutdown(u64),
}

/// A one-shot timer thread that fires a line at a deadline.
struct Timer {
    state: Arc<(Mutex<TimerState>, Condvar)>,
}

#[derive(Default)]
struct TimerState {
    deadline: Option<Instant>,
    line: Option<Arc<dyn IrqLine>>,
    masked: bool,
    fired: u64,
}

impl Timer {
    fn new() -> Timer {
        let state: Arc<(Mutex<TimerState>, Condvar)> = Arc::default();
        let s = state.clone();
        std::thread::Builder::new()
            .name("visor-pv-timer".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    match st.deadline {
                        None => st = cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                        Some(d) => {
                            let now = Instant::now();
                            if now < d {
                                st = cv
                                    .wait_timeout(st, d - now)
                                    .unwrap_or_else(|p| p.into_inner())
                                    .0;
                                continue;
                            }
                            st.deadline = None;
                            if let (Some(line), false) = (&st.line, st.masked) {
                                let _ = line.trigger();
                                st.fired += 1;
                            }
                        }
                    }
                }
            })
            .ok();
        Timer { state }
    }

    fn with<R>(&self, f: impl FnOnce(&mut TimerState) -> R) -> R {
        let (lock, cv) = &*self.state;
        let r = f(&mut lock.lock().unwrap_or_else(|p| p.into_inner()));
        cv.notify_all();
        r
    }
}

/// Hypercall state of one VM.
pub struct Hypercalls {
    /// CPUID leaves 0x4000_0000.. advertise the ABI (`--no-pv` clears it).
    pub advertised: bool,
    page: Option<u64>,
    stub: fn(u32) -> [u8; STUB_SIZE],
    console: Box<dyn Write + Send>,
    timer: Option<Timer>,
    /// The calls made, by number.
    pub counts: [u64; nr::COUNT as usize],
}

struct Ctx<'a> {
    mem: &'a GuestMemory,
    vcpu: &'a mut dyn Vcpu,
    engine_vm: &'a dyn vcpu::Vm,
    cr3: u64,
}

impl Ctx<'_> {
    fn read<T: Default + Copy>(&self, gva: u64) -> Option<T> {
        let mut v = T::default();
        // SAFETY: T is one of the ABI's repr(C) plain-data structs (integers
        // only), for which every byte pattern is valid; the slice covers exactly
        // `v`.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(&mut v as *mut T as *mut u8, std::mem::size_of::<T>())
        };
        read_virt(self.mem, self.cr3, gva, bytes)?;
        Some(v)
    }
}

/// The segment of `sel` in the guest's GDT (read through its page tables).
fn descriptor(ctx: &Ctx, s: &vcpu::SRegs, sel: u16) -> Option<vcpu::Segment> {
    let idx = (sel & !7) as u64;
    if sel & 4 != 0 || idx == 0 || idx + 7 > s.gdt.limit as u64 {
        return None;
    }
    let raw: u64 = ctx.read(s.gdt.base.wrapping_add(idx))?;
    Some(vcpu::Segment::from_descriptor(sel, raw))
}

fn in_ram(mem: &GuestMemory, gpa: u64, len: u64) -> bool {
    len > 0
        && gpa.checked_add(len - 1).is_some_and(|last| {
            mem.address_in_range(GuestAddress(gpa)) && mem.address_in_range(GuestAddress(last))
        })
}

const EFAULT: i64 = -errno::EFAULT;
const EINVAL: i64 = -errno::EINVAL;

impl Hypercalls {
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
            counts: [0; nr::COUNT as usize],
        }
    }

    pub fn page(&self) -> Option<u64> {
        self.page
    }

    /// WRMSR to the hypercall-page MSR: `gpa | 1` fills the page with the
    /// engine's stubs. Returns false (#GP) for a bad address.
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
        for n in 0..nr::COUNT as u32 {
            let off = n as usize * STUB_SIZE;
            page[off..off + STUB_SIZE].copy_from_slice(&(self.stub)(n));
        }
        if mem.write_slice(&page, GuestAddress(gpa)).is_err() {
            return false;
        }
        self.page = Some(gpa);
        true
    }

    /// Executes the hypercall in `regs` (number in RAX, arguments in RDI, RSI,
    /// RDX, R10, R8) and leaves the result in `regs.rax`.
    pub fn call(
        &mut self,
        mem: &GuestMemory,
        vcpu: &mut dyn Vcpu,
        engine_vm: &dyn vcpu::Vm,
        regs: &mut Regs,
    ) -> Result<After, vcpu::VcpuError> {
        let cr3 = vcpu.sregs()?.cr3;
        let mut ctx = Ctx {
            mem,
            vcpu,
            engine_vm,
            cr3,
        };
        let args = [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8];
        let n = regs.rax & 0xffff_ffff;
        // Hypercalls that change the vCPU's registers themselves.
        let result = match n {
            nr::IRET => {
                self.counts[n as usize] += 1;
                match self.iret(&mut ctx, regs)? {
                    Ok(()) => return Ok(After::Resume),
                    Err(e) => e,
                }
            }
            nr::SET_EVENT_MASK => {
                self.counts[n as usize] += 1;
                let old = regs.rflags & IF == 0;
                if args[0] != 0 {
                    regs.rflags &= !IF;
                } else {
                    regs.rflags |= IF;
                }
                old as i64
            }
            _ => {
                let (result, after) = self.dispatch(&mut ctx, n, args, true)?;
                regs.rax = result as u64;
                return Ok(after);
            }
        };
        regs.rax = result as u64;
        Ok(After::Resume)
    }

    fn dispatch(
        &mut self,
        ctx: &mut Ctx,
        n: u64,
        a: [u64; 5],
        top: bool,
    ) -> Result<(i64, After), vcpu::VcpuError> {
        if let Some(c) = self.counts.get_mut(n as usize) {
            *c += 1;
        }
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
            nr::NEW_BASEPTR => {
                // The tree must be well formed: every table it links in guest RAM.
                let read = |pa: u64| ctx.mem.read_obj::<u64>(GuestAddress(pa)).ok();
                if a[0] & 0xfff != 0
                    || !in_ram(ctx.mem, a[0], 0x1000)
                    || visor_deprivileged::walk::table_frames(read, a[0]).is_err()
                {
                    EINVAL
                } else {
                    let mut s = ctx.vcpu.sregs()?;
                    s.cr3 = a[0];
                    ctx.vcpu.set_sregs(&s)?;
                    ctx.cr3 = a[0];
                    0
                }
            }
            nr::STACK_SWITCH => {
                // The kernel stack for traps from user mode: TSS.RSP0.
                let tr = ctx.vcpu.sregs()?.tr;
                if tr.limit < 0xb {
                    EINVAL
                } else {
                    match write_virt(ctx.mem, ctx.cr3, tr.base + 4, &a[1].to_le_bytes()) {
                        Some(()) => 0,
                        None => EFAULT,
                    }
                }
            }
            nr::SET_TRAP_TABLE => self.set_trap_table(ctx, a[0], a[1])?,
            nr::SET_TIMER_OP => {
                let timer = self.timer.get_or_insert_with(Timer::new);
                timer.with(|t| {
                    t.deadline = (a[0] != 0).then(|| Instant::now() + Duration::from_nanos(a[0]))
                });
                0
            }
            nr::EVENT_CHANNEL_OP => self.event_channel_op(ctx, a)?,
            nr::MULTICALL if top => self.multicall(ctx, a[0], a[1])?,
            nr::SET_GDT => self.set_gdt(ctx, a)?,
            nr::SET_CALLBACKS => self.set_callbacks(ctx, a)?,
            nr::GET_CR2 => ctx.vcpu.sregs()?.cr2 as i64,
            nr::SET_HYPERCALL_PAGE if self.advertised => {
                if self.set_page(ctx.mem, a[0]) {
                    0
                } else {
                    EINVAL
                }
            }
            // Only as the hypercall itself (they change the caller's registers).
            nr::IRET | nr::SET_EVENT_MASK => EINVAL,
            nr::MULTICALL => EINVAL,
            _ => -errno::ENOSYS,
        };
        Ok((r, After::Resume))
    }

    /// `iret()`: pops RAX, RIP, CS, RFLAGS, RSP, SS (after the stub's return
    /// address) and returns there. The code and stack segments come from the
    /// guest's GDT and must be a 64-bit kernel (RPL 0) or user (RPL 3) pair.
    fn iret(&mut self, ctx: &mut Ctx, regs: &mut Regs) -> Result<Result<(), i64>, vcpu::VcpuError> {
        let mut f = [0u64; 7];
        for (i, w) in f.iter_mut().enumerate() {
            match ctx.read::<u64>(regs.rsp.wrapping_add(8 * i as u64)) {
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
            vcpu::Segment {
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
    fn set_gdt(&mut self, ctx: &mut Ctx, a: [u64; 5]) -> Result<i64, vcpu::VcpuError> {
        let (table, entries, tss) = (a[0], a[1], a[2] as u16);
        // The TSS descriptor takes slots tss/8 and tss/8 + 1.
        let tss_fits = tss == 0 || (tss & 7 == 0 && tss as u64 / 8 + 1 < entries);
        if entries == 0 || entries > 64 || !tss_fits {
            return Ok(EINVAL);
        }
        let mut raw = Vec::with_capacity(entries as usize);
        for i in 0..entries {
            match ctx.read::<u64>(table + 8 * i) {
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
            let mut tr = vcpu::Segment::from_descriptor(tss, raw[t]);
            if tr.s || tr.type_ != 9 || !tr.present || tr.limit < 0x67 {
                return Ok(EINVAL);
            }
            tr.base |= (raw[t + 1] & 0xffff_ffff) << 32;
            tr.type_ = 0xb;
            let busy = raw[t] | desc::TSS_BUSY;
            if write_virt(ctx.mem, ctx.cr3, table + 8 * t as u64, &busy.to_le_bytes()).is_none() {
                return Ok(EFAULT);
            }
            s.tr = tr;
        }
        ctx.vcpu.set_sregs(&s)?;
        Ok(0)
    }

    /// `set_callbacks(SYSCALL, entry, star, fmask)`: the system-call MSRs,
    /// written by the VMM for a kernel that may not write them itself.
    fn set_callbacks(&mut self, ctx: &mut Ctx, a: [u64; 5]) -> Result<i64, vcpu::VcpuError> {
        if a[0] != hypercall::callback::SYSCALL || !canonical(a[1]) {
            return Ok(EINVAL);
        }
        let efer = ctx.vcpu.sregs()?.efer | efer::SCE;
        for (msr, v) in [
            (msr::STAR, a[2]),
            (msr::LSTAR, a[1]),
            (msr::FMASK, a[3] & 0xffff_ffff),
            (msr::EFER, efer),
        ] {
            if !ctx.vcpu.set_msr(msr, v)? {
                return Ok(-errno::ENOSYS);
            }
        }
        Ok(0)
    }

    /// `sched_op(BLOCK)`: the vCPU waits until the next event is due. The only
    /// event source is the one-shot timer; without one armed this returns at
    /// once (a spurious wake-up, which the ABI allows).
    fn block(&self) {
        let Some(t) = &self.timer else {
            return;
        };
        if let Some(d) = t.with(|s| s.deadline) {
            let now = Instant::now();
            if d > now {
                std::thread::sleep((d - now).min(Duration::from_secs(1)));
            }
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
        let _ = self.console.write_all(&buf);
        let _ = self.console.flush();
        len as i64
    }

    fn mmu_update(&mut self, ctx: &mut Ctx, reqs: u64, count: u64) -> Result<i64, vcpu::VcpuError> {
        let mut done = 0i64;
        for i in 0..count.min(1 << 20) {
            let Some(req) = reqs
                .checked_add(i * 16)
                .and_then(|va| ctx.read::<MmuUpdate>(va))
            else {
                break;
            };
            if !self.valid_pte_write(ctx.mem, &req) {
                break;
            }
            if ctx.mem.write_obj(req.val, GuestAddress(req.ptr)).is_err() {
                break;
            }
            ctx.vcpu.memory_written(req.ptr, 8);
            done += 1;
        }
        if done > 0 {
            // Reloading CR3 flushes the (non-global) translations the writes touched.
            let s = ctx.vcpu.sregs()?;
            ctx.vcpu.set_sregs(&s)?;
        }
        Ok(done)
    }

    /// A PTE write is allowed when the entry lies in guest RAM, 8-byte aligned,
    /// and a present entry maps guest RAM only.
    fn valid_pte_write(&self, mem: &GuestMemory, r: &MmuUpdate) -> bool {
        if r.ptr & 7 != 0 || !in_ram(mem, r.ptr, 8) {
            return false;
        }
        r.val & 1 == 0 || in_ram(mem, r.val & pte::ADDR, 0x1000)
    }

    fn set_trap_table(
        &mut self,
        ctx: &mut Ctx,
        ptr: u64,
        count: u64,
    ) -> Result<i64, vcpu::VcpuError> {
        if count > 256 {
            return Ok(EINVAL);
        }
        let mut entries = Vec::with_capacity(count as usize);
        for i in 0..count {
            match ctx.read::<TrapInfo>(ptr + i * 16) {
                Some(t) => entries.push(t),
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

    fn event_channel_op(&mut self, ctx: &Ctx, a: [u64; 5]) -> Result<i64, vcpu::VcpuError> {
        use hypercall::event::*;
        match (a[0], a[1]) {
            (BIND_VIRQ, VIRQ_TIMER) => {
                let Ok(vector) = u8::try_from(a[2]) else {
                    return Ok(EINVAL);
                };
                if vector < 32 {
                    return Ok(EINVAL);
                }
                match ctx.engine_vm.vector_line(vector)? {
                    Some(line) => {
                        let timer = self.timer.get_or_insert_with(Timer::new);
                        timer.with(|t| t.line = Some(line));
                        Ok(0)
                    }
                    None => Ok(-errno::ENOSYS),
                }
            }
            (MASK, VIRQ_TIMER) => {
                let timer = self.timer.get_or_insert_with(Timer::new);
                timer.with(|t| t.masked = a[2] != 0);
                Ok(0)
            }
            _ => Ok(EINVAL),
        }
    }

    fn multicall(&mut self, ctx: &mut Ctx, ptr: u64, count: u64) -> Result<i64, vcpu::VcpuError> {
        const SIZE: u64 = std::mem::size_of::<MulticallEntry>() as u64;
        for i in 0..count.min(1024) {
            let at = ptr + i * SIZE;
            let Some(e) = ctx.read::<MulticallEntry>(at) else {
                return Ok(EFAULT);
            };
            let (r, after) = self.dispatch(ctx, e.nr, e.args, false)?;
            if write_virt(ctx.mem, ctx.cr3, at + SIZE - 8, &r.to_le_bytes()).is_none() {
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
