//! Differential test, hardware as the oracle: random user-level integer, SSE,
//! SSE2 and MMX instruction sequences on `kvm` and on `emu` must leave the same
//! registers (general, XMM, MM, MXCSR, x87 status), defined flags and memory
//! (tests/common/difftest.rs says how).
//!
//! 10,000 sequences from a fixed seed; `VISOR_DIFF_SEED` (decimal or 0x-hex) and
//! `VISOR_DIFF_COUNT` change them; half the sequences are x87 sequences
//! (`VISOR_DIFF_X87=0` leaves them out). Long runs: examples/difftest.rs.

#[path = "common/difftest.rs"]
mod difftest;
#[path = "common/engines.rs"]
mod engines;

use visor::Engine;

const SEQUENCES: u64 = 10_000;

/// Runs the sequences on `subject` against `oracle`; none may diverge.
fn differential(oracle: Engine, subject: Engine) {
    differential_with(oracle, subject, "integer", integer)
}

fn integer(
    opts: &difftest::Options,
    d: &mut dyn FnMut(&str),
    p: &mut dyn FnMut(u64, u64),
) -> Result<difftest::Summary, String> {
    difftest::run(opts, d, p)
}

/// A kind of run: `difftest::run` or `difftest::run_system`.
type Runs = fn(
    &difftest::Options,
    &mut dyn FnMut(&str),
    &mut dyn FnMut(u64, u64),
) -> Result<difftest::Summary, String>;

/// A run of the integer or the system sequences (`run`).
fn differential_with(oracle: Engine, subject: Engine, kind: &str, run: Runs) {
    let seed = std::env::var("VISOR_DIFF_SEED")
        .map(|s| difftest::parse_seed(&s).expect("VISOR_DIFF_SEED"))
        .unwrap_or(difftest::DEFAULT_SEED);
    let count = std::env::var("VISOR_DIFF_COUNT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEQUENCES);
    let opts = difftest::Options {
        oracle,
        subject,
        seed,
        count,
        keep_going: false,
        x87: std::env::var("VISOR_DIFF_X87").map_or(true, |v| v != "0"),
    };
    let mut report = None;
    let s = run(&opts, &mut |r| report = Some(r.to_string()), &mut |_, _| {})
        .unwrap_or_else(|e| panic!("differential run: {e}"));
    if let Some(r) = report {
        panic!("{r}");
    }
    assert_eq!((s.sequences, s.divergences), (count, 0));
    eprintln!(
        "differential ({kind}) {oracle} vs {subject}: {} sequences, seed {seed:#x}, {:.2?}",
        s.sequences, s.elapsed
    );
}

/// The software CPU against the hardware.
#[test]
fn kvm_vs_emu() {
    if engines::available(Engine::Kvm) {
        differential(Engine::Kvm, Engine::Emu);
    }
}

/// The binary translator against the hardware.
#[test]
fn kvm_vs_bt() {
    if engines::available(Engine::Kvm) {
        differential(Engine::Kvm, Engine::Bt);
    }
}

/// The binary translator against its oracle, the software CPU (runs on
/// every host).
#[test]
fn emu_vs_bt() {
    differential(Engine::Emu, Engine::Bt);
}

/// The system-level sequences (tests/common/difftest_system.rs): faults
/// and privileged state at CPL 3, the software CPU against the hardware.
#[test]
fn kvm_vs_emu_system() {
    if engines::available(Engine::Kvm) {
        differential_with(Engine::Kvm, Engine::Emu, "system", system);
    }
}

/// The system-level sequences on the binary translator, against the
/// hardware.
#[test]
fn kvm_vs_bt_system() {
    if engines::available(Engine::Kvm) {
        differential_with(Engine::Kvm, Engine::Bt, "system", system);
    }
}

/// The system-level sequences on `trap` against the hardware: user mode
/// runs natively there, and every exception comes to the VMM, which
/// reflects it into the guest kernel through its IDT: the vector, error
/// code and frame must be the CPU's (RF set for faults, SDM vol. 3
/// 17.3.1.1). (Against `emu`, the sequences also vary CR4.TSD and the
/// user's IOPL 3, which `trap` does not virtualize yet: see
/// `emu_vs_trap_system`.)
#[test]
fn kvm_vs_trap_system() {
    if engines::available(Engine::Kvm) {
        differential_with(Engine::Kvm, Engine::Trap, "system", system);
    }
}

/// The system-level sequences on the binary translator against the
/// software CPU, RDTSCP and RDPID included (runs on every host).
#[test]
fn emu_vs_bt_system() {
    differential_with(Engine::Emu, Engine::Bt, "system", system);
}

/// The system-level sequences on `trap` against the software CPU, on every
/// host: CR4.TSD, INT1, gates of DPL 0, and the stores of system registers
/// at CPL 3 too, with `trap` as a virtualizable x86 (`--trap-sensitive`:
/// the holes trap and are emulated). Ring 3 never gets IOPL 3 here (`trap`
/// does not virtualize it, docs/deprivileged.md).
#[test]
fn emu_vs_trap_system() {
    differential_with(Engine::Emu, Engine::Trap, "system", system);
}

fn system(
    opts: &difftest::Options,
    d: &mut dyn FnMut(&str),
    p: &mut dyn FnMut(u64, u64),
) -> Result<difftest::Summary, String> {
    difftest::run_system(opts, d, p)
}
