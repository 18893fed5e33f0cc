//! Linear and physical memory access: the software TLB, page walks (4-level,
//! PAE, 2-level), page faults, and MMIO.

use crate::mem::{load, store};
use crate::{exc_code, vector, Cpu, CpuExit, R};
use vcpu::{cr0, cr4, efer};

pub(crate) const TLB_SIZE: usize = 1024;

/// Access bits of a TLB entry: read/write/execute for supervisor and user.
pub(crate) const A_R_S: u8 = 1;
pub(crate) const A_W_S: u8 = 2;
pub(crate) const A_X_S: u8 = 4;
pub(crate) const A_R_U: u8 = 8;
pub(crate) const A_W_U: u8 = 16;
pub(crate) const A_X_U: u8 = 32;

pub(crate) const CR4_PSE: u64 = 1 << 4;
use crate::pte::{ACCESSED, ADDR, DIRTY, G, NX, P, PS, RW, US};

/// The kind of an access.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Acc {
    Read,
    Write,
    Exec,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct TlbEntry {
    /// Linear page address; `u64::MAX` when invalid (never page-aligned).
    pub vpage: u64,
    /// Physical page address.
    pub ppage: u64,
    /// Host address of the page, 0 if it is not RAM.
    pub host: usize,
    pub allow: u8,
    pub global: bool,
    pub large: bool,
}

impl TlbEntry {
    pub const INVALID: TlbEntry = TlbEntry {
        vpage: u64::MAX,
        ppage: 0,
        host: 0,
        allow: 0,
        global: false,
        large: false,
    };
}

#[inline(always)]
fn tlb_index(lin: u64) -> usize {
    (lin >> 12) as usize & (TLB_SIZE - 1)
}

impl Cpu {
    /// Drops TLB entries (the global ones too if `all`).
    pub(crate) fn tlb_flush(&mut self, all: bool) {
        let mut large = false;
        for e in self.tlb.iter_mut() {
            if all || !e.global {
                *e = TlbEntry::INVALID;
            } else {
                large |= e.large;
            }
        }
        self.tlb_has_large = large;
        self.code.reset_fetch();
    }

    /// INVLPG.
    pub(crate) fn tlb_flush_page(&mut self, lin: u64) {
        if self.tlb_has_large {
            // 4 KiB pieces of a large page may sit anywhere in the TLB.
            self.tlb_flush(true);
            return;
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
    pub(crate) fn translate(&mut self, lin: u64, acc: Acc, need: u8) -> R<(u64, usize)> {
        let e = &self.tlb[tlb_index(lin)];
        if e.vpage == lin & !0xfff && e.allow & need != 0 {
            return Ok((e.ppage | (lin & 0xfff), e.host));
        }
        let e = self.tlb_fill(lin, acc, need)?;
        Ok((e.ppage | (lin & 0xfff), e.host))
    }

    fn tlb_fill(&mut self, lin: u64, acc: Acc, need: u8) -> R<TlbEntry> {
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
            }
        } else {
            self.walk(lin, acc, user)?
        };
        self.ept_leaf(&mut e, lin, acc)?;
        e.host = self.mem.host(e.ppage, 0x1000).map_or(0, |p| p as usize);
        if self.code.is_code(e.ppage) {
            e.allow &= !(A_W_S | A_W_U);
        }
        if self.write_protected(e.ppage) {
            // An engine's protected frame: no write below CPL 0.
            if acc == Acc::Write && self.cpl > 0 {
                return self.pf(lin, true, acc, user, false);
            }
            e.allow &= !(A_W_S | A_W_U);
        }
        self.tlb_has_large |= e.large;
        self.tlb[tlb_index(lin)] = e;
        // The entry may not allow this access (a write to a code page): the
        // caller takes the slow path with it anyway.
        let _ = need;
        Ok(e)
    }

    fn pf<T>(&mut self, lin: u64, present: bool, acc: Acc, user: bool, rsvd: bool) -> R<T> {
        let mut code = 0u32;
        if present {
            code |= 1;
        }
        if acc == Acc::Write {
            code |= 2;
        }
        if user {
            code |= 4;
        }
        if rsvd {
            code |= 8;
        }
        if acc == Acc::Exec && (self.efer & efer::NXE != 0 || self.cr4 & (1 << 20) != 0) {
            code |= 16;
        }
        // A #PF VM exit leaves CR2 alone: the value before is kept for it.
        self.vmx.cr2_before_pf = std::mem::replace(&mut self.cr2, lin);
        exc_code(vector::PF, code)
    }

    fn pte_read(&self, addr: u64, wide: bool) -> u64 {
        if wide {
            self.mem.read_u64(addr).unwrap_or(0)
        } else {
            self.mem.read_u32(addr).unwrap_or(0) as u64
        }
    }

    fn pte_set(&self, addr: u64, wide: bool, old: u64, bits: u64) {
        if old & bits != bits {
            let v = old | bits;
            if wide {
                self.mem.write(addr, &v.to_le_bytes());
            } else {
                self.mem.write(addr, &(v as u32).to_le_bytes());
            }
        }
    }

    /// Walks the page tables for `lin`.
    fn walk(&mut self, lin: u64, acc: Acc, user: bool) -> R<TlbEntry> {
        let lma = self.efer & efer::LMA != 0;
        let pae = self.cr4 & cr4::PAE != 0;
        let nxe = self.efer & efer::NXE != 0;
        // (entry address, entry, wide) of each level, for the A/D updates.
        let mut path: [(u64, u64, bool); 4] = [(0, 0, false); 4];
        let mut n = 0;
        let mut rw = true;
        let mut us = true;
        let mut nx = false;
        let (leaf, size_shift) = if lma || pae {
            let (mut table, levels) = if lma {
                (self.cr3 & ADDR, 4)
            } else {
                // PAE: the PDPTE (no permission bits).
                let at =
                    self.ept_paging_entry((self.cr3 & 0xffff_ffe0) + ((lin >> 30) & 3) * 8, lin)?;
                let pdpte = self.pte_read(at, true);
                if pdpte & P == 0 {
                    return self.pf(lin, false, acc, user, false);
                }
                (pdpte & ADDR, 2)
            };
            let mut found = None;
            for level in (0..levels).rev() {
                let addr =
                    self.ept_paging_entry(table + ((lin >> (12 + 9 * level)) & 0x1ff) * 8, lin)?;
                let ent = self.pte_read(addr, true);
                if ent & P == 0 {
                    return self.pf(lin, false, acc, user, false);
                }
                if ent & NX != 0 && !nxe {
                    return self.pf(lin, true, acc, user, true);
                }
                path[n] = (addr, ent, true);
                n += 1;
                rw &= ent & RW != 0;
                us &= ent & US != 0;
                nx |= ent & NX != 0;
                let large = ent & PS != 0 && (level == 1 || (level == 2 && lma));
                if level == 0 || large {
                    found = Some((ent, 12 + 9 * level));
                    break;
                }
                table = ent & ADDR;
            }
            match found {
                Some(f) => f,
                None => return self.pf(lin, false, acc, user, false),
            }
        } else {
            let addr =
                self.ept_paging_entry((self.cr3 & 0xffff_f000) + ((lin >> 22) & 0x3ff) * 4, lin)?;
            let pde = self.pte_read(addr, false);
            if pde & P == 0 {
                return self.pf(lin, false, acc, user, false);
            }
            path[0] = (addr, pde, false);
            n = 1;
            rw &= pde & RW != 0;
            us &= pde & US != 0;
            if pde & PS != 0 && self.cr4 & CR4_PSE != 0 {
                // 4 MiB page (its frame is computed below).
                (pde, 22)
            } else {
                let addr =
                    self.ept_paging_entry((pde & 0xffff_f000) + ((lin >> 12) & 0x3ff) * 4, lin)?;
                let pte = self.pte_read(addr, false);
                if pte & P == 0 {
                    return self.pf(lin, false, acc, user, false);
                }
                path[1] = (addr, pte, false);
                n = 2;
                rw &= pte & RW != 0;
                us &= pte & US != 0;
                (pte, 12)
            }
        };
        let nx = nx && nxe;
        let wp = self.cr0 & cr0::WP != 0;
        // Permission check.
        let denied =
            (user && !us) || (acc == Acc::Write && !rw && (user || wp)) || (acc == Acc::Exec && nx);
        if denied {
            return self.pf(lin, true, acc, user, false);
        }
        // Accessed bits on every level, dirty on the leaf for writes.
        for &(addr, ent, wide) in &path[..n - 1] {
            self.pte_set(addr, wide, ent, ACCESSED);
        }
        let (laddr, lent, lwide) = path[n - 1];
        let dirty = acc == Acc::Write || lent & DIRTY != 0;
        self.pte_set(
            laddr,
            lwide,
            lent,
            if acc == Acc::Write {
                ACCESSED | DIRTY
            } else {
                ACCESSED
            },
        );
        let size = 1u64 << size_shift;
        let frame = if size_shift == 22 && !(lma || pae) {
            // Bits 13..20 of a 4 MiB PDE are physical address bits 32..39.
            (leaf & 0xffc0_0000) | ((leaf >> 13) & 0xff) << 32
        } else {
            leaf & ADDR & !(size - 1)
        };
        let ppage = frame | (lin & (size - 1) & !0xfff);
        let mut allow = A_R_S;
        if !nx {
            allow |= A_X_S;
        }
        if dirty && (rw || !wp) {
            allow |= A_W_S;
        }
        if us {
            allow |= A_R_U;
            if !nx {
                allow |= A_X_U;
            }
            if dirty && rw {
                allow |= A_W_U;
            }
        }
        Ok(TlbEntry {
            vpage: lin & !0xfff,
            ppage,
            host: 0,
            allow,
            global: leaf & G != 0 && self.cr4 & cr4::PGE != 0,
            large: size_shift > 12,
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
        let e = &self.tlb[tlb_index(lin)];
        let off = (lin & 0xfff) as usize;
        if e.vpage == lin & !0xfff && e.allow & need != 0 && e.host != 0 && off + size <= 0x1000 {
            // SAFETY: `host` maps the whole 4 KiB RAM page (TLB invariant, set
            // from `PhysMem::host(ppage, 0x1000)`) and `off + size <= 0x1000`.
            return Ok(unsafe { load((e.host + off) as *const u8, size) });
        }
        self.rd_slow(lin, size, need, Acc::Read)
    }

    #[cold]
    fn rd_slow(&mut self, lin: u64, size: usize, need: u8, acc: Acc) -> R<u64> {
        let mut b = [0u8; 16];
        self.read_bytes(lin, &mut b[..size], need, acc)?;
        let mut v = [0u8; 8];
        v[..size.min(8)].copy_from_slice(&b[..size.min(8)]);
        Ok(u64::from_le_bytes(v))
    }

    /// Reads `buf.len()` (at most 4096) bytes at linear `lin`.
    pub(crate) fn read_bytes(&mut self, lin: u64, buf: &mut [u8], need: u8, acc: Acc) -> R<()> {
        let off = (lin & 0xfff) as usize;
        let first = buf.len().min(0x1000 - off);
        let (pa1, _) = self.translate(lin, acc, need)?;
        let pa2 = if first < buf.len() {
            Some(self.translate(lin.wrapping_add(first as u64), acc, need)?.0)
        } else {
            None
        };
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
            // SAFETY: as in `rd_as`; pages holding decoded code never have
            // write access in the TLB, so no decoded instruction goes stale.
            unsafe { store((e.host + off) as *mut u8, size, v) };
            return Ok(());
        }
        self.wr_slow(lin, size, v, need)
    }

    #[cold]
    fn wr_slow(&mut self, lin: u64, size: usize, v: u64, need: u8) -> R<()> {
        let b = v.to_le_bytes();
        self.write_bytes(lin, &b[..size.min(8)], need)
    }

    /// Writes `buf` (at most 4096 bytes) at linear `lin`; both pages are
    /// checked before anything is written.
    pub(crate) fn write_bytes(&mut self, lin: u64, buf: &[u8], need: u8) -> R<()> {
        let off = (lin & 0xfff) as usize;
        let first = buf.len().min(0x1000 - off);
        let (pa1, _) = self.translate_write(lin, need)?;
        let pa2 = if first < buf.len() {
            Some(self.translate_write(lin.wrapping_add(first as u64), need)?)
        } else {
            None
        };
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
        let e = self.tlb_fill(lin, Acc::Write, need)?;
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
