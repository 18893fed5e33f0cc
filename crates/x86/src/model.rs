//! The one CPU model of visor's software engines (`emu`, `vmx`, `trap`,
//! `pv`, `bt`): what the guest is shown, whatever the host is. It is an
//! Intel model (VMX belongs with one) of a fictional part, family 6 model
//! 0x0f stepping 1, named "visor software CPU" in its brand string, and its
//! CPUID leaves advertise what the software CPU implements. docs/cpu-model.md
//! lists the leaves and the MSRs.
//!
//! Other code asks this module what the model has (the vmx engine's VMM
//! derives its VMCS controls from the leaves it shows its guest): the
//! feature bits are named here, [`cpuid`] builds the table, and
//! [`has`] tells whether a table advertises an instruction's CPUID
//! features.

use iced_x86::CpuidFeature as F;

use crate::cpuid::{CpuidTable, APIC_TIMER_KHZ, TSC_KHZ};

/// The vendor string (CPUID leaf 0 EBX, EDX, ECX).
pub const VENDOR: &[u8; 12] = b"GenuineIntel";
/// Family 6 (leaf 1 EAX[11:8]).
pub const FAMILY: u32 = 6;
/// Model 0x0f (leaf 1 EAX[7:4]; the extended model is 0).
pub const MODEL: u32 = 0x0f;
/// Stepping 1 (leaf 1 EAX[3:0]).
pub const STEPPING: u32 = 1;
/// The brand string (leaves 0x8000_0002..=0x8000_0004), NUL-padded to 48
/// bytes.
pub const BRAND: &str = "visor software CPU";
/// The highest basic leaf (0xa: the architectural performance-monitoring
/// leaf, version 0: no counters).
pub const MAX_BASIC: u32 = 0xa;
/// The highest extended leaf.
pub const MAX_EXTENDED: u32 = 0x8000_0008;
/// MAXPHYADDR: the physical-address width (leaf 0x8000_0008 EAX[7:0]).
/// Frame-address bits from it up to 51 are reserved in paging structures,
/// CR3, IA32_APIC_BASE and the VMX structures.
pub const PHYS_BITS: u32 = 46;
/// The linear-address width (leaf 0x8000_0008 EAX[15:8]): canonical
/// addresses have bits 63:47 equal.
pub const LINEAR_BITS: u32 = 48;
/// The microcode revision IA32_BIOS_SIGN_ID reads as (bits 63:32).
pub const MICROCODE: u64 = 1;

/// Leaf 1 EDX.
pub mod leaf1_edx {
    /// x87 FPU.
    pub const FPU: u32 = 1 << 0;
    /// Debug extensions: CR4.DE, I/O breakpoints, DR4/DR5 reserved.
    pub const DE: u32 = 1 << 2;
    /// 4 MiB pages (CR4.PSE).
    pub const PSE: u32 = 1 << 3;
    /// RDTSC and CR4.TSD.
    pub const TSC: u32 = 1 << 4;
    /// RDMSR/WRMSR.
    pub const MSR: u32 = 1 << 5;
    /// PAE paging.
    pub const PAE: u32 = 1 << 6;
    /// CMPXCHG8B.
    pub const CX8: u32 = 1 << 8;
    /// A local APIC, enabled (IA32_APIC_BASE bit 11).
    pub const APIC: u32 = 1 << 9;
    /// MTRRs.
    pub const MTRR: u32 = 1 << 12;
    /// Global pages (CR4.PGE).
    pub const PGE: u32 = 1 << 13;
    /// CMOVcc.
    pub const CMOV: u32 = 1 << 15;
    /// IA32_PAT.
    pub const PAT: u32 = 1 << 16;
    /// 4 MiB pages above 4 GiB with 32-bit paging.
    pub const PSE36: u32 = 1 << 17;
    /// CLFLUSH.
    pub const CLFSH: u32 = 1 << 19;
    /// MMX.
    pub const MMX: u32 = 1 << 23;
    /// FXSAVE/FXRSTOR, CR4.OSFXSR.
    pub const FXSR: u32 = 1 << 24;
    /// SSE.
    pub const SSE: u32 = 1 << 25;
    /// SSE2.
    pub const SSE2: u32 = 1 << 26;
}

/// Leaf 1 ECX.
pub mod leaf1_ecx {
    /// VMX (the `emu`, `vmx` and `bt` engines; not `trap` or `pv`).
    pub const VMX: u32 = 1 << 5;
    /// CMPXCHG16B.
    pub const CX16: u32 = 1 << 13;
    /// POPCNT.
    pub const POPCNT: u32 = 1 << 23;
    /// Running under a hypervisor.
    pub const HYPERVISOR: u32 = 1 << 31;
}

/// Leaf 7 subleaf 0 EDX.
pub mod leaf7_edx {
    /// IA32_ARCH_CAPABILITIES.
    pub const ARCH_CAPABILITIES: u32 = 1 << 29;
}

/// Leaf 0x8000_0001 ECX and EDX.
pub mod ext1 {
    /// ECX: LAHF/SAHF in 64-bit mode.
    pub const LAHF_LM: u32 = 1 << 0;
    /// EDX: SYSCALL/SYSRET.
    pub const SYSCALL: u32 = 1 << 11;
    /// EDX: the NX bit (EFER.NXE).
    pub const NX: u32 = 1 << 20;
    /// EDX: 1 GiB pages.
    pub const PAGE1G: u32 = 1 << 26;
    /// EDX: RDTSCP and IA32_TSC_AUX.
    pub const RDTSCP: u32 = 1 << 27;
    /// EDX: long mode.
    pub const LM: u32 = 1 << 29;
}

/// IA32_ARCH_CAPABILITIES as the model reads it: the software CPU does not
/// speculate, so it has none of the speculative-execution issues the MSR
/// can deny (RDCL_NO, SSB_NO, MDS_NO, IF_PSCHANGE_MC_NO, TAA_NO,
/// SBDR_SSDP_NO, FBSDP_NO, PSDP_NO, BHI_NO).
pub const ARCH_CAPABILITIES: u64 = (1 << 0)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 8)
    | (1 << 13)
    | (1 << 14)
    | (1 << 15)
    | (1 << 20);

/// Leaf 1 EAX: type 0, family, model, stepping.
pub const fn signature() -> u32 {
    (FAMILY << 8) | (MODEL << 4) | STEPPING
}

fn brand_leaf(i: usize) -> [u32; 4] {
    let mut b = [0u8; 48];
    b[..BRAND.len()].copy_from_slice(BRAND.as_bytes());
    let w = |k: usize| {
        let o = i * 16 + k * 4;
        u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
    };
    [w(0), w(1), w(2), w(3)]
}

/// The model's CPUID table. `apic`: a local APIC is present (enabled at
/// reset). `pv`: the hypervisor leaves 0x4000_0000 (signature) and
/// 0x4000_0001 (the features, EAX, EBX, ECX, EDX); visor's timing leaf
/// 0x4000_0010 (`hypercall::CPUID_TIMING_LEAF`) is always there.
pub fn cpuid(apic: bool, pv: Option<([u8; 12], [u32; 4])>) -> CpuidTable {
    use leaf1_ecx::*;
    use leaf1_edx::*;
    let mut t = CpuidTable::default();
    let v = |i: usize| u32::from_le_bytes([VENDOR[i], VENDOR[i + 1], VENDOR[i + 2], VENDOR[i + 3]]);
    t.set(0, None, [MAX_BASIC, v(0), v(8), v(4)]);
    let mut edx = FPU
        | DE
        | PSE
        | TSC
        | MSR
        | PAE
        | CX8
        | MTRR
        | PGE
        | CMOV
        | PAT
        | PSE36
        | CLFSH
        | MMX
        | FXSR
        | SSE
        | SSE2;
    if apic {
        edx |= APIC;
    }
    // EBX: CLFLUSH line size 8 (64 bytes), one logical CPU, APIC ID 0.
    let ebx: u32 = (8 << 8) | (1 << 16);
    t.set(
        1,
        None,
        [signature(), ebx, VMX | CX16 | POPCNT | HYPERVISOR, edx],
    );
    // Leaf 2: one round, no descriptors (no caches or TLBs described).
    t.set(2, None, [1, 0, 0, 0]);
    // Leaves 3-6, 8, 9: nothing. Leaf 4 (deterministic cache parameters):
    // subleaf 0 has cache type 0, no caches.
    for leaf in [3, 4, 5, 6, 8, 9] {
        t.set(leaf, None, [0; 4]);
    }
    t.set(7, Some(0), [0, 0, 0, leaf7_edx::ARCH_CAPABILITIES]);
    // Architectural performance monitoring version 0: no counters.
    t.set(0xa, None, [0; 4]);
    t.set(0x8000_0000, None, [MAX_EXTENDED, 0, 0, 0]);
    t.set(
        0x8000_0001,
        None,
        [
            0,
            0,
            ext1::LAHF_LM,
            ext1::SYSCALL | ext1::NX | ext1::PAGE1G | ext1::RDTSCP | ext1::LM,
        ],
    );
    for (i, leaf) in (0x8000_0002..=0x8000_0004).enumerate() {
        t.set(leaf, None, brand_leaf(i));
    }
    t.set(0x8000_0005, None, [0; 4]);
    t.set(0x8000_0006, None, [0; 4]);
    // Invariant TSC.
    t.set(0x8000_0007, None, [0, 0, 0, 1 << 8]);
    t.set(0x8000_0008, None, [PHYS_BITS | (LINEAR_BITS << 8), 0, 0, 0]);
    // The hypervisor range: visor's signature and features with `pv`,
    // and its timing leaf always (without `pv` under an empty signature).
    let max = hypercall::CPUID_TIMING_LEAF;
    match pv {
        Some((sig, features)) => {
            let w = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
            t.set(
                hypercall::CPUID_SIGNATURE_LEAF,
                None,
                [max, w(0), w(4), w(8)],
            );
            t.set(hypercall::CPUID_FEATURES_LEAF, None, features);
        }
        None => t.set(hypercall::CPUID_SIGNATURE_LEAF, None, [max, 0, 0, 0]),
    }
    let apic_khz = if apic { APIC_TIMER_KHZ } else { 0 };
    t.set(max, None, [TSC_KHZ, apic_khz, 0, 0]);
    t
}

/// Whether `t` advertises feature `f` of an instruction (iced-x86's
/// [`CpuidFeature`](iced_x86::CpuidFeature)). Features an x86-64 CPU always
/// has (the 8086-Pentium base, long mode's own instructions) count as
/// advertised; so do those whose instruction raises its own fault where the
/// feature is missing (none here).
pub fn has(t: &CpuidTable, f: F) -> bool {
    let (_, _, c1, d1) = t.query(1, 0);
    let (_, _, _, de) = t.query(0x8000_0001, 0);
    let bit = |r: u32, m: u32| r & m != 0;
    match f {
        F::INTEL8086
        | F::INTEL8086_ONLY
        | F::INTEL186
        | F::INTEL286
        | F::INTEL386
        | F::INTEL486
        | F::X64 => true,
        F::INTEL286_ONLY | F::INTEL386_ONLY | F::INTEL386_A0_ONLY | F::INTEL486_A_ONLY => false,
        F::FPU | F::FPU287 | F::FPU387 => bit(d1, leaf1_edx::FPU),
        F::FPU287XL_ONLY | F::FPU387SL_ONLY => false,
        F::TSC => bit(d1, leaf1_edx::TSC),
        F::MSR => bit(d1, leaf1_edx::MSR),
        F::CX8 => bit(d1, leaf1_edx::CX8),
        F::CMOV => bit(d1, leaf1_edx::CMOV),
        F::CLFSH => bit(d1, leaf1_edx::CLFSH),
        F::MMX => bit(d1, leaf1_edx::MMX),
        F::FXSR => bit(d1, leaf1_edx::FXSR),
        F::SSE => bit(d1, leaf1_edx::SSE),
        F::SSE2 => bit(d1, leaf1_edx::SSE2),
        F::VMX => bit(c1, leaf1_ecx::VMX),
        F::CMPXCHG16B => bit(c1, leaf1_ecx::CX16),
        F::POPCNT => bit(c1, leaf1_ecx::POPCNT),
        F::SYSCALL => bit(de, ext1::SYSCALL),
        F::RDTSCP => bit(de, ext1::RDTSCP),
        // CPUID itself; PAUSE is a NOP without SSE2's hint; multi-byte NOP
        // (0F 1F) is on every P6 and later.
        F::CPUID | F::PAUSE | F::MULTIBYTENOP | F::RDPMC => true,
        F::INVEPT | F::INVVPID => bit(c1, leaf1_ecx::VMX),
        _ => false,
    }
}

/// The CR4 bits a table's features make writable (the others are
/// reserved: MOV to CR4 raises #GP): TSD, DE, PSE, PAE, PGE, PCE, OSFXSR,
/// OSXMMEXCPT, and VMXE with VMX.
pub fn cr4_allowed(t: &CpuidTable) -> u64 {
    use arch::cr4;
    let (_, _, c1, d1) = t.query(1, 0);
    let mut allowed = cr4::PCE;
    for (feature, bits) in [
        (d1 & leaf1_edx::TSC, cr4::TSD),
        (d1 & leaf1_edx::DE, cr4::DE),
        (d1 & leaf1_edx::PSE, cr4::PSE),
        (d1 & leaf1_edx::PAE, cr4::PAE),
        (d1 & leaf1_edx::PGE, cr4::PGE),
        (d1 & leaf1_edx::FXSR, cr4::OSFXSR),
        (d1 & leaf1_edx::SSE, cr4::OSXMMEXCPT),
        (c1 & leaf1_ecx::VMX, cr4::VMXE),
    ] {
        if feature != 0 {
            allowed |= bits;
        }
    }
    allowed
}

/// Whether the model lets `ins` run: every CPUID feature of it advertised
/// in `t`. Else it raises #UD. Not checked are what a CPU without the
/// feature runs anyway: the hint-NOP space (ENDBR, RDSSP, MPX's BND
/// instructions and prefix), prefixes it ignores (HLE's XACQUIRE and
/// XRELEASE), and TZCNT/LZCNT, which are BSF/BSR with a REP prefix there.
pub fn allows(t: &CpuidTable, ins: &iced_x86::Instruction) -> bool {
    use iced_x86::Mnemonic as M;
    if matches!(ins.mnemonic(), M::Tzcnt | M::Lzcnt) || hint_nop(ins.mnemonic()) {
        return true;
    }
    ins.cpuid_features()
        .iter()
        .all(|&f| matches!(f, F::HLE | F::MPX) || has(t, f))
}

/// Whether `m` is in the hint-NOP space, which a CPU without the feature
/// runs as a NOP: CET's ENDBR and RDSSP, and MPX's BND instructions.
pub(crate) fn hint_nop(m: iced_x86::Mnemonic) -> bool {
    use iced_x86::Mnemonic as M;
    matches!(
        m,
        M::Endbr32
            | M::Endbr64
            | M::Rdsspd
            | M::Rdsspq
            | M::Bndcl
            | M::Bndcn
            | M::Bndcu
            | M::Bndldx
            | M::Bndmk
            | M::Bndmov
            | M::Bndstx
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_signature_and_widths() {
        let t = cpuid(true, None);
        let (max, b, c, d) = t.query(0, 0);
        assert_eq!(max, MAX_BASIC);
        let mut v = Vec::new();
        for r in [b, d, c] {
            v.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&v[..], VENDOR);
        assert_eq!(t.query(1, 0).0, 0x6f1);
        assert_eq!(t.query(0x8000_0008, 0).0, 0x302e);
        let mut brand = Vec::new();
        for leaf in 0x8000_0002..=0x8000_0004 {
            let (a, b, c, d) = t.query(leaf, 0);
            for r in [a, b, c, d] {
                brand.extend_from_slice(&r.to_le_bytes());
            }
        }
        assert!(brand.starts_with(BRAND.as_bytes()));
        assert!(brand[BRAND.len()..].iter().all(|&b| b == 0));
    }

    #[test]
    fn features_of_instructions() {
        let t = cpuid(false, None);
        assert!(has(&t, F::SSE2));
        assert!(has(&t, F::VMX));
        assert!(!has(&t, F::RDPRU));
        assert!(!has(&t, F::SSE3));
        assert!(!has(&t, F::AVX));
        assert_eq!(t.query(1, 0).3 & leaf1_edx::APIC, 0);
    }
}
