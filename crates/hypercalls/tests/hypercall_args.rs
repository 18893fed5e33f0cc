//! The fuzzing harness (`visor_hypercalls::fuzz::hypercall_args`, also the
//! cargo-fuzz target fuzz/fuzz_targets/hypercall_args.rs) on pseudo-random
//! inputs from a fixed seed, so that every `cargo test` runs it on stable
//! Rust: no input may panic the service or get a result the ABI does not
//! allow.
//!
//! `VISOR_HYPERCALL_FUZZ_SECONDS=N` (with `--ignored`) runs
//! `random_inputs_for_a_while` for N seconds from a seed taken from the clock
//! (`VISOR_HYPERCALL_FUZZ_SEED` to repeat one), for long runs without
//! cargo-fuzz.

use std::time::{Duration, Instant};

use hypercall::nr;
use visor_hypercalls::fuzz::{class, hypercall_args, Report, SLOTS};

const INPUTS: usize = 3_000;

/// splitmix64.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An input of 1-600 random bytes.
fn input(state: &mut u64) -> Vec<u8> {
    let len = 1 + (next(state) % 600) as usize;
    (0..len).map(|_| next(state) as u8).collect()
}

/// Runs `count` inputs (or until `deadline`) from `seed`: the summed outcomes.
fn run(seed: u64, count: usize, deadline: Option<Instant>) -> (usize, [[u64; 5]; SLOTS], u64) {
    let mut state = seed;
    let mut outcomes = [[0u64; 5]; SLOTS];
    let mut shutdowns = 0;
    let mut n = 0;
    while n < count && deadline.is_none_or(|d| Instant::now() < d) {
        let data = input(&mut state);
        let r: Report = hypercall_args(&data);
        assert!(
            r.violations.is_empty(),
            "input {n} (seed {seed:#x}): {:#?}\ninput: {data:02x?}",
            r.violations
        );
        for (t, o) in outcomes.iter_mut().zip(r.outcomes) {
            for (a, b) in t.iter_mut().zip(o) {
                *a += b;
            }
        }
        shutdowns += r.shutdown as u64;
        n += 1;
    }
    (n, outcomes, shutdowns)
}

#[test]
fn random_inputs_never_panic() {
    let (n, outcomes, shutdowns) = run(0x4879_7065_7263_616c, INPUTS, None);
    let calls: u64 = outcomes.iter().flatten().sum();
    eprintln!("hypercall_args: {n} inputs, {calls} hypercalls, {shutdowns} shutdowns");
    for (i, o) in outcomes.iter().enumerate() {
        eprintln!("  {:>18} {o:?}", hypercall::name(i as u64));
    }
    // Every hypercall is reached, and so are its documented errors.
    for (number, o) in outcomes.iter().enumerate().take(nr::COUNT as usize) {
        assert!(
            o.iter().sum::<u64>() > 20,
            "{} rarely called",
            hypercall::name(number as u64)
        );
    }
    let seen = |n: u64, c: usize| outcomes[n as usize][c] > 0;
    for (n, c) in [
        (nr::SET_TRAP_TABLE, class::OK),
        (nr::SET_TRAP_TABLE, class::EFAULT),
        (nr::SET_TRAP_TABLE, class::EINVAL),
        (nr::MMU_UPDATE, class::OK),
        (nr::NEW_BASEPTR, class::OK),
        (nr::NEW_BASEPTR, class::EINVAL),
        (nr::STACK_SWITCH, class::OK),
        (nr::STACK_SWITCH, class::EFAULT),
        (nr::CONSOLE_IO, class::OK),
        (nr::CONSOLE_IO, class::EFAULT),
        (nr::CONSOLE_IO, class::EINVAL),
        (nr::SCHED_OP, class::EINVAL),
        (nr::EVENT_CHANNEL_OP, class::OK),
        (nr::EVENT_CHANNEL_OP, class::EINVAL),
        (nr::EVENT_CHANNEL_OP, class::ENOSYS),
        (nr::MULTICALL, class::OK),
        (nr::MULTICALL, class::EFAULT),
        (nr::MULTICALL, class::EINVAL),
        (nr::SET_GDT, class::OK),
        (nr::SET_GDT, class::EFAULT),
        (nr::SET_GDT, class::EINVAL),
        (nr::SET_CALLBACKS, class::OK),
        (nr::SET_CALLBACKS, class::EINVAL),
        (nr::SET_CALLBACKS, class::ENOSYS),
        (nr::IRET, class::EFAULT),
        (nr::IRET, class::EINVAL),
        (nr::SET_HYPERCALL_PAGE, class::OK),
        (nr::SET_HYPERCALL_PAGE, class::EINVAL),
        (nr::SET_HYPERCALL_PAGE, class::ENOSYS),
    ] {
        assert!(seen(n, c), "{} never gave class {c}", hypercall::name(n));
    }
    assert!(outcomes[SLOTS - 1][class::ENOSYS] > 0, "unknown numbers");
    assert!(shutdowns > 0);
}

/// An empty input does nothing; a flags byte alone makes no call.
#[test]
fn degenerate_inputs() {
    for data in [&[][..], &[0], &[7], &[0xff]] {
        let r = hypercall_args(data);
        assert_eq!(r.calls, 0);
        assert!(r.violations.is_empty());
    }
}

/// Long runs: `VISOR_HYPERCALL_FUZZ_SECONDS=600 cargo test --release -p
/// visor-hypercalls --test hypercall_args -- --ignored --nocapture`.
#[test]
#[ignore]
fn random_inputs_for_a_while() {
    let seconds = std::env::var("VISOR_HYPERCALL_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed = std::env::var("VISOR_HYPERCALL_FUZZ_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (n, outcomes, _) = run(seed, usize::MAX, Some(deadline));
    let calls: u64 = outcomes.iter().flatten().sum();
    eprintln!(
        "hypercall_args: seed {seed:#x}, {seconds} s: {n} inputs, {calls} hypercalls, no violation"
    );
}
