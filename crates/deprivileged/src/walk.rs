//! The VMM's own walk of the guest's page tables (4-level, PAE or 2-level, or
//! none with paging off): the walker of `arch` over guest RAM, with the hardware's reserved-bit checks
//! and accessed/dirty updates; guest-linear memory access built on it (the
//! frames of a page-table tree are `machine::paging::table_frames`).
//! Page-table entries are read from guest RAM only, and every frame address
//! is checked against the guest's physical-address width, so nothing the
//! guest writes in its tables can name memory outside its own.

use std::convert::Infallible;

use arch::paging::{self, Access, PageTables, Paging, Reserved, Translation, WalkError};
use x86::Cpu;

/// The physical-address width the deprivileged engines report to the guest
/// (CPUID 0x8000_0008), the CPU model's: frame bits above it are reserved,
/// and engine-private memory lies above it.
pub const PHYS_BITS: u32 = x86::model::PHYS_BITS;

/// The paging of the guest's (virtual) CPU with these control registers:
/// `None` with paging off (linear addresses are physical), else 4-level in
/// long mode, PAE with CR4.PAE, 2-level otherwise; reserved bits checked at
/// [`PHYS_BITS`].
pub fn guest_paging(cr0: u64, cr3: u64, cr4: u64, efer: u64) -> Option<Paging> {
    if cr0 & arch::cr0::PG == 0 {
        return None;
    }
    let mut pg = Paging::new(cr0, cr3, cr4, efer);
    pg.reserved = Reserved::Full {
        phys_bits: PHYS_BITS,
    };
    // The shadow enforces supervisor/user itself; SMEP is not modelled.
    pg.smep = false;
    Some(pg)
}

/// What a linear address of a guest with paging off maps to: the physical
/// page of the same number (32-bit: linear addresses wrap at 4 GiB), with
/// every right.
pub fn identity(lin: u64) -> Translation {
    Translation {
        page: lin & 0xffff_f000,
        size_shift: 12,
        writable: true,
        user: true,
        nx: false,
        dirty: true,
        global: false,
    }
}

/// Guest RAM holding the guest's tables; entries outside RAM read as not
/// present.
struct Ram<'a>(&'a mut Cpu);

impl PageTables for Ram<'_> {
    type Error = Infallible;

    /// 8-byte entries, or 4-byte ones (2-level paging), zero-extended.
    fn read(&mut self, at: u64, wide: bool) -> u64 {
        let mut b = [0u8; 8];
        let n = if wide { 8 } else { 4 };
        if !self.0.ram_read(at, &mut b[..n]) {
            return 0;
        }
        u64::from_le_bytes(b)
    }

    fn write(&mut self, at: u64, wide: bool, value: u64) {
        let n = if wide { 8 } else { 4 };
        self.0.ram_write(at, &value.to_le_bytes()[..n]);
    }
}

/// Walks the guest's tables for `lin`. On failure, the #PF error code the
/// hardware would give. Sets accessed bits (and the dirty bit of a write).
pub fn walk(
    cpu: &mut Cpu,
    pg: Paging,
    lin: u64,
    acc: Access,
    user: bool,
) -> Result<Translation, u32> {
    paging::walk(&mut Ram(cpu), &pg, lin, acc, user).map_err(|e| match e {
        WalkError::PageFault(code) => code,
        WalkError::Tables(never) => match never {},
    })
}

/// A fault the VMM met touching guest memory on the guest's behalf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub vector: u8,
    pub code: Option<u32>,
    /// The faulting address of a #PF.
    pub cr2: Option<u64>,
}

impl Fault {
    pub fn gp(code: u32) -> Fault {
        Fault {
            vector: arch::vector::GP,
            code: Some(code),
            cr2: None,
        }
    }
}

/// Copies guest-linear memory, page by page, as the guest at `user` privilege
/// would access it (`write`: `buf` into the guest, else out of it) through
/// `pg` (`None`: paging off). Bytes that are not RAM read as 0xff and are
/// not written.
pub fn access(
    cpu: &mut Cpu,
    pg: Option<Paging>,
    lin: u64,
    buf: &mut [u8],
    write: bool,
    user: bool,
) -> Result<(), Fault> {
    let mut done = 0;
    while done < buf.len() {
        let a = lin.wrapping_add(done as u64);
        if !arch::canonical(a) {
            return Err(Fault::gp(0));
        }
        let n = (buf.len() - done).min(0x1000 - (a & 0xfff) as usize);
        let acc = if write { Access::Write } else { Access::Read };
        let m = match pg {
            None => identity(a),
            Some(pg) => walk(cpu, pg, a, acc, user).map_err(|code| Fault {
                vector: arch::vector::PF,
                code: Some(code),
                cr2: Some(a),
            })?,
        };
        let pa = m.page | (a & 0xfff);
        let chunk = &mut buf[done..done + n];
        if write {
            cpu.ram_write(pa, chunk);
        } else if !cpu.ram_read(pa, chunk) {
            chunk.fill(0xff);
        }
        done += n;
    }
    Ok(())
}
