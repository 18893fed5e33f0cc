//! visor's guest ABI, shared by the VMM and the guests it ships (`no_std`).
//!
//! See `docs/boot-protocol.md` for the prose version.
#![no_std]

/// Physical address of the boot GDT.
pub const BOOT_GDT: u64 = 0x500;
/// GDT selectors present at entry.
pub const SEL_CODE32: u16 = 0x08;
pub const SEL_CODE64: u16 = 0x10;
pub const SEL_DATA: u16 = 0x18;
pub const SEL_TSS: u16 = 0x20;
/// Boot page tables: PML4, one PDPT, four page directories (identity map of 4 GiB).
pub const BOOT_PML4: u64 = 0x1000;
pub const BOOT_PDPT: u64 = 0x2000;
pub const BOOT_PD: u64 = 0x3000;
/// Bytes identity-mapped by the boot page tables.
pub const BOOT_IDENTITY_MAPPED: u64 = 4 << 30;
/// Physical address of [`BootInfo`] (ELF64 kernels) or Linux `boot_params`.
pub const BOOT_INFO: u64 = 0x7000;
/// Memory map entries follow the boot info.
pub const BOOT_MMAP: u64 = 0x7800;
pub const BOOT_MMAP_MAX: usize = 64;
/// Multiboot information structure and its tables (multiboot kernels).
pub const MULTIBOOT_INFO: u64 = 0x9000;
/// Kernel command line (NUL-terminated).
pub const BOOT_CMDLINE: u64 = 0x20000;
pub const BOOT_CMDLINE_MAX: usize = 4096;
/// Initial stack pointer for ELF64 kernels (grows down; 0x30000..0x80000 is free).
pub const BOOT_STACK_TOP: u64 = 0x80000;
/// Lowest address a kernel may be loaded at.
pub const KERNEL_MIN_ADDR: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; RAM beyond it continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;

/// "VISORBI1", little-endian.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"VISORBI1");

/// Handed to an ELF64 kernel in RDI.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct BootInfo {
    pub magic: u64,
    pub version: u32,
    pub mmap_count: u32,
    pub mmap_addr: u64,
    pub cmdline_addr: u64,
    pub cmdline_len: u64,
    pub initrd_addr: u64,
    pub initrd_len: u64,
}

pub const MEM_RAM: u32 = 1;
pub const MEM_RESERVED: u32 = 2;

/// One memory-map entry (same type codes as E820).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryRegion {
    pub base: u64,
    pub len: u64,
    pub kind: u32,
    pub _pad: u32,
}

/// Platform I/O ports.
pub mod port {
    /// 16550 UART, COM1 (IRQ 4).
    pub const COM1: u16 = 0x3f8;
    /// QEMU isa-debug-exit compatible: writing v ends the run with status (v << 1) | 1.
    pub const DEBUG_EXIT: u16 = 0xf4;
    /// Power control: a 16-bit write of [`POWER_OFF`] shuts the machine down (status 0).
    pub const POWER: u16 = 0x604;
    pub const POWER_OFF: u16 = 0x2000;
    /// i8042 command port: writing 0xfe resets the machine (ends the run, status 0).
    pub const I8042_COMMAND: u16 = 0x64;
    pub const I8042_RESET: u8 = 0xfe;
    /// Benchmark phases: a 32-bit write of `n` starts phase `n` (1 and up,
    /// see [`crate::bench`]), of 0 ends it. The VMM records the engine's
    /// counters at both ends. Kernels that may not do port I/O (engine `pv`)
    /// use the `bench_phase` hypercall instead.
    pub const BENCH_PHASE: u16 = 0xf5;
}

/// The nanobenchmarks of the demo OS (`--cmdline bench`) and the phases that
/// frame them (docs/costs.md).
pub mod bench {
    /// The benchmarks, in the order of their phase numbers: the phase of
    /// `NAMES[i]` is `i + 1`.
    pub const NAMES: [&str; 10] = [
        "syscall",
        "syscall/sysret",
        "in",
        "cr8wr",
        "call/ret",
        "pgfault",
        "divzero",
        "ptemod",
        "hypercall",
        "cpuid",
    ];

    pub const SYSCALL: u32 = 1;
    pub const SYSCALL_SYSRET: u32 = 2;
    pub const IN: u32 = 3;
    pub const CR8WR: u32 = 4;
    pub const CALL_RET: u32 = 5;
    pub const PGFAULT: u32 = 6;
    pub const DIVZERO: u32 = 7;
    pub const PTEMOD: u32 = 8;
    pub const HYPERCALL: u32 = 9;
    pub const CPUID: u32 = 10;

    /// Added to a benchmark's phase number: the same benchmark run for zero
    /// iterations just before, so that what the phase itself costs (its
    /// markers; for a user-mode benchmark the system calls that announce it)
    /// can be subtracted. Its phase is named `<name> baseline`.
    pub const BASELINE: u32 = 1 << 16;

    /// The name of phase `phase`, if it is one.
    pub fn name(phase: u32) -> Option<&'static str> {
        NAMES.get((phase as usize).checked_sub(1)?).copied()
    }

    /// The phase number of benchmark `name`.
    pub fn phase(name: &str) -> Option<u32> {
        NAMES.iter().position(|n| *n == name).map(|i| i as u32 + 1)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn numbers_name_the_benchmarks() {
            for (n, name) in [
                (SYSCALL, "syscall"),
                (SYSCALL_SYSRET, "syscall/sysret"),
                (IN, "in"),
                (CR8WR, "cr8wr"),
                (CALL_RET, "call/ret"),
                (PGFAULT, "pgfault"),
                (DIVZERO, "divzero"),
                (PTEMOD, "ptemod"),
                (HYPERCALL, "hypercall"),
                (CPUID, "cpuid"),
            ] {
                assert_eq!(super::name(n), Some(name));
                assert_eq!(phase(name), Some(n));
            }
            assert_eq!(super::name(0), None);
            assert_eq!(super::name(NAMES.len() as u32 + 1), None);
        }
    }
}
