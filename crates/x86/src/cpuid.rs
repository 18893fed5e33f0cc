//! The CPUID table the guest sees.

/// The software CPU's TSC frequency in kHz: RDTSC counts nanoseconds
/// ([`crate::Cpu::tsc`]), whatever the host's TSC does.
pub const TSC_KHZ: u32 = 1_000_000;
/// The input clock of the software engines' local APIC timer, in kHz: it
/// counts nanoseconds before its divider, as KVM's does.
pub const APIC_TIMER_KHZ: u32 = 1_000_000;

/// One CPUID leaf (and subleaf, when `index` is `Some`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: Option<u32>,
    /// EAX, EBX, ECX, EDX.
    pub regs: [u32; 4],
}

/// A configurable CPUID table. Leaves not in it read as zeros.
#[derive(Clone, Debug, Default)]
pub struct CpuidTable {
    pub entries: Vec<CpuidEntry>,
    /// TZCNT is TZCNT (BMI1 advertised), not BSF.
    pub bmi1: bool,
    /// LZCNT is LZCNT (ABM advertised), not BSR.
    pub abm: bool,
}

fn host(leaf: u32, sub: u32) -> [u32; 4] {
    #[cfg(target_arch = "x86_64")]
    {
        let r = std::arch::x86_64::__cpuid_count(leaf, sub);
        [r.eax, r.ebx, r.ecx, r.edx]
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (leaf, sub);
        [0; 4]
    }
}

impl CpuidTable {
    pub fn query(&self, leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
        for e in &self.entries {
            if e.function == leaf && e.index.is_none_or(|i| i == sub) {
                let [a, b, c, d] = e.regs;
                return (a, b, c, d);
            }
        }
        (0, 0, 0, 0)
    }

    pub fn set(&mut self, function: u32, index: Option<u32>, regs: [u32; 4]) {
        self.entries
            .retain(|e| !(e.function == function && e.index == index));
        self.entries.push(CpuidEntry {
            function,
            index,
            regs,
        });
    }

    /// What the software CPU implements, with the host's vendor, family/model
    /// and brand string. `apic`: a local APIC is present. `pv`: the
    /// hypervisor leaves 0x4000_0000 (signature) and 0x4000_0001 (the
    /// features, EAX, EBX, ECX, EDX). The timing leaf 0x4000_0010 is always
    /// there (`hypercall::CPUID_TIMING_LEAF`).
    pub fn software_cpu(apic: bool, pv: Option<([u8; 12], [u32; 4])>) -> CpuidTable {
        let mut t = CpuidTable::default();
        let h0 = host(0, 0);
        t.set(0, None, [7, h0[1], h0[2], h0[3]]);
        let h1 = host(1, 0);
        // EDX: FPU PSE TSC MSR PAE CX8 [APIC] MTRR PGE CMOV PAT CLFSH MMX FXSR SSE SSE2.
        let mut edx: u32 = (1 << 0)
            | (1 << 3)
            | (1 << 4)
            | (1 << 5)
            | (1 << 6)
            | (1 << 8)
            | (1 << 12)
            | (1 << 13)
            | (1 << 15)
            | (1 << 16)
            | (1 << 19)
            | (1 << 23)
            | (1 << 24)
            | (1 << 25)
            | (1 << 26);
        if apic {
            edx |= 1 << 9;
        }
        // ECX: VMX, CX16, POPCNT, hypervisor.
        let ecx: u32 = (1 << 5) | (1 << 13) | (1 << 23) | (1 << 31);
        // EBX: CLFLUSH line size 8 (64 bytes), one logical CPU, APIC ID 0.
        let ebx: u32 = (8 << 8) | (1 << 16);
        t.set(1, None, [h1[0], ebx, ecx, edx]);
        t.set(7, Some(0), [0, 0, 0, 0]);
        t.set(0x8000_0000, None, [0x8000_0008, h0[1], h0[2], h0[3]]);
        // ECX: LAHF in 64-bit mode. EDX: SYSCALL, NX, 1 GiB pages, RDTSCP, LM.
        t.set(
            0x8000_0001,
            None,
            [
                0,
                0,
                1,
                (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29),
            ],
        );
        for leaf in 0x8000_0002..=0x8000_0004 {
            t.set(leaf, None, host(leaf, 0));
        }
        t.set(0x8000_0006, None, host(0x8000_0006, 0));
        // Invariant TSC.
        t.set(0x8000_0007, None, [0, 0, 0, 1 << 8]);
        let h8 = host(0x8000_0008, 0);
        t.set(0x8000_0008, None, [h8[0] & 0xffff, 0, 0, 0]);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The timing leaf is there with and without the paravirtual leaves, and
    /// leaf 0x4000_0000 reaches it.
    #[test]
    fn timing_leaf() {
        let timing = hypercall::CPUID_TIMING_LEAF;
        for (apic, pv) in [
            (true, None),
            (false, Some((*b"VisorVisorPV", [1, 2, 3, 4]))),
        ] {
            let t = CpuidTable::software_cpu(apic, pv);
            let (max, ..) = t.query(hypercall::CPUID_SIGNATURE_LEAF, 0);
            assert_eq!(max, timing);
            let apic_khz = if apic { APIC_TIMER_KHZ } else { 0 };
            assert_eq!(t.query(timing, 0), (TSC_KHZ, apic_khz, 0, 0));
        }
        let t = CpuidTable::software_cpu(false, Some((*b"VisorVisorPV", [1, 2, 3, 4])));
        assert_eq!(t.query(hypercall::CPUID_FEATURES_LEAF, 0), (1, 2, 3, 4));
    }
}
