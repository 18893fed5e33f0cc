//! The VMM's own accesses to guest-virtual addresses (hypercall arguments),
//! through the guest's 4-level page tables with the walker of `arch`, and
//! the frames of a page-table tree (what `new_baseptr` checks and the `pv`
//! engine write-protects).

use arch::paging::{self, Access, Mode, PageTables, Paging, Reserved};
use arch::pte::{ADDR, P, PS};
use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemory;

/// The guest's tables in guest memory; entries outside it read as not present.
struct Tables<'a>(&'a GuestMemory);

impl PageTables for Tables<'_> {
    type Error = core::convert::Infallible;

    fn read(&mut self, at: u64, _wide: bool) -> u64 {
        self.0.read_obj(GuestAddress(at)).unwrap_or(0)
    }

    fn write(&mut self, at: u64, _wide: bool, value: u64) {
        // A write outside guest memory has no entry to update.
        let _ = self.0.write_obj(value, GuestAddress(at));
    }
}

/// Translates `gva` through the 4-level page tables at `cr3`; `None` if a level
/// is not present or a table lies outside guest memory. Only presence is
/// checked (the access is the VMM's, made as if by the kernel with CR0.WP
/// clear and NX allowed), and no accessed or dirty bit is set.
pub fn translate(mem: &GuestMemory, cr3: u64, gva: u64) -> Option<u64> {
    let pg = Paging {
        mode: Mode::FourLevel,
        cr3,
        wp: false,
        nxe: true,
        pse: false,
        pge: false,
        smep: false,
        reserved: Reserved::NxOnly,
        accessed_dirty: false,
    };
    let t = paging::walk(&mut Tables(mem), &pg, gva, Access::Read, false).ok()?;
    Some(t.page | (gva & 0xfff))
}

/// Translates linear `gva` as a CPU with these control registers would
/// (no paging: the address itself; else 4-level, PAE or 2-level), for a
/// debugger: only presence is checked, no accessed or dirty bit is set.
/// `None` if a level is not present or a table lies outside guest memory.
pub fn translate_current(
    mem: &GuestMemory,
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    gva: u64,
) -> Option<u64> {
    if cr0 & arch::cr0::PG == 0 {
        return Some(gva & 0xffff_ffff);
    }
    let pg = Paging {
        wp: false,
        accessed_dirty: false,
        ..Paging::new(cr0, cr3, cr4, efer)
    };
    let t = paging::walk(&mut Tables(mem), &pg, gva, Access::Read, false).ok()?;
    Some(t.page | (gva & 0xfff))
}

/// Reads `buf.len()` bytes at guest-virtual `gva`, page by page.
pub fn read_virt(mem: &GuestMemory, cr3: u64, gva: u64, buf: &mut [u8]) -> Option<()> {
    let mut done = 0;
    while done < buf.len() {
        let va = gva.checked_add(done as u64)?;
        let chunk = (0x1000 - (va & 0xfff) as usize).min(buf.len() - done);
        let pa = translate(mem, cr3, va)?;
        mem.read_slice(&mut buf[done..done + chunk], GuestAddress(pa))
            .ok()?;
        done += chunk;
    }
    Some(())
}

/// Writes `buf` at guest-virtual `gva`, page by page, and calls `written`
/// with the guest-physical address and length of each piece it wrote (for
/// the engine's caches). `None` at the first page that does not translate to
/// guest RAM (the pieces before it are written).
pub fn write_virt(
    mem: &GuestMemory,
    cr3: u64,
    gva: u64,
    buf: &[u8],
    mut written: impl FnMut(u64, u64),
) -> Option<()> {
    let mut done = 0;
    while done < buf.len() {
        let va = gva.checked_add(done as u64)?;
        let chunk = (0x1000 - (va & 0xfff) as usize).min(buf.len() - done);
        let pa = translate(mem, cr3, va)?;
        mem.write_slice(&buf[done..done + chunk], GuestAddress(pa))
            .ok()?;
        written(pa, chunk as u64);
        done += chunk;
    }
    Some(())
}

/// The frames of a 4-level page-table tree (the PML4 and every PDPT, PD and
/// PT it links), sorted, each once. `read` reads a page-table entry at a
/// guest-physical address and answers `None` outside guest RAM; `Err` gives
/// the address of an entry that links a table outside guest RAM.
pub fn table_frames(read: impl Fn(u64) -> Option<u64>, cr3: u64) -> Result<Vec<u64>, u64> {
    let mut frames = vec![cr3 & ADDR];
    let mut level_tables = vec![cr3 & ADDR];
    for level in (1..4u32).rev() {
        let mut next = Vec::new();
        for &t in &level_tables {
            for i in 0..512 {
                let at = t + 8 * i;
                let e = read(at).ok_or(at)?;
                if e & P == 0 || (e & PS != 0 && level < 3) {
                    continue;
                }
                let f = e & ADDR;
                if read(f).is_none() {
                    return Err(at);
                }
                next.push(f);
            }
        }
        next.sort_unstable();
        next.dedup();
        frames.extend_from_slice(&next);
        level_tables = next;
    }
    frames.sort_unstable();
    frames.dedup();
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryLayout;

    #[test]
    fn table_frames_of_a_tree() {
        let l = MemoryLayout::new(16 << 20).unwrap();
        let m = l.create().unwrap();
        let cr3 = crate::boot::write_identity_page_tables(&m).unwrap();
        let read = |pa: u64| m.read_obj::<u64>(GuestAddress(pa)).ok();
        // The PML4, the PDPT and four PDs of 2 MiB pages (which link no table).
        let pd = abi::BOOT_PD;
        let expect = vec![
            cr3,
            abi::BOOT_PDPT,
            pd,
            pd + 0x1000,
            pd + 0x2000,
            pd + 0x3000,
        ];
        assert_eq!(table_frames(read, cr3), Ok(expect));
        // A PD entry that links a page table outside RAM.
        m.write_obj((1u64 << 40) | 3, GuestAddress(pd + 0x1000 + 8))
            .unwrap();
        assert_eq!(table_frames(read, cr3), Err(pd + 0x1000 + 8));
        // A root outside RAM.
        assert_eq!(table_frames(read, 1 << 40), Err(1 << 40));
    }

    #[test]
    fn walks_boot_tables_and_4k_pages() {
        let l = MemoryLayout::new(16 << 20).unwrap();
        let m = l.create().unwrap();
        let cr3 = crate::boot::write_identity_page_tables(&m).unwrap();
        assert_eq!(translate(&m, cr3, 0x12_3456), Some(0x12_3456));
        assert_eq!(translate(&m, cr3, 5 << 30), None);
        // Map 0x4000_0000 -> 0x80_0000 with a 4 KiB page under new tables.
        let (pml4, pdpt, pd, pt) = (0x10_0000u64, 0x10_1000u64, 0x10_2000u64, 0x10_3000u64);
        m.write_obj(pdpt | 3, GuestAddress(pml4)).unwrap();
        m.write_obj(pd | 3, GuestAddress(pdpt + 8)).unwrap();
        m.write_obj(pt | 3, GuestAddress(pd)).unwrap();
        m.write_obj(0x80_0000u64 | 3, GuestAddress(pt)).unwrap();
        assert_eq!(translate(&m, pml4, 0x4000_0123), Some(0x80_0123));
        assert_eq!(translate(&m, pml4, 0x4000_1000), None);
        let mut pieces = Vec::new();
        write_virt(&m, pml4, 0x4000_0ffe, b"ab", |pa, n| pieces.push((pa, n))).unwrap();
        assert_eq!(pieces, [(0x80_0ffe, 2)]);
        let mut b = [0u8; 2];
        read_virt(&m, pml4, 0x4000_0ffe, &mut b).unwrap();
        assert_eq!(&b, b"ab");
        assert!(
            write_virt(&m, pml4, 0x4000_0fff, b"ab", |_, _| {}).is_none(),
            "crosses into an unmapped page"
        );
    }
}
