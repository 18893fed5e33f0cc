//! What the CPU hands to an engine instead of doing itself.
//!
//! The `emu` engine lets the CPU deliver every event through the guest's IDT.
//! Engines that deprivilege the guest kernel (`trap`, `pv`) own the real CPU:
//! they ask for exceptions, software interrupts, SYSCALL and ready interrupts
//! as exits ([`Intercepts`]), keep the guest's view of the CPU themselves, and
//! use the small API here to change the real state: RAM access that keeps the
//! decoded-code cache coherent, TLB flushes, the current instruction, and a
//! one-instruction grant of CPL 0 rights for instructions whose effect they
//! want the CPU to carry out (port I/O, pass-through MSRs).
//!
//! Sensitive unprivileged instructions (Robin & Irvine's list) are what makes
//! x86 not classically virtualizable: at CPL 1 they run without faulting and
//! show the deprivileging. With [`Intercepts::sensitive`] the CPU stops before
//! each of them when CPL is 1 or 2, so an engine can report the hole or emulate it.
//! Of that list, the far transfers (CALL, JMP, RET far), INT n, POP and MOV to
//! a segment register are not here: given kernel descriptors of DPL 0 they
//! fault at CPL 1 (or are intercepted, INT n) and reach the engine anyway.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use crate::{sreg, Cpu, CpuExit, Pending, Stop, R};

/// What happens with an interrupt of the local device that is ready.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IrqMode {
    /// Delivered through the IDT when RFLAGS.IF allows (bare hardware).
    #[default]
    Deliver,
    /// [`CpuExit::Interrupt`] when RFLAGS.IF allows and no interrupt shadow is
    /// active; the interrupt stays pending in the device.
    Exit,
    /// Left pending: the engine's guest has interrupts masked virtually.
    Hold,
}

/// Events that exit to the engine instead of being carried out.
#[derive(Clone, Copy, Debug, Default)]
pub struct Intercepts {
    /// Exceptions, one bit per vector: [`CpuExit::Exception`] instead of delivery.
    /// Bit 2 takes NMIs of the local device the same way (`vector` 2, no
    /// code, RIP the next instruction): the NMI is taken and NMIs stay
    /// blocked until the CPU runs an IRET or the engine calls
    /// [`Cpu::end_nmi_blocking`] for an IRET it carried out.
    pub exceptions: u32,
    /// INT n, INT3, INTO, INT1: [`CpuExit::SoftInt`].
    pub soft_int: bool,
    /// SYSCALL: [`CpuExit::Syscall`].
    pub syscall: bool,
    /// Ready interrupts of the local device.
    pub irq: IrqMode,
    /// Sensitive unprivileged instructions at CPL 1 or 2, the stores of
    /// system registers (SGDT, SIDT, SLDT, STR, SMSW) at CPL 3, and SGDT,
    /// SIDT and SMSW in virtual-8086 mode: [`CpuExit::Sensitive`].
    pub sensitive: bool,
    /// CPUID faulting (Intel's MISC_FEATURES_ENABLES bit 0): CPUID at CPL > 0
    /// raises #GP.
    pub cpuid_faulting: bool,
}

/// The mnemonic of a sensitive unprivileged instruction (they read or write
/// state that tells the privilege level, or behave differently by it, but do
/// not fault at CPL > 0), or `None`.
pub fn sensitive(i: &Instruction) -> Option<&'static str> {
    let seg_reg = |op: u32| {
        i.op_kind(op) == OpKind::Register
            && matches!(
                i.op_register(op),
                Register::CS
                    | Register::SS
                    | Register::DS
                    | Register::ES
                    | Register::FS
                    | Register::GS
            )
    };
    Some(match i.mnemonic() {
        M::Sgdt => "sgdt",
        M::Sidt => "sidt",
        M::Sldt => "sldt",
        M::Str => "str",
        M::Smsw => "smsw",
        M::Pushf | M::Pushfd | M::Pushfq => "pushf",
        M::Popf | M::Popfd | M::Popfq => "popf",
        M::Lar => "lar",
        M::Lsl => "lsl",
        M::Verr => "verr",
        M::Verw => "verw",
        M::Mov if seg_reg(1) => "mov from sreg",
        M::Push if seg_reg(0) => "push sreg",
        _ => return None,
    })
}

impl Cpu {
    /// Stops the current instruction with an exit for the engine.
    pub(crate) fn event_exit<T>(&mut self, exit: CpuExit) -> R<T> {
        self.pending = Pending::Event(exit);
        Err(Stop::Exit)
    }

    /// The current privilege level.
    pub fn cpl(&self) -> u8 {
        self.cpl
    }

    /// Recomputes the cached mode after the engine changed segments, CR0,
    /// CR4, EFER or RFLAGS.VM directly.
    pub fn refresh_mode(&mut self) {
        self.mode_changed();
    }

    /// Drops TLB entries (global ones too if `all`).
    pub fn flush_tlb(&mut self, all: bool) {
        self.tlb_flush(all);
    }

    /// Drops the TLB entry of linear address `lin`.
    pub fn flush_tlb_page(&mut self, lin: u64) {
        self.tlb_flush_page(lin);
    }

    /// Blocks interrupts until the next instruction completes (the STI shadow
    /// of an emulated STI).
    pub fn set_interrupt_shadow(&mut self) {
        self.inhibit = true;
    }

    /// The instruction at the old RIP was emulated by the engine in place of
    /// the CPU (which faulted on it) and completed: it owes the single-step
    /// trap the CPU gives an instruction it runs (SDM vol. 3 18.3.1.4) if
    /// TF was set when it started (`tf_before`: an IRET or POPF that sets
    /// TF traps only after the next instruction). After MOV SS or POP SS
    /// (`loads_ss`) the #DB waits for the next instruction and interrupts
    /// are blocked for it (SDM vol. 3 6.8.3). Data breakpoints of the
    /// engine's own accesses are not raised.
    pub fn emulated_instruction_done(&mut self, tf_before: bool, loads_ss: bool) {
        self.db_hits = 0;
        if loads_ss {
            self.inhibit = true;
            self.ss_shadow = true;
        }
        self.db_trap = self.debug_after(tf_before, false);
        self.ss_shadow = false;
    }

    /// Lets the next instruction run with CPL 0 rights for port I/O, RDMSR,
    /// WRMSR and the other CPL-0-only checks; the grant ends when an
    /// instruction completes or faults.
    pub fn grant_privilege_once(&mut self) {
        self.grant = true;
    }

    /// Whether the instruction at RIP runs (or just faulted) with the grant
    /// of `grant_privilege_once`: its fault is then the instruction's own.
    pub fn privilege_granted(&self) -> bool {
        self.grant
    }

    /// Lets the next instruction run without the sensitive-instruction stop
    /// (the engine chose to let the hole happen).
    pub fn allow_sensitive_once(&mut self) {
        self.sensitive_ok = true;
    }

    /// An IRET the engine carried out for its guest (an emulated IRET of a
    /// deprivileged kernel): it ends NMI blocking, as the CPU's own IRET
    /// does (SDM vol. 3 6.7.1).
    pub fn end_nmi_blocking(&mut self) {
        self.vmx.nmi_blocked = false;
    }

    /// Whether an NMI of the local device is ready and not blocked: it wakes
    /// a halted CPU whatever RFLAGS.IF says.
    pub fn nmi_deliverable(&mut self) -> bool {
        !self.vmx.nmi_blocked && self.local.as_ref().is_some_and(|l| l.nmi_pending())
    }

    /// Ends the grants of `grant_privilege_once` and `allow_sensitive_once`
    /// (the instruction will not run again: the engine delivered an event).
    pub fn revoke_grants(&mut self) {
        self.grant = false;
        self.sensitive_ok = false;
    }

    /// Protects exactly `frames` (physical page addresses of RAM) from writes
    /// at CPL > 0: such a write raises #PF (present, write) as if the page
    /// were read-only. The `pv` engine keeps a guest's live page tables so.
    pub fn set_write_protected(&mut self, frames: &[u64]) {
        let mut bits = Vec::new();
        if !frames.is_empty() {
            bits.resize(((self.mem.end() >> 12) as usize).div_ceil(64) + 1, 0);
            for &f in frames {
                let i = (f >> 12) as usize;
                if let Some(w) = bits.get_mut(i >> 6) {
                    *w |= 1 << (i & 63);
                }
            }
        }
        // The same set (the usual case): the TLB's write permissions stand.
        if bits != self.wp_frames {
            self.wp_frames = bits;
            self.tlb_flush(true);
        }
    }

    /// Whether physical page `ppage` is write-protected by the engine.
    #[inline]
    pub fn write_protected(&self, ppage: u64) -> bool {
        let i = (ppage >> 12) as usize;
        !self.wp_frames.is_empty()
            && self
                .wp_frames
                .get(i >> 6)
                .is_some_and(|w| (w >> (i & 63)) & 1 != 0)
    }

    /// Decodes the instruction at RIP (through the current page tables).
    /// An exception (vector, error code) if it cannot be fetched.
    pub fn current_instruction(&mut self) -> Result<Instruction, (u8, Option<u32>)> {
        let mut i = Instruction::default();
        match self.fetch(&mut i) {
            Ok(()) => Ok(i),
            Err(Stop::Exc(v, c)) => Err((v, c)),
            // The engines that ask do not run VMX non-root code.
            Err(Stop::Exit | Stop::VmExit) => {
                self.pending = Pending::None;
                Err((arch::vector::GP, Some(0)))
            }
        }
    }

    /// A general-purpose or segment register as iced-x86 names it.
    pub fn register(&self, r: Register) -> u64 {
        if r.is_segment_register() {
            return self.seg[seg_index(r)].selector as u64;
        }
        self.reg(r)
    }

    /// Writes a general-purpose register (with x86's partial-write rules).
    pub fn set_register(&mut self, r: Register, v: u64) {
        self.set_reg(r, v);
    }

    /// The linear address of the memory operand of `i` (segment base
    /// included), or `None` if it is not canonical or `i` has none.
    pub fn memory_operand_address(&self, i: &Instruction) -> Option<u64> {
        (0..i.op_count()).find(|&k| i.op_kind(k) == OpKind::Memory)?;
        self.mem_lin(i).ok()
    }

    /// Reads guest RAM at physical `pa`; false if any byte is not RAM.
    pub fn ram_read(&self, pa: u64, buf: &mut [u8]) -> bool {
        self.mem.read(pa, buf)
    }

    /// Reads a little-endian u64 of RAM at physical `pa` (a page-table entry).
    pub fn ram_read_u64(&self, pa: u64) -> Option<u64> {
        self.mem.read_u64(pa)
    }

    /// Writes guest RAM at physical `pa`, dropping decoded instructions the
    /// bytes replace; false (nothing written) if any byte is not RAM.
    pub fn ram_write(&mut self, pa: u64, buf: &[u8]) -> bool {
        if self.mem.host(pa, buf.len() as u64).is_none() {
            return false;
        }
        self.phys_write(pa, buf).is_ok()
    }

    /// One past the highest address of the guest's RAM.
    pub fn ram_end(&self) -> u64 {
        self.mem.end()
    }
}

/// The index into `Cpu::seg` (the `sreg` numbers) of a segment register.
pub fn seg_index(r: Register) -> usize {
    match r {
        Register::ES => sreg::ES,
        Register::CS => sreg::CS,
        Register::SS => sreg::SS,
        Register::DS => sreg::DS,
        Register::FS => sreg::FS,
        _ => sreg::GS,
    }
}
