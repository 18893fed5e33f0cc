//! EPT: the 4-level walk from the EPT pointer that translates the
//! guest-physical addresses of a guest running with "enable EPT" (its paging
//! structures and the pages they map), EPT violations with their exit
//! qualification, and EPT misconfigurations.
//!
//! The software TLB caches guest-linear to host-physical translations with
//! the EPT permissions folded into its access bits; it is flushed on every VM
//! entry and VM exit, so its entries never mix guests (VPIDs and EPTPs are
//! accepted and checked, not used as tags).

use arch::paging::Access;
// An EPT entry's frame address and large-page bit (7) sit where those of a
// page-table entry do.
use arch::pte::{ADDR, PS};

use super::exit::Exit;
use super::fields::reason;
use crate::mmu::{TlbEntry, A_R_S, A_R_U, A_W_S, A_W_U, A_X_S, A_X_U};
use crate::{Cpu, Stop, R};

/// The TLB access bits an EPT permission set (bit 0 R, 1 W, 2 X) allows.
fn tlb_bits(rwx: u8) -> u8 {
    let mut b = 0;
    if rwx & 1 != 0 {
        b |= A_R_S | A_R_U;
    }
    if rwx & 2 != 0 {
        b |= A_W_S | A_W_U;
    }
    if rwx & 4 != 0 {
        b |= A_X_S | A_X_U;
    }
    b
}

impl Cpu {
    /// The host-physical address of a guest paging-structure entry at
    /// guest-physical `gpa` (read while translating `lin`).
    #[inline]
    pub(crate) fn ept_paging_entry(&mut self, gpa: u64, lin: u64) -> R<u64> {
        match self.vmx.ept {
            None => Ok(gpa),
            Some(eptp) => Ok(self.ept_walk(eptp, gpa, Access::Read, lin, false)?.0),
        }
    }

    /// Translates the guest-physical page of TLB entry `e` (for an access
    /// `acc` to `lin`) to host-physical, narrowing its access bits to the EPT
    /// permissions.
    #[inline]
    pub(crate) fn ept_leaf(&mut self, e: &mut TlbEntry, lin: u64, acc: Access) -> R<()> {
        if let Some(eptp) = self.vmx.ept {
            let gpa = e.ppage | (lin & 0xfff);
            let (hpa, rwx) = self.ept_walk(eptp, gpa, acc, lin, true)?;
            e.ppage = hpa & !0xfff;
            e.allow &= tlb_bits(rwx);
        }
        Ok(())
    }

    /// Walks the EPT paging structures for `gpa`: (host-physical address,
    /// permissions). `fin`: the access is to the translation of `lin`
    /// itself, not to one of its paging-structure entries.
    pub(crate) fn ept_walk(
        &mut self,
        eptp: u64,
        gpa: u64,
        acc: Access,
        lin: u64,
        fin: bool,
    ) -> R<(u64, u8)> {
        let reserved = !0u64 << self.phys_bits() & ADDR;
        let mut table = eptp & ADDR;
        let mut rwx = 7u8;
        for level in (0..4u32).rev() {
            let ent = self
                .mem
                .read_u64(table + ((gpa >> (12 + 9 * level)) & 0x1ff) * 8)
                .unwrap_or(0);
            let perm = (ent & 7) as u8;
            rwx &= perm;
            if perm == 0 {
                return Err(self.ept_violation(gpa, acc, 0, lin, fin));
            }
            let large = level == 1 && ent & PS != 0;
            let leaf = level == 0 || large;
            // Write without read; reserved address bits; a large page where
            // none is offered; a leaf's memory type 2, 3 or 7; the reserved
            // bits 7:3 of a non-leaf entry.
            let misconfigured = perm & 3 == 2
                || ent & reserved != 0
                || (level >= 2 && ent & PS != 0)
                || (leaf && matches!((ent >> 3) & 7, 2 | 3 | 7))
                || (!leaf && ent & 0xf8 != 0)
                || (large && ent & 0x1f_f000 != 0);
            if misconfigured {
                let mut e = Exit::new(reason::EPT_MISCONFIG, 0);
                e.gpa = Some(gpa);
                self.vm_exit(e);
                return Err(Stop::VmExit);
            }
            if leaf {
                let size = 1u64 << (12 + 9 * level);
                let need = match acc {
                    Access::Read => 1,
                    Access::Write => 2,
                    Access::Exec => 4,
                };
                if rwx & need == 0 {
                    return Err(self.ept_violation(gpa, acc, rwx, lin, fin));
                }
                return Ok(((ent & ADDR & !(size - 1)) | (gpa & (size - 1)), rwx));
            }
            table = ent & ADDR;
        }
        unreachable!("the walk ends at level 0")
    }

    /// An EPT violation: the VM exit, with the access, the permissions of
    /// the translation, and the guest-linear address.
    fn ept_violation(&mut self, gpa: u64, acc: Access, rwx: u8, lin: u64, fin: bool) -> Stop {
        let access = match acc {
            Access::Read => 1,
            Access::Write => 2,
            Access::Exec => 4,
        };
        let qual = access | ((rwx as u64) << 3) | (1 << 7) | ((fin as u64) << 8);
        let mut e = Exit::new(reason::EPT_VIOLATION, qual);
        e.gpa = Some(gpa);
        e.linear = Some(lin);
        self.vm_exit(e);
        Stop::VmExit
    }
}
