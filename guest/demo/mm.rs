//! Physical frames and page tables.
//!
//! The kernel sees RAM through an identity map of the first 1 GiB (2 MiB pages,
//! supervisor-only) plus the local APIC page, shared by every address space.
//! A process's PML4 points to its own PDPT: entry 0 is the kernel's identity
//! map, entry 1 its user gigabyte (0x4000_0000..0x8000_0000, 4 KiB pages), entry
//! 3 the APIC. User code and read-only data are the kernel image's own frames,
//! mapped read-only into every process; stack and heap frames are private.
//!
//! Every write to a live page-table entry goes through pv_ops `set_pte`.

use abi::{MemoryRegion, MEM_RAM};
use arch::pte::{ADDR, P, PCD, PS, PWT, RW, US};

use crate::console::Line;
use crate::pvops::{self, NO_FLUSH};
use crate::{cpu, fatal, Global};

pub const PAGE: u64 = 4096;
/// Software bit: the frame belongs to the process (freed with it).
pub const OWNED: u64 = 1 << 9;

/// RAM the kernel uses: what the identity map covers.
const IDENTITY_LIMIT: u64 = 1 << 30;
/// The user gigabyte: PDPT entry 1.
pub const USER_BASE: u64 = 0x4000_0000;
pub const USER_LIMIT: u64 = 0x8000_0000;

/// Physical frames: a bump pointer over the largest RAM region above the
/// kernel, plus a list of freed frames linked through their first word.
struct Frames {
    next: u64,
    end: u64,
    free: u64,
    in_use: u64,
}

static FRAMES: Global<Frames> = Global::new(Frames {
    next: 0,
    end: 0,
    free: 0,
    in_use: 0,
});

struct KernelTables {
    pml4: u64,
    /// Identity map of [0, 1 GiB).
    pd_low: u64,
    /// [3 GiB, 4 GiB): the local APIC.
    pd_apic: u64,
}

static KERNEL: Global<KernelTables> = Global::new(KernelTables {
    pml4: 0,
    pd_low: 0,
    pd_apic: 0,
});

unsafe extern "C" {
    safe static __kernel_end: u8;
}

fn read(pa: u64) -> u64 {
    // SAFETY: `pa` is an 8-byte-aligned word of a page-table or free frame the
    // kernel owns, below IDENTITY_LIMIT and therefore identity-mapped.
    unsafe { (pa as *const u64).read_volatile() }
}

/// Writes a word of a frame that is not a live page table (no pv_ops needed).
fn write(pa: u64, v: u64) {
    // SAFETY: as in `read`; the frame is not in use as a live page table.
    unsafe { (pa as *mut u64).write_volatile(v) }
}

/// A zeroed frame, or None when RAM is exhausted.
pub fn alloc() -> Option<u64> {
    let pa = FRAMES.with(|f| {
        let pa = if f.free != 0 {
            let pa = f.free;
            f.free = read(pa);
            pa
        } else if f.next < f.end {
            f.next += PAGE;
            f.next - PAGE
        } else {
            return None;
        };
        f.in_use += 1;
        Some(pa)
    })?;
    // SAFETY: the frame was free RAM below IDENTITY_LIMIT; it is ours now.
    unsafe { cpu::zero_page(pa) };
    Some(pa)
}

pub fn free(pa: u64) {
    FRAMES.with(|f| {
        write(pa, f.free);
        f.free = pa;
        f.in_use -= 1;
    });
}

/// Frames allocated and not freed.
pub fn frames_in_use() -> u64 {
    FRAMES.with(|f| f.in_use)
}

fn alloc_or_panic() -> u64 {
    alloc().unwrap_or_else(|| fatal("out of memory at boot"))
}

/// Sets up the frame allocator and the kernel's own page tables, and loads them.
pub fn init(mmap: &[MemoryRegion]) {
    let kernel_end = (&raw const __kernel_end as u64).next_multiple_of(PAGE);
    let (mut start, mut end) = (0, 0);
    for r in mmap.iter().filter(|r| r.kind == MEM_RAM) {
        let s = r.base.max(kernel_end).next_multiple_of(PAGE);
        let e = (r.base + r.len).min(IDENTITY_LIMIT) & !(PAGE - 1);
        if e > s && e - s > end - start {
            (start, end) = (s, e);
        }
    }
    FRAMES.with(|f| {
        f.next = start;
        f.end = end;
    });
    let pd_low = alloc_or_panic();
    for i in 0..512 {
        write(pd_low + i * 8, i << 21 | P | RW | PS);
    }
    let pd_apic = alloc_or_panic();
    write(pd_apic + 503 * 8, 0xfee0_0000 | P | RW | PS | PCD | PWT);
    let pdpt = alloc_or_panic();
    write(pdpt, pd_low | P | RW);
    write(pdpt + 3 * 8, pd_apic | P | RW);
    let pml4 = alloc_or_panic();
    write(pml4, pdpt | P | RW);
    KERNEL.with(|k| {
        *k = KernelTables {
            pml4,
            pd_low,
            pd_apic,
        }
    });
    pvops::write_cr3(pml4);
    Line::new()
        .s("demo: kernel page tables at ")
        .x(pml4)
        .s(", ")
        .n((end - start) / PAGE)
        .s(" free frames at ")
        .x(start)
        .s("..")
        .x(end)
        .end();
}

/// The kernel's own PML4 (no user mappings).
pub fn kernel_pml4() -> u64 {
    KERNEL.with(|k| k.pml4)
}

/// A new address space: the kernel mappings and an empty user gigabyte.
pub fn new_space() -> Option<u64> {
    let (pd_low, pd_apic) = KERNEL.with(|k| (k.pd_low, k.pd_apic));
    let pml4 = alloc()?;
    let Some(pdpt) = alloc() else {
        free(pml4);
        return None;
    };
    pvops::set_pte(pdpt, pd_low | P | RW, NO_FLUSH);
    pvops::set_pte(pdpt + 3 * 8, pd_apic | P | RW, NO_FLUSH);
    pvops::set_pte(pml4, pdpt | P | RW | US, NO_FLUSH);
    Some(pml4)
}

fn index(va: u64, level: u32) -> u64 {
    (va >> (12 + 9 * level)) & 511
}

/// The PDPT entry holding the user gigabyte's page directory.
fn user_pdpte(pml4: u64) -> u64 {
    (read(pml4) & ADDR) + 8
}

/// The address of `va`'s page-table entry, creating the page directory and
/// page table on the way when `create`; None if absent (or out of frames).
fn pte_addr(pml4: u64, va: u64, create: bool) -> Option<u64> {
    if !(USER_BASE..USER_LIMIT).contains(&va) {
        return None;
    }
    let mut entry = user_pdpte(pml4);
    for level in [1, 0] {
        let e = read(entry);
        let table = if e & P != 0 {
            e & ADDR
        } else if create {
            let t = alloc()?;
            pvops::set_pte(entry, t | P | RW | US, NO_FLUSH);
            t
        } else {
            return None;
        };
        entry = table + index(va, level) * 8;
    }
    Some(entry)
}

/// Maps the user page `va` to frame `pa` with `flags` (P is implied).
pub fn map(pml4: u64, va: u64, pa: u64, flags: u64) -> bool {
    match pte_addr(pml4, va, true) {
        Some(pte) => {
            pvops::set_pte(pte, pa | flags | P, va);
            true
        }
        None => false,
    }
}

/// Moves the mapping of user page `from` to user page `to`, which must be
/// unmapped: `to` first, then `from` is cleared. False if `from` is not mapped.
pub fn move_page(pml4: u64, from: u64, to: u64) -> bool {
    let Some(old) = pte_addr(pml4, from, false) else {
        return false;
    };
    let e = read(old);
    if e & P == 0 {
        return false;
    }
    let Some(new) = pte_addr(pml4, to, true) else {
        return false;
    };
    pvops::set_pte(new, e, to);
    pvops::set_pte(old, 0, from);
    true
}

/// The page-table entry of user page `va` (its address and value), if its
/// page table exists.
pub fn pte(pml4: u64, va: u64) -> Option<(u64, u64)> {
    let pte = pte_addr(pml4, va, false)?;
    Some((pte, read(pte)))
}

/// Unmaps the user page `va`, freeing its frame if the process owns it.
pub fn unmap(pml4: u64, va: u64) {
    if let Some(pte) = pte_addr(pml4, va, false) {
        let e = read(pte);
        if e & P != 0 {
            pvops::set_pte(pte, 0, va);
            if e & OWNED != 0 {
                free(e & ADDR);
            }
        }
    }
}

/// The physical address of user-accessible `va`, if mapped (writable too when
/// `write`).
pub fn translate(pml4: u64, va: u64, write: bool) -> Option<u64> {
    let pte = pte_addr(pml4, va, false)?;
    let e = read(pte);
    let need = P | US | if write { RW } else { 0 };
    (e & need == need).then_some((e & ADDR) | (va & (PAGE - 1)))
}

/// Frees an address space that is no longer loaded: its owned frames, its
/// page tables, its PDPT and PML4 (the kernel's tables are shared, not freed).
pub fn free_space(pml4: u64) {
    let pdpt = read(pml4) & ADDR;
    let pd = read(pdpt + 8);
    if pd & P != 0 {
        let pd = pd & ADDR;
        for i in 0..512 {
            let pt = read(pd + i * 8);
            if pt & P == 0 {
                continue;
            }
            let pt = pt & ADDR;
            for j in 0..512 {
                let e = read(pt + j * 8);
                if e & P != 0 && e & OWNED != 0 {
                    free(e & ADDR);
                }
            }
            free(pt);
        }
        free(pd);
    }
    free(pdpt);
    free(pml4);
}
