//! Software walks of the guest's 4-level page tables, for the VMM's own accesses
//! to guest-virtual addresses (hypercall arguments).

use vm_memory::{Bytes, GuestAddress};

use crate::GuestMemory;

const PRESENT: u64 = 1;
const PS: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Translates `gva` through the 4-level page tables at `cr3`; `None` if a level
/// is not present or a table lies outside guest memory.
pub fn translate(mem: &GuestMemory, cr3: u64, gva: u64) -> Option<u64> {
    let mut table = cr3 & ADDR;
    for level in (0..4).rev() {
        let index = (gva >> (12 + 9 * level)) & 0x1ff;
        let entry: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        if level > 0 && level < 3 && entry & PS != 0 {
            let size = 1u64 << (12 + 9 * level);
            return Some((entry & ADDR & !(size - 1)) | (gva & (size - 1)));
        }
        table = entry & ADDR;
    }
    Some(table | (gva & 0xfff))
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

/// Writes `buf` at guest-virtual `gva`, page by page.
pub fn write_virt(mem: &GuestMemory, cr3: u64, gva: u64, buf: &[u8]) -> Option<()> {
    let mut done = 0;
    while done < buf.len() {
        let va = gva.checked_add(done as u64)?;
        let chunk = (0x1000 - (va & 0xfff) as usize).min(buf.len() - done);
        let pa = translate(mem, cr3, va)?;
        mem.write_slice(&buf[done..done + chunk], GuestAddress(pa))
            .ok()?;
        done += chunk;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryLayout;

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
        write_virt(&m, pml4, 0x4000_0ffe, b"ab").unwrap();
        let mut b = [0u8; 2];
        read_virt(&m, pml4, 0x4000_0ffe, &mut b).unwrap();
        assert_eq!(&b, b"ab");
        assert!(
            write_virt(&m, pml4, 0x4000_0fff, b"ab").is_none(),
            "crosses into an unmapped page"
        );
    }
}
