//! Instruction fetch and the decoded-instruction cache, per guest-physical page.

use std::collections::HashMap;

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction};

use arch::paging::Access;
use arch::vector;

use crate::uop::Uop;
use crate::{exc, Cpu, R};

const PAGE: usize = 4096;

/// Decoded instructions of one guest-physical page.
struct CodePage {
    ppage: u64,
    bits: u32,
    epoch: u64,
    /// The page's bytes when its instructions were decoded.
    snapshot: Box<[u8; PAGE]>,
    /// 0: not decoded; else 1 + index into `insns`, by page offset.
    index: Box<[u16; PAGE]>,
    insns: Vec<Instruction>,
    /// The same instructions pre-decoded (same indexes as `insns`).
    uops: Vec<Uop>,
    /// 64-byte chunks that decoded instructions cover.
    chunks: u64,
    /// One bit per byte offset: the accelerator said it has nothing for
    /// code starting there (see `Accel::run`).
    no_accel: Box<[u64; PAGE / 64]>,
}

impl CodePage {
    fn clear(&mut self) {
        if !self.insns.is_empty() {
            self.index.fill(0);
            self.insns.clear();
            self.uops.clear();
        }
        self.chunks = 0;
        self.no_accel.fill(0);
    }
}

pub(crate) struct CodeCache {
    pages: Vec<CodePage>,
    map: HashMap<u64, usize>,
    /// One bit per physical page of RAM: the page has decoded instructions.
    bitmap: Vec<u64>,
    epoch: u64,
    /// The linear page of the last fetch and its slot in `pages`.
    fetch_vpage: u64,
    fetch_slot: usize,
    /// The index in that page's `insns` of the last instruction fetched: the
    /// next one in straight-line code usually follows it (decoded in the
    /// order first executed), which spares the page's offset index.
    fetch_ix: usize,
    /// The instruction being run when it is not in a page's `insns` (it
    /// crosses a page boundary, or its page is full): see `Uop::uncached`.
    uncached: Instruction,
    /// Its uop: one element (a heap buffer like the pages' `uops`, so that
    /// pointers to either live as long; see `Cpu::fetch_uop`).
    uncached_uop: Vec<Uop>,
    /// Whether dropped pages are logged (an engine translates from them).
    pub logging: bool,
    /// Physical pages whose decoded instructions were dropped since the
    /// last [`Cpu::take_code_invalidations`].
    pub dropped: Vec<u64>,
    /// Every page may have changed (a new epoch).
    pub dropped_all: bool,
}

impl CodeCache {
    pub fn new(ram_end: u64) -> CodeCache {
        CodeCache {
            pages: Vec::new(),
            map: HashMap::new(),
            bitmap: vec![0; ((ram_end >> 12) as usize).div_ceil(64) + 1],
            epoch: 0,
            fetch_vpage: u64::MAX,
            fetch_slot: 0,
            fetch_ix: 0,
            uncached: Instruction::default(),
            uncached_uop: vec![Uop::EMPTY],
            logging: false,
            dropped: Vec::new(),
            dropped_all: false,
        }
    }

    pub fn new_epoch(&mut self) {
        self.epoch += 1;
        self.dropped_all |= self.logging;
        self.fetch_vpage = u64::MAX;
    }

    pub fn reset_fetch(&mut self) {
        self.fetch_vpage = u64::MAX;
    }

    /// The decoded instruction of `u`, the uop the last fetch returned
    /// (valid until the next fetch or invalidation).
    #[inline]
    pub fn insn_of(&self, u: &Uop) -> Instruction {
        if u.is_uncached() {
            self.uncached
        } else {
            self.pages[self.fetch_slot].insns[self.fetch_ix]
        }
    }

    #[inline]
    pub fn is_code(&self, ppage: u64) -> bool {
        let i = (ppage >> 12) as usize;
        self.bitmap
            .get(i >> 6)
            .is_some_and(|w| (w >> (i & 63)) & 1 != 0)
    }

    fn set_code(&mut self, ppage: u64, on: bool) {
        let i = (ppage >> 12) as usize;
        if let Some(w) = self.bitmap.get_mut(i >> 6) {
            if on {
                *w |= 1 << (i & 63);
            } else {
                *w &= !(1 << (i & 63));
            }
        }
    }

    /// `len` bytes at `pa` (within one page) were written. Returns true if
    /// decoded instructions were dropped.
    pub fn written(&mut self, pa: u64, len: usize) -> bool {
        let ppage = pa & !0xfff;
        let Some(&slot) = self.map.get(&ppage) else {
            self.set_code(ppage, false);
            return false;
        };
        let off = (pa & 0xfff) as usize;
        let first = off / 64;
        let last = (off + len.max(1) - 1).min(PAGE - 1) / 64;
        let mask = if last - first >= 63 {
            !0
        } else {
            ((1u64 << (last - first + 1)) - 1) << first
        };
        let page = &mut self.pages[slot];
        if page.chunks & mask == 0 {
            return false;
        }
        page.clear();
        self.set_code(ppage, false);
        if self.logging {
            self.dropped.push(ppage);
        }
        true
    }
}

impl Cpu {
    /// Linear address of the instruction at `rip`.
    #[inline]
    pub(crate) fn code_linear(&self, rip: u64) -> u64 {
        if self.long64 {
            rip
        } else {
            self.seg[crate::sreg::CS].base.wrapping_add(rip) & 0xffff_ffff
        }
    }

    /// The instruction at `rip` (in the current mode and address space) and
    /// the guest-physical address of its first byte, decoded through the
    /// cache (so a later write to it is seen as a code write), for an engine
    /// that translates it. `None` if the fetch would fault, or the
    /// instruction crosses a page (the engine leaves it to the interpreter).
    /// Nothing architectural changes beyond what fetching the instruction
    /// does (the walk's accessed bits).
    pub fn decode_for_translation(&mut self, rip: u64) -> Option<(Instruction, u64)> {
        let saved = self.rip;
        self.rip = rip;
        let r = self.fetch_uop();
        self.rip = saved;
        // SAFETY: see `fetch_uop`; nothing runs between the fetch and this read.
        let u = unsafe { &*r.ok()? };
        if u.is_uncached() {
            return None;
        }
        let insn = self.code.insn_of(u);
        let lin = self.code_linear(rip);
        Some((
            insn,
            self.code.pages[self.code.fetch_slot].ppage | (lin & 0xfff),
        ))
    }

    /// The instruction at `rip` if it crosses into the next page (in the
    /// current mode and address space), with the guest-physical addresses
    /// of its first byte and of the first byte of the next page, for an
    /// engine that translates it. Both pages' bytes it covers are marked as
    /// code, so a later write to either is seen as a code write (the engine
    /// must check at run time that the second page is still mapped there).
    /// `None` if it does not cross, the fetch would fault, or either page
    /// is not RAM. Nothing architectural changes beyond what fetching the
    /// instruction does (the walks' accessed bits).
    pub fn decode_crossing_for_translation(&mut self, rip: u64) -> Option<(Instruction, u64, u64)> {
        let lin = self.code_linear(rip);
        if self.long64 && !arch::canonical(lin) {
            return None;
        }
        let saved = self.rip;
        self.rip = rip;
        let r = self.fetch_crossing(lin);
        self.rip = saved;
        let ins = r.ok()?;
        let off = (lin & 0xfff) as usize;
        let first = PAGE - off;
        if ins.len() <= first {
            return None;
        }
        let need = self.acc_x;
        let (pa1, _) = self.translate(lin, Access::Exec, need).ok()?;
        let (pa2, _) = self
            .translate(lin.wrapping_add(first as u64), Access::Exec, need)
            .ok()?;
        let mut slots = [0; 2];
        for (k, pa) in [pa1, pa2].into_iter().enumerate() {
            let ppage = pa & !0xfff;
            let host = self.mem.host(ppage, PAGE as u64)?;
            // SAFETY: `host` maps the 4 KiB RAM page; nothing else writes
            // guest memory while the vCPU runs (the VMM does so only
            // between runs).
            let current: &[u8] = unsafe { std::slice::from_raw_parts(host, PAGE) };
            slots[k] = self.code_slot(ppage, current);
        }
        // The instruction was read from memory just now: the snapshots of
        // the chunks it covers are refreshed before they count as code.
        let spans = [
            (slots[0], off, PAGE - 1),
            (slots[1], 0, ins.len() - first - 1),
        ];
        for (slot, from, to) in spans {
            let ppage = self.code.pages[slot].ppage;
            let host = self.mem.host(ppage, PAGE as u64)?;
            // SAFETY: as above.
            let current: &[u8] = unsafe { std::slice::from_raw_parts(host, PAGE) };
            let p = &mut self.code.pages[slot];
            for c in from / 64..=to / 64 {
                if p.chunks & (1 << c) == 0 {
                    p.snapshot[c * 64..c * 64 + 64].copy_from_slice(&current[c * 64..c * 64 + 64]);
                }
            }
            self.mark_code(slot, from, to);
        }
        // The fetch cache may point at a slot whose page changed.
        self.code.fetch_vpage = u64::MAX;
        Some((ins, pa1, pa2 & !0xfff))
    }

    /// The guest-physical address of the instruction at RIP, if it can be
    /// fetched without a fault (no fault is raised).
    #[inline]
    pub fn code_phys(&mut self) -> Option<u64> {
        if let Some((page, off)) = self.rip_in_fetch_page() {
            return Some(self.code.pages[page].ppage | off as u64);
        }
        let lin = self.code_linear(self.rip);
        if self.long64 && !arch::canonical(lin) {
            return None;
        }
        let need = self.acc_x;
        self.translate(lin, Access::Exec, need)
            .ok()
            .map(|(pa, _)| pa)
    }

    /// Whether the accelerator said it has nothing for the code at RIP
    /// (known only for the page of the last fetch).
    #[inline(always)]
    pub(crate) fn no_accel_here(&self) -> bool {
        self.rip_in_fetch_page().is_some_and(|(page, off)| {
            self.code.pages[page].no_accel[off / 64] >> (off % 64) & 1 != 0
        })
    }

    /// Remembers that the accelerator has nothing for the code at RIP, until
    /// the page's decoded code is dropped.
    pub(crate) fn set_no_accel_here(&mut self) {
        if let Some((page, off)) = self.rip_in_fetch_page() {
            self.code.pages[page].no_accel[off / 64] |= 1 << (off % 64);
        }
    }

    /// The slot of the last fetch's page and RIP's offset in it, if RIP is
    /// in that page.
    #[inline(always)]
    fn rip_in_fetch_page(&self) -> Option<(usize, usize)> {
        let lin = self.code_linear(self.rip);
        (lin & !0xfff == self.code.fetch_vpage)
            .then_some((self.code.fetch_slot, (lin & 0xfff) as usize))
    }

    /// Turns the log of dropped code pages on (see
    /// [`Cpu::take_code_invalidations`]).
    pub fn log_code_invalidations(&mut self) {
        self.code.logging = true;
    }

    /// The physical pages whose decoded code was dropped (written, or found
    /// changed) since the last call, or `None` for "any page may have
    /// changed": an engine drops what it derived from them.
    pub fn take_code_invalidations(&mut self) -> Option<Vec<u64>> {
        if std::mem::take(&mut self.code.dropped_all) {
            self.code.dropped.clear();
            return None;
        }
        Some(std::mem::take(&mut self.code.dropped))
    }

    /// Whether code pages were dropped since the last
    /// [`Cpu::take_code_invalidations`].
    #[inline]
    pub fn code_invalidated(&self) -> bool {
        self.code.dropped_all || !self.code.dropped.is_empty()
    }

    /// The default operand size of code in the current mode: 16, 32 or 64.
    #[inline]
    pub fn code_bits(&self) -> u32 {
        self.bits
    }

    /// The decoded instruction at RIP, for engines that look at it.
    pub(crate) fn fetch(&mut self, out: &mut Instruction) -> R<()> {
        let p = self.fetch_uop()?;
        // SAFETY: see `fetch_uop`; nothing runs between the fetch and this read.
        *out = self.code.insn_of(unsafe { &*p });
        Ok(())
    }

    /// The pre-decoded instruction at RIP: a pointer into the cache, so the
    /// uop is neither copied nor borrowed from the CPU while it runs. It
    /// points into a heap buffer (a page's `uops`, or `uncached_uop`) that
    /// stays allocated, unmoved and unwritten until the next fetch: only
    /// `fetch_slow` pushes or overwrites uops; a write to a code page clears
    /// the page's vectors, which frees nothing and writes no element; and
    /// the pages (with their vectors) live as long as the CPU.
    #[inline(always)]
    pub(crate) fn fetch_uop(&mut self) -> R<*const Uop> {
        let lin = self.code_linear(self.rip);
        if lin & !0xfff == self.code.fetch_vpage {
            let p = &self.code.pages[self.code.fetch_slot];
            let next = self.code.fetch_ix.wrapping_add(1);
            if let Some(u) = p.uops.get(next) {
                if u.ip == self.rip {
                    self.code.fetch_ix = next;
                    return Ok(u);
                }
            }
            let ix = (p.index[(lin & 0xfff) as usize] as usize).wrapping_sub(1);
            if let Some(u) = p.uops.get(ix) {
                if u.ip == self.rip {
                    self.code.fetch_ix = ix;
                    return Ok(u);
                }
            }
        }
        self.fetch_slow(lin)
    }

    /// The slot in the cache of physical page `ppage`, whose bytes are now
    /// `current`: created with a snapshot of them, or found and, if the
    /// cache's epoch or the code size changed since it was decoded and its
    /// bytes differ, emptied (and logged as dropped).
    fn code_slot(&mut self, ppage: u64, current: &[u8]) -> usize {
        let epoch = self.code.epoch;
        let bits = self.bits;
        match self.code.map.get(&ppage) {
            Some(&s) => {
                let p = &mut self.code.pages[s];
                if p.epoch != epoch || p.bits != bits {
                    if p.bits != bits || p.snapshot[..] != *current {
                        p.clear();
                        if self.code.logging {
                            self.code.dropped.push(ppage);
                        }
                        p.snapshot.copy_from_slice(current);
                        p.bits = bits;
                    }
                    p.epoch = epoch;
                }
                s
            }
            None => {
                let mut snapshot = Box::new([0u8; PAGE]);
                snapshot.copy_from_slice(current);
                self.code.pages.push(CodePage {
                    ppage,
                    bits,
                    epoch,
                    snapshot,
                    index: Box::new([0u16; PAGE]),
                    insns: Vec::new(),
                    uops: Vec::new(),
                    chunks: 0,
                    no_accel: Box::new([0; PAGE / 64]),
                });
                let s = self.code.pages.len() - 1;
                self.code.map.insert(ppage, s);
                s
            }
        }
    }

    /// Marks bytes `from..=to` of the page in `slot` as code: the 64-byte
    /// chunks they are in (a write there drops the page's decoded code),
    /// and the page in the bitmap of code pages (the software TLB gives no
    /// write access to it, so stores to it take the checked path).
    fn mark_code(&mut self, slot: usize, from: usize, to: usize) {
        let p = &mut self.code.pages[slot];
        for c in from / 64..=(to / 64).min(63) {
            p.chunks |= 1 << c;
        }
        let ppage = p.ppage;
        if !self.code.is_code(ppage) {
            self.code.set_code(ppage, true);
            self.tlb_protect_code(ppage);
        }
    }

    #[cold]
    fn fetch_slow(&mut self, lin: u64) -> R<*const Uop> {
        if self.long64 && !arch::canonical(lin) {
            return crate::exc_code(vector::GP, 0);
        }
        let need = self.acc_x;
        let (pa, _) = self.translate(lin, Access::Exec, need)?;
        let ppage = pa & !0xfff;
        let Some(host) = self.mem.host(ppage, PAGE as u64) else {
            return self.unimplemented(format!(
                "instruction fetch from non-RAM address {pa:#x} at {:#x}",
                self.rip
            ));
        };
        // SAFETY: `host` maps the 4 KiB RAM page; nothing else writes guest
        // memory while the vCPU runs (the VMM does so only between runs).
        let current: &[u8] = unsafe { std::slice::from_raw_parts(host, PAGE) };
        let slot = self.code_slot(ppage, current);
        let bits = self.bits;
        // A page whose snapshot is stale (guest wrote it since it was decoded,
        // through a path that did not drop it) is re-read.
        if self.code.pages[slot].insns.is_empty() {
            let p = &mut self.code.pages[slot];
            p.snapshot.copy_from_slice(current);
        }
        self.code.fetch_vpage = lin & !0xfff;
        self.code.fetch_slot = slot;
        let off = (lin & 0xfff) as usize;
        let p = &mut self.code.pages[slot];
        let ix = p.index[off];
        if ix != 0 && p.uops[ix as usize - 1].ip == self.rip {
            self.code.fetch_ix = ix as usize - 1;
            return Ok(&p.uops[ix as usize - 1]);
        }
        // The guest's writes to chunks with no decoded instruction leave the
        // page's decoded code alone (`CodeCache::written`), so the snapshot of
        // those chunks may be old: refresh the ones this instruction can
        // cover before decoding it.
        for c in off / 64..=(off + 14).min(PAGE - 1) / 64 {
            if p.chunks & (1 << c) == 0 {
                p.snapshot[c * 64..c * 64 + 64].copy_from_slice(&current[c * 64..c * 64 + 64]);
            }
        }
        let mut ins = Instruction::default();
        let mut dec = Decoder::with_ip(bits, &p.snapshot[off..], self.rip, DecoderOptions::NONE);
        dec.decode_out(&mut ins);
        if ins.is_invalid() {
            if dec.last_error() == DecoderError::NoMoreBytes {
                let ins = self.fetch_crossing(lin)?;
                return Ok(self.run_uncached(ins));
            }
            let mut b = [0u8; 15];
            let n = (PAGE - off).min(15);
            b[..n].copy_from_slice(&p.snapshot[off..off + n]);
            return self.invalid_opcode(&b[..n]);
        }
        if !crate::model::allows(&self.cpuid, &ins) {
            return exc(vector::UD);
        }
        let len = ins.len();
        let uop = Uop::new(&ins, bits);
        let p = &mut self.code.pages[slot];
        if p.insns.len() < u16::MAX as usize - 1 {
            let at = if ix != 0 {
                // Same bytes reached at another RIP (an alias): replace.
                p.insns[ix as usize - 1] = ins;
                p.uops[ix as usize - 1] = uop;
                ix as usize - 1
            } else {
                p.insns.push(ins);
                p.uops.push(uop);
                p.index[off] = p.insns.len() as u16;
                p.insns.len() - 1
            };
            self.code.fetch_ix = at;
            self.mark_code(slot, off, (off + len - 1).min(PAGE - 1));
            return Ok(&self.code.pages[slot].uops[at]);
        }
        Ok(self.run_uncached(ins))
    }

    /// A uop for an instruction kept outside the page cache. The next fetch
    /// goes through `fetch_slow` again.
    fn run_uncached(&mut self, ins: Instruction) -> *const Uop {
        self.code.uncached = ins;
        self.code.fetch_vpage = u64::MAX;
        self.code.uncached_uop[0] = Uop::uncached(&ins);
        &self.code.uncached_uop[0]
    }

    /// An instruction that crosses into the next page: decoded every time.
    fn fetch_crossing(&mut self, lin: u64) -> R<Instruction> {
        let off = (lin & 0xfff) as usize;
        let first = PAGE - off;
        let mut buf = [0u8; 15];
        let need = self.acc_x;
        let (pa1, _) = self.translate(lin, Access::Exec, need)?;
        let n1 = first.min(15);
        if !self.mem.read(pa1, &mut buf[..n1]) {
            return exc(vector::UD);
        }
        let mut ins = Instruction::default();
        let mut dec = Decoder::with_ip(self.bits, &buf[..n1], self.rip, DecoderOptions::NONE);
        dec.decode_out(&mut ins);
        if !ins.is_invalid() {
            if !crate::model::allows(&self.cpuid, &ins) {
                return exc(vector::UD);
            }
            return Ok(ins);
        }
        if dec.last_error() != DecoderError::NoMoreBytes || n1 >= 15 {
            return self.invalid_opcode(&buf[..n1]);
        }
        // Only now is the second page needed (and may fault).
        let (pa2, _) = self.translate(lin.wrapping_add(first as u64), Access::Exec, need)?;
        if !self.mem.read(pa2, &mut buf[n1..]) {
            return exc(vector::UD);
        }
        let mut dec = Decoder::with_ip(self.bits, &buf, self.rip, DecoderOptions::NONE);
        dec.decode_out(&mut ins);
        if ins.is_invalid() {
            return self.invalid_opcode(&buf);
        }
        if !crate::model::allows(&self.cpuid, &ins) {
            return exc(vector::UD);
        }
        Ok(ins)
    }

    /// The exception for bytes the decoder finds invalid: #UD, but for MOV
    /// to or from a control or debug register that does not exist (CR1,
    /// CR5-CR7, CR9-CR15, DR8-DR15), whose privilege is checked first:
    /// #GP(0) at CPL > 0, as the CPU does (the differential tester's
    /// system cases compare it).
    fn invalid_opcode<T>(&self, bytes: &[u8]) -> R<T> {
        let mut k = 0;
        while bytes.get(k).is_some_and(|b| {
            matches!(
                b,
                0x66 | 0x67 | 0xf2 | 0xf3 | 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65
            )
        }) {
            k += 1;
        }
        if self.long64 && bytes.get(k).is_some_and(|b| b & 0xf0 == 0x40) {
            k += 1;
        }
        if self.cpl > 0
            && bytes.get(k) == Some(&0x0f)
            && matches!(bytes.get(k + 1), Some(0x20..=0x23))
        {
            return crate::exc_code(vector::GP, 0);
        }
        exc(vector::UD)
    }
}
