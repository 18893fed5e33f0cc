//! Shadow page tables: the tables the CPU really walks while a deprivileged
//! guest runs. They live in engine-private memory above the guest's
//! physical-address width, where no guest mapping can reach, and map only
//! what the guest's own tables allow, one 4 KiB page at a time.
//!
//! Coherence follows the TLB rules, not write protection: the shadow is a
//! software TLB that the VMM fills on a shadow page fault and drops where the
//! guest would have to flush a hardware TLB (the whole shadow on a CR3 write,
//! one page on INVLPG). A guest that changes a live PTE without flushing sees
//! the stale translation, exactly as on hardware, so guest page-table pages
//! need no write protection.

use arch::paging::Translation;
use arch::pte::{ACCESSED, ADDR, DIRTY, NX, P, RW, US};
use x86::Cpu;

/// The shadow tables and their page pool.
pub struct Shadow {
    base: u64,
    pages: u64,
    next: u64,
    /// Physical address of the shadow PML4 (the real CR3).
    pub root: u64,
    /// Leaves installed.
    pub fills: u64,
    /// Whole-shadow drops (guest CR3 writes, pool exhaustion).
    pub flushes: u64,
    /// Single leaves dropped (guest INVLPG).
    pub invalidations: u64,
}

impl Shadow {
    /// A pool of `pages` 4 KiB pages at engine-private physical `base`.
    pub fn new(base: u64, pages: u64) -> Shadow {
        Shadow {
            base,
            pages,
            next: 0,
            root: base,
            fills: 0,
            flushes: 0,
            invalidations: 0,
        }
    }

    fn alloc(&mut self, cpu: &mut Cpu) -> Option<u64> {
        if self.next >= self.pages {
            return None;
        }
        let p = self.base + self.next * 0x1000;
        self.next += 1;
        cpu.ram_write(p, &[0u8; 0x1000]);
        Some(p)
    }

    /// Drops every shadow entry and points the CPU at an empty root.
    pub fn reset(&mut self, cpu: &mut Cpu) {
        self.next = 0;
        self.flushes += 1;
        // The pool has at least one page (checked at creation).
        self.root = self.alloc(cpu).unwrap_or(self.base);
        cpu.cr3 = self.root;
        cpu.flush_tlb(true);
    }

    /// The address of the leaf slot of `lin`, creating tables if `create`.
    fn leaf_slot(&mut self, cpu: &mut Cpu, lin: u64, create: bool) -> Option<u64> {
        let mut table = self.root;
        for level in (1..4u32).rev() {
            let slot = table + ((lin >> (12 + 9 * level)) & 0x1ff) * 8;
            let e = cpu.ram_read_u64(slot).unwrap_or(0);
            table = if e & P != 0 {
                e & ADDR
            } else if create {
                let t = self.alloc(cpu)?;
                cpu.ram_write(slot, &(t | P | RW | US).to_le_bytes());
                t
            } else {
                return None;
            };
        }
        Some(table + ((lin >> 12) & 0x1ff) * 8)
    }

    /// Maps `lin` as the guest's `m` allows; `write` is the access that
    /// faulted. Writable only once the guest's dirty bit is set, so the first
    /// write comes back to set it. `force_write`: a supervisor write the guest
    /// allows through CR0.WP=0 (mapped writable, and supervisor-only).
    pub fn map(&mut self, cpu: &mut Cpu, lin: u64, m: &Translation, force_write: bool) {
        let mut leaf = m.page | P | ACCESSED;
        if (m.writable && m.dirty) || force_write {
            leaf |= RW | DIRTY;
        }
        if m.user && !force_write {
            leaf |= US;
        }
        if m.nx {
            leaf |= NX;
        }
        let slot = match self.leaf_slot(cpu, lin, true) {
            Some(s) => s,
            None => {
                // Pool used up: start over.
                self.reset(cpu);
                match self.leaf_slot(cpu, lin, true) {
                    Some(s) => s,
                    None => return,
                }
            }
        };
        cpu.ram_write(slot, &leaf.to_le_bytes());
        cpu.flush_tlb_page(lin);
        self.fills += 1;
    }

    /// Drops the shadow leaf of `lin` (guest INVLPG).
    pub fn invalidate(&mut self, cpu: &mut Cpu, lin: u64) {
        if let Some(slot) = self.leaf_slot(cpu, lin, false) {
            cpu.ram_write(slot, &0u64.to_le_bytes());
        }
        cpu.flush_tlb_page(lin);
        self.invalidations += 1;
    }
}
