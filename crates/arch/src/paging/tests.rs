extern crate std;

use std::vec;
use std::vec::Vec;

use super::*;
use crate::pte::PWT;

const MEM: usize = 8 << 20;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;
/// A linear address with a different index at every level: PML4 1, PDPT 2,
/// PD 3, PT 4, offset 0x567.
const LIN: u64 = (1 << 39) | (2 << 30) | (3 << 21) | (4 << 12) | 0x567;
const FRAME: u64 = 0x50_0000;
const PRW: u64 = P | RW;
const ALL: u64 = P | RW | US;

/// Guest-physical memory holding the tables; counts the walker's writes.
struct Mem {
    bytes: Vec<u8>,
    writes: usize,
}

impl Mem {
    fn new() -> Mem {
        Mem {
            bytes: vec![0; MEM],
            writes: 0,
        }
    }

    fn set(&mut self, at: u64, v: u64) {
        self.bytes[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn set32(&mut self, at: u64, v: u32) {
        self.bytes[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn get(&self, at: u64) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bytes[at as usize..at as usize + 8]);
        u64::from_le_bytes(b)
    }

    /// The 4-level tables of `LIN`, with `leaf_flags` on the PTE and `flags`
    /// on the levels above.
    fn four_level(flags: u64, leaf_flags: u64) -> Mem {
        let mut m = Mem::new();
        m.set(PML4 + 8, PDPT | flags);
        m.set(PDPT + 2 * 8, PD | flags);
        m.set(PD + 3 * 8, PT | flags);
        m.set(PT + 4 * 8, FRAME | leaf_flags);
        m
    }
}

impl PageTables for Mem {
    type Error = core::convert::Infallible;

    fn read(&mut self, at: u64, wide: bool) -> u64 {
        if at as usize + 8 > MEM {
            return 0;
        }
        let v = self.get(at);
        if wide {
            v
        } else {
            v & 0xffff_ffff
        }
    }

    fn write(&mut self, at: u64, wide: bool, value: u64) {
        self.writes += 1;
        if wide {
            self.set(at, value);
        } else {
            self.set32(at, value as u32);
        }
    }
}

fn long(cr3: u64) -> Paging {
    Paging::new(cr0::PG | cr0::WP, cr3, cr4::PAE, efer::LMA | efer::NXE)
}

fn go(m: &mut Mem, pg: &Paging, lin: u64, access: Access, user: bool) -> Result<Translation, u32> {
    walk(m, pg, lin, access, user).map_err(|e| match e {
        WalkError::PageFault(code) => code,
        WalkError::Tables(never) => match never {},
    })
}

#[test]
fn paging_controls_from_registers() {
    let pg = long(PML4);
    assert_eq!(pg.mode, Mode::FourLevel);
    assert!(pg.wp && pg.nxe && !pg.pse && !pg.pge && !pg.smep);
    assert!(pg.accessed_dirty);
    assert_eq!(pg.reserved, Reserved::NxOnly);
    let pae = Paging::new(cr0::PG, 0, cr4::PAE | cr4::PGE | cr4::SMEP, 0);
    assert_eq!(pae.mode, Mode::Pae);
    assert!(!pae.wp && !pae.nxe && pae.pge && pae.smep);
    let two = Paging::new(cr0::PG, 0, cr4::PSE, 0);
    assert_eq!(two.mode, Mode::TwoLevel);
    assert!(two.pse);
}

#[test]
fn four_level_4k_sets_accessed_then_dirty() {
    let mut m = Mem::four_level(ALL, ALL);
    let t = go(&mut m, &long(PML4), LIN, Access::Read, true).unwrap();
    assert_eq!(
        t,
        Translation {
            page: FRAME,
            size_shift: 12,
            writable: true,
            user: true,
            nx: false,
            dirty: false,
            global: false,
        }
    );
    for at in [PML4 + 8, PDPT + 16, PD + 24, PT + 32] {
        assert_ne!(m.get(at) & ACCESSED, 0, "accessed at {at:#x}");
        assert_eq!(m.get(at) & DIRTY, 0, "dirty at {at:#x}");
    }
    assert_eq!(m.writes, 4);
    // Again: nothing left to set.
    go(&mut m, &long(PML4), LIN, Access::Read, true).unwrap();
    assert_eq!(m.writes, 4);
    // A write dirties the leaf only.
    let t = go(&mut m, &long(PML4), LIN, Access::Write, true).unwrap();
    assert!(t.dirty);
    assert_eq!(m.writes, 5);
    assert_ne!(m.get(PT + 32) & DIRTY, 0);
    for at in [PML4 + 8, PDPT + 16, PD + 24] {
        assert_eq!(m.get(at) & DIRTY, 0);
    }
    // The dirty bit shows in later reads.
    assert!(
        go(&mut m, &long(PML4), LIN, Access::Read, false)
            .unwrap()
            .dirty
    );
}

#[test]
fn without_accessed_dirty_the_tables_are_only_read() {
    let mut m = Mem::four_level(ALL, ALL);
    let pg = Paging {
        accessed_dirty: false,
        ..long(PML4)
    };
    let t = go(&mut m, &pg, LIN, Access::Write, false).unwrap();
    assert_eq!(t.page, FRAME);
    assert!(
        t.dirty,
        "the access dirties the page even if the bit stays clear"
    );
    assert_eq!(m.writes, 0);
    assert_eq!(m.get(PT + 32), FRAME | ALL);
}

#[test]
fn large_pages_2m_and_1g() {
    let mut m = Mem::new();
    m.set(PML4 + 8, PDPT | ALL);
    m.set(PDPT + 2 * 8, PD | ALL);
    m.set(PD + 3 * 8, 0x4000_0000 | ALL | PS | G);
    let t = go(&mut m, &long(PML4), LIN, Access::Exec, false).unwrap();
    assert_eq!(t.page, 0x4000_0000 | (4 << 12));
    assert_eq!(t.size_shift, 21);
    assert!(!t.global, "G without CR4.PGE");
    let pge = Paging {
        pge: true,
        ..long(PML4)
    };
    assert!(go(&mut m, &pge, LIN, Access::Read, false).unwrap().global);
    // 1 GiB: the PDPTE is the leaf.
    m.set(PDPT + 2 * 8, 0x80_0000_0000 | ALL | PS);
    let t = go(&mut m, &long(PML4), LIN, Access::Write, false).unwrap();
    assert_eq!(t.page, 0x80_0000_0000 | (3 << 21) | (4 << 12));
    assert_eq!(t.size_shift, 30);
    assert_ne!(m.get(PDPT + 16) & DIRTY, 0);
    assert_eq!(m.get(PML4 + 8) & DIRTY, 0);
}

#[test]
fn ps_in_a_pml4e_is_ignored_or_reserved() {
    let mut m = Mem::four_level(ALL, ALL);
    m.set(PML4 + 8, PDPT | ALL | PS);
    assert_eq!(
        go(&mut m, &long(PML4), LIN, Access::Read, false)
            .unwrap()
            .page,
        FRAME
    );
    let full = Paging {
        reserved: Reserved::Full { phys_bits: 46 },
        ..long(PML4)
    };
    assert_eq!(
        go(&mut m, &full, LIN, Access::Read, false),
        Err(pf::PRESENT | pf::RSVD)
    );
}

#[test]
fn full_reserved_bit_checks() {
    let full = Paging {
        reserved: Reserved::Full { phys_bits: 36 },
        ..long(PML4)
    };
    // A frame beyond the physical-address width.
    let mut m = Mem::four_level(ALL, ALL);
    m.set(PT + 32, (1 << 36) | FRAME | ALL);
    assert_eq!(
        go(&mut m, &full, LIN, Access::Write, true),
        Err(pf::PRESENT | pf::WRITE | pf::USER | pf::RSVD)
    );
    assert_eq!(m.writes, 0, "a faulting walk sets no bits");
    // Without the full checks the same entry maps the frame.
    assert_eq!(
        go(&mut m, &long(PML4), LIN, Access::Read, true)
            .unwrap()
            .page,
        (1 << 36) | FRAME
    );
    // Misaligned large pages.
    let mut m = Mem::four_level(ALL, ALL);
    m.set(PD + 24, 0x20_2000 | ALL | PS);
    assert_eq!(
        go(&mut m, &full, LIN, Access::Read, false),
        Err(pf::PRESENT | pf::RSVD)
    );
    m.set(PD + 24, 0x20_0000 | ALL | PS);
    assert_eq!(
        go(&mut m, &full, LIN, Access::Read, false).unwrap().page,
        0x20_4000
    );
    m.set(PDPT + 16, 0x4020_0000 | ALL | PS);
    assert_eq!(
        go(&mut m, &full, LIN, Access::Read, false),
        Err(pf::PRESENT | pf::RSVD)
    );
    // The PAT bit (bit 12) of a large page is not an address bit.
    m.set(PDPT + 16, 0x4000_1000 | ALL | PS);
    assert_eq!(
        go(&mut m, &full, LIN, Access::Read, false).unwrap().page,
        0x4000_0000 | (3 << 21) | (4 << 12)
    );
}

#[test]
fn not_present_at_each_level() {
    for at in [PML4 + 8, PDPT + 16, PD + 24, PT + 32] {
        let mut m = Mem::four_level(ALL, ALL);
        m.set(at, m.get(at) & !P);
        assert_eq!(go(&mut m, &long(PML4), LIN, Access::Read, false), Err(0));
        assert_eq!(
            go(&mut m, &long(PML4), LIN, Access::Write, true),
            Err(pf::WRITE | pf::USER)
        );
        assert_eq!(
            go(&mut m, &long(PML4), LIN, Access::Exec, false),
            Err(pf::FETCH)
        );
        assert_eq!(m.writes, 0);
    }
}

#[test]
fn user_supervisor() {
    // U/S clear at one level is enough.
    let mut m = Mem::four_level(ALL, ALL);
    m.set(PD + 24, PT | PRW);
    let code = go(&mut m, &long(PML4), LIN, Access::Read, true);
    assert_eq!(code, Err(pf::PRESENT | pf::USER));
    assert_eq!(m.writes, 0, "a denied access sets no accessed bit");
    let t = go(&mut m, &long(PML4), LIN, Access::Read, false).unwrap();
    assert!(!t.user);
}

#[test]
fn read_only_and_cr0_wp() {
    let mut m = Mem::four_level(ALL, P | US);
    assert_eq!(
        go(&mut m, &long(PML4), LIN, Access::Write, true),
        Err(pf::PRESENT | pf::WRITE | pf::USER)
    );
    assert_eq!(
        go(&mut m, &long(PML4), LIN, Access::Write, false),
        Err(pf::PRESENT | pf::WRITE)
    );
    let no_wp = Paging {
        wp: false,
        ..long(PML4)
    };
    let t = go(&mut m, &no_wp, LIN, Access::Write, false).unwrap();
    assert!(!t.writable && t.dirty);
    assert_ne!(m.get(PT + 32) & DIRTY, 0);
    assert_eq!(
        go(&mut m, &no_wp, LIN, Access::Write, true),
        Err(pf::PRESENT | pf::WRITE | pf::USER),
        "CR0.WP does not matter at CPL 3"
    );
    assert!(go(&mut m, &long(PML4), LIN, Access::Read, true).is_ok());
}

#[test]
fn no_execute() {
    // NX at one level makes the page not executable.
    let mut m = Mem::four_level(ALL, ALL);
    m.set(PDPT + 16, PD | ALL | NX);
    assert_eq!(
        go(&mut m, &long(PML4), LIN, Access::Exec, false),
        Err(pf::PRESENT | pf::FETCH)
    );
    assert_eq!(
        go(&mut m, &long(PML4), LIN, Access::Exec, true),
        Err(pf::PRESENT | pf::USER | pf::FETCH)
    );
    let t = go(&mut m, &long(PML4), LIN, Access::Read, true).unwrap();
    assert!(t.nx);
    // Without EFER.NXE the NX bit is reserved.
    let no_nxe = Paging {
        nxe: false,
        ..long(PML4)
    };
    assert_eq!(
        go(&mut m, &no_nxe, LIN, Access::Read, false),
        Err(pf::PRESENT | pf::RSVD)
    );
    // ... and a fetch shows only with CR4.SMEP.
    assert_eq!(
        go(&mut m, &no_nxe, LIN, Access::Exec, false),
        Err(pf::PRESENT | pf::RSVD)
    );
    let smep = Paging {
        smep: true,
        ..no_nxe
    };
    assert_eq!(
        go(&mut m, &smep, LIN, Access::Exec, false),
        Err(pf::PRESENT | pf::RSVD | pf::FETCH)
    );
    // SMEP is not enforced: a supervisor fetch from a user page succeeds.
    let mut m = Mem::four_level(ALL, ALL);
    let smep = Paging {
        smep: true,
        ..long(PML4)
    };
    assert!(go(&mut m, &smep, LIN, Access::Exec, false).is_ok());
}

#[test]
fn pae() {
    // Four PDPTEs at a 32-byte aligned CR3; then PD and PT.
    let cr3 = 0x1020;
    let lin = (2 << 30) | (3 << 21) | (4 << 12) | 0x567;
    let mut m = Mem::new();
    m.set(cr3 + 2 * 8, PD | P);
    m.set(PD + 3 * 8, PT | ALL);
    m.set(PT + 4 * 8, FRAME | ALL | NX);
    let pg = Paging::new(cr0::PG | cr0::WP, cr3 | PWT, cr4::PAE, efer::NXE);
    let t = go(&mut m, &pg, lin, Access::Write, true).unwrap();
    assert_eq!(t.page, FRAME);
    assert!(t.nx && t.dirty && t.user && t.writable);
    assert_eq!(m.get(cr3 + 16), PD | P, "the PDPTE has no accessed bit set");
    assert_eq!(m.get(PD + 24), PT | ALL | ACCESSED);
    assert_eq!(m.get(PT + 32), FRAME | ALL | NX | ACCESSED | DIRTY);
    assert_eq!(
        go(&mut m, &pg, lin, Access::Exec, false),
        Err(pf::PRESENT | pf::FETCH)
    );
    // A 2 MiB page.
    m.set(PD + 3 * 8, 0x60_0000 | ALL | PS);
    let t = go(&mut m, &pg, lin, Access::Read, false).unwrap();
    assert_eq!((t.page, t.size_shift), (0x60_4000, 21));
    // A PDPTE that is not present.
    assert_eq!(go(&mut m, &pg, 1 << 30, Access::Read, true), Err(pf::USER));
}

#[test]
fn two_level_with_and_without_pse() {
    let lin = (5 << 22) | (6 << 12) | 0x89;
    let mut m = Mem::new();
    m.set32(PD + 5 * 4, (PT | ALL) as u32);
    m.set32(PT + 6 * 4, (FRAME | ALL) as u32);
    // The neighbouring entry must survive the 4-byte accessed/dirty writes.
    m.set32(PT + 7 * 4, 0xdead_b007);
    let pg = Paging::new(cr0::PG | cr0::WP, PD, 0, 0);
    let t = go(&mut m, &pg, lin, Access::Write, true).unwrap();
    assert_eq!((t.page, t.size_shift), (FRAME, 12));
    assert_eq!(m.get(PD + 5 * 4) as u32 as u64, PT | ALL | ACCESSED);
    assert_eq!(
        m.get(PT + 6 * 4),
        0xdead_b007 << 32 | FRAME | ALL | ACCESSED | DIRTY
    );
    // A 4 MiB page with PSE (bits 13..20 are address bits 32..39); without
    // PSE the same PDE points to a page table.
    m.set32(PD + 5 * 4, (0x80_0000 | (0x12 << 13) | ALL | PS) as u32);
    let pse = Paging { pse: true, ..pg };
    let t = go(&mut m, &pse, lin, Access::Read, false).unwrap();
    assert_eq!((t.page, t.size_shift), (0x12_0080_6000, 22));
    let t = go(&mut m, &pg, lin, Access::Read, false);
    assert_eq!(t, Err(0), "without PSE: an empty page table at 0x82_4000");
    // Permissions: read-only PDE, user access to a supervisor PTE.
    m.set32(PD + 5 * 4, (PT | P | US) as u32);
    assert_eq!(
        go(&mut m, &pg, lin, Access::Write, false),
        Err(pf::PRESENT | pf::WRITE)
    );
    m.set32(PD + 5 * 4, (PT | ALL) as u32);
    m.set32(PT + 6 * 4, (FRAME | PRW) as u32);
    assert_eq!(
        go(&mut m, &pg, lin, Access::Read, true),
        Err(pf::PRESENT | pf::USER)
    );
    // No NX in 32-bit entries: fetches are allowed and never reported.
    m.set32(PT + 6 * 4, (FRAME | ALL) as u32);
    assert!(go(&mut m, &pg, lin, Access::Exec, true).is_ok());
    m.set32(PT + 6 * 4, 0);
    assert_eq!(go(&mut m, &pg, lin, Access::Exec, true), Err(pf::USER));
}

/// Tables behind a translation (as nested paging puts them): entry
/// addresses move by `offset`, and one address cannot be reached.
struct Nested {
    mem: Mem,
    offset: u64,
    unreachable: u64,
}

impl PageTables for Nested {
    type Error = u64;

    fn locate(&mut self, addr: u64) -> Result<u64, u64> {
        if addr == self.unreachable {
            return Err(addr);
        }
        Ok(addr + self.offset)
    }

    fn read(&mut self, at: u64, wide: bool) -> u64 {
        self.mem.read(at, wide)
    }

    fn write(&mut self, at: u64, wide: bool, value: u64) {
        self.mem.write(at, wide, value)
    }
}

#[test]
fn entries_are_located_first() {
    const OFF: u64 = 0x10_0000;
    let mut mem = Mem::new();
    mem.set(OFF + PML4 + 8, PDPT | ALL);
    mem.set(OFF + PDPT + 16, PD | ALL);
    mem.set(OFF + PD + 24, PT | ALL);
    mem.set(OFF + PT + 32, FRAME | ALL);
    let mut n = Nested {
        mem,
        offset: OFF,
        unreachable: u64::MAX,
    };
    let t = walk(&mut n, &long(PML4), LIN, Access::Write, false).unwrap();
    assert_eq!(t.page, FRAME);
    assert_eq!(n.mem.get(OFF + PT + 32), FRAME | ALL | ACCESSED | DIRTY);
    n.unreachable = PD + 24;
    assert_eq!(
        walk(&mut n, &long(PML4), LIN, Access::Read, false),
        Err(WalkError::Tables(PD + 24))
    );
}

#[test]
fn fault_codes() {
    assert_eq!(fault_code(false, Access::Read, false, false, true), 0);
    assert_eq!(fault_code(true, Access::Write, true, true, false), 0xf);
    assert_eq!(fault_code(true, Access::Exec, false, false, true), 0x11);
    assert_eq!(fault_code(true, Access::Exec, true, false, false), 0x5);
}

/// Full reserved-bit checks with PAE and 32-bit paging (SDM vol. 3 4.3,
/// 4.4.2): PAE entries reserve bits MAXPHYADDR..62; a 4 MiB PDE reserves
/// bit 21 and its PSE-36 address bits beyond MAXPHYADDR.
#[test]
fn reserved_bits_with_pae_and_32_bit_paging() {
    let cr3 = 0x1020;
    let lin = (2 << 30) | (3 << 21) | (4 << 12) | 0x567;
    let mut m = Mem::new();
    m.set(cr3 + 2 * 8, PD | P);
    m.set(PD + 3 * 8, PT | ALL);
    m.set(PT + 4 * 8, FRAME | ALL | (1 << 62));
    let pae = Paging {
        reserved: Reserved::Full { phys_bits: 46 },
        ..Paging::new(cr0::PG, cr3, cr4::PAE, efer::NXE)
    };
    assert_eq!(
        go(&mut m, &pae, lin, Access::Read, false),
        Err(pf::PRESENT | pf::RSVD),
        "PAE: bit 62"
    );
    let lin = (5 << 22) | 0x89;
    let two = |phys_bits| Paging {
        pse: true,
        reserved: Reserved::Full { phys_bits },
        ..Paging::new(cr0::PG, PD, cr4::PSE, 0)
    };
    m.set32(PD + 5 * 4, (0x80_0000 | (1 << 21) | ALL | PS) as u32);
    assert_eq!(
        go(&mut m, &two(46), lin, Access::Read, false),
        Err(pf::PRESENT | pf::RSVD),
        "4 MiB PDE: bit 21"
    );
    m.set32(PD + 5 * 4, (0x80_0000 | (0x80 << 13) | ALL | PS) as u32);
    assert!(
        go(&mut m, &two(46), lin, Access::Read, false).is_ok(),
        "bit 20: address bit 39"
    );
    assert_eq!(
        go(&mut m, &two(36), lin, Access::Read, false),
        Err(pf::PRESENT | pf::RSVD),
        "bit 20 beyond MAXPHYADDR 36"
    );
}
