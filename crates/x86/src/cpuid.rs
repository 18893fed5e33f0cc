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

/// A configurable CPUID table. Leaves not in it within their range read as
/// zeros.
#[derive(Clone, Debug, Default)]
pub struct CpuidTable {
    pub entries: Vec<CpuidEntry>,
    /// TZCNT is TZCNT (BMI1 advertised), not BSF.
    pub bmi1: bool,
    /// LZCNT is LZCNT (ABM advertised), not BSR.
    pub abm: bool,
}

impl CpuidTable {
    /// CPUID `leaf`, subleaf `sub`. As on Intel processors, a leaf above
    /// the highest of its range (basic, hypervisor at 0x4000_0000 when the
    /// table has one, extended) reads as the highest basic leaf.
    pub fn query(&self, leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
        let base = leaf & 0xffff_0000;
        let in_range = self.has(base) && leaf <= self.entry(base, 0).0;
        if in_range || !self.has(0) {
            self.entry(leaf, sub)
        } else {
            self.entry(self.entry(0, 0).0, sub)
        }
    }

    fn has(&self, leaf: u32) -> bool {
        self.entries.iter().any(|e| e.function == leaf)
    }

    fn entry(&self, leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
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

    /// The software CPU's model ([`crate::model::cpuid`]).
    pub fn software_cpu(apic: bool, pv: Option<([u8; 12], [u32; 4])>) -> CpuidTable {
        crate::model::cpuid(apic, pv)
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
