//! The guest page walker: the one translation of linear to physical addresses
//! through a guest's page tables in visor, for 4-level (long mode), PAE and
//! 2-level 32-bit paging.
//!
//! [`walk`] is generic over [`PageTables`], how entries are found, read and
//! written (guest RAM directly, through nested paging, or a snapshot), and
//! inlined into each user, so the software CPU's TLB refill pays nothing for
//! the sharing. [`Paging`] says what the walk honours: the paging mode, CR3,
//! CR0.WP, EFER.NXE, CR4.PSE and CR4.PGE; which reserved bits fault; and
//! whether the walk sets accessed and dirty bits.
//!
//! Checks are those of the hardware for one access: the present bit at every
//! level; R/W and U/S combined over all levels, with CR0.WP deciding whether
//! supervisor writes honour R/W; NX (with EFER.NXE) combined over all levels.
//! A violation gives the #PF error code the hardware would give. SMEP and SMAP
//! are not enforced; CR4.SMEP only makes instruction fetches show in the error
//! code, as it does on hardware. After the permission check passes, the walk
//! sets the accessed bit of every entry it used and, for a write, the dirty bit
//! of the leaf (where they are clear).

use crate::pte::{ACCESSED, ADDR, DIRTY, G, NX, P, PS, RW, US};
use crate::{cr0, cr4, efer, pf};

/// The kind of an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Exec,
}

/// A paging mode (with CR0.PG set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 32-bit paging (CR4.PAE clear): a page directory and page tables of
    /// 4-byte entries; 4 KiB pages, and 4 MiB pages with CR4.PSE.
    TwoLevel,
    /// PAE paging: four PDPTEs at CR3, then page directories and page tables
    /// of 8-byte entries; 4 KiB and 2 MiB pages.
    Pae,
    /// 4-level paging (long mode): 4 KiB, 2 MiB and 1 GiB pages.
    FourLevel,
}

/// Which reserved bits of 8-byte paging-structure entries make a walk fault
/// (with the RSVD bit in the error code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reserved {
    /// Only NX without EFER.NXE: what the software CPU has always checked.
    NxOnly,
    /// NX without EFER.NXE, frame-address bits from `phys_bits` to 51 (with
    /// PAE paging up to 62; CR3's are ignored), PS in a PML4E, the frame
    /// bits below a large page's alignment, and with 32-bit paging the bits
    /// of a 4 MiB PDE beyond PSE-36's address bits, as the hardware checks
    /// them (SDM vol. 3 4.3, 4.4.2, 4.5.4). PAE PDPTEs are not checked here:
    /// their load (MOV to CR3) does that.
    Full {
        /// The physical-address width (CPUID 0x8000_0008 EAX[7:0]).
        phys_bits: u32,
    },
}

/// What a walk honours: the CPU's paging controls and the walker's options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Paging {
    /// The paging mode.
    pub mode: Mode,
    /// CR3: the root table's address.
    pub cr3: u64,
    /// CR0.WP: supervisor writes honour read-only pages.
    pub wp: bool,
    /// EFER.NXE: the NX bit is honoured (else it is reserved).
    pub nxe: bool,
    /// CR4.PSE: 4 MiB pages with 2-level paging.
    pub pse: bool,
    /// CR4.PGE: leaves with G set are global.
    pub pge: bool,
    /// CR4.SMEP: instruction fetches show in the error code without NXE.
    pub smep: bool,
    /// Which reserved bits fault.
    pub reserved: Reserved,
    /// Set accessed and dirty bits (else the tables are only read).
    pub accessed_dirty: bool,
}

impl Paging {
    /// The paging of a CPU with paging enabled and these control registers
    /// (4-level with EFER.LMA, else PAE with CR4.PAE, else 2-level); reserved
    /// bits [`Reserved::NxOnly`], accessed and dirty bits set.
    #[inline]
    pub fn new(cr0: u64, cr3: u64, cr4: u64, efer: u64) -> Paging {
        Paging {
            mode: if efer & efer::LMA != 0 {
                Mode::FourLevel
            } else if cr4 & cr4::PAE != 0 {
                Mode::Pae
            } else {
                Mode::TwoLevel
            },
            cr3,
            wp: cr0 & cr0::WP != 0,
            nxe: efer & efer::NXE != 0,
            pse: cr4 & cr4::PSE != 0,
            pge: cr4 & cr4::PGE != 0,
            smep: cr4 & cr4::SMEP != 0,
            reserved: Reserved::NxOnly,
            accessed_dirty: true,
        }
    }

    /// The #PF error code of a fault of this paging (see [`fault_code`]).
    #[inline]
    pub fn fault_code(&self, present: bool, access: Access, user: bool, rsvd: bool) -> u32 {
        fault_code(present, access, user, rsvd, self.nxe || self.smep)
    }
}

/// A #PF error code: `present` for a protection violation (else the page was
/// not present), `rsvd` for a reserved bit; instruction fetches show only if
/// `fetch_shown` (EFER.NXE or CR4.SMEP set).
#[inline]
pub fn fault_code(present: bool, access: Access, user: bool, rsvd: bool, fetch_shown: bool) -> u32 {
    let mut code = 0;
    if present {
        code |= pf::PRESENT;
    }
    if access == Access::Write {
        code |= pf::WRITE;
    }
    if user {
        code |= pf::USER;
    }
    if rsvd {
        code |= pf::RSVD;
    }
    if access == Access::Exec && fetch_shown {
        code |= pf::FETCH;
    }
    code
}

/// How the walker reaches paging-structure entries.
pub trait PageTables {
    /// Why an entry could not be reached (the walk stops with it).
    type Error;

    /// Where the entry at guest-physical `addr` is read and written. The
    /// default is `addr` itself; nested paging translates it here.
    #[inline]
    fn locate(&mut self, addr: u64) -> Result<u64, Self::Error> {
        Ok(addr)
    }

    /// Reads the entry at `at` (from [`PageTables::locate`]): 8 bytes, or 4
    /// (zero-extended) if not `wide`. An entry that cannot be read reads as
    /// 0, not present.
    fn read(&mut self, at: u64, wide: bool) -> u64;

    /// Writes the entry at `at` (8 bytes, or its low 4 if not `wide`): the
    /// walker sets accessed and dirty bits with it.
    fn write(&mut self, at: u64, wide: bool, value: u64);
}

/// A successful walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The physical address of the 4 KiB page that holds the linear address.
    pub page: u64,
    /// The log2 of the size of the page the tables map it with: 12, 21, 22
    /// or 30.
    pub size_shift: u32,
    /// Writable: R/W set at every level.
    pub writable: bool,
    /// User-accessible: U/S set at every level.
    pub user: bool,
    /// Not executable: NX set at some level, with EFER.NXE.
    pub nx: bool,
    /// The leaf's dirty bit after this access.
    pub dirty: bool,
    /// Global: the leaf's G bit, with CR4.PGE.
    pub global: bool,
}

/// Why a walk failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError<E> {
    /// A page fault, with its error code.
    PageFault(u32),
    /// The tables could not be reached ([`PageTables::locate`] failed).
    Tables(E),
}

/// Walks the page tables of `pg` for `lin`, checking an access of kind `access`
/// made at CPL 3 if `user` (else at CPL 0-2). Sets accessed and dirty bits if
/// `pg.accessed_dirty`.
#[inline]
pub fn walk<T: PageTables + ?Sized>(
    tables: &mut T,
    pg: &Paging,
    lin: u64,
    access: Access,
    user: bool,
) -> Result<Translation, WalkError<T::Error>> {
    let fault = |present: bool, rsvd: bool| {
        Err(WalkError::PageFault(
            pg.fault_code(present, access, user, rsvd),
        ))
    };
    let wide = pg.mode != Mode::TwoLevel;
    // (where, entry) of each level used, for the accessed and dirty bits.
    let mut path = [(0u64, 0u64); 4];
    let mut n = 0;
    let (mut rw, mut us, mut nx) = (true, true, false);
    let (leaf, shift) = if pg.mode == Mode::TwoLevel {
        let at = tables
            .locate((pg.cr3 & 0xffff_f000) + ((lin >> 22) & 0x3ff) * 4)
            .map_err(WalkError::Tables)?;
        let pde = tables.read(at, false);
        if pde & P == 0 {
            return fault(false, false);
        }
        path[0] = (at, pde);
        n = 1;
        rw &= pde & RW != 0;
        us &= pde & US != 0;
        if pde & PS != 0 && pg.pse {
            if let Reserved::Full { phys_bits } = pg.reserved {
                // PDE bits 20:13 hold physical-address bits 39:32 (PSE-36)
                // up to MAXPHYADDR; the rest of them and bit 21 are reserved.
                let high = phys_bits.clamp(32, 40) - 32;
                if pde & (0x3f_e000 & !(((1u64 << high) - 1) << 13)) != 0 {
                    return fault(true, true);
                }
            }
            (pde, 22)
        } else {
            let at = tables
                .locate((pde & 0xffff_f000) + ((lin >> 12) & 0x3ff) * 4)
                .map_err(WalkError::Tables)?;
            let pte = tables.read(at, false);
            if pte & P == 0 {
                return fault(false, false);
            }
            path[1] = (at, pte);
            n = 2;
            rw &= pte & RW != 0;
            us &= pte & US != 0;
            (pte, 12)
        }
    } else {
        let rsvd_addr = match pg.reserved {
            Reserved::NxOnly => 0,
            // PAE entries reserve bits 62:52 as well (4-level paging ignores
            // them).
            Reserved::Full { phys_bits } if pg.mode == Mode::Pae => {
                !NX & !((1u64 << phys_bits.min(52)) - 1)
            }
            Reserved::Full { phys_bits } => ADDR & !((1u64 << phys_bits.min(52)) - 1),
        };
        let (mut table, mut level) = if pg.mode == Mode::FourLevel {
            (pg.cr3 & ADDR & !rsvd_addr, 3u32)
        } else {
            // The PDPTE (no permission bits).
            let at = tables
                .locate((pg.cr3 & 0xffff_ffe0) + ((lin >> 30) & 3) * 8)
                .map_err(WalkError::Tables)?;
            let pdpte = tables.read(at, true);
            if pdpte & P == 0 {
                return fault(false, false);
            }
            (pdpte & ADDR, 1)
        };
        loop {
            let at = tables
                .locate(table + ((lin >> (12 + 9 * level)) & 0x1ff) * 8)
                .map_err(WalkError::Tables)?;
            let ent = tables.read(at, true);
            if ent & P == 0 {
                return fault(false, false);
            }
            let mut bad = ent & NX != 0 && !pg.nxe;
            if let Reserved::Full { .. } = pg.reserved {
                bad |= ent & rsvd_addr != 0;
                if ent & PS != 0 {
                    bad |= match level {
                        3 => true,
                        2 => ent & 0x3fff_e000 != 0,
                        1 => ent & 0x1f_e000 != 0,
                        _ => false,
                    };
                }
            }
            if bad {
                return fault(true, true);
            }
            path[n] = (at, ent);
            n += 1;
            rw &= ent & RW != 0;
            us &= ent & US != 0;
            nx |= ent & NX != 0;
            // PS in a PML4E is ignored unless reserved bits are checked.
            if level == 0 || (ent & PS != 0 && level < 3) {
                break (ent, 12 + 9 * level);
            }
            table = ent & ADDR;
            level -= 1;
        }
    };
    let nx = nx && pg.nxe;
    let denied = (user && !us)
        || (access == Access::Write && !rw && (user || pg.wp))
        || (access == Access::Exec && nx);
    if denied {
        return fault(true, false);
    }
    if pg.accessed_dirty {
        for &(at, ent) in &path[..n - 1] {
            if ent & ACCESSED == 0 {
                tables.write(at, wide, ent | ACCESSED);
            }
        }
        let set = if access == Access::Write {
            ACCESSED | DIRTY
        } else {
            ACCESSED
        };
        if leaf & set != set {
            tables.write(path[n - 1].0, wide, leaf | set);
        }
    }
    let size = 1u64 << shift;
    let frame = if shift == 22 {
        // Bits 13..20 of a 4 MiB PDE are physical-address bits 32..39.
        (leaf & 0xffc0_0000) | ((leaf >> 13) & 0xff) << 32
    } else {
        leaf & ADDR & !(size - 1)
    };
    Ok(Translation {
        page: frame | (lin & (size - 1) & !0xfff),
        size_shift: shift,
        writable: rw,
        user: us,
        nx,
        dirty: access == Access::Write || leaf & DIRTY != 0,
        global: leaf & G != 0 && pg.pge,
    })
}

#[cfg(test)]
mod tests;
