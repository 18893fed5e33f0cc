//! The VMM's own walk of the guest's page tables (4-level, long mode), with the
//! architectural checks and accessed/dirty updates, and guest-linear memory
//! access built on it. Page-table entries are read from guest RAM only, and
//! every frame address is checked against the guest's physical-address width,
//! so nothing the guest writes in its tables can name memory outside its own.

use x86::pte::{ACCESSED, ADDR, DIRTY, NX, P, PS, RW, US};
use x86::Cpu;

/// The physical-address width the deprivileged engines report to the guest
/// (CPUID 0x8000_0008): frame bits above it are reserved, and engine-private
/// memory lies above it.
pub const PHYS_BITS: u32 = 46;

/// Frame bits from PHYS_BITS to 51.
const RSVD_ADDR: u64 = ADDR & !((1u64 << PHYS_BITS) - 1);

/// The kind of an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acc {
    Read,
    Write,
    Exec,
}

/// What the guest's tables say about a 4 KiB page.
#[derive(Clone, Copy, Debug)]
pub struct Mapping {
    /// Guest-physical address of the page.
    pub page: u64,
    pub writable: bool,
    pub user: bool,
    pub nx: bool,
    /// The leaf's dirty bit (after this access).
    pub dirty: bool,
}

/// The paging controls of the guest's (virtual) CPU.
#[derive(Clone, Copy, Debug)]
pub struct Paging {
    pub cr3: u64,
    /// CR0.WP.
    pub wp: bool,
    /// EFER.NXE.
    pub nxe: bool,
}

/// Walks the guest's tables for `lin`. On failure, the #PF error code the
/// hardware would give. Sets accessed bits (and the dirty bit of a write).
pub fn walk(cpu: &mut Cpu, pg: Paging, lin: u64, acc: Acc, user: bool) -> Result<Mapping, u32> {
    let err = |present: bool, rsvd: bool| -> u32 {
        (present as u32)
            | if acc == Acc::Write { 2 } else { 0 }
            | if user { 4 } else { 0 }
            | if rsvd { 8 } else { 0 }
            | if acc == Acc::Exec && pg.nxe { 16 } else { 0 }
    };
    let mut table = pg.cr3 & ADDR & !RSVD_ADDR;
    let mut path = [(0u64, 0u64); 4];
    let (mut rw, mut us, mut nx) = (true, true, false);
    for (n, level) in (0..4u32).rev().enumerate() {
        let addr = table + ((lin >> (12 + 9 * level)) & 0x1ff) * 8;
        // Tables outside RAM read as not present.
        let ent = cpu.ram_read_u64(addr).unwrap_or(0);
        if ent & P == 0 {
            return Err(err(false, false));
        }
        let large = ent & PS != 0 && level > 0;
        let mut bad = ent & RSVD_ADDR != 0 || (ent & NX != 0 && !pg.nxe);
        bad |= large
            && match level {
                3 => true,
                2 => ent & 0x3fff_e000 != 0,
                _ => ent & 0x1f_e000 != 0,
            };
        if bad {
            return Err(err(true, true));
        }
        path[n] = (addr, ent);
        rw &= ent & RW != 0;
        us &= ent & US != 0;
        nx |= ent & NX != 0;
        if level == 0 || large {
            let size_mask = (1u64 << (12 + 9 * level)) - 1;
            let page = ((ent & ADDR & !size_mask) | (lin & size_mask)) & !0xfff;
            let nx = nx && pg.nxe;
            let deny = (user && !us)
                || (acc == Acc::Write && !rw && (user || pg.wp))
                || (acc == Acc::Exec && nx);
            if deny {
                return Err(err(true, false));
            }
            for (i, &(a, e)) in path[..=n].iter().enumerate() {
                let mut v = e | ACCESSED;
                if i == n && acc == Acc::Write {
                    v |= DIRTY;
                }
                if v != e {
                    cpu.ram_write(a, &v.to_le_bytes());
                }
            }
            return Ok(Mapping {
                page,
                writable: rw,
                user: us,
                nx,
                dirty: acc == Acc::Write || ent & DIRTY != 0,
            });
        }
        table = ent & ADDR;
    }
    Err(err(false, false))
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
            vector: x86::vector::GP,
            code: Some(code),
            cr2: None,
        }
    }
}

/// Copies guest-linear memory, page by page, as the guest at `user` privilege
/// would access it (`write`: `buf` into the guest, else out of it). Bytes that
/// are not RAM read as 0xff and are not written.
pub fn access(
    cpu: &mut Cpu,
    pg: Paging,
    lin: u64,
    buf: &mut [u8],
    write: bool,
    user: bool,
) -> Result<(), Fault> {
    let mut done = 0;
    while done < buf.len() {
        let a = lin.wrapping_add(done as u64);
        if !x86::canonical(a) {
            return Err(Fault::gp(0));
        }
        let n = (buf.len() - done).min(0x1000 - (a & 0xfff) as usize);
        let acc = if write { Acc::Write } else { Acc::Read };
        let m = walk(cpu, pg, a, acc, user).map_err(|code| Fault {
            vector: x86::vector::PF,
            code: Some(code),
            cr2: Some(a),
        })?;
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

/// The frames of a 4-level page-table tree (the PML4 and every PDPT, PD and
/// PT it links), sorted, each once. `read` reads a page-table entry at a
/// guest-physical address; `Err` gives the address of an entry that links a
/// table outside guest RAM (or with reserved address bits).
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
                if f & RSVD_ADDR != 0 || read(f).is_none() {
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
