//! x86 architectural definitions: the one home in visor for what the
//! architecture fixes, so that no crate (engine, VMM, machine, guest) keeps a
//! copy of its own.
//!
//! It owns:
//! - the bits of CR0 ([`cr0`]), CR4 ([`cr4`]), EFER ([`efer`]) and RFLAGS
//!   ([`rflags`]);
//! - page-table entry bits and the frame-address mask ([`pte`]) and the bits
//!   of a page-fault error code ([`pf`]);
//! - MSR numbers ([`msr`]) and exception vectors ([`vector`]);
//! - linear-address helpers ([`canonical`]);
//! - segment and gate descriptors ([`desc`]): the segment register image
//!   [`Segment`] with its decoding from a descriptor, descriptor encoding
//!   ([`gdt_entry`]), descriptor bits, and interrupt/trap gates ([`Gate`]);
//! - the guest page walker ([`paging`]): 4-level, PAE and 2-level paging,
//!   generic over how page-table entries are read and written, used by the
//!   software CPU's TLB, the deprivileged engines and the machine's own
//!   accesses to guest-virtual memory.
//!
//! It is `no_std` and has no dependencies, so the guests visor ships use it too.
#![no_std]
#![deny(missing_docs)]

pub mod desc;
pub mod paging;

pub use desc::{gdt_entry, Gate, Segment};

/// CR0 bits.
pub mod cr0 {
    /// Protection enable.
    pub const PE: u64 = 1 << 0;
    /// Monitor coprocessor (WAIT/FWAIT honours TS).
    pub const MP: u64 = 1 << 1;
    /// x87 emulation: x87 and SSE instructions raise #NM / #UD.
    pub const EM: u64 = 1 << 2;
    /// Task switched: the next x87/SSE instruction raises #NM.
    pub const TS: u64 = 1 << 3;
    /// Extension type (always 1 on modern processors).
    pub const ET: u64 = 1 << 4;
    /// Native x87 error reporting (#MF).
    pub const NE: u64 = 1 << 5;
    /// Write protect: supervisor writes honour read-only pages.
    pub const WP: u64 = 1 << 16;
    /// Alignment mask (with RFLAGS.AC, alignment checks at CPL 3).
    pub const AM: u64 = 1 << 18;
    /// Not write-through.
    pub const NW: u64 = 1 << 29;
    /// Cache disable.
    pub const CD: u64 = 1 << 30;
    /// Paging.
    pub const PG: u64 = 1 << 31;
}

/// CR4 bits.
pub mod cr4 {
    /// Virtual-8086 mode extensions.
    pub const VME: u64 = 1 << 0;
    /// Protected-mode virtual interrupts.
    pub const PVI: u64 = 1 << 1;
    /// Time-stamp disable: RDTSC/RDTSCP only at CPL 0.
    pub const TSD: u64 = 1 << 2;
    /// Debugging extensions: DR4/DR5 raise #UD instead of aliasing DR6/DR7.
    pub const DE: u64 = 1 << 3;
    /// Page-size extensions: 4 MiB pages with 2-level paging.
    pub const PSE: u64 = 1 << 4;
    /// Physical-address extension (PAE or 4-level paging).
    pub const PAE: u64 = 1 << 5;
    /// Global pages.
    pub const PGE: u64 = 1 << 7;
    /// RDPMC at any CPL.
    pub const PCE: u64 = 1 << 8;
    /// FXSAVE/FXRSTOR and SSE enabled by the OS.
    pub const OSFXSR: u64 = 1 << 9;
    /// Unmasked SIMD floating-point exceptions raise #XM.
    pub const OSXMMEXCPT: u64 = 1 << 10;
    /// VMX enable.
    pub const VMXE: u64 = 1 << 13;
    /// XSAVE and XCR0 enabled by the OS.
    pub const OSXSAVE: u64 = 1 << 18;
    /// Supervisor-mode execution prevention.
    pub const SMEP: u64 = 1 << 20;
    /// Supervisor-mode access prevention.
    pub const SMAP: u64 = 1 << 21;
}

/// EFER (extended feature enable register) bits.
pub mod efer {
    /// SYSCALL/SYSRET enable.
    pub const SCE: u64 = 1 << 0;
    /// Long mode enable.
    pub const LME: u64 = 1 << 8;
    /// Long mode active.
    pub const LMA: u64 = 1 << 10;
    /// No-execute enable (the NX bit of page-table entries).
    pub const NXE: u64 = 1 << 11;
}

/// RFLAGS bits.
pub mod rflags {
    /// Carry.
    pub const CF: u64 = 1 << 0;
    /// Bit 1, always set.
    pub const FIXED: u64 = 1 << 1;
    /// Parity.
    pub const PF: u64 = 1 << 2;
    /// Auxiliary carry.
    pub const AF: u64 = 1 << 4;
    /// Zero.
    pub const ZF: u64 = 1 << 6;
    /// Sign.
    pub const SF: u64 = 1 << 7;
    /// Trap (single step).
    pub const TF: u64 = 1 << 8;
    /// Interrupt enable.
    pub const IF: u64 = 1 << 9;
    /// Direction.
    pub const DF: u64 = 1 << 10;
    /// Overflow.
    pub const OF: u64 = 1 << 11;
    /// I/O privilege level (two bits).
    pub const IOPL: u64 = 3 << 12;
    /// Nested task.
    pub const NT: u64 = 1 << 14;
    /// Resume (suppresses instruction breakpoints once).
    pub const RF: u64 = 1 << 16;
    /// Virtual-8086 mode.
    pub const VM: u64 = 1 << 17;
    /// Alignment check / access control.
    pub const AC: u64 = 1 << 18;
    /// Virtual interrupt flag.
    pub const VIF: u64 = 1 << 19;
    /// Virtual interrupt pending.
    pub const VIP: u64 = 1 << 20;
    /// CPUID available (software can toggle it).
    pub const ID: u64 = 1 << 21;
    /// The six arithmetic flags.
    pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
    /// Bits software can change at all.
    pub const WRITABLE: u64 = ARITH | TF | IF | DF | IOPL | NT | RF | AC | ID;
    /// The bits SYSRET loads from R11 (RF and VM end up clear, bit 1 set).
    pub const SYSRET_LOADED: u64 = 0x3c_7fd7;
}

/// Bits of a page-table entry. The low twelve are the same at every level and
/// in every paging mode; [`NX`] and [`ADDR`] are those of 64-bit entries (PAE
/// and 4-level paging).
pub mod pte {
    /// Present.
    pub const P: u64 = 1 << 0;
    /// Writable.
    pub const RW: u64 = 1 << 1;
    /// User-accessible.
    pub const US: u64 = 1 << 2;
    /// Page-level write-through.
    pub const PWT: u64 = 1 << 3;
    /// Page-level cache disable.
    pub const PCD: u64 = 1 << 4;
    /// Accessed.
    pub const ACCESSED: u64 = 1 << 5;
    /// Dirty (leaf entries).
    pub const DIRTY: u64 = 1 << 6;
    /// A large page (in a PDE or PDPTE).
    pub const PS: u64 = 1 << 7;
    /// Global (leaf entries, with CR4.PGE).
    pub const G: u64 = 1 << 8;
    /// No-execute (with EFER.NXE).
    pub const NX: u64 = 1 << 63;
    /// The frame address (bits 12..51).
    pub const ADDR: u64 = 0x000f_ffff_ffff_f000;
}

/// Bits of a page-fault (#PF) error code.
pub mod pf {
    /// The fault was a protection violation (clear: a not-present page).
    pub const PRESENT: u32 = 1 << 0;
    /// The access was a write.
    pub const WRITE: u32 = 1 << 1;
    /// The access was made at CPL 3.
    pub const USER: u32 = 1 << 2;
    /// A reserved bit was set in a paging-structure entry.
    pub const RSVD: u32 = 1 << 3;
    /// The access was an instruction fetch (reported with EFER.NXE or CR4.SMEP).
    pub const FETCH: u32 = 1 << 4;
}

/// Exception vectors.
pub mod vector {
    /// Divide error.
    pub const DE: u8 = 0;
    /// Debug.
    pub const DB: u8 = 1;
    /// Non-maskable interrupt.
    pub const NMI: u8 = 2;
    /// Breakpoint (INT3).
    pub const BP: u8 = 3;
    /// Overflow (INTO).
    pub const OF: u8 = 4;
    /// BOUND range exceeded.
    pub const BR: u8 = 5;
    /// Invalid opcode.
    pub const UD: u8 = 6;
    /// Device not available.
    pub const NM: u8 = 7;
    /// Double fault.
    pub const DF: u8 = 8;
    /// Invalid TSS.
    pub const TS: u8 = 10;
    /// Segment not present.
    pub const NP: u8 = 11;
    /// Stack-segment fault.
    pub const SS: u8 = 12;
    /// General protection.
    pub const GP: u8 = 13;
    /// Page fault.
    pub const PF: u8 = 14;
    /// x87 floating-point error.
    pub const MF: u8 = 16;
    /// Alignment check.
    pub const AC: u8 = 17;
    /// Machine check.
    pub const MC: u8 = 18;
    /// SIMD floating-point exception.
    pub const XM: u8 = 19;
}

/// MSR numbers.
pub mod msr {
    /// IA32_TIME_STAMP_COUNTER.
    pub const TSC: u32 = 0x10;
    /// IA32_APIC_BASE.
    pub const APIC_BASE: u32 = 0x1b;
    /// IA32_FEATURE_CONTROL (bits in [`feature_control`]).
    pub const FEATURE_CONTROL: u32 = 0x3a;
    /// IA32_BIOS_SIGN_ID (microcode revision).
    pub const BIOS_SIGN_ID: u32 = 0x8b;
    /// IA32_MTRRCAP.
    pub const MTRRCAP: u32 = 0xfe;
    /// IA32_SYSENTER_CS.
    pub const SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// IA32_MCG_CAP.
    pub const MCG_CAP: u32 = 0x179;
    /// IA32_MCG_STATUS.
    pub const MCG_STATUS: u32 = 0x17a;
    /// IA32_MISC_ENABLE.
    pub const MISC_ENABLE: u32 = 0x1a0;
    /// IA32_PAT.
    pub const PAT: u32 = 0x277;
    /// IA32_MTRR_DEF_TYPE.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    /// IA32_VMX_BASIC.
    pub const VMX_BASIC: u32 = 0x480;
    /// IA32_VMX_PINBASED_CTLS.
    pub const VMX_PINBASED_CTLS: u32 = 0x481;
    /// IA32_VMX_PROCBASED_CTLS.
    pub const VMX_PROCBASED_CTLS: u32 = 0x482;
    /// IA32_VMX_EXIT_CTLS.
    pub const VMX_EXIT_CTLS: u32 = 0x483;
    /// IA32_VMX_ENTRY_CTLS.
    pub const VMX_ENTRY_CTLS: u32 = 0x484;
    /// IA32_VMX_MISC.
    pub const VMX_MISC: u32 = 0x485;
    /// IA32_VMX_CR0_FIXED0.
    pub const VMX_CR0_FIXED0: u32 = 0x486;
    /// IA32_VMX_CR0_FIXED1.
    pub const VMX_CR0_FIXED1: u32 = 0x487;
    /// IA32_VMX_CR4_FIXED0.
    pub const VMX_CR4_FIXED0: u32 = 0x488;
    /// IA32_VMX_CR4_FIXED1.
    pub const VMX_CR4_FIXED1: u32 = 0x489;
    /// IA32_VMX_VMCS_ENUM.
    pub const VMX_VMCS_ENUM: u32 = 0x48a;
    /// IA32_VMX_PROCBASED_CTLS2.
    pub const VMX_PROCBASED_CTLS2: u32 = 0x48b;
    /// IA32_VMX_EPT_VPID_CAP.
    pub const VMX_EPT_VPID_CAP: u32 = 0x48c;
    /// IA32_VMX_TRUE_PINBASED_CTLS (with IA32_VMX_BASIC bit 55).
    pub const VMX_TRUE_PINBASED_CTLS: u32 = 0x48d;
    /// IA32_VMX_TRUE_PROCBASED_CTLS.
    pub const VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
    /// IA32_VMX_TRUE_EXIT_CTLS.
    pub const VMX_TRUE_EXIT_CTLS: u32 = 0x48f;
    /// IA32_VMX_TRUE_ENTRY_CTLS.
    pub const VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
    /// IA32_EFER (bits in [`crate::efer`]).
    pub const EFER: u32 = 0xc000_0080;
    /// IA32_STAR: SYSCALL/SYSRET selectors.
    pub const STAR: u32 = 0xc000_0081;
    /// IA32_LSTAR: the 64-bit SYSCALL entry point.
    pub const LSTAR: u32 = 0xc000_0082;
    /// IA32_CSTAR: the compatibility-mode SYSCALL entry point.
    pub const CSTAR: u32 = 0xc000_0083;
    /// IA32_FMASK: RFLAGS bits SYSCALL clears.
    pub const FMASK: u32 = 0xc000_0084;
    /// IA32_FS_BASE.
    pub const FS_BASE: u32 = 0xc000_0100;
    /// IA32_GS_BASE.
    pub const GS_BASE: u32 = 0xc000_0101;
    /// IA32_KERNEL_GS_BASE (swapped in by SWAPGS).
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// IA32_TSC_AUX (read by RDTSCP).
    pub const TSC_AUX: u32 = 0xc000_0103;
    /// IA32_ARCH_CAPABILITIES.
    pub const ARCH_CAPABILITIES: u32 = 0x10a;
    /// IA32_DEBUGCTL.
    pub const DEBUGCTL: u32 = 0x1d9;
    /// The MSRs a hypervisor defines (0x4000_0000..=0x4000_ffff): visor's
    /// VMM owns them.
    pub const HYPERVISOR_RANGE: core::ops::RangeInclusive<u32> = 0x4000_0000..=0x4000_ffff;

    /// IA32_FEATURE_CONTROL bits.
    pub mod feature_control {
        /// Lock: the MSR is read-only until reset.
        pub const LOCK: u64 = 1 << 0;
        /// VMXON allowed inside SMX operation.
        pub const VMXON_IN_SMX: u64 = 1 << 1;
        /// VMXON allowed outside SMX operation.
        pub const VMXON_OUTSIDE_SMX: u64 = 1 << 2;
    }
}

/// Whether a 64-bit linear address is canonical (48-bit: bits 63..47 all
/// equal).
#[inline(always)]
pub fn canonical(a: u64) -> bool {
    ((a as i64) << 16 >> 16) as u64 == a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_addresses() {
        for a in [
            0,
            0x7fff_ffff_ffff,
            0xffff_8000_0000_0000,
            u64::MAX,
            0x1234_5678,
        ] {
            assert!(canonical(a), "{a:#x}");
        }
        for a in [
            0x8000_0000_0000,
            0xffff_7fff_ffff_ffff,
            0x0001_0000_0000_0000,
            0x8000_0000_0000_0000,
            0xfff0_0000_0000_0000,
        ] {
            assert!(!canonical(a), "{a:#x}");
        }
    }

    #[test]
    fn flag_groups() {
        use rflags::*;
        assert_eq!(ARITH, 0x8d5);
        assert_eq!(WRITABLE & (FIXED | VM | VIF | VIP), 0);
        assert_eq!(pte::ADDR & 0xfff, 0);
        assert_eq!(pte::ADDR & pte::NX, 0);
    }
}
