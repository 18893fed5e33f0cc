//! Segment and gate descriptors: encoding a GDT/LDT entry, decoding one into
//! the segment register image, bits the CPU sets in descriptors, and
//! interrupt/trap gates.

/// Accessed: type bit 0 of a code or data segment descriptor, set by the CPU
/// when it loads the segment.
pub const ACCESSED: u64 = 1 << 40;
/// Busy: type bit 1 of a TSS descriptor, set by LTR.
pub const TSS_BUSY: u64 = 1 << 41;
/// S: a code or data segment (clear: a system descriptor).
pub const S: u64 = 1 << 44;
/// Present.
pub const PRESENT: u64 = 1 << 47;

/// A segment register with its hidden (descriptor cache) part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit in bytes (already scaled by the granularity).
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    /// Present.
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (D/B bit).
    pub db: bool,
    /// Descriptor type: code/data (true) or system (false).
    pub s: bool,
    /// 64-bit code segment (L bit).
    pub l: bool,
    /// Granularity (limit in 4 KiB units).
    pub g: bool,
    /// Available to software.
    pub avl: bool,
    /// The register holds no usable segment (a null selector was loaded).
    pub unusable: bool,
}

impl Segment {
    /// A flat 4 GiB code or data segment, as loaded from a descriptor with the given
    /// selector. `long` selects a 64-bit code segment; `big` the D/B bit.
    pub fn flat(selector: u16, code: bool, long: bool, big: bool) -> Self {
        Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_: if code { 0xb } else { 0x3 },
            present: true,
            dpl: (selector & 3) as u8,
            db: big,
            s: true,
            l: long,
            g: true,
            avl: false,
            unusable: false,
        }
    }

    /// A 64-bit TSS (busy) for `tr`.
    pub fn tss(selector: u16, base: u64, limit: u32) -> Self {
        Segment {
            base,
            limit,
            selector,
            type_: 0xb,
            present: true,
            s: false,
            ..Default::default()
        }
    }

    /// The segment register image after loading `selector` whose 8-byte
    /// descriptor is `raw` (base bits 0..31; a 16-byte system descriptor's
    /// upper half is the caller's).
    pub fn from_descriptor(selector: u16, raw: u64) -> Segment {
        let limit = ((raw & 0xffff) | ((raw >> 32) & 0xf_0000)) as u32;
        let g = raw & (1 << 55) != 0;
        Segment {
            base: ((raw >> 16) & 0xff_ffff) | (((raw >> 56) & 0xff) << 24),
            limit: if g { (limit << 12) | 0xfff } else { limit },
            selector,
            type_: ((raw >> 40) & 0xf) as u8,
            present: raw & PRESENT != 0,
            dpl: ((raw >> 45) & 3) as u8,
            db: raw & (1 << 54) != 0,
            s: raw & S != 0,
            l: raw & (1 << 53) != 0,
            g,
            avl: raw & (1 << 52) != 0,
            unusable: false,
        }
    }
}

/// A segment load's fault: the exception vector and its error code.
pub type LoadFault = (u8, u32);

/// MOV or POP to SS (`stack`) or to DS/ES/FS/GS in protected mode with the
/// non-null selector `sel`, whose descriptor is `raw`, at privilege `cpl`
/// (SDM vol. 2, MOV): the segment register image (marked accessed), or the
/// fault: #GP(sel) for a wrong type or privilege (SS: a writable data segment
/// with RPL = DPL = CPL; the others: data or readable code, and data or
/// nonconforming code no more privileged than both RPL and CPL), then
/// #SS(sel) or #NP(sel) for a segment not present.
pub fn data_segment_load(sel: u16, raw: u64, stack: bool, cpl: u8) -> Result<Segment, LoadFault> {
    let d = Segment::from_descriptor(sel, raw);
    let rpl = (sel & 3) as u8;
    let err = (sel & !3) as u32;
    let not_present = if stack {
        if !d.s || d.type_ & 0xa != 0x2 || rpl != cpl || d.dpl != cpl {
            return Err((crate::vector::GP, err));
        }
        crate::vector::SS
    } else {
        let data = d.type_ & 8 == 0;
        let readable_code = d.type_ & 0xa == 0xa;
        if !d.s || !(data || readable_code) {
            return Err((crate::vector::GP, err));
        }
        let conforming = !data && d.type_ & 4 != 0;
        if !conforming && (rpl > d.dpl || cpl > d.dpl) {
            return Err((crate::vector::GP, err));
        }
        crate::vector::NP
    };
    if !d.present {
        return Err((not_present, err));
    }
    Ok(Segment {
        type_: d.type_ | 1,
        ..d
    })
}

/// A far JMP or CALL straight to the code segment of the non-null selector
/// `sel`, whose descriptor is `raw`, at privilege `cpl` (no gate, so no change
/// of privilege; SDM vol. 2, JMP): the CS image (marked accessed, RPL = CPL),
/// or the fault: #GP(sel) for a segment that is not code, a conforming one
/// more privileged than CPL, a nonconforming one of another privilege or with
/// RPL above CPL, a 64-bit one that also has D set in IA-32e mode (`ia32e`),
/// then #NP(sel) for a segment not present.
pub fn code_segment_jump(sel: u16, raw: u64, cpl: u8, ia32e: bool) -> Result<Segment, LoadFault> {
    let d = Segment::from_descriptor(sel, raw);
    let rpl = (sel & 3) as u8;
    let err = (sel & !3) as u32;
    let conforming = d.type_ & 4 != 0;
    let privilege_ok = if conforming {
        d.dpl <= cpl
    } else {
        rpl <= cpl && d.dpl == cpl
    };
    if !d.s || d.type_ & 8 == 0 || !privilege_ok || (ia32e && d.l && d.db) {
        return Err((crate::vector::GP, err));
    }
    if !d.present {
        return Err((crate::vector::NP, err));
    }
    Ok(Segment {
        selector: (sel & !3) | cpl as u16,
        type_: d.type_ | 1,
        ..d
    })
}

/// An 8-byte segment descriptor. `flags` holds the attribute bits as they sit
/// in the descriptor's bits 40..55: type (bits 0..3), S (4), DPL (5..6), P (7),
/// AVL (12), L (13), D/B (14), G (15); `limit` is the raw 20-bit limit and
/// `base` its low 32 bits are used.
pub const fn gdt_entry(flags: u64, base: u64, limit: u64) -> u64 {
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0xf_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// An interrupt or trap gate of an IDT. A 64-bit IDT holds 16-byte gates; a
/// legacy one 8-byte gates (the low quadword, with 16-bit offset halves).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gate {
    /// The handler's offset.
    pub offset: u64,
    /// The handler's code-segment selector.
    pub selector: u16,
    /// Interrupt stack table index (0: none; 64-bit gates only).
    pub ist: u8,
    /// Gate type: 0xe interrupt gate (clears IF), 0xf trap gate; 6 and 7 are
    /// their 16-bit forms and 5 a task gate in a legacy IDT.
    pub type_: u8,
    /// The lowest privilege that may reach the gate with INT n.
    pub dpl: u8,
    /// Present.
    pub present: bool,
}

impl Gate {
    /// Decodes a gate from its low and high quadwords (`hi` 0 for a legacy
    /// 8-byte gate).
    pub fn from_descriptor(lo: u64, hi: u64) -> Gate {
        Gate {
            offset: (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | ((hi & 0xffff_ffff) << 32),
            selector: ((lo >> 16) & 0xffff) as u16,
            ist: ((lo >> 32) & 7) as u8,
            type_: ((lo >> 40) & 0xf) as u8,
            dpl: ((lo >> 45) & 3) as u8,
            present: lo & PRESENT != 0,
        }
    }

    /// The 16-byte descriptor of the gate, as its low and high quadwords.
    pub fn descriptor(&self) -> (u64, u64) {
        let attr =
            (self.present as u64) << 7 | (self.dpl as u64 & 3) << 5 | self.type_ as u64 & 0xf;
        let lo = (self.offset & 0xffff)
            | (self.selector as u64) << 16
            | (self.ist as u64 & 7) << 32
            | attr << 40
            | (self.offset >> 16 & 0xffff) << 48;
        (lo, self.offset >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_encoding() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(0x0089, 0x1234_5678, 0x67), 0x1200_8934_5678_0067);
    }

    /// The attribute word of a decoded segment, as `gdt_entry` takes it.
    fn flags_of(s: &Segment) -> u64 {
        s.type_ as u64
            | (s.s as u64) << 4
            | (s.dpl as u64) << 5
            | (s.present as u64) << 7
            | (s.avl as u64) << 12
            | (s.l as u64) << 13
            | (s.db as u64) << 14
            | (s.g as u64) << 15
    }

    #[test]
    fn descriptor_round_trip() {
        // A small deterministic generator: every attribute bit, bases and
        // limits across their whole ranges.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..4096u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let flags = (i & 0xff) | ((i >> 8) & 0xf) << 12;
            let base = x & 0xffff_ffff;
            let limit = (x >> 32) & 0xf_ffff;
            let raw = gdt_entry(flags, base, limit);
            let s = Segment::from_descriptor(0x2b, raw);
            assert_eq!(s.selector, 0x2b);
            assert_eq!(s.base, base);
            let scaled = if flags & 0x8000 != 0 {
                (limit << 12) | 0xfff
            } else {
                limit
            };
            assert_eq!(s.limit as u64, scaled);
            assert_eq!(flags_of(&s), flags, "{raw:#x}");
            assert!(!s.unusable);
            assert_eq!(gdt_entry(flags_of(&s), s.base, limit), raw);
        }
    }

    #[test]
    fn decodes_the_boot_descriptors() {
        let code64 = Segment::from_descriptor(0x10, 0x00af_9b00_0000_ffff);
        assert_eq!(code64, Segment::flat(0x10, true, true, false));
        let data = Segment::from_descriptor(0x18, 0x00cf_9300_0000_ffff);
        assert_eq!(data, Segment::flat(0x18, false, false, true));
    }

    #[test]
    fn data_segment_loads() {
        use crate::vector::{GP, NP, SS};
        let data0 = gdt_entry(0xc093, 0, 0xfffff);
        let data3 = gdt_entry(0xc0f3, 0, 0xfffff);
        let code0 = gdt_entry(0xa09b, 0, 0xfffff);
        let exec_only = gdt_entry(0xa099, 0, 0xfffff);
        let absent = data0 & !PRESENT;
        // DS at CPL 0: data of any privilege, readable code; accessed.
        let ds = data_segment_load(0x18, data0 & !ACCESSED, false, 0).unwrap();
        assert_eq!((ds.type_, ds.dpl, ds.selector), (3, 0, 0x18));
        assert!(data_segment_load(0x2b, data3, false, 0).is_ok());
        assert!(data_segment_load(0x10, code0, false, 0).is_ok());
        assert_eq!(
            data_segment_load(0x10, exec_only, false, 0),
            Err((GP, 0x10))
        );
        // At CPL 3, or with RPL 3, a DPL 0 data segment is out of reach.
        assert_eq!(data_segment_load(0x18, data0, false, 3), Err((GP, 0x18)));
        assert_eq!(data_segment_load(0x1b, data0, false, 0), Err((GP, 0x18)));
        assert_eq!(data_segment_load(0x18, absent, false, 0), Err((NP, 0x18)));
        // SS: writable data, RPL = DPL = CPL; not present is #SS.
        assert!(data_segment_load(0x18, data0, true, 0).is_ok());
        assert_eq!(data_segment_load(0x10, code0, true, 0), Err((GP, 0x10)));
        assert_eq!(data_segment_load(0x2b, data3, true, 0), Err((GP, 0x28)));
        assert_eq!(data_segment_load(0x18, absent, true, 0), Err((SS, 0x18)));
        // A system descriptor is never a data segment.
        let tss = gdt_entry(0x0089, 0x1000, 0x67);
        assert_eq!(data_segment_load(0x40, tss, false, 0), Err((GP, 0x40)));
    }

    #[test]
    fn code_segment_jumps() {
        use crate::vector::{GP, NP};
        let code0 = gdt_entry(0xa09b, 0, 0xfffff);
        let code32 = gdt_entry(0xc09b, 0, 0xfffff);
        let code3 = gdt_entry(0xa0fb, 0, 0xfffff);
        let conforming0 = gdt_entry(0xa09f, 0, 0xfffff);
        let ld = gdt_entry(0xe09b, 0, 0xfffff);
        let cs = code_segment_jump(0x10, code0, 0, true).unwrap();
        assert_eq!((cs.selector, cs.type_, cs.l), (0x10, 0xb, true));
        assert!(code_segment_jump(0x08, code32, 0, true).is_ok());
        assert_eq!(code_segment_jump(0x33, code3, 0, true), Err((GP, 0x30)));
        assert_eq!(code_segment_jump(0x13, code0, 3, true), Err((GP, 0x10)));
        // A conforming segment keeps the caller's privilege (RPL = CPL).
        let c = code_segment_jump(0x20, conforming0, 3, true).unwrap();
        assert_eq!((c.selector, c.dpl), (0x23, 0));
        assert_eq!(
            code_segment_jump(0x18, gdt_entry(0xc093, 0, 0xfffff), 0, true),
            Err((GP, 0x18))
        );
        assert_eq!(code_segment_jump(0x10, ld, 0, true), Err((GP, 0x10)));
        assert!(code_segment_jump(0x10, ld, 0, false).is_ok());
        assert_eq!(
            code_segment_jump(0x10, code0 & !PRESENT, 0, true),
            Err((NP, 0x10))
        );
    }

    #[test]
    fn gate_round_trip() {
        let g = Gate {
            offset: 0xffff_8000_1234_5678,
            selector: 0x10,
            ist: 1,
            type_: 0xe,
            dpl: 3,
            present: true,
        };
        let (lo, hi) = g.descriptor();
        assert_eq!(lo, 0x1234_ee01_0010_5678);
        assert_eq!(hi, 0xffff_8000);
        assert_eq!(Gate::from_descriptor(lo, hi), g);
        let legacy = Gate::from_descriptor(lo & !(7 << 32), 0);
        assert_eq!(legacy.offset, 0x1234_5678);
        assert_eq!(legacy.ist, 0);
        let absent = Gate {
            present: false,
            type_: 0xf,
            ..g
        };
        let (lo, hi) = absent.descriptor();
        assert_eq!(Gate::from_descriptor(lo, hi), absent);
    }
}
