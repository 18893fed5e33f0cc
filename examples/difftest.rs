//! Long differential runs, kvm against emu, with the generator and comparison
//! of tests/differential.rs (tests/common/difftest.rs):
//!
//! ```sh
//! cargo run --release --example difftest -- --count 1000000 --seed 0x1234 [--keep-going]
//! cargo run --release --example difftest -- --system --count 100000   # system-level cases
//! ```
//!
//! Prints every divergence in full, progress every `--every` sequences, and a
//! summary; exits 0 when there were none, 1 after a divergence, 2 when the run
//! could not start (engine kvm unavailable, bad arguments).

#[path = "../tests/common/difftest.rs"]
mod difftest;

use std::process::ExitCode;

use clap::Parser;
use visor::Engine;

#[derive(Parser)]
#[command(about = "Differential test of a software engine against KVM (or emu), for long runs")]
struct Args {
    /// Number of sequences.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Seed, decimal or 0x-hex (default: the test's).
    #[arg(long, value_parser = difftest::parse_seed)]
    seed: Option<u64>,
    /// The engine checked (against kvm, or against emu with `--oracle emu`).
    #[arg(long, default_value = "emu")]
    engine: String,
    /// The oracle: kvm (the hardware) or emu (the software CPU).
    #[arg(long, default_value = "kvm")]
    oracle: String,
    /// Go on after a divergence and count them all.
    #[arg(long)]
    keep_going: bool,
    /// Generate no x87 sequences (by default half the sequences are).
    #[arg(long)]
    no_x87: bool,
    /// Print progress every N sequences.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    every: u64,
    /// The system-level sequences (faults and privileged state at CPL 3,
    /// tests/common/difftest_system.rs) instead of the integer ones.
    #[arg(long)]
    system: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (Some(oracle), Some(subject)) = (
        Engine::from_name(&args.oracle),
        Engine::from_name(&args.engine),
    ) else {
        eprintln!("difftest: unknown engine (engines: {})", Engine::names());
        return ExitCode::from(2);
    };
    for e in [oracle, subject] {
        if let Some(why) = e.unavailable_reason() {
            eprintln!("difftest: engine {e} is unavailable: {why}");
            return ExitCode::from(2);
        }
    }
    let opts = difftest::Options {
        oracle,
        subject,
        seed: args.seed.unwrap_or(difftest::DEFAULT_SEED),
        count: args.count,
        keep_going: args.keep_going,
        x87: !args.no_x87,
    };
    let start = std::time::Instant::now();
    let every = args.every.max(1);
    let report = |report: &str| println!("{report}");
    let progress = |n: u64, d: u64| {
        if n.is_multiple_of(every) {
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "difftest: {n} sequences, {d} divergences, {secs:.0} s ({:.0}/s)",
                n as f64 / secs
            );
        }
    };
    let result = if args.system {
        difftest::run_system(&opts, report, progress)
    } else {
        difftest::run(&opts, report, progress)
    };
    match result {
        Ok(s) => {
            println!(
                "difftest: seed {:#x}: {} sequences, {} divergences, {:.1?}",
                opts.seed, s.sequences, s.divergences, s.elapsed
            );
            ExitCode::from(u8::from(s.divergences > 0))
        }
        Err(e) => {
            eprintln!("difftest: {e}");
            ExitCode::from(2)
        }
    }
}
