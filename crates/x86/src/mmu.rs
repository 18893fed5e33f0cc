//! Linear and physical memory access: the software TLB, filled by the guest
//! page walker of `arch` (4-level, PAE, 2-level), page faults, and MMIO.

use arch::paging::{self, Access, PageTables, Paging, Reserved, WalkError};
use arch::{cr0, vector};

use crate::mem::{load, store};
use crate::{exc_code, Cpu, CpuExit, Stop, R};

pub(crate) const TLB_SIZE: usize = 4096;

/// Access bits of a TLB entry: read/write/execute for supervisor and user.
pub(crate) const A_R_S: u8 = 1;
pub(crate) const A_W_S: u8 = 2;
pub(crate) const A_X_S: u8 = 4;
pub(crate) const A_R_U: u8 = 8;
pub(crate) const A_W_U: u8 = 16;
pub(crate) const A_X_U: u8 = 32;

/// One TLB entry. `repr(C)`: translated code reads `vpage`, `host` and
/// `allow` at the offsets [`TlbProbe`] gives.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct TlbEntry {
    /// Linear page address; `u64::MAX` when invalid (never page-aligned).
    pub vpage: u64,
    /// Physical page address.
    pub ppage: u64,
    /// Host address of the page, 0 if it is not RAM.
    pub host: usize,
    pub allow: u8,
    pub global: bool,
    /// A piece of a 2 MiB, 4 MiB or 1 GiB page.
    pub large: bool,
    /// A piece of a 1 GiB page.
    pub huge: bool,
}

impl TlbEntry {
    pub const INVALID: TlbEntry = TlbEntry {
        vpage: u64::MAX,
        ppage: 0,
        host: 0,
        allow: 0,
        global: false,
        large: false,
        huge: false,
    };
}

/// What translated code needs to probe the software TLB itself (engine
/// `bt`): where the entries are and how to read one. An entry for a linear
/// page gives its host address when its `allow` byte has the bit of the
/// access (`acc_r` or `acc_w` for the current CPL: write access is only
/// there once the dirty bit is set and the page holds no decoded code, and
/// neither is there for a page that is not RAM). Valid until the CPU is
/// dropped; the entries change whenever the CPU runs.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct TlbProbe {
    /// The first entry.
    pub base: u64,
    /// The number of entries minus one (indexed by linear page number).
    pub mask: u64,
    /// The `allow` bit of a read at the current CPL.
    pub acc_r: u64,
    /// The `allow` bit of a write at the current CPL.
    pub acc_w: u64,
    /// The `allow` bit of an instruction fetch at the current CPL.
    pub acc_x: u64,
}

/// The size of an entry (a power of two, so that translated code can
/// index the TLB by shifting), and the offsets of its linear page, host
/// address and access bits.
pub const TLB_ENTRY_SIZE: usize = std::mem::size_of::<TlbEntry>();
const _: () = assert!(TLB_ENTRY_SIZE.is_power_of_two());
/// Offset of the linear page in an entry.
pub const TLB_VPAGE: usize = std::mem::offset_of!(TlbEntry, vpage);
/// Offset of the host address of the page.
pub const TLB_HOST: usize = std::mem::offset_of!(TlbEntry, host);
/// Offset of the access-bits byte.
pub const TLB_ALLOW: usize = std::mem::offset_of!(TlbEntry, allow);
/// Offset of the physical page address.
pub const TLB_PPAGE: usize = std::mem::offset_of!(TlbEntry, ppage);

impl Cpu {
    /// The software TLB, for translated code that probes it.
    pub fn tlb_probe(&self) -> TlbProbe {
        TlbProbe {
            base: self.tlb.as_ptr() as u64,
            mask: (TLB_SIZE - 1) as u64,
            acc_r: self.acc_r as u64,
            acc_w: self.acc_w as u64,
            acc_x: self.acc_x as u64,
        }
    }
}

#[inline(always)]
fn tlb_index(lin: u64) -> usize {
    (lin >> 12) as usize & (TLB_SIZE - 1)
}

impl Cpu {
    /// Drops TLB entries (the global ones too if `all`).
    pub(crate) fn tlb_flush(&mut self, all: bool) {
        let (mut large, mut huge) = (false, false);
        for e in self.tlb.iter_mut() {
            if all || !e.global {
                *e = TlbEntry::INVALID;
            } else {
                large |= e.large;
                huge |= e.huge;
            }
        }
        self.tlb_has_large = large;
        self.tlb_has_huge = huge;
        self.code.reset_fetch();
    }

    /// INVLPG.
    pub(crate) fn tlb_flush_page(&mut self, lin: u64) {
        if self.tlb_has_huge {
            // 4 KiB pieces of a 1 GiB page may sit anywhere in the TLB.
            self.tlb_flush(true);
            return;
        }
        if self.tlb_has_large {
            // Each 4 KiB piece of a 2 MiB or 4 MiB page sits at the index
            // of its own linear page: those of the 4 MiB-aligned region
            // around `lin` hold every piece of the page that holds it.
            let region = lin & !0x3f_ffff;
            for k in 0..0x400u64 {
                let v = region.wrapping_add(k << 12);
                let e = &mut self.tlb[tlb_index(v)];
                if e.large && e.vpage == v {
                    *e = TlbEntry::INVALID;
                }
            }
        }
        let e = &mut self.tlb[tlb_index(lin)];
        if e.vpage == lin & !0xfff {
            *e = TlbEntry::INVALID;
        }
        self.code.reset_fetch();
    }

    /// Takes away fast write access to physical page `ppage` (it now holds
    /// decoded code, so writes must go through the slow path).
    pub(crate) fn tlb_protect_code(&mut self, ppage: u64) {
        for e in self.tlb.iter_mut() {
            if e.ppage == ppage && e.vpage != u64::MAX {
                e.allow &= !(A_W_S | A_W_U);
            }
        }
    }

    /// Translates `lin` for an access of kind `acc` needing TLB bit `need`:
    /// (physical address, TLB entry host address of the page).
    #[inline]
    pub(crate) fn translate(&mut self, lin: u64, acc: Access, need: u8) -> R<(u64, usize)> {
        let e = &self.tlb[tlb_index(lin)];
        if e.vpage == lin & !0xfff && e.allow & need != 0 {
            return Ok((e.ppage | (lin & 0xfff), e.host));
        }
        let e = self.tlb_fill(lin, acc, need)?;
        Ok((e.ppage | (lin & 0xfff), e.host))
    }

    fn tlb_fill(&mut self, lin: u64, acc: Access, need: u8) -> R<TlbEntry> {
        let user = need & (A_R_U | A_W_U | A_X_U) != 0;
        let mut e = if self.cr0 & cr0::PG == 0 {
            let ppage = lin & 0xffff_f000;
            TlbEntry {
                vpage: lin & !0xfff,
                ppage,
                host: 0,
                allow: 0x3f,
                global: false,
                large: false,
                huge: false,
            }
        } else {
            self.walk(lin, acc, user)?
        };
        self.ept_leaf(&mut e, lin, acc)?;
        e.host = self.mem.host(e.ppage, 0x1000).map_or(0, |p| p as usize);
        if e.host == 0 {
            // MMIO: no fast read or write (each access walks again), so a
            // probe of translated code needs no check of the host address.
            e.allow &= !(A_R_S | A_W_S | A_R_U | A_W_U);
        }
        if self.code.is_code(e.ppage) {
            e.allow &= !(A_W_S | A_W_U);
        }
        if self.watching() {
            e.allow &= !self.debug_slow_bits(e.vpage);
        }
        if self.watched_page(e.vpage) {
            // A data breakpoint: every access to the page takes the slow
            // path, which reports hits.
            e.allow &= !(A_R_S | A_W_S | A_R_U | A_W_U);
        }
        if self.write_protected(e.ppage) {
            // An engine's protected frame: no write below CPL 0.
            if acc == Access::Write && self.cpl > 0 {
                let pg = self.paging();
                return self.pf(lin, pg.fault_code(true, acc, user, false));
            }
            e.allow &= !(A_W_S | A_W_U);
        }
        self.tlb_has_large |= e.large;
        self.tlb_has_huge |= e.huge;
        self.tlb[tlb_index(lin)] = e;
        // The entry may not allow this access (a write to a code page): the
        // caller takes the slow path with it anyway.
        let _ = need;
        Ok(e)
    }

    /// The paging the CPU's control registers select, with every reserved
    /// bit checked at the model's MAXPHYADDR.
    fn paging(&self) -> Paging {
        Paging {
            reserved: Reserved::Full {
                phys_bits: self.maxphyaddr,
            },
            ..Paging::new(self.cr0, self.cr3, self.cr4, self.efer)
        }
    }

    /// Raises #PF for `lin` with error code `code`.
    fn pf<T>(&mut self, lin: u64, code: u32) -> R<T> {
        // A #PF VM exit leaves CR2 alone: the value before is kept for it.
        self.vmx.cr2_before_pf = std::mem::replace(&mut self.cr2, lin);
        exc_code(vector::PF, code)
    }

    /// Walks the page tables for `lin`: the TLB entry of its page, with the
    /// accesses the tables allow.
    fn walk(&mut self, lin: u64, acc: Access, user: bool) -> R<TlbEntry> {
        let pg = self.paging();
        let t = match paging::walk(&mut Tables { cpu: self, lin }, &pg, lin, acc, user) {
            Ok(t) => t,
            Err(WalkError::PageFault(code)) => return self.pf(lin, code),
            Err(WalkError::Tables(stop)) => return Err(stop),
        };
        let mut allow = A_R_S;
        if !t.nx {
            allow |= A_X_S;
        }
        if t.dirty && (t.writable || !pg.wp) {
            allow |= A_W_S;
        }
        if t.user {
            allow |= A_R_U;
            if !t.nx {
                allow |= A_X_U;
            }
            if t.dirty && t.writable {
                allow |= A_W_U;
            }
        }
        Ok(TlbEntry {
            vpage: lin & !0xfff,
            ppage: t.page,
            host: 0,
            allow,
            global: t.global,
            large: t.size_shift > 12,
            huge: t.size_shift >= 30,
        })
    }

    // ---- linear accesses -------------------------------------------------

    /// Reads `size` (1, 2, 4, 8) bytes at linear `lin` with the CPL's rights.
    #[inline]
    pub(crate) fn rd(&mut self, lin: u64, size: usize) -> R<u64> {
        let need = self.acc_r;
        self.rd_as(lin, size, need)
    }

    /// Reads with the access bit `need` (A_R_S for implicit supervisor reads).
    #[inline]
    pub(crate) fn rd_as(&mut self, lin: u64, size: usize, need: u8) -> R<u64> {
        self.rd_tlb(lin, size, need)
    }

    /// A read with the CPU's rights, inlined into the caller (the uops).
    #[inline(always)]
    pub(crate) fn rd_inline(&mut self, lin: u64, size: usize) -> R<u64> {
        let need = self.acc_r;
        self.rd_tlb(lin, size, need)
    }

    #[inline(always)]
    fn rd_tlb(&mut self, lin: u64, size: usize, need: u8) -> R<u64> {
        if let Some(r) = self.tlb_load(lin, size, need) {
            return r;
        }
        self.rd_slow(lin, size, need, Access::Read)
    }

    /// A read through the TLB alone, if its entry grants `need` on a RAM
    /// page and the access stays in the page (a misaligned one may be #AC).
    #[inline(always)]
    fn tlb_load(&self, lin: u64, size: usize, need: u8) -> Option<R<u64>> {
        let e = &self.tlb[tlb_index(lin)];
        let off = (lin & 0xfff) as usize;
        if e.vpage == lin & !0xfff && e.allow & need != 0 && e.host != 0 && off + size <= 0x1000 {
            if lin & (size as u64 - 1) != 0 && self.alignment_checked(need) {
                return Some(exc_code(vector::AC, 0));
            }
            // SAFETY: `host` maps the whole 4 KiB RAM page (TLB invariant, set
            // from `PhysMem::host(ppage, 0x1000)`) and `off + size <= 0x1000`.
            return Some(Ok(unsafe { load((e.host + off) as *const u8, size) }));
        }
        None
    }

    /// Whether a misaligned data access with rights `need` raises #AC(0):
    /// a user access at CPL 3 with CR0.AM and RFLAGS.AC (SDM vol. 3
    /// 6.15, interrupt 17). Implicit supervisor accesses (descriptor
    /// tables, the TSS, the stack of an interrupt to ring 0) never do.
    #[inline]
    pub(crate) fn alignment_checked(&self, need: u8) -> bool {
        need & (A_R_U | A_W_U) != 0
            && self.cpl == 3
            && self.cr0 & cr0::AM != 0
            && self.rflags & arch::rflags::AC != 0
    }

    /// #AC(0) for a checked access at `lin` that is not a multiple of
    /// `size` (the data type's alignment, a power of two: SDM vol. 3 table
    /// 6-7). The check comes before the translation: a misaligned access
    /// to a page that is not present or not accessible is #AC, not #PF (as
    /// this host's CPU does; the differential tester compares it).
    pub(crate) fn alignment_fault(&self, lin: u64, size: usize, need: u8) -> R<()> {
        if lin & (size as u64 - 1) != 0 && self.alignment_checked(need) {
            return exc_code(vector::AC, 0);
        }
        Ok(())
    }

    /// The read of a read-modify-write instruction: checked as a write
    /// (a fault reports W in its error code, as the CPU's read with write
    /// intent does), then read with the CPU's rights.
    #[inline(always)]
    pub(crate) fn rd_rmw(&mut self, lin: u64, size: usize) -> R<u64> {
        if let Some(r) = self.tlb_load(lin, size, self.acc_w) {
            return r;
        }
        self.rd_rmw_slow(lin, size)
    }

    #[cold]
    fn rd_rmw_slow(&mut self, lin: u64, size: usize) -> R<u64> {
        let need = self.acc_w;
        self.alignment_fault(lin, size, need)?;
        let first = size.min(0x1000 - (lin & 0xfff) as usize);
        self.translate_write(lin, need)?;
        if first < size {
            self.translate_write(lin.wrapping_add(first as u64), need)?;
        }
        let need = self.acc_r;
        self.rd_slow(lin, size, need, Access::Read)
    }

    #[cold]
    fn rd_slow(&mut self, lin: u64, size: usize, need: u8, acc: Access) -> R<u64> {
        self.alignment_fault(lin, size, need)?;
        let mut b = [0u8; 16];
        self.read_bytes(lin, &mut b[..size], need, acc)?;
        let mut v = [0u8; 8];
        v[..size.min(8)].copy_from_slice(&b[..size.min(8)]);
        Ok(u64::from_le_bytes(v))
    }

    /// Reads `buf.len()` (at most 4096) bytes at linear `lin`.
    pub(crate) fn read_bytes(&mut self, lin: u64, buf: &mut [u8], need: u8, acc: Access) -> R<()> {
        self.watch_access(lin, buf.len(), acc);
        let off = (lin & 0xfff) as usize;
        let first = buf.len().min(0x1000 - off);
        let (pa1, _) = self.translate(lin, acc, need)?;
        let pa2 = if first < buf.len() {
            Some(self.translate(lin.wrapping_add(first as u64), acc, need)?.0)
        } else {
            None
        };
        if self.watching() && acc != Access::Exec {
            self.debug_access(lin, buf.len(), false);
        }
        let (a, b) = buf.split_at_mut(first);
        self.phys_read(pa1, a)?;
        if let Some(pa2) = pa2 {
            self.phys_read(pa2, b)?;
        }
        Ok(())
    }

    /// Writes `size` bytes of `v` at linear `lin` with the CPL's rights.
    #[inline]
    pub(crate) fn wr(&mut self, lin: u64, size: usize, v: u64) -> R<()> {
        let need = self.acc_w;
        self.wr_as(lin, size, v, need)
    }

    #[inline]
    pub(crate) fn wr_as(&mut self, lin: u64, size: usize, v: u64, need: u8) -> R<()> {
        self.wr_tlb(lin, size, v, need)
    }

    /// A write with the CPU's rights, inlined into the caller (the uops).
    #[inline(always)]
    pub(crate) fn wr_inline(&mut self, lin: u64, size: usize, v: u64) -> R<()> {
        let need = self.acc_w;
        self.wr_tlb(lin, size, v, need)
    }

    #[inline(always)]
    fn wr_tlb(&mut self, lin: u64, size: usize, v: u64, need: u8) -> R<()> {
        let e = &self.tlb[tlb_index(lin)];
        let off = (lin & 0xfff) as usize;
        if e.vpage == lin & !0xfff && e.allow & need != 0 && e.host != 0 && off + size <= 0x1000 {
            if lin & (size as u64 - 1) != 0 && self.alignment_checked(need) {
                return exc_code(vector::AC, 0);
            }
            // SAFETY: as in `rd_as`; pages holding decoded code never have
            // write access in the TLB, so no decoded instruction goes stale.
            unsafe { store((e.host + off) as *mut u8, size, v) };
            return Ok(());
        }
        self.wr_slow(lin, size, v, need)
    }

    /// REP STOS (`src` `None`, the elements `fill`) or REP MOVS forward,
    /// at once, over RAM pages the TLB maps for the access: at most `max`
    /// elements of `size` bytes at linear `dst` (from `src`), as many as
    /// stay within the destination's page and the source's. 0 if the
    /// element loop must run instead: a TLB miss, a page that is not RAM,
    /// a page of decoded code (it has no write access in the TLB), a
    /// misaligned element that alignment checking covers, or a MOVS whose
    /// bytes overlap (each element must see the ones stored before it).
    /// The caller has excluded data breakpoints.
    pub(crate) fn rep_bulk(
        &mut self,
        dst: u64,
        src: Option<u64>,
        size: usize,
        fill: u64,
        max: u64,
    ) -> u64 {
        let sz = size as u64;
        let mapped = |cpu: &Cpu, lin: u64, need: u8| -> Option<usize> {
            let e = &cpu.tlb[tlb_index(lin)];
            if e.vpage != lin & !0xfff || e.allow & need == 0 || e.host == 0 {
                return None;
            }
            if lin & (sz - 1) != 0 && cpu.alignment_checked(need) {
                return None;
            }
            Some(e.host + (lin & 0xfff) as usize)
        };
        let Some(d) = mapped(self, dst, self.acc_w) else {
            return 0;
        };
        let mut n = max.min((0x1000 - (dst & 0xfff)) / sz);
        let s = match src {
            Some(src) => {
                let Some(s) = mapped(self, src, self.acc_r) else {
                    return 0;
                };
                n = n.min((0x1000 - (src & 0xfff)) / sz);
                Some(s)
            }
            None => None,
        };
        let bytes = n as usize * size;
        if n == 0 {
            return 0;
        }
        match s {
            Some(s) => {
                if s < d + bytes && d < s + bytes {
                    return 0;
                }
                // SAFETY: both ranges lie in 4 KiB RAM pages the TLB maps
                // (`host` maps the whole page, the counts keep within it),
                // and they do not overlap.
                unsafe { std::ptr::copy_nonoverlapping(s as *const u8, d as *mut u8, bytes) };
            }
            None => {
                for k in 0..n as usize {
                    // SAFETY: as above: element k ends within the page.
                    unsafe { store((d + k * size) as *mut u8, size, fill) };
                }
            }
        }
        n
    }

    #[cold]
    fn wr_slow(&mut self, lin: u64, size: usize, v: u64, need: u8) -> R<()> {
        self.alignment_fault(lin, size, need)?;
        let b = v.to_le_bytes();
        self.write_bytes(lin, &b[..size.min(8)], need)
    }

    /// Writes `buf` (at most 4096 bytes) at linear `lin`; both pages are
    /// checked before anything is written.
    pub(crate) fn write_bytes(&mut self, lin: u64, buf: &[u8], need: u8) -> R<()> {
        self.watch_access(lin, buf.len(), Access::Write);
        let off = (lin & 0xfff) as usize;
        let first = buf.len().min(0x1000 - off);
        let (pa1, _) = self.translate_write(lin, need)?;
        let pa2 = if first < buf.len() {
            Some(self.translate_write(lin.wrapping_add(first as u64), need)?)
        } else {
            None
        };
        if self.watching() {
            self.debug_access(lin, buf.len(), true);
        }
        self.phys_write(pa1, &buf[..first])?;
        if let Some((pa2, _)) = pa2 {
            self.phys_write(pa2, &buf[first..])?;
        }
        Ok(())
    }

    /// Translation for a write: a TLB entry without write access (clean page,
    /// code page) is refilled through a walk, which sets the dirty bit.
    fn translate_write(&mut self, lin: u64, need: u8) -> R<(u64, usize)> {
        let e = &self.tlb[tlb_index(lin)];
        if e.vpage == lin & !0xfff && e.allow & need != 0 {
            return Ok((e.ppage | (lin & 0xfff), e.host));
        }
        let e = self.tlb_fill(lin, Access::Write, need)?;
        Ok((e.ppage | (lin & 0xfff), e.host))
    }

    /// Reads guest-physical memory: RAM, the local device, or an MMIO exit.
    pub(crate) fn phys_read(&mut self, pa: u64, buf: &mut [u8]) -> R<()> {
        if self.mem.read(pa, buf) {
            return Ok(());
        }
        if let Some(l) = self.local.as_mut() {
            if l.claims(pa) {
                l.read(pa, buf);
                return Ok(());
            }
        }
        // MMIO, at most 8 bytes per exit.
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(8);
            let addr = pa + done as u64;
            self.input(CpuExit::MmioRead { addr }, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Writes guest-physical memory: RAM (dropping stale decoded code), the
    /// local device, or a queued MMIO exit.
    pub(crate) fn phys_write(&mut self, pa: u64, buf: &[u8]) -> R<()> {
        if let Some(h) = self.mem.host(pa, buf.len() as u64) {
            if self.code.is_code(pa & !0xfff) {
                self.code_written(pa, buf.len());
            }
            // SAFETY: `host` checked that `buf.len()` bytes at `h` are mapped RAM;
            // `buf` is a separate Rust buffer.
            unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), h, buf.len()) };
            return Ok(());
        }
        if let Some(l) = self.local.as_mut() {
            if l.claims(pa) {
                l.write(pa, buf);
                self.irq_ready = l.pending();
                self.nmi_ready = l.nmi_pending();
                // The run loop looks at interrupts after this instruction
                // (a self-IPI is not left waiting for a burst's end).
                self.io_touched = true;
                return Ok(());
            }
        }
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(8);
            let addr = pa + done as u64;
            self.output(CpuExit::MmioWrite { addr }, &buf[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// A write hit a page with decoded code.
    pub(crate) fn code_written(&mut self, pa: u64, len: usize) {
        if self.code.written(pa, len) {
            // The page's instructions were dropped; the fetch shortcut may
            // point at them.
            self.code.reset_fetch();
        }
    }
}

/// The guest's page tables as the CPU reaches them: in guest RAM (entries
/// outside it read as 0, not present), through EPT while a nested guest runs
/// with it.
struct Tables<'a> {
    cpu: &'a mut Cpu,
    /// The linear address being translated (for EPT violations).
    lin: u64,
}

impl PageTables for Tables<'_> {
    type Error = Stop;

    #[inline]
    fn locate(&mut self, gpa: u64) -> R<u64> {
        self.cpu.ept_paging_entry(gpa, self.lin)
    }

    #[inline]
    fn read(&mut self, at: u64, wide: bool) -> u64 {
        if wide {
            self.cpu.mem.read_u64(at).unwrap_or(0)
        } else {
            self.cpu.mem.read_u32(at).unwrap_or(0) as u64
        }
    }

    #[inline]
    fn write(&mut self, at: u64, wide: bool, value: u64) {
        if wide {
            self.cpu.mem.write(at, &value.to_le_bytes());
        } else {
            self.cpu.mem.write(at, &(value as u32).to_le_bytes());
        }
    }
}
