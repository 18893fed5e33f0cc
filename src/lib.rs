//! visor: one VMM, one device model, one exit loop; several CPU-virtualization
//! engines. This library holds the parts the `visor` binary and the tests share:
//! the engine registry, the VM (memory + buses + vCPU), the VMM loop and
//! statistics.

pub mod console;
pub mod engine;
pub mod gdb;
pub mod stats;
pub mod vmm;

pub use engine::{Engine, GuestMode, VmOptions};
pub use stats::Stats;
pub use visor_deprivileged::HolePolicy;
pub use vmm::{Outcome, Vm};

/// The demo guest embedded in the binary (guest/demo, built by build.rs).
pub static DEMO_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.elf"));

/// The CPU benchmark kernel (guest/bench, built by build.rs): a flat Multiboot v1
/// image that visor, QEMU (`-kernel`) and GRUB (Bochs) all boot;
/// `cargo run --example bench_kernel -- FILE` writes it out.
pub static BENCH_KERNEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bench.bin"));

/// Exit statuses of `visor run`. Odd statuses belong to the guest's debug-exit
/// port ((v << 1) | 1); visor's own are even.
pub mod exit_status {
    /// Clean power-off, reset, or HLT with nothing left to wake the guest.
    pub const OK: i32 = 0;
    /// Bad input or a VMM error: one line on stderr says which.
    pub const ERROR: i32 = 2;
    /// The guest triple-faulted; a register dump is on stderr.
    pub const TRIPLE_FAULT: i32 = 4;
    /// The engine could not run the guest (entry failure, internal error).
    pub const GUEST_FAILURE: i32 = 6;
    /// `--timeout` expired while the guest ran (register dump on stderr).
    pub const TIMEOUT: i32 = 8;
    /// The guest executed a valid instruction the engine does not implement
    /// (`unimplemented instruction <mnemonic> at <rip>` on stderr).
    pub const UNIMPLEMENTED: i32 = 10;
    /// SIGTERM stopped the guest (a second SIGTERM after the power button,
    /// or one the guest had not enabled the power button for): 128 + 15, as
    /// a shell reports a process SIGTERM ended.
    pub const TERMINATED: i32 = 143;
}
