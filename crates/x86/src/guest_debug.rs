//! Guest debugging by the VMM (a debugger attached to visor, the software
//! engines' `KVM_SET_GUEST_DEBUG`): breakpoints, watchpoints and single-step
//! that the guest cannot see. Nothing here touches the architectural debug
//! registers or RFLAGS.TF: the CPU compares RIP at each instruction
//! boundary, and the linear addresses of data accesses on the slow path,
//! where the TLB sends every access to a page with a watched byte.
//!
//! While it is on, [`Cpu::run`] runs one instruction at a time (no bursts
//! of uops, no accelerator).

use vcpu::{DebugEvent, GuestDebug, WatchKind, Watchpoint};

use crate::mmu::{A_R_S, A_R_U, A_W_S, A_W_U};
use crate::{Cpu, CpuExit};

/// The VMM's debug state of one CPU.
#[derive(Clone, Debug, Default)]
pub(crate) struct DebugState {
    /// Anything is asked (the checks run).
    pub active: bool,
    step: bool,
    /// Breakpoints, software and hardware alike: RIP values.
    breakpoints: Vec<u64>,
    watch: Vec<Watchpoint>,
    /// RIP and instructions retired when the VMM last resumed (or the last
    /// event was reported): a breakpoint at that RIP is not reported again
    /// before an instruction runs (what RFLAGS.RF does for DR breakpoints),
    /// and a step ends when either changes.
    start: (u64, u64),
    /// A watchpoint the current instruction hit (reported after it).
    hit: Option<DebugEvent>,
}

impl DebugState {
    /// Whether interrupts are held (a step runs one guest instruction, not
    /// an interrupt handler), unless the CPU is halted.
    pub(crate) fn holds_interrupts(&self, halted: bool) -> bool {
        self.step && !halted
    }
}

impl Cpu {
    /// Sets what the VMM's debugger asks (see [`GuestDebug`]); the CPU
    /// resumes from its current RIP (a breakpoint there is passed).
    pub fn set_guest_debug(&mut self, d: &GuestDebug) {
        let watch_changed = self.debug.watch != d.watchpoints;
        let mut bps: Vec<u64> = d
            .breakpoints
            .iter()
            .chain(&d.hw_breakpoints)
            .copied()
            .collect();
        bps.sort_unstable();
        bps.dedup();
        self.debug = DebugState {
            active: d.is_active(),
            step: d.single_step,
            breakpoints: bps,
            watch: d
                .watchpoints
                .iter()
                .filter(|w| w.len > 0)
                .copied()
                .collect(),
            start: (self.rip, self.retired),
            hit: None,
        };
        if watch_changed {
            // Entries of watched pages lose their fast access.
            self.tlb_flush(true);
        }
    }

    /// Whether the VMM's debugger asks anything of this CPU (an engine with
    /// a faster way to run code than the interpreter stays with the
    /// interpreter then).
    pub fn guest_debug_active(&self) -> bool {
        self.debug.active
    }

    /// The checks at an instruction boundary while debugging is on: a
    /// watchpoint the last instruction hit, the end of a step, a breakpoint
    /// at RIP.
    pub(crate) fn debug_boundary(&mut self) -> Option<CpuExit> {
        let d = &mut self.debug;
        let now = (self.rip, self.retired);
        let event = if let Some(hit) = d.hit.take() {
            Some(hit)
        } else if d.step && now != d.start {
            Some(DebugEvent::Step)
        } else if d.breakpoints.binary_search(&self.rip).is_ok() && now != d.start {
            Some(DebugEvent::Breakpoint)
        } else {
            None
        };
        if event.is_some() {
            d.start = now;
        }
        event.map(CpuExit::Debug)
    }

    /// The TLB access bits that entries of linear page `vpage` lose, so that
    /// accesses there take the slow path and meet [`Cpu::debug_access`].
    pub(crate) fn debug_slow_bits(&self, vpage: u64) -> u8 {
        let mut bits = 0;
        for w in &self.debug.watch {
            let last = w.addr.saturating_add(w.len - 1);
            if w.addr <= vpage | 0xfff && last >= vpage {
                if w.kind != WatchKind::Read {
                    bits |= A_W_S | A_W_U;
                }
                if w.kind != WatchKind::Write {
                    bits |= A_R_S | A_R_U;
                }
            }
        }
        bits
    }

    /// A data access of `len` bytes at linear `lin` (`write` or read) that
    /// passed its checks: a watchpoint it touches is reported after the
    /// instruction.
    #[cold]
    pub(crate) fn debug_access(&mut self, lin: u64, len: usize, write: bool) {
        let last = lin.saturating_add(len.max(1) as u64 - 1);
        let kind = if write {
            WatchKind::Write
        } else {
            WatchKind::Read
        };
        for w in &self.debug.watch {
            let caught = match w.kind {
                WatchKind::Access => true,
                k => k == kind,
            };
            let wlast = w.addr.saturating_add(w.len - 1);
            if caught && lin <= wlast && last >= w.addr && self.debug.hit.is_none() {
                self.debug.hit = Some(DebugEvent::Watch {
                    addr: lin.max(w.addr),
                    kind,
                });
            }
        }
    }

    /// Reads guest-physical RAM at `pa` for a debugger; false if it is not
    /// all RAM.
    pub fn debug_read_phys(&self, pa: u64, buf: &mut [u8]) -> bool {
        self.mem.read(pa, buf)
    }

    /// The local device's state in a few lines (`monitor regs`), if the
    /// CPU has one.
    pub fn debug_local_state(&self) -> Option<String> {
        self.local.as_ref().map(|l| l.describe())
    }

    /// Whether data accesses are to be checked against watchpoints.
    #[inline(always)]
    pub(crate) fn watching(&self) -> bool {
        !self.debug.watch.is_empty()
    }
}
