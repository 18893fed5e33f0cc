//! Debug registers and single-step (SDM vol. 3 ch. 18): DR0-DR3, DR6 and
//! DR7 (DR4/DR5 alias DR6/DR7 unless CR4.DE), MOV DR with DR7.GD, instruction
//! breakpoints (faults, suppressed by RFLAGS.RF), data breakpoints on reads
//! and writes and I/O breakpoints with CR4.DE (traps), single-step with
//! RFLAGS.TF, and the one-instruction delay of both after MOV SS and POP SS.
//!
//! While no breakpoint is enabled and TF and RF are clear the run loop does
//! not come here, so the checks cost nothing on the common path. Data
//! breakpoints take the fast TLB access away from the pages they watch, so
//! every access to them goes through the slow path, which reports hits.

use arch::paging::Access;
use arch::rflags::{RF, TF};
use arch::{cr4, vector};

use crate::{exc, exc_code, Cpu, R};

/// DR6 bits that read as 1 whatever is written (no RTM: bit 16 too).
const DR6_FIXED1: u64 = 0xffff_0ff0;
/// DR6 bits software can write: B0-B3, BD, BS, BT.
const DR6_WRITABLE: u64 = 0xe00f;
/// DR7 bit 10 reads as 1.
const DR7_FIXED1: u64 = 0x400;
/// DR7 bits software can write: L0-G3, LE, GE, GD, R/W and LEN fields.
const DR7_WRITABLE: u64 = 0xffff_23ff;
/// DR7.GD: MOV DR raises #DB.
const DR7_GD: u64 = 1 << 13;
/// DR6.BD: the #DB is MOV DR's with GD.
const DR6_BD: u64 = 1 << 13;
/// DR6.BS: single-step.
const DR6_BS: u64 = 1 << 14;

/// The debug registers.
#[derive(Clone, Debug)]
pub struct DebugRegs {
    /// DR0-DR3: breakpoint linear addresses (I/O ports with R/W = 10).
    pub addr: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
}

impl Default for DebugRegs {
    fn default() -> Self {
        DebugRegs {
            addr: [0; 4],
            dr6: DR6_FIXED1,
            dr7: DR7_FIXED1,
        }
    }
}

impl DebugRegs {
    /// Breakpoint `n` is enabled (locally or globally).
    fn enabled(&self, n: usize) -> bool {
        self.dr7 >> (2 * n) & 3 != 0
    }

    /// The R/W field of breakpoint `n`: 0 execute, 1 write, 2 I/O, 3 read
    /// or write.
    fn kind(&self, n: usize) -> u64 {
        self.dr7 >> (16 + 4 * n) & 3
    }

    /// The length of breakpoint `n` in bytes.
    fn len(&self, n: usize) -> u64 {
        match self.dr7 >> (18 + 4 * n) & 3 {
            0 => 1,
            1 => 2,
            2 => 8,
            _ => 4,
        }
    }

    /// Whether an enabled breakpoint of a kind in `kinds` (bit per R/W
    /// value) covers any byte of `[start, start + len)`: the DR6 bits of
    /// those that do.
    fn hits(&self, kinds: u8, start: u64, len: u64) -> u64 {
        let mut b = 0;
        for n in 0..4 {
            if !self.enabled(n) || kinds & (1 << self.kind(n)) == 0 {
                continue;
            }
            let l = self.len(n);
            let a = self.addr[n] & !(l - 1);
            let end = start.wrapping_add(len);
            if start < a.wrapping_add(l) && a < end {
                b |= 1 << n;
            }
        }
        b
    }

    /// Some data breakpoint (write, or read/write) is enabled.
    fn watching(&self) -> bool {
        (0..4).any(|n| self.enabled(n) && self.kind(n) & 1 != 0)
    }
}

impl Cpu {
    /// Whether the run loop must take the debug path for the next
    /// instruction: TF or RF set, a breakpoint enabled, or a #DB deferred
    /// by MOV SS.
    #[inline(always)]
    pub(crate) fn debug_active(&self) -> bool {
        self.rflags & (TF | RF) != 0 || self.dbg.dr7 & 0xff != 0 || self.db_deferred != 0
    }

    /// MOV from DRn.
    pub(crate) fn read_dr(&mut self, n: usize) -> R<u64> {
        let n = self.dr_index(n)?;
        Ok(match n {
            0..=3 => self.dbg.addr[n],
            6 => self.dbg.dr6,
            _ => self.dbg.dr7,
        })
    }

    /// MOV to DRn.
    pub(crate) fn write_dr(&mut self, n: usize, v: u64) -> R<()> {
        let n = self.dr_index(n)?;
        match n {
            0..=3 => self.dbg.addr[n] = v,
            6 | 7 if v >> 32 != 0 => return exc_code(vector::GP, 0),
            6 => self.dbg.dr6 = (v & DR6_WRITABLE) | DR6_FIXED1,
            _ => self.dbg.dr7 = (v & DR7_WRITABLE) | DR7_FIXED1,
        }
        self.watch_changed();
        Ok(())
    }

    /// DR7 loaded by VM entry or exit.
    pub(crate) fn load_dr7(&mut self, v: u64) {
        self.dbg.dr7 = (v & DR7_WRITABLE) | DR7_FIXED1;
        self.watch_changed();
    }

    /// The checks of MOV DR (SDM vol. 2 MOV DR): CPL 0, DR4/DR5 with
    /// CR4.DE (#UD) or as DR6/DR7, and DR7.GD (#DB with DR6.BD, a fault).
    fn dr_index(&mut self, n: usize) -> R<usize> {
        self.require_cpl0()?;
        let n = match n {
            4 | 5 if self.cr4 & cr4::DE != 0 => return exc(vector::UD),
            4 | 5 => n + 2,
            8.. => return exc(vector::UD),
            _ => n,
        };
        if self.dbg.dr7 & DR7_GD != 0 {
            self.dbg.dr6 |= DR6_BD;
            return exc(vector::DB);
        }
        Ok(n)
    }

    /// Data breakpoints changed: the TLB forgets which pages lose fast
    /// access.
    fn watch_changed(&mut self) {
        let watching = self.dbg.watching();
        if watching || self.watching {
            self.tlb_flush(true);
        }
        self.watching = watching;
    }

    /// Whether the page at linear `vpage` holds a byte a data breakpoint
    /// watches (its TLB entry then gets no fast read or write access).
    pub(crate) fn watched_page(&self, vpage: u64) -> bool {
        self.watching && self.dbg.hits(0b1010, vpage, 0x1000) != 0
    }

    /// A data access of `len` bytes at `lin` (slow path): records the
    /// breakpoints it hits (the #DB comes after the instruction).
    #[inline]
    pub(crate) fn watch_access(&mut self, lin: u64, len: usize, acc: Access) {
        if self.watching && acc != Access::Exec {
            let kinds = if acc == Access::Write { 0b1010 } else { 0b1000 };
            self.db_hits |= self.dbg.hits(kinds, lin, len as u64);
        }
    }

    /// Port I/O of `len` bytes at `port`: I/O breakpoints with CR4.DE.
    pub(crate) fn watch_io(&mut self, port: u16, len: usize) {
        if self.cr4 & cr4::DE != 0 && self.dbg.dr7 & 0xff != 0 {
            self.db_hits |= self.dbg.hits(0b0100, port as u64, len as u64);
        }
    }

    /// Before an instruction on the debug path: an instruction breakpoint
    /// at its linear address (unless RF) is a #DB fault. RF is cleared
    /// once the instruction passes the check.
    pub(crate) fn debug_before(&mut self) -> R<()> {
        self.ibp_fault = false;
        if self.rflags & RF == 0 && self.dbg.dr7 & 0xff != 0 {
            let lin = self.seg[crate::sreg::CS].base.wrapping_add(self.rip);
            let lin = if self.long64 { lin } else { lin & 0xffff_ffff };
            let hit = self.dbg.hits(0b0001, lin, 1);
            if hit != 0 {
                self.dbg.dr6 = (self.dbg.dr6 & !0xf) | hit;
                self.ibp_fault = true;
                return exc(vector::DB);
            }
        }
        self.rflags &= !RF;
        Ok(())
    }

    /// After an instruction completed on the debug path: the traps it
    /// raised (data and I/O breakpoints, single-step if TF was set when it
    /// started), deferred by one instruction after MOV SS or POP SS. Returns
    /// whether a #DB is to be delivered now.
    pub(crate) fn debug_after(&mut self, tf_before: bool, soft_int: bool) -> bool {
        let mut b = std::mem::take(&mut self.db_hits) | self.db_deferred;
        self.db_deferred = 0;
        if tf_before && !soft_int {
            b |= DR6_BS;
        }
        if b == 0 {
            return false;
        }
        if self.ss_shadow {
            // MOV SS / POP SS: the #DB waits for the next instruction.
            self.db_deferred = b;
            return false;
        }
        let hits = b & 0xf;
        if hits != 0 {
            self.dbg.dr6 &= !0xf;
        }
        self.dbg.dr6 |= b;
        true
    }

    /// Delivery of #DB clears DR7.GD (SDM vol. 3 18.2.4).
    pub(crate) fn debug_delivered(&mut self) {
        self.dbg.dr7 &= !DR7_GD;
    }
}
