//! VPID-tagged translations. The software TLB holds the translations of one
//! address space at a time; a guest running with "enable VPID" keeps its own,
//! stored under its tag (VPID, EPT pointer) across VM exits, while the root
//! gets its translations back (VPID 0). Without VPIDs, VM entries and exits
//! flush the TLB, as they invalidate the mappings of VPID 0.
//!
//! A stored TLB comes back flushed of non-global entries when CR3 changed
//! meanwhile, and entirely when the paging mode did (more than hardware
//! invalidates, never less). INVVPID and INVEPT drop stored translations.

use super::ctl;
use super::fields::{EPT_POINTER, VIRTUAL_PROCESSOR_ID};
use crate::mmu::{TlbEntry, A_W_S, A_W_U};
use crate::Cpu;

/// The (VPID, EPT pointer) a guest's translations are tagged with.
pub(crate) type Tag = (u16, u64);

/// At most this many guests' translations are kept.
const MAX_STORED: usize = 16;

/// A TLB put aside, with the paging state it was built under.
#[derive(Clone)]
pub(crate) struct SavedTlb {
    entries: Box<[TlbEntry]>,
    large: bool,
    huge: bool,
    cr3: u64,
    mode: (u64, u64, u64),
}

impl Cpu {
    fn tlb_take(&mut self) -> SavedTlb {
        let fresh = vec![TlbEntry::INVALID; self.tlb.len()].into_boxed_slice();
        SavedTlb {
            entries: std::mem::replace(&mut self.tlb, fresh),
            large: self.tlb_has_large,
            huge: self.tlb_has_huge,
            cr3: self.cr3,
            mode: (self.cr0, self.cr4, self.efer),
        }
    }

    /// Makes `s` the TLB under the current paging state.
    fn tlb_put(&mut self, s: SavedTlb) {
        self.tlb = s.entries;
        self.tlb_has_large = s.large;
        self.tlb_has_huge = s.huge;
        // Pages that became code meanwhile lose fast write access.
        for e in self.tlb.iter_mut() {
            if e.vpage != u64::MAX && self.code.is_code(e.ppage) {
                e.allow &= !(A_W_S | A_W_U);
            }
        }
        if s.mode != (self.cr0, self.cr4, self.efer) {
            self.tlb_flush(true);
        } else if s.cr3 != self.cr3 {
            self.tlb_flush(false);
        } else {
            self.code.reset_fetch();
        }
    }

    /// VM entry, after the guest state is loaded: the guest's translations.
    pub(crate) fn tlb_enter(&mut self) {
        let v = &self.vmx.vmcs;
        let tag = (self.secondary_controls() & ctl::ENABLE_VPID != 0).then(|| {
            let eptp = if self.vmx.ept.is_some() {
                v.get(EPT_POINTER)
            } else {
                0
            };
            (v.get(VIRTUAL_PROCESSOR_ID) as u16, eptp)
        });
        self.vmx.tlb_tag = tag;
        match tag {
            Some(t) => {
                let root = self.tlb_take();
                self.vmx.root_tlb = Some(root);
                match self.vmx.tlbs.remove(&t) {
                    Some(s) => self.tlb_put(s),
                    None => self.tlb_flush(true),
                }
            }
            None => {
                self.vmx.root_tlb = None;
                self.tlb_flush(true);
            }
        }
    }

    /// VM exit, after the host state is loaded: the root's translations.
    pub(crate) fn tlb_exit(&mut self) {
        let Some(tag) = self.vmx.tlb_tag.take() else {
            self.tlb_flush(true);
            return;
        };
        let guest = self.tlb_take();
        if self.vmx.tlbs.len() >= MAX_STORED {
            self.vmx.tlbs.clear();
        }
        self.vmx.tlbs.insert(tag, guest);
        match self.vmx.root_tlb.take() {
            Some(r) => self.tlb_put(r),
            None => self.tlb_flush(true),
        }
    }

    /// INVVPID: drops the stored translations of `vpid` (all VPIDs but 0
    /// with None), or one page of them.
    pub(crate) fn tlb_drop_vpid(&mut self, vpid: Option<u16>, page: Option<u64>) {
        let hit = |t: &Tag| vpid.is_none_or(|v| t.0 == v);
        match page {
            None => self.vmx.tlbs.retain(|t, _| !hit(t)),
            Some(lin) => {
                for (_, s) in self.vmx.tlbs.iter_mut().filter(|(t, _)| hit(t)) {
                    for e in s.entries.iter_mut() {
                        // A large page's 4 KiB pieces may sit anywhere.
                        if e.vpage == lin & !0xfff || e.large {
                            *e = TlbEntry::INVALID;
                        }
                    }
                }
            }
        }
    }

    /// INVEPT: drops the stored translations made through `eptp` (all with
    /// None).
    pub(crate) fn tlb_drop_ept(&mut self, eptp: Option<u64>) {
        self.vmx
            .tlbs
            .retain(|t, _| t.1 == 0 || eptp.is_some_and(|p| t.1 & !0xfff != p & !0xfff));
    }
}
